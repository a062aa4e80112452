"""What travels in Flower messages: name-keyed tensors <-> ``ArrayRecord``, and their inventory.

Only :func:`to_record` puts tensors into a message, so the audit's data-flow
inventory (:func:`inventory`) sees every tensor that leaves a device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in tensors.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        record[name] = Array(np.ascontiguousarray(arr))
    return record


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(arr.numpy(), copy=True)) for name, arr in record.items()}


def inventory(content: RecordDict) -> list[dict]:
    """Every tensor, metric and config entry of a message: name, shape, dtype, bytes and digest."""
    rows: list[dict] = []
    for rec_name, arrays in content.array_records.items():
        for name, arr in arrays.items():
            data = arr.numpy()
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
