"""A real Kubernetes node on this machine, the way k3s assembles one, with kube-proxy left out and bpflb
installed as a user installs it: for `make conformance`, tests (tests/test_node.py) and benches.

    with Node() as node:                      # minutes the first time (images imported, bpf compiled)
        node.kubectl("get", "pods", "-A")
        node.in_node(["curl", ...])           # a command as a process of the node (its namespaces, its cgroup)
    with Node(nodes=2) as nodes: ...          # NAME with the control plane, NAME-2 with containerd + kubelet

What start() assembles (stop() takes every piece away again, even after a failed step):
- a "world" network namespace (NAME-world): a bridge at WORLD_IP and no route anywhere, so a packet nothing
  translated dies there; each node (Host) is a network namespace (NAME, NAME-2...) with eth0 on that bridge
  at NODE_IP, NODE_IP+1... and its default route via WORLD_IP.
- each node's mount, cgroup and UTS namespaces (Host says how): its own bpffs, its cgroup subtree /NAME as
  the cgroup root it sees, its own directories at the DaemonSet's per-node hostPaths, its name as hostname.
  Every process of the node runs in all of them (Host.enter; never `ip netns exec`, which remounts /sys).
- certificates (lb/testing/pki.py): CA, kube-apiserver serving (node address, the `kubernetes` Service's
  ClusterIP, 127.0.0.1, kubernetes.default.svc...), kubelet serving, kube-apiserver -> kubelet client, and a
  client certificate per component; each kubelet is system:node:<its name> in system:nodes (Node authorizer
  and NodeRestriction on).
- on the first node: etcd, kube-apiserver (0.0.0.0:6443 in the node's namespace), kube-controller-manager
  (allocates pod CIDRs from CLUSTER_CIDR), kube-scheduler.
- on each node: Debian's containerd with its own config, socket, root and state under the fixture's directory (cgroupfs,
  overlayfs, pause image registry.k8s.io/pause:3.10.1), CNI directories where k3s keeps them (the paths
  manifests/daemonset.yaml mounts), Debian's `loopback` plugin copied there (containerd always calls it).
  Images are imported from OCI archives (scripts/build-node-images.sh, scripts/build-image.sh): nothing is
  pulled.
- on each node: the kubelet, pods under the root of the node's cgroup namespace (/NAME/kubepods on the
  machine; cgroupfs driver, cgroup v1 allowed), clusterDNS DNS_IP.
- bpflb: `kubectl apply -k` of a copy of manifests/ with the ConfigMap's api-server-host/-port set to the node
  address (README, "Install"); the agent installs its CNI launcher and conflist, the node turns Ready.
- CoreDNS as kube-dns at DNS_IP (kubernetes plugin only: nothing is forwarded anywhere).
Ready means: every node Ready, the bpflb pods ready, CoreDNS ready, and a pod on the last node that resolves
kubernetes.default and reaches the API server through the Service's ClusterIP.

The kubelet writes kernel settings (vm.overcommit_memory, kernel.panic, ...): they are read at start and
written back at stop. A previous run that was killed is swept at the next start (its directory records what
it found before it changed anything).

Service and pod networks are k3s's defaults (10.43.0.0/16, 10.42.0.0/16), apart from the 10.96.0.0/16 the
other test beds use. bpflb's socket programs attach to each node's cgroup subtree only: processes outside the
nodes (the machine's, other test beds') never see these ClusterIPs.

`python -m lb.testing.node [--nodes 2]` starts one, prints how to reach it and waits for Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from . import pki
from .apiserver import ROOT, _die_with_parent, _popen, components

CACHE = Path(os.environ.get("BPFLB_CACHE", "/var/cache/bpflb"))
IMAGES_ENV = CACHE / "images.env"

SERVICE_CIDR = "10.43.0.0/16"
API_SERVICE_IP = "10.43.0.1"
DNS_IP = "10.43.0.10"
CLUSTER_CIDR = "10.42.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"
COREDNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.12.1"
AGNHOST_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.56"

# Where k3s keeps the CNI plugins and configuration: manifests/daemonset.yaml mounts exactly these.
CNI_BIN_DIR = Path("/var/lib/rancher/k3s/data/cni")
CNI_CONF_DIR = Path("/var/lib/rancher/k3s/agent/etc/cni/net.d")
LOOPBACK_PLUGIN = Path("/usr/lib/cni/loopback")
BPFLB_STATE = Path("/var/lib/bpflb")         # the DaemonSet's state hostPath (IPAM, endpoint records)
BPFLB_RUN = Path("/run/bpflb")               # the DaemonSet's socket hostPath
RANCHER = Path("/var/lib/rancher")           # the CNI hostPaths are below it
# The DaemonSet's hostPaths that are each node's own: a directory of the node's is bound over each inside the
# node's mount namespace (Host.host_path says where it is on the machine). /sys/fs/bpf and /sys/fs/cgroup
# are the node's own file systems there; /lib/modules, /usr/src and /run/xtables.lock are the machine's.
BIND_PATHS = (BPFLB_STATE, BPFLB_RUN, RANCHER)
CGROUP_FS = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
# What the kubelet writes at start (pkg/kubelet/cm setupKernelTunables with protectKernelDefaults off).
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
# Host paths the node's processes create when absent (the kubelet, containerd's shims, the mount points of
# BIND_PATHS): removed at stop if they were absent at start.
HOST_PATHS = (Path("/var/log/containers"), Path("/var/log/pods"), Path("/run/containerd"), *BIND_PATHS,
              Path("/run/xtables.lock"))
BASE_DIR = Path("/var/tmp/bpflb-node")
LOCK_FILE = BASE_DIR / ".lock"


class NodeError(RuntimeError):
    pass


def _env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.partition("=")[::2] for line in path.read_text().splitlines() if "=" in line)


def node_binaries() -> dict[str, str]:
    """components.env with the node's binaries (scripts/build-components.sh --node), built if missing."""
    needed = ("KUBELET", "KUBE_CONTROLLER_MANAGER", "KUBE_SCHEDULER", "AGNHOST", "E2E_TEST")
    env = components()
    if any(k not in env for k in needed):
        subprocess.run([str(ROOT / "scripts" / "build-components.sh"), "--node"], check=True)
        env = components()
        missing = [k for k in needed if k not in env]
        if missing:
            raise NodeError(f"scripts/build-components.sh --node listed no {missing} in components.env")
    return env


def node_images() -> dict[str, str]:
    """images.env (scripts/build-node-images.sh), built if missing: image name -> OCI archive."""
    if not IMAGES_ENV.exists():
        subprocess.run([str(ROOT / "scripts" / "build-node-images.sh")], check=True)
    env = _env_file(IMAGES_ENV)
    out = {}
    for what in ("PAUSE", "AGNHOST", "COREDNS"):
        if f"{what}_IMAGE" in env and f"{what}_TAR" in env:
            out[env[f"{what}_IMAGE"]] = env[f"{what}_TAR"]
    for key, image in (("PAUSE_IMAGE", PAUSE_IMAGE), ("COREDNS_IMAGE", COREDNS_IMAGE), ("AGNHOST_IMAGE", AGNHOST_IMAGE)):
        if env.get(key, image) != image:
            raise NodeError(f"{IMAGES_ENV}: {key}={env[key]}, the node expects {image}")
    for k, v in env.items():  # any further image the build made (tests in scope may need it)
        if k.endswith("_TAR") and k[:-4] + "_IMAGE" in env:
            out[env[k[:-4] + "_IMAGE"]] = v
    return out


def bpflb_image() -> tuple[str, Path]:
    """localhost/bpflb:<version> and its archive (scripts/build-image.sh, run if missing or older than the
    sources it is built from)."""
    version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    tar = ROOT / "build" / f"bpflb-{version}.tar"
    sources = [ROOT / "Containerfile", ROOT / "pyproject.toml", ROOT / "scripts" / "build-image.sh",
               *(ROOT / "lb").rglob("*.py"), *(ROOT / "lb").rglob("*.c"), *(ROOT / "bpf").rglob("*")]
    sources = [p for p in sources if "testing" not in p.relative_to(ROOT).parts]  # test beds: not the agent's
    if not tar.exists() or max(p.stat().st_mtime for p in sources if p.is_file()) > tar.stat().st_mtime:
        subprocess.run([str(ROOT / "scripts" / "build-image.sh"), str(tar)], check=True)
    return f"localhost/bpflb:{version}", tar


# ---- processes, mounts, cgroups of the node (also used by the stale sweep) ---------------------------
def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in_netns(ino: int) -> set[int]:
    out = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}/ns/net").st_ino == ino:
                    out.add(int(p))
            except OSError:
                pass
    return out


def _cgroup_dirs(name: str) -> list[Path]:
    """/sys/fs/cgroup/<hierarchy>/<name> in each mounted hierarchy (v1 and the cgroup2 one), or <name> under
    a pure cgroup2 mount."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2") and mnt.startswith(str(CGROUP_FS)):
            out.append(Path(mnt) / name)
    return out


def _pids_in_cgroups(dirs: Iterable[Path]) -> set[int]:
    out = set()
    for d in dirs:
        for procs in d.rglob("cgroup.procs") if d.exists() else ():
            try:
                out.update(int(x) for x in procs.read_text().split())
            except OSError:
                pass
    return out


def _kill_all(find, timeout: float = 30) -> set[int]:
    """SIGKILL what find() returns until it returns nothing (a dying shim may still start something)."""
    left: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = find() - {os.getpid()}
        if not left:
            return left
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return left


def _mounts_under(prefixes: Iterable[str]) -> list[str]:
    prefixes = [p.rstrip("/") for p in prefixes]
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].replace("\\040", " ")
        if any(mnt == p or mnt.startswith(p + "/") for p in prefixes):
            out.append(mnt)
    return out


def _umount_all(prefixes: Iterable[str]) -> list[str]:
    """Detach every mount at or below the prefixes, deepest first; returns the ones left."""
    for _ in range(5):
        mounts = _mounts_under(prefixes)
        if not mounts:
            return []
        for m in sorted(set(mounts), key=lambda m: m.count("/"), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
    return _mounts_under(prefixes)


def _rmdir_cgroups(dirs: Iterable[Path]) -> list[str]:
    left = []
    for d in dirs:
        if not d.exists():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [d]:
            for _ in range(50):
                try:
                    sub.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                left.append(str(sub))
    return left


CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    """In this process's bounding set (what any container of the node can be given at most)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise NodeError(f"{' '.join(map(str, argv))}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def _propagation(mountpoint: str) -> str:
    r = _run(["findmnt", "-n", "-o", "PROPAGATION", mountpoint], check=False)
    return r.stdout.strip()


def _found_on_host() -> dict:
    """What a run may change on the machine, as found before it changed anything (stop() and the next
    start's sweep read it back from each node's found.json)."""
    return {
        "sysctls": {k: _read_sysctl(k) for k in KUBELET_SYSCTLS},
        "absent": [str(p) for p in HOST_PATHS if not p.exists() and not p.is_symlink()],
        "netns": sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else [],
    }


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """The machine's cgroup file systems under /sys/fs/cgroup: (mount point, type, options to mount the same
    hierarchy again), the tmpfs holding v1 hierarchies first when there is one."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mnt = fields[4]
        fstype, _, super_opts = fields[fields.index("-") + 1:][:3]
        if mnt == str(CGROUP_FS) or mnt.startswith(str(CGROUP_FS) + "/"):
            if fstype in ("cgroup", "cgroup2", "tmpfs"):
                opts = ",".join(o for o in super_opts.split(",") if o not in ("rw", "ro"))
                out.append((mnt, fstype, opts if fstype != "tmpfs" else "mode=755"))
    return sorted(out, key=lambda m: m[0].count("/"))


@dataclass
class Host:
    """One machine of the cluster: the first runs the control plane too, every one runs containerd and a
    kubelet. Each lives in namespaces of its own, so two on one machine never meet:
    - network: NETNS_DIR/NAME, eth0 with its address on the world's bridge;
    - cgroup: every process of the node (and the pods below it) sits under /NAME in every hierarchy, and a
      cgroup namespace rooted there: the agent's --cgroup-root is this subtree, so the programs it attaches
      serve this node's processes and no other;
    - mount: a copy of the machine's, with a bpffs of its own on /sys/fs/bpf (shared: the DaemonSet mounts it
      HostToContainer), the cgroup hierarchies mounted again from inside the cgroup namespace, /run/netns
      shared (the agent sees the pods' namespaces containerd mounts there), and a directory of the node's own
      bound over each per-node hostPath of the DaemonSet (BIND_PATHS). runc resolves hostPaths in
      containerd's mount namespace, so the agent's pod sees its node's bpffs, cgroups and directories.
    - UTS: the node's name as its hostname (what a hostNetwork pod reports, as on a real node).
    A process holds these namespaces (`holder`); every process of the node enters them."""
    name: str
    ip: str
    dir: Path

    def __post_init__(self) -> None:
        self.netns_path = str(NETNS_DIR / self.name)
        self.holder: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[IO] = []

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def containerd_sock(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def host_path(self, path: Path) -> Path:
        """Where `path` of the node's mount namespace is on the machine, for the per-node paths."""
        for bound in BIND_PATHS:
            if path == bound or bound in path.parents:
                return self.dir / "root" / path.relative_to("/")
        raise ValueError(f"{path} is the machine's, not under any of {BIND_PATHS}")

    def _move_then(self, argv: list[str]) -> list[str]:
        """argv, started after its shell moved itself into /NAME in every cgroup hierarchy."""
        procs = " ".join(f"'{d / 'cgroup.procs'}'" for d in _cgroup_dirs(self.name))
        return ["sh", "-c", f'for f in {procs}; do echo $$ > "$f" || exit 125; done; exec "$@"', "sh", *argv]

    def enter(self, argv: list[str]) -> list[str]:
        """argv as a process of this node: in its cgroup and its network, mount, cgroup and UTS namespaces
        (before they exist, in its network namespace only)."""
        if self.holder is None:
            return ["nsenter", f"--net={self.netns_path}", "--", *argv]
        return self._move_then(["nsenter", f"--target={self.holder.pid}", "--net", "--mount", "--cgroup", "--uts",
                                "--", *argv])

    def make_namespaces(self) -> None:
        """The cgroup /NAME in every hierarchy, then the holder: it moves in there, unshares mount, cgroup and
        UTS namespaces (mounts propagate from the machine into the node, never back), mounts what the class
        docstring lists, says "ready" and sleeps until the node is killed; its namespaces go with the
        node's last process."""
        for cg in _cgroup_dirs(self.name):
            cg.mkdir(exist_ok=True)
            if cg.parent.name == "cpuset":  # a child of a cpuset cgroup needs its cpus and mems first
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (cg / f).write_text((cg.parent / f).read_text())
        lines = ["set -e", f"hostname {self.name}",
                 "umount -R /sys/fs/bpf 2>/dev/null || true",
                 "mount -t bpf bpf /sys/fs/bpf", "mount --make-shared /sys/fs/bpf",
                 f"umount -R {CGROUP_FS}"]
        for mnt, fstype, opts in _cgroup_mounts():  # the same hierarchies, rooted at /NAME now
            lines += [f"mkdir -p {mnt}", f"mount -t {fstype} {'-o ' + opts if opts else ''} {fstype} {mnt}"]
        lines.append(f"mount --make-shared {NETNS_DIR}")
        for path in BIND_PATHS:
            src = self.host_path(path)
            src.mkdir(parents=True, exist_ok=True)
            path.mkdir(parents=True, exist_ok=True)  # the mount point (removed at stop if it was absent)
            lines.append(f"mount --bind '{src}' '{path}'")
        lines += ["echo ready", "exec sleep infinity"]
        log = open(self.dir / "namespaces.log", "a")
        self._logs.append(log)
        argv = self._move_then(["nsenter", f"--net={self.netns_path}", "--", "unshare", "--mount", "--cgroup",
                                "--uts", "--propagation", "slave", "--", "sh", "-c", "\n".join(lines)])
        pre = _die_with_parent if threading.current_thread() is threading.main_thread() else None
        self.holder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                       preexec_fn=pre, text=True)
        line = self.holder.stdout.readline().strip()
        self.holder.stdout.close()
        if line != "ready":
            self.holder.kill()
            self.holder.wait()
            self.holder = None
            raise NodeError(f"{self.name}: its namespaces: {self.log_tail('namespaces')}")
        self.procs["namespaces"] = self.holder

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "a")
        self._logs.append(log)
        p = _popen(self.enter(argv), log)
        self.procs[name] = p
        return p

    def log_tail(self, name: str, n: int = 4000) -> str:
        try:
            return (self.dir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(OSError):
                p.kill()
        for p in self.procs.values():  # reaped: a zombie still counts in a v1 cgroup's cgroup.procs
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for f in self._logs:
            f.close()
        self._logs.clear()
        self.procs.clear()
        self.holder = None

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io", *args], check=check)


@dataclass
class Node:
    """The cluster: `nodes` machines (Host), the first (`name`, `node_ip`) with the control plane, the
    others NAME-2, NAME-3... at the next addresses."""
    name: str = "bpflb-node"
    node_ip: str = "172.30.99.2"
    world_ip: str = "172.30.99.1"
    prefix_len: int = 24
    nodes: int = 1
    ready_timeout: float = 600.0
    verbose: bool = False
    api_port: int = 6443
    # Log of what start() did and how long it took: (step, seconds).
    timings: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        first = ipaddress.IPv4Address(self.node_ip)
        self.hosts = [Host(self.name if i == 0 else f"{self.name}-{i + 1}", str(first + i),
                           BASE_DIR / (self.name if i == 0 else f"{self.name}-{i + 1}")) for i in range(self.nodes)]
        self.dir = self.hosts[0].dir
        self.world = f"{self.name}-world"
        self.netns_path = self.hosts[0].netns_path
        self.bin: dict[str, str] = {}
        self.api_url = f"https://{self.node_ip}:{self.api_port}"
        self._lock_fd: int | None = None

    @property
    def node_names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def _lock(self) -> None:
        """One cluster at a time on a machine: the kernel settings the kubelets write, the address plan,
        and the coordinator's benchmarks sharing two cores."""
        BASE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeError(f"another node holds {LOCK_FILE}: one node at a time on a machine") from None
        self._lock_fd = fd

    # ---- paths ---------------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def containerd_sock(self) -> Path:
        return self.hosts[0].containerd_sock

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    # ---- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> "Node":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def _step(self, what: str):
        t0 = time.monotonic()
        if self.verbose:
            print(f"node: {what} ...", file=sys.stderr, flush=True)
        yield
        self.timings.append((what, time.monotonic() - t0))

    def start(self) -> None:
        t0 = time.monotonic()
        with self._step("binaries and images"):
            self.bin = node_binaries()
            self.images = node_images()
            name, tar = bpflb_image()
            self.images[name] = str(tar)
            self.bpflb_image = name
        self._lock()
        with self._step("sweep"):
            # Holding the lock: every node directory is a killed run's.
            stale_dirs = [d for d in sorted(BASE_DIR.iterdir()) if d.is_dir()] if BASE_DIR.exists() else []
            for stale in stale_dirs:
                kill_node(stale.name)
            for stale in stale_dirs:
                left = sweep(stale.name)
                if left:
                    raise NodeError(f"leftovers of a previous node {stale.name} could not be removed: {left}")
        found = _found_on_host()
        for h in self.hosts:
            h.dir.mkdir(parents=True)
            (h.dir / "found.json").write_text(json.dumps(found, indent=1))
        with self._step("network namespaces"):
            self._netns()
        with self._step("mount, cgroup and UTS namespaces"):
            for h in self.hosts:
                h.make_namespaces()
        with self._step("certificates"):
            self._certs()
        with self._step("control plane"):
            self._control_plane()
        with self._step("containerd and images"):
            self._containerd()
        with self._step("kubelet"):
            for h in self.hosts:
                self._kubelet(h)
            self._wait(lambda: self._nodes_registered(), 120, "the kubelets to register their nodes")
        with self._step("bpflb (kubectl apply -k)"):
            self._install_bpflb()
            self._wait(self._nodes_ready, self.ready_timeout, "the nodes to turn Ready (bpflb's CNI conflist)")
            self.kubectl("-n", "bpflb-system", "rollout", "status", "daemonset/bpflb", f"--timeout={int(self.ready_timeout)}s")
        with self._step("CoreDNS"):
            self._coredns()
            self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=300s")
            # Ready in the API is not yet programmed on every node: the EndpointSlice follows the pod, and each
            # agent follows the slice. Without this a pod started at once can meet kube-dns with no backend
            # (its connect refused, as kube-proxy's REJECT would).
            try:
                self._wait(self._dns_programmed, 120, "every node's bpflb to program kube-dns with a backend")
            except NodeError as e:
                seen = ""
                for i, h in enumerate(self.hosts):
                    try:
                        seen += f"\n{h.name}: {self._dns_rows(i)}"
                    except Exception as d:  # noqa: BLE001 - the diagnosis must not hide the timeout
                        seen += f"\n{h.name}: ({d})"
                raise NodeError(f"{e}{seen}\n{self.kubectl('get', 'endpointslices', '-A', '-o', 'wide', check=False)}"
                                ) from None
        with self._step("smoke pod (DNS + ClusterIP)"):
            self._smoke()
        self.timings.append(("total", time.monotonic() - t0))

    def stop(self) -> None:
        """Remove everything start() made; safe after a failed start and more than once."""
        if self._lock_fd is None:
            return  # never started, or stopped already (or another node holds the machine)
        left: list[str] = []
        t0 = time.monotonic()
        try:
            for h in self.hosts:
                h.kill()
            for h in self.hosts:  # every node's processes before any node's files (they share mount points)
                kill_node(h.name)
        finally:
            for h in self.hosts:
                left += sweep(h.name)
            self.timings.append(("stop", time.monotonic() - t0))
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if left:
                raise NodeError(f"node {self.name}: left behind: {left}")

    # ---- network ---------------------------------------------------------------------------------------
    def _netns(self) -> None:
        """The world (a bridge at world_ip, no route anywhere) and each node on it through a veth."""
        ip = ["ip"]
        _run(ip + ["netns", "add", self.world])
        _run(ip + ["-n", self.world, "link", "add", "br0", "type", "bridge"])
        _run(ip + ["-n", self.world, "addr", "add", f"{self.world_ip}/{self.prefix_len}", "dev", "br0"])
        for dev in ("br0", "lo"):
            _run(ip + ["-n", self.world, "link", "set", dev, "up"])
        for i, h in enumerate(self.hosts):
            _run(ip + ["netns", "add", h.name])
            _run(ip + ["-n", h.name, "link", "add", "eth0", "type", "veth", "peer", "name", f"node{i}",
                       "netns", self.world])
            _run(ip + ["-n", self.world, "link", "set", f"node{i}", "master", "br0", "up"])
            _run(ip + ["-n", h.name, "addr", "add", f"{h.ip}/{self.prefix_len}", "dev", "eth0"])
            for dev in ("eth0", "lo"):
                _run(ip + ["-n", h.name, "link", "set", dev, "up"])
            _run(ip + ["-n", h.name, "route", "add", "default", "via", self.world_ip])
            # A node forwards for its pods (the node's own setting, as a node's provisioning sets it).
            _run(h.enter(["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
            (h.dir / "resolv.conf").write_text(f"nameserver {self.world_ip}\n")

    def nsenter(self, argv: list[str]) -> list[str]:
        """argv as a process of the first node (its namespaces and cgroup: its socket programs serve it)."""
        return self.hosts[0].enter(argv)

    def in_node(self, argv: list[str], check: bool = False, timeout: float | None = None, host: int = 0,
                **kw) -> subprocess.CompletedProcess:
        """Run a command as a process of a node (the first unless `host` says which)."""
        return _run(self.hosts[host].enter(argv), check=check, timeout=timeout, **kw)

    # ---- certificates ---------------------------------------------------------------------------------
    def _certs(self) -> None:
        d = self.pki
        d.mkdir()
        ca = pki.CA.create(d, f"{self.name}-ca")
        self.ca = ca
        ca.issue(d, "apiserver", "kube-apiserver", ips=[self.node_ip, API_SERVICE_IP, "127.0.0.1"],
                 dns=["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                      f"kubernetes.default.svc.{CLUSTER_DOMAIN}", "localhost", self.name])
        ca.issue(d, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", org="system:masters",
                 usage="clientAuth")
        ca.issue(d, "admin", "admin", org="system:masters", usage="clientAuth")
        ca.issue(d, "controller-manager", "system:kube-controller-manager", usage="clientAuth")
        ca.issue(d, "scheduler", "system:kube-scheduler", usage="clientAuth")
        pki.service_account_keys(d)
        for user in ("admin", "controller-manager", "scheduler"):
            self._kubeconfig(self.dir / f"{user}.kubeconfig", d, user)
        for h in self.hosts:  # each kubelet: system:node:<its name>, serving its own address
            h.pki.mkdir(exist_ok=True)
            if h.pki != d:
                shutil.copy2(ca.crt, h.pki / "ca.crt")
            ca.issue(h.pki, "kubelet-server", h.name, ips=[h.ip, "127.0.0.1"], dns=[h.name, "localhost"])
            ca.issue(h.pki, "kubelet", f"system:node:{h.name}", org="system:nodes", usage="clientAuth")
            self._kubeconfig(h.dir / "kubelet.kubeconfig", h.pki, "kubelet")

    def _kubeconfig(self, path: Path, pki_dir: Path, cert: str) -> None:
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: {self.name}
  cluster: {{server: "{self.api_url}", certificate-authority: "{pki_dir / 'ca.crt'}"}}
users:
- name: {cert}
  user: {{client-certificate: "{pki_dir / (cert + '.crt')}", client-key: "{pki_dir / (cert + '.key')}"}}
contexts:
- name: {self.name}
  context: {{cluster: {self.name}, user: {cert}}}
current-context: {self.name}
""")

    # ---- processes --------------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        return self.hosts[0].start(name, argv)

    def log_tail(self, name: str, n: int = 4000, host: int = 0) -> str:
        return self.hosts[host].log_tail(name, n)

    def _check_alive(self) -> None:
        for h in self.hosts:
            for name, p in h.procs.items():
                if p.poll() is not None:
                    raise NodeError(f"{h.name}: {name} exited ({p.returncode}):\n{h.log_tail(name)}")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ready():
                    return
            except Exception as e:  # noqa: BLE001 - retried until the deadline; the last one is reported
                last = e
            time.sleep(1)
        raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))

    def _control_plane(self) -> None:
        d, p = self.dir, self.pki
        self._start("etcd", [self.bin["ETCD"], "--data-dir", str(d / "etcd"), "--name", self.name,
                             "--listen-client-urls", "http://127.0.0.1:2379",
                             "--advertise-client-urls", "http://127.0.0.1:2379",
                             "--listen-peer-urls", "http://127.0.0.1:2380",
                             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                             "--initial-cluster", f"{self.name}=http://127.0.0.1:2380",
                             "--listen-metrics-urls", "http://127.0.0.1:2381",
                             "--unsafe-no-fsync", "--log-level", "error", "--quota-backend-bytes", str(4 << 30)])
        self._start("kube-apiserver", [
            self.bin["KUBE_APISERVER"], "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0", f"--secure-port={self.api_port}", f"--advertise-address={self.node_ip}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={p / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--cert-dir={d / 'apiserver-certs'}", "--profiling=false", "--v=1"])
        self._wait(lambda: self.kubectl("get", "--raw=/readyz", check=False, timeout=5).strip() == "ok", 120,
                   "kube-apiserver /readyz")
        self._start("kube-controller-manager", [
            self.bin["KUBE_CONTROLLER_MANAGER"], f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={d / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={d / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", "--leader-elect=false",
            "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_CIDR}", "--node-cidr-mask-size=24",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
            "--use-service-account-credentials=true", f"--cert-dir={d / 'kcm-certs'}", "--v=1"])
        self._start("kube-scheduler", [
            self.bin["KUBE_SCHEDULER"], f"--kubeconfig={d / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", "--leader-elect=false", "--v=1"])

    def _containerd(self) -> None:
        self.restrict_oom_score_adj = not _has_cap(CAP_SYS_RESOURCE)
        for h in self.hosts:
            self._containerd_start(h)
        for h in self.hosts:
            self._wait(lambda: h.ctr("version", check=False).returncode == 0, 60, f"{h.name}: containerd's socket")
        # The archives go into every node's containerd at once (each import is mostly waiting on its disk).
        with ThreadPoolExecutor(max_workers=len(self.hosts) * 2) as pool:
            list(pool.map(lambda job: job[0].ctr("images", "import", "--no-unpack=false", job[1]),
                          [(h, tar) for h in self.hosts for tar in self.images.values()]))
        for h in self.hosts:
            have = h.ctr("images", "ls", "-q").stdout.split()
            missing = [i for i in self.images if i not in have]
            if missing:
                raise NodeError(f"{h.name}: imported archives did not name {missing} (have {have})")

    def _containerd_start(self, h: Host) -> None:
        c = h.dir / "containerd"
        c.mkdir()
        bin_dir = h.host_path(CNI_BIN_DIR)
        for p in (bin_dir, h.host_path(CNI_CONF_DIR)):
            p.mkdir(parents=True, exist_ok=True)
        shutil.copy2(LOOPBACK_PLUGIN, bin_dir / "loopback")
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (c / "config.toml").write_text(f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
oom_score = 0
[grpc]
  address = "{h.containerd_sock}"
[ttrpc]
  address = "{c / 'ttrpc.sock'}"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_selinux = false
  # This machine runs without CAP_SYS_RESOURCE (not in any process's bounding set): nothing may lower an
  # oom_score_adj, and the kubelet asks -998 for every sandbox. Clamp to containerd's own (rootless
  # nodes, k3s's among them, set the same).
  restrict_oom_score_adj = {str(self.restrict_oom_score_adj).lower()}
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{c / 'runc'}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{CNI_CONF_DIR}"
""")
        h.start("containerd", ["containerd", "--config", str(c / "config.toml")])

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.hosts[0].ctr(*args, check=check)

    def _kubelet(self, h: Host) -> None:
        d, p = h.dir, h.pki
        (d / "kubelet").mkdir()
        # cgroupRoot is the default, "/": the root of the node's cgroup namespace, /NAME on the machine.
        (d / "kubelet-config.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{p / 'ca.crt'}"}}
authorization: {{mode: Webhook}}
tlsCertFile: "{p / 'kubelet-server.crt'}"
tlsPrivateKeyFile: "{p / 'kubelet-server.key'}"
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDNS: [{DNS_IP}]
clusterDomain: {CLUSTER_DOMAIN}
containerRuntimeEndpoint: unix://{h.containerd_sock}
resolvConf: "{d / 'resolv.conf'}"
podLogsDir: "{d / 'pod-logs'}"
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
# This machine's disk and memory are shared with other work: nothing here may evict a pod.
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
""")
        h.start("kubelet", [
            self.bin["KUBELET"], f"--config={d / 'kubelet-config.yaml'}", f"--kubeconfig={d / 'kubelet.kubeconfig'}",
            f"--root-dir={d / 'kubelet'}", f"--cert-dir={d / 'kubelet-certs'}", f"--node-ip={h.ip}",
            f"--hostname-override={h.name}", "--v=2"])

    def _nodes_registered(self) -> bool:
        out = self.kubectl("get", "nodes", "-o", "name", check=False).split()
        return all(f"node/{n}" in out for n in self.node_names)

    def _nodes_ready(self) -> bool:
        out = self.kubectl("get", "nodes", "-o",
                           "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Ready')].status} {end}",
                           check=False).split()
        return all(f"{n}=True" in out for n in self.node_names)

    # ---- add-ons ----------------------------------------------------------------------------------------
    def _install_bpflb(self) -> None:
        """A copy of manifests/ with what README's "Install" tells a user to set: the API server address."""
        k = self.dir / "bpflb-manifests"
        shutil.copytree(ROOT / "manifests", k)
        cm = (k / "configmap.yaml").read_text()
        new = re.sub(r'api-server-host: ".*"', f'api-server-host: "{self.node_ip}"', cm)
        new = re.sub(r'api-server-port: ".*"', f'api-server-port: "{self.api_port}"', new)
        if new.count(self.node_ip) != 1 or f'"{self.api_port}"' not in new:
            raise NodeError("manifests/configmap.yaml: api-server-host / api-server-port not found")
        (k / "configmap.yaml").write_text(new)
        ds = (k / "daemonset.yaml").read_text()
        if not _has_cap(CAP_SYS_RESOURCE):
            # Not the user's step: this machine's own bounding set lacks CAP_SYS_RESOURCE, so runc refuses
            # any container that asks for it ("unable to apply caps"). The agent needs it only to raise
            # RLIMIT_MEMLOCK on kernels < 5.11; a real node has it. Dropped here, nowhere else.
            ds, n = re.subn(r"\n *- SYS_RESOURCE[^\n]*", "", ds)
            if n != 1:
                raise NodeError("manifests/daemonset.yaml: no SYS_RESOURCE capability line to drop")
            (k / "daemonset.yaml").write_text(ds)
        image = re.search(r"image: (\S+)", ds).group(1)
        if image != self.bpflb_image:
            raise NodeError(f"manifests/daemonset.yaml names {image}, the build made {self.bpflb_image}")
        self.kubectl("apply", "-k", str(k))

    def _coredns(self) -> None:
        self.kubectl("apply", "-f", "-", input=coredns_manifest())

    def _dns_rows(self, host: int) -> list[dict] | str:
        """kube-dns's UDP frontend rows in `bpflb service list` of a node's pinned maps (or why there are none)."""
        r = self.in_node([str(Path(sys.executable).parent / "bpflb"), "service", "list", "-o", "json"], host=host,
                         timeout=60)
        if r.returncode != 0:
            return f"bpflb service list exited {r.returncode}: {r.stderr.strip()[-500:]}"
        return [row for row in json.loads(r.stdout)  # (a refused Service's row has no address)
                if row.get("ip") == DNS_IP and row.get("port") == 53 and str(row.get("protocol")).upper() == "UDP"]

    def _dns_programmed(self) -> bool:
        for i in range(len(self.hosts)):
            rows = self._dns_rows(i)
            if isinstance(rows, str) or not rows or not all(
                    r["action"] == "load-balance" and all(b["state"] == "ok" for b in r["backends"]) for r in rows):
                return False
        return True

    def _smoke(self) -> None:
        """A pod resolves kubernetes.default through kube-dns and reaches the API server at its ClusterIP."""
        name = "bpflb-node-smoke"
        # On the last node: with more than one, DNS and the API server are across the overlay from it.
        pin = json.dumps({"spec": {"nodeName": self.hosts[-1].name}})
        self.kubectl("run", name, "-n", "default", f"--image={AGNHOST_IMAGE}", "--restart=Never", f"--overrides={pin}",
                     "--command", "--",
                     "sh", "-c",
                     f"nslookup kubernetes.default.svc.{CLUSTER_DOMAIN} && "
                     f"curl -sk --max-time 10 https://kubernetes.default/version")
        try:
            self._wait(lambda: self.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}", check=False)
                       in ("Succeeded", "Failed"), 180, "the smoke pod")
            phase = self.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}")
            logs = self.kubectl("logs", name, check=False)
            if phase != "Succeeded" or API_SERVICE_IP not in logs or '"gitVersion"' not in logs:
                raise NodeError(f"smoke pod {phase}:\n{logs}")
        finally:
            self.kubectl("delete", "pod", name, "--now", "--wait=false", check=False)

    # ---- tools ------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float | None = 600) -> str:
        r = subprocess.run(self.nsenter([self.bin["KUBECTL"], f"--kubeconfig={self.kubeconfig}", *args]),
                           capture_output=True, text=True, input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout


def coredns_manifest() -> str:
    """CoreDNS as kube-dns, as kubeadm and k3s deploy it, with the kubernetes plugin only (no forward)."""
    corefile = f"""    .:53 {{
        errors
        health {{
            lameduck 5s
        }}
        ready
        kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }}
        cache 30
        loadbalance
    }}"""
    return f"""apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects:
- {{kind: ServiceAccount, name: coredns, namespace: kube-system}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
{corefile}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata:
      labels: {{k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      tolerations:
      - {{key: CriticalAddonsOnly, operator: Exists}}
      - {{key: node-role.kubernetes.io/control-plane, effect: NoSchedule}}
      containers:
      - name: coredns
        image: {COREDNS_IMAGE}
        imagePullPolicy: IfNotPresent
        args: [-conf, /etc/coredns/Corefile]
        resources:
          limits: {{memory: 170Mi}}
          requests: {{cpu: 100m, memory: 70Mi}}
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{add: [NET_BIND_SERVICE], drop: [ALL]}}
          readOnlyRootFilesystem: true
        livenessProbe:
          httpGet: {{path: /health, port: 8080}}
          initialDelaySeconds: 10
          periodSeconds: 10
          failureThreshold: 5
        readinessProbe:
          httpGet: {{path: /ready, port: 8181}}
          periodSeconds: 2
        volumeMounts:
        - {{name: config, mountPath: /etc/coredns, readOnly: true}}
      volumes:
      - name: config
        configMap:
          name: coredns
          items: [{{key: Corefile, path: Corefile}}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}
spec:
  selector: {{k8s-app: kube-dns}}
  clusterIP: {DNS_IP}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
"""


def kill_node(name: str) -> set[int]:
    """SIGKILL every process of the node `name`: its own (all in its network namespace and its cgroup:
    kubelet, containerd and its shims, the control plane, hostNetwork pods) and every pod's (in the cgroups
    under /<name>). Returns those that would not go. The node's mount, cgroup and UTS namespaces go with them."""
    ino = _ns_inode(str(NETNS_DIR / name))
    cgroups = _cgroup_dirs(name)

    def ours() -> set[int]:
        pids = _pids_in_cgroups(cgroups)
        if ino is not None:
            pids |= _pids_in_netns(ino)
        return pids

    return _kill_all(ours)


def sweep(name: str) -> list[str]:
    """Remove everything a node named `name` made (a running one's, after its processes were told to go, or
    the leftovers of one whose Python process was killed); returns what could not be removed."""
    d = BASE_DIR / name
    left: list[str] = []
    try:
        found = json.loads((d / "found.json").read_text())
    except (OSError, ValueError):
        found = None
    cgroups = _cgroup_dirs(name)
    stuck = kill_node(name)
    if stuck:
        left.append(f"processes {sorted(stuck)}")
    # Mounts: the node's own (kubelet volumes, rootfs, bpffs, cgroups, pods' network namespaces) lived in
    # its mount namespace and went with its last process; what is left is anything a run of a version
    # without one mounted on the machine.
    new_netns = []
    if found is not None and NETNS_DIR.exists():
        new_netns = [n for n in os.listdir(NETNS_DIR) if n.startswith("cni-") and n not in found["netns"]]
    left += _umount_all([str(d)] + [str(NETNS_DIR / n) for n in new_netns])
    for n in new_netns:
        with contextlib.suppress(OSError):
            (NETNS_DIR / n).unlink()
    for ns in (name, f"{name}-world"):
        if (NETNS_DIR / ns).exists():
            r = _run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                left.append(f"netns {ns}: {r.stderr.strip()}")
    left += _rmdir_cgroups(cgroups)
    if found is not None:
        for key, value in found["sysctls"].items():
            if value is not None and _read_sysctl(key) != value:
                Path("/proc/sys", key).write_text(value)
        for p in map(Path, found.get("absent", [])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
    if d.exists():
        mounts = _mounts_under([str(d)])
        if mounts:
            left.append(f"mounts {mounts}")
        else:
            # A lazily detached overlay or a process still being torn down may hold a directory for a moment.
            errors: list[str] = []
            for _ in range(20):
                errors.clear()
                shutil.rmtree(d, onerror=lambda _f, path, exc: errors.append(f"{path}: {exc[1]}"))
                if not d.exists():
                    break
                time.sleep(0.5)
            else:
                left.append(f"{d}: " + "; ".join(errors[:3]))
    return left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lb.testing.node", description="a kubelet node with bpflb until Ctrl-C")
    ap.add_argument("--name", default="bpflb-node")
    ap.add_argument("--nodes", type=int, default=1, help="how many nodes (the first runs the control plane)")
    ap.add_argument("--sweep", action="store_true", help="only remove the leftovers of a killed run, then exit")
    args = ap.parse_args(argv)
    if args.sweep:
        names = [d.name for d in BASE_DIR.iterdir() if d.is_dir() and (d.name == args.name or
                 re.fullmatch(re.escape(args.name) + r"-\d+", d.name))] if BASE_DIR.exists() else []
        names = sorted(set(names) | {args.name})
        for n in names:
            kill_node(n)
        left = [x for n in names for x in sweep(n)]
        print("left: " + ", ".join(left) if left else "clean")
        return 1 if left else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Node(name=args.name, nodes=args.nodes, verbose=True) as node:
        for step, secs in node.timings:
            print(f"  {step}: {secs:.1f} s")
        print(f"nodes {', '.join(node.node_names)} ready: export KUBECONFIG={node.kubeconfig}; "
              f"{' '.join(node.nsenter([node.bin['KUBECTL'], 'get', 'pods', '-A']))}", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
