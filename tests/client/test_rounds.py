"""A device's round (shared DP pass with the head off, then the head) and the local-only baseline that replays it."""

import dataclasses
import json

import pytest
import torch

from fedpersona.client.device import BASELINE_LEDGER, HEAD_LEDGER, LEDGER, PARTICIPATION, Device
from fedpersona.config import load_config
from fedpersona.privacy.ledger import PrivacyLedger

from tests.client.device_helpers import REPLIES


def _device(tiny_config, tmp_path, **overrides):
    folder = tmp_path / "alice"
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"cue": f"Who's there? number {i}", "reply": r}) for i, r in enumerate(REPLIES * 2)]
    (folder / "lines.jsonl").write_text("\n".join(lines) + "\n")
    flat = dict(tiny_config, **{"privacy.delta": 1e-2, "data.max-examples": 12, "secagg.enabled": False,
                                "client.head-steps": 3, "client.head-batch-size": 4})
    flat.update(overrides)
    cfg = load_config(flat, env=False)
    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "default"
    # These tests drive the round itself (plain aggregation, DP on or off): the device's policy allows both.
    return Device(cfg, {"data-dir": str(folder), "state-dir": str(tmp_path / f"state-{tag}"), "user-id": "alice",
                        "policy.allow-no-secagg": True, "policy.allow-no-dp": True})


def test_round_trains_shared_then_head_and_the_update_ignores_the_head(tiny_config, tmp_path):
    dev = _device(tiny_config, tmp_path)
    shared0 = dev.model.initial_shared_state()
    update, metrics = dev.train_round(shared0, server_round=1)
    head1 = dev.store.load_tensors("personal")
    fresh = dev.model.fresh_personal_state()
    assert any(not torch.equal(head1[n], fresh[n]) for n in fresh), "the head is trained in the round"
    assert set(update) == set(dev.model.shared_names)
    assert any(float(u.abs().max()) > 0 for u in update.values())
    assert json.loads(dev.store.load_text(PARTICIPATION)) == [{"round": 1, "steps": 2, "head-steps": 3}]
    ledger = PrivacyLedger.from_json(dev.store.load_text(LEDGER))
    assert ledger.total_steps == dev.cfg.client.local_steps, "only the shared pass is in the ledger (head: local)"
    assert dev.store.load_text(HEAD_LEDGER) is None
    assert dev.last_round["epsilon"] > 0 and metrics == {"weight": 1.0, "trained": 1.0}  # the epsilon stays here


def test_dp_head_has_its_own_ledger(tiny_config, tmp_path):
    dev = _device(tiny_config, tmp_path, **{"privacy.personal-head": "dp"})
    dev.train_round(dev.model.initial_shared_state(), server_round=1)
    head_ledger = PrivacyLedger.from_json(dev.store.load_text(HEAD_LEDGER))
    assert head_ledger.total_steps == 3
    assert PrivacyLedger.from_json(dev.store.load_text(LEDGER)).total_steps == 2
    out = dev.final_evaluation(dev.model.initial_shared_state())
    assert 0 < out["head-epsilon"] <= dev.cfg.privacy.target_epsilon + 1e-9
    assert out["steps"] == 2 and out["head-steps"] == 3


@pytest.mark.parametrize("dp", [True, False])
def test_local_baseline_replays_the_devices_own_training(tiny_config, tmp_path, dp):
    """Local-only: the same shared steps (and DP) and the same head steps, from the public start, no federation."""
    dev = _device(tiny_config, tmp_path, **{"privacy.enabled": dp})
    dev.simulated = True  # the local-only baseline runs in simulations only (a data-dir device refuses it)
    shared = dev.model.initial_shared_state()
    for r in (1, 2):
        dev.train_round(shared, server_round=r)  # the server never moves: federation adds nothing here
    out = dev.final_evaluation(shared)
    assert out["steps"] == 4 and out["head-steps"] == 6 and out["rounds"] == 2
    with dev.model.adapters_disabled():
        base = dev._heldout()["loss"]
    assert out["local-loss"] != pytest.approx(base, abs=1e-6), "the baseline must be trained, with DP on or off"
    if dp:
        local = PrivacyLedger.from_json(dev.store.load_text(BASELINE_LEDGER))
        assert local.total_steps == 4
        assert out["local-epsilon"] == pytest.approx(out["epsilon-federated"], rel=1e-9)
        assert out["epsilon"] > out["epsilon-federated"]  # one budget: the two ledgers composed
    # The federated state is left loaded.
    assert all(torch.equal(v, shared[k]) for k, v in dev.model.shared_state().items())


def test_no_participation_means_local_baseline_is_the_base(tiny_config, tmp_path):
    dev = _device(tiny_config, tmp_path)
    dev.simulated = True  # as a simulation builds it
    out = dev.final_evaluation(dev.model.initial_shared_state())
    assert out["steps"] == 0 and out["rounds"] == 0
    assert out["local-loss"] == pytest.approx(out["base-loss"], rel=1e-6)


def test_a_local_head_draws_the_batches_its_local_only_replay_draws(tiny_config, tmp_path, monkeypatch):
    """Personalized vs local-only: the same head batches each round, so only the shared adapter differs."""
    import fedpersona.privacy.dpstep as dpstep

    drawn = []
    real = dpstep.poisson_batch

    def recording(source, gen, n, q):
        idx = real(source, gen, n, q)
        drawn.append((source.secure, idx.tolist()))
        return idx

    monkeypatch.setattr(dpstep, "poisson_batch", recording)
    dev = _device(tiny_config, tmp_path, **{"client.batch-size": 4})
    dev.simulated = True
    shared = dev.model.initial_shared_state()
    for r in (1, 2):
        dev.train_round(shared, server_round=r)
    federated = list(drawn)
    dev.final_evaluation(shared)
    replay = drawn[len(federated):]
    # each round: 2 shared DP steps (CSPRNG), then 3 head steps (the head's seeded batches)
    assert [s for s, _ in federated] == [True, True, False, False, False] * 2
    assert [s for s, _ in replay] == [s for s, _ in federated]
    heads = [i for (s, i) in federated if not s]
    assert heads == [i for (s, i) in replay if not s], "the replay's head batches are the federated head's"
    assert heads[:3] != heads[3:], "each round its own batches"
    other = _device(tiny_config, tmp_path, **{"privacy.personal-head": "dp"})
    assert other.head_source(1) is other.noise_source and other.noise_source.secure, "a DP head: the CSPRNG"


# ------------------------------------------------------------------ the wall-time budget
class _Ticks:
    """A clock that moves one second each time it is read: pass deadlines become step counts."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _budgeted(tiny_config, tmp_path, seconds: float, monkeypatch, **overrides) -> Device:
    import fedpersona.client.train

    dev = _device(tiny_config, tmp_path, **overrides)
    dev.policy = dataclasses.replace(dev.policy, max_round_seconds=seconds)
    monkeypatch.setattr(fedpersona.client.train, "clock", _Ticks())
    return dev


def test_a_dp_pass_stopped_by_the_wall_time_budget_releases_nothing_and_keeps_its_steps(tiny_config, tmp_path,
                                                                                       monkeypatch):
    from fedpersona.client.device import HEAD_FILE, RoundTimeExceeded

    # deadline read at t=1 (+3.5 -> 4.5); the steps start at t=2, 3, 4; the 4th check (t=5) stops the pass
    dev = _budgeted(tiny_config, tmp_path, 3.5, monkeypatch, **{"client.local-steps": 5})
    with pytest.raises(RoundTimeExceeded, match="after 3 of 5 steps") as info:
        dev.train_round(dev.model.initial_shared_state(), server_round=1)
    assert "policy.max-round-seconds" in info.value.public_reason
    ledger = PrivacyLedger.from_json(dev.store.load_text(LEDGER))
    assert ledger.total_steps == 3, "the steps taken on the user's data are accounted"
    (entry,) = ledger.rounds
    assert entry["steps"] == 3 and entry["settings"]["released"] is False
    assert entry["settings"]["stopped-by"] == "policy.max-round-seconds"
    assert dev.store.load_text(PARTICIPATION) is None and dev.store.load_tensors(HEAD_FILE) is None, \
        "no participation, no head trained on a stopped round"


def test_a_head_pass_stopped_by_the_budget_keeps_its_steps_and_the_full_update_is_sent(tiny_config, tmp_path,
                                                                                      monkeypatch):
    # deadline 1 + 4.5 = 5.5: the shared pass's 2 steps (t=2, 3), the head's 2 steps (t=4, 5), stop at t=6
    dev = _budgeted(tiny_config, tmp_path, 4.5, monkeypatch, **{"client.local-steps": 2, "client.head-steps": 5})
    update, metrics = dev.train_round(dev.model.initial_shared_state(), server_round=1)
    assert any(float(u.abs().max()) > 0 for u in update.values())
    assert json.loads(dev.store.load_text(PARTICIPATION)) == [{"round": 1, "steps": 2, "head-steps": 2}]
    (entry,) = PrivacyLedger.from_json(dev.store.load_text(LEDGER)).rounds
    assert entry["steps"] == 2 and "released" not in entry["settings"]


def test_a_round_within_the_budget_is_untouched(tiny_config, tmp_path, monkeypatch):
    dev = _budgeted(tiny_config, tmp_path, 100.0, monkeypatch)
    dev.train_round(dev.model.initial_shared_state(), server_round=1)
    assert json.loads(dev.store.load_text(PARTICIPATION)) == [{"round": 1, "steps": 2, "head-steps": 3}]
