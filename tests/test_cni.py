"""The bundled CNI plugin as the runtime sees it: the installed static launcher, driven by the real CNI
library (cnitool) or run directly, talking to the plugin server. Server, launcher and cnitool run
inside a "node" network namespace the fixture makes, so every host-side device lands there, never on
the host. Error paths one by one are in test_cni_spec.py, IPAM alone in test_cni_ipam.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lb.cni import install, netsetup
from lb.testing.cni_node import CIDR, GW, ROOT, Node

CNI_CACHE = "/var/lib/cni/results"  # libcni's; cnitool has no flag to move it


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    try:
        n.install()
        n.plugin_conf["cniVersion"] = "1.1.0"  # what libcni 1.2+ picks from the conflist's cniVersions
        yield n
    finally:
        n.close()
        for pod in n.pods:  # what cnitool cached for attachments a test left (DEL removes its own)
            cid = "cnitool-" + hashlib.sha512(f"/run/netns/{pod}".encode()).hexdigest()[:20]
            try:
                os.unlink(os.path.join(CNI_CACHE, f"bpflb-{cid}-eth0"))
            except FileNotFoundError:
                pass
        shutil.rmtree(n.data, ignore_errors=True)


def reserved(node: Node, network: str = "bpflb") -> list[str]:
    d = os.path.join(node.data, "ipam", network)
    return [f for f in os.listdir(d) if not f.startswith(".")] if os.path.isdir(d) else []


def records(node: Node) -> list[str]:
    d = os.path.join(node.data, "endpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def host_veths(node: Node) -> list[str]:
    return [l for l in node.host_links() if l.startswith(netsetup.HOST_IF_PREFIX)]


def in_pod(node: Node, pod: str, *argv: str) -> str:
    r = node.in_ns(list(argv), ns=os.path.basename(pod))
    return r.stdout + r.stderr


def test_cnitool_add_check_status_del_through_the_installed_launcher(node, monkeypatch):
    monkeypatch.setenv("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
    pod = node.pod()
    r = node.cnitool("add", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["cniVersion"] == "1.1.0"  # negotiated from the conflist's cniVersions
    ip = result["ips"][0]["address"].split("/")[0]
    assert result["ips"][0] == {"address": f"{ip}/24", "gateway": GW, "interface": 1} and ip.startswith("10.244.7.")
    host_if, eth0 = result["interfaces"]
    assert eth0["name"] == "eth0" and eth0["sandbox"] == pod and eth0["mtu"] == 1500
    assert host_if["name"] == netsetup.host_ifname(json.load(open(os.path.join(node.data, "endpoints",
                                                                                records(node)[0])))["containerID"], "eth0")

    # the pod's view
    assert f"inet {ip}/32" in in_pod(node, pod, "ip", "-4", "addr", "show", "eth0")
    routes = in_pod(node, pod, "ip", "-4", "route").splitlines()
    assert [r.split() for r in routes if r.startswith("default")] == [
        ["default", "via", GW, "dev", "eth0", "proto", "static", "onlink"]]
    assert "UP" in in_pod(node, pod, "ip", "link", "show", "lo").split(">")[0]  # lo up: no loopback plugin
    assert node.in_ns(["ping", "-c1", "-W2", GW], ns=os.path.basename(pod)).returncode == 0
    assert node.in_ns(["ping", "-c1", "-W2", "127.0.0.1"], ns=os.path.basename(pod)).returncode == 0
    # the node's view
    assert f"inet {GW}/32" in node.in_ns(["ip", "-4", "addr", "show", "bpflb_host"]).stdout
    assert {"bpflb_host", "bpflb_net"} <= set(node.host_links())
    assert f"{ip} dev {host_if['name']} proto static scope link" in node.in_ns(["ip", "-4", "route"]).stdout
    assert node.in_ns(["cat", "/proc/sys/net/ipv4/ip_forward",
                       f"/proc/sys/net/ipv4/conf/{host_if['name']}/proxy_arp"]).stdout.split() == ["1", "1"]
    assert node.in_ns(["ping", "-c1", "-W2", ip]).returncode == 0
    # the endpoint registry
    rec = json.load(open(os.path.join(node.data, "endpoints", records(node)[0])))
    assert (rec["ip"], rec["hostInterface"], rec["netns"], rec["podNamespace"], rec["podName"]) == \
        (ip, host_if["name"], pod, "default", "web-0")
    assert f"{rec['hostIfindex']}: {host_if['name']}@" in node.in_ns(["ip", "-o", "link"]).stdout

    r = node.cnitool("check", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    r = node.cnitool("status", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    r = node.cnitool("del", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    assert host_veths(node) == [] and reserved(node) == [] and records(node) == []
    assert "eth0" not in in_pod(node, pod, "ip", "-o", "link")
    assert f"{ip} dev" not in node.in_ns(["ip", "-4", "route"]).stdout
    assert node.cnitool("del", "bpflb", pod).returncode == 0  # DEL is idempotent


@pytest.mark.parametrize("where,breakage,complaint", [
    ("pod", ["ip", "addr", "flush", "dev", "eth0"], "eth0 does not hold 10.244.7."),
    ("pod", ["ip", "route", "del", "default"], f"no default route via {GW}"),
    ("pod", ["ip", "link", "set", "eth0", "down"], "eth0 is down"),
    ("node", ["ip", "route", "del", "{ip}/32"], "no route to 10.244.7."),
    ("node", ["ip", "link", "del", "{host_if}"], "host interface lxc"),
], ids=["address-flushed", "default-route-gone", "pod-end-down", "host-route-gone", "host-veth-gone"])
def test_check_reports_a_broken_attachment(node, where, breakage, complaint):
    pod = node.pod()
    r = node.cnitool("add", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    ip, host_if = res["ips"][0]["address"].split("/")[0], res["interfaces"][0]["name"]
    argv = [a.format(ip=ip, host_if=host_if) for a in breakage]
    assert node.in_ns(argv, ns=os.path.basename(pod) if where == "pod" else None).returncode == 0
    r = node.cnitool("check", "bpflb", pod)
    assert r.returncode != 0 and complaint in r.stdout + r.stderr, r.stdout + r.stderr
    assert node.cnitool("del", "bpflb", pod).returncode == 0  # a broken attachment still goes cleanly
    assert host_veths(node) == [] and reserved(node) == [] and records(node) == []


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_answers_in_the_version_asked(node, version):
    pod, conf = node.pod(), dict(node.plugin_conf, cniVersion=version)
    rc, res = node.launcher("ADD", conf, cid=f"c-{version}", netns=pod)
    assert rc == 0, res
    assert res["cniVersion"] == version
    assert ("version" in res["ips"][0]) == (version in ("0.3.0", "0.3.1", "0.4.0"))  # 0.x: "version": "4"
    assert all(("mtu" in i) == (version == "1.1.0") for i in res["interfaces"])  # 1.1.0 adds interface mtu
    if version != "0.3.0" and version != "0.3.1":
        assert node.launcher("CHECK", dict(conf, prevResult=res), cid=f"c-{version}", netns=pod) == (0, None)
    assert node.launcher("DEL", conf, cid=f"c-{version}", netns=pod) == (0, None)


@pytest.mark.parametrize("cidr,size", [("10.244.9.0/30", 1), ("10.244.9.0/29", 5)], ids=["slash30", "slash29"])
def test_exhausted_pool_is_a_clear_error_and_status_says_so(node, cidr, size):
    conf = dict(node.plugin_conf, podCIDR=cidr, name="tiny")
    assert node.launcher("STATUS", conf) == (0, None)
    pods = [node.pod() for _ in range(size + 1)]
    got = [node.launcher("ADD", conf, cid=f"p{i}", netns=pods[i]) for i in range(size)]
    assert all(rc == 0 for rc, _ in got), got
    rc, err = node.launcher("ADD", conf, cid="one-too-many", netns=pods[-1])
    assert rc == 1 and err["code"] == 11 and err["msg"] == f"pod CIDR {cidr} is exhausted", err
    assert err["details"] == f"all {size} addresses of {cidr} are reserved"
    assert "eth0" not in in_pod(node, pods[-1], "ip", "-o", "link")  # the failed ADD touched nothing
    rc, err = node.launcher("STATUS", conf)
    assert rc == 1 and err["code"] == 50 and f"pod CIDR {cidr} has no free address" in err["msg"], err
    assert node.launcher("DEL", conf, cid="p0", netns=pods[0]) == (0, None)
    assert node.launcher("STATUS", conf) == (0, None)
    rc, res = node.launcher("ADD", conf, cid="one-too-many", netns=pods[-1])
    assert rc == 0 and res["ips"][0]["address"] == got[0][1]["ips"][0]["address"]  # the freed one, given again
    for i in range(1, size):
        assert node.launcher("DEL", conf, cid=f"p{i}", netns=pods[i]) == (0, None)
    assert node.launcher("DEL", conf, cid="one-too-many", netns=pods[-1]) == (0, None)
    assert reserved(node, "tiny") == [] and host_veths(node) == []


def test_gc_removes_attachments_the_runtime_no_longer_lists(node):
    pods = [node.pod() for _ in range(3)]
    for i, p in enumerate(pods):
        assert node.launcher("ADD", node.plugin_conf, cid=f"gc{i}", netns=p)[0] == 0
    valid = [{"containerID": "gc1", "ifname": "eth0"}]
    assert node.launcher("GC", dict(node.plugin_conf, **{"cni.dev/valid-attachments": valid})) == (0, None)
    assert len(reserved(node)) == 1 and records(node) == ["gc1:eth0.json"]
    assert host_veths(node) == [netsetup.host_ifname("gc1", "eth0")]
    assert "eth0" not in in_pod(node, pods[0], "ip", "-o", "link")
    assert node.launcher("CHECK", node.plugin_conf, cid="gc1", netns=pods[1]) == (0, None)  # the kept one still works
    assert node.launcher("DEL", node.plugin_conf, cid="gc1", netns=pods[1]) == (0, None)


def test_launcher_without_an_agent_says_try_again_later(node):
    node.server.kill()
    node.server.wait()
    os.unlink(node.sock)
    rc, err = node.launcher("ADD", dict(node.plugin_conf, cniVersion="0.4.0"), cid="x", netns=node.pod())
    assert rc == 1 and err["code"] == 11 and err["cniVersion"] == "0.4.0", err
    assert err["msg"] == f"bpflb agent not reachable at {node.sock}: connect: No such file or directory"
    rc, err = node.launcher("STATUS", node.plugin_conf)
    assert rc == 1 and err["code"] == 50 and "not reachable" in err["msg"], err
    r = node.cnitool("status", "bpflb", node.pod())
    assert r.returncode != 0 and "not reachable" in r.stdout + r.stderr


def run_launcher(node: Node, env: dict, conf: dict) -> tuple[int, dict | None]:
    r = node.in_ns([os.path.join(node.bin, "bpflb-cni")], env=env, input=json.dumps(conf))
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)


def test_the_socket_comes_from_the_environment_else_the_configuration(node):
    conf = dict(node.plugin_conf, agentSocket=node.sock)
    assert run_launcher(node, {"CNI_COMMAND": "STATUS"}, conf) == (0, None)
    env = {"CNI_COMMAND": "STATUS", "BPFLB_CNI_SOCKET": node.sock}
    assert run_launcher(node, env, dict(conf, agentSocket="/nonexistent.sock")) == (0, None)
    rc, err = run_launcher(node, {"CNI_COMMAND": "STATUS"}, dict(conf, agentSocket="/nonexistent.sock"))
    assert rc == 1 and err["code"] == 50 and "/nonexistent.sock" in err["msg"], err


RAW_CLIENT = """
import json, socket, struct, sys
with socket.socket(socket.AF_UNIX) as s:
    s.connect(sys.argv[1])
    s.sendall(bytes.fromhex(sys.argv[2]))
    if sys.argv[3] == "answer":
        rc, n = struct.unpack("<II", s.recv(8))
        print(json.dumps([rc, json.loads(s.recv(n))]))
"""


def raw_exchange(node: Node, payload: bytes, answer: bool = True):
    """Send raw bytes from inside the node (where the runtime is) and read the answer."""
    r = node.in_ns([sys.executable, "-c", RAW_CLIENT, node.sock, payload.hex(), "answer" if answer else "-"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if answer else None


def test_the_server_refuses_a_malformed_request_and_keeps_serving(node):
    rc, err = raw_exchange(node, struct.pack("<I", 10 ** 6))  # a million variables
    assert rc == 1 and err["code"] == 5 and "environment count" in err["msg"], err
    raw_exchange(node, struct.pack("<I", 1), answer=False)  # then hangs up mid-request
    assert node.launcher("STATUS", node.plugin_conf) == (0, None)


def test_the_plugin_runs_directly_as_a_python_module(node):
    """`python -m lb.cni`: the venv form, no launcher, no server."""
    pod = node.pod()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "direct", "CNI_NETNS": pod, "CNI_IFNAME": "eth0",
           "CNI_PATH": node.bin, "PYTHONPATH": ROOT}
    r = node.in_ns([sys.executable, "-m", "lb.cni"], env=env, input=json.dumps(node.plugin_conf))
    assert r.returncode == 0, r.stdout + r.stderr
    ip = json.loads(r.stdout)["ips"][0]["address"].split("/")[0]
    assert f"inet {ip}/32" in in_pod(node, pod, "ip", "-4", "addr", "show", "eth0")
    r = node.in_ns([sys.executable, "-m", "lb.cni"], env=dict(env, CNI_COMMAND="DEL"), input=json.dumps(node.plugin_conf))
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
    assert reserved(node) == [] and host_veths(node) == []


def test_100_concurrent_adds_then_dels(node):
    pods = [node.pod() for _ in range(100)]

    def add(i):
        return node.launcher("ADD", node.plugin_conf, cid=f"conc{i}", netns=pods[i])

    with ThreadPoolExecutor(32) as pool:  # 100 launcher processes, up to 32 at once
        results = list(pool.map(add, range(100)))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]][:3]
    ips = [res["ips"][0]["address"].split("/")[0] for _, res in results]
    assert len(set(ips)) == 100  # no address given twice
    assert sorted(reserved(node)) == sorted(ips) and len(records(node)) == 100 and len(host_veths(node)) == 100
    for pod, ip in zip(pods, ips):  # each pod holds the address it was told
        assert f"inet {ip}/32" in in_pod(node, pod, "ip", "-4", "-o", "addr", "show", "eth0")
    with ThreadPoolExecutor(32) as pool:
        dels = list(pool.map(lambda i: node.launcher("DEL", node.plugin_conf, cid=f"conc{i}", netns=pods[i]),
                             range(100)))
    assert all(rc == 0 for rc, _ in dels), [d for d in dels if d[0]][:3]
    assert reserved(node) == [] and records(node) == [] and host_veths(node) == []


def test_install_writes_the_launcher_and_the_conflist_atomically(tmp_path):
    launcher = install.build_launcher(str(tmp_path / "build" / "bpflb-cni"))
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    binary, conf = install.install(str(bin_dir), str(conf_dir), launcher=launcher, mtu=1450)
    assert binary == str(bin_dir / "bpflb-cni") and conf == str(conf_dir / "05-bpflb.conflist")
    assert os.listdir(bin_dir) == ["bpflb-cni"] and os.listdir(conf_dir) == ["05-bpflb.conflist"]  # no temp files
    assert stat.S_IMODE(os.stat(binary).st_mode) == 0o755
    assert open(binary, "rb").read() == open(launcher, "rb").read()
    with open(binary, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert json.load(open(conf)) == {"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "bpflb",
                                     "plugins": [{"type": "bpflb-cni", "mtu": 1450}]}  # no loopback, no portmap
    old = os.stat(binary).st_ino
    install.install(str(bin_dir), str(conf_dir), launcher=launcher, pod_cidr=CIDR, data_dir="/var/lib/x", socket="/s")
    assert os.stat(binary).st_ino != old  # replaced by rename: a running launcher keeps its file
    assert json.load(open(conf))["plugins"] == [{"type": "bpflb-cni", "mtu": 1500, "podCIDR": CIDR,
                                                 "dataDir": "/var/lib/x", "agentSocket": "/s"}]
