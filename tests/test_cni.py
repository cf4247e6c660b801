"""The bundled CNI plugin, as the runtime sees it: the installed static launcher, driven by the real
CNI library (cnitool), talking to the agent-side server. Server, launcher and cnitool run inside a
"node" network namespace the fixture makes, so every host-side device lands there, never on the host."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from lb.cni.plugin import SUPPORTED, handle
from lb.testing.cni_node import CIDR, GW, Node


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    try:
        n.install()
        yield n
    finally:
        n.close()


def test_cnitool_add_check_del_through_the_installed_launcher(node):
    pod = node.pod()
    r = node.cnitool("add", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    ip = result["ips"][0]["address"].split("/")[0]
    assert result["cniVersion"] == "1.1.0" and ip.startswith("10.244.7.") and result["ips"][0]["gateway"] == GW
    assert result["interfaces"][1]["name"] == "eth0" and result["interfaces"][1]["sandbox"] == pod
    podns = os.path.basename(pod)
    assert f"inet {ip}/32" in node.in_ns(["ip", "addr", "show", "eth0"], ns=podns).stdout
    assert f"default via {GW}" in node.in_ns(["ip", "route"], ns=podns).stdout
    assert "state UP" in node.in_ns(["ip", "link", "show", "lo"], ns=podns).stdout or \
        "LOOPBACK,UP" in node.in_ns(["ip", "link", "show", "lo"], ns=podns).stdout
    assert node.in_ns(["ping", "-c1", "-W2", GW], ns=podns).returncode == 0  # the gateway answers
    assert node.in_ns(["ping", "-c1", "-W2", ip]).returncode == 0  # the node reaches the pod
    assert {"bpflb_host", "bpflb_net"} <= set(node.host_links())
    record = json.load(open(os.path.join(node.data, "endpoints", os.listdir(os.path.join(node.data, "endpoints"))[0])))
    assert record["ip"] == ip and record["hostInterface"] in node.host_links()
    r = node.cnitool("check", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    r = node.cnitool("del", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    assert record["hostInterface"] not in node.host_links()
    assert not [f for f in os.listdir(os.path.join(node.data, "ipam", "bpflb")) if not f.startswith(".")]
    assert node.cnitool("del", "bpflb", pod).returncode == 0  # DEL is idempotent


def test_check_reports_a_broken_attachment(node):
    pod = node.pod()
    assert node.cnitool("add", "bpflb", pod).returncode == 0
    node.in_ns(["ip", "addr", "flush", "dev", "eth0"], ns=os.path.basename(pod))
    r = node.cnitool("check", "bpflb", pod)
    assert r.returncode != 0 and "does not hold" in (r.stdout + r.stderr)


BASE = {"cniVersion": "1.1.0", "name": "bpflb", "type": "bpflb-cni", "podCIDR": CIDR}


@pytest.mark.parametrize("env,stdin,code,text", [
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}, b"{not json", 6, "not valid JSON"),
    ({"CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}, json.dumps(BASE).encode(), 4, "CNI_COMMAND is not set"),
    ({"CNI_COMMAND": "ADD", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}, json.dumps(BASE).encode(), 4, "CNI_CONTAINERID"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"}, json.dumps(BASE).encode(), 4, "CNI_NETNS"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x"}, json.dumps(BASE).encode(), 4, "CNI_IFNAME"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"},
     json.dumps(dict(BASE, cniVersion="9.9.9")).encode(), 1, "not supported"),
    ({"CNI_COMMAND": "STATUS"}, json.dumps(dict(BASE, cniVersion="1.0.0")).encode(), 1, "STATUS needs cniVersion 1.1.0"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"},
     json.dumps(dict(BASE, podCIDR="10.1.0.0/31")).encode(), 7, "podCIDR"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/nonexistent/ns", "CNI_IFNAME": "eth0"},
     json.dumps(BASE).encode(), 4, "does not exist"),
    ({"CNI_COMMAND": "FROB"}, json.dumps(BASE).encode(), 4, "FROB"),
], ids=["malformed-json", "no-command", "no-container-id", "no-netns", "no-ifname", "unknown-version",
        "status-old-version", "bad-pod-cidr", "netns-missing", "unknown-command"])
def test_spec_errors(env, stdin, code, text):
    out, rc = handle(env, stdin)
    err = json.loads(out)
    assert rc == 1 and err["code"] == code and text in err["msg"] + err.get("details", ""), err


def test_version_and_unknown_container_del(tmp_path):
    out, rc = handle({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": "0.4.0"}).encode())
    assert rc == 0 and json.loads(out) == {"cniVersion": "0.4.0", "supportedVersions": list(SUPPORTED)}
    out, rc = handle({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "never-added", "CNI_IFNAME": "eth0"},
                     json.dumps(dict(BASE, dataDir=str(tmp_path))).encode())
    assert rc == 0 and out == b""


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_answers_in_the_version_asked(node, version):
    pod = node.pod()
    rc, res = node.launcher("ADD", dict(node.plugin_conf, cniVersion=version), cid=f"c-{version}", netns=pod)
    assert rc == 0, res
    assert res["cniVersion"] == version
    assert ("version" in res["ips"][0]) == (version < "1.0.0")
    assert node.launcher("DEL", dict(node.plugin_conf, cniVersion=version), cid=f"c-{version}", netns=pod)[0] == 0


def test_exhausted_pool_is_a_clear_error_and_status_says_so(node):
    conf = dict(node.plugin_conf, podCIDR="10.244.9.0/30", name="tiny")  # one usable address
    assert node.launcher("STATUS", conf)[0] == 0
    rc, res = node.launcher("ADD", conf, cid="a", netns=node.pod())
    assert rc == 0, res
    rc, err = node.launcher("ADD", conf, cid="b", netns=node.pod())
    assert rc == 1 and err["code"] == 11 and "10.244.9.0/30 is exhausted" in err["msg"]
    rc, err = node.launcher("STATUS", conf)
    assert rc == 1 and err["code"] == 50 and "no free address" in err["msg"]


def test_gc_removes_attachments_the_runtime_no_longer_lists(node):
    pods = [node.pod() for _ in range(3)]
    for i, p in enumerate(pods):
        assert node.launcher("ADD", node.plugin_conf, cid=f"gc{i}", netns=p)[0] == 0
    valid = [{"containerID": "gc1", "ifname": "eth0"}]
    rc, err = node.launcher("GC", dict(node.plugin_conf, **{"cni.dev/valid-attachments": valid}))
    assert rc == 0, err
    reserved = [f for f in os.listdir(os.path.join(node.data, "ipam", "bpflb")) if not f.startswith(".")]
    assert len(reserved) == 1
    assert sorted(os.listdir(os.path.join(node.data, "endpoints"))) == ["gc1-eth0.json"]
    assert len([l for l in node.host_links() if l.startswith("lxc")]) == 1


def test_launcher_without_an_agent_says_try_again_later(node):
    node.server.kill()
    node.server.wait()
    os.unlink(node.sock)
    rc, err = node.launcher("ADD", node.plugin_conf, cid="x", netns=node.pod())
    assert rc == 1 and err["code"] == 11 and "not reachable" in err["msg"]
    rc, err = node.launcher("STATUS", node.plugin_conf)
    assert rc == 1 and err["code"] == 50


def test_100_concurrent_adds_then_dels(node):
    pods = [node.pod() for _ in range(100)]

    def add(i):
        return node.launcher("ADD", node.plugin_conf, cid=f"conc{i}", netns=pods[i])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(add, range(100)))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]][:3]
    ips = [res["ips"][0]["address"] for _, res in results]
    assert len(set(ips)) == 100  # no address given twice
    with ThreadPoolExecutor(16) as pool:
        dels = list(pool.map(lambda i: node.launcher("DEL", node.plugin_conf, cid=f"conc{i}", netns=pods[i]), range(100)))
    assert all(rc == 0 for rc, _ in dels)
    assert not [f for f in os.listdir(os.path.join(node.data, "ipam", "bpflb")) if not f.startswith(".")]
    assert not os.listdir(os.path.join(node.data, "endpoints"))
    assert not [l for l in node.host_links() if l.startswith("lxc")]
