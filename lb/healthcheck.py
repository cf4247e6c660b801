"""healthCheckNodePort servers, as kube-proxy serves them (pkg/proxy/healthcheck/service_health.go, v1.34).

One ServiceHealthServer per IP family (kube-proxy runs one per family proxier), listening on that
family's addresses (lb/translate.py health_check_addresses: the node IPs --nodeport-addresses
selects, or the family's wildcard when it matches all). ``sync_services`` opens one HTTP server per
Service on its healthCheckNodePort and closes those no longer wanted (SyncServices: a Service whose
port changed is closed and reopened; one that fails to listen is logged and retried at the next
sync); ``sync_endpoints`` sets each Service's local ready endpoint count (SyncEndpoints: a Service
not named has 0).

Every request, whatever its method and path, is answered by hcHandler.ServeHTTP: 200 when the
Service has local endpoints and the proxy is healthy, else 503; headers Content-Type:
application/json, X-Content-Type-Options: nosniff, X-Load-Balancing-Endpoint-Weight: <count>, then
Go's Date and Content-Length; the body is the handler's dedented JSON text (tab-indented). Headers
come in Go's order (the handler's sorted, then Date, Content-Length). Connections are kept alive as
Go's server keeps them (HTTP/1.1 unless the client says close), within a per-request timeout.

Deviation, documented: with a family matching all addresses kube-proxy listens on "0.0.0.0" for both
families (Go makes it one dual-stack socket, so the second family's listen fails and the first
family's count answers both); here each family listens on its own wildcard with its own count.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
from dataclasses import dataclass, field
from typing import Callable

from .health import read_headers
from .model import ObjKey

log = logging.getLogger("bpflb.healthcheck")

REASONS = {200: "OK", 503: "Service Unavailable"}


def body_of(key: ObjKey, count: int, healthy: bool) -> bytes:
    """The handler's body: strings.Trim(dedent.Dedent(...), "\\n") of its template (names are DNS
    labels, so Go's %q and JSON quoting agree)."""
    return (f'{{\n\t"service": {{\n\t\t"namespace": {json.dumps(key.namespace)},\n\t\t"name": {json.dumps(key.name)}'
            f'\n\t}},\n\t"localEndpoints": {count},\n\t"serviceProxyHealthy": {"true" if healthy else "false"}\n}}'
            ).encode()


@dataclass
class _Instance:
    """hcInstance: one Service's port, its listeners and its local endpoint count."""
    key: ObjKey
    port: int
    servers: list = field(default_factory=list)
    conns: set = field(default_factory=set)  # open connections: closed with the servers (Go's Server.Close)
    endpoints: int = 0


class ServiceHealthServer:
    def __init__(self, addresses: tuple[str, ...], healthy: Callable[[], bool], node_name: str = "",
                 request_timeout: float = 5.0, max_connections: int = 64, max_header_bytes: int = 16384) -> None:
        self.addresses = tuple(addresses)
        self.healthy = healthy  # the proxy's own health (kube-proxy: healthzServer.Health().Healthy)
        self.node_name = node_name
        self.request_timeout, self.max_connections, self.max_header_bytes = request_timeout, max_connections, max_header_bytes
        self.services: dict[ObjKey, _Instance] = {}
        self.active = 0
        self.failed: dict[ObjKey, int] = {}  # Service -> port it could not listen on (logged once)

    # ---- SyncServices / SyncEndpoints -----------------------------------------------------------
    async def set_addresses(self, addresses: tuple[str, ...]) -> None:
        """The node addresses changed: every server is reopened on the new ones at the next sync."""
        if tuple(addresses) != self.addresses:
            self.addresses = tuple(addresses)
            for inst in list(self.services.values()):
                await self._close(inst)
            self.services.clear()

    async def sync_services(self, ports: dict[ObjKey, int]) -> None:
        for key, inst in list(self.services.items()):
            if ports.get(key) != inst.port:
                log.info("closing healthcheck for Service %s on port %d", key, inst.port)
                await self._close(inst)
                del self.services[key]
        for key, port in ports.items():
            if key in self.services:
                continue
            inst = _Instance(key, port)
            try:
                for addr in self.addresses:
                    inst.servers.append(await asyncio.start_server(
                        lambda r, w, key=key: self._handle(key, r, w), addr, port, reuse_address=True))
            except OSError as e:
                await self._close(inst)  # whatever was opened, so a retry (or another owner) can have the port
                if self.failed.get(key) != port:
                    log.error("node %s failed to start healthcheck %r on port %d: %s", self.node_name, str(key),
                              port, e.strerror or e)
                self.failed[key] = port
                continue
            self.failed.pop(key, None)
            log.info("opened healthcheck for Service %s on port %d (%s)", key, port, ", ".join(self.addresses))
            self.services[key] = inst
        for key in list(self.failed):
            if key not in ports:
                del self.failed[key]

    def sync_endpoints(self, counts: dict[ObjKey, int]) -> None:
        for key, inst in self.services.items():
            inst.endpoints = counts.get(key, 0)

    async def close(self) -> None:
        for inst in self.services.values():
            await self._close(inst)
        self.services.clear()

    @staticmethod
    async def _close(inst: _Instance) -> None:
        for s in inst.servers:
            s.close()  # no new connections; the port is free at once
        for w in inst.conns:
            w.close()  # and kept-alive ones end, as Go's Server.Close ends them
        inst.servers, inst.conns = [], set()

    # ---- hcHandler ----------------------------------------------------------------------------
    def answer(self, key: ObjKey, head: bool) -> bytes:
        inst = self.services.get(key)
        date = email.utils.formatdate(usegmt=True)
        if inst is None:  # a request for a closed healthcheck: the handler writes nothing
            return f"HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: 0\r\n".encode()
        count, healthy = inst.endpoints, bool(self.healthy())
        status = 200 if count != 0 and healthy else 503
        body = body_of(key, count, healthy)
        head_lines = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
                      f"X-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {count}\r\n"
                      f"Date: {date}\r\nContent-Length: {len(body)}\r\n").encode()
        return head_lines + b"\0" + (b"" if head else body)

    async def _handle(self, key: ObjKey, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            writer.close()
            return
        self.active += 1
        inst = self.services.get(key)
        if inst is not None:
            inst.conns.add(writer)
        try:
            while True:
                async with asyncio.timeout(self.request_timeout):
                    keep = await self._serve_one(key, reader, writer)
                if not keep:
                    break
        except (asyncio.TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            if inst is not None:
                inst.conns.discard(writer)
            writer.close()

    async def _serve_one(self, key: ObjKey, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request; True to keep the connection for another."""
        line = await reader.readline()
        if not line:
            return False
        size, close = len(line), False
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Connection: close\r\n\r\n400 Bad Request")
            await writer.drain()
            return False
        method, version = parts[0], parts[2]
        close = version == "HTTP/1.0"
        headers = await read_headers(reader, self.max_header_bytes - size)
        if headers is None:
            writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; "
                         b"charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large")
            await writer.drain()
            return False
        for header in headers:
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "connection":
                v = value.strip().lower()
                close = v == "close" or (version == "HTTP/1.0" and v != "keep-alive")
        head, _, body = self.answer(key, method == "HEAD").partition(b"\0")
        writer.write(head + (b"Connection: close\r\n" if close and version != "HTTP/1.0" else b"") + b"\r\n" + body)
        await writer.drain()
        return not close
