"""The device's own failure log: one JSON line per request it failed, in its state folder.

A ClientApp mod (:func:`failure_mod`) sees every reply: when the handler answers with an error,
or raises, it appends to ``<state_dir>/failures.jsonl``::

    {"v": 1, "time": "2026-12-01T08:00:00.123+00:00", "run_id": ..., "node_id": ...,
     "message_type": "train", "round": 2, "error": "StateError"}

Only the error *class* is kept, never the error text (which could quote the user's data), and
the file sits beside the encrypted state in plain JSON, so that it stays readable when the
state itself is what failed (a tampered or rolled-back store). On a simulated device the runner
reads these files on this machine to list the failed users (:mod:`fedpersona.simulations.runner`); on a
real device they are its owner's log.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpersona.client.node_data import context_state_dir, read_jsonl
from fedpersona.wire import group_round

logger = logging.getLogger(__name__)

FAILURES_FILE = "failures.jsonl"
VERSION = 1
_CLASS = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*:")


def error_class(reason: str) -> str:
    """The error class a reply's reason starts with (``"StateError: ..."`` -> ``"StateError"``)."""
    m = _CLASS.match(str(reason))
    return m.group(1) if m else "Error"


def record_failure(state_dir: str | os.PathLike, *, run_id: int, node_id: int, message_type: str,
                   server_round: int | None, error: str) -> Path:
    """Append one failure line (a single ``write`` on an ``O_APPEND`` file)."""
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FAILURES_FILE
    entry = {"v": VERSION, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
             "run_id": int(run_id), "node_id": int(node_id), "message_type": str(message_type),
             "round": server_round, "error": str(error)}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)
    return path


def read_failures(state_dir: str | os.PathLike, *, since: datetime | None = None) -> list[dict]:
    """The device's failure lines (``[]`` if none), those at or after ``since`` when given."""
    def keep(entry: dict) -> bool:
        when = datetime.fromisoformat(entry["time"])
        return since is None or when >= since

    return read_jsonl(Path(state_dir) / FAILURES_FILE, keep=keep)


def _state_dir(context: Context) -> Path:
    return context_state_dir(context.run_id, context.node_id, context.run_config, context.node_config)


def _note(message: Message, context: Context, error: str) -> None:
    group = message.metadata.group_id
    try:
        record_failure(_state_dir(context), run_id=context.run_id, node_id=context.node_id,
                       message_type=message.metadata.message_type,
                       server_round=group_round(group), error=error)
    except Exception as exc:  # the log must never hide the failure itself
        logger.error("node %s: could not record its failure (%s): %s: %s", context.node_id, error,
                     type(exc).__name__, exc)


def failure_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: record each error reply (or exception) of this device in its failure log."""
    try:
        reply = call_next(message, context)
    except Exception as exc:
        _note(message, context, type(exc).__name__)
        raise
    if reply.has_error():
        _note(message, context, error_class(reply.error.reason))
    return reply
