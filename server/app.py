"""The fedpersona ServerApp (Flower Message API): thin; the loop is in :mod:`fedpersona.server.federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpersona.config import load_config
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.server.federation import run_federation
from fedpersona.server.grid import FastPollGrid
from fedpersona.server.progress import Progress
from fedpersona.server.secagg import build_aggregator


def make_app(progress: Progress | None = None) -> ServerApp:
    """A ServerApp whose round loop reports to ``progress`` (:mod:`fedpersona.server.progress`; default: nothing)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = load_config(context.run_config)
        secagg_params(cfg)  # the protocol's own check of secagg.* (ValueError naming the key), before any round
        # SecAgg+ unless secagg.enabled = false (plain aggregation, with warnings in the log and metrics.json)
        grid = FastPollGrid(grid)  # replies are picked up within 0.2 s, not Flower's 3 s (server/grid.py)
        run_federation(grid, cfg, aggregator=build_aggregator(cfg, run_id=context.run_id), progress=progress)

    return server_app


app = make_app()
