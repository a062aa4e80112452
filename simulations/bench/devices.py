"""One round of a scenario's real devices, trained on their own path and by the cohort engine, side by side.

    python -m fedpersona.simulations.bench.devices                  # the demo: 8 users, SmolLM2-135M, one round
    python -m fedpersona.simulations.bench.devices --users 4 --set model.path=DIR

The users are prepared once (the frozen lower blocks run once per example); then the same
round, from the public initial adapter, is trained twice on fresh device states: each device
after the other on its own path (``Device.train_round``: Opacus, the shared DP pass then the
head pass), and every device's plan together in one ``CohortEngine.train_cohort`` call (after
one warm-up client). Printed: both wall times and their ratio, the figure behind
``--engine auto`` (:func:`fedpersona.simulations.runner.resolve_engine`).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from fedpersona.client.device import Device
from fedpersona.config import parse_override
from fedpersona.simulations.engine import CohortEngine
from fedpersona.simulations.engine.engine import engine_model
from fedpersona.simulations.engine.jobs import ClientJob, Phase
from fedpersona.simulations.population import require_split_lora_head, scenario_population, simulated_devices


def _job(engine: CohortEngine, device: Device, shared, server_round: int) -> ClientJob:
    cfg = device.cfg
    p, c = cfg.privacy, cfg.client
    plan = device.plan_round(shared, server_round=server_round)
    phases = (
        Phase("shared", plan.steps, c.batch_size, c.lr, c.optimizer, p.enabled, plan.noise_multiplier,
              p.max_grad_norm, device.noise_source, "poisson", personal_off=True),
        Phase("personal", plan.head_steps, c.head_batch_size, c.head_lr, c.optimizer, device.head_dp,
              plan.head_noise_multiplier, p.max_grad_norm, device.head_source(server_round), "poisson"),
    )
    return ClientJob(engine.pack(device.data.train), plan.shared, plan.personal, phases, client_id=device.user_id)


def compare(scenario: str = "demo", overrides: dict | None = None, *, users: int = 8) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-devices-") as tmp:
        root = Path(tmp)
        cfg, people = scenario_population(scenario, {"data.max-users": users, **(overrides or {})}, root)
        require_split_lora_head(cfg, "the comparison (the split round: shared pass, then head pass)")
        own = simulated_devices(cfg, people, root / "own")
        shared = own[0].model.initial_shared_state()
        t0 = time.perf_counter()
        for d in own:
            d.train_round(shared, server_round=1)
        t_own = time.perf_counter() - t0
        engine = CohortEngine(engine_model(cfg), device=cfg.model.device, dtype=cfg.model.dtype)
        together = simulated_devices(cfg, people, root / "engine")
        jobs = [_job(engine, d, shared, 1) for d in together]
        engine.train_cohort(jobs[:1])  # warm-up: the first call builds the engine's buffers
        jobs = [_job(engine, d, shared, 1) for d in simulated_devices(cfg, people, root / "engine-timed")]
        t0 = time.perf_counter()
        engine.train_cohort(jobs)
        t_engine = time.perf_counter() - t0
    return {"devices": len(people), "own_path_seconds": t_own, "engine_seconds": t_engine,
            "engine_over_own": t_engine / t_own}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", nargs="?", default="demo")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = compare(args.scenario, dict(parse_override(s) for s in args.set), users=args.users)
    print(f"{r['devices']} devices, one round: own path {r['own_path_seconds']:.1f} s, cohort engine "
          f"{r['engine_seconds']:.1f} s, engine / own path {r['engine_over_own']:.2f}x")


if __name__ == "__main__":
    main()
