"""The agent: start-up, the named tasks and shutdown. Nothing else lives here.

  source:*  a source (lb/source/manifests.py or lb/source/kube.py) hands model values to the tracker
            (lb/tracker.py, the Handler), which only records them and wakes the runner
  sync      the bounded-frequency runner (lb/runner.py) calls the Syncer (lb/syncer.py): translate,
            reconcile, the maps, the pod network
  cni       the bundled CNI plugin's server (lb/cni/server.py), if --cni-socket
  datapath  the child process that loads and attaches bpf/ (lb/datapath.py), started first: the
            sources read while it compiles
A guard logs any task that ends unexpectedly and stops the rest; SIGTERM stops everything; the
datapath stays programmed.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from typing import Callable

from . import datapath
from .health import HealthState, HttpServer
from .maps.services import PinnedServiceMaps
from .maps.structs import BACKENDS_MAP, REVNAT_MAP, SERVICES_MAP
from .metrics import AgentMetrics
from .reconcile import Reconciler
from .runner import BoundedFrequencyRunner
from .settings import Settings
from .syncer import NorthSouth, Syncer
from .tracker import Tracker

log = logging.getLogger("bpflb.agent")


class PinnedNorthSouth:
    """The tc datapath's side of a sync (issue 10): lb/maps/nodeaddrs.py, lb/maps/srcranges.py and the
    tc links (lb/datapath.py). The tc programs are compiled and pinned by their own short-lived child
    (started with the socket programs' child, at a lower CPU priority: the socket programs and the first
    sync come first). The maps written here are the agent's own (lb/maps/pinned.create_shared_maps);
    attaching waits for the child, then only adopts what it pinned: bcc never enters the agent."""

    def __init__(self, settings: Settings, child=None, on_fatal: Callable[[Exception], None] = lambda e: None) -> None:
        from .maps.nodeaddrs import PinnedNodeAddrs
        from .maps.srcranges import PinnedSourceRanges

        self.settings, self.child, self.on_fatal = settings, child, on_fatal
        self.node_addrs, self.src_ranges = PinnedNodeAddrs, PinnedSourceRanges
        self.skipped: list[str] = []
        self.lock = threading.Lock()  # the agent's datapath task and the syncer both wait, in worker threads
        self.failed: Exception | None = None

    def ready(self) -> None:
        """Wait (in a worker thread) for the tc child; DatapathError if it failed (strict mode)."""
        with self.lock:
            if self.failed is not None:
                raise self.failed
            if self.child is not None:
                child, self.child = self.child, None
                try:
                    self.skipped = datapath.finish_attach_child(child)
                except datapath.DatapathError as e:
                    self.failed = e
                    self.on_fatal(e)  # strict mode: the agent stops and says why
                    raise

    def write_node_addrs(self, local: set[str], remote: set[str]) -> None:
        m = self.node_addrs(self.settings.paths.bpf_root)
        try:
            m.replace(local, remote)
        finally:
            m.close()
        datapath.write_device_addrs(self.settings.paths)  # the masquerade source of each device

    def write_src_ranges(self, ranges: dict[int, tuple[str, ...]]) -> None:
        m = self.src_ranges(self.settings.paths.bpf_root)
        try:
            m.replace(ranges)
        finally:
            m.close()

    def attach(self, devices: list[str]) -> list[str]:
        self.ready()
        s = self.settings
        if datapath.tc_adoptable(s.paths, s.maps, s.conntrack):
            return self.skipped + datapath.attach_tc(s.paths, s.maps, devices, s.strict, s.conntrack)
        # Not pinned (not strict, and the child's compile failed): one more child, still no bcc here.
        return datapath.attach_in_child(s.paths, s.maps, s.strict, s.conntrack, devices=devices)


class Agent:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.settings = settings
        self.clock, self.wall = clock, wall
        self.stop = asyncio.Event()
        self.health = HealthState(settings.health_timeout, wall)
        self.metrics = AgentMetrics()
        self.counted = (0, 0)  # the tracker's change counters already added to the metrics
        self.watch_map_fill()
        self.tracker = Tracker(settings.node_name, notify=self.changed)
        self.syncer: Syncer | None = None
        self.runner = BoundedFrequencyRunner("sync", self.sync, settings.sync, clock,
                                             on_error=lambda e: None)  # the syncer logs and counts
        self.informers: list = []
        self.attaching = self.attaching_tc = None  # the children loading the programs (start_datapath)
        self.fatal: Exception | None = None  # why the agent stops (fatal_error), raised by run()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.datapath_task: asyncio.Task | None = None  # both children done
        self.sockets_task: asyncio.Task | None = None  # the socket programs' child done

    def changed(self) -> None:
        """The tracker recorded a change: health counts it as pending, the runner is woken."""
        t = self.tracker
        self.health.queued()
        self.health.node_eligible = t.node_eligible
        m = self.metrics
        m.pending.set(len(t.dirty))
        m.last_queued.set(self.wall())
        m.service_changes.inc(t.service_changes - self.counted[0])
        m.endpoint_changes.inc(t.endpoint_changes - self.counted[1])
        self.counted = (t.service_changes, t.endpoint_changes)
        self.runner.run()

    # ---- the datapath ------------------------------------------------------------------------
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
        """Refuse (strict) beside kube-proxy, create the maps both programs share (those not pinned yet),
        then load each program in a child process of its own: the two compile at once, and the first
        sync programs the maps meanwhile."""
        self.check_kube_proxy()
        s = self.settings
        datapath.prepare_maps(s.paths, s.maps)
        self.attaching = datapath.start_attach_child(s.paths, s.maps, strict=s.strict, conntrack=s.conntrack)
        self.attaching_tc = datapath.start_attach_child(s.paths, s.maps, strict=s.strict, conntrack=s.conntrack,
                                                        tc_only=True, nice=10)  # devices: attached stay until the sync

    def use_maps(self, reconciler: Reconciler, north_south: NorthSouth | None = None, interfaces=None,
                 attached=None) -> None:
        """The service maps are there: the syncer can program them (``north_south``: the tc
        datapath's maps and loader; None: east-west only; ``attached``: awaited before a sync counts
        as done)."""
        extra = {"interfaces": interfaces} if interfaces is not None else {}
        self.syncer = Syncer(self.settings, self.tracker, reconciler, self.metrics, self.health, self.clock, self.wall,
                             north_south=north_south, attached=attached, **extra)

    async def finish_sockets(self) -> None:
        """The socket programs are attached (or DatapathError)."""
        await asyncio.to_thread(datapath.finish_attach_child, self.attaching)
        s = self.settings
        log.info("datapath attached to %s, maps pinned under %s", s.paths.cgroup_root, s.paths.bpf_root)

    async def finish_datapath(self, north_south: PinnedNorthSouth) -> None:
        """Both programs are loaded and pinned, the socket ones attached (or DatapathError: the agent
        stops). The CNI server waits for this: its pod veths get the pinned tc program."""
        await self.sockets_task
        await asyncio.to_thread(north_south.ready)
        log.info("tc programs loaded and pinned")

    def fatal_error(self, e: Exception) -> None:
        """A part of the datapath strict mode requires failed after start: stop, and run() raises it."""
        if self.fatal is None:
            self.fatal = e
        if self.loop is not None:  # called from a worker thread
            self.loop.call_soon_threadsafe(self.stop.set)
        else:
            self.stop.set()

    async def datapath_ready(self) -> None:
        """Both programs are loaded, the socket ones attached (finish_datapath)."""
        if self.datapath_task is not None:
            await asyncio.shield(self.datapath_task)

    async def sockets_ready(self) -> None:
        """The socket programs are attached: a sync of the service maps is then in effect. (tc attaching
        waits for its own child: PinnedNorthSouth.attach.)"""
        if self.sockets_task is not None:
            await asyncio.shield(self.sockets_task)

    # ---- tasks -------------------------------------------------------------------------------
    async def sync(self, full: bool) -> None:
        await self.syncer(full)

    async def sync_loop(self) -> None:
        await self.runner.loop(self.stop)

    def source_task(self) -> asyncio.Task:
        if self.settings.manifests:
            from .source.manifests import ManifestFolder, follow

            return asyncio.create_task(follow(ManifestFolder(self.settings.manifests), self.tracker, self.stop,
                                              self.settings.poll_interval), name="source:manifests")
        from .source.kube import kube_source

        self.informers, run = kube_source(self.settings, self.tracker, self.stop,
                                          on_error=lambda e: self.metrics.api_errors.labels(code=str(e.status)).inc())
        return asyncio.create_task(run(), name="source:kube")

    def watch_map_fill(self) -> None:
        """Map fill from what reconcile holds, read at each scrape: no map walk."""
        sizes = self.settings.maps
        for name, fill in ((SERVICES_MAP, lambda r: sum(len(p.slots) + 1 for p in r.have.values()) / sizes.services),
                           (BACKENDS_MAP, lambda r: len(r.backend_of) / sizes.backends),
                           (REVNAT_MAP, lambda r: len(r.revnat) / sizes.revnat)):
            self.metrics.map_fill.labels(map=name).set_function(
                lambda fill=fill: fill(self.syncer.reconciler) if self.syncer is not None else 0.0)

    async def run(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if self.syncer is None:
            if self.attaching is None:
                self.start_datapath()
            s = self.settings
            north_south = PinnedNorthSouth(s, self.attaching_tc, on_fatal=self.fatal_error)
            self.sockets_task = asyncio.create_task(self.finish_sockets(), name="datapath:sockets")
            self.datapath_task = asyncio.create_task(self.finish_datapath(north_south), name="datapath")
            # The first sync writes the service maps while the child compiles; it counts as done (ready,
            # "initial sync complete") only once the socket programs are attached.
            self.use_maps(Reconciler(PinnedServiceMaps(s.paths.bpf_root), revnat_limit=s.maps.revnat), north_south,
                          attached=self.sockets_ready)
        http = HttpServer(self.health, self.metrics)
        for what, addr in (("healthz", self.settings.healthz_bind), ("metrics", self.settings.metrics_bind)):
            if addr:
                try:
                    port = await http.listen(addr)
                    log.info("serving %s on %s (port %d)", what, addr, port)
                except OSError as e:  # the datapath matters more than the endpoint: go on without it
                    log.error("cannot serve %s on %s: %s", what, addr, e.strerror)
        tasks = [asyncio.create_task(self.sync_loop(), name="sync"), self.source_task()]
        if self.settings.cni_socket:
            from .cni.server import serve_for_agent

            tasks.append(asyncio.create_task(serve_for_agent(self.settings, self.tracker, self.stop,
                                                             self.datapath_ready), name="cni"))
        stop_wait = asyncio.create_task(self.stop.wait(), name="stop")
        watched = tasks + [stop_wait] + ([self.datapath_task] if self.datapath_task is not None else [])
        while True:  # the datapath task may end (attached); anything else ending stops the agent
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            dp = self.datapath_task
            if done == {dp} and not dp.cancelled() and dp.exception() is None:
                watched.remove(dp)
                continue
            break
        dp = self.datapath_task
        failed = dp.exception() if dp is not None and dp.done() and not dp.cancelled() else None
        for t in done:  # the guard: only the stop event may end the agent
            if t is stop_wait or t is dp or (failed and not t.cancelled() and t.exception() is failed):
                continue
            if not t.cancelled() and t.exception():
                log.error("task %s ended unexpectedly", t.get_name(), exc_info=t.exception())
            else:
                log.error("task %s ended unexpectedly", t.get_name())
        self.stop.set()
        http.close()
        if self.syncer is not None:
            await self.syncer.close()  # the healthCheckNodePort servers
        for t in tasks + [stop_wait]:
            t.cancel()
        _, pending = await asyncio.wait(tasks + [stop_wait], timeout=5)
        for t in pending:
            log.error("task %s did not stop", t.get_name())
        failed = failed or self.fatal
        if failed:
            raise failed  # the CLI reports it (e.g. strict mode: a hook the kernel refused)
        log.info("agent stopped; the datapath stays programmed")


def run(settings: Settings) -> None:
    # The first list builds ~10 objects per endpoint, all long-lived: with the default thresholds
    # the collector rescans them over and over (half of a 10k-Service initial sync, measured).
    gc.set_threshold(50_000, 20, 20)
    from .settings import nodeport_address_list

    try:
        nodeport_address_list(settings.nodeport_addresses)
    except ValueError as e:
        raise datapath.DatapathError(str(e)) from None
    agent = Agent(settings)
    agent.start_datapath()
    try:
        import uvloop
        uvloop.run(agent.run())
    except ImportError:
        asyncio.run(agent.run())
