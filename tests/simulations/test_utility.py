"""The utility study (`fedpersona bench utility --quick`) on the tiny model: every row, the files, attribution."""

import csv
import json
import math
from pathlib import Path

import pytest

from fedpersona.client.node_data import slug
from fedpersona.simulations.studies.utility import (ddp_noise_for, format_table, max_participations, shared_dim, study,
                                 study_rows)


FAST = {"client.head-steps": 2, "data.max-examples": 12, "privacy.delta": 1e-2, "data.max-users": 4,
        "privacy.noise-multiplier": 1.0}  # no calibration: fast


def test_quick_study_writes_every_row(tiny_config):
    overrides = dict(tiny_config, **FAST)
    result = study(None, overrides, epsilons=(8.0,), quick=True, central_steps=2, rows=("nodp", "device"))
    names = [r["row"] for r in result["table"]]
    for expected in ("base", "central (pooled, no DP)", "federated, no DP: shared", "federated, no DP: personalized",
                     "federated, no DP: local-only", "DP on each device, eps=8: personalized",
                     "DP on each device, eps=8: shared", "DP on each device, eps=8: local-only"):
        assert expected in names
    rows = {r["row"]: r for r in result["table"]}
    assert rows["base"]["gain"] == 0.0
    assert math.isclose(rows["central (pooled, no DP)"]["recovered"], 1.0)
    for r in result["table"]:
        assert math.isfinite(r["mean"]) and r["users"] == len(result["users"])
    # Each DP row stays within its budget; local-only spends the same epsilon as the device.
    for eps in (8.0,):
        row = rows[f"DP on each device, eps={eps:g}: personalized"]
        assert 0 < row["epsilon"] <= eps + 1e-6
        assert 0 < rows[f"DP on each device, eps={eps:g}: local-only"]["epsilon"] <= eps + 1e-6
    # Personalized against the same user's local-only model without DP, for every DP row.
    dp = rows["DP on each device, eps=8: personalized"]
    per_user = result["per_user"]
    local0 = {r["user-id"]: r["local-loss"] for r in per_user["federated, no DP"]}
    expect = sum(r["personal-loss"] < local0[r["user-id"]] for r in per_user["DP on each device, eps=8"]) / 4
    assert dp["beats_local_nodp"] == expect
    # One summary line per configuration, with the share of the pooled gain.
    summary = {s["row"]: s for s in result["summary"]}
    s = summary["DP on each device, eps=8"]
    assert s["status"] == "ok" and s["unit"] == "record" and s["epsilon"] == dp["epsilon"]
    assert math.isclose(s["recovered_shared"], rows["DP on each device, eps=8: shared"]["recovered"])
    assert summary["federated, no DP"]["epsilon"] == math.inf
    a = result["attribution"]["federated, no DP"]
    assert set(a["ranks"]) == set(result["users"]) and a["chance"] == 1 / len(result["users"])
    assert all(1 <= r <= len(result["users"]) for r in a["ranks"].values())
    files = result["files"]
    doc = json.loads(open(files["json"]).read())
    assert doc["table"][0]["row"] == "base"
    with open(files["csv"]) as fh:
        assert [r["row"] for r in csv.DictReader(fh)] == names
    assert open(files["png"], "rb").read(4) == b"\x89PNG"
    md = open(files["md"]).read()
    assert "| DP on each device, eps=8 |" in md and "per record" in md
    users_png = Path(files["json"]).parent / "utility-users" / slug("federated, no DP") / "users.png"
    assert users_png.read_bytes()[:4] == b"\x89PNG"
    assert "DP on each device, eps=8: personalized" in format_table(result["table"])


def test_sum_rows_are_config_overrides():
    from fedpersona.config import load_config

    cfg = load_config({"server.clients-per-round": 16, "data.max-users": 40}, env=False)
    specs = {s.slug: s for s in study_rows(cfg, (8.0,), 40, kinds=("sum",))}
    assert sorted(specs) == ["sum-t16-eps8", "sum-t3-eps8", "sum-t8-eps8"]
    assert specs["sum-t8-eps8"].overrides == {"privacy.enabled": True, "privacy.target-epsilon": 8.0,
                                               "privacy.noise-on": "sum", "privacy.honest-contributors": 8}
    with pytest.raises(ValueError, match="--rows"):
        study_rows(cfg, (8.0,), 40, kinds=("everything",))
    picked = study_rows(cfg, (8.0,), 40, kinds=("sum",), contributors=(16, 3))
    assert [s.slug for s in picked] == ["sum-t3-eps8", "sum-t16-eps8"]
    for wrong in ((0,), (17,), ()):
        with pytest.raises(ValueError, match="--contributors"):
            study_rows(cfg, (8.0,), 40, kinds=("sum",), contributors=wrong)


def test_user_level_ddp_row(tiny_config):
    """secagg.ddp: local training without noise, the discrete Gaussian on the sum, the user-level epsilon beside."""
    from fedpersona.config import load_config
    from fedpersona.privacy.secagg.settings import ddp_user_epsilon

    overrides = dict(tiny_config, **FAST)
    result = study(None, overrides, epsilons=(8.0,), quick=True, central_steps=1, rows=("ddp",),
                   attribution_users=False)
    (s,) = result["summary"]
    assert s["status"] == "ok" and s["unit"] == "user" and s["kind"] == "ddp"
    cfg = load_config({**result["config"], **{k: v for k, v in _ddp_overrides(result).items()}}, env=False)
    assert cfg.secagg.ddp and not cfg.privacy.enabled
    # Every device took part at most ceil(2 rounds * 3 / 4 users) = 2 times: the noise is calibrated for that.
    eps2 = ddp_user_epsilon(cfg, dim=shared_dim(cfg), rounds=2)
    assert 0 < s["epsilon"] <= 8.0 + 1e-6 and eps2 <= 8.0 + 1e-6
    rows = result["per_user"][s["row"]]
    assert all(r["epsilon"] == -1.0 for r in rows)  # no record-level guarantee: trained without noise
    assert max(r["user-epsilon"] for r in rows) == s["epsilon"]


def _ddp_overrides(result):
    from fedpersona.config import load_config

    cfg = load_config(result["config"], env=False)
    (spec,) = study_rows(cfg, (8.0,), len(result["users"]), kinds=("ddp",))
    return spec.overrides


def test_ddp_calibration_hits_the_budget():
    from fedpersona.config import load_config
    from fedpersona.privacy.secagg.settings import ddp_user_epsilon
    import dataclasses

    cfg = load_config({"secagg.ddp": True, "secagg.ddp-min-clients": 4, "server.clients-per-round": 8,
                       "secagg.ddp-delta": 1e-3}, env=False)
    z = ddp_noise_for(cfg, epsilon=8.0, rounds=3, dim=5000)
    at = lambda m: ddp_user_epsilon(dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, ddp_noise_multiplier=m)),
                                    dim=5000, rounds=3)
    assert at(z) <= 8.0 < at(z / 1.01)


def test_resume_reuses_measured_rows(tiny_config, caplog):
    overrides = dict(tiny_config, **FAST)
    first = study(None, overrides, epsilons=(8.0,), quick=True, central_steps=1, rows=("nodp",),
                  attribution_users=False)
    with caplog.at_level("INFO", logger="fedpersona.simulations.studies.utility"):
        again = study(None, overrides, epsilons=(8.0,), quick=True, central_steps=1, rows=("nodp",),
                      attribution_users=False, resume=True)
    assert "federated, no DP reused" in caplog.text
    assert again["summary"][0]["personalized"] == first["summary"][0]["personalized"]
    assert again["per_user"] == json.loads(json.dumps(first["per_user"]))


def test_a_row_through_the_real_apps_matches_the_in_process_row_structure(tiny_config):
    """federate_by_runner (the sum rows' path): the real ServerApp loop and ClientApps, rows from the stores."""
    from fedpersona.config import load_config
    from fedpersona.simulations.runner import resolve
    from fedpersona.simulations.studies.utility import federate_by_runner, population, rows_of_run

    flat, _ = resolve(None, dict(tiny_config, **FAST, **{"eval.per-round": False, "eval.local-baseline": True,
                                                         "server.num-rounds": 1}))
    cfg = load_config(flat, env=False)
    users = population(cfg, Path(cfg.run.state_dir) / "pop")
    run = federate_by_runner(cfg, flat, users, Path(cfg.run.state_dir) / "row")
    assert [r["user-id"] for r in run.rows] == [u.user_id for u in users]
    for r in run.rows:  # one round of 3 of the 4 users: the fourth never trained (epsilon 0)
        assert 0 <= r["epsilon"] <= 8.0 + 1e-6 and r["user-epsilon"] == 0.0
        assert {"base-loss", "shared-loss", "personal-loss", "local-loss"} <= set(r)
    assert sum(r["epsilon"] > 0 for r in run.rows) == 3
    parts = rows_of_run("apps", run, {r["user-id"]: r["base-loss"] for r in run.rows})
    assert [p["row"] for p in parts] == ["apps: shared", "apps: personalized", "apps: local-only"]


def test_the_prompt_head_is_a_row_of_the_study(tiny_config):
    """`--vary adapter.head=prompt`: the soft-prompt head measured beside the LoRA head, on the same users."""
    result = study(None, dict(tiny_config, **FAST), epsilons=(8.0,), quick=True, central_steps=1,
                   vary=["adapter.head=prompt"], attribution_users=False, rows=("device",))
    rows = {r["row"]: r for r in result["table"]}
    label = "DP on each device, eps=8, adapter.head=prompt"
    assert result["varied"] == [{"key": "adapter.head", "value": "prompt", "label": label,
                                 "on": "DP on each device, eps=8"}]
    for part in ("shared", "personalized", "local-only"):
        assert math.isfinite(rows[f"{label}: {part}"]["mean"]), part
    assert rows[f"{label}: personalized"]["mean"] != rows["DP on each device, eps=8: personalized"]["mean"]
    assert 0 < rows[f"{label}: personalized"]["epsilon"] <= 8.0 + 1e-6


def test_vary_applies_to_the_chosen_row(tiny_config):
    """`--vary server.lr=... --vary-row nodp`: the server's step swept on another row kind."""
    result = study(None, dict(tiny_config, **FAST), epsilons=(8.0,), quick=True, central_steps=1,
                   vary=["server.optimizer=fedadam"], vary_row="nodp", attribution_users=False, rows=())
    assert [v["label"] for v in result["varied"]] == ["federated, no DP, server.optimizer=fedadam"]
    (s,) = result["summary"]
    assert s["row"] == "federated, no DP, server.optimizer=fedadam" and s["status"] == "ok" and s["unit"] == "none"
    assert math.isfinite(s["shared"]) and s["epsilon"] == math.inf


def test_attribution_of_a_finished_run(tiny_config):
    """`fedpersona bench attribution`: each user's head fitted to its own held-out replies ranks them first."""
    import pytest

    from fedpersona.client.device import HEAD_FILE, prepare_user
    from fedpersona.client.store import DeviceStore
    from fedpersona.client.train import train_head, trainer_for
    from fedpersona.model import adapted_model
    from fedpersona.server.checkpoint import save_checkpoint
    from fedpersona.simulations.partitions import simulated_state_dir
    from fedpersona.simulations.runner import resolve
    from fedpersona.simulations.sources import load_source
    from fedpersona.simulations.studies.utility import finished_run_attribution

    overrides = dict(tiny_config, **{"data.max-users": 4})
    _, cfg = resolve(None, overrides)
    with pytest.raises(ValueError, match="No checkpoint"):
        finished_run_attribution(None, overrides)
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    model.load_shared_state(model.initial_shared_state())
    users = load_source(cfg.data, cfg.run.seed)
    save_checkpoint(Path(cfg.run.results_dir) / cfg.run.name / "checkpoints", 1,
                    model.initial_shared_state(), {})
    for u in users[:3]:  # the fourth user never trained: no head
        data = prepare_user(model, cfg, u.user_id, [(e.cue, e.reply) for e in u.examples])
        model.load_personal_state(model.fresh_personal_state())
        train_head(trainer_for(model), data.held_out, steps=40, batch_size=4, lr=0.05, optimizer="adam",
                   noise_multiplier=0.0, max_grad_norm=1.0, dp=False, seed=0)
        DeviceStore(simulated_state_dir(cfg, u.user_id)).save_tensors(HEAD_FILE, model.personal_state())
    r = finished_run_attribution(None, overrides)
    assert r["without_head"] == 1 and r["round"] == 1 and r["chance"] == pytest.approx(1 / 4)
    assert [r["ranks"][u.user_id] for u in users[:3]] == [1, 1, 1], r["ranks"]
    assert 1 <= r["ranks"][users[3].user_id] <= 4
    assert r["top1"] >= 0.75 and r["ratio_to_chance"] == pytest.approx(r["top1"] * 4)
    saved = json.loads((Path(cfg.run.results_dir) / cfg.run.name / "attribution.json").read_text())
    assert saved["ranks"] == r["ranks"]


def test_the_study_scenario_holds_ten_thousand_training_records():
    """simulations/conf/study.toml: at least 10,000 training records across its users, delta below 1/n."""
    from fedpersona.client.data import split_examples
    from fedpersona.simulations.runner import resolve
    from fedpersona.simulations.sources import load_source

    _, cfg = resolve("study", {})
    users = load_source(cfg.data, cfg.run.seed)
    sizes = [len(split_examples(list(range(min(len(u.examples), cfg.data.max_examples))),
                                eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, key=u.user_id)[0])
             for u in users]
    assert len(users) == 103 and sum(sizes) == 10_368 and min(sizes) == 64
    assert max(len(u.examples) for u in users) <= cfg.data.max_examples  # every speech of every user
    assert cfg.privacy.delta < 1 / min(sizes)
    # Balanced sampling: no device is asked more often than it planned its noise for.
    assert max_participations(cfg, len(users)) == cfg.privacy.planned_rounds == 4
