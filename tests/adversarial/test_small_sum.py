"""Hole 1, as a dishonest server would try it: a cohort of 4 where 3 devices decline leaves one trainer.

Before: the three decliners sent masked zeros that counted as survivors, the server unmasked the
lone trainer's exact update and wrote its train loss, epsilon and example count into metrics.json,
rounds.csv and server_inventory.jsonl. Now a decliner says so in stage 1 and takes no part in
masking; with fewer than ``secagg.min-contributors`` trained survivors the round aborts before any
unmask request, and no file the server writes holds a figure of the lone trainer.
"""

from pathlib import Path

import pytest

import fedpersona.client.app as client_app
from fedpersona.server.federation import run_federation
from fedpersona.server.flow_log import read_server_inventory
from fedpersona.server.secagg import SecureAggregator
from tests.server.test_secagg import RUN_ID, FakeDevice, _content, federation  # noqa: F401  (fixture)

# Figures only the lone trainer (u11) has: none of them may appear in anything the server writes.
LONE = {"train-loss": 7.654321, "epsilon": 3.217791, "heldout-shared-loss": 5.432109, "heldout-personal-loss": 4.987613,
        "train-seconds": 61.234567}


class LoneTrainer(FakeDevice):
    def train_round(self, shared, *, server_round):
        update, metrics = super().train_round(shared, server_round=server_round)
        metrics.update(LONE)
        return update, metrics


@pytest.fixture
def lone_round(federation, tiny_model_dir, monkeypatch):  # noqa: F811
    cfg, grid = federation(**{"model.path": str(tiny_model_dir), "adapter.layers": 2, "adapter.personal-layers": 1,
                              "adapter.rank": 2, "server.num-rounds": 1, "server.clients-per-round": 4,
                              "eval.final": False})
    grid.contexts = {k: v for k, v in grid.contexts.items() if k <= 14}  # cohort of 4
    monkeypatch.setattr(client_app, "Device", LoneTrainer)
    monkeypatch.setattr(FakeDevice, "declined", {"u12", "u13", "u14"})  # budget spent: they decline
    return cfg, grid


def test_lone_trainer_round_is_never_unmasked(lone_round):
    cfg, grid = lone_round
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, sorted(grid.contexts), _content(), server_round=1,
                                                      timeout=None)
    assert rs.aborted and "before any unmask request" in rs.aborted
    assert rs.contributors == 0 and rs.update_sum == {} and rs.metrics == {} and rs.weight == 0
    assert not [m for m, _ in grid.log if m.metadata.message_type == "query.unmask"], "no unmask request was sent"
    # The decliners sent no masked vector and no shares.
    declines = [r for m, r in grid.log if m.metadata.message_type == "train" and m.metadata.dst_node_id != 11]
    assert len(declines) == 3 and all(not r.content.array_records.get("secagg-arrays") for r in declines)


def test_no_figure_of_the_lone_trainer_in_any_server_file(lone_round):
    cfg, grid = lone_round
    metrics = run_federation(grid, cfg)
    (row,) = metrics["rounds"]
    assert not row["applied"] and row["contributors"] == 0 and "aborted" in row
    assert not [m for m, _ in grid.log if m.metadata.message_type == "query.unmask"]
    for key in ("train-loss", "epsilon", "examples", "weight", "heldout-shared-loss", "heldout-personal-loss",
                "train-seconds", "empty-steps"):
        assert key not in row, key
    (entry,) = read_server_inventory(Path(cfg.run.results_dir) / cfg.run.name)
    assert entry["metric_sums"] == {} and entry["update_sum"] == [] and not entry["weight_sum"]
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    texts = {p.name: p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file() and p.suffix in
             (".json", ".jsonl", ".csv", ".txt")}
    assert {"metrics.json", "rounds.csv", "server_inventory.jsonl"} <= set(texts)
    for name, text in texts.items():
        for key, value in LONE.items():
            assert f"{value:.4f}"[:-1] not in text and str(value)[:5] not in text, (name, key)
