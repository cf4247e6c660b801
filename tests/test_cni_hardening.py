"""The CNI socket is the launcher's alone, and the plugin survives what a real node does to it: the
installed static launcher and cnitool against the plugin server (lb/testing/cni_node.py: a node
namespace, the server in its own mount namespace with /proc/sys read-only, as kubelet runs it)."""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lb.cni import install, netsetup, server
from lb.testing.cni_node import ROOT, Node

from test_cni import host_veths, in_pod, node as node  # noqa: F401  (the fixture)
from test_cni import records, reserved

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
IN_CREATE, IN_MOVED_TO, IN_NONBLOCK = 0x100, 0x80, 0o4000
_EVENT = struct.Struct("iIII")


class Inotify:
    """Events in one directory (name, mask), read without blocking."""

    def __init__(self, directory: str):
        self.fd = _libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0 and _libc.inotify_add_watch(self.fd, directory.encode(), IN_CREATE | IN_MOVED_TO) >= 0

    def events(self) -> list[tuple[str, int]]:
        out = []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return out
        off = 0
        while off < len(data):
            _, mask, _, n = _EVENT.unpack_from(data, off)
            out.append((data[off + _EVENT.size:off + _EVENT.size + n].rstrip(b"\0").decode(), mask))
            off += _EVENT.size + n
        return out

    def close(self) -> None:
        os.close(self.fd)


# ---- the socket ------------------------------------------------------------------------------------
def test_the_socket_appears_only_by_rename_already_0600(tmp_path):
    path = str(tmp_path / "cni.sock")
    open(path, "w").close()  # a stale file where the socket goes
    watch = Inotify(str(tmp_path))
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        sock = server.listen(path)
    finally:
        os.umask(old)
    try:
        events = watch.events()
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert ("cni.sock", IN_MOVED_TO) in events and ("cni.sock", IN_CREATE) not in events, events
        assert os.listdir(tmp_path) == ["cni.sock"]  # the private directory is gone
    finally:
        sock.close()
        watch.close()


def launcher_env(node: Node, command: str, cid: str = "", netns: str = "", ifname: str = "eth0") -> dict:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_PATH": node.bin}
    return {k: v for k, v in env.items() if v}


def run(node: Node, argv: list[str], env: dict, conf: dict, ns: str | None = None):
    r = node.in_ns(argv, env=env, input=json.dumps(conf), ns=ns)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)


@pytest.mark.parametrize("how,complaint", [
    ("own-mount-namespace", "not in the node's mount namespace"),
    ("pod-network-namespace", "not in the node's network namespace"),
    ("not-root", "caller uid 65534 is not root"),
], ids=["container-that-mounted-run", "pod-network-namespace", "not-root"])
def test_a_caller_that_is_not_the_nodes_runtime_is_refused(node, how, complaint):
    pod = node.pod()
    launcher = os.path.join(node.bin, "bpflb-cni")
    argv, ns = [launcher], None
    if how == "own-mount-namespace":  # root in the node's network namespace, /run mounted: a container
        argv = ["unshare", "--mount", "--propagation", "slave", launcher]
    elif how == "pod-network-namespace":
        ns = os.path.basename(pod)
    else:
        os.chmod(node.sock, 0o666)  # past the file mode, to reach the peer check
        argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", launcher]
    env = launcher_env(node, "ADD", "intruder", pod)
    if how == "not-root":  # the same socket by a path outside pytest's 0700 directories
        env["BPFLB_CNI_SOCKET"] = f"/tmp/bpflb-test-{node.tag}.sock"
        os.link(node.sock, env["BPFLB_CNI_SOCKET"])
    try:
        rc, err = run(node, argv, env, node.plugin_conf, ns=ns)
    finally:
        if how == "not-root":
            os.unlink(env["BPFLB_CNI_SOCKET"])
    assert rc == 1 and err["code"] == 5 and complaint in err["msg"], err
    assert reserved(node) == [] and records(node) == [] and host_veths(node) == []
    assert "eth0" not in in_pod(node, pod, "ip", "-o", "link")
    assert node.launcher("STATUS", node.plugin_conf) == (0, None)  # the runtime itself still gets in


def test_a_non_root_caller_cannot_even_connect(node):
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", os.path.join(node.bin, "bpflb-cni")]
    env = dict(launcher_env(node, "STATUS"), BPFLB_CNI_SOCKET=f"/tmp/bpflb-test-{node.tag}.sock")
    os.link(node.sock, env["BPFLB_CNI_SOCKET"])  # reachable by path; the socket keeps its 0600
    try:
        rc, err = run(node, argv, env, node.plugin_conf)
    finally:
        os.unlink(env["BPFLB_CNI_SOCKET"])
    assert rc == 1 and err["code"] == 50 and "connect: Permission denied" in err["msg"], err


@pytest.mark.parametrize("target,complaint", [
    ("node", "is the node's own network namespace"),
    ("fifo", "is not a network namespace"),
    ("mount-namespace", "is not a network namespace"),
    ("file", "is not a network namespace"),
], ids=["node-netns", "fifo-does-not-hang", "mount-namespace", "regular-file"])
def test_cni_netns_must_be_a_pod_network_namespace(node, tmp_path, target, complaint):
    path = {"node": f"/run/netns/{node.ns}", "fifo": str(tmp_path / "fifo"), "mount-namespace": "/proc/self/ns/mnt",
            "file": str(tmp_path / "file")}[target]
    if target == "fifo":
        os.mkfifo(path)
    elif target == "file":
        open(path, "w").close()
    rc, err = node.launcher("ADD", node.plugin_conf, cid="hostile", netns=path)
    assert rc == 1 and err["code"] == 4 and err["msg"] == f"CNI_NETNS {path} {complaint}", err
    assert reserved(node) == [] and records(node) == [] and host_veths(node) == []
    assert not any(l.startswith("eth0") for l in node.host_links())


# ---- names -----------------------------------------------------------------------------------------
def test_two_attachments_whose_names_join_alike_never_collide(node):
    """"a-b"+"c" and "a"+"b-c" were both "a-b-c.json"."""
    pods = [node.pod(), node.pod()]
    for (cid, ifname), pod in zip((("a-b", "c"), ("a", "b-c")), pods):
        rc, res = node.launcher("ADD", node.plugin_conf, cid=cid, netns=pod, ifname=ifname)
        assert rc == 0, res
    assert records(node) == ["a-b:c.json", "a:b-c.json"] and len(reserved(node)) == 2
    assert node.launcher("DEL", node.plugin_conf, cid="a", netns=pods[1], ifname="b-c") == (0, None)
    assert records(node) == ["a-b:c.json"] and len(reserved(node)) == 1
    assert node.launcher("CHECK", node.plugin_conf, cid="a-b", netns=pods[0], ifname="c") == (0, None)
    assert node.launcher("DEL", node.plugin_conf, cid="a-b", netns=pods[0], ifname="c") == (0, None)
    assert records(node) == [] and reserved(node) == [] and host_veths(node) == []


def test_a_legacy_record_is_still_deleted(node):
    pod = node.pod()
    assert node.launcher("ADD", node.plugin_conf, cid="old", netns=pod)[0] == 0
    edir = os.path.join(node.data, "endpoints")
    os.rename(os.path.join(edir, "old:eth0.json"), os.path.join(edir, "old-eth0.json"))  # as an older version named it
    assert node.launcher("CHECK", node.plugin_conf, cid="old", netns=pod) == (0, None)
    assert node.launcher("DEL", node.plugin_conf, cid="old", netns=pod) == (0, None)
    assert records(node) == [] and reserved(node) == [] and host_veths(node) == []


# ---- the conflist names the socket the server listens on, written once it listens ------------------
def test_conflist_names_the_served_socket_and_appears_only_once_it_listens(tmp_path):
    node_dir = tmp_path / "elsewhere"
    sock, bin_dir, conf_dir = str(node_dir / "agent.sock"), str(tmp_path / "bin"), str(tmp_path / "net.d")
    os.makedirs(conf_dir)
    watch = Inotify(conf_dir)
    proc = subprocess.Popen([sys.executable, "-m", "lb.cni.server", sock, "--node-mntns", f"/proc/{os.getpid()}/ns/mnt",
                             "--install", bin_dir, conf_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, BPFLB_CACHE=str(tmp_path / "cache")))
    try:
        seen_listening = None
        deadline = time.monotonic() + 120
        while seen_listening is None and time.monotonic() < deadline and proc.poll() is None:
            if any(name == install.CONFLIST_NAME for name, _ in watch.events()):
                with socket.socket(socket.AF_UNIX) as s:  # the moment the conflist exists, the socket accepts
                    try:
                        s.connect(sock)
                        seen_listening = True
                    except OSError:
                        seen_listening = False
            time.sleep(0.001)
        assert seen_listening is True
        assert proc.stdout.readline().strip() == "ready"
        conf = json.load(open(os.path.join(conf_dir, install.CONFLIST_NAME)))
        assert conf["plugins"][0]["agentSocket"] == sock
        # cnitool through the conflist alone, no BPFLB_CNI_SOCKET: the answer comes from this server
        # (it has no pod CIDR: no agent and no podCIDR in the conflist), not "agent not reachable".
        from lb.testing.apiserver import components

        env = dict({k: v for k, v in os.environ.items() if k != "BPFLB_CNI_SOCKET"}, NETCONFPATH=conf_dir,
                   CNI_PATH=bin_dir)
        r = subprocess.run([components()["CNITOOL"], "status", conf["name"], "/proc/self/ns/net"], env=env,
                           capture_output=True, text=True)
        assert r.returncode != 0 and "no pod CIDR yet" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        watch.close()
        proc.terminate()
        proc.wait()
    assert not os.path.exists(sock)  # the server takes its socket away


# ---- the launcher: timeout, exit status ------------------------------------------------------------
class FakeAgent:
    """A socket server answering every request with ``answer`` (None: never answers)."""

    def __init__(self, path: str, answer: bytes | None):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        self.answer, self.conns = answer, []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.answer is not None:
                c.recv(1 << 20)
                c.sendall(self.answer)
                c.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def fake_launch(tmp_path, answer: bytes | None, timeout: str = "1"):
    launcher = install.build_launcher(str(tmp_path / "bpflb-cni"))
    agent = FakeAgent(str(tmp_path / "fake.sock"), answer)
    try:
        t = time.monotonic()
        r = subprocess.run([launcher], input=json.dumps({"cniVersion": "1.0.0", "agentSocket": str(tmp_path / "fake.sock")}),
                           env={"CNI_COMMAND": "ADD", "BPFLB_CNI_TIMEOUT": timeout}, capture_output=True, text=True,
                           timeout=30)
        return r, time.monotonic() - t
    finally:
        agent.close()


def test_the_launcher_gives_up_on_a_silent_agent(tmp_path):
    r, took = fake_launch(tmp_path, None)
    assert r.returncode == 1 and took < 10, (r, took)
    err = json.loads(r.stdout)
    assert err["code"] == 11 and err["cniVersion"] == "1.0.0" and "read: Connection timed out" in err["msg"], err


@pytest.mark.parametrize("rc,status", [(0, 0), (1, 1), (7, 7), (255, 255), (256, 1), (2 ** 32 - 1, 1)],
                         ids=["ok", "error", "seven", "max", "256-is-not-success", "huge"])
def test_the_launcher_passes_the_exit_status_through(tmp_path, rc, status):
    out = b'{"cniVersion": "1.0.0", "code": 7, "msg": "x"}'
    r, _ = fake_launch(tmp_path, struct.pack("<II", rc, len(out)) + out)
    assert r.returncode == status and r.stdout.encode() == out, r


# ---- DEL while the agent is down ---------------------------------------------------------------------
def test_del_while_the_agent_is_down_is_queued_and_done_when_it_returns(node):
    pod = node.pod()
    r = node.cnitool("add", "bpflb", pod)
    assert r.returncode == 0, r.stdout + r.stderr
    node.stop_server()
    r = node.cnitool("del", "bpflb", pod)  # the pod must not stick in Terminating
    assert r.returncode == 0 and "DEL queued" in r.stderr, r.stdout + r.stderr
    queue = os.path.join(os.path.dirname(node.sock), server.DEL_QUEUE)
    assert [n for n in os.listdir(queue) if n.endswith(".del")] and len(reserved(node)) == 1
    subprocess.run(["ip", "netns", "del", os.path.basename(pod)], check=True)  # the runtime removes the namespace
    node.pods.remove(os.path.basename(pod))
    node._start_server()  # replays the queue before it listens
    assert os.listdir(queue) == [] and reserved(node) == [] and records(node) == [] and host_veths(node) == []
    assert node.launcher("ADD", node.plugin_conf, cid="after", netns=node.pod())[0] == 0  # and serves again


def test_a_queued_del_does_not_undo_a_later_add(node):
    pod = node.pod()
    queue = os.path.join(os.path.dirname(node.sock), server.DEL_QUEUE)
    node.stop_server()
    assert node.launcher("DEL", node.plugin_conf, cid="again", netns=pod) == (0, None)  # queued
    (name,) = [n for n in os.listdir(queue) if n.endswith(".del")]
    held = open(os.path.join(queue, name), "rb").read()
    os.unlink(os.path.join(queue, name))
    node._start_server()
    assert node.launcher("ADD", node.plugin_conf, cid="again", netns=pod)[0] == 0  # the pod came back
    node.stop_server()
    with open(os.path.join(queue, name), "wb") as f:  # the DEL queued before that ADD, found only now
        f.write(held)
    old = time.time() - 60
    os.utime(os.path.join(queue, name), (old, old))
    node._start_server()
    assert os.listdir(queue) == [] and len(reserved(node)) == 1 and records(node) == ["again:eth0.json"]
    assert node.launcher("CHECK", node.plugin_conf, cid="again", netns=pod) == (0, None)


def test_without_any_agent_ever_del_is_not_faked(tmp_path):
    launcher = install.build_launcher(str(tmp_path / "bpflb-cni"))
    r = subprocess.run([launcher], input=json.dumps({"cniVersion": "1.0.0", "agentSocket": str(tmp_path / "no.sock")}),
                       env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"}, capture_output=True,
                       text=True)
    assert r.returncode == 1 and json.loads(r.stdout)["code"] == 11  # no queue: no agent ever ran here


# ---- one lock per attachment -----------------------------------------------------------------------------
def test_add_del_check_of_one_attachment_are_serialised(node):
    pod = node.pod()
    ops = ["ADD", "DEL", "CHECK"] * 10

    def one(op):
        conf = dict(node.plugin_conf)
        return op, node.launcher(op, conf, cid="racy", netns=pod)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, ops))
    assert all(rc == 0 for op, (rc, _) in results if op in ("ADD", "DEL")), results
    # whatever order they ran in, the attachment is whole or wholly gone
    whole = (len(reserved(node)), records(node), len(host_veths(node)), "eth0" in in_pod(node, pod, "ip", "-o", "link"))
    assert whole in [(1, ["racy:eth0.json"], 1, True), (0, [], 0, False)], whole
    assert node.launcher("DEL", node.plugin_conf, cid="racy", netns=pod) == (0, None)
    assert reserved(node) == [] and records(node) == [] and host_veths(node) == []
    assert os.listdir(os.path.join(node.data, "locks")) == []  # DEL takes its lock file with it


def test_gc_never_removes_an_attachment_whose_add_is_in_progress(node):
    pods = [node.pod(), node.pod()]
    for i, p in enumerate(pods):
        assert node.launcher("ADD", node.plugin_conf, cid=f"g{i}", netns=p)[0] == 0
    lock = os.open(os.path.join(node.data, "locks", "g0:eth0.lock"), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # g0's ADD (a retry) is in progress
    try:
        gc = dict(node.plugin_conf, **{"cni.dev/valid-attachments": []})
        assert node.launcher("GC", gc) == (0, None)
        assert records(node) == ["g0:eth0.json"] and host_veths(node) == [netsetup.host_ifname("g0", "eth0")]
    finally:
        os.close(lock)
    assert node.launcher("GC", gc) == (0, None)  # done: now it is stale like the other
    assert records(node) == [] and reserved(node) == [] and host_veths(node) == []


def test_gc_tolerates_damaged_records_and_reservations(node):
    pods = [node.pod(), node.pod()]
    for i, p in enumerate(pods):
        assert node.launcher("ADD", node.plugin_conf, cid=f"d{i}", netns=p)[0] == 0
    edir, idir = os.path.join(node.data, "endpoints"), os.path.join(node.data, "ipam", "bpflb")
    with open(os.path.join(edir, "d0:eth0.json"), "wb") as f:
        f.write(b"\x00\xff{garbage")
    with open(os.path.join(idir, "10.244.7.200"), "wb") as f:
        f.write(b"")  # an older version's crash between create and write
    with open(os.path.join(edir, "junk.json"), "w") as f:
        f.write("[1, 2")  # neither a record nor named like one: left alone
    gc = dict(node.plugin_conf, **{"cni.dev/valid-attachments": [{"containerID": "d1", "ifname": "eth0"}]})
    assert node.launcher("GC", gc) == (0, None)
    assert records(node) == ["d1:eth0.json", "junk.json"] and len(reserved(node)) == 1
    assert host_veths(node) == [netsetup.host_ifname("d1", "eth0")]
    assert node.launcher("CHECK", node.plugin_conf, cid="d1", netns=pods[1]) == (0, None)


# ---- the node as kubelet leaves it ---------------------------------------------------------------------
def test_the_server_runs_with_proc_sys_read_only_and_still_sets_up_pods(node):
    mounts = open(f"/proc/{node.server.pid}/mountinfo").read().splitlines()
    assert any(l.split()[4] == "/proc/sys" and "ro" in l.split()[5].split(",") for l in mounts)
    pod = node.pod()
    rc, res = node.launcher("ADD", node.plugin_conf, cid="ro", netns=pod)
    assert rc == 0, res
    host_if = res["interfaces"][0]["name"]
    assert node.in_ns(["cat", f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp",
                       f"/proc/sys/net/ipv4/conf/{host_if}/forwarding"]).stdout.split() == ["1", "1"]
    assert node.launcher("DEL", node.plugin_conf, cid="ro", netns=pod) == (0, None)


def test_add_on_a_node_without_ip_forward_forwards_per_device_and_leaves_the_node_setting(node):
    """The kernel forwards by the input device's setting: the host veth's is turned on over netlink,
    the node-wide ip_forward (no netlink setter, the node's to set) is neither needed nor written."""
    node.forwarding(False)
    pod = node.pod()
    rc, res = node.launcher("ADD", node.plugin_conf, cid="nofwd", netns=pod)
    assert rc == 0, res
    host_if = res["interfaces"][0]["name"]
    assert node.in_ns(["cat", f"/proc/sys/net/ipv4/conf/{host_if}/forwarding"]).stdout.strip() == "1"
    assert node.in_ns(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"  # not written behind our back
    assert node.launcher("DEL", node.plugin_conf, cid="nofwd", netns=pod) == (0, None)


# ---- the CNI pool is not the sync loop's --------------------------------------------------------------------
def test_cni_requests_are_served_while_the_default_executor_is_saturated(tmp_path):
    path = str(tmp_path / "own.sock")
    launcher = install.build_launcher(str(tmp_path / "bpflb-cni"))
    answers = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        release = threading.Event()
        blocked = asyncio.ensure_future(asyncio.to_thread(release.wait))  # the sync loop's only thread, busy
        stop = asyncio.Event()
        task = asyncio.create_task(server.serve(path, stop))
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        r = await asyncio.create_subprocess_exec(launcher, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 env={"CNI_COMMAND": "VERSION", "BPFLB_CNI_SOCKET": path})
        out, _ = await asyncio.wait_for(r.communicate(b'{"cniVersion": "1.1.0"}'), 20)
        answers.append((r.returncode, json.loads(out)))
        release.set()
        await blocked
        stop.set()
        await task

    asyncio.run(main())
    assert answers == [(0, {"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})]
