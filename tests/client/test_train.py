"""DP-SGD correctness on a tiny real model: Opacus against plain SGD, empty batches, no silent corruption."""

import pytest
import torch

from fedpersona.client.train import CachedExample, evaluate, trainer_for
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


def _shared_params(model):
    return {n: p.detach().clone() for n, p in zip(model.shared_names, model.trainable_parameters())}


def _personal_params(model):
    k = len(model.shared_names)
    return {n: p.detach().clone() for n, p in zip(model.personal_names, model.trainable_parameters()[k:])}


@pytest.mark.parametrize("group", ["shared", "personal"])
def test_a_pass_trains_only_its_group(model, group):
    ex = _examples(model)
    shared0, personal0 = _shared_params(model), _personal_params(model)
    trainer_for(model).train(ex, steps=2, batch_size=6, lr=0.05, optimizer="adam", noise_multiplier=1.0,
                             max_grad_norm=1.0, seed=0, group=group)
    moved, still = (_shared_params(model), shared0), (_personal_params(model), personal0)
    if group == "personal":
        moved, still = still, moved
    assert all(not torch.equal(moved[0][n], moved[1][n]) for n in moved[0]), "the trained group must move"
    assert all(torch.equal(still[0][n], still[1][n]) for n in still[0]), "the other group must not move"
    assert all(p.requires_grad for p in model.trainable_parameters()), "requires_grad is restored"
    assert all(getattr(p, "grad_sample", None) is None for p in model.trainable_parameters())


def test_shared_pass_is_bit_identical_whatever_the_head_holds(model):
    """Joint DP as a test: the released (shared) update does not depend on the personal head at all."""
    from fedpersona.client.train import train_shared

    ex = _examples(model, n=16)
    start = _params(model)
    results = []
    for head_seed in (1, 2):
        _restore(model, start)
        with torch.no_grad():  # two very different heads
            g = torch.Generator().manual_seed(head_seed)
            for p in model.trainable_parameters()[len(model.shared_names):]:
                p.copy_(torch.randn(p.shape, generator=g) * head_seed)
        head = _personal_params(model)
        train_shared(trainer_for(model), ex, steps=3, batch_size=6, lr=0.05, optimizer="adam", noise_multiplier=1.0,
                     max_grad_norm=0.5, seed=7, noise_generator=torch.Generator().manual_seed(11))
        after_head = _personal_params(model)
        assert all(torch.equal(after_head[n], head[n]) for n in head), "the head is restored untouched"
        results.append(_shared_params(model))
    first, second = results
    assert any(not torch.equal(first[n], start[n]) for n in first), "the shared adapter must be trained"
    for n in first:
        assert torch.equal(first[n], second[n]), f"shared tensor {n} depends on the head"


def test_joint_pass_does_depend_on_the_head(model):
    """The control for the test above: training both groups at once lets the head reach the shared update."""
    ex = _examples(model, n=16)
    start = _params(model)
    results = []
    for head_seed in (1, 2):
        _restore(model, start)
        with torch.no_grad():
            g = torch.Generator().manual_seed(head_seed)
            for p in model.trainable_parameters()[len(model.shared_names):]:
                p.copy_(torch.randn(p.shape, generator=g) * head_seed)
        trainer_for(model).train(ex, steps=3, batch_size=6, lr=0.05, optimizer="adam", noise_multiplier=1.0,
                                 max_grad_norm=0.5, seed=7, noise_generator=torch.Generator().manual_seed(11))
        results.append(_shared_params(model))
    assert any(not torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_fedsa_has_no_head_free_shared_pass(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpersona.client.train import DPTrainer, train_shared

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    m = AdaptedModel(base, AutoTokenizer.from_pretrained(tiny_model_dir), AdapterConfig(split="fedsa", rank=2, layers=2),
                     seed=0)
    with pytest.raises(ValueError, match="fedsa"):
        train_shared(DPTrainer(m), _examples(m), steps=1, batch_size=4, lr=0.1, optimizer="sgd", noise_multiplier=1.0,
                     max_grad_norm=1.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_plain_head_pass_on_the_upper_blocks_equals_the_whole_stack(model, optimizer):
    """The head pass runs the blocks below the head once per example, then trains the head's blocks only."""
    from fedpersona.client.train import train_head

    ex = _examples(model)
    start = _params(model)
    assert model.head_offset == 1 and len(model.head_stack.layers) == 1
    assert model.head_stack.layers[0] is model.stack.layers[1], "the head's blocks are the stack's own modules"
    kw = dict(steps=4, batch_size=6, lr=0.05, optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=1.0,
              dp=False, seed=3)
    whole = trainer_for(model).train(ex, group="personal", **kw)
    want = _personal_params(model)
    _restore(model, start)
    calls = []
    hook = model.stack.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = train_head(trainer_for(model), ex, **kw)
    finally:
        hook.remove()
    assert len(calls) == len(ex), "the lower block ran once per example, not at every step"
    assert got.examples_seen == whole.examples_seen and got.steps == whole.steps
    after = _personal_params(model)
    for n in want:
        torch.testing.assert_close(after[n], want[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(after[n], start[n]) for n in after), "the head moved"
    shared = _shared_params(model)
    assert all(torch.equal(shared[n], start[n]) for n in shared), "the shared adapter did not"
    with pytest.raises(ValueError, match="plain passes"):
        trainer_for(model).train(ex, group="personal", stack=model.head_stack, **dict(kw, dp=True))
