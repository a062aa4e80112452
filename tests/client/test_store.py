"""Device store: encrypted at rest, one atomic commit per transaction, tamper-, deletion- and rollback-evident."""

import json
import os
import random
import shutil
import signal
import stat
import time

import pytest
import torch

import fedpersona.client.store as store_module
from fedpersona.client.store import (ANCHOR_ENV, FRESHNESS_FILE, JOURNALS, KEY_ENV, DeviceStore, RollbackDetected, StateError,
                          default_anchor_dir, prepare_stores, group_commit, read_freshness_events)

SECRET = "To be, or not to be: that is the question"


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(ANCHOR_ENV, raising=False)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"head.weight": torch.randn(4, 3, generator=g), "head.bias": torch.arange(3, dtype=torch.float64), "steps": torch.tensor(7)}


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def restart():
    """What a new process knows about the folders: nothing (the per-process caches are dropped)."""
    store_module._FOLDERS.clear()


def journal(store):
    """The active journal file."""
    return max((store.state_dir / j for j in JOURNALS), key=lambda p: p.stat().st_size)


def test_round_trip(tmp_path):
    store = DeviceStore(tmp_path / "state")
    assert store.load_text("ledger") is None and store.load_tensors("personal") is None
    assert store.generation == 0 and store.receipt() is None
    store.save_text("ledger", SECRET)
    store.save_tensors("personal", tensors())
    store.save_text("ledger", SECRET + "!")  # overwrite
    restart()
    again = DeviceStore(tmp_path / "state")
    assert again.load_text("ledger") == SECRET + "!"
    loaded = again.load_tensors("personal")
    assert loaded.keys() == tensors().keys()
    for k, v in tensors().items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    assert again.exists("ledger") and not again.exists("other")
    assert again.names() == ["ledger", "personal"] and again.generation == 3


def test_views_and_shared_storage_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    store = DeviceStore(tmp_path / "s")
    store.save_tensors("personal", {"a": base, "b": base.t(), "c": base[1]})
    loaded = store.load_tensors("personal")
    assert torch.equal(loaded["b"], base.t()) and torch.equal(loaded["c"], base[1])


def test_plaintext_not_on_disk(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", SECRET)
    with store.transaction():
        store.save_tensors("personal", {"marker": torch.tensor(list(b"SECRETMARKER"), dtype=torch.uint8)})
        store.save_text("profile", "the user writes like SECRETPROFILE")
    for p in list((tmp_path / "s").iterdir()) + list((tmp_path / "_fedpersona-anchors").iterdir()):
        data = p.read_bytes()
        for needle in (SECRET.encode(), b"SECRETMARKER", b"marker", b"SECRETPROFILE", b"ledger", b"personal"):
            assert needle not in data, (p, needle)


def test_fresh_nonce_per_write(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("a", SECRET)
    first = store._folder.state.blobs["a"]
    store.save_text("a", SECRET)
    second = store._folder.state.blobs["a"]
    data = journal(store).read_bytes()
    assert data[second.offset:second.offset + 12] != data[first.offset:first.offset + 12]
    assert second.sha != first.sha


def test_key_file_created_0600_and_reused(tmp_path):
    store = DeviceStore(tmp_path / "s")
    assert not (tmp_path / "s" / "device.key").exists()  # only created on the first write
    store.save_text("ledger", SECRET)
    key_file = tmp_path / "s" / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) == 64
    restart()
    assert DeviceStore(tmp_path / "s").load_text("ledger") == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_key_file_refused(tmp_path, mode):
    DeviceStore(tmp_path / "s").save_text("ledger", SECRET)
    os.chmod(tmp_path / "s" / "device.key", mode)
    with pytest.raises(StateError, match=r"device\.key has permissions.*refusing"):
        DeviceStore(tmp_path / "s").load_text("ledger")
    with pytest.raises(StateError, match="refusing"):
        DeviceStore(tmp_path / "s").save_text("ledger", "x")


def test_env_key(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv(KEY_ENV, key.hex())
    DeviceStore(tmp_path / "s").save_text("ledger", SECRET)
    assert not (tmp_path / "s" / "device.key").exists()
    assert DeviceStore(tmp_path / "s").load_text("ledger") == SECRET
    assert DeviceStore(tmp_path / "s", key=key).load_text("ledger") == SECRET  # the same key, given directly
    monkeypatch.setenv(KEY_ENV, "abc")
    with pytest.raises(ValueError, match=KEY_ENV):
        DeviceStore(tmp_path / "s")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="32 bytes"):
        DeviceStore(tmp_path, key=b"short")
    with pytest.raises(ValueError, match="anchor folder must lie outside the state folder.*You passed"):
        DeviceStore(tmp_path / "s", anchor_dir=tmp_path / "s" / "anchors")


def _state_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != FRESHNESS_FILE}


def _assert_refused_unchanged(folder, match, *, loader="load_text", name="ledger", error=StateError):
    """Refused, for reading and for writing, and nothing of the state changed (the event log may grow)."""
    before = _state_files(folder)
    restart()
    with pytest.raises(error, match=match):
        getattr(DeviceStore(folder), loader)(name)
    with pytest.raises(error, match=match):
        DeviceStore(folder).save_text("ledger", "a fresh budget")
    assert _state_files(folder) == before


def test_wrong_key(tmp_path):
    DeviceStore(tmp_path / "s", key=b"k" * 32).save_text("ledger", SECRET)
    restart()
    with pytest.raises(StateError, match="failed authentication"):
        DeviceStore(tmp_path / "s", key=b"j" * 32).load_text("ledger")


def _three_commits(folder):
    store = DeviceStore(folder)
    store.save_text("ledger", "round 1")
    with store.transaction():
        store.save_tensors("personal", tensors())
        store.save_text("ledger", "round 2")
    store.save_text("ledger", "round 3")
    return store


@pytest.mark.parametrize("where", [0, 5, 20, 200, "middle", -1])
def test_tampered_byte_refused(tmp_path, where):
    store = _three_commits(tmp_path / "s")
    path = journal(store)
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if where == "middle" else where
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    # A change in an earlier commit fails authentication; one in the last commit looks like a torn write,
    # whose commit is then missing: the anchor shows the state is older than it was.
    _assert_refused_unchanged(tmp_path / "s", "failed authentication|tampered|rolled back",
                              loader="load_tensors" if where == "middle" else "load_text",
                              name="personal" if where == "middle" else "ledger")


@pytest.mark.parametrize("keep", [0, 10, 40, "half", -1])
def test_truncated_journal_refused(tmp_path, keep):
    store = _three_commits(tmp_path / "s")
    path = journal(store)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    _assert_refused_unchanged(tmp_path / "s", "rolled back|failed authentication")


def test_journals_of_another_store_refused(tmp_path):
    _three_commits(tmp_path / "s")
    other = DeviceStore(tmp_path / "t")
    other.save_text("ledger", "spent little")
    for j in JOURNALS:
        shutil.copyfile(tmp_path / "t" / j, tmp_path / "s" / j)
    # Under another key: fails authentication.
    _assert_refused_unchanged(tmp_path / "s", "failed authentication")
    # With that key copied too, the folder is another device's whole state: it has no anchor here (loud, recorded).
    shutil.copyfile(tmp_path / "t" / "device.key", tmp_path / "s" / "device.key")
    restart()
    with pytest.warns(UserWarning, match="anchor .* is missing"):
        assert DeviceStore(tmp_path / "s").load_text("ledger") == "spent little"
    assert read_freshness_events(tmp_path / "s")[-1]["event"] == "anchor-missing"


def test_wrong_kind(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", SECRET)
    with pytest.raises(StateError, match="holds text, not tensors"):
        store.load_tensors("ledger")


def test_deleted_records_detected(tmp_path):
    """Deleting the ledger's records (the journals) must not hand the device a fresh privacy budget."""
    _three_commits(tmp_path / "s")
    for j in JOURNALS:
        (tmp_path / "s" / j).unlink()
    _assert_refused_unchanged(tmp_path / "s", "holds no record but its anchor records generation 3",
                              error=RollbackDetected)


def test_deleted_key_detected(tmp_path):
    DeviceStore(tmp_path / "s").save_text("ledger", SECRET)
    (tmp_path / "s" / "device.key").unlink()
    restart()
    with pytest.raises(StateError, match="key .* is missing"):
        DeviceStore(tmp_path / "s").load_text("ledger")


def test_restored_copy_of_the_folder_refused(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "spent 1.0")
    shutil.copytree(tmp_path / "s", tmp_path / "backup")
    store.save_text("ledger", "spent 3.9")
    shutil.rmtree(tmp_path / "s")
    shutil.copytree(tmp_path / "backup", tmp_path / "s")
    _assert_refused_unchanged(tmp_path / "s", "holds generation 1 but its anchor records generation 2",
                              error=RollbackDetected)
    assert [e["event"] for e in read_freshness_events(tmp_path / "s")] == ["rollback-detected"]


def test_restored_copy_that_went_on_is_refused(tmp_path):
    """A fork: the restored copy commits as many times as the original had; the chain digest differs."""
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "spent 1.0")
    shutil.copytree(tmp_path / "s", tmp_path / "backup")
    store.save_text("ledger", "spent 3.9")
    anchor = store.anchor_path.read_bytes()
    shutil.rmtree(tmp_path / "s")
    shutil.copytree(tmp_path / "backup", tmp_path / "s")
    store.anchor_path.unlink()  # the owner deletes the anchor to go on from the copy...
    restart()
    with pytest.warns(UserWarning, match="anchor .* is missing"):
        DeviceStore(tmp_path / "s").save_text("ledger", "spent 1.0, again")
    store.anchor_path.write_bytes(anchor)  # ...and an anchor of the original is found again
    _assert_refused_unchanged(tmp_path / "s", "differs from the one its anchor recorded", error=RollbackDetected)


def test_missing_anchor_is_loud_recorded_and_recreated(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "round 1")
    path = store.anchor_path
    path.unlink()
    restart()
    with pytest.warns(UserWarning, match="freshness anchor .* is missing or unreadable"):
        assert DeviceStore(tmp_path / "s").load_text("ledger") == "round 1"
    DeviceStore(tmp_path / "s").save_text("ledger", "round 2")
    assert path.is_file()
    assert [e["event"] for e in read_freshness_events(tmp_path / "s")] == ["anchor-missing", "anchor-recreated"]
    path.write_bytes(b"\0" * path.stat().st_size)  # unreadable: the same as missing
    restart()
    with pytest.warns(UserWarning, match="missing or unreadable"):
        assert DeviceStore(tmp_path / "s").load_text("ledger") == "round 2"


def test_anchor_folder_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv(ANCHOR_ENV, str(tmp_path / "elsewhere"))
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "x")
    assert store.anchor_path.parent == tmp_path / "elsewhere" and store.anchor_path.is_file()
    assert not (tmp_path / "_fedpersona-anchors").exists()
    given = DeviceStore(tmp_path / "t", anchor_dir=tmp_path / "given")
    given.save_text("ledger", "y")
    assert given.anchor_path.parent == tmp_path / "given"


def test_fresh_folder_and_key_only_folder(tmp_path):
    assert DeviceStore(tmp_path / "new").load_text("ledger") is None
    store = DeviceStore(tmp_path / "k")
    store._load_key(create=True)  # a crash right after the key was created
    restart()
    assert DeviceStore(tmp_path / "k").load_text("ledger") is None
    DeviceStore(tmp_path / "k").save_text("ledger", SECRET)
    assert DeviceStore(tmp_path / "k").load_text("ledger") == SECRET


def test_layout_and_permissions(tmp_path):
    store = DeviceStore(tmp_path / "s")
    for i in range(5):
        store.save_text("ledger", f"{SECRET} {i}")
        store.save_tensors("personal", tensors())
    assert files(tmp_path / "s") == [".lock", *JOURNALS, "device.key"]
    assert len(files(tmp_path / "_fedpersona-anchors")) == 1
    for folder in (tmp_path / "s", tmp_path / "_fedpersona-anchors"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0
        for name in files(folder):
            assert stat.S_IMODE((folder / name).stat().st_mode) & 0o077 == 0


def test_transaction_is_one_commit_and_reads_its_own_writes(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "before")
    with store.transaction():
        store.save_text("ledger", "after")
        store.save_tensors("personal", tensors())
        other = DeviceStore(tmp_path / "s")  # another handle on the same folder, in the same thread
        assert other.load_text("ledger") == "after" and other.exists("personal")
        other.save_text("participation", "[1]")
        with other.transaction():  # joins the outer one
            other.save_text("reveals", "{}")
        assert store.generation == 1  # nothing committed yet
    assert store.generation == 2
    restart()
    again = DeviceStore(tmp_path / "s")
    assert again.names() == ["ledger", "participation", "personal", "reveals"]
    assert again.load_text("ledger") == "after"


def test_deferred_transaction_joins_the_next_commit(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "round 1")
    with store.transaction(defer=True):
        store.save_tensors("lower-activations", {"h": torch.ones(2, 2)})
        store.save_text("profile", "writes like Horatio")
    assert store.generation == 1 and store.exists("profile")  # not committed; seen by this process
    assert DeviceStore(tmp_path / "s").load_text("profile") == "writes like Horatio"
    with pytest.raises(RuntimeError):
        with store.transaction(defer=True):
            store.save_text("profile", "a plan that failed")
            raise RuntimeError("refused")
    assert store.load_text("profile") == "writes like Horatio"
    with store.transaction():
        store.save_text("ledger", "round 2")
    assert store.generation == 2  # one commit: the message's writes and the deferred ones
    restart()
    again = DeviceStore(tmp_path / "s")
    assert again.load_text("profile") == "writes like Horatio" and again.load_tensors("lower-activations") is not None
    with again.transaction(defer=True):
        again.save_text("profile", "older")
    again.save_text("profile", "newer")  # a direct save: the deferred older value must not come back
    with again.transaction():
        again.save_text("ledger", "round 3")
    assert again.load_text("profile") == "newer"


def test_transaction_that_raises_commits_nothing(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "before")
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            store.save_text("ledger", "after")
            raise RuntimeError("boom")
    assert store.load_text("ledger") == "before" and store.generation == 1


def test_concurrent_change_of_a_written_blob_fails_the_commit(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "spent 1")
    with pytest.raises(StateError, match="ledger changed in another process during this transaction"):
        with store.transaction():
            store.save_text("ledger", "spent 2")
            pid = os.fork()
            if pid == 0:  # another process of the same device commits meanwhile
                try:
                    restart()
                    DeviceStore(tmp_path / "s").save_text("ledger", "spent 2 elsewhere")
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
    assert store.load_text("ledger") == "spent 2 elsewhere"


def test_failed_write_leaves_old_state(tmp_path, monkeypatch):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "pwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save_text("ledger", "new")
    monkeypatch.undo()
    restart()
    assert DeviceStore(tmp_path / "s").load_text("ledger") == "old"
    DeviceStore(tmp_path / "s").save_text("ledger", "newer")
    assert DeviceStore(tmp_path / "s").load_text("ledger") == "newer"


@pytest.mark.parametrize("name", ["", "../x", "a/b", "_journal-a", ".hidden", "x" * 200])
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="blob name"):
        DeviceStore(tmp_path / "s").save_text(name, "x")


def test_journal_stays_small_and_snapshots_keep_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_COMPACT_RECORDS", 8)
    store = DeviceStore(tmp_path / "s")
    store.save_tensors("activations", {"h": torch.zeros(256, 64)})  # written once, carried by every snapshot
    for i in range(3 * store_module._COMPACT_RECORDS):
        with store.transaction():
            store.save_text("ledger", f"round {i}")
            store.save_tensors("personal", {"w": torch.full((8,), float(i))})
    live = 256 * 64 * 4
    total = sum((tmp_path / "s" / j).stat().st_size for j in JOURNALS)
    assert total < 2 * live + (1 << 20)
    restart()
    again = DeviceStore(tmp_path / "s")
    assert again.load_text("ledger") == f"round {3 * store_module._COMPACT_RECORDS - 1}"
    assert again.load_tensors("activations")["h"].shape == (256, 64)
    assert again.generation == 1 + 3 * store_module._COMPACT_RECORDS


# ------------------------------------------------------------------------------------------- receipts
def test_receipt_is_opaque_and_bound_to_the_device(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "spent 1")
    r1 = store.receipt()
    assert len(r1) == 84 and store.receipt() != r1  # fresh nonce: the server cannot tell two apart
    assert store.check_receipt(r1) is True
    other = DeviceStore(tmp_path / "t")
    other.save_text("ledger", "x")
    assert other.check_receipt(r1) is False  # another device's: ignored
    assert store.check_receipt(os.urandom(84)) is False  # made up: ignored
    forged = bytearray(r1)
    forged[30] ^= 1
    assert store.check_receipt(bytes(forged)) is False


def test_stale_receipt_is_accepted_newer_one_refuses_and_the_refusal_persists(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "spent 1")
    old = store.receipt()
    shutil.copytree(tmp_path / "s", tmp_path / "backup")
    store.save_text("ledger", "spent 3.9")
    new = store.receipt()
    assert store.check_receipt(old) is True  # older than the state: proves nothing newer
    anchor_dir = tmp_path / "_fedpersona-anchors"
    shutil.rmtree(tmp_path / "s")
    shutil.copytree(tmp_path / "backup", tmp_path / "s")
    shutil.rmtree(anchor_dir)  # the local anchor gone too
    restart()
    with pytest.warns(UserWarning, match="missing"):
        restored = DeviceStore(tmp_path / "s")
        assert restored.check_receipt(old) is True
    with pytest.raises(RollbackDetected, match="generation 1 but the server's receipt shows generation 2"):
        restored.check_receipt(new)
    restart()  # the server withholds the receipt from now on: still refused (the anchor was raised and marked)
    with pytest.raises(RollbackDetected, match="refused since a rollback was detected"):
        DeviceStore(tmp_path / "s").load_text("ledger")
    events = [(e["event"], e.get("source")) for e in read_freshness_events(tmp_path / "s")]
    assert ("rollback-detected", "receipt") in events


# ------------------------------------------------------------------------------------------- fsyncs
def test_a_commit_fsyncs_twice_however_many_blobs(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_COMPACT_RECORDS", 4)
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "first")  # creating the store: key, journals, anchor (once)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    for i in range(2 * store_module._COMPACT_RECORDS):  # snapshots included
        calls.clear()
        with store.transaction():
            for name in ("shared-received", "shared-received-config", "ledger", "ledger-head", "personal",
                         "participation", "secagg-reveals", "evaluation", "profile", "feedback-used"):
                store.save_text(name, f"{name} {i}")
        assert len(calls) == 2, (i, len(calls))
    calls.clear()
    with store.transaction():
        store.load_text("ledger")
    assert calls == []  # a transaction without writes commits nothing


# ------------------------------------------------------------------------------------------- crashes
def _commit(folder, i, *, snapshot=False, group=False):
    if snapshot:
        store_module._COMPACT_RECORDS = 1
    store = DeviceStore(folder)
    if group:  # the commit's fsyncs and anchor deferred to the group's flush (a simulation's grid)
        with group_commit():
            _commit(folder, i, snapshot=snapshot)
        return
    with store.transaction():
        store.save_text("ledger", json.dumps({"round": i}))
        store.save_tensors("personal", {"w": torch.full((64,), float(i))})
        store.save_text("participation", json.dumps(list(range(i))))


def _check_consistent(folder, committed: int, attempted: int) -> int:
    """The state after a crash: all of one commit's writes (the last committed or the attempted one), never refused."""
    restart()
    store = DeviceStore(folder)
    text = store.load_text("ledger")
    i = json.loads(text)["round"] if text is not None else 0
    assert i in (committed, attempted), (i, committed, attempted)
    if i:
        assert torch.equal(store.load_tensors("personal")["w"], torch.full((64,), float(i)))
        assert json.loads(store.load_text("participation")) == list(range(i))
    else:
        assert store.load_tensors("personal") is None and store.load_text("participation") is None
    return i


def _crash_at(n: int):
    """Patches in a forked child: the n-th write/fsync/truncate call kills the process (a write: half done)."""
    count = {"n": 0}
    real = {name: getattr(os, name) for name in ("write", "pwrite", "fsync", "fdatasync", "ftruncate", "truncate")}

    def hit():
        count["n"] += 1
        return count["n"] == n

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write(fd, data):
        if hit():
            real["write"](fd, bytes(data)[: len(data) // 2])
            die()
        return real["write"](fd, data)

    def pwrite(fd, data, offset):
        if hit():
            real["pwrite"](fd, bytes(data)[: len(data) // 2], offset)
            die()
        return real["pwrite"](fd, data, offset)

    def plain(name):
        def call(*args):
            if hit():
                die()
            return real[name](*args)
        return call

    os.write, os.pwrite = write, pwrite
    for name in ("fsync", "fdatasync", "ftruncate", "truncate"):
        setattr(os, name, plain(name))


@pytest.mark.parametrize("mode", ["create", "delta", "snapshot", "group-create", "group-delta", "group-snapshot"])
def test_kill_9_at_every_point_of_a_commit(tmp_path, mode):
    """A crash at each write (half written), fsync and truncate of a commit: after a restart the state holds
    all of the commit's writes or none, and is never refused. ``group-*``: the commit inside a group commit,
    the crash points including its flush (the records' fsync, then the anchor's write)."""
    group = mode.startswith("group-")
    mode = mode.removeprefix("group-")
    points = 0
    for n in range(1, 60):
        folder = tmp_path / f"s{n}"
        committed = 0 if mode == "create" else 2
        for i in range(1, committed + 1):
            _commit(folder, i)
        restart()
        pid = os.fork()
        if pid == 0:
            try:
                _crash_at(n)
                _commit(folder, committed + 1, snapshot=mode == "snapshot", group=group)
            finally:
                os._exit(0)  # the commit completed: n is past its last I/O call
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        got = _check_consistent(folder, committed, committed + 1)
        if not killed:
            assert got == committed + 1
            break
        points += 1
        _commit(folder, committed + 2)  # the device goes on from the state it found
        assert _check_consistent(folder, committed + 2, committed + 2) == committed + 2
        assert not any(e["event"] == "rollback-detected" for e in read_freshness_events(folder))
    print(f"{mode}: {points} crash points")
    assert points >= 4, f"only {points} crash points in a {mode} commit"


def test_kill_9_at_random_times_during_commits(tmp_path):
    """40 kill -9s of a process committing in a loop: never a refused state, never a half commit."""
    folder = tmp_path / "s"
    rng = random.Random(0)
    committed = 0
    for _ in range(40):
        restart()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                restart()
                i = committed
                while True:
                    i += 1
                    _commit(folder, i, snapshot=i % 7 == 0)
                    store_module._COMPACT_RECORDS = 64
                    os.write(w, f"{i}\n".encode())
            finally:
                os._exit(0)
        os.close(w)
        time.sleep(rng.uniform(0.002, 0.04))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        acknowledged = [int(x) for x in os.read(r, 1 << 16).decode().split()]
        os.close(r)
        last = acknowledged[-1] if acknowledged else committed
        # A commit the child saw complete is there (the reply would have left after it); the next may be too.
        got = _check_consistent(folder, last, last + 1)
        assert got >= last
        committed = got
    assert committed > 10  # the child got on between kills
    assert FRESHNESS_FILE not in files(folder)  # no rollback detected, no anchor lost


# --------------------------------------------------------------------------------------------- group commit
def _fsync_log(monkeypatch, fail=None):
    """Record each fsync's file (and raise EIO for the files whose path contains ``fail``)."""
    log, real = [], os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        log.append(path)
        if fail and fail in path:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return log


def test_a_group_commit_makes_records_durable_then_anchors_at_its_flush(tmp_path, monkeypatch):
    """Inside ``group_commit`` a commit's fsync and anchor wait for the flush; the flush fsyncs every folder's
    journal before it writes that folder's anchor; afterwards the state and its anchor are the newest."""
    folders = [tmp_path / f"dev{i}" for i in range(5)]
    for f in folders:
        _commit(f, 1)  # created outside: the creation is synchronous anyway
    log = _fsync_log(monkeypatch)
    with group_commit() as group:
        for i, f in enumerate(folders):
            group.tag = i
            _commit(f, 2)
            _commit(f, 3)  # a second commit of the same folder in the batch: one anchor, the newest
        assert log == [], "nothing is fsynced before the flush"
        assert group.commits == 10
    assert group.failed == {}
    for f in folders:
        store = DeviceStore(f)
        anchor = str(store._anchor_file(store._load_key(create=False)))
        assert anchor.startswith(str(default_anchor_dir(f)))
        journal_at = [i for i, p in enumerate(log) if p.startswith(str(f) + "/_journal")]
        anchor_at = [i for i, p in enumerate(log) if p == anchor]
        assert len(journal_at) == 1 and len(anchor_at) == 1 and journal_at[0] < anchor_at[0], (f, log)
    assert len(log) == 10  # per folder: one journal fsync, one anchor fsync
    restart()
    for f in folders:
        store = DeviceStore(f)
        assert json.loads(store.load_text("ledger")) == {"round": 3} and store.generation == 3
        key = store._load_key(create=False)
        assert store._read_anchor(key).gen == 3


def test_a_failed_flush_answers_its_tags_and_refuses_the_folder_until_a_restart(tmp_path, monkeypatch):
    """A folder whose records could not be fsynced: its tag is answered with the reason, its anchor is not
    written, every later use in this process is refused; the other folders of the batch are durable."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    _commit(bad, 1)
    _commit(good, 1)
    _fsync_log(monkeypatch, fail=str(bad) + "/_journal")
    with group_commit() as group:
        group.tag = "b"
        _commit(bad, 2)
        group.tag = "g"
        _commit(good, 2)
    assert list(group.failed) == ["b"] and "could not be made durable" in group.failed["b"]
    with pytest.raises(StateError, match="could not be made durable"):
        DeviceStore(bad).load_text("ledger")
    with pytest.raises(StateError, match="could not be made durable"):
        _commit(bad, 3)
    monkeypatch.undo()
    assert json.loads(DeviceStore(good).load_text("ledger")) == {"round": 2}
    restart()  # the device restarts: it reads what the disk holds, a whole commit, never refused
    got = _check_consistent(bad, 1, 2)
    _commit(bad, got + 1)
    assert _check_consistent(bad, got + 1, got + 1) == got + 1


def test_a_synchronous_anchor_supersedes_an_older_deferred_one(tmp_path):
    """A snapshot inside a group writes its records synchronously; an anchor written synchronously later than a
    deferred one (a refusal, the next snapshot) is never overwritten by the older one at the flush."""
    folder = tmp_path / "s"
    _commit(folder, 1)
    with group_commit():
        _commit(folder, 2)  # deferred anchor at generation 2
        store = DeviceStore(folder)
        key = store._load_key(create=False)
        store._write_anchor(key, store_module._Anchor(store._folder.state.store_id, 2, store._folder.state.chain))
        assert store._folder.deferred_anchor is None
        _commit(folder, 3, snapshot=True)
        store_module._COMPACT_RECORDS = 64
    restart()
    store = DeviceStore(folder)
    assert store.generation == 3 and store._read_anchor(store._load_key(create=False)).gen == 3


def test_prepare_stores_makes_new_devices_keys_and_anchors_and_never_touches_a_lost_one(tmp_path, monkeypatch):
    """Prepared ahead (concurrently): a new folder's key and its anchor at generation 0, whose store id its first
    commit takes (writing no anchor of generation 0 again); a folder that holds state but lost its key is left
    alone (its next use says the key is missing, as without preparing)."""
    fresh = [DeviceStore(tmp_path / f"new{i}") for i in range(4)]
    _commit(tmp_path / "lost", 1)
    (tmp_path / "lost" / "device.key").unlink()
    restart()
    lost = DeviceStore(tmp_path / "lost")
    prepare_stores(fresh + [lost])
    anchors = {}
    for store in fresh:
        assert store.key_path.exists() and stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
        a = store._read_anchor(store._load_key(create=False))
        assert a.gen == 0 and not any(p.exists() for p in store._journal_paths())
        anchors[store.state_dir] = a
    assert not lost.key_path.exists()
    with pytest.raises(StateError, match="missing"):
        lost.load_text("ledger")
    prepare_stores(fresh)  # again: nothing changes
    assert all(s._read_anchor(s._load_key(create=False)) == anchors[s.state_dir] for s in fresh)
    written = []
    real = DeviceStore._write_anchor
    monkeypatch.setattr(DeviceStore, "_write_anchor", lambda self, key, anchor, both=False: (
        written.append(anchor.gen), real(self, key, anchor, both=both))[1])
    restart()
    _commit(fresh[0].state_dir, 1)
    assert written == [1]  # generation 0 was on disk already
    restart()
    store = DeviceStore(fresh[0].state_dir)
    assert json.loads(store.load_text("ledger")) == {"round": 1}
    assert store._folder.state.store_id == anchors[store.state_dir].store_id
    # A crash between the prepared anchor and the first record, or in the record: a torn first commit, accepted.
    (fresh[1].state_dir / JOURNALS[0]).write_bytes(b"FPJ2 torn")
    restart()
    assert DeviceStore(fresh[1].state_dir).load_text("ledger") is None
    _commit(fresh[1].state_dir, 1)
    assert _check_consistent(fresh[1].state_dir, 1, 1) == 1


# ------------------------------------------------------------------------------------------- earlier layout
def _v1_store(folder, key: bytes, blobs: dict[str, tuple[bytes, bytes, int]], manifest: dict[str, int]):
    """Write a state folder in the earlier one-file-per-blob layout (format v1), as it was on disk."""
    import secrets

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    folder.mkdir(parents=True)

    def enc(filename, kind, gen, payload):
        nonce = secrets.token_bytes(12)
        plain = kind + gen.to_bytes(8, "big") + payload
        aad = b"fedpersona-device-store/v1\x00" + filename.encode()
        return b"FPS1" + nonce + AESGCM(key).encrypt(nonce, plain, aad)

    for name, (kind, payload, gen) in blobs.items():
        (folder / f"{name}.enc").write_bytes(enc(f"{name}.enc", kind, gen, payload))
    doc = json.dumps({"version": 1, "blobs": manifest}).encode()
    (folder / "_manifest.enc").write_bytes(enc("_manifest.enc", b"M", 0, doc))


def test_earlier_layout_is_converted_with_its_checks(tmp_path):
    key = os.urandom(32)
    _v1_store(tmp_path / "s", key, {"ledger": (b"S", b"spent 3.9", 4), "personal": (b"T", b"\x00" * 8, 1)},
              {"ledger": 4, "personal": 1})
    store = DeviceStore(tmp_path / "s", key=key)
    assert store.load_text("ledger") == "spent 3.9"
    assert files(tmp_path / "s") == [".lock", *JOURNALS]  # converted: the old files are gone
    assert store.anchor_path.is_file()
    # Its rollback check still applied to the files as found: an older ledger file than the manifest says.
    _v1_store(tmp_path / "old", key, {"ledger": (b"S", b"spent 1.0", 2)}, {"ledger": 4})
    with pytest.raises(StateError, match="rolled back"):
        DeviceStore(tmp_path / "old", key=key).load_text("ledger")
    _v1_store(tmp_path / "gone", key, {}, {"ledger": 4})
    with pytest.raises(StateError, match="ledger.*was deleted; refusing to start with a fresh privacy budget"):
        DeviceStore(tmp_path / "gone", key=key).load_text("ledger")


# ------------------------------------------------------------------------------------------- a participation
@pytest.mark.parametrize("engine", [False, True], ids=["devices-train", "cohort-engine"])
def test_a_participation_fsyncs_at_most_twice_per_message(tiny_config, tmp_path, monkeypatch, engine):
    """The real ClientApp on real (tiny) devices, two rounds and the final evaluation under secure aggregation:
    every message is one commit (one generation), and costs at most two fsyncs of the device's files (its
    journal's and its anchor's; the grid's group commit makes them at the batch's flush, before the replies
    leave: tests/simulations/test_inprocess_durability.py), besides the one-off creation of the store (key,
    anchor at generation 0). With the cohort engine, what the grid saves while it builds and plans the devices
    ahead of their train messages joins those messages' commits (no fsync of its own)."""
    import warnings

    import fedpersona.client.app as client_app
    import fedpersona.client.flow_log as client_inventory
    from fedpersona.config import load_config
    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.engine.grid import EngineGrid
    from fedpersona.simulations.inprocess import InProcessGrid
    from tests.adversarial.helpers import flat_config, user_folders

    flat = flat_config(tiny_config, **{"server.num-rounds": 2, "eval.final": True})
    nodes = user_folders(tmp_path)
    phase = ["server"]
    calls: dict[str, int] = {}
    counts: list[tuple[str, int, int]] = []  # (message type, node, committed generation at reply)
    synced: list[str] = []  # the file of every fsync
    real_fsync = os.fsync

    def fsync(fd):
        calls[phase[0]] = calls.get(phase[0], 0) + 1
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def counting_app(message, context):
        phase[0] = "message"
        calls.pop("message", None)
        try:
            reply = client_app.app(message, context)
        finally:
            phase[0] = "server"
        generation = DeviceStore(context.node_config["state-dir"]).generation
        counts.append((message.metadata.message_type, context.node_id, generation))
        return reply

    if engine:
        ahead = EngineGrid._train_ahead

        def planning(self, messages):
            phase[0] = "planning"
            try:
                return ahead(self, messages)
            finally:
                phase[0] = "server"

        monkeypatch.setattr(EngineGrid, "_train_ahead", planning)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fsync)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        grid = (EngineGrid if engine else InProcessGrid)(counting_app, nodes, flat, run_id=77)
        with grid:
            metrics = run_federation(grid, cfg)
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()
    assert [r["applied"] for r in metrics["rounds"]] == [True, True] and not metrics["final"].get("aborted")
    if engine:
        assert grid.cohorts == 2 and grid.fallbacks == 0  # the rounds were trained by the engine
        assert calls.get("planning", 0) == 0
    for node in nodes:
        mine = [c for c in counts if c[1] == node]
        assert [c[0] for c in mine] == ["query.advertise", *["train", "query.consistency", "query.unmask"] * 2,
                                        "evaluate", "query.consistency", "query.unmask"]
        # One commit per message: each message's writes are one generation.
        assert [c[2] for c in mine] == list(range(1, len(mine) + 1)), mine
        store = DeviceStore(nodes[node]["state-dir"])
        anchor = str(store._anchor_file(store._load_key(create=False)))
        journals = [p for p in synced if p.startswith(nodes[node]["state-dir"] + "/_journal")]
        # At most one fsync of the journal per commit, and one of the anchor per commit plus its creation.
        assert 0 < len(journals) <= len(mine), (len(journals), len(mine))
        assert 0 < synced.count(anchor) <= len(mine) + 1, (synced.count(anchor), len(mine))
        assert sum(p.startswith(nodes[node]["state-dir"] + "/.device.key.") for p in synced) == 1  # made once


def test_putting_the_newest_state_back_ends_the_refusal(tmp_path):
    store = DeviceStore(tmp_path / "s")
    store.save_text("ledger", "spent 1")
    shutil.copytree(tmp_path / "s", tmp_path / "old")
    store.save_text("ledger", "spent 3.9")
    receipt = store.receipt()
    shutil.copytree(tmp_path / "s", tmp_path / "newest")
    shutil.rmtree(tmp_path / "s")
    shutil.copytree(tmp_path / "old", tmp_path / "s")
    restart()
    with pytest.raises(RollbackDetected):
        DeviceStore(tmp_path / "s").check_receipt(receipt)
    shutil.rmtree(tmp_path / "s")
    shutil.copytree(tmp_path / "newest", tmp_path / "s")
    restart()
    healed = DeviceStore(tmp_path / "s")
    assert healed.load_text("ledger") == "spent 3.9" and healed.check_receipt(receipt)
    healed.save_text("ledger", "spent 4.0")
    shutil.rmtree(tmp_path / "s")
    shutil.copytree(tmp_path / "old", tmp_path / "s")  # and the old copy is still refused
    _assert_refused_unchanged(tmp_path / "s", "rolled back", error=RollbackDetected)


def test_a_blobs_tag_changes_with_every_write_and_is_none_while_uncommitted(tmp_path):
    store = DeviceStore(tmp_path / "state", key=b"k" * 32)
    assert store.tag("profile") is None
    store.save_text("profile", "one")
    first = store.tag("profile")
    assert first is not None and DeviceStore(tmp_path / "state", key=b"k" * 32).tag("profile") == first
    store.save_text("other", "x")
    assert store.tag("profile") == first  # another blob's commit leaves it alone
    store.save_text("profile", "one")
    assert store.tag("profile") not in (None, first)  # rewritten (even with the same text): a new tag
    with store.transaction():
        store.save_text("profile", "two")
        assert store.tag("profile") is None  # not committed yet: nothing to cache under
    assert store.load_text("profile") == "two" and store.tag("profile") is not None
