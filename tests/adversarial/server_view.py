"""The dishonest server's view: a federation whose devices get a run config of the server's choosing, and
every error reply exactly as the server receives it."""

from __future__ import annotations

import uuid
import warnings

import fedpersona.client.app as client_app
import fedpersona.client.flow_log as client_inventory
from fedpersona.config import load_config
from tests.privacy.audit_helpers import one_thread


def federation(server_flat: dict, device_flat: dict, nodes: dict[int, dict]) -> tuple[dict, dict[int, list[str]]]:
    """The real ServerApp loop with ``server_flat`` over the real ClientApp, every device receiving
    ``device_flat`` as its run config. Returns the run's metrics and, per node, the reasons of its error
    replies (``"<message type>: <reason>"``) as the server received them."""
    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.inprocess import InProcessGrid

    errors: dict[int, list[str]] = {nid: [] for nid in nodes}

    class Watched(InProcessGrid):
        def _deliver(self, message):
            reply = super()._deliver(message)
            if reply.has_error():
                errors[message.metadata.dst_node_id].append(f"{message.metadata.message_type}: {reply.error.reason}")
            return reply

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(server_flat, env=False)
    client_app._DEVICES.clear()
    client_inventory._STATE_DIRS.clear()
    try:
        with Watched(client_app.app, nodes, device_flat, run_id=uuid.uuid4().int % 2**62) as grid, one_thread():
            return run_federation(grid, cfg), errors
    finally:
        client_app._DEVICES.clear()
        client_inventory._STATE_DIRS.clear()
