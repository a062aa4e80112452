"""The privacy audit's content: the guarantee in words, per-user epsilon, the data-flow checks, the status.

It takes plain data, in the formats defined here, from whoever owns the files:

* :class:`DeviceRecords`: one device's privacy ledger, its inventory lines and the names and
  digests of its personal head (:mod:`fedpersona.client.audit_records` reads them from a state folder);
* :class:`RunRecords`: the run's ``metrics.json``, the server's inventory, the released
  checkpoints and the empirical results (:mod:`fedpersona.server.audit_records` reads a run folder).

:func:`build_audit` checks them and returns the audit as a dict; :func:`fedpersona.privacy.audit.render.write_report`
writes ``audit.json``, ``audit.html`` and ``audit_*.png``. ``fedpersona audit`` gathers a run's
files (:mod:`fedpersona.simulations.audit.gather`); a device auditing itself passes its state folder alone
(``fedpersona audit --device DIR``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedpersona.privacy.audit.empirical import head_mode
from fedpersona.privacy.audit.inventory import check_completeness, summarize_inventory, verify_inventory
from fedpersona.privacy.audit.message_table import HEAD_EXCHANGE, PLAIN, SUM_STEP, TABLE
from fedpersona.privacy.budget import composed
from fedpersona.privacy.ledger import INTEGER_ORDERS, PrivacyLedger
from fedpersona.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_subsampled_gaussian

__all__ = ["DEFAULT_DELTA", "VERSION", "DeviceRecords", "RunRecords", "build_audit", "device_summary"]

VERSION = 1
DEFAULT_DELTA = 1e-3  # the shipped configs' delta, used when a device is audited without its run


@dataclass
class DeviceRecords:
    """What one device's state folder holds for the audit (read-only; unreadable parts are in ``errors``)."""

    label: str
    state_dir: str
    inventory: list[dict] = field(default_factory=list)
    ledger: PrivacyLedger | None = None
    personal_names: list[str] = field(default_factory=list)
    personal_digests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: The run config the device recorded with its last round (flat keys; empty when it holds none).
    config: dict = field(default_factory=dict)
    #: Its other ledgers by file name: the DP head's (``ledger-head``), the local-only baseline's.
    other_ledgers: dict = field(default_factory=dict)


@dataclass
class RunRecords:
    """What a run folder holds for the audit: ``metrics.json``, the server's inventory lines, the
    rounds of the released checkpoints, and ``audit/empirical.json`` (None when not run)."""

    run_dir: str
    metrics: dict
    server_inventory: list[dict] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    empirical: dict | None = None


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _independent_epsilon(history: list[tuple[float, float, int]], delta: float, orders: str = "all") -> float | None:
    """Epsilon of a ledger history with :mod:`fedpersona.privacy.rdp` (not Opacus): the cross-check (``orders``: the
    ledger's, integer orders for a ledger with steps on a noisy sum)."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return None  # a release without noise: infinite, whatever the rest
    grid = np.asarray(INTEGER_ORDERS, dtype=float) if orders == "integer" else DEFAULT_ORDERS
    rdp = np.zeros(len(grid))
    for sigma, q, steps in history:
        rdp = rdp + rdp_subsampled_gaussian(q=q, sigma=sigma, steps=steps, orders=grid)
    eps, _ = epsilon_from_rdp(rdp=rdp, orders=grid, delta=delta)
    return _finite(eps)


def _plan_and_collusion(ledger: PrivacyLedger, delta: float, eps: float | None) -> dict:
    """Planned vs spent (participations, epsilon), and with noise on the sum the epsilon per number of
    devices colluding with the server (:meth:`fedpersona.privacy.ledger.PrivacyLedger.collusion`)."""
    out: dict[str, Any] = {}
    plan = ledger.plan
    if plan is not None:
        out["plan"] = {"participations_planned": plan["participations"], "participations_taken": len(ledger.rounds),
                       "steps_planned": plan["steps"], "steps_taken": ledger.total_steps,
                       "epsilon_planned": _finite(plan["epsilon"]), "epsilon_spent": eps,
                       "noise_on": plan["noise_on"]}
    rows = ledger.collusion(delta)
    if rows:
        out["collusion"] = [{**r, "epsilon": _finite(r["epsilon"])} for r in rows]
        out["honest_contributors"] = max(t for _, _, t, _ in ledger.sum_steps)
    return out


def device_summary(rec: DeviceRecords, *, delta: float, target_epsilon: float | None, dp: bool = True) -> dict:
    """One device's epsilon (and its independent re-accounting), rounds, budget and what it sent."""
    out: dict[str, Any] = {"device": rec.label, "state_dir": rec.state_dir, "errors": list(rec.errors),
                           "inventory": rec.inventory}
    ledger = rec.ledger
    if ledger is not None:
        eps = ledger.epsilon(delta) if dp else math.inf
        out.update({
            "accountant": ledger.accountant,
            "history": [list(h) for h in ledger.history],
            "steps": ledger.total_steps,
            "rounds": [{**r, "epsilon": _finite(r["epsilon"])} for r in ledger.rounds],
            "epsilon": _finite(eps),
            "epsilon_independent": (_independent_epsilon(ledger.history, delta, ledger.orders)
                                    if ledger.accountant == "rdp" and dp else None),
            "orders": ledger.orders,
            **_plan_and_collusion(ledger, delta, _finite(eps)),
            "user_level": [{**u, "epsilon": _finite(u["epsilon"])} for u in ledger.user_level_entries],
            # Rounds released without DP noise (a policy that allowed it): epsilon is infinite from then on.
            "released_without_noise": [r["round"] for r in ledger.rounds if r["noise_multiplier"] == 0]
                                      or ([None] if any(s == 0 for s, _, _ in ledger.history) else []),
        })
        others = {name: led for name, led in rec.other_ledgers.items() if led is not None}
        if "ledger-local-baseline" in others:  # one budget per user: the federated ledger and the baseline's
            total = composed([ledger, others["ledger-local-baseline"]]).epsilon(delta) if dp else math.inf
            out["epsilon_total"] = _finite(total)
            out["epsilon_local_baseline"] = _finite(others["ledger-local-baseline"].epsilon(delta)) if dp else None
        if "ledger-head" in others:
            out["head_epsilon"] = _finite(others["ledger-head"].epsilon(delta)) if dp else None
        budget = {"target": target_epsilon, "exhausted": False, "after_round": None}
        if dp and target_epsilon is not None and ledger.rounds:
            last = ledger.rounds[-1]
            nxt = ledger.epsilon_if(noise_multiplier=last["noise_multiplier"], sample_rate=last["sample_rate"],
                                    num_steps=max(1, last["steps"]), delta=delta)
            if nxt > target_epsilon * (1 + 1e-9):
                budget.update(exhausted=True, after_round=last["round"], epsilon_next=_finite(nxt))
        if dp and target_epsilon is not None and (out.get("epsilon_total") or 0) > target_epsilon * (1 + 1e-6):
            budget["composed_over"] = out["epsilon_total"]
        out["budget"] = budget
    else:
        out.update({"steps": 0, "rounds": [], "epsilon": 0.0 if dp else None, "user_level": [], "history": []})
    out["personal_names"] = list(rec.personal_names)
    out["personal_digests"] = list(rec.personal_digests)
    return out


def build_audit(devices: list[DeviceRecords], run: RunRecords | None = None, *, device_scope: bool = False,
                delta: float | None = None, target_epsilon: float | None = None) -> dict:
    """Check the devices' ledgers and inventories against each other and the server's view."""
    metrics = run.metrics if run is not None else {}
    run_path = Path(run.run_dir) if run is not None else None
    config = dict(metrics.get("config", {}))
    recorded = "run"
    if not config:  # a device audited alone: the settings it recorded, never a default
        config = next((dict(d.config) for d in devices if d.config), {})
        recorded = "device" if config else "none"
    dp = bool(config.get("privacy.enabled", True))
    delta = float(delta if delta is not None else config.get("privacy.delta", DEFAULT_DELTA))
    target = target_epsilon if target_epsilon is not None else config.get("privacy.target-epsilon")
    devices = [device_summary(d, delta=delta, target_epsilon=_finite(target), dp=dp) for d in devices]

    inventories = {d["device"]: d["inventory"] for d in devices if d["inventory"]}
    check = verify_inventory(inventories, personal_names={d["device"]: d["personal_names"] for d in devices},
                             personal_digests={d["device"]: d["personal_digests"] for d in devices})
    server = run.server_inventory if run is not None else []
    completeness = check_completeness(inventories, server) if server else None
    unrecorded = [d["device"] for d in devices if not d["inventory"] and d.get("steps", 0) > 0]
    empirical = run.empirical if run is not None else None
    ckpts = run.checkpoints if run is not None else []

    eps = [d["epsilon"] for d in devices if d.get("epsilon") is not None]
    no_noise = {d["device"]: d["released_without_noise"] for d in devices if d.get("released_without_noise")}
    audit = {
        "version": VERSION,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scope": "device" if device_scope else "run",
        "run": metrics.get("run"),
        "run_dir": str(run_path) if run_path is not None else None,
        "settings_source": {"run": "the run's metrics.json", "device": "the run config the device recorded with "
                            "its last round", "none": "none recorded: the statements that depend on the run's "
                            "settings say so"}[recorded],
        "guarantee": _guarantee(config, devices, metrics, dp=dp, delta=delta, checkpoints=ckpts),
        "users": [_user_row(d) for d in devices],
        "epsilon_summary": {"devices": len(devices), "max": max(eps) if eps else None, "mean": float(np.mean(eps)) if eps else None,
                            "min": min(eps) if eps else None, "delta": delta, "target": _finite(target),
                            "infinite": sorted(no_noise)},
        "released_without_noise": no_noise,
        "budget_exhausted": [{"user": d["device"], "after_round": d["budget"]["after_round"], "epsilon": d["epsilon"]}
                             for d in devices if d.get("budget", {}).get("exhausted")],
        "accountant_check": _accountant_check(devices),
        "inventory": {
            "recorded_devices": len(inventories),
            "unrecorded_devices": unrecorded,
            "verification": check.to_dict(),
            "completeness": completeness,
            "summary": summarize_inventory(inventories),
        },
        "server_view": _server_view(metrics, server),
        "device_errors": {d["device"]: d["errors"] for d in devices if d["errors"]},
        "empirical": _strip_scores(empirical) if empirical else None,
        "_empirical_full": empirical,
        "_devices": devices,
    }
    audit["status"] = _status(audit, dp=dp)
    return audit


def _user_row(d: dict) -> dict:
    return {
        "user": d["device"], "epsilon": d.get("epsilon"), "epsilon_independent": d.get("epsilon_independent"),
        "epsilon_total": d.get("epsilon_total"), "epsilon_local_baseline": d.get("epsilon_local_baseline"),
        "head_epsilon": d.get("head_epsilon"),
        "rounds": [r["round"] for r in d.get("rounds", [])], "steps": d.get("steps", 0),
        "noise_multiplier": d["history"][-1][0] if d.get("history") else None,
        "sample_rate": d["history"][-1][1] if d.get("history") else None,
        "accountant": d.get("accountant"), "budget": d.get("budget"), "user_level": d.get("user_level", []),
        "trajectory": [(r["round"], r["epsilon"]) for r in d.get("rounds", [])],
        "messages": len(d["inventory"]),
        **({"plan": d["plan"]} if "plan" in d else {}),
        **({"collusion": d["collusion"], "honest_contributors": d["honest_contributors"]} if "collusion" in d else {}),
    }


def _accountant_check(devices: list[dict]) -> dict:
    diffs = [abs(d["epsilon"] - d["epsilon_independent"]) / max(1e-12, d["epsilon"])
             for d in devices if d.get("epsilon") and d.get("epsilon_independent") is not None]
    worst = max(diffs) if diffs else None
    return {"compared": len(diffs), "max_relative_difference": worst,
            "ok": worst is None or worst < 1e-3,
            "method": "each ledger's history re-accounted with privacy/rdp.py (an independent RDP implementation)"}


def _personal_head_statement(mode: str) -> str:
    """What holds for the personal head in this run (``privacy.personal-head``, ``adapter.split``)."""
    if mode == "in-shared":
        return ("adapter.split = fedsa: the head (B) is part of the shared adapter and is trained in the one DP-SGD "
                "pass; the user's record-level epsilon covers it and the personalized model. It is never aggregated: "
                "no user-level protection applies to it.")
    if mode == "local":
        return ("privacy.personal-head = local (the default): the head is trained on the device WITHOUT noise, on top "
                "of the shared adapter, and never leaves it; the shared pass runs with the head switched off, so no "
                "update the device sends depends on it, and its held-out figures leave only inside the noised final "
                "evaluation. The head and the personalized model's outputs are covered by NO differential-privacy "
                "guarantee: whoever can query the device's model queries a model trained on the user's data without "
                "noise. The empirical audit reports their exposure and membership inference as what the device's own "
                "outputs reveal, with no verdict against epsilon.")
    if mode == "dp":
        return ("privacy.personal-head = dp: the head is trained with DP-SGD too, with its own ledger (ledger-head) "
                "and budget; the personalized model is covered by the composition of the federated and the head's "
                "ledgers, and the empirical audit judges it against that composition.")
    return ("unknown: no run config is at hand (the device recorded none), so this report cannot say how the head was "
            "trained")


def leaves_device_rows(*, secagg: bool, noise_on_sum: bool = False, head_at: str = "round") -> list[dict]:
    """The message table's rows that apply: under secure aggregation the default ones, else the plain ones;
    with noise on the sum also the rows of its steps; the personalize exchange's with noise on the sum or with
    ``client.head-at = end``."""
    rows = [r for r in TABLE if r.message == "*" or (secagg and r.when == "") or (not secagg and r.when == PLAIN)
            or (noise_on_sum and r.when == SUM_STEP)
            or ((noise_on_sum or head_at == "end") and r.when == HEAD_EXCHANGE)]
    return [{"reply": r.message, "field": f"{r.part} {r.record}/{r.name}", "what": r.what, "covered_by": r.covered_by}
            for r in rows]


def _guarantee(config: dict, devices: list[dict], metrics: dict, *, dp: bool, delta: float, checkpoints: list[int]) -> dict:
    accountants = sorted({d["accountant"] for d in devices if d.get("accountant")}) or [config.get("privacy.accountant", "rdp")]
    user_level = [u for d in devices for u in d.get("user_level", [])]
    ddp_entries = [u for u in user_level if u["mechanism"].startswith("secagg-ddg")]
    eval_entries = [u for u in user_level if u["mechanism"].startswith("secagg-eval-ddg")]
    ckpts = checkpoints
    clip = config.get("privacy.max-grad-norm")
    if clip is None:  # the devices' ledgers record the clip they accepted
        clip = next((r.get("settings", {}).get("privacy.max-grad-norm") for d in devices for r in d.get("rounds", [])
                     if r.get("settings", {}).get("privacy.max-grad-norm") is not None), None)
    mode = head_mode(config.get("adapter.split"), config.get("privacy.personal-head"))
    secagg = metrics.get("aggregation", "secagg+" if config.get("secagg.enabled", True) else "plain") != "plain"
    eval_eps = max((u["epsilon"] for u in eval_entries if u["epsilon"] is not None), default=None)
    g = {
        "dp_enabled": dp,
        "unit": "one training example (cue, reply) of one user",
        "adjacency": ("record-level, per user: two datasets of a user that differ by adding or removing one of its "
                      "training examples. A user's epsilon covers the shared-adapter updates its device sent (and so "
                      "every checkpoint). The device's sample rate q = batch-size / n and the noise calibrated for it "
                      "are set from its own example count n, as in every DP-SGD accountant; no message carries n. "
                      "Every field of every reply, and what covers it: 'what leaves a device'"),
        "mechanism": (f"DP-SGD on the device (Opacus): per-sample gradient clipping at "
                      f"{clip if clip is not None else 'privacy.max-grad-norm (not recorded)'}, Gaussian noise of "
                      "standard deviation noise_multiplier x clip per step, over "
                      + ("the shared adapter (A and B, the personal B inside it: split fedsa)" if mode == "in-shared"
                         else "the shared adapter only, with the personal head switched off in that pass, so the "
                              "released update never depends on the head")),
        "accountant": ", ".join(a.upper() for a in accountants) + " (Opacus); cross-checked with privacy/rdp.py",
        "delta": delta,
        "sampling": ("Poisson sampling: every example joins each step's batch independently with probability "
                     "q = batch-size / examples, decided by 53-bit uniforms from an AES-256-CTR stream keyed with 32 "
                     "bytes of os.urandom for that step (privacy/noise.py CsprngStream), never from a torch "
                     "generator; the batches never leave the device; empty batches are noise-only steps and are "
                     "counted"),
        "noise": ("each coordinate of each step's Gaussian noise is (z1 + z2 + z3 + z4) / 2 times noise_multiplier "
                  "x clip, the z standard normals by Box-Muller from the same step's AES-256-CTR stream (the sum of "
                  "four, as Opacus's secure_mode, against floating-point attacks on a sampled Gaussian); seeding "
                  "torch reproduces none of it (tests/adversarial/test_noise_predictability.py)"),
        "leaves_device": leaves_device_rows(secagg=secagg, noise_on_sum=config.get("privacy.noise-on") == "sum",
                                            head_at=str(config.get("client.head-at", "round"))),
        "composition": "over every round the device ever trained in, across restarts (the ledger file on the device)",
        "checkpoints": (f"covers every released checkpoint ({len(ckpts)} of them: rounds {ckpts[0]}-{ckpts[-1]})" if ckpts
                        else "covers every released checkpoint") + ": each is a function of the devices' DP-SGD outputs "
                       "(post-processing), and a user's epsilon bounds the whole sequence, not each checkpoint alone",
        "user_level": (
            {"present": True, "entries": len(ddp_entries),
             "epsilon_max": max((u["epsilon"] for u in ddp_entries if u["epsilon"] is not None), default=None),
             "mechanisms": sorted({u["mechanism"] for u in ddp_entries}),
             "statement": "user-level (whole-user adjacency) guarantee of the shared-adapter sums from distributed DP "
                          "noise under secure aggregation, as recorded in the ledgers; it covers everything in those "
                          "sums (the update and the constant 'trained'). It holds against the server and the "
                          "released adapter under the secure-aggregation assumptions (honest-but-curious server, enough "
                          "honest surviving clients per round)"}
            if ddp_entries else
            {"present": False,
             "statement": "no user-level guarantee for the shared-adapter updates: no distributed-DP entries in the "
                          "ledgers. A user's whole dataset is protected there only through the record-level bound "
                          "(group privacy)"}),
        "evaluation": ({"present": True, "entries": len(eval_entries), "epsilon_max": eval_eps,
                        "statement": f"the final evaluation's figures are user-level (epsilon {eval_eps:.3g}, delta "
                                     f"{eval_entries[0]['delta']:g})-DP at worst, from the discrete Gaussian noise every "
                                     "device adds before masking (secagg-eval-ddg entries in the ledgers), under the "
                                     "same secure-aggregation assumptions"}
                       if eval_entries and eval_eps is not None else
                       {"present": False, "statement": "no evaluation release recorded in the ledgers"}),
        "personal_head": _personal_head_statement(mode),
    }
    if config.get("privacy.noise-on") == "sum":
        t = config.get("privacy.honest-contributors") or "half the announced cohort"
        g["mechanism"] = (f"DP-SGD with the noise once on the secure sum (privacy.noise-on = sum): each step of the "
                          f"shared adapter is one secure sum over the cohort; every device clips its per-example "
                          f"gradients at {clip} (head switched off), sums them over its own Poisson sample, quantizes "
                          f"the sum and adds discrete Gaussian noise of variance sigma^2 Delta^2 / t (Delta: the "
                          f"quantized sensitivity), then masks it; the server learns only the sum over at least t "
                          f"survivors (t = {t}) and divides it by a public normalizer (survivors x batch size)")
        g["assumption"] = ("each user's epsilon holds as long as at least t devices that follow the protocol have "
                           "their noise in every released sum, and secure aggregation reveals nothing but those sums; "
                           "the per-user table 'epsilon at j colluders' shows what holds when j of the t collude with "
                           "the server, down to the device's own share alone")
        g["accountant"] += "; RDP at integer orders (where the discrete Gaussian's loss equals the Gaussian's)"
    infinite = sorted(d["device"] for d in devices if d.get("released_without_noise"))
    if not dp:
        g["statement"] = "NO DIFFERENTIAL-PRIVACY GUARANTEE: privacy.enabled = false for this run."
        g["mechanism"] = "none: the devices trained without DP-SGD (no clipping, no noise)"
        g["accountant"] = "none (every epsilon is infinite)"
        g["checkpoints"] = "no released checkpoint is covered by any guarantee"
    else:
        eps = [d["epsilon"] for d in devices if d.get("epsilon") is not None]
        g["statement"] = (f"Each user's training examples are ({max(eps) if eps else 0:.3g}, {delta:g})-DP at worst "
                          f"(record-level, add or remove one example, per user; per-user epsilons below) for every "
                          f"shared checkpoint the server released.")
        if eval_entries and eval_eps is not None:
            g["statement"] += (f" The final evaluation's figures are user-level ({eval_eps:.3g}, "
                               f"{eval_entries[0]['delta']:g})-DP.")
        if infinite:
            g["statement"] = (f"NO DP GUARANTEE for {len(infinite)} device(s) that released an update without DP noise "
                              f"(epsilon infinite from then on: {', '.join(infinite)}). For the others: "
                              + g["statement"])
    return g


def _server_view(metrics: dict, server: list[dict]) -> dict:
    rounds = [e for e in server if e.get("stage") == "train"]
    evals = [e for e in server if e.get("stage") == "evaluate"]
    modes = sorted({e.get("aggregation") for e in rounds if e.get("aggregation")}) or ([metrics.get("aggregation")] if metrics.get("aggregation") else [])
    individual = any(e.get("individual_updates_visible") for e in rounds)
    lines = []
    if individual:
        lines.append("each device's shared-adapter update, example weight and metrics, in the clear (plain aggregation)")
    elif rounds:
        lines.append("per round, only the cohort's sums: the summed shared update, summed weight and summed metrics "
                     "(secure aggregation); each device's masked vector is uniformly random without the masks")
    if evals:
        e = evals[-1]
        names = ", ".join(e.get("metric_names", []))
        if e.get("per_client_metrics_visible") or e.get("user_labels_visible"):
            lines.append(f"at the final evaluation, each device's figures with that device's own noise"
                         f"{' and its user label' if e.get('user_labels_visible') else ''} ({names})")
        else:
            lines.append(f"at the final evaluation, only the noised totals of {e.get('replies', 0)} devices' figures "
                         f"(secure sum with each device's share of the evaluation noise; summary: {names})")
    sa = metrics.get("secagg")
    if sa:
        lines.append(f"secure aggregation settings: clip norm {sa.get('clip-norm')}, {sa.get('modulus-bits')}-bit modulus, "
                     f"distributed DP {'on' if sa.get('ddp') else 'off'}; summed extras: {', '.join(sa.get('extras', []))}")
    lines.append("the cohort it sampled, and which devices replied, declined or failed")
    return {
        "aggregation": modes,
        "individual_updates_visible": individual,
        "sees": lines,
        "rounds": [{k: e.get(k) for k in ("round", "aggregation", "cohort", "contributors", "declined", "error_replies",
                                          "weight_sum")} | {"metric_sums": sorted(e.get("metric_sums", {})),
                                                            "update_tensors": len(e.get("update_sum", []))}
                   for e in rounds],
        "evaluation": evals[-1] if evals else None,
        "secagg": metrics.get("secagg"),
        "warnings": metrics.get("warnings", []),
    }


def _strip_scores(empirical: dict) -> dict:
    out = json.loads(json.dumps(empirical))
    for r in out.get("one_run", {}).values():
        r.pop("scores", None)
        r.pop("included", None)
    for r in out.get("mia", {}).values():
        r.pop("member_scores", None)
        r.pop("nonmember_scores", None)
    return out


def _status(audit: dict, *, dp: bool) -> dict:
    v = audit["inventory"]["verification"]
    comp = audit["inventory"]["completeness"]
    emp = audit["empirical"]
    status = {
        "guarantee": ("record-level DP, epsilon <= %.3g at delta %g" % (audit["epsilon_summary"]["max"] or 0.0,
                                                                         audit["epsilon_summary"]["delta"])) if dp else "NO DP GUARANTEE",
        "inventory_ok": bool(v["ok"]) and (comp is None or comp["complete"]) and not audit["inventory"]["unrecorded_devices"],
        "inventory": ("verified: no personal-head tensor, token id or text left any device "
                      f"({v['messages']} messages from {v['devices']} devices)") if v["ok"] else
                     f"FAILED: {len(v['violations'])} violation(s)",
        "accountant_ok": audit["accountant_check"]["ok"],
        "empirical": "not run (fedpersona audit-run)",
        "violation": False,
        "flags": [],
    }
    totals = [u["epsilon_total"] for u in audit["users"] if u.get("epsilon_total") is not None]
    if dp and totals:
        status["guarantee"] += f"; with the local-only baseline, composed: <= {max(totals):.3g}"
    ev = audit["guarantee"].get("evaluation", {})
    if ev.get("present"):
        status["guarantee"] += f"; the final evaluation: user-level epsilon <= {ev['epsilon_max']:.3g}"
    infinite = audit["epsilon_summary"].get("infinite") or []
    if dp and infinite:
        status["guarantee"] = (f"NO DP GUARANTEE for {len(infinite)} device(s) (released without noise); the others: "
                               + status["guarantee"])
    if comp is not None and not comp["complete"]:
        status["flags"].append("inventory incomplete: the server received replies that no device recorded")
    if audit["inventory"]["unrecorded_devices"]:
        status["flags"].append(f"{len(audit['inventory']['unrecorded_devices'])} device(s) trained but recorded no inventory")
    if not v["ok"]:
        status["flags"].append("data-flow violation: something personal left a device")
    if not status["accountant_ok"]:
        status["flags"].append("the ledgers' epsilon disagrees with the independent RDP implementation")
    if not dp:
        status["flags"].append("privacy.enabled = false: no differential-privacy guarantee")
    for row in audit["users"]:
        over = (row.get("budget") or {}).get("composed_over")
        if over is not None:
            status["flags"].append(f"{row['user']}: the federated ledger and the local-only baseline's, composed, "
                                   f"reach epsilon {over:.3f} > the budget {audit['epsilon_summary']['target']:g}")
    for device, errors in sorted(audit.get("device_errors", {}).items()):
        # A restored older copy of a device's state (client/store.py's freshness anchor and receipt).
        status["flags"].extend(f"{device}: {e}" for e in errors if e.startswith("freshness: rollback detected"))
    for device, rounds in sorted(audit.get("released_without_noise", {}).items()):
        status["flags"].append(f"{device} released an update without DP noise (round(s) "
                               f"{', '.join(str(r) for r in rounds if r is not None) or '?'}): its epsilon is "
                               "infinite and no DP claim holds for it")
    if emp:
        ver = emp["verdict"]
        status["violation"] = bool(ver["violation"])
        lb = ver["empirical_epsilon_lower_bound"]
        ceiling = ver.get("ceiling")
        cap = f", ceiling {ceiling:.2f}" if ceiling is not None else ""
        if ver["violation"]:
            status["empirical"] = f"VIOLATION: {'; '.join(ver['violations'])}"
        elif ver["theoretical_epsilon"] is None:
            status["empirical"] = (f"no DP guarantee to check; measured on what the devices released "
                                   f"({ver.get('headline_target', 'shared')}): epsilon >= {lb:.3f} (95%{cap})"
                                   + (" and attacks above chance" if ver["leakage_detected"] else ""))
        else:
            status["empirical"] = (f"no violation: on what the devices released ({ver.get('headline_target', 'shared')}), "
                                   f"empirical epsilon lower bound {lb:.3f} (95%{cap}) <= theoretical "
                                   f"{ver['theoretical_epsilon']:.3f}")
        if ver.get("device_outputs"):
            status["device_outputs"] = ("what the devices' own outputs reveal (no DP guarantee covers the local "
                                        "head; no verdict against epsilon): " + "; ".join(ver["device_outputs"]))
        if ver["violation"]:
            status["flags"].extend(ver["violations"])
        if ver.get("exceeds_reference"):
            status["flags"].append(f"empirical epsilon lower bound {ver['empirical_epsilon_lower_bound']:.3f} exceeds the "
                                   f"DP run's epsilon {ver['reference_epsilon']:.3f}: this run is measurably less private")
        if not dp and ver["leakage_detected"]:
            status["flags"].append("leakage detected: " + "; ".join(ver["evidence"]))
    status["ok"] = not status["flags"]
    return status
