"""The agent: one asyncio run() with named tasks: sources that only record changes in the tracker,
one bounded-frequency sync loop that translates dirty Services and reconciles the maps, and the
health/metrics server.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import signal
import time
from typing import Callable

from . import datapath, nodenet
from .health import HealthState, HttpServer
from .maps.services import MapFullError, PinnedServiceMaps
from .maps.structs import BACKENDS_MAP, REVNAT_MAP, SERVICES_MAP
from .metrics import AgentMetrics
from .model import Frontend, FrontendState, ObjKey
from .objects import ObjectError, parse_endpoint_slice, parse_node, parse_service
from .reconcile import Reconciler
from .settings import Settings
from .sockets import destroy_udp
from .source.manifests import ManifestFolder
from .tracker import Tracker
from .translate import NodeView, translate_service

log = logging.getLogger("bpflb.agent")

TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


class ServiceTable:
    """Desired frontends, kept per Service so one Service can be re-translated alone."""

    def __init__(self) -> None:
        self.want: dict[Frontend, FrontendState] = {}
        self.owner: dict[Frontend, ObjKey] = {}
        self.frontends_of: dict[ObjKey, set[Frontend]] = {}
        self.conflicts: set[ObjKey] = set()

    def update(self, key: ObjKey, frontends: dict[Frontend, FrontendState]) -> tuple[set[Frontend], set[ObjKey]]:
        """Replace one Service's frontends; returns (frontends touched, Services to retry after a
        frontend they wanted was freed)."""
        touched = set()
        freed = False
        for fe in self.frontends_of.pop(key, set()):
            if self.owner.get(fe) == key:
                del self.owner[fe]
                del self.want[fe]
                touched.add(fe)
                freed = True
        mine = set()
        for fe, state in frontends.items():
            other = self.owner.get(fe)
            if other is not None and other != key:
                log.warning("frontend %s of Service %s is already Service %s's; ignored", fe, key, other)
                self.conflicts.add(key)
                continue
            self.owner[fe] = key
            self.want[fe] = state
            mine.add(fe)
            touched.add(fe)
        if mine:
            self.frontends_of[key] = mine
        retry: set[ObjKey] = set()
        if freed and self.conflicts:
            retry, self.conflicts = self.conflicts - {key}, set()
        return touched, retry


def _trigger_time(obj: dict) -> float | None:
    text = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_ANNOTATION)
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _describe(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '?')}".replace(" /", " ")


class Agent:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.settings = settings
        self.clock, self.wall = clock, wall
        self.tracker = Tracker(settings.node_name)
        self.table = ServiceTable()
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.listed = False  # every source finished its initial list: pruning is allowed
        self.reconciler: Reconciler | None = None
        self.syncs = 0
        self.ready = False  # the first full sync (with prune) has succeeded
        self.health = HealthState(settings.health_timeout, wall)
        self.metrics = AgentMetrics()
        self.informers: list = []
        self.attaching = None  # the child loading the datapath (start_datapath)
        self.datapath_task: asyncio.Task | None = None
        self.net_problems: tuple[str, ...] = ()
        self.net_plan: nodenet.Plan | None = None  # planned by sync_once, applied by apply_nodes

    # ---- recording changes (sources call these; they never act) -------------------------------
    def changed(self) -> None:
        self.health.queued()
        self.metrics.pending.set(len(self.tracker.dirty))
        self.wake.set()

    def _parse(self, parser, obj: dict):
        try:
            return parser(obj)
        except ObjectError as e:
            log.error("bad object from the API server: %s: %s: %s (last good version kept)", _describe(obj),
                      e.field, e.reason)
            return None

    @staticmethod
    def _key(obj: dict) -> ObjKey:
        meta = obj.get("metadata") or {}
        return ObjKey(meta.get("namespace", ""), meta.get("name", ""))

    def service_entry(self, obj: dict) -> tuple:
        """Applied to each listed item as its page arrives, so a 10 000-item list never sits in
        memory as raw JSON (measured: the largest part of the agent's peak RSS)."""
        return self._key(obj), self._parse(parse_service, obj)

    def slice_entry(self, obj: dict) -> tuple:
        return self._key(obj), self._parse(parse_endpoint_slice, obj), _trigger_time(obj)

    def api_services(self, items: list) -> None:
        """A complete list: (key, Service or None if malformed) per item; raw dicts are accepted too."""
        parsed = {}
        for item in items:
            key, svc = item if isinstance(item, tuple) else self.service_entry(item)
            if svc is None:  # malformed: keep what we had
                if key in self.tracker.services:
                    parsed[key] = self.tracker.services[key]
                continue
            parsed[svc.key] = svc
        self.tracker.replace_services(parsed)
        self.changed()

    def api_service_event(self, kind: str, obj: dict) -> None:
        if kind == "DELETED":
            self.tracker.set_service(self._key(obj), None)
        else:
            svc = self._parse(parse_service, obj)
            if svc is None:
                return
            self.tracker.set_service(svc.key, svc)
        self.changed()

    def api_slices(self, items: list) -> None:
        parsed = {}
        for item in items:
            key, es, trigger = item if isinstance(item, tuple) else self.slice_entry(item)
            if es is None:
                if key in self.tracker.slices:
                    parsed[key] = self.tracker.slices[key]
                continue
            parsed[es.key] = es
            if es.service is not None and trigger is not None:
                self.tracker.note_trigger(es.service, trigger)
        self.tracker.replace_slices(parsed)
        self.changed()

    def api_slice_event(self, kind: str, obj: dict) -> None:
        if kind == "DELETED":
            self.tracker.set_slice(self._key(obj), None)
        else:
            _, es, trigger = self.slice_entry(obj)
            if es is None:
                return
            if self.tracker.set_slice(es.key, es) and es.service is not None and trigger is not None:
                self.tracker.note_trigger(es.service, trigger)
        self.changed()

    def api_nodes(self, items: list[dict]) -> None:
        nodes = {n.name: n for n in (self._parse(parse_node, o) for o in items) if n is not None}
        self.tracker.replace_nodes(nodes)
        self._node_changed()

    def api_node_event(self, kind: str, obj: dict) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        if kind == "DELETED":
            self.tracker.set_any_node(name, None)
        else:
            node = self._parse(parse_node, obj)
            if node is None:
                return
            self.tracker.set_any_node(node.name, node)
        self._node_changed()

    def _node_changed(self) -> None:
        node = self.tracker.node
        self.health.node_eligible = not (node and node.deleting)
        if self.tracker.all_dirty or self.tracker.nodes_dirty:
            self.changed()

    # ---- sources -----------------------------------------------------------------------------
    async def watch_manifests(self, max_iterations: int | None = None) -> None:
        folder = ManifestFolder(self.settings.manifests)
        n = 0
        while not self.stop.is_set():
            if folder.scan() or not self.listed:
                services, slices, nodes = folder.snapshot()
                self.tracker.replace_services(services)
                self.tracker.replace_slices(slices)
                self.tracker.replace_nodes(nodes)
                self.health.node_eligible = not (self.tracker.node and self.tracker.node.deleting)
                self.listed = True  # a folder is "listed" once it has been read whole
                self.changed()
            n += 1
            if max_iterations is not None and n >= max_iterations:
                return
            try:
                await asyncio.wait_for(self.stop.wait(), self.settings.poll_interval)
            except asyncio.TimeoutError:
                pass

    def kube_tasks(self) -> list[asyncio.Task]:
        from .source.kube import ENDPOINT_SLICES, NODES, SERVICES, Informer, KubeClient, node_resource

        client = KubeClient(self.settings.kubeconfig)

        def on_error(e) -> None:
            self.metrics.api_errors.inc(code=str(e.status))

        self.informers = [
            Informer(client, SERVICES, self.api_services, self.api_service_event, on_error, convert=self.service_entry),
            Informer(client, ENDPOINT_SLICES, self.api_slices, self.api_slice_event, on_error, convert=self.slice_entry),
            Informer(client, NODES if self.settings.network_mode != "none" else node_resource(self.settings.node_name),
                     self.api_nodes, self.api_node_event, on_error),
        ]

        async def watch_all() -> None:
            """The informers, plus the moment all of them have listed (pruning is allowed from then)."""
            runs = [asyncio.create_task(i.run(self.stop), name=f"watch:{i.res.kind}") for i in self.informers]
            try:
                listed = asyncio.gather(*(i.listed.wait() for i in self.informers))
                done, _ = await asyncio.wait([listed, *runs], return_when=asyncio.FIRST_COMPLETED)
                if listed in done:
                    self.listed = True
                    log.info("Services, EndpointSlices and Node listed")
                    self.changed()
                    done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
                for t in done:  # an informer only returns when stopping; anything else is a bug
                    t.result()
            finally:
                for t in runs:
                    t.cancel()
                listed.cancel()
                await asyncio.gather(*runs, listed, return_exceptions=True)

        return [asyncio.create_task(watch_all(), name="source:kube")]

    # ---- sync loop ---------------------------------------------------------------------------
    def sync_once(self, full: bool = False) -> None:
        """Translate the dirty Services and reconcile their frontends (all, with prune, if full)."""
        t0 = self.clock()
        dirty, all_dirty = self.tracker.take_dirty()
        if full or all_dirty:
            dirty = set(self.tracker.services) | set(self.table.frontends_of)
        node = NodeView.of(self.settings.node_name, self.tracker.node)
        scope: set[Frontend] = set()
        synced = set(dirty)
        while dirty:
            retry: set[ObjKey] = set()
            for key in dirty:
                svc = self.tracker.services.get(key)
                fes = translate_service(svc, self.tracker.slices_for(key), node) if svc else {}
                touched, again = self.table.update(key, fes)
                scope |= touched
                retry |= again
            dirty = retry
            synced |= retry
        assert self.reconciler is not None
        stats = self.reconciler.sync(self.table.want, scope, prune=full and self.listed)
        self.syncs += 1
        # After the maps: connected UDP sockets still aimed at a removed backend are destroyed
        # (kube-proxy flushes conntrack for the same reason).
        udp_gone = {(rid, b) for rid, b in stats.removed if b.protocol == "UDP"}
        if udp_gone:
            n = destroy_udp(self.settings.paths.cgroup_root, self.settings.paths.bpf_root, udp_gone)
            if n:
                log.info("destroyed %d connected UDP socket(s) of removed backends", n)
        if (self.tracker.nodes_dirty or full) and self.settings.network_mode != "none":
            self.tracker.nodes_dirty = False
            self.net_plan = self.plan_nodes()
        now = self.wall()
        for t in self.tracker.take_triggers(synced):
            self.metrics.programming_latency.observe(max(0.0, now - t))
        self.metrics.sync_duration.observe(self.clock() - t0)
        self.metrics.services.set(len(self.reconciler.have))
        self.metrics.backends.set(len(self.reconciler.backend_of))
        self.metrics.last_sync.set(now)
        if stats.writes:
            log.info("synced %d frontends: %d backends, %d slots, %d masters written, %d deleted",
                     len(scope), stats.backends_written, stats.slots_written, stats.masters_written, stats.deleted)

    def plan_nodes(self) -> nodenet.Plan:
        """Pod networking between nodes (lb/nodenet.py): the plan, from every Node."""
        plan = nodenet.plan(self.settings.node_name, self.tracker.nodes, self.settings.network_mode)
        if plan.problems != self.net_problems:
            for p in plan.problems:
                log.warning("pod network: %s", p)
            self.net_problems = plan.problems
        return plan

    async def apply_nodes(self) -> None:
        """Netlink in a worker thread: pyroute2 0.9 drives its sockets with the running event loop,
        which uvloop cannot do for netlink; in a thread it has no loop and stays synchronous."""
        plan, self.net_plan = self.net_plan, None
        if plan is not None:
            for change in await asyncio.to_thread(nodenet.apply, plan):
                log.info("pod network: %s", change)

    async def sync_loop(self) -> None:
        await self.datapath_ready()  # sources already run meanwhile: their changes wait in the tracker
        s = self.settings.sync
        last = -1e9
        last_full = self.clock()  # the first sync is full anyway (pending_full)
        delay = s.retry_initial
        failing = False
        pending_full = True
        while not self.stop.is_set():
            timeout = max(0.0, last_full + s.full_resync - self.clock())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout if not failing else delay)
            except asyncio.TimeoutError:
                pending_full = True
            if self.stop.is_set():
                return
            wait = last + s.min_interval - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)  # coalesce bursts: at most one sync per min_interval
            self.wake.clear()
            if not self.listed:
                continue
            last = self.clock()
            try:
                if pending_full:
                    self.reconciler.restore()  # re-read the kernel: drift is rewritten
                    self.tracker.all_dirty = True
                self.sync_once(full=pending_full)
                await self.apply_nodes()
                self.health.updated()
                self.metrics.pending.set(len(self.tracker.dirty))
                if pending_full:
                    last_full = self.clock()
                    if not self.ready:
                        self.ready = True
                        gc.freeze()  # what the first sync built lives as long as the agent: stop rescanning it
                        log.info("initial sync complete: %d frontends programmed", len(self.table.want))
                pending_full = False
                if failing:
                    log.warning("sync recovered")
                failing, delay = False, s.retry_initial
            except Exception as e:
                self.metrics.sync_errors.inc()
                if not failing:
                    if isinstance(e, MapFullError):
                        log.error("sync failed: %s", e)
                    else:
                        log.exception("sync failed; retrying with backoff")
                failing, pending_full = True, True
                delay = min(delay * 2, s.retry_max)

    # ---- lifecycle ---------------------------------------------------------------------------
    def check_kube_proxy(self) -> None:
        """Strict mode refuses to run beside kube-proxy's rules (see lb/kube_proxy_rules.py)."""
        from . import kube_proxy_rules

        if self.settings.remove_kube_proxy_rules:
            for item in kube_proxy_rules.remove():
                log.warning("removed kube-proxy rule: %s", item)
        found = kube_proxy_rules.find()
        if found and self.settings.strict:
            raise datapath.DatapathError(
                "strict mode: kube-proxy's rules are present on this node (" + "; ".join(found[:5]) +
                (f"; and {len(found) - 5} more" if len(found) > 5 else "") +
                "). Stop kube-proxy, then start with --remove-kube-proxy-rules (or --no-strict to run beside them)")
        for item in found:
            log.warning("kube-proxy leftover (not strict): %s", item)

    def start_datapath(self) -> None:
        """Refuse (strict) beside kube-proxy, then start loading the datapath in a child process."""
        self.check_kube_proxy()
        self.attaching = datapath.start_attach_child(self.settings.paths, self.settings.maps, strict=self.settings.strict)

    async def finish_datapath(self) -> None:
        """The datapath is attached and its maps pinned: reconcile can adopt them."""
        await asyncio.to_thread(datapath.finish_attach_child, self.attaching)
        self.reconciler = Reconciler(PinnedServiceMaps(self.settings.paths.bpf_root),
                                     revnat_limit=self.settings.maps.revnat)
        log.info("datapath attached to %s, maps pinned under %s", self.settings.paths.cgroup_root,
                 self.settings.paths.bpf_root)

    async def datapath_ready(self) -> None:
        if self.reconciler is None:
            await self.datapath_task

    async def serve_cni(self) -> None:
        """The bundled CNI plugin's server; the launcher and conflist are installed first if asked."""
        from .cni import install, server

        s = self.settings
        if s.cni_bin_dir and s.cni_conf_dir:
            launcher = os.environ.get("BPFLB_CNI_LAUNCHER") or await asyncio.to_thread(install.build_launcher)
            binary, conf = install.install(s.cni_bin_dir, s.cni_conf_dir, launcher=launcher,
                                           mtu=1450 if s.network_mode == "overlay" else 1500)
            log.info("installed CNI plugin %s and %s", binary, conf)

        def defaults() -> dict:
            """The pod CIDR comes from this node's Node object unless the conflist names one."""
            node = self.tracker.node
            v4 = [c for c in (node.pod_cidrs if node else ()) if ":" not in c]
            return {"podCIDR": v4[0]} if v4 else {}

        from .maps.endpoints import PinnedEndpointMap

        await self.datapath_ready()
        endpoints = PinnedEndpointMap(s.paths.bpf_root)
        try:
            await server.serve(s.cni_socket, self.stop, defaults, endpoints)
        finally:
            endpoints.close()

    def render_metrics(self) -> str:
        sizes = self.settings.maps
        if self.reconciler is not None:  # from what reconcile holds: no map walk per scrape
            r = self.reconciler
            self.metrics.map_fill.set(sum(len(p.slots) + 1 for p in r.have.values()) / sizes.services, map=SERVICES_MAP)
            self.metrics.map_fill.set(len(r.backend_of) / sizes.backends, map=BACKENDS_MAP)
            self.metrics.map_fill.set(len(r.have) / sizes.revnat, map=REVNAT_MAP)
        return self.metrics.registry.render()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if self.reconciler is None:
            if self.attaching is None:
                self.start_datapath()
            self.datapath_task = asyncio.create_task(self.finish_datapath(), name="datapath")
        http = HttpServer(self.health, self.render_metrics)
        for what, addr in (("healthz", self.settings.healthz_bind), ("metrics", self.settings.metrics_bind)):
            if addr:
                try:
                    port = await http.listen(addr)
                    log.info("serving %s on %s (port %d)", what, addr, port)
                except OSError as e:  # the datapath matters more than the endpoint: go on without it
                    log.error("cannot serve %s on %s: %s", what, addr, e.strerror)
        tasks = [asyncio.create_task(self.sync_loop(), name="sync")]
        if self.settings.cni_socket:
            tasks.append(asyncio.create_task(self.serve_cni(), name="cni"))
        if self.settings.manifests:
            tasks.append(asyncio.create_task(self.watch_manifests(), name="source:manifests"))
        else:
            tasks += self.kube_tasks()
        stop_wait = asyncio.create_task(self.stop.wait(), name="stop")
        done, _ = await asyncio.wait(tasks + [stop_wait], return_when=asyncio.FIRST_COMPLETED)
        failed = self.datapath_task.exception() if self.datapath_task and self.datapath_task.done() else None
        for t in done:
            if t is stop_wait or (failed and not t.cancelled() and t.exception() is failed):
                continue
            if not t.cancelled() and t.exception():
                log.error("task %s ended unexpectedly", t.get_name(), exc_info=t.exception())
            else:
                log.error("task %s ended unexpectedly", t.get_name())
        self.stop.set()
        http.close()
        for t in tasks + [stop_wait]:
            t.cancel()
        _, pending = await asyncio.wait(tasks + [stop_wait], timeout=5)
        for t in pending:
            log.error("task %s did not stop", t.get_name())
        if failed:
            raise failed  # the CLI reports it (e.g. strict mode: a hook the kernel refused)
        log.info("agent stopped; the datapath stays programmed")


def run(settings: Settings) -> None:
    # The first list builds ~10 objects per endpoint, all long-lived: with the default thresholds
    # the collector rescans them over and over (half of a 10k-Service initial sync, measured).
    gc.set_threshold(50_000, 20, 20)
    agent = Agent(settings)
    agent.start_datapath()
    try:
        import uvloop
        uvloop.run(agent.run())
    except ImportError:
        asyncio.run(agent.run())
