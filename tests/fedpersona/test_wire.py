"""fedpersona.wire: the packed broadcast of the shared adapter and the per-tensor device records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpersona.wire import pack_shared, to_record, unpack_shared


def _tensors(n=28):
    g = torch.Generator().manual_seed(0)
    return {f"base_model.layers.{i // 7}.m{i % 7}.lora_B.shared.weight": torch.randn(96 - i, 8, generator=g)
            for i in range(n)}


def test_pack_round_trips_names_shapes_and_values():
    t = _tensors()
    content = RecordDict({**pack_shared(t), "config": ConfigRecord({"server-round": 3})})
    back = unpack_shared(content)
    assert list(back) == list(t)
    for name in t:
        assert back[name].shape == t[name].shape and torch.equal(back[name], t[name])


def test_packed_broadcast_is_a_handful_of_flower_objects():
    t = _tensors()
    per_tensor = len(get_all_nested_objects(RecordDict({"shared": to_record(t)})))
    packed = len(get_all_nested_objects(RecordDict(pack_shared(t))))
    assert per_tensor >= 2 * len(t)  # an object per array and per chunk: one transfer each
    assert packed <= 5


def test_a_per_tensor_record_still_reads_and_mixed_dtypes_stay_per_tensor():
    t = _tensors(3)
    assert all(torch.equal(unpack_shared(RecordDict({"shared": to_record(t)}))[n], t[n]) for n in t)
    mixed = dict(t, extra=torch.ones(2, dtype=torch.float64))
    parts = pack_shared(mixed)
    assert set(parts) == {"shared"} and set(parts["shared"]) == set(mixed)
    assert unpack_shared(RecordDict(parts))["extra"].dtype == torch.float64


def test_a_layout_that_does_not_match_the_array_is_rejected():
    parts = pack_shared(_tensors(3))
    layout = parts["shared-layout"]
    bad = ConfigRecord({"names": list(layout["names"]), "shapes": ["1,1"] * 3})
    with pytest.raises(ValueError, match="values, its layout"):
        unpack_shared(RecordDict({"shared": parts["shared"], "shared-layout": bad}))
    dup = ConfigRecord({"names": [layout["names"][0]] * 3, "shapes": list(layout["shapes"])})
    with pytest.raises(ValueError, match="malformed"):
        unpack_shared(RecordDict({"shared": parts["shared"], "shared-layout": dup}))
    with pytest.raises(KeyError):
        unpack_shared(RecordDict({"config": ConfigRecord({"a": 1})}))


def test_numpy_arrays_pack_too():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    back = unpack_shared(RecordDict(pack_shared(arrays)))
    assert back["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and back["b"].shape == (4,)


def test_array_numpy_is_flowers_numpy_without_parsing_each_header():
    """The same array (values, dtype, shape, order; writable) as ``Array.numpy()``, and the same error or result
    for data that is cut short, too long, or has a broken header, as a hostile server could send."""
    from flwr.app import Array

    from fedpersona.wire import array_numpy

    rng = np.random.default_rng(0)
    for value in [np.zeros(0), np.arange(5, dtype=np.int64), rng.normal(size=(3, 4)).astype(np.float32),
                  np.asfortranarray(rng.normal(size=(3, 4))), np.array(3.5), np.zeros((2, 0, 3)),
                  rng.integers(0, 2**31, size=(7,), dtype=np.uint32), np.array([True, False]), np.array(["ab", "c"]),
                  rng.normal(size=(2, 3)).astype(">f8")]:
        arr = Array(value)
        ours, theirs = array_numpy(arr), arr.numpy()
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)
        assert ours.flags.writeable

    def outcome(fn, arr):
        try:
            return "ok", fn(arr).tolist()
        except Exception as exc:  # noqa: BLE001 - the comparison is the point
            return type(exc).__name__, None

    good = Array(np.arange(10.0))
    for data in [good.data[:-8], good.data + b"\0" * 8, good.data[:20], b"\x93NUMPY\x01\x00\xff\xff" + b"x" * 20,
                 good.data.replace(b"(10,)", b"(-1,)"), good.data.replace(b"<f8", b"|O8")]:
        arr = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=data)
        assert outcome(array_numpy, arr) == outcome(Array.numpy, arr)
