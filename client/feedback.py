"""Feedback from the chat becomes local training data, kept encrypted in the device's store.

Every reply the assistant drafts in ``fedpersona chat`` (:mod:`fedpersona.client.chat`) can be

* **accepted** — the draft is what the user would have said: ``(cue, draft)`` is a new example;
* **edited** — the user's corrected text is what they would have said: ``(cue, edited)`` is a new
  example (the draft is kept beside it as ``proposed``);
* **rejected** — ``(cue, draft)`` is a *negative* example: never trained on, kept for evaluation
  (:func:`fedpersona.client.chat.feedback_losses`: the personalized model should find rejected drafts less likely than
  the user's own replies).

Examples live in the :class:`~fedpersona.client.store.DeviceStore` blob ``feedback`` (JSON, encrypted at rest
like the head and the ledger), one record each::

    {"id": "9f2c...", "cue": "...", "reply": "...", "origin": "accepted" | "edited" | "rejected",
     "time": "2026-12-01T08:30:12+00:00", "proposed": "... (edited / rejected: the draft)"}

When each positive example first joined the training set is kept in the blob ``feedback-used``
(``{"joined": {id: server_round}}``): :func:`training_feedback` hands the device, at a round, every
positive example that joined earlier plus at most ``client.max-new-examples`` new ones (oldest
first; 0 = no cap), and records the round at which the new ones joined. An example joins only the
steps of that round and later ones; each one is a new record under the record-level guarantee, and
the sample rate of every later step is ``batch / n`` with the grown ``n`` (docs/audit.md,
"A growing dataset"). :func:`noise_for_remaining_budget` picks the noise for the remaining planned
steps at the new sample rate so that the composed epsilon stays within the budget.

Input: :func:`record_feedback` keeps only text that follows the device's text rule
(:func:`fedpersona.client.data.check_text`: valid Unicode, no NUL or control character but tab and line
breaks, at most :data:`fedpersona.client.data.MAX_TEXT_CHARS` characters), refusing the rest with
:class:`fedpersona.client.data.TextRefused`. An example kept before that rule (or otherwise unusable) stays in
the store but never joins training, a profile or the exemplars: :func:`usable` skips it and says so
in the device's log, by its id.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from fedpersona.client.data import MAX_TEXT_CHARS, TextRefused, check_text
from fedpersona.client.store import DeviceStore, StateError

logger = logging.getLogger(__name__)

FEEDBACK = "feedback"
FEEDBACK_USED = "feedback-used"
ORIGINS = ("accepted", "edited", "rejected")
POSITIVE = ("accepted", "edited")
_LOCK = ".feedback.lock"
_VERSION = 1


@dataclass(frozen=True)
class FeedbackExample:
    id: str
    cue: str
    reply: str
    origin: str
    time: str
    proposed: str | None = None

    @property
    def positive(self) -> bool:
        return self.origin in POSITIVE


@contextmanager
def _feedback_lock(store: DeviceStore) -> Iterator[None]:
    """Serialise read-modify-write of the feedback blobs (a chat and a training round may overlap)."""
    store.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.state_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_json(store: DeviceStore, name: str, key: str) -> list | dict | None:
    text = store.load_text(name)
    if text is None:
        return None
    try:
        doc = json.loads(text)
        value = doc[key]
        if doc.get("version") != _VERSION:
            raise ValueError(f"version {doc.get('version')!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"state blob '{name}' in {store.state_dir} is not a valid feedback file: {exc}") from None
    return value


def load_feedback(store: DeviceStore) -> list[FeedbackExample]:
    """Every feedback example of the device, oldest first."""
    records = _load_json(store, FEEDBACK, "examples") or []
    out = []
    for i, r in enumerate(records):
        try:
            ex = FeedbackExample(**r)
        except TypeError as exc:
            raise StateError(f"feedback record {i} in {store.state_dir} is malformed: {exc}") from None
        if ex.origin not in ORIGINS:
            raise StateError(f"feedback record {i} in {store.state_dir} has origin {ex.origin!r}")
        out.append(ex)
    return out


def record_feedback(store: DeviceStore, *, cue: str, reply: str, origin: str, proposed: str | None = None) -> FeedbackExample:
    """Append one example (encrypted, atomically) and return it."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}. You passed: {origin!r}")
    check_text(reply, field="a feedback reply", max_chars=MAX_TEXT_CHARS)
    check_text(cue, field="a feedback cue", max_chars=MAX_TEXT_CHARS)
    if proposed is not None:
        check_text(proposed, field="the proposed draft")
    if not reply.strip():
        raise ValueError("a feedback reply must be a non-empty string. You passed: an empty or blank one")
    ex = FeedbackExample(
        id=uuid.uuid4().hex, cue=cue, reply=reply.strip(), origin=origin,
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"), proposed=proposed,
    )
    with _feedback_lock(store):
        records = [asdict(e) for e in load_feedback(store)]
        records.append(asdict(ex))
        store.save_text(FEEDBACK, json.dumps({"version": _VERSION, "examples": records}))
    logger.debug("feedback %s (%s) stored in %s", ex.id, origin, store.state_dir)
    return ex


_SKIPPED: set[str] = set()  # ids already reported as unusable by this process


def usable(examples: Sequence[FeedbackExample]) -> list[FeedbackExample]:
    """The examples whose cue and reply follow the text rule; each other one is skipped and reported once
    (by its id and the reason's class: never its text) in the device's log."""
    out = []
    for e in examples:
        try:
            check_text(e.cue, field="cue", max_chars=MAX_TEXT_CHARS)
            check_text(e.reply, field="reply", max_chars=MAX_TEXT_CHARS)
        except TextRefused as exc:
            if e.id not in _SKIPPED:
                _SKIPPED.add(e.id)
                logger.warning("feedback example %s cannot be used (%s): skipped; it stays in the store and never "
                               "joins training", e.id, str(exc).split(". You passed")[0])
            continue
        out.append(e)
    return out


def joined_rounds(store: DeviceStore) -> dict[str, int]:
    """``{example id: round at which it first joined the training set}``."""
    value = _load_json(store, FEEDBACK_USED, "joined") or {}
    if not isinstance(value, dict):
        raise StateError(f"state blob '{FEEDBACK_USED}' in {store.state_dir} is malformed")
    return {str(k): int(v) for k, v in value.items()}


def training_feedback(store: DeviceStore, *, server_round: int, max_new: int) -> list[FeedbackExample]:
    """Positive examples in the training set at ``server_round``; new ones (at most ``max_new``, 0 = all) join now.

    An example that joined at round r stays in every later round; a round repeated (a resumed run)
    sees the same examples again.
    """
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"Invalid config value for 'client.max-new-examples': must be >= 0 (0 = no cap). You passed: {max_new!r}")
    with _feedback_lock(store):
        positives = usable([e for e in load_feedback(store) if e.positive])
        joined = joined_rounds(store)
        fresh = [e for e in positives if e.id not in joined]
        this_round = sum(1 for r in joined.values() if r == int(server_round))
        admitted = fresh if max_new == 0 else fresh[: max(0, max_new - this_round)]
        if admitted:
            for e in admitted:
                joined[e.id] = int(server_round)
            store.save_text(FEEDBACK_USED, json.dumps({"version": _VERSION, "joined": joined}, sort_keys=True))
        if len(admitted) < len(fresh):
            logger.info("client.max-new-examples=%d: %d new feedback example(s) wait for a later round",
                        max_new, len(fresh) - len(admitted))
    return [e for e in positives if e.id in joined and joined[e.id] <= server_round]


# ------------------------------------------------------------------------------- privacy
def noise_for_remaining_budget(
    ledger, *, target_epsilon: float, delta: float, sample_rate: float, remaining_steps: int,
    tolerance: float = 0.01,
) -> float | None:
    """Smallest noise multiplier whose ``remaining_steps`` at ``sample_rate``, composed with the ledger's
    history, keep epsilon <= ``target_epsilon`` (bisection on :meth:`PrivacyLedger.epsilon_if`).

    None when the budget is already spent (no noise is enough).
    """
    if remaining_steps < 1:
        raise ValueError(f"remaining_steps must be >= 1. You passed: {remaining_steps!r}")

    def eps(sigma: float) -> float:
        return ledger.epsilon_if(noise_multiplier=sigma, sample_rate=sample_rate, num_steps=remaining_steps, delta=delta)

    if ledger.epsilon(delta) >= target_epsilon:
        return None
    low, high = 0.0, 1.0
    e_high = eps(high)
    while e_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            return None
        e_high = eps(high)
    while target_epsilon - e_high > tolerance and high - low > 1e-9 * high:
        mid = 0.5 * (low + high)
        e = eps(mid)
        if e <= target_epsilon:
            high, e_high = mid, e
        else:
            low = mid
    logger.info("noise for the remaining %d step(s) at q %.4f: sigma %.4f (epsilon %.4f of %.4g at the end)",
                remaining_steps, sample_rate, high, e_high, target_epsilon)
    return high


def pairs_of(examples: Sequence[FeedbackExample]) -> list[tuple[str, str]]:
    return [(e.cue, e.reply) for e in examples]
