"""Checks on the data-flow inventory: nothing personal, no token ids, no text ever left a device.

The devices record every reply they send (:mod:`fedpersona.client.flow_log`), the server what it saw
(:mod:`fedpersona.server.flow_log`). :func:`verify_inventory` checks a device's lines against these rules,
row by row:

1. **No personal-head tensor**: no array whose name contains ``.personal.`` or is a name of the
   device's personal state, and no array whose digest equals a digest of the device's personal
   tensors (catches a renamed head).
2. **No token ids**: every array is a float tensor, except the secure-aggregation arrays
   of a ``secagg`` record: masked vectors (``uint8``, b-bit packed, or ``uint64``), uniformly
   random without the masks, and ``uint64`` protocol ids (share holders, owners of the shares), listed in the report.
3. **No text**: string config entries only where the protocol defines them (``status.status``,
   ``status.detail``: a device declining under plain aggregation; no user label: the final
   evaluation sends only sums), bytes only inside ``secagg`` records (encrypted secret shares) and
   as the freshness receipt (``freshness.receipt``: the device's newest commit, encrypted under its
   own key, :mod:`fedpersona.receipts`), no string arrays.
4. With ``shared_names``: every unmasked array is a shared-adapter tensor.
5. **No user profile**: no row (and no error reason) that the device found to carry its user profile
   (:mod:`fedpersona.client.profile`; the device scans every reply for it, since only it knows the profile).
6. **One unmask per round**: a device answered at most one ``query.unmask`` request (with content)
   per run and round; a second answer hands the server more shares of the same masks (with another
   claimed dropout set, a survivor's self-mask and its pair seeds: its update).
7. **One survivor set per round**: across all the devices checked together, every consistency and
   unmask request of a run and round digest showed the same survivor set (the lines' ``shown``);
   two sets are a server splitting the devices' views (each device refuses to reveal for a set it
   did not sign, but the attempt is reported).

:func:`check_completeness` compares the devices' lines with the server's: a reply the server
received but no device recorded is an unrecorded data flow.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from fedpersona.receipts import RECEIPT as _RECEIPT
from fedpersona.receipts import RECORD as _RECEIPT_RECORD

__all__ = ["ALLOWED_TEXT", "InventoryCheck", "verify_inventory", "check_completeness", "summarize_inventory",
           "personal_digests", "is_masked", "is_protocol_array"]

#: (record, name) of the string fields the protocol sends.
ALLOWED_TEXT = frozenset({("status", "status"), ("status", "detail")})
#: (record, name) of the bytes fields outside secure aggregation: the freshness receipt (encrypted, opaque).
ALLOWED_BYTES = frozenset({(_RECEIPT_RECORD, _RECEIPT)})
UNMASK_TYPE = "query.unmask"
_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}
_REQUIRED = {"array": ("record", "name", "shape", "dtype", "bytes"), "config": ("record", "name", "type"),
             "metric": ("record", "name")}


@dataclass
class InventoryCheck:
    ok: bool
    devices: int
    messages: int
    rows: int
    violations: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_secagg(record: str) -> bool:
    return "secagg" in record.lower()


def is_masked(record: str, name: str, dtype: str) -> bool:
    """A masked vector (uniformly random to whoever lacks the masks): a ``uint8`` (b-bit packed) or
    ``uint64`` array named like ``mask`` in a record named like ``secagg``."""
    return _is_secagg(record) and "mask" in name.lower() and dtype in ("uint8", "uint64")


def is_protocol_array(record: str, name: str, dtype: str) -> bool:
    """Any array of the secure-aggregation protocol: a masked vector, or ``uint64`` ids in a ``secagg`` record."""
    return (_is_secagg(record) and dtype == "uint64") or is_masked(record, name, dtype)


def _row_violations(row: dict, personal: set[str], digests: set[str], shared: set[str] | None) -> list[str]:
    kind = row.get("kind")
    if kind not in _REQUIRED:
        return [f"unknown row kind {kind!r}"]
    missing = [k for k in _REQUIRED[kind] if k not in row]
    if missing:
        return [f"malformed {kind} row: missing {missing}"]
    record, name = str(row["record"]), str(row["name"])
    out = []
    if row.get("profile"):
        out.append(f"the user profile left the device in {kind} {record}/{name}")
    if kind == "array":
        dtype = str(row["dtype"])
        masked = is_masked(record, name, dtype)
        secagg = is_protocol_array(record, name, dtype)
        if bool(row.get("masked", False)) != masked:
            out.append(f"array {record}/{name}: 'masked'={row.get('masked')!r} disagrees with record/name/dtype ({dtype})")
        if ".personal." in name or name in personal:
            out.append(f"personal-head tensor {record}/{name} left the device")
        if row.get("sha256") and row["sha256"] in digests:
            out.append(f"array {record}/{name} has the digest of a personal-head tensor")
        if not secagg:
            if dtype.startswith(("int", "uint")):
                out.append(f"integer array {record}/{name} ({dtype}) left the device unmasked: token ids?")
            elif dtype not in _FLOAT_DTYPES:
                out.append(f"non-float array {record}/{name} ({dtype}) left the device: text or tokens?")
            elif shared is not None and name not in shared:
                out.append(f"array {record}/{name} is not a shared-adapter tensor")
    elif kind == "config":
        typ = str(row["type"])
        if "str" in typ and (record, name) not in ALLOWED_TEXT:
            out.append(f"text field {record}/{name} ({typ}) left the device")
        if "bytes" in typ and not _is_secagg(record) and (record, name) not in ALLOWED_BYTES:
            out.append(f"bytes field {record}/{name} outside secure aggregation left the device")
    elif kind == "metric":
        if ".personal." in name or name in personal:
            out.append(f"metric named like a personal tensor: {record}/{name}")
    return out


def verify_inventory(
    inventories: Mapping[str, Iterable[dict]],
    *,
    personal_names: Mapping[str, Iterable[str]] | Iterable[str] = (),
    personal_digests: Mapping[str, Iterable[str]] | None = None,
    shared_names: Iterable[str] | None = None,
) -> InventoryCheck:
    """Check every line of every device's inventory (``{device: lines}``); ``ok`` iff no violation.

    ``personal_names`` / ``personal_digests``: one collection for every device, or a mapping per device.
    """

    def per_device(value, device) -> set[str]:
        if value is None:
            return set()
        if isinstance(value, Mapping):
            return set(value.get(device, ()))
        return set(value)

    shared = set(shared_names) if shared_names is not None else None
    violations, messages, rows = [], 0, 0
    shown_sets: dict[tuple, dict[str, tuple]] = {}  # (run, round digest) -> survivor-set digest -> first (device, line)
    for device, lines in inventories.items():
        personal = per_device(personal_names, device)
        digests = per_device(personal_digests, device)
        answered: dict[tuple, int] = {}
        for i, line in enumerate(lines):
            messages += 1
            where = {"device": device, "line": i + 1, "round": line.get("round"), "message_type": line.get("message_type")}
            if line.get("reply") not in ("content", "error") or not isinstance(line.get("rows"), list):
                violations.append({**where, "problem": "malformed inventory line (no reply kind or rows)"})
                continue
            if line.get("error_profile"):
                violations.append({**where, "problem": "the user profile left the device in an error reason"})
            shown = line.get("shown")
            if isinstance(shown, dict) and shown.get("round_digest") and shown.get("survivors"):
                sets = shown_sets.setdefault((line.get("run_id"), shown["round_digest"]), {})
                if shown["survivors"] not in sets and sets:
                    first_device, first_line = next(iter(sets.values()))
                    violations.append({**where, "problem": f"two survivor sets shown for one round: run "
                                       f"{line.get('run_id')} round {line.get('round')} (digest "
                                       f"{shown['round_digest'][:16]}): this request showed {shown.get('count')} "
                                       f"survivors, unlike device {first_device}'s line {first_line}"})
                sets.setdefault(shown["survivors"], (device, i + 1))
            if line.get("message_type") == UNMASK_TYPE and line.get("reply") == "content":
                key = (line.get("run_id"), line.get("round"), line.get("group_id"))
                answered[key] = answered.get(key, 0) + 1
                if answered[key] > 1:
                    violations.append({**where, "problem": f"repeated unmask: answer {answered[key]} to an unmask "
                                                           f"request of run {key[0]} round {key[1]}"})
            for row in line["rows"]:
                rows += 1
                for problem in _row_violations(row, personal, digests, shared):
                    violations.append({**where, "problem": problem})
    return InventoryCheck(ok=not violations, devices=len(inventories), messages=messages, rows=rows, violations=violations)


def personal_digests(tensors: Mapping) -> set[str]:
    """Digests of tensors as :func:`fedpersona.wire.inventory` computes them (16 hex of SHA-256)."""
    import hashlib

    import numpy as np

    out = set()
    for t in tensors.values():
        arr = np.ascontiguousarray(t.detach().cpu().numpy())
        out.add(hashlib.sha256(arr.tobytes()).hexdigest()[:16])
    return out


def check_completeness(inventories: Mapping[str, Iterable[dict]], server_lines: Iterable[dict]) -> dict:
    """Per round: train replies the server received vs lines the devices recorded.

    ``complete`` is false if the server received more replies in a round (or the final
    evaluation) than the devices recorded: some data left a device unrecorded.
    """
    recorded: Counter = Counter()
    for lines in inventories.values():
        for line in lines:
            stage = "evaluate" if str(line.get("message_type", "")).startswith("evaluate") else "train"
            if stage == "train" and not str(line.get("message_type", "")).startswith("train"):
                continue  # other exchanges (secure aggregation) are listed, not counted here
            recorded[(stage, line.get("round"))] += 1
    rows, complete = [], True
    for e in server_lines:
        stage = e.get("stage", "train")
        if stage == "train":
            received = int(e.get("contributors", 0)) + int(e.get("declined", 0)) + int(e.get("error_replies", 0))
        else:
            received = int(e.get("replies", 0)) + int(e.get("error_replies", 0))
        got = recorded.get((stage, e.get("round")), 0)
        ok = got >= received
        complete &= ok
        rows.append({"stage": stage, "round": e.get("round"), "server_received": received, "devices_recorded": got, "ok": ok})
    return {"complete": complete, "rounds": rows}


def summarize_inventory(inventories: Mapping[str, Iterable[dict]]) -> dict:
    """Totals per device and per message type: messages, bytes, arrays (masked or not), dtypes, names."""
    per_device, per_type = {}, defaultdict(lambda: {"messages": 0, "bytes": 0})
    names: dict[str, dict] = {}
    for device, lines in inventories.items():
        lines = list(lines)
        d = {"messages": len(lines), "bytes": 0, "arrays": 0, "masked_arrays": 0, "protocol_arrays": 0, "errors": 0,
             "rounds": sorted({ln.get("round") for ln in lines if ln.get("round") is not None}),
             "types": dict(Counter(ln.get("message_type") for ln in lines))}
        for line in lines:
            d["bytes"] += int(line.get("bytes", 0))
            d["errors"] += line.get("reply") == "error"
            t = per_type[str(line.get("message_type"))]
            t["messages"] += 1
            t["bytes"] += int(line.get("bytes", 0))
            for row in line.get("rows", []):
                key = f"{row.get('kind')}:{row.get('record')}/{row.get('name')}"
                if row.get("kind") == "array":
                    d["arrays"] += 1
                    d["masked_arrays"] += bool(row.get("masked"))
                    d["protocol_arrays"] += bool(row.get("protocol"))
                info = names.setdefault(key, {"kind": row.get("kind"), "record": row.get("record"), "name": row.get("name"),
                                              "dtype": row.get("dtype") or row.get("type"), "shape": row.get("shape"),
                                              "masked": bool(row.get("masked", False)),
                                              "protocol": bool(row.get("protocol", False)), "count": 0})
                info["count"] += 1
        per_device[device] = d
    return {"devices": per_device, "message_types": dict(per_type), "fields": sorted(names.values(), key=lambda x: (x["kind"], x["record"], x["name"]))}
