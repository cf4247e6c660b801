"""Every setting and its default, in one place. Grouped dataclasses; a docstring per field.

A docstring that starts with ``--flag:`` makes the field a command-line flag of ``bpflb agent`` (the
rest of the docstring is its help; lb/cli.py builds the parser from these fields, their types and
defaults). A ``Literal`` type gives the flag its choices.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

CGROUP2_DEFAULT = "/sys/fs/cgroup/unified"
BPF_ROOT_DEFAULT = "/sys/fs/bpf/bpflb"
CNI_SOCKET_DEFAULT = "/run/bpflb/cni.sock"  # also compiled into the CNI launcher (lb/cni/install.py)


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
    node_addrs: int = 256
    """--node-addr-map-size: node addresses NodePorts are served on (this node's, and other nodes' for
    local callers)."""
    src_ranges: int = 16384
    """--src-range-map-size: loadBalancerSourceRanges entries (frontend, CIDR) in the LPM trie."""
    ext_affinity: int = 65536
    """--ext-affinity-map-size: (outside client IP, frontend) session-affinity entries (LRU)."""
    ct: int = 65536
    """--ct-map-size: connections from outside the node tc keeps translated (LRU)."""
    nat: int = 65536
    """--nat-map-size: reply tuples of those connections, masquerade ports included (LRU)."""




@dataclass(frozen=True)
class ConntrackSettings:
    """How long a UDP flow (socket, frontend) keeps its backend: what conntrack keeps under kube-proxy.
    kube-proxy leaves the kernel's values by default (--conntrack-udp-timeout and
    --conntrack-udp-timeout-stream are 0, "leave as-is"), so these are the kernel's defaults
    (nf_conntrack_udp_timeout 30 s, nf_conntrack_udp_timeout_stream 120 s). Compiled into the datapath."""
    udp_timeout: float = 30.0
    """--conntrack-udp-timeout: seconds a UDP flow without replies, or one that is a single quick exchange
    (replied within its first 2 s, as DNS), keeps its backend after its last datagram."""
    udp_stream_timeout: float = 120.0
    """--conntrack-udp-timeout-stream: seconds a UDP flow with replies still active after 2 s keeps its
    backend after its last datagram."""


def cgroup2_dir(path: str) -> str:
    """``path`` itself if it is a cgroup2 directory, else its ``unified`` subdirectory when that is one: on a
    hybrid host (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified) the DaemonSet's hostPath
    /sys/fs/cgroup is a tmpfs of v1 hierarchies, and the cgroup2 mount is below it (hostPath mounts are
    recursive). Anything else is returned as given, for the loader to report."""
    unified = os.path.join(path, "unified")
    if not os.path.exists(os.path.join(path, "cgroup.controllers")) and \
            os.path.exists(os.path.join(unified, "cgroup.controllers")):
        return unified
    return path


@dataclass(frozen=True)
class Paths:
    cgroup_root: str = field(default_factory=default_cgroup_root)
    """--cgroup-root: cgroup2 directory the socket programs attach to (every process below it is served); on a
    hybrid host the cgroup v1 tmpfs (e.g. /sys/fs/cgroup) stands for its unified/ cgroup2 mount."""
    bpf_root: str = BPF_ROOT_DEFAULT
    """--bpf-root: bpffs directory holding bpflb's pinned maps."""
    state_dir: str = "/run/bpflb"
    """--state-dir: the agent's status files for `bpflb service list` (Services refused admission)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cgroup_root", cgroup2_dir(self.cgroup_root))


@dataclass(frozen=True)
class SyncSettings:
    min_interval: float = 0.01
    """--min-sync-period: seconds between two syncs at least; changes arriving inside it are coalesced."""
    full_resync: float = 3600.0
    """--sync-period: seconds between full resyncs that re-read the kernel's maps and rewrite what drifted."""
    retry_initial: float = 0.5
    """First retry delay after a failed sync; doubles up to retry_max."""
    retry_max: float = 30.0
    """Longest delay between retries of a failed sync."""
    socket_destroy_timeout: float = 10.0
    """Seconds the UDP socket destroy of removed backends may take before the sync stops waiting."""


@dataclass(frozen=True)
class ApiSettings:
    """The API server source (lb/source/kube.py)."""
    page_size: int = 500
    """Items per page of an initial list (the list is parsed page by page)."""
    watch_timeout: int = 300
    """Seconds a watch asks the server to keep it open (timeoutSeconds) before it is renewed."""
    request_timeout: float = 30.0
    """Seconds a list request may take to answer."""
    backoff_initial: float = 0.5
    """First delay after a connection error, timeout, 5xx or 429; doubles up to backoff_max."""
    backoff_max: float = 30.0
    """Longest delay between retries of a failing watch."""
    refused_retry: float = 60.0
    """Delay after another 4xx (401, 403, 404: the ClusterRole or the credentials are wrong)."""


@dataclass(frozen=True)
class Settings:
    node_name: str = field(default_factory=socket.gethostname)
    """--node-name: this node's name, as in Node objects and endpoints' nodeName (default: the hostname)."""
    manifests: str | None = None
    """--manifests: follow a folder of Service/EndpointSlice/Node YAML or JSON instead of the API server."""
    kubeconfig: str | None = None
    """--kubeconfig: API server credentials (default: the in-cluster configuration)."""
    healthz_bind: str = "0.0.0.0:10256"
    """--healthz-bind-address: /healthz and /livez address:port (kube-proxy's default port); empty disables."""
    metrics_bind: str = "127.0.0.1:10249"
    """--metrics-bind-address: Prometheus /metrics address:port (kube-proxy's default port); empty disables."""
    health_timeout: float = 60.0
    """--health-timeout: seconds a change may stay unprogrammed before /healthz fails (kube-proxy: 2 x
    syncPeriod)."""
    network_mode: Literal["overlay", "direct", "none"] = "overlay"
    """--network-mode: pod traffic between nodes: overlay (VXLAN), direct (routes via node IPs) or none (a
    routing daemon announces pod CIDRs)."""
    cni_socket: str = ""
    """--cni-socket: serve the bundled CNI plugin on this unix socket (the DaemonSet uses
    /run/bpflb/cni.sock, the launcher's default); empty: no CNI plugin."""
    cni_bin_dir: str = ""
    """--cni-bin-dir: install the CNI launcher here at start (k3s: /var/lib/rancher/k3s/data/cni)."""
    cni_conf_dir: str = ""
    """--cni-conf-dir: install the CNI conflist here at start (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d)."""
    remove_kube_proxy_rules: bool = field(
        default_factory=lambda: os.environ.get("BPFLB_REMOVE_KUBE_PROXY_RULES", "").lower() == "true")
    """--remove-kube-proxy-rules: delete kube-proxy's iptables/nftables rules instead of refusing to start
    (default: $BPFLB_REMOVE_KUBE_PROXY_RULES == true)."""
    strict: bool = True
    """--strict: refuse to start when a needed kernel hook is missing or kube-proxy's rules are present
    (--no-strict runs without them)."""
    max_frontends_per_service: int = 4096
    """--max-frontends-per-service: a Service needing more frontends (ports x addresses) is refused
    alone, logged and counted; everything else keeps syncing."""
    poll_interval: float = 0.2
    """--poll-interval: seconds between scans of the manifest folder for changes."""
    nodeport_addresses: str = "primary"
    """--nodeport-addresses: the node addresses NodePorts (and healthCheckNodePorts) are served on, as
    kube-proxy's nodePortAddresses: comma-separated CIDRs (a family without one, or with a /0, uses every
    address of the node of that family), or "primary": the Node object's InternalIP/ExternalIP of each
    family (kube-proxy's nftables default)."""
    devices: str = ""
    """--devices: comma-separated devices the tc programs attach to (traffic arriving at the node);
    empty: the devices carrying the Node object's InternalIP and ExternalIP addresses."""
    paths: Paths = field(default_factory=Paths)
    maps: MapSizes = field(default_factory=MapSizes)
    conntrack: ConntrackSettings = field(default_factory=ConntrackSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    api: ApiSettings = field(default_factory=ApiSettings)


def nodeport_address_list(value: str) -> tuple[str, ...]:
    """--nodeport-addresses as a list; raises ValueError naming what is wrong (kube-proxy's
    validation.go validateNodePortAddresses: CIDRs, or "primary" alone)."""
    import ipaddress

    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if "primary" in items:
        if items != ("primary",):
            raise ValueError("--nodeport-addresses: \"primary\" must be the only value")
        return items
    out = []
    for v in items:
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except ValueError:
            raise ValueError(f"--nodeport-addresses: {v!r} is not a CIDR (or \"primary\")") from None
    return tuple(out)


def device_list(value: str) -> list[str]:
    """--devices as a list (empty: from the Node object)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def flag_of(cls: type, name: str) -> str | None:
    """The command-line flag of a settings field (its docstring's ``--flag:`` prefix), or None."""
    doc = field_docs(cls).get(name, "")
    return doc.split(":", 1)[0] if doc.startswith("--") else None


_DOCS: dict[type, dict[str, str]] = {}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal right after the field), read from this module's
    source once per class."""
    if cls not in _DOCS:
        import ast
        import inspect
        import textwrap

        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
        _DOCS[cls] = docs
    return _DOCS[cls]


# MapSizes field -> its command-line flag (named in "map is full" errors too).
MAP_SIZE_FLAGS = {f: flag_of(MapSizes, f) for f in MapSizes.__dataclass_fields__}
