"""The empirical audit's results as a file: ``<run dir>/audit/empirical.json``, and their verdict.

:mod:`simulations.audit_experiment` (``fedpersona audit-run``) plants the canaries, runs the
federation and attacks; what it writes, and how a result is judged, is defined here so that the
report (:mod:`privacy.audit.report`) reads it without knowing how it was made.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["EMPIRICAL_FILE", "VERSION", "read_empirical", "verdict"]

EMPIRICAL_FILE = Path("audit") / "empirical.json"
VERSION = 1


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def verdict(result: dict, *, reference_epsilon: float | None = None) -> dict:
    """Violation (empirical lower bound above the theoretical epsilon) and the evidence of leakage."""
    theory = result["theoretical"]["epsilon_max"]
    theory = math.inf if theory is None else theory
    lbs = {t: r["epsilon_lower_bound"] for t, r in result["one_run"].items()}
    violations = [f"one-run audit ({t}): empirical epsilon >= {lb:.3f} at {100 * result['one_run'][t]['confidence']:.0f}% "
                  f"confidence exceeds the theoretical epsilon {theory:.3f}" for t, lb in lbs.items() if lb > theory + 1e-9]
    evidence = [f"one-run audit ({t}): epsilon >= {lb:.3f}" for t, lb in lbs.items() if lb > 0]
    evidence += [f"exposure above chance ({t})" for t, v in result["exposure"]["above_chance"].items() if v]
    evidence += [f"membership inference {n}: AUC {r['auc']:.3f} (95% interval {r['auc_low']:.3f}-{r['auc_high']:.3f})"
                 for n, r in result["mia"].items() if r["above_chance"]]
    out = {
        "dp": result["dp"],
        "theoretical_epsilon": _finite(theory),
        "empirical_epsilon_lower_bound": max(lbs.values()),
        "violation": bool(violations),
        "violations": violations,
        "leakage_detected": bool(evidence),
        "evidence": evidence,
    }
    if reference_epsilon is not None:
        out["reference_epsilon"] = float(reference_epsilon)
        out["exceeds_reference"] = bool(max(lbs.values()) > reference_epsilon)
    return out


def read_empirical(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / EMPIRICAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None
