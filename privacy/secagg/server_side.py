"""The server side of SecAgg+ (:mod:`fedpersona.privacy.secagg.spec`): the key directory, one round, the unmasked sum.

The server verifies what it can without a trust root: each stage-1 reply and each consistency
signature against the signing key the client advertised (a replayed, forged or altered reply is
rejected), and, for a client with an identity, that the identity signed its keys. Whether that
identity is certified is for the *devices* to check, against their own root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from fedpersona.privacy.secagg import shamir
from fedpersona.privacy.secagg.crypto import SIGNATURE_BYTES, MaskExpander, SecureRNG, load_public_key
from fedpersona.privacy.secagg.graph import is_connected
from fedpersona.privacy.secagg.quantize import packed_size, unpack_bits
from fedpersona.privacy.secagg.spec import (KeyRecord, SecAggAbort, SecAggParams, SecAggInputError, _check_id, _ciphertext_size,
                                 _field, _ids, _RoundSetup, binding_message, consistency_message, consistency_quorum,
                                 decline_message, masked_message, pack_key_records, verify_signature)

__all__ = ["SecAggResult", "SecAggRound", "SecAggServer"]

logger = logging.getLogger(__name__)


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
    declined: tuple[int, ...] = ()       # said so in stage 1 (counted in dropped_before_masking)
    unsigned: tuple[int, ...] = ()       # survivors that did not sign the survivor set (in dropped_before_unmasking)
    undecryptable: dict[int, tuple[int, ...]] = field(default_factory=dict)  # holder -> senders whose shares did not open

    @property
    def num_clients(self) -> int:
        return len(self.survivors)


class SecAggServer:
    """The server side for one run: the key directory, and :meth:`start_round` for each round."""

    def __init__(self, config: SecAggParams, *, run_id: int, rng: SecureRNG | None = None):
        self.config = config
        self.run_id = _check_id(run_id, what="SecAggServer run_id")
        self.rng = rng or SecureRNG()
        self._keys: dict[int, KeyRecord] = {}

    def register(self, advert: Mapping[str, Any]) -> None:
        """Record a client's :meth:`SecAggClient.advertise` payload (once per run)."""
        what = "key advertisement"
        rec = KeyRecord.from_advert(advert, what=what)
        cid = rec.client_id
        if cid in self._keys:
            raise SecAggInputError(f"{what}: duplicated client id {cid}")
        try:
            load_public_key(rec.enc_pk), load_public_key(rec.mask_pk)
        except ValueError as e:
            raise SecAggInputError(f"{what} of client {cid}: {e}") from None
        if rec.bound and not verify_signature(rec.identity, rec.binding, binding_message(
                self.run_id, cid, rec.enc_pk, rec.mask_pk, rec.sign_pk)):
            raise SecAggInputError(f"{what} of client {cid}: its identity did not sign these keys for this node and run")
        self._keys[cid] = rec

    def key_record(self, client_id: int) -> KeyRecord:
        return self._keys[client_id]

    @property
    def registered(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    def start_round(self, round: int, cohort: Iterable[int], length: int, *, context: bytes = b"") -> "SecAggRound":
        """Open a round over ``cohort`` for update vectors of ``length`` coordinates.

        ``context``: opaque bytes bound into the round digest (so into every key derivation, ciphertext
        and signature of the round) and sent in every request; a device checks it against the value it
        computes itself (the parameters of what is summed, say).
        """
        ids = [_check_id(c, what="cohort") for c in cohort]
        if len(set(ids)) != len(ids):
            raise SecAggInputError("cohort: duplicated client id")
        unknown = [c for c in ids if c not in self._keys]
        if unknown:
            raise SecAggInputError(f"cohort: clients {unknown[:5]} have not advertised keys in this run")
        if isinstance(length, bool) or int(length) != length or length < 1:
            raise SecAggInputError(f"length must be an integer >= 1. You passed: {length}")
        if not isinstance(context, (bytes, bytearray)):
            raise SecAggInputError(f"context must be bytes. You passed: {type(context).__name__}")
        k, t, m = self.config.round_params(len(ids))
        setup = _RoundSetup(run_id=self.run_id, round=_check_id(round, what="round"), cohort=tuple(sorted(ids)),
                            graph_seed=self.rng.bytes(32), degree=k, threshold=t, min_survivors=m,
                            modulus_bits=self.config.modulus_bits, length=int(length), num_extras=len(self.config.extras),
                            context=bytes(context))
        logger.info("secagg round %d: %d clients, k=%d, t=%d, min_survivors=%d, modulus 2^%d, %d coordinates",
                    setup.round, len(ids), k, t, m, setup.modulus_bits, setup.length)
        return SecAggRound(self, setup)


class SecAggRound:
    """One round on the server: stage-1 requests and replies, the consistency check, unmask requests and replies, the sum.

    Stages: 1 (masked inputs), 2 (consistency: survivors sign the survivor set), 3 (unmask), then closed.
    """

    def __init__(self, server: SecAggServer, setup: _RoundSetup):
        self._server = server
        self.setup = setup
        self._stage = 1
        width = setup.length + setup.num_extras
        self._acc = np.zeros(width, dtype=np.uint64)
        self._received: set[int] = set()
        self._declined: set[int] = set()
        self._cts: dict[int, dict[int, bytes]] = {}   # holder -> sender -> ciphertext
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._forwarded: dict[int, tuple[int, ...]] = {}
        self._responded: set[int] = set()
        self._undecryptable: dict[int, tuple[int, ...]] = {}
        self._b_shares: dict[int, list[tuple[int, int]]] = {}
        self._pair_shares: dict[tuple[int, int], list[tuple[int, int]]] = {}

    @property
    def quorum(self) -> int:
        """Signatures over the survivor set the server needs before it asks for shares (no colluders assumed;
        each device applies its own assumption)."""
        s = self.setup
        return consistency_quorum(len(s.cohort), threshold=s.threshold, min_survivors=s.min_survivors)

    # ---- stage 1
    def masked_input_requests(self) -> dict[int, dict[str, Any]]:
        """The per-client round setup to send with the train request."""
        s, srv = self.setup, self._server
        out = {}
        for c in s.cohort:
            nb = s.graph[c]
            out[c] = {**s.to_fields(), "client_id": c, "neighbours": _ids(nb),
                      **pack_key_records([srv._keys[v] for v in nb], "neighbour")}
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

    def _check_signature(self, reply: Mapping[str, Any], cid: int, message: bytes, what: str) -> None:
        sig = _field(reply, "signature", "bytes", what=what)
        if len(sig) != SIGNATURE_BYTES or not verify_signature(self._server._keys[cid].sign_pk, sig, message):
            raise SecAggInputError(f"{what} from client {cid}: its signature does not verify for this round "
                                   "(a replayed, forged or altered reply); rejected")

    def receive_decline(self, reply: Mapping[str, Any]) -> None:
        """A client that says in stage 1 that it takes no part (it sent no vector and no shares): dropped."""
        what = "decline"
        if self._stage != 1:
            raise SecAggInputError(f"{what}: stage 1 is closed; late message rejected")
        cid = self._check_sender(reply, what)
        if cid in self._received or cid in self._declined:
            raise SecAggInputError(f"{what}: duplicated message from client {cid}")
        self._check_signature(reply, cid, decline_message(self.setup.digest, cid), what)
        self._declined.add(cid)

    @property
    def declined(self) -> tuple[int, ...]:
        return tuple(sorted(self._declined))

    @property
    def received(self) -> tuple[int, ...]:
        return tuple(sorted(self._received))

    def receive_masked(self, reply: Mapping[str, Any]) -> None:
        """Add a client's masked vector to the running sum and keep its ciphertexts for forwarding."""
        what = "masked input"
        if self._stage != 1:
            raise SecAggInputError(f"{what}: stage 1 is closed; late message rejected")
        cid = self._check_sender(reply, what)
        if cid in self._received or cid in self._declined:
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
        self._check_signature(reply, cid, masked_message(s.digest, cid, packed, cts), what)
        np.add(self._acc, vec, out=self._acc)
        self._received.add(cid)
        for j, h in enumerate(holders):
            self._cts.setdefault(h, {})[cid] = cts[j * size:(j + 1) * size]

    # ---- consistency check
    def consistency_requests(self) -> dict[int, dict[str, Any]]:
        """Close stage 1; ask every survivor to sign the survivor set. SecAggAbort if too few survived."""
        if self._stage != 1:
            raise SecAggInputError("consistency requests were already produced for this round")
        self._stage = 2
        s = self.setup
        surv = tuple(sorted(self._received))
        self._survivors = surv
        need = max(s.min_survivors, self.quorum)
        if len(surv) < need:
            self._abort()
            raise SecAggAbort(f"round {s.round}: only {len(surv)} of {len(s.cohort)} clients sent masked inputs "
                              f"(< min_survivors={s.min_survivors}, consistency quorum {self.quorum}); aborted "
                              "before any unmask request, nothing revealed")
        if not is_connected(s.graph, surv):
            self._abort()
            raise SecAggAbort(f"round {s.round}: the survivors' graph is disconnected; aborted, nothing revealed")
        return {v: {**s.to_fields(), "client_id": v, "survivors": _ids(surv)} for v in surv}

    def receive_consistency(self, reply: Mapping[str, Any]) -> None:
        """A survivor's signature over (round digest, survivor set)."""
        what = "consistency reply"
        if self._stage != 2:
            raise SecAggInputError(f"{what}: the consistency stage is not open")
        cid = self._check_sender(reply, what)
        if cid not in self._received:
            raise SecAggInputError(f"{what}: client {cid} is not a survivor of this round")
        if cid in self._signatures:
            raise SecAggInputError(f"{what}: duplicated message from client {cid}")
        self._check_signature(reply, cid, consistency_message(self.setup.digest, self._survivors), what)
        self._signatures[cid] = bytes(reply["signature"])

    def _abort(self) -> None:
        self._stage = 0
        self._cts.clear()

    # ---- stage 2
    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Close the consistency stage; the unmask request for each survivor that signed, with every signature.

        Raises SecAggAbort if fewer than :attr:`quorum` survivors signed the survivor set.
        """
        if self._stage == 1:
            raise SecAggInputError("unmask requests need the consistency check first (consistency_requests)")
        if self._stage != 2:
            raise SecAggInputError("unmask requests were already produced for this round")
        self._stage = 3
        s = self.setup
        signers = tuple(sorted(self._signatures))
        if len(signers) < self.quorum:
            self._abort()
            raise SecAggAbort(f"round {s.round}: only {len(signers)} of {len(self._survivors)} survivors signed the "
                              f"survivor set (< consistency quorum {self.quorum}); aborted before any unmask request, "
                              "nothing revealed")
        keys = self._server._keys
        certificate = {"survivors": _ids(self._survivors), "signers": _ids(signers),
                       **pack_key_records([keys[v] for v in signers], "signer"),
                       "signatures": b"".join(self._signatures[v] for v in signers)}
        out = {}
        for v in signers:
            senders = tuple(sorted(w for w in self._cts.get(v, {}) if w in self._received))
            self._forwarded[v] = senders
            out[v] = {**s.to_fields(), "client_id": v, **certificate, "senders": _ids(senders),
                      "sender_enc_pks": b"".join(keys[w].enc_pk for w in senders),
                      "ciphertexts": b"".join(self._cts[v][w] for w in senders)}
        self._cts.clear()
        return out

    @property
    def signers(self) -> tuple[int, ...]:
        return tuple(sorted(self._signatures))

    def receive_unmask(self, reply: Mapping[str, Any]) -> None:
        what = "unmask reply"
        if self._stage != 3:
            raise SecAggInputError(f"{what}: the unmask stage is not open")
        cid = self._check_sender(reply, what)
        if cid not in self._forwarded:
            raise SecAggInputError(f"{what}: client {cid} was not asked to unmask in this round")
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
        bad = _field(reply, "undecryptable", "ids", what=what) if "undecryptable" in reply else []
        if len(set(bad)) != len(bad) or not set(bad) <= allowed or set(bad) & set(b_owners):
            raise SecAggInputError(f"{what} from client {cid}: 'undecryptable' must name senders it was sent and "
                                   "returned no share of")
        pairs = list(zip(p_owners, p_peers))
        if len(set(pairs)) != len(pairs) or any(w not in allowed or w in bad or x not in graph[w] or x in surv for w, x in pairs):
            raise SecAggInputError(f"{what} from client {cid}: pair shares for pairs it may not reveal")
        x = shamir.point_of(cid)
        self._responded.add(cid)
        if bad:
            self._undecryptable[cid] = tuple(sorted(bad))
            logger.warning("round %d: client %d could not open the shares of client(s) %s (tampered or malformed "
                           "ciphertexts); they were skipped", self.setup.round, cid, sorted(bad))
        for w, val in zip(b_owners, b_vals):
            self._b_shares.setdefault(w, []).append((x, val))
        for pair, val in zip(pairs, p_vals):
            self._pair_shares.setdefault(pair, []).append((x, val))

    def finish(self) -> SecAggResult:
        """Close stage 2, reconstruct the needed seeds, remove the masks; raise SecAggAbort if shares are missing."""
        if self._stage != 3:
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
                            modulus_bits=s.modulus_bits, declined=self.declined,
                            unsigned=tuple(c for c in surv if c not in self._signatures),
                            undecryptable=dict(self._undecryptable))
