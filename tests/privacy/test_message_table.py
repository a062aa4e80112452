"""One table of what leaves a device, enforced: every field of every real reply has its row.

Two in-process federations (tiny model, the real ServerApp loop and ClientApp with its mods) produce every
kind of reply: under secure aggregation a train round with masked inputs, a policy refusal (error reply)
and declines (budget spent), key advertisements, unmask replies and the final evaluation's masked figures
(another refusal there too); with secure aggregation off, plain updates and metrics, a decline's status
and the noised plain evaluation. The fields are read from the devices' own inventories (every reply as it
left, :mod:`fedpersona.client.flow_log`) and, for what a masked vector hides, from the secure-aggregation client as it
masks. A field without a row in :data:`fedpersona.privacy.audit.message_table.TABLE` fails the test, named by its reply.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.flow_log import read_inventory
from fedpersona.config import load_config
from fedpersona.privacy.audit.message_table import TABLE, Row, field_label, lookup, render_markdown, unlisted
from fedpersona.privacy.secagg import client_side
from fedpersona.privacy.secagg.eval_figures import vector_fields
from tests.adversarial.helpers import user_folders
from tests.privacy.audit_helpers import one_thread

REPO = Path(__file__).resolve().parents[2]
REFUSER, DECLINES = 24, "the devices that trained in round 1 (planned-rounds 1: the budget is spent)"


class _Recorder:
    """What every masked vector of the run held: (message type, named parts, extras) as the client masks it."""

    def __init__(self):
        self.current: str | None = None
        self.masked: list[tuple[str, int, tuple[str, ...]]] = []

    def mod(self, message, context, call_next):
        self.current = message.metadata.message_type
        try:
            return call_next(message, context)
        finally:
            self.current = None


def _federation(tmp_path, tiny_config, monkeypatch, *, secure: bool) -> tuple[list[dict], _Recorder, int]:
    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.inprocess import InProcessGrid

    names = ("alice", "bob", "carol", "dave")
    nodes = user_folders(tmp_path / ("secure" if secure else "plain"), names)
    # dave's own policy refuses the server's budget and its evaluation noise: error replies, every time.
    nodes[REFUSER]["policy.max-epsilon"] = 1.0
    for nc in nodes.values():
        nc["policy.allow-no-secagg"] = not secure
    flat = dict(tiny_config, **{"data.max-examples": 12, "privacy.delta": 1e-2, "server.clients-per-round": 4,
                                "server.min-clients": 2, "server.num-rounds": 2, "privacy.planned-rounds": 1,
                                "eval.final": True, "eval.local-baseline": False, "secagg.enabled": secure,
                                "run.name": "table-secure" if secure else "table-plain",
                                "run.results-dir": str(tmp_path / "results"), "run.state-dir": str(tmp_path / "state")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    rec = _Recorder()
    real = client_side.SecAggClient.masked_input

    def masked_input(self, request, update, extras=None):
        rec.masked.append((rec.current, int(update.size), tuple(sorted(extras or {}))))
        return real(self, request, update, extras)

    monkeypatch.setattr(client_side.SecAggClient, "masked_input", masked_input)
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        with InProcessGrid(client_app.build_app(mods=[rec.mod]), nodes, flat, run_id=4242) as grid, one_thread():
            metrics = run_federation(grid, cfg)
            shared_numel = sum(t.numel() for t in client_app.cached_devices(4242)[21].model.shared_state().values())
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()
    lines = [ln for nc in nodes.values() for ln in read_inventory(nc["state-dir"])]
    assert metrics["rounds"][0]["applied"], metrics["rounds"]
    return lines, rec, shared_numel


def _fields(lines: list[dict], rec: _Recorder, shared_numel: int) -> list[dict]:
    """Every field of every reply: the inventory's rows and error replies, and what each masked vector held."""
    out = []
    for ln in lines:
        if ln["reply"] == "error":
            for name in ("code", "reason"):
                out.append({"message": ln["message_type"], "part": "error", "record": "error", "name": name})
            continue
        for row in ln["rows"]:
            out.append({"message": ln["message_type"], "part": row["kind"], "record": row["record"],
                        "name": row["name"], "detail": row.get("dtype") or row.get("type", "")})
    for message, length, extras in rec.masked:
        if message == "train" and length == shared_numel:
            parts = [("update", "shared-adapter update", length)]
        elif message == "evaluate" and length == sum(n for _, n in vector_fields()):
            parts = [("figures", name, n) for name, n in vector_fields()]
        else:  # a vector the test does not know how to name: it must get rows (and a case here)
            parts = [("vector", f"{length} coordinates", length)]
        out += [{"message": message, "part": "masked-vector", "record": r, "name": name, "detail": f"{n} coordinates"}
                for r, name, n in parts]
        out += [{"message": message, "part": "masked-extra", "record": "extras", "name": e} for e in extras]
    return out


@pytest.fixture(scope="module")
def walked(tiny_model_dir, tmp_path_factory):

    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("message-table")
    tiny = {"model.path": str(tiny_model_dir), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.layers": 2,
            "adapter.personal-layers": 1, "adapter.rank": 2, "data.max-users": 4, "data.min-examples": 40,
            "client.local-steps": 2, "client.batch-size": 4}
    try:
        out = {}
        for secure in (True, False):
            lines, rec, numel = _federation(tmp, tiny, mp, secure=secure)
            out[secure] = (lines, _fields(lines, rec, numel))
        return out
    finally:
        mp.undo()


def test_the_walk_sees_every_kind_of_reply(walked):
    secure_lines, secure_fields = walked[True]
    plain_lines, plain_fields = walked[False]
    kinds = {(ln["message_type"], ln["reply"]) for ln in secure_lines}
    assert {("train", "content"), ("train", "error"), ("query.advertise", "content"), ("query.unmask", "content"),
            ("evaluate", "content"), ("evaluate", "error")} <= kinds, kinds
    parts = {(f["message"], f["part"], f["name"]) for f in secure_fields}
    assert ("train", "config", "declined") in parts, DECLINES
    assert ("train", "masked-vector", "shared-adapter update") in parts and ("train", "masked-extra", "trained") in parts
    assert ("evaluate", "masked-vector", "personal-loss") in parts
    plain = {(f["message"], f["record"], f["name"]) for f in plain_fields}
    assert {("train", "metrics", "weight"), ("train", "status", "status"), ("evaluate", "evaluation", "figures")} <= plain
    assert any(f["record"] == "update" for f in plain_fields)


def test_every_field_of_every_reply_has_its_row(walked):
    missing = unlisted(walked[True][1] + walked[False][1])
    assert not missing, ("fields no row of privacy/audit/message_table.py TABLE lists (add a Row for each):\n  "
                         + "\n  ".join(missing))


def test_an_unlisted_field_fails_by_its_name(walked):
    fields = walked[True][1] + [{"message": "query.attest", "part": "config", "record": "secagg",
                                 "name": "quote", "detail": "bytes"},
                                {"message": "train", "part": "masked-extra", "record": "extras", "name": "examples"}]
    assert unlisted(fields) == ["'query.attest' reply: config field secagg/quote (bytes)",
                                "'train' reply: masked extra extras/examples"]
    # A row is all it takes.
    more = TABLE + (Row("query.attest", "config", "secagg", "quote", "a quote", "a quote"),
                    Row("train", "masked-extra", "extras", "examples", "n", "nothing"))
    assert unlisted(fields, more) == []


def test_rows_cover_only_what_they_name():
    assert lookup("train", "masked-extra", "extras", "examples") is None  # the example count is not sent any more
    assert lookup("train", "metric", "metrics", "train-loss") is None
    assert lookup("evaluate", "error", "error", "reason") is not None  # error rows cover every message type
    assert field_label("train", "array", "update", "x.weight", "float32") == "'train' reply: array field update/x.weight (float32)"
    with pytest.raises(ValueError, match="part"):
        Row("train", "blob", "r", "n", "w", "c")


def test_docs_render_the_table():
    """docs/audit.md holds the table as render_markdown writes it (regenerate it there when a row changes)."""
    text = (REPO / "docs" / "audit.md").read_text()
    m = re.search(r"<!-- message-table:begin -->\n(.*?)\n<!-- message-table:end -->", text, re.S)
    assert m, "docs/audit.md has no message-table block"
    assert m.group(1) == render_markdown(), "docs/audit.md's message table is stale: paste render_markdown() there"

