"""Process-tree tools for the local rehearsal: free ports, child processes, stopping a whole tree by process id,
and the TCP ports a set of processes listens on (with the address each is bound to)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedpersona.sockets import Listener, is_loopback, listeners

__all__ = ["Listener", "Proc", "free_port", "is_loopback", "listening", "process_tree", "stop_tree"]


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


def listening(pids: list[int]) -> list[Listener]:
    """Every TCP socket in LISTEN state held by one of ``pids``, with the address it is bound to."""
    return listeners(pids=list(pids))


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
