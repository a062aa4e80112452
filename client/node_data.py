"""Where a device's data and state folder are, from its Flower node config.

* **Deployment**: ``data-dir`` (a folder of ``*.jsonl``, :func:`fedpersona.client.data.read_user_folder`),
  ``state-dir`` (default ``<data-dir>/.fedpersona-state``) and ``user-id`` (default: the data
  folder's name).
* **Simulation**: ``partition-id``. The simulation hands each simulated node its user's data the
  deployment way, as a data folder, and lists the nodes in a manifest written before any node
  starts, ``<run.state-dir>/<run.name>/_simulated/manifest.json``::

      {"version": 1, "source": {...}, "nodes": {"0": {"user-id": "HAMLET (Hamlet)",
       "data-dir": ".../_simulated/hamlet-hamlet-1a2b3c", "state-dir": ".../hamlet-hamlet-1a2b3c"}, ...}}

  ``source`` is whatever the writer uses to tell a stale manifest from a current one; the device
  ignores it. The device never knows where the users came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.config import Config, load_config

__all__ = ["MANIFEST_VERSION", "NodeData", "manifest_path", "node_data", "read_manifest", "slug", "write_manifest"]

MANIFEST_VERSION = 1
SIMULATED = "_simulated"  # a leading "_": the audit never takes it for a device's state folder


def slug(text: str) -> str:
    """A file-name-safe, collision-resistant folder name for a user id."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (s or "user")[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:6]


@dataclass(frozen=True)
class NodeData:
    user_id: str
    data_dir: Path
    state_dir: Path


def manifest_path(cfg: Config) -> Path:
    """``<run.state-dir>/<run.name>/_simulated/manifest.json``."""
    return Path(cfg.run.state_dir) / cfg.run.name / SIMULATED / "manifest.json"


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no simulation manifest at {p}: simulated nodes (node config 'partition-id') get their data "
                         "from the simulation (fedpersona run, or the fedpersona.simulations.clientapp component)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION or not isinstance(doc.get("nodes"), dict):
        raise ValueError(f"{p}: not a version-{MANIFEST_VERSION} simulation manifest")
    return doc


def write_manifest(path: str | Path, nodes: Mapping[int, NodeData], *, source: Mapping[str, Any] | None = None) -> Path:
    """Write the manifest atomically (simulated nodes may read it while another process rewrites it)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": MANIFEST_VERSION, "source": dict(source or {}),
           "nodes": {str(pid): {"user-id": n.user_id, "data-dir": str(n.data_dir), "state-dir": str(n.state_dir)}
                     for pid, n in sorted(nodes.items())}}
    fd, tmp = tempfile.mkstemp(prefix=p.name, dir=p.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, p)
    return p


def node_data(cfg: Config, node_config: Mapping[str, Any]) -> NodeData:
    """The node's user id, data folder and state folder (deployment: its node config; simulation: the manifest)."""
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        user_id = str(node_config.get("user-id", data_dir.name))
        state_dir = Path(str(node_config.get("state-dir", data_dir / ".fedpersona-state"))).expanduser()
        return NodeData(user_id, data_dir, state_dir)
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'data-dir' (deployment) or 'partition-id' (simulation)")
    path = manifest_path(cfg)
    nodes = _manifest_nodes(path)
    pid = int(node_config["partition-id"])
    entry = nodes.get(str(pid))
    if entry is None:
        raise ValueError(f"partition-id {pid} has no user: the simulation manifest {path} lists {len(nodes)} users")
    return NodeData(str(entry["user-id"]), Path(entry["data-dir"]), Path(entry["state-dir"]))


#: The nodes of the manifests read by this process, by path, with the file's identity when it was read.
_MANIFESTS: dict[Path, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}


def _manifest_nodes(path: Path) -> dict[str, Any]:
    """``read_manifest(path)["nodes"]``, parsed once per process while the file stays the same.

    Every simulated device built (a round's cohort, the final evaluation's every node) looks itself
    up here; the file is read again only when its inode, size or modification time changed (the
    writer replaces it atomically, so a rewrite always gives a new inode).
    """
    try:
        st = path.stat()
    except OSError:
        return read_manifest(path)["nodes"]  # its error names the missing manifest
    stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
    hit = _MANIFESTS.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    nodes = read_manifest(path)["nodes"]
    _MANIFESTS[path] = (stamp, nodes)
    return nodes


_CONTEXT_STATE_DIRS: dict[tuple[int, int], Path] = {}


def context_state_dir(run_id: int, node_id: int, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Path:
    """The state folder of the device a ClientApp context addresses (cached per run and node)."""
    key = (int(run_id), int(node_id))
    if key not in _CONTEXT_STATE_DIRS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the device itself warns about its settings
            cfg = load_config(dict(run_config))
        _CONTEXT_STATE_DIRS[key] = node_data(cfg, dict(node_config)).state_dir
    return _CONTEXT_STATE_DIRS[key]


def read_jsonl(path: str | os.PathLike, *, keep=None) -> list[dict]:
    """The JSON objects of a JSON-lines file (``[]`` if it does not exist).

    A line that is not JSON (a torn last line after a crash), or that ``keep(entry)`` rejects by
    raising ``KeyError`` / ``TypeError`` / ``ValueError``, is skipped with a warning naming the
    file and line; ``keep`` returning False drops the entry silently.
    """
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if keep is not None and not keep(entry):
                continue
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logging.getLogger(__name__).warning("%s line %d is not a valid entry; skipped", path, i)
            continue
        out.append(entry)
    return out
