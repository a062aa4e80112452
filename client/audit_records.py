"""What a device's state folder holds for the privacy audit, as :class:`fedpersona.privacy.audit.report.DeviceRecords`.

Read-only: the privacy ledger (the same encrypted file the device composes; read with the
device's key) and its other ledgers (a DP head's, the local-only baseline's), the run config the
device recorded with its last round (so that a device audited alone is described by its own
settings, never by a default), the names and digests of the personal head (never its values), the
inventory of every reply the device sent (:mod:`fedpersona.client.flow_log`), and the freshness events of
its store (:func:`fedpersona.client.store.read_freshness_events`: a restored older copy detected, an anchor
re-created), reported in ``errors`` as lines starting with ``freshness:``. A part that cannot be
read is reported in ``errors``, not raised: the audit says what it could not check.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpersona.client.device import BASELINE_HEAD_LEDGER, BASELINE_LEDGER, HEAD_FILE, HEAD_LEDGER, LEDGER, RECEIVED_CONFIG
from fedpersona.client.flow_log import INVENTORY_FILE, read_inventory
from fedpersona.client.store import JOURNALS, DeviceStore, read_freshness_events
from fedpersona.privacy.audit.inventory import personal_digests
from fedpersona.privacy.audit.report import DeviceRecords, device_summary
from fedpersona.privacy.ledger import PrivacyLedger

__all__ = ["freshness_errors", "is_device_dir", "read_device", "read_device_records"]


def is_device_dir(p: Path) -> bool:
    """A device state folder (not a data folder or a hidden one)."""
    return p.is_dir() and not p.name.startswith(("_", ".")) and any(
        (p / f).exists() for f in ("device.key", *JOURNALS, INVENTORY_FILE, "ledger.enc", "_manifest.enc"))


def freshness_errors(state_dir: str | Path) -> list[str]:
    """The store's freshness events as audit error lines (``freshness: ...``)."""
    out = []
    for e in read_freshness_events(state_dir):
        when = e.get("time", "?")
        if e.get("event") == "rollback-detected":
            out.append(f"freshness: rollback detected ({when}): the state held generation {e.get('generation')} but "
                       f"the {'server-kept receipt' if e.get('source') == 'receipt' else 'local anchor'} showed "
                       f"generation {e.get('anchored')}; the device refuses to train or unmask from it")
        elif e.get("event") == "anchor-missing":
            out.append(f"freshness: the local anchor was missing or unreadable ({when}) at generation "
                       f"{e.get('generation')}: a restored older copy before then is caught only by the server's receipt")
        elif e.get("event") == "anchor-recreated":
            out.append(f"freshness: the local anchor was re-created ({when}) at generation {e.get('generation')}")
    return out


def read_device_records(state_dir: str | Path, *, label: str | None = None) -> DeviceRecords:
    state_dir = Path(state_dir)
    rec = DeviceRecords(label=label or state_dir.name, state_dir=str(state_dir))
    rec.inventory = read_inventory(state_dir)
    rec.errors.extend(freshness_errors(state_dir))
    store = DeviceStore(state_dir)
    try:
        text = store.load_text(LEDGER)
    except Exception as exc:  # StateError (tampered, rolled back, key missing) or a bad key
        rec.errors.append(f"ledger unreadable: {type(exc).__name__}: {exc}")
        text = None
    if text is not None:
        try:
            rec.ledger = PrivacyLedger.from_json(text)
        except ValueError as exc:
            rec.errors.append(f"ledger invalid: {exc}")
    for name in (HEAD_LEDGER, BASELINE_LEDGER, BASELINE_HEAD_LEDGER):
        try:
            other = store.load_text(name)
            if other is not None:
                rec.other_ledgers[name] = PrivacyLedger.from_json(other)
        except Exception as exc:  # StateError or an invalid ledger: reported, not raised
            rec.errors.append(f"{name} unreadable: {type(exc).__name__}: {exc}")
    try:
        config = store.load_text(RECEIVED_CONFIG)
        rec.config = json.loads(config) if config else {}
    except Exception as exc:
        rec.errors.append(f"recorded run config unreadable: {type(exc).__name__}: {exc}")
    try:
        head = store.load_tensors(HEAD_FILE)
    except Exception as exc:
        rec.errors.append(f"personal head unreadable: {type(exc).__name__}: {exc}")
        head = None
    rec.personal_names = sorted(head) if head else []
    rec.personal_digests = sorted(personal_digests(head)) if head else []
    return rec


def read_device(state_dir: str | Path, *, delta: float, target_epsilon: float | None, dp: bool = True,
                label: str | None = None) -> dict:
    """One device's audit figures from its state folder (epsilon, rounds, budget, what it sent)."""
    return device_summary(read_device_records(state_dir, label=label), delta=delta, target_epsilon=target_epsilon, dp=dp)
