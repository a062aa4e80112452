"""Noise on the sum, as a dishonest server would try it: through the real ServerApp loop and ClientApps.

A device adds only a t-th of the noise to its share, so a server that could make it believe in more
honest contributors, less noise, or answer the same step twice would get a record's gradient with too
little noise. Every attempt here must be refused by the device, by name, and leave its ledger as it was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from flwr.app import ConfigRecord, RecordDict

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
import fedpersona.server.sumdp as server_sumdp
from fedpersona.client.device import LEDGER
from fedpersona.client.flow_log import read_inventory
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from fedpersona.model import adapted_model
from fedpersona.wire import pack_shared
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.server.secagg import SecureAggregator
from fedpersona.simulations.inprocess import InProcessGrid
from tests.privacy.audit_helpers import one_thread
from tests.server.test_sumdp import federate, nodes_for, sum_config


def steps_of(nc: dict) -> int:
    text = DeviceStore(nc["state-dir"]).load_text(LEDGER)
    return 0 if text is None else PrivacyLedger.from_json(text).total_steps


def reasons(nodes: dict, kind: str = "train.dp_step") -> list[str]:
    return [ln["error"]["reason"] for nc in nodes.values() for ln in read_inventory(nc["state-dir"])
            if ln["message_type"] == kind and ln["reply"] == "error"]


@pytest.mark.parametrize("field, value, key", [("noise_multiplier", 0.25, "privacy.noise-multiplier"),
                                               ("honest", 4, "privacy.honest-contributors"),
                                               ("clip", 100.0, "privacy.max-grad-norm")])
def test_a_forged_noise_parameter_is_refused_by_every_device(tiny_config, tmp_path, monkeypatch, field, value, key):
    real = server_sumdp.sum_context

    def forged(*args, **kw):  # the server claims less noise per share (or more honest devices, a larger clip)
        return dataclasses.replace(real(*args, **kw), **{field: value})

    monkeypatch.setattr(server_sumdp, "sum_context", forged)
    nodes = nodes_for(tmp_path)
    metrics, _, _ = federate(sum_config(tiny_config), nodes)
    assert metrics["rounds"][0]["steps-applied"] == 0
    got = reasons(nodes)
    assert len(got) == 4 and all(f"PolicyViolation: the device's privacy policy refuses {key}" in r for r in got)
    assert all(steps_of(nc) == 0 for nc in nodes.values())


def test_a_repeated_step_is_never_answered_twice(tiny_config, tmp_path, monkeypatch):
    # The server asks for step 1 twice at the same weights (to average the noise away).
    monkeypatch.setattr(server_sumdp, "range", lambda a, b: [1, 1], raising=False)
    nodes = nodes_for(tmp_path)
    metrics, _, _ = federate(sum_config(tiny_config), nodes)
    (row,) = metrics["rounds"]
    assert row["steps-applied"] == 1 and row["steps-aborted"] == 1
    assert len(reasons(nodes)) == 4 and all("StepRefused" in r for r in reasons(nodes))
    assert all(steps_of(nc) == 1 for nc in nodes.values())


def test_a_rolled_back_round_is_refused(tiny_config, tmp_path):
    # The server runs round 1 again in the same run (its results wiped): the devices refuse it.
    nodes = nodes_for(tmp_path)
    flat = sum_config(tiny_config)
    federate(flat, nodes, run_id=31)
    before = {n: steps_of(nc) for n, nc in nodes.items()}
    assert set(before.values()) == {2}
    shutil.rmtree(tmp_path / "results")
    metrics, _, _ = federate(flat, nodes, run_id=31)
    assert metrics["rounds"][0]["steps-applied"] == 0
    assert {n: steps_of(nc) for n, nc in nodes.items()} == before
    assert any("StepRefused" in r for r in reasons(nodes))


def test_t_below_the_devices_floor_is_refused(tiny_config, tmp_path):
    nodes = nodes_for(tmp_path)
    for nc in nodes.values():
        nc.pop("policy.min-contributors")  # the default floor, 3: above the run's t = 2
    metrics, _, _ = federate(sum_config(tiny_config), nodes)
    got = reasons(nodes)
    assert len(got) == 4 and all("privacy.honest-contributors = 2" in r and "policy.min-contributors = 3" in r
                                 for r in got)
    assert all(steps_of(nc) == 0 for nc in nodes.values())


def test_a_local_round_is_refused_when_the_noise_is_meant_for_the_sum(tiny_config, tmp_path):
    # The server asks for today's local round (several DP steps) under a config that calibrates the noise for
    # a sum: a device would add a t-th of the noise per step to a trajectory that depends on its records.
    nodes = nodes_for(tmp_path)
    flat = sum_config(tiny_config)
    cfg = load_config(flat, env=False)
    shared = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed).initial_shared_state()
    content = RecordDict({**pack_shared(shared), "config": ConfigRecord({"server-round": 1})})
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        with InProcessGrid(client_app.app, nodes, flat, run_id=41) as grid, one_thread():
            rs = SecureAggregator(cfg, run_id=41).collect(grid, sorted(nodes), content, server_round=1, timeout=None)
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()
    assert rs.contributors == 0 and rs.update_sum == {}
    got = reasons(nodes, "train")
    assert len(got) == 4 and all("refuses privacy.noise-on = 'sum'" in r for r in got)
    assert all(steps_of(nc) == 0 for nc in nodes.values())


def test_a_step_without_secure_aggregation_is_refused(tiny_config, tmp_path):
    nodes = nodes_for(tmp_path)
    flat = sum_config(tiny_config)
    cfg = load_config(flat, env=False)
    shared = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed).initial_shared_state()
    ctx = server_sumdp.sum_context(cfg, round=1, step=1, cohort=4, weights=shared)
    content = RecordDict({**pack_shared(shared), "config": ConfigRecord({"server-round": 1, "step": 1}),
                          "sum-context": ConfigRecord(ctx.to_record())})
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        with InProcessGrid(client_app.app, nodes, flat, run_id=42) as grid, one_thread():
            from flwr.app import Message

            replies = grid.send_and_receive([Message(content, n, "train.dp_step", group_id="1") for n in nodes])
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()
    assert all(r.has_error() and "refuses secagg.enabled" in r.error.reason for r in replies)
    assert all(steps_of(nc) == 0 for nc in nodes.values())
    assert json.dumps([ln["rows"] for nc in nodes.values() for ln in read_inventory(nc["state-dir"])]) == "[[], [], [], []]"
