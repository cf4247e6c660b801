"""API server source: list, then watch from the list's resourceVersion, per resource, like an informer.

Raw JSON instead of the client's typed models: decoding 10 000 Services into generated model classes
costs seconds and hundreds of MB, while lb.objects parses the plain dicts that json.loads gives
(the typed models are also what kube-proxy replacements in Python usually drown in). The kubernetes
package is used for what it does well: kubeconfig / in-cluster configuration, TLS and auth headers.

Each watch's blocking HTTP stream runs in a daemon thread that hands events to the asyncio loop; the
loop applies them to the tracker. Error handling (STYLE: watch loop):
  410 Gone / "too old resource version"  -> relist (state is replaced by diff, nothing dropped)
  connection errors, timeouts, 5xx, 429  -> back off (0.5 s doubling to 30 s) and watch/relist again
  other 4xx (401, 403, 404, ...)         -> log loudly, retry slowly (60 s)
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlencode

from ..objects import LABEL_HEADLESS, LABEL_PROXY_NAME, ObjectError

log = logging.getLogger("bpflb.source.kube")

# kube-proxy's informer selector (cmd/kube-proxy/app/server.go): not another proxy's, not headless.
PROXY_SELECTOR = f"!{LABEL_PROXY_NAME},!{LABEL_HEADLESS}"


@dataclass(frozen=True)
class Resource:
    kind: str
    path: str  # collection path
    label_selector: str = ""
    field_selector: str = ""


SERVICES = Resource("Service", "/api/v1/services", PROXY_SELECTOR)
ENDPOINT_SLICES = Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", PROXY_SELECTOR)


NODES = Resource("Node", "/api/v1/nodes")


def node_resource(name: str) -> Resource:
    return Resource("Node", "/api/v1/nodes", field_selector=f"metadata.name={name}")


class ApiError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def retry_fast(self) -> bool:
        return self.status >= 500 or self.status == 429 or self.status == 0


class KubeClient:
    """Just enough HTTP: GET a list, stream a watch. Configuration from the kubernetes package."""

    def __init__(self, kubeconfig: str | None = None, timeout: float = 30.0):
        from kubernetes import client, config

        cfg = client.Configuration()
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
        self.api = client.ApiClient(cfg)
        self.timeout = timeout

    def _open(self, path: str, query: dict[str, Any], read_timeout: float):
        import urllib3

        q = [(k, v) for k, v in query.items() if v not in (None, "")]
        _m, url, headers, _b, _p = self.api.param_serialize("GET", path, query_params=q,
                                                           header_params={"Accept": "application/json"},
                                                           auth_settings=["BearerToken"])
        try:
            resp = self.api.rest_client.pool_manager.request(
                "GET", url, headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=5.0, read=read_timeout), retries=False)
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(0, f"{type(e).__name__}: {e}") from None
        if resp.status != 200:
            body = resp.read()
            resp.release_conn()
            try:
                reason = json.loads(body).get("message", "")
            except ValueError:
                reason = body[:200].decode(errors="replace")
            raise ApiError(resp.status, reason)
        return resp

    def list(self, res: Resource, limit: int = 500, convert: Callable[[dict], Any] | None = None) -> tuple[list, str]:
        """All items (paginated), each passed through ``convert`` as its page arrives, and the list's
        resourceVersion."""
        items: list = []
        cont = ""
        while True:
            resp = self._open(res.path, {"labelSelector": res.label_selector, "fieldSelector": res.field_selector,
                                         "limit": limit, "continue": cont}, self.timeout)
            try:
                data = json.loads(resp.read())
            except Exception as e:
                raise ApiError(0, f"reading list: {e}") from None
            finally:
                resp.release_conn()
            page = data.get("items") or []
            items.extend(map(convert, page) if convert else page)
            meta = data.get("metadata") or {}
            del data, page
            cont = meta.get("continue") or ""
            if not cont:
                return items, meta.get("resourceVersion", "")

    def watch(self, res: Resource, rv: str, timeout_seconds: int, emit: Callable[[dict], None]) -> None:
        """Stream watch events to ``emit`` until the server ends the watch. Blocking: thread only."""
        resp = self._open(res.path, {"labelSelector": res.label_selector, "fieldSelector": res.field_selector,
                                     "watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true",
                                     "timeoutSeconds": timeout_seconds}, timeout_seconds + 15)
        buf = b""
        try:
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        emit(json.loads(line))
        except Exception as e:
            raise ApiError(0, f"watch stream: {type(e).__name__}: {e}") from None
        finally:
            resp.release_conn()


class Informer:
    """List + watch one resource forever, applying changes through callbacks (in the event loop)."""

    def __init__(self, client: KubeClient, res: Resource, on_replace: Callable[[list[dict]], None],
                 on_event: Callable[[str, dict], None], on_error: Callable[[ApiError], None] | None = None,
                 watch_timeout: int = 300, clock: Callable[[], float] = time.monotonic,
                 convert: Callable[[dict], Any] | None = None):
        self.client, self.res = client, res
        self.on_replace, self.on_event = on_replace, on_event
        self.on_error = on_error or (lambda e: None)
        self.watch_timeout = watch_timeout
        self.listed = asyncio.Event()
        self.rv = ""
        self.relists = 0
        self.clock = clock
        self.convert = convert  # applied to listed items page by page (see KubeClient.list)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        """Run blocking I/O in a daemon thread (an executor's threads would block interpreter exit
        while a watch is parked on the server)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def work() -> None:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the loop
                loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
            else:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

        threading.Thread(target=work, name=f"watch:{self.res.kind}", daemon=True).start()
        return await fut

    async def run(self, stop: asyncio.Event, max_iterations: int | None = None) -> None:
        delay = 0.5
        degraded = False
        n = 0
        while not stop.is_set() and (max_iterations is None or n < max_iterations):
            n += 1
            try:
                if not self.rv:
                    items, self.rv = await self._in_thread(lambda: self.client.list(self.res, convert=self.convert))
                    self.on_replace(items)
                    self.relists += 1
                    self.listed.set()
                await self._watch_once()
                if degraded:
                    log.warning("%s watch recovered", self.res.kind)
                degraded, delay = False, 0.5
            except ApiError as e:
                self.on_error(e)
                if e.gone:
                    log.info("%s watch: resourceVersion %s is gone (410); relisting", self.res.kind, self.rv)
                    self.rv = ""
                    continue
                if e.retry_fast:
                    if not degraded:
                        log.warning("%s watch failing, backing off: %s", self.res.kind, e)
                    degraded = True
                    wait, delay = delay, min(delay * 2, 30.0)
                else:
                    log.error("%s: API server refused us (%s); check the ClusterRole. Retrying in 60 s",
                              self.res.kind, e)
                    degraded = True
                    wait = 60.0
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            except Exception:  # a bug or a payload we did not expect: never let the watch die
                log.exception("%s watch: unexpected error; relisting after %.1f s", self.res.kind, delay)
                self.rv = ""
                degraded = True
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)

    async def _watch_once(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        def stream() -> None:
            try:
                self.client.watch(self.res, self.rv, self.watch_timeout, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        # The stream thread is never awaited on the way out (cancel, ERROR event): it ends by itself
        # when the server closes the watch, and it is a daemon thread.
        done = asyncio.ensure_future(self._in_thread(stream))
        while True:
            ev = await queue.get()
            if ev is None:
                break
            kind = ev.get("type")
            obj = ev.get("object") or {}
            if kind == "ERROR":
                done.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning
                code = obj.get("code", 0)
                raise ApiError(code or 500, obj.get("message", "watch error"))
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if kind != "BOOKMARK":
                self.on_event(kind, obj)
            if rv:
                self.rv = rv
        await done  # a stream that failed raises its ApiError here
