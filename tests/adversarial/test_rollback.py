"""Attack 4 of issue 20, as the attacker acts: an older copy of a device's state folder restored.

Before (main cb416a4): the restored ledger and its manifest were accepted. A device that had
spent its budget trained again (true epsilon past its budget, its ledger short of rounds it had
trained), and a restored reveal log let a dishonest server have the same round unmasked twice.

Now each commit is anchored outside the folder (a local anchor beside it, and an encrypted receipt
that the server keeps and sends back, client/store.py): a state older than either is refused with
``RollbackDetected`` before anything is trained or unmasked. The tests below take a copy of the
folder, let the device go on, put the copy back, and ask again: the device refuses. With the local
anchor deleted too, the receipt the (honest) server sends back still shows the rollback.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.store import DeviceStore
from fedpersona.secagg_wire import UNMASK, from_records, to_records
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.server.secagg import SecureAggregator
from tests.adversarial.helpers import flat_config, replies, run, user_folders
from tests.server.test_secagg import RUN_ID, _content, federation  # noqa: F401  (fixture)

VICTIM = 22  # bob


def _ledger(nc) -> PrivacyLedger:
    return PrivacyLedger.from_json(DeviceStore(nc["state-dir"]).load_text("ledger"))


def _restore(state: Path, backup: Path, *, anchor_too: bool) -> None:
    """The attacker's move: the folder replaced by the older copy (and, with ``anchor_too``, the anchor deleted)."""
    anchor = getattr(DeviceStore(state), "anchor_path", None)  # (the code before the fix has none)
    shutil.rmtree(state)
    shutil.copytree(backup, state)
    if anchor_too and anchor is not None:
        anchor.unlink()


def _trained(lines: list[dict], server_round: int) -> bool:
    """Whether the device's reply to the round's train request carried a masked update (not a decline, not an error)."""
    return any(ln["round"] == server_round and ln["reply"] == "content"
               and not any(r["name"] == "declined" for r in ln["rows"]) for ln in lines)


@pytest.mark.parametrize("anchor_too", [False, True], ids=["folder-restored", "folder-restored-anchor-deleted"])
def test_a_restored_state_folder_does_not_spend_the_budget_twice(tiny_config, tmp_path, anchor_too):
    nodes = user_folders(tmp_path)
    victim = nodes[VICTIM]
    state, backup = Path(victim["state-dir"]), tmp_path / "copy-after-round-1"
    flat = flat_config(tiny_config, **{"server.num-rounds": 1})
    run(flat, nodes)
    shutil.copytree(state, backup)  # the copy: its ledger holds round 1
    # A budget that allows exactly 2 rounds of this device's DP-SGD steps.
    (sigma, q, steps), = _ledger(victim).history
    after = {r: _ledger(victim).epsilon_if(noise_multiplier=sigma, sample_rate=q, num_steps=(r - 1) * steps,
                                           delta=flat["privacy.delta"]) for r in (2, 3)}
    budget = (after[2] + after[3]) / 2
    flat = dict(flat, **{"privacy.target-epsilon": budget})

    run(dict(flat, **{"server.num-rounds": 3}), nodes)  # rounds 2 and 3: the budget is spent after round 2
    lines = replies(nodes)[VICTIM]
    assert [_trained(lines, r) for r in (1, 2, 3)] == [True, True, False]
    assert [r["round"] for r in _ledger(victim).rounds] == [1, 2]
    trained = [r for r in (1, 2, 3) if _trained(lines, r)]

    _restore(state, backup, anchor_too=anchor_too)  # the ledger says round 1 only: budget for one more round
    metrics = run(dict(flat, **{"server.num-rounds": 4}), nodes)
    round4 = [ln for ln in client_inventory.read_inventory(state) if ln["round"] == 4]
    assert round4, "the victim got no request in round 4"
    assert not _trained(round4, 4), "the restored device trained again: its budget is spent twice"
    for reply in round4:  # whatever came first (the new run's key advertisement, or the train request)
        assert reply["reply"] == "error" and reply["error"]["reason"].startswith("RollbackDetected: refused: "), reply
        assert "generation" not in reply["error"]["reason"]  # fixed text: the device's log has the details
    true_epsilon = PrivacyLedger().epsilon_if(noise_multiplier=sigma, sample_rate=q, num_steps=len(trained) * steps,
                                              delta=flat["privacy.delta"])
    assert len(trained) == 2 and true_epsilon <= budget
    assert metrics["rounds"][-1]["failed"] >= 1
    # It keeps refusing while the server has nothing more to show (no receipt, no new message needed).
    with pytest.raises(Exception, match="rolled back"):
        DeviceStore(state).load_text("ledger")
    # The audit of the device reports it.
    from fedpersona.simulations.audit.gather import build_audit

    audit = build_audit(None, device_dir=str(state), delta=flat["privacy.delta"], target_epsilon=budget)
    assert any("rollback detected" in f for f in audit["status"]["flags"]), audit["status"]["flags"]


def _one_dropout(request: dict, holder: int, dropped: int) -> dict:
    """The holder's unmask request rewritten to claim that ``dropped`` left before unmasking."""
    senders = [int(x) for x in request["senders"]]
    size = len(request["ciphertexts"]) // len(senders)
    keep = [i for i, s in enumerate(senders) if s != dropped]
    fake = dict(request)
    fake["survivors"] = np.asarray([s for s in request["survivors"] if int(s) != dropped], dtype=np.uint64)
    fake["senders"] = np.asarray([senders[i] for i in keep], dtype=np.uint64)
    fake["sender_enc_pks"] = b"".join(request["sender_enc_pks"][i * 32:(i + 1) * 32] for i in keep)
    fake["ciphertexts"] = b"".join(request["ciphertexts"][i * size:(i + 1) * size] for i in keep)
    return fake


def test_a_restored_reveal_log_does_not_answer_an_unmask_twice(federation, tmp_path):  # noqa: F811
    """The dishonest server asks a share holder again, after its reveal log was restored to before its answer."""
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    holder, target = 12, 11
    state = Path(grid.contexts[holder].node_config["state-dir"])
    backup = tmp_path / "holder-before-unmask"
    deliver = grid.send_and_receive

    def copy_before_the_unmask(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == UNMASK and not backup.exists():
            shutil.copytree(state, backup)
        return deliver(messages, timeout=timeout)

    grid.send_and_receive = copy_before_the_unmask
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert not rs.aborted and rs.contributors == 5
    (honest,) = [from_records(m.content) for m, _ in grid.log
                 if m.metadata.message_type == UNMASK and m.metadata.dst_node_id == holder]

    _restore(state, backup, anchor_too=False)  # its reveal log: masked input sent, no unmask answered
    client_app._DEVICES.clear()  # the device restarts
    client_inventory._STATE_DIRS.clear()
    ctx = grid.contexts[holder]
    ctx = Context(run_id=ctx.run_id, node_id=holder, state=RecordDict(), run_config=dict(ctx.run_config),
                  node_config=dict(ctx.node_config))
    # The second request claims the target dropped: its answer would add the target's pair-seed shares to the
    # self-mask share the first answer gave, and the server would hold the target's update in the clear.
    msg = Message(RecordDict(to_records(_one_dropout(honest, holder, target))), dst_node_id=holder,
                  message_type=UNMASK, group_id="1")
    msg.metadata.__dict__["_message_id"] = "second-unmask"
    reply = client_app.app(msg, ctx)
    assert reply.has_error(), "the restored device answered a second unmask request for the same round"
    assert reply.error.reason.startswith("RollbackDetected: refused: ")
    answered = [ln for ln in client_inventory.read_inventory(state) if ln["message_type"] == UNMASK
                and ln["reply"] == "content"]
    assert len(answered) == 0  # the restored copy's inventory: the first answer was after the copy, no second one
