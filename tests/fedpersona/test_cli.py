"""The console script as a newcomer meets it: help, errors before the heavy imports, a run on the user's own
.jsonl, then `generate --run`, `chat --run`, `export` (reloaded through peft) and `plan` for that run."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedpersona.cli import build_parser, main
from tests.fedpersona.cli_helpers import ROOT, run_cli


def _parsers(parser: argparse.ArgumentParser, path: str = "fedpersona"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


# ------------------------------------------------------------------------------------------------ help
def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    seen = 0
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            assert action.help and action.help.strip(), f"{path} {action.option_strings or action.dest}: no help text"
            shown = not (action.default is None or action.default is False or action.default == []
                         or action.default == argparse.SUPPRESS)
            if shown and (action.option_strings or action.nargs in ("?", "*")):
                assert "default" in (parser._get_formatter()._get_help_string(action) or "").lower(), \
                    f"{path} {action.option_strings}: default {action.default!r} not shown"
        assert "``" not in text and ":func:" not in text, f"{path} --help shows raw docstring markup"
    assert seen > 60


def test_top_level_help_is_plain_text_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedpersona") and "``" not in out and "console script" not in out
    for command in ("run", "plan", "generate", "chat", "export", "bench", "certs", "supernode", "audit", "audit-run"):
        assert f"\n    {command} " in out or f"\n    {command}\n" in out, command


def test_bench_has_one_help_per_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--help"])
    engine = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "utility", "--help"])
    utility = capsys.readouterr().out
    assert "--preset" in engine and "--epsilons" not in engine
    assert "--epsilons" in utility and "--preset" not in utility and "(default: 1,4,8)" in utility
    with pytest.raises(SystemExit):
        main(["bench", "utility", "--preset", "demo"])  # an option of another benchmark is refused
    assert "unrecognized arguments: --preset" in capsys.readouterr().err


def test_generate_and_chat_options_say_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for option, default in (("--max-new-tokens", "48"), ("--temperature", "0.7"), ("--seed", "0"),
                            ("--exemplars", "3"), ("--scenario", "demo")):
        assert option in out and f"(default: {default})" in out, option


# ------------------------------------------------------------------------------ errors before imports
_PROBE = ("import sys; from fedpersona.cli import main; rc = main(sys.argv[1:]); "
          "print('RC', rc, 'torch' in sys.modules, 'flwr' in sys.modules, 'transformers' in sys.modules)")


def _probe(tmp_path, *args: str) -> tuple[str, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--set", "privacy.target_epsilon=4"], "did you mean 'privacy.target-epsilon'?"),
    (["run", "--set", "server.num-round=4"], "did you mean 'server.num-rounds'?"),
    (["run", "--set", "data.source=missing.jsonl"], "no such file or folder"),
    (["run", "--set", "model.path=no-such-model"], "'model.path': folder does not exist"),
    (["plan", "nosuchscenario"], "No scenario 'nosuchscenario'"),
    (["run", "--set", "privacy.delta=2"], "'privacy.delta': must be in (0, 1)"),
])
def test_a_bad_key_or_path_fails_before_torch_flower_or_transformers_are_imported(tmp_path, args, message):
    out, err = _probe(tmp_path, *args)
    assert "RC 2 False False False" in out, (out, err)
    assert message in err and err.startswith("fedpersona: error:"), err


def test_sigterm_says_how_to_resume(tmp_path, monkeypatch, capsys, tiny_config):
    """A run stopped by SIGTERM exits 143 and prints the command that resumes it after its last checkpoint."""
    import fedpersona.simulations.runner

    ckpt = Path(tiny_config["run.results-dir"]) / "demo" / "checkpoints" / "round-0001"
    ckpt.mkdir(parents=True)
    (ckpt / "round.json").write_text("{}")

    def stopped(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(fedpersona.simulations.runner, "run", stopped)
    args = ["run", "-q", "--set", f"model.path={tiny_config['model.path']}",
            "--set", f"run.results-dir={tiny_config['run.results-dir']}",
            "--set", f"run.state-dir={tiny_config['run.state-dir']}"]
    before = signal.getsignal(signal.SIGTERM)
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after round 1 of 3" in err
    assert "The same command resumes it" in err and "fedpersona run -q --set" in err and "delete" in err
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is the run's only"


def test_a_run_that_trained_nothing_exits_non_zero(monkeypatch, capsys, tiny_config):
    import fedpersona.simulations.runner

    rounds = [{"round": 1, "cohort": 3, "contributors": 0, "applied": False,
               "aborted": "only 2 devices trained, fewer than secagg.min-contributors = 3"}]
    monkeypatch.setattr(fedpersona.simulations.runner, "run", lambda *a, **k: {
        "run": "demo", "rounds": rounds, "wall_seconds": 1.0, "config": {"run.results-dir": "results"}})
    assert main(["run", "-q", "--set", f"model.path={tiny_config['model.path']}"]) == 1
    err = capsys.readouterr().err
    assert "trained nothing: no round was applied" in err and "secagg.min-contributors" in err


# ------------------------------------------------------------------- a run on the user's own .jsonl
USERS = {f"user-{u}": 14 for u in range(5)} | {"quiet-user": 4}


@pytest.fixture(scope="module")
def own_run(tiny_model_dir, tmp_path_factory):
    """`fedpersona run` (a subprocess, as a user runs it) on a small per-user .jsonl of 6 users, one of them with
    too few examples for data.min-examples."""
    root = tmp_path_factory.mktemp("own-data")
    rows = []
    for user, n in USERS.items():
        for i in range(n):
            long = " and, my lord, I pray you good night" * (3 if i % 2 else 0)  # every other reply too long
            rows.append({"user": user, "cue": f"to be or not to be, {i}?", "reply": f"good night {user} {i}{long}"})
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat = {"model.path": str(tiny_model_dir), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2,
            "adapter.personal-layers": 1, "adapter.rank": 2, "data.source": str(src), "data.min-examples": 8,
            "data.max-examples": 16, "client.local-steps": 2, "client.batch-size": 4, "server.num-rounds": 2,
            "server.clients-per-round": 3, "privacy.delta": 1e-2, "eval.local-baseline": False,
            "privacy.noise-on": "device", "privacy.max-grad-norm": 1.0, "server.optimizer": "fedavg", "server.lr": 1.0,
            "run.results-dir": str(root / "results"), "run.state-dir": str(root / "state")}
    proc = run_cli(["run", "--cpus", "1"], root, flat=flat)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "flat": flat, "proc": proc, "run": str(root / "results" / "demo")}


def test_the_run_reports_what_the_filters_dropped_and_the_replies_cut(own_run):
    out = own_run["proc"].stdout
    data = "data: 5 of 6 users of " + own_run["flat"]["data.source"] + \
           "; dropped 1 with fewer than data.min-examples=8 examples"
    assert data in out.splitlines()[1], out  # beside "prepared 5 of 6 users", not "preparing users 6/6"
    assert out.splitlines()[0].startswith("prepared 5 users of 6 from ")
    run_dir = Path(own_run["run"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    d = metrics["data"]
    assert (d["users_in_source"], d["below_min_examples"], d["users"]) == (6, 1, 5)
    t = d["truncation"]
    assert t["replies"] == 5 * 14 and 0.3 < t["share"] < 0.7  # every other reply is longer than the 32 tokens
    summary = (run_dir / "summary.txt").read_text()
    assert data in summary and f"replies: {t['cut']} of 70 ({t['share']:.0%}) cut at model.seq-len=32" in summary
    assert "personal loss" in summary  # the table is still there, above
    assert "(2 rounds)" in out and "1 rounds" not in out


def test_generate_run_answers_several_prompts_with_the_base_model_beside(own_run, capsys, monkeypatch):
    monkeypatch.chdir(own_run["root"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who's there?\n\nGood night, sweet prince.\n"))
    code = main(["generate", "--run", "results/demo", "--user", "user-1", "--prompt", "To be, or not to be?",
                 "--prompts", "-", "--base", "--max-new-tokens", "4", "--exemplars", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("prompt: ") == 3 and out.count("personalized: ") == 3 and out.count("base model:   ") == 3
    assert "prompt: Who's there?" in out and "prompt: Good night, sweet prince." in out
    # The same run by name; an unknown user names the run's users and the likely one.
    assert main(["generate", "--run", "demo", "--user", "User-2", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--run", "demo", "--user", "user-9", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "Unknown user 'user-9' in run 'demo'" in err and "Did you mean 'user-" in err and "Its 5 users" in err
    assert "quiet-user" not in err, "a user the filters dropped is not one of the run's users"


def test_chat_run_drafts_with_the_base_model_beside_and_keeps_feedback(own_run, capsys, monkeypatch):
    from fedpersona.client.feedback import load_feedback
    from fedpersona.client.store import DeviceStore
    from fedpersona.config import load_config
    from fedpersona.simulations.partitions import simulated_state_dir

    monkeypatch.setattr(sys, "stdin", io.StringIO("Who's there?\n/accept\n/quit\n"))
    assert main(["chat", "--run", own_run["run"], "--user", "user-3", "--base", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 1 and out.count("base model: ") == 1 and "[accepted" in out
    cfg = load_config(dict(own_run["flat"]), env=False)
    store = DeviceStore(simulated_state_dir(cfg, "user-3"))
    assert [e.origin for e in load_feedback(store)] == ["accepted"]


def test_export_run_reloads_through_peft_with_the_same_logits(own_run, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedpersona.simulations.generate import personalized_model

    with pytest.warns(UserWarning, match="personal head"):
        assert main(["export", "--run", own_run["run"], "--user", "user-0", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "PeftModel.from_pretrained" in out
    _, _, model, _, _ = personalized_model("user-0", None, run=own_run["run"])
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        want = {"personalized": model.peft(input_ids=ids).logits}
        with model.personal_zeroed():
            want["shared"] = model.peft(input_ids=ids).logits
    for part in ("personalized", "shared"):
        base = AutoModelForCausalLM.from_pretrained(own_run["flat"]["model.path"], dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "x" / part)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, want[part], rtol=1e-4, atol=1e-5)


def test_plan_foresees_each_users_noise_and_epsilon_as_the_run_spent_them(own_run, capsys, monkeypatch):
    """`fedpersona plan` before a run = what the devices' ledgers hold after it (same sigma, q, rounds, epsilon)."""
    from fedpersona.client.store import DeviceStore
    from fedpersona.config import load_config
    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.simulations.partitions import simulated_state_dir
    from fedpersona.simulations.plan import make_plan

    monkeypatch.chdir(own_run["root"])
    plan = make_plan("demo", dict(own_run["flat"]))  # the scenario `fedpersona run` ran, with the same --set
    cfg = load_config(dict(own_run["flat"]), env=False)
    assert [r["user"] for r in plan["users"]] == [f"user-{u}" for u in range(5)] and not plan["refused"]
    for row in plan["users"]:
        text = DeviceStore(simulated_state_dir(cfg, row["user"])).load_text("ledger")
        ledger = PrivacyLedger.from_json(text) if text else PrivacyLedger()
        assert ledger.total_steps == row["steps"], row
        if row["steps"]:
            (sigma, q, _), = ledger.history
            assert math.isclose(sigma, row["sigma"], rel_tol=1e-9) and math.isclose(q, row["q"], rel_tol=1e-9)
        assert math.isclose(ledger.epsilon(cfg.privacy.delta), row["epsilon"], rel_tol=1e-6, abs_tol=1e-9), row
    assert sum(r["sampled"] for r in plan["users"]) == 2 * 3  # 2 rounds of 3
    from tests.fedpersona.cli_helpers import set_args

    assert main(["plan", *set_args(own_run["flat"])]) == 0
    out = capsys.readouterr().out
    assert "plan of run 'demo': 5 users, 3 per round, 2 rounds" in out and "epsilon reached:" in out
    assert "dropped 1 with fewer than data.min-examples=8 examples" in out
    # A device policy stricter than the run: every device would refuse, and the plan says so (exit 1).
    assert main(["plan", *set_args(own_run["flat"]), "--device-policy", "max-epsilon=4"]) == 1
    out = capsys.readouterr().out
    assert out.count("REFUSED: ") == 5 and "policy.max-epsilon" in out and "5 user(s) would refuse" in out


def test_the_virtualenv_finds_flowers_programs_without_being_on_path(tmp_path):
    """`flwr run` starts `flower-superlink` by name: scripts/install.sh's .pth puts the virtualenv's bin/ on PATH
    for the virtualenv's own Python processes, so `.venv/bin/flwr run .` works without an activated virtualenv."""
    import sysconfig

    pth = Path(sysconfig.get_paths()["purelib"]) / "fedpersona-venv-path.pth"
    if not pth.is_file():
        pytest.skip("installed without scripts/install.sh")
    probe = "import os, shutil; print(shutil.which('flower-superlink')); print(os.environ['PATH'])"
    out = subprocess.run([sys.executable, "-c", probe], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path).stdout.splitlines()
    bindir = str(Path(sys.executable).parent)
    assert out[0] == str(Path(bindir) / "flower-superlink") and out[1].split(os.pathsep)[0] == bindir
    again = subprocess.run([sys.executable, "-c", "import os; print(os.environ['PATH'])"],
                           env={"PATH": f"{bindir}:/usr/bin"}, capture_output=True, text=True, timeout=60).stdout
    assert again.strip() == f"{bindir}:/usr/bin", "already on PATH: left as it is"
