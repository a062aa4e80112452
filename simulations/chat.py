"""``fedpersona chat --user NAME``: chat with a simulated user's assistant (the run's newest checkpoint + that user's head)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from client.device import HEAD_FILE
from client.store import DeviceStore
from fedpersona.model import adapted_model
from server.checkpoint import latest_checkpoint
from simulations.generate import find_user
from simulations.partitions import simulated_state_dir
from simulations.runner import resolve
from simulations.sources import load_source

logger = logging.getLogger(__name__)


def simulated_user(user: str, scenario: str | None, overrides: dict[str, Any] | None = None):
    """(config, model, store, the user's own (cue, reply) pairs) of a simulated user of a run."""
    _, cfg = resolve(scenario, dict(overrides or {}))
    user_id = find_user(user, cfg)
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ValueError(f"No checkpoint in {run_dir / 'checkpoints'}: run `fedpersona run {scenario}` first")
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    model.load_shared_state(ckpt[1])
    store = DeviceStore(simulated_state_dir(cfg, user_id))
    head = store.load_tensors(HEAD_FILE)
    if head is None:
        raise ValueError(f"{user_id} has no personal head yet (never sampled in run '{cfg.run.name}')")
    model.load_personal_state(head)
    users = load_source(cfg.data, cfg.run.seed)
    pairs = [(e.cue, e.reply) for e in next(u for u in users if u.user_id == user_id).examples]
    logger.info("chat as %s: shared adapter of round %d, head from %s", user_id, ckpt[0], store.state_dir)
    return cfg, model, store, pairs
