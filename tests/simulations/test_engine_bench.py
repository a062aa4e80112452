"""`fedpersona bench engine` end to end on a very small preset: the table and, last, the speedup line."""

from dataclasses import replace

import pytest

from fedpersona.simulations.engine.bench import PRESETS, run


def test_bench_prints_table_and_speedup_last():
    lines = []
    tiny = replace(PRESETS["quick"], cohorts=(2, 3), steps=1, examples=6, sequential_clients=2)
    r = run(tiny, out=lines.append)
    assert lines[-1].startswith("engine speedup: ") and lines[-1].endswith("x")
    assert float(lines[-1].split()[-1][:-1]) == pytest.approx(r["speedup"][(3, "expanded")], abs=0.006)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert len(table) == 1 + 1 + 2 * 2  # header, sequential, 2 cohorts x 2 methods
    assert any("torch " in ln and "opacus " in ln for ln in lines)
    for key, figures in r["engine"].items():
        assert figures[True]["tokens"] > 0 and figures[True]["wall"] > 0


def test_bench_refuses_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        run("huge")


def test_devices_vs_engine_round_on_real_devices(tiny_config):
    """`python -m fedpersona.simulations.bench.devices`: the same round both ways, on prepared users of a scenario."""
    from fedpersona.simulations.bench.devices import compare

    r = compare("demo", dict(tiny_config, **{"data.max-users": 4}), users=4)
    assert r["devices"] == 4
    assert r["own_path_seconds"] > 0 and r["engine_seconds"] > 0
    assert r["engine_over_own"] == pytest.approx(r["engine_seconds"] / r["own_path_seconds"])
    with pytest.raises(ValueError, match="adapter.head"):
        compare("demo", dict(tiny_config, **{"adapter.head": "prompt"}), users=4)


def test_head_sweep_trains_each_users_head_apart(tiny_config):
    """`python -m fedpersona.simulations.bench.head`: every grid point trains fresh heads; more steps move the loss."""
    from fedpersona.simulations.bench.head import parse_grid, sweep

    rows = sweep("demo", dict(tiny_config, **{"data.max-users": 3}), grid=[(1, 1e-6), (8, 0.05)])
    assert [(r["steps"], r["lr"], r["users"]) for r in rows] == [(1, 1e-6, 3), (8, 0.05, 3)]
    # One step at lr 1e-6 leaves the head at the identity: the base model's loss, to float precision.
    assert abs(rows[0]["gain"]) < 1e-4
    assert abs(rows[1]["gain"]) > 10 * abs(rows[0]["gain"]), "8 steps at lr 0.05 move the held-out loss"
    assert all(0 <= r["better"] <= 3 for r in rows)
    assert parse_grid("6:0.01, 12:5e-3") == [(6, 0.01), (12, 0.005)]
    for bad in ("6", "6:x", "0:0.01", "6:0", "6:0.01,"):
        with pytest.raises(ValueError, match="STEPS:LR"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="adapter.head"):
        sweep("demo", dict(tiny_config, **{"adapter.head": "prompt"}), grid=[(1, 0.01)])


def test_snr_diagnostic_cosines(tiny_config):
    """`python -m fedpersona.simulations.bench.snr`: per-example gradients, the device's sigma, cosines in [-1, 1]."""
    import torch

    from fedpersona.simulations.bench.snr import cohort_cosines, measure

    r = measure("demo", dict(tiny_config, **{"data.max-users": 3}), cohorts=[1, 2, 5], trials=4)
    assert r["users"] == 3 and r["d"] > 0 and r["sigma"] > 0
    assert set(r["cosines"]) == {1, 2, 5}
    assert all(-1.0 <= c <= 1.0 for pair in r["cosines"].values() for c in pair)
    # Synthetic: every example's gradient is the same unit vector; without noise the sum points along it.
    g = [torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 6) for _ in range(4)]
    cos = cohort_cosines(g, [1.0] * 4, sigma=0.0, clip=1.0, cohorts=[1, 4], trials=3)
    assert cos[1] == pytest.approx((1.0, 1.0)) and cos[4] == pytest.approx((1.0, 1.0))
    # Noise far above the signal in 4,000 dimensions: the cosine falls to near 0, and a larger cohort helps.
    g = [torch.nn.functional.pad(x, (0, 3996)) for x in g]
    cos = cohort_cosines(g, [1.0] * 4, sigma=5.0, clip=1.0, cohorts=[1, 400], trials=20)
    assert cos[1][0] < 0.1 < cos[400][0] and cos[1][1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="privacy.enabled"):
        measure("demo", dict(tiny_config, **{"privacy.enabled": False}), cohorts=[1])
