"""Where a run started by Flower's own runner (``flwr run``) writes, and what it checks first.

``flwr run .`` starts the pyproject components (:mod:`fedpersona.simulations.serverapp`,
:mod:`fedpersona.simulations.clientapp`) in processes of the SuperLink it launched, whose working folder is
wherever that SuperLink was started: relative ``run.results-dir`` / ``run.state-dir`` would land in
the project folder (and in the next app bundle ``flwr run`` builds from it). So under Flower's
runtime a relative folder is taken relative to the run's own folder,
``$FLWR_HOME/fedpersona-runs/<Flower run id>/`` (``FLWR_HOME`` defaults to ``~/.flwr``); an absolute
one is used as it is. The ServerApp and every ClientApp of a run resolve it alike, from the run id
in their context. ``fedpersona run`` does not go through here: its folders are relative to the
current folder, as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUNS_DIR = "fedpersona-runs"
DIR_KEYS = ("run.results-dir", "run.state-dir")
DEFAULTS = {"run.results-dir": "results", "run.state-dir": "state"}


def flwr_home() -> Path:
    """Flower's home folder: ``$FLWR_HOME``, else ``~/.flwr`` (as Flower's own ``get_flwr_home``)."""
    home = os.environ.get("FLWR_HOME")
    return Path(home) if home else Path.home() / ".flwr"


def run_folder(run_id: int) -> Path:
    """``$FLWR_HOME/fedpersona-runs/<run id>``: the outputs of one ``flwr run``."""
    return flwr_home() / RUNS_DIR / str(int(run_id))


def flower_run_config(run_config: Mapping[str, Any], run_id: int) -> dict[str, Any]:
    """``run_config`` with ``run.results-dir`` and ``run.state-dir`` absolute: relative ones under :func:`run_folder`."""
    flat = dict(run_config)
    for key in DIR_KEYS:
        value = Path(str(flat.get(key, DEFAULTS[key]))).expanduser()
        flat[key] = str(value if value.is_absolute() else run_folder(run_id) / value)
    return flat
