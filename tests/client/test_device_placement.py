"""``model.device`` / ``model.dtype`` on the sequential device path: a bfloat16 base on the CPU.

The frozen base runs in bfloat16, the adapters, their gradients, noise and optimizer state stay
float32, and what leaves the model (update, head) is float32 on the CPU. With the same seeded
noise source as a float32 run, the round gives nearly the same update and head: far closer than
the float32 run with other batches and noise.
"""

from __future__ import annotations

import pytest
import torch

from fedpersona.client.device import HEAD_FILE
from fedpersona.client.store import DeviceStore
from fedpersona.model import adapted_model
from fedpersona.server.checkpoint import save_checkpoint
from fedpersona.simulations.generate import generate, personalized_model
from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.simulations.runner import resolve
from fedpersona.simulations.sources import load_source
from tests.client.device_helpers import flat, placed_device, rel, seeded_round


def _check_placement(model, *, device: str, dtype: torch.dtype) -> None:
    seen = {"base": set(), "lora": set()}
    for name, p in model.peft.named_parameters():
        seen["lora" if ".lora_" in name else "base"].add((p.device.type, p.dtype))
    assert seen == {"base": {(device, dtype)}, "lora": {(device, torch.float32)}}


def test_bfloat16_base_trains_a_dp_round_close_to_float32(tiny_config, tmp_path):
    ref = placed_device(tiny_config, tmp_path, device="cpu", dtype="float32", tag="f32")
    bf = placed_device(tiny_config, tmp_path, device="cpu", dtype="bfloat16", tag="bf16")
    other = placed_device(tiny_config, tmp_path, device="cpu", dtype="float32", tag="f32-other")
    assert bf.model is not ref.model and other.model is ref.model, "one process-wide model per (device, dtype)"
    _check_placement(ref.model, device="cpu", dtype=torch.float32)
    _check_placement(bf.model, device="cpu", dtype=torch.bfloat16)
    assert {e.hidden.dtype for e in bf.data.train} == {torch.bfloat16}, "cached activations in the base's dtype"

    head0 = ref.model.fresh_personal_state()
    up_ref, head_ref, ledger_ref = seeded_round(ref, seed=1, head=head0)
    up_bf, head_bf, ledger_bf = seeded_round(bf, seed=1, head=head0)
    up_other, head_other, _ = seeded_round(other, seed=2, head=head0)

    for state in (up_bf, head_bf, bf.model.shared_state(), bf.model.personal_state()):
        assert {(t.device.type, t.dtype) for t in state.values()} == {("cpu", torch.float32)}
        assert all(torch.isfinite(t).all() for t in state.values())
    assert ledger_bf.history == ledger_ref.history and ledger_bf.total_steps == 3
    assert float(flat(up_bf).norm()) > 0 and float(flat(head_bf, head0).norm()) > 0

    # Same batches and noise: bfloat16 rounding moves the update and the head's change by well under
    # 5% (measured: ~0.7% and ~1%); other batches and noise move them by tens of percent.
    d_update, d_update_other = rel(flat(up_bf), flat(up_ref)), rel(flat(up_other), flat(up_ref))
    d_head = rel(flat(head_bf, head0), flat(head_ref, head0))
    d_head_other = rel(flat(head_other, head0), flat(head_ref, head0))
    assert d_update < 0.05 and d_update < 0.1 * d_update_other, (d_update, d_update_other)
    assert d_head < 0.05 and d_head < 0.1 * d_head_other, (d_head, d_head_other)


def test_auto_is_the_cpu_here_and_cuda_without_one_is_refused(tiny_model_dir):
    from fedpersona.config import AdapterConfig

    cfg = AdapterConfig(rank=2, layers=2, personal_layers=1)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: `auto` picks it")
    assert adapted_model(str(tiny_model_dir), cfg, 0, device="auto") is adapted_model(str(tiny_model_dir), cfg, 0)
    with pytest.raises(ValueError, match="model.device.*no CUDA device.*'cuda:1'"):
        adapted_model(str(tiny_model_dir), cfg, 0, device="cuda:1")
    with pytest.raises(ValueError, match="model.dtype.*float16"):
        adapted_model(str(tiny_model_dir), cfg, 0, dtype="float16")


def _trained_run(tiny_config, tmp_path, dtype: str):
    """A run folder with a checkpoint and one simulated user's head, as `fedpersona run` leaves them."""
    overrides = dict(tiny_config, **{"model.device": "cpu", "model.dtype": dtype})
    _, cfg = resolve(None, overrides)
    user = load_source(cfg.data, cfg.run.seed)[0].user_id
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    shared = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in model.initial_shared_state().items()}
    head = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in model.fresh_personal_state().items()}
    save_checkpoint(tmp_path / "results" / cfg.run.name / "checkpoints", 1, shared, {})
    DeviceStore(simulated_state_dir(cfg, user)).save_tensors(HEAD_FILE, head)
    return overrides, user, shared, head


def test_generate_with_a_bfloat16_base(tiny_config, tmp_path):
    overrides, user, shared, head = _trained_run(tiny_config, tmp_path, "bfloat16")
    _, _, bf, _, _ = personalized_model(user, None, overrides)
    _check_placement(bf, device="cpu", dtype=torch.bfloat16)
    for n, t in bf.shared_state().items():
        assert torch.equal(t, shared[n]), "the checkpoint's adapter is loaded exactly (float32)"
    for n, t in bf.personal_state().items():
        assert torch.equal(t, head[n])
    _, _, f32, _, _ = personalized_model(user, None, dict(overrides, **{"model.dtype": "float32"}))
    ids = bf.tokenizer("What news from Vienna?", return_tensors="pt")["input_ids"]

    def logprobs(model):
        with torch.no_grad():
            return torch.log_softmax(model.peft(input_ids=ids).logits[0, -1].float(), -1)

    def adapters_effect(model):
        with model.adapters_disabled():
            plain = logprobs(model)
        return logprobs(model) - plain

    # The next-token distribution is the float32 one, rounded; so is what the adapters add to it.
    assert rel(logprobs(bf), logprobs(f32)) < 0.005
    assert rel(adapters_effect(bf), adapters_effect(f32)) < 0.1
    text = generate(user=user, prompt="What news from Vienna?", scenario=None, overrides=overrides,
                    max_new_tokens=6, temperature=0.7, seed=1)
    assert isinstance(text, str)
    assert text == generate(user=user, prompt="What news from Vienna?", scenario=None, overrides=overrides,
                            max_new_tokens=6, temperature=0.7, seed=1), "seeded sampling repeats"


def test_a_pass_inside_a_callers_bfloat16_autocast_stays_float32(tiny_model_dir):
    """Opacus's per-sample gradients, the clipping and the noise stay float32 under a caller's autocast."""
    from fedpersona.client.train import trainer_for
    from tests.simulations.engine_helpers import examples, random_states, source, tiny_adapted

    model = tiny_adapted(tiny_model_dir)
    model.place(torch.device("cpu"), torch.bfloat16)
    ex = examples(model, 8, seed=1)
    shared, personal = random_states(model, seed=2)
    out = []
    for autocast in (False, True):
        model.load_shared_state(shared)
        model.load_personal_state(personal)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            trainer_for(model).train(ex, steps=3, batch_size=4, lr=0.05, optimizer="sgd", noise_multiplier=0.5,
                                     max_grad_norm=1.0, noise_source=source(7))
        out.append(model.shared_state() | model.personal_state())
    assert all(t.dtype == torch.float32 for t in out[1].values())
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])
    assert any(not torch.equal(out[0][n], (shared | personal)[n]) for n in out[0])


def test_opacus_hooks_only_the_float32_lora_layers_of_a_bfloat16_base(tiny_model_dir):
    """Opacus records activations at the trained LoRA layers only, and there they are float32 (peft casts them)."""
    from fedpersona.client.train import trainer_for
    from tests.simulations.engine_helpers import examples, random_states, source, tiny_adapted

    model = tiny_adapted(tiny_model_dir)
    model.place(torch.device("cpu"), torch.bfloat16)
    trainer = trainer_for(model)
    hooked = {n for n, m in model.stack.named_modules() if m._forward_hooks}
    assert hooked and all(".lora_A." in n or ".lora_B." in n for n in hooked), sorted(hooked)[:3]
    inputs: dict[str, set] = {"lora": set(), "base": set()}

    def record(kind):
        return lambda module, args: inputs[kind].add(args[0].dtype)

    handles = [m.register_forward_pre_hook(record("lora" if ".lora_" in n else "base"))
               for n, m in model.stack.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        shared, personal = random_states(model, seed=2)
        model.load_shared_state(shared)
        model.load_personal_state(personal)
        trainer.train(examples(model, 8, seed=1), steps=2, batch_size=4, lr=0.05, optimizer="sgd",
                      noise_multiplier=0.5, max_grad_norm=1.0, noise_source=source(7))
    finally:
        for h in handles:
            h.remove()
    assert inputs == {"lora": {torch.float32}, "base": {torch.bfloat16}}
