"""/healthz, /livez and /metrics, as kube-proxy serves them (pkg/proxy/healthcheck/proxier_health.go).

Health rule (ProxierHealthServer.isHealthy): healthy while starting, when nothing is queued, or when
the oldest change still pending was queued less than ``health_timeout`` ago. /healthz also reports
503 when the node is being deleted or tainted for deletion (nodeEligible false); /livez does not.
Body: {"lastUpdated": ..., "currentTime": ..., "nodeEligible": ...} with Go's RFC 3339 times.
Each answer is counted by status code (bpflb_proxy_healthz_total / bpflb_proxy_livez_total, as kube-proxy's
ProxyHealthzTotal / ProxyLivezTotal).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .metrics import AgentMetrics

log = logging.getLogger("bpflb.health")


def go_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class HealthState:
    health_timeout: float = 60.0
    wall: Callable[[], float] = time.time
    last_updated: float = 0.0
    oldest_pending: float | None = None
    node_eligible: bool = True

    def queued(self) -> None:
        """A change was recorded and waits for a sync (kube-proxy: QueuedUpdate)."""
        if self.oldest_pending is None:
            self.oldest_pending = self.wall()

    def updated(self) -> None:
        """A sync programmed every pending change (kube-proxy: Updated)."""
        self.last_updated = self.wall()
        self.oldest_pending = None

    def healthy(self) -> tuple[bool, float]:
        now = self.wall()
        if self.oldest_pending is None:
            return True, now
        return now - self.oldest_pending < self.health_timeout, now

    def body(self, with_node: bool) -> tuple[int, dict]:
        ok, now = self.healthy()
        doc = {"lastUpdated": go_time(self.last_updated), "currentTime": go_time(now)}
        if with_node:
            doc["nodeEligible"] = self.node_eligible
            ok = ok and self.node_eligible
        return (200 if ok else 503), doc


async def read_headers(reader: asyncio.StreamReader, budget: int) -> list[bytes] | None:
    """The header lines of one request, up to the blank line; None once they exceed ``budget`` bytes
    (the caller answers 431). Shared by this server and the health-check servers (lb/healthcheck.py)."""
    headers: list[bytes] = []
    while True:
        header = await reader.readline()
        budget -= len(header)
        if budget < 0:
            return None
        if header in (b"\r\n", b"\n", b""):
            return headers
        headers.append(header)


@dataclass
class HttpServer:
    """/healthz, /livez and /metrics on every address given to ``listen``. Gauges that are computed at
    scrape time are the agent's to keep current (``Gauge.set_function``), not this server's.

    A client never holds the event loop or the server: the whole request (line and headers) must
    arrive within ``request_timeout`` and fit ``max_header_bytes``, the answer must be taken within
    the same time, and at most ``max_connections`` are served at once (more are closed at once;
    kubelet probes and Prometheus use one each)."""
    health: HealthState
    metrics: AgentMetrics
    servers: list = field(default_factory=list)
    request_timeout: float = 5.0
    max_connections: int = 32
    max_header_bytes: int = 16384
    active: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            writer.close()  # over the limit: no read, no answer
            return
        self.active += 1
        try:
            async with asyncio.timeout(self.request_timeout):
                await self._serve(reader, writer)
        except (asyncio.TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self.active -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if await read_headers(reader, self.max_header_bytes - len(line)) is None:
            writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            await writer.drain()
            return
        parts = line.decode(errors="replace").split()
        path = parts[1].split("?")[0] if len(parts) > 1 else "/"
        if path in ("/healthz", "/livez"):
            status, doc = self.health.body(with_node=path == "/healthz")
            body, ctype = json.dumps(doc).encode(), "application/json"
            (self.metrics.healthz if path == "/healthz" else self.metrics.livez).labels(code=str(status)).inc()
        elif path == "/metrics":
            status, body, ctype = 200, self.metrics.render(), self.metrics.content_type
        else:
            status, body, ctype = 404, b"404 page not found\n", "text/plain"
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def listen(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        server = await asyncio.start_server(self.handle, host.strip("[]") or None, int(port))
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for s in self.servers:
            s.close()
