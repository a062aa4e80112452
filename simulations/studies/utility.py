"""``fedpersona bench utility``: what the users get under the privacy guarantee.

One study, on the same users, splits and seeds for every row (the scenario's), written to
``results/<run.name>/utility.{json,csv,png}``:

* ``base``: the frozen model;
* ``central (pooled, no DP)``: the same adapters trained without DP on every user's
  training examples pooled: the upper bound of what the adapters learn from this data;
* ``federated, no DP``: the scenario with ``privacy.enabled = false`` (shared adapter
  alone, and personalized = shared + each device's head); its ``local-only`` row trains
  exactly what each device trained for itself, without federation and without DP;
* ``DP federated, eps=E``: the scenario at ``privacy.target-epsilon = E`` (record level,
  per user, the shipped unit); its ``local-only`` row: the same DP steps without
  federation (same epsilon);
* ``--vary KEY=V1,V2``: one more DP-federated row per value (at the largest epsilon):
  the levers, measured in the same table.

Columns: mean / median / worst-decile held-out loss (nats per target token), next-token
accuracy, the share of the non-private federated gain recovered
``(base - x) / (base - nonprivate_federated_personalized)``, the share of users better
than the base, and for personalized rows the share that personalization (the head)
helps and hurts against the same run's shared adapter, and that beat local-only.

Devices are the real :class:`fedpersona.client.device.Device` objects, driven in one process: the
server's cohort sampling and optimizer, each device's own ``train_round`` and
``final_evaluation``. The summed update is formed in the clear, with the secure
aggregation's per-client clip (``secagg.clip-norm`` on each device's update, weight 1) applied:
secure aggregation releases exactly this sum, up to its quantization, so utility is the same.

User attribution (voice, measured): for each user's held-out (cue, reply) pairs, the
loss under every user's personalized model (the common shared adapter + that user's
head); top-1 accuracy of the own model ranking first, against the 1/N chance (ties count
against the user).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpersona.client.device import ACTIVATIONS, HEAD_FILE, LEDGER, BudgetExhausted, Device, prepare_user
from fedpersona.client.node_data import slug
from fedpersona.client.store import DeviceStore
from fedpersona.client.train import evaluate, train_shared, trainer_for
from fedpersona.config import Config, load_config
from fedpersona.model import adapted_model
from fedpersona.secagg_wire import flatten, unflatten
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.secagg.crypto import SecureRNG
from fedpersona.privacy.secagg.settings import ddp_min_clients, ddp_user_epsilon, record_ddp, secagg_params
from fedpersona.server.federation import sample_cohort
from fedpersona.server.checkpoint import latest_checkpoint
from fedpersona.server.optim import ServerOptimizer
from fedpersona.server.run_report import distribution, plot_users
from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.simulations.population import User, population, simulated_devices
from fedpersona.simulations.sources import load_source

logger = logging.getLogger(__name__)

QUICK = {"server.num-rounds": 2, "data.max-users": 6, "server.clients-per-round": 3}
CENTRAL_STEPS, CENTRAL_BATCH, CENTRAL_LR = 80, 32, 3e-3


@dataclass
class FederatedRun:
    rows: list[dict]  # final_evaluation of every device, with "user-id"
    shared: dict[str, torch.Tensor]
    devices: list[Device]
    seconds: float
    declined: int
    aborted: int = 0  # rounds whose sum was not applied (too few contributors)
    update_norms: list[float] = field(default_factory=list)  # each release's ||update / max-examples|| before clipping


def _weighted_clipped(update: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """What the secure sum adds for a device: its update (weight 1), clipped to ``secagg.clip-norm``."""
    scaled = dict(update)
    if cfg.secagg.enabled:
        norm = math.sqrt(sum(float((u * u).sum()) for u in scaled.values()))
        if norm > cfg.secagg.clip_norm:
            scaled = {n: u * (cfg.secagg.clip_norm / norm) for n, u in scaled.items()}
    return scaled


def in_process(cfg: Config) -> bool:
    """Whether :func:`federate` drives this configuration itself (noise on each device, or none, with or
    without ``secagg.ddp``); any other noise placement runs through the real apps (:func:`federate_by_runner`)."""
    return getattr(cfg.privacy, "noise_on", "device") == "device"


def user_level_epsilon(ledger) -> float:
    """The user-level epsilon of a ledger's distributed-DP entries on the rounds' sums (the last is cumulative);
    0 without any. The final evaluation's entries (the same for every row) are not counted here."""
    from fedpersona.privacy.secagg.settings import DDP_MECHANISM

    entries = [e for e in ledger.user_level_entries if e["mechanism"].startswith(DDP_MECHANISM)]
    return float(entries[-1]["epsilon"]) if entries else 0.0


def federate(cfg: Config, users: list[User], state_root: Path) -> FederatedRun:
    """A federation of the real devices in this process; returns every device's final evaluation.

    The sum the server learns is formed here as secure aggregation releases it: each device's
    ``update / data.max-examples`` clipped to ``secagg.clip-norm``. With ``secagg.ddp`` each
    device's clipped update is quantized and gets its discrete Gaussian noise share exactly as the
    device does before masking (:meth:`fedpersona.privacy.secagg.quantize.Quantizer.quantize` with the run's
    :func:`~fedpersona.privacy.secagg.settings.secagg_params`), the integer sum is decoded, each contributing
    device records the round's user-level entry in its own ledger
    (:func:`~fedpersona.privacy.secagg.settings.record_ddp`, before the sum is used), and a round with fewer
    contributors than ``secagg.ddp-min-clients`` is not applied. Each row gets ``user-epsilon``: the
    device's user-level epsilon (0 without ``secagg.ddp``).
    """
    if not in_process(cfg):
        raise ValueError(f"federate drives noise on each device only; this config needs the real apps "
                         f"(federate_by_runner). You passed: privacy.noise-on={cfg.privacy.noise_on!r}")
    if state_root.exists():
        shutil.rmtree(state_root)
    t0 = time.perf_counter()
    # A non-private row is one the user asked the study for: the simulated devices' policy allows it
    # (the device still records such a release as epsilon = infinity).
    devices = simulated_devices(cfg, users, state_root, **{"policy.allow-no-dp": not cfg.privacy.enabled})
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    shared = model.initial_shared_state()
    opt = ServerOptimizer(cfg.server.optimizer, cfg.server.lr, momentum=cfg.server.momentum)
    ddp = cfg.secagg.enabled and cfg.secagg.ddp
    quantizer = secagg_params(cfg).quantizer if ddp else None
    rng = SecureRNG() if ddp else None
    declined, aborted = 0, 0
    norms: list[float] = []
    for server_round in range(1, cfg.server.num_rounds + 1):
        cohort = sample_cohort(list(range(len(devices))), cfg.server.clients_per_round, seed=cfg.run.seed,
                               server_round=server_round, sampling=cfg.server.sampling)
        total: dict[str, torch.Tensor] | None = None
        qsum: np.ndarray | None = None
        weight, contributors = 0.0, 0
        for i in cohort:
            dev = devices[i]
            try:
                update, metrics = dev.train_round(shared, server_round=server_round)
            except BudgetExhausted as exc:
                logger.info("declined: %s", exc)
                declined += 1
                continue
            w = metrics["weight"]  # 1 for every device: the mean over contributors
            if quantizer is not None:
                vec = flatten(update)
                norms.append(float(np.linalg.norm(vec)))
                q = quantizer.quantize(vec, rng)  # clipped, scaled, rounded, + this device's noise share
                qsum = q if qsum is None else qsum + q
                ledger = dev.load_ledger()
                record_ddp(ledger, cfg, dim=int(vec.size), round=server_round)
                dev.store.save_text(LEDGER, ledger.to_json())  # before the sum is used, as the device does
            else:
                norms.append(math.sqrt(sum(float(u.square().sum()) for u in update.values())))
                scaled = _weighted_clipped(update, cfg)
                total = scaled if total is None else {n: total[n] + scaled[n] for n in total}
            weight += w
            contributors += 1
        if qsum is not None:
            if contributors < ddp_min_clients(cfg):
                logger.warning("round %d: %d contributors < secagg.ddp-min-clients %d: not applied", server_round,
                               contributors, ddp_min_clients(cfg))
                aborted += 1
                continue
            total = unflatten(qsum.astype(np.float64) / quantizer.scale, shared)
        if total is not None and contributors >= cfg.server.min_clients and weight > 0:
            shared = opt.step(shared, {n: t / weight for n, t in total.items()})
        elif contributors:
            aborted += 1
    if cfg.client.head_at == "end" and cfg.client.head_steps > 0:  # as the ServerApp: every head, on the final adapter
        for dev in devices:
            dev.personalize(shared, run_id=0, server_round=cfg.server.num_rounds + 1)
    rows = []
    for dev in devices:
        row = dev.final_evaluation(shared)
        row["user-id"] = dev.user_id
        row["user-epsilon"] = user_level_epsilon(dev.load_ledger())
        rows.append(row)
    return FederatedRun(rows, shared, devices, time.perf_counter() - t0, declined, aborted=aborted,
                        update_norms=norms)


def federate_by_runner(cfg: Config, flat: dict[str, Any], users: list[User], state_root: Path, *,
                       device_policy: dict[str, Any] | None = None) -> FederatedRun:
    """The same study row through the real apps: :func:`fedpersona.simulations.runner.run` (the ServerApp's round
    loop, every message to the real ClientApp, secure aggregation as configured, ``--engine devices``).

    For a noise placement :func:`federate` does not drive itself (``privacy.noise-on = sum``: one secure
    sum per DP-SGD step), so the row is exactly what ``fedpersona run`` does. Each simulated device's
    lower-block activations are handed over from the study's prepared users (its store's
    ``lower-activations``, same key), so the lower blocks do not run again. The rows are the devices'
    own evaluation rows, read from their stores on this machine (:mod:`fedpersona.simulations.user_table`).
    """
    from fedpersona.simulations.partitions import simulated_state_dir
    from fedpersona.simulations.runner import run

    if state_root.exists():
        shutil.rmtree(state_root)
    t0 = time.perf_counter()
    overrides = {**flat, "run.state-dir": str(state_root / "state"), "run.results-dir": str(state_root / "results")}
    run_cfg = load_config(overrides, env=False)
    for u in users:
        src = DeviceStore(u.folder.parent.parent / "activations" / slug(u.user_id))
        blob = src.load_tensors(ACTIVATIONS) if src.exists(ACTIVATIONS) else None
        if blob is not None:
            DeviceStore(simulated_state_dir(run_cfg, u.user_id)).save_tensors(ACTIVATIONS, blob)
    policy = {"allow-no-dp": not cfg.privacy.enabled, **(device_policy or {})}
    metrics = run(None, overrides, engine="devices", device_policy=policy)
    final = metrics.get("final") or {}
    got = {r["user"]: r for r in final.get("users", [])}
    if metrics.get("failure_count") or len(got) != len(users):
        raise RuntimeError(f"the run through the apps failed for {len(users) - len(got)} of {len(users)} users "
                           f"({metrics.get('failure_count', 0)} failures): "
                           + "; ".join(f"{u}: {e}" for u, e in list((metrics.get("failed_users") or {}).items())[:3]))
    rows = []
    for u in users:
        row = {k: v for k, v in got[u.user_id].items() if k != "user"}
        row["user-id"] = u.user_id
        ledger_text = DeviceStore(simulated_state_dir(run_cfg, u.user_id)).load_text(LEDGER)
        row["user-epsilon"] = user_level_epsilon(PrivacyLedger.from_json(ledger_text)) if ledger_text else 0.0
        row.setdefault("epsilon", -1.0)
        rows.append(row)
    declined = sum(int(r.get("declined", 0) or 0) for r in metrics.get("rounds", []))
    return FederatedRun(rows, {}, [], time.perf_counter() - t0, declined)


def centralized(cfg: Config, users: list[User], *, steps: int, batch_size: int, lr: float, seed: int) -> list[dict]:
    """The same adapters trained without DP on all users' training examples pooled (the upper bound)."""
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    model.load_shared_state(model.initial_shared_state())
    model.load_personal_state(model.fresh_personal_state())
    pooled = [e for u in users for e in u.data.train]
    train_shared(trainer_for(model), pooled, steps=steps, batch_size=batch_size, lr=lr, optimizer="adam",
                 noise_multiplier=0.0, max_grad_norm=1.0, dp=False, seed=seed)
    rows = []
    for u in users:
        r = evaluate(model, u.data.held_out)
        rows.append({"user-id": u.user_id, "loss": r["loss"], "accuracy": r["accuracy"]})
    model.load_shared_state(model.initial_shared_state())
    return rows


def attribution(run: FederatedRun) -> dict[str, Any]:
    """Does each user's own personalized model rank the user's held-out replies above the others' models?"""
    devices = run.devices
    model = devices[0].model
    heads = [dev.store.load_tensors(HEAD_FILE) for dev in devices]
    return attribution_of(model, run.shared, heads, [dev.data.held_out for dev in devices],
                          [dev.user_id for dev in devices])


def attribution_of(model, shared: dict[str, torch.Tensor], heads: list, held_out: list, user_ids: list[str],
                   progress=None) -> dict[str, Any]:
    """User attribution: user u's held-out replies scored (mean loss) by every user's model, the shared
    adapter + that user's head (a fresh head where there is none); u's rank is 1 + the number of other
    models that score them at least as well as u's own. Top-1 against the 1/N chance."""
    model.load_shared_state(shared)
    n = len(user_ids)
    losses = [[0.0] * n for _ in range(n)]
    for m, head in enumerate(heads):
        model.load_personal_state(head if head is not None else model.fresh_personal_state())
        for u in range(n):
            losses[u][m] = evaluate(model, held_out[u])["loss"]
        if progress is not None:
            progress(m + 1, n)
    ranks = []
    for u in range(n):
        own = losses[u][u]
        ranks.append(1 + sum(1 for m in range(n) if m != u and losses[u][m] <= own))
    top1 = sum(1 for r in ranks if r == 1) / n
    return {"top1": top1, "chance": 1.0 / n, "ratio_to_chance": top1 * n, "mean_rank": statistics.fmean(ranks),
            "ranks": dict(zip(user_ids, ranks))}


def finished_run_attribution(scenario: str | None = "demo", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """User attribution of a finished ``fedpersona run``: its newest checkpoint and every simulated user's head.

    Writes ``results/<run.name>/attribution.json``. The users' held-out examples are prepared again
    from the scenario's source and split (the same seeded split as the run's)."""
    from fedpersona.simulations.runner import resolve  # Flower is loaded only where a scenario is resolved

    _, cfg = resolve(scenario, dict(overrides or {}))
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ValueError(f"No checkpoint in {run_dir / 'checkpoints'}: run `fedpersona run {scenario or ''}` first")
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    users = load_source(cfg.data, cfg.run.seed)
    held_out, heads = [], []
    for i, u in enumerate(users, 1):
        store = DeviceStore(simulated_state_dir(cfg, u.user_id))
        heads.append(store.load_tensors(HEAD_FILE))
        held_out.append(prepare_user(model, cfg, u.user_id, [(e.cue, e.reply) for e in u.examples],
                                     store=store).held_out)
        logger.info("prepared %d/%d users", i, len(users))
    result = attribution_of(model, ckpt[1], heads, held_out, [u.user_id for u in users],
                            progress=lambda m, n: logger.info("scored with %d/%d heads", m, n))
    result.update(run=cfg.run.name, round=ckpt[0], without_head=sum(h is None for h in heads))
    (run_dir / "attribution.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------------- rows
def _row(name: str, losses: list[float], accs: list[float], **extra) -> dict[str, Any]:
    d = distribution(losses)
    return {"row": name, "mean": d["mean"], "median": d["median"], "worst_decile": d["worst_decile"],
            "accuracy": statistics.fmean(accs) if accs else math.nan, "users": d["n"], **extra}


def _eps(values) -> float:
    """The largest epsilon spent (-1 in a device's row means infinite: trained without DP)."""
    vals = list(values)
    return math.inf if any(v < 0 for v in vals) else max(vals, default=0.0)


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def rows_of_run(label: str, run: FederatedRun, base: dict[str, float],
                local_nodp: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The run's shared / personalized / local-only rows. ``local_nodp``: each user's local-only loss
    without DP (the non-private run's), the comparator that needs no guarantee at all (it never leaves
    the device): ``beats_local_nodp`` is the share of users whose personalized model beats it."""
    rows = run.rows
    b = [base[r["user-id"]] for r in rows]
    shared = [r["shared-loss"] for r in rows]
    personal = [r["personal-loss"] for r in rows]
    has_local = "local-loss" in rows[0]
    out = [
        _row(f"{label}: shared", shared, [r["shared-accuracy"] for r in rows],
             better_than_base=_share([x < y for x, y in zip(shared, b)])),
        _row(f"{label}: personalized", personal, [r["personal-accuracy"] for r in rows],
             better_than_base=_share([x < y for x, y in zip(personal, b)]),
             personalization_helps=_share([p < s for p, s in zip(personal, shared)]),
             personalization_hurts=_share([p > s for p, s in zip(personal, shared)]),
             beats_local=_share([r["personal-loss"] < r["local-loss"] for r in rows]) if has_local else None,
             beats_local_nodp=(_share([r["personal-loss"] < local_nodp[r["user-id"]] for r in rows])
                               if local_nodp else None),
             epsilon=_eps(r["epsilon"] for r in rows), user_epsilon=max((r.get("user-epsilon", 0.0) for r in rows),
                                                                       default=0.0),
             seconds=run.seconds, declined=run.declined),
    ]
    if has_local:
        local = [r["local-loss"] for r in rows]
        out.append(_row(f"{label}: local-only", local, [r["local-accuracy"] for r in rows],
                        better_than_base=_share([x < y for x, y in zip(local, b)]),
                        epsilon=_eps(r["local-epsilon"] for r in rows)))
    return out


def _vary_values(spec: str) -> tuple[str, list[Any]]:
    from fedpersona.config import parse_override

    key, _, values = spec.partition("=")
    if not key or not values:
        raise ValueError(f"--vary must look like KEY=V1,V2. You passed: {spec!r}")
    return key.strip(), [parse_override(f"{key}={v}")[1] for v in values.split(",") if v.strip()]


# ------------------------------------------------------------------------------ the study's rows
#: The noise-on-the-sum mechanism's config keys (one DP-SGD step = one secure sum over the cohort).
NOISE_ON_KEY = "privacy.noise-on"
HONEST_KEY = "privacy.honest-contributors"
#: Row kinds, in the order the study runs them (``--rows`` picks some).
KINDS = ("nodp", "device", "sum", "ddp")


@dataclass(frozen=True)
class RowSpec:
    """One federated configuration of the study: config overrides on the scenario, and the unit of its epsilon."""

    label: str
    slug: str
    kind: str  # one of KINDS
    overrides: dict
    unit: str  # "record", "user" or "none"


def sum_contributors(cohort: int) -> list[int]:
    """t of the noise-on-the-sum rows: 3, half the cohort and the whole cohort (each at most the cohort)."""
    return sorted({min(cohort, 3), max(1, cohort // 2), cohort})


def shared_dim(cfg: Config) -> int:
    """Coordinates of the shared adapter (the length of the vector a device masks)."""
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    return sum(t.numel() for t in model.initial_shared_state().values())


def max_participations(cfg: Config, n_users: int) -> int:
    """The most rounds one device can take part in: ``ceil(rounds * cohort / users)`` with balanced sampling
    (every user once before any user twice), every round with uniform sampling."""
    r, k = cfg.server.num_rounds, min(cfg.server.clients_per_round, n_users)
    return math.ceil(r * k / n_users) if cfg.server.sampling == "balanced" else r


def ddp_noise_for(cfg: Config, *, epsilon: float, rounds: int, dim: int, tol: float = 1e-3) -> float:
    """The smallest ``secagg.ddp-noise-multiplier`` whose user-level epsilon over ``rounds`` sums of ``dim``
    coordinates stays within ``epsilon`` (at ``secagg.ddp-delta``, with ``secagg.ddp-min-clients`` honest devices:
    :func:`fedpersona.privacy.secagg.settings.ddp_user_epsilon`). Bisection on a log scale."""
    import dataclasses

    def eps_at(z: float) -> float:
        c = dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, ddp=True, ddp_noise_multiplier=z))
        try:
            return ddp_user_epsilon(c, dim=dim, rounds=rounds)
        except ValueError:  # noise below the quantizer's floor at any scale: no guarantee to speak of
            return math.inf

    lo, hi = 0.05, 0.05
    while eps_at(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no secagg.ddp-noise-multiplier below 1e4 reaches user-level epsilon {epsilon} over "
                             f"{rounds} rounds. You passed: epsilon={epsilon!r}")
    if hi == 0.05:
        return hi
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps_at(mid) <= epsilon else (mid, hi)
    return hi


def study_rows(cfg: Config, epsilons: tuple[float, ...], n_users: int, *,
               kinds: tuple[str, ...] = KINDS, contributors: tuple[int, ...] | None = None) -> list[RowSpec]:
    """The federated configurations of the study on ``cfg`` (the scenario), in running order.

    * ``nodp``: ``privacy.enabled = false`` (its local-only row: each device alone, without DP);
    * ``device``: record-level DP-SGD with the noise added on each device (today's mechanism), one row per epsilon;
    * ``sum``: record-level DP with the noise once on the secure sum, ``privacy.noise-on = sum``, at
      ``privacy.honest-contributors`` t = 3, K/2 and K (:func:`sum_contributors`; ``contributors`` picks other
      values, each between 1 and the cohort K), at the largest epsilon;
    * ``ddp``: user-level DP, ``secagg.ddp``: each device's whole update clipped, local training without
      noise, the distributed discrete Gaussian on the sum, with ``secagg.ddp-min-clients`` = K/2 and the
      noise multiplier for a user-level epsilon equal to the largest epsilon over the rounds a device can
      take part in (:func:`max_participations`), at ``secagg.ddp-delta`` = ``privacy.delta``.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"--rows must name some of {KINDS}. You passed: {','.join(kinds)}")
    eps = max(epsilons)
    k = min(cfg.server.clients_per_round, n_users)
    if contributors is not None:
        wrong = [t for t in contributors if not 1 <= t <= k]
        if wrong or not contributors:
            raise ValueError(f"--contributors must be integers between 1 and the cohort ({k}). "
                             f"You passed: {','.join(map(str, contributors))}")
    rows: list[RowSpec] = []
    if "nodp" in kinds:
        rows.append(RowSpec("federated, no DP", "nodp", "nodp", {"privacy.enabled": False}, "none"))
    if "device" in kinds:
        for e in sorted(epsilons):
            rows.append(RowSpec(f"DP on each device, eps={e:g}", f"device-eps{e:g}", "device",
                                {"privacy.enabled": True, "privacy.target-epsilon": float(e)}, "record"))
    if "sum" in kinds:
        for t in sorted(set(contributors)) if contributors is not None else sum_contributors(k):
            rows.append(RowSpec(f"DP on the sum, t={t}, eps={eps:g}", f"sum-t{t}-eps{eps:g}", "sum",
                                {"privacy.enabled": True, "privacy.target-epsilon": float(eps), NOISE_ON_KEY: "sum",
                                 HONEST_KEY: t}, "record"))
    if "ddp" in kinds:
        t = max(2, k // 2)
        ddp = {"privacy.enabled": False, "secagg.enabled": True, "secagg.ddp": True, "secagg.ddp-min-clients": t,
               "secagg.ddp-delta": cfg.privacy.delta, "secagg.scale": 0.0}
        import dataclasses

        probe = dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, enabled=True, ddp=True, ddp_min_clients=t,
                                                                    ddp_delta=cfg.privacy.delta, scale=0.0),
                                    privacy=dataclasses.replace(cfg.privacy, enabled=False))
        z = ddp_noise_for(probe, epsilon=eps, rounds=max_participations(cfg, n_users), dim=shared_dim(cfg))
        ddp["secagg.ddp-noise-multiplier"] = z
        rows.append(RowSpec(f"user-level DDP, t={t}, eps={eps:g}", f"ddp-eps{eps:g}", "ddp", ddp, "user"))
    return rows


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _load_cached(path: Path, digest: str) -> dict | None:
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("digest") == digest else None


def study(scenario: str | None = "demo", overrides: dict[str, Any] | None = None, *,
          epsilons: tuple[float, ...] = (1.0, 4.0, 8.0), quick: bool = False, vary: list[str] | None = None,
          vary_row: str = "device", attribution_users: bool | None = None, central_steps: int | None = None,
          rows: tuple[str, ...] = KINDS, resume: bool = False,
          device_policy: dict[str, Any] | None = None,
          contributors: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run the whole study; returns (and writes, after every row) the result document.

    ``rows``: the kinds of federated rows to run (:data:`KINDS`), in that order; the pooled upper bound
    runs after them (``central_steps = 0`` leaves it out). A row whose config keys this code
    does not know (the ``sum`` rows before the noise-on-the-sum mechanism exists) is listed as skipped
    with the reason. ``vary`` (``KEY=V1,V2``): one more row per value on top of the row kind
    ``vary_row`` (its largest-epsilon row; ``sum``: t = K/2). ``resume``: reuse each row (base,
    pooled, every federated row) already measured under ``results/<run.name>/utility-runs`` for the
    very same configuration and users. ``central_steps``: the pooled upper bound's Adam steps of 32
    (default: at least 80, and one pass over the pooled training examples). ``attribution_users``:
    user attribution for the non-private and the largest-epsilon per-device rows (default: with at most
    40 users; it scores every user's held-out replies with every user's model). ``device_policy``:
    ``policy.*`` keys of the devices of rows that run through the real apps (:func:`federate_by_runner`).
    ``contributors``: the t of the ``sum`` rows (default :func:`sum_contributors`).
    """
    from fedpersona.simulations.runner import resolve

    flat, cfg = resolve(scenario, dict(overrides or {}))
    if quick:  # fewer users and rounds, same semantics
        flat["server.num-rounds"] = min(cfg.server.num_rounds, QUICK["server.num-rounds"])
        flat["data.max-users"] = min(cfg.data.max_users, QUICK["data.max-users"])
        k = min(cfg.server.clients_per_round, QUICK["server.clients-per-round"], flat["data.max-users"])
        flat["server.clients-per-round"], flat["server.min-clients"] = k, min(cfg.server.min_clients, k)
        if cfg.secagg.enabled:
            flat["secagg.min-contributors"] = min(cfg.secagg.min_contributors, k)
    flat["eval.per-round"] = False
    flat["eval.local-baseline"] = True
    base_cfg = load_config(flat, env=False)
    if not epsilons:
        raise ValueError("--epsilons needs at least one value")
    run_dir = Path(base_cfg.run.results_dir) / base_cfg.run.name
    state_root = Path(base_cfg.run.state_dir) / f"{base_cfg.run.name}-utility"
    cache_dir = run_dir / "utility-runs"
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    users = population(base_cfg, state_root)
    user_ids = [u.user_id for u in users]
    if attribution_users is None:
        attribution_users = len(users) <= 40
    model = adapted_model(base_cfg.model.path, base_cfg.adapter, base_cfg.run.seed,
                          device=base_cfg.model.device, dtype=base_cfg.model.dtype)
    # Base: the frozen model on each user's held-out split.
    data_key = {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "data", "adapter", "run")
                and k not in ("run.results-dir", "run.state-dir")}
    base_digest = _digest({"base": data_key, "users": user_ids})
    cached = _load_cached(cache_dir / "base.json", base_digest) if resume else None
    if cached is None:
        base, base_acc = {}, {}
        for u in users:
            with model.adapters_disabled():
                r = evaluate(model, u.data.held_out)
            base[u.user_id], base_acc[u.user_id] = r["loss"], r["accuracy"]
        (cache_dir / "base.json").write_text(json.dumps({"digest": base_digest, "loss": base, "accuracy": base_acc}))
    else:
        base, base_acc = cached["loss"], cached["accuracy"]
    base_row = _row("base", [base[u] for u in user_ids], [base_acc[u] for u in user_ids])
    pooled_n = sum(len(u.data.train) for u in users)
    steps = central_steps if central_steps is not None else (
        4 if quick else max(CENTRAL_STEPS, math.ceil(pooled_n / CENTRAL_BATCH)))
    order = {k: i for i, k in enumerate(rows)}
    specs = sorted(study_rows(base_cfg, epsilons, len(users), kinds=tuple(rows),
                                      contributors=contributors), key=lambda r: order[r.kind])
    varied = []
    for spec_text in vary or []:
        key, values = _vary_values(spec_text)
        on = [s for s in specs if s.kind == vary_row] or study_rows(base_cfg, epsilons, len(users), kinds=(vary_row,),
                                                                         contributors=contributors)
        target = on[len(on) // 2] if vary_row == "sum" else on[-1]
        for v in values:
            label = f"{target.label}, {key}={v}"
            specs.append(RowSpec(label, slug(f"{target.slug}-{key}-{v}"), target.kind, {**target.overrides, key: v},
                                 target.unit))
            varied.append({"key": key, "value": v, "label": label, "on": target.label})
    runs: dict[str, FederatedRun] = {}
    per_user: dict[str, list[dict]] = {}
    entries: list[tuple[RowSpec, FederatedRun | str]] = []  # each row: its run, or why it has none
    pooled: dict[str, Any] = {}
    result: dict[str, Any] = {
        "scenario": scenario, "config": flat, "epsilons": sorted(epsilons), "quick": quick, "table": [],
        "summary": [], "varied": varied, "users": user_ids, "base_per_user": base, "per_user": per_user,
        "central_steps": steps, "pooled_examples": pooled_n, "rows_asked": list(rows),
    }

    def publish() -> None:
        """Rebuild the tables from every row so far and write them (a long study leaves results as it goes)."""
        local_nodp = next(({r["user-id"]: r["local-loss"] for r in run.rows} for spec, run in entries
                           if spec.kind == "nodp" and not isinstance(run, str) and "local-loss" in run.rows[0]), None)
        table = [base_row]
        if pooled:
            table.append(_row("central (pooled, no DP)", [r["loss"] for r in pooled["rows"]],
                              [r["accuracy"] for r in pooled["rows"]],
                              better_than_base=_share([r["loss"] < base[r["user-id"]] for r in pooled["rows"]]),
                              seconds=pooled["seconds"]))
        summary = []
        for spec, run in entries:
            if isinstance(run, str):
                summary.append({"row": spec.label, "kind": spec.kind, "unit": spec.unit, "status": run})
                continue
            part = rows_of_run(spec.label, run, base, local_nodp)
            table.extend(part)
            summary.append(_summary_of(spec, part, run))
        result["table"], result["summary"] = table, summary
        _finish(result, table, t0)
        result["files"] = write_outputs(run_dir, result)

    for spec in specs:
        try:
            cfg = load_config({**flat, **spec.overrides}, env=False)
        except ValueError as exc:
            why = f"config refused: {exc}"
            logger.warning("utility study: %s skipped: %s", spec.label, why)
            entries.append((spec, f"skipped: {why}"))
            continue
        digest = _digest({"row": {**flat, **spec.overrides}, "users": user_ids})
        cache_file = cache_dir / f"{spec.slug}.json"
        cached = _load_cached(cache_file, digest) if resume else None
        if cached is not None:
            logger.info("utility study: %s reused from %s", spec.label, cache_file)
            run = FederatedRun(cached["rows"], {}, [], cached["seconds"], cached["declined"],
                               aborted=cached.get("aborted", 0), update_norms=cached.get("update_norms", []))
        else:
            logger.info("utility study: %s", spec.label)
            try:
                if in_process(cfg):
                    run = federate(cfg, users, state_root / "runs" / spec.slug)
                else:
                    run = federate_by_runner(cfg, {**flat, **spec.overrides}, users, state_root / "runs" / spec.slug,
                                             device_policy=device_policy)
            except Exception as exc:  # a long study goes on with its other rows; the reason is in the table
                logger.exception("utility study: %s failed", spec.label)
                entries.append((spec, f"failed: {type(exc).__name__}: {exc}"))
                continue
            cache_file.write_text(json.dumps(_finite({"digest": digest, "label": spec.label, "rows": run.rows,
                                                      "seconds": run.seconds, "declined": run.declined,
                                                      "aborted": run.aborted, "update_norms": run.update_norms})))
        runs[spec.label] = run
        per_user[spec.label] = run.rows
        entries.append((spec, run))
        publish()
    # The upper bound, last (the federated rows come first on a slow machine): the same adapters without DP
    # on every user's training examples pooled. --central-steps 0 leaves it out.
    if steps > 0:
        pooled_digest = _digest({"pooled": data_key, "users": user_ids, "steps": steps, "batch": CENTRAL_BATCH,
                                 "lr": CENTRAL_LR})
        cached = _load_cached(cache_dir / "pooled.json", pooled_digest) if resume else None
        if cached is None:
            tc = time.perf_counter()
            central = centralized(base_cfg, users, steps=steps, batch_size=CENTRAL_BATCH, lr=CENTRAL_LR,
                                  seed=base_cfg.run.seed)
            cached = {"digest": pooled_digest, "rows": central, "seconds": time.perf_counter() - tc}
            (cache_dir / "pooled.json").write_text(json.dumps(cached))
        pooled.update(cached)
    if attribution_users:
        result["attribution"] = {}
        for spec in specs:
            run = runs.get(spec.label)
            if run is not None and run.devices and (spec.kind == "nodp" or spec.slug == f"device-eps{max(epsilons):g}"):
                result["attribution"][spec.label] = attribution(run)
    publish()
    return result


def _summary_of(spec: RowSpec, part: list[dict], run: FederatedRun) -> dict[str, Any]:
    by = {r["row"].rsplit(": ", 1)[1]: r for r in part}
    p = by["personalized"]
    norms = sorted(run.update_norms)
    return {"row": spec.label, "kind": spec.kind, "unit": spec.unit, "status": "ok",
            "shared": by["shared"]["mean"], "personalized": p["mean"],
            "local": by["local-only"]["mean"] if "local-only" in by else None,
            "shared_better_than_base": by["shared"]["better_than_base"], "beats_local": p.get("beats_local"),
            "beats_local_nodp": p.get("beats_local_nodp"),
            "epsilon": p["user_epsilon"] if spec.unit == "user" else p["epsilon"],
            "local_epsilon": by["local-only"].get("epsilon") if "local-only" in by else None,
            "seconds": run.seconds, "declined": run.declined, "aborted": run.aborted,
            "update_norm_median": norms[len(norms) // 2] if norms else None}


def _finish(result: dict[str, Any], table: list[dict], t0: float) -> None:
    """Gains over base and the share of the pooled (non-private, central) gain each row recovers."""
    b = table[0]["mean"]
    pooled = next((r["mean"] for r in table if r["row"] == "central (pooled, no DP)"), None)
    ok = pooled is not None and b != pooled
    for r in table:
        r["gain"] = (b - r["mean"]) / b
        r["recovered"] = (b - r["mean"]) / (b - pooled) if ok else math.nan
    for s in result["summary"]:
        if s.get("status") != "ok":
            continue
        for part in ("shared", "personalized", "local"):
            v = s.get(part)
            s[f"gain_{part}"] = (b - v) / b if v is not None else None
            s[f"recovered_{part}"] = (b - v) / (b - pooled) if v is not None and ok else None
    result["base_mean"], result["pooled_mean"] = b, pooled
    result["seconds"] = time.perf_counter() - t0


# -------------------------------------------------------------------------------- outputs
COLUMNS = ("row", "mean", "median", "worst_decile", "accuracy", "gain", "recovered", "better_than_base",
           "personalization_helps", "personalization_hurts", "beats_local", "beats_local_nodp", "epsilon",
           "user_epsilon", "seconds")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    return str(v)


def format_table(table: list[dict]) -> str:
    """Every row of the study (base, pooled, and each run's shared / personalized / local-only)."""
    head = (f"{'':48s} {'mean':>6s} {'median':>6s} {'worst10':>7s} {'acc':>6s} {'gain':>6s} {'recov':>6s} "
            f"{'>base':>6s} {'helps':>6s} {'hurts':>6s} {'>local':>6s} {'>loc0':>6s} {'eps':>6s}")
    lines = [head]
    for r in table:
        lines.append(
            f"{r['row'][:48]:48s} {_fmt(r['mean']):>6s} {_fmt(r['median']):>6s} {_fmt(r['worst_decile']):>7s} "
            f"{_fmt(r['accuracy']):>6s} {_fmt(r.get('gain'), True):>6s} {_fmt(r.get('recovered'), True):>6s} "
            f"{_fmt(r.get('better_than_base'), True):>6s} {_fmt(r.get('personalization_helps'), True):>6s} "
            f"{_fmt(r.get('personalization_hurts'), True):>6s} {_fmt(r.get('beats_local'), True):>6s} "
            f"{_fmt(r.get('beats_local_nodp'), True):>6s} {_fmt(r.get('epsilon')):>6s}"
        )
    return "\n".join(lines)


def _eps_text(s: dict) -> str:
    if s["unit"] == "none":
        return "- (no DP)"
    e = s.get("epsilon")
    return f"{_fmt(e)} per {s['unit']}" if e is not None else "-"


def format_summary(result: dict[str, Any]) -> str:
    """One line per configuration, as a Markdown table (what ``docs/utility.md`` shows)."""
    b, pooled = result.get("base_mean"), result.get("pooled_mean")
    n = len(result["users"])
    lines = [
        "| configuration | shared | personalized | local-only | shared: share of the pooled gain | "
        "personalized < local-only (same run) | personalized < local-only without DP | epsilon | wall |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base | {_fmt(b)} | | | | | | | |",
    ]
    central = next((r for r in result["table"] if r["row"] == "central (pooled, no DP)"), None)
    if central is not None:
        lines.append(f"| pooled, no DP (upper bound, {result['central_steps']} Adam steps of {CENTRAL_BATCH}) | "
                     f"{_fmt(pooled)} ({_fmt(-central['gain'], True)}) | | | 100% | | | - | "
                     f"{_fmt_seconds(central.get('seconds'))} |")
    for s in result["summary"]:
        if s.get("status") != "ok":
            lines.append(f"| {s['row']} | {s['status']} | | | | | | | |")
            continue

        def cell(part: str) -> str:
            v = s.get(part)
            return "-" if v is None else f"{_fmt(v)} ({_fmt(-s[f'gain_{part}'], True)})"

        def users(share) -> str:
            return "-" if share is None else f"{round(share * n)} of {n}"

        lines.append(f"| {s['row']} | {cell('shared')} | {cell('personalized')} | {cell('local')} | "
                     f"{_fmt(s.get('recovered_shared'), True)} | {users(s.get('beats_local'))} | "
                     f"{users(s.get('beats_local_nodp'))} | {_eps_text(s)} | {_fmt_seconds(s.get('seconds'))} |")
    return "\n".join(lines)


def _fmt_seconds(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.0f} min"


def _finite(x: Any) -> Any:
    """JSON without NaN / Infinity: a non-finite number becomes null (epsilon null = no DP)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_outputs(run_dir: Path, result: dict[str, Any]) -> dict[str, str]:
    """``utility.{json,csv,md,png}`` and, per federated row, ``utility-users/<row>/users.png`` (per-user gains)."""
    files = {"json": run_dir / "utility.json", "csv": run_dir / "utility.csv", "md": run_dir / "utility.md"}
    files["json"].write_text(json.dumps(_finite(result), indent=1, default=str, allow_nan=False))
    with files["csv"].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in result["table"]:
            w.writerow({k: r.get(k) for k in COLUMNS})
    files["md"].write_text(format_summary(result) + "\n")
    png = plot(run_dir / "utility.png", result)
    if png is not None:
        files["png"] = png
        for label, rows in result.get("per_user", {}).items():
            folder = run_dir / "utility-users" / slug(label)
            folder.mkdir(parents=True, exist_ok=True)
            plot_users(folder, [{**r, "user": r["user-id"]} for r in rows])
    return {k: str(v) for k, v in files.items()}


def plot(path: Path, result: dict[str, Any]) -> Path | None:
    """Mean gain over base of each configuration: shared adapter, personalized, local-only; pooled as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no utility.png")
        return None
    done = [s for s in result["summary"] if s.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.55 * max(1, len(done))))
    ys = list(range(len(done)))
    h = 0.26
    for j, (part, color, name) in enumerate((("shared", "black", "shared adapter"),
                                             ("personalized", "tab:blue", "personalized (shared + own head)"),
                                             ("local", "tab:orange", "local-only (same training, alone)"))):
        vals = [100 * s[f"gain_{part}"] if s.get(f"gain_{part}") is not None else 0.0 for s in done]
        ax.barh([y + (j - 1) * h for y in ys], vals, h, color=color, alpha=0.85, label=name)
    if result.get("pooled_mean") is not None:
        ax.axvline(100 * (result["base_mean"] - result["pooled_mean"]) / result["base_mean"], color="tab:gray",
                   ls="-.", lw=1, label="pooled, no DP (upper bound of the shared adapter)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [s["row"] for s in done], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean held-out loss gain over the base model (%)")
    ax.set_title(f"{result.get('scenario') or 'scenario'}: {len(result['users'])} users", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(scenario: str | None, *, epsilons: str = "1,4,8", quick: bool = False, overrides: dict | None = None,
         vary: list[str] | None = None, vary_row: str = "device", rows: str | None = None, resume: bool = False,
         central_steps: int | None = None, device_policy: dict | None = None, contributors: str | None = None) -> int:
    try:
        eps = tuple(float(x) for x in epsilons.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--epsilons must be comma-separated numbers. You passed: {epsilons!r}") from None
    try:
        ts = tuple(int(x) for x in contributors.split(",") if x.strip()) if contributors else None
    except ValueError:
        raise ValueError(f"--contributors must be comma-separated integers. You passed: {contributors!r}") from None
    kinds = tuple(k.strip() for k in rows.split(",") if k.strip()) if rows else KINDS
    if vary_row not in KINDS:
        raise ValueError(f"--vary-row must be one of {KINDS}. You passed: {vary_row!r}")
    result = study(scenario, overrides, epsilons=eps, quick=quick, vary=vary, vary_row=vary_row, rows=kinds,
                   resume=resume, central_steps=central_steps, device_policy=device_policy, contributors=ts)
    print(format_table(result["table"]))
    print()
    print(format_summary(result))
    for label, a in result.get("attribution", {}).items():
        print(f"user attribution ({label}): top-1 {100 * a['top1']:.0f}% vs chance {100 * a['chance']:.0f}% "
              f"({a['ratio_to_chance']:.1f}x), mean rank {a['mean_rank']:.1f} of {len(a['ranks'])}")
    print(f"{len(result['users'])} users, {result['seconds']:.0f} s. Files: " + ", ".join(result["files"].values()))
    return 0
