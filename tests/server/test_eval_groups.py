"""How the final evaluation's nodes are split into secure sums: each one at most a round's cohort, never
below the sum's minimum, every node in exactly one."""

from __future__ import annotations

import pytest

from fedpersona.server.secagg import evaluation_groups


@pytest.mark.parametrize("n,size,minimum", [(1000, 16, 3), (1000, 64, 3), (50, 8, 3), (200, 32, 5), (17, 16, 3),
                                            (16, 16, 3), (7, 3, 3), (5, 3, 3), (3, 8, 3), (64, 64, 32), (65, 64, 32)])
def test_groups_cover_every_node_once_within_the_bounds(n, size, minimum):
    nodes = [1000 + 7 * i for i in range(n)][::-1]
    groups = evaluation_groups(nodes, size, minimum)
    flat = [x for g in groups for x in g]
    assert sorted(flat) == sorted(nodes) and len(flat) == len(set(flat))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1  # balanced
    if len(groups) > 1:
        assert min(sizes) >= minimum  # each sum as private as a round's
    if n >= 2 * minimum or n <= size:
        # The round's cohort bounds a group unless that would push one below the minimum.
        fits = -(-n // size) <= n // minimum
        assert max(sizes) <= size or not fits
    assert len(groups) == (max(1, -(-n // size)) if n // max(1, -(-n // size)) >= minimum else max(1, n // minimum))


def test_group_examples():
    assert sorted(len(g) for g in evaluation_groups(range(1000), 16, 3)) == [15] * 8 + [16] * 55
    assert [len(g) for g in evaluation_groups(range(7), 3, 3)] == [3, 4]  # 3 groups would leave one of 2
    assert evaluation_groups([5, 3, 9], 8, 3) == [[3, 5, 9]]
    with pytest.raises(ValueError, match="group size"):
        evaluation_groups(range(4), 0, 3)
