"""The client side of SecAgg+ (:mod:`privacy.secagg.spec`): advertise, masked input, unmask."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from privacy.secagg import shamir
from privacy.secagg.crypto import PUBLIC_KEY_BYTES, ClientKeys, MaskExpander, SecureRNG, open_sealed, seal
from privacy.secagg.graph import is_connected
from privacy.secagg.quantize import pack_bits
from privacy.secagg.spec import (SecAggAbort, SecAggParams, SecAggInputError, _check_id, _ciphertext_size, _field, _ids,
                                 _pair_seed, _RoundSetup, _share_ad, _share_key)

__all__ = ["SecAggClient"]


class SecAggClient:
    """The device side. Stateless between messages except for its long-term keys (:meth:`state`).

    The Flower client calls :meth:`advertise` once per run, :meth:`masked_input` with the
    train request and :meth:`unmask` with the unmask request; it persists :meth:`state` in
    the device's own store (it holds private keys: never put it in a message).
    """

    def __init__(self, client_id: int, config: SecAggParams, *, keys: ClientKeys | None = None,
                 rng: SecureRNG | None = None):
        self.client_id = _check_id(client_id, what="SecAggClient")
        self.config = config
        self.keys = keys or ClientKeys()
        self.rng = rng or SecureRNG()

    # ---- persistence
    def state(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "keys": self.keys.to_bytes()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: SecAggParams, *, rng: SecureRNG | None = None) -> "SecAggClient":
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
