"""Gradients of every client of a cohort in one pass, and the batched DP-SGD step on them.

The samples of all clients of a step are packed flat ``[N, ...]`` with a client
index (:class:`SampleBatch`), so ragged Poisson batches cost no padding samples.

* :meth:`CohortGrad.per_sample`: ``vmap`` over the samples of ``grad`` of one
  sample's loss, through ``functional_call`` on the model's adapted top blocks, each
  sample with its own client's adapter tensors (gathered by the client index):
  per-sample gradients ``[N, ...]`` of every client at once. (Measured against a
  nested ``vmap`` over clients of ``vmap`` over samples, padded to the largest
  batch: the flat form does the same work without the padding.)
* :meth:`CohortGrad.mean_batch`: ``grad`` with respect to the stacked tensors of
  every client's mean batch loss (non-private steps: no per-sample gradients).
* :func:`flatten` + :func:`clip_and_sum`: Opacus's clipping on the per-sample
  gradients laid side by side ``[N, P]``: L2 norm over all trained tensors jointly,
  factor ``min(1, C / (norm + 1e-6))``, summed per client (``index_add``).
* :func:`add_noise`: each client's own Gaussian noise (std ``sigma * C``) on its own
  summed gradient, drawn as in :mod:`fedpersona.privacy.dpstep`, then divided by the client's
  expected batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedpersona.privacy.dpstep import flat_noise
from fedpersona.privacy.noise import NoiseSource
from fedpersona.simulations.engine.loss import chunk_for, sample_loss
from fedpersona.simulations.engine.attention import vmap_attention
from fedpersona.simulations.engine.stack import SampleBatch, StackNames


class _TopHidden(nn.Module):
    """The adapted top blocks + final norm (``TopStack.hidden``) as a module's forward."""

    def __init__(self, stack: nn.Module) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stack.hidden(hidden)


class VmapGrad:
    """Gradients of a flat batch of samples, each sample using its own client's adapter tensors (``torch.func``)."""

    name = "vmap"

    def __init__(self, model, *, ce_budget: int = 1 << 26) -> None:
        stack = model.stack
        self.module = _TopHidden(stack)
        self.head = stack.lm_head.weight
        if self.head.requires_grad:
            raise ValueError("The LM head must be frozen: the engine's chunked loss gives it no gradient")
        self.ce_budget = ce_budget
        self.names = StackNames(model.peft, self.module)
        self.config = model.peft.base_model.model.config

    def context(self):
        return vmap_attention(self.config)

    def _inner(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.names.inner(k): v.index_select(0, rows) for k, v in tensors.items()}

    def _one(self, chunk: int):
        module, head = self.module, self.head

        def one(tr, fx, hid, tpos, tlab, tval):
            h = functional_call(module, {**tr, **fx}, (hid.unsqueeze(0),))[0]
            return sample_loss(h, head, tpos, tlab, tval, chunk)

        return one

    def per_sample(self, train: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                   batch: SampleBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients ``{name: [N, ...]}`` and losses ``[N]``.

        ``train`` / ``fixed`` are stacked over clients ``[C, ...]``; each sample takes its
        client's row (``batch.client``), so ``grad`` with respect to those rows is the
        sample's own gradient.
        """
        n = batch.hidden.shape[0]
        chunk = chunk_for(n, self.head.shape[0], budget_elements=self.ce_budget)
        one = self._one(chunk)
        rows = batch.client
        fn = vmap(grad_and_value(one), in_dims=(0, 0, 0, 0, 0, 0))
        g, losses = fn(self._inner(train, rows), self._inner(fixed, rows), batch.hidden, batch.target_pos,
                       batch.target_label, batch.target_valid)
        return {k: g[self.names.inner(k)] for k in train}, losses

    def mean_batch(self, train: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], batch: SampleBatch,
                   sizes: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients ``{name: [C, ...]}`` of each client's mean loss over its samples, and the losses ``[N]``."""
        n = batch.hidden.shape[0]
        chunk = chunk_for(n, self.head.shape[0], budget_elements=self.ce_budget)
        per_sample = vmap(self._one(chunk), in_dims=(0, 0, 0, 0, 0, 0))
        rows = batch.client
        weight = 1.0 / sizes.to(rows.device, torch.float32).index_select(0, rows)
        fx = self._inner(fixed, rows)

        def total(tr):
            losses = per_sample(self._inner(tr, rows), fx, batch.hidden, batch.target_pos, batch.target_label,
                                batch.target_valid)
            return (losses * weight).sum(), losses

        return grad(total, has_aux=True)(train)


def flatten(grads: dict[str, torch.Tensor], order: Sequence[str]) -> torch.Tensor:
    """``{name: [N, ...]}`` -> ``[N, P]``, the tensors side by side in ``order``."""
    first = grads[order[0]]
    return torch.cat([grads[n].reshape(first.shape[0], -1) for n in order], dim=1)


def clip_and_sum(per_sample: torch.Tensor, clip: torch.Tensor, client: torch.Tensor, clients: int) -> torch.Tensor:
    """Per client, the sum of its samples' gradients ``[N, P]``, each clipped to ``clip[client]`` -> ``[C, P]``.

    As Opacus: the L2 norm over all trained tensors jointly, factor ``min(1, C / (norm + 1e-6))``.
    """
    factor = (clip.index_select(0, client) / (per_sample.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
    out = torch.zeros((clients, per_sample.shape[1]), dtype=per_sample.dtype, device=per_sample.device)
    return out.index_add_(0, client, per_sample * factor.unsqueeze(1))


def add_noise(summed: torch.Tensor, draws: Sequence[tuple[NoiseSource, torch.Generator, float] | None],
              expected_batch: torch.Tensor) -> torch.Tensor:
    """``(summed + N(0, std_c^2)) / expected_batch_c`` per client row of ``[C, P]``; ``draws[c]`` None: no noise."""
    total = summed.shape[1]
    rows = []
    for draw in draws:
        if draw is None:
            rows.append(torch.zeros(total, dtype=torch.float32, device=summed.device))
        else:
            source, gen, std = draw
            rows.append(flat_noise(source, gen, total, std=std, device=summed.device))
    noise = torch.stack(rows).to(summed.dtype)
    return (summed + noise) / expected_batch.to(summed.device, summed.dtype).unsqueeze(1)
