"""Write a reply in one user's voice: base model + latest shared adapter + that user's personal head.

The model runs where ``model.device`` / ``model.dtype`` say (:func:`fedpersona.model.adapted_model`).
With ``adapter.head = "prompt"`` the user's soft prompt is prepended at the first adapted block on
every decoding step (:meth:`fedpersona.model.AdaptedModel.generate`: a full forward per new token,
without a KV cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from client.data import format_prompt
from client.chat import REPETITION_PENALTY
from client.device import HEAD_FILE
from client.exemplars import exemplar_text, pick_exemplars
from client.store import DeviceStore
from fedpersona.model import adapted_model
from server.checkpoint import latest_checkpoint
from simulations.partitions import simulated_state_dir
from simulations.sources import load_source


def find_user(user: str, cfg) -> str:
    users = [u.user_id for u in load_source(cfg.data, cfg.run.seed)]
    for u in users:
        if u == user or u.lower() == user.lower():
            return u
    sample = ", ".join(users[:8])
    raise ValueError(f"Unknown user {user!r} in run '{cfg.run.name}'. Users look like: {sample}, ...")


def user_pairs(cfg, user_id: str) -> list[tuple[str, str]]:
    """A simulated user's own (cue, reply) pairs, as the user's device holds them."""
    return [(e.cue, e.reply) for e in next(u for u in load_source(cfg.data, cfg.run.seed) if u.user_id == user_id).examples]


def personalized_model(user: str, scenario: str | None, overrides: dict[str, Any] | None = None):
    """(config, user id, model, store, checkpoint round) of a simulated user of a run: the run's newest
    shared adapter and that user's personal head, loaded."""
    from simulations.runner import resolve  # the runner (and Flower) only where a scenario is resolved

    _, cfg = resolve(scenario, dict(overrides or {}))
    user_id = find_user(user, cfg)
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ValueError(f"No checkpoint in {run_dir / 'checkpoints'}: run `fedpersona run {scenario}` first")
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    model.load_shared_state(ckpt[1])
    store = DeviceStore(simulated_state_dir(cfg, user_id))
    head = store.load_tensors(HEAD_FILE)
    if head is None:
        raise ValueError(f"{user_id} has no personal head yet (never sampled in run '{cfg.run.name}')")
    model.load_personal_state(head)
    return cfg, user_id, model, store, ckpt[0]


def reply(model, prompt: str, *, max_new_tokens: int = 48, temperature: float = 0.7, seed: int = 0,
          exemplars: list[tuple[str, str]] = ()) -> str:
    """The model's reply to ``prompt`` (sampled with ``temperature``, greedy at 0), on the model's device;
    ``exemplars``: the user's own (cue, reply) pairs shown first as earlier turns (:mod:`client.exemplars`)."""
    tok = model.tokenizer
    text = exemplar_text(exemplars) + format_prompt(prompt)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(  # a prompt head: its prefix runs at the cache boundary (fedpersona.model)
            ids, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=0.9,
            repetition_penalty=REPETITION_PENALTY, eos_token_id=end, pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate(
    *,
    user: str,
    prompt: str,
    scenario: str | None = "demo",
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    seed: int = 0,
    exemplars: int = 0,
) -> str:
    cfg, user_id, model, _, _ = personalized_model(user, scenario, overrides)
    shown = pick_exemplars(user_pairs(cfg, user_id), prompt, exemplars, seed=seed) if exemplars else []
    return reply(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, exemplars=shown)
