import json
from pathlib import Path

import pytest

from fedpersona.client.data import read_user_folder
from fedpersona.client.device import load_pairs_for_node, state_dir_for
from fedpersona.client.node_data import manifest_path, node_data, slug
from fedpersona.config import load_config
from fedpersona.simulations.corpus import load_users
from fedpersona.simulations.partitions import ensure_partitions, prepare_partitions


@pytest.fixture
def cfg(tmp_path):
    return load_config({"run.state-dir": str(tmp_path / "state"), "run.name": "r", "data.max-users": 3}, env=False)


def test_a_simulated_node_reads_its_users_examples_from_the_manifest(cfg):
    users = load_users(min_speeches=cfg.data.min_speeches, max_users=3, seed=cfg.run.seed)
    prepare_partitions(cfg)
    for pid, user in enumerate(users):
        user_id, pairs, state_dir = load_pairs_for_node(cfg, {"partition-id": pid})
        assert user_id == user.user_id
        assert pairs == [(e.cue, e.reply) for e in user.examples]  # the same examples, in the same order
        # The state folder is where it always was: <run.state-dir>/<run.name>/<user slug>.
        assert state_dir == cfg_state(cfg) / slug(user.user_id) == state_dir_for(cfg, {"partition-id": pid})
    with pytest.raises(ValueError, match="partition-id 3 has no user"):
        node_data(cfg, {"partition-id": 3})


def cfg_state(cfg):
    return Path(cfg.run.state_dir) / cfg.run.name


def test_without_a_manifest_a_simulated_node_says_where_it_looked(cfg):
    with pytest.raises(ValueError, match="no simulation manifest at .*manifest.json"):
        node_data(cfg, {"partition-id": 0})
    with pytest.raises(ValueError, match="'data-dir' \\(deployment\\) or 'partition-id'"):
        node_data(cfg, {})


def test_deployment_node_config_wins_and_defaults(tmp_path, cfg):
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "a.jsonl").write_text(json.dumps({"cue": "hi", "reply": "hello there"}) + "\n")
    node = node_data(cfg, {"data-dir": str(tmp_path / "me"), "partition-id": 0})
    assert node.user_id == "me" and node.state_dir == tmp_path / "me" / ".fedpersona-state"
    assert read_user_folder(node.data_dir) == [("hi", "hello there")]


def test_ensure_partitions_rewrites_a_stale_manifest_only(cfg):
    ensure_partitions(cfg)
    path = manifest_path(cfg)
    first = path.stat().st_mtime_ns
    ensure_partitions(cfg)
    assert path.stat().st_mtime_ns == first  # current: kept
    doc = json.loads(path.read_text())
    doc["source"]["data.max-users"] = 99
    path.write_text(json.dumps(doc))
    ensure_partitions(cfg)
    assert json.loads(path.read_text())["source"]["data.max-users"] == 3


def test_the_pyproject_clientapp_prepares_simulated_nodes_before_the_device_reads(cfg):
    # `flwr run .` starts simulated nodes that know only their partition-id: the component's mod
    # writes the users' data folders and the manifest once per run, then hands the message on.
    from flwr.app import Context, RecordDict

    from fedpersona.simulations.clientapp import prepare_simulated_node

    context = Context(run_id=11, node_id=5, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config=cfg.to_flat())
    message = object()  # only handed on (a real Message needs a Flower run's task identity)
    seen = []
    reply = prepare_simulated_node(message, context, lambda m, c: seen.append(node_data(cfg, c.node_config)) or m)
    assert reply is message
    assert seen[0].user_id == load_users(min_speeches=cfg.data.min_speeches, max_users=3, seed=0)[1].user_id
    assert manifest_path(cfg).is_file()


def test_the_manifest_is_parsed_once_while_it_stays_the_same(cfg, monkeypatch):
    """Every simulated device built looks itself up in the manifest: parsed once, again only after a rewrite."""
    from fedpersona.client import node_data as nd

    prepare_partitions(cfg)
    parsed = []
    real = nd.read_manifest
    monkeypatch.setattr(nd, "read_manifest", lambda path: parsed.append(path) or real(path))
    nd._MANIFESTS.clear()
    ids = [node_data(cfg, {"partition-id": pid}).user_id for pid in (0, 1, 2, 0, 1, 2)]
    assert len(parsed) == 1 and ids[:3] == ids[3:]
    prepare_partitions(cfg)  # the simulation writes it again (atomically: a new file)
    assert node_data(cfg, {"partition-id": 1}).user_id == ids[1]
    assert len(parsed) == 2
    path = manifest_path(cfg)
    doc = json.loads(path.read_text())
    doc["nodes"]["1"]["user-id"] = "SOMEONE ELSE (Edited)"
    path.write_text(json.dumps(doc))  # edited in place: same file, new size and time
    assert node_data(cfg, {"partition-id": 1}).user_id == "SOMEONE ELSE (Edited)"
