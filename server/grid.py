"""A Grid whose ``send_and_receive`` polls for replies every 0.2 s instead of Flower's 3 s.

Flower 1.41's deployment Grid (``flwr.superlink.grid.http_grid``) sleeps 3 s between pulls while it
waits for replies, so every message stage of a round ends up to 3 s after the last reply arrived; a
SecAgg+ round has four stages (advertise, masked input, consistency check, unmask). This wrapper does what Flower's
``send_and_receive`` does (push, then pull until every reply is in or the timeout passes) with a short
interval; everything else goes to the wrapped Grid unchanged. In simulation the in-memory Grid
already polls every 0.1 s, so it changes nothing there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message

from fedpersona.flower_patches import shorten_pull_backoff

POLL_INTERVAL = 0.2


class FastPollGrid:
    """Wraps a Flower ``Grid``; only ``send_and_receive`` differs (its polling interval).

    For the deployment Grid it also shortens the backoff with which replies' objects are pulled
    (:func:`fedpersona.flower_patches.shorten_pull_backoff` on the Grid's module).
    """

    def __init__(self, grid: Any, *, interval: float = POLL_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive. You passed: {interval!r}")
        self._grid = grid
        self.interval = interval
        module = sys.modules.get(type(grid).__module__)
        if module is not None and module.__name__.startswith("flwr."):
            shorten_pull_backoff(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         on_reply: Callable[[Message], None] | None = None) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            if on_reply is not None:
                for reply in got:
                    on_reply(reply)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
