"""Device identities the server cannot forge: an operator's Ed25519 root, device certificates, signatures.

Secure aggregation against a malicious server needs each device to know that the public keys it masks
against, and the signatures it counts in the consistency check, belong to *real devices*, not to keys
the server generated (:mod:`fedpersona.privacy.secagg.spec`). That needs a trust root the server does not hold:

* **The identity root** (:class:`IdentityRoot`): an Ed25519 key pair of the operator.
  ``fedpersona certs`` writes it as ``identity-root.key`` (keep it offline, like ``ca.key``) and
  ``identity-root.pub``; a simulation makes one per run where it provisions its simulated devices
  (:func:`provision`). Nothing on the server's code path ever reads the private half.
* **A device identity** (:class:`DeviceIdentity`): the device's own Ed25519 key pair and a
  *certificate*, the root's signature over ``("identity-cert", root public key, identity public key)``.
  It carries no name and no user id: it travels to the server and to other devices. It lives in one
  JSON file, mode 0600, that the device reads from its node config's ``identity`` (a path) or, by
  default, ``<state-dir>/identity.json``. The file also names the root the device trusts.
* The device signs, with its identity key, a **binding** of its per-run keys to its node id
  (:func:`fedpersona.privacy.secagg.spec.binding_message`); every other device checks the certificate against
  its own root and the binding against the certificate before it masks against those keys.

:func:`verify` caches its results (a pure function of public key, signature and message), so a
certificate or binding seen again in a later round or by another device of the same process costs a
dictionary lookup.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["IDENTITY_FILE", "NODE_CONFIG_KEY", "PUBLIC_BYTES", "ROOT_KEY_FILE", "ROOT_PUB_FILE", "SIGNATURE_BYTES",
           "DeviceIdentity", "IdentityError", "IdentityRoot", "certificate_message", "identity_path",
           "load_device_identity", "provision", "public_bytes", "verify", "verify_certificate"]

logger = logging.getLogger(__name__)

PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64
#: The device's identity file in its state folder (unless its node config names another path).
IDENTITY_FILE = "identity.json"
#: Node-config key naming the device's identity file.
NODE_CONFIG_KEY = "identity"
ROOT_KEY_FILE = "identity-root.key"
ROOT_PUB_FILE = "identity-root.pub"
_DOMAIN = b"fedpersona/identity/v1"
_VERSION = 1


class IdentityError(ValueError):
    """An identity file, root or certificate is missing, malformed, or does not verify."""


def _encode(label: str, *fields: bytes) -> bytes:
    out = [_DOMAIN, b"|", struct.pack(">H", len(label)), label.encode()]
    for f in fields:
        out += [struct.pack(">I", len(f)), bytes(f)]
    return b"".join(out)


def certificate_message(root_public: bytes, identity_public: bytes) -> bytes:
    """What the root signs to certify an identity: the two public keys, nothing else (no name, no user id)."""
    return _encode("identity-cert", root_public, identity_public)


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@functools.lru_cache(maxsize=1 << 16)
def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message`` (cached; malformed inputs: False)."""
    if not (isinstance(public, bytes) and isinstance(signature, bytes) and isinstance(message, bytes)):
        return False
    if len(public) != PUBLIC_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def verify_certificate(root_public: bytes, identity_public: bytes, certificate: bytes) -> bool:
    """Whether ``certificate`` is the root's certificate of ``identity_public``."""
    return verify(bytes(root_public), bytes(certificate), certificate_message(bytes(root_public), bytes(identity_public)))


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """Atomic write, mode 0600 from the start; never replaces an existing file unless ``force``."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_private_file(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise IdentityError(f"identity file {path} has permissions {stat.S_IMODE(st.st_mode):04o}: it holds a private "
                            f"key and is accessible to the group or to other users; restrict it with `chmod 600 {path}`")


class IdentityRoot:
    """The operator's Ed25519 root: certifies device identities (keep the private key offline)."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        self.public = public_bytes(self._key)

    def certify(self, identity_public: bytes) -> bytes:
        """The certificate (root signature) of an identity public key."""
        if len(identity_public) != PUBLIC_BYTES:
            raise IdentityError(f"an identity public key has {PUBLIC_BYTES} bytes. You passed: {len(identity_public)}")
        return self._key.sign(certificate_message(self.public, bytes(identity_public)))

    def issue(self) -> "DeviceIdentity":
        """A fresh device identity (key pair + certificate) under this root."""
        key = Ed25519PrivateKey.generate()
        return DeviceIdentity(key, root=self.public, certificate=self.certify(public_bytes(key)))

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """The private key as PKCS#8 PEM (mode 0600) and the public key beside it (``.pub``, PEM)."""
        p = Path(path)
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        _write_private(p, pem, force=force)
        pub = p.with_suffix(".pub")
        pub.write_bytes(self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
        os.chmod(pub, 0o644)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IdentityRoot":
        p = Path(path)
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"cannot read the identity root {p}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"the identity root {p} is not an Ed25519 private key")
        return cls(key)


class DeviceIdentity:
    """A device's identity key pair, its certificate, and the root it trusts (see the module docstring)."""

    def __init__(self, key: Ed25519PrivateKey, *, root: bytes, certificate: bytes) -> None:
        self._key = key
        self.public = public_bytes(key)
        self.root = bytes(root)
        self.certificate = bytes(certificate)
        if not verify_certificate(self.root, self.public, self.certificate):
            raise IdentityError("the identity's certificate does not verify under the root it names")

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def to_json(self) -> str:
        return json.dumps({"version": _VERSION, "root": self.root.hex(), "identity": self.public.hex(),
                           "certificate": self.certificate.hex(), "key": _private_bytes(self._key).hex()},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, what: str = "identity") -> "DeviceIdentity":
        try:
            doc = json.loads(text)
            if doc.get("version") != _VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {_VERSION}")
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(doc["key"]))
            ident = cls(key, root=bytes.fromhex(doc["root"]), certificate=bytes.fromhex(doc["certificate"]))
        except IdentityError as exc:
            raise IdentityError(f"{what}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IdentityError(f"{what} is malformed: {type(exc).__name__}: {exc}") from None
        if doc.get("identity") not in (None, ident.public.hex()):
            raise IdentityError(f"{what}: its public key does not match its private key")
        return ident

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        p = Path(path)
        _write_private(p, self.to_json().encode(), force=force)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeviceIdentity":
        p = Path(path)
        _check_private_file(p)
        return _load_cached(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _load_cached(path: str, mtime_ns: int) -> DeviceIdentity:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {path}: {exc}") from None
    return DeviceIdentity.from_json(text, what=f"identity file {path}")


def identity_path(state_dir: str | os.PathLike, node_config: Mapping[str, Any] | None = None) -> Path:
    """Where a device's identity file is: node config ``identity``, else ``<state_dir>/identity.json``."""
    value = (node_config or {}).get(NODE_CONFIG_KEY)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"node config '{NODE_CONFIG_KEY}' must be a path to the device's identity file. "
                         f"You passed: {value!r}")
    return Path(value).expanduser() if value else Path(state_dir) / IDENTITY_FILE


def load_device_identity(state_dir: str | os.PathLike, node_config: Mapping[str, Any] | None = None
                         ) -> DeviceIdentity | None:
    """The device's identity, or None when it has none (``IdentityError`` when its file is unusable)."""
    path = identity_path(state_dir, node_config)
    if not path.exists():
        if (node_config or {}).get(NODE_CONFIG_KEY):
            raise IdentityError(f"node config '{NODE_CONFIG_KEY}' names {path}, which does not exist")
        return None
    return DeviceIdentity.load(path)


def provision(state_dirs: Iterable[str | os.PathLike], root_path: str | os.PathLike) -> IdentityRoot:
    """Give each device folder an identity under the root at ``root_path`` (created there if absent).

    For simulations and tests, where one process plays every device: a folder whose identity file
    already holds a valid identity of this root keeps it; any other gets a fresh one. Returns the root.
    """
    rp = Path(root_path)
    root = IdentityRoot.load(rp) if rp.exists() else None
    if root is None:
        root = IdentityRoot()
        root.save(rp)
        logger.info("created the identity root %s", rp)
    n = 0
    for folder in state_dirs:
        path = Path(folder) / IDENTITY_FILE
        if path.exists():
            try:
                if DeviceIdentity.load(path).root == root.public:
                    continue
            except IdentityError:
                pass
        Path(folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        root.issue().save(path, force=True)
        n += 1
    logger.debug("issued %d device identities under %s", n, rp)
    return root
