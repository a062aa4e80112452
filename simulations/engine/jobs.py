"""What the cohort engine is asked to do for one client, and what it hands back.

A :class:`ClientJob` carries one client's cached examples, its starting adapter
tensors (shared and personal, keyed by model parameter name) and one or more
:class:`Phase` s run one after the other. A phase says which tensors are trained
(``"joint"``: shared and personal together; ``"shared"``; ``"personal"``), whether the
personal head is switched off during it, and how: DP-SGD (Poisson sampling,
per-sample clipping, Gaussian noise from the client's :class:`NoiseSource`) or
plain minibatch training.

* :func:`joint_phases`: today's semantics, one DP-SGD pass over shared + personal.
* :func:`split_phases`: the Ditto / FedRep semantics: DP-SGD on the shared tensors
  with the personal head off (what is released never depends on the head), then
  ``head_steps`` steps of the personal tensors on top of the new shared adapter,
  without noise by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedpersona.privacy.noise import SECURE, NoiseSource

PARAM_GROUPS = ("joint", "shared", "personal")
SAMPLINGS = ("poisson", "uniform")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Phase:
    """One training pass of a client (all clients of a cohort run the same kind of phase together)."""

    params: str
    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    dp: bool = True
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    noise_source: NoiseSource = SECURE
    sampling: str = "poisson"
    personal_off: bool = False

    def __post_init__(self) -> None:
        if self.params not in PARAM_GROUPS:
            raise ValueError(f"Phase.params must be one of {PARAM_GROUPS}. You passed: {self.params!r}")
        if self.steps < 0:
            raise ValueError(f"Phase.steps must be >= 0. You passed: {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"Phase.batch_size must be at least 1. You passed: {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"Phase.lr must be positive. You passed: {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Phase.optimizer must be one of {OPTIMIZERS}. You passed: {self.optimizer!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"Phase.sampling must be one of {SAMPLINGS}. You passed: {self.sampling!r}")
        if self.dp and self.sampling != "poisson":
            raise ValueError(f"DP-SGD needs Poisson sampling (the accountant assumes it). You passed: {self.sampling!r}")
        if self.dp and not self.max_grad_norm > 0:
            raise ValueError(f"Phase.max_grad_norm must be positive. You passed: {self.max_grad_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"Phase.noise_multiplier must be >= 0. You passed: {self.noise_multiplier}")
        if self.params != "shared" and self.personal_off:
            raise ValueError("Phase.personal_off switches the head off; it cannot train it (params must be 'shared')")


@dataclass
class ClientJob:
    """One client's part of a cohort round.

    ``examples``: a list of ``fedpersona.client.train.CachedExample`` or a packed
    :class:`fedpersona.simulations.engine.stack.PackedExamples` (keep the packed form across
    rounds so that the data stays on the device).
    """

    examples: object
    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]
    phases: tuple[Phase, ...]
    client_id: str = ""


#: The models a held-out evaluation reports (:meth:`fedpersona.simulations.engine.CohortEngine.evaluate_cohort`), as the
#: device's final evaluation: the base (every adapter off), the shared adapter alone (the head zeroed), both.
EVAL_MODELS = ("base", "shared", "personal")


@dataclass
class EvalJob:
    """One client's held-out evaluation: its examples (cached or packed) and its adapter tensors."""

    examples: object
    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]
    client_id: str = ""


@dataclass
class PhaseResult:
    steps: int = 0
    empty_steps: int = 0
    examples_seen: int = 0
    losses: list[float] = field(default_factory=list)  # mean per-sample loss of each non-empty step
    ledger_steps: list[tuple[float, float]] = field(default_factory=list)  # (sigma, q) of each DP step
    sample_rate: float = 0.0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


@dataclass
class ClientResult:
    """The client's new tensors (on the CPU, float32) and what each phase did."""

    client_id: str
    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]
    phases: list[PhaseResult]
    error: str | None = None

    @property
    def ledger_steps(self) -> list[tuple[float, float]]:
        """Every DP step of the round, in order: step the client's ledger with these."""
        return [s for p in self.phases for s in p.ledger_steps]

    @property
    def empty_steps(self) -> int:
        return sum(p.empty_steps for p in self.phases)


def joint_phases(*, steps: int, batch_size: int, lr: float, optimizer: str = "adam", dp: bool = True,
                 noise_multiplier: float = 0.0, max_grad_norm: float = 1.0,
                 noise_source: NoiseSource = SECURE) -> tuple[Phase, ...]:
    """One DP-SGD pass over the shared and personal tensors together, clipped jointly."""
    return (Phase("joint", steps, batch_size, lr, optimizer, dp, noise_multiplier, max_grad_norm, noise_source),)


def split_phases(*, steps: int, batch_size: int, lr: float, optimizer: str = "adam",
                 noise_multiplier: float = 0.0, max_grad_norm: float = 1.0, noise_source: NoiseSource = SECURE,
                 head_steps: int, head_batch_size: int | None = None, head_lr: float | None = None,
                 head_dp: bool = False, head_noise_multiplier: float = 0.0, head_max_grad_norm: float = 1.0,
                 head_noise_source: NoiseSource | None = None, dp: bool = True) -> tuple[Phase, ...]:
    """DP-SGD on the shared tensors with the head off, then the head on top (local, or DP when ``head_dp``)."""
    shared = Phase("shared", steps, batch_size, lr, optimizer, dp, noise_multiplier, max_grad_norm, noise_source,
                   "poisson", personal_off=True)
    head = Phase("personal", head_steps, head_batch_size or batch_size, head_lr or lr, optimizer, head_dp,
                 head_noise_multiplier, head_max_grad_norm,
                 head_noise_source if head_noise_source is not None else noise_source,
                 "poisson" if head_dp else "uniform")
    return shared, head


def check_sources(jobs: Sequence[ClientJob]) -> None:
    """Two clients may not share an injected (seeded) source: their draws would interleave."""
    seen: dict[int, int] = {}
    for i, job in enumerate(jobs):
        for ph in job.phases:
            src = ph.noise_source
            if src.secure:
                continue
            if seen.setdefault(id(src), i) != i:
                raise ValueError(
                    f"Clients {seen[id(src)]} and {i} share one seeded NoiseSource; give each client its own. "
                    f"You passed: the same object for {job.client_id or i!r}"
                )
