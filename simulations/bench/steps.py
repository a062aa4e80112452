"""What a scenario costs on this machine, from its per-step costs (the study scenario was sized this way).

    python -m fedpersona.simulations.bench.steps [SCENARIO] [--set KEY=VALUE] [--examples 48] [--threads 1]

Takes one user of the scenario (the first), prepares ``--examples`` of its (cue, reply) pairs with the
scenario's model, sequence length and adapter layout, and measures CPU time (``time.process_time``, so
that other jobs on a shared machine count less) for: the frozen lower blocks per example (run once,
cached), a DP-SGD step of the shared adapter, a plain step, a head step, and the held-out evaluation per
example. Then it projects one ``fedpersona run`` of the scenario: the lower blocks for every example,
``rounds x cohort`` participations of ``client.local-steps`` shared steps and ``client.head-steps`` head
steps (twice with ``eval.local-baseline``: the local-only replay trains the same steps again), and the
final evaluation (base, shared, personalized, and local-only) of every held-out example. Secure
aggregation and the framework are not in the projection (docs/performance.md measures them).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


def measure(scenario: str | None, overrides: dict[str, Any] | None = None, *, examples: int = 48,
            threads: int = 1, steps: int = 4) -> dict[str, Any]:
    """Per-unit CPU seconds and the projected CPU seconds of one run of the scenario."""
    from fedpersona.client.data import split_examples
    from fedpersona.client.device import prepare_user
    from fedpersona.client.train import evaluate, train_head, train_shared, trainer_for
    from fedpersona.model import adapted_model
    from fedpersona.simulations.runner import resolve
    from fedpersona.simulations.sources import load_source

    if examples < 8 or steps < 1:
        raise ValueError(f"--examples must be at least 8 and --steps at least 1. You passed: {examples!r}, {steps!r}")
    _, cfg = resolve(scenario, dict(overrides or {}))
    torch.set_num_threads(threads)
    users = load_source(cfg.data, cfg.run.seed)
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    pairs = [(e.cue, e.reply) for e in users[0].examples][:examples]
    t = time.process_time()
    data = prepare_user(model, cfg, users[0].user_id, pairs)
    prepare = (time.process_time() - t) / len(pairs)
    trainer = trainer_for(model)
    model.load_shared_state(model.initial_shared_state())
    model.load_personal_state(model.fresh_personal_state())
    kw = dict(batch_size=cfg.client.batch_size, lr=cfg.client.lr, optimizer=cfg.client.optimizer,
              max_grad_norm=cfg.privacy.max_grad_norm)
    train_shared(trainer, data.train, steps=1, noise_multiplier=1.0, dp=True, **kw)  # warm-up (hooks, allocations)

    def per_step(fn, **more) -> float:
        t0 = time.process_time()
        fn(trainer, data.train, steps=steps, **kw, **more)
        return (time.process_time() - t0) / steps

    dp_step = per_step(train_shared, noise_multiplier=1.0, dp=True)
    plain_step = per_step(train_shared, noise_multiplier=0.0, dp=False)
    head_kw = dict(kw, batch_size=cfg.client.head_batch_size, lr=cfg.client.head_lr)
    t0 = time.process_time()
    train_head(trainer, data.train, steps=steps, noise_multiplier=0.0, dp=False, **head_kw)
    head_step = (time.process_time() - t0) / steps
    t0 = time.process_time()
    evaluate(model, data.held_out)
    eval_example = (time.process_time() - t0) / max(1, len(data.held_out))
    targets = sum(1 for ex in data.train for x in ex.labels if x != -100) / max(1, len(data.train))
    # The scenario's sizes.
    n_examples = sum(min(len(u.examples), cfg.data.max_examples) for u in users)
    held_out = 0
    for u in users:
        n = min(len(u.examples), cfg.data.max_examples)
        held_out += len(split_examples([("", "")] * n, eval_fraction=cfg.data.eval_fraction, seed=0, key="x")[1])
    k = min(cfg.server.clients_per_round, len(users))
    participations = cfg.server.num_rounds * k
    step = dp_step if cfg.privacy.enabled else plain_step
    per_participation = cfg.client.local_steps * step + cfg.client.head_steps * head_step
    replay = 2 if cfg.eval.local_baseline else 1
    passes = 4 if cfg.eval.local_baseline else 3
    parts = {"lower blocks (once, cached)": n_examples * prepare,
             "rounds (and the local-only replay)": participations * per_participation * replay,
             "final evaluation": held_out * passes * eval_example}
    return {"threads": threads, "users": len(users), "examples": n_examples, "held_out": held_out,
            "participations": participations, "targets_per_example": targets,
            "shared_parameters": sum(t.numel() for t in model.initial_shared_state().values()),
            "per_unit": {"lower blocks per example": prepare, "DP-SGD step": dp_step, "plain step": plain_step,
                         "head step": head_step, "evaluation per example": eval_example},
            "projection": parts, "total_cpu_seconds": sum(parts.values())}


def format_result(r: dict[str, Any], *, speedup: float = 1.8) -> str:
    lines = [f"{r['users']} users, {r['examples']} examples ({r['held_out']} held out), {r['participations']} "
             f"participations, {r['shared_parameters']} shared parameters, {r['targets_per_example']:.1f} target "
             f"tokens per example; CPU time on {r['threads']} thread(s):"]
    lines += [f"  {name:28s} {1000 * v:8.1f} ms" for name, v in r["per_unit"].items()]
    lines.append("projected one run:")
    lines += [f"  {name:36s} {v / 60:7.1f} CPU-min" for name, v in r["projection"].items()]
    total = r["total_cpu_seconds"]
    lines.append(f"  {'total':36s} {total / 60:7.1f} CPU-min; about {total / 60 / speedup:.0f} min on 2 idle cores "
                 f"(two threads ~{speedup}x one)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fedpersona.config import parse_overrides

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", nargs="?", default="study")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--examples", type=int, default=48, help="pairs of the first user to measure on (default 48)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then per core)")
    p.add_argument("--steps", type=int, default=4, help="steps timed per kind (default 4)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(format_result(measure(a.scenario, parse_overrides(a.set), examples=a.examples, threads=a.threads,
                                steps=a.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
