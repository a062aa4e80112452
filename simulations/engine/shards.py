"""Past one GPU: a round's cohort split over N cohort engines, one Ray actor each.

:class:`ShardedEngine` has the surface :class:`~fedpersona.simulations.engine.grid.EngineGrid` uses
(:meth:`pack`, :meth:`train_cohort`), so the grid, the devices and the server see nothing
different from one in-process :class:`~fedpersona.simulations.engine.CohortEngine`:

* **Actors.** ``engines`` Ray actors (:class:`ShardWorker`), each with a CohortEngine and a
  model of its own, built once from the run config when the actor starts (never per round).
  With ``model.device`` on CUDA each actor gets one GPU (``num_gpus=1``; Ray gives it its own
  ``CUDA_VISIBLE_DEVICES``); otherwise CPU actors with ``cpus // engines`` CPUs each (at least 1).
* **Shards.** A cohort's jobs are split by :func:`split_shards`, balanced by each job's
  expected trained tokens (:func:`job_cost`), and trained in parallel; the results come
  back in the jobs' original order, merged before the grid offers them to the devices.
* **Examples stay in the actor.** :meth:`ShardedEngine.pack` only wraps a device's cached
  examples in a handle; they travel to an actor the first time a job of that device is
  assigned to it, are packed there on the actor's device and kept, keyed by the handle.
  The split keeps a job on the actor that already holds its examples while that actor's
  load stays within the mean, so a device that returns is normally trained where its data is. When the grid
  drops a device's handle (its device cache evicts it), the actor drops the examples with
  the next call. Keeping them was chosen by measurement (docs/performance.md, "Past one GPU").
* **Randomness.** Every job draws its batches and noise from the device's own
  :class:`~fedpersona.privacy.noise.NoiseSource`. A secure source (the default) is pickled as "secure"
  only, and the actor seeds every step from its own ``os.urandom``. An injected (seeded,
  test) source travels with its generator state, and the state it reached in the actor is
  set back on the device's source, so that sharded and in-process training draw the same.
* **Failures.** Any failing shard makes :meth:`train_cohort` raise (the grid then trains
  that cohort sequentially, as on any engine failure); the actors forget the examples they
  hold, a dead actor is replaced by a new one.

Ray is started here when it is not running yet (no dashboard; a local start binds to the
loopback interface only; with ``$RAY_ADDRESS`` set it joins that cluster instead) and shut
down by :meth:`ShardedEngine.close` when this engine started it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedpersona.simulations.engine.jobs import ClientJob, ClientResult, check_sources

logger = logging.getLogger(__name__)


def check_engines(engines, clients_per_round: int) -> int:
    """``--engines``: a whole number from 1 to ``server.clients-per-round`` (each engine needs a client)."""
    if isinstance(engines, bool) or not isinstance(engines, int) or engines < 1:
        raise ValueError(f"engines (--engines) must be a whole number of at least 1. You passed: {engines!r}")
    if engines > clients_per_round:
        raise ValueError(
            f"engines (--engines) may not exceed server.clients-per-round = {clients_per_round}: each engine "
            f"trains a shard of a round's cohort, and a shard needs at least one client. You passed: {engines}"
        )
    return engines


# ---------------------------------------------------------------------------- the split
def job_cost(job: ClientJob, examples: int, tokens: int) -> float:
    """Expected trained tokens of a job: per phase, steps x sample rate x the client's tokens.

    (A step's compute is the tokens of its batch: ``min(1, batch_size / n)`` of the client's
    ``tokens`` in expectation, Poisson or uniform; for ``n <= batch_size`` it is all of them.)
    """
    return float(sum(ph.steps * min(1.0, ph.batch_size / max(1, examples)) * tokens for ph in job.phases))


def split_shards(costs: Sequence[float], shards: int,
                 holders: Sequence[int | None] | None = None) -> list[list[int]]:
    """Job indices per shard (each shard's in ascending order), balanced by ``costs``.

    First, in decreasing cost, a job whose examples a shard already holds (``holders[i]``)
    stays there while that shard's load stays within the mean load (total / shards); then
    the other jobs, in decreasing cost, each go to the least-loaded shard. Every shard's
    final load is at most the least-loaded shard's plus the largest cost (tested): a shard
    above that bound took no job of the second pass (it was the least loaded when it took
    one), so it is at most the mean, and then every shard would be below the mean.
    """
    if shards < 1:
        raise ValueError(f"split_shards needs at least 1 shard. You passed: {shards}")
    holders = list(holders) if holders is not None else [None] * len(costs)
    if len(holders) != len(costs):
        raise ValueError(f"split_shards: one holder per job. You passed: {len(holders)} for {len(costs)} jobs")
    mean = sum(costs) / shards * (1 + 1e-9)
    load = [0.0] * shards
    out: list[list[int]] = [[] for _ in range(shards)]
    rest = []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        h = holders[i]
        if h is not None and 0 <= h < shards and load[h] + costs[i] <= mean:
            load[h] += costs[i]
            out[h].append(i)
        else:
            rest.append(i)
    for i in rest:
        s = min(range(shards), key=lambda s: (load[s], s))
        load[s] += costs[i]
        out[s].append(i)
    return [sorted(ix) for ix in out]


# ---------------------------------------------------------------------------- seeded sources
def _seeded_sources(job: ClientJob) -> list:
    """The job's injected (seeded) noise sources, each once, in the order its phases first use them."""
    seen, out = set(), []
    for ph in job.phases:
        src = ph.noise_source
        if not src.secure and id(src) not in seen:
            seen.add(id(src))
            out.append(src)
    return out


# ---------------------------------------------------------------------------- Ray
def ray_runtime_env() -> dict:
    """Ray workers import this project as the launcher does, with one log handler each."""
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    return {"env_vars": {"PYTHONPATH": pythonpath}, "worker_process_setup_hook": "fedpersona.output.configure_worker"}


@contextlib.contextmanager
def _loopback():
    """Ray's single-machine mode during ``ray.init``: every Ray process binds to 127.0.0.1 only.

    (On Linux Ray otherwise binds its GCS, raylet and workers to every interface; its
    single-machine mode, the one it uses on macOS and Windows, takes the loopback address.)
    """
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"  # for the processes ray.init spawns
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this process
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved_env


def start_ray(cpus: int, *, gpus: int = 0) -> bool:
    """Start Ray for the engines' actors; False when Ray was already running (then it is left as it is).

    A local start: ``cpus`` CPUs, ``gpus`` GPUs, no dashboard, loopback only. With
    ``$RAY_ADDRESS`` set, this process joins that cluster (whose resources it then uses).
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = ray_runtime_env()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("Joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=True)
        return True
    with _loopback():
        ray.init(runtime_env=runtime_env, num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=True)
    logger.info("Started Ray on this machine (loopback only): %d CPU(s), %d GPU(s)", cpus, gpus)
    return True


# ---------------------------------------------------------------------------- the actor
class ShardWorker:
    """One engine of a sharded cohort (a Ray actor; also usable in-process).

    Holds a :class:`~fedpersona.simulations.engine.CohortEngine` with a model built once from the run
    config, and the packed examples of the devices whose jobs it trained, keyed by token.
    """

    def __init__(self, run_config: Mapping, *, device: str, threads: int | None = None,
                 method: str = "expanded") -> None:
        from fedpersona.config import load_config
        from fedpersona.simulations.engine import CohortEngine
        from fedpersona.simulations.engine.engine import engine_model

        if threads:
            torch.set_num_threads(threads)
        cfg = load_config(dict(run_config), env=False)
        self.engine = CohortEngine(engine_model(cfg), device=device, dtype=cfg.model.dtype, method=method)
        self.examples: dict[int, object] = {}

    def ready(self) -> str:
        return f"{self.engine.device} ({torch.get_num_threads()} thread(s), pid {os.getpid()})"

    def held(self) -> list[int]:
        return sorted(self.examples)

    def reset(self) -> None:
        self.examples.clear()

    def train(self, jobs: list[ClientJob], new: dict[int, list], drop: list[int],
              keep: bool = True) -> tuple[list[ClientResult], list[list[torch.Tensor]]]:
        """Train a shard. ``jobs[i].examples`` is a token: of ``new`` (examples sent with this call,
        packed here and kept when ``keep``) or of examples this actor holds. Returns the results
        and, per job, the states its seeded sources reached (in :func:`_seeded_sources` order)."""
        for token in drop:
            self.examples.pop(token, None)
        for token, examples in new.items():
            self.examples[token] = self.engine.pack(examples)
        try:
            missing = [j.examples for j in jobs if j.examples not in self.examples]
            if missing:
                raise RuntimeError(f"this shard holds no examples for token(s) {missing}")
            results = self.engine.train_cohort([replace(j, examples=self.examples[j.examples]) for j in jobs])
        finally:
            if not keep:
                for token in new:
                    self.examples.pop(token, None)
        return results, [[src.generator().get_state() for src in _seeded_sources(j)] for j in jobs]


# ---------------------------------------------------------------------------- the driver
@dataclass(eq=False)
class ShardExamples:
    """A device's cached examples as the sharded engine knows them (they live in an actor once sent)."""

    token: int
    examples: list
    tokens: int

    def __len__(self) -> int:
        return len(self.examples)

    def for_transfer(self) -> list:
        """The examples with their activations on the CPU (for the trip to an actor)."""
        from fedpersona.client.train import CachedExample

        return [e if e.hidden.device.type == "cpu" else CachedExample(e.hidden.detach().cpu(), e.labels)
                for e in self.examples]


class ShardedEngine:
    """``engines`` cohort engines on Ray actors behind the surface of one :class:`CohortEngine`."""

    def __init__(self, run_config: Mapping, engines: int, *, cpus: int | None = None, method: str = "expanded",
                 keep_examples: bool = True) -> None:
        import ray

        from fedpersona.config import load_config
        from fedpersona.devices import resolve_device

        cfg = load_config(dict(run_config), env=False)
        check_engines(engines, cfg.server.clients_per_round)
        self.run_config = dict(run_config)
        self.method = method
        self.keep_examples = keep_examples
        use_gpu = resolve_device(cfg.model.device).type == "cuda"
        cpus = max(1, cpus or os.cpu_count() or 1)
        if cpus < engines:
            logger.warning("%d engines on %d CPU(s): each engine's actor takes one CPU, they share the cores",
                           engines, cpus)
        # Ray counts CPUs as logical resources: at least one per actor, or the last actors would never start.
        self._owns_ray = start_ray(max(cpus, engines), gpus=torch.cuda.device_count() if use_gpu else 0)
        try:
            have = ray.cluster_resources()
            if have.get("CPU", 0) < engines:
                raise ValueError(f"engines (--engines) needs a CPU per engine's actor; Ray has "
                                 f"{int(have.get('CPU', 0))}. You passed: {engines}")
            if use_gpu and have.get("GPU", 0) < engines:
                raise ValueError(
                    f"engines (--engines) with model.device = {cfg.model.device!r} needs one GPU per engine; "
                    f"Ray has {int(have.get('GPU', 0))}. You passed: {engines}"
                )
            if use_gpu and cfg.model.device not in ("auto", "cuda"):
                logger.warning("model.device = %s: each engine runs on the one GPU Ray gives its actor",
                               cfg.model.device)
            self.cpus_each = max(1, int(have.get("CPU", cpus)) // engines)
            self._device = "cuda" if use_gpu else "cpu"
            self._actor_cls = ray.remote(num_cpus=self.cpus_each, num_gpus=1 if use_gpu else 0)(ShardWorker)
            self.actors = [self._new_actor() for _ in range(engines)]
        except BaseException:
            self.close()
            raise
        self._where: dict[int, int] = {}  # token -> the actor holding its examples
        self._drop: list[set[int]] = [set() for _ in range(engines)]  # tokens to drop with an actor's next call
        self._tokens = itertools.count()
        self.shards: list[list[int]] = []  # jobs per shard of the last cohort
        self.sent = 0  # examples sets sent to actors so far
        self.failures = 0
        logger.info("Sharded cohort engine: %d Ray actor(s) on %s, %d CPU(s) each", engines, self._device,
                    self.cpus_each)

    def _new_actor(self):
        return self._actor_cls.remote(self.run_config, device=self._device, threads=self.cpus_each,
                                      method=self.method)

    @property
    def engines(self) -> int:
        return len(self.actors)

    def wait_ready(self) -> list[str]:
        """Block until every actor has built its engine; what each runs on."""
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    # ------------------------------------------------------------ the CohortEngine surface
    def pack(self, examples: Sequence) -> ShardExamples:
        """A handle on a device's examples (sent to an actor when first needed there, kept there
        until this handle is dropped)."""
        if not examples:
            raise ValueError("A client needs at least one training example. You passed: 0 examples")
        handle = ShardExamples(next(self._tokens), list(examples), sum(int(e.hidden.shape[0]) for e in examples))
        weakref.finalize(handle, self._forget, handle.token)
        return handle

    def _forget(self, token: int) -> None:
        where = self._where.pop(token, None)
        if where is not None and where < len(self._drop):
            self._drop[where].add(token)

    def train_cohort(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        import ray

        if not jobs:
            return []
        check_sources(jobs)  # a seeded source shared by two jobs would be copied into two shards
        handles = [j.examples if isinstance(j.examples, ShardExamples) else self.pack(j.examples) for j in jobs]
        costs = [job_cost(j, len(h), h.tokens) for j, h in zip(jobs, handles)]
        shards = split_shards(costs, self.engines, [self._where.get(h.token) for h in handles])
        calls, moved = [], {}
        for a, idx in enumerate(shards):
            if not idx:
                continue
            new = {}
            for i in idx:
                token = handles[i].token
                if not self.keep_examples or self._where.get(token) != a:
                    new[token] = handles[i].for_transfer()
                    self._drop[a].discard(token)
                    moved[token] = a
            wire = [ClientJob(handles[i].token, _cpu(jobs[i].shared), _cpu(jobs[i].personal), jobs[i].phases,
                              client_id=jobs[i].client_id) for i in idx]
            drop, self._drop[a] = sorted(self._drop[a]), set()
            calls.append((a, idx, self.actors[a].train.remote(wire, new, drop, self.keep_examples)))
            self.sent += len(new)
        t0 = time.perf_counter()
        try:
            answers = ray.get([ref for _, _, ref in calls])
        except Exception as exc:
            self._recover(exc)
            raise
        out: list[ClientResult | None] = [None] * len(jobs)
        for (a, idx, _), (results, states) in zip(calls, answers):
            if len(results) != len(idx):
                self._recover(None)
                raise RuntimeError(f"engine {a} answered {len(results)} results for {len(idx)} jobs")
            for i, result, st in zip(idx, results, states):
                out[i] = result
                for src, state in zip(_seeded_sources(jobs[i]), st, strict=True):
                    src.generator().set_state(state)  # the device's own source continues where the actor left it
        if self.keep_examples:
            for token, a in moved.items():
                old = self._where.get(token)
                if old is not None and old != a:
                    self._drop[old].add(token)
                self._where[token] = a
        self.shards = shards
        logger.debug("sharded cohort: %s jobs per engine, %d example set(s) sent, %.2f s",
                     [len(s) for s in shards], len(moved), time.perf_counter() - t0)
        return out  # type: ignore[return-value]

    def _recover(self, exc: BaseException | None) -> None:
        """After a failed shard: no actor is assumed to hold anything; dead actors are replaced."""
        import ray
        from ray.exceptions import RayActorError

        self.failures += 1
        logger.warning("sharded cohort engine: a shard failed (%s: %s); the actors start over",
                       type(exc).__name__ if exc else "bad answer", exc)
        self._where.clear()
        self._drop = [set() for _ in self.actors]
        for a, actor in enumerate(self.actors):
            try:
                ray.get(actor.reset.remote())
            except RayActorError:
                logger.warning("engine %d's actor is gone; starting a new one", a)
                self.actors[a] = self._new_actor()

    def close(self) -> None:
        """Stop the actors; shut Ray down when this engine started it."""
        import ray

        for actor in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []
        self._where = {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in state.items()}
