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
import json
import logging
import os
import time
from typing import Awaitable, Callable, Protocol

from . import nodenet
from .health import HealthState
from .maps.services import MapFullError, MapWriteError
from .metrics import AgentMetrics
from .atomicfile import write_atomic
from .model import Frontend, FrontendState, ObjKey, Service
from .reconcile import Reconciler
from .service_table import ServiceTable
from .settings import Settings
from .sockets import DestroyTimeout, destroy_udp
from .tracker import Tracker
from .healthcheck import ServiceHealthServer
from .model import IPV4, IPV6
from .objects import family_of
from .settings import device_list, nodeport_address_list
from .translate import (NodeView, default_devices, frontend_count, health_check_addresses, local_ready_endpoints,
                        needs_health_check, node_addresses, nodeport_cidrs, translate_service)

log = logging.getLogger("bpflb.syncer")

REFUSED_FILE = "refused.json"  # in Paths.state_dir: Services refused admission (read by `service list`)


class NorthSouth(Protocol):
    """What a sync writes for traffic arriving at the node besides the service maps: the tc datapath's
    node-address and source-range maps and its attachment (lb/maps/nodeaddrs.py, lb/maps/srcranges.py,
    lb/datapath.attach_tc). PinnedNorthSouth in lb/agent.py is the real one; tests use a fake."""
    def write_node_addrs(self, local: set[str], remote: set[str]) -> None: ...
    def write_src_ranges(self, ranges: dict[int, tuple[str, ...]]) -> None: ...
    def attach(self, devices: list[str]) -> list[str]: ...


def read_interfaces() -> dict[str, tuple[str, ...]]:
    """This network namespace's devices and their addresses (netlink): device name -> addresses."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        out: dict[str, list[str]] = {}
        for a in ipr.get_addr():
            ip = a.get_attr("IFA_ADDRESS")
            if ip and a["index"] in names:
                out.setdefault(names[a["index"]], []).append(ip.split("%")[0])
    return {dev: tuple(ips) for dev, ips in out.items()}


def remote_node_addresses(nodes: dict, me: str) -> set[str]:
    """Other nodes' InternalIP/ExternalIP addresses: a local caller dialling one of them on a nodePort
    is translated at its socket (no packet hairpins through that node), unless the port's
    externalTrafficPolicy is Local (that node serves it)."""
    out = set()
    for name, node in nodes.items():
        if name != me and node is not None:
            out.update(ip for typ, ip in node.addresses if typ in ("InternalIP", "ExternalIP"))
    return out


class Syncer:
    def __init__(self, settings: Settings, tracker: Tracker, reconciler: Reconciler, metrics: AgentMetrics,
                 health: HealthState, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, north_south: NorthSouth | None = None,
                 interfaces: Callable[[], dict[str, tuple[str, ...]]] = read_interfaces,
                 attached: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings, self.tracker, self.reconciler = settings, tracker, reconciler
        # Awaited before a sync counts as done: the maps may be programmed while the programs that read
        # them are still compiling (lb/agent.py), and "programmed" means the hooks are attached too.
        self.attached = attached
        self.metrics, self.health = metrics, health
        self.clock, self.wall = clock, wall
        self.table = ServiceTable()
        self.need_full = True  # the first sync after every source listed is full (with prune)
        self.ready = False  # the first full sync has succeeded
        self.syncs = 0
        self.net_plan: nodenet.Plan | None = None  # planned by plan(), applied by apply()
        self.net_problems: tuple[str, ...] = ()
        self.failing = False
        self.refused: dict[ObjKey, tuple[str, str]] = {}  # Service -> (limit, why): not admitted
        self.refused_written: dict | None = None  # what the state file holds
        # North-south: what the tc datapath's maps and attachment hold, and the health-check servers.
        self.north_south, self.interfaces = north_south, interfaces
        self.nodeport_setting = nodeport_address_list(settings.nodeport_addresses)
        self.node_view: NodeView | None = None
        self.nodes_seen: int | None = None  # hash of every Node when the addresses were last computed
        self.node_addrs: tuple[set[str], set[str]] | None = None  # (this node's, other nodes') written
        self.devices: list[str] | None = None  # attached
        self.src_ranges: dict[int, tuple[str, ...]] | None = None  # written
        self.hc_addresses: dict[str, tuple[str, ...]] = {}
        self.hc_wanted: dict[ObjKey, tuple[int, dict[str, int]]] = {}  # Service -> (port, family -> local count)
        self.hc_servers: dict[str, ServiceHealthServer] = {}  # by family
        self.ns_due = True  # node addresses / devices to recompute

    # ---- admission: one Service that does not fit is refused alone -----------------------------
    def refusal(self, key: ObjKey, svc: Service) -> tuple[str, str] | None:
        """(limit, why) if ``svc`` may not be translated at all (too many frontends), else None."""
        cap = self.settings.max_frontends_per_service
        n = frontend_count(svc)
        if n > cap:
            return ("max-frontends-per-service", f"{n} frontends ({len(svc.ports)} ports x addresses) exceed "
                    f"--max-frontends-per-service {cap}")
        return None

    def capacity_refusal(self, key: ObjKey, fes: dict[Frontend, FrontendState]) -> tuple[str, str] | None:
        """(limit, why) if the maps cannot hold ``key``'s frontends beside everything admitted."""
        entries, frontends, backends = self.table.usage_if(key, fes)
        sizes = self.settings.maps
        if frontends > sizes.revnat or frontends > self.reconciler.revnat_ids.limit:
            return ("revnat-map-size", f"{frontends} frontends in all would exceed the frontend IDs "
                    f"(--revnat-map-size {sizes.revnat})")
        if entries > sizes.services:
            return ("svc-map-size", f"{entries} service map entries in all would exceed --svc-map-size {sizes.services}")
        if backends > sizes.backends:
            return ("backend-map-size", f"{backends} distinct backends in all would exceed "
                    f"--backend-map-size {sizes.backends}")
        return None

    def refuse(self, key: ObjKey, limit: str, why: str) -> None:
        if self.refused.get(key) != (limit, why):
            log.error("Service %s refused: %s; what it had programmed stays, every other Service keeps syncing",
                      key, why)
            self.metrics.refusals.labels(limit=limit).inc()
        self.refused[key] = (limit, why)

    def admit(self, key: ObjKey) -> None:
        if self.refused.pop(key, None) is not None:
            log.info("Service %s admitted", key)

    def write_refused(self) -> None:
        """The refused Services, for `bpflb service list` (a file: it reads no agent memory)."""
        doc = {str(k): {"limit": lim, "reason": why} for k, (lim, why) in sorted(self.refused.items())}
        self.metrics.refused.set(len(doc))
        if doc == self.refused_written:
            return
        path = os.path.join(self.settings.paths.state_dir, REFUSED_FILE)
        if self.refused_written is None and not doc and not os.path.exists(path):
            self.refused_written = doc  # nothing refused, nothing stale to clear
            return
        try:
            os.makedirs(self.settings.paths.state_dir, exist_ok=True)
            write_atomic(path, json.dumps(doc, indent=1), durable=False)
            self.refused_written = doc
        except OSError as e:
            log.warning("cannot write %s: %s", path, e.strerror)

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
            if self.attached is not None:
                await self.attached()
        except Exception as e:
            self.metrics.sync_errors.inc()
            # A map write failure leaves the reconciler equal to the kernel: the retry redoes what
            # failed. Anything else (a bug, a kernel surprise): the retry re-reads the kernel.
            if not isinstance(e, MapWriteError):
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
            if node != self.node_view:  # the node IPs rank source ranges (allowFromNode): everything again
                if self.node_view is not None and node.ips != self.node_view.ips:
                    todo = set(tracker.services) | set(self.table.frontends_of)
                self.node_view = node
            nodes_seen = hash(frozenset(tracker.nodes.items()))
            if nodes_seen != self.nodes_seen:
                self.nodes_seen, self.ns_due = nodes_seen, True
            if full:
                self.ns_due = True  # interfaces re-read at every full resync
            scope: set[Frontend] = set()
            synced = set(todo)
            refused_retried = False
            while todo:
                retry: set[ObjKey] = set()
                entries_before = self.table.entries
                # Oldest first, so which Service is refused when the maps are nearly full does not
                # depend on arrival order either.
                for key in sorted(todo, key=lambda k: (s.created if (s := tracker.services.get(k)) else "", k)):
                    svc = tracker.services.get(key)
                    if svc is None:
                        self.refused.pop(key, None)
                        self.hc_wanted.pop(key, None)
                        fes: dict[Frontend, FrontendState] = {}
                    else:
                        refusal = self.refusal(key, svc)
                        if refusal is None:
                            fes = translate_service(svc, tracker.slices_for(key), node)
                            refusal = self.capacity_refusal(key, fes)
                        if refusal is not None:
                            self.refuse(key, *refusal)
                            continue  # its last admitted frontends stay as they are
                        self.admit(key)
                        self.note_health_check(key, svc, node)
                    touched, again = self.table.update(key, fes, svc)
                    scope |= touched
                    retry |= again
                if self.refused and not refused_retried and self.table.entries < entries_before:
                    retry |= set(self.refused)  # room was freed: the refused may fit now
                    refused_retried = True
                todo = retry
                synced |= retry
            stats = self.reconciler.sync(self.table.want, scope, prune=full)
        except BaseException:
            tracker.dirty |= dirty  # not programmed: still to do
            tracker.all_dirty = tracker.all_dirty or all_dirty
            raise
        self.syncs += 1
        self.write_refused()
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

    # ---- north-south: node addresses, devices, source ranges, health checks -------------------------
    def note_health_check(self, key: ObjKey, svc: Service, node: NodeView) -> None:
        """servicechangetracker.go HealthCheckNodePorts and LocalReadyEndpoints, per family proxier (a
        family takes the Service when it has a ClusterIP of it)."""
        if needs_health_check(svc) and svc.health_check_node_port:
            slices = self.tracker.slices_for(key)
            families = dict.fromkeys(family_of(ip) for ip in svc.cluster_ips)
            self.hc_wanted[key] = (svc.health_check_node_port,
                                   {f: local_ready_endpoints(svc, slices, node, f) for f in families})
        else:
            self.hc_wanted.pop(key, None)

    def wanted_src_ranges(self) -> dict[int, tuple[str, ...]]:
        """loadBalancerSourceRanges by the reverse-NAT ID reconcile gave each filtered frontend."""
        have = self.reconciler.have
        out = {}
        for fe, st in self.table.want.items():
            if st.src_ranges:
                prog = have.get(fe)
                if prog is not None and prog.rev_nat_id:
                    out[prog.rev_nat_id] = st.src_ranges
        return out

    async def sync_north_south(self) -> None:
        """After a reconcile: node addresses and devices (when a Node or, at a full resync, the
        interfaces may have changed), the source ranges by frontend ID, the health-check servers."""
        ns = self.north_south
        if self.ns_due:
            ifaces = await asyncio.to_thread(self.interfaces)
            ips = [ip for addrs in ifaces.values() for ip in addrs]
            cidrs = nodeport_cidrs(self.nodeport_setting, self.node_view or NodeView(self.settings.node_name))
            local = node_addresses(cidrs, ips)
            remote = remote_node_addresses(self.tracker.nodes, self.settings.node_name) - local
            if ns is not None and (local, remote) != self.node_addrs:
                await asyncio.to_thread(ns.write_node_addrs, local, remote)
                log.info("NodePorts served on %s", ", ".join(sorted(local)) or "(no address)")
                self.node_addrs = (local, remote)
            devices = device_list(self.settings.devices) or default_devices(self.tracker.node, ifaces)
            if ns is not None and devices != self.devices:
                if devices:
                    skipped = await asyncio.to_thread(ns.attach, devices)
                    log.info("tc programs attached to %s%s", ", ".join(devices),
                             f" (skipped: {'; '.join(skipped)})" if skipped else "")
                else:
                    log.warning("no device to attach the tc programs to: the Node object has no address on this "
                                "node's devices (pass --devices)")
                self.devices = devices
            self.hc_addresses = health_check_addresses(cidrs, ips)
            self.ns_due = False
        if ns is not None:
            ranges = self.wanted_src_ranges()
            if ranges != self.src_ranges:
                await asyncio.to_thread(ns.write_src_ranges, ranges)
                self.src_ranges = ranges
        await self.sync_health_checks()

    async def sync_health_checks(self) -> None:
        healthy = lambda: self.health.healthy()[0]  # noqa: E731 - kube-proxy: healthzServer.Health().Healthy
        for family in (IPV4, IPV6):
            ports = {k: port for k, (port, counts) in self.hc_wanted.items() if family in counts}
            server = self.hc_servers.get(family)
            if not ports and server is None:
                continue
            addresses = self.hc_addresses.get(family, ())
            if server is None:
                server = self.hc_servers[family] = ServiceHealthServer(addresses, healthy, self.settings.node_name)
            await server.set_addresses(addresses)
            await server.sync_services(ports)
            server.sync_endpoints({k: counts[family] for k, (_, counts) in self.hc_wanted.items() if family in counts})

    async def close(self) -> None:
        for server in self.hc_servers.values():
            await server.close()

    async def after_reconcile(self, stats) -> None:
        """Off the event loop: connected UDP sockets still aimed at a removed backend are destroyed
        (kube-proxy flushes conntrack for the same reason), the north-south maps and health checks
        follow, and the pod network plan is applied."""
        await self.sync_north_south()
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
