"""The device side of secure aggregation with the real Device (tiny model): keys, masked replies, refusals."""

import json
import warnings

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.flow_log import read_inventory
from fedpersona.client.secagg import KEYS, device_keys
from fedpersona.client.store import DeviceStore
from fedpersona.config import CONFIG_ENV, load_config
from fedpersona.identity import provision
from fedpersona.model import adapted_model
from fedpersona.secagg_wire import ARRAYS, RECORD, SELF_ENC_PK, SELF_MASK_PK, SELF_SIGN_PK, from_records, to_records
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.wire import to_record
from fedpersona.privacy.audit.inventory import verify_inventory
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.secagg import SecAggClient, SecAggServer
from fedpersona.server.secagg import SecureAggregator
from tests.server.test_secagg import FakeGrid

RUN_ID = 77
LINES = ["Nay, answer me: stand, and unfold yourself.", "Long live the king!", "Not a mouse stirring.",
         "You come most carefully upon your hour.", "For this relief much thanks.", "Well, good night."]


def _user_folder(path):
    path.mkdir(parents=True)
    rows = [json.dumps({"cue": f"Who's there? {i}", "reply": r}) for i, r in enumerate(LINES * 2)]
    (path / "lines.jsonl").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def devices(tiny_config, tmp_path, monkeypatch):
    """Three real devices (nodes 7, 8 and 9: a device's default floor is 3 contributors) behind a FakeGrid."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", RUN_ID), ("node_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    folders = {7: _user_folder(tmp_path / "alice"), 8: _user_folder(tmp_path / "bob"),
               9: _user_folder(tmp_path / "carol")}

    def build(**over):
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()
        flat = dict(tiny_config, **{"privacy.delta": 1e-2, "data.max-examples": 12, "server.clients-per-round": 3},
                    **over)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = load_config(flat, env=False)
        contexts = {nid: Context(run_id=RUN_ID, node_id=nid, state=RecordDict(), run_config=flat,
                                 node_config={"data-dir": str(folder), "state-dir": str(folder) + "-state",
                                              "user-id": folder.name})
                    for nid, folder in folders.items()}
        provision([c.node_config["state-dir"] for c in contexts.values()], tmp_path / "identity-root.key")
        return cfg, FakeGrid(contexts)

    yield build
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()


def _content(cfg, server_round=1):
    shared = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed).initial_shared_state()
    return RecordDict({"shared": to_record(shared), "config": ConfigRecord({"server-round": server_round})}), shared


def _ledger(grid, nid):
    text = DeviceStore(grid.contexts[nid].node_config["state-dir"]).load_text("ledger")
    return PrivacyLedger.from_json(text) if text else None


def test_keys_are_created_once_persisted_encrypted_and_reused(devices):
    cfg, grid = devices()
    msg = Message(RecordDict(), dst_node_id=7, message_type="query.advertise")
    msg.metadata.__dict__["_message_id"] = "a1"
    first = from_records(client_app.advertise(msg, grid.contexts[7]).content)
    assert set(first) == {"client_id", "enc_pk", "mask_pk", "sign_pk", "identity", "certificate", "binding"}
    assert first["client_id"] == 7
    client_app._DEVICES.clear()  # a restart
    again = from_records(client_app.advertise(msg, grid.contexts[7]).content)
    assert again == first
    state = grid.contexts[7].node_config["state-dir"]
    secret = device_keys(DeviceStore(state)).to_bytes()
    from pathlib import Path

    for f in Path(state).iterdir():
        data = f.read_bytes()
        assert secret not in data and secret.hex().encode() not in data, f"private keys in the clear in {f.name}"
    assert DeviceStore(state).exists(KEYS)


def test_secure_round_with_real_devices_sends_only_masked_payloads(devices):
    cfg, grid = devices()
    content, shared = _content(cfg)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, [7, 8, 9], content, server_round=1, timeout=None)
    assert not rs.aborted and rs.failures == [] and rs.contributors == 3
    assert set(rs.update_sum) == set(shared)
    norm = float(sum((v.double() ** 2).sum() for v in rs.update_sum.values()) ** 0.5)
    assert 0 < norm < 2 * cfg.secagg.clip_norm and np.isfinite(norm)
    # Only the survivors' count comes with the sum: no example count, loss, epsilon or timing.
    assert rs.metrics == {"trained": 3.0, "weight": 3.0} and rs.weight == 3
    for n in (7, 8, 9):
        assert 0 < client_app._DEVICES[(RUN_ID, n)].last_round["epsilon"] <= cfg.privacy.target_epsilon
    for nid in (7, 8, 9):
        assert [r["round"] for r in _ledger(grid, nid).rounds] == [1]
        lines = read_inventory(grid.contexts[nid].node_config["state-dir"])
        assert [ln["message_type"] for ln in lines] == ["query.advertise", "train", "query.consistency", "query.unmask"]
        model = client_app._DEVICES[(RUN_ID, nid)].model
        check = verify_inventory({str(nid): lines}, personal_names=list(model.personal_state()),
                                 shared_names=list(shared))
        assert check.ok, check.violations
        train_line = lines[1]
        assert {r["record"] for r in train_line["rows"]} == {RECORD, ARRAYS, "freshness"}  # + the opaque receipt
        assert {r["name"] for r in train_line["rows"] if r["kind"] == "array" and r["masked"]} == {"masked"}


def _request(cfg, grid, shared, *, length=None, keys=None):
    """A valid masked-input request for node 7 (with nodes 8 and 9's keys made up), optionally tampered."""
    msg = Message(RecordDict(), dst_node_id=7, message_type="query.advertise")
    msg.metadata.__dict__["_message_id"] = "a1"
    advert = from_records(client_app.advertise(msg, grid.contexts[7]).content)
    server = SecAggServer(secagg_params(cfg), run_id=RUN_ID)
    server.register(advert)
    server.register(SecAggClient(8, secagg_params(cfg)).advertise())
    server.register(SecAggClient(9, secagg_params(cfg)).advertise())
    n = sum(t.numel() for t in shared.values())
    rnd = server.start_round(1, [7, 8, 9], length or n)
    req = rnd.masked_input_requests()[7]
    req[SELF_ENC_PK], req[SELF_MASK_PK] = keys or (advert["enc_pk"], advert["mask_pk"])
    req[SELF_SIGN_PK] = advert["sign_pk"]
    return req


@pytest.mark.parametrize("tamper", ["length", "keys", "plain"])
def test_bad_requests_are_refused_before_training(devices, tamper, caplog):
    cfg, grid = devices()
    content, shared = _content(cfg)
    if tamper == "length":
        req = _request(cfg, grid, shared, length=5)
    elif tamper == "keys":
        req = _request(cfg, grid, shared, keys=(b"\x01" * 32, b"\x02" * 32))
    if tamper != "plain":
        content = RecordDict({**dict(content), **to_records(req)})
    msg = Message(content, dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = "t1"
    with caplog.at_level("ERROR", logger="fedpersona.client.app"):
        reply = client_app.train(msg, grid.contexts[7])
    assert reply.has_error()
    expected = {"length": "vector length", "keys": "other public keys", "plain": "refusing to send a plain update"}
    # The reply says the error class and a fixed text; the details stay in the device's log.
    assert reply.error.reason == f"{'ValueError' if tamper == 'plain' else 'SecAggInputError'}: {client_app.ERROR_TEXT.format(kind='train')}"
    assert expected[tamper] in caplog.text
    assert _ledger(grid, 7) is None, "no privacy budget spent on a request that fails"


def test_budget_exhausted_devices_decline_and_nothing_is_unmasked(devices):
    cfg, grid = devices(**{"privacy.noise-multiplier": 0.6, "privacy.target-epsilon": 0.5})
    content, _ = _content(cfg)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, [7, 8, 9], content, server_round=1, timeout=None)
    assert rs.aborted and "before any unmask request" in rs.aborted
    assert rs.contributors == 0 and len(rs.declined) == 3 and rs.weight == 0 and rs.update_sum == {}
    replies = grid.replies("train")
    assert len(replies) == 3 and all(from_records(r.content)["declined"] == 1 for r in replies)
    assert all(not r.content.array_records.get(ARRAYS) for r in replies), "a decline carries no vector and no shares"
    assert not grid.replies("query.unmask")


def test_malformed_unmask_fails_with_a_fixed_reason(devices, caplog):
    cfg, grid = devices()
    msg = Message(RecordDict(to_records({"client_id": 7})), dst_node_id=7, message_type="query.unmask")
    msg.metadata.__dict__["_message_id"] = "u1"
    with caplog.at_level("ERROR", logger="fedpersona.client.app"):
        reply = client_app.unmask(msg, grid.contexts[7])
    assert reply.has_error() and reply.error.reason.startswith("SecAggInputError: the device could not answer")
    assert "missing field" in caplog.text


def test_ddp_user_level_epsilon_in_the_ledger(devices):
    cfg, grid = devices(**{"secagg.ddp": True, "secagg.ddp-min-clients": 2})
    agg = SecureAggregator(cfg, run_id=RUN_ID)
    for r in (1, 2):
        content, _ = _content(cfg, r)
        rs = agg.collect(grid, [7, 8, 9], content, server_round=r, timeout=None)
        assert rs.contributors == 3
    entries = _ledger(grid, 7).user_level_entries
    assert [e["round"] for e in entries] == [1, 2]
    assert 0 < entries[0]["epsilon"] < entries[1]["epsilon"] == pytest.approx(rs.info["ddp-epsilon-max"])
    assert entries[1]["mechanism"].startswith("secagg-ddg(") and entries[1]["delta"] == cfg.secagg.ddp_delta


def test_round_context_is_bound_into_the_digest_and_checked_by_the_device(devices):
    """The hook for sums of other content: the server's ``context`` is in the round digest, the device compares it
    with the value it computes itself (a callable of the request), before training."""
    from fedpersona.client.secagg import check_request
    from fedpersona.identity import DeviceIdentity
    from fedpersona.privacy.secagg import SecAggInputError
    from fedpersona.privacy.secagg.spec import request_digest

    cfg, grid = devices()
    _, shared = _content(cfg)
    msg = Message(RecordDict(), dst_node_id=7, message_type="query.advertise")
    msg.metadata.__dict__["_message_id"] = "a1"
    advert = from_records(client_app.advertise(msg, grid.contexts[7]).content)
    params = secagg_params(cfg)
    server = SecAggServer(params, run_id=RUN_ID)
    server.register(advert)
    for nid in (8, 9):
        ident = DeviceIdentity.load(f"{grid.contexts[nid].node_config['state-dir']}/identity.json")
        server.register(SecAggClient(nid, params, identity=ident).advertise(run_id=RUN_ID))
    n = sum(t.numel() for t in shared.values())
    context = b"dp-step: sigma=1.1 t=3 step=4 weights=9f86d081"

    def request(ctx):
        req = server.start_round(1, [7, 8, 9], n, context=ctx).masked_input_requests()[7]
        req.update({SELF_ENC_PK: advert["enc_pk"], SELF_MASK_PK: advert["mask_pk"], SELF_SIGN_PK: advert["sign_pk"]})
        return req

    store = DeviceStore(grid.contexts[7].node_config["state-dir"])
    good = request(context)
    assert request_digest(good) != request_digest({**good, "context": b""})  # the digest covers it
    client = check_request(store, cfg, 7, dict(good), shared, context=lambda req: context)
    assert client.identity is not None and client.trust_root == client.identity.root
    for expected, req in ((b"dp-step: sigma=0.1 t=3 step=4 weights=9f86d081", good), (b"", good),
                          (context, request(b""))):
        with pytest.raises(SecAggInputError, match="context"):
            check_request(store, cfg, 7, dict(req), shared, context=expected)


def test_the_keys_are_parsed_once_per_written_blob(tmp_path):
    """A device's messages read its keys from the parse of the blob they came from; keys written anew are read anew."""
    from fedpersona.privacy.secagg.crypto import ClientKeys

    store = DeviceStore(tmp_path / "dev")
    first = device_keys(store, create=True)
    again = device_keys(DeviceStore(tmp_path / "dev"))
    assert again.to_bytes() == first.to_bytes()
    assert device_keys(DeviceStore(tmp_path / "dev")) is again  # the same blob: not parsed again
    other = ClientKeys()
    store.save_text(KEYS, other.to_bytes().hex())
    assert device_keys(DeviceStore(tmp_path / "dev")).to_bytes() == other.to_bytes()
    assert device_keys(DeviceStore(tmp_path / "other"), create=True).to_bytes() not in (first.to_bytes(),
                                                                                     other.to_bytes())


def test_cached_keys_never_hide_a_rolled_back_store(tmp_path):
    """A host that rolls the device's files back to an older copy is refused even when the keys were parsed before."""
    import shutil

    import pytest

    from fedpersona.client.store import RollbackDetected

    root, snap = tmp_path / "dev", tmp_path / "snap"
    store = DeviceStore(root)
    device_keys(store, create=True)
    shutil.copytree(root, snap)
    store.save_text("other", "x")
    device_keys(DeviceStore(root))  # parsed and cached at the newer generation
    for f in root.iterdir():
        if f.is_file():
            f.unlink()
    for f in snap.iterdir():
        shutil.copy2(f, root / f.name)
    with pytest.raises(RollbackDetected):
        device_keys(DeviceStore(root))
