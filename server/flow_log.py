"""What the server saw, per round: ``<run dir>/server_inventory.jsonl`` (the server's half of the data-flow inventory).

One JSON line per round (``"stage": "train"``) and one for the final evaluation
(``"stage": "evaluate"``). A line lists what the aggregation handed the server (the
cohort's summed update: names, shapes and a digest; the summed weight and metrics; counts)
and whether the server also saw each client's individual update (plain aggregation) or only
the sum (secure aggregation). A resumed run appends again; readers keep the last line per
round. The devices' half is :mod:`fedpersona.client.flow_log`.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

SERVER_INVENTORY_FILE = "server_inventory.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _tensor_row(name: str, t: torch.Tensor) -> dict:
    arr = np.ascontiguousarray(t.detach().cpu().numpy())
    return {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest()[:16]}


class ServerInventory:
    """Appends the server's view of each round to ``<run_dir>/server_inventory.jsonl``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / SERVER_INVENTORY_FILE

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry, sort_keys=True, allow_nan=False) + "\n")

    def round(self, server_round: int, *, cohort: list[int], rs, aggregation: str) -> dict:
        """Record a round from the aggregation's :class:`~fedpersona.server.aggregation.RoundSum`."""
        failures = list(getattr(rs, "failures", []))
        entry = {
            "stage": "train",
            "time": _now(),
            "round": int(server_round),
            "aggregation": aggregation,
            "individual_updates_visible": aggregation == "plain",
            "cohort": len(cohort),
            "contributors": int(rs.contributors),
            "declined": len(getattr(rs, "declined", [])),
            "error_replies": sum(1 for f in failures if f.startswith("node ")),
            "failures": failures,
            "weight_sum": _finite(rs.weight),
            "metric_sums": {k: _finite(v) for k, v in sorted(rs.metrics.items())},
            "update_sum": [_tensor_row(n, t) for n, t in sorted(rs.update_sum.items())],
        }
        self._append(entry)
        return entry

    def evaluation(self, final: dict, *, server_round: int, aggregation: str = "secagg+") -> dict:
        """Record the final evaluation: the totals of the devices' figures (no user label, no per-user row)."""
        entry = {
            "stage": "evaluate",
            "time": _now(),
            "round": int(server_round),
            "aggregation": aggregation,
            "replies": int(final.get("devices", 0)),
            "error_replies": sum(1 for f in final.get("failures", []) if f.startswith("node ")),
            "per_client_metrics_visible": aggregation == "plain",
            "user_labels_visible": False,
            "aborted": bool(final.get("aborted")),
            "metric_names": sorted(final.get("summary", {})),
        }
        self._append(entry)
        return entry


def read_server_inventory(run_dir: str | Path) -> list[dict]:
    """The server inventory lines, keeping the last line per (stage, round) (a resumed run appends)."""
    path = Path(run_dir) / SERVER_INVENTORY_FILE
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            latest[(e.get("stage", "train"), int(e.get("round", 0)))] = e
    return [latest[k] for k in sorted(latest, key=lambda k: (k[1], k[0] != "train"))]
