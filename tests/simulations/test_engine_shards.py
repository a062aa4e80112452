"""A cohort split over several engines (2 CPU Ray actors) against one in-process engine."""

from __future__ import annotations

import functools
import logging
import re
import uuid

import pytest
import torch

from fedpersona.client import app as client_app
from fedpersona.client.store import DeviceStore
from fedpersona.server.federation import run_federation
from fedpersona.simulations.engine import ClientJob, CohortEngine, split_phases
from fedpersona.simulations.engine.shards import ShardedEngine, check_engines, split_shards, start_ray
from fedpersona.simulations.engine.engine import engine_model
from fedpersona.simulations.engine.grid import EngineGrid
from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.simulations.runner import resolve, run
from tests.simulations.engine_helpers import examples, random_states, source
from tests.simulations.test_engine_grid import _federate, _final_shared, _setup, _untimed


@pytest.fixture(scope="module")
def ray_session():
    """One Ray start (2 CPUs, loopback) for the whole module; the engines find it running and leave it."""
    import ray

    started = start_ray(2)
    yield
    if started:
        ray.shutdown()


# ----------------------------------------------------------------------------- the split
def test_split_is_balanced_and_every_shard_keeps_the_jobs_order():
    costs = [5.0, 1.0, 8.0, 3.0, 3.0, 9.0, 2.0, 7.0, 4.0, 6.0, 1.0, 1.0]
    assert split_shards(costs, 2) == [[0, 1, 4, 5, 9, 10], [2, 3, 6, 7, 8, 11]]  # 25 / 25
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n_jobs, shards = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        cs = (torch.rand(n_jobs, generator=g) * 100).tolist()
        holders = [None if h < 0 else int(h) for h in torch.randint(-1, shards, (n_jobs,), generator=g)]
        for hold in (None, holders):
            out = split_shards(cs, shards, hold)
            assert len(out) == shards
            assert sorted(i for s in out for i in s) == list(range(n_jobs)), (trial, out)
            assert all(s == sorted(s) for s in out)
            loads = [sum(cs[i] for i in s) for s in out]
            assert max(loads) - min(loads) <= max(cs) + 1e-9, (trial, loads)


def test_split_keeps_jobs_where_their_examples_are_while_balanced():
    costs = [4.0, 4.0, 4.0, 4.0]
    assert split_shards(costs, 2, [1, 1, 0, 0]) == [[2, 3], [0, 1]]  # exactly where they are
    assert split_shards(costs, 2, [0, 0, 0, 0]) == [[0, 1], [2, 3]]  # half stay, the others move
    assert split_shards(costs, 2, [1, None, None, 1]) == [[1, 2], [0, 3]]
    # Both held by shard 1: the larger would take it past the mean (4.5) and moves; the other stays.
    assert split_shards([5.0, 4.0], 2, [1, 1]) == [[0], [1]]


def test_bad_engine_counts_are_refused(tiny_config):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="whole number of at least 1. You passed"):
            check_engines(bad, 3)
    with pytest.raises(ValueError, match=r"may not exceed server.clients-per-round = 3.*You passed: 4"):
        check_engines(4, 3)
    flat, _ = resolve(None, dict(tiny_config))
    with pytest.raises(ValueError, match="server.clients-per-round = 3"):
        EngineGrid(client_app.app, {100: {"partition-id": 0}}, flat, run_id=1, engines=4)
    with pytest.raises(ValueError, match="You passed: 0"):
        run(None, dict(tiny_config), engines=0)  # before any data is read
    with pytest.raises(ValueError, match="needs engine 'cohort'"):
        run(None, dict(tiny_config), engine="flower", engines=2)


# ----------------------------------------------------------------------------- the engine
SIZES, BATCHES = (3, 14, 6, 30, 9), (2, 4, 1, 8, 3)  # client 2 (batch 1 of 6) draws empty Poisson batches


def test_sharded_engine_equals_one_engine(tiny_config, ray_session):
    """5 clients of different sizes, split phases with a DP head, two rounds: the same tensors, ledgers and
    source states as one in-process engine, results in the jobs' order, examples sent to the actors once."""
    flat, cfg = resolve(None, dict(tiny_config, **{"server.clients-per-round": 5}))
    local = CohortEngine(engine_model(cfg), device="cpu")
    clients = [(examples(local.model, n, seed=10 + c), *random_states(local.model, seed=20 + c))
               for c, n in enumerate(SIZES)]

    def jobs(src, packs):
        return [ClientJob(packs[c], sh, pe, split_phases(steps=3 + c % 2, batch_size=BATCHES[c], lr=0.01,
                                                         noise_multiplier=0.7, max_grad_norm=0.5,
                                                         noise_source=src[c], head_steps=2, head_dp=True,
                                                         head_noise_multiplier=1.1),
                          client_id=f"c{c}")
                for c, (ex, sh, pe) in enumerate(clients)]

    sharded = ShardedEngine(flat, 2, cpus=2)
    try:
        assert len(sharded.wait_ready()) == 2
        src_local = [source(300 + c) for c in range(len(SIZES))]
        src_shard = [source(300 + c) for c in range(len(SIZES))]
        handles = [sharded.pack(ex) for ex, _, _ in clients]
        packed_local = [local.pack(ex) for ex, _, _ in clients]
        for _ in range(2):
            want = local.train_cohort(jobs(src_local, packed_local))
            got = sharded.train_cohort(jobs(src_shard, handles))
            assert len(sharded.shards) == 2 and all(sharded.shards), sharded.shards
            assert [r.client_id for r in got] == [f"c{c}" for c in range(len(SIZES))]
            for w, r in zip(want, got):
                assert r.error is None and w.error is None
                assert r.ledger_steps == w.ledger_steps and r.ledger_steps
                assert [p.empty_steps for p in r.phases] == [p.empty_steps for p in w.phases]
                for n in w.shared:
                    torch.testing.assert_close(r.shared[n], w.shared[n], rtol=1e-5, atol=1e-6)
                for n in w.personal:
                    torch.testing.assert_close(r.personal[n], w.personal[n], rtol=1e-5, atol=1e-6)
            # The devices' seeded sources continue from the same state on both paths.
            for a, b in zip(src_local, src_shard):
                assert torch.equal(a.generator().get_state(), b.generator().get_state())
            assert sharded.sent == len(SIZES), "each client's examples travel to an actor once"
        assert any(r.empty_steps for r in got), "the test needs an empty Poisson batch"
        del handles[0]  # the grid drops a device: its actor drops the examples with its next call
        assert sharded._drop and any(0 in d for d in sharded._drop)
    finally:
        sharded.close()


# ----------------------------------------------------------------------------- below the ServerApp
def test_engine_grid_with_two_engines_equals_one(tiny_config, tmp_path, caplog, ray_session):
    """6 clients, all 6 per round, 2 rounds, secure aggregation on, seeded sources: EngineGrid(engines=2) gives
    the same shared adapter, personal heads and ledgers as EngineGrid(engines=1)."""
    # Plain SGD: Adam's first steps are about lr * sign(gradient), so float noise in a ~0 gradient
    # coordinate (the two runs sum a batch in another order) can move a head step by a whole lr.
    over = {"data.max-users": 6, "server.clients-per-round": 6, "client.batch-size": 2, "client.local-steps": 3,
            "eval.local-baseline": False, "client.optimizer": "sgd", "client.lr": 0.1, "client.head-lr": 0.1}
    m_one, cfg_one, users, one = _federate(EngineGrid, tiny_config, tmp_path / "one", **over)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fedpersona.client.device")
    m_two, cfg_two, _, two = _federate(functools.partial(EngineGrid, engines=2, cpus=2), tiny_config,
                                       tmp_path / "two", **over)
    trained = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.device"
               and re.search(r"round \d: \d+ steps", r.getMessage())]

    assert len(users) == 6
    assert one.cohorts == two.cohorts == 2 and one.fallbacks == two.fallbacks == 0
    assert isinstance(two.engine, ShardedEngine) and not two.engine.actors, "the actors stop with the grid"
    assert sorted(map(len, two.engine.shards)) == [3, 3]
    assert two.engine.sent == 6, "round 2 trains every client where its examples already are"
    assert len(trained) == 12 and all("(cohort engine)" in line for line in trained), trained
    assert m_two["aggregation"] == m_one["aggregation"] == "secagg+"
    for r1, r2 in zip(m_one["rounds"], m_two["rounds"], strict=True):
        assert r1["applied"] and r2["applied"] and r1["contributors"] == r2["contributors"] == 6
        assert r2["update-norm"] == pytest.approx(r1["update-norm"], rel=1e-4)
    a, b = _final_shared(cfg_one), _final_shared(cfg_two)
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)  # float order within a batch differs
    for u in users:
        s1 = DeviceStore(simulated_state_dir(cfg_one, u.user_id))
        s2 = DeviceStore(simulated_state_dir(cfg_two, u.user_id))
        assert _untimed(s2.load_text("ledger")) == _untimed(s1.load_text("ledger")), u.user_id
        h1, h2 = s1.load_tensors("personal"), s2.load_tensors("personal")
        assert h1 is not None and set(h1) == set(h2)
        for n in h1:
            torch.testing.assert_close(h2[n], h1[n], rtol=1e-4, atol=1e-5)
    eps = {u["user"]: u["epsilon"] for u in m_two["final"]["users"]}
    assert eps == pytest.approx({u["user"]: u["epsilon"] for u in m_one["final"]["users"]})


def test_a_failing_engine_makes_its_cohort_train_sequentially(tiny_config, tmp_path, caplog, ray_session):
    """An actor dies before round 1: that cohort trains on the devices (logged); a new actor takes round 2."""
    import ray

    flat, cfg, users = _setup(tiny_config, tmp_path, **{"eval.local-baseline": False, "eval.per-round": False,
                                                        "eval.final": False})
    nodes = {100 + i: {"partition-id": i} for i in range(len(users))}
    run_id = uuid.uuid4().int % 2**62
    try:
        with EngineGrid(client_app.app, nodes, flat, run_id=run_id, engines=2, cpus=2) as grid:
            grid.engine.wait_ready()
            ray.kill(grid.engine.actors[1])
            metrics = run_federation(grid, cfg)
    finally:
        for nid in nodes:
            client_app._DEVICES.pop((run_id, nid), None)
    assert grid.fallbacks == 3 and grid.cohorts == 1 and grid.engine.failures == 1
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["applied"] and r["contributors"] == 3 and r["failed"] == 0 for r in metrics["rounds"])
    assert "the cohort engine failed on a cohort of 3" in caplog.text
    assert "engine 1's actor is gone; starting a new one" in caplog.text
