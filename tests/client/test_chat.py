"""`fedpersona chat` scripted through piped stdin; feedback kept encrypted; the next round trains on it."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fedpersona.client.device import RECEIVED_SHARED, Device
from fedpersona.client.feedback import (
    FEEDBACK, FEEDBACK_USED, joined_rounds, load_feedback, noise_for_remaining_budget, record_feedback,
    training_feedback,
)
from fedpersona.client.profile import PROFILE
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from fedpersona.privacy.ledger import PrivacyLedger

REPO = Path(__file__).resolve().parents[2]
EDITED = "I bring no news, my lord, but of the tempest."
LINES = [
    ("Who's there?", "Nay, answer me: stand, and unfold yourself, good Bernardo."),
    ("Long live the king!", "You come most carefully upon your hour, my lord Horatio."),
    ("'Tis now struck twelve.", "For this relief much thanks: 'tis bitter cold, and I am sick at heart."),
    ("Have you had quiet guard?", "Not a mouse stirring, my lord; I pray thee get thee to bed."),
    ("Well, good night.", "If you do meet Horatio and Marcellus, the rivals of my watch, bid them make haste."),
    ("I think I hear them.", "Stand, ho! Who's there? Friends to this ground, and liegemen to the Dane."),
]


def _flat(tiny_model_dir, tmp_path, **extra):
    flat = {
        "model.path": str(tiny_model_dir), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2,
        "adapter.personal-layers": 1, "adapter.rank": 2, "client.local-steps": 2, "client.batch-size": 4,
        "server.num-rounds": 3, "server.clients-per-round": 3, "privacy.delta": 1e-2, "privacy.target-epsilon": 8.0,
        "data.max-examples": 48, "data.eval-fraction": 0.25, "eval.per-round": False,
        "run.results-dir": str(tmp_path / "results"), "run.state-dir": str(tmp_path / "state"),
    }
    flat.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(flat, env=False)


@pytest.fixture
def device_dirs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with (data / "speeches.jsonl").open("w") as fh:
        for cue, reply in LINES * 2:
            fh.write(json.dumps({"cue": cue, "reply": reply}) + "\n")
    return data, tmp_path / "device-state"


def _chat(state: Path, data: Path, script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", "chat", "--state-dir", str(state), "--data-dir", str(data),
         "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"],
        input=script, capture_output=True, text=True, env=env, timeout=240, cwd=str(REPO),
    )


def test_scripted_chat_feedback_grows_next_round(tiny_model_dir, tmp_path, device_dirs):
    data, state = device_dirs
    cfg = _flat(tiny_model_dir, tmp_path)
    node = {"data-dir": str(data), "state-dir": str(state), "user-id": "bernardo"}
    dev = Device(cfg, node)
    n0 = len(dev.data.train)
    shared = dev.model.initial_shared_state()
    dev.train_round(shared, server_round=1)
    store = DeviceStore(state)
    assert store.load_tensors(RECEIVED_SHARED) is not None
    ledger1 = PrivacyLedger.from_json(store.load_text("ledger"))
    (sigma1, q1, _), = ledger1.history
    assert q1 == pytest.approx(4 / n0)

    script = "Who goes there?\n/accept\nWhat news?\n/edit " + EDITED + "\nAre you well?\n/reject\n/quit\nnever read\n"
    proc = _chat(state, data, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("assistant:") == 3, out
    assert "[accepted" in out and "[edited" in out and "[rejected" in out
    assert "1 accepted, 1 edited, 1 rejected" in out

    fb = load_feedback(store)
    assert [e.origin for e in fb] == ["accepted", "edited", "rejected"]
    assert [e.cue for e in fb] == ["Who goes there?", "What news?", "Are you well?"]
    assert fb[1].reply == EDITED and fb[1].proposed is not None
    assert all(e.time and len(e.id) == 32 for e in fb)
    profile = store.load_text(PROFILE)
    assert profile and "Horatio" in profile
    # Encrypted at rest: no example text, draft or profile readable in any file of the folder.
    needles = [EDITED.encode(), b"What news?", b"Who goes there?", profile.encode()]
    needles += [e.reply.encode() for e in fb if len(e.reply) >= 8]
    for f in state.iterdir():
        if f.is_file():
            raw = f.read_bytes()
            assert not any(n in raw for n in needles), f.name
    assert store.exists(FEEDBACK)

    # The next round (a fresh device process) trains on its data + the two kept examples.
    dev2 = Device(cfg, node)
    dev2.train_round(store.load_tensors(RECEIVED_SHARED), server_round=2)
    assert len(dev2.data.train) == n0 + 2 and dev2.feedback_examples == 2
    ledger2 = PrivacyLedger.from_json(store.load_text("ledger"))
    assert ledger2.history[-1][1] == pytest.approx(4 / (n0 + 2)) and ledger2.history[-1][1] < q1
    assert ledger2.rounds[-1]["sample_rate"] == pytest.approx(4 / (n0 + 2))
    assert set(joined_rounds(store).values()) == {2}
    # The noise was re-picked for the remaining planned steps: the whole plan stays within the budget.
    sigma2 = ledger2.history[-1][0]
    assert sigma2 != sigma1
    planned_end = ledger2.epsilon_if(noise_multiplier=sigma2, sample_rate=4 / (n0 + 2), num_steps=2,
                                     delta=cfg.privacy.delta)
    assert planned_end <= cfg.privacy.target_epsilon * (1 + 1e-9)
    assert planned_end > cfg.privacy.target_epsilon - 0.05  # and spends it (not over-noised)


def test_chat_without_a_round_is_refused(tiny_model_dir, tmp_path, device_dirs):
    data, state = device_dirs
    proc = _chat(state, data, "/quit\n")
    assert proc.returncode == 2 and "no shared adapter yet" in proc.stderr


def test_feedback_cap_and_rounds(tmp_path):
    store = DeviceStore(tmp_path / "s")
    a = record_feedback(store, cue="c1", reply="first reply", origin="accepted")
    record_feedback(store, cue="c2", reply="never trained", origin="rejected")
    b = record_feedback(store, cue="c3", reply="second reply", origin="edited", proposed="draft")
    c = record_feedback(store, cue="c4", reply="third reply", origin="accepted")
    assert [e.id for e in training_feedback(store, server_round=1, max_new=1)] == [a.id]
    assert [e.id for e in training_feedback(store, server_round=1, max_new=1)] == [a.id]  # a repeated round
    assert [e.id for e in training_feedback(store, server_round=2, max_new=1)] == [a.id, b.id]
    assert [e.id for e in training_feedback(store, server_round=3, max_new=0)] == [a.id, b.id, c.id]
    assert joined_rounds(store) == {a.id: 1, b.id: 2, c.id: 3}
    assert store.exists(FEEDBACK_USED)
    with pytest.raises(ValueError, match="origin"):
        record_feedback(store, cue="c", reply="r", origin="liked")
    with pytest.raises(ValueError, match="max-new-examples"):
        training_feedback(store, server_round=4, max_new=-1)


def test_device_cap_admits_one_example_per_round(tiny_model_dir, tmp_path, device_dirs):
    data, state = device_dirs
    cfg = _flat(tiny_model_dir, tmp_path, **{"client.max-new-examples": 1, "privacy.noise-multiplier": 1.0})
    store = DeviceStore(state)
    for i in range(2):
        record_feedback(store, cue=f"cue {i}", reply=f"my own reply number {i}", origin="accepted")
    dev = Device(cfg, {"data-dir": str(data), "state-dir": str(state)})
    n0 = len(dev.base_train)
    shared = dev.model.initial_shared_state()
    sizes = []
    for r in (1, 2, 3):
        dev.train_round(shared, server_round=r)
        sizes.append(len(dev.data.train))
    assert sizes == [n0 + 1, n0 + 2, n0 + 2]
    qs = [h[1] for h in PrivacyLedger.from_json(store.load_text("ledger")).history]
    assert qs == pytest.approx([4 / (n0 + 1), 4 / (n0 + 2)])


def test_noise_for_remaining_budget():
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=1.0, sample_rate=0.25, num_steps=6)
    sigma = noise_for_remaining_budget(ledger, target_epsilon=8.0, delta=1e-3, sample_rate=0.2, remaining_steps=12)
    eps = ledger.epsilon_if(noise_multiplier=sigma, sample_rate=0.2, num_steps=12, delta=1e-3)
    assert 8.0 - 0.01 <= eps <= 8.0
    spent = PrivacyLedger()
    spent.step(noise_multiplier=0.3, sample_rate=0.5, num_steps=50)
    assert not math.isfinite(spent.epsilon(1e-3)) or spent.epsilon(1e-3) > 8
    assert noise_for_remaining_budget(spent, target_epsilon=8.0, delta=1e-3, sample_rate=0.2, remaining_steps=1) is None


def test_the_policy_floor_is_checked_on_the_noise_a_grown_set_re_picks(tiny_model_dir, tmp_path, device_dirs):
    """A grown training set lowers q, so the device re-picks a smaller sigma: its policy.min-noise-multiplier is
    checked against that sigma, the one the round would train with (before: against the old one, so a round
    could train below the floor)."""
    from fedpersona.client.policy import PolicyViolation

    data, state = device_dirs
    cfg = _flat(tiny_model_dir, tmp_path)
    node = {"data-dir": str(data), "state-dir": str(state), "user-id": "bernardo"}
    dev = Device(cfg, node)
    dev.train_round(dev.model.initial_shared_state(), server_round=1)
    sigma1 = dev.noise_multiplier
    store = DeviceStore(state)
    for i in range(6):
        record_feedback(store, cue=f"cue {i}", reply=f"a reply the user kept, number {i}", origin="accepted")
    probe = Device(cfg, node)
    probe._grow_training_set(2, probe.load_ledger())  # what round 2 will train with (the same examples each time)
    sigma2 = probe.noise_multiplier
    assert sigma2 < sigma1
    floor = (sigma1 + sigma2) / 2
    guarded = Device(cfg, {**node, "policy.min-noise-multiplier": floor})
    assert guarded.noise_multiplier == pytest.approx(sigma1)  # before the round: the set as it was
    with pytest.raises(PolicyViolation, match="policy.min-noise-multiplier"):
        guarded.train_round(store.load_tensors(RECEIVED_SHARED), server_round=2)
    ledger = PrivacyLedger.from_json(store.load_text("ledger"))
    assert [r["round"] for r in ledger.rounds] == [1] and min(s for s, _, _ in ledger.history) >= floor


def test_chat_lines_follow_the_text_rule():
    from fedpersona.client.chat import chat_line, printable
    from fedpersona.client.data import TextRefused

    assert chat_line(b"  Good morrow, sir.\r\n") == "Good morrow, sir."
    assert chat_line("/edit caf\u00e9 \u2713\n") == "/edit caf\u00e9 \u2713"
    for raw, match in ((b"\xff hello\n", "not valid UTF-8 \\(byte 0"), (b"ok \xc3\x28\n", "not valid UTF-8 \\(byte 3"),
                       ("surrogate \udcff\n", "lone surrogate"), (b"nul\x00\n", "U\\+0000"), (b"\x1b[2J\n", "U\\+001B"),
                       (b"x" * 1_000_000, "at most 4096"), ("y" * 4097, "at most 4096")):
        with pytest.raises(TextRefused, match=match):
            chat_line(raw)
    assert printable("a\x1b[31mred\x1b[0m\nline\x00") == "a[31mred[0m line"


def test_feedback_keeps_only_text_that_follows_the_rule(tmp_path, caplog):
    import logging

    from fedpersona.client.data import TextRefused
    from fedpersona.client import feedback
    from fedpersona.client.feedback import usable

    feedback._SKIPPED.clear()  # "reported once" is per process: forget what earlier tests reported
    store = DeviceStore(tmp_path / "s")
    for cue, reply in (("c", "nul\x00"), ("c", "\udcff"), ("c", "x" * 5000), ("esc\x1b", "fine"), ("c", "  ")):
        with pytest.raises(ValueError) as info:
            record_feedback(store, cue=cue, reply=reply, origin="edited")
        assert "\x00" not in str(info.value) and "x" * 100 not in str(info.value)
    assert load_feedback(store) == []
    with pytest.raises(TextRefused):
        record_feedback(store, cue="c", reply="ok", origin="edited", proposed="draft \x1b")
    ok = record_feedback(store, cue="c", reply="a reply with\ta tab", origin="accepted")
    # An example kept before the rule: stays in the store, never used, reported once by id.
    bad = dict(ok.__dict__, id="b" * 32, reply="lone \udcff")
    store.save_text(FEEDBACK, json.dumps({"version": 1, "examples": [dict(ok.__dict__), bad]}))
    with caplog.at_level(logging.WARNING):
        assert [e.id for e in usable(load_feedback(store))] == [ok.id]
        assert [e.id for e in training_feedback(store, server_round=1, max_new=0)] == [ok.id]
    assert sum("b" * 32 in r.getMessage() for r in caplog.records) == 1
    assert len(load_feedback(store)) == 2
