"""Privacy auditing with one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

Setting. ``m`` canaries, each included in the training data independently with probability
1/2. After training, the auditor scores every canary (here: how much the trained model lowered
its loss relative to the base model), guesses "included" for the ``k_plus`` highest scores and
"excluded" for the ``k_minus`` lowest, and abstains on the rest: ``r = k_plus + k_minus``
guesses, ``v`` of them correct.

The bound (their Theorem 5.2, as a hypothesis test). If training is (eps, delta)-DP with
respect to each canary, then for every ``v``

    P[correct >= v] <= P[Bin(r, p) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i,

with ``p = e^eps / (1 + e^eps)`` (the accuracy of eps-randomised response). The right-hand side
is the p-value of the observation under the null hypothesis "the run is (eps, delta)-DP".
The empirical lower bound at confidence ``1 - beta`` is the largest ``eps`` that the
observation rejects: ``sup {eps : pvalue(eps) <= beta}`` (0 if none). It holds for *this* run,
whatever the model, the data or the scoring: no retraining, no assumption on the attack.

Guess sizes chosen after looking at the scores would void the confidence; here they are fixed
in advance, and when several are tried the confidence is split among them (Bonferroni).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["p_value", "epsilon_lower_bound", "guesses", "OneRunResult", "one_run_audit"]


def _check(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if isinstance(x, bool) or int(x) != x or x < 0:
            raise ValueError(f"{name} must be an integer >= 0. You passed: {name}={x!r}")
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m. You passed: m={m}, r={r}, v={v}")


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct guesses out of ``r`` (``m`` canaries) if the run were (epsilon, delta)-DP."""
    _check(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0. You passed: epsilon={epsilon!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1]. You passed: delta={delta!r}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0:
        return min(1.0, tail)
    # P[v - i <= Bin < v] for i = 1..v, divided by i; its maximum over i.
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v-1], P[Bin = v-2], ..., P[Bin = 0]
    worst = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * worst)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float = 0.05, tol: float = 1e-6) -> float:
    """Largest epsilon rejected at level ``beta`` by ``v`` correct of ``r`` guesses (0 if none is)."""
    _check(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1). You passed: beta={beta!r}")
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) <= beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses(scores: Sequence[float], k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("included") for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 otherwise.

    Ties are broken by index (stable sort), never by the answer.
    """
    s = np.asarray(scores, dtype=float)
    if k_plus + k_minus > len(s):
        raise ValueError(f"k_plus + k_minus must be <= the number of canaries {len(s)}. You passed: {k_plus} + {k_minus}")
    order = np.argsort(-s, kind="stable")
    g = np.zeros(len(s), dtype=int)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[len(s) - k_minus:]] = -1
    return g


@dataclass(frozen=True)
class OneRunResult:
    m: int
    included: int
    k: int  # guesses on each side (k_plus = k_minus = k) of the best setting
    r: int
    v: int
    accuracy: float
    epsilon_lower_bound: float
    confidence: float
    delta: float
    settings_tried: int
    per_setting: list
    ceiling: float  # the bound all-correct guesses would give: the most this audit can show

    def to_dict(self) -> dict:
        return asdict(self)


def one_run_audit(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                  k_values: Sequence[int] | None = None) -> OneRunResult:
    """The one-run audit for the given canary scores (higher = "more likely included").

    ``k_values``: guess sizes per side, fixed in advance (default ``m/16, m/8, m/4``); the
    ``1 - confidence`` error is split evenly among them, so the reported bound (the best one)
    holds at ``confidence`` overall.
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
        eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, beta=beta)
        rows.append({"k": k, "r": r, "v": v, "accuracy": v / r, "epsilon_lower_bound": eps, "beta": beta})
    best = max(rows, key=lambda x: (x["epsilon_lower_bound"], x["accuracy"]))
    ceiling = max(epsilon_lower_bound(m=m, r=2 * k, v=2 * k, delta=delta, beta=beta) for k in k_values)
    return OneRunResult(m=m, included=int(inc.sum()), k=best["k"], r=best["r"], v=best["v"], accuracy=best["accuracy"],
                        epsilon_lower_bound=best["epsilon_lower_bound"], confidence=confidence, delta=delta,
                        settings_tried=len(rows), per_setting=rows, ceiling=ceiling)
