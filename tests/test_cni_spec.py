"""The CNI plugin against the specification, called directly: ``handle(env, stdin) -> (stdout, rc)``.

Every call runs on a thread inside a scratch "node" network namespace the fixture makes and removes,
so even a lookup of a host veth never looks at the host. Kernel attachments (ADD/CHECK through the
installed launcher, cnitool) are in test_cni.py."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading
import uuid

import pytest

from lb.cni import netsetup
from lb.cni.ipam import IPAM, Pool
from lb.cni.plugin import SUPPORTED, handle

CIDR = "10.244.5.0/24"
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class Scratch:
    """A node namespace; pods are namespaces too. ``call`` runs the plugin inside the node namespace."""

    def __init__(self, data: str):
        self.tag = uuid.uuid4().hex[:6]
        self.data = data
        self.names: list[str] = []
        self.node = self.netns()
        self.forwarding(True)

    def forwarding(self, on: bool) -> None:
        """net.ipv4.ip_forward of the node, as its administrator sets it (Kubernetes requires it on)."""
        subprocess.run(["ip", "netns", "exec", os.path.basename(self.node), "sysctl", "-qw",
                        f"net.ipv4.ip_forward={int(on)}"], check=True)

    def netns(self) -> str:
        name = f"blz{self.tag}n{len(self.names)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.names.append(name)
        return f"/run/netns/{name}"

    def conf(self, **over) -> dict:
        return {"cniVersion": "1.1.0", "name": "bpflb", "type": "bpflb-cni", "podCIDR": CIDR, "dataDir": self.data,
                **over}

    def call(self, env: dict, conf: dict | bytes, sink=None) -> tuple[int, dict | None]:
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        box: dict = {}

        def run() -> None:
            try:
                fd = os.open(self.node, os.O_RDONLY)
                if _libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                os.close(fd)
                box["out"] = handle(env, stdin, sink)
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=run)  # ends in the node namespace: never reused
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        out, rc = box["out"]
        return rc, (json.loads(out) if out else None)

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def ns(tmp_path):
    s = Scratch(str(tmp_path / "data"))
    try:
        yield s
    finally:
        s.close()


def env_for(command: str, cid: str = "c1", netns: str = "/proc/self/ns/net", ifname: str = "eth0", **extra) -> dict:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
            "CNI_PATH": "/opt/cni/bin", **extra}


def without(env: dict, key: str) -> dict:
    return {k: v for k, v in env.items() if k != key}


# One row per error the specification names: (env, conf mutation or raw stdin, code, text in msg+details).
ERRORS = [
    ("malformed-json", env_for("ADD"), b"{not json", 6, "not valid JSON"),
    ("not-utf8", env_for("ADD"), b"\xff\xfe{}", 6, "not valid JSON"),
    ("json-not-an-object", env_for("ADD"), b"[1, 2]", 6, "must be a JSON object"),
    ("no-command", without(env_for("ADD"), "CNI_COMMAND"), {}, 4, "CNI_COMMAND is not set"),
    ("unknown-command", env_for("FROB"), {}, 4, "CNI_COMMAND 'FROB'"),
    ("no-container-id", without(env_for("ADD"), "CNI_CONTAINERID"), {}, 4, "CNI_CONTAINERID not set"),
    ("no-netns", without(env_for("ADD"), "CNI_NETNS"), {}, 4, "CNI_NETNS not set"),
    ("no-ifname", without(env_for("ADD"), "CNI_IFNAME"), {}, 4, "CNI_IFNAME not set"),
    ("check-no-netns", without(env_for("CHECK"), "CNI_NETNS"), {}, 4, "CNI_NETNS not set"),
    ("del-no-container-id", without(env_for("DEL"), "CNI_CONTAINERID"), {}, 4, "CNI_CONTAINERID not set"),
    ("all-missing", {"CNI_COMMAND": "ADD"}, {}, 4, "CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS not set"),
    ("container-id-path", env_for("ADD", cid="../../etc/x"), {}, 4, "CNI_CONTAINERID '../../etc/x'"),
    ("ifname-too-long", env_for("ADD", ifname="a-very-long-ifname"), {}, 4, "CNI_IFNAME"),
    ("ifname-slash", env_for("ADD", ifname="a/b"), {}, 4, "CNI_IFNAME"),
    ("container-id-trailing-newline", env_for("ADD", cid="abc\n"), {}, 4, "CNI_CONTAINERID 'abc\\n'"),
    ("container-id-space", env_for("ADD", cid="a b"), {}, 4, "CNI_CONTAINERID 'a b'"),
    ("container-id-colon", env_for("ADD", cid="a:b"), {}, 4, "CNI_CONTAINERID 'a:b'"),
    ("container-id-too-long", env_for("ADD", cid="c" * 201), {}, 4, "over the limit of 200"),
    ("ifname-16-bytes-in-9-chars", env_for("ADD", ifname="é" * 8), {}, 4, "is 16 bytes long, over the limit of 15"),
    ("ifname-trailing-newline", env_for("ADD", ifname="eth0\n"), {}, 4, "may not hold '/', ':', NUL or whitespace"),
    ("ifname-nbsp", env_for("ADD", ifname="eth\u00a00"), {}, 4, "whitespace"),
    ("ifname-colon", env_for("ADD", ifname="eth0:1"), {}, 4, "whitespace"),
    ("ifname-dotdot", env_for("ADD", ifname=".."), {}, 4, "may not be '.' or '..'"),
    ("netns-is-the-node", env_for("ADD", netns="/proc/thread-self/ns/net"), {}, 4, "is the node's own network namespace"),
    ("cni-args-malformed", env_for("ADD", CNI_ARGS="K8S_POD_NAME"), {}, 4, "CNI_ARGS"),
    ("netns-missing", env_for("ADD", netns="/run/netns/blz-no-such-ns"), {}, 4, "CNI_NETNS /run/netns/blz-no-such-ns"),
    ("unknown-version", env_for("ADD"), {"cniVersion": "9.9.9"}, 1, "cniVersion '9.9.9' is not supported"),
    ("no-version", env_for("ADD"), {"cniVersion": None}, 1, "cniVersion is missing"),
    ("old-version", env_for("ADD"), {"cniVersion": "0.2.0"}, 1, "supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
    ("check-0.3.1", env_for("CHECK"), {"cniVersion": "0.3.1"}, 1, "CHECK needs cniVersion 0.4.0"),
    ("status-1.0.0", env_for("STATUS"), {"cniVersion": "1.0.0"}, 1, "STATUS needs cniVersion 1.1.0"),
    ("gc-1.0.0", env_for("GC"), {"cniVersion": "1.0.0"}, 1, "GC needs cniVersion 1.1.0"),
    ("ipam-field", env_for("ADD"), {"ipam": {"type": "host-local"}}, 2, 'ipam={"type": "host-local"}'),
    ("no-name", env_for("ADD"), {"name": None}, 7, "field 'name' is missing"),
    ("no-type", env_for("ADD"), {"type": ""}, 7, "field 'type' is missing"),
    ("name-path", env_for("ADD"), {"name": "../etc"}, 7, "network name '../etc'"),
    ("name-trailing-newline", env_for("ADD"), {"name": "bpflb\n"}, 7, "network name 'bpflb\\n'"),
    ("name-leading-dot", env_for("ADD"), {"name": ".hidden"}, 7, "must start with a letter or digit"),
    ("prev-result-not-an-object", env_for("CHECK"), {"prevResult": [1]}, 7, "prevResult must be a result object"),
    ("prev-result-ips-not-a-list", env_for("CHECK"), {"prevResult": {"ips": 5}}, 7, "prevResult"),
    ("gc-attachment-id-not-a-string", env_for("GC"), {"cni.dev/valid-attachments": [{"containerID": [1], "ifname": "e"}]},
     7, "GC needs cni.dev/valid-attachments"),
    ("deeply-nested", env_for("ADD"), b"[" * 100000, 6, "network configuration"),
    ("pod-cidr-slash31", env_for("ADD"), {"podCIDR": "10.1.0.0/31"}, 7, "podCIDR '10.1.0.0/31'"),
    ("pod-cidr-ipv6", env_for("ADD"), {"podCIDR": "fd00:244::/64"}, 7, "not an IPv4 CIDR"),
    ("pod-cidr-garbage", env_for("ADD"), {"podCIDR": "ten"}, 7, "podCIDR 'ten'"),
    ("mtu-small", env_for("ADD"), {"mtu": 100}, 7, "mtu 100"),
    ("mtu-string", env_for("ADD"), {"mtu": "1500"}, 7, "mtu '1500'"),
    ("data-dir-relative", env_for("ADD"), {"dataDir": "var/lib"}, 7, "dataDir 'var/lib'"),
    ("gc-attachments-not-a-list", env_for("GC"), {"cni.dev/valid-attachments": {"containerID": "x"}}, 7,
     "GC needs cni.dev/valid-attachments"),
    ("add-without-pod-cidr", env_for("ADD"), {"podCIDR": None}, 11, "no pod CIDR yet"),
    ("status-without-pod-cidr", env_for("STATUS"), {"podCIDR": None}, 50, "no pod CIDR yet"),
    ("check-unknown-container", env_for("CHECK", cid="never-added"), {}, 3, "no attachment never-added/eth0"),
]


@pytest.mark.parametrize("env,conf,code,text", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_spec_errors(ns, env, conf, code, text):
    if isinstance(conf, dict):
        conf = {k: v for k, v in ns.conf(**conf).items() if v is not None}
    rc, err = ns.call(env, conf)
    assert rc == 1 and err["code"] == code, err
    assert text in err["msg"] + " " + err.get("details", ""), err
    assert err["cniVersion"] in SUPPORTED


def test_io_errors_name_the_state_directory(ns, tmp_path):
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "data")  # under a regular file: every mkdir fails with ENOTDIR
    rc, err = ns.call(env_for("ADD", netns=ns.netns()), ns.conf(dataDir=bad))
    assert rc == 1 and err["code"] == 5 and f"{tmp_path}/file/data/" in err["msg"], err
    rc, err = ns.call(env_for("STATUS"), ns.conf(dataDir=bad))
    assert rc == 1 and err["code"] == 50 and "not writable" in err["msg"], err


@pytest.mark.parametrize("version", SUPPORTED)
def test_errors_are_answered_in_the_version_asked(ns, version):
    rc, err = ns.call(without(env_for("ADD"), "CNI_IFNAME"), ns.conf(cniVersion=version))
    assert rc == 1 and err == {"cniVersion": version, "code": 4, "msg": "CNI_IFNAME not set"}


@pytest.mark.parametrize("stdin,answer", [
    (b'{"cniVersion": "0.4.0"}', "0.4.0"),
    (b'{"cniVersion": "1.1.0"}', "1.1.0"),
    (b"", "1.1.0"),
], ids=["asked-0.4.0", "asked-1.1.0", "no-input"])
def test_version_lists_what_is_supported(ns, stdin, answer):
    rc, out = ns.call({"CNI_COMMAND": "VERSION"}, stdin)
    assert rc == 0 and out == {"cniVersion": answer, "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_del_of_an_unknown_container_succeeds_and_creates_nothing(ns):
    for netns in ("/run/netns/blz-gone", ""):  # DEL needs no namespace, and a gone one is fine
        env = env_for("DEL", cid="never-added", netns=netns)
        assert ns.call({k: v for k, v in env.items() if v}, ns.conf()) == (0, None)
    assert not os.path.exists(ns.data)


def test_status_ready_then_exhausted(ns):
    assert ns.call(env_for("STATUS"), ns.conf(podCIDR="10.244.9.0/30")) == (0, None)
    IPAM(ns.data, "bpflb").allocate(Pool.of("10.244.9.0/30"), "c", "eth0")
    rc, err = ns.call(env_for("STATUS"), ns.conf(podCIDR="10.244.9.0/30"))
    # the one pod's gateway device does not exist in this fake: connectivity is reported first
    assert rc == 1 and err["code"] == 51 and "existing pods may be cut off" in err["msg"], err
    assert ns.call(env_for("DEL", cid="c"), ns.conf()) == (0, None)
    assert ns.call(env_for("STATUS"), ns.conf(podCIDR="10.244.9.0/30")) == (0, None)


def test_gc_removes_what_the_runtime_no_longer_lists(ns):
    """Reservations and records only (no devices): GC finds attachments from either."""
    ipam, pool = IPAM(ns.data, "bpflb"), Pool.of(CIDR)
    for cid in ("keep", "stale-ipam"):
        ipam.allocate(pool, cid, "eth0")
    edir = os.path.join(ns.data, "endpoints")
    os.makedirs(edir)
    for cid, network in (("stale-record", "bpflb"), ("other-net", "other")):
        with open(os.path.join(edir, f"{cid}-eth0.json"), "w") as f:
            json.dump({"containerID": cid, "ifname": "eth0", "network": network, "ip": "10.244.5.99"}, f)
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    assert ns.call(env_for("GC"), ns.conf(**{"cni.dev/valid-attachments": valid})) == (0, None)
    assert [r.container_id for r in ipam.reservations()] == ["keep"]
    assert os.listdir(edir) == ["other-net-eth0.json"]  # another network's attachment is not ours to judge


def test_gc_without_a_list_removes_nothing(ns):
    IPAM(ns.data, "bpflb").allocate(Pool.of(CIDR), "c", "eth0")
    assert ns.call(env_for("GC"), ns.conf()) == (0, None)
    assert len(IPAM(ns.data, "bpflb").reservations()) == 1


class FakeSink:
    def __init__(self, fail: bool = False):
        self.fail, self.map = fail, {}

    def added(self, ip: str, ifindex: int, mac: str) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.map[ip] = (ifindex, mac)

    def removed(self, ip: str) -> None:
        self.map.pop(ip, None)


def test_attachments_are_registered_for_the_datapath_and_unregistered_on_del(ns):
    sink, pod = FakeSink(), ns.netns()
    rc, res = ns.call(env_for("ADD", netns=pod, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"),
                      ns.conf(), sink)
    assert rc == 0, res
    ip = res["ips"][0]["address"].split("/")[0]
    with open(os.path.join(ns.data, "endpoints", "c1:eth0.json")) as f:
        rec = json.load(f)
    assert sink.map == {ip: (rec["hostIfindex"], res["interfaces"][1]["mac"])}
    assert (rec["podNamespace"], rec["podName"], rec["netns"], rec["hostInterface"]) == \
        ("default", "web-0", pod, netsetup.host_ifname("c1", "eth0"))
    assert ns.call(env_for("DEL", netns=pod), ns.conf(), sink) == (0, None)
    assert sink.map == {}


def test_a_failed_registration_undoes_the_add(ns):
    pod = ns.netns()
    rc, err = ns.call(env_for("ADD", netns=pod), ns.conf(), FakeSink(fail=True))
    assert rc == 1 and err["code"] == 5 and "registering 10.244.5." in err["msg"], err
    assert IPAM(ns.data, "bpflb").reservations() == []
    assert os.listdir(os.path.join(ns.data, "endpoints")) == []
    links = subprocess.run(["ip", "-n", os.path.basename(ns.node), "-o", "link"], capture_output=True, text=True).stdout
    assert netsetup.host_ifname("c1", "eth0") not in links
    assert "eth0" not in subprocess.run(["ip", "-n", os.path.basename(pod), "-o", "link"], capture_output=True,
                                        text=True).stdout


def test_an_interface_already_in_the_pod_is_an_error_and_leaks_nothing(ns):
    pod = ns.netns()
    subprocess.run(["ip", "-n", os.path.basename(pod), "link", "add", "eth0", "type", "veth", "peer", "name", "x0"],
                   check=True)
    rc, err = ns.call(env_for("ADD", netns=pod), ns.conf())
    assert rc == 1 and err["code"] == 5 and err["msg"] == f"interface eth0 already exists in {pod}", err
    assert IPAM(ns.data, "bpflb").reservations() == []
    links = subprocess.run(["ip", "-n", os.path.basename(ns.node), "-o", "link"], capture_output=True, text=True).stdout
    assert "lxc" not in links


def test_a_second_add_of_an_attachment_is_refused_and_leaves_the_first_as_it_was(ns):
    """ADD twice for one (container, ifname) without DEL in between (the spec forbids it; found by the fuzz
    test): the second one, into another netns where the name is taken, is refused, and its undo must not
    tear down the first attachment (its veth, address, record and map entry)."""
    first, second = ns.netns(), ns.netns()
    subprocess.run(["ip", "-n", os.path.basename(second), "link", "add", "eth0", "type", "veth", "peer", "name", "x0"],
                   check=True)
    sink = FakeSink()
    rc, res = ns.call(env_for("ADD", netns=first), ns.conf(), sink)
    assert rc == 0, res
    edir = os.path.join(ns.data, "endpoints")
    before = (sorted(os.listdir(edir)), IPAM(ns.data, "bpflb").reservations(), dict(sink.map),
              subprocess.run(["ip", "-n", os.path.basename(ns.node), "-o", "link"], capture_output=True, text=True).stdout.count("lxc"))
    rc, err = ns.call(env_for("ADD", netns=second), ns.conf(), sink)
    assert rc == 1 and err["code"] == 4 and err["msg"] == f"container c1 already has interface eth0 (in {first}): DEL it first", err
    after = (sorted(os.listdir(edir)), IPAM(ns.data, "bpflb").reservations(), dict(sink.map),
             subprocess.run(["ip", "-n", os.path.basename(ns.node), "-o", "link"], capture_output=True, text=True).stdout.count("lxc"))
    assert after == before


def test_a_stale_record_never_unregisters_the_addresss_next_owner(ns):
    """A DEL cut short after releasing its address left its record; the address went to another pod.
    Finishing the old DEL (or GC) must leave the new pod's map entry alone."""
    ipam, pool = IPAM(ns.data, "bpflb"), Pool.of(CIDR)
    ip = ipam.allocate(pool, "new", "eth0")
    edir = os.path.join(ns.data, "endpoints")
    os.makedirs(edir)
    with open(os.path.join(edir, "old-eth0.json"), "w") as f:
        json.dump({"containerID": "old", "ifname": "eth0", "network": "bpflb", "ip": ip}, f)
    sink = FakeSink()
    sink.map[ip] = (7, "02:00:00:00:00:07")  # the new pod's entry
    assert ns.call(env_for("DEL", cid="old"), ns.conf(), sink) == (0, None)
    assert sink.map == {ip: (7, "02:00:00:00:00:07")} and os.listdir(edir) == []
    assert ipam.find("new", "eth0") == ip


@pytest.mark.parametrize("prev,reserve,text", [
    ({"cniVersion": "1.1.0", "ips": [{"address": "10.244.5.200/24"}]}, True, "prevResult does not list 10.244.5."),
    (None, False, "the IPAM reservation of 10.244.5."),
], ids=["prev-result-disagrees", "reservation-gone"])
def test_check_compares_with_what_add_reported_and_reserved(ns, prev, reserve, text):
    ip = IPAM(ns.data, "bpflb").allocate(Pool.of(CIDR), "c1", "eth0")
    if not reserve:
        IPAM(ns.data, "bpflb").release("c1", "eth0")
    os.makedirs(os.path.join(ns.data, "endpoints"))
    with open(os.path.join(ns.data, "endpoints", "c1:eth0.json"), "w") as f:
        json.dump({"containerID": "c1", "ifname": "eth0", "network": "bpflb", "ip": ip, "gateway": "10.244.5.1",
                   "hostInterface": netsetup.host_ifname("c1", "eth0")}, f)
    conf = ns.conf(**({"prevResult": prev} if prev else {}))
    rc, err = ns.call(env_for("CHECK", netns=ns.netns()), conf)
    assert rc == 1 and err["code"] == 100 and text in err["msg"], err
