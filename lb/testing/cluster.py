"""Simulated nodes on one machine: a network namespace per node, joined by a bridge in a namespace
of its own, each node's pods in namespaces behind it, each node's agent in its own cgroup.

Address plan (one place):
  node N   eth0 192.168.50.N/24 (on the bridge), pod CIDR 10.244.N.0/24
  pod M of node N   10.244.N.(10+M)/32 behind host veth "p<M>" (proxy ARP), gateway 10.244.N.1
No namespace here has a route out of the machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns

from ..datapath import cleanup
from ..settings import Paths
from .bed import CGROUP2, enter

ROOT = Path(__file__).resolve().parents[2]


def node_ip(n: int) -> str:
    return f"192.168.50.{n}"


def node_ip6(n: int) -> str:
    """node N's IPv6 address on the bridge, when the cluster is made with ipv6=True"""
    return f"fd00:50::{n:x}"


def pod_ip(n: int, m: int) -> str:
    return f"10.244.{n}.{10 + m}"


def node_object(n: int, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": f"10.244.{n}.0/24", "podCIDRs": [f"10.244.{n}.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n)}, {"type": "Hostname", "address": name}]}}


def _sysctl_in(ns: str, key: str, value: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", f"{key}={value}"], check=True)


@dataclass
class Cluster:
    nodes: int = 2
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    procs: list[subprocess.Popen] = field(default_factory=list)
    pods: dict[tuple[int, int], str] = field(default_factory=dict)
    agents: dict[int, subprocess.Popen] = field(default_factory=dict)
    logs: dict[int, list[str]] = field(default_factory=dict)
    host_devices: bool = True   # False: leave bpflb_host/bpflb_net to the CNI plugin (it makes them on ADD)
    ipv6: bool = False          # True: each node's eth0 also holds node_ip6(n)/64

    def __post_init__(self) -> None:
        self.bridge_ns = f"bl{self.tag}br"

    def node_ns(self, n: int) -> str:
        return f"bl{self.tag}n{n}"

    def node_name(self, n: int) -> str:
        return f"node{n}"

    def cgroup(self, n: int) -> str:
        return os.path.join(CGROUP2, f"bpflb-{self.tag}-n{n}")

    def bpf_root(self, n: int) -> str:
        return f"/sys/fs/bpf/bpflb-{self.tag}-n{n}"

    # ---- lifecycle ----
    def __enter__(self) -> "Cluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        netns.create(self.bridge_ns)
        with IPRoute(netns=self.bridge_ns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.link("set", index=br, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        # The bridge stands for the network between the machines, a switch: no netfilter on what it
        # bridges. A new namespace has br_netfilter's calls on (when the kernel has it), which ran every
        # bridged frame of every bed through the (empty) IP hooks: ~8% of a connect+close storm's CPU in
        # bench/nodeport.py, alike in every proxy's bed, narrowing every ratio between them.
        if os.path.isdir("/proc/sys/net/bridge"):
            for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
                _sysctl_in(self.bridge_ns, f"net.bridge.{key}", "0")
        for n in range(1, self.nodes + 1):
            self.add_node(n)

    def add_node(self, n: int) -> None:
        ns = self.node_ns(n)
        netns.create(ns)
        os.makedirs(self.cgroup(n), exist_ok=True)
        with IPRoute(netns=self.bridge_ns) as ipr:
            ipr.link("add", ifname=f"n{n}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=f"n{n}")[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
        with IPRoute(netns=ns) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=node_ip(n), prefixlen=24)
            if self.ipv6:
                ipr.addr("add", index=eth, address=node_ip6(n), prefixlen=64, flags=0x02)  # IFA_F_NODAD
            ipr.link("set", index=eth, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            if self.host_devices:
                # The node's host device pair holds the pod gateway address, as the CNI plugin makes it:
                # with a local route to the gateway, proxy ARP on each pod's host veth answers for it.
                ipr.link("add", ifname="bpflb_host", kind="veth", peer={"ifname": "bpflb_net"})
                host = ipr.link_lookup(ifname="bpflb_host")[0]
                ipr.addr("add", index=host, address=f"10.244.{n}.1", prefixlen=32)
                ipr.link("set", index=host, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="bpflb_net")[0], state="up")
        self._forwarding(ns)

    def _forwarding(self, ns: str) -> None:
        _sysctl_in(ns, "net.ipv4.ip_forward", "1")
        if self.ipv6:
            _sysctl_in(ns, "net.ipv6.conf.all.forwarding", "1")

    def add_pod(self, n: int, m: int) -> str:
        """A pod namespace behind node n (what the CNI plugin does, minimal, for network tests)."""
        pod = f"{self.node_ns(n)}p{m}"
        netns.create(pod)
        self.pods[(n, m)] = pod  # registered first: down() removes it even if the set-up below fails
        with IPRoute(netns=self.node_ns(n)) as ipr:
            ipr.link("add", ifname=f"p{m}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
            host = ipr.link_lookup(ifname=f"p{m}")[0]
            ipr.link("set", index=host, state="up")
            ipr.route("add", dst=f"{pod_ip(n, m)}/32", oif=host)
        _sysctl_in(self.node_ns(n), f"net.ipv4.conf.p{m}.proxy_arp", "1")
        with IPRoute(netns=pod) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=pod_ip(n, m), prefixlen=32)
            ipr.link("set", index=eth, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            # pods only, no default route out; the gateway answers by proxy ARP on the host veth
            ipr.route("add", dst="10.244.0.0/16", gateway=f"10.244.{n}.1", oif=eth, flags=4)  # RTNH_F_ONLINK
        return pod

    def down(self) -> None:
        for p in list(self.agents.values()) + self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for n in range(1, self.nodes + 1):
            cleanup(Paths(cgroup_root=self.cgroup(n), bpf_root=self.bpf_root(n)))
            self._empty_cgroup(self.cgroup(n))
        for name in list(self.pods.values()) + [self.node_ns(n) for n in range(1, self.nodes + 1)] + [self.bridge_ns]:
            try:
                netns.remove(name)
            except OSError:
                pass
        for n in range(1, self.nodes + 1):
            try:
                os.rmdir(self.cgroup(n))
            except OSError:
                pass

    @staticmethod
    def _empty_cgroup(cg: str) -> None:
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                for pid in f.read().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        except OSError:
            pass
        time.sleep(0.05)

    # ---- processes ----
    def agent(self, n: int, manifests: str, mode: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        argv = [sys.executable, "-m", "lb.cli", "agent", "--manifests", manifests, "--node-name", self.node_name(n),
                "--cgroup-root", self.cgroup(n), "--bpf-root", self.bpf_root(n), "--network-mode", mode,
                "--healthz-bind-address", "", "--metrics-bind-address", "", *extra]
        p = subprocess.Popen(argv, preexec_fn=lambda: enter(self.node_ns(n), None), stderr=subprocess.PIPE,
                             text=True, cwd=ROOT)
        self.agents[n] = p
        lines = self.logs.setdefault(n, [])
        threading.Thread(target=lambda: [lines.append(l.rstrip()) for l in p.stderr], daemon=True).start()
        return p

    def in_pod(self, n: int, m, argv: list[str], **kw) -> subprocess.Popen:
        """A process in pod m of node n, in node n's cgroup (so its sockets are load-balanced)."""
        p = subprocess.Popen(argv, preexec_fn=lambda: enter(self.pods[(n, m)], self.cgroup(n)), **kw)
        self.procs.append(p)
        return p

    def run_client(self, n: int, m, *args: str, timeout: float = 60) -> dict:
        p = self.in_pod(n, m, [sys.executable, "-m", "lb.testing.client", *args], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, cwd=ROOT)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"client failed: {err}")
        return json.loads(out)

    def add_netns(self, n: int, m) -> str:
        """An empty pod namespace for node n (a CNI plugin will fill it); removed with the cluster."""
        pod = f"{self.node_ns(n)}p{m}"
        netns.create(pod)
        self.pods[(n, m)] = pod
        return pod

    def in_node_run(self, n: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, preexec_fn=lambda: enter(self.node_ns(n), None), capture_output=True, text=True, **kw)

    def server(self, n: int, m, port: int, ip: str | None = None) -> subprocess.Popen:
        p = self.in_pod(n, m, [sys.executable, "-m", "lb.testing.server", "--port", str(port), ip or pod_ip(n, m)],
                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("server did not start")
        return p

    def in_node(self, n: int, argv: list[str]) -> str:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.node_ns(n)}", *argv], capture_output=True,
                              text=True).stdout
