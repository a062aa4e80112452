"""A real deployment on 127.0.0.1: SuperLink + 4 SuperNodes as separate processes, TLS + node authentication,
the SuperLink on its own loopback port behind the Fleet gateway (the address the devices dial).

One federation for the module (starting it costs ~1 min on 2 cores: every device imports torch):

* 2 rounds through ``flwr run``; results, failures, the devices' encrypted ledgers and heads;
* an unregistered key and a SuperNode without TLS are rejected;
* ``slow``: corrupted / deleted state and an empty data file, each refused with a clear error and
  nothing overwritten; a SuperNode killed mid-round, the round completing from the rest, the node
  restarted with its ledger and head intact and its budget composing.

Every process is started in its own session and stopped by id (its whole tree); the last test checks
that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from fedpersona.client.store import DeviceStore
from fedpersona.config import known_keys
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.deploy.federation import LocalFederation
from fedpersona.simulations.processes import process_tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAMES = [f"device-{i}" for i in range(4)]
DELTA = 1e-2


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _processes_under(root: Path) -> list[int]:
    """Live processes whose command line mentions ``root`` (only to check; nothing is killed by name)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmd and _alive(int(entry)):
                out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deploy")
    federation = LocalFederation(root)
    seen: set[int] = set()
    try:
        federation.credentials(NAMES + ["intruder"])
        federation.start_superlink()
        users = load_users(min_speeches=40, max_users=4, seed=0)
        devices = []
        for name, user in zip(NAMES, users):
            dev = federation.add_device(name, user.user_id, [(e.cue, e.reply) for e in user.examples])
            federation.register(dev)
            devices.append(dev)
        for dev in devices:
            federation.start_device(dev)
        federation.wait_connected(devices, timeout=300)
        federation.seen = seen
        yield federation
    finally:
        for proc in federation.procs:
            seen.update(process_tree(proc.pid))
        federation.stop()
        left = [p for p in seen if _alive(p)] + _processes_under(root)
        assert not left, f"processes left behind: {sorted(set(left))}"


def _base_config(fed: LocalFederation, tiny_model_dir: Path, name: str, **extra) -> dict:
    cfg = {
        "run.name": name,
        "run.results-dir": str(fed.results_dir),
        "model.path": str(tiny_model_dir),
        "model.seq-len": 32,
        "model.cue-tokens": 8,
        "adapter.rank": 2,
        "data.max-examples": 16,
        "client.local-steps": 2,
        "client.batch-size": 4,
        "privacy.delta": DELTA,
        "privacy.planned-rounds": 10,
        "server.clients-per-round": 4,
        "server.min-clients": 2,
        # 4 devices: too few for the noise on the sum (t = 2 < the devices' floor of 3); each device's own noise.
        "privacy.noise-on": "device", "privacy.max-grad-norm": 1.0, "server.optimizer": "fedavg", "server.lr": 1.0,
        "eval.local-baseline": False,
    }
    cfg.update(extra)
    return cfg


def _run(fed: LocalFederation, cfg: dict, *, timeout: float = 400.0, on_poll=None,
         status_expected: str = "finished:completed") -> tuple[dict, str]:
    run_id = fed.submit(cfg)
    status = fed.wait_run(run_id, timeout=timeout, run_name=cfg["run.name"], on_poll=on_poll)
    log = fed.run_log(run_id)
    assert status == status_expected, f"{status}\n{log[-4000:]}"
    for proc in fed.procs:
        fed.seen.update(process_tree(proc.pid))
    return fed.metrics(cfg["run.name"]), log


def _ledger(dev) -> PrivacyLedger:
    text = DeviceStore(dev.state_dir).load_text("ledger")
    assert text is not None, f"{dev.name} has no ledger"
    return PrivacyLedger.from_json(text)


def _assert_secure_aggregation_if_configured(metrics: dict) -> None:
    """Whatever aggregation is configured must have run; secure aggregation when its keys say so."""
    flat = metrics["config"]
    secagg = {k: v for k, v in flat.items() if k.startswith("secagg.")}
    if any(k.startswith("secagg.") for k in known_keys()):
        enabled = secagg.get("secagg.enabled", True)
        if enabled not in (False, "false", 0):
            assert metrics["aggregation"] != "plain", metrics["aggregation"]


# ------------------------------------------------------------------------------------------- the run
def test_two_rounds_over_tls_with_node_authentication(fed, tiny_model_dir):
    metrics, log = _run(fed, _base_config(fed, tiny_model_dir, "main", **{"server.num-rounds": 2}))

    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert r["failed"] == 0 and r["declined"] == 0, r
        assert r["contributors"] == 4 and r["applied"], r
        assert r["update-norm"] > 0
    assert "failure" not in log.lower()
    _assert_secure_aggregation_if_configured(metrics)
    for i in (1, 2):
        assert (fed.results_dir / "main" / "checkpoints" / f"round-{i:04d}" / "shared" / "adapter_model.safetensors").is_file()
    # No per-user row reaches the server: it has the noised secure sum over the 4 devices; each keeps its own row.
    assert metrics["final"]["users"] == [] and metrics["final"]["devices"] == 4
    assert "users" in metrics["final"]["summary"]
    from fedpersona.simulations.user_table import read_user_rows

    users = read_user_rows([d.state_dir for d in fed.devices.values()])
    assert sorted(u["user"] for u in users) == sorted(d.user_id for d in fed.devices.values())
    assert metrics["final"]["failures"] == []

    for dev in fed.devices.values():
        store = DeviceStore(dev.state_dir)
        for path in [dev.state_dir / f for f in ("_journal-a.enc", "_journal-b.enc", "device.key")] + [store.anchor_path]:
            assert path.is_file(), path
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert {"ledger", "personal", "participation", "secagg-reveals"} <= set(store.names())
        for j in ("_journal-a.enc", "_journal-b.enc"):
            assert b"reply" not in (dev.state_dir / j).read_bytes()  # encrypted at rest
        ledger = _ledger(dev)
        assert [r["round"] for r in ledger.rounds] == [1, 2]
        assert 0 < ledger.epsilon(DELTA) <= 8.0
        text = dev.proc.text()
        # warm worker: the ClientApp was imported once and served every message of the run
        assert text.count("loaded ClientApp") == 1, text[-2000:]
        assert text.count("train task done") == 2 and text.count("evaluate task done") == 1


def test_unregistered_key_is_rejected(fed):
    dev = fed.devices["device-0"]
    intruder = fed.creds_dir / "supernodes" / "intruder"  # a valid key pair from our CA folder, never registered
    proc = fed.start_device(dev, key=intruder, max_retries=1, name="intruder")
    try:
        proc.popen.wait(timeout=180)
    finally:
        fed.seen.update(process_tree(proc.pid))
    text = proc.text()
    assert proc.popen.returncode != 0, text[-3000:]
    assert "[code: 2004] Failed to activate SuperNode" in text and "SuperNode ID:" not in text
    assert "No SuperNode found with the given public key" in fed.superlink.text()
    assert "Uvicorn running on" in text  # it did start: the refusal came from the SuperLink


def test_supernode_without_tls_is_rejected(fed):
    dev = fed.devices["device-1"]
    proc = fed.start_device(dev, insecure=True, max_retries=1, name="no-tls")
    try:
        proc.popen.wait(timeout=180)
    finally:
        fed.seen.update(process_tree(proc.pid))
    text = proc.text()
    assert "INSECURE MODE" in text  # the explicit flag warns
    assert proc.popen.returncode != 0, text[-3000:]
    assert "Failed to initialize the connection to the SuperLink" in text and "SuperNode ID:" not in text
    assert "Uvicorn running on" in text


# ------------------------------------------------------------------------------------------- faults
@pytest.mark.slow
def test_bad_state_and_bad_data_are_refused_and_left_untouched(fed, tiny_model_dir):
    d0, d1, d2, d3 = (fed.devices[n] for n in NAMES)
    # device-0: its records deleted (the key kept); device-1: its ledger corrupted; device-3: an empty data file.
    journals = ("_journal-a.enc", "_journal-b.enc")
    saved0 = {j: (d0.state_dir / j).read_bytes() for j in journals}
    for j in journals:
        (d0.state_dir / j).unlink()
    store1 = DeviceStore(d1.state_dir)
    store1.save_text("later", "a later commit")  # the ledger's commit is not the last one (that could be torn)
    blob = store1._folder.state.blobs["ledger"]
    journal1 = d1.state_dir / blob.journal
    good1 = journal1.read_bytes()
    bad1 = bytearray(good1)
    bad1[blob.offset + blob.length // 2] ^= 0x01
    journal1.write_bytes(bytes(bad1))
    empty = d3.data_dir / "zz-empty.jsonl"
    empty.write_text("")
    eps2 = _ledger(d2).epsilon(DELTA)
    try:
        cfg = _base_config(fed, tiny_model_dir, "faults", **{
            "server.num-rounds": 1, "server.min-clients": 1, "eval.final": False, "server.round-timeout": 120.0})
        # Secure aggregation needs 3 survivors: the round aborts, and a run that applied no round has failed.
        secure = cfg.get("secagg.enabled", True)
        metrics, log = _run(fed, cfg, status_expected="finished:failed" if secure else "finished:completed")
        (r,) = metrics["rounds"]
        assert r["failed"] == 3, r
        if metrics["aggregation"] == "plain":
            assert r["contributors"] == 1 and r["applied"], r  # the round completes from the healthy device
        else:
            assert not r["applied"] and r.get("aborted"), r  # secure aggregation needs more survivors: clean abort
        # The server learns the error class and a fixed text; each device's own log says why.
        assert log.count("StateError: the device could not answer this train request") >= 2, log[-4000:]
        assert "ValueError: the device could not answer this train request" in log
        assert "zz-empty.jsonl" not in log and "_journal" not in log
        assert "holds no record but its anchor records generation" in d0.proc.text()
        assert "blob 'ledger'" in d1.proc.text() and "failed authentication" in d1.proc.text()
        assert "zz-empty.jsonl: the file has no record" in d3.proc.text()
        # nothing overwritten: the corrupted journal (the head in it too), no records written in place of deleted ones
        assert journal1.read_bytes() == bytes(bad1)
        assert not any((d0.state_dir / j).exists() for j in journals)
        assert _ledger(d2).epsilon(DELTA) > eps2  # the healthy device trained and composed
    finally:
        for j, data in saved0.items():
            (d0.state_dir / j).write_bytes(data)
        journal1.write_bytes(good1)
        empty.unlink(missing_ok=True)


@pytest.mark.slow
def test_supernode_killed_mid_round_then_restarted(fed, tiny_model_dir):
    victim = fed.devices["device-2"]
    before = _ledger(victim)
    head_before = DeviceStore(victim.state_dir).load_tensors("personal")
    others = [d for d in fed.devices.values() if d is not victim]
    starts = {d.name: len(d.proc.text()) for d in others}
    killed: dict[str, float] = {}
    # Freeze the victim's worker (SIGSTOP): it cannot answer the round's first message (train, or
    # query.advertise under secure aggregation). Once the other devices have theirs, and the victim's
    # SuperNode has had time to poll (every 1 s), kill the victim's whole process tree with SIGKILL.
    os.kill(victim.proc.pid, signal.SIGSTOP)
    round_seen: dict[str, float] = {}

    def kill_once_the_round_is_out() -> None:
        if killed:
            return
        if not round_seen:
            if all("Receiving: " in d.proc.text()[starts[d.name]:] for d in others):
                round_seen["at"] = time.monotonic()
            return
        if time.monotonic() - round_seen["at"] < 5.0:
            return
        fed.seen.update(process_tree(victim.proc.pid))
        fed.stop_device(victim, sig=signal.SIGKILL)
        killed["at"] = time.time()
        # On disk: the ledger and head load (atomic, encrypted writes) and lost nothing.
        after = _ledger(victim)
        assert after.rounds == before.rounds
        assert DeviceStore(victim.state_dir).load_tensors("personal") is not None
        fed.start_device(victim)  # restarted: same key, same state folder

    try:
        metrics, log = _run(fed, _base_config(fed, tiny_model_dir, "killed", **{
            "server.num-rounds": 3, "eval.final": False, "server.round-timeout": 45.0}),
            on_poll=kill_once_the_round_is_out)
    finally:
        if not killed and victim.proc.running():
            os.kill(victim.proc.pid, signal.SIGCONT)
    assert killed, "round 1 never reached the other devices"
    r1, r2, r3 = metrics["rounds"]
    # round 1 completes from the other three; the killed device did not reply in time
    assert r1["applied"] and r1["contributors"] == 3 and r1["failed"] >= 1, r1
    assert "did not reply in time" in log
    # the restarted device is back once the SuperLink has dropped its old session: round 2 may still
    # find it offline (then it completes from the other three), round 3 has all four
    assert r2["applied"] and r2["contributors"] >= 3, r2
    assert r3["applied"] and r3["contributors"] == 4 and r3["failed"] == 0, r3
    after = _ledger(victim)
    assert after.rounds[: len(before.rounds)] == before.rounds  # restarted: never a fresh budget
    assert len(after.rounds) > len(before.rounds)
    assert after.epsilon(DELTA) > before.epsilon(DELTA)
    head_after = DeviceStore(victim.state_dir).load_tensors("personal")
    assert head_after.keys() == head_before.keys()
    assert any((head_after[k] != head_before[k]).any() for k in head_after)  # trained on from its own head
