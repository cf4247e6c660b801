"""API server source: list, then watch from the list's resourceVersion, per resource, like an informer.

The response bytes go straight to lb/objects.py (``decode_page`` per list page, ``decode_event`` per
watch line, both in the I/O thread), and the parsed items to the handler through an ``Intake``
(lb/source/handler.py: the last-good rule). The kubernetes package is used for what it does well:
kubeconfig / in-cluster configuration, TLS and auth headers.

Each watch's blocking HTTP stream runs in a daemon thread that hands events to the asyncio loop.
Error handling (STYLE: watch loop; delays from ApiSettings):
  410 Gone / "too old resource version"  -> relist (state is replaced by diff, nothing dropped)
  connection errors, timeouts, 5xx, 429  -> back off (backoff_initial doubling to backoff_max), retry
  other 4xx (401, 403, 404, ...)         -> log loudly, retry slowly (refused_retry)
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

from ..objects import LABEL_HEADLESS, LABEL_PROXY_NAME, DecodeError, Event, Parsed, decode_event, decode_page
from ..settings import ApiSettings
from .handler import Handler, Intake

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

    def __init__(self, kubeconfig: str | None = None, timeout: float = ApiSettings.request_timeout):
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

    def list(self, res: Resource, limit: int = ApiSettings.page_size) -> tuple[list[Parsed], str]:
        """All items (paginated, each page parsed as it arrives so a 10 000-item list never sits in
        memory as raw JSON) and the list's resourceVersion."""
        items: list[Parsed] = []
        cont = ""
        while True:
            resp = self._open(res.path, {"labelSelector": res.label_selector, "fieldSelector": res.field_selector,
                                         "limit": limit, "continue": cont}, self.timeout)
            try:
                page = decode_page(res.kind, resp.read())
            except DecodeError as e:
                raise ApiError(0, f"reading list: {e}") from None
            except Exception as e:
                raise ApiError(0, f"reading list: {type(e).__name__}: {e}") from None
            finally:
                resp.release_conn()
            items.extend(page.items)
            cont = page.cont
            if not cont:
                return items, page.resource_version

    def watch(self, res: Resource, rv: str, timeout_seconds: int, emit: Callable[[Event], None]) -> None:
        """Stream watch events (decoded) to ``emit`` until the server ends the watch. Blocking: thread only."""
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
                        emit(decode_event(res.kind, line))
        except Exception as e:
            raise ApiError(0, f"watch stream: {type(e).__name__}: {e}") from None
        finally:
            resp.release_conn()


class Informer:
    """List + watch one resource forever, handing parsed items to an Intake (in the event loop)."""

    def __init__(self, client: KubeClient, res: Resource, intake: Intake,
                 on_error: Callable[[ApiError], None] | None = None, settings: ApiSettings = ApiSettings(),
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.res, self.intake = client, res, intake
        self.on_error = on_error or (lambda e: None)
        self.s = settings
        self.listed = asyncio.Event()
        self.rv = ""
        self.relists = 0
        self.clock = clock

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
        delay = self.s.backoff_initial
        degraded = False
        n = 0
        while not stop.is_set() and (max_iterations is None or n < max_iterations):
            n += 1
            try:
                if not self.rv:
                    items, self.rv = await self._in_thread(lambda: self.client.list(self.res, self.s.page_size))
                    self.intake.listed(self.res.kind, items)
                    del items
                    self.relists += 1
                    self.listed.set()
                await self._watch_once()
                if degraded:
                    log.warning("%s watch recovered", self.res.kind)
                degraded, delay = False, self.s.backoff_initial
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
                    wait, delay = delay, min(delay * 2, self.s.backoff_max)
                else:
                    log.error("%s: API server refused us (%s); check the ClusterRole. Retrying in %.0f s",
                              self.res.kind, e, self.s.refused_retry)
                    degraded = True
                    wait = self.s.refused_retry
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
                delay = min(delay * 2, self.s.backoff_max)

    async def _watch_once(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        def stream() -> None:
            try:
                self.client.watch(self.res, self.rv, self.s.watch_timeout, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        # The stream thread is never awaited on the way out (cancel, ERROR event): it ends by itself
        # when the server closes the watch, and it is a daemon thread.
        done = asyncio.ensure_future(self._in_thread(stream))
        while True:
            ev = await queue.get()
            if ev is None:
                break
            if ev.type == "ERROR":
                done.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning
                raise ApiError(ev.status_code or 500, ev.message)
            if ev.type == "DELETED":
                self.intake.deleted(self.res.kind, ev.item.key)
            elif ev.type in ("ADDED", "MODIFIED"):
                self.intake.changed(ev.item)
            if ev.resource_version:
                self.rv = ev.resource_version
        await done  # a stream that failed raises its ApiError here


def kube_source(settings, handler: Handler, stop: asyncio.Event,
                on_error: Callable[[ApiError], None] = lambda e: None) -> tuple[list[Informer], Callable]:
    """The three informers of an agent and the coroutine that runs them: it tells the handler
    ``synced`` once all of them have listed, and only returns when stopping (or raises)."""
    client = KubeClient(settings.kubeconfig, settings.api.request_timeout)
    intake = Intake(handler)
    nodes = NODES if settings.network_mode != "none" else node_resource(settings.node_name)
    informers = [Informer(client, res, intake, on_error, settings.api) for res in (SERVICES, ENDPOINT_SLICES, nodes)]

    async def run() -> None:
        runs = [asyncio.create_task(i.run(stop), name=f"watch:{i.res.kind}") for i in informers]
        listed = asyncio.ensure_future(asyncio.gather(*(i.listed.wait() for i in informers)))
        try:
            done, _ = await asyncio.wait([listed, *runs], return_when=asyncio.FIRST_COMPLETED)
            if listed in done:
                log.info("Services, EndpointSlices and Nodes listed")
                intake.synced()
                done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
            for t in done:  # an informer only returns when stopping; anything else is a bug
                t.result()
        finally:
            for t in runs:
                t.cancel()
            listed.cancel()
            await asyncio.gather(*runs, listed, return_exceptions=True)

    return informers, run
