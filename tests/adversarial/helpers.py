"""A dishonest server's tools: the real ServerApp loop and the real ClientApp, a run config of its choosing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.client.flow_log import read_inventory
from fedpersona.config import load_config
from fedpersona.identity import provision
from tests.privacy.audit_helpers import one_thread

#: What each user wrote: a test finds it in no reply.
SECRET = "my diagnosis is SECRET-7731"
LINES = ["Nay, answer me: stand, and unfold yourself.", "Long live the king!", "Not a mouse stirring.",
         f"{SECRET}, tell no one.", "For this relief much thanks.", "Well, good night."]


def user_folders(root: Path, names=("alice", "bob", "carol")) -> dict[int, dict]:
    """Deployment-style node configs (own data and state folders) for nodes 21, 22, ..."""
    nodes = {}
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = [json.dumps({"cue": f"Who's there? {j}", "reply": r}) for j, r in enumerate(LINES * 2)]
        (folder / "lines.jsonl").write_text("\n".join(rows) + "\n")
        nodes[21 + i] = {"data-dir": str(folder), "state-dir": str(root / f"{name}-state"), "user-id": name}
    provision_nodes(nodes, root)
    return nodes


def provision_nodes(nodes: dict[int, dict], root: Path) -> None:
    """Give deployment-style nodes their identities under a root of the operator's (``root/identity-root.key``),
    as `fedpersona certs` does: the server of these tests never holds the root's private key."""
    provision([nc["state-dir"] for nc in nodes.values()], Path(root) / "identity-root.key")


def flat_config(tiny_config: dict, **over) -> dict:
    flat = dict(tiny_config, **{"data.max-examples": 12, "privacy.delta": 1e-2, "server.clients-per-round": 3,
                                "server.min-clients": 2, "server.num-rounds": 1, "eval.final": False,
                                "eval.local-baseline": False, "privacy.noise-multiplier": 1.0, "run.name": "adv"})
    flat.update(over)
    return flat


def run(flat: dict, nodes: dict[int, dict], *, run_id: int = 9090) -> dict:
    """One federation through the real ServerApp loop (fedpersona.server.federation) and ClientApp (mods included)."""
    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.inprocess import InProcessGrid

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        with InProcessGrid(client_app.app, nodes, flat, run_id=run_id) as grid, one_thread():
            return run_federation(grid, cfg)
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()


def replies(nodes: dict[int, dict], message_type: str = "train") -> dict[int, list[dict]]:
    """Each device's own record (its inventory) of the replies it sent of this type."""
    return {nid: [ln for ln in read_inventory(nc["state-dir"]) if ln["message_type"] == message_type]
            for nid, nc in nodes.items()}
