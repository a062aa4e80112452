"""The ledger's steps on a noisy sum: integer orders, the collusion table, the plan beside what was spent."""

import json
import math

import numpy as np
import pytest

from fedpersona.privacy.ledger import INTEGER_ORDERS, LedgerError, PrivacyLedger, calibrate_noise
from fedpersona.privacy.rdp import epsilon_from_rdp, rdp_subsampled_gaussian

SIGMA, Q, STEPS, T, DELTA = 1.2, 0.2, 12, 4, 1e-3
#: Opacus RDP at integer orders, for sigma * sqrt((t - j) / t), j = 0..3 (pinned; cross-checked below).
PINNED = [2.9991295081844216, 3.918968299619511, 6.015812480475572, 11.18645072263668]


def _independent(sigma: float, q: float = Q, steps: int = STEPS) -> float:
    orders = np.asarray(INTEGER_ORDERS, dtype=float)
    eps, _ = epsilon_from_rdp(rdp=rdp_subsampled_gaussian(q=q, sigma=sigma, steps=steps, orders=orders),
                              orders=orders, delta=DELTA)
    return eps


def sum_ledger() -> PrivacyLedger:
    ledger = PrivacyLedger()
    for _ in range(STEPS):
        ledger.step_on_sum(noise_multiplier=SIGMA, sample_rate=Q, honest=T)
    return ledger


def test_the_epsilon_and_the_collusion_table_are_pinned_and_cross_checked():
    ledger = sum_ledger()
    assert ledger.orders == "integer" and ledger.sum_steps == [(SIGMA, Q, T, STEPS)]
    rows = ledger.collusion(DELTA)
    assert [r["colluders"] for r in rows] == [0, 1, 2, 3]
    assert [r["epsilon"] for r in rows] == pytest.approx(PINNED, rel=1e-9)
    assert rows[0]["epsilon"] == pytest.approx(ledger.epsilon(DELTA), rel=1e-12)
    for r in rows:
        assert r["noise_factor"] == pytest.approx(math.sqrt((T - r["colluders"]) / T))
        assert r["epsilon"] == pytest.approx(_independent(SIGMA * r["noise_factor"]), rel=1e-6)
    # The last row: the device's own share alone, sigma / sqrt(t).
    assert rows[-1]["epsilon"] == pytest.approx(_independent(SIGMA / math.sqrt(T)), rel=1e-6)
    # Integer orders cost little against Opacus's whole grid at this setting (a looser bound, never a tighter one).
    plain = PrivacyLedger()
    plain.step(noise_multiplier=SIGMA, sample_rate=Q, num_steps=STEPS)
    assert plain.epsilon(DELTA) <= ledger.epsilon(DELTA) <= 1.01 * plain.epsilon(DELTA)


def test_device_noise_steps_keep_their_sigma_in_the_collusion_table():
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=2.0, sample_rate=Q, num_steps=5)  # an earlier run with the noise on the device
    for _ in range(STEPS):
        ledger.step_on_sum(noise_multiplier=SIGMA, sample_rate=Q, honest=T)
    orders = np.asarray(INTEGER_ORDERS, dtype=float)
    for r in ledger.collusion(DELTA):
        rdp = (rdp_subsampled_gaussian(q=Q, sigma=2.0, steps=5, orders=orders)
               + rdp_subsampled_gaussian(q=Q, sigma=SIGMA * r["noise_factor"], steps=STEPS, orders=orders))
        assert r["epsilon"] == pytest.approx(epsilon_from_rdp(rdp=rdp, orders=orders, delta=DELTA)[0], rel=1e-6)


def test_a_ledger_without_sums_has_no_collusion_table_and_keeps_opacus_orders():
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=SIGMA, sample_rate=Q, num_steps=STEPS)
    assert ledger.collusion(DELTA) == [] and ledger.orders == "all"
    assert "sum_steps" not in ledger.state_dict() and "plan" not in ledger.state_dict()


def test_plan_and_sum_steps_survive_a_restart_and_are_validated():
    ledger = sum_ledger()
    plan = ledger.set_plan(participations=2, steps=2 * STEPS, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA,
                           noise_on="sum")
    assert plan["epsilon"] == pytest.approx(_independent(SIGMA, steps=2 * STEPS), rel=1e-6)
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.plan == ledger.plan and again.sum_steps == ledger.sum_steps
    assert again.epsilon(DELTA) == ledger.epsilon(DELTA) and again.collusion(DELTA) == ledger.collusion(DELTA)
    state = json.loads(ledger.to_json())
    forged = dict(state, sum_steps=[[SIGMA, Q, T, STEPS + 1]])  # more sum steps than the history holds
    with pytest.raises(LedgerError, match="history holds"):
        PrivacyLedger.from_json(json.dumps(forged))
    with pytest.raises(LedgerError, match="honest"):
        PrivacyLedger.from_json(json.dumps(dict(state, sum_steps=[[SIGMA, Q, 0, STEPS]])))
    with pytest.raises(LedgerError, match="plan"):
        PrivacyLedger.from_json(json.dumps(dict(state, plan={"participations": 2})))


def test_steps_on_a_sum_need_the_rdp_accountant_and_valid_arguments():
    with pytest.raises(ValueError, match="honest"):
        PrivacyLedger().step_on_sum(noise_multiplier=1.0, sample_rate=0.1, honest=0)
    with pytest.raises(ValueError, match="RDP at integer orders"):
        PrivacyLedger(accountant="prv").step_on_sum(noise_multiplier=1.0, sample_rate=0.1, honest=2)
    with pytest.raises(ValueError, match="orders"):
        calibrate_noise(target_epsilon=8, delta=1e-3, sample_rate=0.2, steps=10, accountant="prv", orders="integer")


def test_epsilon_if_on_a_sum_uses_integer_orders_and_calibration_agrees():
    sigma = calibrate_noise(target_epsilon=8.0, delta=DELTA, sample_rate=Q, steps=30, orders="integer")
    empty = PrivacyLedger()
    eps = empty.epsilon_if(noise_multiplier=sigma, sample_rate=Q, num_steps=30, delta=DELTA, on_sum=True)
    assert 7.99 <= eps <= 8.0
    assert eps == pytest.approx(_independent(sigma, steps=30), rel=1e-6)


def test_a_round_summary_is_updated_after_each_step_of_the_same_round():
    ledger = PrivacyLedger()
    for step in (1, 2):
        ledger.step_on_sum(noise_multiplier=SIGMA, sample_rate=Q, honest=T)
        ledger.record_round(round=1, steps=step, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA, update=True)
    ledger.step_on_sum(noise_multiplier=SIGMA, sample_rate=Q, honest=T)
    ledger.record_round(round=2, steps=1, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA, update=True)
    assert [(r["round"], r["steps"]) for r in ledger.rounds] == [(1, 2), (2, 1)]


def test_the_audit_shows_planned_vs_spent_and_the_collusion_table(tmp_path):
    from fedpersona.privacy.audit.render import write_report
    from fedpersona.privacy.audit.report import DeviceRecords, RunRecords, build_audit

    ledger = sum_ledger()
    ledger.set_plan(participations=2, steps=2 * STEPS, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA,
                    noise_on="sum")
    ledger.record_round(round=1, steps=STEPS, noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA)
    run = RunRecords(str(tmp_path), {"run": "r", "config": {"privacy.delta": DELTA, "privacy.target-epsilon": 8.0,
                                                             "privacy.noise-on": "sum",
                                                             "privacy.honest-contributors": T}})
    audit = build_audit([DeviceRecords("u1", str(tmp_path / "u1"), ledger=ledger)], run)
    (user,) = audit["users"]
    assert user["plan"]["participations_planned"] == 2 and user["plan"]["participations_taken"] == 1
    assert user["plan"]["epsilon_spent"] == pytest.approx(PINNED[0], rel=1e-9)
    assert user["plan"]["epsilon_planned"] > user["plan"]["epsilon_spent"]
    assert [r["epsilon"] for r in user["collusion"]] == pytest.approx(PINNED, rel=1e-9)
    # The independent re-accounting uses the ledger's integer orders: it agrees.
    assert audit["accountant_check"]["ok"] and user["epsilon_independent"] == pytest.approx(PINNED[0], rel=1e-6)
    assert "at least t devices that follow the protocol" in audit["guarantee"]["assumption"]
    html = write_report(audit, tmp_path / "audit")["html"].read_text()
    assert "epsilon at j = 0 / 1 / ... / t - 1 colluders" in html and "epsilon planned" in html
