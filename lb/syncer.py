"""One sync: the tracker's dirty Services -> translate -> the service table -> reconcile -> the maps,
then what follows a reconcile (UDP sockets of removed backends, the pod network plan) and the metrics.

The bounded-frequency runner (lb/runner.py) decides when; this decides what. A sync that fails puts
its Services back in the tracker and raises (the runner retries with backoff); the reconciler's view
stays equal to the kernel's after a failed write (lb/reconcile.py), so a retry redoes only what
failed. An unexpected error (not a map write) makes the retry a full one, which re-reads the kernel.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Callable

from . import nodenet
from .health import HealthState
from .maps.services import MapFullError
from .metrics import AgentMetrics
from .model import Frontend, ObjKey
from .reconcile import Reconciler
from .service_table import ServiceTable
from .settings import Settings
from .sockets import DestroyTimeout, destroy_udp
from .tracker import Tracker
from .translate import NodeView, translate_service

log = logging.getLogger("bpflb.syncer")


class Syncer:
    def __init__(self, settings: Settings, tracker: Tracker, reconciler: Reconciler, metrics: AgentMetrics,
                 health: HealthState, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings, self.tracker, self.reconciler = settings, tracker, reconciler
        self.metrics, self.health = metrics, health
        self.clock, self.wall = clock, wall
        self.table = ServiceTable()
        self.need_full = True  # the first sync after every source listed is full (with prune)
        self.ready = False  # the first full sync has succeeded
        self.syncs = 0
        self.net_plan: nodenet.Plan | None = None  # planned by plan(), applied by apply()
        self.net_problems: tuple[str, ...] = ()
        self.failing = False

    # ---- the runner's function -----------------------------------------------------------------
    async def __call__(self, full: bool) -> None:
        """One sync (full: re-read the kernel, rewrite every frontend, prune what nothing wants)."""
        full = full or self.need_full
        if not self.tracker.listed:
            self.need_full = full  # nothing is programmed before every source listed
            return
        try:
            stats = self.plan_and_reconcile(full)
            await self.after_reconcile(stats)
        except Exception as e:
            self.metrics.sync_errors.inc()
            # A map write failure leaves the reconciler equal to the kernel: the retry redoes what
            # failed. Anything else (a bug, a kernel surprise): the retry re-reads the kernel.
            if not isinstance(e, MapFullError) and not getattr(e, "map_write", False):
                self.need_full = True
            if not self.failing:
                if isinstance(e, MapFullError):
                    log.error("sync failed: %s", e)
                else:
                    log.exception("sync failed; retrying with backoff")
            self.failing = True
            raise
        if self.failing:
            log.warning("sync recovered")
            self.failing = False
        self.health.updated()
        self.metrics.pending.set(len(self.tracker.dirty))
        if full:
            self.need_full = False
            if not self.ready:
                self.ready = True
                gc.freeze()  # what the first sync built lives as long as the agent: stop rescanning it
                log.info("initial sync complete: %d frontends programmed", len(self.table.want))

    # ---- the steps -----------------------------------------------------------------------------
    def plan_and_reconcile(self, full: bool):
        """Translate the dirty Services and reconcile their frontends (all, with prune, if full)."""
        t0 = self.clock()
        tracker = self.tracker
        dirty, all_dirty = tracker.take_dirty()
        nodes_dirty = tracker.nodes_dirty
        try:
            if full:
                self.reconciler.restore()  # re-read the kernel: drift is rewritten
            if full or all_dirty:
                todo = set(tracker.services) | set(self.table.frontends_of)
            else:
                todo = set(dirty)
            node = NodeView.of(self.settings.node_name, tracker.node)
            scope: set[Frontend] = set()
            synced = set(todo)
            while todo:
                retry: set[ObjKey] = set()
                for key in todo:
                    svc = tracker.services.get(key)
                    fes = translate_service(svc, tracker.slices_for(key), node) if svc else {}
                    touched, again = self.table.update(key, fes)
                    scope |= touched
                    retry |= again
                todo = retry
                synced |= retry
            stats = self.reconciler.sync(self.table.want, scope, prune=full)
        except BaseException:
            tracker.dirty |= dirty  # not programmed: still to do
            tracker.all_dirty = tracker.all_dirty or all_dirty
            raise
        self.syncs += 1
        if (nodes_dirty or full) and self.settings.network_mode != "none":
            tracker.nodes_dirty = False
            self.net_plan = self.plan_nodes()
        now = self.wall()
        for t in tracker.take_triggers(synced):
            self.metrics.programming_latency.observe(max(0.0, now - t))
        self.metrics.observe_sync(self.clock() - t0, full=full or all_dirty)
        self.metrics.services.set(len(self.reconciler.have))
        self.metrics.backends.set(len(self.reconciler.backend_of))
        self.metrics.last_sync.set(now)
        if stats.writes:
            log.info("synced %d frontends: %d backends, %d slots, %d masters written, %d deleted",
                     len(scope), stats.backends_written, stats.slots_written, stats.masters_written, stats.deleted)
        return stats

    async def after_reconcile(self, stats) -> None:
        """Off the event loop: connected UDP sockets still aimed at a removed backend are destroyed
        (kube-proxy flushes conntrack for the same reason), and the pod network plan is applied."""
        udp_gone = {(rid, b) for rid, b in stats.removed if b.protocol == "UDP"}
        if udp_gone:
            paths = self.settings.paths
            timeout = self.settings.sync.socket_destroy_timeout
            try:  # the walk stops itself at the timeout (a thread cannot be cancelled); wait_for is the backstop
                n = await asyncio.wait_for(asyncio.to_thread(destroy_udp, paths.cgroup_root, paths.bpf_root, udp_gone,
                                                             timeout=timeout), timeout + 1.0)
            except (asyncio.TimeoutError, DestroyTimeout) as e:
                done = f"{e.destroyed} destroyed before it stopped" if isinstance(e, DestroyTimeout) else "still running"
                log.warning("destroying UDP sockets of removed backends took over %.0f s; %s", timeout, done)
            else:
                if n:
                    log.info("destroyed %d connected UDP socket(s) of removed backends", n)
        await self.apply_nodes()

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
        if plan is None:
            return
        try:
            for change in await asyncio.to_thread(nodenet.apply, plan):
                log.info("pod network: %s", change)
        except BaseException:
            self.net_plan = plan  # retried with the next sync
            raise
