"""DP-SGD on a device: Opacus per-sample clipping + Gaussian noise over the shared and personal parameters.

* Poisson sampling: every example joins a step's batch independently with
  probability ``q = batch_size / n`` (the sampling the RDP/PRV accountants assume).
* An empty Poisson batch is a *noise-only* step: zero-size per-sample gradients, so
  the optimizer still adds noise and the ledger still counts the step (Opacus's
  ``rand_on_empty`` would feed a fake sample instead; we do not).
* The loss is per sample (:class:`fedpersona.model.TopStack`), never the Hugging Face
  batch-token mean, which couples samples and breaks the sensitivity bound.
* The ledger is stepped once per optimizer step with the step's (sigma, q).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedpersona.model import AdaptedModel, collate
from privacy.noise import SECURE, NoiseSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedExample:
    """One example as the trainer sees it: the frozen lower blocks' output and the labels."""

    hidden: torch.Tensor  # [len, hidden]
    labels: tuple[int, ...]  # len; -100 where no target

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != -100)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    empty_steps: int
    examples_seen: int
    mean_loss: float
    seconds: float
    noise_multiplier: float
    sample_rate: float


#: Opacus's ``secure_mode``: each noise coordinate is the mean of 4 Gaussian draws (Holohan et al.
#: 2021), which defeats the floating-point attacks on sampled Gaussians (Mironov 2012-style). It
#: does not choose the generator: the CSPRNG-seeded generator set before each step does.
SECURE_MODE = True


def _make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _batch(examples: Sequence[CachedExample], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return collate([examples[i].hidden for i in idx], [examples[i].labels for i in idx])


class DPTrainer:
    """Owns the Opacus wrapper around the model's :class:`TopStack` (built once per process)."""

    def __init__(self, model: AdaptedModel) -> None:
        from opacus import GradSampleModule

        self.model = model
        self.params = model.trainable_parameters()
        self.gsm = GradSampleModule(model.stack, batch_first=True, loss_reduction="mean", strict=False)

    def train(
        self,
        examples: Sequence[CachedExample],
        *,
        steps: int,
        batch_size: int,
        lr: float,
        optimizer: str,
        noise_multiplier: float,
        max_grad_norm: float,
        dp: bool = True,
        ledger=None,
        seed: int | None = None,
        noise_generator: torch.Generator | None = None,
        noise_source: NoiseSource | None = None,
    ) -> TrainResult:
        """Run ``steps`` DP-SGD steps (or plain SGD with ``dp=False``) on ``examples``.

        Randomness (DP assumes both the batches and the noise secret): by default every step's
        Poisson mask and Gaussian noise come from ``noise_source`` (``None``: the secure default
        :data:`privacy.noise.SECURE`, a generator seeded from ``os.urandom`` per draw; torch's
        global MT19937 generator is never used). Explicit opt-ins for tests and reproducible
        baselines: ``seed`` fixes the Poisson masks, ``noise_generator`` the noise, or a
        ``NoiseSource(generator=...)`` both (such a source reports ``secure = False``).
        """
        from opacus.optimizers import DPOptimizer

        n = len(examples)
        if n == 0:
            raise ValueError("No training examples on this device")
        q = min(1.0, batch_size / n)
        source = noise_source if noise_source is not None else SECURE
        if not source.secure or seed is not None or noise_generator is not None:
            logger.debug("DP-SGD randomness injected (seed=%s, noise generator %s, noise source secure=%s): "
                        "reproducible, for tests only", seed, "set" if noise_generator is not None else "unset",
                        source.secure)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        base_opt = _make_optimizer(self.params, optimizer, lr)
        opt = (
            DPOptimizer(
                base_opt,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=max(1, round(q * n)),
                loss_reduction="mean",
                generator=noise_generator,
                secure_mode=SECURE_MODE,
            )
            if dp
            else base_opt
        )
        model = self.gsm if dp else self.model.stack
        if dp:
            self.gsm.enable_hooks()
        else:
            self.gsm.disable_hooks()
        self.model.stack.train()  # Opacus captures activations only in training mode
        t0 = time.perf_counter()
        losses: list[float] = []
        seen = 0
        empty = 0
        for _ in range(steps):
            mask = torch.rand(n, generator=gen) < q if gen is not None else source.poisson_mask(n, q)
            idx = mask.nonzero().flatten().tolist()
            if dp and noise_generator is None:
                opt.generator = source.generator()  # this step's noise: fresh from the CSPRNG (or the injected one)
            opt.zero_grad(set_to_none=True)
            if not idx:
                empty += 1
                if dp:
                    for p in self.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    opt.step()
            else:
                hidden, labels = _batch(examples, idx)
                per_sample = model(hidden, labels)
                with warnings.catch_warnings():
                    # Inputs are cached activations that need no gradient; Opacus's hooks still fire.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    per_sample.mean().backward()
                opt.step()
                losses.append(float(per_sample.detach().mean()))
                seen += len(idx)
            if dp and ledger is not None:
                ledger.step(noise_multiplier=noise_multiplier, sample_rate=q)
            for p in self.params:
                if not torch.isfinite(p).all():
                    raise FloatingPointError(
                        "A trainable tensor became non-finite during DP training; the update is discarded"
                    )
        self.model.stack.eval()
        if dp:
            for p in self.params:
                p.grad_sample = None
                p.summed_grad = None
            self.gsm.zero_grad(set_to_none=True)
        return TrainResult(
            steps=steps,
            empty_steps=empty,
            examples_seen=seen,
            mean_loss=sum(losses) / len(losses) if losses else math.nan,
            seconds=time.perf_counter() - t0,
            noise_multiplier=noise_multiplier if dp else 0.0,
            sample_rate=q,
        )


def trainer_for(model: AdaptedModel) -> DPTrainer:
    """The model's one Opacus wrapper (hooks can be attached to a module only once)."""
    trainer = getattr(model, "_dp_trainer", None)
    if trainer is None:
        trainer = DPTrainer(model)
        model._dp_trainer = trainer  # type: ignore[attr-defined]
    return trainer


@torch.no_grad()
def evaluate(model: AdaptedModel, examples: Sequence[CachedExample], *, batch_size: int = 16) -> dict[str, float]:
    """Held-out loss (mean over target tokens) and next-token accuracy of the model as it stands."""
    total_loss, correct, tokens = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(len(examples), start + batch_size)))
        hidden, labels = _batch(examples, idx)
        loss, ok, count = model.stack.token_stats(hidden, labels)
        total_loss += loss
        correct += ok
        tokens += count
    if tokens == 0:
        return {"loss": math.nan, "accuracy": math.nan, "tokens": 0}
    return {"loss": total_loss / tokens, "accuracy": correct / tokens, "tokens": tokens}
