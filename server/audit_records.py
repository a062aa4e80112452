"""What a run folder holds for the privacy audit, as :class:`fedpersona.privacy.audit.report.RunRecords`.

Read-only: ``metrics.json`` (config, rounds, final evaluation), ``server_inventory.jsonl`` (what
the server saw, :mod:`fedpersona.server.flow_log`), ``checkpoints/`` (which rounds were released) and
``audit/empirical.json`` (the attacks of ``fedpersona audit-run``, :mod:`fedpersona.privacy.audit.empirical`).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpersona.privacy.audit.empirical import read_empirical
from fedpersona.privacy.audit.report import RunRecords
from fedpersona.server.flow_log import read_server_inventory

__all__ = ["read_run_records", "released_rounds"]


def released_rounds(run_dir: Path) -> list[int]:
    """Rounds of the complete checkpoints under ``<run>/checkpoints`` (a folder without ``round.json`` is not one)."""
    root = run_dir / "checkpoints"
    rounds = []
    if root.is_dir():
        for d in root.glob("round-*"):
            if (d / "round.json").is_file():
                try:
                    rounds.append(int(d.name.split("-")[1]))
                except ValueError:
                    pass
    return sorted(rounds)


def read_run_records(run_dir: str | Path) -> RunRecords:
    run_path = Path(run_dir)
    if not (run_path / "metrics.json").is_file():
        raise ValueError(f"{run_path} is not a run folder: no metrics.json in it")
    metrics = json.loads((run_path / "metrics.json").read_text())
    return RunRecords(run_dir=str(run_path), metrics=metrics, server_inventory=read_server_inventory(run_path),
                      checkpoints=released_rounds(run_path), empirical=read_empirical(run_path))
