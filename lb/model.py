"""Model values shared by the pipeline stages: parsed Kubernetes objects in, frontends out.

Everything here is a frozen ``msgspec.Struct``: immutable and hashable like a frozen dataclass, and
built in C (a frozen dataclass's ``__init__`` costs a Python-level ``object.__setattr__`` per field,
which for 100 000 endpoints and backends was a fifth of the sync). ``gc=False``: these values hold
only strings, numbers and tuples of each other, so they can never be part of a reference cycle and
the collector need not track them. The translate stage is a pure function of these values.
"""
from __future__ import annotations

from typing import NewType

from msgspec import Struct

ServiceID = NewType("ServiceID", int)  # the frontend's reverse-NAT ID
BackendID = NewType("BackendID", int)

TCP, UDP, SCTP = "TCP", "UDP", "SCTP"
IPV4, IPV6 = "IPv4", "IPv6"


class ObjKey(Struct, frozen=True, order=True, gc=False):
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class ServicePort(Struct, frozen=True, gc=False):
    name: str
    port: int
    protocol: str
    node_port: int = 0


class Service(Struct, frozen=True, gc=False):
    key: ObjKey
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ingress_ips: tuple[str, ...] = ()  # ipMode Proxy entries already removed
    affinity_timeout: int = 0  # sessionAffinity ClientIP timeout in seconds; 0 = no affinity
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local (as written; translate applies ExternalPolicyLocal)
    skip: str = ""  # why the proxy ignores this Service ("" = it does not)
    created: str = ""  # metadata.creationTimestamp (RFC 3339, UTC): the older of two claims wins a frontend
    health_check_node_port: int = 0  # spec.healthCheckNodePort (0: none)
    lb_source_ranges: tuple[str, ...] = ()  # spec.loadBalancerSourceRanges: canonical CIDRs, unparsable ones left out


class Endpoint(Struct, frozen=True, gc=False):
    ip: str  # first address, normalised
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    hint_zones: tuple[str, ...] | None = None  # None: no hints at all
    hint_nodes: tuple[str, ...] | None = None


class SlicePort(Struct, frozen=True, gc=False):
    name: str
    port: int
    protocol: str


class EndpointSlice(Struct, frozen=True, gc=False):
    key: ObjKey
    service: ObjKey | None  # from the kubernetes.io/service-name label
    address_type: str
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    skip: str = ""


class Node(Struct, frozen=True, gc=False):
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    addresses: tuple[tuple[str, str], ...] = ()
    deleting: bool = False  # deletionTimestamp set, or tainted ToBeDeletedByClusterAutoscaler

    def label(self, name: str) -> str | None:
        for k, v in self.labels:
            if k == name:
                return v
        return None


# ---- translate output ---------------------------------------------------------------------------

class Frontend(Struct, frozen=True, order=True, gc=False):
    ip: str
    port: int
    protocol: str
    scope: int = 0  # maps.structs.SCOPE_INTERNAL / SCOPE_EXTERNAL

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


class Backend(Struct, frozen=True, order=True, gc=False):
    ip: str
    port: int
    protocol: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


class FrontendState(Struct, frozen=True, gc=False):
    """What the datapath must do for one frontend."""
    backends: tuple[Backend, ...]
    drop_empty: bool = False  # no backends: drop (True) or reject with ECONNREFUSED (False)
    affinity_timeout: int = 0
    service: str = ""  # "ns/name:port" for display
    snat: bool = False  # external traffic masqueraded to the node (externalTrafficPolicy Cluster)
    nodeport: bool = False  # a wildcard node-address frontend (ip "0.0.0.0" / "::", port = nodePort)
    src_ranges: tuple[str, ...] = ()  # loadBalancerSourceRanges this frontend is filtered by (empty: none)
    # The INTERNAL wildcard of an externalTrafficPolicy Local nodePort: another node's address on it is that
    # node's to serve (a local caller's connect is not translated).
    ext_local: bool = False
