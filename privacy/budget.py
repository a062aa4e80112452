"""One budget per user: the composition of several DP mechanisms that used the same user's records.

A simulated device trains the local-only baseline (a replay of its DP-SGD steps without federation)
beside its federated rounds: two DP-SGD mechanisms on the same records. Their guarantee together is
their composition, which :func:`composed` computes with the accountant of the ledgers (RDP or PRV):
the steps of all of them, as one history.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedpersona.privacy.ledger import PrivacyLedger

__all__ = ["composed"]


def composed(ledgers: Iterable[PrivacyLedger | None]) -> PrivacyLedger:
    """A ledger holding every step of ``ledgers`` (None entries skipped); PRV if any of them uses PRV."""
    ledgers = [led for led in ledgers if led is not None]
    accountant = "prv" if any(led.accountant == "prv" for led in ledgers) else "rdp"
    out = PrivacyLedger(accountant=accountant)
    for led in ledgers:
        for sigma, q, n in led.history:
            out.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    return out
