"""Hole 5, as a dishonest server would look for it: any user id or user text in a message or a server file.

Before: final-evaluation replies carried the user id and 14 per-user figures in the clear, and an
error reply echoed the user's own text (``"reply" must be a string. You passed: ['my diagnosis is
SECRET-...']``) into the server's log, ``metrics.json`` and ``server_inventory.jsonl``. Now the
evaluation travels as a secure sum of bounded figures with every device's share of the evaluation
noise, no message carries a user id, and error replies carry the error class and a fixed text.
"""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.config import CONFIG_ENV, load_config
from fedpersona.identity import provision
from fedpersona.server.federation import run_federation
from tests.server.test_secagg import RUN_ID, FakeGrid

SECRET = "SECRET-5d41b9"
USERS = {21: "patient-4711-alice", 22: "patient-4712-bob", 23: "patient-4713-carol", 24: "patient-4714-dave"}
BROKEN = 24  # its data holds a malformed line whose text names the secret


def _folder(path: Path, uid: str, *, broken: bool) -> Path:
    path.mkdir(parents=True)
    rows = [json.dumps({"cue": f"How do I feel today, {i}?", "reply": f"my diagnosis is {SECRET} for {uid}, day {i}"})
            for i in range(12)]
    if broken:
        rows.append(json.dumps({"cue": "and?", "reply": [f"my diagnosis is {SECRET}"]}))
    (path / "lines.jsonl").write_text("\n".join(rows) + "\n")
    return path


def _needles() -> list[bytes]:
    """Long enough never to turn up by chance in random bytes (masked vectors, ciphertexts)."""
    return [SECRET.encode(), b"diagnosis", b"patient-47"] + [uid.encode() for uid in USERS.values()]


def _message_bytes(message) -> bytes:
    """Everything a message carries: metadata, error text, every record's keys and values (arrays as raw bytes)."""
    parts = [str(message.metadata.message_type).encode(), str(message.metadata.group_id).encode()]
    if message.has_error():
        parts.append(str(message.error.reason).encode())
        return b"\0".join(parts)
    content = message.content
    for name, rec in content.config_records.items():
        for k, v in rec.items():
            parts += [name.encode(), k.encode(), v if isinstance(v, bytes) else str(v).encode()]
    for name, rec in content.metric_records.items():
        parts += [name.encode()] + [f"{k}={v}".encode() for k, v in rec.items()]
    for name, rec in content.array_records.items():
        for k, arr in rec.items():
            a = arr.numpy()
            parts += [name.encode(), k.encode(), a.tobytes()]
            if a.dtype.kind in "US":
                parts.append(str(a.tolist()).encode())
    return b"\0".join(parts)


@pytest.fixture
def run(tiny_config, tmp_path, monkeypatch, request):
    secure = getattr(request, "param", True)  # secure aggregation on, unless a test asks for it off
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", RUN_ID), ("node_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    flat = dict(tiny_config, **{"privacy.delta": 1e-2, "data.max-examples": 12, "server.clients-per-round": 3,
                                "server.num-rounds": 1, "privacy.noise-multiplier": 1.0, "eval.final": True,
                                "eval.local-baseline": True, "secagg.enabled": secure})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    contexts = {nid: Context(run_id=RUN_ID, node_id=nid, state=RecordDict(), run_config=flat,
                             node_config={"data-dir": str(_folder(tmp_path / f"d{nid}", uid, broken=nid == BROKEN)),
                                          "state-dir": str(tmp_path / f"s{nid}"), "user-id": uid,
                                          **({} if secure else {"policy.allow-no-secagg": True})})
                for nid, uid in USERS.items()}
    provision([c.node_config["state-dir"] for c in contexts.values()], tmp_path / "identity-root.key")
    yield cfg, FakeGrid(contexts), secure
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()


@pytest.mark.parametrize("run", [True, False], ids=["secure", "plain"], indirect=True)
def test_no_user_text_or_id_in_any_message_or_server_file(run, caplog):
    """Also with secure aggregation off: the figures are then in the clear, but still no user id or text."""
    cfg, grid, secure = run
    with caplog.at_level(logging.INFO):
        metrics = run_federation(grid, cfg)
    needles = _needles()
    # Every message, both ways (requests and replies, error replies included).
    assert grid.log, "the run sent messages"
    kinds = set()
    for request, reply in grid.log:
        kinds.add(request.metadata.message_type)
        for msg in (request, reply):
            blob = _message_bytes(msg)
            for n in needles:
                assert n not in blob, (msg.metadata.message_type, n)
        if not reply.has_error():
            assert "identity" not in reply.content.config_records
    assert ({"train", "evaluate", "query.unmask", "query.advertise"} if secure else {"train", "evaluate"}) <= kinds
    errors = [r for _, r in grid.log if r.has_error()]
    assert errors and all(r.metadata.src_node_id == BROKEN for r in errors)  # the broken device failed, quietly
    # Every file the server wrote.
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"metrics.json", "rounds.csv", "server_inventory.jsonl", "summary.txt"} <= {p.name for p in files}
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, (p.name, n)
    # The server's log (the devices' own log lines, in this one process, are theirs).
    for rec in caplog.records:
        if not rec.name.startswith("fedpersona.client"):
            text = rec.getMessage().encode()
            for n in needles:
                assert n not in text, (rec.name, n)
    # What the report still has: a summary computed from the noised sum alone (no per-user row).
    final = metrics["final"]
    assert final["users"] == [] and final["devices"] == 3
    assert "users" in final["summary"]


def test_the_secure_sum_is_the_devices_own_rows_plus_the_evaluation_noise(run, monkeypatch):
    """The server gets the sum of the devices' figures with noise of the stated size, and each device recorded
    the release's user-level epsilon in its ledger before replying."""
    from fedpersona.client.device import EVALUATION
    from fedpersona.client.store import DeviceStore
    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.privacy.secagg.eval_figures import encode, eval_epsilon, sensitivity
    from fedpersona.server.secagg import SecureAggregator

    cfg, grid, secure = run
    assert secure
    released = []
    real = SecureAggregator.evaluate

    def evaluate(self, *a, **k):
        es = real(self, *a, **k)
        released.append(es.histograms)
        return es

    monkeypatch.setattr(SecureAggregator, "evaluate", evaluate)
    run_federation(grid, cfg)
    rows = []
    for nid, ctx in grid.contexts.items():
        store = DeviceStore(ctx.node_config["state-dir"])
        text = store.load_text(EVALUATION) if nid != BROKEN else None
        if text:
            rows.append(json.loads(text))
            (entry,) = [e for e in PrivacyLedger.from_json(store.load_text("ledger")).user_level_entries
                        if e["mechanism"].startswith("secagg-eval-ddg")]
            assert entry["epsilon"] == pytest.approx(eval_epsilon(cfg)) and entry["delta"] == cfg.secagg.ddp_delta
    assert len(rows) == 3 and {r["user"] for r in rows} == {USERS[n] for n in (21, 22, 23)}
    (total,) = released
    exact = sum(encode(cfg, r)[0] for r in rows)
    noise = total - exact
    # 3 devices, each with stddev sigma * sensitivity / sqrt(3): the sum's noise has stddev sigma * sensitivity.
    sd = cfg.eval.noise_multiplier * sensitivity()
    assert 0.85 * sd < float(noise.std()) < 1.15 * sd and abs(float(noise.mean())) < 0.2 * sd
