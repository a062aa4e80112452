"""A run on the user's own jsonl file; progress in non-terminal mode; one line per event in a run's output."""

import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

from client.app import app as client_app
from server.federation import run_federation
from simulations.inprocess import InProcessGrid
from simulations.partitions import prepare_partitions
from simulations.progress import LineDisplay, make_display
from simulations.runner import resolve
from simulations.sources import load_source

ROOT = Path(__file__).resolve().parents[2]
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
    round_lines = [line for line in lines if line.startswith("round ")]
    assert len(round_lines) == 2, lines
    assert round_lines[0].startswith("round 1/2 | cohort 3: trained 3, declined 0, failed 0")
    assert "key advertisement" in round_lines[0] and "unmasking" in round_lines[0]  # secure-aggregation stages
    assert "ETA" in round_lines[0] and "ETA" not in round_lines[1]  # nothing left after the last round
    assert lines[0].startswith("run 'demo': 4 users, 3 per round, 2 rounds, DP-SGD on, aggregation secagg+")
    assert lines[-1].startswith("final evaluation: 4 users") and "personalized" in lines[-1]
    assert len(lines) == 4 and not any(ANSI.search(line) for line in lines)


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
    args = [a for k, v in flat.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("FEDPERSONA_RUN_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "fedpersona.cli", "run", "--cpus", "1", "-v", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, err = proc.stdout, proc.stderr
    assert not ANSI.search(out) and not ANSI.search(err), "ANSI codes in a pipe"
    assert len([line for line in out.splitlines() if line.startswith("round ")]) == 2, out
    assert "Generating" not in err and "\r" not in err, "no progress bars in a pipe"
    assert "is_gradient_checkpointing" not in err and "Tip: In future versions of Ray" not in err
    events = [_event(line) for line in (out + "\n" + err).splitlines()
              if line.strip() and set(line.strip()) != {"-"}]  # the results table's rules
    twice = {e: n for e, n in Counter(events).items() if n > 1}
    assert not twice, f"lines written more than once: {twice}\n--- stdout\n{out}\n--- stderr\n{err[-6000:]}"
    assert any("fedpersona run 'demo'" in msg for _, msg in events), "info logs are on with -v"


def test_live_display_on_a_terminal_keeps_one_line_per_finished_round():
    from rich.console import Console

    from simulations.progress import LiveDisplay

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
