import pytest

from simulations.runner import resolve, run, scenario_path


def test_unknown_scenario_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="demo"):
        scenario_path("nope")


def test_resolve_makes_folders_absolute(tiny_config):
    flat, cfg = resolve("demo", {"run.results-dir": "rel/results"})
    assert flat["run.results-dir"].startswith("/") and cfg.run.results_dir.endswith("rel/results")
    assert cfg.adapter.layers == 4  # from demo.toml


def test_delta_must_be_below_one_over_examples(tiny_config):
    with pytest.raises(ValueError, match="privacy.delta.*1/"):
        run(None, dict(tiny_config, **{"privacy.delta": 0.2}))


def test_cohort_larger_than_the_users(tiny_config):
    with pytest.raises(ValueError, match="server.clients-per-round"):
        run(None, dict(tiny_config, **{"server.clients-per-round": 5, "data.max-users": 4}))
