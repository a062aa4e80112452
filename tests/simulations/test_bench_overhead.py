"""`fedpersona bench overhead --quick`: the table, the JSON file and the last line, consistent with each other."""

import json

import pytest

from fedpersona.simulations.bench.overhead import QUICK, bench, summary


def test_quick_bench_rows_are_consistent(tiny_model_dir, tmp_path):
    lines: list[str] = []
    path = tmp_path / "overhead.json"
    # The quick preset, with the fewest training steps (the test checks the figures' structure, not their size).
    small = {"client.local-steps": 1, "client.head-steps": 1}
    doc = bench(**QUICK, overrides=small, model_dir=tiny_model_dir, json_path=path, out=lines.append)
    assert QUICK["cohorts"][0] >= 16
    assert lines[-1] == f"framework per participation: {doc['framework_per_participation_ms']:.1f} ms"
    saved = json.loads(path.read_text())
    assert saved["framework_per_participation_ms"] == pytest.approx(doc["framework_per_participation_ms"])
    (run,) = saved["runs"]
    assert (run["users"], run["cohort"], run["rounds"]) == (16, 16, 2)
    assert run["failures"] == 0 and run["fallbacks"] == 0
    rows = run["rows"]
    assert [r["stage"] for r in rows] == ["round 1", "round 2", "final evaluation"]
    for r in rows:
        assert r["participations"] == 16
        assert r["wall_s"] > 0 and 0 < r["engine_s"] <= r["wall_s"]
        assert r["framework_s"] == pytest.approx(r["wall_s"] - r["engine_s"])
        assert r["framework_per_participation_ms"] == pytest.approx(1000 * r["framework_s"] / 16)
        assert r["engine_per_participation_ms"] == pytest.approx(1000 * r["engine_s"] / 16)
        # The devices' stores write durably in every stage; that time is part of the framework's.
        assert r["fsync_calls"] > 0 and 0 < r["fsync_s"] <= r["framework_s"] + 1e-9
        assert r["secagg_s"] > 0
    assert run["protocol_cpu_s"] > 0
    # The lower blocks run once per device, when it is built: every device in round 1 (one sweep), none after.
    assert 0 < rows[0]["lower_s"] <= rows[0]["framework_s"] and rows[1]["lower_s"] == rows[2]["lower_s"] == 0
    # The last line: the rounds' framework time over their participations (the evaluation apart).
    rounds = rows[:2]
    assert doc["framework_per_participation_ms"] == pytest.approx(
        1000 * sum(r["framework_s"] for r in rounds) / sum(r["participations"] for r in rounds))
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, separator, one line per row
    assert all(ln.count("|") == table[0].count("|") for ln in table)


def test_summary_pools_the_largest_cohort_only():
    def row(rnd, parts, framework, engine=1.0):
        return {"round": rnd, "participations": parts, "framework_s": framework, "engine_s": engine, "fsync_s": 0.1}

    results = [{"cohort": 8, "rows": [row(1, 8, 80.0)]},
               {"cohort": 32, "rows": [row(1, 32, 3.2), row(2, 30, 3.0), row(None, 200, 99.0)]},
               {"cohort": 32, "rows": [row(1, 32, 6.4)]}]
    s = summary(results)
    assert s["largest_cohort"] == 32 and s["participations"] == 94
    assert s["framework_per_participation_ms"] == pytest.approx(1000 * 12.6 / 94)
    with pytest.raises(ValueError, match="no \\(N, K\\) pair"):
        summary([])


@pytest.mark.parametrize("kwargs,match", [(dict(users=(1,)), "--users"), (dict(cohorts=()), "--cohorts"),
                                          (dict(rounds=0), "--rounds")])
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(users=(16,), cohorts=(16,), rounds=1) | kwargs
    with pytest.raises(ValueError, match=match):
        bench(**args)
