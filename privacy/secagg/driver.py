"""SecAgg+ in one process: every client and the server, for tests and benchmarks (no Flower)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from fedpersona.identity import IdentityRoot
from fedpersona.privacy.secagg.client_side import SecAggClient
from fedpersona.privacy.secagg.crypto import SecureRNG
from fedpersona.privacy.secagg.server_side import SecAggResult, SecAggServer
from fedpersona.privacy.secagg.spec import SecAggParams, SecAggInputError, payload_nbytes

__all__ = ["SecAggStats", "run_secure_sum"]


@dataclass
class SecAggStats:
    """Costs measured by :func:`run_secure_sum` (CPU seconds of this process, payload bytes)."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)


def run_secure_sum(updates: Mapping[int, np.ndarray], config: SecAggParams, *,
                   extras: Mapping[int, Mapping[str, float]] | None = None,
                   drop_before_masking: Iterable[int] = (), drop_before_consistency: Iterable[int] = (),
                   drop_before_unmasking: Iterable[int] = (), run_id: int = 0, round: int = 1,
                   server: SecAggServer | None = None, clients: Mapping[int, SecAggClient] | None = None,
                   rng: SecureRNG | None = None, stats: SecAggStats | None = None,
                   root: IdentityRoot | None = None) -> SecAggResult:
    """Play the server and every client of ``updates`` in one process; return what the server learns.

    Clients in ``drop_before_masking`` receive the round setup but never reply; clients in
    ``drop_before_consistency`` send their masked input but do not sign the survivor set; clients in
    ``drop_before_unmasking`` sign it but do not send their unmask reply. Pass ``server`` and
    ``clients`` to run several rounds with the same long-term keys (clients not yet registered with the
    server are registered). With ``root``, every client made here gets an identity certified by it and
    trusts it (bound keys, as devices run); without, clients accept unbound keys. ``rng``
    (deterministic) is for tests.
    """
    cohort = sorted(int(c) for c in updates)
    drop1, drop_c, drop2 = set(drop_before_masking), set(drop_before_consistency), set(drop_before_unmasking)
    if not (drop1 | drop_c | drop2) <= set(cohort):
        raise SecAggInputError("dropped clients must be members of the cohort")
    extras = extras or {}

    def child_rng() -> SecureRNG | None:
        return SecureRNG(rng.bytes(32)) if rng is not None else None

    server = server or SecAggServer(config, run_id=run_id, rng=child_rng())
    clients = dict(clients or {})
    for c in cohort:
        if c not in clients:
            clients[c] = SecAggClient(c, config, rng=child_rng(), identity=root.issue() if root is not None else None)
        if c not in server.registered:
            server.register(clients[c].advertise(run_id=server.run_id))
    stats = stats if stats is not None else SecAggStats()

    def timed(fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        return out, time.process_time() - t0

    length = int(np.asarray(updates[cohort[0]]).size)
    rnd, dt = timed(server.start_round, round, cohort, length)
    stats.server_seconds += dt
    requests, dt = timed(rnd.masked_input_requests)
    stats.server_seconds += dt
    for c in cohort:
        stats.bytes_down[c] = stats.bytes_down.get(c, 0) + payload_nbytes(requests[c])
        if c in drop1:
            continue
        reply, dt = timed(clients[c].masked_input, requests[c], updates[c], extras.get(c))
        stats.client_seconds[c] = stats.client_seconds.get(c, 0.0) + dt
        stats.bytes_up[c] = stats.bytes_up.get(c, 0) + payload_nbytes(reply)
        _, dt = timed(rnd.receive_masked, reply)
        stats.server_seconds += dt
    consistency, dt = timed(rnd.consistency_requests)
    stats.server_seconds += dt
    for c, req in consistency.items():
        stats.bytes_down[c] += payload_nbytes(req)
        if c in drop_c:
            continue
        reply, dt = timed(clients[c].consistency, req)
        stats.client_seconds[c] += dt
        stats.bytes_up[c] += payload_nbytes(reply)
        _, dt = timed(rnd.receive_consistency, reply)
        stats.server_seconds += dt
    unmask, dt = timed(rnd.unmask_requests)
    stats.server_seconds += dt
    for c, req in unmask.items():
        stats.bytes_down[c] += payload_nbytes(req)
        if c in drop2:
            continue
        reply, dt = timed(clients[c].unmask, req)
        stats.client_seconds[c] += dt
        stats.bytes_up[c] += payload_nbytes(reply)
        _, dt = timed(rnd.receive_unmask, reply)
        stats.server_seconds += dt
    result, dt = timed(rnd.finish)
    stats.server_seconds += dt
    return result
