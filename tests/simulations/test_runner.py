import pytest

from fedpersona.simulations.runner import resolve, run, scenario_path


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
    """The error names the real cause: the users left after the filters, and where the cohort size came from."""
    with pytest.raises(ValueError) as err:
        run(None, dict(tiny_config, **{"server.clients-per-round": 5, "data.max-users": 4}))
    text = str(err.value)
    assert text.startswith("Too few users: 4 of the ") and "users of shakespeare are left after the filters (" in text
    assert "with fewer than data.min-examples=40 examples" in text and "not drawn (data.max-users=4)" in text
    assert "server.clients-per-round = 5 (--set)" in text and "at most 4" in text
    with pytest.raises(ValueError, match=r"server.clients-per-round = 8 \(the default\)"):
        run(None, {k: v for k, v in tiny_config.items() if k != "server.clients-per-round"} | {"data.max-users": 4})


def test_auto_engine_picks_by_where_the_model_runs(tiny_config, tiny_model_dir, tmp_path):
    import json
    import shutil

    from fedpersona.config import load_config
    from fedpersona.simulations.runner import AUTO_ENGINE_MAX_CPU_HIDDEN, resolve_engine

    cfg = load_config(tiny_config, env=False)
    assert resolve_engine("auto", cfg)[0] == "cohort", "a tiny model on the CPU: the engine"
    wide = tmp_path / "wide-model"
    shutil.copytree(tiny_model_dir, wide)
    conf = json.loads((wide / "config.json").read_text())
    assert conf["hidden_size"] < AUTO_ENGINE_MAX_CPU_HIDDEN
    (wide / "config.json").write_text(json.dumps(dict(conf, hidden_size=576)))  # SmolLM2-135M's width
    engine, why = resolve_engine("auto", load_config(dict(tiny_config, **{"model.path": str(wide)}), env=False))
    assert engine == "devices" and "CPU" in why
    assert resolve_engine("auto", cfg, engines=2)[0] == "cohort"
    assert resolve_engine("flower", cfg) == ("flower", "as asked")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("ray", cfg)


def test_devices_engine_trains_each_round_on_the_device(tiny_config, caplog):
    import logging

    flat = dict(tiny_config, **{"server.num-rounds": 1, "eval.local-baseline": False})
    caplog.set_level(logging.INFO, logger="fedpersona.client.device")
    metrics = run(None, flat, cpus=1, engine="devices")
    assert metrics["rounds"][0]["applied"] and metrics["rounds"][0]["contributors"] == 3
    trained = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.device" and " steps (" in r.getMessage()]
    assert len(trained) == 3 and not any("(cohort engine)" in line for line in trained), trained
    assert len(metrics["final"]["users"]) == 4
