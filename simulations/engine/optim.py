"""Each client's own optimizer, on tensors stacked over clients ``[C, ...]``.

The same arithmetic as ``torch.optim.Adam`` (betas 0.9 / 0.999, eps 1e-8, bias
correction, no weight decay) and ``torch.optim.SGD`` (no momentum), with a learning
rate and a step count per client. ``step(grads, apply)`` moves only the clients in
``apply``; the others keep their tensors and moments as they are (a client whose
steps are done, or a non-private step on an empty batch).
"""

from __future__ import annotations

import torch


def _per_client(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    def __init__(self, params: dict[str, torch.Tensor], *, kind: str, lr: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd'. You passed: {kind!r}")
        self.params = params
        self.kind = kind
        self.lr = lr.double().cpu()
        self.betas = betas
        self.eps = eps
        clients = next(iter(params.values())).shape[0]
        self.step_count = torch.zeros(clients, dtype=torch.float64)
        if kind == "adam":
            self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
            self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], apply: torch.Tensor) -> None:
        """One step for the clients where ``apply`` (bool [C], CPU) is true."""
        if not bool(apply.any()):
            return
        device = next(iter(self.params.values())).device
        self.step_count += apply.double()
        mask = apply.to(device)
        if self.kind == "sgd":
            lr = self.lr.to(device=device, dtype=torch.float32)
            for n, p in self.params.items():
                new = p - _per_client(lr, p) * grads[n]
                p.copy_(torch.where(_per_client(mask, p), new, p))
            return
        b1, b2 = self.betas
        steps = self.step_count.clamp(min=1)
        step_size = (self.lr / (1 - b1 ** steps)).to(device=device, dtype=torch.float32)
        bc2_sqrt = ((1 - b2 ** steps) ** 0.5).to(device=device, dtype=torch.float32)
        for n, p in self.params.items():
            g = grads[n]
            m_old, v_old = self.exp_avg[n], self.exp_avg_sq[n]
            m = torch.lerp(m_old, g, 1 - b1)
            v = v_old * b2 + (1 - b2) * g * g
            denom = v.sqrt() / _per_client(bc2_sqrt, p) + self.eps
            new = p - _per_client(step_size, p) * (m / denom)
            keep = _per_client(mask, p)
            p.copy_(torch.where(keep, new, p))
            m_old.copy_(torch.where(keep, m, m_old))
            v_old.copy_(torch.where(keep, v, v_old))
