"""Device store: encrypted at rest, atomic, tamper- and deletion-evident."""

import os
import stat

import pytest
import torch

from client.store import KEY_ENV, DeviceStore, StateError

SECRET = "To be, or not to be: that is the question"


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"head.weight": torch.randn(4, 3, generator=g), "head.bias": torch.arange(3, dtype=torch.float64), "steps": torch.tensor(7)}


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_round_trip(tmp_path):
    store = DeviceStore(tmp_path / "state")
    assert store.load_text("ledger") is None and store.load_tensors("personal") is None
    store.save_text("ledger", SECRET)
    store.save_tensors("personal", tensors())
    store.save_text("ledger", SECRET + "!")  # overwrite
    again = DeviceStore(tmp_path / "state")  # a restart
    assert again.load_text("ledger") == SECRET + "!"
    loaded = again.load_tensors("personal")
    assert loaded.keys() == tensors().keys()
    for k, v in tensors().items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    assert again.exists("ledger") and not again.exists("other")
    assert again.path("ledger").parent == tmp_path / "state"


def test_views_and_shared_storage_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    store = DeviceStore(tmp_path)
    store.save_tensors("personal", {"a": base, "b": base.t(), "c": base[1]})
    loaded = store.load_tensors("personal")
    assert torch.equal(loaded["b"], base.t()) and torch.equal(loaded["c"], base[1])


def test_plaintext_not_on_disk(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", SECRET)
    store.save_tensors("personal", {"marker": torch.tensor(list(b"SECRETMARKER"), dtype=torch.uint8)})
    for p in tmp_path.iterdir():
        data = p.read_bytes()
        assert SECRET.encode() not in data and b"SECRETMARKER" not in data and b"marker" not in data


def test_fresh_nonce_per_write(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("a", SECRET)
    first = store.path("a").read_bytes()
    store.save_text("a", SECRET)
    assert store.path("a").read_bytes()[4:16] != first[4:16]


def test_key_file_created_0600_and_reused(tmp_path):
    store = DeviceStore(tmp_path)
    assert not (tmp_path / "device.key").exists()  # only created on the first write
    store.save_text("ledger", SECRET)
    key_file = tmp_path / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) == 64
    assert DeviceStore(tmp_path).load_text("ledger") == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_key_file_refused(tmp_path, mode):
    DeviceStore(tmp_path).save_text("ledger", SECRET)
    os.chmod(tmp_path / "device.key", mode)
    with pytest.raises(StateError, match=r"device\.key has permissions.*refusing"):
        DeviceStore(tmp_path).load_text("ledger")
    with pytest.raises(StateError, match="refusing"):
        DeviceStore(tmp_path).save_text("ledger", "x")


def test_env_key(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv(KEY_ENV, key.hex())
    DeviceStore(tmp_path).save_text("ledger", SECRET)
    assert not (tmp_path / "device.key").exists()
    assert DeviceStore(tmp_path).load_text("ledger") == SECRET
    assert DeviceStore(tmp_path, key=key).load_text("ledger") == SECRET  # the same key, given directly
    monkeypatch.setenv(KEY_ENV, "abc")
    with pytest.raises(ValueError, match=KEY_ENV):
        DeviceStore(tmp_path)


def test_bad_key_argument(tmp_path):
    with pytest.raises(ValueError, match="32 bytes"):
        DeviceStore(tmp_path, key=b"short")


def _assert_refused_unchanged(store, name, match, loader="load_text"):
    before = store.path(name).read_bytes()
    with pytest.raises(StateError, match=match):
        getattr(store, loader)(name)
    assert store.path(name).read_bytes() == before


def test_wrong_key(tmp_path):
    DeviceStore(tmp_path, key=b"k" * 32).save_text("ledger", SECRET)
    other = DeviceStore(tmp_path, key=b"j" * 32)
    _assert_refused_unchanged(other, "ledger", "failed authentication")


@pytest.mark.parametrize("offset", [0, 5, 20, -1])
def test_tampered_byte(tmp_path, offset):
    store = DeviceStore(tmp_path)
    store.save_tensors("personal", tensors())
    path = store.path("personal")
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    _assert_refused_unchanged(store, "personal", str(path).replace(".", r"\."), loader="load_tensors")


@pytest.mark.parametrize("keep", [0, 10, 40, -1])
def test_truncated_file(tmp_path, keep):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", SECRET * 10)
    path = store.path("ledger")
    path.write_bytes(path.read_bytes()[:keep])
    _assert_refused_unchanged(store, "ledger", "truncated|failed authentication")


def test_renamed_file(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", "spent a lot")
    store.save_text("ledger-local-baseline", "spent little")
    # Swap in the other blob's file under the ledger's name: valid ciphertext, wrong name.
    store.path("ledger").write_bytes(store.path("ledger-local-baseline").read_bytes())
    _assert_refused_unchanged(store, "ledger", "renamed")


def test_wrong_kind(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", SECRET)
    _assert_refused_unchanged(store, "ledger", "holds text, not tensors", loader="load_tensors")


def test_deleted_ledger_detected(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", SECRET)
    store.save_tensors("personal", tensors())
    store.path("ledger").unlink()
    with pytest.raises(StateError, match="ledger.*was deleted; refusing to start with a fresh privacy budget"):
        DeviceStore(tmp_path).load_text("ledger")
    assert DeviceStore(tmp_path).load_tensors("personal") is not None  # the others still load


def test_deleted_manifest_detected(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_tensors("personal", tensors())
    store.save_text("ledger", SECRET)
    store.path("ledger").unlink()
    store.manifest_path.unlink()
    with pytest.raises(StateError, match="manifest.*missing.*fresh privacy budget"):
        DeviceStore(tmp_path).load_text("ledger")
    with pytest.raises(StateError, match="manifest.*missing"):
        DeviceStore(tmp_path).save_text("ledger", "{}")


def test_deleted_key_detected(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", SECRET)
    (tmp_path / "device.key").unlink()
    with pytest.raises(StateError, match="key .* is missing"):
        DeviceStore(tmp_path).load_text("ledger")


def test_rolled_back_file_detected(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", "round 1")
    old = store.path("ledger").read_bytes()
    store.save_text("ledger", "round 2")
    store.path("ledger").write_bytes(old)
    _assert_refused_unchanged(store, "ledger", "rolled back")


def test_crash_between_blob_and_manifest_still_loads(tmp_path):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", "round 1")
    manifest = store.manifest_path.read_bytes()
    store.save_text("ledger", "round 2")
    store.manifest_path.write_bytes(manifest)  # as if the manifest write never happened
    assert store.load_text("ledger") == "round 2"
    store.save_text("ledger", "round 3")
    assert store.load_text("ledger") == "round 3"


def test_fresh_folder_and_key_only_folder(tmp_path):
    assert DeviceStore(tmp_path / "new").load_text("ledger") is None
    store = DeviceStore(tmp_path / "k")
    store._load_key(create=True)  # a crash right after the key was created
    assert DeviceStore(tmp_path / "k").load_text("ledger") is None
    DeviceStore(tmp_path / "k").save_text("ledger", SECRET)
    assert DeviceStore(tmp_path / "k").load_text("ledger") == SECRET


def test_atomic_no_temp_files(tmp_path):
    store = DeviceStore(tmp_path)
    for i in range(5):
        store.save_text("ledger", f"{SECRET} {i}")
        store.save_tensors("personal", tensors())
    assert files(tmp_path) == [".lock", "_manifest.enc", "device.key", "ledger.enc", "personal.enc"]
    for name in files(tmp_path):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) & 0o077 == 0


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    store = DeviceStore(tmp_path)
    store.save_text("ledger", "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save_text("ledger", "new")
    monkeypatch.undo()
    assert store.load_text("ledger") == "old"
    assert not [n for n in files(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("name", ["", "../x", "a/b", "_manifest", ".hidden", "x" * 200])
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="blob name"):
        DeviceStore(tmp_path).save_text(name, "x")
