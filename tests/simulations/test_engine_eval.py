"""The final evaluation's held-out passes through the cohort engine, and its secure sums over groups."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fedpersona.client.device import EVALUATION, state_digest
from fedpersona.client.store import DeviceStore
from fedpersona.client.train import CachedExample, evaluate
from fedpersona.config import load_config
from fedpersona.model import adapted_model
from fedpersona.privacy.secagg.eval_figures import encode, noise_stddev, summarize
from fedpersona.simulations.engine import EVAL_MODELS, CohortEngine, EvalJob
from fedpersona.simulations.engine.engine import engine_model
from fedpersona.simulations.partitions import prepare_partitions, simulated_state_dir
from fedpersona.simulations.runner import resolve
from fedpersona.simulations.sources import load_source
from tests.client.device_helpers import placed_device
from tests.simulations.engine_helpers import federate_on_engine_grid

TINY = {"model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2, "adapter.personal-layers": 1,
        "adapter.rank": 2}


def _random_jobs(model, n_clients: int, seed: int = 0) -> list[EvalJob]:
    g = torch.Generator().manual_seed(seed)
    hidden = model.peft.base_model.model.config.hidden_size
    jobs = []
    for c in range(n_clients):
        examples = []
        for i in range(2 + c):
            length = 9 + (5 * i + 3 * c) % 22
            labels = [-100] * 3 + torch.randint(0, 300, (length - 3,), generator=g).tolist()
            examples.append(CachedExample(torch.randn(length, hidden, generator=g), tuple(labels)))
        shared = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in model.initial_shared_state().items()}
        personal = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in model.fresh_personal_state().items()}
        jobs.append(EvalJob(examples, shared, personal, client_id=f"c{c}"))
    return jobs


@pytest.mark.parametrize("split", ["ffa", "fedsa", "fedper"])
def test_evaluate_cohort_equals_the_devices_evaluation(tiny_model_dir, split):
    """Every client's base / shared-alone / personalized figures, as fedpersona.client.train.evaluate gives them one by one."""
    extra = {"privacy.personal-head": "dp"} if split == "fedsa" else {}
    cfg = load_config({"model.path": str(tiny_model_dir), "adapter.split": split, **TINY, **extra}, env=False)
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    engine = CohortEngine(engine_model(cfg), token_budget=200)  # a small budget: several passes
    jobs = _random_jobs(model, 5)
    got = engine.evaluate_cohort(jobs)
    assert len(got) == len(jobs)
    for job, row in zip(jobs, got):
        model.load_shared_state(job.shared)
        model.load_personal_state(job.personal)
        with model.adapters_disabled():
            base = evaluate(model, job.examples)
        with model.personal_zeroed():
            alone = evaluate(model, job.examples)
        want = {"base": base, "shared": alone, "personal": evaluate(model, job.examples)}
        assert set(row) == set(EVAL_MODELS)
        for m in EVAL_MODELS:
            assert row[m]["tokens"] == want[m]["tokens"] > 0
            assert row[m]["loss"] == pytest.approx(want[m]["loss"], rel=1e-5)
            assert row[m]["accuracy"] == pytest.approx(want[m]["accuracy"], abs=1e-9)
        assert row["personal"]["loss"] != pytest.approx(row["base"]["loss"], rel=1e-6)  # the adapters count
    with pytest.raises(ValueError, match="adapter layout"):
        engine.evaluate_cohort([EvalJob(jobs[0].examples, {}, jobs[0].personal)])


def test_a_device_uses_an_offered_evaluation_only_for_its_own_adapter_and_head(tiny_config, tmp_path, caplog):
    dev = placed_device(tiny_config, tmp_path, device="cpu", dtype="float32", tag="offer")
    shared = dev.model.initial_shared_state()
    own = dev.final_evaluation(shared)
    engine = CohortEngine(engine_model(dev.cfg))
    head = dev.personal_state()
    (figures,) = engine.evaluate_cohort([EvalJob(dev.data.held_out, shared, head)])
    dev.offer_evaluation(state_digest(shared), state_digest(head), figures)
    offered = dev.final_evaluation(shared)
    assert offered.keys() == own.keys()
    for key, value in own.items():
        assert offered[key] == pytest.approx(value, rel=1e-5), key
    # Figures for another shared adapter: not used (a warning), the device evaluates itself.
    bogus = {m: {"loss": 0.123, "accuracy": 0.5, "tokens": 7} for m in EVAL_MODELS}
    other = {k: v + 0.01 for k, v in shared.items()}
    dev.offer_evaluation(state_digest(other), state_digest(head), bogus)
    with caplog.at_level(logging.WARNING, logger="fedpersona.client.device"):
        again = dev.final_evaluation(shared)
    assert again["base-loss"] == pytest.approx(own["base-loss"]) and again["base-loss"] != 0.123
    assert "computed for another shared adapter or head" in caplog.text
    stored = json.loads(dev.store.load_text(EVALUATION))
    assert stored["base-loss"] == pytest.approx(own["base-loss"])


def test_final_evaluation_in_groups_through_the_engine(tiny_config, tmp_path):
    """7 devices, 3 a round: two secure sums (3 + 4 devices, never fewer than secagg.min-contributors = 3),
    every held-out pass in the engine, and the summary is what one sum over every device's row gives."""
    over = {"data.max-users": 7, "server.clients-per-round": 3, "server.num-rounds": 1, "eval.local-baseline": False,
            "eval.per-round": False, "run.results-dir": str(tmp_path / "results"), "run.state-dir": str(tmp_path / "state")}
    flat, cfg = resolve(None, dict(tiny_config, **over))
    users = load_source(cfg.data, cfg.run.seed)
    prepare_partitions(cfg, users)
    metrics, grid = federate_on_engine_grid(flat, cfg, users)
    final = metrics["final"]
    assert len(users) == 7 and final["devices"] == 7 and not final["failures"]
    assert final["eval-groups"] == 2 and final["eval-groups-aborted"] == 0
    assert grid.evaluated == 7 and grid.eval_seconds > 0
    vec, extras = None, {}
    for u in users:
        row = json.loads(DeviceStore(simulated_state_dir(cfg, u.user_id)).load_text(EVALUATION))
        v, e = encode(cfg, row)
        vec = v if vec is None else vec + v
        for k, x in e.items():
            extras[k] = extras.get(k, 0.0) + x
    # The released totals carry the evaluation's noise (each group's sum: the devices' shares of it), so the merged
    # summary is the one sum over every device's row up to that noise: the device count within 5 of its standard
    # deviations.
    sd = noise_stddev(cfg)
    want = summarize(vec, extras, noise_sd=sd)
    got = final["summary"]
    assert abs(got["users"]["n"] - want["users"]["n"]) <= 5 * sd + 1
    assert got["users"]["noise_sd"] >= sd
    # A model is shown only when its noised device count reaches 3 standard deviations of the noise.
    assert all(v["n"] >= 3 * got["users"]["noise_sd"] - 1 for k, v in got.items() if k.endswith(("-loss", "-accuracy")))
    inventory = [json.loads(line) for u in users
                 for line in (Path(simulated_state_dir(cfg, u.user_id)) / "inventory.jsonl").read_text().splitlines()]
    evaluate_replies = [e for e in inventory if e["message_type"] == "evaluate"]
    assert len(evaluate_replies) == 7 and all(e["reply"] == "content" for e in evaluate_replies)
