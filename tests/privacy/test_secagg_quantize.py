"""Quantization: the modulus can never overflow at max_cohort, rounding is unbiased and within its bounds."""

import math

import numpy as np
import pytest

from fedpersona.privacy.secagg import ExtraSpec, Quantizer, SecAggParams, SecureRNG, max_cohort, modulus_bits, run_secure_sum
from fedpersona.privacy.secagg.crypto import MaskExpander
from fedpersona.privacy.secagg.quantize import (MAX_BITS, coordinate_bound, from_ring, pack_bits, packed_size, quantized_l2_bound,
                                     stochastic_round, to_ring, unpack_bits)


def test_modulus_bits_and_max_cohort():
    # M = ceil(1000.5) = 1001; 100 * 1001 = 100100 < 2^17 -> b = 18
    assert coordinate_bound(clip_norm=1.0, scale=1000.5) == 1001
    assert modulus_bits(clip_norm=1.0, scale=1000.5, max_cohort=100) == 18
    assert modulus_bits(clip_norm=1.0, scale=1000.5, max_cohort=100, noise_tail=24) == 18
    assert coordinate_bound(clip_norm=1.0, scale=10.0, noise_tail=5, extras=[ExtraSpec("n", 1e4, 1.0)]) == 10_000
    n = max_cohort(clip_norm=1.0, scale=2.0**57)
    assert n == 15
    assert modulus_bits(clip_norm=1.0, scale=2.0**57, max_cohort=n) == MAX_BITS
    with pytest.raises(ValueError, match="at most 15 clients"):
        modulus_bits(clip_norm=1.0, scale=2.0**57, max_cohort=n + 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_no_overflow_at_max_cohort_through_the_protocol(sign):
    """15 clients (max_cohort at 62 bits), every one at the clip bound on the same coordinate, same sign."""
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**57, max_cohort=15)
    assert cfg.modulus_bits == 62
    d = 64
    x = np.zeros(d, np.float32)
    x[0] = 5.0 * sign  # clipped to norm 1
    ups = {c: x for c in range(15)}
    r = run_secure_sum(ups, cfg, rng=SecureRNG(b"overflow"))
    assert int(r.int_sum[0]) == int(sign) * 15 * 2**57
    assert r.total[0] == 15.0 * sign and not r.total[1:].any()


def test_no_overflow_with_adversarial_rounding_and_noise_tail():
    """Every client at +-M on every coordinate (rounding up and noise at its clamp): the signed sum is exact."""
    q = Quantizer(clip_norm=1.0, scale=1000.5, max_cohort=40, noise_stddev=3.0)
    m = coordinate_bound(clip_norm=1.0, scale=1000.5, noise_tail=q.noise_tail)
    assert q.noise_tail == 36 and m == 1001 + 36
    n = max_cohort(clip_norm=1.0, scale=1000.5, noise_tail=q.noise_tail)
    bits = q.bits
    assert 40 * m < 2 ** (bits - 1)
    exp = MaskExpander(8)
    for sign in (1, -1):
        acc = np.zeros(8, np.uint64)
        for c in range(40):
            y = to_ring(np.full(8, sign * m, dtype=np.int64), bits)
            exp.add_into(y, 1000 + c)  # masked, as on the wire
            acc += y & np.uint64((1 << bits) - 1)
        for c in range(40):
            exp.add_into(acc, 1000 + c, -1)
        np.testing.assert_array_equal(from_ring(acc, bits), np.full(8, sign * 40 * m))
    assert n >= 40


def test_quantize_respects_clip_and_coordinate_bound():
    q = Quantizer(clip_norm=2.0, scale=1000.5, max_cohort=10)
    rng = SecureRNG(b"q")
    x = np.zeros(100)
    x[3] = 1e6  # far beyond the clip
    v = q.quantize(x, rng)
    assert v[3] in (2000, 2001) and np.abs(v).max() <= math.ceil(2.0 * 1000.5)
    z = q.quantize(np.random.default_rng(0).normal(size=10_000), rng)
    assert np.abs(z).max() <= math.ceil(2.0 * 1000.5)
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(np.array([np.nan]), rng)


def test_stochastic_rounding_is_unbiased():
    rng = SecureRNG(b"sr")
    y = np.full(200_000, 0.3)
    q = stochastic_round(y, rng)
    assert set(np.unique(q)) == {0, 1}
    assert abs(q.mean() - 0.3) < 5 * math.sqrt(0.21 / y.size)
    neg = stochastic_round(np.full(200_000, -2.75), rng)
    assert abs(neg.mean() + 2.75) < 5 * math.sqrt(0.1875 / y.size)


def test_conditional_rounding_bound():
    d, c, s = 10_000, 1.0, 10.0
    bound = quantized_l2_bound(clip_norm=c, scale=s, dim=d)
    worst = quantized_l2_bound(clip_norm=c, scale=s, dim=d, beta=0.0)
    assert worst == pytest.approx(s * c + math.sqrt(d)) and bound < 0.6 * worst
    rng = SecureRNG(b"cr")
    x = np.random.default_rng(1).normal(size=d)
    y = x / np.linalg.norm(x) * s * c
    for _ in range(5):
        assert np.linalg.norm(stochastic_round(y, rng, l2_bound=bound)) <= bound
    with pytest.raises(RuntimeError, match="too tight"):
        stochastic_round(y, rng, l2_bound=1.0, max_tries=3)


def test_sum_error_within_stated_bound():
    """|error| < n / s per coordinate for the dequantized sum of n clipped updates."""
    cfg = SecAggParams(clip_norm=1.0, scale=100.0, max_cohort=20)
    rng = np.random.default_rng(5)
    ups = {c: rng.normal(size=2000).astype(np.float32) * 0.02 for c in range(12)}
    r = run_secure_sum(ups, cfg, rng=SecureRNG(b"err"))
    tot = sum(u.astype(np.float64) * min(1.0, 1.0 / np.linalg.norm(u.astype(np.float64))) for u in ups.values())
    err = r.total - tot
    assert np.abs(err).max() < 12 / 100.0
    # unbiased with variance <= n / (4 s^2) per coordinate
    assert abs(err.mean()) < 5 * math.sqrt(12 / 4) / 100 / math.sqrt(err.size)
    assert err.var() <= 12 / (4 * 100.0**2) * 1.1


def test_ring_round_trip_and_extras():
    bits = 20
    v = np.array([-(2**19) + 1, -1, 0, 1, 2**19 - 1], dtype=np.int64)
    r = to_ring(v, bits)
    assert r.dtype == np.uint64 and int(r.max()) < 2**bits
    np.testing.assert_array_equal(from_ring(r, bits), v)
    q = Quantizer(clip_norm=1.0, scale=10.0, max_cohort=5, extras=(ExtraSpec("n", 100, 1.0), ExtraSpec("acc", 1, 1e3)))
    rng = SecureRNG(b"x")
    enc = q.encode(np.zeros(3), {"n": 7, "acc": 0.25}, rng)
    total, extras, signed = q.decode_sum(enc, 3)
    assert extras == {"n": 7.0, "acc": 0.25}
    assert q.quantize_extras({"n": 1e9, "acc": 0}, rng)[0] == 100  # clipped to its bound
    with pytest.raises(ValueError, match="exactly the names"):
        q.encode(np.zeros(3), {"n": 7}, rng)
    with pytest.raises(ValueError, match="unique"):
        Quantizer(clip_norm=1.0, scale=1.0, max_cohort=5, extras=(ExtraSpec("n", 1, 1), ExtraSpec("n", 1, 1)))
    with pytest.raises(ValueError, match="bound"):
        ExtraSpec("n", -1, 1)


# ------------------------------------------------------------------------------ wire packing
@pytest.mark.parametrize("bits", [1, 7, 8, 13, 27, 31, 32, 33, 57, 58, 61, 62, 63, 64])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_round_trips_at_exactly_b_bits(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    hi = np.uint64((1 << bits) - 1)
    v = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    v &= hi
    v[: min(n, 2)] = hi  # all ones: every bit of the value lands
    packed = pack_bits(v, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(n, bits) == -(-n * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, n), v)


def test_pack_bits_layout_is_little_endian_bit_stream():
    # 3-bit values 1, 2, 3, 4 -> bits (LSB first) 100 010 110 001 -> bytes 0b11010001, 0b00001000
    assert pack_bits(np.array([1, 2, 3, 4], dtype=np.uint64), 3).tolist() == [0b11010001, 0b00001000]


def test_unpack_bits_rejects_bad_buffers():
    packed = pack_bits(np.arange(5, dtype=np.uint64), 5)  # 25 bits -> 4 bytes, 7 padding bits
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(packed[:-1], 5, 5)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(packed, 5, 7)  # 35 bits: 5 bytes
    bad = packed.copy()
    bad[-1] |= np.uint8(0b10)  # bit 25: padding
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(bad, 5, 5)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(packed.astype(np.uint16), 5, 5)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.zeros(3, np.uint64), 65)
