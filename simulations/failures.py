"""Which simulated users failed, read from their devices' own failure logs on this machine.

Each device appends its failed requests (error class, message type, round; never the error
text) to ``failures.jsonl`` in its state folder (:mod:`fedpersona.client.failures`). After a simulation
the runner reads those of this run (written since it started) and adds every failed user to
``users.csv``, ``metrics.json`` (``final.users`` rows with ``status = failed`` and ``error``,
plus ``failed_users``) and ``summary.txt``; ``fedpersona run`` then exits non-zero unless
``--allow-failures``. Failures the server counted that no device logged (a device that never
answered) are counted too (``failure_count``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.client.failures import read_failures
from fedpersona.config import Config

logger = logging.getLogger(__name__)


def device_failures(cfg: Config, user_ids: list[str], *, since: datetime) -> dict[str, list[dict]]:
    """``{user: [failure entries of this run]}`` for the simulated users that logged any."""
    out = {}
    for user in user_ids:
        entries = read_failures(simulated_state_dir(cfg, user), since=since)
        if entries:
            out[user] = entries
    return out


def _describe(entries: list[dict]) -> str:
    parts = []
    for e in entries:
        where = e.get("message_type", "?") + (f" round {e['round']}" if e.get("round") is not None else "")
        text = f"{e.get('error', 'Error')} ({where})"
        if text not in parts:
            parts.append(text)
    return "; ".join(parts)


def mark_failed(metrics: dict, failed: dict[str, list[dict]], *, after_round: int = 0) -> int:
    """Record the failed users in ``metrics``; returns the number of failures (server's and devices' counts).

    ``after_round``: rounds up to it ran in an earlier invocation (a resumed run) and are not counted again.
    """
    server_count = sum(int(r.get("failed", 0)) for r in metrics.get("rounds", []) if int(r["round"]) > after_round)
    server_count += len(metrics.get("final", {}).get("failures", []))
    metrics["failed_users"] = {u: _describe(e) for u, e in sorted(failed.items())}
    final = metrics.get("final")
    if final is not None:
        rows = {u["user"]: u for u in final.get("users", [])}
        for user in rows.values():
            user.setdefault("status", "ok")
        for user, entries in failed.items():
            row = rows.setdefault(user, {"user": user})
            row["status"] = "failed"
            row["error"] = _describe(entries)
        final["users"] = sorted(rows.values(), key=lambda u: u["user"])
    count = max(server_count, sum(len(e) for e in failed.values()))
    metrics["failure_count"] = count
    return count


def rewrite_outputs(cfg: Config, metrics: dict) -> None:
    """metrics.json, users.csv and summary.txt again, with the failed users in them."""
    from fedpersona.server.run_report import summarize_users, summary_table, write_outputs

    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    final = metrics.get("final")
    if final is not None:
        if not final.get("summary"):  # the secure sum's summary stands; failed devices are in no sum
            final["summary"] = summarize_users(final["users"])  # rows without a figure are left out of it
    write_outputs(run_dir, {k: v for k, v in metrics.items() if k != "wall_seconds"})
    if final is not None:
        (run_dir / "summary.txt").write_text(summary_table(final["users"], final["summary"]) + "\n")
