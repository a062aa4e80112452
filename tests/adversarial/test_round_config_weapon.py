"""Issue 20, hole 5: the round config as a weapon.

The dishonest server keeps a harmless config for itself and hands every device a round config of its
choosing (the devices read the run config; nothing else vouches for it), through the real ServerApp
loop and the real ClientApp (tiny model, the users' own data and state folders, secure aggregation on):

* ``client.head-steps = 10000000``: on main (cb416a4) each device accepted it and started ten million
  head steps; now it is refused before anything is computed: by the config's bounds, and below those by
  the device's own cost caps (``policy.max-head-steps``), naming the setting.
* ``privacy.planned-rounds = 1e9`` (or 1e5, inside the bounds): on main the device calibrated a huge
  noise, saved a ledger with epsilon -0.0086 and then refused to load it: bricked for good, every later
  round failed. Now 1e9 is refused, 1e5 trains and records epsilon 0, and an honest round afterwards
  trains on the same devices.

A spy on the trainer records every pass a device starts (and stops a runaway one after 200 steps, so
that main fails fast instead of training for hours).
"""

from __future__ import annotations

import pytest

import fedpersona.client.train
from fedpersona.client.store import DeviceStore
from fedpersona.privacy.ledger import PrivacyLedger
from tests.adversarial.helpers import SECRET, flat_config, user_folders
from tests.adversarial.server_view import federation as _federation

RUNAWAY = 200


class _Runaway(RuntimeError):
    pass


@pytest.fixture
def passes(monkeypatch):
    """Every training pass a device starts: the steps it was asked for."""
    asked: list[int] = []
    real = fedpersona.client.train.DPTrainer._train

    def spy(self, *args, **kwargs):
        asked.append(int(kwargs["steps"]))
        if kwargs["steps"] > RUNAWAY:
            raise _Runaway(f"the device started a pass of {kwargs['steps']} steps")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fedpersona.client.train.DPTrainer, "_train", spy)
    return asked


def _ledger(nc) -> PrivacyLedger | None:
    text = DeviceStore(nc["state-dir"]).load_text("ledger")
    return PrivacyLedger.from_json(text) if text else None


@pytest.mark.parametrize("head_steps, refused_by", [
    (10_000_000, "the config's bound"),
    (5_000, "policy.max-head-steps = 100"),
])
def test_ten_million_head_steps_are_refused_before_any_work(tiny_config, tmp_path, passes, head_steps, refused_by):
    nodes = user_folders(tmp_path)
    honest = flat_config(tiny_config)
    metrics, errors = _federation(honest, dict(honest, **{"client.head-steps": head_steps}), nodes)
    assert max(passes, default=0) <= RUNAWAY, f"a device started {max(passes)} steps"
    assert passes == [], "nothing was trained: the round was refused before any pass"
    (row,) = metrics["rounds"]
    assert not row["applied"] and row.get("contributors", 0) == 0, row
    for nid, nc in nodes.items():
        assert _ledger(nc) is None, "nothing trained, nothing recorded"
        assert DeviceStore(nc["state-dir"]).load_tensors("lower-activations") is None, \
            "refused before the device ran its examples through the model"
        assert errors[nid], f"node {nid} answered without an error"
        kind, _, reason = errors[nid][0].partition(": ")
        assert SECRET not in reason and nc["user-id"] not in reason
        if refused_by.startswith("policy"):
            assert kind == "train", errors[nid]
            assert reason.startswith("PolicyViolation: the device's privacy policy refuses client.head-steps = 5000: "
                                     "above this device's cap policy.max-head-steps = 100"), reason
        else:
            # the device's own log names the key; the reply has the fixed text only
            assert kind == "query.advertise", errors[nid]
            assert reason == ("ValueError: the device could not answer this query.advertise request; the details are "
                              "in the device's own log"), reason


@pytest.mark.parametrize("planned", [1e9, 1e5])
def test_a_huge_planned_rounds_does_not_brick_the_device(tiny_config, tmp_path, planned):
    nodes = user_folders(tmp_path)
    honest = flat_config(tiny_config)
    weapon = dict(honest, **{"privacy.noise-multiplier": 0.0, "privacy.planned-rounds": planned})
    _federation(honest, weapon, nodes)
    for nc in nodes.values():
        ledger = _ledger(nc)  # loads: a device never saves a ledger it would refuse to load
        if ledger is not None:
            assert all(r["epsilon"] >= 0 for r in ledger.rounds)
            assert ledger.rounds[-1]["noise_multiplier"] > 50, "trained at the huge noise the weapon asked for"
    # The same devices, an honest round afterwards: they train (on main every one of them failed here).
    metrics, _ = _federation(dict(honest, **{"run.name": "after"}), dict(honest, **{"run.name": "after"}), nodes)
    (row,) = metrics["rounds"]
    assert row["failed"] == 0 and row["contributors"] == 3 and row["applied"], row
    for nc in nodes.values():
        assert _ledger(nc).epsilon(1e-2) > 0
