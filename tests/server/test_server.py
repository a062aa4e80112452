import json
import math

import pytest
import torch

from fedpersona.server.checkpoint import latest_checkpoint, save_checkpoint
from fedpersona.server.federation import sample_cohort
from fedpersona.server.optim import ServerOptimizer
from fedpersona.server.run_report import distribution, summarize_users, summary_table, write_outputs


def test_checkpoint_round_trip_and_latest(tmp_path):
    shared = {"a.lora_B.shared.weight": torch.randn(3, 2)}
    save_checkpoint(tmp_path, 1, shared, {})
    shared2 = {"a.lora_B.shared.weight": torch.randn(3, 2)}
    save_checkpoint(tmp_path, 2, shared2, {"m::a": torch.ones(3, 2)})
    r, s, opt = latest_checkpoint(tmp_path)
    assert r == 2
    torch.testing.assert_close(s["a.lora_B.shared.weight"], shared2["a.lora_B.shared.weight"])
    torch.testing.assert_close(opt["m::a"], torch.ones(3, 2))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(2)}, {})
    half = tmp_path / "round-0002"
    half.mkdir()
    (half / "server_state.safetensors").write_bytes(b"partial")  # no round.json: a crash mid-write
    assert latest_checkpoint(tmp_path)[0] == 1
    assert latest_checkpoint(tmp_path / "nothing") is None
    assert not list(tmp_path.glob(".round-*")), "temporary folders are cleaned up"


def test_fedavg_and_fedadam():
    shared = {"w": torch.zeros(4)}
    upd = {"w": torch.tensor([1.0, -1.0, 0.5, 0.0])}
    torch.testing.assert_close(ServerOptimizer("fedavg", 0.5).step(shared, upd)["w"], 0.5 * upd["w"])
    adam = ServerOptimizer("fedadam", 0.1)
    out = adam.step(shared, upd)
    # first Adam step moves each coordinate by about lr * sign(update)
    assert torch.all(torch.sign(out["w"]) == torch.sign(upd["w"]))
    again = ServerOptimizer("fedadam", 0.1)
    again.load_state_dict(adam.state_dict())
    torch.testing.assert_close(again.step(out, upd)["w"], adam.step(out, upd)["w"])
    with pytest.raises(ValueError, match="server.optimizer"):
        ServerOptimizer("sgd", 1.0)


def test_cohort_sampling_is_seeded():
    nodes = list(range(100, 120))
    a = sample_cohort(nodes, 8, seed=1, server_round=3)
    assert a == sample_cohort(nodes, 8, seed=1, server_round=3)
    assert a != sample_cohort(nodes, 8, seed=1, server_round=4)
    assert len(set(a)) == 8 and set(a) <= set(nodes)
    assert len(sample_cohort(nodes[:3], 8, seed=0, server_round=1)) == 3


def test_balanced_sampling_serves_every_node_before_any_twice():
    for n, k in [(20, 8), (7, 3), (10, 10), (13, 4), (5, 8)]:
        nodes = list(range(1000, 1000 + n))
        rounds = [sample_cohort(nodes, k, seed=3, server_round=r, sampling="balanced") for r in range(1, 25)]
        assert all(len(set(c)) == min(k, n) and set(c) <= set(nodes) for c in rounds)
        first = -(-n // min(k, n))
        assert set().union(*rounds[:first]) == set(nodes), (n, k)  # every node within ceil(n / k) rounds
        for r in range(1, len(rounds) + 1):
            counts = [sum(node in c for c in rounds[:r]) for node in nodes]
            assert max(counts) - min(counts) <= 2, (n, k, r, counts)
        assert rounds[2] == sample_cohort(nodes, k, seed=3, server_round=3, sampling="balanced")  # stateless
    nodes = list(range(20))
    walk = [sample_cohort(nodes, 8, seed=0, server_round=r, sampling="balanced") for r in (1, 2, 3)]
    uniform = [sample_cohort(nodes, 8, seed=0, server_round=r) for r in (1, 2, 3)]
    assert len(set().union(*walk)) == 20 and len(set().union(*uniform)) < 20  # the demo's 3 rounds of 8 of 20
    assert walk != [sample_cohort(nodes, 8, seed=1, server_round=r, sampling="balanced") for r in (1, 2, 3)]
    with pytest.raises(ValueError, match="server.sampling"):
        sample_cohort(nodes, 8, seed=0, server_round=1, sampling="round-robin")


def test_distribution_worst_decile():
    d = distribution([float(x) for x in range(1, 21)])
    assert d["mean"] == 10.5 and d["median"] == 10.5
    assert d["worst_decile"] == 19.5  # mean of the worst 2 of 20
    assert math.isnan(distribution([])["mean"])


def test_outputs_written(tmp_path):
    users = [
        {"user": "A (X)", "base-loss": 4.0, "shared-loss": 3.5, "personal-loss": 3.0, "local-loss": 3.8,
         "epsilon": 2.0, "rounds": 2.0, "base-accuracy": 0.1, "shared-accuracy": 0.2, "personal-accuracy": 0.3,
         "local-accuracy": 0.15},
        {"user": "B (Y)", "base-loss": 5.0, "shared-loss": 4.5, "personal-loss": 4.0, "local-loss": 4.8,
         "epsilon": 1.0, "rounds": 1.0, "base-accuracy": 0.1, "shared-accuracy": 0.2, "personal-accuracy": 0.3,
         "local-accuracy": 0.15},
    ]
    summary = summarize_users(users)
    metrics = {"rounds": [{"round": 1, "train-loss": 3.0, "heldout-shared-loss": 4.0, "epsilon": 1.0}],
               "final": {"users": users, "summary": summary}}
    paths = write_outputs(tmp_path, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["final"]["summary"]["personal-loss"]["mean"] == 3.5
    assert (tmp_path / "users.csv").read_text().count("\n") == 3
    assert paths["rounds_plot"].stat().st_size > 1000 and paths["users_plot"].stat().st_size > 1000
    table = summary_table(users, summary)
    assert "A (X)" in table and "worst decile" in table
