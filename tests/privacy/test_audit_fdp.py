"""The f-DP one-run audit (privacy/audit/fdp.py), checked against independent computations.

* validity: in a simulated game whose canary scores are exactly mu-GDP, the test rejects the true mu at
  most at its level, and it has power against a smaller mu;
* on the pure epsilon-DP curve it gives Steinke, Nasr and Jagielski's bound (privacy/audit/onerun.py, whose
  p-value is pinned against their reference in test_audit_math.py) to 2%;
* the Gaussian-DP delta(epsilon) agrees with numerical integration of the two Gaussians, and the inverse
  blow-ups with the trade-off curves they come from.
"""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fedpersona.privacy.audit import fdp, onerun


def _game(rng, mu: float, m: int, k: int) -> tuple[int, int]:
    """One run of the idealised game: canary i's score is N(mu, 1) if planted else N(0, 1) (exactly mu-GDP)."""
    planted = rng.random(m) < 0.5
    scores = mu * planted + rng.normal(size=m)
    g = onerun.guesses(scores, k, k)
    return int((g != 0).sum()), int(((g == 1) & planted).sum() + ((g == -1) & ~planted).sum())


def test_the_true_curve_is_rejected_at_most_at_the_level_and_a_smaller_one_is():
    rng = np.random.default_rng(7)
    mu, m, k, beta, runs = 2.0, 400, 50, 0.05, 300
    games = [_game(rng, mu, m, k) for _ in range(runs)]
    true_rate = np.mean([fdp.rejects(fdp.gdp_inverse_blowup(mu), m=m, correct=v, guesses=r, beta=beta)
                         for r, v in games])
    assert true_rate <= beta + 3 * math.sqrt(beta * (1 - beta) / runs)
    weaker = np.mean([fdp.rejects(fdp.gdp_inverse_blowup(0.5), m=m, correct=v, guesses=r, beta=beta) for r, v in games])
    assert weaker > 0.9
    # The reported bound: below the truth in (almost) every run, and not vacuous.
    bounds = [fdp.gdp_lower_bound(m=m, correct=v, guesses=r, beta=beta) for r, v in games[:40]]
    assert sum(b > mu for b in bounds) <= 2 and np.median(bounds) > 0.8


def test_on_the_pure_dp_curve_it_gives_steinke_et_al_bound():
    def fdp_pure(m, r, v, beta=0.05):
        lo, hi = 0.0, 30.0
        if not fdp.eps_delta_rejects(epsilon=0.0, delta=0.0, m=m, correct=v, guesses=r, beta=beta):
            return 0.0
        while hi - lo > 1e-4:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fdp.eps_delta_rejects(epsilon=mid, delta=0.0, m=m, correct=v, guesses=r,
                                                       beta=beta) else (lo, mid)
        return lo

    for m, r, v in [(128, 64, 64), (128, 64, 60), (256, 64, 56), (1000, 500, 480), (100, 20, 20)]:
        steinke = onerun.epsilon_lower_bound(m=m, r=r, v=v, delta=0.0, beta=0.05)
        assert fdp_pure(m, r, v) == pytest.approx(steinke, rel=0.02), (m, r, v)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_gdp_delta_is_the_hockey_stick_divergence_of_two_gaussians(mu):
    for eps in (0.0, 1.0, 3.0):
        # delta(eps) = integral of max(0, p(x) - e^eps q(x)), p = N(mu, 1), q = N(0, 1)
        num, _ = integrate.quad(lambda x: max(0.0, stats.norm.pdf(x, mu) - math.exp(eps) * stats.norm.pdf(x)),
                                -12, 12 + mu, points=[eps / mu + mu / 2], limit=200)
        assert fdp.gdp_delta(mu, eps) == pytest.approx(num, rel=1e-6, abs=1e-12)
    assert fdp.gdp_delta(mu, 0.0) == pytest.approx(2 * stats.norm.cdf(mu / 2) - 1)
    eps = fdp.gdp_epsilon(mu, 1e-5)
    assert fdp.gdp_delta(mu, eps) <= 1e-5 < fdp.gdp_delta(mu, eps * 0.999)
    assert fdp.gdp_mu(eps, 1e-5) == pytest.approx(mu, rel=1e-4)


def test_inverse_blowups_invert_the_tradeoff_curves():
    mu, eps, delta = 1.3, 1.5, 1e-3
    g = fdp.gdp_inverse_blowup(mu)
    e = fdp.eps_delta_inverse_blowup(eps, delta)
    for a in (0.001, 0.05, 0.3, 0.7):
        blown = 1 - stats.norm.cdf(stats.norm.ppf(1 - a) - mu)  # 1 - G_mu(a)
        assert g(blown) == pytest.approx(a, rel=1e-9)
        f = max(0.0, 1 - delta - math.exp(eps) * a, math.exp(-eps) * (1 - delta - a))
        assert e(1 - f) == pytest.approx(a, abs=1e-12)
    assert g(0.0) == 0.0 and g(1.0) == 1.0


def test_audit_reports_the_bound_and_its_ceiling():
    rng = np.random.default_rng(3)
    m = 512
    planted = rng.random(m) < 0.5
    perfect = fdp.fdp_one_run_audit(planted.astype(float), planted, delta=1e-5)
    assert perfect.v == perfect.r and perfect.epsilon_lower_bound == pytest.approx(perfect.ceiling)
    assert perfect.ceiling > onerun.one_run_audit(planted.astype(float), planted, delta=1e-5).ceiling
    blind = fdp.fdp_one_run_audit(rng.normal(size=m), planted, delta=1e-5)
    assert blind.epsilon_lower_bound < 1.0 and blind.ceiling == perfect.ceiling
    with pytest.raises(ValueError, match="same length"):
        fdp.fdp_one_run_audit([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ValueError, match="guesses"):
        fdp.rejects(fdp.gdp_inverse_blowup(1.0), m=10, correct=5, guesses=4, beta=0.05)
