"""Cross-entropy at target positions, in chunks: memory does not grow with vocabulary x batch.

:class:`ChunkedCrossEntropy` computes ``logsumexp(h W^T) - (h W^T)[label]`` a few
positions at a time and keeps only the per-token losses (and, for the backward
pass, recomputes the logits chunk by chunk). It works under ``torch.func``'s
``vmap`` and ``grad`` (``generate_vmap_rule``), where the full-vocabulary logits of
every client and sample would otherwise be materialized at once (the anchor
configuration: 64 clients x 32 samples x 85 targets x 49,152 x 4 bytes = 34 GB).
The output projection ``W`` is the frozen LM head: no gradient flows to it.
"""

from __future__ import annotations

import torch


class ChunkedCrossEntropy(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # h [T, H] (any dtype), weight [V, H] (the base dtype), labels [T] -> per-token loss [T] float32
        out = []
        for s in range(0, h.shape[-2], chunk):
            logits = (h[..., s : s + chunk, :].to(weight.dtype) @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(-1, labels[..., s : s + chunk].unsqueeze(-1)).squeeze(-1)
            out.append(lse - tgt)
        return torch.cat(out, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, weight, labels, chunk = inputs
        ctx.save_for_backward(h, weight, labels)
        ctx.chunk = chunk

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, labels = ctx.saved_tensors
        chunk = ctx.chunk
        parts = []
        for s in range(0, h.shape[-2], chunk):
            logits = (h[..., s : s + chunk, :].to(weight.dtype) @ weight.T).float()
            p = torch.softmax(logits, dim=-1)
            onehot = torch.zeros_like(p).scatter(-1, labels[..., s : s + chunk].unsqueeze(-1), 1.0)
            dlogits = (p - onehot) * grad_out[..., s : s + chunk].unsqueeze(-1)
            parts.append((dlogits.to(weight.dtype) @ weight).to(h.dtype))
        return torch.cat(parts, dim=-2), None, None, None


def chunk_for(batch_rows: int, vocab: int, *, budget_elements: int = 1 << 26) -> int:
    """Target positions per chunk so that ``batch_rows x chunk x vocab`` logits stay under the budget."""
    return max(1, budget_elements // max(1, batch_rows * vocab))


def sample_loss(h: torch.Tensor, weight: torch.Tensor, target_pos: torch.Tensor, target_label: torch.Tensor,
                target_valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """One sample's loss: mean cross-entropy over its target tokens (``h`` [L, H] after the final norm)."""
    ht = h[target_pos]  # [T, H]
    ce = ChunkedCrossEntropy.apply(ht, weight, target_label, chunk)
    return (ce * target_valid).sum() / target_valid.sum().clamp(min=1.0)


def batch_losses(h: torch.Tensor, weight: torch.Tensor, target_pos: torch.Tensor, target_label: torch.Tensor,
                 target_valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-sample losses of a batch (``h`` [B, L, H]) -> [B]."""
    b, t = target_pos.shape
    ht = torch.gather(h, 1, target_pos.unsqueeze(-1).expand(b, t, h.shape[-1]))  # [B, T, H]
    ce = ChunkedCrossEntropy.apply(ht.reshape(b * t, -1), weight, target_label.reshape(-1), chunk).view(b, t)
    return (ce * target_valid).sum(-1) / target_valid.sum(-1).clamp(min=1.0)
