"""Benchmarks that print ratios measured side by side in one run (not timed tests).

``fedpersona bench engine [--quick | --preset demo|anchor]``: the cohort engine
against the sequential Opacus path (:mod:`fedpersona.simulations.engine.bench`).

``fedpersona bench dp-step``: the cost of a DP-SGD step (Opacus per-sample
gradients, clipping, noise) against a plain step on the very same Poisson
batches, alternating the two so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time

import torch


class _GlobalMT:
    """The predictable baseline: noise from torch's process-wide MT19937 (what Opacus does without a generator)."""

    secure = False

    def generator(self, device=None):
        return torch.default_generator

    def poisson_mask(self, n, rate, *, generator=None):
        return torch.rand(n, generator=generator or self.generator()) < rate

    def normal(self, shape, *, std, device=None, dtype=torch.float32, generator=None):
        return torch.normal(0.0, float(std), size=tuple(shape), generator=generator or self.generator(), dtype=dtype)


class _SeededTorch(_GlobalMT):
    """The construction shipped before: a torch generator (MT19937) seeded with 64 bits of os.urandom per step."""

    def generator(self, device=None):
        import os

        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def _noise_alone(shapes, *, reps: int = 200) -> dict[str, float]:
    """One step's noise for these parameter shapes, by itself (median CPU seconds of ``reps``)."""
    from fedpersona.privacy.dpstep import flat_noise
    from fedpersona.privacy.noise import SECURE

    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    mt, seeded = _GlobalMT(), _SeededTorch()
    cases = {"noise_mt19937": (mt, False), "noise_seeded_mt_4draw": (seeded, True), "noise_csprng": (SECURE, False),
             "noise_csprng_4draw": (SECURE, True)}
    out = {}
    for name, (source, robust) in cases.items():
        ts = []
        for _ in range(reps):
            t0 = time.process_time()
            flat_noise(source, source.generator("cpu"), numel, std=1.0, robust=robust)
            ts.append(time.process_time() - t0)
        out[name] = statistics.median(ts)
    return out


def dp_step(*, steps: int = 10, model: str = "smollm2") -> dict:
    from fedpersona.privacy import dpstep
    from fedpersona.client.train import CachedExample, DPTrainer
    from fedpersona.config import load_config
    from fedpersona.model import adapted_model, labels_for, lower_hidden

    cfg = load_config({"model.path": model}, env=False)
    m = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    gen = torch.Generator().manual_seed(0)
    seq = cfg.model.seq_len
    seqs = [torch.randint(100, m.tokenizer.vocab_size - 1, (seq,), generator=gen).tolist() for _ in range(64)]
    masks = [[False] * (seq // 3) + [True] * (seq - seq // 3) for _ in seqs]
    hid = lower_hidden(m, seqs)
    ex = [CachedExample(h, tuple(labels_for(s, k))) for h, s, k in zip(hid, seqs, masks)]
    trainer = DPTrainer(m)
    common = dict(steps=1, batch_size=cfg.client.batch_size, lr=cfg.client.lr, optimizer=cfg.client.optimizer,
                  noise_multiplier=1.0, max_grad_norm=cfg.privacy.max_grad_norm)
    # The same Poisson batches for every variant (seeded masks); only the noise's source differs.
    variants = {
        "plain": dict(dp=False),
        "dp_mt19937": dict(dp=True, noise_source=_GlobalMT(), secure_mode=False),
        "dp_seeded_mt_4draw": dict(dp=True, noise_source=_SeededTorch(), secure_mode=True),
        "dp_csprng": dict(dp=True, noise_source=None, secure_mode=False),
        "dp_csprng_4draw": dict(dp=True, noise_source=None, secure_mode=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    saved = dpstep.ROBUST_NOISE
    try:
        for i in range(steps + 1):
            for name, v in variants.items():  # alternating, so machine noise hits all alike
                dpstep.ROBUST_NOISE = v.get("secure_mode", saved)
                t0 = time.perf_counter()
                trainer.train(ex, dp=v["dp"], seed=1000 + i, noise_source=v.get("noise_source"), **common)
                if i > 0:  # the first pass warms up
                    times[name].append(time.perf_counter() - t0)
    finally:
        dpstep.ROBUST_NOISE = saved
    med = {k: statistics.median(v) for k, v in times.items()}
    med.update(_noise_alone([p.shape for p in m.trainable_parameters()]))
    return {**{f"{k}_s": v for k, v in med.items()}, "threads": torch.get_num_threads(),
            "batch": cfg.client.batch_size, "seq_len": seq, "adapter_layers": cfg.adapter.layers,
            "shipped": "dp_csprng_4draw" if saved else "dp_csprng",
            "trainable": sum(p.numel() for p in m.trainable_parameters())}


def main(what: str, *, steps: int = 10, model: str = "smollm2", quick: bool = False, preset: str | None = None,
         cohorts: tuple[int, ...] | None = None, engine_steps: int | None = None,
         methods: tuple[str, ...] | None = None) -> int:
    if what == "engine":
        from fedpersona.simulations.engine.bench import main as engine_main

        return engine_main(quick=quick, preset=preset, cohorts=cohorts, steps=engine_steps, methods=methods)
    if what == "dp-step":
        r = dp_step(steps=steps, model=model)
        plain = r["plain_s"]
        print(f"DP-SGD step vs plain step, same Poisson batches (expected batch {r['batch']} x {r['seq_len']} tokens, "
              f"LoRA on the top {r['adapter_layers']} blocks, {r['trainable']} noised parameters, {r['threads']} "
              f"threads, median of {steps}):")
        rows = [("plain step (no DP)", "plain_s"),
                ("DP step, noise from torch's global MT19937 (predictable)", "dp_mt19937_s"),
                ("DP step, MT19937 seeded from os.urandom per step, 4-draw sum", "dp_seeded_mt_4draw_s"),
                ("DP step, AES-256-CTR CSPRNG, one draw", "dp_csprng_s"),
                ("DP step, AES-256-CTR CSPRNG, 4-draw sum (shipped)", "dp_csprng_4draw_s")]
        for label, key in rows:
            print(f"  {label:<62} {r[key] * 1000:8.1f} ms   {r[key] / plain:5.2f}x plain")
        print(f"  noise alone for the {r['trainable']} parameters (CPU time, median of 200): global MT19937 "
              f"{r['noise_mt19937_s'] * 1000:.2f} ms, seeded MT19937 4-draw {r['noise_seeded_mt_4draw_s'] * 1000:.2f} ms, "
              f"CSPRNG {r['noise_csprng_s'] * 1000:.2f} ms, CSPRNG 4-draw {r['noise_csprng_4draw_s'] * 1000:.2f} ms")
        shipped = r["shipped"] + "_s"
        print(f"  secure noise costs {r[shipped] / r['dp_mt19937_s']:.2f}x the MT19937 DP step "
              f"(shipped: {r['shipped']}); DP / plain {r[shipped] / plain:.2f}x (target <= 1.5x)")
    return 0
