"""Shamir sharing and the crypto helpers: any t shares reconstruct, t - 1 do not; bindings of derived keys."""

import itertools

import pytest

from fedpersona.privacy.secagg.crypto import DecryptionError, MaskExpander, SecureRNG, derive, encode_fields, open_sealed, seal
from fedpersona.privacy.secagg.shamir import PRIME, ShamirError, reconstruct, share_from_bytes, share_to_bytes, split


@pytest.mark.parametrize("t,m", [(1, 1), (2, 3), (3, 5), (4, 7)])
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(t, m):
    rng = SecureRNG(b"shamir")
    secret = rng.randbelow(PRIME)
    points = [5 + 3 * j for j in range(m)]
    shares = list(zip(points, split([secret], points, t, rng)[0]))
    for subset in itertools.combinations(shares, t):
        assert reconstruct(list(subset), t) == secret
    if t > 1:
        for subset in itertools.combinations(shares, t - 1):
            with pytest.raises(ShamirError, match=f"need {t} shares"):
                reconstruct(list(subset), t)
            # interpolating t - 1 shares as if they were enough gives an unrelated value
            assert reconstruct(list(subset), t - 1) != secret


def test_t_minus_1_shares_are_consistent_with_every_secret():
    """Perfect hiding: for t - 1 shares and ANY candidate secret there is exactly one polynomial through both."""
    rng = SecureRNG(b"hide")
    t, points = 3, [2, 9, 11]
    shares = list(zip(points, split([12345], points, t, rng)[0]))[: t - 1]
    for candidate in (0, 1, 12345, PRIME - 1):
        # polynomial through (0, candidate) and the t - 1 shares: evaluate its value at the third point ...
        basis = [(0, candidate)] + shares
        y3 = _interp(basis, PRIME - 1)
        # ... then those t points (which include the t - 1 real shares) reconstruct `candidate`
        assert reconstruct(shares + [(PRIME - 1, y3)], t) == candidate


def _interp(points, at):
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        total += yj * num * pow(den, -1, PRIME)
    return total % PRIME


def test_share_encoding_and_bad_input():
    vals = [0, 1, PRIME - 1]
    assert share_from_bytes(share_to_bytes(vals)) == vals
    with pytest.raises(ShamirError, match="field element"):
        share_from_bytes((2**128 - 1).to_bytes(16, "big"))
    with pytest.raises(ShamirError, match="multiple"):
        share_from_bytes(b"123")
    rng = SecureRNG(b"x")
    with pytest.raises(ShamirError, match="distinct"):
        split([1], [3, 3], 2, rng)
    with pytest.raises(ShamirError, match="threshold"):
        split([1], [3, 4], 3, rng)
    with pytest.raises(ShamirError, match="distinct"):
        reconstruct([(3, 1), (3, 2)], 2)


def test_derived_keys_bound_to_every_field():
    shared = b"k" * 32
    base = derive(shared, salt=b"D", label="pair-mask", fields=(1, 2))
    assert base == derive(shared, salt=b"D", label="pair-mask", fields=(1, 2))
    assert base != derive(shared, salt=b"E", label="pair-mask", fields=(1, 2))      # other round / run / setup
    assert base != derive(shared, salt=b"D", label="share-enc", fields=(1, 2))      # other purpose
    assert base != derive(shared, salt=b"D", label="pair-mask", fields=(2, 1))      # other ordered pair
    assert encode_fields("a", 1, 23) != encode_fields("a", 12, 3)
    with pytest.raises(ValueError, match="2\\^64"):
        encode_fields("a", -1)


def test_seal_rejects_wrong_associated_data_and_tampering():
    key, ad = b"\x01" * 32, b"run1|round1|u|v"
    ct = seal(key, b"shares", ad, b"\x00" * 12)
    assert open_sealed(key, ct, ad, what="t") == b"shares"
    with pytest.raises(DecryptionError):
        open_sealed(key, ct, b"run1|round2|u|v", what="t")
    with pytest.raises(DecryptionError):
        open_sealed(key, ct[:-1] + bytes([ct[-1] ^ 1]), ad, what="t")


def test_prg_deterministic_and_seed_sensitive():
    e = MaskExpander(1000)
    a = e.expand(7).copy()
    assert (a == e.expand(7)).all()
    assert (a != e.expand(8)).mean() > 0.99


def test_secure_rng_uniform_ints():
    rng = SecureRNG()
    assert not rng.deterministic
    x = rng.randint(7, 70_000)
    assert x.min() == 0 and x.max() == 6
    counts = [int((x == v).sum()) for v in range(7)]
    assert max(counts) - min(counts) < 600
    assert 0 <= rng.randbelow(PRIME) < PRIME
