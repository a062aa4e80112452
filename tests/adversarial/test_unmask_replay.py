"""Hole 2, as a dishonest server would try it: replayed unmask requests, each claiming another dropout.

Before: after an honest unmask the server sent the victim's share holders more ``query.unmask``
requests for the same round, each claiming one neighbour dropped, and collected the victim's
self-mask seed *and* its pair seeds (12 replays answered, 0 refused): its update in the clear.
Now a device answers at most one unmask request per round digest, only for the round of its latest
masked input, and remembers that in its encrypted store, across restarts.
"""

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.flow_log import read_inventory
from fedpersona.secagg_wire import UNMASK, from_records, to_records
from fedpersona.privacy.audit.inventory import verify_inventory
from fedpersona.server.secagg import SecureAggregator
from tests.server.test_secagg import RUN_ID, _content, federation  # noqa: F401  (fixture)

VICTIM = 11


def _replays(requests: dict[int, dict]) -> list[tuple[int, dict]]:
    """12 replays to the victim's holders, each claiming one neighbour (not the victim, not the holder) dropped."""
    out = []
    for h in sorted(requests):
        req = requests[h]
        senders = [int(x) for x in req["senders"]]
        size = len(req["ciphertexts"]) // len(senders)
        for x in sorted(int(s) for s in req["survivors"]):
            if x in (h, VICTIM):
                continue
            keep = [i for i, s in enumerate(senders) if s != x]
            fake = dict(req)
            fake["survivors"] = np.asarray([s for s in req["survivors"] if int(s) != x], dtype=np.uint64)
            fake["senders"] = np.asarray([senders[i] for i in keep], dtype=np.uint64)
            fake["sender_enc_pks"] = b"".join(req["sender_enc_pks"][i * 32:(i + 1) * 32] for i in keep)
            fake["ciphertexts"] = b"".join(req["ciphertexts"][i * size:(i + 1) * size] for i in keep)
            out.append((h, fake))
    return out[:12]


def _send(contexts, node: int, request: dict, server_round: int = 1) -> Message:
    msg = Message(RecordDict(to_records(request)), dst_node_id=node, message_type=UNMASK, group_id=str(server_round))
    msg.metadata.__dict__["_message_id"] = f"replay-{node}-{id(request)}"
    return client_app.app(msg, contexts[node])


def _restart(grid):
    """New ClientApp-side objects over the same state folders (a device restart)."""
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    return {n: Context(run_id=c.run_id, node_id=n, state=RecordDict(), run_config=dict(c.run_config),
                       node_config=dict(c.node_config)) for n, c in grid.contexts.items()}


def test_replayed_unmask_requests_are_refused_also_after_a_restart(federation):  # noqa: F811
    cfg, grid = federation()
    cohort = sorted(grid.contexts)  # 5 devices: complete graph, every device holds shares of the victim
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert not rs.aborted and rs.contributors == 5
    honest = {m.metadata.dst_node_id: from_records(m.content) for m, _ in grid.log
              if m.metadata.message_type == UNMASK}
    replays = _replays(honest)
    assert len(replays) == 12

    for contexts in (grid.contexts, _restart(grid)):
        replies = [_send(contexts, h, req) for h, req in replays]
        refused = [r for r in replies if r.has_error()]
        assert len(refused) == 12, f"{12 - len(refused)} replayed unmask requests answered"
        assert all(r.error.reason.startswith("ReplayRefused: refused: this device already answered") for r in refused)
        # The very same request again (an identical second answer) is refused too.
        h, req = next(iter(honest.items()))
        assert _send(contexts, h, req).has_error()

    # Each device answered exactly one unmask request of the round: the inventory check agrees, and reports
    # the replays for what they were: other survivor sets shown for the same round.
    replayed_to = {h for h, _ in replays}
    for n in cohort:
        lines = read_inventory(grid.contexts[n].node_config["state-dir"])
        answered = [ln for ln in lines if ln["message_type"] == UNMASK and ln["reply"] == "content"]
        assert len(answered) == 1
        problems = [v["problem"] for v in verify_inventory({str(n): lines}).violations]
        assert all(p.startswith("two survivor sets shown for one round") for p in problems), problems
        assert bool(problems) == (n in replayed_to)


def test_unmask_for_an_older_round_than_the_latest_masked_input_is_refused(federation):  # noqa: F811
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    agg = SecureAggregator(cfg, run_id=RUN_ID)
    sent: list[Message] = []
    deliver = grid.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        sent.extend(messages)
        return deliver(messages, timeout=timeout)

    grid.send_and_receive = spy
    grid.drop = {UNMASK: {12}}  # node 12's round-1 unmask request is lost: it never answers it
    assert not agg.collect(grid, cohort, _content(1), server_round=1, timeout=None).aborted
    (kept,) = [m for m in sent if m.metadata.message_type == UNMASK and m.metadata.dst_node_id == 12]
    grid.drop = {}
    assert not agg.collect(grid, cohort, _content(2), server_round=2, timeout=None).aborted
    # The server still holds node 12's unanswered round-1 request; round 2 is now its latest masked input.
    for contexts in (grid.contexts, _restart(grid)):
        reply = _send(contexts, 12, from_records(kept.content))
        assert reply.has_error() and reply.error.reason.startswith("ReplayRefused: ")


def test_device_floor_from_node_config():
    from fedpersona.client.secagg import min_contributors_floor

    assert min_contributors_floor({}) == 3 and min_contributors_floor({"policy.min-contributors": "5"}) == 5
    for bad in (1, "x", 2.5, True):
        with pytest.raises(ValueError, match=r"policy.min-contributors.*You passed"):
            min_contributors_floor({"policy.min-contributors": bad})


@pytest.mark.parametrize("floor", [4, 6])
def test_device_floor_refuses_small_sums(federation, floor):  # noqa: F811
    cfg, grid = federation()
    for c in grid.contexts.values():
        c.node_config["policy.min-contributors"] = floor
    cohort = sorted(grid.contexts)[:4]
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    if floor == 6:  # a cohort of 4 can never reach the floor: refused before training, nothing masked
        assert rs.aborted and all("SmallSumRefused" in f for f in rs.failures if f.startswith("node"))
        assert not [m for m, _ in grid.log if m.metadata.message_type == UNMASK]
    else:
        assert not rs.aborted and rs.contributors == 4
        # A server claiming 3 survivors (below the floor of 4) is refused by every device.
        m = next(m for m, _ in grid.log if m.metadata.message_type == UNMASK)
        req = from_records(m.content)
        req["survivors"] = req["survivors"][:3]
        reply = _send(grid.contexts, int(req["client_id"]), req)
        assert reply.has_error() and reply.error.reason.startswith("SmallSumRefused: ")


def test_replayed_unmask_requests_in_one_grouped_batch_are_refused(federation):  # noqa: F811
    """The same 12 replays sent as ONE batch through the in-process grid, whose group commit makes the devices'
    state durable only at the batch's flush (several replays to one device land in one chunk): every one is
    refused, and after a restart (what the disk holds after the flush) the honest request is refused too."""
    from fedpersona.simulations.inprocess import InProcessGrid

    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert not rs.aborted
    honest = {m.metadata.dst_node_id: from_records(m.content) for m, _ in grid.log
              if m.metadata.message_type == UNMASK}
    replays = _replays(honest)
    assert len({h for h, _ in replays}) < len(replays)  # some device gets several in the batch
    run_config = dict(next(iter(grid.contexts.values())).run_config)
    nodes = {n: dict(c.node_config) for n, c in grid.contexts.items()}
    for _ in range(2):  # the running devices, then restarted ones over the same folders
        _restart(grid)
        with InProcessGrid(client_app.app, nodes, run_config, run_id=RUN_ID) as batch_grid:
            msgs = [Message(RecordDict(to_records(req)), dst_node_id=h, message_type=UNMASK, group_id="1")
                    for h, req in replays]
            replies = list(batch_grid.send_and_receive(msgs))
            assert len(replies) == 12 and all(r.has_error() for r in replies)
            assert all("ReplayRefused" in r.error.reason for r in replies), [r.error.reason for r in replies]
            h, req = next(iter(honest.items()))
            (again,) = batch_grid.send_and_receive(
                [Message(RecordDict(to_records(req)), dst_node_id=h, message_type=UNMASK, group_id="1")])
            assert again.has_error()
