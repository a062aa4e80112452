"""Issue 20, hole 7: chat input. Hostile bytes at `fedpersona chat` and the training rounds after them.

Written as the input arrives: bytes piped into the real `fedpersona chat` (a device that trained one
round with the tiny model), then that device in a real federation. On main (cb416a4):

* a message that is not valid UTF-8 crashed `fedpersona chat` (UnicodeDecodeError);
* ``/edit`` with invalid UTF-8 was kept as a lone surrogate: every later round of that device failed
  with a TypeError in the tokenizer, its 3-device cohort aborted, and its error reply carried the raw
  exception text;
* a 1 MB line and NUL or escape characters were kept as they were.

Now a line is read as bytes and refused with a message when it is not UTF-8, holds a control
character or is longer than 4096 characters; nothing of it is drafted or kept, the session goes on.
A store that already holds an unusable example (kept by an older version) trains on the rest and says
so in the device's log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from fedpersona.client.device import RECEIVED_SHARED, Device
from fedpersona.client.feedback import FEEDBACK, load_feedback
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from tests.adversarial.helpers import flat_config, user_folders
from tests.adversarial.server_view import federation

REPO = Path(__file__).resolve().parents[2]
GOOD = "Well met, my lord."


def _chat(state: Path, data: Path, script: bytes) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONIOENCODING="utf-8:surrogateescape")
    return subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", "chat", "--state-dir", str(state), "--data-dir", str(data),
         "--max-new-tokens", "4", "--temperature", "1.0", "--seed", "3", "--exemplars", "0"],
        input=script, capture_output=True, env=env, timeout=240, cwd=str(REPO),
    )


def test_hostile_chat_lines_are_refused_and_the_session_goes_on(tiny_config, tmp_path):
    nodes = user_folders(tmp_path, names=("alice",))
    node = nodes[21]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat_config(tiny_config, **{"secagg.enabled": False}), env=False)
    dev = Device(cfg, dict(node, **{"policy.allow-no-secagg": True}))
    dev.train_round(dev.model.initial_shared_state(), server_round=1)  # a device that has a shared adapter
    assert DeviceStore(node["state-dir"]).load_tensors(RECEIVED_SHARED) is not None

    hostile = [
        b"\xff\xfe not UTF-8 at all\n",         # a message of invalid bytes
        b"Who goes there?\n",                     # a message, drafted
        b"/edit I bring \xc3\x28 bad bytes\n",   # /edit with invalid UTF-8
        b"/edit nul\x00inside\n",                 # NUL
        b"/edit \x1b[31mred\x1b[0m\n",            # an escape sequence
        b"/edit " + b"x" * 1_000_000 + b"\n",    # a 1 MB line
        b"x" * 5000 + b"\n",                      # a message over the cap
        b"/edit " + GOOD.encode() + b"\n",       # and the user's real answer: kept
        b"/quit\n",
    ]
    proc = _chat(Path(node["state-dir"]), Path(node["data-dir"]), b"".join(hostile))
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err[-3000:]
    refusals = [ln for ln in out.splitlines() if "input refused:" in ln]
    assert len(refusals) == 6, out[-3000:]
    assert "not valid UTF-8" in refusals[0] and "not valid UTF-8" in refusals[1]
    assert "U+0000" in refusals[2] and "U+001B" in refusals[3]
    assert "at most 4096" in refusals[4] and "at most 4096" in refusals[5]
    assert "the draft still waits" in refusals[1], "a refused /edit leaves the draft pending"
    assert out.count("assistant:") == 1 and "[edited" in out and "1 edited" in out
    assert "\x1b" not in out and "x" * 5000 not in out

    (kept,) = load_feedback(DeviceStore(node["state-dir"]))
    assert (kept.cue, kept.reply, kept.origin) == ("Who goes there?", GOOD, "edited")


def test_an_unusable_kept_example_is_skipped_and_the_cohort_trains(tiny_config, tmp_path, caplog):
    """What main kept from a bad /edit (a lone surrogate) no longer fails the device's rounds."""
    import fedpersona.client.feedback

    fedpersona.client.feedback._SKIPPED.clear()  # "reported once" is per process: forget what earlier tests reported
    nodes = user_folders(tmp_path)
    victim = nodes[21]
    store = DeviceStore(victim["state-dir"])
    bad = {"id": "b" * 32, "cue": "What news?", "reply": "I bring \udcc3( bad bytes", "origin": "edited",
           "time": "2026-12-01T08:00:00+00:00", "proposed": "draft"}
    good = dict(bad, id="g" * 32, reply="I bring no news, my lord.")
    store.save_text(FEEDBACK, json.dumps({"version": 1, "examples": [bad, good]}))
    flat = flat_config(tiny_config)
    with caplog.at_level(logging.WARNING):
        metrics, errors = federation(flat, flat, nodes)
    (row,) = metrics["rounds"]
    assert row["failed"] == 0 and row["contributors"] == 3 and row["applied"], (row, errors)
    assert errors == {nid: [] for nid in nodes}
    skipped = [r.getMessage() for r in caplog.records if "b" * 32 in r.getMessage()]
    assert skipped and "skipped" in skipped[0] and "\udcc3" not in skipped[0], "reported by id, never by its text"
