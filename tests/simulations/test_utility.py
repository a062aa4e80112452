"""The utility study (`fedpersona bench utility --quick`) on the tiny model: every row, the files, attribution."""

import csv
import json
import math

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
