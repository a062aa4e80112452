"""The server's half of the devices' freshness anchor: it keeps each node's latest receipt and sends it back.

A device attaches a freshness receipt to every reply (:mod:`fedpersona.receipts`): its newest
commit, encrypted and authenticated under its own key, opaque to the server. :class:`FreshnessGrid`
wraps any Grid: it takes the receipt out of each reply (the round loop and the aggregators never
see it), keeps the latest one per node, and adds it to every later message to that node, which
refuses to go on from a state older than that (:mod:`fedpersona.client.freshness`). The receipts are kept in
``<run dir>/freshness_receipts.json`` (written atomically after each exchange that changed one),
so a server that restarts and resumes the run still holds them.

What it cannot do: a server that withholds a receipt (or sends an older one) leaves the device
only its own local anchor; a receipt only helps within the run whose folder keeps it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict

from fedpersona.receipts import MAX_RECEIPT_BYTES, put_receipt, take_receipt

__all__ = ["RECEIPTS_FILE", "FreshnessGrid"]

logger = logging.getLogger(__name__)

RECEIPTS_FILE = "freshness_receipts.json"
VERSION = 1


class FreshnessGrid:
    """Wraps a Grid: every outgoing message carries its node's latest freshness receipt; replies hand in new ones."""

    def __init__(self, grid: Any, run_dir: str | os.PathLike | None) -> None:
        self._grid = grid
        self.path = Path(run_dir) / RECEIPTS_FILE if run_dir is not None else None
        self.receipts: dict[int, bytes] = self._read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # ------------------------------------------------------------------ persistence
    def _read(self) -> dict[int, bytes]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            out = {int(n): bytes.fromhex(r) for n, r in doc["receipts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("%s is unreadable (%s): starting without the devices' freshness receipts", self.path, exc)
            return {}
        return {n: r for n, r in out.items() if 0 < len(r) <= MAX_RECEIPT_BYTES}

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": VERSION, "receipts": {str(n): r.hex() for n, r in sorted(self.receipts.items())}}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ messages
    def _attach(self, message: Message) -> Message:
        receipt = self.receipts.get(int(message.metadata.dst_node_id))
        if receipt is not None and message.has_content():
            # Messages of one stage often share one content object: each gets its own, with its node's receipt.
            content = RecordDict(dict(message.content.items()))
            put_receipt(content, receipt)
            message.content = content
        return message

    def _collect(self, replies: list[Message]) -> None:
        changed = False
        for reply in replies:
            if not reply.has_content():
                continue
            receipt = take_receipt(reply.content)
            node = int(reply.metadata.src_node_id)
            if receipt is not None and self.receipts.get(node) != receipt:
                self.receipts[node] = receipt
                changed = True
        if changed:
            self._write()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = [self._attach(m) for m in messages]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._collect(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages([self._attach(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._collect(replies)
        return replies
