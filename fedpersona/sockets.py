"""Which TCP ports this host listens on, and on which address (Linux ``/proc/net/tcp`` and ``tcp6``).

Used to check that what must stay local is bound to the loopback interface: the SuperLink behind the
Fleet gateway (:mod:`fedpersona.server.gateway`), Ray in simulations, the rehearsal's processes
(:mod:`fedpersona.simulations.processes`). Reads only this network namespace's tables; no connection is made.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Listener", "is_loopback", "listeners"]


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket: the address it is bound to (``0.0.0.0`` / ``::``: every interface), its port,
    its socket inode, and the process holding it when known."""

    address: str
    port: int
    inode: str
    pid: int | None = None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.address)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ``::1`` and IPv4-mapped loopback (``::ffff:127.0.0.1``); False for every address
    other hosts can reach, the every-interface binds ``0.0.0.0`` and ``::`` included."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # the kernel prints the address as 32-bit words in host byte order
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def listeners(*, port: int | None = None, pids: list[int] | None = None) -> list[Listener]:
    """Every TCP socket in LISTEN state in this network namespace (``[]`` where ``/proc`` has no tables), those
    on ``port`` and / or held by one of ``pids`` when given; sorted by port."""
    owner: dict[str, int] = {}
    for pid in pids or ():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) <= 9 or f[3] != "0A":  # 0A: TCP_LISTEN
                continue
            addr, hex_port = f[1].rsplit(":", 1)
            entry = Listener(_address(addr), int(hex_port, 16), f[9], owner.get(f[9]))
            if port is not None and entry.port != port:
                continue
            if pids is not None and entry.pid is None:
                continue
            out.add(entry)
    return sorted(out, key=lambda x: (x.port, x.address, x.inode))
