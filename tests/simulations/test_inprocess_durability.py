"""The in-process grid's group commit: a reply leaves only after the state it depends on is on disk."""

import os

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import fedpersona.client.store as store_module
import fedpersona.simulations.inprocess as inprocess
from fedpersona.client.store import DeviceStore
from fedpersona.simulations.inprocess import InProcessGrid


def _app(events):
    """A ClientApp that commits what it receives to its device store, then replies."""

    def app(message, context):
        store = DeviceStore(context.node_config["state-dir"])
        with store.transaction():
            store.save_text("seen", str(message.content.config_records["c"]["x"]))
        events.append(("handled", context.node_id))
        return Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=message)

    return app


def _fsyncs(monkeypatch, events, fail: str | None = None):
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path))
        if fail and path.startswith(fail):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture(autouse=True)
def fresh_folders():
    store_module._FOLDERS.clear()
    yield
    store_module._FOLDERS.clear()


def _run(tmp_path, events, n=5, rounds=2):
    nodes = {10 + i: {"state-dir": str(tmp_path / f"node{i}")} for i in range(n)}
    replies = []
    with InProcessGrid(_app(events), nodes, {}, run_id=5) as grid:
        for r in range(rounds):
            msgs = [grid.create_message(RecordDict({"c": ConfigRecord({"x": f"round {r}"})}), "query", nid, str(r))
                    for nid in nodes]
            got = grid.send_and_receive(msgs, on_reply=lambda m: events.append(("reply", m.metadata.src_node_id)))
            replies.append(list(got))
    return nodes, replies


@pytest.mark.parametrize("chunk", [2, 32])
def test_replies_leave_only_after_their_devices_commits_are_fsynced(tmp_path, monkeypatch, chunk):
    """Each reply is released after its device's journal was fsynced (first commit and later ones), and the
    devices of a chunk are fsynced together, after all of them were handled."""
    monkeypatch.setattr(inprocess, "DURABLE_CHUNK", chunk)
    events = []
    _fsyncs(monkeypatch, events)
    nodes, replies = _run(tmp_path, events)
    assert all(not m.has_error() for rs in replies for m in rs)
    replies_at = [i for i, e in enumerate(events) if e[0] == "reply"]
    assert len(replies_at) == 10
    for nid, nc in nodes.items():
        journal_fsyncs = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1].startswith(nc["state-dir"] + "/_journal")]
        mine = [i for i, e in enumerate(events) if e == ("reply", nid)]
        assert len(journal_fsyncs) == 2 and len(mine) == 2  # one commit a round, each fsynced once
        for fs, rep in zip(journal_fsyncs, mine):
            assert fs < rep, events
    # A chunk's fsyncs come after every message of the chunk was handled: one flush per chunk.
    flushes = [i for i, e in enumerate(events) if e[0] == "fsync" and "/_journal" in e[1]]
    handled = [i for i, e in enumerate(events) if e[0] == "handled"]
    per_round_chunks = -(-5 // chunk)
    first_flush_of_chunk = []
    for i in flushes:
        if not first_flush_of_chunk or any(first_flush_of_chunk[-1] < h < i for h in handled):
            first_flush_of_chunk.append(i)
    assert len(first_flush_of_chunk) == 2 * per_round_chunks
    for nc in nodes.values():  # the state is there after a restart
        store_module._FOLDERS.clear()
        assert DeviceStore(nc["state-dir"]).load_text("seen") == "round 1"


def test_a_device_whose_state_cannot_be_made_durable_answers_with_an_error(tmp_path, monkeypatch):
    """A failed fsync at the flush: that device's reply is an error (its figures never leave), the others'
    are not; the device refuses its next message until it restarts."""
    events = []
    bad = str(tmp_path / "node2")
    _fsyncs(monkeypatch, events, fail=bad + "/_journal")
    nodes, replies = _run(tmp_path, events)
    for rs in replies:
        errors = {m.metadata.src_node_id: m.error.reason for m in rs if m.has_error()}
        assert list(errors) == [12]
    assert "could not be made durable" in replies[0][2].error.reason
    assert "could not be made durable" in replies[1][2].error.reason  # refused: an earlier commit failed
    assert all(m.content.config_records["r"]["ok"] == 1 for rs in replies for m in rs if not m.has_error())
