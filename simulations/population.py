"""The users of a scenario prepared once for the studies and benchmarks: each one's data folder (deployment
format) and its examples run through the frozen lower blocks, and the real devices built on them."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.client.device import Device, UserData, prepare_user
from fedpersona.client.node_data import slug
from fedpersona.client.store import DeviceStore
from fedpersona.config import Config, load_config
from fedpersona.model import adapted_model
from fedpersona.simulations.sources import load_source

__all__ = ["User", "population", "require_split_lora_head", "scenario_population", "simulated_devices"]

logger = logging.getLogger(__name__)


@dataclass
class User:
    user_id: str
    folder: Path
    data: UserData



def population(cfg: Config, root: Path) -> list[User]:
    """The scenario's users, each with a data folder (deployment format) and its examples prepared once.

    With ``client.cache-activations`` the frozen lower blocks' outputs are kept in an encrypted store per
    user under ``root / "activations"`` (keyed by the model, the layout and the examples, as on a device):
    a study run again on the same scenario reads them instead of running the lower blocks again.
    """
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    users = load_source(cfg.data, cfg.run.seed)
    out = []
    t0 = time.perf_counter()
    for i, u in enumerate(users, 1):
        folder = root / "data" / slug(u.user_id)
        folder.mkdir(parents=True, exist_ok=True)
        pairs = [(e.cue, e.reply) for e in u.examples]
        (folder / "lines.jsonl").write_text("".join(json.dumps({"cue": c, "reply": r}) + "\n" for c, r in pairs))
        store = DeviceStore(root / "activations" / slug(u.user_id)) if cfg.client.cache_activations else None
        out.append(User(u.user_id, folder, prepare_user(model, cfg, u.user_id, pairs, store=store)))
        if i % 10 == 0 or i == len(users):
            logger.info("prepared %d/%d users (%.0f s)", i, len(users), time.perf_counter() - t0)
    return out


def scenario_population(scenario: str | None, overrides: dict[str, Any] | None, root: Path) -> tuple[Config, list[User]]:
    """A scenario's config, with its state and results under ``root``, and its users prepared once (the benches)."""
    from fedpersona.simulations.runner import resolve  # Flower is loaded only where a scenario is resolved

    flat, _ = resolve(scenario, {"run.state-dir": str(root / "state"), "run.results-dir": str(root / "results"),
                                 **(overrides or {})})
    cfg = load_config(flat, env=False)
    return cfg, population(cfg, root / "population")


def simulated_devices(cfg: Config, users: list[User], state_root: Path, **node: Any) -> list[Device]:
    """One real device per prepared user, its state under ``state_root`` (``node``: more node-config keys)."""
    return [Device(cfg, {"data-dir": str(u.folder), "state-dir": str(state_root / slug(u.user_id)),
                         "user-id": u.user_id, **node}, prepared=u.data, simulated=True) for u in users]


def require_split_lora_head(cfg: Config, what: str) -> None:
    """A ValueError unless the head is a LoRA adapter apart from the shared one (``what`` trains the two apart)."""
    if cfg.adapter.head != "lora" or cfg.adapter.split == "fedsa":
        raise ValueError(f"{what} trains a LoRA head apart from the shared adapter. "
                         f"You passed: adapter.head={cfg.adapter.head!r}, adapter.split={cfg.adapter.split!r}")
