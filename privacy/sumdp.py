"""Noise once on the secure sum (``privacy.noise-on = sum``): the parameters of a noisy sum, and why they hold.

One DP-SGD step of the shared adapter is one secure sum over the round's cohort of K devices. At the
same shared weights, every device computes the sum of its clipped per-example gradients (L2 bound
``C = privacy.max-grad-norm``) over its own Poisson sample (its own rate ``q = client.batch-size / n``,
drawn from the CSPRNG), projects that sum onto the ball of radius ``G = C * data.max-examples`` (a
projection is 1-Lipschitz: one record still moves it by at most C), scales it by ``s`` quantized units
per unit, rounds it to integers (unbiased randomized rounding, no conditional rounding) and adds discrete
Gaussian noise ``N_Z(0, sigma_c^2)`` to every coordinate, with::

    Delta = s C + sqrt(d)              (L2 bound of the change one record makes to the rounded vector)
    sigma_c = sigma * Delta / sqrt(t)  (each device's share; t = privacy.honest-contributors)

then masks it (SecAgg+). The server learns only the sum over the survivors (at least ``t`` of them, or
the step aborts before any unmask), divides it by ``s`` and by the public normalizer
``survivors * client.batch-size`` (the expected batch of the survivors; never a device's own n) and steps
its optimizer (:mod:`fedpersona.server.sumdp`). Several steps a round are several sums; a device never takes a local
step with its reduced noise.

**The guarantee.** Each record of each device is (epsilon, delta)-DP at the ledger's ``sigma`` and the
device's own ``q`` (Opacus's RDP of the Poisson-sampled Gaussian, at integer orders), as long as at least
``t`` devices that follow the protocol have their noise in each released sum. Why:

* With ``t`` honest shares in the sum, the noise guaranteed to be in it is the sum of ``t`` i.i.d.
  ``N_Z(0, sigma_c^2)``, whatever the others (other devices' inputs and colluders' shares are independent of
  the record: post-processing). One record changes the device's rounded vector by an integer vector of L2
  norm at most ``Delta`` (couple the rounding draws: each coordinate moves by less than its pre-rounding
  change plus 1).
* *The sum of t discrete Gaussians is not a discrete Gaussian* (Kairouz, Liu, Steinke, ICML 2021). Their
  argument, made pointwise: summing ``N_Z(0, a^2)`` and ``N_Z(0, b^2)`` gives
  ``N_Z(0, a^2 + b^2)(z)`` times a lattice sum of a Gaussian of variance ``a^2 b^2 / (a^2 + b^2)``, which by
  Poisson summation lies within ``1 +- theta``, ``theta = 2 sum_m exp(-2 pi^2 s^2 m^2)``. Adding the ``t``
  shares one at a time, the pmf of their sum is within a factor ``exp(+-L)`` of ``N_Z(0, t sigma_c^2)``,
  per coordinate ``L_1 = sum_{k=1}^{t-1} log((1 + theta_k) / (1 - theta_k))`` with
  ``s_k^2 = sigma_c^2 k / (k + 1)`` (:func:`share_sum_log_bound`); over ``d`` coordinates ``L = d L_1``
  (:func:`sum_gap`). Both
  neighbouring output distributions move by at most that factor, so the Renyi divergence of order alpha
  grows by at most ``(2 alpha - 1) / (alpha - 1) * L`` per step.
* *The discrete Gaussian with an integer shift has the Gaussian's Renyi divergence at integer orders.*
  For ``P = (1 - q) N_Z(0, S^2 I) + q N_Z(mu, S^2 I)`` and ``Q = N_Z(0, S^2 I)`` on ``Z^d`` with ``mu``
  an integer vector, expanding ``P^alpha`` binomially, every term of ``sum_k P^alpha Q^(1 - alpha)`` is
  ``exp((j^2 - j) |mu|^2 / (2 S^2))`` times a lattice sum of a Gaussian centred at the integer point
  ``j mu``, and every such lattice sum equals the normalizer of ``Q``: the terms are exactly those of
  the continuous Gaussian (Mironov, Talwar, Zhang 2019), so ``D_alpha(P || Q)`` equals Opacus's RDP of the
  sampled Gaussian at noise multiplier ``S / |mu|``, which is largest at ``|mu| = Delta`` (tested against
  a direct sum over the lattice). The other direction, ``D_alpha(Q || P)``, is a lattice sum of a function
  smooth on the scale of ``S`` and differs from its integral by Poisson-summation terms of order
  ``exp(-2 pi^2 S^2 / alpha)``; for the Gaussian it is the smaller one (Mironov et al.), and the tests check
  that this holds on the lattice too.
* At this module's scales (``S = sqrt(t) sigma_c >= 2^14`` quantized units) both gaps are below
  ``10^-(10^8)``: :func:`sum_gap` reports them in log10. The clamp of each noise value at 12 of its
  standard deviations (:mod:`fedpersona.privacy.secagg.ddp`, so the modular sum cannot overflow) is within total
  variation ``2 d exp(-72)`` of the unclamped noise per device and step: it adds at most
  ``(1 + e^epsilon) * 2 d exp(-72)`` per honest device and step to delta (``clamp_delta`` of :func:`sum_gap`).

So the ledger steps ``(sigma, q)`` once per answered step (:meth:`fedpersona.privacy.ledger.PrivacyLedger.step_on_sum`,
integer orders), with ``t`` beside it: if ``j`` of the ``t`` collude with the server, only ``t - j`` shares
are guaranteed, noise multiplier ``sigma sqrt((t - j) / t)``, down to ``sigma / sqrt(t)`` for the device's
own share alone (:meth:`~fedpersona.privacy.ledger.PrivacyLedger.collusion`). The guarantee also assumes what secure
aggregation must give against a server that deviates (every party signs the round and the survivors;
keys bound to identities): the device policy refuses noise on the sum without it
(``fedpersona.client.policy._malicious_secure_ok``).

**Same parameters for every device of a sum.** ``sigma``, ``t``, ``C``, ``s``, ``G``, the normalizer's batch and
the dimension are derived here from the run config, the round, the step, the announced cohort and the
weights (:func:`sum_context`); each device derives them itself and refuses a request that names others.
``sigma`` is ``privacy.noise-multiplier`` when set, else the smallest noise that keeps a device with the
fewest training examples a config admits (:func:`reference_sample_rate`) within ``privacy.target-epsilon``
over the participations it plans (``client.max-participations``) of ``client.local-steps`` steps each; a
device with fewer examples (a larger q) finds it too small for its budget and declines.
:meth:`SumContext.to_bytes` is the canonical encoding of all of it, for the secure-aggregation round digest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from fedpersona.config import Config
from fedpersona.privacy.ledger import calibrate_noise
from fedpersona.privacy.secagg.crypto import encode_fields
from fedpersona.privacy.secagg.quantize import ExtraSpec
from fedpersona.privacy.secagg.spec import SecAggParams

__all__ = ["MAX_STDDEV", "STEP_STRIDE", "SumContext", "budget_passes", "collusion_factors", "honest_contributors", "normalizer",
           "reference_sample_rate", "step_round_id", "sum_context", "sum_extras", "sum_gap", "sum_noise_multiplier",
           "share_sum_log_bound", "sum_scale", "sum_secagg_params", "weights_digest"]

#: Secure-aggregation round id of a step: ``round * STEP_STRIDE + step`` (a step's sum is its own SecAgg+ round).
STEP_STRIDE = 1 << 16
#: Largest per-device noise stddev in quantized units (the exact sampler's range).
MAX_STDDEV = 2.0**20
#: Quantization: the rounding's share of the sensitivity, sqrt(d) / (s C), is kept at or below this.
ROUNDING_SHARE = 1e-3
_TAIL_SIGMAS = 12.0


def reference_sample_rate(cfg: Config) -> float:
    """q of a device with the fewest training examples the config admits (``data.min-examples``, capped at
    ``data.max-examples``, less its held-out share): the common sigma is calibrated for it."""
    n = min(cfg.data.min_examples, cfg.data.max_examples)
    n_train = n - min(n - 1, max(1, round(cfg.data.eval_fraction * n)))
    return min(1.0, cfg.client.batch_size / n_train)


@functools.lru_cache(maxsize=64)
def sum_noise_multiplier(cfg: Config) -> float:
    """sigma of every noisy sum of the run (see the module docstring); 0 with ``privacy.enabled = false``."""
    p = cfg.privacy
    if not p.enabled:
        return 0.0
    if p.noise_multiplier > 0:
        return float(p.noise_multiplier)
    return calibrate_noise(target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=reference_sample_rate(cfg),
                           steps=cfg.planned_participations * cfg.client.local_steps * budget_passes(cfg),
                           accountant="rdp", orders="integer")


def budget_passes(cfg: Config) -> int:
    """DP passes over a user's records per planned step, from the run config alone (server and devices agree):
    2 when the run also trains the local-only baseline (``eval.local-baseline``: a simulation replays every
    step of the device on the same records, and one budget covers both ledgers), else 1. A deployment's
    devices train no baseline; a config with ``eval.local-baseline = true`` still plans its noise for two
    passes there (the server cannot tell which devices are simulated): set it false in a deployment."""
    p, e = cfg.privacy, cfg.eval
    return 2 if (p.enabled and e.final and e.local_baseline) else 1


def honest_contributors(cfg: Config, cohort: int) -> int:
    """t of a sum over an announced cohort of ``cohort`` devices: ``privacy.honest-contributors``, or half of the
    cohort (at least 1) when that is 0."""
    if isinstance(cohort, bool) or int(cohort) != cohort or cohort < 1:
        raise ValueError(f"the announced cohort must be an integer >= 1. You passed: {cohort!r}")
    t = cfg.privacy.honest_contributors
    return int(t) if t > 0 else max(1, int(cohort) // 2)


def sum_scale(cfg: Config, *, sigma: float, honest: int, dim: int) -> float:
    """Quantized units per unit of gradient: ``secagg.scale``, or a power of two with sqrt(d) / (s C) at most
    :data:`ROUNDING_SHARE`, lowered while a device's noise stddev would exceed :data:`MAX_STDDEV` / 2."""
    if cfg.secagg.scale:
        return float(cfg.secagg.scale)
    c = cfg.privacy.max_grad_norm
    s = 2.0 ** math.ceil(math.log2(math.sqrt(dim) / (ROUNDING_SHARE * c)))
    while s > 1 and sigma * (s * c + math.sqrt(dim)) / math.sqrt(honest) > MAX_STDDEV / 2:
        s /= 2
    return s


def weights_digest(weights: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of the shared weights a step is computed at (names in sorted order, shapes, float32 values)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.digest()


@dataclass(frozen=True)
class SumContext:
    """Everything a noisy sum's mechanism depends on; every device of the sum derives the same."""

    round: int
    step: int
    steps: int
    cohort: int
    noise_multiplier: float
    honest: int
    clip: float
    scale: float
    sum_bound: float
    batch_size: int
    dim: int
    weights: str  # hex SHA-256 of the shared weights (weights_digest)

    @property
    def sensitivity(self) -> float:
        """Delta: L2 bound of one record's change to a device's rounded vector, in quantized units."""
        return self.scale * self.clip * (1 + 1e-9) + math.sqrt(self.dim)

    @property
    def device_stddev(self) -> float:
        """sigma_c: each device's discrete Gaussian stddev in quantized units (0 without DP)."""
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.honest)

    @property
    def secagg_round(self) -> int:
        return step_round_id(self.round, self.step)

    def to_record(self) -> dict[str, Any]:
        """The fields as a flat dict (a ``ConfigRecord`` carries it)."""
        return asdict(self)

    def digest(self) -> bytes:
        """SHA-256 of the fields (canonical JSON): the secure sum's ``context``, bound into its round digest,
        so every key, ciphertext and consistency signature of the step is for these very parameters."""
        return hashlib.sha256(json.dumps(self.to_record(), sort_keys=True).encode()).digest()

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SumContext":
        """A context from :meth:`to_record`'s fields; ``ValueError`` naming a missing or malformed field."""
        kinds = {f.name: f.type for f in fields(cls)}
        values = {}
        for name, kind in kinds.items():
            if name not in record:
                raise ValueError(f"the noisy-sum context lacks {name!r}. You passed fields: {sorted(record)}")
            v = record[name]
            try:
                values[name] = str(v) if kind == "str" else (int(v) if kind == "int" else float(v))
            except (TypeError, ValueError):
                raise ValueError(f"the noisy-sum context's {name!r} is malformed. You passed: {v!r}") from None
        return cls(**values)

    def to_bytes(self) -> bytes:
        """Canonical encoding (for the secure-aggregation round digest: every party signs the same mechanism)."""
        ints = [self.round, self.step, self.steps, self.cohort, self.honest, self.batch_size, self.dim]
        floats = [np.float64(x).tobytes() for x in (self.noise_multiplier, self.clip, self.scale, self.sum_bound)]
        return encode_fields("noisy-sum-context", *ints, *floats, bytes.fromhex(self.weights))

    def differences(self, other: "SumContext") -> dict[str, tuple[Any, Any]]:
        """Fields that differ: ``{name: (self's, other's)}``."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}


def step_round_id(server_round: int, step: int) -> int:
    """The secure-aggregation round id of step ``step`` (1-based) of ``server_round``."""
    if not 1 <= int(step) < STEP_STRIDE:
        raise ValueError(f"step must be in [1, {STEP_STRIDE}). You passed: {step!r}")
    return int(server_round) * STEP_STRIDE + int(step)


def sum_context(cfg: Config, *, round: int, step: int, cohort: int, weights: Mapping[str, torch.Tensor]) -> SumContext:
    """The parameters of step ``step`` of ``round`` over an announced cohort of ``cohort`` devices at ``weights``:
    the one place they are derived (server and devices alike)."""
    dim = int(sum(t.numel() for t in weights.values()))
    if dim < 1:
        raise ValueError("a noisy sum needs shared weights of at least one coordinate")
    sigma = sum_noise_multiplier(cfg)
    t = honest_contributors(cfg, cohort)
    c = cfg.privacy.max_grad_norm
    return SumContext(round=int(round), step=int(step), steps=cfg.client.local_steps, cohort=int(cohort),
                      noise_multiplier=float(sigma), honest=t, clip=float(c),
                      scale=sum_scale(cfg, sigma=sigma, honest=t, dim=dim),
                      sum_bound=float(c * cfg.data.max_examples), batch_size=cfg.client.batch_size, dim=dim,
                      weights=weights_digest(weights).hex())


def sum_extras() -> tuple[ExtraSpec, ...]:
    """What rides in a noisy sum beside the gradient: only ``trained`` (1 per device; the survivor count the
    server knows anyway). Batch sizes, losses and timings would need the same noise: they do not ride."""
    return (ExtraSpec("trained", bound=1.0, scale=1.0),)


@functools.lru_cache(maxsize=64)
def sum_secagg_params(cfg: Config, *, cohort: int, dim: int) -> SecAggParams:
    """The SecAgg+ settings of a noisy sum over an announced cohort of ``cohort`` devices of ``dim``
    coordinates (what :func:`sum_context` derives, less the round, step and weights): the sum bound G, the
    scale, each device's noise, plain rounding, and at least ``t`` survivors (with ``secagg.min-contributors``
    and ``server.min-clients``). ``ValueError`` when a device's noise stddev leaves the sampler's range."""
    ctx = sum_context(cfg, round=1, step=1, cohort=cohort, weights={"x": torch.zeros(int(dim))})
    s = cfg.secagg
    smallest = max(cfg.server.min_clients, s.min_contributors, ctx.honest, 2)
    noise = ctx.device_stddev
    if 0 < noise < 0.5:
        raise ValueError(f"Invalid config value for 'secagg.scale': a device's noise stddev would be {noise:.3g} "
                         f"quantized units (< 0.5): raise it. You passed: {s.scale!r}")
    if noise > MAX_STDDEV:
        raise ValueError(f"Invalid config value for 'secagg.scale': a device's noise stddev would be {noise:.4g} "
                         f"quantized units (> 2^20): lower it. You passed: {s.scale!r}")
    return SecAggParams(clip_norm=ctx.sum_bound, scale=ctx.scale, max_cohort=max(2, cfg.server.clients_per_round),
                        extras=sum_extras(), noise_stddev=noise, noise_tail_sigmas=_TAIL_SIGMAS, rounding_beta=0.0,
                        degree=s.degree or None, threshold=s.threshold or None, min_survivors=smallest)


def normalizer(ctx: SumContext, survivors: int) -> float:
    """The public divisor of a step's sum: the survivors' expected batch, ``survivors * client.batch-size``."""
    if survivors < 1:
        raise ValueError(f"a sum needs at least one survivor. You passed: {survivors!r}")
    return float(survivors * ctx.batch_size)


def collusion_factors(honest: int) -> list[tuple[int, float]]:
    """``(j, sqrt((t - j) / t))`` for ``j = 0 .. t - 1`` colluders: the noise multiplier's factor that remains."""
    return [(j, math.sqrt((honest - j) / honest)) for j in range(honest)]


def _log10_theta(s2: float) -> float:
    """log10 of theta = 2 sum_{m >= 1} exp(-2 pi^2 s2 m^2), for a lattice Gaussian of variance s2 (>= 1/4)."""
    a = 2 * math.pi**2 * s2
    # sum_m exp(-a m^2) <= exp(-a) / (1 - exp(-3a)) for a > 0
    return (math.log(2) - a - math.log1p(-math.exp(-3 * a))) / math.log(10)


def share_sum_log_bound(stddev: float, honest: int) -> float:
    """L_1: the bound on ``|log(pmf of a sum of honest i.i.d. N_Z(0, stddev^2) / pmf of N_Z(0, honest stddev^2))|``
    at any integer (one coordinate; natural log; 0.0 where it is below float resolution)."""
    if stddev < 0.5 or honest < 1:
        raise ValueError(f"the bound needs stddev >= 1/2 and honest >= 1. You passed: {stddev}, {honest}")
    total = 0.0
    for k in range(1, int(honest)):
        a = 2 * math.pi**2 * stddev**2 * k / (k + 1)
        theta = 2 * sum(math.exp(-a * m * m) for m in range(1, 64))
        total += math.log1p(theta) - math.log1p(-theta)
    return total


def sum_gap(ctx: SumContext, *, epsilon: float = 8.0, steps: int = 1) -> dict[str, float]:
    """How far the noisy sum is from the exact discrete Gaussian the ledger accounts (module docstring).

    ``log10_pointwise``: log10 of the bound L on ``|log(pmf of the sum of t shares / pmf of N_Z(0, t sigma_c^2))|``
    over all d coordinates; ``log10_rdp_per_step``: log10 of the RDP it adds per step at order alpha >= 2 (3 L);
    ``clamp_delta``: what the 12-sigma clamp adds to delta over ``steps`` steps of t honest devices at
    ``epsilon``. ``-inf`` where the term is below float resolution of its logarithm's argument.
    """
    sc2 = ctx.device_stddev**2
    if sc2 == 0:
        return {"log10_pointwise": -math.inf, "log10_rdp_per_step": -math.inf, "clamp_delta": 0.0}
    if sc2 < 0.25:
        raise ValueError(f"the bound needs sigma_c >= 1/2 quantized units. You passed: {math.sqrt(sc2)}")
    logs = []
    for k in range(1, ctx.honest):
        l10 = _log10_theta(sc2 * k / (k + 1))
        logs.append(l10 + math.log10(2.0) if l10 < -6 else math.log10(math.log((1 + 10**l10) / (1 - 10**l10))))
    if not logs:  # t = 1: the device's own share is an exact discrete Gaussian
        pointwise = -math.inf
    else:
        top = max(logs)
        pointwise = top + math.log10(sum(10 ** (x - top) for x in logs)) + math.log10(ctx.dim)
    per_step = pointwise + math.log10(3.0) if math.isfinite(pointwise) else -math.inf
    clamp = (1 + math.exp(epsilon)) * 2 * ctx.dim * math.exp(-_TAIL_SIGMAS**2 / 2) * ctx.honest * steps
    return {"log10_pointwise": pointwise, "log10_rdp_per_step": per_step, "clamp_delta": clamp}
