"""A real Flower deployment on this machine: SuperLink + N SuperNodes as separate processes on 127.0.0.1.

Everything a multi-host deployment does (docs/deployment.md), on loopback: a CA and certificates
(``fedpersona certs``), SuperNode keys registered with the SuperLink, the SuperLink with TLS and
``--enable-supernode-auth``, one device per Shakespeare user (``fedpersona supernode``: a SuperNode
plus its warm ClientApp worker, with the user's own ``*.jsonl`` data folder and state folder),
``flwr run`` through a ``[superlink.<name>]`` connection with the CA as root certificate, progress from
``flwr ls`` / ``flwr log``, results from the run folder. Every process is started in its own session
and stopped by its process id (its whole process tree), also when something fails.

    python -m simulations.deploy_local --users 4 --rounds 2                  # the demo model
    python -m simulations.deploy_local --users 4 --rounds 3 --tiny            # a tiny random model, fast
    python -m simulations.deploy_local --users 4 --rounds 3 --compare         # + the same cohort simulated

Used by ``tests/deploy/test_deployment.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.deploy import flower_tool, tool_env

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
APP_FILES = ("pyproject.toml", "README.md")
APP_PACKAGES = ("fedpersona", "client", "server", "privacy", "simulations")
CONNECTION = "fedpersona-local"


# ------------------------------------------------------------------------------------------ processes
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Flower detaches some children into new sessions)."""
    children = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stop_tree(pid: int | list[int], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal ``pid`` (or each of a list) and every descendant by id; SIGKILL what is left after ``timeout``."""
    roots = [pid] if isinstance(pid, int) else list(pid)
    pids = [p for r in roots for p in process_tree(r)]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    late = [q for r in roots for q in process_tree(r) if q not in pids]  # started while stopping
    for p in pids + late:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Device:
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
    port: int = 0
    devices: dict[str, Device] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.creds_dir = self.root / "creds"
        self.flwr_home = self.root / "flwr-home"
        self.results_dir = self.root / "results"
        self.superlink: Proc | None = None

    # ---------------------------------------------------------------------------------- env
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
        from fedpersona.deploy import make_credentials

        return make_credentials(self.creds_dir, supernodes=names)

    def start_superlink(self, *, timeout: float = 60.0) -> Proc:
        """SuperLink with TLS and SuperNode authentication; its state in a database under ``root``."""
        home = self.root / "superlink-home"
        c = self.creds_dir
        argv = [flower_tool("flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "superlink.crt"),
                "--ssl-keyfile", str(c / "superlink.key"), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--database", str(self.root / "superlink.db"),
                "--host", "127.0.0.1", "--port", str(self.port)]
        workdir = self.root / "superlink"
        workdir.mkdir(exist_ok=True)
        self.superlink = self._start("superlink", argv, env=self.env(home), cwd=workdir)
        self.write_connection()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.superlink.running():
                raise RuntimeError(f"flower-superlink exited:\n{self.superlink.text()[-3000:]}")
            if "Uvicorn running on" in self.superlink.text():
                return self.superlink
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not start in {timeout:.0f} s:\n{self.superlink.text()[-3000:]}")

    def write_connection(self) -> Path:
        """``FLWR_HOME/config.toml`` with a ``[superlink.<name>]`` connection verified against our CA."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.creds_dir / "ca.crt"}"\n'
        )
        return path

    def add_device(self, name: str, user_id: str, pairs: list[tuple[str, str]]) -> Device:
        """The user's data folder (``speeches.jsonl``) and state folder, and the device's key pair."""
        data_dir = self.root / "devices" / name / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir / "speeches.jsonl").open("w", encoding="utf-8") as fh:
            for cue, reply in pairs:
                fh.write(json.dumps({"cue": cue, "reply": reply}, ensure_ascii=False) + "\n")
        key = self.creds_dir / "supernodes" / name
        dev = Device(name, user_id, data_dir, self.root / "devices" / name / "state", key,
                     key.with_name(name + ".pub"), free_port())
        self.devices[name] = dev
        return dev

    def register(self, dev: Device) -> int:
        cp = self._flwr("supernode", "register", str(dev.public_key), CONNECTION, "--name", dev.name, "--format", "json")
        out = _last_json(cp.stdout)
        dev.node_id = int(out["node-id"])
        return dev.node_id

    def start_device(self, dev: Device, *, key: Path | None = None, insecure: bool = False,
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

    def stop_device(self, dev: Device, *, sig: int = signal.SIGTERM) -> None:
        if dev.proc is not None:
            stop_tree(dev.proc.pid, sig=sig)
            dev.proc.popen.wait(timeout=10)

    def wait_connected(self, devices: list[Device], *, timeout: float = 180.0) -> None:
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


def app_config_keys() -> set[str]:
    """Keys of ``[tool.flwr.app.config]``: the only ones ``flwr run --run-config`` may override."""
    import tomllib

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


# ------------------------------------------------------------------------------------------- figures
def worker_task_stats(text: str) -> list[dict]:
    """Parse the worker's ``<type> task done in S s (ClientApp A s, ...); message bytes in I out O`` lines."""
    import re

    pat = re.compile(r"(\S+) task done in ([\d.]+) s \(ClientApp ([\d.]+) s, (\w+)\); message bytes in (-?\d+) out (-?\d+)")
    return [{"type": m[1], "seconds": float(m[2]), "app_seconds": float(m[3]), "status": m[4],
             "bytes_in": int(m[5]), "bytes_out": int(m[6])} for m in pat.finditer(text)]


def users_for(n: int, *, min_speeches: int, seed: int = 0):
    from simulations.corpus import load_users

    users = load_users(min_speeches=min_speeches, max_users=n, seed=seed)
    if len(users) < n:
        raise ValueError(f"only {len(users)} users have at least {min_speeches} speeches; asked for {n}")
    return users


def deploy(root: Path, *, users: int, run_config: dict[str, Any], warm: bool = True, torch_threads: int = 1,
           timeout: float = 1800.0) -> dict:
    """From nothing to a finished run and back to nothing; returns the run's metrics plus timings."""
    from fedpersona.config import load_config

    cfg = load_config(run_config, env=False)
    t0 = time.time()
    with LocalFederation(root, warm=warm, torch_threads=torch_threads) as fed:
        names = [f"device-{i}" for i in range(users)]
        fed.credentials(names)
        fed.start_superlink()
        t_link = time.time()
        devices = []
        for name, user in zip(names, users_for(users, min_speeches=cfg.data.min_speeches, seed=cfg.run.seed)):
            dev = fed.add_device(name, user.user_id, [(e.cue, e.reply) for e in user.examples])
            fed.register(dev)
            devices.append(dev)
        t_nodes = time.time()
        for dev in devices:
            fed.start_device(dev)
        fed.wait_connected(devices, timeout=600)
        t_ready = time.time()
        t_submit = time.time()
        run_id = fed.submit(dict(run_config, **{"run.results-dir": str(fed.results_dir)}))
        logger.info("run %d submitted; follow it with: FLWR_HOME=%s flwr log %d %s", run_id, fed.flwr_home, run_id,
                    CONNECTION)
        first_round_at = None
        metrics_path = fed.results_dir / cfg.run.name / "metrics.json"

        def first_round() -> None:
            nonlocal first_round_at
            if first_round_at is None and metrics_path.exists():
                try:
                    if json.loads(metrics_path.read_text()).get("rounds"):
                        first_round_at = time.time()
                except (json.JSONDecodeError, OSError):
                    pass

        status = fed.wait_run(run_id, timeout=timeout, run_name=cfg.run.name, on_poll=first_round)
        t_end = time.time()
        log = fed.run_log(run_id)
        (fed.root / "logs" / f"run-{run_id}.log").write_text(log)
        metrics = fed.metrics(cfg.run.name)
        tasks = {d.name: worker_task_stats(d.proc.text()) for d in devices if d.proc}
    rounds = metrics.get("rounds", [])
    train_tasks = [t for ts in tasks.values() for t in ts if t["type"] == "train"]
    return {
        "status": status,
        "run_id": run_id,
        "metrics": metrics,
        "round_seconds": [r["seconds"] for r in rounds],
        "superlink_start_seconds": t_link - t0,
        "supernode_start_to_ready_seconds": t_ready - t_nodes,
        "supernode_start_to_first_round_seconds": (first_round_at - t_nodes) if first_round_at else None,
        "submit_to_first_round_seconds": (first_round_at - t_submit) if first_round_at else None,
        "total_seconds": t_end - t0,
        "train_bytes_in_per_device_round": _mean([t["bytes_in"] for t in train_tasks]),
        "train_bytes_out_per_device_round": _mean([t["bytes_out"] for t in train_tasks]),
        "tasks": tasks,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def simulate(root: Path, *, users: int, run_config: dict[str, Any], cpus: int | None = None,
             torch_threads: int | None = None) -> dict:
    """The same cohort and config through the Simulation Engine (``fedpersona run``): one client at a
    time, with ``torch_threads`` threads (default: all ``cpus``, as ``fedpersona run`` does)."""
    from simulations.runner import run

    if torch_threads:
        os.environ["FEDPERSONA_TORCH_THREADS"] = str(torch_threads)
    flat = dict(run_config)
    flat.update({"run.results-dir": str(root / "sim-results"), "run.state-dir": str(root / "sim-state"),
                 "data.max-users": users})
    t0 = time.time()
    metrics = run(None, flat, cpus=cpus)
    return {"metrics": metrics, "round_seconds": [r["seconds"] for r in metrics["rounds"]],
            "total_seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.deploy_local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=4, help="devices (one Shakespeare user each)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--root", default=None, help="working folder (default: a fresh temporary one, removed after)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (seconds, not minutes)")
    p.add_argument("--cold", action="store_true", help="Flower's default: a fresh ClientApp process per message")
    p.add_argument("--compare", action="store_true", help="also simulate the same cohort and compare round times")
    p.add_argument("--threads", type=int, default=1, help="torch threads per device process (default 1)")
    p.add_argument("--sim-threads", type=int, default=None,
                   help="torch threads of the simulated clients (default: all CPUs, as `fedpersona run`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    from fedpersona.output import configure

    configure(logging.INFO)  # one handler: each line once, no ANSI codes

    import tempfile

    from fedpersona.config import parse_override

    tmp = None
    root = Path(args.root) if args.root else Path(tmp := tempfile.mkdtemp(prefix="fedpersona-deploy-"))
    try:
        run_config: dict[str, Any] = {
            "run.name": "deploy-local", "server.num-rounds": args.rounds, "server.clients-per-round": args.users,
            "server.min-clients": min(2, args.users), "data.max-users": args.users,
        }
        if args.tiny:
            sys.path.insert(0, str(REPO))
            from tests.conftest import build_tiny_model

            tiny = build_tiny_model(root / "tiny-model")
            run_config.update({"model.path": str(tiny), "model.seq-len": 32, "model.cue-tokens": 8, "adapter.rank": 2,
                               "data.max-examples": 16, "client.local-steps": 2, "client.batch-size": 4,
                               "privacy.delta": 1e-2})
        for text in args.set:
            k, v = parse_override(text)
            run_config[k] = v
        dep = deploy(root / "deploy", users=args.users, run_config=run_config, warm=not args.cold,
                     torch_threads=args.threads)
        m = dep["metrics"]
        figures = {k: v for k, v in dep.items() if k not in ("metrics", "tasks")}
        figures["failed"] = sum(r.get("failed", 0) for r in m.get("rounds", []))
        figures["aggregation"] = m.get("aggregation")
        print(f"\nDeployment ({'cold' if args.cold else 'warm'} ClientApps, {args.users} devices): run {dep['run_id']} {dep['status']}")
        print(f"  round seconds:                 {', '.join(f'{s:.1f}' for s in dep['round_seconds'])}")
        print(f"  SuperNode start -> ready:      {dep['supernode_start_to_ready_seconds']:.1f} s")
        if dep["supernode_start_to_first_round_seconds"] is not None:
            print(f"  SuperNode start -> 1st round:  {dep['supernode_start_to_first_round_seconds']:.1f} s "
                  f"(flwr run -> 1st round {dep['submit_to_first_round_seconds']:.1f} s)")
        if dep["train_bytes_in_per_device_round"] is not None:
            print(f"  bytes per device per round:    in {dep['train_bytes_in_per_device_round']:.0f}, "
                  f"out {dep['train_bytes_out_per_device_round']:.0f} (train messages, before TLS/HTTP framing)")
        print(f"  failures: {figures['failed']}; aggregation: {figures['aggregation']}")
        if args.compare:
            sim = simulate(root, users=args.users, run_config=run_config, cpus=os.cpu_count(),
                           torch_threads=args.sim_threads)
            figures["simulation_round_seconds"] = sim["round_seconds"]
            d, s = dep["round_seconds"], sim["round_seconds"]
            later = lambda xs: xs[1:] if len(xs) > 1 else xs  # noqa: E731  (round 1 includes set-up)
            ratio = _mean(later(d)) / _mean(later(s))
            figures["deploy_over_simulation"] = ratio
            print(f"Simulation (same cohort): round seconds {', '.join(f'{x:.1f}' for x in s)}")
            print(f"  deployment / simulation, rounds after the first: {ratio:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0 if dep["status"].endswith("completed") and figures["failed"] == 0 else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
