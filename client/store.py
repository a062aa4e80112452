"""The device's own state folder, encrypted at rest.

It holds the personal head (tensors), the privacy ledger (JSON text) and other small
named blobs. Every file is written atomically (temporary file in the same folder,
fsync, ``os.replace``, fsync of the folder) and encrypted with AES-256-GCM under the
device key, with a fresh random 96-bit nonce per write. The associated data binds each
ciphertext to its file name and to this format, so a file copied or renamed over
another name fails to decrypt.

Layout of ``state_dir``::

    device.key        the key (64 hex characters), mode 0600, unless given otherwise
    _manifest.enc     authenticated list of every blob ever written, with its generation
    <name>.enc        one blob per name
    .lock             advisory lock serialising writers

The key is, in order: the ``key`` argument, the ``FEDPERSONA_DEVICE_KEY`` environment
variable (64 hex characters), or ``device.key`` (created on the first write).

Why a manifest: deleting the ledger file must not hand the device a fresh privacy
budget. The manifest records every blob that was ever written and the generation of its
latest write; a blob that the manifest lists but whose file is missing, a blob older
than the manifest says (a restored backup), or a missing manifest next to existing
blobs, is refused with :class:`StateError`. (Deleting the whole folder, key included,
cannot be detected on the device alone; the server side must track that.)

File format: ``MAGIC (4 bytes) | nonce (12 bytes) | AES-GCM(plaintext) (+16-byte tag)``,
plaintext ``kind (1 byte) | generation (8 bytes, big endian) | payload``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import stat
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["DeviceStore", "StateError", "KEY_ENV", "KEY_FILE"]

logger = logging.getLogger(__name__)

KEY_ENV = "FEDPERSONA_DEVICE_KEY"
KEY_FILE = "device.key"
MANIFEST_FILE = "_manifest.enc"
LOCK_FILE = ".lock"
SUFFIX = ".enc"

_MAGIC = b"FPS1"
_FORMAT_TAG = b"fedpersona-device-store/v1"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER = struct.Struct(">cQ")  # kind, generation
_KIND_TEXT, _KIND_TENSORS, _KIND_MANIFEST = b"S", b"T", b"M"
_KIND_NAMES = {_KIND_TEXT: "text", _KIND_TENSORS: "tensors", _KIND_MANIFEST: "manifest"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StateError(RuntimeError):
    """The device state cannot be used: corrupt, tampered, under another key, deleted or rolled back."""


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


class DeviceStore:
    """Encrypted, atomically written, deletion-evident key-value store in ``state_dir``.

    Args:
        state_dir: the device's state folder (created, mode 0700, if missing).
        key: 32-byte AES key; else ``$FEDPERSONA_DEVICE_KEY``; else ``state_dir/device.key``.
    """

    def __init__(self, state_dir: str | os.PathLike, *, key: bytes | None = None) -> None:
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

    # ----------------------------------------------------------------------------- paths
    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / MANIFEST_FILE

    def path(self, name: str) -> Path:
        """The file that holds blob ``name``."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"blob name must match {_NAME_RE.pattern} (letters, digits, '.', '_', '-'). You passed: name={name!r}"
            )
        return self.state_dir / f"{name}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def _blob_files(self) -> list[Path]:
        return sorted(p for p in self.state_dir.glob(f"*{SUFFIX}") if p.name != MANIFEST_FILE)

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

    # ------------------------------------------------------------------------ encryption
    @staticmethod
    def _aad(filename: str) -> bytes:
        return _FORMAT_TAG + b"\x00" + filename.encode("utf-8")

    def _encrypt(self, key: bytes, filename: str, kind: bytes, generation: int, payload: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        plaintext = _HEADER.pack(kind, generation) + payload
        return _MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, self._aad(filename))

    def _decrypt(self, key: bytes, path: Path, kind: bytes) -> tuple[int, bytes]:
        """Read and authenticate ``path``; returns (generation, payload). Never modifies the file."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read state file {path}: {exc}") from None
        minimum = len(_MAGIC) + _NONCE_BYTES + _TAG_BYTES + _HEADER.size
        if len(data) < minimum:
            raise StateError(f"state file {path} is truncated: {len(data)} bytes, a valid file has at least {minimum}")
        if data[: len(_MAGIC)] != _MAGIC:
            raise StateError(f"state file {path} is corrupt: it does not start with the store's format marker")
        nonce = data[len(_MAGIC) : len(_MAGIC) + _NONCE_BYTES]
        try:
            plaintext = AESGCM(key).decrypt(nonce, data[len(_MAGIC) + _NONCE_BYTES :], self._aad(path.name))
        except InvalidTag:
            raise StateError(
                f"state file {path} failed authentication: it was modified, truncated, renamed from another "
                f"name, or encrypted under a different key than {self._key_source}"
            ) from None
        got_kind, generation = _HEADER.unpack_from(plaintext)
        if got_kind != kind:
            raise StateError(
                f"state file {path} holds {_KIND_NAMES.get(got_kind, repr(got_kind))}, not {_KIND_NAMES[kind]}"
            )
        return generation, plaintext[_HEADER.size :]

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.state_dir)

    # -------------------------------------------------------------------------- manifest
    def _read_manifest(self, key: bytes) -> dict[str, int] | None:
        if not self.manifest_path.exists():
            return None
        _, payload = self._decrypt(key, self.manifest_path, _KIND_MANIFEST)
        try:
            doc = json.loads(payload.decode("utf-8"))
            blobs = doc["blobs"]
            if doc.get("version") != 1 or not isinstance(blobs, dict):
                raise ValueError("unexpected layout")
            return {str(k): int(v) for k, v in blobs.items()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise StateError(f"manifest {self.manifest_path} is corrupt: {exc}") from None

    def _write_manifest(self, key: bytes, blobs: dict[str, int]) -> None:
        payload = json.dumps({"version": 1, "blobs": blobs}, sort_keys=True).encode("utf-8")
        self._write_atomic(self.manifest_path, self._encrypt(key, MANIFEST_FILE, _KIND_MANIFEST, 0, payload))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------ save / load
    def _save(self, name: str, kind: bytes, payload: bytes) -> None:
        path = self.path(name)
        with self._locked():
            key = self._load_key(create=True)
            manifest = self._read_manifest(key)
            if manifest is None:
                if self._blob_files():
                    self._refuse_missing_manifest()
                # Write the (empty) manifest before the first blob: a crash in between
                # leaves a state that still loads.
                manifest = {}
                self._write_manifest(key, manifest)
            generation = manifest.get(name, 0) + 1
            if path.exists():
                # Never go backwards: a blob newer than the manifest (a crash between the two writes).
                generation = max(generation, self._decrypt(key, path, kind)[0] + 1)
            # Blob first, then manifest: after a crash in between the blob is one generation
            # ahead of the manifest, which loads; the reverse order would look like a rollback.
            self._write_atomic(path, self._encrypt(key, path.name, kind, generation, payload))
            manifest[name] = generation
            self._write_manifest(key, manifest)
        logger.debug("saved %s (generation %d, %d bytes)", path, generation, len(payload))

    def _refuse_missing_manifest(self) -> None:
        raise StateError(
            f"the manifest {self.manifest_path} is missing but state files exist in {self.state_dir} "
            f"({', '.join(p.name for p in self._blob_files())}): it was deleted; refusing to continue, since "
            f"blobs deleted along with it (the privacy ledger) could not be detected and the device would "
            f"start with a fresh privacy budget"
        )

    def _load(self, name: str, kind: bytes) -> bytes | None:
        path = self.path(name)
        key = self._load_key(create=False)
        if key is None:
            if self.manifest_path.exists() or self._blob_files():
                raise StateError(
                    f"the device key {self.key_path} is missing but {self.state_dir} holds encrypted state; "
                    f"without the key it cannot be read (and must not be silently replaced)"
                )
            return None  # a fresh folder
        manifest = self._read_manifest(key)
        if manifest is None and self._blob_files():
            self._refuse_missing_manifest()
        recorded = (manifest or {}).get(name, 0)
        if not path.exists():
            if recorded:
                what = "ledger" if "ledger" in name else "blob"
                raise StateError(
                    f"{what} '{name}' ({path}) was deleted; refusing to start with a fresh privacy budget "
                    f"(the manifest records that it was written, generation {recorded})"
                )
            return None
        generation, payload = self._decrypt(key, path, kind)
        if generation < recorded:
            raise StateError(
                f"state file {path} was rolled back: it holds generation {generation} but generation {recorded} "
                f"was written; refusing an older copy (it would hand back spent privacy budget)"
            )
        return payload

    def save_text(self, name: str, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str. You passed: {type(text).__name__}")
        self._save(name, _KIND_TEXT, text.encode("utf-8"))

    def load_text(self, name: str) -> str | None:
        payload = self._load(name, _KIND_TEXT)
        if payload is None:
            return None
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError(f"state file {self.path(name)} does not hold UTF-8 text: {exc}") from None

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
            raise StateError(f"state file {self.path(name)} does not hold valid safetensors data: {exc}") from None

    def __repr__(self) -> str:
        return f"DeviceStore({str(self.state_dir)!r})"
