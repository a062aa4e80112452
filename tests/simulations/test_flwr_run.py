"""`flwr run .` as Flower's docs say, from the project folder, the virtualenv not on PATH, the tests' tiny model.

Slow (a local SuperLink, Ray, four simulated SuperNodes: a few minutes on 2 cores): ``-m slow``.
Flower's local default of 2 SuperNodes fails at once naming the number needed; with as many
SuperNodes as users the run trains its rounds under secure aggregation and completes; the outputs
are under the Flower run's own folder, none in the project folder. The SuperLink ``flwr run`` left
running (and its SuperExec) is stopped by its pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and "flower-superlink" in cmd:
                out.append(int(proc.name))
    return out


def test_flwr_run_dot_trains_under_secure_aggregation(tiny_model_dir, tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.is_file():
        pytest.skip("no flwr next to this Python")
    http, control = _free_port(), _free_port()
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control)}
    if not subprocess.run([sys.executable, "-c", "import shutil; assert shutil.which('flower-superlink')"],
                          env=env).returncode == 0:
        pytest.skip("this virtualenv puts no bin/ on PATH (scripts/install.sh writes fedpersona-venv-path.pth)")
    tiny = (f"model.path='{tiny_model_dir}' model.seq-len=32 model.cue-tokens=8 adapter.layers=2 "
            "adapter.personal-layers=1 adapter.rank=2 data.max-users=4 data.max-examples=16 client.local-steps=2 "
            "client.batch-size=4 server.num-rounds=2 server.clients-per-round=3 privacy.delta=0.01 "
            "eval.local-baseline=false privacy.noise-on='device' privacy.max-grad-norm=1.0 server.optimizer='fedavg' "
            "server.lr=1.0")
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "results", ROOT / "state") if p.exists()}

    def flwr_run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(flwr), "run", ".", "--run-config", tiny, "--stream", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)

    def statuses() -> list[str]:
        out = subprocess.run([str(flwr), "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120).stdout
        return [r["status"] for r in json.loads(out[out.index("{"):])["runs"]]

    try:
        failed = flwr_run()  # Flower's local default: 2 SuperNodes for 4 users
        text = failed.stdout + failed.stderr
        assert "this simulation has 2 SuperNode(s)" in text and 'num-supernodes=4' in text, text[-4000:]
        assert statuses() == ["finished:failed"]
        done = flwr_run("--federation-config", "num-supernodes=4")
        text = done.stdout + done.stderr
        assert "[round 2/2] cohort 3: trained 3" in text, text[-4000:]
        assert sorted(statuses()) == ["finished:completed", "finished:failed"]
        (metrics_path,) = (tmp_path / "flwr" / "fedpersona-runs").glob("*/results/demo/metrics.json")
        metrics = json.loads(metrics_path.read_text())
        assert metrics["aggregation"] == "secagg+" and all(r["applied"] for r in metrics["rounds"])
        assert {p: p.stat().st_mtime_ns for p in (ROOT / "results", ROOT / "state") if p.exists()} == before, \
            "nothing written into the project folder"
    finally:
        for pid in _pids_with(f"127.0.0.1:{control}"):  # the SuperLink flwr run started; its SuperExec exits with it
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _pids_with(f"127.0.0.1:{control}") and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not _pids_with(f"127.0.0.1:{control}")
