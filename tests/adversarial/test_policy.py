"""Hole 3: the server sets the device's privacy. A dishonest server's weakened settings are refused.

The real ServerApp loop sends a run config of the server's choosing to real devices (tiny
model, their own data and state folders); each device checks it against its own policy
(client/policy.py, safe defaults) before it trains, and refuses with an error naming the setting.
"""

import logging
import math

import pytest

from fedpersona.client.store import DeviceStore
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.simulations.audit.gather import build_audit
from tests.adversarial.helpers import SECRET, flat_config, replies, run, user_folders


def _ledger(nc) -> PrivacyLedger | None:
    text = DeviceStore(nc["state-dir"]).load_text("ledger")
    return PrivacyLedger.from_json(text) if text else None


@pytest.mark.parametrize("key, value", [
    ("privacy.enabled", False),
    ("privacy.target-epsilon", 1000.0),
    ("privacy.noise-multiplier", 0.01),
    ("secagg.enabled", False),
    ("secagg.threshold", 1),
    ("privacy.delta", 0.2),
])
def test_each_weakened_setting_is_refused_naming_it(tiny_config, tmp_path, caplog, key, value):
    nodes = user_folders(tmp_path)
    with caplog.at_level(logging.WARNING):
        metrics = run(flat_config(tiny_config, **{key: value}), nodes)
    (row,) = metrics["rounds"]
    assert row["failed"] == 3 and row["contributors"] == 0 and not row["applied"], row
    from fedpersona.client.failures import read_failures  # imported here: main's failure is then the behaviour, not the import
    for nid, nc in nodes.items():
        (reply,) = replies(nodes)[nid]
        assert reply["reply"] == "error" and not reply["rows"], "a refusal carries nothing but the error"
        reason = reply["error"]["reason"]
        assert reason.startswith(f"PolicyViolation: the device's privacy policy refuses {key} = "), reason
        assert SECRET not in reason and nc["user-id"] not in reason, "never the user's data or id"
        assert _ledger(nc) is None, "nothing trained, nothing recorded"
        assert [f["error"] for f in read_failures(nc["state-dir"])] == ["PolicyViolation"]
    warned = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.app" and r.levelno == logging.WARNING
              and "refused a train request" in r.getMessage()]
    assert len(warned) == 3 and all(f"refuses {key} = " in w for w in warned), "a warning in each device's log"


def test_the_same_run_within_the_policy_trains(tiny_config, tmp_path):
    """The control: the same devices accept the default settings, and the ledger keeps what they accepted."""
    nodes = user_folders(tmp_path)
    metrics = run(flat_config(tiny_config), nodes)
    (row,) = metrics["rounds"]
    assert row["failed"] == 0 and row["contributors"] == 3 and row["applied"]
    for nc in nodes.values():
        (entry,) = _ledger(nc).rounds
        s = entry["settings"]
        assert s["privacy.enabled"] is True and s["secagg.enabled"] is True
        assert s["privacy.noise-multiplier"] == 1.0 and 2 * s["secagg.threshold"] > s["secagg.degree"] + 1
        assert s["policy.max-epsilon"] == 8.0 and s["policy.min-contributors"] == 3


def test_a_stricter_device_policy_refuses_what_the_defaults_accept(tiny_config, tmp_path):
    nodes = user_folders(tmp_path)
    (tmp_path / "bob-state").mkdir(exist_ok=True)
    (tmp_path / "bob-state" / "policy.toml").write_text("max-epsilon = 2.0\n")
    nodes[21]["policy.min-noise-multiplier"] = 1.5
    metrics = run(flat_config(tiny_config, **{"privacy.target-epsilon": 4.0}), nodes)
    assert metrics["rounds"][0]["failed"] == 2
    by_node = {nid: r[0] for nid, r in replies(nodes).items()}
    assert "privacy.noise-multiplier = 1.0: below policy.min-noise-multiplier = 1.5" in by_node[21]["error"]["reason"]
    assert "privacy.target-epsilon = 4.0: above this device's lifetime budget policy.max-epsilon = 2" in \
        by_node[22]["error"]["reason"]
    assert by_node[23]["reply"] == "content"


def test_a_release_without_noise_is_infinite_for_good(tiny_config, tmp_path):
    """A device whose owner allows a non-private round records it as epsilon = infinity; DP never comes back."""
    nodes = user_folders(tmp_path)
    for nc in nodes.values():
        nc["policy.allow-no-dp"] = True
    run(flat_config(tiny_config, **{"privacy.enabled": False}), nodes)
    for nc in nodes.values():
        ledger = _ledger(nc)
        assert ledger is not None, "the non-DP round is in the ledger"
        assert math.isinf(ledger.epsilon(1e-2))
        (entry,) = ledger.rounds
        assert entry["noise_multiplier"] == 0.0 and entry["settings"]["privacy.enabled"] is False
        assert any(sigma == 0.0 for sigma, _, _ in ledger.history)
    # The same devices, a later DP round of the same run: still infinite, nothing trained on a DP claim.
    metrics = run(flat_config(tiny_config, **{"server.num-rounds": 2}), nodes)
    last = metrics["rounds"][-1]
    assert last["round"] == 2 and last["contributors"] == 0 and not last["applied"]
    for nc in nodes.values():
        ledger = _ledger(nc)
        assert math.isinf(ledger.epsilon(1e-2)) and [r["round"] for r in ledger.rounds] == [1]
    # The audit shows it: no DP guarantee for these devices.
    audit = build_audit(run_dir=tmp_path / "results" / "adv", state_dir=tmp_path, delta=1e-2)
    assert sorted(audit["released_without_noise"]) == sorted(nc["state-dir"].rsplit("/", 1)[1] for nc in nodes.values())
    assert audit["status"]["guarantee"].startswith("NO DP GUARANTEE for 3 device(s)")
    assert any("released an update without DP noise" in f for f in audit["status"]["flags"])
    assert all(u["epsilon"] is None for u in audit["users"])
