"""Run a scenario as a simulation of the real Message API apps, one simulated SuperNode per user.

The scenario (a ``simulations/conf/*.toml`` file plus ``key=value`` overrides) is
validated here, before anything starts. The engines (``auto``, the default, picks ``cohort`` on a
GPU or for a small model and ``devices`` for a real model on the CPU, :func:`resolve_engine`):

* ``cohort``: in this process, the ServerApp's round loop over an
  :class:`~fedpersona.simulations.engine.grid.EngineGrid`: each round's cohort is trained in one
  cohort-engine call, every message still goes to the real ClientApp (no Ray). With
  ``engines = N > 1`` each cohort is split over N engines on Ray actors, one per GPU
  (:mod:`fedpersona.simulations.engine.shards`).
* ``devices``: the same grid, but every device trains its round on its own path (``fedpersona.client.train``,
  Opacus), as the deployed device does.
* ``flower``: Flower's Simulation Engine (Ray); the config reaches the apps through
  ``$FEDPERSONA_RUN_CONFIG`` (Ray workers inherit the environment).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpersona.client.policy import POLICY_FILE, PREFIX, DevicePolicy
from fedpersona.config import CONFIG_ENV, RENAMED_KEYS, Config, expected_participations, load_config, read_scenario
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.simulations.failures import device_failures, mark_failed, rewrite_outputs
from fedpersona.simulations.progress import timed_prepare
from fedpersona.simulations.scenarios import CONF_DIR, scenario_path  # noqa: F401 - CONF_DIR: where callers find the shipped scenarios
from fedpersona.simulations.partitions import prepare_partitions, simulated_state_dir
from fedpersona.simulations.sources import DataReport, load_source_report, truncation, truncation_line, truncation_warning
from fedpersona.simulations.user_table import attach_user_table

logger = logging.getLogger(__name__)


def resolve(scenario: str | None, overrides: dict[str, Any]) -> tuple[dict[str, Any], Config]:
    flat: dict[str, Any] = read_scenario(scenario_path(scenario)) if scenario else {}
    flat.update(overrides)
    cfg = load_config(flat, env=False)
    for old, new in RENAMED_KEYS.items():  # warned once here, not again in every app process
        if old in flat:
            flat[new] = flat.pop(old)
    # Absolute folders: Ray workers may not share the launcher's working directory.
    flat["run.results-dir"] = str(Path(cfg.run.results_dir).resolve())
    flat["run.state-dir"] = str(Path(cfg.run.state_dir).resolve())
    cfg = load_config(flat, env=False)
    secagg_params(cfg)  # the protocol's check of secagg.* (graph, modulus, noise), before anything starts
    return flat, cfg


def fill_participations(flat: dict[str, Any], cfg: Config, users: int) -> Config:
    """With ``client.max-participations = 0``: set it in ``flat`` to the participations a device of this
    simulation can expect (:func:`fedpersona.config.expected_participations`: ``ceil(rounds x cohort /
    users)`` with balanced sampling), so each device plans its noise for them, not for every round (and
    declines beyond them). Returns the config of the updated ``flat``."""
    if cfg.client.max_participations != 0:
        return cfg
    # Over the rounds the server runs (it samples in each of them); a device then plans for at most
    # privacy.planned-rounds of them (Config.planned_participations).
    m = expected_participations(rounds=cfg.server.num_rounds, cohort=min(cfg.server.clients_per_round, users),
                                users=users, sampling=cfg.server.sampling)
    flat["client.max-participations"] = m
    logger.info("client.max-participations = %d: each device plans its noise for the participations it can expect "
                "(%d users, %d per round, %d rounds, %s sampling)", m, users, cfg.server.clients_per_round,
                cfg.server.num_rounds, cfg.server.sampling)
    return load_config(flat, env=False)


POLICY_HEADER = "# written by `fedpersona run --device-policy` for this simulated device (deleted by a run without it)\n"


def write_device_policies(cfg: Config, user_ids: list[str], policy: dict[str, Any] | None) -> None:
    """Give the simulated devices a ``policy.toml`` (``--device-policy``), or remove the one a run gave them.

    The simulated devices' own floors: by default (no file) the safe defaults of
    :class:`fedpersona.client.policy.DevicePolicy`; a non-private simulation (``privacy.enabled = false``)
    needs ``--device-policy allow-no-dp=true``, plain aggregation ``allow-no-secagg=true``.
    A ``policy.toml`` the runner did not write is never touched.
    """
    values = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in (policy or {}).items()}
    DevicePolicy.from_mapping(values, source="--device-policy")  # ValueError naming a bad key or value
    for user in user_ids:
        path = simulated_state_dir(cfg, user) / POLICY_FILE
        ours = path.is_file() and path.read_text().startswith(POLICY_HEADER)
        if values:
            if path.is_file() and not ours:
                raise ValueError(f"{path} exists and was not written by the runner; edit it, or drop --device-policy")
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [f"{k[len(PREFIX):]} = {json.dumps(v)}" for k, v in sorted(values.items())]
            path.write_text(POLICY_HEADER + "\n".join(lines) + "\n")
        elif ours:
            path.unlink()


def check_sum_cohort(cfg: Config, users: int, policy: dict[str, Any] | None) -> None:
    """With ``privacy.noise-on = sum``: a ValueError before anything trains when the simulated devices would refuse
    every step, because t (``privacy.honest-contributors``, else half the cohort) is below their floor
    ``policy.min-contributors`` (3 by default) or above their share ``policy.max-honest-fraction`` of the cohort."""
    if cfg.privacy.noise_on != "sum":
        return
    values = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in (policy or {}).items()}
    floors = DevicePolicy.from_mapping(values, source="--device-policy")
    k = min(cfg.server.clients_per_round, users)
    t = cfg.privacy.honest_contributors if cfg.privacy.honest_contributors > 0 else max(1, k // 2)
    if t < floors.min_contributors or t > floors.max_honest_fraction * k:
        raise ValueError(
            f"privacy.noise-on = sum: each sum would count on t = {t} honest contributors of a cohort of {k}, but the "
            f"simulated devices accept t between policy.min-contributors = {floors.min_contributors} and "
            f"policy.max-honest-fraction = {floors.max_honest_fraction:g} of the cohort: every device would refuse. "
            f"Use server.clients-per-round >= {2 * floors.min_contributors} (with enough users), or "
            "privacy.noise-on = device")


ENGINES = ("auto", "cohort", "devices", "flower")
# ``auto`` on the CPU: the cohort engine for a base below this hidden size, each device's own path above.
# Measured (2-core CPU): a tiny model, engine 5.57x faster (`fedpersona bench engine --quick`); SmolLM2-135M
# (hidden 576), the demo's round of 8 devices, the devices' own path 2.08x faster (docs/performance.md).
AUTO_ENGINE_MAX_CPU_HIDDEN = 256


def resolve_engine(engine: str, cfg: Config, *, engines: int = 1) -> tuple[str, str]:
    """(``cohort`` | ``devices`` | ``flower``, why) for ``engine``; ``auto`` decides by where the model runs."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}. You passed: {engine!r}")
    if engine != "auto":
        return engine, "as asked"
    if engines != 1:
        return "cohort", f"--engines {engines} splits the cohort engine's rounds"
    from fedpersona.devices import resolve_device
    from fedpersona.model import resolve_model_dir

    if resolve_device(cfg.model.device).type != "cpu":
        return "cohort", "the model runs on a GPU, where the engine removes the per-client launch and hook overhead"
    hidden = json.loads((resolve_model_dir(cfg.model.path) / "config.json").read_text()).get("hidden_size", 0)
    if hidden < AUTO_ENGINE_MAX_CPU_HIDDEN:
        return "cohort", f"a small model (hidden size {hidden}) on the CPU: the per-client overhead dominates"
    return "devices", (f"the model (hidden size {hidden}) runs on the CPU, where every step is compute-bound: each "
                       f"device trains on its own path (measured 2.08x faster than the engine at the demo's shape)")


def run(scenario: str | None = None, overrides: dict[str, Any] | None = None, *, cpus: int | None = None,
        device_policy: dict[str, Any] | None = None, progress=None, engine: str = "auto",
        engines: int = 1, on_grid=None) -> dict:
    """Run the scenario to completion; returns the run's metrics.json content.

    ``engine``: ``cohort`` (the ServerApp over an :class:`~fedpersona.simulations.engine.grid.EngineGrid` in
    this process, each round's cohort trained by the cohort engine), ``devices`` (the same grid,
    each device training its round on its own path, ``fedpersona.client.train``), ``auto`` (``cohort`` on a
    GPU or for a small model, ``devices`` for a real model on the CPU: :func:`resolve_engine`) or
    ``flower`` (Flower's Simulation Engine on Ray). ``engines``: with ``cohort``, the number of
    engines (Ray actors, one per GPU) a round's cohort is split over; 1 trains it in this process.

    ``device_policy``: ``policy.*`` keys every simulated device holds as its own (a
    ``policy.toml`` in its state folder; see :func:`write_device_policies`). The result has
    ``failure_count`` and ``failed_users`` (user -> error class, message and round).
    ``progress`` receives the events of :mod:`fedpersona.server.progress` (``fedpersona.simulations.progress`` displays them).
    ``on_grid(grid)``: called with the in-process grid once it is open (``cohort`` / ``devices``; a
    benchmark reads its engine time, :mod:`fedpersona.simulations.bench.overhead`).
    """
    from fedpersona.model import resolve_model_dir

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}. You passed: {engine!r}")
    flat, cfg = resolve(scenario, dict(overrides or {}))
    if engines != 1 and engine not in ("cohort", "auto"):
        raise ValueError(f"engines (--engines) splits the cohort engine's rounds; it needs engine 'cohort'. "
                         f"You passed: --engine {engine} --engines {engines}")
    asked = engine
    engine, why = resolve_engine(engine, cfg, engines=engines)
    if asked == "auto":
        logger.info("engine: %s (%s)", engine, why)
    from fedpersona.simulations.engine.shards import check_engines

    check_engines(engines, cfg.server.clients_per_round)
    t_prepare = time.perf_counter()
    users, report = load_source_report(cfg.data, cfg.run.seed, on_user=timed_prepare(progress))
    if cfg.server.clients_per_round > len(users):
        raise ValueError(too_few_users(report, cfg, origin=_origin("server.clients-per-round", scenario, overrides)))
    if cfg.privacy.enabled:
        smallest = min(min(len(u.examples), cfg.data.max_examples) for u in users)
        n_train = smallest - max(1, round(cfg.data.eval_fraction * smallest))
        if cfg.privacy.delta >= 1.0 / n_train:
            raise ValueError(
                f"Invalid config value for 'privacy.delta': must be below 1/number-of-examples = 1/{n_train} "
                f"(the smallest user's training split). You passed: {cfg.privacy.delta}"
            )
    cfg = fill_participations(flat, cfg, len(users))
    write_device_policies(cfg, [u.user_id for u in users], device_policy)
    check_sum_cohort(cfg, len(users), device_policy)
    model_dir = resolve_model_dir(cfg.model.path)  # convert the default model once, before workers start
    data_report = {**report.as_dict(), "truncation": _truncation(cfg, users, model_dir)}
    data_lines = report.lines() + [truncation_line(data_report["truncation"])]
    data_report["lines"] = data_lines
    for line in data_lines:  # a display shows them; the log has them at debug level then, not twice
        logger.log(logging.INFO if progress is None else logging.DEBUG, "%s", line)
    warning = truncation_warning(data_report["truncation"])
    if warning:
        logger.warning("%s", warning)
    if progress is not None:
        progress.event("prepare-end", users=len(users), source=cfg.data.source, seconds=time.perf_counter() - t_prepare,
                       **{"users-in-source": report.users_in_source, "lines": data_lines})
    prepare_partitions(cfg, users)  # each simulated device reads its user's data folder (simulations/partitions.py)
    cpus = cpus or os.cpu_count() or 1
    metrics_path = Path(cfg.run.results_dir) / cfg.run.name / "metrics.json"
    # Rounds of an earlier invocation (a resumed run): their failures were reported by that one.
    earlier = json.loads(metrics_path.read_text()).get("rounds", []) if metrics_path.is_file() else []
    after_round = max((int(r.get("round", 0)) for r in earlier), default=0)
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    if engine in ("cohort", "devices"):
        _run_cohort(flat, cfg, len(users), cpus, progress, engines=engines, on_devices=engine == "devices",
                    on_grid=on_grid)
    else:
        _run_flower(flat, cfg, len(users), cpus, progress)
    if not metrics_path.is_file():
        raise RuntimeError(f"The simulation ended without writing {metrics_path}; see the log above")
    metrics = json.loads(metrics_path.read_text())
    # The per-user table, from the devices' own stores on this machine (the server has only the secure sum).
    attach_user_table(metrics_path.parent, metrics, {u.user_id: simulated_state_dir(cfg, u.user_id) for u in users})
    failed_users = device_failures(cfg, [u.user_id for u in users], since=started)
    failed = mark_failed(metrics, failed_users, after_round=after_round)
    if failed:
        rewrite_outputs(cfg, metrics)
        logger.warning("%d failure(s) over the run, %d user(s) failed: %s", failed, len(failed_users),
                       "; ".join(f"{u}: {e}" for u, e in metrics["failed_users"].items()) or "see rounds.csv")
    _attach_data_report(metrics_path.parent, metrics, data_report, data_lines)
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def _origin(key: str, scenario: str | None, overrides: dict[str, Any]) -> str:
    """Where a key's value came from: ``--set``, the scenario file, or the default."""
    if key in overrides:
        return "--set"
    if scenario and key in read_scenario(scenario_path(scenario)):
        return f"scenario {scenario!r}"
    return "the default"


def too_few_users(report: DataReport, cfg: Config, *, origin: str) -> str:
    """The error for a cohort larger than the users left after the filters, naming the filters' effect."""
    k = cfg.server.clients_per_round
    return (f"Too few users: {report.users} of the {report.users_in_source} users of {report.source} are left after "
            f"the filters ({report.dropped()}), fewer than a round's cohort, server.clients-per-round = {k} ({origin}). "
            f"Lower data.min-examples (now {cfg.data.min_examples}), give the source more users, or set "
            f"server.clients-per-round to at most {report.users}.")


def _truncation(cfg: Config, users: list, model_dir: Path) -> dict:
    """The share of the kept replies that ``model.seq-len`` cuts (:func:`fedpersona.simulations.sources.truncation`)."""
    from transformers import AutoTokenizer

    from fedpersona.client.device import kept_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pairs = [p for u in users for p in kept_pairs(cfg, u.user_id, [(e.cue, e.reply) for e in u.examples])]
    return truncation(tokenizer, pairs, seq_len=cfg.model.seq_len, cue_tokens=cfg.model.cue_tokens)


def _attach_data_report(run_dir: Path, metrics: dict, report: dict, lines: list[str]) -> None:
    """``metrics.json`` ``data`` and the lines under the table of ``summary.txt``: what the filters dropped and
    how many replies ``model.seq-len`` cut."""
    from fedpersona.server.run_report import write_json

    metrics["data"] = report
    write_json(run_dir / "metrics.json", {k: v for k, v in metrics.items() if k != "wall_seconds"})
    summary = run_dir / "summary.txt"
    text = summary.read_text() if summary.is_file() and metrics.get("final") else ""  # the table of this run
    summary.write_text(text + ("\n" if text else "") + "\n".join(lines) + "\n")


def _run_cohort(flat: dict[str, Any], cfg: Config, n_users: int, cpus: int, progress, *, engines: int = 1,
                on_devices: bool = False, on_grid=None) -> None:
    """The ServerApp's round loop over an EngineGrid, in this process (no deprecated API; Ray only for
    ``engines > 1``, where the grid's sharded engine starts it and shuts it down). ``on_devices``:
    the grid hands every message to the ClientApp and each device trains its round itself."""
    import uuid

    import torch

    from fedpersona.client.app import app as client_app
    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.engine.grid import EngineGrid

    torch.set_num_threads(max(1, cpus))
    nodes = {100 + i: {"partition-id": i} for i in range(n_users)}  # simulated devices: data from the manifest
    if on_devices:
        logger.info("Simulating %d users (%d per round, %d rounds) in this process, each device training its own "
                    "round (model.device = %s, %d CPU thread(s))", n_users, cfg.server.clients_per_round,
                    cfg.server.num_rounds, cfg.model.device, cpus)
    elif engines == 1:
        logger.info("Simulating %d users (%d per round, %d rounds) with the cohort engine in this process "
                    "(model.device = %s, %d CPU thread(s))", n_users, cfg.server.clients_per_round,
                    cfg.server.num_rounds, cfg.model.device, cpus)
    else:
        logger.info("Simulating %d users (%d per round, %d rounds) with the cohort engine split over %d engines "
                    "on Ray actors (model.device = %s, %d CPU(s))", n_users, cfg.server.clients_per_round,
                    cfg.server.num_rounds, engines, cfg.model.device, cpus)
    with EngineGrid(client_app, nodes, flat, run_id=uuid.uuid4().int % 2**62, engines=engines, cpus=cpus,
                    on_devices=on_devices) as grid:
        if on_grid is not None:
            on_grid(grid)
        run_federation(grid, cfg, progress=progress)
    if not on_devices:
        logger.info("Cohort engine: %d cohorts trained in %.1f s of engine time", grid.cohorts, grid.engine_seconds)


def _run_flower(flat: dict[str, Any], cfg: Config, n_users: int, cpus: int, progress) -> None:
    """Flower's Simulation Engine (Ray): one simulated SuperNode per user."""
    from flwr.simulation import run_simulation

    os.environ[CONFIG_ENV] = json.dumps(flat)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FEDPERSONA_TORCH_THREADS", str(cpus))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
    }
    from fedpersona.client.app import app as client_app
    from fedpersona.server.app import make_app

    server_app = make_app(progress)
    _init_ray(cpus)
    logger.info("Simulating %d users (%d per round, %d rounds) on Flower's Simulation Engine (Ray, %d CPU(s))",
                n_users, cfg.server.clients_per_round, cfg.server.num_rounds, cpus)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_users,
                       backend_config=backend_config)
    finally:
        os.environ.pop(CONFIG_ENV, None)


def _init_ray(cpus: int) -> None:
    """Start Ray as Flower's backend would, but on the loopback interface only, plus a setup hook giving
    each worker one log handler.

    (Flower starts Ray only when it is not running yet, and then on every interface: Ray's cluster mode
    on Linux. :func:`fedpersona.simulations.engine.shards.start_ray` starts it in single-machine mode, every Ray
    process bound to 127.0.0.1. :func:`fedpersona.output.configure_worker` removes the duplicate of every
    Flower line in the workers: see :mod:`fedpersona.output`.)
    """
    from fedpersona.simulations.engine.shards import start_ray

    start_ray(cpus)
