"""The tc datapath (bpf/tc_lb.c) on the real kernel: NodePort, LoadBalancer IP and ExternalIP from a
client outside the node.

Topology (namespaces made here, all removed at the end; names carry a random tag):

    client ns --+                          node1 ns: eth0 (tc ingress: bpflb_tc_ext)
                |-- bridge ns (br0) --+--  node1 ns --vpod (tc ingress: bpflb_tc_pod)-- pod1 ns
    node2 ns ---+                                                       (lb_endpoints: vpod ifindex, MAC)
    node2 ns --vpod-- pod2 ns     (node1 routes 10.244.2.0/24 via node2: a remote backend, direct routing)

The client has routes to the LAN and to the LB/External IPs via node1 only: no default route, so a
packet the datapath fails to translate never leaves these namespaces. Checksum offload is off on the
client's and the pods' interfaces, so every receiver verifies the L3/L4 checksums the programs wrote.
(One test turns it back on at the client: the north-south bed's clients keep the veth default.)
Frontends are written here with scope EXTERNAL and the flags translate would set (the translate
helper's rules are tested with translate). Each backend answers a line with "<pod> <source it saw>".
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from pyroute2 import IPRoute, netns

from conftest import ROOT, wait_for
from lb import datapath
from lb import netns as netns_
from lb.maps import bpfsys
from lb.maps.conntrack import ct_rows, nat_rows
from lb.maps.endpoints import PinnedEndpointMap
from lb.maps.nodeaddrs import PinnedNodeAddrs
from lb.maps.services import Master, PinnedServiceMaps
from lb.maps.srcranges import PinnedSourceRanges
from lb.maps.addr import pack_ip
from lb.maps.structs import (CT_F_CLOSING, CT_F_ENDED, CT_F_NODEPORT, CT_F_REPLIED, CT_F_RST, CT_F_SNAT, CT_MAP, DEV_ADDRS_MAP, DEV_F_PEER,
                             EXT_AFFINITY_MAP, NAT_MAP, SCOPE_EXTERNAL, DevAddr,
                             SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_NODEPORT, SVC_F_SNAT, SVC_F_SRC_RANGES, CtTuple, CtVal, NatVal, packer)
from lb.model import TCP, UDP, Backend, Frontend
from lb.settings import MapSizes, Paths

# ---- the address plan of this test bed ------------------------------------------------------------
CLIENT4, NODE1_4, NODE2_4 = "192.168.77.100", "192.168.77.1", "192.168.77.2"
CLIENT6, NODE1_6, NODE2_6 = "fd00:77::100", "fd00:77::1", "fd00:77::2"
POD1_4, POD2_4 = "10.244.1.10", "10.244.2.10"
POD1_6, POD2_6 = "fd00:244:1::10", "fd00:244:2::10"
LB4, EXT4, LB6 = "203.0.113.10", "203.0.113.20", "fd00:113::10"
GW4, GW6 = "169.254.1.1", "fe80::1"  # the host veth's address, the pods' default gateway
NODEPORT, PORT = 30080, 8080
BULK_PORT = PORT + 1  # the servers' bulk sink (count in, as many bytes back)
SIZES = MapSizes(services=256, backends=256, revnat=256, sock_revnat=256, affinity=256, endpoints=64,
                 node_addrs=16, src_ranges=64, ext_affinity=256, ct=16384, nat=16384)
# lb_ct/lb_nat larger than the 4536 masquerade ports (61000-65535), as the agent's: a port then frees only
# when the datapath lets it go, not when the LRU evicts an old entry.

SERVER = r"""
import selectors, socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])


def sink(conn):
    # Bulk: count what the client sends until it shuts down writing, answer "<name> <count>" and send as
    # many bytes back, then close.
    with conn:
        n = 0
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            n += len(data)
        conn.sendall(f"{name} {n}\n".encode())
        chunk = b"y" * (1 << 16)
        left = n
        while left:
            left -= conn.send(chunk[:left])


def sinks(listener):
    while True:
        c, _ = listener.accept()
        threading.Thread(target=sink, args=(c,), daemon=True).start()


for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port + 1))
    s.listen(16)
    threading.Thread(target=sinks, args=(s,), daemon=True).start()
sel = selectors.DefaultSelector()
for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(128)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "listen" if kind == socket.SOCK_STREAM else "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "listen":
            c, _ = s.accept()
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, "conn")
        elif key.data == "udp":
            data, peer = s.recvfrom(65536)
            # "<name> <source it saw> <bytes it got>", padded to as many bytes as it got
            line = f"{name} {peer[0]} {len(data)}\n".encode()
            s.sendto(line + b"y" * max(0, len(data) - len(line)), peer)
        else:
            try:
                data = s.recv(2048)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            s.sendall(f"{name} {s.getpeername()[0]}\n".encode() * data.count(b"\n"))
"""


def sysctl(ns_path: str, values: dict[str, str]) -> None:
    def write():
        for k, v in values.items():
            with open("/proc/sys/" + k.replace(".", "/"), "w") as f:
                f.write(v)
    netns_.run_in(ns_path, write)


TX_CSUM = ("tx-checksum-ip-generic", "tx-checksum-ipv4", "tx-checksum-ipv6")  # (veth: ip-generic only)
TSO = ("tx-tcp-segmentation", "tx-tcp6-segmentation")


def set_features(ns_path: str, ifname: str, names: tuple[str, ...], on: bool) -> dict[str, bool]:
    """Switch the named offloads of a device that has them; the features in force afterwards."""
    def set_():
        from pyroute2.ethtool import Ethtool

        e = Ethtool()
        try:
            feats = e.get_features(ifname)
            for name in names:
                if name in feats.features and feats.features[name].available:
                    feats.features[name].enable = on
            e.set_features(ifname, feats)
            return {n: f.enable for n, f in e.get_features(ifname).features.items()}
        finally:
            e.close()
    return netns_.run_in(ns_path, set_)


def tx_csum(ns_path: str, ifname: str, on: bool) -> None:
    """Checksum offload on or off. Off: packets carry full checksums and the receiver verifies them. On (a
    veth's default): a local sender's TCP/UDP packets leave with the L4 checksum not yet computed
    (CHECKSUM_PARTIAL), and a receiver trusts them unverified."""
    set_features(ns_path, ifname, TX_CSUM, on)


def no_tx_csum(ns_path: str, ifname: str) -> None:
    tx_csum(ns_path, ifname, False)


class TcBed:
    def __init__(self):
        tag = uuid.uuid4().hex[:5]
        self.ns = {k: f"tc{tag}{k}" for k in ("c", "br", "n1", "n2", "p1", "p2")}
        self.bpf_root = f"/sys/fs/bpf/bpflb-tctest-{tag}"
        self.paths = Paths(cgroup_root="/nonexistent", bpf_root=self.bpf_root)
        self.procs: list[subprocess.Popen] = []

    def path(self, k: str) -> str:
        return f"/run/netns/{self.ns[k]}"

    def up(self) -> None:
        for name in self.ns.values():
            netns.create(name)
        for k in ("c", "n1", "n2", "p1", "p2"):
            sysctl(self.path(k), {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                                  "net.ipv6.conf.default.accept_ra": "0"})
        for k in ("n1", "n2"):
            sysctl(self.path(k), {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        for k in ("c", "p1", "p2"):  # ICMP errors are tested: no per-destination rate limit in the way
            sysctl(self.path(k), {"net.ipv4.icmp_ratelimit": "0", "net.ipv6.icmp.ratelimit": "0"})
        with IPRoute(netns=self.ns["br"]) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            for k in ("c", "n1", "n2"):
                ipr.link("add", ifname=f"to{k}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.ns[k]})
                port = ipr.link_lookup(ifname=f"to{k}")[0]
                ipr.link("set", index=port, master=br, state="up")
            ipr.link("set", index=br, state="up")
        for k, v4, v6 in (("c", CLIENT4, CLIENT6), ("n1", NODE1_4, NODE1_6), ("n2", NODE2_4, NODE2_6)):
            with IPRoute(netns=self.ns[k]) as ipr:
                eth = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.addr("add", index=eth, address=v4, prefixlen=24)
                ipr.addr("add", index=eth, address=v6, prefixlen=64, flags=0x02)
                ipr.link("set", index=eth, state="up")
        for node, pod, v4, v6, other_net4, other_net6, other4, other6 in (
                ("n1", "p1", POD1_4, POD1_6, "10.244.2.0/24", "fd00:244:2::/64", NODE2_4, NODE2_6),
                ("n2", "p2", POD2_4, POD2_6, "10.244.1.0/24", "fd00:244:1::/64", NODE1_4, NODE1_6)):
            with IPRoute(netns=self.ns[node]) as ipr:
                ipr.link("add", ifname="vpod", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.ns[pod]})
                vpod = ipr.link_lookup(ifname="vpod")[0]
                ipr.addr("add", index=vpod, address=GW4, prefixlen=32)
                ipr.addr("add", index=vpod, address=GW6, prefixlen=64, flags=0x02)
                ipr.link("set", index=vpod, state="up")
                ipr.route("add", dst=f"{v4}/32", oif=vpod, scope=253)
                ipr.route("add", dst=f"{v6}/128", oif=vpod)
                ipr.route("add", dst=other_net4, gateway=other4)
                ipr.route("add", dst=other_net6, gateway=other6)
            with IPRoute(netns=self.ns[pod]) as ipr:
                eth = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.addr("add", index=eth, address=v4, prefixlen=32)
                ipr.addr("add", index=eth, address=v6, prefixlen=128, flags=0x02)
                ipr.link("set", index=eth, state="up")
                ipr.route("add", dst=f"{GW4}/32", oif=eth, scope=253)
                ipr.route("add", dst="0.0.0.0/0", gateway=GW4, oif=eth)
                ipr.route("add", dst="::/0", gateway=GW6, oif=eth)
            no_tx_csum(self.path(pod), "eth0")
        with IPRoute(netns=self.ns["c"]) as ipr:
            # LB and External IPs via node1; pod IPs via their node (the "direct" comparison). No default.
            ipr.route("add", dst="203.0.113.0/24", gateway=NODE1_4)
            ipr.route("add", dst="fd00:113::/64", gateway=NODE1_6)
            ipr.route("add", dst="10.244.1.0/24", gateway=NODE1_4)
            ipr.route("add", dst="10.244.2.0/24", gateway=NODE2_4)
        no_tx_csum(self.path("c"), "eth0")
        for pod, name in (("p1", "pod1"), ("p2", "pod2")):
            p = subprocess.Popen([sys.executable, "-c", SERVER, name, str(PORT)], stdout=subprocess.PIPE, text=True,
                                 preexec_fn=lambda k=pod: netns_.enter(self.path(k)))
            self.procs.append(p)
            assert p.stdout.readline().strip() == "ready"
        # The datapath, attached inside node1 (device names and ifindexes are that namespace's).
        netns_.run_in(self.path("n1"), lambda: datapath.attach_tc(self.paths, SIZES, ["eth0"]))
        self.vpod, self.pod_mac = netns_.run_in(self.path("n1"), lambda: self._link("vpod")), self.mac("p1")
        with PinnedEndpointMap(self.bpf_root) as m:
            m.added(POD1_4, self.vpod, self.pod_mac)
            m.added(POD1_6, self.vpod, self.pod_mac)
        assert netns_.run_in(self.path("n1"), lambda: datapath.sync_tc_endpoints(self.paths)) == []
        with PinnedNodeAddrs(self.bpf_root) as m:
            m.replace({NODE1_4, NODE1_6})

    def _link(self, name: str) -> int:
        with IPRoute() as ipr:
            return ipr.link_lookup(ifname=name)[0]

    def mac(self, k: str) -> str:
        with IPRoute(netns=self.ns[k]) as ipr:
            return ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0].get_attr("IFLA_ADDRESS")

    def down(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        datapath.cleanup(self.paths)
        for name in self.ns.values():
            try:
                netns.remove(name)
            except OSError:
                pass

    # ---- clients (sockets made in the client namespace; used from this thread) ----
    def sock(self, ip: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return netns_.run_in(self.path("c"), lambda: socket.socket(fam, kind))

    def ask(self, ip: str, port: int, timeout: float = 2.0) -> tuple[str, str]:
        """One TCP connection: (backend name, the source address it saw)."""
        s = self.sock(ip)
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
            s.sendall(b"?\n")
            name, seen = s.makefile().readline().split()
            return name, seen
        finally:
            s.close()

    def ask_udp(self, ip: str, port: int, timeout: float = 2.0, size: int = 2) -> tuple[str, str, tuple]:
        """One datagram of size bytes (the backend answers with as many): (backend name, source it saw, the
        address the reply came from)."""
        s = self.sock(ip, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.sendto(b"?\n".ljust(size, b"x"), (ip, port))
            data, src = s.recvfrom(65536)
            name, seen, got = data.split(b"\n")[0].decode().split()
            assert int(got) == size and len(data) == max(size, len(data.split(b"\n")[0]) + 1), (got, len(data))
            return name, seen, src[:2]
        finally:
            s.close()


class Stream:
    """A long-lived TCP connection from the client: each ask() is a line out and a line back."""

    def __init__(self, bed: TcBed, ip: str, port: int):
        self.s = bed.sock(ip)
        self.s.settimeout(2.0)
        self.s.connect((ip, port))
        self.f = self.s.makefile()

    def ask(self) -> tuple[str, str]:
        self.s.sendall(b"?\n")
        line = self.f.readline()
        if not line:
            raise ConnectionResetError("closed by the peer")
        name, seen = line.split()
        return name, seen

    def close(self) -> None:
        self.s.close()


@pytest.fixture(scope="module")
def tcbed():
    b = TcBed()
    try:
        b.up()
        yield b
    finally:
        b.down()


BACKEND_IDS = {POD1_4: 1, POD2_4: 2, POD1_6: 3, POD2_6: 4}


@pytest.fixture
def maps(tcbed):
    """The service maps, emptied before each test (frontends, backends, conntrack, affinity, ranges).
    The client's connections are aborted first: a socket the test closed may still be retransmitting its
    FIN (the backend's ACK can lose the race with the emptying), and the next test's frontend on the same
    address would take that segment up as a flow of its own."""
    m = PinnedServiceMaps(tcbed.bpf_root)
    try:
        yield m
    finally:
        subprocess.run(["nsenter", f"--net={tcbed.path('c')}", "ss", "-K", "-t", "-n", "state", "connected",
                        "exclude", "time-wait"], check=True, capture_output=True)
        fronts = m.dump_frontends()
        m.delete_slots([(fe, s) for fe, (master, slots) in fronts.items() for s in (0, *slots)])
        m.delete_revnat(list(m.dump_revnat()))
        m.delete_backends(list(m.dump_backends()))
        m.close()
        for name, key, val in ((CT_MAP, CtTuple, CtVal), (NAT_MAP, CtTuple, NatVal)):
            clear(tcbed.bpf_root, name, ctypes.sizeof(key), ctypes.sizeof(val))
        clear(tcbed.bpf_root, EXT_AFFINITY_MAP, 24, 16)
        with PinnedSourceRanges(tcbed.bpf_root) as r:
            r.replace({})


def clear(root: str, name: str, ks: int, vs: int) -> None:
    fd = bpfsys.obj_get(os.path.join(root, name))
    try:
        for k, _ in bpfsys.dump(fd, ks, vs):
            bpfsys.delete(fd, k)
    finally:
        os.close(fd)


def program(maps: PinnedServiceMaps, fe: Frontend, rid: int, backends: list[str], flags: int, affinity: int = 0,
            port: int = PORT) -> None:
    """Write one EXTERNAL frontend in the agent's order: backends, slots, reverse NAT, master, trim."""
    items = [(BACKEND_IDS[ip], Backend(ip, port, fe.protocol)) for ip in backends]
    maps.write_backends(items)
    maps.write_slots([(fe, n + 1, bid, rid) for n, (bid, _) in enumerate(items)])
    maps.write_revnat([(rid, fe)])
    maps.write_masters([(fe, Master(rid, len(items), flags, affinity))])
    old = maps.dump_frontends().get(fe, (None, {}))[1]
    maps.delete_slots([(fe, s) for s in old if s > len(items)])


def nodeport(proto: str = TCP, v6: bool = False) -> Frontend:
    return Frontend("::" if v6 else "0.0.0.0", NODEPORT, proto, SCOPE_EXTERNAL)


def names(bed: TcBed, ip: str, port: int, n: int = 24) -> dict[str, set[str]]:
    """Backend name -> the sources it saw, over n connections."""
    out: dict[str, set[str]] = {}
    for _ in range(n):
        name, seen = bed.ask(ip, port)
        out.setdefault(name, set()).add(seen)
    return out


# ---- NodePort -------------------------------------------------------------------------------------

def test_nodeport_cluster_policy_local_and_remote_backends_see_the_node_ip(tcbed, maps):
    program(maps, nodeport(), 1, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    assert names(tcbed, NODE1_4, NODEPORT) == {"pod1": {NODE1_4}, "pod2": {NODE1_4}}
    rows = ct_rows(tcbed.bpf_root)
    assert rows and all(r["masquerade"] and r["masquerade"].startswith(NODE1_4 + ":") for r in rows)
    ports = {int(r["masquerade"].rsplit(":", 1)[1]) for r in rows}
    assert all(61000 <= p <= 65535 for p in ports)  # outside the ephemeral and NodePort ranges
    assert {r["backend"] for r in rows} == {f"{POD1_4}:{PORT}", f"{POD2_4}:{PORT}"}
    assert any(r["masquerade"] for r in nat_rows(tcbed.bpf_root))


def link_stats(ns_path: str, ifname: str) -> dict:
    return netns_.run_in(ns_path, lambda: _link_stats(ifname))


def _link_stats(ifname: str) -> dict:
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])
        return dict(link.get_attr("IFLA_STATS64"))


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_packets_leaving_through_a_veth_go_straight_to_its_peer(tcbed, maps, v6):
    """node1's eth0 is a veth whose peer is in the bridge's namespace (lb_dev_addrs: DEV_F_PEER): what the
    programs send out of it (the local pod's replies, the requests to node2's pod) goes into the peer's
    ingress by bpf_redirect_peer, never through eth0's transmit, and still arrives."""
    node, (pod1, pod2) = (NODE1_6, (POD1_6, POD2_6)) if v6 else (NODE1_4, (POD1_4, POD2_4))
    assert datapath_dev_flags(tcbed, "eth0") == DEV_F_PEER and datapath_dev_flags(tcbed, "vpod") == DEV_F_PEER
    program(maps, nodeport(v6=v6), 1, [pod1, pod2], SVC_F_SNAT | SVC_F_NODEPORT)
    tcbed.ask(node, NODEPORT)  # (neighbours resolved: a first packet may go by bpf_redirect_neigh)
    n = 20
    tx, peer_rx = link_stats(tcbed.path("n1"), "eth0")["tx_packets"], br_stats(tcbed, "ton1")["rx_packets"]
    assert names(tcbed, node, NODEPORT, n) == {"pod1": {node}, "pod2": {node}}
    sent = br_stats(tcbed, "ton1")["rx_packets"] - peer_rx
    assert sent >= 3 * n  # replies and requests: at least a SYN-ACK or SYN, some data and a FIN per connection
    assert link_stats(tcbed.path("n1"), "eth0")["tx_packets"] - tx < n // 4, sent  # (the stack's own: ARP, ND)


def test_only_a_veth_whose_peer_is_in_another_namespace_is_a_peer_device():
    tag = uuid.uuid4().hex[:6]
    a, b = f"pd{tag}a", f"pd{tag}b"
    netns.create(a)
    netns.create(b)
    try:
        with IPRoute(netns=a) as ipr:
            ipr.link("add", ifname="out0", kind="veth", peer={"ifname": "in0", "net_ns_fd": b})
            ipr.link("add", ifname="same0", kind="veth", peer="same1")
            ipr.link("add", ifname="br0", kind="bridge")
            idx = {n: ipr.link_lookup(ifname=n)[0] for n in ("lo", "out0", "same0", "same1", "br0")}
        assert netns_.run_in(f"/run/netns/{a}", _peer_devices) == {idx["out0"]}
    finally:
        netns.remove(a)
        netns.remove(b)


def _peer_devices() -> set[int]:
    with IPRoute() as ipr:
        return datapath.peer_devices(ipr)


def br_stats(bed: TcBed, ifname: str) -> dict:
    return link_stats(bed.path("br"), ifname)


def datapath_dev_flags(bed: TcBed, ifname: str) -> int:
    ifindex = netns_.run_in(bed.path("n1"), lambda: socket.if_nametoindex(ifname))
    fd = bpfsys.obj_get(os.path.join(bed.bpf_root, DEV_ADDRS_MAP))
    try:
        return DevAddr.from_buffer_copy(bpfsys.lookup(fd, ifindex.to_bytes(4, "little"), ctypes.sizeof(DevAddr))).flags
    finally:
        os.close(fd)


def test_nodeport_on_another_address_of_the_node_is_not_served(tcbed, maps):
    program(maps, nodeport(), 1, [POD1_4], SVC_F_SNAT | SVC_F_NODEPORT)
    with PinnedNodeAddrs(tcbed.bpf_root) as m:
        m.replace({NODE1_6})  # NODE1_4 no longer in --nodeport-addresses
    try:
        with pytest.raises(ConnectionRefusedError):  # the node's own stack: nothing listens there
            tcbed.ask(NODE1_4, NODEPORT)
    finally:
        with PinnedNodeAddrs(tcbed.bpf_root) as m:
            m.replace({NODE1_4, NODE1_6})


def test_local_policy_preserves_the_client_ip_and_drops_silently_without_a_local_endpoint(tcbed, maps):
    program(maps, nodeport(), 1, [POD1_4], SVC_F_NODEPORT)
    assert names(tcbed, NODE1_4, NODEPORT, 6) == {"pod1": {CLIENT4}}
    program(maps, nodeport(), 1, [], SVC_F_NODEPORT | SVC_F_DROP_EMPTY)
    with pytest.raises(TimeoutError):  # a silent drop: no refusal, the SYN is never answered
        tcbed.ask(NODE1_4, NODEPORT, timeout=1.0)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_no_endpoints_at_all_is_refused_at_once(tcbed, maps, v6):
    program(maps, nodeport(v6=v6), 1, [], SVC_F_SNAT | SVC_F_NODEPORT)
    # An ICMP port unreachable (nft "reject"): refused, not a timeout. (Over IPv6 it takes the SYN's
    # first retransmit here: client and node share one softirq pass on this machine, so the first
    # ICMPv6 reaches the socket while connect() still holds its lock and is kept as a soft error.)
    with pytest.raises(ConnectionRefusedError):
        tcbed.ask(NODE1_6 if v6 else NODE1_4, NODEPORT, timeout=3.0)


def test_no_endpoints_udp_is_refused(tcbed, maps):
    program(maps, nodeport(UDP), 1, [], SVC_F_SNAT | SVC_F_NODEPORT)
    s = tcbed.sock(NODE1_4, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    try:
        s.connect((NODE1_4, NODEPORT))
        s.send(b"?\n")
        with pytest.raises(ConnectionRefusedError):
            s.recv(100)
    finally:
        s.close()


@pytest.mark.parametrize("node_offload", [True, False], ids=["node-offload", "node-no-offload"])
@pytest.mark.parametrize("proto", [TCP, UDP])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_refused_after_the_last_backend_went_from_a_client_with_checksum_offload(tcbed, maps, v6, proto,
                                                                                  node_offload):
    """The north-south bed's case: a client on this host behind a veth with checksum offload (the default)
    sends its SYN or datagram CHECKSUM_PARTIAL, which the kernel will not trim short of its L4 checksum
    field; the reject must still go out. Without offload on the node's device, its egress finishes that
    checksum inside the quote and the client, now given a plain packet, verifies the ICMP checksum."""
    ip = NODE1_6 if v6 else NODE1_4
    fe = nodeport(proto, v6)
    tx_csum(tcbed.path("c"), "eth0", True)
    if not node_offload:
        tx_csum(tcbed.path("n1"), "eth0", False)
    try:
        program(maps, fe, 1, [POD1_6 if v6 else POD1_4], SVC_F_SNAT | SVC_F_NODEPORT)
        ask = tcbed.ask if proto == TCP else tcbed.ask_udp
        assert ask(ip, NODEPORT)[0] == "pod1"
        program(maps, fe, 1, [], SVC_F_SNAT | SVC_F_NODEPORT)
        for _ in range(2):
            if proto == TCP:
                with pytest.raises(ConnectionRefusedError):  # (IPv6: see the test above)
                    tcbed.ask(ip, NODEPORT, timeout=3.0)
                continue
            s = tcbed.sock(ip, socket.SOCK_DGRAM)
            s.settimeout(2.0)
            try:
                s.connect((ip, NODEPORT))
                s.send(b"?\n")
                with pytest.raises(ConnectionRefusedError):
                    s.recv(100)
            finally:
                s.close()
    finally:
        tx_csum(tcbed.path("c"), "eth0", False)
        tx_csum(tcbed.path("n1"), "eth0", True)


def test_udp_nodeport_replies_come_from_the_frontend(tcbed, maps):
    program(maps, nodeport(UDP), 1, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    seen = set()
    for _ in range(16):
        name, src, reply_from = tcbed.ask_udp(NODE1_4, NODEPORT)
        assert src == NODE1_4 and reply_from == (NODE1_4, NODEPORT)
        seen.add(name)
    assert seen == {"pod1", "pod2"}


def test_ipv6_nodeport_local_and_remote(tcbed, maps):
    program(maps, nodeport(v6=True), 1, [POD1_6, POD2_6], SVC_F_SNAT | SVC_F_NODEPORT)
    assert names(tcbed, NODE1_6, NODEPORT) == {"pod1": {NODE1_6}, "pod2": {NODE1_6}}


def test_ipv6_udp_local_policy(tcbed, maps):
    program(maps, nodeport(UDP, v6=True), 1, [POD1_6], SVC_F_NODEPORT)
    name, src, reply_from = tcbed.ask_udp(NODE1_6, NODEPORT)
    assert (name, src, reply_from) == ("pod1", CLIENT6, (NODE1_6, NODEPORT))


# ---- ICMP errors about a translated flow -----------------------------------------------------------

CLOSED_PORT = 9999  # nothing listens on it in the pods: they answer ICMP port unreachable


def refused_udp(bed: TcBed, ip: str, port: int, timeout: float = 2.0) -> bool:
    """One datagram from a connected UDP socket: True if the kernel reports ECONNREFUSED, i.e. an ICMP
    port unreachable came back from ip (the error's source) quoting exactly the datagram the client sent
    (the kernel finds the socket by the quote), False if data came back; a timeout raises."""
    s = bed.sock(ip, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        s.send(b"?\n")
        try:
            s.recv(2048)
        except ConnectionRefusedError:
            return True
        return False
    finally:
        s.close()


def icmp_unreachables_in(bed: TcBed, k: str, v6: bool) -> int:
    """ICMP (ICMPv6) destination unreachable messages namespace k received (/proc/net/snmp, snmp6)."""
    if v6:
        text = subprocess.run(["nsenter", f"--net={bed.path(k)}", "cat", "/proc/net/snmp6"], capture_output=True,
                              text=True, check=True).stdout
        return int(dict(line.split() for line in text.splitlines() if line.strip())["Icmp6InDestUnreachs"])
    lines = subprocess.run(["nsenter", f"--net={bed.path(k)}", "cat", "/proc/net/snmp"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    head, vals = [line.split() for line in lines if line.startswith("Icmp:")][:2]
    return int(dict(zip(head[1:], vals[1:]))["InDestUnreachs"])


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("where,flags", [("local", SVC_F_SNAT | SVC_F_NODEPORT), ("remote", SVC_F_SNAT | SVC_F_NODEPORT),
                                         ("local", SVC_F_NODEPORT)], ids=["local", "remote", "local-policy-local"])
def test_a_backends_port_unreachable_reaches_the_client_translated(tcbed, maps, v6, where, flags):
    """A UDP NodePort whose backend has nothing on the target port: the pod answers ICMP port unreachable,
    quoting the datagram it got (masquerade address or client -> pod). As conntrack translates a RELATED
    packet, the error reaches the client from the frontend, quoting the datagram the client sent, and the
    client's connected socket fails with ECONNREFUSED at once. Untranslated, the error went to the node's
    stack (masqueraded) or to the client quoting a datagram it never sent, and the client timed out."""
    pod = {(False, "local"): POD1_4, (False, "remote"): POD2_4, (True, "local"): POD1_6,
           (True, "remote"): POD2_6}[(v6, where)]
    program(maps, nodeport(UDP, v6), 1, [pod], flags, port=CLOSED_PORT)
    assert refused_udp(tcbed, NODE1_6 if v6 else NODE1_4, NODEPORT)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_clients_port_unreachable_reaches_the_backend_translated(tcbed, maps, v6):
    """The other way: the client sends a datagram and closes its socket before the reply; its kernel
    answers the reply with ICMP port unreachable, quoting it (frontend -> client). Translated as the
    flow's packets are, it reaches the backend pod (its ICMP counters count it); untranslated, the node's
    own stack took it (it is addressed to the frontend)."""
    pod, node = (POD1_6, NODE1_6) if v6 else (POD1_4, NODE1_4)
    program(maps, nodeport(UDP, v6), 1, [pod], SVC_F_SNAT | SVC_F_NODEPORT)
    assert tcbed.ask_udp(node, NODEPORT)[0] == "pod1"  # the flow works
    before = icmp_unreachables_in(tcbed, "p1", v6)

    def send_and_close() -> bool:
        s = tcbed.sock(node, socket.SOCK_DGRAM)
        s.sendto(b"?\n", (node, NODEPORT))
        s.close()  # the reply finds no socket
        time.sleep(0.05)
        return icmp_unreachables_in(tcbed, "p1", v6) > before
    wait_for(send_and_close, what="the ICMP error at the backend")


@pytest.mark.parametrize("where", ["local", "remote"])
def test_fragmented_datagrams_both_ways_through_a_udp_nodeport(tcbed, maps, where):
    """A 4000-byte datagram leaves the client in three IPv4 fragments, and the backend's 4000-byte answer
    leaves the pod in three: as behind conntrack (which reassembles first), the later fragments, which
    carry no ports, follow their first fragment's flow, and both datagrams arrive whole. Untranslated,
    the node reassembled the request itself and refused it (no socket on the NodePort there)."""
    program(maps, nodeport(UDP), 1, [POD1_4 if where == "local" else POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    for size in (4000, 1400, 4000):  # fragmented, whole, fragmented again (the same flow)
        name, src, reply_from = tcbed.ask_udp(NODE1_4, NODEPORT, size=size)
        assert (name, src, reply_from) == ("pod1" if where == "local" else "pod2", NODE1_4, (NODE1_4, NODEPORT))


# ---- bulk transfers: GSO superpackets --------------------------------------------------------------

def bulk(bed: TcBed, ip: str, port: int, size: int, timeout: float = 10.0) -> tuple[str, int, int]:
    """size bytes up and as many back over one connection, all within timeout seconds: (backend name,
    bytes it counted, bytes back). A stalled transfer (a trickle of segments) raises TimeoutError."""
    deadline = time.monotonic() + timeout
    s = bed.sock(ip)

    def budget() -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"bulk transfer to {ip}:{port} not done in {timeout} s")
        s.settimeout(left)
    try:
        budget()
        s.connect((ip, port))
        chunk = b"x" * (1 << 16)
        left = size
        while left:
            budget()
            left -= s.send(chunk[:left])
        s.shutdown(socket.SHUT_WR)
        budget()
        line = b""
        while not line.endswith(b"\n"):
            budget()
            data = s.recv(1)
            if not data:
                raise ConnectionResetError("closed before the count")
            line += data
        name, counted = line.split()
        back = 0
        while True:
            budget()
            data = s.recv(1 << 16)
            if not data:
                break
            back += len(data)
        return name.decode(), int(counted), back
    finally:
        s.close()


@pytest.fixture
def offloads(tcbed):
    """Checksum offload and TSO on for the client's and pod2's devices (for one test): the client's TCP
    hands the datapath superpackets of up to 64 KB, as any real sender does, and pod2 answers with them."""
    devs = [(tcbed.path("c"), "eth0"), (tcbed.path("p2"), "eth0")]
    try:
        for ns_path, dev in devs:
            on = set_features(ns_path, dev, TX_CSUM + TSO, True)
            assert all(on[n] for n in TSO), on  # the test means nothing without superpackets
        yield
    finally:
        for ns_path, dev in devs:
            set_features(ns_path, dev, TX_CSUM, False)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_bulk_transfer_to_a_remote_backend_through_a_masqueraded_nodeport(tcbed, maps, offloads, v6):
    # The superpackets are forwarded whole to node2 (bpf_fib_lookup must not judge them by their IP
    # length against the 1500-byte MTU: then only retransmitted MTU-sized segments got through, a few
    # KB/s) and pod2's come back through the reverse translation.
    program(maps, nodeport(v6=v6), 1, [POD2_6 if v6 else POD2_4], SVC_F_SNAT | SVC_F_NODEPORT, port=BULK_PORT)
    size = 50 << 20
    assert bulk(tcbed, NODE1_6 if v6 else NODE1_4, NODEPORT, size) == ("pod2", size, size)
    rows = ct_rows(tcbed.bpf_root)
    assert len(rows) == 1, rows
    (row,) = rows
    node = NODE1_6 if v6 else NODE1_4
    assert row["masquerade"].startswith(f"[{node}]:" if v6 else f"{node}:"), row


def test_a_flow_stamped_by_another_cpu_after_our_clock_read_is_live(tcbed, maps):
    """A bulk transfer's data and its ACKs are handled on both CPUs at once: an entry's last_ns may be
    later than the clock this packet read. Such a flow is live, not expired (an unsigned now - last
    wrapped, and the flow was re-created with a new masquerade port: its next segment reached the
    backend from an unknown port and was reset)."""
    program(maps, nodeport(), 1, [POD1_4], SVC_F_SNAT | SVC_F_NODEPORT)
    stream = Stream(tcbed, NODE1_4, NODEPORT)
    try:
        assert stream.ask() == ("pod1", NODE1_4)
        (before,) = ct_rows(tcbed.bpf_root)
        # Stamp the flow 5 s ahead, as a packet on another CPU would have an instant after ours.
        fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, CT_MAP))
        try:
            ((key, val),) = bpfsys.dump(fd, ctypes.sizeof(CtTuple), ctypes.sizeof(CtVal))
            ct = CtVal.from_buffer_copy(val)
            ct.last_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) + 5_000_000_000
            bpfsys.update(fd, key, bytes(ct))
        finally:
            os.close(fd)
        assert all(stream.ask() == ("pod1", NODE1_4) for _ in range(5))
        (after,) = ct_rows(tcbed.bpf_root)
        assert after["masquerade"] == before["masquerade"]
    finally:
        stream.close()


def hold_every_masquerade_port(tcbed, closed_ns: int, backend_port: int = PORT) -> None:
    """Every masquerade port towards pod2:backend_port held by a flow of another client that closed at
    closed_ns."""
    fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, NAT_MAP))
    try:
        for port in range(61000, 65536):
            key = CtTuple.from_buffer_copy(pack_ip(POD2_4) + pack_ip(NODE1_4) +
                                           struct.pack("=HHB3x", socket.htons(backend_port), socket.htons(port), 6))
            val = NatVal(client_port=socket.htons(port), frontend_port=socket.htons(NODEPORT),
                         flags=CT_F_SNAT | CT_F_CLOSING, rev_nat_id=1, last_ns=closed_ns)
            ctypes.memmove(val.client, pack_ip("10.99.0.1"), 16)
            ctypes.memmove(val.frontend, pack_ip(NODE1_4), 16)
            bpfsys.update(fd, bytes(key), bytes(val))
    finally:
        os.close(fd)


def test_many_short_connections_to_a_remote_backend_through_a_masqueraded_nodeport(tcbed, maps):
    """More connections than there are masquerade ports, opened and closed (RST) back to back. The lb_nat entries of closed flows stayed until
    the LRU evicted them (never, below its size): once the 4536 ports of the backend were all held by
    dead flows every new flow's SYN was dropped, and in the north-south bench ~6% of np-remote
    connections failed. A flow that is over gives its port to a new one (as conntrack reuses a closed
    tuple), so none may fail. Every port starts held by a flow that closed a while ago (a SYN takes the
    first such port it tries, so a test that only dialled would not keep the range full)."""
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    hold_every_masquerade_port(tcbed, time.clock_gettime_ns(time.CLOCK_BOOTTIME) - 1_000_000_000)
    # 12 000 client ports: the kernel hands out about half of them before it reuses one (a reused
    # client port ended its old flow anyway), more than the 4536 masquerade ports.
    sysctl(tcbed.path("c"), {"net.ipv4.ip_local_port_range": "40000 51999"})
    abortive = struct.pack("ii", 1, 0)
    failed: dict[str, int] = {}
    try:
        for _ in range(9000):
            s = tcbed.sock(NODE1_4)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, abortive)
            s.settimeout(2.0)
            try:
                s.connect((NODE1_4, NODEPORT))
            except OSError as e:
                failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
            finally:
                s.close()
            if sum(failed.values()) >= 5:
                break  # (each may have waited out its timeout)
    finally:
        sysctl(tcbed.path("c"), {"net.ipv4.ip_local_port_range": "32768 60999"})
    assert not failed, failed
    # The other client's flows gave their ports over: most of the range went to this client's flows (a
    # reused client port takes its own flow's port back, so only its first connections and those whose
    # port was taken meanwhile take one over: about 3500 of the 4536 here).
    others = [r for r in nat_rows(tcbed.bpf_root) if not r["client"].startswith(CLIENT4 + ":")]
    assert len(others) < 4536 // 2, len(others)
    assert tcbed.ask(NODE1_4, NODEPORT) == ("pod2", NODE1_4)


def test_two_cpus_taking_over_masquerade_ports_at_once_never_share_one(tcbed, maps):
    """Clients on both CPUs at once, every masquerade port held by a flow that closed long ago, so every
    SYN takes over the first port it tries: bench/tcp_client.c (four processes, one connection after
    another each, closed with an RST) to bench/tcp_server.c on pod2 (accept and close), as
    bench/nodeport.py runs them. Two SYNs on two CPUs that tried the same port in the same instant both
    took it (the entry was rewritten without a lock): the flow that lost the entry never got a reply
    (its SYN-ACKs went to the other flow's client) and its connect timed out; bench/nodeport.py with four
    client processes lost about one connection in 8 000 that way. The takeover is now one
    compare-and-swap on the entry (nat_lock): one of the two wins, the other's SYN is dropped (as
    conntrack drops a TCP packet whose NAT tuple clashed at confirm) and its retransmission claims another
    port, so every connection succeeds (the client retries a SYN once: net.ipv4.tcp_syn_retries 1, 3 s)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib import build_c

    sink = 8181  # (pod2's own server has 8080 and 8081)
    server = subprocess.Popen(["nsenter", f"--net={tcbed.path('p2')}", build_c("tcp_server"), f"{POD2_4}:{sink}:c"],
                              stdout=subprocess.PIPE, text=True)
    tcbed.procs.append(server)
    assert server.stdout.readline().strip() == "ready"
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT, port=sink)
    hold_every_masquerade_port(tcbed, time.clock_gettime_ns(time.CLOCK_BOOTTIME) - 1_000_000_000, sink)
    sysctl(tcbed.path("c"), {"net.ipv4.tcp_syn_retries": "1"})
    client = subprocess.Popen(["nsenter", f"--net={tcbed.path('c')}", build_c("tcp_client")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    rounds = []  # (ok, failed, first errno, ns) of each round of 40 000
    try:
        # (without the lock: none failed in the first two rounds, a few in each from the third on, once
        # the client reuses its ports and flows take their old ports back while others take them over)
        for _ in range(5):
            client.stdin.write(f"run {NODE1_4} {NODEPORT} c 40000 4\n")
            client.stdin.flush()
            rounds.append(client.stdout.readline().split())
    finally:
        client.kill()
        server.kill()
        sysctl(tcbed.path("c"), {"net.ipv4.tcp_syn_retries": "6"})
    assert all(r[1] == "0" for r in rounds), rounds


CLIENT_PORT = 45678


def dial_from_client_port(tcbed, port: int = CLIENT_PORT) -> str:
    """One request from CLIENT4:port to node1's NodePort, closed abortively (RST); the backend's name (the
    source it saw must be node1's: the NodePort masquerades)."""
    s = tcbed.sock(NODE1_4)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(2.0)
    try:
        s.bind((CLIENT4, port))
        s.connect((NODE1_4, NODEPORT))
        s.sendall(b"?\n")
        name, seen = s.makefile().readline().split()
        assert seen == NODE1_4, seen
        return name
    finally:
        s.close()


def tuple_rows(tcbed) -> tuple[list[dict], list[dict]]:
    """The lb_ct and lb_nat rows of the client tuple CLIENT4:CLIENT_PORT."""
    me = f"{CLIENT4}:{CLIENT_PORT}"
    return ([r for r in ct_rows(tcbed.bpf_root) if r["client"] == me],
            [r for r in nat_rows(tcbed.bpf_root) if r["client"] == me])


def rewrite_nat(tcbed, reply_to: str, **fields) -> None:
    """Change fields of the lb_nat entry of pod2's reply tuple to reply_to (ADDR:PORT)."""
    addr, port = reply_to.rsplit(":", 1)
    key = CtTuple.from_buffer_copy(pack_ip(POD2_4) + pack_ip(addr) +
                                   struct.pack("=HHB3x", socket.htons(PORT), socket.htons(int(port)), 6))
    fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, NAT_MAP))
    try:
        val = NatVal.from_buffer_copy(bpfsys.lookup(fd, bytes(key), ctypes.sizeof(NatVal)))
        for k, v in fields.items():
            if k == "client":
                ctypes.memmove(val.client, pack_ip(v), 16)
            else:
                setattr(val, k, v)
        bpfsys.update(fd, bytes(key), bytes(val))
    finally:
        os.close(fd)


def rewrite_ct_flags(tcbed, clear: int) -> None:
    """Clear flags of the lb_ct entry of CLIENT4:CLIENT_PORT -> node1's NodePort."""
    key = CtTuple.from_buffer_copy(pack_ip(CLIENT4) + pack_ip(NODE1_4) +
                                   struct.pack("=HHB3x", socket.htons(CLIENT_PORT), socket.htons(NODEPORT), 6))
    fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, CT_MAP))
    try:
        val = CtVal.from_buffer_copy(bpfsys.lookup(fd, bytes(key), ctypes.sizeof(CtVal)))
        val.flags &= ~clear
        bpfsys.update(fd, bytes(key), bytes(val))
    finally:
        os.close(fd)


@pytest.mark.parametrize("backends", [1, 2])
def test_a_new_connection_on_a_clients_old_tuple_is_balanced_anew_and_keeps_its_port_on_the_same_backend(
        tcbed, maps, backends):
    """A client that dials again from the port of a connection it aborted (RST) starts a new flow on the
    old tuple: its backend is picked anew (conntrack kills the closed entry and makes a new one, so
    kube-proxy spreads such connections too), and when the pick is the old backend the flow takes the
    old masquerade port back (neither end keeps a socket for that tuple after an RST): one lb_ct and one
    lb_nat entry for the tuple throughout, rewritten in place."""
    pods = [POD2_4, POD1_4][:backends]
    program(maps, nodeport(), 1, pods, SVC_F_SNAT | SVC_F_NODEPORT)
    seen: dict[str, int] = {}
    ports: dict[str, list[str]] = {}
    last = None
    for _ in range(24):
        name = dial_from_client_port(tcbed)
        seen[name] = seen.get(name, 0) + 1
        flows, mine = tuple_rows(tcbed)
        assert len(mine) == 1 and len(flows) == 1, (flows, mine)
        assert flows[0]["masquerade"] == mine[0]["reply_to"] and "rst" in flows[0]["flags"], (flows, mine)
        if last is not None and last[0] == mine[0]["backend"]:
            assert mine[0]["reply_to"] == last[1]  # the same backend twice in a row: the same port
        last = (mine[0]["backend"], mine[0]["reply_to"])
        ports.setdefault(mine[0]["backend"], []).append(mine[0]["reply_to"])
    assert len(seen) == backends, seen  # (two backends: each missed by 24 fair picks with p = 2**-23)
    if backends == 1:
        assert len(set(ports[f"{POD2_4}:{PORT}"])) == 1, ports


def test_an_old_tuple_after_a_graceful_close_gets_a_new_masquerade_port(tcbed, maps):
    """After a close without an RST the backend may keep the old tuple in TIME_WAIT: a new connection on
    the client's old tuple is masqueraded to another port (the flow's RST mark cleared by hand: a real
    client cannot reuse a port it left in TIME_WAIT at once)."""
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    dial_from_client_port(tcbed)
    _, before = tuple_rows(tcbed)
    rewrite_ct_flags(tcbed, clear=CT_F_RST)
    dial_from_client_port(tcbed)
    _, after = tuple_rows(tcbed)
    assert len(after) == 1 and after[0]["reply_to"] != before[0]["reply_to"], (before, after)
    assert not [r for r in nat_rows(tcbed.bpf_root) if r["reply_to"] == before[0]["reply_to"]]  # old one gone


def test_an_old_tuples_port_taken_by_another_flow_is_left_to_it(tcbed, maps):
    """The old flow's masquerade port went to another flow meanwhile (its lb_nat entry names another
    client): the new flow on the old tuple claims another port and leaves that flow's entry alone."""
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    dial_from_client_port(tcbed)
    _, before = tuple_rows(tcbed)
    taken = before[0]["reply_to"]
    rewrite_nat(tcbed, taken, client="10.99.0.7", flags=CT_F_SNAT | CT_F_REPLIED)
    dial_from_client_port(tcbed)
    _, after = tuple_rows(tcbed)
    assert len(after) == 1 and after[0]["reply_to"] != taken, (before, after)
    other = [r for r in nat_rows(tcbed.bpf_root) if r["reply_to"] == taken]
    assert len(other) == 1 and other[0]["client"].startswith("10.99.0.7:"), other


def fill_ended_flows(tcbed, first_client_port: int) -> dict[int, int]:
    """Every masquerade port (61000-65535) held by a flow of CLIENT4 to pod2 through node1's NodePort that
    ended with an RST a second ago, client ports from first_client_port up: the entries the datapath
    leaves (lb_ct and lb_nat), as a client that dialled at a sustained rate leaves them. Masquerade port
    -> client port."""
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - 1_000_000_000
    flags = CT_F_SNAT | CT_F_REPLIED | CT_F_CLOSING | CT_F_RST | CT_F_NODEPORT
    out = {}
    ct_fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, CT_MAP))
    nat_fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, NAT_MAP))
    try:
        for i, nat_port in enumerate(range(61000, 65536)):
            cport = first_client_port + i
            key = pack_ip(CLIENT4) + pack_ip(NODE1_4) + struct.pack("=HHB3x", socket.htons(cport), socket.htons(NODEPORT), 6)
            ct = CtVal(backend_port=socket.htons(PORT), nat_port=socket.htons(nat_port), backend_id=BACKEND_IDS[POD2_4],
                       rev_nat_id=1, slot=1, flags=flags, created_ns=now, last_ns=now)
            ctypes.memmove(ct.backend, pack_ip(POD2_4), 16)
            ctypes.memmove(ct.nat_addr, pack_ip(NODE1_4), 16)
            bpfsys.update(ct_fd, key, bytes(ct))
            rkey = pack_ip(POD2_4) + pack_ip(NODE1_4) + struct.pack("=HHB3x", socket.htons(PORT), socket.htons(nat_port), 6)
            nv = NatVal(client_port=socket.htons(cport), frontend_port=socket.htons(NODEPORT), flags=flags, rev_nat_id=1,
                        last_ns=now)
            ctypes.memmove(nv.client, pack_ip(CLIENT4), 16)
            ctypes.memmove(nv.frontend, pack_ip(NODE1_4), 16)
            bpfsys.update(nat_fd, rkey, bytes(nv))
            out[nat_port] = cport
    finally:
        os.close(ct_fd)
        os.close(nat_fd)
    return out


def raw_ct_flags(tcbed) -> dict[int, int]:
    """Client port -> lb_ct flags of every entry, listed or not (ct_rows leaves ended ones out)."""
    fd = bpfsys.obj_get(os.path.join(tcbed.bpf_root, CT_MAP))
    try:
        return {socket.ntohs(CtTuple.from_buffer_copy(k).sport): CtVal.from_buffer_copy(v).flags
                for k, v in bpfsys.dump(fd, ctypes.sizeof(CtTuple), ctypes.sizeof(CtVal))}
    finally:
        os.close(fd)


def test_a_flow_whose_port_is_taken_over_ends_and_its_tuple_starts_anew(tcbed, maps):
    """Every masquerade port is held by a flow that ended: a new flow takes one over, and the flow that
    held it ends with it (CT_F_ENDED: never live again, left out of `bpflb ct list`; its entry stays for a
    new flow on its tuple to rewrite in place). A client dialling again from that flow's port gets a new,
    working flow on the tuple."""
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    held = fill_ended_flows(tcbed, 20000)
    assert dial_from_client_port(tcbed) == "pod2"
    (flow,) = tuple_rows(tcbed)[0]
    port = int(flow["masquerade"].rsplit(":", 1)[1])
    loser = held[port]  # the flow whose port the new one took
    flags = raw_ct_flags(tcbed)
    assert flags[loser] & CT_F_ENDED, flags[loser]
    assert sum(1 for f in flags.values() if f & CT_F_ENDED) == 1
    assert f"{CLIENT4}:{loser}" not in {r["client"] for r in ct_rows(tcbed.bpf_root)}
    assert [r["client"] for r in nat_rows(tcbed.bpf_root) if r["reply_to"] == flow["masquerade"]] == [
        f"{CLIENT4}:{CLIENT_PORT}"]
    # the ended flow's client dials again from its port: a new flow on the ended entry's tuple
    assert dial_from_client_port(tcbed, loser) == "pod2"
    assert not raw_ct_flags(tcbed)[loser] & CT_F_ENDED
    (again,) = [r for r in ct_rows(tcbed.bpf_root) if r["client"] == f"{CLIENT4}:{loser}"]
    assert "rst" in again["flags"] and again["masquerade"].startswith(NODE1_4 + ":"), again


def test_an_old_tuple_whose_frontend_lost_its_backends_ends_with_its_entries(tcbed, maps):
    """A new connection on an old tuple that is refused (the frontend has no endpoints now) ends the old
    flow: its lb_ct and lb_nat entries go, as they did before new flows reused them."""
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    dial_from_client_port(tcbed)
    assert all(len(rows) == 1 for rows in tuple_rows(tcbed))
    program(maps, nodeport(), 1, [], SVC_F_SNAT | SVC_F_NODEPORT)
    with pytest.raises(ConnectionRefusedError):
        dial_from_client_port(tcbed)
    assert tuple_rows(tcbed) == ([], [])


def test_a_masquerade_port_goes_to_a_new_flow_only_a_while_after_its_flow_closed(tcbed, maps):
    """Every masquerade port towards pod2 is held by a flow that closed (FIN or RST seen) a moment ago;
    their stamps are set ahead, so they stay "a moment ago" while the test dials. A new SYN must not take
    one of them: the old flow's last segments (its RST, handled on another CPU) may still be on their way
    to the backend, and a SYN on the same tuple overtaking them meets the old socket there (a FIN_WAIT2
    socket answers with a RST: under a sustained connection rate a whole bench round once failed with
    ECONNREFUSED). Taken at once, as before, the connection succeeded here. Once they closed long enough
    ago, they are taken over and the connection succeeds."""
    program(maps, nodeport(), 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    ahead = time.clock_gettime_ns(time.CLOCK_BOOTTIME) + 4_000_000_000
    hold_every_masquerade_port(tcbed, ahead)
    with pytest.raises(OSError):  # every SYN dropped (timeout): no port to give
        tcbed.ask(NODE1_4, NODEPORT, timeout=1.5)
    wait_for(lambda: time.clock_gettime_ns(time.CLOCK_BOOTTIME) > ahead + 20_000_000, timeout=10)
    assert tcbed.ask(NODE1_4, NODEPORT) == ("pod2", NODE1_4)
    rows = nat_rows(tcbed.bpf_root)
    assert len(rows) == 4536 and len([r for r in rows if r["client"].startswith(CLIENT4 + ":")]) == 1


# ---- LoadBalancer IP, ExternalIP ------------------------------------------------------------------

def test_lb_ip_without_and_with_source_ranges(tcbed, maps):
    fe = Frontend(LB4, 80, TCP, SCOPE_EXTERNAL)
    program(maps, fe, 7, [POD1_4, POD2_4], SVC_F_SNAT)
    assert set(names(tcbed, LB4, 80, 8)) <= {"pod1", "pod2"}
    program(maps, fe, 7, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_SRC_RANGES)
    with PinnedSourceRanges(tcbed.bpf_root) as r:
        r.replace({7: ("192.168.77.0/28", "10.0.0.0/8")})
        assert r.dump() == {7: ("10.0.0.0/8", "192.168.77.0/28")}
    with pytest.raises(TimeoutError):  # outside the ranges: dropped
        tcbed.ask(LB4, 80, timeout=1.0)
    with PinnedSourceRanges(tcbed.bpf_root) as r:
        r.replace({7: ("192.168.77.96/29",)})
    assert tcbed.ask(LB4, 80)[1] == NODE1_4


def test_lb_ip_ipv6(tcbed, maps):
    program(maps, Frontend(LB6, 80, TCP, SCOPE_EXTERNAL), 8, [POD1_6, POD2_6], SVC_F_SNAT)
    assert set(names(tcbed, LB6, 80, 8)) <= {"pod1", "pod2"}


def test_external_ip(tcbed, maps):
    program(maps, Frontend(EXT4, 443, TCP, SCOPE_EXTERNAL), 9, [POD2_4], SVC_F_SNAT)
    assert tcbed.ask(EXT4, 443) == ("pod2", NODE1_4)
    with pytest.raises(OSError):  # another port of that IP is no frontend: not translated (node1 has no route)
        tcbed.ask(EXT4, 444, timeout=0.5)


def test_affinity_by_client_ip(tcbed, maps):
    program(maps, nodeport(), 1, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_NODEPORT | SVC_F_AFFINITY, affinity=600)
    assert len(names(tcbed, NODE1_4, NODEPORT, 16)) == 1


# ---- conntrack ------------------------------------------------------------------------------------

def test_a_flow_keeps_its_backend_across_a_change_and_ends_when_it_is_removed(tcbed, maps):
    fe = nodeport()
    program(maps, fe, 1, [POD1_4], SVC_F_SNAT | SVC_F_NODEPORT)
    stream = Stream(tcbed, NODE1_4, NODEPORT)
    try:
        assert stream.ask() == ("pod1", NODE1_4)
        program(maps, fe, 1, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)  # pod1 keeps slot 1
        assert all(stream.ask() == ("pod1", NODE1_4) for _ in range(10))
        program(maps, fe, 1, [POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)  # pod1 removed
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            stream.ask()  # its next segment goes to pod2, which knows no such connection: reset
    finally:
        stream.close()
    assert tcbed.ask(NODE1_4, NODEPORT)[0] == "pod2"  # and new flows go elsewhere


def test_a_udp_flow_keeps_its_backend(tcbed, maps):
    fe = nodeport(UDP)
    program(maps, fe, 1, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    s = tcbed.sock(NODE1_4, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    try:
        s.connect((NODE1_4, NODEPORT))
        first = set()
        for _ in range(8):
            s.send(b"?\n")
            first.add(s.recv(100).split()[0])
        assert len(first) == 1
        (kept,) = first
        other = POD2_4 if kept == b"pod1" else POD1_4
        program(maps, fe, 1, [POD1_4 if kept == b"pod1" else POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
        s.send(b"?\n")
        assert s.recv(100).split()[0] == kept
        program(maps, fe, 1, [other], SVC_F_SNAT | SVC_F_NODEPORT)  # its backend removed: the next goes elsewhere
        s.send(b"?\n")
        assert s.recv(100).split()[0] != kept
    finally:
        s.close()


# ---- lifecycle ------------------------------------------------------------------------------------

def tcx_links(bed: TcBed) -> dict[str, tuple[int, int]]:
    """tc link pin -> (link ID, program ID)."""
    out = {}
    for name, pin in datapath._tc_links(bed.paths).items():
        fd = bpfsys.obj_get(pin)
        try:
            info = ctypes.create_string_buffer(64)
            n = ctypes.c_uint32(64)
            assert bpfsys._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(n)) == 0
            out[name] = (ctypes.c_uint32.from_buffer(info, 4).value, ctypes.c_uint32.from_buffer(info, 8).value)
        finally:
            os.close(fd)
    return out


def tcx_programs(bed: TcBed, ifname: str) -> list[int]:
    """Program IDs attached at tcx ingress of a node1 device (bpf_prog_query)."""
    def query():
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
        try:
            return bpfsys.prog_query(idx, datapath.TCX_INGRESS)
        except OSError:
            return []
    return netns_.run_in(bed.path("n1"), query)


def test_attachments_survive_a_killed_loader_and_are_adopted(tcbed, maps, monkeypatch):
    program(maps, nodeport(), 1, [POD1_4, POD2_4], SVC_F_SNAT | SVC_F_NODEPORT)
    before = tcx_links(tcbed)
    assert set(before) == {f"ext_{netns_.run_in(tcbed.path('n1'), lambda: tcbed._link('eth0'))}", f"pod_{tcbed.vpod}"}
    stream = Stream(tcbed, NODE1_4, NODEPORT)
    try:
        backend = stream.ask()
        # A loader that attaches (adopting) and then dies by SIGKILL, as an agent would.
        code = (f"import json, time; from lb import datapath; from lb.settings import MapSizes, Paths; "
                f"print(json.dumps(datapath.attach_tc(Paths(**{vars(tcbed.paths)!r}), MapSizes(**{vars(SIZES)!r}), "
                f"['eth0'])), flush=True); time.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             preexec_fn=lambda: netns_.enter(tcbed.path("n1")))
        assert json.loads(p.stdout.readline()) == []
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert all(stream.ask() == backend for _ in range(5))  # the flow never noticed
        assert tcx_links(tcbed) == before  # same links, same programs
        monkeypatch.setattr(datapath, "compile_tc_lb", lambda *a: pytest.fail("adopting must not compile"))
        assert netns_.run_in(tcbed.path("n1"), lambda: datapath.attach_tc(tcbed.paths, SIZES, ["eth0"])) == []
        assert tcx_links(tcbed) == before
        assert stream.ask() == backend
    finally:
        stream.close()


def test_ct_and_nat_list_commands(tcbed, maps):
    program(maps, nodeport(), 1, [POD1_4], SVC_F_SNAT | SVC_F_NODEPORT)
    stream = Stream(tcbed, NODE1_4, NODEPORT)
    try:
        stream.ask()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-m", "lb.cli", "ct", "list", "-o", "json", "--bpf-root",
                              tcbed.bpf_root], capture_output=True, text=True, env=env, check=True).stdout
        rows = json.loads(out)
        port = stream.s.getsockname()[1]
        (row,) = [r for r in rows if r["client"] == f"{CLIENT4}:{port}"]
        assert row["frontend"] == f"{NODE1_4}:{NODEPORT}" and row["backend"] == f"{POD1_4}:{PORT}"
        assert "snat" in row["flags"] and "nodeport" in row["flags"] and "replied" in row["flags"]
        text = subprocess.run([sys.executable, "-m", "lb.cli", "nat", "list", "--bpf-root", tcbed.bpf_root],
                              capture_output=True, text=True, env=env, check=True).stdout
        assert f"{CLIENT4}:{port}" in text and "(masq)" in text
    finally:
        stream.close()


def test_cleanup_removes_only_what_bpflb_added():
    """A bed of its own: a foreign clsact qdisc and filter on the device stay; every bpflb link goes."""
    b = TcBed()
    try:
        b.up()
        tc = ["ip", "netns", "exec", b.ns["n1"], "tc"]
        subprocess.run([*tc, "qdisc", "add", "dev", "eth0", "clsact"], check=True)
        # Someone else's classic filter (cBPF "return 0": no verdict, packets go on to tcx and the stack).
        subprocess.run([*tc, "filter", "add", "dev", "eth0", "ingress", "prio", "10", "bpf", "bytecode", "1,6 0 0 0,"],
                       check=True)
        assert tcx_programs(b, "eth0") and tcx_programs(b, "vpod")
        removed = datapath.cleanup(b.paths)
        assert any(r.startswith("tc ext_") for r in removed) and any(r.startswith("tc pod_") for r in removed)
        assert tcx_programs(b, "eth0") == [] and tcx_programs(b, "vpod") == []
        assert not os.path.exists(b.bpf_root)
        qdiscs = subprocess.run([*tc, "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout
        filters = subprocess.run([*tc, "filter", "show", "dev", "eth0", "ingress"], capture_output=True, text=True).stdout
        assert "clsact" in qdiscs and "bytecode '1,6 0 0 0'" in filters  # not ours: left alone
    finally:
        b.down()


# ---- local callers: the socket programs' wildcard NodePort lookup ---------------------------------

ASK = r"""
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((ip, port), timeout=2)
s.sendall(b"?\n")
print(s.makefile().readline().strip(), "%s:%d" % s.getpeername()[:2])
"""


@contextlib.contextmanager
def socket_caller(tcbed, maps, flags: int):
    """The socket programs attached to a cgroup of their own, one INTERNAL wildcard NodePort frontend
    (to pod1, with ``flags``), node1's addresses and node2's as a remote one; yields ask(dial), which
    connects from that cgroup in node1's namespace to dial:NODEPORT (a python process: its result)."""
    from lb.settings import default_cgroup_root

    cgroup = os.path.join(default_cgroup_root(), f"bpflb-tctest-{uuid.uuid4().hex[:6]}")
    os.mkdir(cgroup)
    paths = Paths(cgroup_root=cgroup, bpf_root=tcbed.bpf_root)
    try:
        datapath.attach(paths, SIZES)
        program(maps, Frontend("0.0.0.0", NODEPORT, TCP), 5, [POD1_4], flags)  # scope INTERNAL
        with PinnedNodeAddrs(tcbed.bpf_root) as m:
            m.replace({NODE1_4, NODE1_6}, remote={NODE2_4})

        def enter():
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")
            netns_.enter(tcbed.path("n1"))

        yield lambda dial: subprocess.run([sys.executable, "-c", ASK, dial, str(NODEPORT)], capture_output=True,
                                          text=True, preexec_fn=enter, timeout=10)
    finally:
        with PinnedNodeAddrs(tcbed.bpf_root) as m:
            m.replace({NODE1_4, NODE1_6})
        for name in datapath.attached(paths):
            os.unlink(os.path.join(tcbed.bpf_root, datapath.LINKS_DIR, name))
        for mark in os.listdir(os.path.join(tcbed.bpf_root, datapath.LINKS_DIR)):
            os.rmdir(os.path.join(tcbed.bpf_root, datapath.LINKS_DIR, mark))
        os.rmdir(cgroup)


@pytest.mark.parametrize("dial", [NODE1_4, NODE2_4], ids=["this-node", "another-node"])
def test_a_local_caller_dialling_a_node_address_nodeport_is_translated_at_its_socket(tcbed, maps, dial):
    with socket_caller(tcbed, maps, SVC_F_NODEPORT) as ask:
        out = ask(dial)
    assert out.returncode == 0, out.stderr
    name, seen, peer = out.stdout.split()
    # Connected straight to the pod (it sees the node's address on the pod side, not a masquerade),
    # and the application sees the address it dialled.
    assert (name, seen, peer) == ("pod1", GW4, f"{dial}:{NODEPORT}")
    assert ct_rows(tcbed.bpf_root) == []  # no packet went through the tc path


@pytest.mark.parametrize("dial,translated", [(NODE1_4, True), (NODE2_4, False)], ids=["this-node", "another-node"])
def test_an_etp_local_nodeport_on_another_nodes_address_is_left_to_that_node(tcbed, maps, dial, translated):
    """externalTrafficPolicy Local (SVC_F_EXT_LOCAL on the INTERNAL wildcard): on this node's address a local
    caller gets the frontend's set at its socket, as on any nodePort; on another node's address, which
    endpoints serve it is that node's to say, so the connect goes there untranslated, as behind kube-proxy
    (node2 of this bed has nothing listening on the nodePort: refused there)."""
    from lb.maps.structs import SVC_F_EXT_LOCAL

    with socket_caller(tcbed, maps, SVC_F_NODEPORT | SVC_F_EXT_LOCAL) as ask:
        out = ask(dial)
    if translated:
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["pod1", GW4, f"{dial}:{NODEPORT}"]
    else:
        assert out.returncode != 0 and "ConnectionRefusedError" in out.stderr, (out.stdout, out.stderr)
