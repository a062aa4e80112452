"""What the Fleet gateway (server/gateway.py) adds to a Fleet API call: the same call direct and through it.

An echo server stands in for the SuperLink (uvicorn, TLS with a certificate from ``fedpersona certs``,
on 127.0.0.1); the gateway runs as in a deployment (``python -m fedpersona.server.gateway``, TLS on both sides).
Each call POSTs ``--kib`` KiB to ``/v1/fleet/push-object`` and reads the same bytes back, on one
kept-alive connection, as a SuperNode does; the medians are printed side by side.

    python -m fedpersona.simulations.bench.gateway --calls 200 --kib 100
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpersona.certs import make_credentials
from fedpersona.simulations.processes import free_port, stop_tree

REPO = Path(__file__).resolve().parents[2]


async def echo_app(scope, receive, send) -> None:
    """An ASGI app answering every request with its own body (the stand-in SuperLink)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _wait(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def bench(*, calls: int, kib: int) -> dict[str, float]:
    import httpx

    with tempfile.TemporaryDirectory(prefix="fedpersona-gateway-") as tmp:
        creds = Path(tmp) / "creds"
        make_credentials(creds, supernodes=[])
        cert, key, ca = (str(creds / f) for f in ("superlink.crt", "superlink.key", "ca.crt"))
        up_port, gw_port = free_port(), free_port()
        up = subprocess.Popen([sys.executable, "-m", "uvicorn", "fedpersona.simulations.bench.gateway:echo_app", "--host", "127.0.0.1",
                               "--port", str(up_port), "--ssl-certfile", cert, "--ssl-keyfile", key, "--http", "h11",
                               "--log-level", "warning"], cwd=REPO, start_new_session=True)
        gw = subprocess.Popen([sys.executable, "-m", "fedpersona.server.gateway", "--listen", f"127.0.0.1:{gw_port}", "--superlink",
                               f"127.0.0.1:{up_port}", "--ssl-certfile", cert, "--ssl-keyfile", key,
                               "--ssl-ca-certfile", ca], cwd=REPO, start_new_session=True, stderr=subprocess.DEVNULL)
        try:
            _wait(up_port)
            _wait(gw_port)
            verify = ssl.create_default_context(cafile=ca)
            body = os.urandom(kib * 1024)
            seconds: dict[str, list[float]] = {"direct": [], "gateway": []}
            for _ in range(2):  # interleaved halves: both sides see the same machine load
                for name, port in (("direct", up_port), ("gateway", gw_port)):
                    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify) as client:
                        for i in range(10 + calls // 2):
                            t0 = time.perf_counter()
                            r = client.post("/v1/fleet/push-object", content=body)
                            if i >= 10:  # the first ones warm the connection up
                                seconds[name].append(time.perf_counter() - t0)
                            if r.status_code != 200 or r.content != body:
                                raise RuntimeError(f"{name}: the echo came back wrong ({r.status_code})")
        finally:
            stop_tree([up.pid, gw.pid])
    return {name: statistics.median(xs) for name, xs in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedpersona.simulations.bench.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200, help="calls per side (default 200)")
    p.add_argument("--kib", type=int, default=100, help="request and reply size in KiB (default 100)")
    args = p.parse_args(argv)
    if args.calls < 2 or args.kib < 0:
        p.error(f"--calls must be >= 2 and --kib >= 0. You passed: --calls {args.calls} --kib {args.kib}")
    m = bench(calls=args.calls, kib=args.kib)
    d, g = m["direct"], m["gateway"]
    print(f"{args.kib} KiB Fleet call, median of {2 * (args.calls // 2)}: direct {d * 1e3:.2f} ms | through the gateway "
          f"{g * 1e3:.2f} ms | +{(g - d) * 1e3:.2f} ms ({g / d:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
