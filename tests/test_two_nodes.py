"""Two real nodes on one machine (lb/testing/node.py, Node(nodes=2)): the second runs only containerd and a
kubelet, and each node's bpflb agent serves its own node and no other.

Each node lives in namespaces of its own (network, mount, cgroup, UTS): its agent pins into a bpffs of the
node's and attaches to the node's cgroup subtree, so node 1's programs never see node 2's pods. Pods on one
node reach a Service whose backends are on the other over bpflb's overlay. The last test stops both and
checks that the machine is as it was. About two minutes: marked `node` like tests/test_node.py.
"""
from __future__ import annotations

import ipaddress
import json
import time

import pytest

from lb.testing.node import AGNHOST_IMAGE, CLUSTER_DOMAIN, Node
from test_node import agent_pids, assert_agent_has_its_own_bpffs_and_cgroup, machine_state

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]
NAME = "bpflb-2node-test"


@pytest.fixture(scope="module")
def nodes():
    before = machine_state(NAME)
    n = Node(name=NAME, node_ip="172.30.97.2", world_ip="172.30.97.1", nodes=2)
    t0 = time.monotonic()
    with n:
        n.start_seconds = time.monotonic() - t0
        n.machine_before = before
        yield n


def test_both_nodes_ready_each_with_its_own_pod_cidr(nodes):
    print(f"two nodes start: {nodes.start_seconds:.0f} s ({', '.join(f'{s} {t:.0f}s' for s, t in nodes.timings)})")
    items = json.loads(nodes.kubectl("get", "nodes", "-o", "json"))["items"]
    got = {n["metadata"]["name"]: (n["spec"]["podCIDR"], {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"],
                                   [a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"])
           for n in items}
    # The controller-manager hands out the CIDRs in the order the kubelets register.
    assert {name: (ready, ips) for name, (_, ready, ips) in got.items()} == {NAME: ("True", ["172.30.97.2"]),
                                                                            f"{NAME}-2": ("True", ["172.30.97.3"])}
    assert sorted(cidr for cidr, _, _ in got.values()) == ["10.42.0.0/24", "10.42.1.0/24"]
    pods = json.loads(nodes.kubectl("-n", "bpflb-system", "get", "pods", "-o", "json"))["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods if p["status"]["phase"] == "Running") == [NAME, f"{NAME}-2"]


def test_each_agent_attached_to_its_own_node_only(nodes):
    for name in nodes.node_names:
        assert_agent_has_its_own_bpffs_and_cgroup(name)
    # Two agents, two bpffs: neither pinned into the other's, nor into the machine's.
    devices = set()
    for name in nodes.node_names:
        (agent,) = agent_pids(name)
        devices.add(open(f"/proc/{agent}/mountinfo").read().split(" /sys/fs/bpf ")[0].split()[-2])
    assert len(devices) == 2
    assert machine_state(NAME)["root_cgroup_progs"] == nodes.machine_before["root_cgroup_progs"]
    # Each node's hostname is its name (what its hostNetwork pods report).
    for i, name in enumerate(nodes.node_names):
        assert nodes.in_node(["hostname"], check=True, host=i).stdout.strip() == name


def test_pod_on_one_node_reaches_a_service_on_the_other(nodes):
    ns = "bpflb-2node-test"
    first, second = nodes.node_names
    nodes.kubectl("create", "namespace", ns)
    nodes.kubectl("-n", ns, "run", "web", f"--image={AGNHOST_IMAGE}", "--labels=app=web", "--port=8080",
                  f"--overrides={json.dumps({'spec': {'nodeName': first}})}", "--", "netexec", "--http-port=8080")
    nodes.kubectl("-n", ns, "expose", "pod", "web", "--port=80", "--target-port=8080")
    nodes.kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/web", "--timeout=180s")
    script = (f"for i in $(seq 10); do curl -s --max-time 3 http://web.{ns}.svc.{CLUSTER_DOMAIN}/hostname; echo; "
              f"curl -s --max-time 3 http://web.{ns}.svc.{CLUSTER_DOMAIN}/clientip; echo; done")
    nodes.kubectl("-n", ns, "run", "client", f"--image={AGNHOST_IMAGE}", "--restart=Never",
                  f"--overrides={json.dumps({'spec': {'nodeName': second}})}", "--command", "--", "sh", "-c", script)
    deadline = time.monotonic() + 180
    while nodes.kubectl("-n", ns, "get", "pod", "client", "-o", "jsonpath={.status.phase}") not in ("Succeeded", "Failed"):
        assert time.monotonic() < deadline, "client pod did not finish"
        time.sleep(1)
    out = nodes.kubectl("-n", ns, "logs", "client").split()
    client_ip = nodes.kubectl("-n", ns, "get", "pod", "client", "-o", "jsonpath={.status.podIP}")
    second_cidr = nodes.kubectl("get", "node", second, "-o", "jsonpath={.spec.podCIDR}")
    assert ipaddress.ip_address(client_ip) in ipaddress.ip_network(second_cidr)
    # The backend on the first node answered every time and saw the client pod's own address.
    assert out[0::2] == ["web"] * 10, out
    assert [a.rsplit(":", 1)[0] for a in out[1::2]] == [client_ip] * 10, out


def test_stop_leaves_the_machine_as_it_was(nodes):
    nodes.stop()
    print(f"two nodes stop: {dict(nodes.timings)['stop']:.1f} s")
    assert machine_state(NAME) == nodes.machine_before
