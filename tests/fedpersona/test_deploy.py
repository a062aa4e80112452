"""Deployment credentials and the SuperNode launcher's pieces (fast; the real deployment is in tests/deploy)."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedpersona.client import supernode
from fedpersona import certs
from fedpersona.cli import main as cli_main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {f"IP:{n.value}" if isinstance(n, x509.IPAddress) else f"DNS:{n.value}" for n in ext}


def test_credentials_layout_permissions_and_chain(tmp_path):
    out = tmp_path / "creds"
    creds = certs.make_credentials(out, supernodes=["alice", "bob"], sans=["IP:10.0.0.5", "DNS:link.example.org"])
    assert _mode(out) == 0o700 and _mode(out / "supernodes") == 0o700
    for private in (creds.ca_key, creds.server_key, out / "supernodes" / "alice", out / "supernodes" / "bob"):
        assert _mode(private) == 0o600, private
    for public in (creds.ca_cert, creds.server_cert, out / "supernodes" / "alice.pub"):
        assert _mode(public) == 0o644, public

    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert _sans(server) == {"IP:127.0.0.1", "DNS:localhost", "IP:10.0.0.5", "DNS:link.example.org"}


def test_supernode_keys_are_openssh_ec_pairs(tmp_path):
    creds = certs.make_credentials(tmp_path, supernodes=["alice"])
    private_path, public_path = creds.supernode_keys["alice"]
    private = load_ssh_private_key(private_path.read_bytes(), None)  # what flower-supernode loads
    public = load_ssh_public_key(public_path.read_bytes())  # what `flwr supernode register` loads
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ") and public_path.read_text().rstrip().endswith(" alice")


def test_rerun_keeps_what_exists_and_adds_what_is_missing(tmp_path):
    certs.make_credentials(tmp_path, supernodes=["alice"])
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    creds = certs.make_credentials(tmp_path, supernodes=["alice", "bob"])
    assert {p.name for p in creds.created} == {"bob", "bob.pub", "bob.json"}  # bob's key pair and identity
    assert all((tmp_path / rel).read_bytes() == b for rel, b in before.items())
    # a new SAN re-issues only the SuperLink certificate, from the same CA
    creds = certs.make_credentials(tmp_path, sans=["DNS:new.example.org"])
    assert {p.name for p in creds.created} == {"superlink.crt", "superlink.key"}
    assert creds.ca_cert.read_bytes() == before[Path("ca.crt")]
    assert "DNS:new.example.org" in _sans(x509.load_pem_x509_certificate(creds.server_cert.read_bytes()))
    assert set(creds.supernode_keys) == {"alice", "bob"}


def test_each_device_gets_an_identity_certified_by_an_offline_root(tmp_path):
    """The identity root signs each device's identity; the files are private; a new root re-issues them."""
    from fedpersona.identity import DeviceIdentity, IdentityRoot, verify_certificate

    creds = certs.make_credentials(tmp_path, supernodes=["alice", "bob"])
    root = IdentityRoot.load(creds.identity_root)
    assert _mode(creds.identity_root) == 0o600 and _mode(tmp_path / "identities") == 0o700
    alice, bob = (DeviceIdentity.load(creds.identities[n]) for n in ("alice", "bob"))
    for ident, name in ((alice, "alice"), (bob, "bob")):
        assert _mode(creds.identities[name]) == 0o600
        assert ident.root == root.public and verify_certificate(root.public, ident.public, ident.certificate)
        assert name.encode() not in creds.identities[name].read_bytes(), "no name in what travels"
    assert alice.public != bob.public
    again = certs.make_credentials(tmp_path, supernodes=["alice", "bob"])
    assert DeviceIdentity.load(again.identities["alice"]).public == alice.public  # kept
    forced = certs.make_credentials(tmp_path, supernodes=["alice"], force=True)
    renewed = DeviceIdentity.load(forced.identities["alice"])
    assert renewed.root != root.public and renewed.public != alice.public


@pytest.mark.parametrize("bad", ["IP:300.1.1.1", "DNS:", "DNS:bad name"])
def test_invalid_san_is_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="Invalid --san"):
        certs.make_credentials(tmp_path, sans=[bad])


def test_invalid_supernode_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="SuperNode name"):
        certs.make_credentials(tmp_path, supernodes=["../evil"])


def test_bare_san_values():
    assert certs.parse_san("10.1.2.3") == x509.IPAddress(ipaddress.ip_address("10.1.2.3"))
    assert certs.parse_san("link.example.org") == x509.DNSName("link.example.org")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_handshake_with_the_issued_certificate(tmp_path, host):
    """Python's ssl (what uvicorn and httpx use) accepts the chain for both default names."""
    creds = certs.make_credentials(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    client_ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(5))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
    finally:
        t.join(5)
        listener.close()


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(tmp_path):
    creds = certs.make_credentials(tmp_path)
    ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(listener.getsockname()) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname="other.example.org")
    finally:
        t.join(5)
        listener.close()


def test_certs_command(tmp_path, capsys):
    assert cli_main(["certs", "--out", str(tmp_path / "c"), "--supernodes", "2", "--san", "IP:10.0.0.7"]) == 0
    out = capsys.readouterr().out
    assert "supernode-0" in out and "supernode-1" in out
    assert (tmp_path / "c" / "supernodes" / "supernode-1.pub").is_file()


# --------------------------------------------------------------------------------------- launcher parts
def test_supernode_argv_secure_by_default(tmp_path):
    argv = supernode.supernode_argv(superlink="h:1", node_config="x='y'", runtime_port=9100,
                                 root_certificates=tmp_path / "ca.crt", auth_key=tmp_path / "k")
    assert "--insecure" not in argv
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "k")
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[argv.index("--host") + 1] == "127.0.0.1", "the device's Runtime API stays on loopback"
    with pytest.raises(ValueError, match="--insecure"):
        supernode.supernode_argv(superlink="h:1", node_config="", runtime_port=1)
    insecure = supernode.supernode_argv(superlink="h:1", node_config="", runtime_port=1, insecure=True, warm=False)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure and "--isolation" not in insecure


def test_node_config_arg_parses_back_with_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    text = supernode.node_config_arg(data_dir=tmp_path / "my data", state_dir=tmp_path / "st", user_id="HAMLET (Hamlet)")
    parsed = parse_config_args([text])
    assert parsed == {"data-dir": str(tmp_path / "my data"), "state-dir": str(tmp_path / "st"),
                      "user-id": "HAMLET (Hamlet)"}
    with pytest.raises(ValueError, match="single quote"):
        supernode.node_config_arg(data_dir="it's", state_dir="s")


def test_check_device_names_the_bad_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"cue": "hi", "reply": "well met"}\n')
    assert supernode.check_device(data, tmp_path / "state") == 1
    assert _mode(tmp_path / "state") == 0o700
    (data / "b.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"b\.jsonl: the file has no record"):
        supernode.check_device(data, tmp_path / "state")


def test_supernode_cli_refuses_a_bad_data_folder_before_starting(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.jsonl").write_text("")
    code = cli_main(["supernode", "--superlink", "127.0.0.1:1", "--insecure", "--data-dir", str(data),
                     "--state-dir", str(tmp_path / "s")])
    assert code == 2
    assert "empty.jsonl: the file has no record" in capsys.readouterr().err


def test_supernode_process_restarts_only_on_connection_errors():
    exit_305 = [sys.executable, "-c", "print('Exit Code: 305'); raise SystemExit(1)"]
    node = supernode._SuperNodeProcess(exit_305, {}, max_restarts=2, backoff=0.05)
    seen = 0
    deadline = time.monotonic() + 30
    while node.alive() and time.monotonic() < deadline:
        seen += 1
        time.sleep(0.02)
    assert node.restarts == 2 and node.returncode == 1 and seen > 0
    other = supernode._SuperNodeProcess([sys.executable, "-c", "print('Exit Code: 604'); raise SystemExit(1)"], {},
                                     max_restarts=None)
    other.proc.wait()
    assert not other.alive() and other.returncode == 1 and other.restarts == 0


def test_supernode_argv_with_a_shorter_poll_runs_flower_through_the_shim():
    argv = supernode.supernode_argv(superlink="h:1", node_config="", runtime_port=1, insecure=True, poll_interval=1.0)
    assert argv[:5] == [sys.executable, "-m", "fedpersona.flower_patches", "flower-supernode-poll", "1.0"]
    assert argv[5:7] == ["--superlink", "h:1"]
    plain = supernode.supernode_argv(superlink="h:1", node_config="", runtime_port=1, insecure=True)
    assert Path(plain[0]).name == "flower-supernode"


def test_flower_tools_come_from_this_interpreters_environment(monkeypatch):
    # `.venv/bin/python -m pytest` without an activated venv: its console scripts are not on PATH
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = supernode.tool_env()
    scripts = str(Path(sys.executable).parent)
    assert env["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    assert supernode.tool_env({"PATH": scripts + os.pathsep + "/x"})["PATH"] == scripts + os.pathsep + "/x"
    tool = Path(supernode.flower_tool("flower-superlink"))
    assert tool.parent == Path(scripts) and os.access(tool, os.X_OK)
    assert supernode.flower_tool("no-such-tool") == "no-such-tool"
