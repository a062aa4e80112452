"""The ServerApp component of ``pyproject.toml`` (``flwr run .``): the server's round loop, with the
checks a run needs before it starts and the verdict Flower reports after it.

* Folders: relative ``run.results-dir`` / ``run.state-dir`` go under the run's own folder,
  ``$FLWR_HOME/fedpersona-runs/<run id>/`` (:mod:`fedpersona.simulations.flower_runs`), never the project's.
* A simulation (Flower's Simulation Engine, ``flwr run .`` on the local SuperLink) has one simulated
  SuperNode per user (partition ``i``: the ``i``-th user of ``data.*``, :mod:`fedpersona.simulations.partitions`).
  Its size is Flower's federation setting, not the app's (Flower 1.41 keeps it out of
  ``pyproject.toml``; the local default is 2 SuperNodes, below secure aggregation's minimum), so the
  run fails at once, before any round, when the number of SuperNodes is not the number of users,
  naming the number it needs and the command that gives it
  (``flwr run . --federation-config "num-supernodes=N"``).
* A run in which no round was applied (no device trained, or every secure sum aborted) raises at the
  end, after its outputs are written: Flower reports it ``finished:failed``, not ``completed``.

In a deployment (a Grid to real SuperNodes) the first check is not made: devices join over time.
"""

from __future__ import annotations

import logging
import time
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpersona.config import Config, load_config
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.server.federation import run_federation
from fedpersona.server.grid import FastPollGrid
from fedpersona.server.secagg import build_aggregator
from fedpersona.simulations.flower_runs import flower_run_config
from fedpersona.simulations.partitions import ensure_partitions
from fedpersona.simulations.runner import check_sum_cohort

logger = logging.getLogger(__name__)

#: How long a simulation's SuperNodes may take to register before the ServerApp counts them.
SETTLE_SECONDS = 3.0
SETTLE_TIMEOUT = 120.0


class NothingTrained(RuntimeError):
    """No round of the run was applied: the shared adapter never changed."""


def is_simulation(grid) -> bool:
    """Whether ``grid`` is the Simulation Engine's (all SuperNodes are simulated, registered at the start)."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - another Flower layout
        return type(grid).__name__ == "InMemoryGrid"
    return isinstance(grid, InMemoryGrid)


def settled_nodes(grid, *, settle: float = SETTLE_SECONDS, timeout: float = SETTLE_TIMEOUT) -> list[int]:
    """The simulation's SuperNodes once their number has stopped changing for ``settle`` seconds."""
    start = time.monotonic()
    nodes, since = sorted(grid.get_node_ids()), time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(0.5)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, since = now, time.monotonic()
        elif nodes and time.monotonic() - since >= settle:
            break
    return nodes


def federation_error(cfg: Config, nodes: int, users: int) -> str | None:
    """Why a simulation of ``nodes`` SuperNodes cannot run ``users`` users (one SuperNode each), or None."""
    if nodes == users:
        return None
    secagg = (f"; secure aggregation needs at least secagg.min-contributors = {cfg.secagg.min_contributors} devices "
              "in every sum" if cfg.secagg.enabled and nodes < cfg.secagg.min_contributors else "")
    fewer = (f" (or run fewer users: --run-config \"data.max-users={nodes}\")"
             if users > nodes >= max(cfg.server.clients_per_round, cfg.secagg.min_contributors if cfg.secagg.enabled
                                     else 1) else "")
    return (f"this simulation has {nodes} SuperNode(s), and the run's data ({cfg.data.source}, after the data.* "
            f"filters) has {users} users, one SuperNode each{secagg}. Start it with as many: "
            f"flwr run . --federation-config \"num-supernodes={users}\"{fewer}")


def check_trained(metrics: dict) -> None:
    """Raise :class:`NothingTrained` when no round of the run was applied."""
    rounds = metrics.get("rounds", [])
    if rounds and not any(r.get("applied") for r in rounds):
        reasons = sorted({str(r["aborted"]) for r in rounds if r.get("aborted")})
        raise NothingTrained(
            f"run '{metrics.get('run')}' trained nothing: no round of {len(rounds)} was applied "
            f"(trained {sum(int(r.get('contributors', 0)) for r in rounds)} in all)"
            + (f"; secure aggregation aborted: {reasons[0]}" if reasons else "")
        )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    flat = flower_run_config(context.run_config, context.run_id)
    cfg = load_config(flat)
    secagg_params(cfg)  # the protocol's own check of secagg.* (ValueError naming the key), before any round
    log(INFO, "fedpersona: run '%s' (Flower run %s): results in %s, device state in %s", cfg.run.name,
        context.run_id, Path(cfg.run.results_dir) / cfg.run.name, Path(cfg.run.state_dir) / cfg.run.name)
    if is_simulation(grid):
        users = ensure_partitions(cfg)  # the simulated users' data folders, before any node reads them
        nodes = settled_nodes(grid)
        problem = federation_error(cfg, len(nodes), users)
        if problem:
            raise ValueError(f"fedpersona: {problem}")
        check_sum_cohort(cfg, users, None)  # the simulated devices hold the default floors
    grid = FastPollGrid(grid)  # replies are picked up within 0.2 s, not Flower's 3 s (server/grid.py)
    metrics = run_federation(grid, cfg, aggregator=build_aggregator(cfg, run_id=context.run_id))
    check_trained(metrics)
