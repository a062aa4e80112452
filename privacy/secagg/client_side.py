"""The client side of SecAgg+ (:mod:`fedpersona.privacy.secagg.spec`): advertise, masked input, consistency, unmask."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from fedpersona.identity import DeviceIdentity
from fedpersona.privacy.secagg import shamir
from fedpersona.privacy.secagg.crypto import SIGNATURE_BYTES, ClientKeys, DecryptionError, MaskExpander, SecureRNG, open_sealed, seal
from fedpersona.privacy.secagg.graph import is_connected
from fedpersona.privacy.secagg.quantize import pack_bits
from fedpersona.privacy.secagg.spec import (KeyRecord, SecAggAbort, SecAggParams, SecAggInputError, _check_id, _ciphertext_size,
                                 _field, _ids, _pair_seed, _RoundSetup, _share_ad, _share_key, binding_message,
                                 consistency_message, consistency_quorum, decline_message, masked_message,
                                 unpack_key_records, verify_signature)

__all__ = ["SecAggClient"]

logger = logging.getLogger(__name__)


class SecAggClient:
    """The device side. Stateless between messages except for its long-term keys (:meth:`state`).

    The Flower client calls :meth:`advertise` once per run, :meth:`masked_input` with the
    train request (or :meth:`decline`), :meth:`consistency` with the consistency request and
    :meth:`unmask` with the unmask request; it persists :meth:`state` in the device's own store
    (it holds private keys: never put it in a message), and the survivor set it signed per round
    digest (:meth:`unmask` takes it as ``signed``; within one object it is remembered).

    Args:
        identity: the device's identity (:mod:`fedpersona.identity`); signs the binding of its keys.
        trust_root: the root public key whose certificates this client accepts (default: the
            identity's root). With a root, the client masks only against neighbours whose keys are
            bound to a certified identity, and counts only such signers in the consistency check.
            Without one (``None``) it accepts unbound keys: the weaker protocol, for tests and
            benchmarks; a device refuses it unless its own policy allows it (:mod:`fedpersona.client.secagg`).
        colluders: how many cohort members this client assumes may collude with the server (the
            consistency quorum grows with it, :func:`~fedpersona.privacy.secagg.spec.consistency_quorum`).
        floor: fewest survivors this client unmasks (besides the round's minimum); with
            ``colluders`` > 0 it needs ``floor + colluders``.
    """

    def __init__(self, client_id: int, config: SecAggParams, *, keys: ClientKeys | None = None,
                 rng: SecureRNG | None = None, identity: DeviceIdentity | None = None,
                 trust_root: bytes | None = None, colluders: int = 0, floor: int = 0):
        self.client_id = _check_id(client_id, what="SecAggClient")
        self.config = config
        self.keys = keys or ClientKeys()
        self.rng = rng or SecureRNG()
        self.identity = identity
        self.trust_root = trust_root if trust_root is not None else (identity.root if identity is not None else None)
        if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0:
            raise ValueError(f"colluders must be an integer >= 0. You passed: {colluders!r}")
        self.colluders = colluders
        self.floor = int(floor)
        self._signed: dict[bytes, tuple[int, ...]] = {}

    # ---- persistence
    def state(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "keys": self.keys.to_bytes()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: SecAggParams, *, rng: SecureRNG | None = None,
                   **kwargs) -> "SecAggClient":
        return cls(int(state["client_id"]), config, keys=ClientKeys.from_bytes(bytes(state["keys"])), rng=rng, **kwargs)

    # ---- stage 0
    def advertise(self, *, run_id: int = 0) -> dict[str, Any]:
        """Public keys, and (with an identity) its certificate and its signature binding them to this node in ``run_id``."""
        k = self.keys
        out = {"client_id": self.client_id, "enc_pk": k.enc_public, "mask_pk": k.mask_public, "sign_pk": k.sign_public}
        if self.identity is not None:
            run_id = _check_id(run_id, what="advertise run_id")
            out.update(identity=self.identity.public, certificate=self.identity.certificate,
                       binding=self.identity.sign(binding_message(run_id, self.client_id, k.enc_public, k.mask_public,
                                                                  k.sign_public)))
        return out

    def _check_peers(self, records: Mapping[int, KeyRecord], run_id: int, *, what: str, role: str) -> None:
        """With a trust root: every peer's keys bound to a certified identity, all identities distinct."""
        if self.trust_root is None:
            return
        seen = {self.identity.public} if self.identity is not None else set()
        for v, rec in records.items():
            if v == self.client_id:
                continue
            reason = rec.verify(run_id, self.trust_root)
            if reason is not None:
                raise SecAggInputError(f"{what}: {role} {v}: {reason}; refusing to use its keys")
            if rec.identity in seen:
                raise SecAggInputError(f"{what}: {role} {v} presents an identity already used by another member")
            seen.add(rec.identity)

    # ---- stage 1
    def masked_input(self, request: Mapping[str, Any], update: np.ndarray,
                     extras: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Quantize (+ noise), mask, share, and sign: the reply to a round's train / masked-input request."""
        what = f"masked-input request to client {self.client_id}"
        setup, records = self._check_masked_request(request, what)
        update = np.asarray(update).ravel()
        if update.size != setup.length:
            raise SecAggInputError(f"{what}: the update has {update.size} coordinates, the round expects {setup.length}")
        neighbours = setup.graph[self.client_id]
        enc_pk = {v: records[v].enc_pk for v in neighbours}
        enc_pk[self.client_id] = self.keys.enc_public
        mask_pk = {v: records[v].mask_pk for v in neighbours}
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
        packed = pack_bits(vec, setup.modulus_bits)
        ciphertexts = b"".join(cts)
        return {"client_id": me, "run_id": setup.run_id, "round": setup.round, "masked": packed,
                "share_holders": _ids(holders), "ciphertexts": ciphertexts,
                "signature": self.keys.sign(masked_message(digest, me, packed, ciphertexts))}

    def check_masked_request(self, request: Mapping[str, Any]) -> None:
        """What :meth:`masked_input` checks of the request before it uses it (round parameters, graph, the
        neighbours' key bindings): call it before spending anything on the round."""
        self._check_masked_request(request, f"masked-input request to client {self.client_id}")

    def _check_masked_request(self, request: Mapping[str, Any], what: str):
        setup = self._setup(request, what)
        neighbours = setup.graph[self.client_id]
        if _field(request, "neighbours", "ids", what=what) != list(neighbours):
            raise SecAggInputError(f"{what}: neighbour list does not match the graph derived from the graph seed")
        records = unpack_key_records(request, neighbours, "neighbour", what=what)
        self._check_peers(records, setup.run_id, what=what, role="neighbour")
        return setup, records

    def decline(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage-1 reply of a client that takes no part in this round's masking (no vector, no shares), signed."""
        what = f"masked-input request to client {self.client_id}"
        setup = self._setup(request, what)
        return {"client_id": self.client_id, "run_id": setup.run_id, "round": setup.round, "declined": 1,
                "signature": self.keys.sign(decline_message(setup.digest, self.client_id))}

    def _setup(self, request: Mapping[str, Any], what: str) -> _RoundSetup:
        setup = _RoundSetup.from_fields(request, what=what)
        if _field(request, "client_id", "int", what=what) != self.client_id:
            raise SecAggInputError(f"{what}: addressed to client {request['client_id']}")
        if self.client_id not in setup.cohort:
            raise SecAggInputError(f"{what}: this client is not in the cohort")
        setup.check_against(self.config, what=what)
        return setup

    # ---- consistency check
    def _check_survivors(self, setup: _RoundSetup, survivors: Sequence[int], what: str) -> set[int]:
        surv = set(survivors)
        if len(surv) != len(survivors) or not surv <= set(setup.cohort):
            raise SecAggInputError(f"{what}: survivors must be distinct members of the cohort")
        if self.client_id not in surv:
            raise SecAggInputError(f"{what}: this client is not listed among the survivors")
        least = max(setup.min_survivors, self.floor + self.colluders)
        if len(surv) < least:
            raise SecAggAbort(f"{what}: only {len(surv)} survivors (< {least}); refusing to unmask")
        quorum = self.quorum(setup)
        if len(surv) < quorum:
            raise SecAggAbort(f"{what}: {len(surv)} survivors can never give the {quorum} signatures the consistency "
                              f"check needs in a cohort of {len(setup.cohort)}; refusing")
        if not is_connected(setup.graph, surv):
            raise SecAggAbort(f"{what}: the survivors' graph is disconnected; unmasking would reveal partial sums")
        return surv

    def quorum(self, setup: _RoundSetup) -> int:
        """Signatures over the survivor set this client needs before it unmasks (see :func:`consistency_quorum`)."""
        return consistency_quorum(len(setup.cohort), threshold=setup.threshold, min_survivors=setup.min_survivors,
                                  colluders=self.colluders)

    def consistency(self, request: Mapping[str, Any], *, signed: Sequence[int] | None = None) -> dict[str, Any]:
        """Sign (round digest, survivor set): at most one set per round digest (``signed``: one signed before)."""
        what = f"consistency request to client {self.client_id}"
        setup = self._setup(request, what)
        survivors = sorted(_field(request, "survivors", "ids", what=what))
        self._check_survivors(setup, survivors, what)
        before = self._signed.get(setup.digest, tuple(sorted(signed)) if signed is not None else None)
        if before is not None and list(before) != survivors:
            raise SecAggAbort(f"{what}: this client already signed another survivor set for this round; refusing")
        self._signed[setup.digest] = tuple(survivors)
        return {"client_id": self.client_id, "run_id": setup.run_id, "round": setup.round,
                "signature": self.keys.sign(consistency_message(setup.digest, survivors))}

    def signed_set(self, digest: bytes) -> tuple[int, ...] | None:
        """The survivor set this object signed for a round digest (None if none)."""
        return self._signed.get(digest)

    # ---- stage 2
    def unmask(self, request: Mapping[str, Any], *, signed: Sequence[int] | None = None) -> dict[str, Any]:
        """Check the consistency certificate, decrypt the shares forwarded to this client, return those the server may have.

        ``signed``: the survivor set this client signed for the request's round (default: the one this
        object signed). Refused unless the request's survivor set is that very set and carries at least
        :meth:`quorum` valid signatures over it from distinct cohort members (with a trust root: bound to
        distinct certified identities). A ciphertext that does not open is skipped and its sender named
        in ``undecryptable``.
        """
        what = f"unmask request to client {self.client_id}"
        setup = self._setup(request, what)
        me = self.client_id
        survivors = _field(request, "survivors", "ids", what=what)
        surv = self._check_survivors(setup, survivors, what)
        mine = self._signed.get(setup.digest) if signed is None else tuple(sorted(int(x) for x in signed))
        if mine is None:
            raise SecAggAbort(f"{what}: this client signed no survivor set for this round; refusing to unmask")
        if list(mine) != sorted(surv):
            raise SecAggAbort(f"{what}: the survivor set differs from the one this client signed; refusing to unmask")
        self._check_certificate(request, setup, surv, what)

        graph = setup.graph
        senders = _field(request, "senders", "ids", what=what)
        holders_of_me = set(setup.holders(me))
        if len(set(senders)) != len(senders) or not set(senders) <= (holders_of_me & surv):
            raise SecAggInputError(f"{what}: senders must be distinct surviving neighbours of this client")
        pks = _field(request, "sender_enc_pks", "bytes", what=what)
        cts = _field(request, "ciphertexts", "bytes", what=what)
        size = _ciphertext_size(setup.degree)
        if len(pks) != 32 * len(senders) or len(cts) != size * len(senders):
            raise SecAggInputError(f"{what}: expected {len(senders)} public keys and ciphertexts of {size} bytes")
        b_owners, b_shares, pair_owners, pair_peers, pair_shares, bad = [], [], [], [], [], []
        for i, w in enumerate(senders):
            pk = self.keys.enc_public if w == me else pks[i * 32:(i + 1) * 32]
            try:
                key = _share_key(self.keys, w, me, pk, setup.digest)
                plain = open_sealed(key, cts[i * size:(i + 1) * size],
                                    _share_ad(setup.run_id, setup.round, w, me, setup.digest),
                                    what=f"{what}: shares from client {w}")
                vals = shamir.share_from_bytes(plain, what=f"{what}: shares from client {w}")
                if len(vals) != 1 + len(graph[w]):
                    raise SecAggInputError(f"{what}: shares from client {w} have the wrong count")
            except (DecryptionError, SecAggInputError, ValueError) as exc:
                logger.warning("%s: the shares from client %d do not open (%s); skipped and named in the reply",
                               what, w, exc)
                bad.append(w)
                continue
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
                "pair_peers": np.asarray(pair_peers, dtype=np.uint64), "pair_shares": shamir.share_to_bytes(pair_shares),
                "undecryptable": np.asarray(bad, dtype=np.uint64)}

    def _check_certificate(self, request: Mapping[str, Any], setup: _RoundSetup, surv: set[int], what: str) -> None:
        """At least :meth:`quorum` valid signatures over (digest, survivors) from distinct (bound) survivors."""
        signers = _field(request, "signers", "ids", what=what)
        if len(set(signers)) != len(signers) or not set(signers) <= surv:
            raise SecAggInputError(f"{what}: signers must be distinct survivors")
        sigs = _field(request, "signatures", "bytes", what=what)
        if len(sigs) != SIGNATURE_BYTES * len(signers):
            raise SecAggInputError(f"{what}: expected {len(signers)} signatures of {SIGNATURE_BYTES} bytes")
        records = unpack_key_records(request, signers, "signer", what=what)
        if self.client_id in records and records[self.client_id].sign_pk != self.keys.sign_public:
            raise SecAggInputError(f"{what}: the request lists another signing key for this client")
        message = consistency_message(setup.digest, surv)
        quorum = self.quorum(setup)
        valid = 0
        identities = {self.identity.public} if self.identity is not None else set()
        for i, v in enumerate(signers):
            rec = records[v]
            if self.trust_root is not None and v != self.client_id:
                # a signer counts only with keys bound to a certified identity no other signer used
                if rec.verify(setup.run_id, self.trust_root) is not None or rec.identity in identities:
                    continue
            if not verify_signature(rec.sign_pk, sigs[i * SIGNATURE_BYTES:(i + 1) * SIGNATURE_BYTES], message):
                continue
            if v != self.client_id:
                identities.add(rec.identity)
            valid += 1
            if valid >= quorum:
                return
        raise SecAggAbort(f"{what}: only {valid} valid signatures over this survivor set (the consistency check needs "
                          f"{quorum} in a cohort of {len(setup.cohort)}); refusing to unmask")
