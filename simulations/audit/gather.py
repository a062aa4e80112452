"""``fedpersona audit``: gather a run's files (the devices' state folders and the run folder) for the report.

The devices' files are read by :mod:`fedpersona.client.audit_records`, the server's by
:mod:`fedpersona.server.audit_records`; :func:`fedpersona.privacy.audit.report.build_audit` checks them and
:func:`fedpersona.privacy.audit.render.write_report` writes the report. A device auditing itself passes its
state folder alone (``device_dir``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedpersona.client.audit_records import is_device_dir, read_device_records
from fedpersona.client.node_data import slug
from fedpersona.privacy.audit import report
from fedpersona.server.audit_records import read_run_records

logger = logging.getLogger(__name__)

__all__ = ["build_audit", "device_folders"]


def device_folders(metrics: dict, state_dir: str | Path | None) -> list[Path]:
    """Every device state folder of a run: under ``state_dir`` (or its ``<run.name>`` child), or the run's own."""
    config = metrics.get("config", {})
    root = Path(state_dir) if state_dir is not None else Path(config.get("run.state-dir", "state")) / str(metrics.get("run", ""))
    if state_dir is not None and not any(is_device_dir(p) for p in root.iterdir() if root.is_dir()):
        root = root / str(metrics.get("run", ""))  # --state-dir may name the parent of the run's folders
    dirs = sorted(p for p in root.iterdir() if is_device_dir(p)) if root.is_dir() else []
    if not dirs:
        logger.warning("no device state folders under %s: ledgers and inventories are not audited", root)
    return dirs


def build_audit(run_dir: str | Path | None = None, *, state_dir: str | Path | None = None,
                device_dir: str | Path | None = None, delta: float | None = None,
                target_epsilon: float | None = None) -> dict:
    """Gather ledgers, inventories, the server's view and the empirical results; check them."""
    if run_dir is None and device_dir is None:
        raise ValueError("give a run folder, or --device with a device's state folder")
    run = read_run_records(run_dir) if run_dir is not None else None
    metrics = run.metrics if run is not None else {}
    if device_dir is not None:
        dirs = [Path(device_dir)]
        if not dirs[0].is_dir():
            raise ValueError(f"--device {device_dir}: not a folder")
    else:
        dirs = device_folders(metrics, state_dir)
    labels = {slug(u["user"]): u["user"] for u in metrics.get("final", {}).get("users", [])}
    devices = [read_device_records(d, label=labels.get(d.name)) for d in dirs]
    return report.build_audit(devices, run, device_scope=device_dir is not None, delta=delta,
                              target_epsilon=target_epsilon)
