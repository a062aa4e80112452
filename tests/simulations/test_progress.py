"""A run on the user's own jsonl file; progress in non-terminal mode; one line per event in a run's output."""

import io
import json
import re
import uuid
from collections import Counter
from pathlib import Path

from fedpersona.client.app import app as client_app
from fedpersona.server.federation import run_federation
from fedpersona.simulations.inprocess import InProcessGrid
from fedpersona.simulations.partitions import prepare_partitions
from fedpersona.simulations.progress import LineDisplay, make_display
from fedpersona.simulations.runner import resolve
from fedpersona.simulations.sources import load_source
from tests.fedpersona.cli_helpers import run_cli

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _chat_file(path: Path, users: int = 4, per_user: int = 12) -> str:
    """A small chat log: one JSON object per message, with a user id."""
    lines = []
    for i in range(per_user):
        for u in range(users):
            lines.append({"user": f"user-{u}", "cue": f"to be or not to be, {i}?",
                          "reply": f"my lord, I pray you, good night {u} {i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def test_simulation_on_a_jsonl_file_with_one_progress_line_per_round(tiny_config, tmp_path):
    src = _chat_file(tmp_path / "chats.jsonl")
    flat, cfg = resolve(None, dict(tiny_config, **{"data.source": src, "data.min-examples": 8,
                                                   "eval.local-baseline": False}))
    users = load_source(cfg.data, cfg.run.seed)
    assert [u.user_id for u in users] == [f"user-{u}" for u in range(4)]
    prepare_partitions(cfg, users)  # as the runner does: each simulated device reads its user's data folder
    out = io.StringIO()
    display = LineDisplay(out)
    nodes = {10 + i: {"partition-id": i} for i in range(len(users))}  # simulated devices: data from the source
    with InProcessGrid(client_app, nodes, flat, run_id=uuid.uuid4().int % 2**62) as grid:
        metrics = run_federation(grid, cfg, progress=display)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["failed"] == 0 and r["contributors"] == 3 and r["applied"] for r in rounds)
    assert metrics["final"]["devices"] == 4  # the server holds only the secure sum of the 4 devices' figures

    lines = out.getvalue().splitlines()
    round_lines = [line for line in lines if line.startswith("round ") and "| cohort" in line]
    assert len(round_lines) == 2, lines
    assert round_lines[0].startswith("round 1/2 | cohort 3: trained 3, declined 0, failed 0")
    assert "key advertisement" in round_lines[0] and "unmasking" in round_lines[0]  # secure-aggregation stages
    # The ETA counts the final evaluation: after the last round it is what is left.
    assert "ETA" in round_lines[0] and "ETA" in round_lines[1] and "with the final evaluation" in round_lines[1]
    # One line per device that finished, piped: 3 per round, then the 4 devices' final evaluation.
    for r in (1, 2):
        mine = [line for line in lines if line.startswith(f"round {r}/2 | device ")]
        assert [m.split(" | ")[1] for m in mine] == [f"device {k}/3 trained" for k in (1, 2, 3)], lines
        assert lines.index(mine[-1]) < lines.index(round_lines[r - 1])
        assert "ETA" in mine[0] and "ETA" not in mine[-1]  # from the devices done so far, none left after the last
    evaluated = [line for line in lines if line.startswith("final evaluation | device ")]
    assert [e.split(" | ")[1] for e in evaluated] == [f"device {k}/4 evaluated" for k in (1, 2, 3, 4)], lines
    assert lines[0].startswith("run 'demo': 4 users, 3 per round, 2 rounds, DP-SGD on, aggregation secagg+")
    # The server's view of the final evaluation is its noised sum: the line shows a model's mean only where the
    # server's summary reports it (its noised device count at least 3 noise sds: with 4 devices, usually none, but
    # the noise is fresh every run, so the test checks the line against the summary, not a count it cannot know).
    assert lines[-1].startswith("final evaluation: 4 users")
    summary = metrics["final"]["summary"]
    for model, text in (("base", "base"), ("shared", "shared"), ("personal", "personalized")):
        assert (f" {text} " in lines[-1]) == (f"{model}-loss" in summary), (lines[-1], summary)
    assert len(lines) == 1 + 2 * (3 + 1) + 4 + 1 and not any(ANSI.search(line) for line in lines)


def test_display_is_plain_lines_when_stdout_is_not_a_terminal():
    assert isinstance(make_display(stream=io.StringIO()), LineDisplay)
    assert make_display(quiet=True) is None


_PREFIXES = [
    re.compile(r"^\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: (?P<msg>.*)$"),  # ours
    re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(?:\d[\d:., -]*)?:\s+(?P<msg>.*)$"),  # Flower's own handler
    re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:\w+:(?P<msg>.*)$"),  # Opacus's basicConfig handler
]
_PROCESS = re.compile(r"^(?P<proc>\(\w+ pid=\d+(?:, ip=[\d.]+)?\) )?(?P<rest>.*)$")


def _event(line: str) -> tuple[str, str]:
    """(process prefix, message without timestamp / level / logger): two handlers' copies of one record match."""
    m = _PROCESS.match(line)
    proc, rest = m["proc"] or "", m["rest"]
    for p in _PREFIXES:
        hit = p.match(rest)
        if hit:
            return proc, hit["msg"].strip()
    return proc, rest.strip()


def test_cli_run_writes_each_line_once_without_ansi_codes(tiny_config, tmp_path):
    """The console script through the Flower simulation, piped (as in CI or `> run.log`), with info logs on."""
    src = _chat_file(tmp_path / "chats.jsonl")
    flat = dict(tiny_config, **{"data.source": src, "data.min-examples": 8, "eval.local-baseline": False})
    proc = run_cli(["run", "--cpus", "1", "-v"], tmp_path, flat=flat)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, err = proc.stdout, proc.stderr
    assert not ANSI.search(out) and not ANSI.search(err), "ANSI codes in a pipe"
    assert len([line for line in out.splitlines() if line.startswith("round ") and "| cohort" in line]) == 2, out
    assert "Generating" not in err and "\r" not in err, "no progress bars in a pipe"
    assert "is_gradient_checkpointing" not in err and "Tip: In future versions of Ray" not in err
    events = [_event(line) for line in (out + "\n" + err).splitlines()
              if line.strip() and set(line.strip()) != {"-"}]  # the results table's rules
    twice = {e: n for e, n in Counter(events).items() if n > 1}
    assert not twice, f"lines written more than once: {twice}\n--- stdout\n{out}\n--- stderr\n{err[-6000:]}"
    assert any("fedpersona run 'demo'" in msg for _, msg in events), "info logs are on with -v"


def test_live_display_on_a_terminal_keeps_one_line_per_finished_round():
    from rich.console import Console

    from fedpersona.simulations.progress import LiveDisplay

    buf = io.StringIO()
    with LiveDisplay(Console(file=buf, force_terminal=True, width=220)) as d:
        for done in (1, 2, 3, 4):
            d.event("prepare", done=done, total=4, what="users")
        d.event("prepare-end", users=4, source="chats.jsonl", seconds=0.1)
        d.event("run-start", run="demo", rounds=2, nodes=4, cohort=3, aggregation="secagg+", dp=True,
                **{"start-round": 0})
        for r in (1, 2):
            d.event("round-start", round=r, rounds=2, cohort=3)
            for stage in ("advertise", "train", "unmask"):
                d.event("stage", round=r, stage=stage, nodes=3)
                for done in (1, 2, 3):
                    d.event("reply", round=r, stage=stage, nodes=3, done=done, failed=0, seconds=0.1 * done)
                d.event("stage-end", round=r, stage=stage, nodes=3, replies=3, errors=0, seconds=0.5)
            d.event("round-end", round=r, rounds=2, cohort=3, trained=3, declined=0, failed=0, applied=True,
                    seconds=1.5, epsilon=1.0)
        d.event("eval-start", nodes=4)
        d.event("eval-end", users=4, failed=0, seconds=1.0, summary={"base": 5.0, "personal": 4.9})
    text = ANSI.sub("", buf.getvalue())
    assert "\x1b[" in buf.getvalue(), "a terminal gets the live display"
    for line in ("round 1/2 | cohort 3: trained 3", "round 2/2 | cohort 3: trained 3", "final evaluation: 4 users",
                 "prepared 4 users from chats.jsonl"):
        assert text.count(line) == 1, (line, text)
    assert "rounds" in text and "2/2" in text and "training + masked input" in text
    assert "round 2: training + masked input, devices done" in text and "3/3" in text  # devices done in the stage
    assert "device 3/3 trained" not in text, "on a terminal the status line counts the devices; no line each"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_counts_the_devices_done_and_the_final_evaluation():
    """The run's ETA: rounds left at a round's time plus the final evaluation (users x a device's seconds),
    and inside a stage the devices done so far."""
    from fedpersona.simulations.progress import Lines

    clock = _Clock()
    lines = Lines(clock=clock)
    lines.text("run-start", {"run": "demo", "rounds": 3, "nodes": 20, "cohort": 8, "aggregation": "secagg+",
                             "dp": True, "final-eval": True, "local-baseline": True})
    lines.text("round-start", {"round": 1, "rounds": 3, "cohort": 8})
    lines.text("stage", {"round": 1, "stage": "train", "nodes": 8})
    assert lines.eta() is None and lines.stage_eta() is None  # nothing measured yet
    clock.t = 10.0
    text = lines.text("reply", {"round": 1, "stage": "train", "nodes": 8, "done": 1, "failed": 0})
    assert text == "round 1/3 | device 1/8 trained | 10.0 s, ETA 1:10"  # 7 devices left at 10 s each
    # the run: this round's 70 s left, 2 more rounds of 8 devices, the final evaluation of 20 devices
    assert lines.eta() == 70 + 2 * 80 + 20 * 10
    clock.t = 80.0
    assert lines.text("reply", {"round": 1, "stage": "train", "nodes": 8, "done": 8, "failed": 1}) \
        == "round 1/3 | device 8/8 trained, 1 failed | 80.0 s"
    lines.text("stage-end", {"round": 1, "stage": "train", "nodes": 8, "replies": 8, "errors": 1, "seconds": 80.0})
    line = lines.text("round-end", {"round": 1, "rounds": 3, "cohort": 8, "trained": 7, "declined": 0, "failed": 1,
                                    "applied": True, "seconds": 90.0})
    assert line.endswith("90.0 s, ETA 6:20 with the final evaluation")  # 2 x 90 + 20 x 10
    lines.text("eval-start", {"nodes": 20})
    lines.text("stage", {"round": 4, "stage": "evaluate", "nodes": 20})
    clock.t = 130.0
    assert lines.text("reply", {"round": 4, "stage": "evaluate", "nodes": 20, "done": 5}) \
        == "final evaluation | device 5/20 evaluated | 50.0 s, ETA 2:30"
    assert lines.eta() == 150.0
    # no local-only replay: the evaluation is estimated at a quarter of a device's training
    quiet = Lines(clock=clock)
    quiet.text("run-start", {"run": "demo", "rounds": 1, "nodes": 20, "cohort": 8, "local-baseline": False})
    quiet.device_seconds.append((80.0, 8))
    assert quiet.eta(1) == 20 * 10 * 0.25
    off = Lines(clock=clock)
    off.text("run-start", {"run": "demo", "rounds": 1, "nodes": 1, "cohort": 1, "final-eval": False})
    assert off.text("run-start", {"run": "x", "rounds": 1, "nodes": 1, "cohort": 1}).startswith(
        "run 'x': 1 user, 1 per round, 1 round, ")  # "1 round", not "1 rounds"


def test_a_noisy_sum_round_shows_one_line_per_step():
    from fedpersona.simulations.progress import Lines

    lines = Lines()
    lines.text("run-start", dict(run="demo", rounds=3, users=20, cohort=8))
    lines.text("round-start", dict(round=1, rounds=3, cohort=8))
    for k in (1, 2):
        lines.text("stage", dict(round=1, stage="noisy-sum step", nodes=8))
        out = lines.text("stage-end", dict(round=1, stage="noisy-sum step", seconds=8.5, replies=8))
        assert out == f"round 1/3 | noisy-sum step {k}: 8 device(s) answered | 8.5 s"
    lines.text("round-start", dict(round=2, rounds=3, cohort=8))
    lines.text("stage", dict(round=2, stage="noisy-sum step", nodes=8))
    assert "noisy-sum step 1:" in lines.text("stage-end", dict(round=2, stage="noisy-sum step", seconds=1.0, replies=7))


def test_a_noisy_sum_step_line_counts_the_rounds_steps_and_its_eta():
    from fedpersona.simulations.progress import Lines

    now = [100.0]
    lines = Lines(clock=lambda: now[0])
    lines.text("run-start", {"run": "demo", "rounds": 3, "nodes": 20, "cohort": 8, "sum-steps": 6})
    lines.text("round-start", dict(round=1, rounds=3, cohort=8))
    outs = []
    for _ in range(6):
        lines.text("stage", dict(round=1, stage="noisy-sum step", nodes=8))
        now[0] += 10.0
        outs.append(lines.text("stage-end", dict(round=1, stage="noisy-sum step", seconds=10.0, replies=8)))
    assert outs[0] == "round 1/3 | noisy-sum step 1/6: 8 device(s) answered | 10.0 s, round ETA 0:50"
    assert outs[3].endswith("step 4/6: 8 device(s) answered | 10.0 s, round ETA 0:20")
    assert outs[5] == "round 1/3 | noisy-sum step 6/6: 8 device(s) answered | 10.0 s"  # the last: nothing left


def test_the_final_evaluation_counts_devices_over_its_groups():
    """Groups of 3 and 2: the lines count 1..5 of 5, not 1..3 then 1..2, and the ETA covers every group."""
    from fedpersona.simulations.progress import Lines

    t = [0.0]
    lines = Lines(clock=lambda: t[0])
    lines.text("run-start", dict(run="demo", rounds=1, users=5, cohort=3))
    lines.text("eval-start", dict(nodes=5))
    seen = []
    for size in (3, 2):
        lines.text("stage", dict(round=0, stage="evaluate", nodes=size))
        for done in range(1, size + 1):
            t[0] += 1.0
            seen.append(lines.text("reply", dict(round=0, stage="evaluate", nodes=size, done=done, failed=0)))
        lines.text("stage-end", dict(round=0, stage="evaluate", nodes=size, replies=size, seconds=1.0))
    assert [x.split(" | ")[1] for x in seen] == [f"device {k}/5 evaluated" for k in range(1, 6)]
    assert "ETA 0:03" in seen[1] and "ETA" not in seen[-1]  # 2 s for 2 devices, 3 left


def test_the_heads_trained_at_the_end_show_their_devices():
    """client.head-at = end: one line when the heads start, one per device trained, one when they are done; a
    round's own head passes (client.head-at = round) add no line of their own."""
    from fedpersona.simulations.progress import Lines

    t = [0.0]
    lines = Lines(clock=lambda: t[0])
    lines.text("run-start", dict(run="demo", rounds=1, users=3, cohort=3))
    lines.text("round-start", dict(round=1, rounds=1, cohort=3))
    lines.text("stage", dict(round=1, stage="personalize", nodes=3))
    assert lines.text("reply", dict(round=1, stage="personalize", nodes=3, done=1, failed=0)) is None
    lines.text("stage-end", dict(round=1, stage="personalize", nodes=3, replies=3, seconds=1.0))
    assert lines.text("heads-start", dict(nodes=3)) == "personal heads: 3 devices train theirs on the final shared adapter"
    seen = []
    for group in (2, 1):  # the exchange in groups: the lines count over them
        lines.text("stage", dict(round=2, stage="personalize", nodes=group))
        for done in range(1, group + 1):
            t[0] += 2.0
            seen.append(lines.text("reply", dict(round=2, stage="personalize", nodes=group, done=done,
                                                 failed=int(group == 1))))
        lines.text("stage-end", dict(round=2, stage="personalize", nodes=group, replies=group, seconds=2.0 * group))
    assert seen[0] == "personal heads | device 1/3 trained | 2.0 s, ETA 0:04"
    assert seen[1] == "personal heads | device 2/3 trained | 4.0 s, ETA 0:02"
    assert seen[2] == "personal heads | device 3/3 trained, 1 failed | 6.0 s"
    assert lines.text("heads-end", dict(nodes=3, personalized=2, failed=1, seconds=6.0)) == \
        "personal heads: 2 of 3 devices trained, 1 failed in 6.0 s"
