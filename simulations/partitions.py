"""The simulation hands each simulated device its user's data: a deployment-style data folder per user.

:func:`prepare_partitions` writes, under ``<run.state-dir>/<run.name>/_simulated/``, one folder per
corpus user with its ``(cue, reply)`` examples as ``examples.jsonl`` (the format of
:func:`fedpersona.client.data.read_user_folder`), and the manifest (:mod:`fedpersona.client.node_data`) that maps a
Flower ``partition-id`` to that folder, the user id and the device's state folder
``<run.state-dir>/<run.name>/<user slug>``. Partition ``i`` is the ``i``-th user of
:func:`fedpersona.simulations.sources.load_source` for ``data.*`` and ``run.seed`` (the Shakespeare corpus by
default, as before; or the user's own dataset, ``docs/data.md``).

It also provisions the simulated devices' **identities** (:func:`provision_identities`): a run-level
Ed25519 trust root, ``_simulated/identity-root.key`` (the simulation's stand-in for the operator's
root; nothing on the server's code path reads it), and in each device's state folder an
``identity.json`` certified by it, so that the simulated devices run secure aggregation with bound
keys as deployed devices do (``docs/secagg.md``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from fedpersona.client.node_data import SIMULATED, NodeData, manifest_path, read_manifest, slug, write_manifest
from fedpersona.config import Config
from fedpersona.identity import ROOT_KEY_FILE, provision
from fedpersona.simulations.corpus import UserCorpus
from fedpersona.simulations.sources import load_source

logger = logging.getLogger(__name__)

__all__ = ["ensure_partitions", "prepare_partitions", "provision_identities"]

EXAMPLES_FILE = "examples.jsonl"


def _source(cfg: Config) -> dict:
    """What the partitions depend on: a manifest written for other values is stale."""
    d = cfg.data
    return {"data.source": d.source, "data.user-column": d.user_column, "data.cue-column": d.cue_column,
            "data.reply-column": d.reply_column, "data.text-column": d.text_column, "data.order-column": d.order_column,
            "data.thread-column": d.thread_column, "data.min-examples": d.min_examples,
            "data.max-users": d.max_users, "run.seed": cfg.run.seed, "run.state-dir": str(cfg.run.state_dir),
            "run.name": cfg.run.name}


def _write_examples(folder: Path, user: UserCorpus) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=EXAMPLES_FILE, dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for e in user.examples:
            fh.write(json.dumps({"cue": e.cue, "reply": e.reply}) + "\n")
    os.replace(tmp, folder / EXAMPLES_FILE)


def simulated_state_dir(cfg: Config, user_id: str) -> Path:
    """A simulated device's state folder: ``<run.state-dir>/<run.name>/<user slug>``."""
    return Path(cfg.run.state_dir) / cfg.run.name / slug(user_id)


def prepare_partitions(cfg: Config, users: list[UserCorpus] | None = None) -> list[UserCorpus]:
    """Write every simulated user's data folder and the manifest; returns the users (partition order)."""
    if users is None:
        users = load_source(cfg.data, cfg.run.seed)
    run_root = Path(cfg.run.state_dir) / cfg.run.name
    nodes = {}
    for pid, user in enumerate(users):
        data_dir = run_root / SIMULATED / slug(user.user_id)
        _write_examples(data_dir, user)
        nodes[pid] = NodeData(user.user_id, data_dir, simulated_state_dir(cfg, user.user_id))
    path = write_manifest(manifest_path(cfg), nodes, source=_source(cfg))
    provision_identities(cfg, [n.state_dir for n in nodes.values()])
    logger.info("Simulated users' data for %d partitions in %s", len(nodes), path.parent)
    return list(users)


def provision_identities(cfg: Config, state_dirs) -> Path:
    """Certify an identity for each simulated device under the run's root (created once); the root's path."""
    root = manifest_path(cfg).parent / ROOT_KEY_FILE
    provision(state_dirs, root)
    return root


def ensure_partitions(cfg: Config) -> int:
    """Prepare the partitions unless a manifest for the same ``data.*``, seed and run is there; the number of users."""
    path = manifest_path(cfg)
    try:
        manifest = read_manifest(path)
        if manifest.get("source") == _source(cfg):
            provision_identities(cfg, [Path(n["state-dir"]) for n in manifest["nodes"].values()])
            return len(manifest["nodes"])
    except ValueError:
        pass
    return len(prepare_partitions(cfg))
