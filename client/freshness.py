"""The ClientApp mod that makes each message one commit of the device's store, checked for freshness.

:func:`freshness_mod` wraps every handler (train, key advertisement, unmask, evaluate):

1. it takes the server's copy of the device's freshness receipt (``freshness`` record,
   :mod:`fedpersona.receipts`) out of the request, so the handler never sees it;
2. it opens a transaction on the device's store (:meth:`fedpersona.client.store.DeviceStore.transaction`),
   which checks the state against its local anchor, and checks the receipt
   (:meth:`~fedpersona.client.store.DeviceStore.check_receipt`). A state older than either (a restored copy
   of the folder) is refused before the handler runs: the reply is an error with a fixed text
   (:attr:`fedpersona.client.store.RollbackDetected.public_reason`), nothing is trained, nothing unmasked;
3. it runs the handler: every save it makes (received adapter, ledgers, head, participation
   record, reveal log, evaluation row...) is gathered into the transaction, and committed in one
   record (two fsyncs) when the handler returns, *before* the reply leaves the device. A handler
   that raises commits nothing;
4. it attaches the receipt of the new commit to the reply (replies with content only), for the
   server to keep and send back (:class:`fedpersona.server.freshness.FreshnessGrid`).

Registered innermost (:func:`fedpersona.client.app.build_app`): the inventory and failure mods outside it see
the reply as it leaves, receipt included.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpersona.client.node_data import context_state_dir
from fedpersona.client.store import DeviceStore, RollbackDetected, StateError
from fedpersona.receipts import put_receipt, take_receipt

__all__ = ["STATE_FAILED", "freshness_mod"]

logger = logging.getLogger(__name__)

CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
#: The error reply's text when the device's state could not be read or committed (not a rollback).
STATE_FAILED = ("the device could not use its state for this {kind} request; nothing was sent; the details are in "
                "the device's own log")


def _refusal(message: Message, exc: StateError) -> Message:
    kind = message.metadata.message_type
    public = exc.public_reason if isinstance(exc, RollbackDetected) else STATE_FAILED.format(kind=kind)
    logger.error("node %s: %s request refused: %s: %s", message.metadata.dst_node_id, kind, type(exc).__name__, exc)
    return Message(Error(code=CLIENT_ERROR, reason=f"{type(exc).__name__}: {public}"), reply_to=message)


def freshness_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: one store transaction per message, the state checked against its anchor and receipt."""
    receipt = take_receipt(message.content) if message.has_content() else None
    try:
        state_dir = context_state_dir(context.run_id, context.node_id, context.run_config, context.node_config)
    except (ValueError, KeyError, OSError) as exc:  # no state folder to speak of: the handler reports why
        logger.debug("node %s: no state folder for this message (%s)", context.node_id, exc)
        return call_next(message, context)
    store = DeviceStore(state_dir)
    try:
        with store.transaction():
            if receipt is not None:
                store.check_receipt(receipt)
            reply = call_next(message, context)
    except StateError as exc:  # refused before the handler ran (unreadable, rolled back), or its commit failed:
        # nothing left the device (a handler's own StateError becomes its own error reply)
        return _refusal(message, exc)
    if reply.has_content():
        try:
            mine = store.receipt()
        except StateError as exc:  # the reply's state is committed; only its receipt is missing
            logger.warning("node %s: no freshness receipt attached: %s", context.node_id, exc)
            mine = None
        if mine is not None:
            put_receipt(reply.content, mine)
    return reply
