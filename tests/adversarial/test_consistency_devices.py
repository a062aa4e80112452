"""The consistency check and the identities on real devices, as a dishonest server would probe them.

* Two survivor sets in one round: the server shows some devices one set and the others another. Before
  (cb416a4) the devices answered and the data-flow inventory check reported nothing. Now a device
  reveals shares only for the set it signed, and the inventory check, over the devices' own records,
  reports that two sets were shown.
* A device signs one survivor set per round, also after a restart, and reveals nothing without a quorum
  of valid signatures over the very set it signed (signatures the server made itself do not count).
* A device without an identity refuses to take part unless its own policy allows unbound keys; then it
  warns, records it, and reports that it is not protected against a malicious server.

Through the real ClientApp and SecureAggregator; devices with the fixed updates of
``tests/server/test_secagg.FakeDevice``.
"""

import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.flow_log import read_inventory
from fedpersona.client.store import DeviceStore
from fedpersona.secagg_wire import ADVERTISE, from_records, to_records
from fedpersona.privacy.audit.inventory import verify_inventory
from fedpersona.privacy.secagg.server_side import SecAggRound
from fedpersona.server.secagg import SecureAggregator
from tests.server.test_secagg import RUN_ID, _content, federation  # noqa: F401  (fixture)


def _inventories(grid):
    return {str(n): read_inventory(c.node_config["state-dir"]) for n, c in grid.contexts.items()}


def _send(contexts, node, message_type, payload, group="1"):
    msg = Message(RecordDict(to_records(payload)), dst_node_id=node, message_type=message_type, group_id=group)
    msg.metadata.__dict__["_message_id"] = f"probe-{node}-{id(payload)}"
    return client_app.app(msg, contexts[node])


def _restart(grid):
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    return {n: Context(run_id=c.run_id, node_id=n, state=RecordDict(), run_config=dict(c.run_config),
                       node_config=dict(c.node_config)) for n, c in grid.contexts.items()}


def test_two_survivor_sets_in_one_round_are_refused_and_flagged(federation, monkeypatch):  # noqa: F811
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    hidden, split = cohort[0], set(cohort[-2:])  # the last two devices are told the first one dropped
    real = SecAggRound.unmask_requests

    def lying(self):
        out = real(self)
        for v in split & set(out):
            req = dict(out[v])
            senders = [int(x) for x in req["senders"]]
            keep = [i for i, w in enumerate(senders) if w != hidden]
            size = len(req["ciphertexts"]) // len(senders)
            req["survivors"] = np.asarray([int(x) for x in req["survivors"] if int(x) != hidden], dtype=np.uint64)
            req["senders"] = np.asarray([senders[i] for i in keep], dtype=np.uint64)
            req["sender_enc_pks"] = b"".join(req["sender_enc_pks"][i * 32:(i + 1) * 32] for i in keep)
            req["ciphertexts"] = b"".join(req["ciphertexts"][i * size:(i + 1) * size] for i in keep)
            out[v] = req
        return out

    monkeypatch.setattr(SecAggRound, "unmask_requests", lying)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    replies = {m.metadata.dst_node_id: r for m, r in grid.log if m.metadata.message_type == "query.unmask"}
    for v in split:
        assert replies[v].has_error(), f"device {v} revealed shares for a survivor set it did not sign"
        assert replies[v].error.reason.startswith("ConsistencyRefused: "), replies[v].error.reason
    check = verify_inventory(_inventories(grid))
    problems = [v["problem"] for v in check.violations]
    assert problems and all(p.startswith("two survivor sets shown for one round") for p in problems), problems
    assert {v["device"] for v in check.violations} <= {str(v) for v in split}
    # The honest part of the round still completes from the devices shown the set they signed.
    assert not rs.aborted and rs.contributors == len(cohort)


def test_one_survivor_set_per_round_and_a_quorum_of_real_signatures(federation, monkeypatch):  # noqa: F811
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    agg = SecureAggregator(cfg, run_id=RUN_ID)
    grid.drop = {"query.unmask": set(cohort)}  # the server keeps every unmask request instead of sending it
    sent = []
    deliver = grid.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        sent.extend(messages)
        return deliver(messages, timeout=timeout)

    grid.send_and_receive = spy
    assert agg.collect(grid, cohort, _content(), server_round=1, timeout=None).aborted  # no shares came back
    requests = {m.metadata.dst_node_id: from_records(m.content) for m in sent if m.metadata.message_type == "query.unmask"}
    consistency = {m.metadata.dst_node_id: from_records(m.content) for m in sent
                   if m.metadata.message_type == "query.consistency"}
    victim = cohort[1]
    smaller = dict(consistency[victim], survivors=np.asarray(cohort[1:], dtype=np.uint64))
    for contexts in (grid.contexts, _restart(grid)):
        # Another survivor set for the same round: refused (it signed one), also after a restart.
        reply = _send(contexts, victim, "query.consistency", smaller)
        assert reply.has_error() and reply.error.reason.startswith("ConsistencyRefused: "), reply.error.reason
        # The set it signed, but the signatures of the others replaced by the server's own: nothing revealed.
        forged = dict(requests[victim])
        signers = [int(x) for x in forged["signers"]]
        sigs = bytearray(forged["signatures"])
        for i, v in enumerate(signers):
            if v != victim:
                sigs[i * 64:(i + 1) * 64] = Ed25519PrivateKey.generate().sign(b"anything")
        forged["signatures"] = bytes(sigs)
        reply = _send(contexts, victim, "query.unmask", forged)
        assert reply.has_error(), "shares revealed on forged signatures"
        # Signers' keys swapped for keys the server made (with valid signatures by them): still nothing.
        fake = [Ed25519PrivateKey.generate() for _ in signers]
        from fedpersona.privacy.secagg.spec import consistency_message, request_digest

        message = consistency_message(request_digest(forged), [int(x) for x in forged["survivors"]])
        swapped = dict(requests[victim])
        pks, sig = bytearray(swapped["signer_sign_pks"]), bytearray(swapped["signatures"])
        for i, (v, key) in enumerate(zip(signers, fake)):
            if v != victim:
                from fedpersona.identity import public_bytes

                pks[i * 32:(i + 1) * 32] = public_bytes(key)
                sig[i * 64:(i + 1) * 64] = key.sign(message)
        swapped.update(signer_sign_pks=bytes(pks), signatures=bytes(sig))
        reply = _send(contexts, victim, "query.unmask", swapped)
        assert reply.has_error(), "shares revealed on signatures of keys the server made"
    # The genuine certificate is answered (once).
    reply = _send(grid.contexts, victim, "query.unmask", requests[victim])
    assert not reply.has_error(), reply.error.reason


def test_a_device_without_identity_refuses_unless_its_policy_allows_it(federation, caplog):  # noqa: F811
    from fedpersona.client.secagg import REVEALS, malicious_secure

    cfg, grid = federation()
    node = 11
    state = grid.contexts[node].node_config["state-dir"]
    (DeviceStore(state).state_dir / "identity.json").unlink()
    reply = _send(grid.contexts, node, ADVERTISE, {})
    assert reply.has_error() and reply.error.reason.startswith("UnboundKeysRefused: refused: this device holds no "
                                                               "identity"), reply.error.reason
    assert not malicious_secure(DeviceStore(state), grid.contexts[node].node_config)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, sorted(grid.contexts), _content(), server_round=1,
                                                      timeout=None)
    assert rs.contributors == 4 and any(f.startswith(f"advertise: node {node}: UnboundKeysRefused") for f in rs.failures)

    # Its owner allows unbound keys: it takes part, warns loudly, records it; the others (bound) refuse its keys.
    for c in grid.contexts.values():
        c.node_config["policy.allow-unbound-keys"] = True
    client_app._DEVICES.clear()
    with caplog.at_level(logging.WARNING):
        reply = _send(grid.contexts, node, ADVERTISE, {}, group="2")
    assert not reply.has_error() and "identity" not in from_records(reply.content)  # keys with no binding
    assert any("UNBOUND KEYS" in r.getMessage() for r in caplog.records)
    assert '"unbound-keys": true' in DeviceStore(state).load_text(REVEALS)
    assert not malicious_secure(DeviceStore(state), grid.contexts[node].node_config)
    assert malicious_secure(DeviceStore(grid.contexts[12].node_config["state-dir"]), grid.contexts[12].node_config)
