"""The secure-aggregation settings both apps derive from the run config (SecAgg+, :mod:`fedpersona.privacy.secagg`).

Both sides derive everything from the run's :class:`~fedpersona.config.Config`, so nothing here
is negotiated over the wire (and a client checks the server's round parameters against it):

* :func:`secagg_params`: the protocol settings: clip norm, scale, the modulus (fixed by the
  largest cohort, ``server.clients-per-round``), graph degree and threshold, and the per-client
  distributed-DP noise when ``secagg.ddp`` is on;
* :func:`extras_specs`: the scalars masked together with the update: ``trained`` (1 for every device
  that sends a masked input, so its total is the number of survivors, which the server knows anyway),
  nothing else: no example count, loss, epsilon or timing rides in the sum (:mod:`fedpersona.privacy.audit.message_table`);
* :func:`ddp_user_epsilon` / :func:`record_ddp`: the user-level epsilon of the distributed
  discrete Gaussian, and its entry in a device's privacy ledger.

Every device's weight is 1, public: what it adds to the sum is its update ``new - old``, clipped to
``secagg.clip-norm``, and the server divides the sum by the number of survivors (which it knows), so
no figure of the release depends on a device's example count.

The vector layout and the record codec are :mod:`fedpersona.secagg_wire`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from fedpersona.config import Config
from fedpersona.privacy.secagg.ddp import ddp_epsilon, local_noise_stddev
from fedpersona.privacy.secagg.spec import SecAggParams
from fedpersona.privacy.secagg.quantize import ExtraSpec

if TYPE_CHECKING:  # the ledger module loads Opacus and torch; only its type is named here
    from fedpersona.privacy.ledger import PrivacyLedger

__all__ = ["DDP_MECHANISM", "ddp_mechanism", "ddp_min_clients", "ddp_user_epsilon", "extras_specs",
           "quantization_scale", "record_ddp", "secagg_params"]

#: Mechanism label of distributed-DP entries in a device's privacy ledger.
DDP_MECHANISM = "secagg-ddg"

def extras_specs(cfg: Config) -> tuple[ExtraSpec, ...]:
    """The named scalars each client masks with its update: ``trained`` only (a constant 1 per sender).

    Each row of :data:`fedpersona.privacy.audit.message_table.TABLE` for ``train`` names one of them; a scalar
    added here without its row fails ``tests/privacy/test_message_table.py``.
    """
    return (ExtraSpec("trained", bound=1.0, scale=1.0),)


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
def secagg_params(cfg: Config) -> SecAggParams:
    """The protocol settings of the run; ``ValueError`` naming ``secagg.scale`` when they cannot be met.

    The cohort size fixes the graph and the modulus, so this is the cross-section check of
    ``secagg.*`` that :func:`fedpersona.config.load_config` (ranges only) leaves to the protocol.
    """
    try:
        return _derive(cfg)
    except ValueError as exc:
        s = cfg.secagg
        raise ValueError(f"Invalid config value for 'secagg.scale': with secagg.clip-norm={s.clip_norm} and cohorts "
                         f"of {cfg.server.clients_per_round}: {str(exc).rstrip('.')}. You passed: {s.scale!r}") from None


def _derive(cfg: Config) -> SecAggParams:
    s = cfg.secagg
    scale = quantization_scale(cfg)
    noise = 0.0
    # The smallest sum the server may learn: secagg.min-contributors and server.min-clients (and n_min
    # under distributed DP); declining devices take no part in masking, so survivors are devices that
    # trained; the server aborts before any unmask request with fewer, and clients refuse to unmask fewer. (The Shamir threshold t is a floor in any case.)
    smallest = max(cfg.server.min_clients, s.min_contributors)
    if s.ddp:
        noise = _ddp_stddev(cfg, scale)
        if not 0.5 <= noise <= MAX_DDP_STDDEV:
            raise ValueError(f"each client's noise stddev would be {noise:.4g} quantized units; it must be in "
                             f"[0.5, 2^20]: change secagg.scale (0 picks one), secagg.clip-norm or "
                             f"secagg.ddp-noise-multiplier")
        smallest = max(smallest, ddp_min_clients(cfg))
    min_survivors = smallest if smallest > 2 else None
    return SecAggParams(clip_norm=s.clip_norm, scale=scale, max_cohort=max(2, cfg.server.clients_per_round),
                        extras=extras_specs(cfg), noise_stddev=noise, degree=s.degree or None,
                        threshold=s.threshold or None, min_survivors=min_survivors)


# --------------------------------------------------------------------------- distributed DP
def ddp_user_epsilon(cfg: Config, *, dim: int, rounds: int) -> float:
    """User-level epsilon (at ``secagg.ddp-delta``) of ``rounds`` noisy sums of ``dim`` coordinates.

    Assumes what :mod:`fedpersona.privacy.secagg.ddp` states: an honest-but-curious server that sees only
    the sum, at least :func:`ddp_min_clients` non-colluding clients' noise in every sum.
    """
    sa = secagg_params(cfg)
    q = sa.quantizer
    return ddp_epsilon(noise_stddev_quantized=q.noise_stddev, l2_sensitivity_quantized=q.l2_sensitivity(dim),
                       num_clients=ddp_min_clients(cfg), dim=dim, delta=cfg.secagg.ddp_delta, rounds=rounds)


def ddp_mechanism(cfg: Config, dim: int) -> str:
    """Ledger label: the mechanism and every parameter its epsilon depends on."""
    s = cfg.secagg
    return (f"{DDP_MECHANISM}(noise-multiplier={s.ddp_noise_multiplier:g}, clip={s.clip_norm:g}, "
            f"scale={quantization_scale(cfg):g}, min-clients={ddp_min_clients(cfg)}, dim={dim})")


def record_ddp(ledger: PrivacyLedger, cfg: Config, *, dim: int, round: int) -> dict:
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
