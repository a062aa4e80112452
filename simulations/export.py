"""``fedpersona export --run R --user U``: a simulated user's model as peft LoRA folders (:mod:`fedpersona.client.export`).

The run's newest checkpoint (the shared adapter) with the user's personal head from its simulated
device's store, the run's saved config (:func:`fedpersona.simulations.generate.personalized_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpersona.client.export import export_model
from fedpersona.simulations.generate import personalized_model


def export_simulated_user(user: str, out: str | Path, *, run: str | None = None, scenario: str | None = "demo",
                          overrides: dict[str, Any] | None = None, shared_only: bool = False) -> dict:
    cfg, user_id, model, store, ckpt_round = personalized_model(user, scenario, overrides, run=run)
    return export_model(model, cfg, out, shared_only=shared_only,
                        info={"run": cfg.run.name, "round": ckpt_round, "user": user_id,
                              "source": "simulated device state", "state-dir": str(store.state_dir)})
