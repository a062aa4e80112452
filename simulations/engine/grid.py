"""The cohort engine below the ServerApp: a Grid that trains a round's whole cohort in one engine call.

:class:`EngineGrid` is an :class:`~fedpersona.simulations.inprocess.InProcessGrid`: every message still
goes to the real ``ClientApp`` (its mods, the device's policy checks, secure-aggregation
masking, ledger and persistence), and the replies are the ClientApp's own. The devices a batch of
``train`` or ``evaluate`` messages addresses that are not in memory are built together first: their
examples' frozen lower blocks in one batched sweep across the users
(:func:`~fedpersona.client.device.prepare_users`), each device's activations saved with the commit of its
message. Before a batch of ``train`` messages is delivered, the grid

1. builds each addressed simulated device (the very :class:`~fedpersona.client.device.Device` objects
   the ClientApp's handlers use, :func:`fedpersona.client.app.cached_device`) and asks it to plan its
   round (:meth:`~fedpersona.client.device.Device.plan_round`: its policy, budget and delta checks; a
   device that refuses is skipped here and refuses again when its message is delivered),
2. trains every planned device in ONE :meth:`~fedpersona.simulations.engine.CohortEngine.train_cohort`
   (each job's batches and noise from the device's own :class:`~fedpersona.privacy.noise.NoiseSource`,
   the CSPRNG unless a test injected a seeded one),
3. offers each device its result (:meth:`~fedpersona.client.device.Device.offer_result`); the handler
   uses it only for exactly the plan it was trained for, and otherwise trains sequentially.

A batch of ``evaluate`` messages (the final evaluation) goes the same way: the grid builds the
addressed devices, runs their held-out passes (base, shared adapter alone, shared + head) in one
:meth:`~fedpersona.simulations.engine.CohortEngine.evaluate_cohort` call and offers each device its figures
(:meth:`~fedpersona.client.device.Device.offer_evaluation`, used only for exactly that shared adapter, head and
held-out split); a batch larger than the device cache is delivered in chunks of ``max_devices``.
Other message types (key advertisement, unmasking) pass straight through. The ServerApp, the
strategy, secure aggregation and the audit cannot tell which path trained or evaluated the
clients. The engine has a model of its own (the devices' model carries Opacus hooks), built
once per grid on ``model.device`` / ``model.dtype``; the clients' packed examples stay on that
device while their device is cached.

Past one GPU: ``engines=N`` (``fedpersona run --engines N``) splits each cohort over N
engines on Ray actors, one per GPU (:class:`~fedpersona.simulations.engine.shards.ShardedEngine`); their
results merge before any device sees them. ``engines=1`` (the default) is the in-process
engine, and no Ray is started.

Memory: at most ``max_devices`` devices stay cached (default: two cohorts,
:func:`fedpersona.client.app.limit_cached_devices`); the others live in their state folders only.

    with EngineGrid(client_app, {node_id: {"partition-id": i}}, flat, run_id=7) as grid:
        run_federation(grid, cfg)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack

from flwr.app import Message

from fedpersona.client import app as client_module
from fedpersona.client.device import (BudgetExhausted, Device, RoundPlan, load_pairs_for_node, prepare_users,
                                     state_digest)
from fedpersona.client.node_data import context_state_dir
from fedpersona.client.policy import PolicyViolation
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from fedpersona.model import adapted_model
from fedpersona.wire import unpack_shared
from fedpersona.simulations.engine.engine import engine_model
from fedpersona.simulations.engine.jobs import ClientJob, EvalJob, Phase, joint_phases
from fedpersona.simulations.inprocess import InProcessGrid

logger = logging.getLogger(__name__)

#: Examples per batch when a cohort's devices run their lower blocks together (across users, sorted by length).
_BUILD_BATCH = 64


class EngineGrid(InProcessGrid):
    """An in-process Grid whose ``train`` rounds run through one :class:`~fedpersona.simulations.engine.CohortEngine` call."""

    def __init__(self, app, nodes: Mapping[int, dict], run_config: Mapping, *, run_id: int,
                 max_devices: int | None = None, method: str = "expanded", engines: int = 1,
                 cpus: int | None = None, on_devices: bool = False) -> None:
        from fedpersona.simulations.engine.shards import check_engines

        super().__init__(app, nodes, run_config, run_id=run_id)
        self.cfg = load_config(dict(run_config), env=False)
        self._run_config = dict(run_config)
        self.engines = check_engines(engines, self.cfg.server.clients_per_round)
        self.cpus = cpus
        if max_devices is None:
            max_devices = max(2 * self.cfg.server.clients_per_round, 1)
        self.max_devices = max_devices
        self.method = method
        self.on_devices = on_devices  # every device trains its round itself (no engine is built)
        self._engine = None
        self._packed: OrderedDict[int, tuple[tuple, object]] = OrderedDict()
        self.cohorts = 0
        self.engine_seconds = 0.0
        self.eval_seconds = 0.0  # the final evaluation's batched held-out passes (evaluate_cohort)
        self.build_seconds = 0.0  # the cohorts' lower-block sweeps when their devices are built (prepare_users)
        self.evaluated = 0  # devices whose held-out figures the engine computed
        self.fallbacks = 0  # planned devices whose round the engine could not train (trained sequentially)
        self._head_fallback_logged = False

    def __enter__(self) -> "EngineGrid":
        if self.engines > 1:
            self.engine  # noqa: B018 - the actors build their engines while the first round is prepared
        super().__enter__()
        self._saved_limit = client_module._MAX_DEVICES
        client_module.limit_cached_devices(self.max_devices)
        return self

    def __exit__(self, *exc) -> None:
        client_module.release_devices(self.run_id)  # the run is over: its devices live in their stores only
        self._packed.clear()
        client_module.limit_cached_devices(self._saved_limit)
        if self._engine is not None and hasattr(self._engine, "close"):
            self._engine.close()  # the sharded engine's actors (and Ray, when it started it)
        super().__exit__(*exc)

    @property
    def engine(self):
        if self._engine is None and self.engines > 1:
            from fedpersona.simulations.engine.shards import ShardedEngine

            self._engine = ShardedEngine(self._run_config, self.engines, cpus=self.cpus, method=self.method)
        elif self._engine is None:
            from fedpersona.simulations.engine import CohortEngine

            self._engine = CohortEngine(engine_model(self.cfg), device=self.cfg.model.device,
                                        dtype=self.cfg.model.dtype, method=self.method)
        return self._engine

    # ------------------------------------------------------------------ Grid API
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for chunk in self._chunks(list(messages)):
            self._build_ahead(chunk)
            self._train_ahead(chunk)
            self._evaluate_ahead(chunk)
            ids.extend(super().push_messages(chunk))
        return ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         on_reply: Callable[[Message], None] | None = None) -> Iterable[Message]:
        replies: list[Message] = []
        for chunk in self._chunks(list(messages)):
            self._build_ahead(chunk)
            self._train_ahead(chunk)
            self._evaluate_ahead(chunk)
            replies.extend(super().send_and_receive(chunk, timeout=timeout, on_reply=on_reply))
        return replies

    def _chunks(self, messages: list[Message]) -> list[list[Message]]:
        """A batch of evaluate messages larger than the device cache, in chunks it holds; anything else whole."""
        if (len(messages) <= self.max_devices or self.on_devices
                or any(m.metadata.message_type != "evaluate" for m in messages)):
            return [messages]
        return [messages[i:i + self.max_devices] for i in range(0, len(messages), self.max_devices)]

    # ------------------------------------------------------------------ the cohort
    def device(self, node_id: int) -> Device:
        """The node's cached Device (built when not in memory)."""
        return client_module.cached_device(self._contexts[int(node_id)])

    def _build_ahead(self, messages: list[Message]) -> None:
        """Build the devices that train or evaluate messages address and that are not in memory, together: their lower
        blocks in one batched sweep (:func:`~fedpersona.client.device.prepare_users`) instead of a small forward
        pass per device. What each build saves (its activations) joins the commit of its message, as in
        :meth:`_train_ahead`. A device whose build fails here is left to its handler, which meets the same error."""
        live = client_module.cached_devices(self.run_id)
        nodes = [n for n in dict.fromkeys(int(m.metadata.dst_node_id) for m in messages
                                          if m.metadata.message_type in ("train", "evaluate"))
                 if n in self._contexts and n not in live]
        if len(nodes) < 2 or len(nodes) > self.max_devices:
            return  # (more than the cache holds: the first would be evicted before their messages arrive)
        contexts = [self._contexts[n] for n in nodes]
        cfg = load_config(contexts[0].run_config)  # as the ClientApp reads it (a simulation's nodes share it)
        entries, kept = [], []
        for ctx in contexts:
            try:
                user_id, pairs, state_dir = load_pairs_for_node(cfg, dict(ctx.node_config))
            except Exception as exc:  # noqa: BLE001 - the handler meets the same error and replies with it
                logger.debug("node %s not built ahead: %s: %s", ctx.node_id, type(exc).__name__, exc)
                continue
            entries.append((user_id, pairs, DeviceStore(state_dir)))
            kept.append(ctx)
        if len(entries) < 2:
            return
        model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device,
                              dtype=cfg.model.dtype)  # the devices' own model (cached per process)
        t0 = time.perf_counter()
        try:
            with ExitStack() as saves:
                for _, _, store in entries:
                    saves.enter_context(store.transaction(defer=True))
                prepared = prepare_users(model, cfg, entries, batch_size=_BUILD_BATCH, skip_failed=True)
        except Exception as exc:  # noqa: BLE001 - nothing saved: each device is built by its handler, alone
            logger.warning("the devices of a batch of %d could not be built together (%s: %s); each is built alone",
                           len(entries), type(exc).__name__, exc)
            return
        finally:
            self.build_seconds += time.perf_counter() - t0
        for ctx, (_, _, store), data in zip(kept, entries, prepared):
            if data is None:
                continue
            try:
                with store.transaction(defer=True):
                    client_module.cached_device(ctx, prepared=data)
            except Exception as exc:  # noqa: BLE001 - the handler builds it again and meets the same error
                logger.debug("node %s not built ahead: %s: %s", ctx.node_id, type(exc).__name__, exc)

    def _train_ahead(self, messages: list[Message]) -> None:
        if self.on_devices:
            return  # each train message reaches its ClientApp, whose device trains the round (fedpersona.client.train)
        planned: list[tuple[int, Device, RoundPlan]] = []
        n_train = sum(1 for m in messages if m.metadata.message_type == "train")
        if n_train and self.cfg.adapter.head != "lora":
            # The engine trains LoRA heads only: each device trains its round itself (fedpersona.client.train).
            if not self._head_fallback_logged:
                logger.warning("adapter.head = %r: the cohort engine trains LoRA heads only; every device trains its "
                               "round sequentially (fedpersona.client.train)", self.cfg.adapter.head)
                self._head_fallback_logged = True
            self.fallbacks += n_train
            return
        if n_train > self.max_devices:
            # Planned devices would be evicted before their messages arrive: train them one by one instead.
            logger.warning("a cohort of %d exceeds this grid's device cache (max_devices=%d): trained sequentially",
                           n_train, self.max_devices)
            self.fallbacks += n_train
            return
        for m in messages:
            if m.metadata.message_type != "train" or m.metadata.dst_node_id not in self._contexts:
                continue
            try:
                # What building and planning the device saves (its activations, profile, feedback bookkeeping)
                # joins the commit of its train message (client/store.py: a deferred transaction).
                with self._store(m.metadata.dst_node_id).transaction(defer=True):
                    device = self.device(m.metadata.dst_node_id)
                    shared = unpack_shared(m.content)
                    plan = device.plan_round(shared, server_round=int(m.content["config"]["server-round"]),
                                             log_refusal=False)
            except (PolicyViolation, BudgetExhausted):
                continue  # the handler refuses or declines when the message is delivered
            except Exception as exc:  # noqa: BLE001 - the handler meets the same error and replies with it
                logger.debug("node %s not planned: %s: %s", m.metadata.dst_node_id, type(exc).__name__, exc)
                continue
            planned.append((int(m.metadata.dst_node_id), device, plan))
        if not planned:
            return
        t0 = time.perf_counter()
        try:
            results = self.engine.train_cohort([self._job(n, d, p) for n, d, p in planned])
        except Exception:  # noqa: BLE001 - no result offered: every device trains its round itself
            logger.exception("the cohort engine failed on a cohort of %d; the devices train sequentially", len(planned))
            self.fallbacks += len(planned)
            return
        self.engine_seconds += time.perf_counter() - t0
        self.cohorts += 1
        for (_, device, plan), result in zip(planned, results):
            device.offer_result(plan, result)
        logger.debug("cohort engine: %d devices trained in %.2f s", len(planned), time.perf_counter() - t0)

    def _evaluate_ahead(self, messages: list[Message]) -> None:
        """The held-out passes of a batch of evaluate messages in one engine call; each device is offered its figures."""
        if self.on_devices or self.engines > 1 or self.cfg.adapter.head != "lora" or not any(
                m.metadata.message_type == "evaluate" for m in messages):
            return  # (the sharded engine too: there each device evaluates itself)
        jobs: list[EvalJob] = []
        owners: list[tuple[Device, str, str]] = []
        digests: dict[int, tuple[dict, str]] = {}
        for m in messages:
            if m.metadata.message_type != "evaluate" or m.metadata.dst_node_id not in self._contexts:
                continue
            try:
                device = self.device(m.metadata.dst_node_id)
                if not device.data.held_out:
                    continue
                key = id(m.content.array_records["shared"])  # one shared adapter for the whole batch: digest once
                if key not in digests:
                    shared = unpack_shared(m.content)
                    digests[key] = (shared, state_digest(shared))
                shared, shared_digest = digests[key]
                personal = device.personal_state()
            except Exception as exc:  # noqa: BLE001 - the handler meets the same error and replies with it
                logger.debug("node %s not evaluated ahead: %s: %s", m.metadata.dst_node_id, type(exc).__name__, exc)
                continue
            jobs.append(EvalJob(device.data.held_out, shared, personal, client_id=device.user_id))
            owners.append((device, shared_digest, state_digest(personal)))
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            figures = self.engine.evaluate_cohort(jobs)
        except Exception:  # noqa: BLE001 - nothing offered: every device evaluates itself
            logger.exception("the cohort engine failed to evaluate %d devices; they evaluate themselves", len(jobs))
            return
        self.eval_seconds += time.perf_counter() - t0
        self.evaluated += len(jobs)
        for (device, shared_digest, personal_digest), f in zip(owners, figures):
            device.offer_evaluation(shared_digest, personal_digest, f)
        logger.debug("cohort engine: held-out passes of %d devices in %.2f s", len(jobs), time.perf_counter() - t0)

    def _store(self, node_id: int) -> DeviceStore:
        c = self._contexts[int(node_id)]
        return DeviceStore(context_state_dir(c.run_id, c.node_id, c.run_config, c.node_config))

    def _job(self, node_id: int, device: Device, plan: RoundPlan) -> ClientJob:
        cfg = device.cfg
        p, c = cfg.privacy, cfg.client
        src = device.noise_source
        if device.joint:
            phases = joint_phases(steps=plan.steps, batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
                                  dp=p.enabled, noise_multiplier=plan.noise_multiplier,
                                  max_grad_norm=p.max_grad_norm, noise_source=src)
        else:
            # As the device's own passes (fedpersona.client.train): the shared pass with the head off, then the head,
            # both Poisson-sampled (the head's pass without noise unless privacy.personal-head = dp).
            phases = (
                Phase("shared", plan.steps, c.batch_size, c.lr, c.optimizer, p.enabled, plan.noise_multiplier,
                      p.max_grad_norm, src, "poisson", personal_off=True),
                Phase("personal", plan.head_steps, c.head_batch_size, c.head_lr, c.optimizer, device.head_dp,
                      plan.head_noise_multiplier, p.max_grad_norm, device.head_source(plan.server_round), "poisson"),
            )
        return ClientJob(self._examples(node_id, device), plan.shared, plan.personal, phases, client_id=device.user_id)

    def _examples(self, node_id: int, device: Device):
        """The device's training examples packed on the engine's device, kept while the device is cached."""
        train = device.data.train
        key = (id(device), tuple(map(id, train)))
        hit = self._packed.get(node_id)
        if hit is not None and hit[0] == key:
            self._packed.move_to_end(node_id)
            return hit[1]
        packed = self.engine.pack(train)
        self._packed[node_id] = (key, packed)
        live = client_module.cached_devices(self.run_id)
        for n in [n for n in self._packed if n not in live]:
            del self._packed[n]  # the device was evicted: so are its packed examples
        return packed
