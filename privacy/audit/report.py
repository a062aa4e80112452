"""``fedpersona audit``: the privacy report of a run (or of one device), as HTML with PNG plots and as JSON.

Sources, all read-only:

* the devices' own state folders: the privacy ledger (the same encrypted file each device keeps
  and composes; read with the device's key), the personal head's tensor names and digests, and
  ``inventory.jsonl`` (every reply the device sent);
* the run folder: ``metrics.json`` (config, rounds, final evaluation), ``server_inventory.jsonl``
  (what the server saw), ``checkpoints/`` (what was released), ``audit/empirical.json`` (the
  attacks of ``fedpersona audit-run``).

:func:`build_audit` gathers and checks; :func:`write_report` writes ``audit.json``,
``audit.html`` and ``audit_*.png`` (the HTML embeds the plots too, so it stands alone).
A device auditing itself passes its state folder alone (``fedpersona audit --device DIR``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from privacy.audit.inventory import check_completeness, personal_digests, summarize_inventory, verify_inventory

logger = logging.getLogger(__name__)

VERSION = 1
DEFAULT_DELTA = 1e-3  # the shipped configs' delta, used when a device is audited without its run


# ---------------------------------------------------------------------------------- gathering
def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _is_device_dir(p: Path) -> bool:
    return p.is_dir() and not p.name.startswith(("_", ".")) and any(
        (p / f).exists() for f in ("device.key", "ledger.enc", "inventory.jsonl", "_manifest.enc"))


def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float | None:
    """Epsilon of a ledger history with :mod:`privacy.rdp` (not Opacus): the cross-check."""
    from privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_subsampled_gaussian

    if not history:
        return 0.0
    rdp = np.zeros(len(DEFAULT_ORDERS))
    for sigma, q, steps in history:
        rdp = rdp + rdp_subsampled_gaussian(q=q, sigma=sigma, steps=steps)
    eps, _ = epsilon_from_rdp(rdp=rdp, delta=delta)
    return _finite(eps)


def read_device(state_dir: Path, *, delta: float, target_epsilon: float | None, dp: bool = True,
                label: str | None = None) -> dict:
    """Everything the audit needs from one device's state folder (errors are reported, not raised)."""
    from client.inventory import read_inventory
    from client.store import DeviceStore
    from privacy.ledger import PrivacyLedger

    out: dict[str, Any] = {"device": label or state_dir.name, "state_dir": str(state_dir), "errors": []}
    out["inventory"] = read_inventory(state_dir)
    store = DeviceStore(state_dir)
    try:
        text = store.load_text("ledger")
    except Exception as exc:  # StateError (tampered, rolled back, key missing) or a bad key
        out["errors"].append(f"ledger unreadable: {type(exc).__name__}: {exc}")
        text = None
    ledger = None
    if text is not None:
        try:
            ledger = PrivacyLedger.from_json(text)
        except ValueError as exc:
            out["errors"].append(f"ledger invalid: {exc}")
    if ledger is not None:
        eps = ledger.epsilon(delta) if dp else math.inf
        out.update({
            "accountant": ledger.accountant,
            "history": [list(h) for h in ledger.history],
            "steps": ledger.total_steps,
            "rounds": [{**r, "epsilon": _finite(r["epsilon"])} for r in ledger.rounds],
            "epsilon": _finite(eps),
            "epsilon_independent": _independent_epsilon(ledger.history, delta) if ledger.accountant == "rdp" and dp else None,
            "user_level": [{**u, "epsilon": _finite(u["epsilon"])} for u in ledger.user_level_entries],
        })
        budget = {"target": target_epsilon, "exhausted": False, "after_round": None}
        if dp and target_epsilon is not None and ledger.rounds:
            last = ledger.rounds[-1]
            nxt = ledger.epsilon_if(noise_multiplier=last["noise_multiplier"], sample_rate=last["sample_rate"],
                                    num_steps=max(1, last["steps"]), delta=delta)
            if nxt > target_epsilon * (1 + 1e-9):
                budget.update(exhausted=True, after_round=last["round"], epsilon_next=_finite(nxt))
        out["budget"] = budget
    else:
        out.update({"steps": 0, "rounds": [], "epsilon": 0.0 if dp else None, "user_level": [], "history": []})
    try:
        head = store.load_tensors("personal")
    except Exception as exc:
        out["errors"].append(f"personal head unreadable: {type(exc).__name__}: {exc}")
        head = None
    out["personal_names"] = sorted(head) if head else []
    out["personal_digests"] = sorted(personal_digests(head)) if head else []
    return out


def _checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    rounds = []
    if root.is_dir():
        for d in root.glob("round-*"):
            if (d / "round.json").is_file():
                try:
                    rounds.append(int(d.name.split("-")[1]))
                except ValueError:
                    pass
    return sorted(rounds)


def build_audit(run_dir: str | Path | None = None, *, state_dir: str | Path | None = None,
                device_dir: str | Path | None = None, delta: float | None = None,
                target_epsilon: float | None = None) -> dict:
    """Gather ledgers, inventories, the server's view and the empirical results; check them."""
    from privacy.audit.experiment import read_empirical
    from server.inventory import read_server_inventory

    if run_dir is None and device_dir is None:
        raise ValueError("give a run folder, or --device with a device's state folder")
    metrics: dict = {}
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None:
        if not (run_path / "metrics.json").is_file():
            raise ValueError(f"{run_path} is not a run folder: no metrics.json in it")
        metrics = json.loads((run_path / "metrics.json").read_text())
    config = metrics.get("config", {})
    dp = bool(config.get("privacy.enabled", True))
    delta = float(delta if delta is not None else config.get("privacy.delta", DEFAULT_DELTA))
    target = target_epsilon if target_epsilon is not None else config.get("privacy.target-epsilon")

    # The devices: one folder (--device), or every device folder of the run.
    if device_dir is not None:
        dirs = [Path(device_dir)]
        if not dirs[0].is_dir():
            raise ValueError(f"--device {device_dir}: not a folder")
    else:
        root = Path(state_dir) if state_dir is not None else Path(config.get("run.state-dir", "state")) / str(metrics.get("run", ""))
        if state_dir is not None and not any(_is_device_dir(p) for p in root.iterdir() if root.is_dir()):
            root = root / str(metrics.get("run", ""))  # --state-dir may name the parent of the run's folders
        dirs = sorted(p for p in root.iterdir() if _is_device_dir(p)) if root.is_dir() else []
        if not dirs:
            logger.warning("no device state folders under %s: ledgers and inventories are not audited", root)
    labels = {}
    from client.device import slug

    for u in metrics.get("final", {}).get("users", []):
        labels[slug(u["user"])] = u["user"]
    devices = [read_device(d, delta=delta, target_epsilon=_finite(target), dp=dp, label=labels.get(d.name)) for d in dirs]

    inventories = {d["device"]: d["inventory"] for d in devices if d["inventory"]}
    check = verify_inventory(inventories, personal_names={d["device"]: d["personal_names"] for d in devices},
                             personal_digests={d["device"]: d["personal_digests"] for d in devices})
    server = read_server_inventory(run_path) if run_path is not None else []
    completeness = check_completeness(inventories, server) if server else None
    unrecorded = [d["device"] for d in devices if not d["inventory"] and d.get("steps", 0) > 0]
    empirical = read_empirical(run_path) if run_path is not None else None

    eps = [d["epsilon"] for d in devices if d.get("epsilon") is not None]
    audit = {
        "version": VERSION,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scope": "device" if device_dir is not None else "run",
        "run": metrics.get("run"),
        "run_dir": str(run_path) if run_path is not None else None,
        "guarantee": _guarantee(config, devices, metrics, dp=dp, delta=delta, run_dir=run_path),
        "users": [_user_row(d) for d in devices],
        "epsilon_summary": {"devices": len(devices), "max": max(eps) if eps else None, "mean": float(np.mean(eps)) if eps else None,
                            "min": min(eps) if eps else None, "delta": delta, "target": _finite(target)},
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
        "rounds": [r["round"] for r in d.get("rounds", [])], "steps": d.get("steps", 0),
        "noise_multiplier": d["history"][-1][0] if d.get("history") else None,
        "sample_rate": d["history"][-1][1] if d.get("history") else None,
        "accountant": d.get("accountant"), "budget": d.get("budget"), "user_level": d.get("user_level", []),
        "trajectory": [(r["round"], r["epsilon"]) for r in d.get("rounds", [])],
        "messages": len(d["inventory"]),
    }


def _accountant_check(devices: list[dict]) -> dict:
    diffs = [abs(d["epsilon"] - d["epsilon_independent"]) / max(1e-12, d["epsilon"])
             for d in devices if d.get("epsilon") and d.get("epsilon_independent") is not None]
    worst = max(diffs) if diffs else None
    return {"compared": len(diffs), "max_relative_difference": worst,
            "ok": worst is None or worst < 1e-3,
            "method": "each ledger's history re-accounted with privacy/rdp.py (an independent RDP implementation)"}


def _personal_head_statement(head_mode: str, split: str) -> str:
    """What holds for the personal head in this run (``privacy.personal-head``)."""
    common = ("The personalized model (shared adapter + personal head) is never aggregated: it is NOT covered by "
              "any user-level protection. Its membership inference is measured separately below.")
    if split == "fedsa":
        return ("privacy.personal-head = dp (split fedsa): the head (B) is part of the shared adapter and is trained in "
                "the same DP-SGD pass; the device's record-level bound covers it. " + common)
    if head_mode == "local":
        return ("privacy.personal-head = local: joint DP. The head is trained on the device WITHOUT noise, on top of the "
                "shared adapter; the released update never depends on it (the shared pass runs with the head switched "
                "off), so the guarantee above covers everything that leaves the device. The head itself and the "
                "personalized model's outputs are NOT covered by any differential-privacy guarantee: anyone who can "
                "query the device's model queries a model trained on the user's data without noise. " + common)
    return ("privacy.personal-head = dp: the head is trained with DP-SGD too, with its own ledger (ledger-head) and "
            "epsilon (head-epsilon), reported beside the shared one; the personalized model is covered by the "
            "composition of both. " + common)


def _guarantee(config: dict, devices: list[dict], metrics: dict, *, dp: bool, delta: float, run_dir: Path | None) -> dict:
    accountants = sorted({d["accountant"] for d in devices if d.get("accountant")}) or [config.get("privacy.accountant", "rdp")]
    user_level = [u for d in devices for u in d.get("user_level", [])]
    ckpts = _checkpoints(run_dir) if run_dir is not None else []
    clip = config.get("privacy.max-grad-norm")
    head_mode = config.get("privacy.personal-head", "dp")
    split = config.get("adapter.split", "ffa")
    g = {
        "dp_enabled": dp,
        "unit": "one training example (cue, reply) of one user",
        "adjacency": ("record-level, per user: two datasets of a user that differ by adding or removing one of its "
                      "examples; each user's epsilon covers everything computed from that user's data"),
        "mechanism": (f"DP-SGD on the device (Opacus): per-sample gradient clipping at {clip}, Gaussian noise of "
                      "standard deviation noise_multiplier x clip per step, over "
                      + ("the shared adapter (A and B, the personal B inside it: split fedsa)" if split == "fedsa" else
                         "the shared adapter only, with the personal head switched off in that pass, so the released "
                         "update never depends on the head")),
        "accountant": ", ".join(a.upper() for a in accountants) + " (Opacus); cross-checked with privacy/rdp.py",
        "delta": delta,
        "sampling": ("Poisson sampling: every example joins each step's batch independently with probability "
                     "q = batch-size / examples, from the OS's secure randomness, the batches never leaving the "
                     "device; empty batches are noise-only steps and are counted"),
        "composition": "over every round the device ever trained in, across restarts (the ledger file on the device)",
        "checkpoints": (f"covers every released checkpoint ({len(ckpts)} of them: rounds {ckpts[0]}-{ckpts[-1]})" if ckpts
                        else "covers every released checkpoint") + ": each is a function of the devices' DP-SGD outputs "
                       "(post-processing), and a user's epsilon bounds the whole sequence, not each checkpoint alone",
        "user_level": (
            {"present": True, "entries": len(user_level),
             "epsilon_max": max((u["epsilon"] for u in user_level if u["epsilon"] is not None), default=None),
             "mechanisms": sorted({u["mechanism"] for u in user_level}),
             "statement": "user-level (whole-user adjacency) guarantee from distributed DP noise under secure "
                          "aggregation, as recorded in the ledgers; it holds against the server and the released "
                          "adapter under the secure-aggregation assumptions (honest-but-curious server, enough "
                          "honest surviving clients per round)"}
            if user_level else
            {"present": False,
             "statement": "no user-level guarantee: no distributed-DP entries in the ledgers. A user's whole "
                          "dataset is protected only through the record-level bound (group privacy)"}),
        "personal_head": _personal_head_statement(head_mode, split),
    }
    if not dp:
        g["statement"] = "NO DIFFERENTIAL-PRIVACY GUARANTEE: privacy.enabled = false for this run."
        g["mechanism"] = "none: the devices trained without DP-SGD (no clipping, no noise)"
        g["accountant"] = "none (every epsilon is infinite)"
        g["checkpoints"] = "no released checkpoint is covered by any guarantee"
    else:
        eps = [d["epsilon"] for d in devices if d.get("epsilon") is not None]
        g["statement"] = (f"Each user's training examples are ({max(eps) if eps else 0:.3g}, {delta:g})-DP at worst "
                          f"(record-level, per user; per-user epsilons below), for every checkpoint the server released.")
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
        names = ", ".join(evals[-1].get("metric_names", []))
        lines.append(f"at the final evaluation, each device's metrics and user label in the clear ({names})")
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
    if emp:
        ver = emp["verdict"]
        status["violation"] = bool(ver["violation"])
        lb = ver["empirical_epsilon_lower_bound"]
        if ver["violation"]:
            status["empirical"] = f"VIOLATION: {'; '.join(ver['violations'])}"
        elif ver["theoretical_epsilon"] is None:
            status["empirical"] = (f"no DP guarantee to check; measured leakage: epsilon >= {lb:.3f} (95%)"
                                   + (" and attacks above chance" if ver["leakage_detected"] else ""))
        else:
            status["empirical"] = (f"no violation: empirical epsilon lower bound {lb:.3f} (95%) <= theoretical "
                                   f"{ver['theoretical_epsilon']:.3f}")
        if ver["violation"]:
            status["flags"].extend(ver["violations"])
        if ver.get("exceeds_reference"):
            status["flags"].append(f"empirical epsilon lower bound {ver['empirical_epsilon_lower_bound']:.3f} exceeds the "
                                   f"DP run's epsilon {ver['reference_epsilon']:.3f}: this run is measurably less private")
        if not dp and ver["leakage_detected"]:
            status["flags"].append("leakage detected: " + "; ".join(ver["evidence"]))
    status["ok"] = not status["flags"]
    return status


# ------------------------------------------------------------------------------------ plots
def _figures(audit: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        figs[name] = buf.getvalue()

    users = audit["users"]
    eps = [u["epsilon"] for u in users if u["epsilon"] is not None]
    if eps:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
        ax[0].hist(eps, bins=min(20, max(5, len(eps))), color="#4477aa")
        if audit["epsilon_summary"]["target"]:
            ax[0].axvline(audit["epsilon_summary"]["target"], color="#cc3311", ls="--", label="budget")
            ax[0].legend()
        ax[0].set_xlabel(f"epsilon (delta = {audit['epsilon_summary']['delta']:g})")
        ax[0].set_ylabel("users")
        ax[0].set_title("per-user epsilon")
        for u in users:
            if u["trajectory"]:
                r, e = zip(*u["trajectory"])
                ax[1].plot(r, e, marker="o", ms=3, lw=1, alpha=0.7)
        from matplotlib.ticker import MaxNLocator

        ax[0].yaxis.set_major_locator(MaxNLocator(integer=True))
        ax[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        ax[1].set_xlabel("round")
        ax[1].set_ylabel("epsilon after the round")
        ax[1].set_title("epsilon over the rounds each user trained")
        save("epsilon", fig)

    inv = audit["inventory"]["summary"]
    if inv["message_types"]:
        fig, ax = plt.subplots(figsize=(6, 3))
        types = sorted(inv["message_types"])
        ax.bar(types, [inv["message_types"][t]["bytes"] / 1e3 for t in types], color="#228833")
        ax.set_ylabel("kB sent (all devices)")
        ax.set_title("what left the devices, by message type")
        save("inventory", fig)

    emp = audit.get("_empirical_full")
    if emp:
        from privacy.audit.mia import roc_curve

        fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
        for i, (target, r) in enumerate(emp["one_run"].items()):
            s, inc = np.asarray(r["scores"]), np.asarray(r["included"], dtype=bool)
            bins = np.linspace(s.min(), s.max() + 1e-9, 25)
            ax[i].hist(s[inc], bins=bins, alpha=0.6, label="planted", color="#cc3311")
            ax[i].hist(s[~inc], bins=bins, alpha=0.6, label="not planted", color="#4477aa")
            th = r["theoretical_epsilon"]
            ax[i].set_title(f"one-run ({target}): eps >= {r['epsilon_lower_bound']:.2f} "
                            f"(theory {'inf' if th is None else f'{th:.2f}'})", fontsize=9)
            ax[i].set_xlabel("score: base loss - model loss")
            ax[i].legend(fontsize=8)
        for name, r in emp["mia"].items():
            fpr, tpr = roc_curve(r["member_scores"], r["nonmember_scores"])
            ax[2].plot(np.maximum(fpr, 1e-3), np.maximum(tpr, 1e-3), label=f"{name} (AUC {r['auc']:.2f})", lw=1.2)
        ax[2].plot([1e-3, 1], [1e-3, 1], color="grey", ls=":", lw=1)
        ax[2].set_xscale("log")
        ax[2].set_yscale("log")
        ax[2].set_xlabel("false positive rate")
        ax[2].set_ylabel("true positive rate")
        ax[2].set_title("membership inference (train vs held-out)", fontsize=9)
        ax[2].legend(fontsize=7)
        save("empirical", fig)

        ex = emp["exposure"]
        if ex["canaries"]:
            fig, ax = plt.subplots(figsize=(7, 3.2))
            labels, shared, pers = [], [], []
            for c in ex["canaries"]:
                labels.append(f"{c['secret']} x{c['repeats']}")
                shared.append(c["shared"]["exposure"])
                pers.append(c["personalized"]["exposure"])
            for c in ex["controls"]["shared"]:
                labels.append("control")
                shared.append(c["exposure"])
                pers.append(math.nan)
            x = np.arange(len(labels))
            ax.bar(x - 0.2, shared, 0.4, label="shared adapter", color="#4477aa")
            ax.bar(x + 0.2, pers, 0.4, label="personalized", color="#cc3311")
            xs = [c["shared"]["exposure_extrapolated"] for c in ex["canaries"]] + [c["exposure_extrapolated"] for c in ex["controls"]["shared"]]
            xp = [c["personalized"]["exposure_extrapolated"] for c in ex["canaries"]] + [math.nan] * len(ex["controls"]["shared"])
            ax.plot(x - 0.2, [v if v is not None else math.nan for v in xs], "k_", ms=14, label="extrapolated (skew-normal)")
            ax.plot(x + 0.2, [v if v is not None else math.nan for v in xp], "k_", ms=14)
            ax.axhline(ex["threshold"], color="black", ls="--", lw=1, label="above chance (95%)")
            ax.set_xticks(x, labels, rotation=30, fontsize=7)
            ax.set_ylabel("exposure (bits)")
            ax.set_title(f"canary exposure ({ex['candidates']} candidates of {ex['space']:.0e})", fontsize=9)
            ax.legend(fontsize=7)
            save("exposure", fig)
    return figs


# ------------------------------------------------------------------------------------- HTML
def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v):
        if v is None:
            return "&ndash;"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(audit: dict, figs: dict[str, bytes]) -> str:
    e = html.escape
    st, g = audit["status"], audit["guarantee"]

    def img(name: str) -> str:
        if name not in figs:
            return ""
        return f'<p><img alt="{name}" src="data:image/png;base64,{base64.b64encode(figs[name]).decode()}"></p>'

    def badge(ok: bool, text: str) -> str:
        return f'<span class="{"ok" if ok else "bad"}">{e(text)}</span>'

    parts = [f"""<!doctype html><html><head><meta charset="utf-8"><title>fedpersona privacy audit: {e(str(audit['run'] or audit['users'][0]['user'] if audit['users'] else ''))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;font-size:13px;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left}} th{{background:#f2f2f2}} .ok{{color:#176b2c;font-weight:bold}}
.bad{{color:#b00020;font-weight:bold}} code{{background:#f5f5f5}} img{{max-width:100%}}</style></head><body>
<h1>Privacy audit{': run ' + e(audit['run']) if audit['run'] else ': device ' + e(audit['users'][0]['user'] if audit['users'] else '')}</h1>
<p>Generated {e(audit['generated'])} by <code>fedpersona audit</code>. JSON twin: <code>audit.json</code>.</p>
<h2>Summary</h2><ul>
<li>Guarantee: {badge(g['dp_enabled'], st['guarantee'])}</li>
<li>Data flow: {badge(st['inventory_ok'], st['inventory'])}</li>
<li>Accountant cross-check: {badge(st['accountant_ok'], 'agrees' if st['accountant_ok'] else 'DISAGREES')}
 (max relative difference {audit['accountant_check']['max_relative_difference'] if audit['accountant_check']['max_relative_difference'] is not None else '&ndash;'})</li>
<li>Empirical audit: {badge(not st['violation'], st['empirical'])}</li></ul>"""]
    if st["flags"]:
        parts.append("<p class='bad'>Flags:</p><ul>" + "".join(f"<li class='bad'>{e(f)}</li>" for f in st["flags"]) + "</ul>")

    parts.append(f"<h2>1. Guarantee</h2><p><b>{e(g['statement'])}</b></p><table>")
    for key in ("unit", "adjacency", "mechanism", "accountant", "delta", "sampling", "composition", "checkpoints"):
        parts.append(f"<tr><th>{e(key)}</th><td>{e(str(g[key]))}</td></tr>")
    parts.append(f"<tr><th>user level</th><td>{e(g['user_level']['statement'])}</td></tr>")
    parts.append(f"<tr><th>personal head</th><td>{e(g['personal_head'])}</td></tr></table>")

    parts.append("<h2>2. Per-user epsilon</h2><p>Read from each device's own ledger file (the one it composes and "
                 "checks before every round).</p>")
    parts.append(img("epsilon"))
    rows = [dict(u, rounds=len(u["rounds"]), budget=("exhausted after round %s" % u["budget"]["after_round"])
                 if u.get("budget") and u["budget"].get("exhausted") else "within budget") for u in audit["users"]]
    parts.append(_table(rows, [("user", "user"), ("rounds", "rounds"), ("steps", "DP steps"),
                               ("noise_multiplier", "noise multiplier"), ("sample_rate", "sample rate"),
                               ("epsilon", "epsilon"), ("epsilon_independent", "epsilon (privacy/rdp.py)"),
                               ("budget", "budget"), ("messages", "messages sent")]))
    ex = audit["budget_exhausted"]
    parts.append(f"<p>{len(ex)} user(s) hit their budget" + (": " + ", ".join(
        f"{e(x['user'])} after round {x['after_round']}" for x in ex) if ex else "") + ".</p>")

    inv = audit["inventory"]
    v = inv["verification"]
    parts.append("<h2>3. What left each device</h2>")
    parts.append(f"<p>Verification: {badge(v['ok'], 'passed' if v['ok'] else 'FAILED')} over {v['messages']} messages "
                 f"({v['rows']} fields) from {v['devices']} devices: no tensor of the personal head (by name or by "
                 "digest), no unmasked integer array (token ids), no text outside the protocol's status and "
                 "user-label fields.</p>")
    if v["violations"]:
        parts.append(_table(v["violations"][:50], [("device", "device"), ("round", "round"),
                                                   ("message_type", "type"), ("problem", "problem")]))
    if inv["completeness"]:
        c = inv["completeness"]
        parts.append(f"<p>Completeness against the server's log: {badge(c['complete'], 'complete' if c['complete'] else 'INCOMPLETE')}</p>")
        parts.append(_table(c["rounds"], [("stage", "stage"), ("round", "round"), ("server_received", "replies the server received"),
                                          ("devices_recorded", "replies the devices recorded")]))
    parts.append(img("inventory"))
    parts.append("<p>Every field that left any device:</p>")
    parts.append(_table(inv["summary"]["fields"], [("kind", "kind"), ("record", "record"), ("name", "name"),
                                                   ("dtype", "dtype / type"), ("shape", "shape"), ("masked", "masked"),
                                                   ("protocol", "secagg protocol"), ("count", "messages")]))
    parts.append(_table([{"device": k, **d} for k, d in inv["summary"]["devices"].items()],
                        [("device", "device"), ("messages", "messages"), ("bytes", "bytes"), ("arrays", "arrays"),
                         ("masked_arrays", "masked"), ("errors", "error replies")]))

    sv = audit["server_view"]
    parts.append("<h2>4. What the server could see</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in sv["sees"]) + "</ul>")
    if sv["rounds"]:
        parts.append(_table([dict(r, metric_sums=", ".join(r["metric_sums"])) for r in sv["rounds"]],
                            [("round", "round"), ("aggregation", "aggregation"), ("cohort", "cohort"),
                             ("contributors", "contributors"), ("declined", "declined"), ("error_replies", "errors"),
                             ("weight_sum", "summed weight"), ("metric_sums", "summed metrics"),
                             ("update_tensors", "summed tensors")]))
    for w in sv.get("warnings", []):
        parts.append(f"<p class='bad'>Run warning: {e(w)}</p>")

    emp = audit["empirical"]
    parts.append("<h2>5. Empirical audits</h2>")
    if not emp:
        parts.append("<p>Not run for this run. <code>fedpersona audit-run</code> runs them.</p>")
    else:
        ver = emp["verdict"]
        parts.append(f"<p>Run with DP {'on' if emp['dp'] else '<b>off</b>'}; {len(emp['users'])} users; "
                     f"{emp['settings']['onerun_canaries']} one-run canaries; {len(emp['exposure']['canaries'])} secret "
                     f"canaries x {emp['settings']['exposure_repeats']} copies; {emp['seconds']:.0f} s.</p>")
        parts.append(f"<p>Verdict: {badge(not ver['violation'], 'VIOLATION' if ver['violation'] else 'no violation')}"
                     f" &mdash; empirical epsilon lower bound {ver['empirical_epsilon_lower_bound']:.3f}, theoretical "
                     f"{ver['theoretical_epsilon'] if ver['theoretical_epsilon'] is not None else 'inf (no DP)'}"
                     + (f", DP run's epsilon {ver['reference_epsilon']:.3f}: "
                        + badge(not ver['exceeds_reference'], 'exceeded' if ver['exceeds_reference'] else 'not exceeded')
                        if 'reference_epsilon' in ver else "") + "</p>")
        if ver["evidence"]:
            parts.append("<p>Evidence of leakage (each at 95% confidence):</p><ul>" + "".join(
                f"<li>{e(x)}</li>" for x in ver["evidence"]) + "</ul>")
        parts.append(img("empirical"))
        parts.append("<h3>One-run audit (Steinke, Nasr, Jagielski 2023)</h3>")
        parts.append(_table([{"target": t, **r} for t, r in emp["one_run"].items()],
                            [("target", "attacked model"), ("m", "canaries"), ("included", "planted"), ("r", "guesses"),
                             ("v", "correct"), ("accuracy", "accuracy"), ("epsilon_lower_bound", "epsilon lower bound (95%)"),
                             ("theoretical_epsilon", "theoretical epsilon"), ("violation", "violation")]))
        parts.append("<h3>Canary exposure (Carlini et al. 2019)</h3>")
        x = emp["exposure"]
        rows = [{"user": c["user"], "secret": c["secret"], "repeats": c["repeats"], "shared": c["shared"]["exposure"],
                 "shared_x": c["shared"]["exposure_extrapolated"], "pers": c["personalized"]["exposure"],
                 "pers_x": c["personalized"]["exposure_extrapolated"]} for c in x["canaries"]]
        rows += [{"user": "control (never planted)", "shared": c["exposure"], "shared_x": c["exposure_extrapolated"]}
                 for c in x["controls"]["shared"]]
        parts.append(_table(rows, [("user", "user"), ("secret", "secret"), ("repeats", "copies"),
                                   ("shared", "exposure, shared"), ("shared_x", "extrapolated"),
                                   ("pers", "exposure, personalized"), ("pers_x", "extrapolated")]))
        parts.append(f"<p>Exposure ceiling with {x['candidates']} candidates: {math.log2(x['candidates'] + 1):.2f} bits "
                     f"(space {x['space']:.0e}: {math.log2(x['space']):.1f} bits); above chance at 95%: > "
                     f"{x['threshold']:.2f} bits.</p>")
        parts.append(img("exposure"))
        parts.append("<h3>Membership inference (train vs held-out examples)</h3>")
        parts.append(_table([{"attack": n, **r} for n, r in emp["mia"].items()],
                            [("attack", "attack"), ("auc", "AUC"), ("auc_low", "95% low"), ("auc_high", "95% high"),
                             ("tpr_at_fpr", "TPR at FPR <= 0.1%"), ("fpr_achieved", "FPR achieved"),
                             ("members", "members"), ("nonmembers", "non-members"), ("above_chance", "above chance")]))
        parts.append("<p><code>personal-head/calibrated</code> attacks the personal head alone (score: loss under "
                     "the shared adapter minus loss under the personalized model). With fewer than 1000 "
                     "non-members the TPR at 0.1% FPR is the TPR at FPR 0.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(audit: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``audit.json``, ``audit.html`` and ``audit_*.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(audit)
    paths = {}
    for name, data in figs.items():
        p = out / f"audit_{name}.png"
        p.write_bytes(data)
        paths[name] = p
    public = {k: v for k, v in audit.items() if not k.startswith("_")}
    (out / "audit.json").write_text(json.dumps(_clean(public), indent=1, default=_default, allow_nan=False))
    (out / "audit.html").write_text(_html(audit, figs))
    paths["json"], paths["html"] = out / "audit.json", out / "audit.html"
    return paths


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null (infinite epsilon is written as null, as in the ledger)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _default(x: Any) -> Any:
    if isinstance(x, (np.floating,)):
        return _finite(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    return str(x)
