"""The audit report as files: ``audit.json``, ``audit.html`` (from ``templates/audit.html.j2``) and ``audit_*.png``.

Takes the dict of :func:`fedpersona.privacy.audit.report.build_audit`. The HTML embeds the plots too, so it
stands alone; matplotlib is loaded only when a report is written.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import numpy as np

from fedpersona.privacy.audit.mia import roc_curve
from fedpersona.privacy.audit.report import _finite

__all__ = ["write_report"]

TEMPLATES = Path(__file__).parent / "templates"


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
        n = len(emp["one_run"])
        fig, ax = plt.subplots(1, n + 1, figsize=(4.7 * (n + 1), 3.6))
        for i, (target, r) in enumerate(emp["one_run"].items()):
            s, inc = np.asarray(r["scores"]), np.asarray(r["included"], dtype=bool)
            bins = np.linspace(s.min(), s.max() + 1e-9, 25)
            ax[i].hist(s[inc], bins=bins, alpha=0.6, label="planted", color="#cc3311")
            ax[i].hist(s[~inc], bins=bins, alpha=0.6, label="not planted", color="#4477aa")
            th = r["theoretical_epsilon"]
            judged = r.get("judged", True)
            ax[i].set_title(f"one-run ({target}): eps >= {r['epsilon_lower_bound']:.2f} "
                            + (f"(theory {'inf' if th is None else f'{th:.2f}'})" if judged else "(not judged)"),
                            fontsize=9)
            ax[i].set_xlabel("score: base loss - model loss")
            ax[i].legend(fontsize=8)
        for name, r in emp["mia"].items():
            fpr, tpr = roc_curve(r["member_scores"], r["nonmember_scores"])
            ax[n].plot(np.maximum(fpr, 1e-3), np.maximum(tpr, 1e-3), label=f"{name} (AUC {r['auc']:.2f})", lw=1.2)
        ax[n].plot([1e-3, 1], [1e-3, 1], color="grey", ls=":", lw=1)
        ax[n].set_xscale("log")
        ax[n].set_yscale("log")
        ax[n].set_xlabel("false positive rate")
        ax[n].set_ylabel("true positive rate")
        ax[n].set_title("membership inference (train vs held-out)", fontsize=9)
        ax[n].legend(fontsize=7)
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
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                          lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def _fmt(v: Any) -> str:
    """A table cell: dashes for missing values, yes/no, 4 significant digits."""
    if v is None:
        return markupsafe.Markup("&ndash;")
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_ENV.filters["cell"] = _fmt
_ENV.filters["g4"] = lambda v: f"{v:.4g}"
_ENV.filters["f3"] = lambda v: f"{v:.3f}"
_ENV.filters["f2"] = lambda v: f"{v:.2f}"
_ENV.filters["e0"] = lambda v: f"{v:.0e}"
_ENV.filters["log2"] = math.log2


def _html(audit: dict, figs: dict[str, bytes]) -> str:
    images = {name: base64.b64encode(data).decode() for name, data in figs.items()}
    return _ENV.get_template("audit.html.j2").render(audit=audit, images=images)


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
