"""`fedpersona bench newcomer --quick`: the whole benchmark on a tiny model."""

import math

from fedpersona.simulations.studies.newcomer import format_tables, run_bench


def test_newcomer_quick_mode_runs():
    r = run_bench(quick=True)
    assert len(r["newcomers"]) == 3 and r["quick"]
    assert set(r["table"]) == {"head", "profile", "head+profile"}
    for method, row in r["table"].items():
        assert set(row) == {"0", "5", "20", "all"}
        assert all(math.isfinite(v) and v > 0 for v in row.values())
        # With no example there is nothing to personalize with: every method is the shared model.
        assert math.isclose(row["0"], r["shared_only"], rel_tol=1e-6)
    # A head trained on a newcomer's examples lowers its held-out loss, even on a random-weight model.
    assert r["table"]["head"]["all"] < r["shared_only"]
    assert set(r["reptile"]) == {"shipped (head persists)", "Reptile-style (fresh head)"}
    # The two inner loops train different shared adapters.
    a, b = (r["reptile"][k]["0"] for k in sorted(r["reptile"]))
    assert a != b
    text = format_tables(r)
    assert "| head+profile |" in text and "Reptile-style" in text
