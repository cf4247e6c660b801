"""Simulated nodes (a netns each, joined by a bridge in its own netns), each with its agent in its own
cgroup: pod to pod across nodes in overlay and direct mode, pod to a ClusterIP whose backend is on
another node, and a removed node's routes and tunnel entries going away."""
from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

from conftest import ROOT, make_service, make_slice, wait_for, write_manifests
from lb.maps.endpoints import PinnedEndpointMap
from lb.testing.apiserver import components
from lb.testing.cluster import Cluster, node_ip, node_object, pod_ip

PORT = 9000


@pytest.fixture(params=["overlay", "direct"])
def cluster(request, tmp_path):
    with Cluster(nodes=3) as c:
        c.mode = request.param
        c.folder = tmp_path
        yield c


def start(c: Cluster, nodes=(1, 2, 3), objs=()):
    write_manifests(c.folder, "nodes.json", [node_object(n, c.node_name(n)) for n in nodes] + list(objs))
    for n in range(1, c.nodes + 1):
        c.add_pod(n, 1)
        c.agent(n, str(c.folder), c.mode)
    for n in range(1, c.nodes + 1):
        wait_for(lambda: any("initial sync complete" in l for l in c.logs[n]), 30, f"agent {n} ready")
        wait_for(lambda: len(routes(c, n)) == 2, 10, f"node {n} routes")


def routes(c: Cluster, n: int) -> list[str]:
    return [l for l in c.in_node(n, ["ip", "-4", "route", "show", "proto", "193"]).splitlines() if l.strip()]


def test_pod_to_pod_across_nodes(cluster):
    start(cluster)
    cluster.server(2, 1, PORT)
    cluster.server(3, 1, PORT)
    for target in (2, 3):
        r = cluster.run_client(1, 1, f"{pod_ip(target, 1)}:{PORT}", "--count", "20")
        assert r["errors"] == {} and r["answered"] == {f"{pod_ip(target, 1)}:{PORT}": 20}
    if cluster.mode == "overlay":
        fdb = cluster.in_node(1, ["bridge", "fdb", "show", "dev", "bpflb_vxlan"])
        assert f"dst {node_ip(2)}" in fdb and f"dst {node_ip(3)}" in fdb
        assert all("dev bpflb_vxlan" in r for r in routes(cluster, 1))
    else:
        got = {tuple(r.split()[:5]) for r in routes(cluster, 1)}
        assert got == {("10.244.2.0/24", "via", node_ip(2), "dev", "eth0"), ("10.244.3.0/24", "via", node_ip(3), "dev", "eth0")}


def test_pod_to_cluster_ip_with_a_remote_backend(cluster):
    svc = make_service("demo", "web", lambda s: s["spec"]["ports"][0].update(targetPort=PORT))
    es = make_slice("demo", "web-1", "web", [pod_ip(2, 1), pod_ip(3, 1)], port=PORT, node="node2")
    es["endpoints"][1]["nodeName"] = "node3"
    start(cluster, objs=[svc, es])
    cluster.server(2, 1, PORT)
    cluster.server(3, 1, PORT)
    r = cluster.run_client(1, 1, "10.96.0.10:80", "--count", "60")
    assert r["errors"] == {}
    assert set(r["answered"]) == {f"{pod_ip(2, 1)}:{PORT}", f"{pod_ip(3, 1)}:{PORT}"}
    assert r["peers"] == {"10.96.0.10:80": 60}


def test_removed_node_takes_its_routes_and_tunnel_entries(cluster):
    start(cluster)
    write_manifests(cluster.folder, "nodes.json", [node_object(n, cluster.node_name(n)) for n in (1, 2)])
    wait_for(lambda: len(routes(cluster, 1)) == 1, 10, "node 3's route to go")
    assert "10.244.3.0/24" not in "\n".join(routes(cluster, 1))
    if cluster.mode == "overlay":
        fdb = cluster.in_node(1, ["bridge", "fdb", "show", "dev", "bpflb_vxlan"])
        assert node_ip(3) not in fdb and node_ip(2) in fdb
        assert "10.244.3.0" not in cluster.in_node(1, ["ip", "neigh", "show", "dev", "bpflb_vxlan"])


def test_pods_made_by_the_bundled_cni_plugin_reach_each_other_across_nodes(tmp_path):
    """Each node's agent serves the plugin (pod CIDR from its Node object) and installs the launcher and
    the conflist; the real CNI library (cnitool) adds a pod on each node; the pods talk over the overlay."""
    with Cluster(nodes=2) as c:
        write_manifests(tmp_path, "nodes.json", [node_object(n, c.node_name(n)) for n in (1, 2)])
        dirs = {n: tmp_path / f"n{n}" for n in (1, 2)}
        for n, d in dirs.items():
            c.agent(n, str(tmp_path), "overlay", ("--cni-socket", str(d / "cni.sock"), "--cni-bin-dir", str(d / "bin"),
                                                  "--cni-conf-dir", str(d / "net.d")))
        ips, pods = {}, {}
        for n, d in dirs.items():
            wait_for(lambda: any("initial sync complete" in l for l in c.logs[n]), 30, f"agent {n}")
            conflist = d / "net.d" / "05-bpflb.conflist"
            wait_for(conflist.exists, 10, "conflist installed")
            conf = json.loads(conflist.read_text())
            assert conf["plugins"][0]["mtu"] == 1450 and "podCIDR" not in conf["plugins"][0]
            conf["plugins"][0]["dataDir"] = str(d / "data")  # IPAM state inside the test's folder
            conflist.write_text(json.dumps(conf))
            pod = c.add_netns(n, "cni")
            env = dict(os.environ, NETCONFPATH=str(d / "net.d"), CNI_PATH=str(d / "bin"), BPFLB_CNI_SOCKET=str(d / "cni.sock"))
            r = c.in_node_run(n, [components()["CNITOOL"], "add", "bpflb", f"/run/netns/{pod}"], env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            result = json.loads(r.stdout)
            ips[n] = result["ips"][0]["address"].split("/")[0]
            assert ips[n].startswith(f"10.244.{n}.")  # the Node's podCIDR, filled in by the agent
            # registered for the datapath: pod IP -> host veth ifindex and the pod's MAC
            host_if, pod_mac = result["interfaces"][0]["name"], result["interfaces"][1]["mac"]
            ifindex = int(c.in_node(n, ["ip", "-o", "link", "show", host_if]).split(":")[0])
            assert PinnedEndpointMap(c.bpf_root(n)).dump() == {ips[n]: (ifindex, pod_mac.lower())}
            pods[n] = (pod, env)
        c.server(2, "cni", PORT, ip=ips[2])
        r = c.run_client(1, "cni", f"{ips[2]}:{PORT}", "--count", "20")
        assert r["errors"] == {} and r["answered"] == {f"{ips[2]}:{PORT}": 20}
        for n, (pod, env) in pods.items():  # DEL through the runtime library too (it also clears its cache)
            r = c.in_node_run(n, [components()["CNITOOL"], "del", "bpflb", f"/run/netns/{pod}"], env=env)
            assert r.returncode == 0, r.stderr
            assert PinnedEndpointMap(c.bpf_root(n)).dump() == {}


# ---- direct routing on a node whose uplink is not eth0, as a non-privileged container runs it ----------

APPLY_READ_ONLY_PROC_SYS = r"""
import errno, json, sys
from lb import nodenet
from lb.objects import parse_node
try:  # what kubelet gives a non-privileged container: /proc/sys read-only
    open("/proc/sys/net/ipv4/ip_forward", "w").write("1")
    sys.exit("/proc/sys is writable: the test bed is wrong")
except OSError as e:
    assert e.errno == errno.EROFS, e
nodes = {o["metadata"]["name"]: parse_node(o) for o in json.loads(sys.argv[2])}
plan = nodenet.plan(sys.argv[1], nodes, "direct")
print(json.dumps(nodenet.apply(plan)))
"""


@pytest.fixture
def two_nodes_on_ens():
    """Two node namespaces joined by a veth pair named as a VM's NICs are (ens3 / enp1s0), not eth0, each
    with one pod behind a host veth whose forwarding is on (the CNI plugin's part); net.ipv4.ip_forward
    stays 0, as in any new namespace."""
    import uuid

    from pyroute2 import IPRoute, netns

    tag = uuid.uuid4().hex[:5]
    ns = {n: f"bl{tag}d{n}" for n in (1, 2)}
    pods = {n: f"bl{tag}d{n}p" for n in (1, 2)}
    uplinks = {1: "ens3", 2: "enp1s0"}
    try:
        for name in (*ns.values(), *pods.values()):
            netns.create(name)
        with IPRoute(netns=ns[1]) as ipr:
            ipr.link("add", ifname=uplinks[1], kind="veth", peer={"ifname": uplinks[2], "net_ns_fd": ns[2]})
        for n in (1, 2):
            with IPRoute(netns=ns[n]) as ipr:
                up = ipr.link_lookup(ifname=uplinks[n])[0]
                ipr.addr("add", index=up, address=node_ip(n), prefixlen=24)
                ipr.link("set", index=up, state="up")
                ipr.link("add", ifname="p1", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pods[n]})
                host = ipr.link_lookup(ifname="p1")[0]
                ipr.addr("add", index=host, address=f"10.244.{n}.1", prefixlen=24)
                ipr.link("set", index=host, state="up")
            subprocess.run(["nsenter", f"--net=/run/netns/{ns[n]}", "sysctl", "-qw", "net.ipv4.conf.p1.forwarding=1"],
                           check=True)
            with IPRoute(netns=pods[n]) as ipr:
                eth = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth, address=pod_ip(n, 1), prefixlen=24)
                ipr.link("set", index=eth, state="up")
                ipr.route("add", dst="10.244.0.0/16", gateway=f"10.244.{n}.1")  # no route out of the bed
        yield ns, pods, uplinks
    finally:
        for name in (*pods.values(), *ns.values()):
            try:
                netns.remove(name)
            except OSError:
                pass


def sysctl_in(ns: str, key: str) -> str:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-n", key],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_direct_routing_finds_the_uplink_from_the_node_ip_and_needs_no_proc_sys_write(two_nodes_on_ens):
    ns, pods, uplinks = two_nodes_on_ens
    objs = json.dumps([node_object(n, f"node{n}") for n in (1, 2)])
    for n in (1, 2):
        # apply() in the node's namespace, in a mount namespace whose /proc/sys is read-only
        script = ("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
                  f'exec {sys.executable} -c "$0" "$@"')
        r = subprocess.run(["nsenter", f"--net=/run/netns/{ns[n]}", "unshare", "--mount", "--propagation", "private",
                            "sh", "-c", script, APPLY_READ_ONLY_PROC_SYS, f"node{n}", objs],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stdout + r.stderr
        other = 3 - n
        assert json.loads(r.stdout) == [f"{uplinks[n]} forwarding=1",
                                        f"route 10.244.{other}.0/24 via {node_ip(other)} dev {uplinks[n]}"]
        got = subprocess.run(["nsenter", f"--net=/run/netns/{ns[n]}", "ip", "-4", "route", "show", "proto", "193"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert got[:5] == [f"10.244.{other}.0/24", "via", node_ip(other), "dev", uplinks[n]]
        # set per device over netlink; the global switch was never written
        assert sysctl_in(ns[n], f"net.ipv4.conf.{uplinks[n]}.forwarding") == "1"
        assert sysctl_in(ns[n], "net.ipv4.ip_forward") == "0"
    # forwarded by both nodes, each deciding on its input device's forwarding flag alone
    r = subprocess.run(["ip", "netns", "exec", pods[1], "ping", "-c", "3", "-i", "0.2", "-W", "2", pod_ip(2, 1)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr


def test_plan_names_no_device_for_direct_routes_unless_told():
    from lb import nodenet
    from lb.objects import parse_node

    nodes = {f"node{n}": parse_node(node_object(n, f"node{n}")) for n in (1, 2)}
    assert {r.dev for r in nodenet.plan("node1", nodes, "direct").routes} == {None}
    assert {r.dev for r in nodenet.plan("node1", nodes, "direct", uplink="bond0").routes} == {"bond0"}


@pytest.mark.parametrize("cidr, why", [
    pytest.param("0.0.0.0/0", "broader than /8", id="default route"),
    pytest.param("10.0.0.0/7", "broader than /8", id="near-default"),
    pytest.param("10.244.1.128/25", "overlaps 10.244.1.0/24 of Node node1", id="inside this node's own pod CIDR"),
    pytest.param("192.168.50.0/24", "contains the node address 192.168.50.1", id="the node network"),
    pytest.param("127.0.0.0/8", "not a pod network", id="loopback"),
    pytest.param("169.254.0.0/16", "not a pod network", id="link-local"),
    pytest.param("10.244.2.0/23", "overlaps 10.244.2.0/24 of Node node2", id="shadows another node's pods"),
])
@pytest.mark.parametrize("mode", ["overlay", "direct"])
def test_a_hostile_pod_cidr_never_becomes_a_route(cidr, why, mode):
    from lb.nodenet import plan
    from lb.objects import parse_node
    from lb.testing.cluster import node_object

    bad = node_object(9, "node9")
    bad["spec"].update(podCIDR=cidr, podCIDRs=[cidr])
    nodes = {n.name: n for n in map(parse_node, (node_object(1, "node1"), node_object(2, "node2"), bad))}
    p = plan("node1", nodes, mode)
    assert {r.dst for r in p.routes} == {"10.244.2.0/24"}  # node2 still routed, node9 not at all
    assert not any(ip == "192.168.50.9" for _, ip in p.fdb)
    assert any(f"Node node9 skipped: podCIDR" in pr and why in pr for pr in p.problems), p.problems


# ---- IPv6 pod routes (dual-stack Nodes), planned: pure, no kernel ---------------------------------------
def dual_node(n: int, mutate=None) -> dict:
    """node_object(n) made dual-stack: pod CIDRs 10.244.N.0/24 and fd00:244:N::/64, InternalIPs
    192.168.50.N and fd00:50::N."""
    from lb.testing.cluster import node_ip6

    obj = node_object(n, f"node{n}")
    obj["spec"]["podCIDRs"] = [f"10.244.{n}.0/24", f"fd00:244:{n:x}::/64"]
    obj["status"]["addresses"].insert(1, {"type": "InternalIP", "address": node_ip6(n)})
    if mutate:
        mutate(obj)
    return obj


def _addresses(*addrs):
    return lambda o: o["status"].update(addresses=[{"type": t, "address": a} for t, a in addrs])


def _cidrs(*cidrs):
    return lambda o: o["spec"].update(podCIDR=cidrs[0], podCIDRs=list(cidrs))


@pytest.mark.parametrize("mode, node2, routes, problem", [
    pytest.param("direct", None, {("10.244.2.0/24", "192.168.50.2"), ("fd00:244:2::/64", "fd00:50::2")}, None,
                 id="dual-stack: a route per family"),
    pytest.param("direct", _cidrs("fd00:244:2::/64", "10.244.2.0/24"),
                 {("10.244.2.0/24", "192.168.50.2"), ("fd00:244:2::/64", "fd00:50::2")}, None,
                 id="IPv6 range listed first"),
    pytest.param("direct", _addresses(("InternalIP", "192.168.50.2")), {("10.244.2.0/24", "192.168.50.2")},
                 "Node node2: IPv6 podCIDR fd00:244:2::/64 not routed: the Node has no IPv6 address",
                 id="no IPv6 address: IPv4 only, said so"),
    pytest.param("direct", _addresses(("InternalIP", "192.168.50.2"), ("ExternalIP", "fd00:50::2")),
                 {("10.244.2.0/24", "192.168.50.2"), ("fd00:244:2::/64", "fd00:50::2")}, None,
                 id="IPv6 ExternalIP when there is no IPv6 InternalIP"),
    pytest.param("direct", _cidrs("10.244.2.0/24"), {("10.244.2.0/24", "192.168.50.2")}, None,
                 id="single-stack IPv4 node: as before"),
    pytest.param("direct", _cidrs("fd00:244:2::/64"), {("fd00:244:2::/64", "fd00:50::2")}, None,
                 id="IPv6-only node: no IPv4 complaint"),
    pytest.param("direct", _cidrs("10.244.2.0/24", "fd00:244:1::/64"), {("10.244.2.0/24", "192.168.50.2")},
                 "IPv6 podCIDR fd00:244:1::/64 not routed: it overlaps fd00:244:1::/64 of Node node1",
                 id="IPv6 range shadowing this node's own"),
    pytest.param("direct", _cidrs("10.244.2.0/24", "fd00:50::/64"), {("10.244.2.0/24", "192.168.50.2")},
                 "contains the node address fd00:50::1", id="IPv6 range over the node network"),
    pytest.param("direct", _cidrs("10.244.2.0/24", "::/0"), {("10.244.2.0/24", "192.168.50.2")},
                 "is broader than /32", id="IPv6 default route"),
    pytest.param("direct", _cidrs("10.244.2.0/24", "fe80::/64"), {("10.244.2.0/24", "192.168.50.2")},
                 "overlaps fe80::/10, which is not a pod network", id="IPv6 link-local"),
    pytest.param("overlay", None, {("10.244.2.0/24", "10.244.2.0"), ("fd00:244:2::/64", "fd00:244:2::")}, None,
                 id="overlay: both families in the IPv4 tunnel, via each range's first address"),
    pytest.param("overlay", _cidrs("fd00:244:2::/64"), {("fd00:244:2::/64", "fd00:244:2::")}, None,
                 id="overlay: an IPv6-only range still rides the IPv4 tunnel"),
    pytest.param("overlay", _addresses(("InternalIP", "fd00:50::2")), set(),
                 "IPv6 podCIDR fd00:244:2::/64 not routed: the Node has no IPv4 address (the tunnel's endpoint)",
                 id="overlay: no IPv4 address, no tunnel: said so"),
    pytest.param("overlay", _cidrs("10.244.2.0/24", "fe80::/64"), {("10.244.2.0/24", "10.244.2.0")},
                 "overlaps fe80::/10, which is not a pod network", id="overlay: refused as in direct mode"),
])
def test_ipv6_pod_routes_are_planned(mode, node2, routes, problem):
    from lb import nodenet
    from lb.objects import parse_node

    nodes = {n.name: n for n in map(parse_node, (dual_node(1), dual_node(2, node2)))}
    p = nodenet.plan("node1", nodes, mode)
    assert {(r.dst, r.gateway) for r in p.routes} == routes
    assert all(r.dev == (nodenet.VXLAN_DEV if mode == "overlay" else None) for r in p.routes)
    if problem is None:
        assert p.problems == ()
    else:
        assert any(problem in pr for pr in p.problems), p.problems
    if mode == "overlay":  # each routed range's gateway has the remote VTEP MAC, which the FDB sends to node 2
        assert p.neighbours == {(r.gateway, nodenet.vtep_mac("192.168.50.2")) for r in p.routes}
        assert p.fdb == ({(nodenet.vtep_mac("192.168.50.2"), "192.168.50.2")} if p.routes else set())
        assert (p.vtep_addr, p.vtep_addr6) == ("10.244.1.0", "fd00:244:1::")


APPLY = r"""
import json, sys
from lb import nodenet
from lb.objects import parse_node
nodes = {o["metadata"]["name"]: parse_node(o) for o in json.loads(sys.argv[2])}
print(json.dumps(nodenet.apply(nodenet.plan(sys.argv[1], nodes, sys.argv[3] if len(sys.argv) > 3 else "direct"))))
"""


def test_direct_routing_installs_and_prunes_ipv6_pod_routes(two_nodes_on_ens):
    """apply() of a dual-stack plan in a real namespace: the IPv6 pod CIDR route via the other node's IPv6
    address on the uplink carries traffic (to an address of node 2's pod range, held on its lo), and goes
    when the Node loses its IPv6 range; the IPv4 route stays."""
    from lb.testing.cluster import node_ip6

    ns, _, uplinks = two_nodes_on_ens
    for n in (1, 2):
        subprocess.run(["ip", "-n", ns[n], "addr", "add", f"{node_ip6(n)}/64", "dev", uplinks[n], "nodad"], check=True)
    subprocess.run(["ip", "-n", ns[2], "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", ns[2], "addr", "add", "fd00:244:2::5/128", "dev", "lo"], check=True)

    def apply(objs) -> list[str]:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{ns[1]}", sys.executable, "-c", APPLY, "node1",
                            json.dumps(objs)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def routes6() -> list[str]:
        return subprocess.run(["ip", "-n", ns[1], "-6", "route", "show", "proto", "193"], capture_output=True,
                              text=True, check=True).stdout.split()

    assert f"route fd00:244:2::/64 via {node_ip6(2)} dev {uplinks[1]}" in apply([dual_node(1), dual_node(2)])
    assert routes6()[:5] == ["fd00:244:2::/64", "via", node_ip6(2), "dev", uplinks[1]]
    r = subprocess.run(["ip", "netns", "exec", ns[1], "ping", "-6", "-c1", "-W2", "fd00:244:2::5"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    changes = apply([dual_node(1), dual_node(2, _cidrs("10.244.2.0/24"))])
    assert changes == ["route fd00:244:2::/64 removed"] and routes6() == []
    assert apply([dual_node(1), dual_node(2, _cidrs("10.244.2.0/24"))]) == []  # idempotent


def test_overlay_carries_ipv6_pod_traffic_in_the_ipv4_tunnel(two_nodes_on_ens):
    """apply() of a dual-stack overlay plan on both nodes (no IPv6 address on their uplinks: IPv4 only
    between them): bpflb_vxlan holds each node's first IPv6 range address, the other node's range is
    routed through the tunnel, and node 1 pings an address of node 2's range (on its lo) and gets the
    answer; the route and the neighbour entry go with the range, and a repeat apply changes nothing."""
    ns, _, _ = two_nodes_on_ens
    subprocess.run(["ip", "-n", ns[2], "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", ns[2], "addr", "add", "fd00:244:2::5/128", "dev", "lo"], check=True)

    def apply(n: int, objs) -> list[str]:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{ns[n]}", sys.executable, "-c", APPLY, f"node{n}",
                            json.dumps(objs), "overlay"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    from lb import nodenet

    both = [dual_node(1), dual_node(2)]
    changes = apply(1, both)
    assert {f"{nodenet.VXLAN_DEV} address fd00:244:1::/128", f"route fd00:244:2::/64 via fd00:244:2:: dev {nodenet.VXLAN_DEV}",
            f"neigh fd00:244:2:: {nodenet.vtep_mac('192.168.50.2')}"} <= set(changes), changes
    apply(2, both)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns[1]}", "ping", "-6", "-c1", "-W2", "fd00:244:2::5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    v4_only = [dual_node(1), dual_node(2, _cidrs("10.244.2.0/24"))]
    assert sorted(apply(1, v4_only)) == ["neigh fd00:244:2:: removed", "route fd00:244:2::/64 removed"]
    assert apply(1, v4_only) == []
