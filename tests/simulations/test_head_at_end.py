"""``client.head-at = end``: every device's head trained once, after the last round, on the run's final shared adapter;
the local-only baseline trains its head the same way on its own adapter. A server that asks again, or mid-run, is
refused."""

import json

import pytest
import torch

from fedpersona.client.device import BASELINE, HEAD_AT_END, HEAD_FILE, RECEIVED_SHARED, Device
from fedpersona.client.store import DeviceStore
from fedpersona.client.sumdp import StepRefused
from fedpersona.config import load_config
from fedpersona.server.checkpoint import latest_checkpoint
from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.simulations.runner import resolve, run


@pytest.mark.parametrize("noise_on", ["sum", "device"])
def test_heads_are_trained_once_on_the_final_shared_adapter(tiny_config, tmp_path, noise_on):
    overrides = dict(tiny_config, **{"privacy.noise-on": noise_on, "server.clients-per-round": 4,
                                     "client.head-at": "end", "client.head-steps": 2, "eval.local-baseline": True})
    if noise_on == "sum":
        overrides.update({"privacy.noise-multiplier": 1.0, "server.lr": 0.5})
    metrics = run(None, overrides, engine="auto", device_policy={"min-contributors": 2})
    flat, cfg = resolve(None, overrides)
    assert metrics["head-at-end"]["nodes"] == 4 and metrics["head-at-end"]["personalized"] == 4
    assert metrics["head-at-end"]["failures"] == 0
    if noise_on == "sum":  # no head trained after a round: no personalize exchange in the rounds
        assert [r["personalized"] for r in metrics["rounds"]] == [0, 0]
    users = metrics["final"]["users"]
    assert len(users) == 4 and all(u["rounds"] == 2 and u["head-steps"] == 2 for u in users)
    assert all(abs(u["local-epsilon"] - u["epsilon-federated"]) < 1e-9 for u in users)
    rnd, final_shared, _ = latest_checkpoint(tmp_path / "results" / "demo" / "checkpoints")
    assert rnd == 2
    fresh = None
    for u in users:
        store = DeviceStore(simulated_state_dir(cfg, u["user"]))
        participation = json.loads(store.load_text("participation"))
        assert [p["head-steps"] for p in participation] == [0, 0]  # none in the rounds
        end = json.loads(store.load_text(HEAD_AT_END))
        assert end["round"] == 3 and end["steps"] == 2
        received = store.load_tensors(RECEIVED_SHARED)  # the head's shared adapter: the run's final one
        assert set(received) == set(final_shared)
        assert all(torch.equal(received[k], final_shared[k]) for k in final_shared)
        device = Device(load_config(flat, env=False), {"partition-id": _partition(cfg, u["user"])})
        fresh = fresh or device.model.fresh_personal_state()
        head = store.load_tensors(HEAD_FILE)
        assert any(not torch.equal(head[k], fresh[k]) for k in fresh)  # trained
        baseline = store.load_tensors(BASELINE)  # the local-only model's head: trained at its end too
        assert any(not torch.equal(baseline[f"personal::{k}"], fresh[k]) for k in fresh)
        # A dishonest server asking for another head pass (again at the end, or in a round) is refused; the head
        # stays what it was.
        tag = store.tag(HEAD_FILE)
        for server_round in (3, 1, 2, 4):
            with pytest.raises(StepRefused):
                device.personalize(final_shared, run_id=end["run"], server_round=server_round)
        assert store.tag(HEAD_FILE) == tag


def _partition(cfg, user: str) -> int:
    from fedpersona.client.node_data import manifest_path

    nodes = json.loads(manifest_path(cfg).read_text())["nodes"]
    return next(int(pid) for pid, entry in nodes.items() if entry["user-id"] == user)


def test_head_at_must_be_round_or_end():
    assert load_config({"client.head-at": "end"}, env=False).client.head_at == "end"
    assert load_config({}, env=False).client.head_at == "round"
    with pytest.raises(ValueError, match="client.head-at"):
        load_config({"client.head-at": "final"}, env=False)
