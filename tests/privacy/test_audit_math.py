"""The audit's statistics on synthetic inputs, checked against hand computations; the accountant read by the audit."""

import math

import numpy as np
import pytest
from scipy import stats

from fedpersona.privacy.audit.canary import exposure, random_secrets, secret_reply, word_canaries
from fedpersona.privacy.audit.mia import attack_summary, auc, tpr_at_fpr
from fedpersona.privacy.audit.onerun import epsilon_lower_bound, guesses, one_run_audit, p_value


# ----------------------------------------------------------------------------- one-run audit
def test_p_value_delta_zero_is_the_binomial_tail():
    p = math.exp(1) / (1 + math.exp(1))
    # 9 of 10 correct: P[Bin(10, p) >= 9] = 10 p^9 (1-p) + p^10
    assert p_value(m=50, r=10, v=9, epsilon=1.0, delta=0) == pytest.approx(10 * p**9 * (1 - p) + p**10, rel=1e-12)


def test_p_value_with_delta_matches_a_hand_computation():
    # r = 2 guesses, both correct, m = 4 canaries, eps = 1, delta = 0.01:
    # tail = p^2; P[Bin = 1] = 2p(1-p), P[Bin = 0] = (1-p)^2;
    # worst = max(P[Bin = 1] / 1, (P[Bin = 1] + P[Bin = 0]) / 2); p-value = tail + 2 m delta worst.
    p = 1 / (1 + math.exp(-1))
    worst = max(2 * p * (1 - p), (2 * p * (1 - p) + (1 - p) ** 2) / 2)
    expected = p**2 + 2 * 4 * 0.01 * worst
    assert p_value(m=4, r=2, v=2, epsilon=1.0, delta=0.01) == pytest.approx(expected, rel=1e-12)


def test_lower_bound_all_correct_has_a_closed_form():
    # v = r, delta = 0: P[Bin(r, p) = r] = p^r = beta  =>  p = beta^(1/r), eps = log(p / (1 - p)).
    for r, beta in [(10, 0.05), (32, 0.05 / 3), (64, 0.01)]:
        p = beta ** (1 / r)
        assert epsilon_lower_bound(m=200, r=r, v=r, delta=0, beta=beta) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_lower_bound_is_zero_at_chance_and_the_p_value_is_valid():
    assert epsilon_lower_bound(m=100, r=20, v=10, delta=0) == 0.0
    assert epsilon_lower_bound(m=100, r=20, v=0, delta=0) == 0.0
    # The bound is the largest eps whose p-value is <= beta.
    eps = epsilon_lower_bound(m=100, r=40, v=36, delta=1e-5)
    assert p_value(m=100, r=40, v=36, epsilon=eps, delta=1e-5) <= 0.05
    assert p_value(m=100, r=40, v=36, epsilon=eps + 1e-3, delta=1e-5) > 0.05
    # delta can only weaken the bound
    assert epsilon_lower_bound(m=100, r=40, v=36, delta=1e-3) < eps


def test_guesses_and_the_audit_on_synthetic_scores():
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.5, 0.45]
    g = guesses(scores, 2, 2)
    assert g.tolist() == [1, -1, 1, -1, 0, 0, 0, 0]
    rng = np.random.default_rng(0)
    included = rng.random(128) < 0.5
    perfect = np.where(included, 1.0, 0.0) + rng.normal(0, 0.01, 128)
    res = one_run_audit(perfect, included, delta=0.0)
    # default guess sizes m/16, m/8, m/4 per side; the best is the largest, all correct, at beta = 0.05 / 3
    assert (res.k, res.r, res.v, res.settings_tried) == (32, 64, 64, 3)
    p = (0.05 / 3) ** (1 / 64)
    assert res.epsilon_lower_bound == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert res.ceiling == pytest.approx(res.epsilon_lower_bound, abs=1e-9)
    noise = one_run_audit(rng.normal(size=128), included, delta=1e-5)
    assert noise.epsilon_lower_bound < 0.5


def test_one_run_bad_input():
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(m=4, r=5, v=1, epsilon=1.0, delta=0)
    with pytest.raises(ValueError, match="same length"):
        one_run_audit([1.0, 2.0], [True], delta=0)


# ------------------------------------------------------------------------------ membership
def test_auc_and_tpr_by_hand():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5
    assert auc([2, 4], [1, 3]) == pytest.approx(3 / 4)
    # 10 non-members; FPR <= 0.1% means no non-member above the threshold (= the top non-member).
    tpr, achieved = tpr_at_fpr([5, 9.5, 11, 12], list(range(10)), 1e-3)
    assert (tpr, achieved) == (0.75, 0.0)
    # with 2000 non-members, 2 may be above the threshold (1997: 1998 and 1999 are above it)
    non = np.arange(2000.0)
    tpr, achieved = tpr_at_fpr([1996.5, 1998.5, 3000], non, 1e-3)
    assert achieved == pytest.approx(2 / 2000) and tpr == pytest.approx(2 / 3)
    s = attack_summary(np.arange(50, 100.0), np.arange(0, 50.0))
    assert s["auc"] == 1.0 and s["above_chance"] and s["fpr_resolution"] == 1 / 50
    assert auc([0.1], [0.2]) == stats.mannwhitneyu([0.1], [0.2]).statistic


# --------------------------------------------------------------------------------- canaries
def test_exposure_is_a_rank_p_value():
    cand = np.arange(1.0, 100.0)  # 99 candidates
    best = exposure(0.5, cand, space=10**6)
    assert best["rank"] == 1 and best["p_value"] == pytest.approx(1 / 100)
    assert best["exposure"] == pytest.approx(math.log2(100)) == pytest.approx(best["exposure_ceiling"])
    worst = exposure(1000.0, cand, space=10**6)
    assert worst["exposure"] == 0.0
    mid = exposure(50.5, cand, space=10**6)
    assert mid["p_value"] == pytest.approx(51 / 100)
    # Extrapolation (skew-normal fit) goes beyond the sampled ceiling, up to log2(space).
    normal = np.random.default_rng(0).normal(20.0, 2.0, 500)
    far = exposure(4.0, normal, space=10**6)
    assert far["exposure"] == pytest.approx(math.log2(501))
    assert math.log2(501) < far["exposure_extrapolated"] <= math.log2(10**6)


def test_canaries_are_distinct_and_well_formed():
    rng = np.random.default_rng(1)
    secrets = random_secrets(rng, 20, digits=6, exclude=["000000"])
    assert len(set(secrets)) == 20 and all(len(s) == 6 and s.isdigit() for s in secrets)
    assert secret_reply("123456").endswith("123456")
    pairs = word_canaries(rng, ["alpha", "bravo", "charlie", "delta", "echo"], 30, cue_words=2, reply_words=4)
    assert len(set(pairs)) == 30


# ------------------------------------------------------------------- accountant, as audited
# A device that trained two rounds with different (sigma, q): the audit reads its own ledger file.
AUDIT_HISTORY = [(1.1, 0.2, 30), (0.9, 0.25, 15)]
PINNED_AUDIT_EPSILON = 11.934088632448525  # Opacus RDP at delta 1e-5; privacy/rdp.py agrees to 1e-12


def test_audit_reads_the_device_ledger_and_cross_checks_the_accountant(tmp_path):
    from fedpersona.client.store import DeviceStore
    from fedpersona.client.audit_records import read_device
    from fedpersona.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger()
    for round_, (sigma, q, steps) in enumerate(AUDIT_HISTORY, start=1):
        ledger.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        ledger.record_round(round=round_, steps=steps, noise_multiplier=sigma, sample_rate=q, delta=1e-5)
    DeviceStore(tmp_path / "dev").save_text("ledger", ledger.to_json())
    dev = read_device(tmp_path / "dev", delta=1e-5, target_epsilon=12.0)
    assert dev["epsilon"] == pytest.approx(PINNED_AUDIT_EPSILON, rel=1e-9)
    assert dev["epsilon_independent"] == pytest.approx(PINNED_AUDIT_EPSILON, rel=1e-9)
    assert [r["round"] for r in dev["rounds"]] == [1, 2]
    # Another 15 steps at (0.9, 0.25) would exceed a budget of 12: exhausted after round 2.
    assert dev["budget"]["exhausted"] and dev["budget"]["after_round"] == 2
    assert not read_device(tmp_path / "dev", delta=1e-5, target_epsilon=20.0)["budget"]["exhausted"]
