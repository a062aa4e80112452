"""``fedpersona chat --user NAME``: chat with a simulated user's assistant (the run's newest checkpoint + that user's head)."""

from __future__ import annotations

import logging
from typing import Any

from fedpersona.simulations.generate import personalized_model, user_pairs

logger = logging.getLogger(__name__)


def simulated_user(user: str, scenario: str | None, overrides: dict[str, Any] | None = None, *, run: str | None = None):
    """(config, model, store, the user's own (cue, reply) pairs) of a simulated user of a run (``run``: its results
    folder, whose saved config is used; else ``scenario`` + ``overrides``)."""
    cfg, user_id, model, store, ckpt_round = personalized_model(user, scenario, overrides, run=run)
    pairs = user_pairs(cfg, user_id)
    logger.info("chat as %s: shared adapter of round %d, head from %s", user_id, ckpt_round, store.state_dir)
    return cfg, model, store, pairs
