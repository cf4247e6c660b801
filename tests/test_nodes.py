"""Simulated nodes (a netns each, joined by a bridge in its own netns), each with its agent in its own
cgroup: pod to pod across nodes in overlay and direct mode, pod to a ClusterIP whose backend is on
another node, and a removed node's routes and tunnel entries going away."""
from __future__ import annotations

import pytest

import json
import os

from conftest import make_service, make_slice, wait_for, write_manifests
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
