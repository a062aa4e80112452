"""The per-user table of a simulation, read from the simulated devices' own stores on this machine.

No per-user row reaches the server (:func:`fedpersona.server.federation.final_evaluation` gets only the secure
sum of the devices' figures). In a simulation every device's state folder is on this machine, and
each device keeps its own evaluation row in its encrypted store (``evaluation``, written by
:meth:`fedpersona.client.device.Device.final_evaluation`); this module reads those rows and writes them as
``metrics.json`` ``final.users``, ``users.csv``, ``users.png`` and the table in ``summary.txt``.
It never runs in a deployment: there the devices' stores are on the devices.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedpersona.client.device import EVALUATION
from fedpersona.client.store import DeviceStore, StateError
from fedpersona.server.run_report import summary_table, write_outputs

__all__ = ["attach_user_table", "read_user_rows"]

logger = logging.getLogger(__name__)


def read_user_rows(state_dirs: Mapping[str, Path] | Iterable[Path]) -> list[dict]:
    """The evaluation row each device wrote into its own store (devices without one are left out, with a warning)."""
    dirs = list(state_dirs.values()) if isinstance(state_dirs, Mapping) else list(state_dirs)
    rows = []
    for d in dirs:
        try:
            text = DeviceStore(d).load_text(EVALUATION) if Path(d).is_dir() else None
        except StateError as exc:
            logger.warning("device state %s unreadable (%s): no evaluation row", d, type(exc).__name__)
            continue
        if text is None:
            logger.warning("device state %s holds no evaluation row", d)
            continue
        row = json.loads(text)
        row.pop("run_id", None)
        rows.append({k: v for k, v in row.items() if v is not None})
    return sorted(rows, key=lambda r: r["user"])


def attach_user_table(run_dir: Path, metrics: dict, state_dirs: Mapping[str, Path] | Iterable[Path]) -> dict:
    """Fill ``metrics["final"]["users"]`` from the devices' stores and rewrite the run's outputs."""
    final = metrics.get("final")
    if not final:
        return metrics
    final["users"] = read_user_rows(state_dirs)
    final["users-source"] = "the simulated devices' own stores (never a message)"
    write_outputs(run_dir, metrics)
    (run_dir / "summary.txt").write_text(summary_table(final["users"], final["summary"]) + "\n")
    return metrics
