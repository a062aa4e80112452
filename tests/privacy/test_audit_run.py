"""The empirical audit can fail: a DP-off run is flagged, the DP run is not; the report says both.

One small model that can memorize (the shared tiny model's embeddings are too small to move its
logits): 3 Shakespeare users, 2 rounds of 30 steps, 64 one-run canaries, two secret canaries x 8 copies.
"""

import json
import math
import warnings

import pytest

from privacy.audit.empirical import verdict
from privacy.audit.render import write_report
from simulations.audit_experiment import AuditSettings, run_audit
from simulations.audit_gather import build_audit
from tests.privacy.audit_helpers import one_thread

SETTINGS = AuditSettings(onerun_canaries=64, exposure_users=2, exposure_secrets=1, exposure_repeats=8, candidates=512)


@pytest.fixture(scope="module")
def expressive_model_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-memorizer")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def audits(expressive_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit-run")
    flat = {
        "model.path": str(expressive_model_dir), "model.seq-len": 32, "model.cue-tokens": 8,
        "adapter.layers": 2, "adapter.personal-layers": 1, "adapter.rank": 8,
        "data.max-users": 3, "data.min-speeches": 40, "data.max-examples": 16,
        "client.local-steps": 30, "client.batch-size": 8, "client.lr": 0.05,
        "client.head-steps": 30, "client.head-batch-size": 8, "client.head-lr": 0.05,
        "server.num-rounds": 2, "server.clients-per-round": 3, "server.min-clients": 2,
        # DP run: a fixed noise multiplier (no calibration, fast); its ledgers give epsilon 0.6-0.8 at delta 1e-5.
        "privacy.delta": 1e-5, "privacy.target-epsilon": 1.0, "privacy.noise-multiplier": 16.0,
        # The head under DP-SGD too, so that the personalized model is covered (the default, a local head
        # trained without noise, is not: joint DP covers only what leaves the device).
        "privacy.personal-head": "dp",
        "eval.local-baseline": False, "eval.per-round": False,
        "run.results-dir": str(tmp / "results"), "run.state-dir": str(tmp / "state"),
    }
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")
        # The DP run trains the personal head under DP too (its own ledger), so that the personalized
        # model's membership inference below tests a guarantee; with the default local head only the
        # shared release is covered (the report says so).
        dp = run_audit(dict(flat, **{"run.name": "a-dp", "privacy.personal-head": "dp"}), dp=True, settings=SETTINGS)
        nodp = run_audit(dict(flat, **{"run.name": "a-nodp"}), dp=False, settings=SETTINGS,
                         reference_epsilon=dp["theoretical"]["epsilon_max"])
    return {"dp": dp, "nodp": nodp, "results": tmp / "results", "state": tmp / "state", "flat": flat}


def test_dp_run_is_not_flagged(audits):
    dp = audits["dp"]
    v = dp["verdict"]
    assert 0 < v["theoretical_epsilon"] <= 1.0
    assert not v["violation"], v
    for r in dp["one_run"].values():
        assert r["epsilon_lower_bound"] <= r["theoretical_epsilon"]
    assert dp["mia"]["personalized/calibrated"]["auc"] < 0.75


def test_non_dp_run_is_flagged(audits):
    nodp, dp_eps = audits["nodp"], audits["dp"]["theoretical"]["epsilon_max"]
    v = nodp["verdict"]
    assert v["theoretical_epsilon"] is None  # no DP: infinite
    # The one-run lower bound is clearly above the DP run's epsilon ...
    assert v["exceeds_reference"] and v["empirical_epsilon_lower_bound"] > dp_eps + 0.5, v
    # ... exposure of the repeated secrets is above chance on the personalized models ...
    assert nodp["exposure"]["above_chance"]["personalized"]
    # ... and membership inference is far above chance, on the personal head too.
    for attack in ("personalized/loss", "personal-head/calibrated"):
        assert nodp["mia"][attack]["above_chance"] and nodp["mia"][attack]["auc"] > 0.85
    assert v["leakage_detected"]


def test_a_lower_bound_above_the_theory_is_a_violation(audits):
    doctored = json.loads(json.dumps(audits["nodp"]))
    doctored["theoretical"]["epsilon_max"] = 0.1  # as if the run had claimed epsilon 0.1
    v = verdict(doctored)
    assert v["violation"] and "exceeds the theoretical epsilon 0.100" in v["violations"][0]


def test_reports(audits):
    results = audits["results"]
    dp_audit = build_audit(results / "a-dp")
    paths = write_report(dp_audit, results / "a-dp")
    html = paths["html"].read_text()
    for text in ("Guarantee", "Poisson", "personal head", "ledger-head", "One-run audit", "Membership inference",
                 "Canary exposure", "What the server could see"):
        assert text in html, text
    data = json.loads(paths["json"].read_text())
    st = data["status"]
    assert st["inventory_ok"] and st["accountant_ok"] and not st["violation"], st
    assert data["inventory"]["verification"]["ok"] and data["inventory"]["completeness"]["complete"]
    assert len(data["users"]) == 3 and all(0 < u["epsilon"] <= 1.0 for u in data["users"])
    assert data["empirical"]["verdict"]["violation"] is False
    assert (results / "a-dp" / "audit_epsilon.png").is_file() and (results / "a-dp" / "audit_empirical.png").is_file()

    nodp_audit = build_audit(results / "a-nodp")
    nodp_html = write_report(nodp_audit, results / "a-nodp")["html"].read_text()
    assert "NOT covered" in nodp_html  # the default local head: the report says what no guarantee covers
    flags = " | ".join(nodp_audit["status"]["flags"])
    assert "no differential-privacy guarantee" in flags and "exceeds the DP run's epsilon" in flags
    assert "leakage detected" in flags
    assert nodp_audit["status"]["inventory_ok"], nodp_audit["inventory"]["verification"]["violations"][:3]


def test_cli_strict_exit_status(audits, capsys):
    from fedpersona.cli import main

    assert main(["audit", str(audits["results"] / "a-dp"), "--strict"]) == 0
    assert main(["audit", str(audits["results"] / "a-nodp"), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "FLAG:" in out and "audit.html" in out


def test_a_device_audits_itself(audits, tmp_path):
    device = sorted(p for p in (audits["state"] / "a-dp").iterdir() if not p.name.startswith("_"))[0]
    audit = build_audit(device_dir=device, delta=1e-5, target_epsilon=1.0)
    paths = write_report(audit, tmp_path)
    assert audit["scope"] == "device" and len(audit["users"]) == 1
    # Without the run's metrics the device is labelled by its folder; its epsilon is one of the run's.
    per_user = audits["dp"]["theoretical"]["per_user"].values()
    assert any(audit["users"][0]["epsilon"] == pytest.approx(e) for e in per_user)
    assert audit["inventory"]["verification"]["ok"]
    assert paths["html"].is_file() and math.isfinite(json.loads(paths["json"].read_text())["users"][0]["epsilon"])


def test_bad_settings():
    with pytest.raises(ValueError, match="candidates"):
        AuditSettings(candidates=20)
    with pytest.raises(ValueError, match="onerun_canaries"):
        AuditSettings(onerun_canaries=2)
