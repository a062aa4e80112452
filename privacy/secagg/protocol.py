"""Secure aggregation with two message exchanges per round (SecAgg+ with stateless, round-bound secrets).

The server is honest-but-curious: it follows the protocol but tries to learn from what it
sees. It must learn only the sum of the surviving clients' quantized updates (and of their
extras), never an individual update. Flower's SecAgg+ (Bonawitz et al. CCS 2017, Bell et al.
CCS 2020) needs four client exchanges per round (share keys, collect masked vectors,
unmask, plus the setup). This protocol needs two, plus one key advertisement per run.

Messages (dicts of str/int/float/bool/bytes/1-D numpy arrays, so that Flower's
ConfigRecord / ArrayRecord can carry them):

0. **advertise** (once per run), client -> server: ``client_id``, ``enc_pk``, ``mask_pk``: the
   public halves of two long-term X25519 key pairs, one to encrypt shares, one to agree
   pairwise mask seeds. The server keeps them in a per-run key directory.
1. **masked input** (the same exchange as training). Server -> client: round setup (run id,
   round, cohort, a fresh random 32-byte ``graph_seed``, degree ``k``, threshold ``t``, minimum
   number of survivors, modulus bits, vector length) and the public keys of the client's
   neighbours in the SecAgg+ graph (:mod:`privacy.secagg.graph`), which every party derives
   from (cohort, k, graph_seed). Client -> server: the masked vector, packed at b bits per
   coordinate (:func:`~privacy.secagg.quantize.pack_bits`: exactly the size of the b-bit
   quantized vector), and, for each of its ``k + 1`` share holders (its neighbours and itself), one AES-GCM ciphertext of its shares.
2. **unmask**. Server -> each survivor: the survivor list and the ciphertexts addressed to
   it. Client -> server: shares of the self-mask seeds of survivors, and shares of the
   pairwise seeds between survivors and dropped clients. The server reconstructs and
   removes the masks and obtains the sum.

The round digest ``D`` = SHA-256 of every round parameter (run, round, cohort, graph seed,
k, t, minimum survivors, modulus, length) salts every key derivation and is part of every
ciphertext's associated data: a ciphertext, share or mask of another run, round, or
another setup of the same round (a retried round) is useless or rejected.

Masking. Client ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) PRG(s_uv)``
mod ``2^b``, where ``x_u`` is its quantized vector (:mod:`privacy.secagg.quantize`),
``sign = +1`` if ``u < v`` else ``-1``,

* ``b_u``: a fresh random self-mask seed (127 bits) drawn for this round only;
* ``s_uv = HKDF(X25519(mask_sk_u, mask_pk_v), salt=D, info=("pair-mask", min(u,v), max(u,v)))``:
  a per-round pairwise seed both ends compute without any message.

In the same reply, ``u`` Shamir-shares (t of k + 1, over GF(2^127 - 1)) ``b_u`` *and each of
its k per-round pairwise seeds* ``s_uv`` among its share holders, each holder's shares
encrypted under ``HKDF(X25519(enc_sk_u, enc_pk_h), salt=D, info=("share-enc", u, h))`` with
associated data (run, round, u, h, D). The ciphertext to itself lets the client stay
stateless between the two stages (a fresh Flower ClientApp process handles each message):
its only state is its long-term key pair.

Why this design. Sharing and masking happen in one message, so a client ``u`` that drops
before sending has distributed no shares; yet its neighbours' vectors contain masks with
it. Those masks are seeds ``s_uv`` that the *surviving* neighbour ``v`` knows and has
shared, so the server gets them from ``v``'s holders (or ``v`` itself through its self-
ciphertext). If ``v`` then drops during unmasking, ``v``'s holders still have the shares.
Bonawitz et al. instead share the long-term mask *secret key*, which must then be fresh
every round (hence the extra key-exchange message); sharing per-round derived seeds instead
of the key means that a reconstructed seed exposes one pair's mask in one round setup and
nothing else: the long-term keys are never revealed and can be reused across rounds.

Unmasking. Let S be the clients whose masked vectors arrived (stage-1 survivors). A holder
answering the unmask request returns, for each sender ``w`` of a ciphertext it received
(``w`` in S): the share of ``b_w``, and the shares of ``s_wx`` only for neighbours ``x`` of ``w``
*not* in S. It never returns a share of ``s_wx`` for ``x`` in S. Hence for every client the
server obtains either its self-mask (survivors) or pairwise seeds with it (dropped clients'
pairs, whose vectors it never received), never both: for a survivor ``w`` the masks with its
surviving neighbours stay secret. The server computes
``sum_S y - sum_S PRG(b_w) - sum_{w in S, x in N(w) minus S} sign(w, x) PRG(s_wx)``, the
surviving pairwise masks cancel, and the result is ``sum_S x_w`` mod ``2^b``.

Checks. Pairwise masks only cancel within a connected component of the graph induced on S,
so the server could otherwise learn one sum per component: clients (and the server) refuse
to unmask unless S is connected and ``|S| >= min_survivors`` (default t). The random Harary
graph is k-connected, so fewer than k dropped clients can never disconnect it. If fewer than
t shares of any needed secret arrive, the round raises :class:`SecAggAbort` before
reconstructing anything; what the server holds then (some self-mask seeds, some dropped
pairs' seeds) leaves every component sum masked by an unknown seed. Clients also check that
the round parameters equal the ones their own config implies (the server cannot lower the
threshold), the modulus and vector length, and that the graph matches the seed.

Dropouts tolerated. The round completes iff S is connected with ``|S| >= min_survivors`` and
every client in S has at least t of its k + 1 holders answering the unmask request. With the
complete graph (small cohorts, ``k = n - 1``) that is: any drops that leave at least t clients
answering the unmask request.

Threat model and limits: honest-but-curious server and fewer than t colluding clients
among any client's holders. A malicious server could claim different survivor sets to
different clients (Bonawitz et al.'s consistency round, omitted here, prevents that);
transport security (TLS) and client authentication are Flower's (SuperNode auth).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import shamir
from .crypto import (PUBLIC_KEY_BYTES, SEAL_OVERHEAD, ClientKeys, MaskExpander, SecureRNG, derive, ecdh, encode_fields,
                     load_public_key, open_sealed, seal)
from .graph import build_graph, default_degree, default_threshold, is_connected
from .quantize import ExtraSpec, Quantizer, pack_bits, packed_size, unpack_bits

__all__ = [
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggInputError",
    "SecAggResult",
    "SecAggRound",
    "SecAggServer",
    "SecAggStats",
    "payload_nbytes",
    "round_digest",
    "run_secure_sum",
]

logger = logging.getLogger(__name__)

_U64 = 2**64


class SecAggAbort(RuntimeError):
    """The round cannot complete without revealing more than the sum: it is abandoned, nothing is revealed."""


class SecAggInputError(ValueError):
    """A message or argument is malformed, inconsistent, duplicated, from an unknown client, or for another round."""


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SecAggConfig:
    """Settings both sides share (parse once, pass to :class:`SecAggClient` and :class:`SecAggServer`).

    Args:
        clip_norm: L2 norm bound C of a client's update.
        scale: quantization scale s (quantized units per unit of update).
        max_cohort: the largest cohort; fixes the modulus (see :mod:`privacy.secagg.quantize`).
        extras: named scalars summed under the same masks (example counts, metrics).
        noise_stddev: per-client discrete Gaussian stddev in quantized units (0: no distributed DP).
        noise_tail_sigmas: clamp of the noise in stddevs.
        rounding_beta: conditional rounding parameter used with noise.
        degree: graph degree k (None: ``2 ceil(1.5 log2 n)``); rounded up to even, capped at n - 1.
        threshold: Shamir threshold t (None: strict majority of the k + 1 holders).
        min_survivors: fewest stage-1 survivors the round accepts (None: t).
    """

    clip_norm: float
    scale: float
    max_cohort: int
    extras: tuple[ExtraSpec, ...] = ()
    noise_stddev: float = 0.0
    noise_tail_sigmas: float = 12.0
    rounding_beta: float = math.exp(-0.5)
    degree: int | None = None
    threshold: int | None = None
    min_survivors: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "extras", tuple(self.extras))
        for name in ("degree", "threshold", "min_survivors"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(f"SecAggConfig.{name} must be None or an integer >= 1. You passed: {v}")
        if int(self.max_cohort) != self.max_cohort or self.max_cohort < 2:
            raise ValueError(f"SecAggConfig.max_cohort must be an integer >= 2. You passed: {self.max_cohort}")
        self.quantizer  # validates clip, scale, noise and the modulus

    @cached_property
    def quantizer(self) -> Quantizer:
        return Quantizer(clip_norm=self.clip_norm, scale=self.scale, max_cohort=self.max_cohort, extras=self.extras,
                         noise_stddev=self.noise_stddev, noise_tail_sigmas=self.noise_tail_sigmas,
                         rounding_beta=self.rounding_beta)

    @property
    def modulus_bits(self) -> int:
        return self.quantizer.bits

    def round_params(self, n: int) -> tuple[int, int, int]:
        """(degree k, threshold t, min_survivors) for a cohort of n clients."""
        if n < 2:
            raise SecAggInputError(f"a cohort needs at least 2 clients. You passed: {n}")
        if n > self.max_cohort:
            raise SecAggInputError(f"cohort of {n} exceeds max_cohort={self.max_cohort} (the modulus would overflow)")
        k = self.degree or default_degree(n)
        k = n - 1 if 2 * ((k + 1) // 2) >= n - 1 else 2 * ((k + 1) // 2)
        t = self.threshold or default_threshold(k)
        if not 1 <= t <= k + 1:
            raise SecAggInputError(f"threshold t={t} must be in [1, k + 1 = {k + 1}] for a cohort of {n}")
        m = self.min_survivors or max(t, 2)
        if not 2 <= m <= n:
            raise SecAggInputError(f"min_survivors={m} must be in [2, n={n}]")
        return k, t, m


def round_digest(*, run_id: int, round: int, cohort: Sequence[int], graph_seed: bytes, degree: int, threshold: int,
                 min_survivors: int, modulus_bits: int, length: int, num_extras: int) -> bytes:
    enc = encode_fields("round", run_id, round, degree, threshold, min_survivors, modulus_bits, length, num_extras,
                        graph_seed, *sorted(int(c) for c in cohort))
    return hashlib.sha256(enc).digest()


def _pair_seed(keys: ClientKeys, me: int, peer: int, peer_mask_pk: bytes, digest: bytes) -> int:
    raw = derive(ecdh(keys.mask, peer_mask_pk), salt=digest, label="pair-mask", fields=(min(me, peer), max(me, peer)),
                 length=16)
    return int.from_bytes(raw, "big") % shamir.PRIME


def _share_key(keys: ClientKeys, sender: int, receiver: int, peer_enc_pk: bytes, digest: bytes) -> bytes:
    return derive(ecdh(keys.enc, peer_enc_pk), salt=digest, label="share-enc", fields=(sender, receiver))


def _share_ad(run_id: int, round: int, sender: int, receiver: int, digest: bytes) -> bytes:
    return encode_fields("share-ad", run_id, round, sender, receiver, digest)


def _ciphertext_size(degree: int) -> int:
    return SEAL_OVERHEAD + shamir.SHARE_BYTES * (degree + 1)


# --------------------------------------------------------------------------- payload checks
def _field(msg: Mapping[str, Any], key: str, kind: str, *, what: str):
    if not isinstance(msg, Mapping):
        raise SecAggInputError(f"{what}: a message must be a dict. You passed: {type(msg).__name__}")
    if key not in msg:
        raise SecAggInputError(f"{what}: missing field {key!r}")
    v = msg[key]
    if kind == "int":
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise SecAggInputError(f"{what}: field {key!r} must be an int. You passed: {type(v).__name__}")
        return int(v)
    if kind == "bytes":
        if not isinstance(v, (bytes, bytearray)):
            raise SecAggInputError(f"{what}: field {key!r} must be bytes. You passed: {type(v).__name__}")
        return bytes(v)
    if kind == "ids":
        if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype != np.uint64:
            raise SecAggInputError(f"{what}: field {key!r} must be a 1-D uint64 array")
        return [int(x) for x in v]
    raise AssertionError(kind)


def _ids(values: Iterable[int]) -> np.ndarray:
    return np.asarray(sorted(int(v) for v in values), dtype=np.uint64).reshape(-1)


def _check_id(cid: Any, *, what: str) -> int:
    if isinstance(cid, (bool, np.bool_)) or not isinstance(cid, (int, np.integer)) or not 0 <= int(cid) < _U64 - 1:
        raise SecAggInputError(f"{what}: client ids must be integers in [0, 2^64 - 1). You passed: {cid!r}")
    return int(cid)


def payload_nbytes(msg: Mapping[str, Any]) -> int:
    """Bytes a message carries: keys, bytes and array payloads, 8 per scalar."""
    n = 0
    for k, v in msg.items():
        n += len(k)
        if isinstance(v, (bytes, bytearray)):
            n += len(v)
        elif isinstance(v, np.ndarray):
            n += v.nbytes
        elif isinstance(v, str):
            n += len(v.encode())
        else:
            n += 8
    return n


@dataclass(frozen=True)
class _RoundSetup:
    run_id: int
    round: int
    cohort: tuple[int, ...]
    graph_seed: bytes
    degree: int
    threshold: int
    min_survivors: int
    modulus_bits: int
    length: int
    num_extras: int

    @cached_property
    def graph(self) -> dict[int, tuple[int, ...]]:
        return build_graph(self.cohort, self.degree, self.graph_seed)

    @cached_property
    def digest(self) -> bytes:
        return round_digest(run_id=self.run_id, round=self.round, cohort=self.cohort, graph_seed=self.graph_seed,
                            degree=self.degree, threshold=self.threshold, min_survivors=self.min_survivors,
                            modulus_bits=self.modulus_bits, length=self.length, num_extras=self.num_extras)

    def holders(self, cid: int) -> tuple[int, ...]:
        return tuple(sorted(self.graph[cid] + (cid,)))

    def to_fields(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "round": self.round, "cohort": _ids(self.cohort), "graph_seed": self.graph_seed,
                "degree": self.degree, "threshold": self.threshold, "min_survivors": self.min_survivors,
                "modulus_bits": self.modulus_bits, "length": self.length, "num_extras": self.num_extras}

    @classmethod
    def from_fields(cls, msg: Mapping[str, Any], *, what: str) -> "_RoundSetup":
        cohort = _field(msg, "cohort", "ids", what=what)
        if len(set(cohort)) != len(cohort):
            raise SecAggInputError(f"{what}: duplicated client id in the cohort")
        seed = _field(msg, "graph_seed", "bytes", what=what)
        if len(seed) != 32:
            raise SecAggInputError(f"{what}: graph_seed must be 32 bytes")
        return cls(run_id=_field(msg, "run_id", "int", what=what), round=_field(msg, "round", "int", what=what),
                   cohort=tuple(sorted(cohort)), graph_seed=seed, degree=_field(msg, "degree", "int", what=what),
                   threshold=_field(msg, "threshold", "int", what=what),
                   min_survivors=_field(msg, "min_survivors", "int", what=what),
                   modulus_bits=_field(msg, "modulus_bits", "int", what=what),
                   length=_field(msg, "length", "int", what=what), num_extras=_field(msg, "num_extras", "int", what=what))

    def check_against(self, config: SecAggConfig, *, what: str) -> None:
        """A client's check that the server's round parameters are the ones its own config implies."""
        if self.modulus_bits != config.modulus_bits:
            raise SecAggInputError(f"{what}: wrong modulus: the request says 2^{self.modulus_bits}, this client's "
                                   f"config gives 2^{config.modulus_bits}")
        if self.num_extras != len(config.extras):
            raise SecAggInputError(f"{what}: request has {self.num_extras} extras, config has {len(config.extras)}")
        if self.length < 1:
            raise SecAggInputError(f"{what}: vector length must be >= 1. You passed: {self.length}")
        expected = config.round_params(len(self.cohort))
        if (self.degree, self.threshold, self.min_survivors) != expected:
            raise SecAggInputError(f"{what}: round parameters (k, t, min_survivors)="
                                   f"{(self.degree, self.threshold, self.min_survivors)} differ from this client's "
                                   f"{expected}")


# ---------------------------------------------------------------------------------- client
class SecAggClient:
    """The device side. Stateless between messages except for its long-term keys (:meth:`state`).

    The Flower client calls :meth:`advertise` once per run, :meth:`masked_input` with the
    train request and :meth:`unmask` with the unmask request; it persists :meth:`state` in
    the device's own store (it holds private keys: never put it in a message).
    """

    def __init__(self, client_id: int, config: SecAggConfig, *, keys: ClientKeys | None = None,
                 rng: SecureRNG | None = None):
        self.client_id = _check_id(client_id, what="SecAggClient")
        self.config = config
        self.keys = keys or ClientKeys()
        self.rng = rng or SecureRNG()

    # ---- persistence
    def state(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "keys": self.keys.to_bytes()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: SecAggConfig, *, rng: SecureRNG | None = None) -> "SecAggClient":
        return cls(int(state["client_id"]), config, keys=ClientKeys.from_bytes(bytes(state["keys"])), rng=rng)

    # ---- stage 0
    def advertise(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "enc_pk": self.keys.enc_public, "mask_pk": self.keys.mask_public}

    # ---- stage 1
    def masked_input(self, request: Mapping[str, Any], update: np.ndarray,
                     extras: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Quantize (+ noise), mask, and share: the reply to a round's train / masked-input request."""
        what = f"masked-input request to client {self.client_id}"
        setup = _RoundSetup.from_fields(request, what=what)
        if _field(request, "client_id", "int", what=what) != self.client_id:
            raise SecAggInputError(f"{what}: addressed to client {request['client_id']}")
        if self.client_id not in setup.cohort:
            raise SecAggInputError(f"{what}: this client is not in the cohort")
        setup.check_against(self.config, what=what)
        update = np.asarray(update).ravel()
        if update.size != setup.length:
            raise SecAggInputError(f"{what}: the update has {update.size} coordinates, the round expects {setup.length}")
        neighbours = setup.graph[self.client_id]
        if _field(request, "neighbours", "ids", what=what) != list(neighbours):
            raise SecAggInputError(f"{what}: neighbour list does not match the graph derived from the graph seed")
        enc_pks = _field(request, "neighbour_enc_pks", "bytes", what=what)
        mask_pks = _field(request, "neighbour_mask_pks", "bytes", what=what)
        if len(enc_pks) != PUBLIC_KEY_BYTES * len(neighbours) or len(mask_pks) != PUBLIC_KEY_BYTES * len(neighbours):
            raise SecAggInputError(f"{what}: expected {len(neighbours)} public keys of each kind")
        enc_pk = {v: enc_pks[i * 32:(i + 1) * 32] for i, v in enumerate(neighbours)}
        enc_pk[self.client_id] = self.keys.enc_public
        mask_pk = {v: mask_pks[i * 32:(i + 1) * 32] for i, v in enumerate(neighbours)}
        digest = setup.digest
        me = self.client_id

        try:
            vec = self.config.quantizer.encode(update, extras, self.rng)
        except ValueError as e:
            raise SecAggInputError(f"{what}: {e}") from None
        self_seed = self.rng.randbelow(shamir.PRIME)
        pair_seeds = [_pair_seed(self.keys, me, v, mask_pk[v], digest) for v in neighbours]
        expander = MaskExpander(vec.size)
        expander.add_into(vec, self_seed)
        for v, s in zip(neighbours, pair_seeds):
            expander.add_into(vec, s, 1 if me < v else -1)
        vec &= np.uint64((1 << setup.modulus_bits) - 1)

        holders = setup.holders(me)
        shares = shamir.split([self_seed] + pair_seeds, [shamir.point_of(h) for h in holders], setup.threshold, self.rng)
        cts = []
        for j, h in enumerate(holders):
            plain = shamir.share_to_bytes([row[j] for row in shares])
            key = _share_key(self.keys, me, h, enc_pk[h], digest)
            cts.append(seal(key, plain, _share_ad(setup.run_id, setup.round, me, h, digest), self.rng.bytes(12)))
        return {"client_id": me, "run_id": setup.run_id, "round": setup.round,
                "masked": pack_bits(vec, setup.modulus_bits),
                "share_holders": _ids(holders), "ciphertexts": b"".join(cts)}

    # ---- stage 2
    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Decrypt the shares forwarded to this client and return those the server may have."""
        what = f"unmask request to client {self.client_id}"
        setup = _RoundSetup.from_fields(request, what=what)
        me = self.client_id
        if _field(request, "client_id", "int", what=what) != me:
            raise SecAggInputError(f"{what}: addressed to client {request['client_id']}")
        setup.check_against(self.config, what=what)
        survivors = _field(request, "survivors", "ids", what=what)
        surv = set(survivors)
        if len(surv) != len(survivors) or not surv <= set(setup.cohort):
            raise SecAggInputError(f"{what}: survivors must be distinct members of the cohort")
        if me not in surv:
            raise SecAggInputError(f"{what}: this client is not listed among the survivors")
        if len(surv) < setup.min_survivors:
            raise SecAggAbort(f"{what}: only {len(surv)} survivors (< {setup.min_survivors}); refusing to unmask")
        graph = setup.graph
        if not is_connected(graph, surv):
            raise SecAggAbort(f"{what}: the survivors' graph is disconnected; unmasking would reveal partial sums")
        senders = _field(request, "senders", "ids", what=what)
        mine = set(setup.holders(me))
        if len(set(senders)) != len(senders) or not set(senders) <= (mine & surv):
            raise SecAggInputError(f"{what}: senders must be distinct surviving neighbours of this client")
        pks = _field(request, "sender_enc_pks", "bytes", what=what)
        cts = _field(request, "ciphertexts", "bytes", what=what)
        size = _ciphertext_size(setup.degree)
        if len(pks) != PUBLIC_KEY_BYTES * len(senders) or len(cts) != size * len(senders):
            raise SecAggInputError(f"{what}: expected {len(senders)} public keys and ciphertexts of {size} bytes")
        b_owners, b_shares, pair_owners, pair_peers, pair_shares = [], [], [], [], []
        for i, w in enumerate(senders):
            pk = self.keys.enc_public if w == me else pks[i * 32:(i + 1) * 32]
            key = _share_key(self.keys, w, me, pk, setup.digest)
            plain = open_sealed(key, cts[i * size:(i + 1) * size], _share_ad(setup.run_id, setup.round, w, me, setup.digest),
                                what=f"{what}: shares from client {w}")
            vals = shamir.share_from_bytes(plain, what=f"{what}: shares from client {w}")
            if len(vals) != 1 + len(graph[w]):
                raise SecAggInputError(f"{what}: shares from client {w} have the wrong count")
            b_owners.append(w)
            b_shares.append(vals[0])
            for x, s in zip(graph[w], vals[1:]):
                if x not in surv:  # only pairs with dropped clients; never a survivor-survivor seed
                    pair_owners.append(w)
                    pair_peers.append(x)
                    pair_shares.append(s)
        return {"client_id": me, "run_id": setup.run_id, "round": setup.round,
                "b_owners": np.asarray(b_owners, dtype=np.uint64), "b_shares": shamir.share_to_bytes(b_shares),
                "pair_owners": np.asarray(pair_owners, dtype=np.uint64),
                "pair_peers": np.asarray(pair_peers, dtype=np.uint64), "pair_shares": shamir.share_to_bytes(pair_shares)}


# ---------------------------------------------------------------------------------- server
@dataclass
class SecAggResult:
    """What the server learns: the cohort totals (and who took part)."""

    run_id: int
    round: int
    total: np.ndarray                   # sum of the survivors' clipped updates (+ DDP noise), float64
    extras: dict[str, float]            # totals of the extras, by name
    int_sum: np.ndarray                 # the exact signed integer sum (quantized units), update then extras
    survivors: tuple[int, ...]          # clients whose vectors are in the sum
    dropped_before_masking: tuple[int, ...]
    dropped_before_unmasking: tuple[int, ...]
    modulus_bits: int

    @property
    def num_clients(self) -> int:
        return len(self.survivors)


class SecAggServer:
    """The server side for one run: the key directory, and :meth:`start_round` for each round."""

    def __init__(self, config: SecAggConfig, *, run_id: int, rng: SecureRNG | None = None):
        self.config = config
        self.run_id = _check_id(run_id, what="SecAggServer run_id")
        self.rng = rng or SecureRNG()
        self._enc_pk: dict[int, bytes] = {}
        self._mask_pk: dict[int, bytes] = {}

    def register(self, advert: Mapping[str, Any]) -> None:
        """Record a client's :meth:`SecAggClient.advertise` payload (once per run)."""
        what = "key advertisement"
        cid = _check_id(_field(advert, "client_id", "int", what=what), what=what)
        if cid in self._enc_pk:
            raise SecAggInputError(f"{what}: duplicated client id {cid}")
        enc = _field(advert, "enc_pk", "bytes", what=what)
        mask = _field(advert, "mask_pk", "bytes", what=what)
        try:
            load_public_key(enc), load_public_key(mask)
        except ValueError as e:
            raise SecAggInputError(f"{what} of client {cid}: {e}") from None
        self._enc_pk[cid] = enc
        self._mask_pk[cid] = mask

    @property
    def registered(self) -> tuple[int, ...]:
        return tuple(sorted(self._enc_pk))

    def start_round(self, round: int, cohort: Iterable[int], length: int) -> "SecAggRound":
        """Open a round over ``cohort`` for update vectors of ``length`` coordinates."""
        ids = [_check_id(c, what="cohort") for c in cohort]
        if len(set(ids)) != len(ids):
            raise SecAggInputError("cohort: duplicated client id")
        unknown = [c for c in ids if c not in self._enc_pk]
        if unknown:
            raise SecAggInputError(f"cohort: clients {unknown[:5]} have not advertised keys in this run")
        if isinstance(length, bool) or int(length) != length or length < 1:
            raise SecAggInputError(f"length must be an integer >= 1. You passed: {length}")
        k, t, m = self.config.round_params(len(ids))
        setup = _RoundSetup(run_id=self.run_id, round=_check_id(round, what="round"), cohort=tuple(sorted(ids)),
                            graph_seed=self.rng.bytes(32), degree=k, threshold=t, min_survivors=m,
                            modulus_bits=self.config.modulus_bits, length=int(length), num_extras=len(self.config.extras))
        logger.info("secagg round %d: %d clients, k=%d, t=%d, min_survivors=%d, modulus 2^%d, %d coordinates",
                    setup.round, len(ids), k, t, m, setup.modulus_bits, setup.length)
        return SecAggRound(self, setup)


class SecAggRound:
    """One round on the server: stage-1 requests, masked inputs, unmask requests, unmask replies, the sum."""

    def __init__(self, server: SecAggServer, setup: _RoundSetup):
        self._server = server
        self.setup = setup
        self._stage = 1
        width = setup.length + setup.num_extras
        self._acc = np.zeros(width, dtype=np.uint64)
        self._received: set[int] = set()
        self._cts: dict[int, dict[int, bytes]] = {}   # holder -> sender -> ciphertext
        self._survivors: tuple[int, ...] = ()
        self._forwarded: dict[int, tuple[int, ...]] = {}
        self._responded: set[int] = set()
        self._b_shares: dict[int, list[tuple[int, int]]] = {}
        self._pair_shares: dict[tuple[int, int], list[tuple[int, int]]] = {}

    # ---- stage 1
    def masked_input_requests(self) -> dict[int, dict[str, Any]]:
        """The per-client round setup to send with the train request."""
        s, srv = self.setup, self._server
        out = {}
        for c in s.cohort:
            nb = s.graph[c]
            out[c] = {**s.to_fields(), "client_id": c, "neighbours": _ids(nb),
                      "neighbour_enc_pks": b"".join(srv._enc_pk[v] for v in nb),
                      "neighbour_mask_pks": b"".join(srv._mask_pk[v] for v in nb)}
        return out

    def _check_sender(self, reply: Mapping[str, Any], what: str) -> int:
        cid = _field(reply, "client_id", "int", what=what)
        if cid not in self.setup.graph:
            raise SecAggInputError(f"{what}: unknown client id {cid} (not in this round's cohort)")
        run_id, rnd = _field(reply, "run_id", "int", what=what), _field(reply, "round", "int", what=what)
        if (run_id, rnd) != (self.setup.run_id, self.setup.round):
            raise SecAggInputError(f"{what} from client {cid}: it is for run {run_id} round {rnd}, this is run "
                                   f"{self.setup.run_id} round {self.setup.round}")
        return cid

    def receive_masked(self, reply: Mapping[str, Any]) -> None:
        """Add a client's masked vector to the running sum and keep its ciphertexts for forwarding."""
        what = "masked input"
        if self._stage != 1:
            raise SecAggInputError(f"{what}: stage 1 is closed; late message rejected")
        cid = self._check_sender(reply, what)
        if cid in self._received:
            raise SecAggInputError(f"{what}: duplicated message from client {cid}")
        s = self.setup
        packed = reply.get("masked")
        width = s.length + s.num_extras
        if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
            raise SecAggInputError(f"{what} from client {cid}: 'masked' must be a 1-D uint8 array "
                                   f"({s.modulus_bits}-bit packed residues)")
        if packed.size != packed_size(width, s.modulus_bits):
            raise SecAggInputError(
                f"{what} from client {cid}: wrong length or modulus: {packed.size} bytes, expected "
                f"{packed_size(width, s.modulus_bits)} ({width} values of {s.modulus_bits} bits)")
        try:
            vec = unpack_bits(packed, s.modulus_bits, width)
        except ValueError as e:
            raise SecAggInputError(f"{what} from client {cid}: {e} (wrong length or modulus)") from None
        holders = s.holders(cid)
        if _field(reply, "share_holders", "ids", what=what) != list(holders):
            raise SecAggInputError(f"{what} from client {cid}: share holders do not match the graph")
        cts = _field(reply, "ciphertexts", "bytes", what=what)
        size = _ciphertext_size(s.degree)
        if len(cts) != size * len(holders):
            raise SecAggInputError(f"{what} from client {cid}: expected {len(holders)} ciphertexts of {size} bytes")
        np.add(self._acc, vec, out=self._acc)
        self._received.add(cid)
        for j, h in enumerate(holders):
            self._cts.setdefault(h, {})[cid] = cts[j * size:(j + 1) * size]

    # ---- stage 2
    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Close stage 1; the unmask request for each survivor. Raises SecAggAbort if too few survived."""
        if self._stage != 1:
            raise SecAggInputError("unmask requests were already produced for this round")
        self._stage = 2
        s = self.setup
        surv = tuple(sorted(self._received))
        self._survivors = surv
        if len(surv) < s.min_survivors:
            self._stage = 0
            raise SecAggAbort(f"round {s.round}: only {len(surv)} of {len(s.cohort)} clients sent masked inputs "
                              f"(< min_survivors={s.min_survivors}); aborted, nothing revealed")
        if not is_connected(s.graph, surv):
            self._stage = 0
            raise SecAggAbort(f"round {s.round}: the survivors' graph is disconnected; aborted, nothing revealed")
        out = {}
        for v in surv:
            senders = tuple(sorted(w for w in self._cts.get(v, {}) if w in self._received))
            self._forwarded[v] = senders
            out[v] = {**s.to_fields(), "client_id": v, "survivors": _ids(surv), "senders": _ids(senders),
                      "sender_enc_pks": b"".join(self._server._enc_pk[w] for w in senders),
                      "ciphertexts": b"".join(self._cts[v][w] for w in senders)}
        self._cts.clear()
        return out

    def receive_unmask(self, reply: Mapping[str, Any]) -> None:
        what = "unmask reply"
        if self._stage != 2:
            raise SecAggInputError(f"{what}: the unmask stage is not open")
        cid = self._check_sender(reply, what)
        if cid not in self._forwarded:
            raise SecAggInputError(f"{what}: client {cid} did not send a masked input in this round")
        if cid in self._responded:
            raise SecAggInputError(f"{what}: duplicated message from client {cid}")
        surv = set(self._survivors)
        graph = self.setup.graph
        allowed = set(self._forwarded[cid])
        b_owners = _field(reply, "b_owners", "ids", what=what)
        b_vals = shamir.share_from_bytes(_field(reply, "b_shares", "bytes", what=what), what=what)
        p_owners = _field(reply, "pair_owners", "ids", what=what)
        p_peers = _field(reply, "pair_peers", "ids", what=what)
        p_vals = shamir.share_from_bytes(_field(reply, "pair_shares", "bytes", what=what), what=what)
        if len(b_vals) != len(b_owners) or not (len(p_owners) == len(p_peers) == len(p_vals)):
            raise SecAggInputError(f"{what} from client {cid}: share arrays have inconsistent lengths")
        if len(set(b_owners)) != len(b_owners) or not set(b_owners) <= allowed:
            raise SecAggInputError(f"{what} from client {cid}: self-mask shares of clients it was not sent")
        pairs = list(zip(p_owners, p_peers))
        if len(set(pairs)) != len(pairs) or any(w not in allowed or x not in graph[w] or x in surv for w, x in pairs):
            raise SecAggInputError(f"{what} from client {cid}: pair shares for pairs it may not reveal")
        x = shamir.point_of(cid)
        self._responded.add(cid)
        for w, val in zip(b_owners, b_vals):
            self._b_shares.setdefault(w, []).append((x, val))
        for pair, val in zip(pairs, p_vals):
            self._pair_shares.setdefault(pair, []).append((x, val))

    def finish(self) -> SecAggResult:
        """Close stage 2, reconstruct the needed seeds, remove the masks; raise SecAggAbort if shares are missing."""
        if self._stage != 2:
            raise SecAggInputError("finish() needs the unmask stage to be open")
        self._stage = 0
        s = self.setup
        t = s.threshold
        surv = self._survivors
        survset = set(surv)
        needed_pairs = [(w, x) for w in surv for x in s.graph[w] if x not in survset]
        short = [f"self-mask of {w} ({len(self._b_shares.get(w, []))}/{t} shares)" for w in surv
                 if len(self._b_shares.get(w, [])) < t]
        short += [f"pair mask {w}-{x} ({len(self._pair_shares.get((w, x), []))}/{t} shares)" for w, x in needed_pairs
                  if len(self._pair_shares.get((w, x), [])) < t]
        if short:
            self._b_shares.clear()
            self._pair_shares.clear()
            raise SecAggAbort(f"round {s.round}: not enough shares to unmask ({len(self._responded)} of {len(surv)} "
                              f"survivors answered): {'; '.join(short[:5])}{' ...' if len(short) > 5 else ''}; "
                              "aborted, nothing revealed")
        acc = self._acc
        expander = MaskExpander(acc.size)
        for w in surv:
            expander.add_into(acc, shamir.reconstruct(self._b_shares[w], t), -1)
        for w, x in needed_pairs:
            # w added sign(w, x) * PRG(s_wx); remove it
            expander.add_into(acc, shamir.reconstruct(self._pair_shares[(w, x)], t), -1 if w < x else 1)
        acc &= np.uint64((1 << s.modulus_bits) - 1)
        total, extras, signed = self._server.config.quantizer.decode_sum(acc, s.length)
        self._b_shares.clear()
        self._pair_shares.clear()
        return SecAggResult(run_id=s.run_id, round=s.round, total=total, extras=extras, int_sum=signed,
                            survivors=surv, dropped_before_masking=tuple(c for c in s.cohort if c not in survset),
                            dropped_before_unmasking=tuple(c for c in surv if c not in self._responded),
                            modulus_bits=s.modulus_bits)


# ------------------------------------------------------------------------- in-process driver
@dataclass
class SecAggStats:
    """Costs measured by :func:`run_secure_sum` (CPU seconds of this process, payload bytes)."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)


def run_secure_sum(updates: Mapping[int, np.ndarray], config: SecAggConfig, *,
                   extras: Mapping[int, Mapping[str, float]] | None = None,
                   drop_before_masking: Iterable[int] = (), drop_before_unmasking: Iterable[int] = (),
                   run_id: int = 0, round: int = 1, server: SecAggServer | None = None,
                   clients: Mapping[int, SecAggClient] | None = None, rng: SecureRNG | None = None,
                   stats: SecAggStats | None = None) -> SecAggResult:
    """Play the server and every client of ``updates`` in one process; return what the server learns.

    Clients in ``drop_before_masking`` receive the round setup but never reply; clients in
    ``drop_before_unmasking`` send their masked input but not their unmask reply. Pass
    ``server`` and ``clients`` to run several rounds with the same long-term keys (clients not
    yet registered with the server are registered). ``rng`` (deterministic) is for tests.
    """
    cohort = sorted(int(c) for c in updates)
    drop1, drop2 = set(drop_before_masking), set(drop_before_unmasking)
    if not (drop1 | drop2) <= set(cohort):
        raise SecAggInputError("dropped clients must be members of the cohort")
    extras = extras or {}

    def child_rng() -> SecureRNG | None:
        return SecureRNG(rng.bytes(32)) if rng is not None else None

    server = server or SecAggServer(config, run_id=run_id, rng=child_rng())
    clients = dict(clients or {})
    for c in cohort:
        if c not in clients:
            clients[c] = SecAggClient(c, config, rng=child_rng())
        if c not in server.registered:
            server.register(clients[c].advertise())
    stats = stats if stats is not None else SecAggStats()

    def timed(fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        return out, time.process_time() - t0

    length = int(np.asarray(updates[cohort[0]]).size)
    rnd, dt = timed(server.start_round, round, cohort, length)
    stats.server_seconds += dt
    requests, dt = timed(rnd.masked_input_requests)
    stats.server_seconds += dt
    for c in cohort:
        stats.bytes_down[c] = stats.bytes_down.get(c, 0) + payload_nbytes(requests[c])
        if c in drop1:
            continue
        reply, dt = timed(clients[c].masked_input, requests[c], updates[c], extras.get(c))
        stats.client_seconds[c] = stats.client_seconds.get(c, 0.0) + dt
        stats.bytes_up[c] = stats.bytes_up.get(c, 0) + payload_nbytes(reply)
        _, dt = timed(rnd.receive_masked, reply)
        stats.server_seconds += dt
    unmask, dt = timed(rnd.unmask_requests)
    stats.server_seconds += dt
    for c, req in unmask.items():
        stats.bytes_down[c] += payload_nbytes(req)
        if c in drop2:
            continue
        reply, dt = timed(clients[c].unmask, req)
        stats.client_seconds[c] += dt
        stats.bytes_up[c] += payload_nbytes(reply)
        _, dt = timed(rnd.receive_unmask, reply)
        stats.server_seconds += dt
    result, dt = timed(rnd.finish)
    stats.server_seconds += dt
    return result
