"""Data-flow inventory: every reply of a run is recorded, the check passes on it, and fails on doctored inventories."""

import copy
import json
import warnings
from pathlib import Path

import pytest

import fedpersona.client.app as client_app
from fedpersona.client.flow_log import INVENTORY_FILE, read_inventory
from fedpersona.client.store import DeviceStore
from fedpersona.config import load_config
from fedpersona.model import adapted_model
from fedpersona.privacy.audit.inventory import check_completeness, personal_digests, summarize_inventory, verify_inventory
from fedpersona.server.federation import run_federation
from fedpersona.server.flow_log import read_server_inventory
from fedpersona.simulations.inprocess import InProcessGrid
from fedpersona.simulations.partitions import prepare_partitions, provision_identities
from tests.privacy.audit_helpers import one_thread

PERSONAL = "base_model.model.model.layers.3.self_attn.q_proj.lora_B.personal.weight"
SHARED = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.shared.weight"


def _line(rows, *, message_type="train", round_=1, reply="content"):
    return {"v": 1, "round": round_, "group_id": str(round_), "message_type": message_type, "reply": reply, "rows": rows}


def _array(name, *, record="update", dtype="float32", masked=False, protocol=False, sha="ab" * 8):
    return {"record": record, "kind": "array", "name": name, "shape": [4, 2], "dtype": dtype, "bytes": 32,
            "sha256": sha, "masked": masked, "protocol": protocol}


CLEAN = {
    "alice": [
        _line([_array(SHARED), {"record": "metrics", "kind": "metric", "name": "weight", "bytes": 8, "type": "float"}]),
        _line([_array("masked", record="secagg-arrays", dtype="uint64", masked=True),
               _array("share_holders", record="secagg-arrays", dtype="uint64", protocol=True),
               {"record": "secagg", "kind": "config", "name": "ciphertexts", "bytes": 368, "type": "bytes"}], round_=2),
        _line([{"record": "status", "kind": "config", "name": "detail", "bytes": 40, "type": "str"}], round_=3),
        _line([_array("masked", record="secagg-arrays", dtype="uint8", masked=True)], message_type="evaluate",
              round_=4),
        _line([], reply="error", round_=5),
    ]
}


def test_clean_inventory_passes():
    check = verify_inventory(CLEAN, personal_names=[PERSONAL], personal_digests=["ff" * 8], shared_names=[SHARED])
    assert check.ok, check.violations
    assert (check.devices, check.messages) == (1, 5)


def _doctor(fn):
    inv = copy.deepcopy(CLEAN)
    fn(inv["alice"])
    return inv


DOCTORED = {
    "personal tensor by name": (lambda ls: ls[0]["rows"].append(_array(PERSONAL)), "personal-head tensor"),
    "personal tensor renamed": (lambda ls: ls[0]["rows"].append(_array("renamed", sha="ff" * 8)), "digest of a personal"),
    "any '.personal.' name": (lambda ls: ls[0]["rows"].append(_array("x.lora_A.personal.weight")), "personal-head tensor"),
    "token ids": (lambda ls: ls[0]["rows"].append(_array("input_ids", dtype="int64")), "token ids"),
    "uint64 outside secagg": (lambda ls: ls[0]["rows"].append(_array("masked", dtype="uint64", masked=True)), "disagrees"),
    "string array": (lambda ls: ls[0]["rows"].append(_array("text", dtype="<U12")), "non-float array"),
    "text field": (lambda ls: ls[0]["rows"].append(
        {"record": "config", "kind": "config", "name": "reply", "bytes": 30, "type": "str"}), "text field"),
    "bytes outside secagg": (lambda ls: ls[0]["rows"].append(
        {"record": "blob", "kind": "config", "name": "data", "bytes": 30, "type": "bytes"}), "bytes field"),
    "unknown float tensor": (lambda ls: ls[0]["rows"].append(_array("embed_tokens.weight")), "not a shared-adapter"),
    "malformed line": (lambda ls: ls.append({"round": 9}), "malformed"),
    "user label": (lambda ls: ls[3]["rows"].append(
        {"record": "identity", "kind": "config", "name": "user-id", "bytes": 5, "type": "str"}), "text field"),
    "repeated unmask": (lambda ls: ls.extend([_line([], message_type="query.unmask", round_=2)] * 2), "repeated unmask"),
}


@pytest.mark.parametrize("case", sorted(DOCTORED))
def test_doctored_inventory_fails(case):
    fn, problem = DOCTORED[case]
    check = verify_inventory(_doctor(fn), personal_names=[PERSONAL], personal_digests=["ff" * 8], shared_names=[SHARED])
    assert not check.ok
    assert any(problem in v["problem"] for v in check.violations), check.violations


# --------------------------------------------------------------------- a real (in-process) run
@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    """5 nodes (4 users + one broken device), 2 rounds, the real ServerApp loop and ClientApp with its mods."""
    tmp = tmp_path_factory.mktemp("inventory-run")
    flat = {
        "model.path": str(tiny_model_dir), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2,
        "adapter.personal-layers": 1, "adapter.rank": 2, "data.max-users": 4, "data.min-speeches": 40,
        "data.max-examples": 12, "client.local-steps": 2, "client.batch-size": 4, "server.num-rounds": 2,
        "server.clients-per-round": 5, "server.min-clients": 2, "privacy.delta": 1e-2, "eval.local-baseline": False,
        "privacy.noise-multiplier": 1.0,  # no calibration: keeps the test fast
        "run.results-dir": str(tmp / "results"), "run.state-dir": str(tmp / "state"), "run.name": "inv",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    prepare_partitions(cfg)  # simulated nodes read their users' data folders, as in `fedpersona run`
    nodes = {i: {"partition-id": i} for i in range(4)}
    broken = tmp / "broken-state"
    nodes[4] = {"data-dir": str(tmp / "no-such-folder"), "state-dir": str(broken), "user-id": "broken"}
    provision_identities(cfg, [broken])  # a device of the run (certified by its root) whose data folder is broken
    with InProcessGrid(client_app.app, nodes, flat, run_id=4242) as grid, one_thread():
        metrics = run_federation(grid, cfg)
    for i in nodes:
        client_app._DEVICES.pop((4242, i), None)
    run_dir = Path(flat["run.results-dir"]) / "inv"
    state = Path(flat["run.state-dir"]) / "inv"
    devices = {p.name: read_inventory(p) for p in sorted(state.iterdir()) if (p / INVENTORY_FILE).is_file()}
    devices["broken"] = read_inventory(broken)
    return {"cfg": cfg, "metrics": metrics, "run_dir": run_dir, "state": state, "devices": devices, "grid": grid}


def test_every_reply_of_a_run_is_recorded(small_run):
    devices, grid = small_run["devices"], small_run["grid"]
    assert len(devices) == 5
    # One line per reply: every message the grid delivered is in some device's inventory.
    assert sum(len(lines) for lines in devices.values()) == grid.delivered
    server = read_server_inventory(small_run["run_dir"])
    assert [e["round"] for e in server if e["stage"] == "train"] == [1, 2]
    comp = check_completeness(devices, server)
    assert comp["complete"], comp
    for row in comp["rounds"]:
        assert row["devices_recorded"] == row["server_received"] > 0
    types = {ln["message_type"] for lines in devices.values() for ln in lines}
    assert {"train", "evaluate"} <= types
    # The broken device's error replies are recorded too (code and reason, nothing else).
    broken = [ln for ln in devices["broken"] if ln["message_type"] in ("train", "evaluate")]
    assert broken and all(ln["reply"] == "error" and not ln["rows"] for ln in broken)
    assert all(e["error_replies"] >= 1 for e in server if e["stage"] == "train")


def test_inventory_of_a_run_verifies(small_run):
    cfg, devices, state = small_run["cfg"], small_run["devices"], small_run["state"]
    heads = {name: DeviceStore(state / name).load_tensors("personal") for name in devices if (state / name).is_dir()}
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
    check = verify_inventory(devices, personal_names={n: list(h) for n, h in heads.items() if h},
                             personal_digests={n: personal_digests(h) for n, h in heads.items() if h},
                             shared_names=model.shared_names)
    assert check.ok, check.violations
    summary = summarize_inventory(devices)
    sent = [f for f in summary["fields"] if f["kind"] == "array"]
    assert sent and all(f["masked"] or f["protocol"] or f["name"] in model.shared_names for f in sent)
    assert not any(".personal." in f["name"] for f in summary["fields"])
    # Doctor one real line: the personal head's first tensor, as the device holds it, put into a reply.
    name, head = next((n, h) for n, h in heads.items() if h)
    doctored = copy.deepcopy(devices)
    line = next(ln for ln in doctored[name] if ln["message_type"] == "train")
    tname = sorted(head)[0]
    line["rows"].append({"record": "update", "kind": "array", "name": tname, "shape": list(head[tname].shape),
                         "dtype": "float32", "bytes": 4 * head[tname].numel(), "sha256": "0" * 16, "masked": False,
                         "protocol": False})
    bad = verify_inventory(doctored, personal_names={name: list(head)})
    assert not bad.ok and "personal-head tensor" in bad.violations[0]["problem"]


def test_inventory_lines_are_json_with_digests_not_values(small_run):
    name, lines = next((n, ls) for n, ls in small_run["devices"].items() if n != "broken")
    raw = (small_run["state"] / name / INVENTORY_FILE).read_text().splitlines()
    assert len(raw) == len(lines)
    for row in (r for ln in lines for r in ln["rows"] if r["kind"] == "array"):
        assert len(row["sha256"]) == 16 and "value" not in row
    assert all(json.loads(x)["node_id"] == lines[0]["node_id"] for x in raw)
