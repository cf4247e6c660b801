"""Simulated nodes (a netns each, joined by a bridge in its own netns), each with its agent in its own
cgroup: pod to pod across nodes in overlay and direct mode, pod to a ClusterIP whose backend is on
another node, and a removed node's routes and tunnel entries going away."""
from __future__ import annotations

import pytest

from conftest import make_service, make_slice, wait_for, write_manifests
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
