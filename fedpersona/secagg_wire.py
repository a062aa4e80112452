"""Secure aggregation on the wire: what the ServerApp and the ClientApp exchange (SecAgg+, :mod:`fedpersona.privacy.secagg`).

* message types and record names: ``query.advertise``, ``query.consistency``, ``query.unmask``
  (the masked input rides on ``train``), the ``secagg`` ConfigRecord and the ``secagg-arrays``
  ArrayRecord;
* :func:`flatten` / :func:`unflatten`: the vector layout, shared tensors in sorted-name order;
* :func:`to_records` / :func:`from_records`: a protocol payload (a dict of ints, bytes and 1-D
  arrays) as Flower records (integers travel as ``uint64``: Flower node ids use all 64 bits).

What both sides derive from the run config (the protocol settings, the masked extras, the
distributed-DP epsilon) is :mod:`fedpersona.privacy.secagg.settings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpersona.wire import array_numpy

__all__ = ["ADVERTISE", "ARRAYS", "CONSISTENCY", "RECORD", "SELF_ENC_PK", "SELF_MASK_PK", "SELF_SIGN_PK", "UNMASK",
           "flatten", "from_records", "has_request", "to_records", "unflatten"]

RECORD = "secagg"
ARRAYS = "secagg-arrays"
#: Message types of the exchanges secure aggregation adds (the masked input rides on ``train``): the key
#: advertisement (once per node per run), the consistency check and the unmask stage (every round).
ADVERTISE = "query.advertise"
CONSISTENCY = "query.consistency"
UNMASK = "query.unmask"
#: Fields the server adds to a node's masked-input request: the public keys it registered for the
#: node, so that a device whose keys changed since it advertised fails clearly (its masks would
#: not cancel and the sum would be garbage).
SELF_ENC_PK, SELF_MASK_PK, SELF_SIGN_PK = "self_enc_pk", "self_mask_pk", "self_sign_pk"


# --------------------------------------------------------------------------- vector layout
def flatten(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The tensors in sorted-name order as one float64 vector."""
    if not tensors:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([tensors[n].detach().cpu().reshape(-1).double().numpy() for n in sorted(tensors)])


def unflatten(vec: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` with the names, shapes and dtypes of ``like``."""
    out, i = {}, 0
    for n in sorted(like):
        t = like[n]
        k = t.numel()
        out[n] = torch.from_numpy(np.asarray(vec[i:i + k], dtype=np.float64).copy()).reshape(t.shape).to(t.dtype)
        i += k
    if i != len(vec):
        raise ValueError(f"vector has {len(vec)} coordinates, the shared tensors {i}")
    return out


# --------------------------------------------------------------------------- record codec
def to_records(payload: Mapping[str, Any]) -> dict[str, ConfigRecord | ArrayRecord]:
    """A protocol payload as the ``secagg`` ConfigRecord (scalars, bytes) and ``secagg-arrays`` ArrayRecord."""
    config, arrays = {}, ArrayRecord()
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        elif isinstance(value, (bool, np.bool_)):
            config[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            config[key] = int(value)
        elif isinstance(value, (float, np.floating, bytes, str)):
            config[key] = value if isinstance(value, (bytes, str)) else float(value)
        else:
            raise TypeError(f"secagg payload field {key!r} has unsupported type {type(value).__name__}")
    return {RECORD: ConfigRecord(config), ARRAYS: arrays}


def has_request(content: RecordDict) -> bool:
    return RECORD in content.config_records


def from_records(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`to_records`; ``KeyError`` naming the record if it is absent."""
    if RECORD not in content.config_records:
        raise KeyError(f"the message carries no '{RECORD}' record")
    out: dict[str, Any] = dict(content.config_records[RECORD].items())
    if ARRAYS in content.array_records:
        for key, arr in content.array_records[ARRAYS].items():
            out[key] = array_numpy(arr)
    return out
