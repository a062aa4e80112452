"""DP-SGD correctness on a tiny real model: Opacus against plain SGD, empty batches, no silent corruption."""

import pytest
import torch

from client.train import CachedExample, evaluate, trainer_for
from fedpersona.config import AdapterConfig
from fedpersona.model import AdaptedModel, labels_for, lower_hidden


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    m = AdaptedModel(base, tok, AdapterConfig(split="ffa", rank=2, layers=2, personal_layers=1), seed=0)
    with torch.no_grad():  # non-zero B so that every trainable tensor gets a gradient
        for p in m.trainable_parameters():
            p.normal_(0, 0.1)
    return m


def _examples(model, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 300, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    masks = [[i >= 3 for i in range(len(s))] for s in seqs]
    hidden = lower_hidden(model, seqs)
    return [CachedExample(h, tuple(labels_for(s, k))) for h, s, k in zip(hidden, seqs, masks)]


def _params(model):
    return {n: p.detach().clone() for n, p in zip(model.shared_names + model.personal_names, model.trainable_parameters())}


def _restore(model, state):
    with torch.no_grad():
        for p, v in zip(model.trainable_parameters(), state.values()):
            p.copy_(v)


def test_dp_step_without_noise_and_huge_clip_equals_plain_sgd(model):
    ex = _examples(model)
    start = _params(model)
    kw = dict(steps=1, batch_size=len(ex), lr=0.5, optimizer="sgd", noise_multiplier=0.0, max_grad_norm=1e9, seed=3)
    trainer_for(model).train(ex, dp=False, **kw)
    plain = _params(model)
    _restore(model, start)
    trainer_for(model).train(ex, dp=True, **kw)
    dp = _params(model)
    changed = 0
    for n in start:
        torch.testing.assert_close(dp[n], plain[n], rtol=1e-4, atol=1e-6)
        changed += int(not torch.equal(dp[n], start[n]))
    assert changed == len(start), "every trainable tensor must move"


def test_dp_weights_stay_finite_and_change(model):
    ex = _examples(model)
    start = _params(model)
    trainer = trainer_for(model)
    res = trainer.train(ex, steps=5, batch_size=4, lr=0.01, optimizer="adam", noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    after = _params(model)
    for n in start:
        assert torch.isfinite(after[n]).all()
        assert not torch.equal(after[n], start[n])
    assert res.steps == 5 and 0 < res.sample_rate <= 1
    # frozen base weights untouched
    assert all(not p.requires_grad for n, p in model.peft.named_parameters() if "lora_" not in n)


def test_clipping_bounds_each_sample(model):
    """With noise 0 and a tiny clip bound, one SGD step moves parameters by at most lr * clip."""
    ex = _examples(model)
    start = _params(model)
    clip, lr = 1e-3, 1.0
    trainer_for(model).train(ex, steps=1, batch_size=len(ex), lr=lr, optimizer="sgd", noise_multiplier=0.0,
                           max_grad_norm=clip, seed=1)
    after = _params(model)
    moved = torch.sqrt(sum(((after[n] - start[n]) ** 2).sum() for n in start))
    assert 0 < moved <= lr * clip * 1.0001


class _CountingLedger:
    def __init__(self):
        self.calls = []

    def step(self, *, noise_multiplier, sample_rate):
        self.calls.append((noise_multiplier, sample_rate))


def test_empty_poisson_batch_is_a_counted_noise_only_step(model):
    ex = _examples(model, n=40)
    trainer = trainer_for(model)
    for seed in range(50):
        start = _params(model)
        ledger = _CountingLedger()
        res = trainer.train(ex, steps=1, batch_size=1, lr=0.1, optimizer="sgd", noise_multiplier=1.0, max_grad_norm=1.0,
                            seed=seed, ledger=ledger)
        if res.empty_steps == 1:
            break
    else:
        pytest.fail("no empty Poisson batch in 50 seeds")
    assert res.examples_seen == 0
    assert ledger.calls == [(1.0, 1 / 40)]
    after = _params(model)
    assert all(not torch.equal(after[n], start[n]) for n in start), "noise must still be added"
    assert all(torch.isfinite(after[n]).all() for n in start)


def test_evaluate_reports_loss_and_accuracy(model):
    ex = _examples(model, n=5)
    r = evaluate(model, ex)
    assert r["tokens"] == sum(e.num_targets for e in ex)
    assert r["loss"] > 0 and 0 <= r["accuracy"] <= 1
