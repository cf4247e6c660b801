"""Connection rate through a ClusterIP vs. to the backend directly, with 1 to 20 000 Services programmed.

    .venv/bin/python bench/connect_rate.py [--quick] [--sizes 1,1000,10000,20000] [--rounds N]

A client in the test bed's client namespace and served cgroup (no route out: a VIP that is not
translated fails locally) opens TCP connections one after another to
  (a) the backend 10.200.1.11 directly, and
  (b) the ClusterIP 10.96.0.10, whose only endpoint is that same backend,
while the maps hold N Services (the measured one plus N-1 other ClusterIPs with one endpoint each).
Both targets pass through the same cgroup connect4 program: (a) is a miss in lb_services, (b) is a
hit, a slot and a backend lookup and a socket reverse-NAT update, so (b)/(a) is the datapath's cost.

Workloads: "connect+close" (socket, connect, close) and "request/response" (connect, send a line,
read the reply, close). Sockets close with SO_LINGER 0 (RST): no TIME_WAIT, no port exhaustion.

Why a C client: a Python loop adds ~6 us of interpreter time per connection (measured here: 61k
conn/s against 99k for the C loop on the same target), 60 % on top of the kernel's ~10 us, so it
would dilute the datapath's share and add its jitter (GC, allocator) to one round or the other;
the C loop is a few syscalls and nothing else, identical for (a) and (b), so the ratio measures
the datapath. It is one long-lived process fed commands on stdin (no exec per round),
compiled with gcc on first use into a cache keyed by the source's hash. The server is a small C
program in the backend namespace; both targets reach the same listener, so it costs both the same.
By default the client and the server are pinned to different CPUs (--no-pin to let them float).

The machine is shared and noisy, so A and B alternate in short rounds (ABBA order), many rounds
per cell, and the figures are medians: conn/s of each target, the median of the per-pair ratios
(b)/(a) with its interquartile range, and the median extra time per connection via the ClusterIP
(1/rate(b) - 1/rate(a), in microseconds: what the datapath adds, whatever the workload).
Nothing here asserts on time; the target (>= 0.97) is only printed next to the result.

The socket reverse-NAT LRU map (one entry per translated connection, never deleted on close) is
filled with dummy entries first, so every cell runs in the steady state of a busy node (a full LRU
that evicts on every insert) instead of drifting from empty to full during the run.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import bench_bed, code_version, median, paths_of, quartiles, sigterm_exits
from lb import datapath
from lb.maps import bpfsys
from lb.maps.services import PinnedServiceMaps, pack_ip
from lb.maps.structs import SOCK_REVNAT_MAP, SockKey, SockVal, packer
from lb.model import TCP, Backend, Frontend, FrontendState
from lb.reconcile import Reconciler
from lb.settings import MapSizes
from lb.testing.bed import Bed, backend_v4

HERE = Path(__file__).resolve().parent
VIP = "10.96.0.10"
BACKEND_IP = backend_v4(11)  # the bed's first backend address
TARGET_RATIO = 0.97


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str  # the C client's mode letter
    vip_port: int
    backend_port: int


WORKLOADS = (Workload("connect+close", "c", 80, 9000), Workload("request/response", "r", 81, 9001))


# ---- the C programs ------------------------------------------------------------------------------

def build(name: str) -> str:
    """Compile bench/<name>.c once per source version; returns the binary's path."""
    src = HERE / f"{name}.c"
    flags = ["-O2", "-Wall", "-Wextra"]
    digest = hashlib.sha256(src.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "bpflb-bench"
    cache.mkdir(exist_ok=True)
    binary = cache / f"{name}-{digest}"
    if not binary.exists():
        tmp = cache / f".{name}-{digest}.{os.getpid()}"
        subprocess.run(["gcc", *flags, "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, binary)
    return str(binary)


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


class Client:
    """The C client, running in the client namespace and the served cgroup."""

    def __init__(self, bed: Bed, binary: str, cpu: int | None):
        self.p = bed.popen(pinned([binary], cpu), bed.client_ns, True, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        answer = self.p.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"client died (exit {self.p.poll()}) on {line!r}")
        if answer.startswith("error"):
            raise RuntimeError(f"client: {line!r}: {answer}")
        return answer

    def run(self, ip: str, port: int, mode: str, count: int) -> tuple[float, int, int]:
        """(connections per second, failed, first errno)."""
        ok, failed, first, ns = (int(x) for x in self._ask(f"run {ip} {port} {mode} {count}").split())
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


# ---- the maps --------------------------------------------------------------------------------------

def extra_service(i: int) -> tuple[Frontend, FrontendState]:
    """The i-th other Service (i >= 0): its own ClusterIP and one endpoint of its own."""
    vip = f"10.96.{1 + i // 250}.{1 + i % 250}"
    backend = Backend(f"10.201.{i // 250}.{1 + i % 250}", 8080, TCP)
    return Frontend(vip, 80, TCP), FrontendState((backend,), service=f"bench/extra-{i}")


def desired(n_services: int) -> dict[Frontend, FrontendState]:
    """The measured Service (one frontend per workload, the one backend) and n-1 others."""
    want = {Frontend(VIP, w.vip_port, TCP): FrontendState((Backend(BACKEND_IP, w.backend_port, TCP),),
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
    direct: list[float]
    vip: list[float]
    ratios: list[float]
    extra_us: list[float]  # per pair: microseconds a connection via the ClusterIP took longer
    failed: int
    first_errno: int


def measure(client: Client, w: Workload, count: int, rounds: int, size: int) -> Cell:
    """Rounds of (a) and (b), alternating which goes first (ABBA), after one warm-up pair."""
    targets = {"direct": (BACKEND_IP, w.backend_port), "vip": (VIP, w.vip_port)}
    for ip, port in targets.values():
        client.run(ip, port, w.mode, max(50, count // 4))
    rates: dict[str, list[float]] = {"direct": [], "vip": []}
    failed, first = 0, 0
    for r in range(rounds):
        order = ("direct", "vip") if r % 2 == 0 else ("vip", "direct")
        for which in order:
            rate, f, e = client.run(*targets[which], w.mode, count)
            rates[which].append(rate)
            failed += f
            first = first or e
    ratios = [v / d for d, v in zip(rates["direct"], rates["vip"])]
    extra_us = [(1 / v - 1 / d) * 1e6 for d, v in zip(rates["direct"], rates["vip"])]
    return Cell(size, w.name, rates["direct"], rates["vip"], ratios, extra_us, failed, first)


def calibrate(client: Client, w: Workload, round_seconds: float) -> int:
    """Connections per round so that one round of the direct target takes about round_seconds."""
    rates = [client.run(BACKEND_IP, w.backend_port, w.mode, 300)[0] for _ in range(3)]
    return max(100, int(median(rates) * round_seconds))


def report_header() -> None:
    print(f"{'services':>8}  {'workload':<17} {'direct conn/s':>13} {'ClusterIP conn/s':>16} "
          f"{'ratio (b)/(a)':>13}  {'ratio IQR':>13}  {'+us/conn':>8}  {'rounds':>6}  {'failed':>6}")


def report(cell: Cell) -> None:
    lo, hi = quartiles(cell.ratios)
    r = median(cell.ratios)
    mark = "" if r >= TARGET_RATIO else f"  (below {TARGET_RATIO})"
    print(f"{cell.size:>8}  {cell.workload:<17} {median(cell.direct):>13,.0f} {median(cell.vip):>16,.0f} "
          f"{r:>13.4f}  {lo:>6.4f}-{hi:<6.4f}  {median(cell.extra_us):>8.2f}  {len(cell.ratios):>6}  "
          f"{cell.failed:>6}{mark}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 1 and 1000, few short rounds")
    ap.add_argument("--sizes", default=None, help="comma-separated Service counts (default 1,1000,10000,20000)")
    ap.add_argument("--rounds", type=int, default=None, help="A/B pairs per cell (default 40; --quick 4)")
    ap.add_argument("--round-seconds", type=float, default=None,
                    help="length of one round of the direct target (default 0.1; --quick 0.03)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the client and the server to CPUs")
    ap.add_argument("--no-fill-lru", action="store_true",
                    help="leave the socket reverse-NAT LRU empty at the start (it fills during the run)")
    a = ap.parse_args()
    sizes = [int(s) for s in (a.sizes or ("1,1000" if a.quick else "1,1000,10000,20000")).split(",")]
    rounds = a.rounds or (4 if a.quick else 40)
    round_seconds = a.round_seconds or (0.03 if a.quick else 0.1)
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 and not a.no_pin else (None, None)

    sigterm_exits()
    client_bin, server_bin = build("tcp_client"), build("tcp_server")
    sizes_cfg = MapSizes()
    if max(sizes) + len(WORKLOADS) > sizes_cfg.revnat:
        ap.error(f"at most {sizes_cfg.revnat - len(WORKLOADS)} services fit in the reverse-NAT map")
    with bench_bed(backends=1) as bed:
        print(f"# lb at {code_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        t0 = time.monotonic()
        datapath.attach(paths_of(bed), sizes_cfg)
        print(f"# datapath attached to {bed.cgroup} in {time.monotonic() - t0:.1f} s; "
              f"client CPU {client_cpu}, server CPU {server_cpu}", flush=True)
        if not a.no_fill_lru:
            fill_sock_revnat(bed.bpf_root, sizes_cfg.sock_revnat)
            print(f"# socket reverse-NAT LRU filled ({sizes_cfg.sock_revnat} entries)", flush=True)
        server = bed.popen(pinned([server_bin] + [f"{BACKEND_IP}:{w.backend_port}:{w.mode}" for w in WORKLOADS],
                                  server_cpu), bed.backend_ns, False, stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the C server did not start")
        client = Client(bed, client_bin, client_cpu)
        maps = PinnedServiceMaps(bed.bpf_root)
        reconciler = Reconciler(maps, revnat_limit=sizes_cfg.revnat)
        try:
            counts = {}
            cells = []
            for size in sizes:
                t0 = time.monotonic()
                want = desired(size)
                reconciler.sync(want, prune=True)
                held = maps.dump_frontends()
                if set(held) != set(want) or any(m is None or m.count != 1 for m, _ in held.values()):
                    raise RuntimeError(f"maps do not hold the {size} services just programmed")
                for w in WORKLOADS:  # the VIP must reach the backend, and look like the VIP to the app
                    reply, peer = client.check(VIP, w.vip_port, w.mode)
                    want_reply = f"{BACKEND_IP}:{w.backend_port}" if w.mode == "r" else "-"
                    if reply != want_reply or peer != f"{VIP}:{w.vip_port}":
                        raise RuntimeError(f"{VIP}:{w.vip_port} answered {reply!r} as {peer!r}")
                print(f"# {size} services programmed ({len(want)} frontends) and checked "
                      f"in {time.monotonic() - t0:.2f} s", flush=True)
                if not counts:
                    counts = {w.name: calibrate(client, w, round_seconds) for w in WORKLOADS}
                    print("# connections per round: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
                    report_header()
                for w in WORKLOADS:
                    cell = measure(client, w, counts[w.name], rounds, size)
                    cells.append(cell)
                    report(cell)
            failed = sum(c.failed for c in cells)
            if failed:
                errnos = {c.first_errno for c in cells if c.first_errno}
                print(f"# {failed} connections failed (first errno(s): {sorted(errnos)})")
            worst = min(cells, key=lambda c: median(c.ratios))
            print(f"# lowest median ratio {median(worst.ratios):.4f} ({worst.size} services, {worst.workload}); "
                  f"target >= {TARGET_RATIO}: {'met' if median(worst.ratios) >= TARGET_RATIO else 'NOT met'}")
        finally:
            client.close()
            maps.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
