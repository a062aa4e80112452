"""Run outputs: ``metrics.json``, CSV files, PNG plots and the summary table.

``results/<run>/metrics.json``  config, per-round cohort figures, final per-user evaluation, summary
``results/<run>/rounds.csv``    one row per round
``results/<run>/users.csv``     one row per user (held-out loss/accuracy of each model, epsilon)
``results/<run>/rounds.png``    contributors, declines and the applied update's norm per round
``results/<run>/users.png``     per-user paired gain over the base model: personalized, local-only, shared (sorted bars)
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

MODELS = (("base", "base"), ("shared", "shared (global)"), ("personal", "personalized"), ("local", "local-only"))


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def distribution(values: list[float]) -> dict[str, float]:
    """Mean, median and worst decile (mean of the highest 10% of losses, at least one user)."""
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return {"mean": math.nan, "median": math.nan, "worst_decile": math.nan, "n": 0}
    n = len(vals)
    mid = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    k = max(1, math.ceil(n / 10))
    return {"mean": sum(vals) / n, "median": mid, "worst_decile": sum(vals[-k:]) / k, "n": n}


def summarize_users(users: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for key, _ in MODELS:
        if any(f"{key}-loss" in u for u in users):
            out[f"{key}-loss"] = distribution([u.get(f"{key}-loss") for u in users])
            out[f"{key}-accuracy"] = distribution([u.get(f"{key}-accuracy") for u in users])
    out["epsilon"] = distribution([u.get("epsilon") for u in users if (u.get("epsilon") or 0) >= 0])
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_rounds(run_dir: Path, rounds: list[dict]) -> Path | None:
    """What the server has per round: contributors and declines, and the norm of the applied mean update.

    (No device sends a loss, an epsilon or a timing: fedpersona.privacy.audit.message_table.)
    """
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["round"] for r in rounds]
    for key, label in (("contributors", "contributors (trained, in the sum)"), ("declined", "declined"),
                       ("failed", "failed")):
        ax[0].plot(xs, [r.get(key, 0) for r in rounds], marker="o", label=label)
    ax[0].set_xlabel("round")
    ax[0].set_ylabel("devices")
    ax[0].legend(fontsize=8)
    ax[0].grid(alpha=0.3)
    ax[1].plot(xs, [r.get("update-norm", math.nan) for r in rounds], marker="o", color="tab:red")
    ax[1].set_xlabel("round")
    ax[1].set_ylabel("L2 norm of the applied mean update")
    ax[1].grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}: per-round server figures")
    fig.tight_layout()
    out = run_dir / "rounds.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


#: Up to this many users ``users.png`` draws a pair of named bars per user; above, one point per user.
BARS_UP_TO = 60


def plot_users(run_dir: Path, users: list[dict]) -> Path | None:
    """Per-user paired gain over the base model (%, higher is better), users sorted by personalized gain."""
    rows = [u for u in users if u.get("base-loss") is not None and math.isfinite(u["base-loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def gain(u: dict, k: str) -> float:
        v = u.get(f"{k}-loss")
        return 100.0 * (u["base-loss"] - v) / u["base-loss"] if v is not None and math.isfinite(v) else math.nan

    has_local = any("local-loss" in u for u in rows)
    rows = sorted(rows, key=lambda u: gain(u, "personal"))
    xs = list(range(len(rows)))
    many = len(rows) > BARS_UP_TO
    fig, ax = plt.subplots(figsize=(10.0 if many else max(7.0, 0.38 * len(rows) + 2), 4.6))
    if many:  # one point per user: bars and names would be unreadable (and the figure tens of thousands of pixels wide)
        ax.plot(xs, [gain(u, "personal") for u in rows], ".", ms=3, color="tab:blue",
                label="personalized (shared + own head)")
        if has_local:
            ax.plot(xs, [gain(u, "local") for u in rows], ".", ms=3, color="tab:orange", alpha=0.8,
                    label="local-only (same training, no federation)")
        ax.plot(xs, [gain(u, "shared") for u in rows], ".", ms=2, color="black", label="shared adapter alone")
        ax.set_xlabel(f"{len(rows)} users, sorted by personalized gain (names in users.csv)")
    else:
        width = 0.4 if has_local else 0.7
        ax.bar([x - (width / 2 if has_local else 0) for x in xs], [gain(u, "personal") for u in rows], width,
               color="tab:blue", label="personalized (shared + own head)")
        if has_local:
            ax.bar([x + width / 2 for x in xs], [gain(u, "local") for u in rows], width, color="tab:orange", alpha=0.8,
                   label="local-only (same training, no federation)")
        ax.scatter(xs, [gain(u, "shared") for u in rows], marker="D", s=14, color="black", zorder=3,
                   label="shared adapter alone")
        ax.set_xticks(xs, [str(u.get("user", u.get("user-id", i)))[:22] for i, u in enumerate(rows)], rotation=70,
                      ha="right", fontsize=6)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("held-out loss gain over the base model (%)")

    def mean_gain(k: str) -> float:
        vals = [gain(u, k) for u in rows if math.isfinite(gain(u, k))]
        return sum(vals) / len(vals) if vals else math.nan

    title = f"{run_dir.name}: per-user gain over base; mean personalized {mean_gain('personal'):+.1f}%"
    if has_local:
        beats = sum(1 for u in rows if u.get("local-loss") is not None and u["personal-loss"] < u["local-loss"])
        title += f", local-only {mean_gain('local'):+.1f}%; personalized beats local-only for {beats}/{len(rows)}"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = run_dir / "users.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


EPSILON_NOTE = ("eps: the user's one budget: the device's federated DP-SGD ledger and (simulations) the local-only "
                "baseline's, composed; local eps: the baseline's ledger alone (epsilon-federated in users.csv: the "
                "shared updates the device sent, alone)")


def summary_table(users: list[dict], summary: dict) -> str:
    """Per-user table (simulation: rows read from the devices' stores) plus the distribution rows, as fixed-width text.

    The distribution rows come from the per-user rows when there are any (a simulation reads them from
    the devices' stores on its own machine) and otherwise from ``summary``, the server's noised secure
    sum of the devices' figures (:mod:`fedpersona.privacy.secagg.eval_figures`); the last line says which.
    """
    cols = [k for k, _ in MODELS if any(f"{k}-loss" in u for u in users) or f"{k}-loss" in summary]
    local = any("local-epsilon" in u for u in users)
    head = f"{'user':<38}{'rounds':>7}{'eps':>7}" + (f"{'local eps':>10}" if local else "") + "".join(
        f"{c + ' loss':>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for u in sorted(users, key=lambda u: u["user"]):
        eps = u.get("epsilon")
        eps_s = "inf" if eps is None or eps < 0 else f"{eps:.2f}"
        leps = u.get("local-epsilon")
        leps_s = ("-" if leps is None else "inf" if leps < 0 else f"{leps:.2f}") if local else ""
        rounds = u.get("rounds")
        r_s = "-" if rounds is None or not math.isfinite(rounds) else f"{int(rounds)}"
        lines.append(
            f"{u['user'][:37]:<38}{r_s:>7}{eps_s:>7}" + (f"{leps_s:>10}" if local else "")
            + "".join(f"{_num(u.get(c + '-loss')):>14.3f}" for c in cols)
            + (f"  FAILED: {u.get('error', '')}" if u.get("status") == "failed" else "")
        )
    lines.append("-" * len(head))
    rows = [u for u in users if u.get("status") != "failed" and any(f"{c}-loss" in u for c in cols)]
    dist = summarize_users(rows) if rows else summary
    pad = 52 + (10 if local else 0)
    for stat in ("mean", "median", "worst_decile"):
        label = stat.replace("_", " ")
        lines.append(
            f"{label:<{pad}}" + "".join(f"{_num(dist.get(c + '-loss', {}).get(stat)):>14.3f}" for c in cols)
        )
    acc = "".join(f"{_num(dist.get(c + '-accuracy', {}).get('mean')):>14.3f}" for c in cols)
    lines.append(f"{'mean next-token accuracy':<{pad}}" + acc)
    lines.append(f"distribution rows: the {len(rows)} per-user rows above (the devices' own stores, this machine)"
                 if rows else "distribution rows: the server's noised secure sum of the devices' figures (a model is "
                              "shown only when at least 3 noise standard deviations of devices hold it)")
    if local:
        lines.append(EPSILON_NOTE)
    return "\n".join(lines)


def _num(x) -> float:
    return math.nan if x is None else float(x)


def write_outputs(run_dir: Path, metrics: dict, *, plots: bool = True) -> dict[str, Path]:
    """Write metrics.json, CSVs and (``plots``) the plots for what the run has so far."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "metrics.json", metrics)
    paths = {"metrics": run_dir / "metrics.json"}
    rounds = metrics.get("rounds", [])
    _write_csv(run_dir / "rounds.csv", rounds)
    if plots and (p := plot_rounds(run_dir, rounds)) is not None:
        paths["rounds_plot"] = p
    users = metrics.get("final", {}).get("users", [])
    if users:
        _write_csv(run_dir / "users.csv", users)
        if plots and (p := plot_users(run_dir, users)) is not None:
            paths["users_plot"] = p
    return paths
