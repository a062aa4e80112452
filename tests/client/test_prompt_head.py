"""The soft-prompt head (``adapter.head = "prompt"``) on a tiny real model: the prefix at the cache boundary,
the head-free shared pass, plain and DP (Opacus) head passes, its state, a device round and generation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedpersona.client.device import HEAD_FILE, HEAD_LEDGER, LEDGER
from fedpersona.client.store import DeviceStore
from fedpersona.client.train import CachedExample, evaluate, train_head, train_shared, trainer_for
from fedpersona.config import AdapterConfig
from fedpersona.model import IGNORE, PROMPT, AdaptedModel, _run_layers, labels_for, lower_hidden
from fedpersona.privacy.ledger import PrivacyLedger

from tests.client.device_helpers import placed_device

PROMPT_CFG = AdapterConfig(split="ffa", rank=2, layers=2, personal_layers=1, head="prompt", prompt_tokens=3)


def _build(tiny_model_dir, cfg: AdapterConfig = PROMPT_CFG, *, seed: int = 0) -> AdaptedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    return AdaptedModel(base, AutoTokenizer.from_pretrained(tiny_model_dir), cfg, seed=seed)


@pytest.fixture
def model(tiny_model_dir):
    m = _build(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so that the shared adapter acts
        for n in m.shared_names:
            p = m.named_trainable()[n]
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _examples(model, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 300, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    masks = [[i >= 3 for i in range(len(s))] for s in seqs]
    hidden = lower_hidden(model, seqs)
    return [CachedExample(h, tuple(labels_for(s, k))) for h, s, k in zip(hidden, seqs, masks)]


def _voice(model, n=12, seed=0):
    """A user with a voice: every reply drawn from the same few tokens (what a prompt can bias towards)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor([7, 19, 42, 77, 101, 150, 203, 251])
    seqs = [words[torch.randint(0, 8, (int(torch.randint(8, 16, (1,), generator=g)),), generator=g)].tolist()
            for _ in range(n)]
    masks = [[i >= 3 for i in range(len(s))] for s in seqs]
    hidden = lower_hidden(model, seqs)
    return [CachedExample(h, tuple(labels_for(s, k))) for h, s, k in zip(hidden, seqs, masks)]


def _state(model, names):
    return {n: model.named_trainable()[n].detach().clone() for n in names}


def _set_prompt(model, value: torch.Tensor) -> None:
    with torch.no_grad():
        model.named_trainable()[PROMPT].copy_(value)


# ------------------------------------------------------------------------------ the layout
def test_the_prompt_is_the_whole_personal_state(model):
    assert model.head == "prompt"
    assert model.personal_names == [PROMPT]
    assert not any(".personal." in n for n, _ in model.peft.named_parameters()), "no personal LoRA with a prompt head"
    assert all(".lora_B.shared." in n for n in model.shared_names)
    assert model.layout.shared_layers == (2, 3), "the shared adapter covers every adapted block"
    state = model.personal_state()
    assert list(state) == [PROMPT] and state[PROMPT].shape == (3, 32) and state[PROMPT].dtype == torch.float32
    assert model.parameter_counts()["personal"] == 3 * 32
    assert not set(model.shared_state()) & set(state)


def test_fedper_with_a_prompt_head_shares_every_adapted_block(tiny_model_dir):
    m = _build(tiny_model_dir, AdapterConfig(split="fedper", rank=2, layers=2, personal_layers=1, head="prompt"))
    assert m.personal_names == [PROMPT] and m.layout.shared_layers == (2, 3)
    assert {n.split(".lora_")[1].split(".")[0] for n in m.shared_names} == {"A", "B"}, "fedper trains A and B"
    assert any(".layers.2." in n for n in m.shared_names) and any(".layers.3." in n for n in m.shared_names)
    assert m.stack.prompt.tokens == 8  # the default adapter.prompt-tokens


def test_prefix_is_at_the_cache_boundary_and_never_carries_a_label(model):
    """stack(hidden, labels) == the adapted blocks on [prompt; hidden], labels padded with -100 over the prefix."""
    ex = _examples(model, n=3)
    hidden = torch.stack([e.hidden[:6] for e in ex])
    labels = torch.tensor([list(e.labels[:6]) for e in ex])
    prompt = model.stack.prompt.vectors().detach()
    stack = model.stack
    full = torch.cat([prompt.expand(3, -1, -1), hidden], dim=1)
    h = stack.norm(_run_layers(stack.layers, stack.rotary_emb, full))
    padded = torch.cat([torch.full((3, 3), IGNORE), labels], dim=1)
    logits = stack.lm_head(h).float()
    tok = F.cross_entropy(logits.transpose(1, 2), padded, reduction="none", ignore_index=IGNORE)
    expected = tok.sum(1) / (padded != IGNORE).sum(1)
    torch.testing.assert_close(stack(hidden, labels), expected, rtol=1e-5, atol=1e-6)
    assert stack.hidden(hidden).shape == hidden.shape, "the prefix positions are dropped after the last block"


def test_every_real_token_sees_the_prefix_and_attention_stays_causal(model):
    ex = _examples(model, n=1)
    hidden = ex[0].hidden[:8].unsqueeze(0)
    out = model.stack.hidden(hidden)
    _set_prompt(model, torch.randn(3, 32, generator=torch.Generator().manual_seed(5)))
    moved = model.stack.hidden(hidden)
    assert bool(((moved - out).abs().amax(-1) > 1e-4).all()), "every real position depends on the prompt"
    later = hidden.clone()
    later[0, -1] += 1.0
    changed = model.stack.hidden(later)
    torch.testing.assert_close(changed[:, :-1], moved[:, :-1], rtol=0, atol=1e-6)  # no position sees a later one
    assert not torch.allclose(changed[:, -1], moved[:, -1])


def test_switched_off_the_prompt_is_not_used_at_all(model):
    """personal_zeroed(): no prefix (not a zero prefix): the plain top blocks on the cached hidden states."""
    ex = _examples(model, n=2)
    hidden = torch.stack([e.hidden[:5] for e in ex])
    plain = model.stack.norm(_run_layers(model.stack.layers, model.stack.rotary_emb, hidden))
    with model.personal_zeroed():
        torch.testing.assert_close(model.stack.hidden(hidden), plain, rtol=0, atol=0)
        _set_prompt(model, torch.full((3, 32), 7.0))  # whatever it holds
        torch.testing.assert_close(model.stack.hidden(hidden), plain, rtol=0, atol=0)
    assert model.stack.prompt_enabled, "switched back on"
    assert not torch.allclose(model.stack.hidden(hidden), plain)
    with model.adapters_disabled():  # the base model: no LoRA and no prompt
        base = model.stack.hidden(hidden)
    with model.peft.disable_adapter(), model.stack.prompt_off():
        torch.testing.assert_close(base, model.stack.hidden(hidden), rtol=0, atol=0)
    assert model.stack.prompt_enabled


# ------------------------------------------------------------------------------ training
def _shared_after_two_prompts(model, train_pass, check=None):
    """The shared tensors after the same seeded pass from the same start, under two different prompts."""
    ex = _examples(model, n=16)
    shared0 = _state(model, model.shared_names)
    results = []
    for head_seed in (1, 2):
        with torch.no_grad():
            for n, v in shared0.items():
                model.named_trainable()[n].copy_(v)
        _set_prompt(model, torch.randn(3, 32, generator=torch.Generator().manual_seed(head_seed)) * head_seed)
        prompt = _state(model, [PROMPT])
        train_pass(ex, steps=3, batch_size=6, lr=0.05, optimizer="adam", noise_multiplier=1.0, max_grad_norm=0.5,
                   seed=7, noise_generator=torch.Generator().manual_seed(11))
        if check is not None:
            check(prompt)
        results.append(_state(model, model.shared_names))
    return shared0, results


def test_shared_pass_is_bit_identical_whatever_the_prompt_holds(model):
    """Joint DP as a test: the released (shared) update does not depend on the soft prompt at all."""
    def untouched(prompt):
        assert torch.equal(_state(model, [PROMPT])[PROMPT], prompt[PROMPT]), "the prompt is untouched"
        assert model.stack.prompt_enabled, "the prompt is switched on again after the pass"

    shared0, (first, second) = _shared_after_two_prompts(
        model, lambda ex, **kw: train_shared(trainer_for(model), ex, **kw), untouched)
    assert any(not torch.equal(first[n], shared0[n]) for n in first), "the shared adapter must be trained"
    for n in first:
        assert torch.equal(first[n], second[n]), f"shared tensor {n} depends on the prompt"


def test_a_shared_pass_with_the_prompt_on_does_depend_on_it(model):
    """The control for the test above: with the prefix on, the prompt reaches the shared update."""
    _, (first, second) = _shared_after_two_prompts(
        model, lambda ex, **kw: trainer_for(model).train(ex, group="shared", **kw))
    assert any(not torch.equal(first[n], second[n]) for n in first)


def test_plain_head_pass_trains_only_the_prompt_and_lowers_the_loss(model):
    ex = _voice(model, n=12)
    shared0, prompt0 = _state(model, model.shared_names), _state(model, [PROMPT])[PROMPT]
    before = evaluate(model, ex)["loss"]
    result = train_head(trainer_for(model), ex, steps=30, batch_size=6, lr=0.05, optimizer="adam",
                        noise_multiplier=0.0, max_grad_norm=1.0, dp=False, seed=1)
    after = evaluate(model, ex)["loss"]
    assert result.steps == 30
    assert after < before - 0.02, (before, after)  # 5.821 -> 5.782 here (the tiny model, 30 steps)
    assert all(torch.equal(_state(model, model.shared_names)[n], shared0[n]) for n in shared0)
    assert not torch.equal(_state(model, [PROMPT])[PROMPT], prompt0)
    assert model.named_trainable()[PROMPT].requires_grad, "requires_grad is restored"


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_gradients_of_the_prompt_are_exact(model):
    """The registered grad sampler against one backward pass per sample."""
    ex = _examples(model, n=5)
    trainer = trainer_for(model)
    prompt = model.named_trainable()[PROMPT]
    shared = [model.named_trainable()[n] for n in model.shared_names]
    for p in shared:
        p.requires_grad_(False)
    try:
        from fedpersona.client.train import _batch

        hidden, labels = _batch(ex, list(range(5)))
        trainer.gsm.enable_hooks()
        model.stack.train()
        trainer.gsm(hidden, labels).mean().backward()
        per_sample = prompt.grad_sample.detach().clone()
        trainer.gsm.disable_hooks()
        trainer.gsm.zero_grad(set_to_none=True)
        prompt.grad_sample = None
        for i in range(5):
            h, lab = _batch(ex, [i])
            (g,) = torch.autograd.grad(model.stack(h, lab).sum(), [prompt])
            torch.testing.assert_close(per_sample[i], g, rtol=1e-4, atol=1e-7)
    finally:
        model.stack.eval()
        trainer.gsm.enable_hooks()
        for p in shared:
            p.requires_grad_(True)
        prompt.grad_sample = None
    assert per_sample.shape == (5, 3, 32) and per_sample.abs().sum() > 0


def test_dp_head_pass_with_opacus_counts_its_steps(model):
    ex = _examples(model, n=12)
    shared0 = _state(model, model.shared_names)
    prompt0 = _state(model, [PROMPT])[PROMPT]
    kw = dict(steps=1, batch_size=len(ex), lr=0.5, optimizer="sgd", noise_multiplier=0.0, max_grad_norm=1e9, seed=3)
    train_head(trainer_for(model), ex, dp=False, **kw)
    plain = _state(model, [PROMPT])[PROMPT]
    _set_prompt(model, prompt0)
    train_head(trainer_for(model), ex, dp=True, **kw)
    torch.testing.assert_close(_state(model, [PROMPT])[PROMPT], plain, rtol=1e-4, atol=1e-6)  # DP without noise = SGD
    _set_prompt(model, prompt0)
    ledger = PrivacyLedger(accountant="rdp")
    result = train_head(trainer_for(model), ex, steps=4, batch_size=4, lr=0.05, optimizer="adam",
                        noise_multiplier=1.1, max_grad_norm=0.5, dp=True, ledger=ledger, seed=2,
                        noise_generator=torch.Generator().manual_seed(4))
    assert result.steps == 4 and ledger.total_steps == 4
    assert ledger.epsilon(1e-2) > 0
    after = _state(model, [PROMPT])[PROMPT]
    assert torch.isfinite(after).all() and not torch.equal(after, prompt0)
    assert all(torch.equal(_state(model, model.shared_names)[n], shared0[n]) for n in shared0)
    assert getattr(model.named_trainable()[PROMPT], "grad_sample", None) is None


def test_dp_head_pass_clips_each_sample(model):
    """SGD with a tiny clip and no noise: the step is at most lr * clip (the mean of clipped samples)."""
    ex = _examples(model, n=8)
    prompt0 = _state(model, [PROMPT])[PROMPT]
    train_head(trainer_for(model), ex, steps=1, batch_size=len(ex), lr=1.0, optimizer="sgd", noise_multiplier=0.0,
               max_grad_norm=1e-3, dp=True, seed=0)
    step = float((_state(model, [PROMPT])[PROMPT] - prompt0).norm())
    assert 0 < step <= 1e-3 * (1 + 1e-4)


# ------------------------------------------------------------------------------ state
def test_prompt_state_loads_saves_and_starts_from_the_public_anchor(model, tiny_model_dir, tmp_path):
    """A fresh head is a zero offset: the prefix is the lower blocks' output for the anchor text's first tokens."""
    from fedpersona.model import ANCHOR_TEXT

    fresh = model.fresh_personal_state()
    assert torch.equal(fresh[PROMPT], torch.zeros(3, 32))
    ids = model.tokenizer(ANCHOR_TEXT, add_special_tokens=False)["input_ids"][:3]
    anchor = lower_hidden(model, [ids])[0]
    head = model.stack.prompt
    torch.testing.assert_close(head.anchor, anchor, rtol=0, atol=0)
    torch.testing.assert_close(head.scale[:, 0], anchor.pow(2).mean(-1).sqrt())
    model.load_personal_state(fresh)
    torch.testing.assert_close(head.vectors(), anchor, rtol=0, atol=0)
    torch.manual_seed(123)  # torch's global generator plays no part in the initialisation
    again = _build(tiny_model_dir, seed=4)
    assert torch.equal(again.stack.prompt.anchor, head.anchor) and torch.equal(again.fresh_personal_state()[PROMPT],
                                                                               fresh[PROMPT])
    longer = _build(tiny_model_dir, AdapterConfig(split="ffa", rank=2, layers=2, head="prompt", prompt_tokens=40))
    assert longer.stack.prompt.anchor.shape == (40, 32), "the anchor text repeats for a long prompt"
    torch.testing.assert_close(longer.stack.prompt.anchor[:3], anchor)

    trained = {PROMPT: torch.randn(3, 32, generator=torch.Generator().manual_seed(8))}
    store = DeviceStore(tmp_path / "state")
    store.save_tensors(HEAD_FILE, trained)
    model.load_personal_state(store.load_tensors(HEAD_FILE))
    assert torch.equal(model.personal_state()[PROMPT], trained[PROMPT])
    with model.personal_zeroed():
        assert torch.equal(model.personal_state()[PROMPT], trained[PROMPT]), "switched off, not overwritten"
    with pytest.raises(ValueError, match="shape"):
        model.load_personal_state({PROMPT: torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="does not match"):
        model.load_personal_state({"base_model.model.x.lora_B.personal.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="non-finite"):
        model.load_personal_state({PROMPT: torch.full((3, 32), float("nan"))})


def test_lora_heads_start_from_the_seed_too(tiny_model_dir):
    """Two LoRA-head models built in one process start from the same personal A (and the same shared A)."""
    cfg = AdapterConfig(split="ffa", rank=2, layers=2, personal_layers=1)
    torch.manual_seed(1)
    a = _build(tiny_model_dir, cfg)
    torch.manual_seed(2)
    b = _build(tiny_model_dir, cfg)
    c = _build(tiny_model_dir, cfg, seed=5)
    fa, fb, fc = a.fresh_personal_state(), b.fresh_personal_state(), c.fresh_personal_state()
    assert any(".lora_A.personal." in n for n in fa)
    for n in fa:
        assert torch.equal(fa[n], fb[n]), n
    assert any(not torch.equal(fa[n], fc[n]) for n in fa if ".lora_A." in n)
    assert all(float(fa[n].abs().sum()) == 0 for n in fa if ".lora_B." in n), "B = 0: a fresh head is the identity"
    sa, sb = a.initial_shared_state(), b.initial_shared_state()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


# ------------------------------------------------------------------------------ a device round
@pytest.mark.parametrize("head_mode", ["local", "dp"])
def test_a_device_round_with_a_prompt_head(tiny_config, tmp_path, head_mode):
    over = dict(tiny_config, **{"adapter.head": "prompt", "adapter.prompt-tokens": 4})
    if head_mode == "dp":
        over["privacy.personal-head"] = "dp"
    dev = placed_device(over, tmp_path, device="cpu", dtype="float32", tag=head_mode)
    assert dev.model.head == "prompt"
    fresh = dev.model.fresh_personal_state()
    update, metrics = dev.train_round(dev.model.initial_shared_state(), server_round=1)
    assert set(update) == set(dev.model.shared_names), "only the shared adapter's change leaves the device"
    head = dev.store.load_tensors(HEAD_FILE)
    assert list(head) == [PROMPT] and not torch.equal(head[PROMPT], fresh[PROMPT])
    assert PrivacyLedger.from_json(dev.store.load_text(LEDGER)).total_steps == dev.cfg.client.local_steps
    head_ledger = dev.store.load_text(HEAD_LEDGER)
    if head_mode == "dp":
        assert PrivacyLedger.from_json(head_ledger).total_steps == dev.cfg.client.head_steps
    else:
        assert head_ledger is None
    participation = json.loads(dev.store.load_text("participation"))
    assert participation == [{"round": 1, "steps": 3, "head-steps": 3}]
    row = dev.final_evaluation(dev.model.shared_state())
    assert row["personal-loss"] != row["shared-loss"], "the personalized model runs the prompt"
    assert "local-loss" not in row or row["local-loss"] > 0


# ------------------------------------------------------------------------------ generation
def test_prefix_generation_matches_the_training_path(model):
    ids = torch.tensor([[5, 17, 40, 81, 9, 33]])
    # With the prompt off, the prefix loop is greedy decoding of the peft model: the same tokens as generate.
    with model.personal_zeroed():
        hf = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        own = model._generate_with_prefix(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, own)
    # With the prompt on, the next-token logits are those of the training path on the cached hidden states.
    cached = lower_hidden(model, [ids[0].tolist()])[0].unsqueeze(0)
    expected = model.stack.lm_head(model.stack.hidden(cached)[:, -1]).float()
    torch.testing.assert_close(model.next_token_logits(ids), expected, rtol=1e-5, atol=1e-5)
    with model.personal_zeroed():
        off = model.next_token_logits(ids)
    assert not torch.allclose(off, expected)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] <= ids.shape[1] + 5 and torch.equal(out[:, : ids.shape[1]], ids)
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                       suppress_tokens=[0, 1], min_new_tokens=2, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                       suppress_tokens=[0, 1], min_new_tokens=2, eos_token_id=2, pad_token_id=0)
    assert torch.equal(a, b), "seeded sampling repeats"
    assert not bool(torch.isin(a[0, ids.shape[1]:], torch.tensor([0, 1])).any()), "suppressed tokens never appear"


def test_fedpersona_generate_with_a_prompt_head(tiny_config, tmp_path):
    from fedpersona.server.checkpoint import save_checkpoint
    from fedpersona.simulations.generate import generate, personalized_model
    from fedpersona.simulations.partitions import simulated_state_dir
    from fedpersona.simulations.runner import resolve
    from fedpersona.simulations.sources import load_source

    from fedpersona.model import adapted_model

    overrides = dict(tiny_config, **{"adapter.head": "prompt", "model.device": "cpu"})
    _, cfg = resolve(None, overrides)
    user = load_source(cfg.data, cfg.run.seed)[0].user_id
    m = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device="cpu")
    g = torch.Generator().manual_seed(3)
    shared = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in m.initial_shared_state().items()}
    head = {PROMPT: torch.randn(cfg.adapter.prompt_tokens, 32, generator=g)}
    save_checkpoint(tmp_path / "results" / cfg.run.name / "checkpoints", 1, shared, {})
    DeviceStore(simulated_state_dir(cfg, user)).save_tensors(HEAD_FILE, head)
    _, _, loaded, _, _ = personalized_model(user, None, overrides)
    assert loaded.head == "prompt" and loaded.stack.prompt_enabled
    assert torch.equal(loaded.personal_state()[PROMPT], head[PROMPT])
    for n, t in loaded.shared_state().items():
        assert torch.equal(t, shared[n])
    kw = dict(user=user, prompt="What news from Vienna?", scenario=None, overrides=overrides, max_new_tokens=6,
              temperature=0.7, seed=1)
    text = generate(**kw)
    assert isinstance(text, str) and text == generate(**kw), "seeded sampling repeats"
    # The reply is the prefix loop's: greedy decoding through the model with the user's prompt.
    from fedpersona.client.data import format_prompt
    from fedpersona.simulations.generate import reply

    ids = loaded.tokenizer(format_prompt("What news from Vienna?"), add_special_tokens=False,
                           return_tensors="pt")["input_ids"]
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = ids
    for _ in range(6):
        nxt = loaded.next_token_logits(out).argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if int(nxt) == end:
            break
    expected = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert reply(loaded, "What news from Vienna?", max_new_tokens=6, temperature=0.0) == expected


def test_the_cohort_engine_refuses_a_prompt_head(model):
    from fedpersona.simulations.engine import CohortEngine

    with pytest.raises(ValueError, match="adapter.head = 'prompt'"):
        CohortEngine(model, device="cpu")


def test_dp_trainer_hooks_the_prompt_with_its_own_grad_sampler(model):
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    from fedpersona.client.train import _prompt_grad_sample
    from fedpersona.model import PromptHead

    trainer_for(model)  # a GradSampleModule over the stack
    assert GradSampleModule.GRAD_SAMPLERS[PromptHead] is _prompt_grad_sample
    assert not hasattr(model.stack.prompt, "ft_compute_sample_grad"), "not through functorch"


def test_a_dp_prompt_pass_with_a_bfloat16_base_stays_float32(tiny_model_dir):
    from fedpersona.model import adapted_model

    m = adapted_model(str(tiny_model_dir), PROMPT_CFG, 0, device="cpu", dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    head = m.stack.prompt
    assert head.prompt.dtype == head.anchor.dtype == head.scale.dtype == torch.float32
    ex = _voice(m, n=8)
    assert ex[0].hidden.dtype == torch.bfloat16
    m.load_personal_state(m.fresh_personal_state())
    ledger = PrivacyLedger(accountant="rdp")
    train_head(trainer_for(m), ex, steps=2, batch_size=4, lr=0.05, optimizer="adam", noise_multiplier=1.0,
               max_grad_norm=1.0, dp=True, ledger=ledger, seed=0, noise_generator=torch.Generator().manual_seed(1))
    state = m.personal_state()[PROMPT]
    assert state.dtype == torch.float32 and torch.isfinite(state).all() and state.abs().sum() > 0
    assert ledger.total_steps == 2
    assert torch.isfinite(torch.tensor(evaluate(m, ex)["loss"]))
