"""The report states what holds: from the run's or the device's recorded settings (never a default), one budget
per user, and the message table's rows for what leaves a device."""

import pytest

from fedpersona.privacy.audit.message_table import TABLE
from fedpersona.privacy.audit.report import DeviceRecords, build_audit, leaves_device_rows
from fedpersona.privacy.ledger import PrivacyLedger


def _ledger(steps: int, *, sigma: float = 1.0, q: float = 0.2, rounds: int = 2) -> PrivacyLedger:
    led = PrivacyLedger()
    for r in range(1, rounds + 1):
        led.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        led.record_round(round=r, steps=steps, noise_multiplier=sigma, sample_rate=q, delta=1e-3,
                         settings={"privacy.max-grad-norm": 0.7})
    return led


def test_a_device_alone_is_described_by_the_settings_it_recorded_never_a_default(tmp_path):
    recorded = DeviceRecords(label="alice", state_dir=str(tmp_path), ledger=_ledger(3),
                             config={"privacy.personal-head": "local", "adapter.split": "ffa",
                                     "privacy.max-grad-norm": 0.7, "privacy.delta": 1e-3})
    audit = build_audit([recorded], device_scope=True)
    g = audit["guarantee"]
    assert g["personal_head"].startswith("privacy.personal-head = local (the default)")
    assert "WITHOUT noise" in g["personal_head"] and "NO differential-privacy" in g["personal_head"]
    assert "clipping at 0.7" in g["mechanism"] and "device recorded" in audit["settings_source"]
    # Nothing recorded: the report says it does not know (before: "personal-head = dp ... clipping at None").
    bare = build_audit([DeviceRecords(label="bob", state_dir=str(tmp_path), ledger=PrivacyLedger())],
                       device_scope=True)
    assert bare["guarantee"]["personal_head"].startswith("unknown") and "None" not in bare["guarantee"]["mechanism"]
    assert bare["settings_source"].startswith("none recorded")


def test_dp_head_statement_names_its_ledger(tmp_path):
    rec = DeviceRecords(label="alice", state_dir=str(tmp_path), ledger=_ledger(3),
                        config={"privacy.personal-head": "dp", "adapter.split": "ffa"})
    g = build_audit([rec], device_scope=True)["guarantee"]
    assert "ledger-head" in g["personal_head"] and "composition" in g["personal_head"]
    assert "covers everything that leaves" not in str(g)


def test_one_budget_per_user_composes_the_local_only_baseline(tmp_path):
    fed, base = _ledger(3), _ledger(3)
    rec = DeviceRecords(label="alice", state_dir=str(tmp_path), ledger=fed,
                        other_ledgers={"ledger-local-baseline": base},
                        config={"privacy.personal-head": "local", "privacy.delta": 1e-3})
    alone = fed.epsilon(1e-3)
    both = PrivacyLedger()
    both.step(noise_multiplier=1.0, sample_rate=0.2, num_steps=12)
    audit = build_audit([rec], device_scope=True, target_epsilon=alone * 1.2)
    (row,) = audit["users"]
    assert row["epsilon"] == pytest.approx(alone) and row["epsilon_local_baseline"] == pytest.approx(alone)
    assert row["epsilon_total"] == pytest.approx(both.epsilon(1e-3)) and row["epsilon_total"] > alone * 1.2
    assert any("composed" in f and "local-only baseline" in f for f in audit["status"]["flags"])
    within = build_audit([rec], device_scope=True, target_epsilon=row["epsilon_total"] * 1.01)
    assert not any("composed" in f for f in within["status"]["flags"])


def test_what_leaves_is_the_message_table():
    secure = leaves_device_rows(secagg=True)
    plain = leaves_device_rows(secagg=False)
    summed = leaves_device_rows(secagg=True, noise_on_sum=True)
    assert {r["reply"] for r in summed} - {r["reply"] for r in secure} == {"train.dp_step", "train.personalize"}
    assert {r["reply"] for r in secure} == {"train", "query.advertise", "query.consistency", "query.unmask", "evaluate",
                                            "*"}
    assert any(r["field"] == "masked-vector update/shared-adapter update" for r in secure)
    assert {r["reply"] for r in plain} == {"train", "evaluate", "*"}
    assert len(summed) + len(plain) - sum(r.message == "*" for r in TABLE) == len(TABLE)  # every row in one group
    # The heads trained once at the end (client.head-at = end) answer the personalize exchange in either placement.
    at_end = leaves_device_rows(secagg=True, head_at="end")
    assert {r["reply"] for r in at_end} - {r["reply"] for r in secure} == {"train.personalize"}
