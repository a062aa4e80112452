"""Where a simulation's users come from: the built-in Shakespeare corpus, or a per-user dataset file.

``data.source`` picks it (the format is in ``docs/data.md``):

* ``shakespeare`` (default): :mod:`fedpersona.simulations.corpus`, one user per (play, role);
* a file ``*.jsonl`` / ``*.json`` / ``*.csv`` / ``*.parquet``, or a folder written by Hugging Face
  ``datasets``' ``save_to_disk``: one row per example (or per chat message), read with Hugging Face
  ``datasets`` and partitioned into users with Flower Datasets' ``NaturalIdPartitioner`` on
  ``data.user-column``.

Columns: ``data.user-column`` (required) names the user of a row; then either ``data.reply-column``
(required) with ``data.cue-column`` (optional: a missing default column means empty cues), or, for
chat logs, ``data.text-column``: every message is a reply of its author, and its cue is the
messages of other users just before it (at most :data:`CUE_MESSAGES`, since the author's own
previous message, in ``data.order-column`` order, within one ``data.thread-column`` value).

Filters, as for the corpus: users with at least ``data.min-examples`` examples; at most
``data.max-users`` of them, drawn with ``run.seed`` (``random.Random(seed).sample`` of the
(-examples, user id) order), returned sorted by user id. ``data.max-examples`` (a seeded subset
per user) and the per-user train / held-out split (:func:`fedpersona.client.data.split_examples`) are
applied by the device, whatever the source.

Bad data raises ``ValueError`` naming the file, the column (and its config key) and the row
(rows count from 1 in file order; a CSV file's header line is not a row).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.client.data import TextRefused, check_text
from fedpersona.config import SHAKESPEARE, DataConfig
from fedpersona.simulations.corpus import Example, all_users, load_users

logger = logging.getLogger(__name__)

#: File suffix -> the Hugging Face ``datasets`` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: Chat logs: a message's cue holds at most this many messages of other users before it.
CUE_MESSAGES = 4
_USER = "user"


@dataclass(frozen=True)
class User:
    """One simulated user: an id and its examples (``.cue``, ``.reply``) in source order."""

    user_id: str
    examples: tuple[Example, ...]

    @property
    def num_examples(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class DataReport:
    """What the filters of ``data.*`` did to a source: how many users each one dropped, how many examples
    ``data.max-examples`` leaves out (:func:`load_source_report`; the runner adds the truncation share)."""

    source: str
    users_in_source: int
    below_min_examples: int
    min_examples: int
    not_drawn: int
    max_users: int
    users: int
    examples: int
    examples_kept: int
    max_examples: int

    def dropped(self) -> str:
        """Which filter dropped how many users (``none dropped`` when none did)."""
        parts = []
        if self.below_min_examples:
            parts.append(f"{self.below_min_examples} with fewer than data.min-examples={self.min_examples} examples")
        if self.not_drawn:
            parts.append(f"{self.not_drawn} not drawn (data.max-users={self.max_users})")
        return f"dropped {', '.join(parts)}" if parts else "none dropped"

    def lines(self) -> list[str]:
        """The report as lines of text (the log, the progress display and summary.txt)."""
        out = [f"data: {self.users} of {self.users_in_source} users of {self.source}; {self.dropped()}"]
        cut = self.examples - self.examples_kept
        out.append(f"examples: {self.examples_kept} of the users' {self.examples} kept"
                   + (f" ({cut} beyond data.max-examples={self.max_examples} per user)" if cut else ""))
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_source(data: DataConfig, seed: int, *, on_user: Callable[[int, int], None] | None = None) -> list:
    """The users of ``data.source`` after the filters (module docstring); sorted by user id.

    ``on_user(done, total)`` is called as users are partitioned (for a progress display).
    """
    return load_source_report(data, seed, on_user=on_user)[0]


def load_source_report(data: DataConfig, seed: int, *,
                       on_user: Callable[[int, int], None] | None = None) -> tuple[list, DataReport]:
    """:func:`load_source`, and what its filters dropped (:class:`DataReport`)."""
    if data.source == SHAKESPEARE:
        users = load_users(min_speeches=data.min_examples, max_users=data.max_users, seed=seed)
        if on_user is not None:
            on_user(len(users), len(users))
        everyone = [len(u.examples) for u in all_users()]
        return users, _report(data, everyone, users)
    path = Path(data.source).expanduser()
    columns = (data.user_column, data.cue_column, data.reply_column, data.text_column, data.order_column,
               data.thread_column)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ValueError(f"Invalid config value for 'data.source': cannot read {str(path)!r} ({exc.strerror}). "
                         f"You passed: {data.source!r}") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, columns)
    users = _CACHE.get(key)
    if users is None:
        users = _CACHE[key] = _all_users(key[0], columns, on_user)
        while len(_CACHE) > 4:
            _CACHE.pop(next(iter(_CACHE)))
    elif on_user is not None:
        on_user(len(users), len(users))
    chosen = select_users(users, min_examples=data.min_examples, max_users=data.max_users, seed=seed, where=str(path))
    return chosen, _report(data, [len(u.examples) for u in users], chosen)


def _report(data: DataConfig, sizes: Sequence[int], chosen: Sequence) -> DataReport:
    eligible = sum(1 for n in sizes if n >= data.min_examples)
    examples = sum(len(u.examples) for u in chosen)
    kept = sum(min(len(u.examples), data.max_examples) for u in chosen)
    return DataReport(source=data.source, users_in_source=len(sizes), below_min_examples=len(sizes) - eligible,
                      min_examples=data.min_examples, not_drawn=eligible - len(chosen), max_users=data.max_users,
                      users=len(chosen), examples=examples, examples_kept=kept, max_examples=data.max_examples)


def select_users(users: Sequence[User], *, min_examples: int, max_users: int | None, seed: int, where: str) -> list[User]:
    """The users with at least ``min_examples`` examples; at most ``max_users``, drawn with ``seed``."""
    ranked = sorted(users, key=lambda u: (-len(u.examples), u.user_id))
    eligible = [u for u in ranked if len(u.examples) >= min_examples]
    if not eligible:
        most = len(ranked[0].examples) if ranked else 0
        raise ValueError(
            f"{where}: no user has at least data.min-examples={min_examples} examples: the source has "
            f"{len(ranked)} users, the most examples of any is {most}"
        )
    if max_users is not None and max_users < len(eligible):
        eligible = random.Random(seed).sample(eligible, max_users)
    return sorted(eligible, key=lambda u: u.user_id)


# --------------------------------------------------------------------------------------------- reading
#: Every user of a source, parsed once per process (and again when the file changes): simulated
#: devices of one process load the same source.
_CACHE: dict[tuple, tuple[User, ...]] = {}


def _all_users(path: str, columns: tuple[str, ...], on_user: Callable[[int, int], None] | None) -> tuple[User, ...]:
    user_col, cue_col, reply_col, text_col, order_col, thread_col = columns
    table, is_csv = _read(Path(path))
    where = path
    get = functools.partial(_column, table, where)
    users = _user_ids(get(user_col, "data.user-column"), user_col, where)
    if text_col:
        texts = _texts(get(text_col, "data.text-column"), text_col, "data.text-column", where, is_csv, required=True)
        order = _order(get(order_col, "data.order-column"), order_col, where) if order_col else list(range(len(texts)))
        threads = get(thread_col, "data.thread-column") if thread_col else None
        cues, replies, owners = _chat_examples(users, texts, order, threads)
    else:
        replies = _texts(get(reply_col, "data.reply-column"), reply_col, "data.reply-column", where, is_csv,
                         required=True)
        if cue_col and cue_col in table.column_names:
            cues = _texts(get(cue_col, "data.cue-column"), cue_col, "data.cue-column", where, is_csv, required=False)
        elif cue_col and cue_col != DataConfig.cue_column:
            raise _missing(table, where, cue_col, "data.cue-column")
        else:
            logger.info("%s: no cue column %r: every cue is empty", where, cue_col)
            cues = [""] * len(replies)
        owners = users
    return _partition(owners, cues, replies, on_user)


def _read(path: Path):
    """(a Hugging Face ``Dataset`` of the file or saved folder, whether it is CSV)."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: not a Hugging Face dataset folder written by save_to_disk, and data.source "
                             f"must be 'shakespeare', such a folder or a {'/'.join(BUILDERS)} file ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            parts = [loaded[name] for name in sorted(loaded)]
            try:
                loaded = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
            except ValueError as exc:
                raise ValueError(f"{path}: its splits {sorted(loaded)} do not have the same columns ({exc})") from None
        return loaded, False
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"Invalid config value for 'data.source': {str(path)!r} is not a {'/'.join(BUILDERS)} file "
                         f"nor a saved dataset folder. You passed: {str(path)!r}")
    options: dict[str, Any] = {"na_filter": False} if builder == "csv" else {}  # empty CSV cells are "", not NaN
    with tempfile.TemporaryDirectory(prefix="fedpersona-source-") as cache:  # no cache left behind
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
        except Exception as exc:  # noqa: BLE001 - pyarrow / pandas parse errors of the user's file
            raise ValueError(f"{path}: cannot read it as {builder.upper()} ({type(exc).__name__}: {exc})") from None
    return table, builder == "csv"


def _missing(table, where: str, name: str, key: str) -> ValueError:
    return ValueError(f"{where}: no column {name!r} ({key}); the columns are {table.column_names}. You passed: {name!r}")


def _column(table, where: str, name: str, key: str) -> list:
    if name not in table.column_names:
        raise _missing(table, where, name, key)
    return list(table[name])


def _user_ids(values: list, column: str, where: str) -> list[str]:
    out = []
    for row, v in enumerate(values, start=1):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"{where}, row {row}: column {column!r} (data.user-column) must hold a user id (text or "
                             f"an integer). You passed: {v!r}")
        text = str(v).strip()
        if not text:
            raise ValueError(f"{where}, row {row}: empty user id in column {column!r} (data.user-column)")
        out.append(text)
    return out


def _texts(values: list, column: str, key: str, where: str, is_csv: bool, *, required: bool) -> list[str]:
    out = []
    for row, v in enumerate(values, start=1):
        if v is None and not required:
            v = ""
        if is_csv and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # CSV has no types: a column of numbers is text too
        if not isinstance(v, str):
            raise ValueError(f"{where}, row {row}: column {column!r} ({key}) must hold text. You passed: {v!r} "
                             f"({type(v).__name__})")
        if required and not v.strip():
            raise ValueError(f"{where}, row {row}: empty text in column {column!r} ({key})")
        try:
            check_text(v, field=f"column {column!r} ({key})")  # what a device would refuse to train on
        except TextRefused as exc:
            raise ValueError(f"{where}, row {row}: {exc}") from None
        out.append(v)
    return out


def _order(values: list, column: str, where: str) -> list[int]:
    for row, v in enumerate(values, start=1):
        if v is None or (isinstance(v, float) and v != v):
            raise ValueError(f"{where}, row {row}: no value in column {column!r} (data.order-column)")
    try:
        return sorted(range(len(values)), key=values.__getitem__)  # stable: ties keep file order
    except TypeError as exc:
        raise ValueError(f"{where}: column {column!r} (data.order-column) mixes values that cannot be ordered "
                         f"({exc})") from None


def _chat_examples(users: list[str], texts: list[str], order: list[int], threads: list | None):
    """Chat log -> (cues, replies, owners) in ``order``: each message answers the others' messages before it."""
    recent: dict[Any, deque] = {}
    cues, replies, owners = [], [], []
    for i in order:
        author = users[i]
        history = recent.setdefault(threads[i] if threads is not None else None, deque(maxlen=CUE_MESSAGES))
        said = []
        for who, text in reversed(history):
            if who == author:
                break
            said.append(text)
        cues.append("\n".join(reversed(said)))
        replies.append(texts[i])
        owners.append(author)
        history.append((author, texts[i]))
    return cues, replies, owners


def _partition(owners: list[str], cues: list[str], replies: list[str],
               on_user: Callable[[int, int], None] | None) -> tuple[User, ...]:
    """One :class:`User` per distinct owner, with Flower Datasets' ``NaturalIdPartitioner``."""
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    table = datasets.Dataset.from_dict({_USER: owners, "cue": cues, "reply": replies})
    partitioner = NaturalIdPartitioner(partition_by=_USER)
    partitioner.dataset = table
    users = []
    for pid in range(partitioner.num_partitions):
        part = partitioner.load_partition(pid)
        examples = tuple(Example(cue=c, reply=r) for c, r in zip(part["cue"], part["reply"]))
        users.append(User(str(partitioner.partition_id_to_natural_id[pid]), examples))
        if on_user is not None:
            on_user(pid + 1, partitioner.num_partitions)
    logger.debug("Partitioned %d rows into %d users", len(owners), len(users))
    return tuple(users)


# ------------------------------------------------------------------------------------------ truncation
def truncation(tokenizer, pairs: Sequence[tuple[str, str]], *, seq_len: int, cue_tokens: int) -> dict:
    """How many replies ``model.seq-len`` cuts: each (cue, reply) pair encoded as a device encodes it
    (:func:`fedpersona.client.data.encode_examples`); a reply is cut when its closing token does not fit.

    Returns ``replies``, ``cut``, ``share`` (cut / replies), ``median-reply-tokens`` and ``seq-len``.
    """
    from fedpersona.client.data import IM_END, encode_examples

    if not pairs:
        return {"replies": 0, "cut": 0, "share": 0.0, "median-reply-tokens": 0, "seq-len": seq_len}
    end = tokenizer.convert_tokens_to_ids(IM_END)
    encoded = encode_examples(tokenizer, pairs, seq_len=seq_len, cue_tokens=cue_tokens)
    cut = sum(1 for e in encoded if e.input_ids[-1] != end)
    lengths = sorted(len(ids) for ids in tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"])
    return {"replies": len(pairs), "cut": cut, "share": cut / len(pairs),
            "median-reply-tokens": lengths[len(lengths) // 2], "seq-len": seq_len}


def truncation_line(t: dict) -> str:
    """One line of text for :func:`truncation`'s result."""
    if not t["replies"]:
        return "replies: none"
    return (f"replies: {t['cut']} of {t['replies']} ({t['share']:.0%}) cut at model.seq-len={t['seq-len']} tokens "
            f"(median reply {t['median-reply-tokens']} tokens)")


#: A share of cut replies from which a run warns (the issue's trial data: 64% at model.seq-len = 64).
TRUNCATION_WARNING = 0.25


def truncation_warning(t: dict) -> str | None:
    """The warning for many cut replies (None below :data:`TRUNCATION_WARNING`)."""
    if not t["replies"] or t["share"] < TRUNCATION_WARNING:
        return None
    return (f"model.seq-len={t['seq-len']} cuts {t['cut']} of {t['replies']} replies ({t['share']:.0%}; median reply "
            f"{t['median-reply-tokens']} tokens): the devices learn only their first tokens; a larger model.seq-len "
            "keeps more of each reply")
