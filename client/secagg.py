"""The device side of secure aggregation: its long-term keys, and what it sends in each exchange.

The device's two long-term X25519 key pairs live in its encrypted store under ``secagg-keys``
(created by its first key advertisement, reused in every later round and run; never in a
message). Per round (:mod:`server.secagg` drives the exchanges):

* :func:`check_request`, *before* training: the masked-input request is addressed to this
  node, is for a vector of the shared adapter's length, and names the public keys this device
  holds; a request that would fail costs no privacy budget;
* :func:`masked_input`, after training: the update ``weight * (new - old)`` with
  ``weight = n / data.max-examples``, flattened in sorted-name order, clipped to
  ``secagg.clip-norm``, quantized (plus the device's distributed-DP noise share when
  ``secagg.ddp`` is on) and masked, with the example count and the metrics as masked extras.
  A device that declines (privacy budget spent) sends a zero vector with zero extras through
  the same path, so the server cannot tell who declined;
* :func:`unmask`: the shares the server needs for the survivors' sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from client.store import DeviceStore
from fedpersona.config import Config
from fedpersona.secagg_wire import SELF_ENC_PK, SELF_MASK_PK, flatten
from privacy.secagg import ClientKeys, SecAggClient, SecAggInputError
from privacy.secagg.settings import extras_specs, record_ddp, secagg_params

__all__ = ["KEYS", "advertise", "check_request", "device_keys", "masked_input", "unmask"]

logger = logging.getLogger(__name__)

KEYS = "secagg-keys"


def device_keys(store: DeviceStore, *, create: bool = False) -> ClientKeys:
    """The device's long-term keys; created and persisted if ``create`` and absent."""
    text = store.load_text(KEYS)
    if text is not None:
        try:
            return ClientKeys.from_bytes(bytes.fromhex(text))
        except ValueError as exc:
            raise ValueError(f"the device's secure-aggregation keys ({KEYS}) are unreadable: {exc}") from None
    if not create:
        raise SecAggInputError("this device holds no secure-aggregation keys: it was never asked to advertise them")
    keys = ClientKeys()
    store.save_text(KEYS, keys.to_bytes().hex())
    logger.info("created the secure-aggregation keys of the device in %s", store.state_dir)
    return keys


def advertise(store: DeviceStore, cfg: Config, client_id: int) -> dict[str, Any]:
    """The key advertisement (public keys only)."""
    return SecAggClient(client_id, secagg_params(cfg), keys=device_keys(store, create=True)).advertise()


def check_request(store: DeviceStore, cfg: Config, client_id: int, request: dict[str, Any],
                  shared: Mapping[str, torch.Tensor]) -> SecAggClient:
    """Validate what can be checked before training; pops the server's copy of this device's keys."""
    what = f"masked-input request to node {client_id}"
    if request.get("client_id") != client_id:
        raise SecAggInputError(f"{what}: it is addressed to client {request.get('client_id')!r}")
    length = sum(t.numel() for t in shared.values())
    if request.get("length") != length:
        raise SecAggInputError(f"{what}: vector length {request.get('length')!r}, the shared adapter has {length}")
    keys = device_keys(store)
    registered = (request.pop(SELF_ENC_PK, None), request.pop(SELF_MASK_PK, None))
    if registered != (keys.enc_public, keys.mask_public):
        raise SecAggInputError(f"{what}: the server registered other public keys for this device than it holds "
                               "(keys replaced since the advertisement?)")
    return SecAggClient(client_id, secagg_params(cfg), keys=keys)


def masked_input(client: SecAggClient, cfg: Config, request: dict[str, Any],
                 update: Mapping[str, torch.Tensor] | None, metrics: Mapping[str, float] | None) -> dict[str, Any]:
    """The masked reply to the train request. ``update`` / ``metrics`` None: the device declined."""
    specs = extras_specs(cfg)
    if update is None:
        vec = np.zeros(int(request["length"]), dtype=np.float64)
        extras = {e.name: 0.0 for e in specs}
    else:
        # Device.train_round weights by n; the secure sum weights by n / max-examples (<= 1).
        vec = flatten(update) / cfg.data.max_examples
        norm = float(np.linalg.norm(vec))
        m = dict(metrics or {})
        m["examples"] = m.pop("weight", 0.0)
        m["clipped"] = 1.0 if norm > cfg.secagg.clip_norm else 0.0
        if m["clipped"]:
            logger.info("weighted update norm %.4f > secagg.clip-norm %g: clipped", norm, cfg.secagg.clip_norm)
        extras = {e.name: float(m.get(e.name, 0.0)) for e in specs}
        dropped = sorted(set(m) - set(extras))
        if dropped:
            logger.debug("metrics not in the secure sum: %s", dropped)
    return client.masked_input(request, vec, extras)


def record_user_level(ledger, cfg: Config, *, dim: int, server_round: int) -> dict:
    """The distributed-DP entry of a round this device sent its (noised) update in."""
    return record_ddp(ledger, cfg, dim=dim, round=server_round)


def unmask(store: DeviceStore, cfg: Config, client_id: int, request: Mapping[str, Any]) -> dict[str, Any]:
    """The unmask reply (shares of survivors' self-masks and of dropped neighbours' pair seeds)."""
    return SecAggClient(client_id, secagg_params(cfg), keys=device_keys(store)).unmask(request)
