"""The pyproject ServerApp (`flwr run .`): the run's own folder, a federation of the wrong size stopped at once,
a run that trained nothing reported as failed."""

import json

import pytest

from fedpersona.config import load_config, read_scenario
from fedpersona.simulations.flower_runs import flower_run_config, run_folder
from fedpersona.simulations.scenarios import scenario_path
from fedpersona.simulations.serverapp import NothingTrained, check_trained, federation_error


def test_relative_folders_go_under_the_flower_runs_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    flat = flower_run_config({"run.results-dir": "results", "run.state-dir": "state", "run.name": "demo"}, 42)
    assert flat["run.results-dir"] == str(tmp_path / "flwr" / "fedpersona-runs" / "42" / "results")
    assert flat["run.state-dir"] == str(tmp_path / "flwr" / "fedpersona-runs" / "42" / "state")
    assert run_folder(42) == tmp_path / "flwr" / "fedpersona-runs" / "42"
    absolute = flower_run_config({"run.results-dir": "/srv/results"}, 42)
    assert absolute["run.results-dir"] == "/srv/results" and absolute["run.state-dir"].endswith("/42/state")
    assert flower_run_config(flat, 42) == flat, "idempotent: every message of a run may resolve it again"


def test_a_federation_of_the_wrong_size_names_the_number_it_needs():
    cfg = load_config(read_scenario(scenario_path("demo")), env=False)
    text = federation_error(cfg, 2, 20)
    assert "this simulation has 2 SuperNode(s)" in text and "has 20 users, one SuperNode each" in text
    assert 'flwr run . --federation-config "num-supernodes=20"' in text
    assert "secagg.min-contributors = 3" in text  # why Flower's default of 2 cannot work at all
    assert "min-contributors" not in federation_error(cfg, 25, 20) and "num-supernodes=20" in federation_error(cfg, 25, 20)
    assert federation_error(cfg, 20, 20) is None


def test_a_run_that_trained_nothing_fails():
    with pytest.raises(NothingTrained, match="trained nothing.*secure aggregation aborted: too few"):
        check_trained({"run": "demo", "rounds": [{"round": 1, "applied": False, "contributors": 0,
                                                  "aborted": "too few"}]})
    check_trained({"run": "demo", "rounds": [{"round": 1, "applied": False}, {"round": 2, "applied": True}]})
    check_trained({"run": "demo", "rounds": []})  # a resumed run with nothing left to do


def test_flower_simulation_with_too_few_supernodes_fails_before_any_round(tiny_config, tmp_path, monkeypatch):
    """The pyproject components on Flower's Simulation Engine with Flower's default of 2 SuperNodes for 4 users:
    the ServerApp raises at once (Flower reports the run failed), and no round, checkpoint or device state exists."""
    from flwr.simulation import run_simulation

    from fedpersona.simulations.clientapp import app as client_app
    from fedpersona.simulations.serverapp import app as server_app

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("FEDPERSONA_RUN_CONFIG", json.dumps({k: v for k, v in tiny_config.items()
                                                            if not k.startswith("run.")}))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    with pytest.raises(Exception) as err:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}})
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = " | ".join(chain)
    assert "this simulation has 2 SuperNode(s)" in text and "num-supernodes=4" in text, text
    runs = tmp_path / "flwr" / "fedpersona-runs"
    (run_dir,) = runs.iterdir()  # the run's own folder, not the working folder
    assert (run_dir / "state" / "demo" / "_simulated" / "manifest.json").is_file()  # the users were counted
    assert not (run_dir / "results" / "demo" / "checkpoints").exists(), "no round ran"
    assert not list((tmp_path / "cwd").iterdir()), "nothing in the working folder"
