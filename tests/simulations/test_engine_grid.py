"""The cohort engine below the ServerApp (EngineGrid) against the sequential ClientApp path (InProcessGrid)."""

from __future__ import annotations

import gc
import json
import logging
import pathlib
import re
import tracemalloc
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpersona.client import app as client_app
from fedpersona.client.store import DeviceStore
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.noise import NoiseSource
from fedpersona.server.federation import run_federation
from fedpersona.simulations.engine.grid import EngineGrid
from fedpersona.simulations.inprocess import InProcessGrid
from fedpersona.simulations.partitions import prepare_partitions, simulated_state_dir
from fedpersona.simulations.runner import resolve
from fedpersona.simulations.sources import load_source
from tests.simulations.engine_helpers import federate_on_engine_grid


def _setup(tiny_config, root: Path, **over):
    flat, cfg = resolve(None, dict(tiny_config, **{"run.results-dir": str(root / "results"),
                                                   "run.state-dir": str(root / "state"), **over}))
    users = load_source(cfg.data, cfg.run.seed)
    prepare_partitions(cfg, users)
    return flat, cfg, users


def _inject_sources(grid, seed: int) -> None:
    """Test-only: every device of the grid draws batches and noise from its own seeded source."""
    for i, nid in enumerate(sorted(grid.get_node_ids())):
        client_app.cached_device(grid._contexts[nid]).noise_source = NoiseSource(
            generator=torch.Generator().manual_seed(seed + i))


def _federate(grid_cls, tiny_config, root: Path, *, refuse: int | None = None, spent: int | None = None, **over):
    flat, cfg, users = _setup(tiny_config, root, **over)
    if spent is not None:
        ledger = PrivacyLedger(accountant=cfg.privacy.accountant)
        ledger.step(noise_multiplier=0.0, sample_rate=0.5)  # a release without noise: epsilon is infinite
        DeviceStore(simulated_state_dir(cfg, users[spent].user_id)).save_text("ledger", ledger.to_json())
    nodes = {100 + i: {"partition-id": i} for i in range(len(users))}
    if refuse is not None:
        nodes[100 + refuse]["policy.max-epsilon"] = 4.0  # below privacy.target-epsilon = 8: refuses every round
    run_id = uuid.uuid4().int % 2**62
    try:
        with grid_cls(client_app.app, nodes, flat, run_id=run_id) as grid:
            _inject_sources(grid, seed=500)
            metrics = run_federation(grid, cfg)
    finally:
        for nid in nodes:
            client_app._DEVICES.pop((run_id, nid), None)
    return metrics, cfg, users, grid


def _untimed(ledger_json: str | None) -> str | None:
    """A ledger's JSON without the wall-clock times of its rounds."""
    return None if ledger_json is None else re.sub(r'"\d{4}-\d\d-\d\dT[^"]*"', '"T"', ledger_json)


def _final_shared(cfg) -> dict[str, torch.Tensor]:
    ckpt = Path(cfg.run.results_dir) / cfg.run.name / "checkpoints" / f"round-{cfg.server.num_rounds:04d}"
    return load_file(str(ckpt / "shared" / "adapter_model.safetensors"))


def test_engine_grid_equals_the_sequential_clientapp_path(tiny_config, tmp_path, caplog):
    """8 clients, 2 rounds, secure aggregation on; one device refuses by policy, one has its budget spent,
    batch size 1 so that some Poisson batches are empty: same adapter, heads and ledgers on both paths."""
    over = {"data.max-users": 8, "server.clients-per-round": 8, "client.batch-size": 1, "client.local-steps": 3,
            "eval.local-baseline": False}
    caplog.set_level(logging.INFO, logger="fedpersona.client.device")
    m_seq, cfg_seq, users, _ = _federate(InProcessGrid, tiny_config, tmp_path / "seq", refuse=2, spent=5, **over)
    seq_lines = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.device"]
    caplog.clear()
    m_eng, cfg_eng, _, grid = _federate(EngineGrid, tiny_config, tmp_path / "eng", refuse=2, spent=5, **over)
    eng_lines = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.device"]

    assert len(users) == 8
    assert grid.cohorts == 2 and grid.fallbacks == 0
    assert m_eng["aggregation"] == m_seq["aggregation"] == "secagg+"
    for r_seq, r_eng in zip(m_seq["rounds"], m_eng["rounds"], strict=True):
        assert r_eng["applied"] and r_seq["applied"]
        assert (r_eng["contributors"], r_eng["declined"], r_eng["failed"]) == (6, 1, 1)
        assert (r_seq["contributors"], r_seq["declined"], r_seq["failed"]) == (6, 1, 1)
        assert r_eng["update-norm"] == pytest.approx(r_seq["update-norm"], rel=1e-4)
    trained_eng = [line for line in eng_lines if re.search(r"round \d: \d+ steps", line)]
    assert len(trained_eng) == 12 and all("(cohort engine)" in line for line in trained_eng)
    assert not any("(cohort engine)" in line for line in seq_lines)
    assert any(int(x) > 0 for x in re.findall(r"\((\d+) empty\)", " ".join(trained_eng))), "no empty Poisson batch"

    a, b = _final_shared(cfg_seq), _final_shared(cfg_eng)
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)
    for i, u in enumerate(users):
        s_seq = DeviceStore(simulated_state_dir(cfg_seq, u.user_id))
        s_eng = DeviceStore(simulated_state_dir(cfg_eng, u.user_id))
        assert _untimed(s_eng.load_text("ledger")) == _untimed(s_seq.load_text("ledger")), u.user_id
        h_seq, h_eng = s_seq.load_tensors("personal"), s_eng.load_tensors("personal")
        if i in (2, 5):
            assert h_seq is None and h_eng is None  # never trained
            continue
        for n in h_seq:
            # Adam divides by sqrt(v): where a gradient is ~0, float noise in it moves a step by up to lr (0.01).
            torch.testing.assert_close(h_eng[n], h_seq[n], rtol=1e-3, atol=1e-3)
    eps = {u["user"]: u["epsilon"] for u in m_eng["final"]["users"]}
    assert eps == pytest.approx({u["user"]: u["epsilon"] for u in m_seq["final"]["users"]})


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can reach (CPU or GPU)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def test_engine_grid_bounds_its_devices_and_memory(tiny_config, tmp_path):
    """10 rounds, 3 of 7 devices per round, at most 4 cached: devices are evicted and rebuilt, memory flat."""
    flat, cfg, users = _setup(tiny_config, tmp_path, **{"data.max-users": 7, "server.clients-per-round": 3,
                                                        "server.num-rounds": 10, "client.local-steps": 1,
                                                        "client.head-steps": 1, "secagg.enabled": False,
                                                        "eval.local-baseline": False, "eval.per-round": False,
                                                        "eval.final": False})
    # Plain aggregation keeps the test fast; the devices' policies allow it explicitly.
    nodes = {100 + i: {"partition-id": i, "policy.allow-no-secagg": True} for i in range(len(users))}
    run_id = uuid.uuid4().int % 2**62
    sizes, traced = [], []

    class Probe(EngineGrid):
        def _train_ahead(self, messages):
            super()._train_ahead(messages)
            if not any(m.metadata.message_type == "train" for m in messages):
                return
            sizes.append(len(client_app.cached_devices(self.run_id)))
            gc.collect()
            if len(sizes) == 3:  # from round 3 on: devices built, the first evictions done
                tracemalloc.start()
            elif tracemalloc.is_tracing():
                # CPython's table of interned strings grows in one block of several MiB when it resizes,
                # attributed to whichever line interns next: pathlib (new file names), or the compile of the
                # model card's jinja2 template at a checkpoint (seen after tests/client/test_store.py). A
                # one-time resize, not a leak: a block of 4 MiB or more is counted apart, and may appear once.
                snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, pathlib.__file__)])
                blocks = [t.size for t in snap.traces]
                big = [b for b in blocks if b >= 4 << 20]
                traced.append((sum(blocks) - sum(big), _live_tensor_bytes(), len(big)))

    try:
        with Probe(client_app.app, nodes, flat, run_id=run_id, max_devices=4) as grid:
            metrics = run_federation(grid, cfg)
    finally:
        tracemalloc.stop()
        for nid in nodes:
            client_app._DEVICES.pop((run_id, nid), None)
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, 11))
    assert all(r["applied"] and r["contributors"] == 3 for r in metrics["rounds"])
    assert grid.cohorts == 10 and max(sizes) <= 4 and len(grid._packed) == 0
    assert client_app._MAX_DEVICES is None, "the bound is the grid's, for its lifetime"
    assert not client_app.cached_devices(run_id), "the run's devices are dropped when the grid closes"
    # Memory still held, rounds 4..10 (Python objects as tracemalloc sees them since round 3, and every live
    # tensor's storage, which tracemalloc does not see): no growth beyond noise. Round 4 may still replace an
    # evicted device's data by a new one's (counted by tracemalloc as new, the freed block was older): the
    # growth is measured from round 4 on.
    assert len(traced) == 7
    py, tensors = [t[0] for t in traced], [t[1] for t in traced]
    assert max(py[1:]) - py[0] < 1 * 2**20, traced
    assert max(t[2] for t in traced) <= 1, traced  # one table resize at most, never a growing series of blocks
    assert max(tensors[1:]) - tensors[0] < 1 * 2**20, traced
    states = [DeviceStore(simulated_state_dir(cfg, u.user_id)).load_text("participation") for u in users]
    assert sum(len(json.loads(s)) for s in states if s) == 30  # 10 rounds x 3: nothing lost on eviction


def _cli_run(flat: dict, cwd: Path):
    """`fedpersona run --cpus 1 -v` in a subprocess with every key of ``flat`` as ``--set``."""
    from tests.fedpersona.cli_helpers import run_cli

    return run_cli(["run", "--cpus", "1", "-v"], cwd, flat=flat)


def test_cli_run_goes_through_the_cohort_engine(tiny_config, tmp_path):
    """`fedpersona run` (default engine) on the tiny model: exit 0, metrics.json and users.csv, no Ray."""
    flat = dict(tiny_config, **{"eval.local-baseline": False})
    proc = _cli_run(flat, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "with the cohort engine in this process" in proc.stderr
    assert "Cohort engine: 2 cohorts trained" in proc.stderr
    assert "ray" not in proc.stderr.lower()
    run_dir = Path(flat["run.results-dir"]) / "demo"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["applied"] and r["contributors"] == 3 and r["failed"] == 0 for r in metrics["rounds"])
    users_csv = (run_dir / "users.csv").read_text().splitlines()
    assert len(users_csv) == 1 + 4


@pytest.mark.parametrize("over", [{"adapter.split": "fedsa", "privacy.personal-head": "dp"}, {"privacy.personal-head": "dp"}],
                         ids=["fedsa-joint-pass", "dp-head"])
def test_engine_grid_equals_sequential_for_the_other_layouts(tiny_config, tmp_path, over, caplog):
    """One joint DP pass (fedsa), and a DP head with its own ledger: the same through both grids."""
    over = dict(over, **{"eval.local-baseline": False, "eval.per-round": False, "server.num-rounds": 1})
    m_seq, cfg_seq, users, _ = _federate(InProcessGrid, tiny_config, tmp_path / "seq", **over)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fedpersona.client.device")
    m_eng, cfg_eng, _, grid = _federate(EngineGrid, tiny_config, tmp_path / "eng", **over)
    assert grid.cohorts == 1 and grid.fallbacks == 0
    trained = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.device" and " steps (" in r.getMessage()]
    assert len(trained) == 3 and all("(cohort engine)" in line for line in trained), trained
    assert m_eng["rounds"][0]["contributors"] == m_seq["rounds"][0]["contributors"] == 3
    a, b = _final_shared(cfg_seq), _final_shared(cfg_eng)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)
    for u in users:
        s_seq = DeviceStore(simulated_state_dir(cfg_seq, u.user_id))
        s_eng = DeviceStore(simulated_state_dir(cfg_eng, u.user_id))
        for name in ("ledger", "ledger-head"):
            assert _untimed(s_eng.load_text(name)) == _untimed(s_seq.load_text(name)), (u.user_id, name)
        h_seq, h_eng = s_seq.load_tensors("personal"), s_eng.load_tensors("personal")
        assert (h_seq is None) == (h_eng is None)
        for n in h_seq or {}:
            torch.testing.assert_close(h_eng[n], h_seq[n], rtol=1e-3, atol=1e-3)
    if over.get("adapter.split") != "fedsa":
        assert any(DeviceStore(simulated_state_dir(cfg_eng, u.user_id)).load_text("ledger-head") for u in users)


def test_a_cohort_larger_than_the_device_cache_trains_sequentially(tiny_config, tmp_path, caplog):
    flat, cfg, users = _setup(tiny_config, tmp_path, **{"server.num-rounds": 1, "eval.local-baseline": False,
                                                        "eval.final": False})
    nodes = {100 + i: {"partition-id": i} for i in range(len(users))}
    run_id = uuid.uuid4().int % 2**62
    with EngineGrid(client_app.app, nodes, flat, run_id=run_id, max_devices=2) as grid:
        metrics = run_federation(grid, cfg)
    assert grid.cohorts == 0 and grid.fallbacks == 3
    assert metrics["rounds"][0]["contributors"] == 3 and metrics["rounds"][0]["applied"]
    assert "exceeds this grid's device cache" in caplog.text


def test_a_prompt_head_trains_sequentially_below_the_engine_grid(tiny_config, tmp_path, caplog):
    """The cohort engine trains LoRA heads only: with adapter.head = prompt every device trains its own round
    (one log line, no error), and the result is the sequential grid's."""
    over = {"adapter.head": "prompt", "adapter.prompt-tokens": 2, "eval.local-baseline": False,
            "eval.per-round": False}
    m_seq, cfg_seq, users, _ = _federate(InProcessGrid, tiny_config, tmp_path / "seq", **over)
    caplog.clear()
    caplog.set_level(logging.INFO)
    m_eng, cfg_eng, _, grid = _federate(EngineGrid, tiny_config, tmp_path / "eng", **over)
    assert grid.cohorts == 0 and grid.fallbacks == 6  # 2 rounds x 3 devices
    lines = [r.getMessage() for r in caplog.records if "trains LoRA heads only" in r.getMessage()]
    assert len(lines) == 1 and "adapter.head = 'prompt'" in lines[0]
    assert grid._engine is None, "no engine model is built"
    assert [r["contributors"] for r in m_eng["rounds"]] == [r["contributors"] for r in m_seq["rounds"]] == [3, 3]
    a, b = _final_shared(cfg_seq), _final_shared(cfg_eng)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)  # up to the secure sum's quantization
    heads = 0
    for u in users:
        h_seq = DeviceStore(simulated_state_dir(cfg_seq, u.user_id)).load_tensors("personal")
        h_eng = DeviceStore(simulated_state_dir(cfg_eng, u.user_id)).load_tensors("personal")
        assert (h_seq is None) == (h_eng is None)
        if h_seq is not None:
            heads += 1
            assert list(h_seq) == ["personal.prompt"]
            # Trained with Adam on top of a shared adapter equal up to the secure sum's quantization: where a
            # gradient is ~0, Adam turns that float difference into up to lr (0.01) per step.
            torch.testing.assert_close(h_eng["personal.prompt"], h_seq["personal.prompt"], rtol=1e-3, atol=1e-3)
    assert heads >= 3


def test_cli_run_with_a_prompt_head(tiny_config, tmp_path):
    """`fedpersona run --set adapter.head=prompt` end to end, local-only baseline included: exit 0."""
    flat = dict(tiny_config, **{"adapter.head": "prompt", "adapter.prompt-tokens": 4})
    proc = _cli_run(flat, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("the cohort engine trains LoRA heads only") == 1
    assert "Cohort engine: 0 cohorts trained" in proc.stderr
    assert "head prompt" in proc.stderr
    metrics = json.loads((Path(flat["run.results-dir"]) / "demo" / "metrics.json").read_text())
    assert all(r["applied"] and r["contributors"] == 3 and r["failed"] == 0 for r in metrics["rounds"])
    users = metrics["final"]["users"]  # the devices' own rows (the server's summary is a noised sum)
    for key in ("base-loss", "shared-loss", "personal-loss", "local-loss"):
        assert users and all(u[key] > 0 for u in users), key
    assert any(u["personal-loss"] != u["shared-loss"] for u in users)


def test_the_grid_builds_a_cohorts_devices_in_one_lower_block_sweep(tiny_config, tmp_path, monkeypatch):
    """Devices not in memory are built together when their train or evaluate messages arrive (one lower-block pass
    over the cohort, not one per device and split), and each device's activations land in its own store with the
    commit of its message."""
    import fedpersona.client.device as device_mod
    from fedpersona.client.device import ACTIVATIONS

    calls = []
    real = device_mod.lower_hidden
    monkeypatch.setattr(device_mod, "lower_hidden", lambda model, seqs, **kw: calls.append(len(seqs)) or real(
        model, seqs, **kw))
    flat, cfg, users = _setup(tiny_config, tmp_path, **{"data.max-users": 7, "server.clients-per-round": 3,
                                                        "server.num-rounds": 2, "eval.local-baseline": False,
                                                        "eval.per-round": False})
    metrics, _ = federate_on_engine_grid(flat, cfg, users)
    assert [r["contributors"] for r in metrics["rounds"]] == [3, 3]
    assert metrics["final"]["devices"] == len(users) == 7
    # round 1: its 3 devices; round 2: the new ones among its 3; the final evaluation: the 7 devices not in memory
    # (the grid keeps 2 cohorts, 6 devices) in one more sweep: at most 3 sweeps for 7 devices (14 passes before).
    assert 2 <= len(calls) <= 3, calls
    assert sum(calls) >= sum(1 for _ in users), calls
    for u in users:
        assert DeviceStore(simulated_state_dir(cfg, u.user_id)).exists(ACTIVATIONS), u.user_id
