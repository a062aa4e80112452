"""The device's own state folder: encrypted at rest, one atomic commit per message, anchored outside.

It holds the personal head (tensors), the privacy ledger (JSON text) and other small named
blobs, encrypted with AES-256-GCM under the device key (a fresh random 96-bit nonce per
encryption; the associated data binds each ciphertext to the store, the blob's name, kind and
generation, so a ciphertext copied under another name or from another write fails to decrypt).

**Commits.** Every change is a *commit*: one record appended to a journal, holding every blob the
commit writes and the list of where each blob lives. A commit is one ``write`` and one ``fsync``
of the journal, plus one ``fsync`` of the freshness anchor (below): two ``fsync`` calls, however
many blobs it writes. :meth:`DeviceStore.transaction` gathers every save made inside it (loads
see them) into one commit at its end; the ClientApp wraps each message in one
(:mod:`fedpersona.client.freshness`), so a participation's writes (received adapter, ledgers, head,
participation record, reveal log, evaluation row...) land together, before the reply leaves.
A save outside a transaction is a commit of its own.

**Group commit.** A process that serves many devices (a simulation's in-process grid) delivers a
batch of messages inside :func:`group_commit`: each commit's record is written as usual, but its
``fsync`` and its anchor's write wait for :meth:`GroupCommit.flush`, which makes every folder's
records durable and then writes its anchor (in that order for each folder, the folders in parallel:
concurrent ``fsync`` calls share the file system's journal commits). The grid releases a batch's
replies only after the flush, so "a reply leaves only after the state it depends on is on disk"
holds unchanged; a folder whose flush fails answers with an error and refuses every later use in
this process. A folder's first record waits for the flush too (its anchor, at generation 0, is
written before it); a later snapshot stays synchronous (it must be on disk before the active
journal is emptied), and so does the creation of the device key.

**Crash safety.** A record is valid only complete and authentic. A crash during a commit leaves a
torn last record, which is ignored (the state is the previous commit's): after a restart the
state holds all of a commit's writes or none, and is never refused as tampered. Two journals
take turns: when the active one holds too much overwritten data, the next commit writes a
snapshot of every live blob into the other one (truncated first) and continues there; until that
snapshot is complete on disk, the active journal is untouched.

**Tampering, deletion, rollback.** A record that fails authentication, followed by more data, or
out of sequence, is refused with :class:`StateError`; so is a blob whose bytes changed. Each
commit has a generation (1, 2, ...) and a chain digest over every commit before it. Restoring an
older copy of the folder (or deleting its newest records) is caught by the **freshness anchor**,
a small authenticated file *outside* the state folder that records the newest generation and
chain digest (:func:`default_anchor_dir`): a state older than its anchor, or one that forked from
it, is refused with :class:`RollbackDetected` (a spent privacy budget or an answered unmask
cannot be handed back). The server keeps a second anchor: the device's **freshness receipt**
(:meth:`DeviceStore.receipt`, encrypted and authenticated under the device key, so only the
device can read or make one) goes out with each reply and comes back with the next request
(:mod:`fedpersona.client.freshness`, :mod:`fedpersona.server.freshness`); :meth:`DeviceStore.check_receipt` refuses a
state older than the receipt, and raises the local anchor so the refusal persists. A missing or
unreadable anchor next to existing state is re-created with a warning and a line in the folder's
``freshness.jsonl`` (the audit reports it): only the receipt then guards the past.

Layout of ``state_dir``::

    device.key        the key (64 hex characters), mode 0600, unless given otherwise
    _journal-a.enc    the two journals (one active, the other the previous one, emptied)
    _journal-b.enc
    freshness.jsonl   rollbacks detected, anchors re-created (plain JSON, no secret)
    .lock             advisory lock: one writer at a time, readers shared

and the anchor, ``<anchor_dir>/<store id>.anchor``. A state folder in the earlier layout (one
``<name>.enc`` file per blob and ``_manifest.enc``) is read with that layout's checks and
converted on first use.

The key is, in order: the ``key`` argument, the ``FEDPERSONA_DEVICE_KEY`` environment variable
(64 hex characters), or ``device.key`` (created on the first write). The anchor folder is, in
order: the ``anchor_dir`` argument, ``FEDPERSONA_ANCHOR_DIR``, or ``_fedpersona-anchors`` beside
the state folder.

Record format: ``b"FPJ2" | index length (4 bytes) | blob area length (8 bytes) | index | blob
area``; index = ``nonce | AES-GCM(JSON)`` with the 16-byte head as associated data; each blob =
``nonce | AES-GCM(payload)``, its SHA-256 in the index.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["ANCHOR_ENV", "DeviceStore", "FRESHNESS_FILE", "GroupCommit", "JOURNALS", "KEY_ENV", "KEY_FILE", "RollbackDetected",
           "StateError", "default_anchor_dir", "group_commit", "prepare_stores", "read_freshness_events"]

logger = logging.getLogger(__name__)

KEY_ENV = "FEDPERSONA_DEVICE_KEY"
ANCHOR_ENV = "FEDPERSONA_ANCHOR_DIR"
KEY_FILE = "device.key"
LOCK_FILE = ".lock"
JOURNALS = ("_journal-a.enc", "_journal-b.enc")
FRESHNESS_FILE = "freshness.jsonl"
ANCHOR_DIRNAME = "_fedpersona-anchors"
ANCHOR_SUFFIX = ".anchor"

_FORMAT_TAG = b"fedpersona-device-store/v2"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_REC_MAGIC = b"FPJ2"
_REC_HEAD = struct.Struct(">4sIQ")  # magic, index length, blob area length
_KIND_TEXT, _KIND_TENSORS = "S", "T"
_KIND_NAMES = {_KIND_TEXT: "text", _KIND_TENSORS: "tensors"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ZERO_CHAIN = bytes(32)
_HISTORY = 256  # chain digests of the newest commits kept (to check a receipt of an older generation)
_COMPACT_RECORDS = 64  # a snapshot at least every this many commits
_COMPACT_SLACK = 1 << 20  # ... or when overwritten data exceeds max(live data, this)

# The anchor: two fixed-size slots, written in turn (a torn write spoils one, the other holds the previous).
_ANCHOR_MAGIC = b"FPA1"
_ANCHOR_PLAIN = 448
_ANCHOR_SLOT = len(_ANCHOR_MAGIC) + _NONCE_BYTES + _ANCHOR_PLAIN + _TAG_BYTES
_RECEIPT = struct.Struct(">16sQ32s")  # store id, generation, chain digest

# The earlier layout (one file per blob + manifest), read only to convert it.
_V1_MANIFEST = "_manifest.enc"
_V1_MAGIC = b"FPS1"
_V1_TAG = b"fedpersona-device-store/v1"
_V1_HEADER = struct.Struct(">cQ")
_V1_KINDS = {b"S": _KIND_TEXT, b"T": _KIND_TENSORS, b"M": "manifest"}


class StateError(RuntimeError):
    """The device state cannot be used: corrupt, tampered, under another key, deleted or rolled back."""


class RollbackDetected(StateError):
    """The state is older than its freshness anchor or receipt: an older copy was restored."""

    public_reason = ("refused: this device's state is older than its last commit (an older copy was restored); "
                     "it takes no part until its owner restores the newest state")


def _parse_hex_key(text: str, source: str) -> bytes:
    text = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError(f"{source} must hold 64 hex characters (a 256-bit key); it holds {len(text)} characters")
    return bytes.fromhex(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_anchor_dir(state_dir: str | os.PathLike) -> Path:
    """Where the anchor of ``state_dir`` lives unless told otherwise: ``$FEDPERSONA_ANCHOR_DIR``, else
    ``_fedpersona-anchors`` beside the state folder (outside it: a copy of the state folder restored
    over it leaves the anchor as it is)."""
    env = os.environ.get(ANCHOR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.path.abspath(state_dir)).parent / ANCHOR_DIRNAME


def _chain(prev: bytes, gen: int, body: bytes) -> bytes:
    h = hashlib.sha256(b"fedpersona-chain\x00" + prev + gen.to_bytes(8, "big"))
    h.update(hashlib.sha256(body).digest())
    return h.digest()


def _body_bytes(store_id: str, gen: int, snapshot: bool, blobs: list) -> bytes:
    return json.dumps({"store": store_id, "gen": gen, "snapshot": snapshot, "blobs": blobs},
                      sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Blob:
    kind: str
    gen: int  # the commit that wrote it
    journal: str
    offset: int  # of its ciphertext in the journal file
    length: int
    sha: str


@dataclass
class _State:
    """What the folder holds, as parsed: the active journal's replay."""

    store_id: bytes | None = None
    gen: int = 0
    chain: bytes = _ZERO_CHAIN
    blobs: dict[str, _Blob] = field(default_factory=dict)
    history: dict[int, bytes] = field(default_factory=dict)
    journal: str | None = None
    end: int = 0  # valid end of the active journal
    records: int = 0
    ident: tuple = ()
    key_id: bytes = b""


@dataclass
class _Anchor:
    store_id: bytes
    gen: int
    chain: bytes
    refused: str | None = None


class _Txn:
    def __init__(self, base: _State) -> None:
        self.base = base
        self.writes: dict[str, tuple[str, bytes]] = {}


class _Folder:
    """Per-process bookkeeping of one state folder (shared by every DeviceStore on it)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.state: _State | None = None
        self.txns: dict[int, _Txn] = {}
        self.noted: set[tuple] = set()  # freshness events already written by this process
        self.pending: dict[str, tuple[str, bytes]] = {}  # writes of a deferred transaction, for the next commit
        self.anchor_ok: tuple | None = None  # (anchor file, state) last found consistent
        self.real = ""  # the folder's real path (its identity in this process)
        self.outside: set[str] = set()  # anchor folders found to lie outside this folder
        self.anchor_files: dict[tuple[bytes, str], Path] = {}  # (key, anchor folder) -> the anchor file's path
        self.deferred_anchor: tuple | None = None  # (store, key, anchor) a group commit writes at its flush
        self.broken: str | None = None  # why a group commit's flush failed: the folder refuses every later use


_FOLDERS: dict[str, _Folder] = {}
_FOLDERS_LOCK = threading.Lock()


def _folder(path: Path) -> _Folder:
    real = os.path.realpath(path)
    with _FOLDERS_LOCK:
        f = _FOLDERS.get(real)
        if f is None:
            f = _FOLDERS[real] = _Folder()
            f.real = real
        return f


_LOCAL = threading.local()
_FLUSH_WORKERS = 16
_FLUSH_POOL: ThreadPoolExecutor | None = None
_FLUSH_POOL_LOCK = threading.Lock()


def _flush_pool() -> ThreadPoolExecutor:
    global _FLUSH_POOL
    with _FLUSH_POOL_LOCK:
        if _FLUSH_POOL is None:
            _FLUSH_POOL = ThreadPoolExecutor(_FLUSH_WORKERS, thread_name_prefix="fedpersona-fsync")
        return _FLUSH_POOL


class GroupCommit:
    """The commits of one batch of messages, made durable together by :meth:`flush` (see the module's docstring).

    ``tag``: what the commits made from now on belong to (the grid sets the message being delivered);
    :meth:`flush` answers the tags whose folders could not be made durable, with the reason.
    """

    def __init__(self) -> None:
        self.tag: object = None
        # per folder: (its bookkeeping, a store on it, journals to fsync, the tags, folders to fsync)
        self._folders: dict[int, tuple[_Folder, DeviceStore, set[Path], set, set[Path]]] = {}
        self.commits = 0  # records written with their fsync deferred
        self.failed: dict[object, str] = {}  # the last flush's answer

    def _entry(self, store: "DeviceStore") -> tuple:
        f = store._folder
        entry = self._folders.get(id(f))
        if entry is None:
            entry = self._folders[id(f)] = (f, store, set(), set(), set())
        entry[3].add(self.tag)
        return entry

    def _journal(self, store: "DeviceStore", path: Path, *, folder: Path | None = None) -> None:
        """A record written to ``path`` (and, ``folder``, a file created in it) waits for the flush's fsync."""
        entry = self._entry(store)
        entry[2].add(path)
        if folder is not None:
            entry[4].add(folder)
        self.commits += 1

    def _anchor(self, store: "DeviceStore", key: bytes, anchor: "_Anchor") -> None:
        self._entry(store)
        store._folder.deferred_anchor = (store, key, anchor)

    @staticmethod
    def _flush_folder(folder: _Folder, journals: set[Path], folders: set[Path]) -> None:
        for path in sorted(journals):  # the records first (and the folder, for a journal just created) ...
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for path in sorted(folders):
            _fsync_dir(path)
        pending = folder.deferred_anchor  # ... then the anchor that records them
        if pending is not None:
            store, key, anchor = pending
            with store._locked(exclusive=True):
                if folder.deferred_anchor is pending:
                    store._write_anchor(key, anchor)

    def flush(self) -> dict[object, str]:
        """Make every deferred commit durable: per folder, its journals' ``fsync`` then its anchor's write
        (the folders in parallel). Returns ``{tag: reason}`` for the folders that failed (nothing if none)."""
        entries, self._folders = list(self._folders.values()), {}

        def run(entry) -> BaseException | None:
            try:
                self._flush_folder(entry[0], entry[2], entry[4])
            except Exception as exc:  # noqa: BLE001 - answered per tag
                return exc
            return None

        results = list(_flush_pool().map(run, entries)) if len(entries) > 1 else [run(e) for e in entries]
        failed: dict[object, str] = {}
        for (folder, store, _, tags, _), exc in zip(entries, results):
            if exc is None:
                continue
            reason = f"{type(exc).__name__}: {exc}"
            # After a failed fsync the pages may be dropped: what this process believes the folder holds may not
            # be what is on disk. It refuses every later use until the device restarts (and reads the disk).
            folder.broken, folder.state, folder.anchor_ok, folder.deferred_anchor = reason, None, None, None
            logger.error("%s: a commit could not be made durable (%s); the folder is refused until a restart",
                         store.state_dir, reason)
            for tag in tags:
                failed[tag] = f"the device's state could not be made durable ({reason})"
        return failed


def prepare_stores(stores: list["DeviceStore"]) -> None:
    """:meth:`DeviceStore.prepare` for every store, concurrently (each key and anchor durable, their fsyncs
    overlapping the others'). A store that cannot be prepared is left to its first commit, which meets the error."""
    def one(store: "DeviceStore") -> None:
        try:
            store.prepare()
        except Exception as exc:  # noqa: BLE001 - raised again, with its context, by the store's first commit
            logger.debug("%s: not prepared ahead: %s: %s", store.state_dir, type(exc).__name__, exc)

    if len(stores) > 1:
        list(_flush_pool().map(one, stores))
    else:
        for store in stores:
            one(store)


def _group() -> GroupCommit | None:
    return getattr(_LOCAL, "group", None)


@contextmanager
def group_commit() -> Iterator[GroupCommit]:
    """Defer the durability of this thread's commits to the block's end (one flush; see :class:`GroupCommit`).

    The block's end flushes; its answer (the failed tags) is in ``group.failed``. Nested blocks join the outer one.
    """
    outer = _group()
    if outer is not None:
        yield outer
        return
    group = GroupCommit()
    _LOCAL.group = group
    try:
        yield group
    finally:
        _LOCAL.group = None
        group.failed = group.flush()


class _NeedExclusive(Exception):
    """A read found a folder in the earlier layout: it is converted under the writer's lock."""


def read_freshness_events(state_dir: str | os.PathLike) -> list[dict]:
    """The lines of ``<state_dir>/freshness.jsonl`` (``[]`` if none): rollbacks detected, anchors re-created."""
    path = Path(state_dir) / FRESHNESS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if isinstance(entry, dict):
            out.append(entry)
    return out


class DeviceStore:
    """Encrypted, journaled, rollback-evident key-value store in ``state_dir``.

    Args:
        state_dir: the device's state folder (created, mode 0700, if missing).
        key: 32-byte AES key; else ``$FEDPERSONA_DEVICE_KEY``; else ``state_dir/device.key``.
        anchor_dir: the folder of the freshness anchor (:func:`default_anchor_dir` if not given); it must
            not be inside ``state_dir``.
    """

    def __init__(self, state_dir: str | os.PathLike, *, key: bytes | None = None,
                 anchor_dir: str | os.PathLike | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if key is not None:
            if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
                raise ValueError(f"key must be 32 bytes (AES-256). You passed: {type(key).__name__} of length {len(key) if hasattr(key, '__len__') else '?'}")
            self._key: bytes | None = bytes(key)
            self._key_source = "the key argument"
        elif os.environ.get(KEY_ENV):
            self._key = _parse_hex_key(os.environ[KEY_ENV], f"environment variable {KEY_ENV}")
            self._key_source = f"${KEY_ENV}"
        else:
            self._key = None  # read from / created in the key file on first use
            self._key_source = str(self.key_path)
        self.anchor_dir = (Path(anchor_dir).expanduser() if anchor_dir is not None
                           else default_anchor_dir(self.state_dir))
        self._folder = _folder(self.state_dir)
        if str(self.anchor_dir) not in self._folder.outside:  # checked once per process for each anchor folder
            inside = os.path.realpath(self.anchor_dir) + os.sep
            if inside.startswith(self._folder.real + os.sep):
                raise ValueError(f"the anchor folder must lie outside the state folder it protects (a restored copy "
                                 f"of the folder would restore its anchor too). You passed: "
                                 f"anchor_dir={str(self.anchor_dir)!r} for state_dir={str(self.state_dir)!r}")
            self._folder.outside.add(str(self.anchor_dir))

    # ----------------------------------------------------------------------------- paths
    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    def _anchor_file(self, key: bytes) -> Path:
        """The anchor of this folder under this key: named by a MAC of the folder's absolute path, so that
        only the device finds it, and a folder emptied of its records (the key kept) still finds it."""
        memo = (key, str(self.anchor_dir))
        path = self._folder.anchor_files.get(memo)
        if path is None:  # the folder's real path as this process first resolved it (its _Folder's identity)
            tag = hashlib.sha256(key + b"\x00fedpersona-anchor\x00" + self._folder.real.encode()).hexdigest()
            path = self._folder.anchor_files[memo] = self.anchor_dir / f"{tag[:32]}{ANCHOR_SUFFIX}"
        return path

    @property
    def anchor_path(self) -> Path | None:
        """This folder's anchor file (None while the device has no key yet)."""
        key = self._load_key(create=False)
        return None if key is None else self._anchor_file(key)

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"blob name must match {_NAME_RE.pattern} (letters, digits, '.', '_', '-'). You passed: name={name!r}"
            )

    def _journal_paths(self) -> list[Path]:
        return [self.state_dir / j for j in JOURNALS]

    def _v1_files(self) -> list[Path]:
        return sorted(p for p in self.state_dir.glob("*.enc") if p.name not in JOURNALS)

    # ------------------------------------------------------------------------------- key
    def _load_key(self, *, create: bool) -> bytes | None:
        if self._key is not None:
            return self._key
        path = self.key_path
        if not path.exists():
            if not create:
                return None
            self._create_key_file()
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise StateError(
                f"key file {path} has permissions {stat.S_IMODE(st.st_mode):04o}: it is accessible to the group or to "
                f"other users, so the device key may have leaked; refusing to use it. If it has not leaked, "
                f"restrict it with `chmod 600 {path}`."
            )
        try:
            self._key = _parse_hex_key(path.read_text(encoding="ascii"), f"key file {path}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"key file {path} is corrupt: {exc}") from None
        return self._key

    def prepare(self) -> None:
        """What a new folder's first commit does before it writes, done now: create the device key and the freshness
        anchor at generation 0. Nothing for a folder that holds state, has lost its key, or has an anchor already.
        A simulation prepares a cohort's new devices concurrently (:func:`prepare_stores`): their fsyncs overlap."""
        if any(p.exists() for p in self._journal_paths()) or self._v1_files():
            return
        if self._key is None and not self.key_path.exists():
            self._load_key(create=True)
        key = self._load_key(create=False)
        if key is None:
            return
        with self._locked(exclusive=True):
            if any(p.exists() for p in self._journal_paths()) or self._read_anchor(key) is not None:
                return
            self._write_anchor(key, _Anchor(secrets.token_bytes(16), 0, _ZERO_CHAIN), both=True)

    def _create_key_file(self) -> None:
        """Create the key file atomically, 0600: a reader never sees a partial key."""
        tmp = self.state_dir / f".{KEY_FILE}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, (secrets.token_bytes(32).hex() + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.key_path)  # fails if another process created it first
                logger.info("created device key %s", self.key_path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.state_dir)

    # ------------------------------------------------------------------------------ locks
    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with self._folder.lock:
            fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield
            finally:
                os.close(fd)

    def _txn(self) -> _Txn | None:
        return self._folder.txns.get(threading.get_ident())

    # ------------------------------------------------------------------------ encryption
    @staticmethod
    def _blob_aad(store_id: bytes, name: str, kind: str, gen: int) -> bytes:
        return (_FORMAT_TAG + b"\x00blob\x00" + store_id + name.encode() + b"\x00" + kind.encode()
                + gen.to_bytes(8, "big"))

    @staticmethod
    def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)

    @staticmethod
    def _open(key: bytes, data: bytes, aad: bytes) -> bytes:
        """Raises InvalidTag (or ValueError on a short input)."""
        if len(data) < _NONCE_BYTES + _TAG_BYTES:
            raise InvalidTag()
        return AESGCM(key).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], aad)

    # --------------------------------------------------------------------------- parsing
    def _ident(self) -> tuple:
        out = []
        for p in self._journal_paths():
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def _parse_journal(self, key: bytes, name: str) -> tuple[list[tuple[dict, int, int]], int]:
        """The valid records of one journal ``[(index, blob area offset, end)]`` and the end of the last one.

        What follows the valid records is ignored when it can be the trace of a crash: a torn last
        record, or an authentic record out of sequence (stale data of an earlier use of the file). A
        record that fails authentication *followed by more data* was tampered with: :class:`StateError`.
        """
        path = self.state_dir / name
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            return [], 0
        records: list[tuple[dict, int, int]] = []
        with fh:
            fd = fh.fileno()
            size = os.fstat(fd).st_size
            pos = 0
            while pos < size:
                head = os.pread(fd, _REC_HEAD.size, pos)
                problem, end, index = None, None, None
                if len(head) < _REC_HEAD.size:
                    problem = "a partial record head"
                else:
                    magic, idx_len, area_len = _REC_HEAD.unpack(head)
                    end = pos + _REC_HEAD.size + idx_len + area_len
                    if magic != _REC_MAGIC:
                        problem, end = "no record marker", None
                    elif end > size:
                        problem = "a record longer than the file"
                    else:
                        try:
                            plain = self._open(key, os.pread(fd, idx_len, pos + _REC_HEAD.size),
                                               _FORMAT_TAG + b"\x00index\x00" + head)
                            index = json.loads(plain)
                            if not isinstance(index, dict) or index.get("v") != 2:
                                raise ValueError("unexpected index layout")
                        except (InvalidTag, ValueError, UnicodeDecodeError):
                            problem = "a record that fails authentication"
                if problem is not None:
                    if end is not None and end < size:
                        raise StateError(
                            f"state file {path} is corrupt or was tampered with: {problem} at byte {pos}, followed by "
                            f"more data (failed authentication; a crash can only tear the last record)")
                    logger.warning("state file %s: ignoring %s at byte %d of %d (a commit torn by a crash)", path,
                                   problem, pos, size)
                    break
                stale = self._out_of_sequence(path, records, index)
                if stale:
                    logger.warning("state file %s: ignoring data from byte %d on (%s): left from an earlier use of "
                                   "the file", path, pos, stale)
                    break
                records.append((index, pos + _REC_HEAD.size + idx_len, end))
                pos = end
            # Only the last record can be torn (each earlier one was on disk before the next was written):
            # its blobs must all be there, or it is left out.
            if records and not self._blobs_intact(fd, records[-1]):
                index, area, end = records.pop()
                logger.warning("state file %s: ignoring its last commit (generation %s), whose data is incomplete "
                               "(a commit torn by a crash)", path, index.get("gen"))
                if records and not self._blobs_intact(fd, records[-1]):
                    raise StateError(f"state file {path} is corrupt or was tampered with: the data of generation "
                                     f"{records[-1][0].get('gen')} failed authentication")
        return records, (records[-1][2] if records else 0)

    @staticmethod
    def _blobs_intact(fd: int, record: tuple[dict, int, int]) -> bool:
        index, area, _ = record
        return all(hashlib.sha256(os.pread(fd, int(b[4]), area + int(b[3]))).hexdigest()[:32] == b[5]
                   for b in index["blobs"])

    @staticmethod
    def _out_of_sequence(path: Path, records: list, index: dict) -> str | None:
        """Why an authentic record cannot follow ``records`` (None if it can); a first record that is not a
        snapshot, or a malformed index, is tampering."""
        try:
            gen, blobs = int(index["gen"]), index["blobs"]
            if not isinstance(blobs, list) or not all(isinstance(b, list) and len(b) == 6 for b in blobs):
                raise ValueError("malformed blob list")
            if not records:
                if not index.get("snapshot"):
                    raise ValueError("the journal does not start with a snapshot")
                return None
            prev = records[-1][0]
            if gen != int(prev["gen"]) + 1 or index.get("snapshot") or index["store"] != prev["store"] \
                    or index["prev"] != prev["chain"]:
                return f"generation {gen} does not follow generation {prev['gen']}"
            return None
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state file {path} was tampered with: {exc}") from None

    def _build_state(self, key: bytes, name: str, records: list, end: int, ident: tuple) -> _State:
        path = self.state_dir / name
        first = records[0][0]
        try:
            state = _State(store_id=bytes.fromhex(first["store"]), journal=name, end=end, records=len(records),
                           ident=ident, key_id=hashlib.sha256(key).digest()[:8])
            state.history = {int(g): bytes.fromhex(c) for g, c in first.get("history", [])}
            prev = bytes.fromhex(first["prev"])
            for index, area, _ in records:
                gen = int(index["gen"])
                body = _body_bytes(index["store"], gen, bool(index.get("snapshot")), index["blobs"])
                chain = _chain(prev, gen, body)
                if chain.hex() != index["chain"]:
                    raise ValueError(f"chain digest of generation {gen}")
                for b_name, kind, b_gen, off, length, sha in index["blobs"]:
                    if kind not in _KIND_NAMES or not isinstance(b_name, str):
                        raise ValueError(f"blob {b_name!r}")
                    state.blobs[b_name] = _Blob(kind, int(b_gen), name, area + int(off), int(length), str(sha))
                state.gen, state.chain, prev = gen, chain, chain
                state.history[gen] = chain
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state file {path} was tampered with: {exc}") from None
        for g in sorted(state.history)[:-_HISTORY]:
            del state.history[g]
        return state

    def _scan(self, key: bytes, *, exclusive: bool) -> _State:
        ident = self._ident()
        best: tuple[list, int, str] | None = None
        failed: StateError | None = None
        for name in JOURNALS:
            try:
                records, end = self._parse_journal(key, name)
            except StateError as exc:
                # The other journal may hold the state (this one's data being superseded): the anchor then
                # decides whether that state is the newest; with no state at all, this error is the answer.
                logger.warning("%s", exc)
                failed = failed or exc
                continue
            if records and (best is None or int(records[-1][0]["gen"]) > int(best[0][-1][0]["gen"])):
                best = (records, end, name)
        if best is None and failed is not None:
            raise failed
        if best is None:
            written = [p.name for p in self._journal_paths() if p.exists() and p.stat().st_size > 0]
            anchor = self._read_anchor(key) if written else None
            if written and (anchor is None or anchor.gen > 0):
                # Data of which no record authenticates, and no anchor under this key (or one past the first
                # commit): not a first commit torn by a crash (its anchor is written before it, at generation 0),
                # but another key's state, or a tampered or replaced one.
                raise StateError(
                    f"state files {', '.join(written)} in {self.state_dir} failed authentication: they were modified, "
                    f"replaced, or encrypted under a different key than {self._key_source}")
            if self._v1_files():
                if not exclusive:
                    raise _NeedExclusive()
                self._convert_v1(key)
                return self._scan(key, exclusive=True)
            return _State(ident=ident, key_id=hashlib.sha256(key).digest()[:8])
        state = self._build_state(key, best[2], best[0], best[1], ident)
        if exclusive and self._v1_files():
            self._remove_v1()  # leftovers of a conversion that completed (its snapshot is on disk)
        return state

    def _current(self, key: bytes, *, exclusive: bool) -> _State:
        """The folder's state (parsed again only when a journal changed), checked against the local anchor.

        Call with the folder lock held (:meth:`_locked`).
        """
        cached = self._folder.state
        if cached is None or cached.ident != self._ident() or cached.key_id != hashlib.sha256(key).digest()[:8]:
            cached = self._scan(key, exclusive=exclusive)
            self._folder.state = cached
        self._check_anchor(key, cached)
        return cached

    def _refuse_if_broken(self) -> None:
        if self._folder.broken is not None:
            raise StateError(f"{self.state_dir}: an earlier commit could not be made durable ({self._folder.broken}); "
                             f"the folder is refused until the device restarts")

    def _with_state(self, fn, *, create_key: bool = False):
        """``fn(key, state)`` under the folder lock (shared; exclusive to convert an earlier layout)."""
        self._refuse_if_broken()
        key = self._load_key(create=create_key)
        if key is None:
            if any(p.exists() for p in self._journal_paths()) or self._v1_files():
                raise StateError(
                    f"the device key {self.key_path} is missing but {self.state_dir} holds encrypted state; "
                    f"without the key it cannot be read (and must not be silently replaced)"
                )
            return fn(None, _State())
        try:
            with self._locked(exclusive=False):
                return fn(key, self._current(key, exclusive=False))
        except _NeedExclusive:
            with self._locked(exclusive=True):
                return fn(key, self._current(key, exclusive=True))

    # ---------------------------------------------------------------------------- anchor
    def _read_anchor(self, key: bytes) -> _Anchor | None:
        """The newest valid slot of this folder's anchor file, or None (missing, or no slot authenticates)."""
        path = self._anchor_file(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the freshness anchor {path}: {exc}") from None
        best = None
        for slot in range(2):
            raw = data[slot * _ANCHOR_SLOT:(slot + 1) * _ANCHOR_SLOT]
            if len(raw) != _ANCHOR_SLOT or raw[:4] != _ANCHOR_MAGIC:
                continue
            try:
                plain = self._open(key, raw[4:], _FORMAT_TAG + b"\x00anchor\x00" + path.name.encode() + bytes([slot]))
                doc = json.loads(plain.rstrip(b" "))
                a = _Anchor(bytes.fromhex(doc["store"]), int(doc["gen"]), bytes.fromhex(doc["chain"]),
                            doc.get("refused"))
            except (InvalidTag, ValueError, KeyError, TypeError):
                continue
            if best is None or (a.gen, a.refused is not None) > (best.gen, best.refused is not None):
                best = a
        return best

    def _write_anchor(self, key: bytes, anchor: _Anchor, *, both: bool = False) -> None:
        """Write ``anchor`` into its generation's slot (``both``: into both) and fsync it: one fsync (and one of
        the anchor folder when the file is new)."""
        path = self._anchor_file(key)
        doc = {"store": anchor.store_id.hex(), "gen": anchor.gen, "chain": anchor.chain.hex()}
        if anchor.refused:
            doc["refused"] = anchor.refused[:300]

        def slot_bytes(slot: int) -> bytes:
            plain = json.dumps(doc, sort_keys=True).encode().ljust(_ANCHOR_PLAIN, b" ")
            aad = _FORMAT_TAG + b"\x00anchor\x00" + path.name.encode() + bytes([slot])
            return _ANCHOR_MAGIC + self._seal(key, plain, aad)

        created = not path.exists()
        if created:
            self.anchor_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if both:
                self._write_all(fd, slot_bytes(0) + slot_bytes(1), 0)
            else:
                self._write_all(fd, slot_bytes(anchor.gen % 2), (anchor.gen % 2) * _ANCHOR_SLOT)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.anchor_dir)
        self._folder.anchor_ok = None
        deferred = self._folder.deferred_anchor
        if deferred is not None and deferred[2].gen <= anchor.gen:
            self._folder.deferred_anchor = None  # written, or superseded by a newer anchor

    def _anchor_problem(self, state: _State, anchor: _Anchor | None) -> str | None:
        """Why ``state`` is older than (or forked from) ``anchor``; None if it is not."""
        if anchor is None:
            return None
        if anchor.refused:
            healed = (state.store_id == anchor.store_id and state.gen >= anchor.gen
                      and state.history.get(anchor.gen) == anchor.chain)
            if not healed:  # (the newest state put back: the refusal ends, the next commit rewrites the anchor)
                return f"refused since a rollback was detected: {anchor.refused}"
        if state.store_id is None:
            if anchor.gen > 0:
                return (f"the state folder holds no record but its anchor records generation {anchor.gen} (its records "
                        f"were deleted)")
            return None
        if anchor.store_id != state.store_id:
            return "the state folder holds another store than the one its anchor records (replaced)"
        if anchor.gen > state.gen:
            return f"the state holds generation {state.gen} but its anchor records generation {anchor.gen}"
        if anchor.gen in state.history and state.history[anchor.gen] != anchor.chain:
            return (f"the state's generation {anchor.gen} differs from the one its anchor recorded (a restored older "
                    f"copy that went on from there)")
        return None

    def _check_anchor(self, key: bytes, state: _State) -> None:
        path = self._anchor_file(key)
        try:
            st = path.stat()
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        memo = (sig, state.store_id, state.gen, state.chain)
        if self._folder.anchor_ok == memo:
            return
        anchor = self._read_anchor(key) if sig is not None else None
        if anchor is None and state.gen > 0:
            self._note(("anchor-missing", state.gen), event="anchor-missing", generation=state.gen, anchor=str(path))
        reason = self._anchor_problem(state, anchor)
        if reason is not None:
            if not (anchor and anchor.refused):
                self._note(("rollback", "anchor", anchor.gen, state.gen), event="rollback-detected", source="anchor",
                           generation=state.gen, anchored=anchor.gen)
            logger.error("%s: rollback detected: %s; refusing it", self.state_dir, reason)
            raise RollbackDetected(f"{self.state_dir} was rolled back: {reason}; refusing an older copy (it would hand "
                                   f"back spent privacy budget and answered unmask requests)")
        self._folder.anchor_ok = memo

    def _note(self, once: tuple, *, event: str, **fields) -> None:
        """A freshness event: logged, warned (anchor missing) and appended to ``freshness.jsonl`` (once per process)."""
        if once in self._folder.noted:
            return
        self._folder.noted.add(once)
        if event == "anchor-missing":
            text = (f"the freshness anchor of {self.state_dir} ({fields.get('anchor')}) is missing or unreadable while "
                    f"the state holds generation {fields.get('generation')}: it is re-created at the next commit; until "
                    f"then only the server's receipt can show a restored older copy of this folder")
            logger.warning("%s", text)
            warnings.warn(text, stacklevel=5)
        entry = {"v": 1, "time": _now(), "event": event, **fields}
        try:
            fd = os.open(self.state_dir / FRESHNESS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error("%s: could not record the freshness event %s: %s", self.state_dir, event, exc)

    # ----------------------------------------------------------------------------- reads
    def _read_blob(self, key: bytes, state: _State, name: str, b: _Blob) -> bytes:
        path = self.state_dir / b.journal
        try:
            with open(path, "rb") as fh:
                data = os.pread(fh.fileno(), b.length, b.offset)
        except OSError as exc:
            raise StateError(f"cannot read state file {path}: {exc}") from None
        if len(data) != b.length or hashlib.sha256(data).hexdigest()[:32] != b.sha:
            raise StateError(f"blob '{name}' in state file {path} failed authentication: it was modified or truncated")
        try:
            return self._open(key, data, self._blob_aad(state.store_id, name, b.kind, b.gen))
        except InvalidTag:
            raise StateError(f"blob '{name}' in state file {path} failed authentication: it was modified, or "
                             f"encrypted under a different key than {self._key_source}") from None

    def _overlay(self) -> dict[str, tuple[str, bytes]]:
        """The writes not committed yet that this thread sees: its transaction's, else the deferred ones."""
        txn = self._txn()
        return txn.writes if txn is not None else self._folder.pending

    def _load(self, name: str, kind: str) -> bytes | None:
        self._check_name(name)
        overlay = self._overlay()
        if name in overlay:
            got, payload = overlay[name]
        else:
            def read(key, state):
                b = state.blobs.get(name)
                if b is None:
                    return None
                return b.kind, self._read_blob(key, state, name, b)

            found = self._with_state(read)
            if found is None:
                return None
            got, payload = found
        if got != kind:
            raise StateError(f"blob '{name}' in {self.state_dir} holds {_KIND_NAMES[got]}, not {_KIND_NAMES[kind]}")
        return payload

    def exists(self, name: str) -> bool:
        """Whether blob ``name`` holds a value (saved in this transaction, deferred, or committed)."""
        self._check_name(name)
        if name in self._overlay():
            return True
        return bool(self._with_state(lambda key, state: name in state.blobs))

    def names(self) -> list[str]:
        """Every blob name with a value."""
        names = set(self._with_state(lambda key, state: list(state.blobs)))
        names.update(self._overlay())
        return sorted(names)

    @property
    def generation(self) -> int:
        """The newest committed generation (0: nothing committed yet)."""
        return int(self._with_state(lambda key, state: state.gen))

    # ---------------------------------------------------------------------------- writes
    def _save(self, name: str, kind: str, payload: bytes) -> None:
        self._check_name(name)
        txn = self._txn()
        if txn is not None:
            txn.writes[name] = (kind, payload)
            return
        self._commit({name: (kind, payload)}, base_gen=None)
        self._folder.pending.pop(name, None)  # a deferred older value must not overwrite it later

    @contextmanager
    def transaction(self, *, defer: bool = False) -> Iterator["DeviceStore"]:
        """Gather every save on this folder (from any :class:`DeviceStore` of this thread) into one commit.

        Loads inside see the saves made so far. The commit happens when the block ends normally: one
        record, two fsyncs; nothing is written when the block raises. A blob that another process
        committed after the transaction began and that the transaction also writes fails the commit
        (:class:`StateError`; nothing written). A transaction inside another joins it.

        ``defer``: the saves are not committed at the end but kept (in this process) for the next
        transaction on the folder, which commits them with its own; loads see them meanwhile. For
        work done ahead of a message that belongs to that message's commit (a simulation's cohort
        engine builds and plans the devices before their train requests arrive): only what can be
        recomputed if the process stops first (a cache, a derived profile, the plan's bookkeeping).
        """
        tid = threading.get_ident()
        if tid in self._folder.txns:
            yield self
            return
        base = self._with_state(lambda key, state: state)
        txn = _Txn(base)
        txn.writes.update(self._folder.pending)
        self._folder.txns[tid] = txn
        try:
            yield self
            if defer:
                self._folder.pending = dict(txn.writes)
            elif txn.writes:
                self._commit(txn.writes, base_gen=base.gen)
                self._folder.pending = {}
        finally:
            self._folder.txns.pop(tid, None)

    def _commit(self, writes: dict[str, tuple[str, bytes]], *, base_gen: int | None) -> None:
        self._refuse_if_broken()
        key = self._load_key(create=True)
        with self._locked(exclusive=True):
            state = self._current(key, exclusive=True)
            if base_gen is not None:
                changed = sorted(n for n in writes if n in state.blobs and state.blobs[n].gen > base_gen)
                if changed:
                    raise StateError(f"{self.state_dir}: {', '.join(changed)} changed in another process during this "
                                     f"transaction; nothing was committed")
            self._append(key, state, writes)
        logger.debug("committed %s to %s (generation %d)", ", ".join(sorted(writes)), self.state_dir,
                     self._folder.state.gen if self._folder.state else -1)

    def _needs_snapshot(self, state: _State, writes: dict) -> bool:
        if state.journal is None:
            return True
        live = sum(b.length for n, b in state.blobs.items() if n not in writes)
        return state.records >= _COMPACT_RECORDS or state.end - live > max(live, _COMPACT_SLACK)

    def _append(self, key: bytes, state: _State, writes: dict[str, tuple[str, bytes]]) -> None:
        """Write one record (a delta to the active journal, or a snapshot to the other), then the anchor."""
        creating = state.store_id is None
        group = _group()  # a group commit of this thread: fsyncs and the anchor wait for its flush
        anchor = self._read_anchor(key)
        # A folder prepared ahead (:meth:`prepare`) has its anchor at generation 0 on disk already: its first commit
        # takes that anchor's store id and need not write it again.
        prepared = creating and anchor is not None and anchor.gen == 0 and not anchor.refused
        store_id = state.store_id or (anchor.store_id if prepared else secrets.token_bytes(16))
        gen = state.gen + 1
        snapshot = self._needs_snapshot(state, writes)
        target = state.journal if not snapshot else (JOURNALS[1] if state.journal == JOURNALS[0] else JOURNALS[0])
        entries: list[list] = []
        parts: list[bytes] = []
        off = 0
        if snapshot:  # carry every live blob not overwritten, verbatim (its own generation and tag)
            for name, b in sorted(state.blobs.items()):
                if name in writes:
                    continue
                ct = self._read_blob_bytes(state, name, b)
                entries.append([name, b.kind, b.gen, off, b.length, b.sha])
                parts.append(ct)
                off += b.length
        for name, (kind, payload) in sorted(writes.items()):
            ct = self._seal(key, payload, self._blob_aad(store_id, name, kind, gen))
            entries.append([name, kind, gen, off, len(ct), hashlib.sha256(ct).hexdigest()[:32]])
            parts.append(ct)
            off += len(ct)
        body = _body_bytes(store_id.hex(), gen, snapshot, entries)
        chain = _chain(state.chain, gen, body)
        index = {"v": 2, "store": store_id.hex(), "gen": gen, "snapshot": snapshot, "blobs": entries,
                 "prev": state.chain.hex(), "chain": chain.hex()}
        if snapshot:
            hist = {**state.history, gen: chain}
            index["history"] = [[g, hist[g].hex()] for g in sorted(hist)[-_HISTORY:]]
        plain = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
        head = _REC_HEAD.pack(_REC_MAGIC, _NONCE_BYTES + len(plain) + _TAG_BYTES, off)
        record = head + self._seal(key, plain, _FORMAT_TAG + b"\x00index\x00" + head) + b"".join(parts)

        if creating:
            problem = self._anchor_problem(state, anchor)
            if problem is not None:
                raise RollbackDetected(f"{self.state_dir} was rolled back: {problem}; refusing to start it afresh")
            # The anchor exists (generation 0, both slots) before the first record: a crash in between leaves an
            # anchor behind the state (accepted), never a state without its anchor.
            if not prepared:
                self._write_anchor(key, _Anchor(store_id, 0, _ZERO_CHAIN), both=True)
        path = self.state_dir / target
        if snapshot:
            created = not path.exists()
            for other in (p for p in self._journal_paths() if p != path and not p.exists()):
                # Both journals exist from the start: a later snapshot never creates a file (no folder fsync).
                os.close(os.open(other, os.O_WRONLY | os.O_CREAT, 0o600))
                created = True
            # The folder's first record may wait for a group's flush: its anchor (generation 0) is on disk already,
            # so a crash that loses the record leaves a first commit torn, accepted. A later snapshot may not: the
            # active journal is emptied below, once the snapshot is on disk.
            defer = group is not None and creating and not self._v1_files()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self._write_all(fd, record, 0)
                if defer:
                    group._journal(self, path, folder=self.state_dir if created else None)
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if created and not defer:
                _fsync_dir(self.state_dir)
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                if os.fstat(fd).st_size != state.end:
                    os.ftruncate(fd, state.end)  # a torn record of an earlier crash
                self._write_all(fd, record, state.end)
                if group is None:
                    os.fsync(fd)
                else:
                    group._journal(self, path)  # fsynced at the group's flush, before the anchor is written
            finally:
                os.close(fd)
        if anchor is None and not creating:
            self._note(("anchor-recreated", gen), event="anchor-recreated", generation=gen,
                       anchor=str(self._anchor_file(key)))
        if group is None:
            self._write_anchor(key, _Anchor(store_id, gen, chain))
        else:  # an anchor behind its state is accepted (a crash between the two): written at the flush
            group._anchor(self, key, _Anchor(store_id, gen, chain))

        # The new state, as a scan would find it.
        area = len(record) - off  # where the blob area starts in the record
        new = _State(store_id=store_id, gen=gen, chain=chain, journal=target,
                     history={**state.history, gen: chain}, key_id=hashlib.sha256(key).digest()[:8])
        if not snapshot:
            new.blobs = dict(state.blobs)
            new.records = state.records + 1
            new.end = state.end + len(record)
            base = state.end + area
        else:
            new.records = 1
            new.end = len(record)
            base = area
        for name, kind, b_gen, b_off, length, sha in entries:
            new.blobs[name] = _Blob(kind, b_gen, target, base + b_off, length, sha)
        for g in sorted(new.history)[:-_HISTORY]:
            del new.history[g]
        if snapshot and state.journal is not None:
            old = self.state_dir / state.journal
            try:
                os.truncate(old, 0)  # its data lives on in the snapshot; no fsync needed (stale data is ignored)
            except OSError as exc:
                logger.warning("could not empty %s: %s", old, exc)
        if snapshot and self._v1_files():
            self._remove_v1()
        new.ident = self._ident()
        self._folder.state = new

    def _read_blob_bytes(self, state: _State, name: str, b: _Blob) -> bytes:
        with open(self.state_dir / b.journal, "rb") as fh:
            data = os.pread(fh.fileno(), b.length, b.offset)
        if len(data) != b.length or hashlib.sha256(data).hexdigest()[:32] != b.sha:
            raise StateError(f"blob '{name}' in state file {self.state_dir / b.journal} failed authentication: it was "
                             f"modified or truncated")
        return data

    @staticmethod
    def _write_all(fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    # ------------------------------------------------------------------ receipts (server-kept anchor)
    def receipt(self) -> bytes | None:
        """The freshness receipt of the newest commit (None before the first): store id, generation and
        chain digest, encrypted and authenticated under the device key. Only this device can read or make
        one; the server keeps it and sends it back (:mod:`fedpersona.client.freshness`)."""
        def make(key, state):
            if key is None or state.store_id is None:
                return None
            return self._seal(key, _RECEIPT.pack(state.store_id, state.gen, state.chain), _FORMAT_TAG + b"\x00receipt")

        return self._with_state(make)

    def check_receipt(self, receipt: bytes) -> bool:
        """Check a receipt the server sent back against this state; False if it proves nothing (ignored).

        Raises :class:`RollbackDetected` when the receipt shows a newer commit than the state holds, or
        the state's commit of that generation differs (an older copy restored, then used): the local
        anchor is then marked refused, so the refusal persists even if the server stops sending it.
        A receipt of an older generation is accepted: it proves nothing newer than the state. One that
        does not authenticate under this device's key, or of another store, is ignored with a warning.
        """
        txn = self._txn()

        def check(key, state):
            if key is None:
                return False, None
            if txn is not None:
                state = txn.base
            try:
                sid, gen, chain = _RECEIPT.unpack(self._open(key, bytes(receipt), _FORMAT_TAG + b"\x00receipt"))
            except (InvalidTag, ValueError, struct.error, TypeError):
                logger.warning("%s: the freshness receipt sent with this request does not authenticate under this "
                               "device's key (another device's, or made up); ignored", self.state_dir)
                return False, None
            if state.store_id is None:
                return False, (state, sid, gen, chain, f"the state folder holds no record but the server holds a "
                                                       f"receipt of generation {gen} made under this device's key")
            if sid != state.store_id:
                logger.warning("%s: the freshness receipt sent with this request is of another store under this key "
                               "(the folder was reset); ignored", self.state_dir)
                return False, None
            if gen > state.gen:
                return False, (state, sid, gen, chain, f"the state holds generation {state.gen} but the server's "
                                                       f"receipt shows generation {gen}")
            known = state.history.get(gen)
            if known is not None and known != chain:
                return False, (state, sid, gen, chain, f"the state's generation {gen} differs from the one the "
                                                       f"server's receipt shows (a restored older copy that went on)")
            return True, None

        ok, bad = self._with_state(check)
        if bad is None:
            return ok
        state, sid, gen, chain, reason = bad
        key = self._load_key(create=False)
        with self._locked(exclusive=True):
            current = self._read_anchor(key)
            if current is not None and current.gen > gen:
                sid, gen, chain = current.store_id, current.gen, current.chain
            self._write_anchor(key, _Anchor(sid, gen, chain, refused=reason), both=True)
        self._note(("rollback", "receipt", gen, state.gen), event="rollback-detected", source="receipt",
                   generation=state.gen, anchored=gen)
        logger.error("%s: rollback detected: %s; refusing it", self.state_dir, reason)
        raise RollbackDetected(f"{self.state_dir} was rolled back: {reason}; refusing an older copy (it would hand "
                               f"back spent privacy budget and answered unmask requests)")

    # --------------------------------------------------------------- the earlier layout (conversion)
    def _convert_v1(self, key: bytes) -> None:
        """Read every blob of the earlier layout with its checks, and commit them all as the first snapshot."""
        manifest_path = self.state_dir / _V1_MANIFEST
        blob_files = [p for p in self._v1_files() if p.name != _V1_MANIFEST]
        if not manifest_path.exists():
            raise StateError(
                f"the manifest {manifest_path} is missing but state files exist in {self.state_dir} "
                f"({', '.join(p.name for p in blob_files)}): it was deleted; refusing to continue, since "
                f"blobs deleted along with it (the privacy ledger) could not be detected and the device would "
                f"start with a fresh privacy budget"
            )
        _, payload = self._v1_decrypt(key, manifest_path, "manifest")
        try:
            doc = json.loads(payload.decode("utf-8"))
            manifest = {str(k): int(v) for k, v in doc["blobs"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise StateError(f"manifest {manifest_path} is corrupt: {exc}") from None
        writes: dict[str, tuple[str, bytes]] = {}
        for name, recorded in sorted(manifest.items()):
            path = self.state_dir / f"{name}.enc"
            if not path.exists():
                raise StateError(f"blob '{name}' ({path}) was deleted; refusing to start with a fresh privacy budget "
                                 f"(the manifest records that it was written, generation {recorded})")
            kind = None
            for k in (_KIND_TEXT, _KIND_TENSORS):
                try:
                    gen, data = self._v1_decrypt(key, path, k)
                    kind = k
                    break
                except _V1WrongKind:
                    continue
            if gen < recorded:
                raise StateError(f"state file {path} was rolled back: it holds generation {gen} but generation "
                                 f"{recorded} was written; refusing an older copy (it would hand back spent privacy budget)")
            writes[name] = (kind, data)
        logger.info("%s: converting %d blob(s) from the earlier one-file-per-blob layout", self.state_dir, len(writes))
        self._append(key, _State(), writes)
        self._remove_v1()

    def _v1_decrypt(self, key: bytes, path: Path, kind: str) -> tuple[int, bytes]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read state file {path}: {exc}") from None
        if len(data) < 4 + _NONCE_BYTES + _TAG_BYTES + _V1_HEADER.size or data[:4] != _V1_MAGIC:
            raise StateError(f"state file {path} is truncated or corrupt")
        try:
            plain = AESGCM(key).decrypt(data[4:16], data[16:], _V1_TAG + b"\x00" + path.name.encode())
        except InvalidTag:
            raise StateError(f"state file {path} failed authentication: it was modified, truncated, renamed from "
                             f"another name, or encrypted under a different key than {self._key_source}") from None
        got, gen = _V1_HEADER.unpack_from(plain)
        if _V1_KINDS.get(got) != kind:
            raise _V1WrongKind()
        return gen, plain[_V1_HEADER.size:]

    def _remove_v1(self) -> None:
        files = self._v1_files()
        for p in sorted(files, key=lambda p: p.name == _V1_MANIFEST):  # the manifest last
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------ typed access
    def save_text(self, name: str, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str. You passed: {type(text).__name__}")
        self._save(name, _KIND_TEXT, text.encode("utf-8"))

    def tag(self, name: str) -> str | None:
        """A tag of blob ``name`` as committed (the store, the commit that wrote it, its ciphertext's digest): it
        changes whenever the blob is written. None when the blob is absent or written in a transaction not
        committed yet. A caller caches what it derives from a blob under its tag, without decrypting it again."""
        self._check_name(name)
        if name in self._overlay():
            return None

        def read(key, state):
            b = state.blobs.get(name)
            return None if b is None else f"{(state.store_id or b'').hex()}:{b.gen}:{b.sha}"

        return self._with_state(read)

    def load_text(self, name: str) -> str | None:
        payload = self._load(name, _KIND_TEXT)
        if payload is None:
            return None
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError(f"blob '{name}' in {self.state_dir} does not hold UTF-8 text: {exc}") from None

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise TypeError("tensors must be a dict[str, torch.Tensor]")
        # Own contiguous CPU copies: safetensors refuses views and tensors sharing storage.
        payload = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
        self._save(name, _KIND_TENSORS, payload)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        payload = self._load(name, _KIND_TENSORS)
        if payload is None:
            return None
        try:
            return dict(st_load(payload))
        except Exception as exc:  # safetensors raises its own error types
            raise StateError(f"blob '{name}' in {self.state_dir} does not hold valid safetensors data: {exc}") from None

    def __repr__(self) -> str:
        return f"DeviceStore({str(self.state_dir)!r})"


class _V1WrongKind(Exception):
    pass
