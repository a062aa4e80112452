"""Deployment credentials (``fedpersona certs``): a small CA, the SuperLink's TLS certificate, SuperNode key pairs,
and the devices' identities for secure aggregation.

Built on ``cryptography`` only. What Flower 1.41 expects, checked against its source:

* ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key``:
  PEM files; every client (SuperNodes, ``flwr``) verifies the server against ``ca.crt``, so the
  certificate must name the address they dial in its subject alternative names (``IP:127.0.0.1`` and
  ``DNS:localhost`` always, plus each ``--san``).
* ``flower-supernode --auth-supernode-private-key supernodes/<name>``: an **OpenSSH** private key
  of a NIST elliptic curve (``load_ssh_private_key``; we use P-384, as Flower's docs do).
* ``flwr supernode register supernodes/<name>.pub <connection>``: the matching **OpenSSH public key**
  line (``ecdsa-sha2-nistp384 AAAA... <name>``); the SuperLink, started with
  ``--enable-supernode-auth``, admits only registered keys.

* The **identity root** (:mod:`fedpersona.identity`): an Ed25519 key pair that certifies each device's
  identity. Devices check every other device's keys against it before they mask against them or
  count its signature (secure aggregation against a malicious server, ``docs/secagg.md``); the
  server never holds its private key. Keep ``identity-root.key`` offline with ``ca.key``.

Layout written under ``out_dir`` (mode 0700)::

    ca.crt  ca.key                     the CA (keep ca.key offline once certificates are issued)
    superlink.crt  superlink.key       the SuperLink's TLS certificate (signed by the CA) and key
    supernodes/<name>  <name>.pub      one EC key pair per SuperNode
    identity-root.key  .pub            the identity root (keep identity-root.key offline)
    identities/<name>.json             device <name>'s identity (its key pair + the root's certificate);
                                       goes to that device only, as <state-dir>/identity.json

Private keys are written 0600 (owner only), atomically, never overwritten unless ``force``;
certificates and public keys 0644 (they are meant to be copied to other hosts). Re-running with the
same folder keeps what exists and adds what is missing (more SuperNodes, say); a new ``--san``
re-issues only the SuperLink certificate, from the existing CA.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpersona.identity import ROOT_KEY_FILE, DeviceIdentity, IdentityError, IdentityRoot

__all__ = ["Credentials", "make_credentials", "make_supernode_key", "parse_san", "DEFAULT_SANS"]

logger = logging.getLogger(__name__)

DEFAULT_SANS = ("IP:127.0.0.1", "DNS:localhost")
CURVE = ec.SECP384R1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


@dataclass
class Credentials:
    """Paths of everything :func:`make_credentials` wrote (or found)."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (private, public)
    created: list[Path] = field(default_factory=list)
    identity_root: Path | None = None                                          # the root's private key (offline)
    identities: dict[str, Path] = field(default_factory=dict)                 # name -> the device's identity file


def parse_san(text: str) -> x509.GeneralName:
    """``IP:10.0.0.5`` / ``DNS:link.example.org`` (a bare IP or host name is accepted too)."""
    kind, sep, value = text.partition(":")
    if not sep or kind.upper() not in ("IP", "DNS"):
        kind, value = ("IP", text) if _is_ip(text) else ("DNS", text)
    value = value.strip()
    if kind.upper() == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"Invalid --san {text!r}: {value!r} is not an IP address") from None
    if not value or not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})", value):
        raise ValueError(f"Invalid --san {text!r}: {value!r} is not a DNS name")
    return x509.DNSName(value)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _write(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Atomic write with ``mode`` from the start (no window where a key is world-readable)."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to replace it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen a private key
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpersona"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)  # tolerate small clock skew


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = _name("fedpersona CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now()).not_valid_after(_now() + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[x509.GeneralName], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpersona SuperLink")).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now()).not_valid_after(_now() + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_key(private_path: Path, *, comment: str = "", force: bool = False) -> tuple[Path, Path]:
    """An OpenSSH EC P-384 key pair: ``private_path`` (0600) and ``private_path + '.pub'``."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path = private_path.with_name(private_path.name + ".pub")
    _write(private_path, private, _PRIVATE_MODE, force=force)
    _write(public_path, public + (b" " + comment.encode() if comment else b"") + b"\n", _PUBLIC_MODE, force=force)
    return private_path, public_path


def _sans_of(cert: x509.Certificate) -> set[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {f"IP:{n.value}" if isinstance(n, x509.IPAddress) else f"DNS:{n.value}" for n in names}


def make_credentials(
    out_dir: str | os.PathLike,
    *,
    supernodes: list[str] = (),  # type: ignore[assignment]
    sans: list[str] = (),  # type: ignore[assignment]
    days: int = 365,
    force: bool = False,
) -> Credentials:
    """Create (or complete) the credentials folder; see the module docstring for the layout.

    Args:
        out_dir: the folder (created 0700).
        supernodes: names of SuperNode key pairs to have (``supernodes/<name>``).
        sans: extra subject alternative names of the SuperLink certificate (``IP:..`` / ``DNS:..``).
        days: validity of new certificates.
        force: replace existing files instead of keeping them.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1. You passed: {days}")
    for name in supernodes:
        if not _NAME_RE.match(name):
            raise ValueError(f"SuperNode name must match {_NAME_RE.pattern}. You passed: {name!r}")
    san_names: list[x509.GeneralName] = []
    for text in (*DEFAULT_SANS, *sans):
        general = parse_san(text)
        if general not in san_names:
            san_names.append(general)
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    creds = Credentials(out, out / "ca.crt", out / "ca.key", out / "superlink.crt", out / "superlink.key")

    if force or not (creds.ca_cert.exists() and creds.ca_key.exists()):
        if creds.ca_cert.exists() != creds.ca_key.exists() and not force:
            raise ValueError(f"{out} holds only one of ca.crt / ca.key; remove it or pass --force")
        ca_key, ca_cert = _make_ca(days)
        _write(creds.ca_key, _pem_key(ca_key), _PRIVATE_MODE, force=True)
        _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE, force=True)
        creds.created += [creds.ca_cert, creds.ca_key]
        force_server = True
    else:
        ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{creds.ca_key} is not an EC private key")
        force_server = force

    wanted = {f"IP:{n.value}" if isinstance(n, x509.IPAddress) else f"DNS:{n.value}" for n in san_names}
    reissue = force_server or not (creds.server_cert.exists() and creds.server_key.exists())
    if not reissue:
        existing = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
        reissue = not wanted <= _sans_of(existing) or existing.issuer != ca_cert.subject
    if reissue:
        server_key, server_cert = _make_server_cert(ca_key, ca_cert, san_names, days)
        _write(creds.server_key, _pem_key(server_key), _PRIVATE_MODE, force=True)
        _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE, force=True)
        creds.created += [creds.server_cert, creds.server_key]

    node_dir = out / "supernodes"
    if supernodes:
        node_dir.mkdir(mode=0o700, exist_ok=True)
    for name in supernodes:
        private = node_dir / name
        public = node_dir / f"{name}.pub"
        if force or not (private.exists() and public.exists()):
            make_supernode_key(private, comment=name, force=True)
            creds.created += [private, public]
        creds.supernode_keys[name] = (private, public)
    if node_dir.is_dir():  # report every key pair present, not only the ones asked for
        for pub in sorted(node_dir.glob("*.pub")):
            creds.supernode_keys.setdefault(pub.name[:-4], (pub.with_suffix(""), pub))
    _identities(creds, out, supernodes, force=force)
    logger.info("credentials in %s: %d file(s) created", out, len(creds.created))
    return creds


def _identities(creds: Credentials, out: Path, supernodes, *, force: bool) -> None:
    """The identity root (kept) and one identity per SuperNode name, re-issued when missing or from another root."""
    root_key = out / ROOT_KEY_FILE
    fresh = force or not root_key.exists()
    if fresh:
        IdentityRoot().save(root_key, force=True)
        creds.created += [root_key, root_key.with_suffix(".pub")]
    root = IdentityRoot.load(root_key)
    creds.identity_root = root_key
    ident_dir = out / "identities"
    if supernodes:
        ident_dir.mkdir(mode=0o700, exist_ok=True)
    for name in supernodes:
        path = ident_dir / f"{name}.json"
        keep = False
        if path.exists() and not fresh:
            try:
                keep = DeviceIdentity.load(path).root == root.public
            except IdentityError:
                keep = False
        if not keep:
            root.issue().save(path, force=True)
            creds.created.append(path)
        creds.identities[name] = path
    if ident_dir.is_dir():
        for path in sorted(ident_dir.glob("*.json")):
            creds.identities.setdefault(path.stem, path)


# ----------------------------------------------------------------------------------- SuperNode launcher
