"""The accounting bench: the ledger's epsilon and calibration against every order, side by side."""

from __future__ import annotations

from fedpersona.privacy import ledger
from fedpersona.simulations.bench.accountant import bench, main


def test_the_bench_finds_the_same_numbers_from_fewer_orders(capsys):
    r = bench(histories=6, calibrations=2, seed=3)
    assert r["epsilon"]["mismatches"] == 0 and r["calibration"]["sigmas_differ"] == 0
    assert r["epsilon"]["orders_median"] < r["epsilon"]["orders_all"]
    assert r["calibration"]["opacus_orders_deciding"] < r["calibration"]["opacus_orders_every"]
    assert ledger._least_epsilon.__module__ == ledger.__name__  # the reference mode is undone
    assert main(["--histories", "2", "--calibrations", "1"]) == 0
    assert "different sigmas: 0" in capsys.readouterr().out
