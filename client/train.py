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
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedpersona.model import AdaptedModel, collate
from privacy.dpstep import flat_noise, poisson_batch, step_generator
from privacy.noise import NoiseSource

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


def _make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _sourced_dp_optimizer(base: torch.optim.Optimizer, source: NoiseSource, **kwargs):
    """Opacus's DPOptimizer (its clipping, summing and scaling) with the noise of
    :func:`privacy.dpstep.flat_noise`, drawn from the step's generator in ``step_gen``."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SourcedDPOptimizer(DPOptimizer):
        step_gen: torch.Generator | None = None

        def add_noise(self) -> None:
            if self.step_gen is None:
                raise RuntimeError("SourcedDPOptimizer: no generator set for this step")
            ref = self.params[0]
            noise = flat_noise(source, self.step_gen, sum(p.numel() for p in self.params),
                               std=self.noise_multiplier * self.max_grad_norm, device=ref.device)
            offset = 0
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                chunk = noise[offset : offset + p.numel()].view_as(p.summed_grad).to(p.summed_grad.dtype)
                offset += p.numel()
                p.grad = (p.summed_grad + chunk).view_as(p)
                _mark_as_processed(p.summed_grad)
            self.step_gen = None

    return SourcedDPOptimizer(base, **kwargs)


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
        params: Sequence[str] | None = None,
    ) -> TrainResult:
        """Run ``steps`` DP-SGD steps (or plain SGD with ``dp=False``) on ``examples``.

        ``seed`` fixes Poisson sampling (tests, reproducible baselines); by default the
        batches are drawn from the OS's secure randomness, as DP assumes them secret.
        ``noise_source``: draw every step's Poisson mask and noise from it in the order of
        :mod:`privacy.dpstep` (the cohort engine's order; ``seed`` and ``noise_generator``
        are then unused). ``params``: train only these tensors (model parameter names;
        default: the shared and the personal ones), clipped jointly; the others stay fixed.
        """
        from opacus.optimizers import DPOptimizer

        n = len(examples)
        if n == 0:
            raise ValueError("No training examples on this device")
        q = min(1.0, batch_size / n)
        gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        named = dict(self.model.peft.named_parameters())
        if params is None:
            train_params = self.params
        else:
            unknown = [p for p in params if p not in named or not named[p].requires_grad]
            if unknown or not params:
                raise ValueError(f"params must name trainable adapter tensors. You passed: {list(params)[:3]}")
            train_params = [named[p] for p in params]
        held = [p for p in self.params if all(p is not t for t in train_params)]
        base_opt = _make_optimizer(train_params, optimizer, lr)
        dp_kwargs = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=max(1, round(q * n)), loss_reduction="mean")
        if not dp:
            opt = base_opt
        elif noise_source is not None:
            opt = _sourced_dp_optimizer(base_opt, noise_source, **dp_kwargs)
        else:
            opt = DPOptimizer(base_opt, generator=noise_generator, **dp_kwargs)
        return self._steps(examples, opt, train_params, held, steps=steps, q=q, dp=dp, ledger=ledger, gen=gen,
                           noise_multiplier=noise_multiplier, noise_source=noise_source)

    def _steps(self, examples, opt, train_params, held, *, steps, q, dp, ledger, gen, noise_multiplier,
               noise_source) -> TrainResult:
        n = len(examples)
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
            if noise_source is not None:
                step_gen = step_generator(noise_source)
                idx = poisson_batch(noise_source, step_gen, n, q).tolist()
                if dp:
                    opt.step_gen = step_gen
            else:
                mask = torch.rand(n, generator=gen) < q
                idx = mask.nonzero().flatten().tolist()
            opt.zero_grad(set_to_none=True)
            if not idx:
                empty += 1
                if dp:
                    for p in train_params:
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
                for p in held:  # held fixed: their (per-sample) gradients are dropped
                    p.grad_sample = None
                    p.grad = None
                losses.append(float(per_sample.detach().mean()))
                seen += len(idx)
            if dp and ledger is not None:
                ledger.step(noise_multiplier=noise_multiplier, sample_rate=q)
            for p in train_params:
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
