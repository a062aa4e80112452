"""Patches of Flower 1.41's waiting in the deployment engine: shorter object-pull backoff, shorter SuperNode poll.

Object pulls (SuperNode and ServerApp processes).

Flower 1.41 hands out a message as soon as its metadata is stored, while the sender may still be
uploading the message's objects (arrays, records). The receiver's ``pull_objects`` then finds an
object not yet available and retries after 1 s, doubling up to 10 s
(``flwr.supercore.constant.PULL_INITIAL_BACKOFF`` / ``PULL_BACKOFF_CAP``, bound as default arguments).
On loopback or a LAN the upload takes milliseconds, so the first retry alone adds ~1-2 s to every
message: three times a round under secure aggregation, on the device and on the server.

:func:`shorten_pull_backoff` rebinds ``pull_objects`` in one Flower module (the SuperNode's
``flwr.supernode.start_client_internal``, the ServerApp's ``flwr.superlink.grid.http_grid``), or
``pull_and_inflate_object_from_tree`` in ``flwr.supernode.runtime.run_clientapp`` (the warm worker
pulling a message from its SuperNode), to the same function with a 0.05 s initial backoff capped
at 0.5 s. Only the waiting changes: the same
retries, the same time limit, the same errors. If the module has no such function (another Flower
layout), it returns False and nothing changes.

:func:`flower_supernode_with_poll` (``python -m fedpersona.flower_patches flower-supernode-poll
SECONDS ARGS``) runs ``flower-supernode`` with its idle poll capped at SECONDS.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import warnings
from types import ModuleType

logger = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.05
BACKOFF_CAP = 0.5


def shorten_pull_backoff(module: ModuleType, name: str = "pull_objects", *, initial: float = INITIAL_BACKOFF,
                         cap: float = BACKOFF_CAP) -> bool:
    """Make ``module.<name>`` (a Flower object-pull function taking ``initial_backoff`` and ``backoff_cap``)
    retry after ``initial`` s, doubling, at most ``cap`` s. Idempotent."""
    if not 0 < initial <= cap:
        raise ValueError(f"need 0 < initial <= cap. You passed: initial={initial!r}, cap={cap!r}")
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        return False
    base = getattr(fn, "_fedpersona_original", fn)
    try:
        params = inspect.signature(base).parameters
    except (TypeError, ValueError):
        return False
    if "initial_backoff" not in params or "backoff_cap" not in params:
        return False
    fast = functools.partial(base, initial_backoff=initial, backoff_cap=cap)
    fast._fedpersona_original = base  # type: ignore[attr-defined]
    setattr(module, name, fast)
    logger.debug("%s.%s: backoff %.2f-%.2f s", module.__name__, name, initial, cap)
    return True


# ------------------------------------------------------------------------- SuperNode polling interval
def flower_supernode_with_poll(poll_interval: float, argv: list[str]) -> None:
    """Run ``flower-supernode`` (``argv`` = its arguments) with a shorter idle poll than Flower's 3 s.

    Flower 1.41's SuperNode sleeps 3 s after every pull that brought no message, and 0.5 s between
    checks for the ClientApp's reply: up to 3.5 s added to every message stage, three stages a round
    under secure aggregation. This caps those sleeps at ``poll_interval`` by giving
    ``flwr.supernode.start_client_internal`` a ``time`` module whose ``sleep`` is capped; if the
    installed Flower is laid out differently, it warns and runs unchanged. Each SuperNode then asks the
    SuperLink for messages every ``poll_interval`` seconds when idle, instead of every 3 s. It also
    shortens the SuperNode's object-pull backoff (:mod:`fedpersona.flower_patches`).
    """
    import flwr.supernode.start_client_internal as sci  # Flower is loaded by the process this runs in

    if isinstance(getattr(sci, "time", None), types.ModuleType) and sci.time.__name__ == "time":
        real = sci.time
        capped = types.ModuleType("time")
        capped.__dict__.update(real.__dict__)
        capped.sleep = lambda seconds: real.sleep(min(seconds, poll_interval))
        sci.time = capped
    else:
        warnings.warn("this Flower's SuperNode has no module-level `time`; its poll interval stays at 3 s", stacklevel=2)
    if not shorten_pull_backoff(sci):
        warnings.warn("this Flower's SuperNode has no `pull_objects(initial_backoff=...)`; object pulls keep "
                      "Flower's 1-10 s backoff", stacklevel=2)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "flower-supernode-poll":
        flower_supernode_with_poll(float(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit("usage: python -m fedpersona.flower_patches flower-supernode-poll SECONDS [flower-supernode args]")
