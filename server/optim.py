"""Server-side update of the shared adapter from the cohort's mean update."""

from __future__ import annotations

import torch


class ServerOptimizer:
    """``fedavg``: shared += lr * mean_update. ``fedadam``: Adam on the pseudo-gradient (Reddi et al. 2021)."""

    def __init__(self, kind: str, lr: float, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if kind not in ("fedavg", "fedadam"):
            raise ValueError(f"Invalid config value for 'server.optimizer': {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.state: dict[str, torch.Tensor] = {}

    def step(self, shared: dict[str, torch.Tensor], mean_update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in shared.items():
            delta = mean_update[name].to(value.dtype)
            if self.kind == "fedavg":
                out[name] = value + self.lr * delta
                continue
            m = self.state.get(f"m::{name}", torch.zeros_like(value))
            v = self.state.get(f"v::{name}", torch.zeros_like(value))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self.state[f"m::{name}"], self.state[f"v::{name}"] = m, v
            out[name] = value + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = dict(state)
