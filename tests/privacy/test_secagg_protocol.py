"""Secure aggregation protocol: exact sums under dropouts, aborts, rejected messages, masked vectors look uniform."""

import numpy as np
import pytest
from scipy import stats

from fedpersona.privacy.secagg import (DecryptionError, ExtraSpec, SecAggAbort, SecAggClient, SecAggParams, SecAggInputError,
                            SecAggServer, SecAggStats, SecureRNG, payload_nbytes, run_secure_sum)
from fedpersona.privacy.secagg.graph import build_graph, default_degree, is_connected
from fedpersona.privacy.secagg.crypto import SEAL_OVERHEAD
from fedpersona.privacy.secagg.quantize import pack_bits, packed_size, unpack_bits
from fedpersona.privacy.secagg.shamir import SHARE_BYTES

D = 1000
CFG = SecAggParams(clip_norm=1.0, scale=2.0**16, max_cohort=50,
                   extras=(ExtraSpec("num_examples", bound=10_000, scale=1.0), ExtraSpec("loss", bound=100, scale=1e4)))


def make_updates(n, d=D, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    ids = list(range(100, 100 + n)) if ids is None else ids
    return {c: (rng.normal(size=d) * rng.uniform(0.01, 0.2)).astype(np.float32) for c in ids}


def clipped(x, c):
    x = x.astype(np.float64)
    return x * min(1.0, c / np.linalg.norm(x))


def make_extras(ids):
    return {c: {"num_examples": 10 + i, "loss": 0.5 + 0.01 * i} for i, c in enumerate(ids)}


def expected(updates, extras, survivors, cfg=CFG):
    tot = sum(clipped(updates[c], cfg.clip_norm) for c in survivors)
    ex = {k: sum(extras[c][k] for c in survivors) for k in ("num_examples", "loss")}
    return tot, ex


def sign_survivors(rnd, clients, skip=()):
    """The consistency check, every survivor (but ``skip``) signing the set the server shows it."""
    for c, req in rnd.consistency_requests().items():
        if c not in skip:
            rnd.receive_consistency(clients[c].consistency(req))


def check(result, updates, extras, survivors, cfg=CFG):
    tot, ex = expected(updates, extras, survivors, cfg)
    n = len(survivors)
    assert result.survivors == tuple(sorted(survivors))
    assert np.max(np.abs(result.total - tot)) < n / cfg.scale  # stated rounding bound
    assert result.extras["num_examples"] == ex["num_examples"]  # integers: exact
    assert abs(result.extras["loss"] - ex["loss"]) < n / 1e4


# ------------------------------------------------------------------------ exact sums, drops
# complete graph: n = 8, k = 7, t = 5: up to n - t = 3 drops in all
@pytest.mark.parametrize("drop1,drop2", [(0, 0), (3, 0), (0, 3), (1, 2), (2, 1), (1, 0), (0, 1)])
def test_sum_with_drops_complete_graph(drop1, drop2):
    ups = make_updates(8)
    ids = sorted(ups)
    ex = make_extras(ids)
    d1, d2 = ids[1:1 + drop1], ids[4:4 + drop2]
    r = run_secure_sum(ups, CFG, extras=ex, drop_before_masking=d1, drop_before_unmasking=d2, rng=SecureRNG(b"s"))
    survivors = [c for c in ids if c not in d1]
    check(r, ups, ex, survivors)
    assert r.dropped_before_masking == tuple(d1) and r.dropped_before_unmasking == tuple(d2)


@pytest.mark.parametrize("drop1,drop2", [(0, 0), (7, 0), (0, 7), (4, 3)])
def test_sum_with_drops_sparse_graph(drop1, drop2):
    """n = 20: Harary graph k = 14, t = 8 of 15 holders; drops of up to k/2 anywhere are tolerated."""
    ups = make_updates(20, seed=1)
    ids = sorted(ups)
    ex = make_extras(ids)
    order = np.random.default_rng(drop1 * 10 + drop2).permutation(ids).tolist()
    d1, d2 = order[:drop1], order[drop1:drop1 + drop2]
    r = run_secure_sum(ups, CFG, extras=ex, drop_before_masking=d1, drop_before_unmasking=d2, rng=SecureRNG(b"p"))
    check(r, ups, ex, [c for c in ids if c not in d1])


def test_exact_integer_sum():
    """Updates on the quantization grid (no rounding): the integer sum is exact."""
    rng = np.random.default_rng(3)
    ids = list(range(6))
    q = {c: rng.integers(-50, 50, size=D) for c in ids}
    ups = {c: q[c] / CFG.scale for c in ids}
    ex = make_extras(ids)
    r = run_secure_sum(ups, CFG, extras=ex, drop_before_masking=[2], drop_before_unmasking=[4], rng=SecureRNG(b"e"))
    np.testing.assert_array_equal(r.int_sum[:D], sum(q[c] for c in ids if c != 2))


def test_many_rounds_same_keys_and_stateless_clients():
    """Long-term keys reused over rounds; a client rebuilt from its persisted state answers the unmask stage."""
    ids = [7, 11, 13, 17, 19]
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**16, max_cohort=10)
    clients = {c: SecAggClient(c, cfg, rng=SecureRNG(bytes([c]))) for c in ids}
    server = SecAggServer(cfg, run_id=42, rng=SecureRNG(b"srv"))
    for c in ids:
        server.register(clients[c].advertise())
    for rnd_no in (1, 2, 3):
        ups = make_updates(5, seed=rnd_no, ids=ids)
        rnd = server.start_round(rnd_no, ids, D)
        for c, req in rnd.masked_input_requests().items():
            rnd.receive_masked(clients[c].masked_input(req, ups[c]))
        sign_survivors(rnd, clients)
        for c, req in rnd.unmask_requests().items():
            fresh = SecAggClient.from_state(clients[c].state(), cfg)  # a new process with the stored keys
            rnd.receive_unmask(fresh.unmask(req, signed=clients[c].signed_set(rnd.setup.digest)))
        res = rnd.finish()
        assert np.max(np.abs(res.total - sum(clipped(u, 1.0) for u in ups.values()))) < 5 / cfg.scale


# -------------------------------------------------------------------------------- aborts
def _round(n=8, cfg=CFG, seed=b"r", d=D, run_id=0, round_no=1):
    ids = list(range(1, n + 1))
    clients = {c: SecAggClient(c, cfg, rng=SecureRNG(seed + bytes([c]))) for c in ids}
    server = SecAggServer(cfg, run_id=run_id, rng=SecureRNG(seed))
    for c in ids:
        server.register(clients[c].advertise())
    ups = make_updates(n, d=d, ids=ids)
    ex = make_extras(ids) if cfg.extras else {c: None for c in ids}
    return server, clients, ups, ex


def test_too_few_survivors_aborts_before_any_share_is_released():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    for c, req in list(rnd.masked_input_requests().items())[:4]:  # t = 5
        rnd.receive_masked(clients[c].masked_input(req, ups[c], ex[c]))
    with pytest.raises(SecAggAbort, match="min_survivors"):
        rnd.consistency_requests()
    with pytest.raises(SecAggInputError):
        rnd.unmask_requests()
    with pytest.raises(SecAggInputError):
        rnd.finish()


def test_too_few_unmask_replies_aborts():
    ups = make_updates(8)
    ids = sorted(ups)
    with pytest.raises(SecAggAbort, match="not enough shares"):
        run_secure_sum(ups, CFG, extras=make_extras(ids), drop_before_masking=ids[:2],
                       drop_before_unmasking=ids[2:4], rng=SecureRNG(b"a"))


def test_client_refuses_to_unmask_for_too_few_survivors():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    for c, req in rnd.masked_input_requests().items():
        rnd.receive_masked(clients[c].masked_input(req, ups[c], ex[c]))
    sign_survivors(rnd, clients)
    req = rnd.unmask_requests()[1]
    req["survivors"] = np.array([1, 2], dtype=np.uint64)  # a server pretending nearly everyone dropped
    with pytest.raises(SecAggAbort, match="survivors"):
        clients[1].unmask(req)


def test_disconnected_survivors_abort():
    """Survivors whose graph is disconnected would reveal partial sums (here: one isolated client)."""
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**16, max_cohort=50, degree=4)
    server, clients, ups, ex = _round(n=20, cfg=cfg)
    rnd = server.start_round(1, list(clients), D)
    isolated = 5
    dropped = set(rnd.setup.graph[isolated])
    assert len(dropped) == 4
    for c, req in rnd.masked_input_requests().items():
        if c not in dropped:
            rnd.receive_masked(clients[c].masked_input(req, ups[c]))
    with pytest.raises(SecAggAbort, match="disconnected"):
        rnd.consistency_requests()


# ------------------------------------------------------------------------ rejected inputs
@pytest.fixture
def stage2():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    replies = {}
    for c, req in rnd.masked_input_requests().items():
        replies[c] = clients[c].masked_input(req, ups[c], ex[c])
        rnd.receive_masked(replies[c])
    sign_survivors(rnd, clients)
    return server, clients, rnd, replies, rnd.unmask_requests()


def test_tampered_ciphertext_is_skipped_and_named(stage2):
    """A ciphertext that does not open: the holder names its sender and answers for the others."""
    _, clients, _, _, requests = stage2
    req = dict(requests[3])
    senders = [int(x) for x in req["senders"]]
    ct = bytearray(req["ciphertexts"])
    ct[40] ^= 1  # inside the first sender's ciphertext
    req["ciphertexts"] = bytes(ct)
    reply = clients[3].unmask(req)
    assert reply["undecryptable"].tolist() == [senders[0]]
    assert reply["b_owners"].tolist() == senders[1:]
    assert issubclass(DecryptionError, ValueError)


def test_ciphertext_from_another_round_rejected():
    server, clients, ups, ex = _round()
    ids = list(clients)
    old = {}
    for rnd_no in (1, 2):
        rnd = server.start_round(rnd_no, ids, D)
        for c, req in rnd.masked_input_requests().items():
            rnd.receive_masked(clients[c].masked_input(req, ups[c], ex[c]))
        sign_survivors(rnd, clients)
        requests = rnd.unmask_requests()
        if rnd_no == 1:
            old = requests
    req = dict(requests[2])
    req["ciphertexts"] = old[2]["ciphertexts"]  # same senders, same sizes: only the round differs
    reply = clients[2].unmask(req)
    assert reply["undecryptable"].tolist() == req["senders"].tolist() and reply["b_owners"].size == 0


def test_ciphertext_from_another_run_rejected():
    reqs = []
    for run_id in (1, 2):
        server, clients, ups, ex = _round(run_id=run_id, seed=b"same")  # same keys in both runs
        rnd = server.start_round(1, list(clients), D)
        for c, req in rnd.masked_input_requests().items():
            rnd.receive_masked(clients[c].masked_input(req, ups[c], ex[c]))
        sign_survivors(rnd, clients)
        reqs.append((clients[2], rnd.unmask_requests()))
    client, requests = reqs[1]
    req = dict(requests[2])
    req["ciphertexts"] = reqs[0][1][2]["ciphertexts"]
    reply = client.unmask(req)
    assert reply["undecryptable"].tolist() == req["senders"].tolist() and reply["b_owners"].size == 0


def test_reply_for_another_round_rejected():
    server, clients, ups, ex = _round()
    ids = list(clients)
    rnd1 = server.start_round(1, ids, D)
    stale = clients[1].masked_input(rnd1.masked_input_requests()[1], ups[1], ex[1])
    rnd2 = server.start_round(2, ids, D)
    with pytest.raises(SecAggInputError, match="run 0 round 1"):
        rnd2.receive_masked(stale)


def test_forbidden_pair_share_rejected_by_server(stage2):
    """Unmask reply claiming a pair share the holder may not reveal (survivor-survivor seed)."""
    _, clients, rnd, _, requests = stage2
    reply = clients[1].unmask(requests[1])
    reply["pair_owners"] = np.array([1], dtype=np.uint64)
    reply["pair_peers"] = np.array([2], dtype=np.uint64)  # 2 survived: its seed with 1 must stay secret
    reply["pair_shares"] = bytes(16)
    with pytest.raises(SecAggInputError, match="may not reveal"):
        rnd.receive_unmask(reply)


def test_wrong_length_rejected():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    req = rnd.masked_input_requests()[1]
    with pytest.raises(SecAggInputError, match="coordinates"):
        clients[1].masked_input(req, np.zeros(D + 1, np.float32), ex[1])
    reply = clients[1].masked_input(req, ups[1], ex[1])
    reply["masked"] = reply["masked"][:-1]
    with pytest.raises(SecAggInputError, match="wrong length"):
        rnd.receive_masked(reply)


def test_wrong_modulus_rejected():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    req = rnd.masked_input_requests()[1]
    reply = clients[1].masked_input(req, ups[1], ex[1])
    width = D + len(CFG.extras)
    vec = unpack_bits(reply["masked"], CFG.modulus_bits, width)
    reply["masked"] = pack_bits(vec | np.uint64(1 << CFG.modulus_bits), CFG.modulus_bits + 1)  # a (b+1)-bit sender
    with pytest.raises(SecAggInputError, match="wrong length or modulus"):
        rnd.receive_masked(reply)
    reply = clients[1].masked_input(req, ups[1], ex[1])
    spare = reply["masked"].size * 8 - width * CFG.modulus_bits
    assert spare > 0
    reply["masked"] = reply["masked"].copy()
    reply["masked"][-1] |= np.uint8(0x80)  # a padding bit set: not a b-bit vector of this length
    with pytest.raises(SecAggInputError, match="padding"):
        rnd.receive_masked(reply)
    other = SecAggParams(clip_norm=1.0, scale=2.0**24, max_cohort=50, extras=CFG.extras)
    with pytest.raises(SecAggInputError, match="wrong modulus"):
        SecAggClient(1, other).masked_input(req, ups[1], ex[1])
    reply = clients[1].masked_input(req, ups[1], ex[1])
    reply["masked"] = unpack_bits(reply["masked"], CFG.modulus_bits, D + len(CFG.extras))  # unpacked uint64
    with pytest.raises(SecAggInputError, match="uint8"):
        rnd.receive_masked(reply)


def test_duplicated_and_unknown_ids_rejected(stage2):
    server, clients, rnd, replies, requests = stage2
    with pytest.raises(SecAggInputError, match="duplicated"):
        server.register(clients[1].advertise())
    with pytest.raises(SecAggInputError, match="duplicated"):
        server.start_round(2, [1, 2, 3, 3], D)
    with pytest.raises(SecAggInputError, match="not advertised"):
        server.start_round(2, [1, 2, 3, 99], D)
    rnd.receive_unmask(clients[1].unmask(requests[1]))
    with pytest.raises(SecAggInputError, match="duplicated"):
        rnd.receive_unmask(clients[1].unmask(requests[1]))
    bad = clients[2].unmask(requests[2])
    bad["client_id"] = 99
    with pytest.raises(SecAggInputError, match="unknown client"):
        rnd.receive_unmask(bad)
    with pytest.raises(SecAggInputError, match="late"):
        rnd.receive_masked(replies[1])


def test_duplicated_masked_input_rejected():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    req = rnd.masked_input_requests()[1]
    reply = clients[1].masked_input(req, ups[1], ex[1])
    rnd.receive_masked(reply)
    with pytest.raises(SecAggInputError, match="duplicated"):
        rnd.receive_masked(reply)


def test_client_rejects_lowered_threshold_and_forged_graph():
    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    req = dict(rnd.masked_input_requests()[1])
    with pytest.raises(SecAggInputError, match="round parameters"):
        clients[1].masked_input({**req, "threshold": 2}, ups[1], ex[1])
    with pytest.raises(SecAggInputError, match="graph seed"):
        clients[1].masked_input({**req, "neighbours": req["neighbours"][:-1]}, ups[1], ex[1])
    with pytest.raises(SecAggInputError, match="addressed"):
        clients[2].masked_input(req, ups[2], ex[2])
    with pytest.raises(SecAggInputError, match="extras"):
        clients[1].masked_input(req, ups[1], {"num_examples": 3})


def test_exceeding_max_cohort_rejected():
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**16, max_cohort=4)
    with pytest.raises(SecAggInputError, match="max_cohort"):
        run_secure_sum(make_updates(5), cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="bits"):
        SecAggParams(clip_norm=1.0, scale=2.0**60, max_cohort=100)
    with pytest.raises(ValueError, match="degree"):
        SecAggParams(clip_norm=1.0, scale=1.0, max_cohort=10, degree=0)
    with pytest.raises(ValueError, match="noise_stddev"):
        SecAggParams(clip_norm=1.0, scale=1.0, max_cohort=10, noise_stddev=0.1)


# ---------------------------------------------------------------------- what the server sees
#: The p-value below which an unseeded statistical check fails (one false failure in a million runs per check).
P_MIN = 1e-6


def test_masked_vector_is_indistinguishable_from_uniform():
    """One client's masked vector of an all-zero update: top bits chi-square and KS against uniform."""
    d = 20_000
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**10, max_cohort=50)
    bits = cfg.modulus_bits
    server, clients, _, _ = _round(n=5, cfg=cfg, d=d)
    rnd = server.start_round(1, list(clients), d)
    req = rnd.masked_input_requests()[3]
    packed = clients[3].masked_input(req, np.zeros(d, np.float32))["masked"]
    assert packed.dtype == np.uint8 and packed.size == packed_size(d, bits)  # exactly d b-bit values
    y = unpack_bits(packed, bits, d)
    top = (y >> np.uint64(bits - 4)).astype(np.int64)
    counts = np.bincount(top, minlength=16)
    assert counts.size == 16
    # The masks come from fresh keys every run: each check fails by chance with probability P_MIN (a threshold of
    # 1e-3 failed CI once); a mask that is not uniform (zeros, a short period, a biased expansion) gives p-values
    # hundreds of orders of magnitude below it on 20,000 values.
    assert stats.chisquare(counts).pvalue > P_MIN
    assert stats.kstest(y.astype(np.float64) / 2.0**bits, "uniform").pvalue > P_MIN
    low = (y & np.uint64(0xFF)).astype(np.int64)
    assert stats.chisquare(np.bincount(low, minlength=256)).pvalue > P_MIN


def test_payloads_fit_flower_records():
    from flwr.common import Array, ArrayRecord, ConfigRecord, serde

    server, clients, ups, ex = _round()
    rnd = server.start_round(1, list(clients), D)
    msgs = [clients[1].advertise()]
    req1 = rnd.masked_input_requests()
    msgs.append(req1[1])
    for c, req in req1.items():
        msgs.append(clients[c].masked_input(req, ups[c], ex[c]))
        rnd.receive_masked(msgs[-1])
    for c, req in rnd.consistency_requests().items():
        msgs += [req, clients[c].consistency(req)]
        rnd.receive_consistency(msgs[-1])
    req2 = rnd.unmask_requests()
    msgs += [req2[1], clients[1].unmask(req2[1])]
    for m in msgs:
        arrays = {k: v for k, v in m.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in m.items() if not isinstance(v, np.ndarray)}
        assert all(a.ndim == 1 and a.dtype in (np.uint8, np.uint64, np.int64, np.float32) for a in arrays.values())
        assert all(type(v) in (int, float, bool, str, bytes) for v in scalars.values())
        serde.config_record_to_proto(ConfigRecord(scalars))
        rec = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        for k, v in arrays.items():
            np.testing.assert_array_equal(rec[k].numpy(), v)
        assert payload_nbytes(m) > 0


def test_stats_and_bytes():
    st = SecAggStats()
    ups = make_updates(6)
    run_secure_sum(ups, CFG, extras=make_extras(sorted(ups)), stats=st, rng=SecureRNG(b"b"))
    assert set(st.client_seconds) == set(ups) and st.server_seconds > 0
    packed = packed_size(D + len(CFG.extras), CFG.modulus_bits)  # the b-bit vector
    k = default_degree(len(ups))
    shares = (k + 1) * (SEAL_OVERHEAD + SHARE_BYTES * (k + 1))  # one ciphertext per share holder
    # + holder ids, round, field names, and two signatures (the stage-1 reply's and the consistency check's)
    assert all(packed + shares + 2 * 64 < st.bytes_up[c] < packed + shares + 2 * 64 + 500 for c in ups)


# -------------------------------------------------------------------------------- graph
def test_graph_regular_symmetric_and_deterministic():
    ids = list(range(100))
    k = default_degree(100)
    g = build_graph(ids, k, b"x" * 32)
    assert g == build_graph(ids[::-1], k, b"x" * 32)
    assert g != build_graph(ids, k, b"y" * 32)
    assert all(len(nb) == k and c not in nb for c, nb in g.items())
    assert all(c in g[v] for c, nb in g.items() for v in nb)
    assert is_connected(g, ids)
    # k-connected: removing any k - 1 clients (here: random sets) keeps it connected
    rng = np.random.default_rng(0)
    for _ in range(50):
        drop = set(rng.choice(ids, size=k - 1, replace=False).tolist())
        assert is_connected(g, [c for c in ids if c not in drop])
    small = build_graph([1, 2, 3], 8, b"z" * 32)
    assert small == {1: (2, 3), 2: (1, 3), 3: (1, 2)}


def test_default_degree_grows_logarithmically():
    assert [default_degree(n) for n in (2, 10, 50, 100, 200, 1000)] == [1, 9, 18, 20, 24, 30]
