"""Issue 20.6, as an attacker would try it: a replayed or forged stage-1 reply, a tampered share ciphertext.

Before (cb416a4): a node's round-1 masked input, resent as its round-2 reply (the round field changed),
was accepted in stage 1; its share ciphertexts belonged to round 1, so every holder's unmask reply
failed whole (DecryptionError) and the round aborted: any single party could abort any round. A masked
vector altered on the way was accepted as well, and spoiled the sum. Now every stage-1 reply is signed
with the key the node advertised, over the round digest, its id and the hashes of its vector and
ciphertexts: the server rejects a replayed or altered reply (that node is a dropout) and the round
completes from the others. And a holder whose ciphertext from some sender does not open skips it and
names that sender, answering for the rest: the round completes while enough shares remain.

Through the real ClientApp (handlers and mods), the server's SecureAggregator, devices with the fixed
updates of ``tests/server/test_secagg.FakeDevice``.
"""

import pytest
from flwr.app import Message, RecordDict

import fedpersona.client.app as client_app
from fedpersona.secagg_wire import ARRAYS, RECORD, from_records, to_records
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.server.secagg import SecureAggregator
from tests.server.test_secagg import SHARED, RUN_ID, _content, _expected_sum, federation  # noqa: F401  (fixture)

TARGET = 13


def _intercept(monkeypatch, change):
    """Wrap the ClientApp: ``change(message, reply)`` may return another reply to send instead."""
    real = client_app.app

    def app(message, context):
        reply = real(message, context)
        return change(message, reply) or reply

    monkeypatch.setattr(client_app, "app", app)


def _check_sum(cfg, grid, rs, members):
    expected = _expected_sum(cfg, grid, members)
    for k in SHARED:
        assert float((rs.update_sum[k].double() - expected[k]).abs().max()) < len(members) / secagg_params(cfg).scale


@pytest.mark.parametrize("forgery", ["replayed round-1 reply", "altered masked vector"])
def test_replayed_or_altered_stage1_reply_is_rejected_and_the_round_completes(federation, monkeypatch, forgery):  # noqa: F811
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    agg = SecureAggregator(cfg, run_id=RUN_ID)
    stale = {}

    def change(message, reply):
        if message.metadata.message_type != "train" or message.metadata.dst_node_id != TARGET:
            return None
        payload = from_records(reply.content)
        server_round = int(message.metadata.group_id)
        if server_round == 1:
            stale.update(payload)  # what the attacker recorded in round 1
            return None
        if forgery == "replayed round-1 reply":
            forged = dict(stale, round=server_round)
        else:
            masked = payload["masked"].copy()
            masked[0] ^= 1
            forged = dict(payload, masked=masked)
        return Message(RecordDict(to_records(forged)), reply_to=message)

    _intercept(monkeypatch, change)
    assert not agg.collect(grid, cohort, _content(1), server_round=1, timeout=None).aborted
    rs = agg.collect(grid, cohort, _content(2), server_round=2, timeout=None)
    assert not rs.aborted, rs.aborted
    others = [c for c in cohort if c != TARGET]
    assert rs.contributors == len(others), "the forged reply was counted"
    (failure,) = [f for f in rs.failures if f"node {TARGET}" in f]
    assert "rejected masked input" in failure and "signature does not verify" in failure, failure
    _check_sum(cfg, grid, rs, others)
    # No holder's unmask reply failed: the forged ciphertexts never reached anyone.
    assert not [r for m, r in grid.log if m.metadata.message_type == "query.unmask" and r.has_error()]


def test_a_tampered_ciphertext_is_skipped_and_named_and_the_round_completes(federation, monkeypatch):  # noqa: F811
    cfg, grid = federation()
    cohort = sorted(grid.contexts)  # 5 devices: complete graph, k = 4, t = 3
    holder, sender = 12, 14
    real = client_app.app

    def app(message, context):
        if message.metadata.message_type == "query.unmask" and message.metadata.dst_node_id == holder:
            rec = message.content.config_records[RECORD]
            senders = [int(x) for x in message.content.array_records[ARRAYS]["senders"].numpy()]
            cts = bytearray(rec["ciphertexts"])
            size = len(cts) // len(senders)
            cts[senders.index(sender) * size + 20] ^= 0xFF  # one byte of the shares from `sender`, on the way
            rec["ciphertexts"] = bytes(cts)
        return real(message, context)

    monkeypatch.setattr(client_app, "app", app)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    (reply,) = [r for m, r in grid.log if m.metadata.message_type == "query.unmask" and m.metadata.dst_node_id == holder]
    assert not reply.has_error(), "the holder's whole unmask reply failed"
    payload = from_records(reply.content)
    assert payload["undecryptable"].tolist() == [sender]
    assert sender not in payload["b_owners"].tolist() and len(payload["b_owners"]) == len(cohort) - 1
    assert any(f"node {holder}: could not open the shares of node(s) [{sender}]" in f for f in rs.failures), rs.failures
    assert not rs.aborted and rs.contributors == len(cohort)
    _check_sum(cfg, grid, rs, cohort)
