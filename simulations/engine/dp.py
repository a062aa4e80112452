"""Gradients of every client of a cohort in one pass, and the batched DP-SGD step on them.

* :meth:`CohortGrad.per_sample`: ``vmap`` over clients (adapter tensors ``in_dims=0``)
  of ``vmap`` over samples (adapter tensors shared, ``None``) of ``grad`` of one
  sample's loss, through ``functional_call`` on the model's adapted top blocks:
  per-sample gradients ``[C, B, ...]`` of every client at once.
* :meth:`CohortGrad.batch`: ``vmap`` over clients of ``grad`` of the mean loss of a
  client's batch (non-private steps: no per-sample gradients needed).
* :func:`clip_and_sum`: Opacus's clipping: per-sample L2 norm over all trained
  tensors jointly, factor ``min(1, C / (norm + 1e-6))``, weighted sum (padding has
  weight 0).
* :func:`add_noise`: each client's own Gaussian noise (std ``sigma * C``) on its own
  summed gradient, drawn as in :mod:`privacy.dpstep`, then divided by the client's
  expected batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from privacy.dpstep import flat_noise
from privacy.noise import NoiseSource
from simulations.engine.loss import batch_losses, chunk_for, sample_loss
from simulations.engine.stack import CohortBatch


class _TopHidden(nn.Module):
    """The adapted top blocks + final norm (``TopStack.hidden``) as a module's forward."""

    def __init__(self, stack: nn.Module) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stack.hidden(hidden)


class CohortGrad:
    def __init__(self, stack: nn.Module, *, ce_budget: int = 1 << 26) -> None:
        self.module = _TopHidden(stack)
        self.head = stack.lm_head.weight
        if self.head.requires_grad:
            raise ValueError("The LM head must be frozen: the engine's chunked loss gives it no gradient")
        self.ce_budget = ce_budget

    def per_sample(self, train: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                   batch: CohortBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients ``{name: [C, B, ...]}`` (padding: exactly 0) and losses ``[C, B]``."""
        c, b, t = batch.target_pos.shape
        chunk = chunk_for(c * b, self.head.shape[0], budget_elements=self.ce_budget)
        module, head = self.module, self.head

        def one(tr, fx, hid, tpos, tlab, tval, w):
            h = functional_call(module, {**tr, **fx}, (hid.unsqueeze(0),))[0]
            loss = sample_loss(h, head, tpos, tlab, tval, chunk)
            return loss * w, loss

        per_sample = vmap(grad(one, has_aux=True), in_dims=(None, None, 0, 0, 0, 0, 0))
        per_client = vmap(per_sample, in_dims=(0, 0, 0, 0, 0, 0, 0))
        return per_client(train, fixed, batch.hidden, batch.target_pos, batch.target_label, batch.target_valid,
                          batch.weight)

    def batch(self, train: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
              batch: CohortBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients ``{name: [C, ...]}`` of each client's mean batch loss, and the losses ``[C, B]``."""
        c, b, t = batch.target_pos.shape
        chunk = chunk_for(c, self.head.shape[0], budget_elements=self.ce_budget)  # rows of [B * T] per client
        module, head = self.module, self.head

        def mean_loss(tr, fx, hid, tpos, tlab, tval, w):
            h = functional_call(module, {**tr, **fx}, (hid,))
            per = batch_losses(h, head, tpos, tlab, tval, chunk)
            return (per * w).sum() / w.sum().clamp(min=1.0), per

        per_client = vmap(grad(mean_loss, has_aux=True), in_dims=(0, 0, 0, 0, 0, 0, 0))
        return per_client(train, fixed, batch.hidden, batch.target_pos, batch.target_label, batch.target_valid,
                          batch.weight)


def clip_and_sum(grads: dict[str, torch.Tensor], order: Sequence[str], clip: torch.Tensor,
                 weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over samples of each per-sample gradient clipped to ``clip[c]`` (joint norm over ``order``)."""
    norms = torch.stack([grads[n].flatten(2).norm(2, dim=-1) for n in order], dim=-1).norm(2, dim=-1)  # [C, B]
    factor = (clip.view(-1, 1) / (norms + 1e-6)).clamp(max=1.0) * weight
    return {n: torch.einsum("cb,cb...->c...", factor, grads[n]) for n in order}


def add_noise(summed: dict[str, torch.Tensor], order: Sequence[str], draws: Sequence[tuple[NoiseSource, torch.Generator, float] | None],
              expected_batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(summed + N(0, std_c^2)) / expected_batch_c`` per client; ``draws[c]`` is None for no noise."""
    ref = summed[order[0]]
    sizes = [summed[n][0].numel() for n in order]
    total = sum(sizes)
    rows = []
    for draw in draws:
        if draw is None:
            rows.append(torch.zeros(total, dtype=torch.float32, device=ref.device))
        else:
            source, gen, std = draw
            rows.append(flat_noise(source, gen, total, std=std, device=ref.device))
    noise = torch.stack(rows)  # [C, total]
    out = {}
    offset = 0
    for n, size in zip(order, sizes):
        g = summed[n]
        part = noise[:, offset : offset + size].view_as(g)
        offset += size
        out[n] = (g + part) / expected_batch.to(g.device, g.dtype).view(-1, *([1] * (g.dim() - 1)))
    return out
