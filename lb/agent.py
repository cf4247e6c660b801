"""The agent: one asyncio run() with named tasks: a source that records changes in the tracker,
and one bounded-frequency sync loop that translates dirty Services and reconciles the maps.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable

from . import datapath
from .maps.services import MapFullError, PinnedServiceMaps
from .model import Frontend, FrontendState, ObjKey
from .reconcile import Reconciler
from .sockets import destroy_udp
from .settings import Settings
from .source.manifests import ManifestFolder
from .tracker import Tracker
from .translate import NodeView, translate_service

log = logging.getLogger("bpflb.agent")


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


class Agent:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.tracker = Tracker(settings.node_name)
        self.table = ServiceTable()
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.listed = False
        self.reconciler: Reconciler | None = None
        self.syncs = 0
        self.ready = False  # the first full sync (with prune) has succeeded

    # ---- sources -----------------------------------------------------------------------------
    async def watch_manifests(self, max_iterations: int | None = None) -> None:
        folder = ManifestFolder(self.settings.manifests)
        n = 0
        while not self.stop.is_set():
            if folder.scan() or not self.listed:
                services, slices, nodes = folder.snapshot()
                self.tracker.replace_all(services, slices, nodes.get(self.settings.node_name))
                self.listed = True  # a folder is "listed" once it has been read whole
                self.wake.set()
            n += 1
            if max_iterations is not None and n >= max_iterations:
                return
            try:
                await asyncio.wait_for(self.stop.wait(), self.settings.poll_interval)
            except asyncio.TimeoutError:
                pass

    # ---- sync loop ---------------------------------------------------------------------------
    def sync_once(self, full: bool = False) -> None:
        """Translate the dirty Services and reconcile their frontends (all, with prune, if full)."""
        dirty, all_dirty = self.tracker.take_dirty()
        if full or all_dirty:
            dirty = set(self.tracker.services) | set(self.table.frontends_of)
        node = NodeView.of(self.settings.node_name, self.tracker.node)
        scope: set[Frontend] = set()
        while dirty:
            retry: set[ObjKey] = set()
            for key in dirty:
                svc = self.tracker.services.get(key)
                fes = translate_service(svc, self.tracker.slices_for(key), node) if svc else {}
                touched, again = self.table.update(key, fes)
                scope |= touched
                retry |= again
            dirty = retry
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
        if stats.writes:
            log.info("synced %d frontends: %d backends, %d slots, %d masters written, %d deleted",
                     len(scope), stats.backends_written, stats.slots_written, stats.masters_written, stats.deleted)

    async def sync_loop(self) -> None:
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
                if pending_full:
                    last_full = self.clock()
                    if not self.ready:
                        self.ready = True
                        log.info("initial sync complete: %d frontends programmed", len(self.table.want))
                pending_full = False
                if failing:
                    log.warning("sync recovered")
                failing, delay = False, s.retry_initial
            except MapFullError as e:
                if not failing:
                    log.error("sync failed: %s", e)
                failing, pending_full = True, True
                delay = min(delay * 2, s.retry_max)
            except Exception:
                if not failing:
                    log.exception("sync failed; retrying with backoff")
                failing, pending_full = True, True
                delay = min(delay * 2, s.retry_max)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start_datapath(self) -> None:
        datapath.attach(self.settings.paths, self.settings.maps, strict=self.settings.strict)
        self.reconciler = Reconciler(PinnedServiceMaps(self.settings.paths.bpf_root),
                                     revnat_limit=self.settings.maps.revnat)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if self.reconciler is None:
            self.start_datapath()
        tasks = [asyncio.create_task(self.sync_loop(), name="sync")]
        if self.settings.manifests:
            tasks.append(asyncio.create_task(self.watch_manifests(), name="source:manifests"))
        else:
            raise SystemExit("no source: pass --manifests DIR (the API server source is not built yet)")
        stop_wait = asyncio.create_task(self.stop.wait(), name="stop")
        done, _ = await asyncio.wait(tasks + [stop_wait], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop_wait and not t.cancelled() and t.exception():
                log.error("task %s ended unexpectedly", t.get_name(), exc_info=t.exception())
            elif t is not stop_wait:
                log.error("task %s ended unexpectedly", t.get_name())
        self.stop.set()
        for t in tasks + [stop_wait]:
            t.cancel()
        _, pending = await asyncio.wait(tasks + [stop_wait], timeout=5)
        for t in pending:
            log.error("task %s did not stop", t.get_name())
        log.info("agent stopped; the datapath stays programmed")


def run(settings: Settings) -> None:
    agent = Agent(settings)
    agent.start_datapath()
    log.info("datapath attached to %s, maps pinned under %s", settings.paths.cgroup_root, settings.paths.bpf_root)
    try:
        import uvloop
        uvloop.run(agent.run())
    except ImportError:
        asyncio.run(agent.run())
