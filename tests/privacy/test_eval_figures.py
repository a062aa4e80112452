"""The final evaluation's figures: bounded (so the noise has a sensitivity to cover), noised, accounted."""

import math

import numpy as np
import pytest

from fedpersona.config import load_config
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.secagg.ddp import ddp_epsilon
from fedpersona.privacy.secagg.eval_figures import (FIGURES, HISTOGRAMS, encode, eval_epsilon, eval_params, histogram_length,
                                         noise_stddev, record_eval, sensitivity, summarize, vector_fields)

ROW = {"base-loss": 5.9, "base-accuracy": 0.1, "shared-loss": 5.8, "shared-accuracy": 0.12, "personal-loss": 5.2,
       "personal-accuracy": 0.2, "local-loss": 31.0, "local-accuracy": 0.3, "epsilon": 4.0, "train-examples": 36.0}


def test_every_coordinate_is_bounded_and_nothing_exact_beyond_them():
    cfg = load_config({}, env=False)
    vec, extras = encode(cfg, ROW)
    assert extras == {} and vec.shape == (histogram_length(),) == (sum(n for _, n in vector_fields()),)
    assert vec.min() >= 0 and vec.max() <= 1 and np.linalg.norm(vec) <= sensitivity() + 1e-12
    assert vec[FIGURES.index("local-loss")] == 1.0  # 31 nats clipped to the cap of 10
    # No count, epsilon or other row key enters the vector: changing them changes nothing.
    other, _ = encode(cfg, dict(ROW, epsilon=0.1, **{"train-examples": 3.0}))
    assert np.array_equal(vec, other)
    assert len(HISTOGRAMS) + len(FIGURES) == round(sensitivity() ** 2)


def test_the_epsilon_is_the_distributed_discrete_gaussian_one_and_composes():
    cfg = load_config({"eval.noise-multiplier": 2.0}, env=False)
    q = eval_params(cfg).quantizer
    t = max(cfg.secagg.min_contributors, cfg.server.min_clients, 2)
    assert q.noise_stddev == pytest.approx(2.0 * sensitivity() * q.scale / math.sqrt(t))
    expected = ddp_epsilon(noise_stddev_quantized=q.noise_stddev, l2_sensitivity_quantized=q.l2_sensitivity(727),
                           num_clients=t, dim=727, delta=cfg.secagg.ddp_delta)
    assert eval_epsilon(cfg) == pytest.approx(expected) and 2.0 < expected < 2.3
    assert eval_epsilon(load_config({"eval.noise-multiplier": 4.0}, env=False)) < expected
    ledger = PrivacyLedger()
    first = record_eval(ledger, cfg, round=4)
    second = record_eval(ledger, cfg, round=8)  # a second evaluation release of the same user composes
    assert first["epsilon"] == pytest.approx(expected) and second["epsilon"] > first["epsilon"]
    assert second["epsilon"] == pytest.approx(eval_epsilon(cfg, releases=2))
    with pytest.raises(ValueError, match="eval.noise-multiplier"):
        load_config({"eval.noise-multiplier": 0.1}, env=False)


def test_the_summary_shows_a_model_only_above_the_noise():
    cfg = load_config({}, env=False)
    sd = noise_stddev(cfg)
    rng = np.random.default_rng(0)
    rows = [dict(ROW, **{"local-loss": None, "local-accuracy": None}) for _ in range(400)]
    exact = sum(encode(cfg, r)[0] for r in rows)
    s = summarize(exact + rng.normal(0, sd, exact.size), noise_sd=sd)
    assert s["users"]["n"] == pytest.approx(400, abs=4 * sd) and "local-loss" not in s
    # 400 devices: the mean's noise has sd 2 x 4.47 x 10 / 400 = 0.22 nats; the median's bin is 0.1 wide.
    assert s["personal-loss"]["mean"] == pytest.approx(5.2, abs=1.0)
    assert s["personal-loss"]["median"] == pytest.approx(5.25, abs=0.3)
    few = summarize(sum(encode(cfg, r)[0] for r in rows[:6]) + rng.normal(0, sd, exact.size), noise_sd=sd)
    assert not any(k.endswith("-loss") for k in few)  # 6 devices: below 3 sd, nothing but the noised count
