"""The user profile: computed from the user's own replies, stored on the device, never in a message."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

import fedpersona.client.app as client_app
from fedpersona.client.node_data import slug
from fedpersona.client.flow_log import entry_for, inventory_mod, mark_profile, read_inventory
from fedpersona.client.profile import PROFILE, compute_profile, document_frequencies, profile_needles, system_prefix
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from fedpersona.privacy.audit.inventory import verify_inventory
from fedpersona.server.federation import run_federation
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.inprocess import InProcessGrid
from fedpersona.simulations.partitions import prepare_partitions
from tests.privacy.audit_helpers import one_thread

PAIRS = [
    ("", "Good Horatio, I pray thee tell me of the ghost, and of my father's ghost."),
    ("", "Thou art a scholar; speak to it, Horatio, speak to the ghost."),
    ("", "Horatio, the ghost of my father walks; I will watch tonight."),
    ("", "You are welcome, Marcellus; and thou, Bernardo, come hither."),
]


def test_profile_from_the_users_own_replies():
    background = document_frequencies(["the ghost walks", "a ghost, a king", "ghost of the night"] * 5)
    p = compute_profile(PAIRS, background=background)
    assert p.examples == 4 and 11 <= p.median_words <= 14
    assert p.names == ("Horatio",)  # written 4 times; Marcellus / Bernardo once
    assert p.thou_share == pytest.approx(3 / 4)  # thee, thou, thou vs you
    assert "father" in p.topics and "ghost" in p.topics
    # tf-idf against the background: 'father' (absent from it) ranks above 'ghost' (frequent in it).
    assert p.topics.index("father") < p.topics.index("ghost")
    text = p.text()
    assert "thou and thee (75% of the time)" in text and "Horatio" in text and "about 12 words" in text
    assert system_prefix(text).startswith("<|im_start|>system\n") and system_prefix("") == ""
    assert compute_profile([]).text() == ""
    assert profile_needles(text)[0] == text and all(len(n) >= 16 for n in profile_needles(text))


def _reply_with(content: RecordDict) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="1")
    return Message(content, reply_to=request)


def test_a_reply_carrying_the_profile_is_a_violation(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", 5), ("node_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    profile = compute_profile(PAIRS).text()
    needles = profile_needles(profile)
    clean = RecordDict({"metrics": MetricRecord({"weight": 3.0}), "status": ConfigRecord({"detail": "budget spent"}),
                        "update": ArrayRecord({"x": Array(np.zeros(4, dtype=np.float32))})})
    line = mark_profile(_reply_with(clean), entry_for(_reply_with(clean), run_id=1, node_id=1), needles)
    assert line["profile_checked"] and verify_inventory({"d": [line]}).ok
    sentence = needles[-1]
    cases = {
        "whole profile in a status": RecordDict({"status": ConfigRecord({"detail": f"declining: {profile}"})}),
        "one sentence in a secagg bytes field": RecordDict({"secagg": ConfigRecord({"blob": b"x" + sentence.encode()})}),
        "profile bytes inside an array": RecordDict({"update": ArrayRecord({"x": Array(np.frombuffer(
            (profile + "....")[: len(profile) // 4 * 4 + 4].encode(), dtype=np.float32).copy())})}),
    }
    for what, content in cases.items():
        reply = _reply_with(content)
        check = verify_inventory({"d": [mark_profile(reply, entry_for(reply, run_id=1, node_id=1), needles)]})
        assert not check.ok and any("user profile" in v["problem"] for v in check.violations), what
    error = Message(Error(code=2, reason=f"ValueError: {profile}"), reply_to=Message(RecordDict(), 1, "train"))
    check = verify_inventory({"d": [mark_profile(error, entry_for(error, run_id=1, node_id=1), needles)]})
    assert not check.ok and "error reason" in check.violations[0]["problem"]

    # Through the mod, as a device sends it: the profile is read from the device's own store.
    state = tmp_path / "dev"
    DeviceStore(state).save_text(PROFILE, profile)
    ctx = Context(run_id=5, node_id=9, node_config={"data-dir": str(tmp_path), "state-dir": str(state)}, state=RecordDict(),
                  run_config={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inventory_mod(Message(RecordDict(), 9, "train", group_id="1"), ctx,
                      lambda m, c: Message(RecordDict({"status": ConfigRecord({"detail": profile})}), reply_to=m))
    lines = read_inventory(state)
    assert len(lines) == 1 and lines[0]["profile_checked"] and lines[0]["rows"][0]["profile"]
    assert not verify_inventory({"dev": lines}).ok


def _strings(content: RecordDict):
    for rec in content.config_records.values():
        for v in rec.values():
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, (str, bytes)):
                    yield x.encode() if isinstance(x, str) else x
    for rec in content.array_records.values():
        for arr in rec.values():
            yield arr.data


def test_no_message_of_a_federation_carries_a_profile(tiny_model_dir, tmp_path):
    flat = {
        "model.path": str(tiny_model_dir), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2,
        "adapter.personal-layers": 1, "adapter.rank": 2, "data.max-users": 3, "data.min-speeches": 40,
        "data.max-examples": 12, "client.local-steps": 2, "client.batch-size": 4, "server.num-rounds": 2,
        "server.clients-per-round": 3, "server.min-clients": 2, "privacy.delta": 1e-2, "eval.local-baseline": False,
        "privacy.noise-multiplier": 1.0, "run.results-dir": str(tmp_path / "results"),
        "run.state-dir": str(tmp_path / "state"), "run.name": "profile",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    replies: list[Message] = []

    def recording_app(message, context):
        reply = client_app.app(message, context)
        replies.append(reply)
        return reply

    prepare_partitions(cfg)  # as the runner does: each simulated device reads its user's data folder
    nodes = {i: {"partition-id": i} for i in range(3)}
    with InProcessGrid(recording_app, nodes, flat, run_id=777) as grid, one_thread():
        run_federation(grid, cfg)
    for i in nodes:
        client_app._DEVICES.pop((777, i), None)
    users = load_users(min_speeches=40, max_users=3, seed=0)
    state = Path(flat["run.state-dir"]) / "profile"
    profiles = {u.user_id: DeviceStore(state / slug(u.user_id)).load_text(PROFILE) for u in users}
    assert all(profiles.values()), "every trained device keeps a profile"
    needles = [n.encode() for p in profiles.values() for n in profile_needles(p)]
    assert replies and needles
    scanned = 0
    for reply in replies:
        if reply.has_content():
            for blob in _strings(reply.content):
                scanned += 1
                assert not any(n in blob for n in needles)
        else:
            assert not any(n in str(reply.error.reason).encode() for n in needles)
    assert scanned > 0
    inventories = {p.name: read_inventory(p) for p in state.iterdir()}
    check = verify_inventory(inventories)
    assert check.ok, check.violations
    train_lines = [ln for ls in inventories.values() for ln in ls if ln["message_type"] == "train"]
    assert train_lines and all(ln["profile_checked"] for ln in train_lines)

    # `fedpersona chat --user`: the run's newest checkpoint + the simulated user's head, feedback into its store.
    from fedpersona.client.chat import ChatSession, device_profile
    from fedpersona.client.feedback import load_feedback
    from fedpersona.simulations.chat import simulated_user

    cfg2, model, store, pairs = simulated_user(users[0].user_id.lower(), None, flat)
    assert store.state_dir == state / slug(users[0].user_id) and len(pairs) == len(users[0].examples)
    out = io.StringIO()
    session = ChatSession(model, cfg2, store, profile=device_profile(store, pairs=pairs, tokenizer=model.tokenizer),
                          max_new_tokens=4, temperature=1.0, seed=1)
    counts = session.run(["Who's there?", "/accept", "/profile", "/quit"], out)
    assert counts.accepted == 1 and "profile: " + profiles[users[0].user_id] in out.getvalue()
    assert [e.origin for e in load_feedback(store)] == ["accepted"]
    # With exemplars: the user's own turn most like the message comes before it, within the budget.
    from fedpersona.client.chat import EXEMPLAR_TOKENS
    from fedpersona.client.exemplars import MAX_EXEMPLAR_WORDS, exemplar_text

    cue, own = next((c, r) for c, r in pairs if 3 <= len(r.split()) <= MAX_EXEMPLAR_WORDS)
    ex_session = ChatSession(model, cfg2, store, pairs=pairs, exemplars=2, seed=1)
    shown = ex_session.exemplar_ids(f"{cue} {own}")
    turn = model.tokenizer(exemplar_text([(cue, own)]), add_special_tokens=False)["input_ids"]
    assert shown[: len(turn)] == list(turn) and len(shown) <= EXEMPLAR_TOKENS
    before, hello = len(ex_session._prefix), ex_session.exemplar_ids("Hello")
    assert hello and ex_session.context_ids([], "Hello")[before : before + len(hello)] == hello
    assert session.exemplar_ids("Hello") == [], "no exemplars unless asked for"
    with pytest.raises(ValueError, match="number of exemplars"):
        ChatSession(model, cfg2, store, exemplars=-1)
    with pytest.raises(ValueError, match="Unknown user"):
        simulated_user("NOBODY (Nowhere)", None, flat)
