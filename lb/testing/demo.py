"""`make demo`: a throwaway test bed, the agent on examples/, many connections to the ClusterIP,
which backends answered, and everything removed again. No cluster needed."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..datapath import cleanup
from ..settings import Paths
from .bed import Bed

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifests", default=str(ROOT / "examples"))
    ap.add_argument("--count", type=int, default=300)
    a = ap.parse_args()
    bed = Bed()
    print(f"test bed: client netns {bed.client_ns}, backend netns {bed.backend_ns}, cgroup {bed.cgroup}")
    with bed:
        agent = None
        try:
            bed.servers(["10.200.1.11", "10.200.1.12", "10.200.1.13", "10.200.1.14",
                         "fd00:201::11", "fd00:201::12", "fd00:201::13"], 8080)
            agent = subprocess.Popen([sys.executable, "-m", "lb.cli", "agent", "--manifests", a.manifests,
                                      "--node-name", "demo-node", "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root,
                                      "--network-mode", "none", "--healthz-bind-address", "127.0.0.1:0",
                                      "--metrics-bind-address", "127.0.0.1:0"],
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
            ready = threading.Event()

            def follow():
                for line in agent.stderr:
                    print("  agent:", line.rstrip())
                    if "initial sync complete" in line:
                        ready.set()
            threading.Thread(target=follow, daemon=True).start()
            if not ready.wait(60):
                print("agent did not become ready", file=sys.stderr)
                return 1
            print()
            subprocess.run([sys.executable, "-m", "lb.cli", "service", "list", "--bpf-root", bed.bpf_root], cwd=ROOT)
            print()
            ok = True
            for target, mode in (("10.96.0.10:80", "tcp"), ("[fd00:96::10]:80", "tcp"), ("10.96.0.10:53", "udp"),
                                 ("[fd00:96::10]:53", "udp")):
                r = bed.run_client(target, "--mode", mode, "--count", str(a.count))
                seen = r["sources"] or r["peers"]
                print(f"{mode.upper():4} {target:18} {r['attempts']} attempts, {sum(r['answered'].values())} answered, "
                      f"errors {dict(r['errors']) or 'none'}; the client saw the peer as {', '.join(seen)}")
                for backend, n in sorted(r["answered"].items()):
                    print(f"       {backend:24} {n:4}  {'#' * (n * 40 // a.count)}")
                ok = ok and not r["errors"] and "10.200.1.14:8080" not in r["answered"]
            print("\n10.200.1.14 is not ready in examples/demo.yaml: it must never answer." if ok else "\nUNEXPECTED RESULT")
            return 0 if ok else 1
        finally:
            if agent:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=10)
            removed = cleanup(Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root))
            print(f"cleaned up: {len(removed)} links and pins, the namespaces and the cgroup")


if __name__ == "__main__":
    sys.exit(main())
