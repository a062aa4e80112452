"""The SecAgg+ communication graph: who masks with whom and who holds whose shares.

Bell et al. (CCS 2020) replace Bonawitz et al.'s complete graph with a sparse random graph
of degree ``k = O(log n)``. We use a *random Harary graph*: the cohort is placed on a ring
in a pseudorandom order (sorted by SHA-256 of the round's public graph seed and the
client id), and each client is joined to its ``k/2`` nearest ring neighbours on each side.
The graph is exactly ``k``-regular (``k`` even; ``k >= n - 1`` gives the complete graph) and
``k``-vertex-connected: removing fewer than ``k`` clients never disconnects it. Every party
derives it from ``(cohort, degree, seed)``, so it need not be sent.
"""

from __future__ import annotations

import functools
import hashlib
import math
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

__all__ = ["build_graph", "default_degree", "default_threshold", "is_connected"]


def default_degree(n: int) -> int:
    """k = 2 * ceil(1.5 * log2 n), capped at the complete graph (n - 1)."""
    if n < 2:
        raise ValueError(f"a cohort needs at least 2 clients. You passed: {n}")
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def default_threshold(degree: int) -> int:
    """A strict majority of the k + 1 share holders (the k neighbours and the client itself)."""
    return (degree + 1) // 2 + 1


def build_graph(cohort: Sequence[int], degree: int, seed: bytes) -> Mapping[int, tuple[int, ...]]:
    """Neighbour lists (sorted) of a random Harary graph over ``cohort`` (a read-only mapping).

    Built once per (cohort, degree, seed): every client of a round derives the same graph, and
    in a simulation they all live in one process, so the round's graph (one SHA-256 per member)
    is computed once per round, not once per client message.
    """
    return _graph(tuple(sorted(int(c) for c in cohort)), int(degree), bytes(seed))


@functools.lru_cache(maxsize=32)
def _graph(ids: tuple[int, ...], degree: int, seed: bytes) -> Mapping[int, tuple[int, ...]]:
    n = len(ids)
    if n < 2:
        raise ValueError(f"a cohort needs at least 2 clients. You passed: {n}")
    if len(set(ids)) != n:
        raise ValueError("cohort ids must be distinct")
    if degree < 1:
        raise ValueError(f"degree must be >= 1. You passed: {degree}")
    half = (degree + 1) // 2
    if 2 * half >= n - 1:
        return MappingProxyType({c: tuple(x for x in ids if x != c) for c in ids})
    ring = sorted(ids, key=lambda c: hashlib.sha256(b"fedpersona/secagg/graph|" + seed + c.to_bytes(8, "big")).digest())
    out = {}
    for i, c in enumerate(ring):
        nb = {ring[(i + j) % n] for j in range(1, half + 1)} | {ring[(i - j) % n] for j in range(1, half + 1)}
        out[c] = tuple(sorted(nb))
    return MappingProxyType(out)


def is_connected(graph: Mapping[int, Iterable[int]], nodes: Iterable[int]) -> bool:
    """Whether the subgraph induced on ``nodes`` is connected."""
    keep = set(nodes)
    if not keep:
        return False
    start = next(iter(keep))
    seen = {start}
    stack = [start]
    while stack:
        u = stack.pop()
        for v in graph[u]:
            if v in keep and v not in seen:
                seen.add(v)
                stack.append(v)
    return seen == keep
