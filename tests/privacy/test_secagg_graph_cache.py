"""The SecAgg+ graph is derived once per (cohort, degree, seed): every client of a round shares it."""

from __future__ import annotations

import hashlib

import pytest

from fedpersona.privacy.secagg import graph as graph_module
from fedpersona.privacy.secagg.graph import build_graph, default_degree


def test_one_graph_per_round_whatever_order_the_cohort_comes_in(monkeypatch):
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(graph_module.hashlib, "sha256", lambda data=b"": hashed.append(1) or real(data))
    graph_module._graph.cache_clear()
    ids = list(range(500, 564))
    k = default_degree(len(ids))
    first = build_graph(ids, k, b"s" * 32)
    assert len(hashed) == len(ids)  # one SHA-256 per member, once
    for order in (ids[::-1], [int(x) for x in sorted(ids, key=lambda c: (c * 7919) % 64)], tuple(ids)):
        assert build_graph(order, k, b"s" * 32) is first  # the 63 other clients of the round: no new hash
    assert len(hashed) == len(ids)
    assert build_graph(ids, k, b"t" * 32) != first  # another seed (another round): another graph
    assert len(hashed) == 2 * len(ids)


def test_the_shared_graph_cannot_be_changed_by_one_of_its_users():
    g = build_graph(range(10, 30), 6, b"r" * 32)
    with pytest.raises(TypeError):
        g[10] = (11,)  # type: ignore[index]
    assert build_graph(range(10, 30), 6, b"r" * 32)[10] != (11,)
