"""The utility study (`fedpersona bench utility --quick`) on the tiny model: every row, the files, attribution."""

import csv
import json
import math
from pathlib import Path

from simulations.utility import format_table, study


def test_quick_study_writes_every_row(tiny_config):
    overrides = dict(tiny_config, **{"client.head-steps": 2, "data.max-examples": 12, "privacy.delta": 1e-2,
                                     "data.max-users": 4, "privacy.noise-multiplier": 1.0})  # no calibration: fast
    result = study(None, overrides, epsilons=(8.0,), quick=True, central_steps=2)
    names = [r["row"] for r in result["table"]]
    for expected in ("base", "central (pooled, no DP)", "federated, no DP: shared", "federated, no DP: personalized",
                     "federated, no DP: local-only", "DP federated, eps=8: personalized", "DP federated, eps=8: shared",
                     "DP federated, eps=8: local-only"):
        assert expected in names
    rows = {r["row"]: r for r in result["table"]}
    assert rows["base"]["gain"] == 0.0
    assert math.isclose(rows["federated, no DP: personalized"]["recovered"], 1.0)
    for r in result["table"]:
        assert math.isfinite(r["mean"]) and r["users"] == len(result["users"])
    # Each DP row stays within its budget; local-only spends the same epsilon as the device.
    for eps in (8.0,):
        row = rows[f"DP federated, eps={eps:g}: personalized"]
        assert 0 < row["epsilon"] <= eps + 1e-6
        assert 0 < rows[f"DP federated, eps={eps:g}: local-only"]["epsilon"] <= eps + 1e-6
    a = result["attribution"]["federated, no DP"]
    assert set(a["ranks"]) == set(result["users"]) and a["chance"] == 1 / len(result["users"])
    assert all(1 <= r <= len(result["users"]) for r in a["ranks"].values())
    files = result["files"]
    doc = json.loads(open(files["json"]).read())
    assert doc["table"][0]["row"] == "base"
    with open(files["csv"]) as fh:
        assert [r["row"] for r in csv.DictReader(fh)] == names
    assert open(files["png"], "rb").read(4) == b"\x89PNG"
    assert "DP federated, eps=8: personalized" in format_table(result["table"])


def test_the_prompt_head_is_a_row_of_the_study(tiny_config):
    """`--vary adapter.head=prompt`: the soft-prompt head measured beside the LoRA head, on the same users."""
    overrides = dict(tiny_config, **{"client.head-steps": 2, "data.max-examples": 12, "privacy.delta": 1e-2,
                                     "data.max-users": 4, "privacy.noise-multiplier": 1.0})
    result = study(None, overrides, epsilons=(8.0,), quick=True, central_steps=1, vary=["adapter.head=prompt"],
                   attribution_users=False)
    rows = {r["row"]: r for r in result["table"]}
    label = "DP federated, eps=8, adapter.head=prompt"
    assert result["varied"] == [{"key": "adapter.head", "value": "prompt", "label": label}]
    for part in ("shared", "personalized", "local-only"):
        assert math.isfinite(rows[f"{label}: {part}"]["mean"]), part
    assert rows[f"{label}: personalized"]["mean"] != rows["DP federated, eps=8: personalized"]["mean"]
    assert 0 < rows[f"{label}: personalized"]["epsilon"] <= 8.0 + 1e-6


def test_attribution_of_a_finished_run(tiny_config):
    """`fedpersona bench attribution`: each user's head fitted to its own held-out replies ranks them first."""
    import pytest

    from client.device import HEAD_FILE, prepare_user
    from client.store import DeviceStore
    from client.train import train_head, trainer_for
    from fedpersona.model import adapted_model
    from server.checkpoint import save_checkpoint
    from simulations.partitions import simulated_state_dir
    from simulations.runner import resolve
    from simulations.sources import load_source
    from simulations.utility import finished_run_attribution

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
