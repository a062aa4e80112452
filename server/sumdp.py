"""The server's round with noise on the sum (``privacy.noise-on = sum``; the mechanism: :mod:`fedpersona.privacy.sumdp`).

A round over a cohort is ``client.local-steps`` DP-SGD steps of the shared adapter, each one secure sum
(:class:`fedpersona.server.secagg.SecureAggregator`'s two exchanges, message type ``train.dp_step``, its own SecAgg+
round id :func:`fedpersona.privacy.sumdp.step_round_id`):

1. the server sends every device of the cohort the current shared weights, the round and the step, and
   the step's parameters (:func:`fedpersona.privacy.sumdp.sum_context`, which each device derives itself and
   checks); each device answers with its masked, quantized, noised clipped-gradient sum, or declines;
2. with at least ``t`` survivors (and ``secagg.min-contributors``) it unmasks and learns only the sum;
   with fewer the step aborts before any unmask, is not applied, and the round's remaining steps are
   not asked for (the devices that answered have accounted the aborted step);
3. it divides the sum by the public normalizer ``survivors * client.batch-size`` and steps its optimizer
   (``server.optimizer`` / ``server.lr``: ``fedavg`` is SGD on the noisy mean gradient, ``fedavgm`` SGD
   with momentum ``server.momentum``, ``fedadam`` Adam) with ``delta = -mean gradient``.

Then one ``train.personalize`` message to the cohort carries the round's final shared weights: each
device that answered a step of the round trains its personal head on top of them (``client.head-at =
round``; with ``end`` every device's head is trained once, on the run's final shared adapter:
:func:`personalize` after the last round). No loss, count or
timing rides in a noisy sum beside the gradient (only ``trained``, one per survivor): the round's row
has no per-round held-out losses in this mode; the final evaluation is unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedpersona.config import Config
from fedpersona.optim import ServerOptimizer
from fedpersona.secagg_wire import unflatten
from fedpersona.wire import pack_shared, step_group
from fedpersona.privacy.secagg import SecAggServer
from fedpersona.privacy.sumdp import normalizer, sum_context, sum_secagg_params
from fedpersona.server.aggregation import RoundSum, send_and_collect
from fedpersona.server.secagg import DECLINED, SecureAggregator

__all__ = ["DP_STEP", "PERSONALIZE", "SumRounds", "personalize"]

logger = logging.getLogger(__name__)

DP_STEP, PERSONALIZE = "train.dp_step", "train.personalize"


class SumRounds:
    """Runs the rounds of noise on the sum over one :class:`~fedpersona.server.secagg.SecureAggregator` (its key
    directory and exchanges); one SecAgg+ server per distinct set of protocol settings."""

    def __init__(self, cfg: Config, aggregator: SecureAggregator) -> None:
        if cfg.privacy.noise_on != "sum":
            raise ValueError(f"SumRounds runs privacy.noise-on = 'sum'. You passed: {cfg.privacy.noise_on!r}")
        if not isinstance(aggregator, SecureAggregator):
            raise ValueError("noise on the sum needs secure aggregation (secagg.enabled = true). "
                             f"You passed: a {type(aggregator).__name__}")
        self.cfg = cfg
        self.agg = aggregator
        self._servers: dict = {}

    def _server(self, params) -> SecAggServer:
        if params not in self._servers:
            self._servers[params] = SecAggServer(params, run_id=self.agg.server.run_id, rng=self.agg._rng)
        return self._servers[params]

    def round(self, grid: Grid, cohort: Sequence[int], shared: dict[str, torch.Tensor], opt: ServerOptimizer, *,
              server_round: int, timeout: float | None) -> tuple[RoundSum, dict[str, torch.Tensor], dict]:
        """The round's steps and the personalize exchange: (what the server saw, the new shared weights, the
        round's figures for its row)."""
        cfg = self.cfg
        failures: list[str] = []
        new = [n for n in cohort if n not in self.agg._keys]
        if new:  # keys first: the announced cohort (and so t) is the devices with keys
            failures += self.agg._advertise(grid, new, server_round=server_round, timeout=timeout)
        members = [n for n in cohort if n in self.agg._keys]
        start = {n: t.clone() for n, t in shared.items()}
        seen = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in shared.items()}
        survivors: list[int] = []
        declined = 0
        applied, aborted, seconds = 0, "", 0.0
        ctx = None
        for step in range(1, cfg.client.local_steps + 1):
            if len(members) < 2:
                aborted = f"only {len(members)} device(s) with keys in the cohort"
                break
            ctx = sum_context(cfg, round=server_round, step=step, cohort=len(members), weights=shared)
            params = sum_secagg_params(cfg, cohort=len(members), dim=ctx.dim)
            content = RecordDict({**pack_shared(shared),
                                  "config": ConfigRecord({"server-round": server_round, "step": step,
                                                          "steps": cfg.client.local_steps}),
                                  "sum-context": ConfigRecord(ctx.to_record())})
            info: dict[str, float] = {}
            result, why = self.agg._secure_sum(self._server(params), grid, members, content, length=ctx.dim,
                                               message_type=DP_STEP, server_round=server_round, timeout=timeout,
                                               info=info, failures=failures, secagg_round=ctx.secagg_round,
                                               group_id=step_group(server_round, step), context=ctx.digest())
            seconds += info.get("secagg-seconds", 0.0)
            declined = max(declined, int(info.get("secagg-declined", 0)))
            if why:
                aborted = f"step {step}: {why}"
                logger.warning("round %d step %d: the noisy sum aborted before any unmask; step not applied, the "
                               "round's remaining steps not asked for: %s", server_round, step, why)
                break
            k = len(result.survivors)
            survivors.append(k)
            total = unflatten(result.total, shared)
            div = normalizer(ctx, k)
            for n in shared:
                seen[n] += total[n].double()
            shared = opt.step(shared, {n: -total[n].to(shared[n].dtype) / div for n in shared})
            applied += 1
            logger.info("round %d step %d/%d: sum of %d devices (t = %d, sigma %.3f), normalizer %g", server_round,
                        step, cfg.client.local_steps, k, ctx.honest, ctx.noise_multiplier, div)
        personalized = 0
        if cfg.client.head_at == "round":  # else the heads are trained once, on the run's final shared adapter
            personalized, p_failures = personalize(grid, members, shared, server_round=server_round, timeout=timeout)
            failures += p_failures
        norm = math.sqrt(sum(float(((shared[n] - start[n]).double() ** 2).sum()) for n in shared))
        contributors = min(survivors) if survivors else 0
        rs = RoundSum(seen if applied else {}, 0.0, {"trained": float(sum(survivors))}, contributors,
                      [DECLINED] * declined, failures, aborted=aborted)
        row = {"noise-on": "sum", "steps-applied": applied, "steps-aborted": int(bool(aborted)),
               "survivors-min": contributors, "survivors-max": max(survivors) if survivors else 0,
               "personalized": personalized, "update-norm": norm, "secagg-seconds": seconds}
        if ctx is not None:
            row.update({"noise-multiplier": ctx.noise_multiplier, "honest-contributors": ctx.honest,
                        "quantization-scale": ctx.scale})
        return rs, shared, row


def personalize(grid: Grid, nodes: Sequence[int], shared: dict[str, torch.Tensor], *, server_round: int,
                timeout: float | None) -> tuple[int, list[str]]:
    """``shared`` to ``nodes`` in one ``train.personalize`` exchange: each device trains its head on top of it.
    How many devices did, and the failures. After a round of noisy sums (its cohort, ``client.head-at =
    round``) or once after the last round (every node, ``client.head-at = end``, ``server_round`` =
    ``server.num-rounds + 1``). A reply carries only ``personalized`` (1 or 0)."""
    if not nodes:
        return 0, []
    t0 = time.perf_counter()
    content = RecordDict({**pack_shared(shared), "config": ConfigRecord({"server-round": server_round})})
    replies, failures = send_and_collect(grid, nodes, content, message_type=PERSONALIZE,
                                         server_round=server_round, timeout=timeout)
    done = 0
    for reply in replies:
        try:
            done += int(reply.content["status"]["personalized"])
        except (KeyError, TypeError, ValueError):
            failures.append(f"personalize: node {reply.metadata.src_node_id}: malformed reply")
    logger.info("round %d: %d of %d devices trained their head on the shared adapter sent (%.1f s)",
                server_round, done, len(nodes), time.perf_counter() - t0)
    return done, [f if f.startswith("personalize") else f"personalize: {f}" for f in failures]
