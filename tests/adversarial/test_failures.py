"""Hole 6: failures pass quietly. A device whose state fails authentication fails the run, loudly.

A real Flower simulation (the runner, the Simulation Engine, the real apps) of 4 users, one of
whose device state was tampered with: ``fedpersona run`` must exit non-zero, and the failed user
must appear in users.csv, metrics.json and summary.txt as failed, with the error class.
``--allow-failures`` exits 0 with a warning.
"""

import csv
import json
from pathlib import Path

from fedpersona.client.store import DeviceStore
from fedpersona.cli import main
from fedpersona.config import load_config
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.partitions import simulated_state_dir


def _scenario(tmp_path, tiny_config) -> Path:
    flat = dict(tiny_config, **{"server.num-rounds": 1, "eval.local-baseline": False, "run.name": "loud"})
    sections: dict[str, dict] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "loud.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_failed_device_fails_the_run_and_is_listed(tiny_config, tmp_path, capsys, monkeypatch):
    scenario = _scenario(tmp_path, tiny_config)
    cfg = load_config(dict(tiny_config, **{"run.name": "loud"}), env=False)
    users = load_users(min_speeches=cfg.data.min_speeches, max_users=cfg.data.max_users, seed=cfg.run.seed)
    victim = users[0].user_id
    store = DeviceStore(simulated_state_dir(cfg, victim))
    store.save_text("ledger", '{"tampered": "below"}')
    store.save_text("later", "a later commit")  # the ledger's commit is not the last one (that could be torn)
    blob = store._folder.state.blobs["ledger"]
    path = store.state_dir / blob.journal
    data = bytearray(path.read_bytes())
    data[blob.offset + blob.length - 1] ^= 0xFF  # the device's state no longer authenticates
    path.write_bytes(bytes(data))

    code = main(["run", str(scenario), "--cpus", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "fedpersona: error:" in err and victim in err and "StateError" in err

    run_dir = Path(tiny_config["run.results-dir"]) / "loud"
    with (run_dir / "users.csv").open() as fh:
        rows = {r["user"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {u.user_id for u in users}, "every user is in users.csv, the failed one too"
    assert rows[victim]["status"] == "failed" and "StateError" in rows[victim]["error"]
    assert all(r["status"] == "ok" for u, r in rows.items() if u != victim)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "StateError" in metrics["failed_users"][victim] and metrics["failure_count"] >= 1
    summary = (run_dir / "summary.txt").read_text()
    assert any(victim[:37] in line and "FAILED: StateError" in line for line in summary.splitlines())

    # Failures allowed: the same outcome exits 0, still said out loud (the real metrics of this run, read back).
    import fedpersona.simulations.runner

    metrics["wall_seconds"] = 1.0
    monkeypatch.setattr(fedpersona.simulations.runner, "run", lambda *a, **k: metrics)
    code = main(["run", str(scenario), "--allow-failures"])
    err = capsys.readouterr().err
    assert code == 0 and "fedpersona: warning:" in err and victim in err and "StateError" in err


def test_failures_are_counted_once_and_every_failed_user_listed():
    from fedpersona.simulations.failures import mark_failed

    metrics = {"rounds": [{"round": 1, "failed": 2}, {"round": 2, "failed": 0}, {"round": 3, "failed": 1}],
               "final": {"users": [{"user": "a", "base-loss": 4.0}], "failures": []}}
    failed = {"b": [{"error": "StateError", "message_type": "train", "round": 3},
                    {"error": "StateError", "message_type": "evaluate", "round": 4}]}
    assert mark_failed(metrics, failed, after_round=2) == 2  # round 1 was reported by an earlier invocation
    rows = {u["user"]: u for u in metrics["final"]["users"]}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "failed"
    assert rows["b"]["error"] == "StateError (train round 3); StateError (evaluate round 4)"
    assert mark_failed({"rounds": [{"round": 1, "failed": 0}]}, {}) == 0
