"""The final evaluation as a secure sum: the figures each device adds, and the summary read from their totals.

No per-user figure leaves a device. Each device turns its evaluation row (held-out loss,
accuracy and token counts of the base, shared, personalized and local-only models, its epsilon)
into one vector of *summable* figures (:func:`encode`), masked with the same SecAgg+ machinery
as a training round (message type ``evaluate``); the server learns only the totals over at
least ``secagg.min-contributors`` devices and derives the report from them (:func:`summarize`):

* extras (exact sums): devices evaluated; per model the number of devices with a figure, the sum
  of per-user mean losses and accuracies (-> the mean over users), the sum of token losses,
  token counts and correct predictions (-> the token-weighted loss and accuracy); the sums of
  epsilons (federated DP-SGD ledger, and the local-only baseline's own ledger);
* the vector: one-hot histograms in fixed bins of each model's per-user loss and of the gain
  ``base-loss - model-loss`` of the shared, personalized and local-only models, from which the
  median and the worst decile are read (bin centres: exact to half a bin width).

The layout depends only on the run config, so both sides derive it (:func:`eval_params`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fedpersona.config import Config
from privacy.secagg.quantize import ExtraSpec
from privacy.secagg.spec import SecAggParams

__all__ = ["EVAL_MAX_COHORT", "GAINS", "MODELS", "HISTOGRAMS", "encode", "eval_params", "extras_specs",
           "histogram_length", "summarize"]

MODELS = ("base", "shared", "personal", "local")
GAINS = ("shared", "personal", "local")
#: The largest number of devices in one evaluation sum (fixes its modulus; every device derives it).
EVAL_MAX_COHORT = 2**16
_LOSS_BOUND = 100.0
_METRIC_SCALE = 2.0**12


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


HISTOGRAMS = tuple([Histogram(f"{m}-loss", 0.0, 0.05, 300) for m in MODELS]
                   + [Histogram(f"{m}-gain", -1.0, 0.01, 200) for m in GAINS])


def histogram_length() -> int:
    return sum(h.size for h in HISTOGRAMS)


def extras_specs(cfg: Config) -> tuple[ExtraSpec, ...]:
    """The exact sums of the evaluation (names as :func:`encode` fills them)."""
    tokens = float(cfg.data.max_examples * cfg.model.seq_len)
    specs = [ExtraSpec("users", bound=1.0, scale=1.0)]
    for m in MODELS:
        specs += [ExtraSpec(f"{m}-users", bound=1.0, scale=1.0),
                  ExtraSpec(f"{m}-loss", bound=_LOSS_BOUND, scale=_METRIC_SCALE),
                  ExtraSpec(f"{m}-accuracy", bound=1.0, scale=2.0**16),
                  ExtraSpec(f"{m}-token-loss", bound=_LOSS_BOUND * tokens, scale=2.0**6),
                  ExtraSpec(f"{m}-tokens", bound=tokens, scale=1.0),
                  ExtraSpec(f"{m}-correct", bound=tokens, scale=1.0)]
    for e in ("epsilon", "local-epsilon"):
        specs += [ExtraSpec(f"{e}-users", bound=1.0, scale=1.0), ExtraSpec(e, bound=1000.0, scale=_METRIC_SCALE)]
    specs += [ExtraSpec("trained-users", bound=1.0, scale=1.0), ExtraSpec("rounds", bound=2.0**20, scale=1.0)]
    return tuple(specs)


def eval_params(cfg: Config) -> SecAggParams:
    """SecAgg+ settings of the evaluation sum: histograms in the vector (exact counts), figures as extras."""
    h = len(HISTOGRAMS)
    return SecAggParams(clip_norm=math.sqrt(h) * (1 + 1e-9), scale=1.0, max_cohort=EVAL_MAX_COHORT,
                        extras=extras_specs(cfg), min_survivors=max(cfg.secagg.min_contributors, cfg.server.min_clients, 2))


def _finite(row: Mapping[str, float], key: str) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def encode(cfg: Config, row: Mapping[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    """(histogram vector, extras) of one device's evaluation row (keys ``base-loss``, ``base-accuracy``, ...)."""
    vec = np.zeros(histogram_length(), dtype=np.float64)
    extras = {e.name: 0.0 for e in extras_specs(cfg)}
    extras["users"] = 1.0
    offset = 0
    values: dict[str, float | None] = {f"{m}-loss": _finite(row, f"{m}-loss") for m in MODELS}
    base = values["base-loss"]
    for m in GAINS:
        v = values[f"{m}-loss"]
        values[f"{m}-gain"] = None if base is None or v is None else base - v
    for hist in HISTOGRAMS:
        v = values[hist.name]
        if v is not None:
            vec[offset + hist.index(v)] = 1.0
        offset += hist.size
    for m in MODELS:
        loss, acc, tokens = values[f"{m}-loss"], _finite(row, f"{m}-accuracy"), _finite(row, f"{m}-tokens")
        if loss is None or acc is None:
            continue
        extras[f"{m}-users"] = 1.0
        extras[f"{m}-loss"] = loss
        extras[f"{m}-accuracy"] = acc
        if tokens:
            extras[f"{m}-token-loss"] = loss * tokens
            extras[f"{m}-tokens"] = tokens
            extras[f"{m}-correct"] = float(round(acc * tokens))
    for e in ("epsilon", "local-epsilon"):
        v = _finite(row, e)
        if v is not None and v >= 0:
            extras[f"{e}-users"] = 1.0
            extras[e] = v
    rounds = _finite(row, "rounds")
    if rounds:
        extras["trained-users"] = 1.0
        extras["rounds"] = rounds
    return vec, extras


def _quantile_from(hist: Histogram, counts: np.ndarray) -> dict[str, float]:
    n = int(round(float(counts.sum())))
    if n == 0:
        return {"median": math.nan, "worst_decile": math.nan, "n": 0}
    counts = np.rint(counts).astype(np.int64)
    centres = np.array([hist.centre(i) for i in range(hist.size)])
    values = np.repeat(centres, np.maximum(counts, 0))  # the sorted per-bin centres, no device order
    mid = values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
    k = max(1, math.ceil(n / 10))
    worst = values[:k] if hist.name.endswith("-gain") else values[-k:]  # worst: highest loss, lowest gain
    return {"median": float(mid), "worst_decile": float(worst.mean()), "n": n}


def summarize(vec: np.ndarray, extras: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The report's summary from the totals alone (mean: exact; median and worst decile: from the bins)."""
    vec = np.asarray(vec, dtype=np.float64)
    hist = {}
    offset = 0
    for h in HISTOGRAMS:
        hist[h.name] = (h, vec[offset:offset + h.size])
        offset += h.size
    out: dict[str, dict[str, float]] = {}
    for m in MODELS:
        n = int(round(extras.get(f"{m}-users", 0.0)))
        if n == 0:
            continue
        h, counts = hist[f"{m}-loss"]
        tokens = extras.get(f"{m}-tokens", 0.0)
        out[f"{m}-loss"] = {"mean": extras[f"{m}-loss"] / n, **_quantile_from(h, counts), "n": n,
                            "token_mean": extras[f"{m}-token-loss"] / tokens if tokens else math.nan}
        out[f"{m}-accuracy"] = {"mean": extras[f"{m}-accuracy"] / n, "n": n,
                                "token_mean": extras[f"{m}-correct"] / tokens if tokens else math.nan}
    for m in GAINS:
        h, counts = hist[f"{m}-gain"]
        if counts.sum() > 0:
            n = int(round(float(counts.sum())))
            out[f"{m}-gain"] = {"mean": out.get("base-loss", {}).get("mean", math.nan)
                                - out.get(f"{m}-loss", {}).get("mean", math.nan), **_quantile_from(h, counts),
                                "better": int(round(float(counts[h.index(1e-12):].sum()))), "n": n}
    for e in ("epsilon", "local-epsilon"):
        n = int(round(extras.get(f"{e}-users", 0.0)))
        out[e] = {"mean": extras.get(e, 0.0) / n if n else math.nan, "n": n}
    out["users"] = {"n": int(round(extras.get("users", 0.0))), "trained": int(round(extras.get("trained-users", 0.0))),
                    "rounds_mean": extras.get("rounds", 0.0) / max(1.0, extras.get("trained-users", 0.0))}
    return out
