"""The server's round loop: sample a cohort, obtain the summed update, update and checkpoint the shared adapter.

Resumes from the newest complete checkpoint of the run: a round that was in
flight when the server stopped is simply run again (nothing of it was applied).
"""

from __future__ import annotations

import logging
import math
import random
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpersona.config import SAMPLINGS, Config
from fedpersona.model import adapted_model
from fedpersona.wire import pack_shared
from fedpersona.privacy.secagg.eval_figures import noise_stddev as eval_noise_sd
from fedpersona.privacy.secagg.eval_figures import summarize as summarize_evaluation
from fedpersona.server.aggregation import Aggregator
from fedpersona.server.checkpoint import latest_checkpoint, save_checkpoint
from fedpersona.server.flow_log import ServerInventory
from fedpersona.server.freshness import FreshnessGrid
from fedpersona.server.optim import ServerOptimizer
from fedpersona.server.progress import NoProgress, Progress, ProgressGrid, report
from fedpersona.server.run_report import read_json, summary_table, write_outputs
from fedpersona.server.secagg import build_aggregator
from fedpersona.server.sumdp import SumRounds, personalize

logger = logging.getLogger(__name__)

#: Redraw rounds.png during the run at most this often (it is always drawn when the run ends).
PLOT_EVERY_SECONDS = 60.0


def wait_for_nodes(grid: Grid, minimum: int, *, timeout: float = 600.0) -> list[int]:
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"Only {len(nodes)} node(s) connected after {timeout:.0f} s; need {minimum}")
        time.sleep(1.0)


def sample_cohort(nodes: list[int], size: int, *, seed: int, server_round: int,
                  sampling: str = "uniform") -> list[int]:
    """The round's cohort, seeded by (``seed``, ``server_round``): the same cohort on a resumed run.

    ``uniform``: ``size`` nodes drawn uniformly without replacement, each round afresh (a node
    may wait many rounds). ``balanced``: the rounds walk through seeded permutations of the
    nodes, one permutation after the other, taking the next ``size`` distinct nodes; so every
    node takes part once before any node takes part a third time, and in the first
    ``ceil(len(nodes) / size)`` rounds every node takes part. The walk is recomputed from round 1
    over the current nodes (no server state), so it stays deterministic across restarts.
    No privacy accounting here depends on the choice: each device's record-level ledger and the
    distributed-DP user-level entries count every round a device takes part in, without any
    amplification by client sampling.
    """
    size = min(size, len(nodes))
    if sampling == "uniform":
        rng = random.Random(f"{seed}:{server_round}")
        return sorted(rng.sample(nodes, size))
    if sampling != "balanced":
        raise ValueError(f"server.sampling must be one of {SAMPLINGS}. You passed: {sampling!r}")
    ordered = sorted(nodes)
    stream: list[int] = []
    epoch, pos = 0, 0
    cohort: list[int] = []
    for _ in range(server_round):
        cohort = []
        while len(cohort) < size:
            if pos == len(stream):
                stream = ordered[:]
                random.Random(f"{seed}:balanced:{epoch}").shuffle(stream)
                epoch, pos = epoch + 1, 0
            node = stream[pos]
            pos += 1
            if node not in cohort:  # at a permutation boundary: already in this round; its next turn is spent
                cohort.append(node)
    return sorted(cohort)


def _cohort_means(rs_metrics: dict[str, float], contributors: int) -> dict[str, float]:
    if contributors == 0:
        return {}
    out = {}
    for key in ("train-loss", "heldout-shared-loss", "heldout-personal-loss", "epsilon", "train-seconds"):
        if key in rs_metrics:
            out[key] = rs_metrics[key] / contributors
    return out


def _run_id(grid: Grid) -> int:
    try:
        return int(grid.run.run_id)
    except Exception:  # noqa: BLE001 - a grid without a usable run (in-process grids): any id works
        logger.debug("grid has no run id; secure aggregation binds its rounds to run id 0")
        return 0


def run_federation(grid: Grid, cfg: Config, *, aggregator: Aggregator | None = None,
                   progress: Progress | None = None) -> dict:
    """Run the rounds left and the final evaluation; ``progress`` gets the events of :mod:`fedpersona.server.progress`."""
    shown = progress is not None  # whoever passed a display shows the results table itself
    progress = progress or NoProgress()
    grid = ProgressGrid(grid, progress)  # type: ignore[assignment]  # any Grid: reports each message stage
    if aggregator is None:
        aggregator = build_aggregator(cfg, run_id=_run_id(grid))
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    grid = FreshnessGrid(grid, run_dir)  # type: ignore[assignment]  # keeps and sends back the devices' receipts
    ckpt_root = run_dir / "checkpoints"
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    counts = model.parameter_counts()
    p = cfg.privacy
    log(
        INFO,
        "fedpersona run '%s': split %s, head %s, shared %d params, personal %d params (never sent); "
        "DP-SGD %s (target epsilon %.2f, delta %g, clip %.2f, accountant %s); aggregation: %s",
        cfg.run.name, cfg.adapter.split, cfg.adapter.head, counts["shared"], counts["personal"],
        "ON" if p.enabled else "OFF", p.target_epsilon, p.delta, p.max_grad_norm, p.accountant, aggregator.name,
    )
    run_warnings: list[str] = []
    if not p.enabled:
        log(WARNING, "privacy.enabled = false: client updates carry NO differential-privacy guarantee")
        run_warnings.append("privacy.enabled = false: client updates carry no differential-privacy guarantee")
    if aggregator.name == "plain":
        text = ("plain aggregation (secagg.enabled = false): the server sees each client's update, example count "
                "and metrics in the clear")
        log(WARNING, "Plain aggregation: %s", text)
        run_warnings.append(text)

    opt = ServerOptimizer(cfg.server.optimizer, cfg.server.lr, momentum=cfg.server.momentum)
    # Noise on the sum: each DP-SGD step of the shared adapter is one secure sum over the cohort (server/sumdp.py).
    sum_rounds = SumRounds(cfg, aggregator) if p.noise_on == "sum" else None
    if sum_rounds is not None:
        log(INFO, "noise on the sum: %d DP-SGD step(s) a round, each one secure sum; t = %s honest contributors "
            "(privacy.honest-contributors; 0: half the cohort); server optimizer %s, lr %g", cfg.client.local_steps,
            p.honest_contributors or "cohort / 2", cfg.server.optimizer, cfg.server.lr)
    previous = read_json(run_dir / "metrics.json")
    history: list[dict] = list(previous.get("rounds", []))
    resumed = latest_checkpoint(ckpt_root)
    if resumed is None:
        start_round, shared = 0, model.initial_shared_state()
        history = []
    else:
        start_round, shared, opt_state = resumed
        opt.load_state_dict(opt_state)
        history = [h for h in history if h["round"] <= start_round]
        log(INFO, "Resuming run '%s' after round %d (checkpoint %s)", cfg.run.name, start_round, ckpt_root)
    metrics = {
        "run": cfg.run.name,
        "config": cfg.to_flat(),
        "aggregation": aggregator.name,
        "warnings": run_warnings,
        "parameters": counts,
        "rounds": history,
    }
    if hasattr(aggregator, "run_info"):
        metrics["secagg"] = aggregator.run_info()
    timeout = cfg.server.round_timeout or None
    t_run = time.perf_counter()
    last_plot = time.monotonic()
    report(progress, "run-start", run=cfg.run.name, rounds=cfg.server.num_rounds, **{"start-round": start_round},
           nodes=len(list(grid.get_node_ids())), cohort=cfg.server.clients_per_round, aggregation=aggregator.name,
           dp=p.enabled, **{"shared-params": counts["shared"], "final-eval": cfg.eval.final,
                            "local-baseline": cfg.eval.local_baseline,
                            "sum-steps": cfg.client.local_steps if p.enabled and p.noise_on == "sum" else 0})
    for server_round in range(start_round + 1, cfg.server.num_rounds + 1):
        t0 = time.perf_counter()
        nodes = wait_for_nodes(grid, cfg.server.min_clients)
        cohort = sample_cohort(nodes, cfg.server.clients_per_round, seed=cfg.run.seed, server_round=server_round,
                               sampling=cfg.server.sampling)
        report(progress, "round-start", round=server_round, rounds=cfg.server.num_rounds, cohort=len(cohort))
        content = RecordDict(
            {**pack_shared(shared), "config": ConfigRecord({"server-round": server_round})}
        )
        extra: dict = {}
        if sum_rounds is not None:
            rs, shared, extra = sum_rounds.round(grid, cohort, shared, opt, server_round=server_round, timeout=timeout)
            applied = extra["steps-applied"] > 0
        else:
            rs = aggregator.collect(grid, cohort, content, server_round=server_round, timeout=timeout)
            applied = rs.contributors >= cfg.server.min_clients and rs.weight > 0
        ServerInventory(run_dir).round(server_round, cohort=cohort, rs=rs, aggregation=aggregator.name)
        if sum_rounds is not None:
            norm = extra.pop("update-norm")
            if rs.aborted:
                log(WARNING, "Round %d: %s", server_round, rs.aborted)
                run_warnings.append(f"round {server_round}: a noisy sum aborted: {rs.aborted}")
        elif applied:
            mean_update = {n: rs.update_sum[n] / rs.weight for n in shared}
            norm = math.sqrt(sum(float((u * u).sum()) for u in mean_update.values()))
            shared = opt.step(shared, mean_update)
        else:
            norm = 0.0
            if rs.aborted:
                log(WARNING, "Round %d: secure aggregation aborted, shared adapter unchanged: %s", server_round,
                    rs.aborted)
                run_warnings.append(f"round {server_round}: secure aggregation aborted: {rs.aborted}")
            else:
                log(
                    WARNING,
                    "Round %d: %d contributor(s) < server.min-clients=%d; shared adapter unchanged",
                    server_round, rs.contributors, cfg.server.min_clients,
                )
        for reason in rs.failures:
            log(WARNING, "Round %d failure: %s", server_round, reason)
        for reason in rs.declined:
            log(INFO, "Round %d declined: %s", server_round, reason)
        model.load_shared_state(shared)
        save_checkpoint(
            ckpt_root, server_round, shared, opt.state_dict(), peft_model=model.peft,
            meta={"run": cfg.run.name, "applied": applied},
        )
        row = {
            "round": server_round,
            "cohort": len(cohort),
            "contributors": rs.contributors,
            "declined": len(rs.declined),
            "failed": len(rs.failures),
            "applied": applied,
            "update-norm": norm,
            **({"aborted": rs.aborted} if rs.aborted else {}),
            **rs.info,
            **extra,
            # Cohort figures only of a sum that was revealed and applied: never of an aborted round.
            **(_cohort_means(rs.metrics, rs.contributors) if applied else {}),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        # metrics.json and rounds.csv every round (a resumed run reads them); the plot at most once a minute
        # (drawing it costs about a second) and at the end of the run.
        plot = time.monotonic() - last_plot >= PLOT_EVERY_SECONDS
        write_outputs(run_dir, metrics, plots=plot)
        last_plot = time.monotonic() if plot else last_plot
        report(progress, "round-end", rounds=cfg.server.num_rounds, trained=row["contributors"],
               **{k: row[k] for k in ("round", "cohort", "declined", "failed", "applied", "seconds")},
               **{k: row[m] for k, m in (("shared-loss", "heldout-shared-loss"), ("personal-loss", "heldout-personal-loss"),
                                         ("train-loss", "train-loss"), ("epsilon", "epsilon"), ("aborted", "aborted"))
                  if m in row})
        # Only figures the server has: no device sends its losses or epsilon (they stay in each device's log).
        figures = [f"{label} {row[key]:.3f}" for key, label in (("heldout-shared-loss", "held-out loss shared"),
                                                                   ("heldout-personal-loss", "personalized"),
                                                                   ("train-loss", "train loss"), ("epsilon", "mean epsilon"))
                   if isinstance(row.get(key), float) and math.isfinite(row[key])]
        log(INFO, "[round %d/%d] cohort %d: trained %d, declined %d, failed %d | %s%.1f s", server_round,
            cfg.server.num_rounds, len(cohort), rs.contributors, len(rs.declined), len(rs.failures),
            "".join(f + " | " for f in figures), row["seconds"])
    if cfg.client.head_at == "end" and cfg.client.head_steps > 0:
        metrics["head-at-end"] = heads_at_end(grid, cfg, shared, timeout=timeout, progress=progress)
        if metrics["head-at-end"]["failures"]:
            run_warnings.append(f"{metrics['head-at-end']['failures']} device(s) failed to train their head at the end")
    metrics["train_seconds"] = time.perf_counter() - t_run
    if history and not any(h.get("applied") for h in history):
        log(WARNING, "No round of run '%s' was applied: the shared adapter never changed", cfg.run.name)
        run_warnings.append("no round was applied: the shared adapter never changed")
    if cfg.eval.final:
        report(progress, "eval-start", nodes=len(list(grid.get_node_ids())))
        metrics["final"] = final_evaluation(grid, cfg, shared, aggregator=aggregator)
        summary = metrics["final"]["summary"]
        report(progress, "eval-end", users=metrics["final"]["devices"], failed=len(metrics["final"]["failures"]),
               seconds=metrics["final"]["seconds"],
               summary={k: summary[f"{k}-loss"]["mean"] for k in ("base", "shared", "personal", "local")
                        if f"{k}-loss" in summary})
        ServerInventory(run_dir).evaluation(metrics["final"], server_round=cfg.server.num_rounds + 1,
                                            aggregation=aggregator.name)
        metrics["total_seconds"] = time.perf_counter() - t_run
    paths = write_outputs(run_dir, metrics)
    if "final" in metrics:
        table = summary_table(metrics["final"]["users"], metrics["final"]["summary"])
        if not shown:
            log(INFO, "Final held-out evaluation (sum over %d devices):\n%s", metrics["final"]["devices"], table)
        (run_dir / "summary.txt").write_text(table + "\n")
    log(INFO, "Results: %s", ", ".join(str(p) for p in paths.values()))
    report(progress, "run-end", seconds=time.perf_counter() - t_run, rounds=len(history))
    return metrics


def heads_at_end(grid: Grid, cfg: Config, shared: dict[str, torch.Tensor], *, timeout: float | None,
                 progress: Progress | None = None) -> dict:
    """``client.head-at = end``: the run's final shared adapter to every node, each device's head trained once on
    top of it (in the device's own store; nothing but a yes or no comes back). Round ``server.num-rounds + 1``."""
    t0 = time.perf_counter()
    nodes = wait_for_nodes(grid, cfg.server.min_clients)
    log(INFO, "Personal heads: %d nodes train theirs on the final shared adapter (client.head-at = end)...", len(nodes))
    progress = progress or NoProgress()
    report(progress, "heads-start", nodes=len(nodes))
    done, failures = 0, []
    size = max(1, cfg.server.clients_per_round)  # in groups of a round's cohort: progress moves group by group
    for i in range(0, len(nodes), size):
        d, f = personalize(grid, nodes[i:i + size], shared, server_round=cfg.server.num_rounds + 1, timeout=timeout)
        done, failures = done + d, failures + f
    for reason in failures:
        log(WARNING, "Personal heads at the end: %s", reason)
    out = {"nodes": len(nodes), "personalized": done, "failures": len(failures), "seconds": time.perf_counter() - t0}
    report(progress, "heads-end", nodes=len(nodes), personalized=done, failed=len(failures), seconds=out["seconds"])
    return out


def final_evaluation(grid: Grid, cfg: Config, shared: dict[str, torch.Tensor], *,
                     aggregator: Aggregator | None = None) -> dict:
    """Every node evaluates on its held-out split; the server gets only the totals (secure sum) and the summary.

    ``users`` stays empty here: no per-user row reaches the server. A simulation fills it from the
    devices' own stores on its machine (:mod:`fedpersona.simulations.user_table`).
    """
    t0 = time.perf_counter()
    if aggregator is None:
        aggregator = build_aggregator(cfg, run_id=_run_id(grid))
    nodes = wait_for_nodes(grid, cfg.server.min_clients)  # a resumed, finished run gets here before any node joined
    log(INFO, "Final evaluation on %d nodes (base, shared, personalized%s), %s...", len(nodes),
        ", local-only in simulation" if cfg.eval.local_baseline else "",
        "summed under secure aggregation" if aggregator.name != "plain" else "summed in the clear")
    content = RecordDict(pack_shared(shared))
    es = aggregator.evaluate(grid, nodes, content, server_round=cfg.server.num_rounds + 1,
                             timeout=cfg.server.round_timeout or None)
    for reason in es.failures:
        log(WARNING, "Evaluation failure: %s", reason)
    if es.aborted or es.histograms is None:
        log(WARNING, "Final evaluation: no sum revealed (%s)", es.aborted or "no device answered")
        summary: dict = {}
    else:
        summary = summarize_evaluation(es.histograms, es.sums, noise_sd=eval_noise_sd(cfg))
    return {
        "users": [],
        "devices": es.devices,
        "summary": summary,
        "failures": es.failures,
        **({"aborted": es.aborted} if es.aborted else {}),
        **es.info,
        "seconds": time.perf_counter() - t0,
    }
