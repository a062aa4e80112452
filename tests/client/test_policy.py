"""The device policy: defaults, sources (node config, policy.toml, the stricter wins), bad values, checks."""

import math
import warnings

import pytest

from fedpersona.client.policy import POLICY_FILE, DevicePolicy, PolicyViolation
from fedpersona.config import load_config


def _cfg(**kw):
    flat = {"privacy.noise-multiplier": 1.0, "server.clients-per-round": 8, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_config warns about privacy/secagg off; the policy is what is tested
        return load_config(flat, env=False)


def test_defaults_are_safe():
    p = DevicePolicy()
    assert (p.allow_no_dp, p.max_epsilon, p.max_delta, p.min_noise_multiplier) == (False, 8.0, 0.0, 0.0)
    assert (p.allow_no_secagg, p.min_threshold_fraction, p.min_contributors) == (False, 0.5, 3)
    assert DevicePolicy.load({}, state_dir=None) == p


def test_default_settings_are_accepted_and_returned():
    settings = DevicePolicy().check(_cfg(), train_examples=36)
    assert settings["privacy.enabled"] is True and settings["secagg.enabled"] is True
    assert settings["privacy.noise-multiplier"] == 1.0 and settings["privacy.sample-rate"] == pytest.approx(8 / 36)
    k, t = settings["secagg.degree"], settings["secagg.threshold"]
    assert 2 * t > k + 1, "a strict majority of the k + 1 share holders"
    assert settings["policy.max-epsilon"] == 8.0 and settings["policy.min-contributors"] == 3
    assert all(isinstance(v, (str, bool, int, float)) for v in settings.values())


def test_calibrated_noise_is_checked_too():
    cfg = load_config({"server.clients-per-round": 8}, env=False)  # noise-multiplier 0: calibrated
    settings = DevicePolicy().check(cfg, train_examples=36)
    assert 0 < settings["privacy.noise-multiplier"] < 10
    with pytest.raises(PolicyViolation, match="policy.min-noise-multiplier = 50"):
        DevicePolicy(min_noise_multiplier=50.0).check(cfg, train_examples=36)


@pytest.mark.parametrize("flat, setting", [
    ({"privacy.enabled": False}, "privacy.enabled"),
    ({"privacy.target-epsilon": 1000.0}, "privacy.target-epsilon"),
    ({"privacy.noise-multiplier": 0.01}, "privacy.noise-multiplier"),
    ({"secagg.enabled": False}, "secagg.enabled"),
    ({"secagg.threshold": 1}, "secagg.threshold"),
    ({"privacy.delta": 0.05}, "privacy.delta"),
])
def test_each_weakened_setting_is_refused_by_name(flat, setting):
    with pytest.raises(PolicyViolation) as info:
        DevicePolicy().check(_cfg(**flat), train_examples=36)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"the device's privacy policy refuses {setting} = ")
    assert "36" not in str(info.value), "the device's example count is not revealed"


def test_allow_keys_accept_and_floors_refuse():
    assert DevicePolicy(allow_no_dp=True).check(_cfg(**{"privacy.enabled": False}), train_examples=36)[
        "privacy.enabled"] is False
    assert DevicePolicy(allow_no_secagg=True).check(_cfg(**{"secagg.enabled": False}), train_examples=36)[
        "secagg.enabled"] is False
    with pytest.raises(PolicyViolation, match="policy.max-epsilon = 4"):
        DevicePolicy(max_epsilon=4.0).check(_cfg(), train_examples=36)
    with pytest.raises(PolicyViolation, match="policy.max-delta = 0.0001"):
        DevicePolicy(max_delta=1e-4).check(_cfg(), train_examples=36)
    with pytest.raises(PolicyViolation, match="secagg.threshold"):
        DevicePolicy(min_threshold_fraction=0.9).check(_cfg(), train_examples=36)


@pytest.mark.parametrize("key, value, match", [
    ("policy.max-epsilon", "x", "must be a number"),
    ("policy.max-epsilon", 0, "finite number > 0"),
    ("policy.max-epsilon", math.inf, "finite"),
    ("policy.max-delta", 1.5, r"\[0, 1\)"),
    ("policy.min-noise-multiplier", -1, ">= 0"),
    ("policy.allow-no-dp", "yes", "true or false"),
    ("policy.min-threshold-fraction", 0.3, "strict majority"),
    ("policy.min-contributors", 1, ">= 2"),
    ("policy.min-contributors", 2.5, "integer"),
])
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match) as info:
        DevicePolicy.load({key: value})
    assert repr(key) in str(info.value) and "You passed" in str(info.value)


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="Unknown device policy key 'policy.max-epsilo'"):
        DevicePolicy.load({"policy.max-epsilo": 4})
    assert DevicePolicy.load({"data-dir": "/x", "partition-id": 3}) == DevicePolicy()


def test_node_config_and_policy_file_the_stricter_wins(tmp_path):
    (tmp_path / POLICY_FILE).write_text("max-epsilon = 2.0\nallow-no-dp = true\n[policy]\nmin-contributors = 5\n")
    p = DevicePolicy.load({"policy.max-epsilon": 4, "policy.allow-no-dp": "false", "policy.min-contributors": 4,
                           "policy.max-delta": 1e-5}, state_dir=tmp_path)
    assert (p.max_epsilon, p.allow_no_dp, p.min_contributors, p.max_delta) == (2.0, False, 5, 1e-5)
    assert "node config" in p.source and POLICY_FILE in p.source
    only_file = DevicePolicy.load({}, state_dir=tmp_path)
    assert only_file.allow_no_dp is True and only_file.max_epsilon == 2.0


def test_policy_file_errors_name_the_file(tmp_path):
    (tmp_path / POLICY_FILE).write_text("max-epsilon = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        DevicePolicy.load({}, state_dir=tmp_path)
    (tmp_path / POLICY_FILE).write_text("max-epsilon = -3\n")
    with pytest.raises(ValueError, match="'policy.max-epsilon'"):
        DevicePolicy.load({}, state_dir=tmp_path)


def test_the_ledger_keeps_the_accepted_settings_and_reads_old_ledgers():
    import json

    from fedpersona.privacy.ledger import LedgerError, PrivacyLedger

    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=1.0, sample_rate=0.25, num_steps=2)
    ledger.record_round(round=1, steps=2, noise_multiplier=1.0, sample_rate=0.25, delta=1e-3)
    old = json.loads(ledger.to_json())
    assert "settings" not in old["rounds"][0]
    assert PrivacyLedger.from_json(json.dumps(old)).rounds[0]["round"] == 1, "ledgers without settings still load"
    settings = DevicePolicy().check(_cfg(), train_examples=36)
    ledger.step(noise_multiplier=1.0, sample_rate=0.25, num_steps=2)
    ledger.record_round(round=2, steps=2, noise_multiplier=1.0, sample_rate=0.25, delta=1e-3, settings=settings)
    back = PrivacyLedger.from_json(ledger.to_json())
    assert back.rounds[1]["settings"] == settings
    with pytest.raises(ValueError, match="finite float"):
        ledger.record_round(round=3, steps=2, noise_multiplier=1.0, sample_rate=0.25, delta=1e-3,
                            settings={"x": math.inf})
    bad = json.loads(ledger.to_json())
    bad["rounds"][1]["settings"] = {"x": [1, 2]}
    with pytest.raises(LedgerError, match="settings"):
        PrivacyLedger.from_json(json.dumps(bad))


def test_a_noiseless_release_makes_the_ledger_infinite_for_good():
    from fedpersona.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=0.0, sample_rate=0.25, num_steps=2)
    ledger.record_round(round=1, steps=2, noise_multiplier=0.0, sample_rate=0.25, delta=1e-3,
                        settings={"privacy.enabled": False})
    ledger.step(noise_multiplier=5.0, sample_rate=0.25, num_steps=2)
    assert math.isinf(ledger.epsilon(1e-3))
    back = PrivacyLedger.from_json(ledger.to_json())
    assert math.isinf(back.epsilon(1e-3)) and math.isinf(back.rounds[0]["epsilon"])


# ------------------------------------------------------------------------------- cost caps
@pytest.mark.parametrize("flat, setting, cap", [
    ({"client.local-steps": 101}, "client.local-steps", "policy.max-local-steps = 100"),
    ({"client.head-steps": 10_000}, "client.head-steps", "policy.max-head-steps = 100"),
    ({"client.batch-size": 129}, "client.batch-size", "policy.max-batch-size = 128"),
    ({"client.head-batch-size": 4096}, "client.head-batch-size", "policy.max-batch-size = 128"),
    ({"model.seq-len": 513, "model.cue-tokens": 24}, "model.seq-len", "policy.max-seq-len = 512"),
])
def test_each_cost_above_a_cap_is_refused_by_name(flat, setting, cap):
    for check in (lambda p, c: p.check_cost(c), lambda p, c: p.check(c, train_examples=36)):
        with pytest.raises(PolicyViolation) as info:
            check(DevicePolicy(), _cfg(**flat))
        assert info.value.setting == setting and cap in str(info.value), str(info.value)
        assert str(info.value).startswith(f"the device's privacy policy refuses {setting} = {flat[setting]!r}")


def test_cost_caps_are_the_devices_own_and_the_stricter_wins(tmp_path):
    (tmp_path / POLICY_FILE).write_text("max-head-steps = 10\nmax-round-seconds = 60\n")
    p = DevicePolicy.load({"policy.max-head-steps": "50", "policy.max-round-seconds": 120,
                           "policy.max-local-steps": 3}, state_dir=tmp_path)
    assert (p.max_head_steps, p.max_round_seconds, p.max_local_steps) == (10, 60.0, 3)
    assert p.check_cost(_cfg(**{"client.local-steps": 3, "client.head-steps": 10}))["client.head-steps"] == 10
    with pytest.raises(PolicyViolation, match="client.local-steps = 4.*policy.max-local-steps = 3"):
        p.check_cost(_cfg(**{"client.local-steps": 4}))
    settings = p.check(_cfg(**{"client.local-steps": 3, "client.head-steps": 6}), train_examples=36)
    assert settings["policy.max-round-seconds"] == 60.0 and settings["client.head-steps"] == 6, \
        "the caps the round ran under are kept in the ledger with it"


@pytest.mark.parametrize("key, value, match", [
    ("policy.max-local-steps", 0, "integer >= 1"),
    ("policy.max-head-steps", 2.5, "integer"),
    ("policy.max-batch-size", -8, "integer >= 1"),
    ("policy.max-seq-len", "long", "integer"),
    ("policy.max-round-seconds", 0, "seconds > 0"),
    ("policy.max-round-seconds", math.inf, "finite"),
])
def test_bad_cost_caps_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match) as info:
        DevicePolicy.load({key: value})
    assert repr(key) in str(info.value) and "You passed" in str(info.value)


def test_the_shipped_scenarios_and_defaults_pass_the_default_caps():
    from fedpersona.config import read_scenario
    from fedpersona.simulations.runner import CONF_DIR

    scenarios = sorted(CONF_DIR.glob("*.toml"))
    assert len(scenarios) >= 3
    for path in scenarios:
        cfg = _cfg(**{k: v for k, v in read_scenario(path).items() if not k.startswith(("data.", "run."))})
        DevicePolicy().check_cost(cfg)
    DevicePolicy().check_cost(load_config({}, env=False))
    import tomllib
    from pathlib import Path

    app = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    DevicePolicy().check_cost(_cfg(**{k: v for k, v in app["config"].items() if k.startswith(("client.", "model."))}))
