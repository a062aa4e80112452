"""Issue 20.1, as a dishonest server would try it: different survivor sets to different share holders in one round.

Before (cb416a4): after an honest stage 1 the server told each share holder ``h`` of a victim ``v`` that
every neighbour of ``v`` but ``h`` had dropped. Each holder answered once, as it should, but each
revealed its share of ``v``'s self-mask *and* of its pair seeds with the "dropped" neighbours: with
``secagg.degree = 4`` and 9 devices, or at the default degree in cohorts of 33, 40 and 64, the server
removed every mask of ``v`` and read its update. Now every survivor signs (round digest, survivor set)
once, and a holder reveals only for the very set it signed, when the unmask request carries more than
(K + c) / 2 valid signatures over it: two different sets can never both be certified, so the holders
that answer all answer for one set, and the split gives the server nothing.

Built at the protocol level, as ``privacy/secagg/driver.py`` runs it, with cohorts large enough for a
sparse graph; the attacker is the server, the devices are the library's clients with identities.
"""

import numpy as np
import pytest

from fedpersona.identity import IdentityRoot
from fedpersona.privacy.secagg import SecAggAbort, SecAggClient, SecAggParams, SecAggServer, SecureRNG, run_secure_sum, shamir
from fedpersona.privacy.secagg.crypto import MaskExpander
from fedpersona.privacy.secagg.graph import is_connected
from fedpersona.privacy.secagg.quantize import unpack_bits

D = 64
RUN = 5


def _ids(values):
    return np.asarray(sorted(int(v) for v in values), dtype=np.uint64)


def _advert(client):
    try:
        return client.advertise(run_id=RUN)
    except TypeError:  # a library without identities
        return client.advertise()


def _setup(n, degree):
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**16, max_cohort=max(n, 2), degree=degree)
    root = IdentityRoot()
    ids = list(range(1, n + 1))
    try:
        clients = {c: SecAggClient(c, cfg, rng=SecureRNG(bytes([c])), identity=root.issue()) for c in ids}
    except TypeError:
        clients = {c: SecAggClient(c, cfg, rng=SecureRNG(bytes([c]))) for c in ids}
    server = SecAggServer(cfg, run_id=RUN, rng=SecureRNG(b"server"))
    adverts = {c: _advert(clients[c]) for c in ids}
    for c in ids:
        server.register(adverts[c])
    rng = np.random.default_rng(n)
    updates = {c: (rng.normal(size=D) * 0.05).astype(np.float32) for c in ids}
    return cfg, clients, server, adverts, updates


def split_view_attack(n, degree, victim=1):
    """Honest stage 1; then each holder of the victim is shown its own survivor set. Returns what the server got."""
    cfg, clients, server, adverts, updates = _setup(n, degree)
    rnd = server.start_round(1, sorted(clients), D)
    s = rnd.setup
    cts: dict[int, dict[int, bytes]] = {}
    masked = {}
    for c, req in rnd.masked_input_requests().items():
        reply = clients[c].masked_input(req, updates[c])
        rnd.receive_masked(reply)
        size = len(reply["ciphertexts"]) // len(reply["share_holders"])
        for j, h in enumerate(int(x) for x in reply["share_holders"]):
            cts.setdefault(h, {})[c] = reply["ciphertexts"][j * size:(j + 1) * size]
        masked[c] = reply["masked"]

    neighbours = s.graph[victim]
    holders = sorted(neighbours + (victim,))
    cohort = set(s.cohort)
    # Holder h is told that every neighbour of the victim but h dropped (the victim keeps its first neighbour).
    views = {h: frozenset(cohort - (set(neighbours) - {h if h != victim else neighbours[0]})) for h in holders}
    for h, view in views.items():  # each view is one the devices' own checks accept
        assert len(view) >= s.min_survivors and is_connected(s.graph, view), (h, len(view))
    # The plan works if holders answer: t shares of the self-mask, and of every pair seed of the victim.
    assert len(holders) >= s.threshold
    assert all(sum(1 for h in holders if x not in views[h]) >= s.threshold for x in neighbours)

    answers, refused = {}, {}
    certificates = {}
    if hasattr(SecAggClient, "consistency"):
        from fedpersona.privacy.secagg.spec import KeyRecord, pack_key_records

        # The consistency check: each holder signs its own view; every other device is asked to sign one of
        # the views too (all of them on the first: the most signatures the server can gather on any one set).
        signatures: dict[frozenset, dict[int, bytes]] = {}
        others = [c for c in s.cohort if c not in holders]
        for c in list(holders) + others:
            view = views[c] if c in views else views[holders[0]]
            req = {**s.to_fields(), "client_id": c, "survivors": _ids(view)}
            try:
                signatures.setdefault(view, {})[c] = clients[c].consistency(req)["signature"]
            except SecAggAbort:
                pass
        for view, sigs in signatures.items():
            signers = sorted(sigs)
            certificates[view] = {"signers": _ids(signers),
                                  **pack_key_records([KeyRecord.from_advert(adverts[v]) for v in signers], "signer"),
                                  "signatures": b"".join(sigs[v] for v in signers)}
    for h in holders:
        view = views[h]
        senders = sorted(w for w in cts.get(h, {}) if w in view)
        req = {**s.to_fields(), "client_id": h, "survivors": _ids(view), "senders": _ids(senders),
               "sender_enc_pks": b"".join(adverts[w]["enc_pk"] for w in senders),
               "ciphertexts": b"".join(cts[h][w] for w in senders), **certificates.get(view, {})}
        try:
            answers[h] = clients[h].unmask(req)
        except SecAggAbort as exc:
            refused[h] = str(exc)

    # The server's reconstruction of the victim's masks from whatever was answered.
    t = s.threshold
    b_shares, pair_shares = [], {x: [] for x in neighbours}
    for h, reply in answers.items():
        x_h = shamir.point_of(h)
        owners = [int(o) for o in reply["b_owners"]]
        vals = shamir.share_from_bytes(reply["b_shares"], what="b")
        b_shares += [(x_h, v) for o, v in zip(owners, vals) if o == victim]
        pvals = shamir.share_from_bytes(reply["pair_shares"], what="pairs")
        for o, peer, v in zip(reply["pair_owners"], reply["pair_peers"], pvals):
            if int(o) == victim:
                pair_shares[int(peer)].append((x_h, v))
    recovered = None
    if len(b_shares) >= t and all(len(v) >= t for v in pair_shares.values()):
        width = D + len(cfg.extras)
        y = unpack_bits(masked[victim], s.modulus_bits, width)
        ex = MaskExpander(width)
        ex.add_into(y, shamir.reconstruct(b_shares, t), -1)
        for x, shares in pair_shares.items():
            ex.add_into(y, shamir.reconstruct(shares, t), -1 if victim < x else 1)
        y &= np.uint64((1 << s.modulus_bits) - 1)
        recovered = cfg.quantizer.decode_sum(y, D)[0]
    truth = updates[victim].astype(np.float64) * min(1.0, 1.0 / float(np.linalg.norm(updates[victim])))
    return {"recovered": recovered, "truth": truth, "answers": answers, "refused": refused, "views": views,
            "holders": holders, "setup": s, "certified": certificates}


@pytest.mark.parametrize("n, degree", [(9, 4), (33, None), (40, None)], ids=["degree-4", "cohort-33", "cohort-40"])
def test_split_survivor_sets_reveal_nothing(n, degree):
    out = split_view_attack(n, degree)
    s = out["setup"]
    assert s.degree < n - 1, "a sparse graph: the case the attack needs"
    rec = out["recovered"]
    assert rec is None or np.max(np.abs(rec - out["truth"])) > 1e-2, "the victim's update was recovered"
    # Every holder that answered answered for one and the same survivor set (the one the server certified by
    # concentrating every other device's signature on it); all the others refused, naming the consistency check.
    assert len({out["views"][h] for h in out["answers"]}) <= 1
    assert set(out["answers"]) | set(out["refused"]) == set(out["holders"])
    assert len(out["answers"]) < s.threshold and len(out["refused"]) >= len(out["holders"]) - 2
    for h, reason in out["refused"].items():
        assert "signature" in reason or "signed" in reason, reason


@pytest.mark.parametrize("n, degree", [(9, 4), (40, None)], ids=["degree-4", "cohort-40"])
def test_the_same_cohort_sums_when_the_server_is_honest(n, degree):
    """The control: the same settings, devices and identities give the survivors' sum when nobody lies."""
    cfg, clients, server, _, updates = _setup(n, degree)
    res = run_secure_sum(updates, cfg, server=server, clients=clients, run_id=RUN, drop_before_masking=[2],
                         drop_before_unmasking=[3])
    truth = sum(u.astype(np.float64) * min(1.0, 1.0 / float(np.linalg.norm(u))) for c, u in updates.items() if c != 2)
    assert res.num_clients == n - 1 and np.max(np.abs(res.total - truth)) < n / cfg.scale
