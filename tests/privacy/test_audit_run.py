"""The empirical audit can fail: a DP-off run is flagged, the DP run is not; the report says both.

The default configuration (a local personal head, trained without noise): the released shared adapter
is judged against the canary owners' epsilon; the personalized model is reported as what the devices'
own outputs reveal, with no verdict. One small model that can memorize (the shared tiny model's
embeddings are too small to move its logits): 3 Shakespeare users, 2 rounds of 30 steps, 64 one-run
canaries, two secret canaries x 8 copies.
"""

import json
import math
import warnings

import pytest

from fedpersona.privacy.audit.empirical import verdict
from fedpersona.privacy.audit.render import write_report
from fedpersona.simulations.audit.experiment import AuditSettings, run_audit
from fedpersona.simulations.audit.gather import build_audit
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
        # The secure sum's clip far above the updates: what the shared adapter memorizes reaches the checkpoint.
        "secagg.clip-norm": 50.0,
        "eval.local-baseline": False,
        "run.results-dir": str(tmp / "results"), "run.state-dir": str(tmp / "state"),
    }
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")
        dp = run_audit(dict(flat, **{"run.name": "a-dp"}), dp=True, settings=SETTINGS)
        nodp = run_audit(dict(flat, **{"run.name": "a-nodp"}), dp=False, settings=SETTINGS,
                         reference_epsilon=dp["theoretical"]["epsilon_max"])
    return {"dp": dp, "nodp": nodp, "results": tmp / "results", "state": tmp / "state", "flat": flat}


def test_dp_run_is_not_flagged(audits):
    dp = audits["dp"]
    v = dp["verdict"]
    assert 0 < v["theoretical_epsilon"] <= 1.0
    assert not v["violation"], v
    # The released shared adapter is judged, with both bounds and their ceilings; the local head is not.
    assert v["judged"] == ["device-release", "shared"] and v["personal_head"] == "local"
    shared = dp["one_run"]["shared"]
    assert shared["epsilon_lower_bound"] <= shared["theoretical_epsilon"] < shared["ceiling"]
    assert shared["fdp"]["epsilon_lower_bound"] <= shared["theoretical_epsilon"]
    assert shared["fdp"]["ceiling"] > shared["steinke_ceiling"]
    pers = dp["one_run"]["personalized"]
    assert not pers["judged"] and pers["theoretical_epsilon"] is None and not pers["violation"]
    # Whatever the head reveals is reported as the device's own outputs, never as a violation.
    assert all("personal" in x for x in v["device_outputs"])


def test_non_dp_run_is_flagged(audits):
    nodp, dp_eps = audits["nodp"], audits["dp"]["theoretical"]["epsilon_max"]
    v = nodp["verdict"]
    assert v["theoretical_epsilon"] is None  # no DP: infinite
    # The released shared adapter's one-run lower bound is clearly above the DP run's epsilon ...
    assert v["exceeds_reference"] and v["empirical_epsilon_lower_bound"] > dp_eps + 0.5, v
    assert v["leakage_detected"]
    # ... and the devices' own outputs show what a head trained without noise holds: the repeated secrets
    # and membership, far above chance (reported, not judged).
    assert nodp["exposure"]["above_chance"]["personalized"]
    for attack in ("personalized/loss", "personal-head/calibrated"):
        assert nodp["mia"][attack]["above_chance"] and nodp["mia"][attack]["auc"] > 0.85
    assert any("personal-head" in x for x in v["device_outputs"])


def test_a_lower_bound_above_the_theory_is_a_violation(audits):
    doctored = json.loads(json.dumps(audits["nodp"]))
    doctored["one_run"]["shared"]["theoretical_epsilon"] = 0.1  # as if the run had claimed epsilon 0.1
    doctored["theoretical"]["epsilon_max"] = 0.1
    v = verdict(doctored)
    assert v["violation"] and "(shared)" in v["violations"][0] and "exceeds the theoretical epsilon 0.100" in v["violations"][0]


def test_a_dp_head_is_judged_against_its_composed_epsilon_and_a_local_one_never(audits):
    doctored = json.loads(json.dumps(audits["nodp"]))
    pers = doctored["one_run"]["personalized"]
    assert pers["epsilon_lower_bound"] > 0.5
    # The same observations under a DP head whose ledgers, composed, claim 0.2: a violation on the personalized model.
    pers.update(judged=True, theoretical_epsilon=0.2)
    doctored["theoretical"]["personal_head"] = "dp"
    v = verdict(doctored)
    assert any("(personalized)" in x for x in v["violations"]) and "personalized" in v["judged"]
    # Under a local head the same bound is only what the device's outputs reveal.
    v = verdict(audits["nodp"])
    assert not any("(personalized)" in x for x in v["violations"])


def test_reports(audits):
    results = audits["results"]
    dp_audit = build_audit(results / "a-dp")
    paths = write_report(dp_audit, results / "a-dp")
    html = paths["html"].read_text()
    for text in ("Guarantee", "Poisson", "personal head", "local (the default)", "One-run audit", "f-DP",
                 "Membership inference", "Canary exposure", "What the server could see", "query.unmask",
                 "what the device&#39;s own outputs reveal"):
        assert text in html, text
    assert "covers everything that leaves" not in html and "trained with DP-SGD too" not in html
    data = json.loads(paths["json"].read_text())
    st = data["status"]
    assert st["inventory_ok"] and st["accountant_ok"] and not st["violation"], st
    assert data["inventory"]["verification"]["ok"] and data["inventory"]["completeness"]["complete"]
    assert len(data["users"]) == 3 and all(0 < u["epsilon"] <= 1.0 for u in data["users"])
    assert data["empirical"]["verdict"]["violation"] is False
    assert (results / "a-dp" / "audit_epsilon.png").is_file() and (results / "a-dp" / "audit_empirical.png").is_file()

    nodp_audit = build_audit(results / "a-nodp")
    nodp_html = write_report(nodp_audit, results / "a-nodp")["html"].read_text()
    assert "covered by NO differential-privacy guarantee" in nodp_html  # the default local head, said as it is
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
    # The device's own recorded settings, never a default: its local head, its clip.
    g = audit["guarantee"]
    assert audit["settings_source"].startswith("the run config the device recorded")
    assert g["personal_head"].startswith("privacy.personal-head = local") and "clipping at 1.0" in g["mechanism"]
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
