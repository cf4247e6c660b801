"""A real node (lb/testing/node.py): kubelet + containerd + bpflb from `kubectl apply -k`, no kube-proxy.

About a minute: marked `node` (`pytest -m node` runs these alone, `-m 'not node'` leaves them out); `make
test` runs them with the rest. The tests share one node and run in file order; the last
stops it and checks that the machine is as it was.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from lb.settings import default_cgroup_root
from lb.testing import node as nodemod
from lb.testing.node import AGNHOST_IMAGE, CLUSTER_DOMAIN, CNI_BIN_DIR, CNI_CONF_DIR, Node

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]
NAME = "bpflb-node-test"


def machine_state() -> dict:
    """What the node may touch on the host, as comparable values."""
    # Other sessions make and remove their own namespaces and mounts meanwhile: compare what could be ours.
    ours = (str(nodemod.BASE_DIR), "/run/netns/cni-", f"/run/netns/{NAME}", "/var/lib/rancher", "/run/containerd",
            str(nodemod.BPF_PINS), "/var/lib/kubelet", "/var/log/pods")
    mounts = sorted(m for m in (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
                    if m.startswith(ours))
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return {
        "netns": sorted(n for n in netns if n.startswith((NAME, "cni-"))),
        "mounts": mounts,
        "sysctls": {k: nodemod._read_sysctl(k) for k in nodemod.KUBELET_SYSCTLS},
        "cgroups": [str(d) for d in nodemod._cgroup_dirs(NAME) if d.exists()],
        "pins": nodemod.BPF_PINS.exists(),
        "cni": [str(p) for p in (CNI_BIN_DIR, CNI_CONF_DIR) if p.exists()],
        "bpffs": nodemod._propagation("/sys/fs/bpf"),
        "host_paths": [str(p) for p in nodemod.HOST_PATHS if p.exists()],
        # bpflb's socket programs attach to the cgroup2 root: detached again once its pins are gone
        "root_cgroup_progs": subprocess.run(["bpftool", "cgroup", "show", default_cgroup_root()],
                                            capture_output=True, text=True).stdout,
    }


def bpflb_files() -> set[str]:
    return {str(p) for d in (nodemod.BPFLB_STATE, nodemod.BPFLB_RUN) if d.exists() for p in d.rglob("*")}


@pytest.fixture(scope="module")
def node():
    before = machine_state()
    files_before = bpflb_files()
    n = Node(name=NAME, node_ip="172.30.98.2", world_ip="172.30.98.1")
    t0 = time.monotonic()
    with n:
        n.start_seconds = time.monotonic() - t0
        n.machine_before = before
        n.bpflb_files_before = files_before
        yield n


def kubectl_json(node: Node, *args: str) -> dict:
    return json.loads(node.kubectl(*args, "-o", "json"))


def test_node_is_ready_without_kube_proxy(node):
    print(f"node start: {node.start_seconds:.0f} s ({', '.join(f'{s} {t:.0f}s' for s, t in node.timings)})")
    n = kubectl_json(node, "get", "node", node.name)
    ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert n["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
    assert not n["status"]["nodeInfo"].get("kubeProxyVersion")
    pods = kubectl_json(node, "get", "pods", "-A")["items"]
    assert not [p["metadata"]["name"] for p in pods if "kube-proxy" in p["metadata"]["name"]]
    # No kube-proxy process, and none of its chains in the node's tables (the kubelet's own are there).
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in nodemod._pids_in_netns(
        nodemod._ns_inode(node.netns_path))]
    assert not [c for c in cmdlines if b"kube-proxy" in c]
    save = node.in_node(["iptables-save"], check=True).stdout
    assert "KUBE-KUBELET-CANARY" in save
    assert not re.search(r"^:KUBE-(SERVICES|NODEPORTS|POSTROUTING|PROXY-CANARY)", save, re.M)


def test_bpflb_pod_runs_and_installed_its_cni(node):
    pods = kubectl_json(node, "-n", "bpflb-system", "get", "pods")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    assert all(c["ready"] for c in pods[0]["status"]["containerStatuses"])
    conflist = json.loads((CNI_CONF_DIR / "05-bpflb.conflist").read_text())
    assert conflist["plugins"][0]["type"] == "bpflb-cni"
    assert os.access(CNI_BIN_DIR / "bpflb-cni", os.X_OK)
    logs = node.kubectl("-n", "bpflb-system", "logs", pods[0]["metadata"]["name"])
    assert "initial sync complete" in logs


def test_service_with_agnhost_backends_answers_and_resolves(node):
    ns = "bpflb-node-test"
    node.kubectl("create", "namespace", ns)
    node.kubectl("-n", ns, "create", "deployment", "web", f"--image={AGNHOST_IMAGE}", "--replicas=2",
                 "--port=8080", "--", "/agnhost", "netexec", "--http-port=8080")
    node.kubectl("-n", ns, "expose", "deployment", "web", "--port=80", "--target-port=8080")
    node.kubectl("-n", ns, "rollout", "status", "deployment/web", "--timeout=180s")
    pod_cidr = kubectl_json(node, "get", "node", node.name)["spec"]["podCIDR"]
    prefix = pod_cidr.rsplit(".", 2)[0] + "."
    backends = {p["metadata"]["name"]: p["status"]["podIP"]
                for p in kubectl_json(node, "-n", ns, "get", "pods", "-l", "app=web")["items"]}
    assert len(backends) == 2 and all(ip.startswith(prefix) for ip in backends.values()), (pod_cidr, backends)
    # Each pod IP came from bpflb's CNI: the agent's endpoint records hold it.
    records = [p.read_text() for p in (nodemod.BPFLB_STATE / "endpoints").glob("*.json")]
    assert all(any(f'"{ip}' in r for r in records) for ip in backends.values()), records

    cluster_ip = node.kubectl("-n", ns, "get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}")
    script = (f"nslookup web.{ns}.svc.{CLUSTER_DOMAIN}; "
              f"for i in $(seq 40); do curl -s --max-time 3 http://web.{ns}.svc.{CLUSTER_DOMAIN}/hostname; echo; done")
    node.kubectl("-n", ns, "run", "client", f"--image={AGNHOST_IMAGE}", "--restart=Never", "--command", "--",
                 "sh", "-c", script)
    deadline = time.monotonic() + 180
    while node.kubectl("-n", ns, "get", "pod", "client", "-o", "jsonpath={.status.phase}") not in ("Succeeded", "Failed"):
        assert time.monotonic() < deadline, "client pod did not finish"
        time.sleep(1)
    out = node.kubectl("-n", ns, "logs", "client")
    assert node.kubectl("-n", ns, "get", "pod", "client", "-o", "jsonpath={.status.phase}") == "Succeeded", out
    assert f"Address: {cluster_ip}" in out or f"Address 1: {cluster_ip}" in out, out
    answers = [line for line in out.splitlines() if line in backends]
    assert len(answers) == 40 and set(answers) == set(backends), out


def test_stop_leaves_the_machine_as_it_was(node):
    t0 = time.monotonic()
    node.stop()
    print(f"node stop: {time.monotonic() - t0:.1f} s")
    after = machine_state()
    before = node.machine_before
    assert after == before
    assert not nodemod._pids_in_cgroups(nodemod._cgroup_dirs(NAME))
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_node_process(p)]
    assert not (nodemod.BASE_DIR / NAME).exists()
    # The agent's host directories are shared with whatever else runs here: all that was there stays, and
    # nothing of this node's (its pod addresses, its socket, its records) is left.
    files = bpflb_files()
    assert node.bpflb_files_before <= files
    assert not [f for f in files - node.bpflb_files_before if "10.42." in f or f.endswith(("cni.sock", "del-queue"))]


def _is_node_process(pid: str) -> bool:
    try:
        return str(nodemod.BASE_DIR / NAME).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
