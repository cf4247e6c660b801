"""Pod-to-pod TCP throughput across simulated nodes: VXLAN overlay and direct routing, each against a
plain veth+bridge baseline built the same way (node to node over the same bridge, no pod hop, no
encapsulation), measured interleaved in one run: overlay, baseline, direct, baseline, ... and
reported as ratios of medians. iperf3, one stream, 2 s per round.

    .venv/bin/python bench/pod_throughput.py [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import wait_for, write_manifests  # noqa: E402
from lb.testing.bed import enter  # noqa: E402
from lb.testing.cluster import Cluster, node_ip, node_object, pod_ip  # noqa: E402


def iperf(ns_client: str, ns_server: str, server_ip: str, seconds: float) -> float:
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-B", server_ip, "-p", "5201"], preexec_fn=lambda: enter(ns_server, None),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = subprocess.run(["iperf3", "-c", server_ip, "-p", "5201", "-t", str(seconds), "-J"],
                               preexec_fn=lambda: enter(ns_client, None), capture_output=True, text=True)
            if r.returncode == 0:
                return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.1)  # server not listening yet
        raise RuntimeError(r.stderr)
    finally:
        srv.kill()
        srv.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2)
    a = ap.parse_args()
    results: dict[str, list[float]] = {}
    for mode in ("overlay", "direct"):
        with Cluster(nodes=2) as c, tempfile.TemporaryDirectory() as d:
            write_manifests(Path(d), "nodes.json", [node_object(n, c.node_name(n)) for n in (1, 2)])
            for n in (1, 2):
                c.add_pod(n, 1)
                c.agent(n, d, mode)
            for n in (1, 2):
                wait_for(lambda: any("initial sync complete" in l for l in c.logs[n]), 30)
            wait_for(lambda: "proto 193" in c.in_node(1, ["ip", "route"]), 10)
            for _ in range(a.rounds):
                results.setdefault(mode, []).append(iperf(c.pods[(1, 1)], c.pods[(2, 1)], pod_ip(2, 1), a.seconds))
                results.setdefault(f"baseline/{mode}", []).append(iperf(c.node_ns(1), c.node_ns(2), node_ip(2), a.seconds))
    print(f"{'path':<28} {'median Gbit/s':>14}   rounds")
    for k, v in results.items():
        print(f"{k:<28} {statistics.median(v):>14.2f}   {', '.join(f'{x:.2f}' for x in v)}")
    for mode in ("overlay", "direct"):
        ratio = statistics.median(results[mode]) / statistics.median(results[f"baseline/{mode}"])
        print(f"ratio {mode}/baseline (pod to pod across nodes vs node to node on the same bridge): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
