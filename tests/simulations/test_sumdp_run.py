"""`fedpersona run` with the noise on the sum: the engine grid passes the steps of the noisy sums to the devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpersona.client.store import DeviceStore
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.simulations.runner import resolve


def test_cli_run_with_the_noise_on_the_sum(tiny_config, tmp_path):
    flat = dict(tiny_config, **{"privacy.noise-on": "sum", "privacy.noise-multiplier": 1.0, "server.clients-per-round": 4,
                                "client.local-steps": 2, "server.lr": 0.5})
    root = Path(__file__).resolve().parents[2]
    args = [a for k, v in flat.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}")]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("FEDPERSONA_RUN_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "fedpersona.cli", "run", "--cpus", "1", "-v", *args,
                           "--device-policy", "min-contributors=2"],  # t = 2 of 4 (the default floor is 3)
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "with the cohort engine in this process" in proc.stderr
    assert "Cohort engine: 0 cohorts trained" in proc.stderr  # the noisy-sum steps reached the devices' own path
    run_dir = Path(flat["run.results-dir"]) / "demo"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["client.max-participations"] == 2  # filled in: 2 rounds of 4 of 4 users
    # The demo's heads are trained once, after the last round (client.head-at = end), not after each round.
    assert [(r["round"], r["steps-applied"], r["personalized"]) for r in metrics["rounds"]] == [(1, 2, 0), (2, 2, 0)]
    assert metrics["head-at-end"]["personalized"] == 4
    users = metrics["final"]["users"]
    assert len(users) == 4 and all(u["rounds"] == 2 and u["steps"] == 4 for u in users)
    assert all(abs(u["local-epsilon"] - u["epsilon-federated"]) < 1e-9 for u in users)
    _, cfg = resolve(None, flat)
    for u in users:
        ledger = PrivacyLedger.from_json(DeviceStore(simulated_state_dir(cfg, u["user"])).load_text("ledger"))
        assert ledger.sum_steps and ledger.total_steps == 4 and ledger.plan["participations"] == 2


def test_the_utility_harness_federates_with_the_noise_on_the_sum(tiny_config, tmp_path):
    # `fedpersona bench utility --rows sum --vary server.lr=... --vary-row sum`: a sum row runs through the real
    # apps (the ServerApp's loop, the ClientApps' checks, secure aggregation), its rows from the devices' stores.
    from fedpersona.simulations.studies.utility import federate_by_runner, population

    flat, cfg = resolve(None, dict(tiny_config, **{"privacy.noise-on": "sum", "privacy.noise-multiplier": 1.0,
                                                   "data.max-users": 6, "server.clients-per-round": 6,
                                                   "client.local-steps": 2,
                                                   "server.num-rounds": 1, "client.head-steps": 2,
                                                   "eval.local-baseline": True, "server.lr": 0.5}))
    users = population(cfg, tmp_path / "population")
    run = federate_by_runner(cfg, flat, users, tmp_path / "runs")  # t = 3 of 6: the devices' default floor
    assert len(run.rows) == 6 and all(r["steps"] == 2 and r["head-steps"] == 2 for r in run.rows)
    assert all(abs(r["local-epsilon"] - r["epsilon-federated"]) < 1e-9 and r["epsilon-federated"] > 0 for r in run.rows)
    # The server stepped on the noisy sums: the shared adapter moved, so its held-out loss is not the base model's.
    assert any(abs(r["shared-loss"] - r["base-loss"]) > 1e-6 for r in run.rows)


def test_a_cohort_too_small_for_the_devices_floor_fails_before_training():
    """t = half of 3 = 1 is below the devices' default floor of 3: every device would refuse, so the run says so first."""
    from fedpersona.config import load_config
    from fedpersona.simulations.runner import check_sum_cohort

    cfg = load_config({"privacy.noise-on": "sum", "server.clients-per-round": 4}, env=False)
    with pytest.raises(ValueError, match="server.clients-per-round >= 6"):
        check_sum_cohort(cfg, 20, None)  # t = 2
    check_sum_cohort(cfg, 20, {"min-contributors": 2})  # a floor the devices hold: t = 2 is within it
    big = load_config({"privacy.noise-on": "sum", "server.clients-per-round": 8}, env=False)
    check_sum_cohort(big, 20, None)  # t = 4 of 8
    with pytest.raises(ValueError, match="t = 2 honest contributors of a cohort of 5"):
        check_sum_cohort(big, 5, None)  # only 5 users: the cohort is 5
    check_sum_cohort(load_config({"server.clients-per-round": 4}, env=False), 20, None)  # noise on each device


def test_the_plan_of_a_noisy_sum_run_is_its_ledger():
    """`fedpersona plan` with the noise on the sum: one sigma for every device, steps on a sum at integer orders."""
    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.simulations.plan import make_plan

    plan = make_plan("demo", {"data.max-users": 12, "privacy.noise-on": "sum"})
    cfg = plan["config"]
    assert cfg.client.max_participations >= 1  # filled in as the run fills it
    assert len({r["sigma"] for r in plan["users"]}) == 1
    for r in plan["users"]:
        ledger = PrivacyLedger()
        for _ in range(r["steps"] // cfg.client.local_steps):
            ledger.step_on_sum(noise_multiplier=r["sigma"], sample_rate=r["q"], honest=4,
                               num_steps=cfg.client.local_steps)
        assert ledger.epsilon(cfg.privacy.delta) == pytest.approx(r["epsilon"], rel=1e-9)
        assert r["epsilon-composed"] > r["epsilon"]


def test_participations_are_filled_over_the_rounds_the_server_runs():
    """The study scenario: 10 rounds of 32 of 103 users with privacy.planned-rounds = 4: a device can expect 4
    participations (ceil(320 / 103)), not ceil(4 x 32 / 103) = 2 (which made every device decline from round 7)."""
    from fedpersona.config import load_config
    from fedpersona.simulations.runner import fill_participations

    flat = {"server.num-rounds": 10, "server.clients-per-round": 32, "privacy.planned-rounds": 4,
            "server.sampling": "balanced"}
    cfg = fill_participations(flat, load_config(flat, env=False), 103)
    assert flat["client.max-participations"] == 4 and cfg.planned_participations == 4
    flat = {"server.num-rounds": 10, "server.clients-per-round": 32, "privacy.planned-rounds": 2}
    assert fill_participations(flat, load_config(flat, env=False), 103).planned_participations == 2  # its own cap


def test_a_device_past_its_cap_declines_a_noisy_sum_step_and_fails_nothing(tiny_config, tmp_path):
    """Round 2 samples devices that took their one participation: each declines every step (a signed decline,
    remembered), none fails; too few contributors remain, so the step aborts before any unmask."""
    from fedpersona.simulations.runner import run

    flat = dict(tiny_config, **{"privacy.noise-on": "sum", "privacy.noise-multiplier": 1.0, "data.max-users": 4,
                                "server.clients-per-round": 4, "server.num-rounds": 2, "client.local-steps": 1,
                                "client.max-participations": 1, "server.lr": 0.5, "eval.final": False})
    metrics = run("demo", flat, cpus=1, engine="cohort", device_policy={"min-contributors": 2})
    first, second = metrics["rounds"]
    assert (first["contributors"], first["declined"], first["failed"], first["applied"]) == (4, 0, 0, True)
    assert (second["contributors"], second["declined"], second["failed"], second["applied"]) == (0, 4, 0, False), second
    assert "only 0 of 4 clients sent masked inputs" in second["aborted"]
