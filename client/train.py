"""DP-SGD on a device: Opacus per-sample clipping + Gaussian noise over a chosen parameter group.

* A pass trains one group of the model's trainable tensors: ``"shared"`` (the
  shared adapter: what is released), ``"personal"`` (the head, which stays on the
  device) or ``"all"``. The other group is frozen for the pass (no gradient, no
  per-sample gradient, not in the optimizer), so its tensors cannot move.
* :func:`train_shared` is the round's released pass: the shared group only, with
  the personal head switched off (a LoRA head zeroed, a soft prompt not prepended at
  all), so the released update never depends on what the head holds (joint DP).
  :func:`train_head` then trains the head on top of the new shared adapter, without
  noise unless asked.
* A soft-prompt head (``adapter.head = "prompt"``, :class:`fedpersona.model.PromptHead`)
  gets its per-sample gradients from :func:`_prompt_grad_sample`, registered with Opacus:
  the gradient of the prompt module's output at the prefix positions, per sample (times
  the prefix's fixed per-position scale).

* Poisson sampling: every example joins a step's batch independently with
  probability ``q = batch_size / n`` (the sampling the RDP/PRV accountants assume).
* An empty Poisson batch is a *noise-only* step: zero-size per-sample gradients, so
  the optimizer still adds noise and the ledger still counts the step (Opacus's
  ``rand_on_empty`` would feed a fake sample instead; we do not).
* The loss is per sample (:class:`fedpersona.model.TopStack`), never the Hugging Face
  batch-token mean, which couples samples and breaks the sensitivity bound.
* The ledger is stepped once per optimizer step with the step's (sigma, q).
* Devices and dtypes (``model.device`` / ``model.dtype``): the model, the cached
  examples and every batch live on the model's device; the frozen base may be
  bfloat16, the trained LoRA tensors, their per-sample gradients, the noise and the
  optimizer state are float32 there. A step reads back one flag (finite or not);
  losses are read once per pass. Opacus hooks only the LoRA layers, whose inputs
  peft casts to float32, so per-sample gradients are float32 with a bfloat16 base.
  A pass runs with autocast off, even inside a caller's autocast: under bfloat16
  autocast Opacus's per-sample gradients (and so the clipping) would be bfloat16, and
  their noised sum could not be assigned to the float32 tensors' gradients.
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
from fedpersona.privacy import dpstep
from fedpersona.privacy.dpstep import flat_noise
from fedpersona.privacy.noise import SECURE, NoiseSource

logger = logging.getLogger(__name__)


#: The clock a pass's ``deadline`` is measured on (monotonic seconds; a test may stand in for it).
clock = time.monotonic


def deadline_after(seconds: float) -> float:
    """A ``deadline`` for :meth:`DPTrainer.train`: ``seconds`` from now on :data:`clock`."""
    return clock() + seconds


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
    #: the pass reached its ``deadline`` and stopped after ``steps`` of the steps asked for
    stopped: bool = False



def _make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _sourced_dp_optimizer(base: torch.optim.Optimizer, source: NoiseSource, **kwargs):
    """Opacus's DPOptimizer (its clipping, summing and scaling) with the noise of
    :func:`fedpersona.privacy.dpstep.flat_noise`, drawn from the step's generator set in ``step_gen``."""
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


GROUPS = ("all", "shared", "personal")


def _prompt_grad_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Per-sample gradient of :class:`fedpersona.model.PromptHead`'s trainable offset.

    The module's output is ``cat([anchor + scale * prompt expanded over the batch, hidden], dim=1)``, so
    sample i's gradient of ``prompt`` is ``scale`` times the gradient of its output at the first P
    positions (``backprops`` is already scaled by Opacus for the ``mean`` loss reduction).
    """
    prompt = layer.prompt
    if not prompt.requires_grad:
        return {}
    return {prompt: backprops[:, : prompt.shape[0]].to(prompt.dtype) * layer.scale}


def _register_prompt_grad_sampler() -> None:
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    from fedpersona.model import PromptHead

    if GradSampleModule.GRAD_SAMPLERS.get(PromptHead) is not _prompt_grad_sample:
        register_grad_sampler(PromptHead)(_prompt_grad_sample)


def _group_grad_sample_module(stack: nn.Module):
    """Opacus's GradSampleModule, built once, for passes that freeze one parameter group.

    Opacus records a module's activations only while one of its own parameters requires a
    gradient, but its backward hook fires whenever a gradient flows through the module and
    then fails for want of activations. Frozen modules are skipped on the way back too.
    """
    from opacus import GradSampleModule
    from opacus.utils.module_utils import requires_grad

    _register_prompt_grad_sampler()  # before the hooks are added: a soft prompt's own grad sampler

    class GroupGradSampleModule(GradSampleModule):
        def capture_backprops_hook(self, module, *args, **kwargs):
            if not requires_grad(module):
                return None
            return super().capture_backprops_hook(module, *args, **kwargs)

    return GroupGradSampleModule(stack, batch_first=True, loss_reduction="mean", strict=False)


class DPTrainer:
    """Owns the Opacus wrapper around the model's :class:`TopStack` (built once per process)."""

    def __init__(self, model: AdaptedModel) -> None:
        self.model = model
        self.params = model.trainable_parameters()
        n_shared = len(model.shared_names)
        self.groups: dict[str, list[nn.Parameter]] = {
            "all": self.params, "shared": self.params[:n_shared], "personal": self.params[n_shared:],
        }
        self.gsm = _group_grad_sample_module(model.stack)

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
        group: str = "all",
        params: Sequence[str] | None = None,
        stack: nn.Module | None = None,
        deadline: float | None = None,
    ) -> TrainResult:
        """Run ``steps`` DP-SGD steps (or plain SGD with ``dp=False``) on ``examples``.

        Only the tensors of ``group`` (``"all"``, ``"shared"`` or ``"personal"``), or the
        tensors named in ``params``, are trained (clipped jointly); the others are frozen
        for the pass. ``stack``: a plain pass (``dp=False``) through these modules instead of
        the model's whole stack (the head pass's upper blocks, :func:`train_head`).

        Randomness (DP assumes both the batches and the noise secret): every step draws, in
        the order of :mod:`fedpersona.privacy.dpstep` (the cohort engine's order), one generator from
        ``noise_source`` (``None``: :data:`fedpersona.privacy.noise.SECURE`, seeded from ``os.urandom``
        per step; torch's global MT19937 generator is never used), the Poisson mask from it,
        then the noise. Explicit opt-ins for tests and reproducible baselines: ``seed`` fixes
        the Poisson masks, ``noise_generator`` hands the noise to Opacus's own draw, or a
        ``NoiseSource(generator=...)`` fixes both (such a source reports ``secure = False``).

        ``deadline`` (a time on :data:`clock`, :func:`deadline_after`): checked before every step; once reached, the
        pass stops there and returns ``stopped = True`` with the steps it took (each of them already
        recorded in ``ledger``). What the caller releases from a stopped pass is the caller's rule.
        """
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}. You passed: {group!r}")
        n = len(examples)
        if n == 0:
            raise ValueError("No training examples on this device")
        if params is None:
            train_params = self.groups[group]
        else:
            named = self.model.named_trainable()
            unknown = [p for p in params if p not in named or all(named[p] is not t for t in self.params)]
            if unknown or not params:
                raise ValueError(f"params must name trainable adapter tensors. You passed: {list(params)[:3]}")
            train_params = [named[p] for p in params]
        if stack is not None and dp:
            raise ValueError("a DP pass runs through the model's Opacus-wrapped stack; stack= is for plain passes")
        frozen = [p for p in self.params if not any(p is q for q in train_params)]
        was = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)  # Opacus computes per-sample gradients only where requires_grad
        try:
            return self._train(examples, train_params, steps=steps, batch_size=batch_size, lr=lr,
                               optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               dp=dp, ledger=ledger, seed=seed, noise_generator=noise_generator,
                               source=noise_source if noise_source is not None else SECURE,
                               stack=stack if stack is not None else self.model.stack, deadline=deadline)
        finally:
            for p, r in zip(frozen, was):
                p.requires_grad_(r)

    def _train(self, examples, params, *, steps, batch_size, lr, optimizer, noise_multiplier, max_grad_norm, dp,
               ledger, seed, noise_generator, source: NoiseSource, stack: nn.Module,
               deadline: float | None = None) -> TrainResult:
        from opacus.optimizers import DPOptimizer

        n = len(examples)
        q = min(1.0, batch_size / n)
        if dp and (not source.secure or seed is not None or noise_generator is not None):
            logger.debug("DP-SGD randomness injected (seed=%s, noise generator %s, noise source secure=%s): "
                         "reproducible, for tests only", seed, "set" if noise_generator is not None else "unset",
                         source.secure)
        mask_gen = torch.Generator().manual_seed(seed) if seed is not None else None
        base_opt = _make_optimizer(params, optimizer, lr)
        dp_kwargs = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=max(1, round(q * n)), loss_reduction="mean")
        sourced = dp and noise_generator is None
        if not dp:
            opt = base_opt
        elif sourced:
            opt = _sourced_dp_optimizer(base_opt, source, **dp_kwargs)
        else:
            opt = DPOptimizer(base_opt, generator=noise_generator, secure_mode=dpstep.ROBUST_NOISE, **dp_kwargs)
        model = self.gsm if dp else stack
        if dp:
            self.gsm.enable_hooks()
        else:
            self.gsm.disable_hooks()
        stack.train()  # Opacus captures activations only in training mode
        t0 = time.perf_counter()
        losses: list[torch.Tensor] = []
        seen = 0
        empty = 0
        done = 0
        # Autocast off, even inside a caller's: per-sample gradients, clipping and noise in float32.
        with torch.autocast(self.model.device.type, enabled=False):
            for _ in range(steps):
                if deadline is not None and clock() >= deadline:
                    break  # before drawing anything for the step: every step taken is a whole, recorded step
                step_gen = dpstep.step_generator(source)
                if mask_gen is not None:
                    idx = (torch.rand(n, generator=mask_gen) < q).nonzero().flatten().tolist()
                else:
                    idx = dpstep.poisson_batch(source, step_gen, n, q).tolist()
                if sourced:
                    opt.step_gen = step_gen  # this step's noise: from the same generator, after the mask
                opt.zero_grad(set_to_none=True)
                if not idx:
                    empty += 1
                    if dp:
                        for p in params:
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
                    losses.append(per_sample.detach().mean())  # read once after the pass (no per-step sync)
                    seen += len(idx)
                if dp and ledger is not None:
                    ledger.step(noise_multiplier=noise_multiplier, sample_rate=q)
                done += 1
                if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one flag per step
                    raise FloatingPointError(
                        "A trainable tensor became non-finite during DP training; the update is discarded"
                    )
        stack.eval()
        loss_values = torch.stack(losses).tolist() if losses else []
        if dp:
            for p in self.params:
                p.grad_sample = None
                p.summed_grad = None
            self.gsm.zero_grad(set_to_none=True)
        if done < steps:
            logger.warning("training pass stopped by its deadline after %d of %d step(s)", done, steps)
        return TrainResult(
            steps=done,
            empty_steps=empty,
            examples_seen=seen,
            mean_loss=sum(loss_values) / len(loss_values) if loss_values else math.nan,
            seconds=time.perf_counter() - t0,
            noise_multiplier=noise_multiplier if dp else 0.0,
            sample_rate=q,
            stopped=done < steps,
        )


@dataclass(frozen=True)
class GradSum:
    """One device's contribution to a noisy sum: its clipped per-example gradients, summed (no noise yet)."""

    grads: dict[str, torch.Tensor]  # shared tensor name -> summed clipped gradient (float32, CPU)
    batch: int  # examples in the Poisson batch (never sent)
    clipped: int  # of which clipped (never sent)
    mean_loss: float  # their mean loss (never sent)
    seconds: float


def clipped_grad_sum(trainer: DPTrainer, examples: Sequence[CachedExample], *, sample_rate: float,
                     max_grad_norm: float, noise_source: NoiseSource | None = None) -> GradSum:
    """The sum of the clipped per-example gradients of the shared tensors over one Poisson sample.

    The step of a noisy sum (``privacy.noise-on = sum``, :mod:`fedpersona.client.sumdp`): each example joins the batch
    with probability ``sample_rate`` (drawn as :mod:`fedpersona.privacy.dpstep` draws a DP-SGD step's batch, from the
    CSPRNG unless a test injects a source); the personal head is switched off (the gradient never depends
    on it); per-example gradients from Opacus's hooks; each clipped to ``max_grad_norm`` in L2 over all
    shared tensors jointly (Opacus's factor ``min(1, C / (norm + 1e-6))``) and summed. No noise here: the
    device adds its discrete Gaussian share after quantizing (:mod:`fedpersona.privacy.sumdp`). An empty batch gives
    zeros (the step still counts). No parameter moves.
    """
    model = trainer.model
    if model.layout.split == "fedsa":
        raise ValueError("adapter.split = 'fedsa' keeps B (personal) inside the shared adapter; a noisy sum of "
                         "shared gradients needs the head switched off. You passed: adapter.split='fedsa'")
    names = list(model.shared_names)
    named = model.named_trainable()
    params = [named[n] for n in names]
    source = noise_source if noise_source is not None else SECURE
    t0 = time.perf_counter()
    gen = dpstep.step_generator(source)
    idx = dpstep.poisson_batch(source, gen, len(examples), sample_rate).tolist()
    zeros = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in zip(names, params)}
    if not idx:
        return GradSum(zeros, 0, 0, math.nan, time.perf_counter() - t0)
    frozen = [p for p in trainer.params if not any(p is q for q in params)]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    stack = model.stack
    try:
        with model.personal_zeroed(), torch.autocast(model.device.type, enabled=False):
            trainer.gsm.enable_hooks()
            stack.train()
            hidden, labels = _batch(examples, idx)
            per_sample = trainer.gsm(hidden, labels)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                per_sample.mean().backward()  # loss_reduction="mean": grad_sample holds each sample's own gradient
            flat = torch.cat([p.grad_sample.reshape(len(idx), -1).float() for p in params], dim=1)
            norms = flat.norm(2, dim=1)
            factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            summed = (flat * factor.unsqueeze(1)).sum(0)
            if not bool(torch.isfinite(summed).all()):
                raise FloatingPointError("a clipped gradient sum is not finite; the step is not answered")
            out, offset = {}, 0
            for n, p in zip(names, params):
                out[n] = summed[offset:offset + p.numel()].view(p.shape).detach().to("cpu", torch.float32).clone()
                offset += p.numel()
            loss = float(per_sample.detach().mean())
            clipped = int((norms > max_grad_norm).sum())
    finally:
        stack.eval()
        for p in trainer.params:
            p.grad_sample = None
            p.grad = None
        trainer.gsm.zero_grad(set_to_none=True)
        for p, r in zip(frozen, was):
            p.requires_grad_(r)
    return GradSum(out, len(idx), clipped, loss, time.perf_counter() - t0)


def train_shared(trainer: DPTrainer, examples: Sequence[CachedExample], **kw) -> TrainResult:
    """The released pass: the shared group only, with the personal head switched off.

    A LoRA head's tensors are zeroed for the pass (its LoRA B = 0: it adds exactly nothing
    to any activation); a soft prompt is not prepended at all. So neither the forward pass
    nor a gradient of the shared tensors depends on what the head holds; the head is
    restored afterwards, untouched.
    """
    if trainer.model.layout.split == "fedsa":
        raise ValueError(
            "adapter.split = 'fedsa' keeps B (personal) inside the shared adapter: a shared pass with the head "
            "switched off has no gradient. You passed: adapter.split='fedsa' (train group 'all' under DP)"
        )
    with trainer.model.personal_zeroed():
        return trainer.train(examples, group="shared", **kw)


def train_head(trainer: DPTrainer, examples: Sequence[CachedExample], **kw) -> TrainResult:
    """The personal head only, on top of the shared adapter as it stands (plain with ``dp=False``).

    A plain pass of a LoRA head whose blocks start above the stack's first block runs those lower
    blocks (the shared adapter alone, fixed for the pass) once per example, then trains on their
    output through the head's blocks only (:attr:`fedpersona.model.AdaptedModel.head_stack`): the
    same function of the same tensors, about half the compute per step with the demo's 2 of 4.
    A DP head pass keeps the whole stack (its Opacus hooks).
    """
    model = trainer.model
    offset = model.head_offset
    if kw.get("dp", True) or not offset:
        return trainer.train(examples, group="personal", **kw)
    lifted = [CachedExample(model.stack.lower(ex.hidden.unsqueeze(0), offset)[0], ex.labels) for ex in examples]
    return trainer.train(lifted, group="personal", stack=model.head_stack, **kw)


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
