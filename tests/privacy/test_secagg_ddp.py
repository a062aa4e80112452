"""Distributed DP: the discrete Gaussian sampler is exact (pmf, variance), the accountant is pinned and monotone."""

import math

import numpy as np
import pytest
from scipy import stats

from fedpersona.privacy.rdp import epsilon_from_rdp, rdp_subsampled_gaussian
from fedpersona.privacy.secagg import SecAggParams, SecureRNG, ddp_epsilon, local_noise_stddev, run_secure_sum
from fedpersona.privacy.secagg import ddp
from fedpersona.privacy.secagg.ddp import DDP_ORDERS, clamp_probability, noise_tail_bound, sample_discrete_gaussian


def dg_pmf(sigma, lim):
    x = np.arange(-lim, lim + 1)
    w = np.exp(-(x.astype(float) ** 2) / (2 * sigma**2))
    return x, w / w.sum()


def chi2_against_pmf(samples, sigma):
    lim = int(12 * sigma) + 2
    x, p = dg_pmf(sigma, lim)
    counts = np.array([(samples == v).sum() for v in x], dtype=float)
    assert counts.sum() == samples.size  # nothing beyond 12 sigma
    exp = p * samples.size
    keep = exp >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    ex = np.append(exp[keep], exp[~keep].sum())
    if ex[-1] < 5:
        obs[-2] += obs[-1]
        ex[-2] += ex[-1]
        obs, ex = obs[:-1], ex[:-1]
    return stats.chisquare(obs, ex).pvalue


@pytest.mark.parametrize("sigma", [0.5, 0.8, 3.0, 7.5])
def test_discrete_gaussian_pmf_and_variance(sigma):
    n = 200_000
    s = sample_discrete_gaussian(sigma, n, SecureRNG(b"dg%f" % sigma))
    assert s.dtype == np.int64 and s.size == n
    assert chi2_against_pmf(s, sigma) > 1e-3
    x, p = dg_pmf(sigma, int(20 * sigma) + 5)
    var = float((x.astype(float) ** 2 * p).sum())  # exact variance of N_Z(0, sigma^2) (< sigma^2 for small sigma)
    se = var * math.sqrt(2.0 / n) * math.sqrt(1 + 0.5)  # generous: kurtosis of the discrete Gaussian ~ 3
    assert abs(s.var() - var) < 5 * se
    assert abs(s.mean()) < 5 * math.sqrt(var / n)


def test_large_sigma_variance():
    n, sigma = 100_000, 1000.0
    s = sample_discrete_gaussian(sigma, n, SecureRNG(b"big"))
    assert abs(s.var() / sigma**2 - 1) < 5 * math.sqrt(2.0 / n)
    assert stats.kstest(s / sigma, "norm").pvalue > 1e-3


def test_exact_fallback_path(monkeypatch):
    """Force every coin through the exact rational path: same distribution."""
    monkeypatch.setattr(ddp, "_REL", 10.0)
    calls = []
    tail = ddp._coin_tail
    monkeypatch.setattr(ddp, "_coin_tail", lambda *a: calls.append(1) or tail(*a))
    s = sample_discrete_gaussian(1.5, 2000, SecureRNG(b"exact"))
    assert len(calls) > 5000
    assert chi2_against_pmf(s, 1.5) > 1e-3


def test_bernoulli_exp_scalar():
    from fractions import Fraction
    rng = SecureRNG(b"bexp")
    for g in (Fraction(7, 10), Fraction(23, 10)):
        hits = sum(ddp._bern_exp_scalar(rng, g) for _ in range(4000))
        p = math.exp(-float(g))
        assert abs(hits / 4000 - p) < 5 * math.sqrt(p * (1 - p) / 4000)


def test_sampler_input_validation_and_zero():
    assert not sample_discrete_gaussian(0.0, 5).any()
    with pytest.raises(ValueError, match="sigma"):
        sample_discrete_gaussian(-1.0, 5)
    with pytest.raises(ValueError, match="sigma"):
        sample_discrete_gaussian(float("nan"), 5)


def test_protocol_sum_carries_the_survivors_noise():
    """Zero updates, 5 clients with sigma_c = 4, one dropped: the sum's noise has variance 4 * 16 per coordinate."""
    d, sigma_c = 20_000, 4.0
    cfg = SecAggParams(clip_norm=1.0, scale=100.0, max_cohort=10, noise_stddev=sigma_c)
    ups = {c: np.zeros(d, np.float32) for c in range(5)}
    r = run_secure_sum(ups, cfg, drop_before_masking=[0], rng=SecureRNG(b"noise"))
    noise = r.int_sum[:d].astype(float)
    var = 4 * sigma_c**2
    assert abs(noise.var() - var) < 5 * var * math.sqrt(2.0 / d)
    assert abs(noise.mean()) < 5 * math.sqrt(var / d)
    assert np.abs(r.total - noise / 100.0).max() == 0


def test_noise_tail_and_clamp_probability():
    assert noise_tail_bound(3.0) == 36 and noise_tail_bound(0.0) == 0
    p = clamp_probability(stddev=3.0, tail_bound=36, dim=5_000_000)
    assert 0 < p < 1e-23
    assert local_noise_stddev(10.0, 25) == 2.0


# ------------------------------------------------------------------------------ accountant
BASE = dict(noise_stddev_quantized=1.0, l2_sensitivity_quantized=4.0, num_clients=100, dim=10_000, delta=1e-5,
            rounds=10)
PINNED = 6.3153135379123215          # tau = 5.5e-4 adds ~0.11 to the continuous Gaussian's 6.2084
PINNED_CONTINUOUS_LIMIT = 8.079406222420491


def test_accountant_pinned():
    assert ddp_epsilon(**BASE) == pytest.approx(PINNED, rel=1e-9)
    big = dict(BASE, noise_stddev_quantized=20.0, l2_sensitivity_quantized=100.0)
    assert ddp_epsilon(**big) == pytest.approx(PINNED_CONTINUOUS_LIMIT, rel=1e-9)


def test_accountant_matches_continuous_gaussian_when_tau_vanishes():
    """Large sigma_c: tau ~ 0 and the bound is the Gaussian mechanism's with noise multiplier sqrt(n) sigma_c / Delta."""
    for sigma_c, delta2, n in [(20.0, 100.0, 100), (5.0, 30.0, 50)]:
        z = math.sqrt(n) * sigma_c / delta2
        rdp = rdp_subsampled_gaussian(q=1.0, sigma=z, orders=DDP_ORDERS, steps=7)
        ref = epsilon_from_rdp(rdp=rdp, orders=DDP_ORDERS, delta=1e-6)[0]
        eps = ddp_epsilon(noise_stddev_quantized=sigma_c, l2_sensitivity_quantized=delta2, num_clients=n, dim=10**6,
                          delta=1e-6, rounds=7)
        assert eps == pytest.approx(ref, rel=1e-9)
    # small sigma_c: the discrete correction makes it strictly worse than the continuous bound
    z = math.sqrt(100) * 1.0 / 4.0
    ref = epsilon_from_rdp(rdp=rdp_subsampled_gaussian(q=1.0, sigma=z, orders=DDP_ORDERS, steps=10), orders=DDP_ORDERS,
                           delta=1e-5)[0]
    assert ddp_epsilon(**BASE) > ref


def test_accountant_monotone():
    eps = [ddp_epsilon(**dict(BASE, rounds=r)) for r in (1, 2, 5, 10, 50)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    eps = [ddp_epsilon(**dict(BASE, noise_stddev_quantized=s, l2_sensitivity_quantized=4.0)) for s in (0.9, 1, 2, 4)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    eps = [ddp_epsilon(**dict(BASE, num_clients=n)) for n in (20, 50, 100, 400)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    eps = [ddp_epsilon(**dict(BASE, l2_sensitivity_quantized=d)) for d in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert ddp_epsilon(**dict(BASE, rounds=0)) == 0.0


def test_accountant_rejects_bad_input():
    with pytest.raises(ValueError, match="0.5"):
        ddp_epsilon(**dict(BASE, noise_stddev_quantized=0.4))
    with pytest.raises(ValueError, match="num_clients"):
        ddp_epsilon(**dict(BASE, num_clients=0))
    with pytest.raises(ValueError, match="rounds"):
        ddp_epsilon(**dict(BASE, rounds=-1))
    with pytest.raises(ValueError, match="delta"):
        ddp_epsilon(**dict(BASE, delta=0.0))
