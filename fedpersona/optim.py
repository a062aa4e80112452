"""The server's update of the shared adapter from the cohort's mean update (or, with noise on the sum, minus
the noisy mean gradient: :mod:`fedpersona.server.sumdp`). In the core because a simulated device's local-only baseline
replays the very same optimizer on its own noisy sums (:mod:`fedpersona.client.sumdp`)."""

from __future__ import annotations

import torch

KINDS = ("fedavg", "fedavgm", "fedadam")


class ServerOptimizer:
    """``fedavg``: shared += lr * delta. ``fedavgm``: the same with heavy-ball momentum (Hsu et al. 2019):
    m = momentum * m + delta, shared += lr * m. ``fedadam``: Adam on the pseudo-gradient (Reddi et al. 2021).

    ``delta`` is the cohort's mean update; with noise on the sum (``privacy.noise-on = sum``) it is minus the
    noisy mean clipped gradient, so ``fedavg`` is SGD, ``fedavgm`` SGD with momentum and ``fedadam`` Adam.
    """

    def __init__(self, kind: str, lr: float, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 momentum: float = 0.9) -> None:
        if kind not in KINDS:
            raise ValueError(f"Invalid config value for 'server.optimizer': must be one of {KINDS}. You passed: {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.momentum = momentum
        self.state: dict[str, torch.Tensor] = {}

    def step(self, shared: dict[str, torch.Tensor], mean_update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in shared.items():
            delta = mean_update[name].to(value.dtype)
            if self.kind == "fedavg":
                out[name] = value + self.lr * delta
                continue
            if self.kind == "fedavgm":
                m = self.momentum * self.state.get(f"m::{name}", torch.zeros_like(value)) + delta
                self.state[f"m::{name}"] = m
                out[name] = value + self.lr * m
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
