"""The agent on a real kube-apiserver at scale (issue: API watch):

1. 10 000 Services with 10 endpoints each are created in the API server (before the agent starts).
2. The agent starts (--kubeconfig): time from process start to every Service programmed in the maps,
   the initial sync as the agent logs it, and the agent's peak RSS (VmHWM).
3. 1 000 single-endpoint changes, one after another: time from the API write (request sent) to the
   map holding the new backend, read straight from the pinned maps; p50 / p99.

Targets: full sync < 5 s, RSS < 300 MB, p99 < 100 ms. No timed assertions: figures are printed.

    .venv/bin/python bench/api_sync.py [--services N] [--changes N]
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import bench_bed, code_version, sigterm_exits  # noqa: E402
from lb.maps import bpfsys  # noqa: E402
from lb.maps.services import _BACKEND, _VAL, pack_frontend  # noqa: E402
from lb.model import Frontend  # noqa: E402
from lb.testing.apiserver import ADMIN_TOKEN, ControlPlane  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Api:
    def __init__(self, cp: ControlPlane):
        self.url, self.ctx = cp.url, ssl.create_default_context(cafile=str(cp.ca))
        self.local = threading.local()

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
            return json.loads(r.read())


def vip(i: int) -> str:
    return f"10.96.{100 + i // 250}.{i % 250 + 1}"


def ep_ip(i: int, j: int) -> str:
    return f"10.{100 + i // 250}.{i % 250}.{j + 1}"


def objects(i: int, ns: str) -> tuple[dict, dict]:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": ns},
           "spec": {"clusterIP": vip(i), "clusterIPs": [vip(i)], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"s{i}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": f"s{i}"}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": [ep_ip(i, j)], "conditions": {"ready": True}} for j in range(10)]}
    return svc, es


def slot1_backend(fd_svc: int, fd_be: int, fe: Frontend) -> str | None:
    """The backend IP in slot 1 of a frontend, straight from the pinned maps."""
    v = bpfsys.lookup(fd_svc, pack_frontend(fe, 1), _VAL.size)
    if v is None:
        return None
    be = bpfsys.lookup(fd_be, _VAL.unpack(v)[0].to_bytes(4, "little"), _BACKEND.size)
    return None if be is None else socket.inet_ntop(socket.AF_INET, _BACKEND.unpack(be)[0][12:])


def main() -> int:
    sigterm_exits()
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--changes", type=int, default=1000)
    a = ap.parse_args()
    print(f"# lb at {code_version()}; {a.services} Services x 10 endpoints; {a.changes} changes")
    with ControlPlane() as cp, bench_bed() as bed:
        api = Api(cp)
        ns = "bench"
        api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        t0 = time.monotonic()

        def create(i: int) -> None:
            svc, es = objects(i, ns)
            api.call("POST", f"/api/v1/namespaces/{ns}/services", svc)
            api.call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", es)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(a.services)))
        print(f"# created {a.services} Services + {a.services} EndpointSlices in the API server in {time.monotonic() - t0:.1f} s")

        argv = [sys.executable, "-m", "lb.cli", "agent", "--kubeconfig", str(cp.kubeconfig), "--node-name", "bench",
                "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root, "--network-mode", "none",
                "--healthz-bind-address", "", "--metrics-bind-address", ""]
        lines: list[str] = []
        start = time.monotonic()
        agent = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=lambda: [lines.append((time.monotonic(), l.rstrip())) for l in agent.stderr], daemon=True).start()
        try:
            while not any("initial sync complete" in l for _, l in lines):
                if agent.poll() is not None:
                    raise RuntimeError("agent exited:\n" + "\n".join(l for _, l in lines))
                time.sleep(0.01)
            ready = next(t for t, l in lines if "initial sync complete" in l) - start
            listed = next((t for t, l in lines if "listed" in l), start) - start
            attached = next((t for t, l in lines if "datapath attached" in l), start) - start
            fd_svc = bpfsys.obj_get(f"{bed.bpf_root}/lb_services_v1")
            fd_be = bpfsys.obj_get(f"{bed.bpf_root}/lb_backends_v1")
            assert slot1_backend(fd_svc, fd_be, Frontend(vip(a.services - 1), 80, "TCP")) is not None
            status = Path(f"/proc/{agent.pid}/status").read_text()
            hwm_sync = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
            print(f"full sync: process start -> all {a.services} programmed {ready:.2f} s "
                  f"(datapath attached at {attached:.2f} s, Services/EndpointSlices/Node listed at {listed:.2f} s, "
                  f"sync after list {ready - listed:.2f} s); peak RSS {hwm_sync:.0f} MiB   [targets: < 5 s, < 300 MB]")

            latencies = []
            for k in range(a.changes):
                i = k % a.services
                fe = Frontend(vip(i), 80, "TCP")
                new_ip = f"10.250.{k // 250}.{k % 250 + 1}"
                _, es = objects(i, ns)
                es["endpoints"] = [{"addresses": [new_ip], "conditions": {"ready": True}}]  # one endpoint, new IP
                t = time.monotonic()
                api.call("PUT", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/s{i}-1", es)
                while slot1_backend(fd_svc, fd_be, fe) != new_ip:
                    if time.monotonic() - t > 10:
                        raise RuntimeError(f"change {k} not programmed after 10 s")
                    time.sleep(0.0005)
                latencies.append(time.monotonic() - t)
            q = statistics.quantiles(latencies, n=100)
            status = Path(f"/proc/{agent.pid}/status").read_text()
            hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
            print(f"{a.changes} single-endpoint changes, API write -> map updated: p50 {q[49] * 1000:.1f} ms, "
                  f"p99 {q[98] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms   [target p99 < 100 ms]; "
                  f"peak RSS over the whole run {hwm:.0f} MiB")
        finally:
            agent.kill()
            agent.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
