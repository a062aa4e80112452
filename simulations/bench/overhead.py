"""``fedpersona bench overhead``: what a participation costs besides its training.

    fedpersona bench overhead --quick                                  # 16 users, all 16 a round, 2 rounds
    fedpersona bench overhead --users 50,200,1000 --cohorts 8,32,64    # the table of docs/performance.md
    fedpersona bench overhead --users 1000 --cohorts 16 --rounds 2     # the final evaluation at N = 1000

Each (N users, K per round) pair with K <= N runs the federation ``fedpersona run`` runs: the real
ServerApp round loop and ClientApp over the in-process :class:`~fedpersona.simulations.engine.grid.EngineGrid`,
each round's cohort trained by the cohort engine, DP-SGD and secure aggregation on, every device
with its encrypted store on disk, then the final evaluation. The model is the tests' tiny Llama
(``tests/conftest.py``), so that the framework's own costs show; the settings are the demo's
with the tiny model's (:data:`SETTINGS`; ``--set KEY=VALUE`` changes them).

Per round and for the final evaluation it prints, as a table and into a JSON file:

* ``wall``: the round's (or the evaluation's) wall time, as the round loop measures it;
* ``engine``: the cohort engine's time in it: the round's training call (the grid's
  ``engine_seconds``) or the evaluation's batched held-out passes (``eval_seconds``);
* ``framework``: everything else (device builds, policy and budget checks, the accountant, the
  devices' stores, secure aggregation on both sides, messages), and that per participation
  (devices that trained in the round; devices evaluated in the final evaluation);
* ``fsync``: the time spent in ``os.fsync`` (and the number of calls), the durable writes of the
  devices' encrypted stores: part of the framework's time;
* ``lower blocks``: the frozen blocks' forward pass over the examples of the devices built in the stage
  (once per device, one batched sweep per cohort: :meth:`EngineGrid._build_ahead`): part of the framework's
  time here, although it is the model's own compute (a device built once pays it once);
* ``secagg``: the secure-aggregation time the run records (``secagg-seconds``: the server's
  protocol CPU, the key advertisement and the unmask stage), beside the protocol's own CPU for
  the same K and vector length run in process (:func:`fedpersona.privacy.secagg.run_secure_sum`, as
  ``python -m fedpersona.simulations.bench.secagg`` runs it: every client's and the server's CPU).

The last line is ``framework per participation: X ms``: the mean over the rounds' participations
at the largest K it ran (the final evaluation apart).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

#: The demo's scenario with the tests' tiny model and its small data settings. ``data.min-examples = 3``
#: lets up to 1,023 Shakespeare roles take part (each keeps at most 16 examples, a quarter held out).
SETTINGS: dict[str, Any] = {
    "model.seq-len": 32, "model.cue-tokens": 8, "model.device": "cpu", "model.dtype": "float32",
    "adapter.layers": 2, "adapter.personal-layers": 1, "adapter.rank": 2,
    "data.min-examples": 3, "data.max-examples": 16, "client.batch-size": 4, "privacy.delta": 1e-2,
    # As the corpus scenario: no per-round held-out passes, no local-only baseline (a second training).
    "eval.per-round": False, "eval.local-baseline": False,
    # A participation as the cohort engine trains it: the noise on each device (one train message a round).
    "privacy.noise-on": "device", "privacy.max-grad-norm": 1.0, "server.optimizer": "fedavg", "server.lr": 1.0,
}
QUICK = {"users": (16,), "cohorts": (16,), "rounds": 2}
DEFAULT = {"users": (50, 200, 1000), "cohorts": (8, 32, 64), "rounds": 2}


class _Fsyncs:
    """Counts ``os.fsync`` calls and the wall time during which at least one is in flight, while active: what
    durable writes (the devices' stores) cost. A group commit's concurrent calls count once in the time."""

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0
        self._saved = None
        self._lock = threading.Lock()
        self._inflight, self._since = 0, 0.0

    def __enter__(self) -> "_Fsyncs":
        self._saved = real = os.fsync

        def fsync(fd) -> None:
            with self._lock:
                self.calls += 1
                if self._inflight == 0:
                    self._since = time.perf_counter()
                self._inflight += 1
            try:
                real(fd)
            finally:
                with self._lock:
                    self._inflight -= 1
                    if self._inflight == 0:
                        self.seconds += time.perf_counter() - self._since

        os.fsync = fsync
        return self

    def __exit__(self, *exc) -> None:
        os.fsync = self._saved


class _Recorder:
    """Progress events + the grid's engine clocks -> one row per round and one for the final evaluation."""

    def __init__(self, fsyncs: _Fsyncs) -> None:
        self.grid = None
        self.fsyncs = fsyncs
        self.rows: list[dict[str, Any]] = []
        self._start: tuple[float, ...] = (0.0, 0.0, 0, 0.0, 0.0)
        self._stages: dict[str, float] = {}

    def attach(self, grid) -> None:
        self.grid = grid

    def _clocks(self) -> tuple[float, ...]:
        g = self.grid
        return (float(getattr(g, "engine_seconds", 0.0)), float(getattr(g, "eval_seconds", 0.0)),
                self.fsyncs.calls, self.fsyncs.seconds, float(getattr(g, "build_seconds", 0.0)))

    def _row(self, stage: str, rnd: int | None, participations: int, seconds: float, engine: int) -> None:
        now = self._clocks()
        self.rows.append({"stage": stage, "round": rnd, "participations": participations, "wall_s": seconds,
                          "engine_s": now[engine] - self._start[engine], "stages_s": dict(self._stages),
                          "fsync_calls": now[2] - self._start[2], "fsync_s": now[3] - self._start[3],
                          "lower_s": now[4] - self._start[4]})

    def event(self, kind: str, **f: Any) -> None:
        if kind in ("round-start", "eval-start"):
            self._start = self._clocks()
            self._stages = {}
        elif kind == "stage-end":
            stage = str(f.get("stage"))
            self._stages[stage] = self._stages.get(stage, 0.0) + float(f.get("seconds", 0.0))
        elif kind == "round-end":
            self._row(f"round {f['round']}", int(f["round"]), int(f["trained"]), float(f["seconds"]), 0)
        elif kind == "eval-end":
            self._row("final evaluation", None, int(f["users"]), float(f["seconds"]), 1)


def tiny_model(folder: Path) -> Path:
    """The tests' tiny Llama (``tests/conftest.py``: 4 blocks, hidden 32, a 400-token BPE)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_model

    return build_tiny_model(folder)


def protocol_cpu(cfg, cohort: int, length: int) -> float:
    """CPU seconds of one secure sum of ``cohort`` vectors of ``length`` in process (every client + the server),
    at the run's own protocol settings (``secagg.*``) and as a simulation runs it: every client with an identity
    under one root (bound keys, checked by every neighbour), the clients in one process sharing its cache of
    checked signatures (``python -m fedpersona.simulations.bench.secagg`` clears it at every step, as a device
    alone would); plus each client's key advertisement (its keys and their binding), which the round in which
    a node first takes part includes."""
    import numpy as np

    from fedpersona.identity import IdentityRoot
    from fedpersona.privacy.secagg import SecAggClient, SecAggStats, run_secure_sum
    from fedpersona.privacy.secagg.settings import extras_specs, secagg_params

    params = secagg_params(cfg)
    rng = np.random.default_rng(0)
    bound = 0.5 * cfg.secagg.clip_norm / np.sqrt(length)
    updates = {100 + i: rng.uniform(-bound, bound, length).astype(np.float32) for i in range(cohort)}
    extras = {c: {e.name: 0.0 for e in extras_specs(cfg)} for c in updates}
    root = IdentityRoot()
    clients = {c: SecAggClient(c, params, identity=root.issue()) for c in updates}
    t0 = time.process_time()
    for client in clients.values():
        client.advertise(run_id=0)
    advertise = time.process_time() - t0
    stats = SecAggStats()
    run_secure_sum(updates, params, extras=extras, stats=stats, clients=clients)
    return float(sum(stats.client_seconds.values()) + stats.server_seconds + advertise)


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    n = max(1, row["participations"])
    row["framework_s"] = max(0.0, row["wall_s"] - row["engine_s"])
    row["framework_per_participation_ms"] = 1000.0 * row["framework_s"] / n
    row["engine_per_participation_ms"] = 1000.0 * row["engine_s"] / n
    row["fsync_per_participation_ms"] = 1000.0 * row["fsync_s"] / n
    row["fsyncs_per_participation"] = row["fsync_calls"] / n
    row["lower_per_participation_ms"] = 1000.0 * row.get("lower_s", 0.0) / n
    return row


def run_one(users: int, cohort: int, rounds: int, *, model_dir: Path, root: Path, cpus: int | None = None,
            overrides: dict[str, Any] | None = None, final: bool = True) -> dict[str, Any]:
    """One federation of ``users`` devices, ``cohort`` a round, ``rounds`` rounds (+ the final evaluation)."""
    from fedpersona.config import load_config
    from fedpersona.simulations.runner import run

    name = f"overhead-n{users}-k{cohort}"
    flat = {**SETTINGS, "model.path": str(model_dir), "data.max-users": users, "server.clients-per-round": cohort,
            "server.num-rounds": rounds, "eval.final": final, "run.name": name,
            "run.state-dir": str(root / "state"), "run.results-dir": str(root / "results"), **(overrides or {})}
    with _Fsyncs() as fsyncs:
        rec = _Recorder(fsyncs)
        t0 = time.perf_counter()
        metrics = run("demo", flat, cpus=cpus, engine="cohort", progress=rec, on_grid=rec.attach)
        total = time.perf_counter() - t0
    failures = int(metrics.get("failure_count", 0))
    by_round = {int(r["round"]): r for r in metrics.get("rounds", [])}
    rows = []
    for row in rec.rows:
        info = by_round.get(row["round"], {}) if row["round"] is not None else metrics.get("final", {})
        row["secagg_s"] = float(info.get("secagg-seconds", 0.0))
        row["secagg_server_cpu_s"] = float(info.get("secagg-server-cpu-seconds", 0.0))
        rows.append(_finish(row))
    cfg = load_config(metrics["config"], env=False)
    length = int(metrics["parameters"]["shared"])
    return {"users": users, "cohort": cohort, "rounds": rounds, "rows": rows, "run_s": total,
            "failures": failures, "fallbacks": int(getattr(rec.grid, "fallbacks", 0)), "shared_params": length,
            "protocol_cpu_s": protocol_cpu(cfg, cohort, length)}


def _table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| N | K | stage | participations | wall s | engine s | framework s | framework / participation ms "
             "| of which fsync ms (calls) | of which lower blocks ms | engine / participation ms "
             "| secagg s (protocol CPU s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            sec = (f"{row['secagg_s']:.2f} ({r['protocol_cpu_s']:.2f})" if row["round"] is not None
                   else f"{row['secagg_s']:.2f}")
            lines.append(f"| {r['users']} | {r['cohort']} | {row['stage']} | {row['participations']} | "
                         f"{row['wall_s']:.2f} | {row['engine_s']:.2f} | {row['framework_s']:.2f} | "
                         f"{row['framework_per_participation_ms']:.1f} | {row['fsync_per_participation_ms']:.1f} "
                         f"({row['fsyncs_per_participation']:.1f}) | {row['lower_per_participation_ms']:.1f} | "
                         f"{row['engine_per_participation_ms']:.1f} | {sec} |")
    return lines


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The figure of the last line: framework seconds over participations, rounds at the largest K pooled."""
    if not results:
        raise ValueError("bench overhead: no (N, K) pair ran (every K was larger than every N)")
    largest = max(r["cohort"] for r in results)
    rows = [row for r in results if r["cohort"] == largest for row in r["rows"] if row["round"] is not None]
    parts = max(1, sum(row["participations"] for row in rows))
    return {"largest_cohort": largest, "participations": sum(row["participations"] for row in rows),
            **{f"{k}_per_participation_ms": 1000.0 * sum(row.get(f"{k}_s", 0.0) for row in rows) / parts
               for k in ("framework", "engine", "fsync", "lower")}}


def bench(*, users: tuple[int, ...], cohorts: tuple[int, ...], rounds: int, cpus: int | None = None,
          overrides: dict[str, Any] | None = None, final: bool = True, model_dir: Path | None = None,
          json_path: str | os.PathLike | None = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (N, K) pair with K <= N; returns the figures (the JSON file's content, written to ``json_path``)."""
    for name, values in (("--users", users), ("--cohorts", cohorts)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in values):
            raise ValueError(f"bench overhead: {name} must be whole numbers >= 2. You passed: {values!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"bench overhead: --rounds must be a whole number >= 1. You passed: {rounds!r}")
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="fedpersona-overhead-") as tmp:
        tmp_root = Path(tmp)
        model = model_dir or tiny_model(tmp_root / "tiny-model")
        for n in users:
            for k in cohorts:
                if k > n:
                    continue
                root = tmp_root / f"n{n}-k{k}"
                r = run_one(n, k, rounds, model_dir=model, root=root, cpus=cpus, overrides=overrides, final=final)
                shutil.rmtree(root, ignore_errors=True)
                results.append(r)
                last = r["rows"][-1]
                logger.info("N=%d K=%d: %.1f s; %s %.1f ms framework per participation", n, k, r["run_s"],
                            last["stage"], last["framework_per_participation_ms"])
    s = summary(results)
    doc = {"settings": {**SETTINGS, **(overrides or {})}, "users": list(users), "cohorts": list(cohorts),
           "rounds": rounds, "cpus": cpus or os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average": list(os.getloadavg()), "python": platform.python_version(), "torch": torch.__version__,
           "runs": results, **s}
    out(f"bench overhead: the tiny model (tests/conftest.py), the demo's settings with {json.dumps(SETTINGS)}; "
        f"secure aggregation and DP-SGD on, cohort engine; {rounds} round(s) per (N, K)"
        + (" + the final evaluation" if final else ""))
    out(f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average "
        f"{', '.join(f'{x:.1f}' for x in doc['load_average'])}; python {doc['python']}, torch {doc['torch']}")
    for line in _table(results):
        out(line)
    for r in results:
        if r["failures"] or r["fallbacks"]:
            out(f"N={r['users']} K={r['cohort']}: {r['failures']} failure(s), {r['fallbacks']} device round(s) "
                "trained outside the engine (counted as framework time)")
    out("framework = wall - engine; per participation: devices that trained in the round (evaluated, for the "
        "final evaluation); fsync: the time in os.fsync (the devices' durable writes), part of the framework's; "
        "lower blocks: the frozen blocks' forward pass over the examples of the devices built in the stage (once per "
        "device, one batched sweep per cohort), part of the framework's; "
        "secagg: the run's secure-aggregation time (server CPU + key advertisement + unmask stage), in brackets "
        "the protocol's own CPU for one round of K clients (every client and the server)")
    out(f"at K = {s['largest_cohort']}: engine {s['engine_per_participation_ms']:.1f} ms per participation; "
        f"framework {s['framework_per_participation_ms']:.1f} ms, of which fsync "
        f"{s['fsync_per_participation_ms']:.1f} ms and the lower blocks {s['lower_per_participation_ms']:.1f} ms")
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        out(f"figures: {path}")
    out(f"framework per participation: {s['framework_per_participation_ms']:.1f} ms")
    return doc


def main(*, quick: bool = False, users: tuple[int, ...] | None = None, cohorts: tuple[int, ...] | None = None,
         rounds: int | None = None, cpus: int | None = None, overrides: dict[str, Any] | None = None,
         json_path: str | None = None, final: bool = True) -> int:
    preset = QUICK if quick else DEFAULT
    bench(users=tuple(users or preset["users"]), cohorts=tuple(cohorts or preset["cohorts"]),
          rounds=rounds or preset["rounds"], cpus=cpus, overrides=overrides, final=final,
          json_path=json_path or "results/bench-overhead.json")
    return 0
