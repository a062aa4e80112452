"""Per-round checkpoints of the shared adapter: peft format plus the server's own state.

``<run>/checkpoints/round-0003/``
  ``shared/adapter_model.safetensors`` + ``adapter_config.json`` (peft's ``save_pretrained``)
  ``server_state.safetensors``  shared tensors by name + server-optimizer moments
  ``round.json``                written last: a folder without it is incomplete and ignored

A checkpoint is written to a temporary folder and renamed into place, so a crash
mid-write never leaves a half-applied round behind; resume picks the highest
complete round.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def _round_dir(root: Path, server_round: int) -> Path:
    return root / f"round-{server_round:04d}"


def save_checkpoint(
    root: Path,
    server_round: int,
    shared: dict[str, torch.Tensor],
    optimizer_state: dict[str, torch.Tensor],
    *,
    peft_model=None,
    meta: dict | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{server_round:04d}.", dir=root))
    try:
        tensors = {f"shared::{k}": v.contiguous() for k, v in shared.items()}
        tensors.update({f"opt::{k}": v.contiguous() for k, v in optimizer_state.items()})
        save_file(tensors, str(tmp / "server_state.safetensors"))
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp), selected_adapters=["shared"])
        (tmp / "round.json").write_text(json.dumps({"round": server_round, **(meta or {})}, indent=2))
        final = _round_dir(root, server_round)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(round, shared tensors, optimizer state) of the newest complete checkpoint, or None."""
    if not root.is_dir():
        return None
    rounds = []
    for d in root.glob("round-*"):
        if (d / "round.json").is_file() and (d / "server_state.safetensors").is_file():
            try:
                rounds.append((int(d.name.split("-")[1]), d))
            except ValueError:
                continue
    if not rounds:
        return None
    server_round, folder = max(rounds)
    tensors = load_file(str(folder / "server_state.safetensors"))
    shared = {k[8:]: v for k, v in tensors.items() if k.startswith("shared::")}
    opt = {k[5:]: v for k, v in tensors.items() if k.startswith("opt::")}
    return server_round, shared, opt
