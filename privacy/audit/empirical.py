"""The empirical audit's results as a file: ``<run dir>/audit/empirical.json``, and their verdict.

:mod:`fedpersona.simulations.audit.experiment` (``fedpersona audit-run``) plants the canaries, runs the
federation and attacks; what it writes, and how a result is judged, is defined here so that the
report (:mod:`fedpersona.privacy.audit.report`) reads it without knowing how it was made.

What is judged against which epsilon (:func:`verdict`):

* what the devices released against the canary owners' federated ledgers: the **shared adapter**
  (every checkpoint the server holds) and each device's **own release** (the shared adapter it received
  plus the update it sent, before any sum: the DP-SGD output itself, which the auditor watches in
  :mod:`fedpersona.simulations.audit.experiment`); a lower bound above that epsilon is a violation;
* the **personalized model** (shared adapter + the device's head) only where a guarantee covers
  it: with ``privacy.personal-head = dp`` against the composition of the federated and the head's
  ledgers, with ``adapter.split = fedsa`` (the head inside the one DP pass) against the federated
  ledger. With a ``local`` head (the default) nothing covers it: its bound, exposure and membership
  inference are reported as what the device's own outputs reveal (``device_outputs``), with no
  verdict against epsilon.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["EMPIRICAL_FILE", "RELEASED_TARGETS", "VERSION", "head_mode", "read_empirical", "verdict"]

EMPIRICAL_FILE = Path("audit") / "empirical.json"
VERSION = 2


def head_mode(split: str | None, personal_head: str | None) -> str:
    """``in-shared`` (split fedsa: the head is trained in the released pass), ``dp`` or ``local``; ``unknown``."""
    if split == "fedsa":
        return "in-shared"
    if personal_head in ("dp", "local"):
        return personal_head
    return "unknown"


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


#: What the devices release, always judged against the federated ledgers: the shared adapter (every checkpoint)
#: and each device's own last release (the shared adapter it received plus the update it sent, before any sum).
RELEASED_TARGETS = ("shared", "device-release")


def _released(name: str) -> bool:
    """Attacks on what the devices released, as opposed to the device's personalized model."""
    return name.split("/")[0] in RELEASED_TARGETS


def verdict(result: dict, *, reference_epsilon: float | None = None) -> dict:
    """Violation (a judged lower bound above its epsilon), the evidence of leakage, what the device outputs reveal."""
    theory = result["theoretical"]["epsilon_max"]
    theory = math.inf if theory is None else theory
    one_run = result["one_run"]
    judged = {t: r for t, r in one_run.items() if r.get("judged", True)}

    def bound_of(t: str, r: dict) -> float:
        th = r.get("theoretical_epsilon", theory)
        return math.inf if th is None else th

    violations = [f"one-run audit ({t}): empirical epsilon >= {r['epsilon_lower_bound']:.3f} at "
                  f"{100 * r['confidence']:.0f}% confidence exceeds the theoretical epsilon {bound_of(t, r):.3f}"
                  for t, r in judged.items() if r["epsilon_lower_bound"] > bound_of(t, r) + 1e-9]
    evidence, device = [], []
    for t, r in one_run.items():
        if r["epsilon_lower_bound"] > 0:
            (evidence if t in judged else device).append(f"one-run audit ({t}): epsilon >= {r['epsilon_lower_bound']:.3f}"
                                                         f" (ceiling {r.get('ceiling', math.nan):.2f})")
    for t, v in result["exposure"]["above_chance"].items():
        if v:
            (evidence if t in judged else device).append(f"exposure above chance ({t})")
    for n, r in result["mia"].items():
        if r["above_chance"]:
            text = f"membership inference {n}: AUC {r['auc']:.3f} (95% interval {r['auc_low']:.3f}-{r['auc_high']:.3f})"
            covered = _released(n) or "personalized" in judged
            (evidence if covered else device).append(text)
    released = [t for t in one_run if t in RELEASED_TARGETS] or list(one_run)
    head_target = max(released, key=lambda t: (one_run[t]["epsilon_lower_bound"], one_run[t].get("ceiling", 0.0)))
    headline = one_run[head_target]
    out = {
        "dp": result["dp"],
        "personal_head": result["theoretical"].get("personal_head", "unknown"),
        "theoretical_epsilon": _finite(theory),
        "empirical_epsilon_lower_bound": headline["epsilon_lower_bound"],
        "ceiling": headline.get("ceiling"),
        "headline_target": head_target,
        "judged": sorted(judged),
        "violation": bool(violations),
        "violations": violations,
        "leakage_detected": bool(evidence),
        "evidence": evidence,
        "device_outputs": device,
    }
    if reference_epsilon is not None:
        out["reference_epsilon"] = float(reference_epsilon)
        out["exceeds_reference"] = bool(headline["epsilon_lower_bound"] > reference_epsilon)
    return out


def read_empirical(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / EMPIRICAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None
