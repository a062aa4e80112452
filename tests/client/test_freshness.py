"""The ClientApp mod: one store commit per message, before the reply; the receipt checked and handed back."""

import shutil

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import fedpersona.client.flow_log as client_inventory
from fedpersona.client.freshness import freshness_mod
from fedpersona.client.store import KEY_ENV, DeviceStore
from fedpersona.receipts import RECEIPT, RECORD, put_receipt


@pytest.fixture
def node(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", 3), ("node_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    client_inventory._STATE_DIRS.clear()
    (tmp_path / "data").mkdir()
    ctx = Context(run_id=3, node_id=7, state=RecordDict(), run_config={},
                  node_config={"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state")})
    yield ctx, tmp_path / "state"
    client_inventory._STATE_DIRS.clear()


def _message(receipt: bytes | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if receipt is not None:
        put_receipt(content, receipt)
    m = Message(content, dst_node_id=7, message_type="train", group_id="1")
    m.metadata.__dict__["_message_id"] = "m"
    return m


def _handler(seen: list, *, fail: bool = False):
    def handle(message, context):
        seen.append(set(message.content.keys()))
        store = DeviceStore(context.node_config["state-dir"])
        before = store.generation
        for name in ("ledger", "personal", "participation", "secagg-reveals"):
            store.save_text(name, f"{name} after request {len(seen)}")
        assert store.generation == before  # buffered: committed once, when the handler returns
        if fail:
            raise RuntimeError("the handler failed")
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=message)
    return handle


def test_one_commit_per_message_and_the_receipt_goes_back(node):
    ctx, state = node
    seen: list = []
    reply = freshness_mod(_message(), ctx, _handler(seen))
    store = DeviceStore(state)
    assert store.generation == 1 and store.load_text("ledger") == "ledger after request 1"
    receipt = reply.content[RECORD][RECEIPT]
    assert len(receipt) == 84 and store.check_receipt(receipt)
    reply2 = freshness_mod(_message(receipt), ctx, _handler(seen))
    assert seen == [{"config"}, {"config"}]  # the handler never sees the receipt
    assert store.generation == 2 and reply2.content[RECORD][RECEIPT] != receipt


def test_a_handler_that_raises_commits_nothing(node):
    ctx, state = node
    freshness_mod(_message(), ctx, _handler([]))
    with pytest.raises(RuntimeError, match="the handler failed"):
        freshness_mod(_message(), ctx, _handler([None], fail=True))
    assert DeviceStore(state).generation == 1 and DeviceStore(state).load_text("ledger") == "ledger after request 1"


def test_a_state_older_than_the_receipt_is_refused_before_the_handler(node, tmp_path):
    ctx, state = node
    freshness_mod(_message(), ctx, _handler([]))
    shutil.copytree(state, tmp_path / "copy")
    reply = freshness_mod(_message(), ctx, _handler([None]))
    receipt = reply.content[RECORD][RECEIPT]
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "copy", state)
    DeviceStore(state).anchor_path.unlink()  # only the server's receipt is left to show it
    seen: list = []
    with pytest.warns(UserWarning, match="anchor .* is missing"):
        refused = freshness_mod(_message(receipt), ctx, _handler(seen))
    assert seen == [] and refused.has_error()
    assert refused.error.reason == ("RollbackDetected: refused: this device's state is older than its last commit "
                                    "(an older copy was restored); it takes no part until its owner restores the "
                                    "newest state")
    # The server stops sending the receipt: still refused.
    assert freshness_mod(_message(), ctx, _handler(seen)).error.reason.startswith("RollbackDetected: ")
    assert seen == []


def test_a_receipt_that_is_not_this_devices_is_ignored(node, tmp_path):
    ctx, state = node
    other = DeviceStore(tmp_path / "other")
    other.save_text("ledger", "x")
    for _ in range(3):
        other.save_text("ledger", "y")
    reply = freshness_mod(_message(other.receipt()), ctx, _handler([]))
    assert not reply.has_error() and DeviceStore(state).generation == 1
