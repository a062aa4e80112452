"""A federation in one process, without Ray or the Simulation Engine: the real apps, a direct Grid.

:class:`InProcessGrid` hands every message the ServerApp logic sends straight to the real
``ClientApp`` object (mods included, so the data-flow inventory is recorded exactly as in a
simulation or deployment) and returns its replies. Used by the empirical privacy audit
(:mod:`fedpersona.simulations.audit.experiment`) and by tests, where starting Ray per run would cost more
than the run itself. Nodes are deployment-style: each has its own ``data-dir`` and
``state-dir`` in its node config.

Durability: a batch's messages are delivered inside one group commit of the devices' stores
(:func:`fedpersona.client.store.group_commit`), in chunks of :data:`DURABLE_CHUNK`: every device's
commits of the chunk are made durable together (their ``fsync`` calls concurrent) before any of the
chunk's replies is handed to the server, so a reply still leaves only after the state it depends on
is on disk. A device whose state could not be made durable answers with an error instead.

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

from fedpersona.client.node_data import context_state_dir
from fedpersona.client.store import DeviceStore, group_commit, prepare_stores

logger = logging.getLogger(__name__)

CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
SERVER_NODE_ID = 1
#: Messages delivered per group commit (their replies are released together, after one flush).
DURABLE_CHUNK = 32


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
        self._prepared: set[int] = set()  # nodes whose state folder was prepared (key and anchor made ahead)
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
            return self._error_reply(message, f"{type(exc).__name__}: {exc}")
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        self.delivered += 1
        return reply

    def _deliver_durably(self, messages: Iterable[Message]) -> Iterable[list[Message]]:
        """The replies to ``messages``, a chunk at a time, each chunk's device state on disk before it is yielded."""
        messages = list(messages)
        for start in range(0, len(messages), DURABLE_CHUNK):
            chunk = messages[start:start + DURABLE_CHUNK]
            self._prepare(chunk)
            replies = []
            with group_commit() as group:
                for m in chunk:
                    group.tag = len(replies)
                    replies.append(self._deliver(m))
            for i, why in group.failed.items():
                logger.error("node %s: %s; its reply is an error", chunk[i].metadata.dst_node_id, why)
                replies[i] = self._error_reply(chunk[i], f"StateError: {why}")
            yield replies

    def _prepare(self, chunk: list[Message]) -> None:
        """New devices' keys and anchors, made together before their first message (their fsyncs overlap)."""
        stores = []
        for m in chunk:
            nid = int(m.metadata.dst_node_id)
            if nid in self._prepared or nid not in self._contexts:
                continue
            self._prepared.add(nid)
            c = self._contexts[nid]
            try:
                stores.append(DeviceStore(context_state_dir(c.run_id, c.node_id, c.run_config, c.node_config)))
            except Exception as exc:  # noqa: BLE001 - the node's handler meets the same error and replies with it
                logger.debug("node %s: state folder not prepared: %s: %s", nid, type(exc).__name__, exc)
        if len(stores) > 1:
            prepare_stores(stores)

    @staticmethod
    def _error_reply(message: Message, reason: str) -> Message:
        reply = Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        replies = [r for chunk in self._deliver_durably(messages) for r in chunk]
        ids = []
        for message, reply in zip(messages, replies):  # (a message's id is set when it is delivered)
            ids.append(message.metadata.message_id)
            self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         on_reply: Callable[[Message], None] | None = None) -> Iterable[Message]:
        replies = []
        for chunk in self._deliver_durably(messages):
            for reply in chunk:
                replies.append(reply)
                if on_reply is not None:
                    on_reply(reply)
        return replies
