"""The SecAgg+ specification: three message exchanges per round, stateless, round-bound secrets, a malicious server.

This module holds what both sides share: the protocol parameters (:class:`SecAggParams`), the round setup and
digest, the key derivations, the signed messages and the payload checks. The client side is
:mod:`fedpersona.privacy.secagg.client_side`, the server side :mod:`fedpersona.privacy.secagg.server_side`, an in-process
driver :mod:`fedpersona.privacy.secagg.driver`.

The server must learn only the sum of the surviving clients' quantized updates (and of their extras),
never an individual update, **even if it deviates from the protocol**: it may show different clients
different survivor sets, invent clients, replay or alter messages. Flower's SecAgg+ (Bonawitz et al.
CCS 2017, Bell et al. CCS 2020, semi-honest variant) needs four client exchanges per round and has no
consistency check. This protocol needs three (the masked input rides on the training message), plus
one key advertisement per run, and runs the consistency check of Bonawitz et al.'s actively secure
variant.

Messages (dicts of str/int/float/bool/bytes/1-D numpy arrays, so that Flower's
ConfigRecord / ArrayRecord can carry them):

0. **advertise** (once per run), client -> server: ``client_id``, ``enc_pk``, ``mask_pk``: the
   public halves of two long-term X25519 key pairs (one to encrypt shares, one to agree pairwise mask
   seeds), ``sign_pk``: an Ed25519 key it signs with, and, bound to them, its identity
   (:mod:`fedpersona.identity`): ``identity`` (a public key), ``certificate`` (the trust root's
   signature over it) and ``binding`` (the identity's signature over :func:`binding_message`: run,
   node id and the three keys). The server keeps them in a per-run key directory (:class:`KeyRecord`).
1. **masked input** (the same exchange as training). Server -> client: round setup (run id,
   round, cohort, a fresh random 32-byte ``graph_seed``, degree ``k``, threshold ``t``, minimum
   number of survivors, modulus bits, vector length, ``context``) and the key records of the client's
   neighbours in the SecAgg+ graph (:mod:`fedpersona.privacy.secagg.graph`), which every party derives from
   (cohort, k, graph_seed). Client -> server: the masked vector, packed at b bits per coordinate
   (:func:`~fedpersona.privacy.secagg.quantize.pack_bits`: exactly the size of the b-bit quantized vector),
   for each of its ``k + 1`` share holders (its neighbours and itself) one AES-GCM ciphertext of its
   shares, and its ``signature`` over :func:`masked_message` (round digest, its id, SHA-256 of the
   vector and of the ciphertexts). A client that takes no part replies with a signed decline.
2. **consistency**. Server -> each survivor: the survivor set S. Client -> server: its signature over
   :func:`consistency_message` (round digest, S).
3. **unmask**. Server -> each survivor that signed: S, the signatures over S with the signers' key
   records, and the ciphertexts addressed to it. Client -> server: shares of the self-mask seeds of
   survivors, and shares of the pairwise seeds between survivors and dropped clients; the senders
   whose ciphertexts did not open (``undecryptable``). The server reconstructs and removes the masks
   and obtains the sum.

The round digest ``D`` = SHA-256 of every round parameter (run, round, cohort, graph seed, k, t,
minimum survivors, modulus, length, context) salts every key derivation, is part of every ciphertext's
associated data and of every signed message: a ciphertext, share, mask or signature of another run,
round, another setup of the same round (a retried round) or another context is useless or rejected.
``context`` is opaque bytes the caller binds into the round (what the sum is of, e.g. the parameters
of a DP step); a device compares it with the value it computes itself.

Masking. Client ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) PRG(s_uv)``
mod ``2^b``, where ``x_u`` is its quantized vector (:mod:`fedpersona.privacy.secagg.quantize`),
``sign = +1`` if ``u < v`` else ``-1``,

* ``b_u``: a fresh random self-mask seed (127 bits) drawn for this round only;
* ``s_uv = HKDF(X25519(mask_sk_u, mask_pk_v), salt=D, info=("pair-mask", min(u,v), max(u,v)))``:
  a per-round pairwise seed both ends compute without any message.

In the same reply, ``u`` Shamir-shares (t of k + 1, over GF(2^127 - 1)) ``b_u`` *and each of
its k per-round pairwise seeds* ``s_uv`` among its share holders, each holder's shares
encrypted under ``HKDF(X25519(enc_sk_u, enc_pk_h), salt=D, info=("share-enc", u, h))`` with
associated data (run, round, u, h, D). The ciphertext to itself lets the client stay
stateless between the stages (a fresh Flower ClientApp process handles each message):
its only state is its long-term key pairs (and, on a device, the survivor set it signed).

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

**That argument needs every holder to answer for the same S.** A server that tells each holder ``h``
of a victim ``v`` that every neighbour of ``v`` but ``h`` dropped collects, from each ``h``, a share
of ``b_v`` and of ``s_vx`` for the neighbours ``x`` it was told dropped: with enough holders, every
mask of ``v`` and its update (the split-view attack; at degree 4 with 9 clients, or at the default
degree in cohorts of 33 or more, where such views stay connected and large enough). Hence:

* **The consistency check** (Bonawitz et al. 2017, actively secure variant). Each survivor signs
  (D, S) once per round digest and remembers it before replying (a device in its encrypted store,
  :mod:`fedpersona.client.secagg`); it answers an unmask request only for that very S, and only when the
  request carries at least ``q`` valid signatures over (D, S) from distinct members of the cohort
  whose keys are bound to distinct certified identities, with
  ``q = max(t, min_survivors, floor((K + c) / 2) + 1)`` (:func:`consistency_quorum`; ``K`` the
  announced cohort, ``c`` the colluding clients the device assumes, its policy's
  ``policy.max-colluders``, default 0). Why that many: honest clients sign at most one set each;
  ``c`` colluders sign anything; two different sets certified by ``q`` signatures each need
  ``2 (q - c)`` distinct honest signers among the ``K - c`` honest members, impossible when
  ``q > (K + c) / 2``. So at most one survivor set can be certified, and every honest holder that
  reveals anything reveals for that one set: the case the unmasking argument covers. The server
  needs the same quorum (with ``c = 0``) and asks for no share without it.
* **Keys the server cannot forge.** A client with a trust root masks only against neighbours whose
  key record verifies (:meth:`KeyRecord.verify`: the root certifies the identity, the identity signed
  these keys for this node id in this run) and whose identities are distinct (and not its own), and
  counts a consistency signature only from such a record. Otherwise the server could put the victim
  in a cohort with node ids whose keys it generated (it would know their pair seeds and decrypt
  their shares of ``b_v``: the update without any unmask request), or sign the consistency set for
  clients that do not exist. The server needs no root: it checks what it can (the identity's
  binding signature) and forwards the records.
* **Authenticated stage-1 replies.** The server verifies each masked input and decline against the
  client's advertised signing key, over the round digest: a replayed reply of another round (whose
  ciphertexts would fail every holder's decryption) or an altered vector is rejected, and that client
  is a dropout. A holder whose ciphertext from some sender does not open (tampered on the way, or a
  malicious sender) skips it, names the sender and answers for the rest.

Checks. Pairwise masks only cancel within a connected component of the graph induced on S,
so the server could otherwise learn one sum per component: clients (and the server) refuse
to unmask unless S is connected and ``|S| >= min_survivors`` (default t), the client's own floor
(plus its assumed colluders) and the consistency quorum. The random Harary graph is k-connected,
so fewer than k dropped clients can never disconnect it. If fewer than t shares of any needed
secret arrive, the round raises :class:`SecAggAbort` before reconstructing anything; what the
server holds then (some self-mask seeds, some dropped pairs' seeds) leaves every component sum
masked by an unknown seed. Clients also check that the round parameters equal the ones their own
config implies (the server cannot lower the threshold), the modulus and vector length, and that
the graph matches the seed; a device's policy also refuses a degree below what SecAgg+'s analysis
needs for the cohort size (:func:`fedpersona.client.policy.required_degree`).

Dropouts tolerated. The round completes iff S is connected with ``|S| >= min_survivors``, at least
``q`` survivors sign S, and every client in S has at least t of its k + 1 holders answering the
unmask request. With the complete graph (small cohorts, ``k = n - 1``) that is: any drops that leave
at least t clients answering the unmask request (``t`` is then a strict majority of the cohort, so
``q = t``).

Threat model and limits: a malicious server (it may deviate in every message) colluding with at
most ``c`` clients, fewer than t of any client's k + 1 holders, and (c > 0) the device's threshold
rule ``t >= policy.min-contributors + c``; a trust root whose private key the server does not hold
(the operator's, kept offline; a simulation's run-level root). The server still chooses the cohort
and the graph seed, sees who took part at each stage, and can abort any round (drop messages); a
malicious client can make a round abort by sending shares that do not open (its holders name it).
Transport security (TLS) and node authentication are Flower's (SuperNode auth).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedpersona.privacy.secagg import shamir
from fedpersona.identity import verify as verify_signature
from fedpersona.identity import verify_certificate
from fedpersona.privacy.secagg.crypto import PUBLIC_KEY_BYTES, SEAL_OVERHEAD, SIGNATURE_BYTES, ClientKeys, derive, ecdh, encode_fields
from fedpersona.privacy.secagg.graph import build_graph, default_degree, default_threshold
from fedpersona.privacy.secagg.quantize import ExtraSpec, Quantizer

__all__ = ["KEY_FIELDS", "KeyRecord", "SecAggAbort", "SecAggParams", "SecAggInputError", "binding_message",
           "consistency_message", "consistency_quorum", "decline_message", "masked_message", "pack_key_records",
           "payload_nbytes", "request_digest", "round_digest", "unpack_key_records"]

_U64 = 2**64


class SecAggAbort(RuntimeError):
    """The round cannot complete without revealing more than the sum: it is abandoned, nothing is revealed."""


class SecAggInputError(ValueError):
    """A message or argument is malformed, inconsistent, duplicated, from an unknown client, or for another round."""


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SecAggParams:
    """Protocol parameters both sides share (derive once, pass to :class:`SecAggClient` and :class:`SecAggServer`).

    Args:
        clip_norm: L2 norm bound C of a client's update.
        scale: quantization scale s (quantized units per unit of update).
        max_cohort: the largest cohort; fixes the modulus (see :mod:`fedpersona.privacy.secagg.quantize`).
        extras: named scalars summed under the same masks (example counts, metrics).
        noise_stddev: per-client discrete Gaussian stddev in quantized units (0: no distributed DP).
        noise_tail_sigmas: clamp of the noise in stddevs.
        rounding_beta: conditional rounding parameter used with noise.
        degree: graph degree k (None: ``2 ceil(1.5 log2 n)``); rounded up to even, capped at n - 1.
        threshold: Shamir threshold t (None: strict majority of the k + 1 holders).
        min_survivors: fewest stage-1 survivors the round accepts (None: t; never fewer than t).
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
                raise ValueError(f"SecAggParams.{name} must be None or an integer >= 1. You passed: {v}")
        if int(self.max_cohort) != self.max_cohort or self.max_cohort < 2:
            raise ValueError(f"SecAggParams.max_cohort must be an integer >= 2. You passed: {self.max_cohort}")
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
        # Fewer than t survivors can never give t shares of a self-mask: a lower minimum only lets a
        # round run into an abort after the unmask requests went out.
        m = max(self.min_survivors or 0, t, 2)
        if not 2 <= m <= n:
            raise SecAggInputError(f"min_survivors={m} must be in [2, n={n}]")
        return k, t, m


def round_digest(*, run_id: int, round: int, cohort: Sequence[int], graph_seed: bytes, degree: int, threshold: int,
                 min_survivors: int, modulus_bits: int, length: int, num_extras: int, context: bytes = b"") -> bytes:
    enc = encode_fields("round", run_id, round, degree, threshold, min_survivors, modulus_bits, length, num_extras,
                        graph_seed, bytes(context), *sorted(int(c) for c in cohort))
    return hashlib.sha256(enc).digest()


def request_digest(request: Mapping[str, Any], *, what: str = "request") -> bytes:
    """The round digest of a masked-input or unmask request (SecAggInputError if its setup is malformed)."""
    return _RoundSetup.from_fields(request, what=what).digest


# ------------------------------------------------------------------------- signed messages
def binding_message(run_id: int, client_id: int, enc_pk: bytes, mask_pk: bytes, sign_pk: bytes) -> bytes:
    """What a device's identity key signs: its per-run public keys bound to its node id in this run."""
    return encode_fields("key-binding", run_id, client_id, enc_pk, mask_pk, sign_pk)


def masked_message(digest: bytes, client_id: int, masked: bytes | np.ndarray, ciphertexts: bytes) -> bytes:
    """What a client signs with its stage-1 reply: the round digest, its id, hashes of its vector and ciphertexts
    (``masked``: the packed vector's bytes, or the packed ``uint8`` array itself)."""
    if isinstance(masked, np.ndarray):
        masked = np.ascontiguousarray(masked)
    return encode_fields("masked-input", client_id, digest, hashlib.sha256(masked).digest(),
                         hashlib.sha256(ciphertexts).digest())


def decline_message(digest: bytes, client_id: int) -> bytes:
    """What a client signs when it declines a round in stage 1."""
    return encode_fields("decline", client_id, digest)


def consistency_message(digest: bytes, survivors: Iterable[int]) -> bytes:
    """What every survivor signs in the consistency check: the round digest and the survivor set."""
    return encode_fields("consistency", digest, *sorted(int(c) for c in survivors))


def consistency_quorum(cohort_size: int, *, threshold: int, min_survivors: int, colluders: int = 0) -> int:
    """Signatures over one survivor set a client needs before it unmasks: ``max(t, min_survivors, floor((K + c) / 2) + 1)``.

    An honest client signs one survivor set per round digest. Two different sets certified by ``q``
    signatures each need ``2 (q - c)`` distinct honest signers among the ``K - c`` honest members of
    the announced cohort (``c`` colluders sign both), impossible when ``q > (K + c) / 2``.
    """
    if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0:
        raise ValueError(f"colluders must be an integer >= 0. You passed: {colluders!r}")
    return max(int(threshold), int(min_survivors), (int(cohort_size) + colluders) // 2 + 1)


#: Fixed-size fields of a client's public key record, in the order they travel.
KEY_FIELDS = (("enc_pk", PUBLIC_KEY_BYTES), ("mask_pk", PUBLIC_KEY_BYTES), ("sign_pk", PUBLIC_KEY_BYTES),
              ("identity", PUBLIC_KEY_BYTES), ("certificate", SIGNATURE_BYTES), ("binding", SIGNATURE_BYTES))
#: The plural field names a list of key records travels under (``neighbour_enc_pks``, ``signer_bindings`` ...).
_PLURAL = {"enc_pk": "enc_pks", "mask_pk": "mask_pks", "sign_pk": "sign_pks", "identity": "identities",
           "certificate": "certificates", "binding": "bindings"}


@dataclass(frozen=True)
class KeyRecord:
    """A client's public keys and, when it has an identity, what binds them to it (all-zero fields: unbound)."""

    client_id: int
    enc_pk: bytes
    mask_pk: bytes
    sign_pk: bytes
    identity: bytes = bytes(PUBLIC_KEY_BYTES)
    certificate: bytes = bytes(SIGNATURE_BYTES)
    binding: bytes = bytes(SIGNATURE_BYTES)

    @property
    def bound(self) -> bool:
        return any(self.identity)

    @classmethod
    def from_advert(cls, advert: Mapping[str, Any], *, what: str = "key advertisement") -> "KeyRecord":
        cid = _check_id(_field(advert, "client_id", "int", what=what), what=what)
        values = {}
        for name, size in KEY_FIELDS:
            if name in ("enc_pk", "mask_pk", "sign_pk"):
                v = _field(advert, name, "bytes", what=what)
            else:  # identity, certificate, binding: empty for a client without an identity
                v = _field(advert, name, "bytes", what=what) if name in advert else b""
                v = v or bytes(size)
            if len(v) != size:
                raise SecAggInputError(f"{what} of client {cid}: field {name!r} must be {size} bytes. You passed: "
                                       f"{len(v)}")
            values[name] = v
        return cls(cid, **values)

    def verify(self, run_id: int, trust_root: bytes) -> str | None:
        """None if the root certifies this record's identity and the identity signed these keys for this
        node id in this run; else the reason."""
        if not self.bound:
            return "it presents no identity (unbound keys)"
        if not verify_certificate(trust_root, self.identity, self.certificate):
            return "its identity is not certified by this device's trust root"
        msg = binding_message(run_id, self.client_id, self.enc_pk, self.mask_pk, self.sign_pk)
        if not verify_signature(self.identity, self.binding, msg):
            return "its keys are not signed by its identity for this node id and run"
        return None


def pack_key_records(records: Sequence[KeyRecord], prefix: str) -> dict[str, bytes]:
    """Key records as concatenated fixed-size fields (``<prefix>_enc_pks`` ...)."""
    return {f"{prefix}_{_PLURAL[name]}": b"".join(getattr(r, name) for r in records) for name, _ in KEY_FIELDS}


def unpack_key_records(msg: Mapping[str, Any], ids: Sequence[int], prefix: str, *, what: str) -> dict[int, KeyRecord]:
    """Inverse of :func:`pack_key_records` for the clients ``ids`` (in order)."""
    cols = {}
    for name, size in KEY_FIELDS:
        raw = _field(msg, f"{prefix}_{_PLURAL[name]}", "bytes", what=what)
        if len(raw) != size * len(ids):
            raise SecAggInputError(f"{what}: expected {len(ids)} {_PLURAL[name]} of {size} bytes")
        cols[name] = [raw[i * size:(i + 1) * size] for i in range(len(ids))]
    return {c: KeyRecord(c, **{name: cols[name][i] for name, _ in KEY_FIELDS}) for i, c in enumerate(ids)}


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
    context: bytes = b""

    @cached_property
    def graph(self) -> dict[int, tuple[int, ...]]:
        return build_graph(self.cohort, self.degree, self.graph_seed)

    @cached_property
    def digest(self) -> bytes:
        return round_digest(run_id=self.run_id, round=self.round, cohort=self.cohort, graph_seed=self.graph_seed,
                            degree=self.degree, threshold=self.threshold, min_survivors=self.min_survivors,
                            modulus_bits=self.modulus_bits, length=self.length, num_extras=self.num_extras,
                            context=self.context)

    def holders(self, cid: int) -> tuple[int, ...]:
        return tuple(sorted(self.graph[cid] + (cid,)))

    def to_fields(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "round": self.round, "cohort": _ids(self.cohort), "graph_seed": self.graph_seed,
                "degree": self.degree, "threshold": self.threshold, "min_survivors": self.min_survivors,
                "modulus_bits": self.modulus_bits, "length": self.length, "num_extras": self.num_extras,
                "context": self.context}

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
                   length=_field(msg, "length", "int", what=what), num_extras=_field(msg, "num_extras", "int", what=what),
                   context=_field(msg, "context", "bytes", what=what))

    def check_against(self, config: SecAggParams, *, what: str) -> None:
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
