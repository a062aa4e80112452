"""From a float update to a vector in Z_{2^b} whose sum over the cohort cannot overflow, and back.

Per client (:meth:`Quantizer.encode`):

1. **Clip** the update to L2 norm ``C`` (``clip_norm``): ``x <- x * min(1, C / ||x||_2)``.
2. **Scale** by ``s`` (``scale``) and clamp each coordinate to ``[-s C, s C]`` (this only
   guards against float rounding: after clipping ``|x_i| <= ||x|| <= C``).
3. **Stochastic rounding** to integers: ``floor(y) + Bernoulli(y - floor(y))``, unbiased,
   error in (-1, 1) per coordinate, so ``|q_i| <= ceil(s C)``. With DDP noise on, the
   rounding is *conditional* (Kairouz et al. 2021): it is redrawn until
   ``||q||_2 <= quantized_l2_bound(...)``, which makes that bound the L2 sensitivity used by
   the accountant (the redraws add a small bias).
4. Optional **discrete Gaussian noise** (:mod:`fedpersona.privacy.secagg.ddp`), clamped to ``[-T, T]``.
5. **Extras**: named scalars (example count, training metrics) clipped to ``[-bound, bound]``,
   scaled by their own ``scale``, stochastically rounded, appended after the update. They are
   masked together with the update, so the server sees only their cohort totals. They get
   no DDP noise: their totals are exact (hidden per client, not differentially private).
6. **Map to the ring** Z_{2^b} (two's complement, reduced mod 2^b).

Modulus. Every coordinate of every client is bounded by
``M = max(ceil(s C) + T, max_j ceil(scale_j bound_j))``; ``b`` is the smallest number of
bits with ``n M < 2^(b-1)`` for the largest cohort ``n`` (``max_cohort``). The sum of any
``n' <= n`` clients then lies in ``(-2^(b-1), 2^(b-1))`` and is recovered exactly by the
signed reading of the modular sum: **overflow is impossible by construction**. ``b`` may be
at most 62 (:data:`MAX_BITS`); :func:`max_cohort` gives the largest ``n`` that fits.

Error bound of the dequantized sum over ``n`` clients (vs. the sum of the clipped updates):
each client's rounding error is < 1 per coordinate, so the sum's error is < ``n / s`` per
coordinate and < ``n sqrt(d) / s`` in L2 (worst case); it is unbiased with variance
<= ``n / (4 s^2)`` per coordinate (expected squared L2 error <= ``n d / (4 s^2)``) without
conditional rounding. For extra ``j`` the error is < ``n / scale_j``. DDP noise adds
variance ``n' sigma_c^2 / s^2`` per coordinate (``n'`` survivors). Clipping to ``C`` is the
other, deliberate, distortion.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .crypto import SecureRNG
from .ddp import noise_tail_bound, sample_discrete_gaussian

__all__ = [
    "MAX_BITS",
    "ExtraSpec",
    "Quantizer",
    "coordinate_bound",
    "from_ring",
    "max_cohort",
    "modulus_bits",
    "pack_bits",
    "packed_size",
    "quantized_l2_bound",
    "stochastic_round",
    "to_ring",
    "unpack_bits",
]

logger = logging.getLogger(__name__)

#: Largest modulus exponent: sums stay exact in int64 / uint64 arithmetic with room to spare.
MAX_BITS = 62


@dataclass(frozen=True)
class ExtraSpec:
    """A named scalar summed under the masks: values clipped to ``[-bound, bound]``, quantized with ``scale``."""

    name: str
    bound: float
    scale: float

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"ExtraSpec.name must be a non-empty string. You passed: {self.name!r}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"ExtraSpec.bound must be finite and > 0. You passed: {self.name}={self.bound}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"ExtraSpec.scale must be finite and > 0. You passed: {self.name}={self.scale}")


def coordinate_bound(*, clip_norm: float, scale: float, noise_tail: int = 0, extras: Sequence[ExtraSpec] = ()) -> int:
    """M: the largest |value| any client can put in any coordinate."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0. You passed: {clip_norm}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0. You passed: {scale}")
    if noise_tail < 0:
        raise ValueError(f"noise_tail must be >= 0. You passed: {noise_tail}")
    m = math.ceil(scale * clip_norm) + int(noise_tail)
    for e in extras:
        m = max(m, math.ceil(e.scale * e.bound))
    return int(m)


def modulus_bits(*, clip_norm: float, scale: float, max_cohort: int, noise_tail: int = 0,
                 extras: Sequence[ExtraSpec] = ()) -> int:
    """Smallest b with ``max_cohort * M < 2^(b-1)``; ValueError if b would exceed :data:`MAX_BITS`."""
    if int(max_cohort) != max_cohort or max_cohort < 1:
        raise ValueError(f"max_cohort must be an integer >= 1. You passed: {max_cohort}")
    m = coordinate_bound(clip_norm=clip_norm, scale=scale, noise_tail=noise_tail, extras=extras)
    bits = (int(max_cohort) * m).bit_length() + 1
    if bits > MAX_BITS:
        limit = max_cohort_for(m)
        raise ValueError(f"the sum of {max_cohort} clients needs {bits} bits (> {MAX_BITS}); with clip_norm={clip_norm}, "
                         f"scale={scale}, noise_tail={noise_tail} at most {limit} clients fit. Lower the scale or the cohort.")
    return bits


def max_cohort_for(coord_bound: int) -> int:
    return (2 ** (MAX_BITS - 1) - 1) // int(coord_bound)


def max_cohort(*, clip_norm: float, scale: float, noise_tail: int = 0, extras: Sequence[ExtraSpec] = ()) -> int:
    """The largest cohort whose sum fits in :data:`MAX_BITS` bits."""
    return max_cohort_for(coordinate_bound(clip_norm=clip_norm, scale=scale, noise_tail=noise_tail, extras=extras))


def quantized_l2_bound(*, clip_norm: float, scale: float, dim: int, beta: float = math.exp(-0.5)) -> float:
    """Bound on ||q||_2 of a stochastically rounded ``y`` with ``||y||_2 <= s C``.

    ``beta = 0``: the worst case ``s C + sqrt(d)``. ``beta > 0``: the bound of Kairouz et al.
    2021 (Lemma on randomized rounding), exceeded with probability <= beta, enforced by
    conditional rounding: ``sqrt(s^2 C^2 + d/4 + sqrt(2 ln(1/beta)) (s C + sqrt(d)/2))``.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1). You passed: {beta}")
    sc = scale * clip_norm * (1 + 1e-9)  # float slack of the clip
    worst = sc + math.sqrt(dim)
    if beta == 0:
        return worst
    sq = sc**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (sc + math.sqrt(dim) / 2)
    return min(worst, math.sqrt(sq))


def stochastic_round(y: np.ndarray, rng: SecureRNG, *, l2_bound: float | None = None, max_tries: int = 1000) -> np.ndarray:
    """Unbiased randomized rounding to int64; with ``l2_bound``, redrawn until ``||q||_2 <= l2_bound``."""
    y = np.asarray(y, dtype=np.float64)
    floor = np.floor(y)
    frac = y - floor
    base = floor.astype(np.int64)
    for _ in range(max_tries):
        q = base + (rng.uniform01(y.size) < frac)
        if l2_bound is None or float(np.dot(q.astype(np.float64), q)) <= l2_bound**2:
            return q
    raise RuntimeError(f"conditional rounding failed {max_tries} times: l2_bound={l2_bound} is too tight")


def to_ring(q: np.ndarray, bits: int) -> np.ndarray:
    """int64 values -> uint64 residues mod 2^bits."""
    return np.asarray(q, dtype=np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)


def from_ring(v: np.ndarray, bits: int) -> np.ndarray:
    """uint64 residues mod 2^bits -> signed int64 in [-2^(bits-1), 2^(bits-1))."""
    x = (np.asarray(v, dtype=np.uint64) & np.uint64((1 << bits) - 1)).astype(np.int64)
    x[x >= (1 << (bits - 1))] -= 1 << bits
    return x


# ------------------------------------------------------------------------------ wire packing
def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` residues mod 2^bits packed at ``bits`` bits each."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64]. You passed: {bits}")


def pack_bits(v: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^bits (uint64) as a ``uint8`` stream of ``bits`` bits each, little-endian.

    What a device sends is then exactly the size of its b-bit vector (the masks are uniform in
    Z_2^b, so no smaller encoding exists). Values must already be reduced mod 2^bits.

    Eight values fill exactly ``bits`` bytes, so the stream is a (groups, bits) byte matrix; value
    ``i`` of a group starts at bit ``i * bits`` of its row and is OR-ed in as one shifted 64-bit
    word (plus one byte when the shift pushes it past 64 bits): 8 vectorized passes, no per-bit
    buffers.
    """
    _check_bits(bits)
    v = np.ascontiguousarray(v, dtype="<u8").reshape(-1)
    n = v.size
    if bits in (8, 16, 32, 64):
        return v.astype(f"<u{bits // 8}").view(np.uint8).copy()
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    groups = -(-n // 8)
    vals = np.zeros(groups * 8, dtype="<u8")
    vals[:n] = v
    vals = vals.reshape(groups, 8)
    out = np.zeros(groups * bits + 9, dtype=np.uint8)  # room for the last group's 8-byte writes
    for i in range(8):
        j, sh = divmod(i * bits, 8)
        word = vals[:, i] << np.uint64(sh)
        if bits >= 8:  # the groups' 8-byte windows do not overlap: OR in place, one unaligned word each
            np.bitwise_or(np.ndarray((groups,), dtype="<u8", buffer=out, offset=j, strides=(bits,)), word,
                          out=np.ndarray((groups,), dtype="<u8", buffer=out, offset=j, strides=(bits,)))
        else:
            rows = np.lib.stride_tricks.as_strided(out[j:], shape=(groups, 8), strides=(bits, 1))
            for g_byte in range(8):  # windows overlap: one byte column at a time (tiny b only)
                rows[:, g_byte] |= (word >> np.uint64(8 * g_byte)).astype(np.uint8)
        if sh + bits > 64:
            out[j + 8::bits][:groups] |= (vals[:, i] >> np.uint64(64 - sh)).astype(np.uint8)
    return out[: packed_size(n, bits)].copy()


def unpack_bits(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` uint64 residues mod 2^bits.

    ``ValueError`` if ``buf`` is not ``uint8`` of exactly :func:`packed_size` bytes, or if its padding
    bits (after the last value) are not zero: what a sender with another length or modulus produces.
    """
    _check_bits(bits)
    buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"a packed vector must be a 1-D uint8 array, not {buf.dtype} with shape {buf.shape}")
    if buf.size != packed_size(n, bits):
        raise ValueError(f"{buf.size} bytes cannot hold {n} values of {bits} bits ({packed_size(n, bits)} bytes)")
    spare = buf.size * 8 - n * bits
    if spare and int(buf[-1]) >> (8 - spare):
        raise ValueError(f"nonzero padding bits after {n} values of {bits} bits")
    if bits in (8, 16, 32, 64):
        return np.frombuffer(buf.tobytes(), dtype=f"<u{bits // 8}").astype(np.uint64)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    groups = -(-n // 8)
    padded = np.zeros(groups * bits + 9, dtype=np.uint8)  # room for the last group's 8-byte reads
    padded[: buf.size] = buf
    out = np.empty((groups, 8), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for i in range(8):
        j, sh = divmod(i * bits, 8)
        # value i of every group: one (unaligned) 64-bit word per group, read in place
        word = np.ndarray((groups,), dtype="<u8", buffer=padded, offset=j, strides=(bits,)) >> np.uint64(sh)
        if sh + bits > 64:
            word |= padded[j + 8::bits][:groups].astype(np.uint64) << np.uint64(64 - sh)
        out[:, i] = word & mask
    return out.reshape(-1)[:n].copy()


@dataclass(frozen=True)
class Quantizer:
    """Clip, scale, round, (noise), map to Z_{2^b}; and decode a modular sum (see the module docstring).

    Args:
        clip_norm: L2 bound C on a client's update.
        scale: s, quantized units per unit of update.
        max_cohort: largest number of clients summed; fixes the modulus.
        extras: named scalars summed alongside.
        noise_stddev: per-client discrete Gaussian stddev in quantized units (0 = no DDP).
        noise_tail_sigmas: clamp of the noise, in stddevs.
        rounding_beta: conditional-rounding parameter used when noise is on (0 = plain rounding).
    """

    clip_norm: float
    scale: float
    max_cohort: int
    extras: tuple[ExtraSpec, ...] = ()
    noise_stddev: float = 0.0
    noise_tail_sigmas: float = 12.0
    rounding_beta: float = math.exp(-0.5)

    def __post_init__(self):
        object.__setattr__(self, "extras", tuple(self.extras))
        names = [e.name for e in self.extras]
        if len(set(names)) != len(names):
            raise ValueError(f"extras names must be unique. You passed: {names}")
        if not (math.isfinite(self.noise_stddev) and self.noise_stddev >= 0):
            raise ValueError(f"noise_stddev must be finite and >= 0. You passed: {self.noise_stddev}")
        if 0 < self.noise_stddev < 0.5:
            raise ValueError(f"noise_stddev must be 0 (off) or >= 0.5 quantized units. You passed: {self.noise_stddev}")
        if not 0 <= self.rounding_beta < 1:
            raise ValueError(f"rounding_beta must be in [0, 1). You passed: {self.rounding_beta}")
        self.bits  # validates the modulus

    @property
    def noise_tail(self) -> int:
        return noise_tail_bound(self.noise_stddev, self.noise_tail_sigmas)

    @property
    def bits(self) -> int:
        return modulus_bits(clip_norm=self.clip_norm, scale=self.scale, max_cohort=self.max_cohort,
                            noise_tail=self.noise_tail, extras=self.extras)

    def l2_sensitivity(self, dim: int) -> float:
        """L2 bound of one client's quantized update (what :func:`~fedpersona.privacy.secagg.ddp.ddp_epsilon` needs)."""
        beta = self.rounding_beta if self.noise_stddev > 0 else 0.0
        return quantized_l2_bound(clip_norm=self.clip_norm, scale=self.scale, dim=dim, beta=beta)

    def quantize(self, update: np.ndarray, rng: SecureRNG) -> np.ndarray:
        """Clip, scale, round and (if on) add clamped noise: int64 of the update's length."""
        x = np.asarray(update, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("the update contains NaN or inf")
        norm = float(np.linalg.norm(x))
        factor = self.scale * min(1.0, self.clip_norm / norm) if norm > 0 else self.scale
        sc = self.scale * self.clip_norm
        y = np.clip(x * factor, -sc, sc)
        l2 = self.l2_sensitivity(x.size) if self.noise_stddev > 0 and self.rounding_beta > 0 else None
        q = stochastic_round(y, rng, l2_bound=l2)
        if self.noise_stddev > 0:
            tail = self.noise_tail
            q += np.clip(sample_discrete_gaussian(self.noise_stddev, q.size, rng), -tail, tail)
        return q

    def quantize_extras(self, extras: Mapping[str, float] | None, rng: SecureRNG) -> np.ndarray:
        extras = dict(extras or {})
        want = [e.name for e in self.extras]
        if set(extras) != set(want):
            raise ValueError(f"extras must have exactly the names {want}. You passed: {sorted(extras)}")
        out = np.empty(len(self.extras), dtype=np.int64)
        for i, e in enumerate(self.extras):
            v = float(extras[e.name])
            if not math.isfinite(v):
                raise ValueError(f"extra {e.name} is not finite: {v}")
            if abs(v) > e.bound:
                logger.warning("extra %s=%s exceeds its bound %s and is clipped", e.name, v, e.bound)
            y = min(max(v, -e.bound), e.bound) * e.scale
            out[i] = stochastic_round(np.array([y]), rng)[0]
        return out

    def encode(self, update: np.ndarray, extras: Mapping[str, float] | None, rng: SecureRNG) -> np.ndarray:
        """The client's ring vector (uint64 residues mod 2^b): update coordinates, then extras."""
        q = np.concatenate([self.quantize(update, rng), self.quantize_extras(extras, rng)])
        return to_ring(q, self.bits)

    def decode_sum(self, ring_sum: np.ndarray, dim: int) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """(sum of the clipped updates as float64, extras totals by name, raw signed integer sum)."""
        signed = from_ring(ring_sum, self.bits)
        if signed.size != dim + len(self.extras):
            raise ValueError(f"sum has {signed.size} coordinates, expected {dim} + {len(self.extras)} extras")
        total = signed[:dim].astype(np.float64) / self.scale
        extras = {e.name: float(signed[dim + i]) / e.scale for i, e in enumerate(self.extras)}
        return total, extras, signed
