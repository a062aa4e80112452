"""What a person running ``fedpersona run`` sees while it runs: the events of :mod:`fedpersona.server.progress`.

* On a terminal, :class:`LiveDisplay` (rich): bars for the preparation of the users, the rounds
  (done / total, with the ETA of the whole run, final evaluation included) and the stage in
  flight (devices done / addressed in the round's training or the final evaluation, with the ETA
  of that stage from the devices done so far); each finished step also stays printed above the
  bars as one line.
* Anywhere else (a pipe, a file, CI), :class:`LineDisplay`: one plain line per finished step
  (preparation, run start, each device that finished training or its final evaluation, each
  round, final evaluation), no ANSI codes, nothing redrawn.

The ETA of the run: the rounds left at the mean time of a finished round (the first round also
loads the model and prepares the devices it samples: it counts only while it is the only one),
plus the final evaluation, estimated before it starts as the users times the seconds a device
took to train (half of that, then a quarter, without the local-only replay; :data:`EVAL_SHARE`),
and from the devices done so far once it runs.

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
#: Stages whose replies are devices finishing real work (a line per device when piped).
DEVICE_STAGES = ("train", "evaluate", "personalize")
#: A device's final evaluation, as a share of the seconds it took to train a round: with the local-only
#: replay (a simulation replays what the device trained, then evaluates 4 models), and without it.
#: Measured on the demo (README): 233 s for 20 users' evaluation with the replay, rounds of 8 devices ~105 s.
EVAL_SHARE = {True: 1.0, False: 0.25}


def _seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def plural(n: int, word: str) -> str:
    """``1 round``, ``3 rounds``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Lines:
    """Turns events into the one-line texts of finished steps, and keeps the ETAs (shared by both displays)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.rounds_total = 0
        self.start_round = 0
        self.round_seconds: list[float] = []
        self.stages: dict[str, float] = {}
        self.sum_steps = 0  # steps of noisy sums finished in this round
        self.sum_steps_total = 0  # steps of a noisy-sum round (run-start's sum-steps; 0: not that mode)
        self.eval_done = 0  # devices evaluated in the final evaluation's groups already finished
        self.eval_t0 = 0.0
        self.aggregation = ""
        self.nodes = 0
        self.cohort = 0
        self.final_eval = True
        self.local_baseline = True
        self.round = 0
        self.round_t0: float | None = None
        self.in_eval = False
        self.in_heads = False  # the heads trained after the last round (client.head-at = end)
        self.heads_total, self.heads_done, self.heads_t0 = 0, 0, 0.0  # over its groups
        self.finished = False  # the final evaluation (or the run) is over
        # the stage in flight
        self.stage = ""
        self.stage_nodes = 0
        self.stage_done = 0
        self.stage_failed = 0
        self.stage_t0 = 0.0
        # seconds per device of the finished training stages (all devices of a stage / their number)
        self.device_seconds: list[tuple[float, int]] = []

    # ---------------------------------------------------------------- estimates
    def per_device(self) -> float | None:
        """Seconds a device takes to train its round: the finished training stages, else the one in flight."""
        if self.device_seconds:
            return sum(s for s, _ in self.device_seconds) / max(1, sum(n for _, n in self.device_seconds))
        if self.stage == "train" and self.stage_done:
            return (self.clock() - self.stage_t0) / self.stage_done
        return None

    def stage_eta(self) -> float | None:
        """Seconds left in the stage in flight, from the devices done so far."""
        if not self.stage_done or self.stage_done >= self.stage_nodes:
            return 0.0 if self.stage_done else None
        return (self.clock() - self.stage_t0) / self.stage_done * (self.stage_nodes - self.stage_done)

    def round_estimate(self) -> float | None:
        if self.round_seconds:
            recent = self.round_seconds[1:] or self.round_seconds
            return sum(recent) / len(recent)
        dev = self.per_device()
        return dev * self.cohort if dev is not None else None

    def eval_done_total(self) -> int:
        """Devices evaluated so far over every group of the final evaluation."""
        return self.eval_done + (self.stage_done if self.stage == "evaluate" else 0)

    def eval_estimate(self) -> float | None:
        """Seconds the final evaluation will take (all of it before it starts, the rest while it runs: from the
        devices evaluated so far, over every group)."""
        if not self.final_eval:
            return 0.0
        if self.in_eval and self.eval_done_total():
            done = self.eval_done_total()
            return (self.clock() - self.eval_t0) / done * max(0, self.nodes - done)
        dev = self.per_device()
        return dev * self.nodes * EVAL_SHARE[self.local_baseline] if dev is not None else None

    def eta(self, done_round: int | None = None) -> float | None:
        """Seconds left in the whole run: this round's rest, the rounds after it, the final evaluation."""
        if self.finished:
            return 0.0
        if self.in_eval:
            return self.eval_estimate()
        per_round = self.round_estimate()
        evaluation = self.eval_estimate()
        if per_round is None or evaluation is None:
            return None
        if done_round is not None:
            return per_round * max(0, self.rounds_total - done_round) + evaluation
        current = 0.0
        if self.round_t0 is not None:  # a round in flight
            current = max(0.0, per_round - (self.clock() - self.round_t0))
        return current + per_round * max(0, self.rounds_total - self.round) + evaluation

    # ---------------------------------------------------------------- events
    def text(self, kind: str, f: dict[str, Any]) -> str | None:
        if kind == "prepare-end":
            total = f.get("users-in-source")
            of = f" of {total}" if total is not None and total != f["users"] else ""
            head = f"prepared {plural(int(f['users']), 'user')}{of} from {f['source']} in {f['seconds']:.1f} s"
            return "\n".join([head, *f.get("lines", [])])
        if kind == "run-start":
            self.rounds_total, self.start_round = int(f["rounds"]), int(f.get("start-round", 0))
            self.round = self.start_round
            self.aggregation = str(f.get("aggregation", ""))
            self.nodes, self.cohort = int(f.get("nodes", 0)), int(f.get("cohort", 0))
            self.final_eval = bool(f.get("final-eval", True))
            self.local_baseline = bool(f.get("local-baseline", True))
            self.sum_steps_total = int(f.get("sum-steps", 0) or 0)  # steps of a noisy-sum round (0: not that mode)
            resumed = f", resuming after round {self.start_round}" if self.start_round else ""
            return (f"run '{f['run']}': {plural(self.nodes, 'user')}, {f['cohort']} per round, "
                    f"{plural(self.rounds_total, 'round')}, DP-SGD {'on' if f.get('dp') else 'OFF'}, "
                    f"aggregation {self.aggregation}{resumed}")
        if kind == "round-start":
            self.stages = {}
            self.sum_steps = 0
            self.round = int(f["round"])
            self.cohort = int(f.get("cohort", self.cohort))
            self.round_t0 = self.clock()
            return None
        if kind == "stage":
            self.stage, self.stage_nodes = str(f["stage"]), int(f["nodes"])
            self.stage_done = self.stage_failed = 0
            self.stage_t0 = self.clock()
            return None
        if kind == "reply":
            self.stage_done, self.stage_failed = int(f["done"]), int(f.get("failed", 0))
            if str(f.get("stage")) not in DEVICE_STAGES:
                return None
            if f["stage"] == "personalize" and not self.in_heads:
                return None  # a round's head passes: the round's line says how long they took
            where = ("final evaluation" if self.in_eval else "personal heads" if self.in_heads
                     else f"round {self.round}/{self.rounds_total}")
            what = "evaluated" if f["stage"] == "evaluate" else "trained"
            failed = f", {self.stage_failed} failed" if self.stage_failed else ""
            if self.in_eval and f["stage"] == "evaluate":  # counted over every evaluation group
                done, total, t0, eta = self.eval_done_total(), max(self.nodes, 1), self.eval_t0, self.eval_estimate()
            elif self.in_heads:  # counted over every group of the heads' exchange
                done, total, t0 = self.heads_done + self.stage_done, max(self.heads_total, 1), self.heads_t0
                eta = (self.clock() - t0) / done * (total - done) if done else None
            else:
                done, total, t0, eta = self.stage_done, self.stage_nodes, self.stage_t0, self.stage_eta()
            left = f", ETA {_seconds(eta)}" if eta else ""
            return f"{where} | device {done}/{total} {what}{failed} | {self.clock() - t0:.1f} s{left}"
        if kind == "stage-end" and f.get("stage") == "noisy-sum step":  # one line per step of a noisy sum (train.dp_step)
            self.stages[str(f["stage"])] = self.stages.get(str(f["stage"]), 0.0) + float(f["seconds"])
            self.stage = ""
            self.sum_steps += 1
            total = self.sum_steps_total
            of = f"/{total}" if total else ""
            left = ""
            if total and self.sum_steps < total and self.round_t0 is not None:
                # The round's steps so far, timed from the round's start (its first step builds the devices).
                per_step = (self.clock() - self.round_t0) / self.sum_steps
                left = f", round ETA {_seconds(per_step * (total - self.sum_steps))}"
            return (f"round {self.round}/{self.rounds_total} | noisy-sum step {self.sum_steps}{of}: "
                    f"{int(f.get('replies', 0))} device(s) answered | {float(f['seconds']):.1f} s{left}")
        if kind == "stage-end":
            if f.get("stage") == "evaluate" and self.in_eval:
                self.eval_done += int(f.get("replies", 0))
            if f.get("stage") == "personalize" and self.in_heads:
                self.heads_done += int(f.get("replies", 0))
            if f.get("stage") == "train" and int(f.get("replies", 0)):
                self.device_seconds.append((float(f["seconds"]), int(f["replies"])))
            if f.get("stage") != "evaluate":
                self.stages[str(f["stage"])] = self.stages.get(str(f["stage"]), 0.0) + float(f["seconds"])
            self.stage = ""
            return None
        if kind == "round-end":
            self.round_seconds.append(float(f["seconds"]))
            self.round_t0 = None
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
            with_eval = " with the final evaluation" if self.final_eval else ""
            parts.append(f"{f['seconds']:.1f} s" + (f", ETA {_seconds(eta)}{with_eval}" if eta else ""))
            return " | ".join(parts)
        if kind == "heads-start":
            self.in_heads = True
            self.heads_total, self.heads_done, self.heads_t0 = int(f["nodes"]), 0, self.clock()
            return f"personal heads: {plural(int(f['nodes']), 'device')} train theirs on the final shared adapter"
        if kind == "heads-end":
            self.in_heads = False
            failed = f", {f['failed']} failed" if f.get("failed") else ""
            return (f"personal heads: {int(f['personalized'])} of {plural(int(f['nodes']), 'device')} trained{failed} "
                    f"in {float(f['seconds']):.1f} s")
        if kind == "eval-start":
            self.in_eval = True
            self.nodes = int(f.get("nodes", self.nodes))
            self.eval_done, self.eval_t0 = 0, self.clock()
            return None
        if kind == "run-end":
            self.finished = True
            return None
        if kind == "eval-end":
            self.in_eval = False
            self.finished = True
            means = ", ".join(f"{MODEL_TEXT.get(k, k)} {v:.3f}" for k, v in f.get("summary", {}).items()
                              if isinstance(v, float) and math.isfinite(v))
            failed = f", {f['failed']} failed" if f.get("failed") else ""
            return (f"final evaluation: {plural(int(f['users']), 'user')}{failed} in {f['seconds']:.1f} s"
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
    """Bars and a status line redrawn in place on a terminal (rich); finished steps printed above them.

    The rounds bar shows the ETA of the whole run (final evaluation included), the status line the
    devices done in the stage in flight and that stage's ETA (:class:`Lines`), refreshed every second.
    """

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.console = console or Console()
        self.lines = Lines()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=self.console, transient=False, redirect_stdout=True, redirect_stderr=True,
        )
        self._tasks: dict[str, Any] = {}
        self._status = None
        self._status_text = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "LiveDisplay":
        self.progress.start()
        self._ticker = threading.Thread(target=self._tick, name="fedpersona-eta", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            if self._status is not None:
                self.progress.remove_task(self._status)
                self._status = None
            self.progress.stop()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self._refresh_etas()

    def _refresh_etas(self) -> None:
        if "rounds" in self._tasks:
            self.progress.update(self._tasks["rounds"], eta=_eta_text(self.lines.eta()))
        if self._status is not None:
            stage = self.lines.stage_eta() if self.lines.stage else None
            self.progress.update(self._status, eta=_eta_text(stage))

    def _task(self, name: str, description: str, total: float | None, completed: float = 0) -> Any:
        if name not in self._tasks:
            self._tasks[name] = self.progress.add_task(description, total=total, completed=completed, eta="-:--")
        return self._tasks[name]

    def _say(self, text: str, total: int | None = None) -> None:
        self._status_text = text
        if self._status is None:
            self._status = self.progress.add_task(text, total=total, eta="-:--")
        else:  # a new stage: its own elapsed time
            self.progress.reset(self._status, total=total, description=text, eta="-:--")

    def event(self, kind: str, **f: Any) -> None:
        with self._lock:
            self._event(kind, f)

    def _event(self, kind: str, f: dict[str, Any]) -> None:
        text = self.lines.text(kind, f)
        if text is not None and kind != "reply":  # the status line counts the devices; no line for each
            self.progress.console.print(text, markup=False, highlight=False)
        if kind == "prepare":
            task = self._task("prepare", f"reading the {f.get('what', 'users')} of the source", f["total"])
            self.progress.update(task, completed=f["done"], total=f["total"])
        elif kind == "prepare-end" and "prepare" in self._tasks:
            self.progress.update(self._tasks["prepare"], description="read the users of the source", eta="0:00")
        elif kind == "run-start":
            self._task("rounds", "rounds", f["rounds"], completed=f.get("start-round", 0))
        elif kind == "round-start":
            self._say(f"round {f['round']}/{f['rounds']}: cohort of {f['cohort']}")
        elif kind == "stage":
            what = STAGE_TEXT.get(str(f["stage"]), str(f["stage"]))
            where = ("final evaluation" if self.lines.in_eval else "personal heads" if self.lines.in_heads
                     else f"round {self.lines.round}")
            self._say(f"{where}: {what}, devices done", total=int(f["nodes"]))
        elif kind == "reply" and self._status is not None:
            self.progress.update(self._status, completed=int(f["done"]))
        elif kind == "round-end":
            self.progress.update(self._task("rounds", "rounds", f["rounds"]), completed=f["round"])
        elif kind == "eval-start":
            self._say(f"final evaluation on {f['nodes']} nodes")
        elif kind == "eval-end":
            self._say("final evaluation done")
        self._refresh_etas()
        self.progress.refresh()


def _eta_text(seconds: float | None) -> str:
    return "-:--" if seconds is None else _seconds(seconds)


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
