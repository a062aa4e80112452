"""The freshness receipt on the wire: a device's record of its newest commit, kept by the server.

Every reply with content that a device sends carries one ``ConfigRecord`` named ``freshness``
with one entry, ``receipt`` (``bytes``, 84 bytes): the device's store id, its newest commit's
generation and chain digest, encrypted and authenticated under the device's own key
(:meth:`fedpersona.client.store.DeviceStore.receipt`). To the server it is an opaque random-looking string:
it learns neither the generation nor anything else. The server keeps the latest receipt of each
node (:class:`fedpersona.server.freshness.FreshnessGrid`) and sends it back, under the same record name, with
every later request to that node; the device refuses a state older than the receipt
(:func:`fedpersona.client.freshness.freshness_mod`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

__all__ = ["MAX_RECEIPT_BYTES", "RECEIPT", "RECORD", "put_receipt", "take_receipt"]

RECORD = "freshness"
RECEIPT = "receipt"
#: A receipt is 84 bytes; anything longer is not one (a server or device never stores or forwards it).
MAX_RECEIPT_BYTES = 256


def take_receipt(content: RecordDict) -> bytes | None:
    """Remove the ``freshness`` record from ``content``; its receipt, or None (absent or not a receipt)."""
    if RECORD not in content.config_records:
        return None
    record = content.config_records[RECORD]
    del content[RECORD]
    value = record.get(RECEIPT)
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_RECEIPT_BYTES:
        return None
    return value


def put_receipt(content: RecordDict, receipt: bytes) -> None:
    """Add the ``freshness`` record carrying ``receipt`` to ``content``."""
    if not isinstance(receipt, bytes) or not 0 < len(receipt) <= MAX_RECEIPT_BYTES:
        raise ValueError(f"a freshness receipt is 1 to {MAX_RECEIPT_BYTES} bytes. You passed: {type(receipt).__name__} "
                         f"of length {len(receipt) if hasattr(receipt, '__len__') else '?'}")
    content[RECORD] = ConfigRecord({RECEIPT: receipt})
