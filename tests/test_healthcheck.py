"""healthCheckNodePort servers: real HTTP servers on loopback, answers compared with kube-proxy's
pkg/proxy/healthcheck/service_health.go (v1.34) hcHandler.ServeHTTP, byte for byte where Go fixes them."""
from __future__ import annotations

import asyncio
import socket

import pytest

from lb.healthcheck import ServiceHealthServer, body_of
from lb.model import ObjKey

KEY = ObjKey("ns", "web")

# The handler's template, as in service_health.go, after dedent.Dedent and strings.Trim(.., "\n").
GO_TEMPLATE = '{\n\t"service": {\n\t\t"namespace": "%s",\n\t\t"name": "%s"\n\t},\n\t"localEndpoints": %d,\n' \
              '\t"serviceProxyHealthy": %s\n}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def request(port: int, raw: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", host="127.0.0.1") -> tuple[str, list, bytes]:
    """(status line, [(header, value)] in order, body) of one request on a fresh connection."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    await writer.drain()
    status = (await reader.readline()).decode().rstrip("\r\n")
    headers = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().rstrip("\r\n").partition(": ")
        headers.append((k, v))
    n = int(dict(headers).get("Content-Length", 0))
    body = await reader.readexactly(n) if n and not raw.startswith(b"HEAD") else b""
    writer.close()
    return status, headers, body


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("count,healthy,status", [
    (2, True, "HTTP/1.1 200 OK"),
    (0, True, "HTTP/1.1 503 Service Unavailable"),
    (3, False, "HTTP/1.1 503 Service Unavailable"),  # the proxy itself unhealthy: 503 whatever the count
], ids=["local-endpoints", "no-local-endpoint", "proxy-unhealthy"])
def test_answer_matches_kube_proxy(count, healthy, status):
    async def main():
        port = free_port()
        hc = ServiceHealthServer(("127.0.0.1",), lambda: healthy)
        await hc.sync_services({KEY: port})
        hc.sync_endpoints({KEY: count})
        try:
            return await request(port)
        finally:
            await hc.close()
    line, headers, body = run(main())
    assert line == status
    assert [k for k, _ in headers] == ["Content-Type", "X-Content-Type-Options", "X-Load-Balancing-Endpoint-Weight",
                                       "Date", "Content-Length"]
    h = dict(headers)
    assert h["Content-Type"] == "application/json" and h["X-Content-Type-Options"] == "nosniff"
    assert h["X-Load-Balancing-Endpoint-Weight"] == str(count)
    assert h["Date"].endswith(" GMT") and int(h["Content-Length"]) == len(body)
    assert body.decode() == GO_TEMPLATE % ("ns", "web", count, "true" if healthy else "false")


def test_any_method_and_path_is_answered_and_head_has_no_body():
    async def main():
        port = free_port()
        hc = ServiceHealthServer(("127.0.0.1",), lambda: True)
        await hc.sync_services({KEY: port})
        hc.sync_endpoints({KEY: 1})
        try:
            post = await request(port, b"POST /whatever?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            head = await request(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return post, head
        finally:
            await hc.close()
    post, head = run(main())
    assert post[0] == "HTTP/1.1 200 OK" and post[2] == body_of(KEY, 1, True)
    assert head[0] == "HTTP/1.1 200 OK" and head[2] == b"" and dict(head[1])["Content-Length"] == str(len(post[2]))


def test_keep_alive_answers_several_requests_on_one_connection_and_counts_follow():
    async def main():
        port = free_port()
        hc = ServiceHealthServer(("127.0.0.1",), lambda: True)
        await hc.sync_services({KEY: port})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        statuses = []
        for n in (1, 0):
            hc.sync_endpoints({KEY: n} if n else {})  # a Service not named has 0 (SyncEndpoints)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses.append((await reader.readline()).decode().strip())
            while (await reader.readline()) != b"\r\n":
                pass
            await reader.readexactly(len(body_of(KEY, n, True)))
        writer.close()
        await hc.close()
        return statuses
    assert run(main()) == ["HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable"]


def test_servers_open_and_close_as_services_change():
    async def main():
        p1, p2, p3 = free_port(), free_port(), free_port()
        other = ObjKey("ns", "other")
        hc = ServiceHealthServer(("127.0.0.1",), lambda: True)
        await hc.sync_services({KEY: p1, other: p2})
        first = [(await request(p))[0] for p in (p1, p2)]
        await hc.sync_services({KEY: p3})  # other gone, web moved: p1 and p2 closed, p3 opened
        closed = []
        for p in (p1, p2):
            try:
                await request(p)
                closed.append(False)
            except ConnectionRefusedError:
                closed.append(True)
        moved = (await request(p3))[2]
        await hc.close()
        try:
            await request(p3)
            after = "open"
        except ConnectionRefusedError:
            after = "closed"
        return first, closed, moved, after
    first, closed, moved, after = run(main())
    assert first == ["HTTP/1.1 503 Service Unavailable"] * 2  # no endpoints reported yet: 0
    assert closed == [True, True] and moved == body_of(KEY, 0, True) and after == "closed"


def test_a_port_taken_is_logged_and_retried_at_the_next_sync(caplog):
    async def main():
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hc = ServiceHealthServer(("127.0.0.1",), lambda: True, node_name="node-a")
        await hc.sync_services({KEY: port})
        opened_while_busy = KEY in hc.services
        busy.close()
        await hc.sync_services({KEY: port})
        line = (await request(port))[0]
        await hc.close()
        return opened_while_busy, line
    opened_while_busy, line = run(main())
    assert not opened_while_busy and line == "HTTP/1.1 503 Service Unavailable"
    assert "node node-a failed to start healthcheck 'ns/web' on port" in caplog.text


def test_one_server_per_address_and_reopened_when_addresses_change():
    async def main():
        port = free_port()
        hc = ServiceHealthServer(("127.0.0.1", "127.0.0.2"), lambda: True)
        await hc.sync_services({KEY: port})
        both = [(await request(port, host=h))[0] for h in ("127.0.0.1", "127.0.0.2")]
        await hc.set_addresses(("127.0.0.2",))
        await hc.sync_services({KEY: port})
        try:
            await request(port, host="127.0.0.1")
            gone = False
        except ConnectionRefusedError:
            gone = True
        still = (await request(port, host="127.0.0.2"))[0]
        await hc.close()
        return both, gone, still
    both, gone, still = run(main())
    assert both == ["HTTP/1.1 503 Service Unavailable"] * 2 and gone and still.startswith("HTTP/1.1 503")


def test_connection_close_is_honoured():
    async def main():
        port = free_port()
        hc = ServiceHealthServer(("127.0.0.1",), lambda: True)
        await hc.sync_services({KEY: port})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = await reader.read()  # the server closes after the answer
        writer.close()
        await hc.close()
        return data
    data = run(main())
    assert b"Connection: close\r\n" in data and data.endswith(body_of(KEY, 0, True))
