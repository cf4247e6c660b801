"""CNI ADD latency as the runtime sees it: the installed static launcher, over the unix socket, to the
plugin server, creating a real veth pair, address and routes in a fresh pod namespace. ADDs run one
after another (the runtime's usual pattern per pod), then the same number of DELs; with --parallel N,
N launchers at a time (a node starting many pods at once). VERSION round trips give the floor: launcher
exec + socket + server, no netlink.

    .venv/bin/python bench/cni_add_latency.py [--pods 100] [--parallel 1]

Everything runs inside a throwaway "node" namespace (lb/testing/cni_node.py), removed at the end.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb.testing.cni_node import Node  # noqa: E402  (the tests' CNI node: a netns, the server, the installed launcher)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    rc, res = fn(*args)
    elapsed = time.perf_counter() - t
    assert rc == 0, res
    return elapsed


def report(name: str, xs: list[float]) -> None:
    q = statistics.quantiles(xs, n=100)
    print(f"{name:8} {len(xs):4} calls  p50 {q[49] * 1000:6.1f} ms  p99 {q[98] * 1000:6.1f} ms  "
          f"max {max(xs) * 1000:6.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=1, help="launchers running at once")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        node = Node(Path(d))
        try:
            node.install()
            conf = dict(node.plugin_conf, cniVersion="1.1.0")  # what libcni 1.2+ negotiates from the conflist
            if a.pods > 250:  # more than the node's /24 holds
                conf["podCIDR"] = "10.245.0.0/16"
            pods = [node.pod() for _ in range(a.pods)]
            version = [timed(node.launcher, "VERSION", conf) for _ in range(a.pods)]
            with ThreadPoolExecutor(a.parallel) as pool:
                adds = list(pool.map(lambda i: timed(node.launcher, "ADD", conf, f"bench{i}", pods[i]), range(a.pods)))
                dels = list(pool.map(lambda i: timed(node.launcher, "DEL", conf, f"bench{i}", pods[i]), range(a.pods)))
        finally:
            node.close()
    print(f"bpflb-cni through the installed launcher, {a.parallel} at a time:")
    report("VERSION", version)
    report("ADD", adds)
    print(f"         first ADD (makes the node's bpflb_host pair) {adds[0] * 1000:.1f} ms; slowest "
          f"{', '.join(f'{x * 1000:.1f}' for x in sorted(adds)[-3:])} ms")
    report("DEL", dels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
