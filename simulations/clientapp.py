"""The ClientApp component of ``pyproject.toml``: the device's app, with simulated nodes' data prepared.

Under ``flwr run .`` on the Simulation Engine a node knows only its ``partition-id``; the mod
below writes the simulated users' data folders and manifest (:mod:`fedpersona.simulations.partitions`)
once per run before the device reads them. It also makes the run's ``run.results-dir`` and
``run.state-dir`` absolute as the ServerApp does (relative ones under the Flower run's own
folder, :mod:`fedpersona.simulations.flower_runs`). On a deployed SuperNode (node config ``data-dir``) the
device's folders come from its node config, and the app is exactly :func:`fedpersona.client.app.build_app`.
"""

from __future__ import annotations

import warnings

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpersona.client.app import build_app
from fedpersona.config import load_config
from fedpersona.simulations.flower_runs import flower_run_config
from fedpersona.simulations.partitions import ensure_partitions

_PREPARED: set[int] = set()


def run_folders(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The run's folders as the ServerApp resolves them (:mod:`fedpersona.simulations.flower_runs`): relative ones under the
    Flower run's own folder. Flower refuses a changed ``run_config`` in its own context, so the mods and
    handlers after this one get a context of their own (the same state object)."""
    flat = flower_run_config(context.run_config, context.run_id)
    if flat != dict(context.run_config):
        context = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                          state=context.state, run_config=flat)
    return call_next(message, context)


def prepare_simulated_node(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if "data-dir" not in context.node_config and "partition-id" in context.node_config \
            and context.run_id not in _PREPARED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the device itself warns about its settings
            cfg = load_config(context.run_config)
        ensure_partitions(cfg)
        _PREPARED.add(context.run_id)
    return call_next(message, context)


app = build_app(mods=[prepare_simulated_node], outer=[run_folders])
