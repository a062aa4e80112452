"""The personal head's pass alone: held-out loss of each user's head after S steps at learning rate L.

    python -m fedpersona.simulations.bench.head                                   # the demo's 20 users
    python -m fedpersona.simulations.bench.head --grid 6:0.01,12:0.005,24:0.003 --set data.max-users=8

Each user's examples are prepared once (the frozen lower blocks run once per example). For every
``steps:lr`` of the grid, every user's head starts fresh (B = 0, the public A) on top of the
scenario's initial shared adapter and trains ``steps`` plain Adam steps of Poisson batches
(``client.head-batch-size``, the batches seeded per user, the same for every grid point) on the
user's training examples, as the device's head pass does (no noise: the head never leaves the
device); then its held-out loss is compared with the base model's. Printed per grid point: the
mean held-out loss, its change over the base model, and how many users are better than base.
This is the figure behind the demo's ``client.head-steps`` / ``client.head-lr`` (docs/utility.md).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from fedpersona.client.train import evaluate, train_head, trainer_for
from fedpersona.config import parse_overrides
from fedpersona.model import adapted_model
from fedpersona.simulations.population import require_split_lora_head, scenario_population


def parse_grid(spec: str) -> list[tuple[int, float]]:
    """``"6:0.01,12:0.005"`` -> [(6, 0.01), (12, 0.005)]; a clear error for anything else."""
    grid = []
    for item in (s.strip() for s in spec.split(",")):
        steps, sep, lr = item.partition(":")
        try:
            point = (int(steps), float(lr))
        except ValueError:
            point = None
        if not sep or point is None or point[0] < 1 or not point[1] > 0:
            raise ValueError(f"--grid takes STEPS:LR pairs separated by commas, steps >= 1 and lr > 0. "
                             f"You passed: {spec!r}")
        grid.append(point)
    return grid


def sweep(scenario: str = "demo", overrides: dict | None = None, *,
          grid: list[tuple[int, float]], seed: int = 1) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-head-") as tmp:
        cfg, users = scenario_population(scenario, overrides, Path(tmp))
        require_split_lora_head(cfg, "the sweep")
        model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
        model.load_shared_state(model.initial_shared_state())  # the model may be a cached one, trained before
        trainer = trainer_for(model)
        with model.adapters_disabled():
            base = {u.user_id: evaluate(model, u.data.held_out)["loss"] for u in users}
        base_mean = sum(base.values()) / len(base)
        print(f"{len(users)} users, base model: mean held-out loss {base_mean:.4f}", flush=True)
        rows = []
        for steps, lr in grid:
            t0 = time.perf_counter()
            losses = {}
            for i, u in enumerate(users):
                model.load_personal_state(model.fresh_personal_state())
                train_head(trainer, u.data.train, steps=steps, batch_size=cfg.client.head_batch_size, lr=lr,
                           optimizer=cfg.client.optimizer, noise_multiplier=0.0,
                           max_grad_norm=cfg.privacy.max_grad_norm, dp=False, seed=seed + i)
                losses[u.user_id] = evaluate(model, u.data.held_out)["loss"]
            mean = sum(losses.values()) / len(losses)
            row = {"steps": steps, "lr": lr, "loss": mean, "gain": (mean - base_mean) / base_mean,
                   "better": sum(losses[u] < base[u] for u in base), "users": len(base),
                   "seconds": time.perf_counter() - t0}
            print(f"head {steps:3d} steps at lr {lr:g}: mean held-out loss {mean:.4f} ({100 * row['gain']:+.2f}% over "
                  f"base), better than base for {row['better']} of {row['users']} users ({row['seconds']:.0f} s)",
                  flush=True)
            rows.append(row)
        return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpersona.simulations.bench.head", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default="demo")
    ap.add_argument("--grid", default="6:0.01,12:0.01,12:0.005,24:0.003,24:0.005",
                    help="STEPS:LR pairs, comma-separated (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sweep(args.scenario, parse_overrides(args.set), grid=parse_grid(args.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
