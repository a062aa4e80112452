"""Privacy ledger: pinned epsilons, composition, persistence, calibration, bad input."""

import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedpersona.privacy.ledger import LedgerError, PrivacyLedger, calibrate_noise
from fedpersona.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_subsampled_gaussian

SIGMA, Q, STEPS, DELTA = 1.0, 0.01, 1000, 1e-5
# Opacus 1.6 RDPAccountant, default orders; privacy/rdp.py gives the same to 3e-12.
PINNED_RDP_EPSILON = 2.1013652716430564
PINNED_BEST_ORDER = 7.8


def ledger_with(steps, *, sigma=SIGMA, q=Q, accountant="rdp"):
    ledger = PrivacyLedger(accountant=accountant)
    ledger.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return ledger


# ------------------------------------------------------------------------ pinned figures
def test_epsilon_pinned_and_cross_checked():
    eps = ledger_with(STEPS).epsilon(DELTA)
    assert eps == pytest.approx(PINNED_RDP_EPSILON, rel=1e-6)
    rdp = rdp_subsampled_gaussian(q=Q, sigma=SIGMA, orders=DEFAULT_ORDERS, steps=STEPS)
    ours, order = epsilon_from_rdp(rdp=rdp, orders=DEFAULT_ORDERS, delta=DELTA)
    assert ours == pytest.approx(eps, rel=1e-6)
    assert order == PINNED_BEST_ORDER


def test_stepwise_equals_bulk_and_matches_opacus_step():
    one_by_one, acc = PrivacyLedger(), RDPAccountant()
    for _ in range(STEPS):
        one_by_one.step(noise_multiplier=SIGMA, sample_rate=Q)
        acc.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert one_by_one.history == [(SIGMA, Q, STEPS)]
    assert one_by_one.total_steps == STEPS
    assert one_by_one.epsilon(DELTA) == acc.get_epsilon(DELTA) == ledger_with(STEPS).epsilon(DELTA)


@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
def test_rdp_matches_opacus_per_order(q, sigma):
    ours = rdp_subsampled_gaussian(q=q, sigma=sigma, orders=DEFAULT_ORDERS)
    theirs = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(DEFAULT_ORDERS)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_rdp_fractional_quadrature_agrees_with_exact_integer_orders():
    # The fractional-order route (quadrature) evaluated at integer orders vs the exact binomial sum.
    from fedpersona.privacy import rdp as R

    for q, sigma, order in [(0.01, 1.0, 2), (0.01, 0.5, 10), (1e-5, 3.0, 5), (0.3, 0.4, 40)]:
        assert R._log_a_minus_1_quadrature(q, sigma, float(order)) == pytest.approx(
            R._log_a_minus_1_integer(q, sigma, order), rel=1e-10, abs=1e-12
        )


def test_rdp_special_cases():
    orders = [1.5, 2.0, 8.0]
    np.testing.assert_allclose(rdp_subsampled_gaussian(q=1.0, sigma=2.0, orders=orders), np.array(orders) / 8)
    assert np.all(np.isinf(rdp_subsampled_gaussian(q=0.1, sigma=0.0, orders=orders)))
    assert np.all(rdp_subsampled_gaussian(q=0.0, sigma=1.0, orders=orders) == 0)
    assert epsilon_from_rdp(rdp=[math.inf] * 3, orders=orders, delta=DELTA)[0] == math.inf
    with pytest.raises(ValueError, match="orders must be"):
        rdp_subsampled_gaussian(q=0.1, sigma=1.0, orders=[1.0])
    with pytest.raises(ValueError, match="delta must be in"):
        epsilon_from_rdp(rdp=[1.0], orders=[2.0], delta=0.0)


# ------------------------------------------------------------------- composition, restart
def test_two_rounds_compose_like_one():
    ledger = PrivacyLedger()
    for r in (1, 2):
        ledger.step(noise_multiplier=SIGMA, sample_rate=Q, num_steps=100)
        ledger.record_round(round=r, steps=100, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA)
    assert ledger.epsilon(DELTA) == ledger_with(200).epsilon(DELTA)
    assert [r["round"] for r in ledger.rounds] == [1, 2]
    assert ledger.rounds[0]["epsilon"] < ledger.rounds[1]["epsilon"] == ledger.epsilon(DELTA)
    assert ledger.rounds[0]["epsilon"] == ledger_with(100).epsilon(DELTA)


def test_heterogeneous_history_is_kept_and_composes():
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=50)
    ledger.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=30)
    ledger.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=20)
    assert ledger.history == [(1.0, 0.01, 50), (2.0, 0.02, 50)]
    rdp = rdp_subsampled_gaussian(q=0.01, sigma=1.0, steps=50) + rdp_subsampled_gaussian(q=0.02, sigma=2.0, steps=50)
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon_from_rdp(rdp=rdp, delta=DELTA)[0], rel=1e-6)


def test_restart_continues_exactly():
    before = PrivacyLedger()
    before.step(noise_multiplier=SIGMA, sample_rate=Q, num_steps=100)
    before.record_round(round=3, steps=100, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA)
    before.record_user_level(round=3, epsilon=0.5, delta=1e-6, mechanism="distributed-skellam")
    text = before.to_json()
    json.loads(text)  # strict JSON
    after = PrivacyLedger.from_json(text)
    assert after.state_dict() == before.state_dict()
    assert after.user_level_entries == before.user_level_entries
    after.step(noise_multiplier=SIGMA, sample_rate=Q, num_steps=100)
    assert after.epsilon(DELTA) == ledger_with(200).epsilon(DELTA)
    assert after.total_steps == 200


def test_epsilon_if_does_not_mutate():
    ledger = ledger_with(100)
    state = ledger.state_dict()
    assert ledger.epsilon_if(noise_multiplier=SIGMA, sample_rate=Q, num_steps=100, delta=DELTA) == ledger_with(200).epsilon(DELTA)
    assert ledger.state_dict() == state


def test_empty_and_noiseless():
    assert PrivacyLedger().epsilon(DELTA) == 0.0
    assert PrivacyLedger(accountant="prv").epsilon(DELTA) == 0.0
    ledger = ledger_with(10)
    ledger.step(noise_multiplier=0.0, sample_rate=Q)
    assert ledger.epsilon(DELTA) == math.inf
    ledger.record_round(round=1, steps=11, noise_multiplier=0.0, sample_rate=Q, delta=DELTA)
    restored = PrivacyLedger.from_json(ledger.to_json())  # inf stored as null, strict JSON
    assert restored.rounds[0]["epsilon"] == math.inf
    assert restored.epsilon(DELTA) == math.inf


def test_prv_close_to_rdp():
    rdp = ledger_with(STEPS).epsilon(DELTA)
    prv = ledger_with(STEPS, accountant="prv").epsilon(DELTA)
    assert 0 < prv <= rdp + 0.05
    assert prv > 0.8 * rdp


# ------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("target,delta,q,steps", [(2.0, 1e-5, 0.01, 1000), (8.0, 1e-3, 0.1, 60), (0.5, 1e-5, 0.005, 500)])
def test_calibrate_noise_hits_target(target, delta, q, steps):
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    eps = ledger_with(steps, sigma=sigma, q=q).epsilon(delta)
    assert target * 0.95 < eps <= target


def test_calibrate_noise_prv():
    sigma = calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=Q, steps=STEPS, accountant="prv")
    eps = ledger_with(STEPS, sigma=sigma, accountant="prv").epsilon(DELTA)
    assert 1.9 < eps <= 2.0
    assert sigma <= calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=Q, steps=STEPS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(accountant="gdp"), "factor of ~2"),
    ],
)
def test_calibrate_noise_bad_input(kwargs, match):
    args = dict(target_epsilon=2.0, delta=DELTA, sample_rate=Q, steps=100) | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_noise(**args)


# --------------------------------------------------------------------------- bad input
def test_bad_accountant():
    with pytest.raises(ValueError, match="factor of ~2"):
        PrivacyLedger(accountant="gdp")
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyLedger(accountant="moments")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=-0.1), "noise_multiplier=-0.1"),
        (dict(noise_multiplier=math.nan), "noise_multiplier"),
        (dict(sample_rate=0.0), "sample_rate=0.0"),
        (dict(sample_rate=1.01), "sample_rate=1.01"),
        (dict(num_steps=0), "num_steps=0"),
        (dict(num_steps=1.5), "num_steps=1.5"),
    ],
)
def test_step_bad_input(kwargs, match):
    ledger = PrivacyLedger()
    with pytest.raises(ValueError, match=match):
        ledger.step(**(dict(noise_multiplier=1.0, sample_rate=0.1) | kwargs))
    assert ledger.total_steps == 0


def test_epsilon_bad_delta():
    with pytest.raises(ValueError, match="delta must be in"):
        ledger_with(10).epsilon(0.0)


# ------------------------------------------------------------------- corrupted state dicts
def _good_state():
    ledger = ledger_with(100)
    ledger.record_round(round=1, steps=100, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA)
    ledger.record_user_level(round=1, epsilon=1.0, delta=1e-6, mechanism="dskellam")
    return ledger.state_dict()


def _mutate(path, value):
    def apply(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return state

    return apply


_DELETE = object()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_mutate(["version"], 2), "version 2"),
        (_mutate(["version"], True), "version"),
        (_mutate(["version"], _DELETE), "missing field.*version"),
        (_mutate(["history"], _DELETE), "missing field.*history"),
        (_mutate(["accountant"], "gdp"), "accountant"),
        (_mutate(["history"], {"a": 1}), "'history' must be a list"),
        (_mutate(["history", 0], [1.0, 0.01]), r"history\[0\]"),
        (_mutate(["history", 0, 0], -1.0), "noise_multiplier must be"),
        (_mutate(["history", 0, 0], "1.0"), "noise_multiplier must be"),
        (_mutate(["history", 0, 1], 0.0), "sample_rate must be"),
        (_mutate(["history", 0, 2], -5), "num_steps must be"),
        (_mutate(["history", 0, 2], 5.0), "num_steps must be"),
        (_mutate(["rounds", 0, "epsilon"], -1.0), "'epsilon' must be"),
        (_mutate(["rounds", 0, "round"], -1), "'round' must be"),
        (_mutate(["rounds", 0, "steps"], "100"), "'steps' must be"),
        (_mutate(["rounds", 0, "time"], "yesterday"), "'time' must be"),
        (_mutate(["rounds", 0, "sample_rate"], _DELETE), "wrong fields"),
        (_mutate(["user_level", 0, "mechanism"], ""), "'mechanism'"),
        (_mutate(["user_level", 0, "delta"], 2.0), "'delta'"),
        (_mutate(["surprise"], 1), "unknown field"),
    ],
)
def test_corrupted_state_dict(mutate, match):
    ledger = ledger_with(7)
    before = ledger.state_dict()
    with pytest.raises(LedgerError, match=match):
        ledger.load_state_dict(mutate(_good_state()))
    assert ledger.state_dict() == before  # a failed load changes nothing


def test_corrupted_json_and_accountant_mismatch():
    with pytest.raises(LedgerError, match="not valid JSON"):
        PrivacyLedger.from_json('{"version": 1,')
    with pytest.raises(LedgerError, match="JSON object"):
        PrivacyLedger.from_json("[]")
    with pytest.raises(LedgerError, match="accountant"):
        PrivacyLedger(accountant="prv").load_state_dict(_good_state())
    assert issubclass(LedgerError, ValueError)
    prv = PrivacyLedger.from_json(json.dumps(_good_state() | {"accountant": "prv"}))
    assert prv.accountant == "prv" and prv.total_steps == 100


# ------------------------------------------------------------- what it saves, it loads again
def test_a_tiny_negative_epsilon_is_clamped_at_zero():
    """Far below the budget Opacus's RDP conversion returns -0.0085; a ledger holds 0 (and loads it again)."""
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=8952.0, sample_rate=4 / 9, num_steps=2)
    assert ledger.epsilon(1e-2) == 0.0
    entry = ledger.record_round(round=1, steps=2, noise_multiplier=8952.0, sample_rate=4 / 9, delta=1e-2)
    assert entry["epsilon"] == 0.0
    assert PrivacyLedger.from_json(ledger.to_json()).state_dict() == ledger.state_dict()


def test_record_round_refuses_what_the_load_rule_refuses():
    class Broken(PrivacyLedger):
        def epsilon(self, delta):
            return -0.5  # an accountant gone wrong: recorded as is, the device could never load its ledger again

    ledger = Broken()
    ledger.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="could not load again.*'epsilon' must be a number >= 0"):
        ledger.record_round(round=1, steps=1, noise_multiplier=1.0, sample_rate=0.1, delta=DELTA)
    assert ledger.rounds == []
    PrivacyLedger.from_json(ledger.to_json())  # what was saved still loads


_SETTINGS = [None, {}, {"privacy.enabled": True, "client.local-steps": 6, "privacy.delta": 1e-3,
                        "privacy.accountant": "rdp", "note": "é ✓ \u2028", "big": 2**62, "tiny": 5e-324}]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_every_record_it_can_make_round_trips(accountant):
    """Every (sigma, q, steps, delta) corner the ledger accepts, recorded, saved and loaded again, unchanged."""
    sigmas = [0.0, 1e-3, 0.5, 1.0, 8952.0, 1e6] if accountant == "rdp" else [0.0, 0.9, 50.0]
    rates = [1e-6, 4 / 9, 1.0] if accountant == "rdp" else [0.01, 1.0]
    steps = [2, 1000] if accountant == "rdp" else [1, 20]
    deltas = [1e-12, 0.5] if accountant == "rdp" else [1e-5]
    made = 0
    for sigma in sigmas:
        for q in rates:
            for n in steps:
                for delta in deltas:
                    for settings in [_SETTINGS[made % len(_SETTINGS)]]:
                        ledger = PrivacyLedger(accountant=accountant)
                        ledger.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
                        entry = ledger.record_round(round=made, steps=n, noise_multiplier=sigma, sample_rate=q,
                                                    delta=delta, settings=settings)
                        assert entry["epsilon"] >= 0
                        ledger.record_user_level(round=made, epsilon=math.inf if sigma == 0 else 0.0, delta=delta,
                                                 mechanism="distributed-discrete-gaussian")
                        back = PrivacyLedger.from_json(ledger.to_json())
                        assert back.state_dict() == ledger.state_dict(), (sigma, q, n, delta, settings)
                        assert back.rounds == ledger.rounds
                        made += 1
    assert made == len(sigmas) * len(rates) * len(steps) * len(deltas)


def test_calibration_does_not_depend_on_what_was_solved_before():
    """A warm-started search stops anywhere within the tolerance; the answer is snapped to one grid point, so a
    plan made in another process and a device built after others get the very same sigma."""
    from fedpersona.privacy import ledger as ledger_module

    def fresh(q: float) -> float:
        return ledger_module.calibrate_noise(target_epsilon=8.0, delta=1e-3, sample_rate=q, steps=12)

    ledger_module._SOLVED.clear()
    ledger_module._calibrated.cache_clear()
    alone = fresh(0.2)
    ledger_module._SOLVED.clear()
    ledger_module._calibrated.cache_clear()
    for q in (0.05, 0.31, 0.11):  # other sample rates first: the search for 0.2 starts warm from 0.11's answer
        fresh(q)
    assert fresh(0.2) == alone
    eps = PrivacyLedger().epsilon_if(noise_multiplier=alone, sample_rate=0.2, num_steps=12, delta=1e-3)
    below = PrivacyLedger().epsilon_if(noise_multiplier=alone * math.exp(-1e-4), sample_rate=0.2, num_steps=12,
                                       delta=1e-3)
    assert eps <= 8.0 < below  # the smallest grid point within the budget
