"""Issue 20, hole 3: the deployment's SuperLink was open to anyone holding the (public) CA certificate.

The rehearsal of docs/deployment.md on 127.0.0.1 (:class:`fedpersona.simulations.deploy.federation.LocalFederation`:
credentials, the SuperLink with TLS and SuperNode authentication, and whatever the guide puts on the
address the devices dial). The attacker holds only ``ca.crt`` and that address, as anyone on the network
would, and uses the stock ``flwr`` CLI from a home folder of its own. On main (cb416a4) that address was
the SuperLink itself, whose Control API has no authentication in Flower 1.41: the attacker listed the
nodes, registered a node key of its own and ``flwr run`` its own app, whose ServerApp wrote a file on the
server host. Now the address is the Fleet gateway: each of the three fails, nothing is registered, no
run exists, no file is written; the SuperLink listens on the loopback interface only; and the operator,
on the server host, still does all three.

The rehearsal starts processes (~30 s on 2 idle cores: ``slow``); the fast checks below hold the same
commands in the default suite: the guide's and the README's command lines, the rehearsal's flags (the
gateway's filter itself: ``tests/server/test_gateway.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from fedpersona.client.supernode import flower_tool
from fedpersona.certs import make_supernode_key
from fedpersona.simulations.deploy.federation import CONNECTION, LocalFederation
from fedpersona.simulations.processes import listening, process_tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]

EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evil:app"
clientapp = "evil:client"

[tool.flwr.app.config]
marker = "{marker}"
"""

EVIL_APP = """\
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    Path(context.run_config["marker"]).write_text("code of the attacker's choosing ran on the server host")
"""


def _evil_app(root: Path, marker: Path) -> Path:
    app = root / "evil-app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(EVIL_PYPROJECT.format(marker=marker))
    (app / "evil.py").write_text(EVIL_APP)
    return app


def _flwr(fed: LocalFederation, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([flower_tool("flwr"), *args], env=fed.env(home, COLUMNS="200"), cwd=home,
                          capture_output=True, text=True, timeout=180)


def _commands(doc: Path) -> list[str]:
    """The shell commands of a Markdown file's ``bash`` blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if cmd:
                out.append(" ".join(cmd.split()))
    return out


def _value(cmd: str, flag: str) -> str:
    words = cmd.split()
    return words[words.index(flag) + 1]


@pytest.mark.parametrize("doc", ["docs/deployment.md", "README.md"])
def test_the_guides_commands_put_only_the_fleet_api_on_the_network(doc):
    cmds = _commands(REPO / doc)
    links = [c for c in cmds if c.startswith("flower-superlink ")]
    gateways = [c for c in cmds if c.startswith("python -m fedpersona.server.gateway ")]
    devices = [c for c in cmds if c.startswith("fedpersona supernode ") and "--superlink" in c]
    assert links and gateways and devices, (links, gateways, devices)
    for c in links:
        assert "0.0.0.0" not in c and ("--host" not in c or _value(c, "--host") == "127.0.0.1"), c
    link_ports = {_value(c, "--port") for c in links if "--port" in c}
    for g in gateways:
        if "--insecure" in g:
            continue
        assert _value(g, "--superlink").startswith("127.0.0.1:"), g
        assert _value(g, "--superlink").rpartition(":")[2] in link_ports, (g, link_ports)
        dialled = {_value(d, "--superlink").rpartition(":")[2] for d in devices}
        assert dialled == {_value(g, "--listen").rpartition(":")[2]}, "devices dial the gateway, nothing else"
        assert not dialled & link_ports
    if doc == "docs/deployment.md":  # the operator's connection: the SuperLink's loopback port
        (address,) = re.findall(r'^address = "([^"]+)"', (REPO / doc).read_text(), flags=re.M)
        assert address.startswith("127.0.0.1:") and address.rpartition(":")[2] in link_ports


def test_the_rehearsal_runs_the_guides_commands(tmp_path):
    fed = LocalFederation(tmp_path)
    link, gateway = fed.superlink_argv(), fed.gateway_argv()
    assert _value(" ".join(link), "--host") == "127.0.0.1" and _value(" ".join(link), "--port") == str(fed.link_port)
    assert "--enable-supernode-auth" in link and "--insecure" not in link and "--ssl-certfile" in link
    assert gateway[1:3] == ["-m", "fedpersona.server.gateway"] and "--insecure" not in gateway
    assert _value(" ".join(gateway), "--listen") == fed.address
    assert _value(" ".join(gateway), "--superlink") == fed.control_address
    assert fed.address != fed.control_address
    assert f'address = "{fed.control_address}"' in fed.write_connection().read_text(), "the operator: on the host"


@pytest.mark.slow
def test_the_ca_certificate_opens_nothing_but_the_fleet_api(tmp_path):
    marker = tmp_path / "pwned.txt"
    with LocalFederation(tmp_path / "deploy") as fed:
        fed.credentials(["device-0"])
        fed.start_superlink()
        # The attacker: the CA certificate (public: every device has it), the address devices dial, its own key.
        mallory = tmp_path / "mallory"
        (mallory / "keys").mkdir(parents=True)
        (mallory / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{fed.address}"\n'
            f'root-certificates = "{fed.creds_dir / "ca.crt"}"\n')
        key, pub = make_supernode_key(mallory / "keys" / "mallory", comment="mallory")
        app = _evil_app(mallory, marker)

        listed = _flwr(fed, mallory, "supernode", "list", CONNECTION, "--format", "json")
        registered = _flwr(fed, mallory, "supernode", "register", str(pub), CONNECTION, "--format", "json")
        started = _flwr(fed, mallory, "run", str(app), CONNECTION, "--format", "json")
        for what, cp in (("list nodes", listed), ("register a key", registered), ("start a run", started)):
            assert cp.returncode != 0 or '"success": false' in cp.stdout, \
                f"with the CA certificate only, the attacker could {what}:\n{cp.stdout}\n{cp.stderr}"
        time.sleep(3.0)  # a run started despite all would have its ServerApp write the marker by now
        assert not marker.exists(), "the attacker's ServerApp ran on the server host"

        # The operator, on the server host (the SuperLink's loopback port), sees no node and no run of the attacker's.
        nodes = fed._flwr("supernode", "list", CONNECTION, "--format", "json")
        assert "mallory" not in nodes.stdout and pub.read_text().split()[1] not in nodes.stdout
        runs = fed._flwr("ls", CONNECTION, "--format", "json")
        assert json.loads(runs.stdout[runs.stdout.find("{"):]).get("runs", []) == [], runs.stdout
        # ... and still registers the devices' keys itself.
        dev = fed.add_device("device-0", "alice", [("Who's there?", "Nay, answer me.")] * 4)
        assert fed.register(dev) > 0

        # The SuperLink listens on the loopback interface only, and not on the port the devices dial.
        link_ports = listening(process_tree(fed.superlink.pid))
        assert link_ports and all(p.loopback for p in link_ports), f"the SuperLink listens beyond loopback: {link_ports}"
        assert fed.port not in [p.port for p in link_ports], "the devices' address is the SuperLink itself"
