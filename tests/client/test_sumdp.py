"""The device's side of noise on the sum: its policy checks, its step order, its participation cap."""

import dataclasses
import warnings

import pytest
import torch

from fedpersona.client.policy import DevicePolicy, PolicyViolation, _malicious_secure_ok
from fedpersona.client.store import DeviceStore
from fedpersona.client.sumdp import StepLog, StepRefused, check_context
from fedpersona.config import expected_participations, load_config
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.sumdp import sum_context

W = {"w": torch.zeros(500)}


def _cfg(**kw):
    flat = {"privacy.noise-on": "sum", "server.clients-per-round": 8, "privacy.noise-multiplier": 1.0,
            "eval.local-baseline": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(flat, env=False)


def test_noise_on_the_sum_needs_secure_aggregation_safe_against_the_server():
    cfg = _cfg()
    assert _malicious_secure_ok(cfg, bound_keys=True) == (True, "")
    # The config refuses it up front; a device handed such a config object anyway refuses by name.
    with pytest.raises(ValueError, match="secagg.enabled"):
        _cfg(**{"secagg.enabled": False})
    plain = dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, enabled=False))
    ok, why = _malicious_secure_ok(plain, bound_keys=True)
    assert not ok and "secagg.enabled" in why
    ctx = sum_context(plain, round=1, step=1, cohort=8, weights=W)
    with pytest.raises(PolicyViolation, match="privacy.noise-on"):
        DevicePolicy().check_sum(plain, ctx, train_examples=36, bound_keys=True)
    # Keys the server could forge (no certified identity): refused even with secure aggregation on, and even
    # where the device's policy accepts unbound keys for plain rounds.
    ok, why = _malicious_secure_ok(cfg, bound_keys=False)
    assert not ok and "trust root" in why
    with pytest.raises(PolicyViolation, match="privacy.noise-on"):
        DevicePolicy(allow_unbound_keys=True).check_sum(cfg, sum_context(cfg, round=1, step=1, cohort=8, weights=W),
                                                        train_examples=36, bound_keys=False)


def test_the_step_parameters_are_bound_into_the_secure_sum():
    """Two devices shown different parameters for the same step compute different round contexts: the
    round digest (keys, ciphertexts, consistency signatures) differs, so a split view cannot form one sum."""
    cfg = _cfg()
    a = sum_context(cfg, round=1, step=1, cohort=8, weights=W)
    assert a.digest() == sum_context(cfg, round=1, step=1, cohort=8, weights=W).digest()
    assert a.digest() != dataclasses.replace(a, noise_multiplier=a.noise_multiplier / 2).digest()
    assert a.digest() != dataclasses.replace(a, honest=a.honest + 1).digest()
    assert a.digest() != sum_context(cfg, round=1, step=2, cohort=8, weights=W).digest()


def test_t_between_the_floor_and_the_devices_share_of_the_cohort():
    ctx = sum_context(_cfg(), round=1, step=1, cohort=8, weights=W)  # t = 4 of 8
    assert DevicePolicy().check_sum(_cfg(), ctx, train_examples=36, bound_keys=True)["privacy.honest-contributors"] == 4
    with pytest.raises(PolicyViolation, match="policy.min-contributors = 5"):
        DevicePolicy(min_contributors=5).check_sum(_cfg(), ctx, train_examples=36, bound_keys=True)
    with pytest.raises(PolicyViolation, match="policy.max-honest-fraction = 0.25"):
        DevicePolicy(max_honest_fraction=0.25).check_sum(_cfg(), ctx, train_examples=36, bound_keys=True)
    high = _cfg(**{"privacy.honest-contributors": 6})
    with pytest.raises(PolicyViolation, match="privacy.honest-contributors = 6"):
        DevicePolicy().check_sum(high, sum_context(high, round=1, step=1, cohort=8, weights=W), train_examples=36, bound_keys=True)


def test_sigma_must_be_enough_for_the_devices_own_budget_at_its_own_q():
    cfg = _cfg(**{"privacy.noise-multiplier": 0.0, "client.max-participations": 2})  # calibrated for 30 examples
    ctx = sum_context(cfg, round=1, step=1, cohort=8, weights=W)
    settings = DevicePolicy().check_sum(cfg, ctx, train_examples=30, bound_keys=True)
    assert settings["sum.planned-epsilon"] <= 8.0
    assert DevicePolicy().check_sum(cfg, ctx, train_examples=48, bound_keys=True)["sum.planned-epsilon"] < settings["sum.planned-epsilon"]
    with pytest.raises(PolicyViolation, match="would spend epsilon"):  # a larger q than the config planned for
        DevicePolicy().check_sum(cfg, ctx, train_examples=12, bound_keys=True)
    with pytest.raises(PolicyViolation, match="would spend epsilon"):  # a lower budget of its own
        DevicePolicy(max_epsilon=4.0).check_sum(cfg, ctx, train_examples=30, bound_keys=True)
    # A lower cap of its own: the same sigma spends less over the participations it accepts.
    assert DevicePolicy(max_participations=1).check_sum(cfg, ctx, train_examples=30, bound_keys=True)["sum.planned-epsilon"] < 8.0


def test_the_server_cannot_claim_other_parameters():
    cfg = _cfg()
    mine = sum_context(cfg, round=2, step=1, cohort=8, weights=W)
    assert check_context(cfg, mine, server_round=2, step=1, cohort=8, shared=W) == mine
    for field, value, key in [("noise_multiplier", 0.5, "privacy.noise-multiplier"),
                              ("honest", 8, "privacy.honest-contributors"), ("clip", 10.0, "privacy.max-grad-norm"),
                              ("scale", 2.0, "secagg.scale"), ("step", 2, "step")]:
        forged = dataclasses.replace(mine, **{field: value})
        with pytest.raises(PolicyViolation, match=key):
            check_context(cfg, forged, server_round=2, step=1, cohort=8, shared=W)
    with pytest.raises(PolicyViolation, match="shared weights"):  # a context for other weights than it received
        check_context(cfg, mine, server_round=2, step=1, cohort=8, shared={"w": torch.ones(500)})


def test_the_step_log_refuses_repeated_rolled_back_and_out_of_range_steps(tmp_path):
    log = StepLog(DeviceStore(tmp_path))
    assert log.check(5, 1, 1, steps=3, rounds=4) is True
    log.record(5, 1, 1)
    for rnd, step in [(1, 1), (1, 0), (1, 4), (0, 1), (5, 1)]:
        with pytest.raises(StepRefused):
            log.check(5, rnd, step, steps=3, rounds=4)
    assert log.check(5, 1, 3, steps=3, rounds=4) is False  # a later step of the same round (a skipped one is fine)
    log.record(5, 1, 3)
    again = StepLog(DeviceStore(tmp_path))  # a restart forgets nothing
    with pytest.raises(StepRefused, match="does not come after"):
        again.check(5, 1, 2, steps=3, rounds=4)
    assert again.check(5, 2, 1, steps=3, rounds=4) is True
    assert again.check(6, 1, 1, steps=3, rounds=4) is True  # another run id: its own order


def test_participations_planned_are_the_stricter_of_server_and_device():
    cfg = _cfg(**{"client.max-participations": 2, "server.num-rounds": 5})
    assert cfg.planned_participations == 2
    assert DevicePolicy().participations(cfg) == 2
    assert DevicePolicy(max_participations=1).participations(cfg) == 1
    assert DevicePolicy(max_participations=4).participations(cfg) == 2
    assert DevicePolicy().participations(_cfg(**{"server.num-rounds": 5})) == 5  # 0: every planned round
    merged = DevicePolicy.load({"policy.max-participations": 3}, state_dir=None)
    assert merged.max_participations == 3
    with pytest.raises(ValueError, match="policy.max-participations"):
        DevicePolicy(max_participations=-1)
    with pytest.raises(ValueError, match="policy.max-honest-fraction"):
        DevicePolicy(max_honest_fraction=1.5)


def test_expected_participations():
    assert expected_participations(rounds=3, cohort=8, users=20, sampling="balanced") == 2
    assert expected_participations(rounds=50, cohort=64, users=630, sampling="balanced") == 6
    assert expected_participations(rounds=3, cohort=8, users=8, sampling="uniform") == 3
    m = expected_participations(rounds=10, cohort=8, users=20, sampling="uniform")
    assert 4 <= m <= 7  # beyond the expectation of 4: a device exceeds it with probability <= 10%
    with pytest.raises(ValueError):
        expected_participations(rounds=0, cohort=8, users=20, sampling="balanced")


@pytest.mark.parametrize("over, key", [({"secagg.ddp": True}, "privacy.noise-on"),
                                       ({"privacy.accountant": "prv"}, "privacy.accountant"),
                                       ({"adapter.split": "fedsa", "privacy.personal-head": "dp"}, "privacy.noise-on"),
                                       ({"privacy.honest-contributors": 9}, "privacy.honest-contributors"),
                                       ({"privacy.honest-contributors": 1}, "privacy.honest-contributors")])
def test_config_refuses_what_the_sum_cannot_carry(over, key):
    with pytest.raises(ValueError, match=key):
        _cfg(**over)
    with pytest.raises(ValueError, match="privacy.noise-on"):
        load_config({"privacy.noise-on": "everywhere"}, env=False)
    with pytest.raises(ValueError, match="client.max-participations"):
        load_config({"client.max-participations": -1}, env=False)


def test_the_local_only_baseline_counts_against_the_same_budget():
    """eval.local-baseline replays every step on the same records: the device plans (and checks) both passes."""
    alone = _cfg(**{"privacy.noise-multiplier": 3.0})
    both = _cfg(**{"privacy.noise-multiplier": 3.0, "eval.local-baseline": True})
    ctx = sum_context(alone, round=1, step=1, cohort=8, weights=W)
    one = DevicePolicy().check_sum(alone, ctx, train_examples=36, bound_keys=True)["sum.planned-epsilon"]
    two = DevicePolicy().check_sum(both, sum_context(both, round=1, step=1, cohort=8, weights=W), train_examples=36,
                                   bound_keys=True)["sum.planned-epsilon"]
    steps = DevicePolicy().participations(alone) * alone.client.local_steps
    assert two > one
    assert two == pytest.approx(PrivacyLedger().epsilon_if(noise_multiplier=3.0, sample_rate=min(1.0, alone.client.batch_size / 36),
                                                           num_steps=2 * steps, delta=alone.privacy.delta, on_sum=True))
