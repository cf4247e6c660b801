"""Connection rate through a ClusterIP against no proxy at all, with 1 000 and 10 000 Services.

    .venv/bin/python bench/connect_rate.py [--quick] [--sizes 1000,10000] [--rounds N] [--bpf-stats]

Three clients' views of the same 10 backends (10.200.1.11-20, all in the backend namespace), side
by side in one run, with N Services of 10 distinct endpoints each programmed (the measured one plus
N-1 others whose 10 endpoints are all different addresses, so the backend map holds N x 10 entries):
  no-proxy  a client in a sibling cgroup where no program is attached at all, dialling the backends
            directly (round-robin over the 10): the floor, what a node without bpflb pays;
  miss      the same client in the served cgroup, dialling the backends directly: every connect runs
            the connect4 program, which misses in lb_services (and every close the release hook);
  hit       the same client in the served cgroup, dialling the ClusterIP 10.96.0.10, which the
            program translates to one of the 10 backends (random slot).
hit/no-proxy is what a Service connection costs over no proxy; miss/no-proxy is what every other
connection in a served cgroup pays. Both clients run in the test bed's client namespace (no route
out: a VIP that is not translated fails locally), and the no-proxy client is checked to see the VIP
untranslated.

Workloads: "connect+close" (socket, connect, close) and "request/response" (connect, send a line,
read the reply, close). Sockets close with SO_LINGER 0 (RST): no TIME_WAIT, no port exhaustion.

Why a C client: a Python loop adds ~6 us of interpreter time per connection (measured here: 61k
conn/s against 99k for the C loop on the same target), 60 % on top of the kernel's ~10 us, so it
would dilute the datapath's share and add its jitter (GC, allocator) to one round or the other;
the C loop is a few syscalls and nothing else, identical for every target, so the ratios measure
the datapath. It is one long-lived process fed commands on stdin (no exec per round),
compiled with gcc on first use into a cache keyed by the source's hash. The server is a small C
program in the backend namespace; every target reaches the same listeners, so it costs all the same.
By default the clients and the server are pinned to different CPUs (--no-pin to let them float).

The machine is shared and noisy, so the three targets alternate in short rounds (each round in
another of the 6 orders), many rounds per cell, and the figures are medians: conn/s of each target,
the median of the per-round ratios to no-proxy with the interquartile range, and the median extra
time per connection via the ClusterIP (1/rate(hit) - 1/rate(no-proxy), in microseconds).
Nothing here asserts on time; the target (hit/no-proxy >= 0.95) is only printed next to the result.

--bpf-stats then turns on kernel.bpf_stats_enabled (restored afterwards) and, per size, runs the
miss and the hit targets alone and prints each program's runs per connection and ns per run (the
kernel's run_time_ns / run_cnt): where the datapath spends its time. Off by default, because the
counters themselves add two clock reads to every run.

The UDP sockets' reverse-NAT LRU map is filled with dummy entries first (the steady state of a busy
node): TCP connections must not touch it (they keep their peer in lb_sock_peer), and a full LRU
makes any that does pay for an eviction, so a regression shows here.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from benchlib import bpf_stats, bench_bed, build_c, code_version, median, paths_of, quartiles, sigterm_exits
from lb import datapath
from lb.maps import bpfsys
from lb.maps.services import PinnedServiceMaps, pack_ip
from lb.maps.structs import SOCK_REVNAT_MAP, SockKey, SockVal, packer
from lb.model import TCP, Backend, Frontend, FrontendState
from lb.reconcile import Reconciler
from lb.settings import MapSizes
from lb.testing.bed import Bed, backend_v4, enter

HERE = Path(__file__).resolve().parent
VIP = "10.96.0.10"
ENDPOINTS = 10  # per Service, the measured one included
BACKEND_IPS = tuple(backend_v4(10 + n) for n in range(1, ENDPOINTS + 1))  # the bed's backend addresses
TARGET_RATIO = 0.95
TARGETS = ("no-proxy", "miss", "hit")


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str  # the C client's mode letter
    vip_port: int
    backend_port: int


WORKLOADS = (Workload("connect+close", "c", 80, 9000), Workload("request/response", "r", 81, 9001))


# ---- the C programs ------------------------------------------------------------------------------

def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


class Client:
    """The C client, running in the client namespace and in ``cgroup``."""

    def __init__(self, bed: Bed, binary: str, cpu: int | None, cgroup: str):
        self.p = subprocess.Popen(pinned([binary], cpu), preexec_fn=lambda: enter(bed.client_ns, cgroup),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        bed.procs.append(self.p)  # killed with the bed whatever happens

    def _ask(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        answer = self.p.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"client died (exit {self.p.poll()}) on {line!r}")
        if answer.startswith("error"):
            raise RuntimeError(f"client: {line!r}: {answer}")
        return answer

    def run(self, ips: tuple[str, ...], port: int, mode: str, count: int) -> tuple[float, int, int]:
        """(connections per second, failed, first errno); connection i goes to ips[i % len(ips)]."""
        ok, failed, first, ns = (int(x) for x in self._ask(f"run {','.join(ips)} {port} {mode} {count}").split())
        return ok / (ns / 1e9), failed, first

    def check(self, ip: str, port: int, mode: str) -> tuple[str, str]:
        """(server's reply or "-", getpeername) of one connection of this mode."""
        reply, peer = self._ask(f"check {ip} {port} {mode}").split()
        return reply, peer

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
            self.p.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


@contextlib.contextmanager
def unserved_cgroup(bed: Bed) -> Iterator[str]:
    """A sibling of the served cgroup (not below it): no bpflb program runs for its processes."""
    path = os.path.join(bed.cgroup_parent, f"bpflb-bench-{bed.tag}-noproxy")
    os.mkdir(path)
    try:
        yield path
    finally:
        for _ in range(50):  # its processes are stopped by now; the kernel frees them shortly after
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"WARNING: left behind: cgroup {path}", file=sys.stderr)


# ---- the maps --------------------------------------------------------------------------------------

def _nth_ip(base: int, j: int) -> str:
    x = base + j
    return f"{x >> 24}.{(x >> 16) & 255}.{(x >> 8) & 255}.{x & 255}"


def extra_service(i: int) -> tuple[Frontend, FrontendState]:
    """The i-th other Service (i >= 0): its own ClusterIP and ENDPOINTS endpoints no other Service has."""
    vip = f"10.96.{1 + i // 250}.{1 + i % 250}"
    base = (10 << 24) | (201 << 16)
    backends = tuple(Backend(_nth_ip(base, i * ENDPOINTS + e), 8080, TCP) for e in range(ENDPOINTS))
    return Frontend(vip, 80, TCP), FrontendState(backends, service=f"bench/extra-{i}")


def desired(n_services: int) -> dict[Frontend, FrontendState]:
    """The measured Service (one frontend per workload, the bed's 10 backends) and n-1 others."""
    want = {Frontend(VIP, w.vip_port, TCP): FrontendState(tuple(Backend(ip, w.backend_port, TCP) for ip in BACKEND_IPS),
                                                          service=f"bench/measured:{w.name}")
            for w in WORKLOADS}
    want.update(extra_service(i) for i in range(n_services - 1))
    return want


def fill_sock_revnat(bpf_root: str, entries: int) -> None:
    """Fill the socket reverse-NAT LRU with entries no socket will ever look up (cookies from
    2^63; real cookies count up from 1), the state of a node after its first ``entries`` connections."""
    key, val = packer(SockKey), packer(SockVal)
    fd = bpfsys.obj_get(os.path.join(bpf_root, SOCK_REVNAT_MAP))
    try:
        backend, vip = pack_ip("10.201.255.1"), pack_ip("10.96.255.1")
        chunk = 16384
        for start in range(0, entries, chunk):
            n = min(chunk, entries - start)
            keys = b"".join(key.pack((1 << 63) + start + i, backend, 8080, 0, 0, 0) for i in range(n))
            vals = val.pack(vip, 80, 0, 0xFFFFFFFF) * n
            bpfsys.update_batch(fd, keys, vals, n)
    finally:
        os.close(fd)


# ---- measurement ----------------------------------------------------------------------------------

@dataclass
class Cell:
    size: int
    workload: str
    rates: dict[str, list[float]]  # target -> conn/s per round
    failed: int
    first_errno: int

    def ratios(self, target: str) -> list[float]:
        return [t / n for n, t in zip(self.rates["no-proxy"], self.rates[target])]

    def extra_us(self) -> list[float]:
        """Per round: microseconds a connection via the ClusterIP took longer than with no proxy."""
        return [(1 / h - 1 / n) * 1e6 for n, h in zip(self.rates["no-proxy"], self.rates["hit"])]


class Targets:
    """The three ways to reach the backends: (client, addresses, port) per target and workload."""

    def __init__(self, inside: Client, outside: Client):
        self.inside, self.outside = inside, outside

    def run(self, target: str, w: Workload, count: int) -> tuple[float, int, int]:
        if target == "no-proxy":
            return self.outside.run(BACKEND_IPS, w.backend_port, w.mode, count)
        if target == "miss":
            return self.inside.run(BACKEND_IPS, w.backend_port, w.mode, count)
        return self.inside.run((VIP,), w.vip_port, w.mode, count)


def measure(t: Targets, w: Workload, count: int, rounds: int, size: int) -> Cell:
    """Rounds of the three targets, each round in the next of the 6 orders, after one warm-up round."""
    for target in TARGETS:
        t.run(target, w, max(50, count // 4))
    orders = list(itertools.permutations(TARGETS))
    rates: dict[str, list[float]] = {k: [] for k in TARGETS}
    failed, first = 0, 0
    for r in range(rounds):
        for target in orders[r % len(orders)]:
            rate, f, e = t.run(target, w, count)
            rates[target].append(rate)
            failed += f
            first = first or e
    return Cell(size, w.name, rates, failed, first)


def calibrate(t: Targets, w: Workload, round_seconds: float) -> int:
    """Connections per round so that one round of the no-proxy target takes about round_seconds."""
    rates = [t.run("no-proxy", w, 300)[0] for _ in range(3)]
    return max(100, int(median(rates) * round_seconds))


def report_header() -> None:
    print(f"{'services':>8}  {'workload':<17} {'no-proxy/s':>10} {'miss/s':>8} {'hit/s':>8}  "
          f"{'miss/no-proxy (IQR)':>22}  {'hit/no-proxy (IQR)':>22}  {'+us/conn':>8}  {'rounds':>6}  {'failed':>6}")


def _ratio(xs: list[float]) -> str:
    lo, hi = quartiles(xs)
    return f"{median(xs):.3f} ({lo:.3f}-{hi:.3f})"


def report(cell: Cell) -> None:
    r = median(cell.ratios("hit"))
    mark = "" if r >= TARGET_RATIO else f"  (hit below {TARGET_RATIO})"
    print(f"{cell.size:>8}  {cell.workload:<17} {median(cell.rates['no-proxy']):>10,.0f} "
          f"{median(cell.rates['miss']):>8,.0f} {median(cell.rates['hit']):>8,.0f}  "
          f"{_ratio(cell.ratios('miss')):>22}  {_ratio(cell.ratios('hit')):>22}  {median(cell.extra_us()):>8.2f}  "
          f"{len(cell.rates['hit']):>6}  {cell.failed:>6}{mark}", flush=True)


def summary(cells: list[Cell]) -> None:
    print("\n# median ratio to no proxy (size x target), per workload")
    print(f"{'workload':<17} {'services':>8}  {'hit/no-proxy':>12}  {'miss/no-proxy':>13}")
    for c in sorted(cells, key=lambda c: (c.workload, c.size)):
        print(f"{c.workload:<17} {c.size:>8}  {median(c.ratios('hit')):>12.3f}  {median(c.ratios('miss')):>13.3f}")


# ---- where the datapath spends its time (kernel.bpf_stats_enabled) ---------------------------------------

def our_programs(cgroup: str) -> dict[int, str]:
    """ID -> name of the programs attached to the served cgroup (ours, by construction of the bed)."""
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = {pid for h in datapath.HOOKS for pid in bpfsys.prog_query(cg, datapath.attach_type(h))}
    finally:
        os.close(cg)
    out = {}
    for pid in ids:
        fd, name = bpfsys.prog_name(pid)
        os.close(fd)
        out[pid] = name
    return out


def prog_counters(ids: dict[int, str]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt), from bpftool (this is outside any timed loop)."""
    out = {}
    for pid, name in ids.items():
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)], capture_output=True,
                                         text=True, check=True).stdout)
        out[name] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return out


def profile(t: Targets, bed: Bed, size: int, count: int) -> None:
    """Each program's runs per connection and ns per run, for the miss and the hit target alone."""
    ids = our_programs(bed.cgroup)
    w = WORKLOADS[0]
    for target in ("miss", "hit"):
        t.run(target, w, count // 4)
        before = prog_counters(ids)
        t.run(target, w, count)
        after = prog_counters(ids)
        parts = []
        for name in sorted(after):
            dt, dn = after[name][0] - before[name][0], after[name][1] - before[name][1]
            if dn:
                parts.append(f"{name} {dn / count:.2f} runs/conn x {dt / dn:.0f} ns")
        print(f"# bpf_stats {size:>6} services, {target:<4} ({w.name}): " + (", ".join(parts) or "no program ran"),
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 1 and 1000, few short rounds")
    ap.add_argument("--sizes", default=None, help="comma-separated Service counts (default 1000,10000)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the three targets per cell (default 15; --quick 4)")
    ap.add_argument("--round-seconds", type=float, default=None,
                    help="length of one round of the no-proxy target (default 0.1; --quick 0.03)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the clients and the server to CPUs")
    ap.add_argument("--no-fill-lru", action="store_true",
                    help="leave the socket reverse-NAT LRU empty at the start (it fills during the run)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="after each size, print per-program run counts and ns per run (kernel.bpf_stats_enabled)")
    a = ap.parse_args()
    sizes = [int(s) for s in (a.sizes or ("1,1000" if a.quick else "1000,10000")).split(",")]
    rounds = a.rounds or (4 if a.quick else 15)
    round_seconds = a.round_seconds or (0.03 if a.quick else 0.1)
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 and not a.no_pin else (None, None)

    sigterm_exits()
    client_bin, server_bin = build_c("tcp_client"), build_c("tcp_server")
    sizes_cfg = MapSizes()
    if max(sizes) + len(WORKLOADS) > sizes_cfg.revnat:
        ap.error(f"at most {sizes_cfg.revnat - len(WORKLOADS)} services fit in the reverse-NAT map")
    if max(sizes) * ENDPOINTS > sizes_cfg.backends:
        ap.error(f"at most {sizes_cfg.backends // ENDPOINTS} services of {ENDPOINTS} endpoints fit in the backend map")
    with bench_bed(backends=ENDPOINTS) as bed, unserved_cgroup(bed) as noproxy_cg:
        print(f"# lb at {code_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        t0 = time.monotonic()
        datapath.attach(paths_of(bed), sizes_cfg)
        print(f"# datapath attached to {bed.cgroup} in {time.monotonic() - t0:.1f} s; no program in {noproxy_cg}; "
              f"client CPU {client_cpu}, server CPU {server_cpu}", flush=True)
        if not a.no_fill_lru:
            fill_sock_revnat(bed.bpf_root, sizes_cfg.sock_revnat)
            print(f"# socket reverse-NAT LRU filled ({sizes_cfg.sock_revnat} entries)", flush=True)
        listeners = [f"{ip}:{w.backend_port}:{w.mode}" for w in WORKLOADS for ip in BACKEND_IPS]
        server = bed.popen(pinned([server_bin, *listeners], server_cpu), bed.backend_ns, False,
                           stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the C server did not start")
        inside = Client(bed, client_bin, client_cpu, bed.cgroup)
        outside = Client(bed, client_bin, client_cpu, noproxy_cg)
        targets = Targets(inside, outside)
        maps = PinnedServiceMaps(bed.bpf_root)
        reconciler = Reconciler(maps, revnat_limit=sizes_cfg.revnat)
        try:
            try:  # the floor must really be unserved: the VIP is not translated there
                outside.check(VIP, WORKLOADS[0].vip_port, "c")
                raise RuntimeError(f"{VIP} is reachable from {noproxy_cg}: a program is attached there")
            except RuntimeError as e:
                if "Network is unreachable" not in str(e):
                    raise
            counts: dict[str, int] = {}
            cells = []
            for size in sizes:
                t0 = time.monotonic()
                want = desired(size)
                reconciler.sync(want, prune=True)
                held = maps.dump_frontends()
                if set(held) != set(want) or any(m is None or m.count != ENDPOINTS for m, _ in held.values()):
                    raise RuntimeError(f"maps do not hold the {size} services just programmed")
                for w in WORKLOADS:  # the VIP must reach a backend, and look like the VIP to the app
                    reply, peer = inside.check(VIP, w.vip_port, w.mode)
                    ok_reply = {f"{ip}:{w.backend_port}" for ip in BACKEND_IPS} if w.mode == "r" else {"-"}
                    if reply not in ok_reply or peer != f"{VIP}:{w.vip_port}":
                        raise RuntimeError(f"{VIP}:{w.vip_port} answered {reply!r} as {peer!r}")
                print(f"# {size} services of {ENDPOINTS} endpoints programmed ({len(want)} frontends) and checked "
                      f"in {time.monotonic() - t0:.2f} s", flush=True)
                if not counts:
                    counts = {w.name: calibrate(targets, w, round_seconds) for w in WORKLOADS}
                    print("# connections per round: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
                    report_header()
                for w in WORKLOADS:
                    cell = measure(targets, w, counts[w.name], rounds, size)
                    cells.append(cell)
                    report(cell)
                if a.bpf_stats:
                    with bpf_stats():
                        profile(targets, bed, size, counts[WORKLOADS[0].name] * 5)
            summary(cells)
            failed = sum(c.failed for c in cells)
            if failed:
                errnos = {c.first_errno for c in cells if c.first_errno}
                print(f"# {failed} connections failed (first errno(s): {sorted(errnos)})")
            worst = min(cells, key=lambda c: median(c.ratios("hit")))
            r = median(worst.ratios("hit"))
            print(f"# lowest hit/no-proxy {r:.3f} ({worst.size} services, {worst.workload}); "
                  f"target >= {TARGET_RATIO}: {'met' if r >= TARGET_RATIO else 'NOT met'}")
        finally:
            inside.close()
            outside.close()
            maps.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
