"""The fedpersona ClientApp (Flower Message API): thin; the work is in :mod:`client.device`.

Message types:

* ``train`` — in: ``shared`` (ArrayRecord, the current shared adapter) and
  ``config`` (``server-round``). Out: ``update`` (ArrayRecord, the example-weighted
  change of the shared tensors) and ``metrics`` (MetricRecord of summable values),
  or a ``status`` ConfigRecord when the device declines (privacy budget spent).
* ``evaluate`` — in: ``shared``. Out: ``metrics`` with the device's held-out
  figures (base, shared, personalized, local-only) and ``identity`` (the user label).
"""

from __future__ import annotations

import logging
import os

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import BudgetExhausted, Device
from client.store import StateError
from fedpersona.config import load_config
from fedpersona.wire import from_record, to_record

logger = logging.getLogger(__name__)

app = ClientApp()

_DEVICES: dict[tuple[int, int], Device] = {}
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def _device(context: Context) -> Device:
    key = (context.run_id, context.node_id)
    if key not in _DEVICES:
        threads = int(os.environ.get("FEDPERSONA_TORCH_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        cfg = load_config(context.run_config)
        _DEVICES[key] = Device(cfg, dict(context.node_config))
    return _DEVICES[key]


def _error(message: Message, exc: BaseException) -> Message:
    reason = f"{type(exc).__name__}: {exc}"
    logger.error("node %s: %s", message.metadata.dst_node_id, reason)
    return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    try:
        device = _device(context)
        shared = from_record(message.content["shared"])
        server_round = int(message.content["config"]["server-round"])
        try:
            update, metrics = device.train_round(shared, server_round=server_round)
        except BudgetExhausted as exc:
            status = ConfigRecord({"status": "budget-exhausted", "detail": str(exc)})
            return Message(RecordDict({"status": status, "metrics": MetricRecord({"weight": 0.0, "trained": 0.0})}), reply_to=message)
    except (StateError, ValueError, FloatingPointError, KeyError) as exc:
        return _error(message, exc)
    content = RecordDict({"update": to_record(update), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    try:
        device = _device(context)
        metrics = device.final_evaluation(from_record(message.content["shared"]))
    except (StateError, ValueError, FloatingPointError, KeyError) as exc:
        return _error(message, exc)
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "identity": ConfigRecord({"user-id": device.user_id})}
    )
    return Message(content, reply_to=message)
