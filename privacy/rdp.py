"""Rényi DP of the Poisson-subsampled Gaussian mechanism: a second implementation.

The device ledger (:mod:`fedpersona.privacy.ledger`) accounts with Opacus. This module is an
independent implementation of the same analysis, used to cross-check it in tests
and audits. It is pure math: no state, no Opacus.

Notation. One step releases ``f(batch) + N(0, sigma^2)`` where every example joins the
batch independently with probability ``q`` and ``f`` has L2 sensitivity 1. Mironov,
Talwar and Zhang (2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism") show that its RDP at order ``alpha > 1`` is ``log(A_alpha) / (alpha - 1)``
with::

    A_alpha = E_{z ~ N(0, sigma^2)} [ (1 - q + q * exp((2z - 1) / (2 sigma^2)))^alpha ]

How ``A_alpha`` is computed here:

* integer orders: exactly, by the binomial expansion. Since the binomial weights sum
  to one, ``A - 1 = sum_{k>=2} C(alpha, k) q^k (1-q)^(alpha-k) expm1(k(k-1)/(2 sigma^2))``,
  a sum of positive terms, evaluated in log space. Working with ``A - 1`` keeps full
  relative precision when ``q`` is tiny (where ``log A`` is close to 0).
* fractional orders: by adaptive quadrature of the integral above, again for ``A - 1``:
  with ``x = q * expm1((2z - 1) / (2 sigma^2))`` (whose mean is 0) the integrand becomes
  ``(1 + x)^alpha - 1 - alpha x >= 0``, so nothing cancels. This is deliberately a
  different route from the series that Opacus and TF Privacy use, so that agreement
  between the two is a real check.

Composition over steps multiplies the RDP by the number of steps (and sums over
heterogeneous steps). Conversion to (epsilon, delta) uses the improved conversion of
Balle et al. (2020, Theorem 21), the one Opacus uses::

    eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)

minimised over the orders.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy import special

__all__ = ["DEFAULT_ORDERS", "rdp_subsampled_gaussian", "epsilon_from_rdp"]

#: The orders Opacus's RDPAccountant searches (1.1, 1.2, ..., 10.9, then 12, ..., 63).
DEFAULT_ORDERS: np.ndarray = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
DEFAULT_ORDERS.setflags(write=False)

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------- helpers
def _log_expm1(y: np.ndarray) -> np.ndarray:
    """log(exp(y) - 1) for y > 0, without overflow for large y or loss for small y."""
    y = np.asarray(y, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(y > 30.0, y + np.log1p(-np.exp(-np.minimum(y, 700.0))), np.log(np.expm1(np.minimum(y, 30.0))))


def _log_a_minus_1_integer(q: float, sigma: float, alpha: int) -> float:
    """log(A_alpha - 1) for an integer order alpha >= 2 (exact binomial expansion)."""
    k = np.arange(2, alpha + 1, dtype=float)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    log_terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + _log_expm1(k * (k - 1) / (2 * sigma**2))
    return float(special.logsumexp(log_terms))


def _log_excess(x: np.ndarray, alpha: float) -> np.ndarray:
    """log((1 + x)^alpha - 1 - alpha * x) for x > -1 and alpha > 1 (the value is > 0 for x != 0)."""
    x = np.asarray(x, dtype=float)
    out = np.empty_like(x)
    small = np.abs(x) * max(alpha, 2.0) < 0.05
    # Near x = 0 the direct formula cancels: sum the binomial series from the x^2 term on.
    if small.any():
        xs = x[small]
        total = np.zeros_like(xs)
        coef = alpha * (alpha - 1) / 2.0
        power = xs * xs
        for k in range(2, 20):
            total += coef * power
            coef *= (alpha - k) / (k + 1)
            power = power * xs
        with np.errstate(divide="ignore"):
            out[small] = np.log(total)
    big = ~small
    if big.any():
        xb = x[big]
        log_pow = alpha * np.log1p(xb)  # log((1 + x)^alpha)
        direct = log_pow < 600.0
        res = np.empty_like(xb)
        d = direct
        with np.errstate(divide="ignore"):
            res[d] = np.log(np.expm1(log_pow[d]) - alpha * xb[d])
            # (1 + x)^alpha dominates: factor it out.
            res[~d] = log_pow[~d] + np.log1p(-np.exp(np.log1p(alpha * xb[~d]) - log_pow[~d]))
        out[big] = res
    return out


def _log_a_minus_1_quadrature(q: float, sigma: float, alpha: float) -> float:
    """log(A_alpha - 1) for any real order alpha > 1, by quadrature over t = z / sigma ~ N(0, 1).

    Composite Gauss-Legendre rule on panels narrower than both the Gaussian's scale (1)
    and the scale on which ``x(t)`` changes (sigma), evaluated in log space and scaled
    by the largest term, so that neither tiny nor huge values of ``A - 1`` lose precision.
    """
    shift = 1.0 / (2 * sigma**2)
    t0 = 1.0 / (2 * sigma)  # x(t0) = 0: the integrand has a double zero there
    lo = -40.0
    hi = max(alpha / sigma, 2.0 / sigma, t0, 0.0) + 40.0
    width = min(0.25, sigma / 2)
    # Panel edges: uniform, plus t0 so that no panel straddles the double zero.
    edges = np.union1d(np.linspace(lo, hi, int(math.ceil((hi - lo) / width)) + 1), [t0])
    nodes, weights = _GAUSS_LEGENDRE
    half = 0.5 * np.diff(edges)
    mid = 0.5 * (edges[:-1] + edges[1:])
    t = (mid[:, None] + half[:, None] * nodes[None, :]).ravel()
    w = (half[:, None] * weights[None, :]).ravel()
    x = q * np.expm1(t / sigma - shift)
    logs = -0.5 * t * t - _LOG_SQRT_2PI + _log_excess(x, alpha) + np.log(w)
    return float(special.logsumexp(logs))


_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(20)


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    if sigma == 0.0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_am1 = _log_a_minus_1_integer(q, sigma, int(alpha))
    else:
        log_am1 = _log_a_minus_1_quadrature(q, sigma, alpha)
    # log(A) = log(1 + (A - 1)), precise when A - 1 is tiny.
    log_a = math.log1p(math.exp(log_am1)) if log_am1 < 30.0 else float(np.logaddexp(0.0, log_am1))
    return log_a / (alpha - 1)


# ------------------------------------------------------------------------------------ public API
def rdp_subsampled_gaussian(*, q: float, sigma: float, orders: Iterable[float] = DEFAULT_ORDERS, steps: int = 1) -> np.ndarray:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism, per order.

    Args:
        q: sampling rate, in [0, 1].
        sigma: noise multiplier (noise std / L2 sensitivity), >= 0; 0 gives infinite RDP.
        orders: RDP orders, each > 1.
        steps: number of compositions (RDP is additive over steps), >= 0.

    Returns:
        float array, one RDP value per order (``inf`` where unbounded).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1]. You passed: q={q}")
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0. You passed: sigma={sigma}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0. You passed: steps={steps}")
    orders_arr = np.atleast_1d(np.asarray(orders, dtype=float))
    if orders_arr.size == 0 or np.any(~(orders_arr > 1.0)) or np.any(~np.isfinite(orders_arr)):
        raise ValueError(f"orders must be finite and > 1. You passed: orders={orders_arr.tolist()}")
    if q == 0.0 or steps == 0:
        return np.zeros_like(orders_arr)
    per_step = np.array([_rdp_one_step(float(q), float(sigma), float(a)) for a in orders_arr])
    return per_step * steps


def epsilon_from_rdp(*, rdp: Iterable[float], orders: Iterable[float] = DEFAULT_ORDERS, delta: float) -> tuple[float, float]:
    """Convert RDP values to (epsilon, delta)-DP; returns ``(epsilon, best_order)``.

    Uses ``eps = rdp - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)`` minimised over
    the orders ``a``. Epsilon is floored at 0 (Opacus can return a meaningless negative
    value there, e.g. for delta near 1). If every order is unbounded the result is
    ``(inf, nan)``.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1). You passed: delta={delta}")
    rdp_arr = np.atleast_1d(np.asarray(rdp, dtype=float))
    orders_arr = np.atleast_1d(np.asarray(orders, dtype=float))
    if rdp_arr.shape != orders_arr.shape:
        raise ValueError(f"rdp and orders must have the same length. You passed: {rdp_arr.size} and {orders_arr.size}")
    if np.any(~(orders_arr > 1.0)):
        raise ValueError(f"orders must be > 1. You passed: orders={orders_arr.tolist()}")
    eps = rdp_arr - (math.log(delta) + np.log(orders_arr)) / (orders_arr - 1) + np.log((orders_arr - 1) / orders_arr)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    if not math.isfinite(eps[best]):
        return math.inf, math.nan
    return max(0.0, float(eps[best])), float(orders_arr[best])
