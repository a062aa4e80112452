"""A device built for a given ``model.device`` / ``model.dtype``, and the measures the placement tests compare."""

from __future__ import annotations

import json

import torch

from fedpersona.client.device import HEAD_FILE, LEDGER, Device
from fedpersona.config import load_config
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.noise import NoiseSource

REPLIES = [
    "Nay, answer me: stand, and unfold yourself.",
    "Long live the king!",
    "You come most carefully upon your hour.",
    "For this relief much thanks: 'tis bitter cold.",
    "Not a mouse stirring.",
    "Well, good night.",
]

# Plain SGD: Adam's first steps are about lr * sign(gradient), which turns the rounding of a near-zero
# gradient coordinate into a full-size difference and would hide what the comparison is about. A small
# fixed noise keeps the gradient, not the (shared) noise, the bulk of the update.
ROUND = {"client.optimizer": "sgd", "client.lr": 0.1, "client.head-lr": 0.1, "client.local-steps": 3,
         "client.head-steps": 3, "client.batch-size": 4, "client.head-batch-size": 4, "data.max-examples": 12,
         "privacy.delta": 1e-2, "privacy.noise-multiplier": 0.05, "privacy.target-epsilon": 1e9,
         "secagg.enabled": False}
POLICY = {"policy.allow-no-secagg": True, "policy.max-epsilon": 1e9}


def placed_device(tiny_config, tmp_path, *, device: str, dtype: str, tag: str) -> Device:
    folder = tmp_path / "alice"
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"cue": f"Who's there? number {i}", "reply": r}) for i, r in enumerate(REPLIES * 2)]
    (folder / "lines.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(dict(tiny_config, **ROUND, **{"model.device": device, "model.dtype": dtype}), env=False)
    return Device(cfg, {"data-dir": str(folder), "state-dir": str(tmp_path / f"state-{tag}"), "user-id": "alice",
                        **POLICY})


def seeded_round(dev: Device, *, seed: int, head: dict[str, torch.Tensor]):
    """One round from the public initial adapter and the given head, noise and batches from ``seed``.

    Returns (update, head after the round, ledger).
    """
    dev.noise_source = NoiseSource(generator=torch.Generator().manual_seed(seed))
    dev.store.save_tensors(HEAD_FILE, head)  # every compared device starts from the same head
    update, _ = dev.train_round(dev.model.initial_shared_state(), server_round=1)
    return update, dev.store.load_tensors(HEAD_FILE), PrivacyLedger.from_json(dev.store.load_text(LEDGER))


def flat(state: dict[str, torch.Tensor], minus: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    return torch.cat([(state[n] - (minus[n] if minus else 0)).flatten() for n in sorted(state)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
