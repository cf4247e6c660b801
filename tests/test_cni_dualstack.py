"""Dual-stack pods from the bundled CNI plugin (a Node's spec.podCIDRs: one IPv4 and one IPv6 range):
IPAM and configuration on their own, the plugin called directly (test_cni_spec.py's scratch node), and
the real plugin through the installed launcher and cnitool in a node namespace (test_cni.py's node),
checked in the pod's namespace: both addresses, both default routes, IPv6 ping and TCP to the node and
between two pods of the node, CHECK, and a DEL that leaves nothing."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from lb.cni import install, netsetup
from lb.cni.ipam import GATEWAY6, IPAM, Pool, PoolExhausted
from lb.cni.server import node_pod_cidrs, with_defaults
from lb.testing.cni_node import CIDR, GW, Node

from test_cni import host_veths, records, reserved
from test_cni_spec import FakeSink, Scratch, env_for

CIDR6 = "fd00:244:7::/64"
GW6 = str(GATEWAY6)


# ---- IPAM ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cidr,size,first,gateway", [
    ("fd00:244:1::/64", 2 ** 64 - 2, "fd00:244:1::1", "fe80::1"),
    ("fd00:244:1::/126", 2, "fd00:244:1::1", "fe80::1"),
    ("fd00:244:1::77/120", 254, "fd00:244:1::1", "fe80::1"),  # host bits ignored
    ("10.244.0.0/24", 253, "10.244.0.2", "10.244.0.1"),
], ids=["v6-slash64", "v6-slash126", "v6-host-bits", "v4-unchanged"])
def test_pool_of_either_family(cidr, size, first, gateway):
    pool = Pool.of(cidr)
    assert (pool.size, str(pool.gateway)) == (size, gateway)
    assert first in pool and str(pool.subnet.network_address) not in pool and gateway not in pool
    other = "10.244.0.5" if pool.version == 6 else "fd00:244:1::5"
    assert other not in pool  # never the other family's address


def test_one_attachment_holds_one_address_per_family(tmp_path):
    ipam, v4, v6 = IPAM(str(tmp_path), "net"), Pool.of("10.244.0.0/29"), Pool.of("fd00:244::/125")
    a4, a6 = ipam.allocate(v4, "c", "eth0"), ipam.allocate(v6, "c", "eth0")
    assert (a4, a6) == ("10.244.0.2", "fd00:244::1")
    assert ipam.allocate(v6, "c", "eth0") == a6 and ipam.allocate(v4, "c", "eth0") == a4  # a retried ADD
    assert ipam.find_all("c", "eth0") == [a4, a6] and ipam.find("c", "eth0", 6) == a6
    # round robin per family: the IPv6 allocation did not restart the IPv4 one
    assert ipam.allocate(v4, "d", "eth0") == "10.244.0.3" and ipam.allocate(v6, "d", "eth0") == "fd00:244::2"
    assert open(tmp_path / "ipam/net/.last").read() == "10.244.0.3"
    assert open(tmp_path / "ipam/net/.last6").read() == "fd00:244::2"
    # a changed IPv6 range moves only the IPv6 address
    moved = ipam.allocate(Pool.of("fd00:245::/120"), "c", "eth0")
    assert moved == "fd00:245::1" and ipam.find_all("c", "eth0") == [a4, moved]
    assert ipam.release("c", "eth0", 6) == moved and ipam.find_all("c", "eth0") == [a4]
    assert ipam.release_all("d", "eth0") == ["10.244.0.3", "fd00:244::2"]
    assert ipam.release_all("d", "eth0") == []


def test_ipv6_exhaustion_is_reported_per_range(tmp_path):
    ipam, pool = IPAM(str(tmp_path), "net"), Pool.of("fd00:244::/126")
    assert [ipam.allocate(pool, f"c{i}", "eth0") for i in range(2)] == ["fd00:244::1", "fd00:244::2"]
    with pytest.raises(PoolExhausted, match=r"all 2 addresses of fd00:244::/126 are reserved"):
        ipam.allocate(pool, "c9", "eth0")


# ---- configuration ------------------------------------------------------------------------------------
BAD_RANGES = [
    ("two-ipv4", {"podCIDRs": ["10.1.0.0/24", "10.2.0.0/24"]}, "holds two IPv4 ranges"),
    ("two-ipv6", {"podCIDRs": ["fd00:1::/64", "fd00:2::/64"]}, "holds two IPv6 ranges"),
    ("three", {"podCIDRs": ["10.1.0.0/24", "fd00:1::/64", "10.2.0.0/24"]}, "must be a list of one or two CIDRs"),
    ("empty-list", {"podCIDRs": []}, "must be a list of one or two CIDRs"),
    ("not-a-list", {"podCIDRs": "10.1.0.0/24"}, "podCIDRs \"10.1.0.0/24\" must be a list"),
    ("v6-too-small", {"podCIDRs": ["10.1.0.0/24", "fd00::/127"]}, "podCIDRs[1] 'fd00::/127' is not an IPv4 or IPv6"),
    ("garbage", {"podCIDRs": [5]}, "podCIDRs[0] 5"),
    ("disagrees-with-podCIDR", {"podCIDR": "10.9.0.0/24", "podCIDRs": ["10.1.0.0/24"]}, "is not podCIDRs[0]"),
]


@pytest.fixture
def ns(tmp_path):
    s = Scratch(str(tmp_path / "data"))
    forwarding6(os.path.basename(s.node))
    try:
        yield s
    finally:
        s.close()


def forwarding6(netns_name: str) -> None:
    """net.ipv6.conf.all.forwarding of the node, as its administrator sets it (a dual-stack node's)."""
    subprocess.run(["ip", "netns", "exec", netns_name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], check=True)


@pytest.mark.parametrize("over,text", [r[1:] for r in BAD_RANGES], ids=[r[0] for r in BAD_RANGES])
def test_bad_ranges_are_refused_naming_the_field(ns, over, text):
    conf = {k: v for k, v in ns.conf(**over).items() if v is not None}
    if "podCIDR" not in over:
        conf.pop("podCIDR")
    rc, err = ns.call(env_for("ADD", netns=ns.netns()), conf)
    assert rc == 1 and err["code"] == 7 and text in err["msg"], err
    assert not os.path.exists(os.path.join(ns.data, "ipam"))  # refused before anything was touched


def test_agent_fills_in_the_nodes_ranges_unless_the_configuration_names_its_own():
    d = {"podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"], "mtu": 1400}
    assert json.loads(with_defaults(b'{"name": "x"}', d)) == {"name": "x", **d}
    assert json.loads(with_defaults(b'{"podCIDR": "10.9.0.0/24"}', d)) == {"podCIDR": "10.9.0.0/24", "mtu": 1400}
    assert json.loads(with_defaults(b'{"podCIDRs": ["fd00:9::/64"]}', d)) == {"podCIDRs": ["fd00:9::/64"], "mtu": 1400}
    assert node_pod_cidrs(("fd00:244:1::/64", "10.244.1.0/24", "10.244.2.0/24")) == ["fd00:244:1::/64", "10.244.1.0/24"]
    assert node_pod_cidrs(()) == []


def test_conflist_holds_one_range_per_family():
    doc = install.conflist(pod_cidrs=[CIDR, CIDR6], socket="/s")
    assert doc["plugins"] == [{"type": "bpflb-cni", "mtu": 1500, "podCIDRs": [CIDR, CIDR6], "agentSocket": "/s"}]
    assert "podCIDRs" not in install.conflist(pod_cidr=CIDR)["plugins"][0]  # a single-stack one is as before


# ---- the plugin called directly ---------------------------------------------------------------------
def dual(ns: Scratch, v6: str = CIDR6, **over) -> dict:
    conf = ns.conf(podCIDRs=["10.244.5.0/24", v6], **over)
    conf.pop("podCIDR")
    return conf


@pytest.mark.parametrize("order", ["v4-first", "v6-first"])
def test_both_addresses_are_reported_registered_and_released(ns, order):
    conf = dual(ns)
    if order == "v6-first":
        conf["podCIDRs"].reverse()
    sink, pod = FakeSink(), ns.netns()
    rc, res = ns.call(env_for("ADD", netns=pod), conf, sink)
    assert rc == 0, res
    got = {ipaddress.ip_interface(i["address"]).version: i for i in res["ips"]}
    assert [ipaddress.ip_interface(i["address"]).version for i in res["ips"]] == ([4, 6] if order == "v4-first" else [6, 4])
    ip4, ip6 = (got[v]["address"].split("/")[0] for v in (4, 6))
    assert got[4] == {"address": f"{ip4}/24", "gateway": "10.244.5.1", "interface": 1}
    assert got[6] == {"address": f"{ip6}/64", "gateway": GW6, "interface": 1} and ip6.startswith("fd00:244:7::")
    assert sorted(map(json.dumps, res["routes"])) == sorted(map(json.dumps, [
        {"dst": "0.0.0.0/0", "gw": "10.244.5.1"}, {"dst": "::/0", "gw": GW6}]))
    rec = json.load(open(os.path.join(ns.data, "endpoints", "c1:eth0.json")))
    assert sink.map == {ip4: (rec["hostIfindex"], res["interfaces"][1]["mac"]),
                        ip6: (rec["hostIfindex"], res["interfaces"][1]["mac"])}
    assert {e["ip"] for e in rec["ips"]} == {ip4, ip6}
    assert ns.call(env_for("CHECK", netns=pod), dict(conf, prevResult=res)) == (0, None)
    rc, err = ns.call(env_for("CHECK", netns=pod), dict(conf, prevResult=dict(res, ips=[got[4]])))
    assert rc == 1 and err["code"] == 100 and f"prevResult does not list {ip6}" in err["msg"], err
    assert ns.call(env_for("DEL", netns=pod), conf, sink) == (0, None)
    assert sink.map == {} and IPAM(ns.data, "bpflb").reservations() == []


def test_old_versions_give_each_address_its_family(ns):
    rc, res = ns.call(env_for("ADD", netns=ns.netns()), dual(ns, cniVersion="0.4.0"))
    assert rc == 0, res
    assert [i["version"] for i in res["ips"]] == ["4", "6"]


def test_ipv6_exhaustion_gives_the_ipv4_address_back(ns):
    conf = dual(ns, v6="fd00:244:9::/126")  # two IPv6 addresses, 253 IPv4 ones
    pods = [ns.netns() for _ in range(3)]
    for i in range(2):
        assert ns.call(env_for("ADD", cid=f"p{i}", netns=pods[i]), conf)[0] == 0
    sink = FakeSink()
    before = IPAM(ns.data, "bpflb").reservations()
    rc, err = ns.call(env_for("ADD", cid="p2", netns=pods[2]), conf, sink)
    assert rc == 1 and err["code"] == 11 and err["msg"] == "pod CIDR fd00:244:9::/126 is exhausted", err
    assert IPAM(ns.data, "bpflb").reservations() == before and sink.map == {}  # the IPv4 one was given back
    links = subprocess.run(["ip", "-n", os.path.basename(ns.node), "-o", "link"], capture_output=True, text=True).stdout
    assert netsetup.host_ifname("p2", "eth0") not in links


def test_a_failed_ipv6_registration_unregisters_the_ipv4_one(ns):
    class FailsOnV6(FakeSink):
        def added(self, ip, ifindex, mac):
            if ":" in ip:
                raise OSError(28, "No space left on device")
            super().added(ip, ifindex, mac)

    sink = FailsOnV6()
    rc, err = ns.call(env_for("ADD", netns=ns.netns()), dual(ns), sink)
    assert rc == 1 and err["code"] == 5 and "registering fd00:244:7::" in err["msg"], err
    assert sink.map == {} and IPAM(ns.data, "bpflb").reservations() == []


def test_an_ipv6_only_node(ns):
    conf = ns.conf(podCIDRs=[CIDR6])
    conf.pop("podCIDR")
    pod = ns.netns()
    rc, res = ns.call(env_for("ADD", netns=pod), conf)
    assert rc == 0, res
    assert [i["address"] for i in res["ips"]] == ["fd00:244:7::1/64"] and res["routes"] == [{"dst": "::/0", "gw": GW6}]
    out = subprocess.run(["ip", "-n", os.path.basename(pod), "-o", "addr", "show", "eth0"], capture_output=True,
                         text=True).stdout
    assert "inet " not in out and "fd00:244:7::1/128" in out
    assert ns.call(env_for("CHECK", netns=pod), conf) == (0, None)
    assert ns.call(env_for("DEL", netns=pod), conf) == (0, None)


def test_dropping_a_family_from_the_configuration_frees_its_address_on_a_retried_add(ns):
    pod = ns.netns()
    assert ns.call(env_for("ADD", netns=pod), dual(ns))[0] == 0
    rc, res = ns.call(env_for("ADD", netns=pod), ns.conf())  # the node became IPv4-only meanwhile
    assert rc == 0, res
    assert [r.ip for r in IPAM(ns.data, "bpflb").reservations()] == [res["ips"][0]["address"].split("/")[0]]


# ---- the real plugin through cnitool -----------------------------------------------------------------
@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    try:
        forwarding6(n.ns)
        n.install(pod_cidr=None, pod_cidrs=[CIDR, CIDR6])
        yield n
    finally:
        n.close()


def in_pod(node: Node, pod: str, *argv: str) -> subprocess.CompletedProcess:
    return node.in_ns(list(argv), ns=os.path.basename(pod))


def add(node: Node, pod: str) -> tuple[str, str, str]:
    r = node.cnitool("add", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    by = {ipaddress.ip_interface(i["address"]).version: i["address"].split("/")[0] for i in res["ips"]}
    assert all(i["interface"] == 1 for i in res["ips"]) and res["interfaces"][1]["name"] == "eth0"
    return by[4], by[6], res["interfaces"][0]["name"]


TCP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.bind((sys.argv[1], 9000)); s.listen(4); print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, peer = s.accept(); c.sendall(f"{peer[0]}\\n".encode()); c.close()
"""
TCP_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=3); print(s.makefile().readline().strip())
"""


def serve_tcp(node: Node, ns: str | None, ip: str, count: int) -> subprocess.Popen:
    target = os.path.basename(ns) if ns else node.ns
    p = subprocess.Popen(["ip", "netns", "exec", target, sys.executable, "-c", TCP_SERVER, ip, str(count)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_cnitool_makes_a_dual_stack_pod_that_talks_ipv6_to_the_node_and_to_another_pod(node):
    pod_a, pod_b = node.pod(), node.pod()
    a4, a6, host_a = add(node, pod_a)
    b4, b6, host_b = add(node, pod_b)
    assert a4.startswith("10.244.7.") and a6.startswith("fd00:244:7::") and a6 != b6

    # the pod's view: both addresses (the IPv6 one usable at once: not tentative), both default routes
    addrs = in_pod(node, pod_a, "ip", "-o", "addr", "show", "eth0").stdout
    line6 = next(l for l in addrs.splitlines() if f"inet6 {a6}/128" in l)
    assert f"inet {a4}/32" in addrs and "tentative" not in line6 and "dadfailed" not in line6
    assert [r.split()[:5] for r in in_pod(node, pod_a, "ip", "-4", "route").stdout.splitlines()
            if r.startswith("default")] == [["default", "via", GW, "dev", "eth0"]]
    assert [r.split()[:5] for r in in_pod(node, pod_a, "ip", "-6", "route").stdout.splitlines()
            if r.startswith("default")] == [["default", "via", GW6, "dev", "eth0"]]
    # the node's view: the gateway on the host veth, a /128 route to the pod through it
    assert f"inet6 {GW6}/64" in node.in_ns(["ip", "-6", "addr", "show", host_a]).stdout
    assert f"{a6} dev {host_a}" in node.in_ns(["ip", "-6", "route"]).stdout

    # ping over IPv6: pod -> its gateway, node -> pod, pod -> pod (forwarded by the node)
    assert in_pod(node, pod_a, "ping", "-6", "-c1", "-W2", f"{GW6}%eth0").returncode == 0
    assert node.in_ns(["ping", "-6", "-c1", "-W2", a6]).returncode == 0
    r = in_pod(node, pod_a, "ping", "-6", "-c1", "-W2", b6)
    assert r.returncode == 0, r.stdout + r.stderr
    # TCP over IPv6: node -> pod, and pod b -> pod a (the server sees b's own address: nothing rewrote it)
    server = serve_tcp(node, pod_a, a6, 2)
    try:
        r = node.in_ns([sys.executable, "-c", TCP_CLIENT, a6])
        assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr
        r = in_pod(node, pod_b, sys.executable, "-c", TCP_CLIENT, a6)
        assert r.returncode == 0 and r.stdout.strip() == b6, r.stdout + r.stderr
    finally:
        server.kill()
        server.wait()
    # and IPv4 still works as before, pod to pod
    assert in_pod(node, pod_a, "ping", "-c1", "-W2", b4).returncode == 0

    for pod in (pod_a, pod_b):
        r = node.cnitool("check", "bpflb", pod)
        assert r.returncode == 0, r.stdout + r.stderr
    for pod in (pod_a, pod_b):
        r = node.cnitool("del", "bpflb", pod)
        assert r.returncode == 0, r.stdout + r.stderr
    assert host_veths(node) == [] and reserved(node) == [] and records(node) == []
    routes6 = node.in_ns(["ip", "-6", "route"]).stdout
    assert a6 not in routes6 and b6 not in routes6
    assert "eth0" not in in_pod(node, pod_a, "ip", "-o", "link").stdout
    assert node.cnitool("del", "bpflb", pod_a).returncode == 0  # DEL is idempotent


@pytest.mark.parametrize("where,breakage,complaint", [
    ("pod", ["ip", "-6", "addr", "del", "{ip6}/128", "dev", "eth0"], "eth0 does not hold fd00:244:7::"),
    ("pod", ["ip", "-6", "route", "del", "default"], f"no IPv6 default route via {GW6}"),
    ("node", ["ip", "-6", "route", "del", "{ip6}/128"], "no route to fd00:244:7::"),
    ("node", ["ip", "-6", "addr", "del", f"{GW6}/64", "dev", "{host_if}"], f"does not hold the pods' IPv6 gateway"),
], ids=["v6-address-gone", "v6-default-route-gone", "v6-host-route-gone", "v6-gateway-gone"])
def test_check_reports_a_broken_ipv6_half(node, where, breakage, complaint):
    pod = node.pod()
    _, ip6, host_if = add(node, pod)
    argv = [a.format(ip6=ip6, host_if=host_if) for a in breakage]
    r = node.in_ns(argv, ns=os.path.basename(pod) if where == "pod" else None)
    assert r.returncode == 0, r.stderr
    r = node.cnitool("check", "bpflb", pod)
    assert r.returncode != 0 and complaint in r.stdout + r.stderr, r.stdout + r.stderr
    assert node.cnitool("del", "bpflb", pod).returncode == 0
    assert host_veths(node) == [] and reserved(node) == [] and records(node) == []
