"""Model values shared by the pipeline stages: parsed Kubernetes objects in, frontends out.

Everything here is a frozen dataclass: the translate stage is a pure function of these values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

ServiceID = NewType("ServiceID", int)  # the frontend's reverse-NAT ID
BackendID = NewType("BackendID", int)

TCP, UDP, SCTP = "TCP", "UDP", "SCTP"
IPV4, IPV6 = "IPv4", "IPv6"


@dataclass(frozen=True, order=True)
class ObjKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    node_port: int = 0


@dataclass(frozen=True)
class Service:
    key: ObjKey
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ingress_ips: tuple[str, ...] = ()  # ipMode Proxy entries already removed
    affinity_timeout: int = 0  # sessionAffinity ClientIP timeout in seconds; 0 = no affinity
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    skip: str = ""  # why the proxy ignores this Service ("" = it does not)


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str  # first address, normalised
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    hint_zones: tuple[str, ...] | None = None  # None: no hints at all
    hint_nodes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class EndpointSlice:
    key: ObjKey
    service: ObjKey | None  # from the kubernetes.io/service-name label
    address_type: str
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    skip: str = ""


@dataclass(frozen=True)
class Node:
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

@dataclass(frozen=True, order=True, slots=True)
class Frontend:
    ip: str
    port: int
    protocol: str
    scope: int = 0  # maps.structs.SCOPE_INTERNAL / SCOPE_EXTERNAL

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    ip: str
    port: int
    protocol: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FrontendState:
    """What the datapath must do for one frontend."""
    backends: tuple[Backend, ...]
    drop_empty: bool = False  # no backends: drop (True) or reject with ECONNREFUSED (False)
    affinity_timeout: int = 0
    service: str = field(default="", compare=True)  # "ns/name:port" for display
