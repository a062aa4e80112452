"""Causal attention written with batched matmuls, for ``vmap``.

PyTorch's fused scaled-dot-product attention kernels have no ``vmap`` batching
rule: under the engine's nested ``vmap`` they fall back to one call per client and
sample. This function computes the same causal attention (the model's cached
activations are right-padded, so no mask beyond the causal one is needed) with
plain matmuls and a softmax, which ``vmap`` batches. The engine switches its
model to it only for the duration of its own calls (:func:`vmap_attention`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

NAME = "fedpersona_vmap"
_registered = False


def causal_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    groups = query.shape[-3] // key.shape[-3]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    lq, lk = query.shape[-2], key.shape[-2]
    future = torch.ones(lq, lk, dtype=torch.bool, device=query.device).triu(lk - lq + 1)
    scores = scores.masked_fill(future, float("-inf"))
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)
    return out.transpose(-3, -2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, causal_attention)
        _registered = True


@contextlib.contextmanager
def vmap_attention(config) -> Iterator[None]:
    """The model (its ``config``) uses :func:`causal_attention` inside the block."""
    _register()
    saved = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = saved
