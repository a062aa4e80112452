"""Noise calibration and the RDP epsilon: exactly Opacus's numbers, solved once per sample rate, fast."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedpersona.privacy import ledger
from fedpersona.privacy.ledger import PrivacyLedger, calibrate_noise


def _opacus_epsilon(history, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("history", [
    [(1.1, 0.01, 300)],
    [(0.93, 0.25, 9), (0.75, 0.4, 3)],  # a dataset that grew: two sample rates, two noise levels
    [(2.0, 1.0, 5), (0.6, 0.0625, 120), (0.6, 0.0625, 1)],
])
def test_rdp_epsilon_is_opacus_to_the_last_bit(history):
    for delta in (1e-5, 1e-2):
        led = PrivacyLedger()
        for sigma, q, n in history:
            led.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        merged = [tuple(e) for e in led.history]
        assert led.epsilon(delta) == _opacus_epsilon(merged, delta)


def test_calibration_hits_the_target_over_many_sample_rates():
    """A simulation's devices: one budget, many training-set sizes; each solve warm-starts from the nearest."""
    target, delta, steps = 8.0, 1e-3, 60
    for n in (7, 12, 9, 40, 25, 300, 13):
        q = min(1.0, 8 / n)
        sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
        eps = _opacus_epsilon([(sigma, q, steps)], delta)
        assert target - 0.01 < eps <= target, (n, sigma, eps)


def test_each_sample_rate_is_solved_once(monkeypatch):
    calls = []
    solve = ledger._calibrate_rdp
    monkeypatch.setattr(ledger, "_calibrate_rdp", lambda *a: calls.append(a) or solve(*a))
    args = dict(target_epsilon=3.7, delta=1e-4, steps=17)
    first = [calibrate_noise(sample_rate=q, **args) for q in (0.2, 0.3, 0.2, 0.3, 0.2)]
    assert len(calls) == 2
    assert first[0] == first[2] == first[4] and first[1] == first[3]


def test_a_misleading_search_still_returns_a_sigma_within_the_budget(monkeypatch):
    """The windowed search is only a guide: when it believes in 0.3 less epsilon than there is (at the same
    optimal order), its answer is over budget, the exact check sees it, and the exact bisection decides."""
    real, exact = ledger._window_rdp, ledger._epsilon_of
    checked = []
    monkeypatch.setattr(ledger, "_window_rdp", lambda *a: real(*a) - 0.3)
    monkeypatch.setattr(ledger, "_epsilon_of", lambda h, *a: checked.append(h[0][0]) or exact(h, *a))
    target, delta, q, steps = 2.3, 1e-5, 0.07, 41
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    eps = _opacus_epsilon([(sigma, q, steps)], delta)
    assert target - 0.01 < eps <= target
    assert exact([[checked[0], q, steps]], delta, "rdp") > target, "the misled search's answer was over budget"
    assert len(set(checked)) > 1  # ... so the exact bisection decided


def test_bracket_search_converges_in_a_few_steps():
    """Regula falsi (Illinois) on a smooth decreasing function: far fewer evaluations than halving."""
    seen = []

    def f(x: float) -> float:
        seen.append(x)
        return 10.0 / x

    high, eps, low = ledger._bracket_search(f, 0.5, 8.0, f(8.0), 3.0, 1e-3)
    assert 3.0 - 1e-3 <= eps <= 3.0 and low <= high
    assert high == pytest.approx(10 / 3, rel=1e-3)
    assert len(seen) < 12
    assert np.isfinite(eps)


@pytest.mark.parametrize("target,delta,q,steps", [(8.0, 1e-3, 8 / 40, 60), (1.0, 1e-5, 0.5, 4), (4.0, 1e-2, 0.02, 400)])
def test_a_calibration_checks_at_most_three_sigmas_with_opacus(monkeypatch, target, delta, q, steps):
    """Opacus's epsilon at every order is the expensive part: the guide brings the search next to the answer on the
    grid, so the exact search checks the answer and a grid step or two below it (six to ten checks before)."""
    exact, checked = ledger._epsilon_of, []
    monkeypatch.setattr(ledger, "_epsilon_of", lambda h, *a: checked.append(h[0][0]) or exact(h, *a))
    monkeypatch.setattr(ledger, "_SOLVED", {})
    ledger._calibrated.cache_clear()
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    assert len(set(checked)) <= 3, sorted(set(checked))
    below = ledger.math.exp((ledger._grid_index(sigma) - 1) * ledger._GRID)
    assert _opacus_epsilon([(sigma, q, steps)], delta) <= target < _opacus_epsilon([(below, q, steps)], delta)


def test_rdp_epsilon_over_the_orders_that_can_decide_is_opacus_to_the_last_bit():
    """The epsilon computes only the orders whose lower bound (RDP is nondecreasing in the order) can beat the
    best found: on random histories (one to three sample rates and noise levels, 1 to 3,000 steps, delta 1e-7
    to 1e-1) it equals Opacus's accountant over all 151 orders exactly, from far fewer orders."""
    rng = np.random.default_rng(7)
    computed = []
    for _ in range(40):
        history = tuple((float(round(10 ** rng.uniform(-0.7, 1.5), 4)), float(round(min(1.0, 10 ** rng.uniform(-3, 0)), 5)),
                         int(rng.integers(1, 3000))) for _ in range(int(rng.integers(1, 4))))
        delta = float(10 ** rng.uniform(-7, -1))
        ledger._step_rdp.cache_clear()
        ours = ledger._rdp_epsilon(history, delta)
        computed.append(max(int(ledger._step_rdp(s, q).known.sum()) for s, q, _ in history))
        theirs = _opacus_epsilon(history, delta)
        assert ours == theirs or (np.isinf(ours) and np.isinf(theirs)), (history, delta, ours, theirs)
    assert np.median(computed) <= 60, computed  # of 151


def test_a_calibration_computes_few_orders_of_its_answer():
    ledger._step_rdp.cache_clear()
    ledger._calibrated.cache_clear()
    ledger._SOLVED.clear()
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-3, sample_rate=0.25, steps=12)
    assert ledger._step_rdp(sigma, 0.25).known.sum() <= 40
    assert _opacus_epsilon([(sigma, 0.25, 12)], 1e-3) <= 8.0
