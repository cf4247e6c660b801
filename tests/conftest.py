"""Shared fixtures. The address plan for every test is lb/testing/bed.py's, re-exported here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from lb.datapath import cleanup
from lb.settings import Paths
from lb.testing.bed import (BACKEND_NET_V4, BACKEND_NET_V6, CLUSTER_NET_V4, CLUSTER_NET_V6, Bed, backend_v4,
                            backend_v6)

ROOT = Path(__file__).resolve().parent.parent

# ---- the address plan ---------------------------------------------------------------------------
VIP4 = "10.96.0.10"
VIP6 = "fd00:96::10"
NODE = "node-a"
BE4 = [backend_v4(10 + n) for n in range(1, 5)]  # 10.200.1.11 .. 14, served in the backend netns
BE6 = [backend_v6(0x10 + n) for n in range(1, 5)]  # fd00:201::11 .. 14
PORT = 8080

__all__ = ["VIP4", "VIP6", "NODE", "BE4", "BE6", "PORT", "BACKEND_NET_V4", "BACKEND_NET_V6", "CLUSTER_NET_V4",
           "CLUSTER_NET_V6"]


# ---- builders -----------------------------------------------------------------------------------
def make_service(ns: str, name: str, mutate: Callable[[dict], None] | None = None) -> dict:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"type": "ClusterIP", "clusterIP": VIP4, "clusterIPs": [VIP4],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}]}}
    if mutate:
        mutate(svc)
    return svc


def make_endpoint(ip: str, ready: bool = True, serving: bool | None = None, terminating: bool | None = None,
                  node: str = NODE, zones: list[str] | None = None, nodes: list[str] | None = None) -> dict:
    """One EndpointSlice endpoint; a condition left None is absent, as the API allows."""
    cond: dict = {"ready": ready}
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    e = {"addresses": [ip], "conditions": cond, "nodeName": node}
    hints = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        e["hints"] = hints
    return e


def make_slice(ns: str, name: str, service: str, ips: list[str], mutate: Callable[[dict], None] | None = None,
               port: int = PORT, port_name: str = "http", protocol: str = "TCP", node: str = NODE) -> dict:
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
          "addressType": "IPv6" if ips and ":" in ips[0] else "IPv4",
          "ports": [{"name": port_name, "port": port, "protocol": protocol}],
          "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node} for ip in ips]}
    if mutate:
        mutate(es)
    return es


def write_manifests(folder: Path, name: str, objs: list[dict]) -> None:
    """Write atomically (rename), as an editor or kubectl would, so the agent never reads half a file."""
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    os.replace(tmp, folder / name)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll until predicate() is truthy. Waiting for a state change, not a timed assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stop_client(proc: subprocess.Popen) -> dict:
    """Stop a `--count 0` client loop (SIGTERM) and return its report."""
    proc.send_signal(signal.SIGTERM)
    return json.loads(proc.communicate(timeout=10)[0])


# ---- kernel fixtures ----------------------------------------------------------------------------
@pytest.fixture
def bed():
    b = Bed()
    b.up()
    try:
        yield b
    finally:
        try:
            cleanup(Paths(cgroup_root=b.cgroup, bpf_root=b.bpf_root))
        finally:
            b.down()


class AgentProc:
    def __init__(self, bed: Bed, manifests: Path | None, extra: list[str] | None = None):
        """manifests None: the source is in ``extra`` (e.g. --kubeconfig)."""
        self.bed, self.manifests, self.extra = bed, manifests, extra or []
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def start(self, wait_ready: bool = True) -> "AgentProc":
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lb.cli", "agent", *(["--manifests", str(self.manifests)] if self.manifests else []),
             "--node-name", NODE,
             "--cgroup-root", self.bed.cgroup, "--bpf-root", self.bed.bpf_root,
             "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
             "--network-mode", "none", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if wait_ready:
            self.wait_log("initial sync complete", timeout=30)
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line.rstrip())

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        def seen():
            if self.proc and self.proc.poll() is not None and not any(text in l for l in self.lines):
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n" + "\n".join(self.lines))
            return next((l for l in self.lines if text in l), None)
        return wait_for(seen, timeout, f"agent log {text!r}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def agent(bed, tmp_path):
    """Factory: agent(extra_flags) -> a started agent on tmp_path/manifests; always stopped."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    started: list[AgentProc] = []

    def start(extra: list[str] | None = None, wait_ready: bool = True) -> AgentProc:
        a = AgentProc(bed, folder, extra)
        started.append(a)
        return a.start(wait_ready)

    start.folder = folder  # type: ignore[attr-defined]
    yield start
    for a in started:
        a.stop(signal.SIGKILL)


def programmed(bed: Bed) -> dict[str, dict]:
    """Frontends as the datapath sees them (pinned maps): 'ip:port/proto' -> row."""
    from lb.inspect import service_rows

    try:
        return {r["frontend"]: r for r in service_rows(bed.bpf_root)}
    except FileNotFoundError:
        return {}


def backends_of(bed: Bed, frontend: str) -> set[str] | None:
    row = programmed(bed).get(frontend)
    return None if row is None else {b["address"] for b in row["backends"]}
