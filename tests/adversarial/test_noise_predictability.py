"""Hole 4: DP noise from a predictable generator. Seeding torch must not reproduce a round's noise.

Opacus's DPOptimizer without a generator draws from torch's global MT19937: after
``torch.manual_seed(1234)`` plain ``torch.normal`` reproduces the noise exactly, and whoever knows
(or sets) the seed can subtract it. The trainer now hands Opacus a generator seeded from
``os.urandom`` before every step (privacy/noise.py), and draws the Poisson masks the same way.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

import fedpersona.client.app as client_app
from fedpersona.client.train import CachedExample, trainer_for
from fedpersona.config import CONFIG_ENV, AdapterConfig, load_config
from fedpersona.model import AdaptedModel, adapted_model, labels_for, lower_hidden
from fedpersona.wire import to_record, unpack_shared

SIGMA, CLIP, LR = 1.0, 1.0, 0.5


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AdaptedModel(base, tok, AdapterConfig(split="ffa", rank=2, layers=2, personal_layers=1), seed=0)


def _examples(model, n=8):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 300, (12,), generator=g).tolist() for _ in range(n)]
    hidden = lower_hidden(model, seqs)
    return [CachedExample(h, tuple(labels_for(s, [i >= 3 for i in range(len(s))]))) for h, s in zip(hidden, seqs)]


def _step(model, ex, *, sigma, torch_seed=None, **kw):
    """One DP-SGD step over every example (batch = n, so q = 1: the batch is fixed); the parameter change."""
    params = model.trainable_parameters()
    start = [p.detach().clone() for p in params]
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    trainer_for(model).train(ex, steps=1, batch_size=len(ex), lr=LR, optimizer="sgd", noise_multiplier=sigma,
                             max_grad_norm=CLIP, **kw)
    delta = [p.detach().clone() - s for p, s in zip(params, start)]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    return delta


def test_seeding_torch_neither_reproduces_nor_predicts_the_noise(model):
    ex = _examples(model)
    signal = _step(model, ex, sigma=0.0)  # the deterministic part of the step
    noisy = [_step(model, ex, sigma=SIGMA, torch_seed=1234) for _ in range(2)]
    # The noise each step added, recovered exactly: SGD, delta = -lr * (sum of clipped grads + noise) / batch.
    noise = [torch.cat([(-(d - s) * len(ex) / LR).flatten() for d, s in zip(run, signal)]) for run in noisy]
    std = float(noise[0].std())
    assert 0.8 * SIGMA * CLIP < std < 1.2 * SIGMA * CLIP, f"the step carries the noise it should ({std})"
    assert not torch.allclose(noise[0], noise[1], atol=1e-3), "the same torch seed gave the same noise"
    # What an attacker who knows torch's seed predicts (Opacus without a generator: exactly this).
    torch.manual_seed(1234)
    predicted = torch.cat([torch.normal(0, SIGMA * CLIP, size=p.shape).flatten() for p in model.trainable_parameters()])
    corr = float(np.corrcoef(noise[0].numpy(), predicted.numpy())[0, 1])
    assert abs(corr) < 0.1, f"the noise is predictable from torch's seed (correlation {corr:.3f})"


def test_poisson_batches_do_not_follow_torch_seed(model):
    ex = _examples(model)
    # Half the examples expected per step, no noise: the parameter change depends only on the batch.
    deltas = []
    for _ in range(3):
        torch.manual_seed(1234)
        params = model.trainable_parameters()
        start = [p.detach().clone() for p in params]
        trainer_for(model).train(ex, steps=1, batch_size=len(ex) // 2, lr=LR, optimizer="sgd", noise_multiplier=0.0,
                                 max_grad_norm=CLIP)
        deltas.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)]))
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    assert not all(torch.allclose(deltas[0], d) for d in deltas[1:]), "three equal batches after the same torch seed"


def test_explicit_opt_in_is_reproducible(model):
    """Tests may still fix the randomness, but only by asking for it."""
    from fedpersona.privacy.noise import NoiseSource

    ex = _examples(model)
    a = _step(model, ex, sigma=SIGMA, noise_source=NoiseSource(generator=torch.Generator().manual_seed(5)))
    b = _step(model, ex, sigma=SIGMA, noise_source=NoiseSource(generator=torch.Generator().manual_seed(5)))
    c = _step(model, ex, sigma=SIGMA, noise_generator=torch.Generator().manual_seed(5), seed=1)
    d = _step(model, ex, sigma=SIGMA, noise_generator=torch.Generator().manual_seed(5), seed=1)
    for x, y, z, w in zip(a, b, c, d):
        assert torch.equal(x, y) and torch.equal(z, w)


def test_a_devices_round_noise_is_not_reproduced_by_seeding_torch(tiny_config, tmp_path, monkeypatch):
    """Through the real ClientApp (plain path, which the device's owner allowed): two fresh devices with the
    same data, the same shared adapter and the same torch seed send different updates."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", 1), ("node_id", 0)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    flat = dict(tiny_config, **{"privacy.delta": 1e-2, "data.max-examples": 12, "secagg.enabled": False,
                                "client.batch-size": 12, "client.optimizer": "sgd", "privacy.noise-multiplier": 1.0,
                                "eval.per-round": False})
    monkeypatch.setenv(CONFIG_ENV, json.dumps(flat))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(json.dumps({"cue": f"cue {i}", "reply": f"reply number {i} my lord"})
                                            for i in range(12)) + "\n")
    shared = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed).initial_shared_state()
    updates = []
    for i in range(2):
        client_app._DEVICES.clear()
        ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(data), "state-dir": str(tmp_path / f"state{i}"), "user-id": "u",
                                   "policy.allow-no-secagg": True})
        msg = Message(RecordDict({"shared": to_record(shared), "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=7, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{i}"
        torch.manual_seed(1234)
        reply = client_app.train(msg, ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        updates.append(unpack_shared(reply.content, key="update"))
    client_app._DEVICES.clear()
    diff = max(float((updates[0][n] - updates[1][n]).abs().max()) for n in updates[0])
    assert diff > 1e-4, "the same torch seed gave the same released update"
