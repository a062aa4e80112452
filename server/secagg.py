"""Secure aggregation (SecAgg+) of the cohort's shared-adapter updates, over Flower's Message API.

:class:`SecureAggregator` implements :class:`fedpersona.server.aggregation.Aggregator` with the protocol
of :mod:`fedpersona.privacy.secagg`. Per round it exchanges, with each node:

* once per run, the first time the node is sampled: ``query.advertise`` -> the node's long-term
  public keys (two X25519, one Ed25519 signing key; the device keeps the private halves in its
  encrypted store) and its identity's certificate and binding of those keys, which the server
  forwards to the node's neighbours and cannot forge;
* ``train``: the usual content (shared adapter, round config) plus the node's masked-input
  request (records ``secagg`` / ``secagg-arrays``: round setup, neighbours' public keys and
  their bindings) -> the masked vector (clipped, quantized update, weight 1, and the masked extra
  ``trained``) and the encrypted secret shares, signed. No plain update, no example count, no
  metrics;
* ``query.consistency`` to the survivors -> each one's signature over the survivor set;
* ``query.unmask`` to the survivors that signed, with every signature -> the shares the server
  needs to remove the masks (a device reveals only for the set it signed, certified by a quorum).

A device that does not train answers the train message with a decline (no vector, no shares): it
is dropped before masking, so the survivors are the devices that trained, and the server sends no
unmask request unless at least ``secagg.min-contributors`` (and ``server.min-clients``) of them
survive. :meth:`SecureAggregator.evaluate` runs the final evaluation the same way (message type
``evaluate``, the figures of :mod:`fedpersona.privacy.secagg.eval_figures`), over every node, one secure sum per
group of at most a round's cohort (:func:`evaluation_groups`).

So 3 exchanges per round plus 1 per node per run, where Flower's SecAgg+ workflow needs 4
per round and has no consistency check (see ``docs/secagg.md``). The server learns the cohort
sum of the updates and of the extras, nothing per client, also if it deviates from the protocol.
If too few clients survive a stage, too few sign the survivor set, or shares are missing, the
library raises :class:`~fedpersona.privacy.secagg.SecAggAbort` before anything is revealed; the round then
returns a :class:`RoundSum` with no contributors and the reason in ``aborted`` (the federation
leaves the shared adapter unchanged). Every node that errs, sends a malformed reply or does not
answer is listed in ``failures``; so is each holder that could not open some sender's shares.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedpersona.config import Config
from fedpersona.secagg_wire import (ADVERTISE, CONSISTENCY, SELF_ENC_PK, SELF_MASK_PK, SELF_SIGN_PK, UNMASK, from_records,
                                    to_records, unflatten)
from fedpersona.wire import unpack_shared
from fedpersona.privacy.secagg import SecAggAbort, SecAggInputError, SecAggServer, SecureRNG
from fedpersona.privacy.secagg.eval_figures import eval_params, histogram_length
from fedpersona.privacy.secagg.settings import ddp_min_clients, ddp_user_epsilon, secagg_params
from fedpersona.privacy.secagg.spec import KEY_FIELDS
from fedpersona.server.aggregation import Aggregator, EvalSum, PlainAggregator, RoundSum

__all__ = ["SecureAggregator", "build_aggregator", "evaluation_groups"]

logger = logging.getLogger(__name__)

#: One line per device that declined a round: the server learns how many declined, not why.
DECLINED = "a device declined this round (it took no part in the sum)"


def build_aggregator(cfg: Config, *, run_id: int) -> Aggregator:
    """The aggregator the config asks for: SecAgg+ unless ``secagg.enabled = false``."""
    if not cfg.secagg.enabled:
        return PlainAggregator(cfg)
    return SecureAggregator(cfg, run_id=run_id)


class SecureAggregator:
    """Obtains only the cohort's sums, under SecAgg+ (see the module docstring)."""

    name = "secagg+"

    def __init__(self, cfg: Config, *, run_id: int, rng: SecureRNG | None = None) -> None:
        self.cfg = cfg
        self.config = secagg_params(cfg)
        self.server = SecAggServer(self.config, run_id=int(run_id), rng=rng)
        self.eval_config = eval_params(cfg)
        self._eval_server: SecAggServer | None = None
        self._rng = rng
        self._keys: dict[int, dict[str, Any]] = {}  # node -> its advertisement (public keys and their binding)

    def run_info(self) -> dict[str, Any]:
        """The settings of the run, for metrics.json."""
        s, c = self.cfg.secagg, self.config
        info: dict[str, Any] = {"clip-norm": s.clip_norm, "scale": c.scale, "modulus-bits": c.modulus_bits,
                                "max-cohort": c.max_cohort, "degree": s.degree or "auto",
                                "threshold": s.threshold or "auto", "extras": [e.name for e in c.extras],
                                "min-contributors": s.min_contributors, "min-survivors": c.round_params(c.max_cohort)[2],
                                "ddp": s.ddp}
        if s.ddp:
            info.update({"ddp-noise-multiplier": s.ddp_noise_multiplier, "ddp-min-clients": ddp_min_clients(self.cfg),
                         "ddp-delta": s.ddp_delta, "ddp-client-stddev-quantized": c.noise_stddev})
        return info

    # ------------------------------------------------------------------ stage 0
    def _advertise(self, grid: Grid, nodes: Sequence[int], *, server_round: int, timeout: float | None) -> list[str]:
        """Collect the public keys of nodes not yet registered in this run; the failure reasons."""
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type=ADVERTISE, group_id=str(server_round))
                    for n in nodes]

        def register(src: int, advert: dict) -> None:
            self.server.register(_from(src, advert))
            self._keys[src] = {"client_id": src, **{k: bytes(advert.get(k, b"")) for k, _ in KEY_FIELDS}}

        return _exchange(grid, messages, timeout=timeout, prefix="advertise: ", what="key advertisement",
                         receive=register)

    # ------------------------------------------------------------------ a round
    def _secure_sum(self, server: SecAggServer, grid: Grid, cohort: Sequence[int], content: RecordDict, *,
                    length: int, message_type: str, server_round: int, timeout: float | None, info: dict,
                    failures: list[str], secagg_round: int | None = None, group_id: str | None = None,
                    context: bytes = b""):
        """Advertise (new nodes), stage 1 on ``message_type``, the consistency check, the unmask stage.

        Returns (SecAggResult, "") or (None, the abort reason). ``message_type`` carries the masked-input
        request with ``content`` (any type the ClientApp handles); ``context`` is bound into the round
        digest, so into every key, ciphertext and signature of the round (the devices check it).
        ``secagg_round`` / ``group_id``: the protocol's round id and the stages' message group when they are
        not ``server_round`` (a step of a noisy sum: :func:`fedpersona.privacy.sumdp.step_round_id`,
        :func:`fedpersona.wire.step_group`).
        """
        cpu = 0.0
        group = str(server_round) if group_id is None else group_id

        def timed(fn: Callable, *args):
            nonlocal cpu
            t0 = time.process_time()
            try:
                return fn(*args)
            finally:
                cpu += time.process_time() - t0

        new = [n for n in cohort if n not in self._keys]
        t0 = time.perf_counter()
        if new:
            failures += self._advertise(grid, new, server_round=server_round, timeout=timeout)
        info["secagg-advertise-seconds"] = time.perf_counter() - t0
        members = [n for n in cohort if n in self._keys]
        for n in list(members):
            if n not in server.registered:
                try:
                    server.register(self._keys[n])
                except SecAggInputError as exc:
                    failures.append(f"node {n}: rejected key advertisement: {exc}")
                    members.remove(n)

        def done(aborted: str = "", result=None):
            info["secagg-server-cpu-seconds"] = cpu
            info["secagg-seconds"] = (cpu + info["secagg-advertise-seconds"] + info.get("secagg-consistency-seconds", 0.0)
                                      + info.get("secagg-unmask-seconds", 0.0))
            return result, aborted

        try:
            rnd = timed(lambda: server.start_round(server_round if secagg_round is None else secagg_round, members, length,
                                                   context=context))
        except SecAggInputError as exc:
            return done(f"cannot start the round with {len(members)} of {len(cohort)} sampled nodes: {exc}")

        # ---- stage 1: the masked input rides on the train (or evaluate) message; a decliner says so
        requests = timed(rnd.masked_input_requests)
        messages = []
        for n in members:
            req = dict(requests[n])
            keys = self._keys[n]
            req[SELF_ENC_PK], req[SELF_MASK_PK], req[SELF_SIGN_PK] = keys["enc_pk"], keys["mask_pk"], keys["sign_pk"]
            body = RecordDict({**dict(content), **to_records(req)})
            messages.append(Message(content=body, dst_node_id=n, message_type=message_type,
                                    group_id=group))

        def receive(src: int, payload: dict) -> None:
            payload = _from(src, payload)
            if payload.get("declined"):
                timed(rnd.receive_decline, payload)
            else:
                timed(rnd.receive_masked, payload)

        failures += _exchange(grid, messages, timeout=timeout, prefix="", what="masked input", receive=receive)
        info["secagg-declined"] = float(len(rnd.declined))

        # ---- the consistency check: every survivor signs the survivor set (if enough devices that trained survive)
        try:
            requests = timed(rnd.consistency_requests)
        except SecAggAbort as exc:
            return done(str(exc))
        t0 = time.perf_counter()
        messages = [Message(content=RecordDict(to_records(req)), dst_node_id=n, message_type=CONSISTENCY,
                            group_id=group) for n, req in requests.items()]
        failures += _exchange(grid, messages, timeout=timeout, prefix="consistency: ", what="consistency reply",
                              receive=lambda src, payload: timed(rnd.receive_consistency, _from(src, payload)))
        info["secagg-consistency-seconds"] = time.perf_counter() - t0

        # ---- stage 2: unmasking by the survivors that signed, only if a quorum of them did
        try:
            unmask = timed(rnd.unmask_requests)
        except SecAggAbort as exc:
            return done(str(exc))
        t0 = time.perf_counter()
        messages = [Message(content=RecordDict(to_records(req)), dst_node_id=n, message_type=UNMASK,
                            group_id=group) for n, req in unmask.items()]
        failures += _exchange(grid, messages, timeout=timeout, prefix="unmask: ", what="unmask reply",
                              receive=lambda src, payload: timed(rnd.receive_unmask, _from(src, payload)))
        info["secagg-unmask-seconds"] = time.perf_counter() - t0
        try:
            result = timed(rnd.finish)
        except SecAggAbort as exc:
            return done(str(exc))
        for holder, senders in sorted(result.undecryptable.items()):
            failures.append(f"unmask: node {holder}: could not open the shares of node(s) {list(senders)} "
                            "(tampered or malformed ciphertexts; skipped)")
        return done(result=result)

    def collect(
        self, grid: Grid, cohort: Sequence[int], content: RecordDict, *, server_round: int, timeout: float | None
    ) -> RoundSum:
        failures: list[str] = []
        info: dict[str, float] = {}
        like = unpack_shared(content)
        length = sum(t.numel() for t in like.values())
        result, aborted = self._secure_sum(self.server, grid, cohort, content, length=length, message_type="train",
                                           server_round=server_round, timeout=timeout, info=info, failures=failures)
        if self.cfg.secagg.ddp:
            # Upper bound for any user: one who was sent a masked-input request in every round so far.
            info["ddp-epsilon-max"] = ddp_user_epsilon(self.cfg, dim=length, rounds=server_round)
        declined = int(info.get("secagg-declined", 0))
        if aborted:
            logger.warning("secure aggregation round %d aborted: %s", server_round, aborted)
            return RoundSum({}, 0.0, {}, 0, [DECLINED] * declined, failures, aborted=aborted, info=info)
        return self._round_sum(result, like, failures, info, server_round)

    def evaluate(self, grid: Grid, nodes: Sequence[int], content: RecordDict, *, server_round: int,
                 timeout: float | None) -> EvalSum:
        """The final evaluation over ``nodes`` (every node, sampled in a round or not), as one secure sum per
        group of :func:`evaluation_groups`: at most a round's cohort (``server.clients-per-round``) each, and
        never fewer than the evaluation sum's minimum of survivors. Each group's sum is as private as a
        round's (the same protocol, the same floors on every device); the summary merges the groups' sums:
        histograms and exact sums add up to what one sum over every node would give. A group that aborts
        is left out (its reason among the failures); only when every group aborts is nothing revealed."""
        failures: list[str] = []
        info: dict[str, float] = {}
        if self._eval_server is None:
            self._eval_server = SecAggServer(self.eval_config, run_id=self.server.run_id, rng=self._rng)
        groups = evaluation_groups(nodes, self.cfg.server.clients_per_round, self.eval_config.min_survivors or 2)
        total, extras, devices, reasons = None, {}, 0, []
        for i, group in enumerate(groups):
            part: dict[str, float] = {}
            result, aborted = self._secure_sum(self._eval_server, grid, group, content, length=histogram_length(),
                                               message_type="evaluate", server_round=server_round, timeout=timeout,
                                               info=part, failures=failures)
            for k, v in part.items():
                info[k] = info.get(k, 0.0) + v
            if aborted:
                reasons.append(aborted)
                logger.warning("secure evaluation sum of group %d of %d (%d nodes) aborted: %s", i + 1, len(groups),
                               len(group), aborted)
                if len(groups) > 1:
                    failures.append(f"evaluation group {i + 1} of {len(groups)} ({len(group)} nodes) aborted: {aborted}")
                continue
            total = result.total.copy() if total is None else total + result.total
            for k, v in result.extras.items():
                extras[k] = extras.get(k, 0.0) + v
            devices += len(result.survivors)
        info["eval-groups"] = float(len(groups))
        info["eval-groups-aborted"] = float(len(reasons))
        if total is None:
            aborted = reasons[0] if len(reasons) == 1 else f"every evaluation group aborted ({len(reasons)}): {reasons[0]}"
            logger.warning("secure evaluation sum aborted: %s", aborted)
            return EvalSum(None, {}, 0, failures, aborted=aborted, info=info)
        return EvalSum(total, extras, devices, failures, info=info)

    def _round_sum(self, result, like: dict[str, torch.Tensor], failures: list[str], info: dict[str, float],
                   server_round: int) -> RoundSum:
        ex = dict(result.extras)
        survivors = len(result.survivors)
        trained = int(round(ex.get("trained", 0.0)))
        declined = len(result.declined)
        weight = float(survivors)  # every device's weight is 1: the server divides by the survivors it knows
        info.update({"secagg-survivors": float(survivors),
                     "secagg-dropped-masking": float(len(result.dropped_before_masking) - declined),
                     "secagg-dropped-unmasking": float(len(result.dropped_before_unmasking))})
        if trained != survivors:
            logger.warning("round %d: %d survivors but the masked 'trained' total is %d", server_round, survivors,
                           trained)
        logger.info("secure aggregation round %d: sum of %d clients (%d declined; dropped %d before masking, %d "
                    "before unmasking)", server_round, survivors, declined,
                    len(result.dropped_before_masking) - declined, len(result.dropped_before_unmasking))
        metrics = {**ex, "weight": weight}
        return RoundSum(unflatten(result.total, like), weight, metrics, survivors, [DECLINED] * declined, failures,
                        info=info)


def evaluation_groups(nodes: Sequence[int], size: int, minimum: int) -> list[list[int]]:
    """``nodes`` (sorted) in consecutive groups of at most ``size`` and at least ``minimum``, sizes within one.

    ``ceil(n / size)`` groups, unless that would leave a group below ``minimum``: then as many groups
    of at least ``minimum`` as the nodes allow (fewer, larger ones; one group when ``n < 2 minimum``).
    """
    ids = sorted(int(n) for n in nodes)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"evaluation group size must be a whole number >= 1. You passed: {size!r}")
    count = max(1, -(-len(ids) // size))
    if count > 1 and len(ids) // count < minimum:
        count = max(1, len(ids) // max(1, minimum))
    return [ids[i * len(ids) // count:(i + 1) * len(ids) // count] for i in range(count)]


def _from(src: int, payload: dict) -> dict:
    """``payload`` if it names its sender as its client id (a node cannot speak for another)."""
    if payload.get("client_id") != src:
        raise SecAggInputError(f"claims client id {payload.get('client_id')!r}")
    return payload


def _exchange(grid: Grid, messages: list[Message], *, timeout: float | None, prefix: str, what: str,
              receive: Callable[[int, dict], Any]) -> list[str]:
    """Send ``messages``, hand each reply's secagg payload to ``receive(src, payload)``; the failures.

    An error reply, a payload ``receive`` rejects (``KeyError`` / ``SecAggInputError``) and a node
    that does not reply before ``timeout`` are dropouts at this stage, each one line in the result.
    """
    failures: list[str] = []
    replied = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        src = int(reply.metadata.src_node_id)
        replied.add(src)
        if reply.has_error():
            failures.append(f"{prefix}node {src}: {reply.error.reason}")
            continue
        try:
            receive(src, from_records(reply.content))
        except (KeyError, SecAggInputError) as exc:
            failures.append(f"{prefix}node {src}: rejected {what}: {exc}")
    missing = len({m.metadata.dst_node_id for m in messages} - replied)
    if missing:
        failures.append(f"{prefix}{missing} node(s) did not reply in time")
    return failures
