"""SecureAggregator through the real ClientApp handlers on an in-process Grid: sums, dropouts, aborts, what the server sees."""

import json
import logging
import math
import warnings
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.device import BudgetExhausted
from fedpersona.client.store import DeviceStore
from fedpersona.config import CONFIG_ENV, load_config
from fedpersona.identity import provision
from fedpersona.secagg_wire import ARRAYS, RECORD
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.wire import to_record
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.secagg.quantize import unpack_bits
from fedpersona.server.aggregation import PlainAggregator
from fedpersona.server.secagg import SecureAggregator, build_aggregator

RUN_ID = 4242
SHARED = {"a.lora_B.shared.weight": torch.zeros(24, 4), "b.lora_B.shared.weight": torch.zeros(10, 4)}
DIM = sum(t.numel() for t in SHARED.values())


class FakeDevice:
    """Stands in for fedpersona.client.device.Device: a fixed update per node, a real encrypted store and ledger."""

    declined: set[str] = set()

    def __init__(self, cfg, node_config):
        self.cfg = cfg
        self.user_id = node_config["user-id"]
        self.store = DeviceStore(node_config["state-dir"])
        self.n = float(node_config["examples"])

    def load_ledger(self):
        text = self.store.load_text("ledger")
        return PrivacyLedger.from_json(text) if text else PrivacyLedger()

    def delta(self, shared):
        gen = torch.Generator().manual_seed(int(self.user_id[1:]))
        return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in sorted(shared.items())}

    def train_round(self, shared, *, server_round):
        if self.user_id in FakeDevice.declined:
            raise BudgetExhausted(f"{self.user_id}: budget spent")
        # As fedpersona.client.device.Device: the update with weight 1, and only the public weight and a constant beside it.
        return self.delta(shared), {"weight": 1.0, "trained": 1.0}


class FakeGrid(Grid):
    """Hands each message to the real ClientApp (mods included); ``drop[type]``: nodes whose reply is lost."""

    def __init__(self, contexts):
        self.contexts = contexts
        self.drop: dict[str, set[int]] = {}
        self.log: list[tuple[Message, Message]] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        from flwr.supercore.run import Run

        return Run.create_empty(RUN_ID)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return sorted(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex
            dst = m.metadata.dst_node_id
            if dst in self.drop.get(m.metadata.message_type, set()):
                continue  # the node went away before answering
            reply = client_app.app(m, self.contexts[dst])
            self.log.append((m, reply))
            out.append(reply)
        return out

    def replies(self, message_type):
        return [r for m, r in self.log if m.metadata.message_type == message_type]


def _flat(tmp_path, **over):
    flat = {"model.path": "unused-by-fake-devices", "data.max-examples": 16, "client.local-steps": 2,
            "server.clients-per-round": 5, "server.min-clients": 2, "privacy.delta": 1e-2,
            "run.results-dir": str(tmp_path / "results"), "run.state-dir": str(tmp_path / "state")}
    flat.update(over)
    return flat


@pytest.fixture
def federation(tmp_path, monkeypatch):
    """Five fake devices (ids 11..15) behind a FakeGrid; returns a builder taking config overrides."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("task_id", 1), ("run_id", RUN_ID), ("node_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{attr}", value, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(client_app, "Device", FakeDevice)
    monkeypatch.setattr(FakeDevice, "declined", set())
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()

    def build(**over):
        client_app._DEVICES.clear()  # devices are cached per (run, node): a new config needs new ones
        flat = _flat(tmp_path, **over)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = load_config(flat, env=False)
        contexts = {nid: Context(run_id=RUN_ID, node_id=nid, state=RecordDict(), run_config=flat,
                                 node_config={"user-id": f"u{nid}", "examples": 6 + nid % 7,
                                              "data-dir": str(tmp_path / f"data{nid}"),
                                              "state-dir": str(tmp_path / f"state{nid}")})
                    for nid in range(11, 16)}
        # Each device's identity under the operator's root (the server never holds the root's key).
        provision([c.node_config["state-dir"] for c in contexts.values()], tmp_path / "identity-root.key")
        return cfg, FakeGrid(contexts)

    yield build
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()


def _content(server_round=1):
    return RecordDict({"shared": to_record(SHARED), "config": ConfigRecord({"server-round": server_round})})


def _expected_sum(cfg, grid, members):
    """Sum over members of delta (weight 1), each clipped to secagg.clip-norm (what the protocol promises)."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in SHARED.items()}
    for nid in members:
        dev = FakeDevice(cfg, grid.contexts[nid].node_config)
        d = {k: v.double() for k, v in dev.delta(SHARED).items()}
        norm = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        f = min(1.0, cfg.secagg.clip_norm / norm)
        for k in total:
            total[k] += d[k] * f
    return total


def tmp_path_of(cfg):
    from pathlib import Path

    return Path(cfg.run.results_dir) / cfg.run.name


def _mean(rs):
    return {k: v.double() / rs.weight for k, v in rs.update_sum.items()}


def test_secure_mean_equals_plain_mean_within_the_quantization_bound(federation):
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    secure = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert secure.failures == [] and not secure.aborted
    assert secure.contributors == 5 and secure.declined == []
    # Plain aggregation of the very same device updates (secagg off on the clients too).
    cfg_p, grid_p = federation(**{"secagg.enabled": False})
    plain = PlainAggregator().collect(grid_p, cohort, _content(), server_round=1, timeout=None)
    assert plain.contributors == 5
    assert secure.weight == plain.weight == 5  # weight 1 per device: the number of contributors
    # With no update clipped the means agree; the bound: n / scale per coordinate of the sum, divided by the weight.
    bound = len(cohort) / secagg_params(cfg).scale / secure.weight
    pm, sm = _mean(plain), _mean(secure)
    for k in SHARED:
        err = float((pm[k] - sm[k]).abs().max())
        assert err < bound, (k, err, bound)
        assert float(pm[k].abs().max()) > 1000 * bound  # the comparison is not vacuous
    # Metrics: no example count, loss, epsilon or timing; only the constant "trained", totalled.
    assert secure.metrics == {"trained": 5.0, "weight": 5.0} and plain.metrics == {"trained": 5.0, "weight": 5.0}


@pytest.mark.parametrize("drop_masking,drop_unmasking", [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (0, 2)])
def test_dropouts_at_each_stage_still_give_the_survivors_sum(federation, drop_masking, drop_unmasking):
    cfg, grid = federation()
    cohort = sorted(grid.contexts)  # 5 nodes: complete graph, k = 4, t = 3
    d1, d2 = cohort[:drop_masking], cohort[-drop_unmasking:] if drop_unmasking else []
    grid.drop = {"train": set(d1), "query.unmask": set(d2)}
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert not rs.aborted, rs.aborted
    survivors = [c for c in cohort if c not in d1]
    assert rs.contributors == len(survivors)
    assert rs.info["secagg-dropped-masking"] == len(d1) and rs.info["secagg-dropped-unmasking"] == len(d2)
    expected = _expected_sum(cfg, grid, survivors)
    for k in SHARED:
        err = float((rs.update_sum[k].double() - expected[k]).abs().max())
        assert err < len(survivors) / secagg_params(cfg).scale
    # Lost replies are counted as failures, never silently ignored.
    assert len(rs.failures) == bool(d1) + bool(d2)


def test_too_few_survivors_abort_the_round_cleanly(federation):
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    grid.drop = {"train": set(cohort[:4])}  # 1 survivor < min_survivors
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert rs.aborted and "nothing revealed" in rs.aborted
    assert rs.contributors == 0 and rs.weight == 0 and rs.update_sum == {}
    assert rs.failures  # the lost replies are surfaced
    assert not grid.replies("query.unmask"), "no unmask request after an abort"
    # Too few unmask answers: shares missing -> abort after stage 2, nothing reconstructed.
    cfg, grid = federation()
    grid.drop = {"query.unmask": set(cohort[:3])}  # 2 answer, t = 3
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=2, timeout=None)
    assert rs.aborted and "not enough shares" in rs.aborted and rs.contributors == 0


def test_server_receives_no_plain_update_weight_or_metrics(federation):
    cfg, grid = federation()
    cohort = sorted(grid.contexts)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert rs.contributors == 5
    q = secagg_params(cfg).quantizer
    for m, reply in grid.log:
        content = reply.content
        assert set(content.keys()) == {RECORD, ARRAYS, "freshness"}, m.metadata.message_type
        # The freshness receipt: one opaque 84-byte string, encrypted under the device's own key.
        assert set(content.config_records["freshness"]) == {"receipt"}
        assert len(content.config_records.pop("freshness")["receipt"]) == 84
        assert not content.metric_records
        for name, arr in content.array_records[ARRAYS].items():
            # no float array: no plain update; the masked vector is b-bit packed, the rest are ids
            assert arr.numpy().dtype == (np.uint8 if name == "masked" else np.uint64), name
        for key, value in content.config_records[RECORD].items():
            assert not isinstance(value, (float, str)), key  # ints (ids, round) and bytes (keys, shares) only
    width = DIM + len(q.extras)
    masked = [unpack_bits(r.content.array_records[ARRAYS]["masked"].numpy(), q.bits, width) for r in grid.replies("train")]
    for vec in masked:
        # The plain quantized extra (trained = 1) does not appear in the masked vector.
        assert int(vec[DIM]) != 1 and len(q.extras) == 1
        assert vec.max() >= 2 ** (q.bits - 4)  # spread over the ring, not small integers
    # The unmask replies carry only shares (bytes) and client ids.
    for reply in grid.replies("query.unmask"):
        assert set(reply.content.config_records[RECORD]) == {"client_id", "run_id", "round", "b_shares", "pair_shares"}


def test_declined_devices_take_no_part_in_the_sum(federation):
    cfg, grid = federation()
    FakeDevice.declined = {"u12"}
    cohort = sorted(grid.contexts)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert rs.contributors == 4 and len(rs.declined) == 1 and "took no part" in rs.declined[0]
    assert rs.info["secagg-declined"] == 1 and rs.info["secagg-survivors"] == 4 and rs.metrics["trained"] == 4
    expected = _expected_sum(cfg, grid, [c for c in cohort if c != 12])
    for k in SHARED:
        assert float((rs.update_sum[k].double() - expected[k]).abs().max()) < 5 / secagg_params(cfg).scale
    # The decliner sent no vector and no shares, and was not asked to unmask.
    (decline,) = [r for m, r in grid.log if m.metadata.message_type == "train" and m.metadata.dst_node_id == 12]
    assert not decline.content.array_records.get(ARRAYS) and set(decline.content[RECORD]) == {
        "client_id", "run_id", "round", "declined", "signature"}
    assert 12 not in {m.metadata.dst_node_id for m, _ in grid.log
                      if m.metadata.message_type in ("query.consistency", "query.unmask")}


def test_keys_advertised_once_per_run_and_new_nodes_when_first_sampled(federation):
    cfg, grid = federation()
    agg = SecureAggregator(cfg, run_id=RUN_ID)
    agg.collect(grid, [11, 12, 13], _content(1), server_round=1, timeout=None)
    assert len(grid.replies("query.advertise")) == 3
    rs = agg.collect(grid, [12, 13, 14, 15], _content(2), server_round=2, timeout=None)
    assert len(grid.replies("query.advertise")) == 5 and rs.contributors == 4
    # A third round: no advertisement at all; 3 exchanges per node (masked input, consistency check, unmask).
    before = len(grid.log)
    agg.collect(grid, [11, 12, 13, 14, 15], _content(3), server_round=3, timeout=None)
    kinds = [m.metadata.message_type for m, _ in grid.log[before:]]
    assert sorted(set(kinds)) == ["query.consistency", "query.unmask", "train"] and len(kinds) == 15


def test_a_node_that_fails_to_advertise_is_left_out_and_counted(federation):
    cfg, grid = federation()
    grid.drop = {"query.advertise": {11}}
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, sorted(grid.contexts), _content(), server_round=1,
                                                      timeout=None)
    assert rs.contributors == 4 and any(f.startswith("advertise:") for f in rs.failures)


def test_federation_aborted_round_leaves_adapter_unchanged(federation, tiny_model_dir):
    from fedpersona.server.checkpoint import latest_checkpoint
    from fedpersona.server.federation import run_federation

    cfg, grid = federation(**{"model.path": str(tiny_model_dir), "adapter.layers": 2, "adapter.personal-layers": 1,
                              "adapter.rank": 2, "server.num-rounds": 2, "server.clients-per-round": 3,
                              "eval.final": False})
    grid.contexts = {k: v for k, v in grid.contexts.items() if k <= 13}
    grid.drop = {"train": {11, 12}}  # round 1: a single survivor -> abort
    metrics = run_federation(grid, cfg)
    assert metrics["aggregation"] == "secagg+" and metrics["secagg"]["clip-norm"] == cfg.secagg.clip_norm
    r1, r2 = metrics["rounds"]
    assert not r1["applied"] and r1["contributors"] == 0 and "nothing revealed" in r1["aborted"] and r1["failed"]
    assert any("aborted" in w for w in metrics["warnings"])
    assert not r2["applied"] and r2["contributors"] == 0  # the same nodes dropped in round 2
    from fedpersona.model import adapted_model

    initial = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed).initial_shared_state()
    run_dir = tmp_path_of(cfg)
    _, shared, _ = latest_checkpoint(run_dir / "checkpoints")
    for k, v in initial.items():
        torch.testing.assert_close(shared[k], v)
    assert "no round was applied" in " ".join(metrics["warnings"])
    assert json.loads((run_dir / "metrics.json").read_text())["aggregation"] == "secagg+"


def test_federation_applies_the_secure_mean(federation, tiny_model_dir):
    from fedpersona.server.federation import run_federation

    cfg, grid = federation(**{"model.path": str(tiny_model_dir), "adapter.layers": 2, "adapter.personal-layers": 1,
                              "adapter.rank": 2, "server.num-rounds": 1, "server.clients-per-round": 3,
                              "eval.final": False})
    grid.contexts = {k: v for k, v in grid.contexts.items() if k <= 13}
    metrics = run_federation(grid, cfg)
    (row,) = metrics["rounds"]
    assert row["applied"] and row["contributors"] == 3 and row["failed"] == 0 and row["update-norm"] > 0
    assert row["secagg-survivors"] == 3 and row["secagg-seconds"] > 0
    assert "train-loss" not in row and "epsilon" not in row  # no device sends them
    assert metrics["warnings"] == []


def test_secagg_off_warns_everywhere_and_is_recorded(federation, tiny_model_dir, caplog):
    from fedpersona.server.federation import run_federation

    with pytest.warns(UserWarning, match="secagg.enabled = false"):
        load_config({"secagg.enabled": False}, env=False)
    cfg, grid = federation(**{"model.path": str(tiny_model_dir), "adapter.layers": 2, "adapter.personal-layers": 1,
                              "adapter.rank": 2, "server.num-rounds": 1, "server.clients-per-round": 3,
                              "eval.final": False, "secagg.enabled": False})
    assert isinstance(build_aggregator(cfg, run_id=RUN_ID), PlainAggregator)
    with caplog.at_level(logging.WARNING):
        metrics = run_federation(grid, cfg)
    assert metrics["aggregation"] == "plain"
    assert any("plain aggregation" in w for w in metrics["warnings"])
    client_warnings = [r for r in caplog.records if r.name == "fedpersona.client.app" and r.levelno == logging.WARNING]
    assert len(client_warnings) == 3 and "in the clear" in client_warnings[0].getMessage()
    assert metrics["rounds"][0]["applied"]


def test_ddp_noise_ledger_and_metrics(federation):
    cfg, grid = federation(**{"secagg.ddp": True, "secagg.ddp-noise-multiplier": 0.5, "secagg.ddp-min-clients": 3})
    cohort = sorted(grid.contexts)
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(), server_round=1, timeout=None)
    assert rs.contributors == 5 and rs.info["ddp-epsilon-max"] > 0
    expected = _expected_sum(cfg, grid, cohort)
    noise = np.concatenate([(rs.update_sum[k].double() - expected[k]).numpy().ravel() for k in SHARED])
    # Total stddev of the sum's noise: 5 clients of sigma_c = 0.5 * C / sqrt(3) each.
    sigma = 0.5 * cfg.secagg.clip_norm * math.sqrt(5 / 3)
    assert 0.8 * sigma < noise.std() < 1.2 * sigma
    for nid in cohort:
        entries = FakeDevice(cfg, grid.contexts[nid].node_config).load_ledger().user_level_entries
        assert len(entries) == 1 and entries[0]["epsilon"] == pytest.approx(rs.info["ddp-epsilon-max"])
    # Fewer than ddp-min-clients survivors: refused (the noise would be too small).
    grid.drop = {"train": set(cohort[:3])}
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, cohort, _content(2), server_round=2, timeout=None)
    assert rs.aborted and "min_survivors=3" in rs.aborted


def test_the_server_code_never_touches_the_identity_root():
    """Devices trust the operator's identity root; nothing the ServerApp runs may read or make its private key."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "server"
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        for needle in ("IdentityRoot", "ROOT_KEY_FILE", "identity-root", "fedpersona.identity", "provision("):
            assert needle not in text, f"{path.name} mentions {needle}"
