"""The test bed: a client namespace and a backend namespace joined by a veth pair, and a cgroup.

The client namespace has routes to the backend subnets only, never a default route: a packet to a
service address the datapath failed to translate fails locally (ENETUNREACH) and never leaves.

Address plan (one place; tests/conftest.py re-exports it):
  client ns  veth 10.200.0.1/24  fd00:200::1/64
  backend ns veth 10.200.0.2/24  fd00:200::2/64, backends 10.200.1.N/32 and fd00:201::N/128
  service VIPs are taken from 10.96.0.0/16 and fd00:96::/64 and are never routed anywhere.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns

from .. import netns as netns_
from ..settings import default_cgroup_root

CGROUP2 = default_cgroup_root()  # the cgroup2 mount (/sys/fs/cgroup/unified on hybrid hosts)
CLIENT_V4, BACKEND_GW_V4 = "10.200.0.1", "10.200.0.2"
CLIENT_V6, BACKEND_GW_V6 = "fd00:200::1", "fd00:200::2"
BACKEND_NET_V4, BACKEND_NET_V6 = "10.200.1.0/24", "fd00:201::/64"
CLUSTER_NET_V4, CLUSTER_NET_V6 = "10.96.0.0/16", "fd00:96::/64"


def backend_v4(n: int) -> str:
    return f"10.200.1.{n}"


def backend_v6(n: int) -> str:
    return f"fd00:201::{n:x}"




def enter(netns_name: str | None, cgroup: str | None) -> None:
    """Join a cgroup and a network namespace (in a child before exec). setns, not `ip netns exec`:
    that remounts /sys and would hide the cgroup2 mount."""
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    if netns_name:
        netns_.enter(f"/run/netns/{netns_name}")


@dataclass
class Bed:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    backends: int = 4
    cgroup_parent: str = CGROUP2
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client_ns = f"bl{self.tag}c"
        self.backend_ns = f"bl{self.tag}b"
        self.cgroup = os.path.join(self.cgroup_parent, f"bpflb-test-{self.tag}")
        self.bpf_root = f"/sys/fs/bpf/bpflb-test-{self.tag}"

    # ---- setup / teardown ----
    def up(self) -> "Bed":
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        os.makedirs(self.cgroup)
        netns.create(self.client_ns)
        netns.create(self.backend_ns)
        with IPRoute(netns=self.client_ns) as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.backend_ns})
        for ns, v4, v6 in ((self.client_ns, CLIENT_V4, CLIENT_V6), (self.backend_ns, BACKEND_GW_V4, BACKEND_GW_V6)):
            with IPRoute(netns=ns) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                eth = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=lo, state="up")
                ipr.addr("add", index=eth, address=v4, prefixlen=24)
                ipr.addr("add", index=eth, address=v6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                ipr.link("set", index=eth, state="up")
                if ns == self.backend_ns:
                    for n in range(1, self.backends + 1):
                        ipr.addr("add", index=lo, address=backend_v4(10 + n), prefixlen=32)
                        ipr.addr("add", index=lo, address=backend_v6(0x10 + n), prefixlen=128, flags=0x02)
                else:
                    ipr.route("add", dst=BACKEND_NET_V4, gateway=BACKEND_GW_V4)
                    ipr.route("add", dst=BACKEND_NET_V6, gateway=BACKEND_GW_V6)
        self._wait_v6()

    def _wait_v6(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ok = subprocess.run(["ip", "netns", "exec", self.client_ns, "ping", "-6", "-c1", "-W1", BACKEND_GW_V6],
                                capture_output=True).returncode == 0 if _have("ping") else True
            if ok:
                return
            time.sleep(0.1)

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        self._kill_cgroup()
        for ns in (self.client_ns, self.backend_ns):
            try:
                netns.remove(ns)
            except OSError:
                pass
        if os.path.isdir(self.cgroup):
            for _ in range(50):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)

    def _kill_cgroup(self) -> None:
        procs = os.path.join(self.cgroup, "cgroup.procs")
        for _ in range(50):
            try:
                with open(procs) as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> "Bed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ---- processes ----
    def popen(self, argv: list[str], ns: str | None, cgroup: bool, **kw) -> subprocess.Popen:
        cg = self.cgroup if cgroup else None
        p = subprocess.Popen(argv, preexec_fn=lambda: enter(ns, cg), **kw)
        self.procs.append(p)
        return p

    def client(self, *args: str, **kw) -> subprocess.Popen:
        """The client program in the client namespace and the served cgroup."""
        return self.popen([sys.executable, "-m", "lb.testing.client", *args], self.client_ns, True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def run_client(self, *args: str, timeout: float = 60) -> dict:
        import json

        p = self.client(*args)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"client {args} failed ({p.returncode}): {err.strip()}")
        return json.loads(out)

    def servers(self, addrs: list[str], port: int, udp: bool = True) -> subprocess.Popen:
        """Echo-identity servers in the backend namespace, TCP (and UDP) on each address:port."""
        argv = [sys.executable, "-m", "lb.testing.server", "--port", str(port)] + (["--udp"] if udp else []) + addrs
        p = self.popen(argv, self.backend_ns, False, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()  # "ready"
        if line.strip() != "ready":
            raise RuntimeError(f"servers did not start: {line!r}")
        return p


def _have(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None
