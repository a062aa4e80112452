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

Devices are the real :class:`client.device.Device` objects, driven in one process: the
server's cohort sampling and optimizer, each device's own ``train_round`` and
``final_evaluation``. The summed update is formed in the clear, with the secure
aggregation's per-client clip (``secagg.clip-norm`` on ``weight * update``) applied:
secure aggregation releases exactly this sum, up to its quantization, so utility is the same.

User attribution (voice, measured): for each user's held-out (cue, reply) pairs, the
loss under every user's personalized model (the common shared adapter + that user's
head); top-1 accuracy of the own model ranking first, against the 1/N chance (ties count
against the user).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.device import HEAD_FILE, BudgetExhausted, Device, UserData, prepare_user
from client.node_data import slug
from client.store import DeviceStore
from client.train import evaluate, train_shared, trainer_for
from fedpersona.config import Config, load_config
from fedpersona.model import adapted_model
from server.federation import sample_cohort
from server.checkpoint import latest_checkpoint
from server.optim import ServerOptimizer
from server.run_report import distribution
from simulations.partitions import simulated_state_dir
from simulations.sources import load_source

logger = logging.getLogger(__name__)

QUICK = {"server.num-rounds": 2, "data.max-users": 6, "server.clients-per-round": 3}
CENTRAL_STEPS, CENTRAL_BATCH, CENTRAL_LR = 80, 32, 3e-3


@dataclass
class User:
    user_id: str
    folder: Path
    data: UserData


@dataclass
class FederatedRun:
    rows: list[dict]  # final_evaluation of every device, with "user-id"
    shared: dict[str, torch.Tensor]
    devices: list[Device]
    seconds: float
    declined: int


# ----------------------------------------------------------------------------- population
def population(cfg: Config, root: Path) -> list[User]:
    """The scenario's users, each with a data folder (deployment format) and its examples prepared once."""
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    users = load_source(cfg.data, cfg.run.seed)
    out = []
    for u in users:
        folder = root / "data" / slug(u.user_id)
        folder.mkdir(parents=True, exist_ok=True)
        pairs = [(e.cue, e.reply) for e in u.examples]
        (folder / "lines.jsonl").write_text("".join(json.dumps({"cue": c, "reply": r}) + "\n" for c, r in pairs))
        out.append(User(u.user_id, folder, prepare_user(model, cfg, u.user_id, pairs)))
    return out


def scenario_population(scenario: str | None, overrides: dict[str, Any] | None, root: Path) -> tuple[Config, list[User]]:
    """A scenario's config, with its state and results under ``root``, and its users prepared once (the benches)."""
    from simulations.runner import resolve  # Flower is loaded only where a scenario is resolved

    flat, _ = resolve(scenario, {"run.state-dir": str(root / "state"), "run.results-dir": str(root / "results"),
                                 **(overrides or {})})
    cfg = load_config(flat, env=False)
    return cfg, population(cfg, root / "population")


def simulated_devices(cfg: Config, users: list[User], state_root: Path, **node: Any) -> list[Device]:
    """One real device per prepared user, its state under ``state_root`` (``node``: more node-config keys)."""
    return [Device(cfg, {"data-dir": str(u.folder), "state-dir": str(state_root / slug(u.user_id)),
                         "user-id": u.user_id, **node}, prepared=u.data, simulated=True) for u in users]


def require_split_lora_head(cfg: Config, what: str) -> None:
    """A ValueError unless the head is a LoRA adapter apart from the shared one (``what`` trains the two apart)."""
    if cfg.adapter.head != "lora" or cfg.adapter.split == "fedsa":
        raise ValueError(f"{what} trains a LoRA head apart from the shared adapter. "
                         f"You passed: adapter.head={cfg.adapter.head!r}, adapter.split={cfg.adapter.split!r}")


def _weighted_clipped(update: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """What the secure sum adds for a device: ``update / max-examples``, clipped to ``secagg.clip-norm``."""
    scaled = {n: u / cfg.data.max_examples for n, u in update.items()}
    if cfg.secagg.enabled:
        norm = math.sqrt(sum(float((u * u).sum()) for u in scaled.values()))
        if norm > cfg.secagg.clip_norm:
            scaled = {n: u * (cfg.secagg.clip_norm / norm) for n, u in scaled.items()}
    return scaled


def federate(cfg: Config, users: list[User], state_root: Path) -> FederatedRun:
    """A federation of the real devices in this process; returns every device's final evaluation."""
    if state_root.exists():
        shutil.rmtree(state_root)
    t0 = time.perf_counter()
    # A non-private row is one the user asked the study for: the simulated devices' policy allows it
    # (the device still records such a release as epsilon = infinity).
    devices = simulated_devices(cfg, users, state_root, **{"policy.allow-no-dp": not cfg.privacy.enabled})
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    shared = model.initial_shared_state()
    opt = ServerOptimizer(cfg.server.optimizer, cfg.server.lr, momentum=cfg.server.momentum)
    declined = 0
    for server_round in range(1, cfg.server.num_rounds + 1):
        cohort = sample_cohort(list(range(len(devices))), cfg.server.clients_per_round, seed=cfg.run.seed,
                               server_round=server_round, sampling=cfg.server.sampling)
        if cfg.privacy.noise_on == "sum":
            shared, n_declined = _sum_round(cfg, [devices[i] for i in cohort], shared, opt, server_round)
            declined += n_declined
            continue
        total: dict[str, torch.Tensor] | None = None
        weight, contributors = 0.0, 0
        for i in cohort:
            dev = devices[i]
            try:
                update, metrics = dev.train_round(shared, server_round=server_round)
            except BudgetExhausted as exc:
                logger.info("declined: %s", exc)
                declined += 1
                continue
            scaled = _weighted_clipped(update, cfg)
            w = metrics["weight"] / cfg.data.max_examples
            total = scaled if total is None else {n: total[n] + scaled[n] for n in total}
            weight += w
            contributors += 1
        if total is not None and contributors >= cfg.server.min_clients and weight > 0:
            shared = opt.step(shared, {n: t / weight for n, t in total.items()})
    rows = []
    for dev in devices:
        row = dev.final_evaluation(shared)
        row["user-id"] = dev.user_id
        rows.append(row)
    return FederatedRun(rows, shared, devices, time.perf_counter() - t0, declined)


def _sum_round(cfg: Config, cohort: list[Device], shared: dict[str, torch.Tensor], opt: ServerOptimizer,
               server_round: int) -> tuple[dict[str, torch.Tensor], int]:
    """A round with noise on the sum (``privacy.noise-on = sum``): per step, each device's own checks and
    clipped gradient sum (:meth:`Device.sum_step`), quantized with its discrete Gaussian share by the very
    quantizer of the secure sum; the integer sum is what secure aggregation releases (masks cancel). Then
    the server's step and each device's head. Returns (the new shared weights, devices that declined)."""
    from client.policy import PolicyViolation
    from client.sumdp import StepRefused
    from fedpersona.secagg_wire import unflatten
    from privacy.secagg.crypto import SecureRNG
    from privacy.sumdp import normalizer, sum_context, sum_secagg_params

    rng = SecureRNG()
    declined: set[str] = set()
    for step in range(1, cfg.client.local_steps + 1):
        ctx = sum_context(cfg, round=server_round, step=step, cohort=len(cohort), weights=shared)
        quantizer = sum_secagg_params(cfg, cohort=len(cohort), dim=ctx.dim).quantizer
        total, survivors = None, 0
        for dev in cohort:
            try:
                vec, _ = dev.sum_step(shared, ctx, run_id=0, server_round=server_round, step=step, cohort=len(cohort))
            except (BudgetExhausted, PolicyViolation) as exc:  # a decline, or a refusal: not in the sum either way
                logger.info("%s: %s", type(exc).__name__, exc)
                declined.add(dev.user_id)
                continue
            q = quantizer.quantize(vec, rng)
            total = q if total is None else total + q
            survivors += 1
        if total is None or survivors < max(ctx.honest, cfg.secagg.min_contributors, cfg.server.min_clients):
            break  # the secure sum aborts before any unmask with fewer survivors
        grads = unflatten(total.astype("float64") / ctx.scale, shared)
        shared = opt.step(shared, {n: -grads[n] / normalizer(ctx, survivors) for n in shared})
    for dev in cohort:
        try:
            dev.personalize(shared, run_id=0, server_round=server_round)
        except StepRefused:
            logger.info("%s took no step of round %d: no head trained", dev.user_id, server_round)
    return shared, len(declined)


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
    from simulations.runner import resolve  # Flower is loaded only where a scenario is resolved

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


def rows_of_run(label: str, run: FederatedRun, base: dict[str, float]) -> list[dict[str, Any]]:
    rows = run.rows
    b = [base[r["user-id"]] for r in rows]
    shared = [r["shared-loss"] for r in rows]
    personal = [r["personal-loss"] for r in rows]
    out = [
        _row(f"{label}: shared", shared, [r["shared-accuracy"] for r in rows],
             better_than_base=_share([x < y for x, y in zip(shared, b)])),
        _row(f"{label}: personalized", personal, [r["personal-accuracy"] for r in rows],
             better_than_base=_share([x < y for x, y in zip(personal, b)]),
             personalization_helps=_share([p < s for p, s in zip(personal, shared)]),
             personalization_hurts=_share([p > s for p, s in zip(personal, shared)]),
             beats_local=_share([r["personal-loss"] < r["local-loss"] for r in rows]) if "local-loss" in rows[0] else None,
             epsilon=_eps(r["epsilon"] for r in rows), seconds=run.seconds, declined=run.declined),
    ]
    if "local-loss" in rows[0]:
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


def study(scenario: str | None = "demo", overrides: dict[str, Any] | None = None, *,
          epsilons: tuple[float, ...] = (1.0, 4.0, 8.0), quick: bool = False, vary: list[str] | None = None,
          attribution_users: bool = True, central_steps: int | None = None) -> dict[str, Any]:
    """Run the whole study; returns (and writes) the result document."""
    from simulations.runner import resolve

    flat, cfg = resolve(scenario, dict(overrides or {}))
    if quick:  # fewer users and rounds, same semantics
        flat["server.num-rounds"] = min(cfg.server.num_rounds, QUICK["server.num-rounds"])
        flat["data.max-users"] = min(cfg.data.max_users, QUICK["data.max-users"])
        k = min(cfg.server.clients_per_round, QUICK["server.clients-per-round"], flat["data.max-users"])
        flat["server.clients-per-round"], flat["server.min-clients"] = k, min(cfg.server.min_clients, k)
    flat["eval.per-round"] = False
    flat["eval.local-baseline"] = True
    base_cfg = load_config(flat, env=False)
    if not epsilons:
        raise ValueError("--epsilons needs at least one value")
    run_dir = Path(base_cfg.run.results_dir) / base_cfg.run.name
    state_root = Path(base_cfg.run.state_dir) / f"{base_cfg.run.name}-utility"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    users = population(base_cfg, state_root)
    model = adapted_model(base_cfg.model.path, base_cfg.adapter, base_cfg.run.seed,
                          device=base_cfg.model.device, dtype=base_cfg.model.dtype)
    base: dict[str, float] = {}
    base_acc: list[float] = []
    for u in users:
        with model.adapters_disabled():
            r = evaluate(model, u.data.held_out)
        base[u.user_id] = r["loss"]
        base_acc.append(r["accuracy"])
    table = [_row("base", list(base.values()), base_acc)]
    steps = central_steps if central_steps is not None else (4 if quick else CENTRAL_STEPS)
    central = centralized(base_cfg, users, steps=steps, batch_size=CENTRAL_BATCH, lr=CENTRAL_LR, seed=base_cfg.run.seed)
    table.append(_row("central (pooled, no DP)", [r["loss"] for r in central], [r["accuracy"] for r in central],
                      better_than_base=_share([r["loss"] < base[r["user-id"]] for r in central])))
    runs: dict[str, FederatedRun] = {}
    per_user: dict[str, list[dict]] = {}

    def one(label: str, extra: dict[str, Any]) -> FederatedRun:
        cfg = load_config({**flat, **extra}, env=False)
        logger.info("utility study: %s", label)
        run = federate(cfg, users, state_root / "runs" / slug(label))
        table.extend(rows_of_run(label, run, base))
        runs[label] = run
        per_user[label] = run.rows
        return run

    nonprivate = one("federated, no DP", {"privacy.enabled": False})
    for eps in sorted(epsilons):
        one(f"DP federated, eps={eps:g}", {"privacy.enabled": True, "privacy.target-epsilon": float(eps)})
    varied = []
    for spec in vary or []:
        key, values = _vary_values(spec)
        for v in values:
            label = f"DP federated, eps={max(epsilons):g}, {key}={v}"
            one(label, {"privacy.enabled": True, "privacy.target-epsilon": float(max(epsilons)), key: v})
            varied.append({"key": key, "value": v, "label": label})
    # The share of the non-private federated gain each row recovers.
    b = table[0]["mean"]
    ref = next(r for r in table if r["row"] == "federated, no DP: personalized")["mean"]
    for r in table:
        r["gain"] = (b - r["mean"]) / b
        r["recovered"] = (b - r["mean"]) / (b - ref) if b != ref else math.nan
    result: dict[str, Any] = {
        "scenario": scenario, "config": flat, "epsilons": sorted(epsilons), "quick": quick, "table": table,
        "varied": varied, "users": [u.user_id for u in users], "base_per_user": base,
        "per_user": per_user, "central_steps": steps,
    }
    if attribution_users:
        result["attribution"] = {
            "federated, no DP": attribution(nonprivate),
            f"DP federated, eps={max(epsilons):g}": attribution(runs[f"DP federated, eps={max(epsilons):g}"]),
        }
    result["seconds"] = time.perf_counter() - t0
    result["files"] = write_outputs(run_dir, result)
    return result


# -------------------------------------------------------------------------------- outputs
COLUMNS = ("row", "mean", "median", "worst_decile", "accuracy", "gain", "recovered", "better_than_base",
           "personalization_helps", "personalization_hurts", "beats_local", "epsilon")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    return str(v)


def format_table(table: list[dict]) -> str:
    head = (f"{'':44s} {'mean':>6s} {'median':>6s} {'worst10':>7s} {'acc':>6s} {'gain':>6s} {'recov':>6s} "
            f"{'>base':>6s} {'helps':>6s} {'hurts':>6s} {'>local':>6s} {'eps':>6s}")
    lines = [head]
    for r in table:
        lines.append(
            f"{r['row'][:44]:44s} {_fmt(r['mean']):>6s} {_fmt(r['median']):>6s} {_fmt(r['worst_decile']):>7s} "
            f"{_fmt(r['accuracy']):>6s} {_fmt(r.get('gain'), True):>6s} {_fmt(r.get('recovered'), True):>6s} "
            f"{_fmt(r.get('better_than_base'), True):>6s} {_fmt(r.get('personalization_helps'), True):>6s} "
            f"{_fmt(r.get('personalization_hurts'), True):>6s} {_fmt(r.get('beats_local'), True):>6s} "
            f"{_fmt(r.get('epsilon')):>6s}"
        )
    return "\n".join(lines)


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
    files = {"json": run_dir / "utility.json", "csv": run_dir / "utility.csv"}
    files["json"].write_text(json.dumps(_finite(result), indent=1, default=str, allow_nan=False))
    with files["csv"].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in result["table"]:
            w.writerow({k: r.get(k) for k in COLUMNS})
    png = plot(run_dir / "utility.png", result)
    if png is not None:
        files["png"] = png
    return {k: str(v) for k, v in files.items()}


def plot(path: Path, result: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no utility.png")
        return None
    table = {r["row"]: r for r in result["table"]}
    eps = result["epsilons"]
    varied = result.get("varied") or []
    fig, axes = plt.subplots(1, 2 if varied else 1, figsize=(11 if varied else 6, 4), squeeze=False)
    ax = axes[0][0]
    for what, style in (("personalized", "o-"), ("shared", "s--"), ("local-only", "^:")):
        ys = [100 * table[f"DP federated, eps={e:g}: {what}"]["gain"] for e in eps]
        ax.plot(eps, ys, style, label=f"DP federated: {what}" if what != "local-only" else "local-only, same DP")
    for name, color in (("federated, no DP: personalized", "tab:green"), ("central (pooled, no DP)", "tab:gray"),
                        ("federated, no DP: local-only", "tab:olive")):
        ax.axhline(100 * table[name]["gain"], color=color, lw=1, ls="-.", label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("epsilon per user (record level)")
    ax.set_ylabel("mean held-out loss gain over base (%)")
    ax.set_title("gain vs epsilon")
    ax.legend(fontsize=7)
    if varied:
        ax = axes[0][1]
        key = varied[0]["key"]
        pts = [(v["value"], table[f"{v['label']}: personalized"]["gain"], table[f"{v['label']}: shared"]["gain"])
               for v in varied if v["key"] == key]
        numeric = all(isinstance(p[0], (int, float)) for p in pts)
        xs = [p[0] for p in pts] if numeric else list(range(len(pts)))
        ax.plot(xs, [100 * p[1] for p in pts], "o-", label="personalized")
        ax.plot(xs, [100 * p[2] for p in pts], "s--", label="shared")
        if not numeric:
            ax.set_xticks(xs, [str(p[0]) for p in pts])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel(key)
        ax.set_title(f"gain vs {key} (eps={max(eps):g})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(scenario: str | None, *, epsilons: str = "1,4,8", quick: bool = False, overrides: dict | None = None,
         vary: list[str] | None = None) -> int:
    try:
        eps = tuple(float(x) for x in epsilons.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--epsilons must be comma-separated numbers. You passed: {epsilons!r}") from None
    result = study(scenario, overrides, epsilons=eps, quick=quick, vary=vary)
    print(format_table(result["table"]))
    for label, a in result.get("attribution", {}).items():
        print(f"user attribution ({label}): top-1 {100 * a['top1']:.0f}% vs chance {100 * a['chance']:.0f}% "
              f"({a['ratio_to_chance']:.1f}x), mean rank {a['mean_rank']:.1f} of {len(a['ranks'])}")
    print(f"{len(result['users'])} users, {result['seconds']:.0f} s. Files: " + ", ".join(result["files"].values()))
    return 0
