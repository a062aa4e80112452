"""Shared pieces of the engine tests: a tiny adapted model, clients, and the sequential reference."""

from __future__ import annotations

import warnings

import torch

from fedpersona.client.train import CachedExample, trainer_for
from fedpersona.config import AdapterConfig
from fedpersona.model import AdaptedModel, collate, labels_for, lower_hidden
from fedpersona.privacy.dpstep import step_generator, uniform_batch
from fedpersona.privacy.noise import NoiseSource


def tiny_adapted(model_dir, split: str = "ffa") -> AdaptedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return AdaptedModel(base, tok, AdapterConfig(split=split, rank=2, layers=2, personal_layers=1), seed=0)


def examples(model: AdaptedModel, n: int, seed: int) -> list[CachedExample]:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 300, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    masks = [[i >= 3 for i in range(len(s))] for s in seqs]
    hidden = lower_hidden(model, seqs)
    return [CachedExample(h, tuple(labels_for(s, k))) for h, s, k in zip(hidden, seqs, masks)]


def random_states(model: AdaptedModel, seed: int) -> tuple[dict, dict]:
    """Non-zero shared and personal tensors, so that every trained tensor gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    shared = {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in model.shared_state().items()}
    personal = {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in model.personal_state().items()}
    return shared, personal


def source(seed: int) -> NoiseSource:
    return NoiseSource(generator=torch.Generator().manual_seed(seed))


class CountingLedger:
    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        self.calls.append((noise_multiplier, sample_rate))


def sequential_joint(model, ex, shared, personal, *, noise_source, **kw):
    """Today's device path: Opacus DP-SGD over shared + personal together."""
    model.load_shared_state(shared)
    model.load_personal_state(personal)
    ledger = CountingLedger()
    res = trainer_for(model).train(ex, ledger=ledger, noise_source=noise_source, **kw)
    return model.shared_state(), model.personal_state(), ledger.calls, res


def sequential_split(model, ex, shared, personal, *, noise_source, head_steps, head_batch, head_lr,
                     head_dp=False, head_source=None, head_sigma=0.0, head_clip=1.0, **kw):
    """Shared-only DP-SGD with the head off (Opacus), then the head on top of the new shared adapter."""
    trainer = trainer_for(model)
    model.load_shared_state(shared)
    model.load_personal_state(personal)
    ledger = CountingLedger()
    with model.personal_zeroed():
        trainer.train(ex, ledger=ledger, noise_source=noise_source, params=model.shared_names, **kw)
    if head_dp:
        trainer.train(ex, steps=head_steps, batch_size=head_batch, lr=head_lr, optimizer=kw["optimizer"],
                      noise_multiplier=head_sigma, max_grad_norm=head_clip, ledger=ledger,
                      noise_source=head_source or noise_source, params=model.personal_names)
    else:
        # Plain minibatch training of the head, batches drawn uniformly (no clipping, no noise).
        trainer.gsm.disable_hooks()
        named = dict(model.peft.named_parameters())
        params = [named[n] for n in model.personal_names]
        opt = torch.optim.Adam(params, lr=head_lr) if kw["optimizer"] == "adam" else torch.optim.SGD(params, lr=head_lr)
        src = head_source or noise_source
        for _ in range(head_steps):
            idx = uniform_batch(step_generator(src), len(ex), head_batch).tolist()
            hidden, labels = collate([ex[i].hidden for i in idx], [ex[i].labels for i in idx])
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                model.stack(hidden, labels).mean().backward()
            opt.step()
        model.peft.zero_grad(set_to_none=True)
    return model.shared_state(), model.personal_state(), ledger.calls


def federate_on_engine_grid(flat: dict, cfg, users: list) -> tuple[dict, object]:
    """``run_federation`` over an :class:`EngineGrid` of one node per user (no seeded sources: every device is
    built by the grid); returns (metrics, grid). The run's devices are dropped from the ClientApp's cache after."""
    import uuid

    from fedpersona.client import app as client_app
    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.engine.grid import EngineGrid

    nodes = {100 + i: {"partition-id": i} for i in range(len(users))}
    run_id = uuid.uuid4().int % 2**62
    try:
        with EngineGrid(client_app.app, nodes, flat, run_id=run_id) as grid:
            metrics = run_federation(grid, cfg)
    finally:
        for nid in nodes:
            client_app._DEVICES.pop((run_id, nid), None)
    return metrics, grid
