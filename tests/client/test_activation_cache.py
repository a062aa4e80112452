"""The frozen lower blocks' outputs kept in the device's encrypted store and read back when it is built again."""

import json

import pytest
import torch

import fedpersona.client.device as device_mod
from fedpersona.client.device import ACTIVATIONS, Device
from fedpersona.config import load_config

from tests.client.device_helpers import REPLIES


def _device(tiny_config, tmp_path, replies=REPLIES * 2, **overrides):
    folder = tmp_path / "alice"
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"cue": f"Who's there? number {i}", "reply": r}) for i, r in enumerate(replies)]
    (folder / "lines.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(dict(tiny_config, **{"privacy.delta": 1e-2, "data.max-examples": 12, "secagg.enabled": False},
                           **overrides), env=False)
    return Device(cfg, {"data-dir": str(folder), "state-dir": str(tmp_path / "state"), "user-id": "alice",
                        "policy.allow-no-secagg": True})


@pytest.fixture
def lower_calls(monkeypatch):
    calls = []
    real = device_mod.lower_hidden

    def counting(model, seqs, **kw):
        calls.append(len(seqs))
        return real(model, seqs, **kw)

    monkeypatch.setattr(device_mod, "lower_hidden", counting)
    return calls


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x.hidden, y.hidden) and x.labels == y.labels for x, y in zip(a, b))


def test_a_device_built_again_reads_its_activations_instead_of_running_the_lower_blocks(tiny_config, tmp_path,
                                                                                          lower_calls):
    first = _device(tiny_config, tmp_path)
    assert lower_calls == [len(first.data.train) + len(first.data.held_out)], "one sweep over both splits"
    assert first.store.exists(ACTIVATIONS)
    raw = (tmp_path / "state").glob("*")
    assert not any(b"Who's there" in p.read_bytes() for p in raw if p.is_file()), "the blob is encrypted"
    again = _device(tiny_config, tmp_path)
    assert len(lower_calls) == 1, "the second build ran no lower block"
    assert _same(first.data.train, again.data.train) and _same(first.data.held_out, again.data.held_out)
    # and the device trains from them as before
    again.train_round(again.model.initial_shared_state(), server_round=1)


def test_other_examples_or_another_model_are_computed_afresh(tiny_config, tmp_path, lower_calls):
    _device(tiny_config, tmp_path)
    assert len(lower_calls) == 1
    changed = _device(tiny_config, tmp_path, replies=[r + " Ay." for r in REPLIES * 2])
    assert len(lower_calls) == 2, "new examples: new activations"
    fresh_data = device_mod.prepare_user(changed.model, changed.cfg, "alice", changed.pairs)  # without a store
    assert _same(changed.data.train, fresh_data.train)
    _device(tiny_config, tmp_path, **{"adapter.layers": 1})  # another cache boundary
    assert len(lower_calls) == 4


def test_a_stored_blob_that_does_not_fit_is_recomputed(tiny_config, tmp_path, lower_calls):
    dev = _device(tiny_config, tmp_path)
    blob = dev.store.load_tensors(ACTIVATIONS)
    blob["train-lengths"] = blob["train-lengths"] + 1  # a key that matches, lengths that do not
    dev.store.save_tensors(ACTIVATIONS, blob)
    again = _device(tiny_config, tmp_path)
    assert len(lower_calls) == 2
    assert _same(dev.data.train, again.data.train)


def test_turned_off_nothing_is_stored(tiny_config, tmp_path, lower_calls):
    dev = _device(tiny_config, tmp_path, **{"client.cache-activations": False})
    _device(tiny_config, tmp_path, **{"client.cache-activations": False})
    assert not dev.store.exists(ACTIVATIONS)
    assert len(lower_calls) == 2


def test_several_users_share_one_sweep_of_the_lower_blocks(tiny_config, tmp_path, lower_calls):
    """prepare_users: every example no store holds runs through the lower blocks in one call; each user gets what
    it gets alone (up to float rounding), its activations stored; a user that cannot be prepared is skipped."""
    from fedpersona.client.store import DeviceStore

    dev = _device(tiny_config, tmp_path)  # the model and config; alice's own activations now stored
    alone = device_mod.prepare_user(dev.model, dev.cfg, "bob", [(f"cue {i}", r) for i, r in enumerate(REPLIES * 2)])
    users = [("alice", dev.pairs, dev.store),
             ("bob", [(f"cue {i}", r) for i, r in enumerate(REPLIES * 2)], DeviceStore(tmp_path / "bob")),
             ("carol", [(f"Who goes there {i}?", r + " Ay.") for i, r in enumerate(REPLIES * 3)],
              DeviceStore(tmp_path / "carol")),
             ("dave", [("one", "only")], DeviceStore(tmp_path / "dave"))]
    del lower_calls[:]
    out = device_mod.prepare_users(dev.model, dev.cfg, users, batch_size=64, skip_failed=True)
    assert out[3] is None, "one example: skipped, the others prepared"
    alice, bob, carol = out[:3]
    n_bob, n_carol = (len(d.train) + len(d.held_out) for d in (bob, carol))
    assert lower_calls == [n_bob + n_carol], "alice's were read back; bob's and carol's in one sweep"
    assert _same(alice.train, dev.data.train) and _same(alice.held_out, dev.data.held_out)
    for a, b in zip(alone.train + alone.held_out, bob.train + bob.held_out):
        assert a.labels == b.labels
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-6)
    assert DeviceStore(tmp_path / "bob").exists(ACTIVATIONS) and DeviceStore(tmp_path / "carol").exists(ACTIVATIONS)
    with pytest.raises(ValueError, match="at least 2"):
        device_mod.prepare_users(dev.model, dev.cfg, users)


def test_a_store_that_cannot_be_read_fails_only_its_own_user(tiny_config, tmp_path):
    """A device whose state was tampered with (its key readable by others: refused) is skipped from a shared sweep;
    the others are prepared; alone, its preparation raises the store's refusal."""
    import os

    from fedpersona.client.store import DeviceStore, StateError

    dev = _device(tiny_config, tmp_path)
    bad = DeviceStore(tmp_path / "mallory")
    bad.save_text("x", "y")
    os.chmod(bad.key_path, 0o644)
    pairs = [(f"cue {i}", r) for i, r in enumerate(REPLIES * 2)]
    out = device_mod.prepare_users(dev.model, dev.cfg, [("mallory", pairs, DeviceStore(tmp_path / "mallory")),
                                                        ("bob", pairs, DeviceStore(tmp_path / "bob"))],
                                   skip_failed=True)
    assert out[0] is None and out[1] is not None and len(out[1].train) > 0
    with pytest.raises(StateError, match="permissions"):
        device_mod.prepare_users(dev.model, dev.cfg, [("mallory", pairs, DeviceStore(tmp_path / "mallory"))])
