"""Issue 20, hole 7 (the reply): an unexpected exception's error reply carries the fixed text, never its message.

On main (cb416a4) each handler answered only some exception classes with the fixed text; any other
(the tokenizer's TypeError on a lone surrogate, say) left the handler, and the reply the server received
carried the raw exception text, which can quote the user's data. Here the dishonest server runs the real
federation and reads every error reply, while one device fails in each message type with an exception
class no handler names, its message holding the user's secret.
"""

from __future__ import annotations

import pytest

import fedpersona.client.app
import fedpersona.client.device
import fedpersona.client.secagg
from tests.adversarial.helpers import SECRET, flat_config, user_folders
from tests.adversarial.server_view import federation

VICTIM = 21


class Unforeseen(Exception):
    """An exception class no handler of main's ClientApp named."""


def _raise_for_the_victim(real, node_of):
    def wrapped(*args, **kwargs):
        if node_of(*args, **kwargs) == VICTIM:
            raise Unforeseen(f"failed while reading {SECRET!r} of alice")
        return real(*args, **kwargs)

    return wrapped


def _device_node(device, *args, **kwargs) -> int:
    return VICTIM if device.user_id == "alice" else 0


@pytest.mark.parametrize("kind", ["query.advertise", "train", "query.unmask", "evaluate"])
def test_an_unexpected_exception_gives_the_fixed_text(tiny_config, tmp_path, monkeypatch, kind):
    nodes = user_folders(tmp_path, names=("alice", "bob", "carol", "dave"))
    if kind == "query.advertise":
        monkeypatch.setattr(fedpersona.client.secagg, "advertise",
                            _raise_for_the_victim(fedpersona.client.secagg.advertise, lambda store, cfg, nid, *a, **k: nid))
    elif kind == "query.unmask":
        monkeypatch.setattr(fedpersona.client.secagg, "unmask",
                            _raise_for_the_victim(fedpersona.client.secagg.unmask, lambda store, cfg, nid, *a, **k: nid))
    elif kind == "train":
        monkeypatch.setattr(fedpersona.client.device.Device, "train_round",
                            _raise_for_the_victim(fedpersona.client.device.Device.train_round, _device_node))
    else:
        monkeypatch.setattr(fedpersona.client.device.Device, "final_evaluation",
                            _raise_for_the_victim(fedpersona.client.device.Device.final_evaluation, _device_node))
    flat = flat_config(tiny_config, **{"server.clients-per-round": 4, "eval.final": kind == "evaluate"})
    _, errors = federation(flat, flat, nodes)
    mine = [e for e in errors[VICTIM] if e.startswith(f"{kind}: ")]
    assert mine, f"the device did not fail its {kind} request: {errors}"
    for line in mine:
        reason = line[len(kind) + 2:]
        assert SECRET not in reason and "alice" not in reason, reason
        assert reason == f"Unforeseen: {fedpersona.client.app.ERROR_TEXT.format(kind=kind)}", reason
