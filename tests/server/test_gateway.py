"""The Fleet gateway: exactly the Fleet API's calls are forwarded, streamed both ways; nothing else reaches the SuperLink."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx
import pytest

from fedpersona.server.gateway import FLEET_CALLS, check_superlink_is_local, fleet_gateway


class Upstream:
    """A stand-in SuperLink: records what reaches it and answers every call."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        body = b"reply:" + request.read()
        return httpx.Response(200, stream=httpx.ByteStream(body),  # streamed, as a real SuperLink's answer
                              headers={"content-type": "application/x-protobuf", "content-length": str(len(body)),
                                       "x-flwr": "1"})


def _ask(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture
def gateway():
    upstream = Upstream()
    app = fleet_gateway("127.0.0.1:9091", ca_certfile=None, insecure=True, transport=httpx.MockTransport(upstream))
    return app, upstream


def test_fleet_calls_are_forwarded_with_their_body_and_signature_headers(gateway):
    app, upstream = gateway
    headers = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-12-07T05:00:00+00:00",
               "content-type": "application/x-protobuf"}
    body = bytes(range(256)) * 100
    for call in sorted(FLEET_CALLS):
        r = _ask(app, "POST", f"/v1/fleet/{call}", content=body, headers=headers)
        assert r.status_code == 200 and r.content == b"reply:" + body and r.headers["x-flwr"] == "1"
    assert [str(q.url) for q in upstream.seen] == [f"http://127.0.0.1:9091/v1/fleet/{c}" for c in sorted(FLEET_CALLS)]
    for q in upstream.seen:
        assert q.method == "POST" and q.content == body
        assert {k: q.headers[k] for k in headers} == headers


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/stream-logs"), ("POST", "/v1/runtime/pull-messages"), ("GET", "/v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/pull-messages?x=1"), ("POST", "/v1/fleet/../control/list-nodes"),
    ("POST", "/v1/fleet/%2E%2E/control/list-nodes"), ("POST", "/v1/fleet/pull-messages/../../control/list-nodes"),
    ("POST", "/v1/fleet/"), ("POST", "/v1/fleet/admin"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
    ("PUT", "/v1/fleet/push-object"),
])
def test_everything_else_is_refused_before_it_reaches_the_superlink(gateway, method, path, caplog):
    app, upstream = gateway
    r = _ask(app, method, path, content=b"x" if method != "GET" else None)
    assert r.status_code == 404 and upstream.seen == []
    assert any("not a Fleet API call" in rec.getMessage() for rec in caplog.records)


def test_the_list_is_flowers_fleet_api():
    from flwr.superlink.routers.fleet.router import router

    assert {route.path.rpartition("/")[2] for route in router.routes} == FLEET_CALLS


def test_a_superlink_open_beyond_loopback_is_refused(monkeypatch):
    import fedpersona.server.gateway
    from fedpersona.sockets import Listener

    with socket.socket() as local:  # a real listener, on loopback (tests bind nothing else)
        local.bind(("127.0.0.1", 0))
        local.listen()
        port = local.getsockname()[1]
        check_superlink_is_local(f"127.0.0.1:{port}")
        real = fedpersona.server.gateway.listeners
        assert [(x.address, x.port) for x in real(port=port)] == [("127.0.0.1", port)]
        # the same port also bound to every interface (as `flower-superlink --host 0.0.0.0` does)
        monkeypatch.setattr(fedpersona.server.gateway, "listeners",
                            lambda port: real(port=port) + [Listener("0.0.0.0", port, "1"), Listener("::", port, "2")])
        with pytest.raises(ValueError, match=rf"open beyond the loopback interface \(0\.0\.0\.0:{port}, :::{port}\)"):
            check_superlink_is_local(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="must be a loopback address.*You passed: '203.0.113.10:9091'"):
        check_superlink_is_local("203.0.113.10:9091")
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_superlink_is_local("127.0.0.1")


def test_proc_addresses_and_loopback():
    from fedpersona.sockets import _address, is_loopback

    assert _address("0100007F") == "127.0.0.1" and _address("00000000") == "0.0.0.0"
    assert _address("0" * 32) == "::" and _address("00000000000000000000000001000000") == "::1"
    assert ipaddress.ip_address(_address("0000000000000000FFFF00000100007F")).ipv4_mapped == \
        ipaddress.ip_address("127.0.0.1")
    assert [is_loopback(a) for a in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1")] == [True] * 4
    assert [is_loopback(a) for a in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2")] == [False] * 4


def test_tls_needs_the_ca_and_a_certificate():
    with pytest.raises(ValueError, match="--ssl-ca-certfile"):
        fleet_gateway("127.0.0.1:9091", ca_certfile=None)
    from fedpersona.server.gateway import serve

    with pytest.raises(ValueError, match="--ssl-certfile"):
        serve(listen="127.0.0.1:9", superlink="127.0.0.1:1", ssl_certfile=None, ssl_keyfile=None, ssl_ca_certfile=None)
