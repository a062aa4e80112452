"""The cohort engine: every client of a round trained together, each as the sequential path would.

``CohortEngine(model).train_cohort(jobs)`` runs each phase of every job side by
side. Per client and step, in this order (:mod:`fedpersona.privacy.dpstep`): one generator
from the client's :class:`~fedpersona.privacy.noise.NoiseSource`; its batch (Poisson mask, or
a uniform minibatch for local steps); for a DP step its noise, one flat draw over
the trained tensors in model order (the shared tensors, then the personal ones).
With the same sources, ``fedpersona.client.train.DPTrainer.train(..., noise_source=...)``
draws exactly the same, so both paths give the same tensors and the same ledger
steps (tests check this).

What the engine keeps on the device: the base model (moved once, to
``model.device`` / ``model.dtype``), the clients' packed examples (when the caller
passes :class:`PackedExamples`), and, during a call, the clients' adapter tensors
as one flat ``[C, P]`` block (each tensor a ``[C, ...]`` view of it, so clipping,
noise, the optimizer and the finiteness check are a few whole-block operations per
step, not a few per tensor) and their optimizer state. Nothing carries over between calls except what the
caller holds, so memory does not grow over rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from fedpersona.devices import autocast, place_model, resolve_device, resolve_dtype
from fedpersona.privacy.dpstep import poisson_batch, step_generator, uniform_batch
from fedpersona.simulations.engine.dp import VmapGrad, add_noise, clip_and_sum, flatten
from fedpersona.simulations.engine.expanded import ExpandedGrad
from fedpersona.simulations.engine.jobs import EVAL_MODELS, ClientJob, ClientResult, EvalJob, Phase, PhaseResult, check_sources
from fedpersona.simulations.engine.loss import chunk_for
from fedpersona.simulations.engine.optim import StackedOptimizer
from fedpersona.simulations.engine.stack import PackedExamples, StackNames, gather_samples

logger = logging.getLogger(__name__)

#: How per-sample gradients are computed: expanded per-sample adapter copies and one
#: backward pass (default: faster where measured, see docs/performance.md), or torch.func.
METHODS = {"expanded": ExpandedGrad, "vmap": VmapGrad}


def engine_model(cfg):
    """A model of the engine's own (never the process-wide one the devices hook Opacus into)."""
    from fedpersona.model import AdaptedModel, load_base

    base, tokenizer = load_base.__wrapped__(cfg.model.path)  # a base of its own, not the process-wide one
    return AdaptedModel(base, tokenizer, cfg.adapter, seed=cfg.run.seed)


class CohortEngine:
    """Trains a cohort of clients on one :class:`fedpersona.model.AdaptedModel` (placed on the device once)."""

    def __init__(self, model, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32",
                 ce_budget: int = 1 << 26, token_budget: int | None = None, method: str = "expanded") -> None:
        if getattr(model, "head", "lora") != "lora":
            raise ValueError("The cohort engine trains LoRA heads only; a soft-prompt head (adapter.head = 'prompt') "
                             f"trains on its device (fedpersona.client.train). You passed: adapter.head = {model.head!r}")
        self.model = model
        self._check_hooks()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
        place_model(model.peft, device=self.device, dtype=self.dtype)
        if method not in METHODS:
            raise ValueError(f"CohortEngine method must be one of {tuple(METHODS)}. You passed: {method!r}")
        self.method = method
        self.grad = METHODS[method](model, ce_budget=ce_budget)
        # Tokens (clients x samples x positions) in one forward/backward pass: bounds activation memory.
        self.token_budget = token_budget or (32768 if self.device.type == "cuda" else 8192)
        # profile: synchronize around the forward/backward passes and add their time to compute_seconds.
        self.profile = False
        self.compute_seconds = 0.0
        self.shared_names = list(model.shared_names)
        self.personal_names = list(model.personal_names)
        names = StackNames(model.peft, model.stack)
        for n in self.shared_names + self.personal_names:
            names.inner(n)  # every adapter tensor must live in the top blocks
        self.shapes = {n: p.shape for n, p in model.peft.named_parameters() if n in set(self.shared_names + self.personal_names)}
        logger.info("Cohort engine on %s (base %s): %d shared and %d personal adapter tensors", self.device,
                    str(self.dtype).replace("torch.", ""), len(self.shared_names), len(self.personal_names))

    def _check_hooks(self) -> None:
        hooked = [n for n, m in self.model.stack.named_modules()
                  if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks or m._backward_pre_hooks]
        if hooked:
            raise ValueError(
                "The model carries module hooks (an Opacus GradSampleModule from fedpersona.client.train.trainer_for?); "
                f"give the engine a model of its own. You passed: a model hooked at {hooked[0] or 'the top'!r}"
            )

    # ------------------------------------------------------------ data
    def pack(self, examples: Sequence) -> PackedExamples:
        """A client's cached examples on the engine's device (keep it across rounds)."""
        return PackedExamples.pack(examples, device=self.device, dtype=self.dtype)

    # ----------------------------------------------------------- rounds
    def train_cohort(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Train every job's phases; one result per job, in order.

        A client whose tensors become non-finite stops training; its result carries the
        ``error`` and its starting tensors (the update is discarded), and the DP steps it
        did take stay in its ``ledger_steps``.
        """
        if not jobs:
            return []
        self._check_hooks()
        self._check(jobs)
        packed = [j.examples if isinstance(j.examples, PackedExamples) else self.pack(j.examples) for j in jobs]
        names = self.shared_names + self.personal_names
        sizes = [self.shapes[n].numel() for n in names]
        # One transfer each way: the clients' tensors travel as one flat [C, P] block.
        flat = torch.stack([torch.cat([self._tensor(j, n).reshape(-1) for n in names]) for j in jobs]).to(self.device)
        errors: list[str | None] = [None] * len(jobs)
        phases: list[list[PhaseResult]] = [[] for _ in jobs]
        for k in range(len(jobs[0].phases)):
            for c, r in enumerate(self._phase([j.phases[k] for j in jobs], packed, flat, errors)):
                phases[c].append(r)
        flat = flat.cpu()
        out = []
        for c, job in enumerate(jobs):
            if errors[c] is None:
                row, views, offset = flat[c].clone(), {}, 0
                for n, k in zip(names, sizes):
                    views[n] = row[offset : offset + k].view(self.shapes[n])
                    offset += k
                shared = {n: views[n] for n in self.shared_names}
                personal = {n: views[n] for n in self.personal_names}
            else:
                shared = {n: self._tensor(job, n).clone() for n in self.shared_names}
                personal = {n: self._tensor(job, n).clone() for n in self.personal_names}
            out.append(ClientResult(client_id=job.client_id, shared=shared, personal=personal, phases=phases[c],
                                    error=errors[c]))
        return out

    # ------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_cohort(self, jobs: Sequence[EvalJob]) -> list[dict[str, dict[str, float]]]:
        """Every job's held-out figures under :data:`~fedpersona.simulations.engine.jobs.EVAL_MODELS`, as
        :func:`fedpersona.client.train.evaluate` gives them on the device (``loss``: summed target-token loss over
        target tokens; ``accuracy``: correct next-token predictions over target tokens; ``tokens``).

        ``base``: every adapter contribution zero (the base model); ``shared``: the job's shared
        tensors, its personal ones zeroed (the device's ``personal_zeroed``); ``personal``: both.
        All jobs' examples go through the top blocks together, as many clients per pass as
        ``token_budget`` positions allow, each sample with its own client's adapter copies.
        """
        if not jobs:
            return []
        self._check_hooks()
        for j in jobs:
            if set(j.shared) != set(self.shared_names) or set(j.personal) != set(self.personal_names):
                raise ValueError(f"Client {j.client_id!r}: shared/personal state does not match the adapter layout. "
                                 f"You passed: {len(j.shared)} shared and {len(j.personal)} personal tensors")
        packed = [j.examples if isinstance(j.examples, PackedExamples) else self.pack(j.examples) for j in jobs]
        names = self.shared_names + self.personal_names
        flat = torch.stack([torch.cat([self._tensor(j, n).reshape(-1) for n in names]) for j in jobs]).to(self.device)
        views = self._views(flat)
        zero = {n: torch.zeros_like(views[n]) for n in names}
        tensors = {"base": zero,
                   "shared": {**{n: views[n] for n in self.shared_names}, **{n: zero[n] for n in self.personal_names}},
                   "personal": views}
        totals = {m: torch.zeros((len(jobs), 3), dtype=torch.float64) for m in EVAL_MODELS}
        groups, current, tokens = [], [], 0
        for c, pk in enumerate(packed):
            need = len(pk) * int(pk.lengths.max())
            if current and tokens + need > self.token_budget:
                groups.append(current)
                current, tokens = [], 0
            current.append(c)
            tokens += need
        groups.append(current)
        patch = self.grad if isinstance(self.grad, ExpandedGrad) else ExpandedGrad(self.model)
        head = self.model.stack.lm_head.weight
        for group in groups:
            batch = gather_samples([packed[c] for c in group], [torch.arange(len(packed[c])) for c in group],
                                   range(len(group)))
            sel = torch.tensor(group, device=self.device)
            rows = sel.index_select(0, batch.client)  # each sample's job
            for m in EVAL_MODELS:
                table = patch._table({n: t.index_select(0, rows) for n, t in tensors[m].items()})
                with autocast(self.device, self.dtype), patch._patched(table):
                    h = self.model.stack.hidden(batch.hidden)
                stats = _token_stats(h, head, batch, chunk_for(1, head.shape[0], budget_elements=patch.ce_budget))
                totals[m].index_add_(0, rows.cpu(), stats.double().cpu())  # per sample -> its job
        out = []
        for c in range(len(jobs)):
            row = {}
            for m in EVAL_MODELS:
                loss, correct, count = (float(x) for x in totals[m][c])
                row[m] = ({"loss": loss / count, "accuracy": correct / count, "tokens": int(count)} if count
                          else {"loss": float("nan"), "accuracy": float("nan"), "tokens": 0})
            out.append(row)
        return out

    def _tensor(self, job: ClientJob, name: str) -> torch.Tensor:
        src = job.shared if name in job.shared else job.personal
        t = src.get(name)
        if t is None or tuple(t.shape) != tuple(self.shapes[name]):
            raise ValueError(f"Client {job.client_id!r}: tensor {name} missing or of the wrong shape. "
                             f"You passed: {None if t is None else tuple(t.shape)}")
        return torch.as_tensor(t).detach().to(torch.float32)

    def _check(self, jobs: Sequence[ClientJob]) -> None:
        first = jobs[0].phases
        for j in jobs:
            if set(j.shared) != set(self.shared_names) or set(j.personal) != set(self.personal_names):
                raise ValueError(f"Client {j.client_id!r}: shared/personal state does not match the adapter layout. "
                                 f"You passed: {len(j.shared)} shared and {len(j.personal)} personal tensors")
            if len(j.phases) != len(first) or any(
                (a.params, a.personal_off, a.dp, a.optimizer, a.sampling) != (b.params, b.personal_off, b.dp, b.optimizer, b.sampling)
                for a, b in zip(j.phases, first)
            ):
                raise ValueError(f"Client {j.client_id!r}: every client of a cohort needs the same kind of phases "
                                 f"(params, personal_off, dp, optimizer, sampling). You passed: {j.phases}")
        check_sources(jobs)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _order(self, group: str) -> list[str]:
        return {"joint": self.shared_names + self.personal_names, "shared": self.shared_names,
                "personal": self.personal_names}[group]

    def _columns(self, group: str) -> tuple[int, int]:
        """The columns of the flat ``[C, P]`` block that hold a parameter group (model order)."""
        shared = sum(self.shapes[n].numel() for n in self.shared_names)
        total = shared + sum(self.shapes[n].numel() for n in self.personal_names)
        return {"joint": (0, total), "shared": (0, shared), "personal": (shared, total)}[group]

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each adapter tensor as a ``[C, ...]`` view of the flat block."""
        out, offset = {}, 0
        for n in self.shared_names + self.personal_names:
            k = self.shapes[n].numel()
            out[n] = flat[:, offset : offset + k].view(flat.shape[0], *self.shapes[n])
            offset += k
        return out

    def _phase(self, phs: list[Phase], packed: list[PackedExamples], flat: torch.Tensor,
               errors: list[str | None]) -> list[PhaseResult]:
        t0 = time.perf_counter()
        kind = phs[0]
        clients = len(phs)
        order = self._order(kind.params)
        lo, hi = self._columns(kind.params)
        views = self._views(flat)
        trained = flat[:, lo:hi]  # updated in place; ``views`` of it follow
        train = {n: views[n] for n in order}
        fixed = {n: (torch.zeros_like(views[n]) if kind.personal_off and n in self.personal_names else views[n])
                 for n in views if n not in train}
        sizes = [len(p) for p in packed]
        rates = [min(1.0, ph.batch_size / n) for ph, n in zip(phs, sizes)]
        expected = torch.tensor([max(1, round(q * n)) for q, n in zip(rates, sizes)], dtype=torch.float32)
        clip = torch.tensor([ph.max_grad_norm for ph in phs], dtype=torch.float32, device=self.device)
        opt = StackedOptimizer({"trained": trained}, kind=kind.optimizer, lr=torch.tensor([ph.lr for ph in phs]))
        results = [PhaseResult(sample_rate=q if kind.sampling == "poisson" else min(1.0, ph.batch_size / n))
                   for q, ph, n in zip(rates, phs, sizes)]
        for step in range(max(ph.steps for ph in phs)):
            active = [step < ph.steps and errors[c] is None for c, ph in enumerate(phs)]
            gens: list[torch.Generator | None] = []
            indices: list[torch.Tensor | None] = []
            for c, ph in enumerate(phs):
                if not active[c]:
                    gens.append(None)
                    indices.append(None)
                    continue
                gen = step_generator(ph.noise_source)
                gens.append(gen)
                if ph.sampling == "poisson":
                    indices.append(poisson_batch(ph.noise_source, gen, sizes[c], rates[c]))
                else:
                    indices.append(uniform_batch(gen, sizes[c], ph.batch_size))
            sizes_now = [0 if i is None else len(i) for i in indices]
            if self.profile:
                self._sync()
                tc = time.perf_counter()
            with autocast(self.device, self.dtype), self.grad.context():
                summed, losses = self._sums(kind.dp, order, train, fixed, packed, indices, clip, hi - lo)
            if self.profile:
                self._sync()
                self.compute_seconds += time.perf_counter() - tc
            if kind.dp:
                draws = [(ph.noise_source, gens[c], ph.noise_multiplier * ph.max_grad_norm) if active[c] else None
                         for c, ph in enumerate(phs)]
                grads = add_noise(summed, draws, expected)
                apply = torch.tensor(active)
            else:
                grads = summed
                apply = torch.tensor([a and s > 0 for a, s in zip(active, sizes_now)])
            del summed
            opt.step({"trained": grads}, apply)
            del grads
            self._bookkeep(phs, active, sizes_now, losses, results, rates)
            if bool(apply.any()):
                finite = torch.isfinite(trained).all(dim=1).cpu()
                for c in range(clients):
                    if apply[c] and not finite[c]:
                        errors[c] = "a trainable tensor became non-finite during training; the update is discarded"
                        logger.warning("Client %d: %s", c, errors[c])
        dt = time.perf_counter() - t0
        for r in results:
            r.seconds = dt
        return results

    def _sums(self, dp: bool, order: list[str], train: dict, fixed: dict, packed: list[PackedExamples],
              indices: list[torch.Tensor | None], clip: torch.Tensor,
              width: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Per client: the clipped per-sample gradients summed (``dp``) or the mean batch gradient.

        Only clients with a non-empty batch are computed, as many clients per pass as
        ``token_budget`` positions allow (at least one); the others get zeros.
        """
        clients = len(packed)
        real = [c for c in range(clients) if indices[c] is not None and len(indices[c])]
        out = torch.zeros((clients, width), dtype=torch.float32, device=self.device)
        losses: list[torch.Tensor | None] = [None] * clients
        if not real:
            return out, losses
        longest = max(int(packed[c].lengths[indices[c]].max()) for c in real)
        sizes = torch.tensor([0 if i is None else len(i) for i in indices])
        groups, current, tokens = [], [], 0
        for c in real:
            need = len(indices[c]) * longest
            if current and tokens + need > self.token_budget:
                groups.append(current)
                current, tokens = [], 0
            current.append(c)
            tokens += need
        groups.append(current)
        for group in groups:
            sel = torch.tensor(group, device=self.device)
            batch = gather_samples([packed[c] for c in group], [indices[c] for c in group], range(len(group)))
            tr = {n: train[n].index_select(0, sel) for n in order}
            fx = {k: v.index_select(0, sel) for k, v in fixed.items()}
            if dp:
                g, loss = self.grad.per_sample(tr, fx, batch)
                per_sample = flatten(g, order)
                del g
                part = clip_and_sum(per_sample, clip.index_select(0, sel), batch.client, len(group))
                del per_sample
            else:
                g, loss = self.grad.mean_batch(tr, fx, batch, sizes[group])
                part = flatten(g, order)
                del g
            out.index_copy_(0, sel, part.to(out.dtype))
            del part
            loss = loss.detach().float().cpu()
            offset = 0
            for c in group:
                losses[c] = loss[offset : offset + len(indices[c])]
                offset += len(indices[c])
        return out, losses

    @staticmethod
    def _bookkeep(phs, active, sizes, losses, results, rates) -> None:
        for c, ph in enumerate(phs):
            if not active[c]:
                continue
            r = results[c]
            r.steps += 1
            if sizes[c] == 0:
                r.empty_steps += 1
            else:
                r.examples_seen += sizes[c]
                r.losses.append(float(losses[c].mean()))
            if ph.dp:
                r.ledger_steps.append((ph.noise_multiplier, rates[c]))


def _token_stats(h: torch.Tensor, head: torch.Tensor, batch, chunk: int) -> torch.Tensor:
    """Per sample of ``batch``: (summed target-token cross-entropy, correct argmax predictions, target tokens),
    ``[N, 3]`` float32; the logits are computed ``chunk`` target positions at a time."""
    b, t = batch.target_pos.shape
    ht = torch.gather(h, 1, batch.target_pos.unsqueeze(-1).expand(b, t, h.shape[-1])).reshape(b * t, -1)
    labels = batch.target_label.reshape(-1)
    loss, correct = [], []
    for s in range(0, b * t, chunk):
        logits = (ht[s : s + chunk].to(head.dtype) @ head.T).float()
        lab = labels[s : s + chunk]
        loss.append(torch.logsumexp(logits, dim=-1) - logits.gather(-1, lab.unsqueeze(-1)).squeeze(-1))
        correct.append((logits.argmax(-1) == lab).float())
    valid = batch.target_valid
    stats = torch.stack([(torch.cat(loss).view(b, t) * valid).sum(-1), (torch.cat(correct).view(b, t) * valid).sum(-1),
                         valid.sum(-1)], dim=-1)
    return stats
