"""A federation in one process, without Ray or the Simulation Engine: the real apps, a direct Grid.

:class:`InProcessGrid` hands every message the ServerApp logic sends straight to the real
``ClientApp`` object (mods included, so the data-flow inventory is recorded exactly as in a
simulation or deployment) and returns its replies. Used by the empirical privacy audit
(:mod:`fedpersona.simulations.audit.experiment`) and by tests, where starting Ray per run would cost more
than the run itself. Nodes are deployment-style: each has its own ``data-dir`` and
``state-dir`` in its node config.

    with InProcessGrid(client_app, nodes, run_config, run_id=7) as grid:
        run_federation(grid, cfg)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """Delivers messages to ``app(message, context)`` synchronously, one node after another."""

    def __init__(self, app, nodes: Mapping[int, dict], run_config: Mapping, *, run_id: int) -> None:
        self.app = app
        self.run_id = int(run_id)
        self._contexts = {
            int(nid): Context(run_id=self.run_id, node_id=int(nid), node_config=dict(nc), state=RecordDict(),
                              run_config=dict(run_config))
            for nid, nc in nodes.items()
        }
        self._replies: dict[str, Message] = {}
        self._saved: tuple | None = None
        self.delivered = 0

    # Messages made by the server code need the process's task identity (Flower sets it in a run).
    def __enter__(self) -> "InProcessGrid":
        self._saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, SERVER_NODE_ID, 1
        return self

    def __exit__(self, *exc) -> None:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = self._saved  # type: ignore[misc]

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run) -> None:  # the run is fixed at construction
        pass

    @property
    def run(self):
        from flwr.supercore.run import Run

        return Run.create_empty(self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._contexts)

    def _deliver(self, message: Message) -> Message:
        message.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's own grids do
        dst = message.metadata.dst_node_id
        if dst not in self._contexts:
            raise ValueError(f"No node {dst} in this in-process federation (nodes: {sorted(self._contexts)})")
        try:
            reply = self.app(message, self._contexts[dst])
        except Exception as exc:  # as the SuperNode does: an exception becomes an error reply
            logger.exception("node %s raised", dst)
            reply = Message(Error(code=CLIENT_ERROR, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        self.delivered += 1
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            reply = self._deliver(message)
            ids.append(message.metadata.message_id)
            self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         on_reply: Callable[[Message], None] | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            replies.append(self._deliver(m))
            if on_reply is not None:
                on_reply(replies[-1])
        return replies
