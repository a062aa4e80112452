"""How much of the shared update's direction survives DP: the cosine of a DP cohort sum with the true gradient.

    python -m fedpersona.simulations.bench.snr                                  # the demo's users and layout
    python -m fedpersona.simulations.bench.snr --cohorts 1,8,64 --set adapter.rank=1 --set adapter.targets=down_proj

Every user's examples are prepared once; at the shared adapter's public initialisation (head
off, as in the shared DP pass) each training example's gradient of the shared tensors is taken
(one backward per example). The true direction is the mean gradient over every example of every
user. One trial of a cohort of K users is what the server's sum of one DP-SGD step would hold:
for each user a Poisson batch at the device's sample rate (``client.batch-size`` / examples), each
example's gradient clipped to ``privacy.max-grad-norm``, summed, plus Gaussian noise of
``sigma * max-grad-norm`` per coordinate, with ``sigma`` what the device calibrates for its
planned steps (``fedpersona.client.device.Device``); the cohort's sums are added. Printed per K: the mean
cosine of that sum with the true direction over ``--trials`` trials, with the noise and without
it (sigma = 0: what clipping and sampling alone leave), and the shared tensor count d. A cosine
near 0 means the step is nearly all noise; the noise's norm grows as sqrt(K d), the signal as K.

This is a diagnostic of one step at the initialisation, not a training run: the trials' noise is
drawn from a seeded generator here (nothing leaves anything). K larger than the users draws users
with replacement (as if the population were that large, each user with the same data).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import warnings
from pathlib import Path

import torch

from fedpersona.client.train import trainer_for
from fedpersona.config import parse_overrides
from fedpersona.model import adapted_model, collate
from fedpersona.simulations.population import scenario_population, simulated_devices


def per_example_gradients(model, examples) -> torch.Tensor:
    """[examples, d]: each example's gradient of the shared tensors (the head switched off)."""
    params = [model.named_trainable()[n] for n in model.shared_names]
    trainer_for(model).gsm.disable_hooks()  # plain autograd: the model's Opacus hooks stay off here
    rows = []
    with model.personal_zeroed():
        for ex in examples:
            hidden, labels = collate([ex.hidden], [ex.labels])
            with warnings.catch_warnings():  # the hooks are off; the inputs are cached activations
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                grads = torch.autograd.grad(model.stack(hidden, labels).sum(), params)
            rows.append(torch.cat([g.detach().reshape(-1).float().cpu() for g in grads]))
    return torch.stack(rows)


def cohort_cosines(grads: list[torch.Tensor], rates: list[float], *, sigma: float, clip: float,
                   cohorts: list[int], trials: int, seed: int = 0) -> dict[int, tuple[float, float]]:
    """{K: (mean cosine with noise, mean cosine without)} of a K-user DP sum with the mean gradient."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.cat(grads).mean(0)
    true = true / true.norm().clamp(min=1e-30)
    clipped = [g / (g.norm(dim=1, keepdim=True) / clip).clamp(min=1.0) for g in grads]
    d = true.numel()
    out = {}
    for k in cohorts:
        noisy, clean = [], []
        for _ in range(trials):
            if k <= len(grads):
                users = torch.randperm(len(grads), generator=gen)[:k].tolist()
            else:
                users = torch.randint(len(grads), (k,), generator=gen).tolist()
            total = torch.zeros(d)
            for u in users:
                mask = torch.rand(clipped[u].shape[0], generator=gen) < rates[u]
                total += clipped[u][mask].sum(0)
            noise = sigma * clip * torch.randn(d, generator=gen) * math.sqrt(k)  # K independent draws, summed
            for bucket, vec in ((noisy, total + noise), (clean, total)):
                norm = float(vec.norm())
                bucket.append(float(vec @ true) / norm if norm > 0 else 0.0)
        out[k] = (sum(noisy) / trials, sum(clean) / trials)
    return out


def measure(scenario: str = "demo", overrides: dict | None = None, *, cohorts: list[int], trials: int = 30) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-snr-") as tmp:
        root = Path(tmp)
        cfg, users = scenario_population(scenario, overrides, root)
        if not cfg.privacy.enabled:
            raise ValueError("the diagnostic needs the device's DP noise: privacy.enabled = false has none")
        devices = simulated_devices(cfg, users, root / "dev")
        sigmas = {round(d.noise_multiplier, 6) for d in devices}
        sigma = max(sigmas)  # devices with fewer examples get more noise; report the noisiest
        model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
        model.load_shared_state(model.initial_shared_state())
        grads = [per_example_gradients(model, u.data.train) for u in users]
        rates = [d.sample_rate for d in devices]
        cos = cohort_cosines(grads, rates, sigma=sigma, clip=cfg.privacy.max_grad_norm, cohorts=cohorts, trials=trials)
        return {"users": len(users), "d": int(grads[0].shape[1]), "sigma": sigma, "sigmas": sorted(sigmas),
                "sample_rates": (min(rates), max(rates)), "cosines": cos}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpersona.simulations.bench.snr", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default="demo")
    ap.add_argument("--cohorts", default="1,8,64", help="cohort sizes K, comma-separated (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cohorts = [int(k) for k in args.cohorts.split(",")]
    except ValueError:
        cohorts = []
    if not cohorts or min(cohorts) < 1 or args.trials < 1:
        ap.error(f"--cohorts takes positive integers separated by commas and --trials >= 1. "
                 f"You passed: {args.cohorts!r}, {args.trials}")
    logging.basicConfig(level=logging.WARNING)
    r = measure(args.scenario, parse_overrides(args.set), cohorts=cohorts, trials=args.trials)
    print(f"{r['users']} users, d = {r['d']} shared tensors' entries, sigma = {r['sigma']:.3f} "
          f"(devices: {', '.join(f'{s:.3f}' for s in r['sigmas'])}), sample rate {r['sample_rates'][0]:.3f}-"
          f"{r['sample_rates'][1]:.3f}")
    for k, (noisy, clean) in r["cosines"].items():
        print(f"cohort of {k:3d}: cosine with the true gradient {noisy:+.3f} under DP, {clean:+.3f} without the noise")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
