"""The local deployment harness: a SuperLink and SuperNodes as separate processes on 127.0.0.1.

:class:`LocalFederation` does what a multi-host deployment does (docs/deployment.md), on loopback:
credentials (:mod:`fedpersona.certs`), the SuperLink with TLS and SuperNode authentication on
``127.0.0.1`` only, the Fleet gateway (:mod:`fedpersona.server.gateway`) as the one address devices dial (a
deployment's network address; here another loopback port), one device per user (``fedpersona supernode``), ``flwr run`` through the operator's
connection to the SuperLink's own loopback port with the CA as root certificate, and stops every
process by its process id (:mod:`fedpersona.simulations.processes`). Used by :mod:`fedpersona.simulations.deploy.rehearsal` and
``tests/deploy/test_deployment.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.client.supernode import flower_tool, tool_env
from fedpersona.certs import make_credentials
from fedpersona.identity import IDENTITY_FILE
from fedpersona.simulations.processes import Proc, free_port, stop_tree

__all__ = ["CONNECTION", "LocalDevice", "LocalFederation", "app_config_keys"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
APP_FILES = ("pyproject.toml", "README.md")
APP_PACKAGES = ("fedpersona", "client", "server", "privacy", "simulations")
CONNECTION = "fedpersona-local"


@dataclass
class LocalDevice:
    name: str
    user_id: str
    data_dir: Path
    state_dir: Path
    key: Path
    public_key: Path
    runtime_port: int
    node_id: int | None = None
    proc: Proc | None = None
    started_at: float = 0.0


@dataclass
class LocalFederation:
    """SuperLink + devices on 127.0.0.1 under ``root``; use as a context manager (stops everything)."""

    root: Path
    warm: bool = True
    torch_threads: int = 1
    #: the gateway's port: the one address devices dial (``address``)
    port: int = 0
    #: the SuperLink's own port, on 127.0.0.1 only (``control_address``: the operator's ``flwr`` CLI)
    link_port: int = 0
    devices: dict[str, LocalDevice] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.link_port = self.link_port or free_port()
        self.creds_dir = self.root / "creds"
        self.flwr_home = self.root / "flwr-home"
        self.results_dir = self.root / "results"
        self.superlink: Proc | None = None
        self.gateway: Proc | None = None

    # ---------------------------------------------------------------------------------- env
    @property
    def address(self) -> str:
        """What the devices dial: the Fleet gateway (a deployment's public address)."""
        return f"127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        """The SuperLink itself, Control API included: reachable on the server host's loopback interface only."""
        return f"127.0.0.1:{self.link_port}"

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        env = tool_env()
        env.update({
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
        })
        if self.torch_threads:
            env["FEDPERSONA_TORCH_THREADS"] = str(self.torch_threads)
        env.update(extra)
        return env

    def _start(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        fh = log.open("ab")
        try:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        logger.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return proc

    def _flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run([flower_tool("flwr"), *args], env=self.env(self.flwr_home, COLUMNS="200"), cwd=self.root,
                            capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
        return cp

    # ------------------------------------------------------------------------------ set-up
    def credentials(self, names: list[str]):
        return make_credentials(self.creds_dir, supernodes=names)

    def superlink_argv(self) -> list[str]:
        """``flower-superlink`` as docs/deployment.md starts it: TLS, SuperNode authentication, loopback only."""
        c = self.creds_dir
        return [flower_tool("flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
                "--ssl-certfile", str(c / "superlink.crt"), "--ssl-keyfile", str(c / "superlink.key"),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--database", str(self.root / "superlink.db"), "--host", "127.0.0.1", "--port", str(self.link_port)]

    def gateway_argv(self) -> list[str]:
        """The Fleet gateway (:mod:`fedpersona.server.gateway`) in front of it, on the address devices dial."""
        c = self.creds_dir
        return [sys.executable, "-m", "fedpersona.server.gateway", "--listen", self.address, "--superlink", self.control_address,
                "--ssl-certfile", str(c / "superlink.crt"), "--ssl-keyfile", str(c / "superlink.key"),
                "--ssl-ca-certfile", str(c / "ca.crt")]

    def start_superlink(self, *, timeout: float = 60.0) -> Proc:
        """SuperLink with TLS and SuperNode authentication on 127.0.0.1 (its state in a database under
        ``root``), then the Fleet gateway: the only address the devices (and anyone else) are given."""
        workdir = self.root / "superlink"
        workdir.mkdir(exist_ok=True)
        self.superlink = self._start("superlink", self.superlink_argv(), env=self.env(self.root / "superlink-home"),
                                     cwd=workdir)
        self.write_connection()
        deadline = time.monotonic() + timeout
        while "Uvicorn running on" not in self.superlink.text():
            if not self.superlink.running():
                raise RuntimeError(f"flower-superlink exited:\n{self.superlink.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start in {timeout:.0f} s:\n{self.superlink.text()[-3000:]}")
            time.sleep(0.2)
        self.gateway = self._start("gateway", self.gateway_argv(), env=self.env(self.root / "superlink-home"), cwd=REPO)
        while not _accepts(self.port):
            if not self.gateway.running():
                raise RuntimeError(f"the Fleet gateway exited:\n{self.gateway.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Fleet gateway did not start in {timeout:.0f} s:\n{self.gateway.text()[-3000:]}")
            time.sleep(0.2)
        return self.superlink

    def write_connection(self, home: Path | None = None, *, address: str | None = None) -> Path:
        """``<home>/config.toml`` (default: the operator's ``FLWR_HOME``) with a ``[superlink.<name>]`` connection
        to ``address`` (default: the SuperLink's loopback port, as on the server host) verified against our CA."""
        home = home or self.flwr_home
        home.mkdir(parents=True, exist_ok=True)
        path = home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{address or self.control_address}"\nroot-certificates = "{self.creds_dir / "ca.crt"}"\n'
        )
        return path

    def add_device(self, name: str, user_id: str, pairs: list[tuple[str, str]]) -> LocalDevice:
        """The user's data folder (``speeches.jsonl``) and state folder, and the device's key pair."""
        data_dir = self.root / "devices" / name / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir / "speeches.jsonl").open("w", encoding="utf-8") as fh:
            for cue, reply in pairs:
                fh.write(json.dumps({"cue": cue, "reply": reply}, ensure_ascii=False) + "\n")
        key = self.creds_dir / "supernodes" / name
        dev = LocalDevice(name, user_id, data_dir, self.root / "devices" / name / "state", key,
                     key.with_name(name + ".pub"), free_port())
        # The device's identity for secure aggregation (`fedpersona certs`), where the device looks for it.
        identity = self.creds_dir / "identities" / f"{name}.json"
        if identity.exists():
            dev.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copy2(identity, dev.state_dir / IDENTITY_FILE)
        self.devices[name] = dev
        return dev

    def register(self, dev: LocalDevice) -> int:
        cp = self._flwr("supernode", "register", str(dev.public_key), CONNECTION, "--name", dev.name, "--format", "json")
        out = _last_json(cp.stdout)
        dev.node_id = int(out["node-id"])
        return dev.node_id

    def start_device(self, dev: LocalDevice, *, key: Path | None = None, insecure: bool = False,
                     max_retries: int | None = None, extra_env: dict[str, str] | None = None,
                     name: str | None = None) -> Proc:
        """``fedpersona supernode`` for ``dev`` (TLS + its key unless ``insecure``).

        With ``name`` it is an extra process (a test's intruder, say) with its own Runtime API port and
        log, not the device's own."""
        argv = [sys.executable, "-m", "fedpersona.cli", "supernode", "--superlink", self.address,
                "--data-dir", str(dev.data_dir), "--state-dir", str(dev.state_dir), "--user-id", dev.user_id,
                "--runtime-port", str(dev.runtime_port if name is None else free_port())]
        if insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.creds_dir / "ca.crt"), "--auth-key", str(key or dev.key)]
        if not self.warm:
            argv.append("--cold")
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        home = self.root / "devices" / dev.name / "flwr-home"
        proc = self._start(name or f"device-{dev.name}", argv, env=self.env(home, **(extra_env or {})), cwd=REPO)
        if name is None:
            dev.proc, dev.started_at = proc, time.time()
        return proc

    def stop_device(self, dev: LocalDevice, *, sig: int = signal.SIGTERM) -> None:
        if dev.proc is not None:
            stop_tree(dev.proc.pid, sig=sig)
            dev.proc.popen.wait(timeout=10)

    def wait_connected(self, devices: list[LocalDevice], *, timeout: float = 180.0) -> None:
        """Until every device's worker has loaded the ClientApp and its SuperNode holds a node id."""
        deadline = time.monotonic() + timeout
        pending = list(devices)
        while pending and time.monotonic() < deadline:
            for dev in list(pending):
                text = dev.proc.text() if dev.proc else ""
                if dev.proc and not dev.proc.running():
                    raise RuntimeError(f"device {dev.name} exited:\n{text[-3000:]}")
                if "SuperNode ID:" in text and (not self.warm or "warm worker polling" in text):
                    pending.remove(dev)
            time.sleep(0.3)
        if pending:
            raise RuntimeError(f"devices not ready after {timeout:.0f} s: {[d.name for d in pending]}")

    # --------------------------------------------------------------------------------- runs
    def stage_app(self) -> Path:
        """A copy of the app to build the FAB from (``flwr run`` rewrites the pyproject it is given)."""
        app = self.root / "app"
        if app.exists():
            shutil.rmtree(app)
        app.mkdir()
        for f in APP_FILES:
            if (REPO / f).exists():
                shutil.copy2(REPO / f, app / f)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for pkg in APP_PACKAGES:
            shutil.copytree(REPO / pkg, app / pkg, ignore=ignore)
        return app

    def submit(self, run_config: dict[str, Any]) -> int:
        """``flwr run`` the app with ``run_config`` overrides (written to a TOML file); returns the run id."""
        unknown = sorted(set(run_config) - app_config_keys())
        if unknown:
            raise ValueError(f"flwr run can only override keys of [tool.flwr.app.config] in pyproject.toml; "
                             f"not there: {', '.join(unknown)}")
        app = self.stage_app()
        cfg_file = self.root / f"run-config-{int(time.time() * 1000)}.toml"
        cfg_file.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in run_config.items()))
        cp = self._flwr("run", str(app), CONNECTION, "--run-config", str(cfg_file), "--format", "json")
        out = _last_json(cp.stdout)
        if not out.get("success"):
            raise RuntimeError(f"flwr run failed: {cp.stdout}\n{cp.stderr}")
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        cp = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
        try:
            runs = _last_json(cp.stdout)["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def wait_run(self, run_id: int, *, timeout: float = 600.0, run_name: str | None = None,
                 on_poll=None) -> str:
        """Wait until the run is finished; returns its status (``finished:completed``, ...).

        ``flwr ls`` costs a Python start-up (~1.5 s of CPU), so it is asked every 15 s, and at once
        when the run's metrics.json says the ServerApp is done; ``on_poll()`` is called every 0.5 s.
        """
        deadline = time.monotonic() + timeout
        metrics_path = self.results_dir / run_name / "metrics.json" if run_name else None
        next_ask = 0.0
        while time.monotonic() < deadline:
            if on_poll is not None:
                on_poll()
            done = False
            if metrics_path is not None and metrics_path.exists():
                try:
                    done = "train_seconds" in json.loads(metrics_path.read_text())
                except (json.JSONDecodeError, OSError):
                    pass
            if done or time.monotonic() >= next_ask:
                status = self.status(run_id)
                if status.startswith("finished"):
                    return status
                next_ask = time.monotonic() + (2.0 if done else 15.0)
            if self.superlink and not self.superlink.running():
                raise RuntimeError(f"the SuperLink exited:\n{self.superlink.text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s (status {self.status(run_id)})")

    def run_log(self, run_id: int) -> str:
        return self._flwr("log", str(run_id), CONNECTION, "--show", check=False, timeout=60).stdout

    def metrics(self, run_name: str) -> dict:
        return json.loads((self.results_dir / run_name / "metrics.json").read_text())

    # ---------------------------------------------------------------------------- tear-down
    def stop(self) -> None:
        """Stop every process started here (devices, then the SuperLink), one by one, each by id with its tree."""
        for proc in reversed(self.procs):
            stop_tree(proc.pid)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def app_config_keys() -> set[str]:
    """Keys of ``[tool.flwr.app.config]``: the only ones ``flwr run --run-config`` may override."""
    with (REPO / "pyproject.toml").open("rb") as fh:
        return set(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _last_json(text: str) -> dict:
    """The JSON object printed by ``flwr ... --format json`` (other lines may precede it)."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in: {text!r}")
    return json.loads(text[start:])
