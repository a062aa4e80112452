"""What the devices' encrypted store costs in a federation: its share of the run's time, and its fsyncs.

Runs ``fedpersona run``'s simulation (the cohort engine, the real apps, secure aggregation and
DP on) of the tests' tiny model for N users, K per round, R rounds and the final evaluation,
under cProfile, and prints for each N: the wall time, the time inside the store (inclusive time of
``client/store.py``, counted where it is entered from outside it), its share, the messages the
devices answered and the fsync calls (all of the run's, and per message).

    python -m fedpersona.simulations.bench.store --users 50 200 --cohort 16 --rounds 2

The measure reads only the store's file name and ``os.fsync``, so the same script measures the
store of another checkout (``PYTHONPATH=<checkout> python <this file>``): a before/after on one machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _store_seconds(profile: cProfile.Profile) -> float:
    """Inclusive time of the store's functions, counted at the calls that enter it from outside."""
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}

    def inside(func) -> bool:
        return func[0].replace(os.sep, "/").endswith("client/store.py")

    total = 0.0
    for func, (_, _, _, _, callers) in stats.items():
        if inside(func):
            total += sum(edge[3] for caller, edge in callers.items() if not inside(caller))
    return total


def measure(users: int, cohort: int, rounds: int, root: Path, model: Path) -> dict:
    from fedpersona.simulations.runner import run

    overrides = {
        "model.path": str(model), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2,
        "adapter.personal-layers": 1, "adapter.rank": 2, "data.max-users": users, "data.min-examples": 10,
        "data.max-examples": 16, "client.local-steps": 2, "client.batch-size": 4, "privacy.delta": 1e-2,
        "server.num-rounds": rounds, "server.clients-per-round": cohort, "eval.local-baseline": False,
        "run.name": f"store-{users}", "run.results-dir": str(root / "results"), "run.state-dir": str(root / "state"),
    }
    fsyncs = [0]
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd):
        fsyncs[0] += 1
        return real_fsync(fd)

    def fdatasync(fd):
        fsyncs[0] += 1
        return real_fdatasync(fd)

    from flwr.clientapp import ClientApp

    messages = [0]
    real_call = ClientApp.__call__

    def call(self, message, context):
        messages[0] += 1
        return real_call(self, message, context)

    os.fsync, os.fdatasync = fsync, fdatasync
    ClientApp.__call__ = call
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    try:
        profile.enable()
        metrics = run(None, overrides, engine="cohort")
        profile.disable()
    finally:
        os.fsync, os.fdatasync = real_fsync, real_fdatasync
        ClientApp.__call__ = real_call
    wall = time.perf_counter() - t0
    trained = sum(int(r.get("contributors", 0)) for r in metrics.get("rounds", []))
    store = _store_seconds(profile)
    return {"users": users, "cohort": cohort, "rounds": rounds, "wall_s": wall, "store_s": store,
            "store_share": store / wall if wall else 0.0, "fsyncs": fsyncs[0], "messages": messages[0],
            "participations": trained,
            "evaluated": int(metrics.get("final", {}).get("devices", 0))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[50, 200])
    p.add_argument("--cohort", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    from tests.conftest import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny-model")
        for n in a.users:
            rows.append(measure(n, a.cohort, a.rounds, root / f"n{n}", model))
    print(f"store: {sys.modules['fedpersona.client.store'].__file__}")
    print(f"{'N':>5} {'K':>4} {'R':>3} {'wall s':>8} {'store s':>8} {'share':>7} {'messages':>9} {'fsyncs':>7} "
          f"{'per message':>12}")
    for r in rows:
        print(f"{r['users']:>5} {r['cohort']:>4} {r['rounds']:>3} {r['wall_s']:>8.1f} {r['store_s']:>8.1f} "
              f"{r['store_share']:>7.1%} {r['messages']:>9} {r['fsyncs']:>7} {r['fsyncs'] / max(1, r['messages']):>12.1f}")
    print("messages: every request a device answered (key advertisement, train, unmask, evaluate); fsyncs: all of "
          "the run's, the server's included")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
