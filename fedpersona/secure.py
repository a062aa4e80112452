"""What the ServerApp and the ClientApp agree on for secure aggregation (SecAgg+, :mod:`privacy.secagg`).

Both sides derive everything from the run's :class:`~fedpersona.config.Config`, so nothing here
is negotiated over the wire (and a client checks the server's round parameters against it):

* :func:`secagg_config`: the protocol settings: clip norm, scale, the modulus (fixed by the
  largest cohort, ``server.clients-per-round``), graph degree and threshold, and the per-client
  distributed-DP noise when ``secagg.ddp`` is on;
* :func:`extras_specs`: the scalars masked together with the update (example count, ``trained``,
  ``clipped``, the training metrics): the server learns only their cohort totals;
* :func:`flatten` / :func:`unflatten`: the vector layout, shared tensors in sorted-name order;
* :func:`to_records` / :func:`from_records`: a protocol payload (a dict of ints, bytes and 1-D
  arrays) as Flower records, a ``ConfigRecord`` named ``secagg`` and an ``ArrayRecord`` named
  ``secagg-arrays`` (integers travel as ``uint64``: Flower node ids use all 64 bits);
* :func:`ddp_user_epsilon` / :func:`record_ddp`: the user-level epsilon of the distributed
  discrete Gaussian, and its entry in a device's privacy ledger.

A client's weight is ``n / data.max-examples`` (``n`` its training examples), so what it adds to
the sum, ``weight * (new - old)``, has norm ``<= secagg.clip-norm`` after clipping and the
server's mean ``sum / sum(weight)`` is the example-weighted FedAvg mean.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpersona.config import Config
from privacy.secagg import ExtraSpec, SecAggConfig, ddp_epsilon, local_noise_stddev

__all__ = [
    "ADVERTISE",
    "ARRAYS",
    "RECORD",
    "SELF_ENC_PK",
    "SELF_MASK_PK",
    "UNMASK",
    "ddp_min_clients",
    "ddp_user_epsilon",
    "extras_specs",
    "flatten",
    "from_records",
    "has_request",
    "record_ddp",
    "secagg_config",
    "to_records",
    "unflatten",
]

RECORD = "secagg"
ARRAYS = "secagg-arrays"
#: Message types of the two exchanges secure aggregation adds (the masked input rides on ``train``).
ADVERTISE = "query.advertise"
UNMASK = "query.unmask"
#: Fields the server adds to a node's masked-input request: the public keys it registered for the
#: node, so that a device whose keys changed since it advertised fails clearly (its masks would
#: not cancel and the sum would be garbage).
SELF_ENC_PK, SELF_MASK_PK = "self_enc_pk", "self_mask_pk"
#: Mechanism label of distributed-DP entries in a device's privacy ledger.
DDP_MECHANISM = "secagg-ddg"

_METRIC_SCALE = 2.0**12  # losses and epsilons: per-client rounding error < 2.5e-4
_LOSS_BOUND = 100.0


def extras_specs(cfg: Config) -> tuple[ExtraSpec, ...]:
    """The named scalars each client masks with its update (names as :meth:`Device.train_round` returns them)."""
    specs = [
        ExtraSpec("examples", bound=float(cfg.data.max_examples), scale=1.0),
        ExtraSpec("trained", bound=1.0, scale=1.0),
        ExtraSpec("clipped", bound=1.0, scale=1.0),
        ExtraSpec("train-loss", bound=_LOSS_BOUND, scale=_METRIC_SCALE),
        ExtraSpec("epsilon", bound=1000.0, scale=_METRIC_SCALE),
        ExtraSpec("empty-steps", bound=float(cfg.client.local_steps), scale=1.0),
        ExtraSpec("train-seconds", bound=86400.0, scale=2.0**6),
    ]
    if cfg.eval.per_round:
        specs += [ExtraSpec("heldout-shared-loss", bound=_LOSS_BOUND, scale=_METRIC_SCALE),
                  ExtraSpec("heldout-personal-loss", bound=_LOSS_BOUND, scale=_METRIC_SCALE)]
    return tuple(specs)


def ddp_min_clients(cfg: Config) -> int:
    """n_min: the fewest clients whose noise is in every released sum (the round is refused with fewer)."""
    return max(2, cfg.secagg.ddp_min_clients or cfg.server.min_clients)


#: Default quantization scale: the summed update is exact to < cohort / 2^20 per coordinate.
DEFAULT_SCALE = 2.0**20
#: With distributed DP and ``secagg.scale = 0``: per-client noise stddev at most this many units
#: (rounding, +-1 unit, is then negligible next to the noise; the sampler takes stddevs up to 2^20).
DDP_TARGET_STDDEV = 2.0**16
MAX_DDP_STDDEV = 2.0**20


def _ddp_stddev(cfg: Config, scale: float) -> float:
    """Per-client discrete Gaussian stddev in quantized units."""
    s = cfg.secagg
    return local_noise_stddev(s.ddp_noise_multiplier * s.clip_norm * scale, ddp_min_clients(cfg))


def quantization_scale(cfg: Config) -> float:
    """``secagg.scale``, or the automatic choice when it is 0 (see :class:`~fedpersona.config.SecAggSettings`)."""
    s = cfg.secagg
    if s.scale:
        return float(s.scale)
    if not s.ddp:
        return DEFAULT_SCALE
    per_unit = _ddp_stddev(cfg, 1.0)
    return float(2.0 ** min(20, max(0, math.floor(math.log2(DDP_TARGET_STDDEV / per_unit)))))


@functools.lru_cache(maxsize=16)
def secagg_config(cfg: Config) -> SecAggConfig:
    s = cfg.secagg
    scale = quantization_scale(cfg)
    noise = 0.0
    # The smallest sum the server may learn: server.min-clients (and n_min under distributed DP);
    # clients refuse to unmask fewer. (The Shamir threshold t is a floor in any case.)
    smallest = cfg.server.min_clients
    if s.ddp:
        noise = _ddp_stddev(cfg, scale)
        if not 0.5 <= noise <= MAX_DDP_STDDEV:
            raise ValueError(f"each client's noise stddev would be {noise:.4g} quantized units; it must be in "
                             f"[0.5, 2^20]: change secagg.scale (0 picks one), secagg.clip-norm or "
                             f"secagg.ddp-noise-multiplier")
        smallest = max(smallest, ddp_min_clients(cfg))
    min_survivors = smallest if smallest > 2 else None
    return SecAggConfig(clip_norm=s.clip_norm, scale=scale, max_cohort=max(2, cfg.server.clients_per_round),
                        extras=extras_specs(cfg), noise_stddev=noise, degree=s.degree or None,
                        threshold=s.threshold or None, min_survivors=min_survivors)


# --------------------------------------------------------------------------- vector layout
def flatten(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The tensors in sorted-name order as one float64 vector."""
    if not tensors:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([tensors[n].detach().cpu().reshape(-1).double().numpy() for n in sorted(tensors)])


def unflatten(vec: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` with the names, shapes and dtypes of ``like``."""
    out, i = {}, 0
    for n in sorted(like):
        t = like[n]
        k = t.numel()
        out[n] = torch.from_numpy(np.asarray(vec[i:i + k], dtype=np.float64).copy()).reshape(t.shape).to(t.dtype)
        i += k
    if i != len(vec):
        raise ValueError(f"vector has {len(vec)} coordinates, the shared tensors {i}")
    return out


# --------------------------------------------------------------------------- record codec
def to_records(payload: Mapping[str, Any]) -> dict[str, ConfigRecord | ArrayRecord]:
    """A protocol payload as the ``secagg`` ConfigRecord (scalars, bytes) and ``secagg-arrays`` ArrayRecord."""
    config, arrays = {}, ArrayRecord()
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        elif isinstance(value, (bool, np.bool_)):
            config[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            config[key] = int(value)
        elif isinstance(value, (float, np.floating, bytes, str)):
            config[key] = value if isinstance(value, (bytes, str)) else float(value)
        else:
            raise TypeError(f"secagg payload field {key!r} has unsupported type {type(value).__name__}")
    return {RECORD: ConfigRecord(config), ARRAYS: arrays}


def has_request(content: RecordDict) -> bool:
    return RECORD in content.config_records


def from_records(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`to_records`; ``KeyError`` naming the record if it is absent."""
    if RECORD not in content.config_records:
        raise KeyError(f"the message carries no '{RECORD}' record")
    out: dict[str, Any] = dict(content.config_records[RECORD].items())
    if ARRAYS in content.array_records:
        for key, arr in content.array_records[ARRAYS].items():
            out[key] = arr.numpy()
    return out


# --------------------------------------------------------------------------- distributed DP
def ddp_user_epsilon(cfg: Config, *, dim: int, rounds: int) -> float:
    """User-level epsilon (at ``secagg.ddp-delta``) of ``rounds`` noisy sums of ``dim`` coordinates.

    Assumes what :mod:`privacy.secagg.ddp` states: an honest-but-curious server that sees only
    the sum, at least :func:`ddp_min_clients` non-colluding clients' noise in every sum.
    """
    sa = secagg_config(cfg)
    q = sa.quantizer
    return ddp_epsilon(noise_stddev_quantized=q.noise_stddev, l2_sensitivity_quantized=q.l2_sensitivity(dim),
                       num_clients=ddp_min_clients(cfg), dim=dim, delta=cfg.secagg.ddp_delta, rounds=rounds)


def ddp_mechanism(cfg: Config, dim: int) -> str:
    """Ledger label: the mechanism and every parameter its epsilon depends on."""
    s = cfg.secagg
    return (f"{DDP_MECHANISM}(noise-multiplier={s.ddp_noise_multiplier:g}, clip={s.clip_norm:g}, "
            f"scale={quantization_scale(cfg):g}, min-clients={ddp_min_clients(cfg)}, dim={dim})")


def record_ddp(ledger, cfg: Config, *, dim: int, round: int) -> dict:
    """Add this round's user-level entry to ``ledger``: the epsilon over every round this user sent noise.

    Rounds with the same mechanism compose in RDP; entries of other parameter settings (an
    earlier run of the device with another config) add their last epsilon on top (basic
    composition, conservative) and their delta.
    """
    label = ddp_mechanism(cfg, dim)
    entries = ledger.user_level_entries
    same = sum(1 for e in entries if e["mechanism"] == label)
    others: dict[str, dict] = {}
    for e in entries:
        if e["mechanism"].startswith(DDP_MECHANISM) and e["mechanism"] != label:
            others[e["mechanism"]] = e  # the last (cumulative) entry of each other setting
    eps = ddp_user_epsilon(cfg, dim=dim, rounds=same + 1) + sum(e["epsilon"] for e in others.values())
    delta = cfg.secagg.ddp_delta + sum(e["delta"] for e in others.values())
    return ledger.record_user_level(round=round, epsilon=float(eps) if math.isfinite(eps) else 1e9,
                                    delta=min(delta, 0.999999), mechanism=label)
