"""The final evaluation as a noised secure sum: the figures each device adds, their guarantee, and the summary.

No per-user figure leaves a device, and no exact one either. Each device turns its evaluation
row (held-out loss and accuracy of the base, shared, personalized and local-only models) into
one vector of bounded *summable* figures (:func:`encode`):

* ``users`` (1), and per model: ``{m}-users`` (1 if the device has that model's figures),
  ``{m}-loss`` (its per-user mean held-out loss, clipped to ``[0, LOSS_CAP]`` (10 nats), divided by
  ``LOSS_CAP``) and ``{m}-accuracy`` (in ``[0, 1]``);
* one-hot histograms in fixed bins of each model's per-user loss and of the gain
  ``base-loss - model-loss`` of the shared, personalized and local-only models, from which
  the median and the worst decile are read.

Every coordinate is in ``[0, 1]``, so one device's vector has L2 norm at most
:func:`sensitivity` (``sqrt(20)``). It is summed with the same SecAgg+ machinery as a
training round (message type ``evaluate``), and every device adds discrete Gaussian noise
before masking (:mod:`fedpersona.privacy.secagg.ddp`): the sum of at least :func:`eval_min_clients`
devices carries noise of standard deviation ``eval.noise-multiplier x sensitivity`` on every
coordinate, so the release is user-level (epsilon, delta)-DP (whole-user adjacency: one device's
figures in or out of the sum) with the epsilon of :func:`eval_epsilon` at ``secagg.ddp-delta``,
which each device records in its ledger (:func:`record_eval`) before its reply leaves. With
secure aggregation off, each device adds the whole noise itself (local DP, ``min-clients`` 1).

The server derives the summary from the noised totals (:func:`summarize`): means of the
per-user figures, and the median and worst decile from the noised histograms (counts rounded,
negatives read as 0), so with few devices they are coarse.

The layout depends only on the run config, so both sides derive it (:func:`eval_params`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from fedpersona.config import Config
from fedpersona.privacy.secagg.ddp import ddp_epsilon, local_noise_stddev
from fedpersona.privacy.secagg.quantize import ExtraSpec, Quantizer
from fedpersona.privacy.secagg.spec import SecAggParams

if TYPE_CHECKING:  # the ledger module loads Opacus and torch; only its type is named here
    from fedpersona.privacy.ledger import PrivacyLedger

__all__ = ["EVAL_MAX_COHORT", "EVAL_MECHANISM", "FIGURES", "GAINS", "HISTOGRAMS", "LOSS_CAP", "MODELS", "encode",
           "eval_epsilon", "eval_mechanism", "eval_min_clients", "eval_params", "extras_specs", "histogram_length",
           "noise_stddev", "noised_plain", "record_eval", "sensitivity", "summarize", "vector_fields"]

MODELS = ("base", "shared", "personal", "local")
GAINS = ("shared", "personal", "local")
#: The largest number of devices in one evaluation sum (fixes its modulus; every device derives it).
EVAL_MAX_COHORT = 2**16
#: Per-user mean losses are clipped to [0, LOSS_CAP] nats per token and sent as loss / LOSS_CAP.
LOSS_CAP = 10.0
#: Quantized units per unit of a figure (the rounding error of a total is < devices / 2^12).
EVAL_SCALE = 2.0**12
#: Mechanism label of the evaluation's entries in a device's privacy ledger.
EVAL_MECHANISM = "secagg-eval-ddg"


@dataclass(frozen=True)
class Histogram:
    """Fixed bins ``[lo + i w, lo + (i+1) w)``, ``i < bins``, plus an underflow (< lo) and an overflow (>= hi) bin."""

    name: str
    lo: float
    width: float
    bins: int

    @property
    def size(self) -> int:
        return self.bins + 2

    @property
    def hi(self) -> float:
        return self.lo + self.width * self.bins

    def index(self, value: float) -> int:
        if value < self.lo:
            return 0
        if value >= self.hi:
            return self.bins + 1
        return 1 + min(self.bins - 1, int((value - self.lo) // self.width))

    def centre(self, i: int) -> float:
        if i == 0:
            return self.lo
        if i == self.bins + 1:
            return self.hi
        return self.lo + (i - 0.5) * self.width


#: Per-user loss in 0.1-nat bins up to 10 nats; gain over the base in 0.02-nat bins in [-1, 1).
HISTOGRAMS = tuple([Histogram(f"{m}-loss", 0.0, 0.1, 100) for m in MODELS]
                   + [Histogram(f"{m}-gain", -1.0, 0.02, 100) for m in GAINS])
#: The scalar figures, in vector order, before the histograms.
FIGURES = ("users",) + tuple(f"{m}-{k}" for m in MODELS for k in ("users", "loss", "accuracy"))


def histogram_length() -> int:
    """Length of a device's evaluation vector: the figures, then the histograms."""
    return len(FIGURES) + sum(h.size for h in HISTOGRAMS)


def vector_fields() -> tuple[tuple[str, int], ...]:
    """The named parts of a device's evaluation vector, in order, with their lengths (what the message table lists)."""
    return tuple((f, 1) for f in FIGURES) + tuple((f"{h.name} histogram", h.size) for h in HISTOGRAMS)


def sensitivity() -> float:
    """L2 bound of one device's vector: every figure and one bin per histogram at most 1."""
    return math.sqrt(len(FIGURES) + len(HISTOGRAMS))


def extras_specs(cfg: Config) -> tuple[ExtraSpec, ...]:
    """No exact extras: every figure is in the noised vector."""
    return ()


def eval_min_clients(cfg: Config) -> int:
    """The fewest devices whose noise is in a released evaluation sum (the server aborts, devices refuse, below it)."""
    return max(cfg.secagg.min_contributors, cfg.server.min_clients, 2)


def _total_stddev(cfg: Config) -> float:
    """Standard deviation of the noise on each coordinate of the released total, in quantized units."""
    return cfg.eval.noise_multiplier * sensitivity() * EVAL_SCALE


def eval_params(cfg: Config, *, min_clients: int | None = None) -> SecAggParams:
    """SecAgg+ settings of the evaluation sum (``min_clients`` 1: a device's noise without secure aggregation)."""
    t = eval_min_clients(cfg) if min_clients is None else int(min_clients)
    return SecAggParams(clip_norm=sensitivity() * (1 + 1e-9), scale=EVAL_SCALE, max_cohort=EVAL_MAX_COHORT,
                        extras=(), noise_stddev=local_noise_stddev(_total_stddev(cfg), t),
                        min_survivors=max(t, 2))


def eval_epsilon(cfg: Config, *, releases: int = 1, min_clients: int | None = None) -> float:
    """User-level epsilon (at ``secagg.ddp-delta``) of ``releases`` evaluation sums of this config."""
    t = eval_min_clients(cfg) if min_clients is None else int(min_clients)
    q = eval_params(cfg, min_clients=t).quantizer
    dim = histogram_length()
    return ddp_epsilon(noise_stddev_quantized=q.noise_stddev, l2_sensitivity_quantized=q.l2_sensitivity(dim),
                       num_clients=t, dim=dim, delta=cfg.secagg.ddp_delta, rounds=releases)


def eval_mechanism(cfg: Config, *, min_clients: int | None = None) -> str:
    """Ledger label: the mechanism and every parameter its epsilon depends on."""
    t = eval_min_clients(cfg) if min_clients is None else int(min_clients)
    return (f"{EVAL_MECHANISM}(noise-multiplier={cfg.eval.noise_multiplier:g}, sensitivity={sensitivity():.4g}, "
            f"scale={EVAL_SCALE:g}, min-clients={t}, dim={histogram_length()})")


def record_eval(ledger: PrivacyLedger, cfg: Config, *, round: int, min_clients: int | None = None) -> dict:
    """Add this evaluation's user-level entry to ``ledger``: the epsilon over every evaluation this device sent.

    Releases of the same mechanism compose in RDP; entries of other settings add their last epsilon
    (basic composition, conservative) and their delta.
    """
    label = eval_mechanism(cfg, min_clients=min_clients)
    entries = ledger.user_level_entries
    same = sum(1 for e in entries if e["mechanism"] == label)
    others: dict[str, dict] = {}
    for e in entries:
        if e["mechanism"].startswith(EVAL_MECHANISM) and e["mechanism"] != label:
            others[e["mechanism"]] = e
    eps = eval_epsilon(cfg, releases=same + 1, min_clients=min_clients) + sum(e["epsilon"] for e in others.values())
    delta = cfg.secagg.ddp_delta + sum(e["delta"] for e in others.values())
    return ledger.record_user_level(round=round, epsilon=float(eps) if math.isfinite(eps) else 1e9,
                                    delta=min(delta, 0.999999), mechanism=label)


def _finite(row: Mapping[str, float], key: str) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def encode(cfg: Config, row: Mapping[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    """(vector, no extras) of one device's evaluation row (keys ``base-loss``, ``base-accuracy``, ...), un-noised."""
    fig = dict.fromkeys(FIGURES, 0.0)
    fig["users"] = 1.0
    values: dict[str, float | None] = {f"{m}-loss": _finite(row, f"{m}-loss") for m in MODELS}
    base = values["base-loss"]
    for m in GAINS:
        v = values[f"{m}-loss"]
        values[f"{m}-gain"] = None if base is None or v is None else base - v
    for m in MODELS:
        loss, acc = values[f"{m}-loss"], _finite(row, f"{m}-accuracy")
        if loss is None or acc is None:
            continue
        fig[f"{m}-users"] = 1.0
        fig[f"{m}-loss"] = min(max(loss, 0.0), LOSS_CAP) / LOSS_CAP
        fig[f"{m}-accuracy"] = min(max(acc, 0.0), 1.0)
    hist = []
    for h in HISTOGRAMS:
        part = np.zeros(h.size)
        v = values[h.name]
        if v is not None:
            part[h.index(v)] = 1.0
        hist.append(part)
    vec = np.concatenate([np.asarray([fig[k] for k in FIGURES], dtype=np.float64), *hist])
    return vec, {}


def noised_plain(cfg: Config, row: Mapping[str, float]) -> np.ndarray:
    """The vector with this device's whole noise added (secure aggregation off: nothing hides it in a sum)."""
    from fedpersona.privacy.secagg.crypto import SecureRNG
    from fedpersona.privacy.secagg.quantize import from_ring

    vec, _ = encode(cfg, row)
    q: Quantizer = eval_params(cfg, min_clients=1).quantizer
    return from_ring(q.encode(vec, {}, SecureRNG()), q.bits).astype(np.float64) / q.scale


def _quantile_from(hist: Histogram, counts: np.ndarray) -> dict[str, float]:
    counts = np.maximum(np.rint(counts), 0).astype(np.int64)  # noised counts: rounded, negatives read as 0
    n = int(counts.sum())
    if n == 0:
        return {"median": math.nan, "worst_decile": math.nan, "n": 0}
    centres = np.array([hist.centre(i) for i in range(hist.size)])
    values = np.repeat(centres, counts)  # the sorted per-bin centres, no device order
    mid = values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
    k = max(1, math.ceil(n / 10))
    worst = values[:k] if hist.name.endswith("-gain") else values[-k:]  # worst: highest loss, lowest gain
    return {"median": float(mid), "worst_decile": float(worst.mean()), "n": n}


def noise_stddev(cfg: Config) -> float:
    """Standard deviation of the noise on each released total, in figure units (at least this much)."""
    return cfg.eval.noise_multiplier * sensitivity()


def summarize(vec: np.ndarray, extras: Mapping[str, float] | None = None, *,
              noise_sd: float = 0.0) -> dict[str, dict[str, float]]:
    """The report's summary from the noised totals alone (``extras``: unused, kept for the interface).

    A model is summarized only when its noised device count is at least 3 ``noise_sd`` (the noise's
    standard deviation, :func:`noise_stddev`): below that its figures would be mostly noise.
    """
    vec = np.asarray(vec, dtype=np.float64)
    if vec.size != histogram_length():
        raise ValueError(f"an evaluation total has {histogram_length()} coordinates. You passed: {vec.size}")
    fig = dict(zip(FIGURES, vec[:len(FIGURES)].tolist()))
    hist = {}
    offset = len(FIGURES)
    for h in HISTOGRAMS:
        hist[h.name] = (h, vec[offset:offset + h.size])
        offset += h.size
    out: dict[str, dict[str, float]] = {}
    floor = max(0.5, 3.0 * noise_sd)
    for m in MODELS:
        n = fig[f"{m}-users"]
        if n < floor:  # too few devices hold this model for its noised figures to say anything
            continue
        h, counts = hist[f"{m}-loss"]
        out[f"{m}-loss"] = {"mean": fig[f"{m}-loss"] * LOSS_CAP / n, **_quantile_from(h, counts), "n": int(round(n))}
        out[f"{m}-accuracy"] = {"mean": fig[f"{m}-accuracy"] / n, "n": int(round(n))}
    for m in GAINS:
        h, counts = hist[f"{m}-gain"]
        q = _quantile_from(h, counts)
        if q["n"] > 0 and f"{m}-loss" in out and "base-loss" in out:
            better = np.maximum(np.rint(counts[h.index(1e-12):]), 0).sum()
            out[f"{m}-gain"] = {"mean": out["base-loss"]["mean"] - out[f"{m}-loss"]["mean"], **q,
                                "better": int(better)}
    out["users"] = {"n": int(max(0, round(fig["users"]))), "noise_sd": float(noise_sd), "reported_from": floor}
    return out
