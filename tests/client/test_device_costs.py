"""What building a device and planning its rounds cost: no work a device built only to evaluate does not need."""

from __future__ import annotations

import json

from fedpersona.client import device as device_module
from fedpersona.client import profile as profile_module
from fedpersona.client.device import Device
from fedpersona.client.profile import PROFILE, PROFILE_KEY
from fedpersona.config import load_config

from tests.client.device_helpers import POLICY, REPLIES

DP = {"client.local-steps": 2, "client.head-steps": 1, "client.batch-size": 4, "data.max-examples": 12,
      "privacy.delta": 1e-2, "privacy.target-epsilon": 7.25, "secagg.enabled": False}


def _device(tiny_config, tmp_path, **over) -> Device:
    folder = tmp_path / "alice"
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"cue": f"Who's there? number {i}", "reply": r}) for i, r in enumerate(REPLIES * 2)]
    (folder / "lines.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(dict(tiny_config, **DP, **over), env=False)
    return Device(cfg, {"data-dir": str(folder), "state-dir": str(tmp_path / "state"), "user-id": "alice", **POLICY})


def test_sigma_is_calibrated_when_a_round_is_planned_not_when_the_device_is_built(tiny_config, tmp_path, monkeypatch):
    calls = []
    real = device_module._calibrated
    monkeypatch.setattr(device_module, "_calibrated", lambda *a: calls.append(a) or real(*a))
    dev = _device(tiny_config, tmp_path)
    assert calls == []  # built (as for the final evaluation): nothing calibrated
    plan = dev.plan_round(dev.model.initial_shared_state(), server_round=1)
    assert len(calls) == 1
    assert plan.noise_multiplier == dev.noise_multiplier == real(*calls[0]) > 0
    assert dev.head_noise_multiplier == 0.0  # the head trains without noise (privacy.personal-head = local)
    dev.plan_round(dev.model.initial_shared_state(), server_round=1)
    assert len(calls) == 2 and calls[1] == calls[0]  # asked again per plan, solved once (lru cache inside)


def test_a_rebuilt_device_does_not_compute_its_profile_again(tiny_config, tmp_path, monkeypatch):
    computed = []
    real = profile_module.compute_profile
    monkeypatch.setattr(profile_module, "compute_profile", lambda *a, **k: computed.append(1) or real(*a, **k))
    shared = None
    for build in range(2):
        dev = _device(tiny_config, tmp_path)
        shared = shared or dev.model.initial_shared_state()
        dev.plan_round(shared, server_round=1)
        assert dev.store.load_text(PROFILE)
        assert len(computed) == 1, build  # the second device finds the stored profile current
    key = dev.store.load_text(PROFILE_KEY)
    # A changed set of pairs (a new example) computes it again, and records the new key.
    dev.pairs = dev.pairs + [("Who is it?", "A friend to this ground.")]
    dev._profile_of = None
    dev.plan_round(shared, server_round=2)
    assert len(computed) == 2 and dev.store.load_text(PROFILE_KEY) != key


def test_a_profile_written_by_chat_since_is_computed_again(tiny_config, tmp_path, monkeypatch):
    computed = []
    real = profile_module.compute_profile
    monkeypatch.setattr(profile_module, "compute_profile", lambda *a, **k: computed.append(1) or real(*a, **k))
    dev = _device(tiny_config, tmp_path)
    shared = dev.model.initial_shared_state()
    dev.plan_round(shared, server_round=1)
    mine = dev.store.load_text(PROFILE)
    profile_module.save_profile(dev.store, "Speaks of nothing but the weather.")  # as fedpersona chat writes it
    again = _device(tiny_config, tmp_path)
    again.plan_round(shared, server_round=1)
    assert len(computed) == 2 and again.store.load_text(PROFILE) == mine
