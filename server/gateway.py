"""The SuperLink's front door: the Fleet API on the network, everything else on 127.0.0.1 only.

Flower 1.41's SuperLink serves three APIs over HTTPS on one port: the **Fleet** API (SuperNodes pull
messages and push replies; with ``--enable-supernode-auth`` every request is signed by a registered
node key), the **Control** API (``flwr run``, ``flwr ls``, ``flwr supernode register``, ...) and the
**Runtime** API (the ServerApp's). Only the Fleet API authenticates its callers: the Control API has no
authentication unless Flower Enterprise's OIDC plugin is installed, so a SuperLink bound to
``0.0.0.0`` lets anyone who reaches the port (TLS keeps no one out: the CA certificate is public) list
the nodes, register a node key of their own and ``flwr run`` their own ServerApp, that is, run code on
the server host. Flower 1.41 cannot serve the APIs on separate addresses (``--fleet-api-address`` and
``--control-api-address`` are deprecated and ignored).

So the SuperLink listens on ``127.0.0.1`` (its ``--host`` default) and this gateway listens on the
network. It terminates TLS with the SuperLink's certificate, forwards exactly the Fleet API's calls
(``POST /v1/fleet/<call>`` for the calls in :data:`FLEET_CALLS`, no query string) to the SuperLink over
TLS verified against the CA, streaming both ways, and answers every other request ``404`` without
forwarding anything. It refuses to start while the SuperLink's port is open beyond the loopback
interface of this host (:func:`check_superlink_is_local`): it would protect nothing then. The operator
uses the Control API on the server host, or through an SSH tunnel (docs/deployment.md)::

    python -m fedpersona.server.gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9091 \\
        --ssl-certfile creds/superlink.crt --ssl-keyfile creds/superlink.key --ssl-ca-certfile creds/ca.crt
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

from fedpersona.sockets import is_loopback, listeners

__all__ = ["FLEET_CALLS", "FLEET_PREFIX", "check_superlink_is_local", "fleet_gateway", "main", "serve"]

logger = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
#: The Fleet API calls of Flower 1.41 (``flwr/superlink/routers/fleet/router.py``; a test keeps the two equal).
FLEET_CALLS = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
})
#: Headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1), and ``host``.
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                  b"trailer", b"transfer-encoding", b"upgrade", b"host"})


def _split(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT. You passed: {address!r}")
    return host, int(port)


def check_superlink_is_local(superlink: str) -> None:
    """``ValueError`` unless the SuperLink is addressed on the loopback interface and nothing on this host
    listens on its port beyond it (``0.0.0.0``, ``::`` or a routable address): then its Control API is
    already open to the network and a gateway in front of it would protect nothing."""
    host, port = _split(superlink, "--superlink")
    try:
        local = is_loopback(host)
    except ValueError:
        local = host == "localhost"
    if not local:
        raise ValueError(f"--superlink must be a loopback address (the SuperLink's --host 127.0.0.1): the Control "
                         f"API it serves has no authentication. You passed: {superlink!r}")
    exposed = [f"{x.address}:{x.port}" for x in listeners(port=port) if not x.loopback]
    if exposed:
        raise ValueError(f"the SuperLink's port {port} is open beyond the loopback interface ({', '.join(exposed)}): "
                         f"anyone who reaches it can use its unauthenticated Control API (list nodes, register keys, "
                         f"start runs). Start flower-superlink with --host 127.0.0.1, then this gateway")


def fleet_gateway(upstream: str, *, ca_certfile: str | Path | None, insecure: bool = False,
                  timeout: float = 600.0, transport=None):
    """The gateway as an ASGI application forwarding Fleet API calls to ``upstream`` (``HOST:PORT``).

    ``transport``: an ``httpx`` transport to reach the SuperLink through (tests); default a TCP connection."""
    import httpx

    host, port = _split(upstream, "--superlink")
    if insecure:
        base, verify = f"http://{host}:{port}", False
    else:
        if ca_certfile is None:
            raise ValueError("the gateway verifies the SuperLink's certificate: give --ssl-ca-certfile "
                             "(or --insecure for a SuperLink without TLS, debugging only)")
        base, verify = f"https://{host}:{port}", ssl.create_default_context(cafile=str(ca_certfile))
    state: dict[str, Any] = {}

    def client() -> httpx.AsyncClient:  # made in the server's event loop, on first use
        if "client" not in state:
            state["client"] = httpx.AsyncClient(base_url=base, verify=verify, http2=False, transport=transport,
                                                timeout=httpx.Timeout(timeout, connect=10.0))
        return state["client"]

    async def respond(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    if "client" in state:
                        await state.pop("client").aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # no websockets
        path = scope.get("path", "")
        call = path[len(FLEET_PREFIX):] if path.startswith(FLEET_PREFIX) else None
        if scope.get("method") != "POST" or call not in FLEET_CALLS or scope.get("query_string"):
            peer = scope.get("client") or ("?", 0)
            logger.warning("refused %s %r from %s:%s: not a Fleet API call", scope.get("method"), path[:200],
                           peer[0], peer[1])
            await respond(send, 404, b"Not Found")
            return

        async def body():
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    return
                chunk = event.get("body", b"")
                if chunk:
                    yield chunk
                if not event.get("more_body", False):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        try:
            request = client().build_request("POST", FLEET_PREFIX + call, headers=headers, content=body())
            response = await client().send(request, stream=True)
        except httpx.HTTPError as exc:
            logger.error("the SuperLink at %s did not answer %s: %s", base, path, type(exc).__name__)
            await respond(send, 502, b"Bad Gateway")
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


def serve(*, listen: str, superlink: str, ssl_certfile: str | None, ssl_keyfile: str | None,
          ssl_ca_certfile: str | None, insecure: bool = False) -> None:
    """Run the gateway until interrupted (uvicorn, HTTP/1.1, TLS unless ``insecure``)."""
    import uvicorn

    check_superlink_is_local(superlink)
    host, port = _split(listen, "--listen")
    if insecure:
        logger.warning("INSECURE MODE: the gateway serves the Fleet API without TLS and forwards to a SuperLink "
                       "without TLS; for debugging on a trusted network only")
    elif not (ssl_certfile and ssl_keyfile):
        raise ValueError("the gateway serves TLS with the SuperLink's certificate: give --ssl-certfile and "
                         "--ssl-keyfile (or --insecure, debugging only)")
    app = fleet_gateway(superlink, ca_certfile=ssl_ca_certfile, insecure=insecure)
    logger.info("Fleet gateway on %s -> SuperLink %s: only POST %s{%s} is forwarded", listen, superlink,
                FLEET_PREFIX, ",".join(sorted(FLEET_CALLS)))
    uvicorn.run(app, host=host, port=port, lifespan="on", log_level="warning", http="h11",
                ssl_certfile=None if insecure else ssl_certfile, ssl_keyfile=None if insecure else ssl_keyfile)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedpersona.server.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="HOST:PORT the devices dial (e.g. 0.0.0.0:9092)")
    p.add_argument("--superlink", default="127.0.0.1:9091",
                   help="the SuperLink's HOST:PORT on this host's loopback interface (default 127.0.0.1:9091)")
    p.add_argument("--ssl-certfile", help="the SuperLink's certificate (creds/superlink.crt)")
    p.add_argument("--ssl-keyfile", help="its private key (creds/superlink.key)")
    p.add_argument("--ssl-ca-certfile", help="the CA that signed it (creds/ca.crt), to verify the SuperLink")
    p.add_argument("--insecure", action="store_true", help="no TLS on either side (debugging only; warns)")
    args = p.parse_args(argv)
    from fedpersona.output import configure

    configure(logging.INFO)
    try:
        serve(listen=args.listen, superlink=args.superlink, ssl_certfile=args.ssl_certfile,
              ssl_keyfile=args.ssl_keyfile, ssl_ca_certfile=args.ssl_ca_certfile, insecure=args.insecure)
    except ValueError as exc:
        print(f"fedpersona.server.gateway: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
