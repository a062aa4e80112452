import json
import math

import pytest

from fedpersona.config import CONFIG_ENV, known_keys, load_config, parse_override, read_scenario
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.simulations.runner import CONF_DIR


def test_defaults_parse_and_round_trip():
    cfg = load_config({}, env=False)
    assert cfg.adapter.split == "ffa"
    again = load_config(cfg.to_flat(), env=False)
    assert again == cfg


def test_pyproject_app_config_matches_known_keys():
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    app_cfg = doc["tool"]["flwr"]["app"]["config"]
    assert set(app_cfg) <= set(known_keys())
    secagg_params(load_config(app_cfg, env=False))


def test_pyproject_app_config_is_the_demo_scenario():
    """One source of truth: `flwr run .` (pyproject's config) runs exactly what `fedpersona run` (demo.toml) runs."""
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    flower = load_config(doc["tool"]["flwr"]["app"]["config"], env=False)
    demo = load_config(read_scenario(CONF_DIR / "demo.toml"), env=False)
    differ = {k: (v, demo.to_flat()[k]) for k, v in flower.to_flat().items() if demo.to_flat()[k] != v}
    assert not differ, f"pyproject.toml [tool.flwr.app.config] differs from simulations/conf/demo.toml: {differ}"
    assert doc["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedpersona.simulations.serverapp:app"


@pytest.mark.parametrize("key, meant", [
    ("privacy.target_epsilon", "privacy.target-epsilon"), ("privcy.delta", "privacy.delta"),
    ("target-epsilon", "privacy.target-epsilon"), ("server.num-round", "server.num-rounds"),
    ("data.minexamples", "data.min-examples"), ("client.local-step", "client.local-steps"),
])
def test_a_mistyped_key_gets_a_did_you_mean(key, meant):
    with pytest.raises(ValueError, match="Unknown config key") as err:
        load_config({key: 1}, env=False)
    assert f"'{key}': did you mean '{meant}'?" in str(err.value)
    assert "Known keys" not in str(err.value) and len(str(err.value)) < 300, "not every key of every section"


def test_an_unknown_key_far_from_any_lists_its_section():
    with pytest.raises(ValueError) as err:
        load_config({"model.bogus": 1, "nosection.key": 2}, env=False)
    text = str(err.value)
    assert "'model.bogus': [model] has path, seq-len, cue-tokens, device, dtype." in text
    assert "'nosection.key': no section 'nosection' (sections: adapter, client, data" in text


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_scenarios_are_valid(path):
    from fedpersona.privacy.secagg.settings import secagg_params

    secagg_params(load_config(read_scenario(path), env=False))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("privacy.noise-multiplier", -1.0, "privacy.noise-multiplier"),
        ("privacy.delta", 1.0, "privacy.delta"),
        ("privacy.target-epsilon", 0, "privacy.target-epsilon"),
        ("adapter.rank", 0, "adapter.rank"),
        ("server.clients-per-round", 0, "cohort cannot be empty"),
        ("server.sampling", "round-robin", "uniform.*balanced"),
        ("adapter.split", "lora", "adapter.split"),
        ("privacy.accountant", "gdp", "off by about 2x"),
        ("adapter.targets", "q_proj,foo", "'foo'"),
        ("client.local-steps", 1.5, "must be an integer"),
        ("privacy.enabled", "maybe", "true or false"),
        ("secagg.enabled", "maybe", "true or false"),
        ("secagg.clip-norm", 0, "positive finite"),
        ("secagg.scale", 0.5, "0 \\(auto\\)"),
        ("secagg.threshold", 99, "clients-per-round"),
        ("secagg.ddp-min-clients", 1, ">= 2"),
        ("secagg.ddp-delta", 1.0, "secagg.ddp-delta"),
    ],
)
def test_invalid_values_name_the_field(key, value, match):
    with pytest.raises(ValueError, match=match) as err:
        load_config({key: value}, env=False)
    assert key in str(err.value)


def test_secagg_settings_the_protocol_cannot_meet_name_the_field():
    # load_config checks ranges; the protocol's own check (modulus, noise) is fedpersona.privacy.secagg.settings.
    from fedpersona.privacy.secagg.settings import secagg_params

    with pytest.raises(ValueError, match="bits") as err:
        secagg_params(load_config({"secagg.scale": 2.0**60}, env=False))
    assert "secagg.scale" in str(err.value)


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="Unknown config key.*privacy.epsilon"):
        load_config({"privacy.epsilon": 3}, env=False)
    with pytest.raises(ValueError, match="Unknown config key"):
        load_config({"privacy.target_epsilon": 3}, env=False)


def test_fedper_needs_body_blocks():
    with pytest.raises(ValueError, match="adapter.personal-layers"):
        load_config({"adapter.split": "fedper", "adapter.layers": 2, "adapter.personal-layers": 2}, env=False)


def test_env_overlay_wins(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"server.num-rounds": 7}))
    assert load_config({"server.num-rounds": 3}).server.num_rounds == 7
    assert load_config({"server.num-rounds": 3}, env=False).server.num_rounds == 3


def test_privacy_off_warns():
    with pytest.warns(UserWarning, match="WITHOUT differential privacy"):
        load_config({"privacy.enabled": False}, env=False)


def test_parse_override():
    assert parse_override("server.num-rounds=3") == ("server.num-rounds", 3)
    assert parse_override("adapter.split=fedsa") == ("adapter.split", "fedsa")
    assert parse_override("privacy.enabled=false") == ("privacy.enabled", False)
    with pytest.raises(ValueError, match="key=value"):
        parse_override("nothing")


def test_personal_head_keys():
    from fedpersona.config import load_config

    cfg = load_config({"privacy.personal-head": "dp", "client.head-steps": 0}, env=False)
    assert cfg.privacy.personal_head == "dp" and cfg.client.head_steps == 0
    with pytest.raises(ValueError, match="privacy.personal-head.*You passed: 'noisy'"):
        load_config({"privacy.personal-head": "noisy"}, env=False)
    with pytest.raises(ValueError, match="client.head-steps"):
        load_config({"client.head-steps": -1}, env=False)
    with pytest.raises(ValueError, match="client.head-lr"):
        load_config({"client.head-lr": 0}, env=False)
    with pytest.raises(ValueError, match="privacy.personal-head.*fedsa"):
        load_config({"adapter.split": "fedsa"}, env=False)
    assert load_config({"adapter.split": "fedsa", "privacy.personal-head": "dp"}, env=False).adapter.split == "fedsa"


def test_head_keys():
    cfg = load_config({}, env=False)
    assert cfg.adapter.head == "lora" and cfg.adapter.prompt_tokens == 8
    cfg = load_config({"adapter.head": "prompt", "adapter.prompt-tokens": 4}, env=False)
    assert cfg.adapter.head == "prompt" and cfg.adapter.prompt_tokens == 4
    assert load_config(cfg.to_flat(), env=False) == cfg
    with pytest.raises(ValueError, match="'adapter.head'.*You passed: 'prefix'"):
        load_config({"adapter.head": "prefix"}, env=False)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"'adapter.prompt-tokens'.*You passed: {bad}"):
            load_config({"adapter.head": "prompt", "adapter.prompt-tokens": bad}, env=False)
    with pytest.raises(ValueError, match="'adapter.prompt-tokens'.*must be an integer"):
        load_config({"adapter.prompt-tokens": 2.5}, env=False)
    for head_mode in ("dp", "local"):
        with pytest.raises(ValueError, match="'adapter.head'.*fedsa.*You passed: 'prompt'"):
            load_config({"adapter.head": "prompt", "adapter.split": "fedsa", "privacy.personal-head": head_mode},
                        env=False)
    # A prompt head has no personal blocks: fedper's body/head block count does not apply to it.
    cfg = load_config({"adapter.head": "prompt", "adapter.split": "fedper", "adapter.layers": 2,
                       "adapter.personal-layers": 2}, env=False)
    assert cfg.adapter.split == "fedper"


def test_model_device_and_dtype_keys():
    from fedpersona.config import load_config

    cfg = load_config({"model.device": "cuda:1", "model.dtype": "bfloat16"}, env=False)
    assert (cfg.model.device, cfg.model.dtype) == ("cuda:1", "bfloat16")
    assert load_config({}, env=False).model.device == "auto"
    with pytest.raises(ValueError, match="model.device.*You passed: 'gpu'"):
        load_config({"model.device": "gpu"}, env=False)
    with pytest.raises(ValueError, match="model.dtype.*You passed: 'float16'"):
        load_config({"model.dtype": "float16"}, env=False)


def test_min_contributors_range():
    assert load_config({}, env=False).secagg.min_contributors == 3
    with pytest.raises(ValueError, match=r"secagg.min-contributors.*>= 2.*You passed: 1"):
        load_config({"secagg.min-contributors": 1}, env=False)
    with pytest.raises(ValueError, match=r"secagg.min-contributors.*clients-per-round=4.*You passed: 5"):
        load_config({"secagg.min-contributors": 5, "server.clients-per-round": 4}, env=False)


@pytest.mark.parametrize("key, value", [
    ("privacy.planned-rounds", 1e9), ("server.num-rounds", 10**6), ("client.local-steps", 10**7),
    ("client.head-steps", 10**7), ("client.batch-size", 10**6), ("client.head-batch-size", 10**6),
    ("model.seq-len", 10**6), ("client.lr", math.inf), ("client.head-lr", math.inf), ("server.lr", math.inf),
    ("privacy.max-grad-norm", math.inf),
])
def test_absurd_values_are_refused_naming_the_field(key, value):
    """A round config is the server's: values no run needs are refused before anything uses them."""
    with pytest.raises(ValueError, match=f"'{key}'.*You passed: ") as err:
        load_config({key: value}, env=False)
    assert repr(int(value) if isinstance(value, float) and value.is_integer() else value) in str(err.value)
    # the largest accepted value of each bounded key still loads
    from fedpersona import config as C

    top = {"privacy.planned-rounds": C.MAX_ROUNDS, "server.num-rounds": C.MAX_ROUNDS, "client.local-steps": C.MAX_STEPS,
           "client.head-steps": C.MAX_STEPS, "client.batch-size": C.MAX_BATCH_SIZE,
           "client.head-batch-size": C.MAX_BATCH_SIZE, "model.seq-len": C.MAX_SEQ_LEN}
    if key in top:
        load_config({key: top[key]}, env=False)
