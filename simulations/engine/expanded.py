"""Per-sample gradients by expanded weights: each sample gets its own copy of its client's adapter.

The other way to :class:`fedpersona.simulations.engine.dp.VmapGrad`: no ``torch.func``. For the
engine's call, every peft LoRA layer of the top blocks computes its adapter branch
with per-sample matrices (``x @ A[s]^T @ B[s]^T * scaling`` as batched matmuls,
``A[s]`` gathered from the client-stacked tensors by the sample's client index).
One ordinary backward pass of the summed per-sample losses then gives, for each
copy, exactly that sample's gradient: per-sample gradients ``[N, ...]`` without
hooks or ``vmap``, and attention stays on the fused kernels. For non-private steps
the copies are gathered inside the graph, so the backward pass sums them per client.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from fedpersona.simulations.engine.loss import batch_losses, chunk_for
from fedpersona.simulations.engine.stack import SampleBatch


def _lora_forward(table: dict):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            raise RuntimeError("The cohort engine supports plain, unmerged LoRA adapters only")
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            if adapter in self.lora_variant:
                raise RuntimeError(f"The cohort engine does not support LoRA variants (adapter {adapter!r})")
            a = table.get((id(self), adapter, "A"), self.lora_A[adapter].weight)
            b = table.get((id(self), adapter, "B"), self.lora_B[adapter].weight)
            # peft casts x to the adapter's dtype; under autocast the matmul casts it back, so skip the copy.
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
            h = torch.matmul(xa, a.transpose(-1, -2))
            result = result + torch.matmul(h, b.transpose(-1, -2)) * self.scaling[adapter]
        return result.to(dtype)

    return forward


class ExpandedGrad:
    name = "expanded"

    def __init__(self, model, *, ce_budget: int = 1 << 26) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self.stack = model.stack
        self.head = self.stack.lm_head.weight
        if self.head.requires_grad:
            raise ValueError("The LM head must be frozen: the engine's chunked loss gives it no gradient")
        self.ce_budget = ce_budget
        by_id = {id(p): n for n, p in model.peft.named_parameters()}
        self.layers: list[nn.Module] = []
        self.slots: dict[str, tuple[int, str, str]] = {}
        for module in self.stack.modules():
            if not isinstance(module, LoraLinear):
                continue
            self.layers.append(module)
            for adapter in module.lora_A:
                for kind, holder in (("A", module.lora_A), ("B", module.lora_B)):
                    self.slots[by_id[id(holder[adapter].weight)]] = (id(module), adapter, kind)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def _patched(self, table: dict) -> Iterator[None]:
        fwd = _lora_forward(table)
        for m in self.layers:
            m.forward = types.MethodType(fwd, m)
        try:
            yield
        finally:
            for m in self.layers:
                del m.forward

    def _losses(self, table: dict, batch: SampleBatch) -> torch.Tensor:
        chunk = chunk_for(1, self.head.shape[0], budget_elements=self.ce_budget)
        with self._patched(table):
            h = self.stack.hidden(batch.hidden)
        return batch_losses(h, self.head, batch.target_pos, batch.target_label, batch.target_valid, chunk)

    def _table(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {self.slots[n]: t for n, t in tensors.items()}

    def per_sample(self, train: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                   batch: SampleBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients ``{name: [N, ...]}`` and losses ``[N]`` (tensors stacked over clients)."""
        rows = batch.client
        copies = {n: t.index_select(0, rows).detach().requires_grad_(True) for n, t in train.items()}
        table = self._table(copies)
        table.update(self._table({n: t.index_select(0, rows) for n, t in fixed.items()}))
        with torch.enable_grad():
            losses = self._losses(table, batch)
            grads = torch.autograd.grad(losses.sum(), list(copies.values()))
        return dict(zip(copies, grads)), losses.detach()

    def mean_batch(self, train: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], batch: SampleBatch,
                   sizes: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients ``{name: [C, ...]}`` of each client's mean loss over its samples, and the losses ``[N]``."""
        rows = batch.client
        leaves = {n: t.detach().requires_grad_(True) for n, t in train.items()}
        weight = 1.0 / sizes.to(rows.device, torch.float32).index_select(0, rows)
        with torch.enable_grad():
            table = self._table({n: t.index_select(0, rows) for n, t in leaves.items()})
            table.update(self._table({n: t.index_select(0, rows) for n, t in fixed.items()}))
            losses = self._losses(table, batch)
            grads = torch.autograd.grad((losses * weight).sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), losses.detach()
