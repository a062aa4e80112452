"""FreshnessGrid: each node's latest receipt kept (across a server restart) and sent back with every request."""

import json

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedpersona.receipts import MAX_RECEIPT_BYTES, RECEIPT, RECORD, put_receipt
from fedpersona.server.freshness import RECEIPTS_FILE, FreshnessGrid


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages made outside a Flower run need the process's task identity (as tests/server/test_secagg.py)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", 5), ("node_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)


class EchoGrid:
    """Answers every message with content; node n's reply carries ``receipts[n]`` (None: no receipt)."""

    def __init__(self):
        self.receipts: dict[int, bytes | None] = {}
        self.seen: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.seen.append(m)
            reply = Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            if self.receipts.get(m.metadata.dst_node_id) is not None:
                put_receipt(reply.content, self.receipts[m.metadata.dst_node_id])
            out.append(reply)
        return out

    def get_node_ids(self):
        return [1, 2]


def _messages(content):
    out = []
    for node in (1, 2):
        m = Message(content, dst_node_id=node, message_type="train", group_id="1")
        m.metadata.__dict__["_message_id"] = f"m{node}"
        out.append(m)
    return out


def test_receipts_are_kept_per_node_stripped_from_replies_and_sent_back(tmp_path):
    inner = EchoGrid()
    grid = FreshnessGrid(inner, tmp_path)
    assert grid.get_node_ids() == [1, 2]  # everything else goes to the wrapped grid
    inner.receipts = {1: b"r1" * 42, 2: b"r2" * 42}
    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})
    replies = grid.send_and_receive(_messages(shared))
    assert all(RECORD not in r.content for r in replies)  # the round loop never sees them
    assert all(RECORD not in m.content for m in inner.seen)  # none kept yet: nothing attached
    assert grid.receipts == {1: b"r1" * 42, 2: b"r2" * 42}

    inner.seen.clear()
    inner.receipts = {1: b"n1" * 42, 2: None}  # node 2's reply carries none: its old receipt stays
    grid.send_and_receive(_messages(shared))
    sent = {m.metadata.dst_node_id: m.content for m in inner.seen}
    assert sent[1][RECORD][RECEIPT] == b"r1" * 42 and sent[2][RECORD][RECEIPT] == b"r2" * 42
    assert RECORD not in shared  # the content the two messages shared is untouched: each got its own
    assert grid.receipts == {1: b"n1" * 42, 2: b"r2" * 42}

    # A server that restarts (and resumes the run) still holds them.
    doc = json.loads((tmp_path / RECEIPTS_FILE).read_text())
    assert doc["receipts"] == {"1": (b"n1" * 42).hex(), "2": (b"r2" * 42).hex()}
    assert FreshnessGrid(EchoGrid(), tmp_path).receipts == grid.receipts


def test_what_is_not_a_receipt_is_neither_kept_nor_forwarded(tmp_path):
    inner = EchoGrid()
    grid = FreshnessGrid(inner, tmp_path)
    reply = Message(RecordDict({RECORD: ConfigRecord({RECEIPT: b"x" * (MAX_RECEIPT_BYTES + 1)})}),
                    reply_to=_messages(RecordDict())[0])
    reply.metadata.__dict__["_src_node_id"] = 1
    grid._collect([reply])
    assert grid.receipts == {} and RECORD not in reply.content
    (tmp_path / RECEIPTS_FILE).write_text("not json")
    assert FreshnessGrid(EchoGrid(), tmp_path).receipts == {}  # unreadable: starts without (logged)
