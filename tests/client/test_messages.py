"""What a device puts in a message: only shared-adapter tensors, no personal head, no tokens, no text."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

import fedpersona.client.app as client_app
from fedpersona.config import CONFIG_ENV, load_config
from fedpersona.model import adapted_model
from fedpersona.wire import inventory, to_record

from tests.client.device_helpers import REPLIES


def _user_folder(path):
    path.mkdir(parents=True)
    lines = [json.dumps({"cue": f"Who's there? number {i}", "reply": r}) for i, r in enumerate(REPLIES * 2)]
    (path / "lines.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def device_context(tiny_config, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are made inside a run; outside Flower's runtime we name one.
    for attr, value in (("task_id", 1), ("run_id", 1), ("node_id", 0)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    # The plain train path (secagg off); the masked path is tested in tests/client/test_secure.py.
    flat = dict(tiny_config, **{"privacy.delta": 1e-2, "data.max-examples": 12, "secagg.enabled": False})
    monkeypatch.setenv(CONFIG_ENV, json.dumps(flat))
    client_app._DEVICES.clear()
    node_config = {"data-dir": str(_user_folder(tmp_path / "alice")), "state-dir": str(tmp_path / "alice-state"),
                   "user-id": "alice", "policy.allow-no-secagg": True}  # this device's owner accepts plain aggregation
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    return ctx, load_config(flat, env=False)


def _train_message(cfg, server_round=1):
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    content = RecordDict({"shared": to_record(model.initial_shared_state()),
                          "config": ConfigRecord({"server-round": server_round})})
    msg = Message(content=content, dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"  # a delivered message has an id
    return msg, model


def test_train_reply_holds_only_shared_tensors(device_context):
    ctx, cfg = device_context
    msg, model = _train_message(cfg)
    reply = client_app.train(msg, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    rows = inventory(content)
    arrays = [r for r in rows if r["kind"] == "array"]
    assert {r["name"] for r in arrays} == set(model.shared_names)
    assert not any(".personal." in r["name"] for r in rows)
    assert all(r["dtype"].startswith("float") for r in arrays), "no token ids leave the device"
    # The personal head the device now holds does not appear, by value, in the message.
    head = model.personal_state()
    sent = [a.numpy() for rec in content.array_records.values() for a in rec.values()]
    for t in head.values():
        assert not any(s.shape == tuple(t.shape) and np.allclose(s, t.numpy()) for s in sent)
    # No text: nothing of the user's lines in any metric or config entry.
    blob = json.dumps({k: dict(v) for k, v in content.metric_records.items()}) + json.dumps(
        {k: {kk: str(vv) for kk, vv in v.items()} for k, v in content.config_records.items()})
    for line in REPLIES:
        for word in line.split()[:3]:
            if len(word) > 4:
                assert word not in blob
    # Beside the update only the public weight 1 and the constant "trained": no count, loss, epsilon or timing.
    assert dict(content.metric_records["metrics"]) == {"weight": 1.0, "trained": 1.0}


def test_ledger_and_head_stay_on_the_device_and_compose(device_context):
    ctx, cfg = device_context
    msg, model = _train_message(cfg)
    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.client.store import DeviceStore

    def ledger():
        return PrivacyLedger.from_json(DeviceStore(ctx.node_config["state-dir"]).load_text("ledger"))

    r1 = client_app.train(msg, ctx)
    eps1 = ledger().epsilon(cfg.privacy.delta)
    # A "restart": the process forgets the device; the ledger comes back from disk.
    client_app._DEVICES.clear()
    msg2, _ = _train_message(cfg, server_round=2)
    r2 = client_app.train(msg2, ctx)
    eps2 = ledger().epsilon(cfg.privacy.delta)
    assert not r1.has_error() and not r2.has_error() and "epsilon" not in r2.content["metrics"]
    assert 0 < eps1 < eps2 <= cfg.privacy.target_epsilon + 1e-9
    ledger = ledger()
    assert [r["round"] for r in ledger.rounds] == [1, 2]
    assert ledger.total_steps == 2 * cfg.client.local_steps


def test_budget_exhausted_device_declines(device_context, monkeypatch):
    ctx, cfg = device_context
    flat = json.loads(__import__("os").environ[CONFIG_ENV])
    flat.update({"privacy.noise-multiplier": 0.6, "privacy.target-epsilon": 0.5})
    monkeypatch.setenv(CONFIG_ENV, json.dumps(flat))
    client_app._DEVICES.clear()
    msg, _ = _train_message(load_config(flat, env=False))
    reply = client_app.train(msg, ctx)
    assert reply.content["status"]["status"] == "budget-exhausted"
    assert "array_records" not in dir(reply.content) or not reply.content.array_records
    assert reply.content["metrics"]["weight"] == 0.0


def test_corrupt_ledger_fails_that_device_clearly_and_keeps_the_file(device_context, caplog):
    ctx, cfg = device_context
    msg, _ = _train_message(cfg)
    assert not client_app.train(msg, ctx).has_error()
    from fedpersona.client.store import DeviceStore

    store = DeviceStore(ctx.node_config["state-dir"])
    store.save_text("later", "a later commit")  # the ledger's commit is not the last one (that could be torn)
    blob = store._folder.state.blobs["ledger"]
    path = store.state_dir / blob.journal
    data = bytearray(path.read_bytes())
    data[blob.offset + blob.length - 1] ^= 0xFF  # the ledger's ciphertext
    path.write_bytes(bytes(data))
    client_app._DEVICES.clear()
    msg2, _ = _train_message(cfg, server_round=2)
    with caplog.at_level("ERROR", logger="fedpersona.client.app"):
        reply = client_app.train(msg2, ctx)
    assert reply.has_error()
    # The reply names the error class only (a state path can name the user); the device's log has the file.
    assert reply.error.reason.startswith("StateError: ") and "alice" not in reply.error.reason
    assert "ledger" in caplog.text
    assert path.read_bytes() == bytes(data), "a corrupt ledger is never overwritten"
