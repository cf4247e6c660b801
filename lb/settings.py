"""Every setting and its default, in one place. Grouped dataclasses; a docstring per field."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

CGROUP2_DEFAULT = "/sys/fs/cgroup/unified"
BPF_ROOT_DEFAULT = "/sys/fs/bpf/bpflb"


def default_cgroup_root() -> str:
    """The cgroup2 mount: /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return CGROUP2_DEFAULT


@dataclass(frozen=True)
class MapSizes:
    services: int = 262144
    """--svc-map-size: entries in lb_services (one per frontend plus one per backend slot)."""
    backends: int = 262144
    """--backend-map-size: distinct backends (IP, port, protocol) across all Services."""
    revnat: int = 65536
    """--revnat-map-size: frontends (one reverse-NAT entry each)."""
    sock_revnat: int = 262144
    """--sock-revnat-map-size: translated sockets remembered for recvmsg/getpeername (LRU)."""
    affinity: int = 65536
    """--affinity-map-size: (client, frontend) session-affinity entries (LRU)."""
    endpoints: int = 65536
    """--endpoint-map-size: local pod endpoints (written by the CNI plugin)."""


# MapSizes field -> its command-line flag (named in "map is full" errors too).
MAP_SIZE_FLAGS = {"services": "--svc-map-size", "backends": "--backend-map-size", "revnat": "--revnat-map-size",
                  "sock_revnat": "--sock-revnat-map-size", "affinity": "--affinity-map-size",
                  "endpoints": "--endpoint-map-size"}


@dataclass(frozen=True)
class Paths:
    cgroup_root: str = field(default_factory=default_cgroup_root)
    """--cgroup-root: cgroup2 directory the socket programs attach to (every process below it is served)."""
    bpf_root: str = BPF_ROOT_DEFAULT
    """--bpf-root: bpffs directory holding bpflb's pinned maps."""


@dataclass(frozen=True)
class SyncSettings:
    min_interval: float = 0.01
    """Seconds between two syncs at least: changes arriving inside it are coalesced."""
    full_resync: float = 3600.0
    """Seconds between full resyncs that re-read the kernel's maps and rewrite what drifted."""
    retry_initial: float = 0.5
    """First retry delay after a failed sync; doubles up to retry_max."""
    retry_max: float = 30.0
    """Longest delay between retries of a failed sync."""


@dataclass(frozen=True)
class Settings:
    node_name: str = field(default_factory=socket.gethostname)
    """--node-name: this node's name, as in Node objects and endpoints' nodeName."""
    manifests: str | None = None
    """--manifests: follow a folder of YAML/JSON instead of a Kubernetes API server."""
    kubeconfig: str | None = None
    """--kubeconfig: API server credentials; without it (and without --manifests) in-cluster config."""
    healthz_bind: str = "0.0.0.0:10256"
    """--healthz-bind-address: /healthz and /livez (kube-proxy's default port); empty to disable."""
    metrics_bind: str = "127.0.0.1:10249"
    """--metrics-bind-address: Prometheus /metrics (kube-proxy's default port); empty to disable."""
    health_timeout: float = 60.0
    """Seconds a change may stay unprogrammed before /healthz fails (kube-proxy: 2 x syncPeriod)."""
    network_mode: str = "overlay"
    """--network-mode: pod traffic between nodes: overlay (VXLAN), direct (routes via node IPs) or none."""
    cni_socket: str = ""
    """--cni-socket: serve the CNI launcher's requests on this unix socket (empty: no CNI plugin)."""
    cni_bin_dir: str = ""
    """--cni-bin-dir: install the launcher here at start (k3s: /var/lib/rancher/k3s/data/current/bin)."""
    cni_conf_dir: str = ""
    """--cni-conf-dir: install the conflist here at start (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d)."""
    remove_kube_proxy_rules: bool = False
    """--remove-kube-proxy-rules: delete kube-proxy's iptables/nftables rules instead of refusing to start."""
    strict: bool = True
    """--strict (default) / --no-strict: refuse to start when a needed kernel hook is missing."""
    poll_interval: float = 0.2
    """Seconds between scans of the manifest folder for changes."""
    paths: Paths = field(default_factory=Paths)
    maps: MapSizes = field(default_factory=MapSizes)
    sync: SyncSettings = field(default_factory=SyncSettings)
