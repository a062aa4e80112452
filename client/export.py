"""``fedpersona export --state-dir S``: a device's own model as peft LoRA folders (:mod:`fedpersona.export`).

The device's personalized model is the shared adapter it last received (kept in its store at train
time) with its personal head; the shared adapter alone is the other folder. The personal head leaves
the encrypted store here, unencrypted, on the device's own disk: :func:`export_device` says so loudly,
writes the folder for the owner only (0700, files 0600), and ``shared_only`` keeps the head in the store.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from fedpersona.client.chat import load_device_model
from fedpersona.client.store import DeviceStore
from fedpersona.export import export_lora
from fedpersona.model import AdaptedModel, resolve_model_dir

logger = logging.getLogger(__name__)

__all__ = ["export_device", "export_model", "PERSONAL_WARNING"]

PERSONAL_WARNING = ("the personalized adapter holds the personal head, which never leaves the device in a round and is "
                    "trained on the user's text {how}: it is written unencrypted to {path} (readable by its owner "
                    "only). Whoever gets it can query a model of the user's writing; keep it on the device, and share "
                    "the shared adapter alone")
HEAD_TRAINING = {"local": "without DP noise (privacy.personal-head = local)",
                 "dp": "under DP-SGD with a budget of its own (privacy.personal-head = dp; its ledger's epsilon, not "
                       "the shared adapter's, is what covers it)"}


def export_model(model: AdaptedModel, cfg, out: str | Path, *, shared_only: bool = False,
                 info: dict[str, Any] | None = None) -> dict:
    """Both folders (``OUT/personalized``, ``OUT/shared``) of a loaded model; ``shared_only``: the second only."""
    out = Path(out)
    base = resolve_model_dir(cfg.model.path)
    folders = {}
    if not shared_only:
        path = out / "personalized"
        how = HEAD_TRAINING.get(cfg.privacy.personal_head, f"(privacy.personal-head = {cfg.privacy.personal_head})")
        warnings.warn(PERSONAL_WARNING.format(how=how, path=path), stacklevel=2)
        folders["personalized"] = export_lora(model, path, base_model=base, personal=True,
                                              info={**(info or {}), "model": "personalized (shared + personal head)"})
    folders["shared"] = export_lora(model, out / "shared", base_model=base, personal=False,
                                    info={**(info or {}), "model": "shared adapter alone"})
    return {"folders": folders, "base": base}


def export_device(state_dir: str | Path, out: str | Path, *, overrides: dict | None = None,
                  shared_only: bool = False) -> dict:
    """A device's model from its own store (the shared adapter of its last round + its head)."""
    store = DeviceStore(state_dir)
    cfg, model = load_device_model(store, overrides)
    return export_model(model, cfg, out, shared_only=shared_only,
                        info={"source": "device state", "state-dir": str(Path(state_dir).resolve())})
