"""One device in a deployment (``fedpersona supernode``): ``flower-supernode`` supervised, plus the warm worker.

:func:`run_supernode` checks the device's data and state folders, starts ``flower-supernode`` as a
child process (restarted after a refused activation, :class:`_SuperNodeProcess`) with the node
config of a fedpersona device (:func:`node_config_arg`), and serves its Runtime API from this
process with the warm ClientApp worker (:mod:`fedpersona.client.worker`). The credentials come from
``fedpersona certs`` (:mod:`fedpersona.certs`); docs/deployment.md has the whole procedure.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from fedpersona.client.data import read_user_folder
from fedpersona.client.worker import Worker

logger = logging.getLogger(__name__)

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
    worker (:mod:`fedpersona.client.worker`) must serve its Runtime API on ``127.0.0.1:runtime_port``.
    """
    # Its Runtime API (the ClientApp's messages, unauthenticated) on the loopback interface only, said out loud.
    argv = [flower_tool("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port), "--host", "127.0.0.1",
            "--node-config", node_config]
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
        argv = [sys.executable, "-m", "fedpersona.flower_patches", "flower-supernode-poll", str(poll_interval), *argv[1:]]
    return argv


INSECURE_WARNING = (
    "INSECURE MODE: TLS and SuperNode authentication are OFF. Anyone on the network can read the "
    "model updates and the run configuration, and any process can join the federation as a device. "
    "Use it only on a trusted loopback interface, for debugging."
)


def check_device(data_dir: str | os.PathLike, state_dir: str | os.PathLike) -> int:
    """Fail fast, before joining: the data folder must parse (the error names the file) and the state
    folder must be usable (created 0700). Returns the number of examples."""
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
        self._restart_at = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
