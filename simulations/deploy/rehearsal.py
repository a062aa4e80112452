"""A real Flower deployment on this machine: SuperLink + N SuperNodes as separate processes on 127.0.0.1.

Everything a multi-host deployment does (docs/deployment.md), on loopback: a CA and certificates
(``fedpersona certs``), SuperNode keys registered with the SuperLink, the SuperLink with TLS and
``--enable-supernode-auth`` on 127.0.0.1 behind the Fleet gateway (``server/gateway.py``: the one
address the devices dial), one device per Shakespeare user (``fedpersona supernode``: a SuperNode
plus its warm ClientApp worker, with the user's own ``*.jsonl`` data folder and state folder),
``flwr run`` through a ``[superlink.<name>]`` connection with the CA as root certificate, progress from
``flwr ls`` / ``flwr log``, results from the run folder. Every process is started in its own session
and stopped by its process id (its whole process tree), also when something fails.

    python -m fedpersona.simulations.deploy.rehearsal --users 4 --rounds 2                  # the demo model
    python -m fedpersona.simulations.deploy.rehearsal --users 4 --rounds 3 --tiny            # a tiny random model, fast
    python -m fedpersona.simulations.deploy.rehearsal --users 4 --rounds 3 --compare         # + the same cohort simulated

The harness is :mod:`fedpersona.simulations.deploy.federation`; this module is the command and its figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedpersona.config import load_config, parse_override
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.deploy.federation import CONNECTION, REPO, LocalFederation
from fedpersona.simulations.runner import run

__all__ = ["deploy", "main", "simulate", "users_for", "worker_task_stats"]

logger = logging.getLogger(__name__)


def worker_task_stats(text: str) -> list[dict]:
    """Parse the worker's ``<type> task done in S s (ClientApp A s, ...); message bytes in I out O`` lines."""
    pat = re.compile(r"(\S+) task done in ([\d.]+) s \(ClientApp ([\d.]+) s, (\w+)\); message bytes in (-?\d+) out (-?\d+)")
    return [{"type": m[1], "seconds": float(m[2]), "app_seconds": float(m[3]), "status": m[4],
             "bytes_in": int(m[5]), "bytes_out": int(m[6])} for m in pat.finditer(text)]


def users_for(n: int, *, min_speeches: int, seed: int = 0):
    users = load_users(min_speeches=min_speeches, max_users=n, seed=seed)
    if len(users) < n:
        raise ValueError(f"only {len(users)} users have at least {min_speeches} speeches; asked for {n}")
    return users


def deploy(root: Path, *, users: int, run_config: dict[str, Any], warm: bool = True, torch_threads: int = 1,
           timeout: float = 1800.0) -> dict:
    """From nothing to a finished run and back to nothing; returns the run's metrics plus timings."""
    cfg = load_config(run_config, env=False)
    t0 = time.time()
    with LocalFederation(root, warm=warm, torch_threads=torch_threads) as fed:
        names = [f"device-{i}" for i in range(users)]
        fed.credentials(names)
        fed.start_superlink()
        t_link = time.time()
        devices = []
        for name, user in zip(names, users_for(users, min_speeches=cfg.data.min_speeches, seed=cfg.run.seed)):
            dev = fed.add_device(name, user.user_id, [(e.cue, e.reply) for e in user.examples])
            fed.register(dev)
            devices.append(dev)
        t_nodes = time.time()
        for dev in devices:
            fed.start_device(dev)
        fed.wait_connected(devices, timeout=600)
        t_ready = time.time()
        t_submit = time.time()
        run_id = fed.submit(dict(run_config, **{"run.results-dir": str(fed.results_dir)}))
        logger.info("run %d submitted; follow it with: FLWR_HOME=%s flwr log %d %s", run_id, fed.flwr_home, run_id,
                    CONNECTION)
        first_round_at = None
        metrics_path = fed.results_dir / cfg.run.name / "metrics.json"

        def first_round() -> None:
            nonlocal first_round_at
            if first_round_at is None and metrics_path.exists():
                try:
                    if json.loads(metrics_path.read_text()).get("rounds"):
                        first_round_at = time.time()
                except (json.JSONDecodeError, OSError):
                    pass

        status = fed.wait_run(run_id, timeout=timeout, run_name=cfg.run.name, on_poll=first_round)
        t_end = time.time()
        log = fed.run_log(run_id)
        (fed.root / "logs" / f"run-{run_id}.log").write_text(log)
        metrics = fed.metrics(cfg.run.name)
        tasks = {d.name: worker_task_stats(d.proc.text()) for d in devices if d.proc}
    rounds = metrics.get("rounds", [])
    train_tasks = [t for ts in tasks.values() for t in ts if t["type"] == "train"]
    return {
        "status": status,
        "run_id": run_id,
        "metrics": metrics,
        "round_seconds": [r["seconds"] for r in rounds],
        "superlink_start_seconds": t_link - t0,
        "supernode_start_to_ready_seconds": t_ready - t_nodes,
        "supernode_start_to_first_round_seconds": (first_round_at - t_nodes) if first_round_at else None,
        "submit_to_first_round_seconds": (first_round_at - t_submit) if first_round_at else None,
        "total_seconds": t_end - t0,
        "train_bytes_in_per_device_round": _mean([t["bytes_in"] for t in train_tasks]),
        "train_bytes_out_per_device_round": _mean([t["bytes_out"] for t in train_tasks]),
        "tasks": tasks,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def simulate(root: Path, *, users: int, run_config: dict[str, Any], cpus: int | None = None,
             torch_threads: int | None = None) -> dict:
    """The same cohort and config through the Simulation Engine (``fedpersona run``): one client at a
    time, with ``torch_threads`` threads (default: all ``cpus``, as ``fedpersona run`` does)."""
    if torch_threads:
        os.environ["FEDPERSONA_TORCH_THREADS"] = str(torch_threads)
    flat = dict(run_config)
    flat.update({"run.results-dir": str(root / "sim-results"), "run.state-dir": str(root / "sim-state"),
                 "data.max-users": users})
    t0 = time.time()
    metrics = run(None, flat, cpus=cpus)
    return {"metrics": metrics, "round_seconds": [r["seconds"] for r in metrics["rounds"]],
            "total_seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedpersona.simulations.deploy.rehearsal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=4, help="devices (one Shakespeare user each)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--root", default=None, help="working folder (default: a fresh temporary one, removed after)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (seconds, not minutes)")
    p.add_argument("--cold", action="store_true", help="Flower's default: a fresh ClientApp process per message")
    p.add_argument("--compare", action="store_true", help="also simulate the same cohort and compare round times")
    p.add_argument("--threads", type=int, default=1, help="torch threads per device process (default 1)")
    p.add_argument("--sim-threads", type=int, default=None,
                   help="torch threads of the simulated clients (default: all CPUs, as `fedpersona run`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    from fedpersona.output import configure

    configure(logging.INFO)  # one handler: each line once, no ANSI codes

    tmp = None
    root = Path(args.root) if args.root else Path(tmp := tempfile.mkdtemp(prefix="fedpersona-deploy-"))
    try:
        run_config: dict[str, Any] = {
            "run.name": "deploy-local", "server.num-rounds": args.rounds, "server.clients-per-round": args.users,
            "server.min-clients": min(2, args.users), "data.max-users": args.users,
        }
        if args.users < 6:  # t = half the cohort would be below the devices' floor of 3 honest contributors
            logger.warning("%d devices: too few for the noise on the sum (t = %d < the devices' floor of 3); the "
                           "rehearsal runs with the noise on each device (privacy.noise-on = device)", args.users,
                           args.users // 2)
            run_config.update({"privacy.noise-on": "device", "privacy.max-grad-norm": 1.0, "server.optimizer": "fedavg",
                               "server.lr": 1.0, "client.local-steps": 3})
        if args.tiny:
            sys.path.insert(0, str(REPO))
            from tests.conftest import build_tiny_model

            tiny = build_tiny_model(root / "tiny-model")
            run_config.update({"model.path": str(tiny), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.rank": 2,
                               "data.max-examples": 16, "client.local-steps": 2, "client.batch-size": 4,
                               "privacy.delta": 1e-2})
        for text in args.set:
            k, v = parse_override(text)
            run_config[k] = v
        dep = deploy(root / "deploy", users=args.users, run_config=run_config, warm=not args.cold,
                     torch_threads=args.threads)
        m = dep["metrics"]
        figures = {k: v for k, v in dep.items() if k not in ("metrics", "tasks")}
        figures["failed"] = sum(r.get("failed", 0) for r in m.get("rounds", []))
        figures["aggregation"] = m.get("aggregation")
        print(f"\nDeployment ({'cold' if args.cold else 'warm'} ClientApps, {args.users} devices): run {dep['run_id']} {dep['status']}")
        print(f"  round seconds:                 {', '.join(f'{s:.1f}' for s in dep['round_seconds'])}")
        print(f"  SuperNode start -> ready:      {dep['supernode_start_to_ready_seconds']:.1f} s")
        if dep["supernode_start_to_first_round_seconds"] is not None:
            print(f"  SuperNode start -> 1st round:  {dep['supernode_start_to_first_round_seconds']:.1f} s "
                  f"(flwr run -> 1st round {dep['submit_to_first_round_seconds']:.1f} s)")
        if dep["train_bytes_in_per_device_round"] is not None:
            print(f"  bytes per device per round:    in {dep['train_bytes_in_per_device_round']:.0f}, "
                  f"out {dep['train_bytes_out_per_device_round']:.0f} (train messages, before TLS/HTTP framing)")
        print(f"  failures: {figures['failed']}; aggregation: {figures['aggregation']}")
        if args.compare:
            sim = simulate(root, users=args.users, run_config=run_config, cpus=os.cpu_count(),
                           torch_threads=args.sim_threads)
            figures["simulation_round_seconds"] = sim["round_seconds"]
            d, s = dep["round_seconds"], sim["round_seconds"]
            later = lambda xs: xs[1:] if len(xs) > 1 else xs  # noqa: E731  (round 1 includes set-up)
            ratio = _mean(later(d)) / _mean(later(s))
            figures["deploy_over_simulation"] = ratio
            print(f"Simulation (same cohort): round seconds {', '.join(f'{x:.1f}' for x in s)}")
            print(f"  deployment / simulation, rounds after the first: {ratio:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0 if dep["status"].endswith("completed") and figures["failed"] == 0 else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
