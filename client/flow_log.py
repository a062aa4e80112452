"""Data-flow inventory: one JSON line per reply this device sends, in its own state folder.

Registered as the *outermost* ClientApp mod (``ClientApp(mods=[inventory_mod, ...])``), so it
sees every reply exactly as it leaves the device, whatever the handler or the mods inside it
(secure aggregation) did. For each reply it appends to ``<state_dir>/inventory.jsonl``::

    {"v": 1, "time": ..., "run_id": ..., "node_id": ..., "round": 3, "group_id": "3",
     "message_type": "train", "reply": "content" | "error", "bytes": 12345,
     "rows": [{"record", "kind", "name", "shape", "dtype", "bytes", "sha256", "masked", "protocol"}, ...]}

``rows`` are :func:`fedpersona.wire.inventory` rows (names, shapes, dtypes, sizes and a digest,
never values), plus, for arrays, ``masked`` (a secure-aggregation masked vector: a ``uint8``
(b-bit packed) array named like ``masked`` in a record whose name contains ``secagg``) and
``protocol`` (a ``uint64`` array of that record: share-holder and owner ids), and ``type`` for config and metric
entries (``str``, ``bytes``, ``int`` ...). An error reply records its code and reason. The device also
scans each reply for its user profile (:mod:`fedpersona.client.profile`: the whole text and each sentence, in
every string, bytes value and array's raw bytes, and in an error's reason): the line gets
``"profile_checked": true`` when the device had a profile, and a row that carries it ``"profile": true``
(an error reason that does: ``"error_profile": true``). For a ``query.consistency`` or
``query.unmask`` request the line also records what the device was *shown*: ``"shown":
{"round_digest": <hex>, "survivors": <16 hex of SHA-256 of the sorted survivor ids>, "count": n}``
(answered or refused), so that the audit can tell when the server showed two devices (or one
device twice) different survivor sets for the same round. The check that nothing personal left
the device, and that, is :func:`fedpersona.privacy.audit.inventory.verify_inventory`.

On by default; the cost is one SHA-256 pass over the reply's arrays and one appended line.
``FEDPERSONA_INVENTORY=off`` turns it off (with a warning): the audit then reports the device
as unrecorded.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedpersona.client.node_data import _CONTEXT_STATE_DIRS as _STATE_DIRS  # noqa: F401 - the lookup's cache (tests clear it)
from fedpersona.client.node_data import context_state_dir, read_jsonl
from fedpersona.wire import group_round, inventory
from fedpersona.privacy.audit.inventory import is_masked, is_protocol_array

logger = logging.getLogger(__name__)

INVENTORY_FILE = "inventory.jsonl"
INVENTORY_ENV = "FEDPERSONA_INVENTORY"
VERSION = 1



def _value_type(value) -> str:
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value}) or ["empty"]
        return f"list[{'|'.join(inner)}]"
    return type(value).__name__


def _value_bytes(value) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def describe(content: RecordDict) -> list[dict]:
    """The inventory rows of a message's content, with ``masked`` (arrays) and ``type`` (configs)."""
    rows = inventory(content)
    configs, metrics = content.config_records, content.metric_records  # each a view built per access: once
    for row in rows:
        if row["kind"] == "array":
            row["masked"] = is_masked(row["record"], row["name"], row["dtype"])
            row["protocol"] = is_protocol_array(row["record"], row["name"], row["dtype"]) and not row["masked"]
        elif row["kind"] == "config":
            value = configs[row["record"]][row["name"]]
            row["type"] = _value_type(value)
            row["bytes"] = _value_bytes(value)
        elif row["kind"] == "metric":
            value = metrics[row["record"]][row["name"]]
            row["type"] = _value_type(value)
            if isinstance(value, list):
                row["bytes"] = 8 * len(value)
    return rows


def _contains(value, needles: list[str], raw: list[bytes]) -> bool:
    if isinstance(value, str):
        return any(n in value for n in needles)
    if isinstance(value, (bytes, bytearray)):
        return any(b in value for b in raw)
    if isinstance(value, list):
        return any(_contains(v, needles, raw) for v in value)
    return False


def mark_profile(reply: Message, entry: dict, needles: list[str]) -> dict:
    """Flag the rows of ``entry`` (the line of ``reply``) whose value carries the user profile."""
    entry["profile_checked"] = bool(needles)
    if not needles:
        return entry
    raw = [n.encode("utf-8") for n in needles]
    if reply.has_error():
        entry["error_profile"] = _contains(str(reply.error.reason), needles, raw)
        return entry
    if not reply.has_content():
        return entry
    content = reply.content
    for row in entry["rows"]:
        if row["kind"] == "array":
            data = content.array_records[row["record"]][row["name"]].data
            row["profile"] = any(b in data for b in raw)
        elif row["kind"] == "config":
            row["profile"] = _contains(content.config_records[row["record"]][row["name"]], needles, raw)
    return entry


#: state folder -> (the profile blob's tag, its needles): the profile is decrypted again only when it changed.
_NEEDLES: dict[str, tuple[str, list[str]]] = {}


def _profile_needles(state_dir: Path) -> list[str]:
    from fedpersona.client.profile import PROFILE, load_profile, profile_needles
    from fedpersona.client.store import DeviceStore

    store = DeviceStore(state_dir)
    tag = store.tag(PROFILE)
    hit = _NEEDLES.get(str(state_dir))
    if tag is not None and hit is not None and hit[0] == tag:
        return list(hit[1])
    needles = profile_needles(load_profile(store))
    if tag is not None:
        if len(_NEEDLES) >= 4096:
            _NEEDLES.clear()
        _NEEDLES[str(state_dir)] = (tag, list(needles))
    return needles


#: Requests whose survivor set the inventory records (the consistency check and the unmask stage).
SHOWN_TYPES = ("query.consistency", "query.unmask")


def shown_survivors(message: Message) -> dict | None:
    """The round digest and a digest of the survivor set a consistency / unmask request showed (None otherwise)."""
    if message.metadata.message_type not in SHOWN_TYPES or not message.has_content():
        return None
    import hashlib

    import numpy as np

    from fedpersona.secagg_wire import from_records
    from fedpersona.privacy.secagg.spec import request_digest

    try:
        request = from_records(message.content)
        survivors = sorted(int(x) for x in np.asarray(request["survivors"]).ravel())
        digest = request_digest(request)
    except Exception:  # a malformed request: nothing to compare (the handler refuses it)
        return None
    ids = b"".join(x.to_bytes(8, "big") for x in survivors)
    return {"round_digest": digest.hex(), "survivors": hashlib.sha256(ids).hexdigest()[:16], "count": len(survivors)}


def entry_for(reply: Message, *, run_id: int, node_id: int) -> dict:
    """The inventory line of one outgoing reply."""
    md = reply.metadata
    group = md.group_id
    entry = {
        "v": VERSION,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "run_id": int(run_id),
        "node_id": int(node_id),
        "group_id": group,
        "round": group_round(group),
        "message_type": md.message_type,
    }
    if reply.has_error():
        entry.update(reply="error", error={"code": int(reply.error.code), "reason": str(reply.error.reason)},
                     rows=[], bytes=len(str(reply.error.reason)))
    else:
        rows = describe(reply.content) if reply.has_content() else []
        entry.update(reply="content", rows=rows, bytes=sum(int(r.get("bytes", 0)) for r in rows))
    return entry


def append_entry(state_dir: Path, entry: dict) -> Path:
    """Append one line (a single ``write`` on an ``O_APPEND`` file: lines never interleave)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / INVENTORY_FILE
    line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


def read_inventory(state_dir: str | os.PathLike) -> list[dict]:
    """Every line of a device's inventory (``[]`` if it has none); a torn last line is skipped."""
    return read_jsonl(Path(state_dir) / INVENTORY_FILE)


def _state_dir(context: Context) -> Path:
    return context_state_dir(context.run_id, context.node_id, context.run_config, context.node_config)


def inventory_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: run the handler, then record what its reply carries."""
    reply = call_next(message, context)
    if os.environ.get(INVENTORY_ENV, "on").lower() in ("off", "0", "false"):
        warnings.warn(f"${INVENTORY_ENV} is off: this device's replies are not inventoried", stacklevel=2)
        return reply
    try:
        state_dir = _state_dir(context)
        entry = entry_for(reply, run_id=context.run_id, node_id=context.node_id)
        shown = shown_survivors(message)
        if shown is not None:
            entry["shown"] = shown
        try:
            needles = _profile_needles(state_dir)
        except Exception as exc:  # an unreadable store: the line says the profile was not checked
            logger.warning("node %s: profile not checked (%s: %s)", context.node_id, type(exc).__name__, exc)
            needles = []
        append_entry(state_dir, mark_profile(reply, entry, needles))
    except Exception as exc:  # the inventory must never break a reply; the audit sees the gap
        logger.error("node %s: could not record the data-flow inventory: %s: %s",
                     context.node_id, type(exc).__name__, exc)
    return reply
