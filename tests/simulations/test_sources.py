"""Data sources: per-user files read with Hugging Face datasets, partitioned with Flower Datasets."""

import csv
import json
import warnings

import pytest

from fedpersona.config import load_config
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.sources import CUE_MESSAGES, load_source


def _rows(users: str = "abcd", n: int = 5) -> list[dict]:
    return [{"user": u, "cue": f"what did {u} hear {i}?", "reply": f"{u} says thing number {i}"}
            for i in range(n) for u in users]  # interleaved, as real logs are


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(**keys):
    return load_config({f"data.{k.replace('_', '-')}": v for k, v in keys.items()}, env=False).data


def test_shakespeare_is_the_default_and_delegates_to_the_corpus():
    data = _data(min_examples=40, max_users=4)
    assert data.source == "shakespeare"
    got = load_source(data, 0)
    assert [u.user_id for u in got] == [u.user_id for u in load_users(min_speeches=40, max_users=4, seed=0)]


def test_jsonl_users_examples_in_file_order(tmp_path):
    src = _jsonl(tmp_path / "chats.jsonl", _rows())
    seen = []
    users = load_source(_data(source=src, min_examples=2, max_users=10), 0, on_user=lambda d, t: seen.append((d, t)))
    assert [u.user_id for u in users] == ["a", "b", "c", "d"]
    for u in users:
        assert [e.reply for e in u.examples] == [f"{u.user_id} says thing number {i}" for i in range(5)]
        assert u.examples[2].cue == f"what did {u.user_id} hear 2?"
    assert seen[-1] == (4, 4)


def test_filters_min_examples_and_seeded_max_users(tmp_path):
    rows = _rows("abcdef", 5) + [{"user": "few", "cue": "", "reply": "only one"}]
    src = _jsonl(tmp_path / "x.jsonl", rows)
    everyone = load_source(_data(source=src, min_examples=2, max_users=100), 0)
    assert "few" not in {u.user_id for u in everyone} and len(everyone) == 6
    a = [u.user_id for u in load_source(_data(source=src, min_examples=2, max_users=3), 0)]
    b = [u.user_id for u in load_source(_data(source=src, min_examples=2, max_users=3), 0)]
    draws = {tuple(u.user_id for u in load_source(_data(source=src, min_examples=2, max_users=3), s)) for s in range(8)}
    assert a == b == sorted(a) and len(a) == 3
    assert len(draws) > 1, "the seed picks the users"
    with pytest.raises(ValueError, match=r"x.jsonl.*min-examples=6.*7 users.*most examples of any is 5"):
        load_source(_data(source=src, min_examples=6), 0)


def test_csv_source_with_other_column_names(tmp_path):
    path = tmp_path / "mail.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sender", "subject", "body"])
        for i in range(3):
            w.writerow([101, "", f"body {i}, with a comma"])  # numeric user ids, empty cues
            w.writerow([202, f"re: {i}", str(i)])  # a number as the text: CSV has no types
    users = load_source(_data(source=str(path), user_column="sender", cue_column="subject", reply_column="body",
                              min_examples=2), 0)
    assert [u.user_id for u in users] == ["101", "202"]
    assert [e.reply for e in users[0].examples] == [f"body {i}, with a comma" for i in range(3)]
    assert [(e.cue, e.reply) for e in users[1].examples] == [(f"re: {i}", str(i)) for i in range(3)]
    assert all(e.cue == "" for e in users[0].examples)


def test_parquet_chat_log_cues_are_the_other_users_messages(tmp_path):
    pd = pytest.importorskip("pandas")
    log = [("a", "hi all", "t1"), ("b", "hello", "t1"), ("c", "hey", "t1"), ("a", "what's up", "t1"),
           ("a", "anyone?", "t1"), ("b", "me", "t1"), ("c", "other thread", "t2"), ("b", "yes", "t2")]
    frame = pd.DataFrame({"who": [w for w, _, _ in log], "msg": [m for _, m, _ in log],
                          "room": [r for _, _, r in log], "ts": range(len(log))})
    frame.iloc[::-1].to_parquet(tmp_path / "chat.parquet")  # stored newest first: the order column fixes it
    users = {u.user_id: u for u in load_source(
        _data(source=str(tmp_path / "chat.parquet"), user_column="who", text_column="msg", order_column="ts",
              thread_column="room", min_examples=2), 0)}
    assert [(e.cue, e.reply) for e in users["a"].examples] == [("", "hi all"), ("hello\nhey", "what's up"),
                                                                ("", "anyone?")]
    assert [(e.cue, e.reply) for e in users["b"].examples] == [
        ("hi all", "hello"), ("hey\nwhat's up\nanyone?", "me"), ("other thread", "yes")]
    assert [(e.cue, e.reply) for e in users["c"].examples] == [("hi all\nhello", "hey"), ("", "other thread")]
    assert CUE_MESSAGES >= 3


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows("xy", 3)
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])})
    ds.save_to_disk(str(tmp_path / "saved"))
    users = load_source(_data(source=str(tmp_path / "saved"), min_examples=2), 0)
    assert [u.user_id for u in users] == ["x", "y"] and [len(u.examples) for u in users] == [3, 3]


# ------------------------------------------------------------------------------------------- errors
def test_missing_column_names_file_column_and_key(tmp_path):
    src = _jsonl(tmp_path / "chats.jsonl", _rows())
    with pytest.raises(ValueError, match=r"chats.jsonl: no column 'author' \(data.user-column\).*'user'"):
        load_source(_data(source=src, user_column="author", min_examples=2), 0)
    with pytest.raises(ValueError, match=r"chats.jsonl: no column 'answer' \(data.reply-column\)"):
        load_source(_data(source=src, reply_column="answer", min_examples=2), 0)
    with pytest.raises(ValueError, match=r"no column 'context' \(data.cue-column\)"):  # an explicit cue column must exist
        load_source(_data(source=src, cue_column="context", min_examples=2), 0)


def test_empty_user_names_the_row(tmp_path):
    rows = _rows()
    rows[6]["user"] = "  "
    src = _jsonl(tmp_path / "chats.jsonl", rows)
    with pytest.raises(ValueError, match=r"chats.jsonl, row 7: empty user id in column 'user' \(data.user-column\)"):
        load_source(_data(source=src, min_examples=2), 0)


def test_non_text_and_empty_values_name_the_row(tmp_path):
    rows = _rows()
    rows[3]["reply"] = 42
    with pytest.raises(ValueError, match=r"bad.jsonl, row 4: column 'reply' \(data.reply-column\) must hold text.*42"):
        load_source(_data(source=_jsonl(tmp_path / "bad.jsonl", rows), min_examples=2), 0)
    rows = _rows()
    rows[9]["reply"] = " "
    with pytest.raises(ValueError, match=r"empty.jsonl, row 10: empty text in column 'reply'"):
        load_source(_data(source=_jsonl(tmp_path / "empty.jsonl", rows), min_examples=2), 0)
    rows = _rows()
    rows[0]["user"] = 1.5
    with pytest.raises(ValueError, match=r"ids.jsonl, row 1: column 'user' .*user id"):
        load_source(_data(source=_jsonl(tmp_path / "ids.jsonl", rows), min_examples=2), 0)


def test_text_a_device_would_refuse_names_the_row(tmp_path):
    for i, (column, bad, match) in enumerate([("reply", "esc \x1b[31m", "U\\+001B"), ("cue", "nul \x00", "U\\+0000")]):
        rows = _rows()
        rows[5][column] = bad
        with pytest.raises(ValueError, match=rf"bad{i}.jsonl, row 6: column '{column}' \(data.{column}-column\) .*{match}"):
            load_source(_data(source=_jsonl(tmp_path / f"bad{i}.jsonl", rows), min_examples=2), 0)


def test_unreadable_sources(tmp_path):
    with pytest.raises(ValueError, match=r"data.source.*cannot read"):
        load_source(_data(source=str(tmp_path / "nope.jsonl")), 0)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt.*is not a .*jsonl.*file"):
        load_source(_data(source=str(tmp_path / "notes.txt")), 0)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"folder: not a Hugging Face dataset folder"):
        load_source(_data(source=str(tmp_path / "folder")), 0)
    (tmp_path / "broken.jsonl").write_text('{"user": "a", "reply": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: cannot read it as JSON"):
        load_source(_data(source=str(tmp_path / "broken.jsonl")), 0)


# ------------------------------------------------------------------------------------------- config
def test_min_speeches_is_a_deprecated_alias_of_min_examples():
    with pytest.warns(FutureWarning, match="data.min-speeches.*deprecated.*data.min-examples"):
        cfg = load_config({"data.min-speeches": 12}, env=False)
    assert cfg.data.min_examples == 12 and cfg.data.min_speeches == 12
    assert "data.min-examples" in cfg.to_flat() and "data.min-speeches" not in cfg.to_flat()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config({"data.min-examples": 7}, env=False).data.min_examples == 7


@pytest.mark.parametrize("keys, match", [
    ({"data.source": " "}, "data.source"),
    ({"data.user-column": ""}, "data.user-column"),
    ({"data.order-column": "ts"}, "data.order-column.*data.text-column"),
    ({"data.thread-column": "room"}, "data.thread-column.*data.text-column"),
    ({"data.user-column": "reply"}, "must differ"),
    ({"data.min-examples": 1}, "data.min-examples"),
])
def test_data_config_rejects(keys, match):
    with pytest.raises(ValueError, match=match):
        load_config(keys, env=False)
