"""End to end through the real Flower Simulation Engine (`--engine flower`): tiny model, 4 Shakespeare users, 2 rounds, then a resume."""

import json
from pathlib import Path

import pytest

from fedpersona.client.node_data import slug
from fedpersona.client.store import DeviceStore
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.runner import run


def test_simulation_four_users_two_rounds_then_resume(tiny_config):
    flat = dict(tiny_config, **{"eval.local-baseline": True})
    metrics = run(None, flat, cpus=1, engine="flower")
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert metrics["aggregation"] == "secagg+" and metrics["warnings"] == []  # secure aggregation is the default
    for r in rounds:
        assert r["failed"] == 0, r
        assert r["contributors"] == 3 and r["applied"]
        assert r["update-norm"] > 0
        assert r["secagg-survivors"] == 3 and "aborted" not in r
    run_dir = Path(flat["run.results-dir"]) / "demo"
    for i in (1, 2):
        ckpt = run_dir / "checkpoints" / f"round-{i:04d}"
        assert (ckpt / "shared" / "adapter_config.json").is_file()
        assert (ckpt / "shared" / "adapter_model.safetensors").is_file()
    users = metrics["final"]["users"]
    assert len(users) == 4
    expected = {u.user_id for u in load_users(min_speeches=40, max_users=4, seed=0)}
    assert {u["user"] for u in users} == expected
    for u in users:
        for k in ("base-loss", "shared-loss", "personal-loss", "local-loss"):
            assert u[k] > 0
        assert 0 <= u["epsilon"] <= 8.0
        if u["rounds"] > 0:
            assert u["epsilon"] > 0
            assert abs(u["local-epsilon"] - u["epsilon-federated"]) < 1e-6, "the baseline replays the same DP steps"
            # One budget per user: the two mechanisms composed, within the budget the device planned for both.
            assert u["epsilon-federated"] < u["epsilon"] <= 8.0 + 1e-9
    for name in ("metrics.json", "rounds.csv", "users.csv", "rounds.png", "users.png", "summary.txt"):
        assert (run_dir / name).is_file(), name

    # Resume: one more round continues from the round-2 checkpoint and composes epsilon.
    before = {u["user"]: u["epsilon-federated"] for u in users}
    metrics2 = run(None, dict(flat, **{"server.num-rounds": 3}), cpus=1, engine="flower")
    assert [r["round"] for r in metrics2["rounds"]] == [1, 2, 3]
    after = {u["user"]: u["epsilon-federated"] for u in metrics2["final"]["users"]}
    assert all(after[u] >= before[u] for u in before)
    assert any(after[u] > before[u] for u in before)
    for u in expected:
        text = DeviceStore(Path(flat["run.state-dir"]) / "demo" / slug(u)).load_text("ledger")
        if text:
            ledger = PrivacyLedger.from_json(text)
            assert ledger.epsilon(flat["privacy.delta"]) == pytest.approx(after[u])
