"""The console script in a subprocess, as a user runs it (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def set_args(flat: dict) -> list[str]:
    """``--set key=value`` for every key of ``flat`` (strings JSON-quoted, as TOML reads them)."""
    return [a for k, v in flat.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}")]


def run_cli(args: list[str], cwd: Path, *, flat: dict | None = None, stdin: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``fedpersona ARGS [--set k=v ...]`` in a subprocess (one CPU thread, no telemetry, no dependency install)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("FEDPERSONA_RUN_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "fedpersona.cli", *args, *set_args(flat or {})], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)
