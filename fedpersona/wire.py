"""What travels in Flower messages: name-keyed tensors <-> ``ArrayRecord``, and their inventory.

Only :func:`to_record` puts tensors into a device's reply, so the audit's data-flow inventory
(:func:`inventory`) sees every tensor that leaves a device, by name and digest.

The server's broadcast of the shared adapter (``train`` and ``evaluate`` requests) goes out packed
(:func:`pack_shared` / :func:`unpack_shared`): one float array plus a ``ConfigRecord`` with the
tensor names and shapes. Flower stores and transfers every ``Array`` of a message as separate
objects (the array and its chunks), each one HTTP request from SuperLink to SuperNode and again
from SuperNode to ClientApp; the demo's 28 shared tensors made ~60 objects per device per message
(~2 s per ``train`` message on a busy SuperLink), packed they are 5.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict


@functools.lru_cache(maxsize=1024)
def _npy_header(head: bytes) -> tuple[np.dtype, bool, tuple[int, ...]]:
    """(dtype, Fortran order, shape) of an ``.npy`` header, read by numpy's own reader, once per distinct header."""
    fp = io.BytesIO(head)
    major, minor = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return dtype, bool(fortran), tuple(shape)


def array_numpy(arr: Array) -> np.ndarray:
    """``arr.numpy()``: the same array (a writable copy) and the same errors, without parsing the header of
    every array anew (numpy parses it with ``ast.literal_eval``; a message's headers repeat from round to round).

    Only a well-formed ``.npy`` of version 1 or 2 whose data is exactly its header's size takes the fast path;
    anything else goes through ``arr.numpy()`` (``np.load`` without pickles), which raises what it raises."""
    data = arr.data
    if arr.stype != "numpy.ndarray" or len(data) < 12 or data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return arr.numpy()
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    try:
        dtype, fortran, shape = _npy_header(bytes(data[:end]))
    except (ValueError, SyntaxError, TypeError):
        return arr.numpy()
    count = math.prod(shape)
    if dtype.hasobject or any(d < 0 for d in shape) or len(data) - end != count * dtype.itemsize:
        return arr.numpy()
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return (flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)).copy()


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in tensors.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        record[name] = Array(np.ascontiguousarray(arr))
    return record


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array_numpy(arr)) for name, arr in record.items()}


LAYOUT_SUFFIX = "-layout"
_FLAT = "flat"


def pack_shared(tensors: Mapping[str, torch.Tensor | np.ndarray], key: str = "shared") -> dict:
    """``{key: ArrayRecord(flat=...), key + "-layout": ConfigRecord(names, shapes)}`` for a ``RecordDict``.

    Tensors of different dtypes cannot share one array: they go as :func:`to_record` (per tensor).
    """
    arrays = {n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for n, v in tensors.items()}
    if len({a.dtype for a in arrays.values()}) != 1:
        return {key: to_record(tensors)}
    flat = np.concatenate([a.reshape(-1) for a in arrays.values()])
    layout = ConfigRecord({"names": list(arrays), "shapes": [",".join(map(str, a.shape)) for a in arrays.values()]})
    return {key: ArrayRecord({_FLAT: Array(np.ascontiguousarray(flat))}), key + LAYOUT_SUFFIX: layout}


def unpack_shared(content: RecordDict, key: str = "shared") -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_shared`; a per-tensor record (no layout) is read as :func:`from_record`.

    ``KeyError`` if ``key`` is absent; ``ValueError`` if the layout does not match the array.
    """
    record = content.array_records[key]
    layout_key = key + LAYOUT_SUFFIX
    if layout_key not in content.config_records:
        return from_record(record)
    layout = content.config_records[layout_key]
    names, shapes = list(layout.get("names", [])), list(layout.get("shapes", []))
    if _FLAT not in record or len(record) != 1 or len(names) != len(shapes) or len(set(names)) != len(names):
        raise ValueError(f"malformed packed '{key}': {len(record)} arrays, {len(names)} names, {len(shapes)} shapes")
    flat = array_numpy(record[_FLAT]).reshape(-1)
    dims = [tuple(int(x) for x in str(sh).split(",") if x != "") for sh in shapes]
    sizes = [int(np.prod(d, dtype=np.int64)) for d in dims]
    if sum(sizes) != flat.size:
        raise ValueError(f"packed '{key}' has {flat.size} values, its layout {sum(sizes)}")
    out, i = {}, 0
    for name, dim, size in zip(names, dims, sizes):
        out[str(name)] = torch.from_numpy(np.array(flat[i:i + size], copy=True).reshape(dim))
        i += size
    return out


def step_group(server_round: int, step: int) -> str:
    """The ``group_id`` of the messages of step ``step`` of a round of noisy sums: ``"<round>:<step>"``
    (every other message's group is ``"<round>"``)."""
    return f"{int(server_round)}:{int(step)}"


def group_round(group_id: str | None) -> int | None:
    """The server round a message's ``group_id`` names (``"3"`` or ``"3:2"``, a step of round 3), or None."""
    head = str(group_id or "").partition(":")[0]
    return int(head) if head.isdigit() else None


def inventory(content: RecordDict) -> list[dict]:
    """Every tensor, metric and config entry of a message: name, shape, dtype, bytes and digest."""
    rows: list[dict] = []
    for rec_name, arrays in content.array_records.items():
        for name, arr in arrays.items():
            data = array_numpy(arr)
            rows.append(
                {
                    "record": rec_name,
                    "kind": "array",
                    "name": name,
                    "shape": list(data.shape),
                    "dtype": str(data.dtype),
                    "bytes": int(data.nbytes),
                    "sha256": hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()[:16],
                }
            )
    for rec_name, metrics in content.metric_records.items():
        for name, value in metrics.items():
            rows.append({"record": rec_name, "kind": "metric", "name": name, "bytes": 8})
    for rec_name, configs in content.config_records.items():
        for name, value in configs.items():
            size = len(value) if isinstance(value, (bytes, str)) else 8
            rows.append({"record": rec_name, "kind": "config", "name": name, "bytes": size})
    return rows
