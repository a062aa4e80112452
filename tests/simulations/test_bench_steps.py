"""`python -m fedpersona.simulations.bench.steps`: per-step CPU costs and the projection of a scenario's run (tiny model)."""

import math

import pytest

from fedpersona.simulations.bench.steps import format_result, measure


def test_projection_adds_up_from_the_measured_steps(tiny_config):
    overrides = dict(tiny_config, **{"data.max-users": 3, "server.clients-per-round": 3, "server.num-rounds": 2,
                                     "client.head-steps": 2, "data.max-examples": 20})
    r = measure(None, overrides, examples=16, steps=1)
    unit = r["per_unit"]
    assert all(v > 0 and math.isfinite(v) for v in unit.values())
    assert r["users"] == 3 and r["examples"] == 60 and r["participations"] == 6
    assert r["held_out"] == 3 * 5  # round(0.25 * 20) per user
    p = r["projection"]
    assert p["lower blocks (once, cached)"] == pytest.approx(60 * unit["lower blocks per example"])
    # Two local DP steps and two head steps a participation, twice (the local-only replay).
    assert p["rounds (and the local-only replay)"] == pytest.approx(
        6 * (2 * unit["DP-SGD step"] + 2 * unit["head step"]) * 2)
    assert p["final evaluation"] == pytest.approx(15 * 4 * unit["evaluation per example"])
    assert r["total_cpu_seconds"] == pytest.approx(sum(p.values()))
    assert "CPU-min" in format_result(r)
    with pytest.raises(ValueError, match="--examples"):
        measure(None, overrides, examples=2)
