"""Benchmarks that print ratios measured side by side in one run (not timed tests).

``fedpersona bench engine [--quick | --preset demo|anchor]``: the cohort engine
against the sequential Opacus path (:mod:`simulations.engine.bench`).

``fedpersona bench dp-step``: the cost of a DP-SGD step (Opacus per-sample
gradients, clipping, noise) against a plain step on the very same Poisson
batches, alternating the two so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time

import torch


def dp_step(*, steps: int = 10, model: str = "smollm2") -> dict:
    from client.train import CachedExample, DPTrainer
    from fedpersona.config import load_config
    from fedpersona.model import adapted_model, labels_for, lower_hidden

    cfg = load_config({"model.path": model}, env=False)
    m = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    gen = torch.Generator().manual_seed(0)
    seq = cfg.model.seq_len
    seqs = [torch.randint(100, m.tokenizer.vocab_size - 1, (seq,), generator=gen).tolist() for _ in range(64)]
    masks = [[False] * (seq // 3) + [True] * (seq - seq // 3) for _ in seqs]
    hid = lower_hidden(m, seqs)
    ex = [CachedExample(h, tuple(labels_for(s, k))) for h, s, k in zip(hid, seqs, masks)]
    trainer = DPTrainer(m)
    common = dict(steps=1, batch_size=cfg.client.batch_size, lr=cfg.client.lr, optimizer=cfg.client.optimizer,
                  noise_multiplier=1.0, max_grad_norm=cfg.privacy.max_grad_norm)
    times = {True: [], False: []}
    for i in range(steps + 1):
        for dp in (False, True):
            t0 = time.perf_counter()
            trainer.train(ex, dp=dp, seed=1000 + i, **common)
            if i > 0:  # first pair warms up
                times[dp].append(time.perf_counter() - t0)
    dp_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
    return {"dp_step_s": dp_s, "plain_step_s": plain_s, "ratio": dp_s / plain_s, "threads": torch.get_num_threads(),
            "batch": cfg.client.batch_size, "seq_len": seq, "adapter_layers": cfg.adapter.layers}


def main(what: str, *, steps: int = 10, model: str = "smollm2", quick: bool = False, preset: str | None = None,
         cohorts: tuple[int, ...] | None = None, engine_steps: int | None = None,
         methods: tuple[str, ...] | None = None) -> int:
    if what == "engine":
        from simulations.engine.bench import main as engine_main

        return engine_main(quick=quick, preset=preset, cohorts=cohorts, steps=engine_steps, methods=methods)
    if what == "dp-step":
        r = dp_step(steps=steps, model=model)
        print(f"DP-SGD step vs plain step, same Poisson batches (expected batch {r['batch']} x {r['seq_len']} tokens, "
              f"LoRA on the top {r['adapter_layers']} blocks, {r['threads']} threads, median of {steps}):")
        print(f"  plain step {r['plain_step_s'] * 1000:8.1f} ms")
        print(f"  DP step    {r['dp_step_s'] * 1000:8.1f} ms")
        print(f"  ratio DP / plain: {r['ratio']:.2f}x (target <= 1.5x)")
    return 0
