"""Deployment credentials: a small CA, the SuperLink's TLS certificate, SuperNode key pairs.

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

Layout written under ``out_dir`` (mode 0700)::

    ca.crt  ca.key                     the CA (keep ca.key offline once certificates are issued)
    superlink.crt  superlink.key       the SuperLink's TLS certificate (signed by the CA) and key
    supernodes/<name>  <name>.pub      one EC key pair per SuperNode

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Credentials", "make_credentials", "make_supernode_key", "parse_san", "DEFAULT_SANS"]

logger = logging.getLogger(__name__)

DEFAULT_SANS = ("IP:127.0.0.1", "DNS:localhost")
CURVE = ec.SECP384R1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
FLOWER_IDLE_POLL = 3.0  # flower-supernode sleeps this long after an empty pull (hard-coded in flwr 1.41)


def tool_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this interpreter's scripts folder first on ``PATH``.

    ``flower-superlink``, ``flower-supernode`` and ``flwr`` are console scripts of the environment that
    runs fedpersona; started as ``.venv/bin/python -m ...`` without an activated environment, they are
    not on ``PATH``, and Flower's own children (``flower-superexec``, ``flwr-clientapp``) are looked up
    there too.
    """
    env = dict(os.environ if env is None else env)
    scripts = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != scripts]
    env["PATH"] = os.pathsep.join([scripts, *parts])
    return env


def flower_tool(name: str) -> str:
    """Full path of one of Flower's console scripts in this environment, or ``name`` if it has none."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else name


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
    logger.info("credentials in %s: %d file(s) created", out, len(creds.created))
    return creds


# ----------------------------------------------------------------------------------- SuperNode launcher
def _quoted(key: str, value: str) -> str:
    if "'" in value or "\n" in value:
        raise ValueError(f"node-config value for {key!r} cannot contain a single quote or a newline. You passed: {value!r}")
    return f"{key}='{value}'"


def node_config_arg(*, data_dir: str | os.PathLike, state_dir: str | os.PathLike, user_id: str | None = None) -> str:
    """The ``--node-config`` string of a fedpersona device (absolute paths; TOML literal strings)."""
    parts = [_quoted("data-dir", str(Path(data_dir).expanduser().resolve())),
             _quoted("state-dir", str(Path(state_dir).expanduser().resolve()))]
    if user_id:
        parts.append(_quoted("user-id", user_id))
    return " ".join(parts)


def supernode_argv(
    *,
    superlink: str,
    node_config: str,
    runtime_port: int,
    root_certificates: str | os.PathLike | None = None,
    auth_key: str | os.PathLike | None = None,
    insecure: bool = False,
    warm: bool = True,
    max_retries: int | None = None,
    poll_interval: float = FLOWER_IDLE_POLL,
) -> list[str]:
    """``flower-supernode`` command line: TLS + SuperNode authentication unless ``insecure``.

    ``warm`` uses ``--isolation process``: the SuperNode starts no ClientApp process itself; a warm
    worker (:mod:`client.worker`) must serve its Runtime API on ``127.0.0.1:runtime_port``.
    """
    argv = [flower_tool("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port), "--node-config", node_config]
    if warm:
        argv += ["--isolation", "process"]
    if insecure:
        argv.append("--insecure")
    else:
        if not root_certificates or not auth_key:
            raise ValueError("A SuperNode needs --root-certificates (the CA) and --auth-key (its private key); "
                             "or pass --insecure, which turns TLS and authentication off")
        argv += ["--root-certificates", str(Path(root_certificates).expanduser().resolve()),
                 "--auth-supernode-private-key", str(Path(auth_key).expanduser().resolve())]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if poll_interval < FLOWER_IDLE_POLL:
        argv = [sys.executable, "-m", "fedpersona.deploy", "flower-supernode-poll", str(poll_interval), *argv[1:]]
    return argv


INSECURE_WARNING = (
    "INSECURE MODE: TLS and SuperNode authentication are OFF. Anyone on the network can read the "
    "model updates and the run configuration, and any process can join the federation as a device. "
    "Use it only on a trusted loopback interface, for debugging."
)


def check_device(data_dir: str | os.PathLike, state_dir: str | os.PathLike) -> int:
    """Fail fast, before joining: the data folder must parse (the error names the file) and the state
    folder must be usable (created 0700). Returns the number of examples."""
    from client.data import read_user_folder

    pairs = read_user_folder(data_dir)
    state = Path(state_dir).expanduser()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(state, os.W_OK):
        raise ValueError(f"State folder {str(state)!r} is not writable")
    return len(pairs)


def run_supernode(
    *,
    superlink: str,
    data_dir: str,
    state_dir: str,
    user_id: str | None = None,
    root_certificates: str | None = None,
    auth_key: str | None = None,
    insecure: bool = False,
    runtime_port: int = 9094,
    warm: bool = True,
    poll_interval: float = 0.1,
    max_retries: int | None = None,
    supernode_poll: float = 1.0,
) -> int:
    """Run one device: ``flower-supernode`` as a child process plus the warm ClientApp worker in this one.

    Returns the exit status. Stopping this process (SIGTERM / Ctrl-C) stops the SuperNode too; killing
    it with SIGKILL does not, so supervise the whole process group (``kill -- -PGID``).
    """
    import signal
    import warnings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    if insecure:
        warnings.warn(INSECURE_WARNING, stacklevel=2)
        logger.warning(INSECURE_WARNING)
    n = check_device(data_dir, state_dir)
    logger.info("device data %s: %d examples; state in %s", data_dir, n, state_dir)
    argv = supernode_argv(
        superlink=superlink, node_config=node_config_arg(data_dir=data_dir, state_dir=state_dir, user_id=user_id),
        runtime_port=runtime_port, root_certificates=root_certificates, auth_key=auth_key, insecure=insecure,
        warm=warm, max_retries=max_retries, poll_interval=supernode_poll,
    )
    env = tool_env()
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    node = _SuperNodeProcess(argv, env, max_restarts=max_retries)

    def _term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    try:
        if not warm:
            while node.alive():
                time.sleep(0.5)
            return node.returncode or 0
        from client.worker import Worker

        worker = Worker(f"127.0.0.1:{runtime_port}", poll_interval=poll_interval)
        worker.serve(alive=node.alive)
        if node.returncode is not None:
            logger.error("flower-supernode exited with status %s", node.returncode)
            return node.returncode or 1
        return 0
    finally:
        node.stop()


CONNECTION_ERROR = "Exit Code: 305"  # flwr ExitCode.SUPERNODE_CONNECTION_ERROR (the process exits with 1)


class _SuperNodeProcess:
    """``flower-supernode`` as a child process (its output forwarded), restarted after a connection error.

    Flower retries a failed connection, but a refused *activation* ends the SuperNode (``Exit Code:
    305``, ``[code: 2004] Failed to activate SuperNode``): its key is not registered, or the SuperLink
    still holds the node's previous session, as after a crash (it drops it after two missed heartbeats,
    about a minute). Restarts stop after ``max_restarts`` (when given) or ``retry_for`` seconds.
    """

    def __init__(self, argv: list[str], env: dict[str, str], *, max_restarts: int | None,
                 retry_for: float = 300.0, backoff: float = 5.0) -> None:
        self.argv, self.env = argv, env
        self.max_restarts, self.backoff = max_restarts, backoff
        self.deadline = time.monotonic() + retry_for
        self.restarts = 0
        self.returncode: int | None = None
        self._restart_at: float | None = None
        self._start()

    def _start(self) -> None:
        import subprocess
        import threading

        self.connection_error = False
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._forwarder = threading.Thread(target=self._forward, args=(self.proc,), daemon=True)
        self._forwarder.start()
        logger.info("started %s (pid %d)", " ".join(self.argv), self.proc.pid)

    def _forward(self, proc) -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            if CONNECTION_ERROR in line:
                self.connection_error = True
            sys.stdout.write(line)
            sys.stdout.flush()

    def alive(self) -> bool:
        """True while the SuperNode runs or will be restarted; False once it is gone for good."""
        if self._restart_at is not None:
            if time.monotonic() >= self._restart_at:
                self._restart_at = None
                self._start()
            return True
        code = self.proc.poll()
        if code is None:
            return True
        self._forwarder.join(2.0)  # its last lines
        budget = self.max_restarts is None or self.restarts < self.max_restarts
        if self.connection_error and budget and time.monotonic() < self.deadline:
            self.restarts += 1
            logger.warning("flower-supernode could not join the SuperLink (Exit Code %d). If it says `[code: 2004] "
                           "Failed to activate SuperNode`: its key is not registered (`flwr supernode register`), "
                           "or its previous session has not expired yet (after a crash: about a minute). "
                           "Retrying in %.0f s (attempt %d)", 305, self.backoff, self.restarts)
            self._restart_at = time.monotonic() + self.backoff
            return True
        if self.connection_error:
            logger.error("flower-supernode could not join the SuperLink; giving up. Check the address, the CA "
                         "(--root-certificates) and that this device's key is registered (`flwr supernode list`)")
        self.returncode = code
        return False

    def stop(self) -> None:
        import subprocess

        self._restart_at = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------- SuperNode polling interval
def flower_supernode_with_poll(poll_interval: float, argv: list[str]) -> None:
    """Run ``flower-supernode`` (``argv`` = its arguments) with a shorter idle poll than Flower's 3 s.

    Flower 1.41's SuperNode sleeps 3 s after every pull that brought no message, and 0.5 s between
    checks for the ClientApp's reply: up to 3.5 s added to every message stage, three stages a round
    under secure aggregation. This caps those sleeps at ``poll_interval`` by giving
    ``flwr.supernode.start_client_internal`` a ``time`` module whose ``sleep`` is capped; if the
    installed Flower is laid out differently, it warns and runs unchanged. Each SuperNode then asks the
    SuperLink for messages every ``poll_interval`` seconds when idle, instead of every 3 s. It also
    shortens the SuperNode's object-pull backoff (:mod:`fedpersona.flower_patches`).
    """
    import types
    import warnings

    import flwr.supernode.start_client_internal as sci

    if isinstance(getattr(sci, "time", None), types.ModuleType) and sci.time.__name__ == "time":
        real = sci.time
        capped = types.ModuleType("time")
        capped.__dict__.update(real.__dict__)
        capped.sleep = lambda seconds: real.sleep(min(seconds, poll_interval))
        sci.time = capped
    else:
        warnings.warn("this Flower's SuperNode has no module-level `time`; its poll interval stays at 3 s", stacklevel=2)
    from fedpersona.flower_patches import shorten_pull_backoff

    if not shorten_pull_backoff(sci):
        warnings.warn("this Flower's SuperNode has no `pull_objects(initial_backoff=...)`; object pulls keep "
                      "Flower's 1-10 s backoff", stacklevel=2)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "flower-supernode-poll":
        flower_supernode_with_poll(float(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit("usage: python -m fedpersona.deploy flower-supernode-poll SECONDS [flower-supernode args]")
