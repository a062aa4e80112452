"""Noise on the sum (privacy/sumdp.py): the bounds the ledger relies on, and the parameters every device derives."""

import math
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp
from scipy.special import logsumexp

from fedpersona.config import load_config
from fedpersona.privacy.ledger import INTEGER_ORDERS, PrivacyLedger
from fedpersona.privacy.rdp import epsilon_from_rdp, rdp_subsampled_gaussian
from fedpersona.privacy.secagg.ddp import sample_discrete_gaussian
from fedpersona.privacy.secagg.crypto import SecureRNG
from fedpersona.privacy.sumdp import (budget_passes, STEP_STRIDE, SumContext, honest_contributors, normalizer, reference_sample_rate,
                           share_sum_log_bound, step_round_id, sum_context, sum_gap, sum_noise_multiplier,
                           sum_scale, sum_secagg_params, weights_digest)


def cfg_of(**over):
    flat = {"privacy.noise-on": "sum", "server.clients-per-round": 8, **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(flat, env=False)


# ------------------------------------------------------------------ the discrete Gaussian's RDP at integer orders
def _lattice_rdp(q, stddev, shift, order, *, reverse=False):
    """D_order(P || Q) by a direct sum over Z^d: P = (1 - q) N_Z(0, S^2 I) + q N_Z(shift, S^2 I), Q = N_Z(0, S^2 I)."""
    shift = np.atleast_1d(np.asarray(shift))
    span = int(40 * stddev) + int(np.abs(shift).max()) + 10
    axes = [np.arange(-span, span + 1)] * shift.size
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, shift.size)
    logq = -(grid**2).sum(1) / (2 * stddev**2)
    logq -= logsumexp(logq)
    logs = -((grid - shift) ** 2).sum(1) / (2 * stddev**2)
    logs -= logsumexp(logs)
    logp = np.logaddexp(np.log1p(-q) + logq, np.log(q) + logs)
    if reverse:
        logp, logq = logq, logp
    return float(logsumexp(order * logp + (1 - order) * logq) / (order - 1))


@pytest.mark.parametrize("stddev,shift,q", [(2.0, [2], 0.3), (0.7, [1], 0.2), (5.0, [7], 0.05), (1.5, [1, 2], 0.25),
                                            (2.5, [2, -3], 0.5)])
def test_the_sampled_discrete_gaussian_has_the_gaussians_rdp_at_integer_orders(stddev, shift, q):
    # The identity of privacy/sumdp.py: exact on the lattice, whatever the scale and the shift's direction.
    mu = float(np.linalg.norm(shift))
    for order in (2, 3, 5, 8):
        lattice = _lattice_rdp(q, stddev, shift, order)
        gaussian = float(compute_rdp(q=q, noise_multiplier=stddev / mu, steps=1, orders=[order])[0])
        assert lattice == pytest.approx(gaussian, rel=1e-9, abs=1e-12)
        # The other direction is the smaller one on the lattice too (Opacus accounts the larger).
        assert _lattice_rdp(q, stddev, shift, order, reverse=True) <= lattice + 1e-12


def test_the_identity_needs_integer_orders():
    # At a fractional order the lattice and the Gaussian differ measurably at a small scale: why the
    # ledger of a noisy sum uses integer orders only.
    q, stddev, order = 0.3, 0.6, 2.5
    lattice = _lattice_rdp(q, stddev, [1], order)
    gaussian = float(compute_rdp(q=q, noise_multiplier=stddev, steps=1, orders=[order])[0])
    assert abs(lattice - gaussian) > 1e-4


@pytest.mark.parametrize("stddev", [0.5, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("honest", [2, 3, 5])
def test_a_sum_of_discrete_gaussians_is_pointwise_close_to_one(stddev, honest):
    # Kairouz-Liu-Steinke's gap, pointwise: the exact pmf of the sum of `honest` shares against N_Z(0, honest s^2).
    span = 80
    k = np.arange(-span, span + 1)
    one = np.exp(-(k**2) / (2 * stddev**2))
    one /= one.sum()
    total = one
    for _ in range(honest - 1):
        total = np.convolve(total, one)
    kk = np.arange(-(total.size // 2), total.size // 2 + 1)
    ref = np.exp(-(kk**2) / (2 * honest * stddev**2))
    ref /= ref.sum()
    body = np.abs(kk) < 12 * stddev * math.sqrt(honest)  # beyond: float underflow, not the bound
    worst = float(np.abs(np.log(total[body] / ref[body])).max())
    bound = share_sum_log_bound(stddev, honest)
    assert worst <= bound
    assert worst >= bound / 200  # the bound is not vacuous at these scales


def test_the_gap_at_the_shipped_scale_is_below_any_float():
    cfg = cfg_of()
    ctx = sum_context(cfg, round=1, step=1, cohort=8, weights={"w": torch.zeros(61440)})
    gap = sum_gap(ctx, epsilon=8.0, steps=60)
    assert ctx.device_stddev > 2**14
    assert gap["log10_pointwise"] < -1e8 and gap["log10_rdp_per_step"] < -1e8
    assert share_sum_log_bound(ctx.device_stddev, ctx.honest) == 0.0
    assert 0 < gap["clamp_delta"] < 1e-15
    # t = 1 (a device alone): its own share is an exact discrete Gaussian.
    alone = sum_context(cfg_of(**{"privacy.honest-contributors": 0}), round=1, step=1, cohort=2,
                        weights={"w": torch.zeros(10)})
    assert alone.honest == 1 and sum_gap(alone)["log10_pointwise"] == -math.inf


def test_the_samplers_sum_has_the_variance_the_mechanism_claims():
    # t honest shares of sigma_c each: the sum's variance is t sigma_c^2 = (sigma Delta)^2.
    rng = SecureRNG(seed=b"\x07" * 32)
    sigma_c, t = 40.0, 4
    total = sum(sample_discrete_gaussian(sigma_c, 20000, rng) for _ in range(t))
    assert np.var(total) == pytest.approx(t * sigma_c**2, rel=0.05)


# ------------------------------------------------------------------ the parameters every device derives
def test_honest_contributors_default_to_half_the_announced_cohort():
    assert honest_contributors(cfg_of(), 8) == 4
    assert honest_contributors(cfg_of(), 7) == 3
    assert honest_contributors(cfg_of(**{"privacy.honest-contributors": 3}), 8) == 3
    with pytest.raises(ValueError, match="announced cohort"):
        honest_contributors(cfg_of(), 0)


def test_the_common_sigma_is_calibrated_for_the_smallest_device_over_its_participations():
    cfg = cfg_of(**{"client.max-participations": 2, "client.local-steps": 3})
    q = reference_sample_rate(cfg)
    assert q == pytest.approx(8 / 30)  # data.min-examples 40, a quarter held out
    sigma = sum_noise_multiplier(cfg)
    # Cross-checked with the independent RDP implementation at the integer orders the ledger uses.
    orders = np.asarray(INTEGER_ORDERS, dtype=float)
    # 2 participations x 3 steps, twice with the local-only baseline (eval.local-baseline, on by default): one budget.
    assert budget_passes(cfg) == 2
    eps, _ = epsilon_from_rdp(rdp=rdp_subsampled_gaussian(q=q, sigma=sigma, steps=12, orders=orders), orders=orders,
                              delta=1e-3)
    assert 7.95 < eps <= 8.0
    alone = cfg_of(**{"client.max-participations": 2, "client.local-steps": 3, "eval.local-baseline": False})
    assert budget_passes(alone) == 1 and sum_noise_multiplier(alone) < sigma
    assert sum_noise_multiplier(cfg_of(**{"client.max-participations": 4, "client.local-steps": 3})) > sigma
    assert sum_noise_multiplier(cfg_of(**{"privacy.noise-multiplier": 1.7})) == 1.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum_noise_multiplier(cfg_of(**{"privacy.enabled": False})) == 0.0


def test_the_context_is_deterministic_and_binds_every_parameter():
    cfg = cfg_of()
    w = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4)}
    ctx = sum_context(cfg, round=2, step=3, cohort=8, weights=w)
    assert ctx == sum_context(cfg, round=2, step=3, cohort=8, weights=dict(reversed(list(w.items()))))
    assert SumContext.from_record(ctx.to_record()) == ctx
    assert ctx.dim == 10 and ctx.honest == 4 and ctx.batch_size == 8 and ctx.sum_bound == 48.0
    assert ctx.secagg_round == 2 * STEP_STRIDE + 3 == step_round_id(2, 3)
    assert ctx.device_stddev == pytest.approx(ctx.noise_multiplier * ctx.sensitivity / 2)
    base = ctx.to_bytes()
    variants = [sum_context(cfg, round=3, step=3, cohort=8, weights=w), sum_context(cfg, round=2, step=4, cohort=8, weights=w),
                sum_context(cfg, round=2, step=3, cohort=6, weights=w),
                sum_context(cfg, round=2, step=3, cohort=8, weights={**w, "a": torch.zeros(4)}),
                sum_context(cfg_of(**{"privacy.noise-multiplier": 2.0}), round=2, step=3, cohort=8, weights=w),
                sum_context(cfg_of(**{"privacy.max-grad-norm": 0.5}), round=2, step=3, cohort=8, weights=w)]
    assert len({v.to_bytes() for v in variants} | {base}) == len(variants) + 1
    assert set(ctx.differences(variants[4])) == {"noise_multiplier"}
    with pytest.raises(ValueError, match="lacks 'honest'"):
        SumContext.from_record({k: v for k, v in ctx.to_record().items() if k != "honest"})
    assert weights_digest(w) != weights_digest({"a": torch.ones(4)})


def test_the_scale_keeps_rounding_a_thousandth_of_the_sensitivity():
    cfg = cfg_of()
    s = sum_scale(cfg, sigma=1.0, honest=4, dim=61440)
    assert math.sqrt(61440) / (s * 1.0) <= 1e-3 and s == 2.0**18
    # A large noise lowers the scale so a share stays within the exact sampler's range.
    big = sum_scale(cfg, sigma=40.0, honest=1, dim=61440)
    assert big < s and 40.0 * (big + math.sqrt(61440)) <= 2**19
    assert sum_scale(cfg_of(**{"secagg.scale": 1024.0}), sigma=1.0, honest=4, dim=10) == 1024.0


def test_the_sums_secure_aggregation_needs_t_survivors_and_plain_rounding():
    cfg = cfg_of(**{"privacy.honest-contributors": 4, "secagg.min-contributors": 3})
    p = sum_secagg_params(cfg, cohort=8, dim=1000)
    assert p.round_params(8)[2] >= 4 and p.rounding_beta == 0.0
    assert [e.name for e in p.extras] == ["trained"]
    ctx = sum_context(cfg, round=1, step=1, cohort=8, weights={"w": torch.zeros(1000)})
    # Record-level: one record moves the rounded vector by at most s C + sqrt(d) (not the sum bound G).
    assert ctx.sensitivity == pytest.approx(p.scale * 1.0 + math.sqrt(1000))
    assert p.noise_stddev == pytest.approx(ctx.device_stddev) and p.clip_norm == ctx.sum_bound
    assert normalizer(ctx, 6) == 48.0


def test_a_ledger_of_noisy_sums_matches_the_independent_accountant_at_integer_orders():
    cfg = cfg_of(**{"client.max-participations": 2, "client.local-steps": 3})
    sigma = sum_noise_multiplier(cfg)
    ledger = PrivacyLedger()
    for _ in range(6):
        ledger.step_on_sum(noise_multiplier=sigma, sample_rate=0.2, honest=4)
    orders = np.asarray(INTEGER_ORDERS, dtype=float)
    eps, _ = epsilon_from_rdp(rdp=rdp_subsampled_gaussian(q=0.2, sigma=sigma, steps=6, orders=orders), orders=orders,
                              delta=1e-3)
    assert ledger.epsilon(1e-3) == pytest.approx(eps, rel=1e-6)
