"""``model.device`` and ``model.dtype``: where the model runs and in which precision.

The frozen base may run in bfloat16; the LoRA adapters (and every optimizer state
built on them) always stay float32, so that DP noise and small updates are not
rounded away.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid config value for 'model.device': no CUDA device is available. You passed: {name!r}")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"Invalid config value for 'model.device': only {torch.cuda.device_count()} CUDA device(s). "
                f"You passed: {name!r}"
            )
        return dev
    raise ValueError(f"Invalid config value for 'model.device': must be 'auto', 'cpu', 'cuda' or 'cuda:N'. You passed: {name!r}")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Invalid config value for 'model.dtype': must be one of {tuple(DTYPES)}. You passed: {name!r}")
    return DTYPES[name]


def place_model(module: nn.Module, *, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``; frozen (non-LoRA) tensors to ``dtype``, LoRA tensors float32."""
    module.to(device)
    for name, p in module.named_parameters():
        want = torch.float32 if ("lora_A" in name or "lora_B" in name) else dtype
        if p.dtype != want:
            p.data = p.data.to(want)
    for name, b in module.named_buffers():
        # Rotary frequencies and similar buffers keep their own (float32) precision.
        if b.device != device:
            b.data = b.data.to(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast on CUDA when the base is bfloat16; nothing otherwise."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
