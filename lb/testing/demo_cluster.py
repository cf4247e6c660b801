"""`make demo-cluster`: a local kube-apiserver (real, built from k8s.io/kubernetes), the agent watching
it, a Service and its EndpointSlice created with kubectl, and a client in a namespace reaching it
through its ClusterIP. Everything is removed at the end."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..datapath import cleanup
from ..settings import Paths
from .apiserver import ControlPlane
from .bed import Bed

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = {"apiVersion": "v1", "kind": "List", "items": [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
     "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
     "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
     "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ("10.200.1.11", "10.200.1.12", "10.200.1.13")]},
]}


def main() -> int:
    with ControlPlane() as cp, Bed() as bed:
        print(f"kube-apiserver at {cp.url} (kubeconfig {cp.kubeconfig})")
        agent = None
        try:
            bed.servers(["10.200.1.11", "10.200.1.12", "10.200.1.13"], 8080)
            agent = subprocess.Popen([sys.executable, "-m", "lb.cli", "agent", "--kubeconfig", str(cp.kubeconfig),
                                      "--node-name", "demo-node", "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root,
                                      "--network-mode", "none", "--healthz-bind-address", "127.0.0.1:0",
                                      "--metrics-bind-address", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
            threading.Thread(target=lambda: [print("  agent:", l.rstrip()) for l in agent.stderr], daemon=True).start()
            print("$ kubectl apply -f web.json")
            print(cp.kubectl("apply", "-f", "-", input=json.dumps(MANIFEST)).rstrip())
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = subprocess.run([sys.executable, "-m", "lb.cli", "service", "list", "--bpf-root", bed.bpf_root],
                                     capture_output=True, text=True, cwd=ROOT).stdout
                if "10.96.0.10:80/TCP" in out and "10.200.1.13" in out:
                    print(out)
                    break
                time.sleep(0.1)
            r = bed.run_client("10.96.0.10:80", "--count", "300")
            print(f"300 connections to 10.96.0.10:80 from a client namespace: errors {dict(r['errors']) or 'none'}")
            for backend, n in sorted(r["answered"].items()):
                print(f"   {backend:22} {n:4}  {'#' * (n // 8)}")
            return 0 if not r["errors"] and len(r["answered"]) == 3 else 1
        finally:
            if agent:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=10)
            cleanup(Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root))


if __name__ == "__main__":
    sys.exit(main())
