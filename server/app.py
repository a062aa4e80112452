"""The fedpersona ServerApp (Flower Message API): thin; the loop is in :mod:`server.federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpersona.config import load_config
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(context.run_config)
    run_federation(grid, cfg)
