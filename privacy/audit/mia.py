"""Membership inference: does a model's loss tell training examples from held-out ones?

Two attacks, both scored per example (higher score = "member"):

* ``loss``: the negative loss under the attacked model (Yeom et al. 2018);
* ``calibrated``: the loss under a *reference* model minus the loss under the attacked model
  (difficulty calibration, Watson et al. ICLR 2022; the offline reference of LiRA's family).
  The reference here is the base model (no adapters), which never saw any user's data; to
  attack the personal head alone, the reference is the shared adapter without the head.

Reported: ROC AUC with a 95% interval (Hanley and McNeil's standard error) and the true
positive rate at a false positive rate of at most 0.1% (Carlini et al., "Membership inference
attacks from first principles", 2022). With ``n`` non-members the smallest FPR that can be
resolved is ``1/n``: below 1000 non-members, TPR at 0.1% FPR is the TPR at FPR 0 (threshold
above every non-member), and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["auc", "auc_interval", "tpr_at_fpr", "roc_curve", "attack_summary"]


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P[score(member) > score(non-member)] + P[tie] / 2 (the Mann-Whitney statistic)."""
    a = np.asarray(member_scores, dtype=float)
    b = np.asarray(nonmember_scores, dtype=float)
    if a.size == 0 or b.size == 0:
        return math.nan
    ranks = stats.rankdata(np.concatenate([a, b]))
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def auc_interval(value: float, n_members: int, n_nonmembers: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Hanley-McNeil (1982) normal interval for an AUC."""
    if not math.isfinite(value) or n_members == 0 or n_nonmembers == 0:
        return (math.nan, math.nan)
    a = min(max(value, 1e-9), 1 - 1e-9)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_members - 1) * (q1 - a * a) + (n_nonmembers - 1) * (q2 - a * a)) / (n_members * n_nonmembers)
    z = stats.norm.ppf(0.5 + confidence / 2)
    se = math.sqrt(max(var, 0.0))
    return (max(0.0, value - z * se), min(1.0, value + z * se))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float = 1e-3) -> tuple[float, float]:
    """(TPR, achieved FPR) at the lowest threshold whose FPR is at most ``fpr`` ("score > threshold" = member)."""
    a = np.asarray(member_scores, dtype=float)
    b = np.sort(np.asarray(nonmember_scores, dtype=float))
    if a.size == 0 or b.size == 0:
        return (math.nan, math.nan)
    allowed = int(math.floor(fpr * b.size))  # non-members allowed above the threshold
    threshold = b[b.size - 1 - allowed] if allowed < b.size else -math.inf
    return float((a > threshold).mean()), float((b > threshold).mean())


def roc_curve(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) over every threshold, for plotting."""
    a = np.asarray(member_scores, dtype=float)
    b = np.asarray(nonmember_scores, dtype=float)
    thresholds = np.unique(np.concatenate([a, b, [np.inf]]))[::-1]
    fpr = np.array([(b >= t).mean() for t in thresholds])
    tpr = np.array([(a >= t).mean() for t in thresholds])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def attack_summary(member_scores: Sequence[float], nonmember_scores: Sequence[float], *, fpr: float = 1e-3) -> dict:
    """AUC (+ 95% interval), TPR at ``fpr``, counts, and whether the AUC is above chance at 95%."""
    a, b = list(member_scores), list(nonmember_scores)
    value = auc(a, b)
    lo, hi = auc_interval(value, len(a), len(b))
    tpr, achieved = tpr_at_fpr(a, b, fpr)
    return {
        "auc": value, "auc_low": lo, "auc_high": hi, "tpr_at_fpr": tpr, "fpr_target": fpr, "fpr_achieved": achieved,
        "fpr_resolution": 1.0 / len(b) if b else math.nan, "members": len(a), "nonmembers": len(b),
        "above_chance": bool(math.isfinite(lo) and lo > 0.5),
    }
