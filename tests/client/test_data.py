"""A device's data folder, the train / held-out split, and ChatML encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpersona.client.data import (
    ASSISTANT_HEADER,
    IM_END,
    USER_HEADER,
    EncodedExample,
    encode_examples,
    format_prompt,
    read_user_folder,
    split_examples,
)


def tiny_tokenizer():
    """A real byte-level BPE fast tokenizer trained on a few lines, with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant", "To be, or not to be, that is the question.",
                             "Who's there? Nay, answer me: stand, and unfold yourself."] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write(folder: Path, name: str, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jl(*records) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


# ------------------------------------------------------------------------------------------ reading
def test_read_folder_happy_path(tmp_path: Path):
    write(tmp_path, "b.jsonl", jl({"cue": "Who's there?", "reply": "Nay, answer me."}))
    write(tmp_path, "a.jsonl", jl({"cue": "", "reply": "First."}) + "\n   \n" + jl({"reply": "No cue.", "x": 1}))
    write(tmp_path, "notes.txt", "ignored")
    assert read_user_folder(tmp_path) == [("", "First."), ("", "No cue."), ("Who's there?", "Nay, answer me.")]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff\xfe not utf-8\n", r"bad\.jsonl.*UTF-8"),
        ("{not json}\n", r"bad\.jsonl, line 1: not valid JSON"),
        (jl({"cue": "a", "reply": "b"}) + "[1, 2]\n", r"bad\.jsonl, line 2: expected a JSON object"),
        (jl({"cue": "a"}), r"bad\.jsonl, line 1: \"reply\" must be a string"),
        (jl({"reply": 3}), r"bad\.jsonl, line 1: \"reply\" must be a string"),
        (jl({"cue": 5, "reply": "b"}), r"bad\.jsonl, line 1: \"cue\" must be a string"),
        ("\n" + jl({"cue": "a", "reply": "  \n "}), r"bad\.jsonl, line 2: \"reply\" is empty"),
        ("\n  \n", r"bad\.jsonl: the file has no record"),
        ("", r"bad\.jsonl: the file has no record"),
        ('{"reply": "lone \\ud800 surrogate"}\n', r"bad\.jsonl, line 1: \"reply\" is not valid Unicode.*U\+D800"),
        (jl({"cue": "nul \x00", "reply": "b"}), r"bad\.jsonl, line 1: \"cue\" holds the control character U\+0000"),
        (jl({"reply": "esc \x1b[31m"}), r"bad\.jsonl, line 1: \"reply\" holds the control character U\+001B"),
    ],
)
def test_read_folder_bad_file(tmp_path: Path, content, match):
    write(tmp_path, "a-good.jsonl", jl({"cue": "", "reply": "fine"}))
    write(tmp_path, "bad.jsonl", content)
    with pytest.raises(ValueError, match=match):
        read_user_folder(tmp_path)


def test_read_folder_missing_or_empty(tmp_path: Path):
    with pytest.raises(ValueError, match=r"nope.*does not exist"):
        read_user_folder(tmp_path / "nope")
    write(tmp_path, "data.json", "{}")
    with pytest.raises(ValueError, match=r"no \*\.jsonl file"):
        read_user_folder(tmp_path)


def test_read_folder_unreadable_file(tmp_path: Path, monkeypatch):
    bad = write(tmp_path, "x.jsonl", jl({"reply": "ok"}))
    real = Path.read_bytes

    def read_bytes(self):
        if self == bad:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(ValueError, match=r"x\.jsonl: cannot read the file"):
        read_user_folder(tmp_path)


def test_read_folder_skips_folders_named_jsonl(tmp_path: Path):
    (tmp_path / "dir.jsonl").mkdir()
    write(tmp_path, "x.jsonl", jl({"reply": "ok"}))
    assert read_user_folder(tmp_path) == [("", "ok")]


# ---------------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize(("n", "frac", "held"), [(2, 0.2, 1), (10, 0.2, 2), (10, 0.0, 1), (7, 0.5, 4), (3, 0.99, 2),
                                                 (100, 0.15, 15)])
def test_split_sizes_disjoint(n, frac, held):
    items = list(range(n))
    train, held_out = split_examples(items, eval_fraction=frac, seed=0, key="HAMLET (Hamlet)")
    assert len(held_out) == held and len(train) == n - held
    assert sorted(train + held_out) == items
    assert train == sorted(train) and held_out == sorted(held_out)  # original order kept


def test_split_deterministic_by_seed_and_key():
    items = [(f"cue {i}", f"reply {i}") for i in range(50)]
    a = split_examples(items, eval_fraction=0.2, seed=0, key="u1")
    assert a == split_examples(items, eval_fraction=0.2, seed=0, key="u1")
    assert a[1] != split_examples(items, eval_fraction=0.2, seed=1, key="u1")[1]
    assert a[1] != split_examples(items, eval_fraction=0.2, seed=0, key="u2")[1]


def test_split_pinned():
    """The split does not depend on PYTHONHASHSEED: pinned for one (seed, key)."""
    _, held = split_examples(list(range(20)), eval_fraction=0.2, seed=0, key="HAMLET (Hamlet)")
    assert held == [1, 8, 15, 19]


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5, float("nan"), "0.2"])
def test_split_bad_fraction(frac):
    with pytest.raises(ValueError, match="eval_fraction"):
        split_examples([1, 2, 3], eval_fraction=frac, seed=0, key="u")


def test_split_too_few():
    with pytest.raises(ValueError, match=r"user 'u' has only 1 examples"):
        split_examples([1], eval_fraction=0.2, seed=0, key="u")


# ----------------------------------------------------------------------------------------- encoding
def test_format_prompt():
    assert format_prompt("Who's there?") == "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("") == USER_HEADER + ASSISTANT_HEADER


def test_encode_layout_and_mask(tok):
    cue, reply = "Who's there?", "Nay, answer me: stand."
    (ex,) = encode_examples(tok, [(cue, reply)], seq_len=128, cue_tokens=64)
    prompt = ids(tok, USER_HEADER) + ids(tok, cue) + ids(tok, ASSISTANT_HEADER)
    target = ids(tok, reply) + ids(tok, IM_END)
    assert ex.input_ids == prompt + target
    assert ex.target_mask == [False] * len(prompt) + [True] * len(target)
    # target positions are exactly the reply tokens and the closing <|im_end|>
    targets = [t for t, m in zip(ex.input_ids, ex.target_mask) if m]
    assert tok.decode(targets) == reply + IM_END
    assert targets[-1] == tok.convert_tokens_to_ids(IM_END)
    assert tok.decode(ex.input_ids) == format_prompt(cue) + reply + IM_END
    assert ex.num_targets == len(target)


def test_encode_empty_cue(tok):
    (ex,) = encode_examples(tok, [("", "To be.")], seq_len=32, cue_tokens=8)
    assert tok.decode(ex.input_ids) == format_prompt("") + "To be." + IM_END


def test_encode_cue_keeps_last_tokens(tok):
    cue = "To be, or not to be, that is the question. Who's there?"
    cue_ids = ids(tok, cue)
    assert len(cue_ids) > 5
    (ex,) = encode_examples(tok, [(cue, "Nay.")], seq_len=128, cue_tokens=5)
    h = len(ids(tok, USER_HEADER))
    assert ex.input_ids[h:h + 5] == cue_ids[-5:]
    (ex0,) = encode_examples(tok, [(cue, "Nay.")], seq_len=128, cue_tokens=0)
    assert tok.decode(ex0.input_ids) == format_prompt("") + "Nay." + IM_END


def test_encode_long_reply_cut_to_seq_len(tok):
    reply = "To be, or not to be, that is the question. " * 20
    for seq_len in (16, 24, 64):
        (ex,) = encode_examples(tok, [("Who's there?", reply)], seq_len=seq_len, cue_tokens=4)
        assert len(ex.input_ids) == seq_len == len(ex.target_mask)
        first = ex.target_mask.index(True)
        assert all(ex.target_mask[first:]) and not any(ex.target_mask[:first])
        assert ex.input_ids[first:] == ids(tok, reply)[: seq_len - first]  # a cut reply: no closing token
        assert ex.num_targets >= 4


def test_encode_cue_cut_further_for_reply_room(tok):
    fixed = len(ids(tok, USER_HEADER)) + len(ids(tok, ASSISTANT_HEADER))
    seq_len = 16
    cue = "Who's there? Nay, answer me: stand, and unfold yourself. " * 5
    reply = "To be, or not to be, that is the question."
    (ex,) = encode_examples(tok, [(cue, reply)], seq_len=seq_len, cue_tokens=seq_len - 8)
    assert len(ex.input_ids) <= seq_len
    assert ex.num_targets >= 4
    assert len(ex.input_ids) - ex.num_targets <= seq_len - 4
    n_cue = len(ex.input_ids) - ex.num_targets - fixed
    assert n_cue == max(0, seq_len - fixed - 4)
    assert ex.input_ids[len(ids(tok, USER_HEADER)):][:n_cue] == ids(tok, cue)[len(ids(tok, cue)) - n_cue:]
    # a short reply needs less room: the cue is not cut below what fits
    (short,) = encode_examples(tok, [(cue, "")], seq_len=seq_len, cue_tokens=seq_len - 8)
    assert short.num_targets == 1 and len(short.input_ids) <= seq_len
    assert tok.decode([t for t, m in zip(short.input_ids, short.target_mask) if m]) == IM_END


def test_encode_many_lengths_bounded(tok):
    pairs = [("Who's there? " * k, "Nay, answer me. " * j) for k in range(0, 12, 3) for j in range(0, 12, 3)]
    out = encode_examples(tok, pairs, seq_len=20, cue_tokens=6)
    assert len(out) == len(pairs)
    for ex in out:
        assert isinstance(ex, EncodedExample)
        assert len(ex.input_ids) == len(ex.target_mask) <= 20
        assert ex.num_targets >= 1 and not ex.target_mask[0]
    assert encode_examples(tok, [], seq_len=20, cue_tokens=6) == []


def test_batch_ids_equal_the_tokenizers_own(tok):
    """The backend's batch encoding (offsets skipped) gives each text exactly the ids the tokenizer gives it alone."""
    from fedpersona.client.data import _ids

    texts = ["To be, or not to be", "", "Who's there?  Nay,\nanswer me", "caf\u00e9 \u2014 \u00e6on", " lead  space",
             "x" * 300, USER_HEADER, IM_END]
    assert _ids(tok, texts) == [ids(tok, t) for t in texts]
    assert _ids(tok, []) == []


@pytest.mark.parametrize(
    ("seq_len", "cue_tokens", "match"),
    [(15, 4, "seq_len.*15"), (32, -1, "cue_tokens.*-1"), (32, 25, r"cue_tokens.*24.*25"), (32.0, 4, "seq_len")],
)
def test_encode_bad_args(tok, seq_len, cue_tokens, match):
    with pytest.raises(ValueError, match=match):
        encode_examples(tok, [("a", "b")], seq_len=seq_len, cue_tokens=cue_tokens)


def test_encoded_example_lengths_must_match():
    with pytest.raises(ValueError, match="differ in length"):
        EncodedExample([1, 2], [True])


def test_text_rule():
    from fedpersona.client.data import MAX_TEXT_CHARS, TextRefused, check_text

    for fine in ("plain", "tab\tand\nlines\r\n", "é ✓ 😀 \u200d \u2028", ""):
        assert check_text(fine, field="t") == fine
    for bad, match in (("a\x00b", "U\\+0000 at character 1"), ("\x7f", "U\\+007F"), ("c1 \x85", "U\\+0085"),
                       ("x\udcff", "lone surrogate U\\+DCFF")):
        with pytest.raises(TextRefused, match=match) as info:
            check_text(bad, field="the reply")
        assert str(info.value).startswith("the reply ") and "You passed" in str(info.value)
    with pytest.raises(TextRefused, match="at most 4096"):
        check_text("x" * (MAX_TEXT_CHARS + 1), field="t", max_chars=MAX_TEXT_CHARS)
    with pytest.raises(TextRefused, match="must be a string"):
        check_text(b"bytes", field="t")
    assert issubclass(TextRefused, ValueError)


def test_the_backend_gives_the_tokenizer_call_s_ids(tok):
    """Examples are tokenized through the fast tokenizer's backend in one batch: the very ids of calling it."""
    from fedpersona.client.data import _ids

    texts = ["", " ", "To be, or not to be", "<|im_start|>user\nWho's there?<|im_end|>", "Ünïcödé — ‘quotes’ …",
             "Nay, answer me:\n\nstand,\tand unfold yourself.", "a" * 300, USER_HEADER, ASSISTANT_HEADER, IM_END]
    assert _ids(tok, texts) == [ids(tok, t) for t in texts]
    assert _ids(tok, []) == []
