"""The north-south test bed: simulated nodes (lb/testing/cluster.py: a netns each, on a bridge in its own
netns), an outside client on the same bridge, pods made by the bundled CNI plugin through cnitool, a real
kube-apiserver as the source (lb/testing/apiserver.py), and on every node one service proxy:

    "bpflb"                 `bpflb agent --kubeconfig ... --network-mode direct --devices eth0 --cni-socket ...`
    "kube-proxy-nftables"   the real kube-proxy (v1.34.4, scripts/build-components.sh), the reference
    "kube-proxy-iptables"   the same in iptables mode (the benchmark's third column)

each started inside the node's netns with `nsenter --net=...`, reaching the API server through a loopback
relay in that netns (lb/testing/kube_proxy_bed.py's LoopbackRelay).

    with NorthSouthBed("kube-proxy-nftables", tmp) as bed:
        a = bed.pod(1, "a")                                    # cnitool add, then a peer_server in it
        bed.apply(service("web", node_port=30080), endpoint_slice("web", [a]))
        bed.outside_tcp(node_ip(1), 30080)                     # -> Reply(server=..., client=...)

Address plan (one place):
  node N           eth0 192.168.50.N/24 and fd00:50::N/64 (cluster.py), both InternalIPs of its Node;
                   pod CIDRs (spec.podCIDRs, dual stack) 10.244.N.0/24 and fd00:244:N::/64
  outside client   eth0 192.168.50.100/24 and fd00:50::100/64 on the same bridge; routes: LB and External
                   IPs 172.30.0.0/16 via node 1, each pod CIDR via its node (the benchmark's direct
                   column), fd00:244:N::/64 via node N; nothing else: no default route, no way out
  pods             dual stack, from the bundled CNI plugin's IPAM (both of the node's pod CIDRs), behind
                   host veths "lxc...": Pod.ip the IPv4 address, Pod.ip6 the IPv6 one (default route via
                   fe80::1 on the host veth); with bpflb both are registered in lb_endpoints by the agent
  LB ingress IPs   172.30.0.0/24, External IPs 172.30.1.0/24 (routed to node 1 by the outside client)
  Services         ClusterIPs from 10.96.0.0/16 and fd00:96::/108 (the API server's ranges)

Pod routes between nodes: with bpflb, the agent's --network-mode direct installs them (both families);
with kube-proxy (which routes nothing) the bed installs the same routes ("10.244.M.0/24 via 192.168.50.M",
"fd00:244:M::/64 via fd00:50::M"), as a routing daemon or a CNI would. Pods' CNI server: with bpflb the agent's (--cni-socket); with kube-proxy the same
server run alone (`python -m lb.cni.server`), so both modes make pods the same way.

Everything made here (namespaces, veths, cgroups, pins, processes, CNI attachments) is removed on exit,
also after a failure. Clients dialling node, LB and External IPs run in the outside netns only.
"""
from __future__ import annotations

import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pyroute2 import IPRoute, netns

from .. import netns as netns_
from ..cni.install import build_launcher, install
from .apiserver import ROOT, ControlPlane, _die_with_parent, _tail, components
from .bed import enter
from .cluster import Cluster, node_ip, node_ip6
from .kube_proxy_bed import IPTABLES_TOOLS, LoopbackRelay, kube_proxy_binary

MODES = ("kube-proxy-nftables", "bpflb")
BENCH_MODES = ("kube-proxy-nftables", "kube-proxy-iptables", "bpflb")
OUTSIDE_V4, OUTSIDE_V6 = "192.168.50.100", "fd00:50::100"
BED_ROUTES_V4 = ("10.0.0.0/8", "172.30.0.0/16", "192.168.0.0/16")
SERVICE_RANGE = "10.96.0.0/16,fd00:96::/108"
CLUSTER_CIDR = "10.244.0.0/16,fd00:244::/48"
POD_PORT = 8080
HEALTHZ_PORT = 10256


def lb_ip(i: int) -> str:
    return f"172.30.0.{i}"


def external_ip(i: int) -> str:
    return f"172.30.1.{i}"


def pod_cidr(n: int) -> str:
    return f"10.244.{n}.0/24"


def pod_cidr6(n: int) -> str:
    return f"fd00:244:{n:x}::/64"


# ---- API objects ------------------------------------------------------------------------------------
def service(name: str, type: str = "NodePort", port: int = 80, node_port: int | None = None, proto: str = "TCP",
            family: str = "IPv4", mutate: Callable[[dict], None] | None = None) -> dict:
    """A selector-less Service (the bed writes its EndpointSlices: there is no controller-manager)."""
    p = {"name": "p", "port": port, "protocol": proto, "targetPort": POD_PORT}
    if node_port is not None:
        p["nodePort"] = node_port
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"type": type, "ports": [p], "ipFamilies": [family], "ipFamilyPolicy": "SingleStack"}}
    if mutate:
        mutate(svc)
    return svc


def endpoint_slice(svc: str, pods: list["Pod"], proto: str = "TCP", family: str = "IPv4",
                   name: str | None = None) -> dict:
    """The Service's EndpointSlice: every pod ready, with its nodeName (what eTP Local selects on), by
    its address of the slice's family."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family, "ports": [{"name": "p", "port": POD_PORT, "protocol": proto}],
            "endpoints": [{"addresses": [p.ip6 if family == "IPv6" else p.ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": p.node_name} for p in pods]}


def node_object(n: int, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": pod_cidr(n), "podCIDRs": [pod_cidr(n), pod_cidr6(n)]}}


# ---- what a client sees -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """One answered dial: the backend's address (as the server saw its own socket) and the client address
    the backend saw; or an error by errno name ("ECONNREFUSED", "ETIMEDOUT", ...) and how long it took."""
    server: str = ""
    client: str = ""
    error: str = ""
    seconds: float = 0.0
    ttl: int = -1  # UDP: the TTL (hop limit) the datagram reached the backend with

    @property
    def server_ip(self) -> str:
        return self.server.rpartition(":")[0]

    @property
    def client_ip(self) -> str:
        return self.client.rpartition(":")[0]


def _errname(e: OSError) -> str:
    if isinstance(e, socket.timeout):
        return "ETIMEDOUT"
    return errno.errorcode.get(e.errno or 0, str(e))


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class Stream:
    """A TCP flow that stays open: a line every `interval` seconds, each echoed by the backend.
    `answered` counts echoes, `error` is the first error (errno name; "EOF" for an orderly close)."""

    def __init__(self, sock: socket.socket, addr: tuple, interval: float = 0.05, timeout: float = 1.0):
        self.sock, self.addr, self.interval = sock, addr, interval
        self.sock.settimeout(timeout)
        self.hello = ""
        self.answered = 0
        self.last_answer = 0.0
        self.error = ""
        self._stop = threading.Event()
        self.sock.connect(addr)
        self._file = self.sock.makefile("rb")
        self.hello = self._file.readline().decode().strip()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"stream:{addr}")
        self._thread.start()

    @property
    def server(self) -> str:
        return self.hello.split()[0] if self.hello else ""

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                self.sock.sendall(f"{i}\n".encode())
                line = self._file.readline()
                if not line:
                    self.error = "EOF"
                    return
                if line.strip() == str(i).encode():
                    self.answered += 1
                    self.last_answer = time.monotonic()
            except OSError as e:
                self.error = _errname(e)
                return
            self._stop.wait(self.interval)

    def answers_after(self, count: int, timeout: float = 5.0) -> bool:
        """Whether the flow answers at least `count` more times (False once it failed or went silent)."""
        want = self.answered + count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.error and self.answered < want:
            time.sleep(0.02)
        return self.answered >= want

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(3)
        self._file.close()
        self.sock.close()


@dataclass
class Pod:
    name: str
    node: int
    node_name: str
    netns: str          # /run/netns name
    ip: str             # the CNI result's IPv4 address
    ip6: str = ""       # and its IPv6 one
    proc: subprocess.Popen | None = None


# ---- the bed ----------------------------------------------------------------------------------------
@dataclass
class NorthSouthBed:
    mode: str
    workdir: Path
    nodes: int = 2
    kube_proxy_args: tuple[str, ...] = ()
    cluster: Cluster = field(init=False)
    cp: ControlPlane | None = field(init=False, default=None)
    pods: list[Pod] = field(default_factory=list)
    proxies: dict[int, subprocess.Popen] = field(default_factory=dict)
    cni_servers: dict[int, subprocess.Popen] = field(default_factory=dict)
    relays: dict[int, LoopbackRelay] = field(default_factory=dict)
    created: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.mode not in BENCH_MODES:
            raise ValueError(f"mode {self.mode!r}: one of {BENCH_MODES}")
        self.cluster = Cluster(nodes=self.nodes, host_devices=False, ipv6=True)
        self.tag = self.cluster.tag
        self.outside_ns = f"bl{self.tag}out"
        self.bindir = self.workdir / "bin"       # iptables symlinks for kube-proxy (kube_proxy_bed.Netns.env)
        self._outside_made = False

    @property
    def bpflb(self) -> bool:
        return self.mode == "bpflb"

    def node_name(self, n: int) -> str:
        return self.cluster.node_name(n)

    def node_dir(self, n: int) -> Path:
        return self.workdir / f"node{n}"

    def log_path(self, n: int) -> Path:
        return self.node_dir(n) / f"{self.mode}.log"

    # ---- lifecycle ----
    def __enter__(self) -> "NorthSouthBed":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.cp = ControlPlane(apiserver_args=(f"--service-cluster-ip-range={SERVICE_RANGE}",))
        self.cp.start()
        self.cluster.up()
        self._outside()
        for n in range(1, self.nodes + 1):
            self.node_dir(n).mkdir(parents=True, exist_ok=True)
            self.relays[n] = LoopbackRelay(_NsRef(self.cluster.node_ns(n)), self.cp.port).__enter__()
            self._kubeconfig(n)
            if not self.bpflb:
                self._pod_routes(n)
        self._nodes()
        for n in range(1, self.nodes + 1):
            self.start_proxy(n)
        for n in range(1, self.nodes + 1):
            self.wait_proxy_ready(n)
            if not self.bpflb:
                self._start_cni_server(n)

    def down(self) -> None:
        errors = []
        for pod in list(self.pods):
            try:
                self._remove_pod(pod)
            except Exception as e:  # keep tearing down; report at the end
                errors.append(f"pod {pod.name}: {e}")
        for p in list(self.proxies.values()) + list(self.cni_servers.values()):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"process {p.pid} did not die")
        for r in self.relays.values():
            r.__exit__(None, None, None)
        self.relays.clear()
        self.cluster.down()                    # agents' pins and cgroups, node and pod namespaces
        if self._outside_made:
            try:
                netns.remove(self.outside_ns)
            except OSError:
                pass
        if self.cp is not None:
            self.cp.close()
        if errors:
            print("north-south bed teardown: " + "; ".join(errors), file=sys.stderr)

    # ---- network ----
    def _outside(self) -> None:
        netns.create(self.outside_ns)
        self._outside_made = True
        with IPRoute(netns=self.cluster.bridge_ns) as ipr:
            ipr.link("add", ifname="out", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.outside_ns})
            idx = ipr.link_lookup(ifname="out")[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
        with IPRoute(netns=self.outside_ns) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.addr("add", index=eth, address=OUTSIDE_V4, prefixlen=24)
            ipr.addr("add", index=eth, address=OUTSIDE_V6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
            ipr.link("set", index=eth, state="up")
            # Only the bed's addresses: LB and External IPs via node 1, each node's pods via that node.
            ipr.route("add", dst="172.30.0.0/16", gateway=node_ip(1))
            for n in range(1, self.nodes + 1):
                ipr.route("add", dst=pod_cidr(n), gateway=node_ip(n))
                ipr.route("add", dst=pod_cidr6(n), gateway=node_ip6(n), family=socket.AF_INET6)

    def _pod_routes(self, n: int) -> None:
        """What --network-mode direct installs, for the kube-proxy modes (kube-proxy routes nothing)."""
        with IPRoute(netns=self.cluster.node_ns(n)) as ipr:
            for m in range(1, self.nodes + 1):
                if m != n:
                    ipr.route("add", dst=pod_cidr(m), gateway=node_ip(m))
                    ipr.route("add", dst=pod_cidr6(m), gateway=node_ip6(m), family=socket.AF_INET6)

    # ---- API objects ----
    def _kubeconfig(self, n: int) -> Path:
        path = self.node_dir(n) / "kubeconfig"
        path.write_text(self.cp.kubeconfig.read_text().replace(self.cp.url, f"https://127.0.0.1:{self.relays[n].port}"))
        return path

    def _nodes(self) -> None:
        self.apply(*[node_object(n, self.node_name(n)) for n in range(1, self.nodes + 1)])
        for n in range(1, self.nodes + 1):
            addrs = [{"type": "InternalIP", "address": node_ip(n)}, {"type": "InternalIP", "address": node_ip6(n)},
                     {"type": "Hostname", "address": self.node_name(n)}]
            self.cp.kubectl("patch", "node", self.node_name(n), "--subresource=status", "--type=merge", "-p",
                            json.dumps({"status": {"addresses": addrs}}))

    def apply(self, *objs: dict) -> None:
        for o in objs:
            if o["kind"] in ("Service", "EndpointSlice"):
                self.created.add((o["kind"].lower(), o["metadata"]["name"]))
        self.cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))

    def clean(self) -> None:
        """Delete every Service and EndpointSlice apply() made (between tests sharing one bed)."""
        for kind in ("service", "endpointslice"):
            names = sorted(n for k, n in self.created if k == kind)
            if names:
                self.delete(kind, *names)
        self.created.clear()

    def delete(self, kind: str, *names: str) -> None:
        self.cp.kubectl("delete", kind, "-n", "default", "--ignore-not-found", "--wait=false", *names)

    def get(self, kind: str, name: str) -> dict:
        return json.loads(self.cp.kubectl("get", kind, "-n", "default", name, "-o", "json"))

    def set_lb_ingress(self, svc: str, *ips: str) -> None:
        """status.loadBalancer.ingress, through the status subresource, as a cloud controller writes it."""
        self.cp.kubectl("patch", "service", "-n", "default", svc, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}}))

    # ---- the service proxies ----
    def start_proxy(self, n: int) -> subprocess.Popen:
        ns = self.cluster.node_ns(n)
        log = open(self.log_path(n), "a")
        if self.bpflb:
            d = self.node_dir(n)
            argv = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "lb.cli", "agent",
                    "--kubeconfig", str(d / "kubeconfig"), "--node-name", self.node_name(n),
                    "--cgroup-root", self.cluster.cgroup(n), "--bpf-root", self.cluster.bpf_root(n),
                    "--network-mode", "direct", "--devices", "eth0",
                    "--cni-socket", str(d / "cni.sock"), "--cni-bin-dir", str(d / "cni-bin"),
                    "--cni-conf-dir", str(d / "net.d"), "--healthz-bind-address", f"0.0.0.0:{HEALTHZ_PORT}",
                    "--state-dir", str(d / "state")]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "BPFLB_CNI_LAUNCHER": build_launcher(str(self.workdir / "launcher"))}
        else:
            kind = self.mode.rpartition("-")[2]
            argv = ["nsenter", f"--net=/run/netns/{ns}", kube_proxy_binary(),
                    f"--kubeconfig={self.node_dir(n) / 'kubeconfig'}", f"--hostname-override={self.node_name(n)}",
                    f"--proxy-mode={kind}", f"--healthz-bind-address=0.0.0.0:{HEALTHZ_PORT}",
                    "--metrics-bind-address=127.0.0.1:10249", f"--cluster-cidr={CLUSTER_CIDR}",
                    # nf_conntrack_max is the root namespace's alone: leave every conntrack sysctl as it is
                    "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0", "--v=2", *self.kube_proxy_args]
            env = self._iptables_env()
        with log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=ROOT, preexec_fn=_die_with_parent)
        self.proxies[n] = p
        return p

    def _iptables_env(self) -> dict[str, str]:
        """PATH where `iptables` and friends are iptables-nft, Debian's default (kube_proxy_bed.Netns.env)."""
        self.bindir.mkdir(exist_ok=True)
        for tool in IPTABLES_TOOLS:
            link = self.bindir / tool
            family, _, rest = tool.partition("-")
            if not link.is_symlink():
                link.symlink_to(f"/usr/sbin/{family}-nft" + (f"-{rest}" if rest else ""))
        return {**os.environ, "PATH": f"{self.bindir}:/usr/sbin:/usr/bin:/sbin:/bin"}

    def wait_proxy_ready(self, n: int, timeout: float = 90) -> None:
        """Until the proxy's /healthz on the node answers 200 (kube-proxy: its first sync is done; bpflb:
        the same endpoint, kube-proxy's port) and, with bpflb, its CNI conflist is installed."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.proxies[n]
            if p.poll() is not None:
                raise RuntimeError(f"{self.mode} on node {n} exited {p.returncode}:\n{_tail(self.log_path(n))}")
            ok = self.http_get(node_ip(n), HEALTHZ_PORT, "/healthz", timeout=1)[0] == 200
            if ok and self.bpflb:
                ok = (self.node_dir(n) / "net.d" / "05-bpflb.conflist").exists()
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.mode} on node {n} not ready in {timeout} s:\n{_tail(self.log_path(n))}")
            time.sleep(0.2)

    def kill_proxy(self, n: int, sig: int = signal.SIGKILL) -> None:
        p = self.proxies[n]
        p.send_signal(sig)
        p.wait(10)

    def restart_proxy(self, n: int) -> None:
        self.start_proxy(n)
        self.wait_proxy_ready(n)

    def _start_cni_server(self, n: int) -> None:
        """The bundled plugin's server alone (no agent): launcher and conflist where the agent would put them."""
        d = self.node_dir(n)
        sock = str(d / "cni.sock")
        install(str(d / "cni-bin"), str(d / "net.d"), launcher=build_launcher(str(self.workdir / "launcher")),
                pod_cidrs=[pod_cidr(n), pod_cidr6(n)], socket=sock, data_dir=str(d / "cni-data"))
        log = open(d / "cni-server.log", "a")
        with log:
            p = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.cluster.node_ns(n)}", sys.executable, "-m",
                                  "lb.cni.server", sock, "--node-mntns", f"/proc/{os.getpid()}/ns/mnt"],
                                 stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=_die_with_parent)
        self.cni_servers[n] = p
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"CNI server on node {n} did not start:\n{_tail(d / 'cni-server.log')}")

    # ---- pods ----
    def _cnitool(self, n: int, *args: str) -> subprocess.CompletedProcess:
        d = self.node_dir(n)
        env = {**os.environ, "NETCONFPATH": str(d / "net.d"), "CNI_PATH": str(d / "cni-bin")}
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.cluster.node_ns(n)}", components()["CNITOOL"], *args],
                              capture_output=True, text=True, env=env)

    def pod(self, n: int, name: str, serve: bool = True) -> Pod:
        """A dual-stack pod on node n made as a runtime makes one: `cnitool add bpflb <netns>` through the
        installed launcher; then a peer_server on both its IPs (TCP and UDP, POD_PORT) in node n's cgroup."""
        ns = f"bl{self.tag}n{n}{name}"
        netns.create(ns)
        self.cluster.pods[(n, name)] = ns          # the cluster removes the netns
        pod = Pod(name, n, self.node_name(n), ns, "")
        self.pods.append(pod)
        r = self._cnitool(n, "add", "bpflb", f"/run/netns/{ns}")
        if r.returncode != 0:
            raise RuntimeError(f"cnitool add on node {n}: {r.stdout} {r.stderr}")
        for entry in json.loads(r.stdout)["ips"]:
            ip = entry["address"].split("/")[0]
            if ":" in ip:
                pod.ip6 = ip
            else:
                pod.ip = ip
        if not (pod.ip and pod.ip6):
            raise RuntimeError(f"cnitool add on node {n} did not give a dual-stack pod: {r.stdout}")
        if serve:
            self.serve(pod)
        return pod

    def serve(self, pod: Pod) -> None:
        if pod.proc is not None and pod.proc.poll() is None:
            return
        p = subprocess.Popen([sys.executable, "-m", "lb.testing.peer_server", "--port", str(POD_PORT), "--udp", pod.ip,
                              pod.ip6],
                             preexec_fn=lambda: enter(pod.netns, self.cluster.cgroup(pod.node)),
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
        pod.proc = p
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"peer_server in {pod.name} did not start")

    def remove_pod(self, pod: Pod) -> None:
        """The pod goes: its server is killed, then `cnitool del` (veth, route and registration go)."""
        self._remove_pod(pod)
        try:
            netns.remove(pod.netns)
        except OSError:
            pass

    def _remove_pod(self, pod: Pod) -> None:
        if pod.proc is not None and pod.proc.poll() is None:
            pod.proc.kill()
            pod.proc.wait(5)
        if pod in self.pods:
            self.pods.remove(pod)
        r = self._cnitool(pod.node, "del", "bpflb", f"/run/netns/{pod.netns}")
        if r.returncode != 0:
            raise RuntimeError(f"cnitool del: {r.stdout} {r.stderr}")

    # ---- clients ----
    def outside_socket(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of the outside client's netns (its routes: the bed's addresses only)."""
        return netns_.run_in(f"/run/netns/{self.outside_ns}", lambda: socket.socket(family, kind))

    def outside_tcp(self, ip: str, port: int, timeout: float = 2.0) -> Reply:
        """One connection from outside: connect, read the backend's line, close."""
        s = self.outside_socket(_family(ip))
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            s.connect((ip, port))
            line = s.makefile("rb").readline().decode().split()
            if len(line) != 2:
                return Reply(error="EOF", seconds=time.monotonic() - t0)
            return Reply(server=line[0], client=line[1], seconds=time.monotonic() - t0)
        except OSError as e:
            return Reply(error=_errname(e), seconds=time.monotonic() - t0)
        finally:
            s.close()

    def outside_udp(self, ip: str, port: int, timeout: float = 2.0, connected: bool = False,
                    size: int = 3) -> tuple[Reply, str]:
        """One datagram of size bytes from outside (more than the MTU: it leaves in IPv4 fragments): the
        reply and the address it came from. Unconnected, or connected (then an ICMP error quoting the
        datagram fails the socket: ECONNREFUSED for port unreachable)."""
        s = self.outside_socket(_family(ip), socket.SOCK_DGRAM)
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            msg = b"hi\n".ljust(size, b"x")
            if connected:
                s.connect((ip, port))
                s.send(msg)
            else:
                s.sendto(msg, (ip, port))
            data, src = s.recvfrom(2048)
            line = data.decode().split()
            ttl = next((int(w[4:]) for w in line[2:] if w.startswith("ttl=")), -1)
            return Reply(server=line[0], client=line[1], seconds=time.monotonic() - t0, ttl=ttl), f"{src[0]}:{src[1]}"
        except OSError as e:
            return Reply(error=_errname(e), seconds=time.monotonic() - t0), ""
        finally:
            s.close()

    def outside_stream(self, ip: str, port: int) -> Stream:
        return Stream(self.outside_socket(_family(ip)), (ip, port))

    def http_get(self, ip: str, port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, dict, bytes]:
        """GET from outside: (status, headers, body); status 0 when nothing answered."""
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            s = self.outside_socket(_family(ip))
            s.settimeout(timeout)
            s.connect((ip, port))
            conn.sock = s
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        except OSError:
            return 0, {}, b""
        finally:
            conn.close()

    def run_in_node(self, n: int, pod: Pod | None, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A process on node n (in its netns) or in a pod of it, in node n's cgroup: a local caller."""
        ns = pod.netns if pod else self.cluster.node_ns(n)
        return subprocess.run(argv, preexec_fn=lambda: enter(ns, self.cluster.cgroup(n)), capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def local_tcp(self, n: int, pod: Pod | None, ip: str, port: int, count: int = 1) -> dict:
        """lb/testing/client.py from node n itself (pod None) or from a pod of node n."""
        r = self.run_in_node(n, pod, [sys.executable, "-m", "lb.testing.client", f"{ip}:{port}" if ":" not in ip
                                      else f"[{ip}]:{port}", "--count", str(count)])
        if r.returncode != 0:
            raise RuntimeError(f"client on node {n}: {r.stderr}")
        return json.loads(r.stdout)

    def node_addresses(self, n: int) -> set[str]:
        out = subprocess.run(["nsenter", f"--net=/run/netns/{self.cluster.node_ns(n)}", "ip", "-o", "addr"],
                             capture_output=True, text=True).stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()}

    def wait(self, predicate: Callable[[], object], timeout: float = 30, what: str = "condition"):
        """Poll until predicate() is truthy (waiting for the proxies to program a change)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- node {n} ---\n{_tail(self.log_path(n), 1500)}" for n in range(1, self.nodes + 1))
                raise AssertionError(f"timed out waiting for {what} ({self.mode})\n{logs}")
            time.sleep(0.1)


class _NsRef:
    """What LoopbackRelay needs of a namespace: its name and path."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"


def outside_only_routes_ok(bed: NorthSouthBed) -> bool:
    """The outside client's routes are all inside the bed's ranges (a safety check the tests assert)."""
    import ipaddress
    allowed = [ipaddress.ip_network(c) for c in (*BED_ROUTES_V4, "fd00::/8", "fe80::/64")]
    out = subprocess.run(["ip", "netns", "exec", bed.outside_ns, "ip", "-j", "route", "show", "table", "all"],
                         capture_output=True, text=True).stdout
    out6 = subprocess.run(["ip", "netns", "exec", bed.outside_ns, "ip", "-6", "-j", "route", "show", "table", "all"],
                          capture_output=True, text=True).stdout
    for r in json.loads(out or "[]") + json.loads(out6 or "[]"):
        dst = r.get("dst", "")
        if dst in ("default", "0.0.0.0/0", "::/0"):
            return False
        if r.get("type") in ("local", "broadcast", "multicast", "anycast") or dst.startswith("ff00::") \
                or dst.startswith("127.") or dst == "::1":
            continue
        net = ipaddress.ip_network(dst if "/" in dst else (dst + ("/128" if ":" in dst else "/32")), strict=False)
        if not any(net.version == a.version and net.subnet_of(a) for a in allowed):
            return False
    return True
