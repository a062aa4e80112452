"""How the server obtains the cohort's *sum* of shared-adapter updates.

Everything above this interface (sampling, the shared-adapter update, checkpoints)
sees only a :class:`RoundSum`: the summed weighted update, the summed weight and
summed metrics. An :class:`Aggregator` decides how that sum is obtained: in the
clear (:class:`PlainAggregator`) or under secure aggregation, which replaces it
without touching the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedpersona.wire import from_record

logger = logging.getLogger(__name__)


@dataclass
class RoundSum:
    update_sum: dict[str, torch.Tensor]
    weight: float
    metrics: dict[str, float]
    contributors: int
    declined: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Why the round produced no sum (secure aggregation aborted); "" when it did not abort.
    aborted: str = ""
    #: Extra figures of the round for the run's metrics (e.g. secure-aggregation survivors and seconds).
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalSum:
    """The final evaluation's noised totals (:mod:`fedpersona.privacy.secagg.eval_figures`): one vector, no row."""

    histograms: np.ndarray | None
    sums: dict[str, float]
    devices: int
    failures: list[str] = field(default_factory=list)
    aborted: str = ""
    info: dict[str, float] = field(default_factory=dict)


class Aggregator(Protocol):
    name: str

    def collect(
        self, grid: Grid, cohort: Sequence[int], content: RecordDict, *, server_round: int, timeout: float | None
    ) -> RoundSum:
        """Send the round's train message to ``cohort`` and return only the sums."""
        ...

    def evaluate(
        self, grid: Grid, nodes: Sequence[int], content: RecordDict, *, server_round: int, timeout: float | None
    ) -> EvalSum:
        """Send the evaluate message to ``nodes`` and return only the totals of their evaluation figures."""
        ...


def send_and_collect(
    grid: Grid, cohort: Sequence[int], content: RecordDict, *, message_type: str, server_round: int, timeout: float | None
) -> tuple[list[Message], list[str]]:
    """Send ``content`` to every node of the cohort; return (replies with content, failure reasons)."""
    messages = [
        Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round))
        for node in cohort
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ok, failures = [], []
    for reply in replies:
        if reply.has_error():
            failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        else:
            ok.append(reply)
    missing = len(cohort) - len(replies)
    if missing > 0:
        failures.extend([f"{missing} node(s) did not reply in time"])
    return ok, failures


class PlainAggregator:
    """Sums the updates in the clear: the server sees each client's update (no secure aggregation)."""

    name = "plain"

    def __init__(self, cfg=None) -> None:
        self.cfg = cfg

    def collect(
        self, grid: Grid, cohort: Sequence[int], content: RecordDict, *, server_round: int, timeout: float | None
    ) -> RoundSum:
        replies, failures = send_and_collect(
            grid, cohort, content, message_type="train", server_round=server_round, timeout=timeout
        )
        total: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        declined: list[str] = []
        contributors = 0
        for reply in replies:
            if "status" in reply.content.config_records:
                declined.append(str(reply.content["status"].get("detail", "declined")))
                continue
            update = from_record(reply.content["update"])
            for name, value in update.items():
                total[name] = total[name] + value if name in total else value.clone()
            for key, value in reply.content["metrics"].items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
            contributors += 1
        # Every device's weight is 1 (public): the sum's weight is the number of contributors.
        return RoundSum(total, float(contributors), metrics, contributors, declined, failures)

    def evaluate(
        self, grid: Grid, nodes: Sequence[int], content: RecordDict, *, server_round: int, timeout: float | None
    ) -> EvalSum:
        """Sum the devices' evaluation figures, each with the device's whole noise (visible one by one, no user id)."""
        from fedpersona.privacy.secagg.eval_figures import histogram_length

        replies, failures = send_and_collect(
            grid, nodes, content, message_type="evaluate", server_round=server_round, timeout=timeout
        )
        total, devices = None, 0
        for reply in replies:
            v = reply.content["evaluation"]["figures"].numpy()
            if v.shape != (histogram_length(),):
                failures.append(f"node {reply.metadata.src_node_id}: evaluation figures of the wrong length")
                continue
            total = v.astype(np.float64) if total is None else total + v
            devices += 1
        return EvalSum(total, {}, devices, failures)
