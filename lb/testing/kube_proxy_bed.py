"""The real kube-proxy (v1.34.4, built by scripts/build-components.sh) in network namespaces, next to
kubelet's and kube-router's chains, for tests of lb/kube_proxy_rules.py.

    with ControlPlane() as cp, Netns("kpx-a", iptables_variant="legacy") as ns:  # `iptables` in ns
        node_objects(cp)                                  # a Node and Services with EndpointSlices
        add_kubelet_chains(ns)                            # as kubelet v1.34 makes them
        with LoopbackRelay(ns, cp.port) as relay:         # 127.0.0.1:<port> in ns -> the API server
            run_kube_proxy(ns, cp, relay.port, "iptables", synced=lambda: ...)  # until synced() is true
        add_kube_router_chains(ns)
        before = ruleset(ns)                              # every backend's tables, counters stripped
        kube_proxy_cleanup(ns, "iptables")                # the reference: `kube-proxy --cleanup`

Nothing here touches the root namespace's tables: every iptables/nft/ip command runs under
`nsenter --net=/run/netns/NAME`, and kube-proxy itself too. The API server stays on the root namespace's
127.0.0.1 (lb/testing/apiserver.py); a namespace's loopback is its own, so LoopbackRelay listens on the
namespace's 127.0.0.1 (its socket made inside it, lb/netns.py) and forwards each connection to the API
server from the root namespace. The namespace has no other interface and no route out.

Which iptables kube-proxy runs: the binary calls `iptables`, `iptables-save`, `iptables-restore` (and the
ip6tables ones) from PATH (pkg/util/iptables); its image's wrapper points them at the backend kubelet
uses. Here a per-namespace directory of symlinks first in PATH does the same: `iptables` is iptables-nft
(Debian's default alternative) or iptables-legacy, as Netns.iptables_variant says.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .. import netns as netns_
from .apiserver import ControlPlane, _die_with_parent, _tail
from .bed import CLIENT_V4, backend_v4

NODE_NAME = "node-a"
NODE_IP = CLIENT_V4                 # only written in the Node object; the namespace holds no address
CLUSTER_IP = "10.96.0.10"
LB_IP = "10.96.200.1"               # the LoadBalancer Service's status.loadBalancer.ingress
EXTERNAL_IP = "10.96.200.2"
ENDPOINTS = [backend_v4(11), backend_v4(12)]
IPTABLES_TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save",
                  "ip6tables-restore")


class Netns:
    """A network namespace (`ip netns add`), loopback up, removed on exit even after a failure."""

    def __init__(self, name: str, iptables_variant: str = "nft") -> None:
        self.name = f"{name}-{os.getpid()}"
        self.path = f"/run/netns/{self.name}"
        self.iptables_variant = iptables_variant
        self.bindir = Path(tempfile.mkdtemp(prefix=f"bpflb-{self.name}-"))

    def __enter__(self) -> "Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        for f in self.bindir.iterdir():
            f.unlink()
        self.bindir.rmdir()

    def env(self, fake_modprobe: bool = False) -> dict[str, str]:
        """PATH where `iptables` and friends are the chosen backend's; with fake_modprobe, `modprobe`
        succeeds (kube-proxy's ipvs cleanup runs only after `modprobe -va ip_vs` did; this kernel has no
        modprobe binary nor IPVS, and the cleanup's iptables part does not need them)."""
        for tool in IPTABLES_TOOLS:
            link = self.bindir / tool
            family, _, rest = tool.partition("-")
            target = f"/usr/sbin/{family}-{self.iptables_variant}" + (f"-{rest}" if rest else "")
            if link.is_symlink() and os.readlink(link) != target:
                link.unlink()
            if not link.is_symlink():
                link.symlink_to(target)
        modprobe = self.bindir / "modprobe"
        if fake_modprobe and not modprobe.exists():
            modprobe.symlink_to("/bin/true")
        elif not fake_modprobe and modprobe.is_symlink():
            modprobe.unlink()
        return {**os.environ, "PATH": f"{self.bindir}:/usr/sbin:/usr/bin:/sbin:/bin"}

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", *argv]

    def run(self, *argv: str, check: bool = True, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(*argv), capture_output=True, text=True, env=env or self.env(), input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(argv)}: {r.stderr.strip()}")
        return r

    def ipt(self, family: str, *args: str) -> None:
        """`iptables` (family "4") or `ip6tables` ("6") of this namespace's chosen backend."""
        self.run("iptables" if family == "4" else "ip6tables", "-w", *args)


class LoopbackRelay:
    """127.0.0.1:<port> inside the namespace, forwarded to 127.0.0.1:<target> of the root namespace."""

    def __init__(self, ns: Netns, target: int) -> None:
        self.target = target

        def listen() -> socket.socket:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            return s

        self.sock = netns_.run_in(ns.path, listen)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"relay:{ns.name}", daemon=True)

    def __enter__(self) -> "LoopbackRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# ---- the objects kube-proxy programs ------------------------------------------------------------
def _manifests() -> str:
    def svc(name: str, spec: str) -> str:
        return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{app: {name}}}
{spec}"""

    def slice_(name: str) -> str:
        eps = "\n".join(f"- {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}"
                        for ip in ENDPOINTS)
        return f"""---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{eps}
"""

    return "".join([
        f"""---
apiVersion: v1
kind: Node
metadata: {{name: {NODE_NAME}}}
spec: {{podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24]}}
""",
        # KUBE-SVC-* and KUBE-SEP-*; an externalIP for KUBE-EXT-*
        svc("web", f"""  clusterIP: {CLUSTER_IP}
  externalIPs: ["{EXTERNAL_IP}"]
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
"""), slice_("web"),
        # NodePort with externalTrafficPolicy Local: KUBE-NODEPORTS, KUBE-EXT-*, KUBE-SVL-*
        svc("local", """  type: NodePort
  externalTrafficPolicy: Local
  ports: [{name: http, port: 81, protocol: TCP, targetPort: 8080}]
"""), slice_("local"),
        # LoadBalancer with source ranges: KUBE-FW-* and KUBE-PROXY-FIREWALL rules
        svc("lb", """  type: LoadBalancer
  loadBalancerSourceRanges: ["192.0.2.0/24"]
  ports: [{name: http, port: 82, protocol: TCP, targetPort: 8080}]
"""), slice_("lb"),
    ])


def node_objects(cp: ControlPlane) -> None:
    """A Node (with its InternalIP) and three Services with ready endpoints on it."""
    cp.kubectl("apply", "-f", "-", input=_manifests())
    cp.kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=merge", "-p",
               f'{{"status":{{"addresses":[{{"type":"InternalIP","address":"{NODE_IP}"}}]}}}}')
    cp.kubectl("patch", "service", "lb", "--subresource=status", "--type=merge", "-p",
               f'{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}"}}]}}}}}}')


# ---- the real kube-proxy ------------------------------------------------------------------------
def kube_proxy_binary() -> str:
    """The built kube-proxy; builds it first if this machine's components predate it."""
    from .apiserver import ROOT, components
    path = components().get("KUBE_PROXY", "")
    if not path or not os.path.exists(path):
        subprocess.run([str(ROOT / "scripts" / "build-components.sh")], check=True, stdout=subprocess.DEVNULL)
        path = components()["KUBE_PROXY"]
    return path


def _relay_kubeconfig(cp: ControlPlane, ns: Netns, port: int) -> Path:
    path = cp._d / f"kube-proxy-{ns.name}.kubeconfig"
    text = cp.kubeconfig.read_text().replace(cp.url, f"https://127.0.0.1:{port}")
    path.write_text(text)
    return path


def run_kube_proxy(ns: Netns, cp: ControlPlane, relay_port: int, mode: str, synced: Callable[[], bool],
                   timeout: float = 60) -> None:
    """Run kube-proxy in `mode` inside ns until synced() says its rules are there, then stop it (SIGTERM:
    it leaves its rules behind, as a crashed or removed kube-proxy does)."""
    log = cp._d / f"kube-proxy-{ns.name}-{mode}.log"
    argv = ns.argv(kube_proxy_binary(), f"--kubeconfig={_relay_kubeconfig(cp, ns, relay_port)}",
                   f"--hostname-override={NODE_NAME}", f"--proxy-mode={mode}",
                   "--healthz-bind-address=127.0.0.1:10256", "--metrics-bind-address=127.0.0.1:10249",
                   # nf_conntrack_max is the root namespace's alone: leave every conntrack sysctl as it is
                   "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                   "--conntrack-tcp-timeout-close-wait=0", "--v=2")
    with open(log, "w") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=ns.env(), preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + timeout
        while not synced():
            if p.poll() is not None:
                raise RuntimeError(f"kube-proxy exited {p.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-proxy did not program its rules in {timeout} s:\n{_tail(log)}")
            time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def kube_proxy_cleanup(ns: Netns, mode: str) -> subprocess.CompletedProcess:
    """The reference: `kube-proxy --cleanup` inside ns (it removes every mode's rules, whatever the mode)."""
    return ns.run(kube_proxy_binary(), "--cleanup", f"--proxy-mode={mode}", "--v=2", check=False,
                  env=ns.env(fake_modprobe=True))


# ---- ipvs mode, by hand ----------------------------------------------------------------------------
# This kernel has no IPVS, so kube-proxy's ipvs mode cannot run here. Its chains and jumps are written as
# its createAndLinkKubeChain does (pkg/proxy/ipvs/proxier.go v1.34: iptablesChains, then iptablesJumpChain
# prepended with their comments), with a few of the rules its sync writes that stay inside its own
# chains (no `-m set` matches: no ipset binary here). Not the kube-ipvs0 dummy: this kernel has no dummy
# links ("Unknown device type").
IPVS_CHAINS = [("nat", "KUBE-SERVICES"), ("nat", "KUBE-POSTROUTING"), ("nat", "KUBE-NODE-PORT"),
               ("nat", "KUBE-LOAD-BALANCER"), ("nat", "KUBE-MARK-MASQ"), ("filter", "KUBE-FORWARD"),
               ("filter", "KUBE-NODE-PORT"), ("filter", "KUBE-PROXY-FIREWALL"),
               ("filter", "KUBE-SOURCE-RANGES-FIREWALL"), ("filter", "KUBE-IPVS-FILTER"),
               ("filter", "KUBE-IPVS-OUT-FILTER")]
IPVS_JUMPS = [("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
              ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
              ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
              ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
              ("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
              ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
              ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
              ("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
              ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter")]


def add_ipvs_mode_chains(ns: Netns) -> None:
    for fam in ("4", "6"):
        for table, chain in IPVS_CHAINS:
            ns.ipt(fam, "-t", table, "-N", chain)
        for table, src, dst, comment in IPVS_JUMPS:
            ns.ipt(fam, "-t", table, "-I", src, "-m", "comment", "--comment", comment, "-j", dst)
        ns.ipt(fam, "-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", "0x4000")
        ns.ipt(fam, "-t", "nat", "-A", "KUBE-POSTROUTING", "-m", "comment", "--comment",
               "kubernetes service traffic requiring SNAT", "-m", "mark", "--mark", "0x4000/0x4000",
               "-j", "MASQUERADE")
        ns.ipt(fam, "-t", "nat", "-A", "KUBE-SERVICES", "-m", "addrtype", "--dst-type", "LOCAL",
               "-j", "KUBE-NODE-PORT")
        ns.ipt(fam, "-t", "filter", "-A", "KUBE-FORWARD", "-m", "comment", "--comment",
               "kubernetes forwarding rules", "-m", "mark", "--mark", "0x4000/0x4000", "-j", "ACCEPT")


# ---- other components' KUBE-* chains ------------------------------------------------------------
def add_kubelet_chains(ns: Netns) -> None:
    """kubelet v1.34's chains (pkg/kubelet/kubelet_network_linux.go syncIPTablesRules, and the canary its
    iptables Monitor makes in mangle, nat and filter), for both families, with the backend ns uses."""
    for fam in ("4", "6"):
        ns.ipt(fam, "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        if fam == "4":  # the martian-packet protection (CVE-2020-8558) is IPv4 only
            ns.ipt(fam, "-t", "filter", "-N", "KUBE-FIREWALL")
            ns.ipt(fam, "-t", "filter", "-I", "OUTPUT", "-j", "KUBE-FIREWALL")
            ns.ipt(fam, "-t", "filter", "-I", "INPUT", "-j", "KUBE-FIREWALL")
            ns.ipt(fam, "-t", "filter", "-A", "KUBE-FIREWALL", "-m", "comment", "--comment",
                   "block incoming localnet connections", "--dst", "127.0.0.0/8", "!", "--src", "127.0.0.0/8",
                   "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP")
        for table in ("mangle", "nat", "filter"):
            ns.ipt(fam, "-t", table, "-N", "KUBE-KUBELET-CANARY")


def add_kube_router_chains(ns: Netns) -> None:
    """kube-router's network policy chains (pkg/controllers/netpol): KUBE-ROUTER-INPUT/FORWARD/OUTPUT
    hooked from the built-in chains, per-pod KUBE-POD-FW-* and per-policy KUBE-NWPLCY-* chains."""
    for fam in ("4", "6"):
        for builtin in ("INPUT", "FORWARD", "OUTPUT"):
            ns.ipt(fam, "-t", "filter", "-N", f"KUBE-ROUTER-{builtin}")
            ns.ipt(fam, "-t", "filter", "-I", builtin, "1", "-m", "comment", "--comment",
                   "kube-router netpol - 4IA2OSFRMVNDXBVV", "-j", f"KUBE-ROUTER-{builtin}")
        ns.ipt(fam, "-t", "filter", "-N", "KUBE-NWPLCY-DEFAULT")
        ns.ipt(fam, "-t", "filter", "-A", "KUBE-NWPLCY-DEFAULT", "-m", "comment", "--comment",
               "rule to mark traffic matching a network policy", "-j", "MARK", "--set-xmark", "0x10000/0x10000")
        ns.ipt(fam, "-t", "filter", "-N", "KUBE-NWPLCY-LBHNIQK5UH4KL5QG")
        ns.ipt(fam, "-t", "filter", "-N", "KUBE-POD-FW-TLOVEAHMUMTJRLDR")
        ns.ipt(fam, "-t", "filter", "-A", "KUBE-POD-FW-TLOVEAHMUMTJRLDR", "-j", "KUBE-NWPLCY-DEFAULT")
        ns.ipt(fam, "-t", "filter", "-A", "KUBE-POD-FW-TLOVEAHMUMTJRLDR", "-j", "KUBE-NWPLCY-LBHNIQK5UH4KL5QG")
        ns.ipt(fam, "-t", "filter", "-A", "KUBE-ROUTER-FORWARD", "-m", "comment", "--comment",
               "rule to jump traffic destined to POD name:web-0 namespace: default to chain "
               "KUBE-POD-FW-TLOVEAHMUMTJRLDR", "-j", "KUBE-POD-FW-TLOVEAHMUMTJRLDR")


# ---- what the namespace holds -------------------------------------------------------------------
_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def ruleset(ns: Netns) -> dict[str, str]:
    """Every iptables backend's tables and the nft ruleset of ns, counters and comments stripped."""
    out = {}
    for tool in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
        text = ns.run(tool).stdout
        out[tool] = "\n".join(_COUNTERS.sub("[0:0]", line) for line in text.splitlines()
                              if not line.startswith("#"))
    nft = ns.run("nft", "list", "ruleset").stdout
    out["nft"] = "\n".join(_NFT_COUNTER.sub("counter", line) for line in nft.splitlines()
                           if not line.startswith("# Warning"))
    out["ip link"] = "\n".join(sorted(line.split(":")[1].strip() for line in
                                      ns.run("ip", "-o", "link", "show").stdout.splitlines()))
    return out


def chains(text: str) -> set[str]:
    """The chain names in iptables-save text."""
    return {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}


def in_ns_python(ns: Netns, code: str, root: Path) -> subprocess.CompletedProcess:
    """Run Python code inside ns (the tree at root importable): how the tests call find() and remove()."""
    import sys
    env = {**os.environ, "PYTHONPATH": str(root)}  # the system's PATH: no shim, as on a node
    r = subprocess.run(ns.argv(sys.executable, "-c", code), capture_output=True, text=True, env=env, cwd=root)
    if r.returncode != 0:
        raise RuntimeError(f"in {ns.name}: python failed:\n{r.stderr}")
    return r
