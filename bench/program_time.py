"""Time to program 10 000 Services x 10 endpoints into empty maps, and the agent's peak RSS.

    .venv/bin/python bench/program_time.py [--quick] [--services N] [--endpoints E] [--profile]

A folder with one JSON file (a v1 List of N ClusterIP Services, one TCP port each, and N
EndpointSlices labelled kubernetes.io/service-name with E ready endpoints each, all distinct IPs)
is generated (JSON: the fastest format for the manifest source to parse), and two things are
measured:

1. The real agent, ``bpflb agent --manifests DIR``, started as a subprocess on the test bed's cgroup
   and a fresh bpffs directory (empty maps), --runs times. Reported per run and as medians:
     - wall time from process start until every Service's master entry is in lb_services (the
       master is written last, after backends, slots and reverse NAT: all of it is then
       programmed; polled every 2 ms by map lookups from this process) AND the agent logged
       "initial sync complete", which it does only once the programs are attached too (the agent
       programs the maps while its loader child compiles: both must be done);
     - from the agent's log, process start to "datapath attached" (compile and attach done) and to
       "synced N frontends" (folder read, parsed, translated, reconciled, written);
     - VmHWM (peak RSS) and VmRSS from /proc/<pid>/status just before SIGTERM, and both as they
       were when "datapath attached" was logged (what imports and bcc/LLVM compiling account for).
2. The same pipeline in this process, --reps times on maps emptied in between: parse (the manifest
   folder source; next to it, "decode": lb.objects.decode_documents on the file's bytes alone, the
   msgspec path the source calls for .json files), translate (lb.translate, pure), reconcile (lb.reconcile.Reconciler.sync against
   the pinned maps), with the time spent inside the map methods (packing and syscalls) separated
   from Python planning.
   Each rep starts cold (lb's memoising caches cleared, garbage collected), as a new agent would.
   With --profile (or when the sync is over the 2 s target) one more rep runs under cProfile;
   --gc-threshold N shows what raising the collector's first threshold would change.

Map entries written are counted from the maps afterwards (lb_services masters and slots,
lb_backends, lb_revnat). Nothing asserts on time; the 2 s target is only printed next to the result.
No client dials anything here: the bed's namespaces are not used, only its cgroup and bpffs paths.
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import bench_bed, code_version, median, paths_of, sigterm_exits
from lb import datapath
from lb.maps import bpfsys
from lb.maps.services import PinnedServiceMaps, map_fill, pack_frontend
from lb.maps.structs import BACKENDS_MAP, REVNAT_MAP, SERVICES_MAP, SvcVal
from lb.model import TCP, Frontend
from lb.objects import decode_documents
from lb.reconcile import Reconciler
from lb.settings import MapSizes
from lb.source.manifests import ManifestFolder
from lb.translate import NodeView, translate

TARGET_S = 2.0
NODE = "bench"


# ---- the manifests ---------------------------------------------------------------------------------

def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{1 + i % 250}"


def endpoint_ip(k: int) -> str:
    """k-th endpoint address, from 10.128.0.1 on (10.128.0.0/9: room for 8M endpoints)."""
    k += 1
    return f"10.{128 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}"


def write_manifests(folder: Path, services: int, endpoints: int) -> None:
    items = []
    for i in range(services):
        name = f"svc-{i:05d}"
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
                      "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)],
                               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": f"{name}-abcde", "namespace": "bench",
                                   "labels": {"kubernetes.io/service-name": name}},
                      "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                      "endpoints": [{"addresses": [endpoint_ip(i * endpoints + j)], "conditions": {"ready": True},
                                     "nodeName": f"node-{j}"} for j in range(endpoints)]})
    tmp = folder / ".services.json.tmp"
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    os.replace(tmp, folder / "services.json")


def expected_entries(services: int, endpoints: int) -> dict[str, int]:
    return {SERVICES_MAP: services * (1 + endpoints), BACKENDS_MAP: services * endpoints, REVNAT_MAP: services}


# ---- the agent as a subprocess ------------------------------------------------------------------------

def agent_argv(folder: Path, bed) -> list[str]:
    exe = Path(sys.executable).parent / "bpflb"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "lb.cli"]
    argv += ["agent", "--manifests", str(folder), "--node-name", NODE, "--cgroup-root", bed.cgroup,
             "--bpf-root", bed.bpf_root]
    helptext = subprocess.run(argv[:argv.index("agent") + 1] + ["--help"], capture_output=True, text=True).stdout
    # Where this agent has them: no listening ports (other agents may run on this machine) and no
    # changes to the host's network (pod networking between nodes is not what is measured here).
    for flag, value in (("--healthz-bind-address", ""), ("--metrics-bind-address", ""), ("--network-mode", "none")):
        if flag in helptext:
            argv += [flag, value]
    return argv


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


class MasterPoller:
    """Is every Service's master entry in lb_services yet? Lookups in order, resuming where the last
    poll stopped (entries only appear during an initial sync), so a poll costs one lookup while
    nothing is there and all of them only once."""

    def __init__(self, bpf_root: str, frontends: list[Frontend]):
        self.pin = os.path.join(bpf_root, SERVICES_MAP)
        self.keys = [pack_frontend(fe, 0) for fe in frontends]
        self.vsize = ctypes.sizeof(SvcVal)
        self.next = 0
        self.fd = -1

    def done(self) -> bool:
        if self.fd < 0:
            if not os.path.exists(self.pin):
                return False
            try:
                self.fd = bpfsys.obj_get(self.pin)
            except OSError:
                return False
        while self.next < len(self.keys) and bpfsys.lookup(self.fd, self.keys[self.next], self.vsize) is not None:
            self.next += 1
        return self.next == len(self.keys)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class AgentRun:
    programmed_s: float  # process start -> every master present and "initial sync complete" logged
    attached_s: float  # process start -> "datapath attached" logged
    sync_s: float  # process start -> "synced N frontends" logged (overlaps the compile)
    hwm_kib: int
    hwm_at_attach_kib: int
    rss_at_attach_kib: int
    rss_kib: int
    synced_line: str
    fill: dict[str, int] = field(default_factory=dict)


def run_agent(bed, folder: Path, frontends: list[Frontend], timeout: float) -> AgentRun:
    datapath.cleanup(paths_of(bed))  # empty maps: the agent creates them afresh
    argv = agent_argv(folder, bed)
    lines: list[tuple[float, str]] = []
    poller = MasterPoller(bed.bpf_root, frontends)
    t0 = time.monotonic()
    p = bed.popen(argv, None, False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read() -> None:
        for line in p.stderr:
            lines.append((time.monotonic(), line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def logged(text: str) -> tuple[float, str] | None:
        return next(((t, l) for t, l in list(lines) if text in l), None)

    try:
        at_attach: dict[str, int] = {}
        t_done = t_masters = None
        deadline = t0 + timeout
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"agent exited ({p.returncode}):\n" + "\n".join(l for _, l in lines))
            if time.monotonic() > deadline:
                raise RuntimeError(f"not programmed after {timeout} s:\n" + "\n".join(l for _, l in lines[-20:]))
            if not at_attach and logged("datapath attached"):
                at_attach = proc_status(p.pid)
            if poller.done() and (complete := logged("initial sync complete")):
                t_done = max(time.monotonic() if t_masters is None else t_masters, complete[0])
                break
            if t_masters is None and poller.next == len(poller.keys):
                t_masters = time.monotonic()
            time.sleep(0.002)
        while not logged("synced ") and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        status = proc_status(p.pid)  # just before stopping it
        attached, synced = logged("datapath attached"), logged("synced ")
        if attached is None or synced is None:
            raise RuntimeError("agent log lacks 'datapath attached' or 'synced':\n" + "\n".join(l for _, l in lines))
        fill = map_fill(bed.bpf_root)
    finally:
        poller.close()
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        reader.join(timeout=5)
    return AgentRun(programmed_s=t_done - t0, attached_s=attached[0] - t0, sync_s=synced[0] - t0,
                    hwm_kib=status.get("VmHWM", 0), hwm_at_attach_kib=at_attach.get("VmHWM", 0),
                    rss_at_attach_kib=at_attach.get("VmRSS", 0), rss_kib=status.get("VmRSS", 0),
                    synced_line=synced[1].split(": ", 1)[-1], fill=fill)


# ---- the pipeline in this process ---------------------------------------------------------------------

class TimedMaps:
    """PinnedServiceMaps with the time spent in each method added up (the map syscalls and packing)."""

    def __init__(self, inner: PinnedServiceMaps):
        self.inner = inner
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str):
        fn = getattr(self.inner, name)
        if not callable(fn):
            return fn

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return timed


@dataclass
class Rep:
    decode_s: float  # lb.objects.decode_documents on the file's bytes (read beforehand), alone
    parse_s: float
    translate_s: float
    reconcile_s: float  # Reconciler.sync, map writes included
    maps_s: float  # of which inside the map methods (packing + syscalls)
    clear_s: float  # removing everything again (prune to empty)
    frontends: int


def cold_start() -> None:
    """Forget what an earlier rep left in this process, as a fresh agent would not have it: lb's
    memoising caches (e.g. the packed-address cache of lb.maps.services) and collectable garbage."""
    for name, mod in list(sys.modules.items()):
        if name == "lb" or name.startswith("lb."):
            for value in list(vars(mod).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
    gc.collect()


def decode_once(folder: Path) -> float:
    raw = (folder / "services.json").read_bytes()
    cold_start()
    t = time.perf_counter()
    decode_documents(raw)
    return time.perf_counter() - t


def pipeline_once(folder: Path, maps: PinnedServiceMaps, sizes: MapSizes) -> Rep:
    decode_s = decode_once(folder)
    cold_start()
    t0 = time.perf_counter()
    source = ManifestFolder(str(folder))
    source.scan()
    services, slices, _nodes = source.snapshot()
    t1 = time.perf_counter()
    per_service = translate(services, slices.values(), NodeView(NODE))
    want = {fe: st for fes in per_service.values() for fe, st in fes.items()}
    t2 = time.perf_counter()
    timed = TimedMaps(maps)
    reconciler = Reconciler(timed, revnat_limit=sizes.revnat)  # restores from the (empty) maps
    timed.seconds.clear()
    t3 = time.perf_counter()
    reconciler.sync(want, prune=True)
    t4 = time.perf_counter()
    maps_s = sum(timed.seconds.values())
    reconciler.sync({}, prune=True)
    t5 = time.perf_counter()
    return Rep(decode_s, t1 - t0, t2 - t1, t4 - t3, maps_s, t5 - t4, len(want))


def profile_once(folder: Path, maps: PinnedServiceMaps, sizes: MapSizes, top: int) -> str:
    cold_start()
    source = ManifestFolder(str(folder))
    prof = cProfile.Profile()
    prof.enable()
    source.scan()
    services, slices, _ = source.snapshot()
    want = {fe: st for fes in translate(services, slices.values(), NodeView(NODE)).values() for fe, st in fes.items()}
    Reconciler(maps, revnat_limit=sizes.revnat).sync(want, prune=True)
    prof.disable()
    Reconciler(maps, revnat_limit=sizes.revnat).sync({}, prune=True)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# ---- main --------------------------------------------------------------------------------------------

def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1000 Services, one agent run, two reps")
    ap.add_argument("--services", type=int, default=None, help="Services (default 10000; --quick 1000)")
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints per Service (default 10)")
    ap.add_argument("--runs", type=int, default=None, help="agent subprocess runs (default 3; --quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="in-process pipeline reps (default 5; --quick 2)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one in-process rep")
    ap.add_argument("--gc-threshold", type=int, default=None, metavar="N",
                    help="run the in-process reps with gc.set_threshold(N, 10, 10) (default: Python's, as the agent)")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up on one agent run after this long")
    a = ap.parse_args()
    n = a.services or (1000 if a.quick else 10000)
    e = a.endpoints
    runs = a.runs or (1 if a.quick else 3)
    reps = a.reps or (2 if a.quick else 5)
    sizes = MapSizes()
    want_fill = expected_entries(n, e)
    for name, need in want_fill.items():
        limit = {SERVICES_MAP: sizes.services, BACKENDS_MAP: sizes.backends, REVNAT_MAP: sizes.revnat}[name]
        if need > limit:
            ap.error(f"{n} x {e} needs {need} entries in {name}, its default size is {limit}")
    frontends = [Frontend(cluster_ip(i), 80, TCP) for i in range(n)]

    sigterm_exits()
    with tempfile.TemporaryDirectory(prefix="bpflb-bench-manifests-") as tmp, bench_bed(backends=1) as bed:
        folder = Path(tmp)
        print(f"# lb at {code_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        t = time.monotonic()
        write_manifests(folder, n, e)
        size = (folder / "services.json").stat().st_size
        print(f"# {n} Services x {e} endpoints: {size / 1e6:.1f} MB of JSON written in {time.monotonic() - t:.1f} s; "
              f"expect {sum(want_fill.values())} map entries ({', '.join(f'{k} {v}' for k, v in want_fill.items())})",
              flush=True)

        print(f"\n## the agent (subprocess), {runs} run(s), each from empty maps")
        print(f"{'run':>3}  {'start->programmed':>17}  {'start->attached':>15}  {'start->synced':>13}  "
              f"{'VmHWM':>9}  {'HWM@attach':>10}  {'RSS@attach':>10}  {'VmRSS':>9}  agent's log")
        agent_runs = []
        for r in range(runs):
            ar = run_agent(bed, folder, frontends, a.timeout)
            agent_runs.append(ar)
            print(f"{r + 1:>3}  {ar.programmed_s:>16.2f}s  {ar.attached_s:>14.2f}s  {ar.sync_s:>12.2f}s  "
                  f"{mib(ar.hwm_kib):>9}  {mib(ar.hwm_at_attach_kib):>10}  {mib(ar.rss_at_attach_kib):>10}  "
                  f"{mib(ar.rss_kib):>9}  {ar.synced_line}",
                  flush=True)
            bad = {k: (ar.fill.get(k), v) for k, v in want_fill.items() if ar.fill.get(k) != v}
            if bad:
                print(f"     WARNING: map entries (held, expected): {bad}")
        last = agent_runs[-1]
        written = sum(last.fill.get(k, 0) for k in want_fill)
        med_prog = median([x.programmed_s for x in agent_runs])
        med_sync = median([x.sync_s for x in agent_runs])
        print(f"median: start->programmed (maps written and programs attached) {med_prog:.2f} s, start->synced "
              f"{med_sync:.2f} s (target {TARGET_S:.0f} s from process start: "
              f"{'met' if med_prog <= TARGET_S else 'NOT met'}); "
              f"peak RSS {mib(max(x.hwm_kib for x in agent_runs))}; map entries written {written} "
              f"({', '.join(f'{k} {last.fill.get(k, 0)}' for k in want_fill)})", flush=True)

        if a.gc_threshold:
            gc.set_threshold(a.gc_threshold, 10, 10)
        print(f"\n## the same pipeline in this process, {reps} rep(s) on emptied maps, gc thresholds "
              f"{gc.get_threshold()}")
        datapath.cleanup(paths_of(bed))
        datapath.attach(paths_of(bed), sizes)
        maps = PinnedServiceMaps(bed.bpf_root)
        try:
            print(f"{'rep':>3}  {'(decode)':>8}  {'parse':>7}  {'translate':>9}  {'reconcile':>9}  {'(in maps)':>9}  "
                  f"{'total':>7}  {'remove all':>10}")
            rs = []
            for r in range(reps):
                rep = pipeline_once(folder, maps, sizes)
                rs.append(rep)
                total = rep.parse_s + rep.translate_s + rep.reconcile_s
                print(f"{r + 1:>3}  {rep.decode_s:>7.2f}s  {rep.parse_s:>6.2f}s  {rep.translate_s:>8.2f}s  {rep.reconcile_s:>8.2f}s  "
                      f"{rep.maps_s:>8.2f}s  {total:>6.2f}s  {rep.clear_s:>9.2f}s", flush=True)
            med = {k: median([getattr(x, k) for x in rs])
                   for k in ("decode_s", "parse_s", "translate_s", "reconcile_s", "maps_s", "clear_s")}
            total = med["parse_s"] + med["translate_s"] + med["reconcile_s"]
            print(f"median: parse {med['parse_s']:.2f} s + translate {med['translate_s']:.2f} s + reconcile "
                  f"{med['reconcile_s']:.2f} s (of which {med['maps_s']:.2f} s in map packing and syscalls) = "
                  f"{total:.2f} s for {rs[0].frontends} frontends; removing all {med['clear_s']:.2f} s; "
                  f"decode_documents alone {med['decode_s']:.2f} s")
            if a.profile or total > TARGET_S or med_sync > TARGET_S:
                print("\n## cProfile of one in-process rep (parse + translate + reconcile)")
                print(profile_once(folder, maps, sizes, 30))
        finally:
            maps.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
