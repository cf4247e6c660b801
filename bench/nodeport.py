"""NodePort from outside the nodes: bpflb vs the real kube-proxy (nftables and iptables modes) vs a direct
connection to the pod, at 1 / 1 000 / 10 000 Services.

    python bench/nodeport.py [--quick] [--services 1,1000,10000] [--modes kube-proxy-nftables,...]

The bed is lb/testing/northsouth.py's (two netns nodes on a bridge, an outside client netns, pods made by
the bundled CNI, a real kube-apiserver), one per proxy mode, all up at the same time (each in its own
namespaces, with its own API server). In each: pod `a` on node 1 runs bench/tcp_server.c (connect+close
and request/response listeners) and an iperf3 server; one Service (eTP Cluster, endpoint `a` alone)
exposes them on NodePorts. Each bed's outside client (bench/tcp_client.c, iperf3) dials three targets:

    direct      the pod IP (the outside netns routes each pod CIDR via its node): no service proxy
    np-local    node 1's IP:NodePort (the backend is on that node)
    np-remote   node 2's IP:NodePort (the backend is on node 1: forwarded and masqueraded)

Every (mode, target) pair is measured in short turns, in an order that reverses every round, so the
machine's noise falls on all of them alike: the ratios between beds are measured side by side, as the
ratios within one.

The extra Services are ClusterIP Services, each with one endpoint (never dialled), created through each
bed's API server before a scale is measured; a fresh "sentinel" NodePort Service created after them
answers only once the proxy has programmed everything before it (the watches deliver in order).

Figures: connections/s (connect+close, median of rounds: one client, one connection after another,
and --parallel client processes at once, the rate the node sustains with several connections in flight;
that run found two flows sharing a masquerade port, bpf/tc_lb.c nat_lock), request/response latency per connection
(connect, one request line, its reply, close; p50/p99 over samples timed inside the C client), TCP
throughput (iperf3, median of runs). Ratios: each NodePort target over direct in the same bed, and
bpflb over kube-proxy nftables target by target. "direct" is not the same path in both beds: in a
kube-proxy bed it still crosses node 1's netfilter with conntrack on (kube-proxy's rules load it for
every flow of the netns), in the bpflb bed it does not; the cross-bed ratio normalised by each bed's
direct is printed in brackets (it charges bpflb with kube-proxy's conntrack cost on direct).
Targets (issue 10): bpflb >= 1.2x kube-proxy nftables connections/s at 10 000 Services (np-local,
side by side); bpflb latency p99 within 1.1x of direct.

--bpf-stats (bpflb beds): turns kernel.bpf_stats_enabled on (restored afterwards) and, for each target's
connect+close rounds, prints what the tc programs of both nodes ran: runs per connection and ns per run,
per node and program (the programs attached at tcx ingress of the nodes' devices, found by
bpf_prog_query in the node namespaces). Stats add two clock reads per run to every target alike.

Network safety: every client runs in the outside netns, whose only routes are the bed's addresses.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import bpf_stats, build_c, code_version, median, percentile, sigterm_exits
from lb import datapath
from lb import netns as netns_
from lb.maps import bpfsys
from lb.testing.apiserver import ADMIN_TOKEN
from lb.testing.bed import enter
from lb.testing.cluster import node_ip
from lb.testing.northsouth import BENCH_MODES, NorthSouthBed

RR_PORT, CC_PORT, IPERF_PORT = 8080, 8081, 5201
NP_RR, NP_CC, NP_IPERF = 30080, 30081, 30201
TARGETS = ("direct", "np-local", "np-remote")


class Api:
    """Bulk object creation straight against the API server (kubectl per object would take minutes)."""

    def __init__(self, bed: NorthSouthBed):
        self.url, self.ctx = bed.cp.url, ssl.create_default_context(cafile=str(bed.cp.ca))

    def post(self, path: str, body: dict) -> None:
        req = urllib.request.Request(self.url + path, method="POST", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=60) as r:
            r.read()


def filler(i: int) -> tuple[dict, dict]:
    """ClusterIP Service i with one (never dialled) endpoint on node 2."""
    name = f"fill{i}"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"ports": [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
          "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": [f"10.{250 + i // 65536}.{i // 256 % 256}.{i % 256}"],
                         "conditions": {"ready": True}, "nodeName": "node2"}]}
    return svc, es


def bench_service(name: str, pod_ip: str, ports: list[tuple[str, int, int, int]]) -> list[dict]:
    """A NodePort Service (eTP Cluster) with pod_ip as its one endpoint; ports: (name, port, target, nodePort)."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"type": "NodePort", "ports": [{"name": n, "port": p, "protocol": "TCP", "targetPort": t,
                                                    "nodePort": np} for n, p, t, np in ports]}}
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
          "addressType": "IPv4", "ports": [{"name": n, "port": t, "protocol": "TCP"} for n, _, t, _ in ports],
          "endpoints": [{"addresses": [pod_ip], "conditions": {"ready": True}, "nodeName": "node1"}]}
    return [svc, es]


class Client:
    """bench/tcp_client.c in the outside netns (one long-lived process, a command per line)."""

    def __init__(self, bed: NorthSouthBed):
        self.p = subprocess.Popen([build_c("tcp_client")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: enter(bed.outside_ns, None))

    def cmd(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def run(self, ip: str, port: int, mode: str, count: int, procs: int = 1) -> tuple[int, int, int, int]:
        ok, failed, first, ns = self.cmd(f"run {ip} {port} {mode} {count} {procs}").split()
        return int(ok), int(failed), int(first), int(ns)

    def close(self) -> None:
        try:
            self.cmd("quit")
        except (OSError, ValueError):
            pass
        self.p.kill()
        self.p.wait()


def iperf(bed: NorthSouthBed, ip: str, port: int, seconds: float) -> float:
    """Gbit/s of one iperf3 run from the outside netns. The server takes one test at a time and may
    not have seen the previous client's end yet when the next one connects ("the server is busy"):
    that is retried after a moment."""
    for attempt in range(5):
        r = subprocess.run(["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout",
                            "3000"], capture_output=True, text=True, preexec_fn=lambda: enter(bed.outside_ns, None),
                           timeout=seconds + 30)
        doc = json.loads(r.stdout or "{}")
        if "server is busy" not in str(doc.get("error", "")):
            break
        time.sleep(0.5)
    if "error" in doc or r.returncode != 0:
        raise RuntimeError(f"iperf3 to {ip}:{port}: {doc.get('error') or r.stderr}")
    return doc["end"]["sum_received"]["bits_per_second"] / 1e9


def tc_programs(bed: NorthSouthBed) -> dict[int, str]:
    """ID -> "node<n> <program>" of the programs at tcx ingress of the nodes' devices."""
    from pyroute2 import IPRoute

    out: dict[int, str] = {}
    for n in (1, 2):
        def query() -> set[int]:
            with IPRoute() as ipr:
                idxs = [link["index"] for link in ipr.get_links()]
            ids = set()
            for idx in idxs:
                try:
                    ids.update(bpfsys.prog_query(idx, datapath.TCX_INGRESS))
                except OSError:
                    pass
            return ids
        for pid in netns_.run_in(f"/run/netns/{bed.cluster.node_ns(n)}", query):
            fd, name = bpfsys.prog_name(pid)
            os.close(fd)
            out[pid] = f"node{n} {name}"
    return out


def prog_counters(ids: dict[int, str]) -> dict[str, tuple[int, int]]:
    """label -> (run_time_ns, run_cnt), summed over the programs of that label."""
    out: dict[str, tuple[int, int]] = {}
    for pid, label in ids.items():
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)], capture_output=True,
                                         text=True, check=True).stdout)
        t, c = out.get(label, (0, 0))
        out[label] = (t + info.get("run_time_ns", 0), c + info.get("run_cnt", 0))
    return out


@dataclass
class Proxy:
    """One proxy mode's bed, up for the whole run: its backend pod, its client, its Services."""
    mode: str
    bed: NorthSouthBed
    client: Client
    pod_ip: str
    api: Api
    made: int = 1  # the bench Service
    progs: dict[int, str] = field(default_factory=dict)

    def addr(self, t: str) -> tuple[str, int, int, int]:
        return {"direct": (self.pod_ip, CC_PORT, RR_PORT, IPERF_PORT), "np-local": (node_ip(1), NP_CC, NP_RR, NP_IPERF),
                "np-remote": (node_ip(2), NP_CC, NP_RR, NP_IPERF)}[t]


def start_proxy(mode: str, workdir: Path, stack: ExitStack) -> Proxy:
    bed = stack.enter_context(NorthSouthBed(mode, workdir / mode))
    a = bed.pod(1, "a", serve=False)
    server = subprocess.Popen([build_c("tcp_server"), f"{a.ip}:{RR_PORT}:r", f"{a.ip}:{CC_PORT}:c"],
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: enter(a.netns, bed.cluster.cgroup(1)))
    a.proc = server   # killed with the pod
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("tcp_server did not start")
    iperf_srv = subprocess.Popen(["iperf3", "-s", "-B", a.ip, "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, preexec_fn=lambda: enter(a.netns, None))
    bed.cluster.procs.append(iperf_srv)
    bed.apply(*bench_service("bench", a.ip, [("cc", 81, CC_PORT, NP_CC), ("rr", 80, RR_PORT, NP_RR),
                                             ("iperf", 5201, IPERF_PORT, NP_IPERF)]))
    client = Client(bed)
    stack.callback(client.close)
    return Proxy(mode, bed, client, a.ip, Api(bed))


def scale_to(px: Proxy, scale: int, i: int) -> None:
    """Create ClusterIP Services up to `scale`, then wait until the proxy programmed them all."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        def create(k: int) -> None:
            svc, es = filler(k)
            px.api.post("/api/v1/namespaces/default/services", svc)
            px.api.post("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", es)
        list(pool.map(create, range(px.made, scale)))
    px.made = max(px.made, scale)
    created = time.monotonic() - t0
    # the sentinel: answers once the proxy programmed everything created before it
    px.bed.apply(*bench_service(f"sentinel{i}", px.pod_ip, [("cc", 81, CC_PORT, 30300 + i)]))
    px.bed.wait(lambda: px.client.run(node_ip(1), 30300 + i, "c", 1)[0] == 1, timeout=900,
                what=f"{scale} Services programmed")
    print(f"# {px.mode}: {scale} Services (created in {created:.0f} s, programmed after {time.monotonic() - t0:.0f} s)",
          flush=True)


def measure(proxies: list[Proxy], q: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """Every (proxy, target) pair measured in turns: round r runs each pair once, in an order that
    reverses every round, so machine noise falls on all pairs alike and the ratios between them,
    across beds too, are side by side."""
    pairs = [(px, t) for px in proxies for t in TARGETS]
    rates: dict[tuple[str, str], list[float]] = {(px.mode, t): [] for px, t in pairs}
    prates: dict[tuple[str, str], list[float]] = {(px.mode, t): [] for px, t in pairs}
    runs: dict[tuple[str, str], dict[str, list[int]]] = {(px.mode, t): {} for px, t in pairs}
    for px in proxies:
        px.progs = tc_programs(px.bed) if q.bpf_stats and px.bed.bpflb else {}
    for r in range(q.rounds):
        for px, t in (pairs if r % 2 == 0 else pairs[::-1]):
            before = prog_counters(px.progs) if px.progs else {}
            ok, failed, first, ns = px.client.run(px.addr(t)[0], px.addr(t)[1], "c", q.conns)
            if failed:
                raise RuntimeError(f"{px.mode} {t}: {failed} failed connections (errno {first})")
            rates[(px.mode, t)].append(ok / (ns / 1e9))
            for label, (rt, rc) in (prog_counters(px.progs) if px.progs else {}).items():
                acc = runs[(px.mode, t)].setdefault(label, [0, 0])
                acc[0] += rt - before[label][0]
                acc[1] += rc - before[label][1]
            if q.parallel > 1:
                ok, failed, first, ns = px.client.run(px.addr(t)[0], px.addr(t)[1], "c", q.conns * q.parallel,
                                                      q.parallel)
                if failed:
                    raise RuntimeError(f"{px.mode} {t}: {failed} of {q.conns * q.parallel} connections from "
                                       f"{q.parallel} clients at once failed (errno {first})")
                prates[(px.mode, t)].append(ok / (ns / 1e9))
    for px, t in pairs:
        if px.progs:
            parts = [f"{label} {rc / (q.rounds * q.conns):.2f} runs/conn x {rt / rc:.0f} ns"
                     for label, (rt, rc) in sorted(runs[(px.mode, t)].items()) if rc]
            print(f"# bpf_stats {px.mode} {t:10} " + ("; ".join(parts) or "no program ran"), flush=True)
    lat: dict[tuple[str, str], list[float]] = {(px.mode, t): [] for px, t in pairs}
    for i in range(q.samples):
        for px, t in (pairs if i % 2 == 0 else pairs[::-1]):
            ok, failed, first, ns = px.client.run(px.addr(t)[0], px.addr(t)[2], "r", 1)
            if failed:
                raise RuntimeError(f"{px.mode} {t}: request/response failed (errno {first})")
            lat[(px.mode, t)].append(ns / 1e3)
    for px, t in pairs:
        xs = lat[(px.mode, t)]
        print(f"# latency {px.mode} {t:10} " + "  ".join(f"p{q:g} {percentile(xs, q):.0f} us"
                                                       for q in (10, 50, 90, 95, 99, 99.9)), flush=True)
    thr: dict[tuple[str, str], list[float]] = {(px.mode, t): [] for px, t in pairs}
    for i in range(q.iperf_runs):
        for px, t in (pairs if i % 2 == 0 else pairs[::-1]):
            thr[(px.mode, t)].append(iperf(px.bed, px.addr(t)[0], px.addr(t)[3], q.iperf_seconds))
    out: dict[str, dict[str, dict[str, float]]] = {px.mode: {} for px in proxies}
    for px, t in pairs:
        k = (px.mode, t)
        out[px.mode][t] = {"conn/s": median(rates[k]), "par conn/s": median(prates[k]) if prates[k] else float("nan"),
                           "clients": q.parallel, "p50 us": percentile(lat[k], 50),
                           "p99 us": percentile(lat[k], 99), "Gbit/s": median(thr[k]) if thr[k] else float("nan")}
    return out


def run(modes: list[str], q: argparse.Namespace, results: dict, failed: list[str]) -> None:
    """Every mode's bed up at once (each in its own namespaces, with its own API server), scaled
    together, measured in turns."""
    with tempfile.TemporaryDirectory(prefix="bpflb-nodeport-") as d, ExitStack() as stack:
        proxies = []
        for mode in modes:
            try:
                proxies.append(start_proxy(mode, Path(d), stack))
            except Exception as e:  # one mode failing leaves the others' figures
                failed.append(mode)
                print(f"# {mode}: FAILED: {str(e)[:2000]}", file=sys.stderr, flush=True)
        for i, scale in enumerate(q.services):
            for px in list(proxies):
                try:
                    scale_to(px, scale, i)
                except Exception as e:
                    failed.append(px.mode)
                    proxies.remove(px)
                    print(f"# {px.mode}: FAILED at {scale} Services: {str(e)[:2000]}", file=sys.stderr, flush=True)
            if not proxies:
                return
            cells = measure(proxies, q)
            for px in proxies:
                results[(px.mode, scale)] = cells[px.mode]
                print_cell(px.mode, scale, cells[px.mode])


def print_cell(mode: str, scale: int, cell: dict) -> None:
    d = cell["direct"]
    for t in TARGETS:
        c = cell[t]
        ratio = "" if t == "direct" else (f"  ({c['conn/s'] / d['conn/s']:.2f}x conn/s, {c['p99 us'] / d['p99 us']:.2f}x p99, "
                                          f"{c['Gbit/s'] / d['Gbit/s']:.2f}x Gbit/s of direct)")
        par = "" if c["par conn/s"] != c["par conn/s"] else f" ({c['par conn/s']:.0f} from {c['clients']} clients)"
        print(f"  {mode:20} {scale:>6} {t:10} {c['conn/s']:9.0f} conn/s{par}  p50 {c['p50 us']:6.0f} us  "
              f"p99 {c['p99 us']:6.0f} us  {c['Gbit/s']:6.2f} Gbit/s{ratio}", flush=True)


def summary(results: dict, modes: list[str], scales: list[int]) -> None:
    print("\n# NodePort vs direct, per bed (conn/s ratio | p99 latency ratio | throughput ratio)")
    for mode in modes:
        for scale in scales:
            cell = results.get((mode, scale))
            if not cell:
                continue
            d = cell["direct"]
            parts = [f"{t}: {cell[t]['conn/s'] / d['conn/s']:.2f} | {cell[t]['p99 us'] / d['p99 us']:.2f} | "
                     f"{cell[t]['Gbit/s'] / d['Gbit/s']:.2f}" for t in TARGETS[1:]]
            print(f"  {mode:20} {scale:>6}  " + "   ".join(parts))
    ref = "kube-proxy-nftables"
    others = [m for m in modes if m != ref]
    if ref not in modes or not others:
        return
    print(f"\n# vs {ref}, conn/s, the two beds measured in turns (>1: faster than {ref}); in brackets, each "
          f"over its own bed's direct first")
    for mode in others:
        for scale in scales:
            a, b = results.get((mode, scale)), results.get((ref, scale))
            if not a or not b:
                continue
            parts = []
            for t in TARGETS[1:]:
                x = (a[t]["conn/s"] / a["direct"]["conn/s"]) / (b[t]["conn/s"] / b["direct"]["conn/s"])
                par = a[t]["par conn/s"] / b[t]["par conn/s"]
                parts.append(f"{t}: {a[t]['conn/s'] / b[t]['conn/s']:.2f}x ({x:.2f}x)" +
                             ("" if par != par else f" {par:.2f}x from {a[t]['clients']} clients"))
            print(f"  {mode:20} {scale:>6}  " + "   ".join(parts))
    if ("bpflb", max(scales)) in results and (ref, max(scales)) in results:
        a, b, s = results[("bpflb", max(scales))], results[(ref, max(scales))], max(scales)
        x = a["np-local"]["conn/s"] / b["np-local"]["conn/s"]
        px = a["np-local"]["par conn/s"] / b["np-local"]["par conn/s"]
        p99 = a["np-local"]["p99 us"] / a["direct"]["p99 us"]
        par = "" if px != px else (f"; from {a['np-local']['clients']} clients {px:.2f}x: {'met' if px >= 1.2 else 'NOT met'}")
        print(f"\n# targets at {s} Services: bpflb conn/s {x:.2f}x kube-proxy nftables (target >= 1.2x): "
              f"{'met' if x >= 1.2 else 'NOT met'}{par}; bpflb p99 {p99:.2f}x direct (target <= 1.1x): "
              f"{'met' if p99 <= 1.1 else 'NOT met'}")


def main() -> int:
    sigterm_exits()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 100 Services, fewer rounds (a smoke run)")
    ap.add_argument("--services", default=None, help="comma-separated scales (default 1,1000,10000)")
    ap.add_argument("--modes", default=",".join(BENCH_MODES), help=f"comma-separated, of {BENCH_MODES}")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="bpflb: per target, the tc programs' runs per connection and ns per run (bpf_stats)")
    ap.add_argument("--rounds", type=int, default=None, help="connect+close rounds per target (default 12; --quick 4)")
    ap.add_argument("--samples", type=int, default=None, help="latency samples per target (default 10000; --quick 1000)")
    ap.add_argument("--no-iperf", action="store_true", help="skip the throughput runs")
    ap.add_argument("--parallel", type=int, default=4,
                    help="connect+close also from this many client processes at once (default 4; 1: not)")
    a = ap.parse_args()
    a.services = [int(x) for x in (a.services or ("1,100" if a.quick else "1,1000,10000")).split(",")]
    rounds, a.conns = (4, 300) if a.quick else (12, 1000)
    a.rounds = a.rounds or rounds
    a.samples = a.samples or (1000 if a.quick else 10000)
    a.iperf_runs, a.iperf_seconds = (0, 1) if a.no_iperf else (1, 1) if a.quick else (3, 3)
    modes = a.modes.split(",")
    print(f"# lb at {code_version()}; modes {modes}; Services {a.services}; {a.rounds} rounds x {a.conns} "
          f"connections, {a.samples} latency samples, {a.iperf_runs} x {a.iperf_seconds} s iperf3 per target"
          + (f"; connect+close also from {a.parallel} clients at once, {a.conns} connections each per round"
             if a.parallel > 1 else ""))
    results: dict = {}
    failed: list[str] = []
    with bpf_stats(a.bpf_stats and "bpflb" in modes):
        run(modes, a, results, failed)
    summary(results, modes, a.services)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
