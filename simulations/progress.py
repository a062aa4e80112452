"""What a person running ``fedpersona run`` sees while it runs: the events of :mod:`server.progress`.

* On a terminal, :class:`LiveDisplay` (rich): bars for the preparation of the users (prepared /
  total, ETA) and for the rounds (done / total, ETA), and a status line for the round in flight
  (its cohort and secure-aggregation stage: key advertisement, masked input, consistency check, unmasking) or the
  final evaluation; each finished step also stays printed above the bars as one line.
* Anywhere else (a pipe, a file, CI), :class:`LineDisplay`: one plain line per finished step
  (preparation, run start, each round, final evaluation), no ANSI codes, nothing redrawn.

Both write to stdout; logs and warnings go to stderr (:mod:`fedpersona.output`).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, TextIO

STAGE_TEXT = {"advertise": "key advertisement", "train": "training + masked input", "consistency": "consistency check",
              "unmask": "unmasking",
              "evaluate": "evaluation"}
MODEL_TEXT = {"base": "base", "shared": "shared", "personal": "personalized", "local": "local-only"}


def _seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Lines:
    """Turns events into the one-line texts of finished steps (shared by both displays)."""

    def __init__(self) -> None:
        self.rounds_total = 0
        self.start_round = 0
        self.round_seconds: list[float] = []
        self.stages: dict[str, float] = {}
        self.aggregation = ""

    def eta(self, done_round: int) -> float | None:
        if not self.round_seconds:
            return None
        # The first round also prepares the devices it samples; later rounds are the better estimate.
        recent = self.round_seconds[1:] or self.round_seconds
        return sum(recent) / len(recent) * max(0, self.rounds_total - done_round)

    def text(self, kind: str, f: dict[str, Any]) -> str | None:
        if kind == "prepare-end":
            return f"prepared {f['users']} users from {f['source']} in {f['seconds']:.1f} s"
        if kind == "run-start":
            self.rounds_total, self.start_round = int(f["rounds"]), int(f.get("start-round", 0))
            self.aggregation = str(f.get("aggregation", ""))
            resumed = f", resuming after round {self.start_round}" if self.start_round else ""
            return (f"run '{f['run']}': {f['nodes']} users, {f['cohort']} per round, {f['rounds']} rounds, "
                    f"DP-SGD {'on' if f.get('dp') else 'OFF'}, aggregation {self.aggregation}{resumed}")
        if kind == "round-start":
            self.stages = {}
            return None
        if kind == "stage-end" and f.get("stage") != "evaluate":
            self.stages[str(f["stage"])] = self.stages.get(str(f["stage"]), 0.0) + float(f["seconds"])
            return None
        if kind == "round-end":
            self.round_seconds.append(float(f["seconds"]))
            parts = [f"round {f['round']}/{f['rounds']}",
                     f"cohort {f['cohort']}: trained {f['trained']}, declined {f['declined']}, failed {f['failed']}"]
            if f.get("aborted"):
                parts.append(f"secure aggregation aborted: {f['aborted']}")
            elif not f.get("applied"):
                parts.append("shared adapter unchanged")
            if self.stages and self.aggregation != "plain":
                parts.append("stages " + ", ".join(f"{STAGE_TEXT.get(k, k)} {v:.1f} s" for k, v in self.stages.items()))
            if "shared-loss" in f:
                parts.append(f"held-out loss shared {f['shared-loss']:.3f}, personalized {f['personal-loss']:.3f}")
            if "epsilon" in f and f["epsilon"] >= 0:
                parts.append(f"mean epsilon {f['epsilon']:.2f}")
            eta = self.eta(int(f["round"]))
            parts.append(f"{f['seconds']:.1f} s" + (f", ETA {_seconds(eta)}" if eta else ""))
            return " | ".join(parts)
        if kind == "eval-end":
            means = ", ".join(f"{MODEL_TEXT.get(k, k)} {v:.3f}" for k, v in f.get("summary", {}).items()
                              if isinstance(v, float) and math.isfinite(v))
            failed = f", {f['failed']} failed" if f.get("failed") else ""
            return (f"final evaluation: {f['users']} users{failed} in {f['seconds']:.1f} s"
                    + (f" | mean held-out loss {means}" if means else ""))
        return None


class LineDisplay:
    """One plain line per finished step, flushed at once (for pipes, files and CI logs)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.lines = Lines()
        self._lock = threading.Lock()

    def __enter__(self) -> "LineDisplay":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def event(self, kind: str, **fields: Any) -> None:
        text = self.lines.text(kind, fields)
        if text is not None:
            with self._lock:
                stream = self.stream or sys.stdout
                stream.write(text + "\n")
                stream.flush()


class LiveDisplay:
    """Bars and a status line redrawn in place on a terminal (rich); finished steps printed above them."""

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console or Console()
        self.lines = Lines()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False, redirect_stdout=True, redirect_stderr=True,
        )
        self._tasks: dict[str, Any] = {}
        self._status = None
        self._round = 0

    def __enter__(self) -> "LiveDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self.progress.remove_task(self._status)
            self._status = None
        self.progress.stop()

    def _task(self, name: str, description: str, total: float | None, completed: float = 0) -> Any:
        if name not in self._tasks:
            self._tasks[name] = self.progress.add_task(description, total=total, completed=completed)
        return self._tasks[name]

    def _say(self, text: str) -> None:
        if self._status is None:
            self._status = self.progress.add_task(text, total=None)
        else:  # a new stage: its own elapsed time
            self.progress.reset(self._status, total=None, description=text)

    def event(self, kind: str, **f: Any) -> None:
        text = self.lines.text(kind, f)
        if text is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        if kind == "prepare":
            task = self._task("prepare", f"preparing {f.get('what', 'users')}", f["total"])
            self.progress.update(task, completed=f["done"], total=f["total"])
        elif kind == "run-start":
            self._task("rounds", "rounds", f["rounds"], completed=f.get("start-round", 0))
        elif kind == "round-start":
            self._round = int(f["round"])
            self._say(f"round {f['round']}/{f['rounds']}: cohort of {f['cohort']}")
        elif kind == "stage":
            what = STAGE_TEXT.get(str(f["stage"]), str(f["stage"]))
            where = "final evaluation" if f["stage"] == "evaluate" else f"round {self._round}"
            self._say(f"{where}: {what} ({f['nodes']} nodes)")
        elif kind == "round-end":
            self.progress.update(self._task("rounds", "rounds", f["rounds"]), completed=f["round"])
        elif kind == "eval-start":
            self._say(f"final evaluation on {f['nodes']} nodes")
        elif kind == "eval-end":
            self._say("final evaluation done")


def make_display(*, quiet: bool = False, stream: TextIO | None = None):
    """``None`` when quiet; a :class:`LiveDisplay` on a terminal; else a :class:`LineDisplay`."""
    if quiet:
        return None
    out = stream or sys.stdout
    if out.isatty():
        return LiveDisplay()
    return LineDisplay(stream)


def timed_prepare(progress, what: str = "users"):
    """An ``on_user(done, total)`` callback sending ``prepare`` events, at most ~10 a second."""
    last = [0.0]

    def on_user(done: int, total: int) -> None:
        now = time.monotonic()
        if progress is not None and (done == total or now - last[0] > 0.1):
            last[0] = now
            progress.event("prepare", done=done, total=total, what=what)

    return on_user
