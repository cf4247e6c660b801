"""A CNI test node: a network namespace holding the plugin server, the installed launcher and config,
and pod namespaces; the launcher and cnitool run inside it, so host-side devices never touch the host.
Used by tests/test_cni.py and bench/cni_add_latency.py.

The node is set up as a Kubernetes node is: net.ipv4.ip_forward=1 (its administrator's job). The server
runs as the DaemonSet's container does: in its own mount namespace with /proc/sys read-only (kubelet's
mount), checking that callers share the node's (the test process's) mount and network namespaces."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import uuid

from ..cni.install import build_launcher, install
from .apiserver import components
from .bed import enter

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
CLONE_NEWNS, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 0x20000, 1, 32, 4096, 16384, 1 << 19


def _mount(src, target, flags) -> None:
    if _libc.mount(src, target.encode(), None, flags, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def read_only_proc_sys() -> None:
    """In a child before exec: a mount namespace of its own (still receiving the host's new mounts,
    e.g. /run/netns/*) where /proc/sys is read-only, as kubelet mounts it in a container."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    _mount(None, "/", MS_REC | MS_SLAVE)
    _mount(b"/proc/sys", "/proc/sys", MS_BIND)
    _mount(None, "/proc/sys", MS_BIND | MS_REMOUNT | MS_RDONLY)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CIDR = "10.244.7.0/24"
GW = "10.244.7.1"


class Node:
    def __init__(self, tmp_path):
        self.tag = uuid.uuid4().hex[:6]
        self.ns = f"blc{self.tag}"
        self.dir = tmp_path
        self.sock = str(tmp_path / "cni.sock")
        self.data = str(tmp_path / "data")
        self.bin = str(tmp_path / "bin")
        self.conf = str(tmp_path / "net.d")
        self.pods: list[str] = []
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.server = None
        self.mntns = f"/proc/{os.getpid()}/ns/mnt"  # the node's: the runtime (this process) runs there
        try:
            self._start_server()
        except BaseException:
            self.close()  # the namespace and the server go even if the server never became ready
            raise

    def _start_server(self, *extra: str) -> None:
        def child() -> None:
            enter(self.ns, None)
            read_only_proc_sys()

        self.forwarding(True)
        self.server = subprocess.Popen([sys.executable, "-m", "lb.cni.server", self.sock, "--node-mntns", self.mntns,
                                        *extra], cwd=ROOT, preexec_fn=child, stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "ready"

    def forwarding(self, on: bool) -> None:
        """net.ipv4.ip_forward of the node, as its administrator sets it."""
        subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}"], check=True)

    def stop_server(self) -> None:
        self.server.terminate()
        self.server.wait()

    def install(self, **conf) -> None:
        conf.setdefault("socket", self.sock)
        install(self.bin, self.conf, launcher=build_launcher(str(self.dir / "launcher")), pod_cidr=conf.pop("pod_cidr", CIDR),
                **conf)
        with open(os.path.join(self.conf, "05-bpflb.conflist")) as f:
            doc = json.load(f)
        doc["plugins"][0]["dataDir"] = self.data
        with open(os.path.join(self.conf, "05-bpflb.conflist"), "w") as f:
            json.dump(doc, f)
        # Direct launcher calls speak the newest version (the conflist offers 1.0.0 and 1.1.0).
        self.plugin_conf = dict(doc["plugins"][0], cniVersion="1.1.0", name=doc["name"])

    def pod(self) -> str:
        name = f"blc{self.tag}p{len(self.pods)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.pods.append(name)
        return f"/run/netns/{name}"

    def in_ns(self, argv, env=None, input=None, ns=None) -> subprocess.CompletedProcess:
        target = ns or self.ns
        return subprocess.run(argv, preexec_fn=lambda: enter(target, None), capture_output=True, text=True,
                              env=env, input=input)

    def cnitool(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, NETCONFPATH=self.conf, CNI_PATH=self.bin)  # the socket: the conflist's agentSocket
        return self.in_ns([components()["CNITOOL"], *args], env=env)

    def launcher(self, command: str, conf: dict | str, cid: str = "", netns: str = "", ifname: str = "eth0"):
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
               "CNI_PATH": self.bin}  # the socket: the configuration's agentSocket
        env = {k: v for k, v in env.items() if v}
        r = self.in_ns([os.path.join(self.bin, "bpflb-cni")], env=env,
                       input=conf if isinstance(conf, str) else json.dumps(conf))
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)

    def host_links(self) -> list[str]:
        return [l.split(":")[1].strip().split("@")[0] for l in self.in_ns(["ip", "-o", "link"]).stdout.splitlines()]

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        for p in self.pods:
            subprocess.run(["ip", "netns", "del", p], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
