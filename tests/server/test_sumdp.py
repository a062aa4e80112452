"""Noise on the sum end to end: the real ServerApp loop (fedpersona.server.federation) and ClientApps (mods included) on an
in-process grid, secure aggregation on, the tests' tiny model."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.device import LEDGER, PARTICIPATION
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from fedpersona.model import adapted_model
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.secagg.quantize import Quantizer
from fedpersona.privacy.secagg.server_side import SecAggRound
from fedpersona.privacy.sumdp import sum_secagg_params
from fedpersona.server.checkpoint import latest_checkpoint
from fedpersona.server.federation import run_federation
from fedpersona.simulations.inprocess import InProcessGrid
from tests.adversarial.helpers import user_folders
from tests.privacy.audit_helpers import one_thread

NAMES = ("alice", "bob", "carol", "dave")


def sum_config(tiny_config: dict, **over) -> dict:
    flat = dict(tiny_config, **{"data.max-examples": 12, "privacy.delta": 1e-2, "server.clients-per-round": 4,
                                "server.min-clients": 2, "server.num-rounds": 1, "client.local-steps": 2,
                                "eval.final": False, "eval.local-baseline": False, "privacy.noise-multiplier": 1.0,
                                "privacy.noise-on": "sum", "privacy.honest-contributors": 2, "server.lr": 0.5,
                                "run.name": "sum"})
    flat.update(over)
    return flat


def nodes_for(tmp_path, **policy) -> dict[int, dict]:
    nodes = user_folders(tmp_path, NAMES)
    for nc in nodes.values():
        nc["policy.min-contributors"] = 2  # t = 2 of a cohort of 4 (the default floor is 3)
        nc.update({f"policy.{k}": v for k, v in policy.items()})
    return nodes


class DroppingGrid(InProcessGrid):
    """Loses the replies of ``drop`` nodes to ``message_type`` messages (the device answered, the reply is lost)."""

    def __init__(self, *args, drop: set[int] = frozenset(), message_type: str = "train.dp_step", **kw):
        super().__init__(*args, **kw)
        self.drop, self.kind = set(drop), message_type
        self.sent: list[tuple[str, int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append((m.metadata.message_type, m.metadata.dst_node_id))
            reply = self._deliver(m)
            if not (m.metadata.message_type == self.kind and m.metadata.dst_node_id in self.drop):
                out.append(reply)
        return out


def federate(flat: dict, nodes: dict[int, dict], *, run_id: int = 777, grid_cls=InProcessGrid, **grid_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        with grid_cls(client_app.app, nodes, flat, run_id=run_id, **grid_kw) as grid, one_thread():
            return run_federation(grid, cfg), grid, cfg
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()


def ledger_of(nc: dict) -> PrivacyLedger:
    return PrivacyLedger.from_json(DeviceStore(nc["state-dir"]).load_text(LEDGER))


def test_the_servers_sum_is_the_sum_of_the_devices_noised_quantized_gradient_sums(tiny_config, tmp_path, monkeypatch):
    quantized: list[np.ndarray] = []
    results = []
    grads: list[np.ndarray] = []
    real_quantize, real_finish = Quantizer.quantize, SecAggRound.finish

    def quantize(self, update, rng):
        q = real_quantize(self, update, rng)
        quantized.append(q.copy())
        grads.append(np.asarray(update, dtype=np.float64).copy())
        return q

    def finish(self):
        results.append(real_finish(self))
        return results[-1]

    monkeypatch.setattr(Quantizer, "quantize", quantize)
    monkeypatch.setattr(SecAggRound, "finish", finish)
    nodes = nodes_for(tmp_path)
    metrics, grid, cfg = federate(sum_config(tiny_config), nodes)
    (row,) = metrics["rounds"]
    assert row["steps-applied"] == 2 and row["survivors-min"] == 4 and row["personalized"] == 4
    assert row["noise-on"] == "sum" and row["honest-contributors"] == 2
    assert len(results) == 2 and len(quantized) == 8
    for i, res in enumerate(results):
        mine = quantized[4 * i:4 * i + 4]
        dim = mine[0].size
        # Exactly: the unmasked integer sum is the sum of the four devices' quantized, noised vectors.
        np.testing.assert_array_equal(res.int_sum[:dim], np.sum(mine, axis=0))
        # And it carries the four devices' noise: the residual around s * (sum of clipped gradient sums).
        params = sum_secagg_params(cfg, cohort=4, dim=dim)
        residual = res.int_sum[:dim] - params.scale * np.sum(grads[4 * i:4 * i + 4], axis=0)
        assert params.noise_stddev == pytest.approx(1.0 * (params.scale + math.sqrt(dim)) / math.sqrt(2), rel=1e-6)
        assert np.std(residual) == pytest.approx(math.sqrt(4) * params.noise_stddev, rel=0.25)
    # Every device accounted both steps on the sum with its own q, t = 2, integer orders.
    for nc in nodes.values():
        ledger = ledger_of(nc)
        assert ledger.sum_steps and sum(n for *_, n in ledger.sum_steps) == 2
        assert {t for _, _, t, _ in ledger.sum_steps} == {2} and ledger.orders == "integer"
        assert ledger.plan["noise_on"] == "sum" and ledger.rounds[-1]["steps"] == 2
        part = json.loads(DeviceStore(nc["state-dir"]).load_text(PARTICIPATION))
        assert [{k: v for k, v in e.items() if k != "run"} for e in part] == [
            {"round": 1, "steps": 2, "head-steps": cfg.client.head_steps, "mode": "sum"}]
    # What left each device passes the data-flow inventory's checks: masked vectors, protocol fields, a status.
    from fedpersona.client.flow_log import read_inventory
    from fedpersona.privacy.audit.inventory import verify_inventory

    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    check = verify_inventory({n: read_inventory(nc["state-dir"]) for n, nc in nodes.items()},
                             personal_names=model.personal_names, shared_names=model.shared_names)
    assert check.ok, check.violations[:3]
    kinds = {ln["message_type"] for nc in nodes.values() for ln in read_inventory(nc["state-dir"])}
    assert kinds == {"query.advertise", "train.dp_step", "query.consistency", "query.unmask", "train.personalize"}
    # The head was trained on the round's final shared adapter, and the server stepped: the shared weights moved.
    _, shared, _ = latest_checkpoint(tmp_path / "results" / "sum" / "checkpoints")
    init = model.initial_shared_state()
    assert any(not torch.equal(shared[n], init[n]) for n in init)


def test_zero_noise_and_a_huge_clip_equal_plain_full_batch_sgd_on_the_sum(tiny_config, tmp_path):
    # The Opacus #820-style check: no noise, no clipping, every example in the batch (q = 1): one server
    # step must be plain SGD on the pooled examples' mean gradient (normalizer survivors x batch size).
    flat = sum_config(tiny_config, **{"privacy.enabled": False, "privacy.max-grad-norm": 1e6, "client.batch-size": 64,
                                      "client.local-steps": 1, "secagg.scale": 2.0**20, "client.head-steps": 0})
    nodes = nodes_for(tmp_path, **{"allow-no-dp": True})
    metrics, grid, cfg = federate(flat, nodes)
    assert metrics["rounds"][0]["steps-applied"] == 1
    _, shared, _ = latest_checkpoint(tmp_path / "results" / "sum" / "checkpoints")
    # The same step by plain autograd on every device's training examples, pooled.
    client_app._DEVICES.clear()
    from fedpersona.client.device import Device

    model = None
    total = None
    examples = 0
    for nc in nodes.values():
        device = Device(cfg, nc)
        device.trainer.gsm.disable_hooks()  # plain autograd: no Opacus per-sample hooks
        model = device.model
        model.load_shared_state(model.initial_shared_state())
        named = model.named_trainable()
        with model.personal_zeroed():
            for ex in device.data.train:
                model.peft.zero_grad(set_to_none=True)
                from fedpersona.model import collate

                hidden, labels = collate([ex.hidden], [ex.labels])
                loss = model.stack(hidden, labels).sum()
                grads = torch.autograd.grad(loss, [named[n] for n in model.shared_names])
                g = {n: t.detach() for n, t in zip(model.shared_names, grads)}
                total = g if total is None else {n: total[n] + g[n] for n in g}
                examples += 1
    init = model.initial_shared_state()
    expected = {n: init[n] - cfg.server.lr * total[n] / (4 * 64) for n in init}
    for n in init:
        torch.testing.assert_close(shared[n], expected[n], rtol=1e-4, atol=1e-6)
        assert torch.isfinite(shared[n]).all()
    assert any(not torch.equal(shared[n], init[n]) for n in init)
    # A release without noise: every device's ledger is infinite for good.
    assert all(math.isinf(ledger_of(nc).epsilon(1e-2)) for nc in nodes.values())
    assert examples == 4 * 9


def test_a_step_with_fewer_than_t_survivors_aborts_before_any_unmask(tiny_config, tmp_path):
    # Two of four replies lost after the devices masked (and accounted) their step: 2 survivors < the
    # round's minimum (t and secagg.min-contributors = 3): aborted, not applied, no later step asked for.
    nodes = nodes_for(tmp_path)
    metrics, grid, cfg = federate(sum_config(tiny_config), nodes, grid_cls=DroppingGrid, drop={21, 22})
    (row,) = metrics["rounds"]
    assert row["steps-applied"] == 0 and row["steps-aborted"] == 1 and "before any unmask" in row["aborted"]
    assert not row["applied"]
    assert not [t for t, _ in grid.sent if t == "query.unmask"]
    assert sum(1 for t, _ in grid.sent if t == "train.dp_step") == 4  # step 2 never asked for
    _, shared, _ = latest_checkpoint(tmp_path / "results" / "sum" / "checkpoints")
    init = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed).initial_shared_state()
    assert all(torch.equal(shared[n], init[n]) for n in init)
    # Every device that answered accounted the aborted step (the lost replies included).
    assert all(sum(n for *_, n in ledger_of(nc).sum_steps) == 1 for nc in nodes.values())


def test_local_only_is_a_federation_of_one_with_the_same_epsilon(tiny_config, tmp_path, monkeypatch):
    import functools

    import fedpersona.client.device as device_module

    # The local-only baseline runs on simulated devices only: these deployment-style nodes are marked simulated.
    monkeypatch.setattr(device_module.Device, "__init__",
                        functools.partialmethod(device_module.Device.__init__, simulated=True))
    flat = sum_config(tiny_config, **{"eval.final": True, "eval.local-baseline": True})
    nodes = nodes_for(tmp_path)
    federate(flat, nodes)
    for nc in nodes.values():
        store = DeviceStore(nc["state-dir"])
        row = json.loads(store.load_text("evaluation"))
        fed = ledger_of(nc)
        local = PrivacyLedger.from_json(store.load_text("ledger-local-baseline"))
        # The same (sigma, q) steps, t = 1 in the local-only ledger (its own sums): the same epsilon.
        assert local.history == fed.history and {t for _, _, t, _ in local.sum_steps} == {1}
        assert row["local-epsilon"] == pytest.approx(row["epsilon-federated"]) and row["epsilon-federated"] > 0
        assert row["planned-participations"] == 1.0 and row["planned-epsilon"] >= row["epsilon-federated"]
        # One budget per user: the two ledgers composed (the baseline replays the same records).
        assert row["epsilon"] > row["epsilon-federated"]
        assert math.isfinite(row["local-loss"]) and math.isfinite(row["personal-loss"])
