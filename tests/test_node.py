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
MACHINE_PINS = Path("/sys/fs/bpf/bpflb")  # the DaemonSet's --bpf-root, were it the machine's bpffs


def machine_state(name: str = NAME) -> dict:
    """What the node (or nodes: NAME, NAME-2...) may touch on the host, as comparable values."""
    # Other sessions make and remove their own namespaces and mounts meanwhile: compare what could be ours.
    ours = (str(nodemod.BASE_DIR), "/run/netns/cni-", f"/run/netns/{name}", "/var/lib/rancher", "/run/containerd",
            str(MACHINE_PINS), "/var/lib/kubelet", "/var/log/pods")
    mounts = sorted(m for m in (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
                    if m.startswith(ours))
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return {
        "netns": sorted(n for n in netns if n.startswith((name, "cni-"))),
        "mounts": mounts,
        "sysctls": {k: nodemod._read_sysctl(k) for k in nodemod.KUBELET_SYSCTLS},
        "cgroups": sorted(str(p) for d in nodemod._cgroup_dirs(name) for p in d.parent.glob(f"{name}*")),
        "pins": MACHINE_PINS.exists(),
        "cni": [str(p) for p in (CNI_BIN_DIR, CNI_CONF_DIR) if p.exists()],
        "bpffs": nodemod._propagation("/sys/fs/bpf"),
        "host_paths": [str(p) for p in nodemod.HOST_PATHS if p.exists()],
        # bpflb's socket programs attach to the node's cgroup subtree, never to the machine's cgroup2 root
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
    host = node.hosts[0]  # the agent wrote into the node's own directories, not the machine's
    conflist = json.loads((host.host_path(CNI_CONF_DIR) / "05-bpflb.conflist").read_text())
    assert conflist["plugins"][0]["type"] == "bpflb-cni"
    assert os.access(host.host_path(CNI_BIN_DIR) / "bpflb-cni", os.X_OK)
    assert not (CNI_CONF_DIR / "05-bpflb.conflist").exists()
    logs = node.kubectl("-n", "bpflb-system", "logs", pods[0]["metadata"]["name"])
    assert "initial sync complete" in logs


def agent_pids(name: str) -> list[int]:
    """The bpflb agents running in the cgroup subtree of node `name`."""
    pids = nodemod._pids_in_cgroups(d for d in nodemod._cgroup_dirs(name) if d.parent.name == "unified")
    return [p for p in pids if b"bpflb\x00agent" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def mount_of(pid: int, mountpoint: str) -> tuple[str, str, str]:
    """(device, root, fstype) of a process's mount at mountpoint (the last one mounted there)."""
    out = None
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        f = line.split()
        if f[4] == mountpoint:
            out = (f[2], f[3], f[f.index("-") + 1])
    assert out, f"{pid}: nothing mounted at {mountpoint}"
    return out


def assert_agent_has_its_own_bpffs_and_cgroup(name: str) -> None:
    """The agent of node `name` pinned into a bpffs of the node's (not the machine's) and attached its socket
    programs to the node's cgroup subtree /NAME (on the machine: /sys/fs/cgroup/unified/NAME)."""
    (agent,) = agent_pids(name)
    machine_bpffs = mount_of(os.getpid(), "/sys/fs/bpf")
    dev, _, fstype = mount_of(agent, "/sys/fs/bpf")
    assert fstype == "bpf" and dev != machine_bpffs[0]
    _, root, fstype = mount_of(agent, "/host/sys/fs/cgroup/unified")
    assert (root, fstype) == (f"/{name}", "cgroup2")
    attached = subprocess.run(["bpftool", "cgroup", "show", f"/sys/fs/cgroup/unified/{name}"], capture_output=True,
                              text=True, check=True).stdout
    assert "bpflb_conn4" in attached and "bpflb_send4" in attached, attached


def test_agent_attached_to_its_node_and_pinned_in_its_bpffs(node):
    assert_agent_has_its_own_bpffs_and_cgroup(node.name)
    # The machine's cgroup2 root and bpffs are as they were: nothing of this node's there.
    assert machine_state()["root_cgroup_progs"] == node.machine_before["root_cgroup_progs"]
    assert not MACHINE_PINS.exists() or node.machine_before["pins"]


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
    records = [p.read_text() for p in (node.hosts[0].host_path(nodemod.BPFLB_STATE) / "endpoints").glob("*.json")]
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
    # The agent's directories were the node's own (bound over the hostPaths in its mount namespace): the
    # machine's are as they were.
    assert bpflb_files() == node.bpflb_files_before


def _is_node_process(pid: str) -> bool:
    return str(nodemod.BASE_DIR / NAME).encode() in _cmdline(int(pid))
