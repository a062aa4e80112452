"""Auditing f-DP in one run (Mahloujifar, Melis and Chaudhuri, ICML 2025), with Gaussian-DP curves.

Setting: as :mod:`fedpersona.privacy.audit.onerun` (Steinke, Nasr and Jagielski): ``m`` canaries, each
included in the training data independently with probability 1/2; after one training run the
auditor guesses "in" or "out" for ``c'`` of them (abstaining on the rest) and ``c`` guesses are
right. Steinke et al. test the hypothesis "the run is (eps, delta)-DP" against ``c``; an
(eps, delta) guarantee caps the accuracy of a guess at ``e^eps / (1 + e^eps)`` for every canary,
so their bound needs thousands of all-correct guesses to exceed 8.

Mahloujifar et al. test a whole trade-off curve ``f`` instead (f-DP: any test of "canary in"
vs "canary out" with type-I error ``a`` has type-II error ``>= f(a)``). Write
``g = `` the inverse of the *blow-up* ``x -> 1 - f(x)``: if a set of outputs has probability
``y`` when a canary is in, it has probability ``>= g(y)`` when it is out. Their bound on the
probability of ``>= c`` correct guesses is the recursion (``k = 2`` choices per canary here)::

    r_c = tau c / m,   h_c = tau (c' - c) / m
    for i = c-1, ..., 0:
        h_i = max(h_{i+1}, (k - 1) g(r_{i+1}))
        r_i = r_{i+1} + i / (c' - i) * (h_i - h_{i+1})

If the run is f-DP and ``P[>= c correct] >= tau`` then ``r_0 + h_0 <= c' / m``. So
``r_0 + h_0 > c' / m`` at ``tau = beta`` rejects "f-DP" at level ``beta``: the observation has
probability below ``beta`` under every f-DP run (:func:`rejects`).

The curves audited here are Gaussian DP, ``f = G_mu`` with ``G_mu(a) = Phi(Phi^-1(1 - a) - mu)``
and ``g(y) = Phi(Phi^-1(y) - mu)`` (Dong, Roth and Su 2022): :func:`gdp_lower_bound` is the
largest ``mu`` rejected, reported as the epsilon of ``G_mu`` at the run's delta
(:func:`gdp_epsilon`): "the run is not mu-GDP for any mu whose (epsilon, delta) is below the
bound". DP-SGD's own curve (many subsampled Gaussian steps) is close to a Gaussian curve by the
central limit theorem of Dong et al.; the family is the assumption of this bound, where
Steinke et al.'s needs none. :func:`eps_delta_rejects` tests the (eps, delta) curve itself
(no assumption; as weak as Steinke et al.'s at large eps).

Checked in ``tests/privacy/test_audit_fdp.py``: against a simulated mu-GDP game (a true mu is
rejected at most at the stated rate), against the closed-form inverse blow-ups, and against
Steinke et al.'s bound on the pure-DP curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

from fedpersona.privacy.audit.onerun import guesses

__all__ = ["FdpResult", "eps_delta_inverse_blowup", "eps_delta_rejects", "fdp_one_run_audit", "gdp_delta",
           "gdp_epsilon", "gdp_inverse_blowup", "gdp_lower_bound", "gdp_mu", "rejects"]

#: mu above this is not searched: its epsilon at any delta used here is far beyond any budget.
MU_MAX = 40.0


def _check(m: int, c: int, guessed: int) -> None:
    for name, x in (("m", m), ("correct", c), ("guesses", guessed)):
        if isinstance(x, bool) or int(x) != x or x < 0:
            raise ValueError(f"{name} must be an integer >= 0. You passed: {name}={x!r}")
    if not c <= guessed <= m or guessed == 0:
        raise ValueError(f"need 0 <= correct <= guesses <= m and guesses >= 1. You passed: m={m}, guesses={guessed}, "
                         f"correct={c}")


def gdp_inverse_blowup(mu: float) -> Callable[[float], float]:
    """``g(y) = Phi(Phi^-1(y) - mu)``: the least probability, with a canary out, of a set that has ``y`` with it in."""
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0. You passed: {mu!r}")

    def g(y: float) -> float:
        y = min(1.0, max(0.0, float(y)))
        return float(special.ndtr(special.ndtri(y) - mu))

    return g


def eps_delta_inverse_blowup(epsilon: float, delta: float) -> Callable[[float], float]:
    """The same for the (epsilon, delta)-DP curve ``f(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a))``."""
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta < 1. You passed: epsilon={epsilon!r}, delta={delta!r}")

    def g(y: float) -> float:
        y = min(1.0, max(0.0, float(y)))
        return max(0.0, (y - delta) * math.exp(-epsilon), 1.0 - delta - math.exp(epsilon) * (1.0 - y))

    return g


def rejects(g: Callable[[float], float], *, m: int, correct: int, guesses: int, beta: float, k: int = 2) -> bool:
    """True if ``correct`` of ``guesses`` right guesses (``m`` canaries) reject the curve of ``g`` at level ``beta``."""
    _check(m, correct, guesses)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1). You passed: beta={beta!r}")
    if correct == 0:
        return False
    r = beta * correct / m
    h = beta * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        h_next = max(h, (k - 1) * g(r))
        r = r + i / (guesses - i) * (h_next - h)
        h = h_next
        if r + h > guesses / m:  # both only grow from here on
            return True
    return r + h > guesses / m


def eps_delta_rejects(*, epsilon: float, delta: float, m: int, correct: int, guesses: int, beta: float) -> bool:
    """The test of "the run is (epsilon, delta)-DP" through its trade-off curve (no assumption on its shape)."""
    return rejects(eps_delta_inverse_blowup(epsilon, delta), m=m, correct=correct, guesses=guesses, beta=beta)


def gdp_lower_bound(*, m: int, correct: int, guesses: int, beta: float, tol: float = 1e-4) -> float:
    """The largest mu such that the observation rejects mu-GDP at level ``beta`` (0 if it rejects none)."""
    _check(m, correct, guesses)

    def rej(mu: float) -> bool:
        return rejects(gdp_inverse_blowup(mu), m=m, correct=correct, guesses=guesses, beta=beta)

    if not rej(0.0):
        return 0.0
    if rej(MU_MAX):
        return MU_MAX
    lo, hi = 0.0, MU_MAX  # rejection is monotone: a smaller mu (more private) is rejected whenever a larger one is
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if rej(mid):
            lo = mid
        else:
            hi = mid
    return lo


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-GDP: ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Dong, Roth and Su, Cor. 2.13)."""
    if mu <= 0:
        return 0.0
    a = stats.norm.logcdf(-epsilon / mu + mu / 2)
    b = epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)
    return float(math.exp(a) * -math.expm1(b - a)) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with ``delta(epsilon) <= delta`` for mu-GDP."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). You passed: {delta!r}")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 1e5:
            return math.inf
    while hi - lo > 1e-6 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gdp_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian curve whose (epsilon, delta) is the given one (inverse of :func:`gdp_epsilon`)."""
    lo, hi = 0.0, MU_MAX
    while hi - lo > 1e-7:
        mid = 0.5 * (lo + hi)
        if gdp_delta(mid, epsilon) > delta:
            hi = mid
        else:
            lo = mid
    return lo


@dataclass(frozen=True)
class FdpResult:
    m: int
    included: int
    k: int  # guesses on each side of the best setting
    r: int
    v: int
    accuracy: float
    mu_lower_bound: float
    epsilon_lower_bound: float  # of G_mu at delta
    confidence: float
    delta: float
    settings_tried: int
    per_setting: list
    ceiling_mu: float
    ceiling: float  # the epsilon bound all-correct guesses would give: the most this audit can show
    method: str = "f-DP one-run audit (Mahloujifar et al. 2025), Gaussian-DP curves"

    def to_dict(self) -> dict:
        return asdict(self)


def fdp_one_run_audit(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                      k_values: Sequence[int] | None = None) -> FdpResult:
    """The f-DP one-run audit of these canary scores (higher = "more likely included").

    ``k_values``: guesses per side, fixed in advance (default ``m/16, m/8, m/4``); the
    ``1 - confidence`` error is split evenly among them (Bonferroni), so the reported bound (the
    best) holds at ``confidence`` overall.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m == 0 or len(inc) != m:
        raise ValueError(f"scores and included must be non-empty and of the same length. You passed: {m} and {len(inc)}")
    if k_values is None:
        k_values = sorted({max(1, m // 16), max(1, m // 8), max(1, m // 4)})
    k_values = [int(k) for k in k_values if 1 <= k and 2 * k <= m]
    if not k_values:
        raise ValueError(f"no guess size fits {m} canaries")
    beta = (1.0 - confidence) / len(k_values)
    rows = []
    for k in k_values:
        g = guesses(s, k, k)
        r = int((g != 0).sum())
        v = int(((g == 1) & inc).sum() + ((g == -1) & ~inc).sum())
        mu = gdp_lower_bound(m=m, correct=v, guesses=r, beta=beta)
        rows.append({"k": k, "r": r, "v": v, "accuracy": v / r, "mu_lower_bound": mu,
                     "epsilon_lower_bound": gdp_epsilon(mu, delta), "beta": beta})
    best = max(rows, key=lambda x: (x["mu_lower_bound"], x["accuracy"]))
    ceiling_mu = max(gdp_lower_bound(m=m, correct=2 * k, guesses=2 * k, beta=beta) for k in k_values)
    return FdpResult(m=m, included=int(inc.sum()), k=best["k"], r=best["r"], v=best["v"], accuracy=best["accuracy"],
                     mu_lower_bound=best["mu_lower_bound"], epsilon_lower_bound=best["epsilon_lower_bound"],
                     confidence=confidence, delta=delta, settings_tried=len(rows), per_setting=rows,
                     ceiling_mu=ceiling_mu, ceiling=gdp_epsilon(ceiling_mu, delta))
