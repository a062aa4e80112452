"""Progress events of a run, for whoever shows them: ``progress.event(kind, **fields)``.

The round loop (:func:`fedpersona.server.federation.run_federation`) reports what happens to an object
passed in; it does not know how (or whether) it is shown. A console script hands it a live
display (``simulations/progress.py``); ``flwr run`` and deployments get :class:`NoProgress`
and the log lines the loop writes anyway. Any Grid works: the message stages are seen by
:class:`ProgressGrid`, which wraps the Grid the loop was given.

Events and their fields (more may be added; a receiver ignores what it does not know):

* ``run-start``: ``run``, ``rounds``, ``start-round`` (rounds already done, when resuming),
  ``nodes``, ``cohort``, ``aggregation``, ``dp`` (bool), ``shared-params``, ``final-eval`` and
  ``local-baseline`` (bool: ``eval.final``, ``eval.local-baseline``), ``sum-steps`` (the noisy sums of a
  round with ``privacy.noise-on = sum``, ``client.local-steps``; 0 otherwise);
* ``round-start``: ``round``, ``rounds``, ``cohort``;
* ``stage`` / ``stage-end``: ``round``, ``stage`` (``advertise``, ``train``, ``consistency``, ``unmask``,
  ``evaluate`` or the message type), ``nodes``; ``stage-end`` adds ``replies``, ``errors``,
  ``seconds``;
* ``reply``: ``round``, ``stage``, ``nodes``, ``done`` (replies so far), ``failed`` (error replies so
  far), ``seconds`` (since the stage started): one per reply as it arrives, from a Grid whose
  ``send_and_receive`` takes an ``on_reply`` callback (the in-process grids,
  :class:`fedpersona.server.grid.FastPollGrid`); from any other Grid, all of them when the stage ends;
* ``round-end``: ``round``, ``rounds``, ``cohort``, ``trained``, ``declined``, ``failed``,
  ``applied``, ``seconds``, and when known ``shared-loss``, ``personal-loss``, ``train-loss``,
  ``epsilon``, ``aborted``;
* ``heads-start``: ``nodes``; ``heads-end``: ``nodes``, ``personalized``, ``failed``, ``seconds`` (the heads trained
  after the last round, ``client.head-at = end``);
* ``eval-start``: ``nodes``; ``eval-end``: ``users``, ``failed``, ``seconds``, ``summary``
  (mean losses by model);
* ``run-end``: ``seconds``, ``rounds`` (rows of this run).

Callers before the loop (a simulation runner) may send ``prepare`` (``done``, ``total``, ``what``)
and ``prepare-end`` (``users``, ``source``, ``seconds``, and when known ``users-in-source`` and
``lines``: what the data filters dropped and how many replies ``model.seq-len`` cuts) to the same object.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from flwr.app import Message

from fedpersona.wire import group_round

logger = logging.getLogger(__name__)

#: Message types -> the stage names of progress events.
STAGES = {"query.advertise": "advertise", "train": "train", "query.consistency": "consistency", "query.unmask": "unmask",
          "evaluate": "evaluate", "train.dp_step": "noisy-sum step", "train.personalize": "personalize"}


class Progress(Protocol):
    def event(self, kind: str, **fields: Any) -> None:
        """One thing that happened; must not raise and must return quickly."""


class NoProgress:
    """Shows nothing (the round loop's own log lines remain)."""

    def event(self, kind: str, **fields: Any) -> None:
        pass


def report(progress: Progress, kind: str, **fields: Any) -> None:
    """``progress.event(...)``; a failing display is logged, never allowed to stop the run."""
    try:
        progress.event(kind, **fields)
    except Exception:  # noqa: BLE001 - a display bug must not cost a federated round
        logger.exception("progress display failed on event %r", kind)


def _streams_replies(grid: Any) -> bool:
    """Whether ``grid.send_and_receive`` hands each reply to an ``on_reply`` callback as it arrives."""
    try:
        return "on_reply" in inspect.signature(grid.send_and_receive).parameters
    except (TypeError, ValueError):
        return False


class ProgressGrid:
    """Wraps any Grid: reports ``stage`` / ``stage-end`` around each ``send_and_receive``, and a ``reply``
    for each reply (as it arrives where the Grid's ``send_and_receive`` takes ``on_reply``)."""

    def __init__(self, grid: Any, progress: Progress) -> None:
        self._grid = grid
        self._progress = progress

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return self._grid.send_and_receive(messages, timeout=timeout)
        meta = messages[0].metadata
        stage = STAGES.get(meta.message_type, meta.message_type)
        server_round = group_round(meta.group_id) or 0
        report(self._progress, "stage", round=server_round, stage=stage, nodes=len(messages))
        t0 = time.perf_counter()
        seen = [0, 0]

        def on_reply(reply: Message) -> None:
            seen[0] += 1
            seen[1] += int(reply.has_error())
            report(self._progress, "reply", round=server_round, stage=stage, nodes=len(messages), done=seen[0],
                   failed=seen[1], seconds=time.perf_counter() - t0)

        if _streams_replies(self._grid):
            replies = list(self._grid.send_and_receive(messages, timeout=timeout, on_reply=on_reply))
        else:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            for reply in replies:
                on_reply(reply)
        errors = sum(1 for r in replies if r.has_error())
        report(self._progress, "stage-end", round=server_round, stage=stage, nodes=len(messages),
               replies=len(replies), errors=errors, seconds=time.perf_counter() - t0)
        return replies
