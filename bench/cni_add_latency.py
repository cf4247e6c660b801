"""CNI ADD latency as the runtime sees it: the installed static launcher, over the unix socket, to the
plugin server, creating a real veth pair, address and routes in a fresh pod namespace. ADDs run one
after another (the runtime's usual pattern per pod), then the same number of DELs.

    .venv/bin/python bench/cni_add_latency.py [--pods 100]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb.testing.cni_node import Node  # noqa: E402  (the tests' CNI node: a netns, the server, the installed launcher)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        node = Node(Path(d))
        try:
            node.install()
            pods = [node.pod() for _ in range(a.pods)]
            adds, dels = [], []
            for i, p in enumerate(pods):
                t = time.perf_counter()
                rc, res = node.launcher("ADD", node.plugin_conf, cid=f"bench{i}", netns=p)
                adds.append(time.perf_counter() - t)
                assert rc == 0, res
            for i, p in enumerate(pods):
                t = time.perf_counter()
                rc, res = node.launcher("DEL", node.plugin_conf, cid=f"bench{i}", netns=p)
                dels.append(time.perf_counter() - t)
                assert rc == 0, res
        finally:
            node.close()
    for name, xs in (("ADD", adds), ("DEL", dels)):
        q = statistics.quantiles(xs, n=100)
        print(f"{name}: {len(xs)} pods, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms "
              f"(launcher exec + unix socket + plugin + netlink)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
