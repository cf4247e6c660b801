"""Kubernetes objects (JSON bytes from the API or a manifest file, or plain dicts from YAML) -> model values.

Every source (manifest folder, API watch) goes through here, so validation and kube-proxy's
"what is watched and skipped" rules live in one place. A bad object yields an ObjectError naming the
field; the caller reports it and keeps everything else.

Entry points for the sources (none raises ObjectError; an object's error travels in its Parsed):

- ``parse(kind, obj)`` -> ``Parsed``: one plain object (a YAML document, a dict) of a known kind.
- ``decode_page(kind, raw)`` -> ``Page``: one page of an API list, bytes as received.
- ``decode_event(kind, raw)`` -> ``Event``: one line of an API watch stream.
- ``decode_documents(raw)`` -> ``list[Parsed | Other]``: a manifest ``.json`` file's bytes, one entry
  per object in file order (``kind: List`` flattened); ``Other`` is a document that is not ours to
  parse (another kind: ``error`` None; not an object, or our kind at an unknown apiVersion: ``error``).
The three bytes decoders raise DecodeError when the bytes are not JSON of the right shape.

``parse_service`` / ``parse_endpoint_slice`` / ``parse_node`` take plain dicts and raise
ObjectError(field, reason). They are the reference: JSON is first decoded by msgspec straight into
typed structs (no dicts) and converted from those; anything that path does not take goes to them.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from sys import intern
from typing import Any, Generic, TypeVar, Union

import msgspec
from msgspec import Struct

from .model import (IPV4, IPV6, SCTP, TCP, UDP, Endpoint, EndpointSlice, Node, ObjKey, Service,
                    ServicePort, SlicePort)

LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_ZONE = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800  # core/v1 DefaultClientIPServiceAffinitySeconds
MAX_AFFINITY_TIMEOUT = 86400

SERVICE = ("v1", "Service")
ENDPOINT_SLICE = ("discovery.k8s.io/v1", "EndpointSlice")
NODE = ("v1", "Node")
KINDS = (SERVICE, ENDPOINT_SLICE, NODE)


class ObjectError(ValueError):
    """A malformed object: ``field`` is the path of the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_ip_sloppy(value: Any, field: str) -> str:
    """An IP in canonical form, read as Kubernetes reads it (netutils.ParseIPSloppy, i.e. Go's
    net.ParseIP): IPv4 octets may carry leading zeros ("10.180.00.001" is 10.180.0.1, decimal, not
    octal), and an IPv4-mapped IPv6 address ("::ffff:10.0.0.1") IS that IPv4 address (Go's To4()),
    so it is filtered by family like any IPv4 address and can never be an IPv6 frontend."""
    if not isinstance(value, str) or not value:
        raise ObjectError(field, f"not an IP address: {value!r}")
    try:  # fast path: most addresses are already canonical
        if ":" in value:
            packed = socket.inet_pton(socket.AF_INET6, value)
            if packed[:12] != _V4_MAPPED and socket.inet_ntop(socket.AF_INET6, packed) == value:
                return value
        elif socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value)) == value:
            return value
    except OSError:
        pass
    text = value.strip() if value.strip() == value else ""  # Go's ParseIP takes no surrounding spaces
    try:
        if "." in text and ":" not in text:
            parts = text.split(".")
            if len(parts) != 4 or not all(p.isdigit() and p.isascii() and len(p) <= 3 for p in parts):
                raise ValueError
            octets = [int(p, 10) for p in parts]
            if any(o > 255 for o in octets):
                raise ValueError
            return str(ipaddress.IPv4Address(bytes(octets)))
        if "%" in text:
            raise ValueError  # a zone is not part of an IP (Go's ParseIP refuses it)
        addr = ipaddress.IPv6Address(text)
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(addr)
    except ValueError:
        raise ObjectError(field, f"not an IP address: {value!r}") from None


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def family_of(ip: str) -> str:
    return IPV6 if ":" in ip else IPV4


def _get(obj: dict, path: str, kind: type | tuple, default: Any = None) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            raise ObjectError(path, "expected an object")
        cur = cur.get(part)
        if cur is None:
            return default
    if not isinstance(cur, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ObjectError(path, f"expected {names}, got {type(cur).__name__}")
    return cur


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ObjectError(field, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ObjectError(field, f"must be between {lo} and {hi}, got {value}")
    return value


def _protocol(value: Any, field: str) -> str:
    proto = TCP if value is None else value
    if proto not in (TCP, UDP, SCTP):
        raise ObjectError(field, f"unsupported protocol {value!r} (TCP, UDP or SCTP)")
    return proto


def _meta(obj: dict) -> tuple[ObjKey, dict[str, str]]:
    name = _get(obj, "metadata.name", str)
    if not name:
        raise ObjectError("metadata.name", "missing")
    ns = _get(obj, "metadata.namespace", str, "default") or "default"
    labels = _get(obj, "metadata.labels", dict, {})
    return ObjKey(ns, name), {str(k): str(v) for k, v in labels.items()}


# ---- the rules both decoders share (the plain-dict parsers below and the typed fast path) ------------

def _service_type(value: str) -> str:
    if value not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ObjectError("spec.type", f"unknown Service type {value!r}")
    return value


def _unique_port_names(ports: list[ServicePort]) -> None:
    if len(ports) > 1 and len({p.name for p in ports}) != len(ports):
        raise ObjectError("spec.ports", "port names must be unique")


def _affinity(affinity: str, timeout: Any) -> int:
    """sessionAffinity -> the ClientIP timeout (0: none); ``timeout`` is read only for ClientIP."""
    if affinity == "ClientIP":
        return _int(timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, MAX_AFFINITY_TIMEOUT)
    if affinity != "None":
        raise ObjectError("spec.sessionAffinity", f"must be None or ClientIP, got {affinity!r}")
    return 0


def _local(name: str, value: str) -> bool:
    """internalTrafficPolicy / externalTrafficPolicy: True for Local."""
    if value not in ("Cluster", "Local"):
        raise ObjectError(f"spec.{name}", f"must be Cluster or Local, got {value!r}")
    return value == "Local"


def _service_skip(labels: dict[str, str], svc_type: str, cluster_ips: list) -> str:
    """Why kube-proxy ignores this Service ("" = it does not)."""
    if LABEL_PROXY_NAME in labels:
        return f"labelled {LABEL_PROXY_NAME}={labels[LABEL_PROXY_NAME]} (another proxy's)"
    if LABEL_HEADLESS in labels:
        return f"labelled {LABEL_HEADLESS}"
    if svc_type == "ExternalName":
        return "type ExternalName"
    if not cluster_ips or cluster_ips[0] in ("None", ""):
        return "headless (clusterIP None)" if cluster_ips else "no clusterIP"
    return ""


def _source_range(value: str) -> str | None:
    """One loadBalancerSourceRanges entry as kube-proxy reads it (serviceport.go newBaseServiceInfo,
    util.MapCIDRsByIPFamily): surrounding whitespace trimmed, parsed by ParseCIDRSloppy (IPv4 octets
    may carry leading zeros, host bits are masked off), an entry that does not parse ignored (None)."""
    text = value.strip()
    ip, sep, bits = text.partition("/")
    if not sep or not bits.isascii() or not bits.isdigit() or len(bits) > 7:  # the prefix may have leading zeros
        return None
    try:
        addr = parse_ip_sloppy(ip, "")
    except ObjectError:
        return None
    if ":" in ip and ":" not in addr:
        return None  # an IPv4-mapped IPv6 prefix ("::ffff:10.0.0.0/104"): left out (the API refuses it anyway)
    try:
        return str(ipaddress.ip_network(f"{addr}/{int(bits)}", strict=False))
    except ValueError:
        return None


def _source_ranges(values: list, field: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ObjectError(f"{field}[{i}]", f"expected a string, got {type(v).__name__}")
        cidr = _source_range(v)
        if cidr is not None:
            out.append(cidr)
    return tuple(out)


def _cluster_ips(ips: list, field: str) -> tuple[str, ...]:
    if field == "spec.clusterIP":
        return tuple(parse_ip_sloppy(ip, field) for ip in ips)
    return tuple(parse_ip_sloppy(ip, f"{field}[{i}]") for i, ip in enumerate(ips))


def _address_type(value: str) -> str:
    if value not in (IPV4, IPV6, "FQDN"):
        raise ObjectError("addressType", f"must be IPv4, IPv6 or FQDN, got {value!r}")
    return value


def _slice_skip(labels: dict[str, str], address_type: str) -> str:
    """Why kube-proxy ignores this EndpointSlice ("" = it does not)."""
    if LABEL_PROXY_NAME in labels:
        return f"labelled {LABEL_PROXY_NAME}"
    if LABEL_HEADLESS in labels:
        return f"labelled {LABEL_HEADLESS}"
    if address_type == "FQDN":
        return "addressType FQDN"
    if not labels.get(LABEL_SERVICE_NAME):
        return f"no {LABEL_SERVICE_NAME} label"
    return ""


def _endpoint_ip(addr: Any, address_type: str, field: str) -> str:
    # Only the first address counts (the API allows exactly one; kube-proxy reads [0]).
    ip = parse_ip_sloppy(addr, field)
    if family_of(ip) != address_type:
        raise ObjectError(field, f"{ip} is not an {address_type} address")
    return ip


def _pod_cidrs(cidrs: list) -> tuple:
    for i, c in enumerate(cidrs):
        try:
            if not isinstance(c, str):  # ip_network takes an int (or true) as an address
                raise ValueError
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise ObjectError(f"spec.podCIDRs[{i}]", f"not a CIDR: {c!r}") from None
    return tuple(cidrs)


# ---- plain dicts (YAML, or JSON the typed path could not take) -> model values --------------------------

def parse_service(obj: dict) -> Service:
    key, labels = _meta(obj)
    svc_type = _service_type(_get(obj, "spec.type", str, "ClusterIP"))
    cluster_ips = _get(obj, "spec.clusterIPs", list, None)
    field = "spec.clusterIPs"
    if not cluster_ips:
        one = _get(obj, "spec.clusterIP", str, "")
        cluster_ips, field = ([one] if one else []), "spec.clusterIP"
    ports = []
    for i, p in enumerate(_get(obj, "spec.ports", list, [])):
        f = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise ObjectError(f, "expected an object")
        name = p.get("name") or ""
        if not isinstance(name, str):
            raise ObjectError(f"{f}.name", "expected a string")
        ports.append(ServicePort(name=name, port=_int(p.get("port"), f"{f}.port", 1, 65535),
                                 protocol=_protocol(p.get("protocol"), f"{f}.protocol"),
                                 node_port=_int(p.get("nodePort", 0), f"{f}.nodePort", 0, 65535)))
    _unique_port_names(ports)
    affinity = _get(obj, "spec.sessionAffinity", str, "None")
    timeout = _affinity(affinity, _get(obj, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", int,
                                       DEFAULT_AFFINITY_TIMEOUT) if affinity == "ClientIP" else 0)
    internal_local = _local("internalTrafficPolicy", _get(obj, "spec.internalTrafficPolicy", str, "Cluster"))
    external_local = _local("externalTrafficPolicy", _get(obj, "spec.externalTrafficPolicy", str, "Cluster"))
    skip = _service_skip(labels, svc_type, cluster_ips)
    ips = () if skip else _cluster_ips(cluster_ips, field)
    external = tuple(parse_ip_sloppy(ip, f"spec.externalIPs[{i}]")
                     for i, ip in enumerate(_get(obj, "spec.externalIPs", list, [])))
    ingress = []
    for i, ing in enumerate(_get(obj, "status.loadBalancer.ingress", list, [])):
        if not isinstance(ing, dict) or not ing.get("ip"):
            continue  # hostname-only ingress: nothing to program
        if ing.get("ipMode", "VIP") == "Proxy":
            continue  # kube-proxy: ipMode Proxy means the load balancer itself proxies; no rule
        ingress.append(parse_ip_sloppy(ing["ip"], f"status.loadBalancer.ingress[{i}].ip"))
    hc_port = _int(_get(obj, "spec.healthCheckNodePort", object, 0), "spec.healthCheckNodePort", 0, 65535)
    ranges = _source_ranges(_get(obj, "spec.loadBalancerSourceRanges", list, []), "spec.loadBalancerSourceRanges")
    return Service(key=key, type=svc_type, cluster_ips=ips, ports=tuple(ports), external_ips=external,
                   lb_ingress_ips=tuple(ingress), affinity_timeout=timeout, internal_local=internal_local,
                   external_local=external_local, skip=skip,
                   created=_get(obj, "metadata.creationTimestamp", str, ""),
                   health_check_node_port=hc_port, lb_source_ranges=ranges)


def _hints(hints: Any, kind: str, field: str) -> tuple[str, ...] | None:
    if hints is None:
        return None
    items = hints.get(kind) if isinstance(hints, dict) else None
    if items is None:
        return None
    if not isinstance(items, list):
        raise ObjectError(f"{field}.{kind}", "expected a list")
    return tuple(str(h.get("name", "")) for h in items if isinstance(h, dict))


def parse_endpoint_slice(obj: dict) -> EndpointSlice:
    key, labels = _meta(obj)
    address_type = _address_type(_get(obj, "addressType", str, ""))
    skip = _slice_skip(labels, address_type)
    ports = []
    for i, p in enumerate(_get(obj, "ports", list, []) or []):
        f = f"ports[{i}]"
        if not isinstance(p, dict):
            raise ObjectError(f, "expected an object")
        # endpointslicecache.go: a port with a nil name or a nil/0 port is ignored, not an error.
        if p.get("name") is None or not p.get("port"):
            continue
        if not isinstance(p["name"], str):
            raise ObjectError(f"{f}.name", "expected a string")
        ports.append(SlicePort(p["name"], _int(p["port"], f"{f}.port", 1, 65535),
                               _protocol(p.get("protocol"), f"{f}.protocol")))
    endpoints = []
    for i, e in enumerate(_get(obj, "endpoints", list, []) or []):
        f = f"endpoints[{i}]"
        if not isinstance(e, dict):
            raise ObjectError(f, "expected an object")
        addrs = e.get("addresses") or []
        if not isinstance(addrs, list):
            raise ObjectError(f"{f}.addresses", "expected a list")
        if not addrs:
            continue
        ip = str(addrs[0]) if skip else _endpoint_ip(addrs[0], address_type, f"{f}.addresses[0]")
        cond = e.get("conditions") or {}
        if not isinstance(cond, dict):
            raise ObjectError(f"{f}.conditions", "expected an object")
        for c in ("ready", "serving", "terminating"):
            if cond.get(c) is not None and not isinstance(cond[c], bool):
                raise ObjectError(f"{f}.conditions.{c}", f"expected true or false, got {cond[c]!r}")
        node = e.get("nodeName") or ""
        endpoints.append(Endpoint(
            ip=ip,
            ready=cond.get("ready") is not False,  # absent means true
            serving=cond.get("serving") is not False,  # absent means true
            terminating=cond.get("terminating") is True,  # absent means false
            node_name=intern(str(node)), zone=intern(str(e.get("zone") or "")),
            hint_zones=_hints(e.get("hints"), "forZones", f"{f}.hints"),
            hint_nodes=_hints(e.get("hints"), "forNodes", f"{f}.hints")))
    svc_name = labels.get(LABEL_SERVICE_NAME)
    service = ObjKey(key.namespace, svc_name) if svc_name else None
    return EndpointSlice(key=key, service=service, address_type=address_type, ports=tuple(ports),
                         endpoints=tuple(endpoints), skip=skip)


def parse_node(obj: dict) -> Node:
    key, labels = _meta(obj)
    cidrs = _pod_cidrs(_get(obj, "spec.podCIDRs", list, [])
                       or ([_get(obj, "spec.podCIDR", str)] if _get(obj, "spec.podCIDR", str) else []))
    addrs = tuple((str(a.get("type", "")), str(a.get("address", "")))
                  for a in _get(obj, "status.addresses", list, []) if isinstance(a, dict))
    taints = _get(obj, "spec.taints", list, [])
    deleting = bool(_get(obj, "metadata.deletionTimestamp", str, "")) or any(
        isinstance(t, dict) and t.get("key") == "ToBeDeletedByClusterAutoscaler" for t in taints)
    return Node(name=key.name, labels=tuple(sorted(labels.items())), pod_cidrs=cidrs, addresses=addrs,
                deleting=deleting)


def kind_of(obj: Any) -> tuple[str, str] | None:
    if not isinstance(obj, dict):
        return None
    return (obj.get("apiVersion", ""), obj.get("kind", ""))


PARSERS = {SERVICE: parse_service, ENDPOINT_SLICE: parse_endpoint_slice, NODE: parse_node}


TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
KIND_PARSERS = {"Service": parse_service, "EndpointSlice": parse_endpoint_slice, "Node": parse_node}


@dataclass(frozen=True, slots=True)
class Parsed:
    """One object as a source saw it: its key, and either its model value or why it is malformed."""
    kind: str  # "Service" | "EndpointSlice" | "Node"
    key: ObjKey  # a Node's key has an empty namespace
    value: Any = None  # Service | EndpointSlice | Node; None when malformed
    error: ObjectError | None = None
    trigger: float | None = None  # EndpointSlice: endpoints.kubernetes.io/last-change-trigger-time (Unix s)


def trigger_time(obj: dict) -> float | None:
    meta = obj.get("metadata")
    ann = meta.get("annotations") if isinstance(meta, dict) else None
    text = ann.get(TRIGGER_ANNOTATION) if isinstance(ann, dict) else None
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def key_of(kind: str, obj: Any) -> ObjKey:
    """The object's key, as well as it can be read from a possibly malformed object."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return ObjKey("", "")
    name = meta.get("name") if isinstance(meta.get("name"), str) else ""
    if kind == "Node":
        return ObjKey("", name)
    ns = meta.get("namespace")
    return ObjKey(ns if isinstance(ns, str) and ns else "default", name)


# ---- JSON bytes -> typed structs -> model values: the fast path -------------------------
# msgspec decodes straight into these Structs in C: no dict per object, field types checked on the way.
# They are deliberately stricter than the dict parsers above (a field of an unexpected type, a null
# where the API never sends one, a value out of range): whatever they do not take, or whatever the
# conversion below finds wrong, goes to the dict parsers, which decide and name the field. So an object
# either converts here to exactly the value the dict parser would return (tests/test_objects.py checks
# this on generated objects), or is handed to the dict parser: errors are the dict parsers' only.
# Unknown fields are skipped by msgspec without being decoded.

class _Undecided(Exception):
    """The typed path leaves this object to the dict parser."""


class _Meta(Struct, frozen=True, gc=False):
    name: str = ""
    namespace: str = ""
    labels: dict[str, str] = {}
    resourceVersion: str = ""
    annotations: dict[str, str] = {}
    deletionTimestamp: str = ""
    creationTimestamp: str = ""


class _SvcPort(Struct, frozen=True, gc=False):
    port: int = 0
    name: str = ""
    protocol: str = TCP
    nodePort: int = 0


class _ClientIP(Struct, frozen=True, gc=False):
    timeoutSeconds: int = DEFAULT_AFFINITY_TIMEOUT


class _AffinityConfig(Struct, frozen=True, gc=False):
    clientIP: _ClientIP = _ClientIP()


class _SvcSpec(Struct, frozen=True, gc=False):
    type: str = "ClusterIP"
    clusterIP: str = ""
    clusterIPs: list[str] = []
    ports: list[_SvcPort] = []
    externalIPs: list[str] = []
    sessionAffinity: str = "None"
    sessionAffinityConfig: _AffinityConfig = _AffinityConfig()
    internalTrafficPolicy: str = "Cluster"
    externalTrafficPolicy: str = "Cluster"
    healthCheckNodePort: int = 0
    loadBalancerSourceRanges: list[str] = []


class _Ingress(Struct, frozen=True, gc=False):
    ip: str = ""
    ipMode: str = "VIP"


class _LoadBalancer(Struct, frozen=True, gc=False):
    ingress: list[_Ingress] = []


class _SvcStatus(Struct, frozen=True, gc=False):
    loadBalancer: _LoadBalancer = _LoadBalancer()


class _Service(Struct, frozen=True, gc=False, tag="Service", tag_field="kind"):
    apiVersion: str = ""
    metadata: _Meta = _Meta()
    spec: _SvcSpec = _SvcSpec()
    status: _SvcStatus = _SvcStatus()


class _SlicePort(Struct, frozen=True, gc=False):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None


class _Conditions(Struct, frozen=True, gc=False):
    ready: bool = True  # absent means true
    serving: bool = True  # absent means true
    terminating: bool = False  # absent means false


class _HintName(Struct, frozen=True, gc=False):
    name: str = ""


class _Hints(Struct, frozen=True, gc=False):
    forZones: list[_HintName] | None = None
    forNodes: list[_HintName] | None = None


class _Endpoint(Struct, frozen=True, gc=False):
    addresses: list[str] = []
    conditions: _Conditions = _Conditions()
    nodeName: str = ""
    zone: str = ""
    hints: _Hints | None = None


class _EndpointSlice(Struct, frozen=True, gc=False, tag="EndpointSlice", tag_field="kind"):
    apiVersion: str = ""
    metadata: _Meta = _Meta()
    addressType: str = ""
    ports: list[_SlicePort] = []
    endpoints: list[_Endpoint] = []


class _Taint(Struct, frozen=True, gc=False):
    key: str = ""


class _NodeSpec(Struct, frozen=True, gc=False):
    podCIDR: str = ""
    podCIDRs: list[str] = []
    taints: list[_Taint] = []


class _NodeAddress(Struct, frozen=True, gc=False):
    type: str = ""
    address: str = ""


class _NodeStatus(Struct, frozen=True, gc=False):
    addresses: list[_NodeAddress] = []


class _Node(Struct, frozen=True, gc=False, tag="Node", tag_field="kind"):
    apiVersion: str = ""
    metadata: _Meta = _Meta()
    spec: _NodeSpec = _NodeSpec()
    status: _NodeStatus = _NodeStatus()


def _typed_key(m: _Meta) -> ObjKey:
    if not m.name:
        raise _Undecided
    return ObjKey(intern(m.namespace) if m.namespace else "default", m.name)


def _service_of(raw: _Service) -> Service:
    spec = raw.spec
    key = _typed_key(raw.metadata)
    svc_type = intern(_service_type(spec.type))
    cluster_ips, field = spec.clusterIPs, "spec.clusterIPs"
    if not cluster_ips:
        cluster_ips, field = ([spec.clusterIP] if spec.clusterIP else []), "spec.clusterIP"
    ports = []
    for p in spec.ports:
        if not 0 < p.port <= 65535 or not 0 <= p.nodePort <= 65535 or p.protocol not in (TCP, UDP, SCTP):
            raise _Undecided
        ports.append(ServicePort(intern(p.name), p.port, intern(p.protocol), p.nodePort))  # (see _slice_of)
    _unique_port_names(ports)
    timeout = _affinity(spec.sessionAffinity, spec.sessionAffinityConfig.clientIP.timeoutSeconds)
    internal_local = _local("internalTrafficPolicy", spec.internalTrafficPolicy)
    external_local = _local("externalTrafficPolicy", spec.externalTrafficPolicy)
    skip = _service_skip(raw.metadata.labels, svc_type, cluster_ips)
    ips = () if skip else tuple([parse_ip_sloppy(ip, field) for ip in cluster_ips])  # (an error: the dict parser)
    external = tuple([parse_ip_sloppy(ip, "spec.externalIPs") for ip in spec.externalIPs])
    ingress = tuple(parse_ip_sloppy(ing.ip, "status.loadBalancer.ingress")
                    for ing in raw.status.loadBalancer.ingress if ing.ip and ing.ipMode != "Proxy")
    if not 0 <= spec.healthCheckNodePort <= 65535:
        raise _Undecided
    ranges = _source_ranges(spec.loadBalancerSourceRanges, "spec.loadBalancerSourceRanges")
    return Service(key, svc_type, ips, tuple(ports), external, ingress, timeout, internal_local, external_local,
                   skip, raw.metadata.creationTimestamp, spec.healthCheckNodePort, ranges)


def _hint_names(items: list[_HintName] | None) -> tuple[str, ...] | None:
    return None if items is None else tuple(h.name for h in items)


# The common case, one address per endpoint that is already canonical, checked for a whole slice by
# one regular expression over the addresses joined by newlines (the C matcher instead of a Python
# call per endpoint); any other address goes through parse_ip_sloppy.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4_LINES = re.compile(rf"(?:{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}\n)*").fullmatch


def _canonical_v4(ips: list[str]) -> bool:
    """Every address is an IPv4 address in canonical form (parse_ip_sloppy would return it as is)."""
    lines = "\n".join(ips) + "\n"
    return _CANONICAL_V4_LINES(lines) is not None and lines.count("\n") == len(ips)  # no newline inside one


def _slice_of(raw: _EndpointSlice) -> EndpointSlice:
    meta = raw.metadata
    key = _typed_key(meta)
    labels = meta.labels
    address_type = _address_type(raw.addressType)
    skip = _slice_skip(labels, address_type)
    ports = []
    for p in raw.ports:
        # endpointslicecache.go: a port with a nil name or a nil/0 port is ignored, not an error.
        if p.name is None or not p.port:
            continue
        protocol = TCP if p.protocol is None else p.protocol
        if not 0 < p.port <= 65535 or protocol not in (TCP, UDP, SCTP):
            raise _Undecided
        ports.append(SlicePort(intern(p.name), p.port, intern(protocol)))
    eps = [e for e in raw.endpoints if e.addresses]
    ips = [e.addresses[0] for e in eps]
    if not skip and not (address_type == IPV4 and _canonical_v4(ips)):
        ips = [_endpoint_ip(ip, address_type, "endpoints") for ip in ips]
    # Node and zone names, like port names and protocols, repeat across slices (the decoder makes a
    # string each time): one copy each (sys.intern; an interned string goes with its last reference).
    endpoints = tuple([
        Endpoint(ip, e.conditions.ready, e.conditions.serving, e.conditions.terminating, intern(e.nodeName),
                 intern(e.zone))
        if e.hints is None else
        Endpoint(ip, e.conditions.ready, e.conditions.serving, e.conditions.terminating, intern(e.nodeName),
                 intern(e.zone),
                 _hint_names(e.hints.forZones), _hint_names(e.hints.forNodes))
        for e, ip in zip(eps, ips)])
    svc_name = labels.get(LABEL_SERVICE_NAME)
    return EndpointSlice(key, ObjKey(key.namespace, svc_name) if svc_name else None, address_type, tuple(ports),
                         endpoints, skip)


def _node_of(raw: _Node) -> Node:
    meta, spec = raw.metadata, raw.spec
    if not meta.name:
        raise _Undecided
    cidrs = _pod_cidrs(spec.podCIDRs or ([spec.podCIDR] if spec.podCIDR else []))
    deleting = bool(meta.deletionTimestamp) or any(t.key == "ToBeDeletedByClusterAutoscaler" for t in spec.taints)
    return Node(meta.name, tuple(sorted(meta.labels.items())), cidrs,
                tuple((a.type, a.address) for a in raw.status.addresses), deleting)


_TYPED = {"Service": (_Service, _service_of), "EndpointSlice": (_EndpointSlice, _slice_of), "Node": (_Node, _node_of)}


def _trigger(meta: _Meta) -> float | None:
    text = meta.annotations.get(TRIGGER_ANNOTATION)
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _typed_parsed(kind: str, raw: Any) -> Parsed | None:
    """The model value of one decoded struct, or None to leave it to the dict parser."""
    try:
        value = _TYPED[kind][1](raw)
    except (_Undecided, ObjectError):
        return None
    if kind == "Node":
        return Parsed(kind, ObjKey("", value.name), value)
    return Parsed(kind, value.key, value, trigger=_trigger(raw.metadata) if kind == "EndpointSlice" else None)


# ---- the source layer's entry points: one object, one API page, one watch line or one JSON file in --------
# Both sources (manifest folder, API watch) hand their objects to these; lb/source/handler.py keeps
# the last good version of an object that fails.

def parse(kind: str, obj: Any) -> Parsed:
    """One plain object (from YAML, JSON or the API) of a known kind. Never raises.
    (The dict parsers, not msgspec.convert: from dicts that already exist, converting to the typed
    structs first measured slower than reading the dicts.)"""
    key = key_of(kind, obj)
    if not isinstance(obj, dict):
        return Parsed(kind, key, error=ObjectError("", "not an object"))
    try:
        value = KIND_PARSERS[kind](obj)
    except ObjectError as e:
        return Parsed(kind, key, error=e)
    key = ObjKey("", value.name) if kind == "Node" else value.key
    return Parsed(kind, key, value, trigger=trigger_time(obj) if kind == "EndpointSlice" else None)


class DecodeError(ValueError):
    """The bytes are not the JSON the API server sends (truncated stream, wrong shape)."""


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DecodeError(f"{what}: not JSON: {e}") from None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of an API list: the parsed items, the continue token and the list's resourceVersion."""
    items: list[Parsed]
    cont: str
    resource_version: str


class _ListMeta(Struct, frozen=True, gc=False):
    resourceVersion: str = ""
    cont: str = msgspec.field(default="", name="continue")


T = TypeVar("T")


class _List(Struct, Generic[T], frozen=True, gc=False):
    metadata: _ListMeta = _ListMeta()
    items: list[T] = []


class _WatchEvent(Struct, Generic[T], frozen=True, gc=False):
    type: str
    object: T


_PAGE_DECODERS = {kind: msgspec.json.Decoder(_List[typ]) for kind, (typ, _) in _TYPED.items()}
_EVENT_DECODERS = {kind: msgspec.json.Decoder(_WatchEvent[typ]) for kind, (typ, _) in _TYPED.items()}


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while one page or file is decoded. The structs are untracked
    (gc=False), but their lists are not: 100 000 endpoints make a list each, and every 700 new lists
    started a collection that walked the young ones (measured: decoding 10 000 EndpointSlices x 10 took
    0.23 s with the collector on, 0.05 s with it off). Nothing decoded here can form a cycle."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def decode_page(kind: str, raw: bytes) -> Page:
    """One page of ``GET <collection>?limit=..`` (a v1 List-shaped JSON body). Raises DecodeError."""
    with _collector_paused():
        try:
            page = _PAGE_DECODERS[kind].decode(raw)
        except msgspec.DecodeError:  # also ValidationError: some field the typed path does not take
            page = None
        items = [_typed_parsed(kind, item) for item in page.items] if page is not None else [None]
    if None not in items:
        return Page(items, page.metadata.cont, page.metadata.resourceVersion)
    # Something only the dict parsers can judge (or not JSON at all): the whole page, the plain way.
    data = _json(raw, f"list of {kind}")
    if not isinstance(data, dict):
        raise DecodeError(f"list of {kind}: expected an object")
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    items = data.get("items") or []
    if not isinstance(items, list):
        raise DecodeError(f"list of {kind}: items is not a list")
    return Page([parse(kind, o) for o in items], str(meta.get("continue") or ""),
                str(meta.get("resourceVersion") or ""))


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a watch stream."""
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | ERROR
    item: Parsed | None  # None for BOOKMARK and ERROR
    resource_version: str = ""
    status_code: int = 0  # ERROR: the Status object's code
    message: str = ""  # ERROR: the Status object's message


def decode_event(kind: str, raw: bytes) -> Event:
    """One line of ``GET <collection>?watch=1``. Raises DecodeError."""
    try:
        ev = _EVENT_DECODERS[kind].decode(raw)
    except msgspec.DecodeError:
        pass
    else:
        meta = ev.object.metadata
        if ev.type == "DELETED":  # only the key matters
            key = ObjKey("", meta.name) if kind == "Node" else ObjKey(meta.namespace or "default", meta.name)
            return Event("DELETED", Parsed(kind, key), meta.resourceVersion)
        if ev.type in ("ADDED", "MODIFIED"):
            item = _typed_parsed(kind, ev.object)
            if item is not None:
                return Event(ev.type, item, meta.resourceVersion)
    ev = _json(raw, f"watch of {kind}")
    if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
        raise DecodeError(f"watch of {kind}: not a watch event")
    obj = ev.get("object") if isinstance(ev.get("object"), dict) else {}
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    rv = str(meta.get("resourceVersion") or "")
    typ = ev["type"]
    if typ == "ERROR":
        code = obj.get("code")
        return Event(typ, None, rv, code if isinstance(code, int) else 0, str(obj.get("message") or "watch error"))
    if typ == "BOOKMARK":
        return Event(typ, None, rv)
    if typ == "DELETED":  # only the key matters
        return Event(typ, Parsed(kind, key_of(kind, obj)), rv)
    return Event(typ, parse(kind, obj), rv)


@dataclass(frozen=True, slots=True)
class Other:
    """A document of a manifest file that is none of ours: ``error`` is None for other kinds
    (Deployments, ...: not ours to read), else why it cannot be read (not an object; a Service,
    EndpointSlice or Node at an apiVersion this agent does not know)."""
    api_version: str
    kind: str
    error: ObjectError | None = None
    key: ObjKey | None = None  # our kind at an unknown apiVersion: its key, if it has a name


class _DocList(Struct, frozen=True, gc=False, tag="List", tag_field="kind"):
    items: list[Union[_Service, _EndpointSlice, _Node, "_DocList"]] = []


_API_VERSIONS = {"Service": SERVICE[0], "EndpointSlice": ENDPOINT_SLICE[0], "Node": NODE[0]}
_Doc = Union[_Service, _EndpointSlice, _Node, _DocList]
_DOCUMENTS = msgspec.json.Decoder(Union[_Doc, list[_Doc]])


def _other(obj: Any) -> Other | None:
    """What a plain document is when it is not one of ours to parse (None: it is)."""
    kind = kind_of(obj)
    if kind is None:
        return Other("", "", ObjectError("", "not an object"))
    if kind in PARSERS:
        return None
    api_version, name = (k if isinstance(k, str) else "" for k in kind)
    if name in KIND_PARSERS:
        key = key_of(name, obj)
        return Other(api_version, name, ObjectError("apiVersion", f"unsupported apiVersion {kind[0]!r} for {name}"),
                     key if key.name else None)
    return Other(api_version, name)


def parse_document(obj: Any) -> Parsed | Other:
    """One plain document of a manifest file (YAML): what ``decode_documents`` gives per object."""
    other = _other(obj)
    return other if other is not None else parse(obj["kind"], obj)


def flatten(doc: Any) -> list[Any]:
    """A document, or the items of a ``kind: List`` (nested Lists flattened)."""
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        return [o for item in doc["items"] for o in flatten(item)]
    return [doc]


class _RawDocList(Struct, frozen=True, gc=False, tag="List", tag_field="kind"):
    items: list[msgspec.Raw] = []


# A file's top level with its documents left undecoded (msgspec.Raw: a view of the bytes), so that
# they are decoded one at a time: a document's structs are gone once its model value is made, instead
# of every struct of the file living beside every model value (10 000 Services x 10 endpoints: the
# parse's peak 79 -> 41 MiB traced, and decoding took 0.12 s instead of 0.14).
_TOP_LEVEL = msgspec.json.Decoder(Union[_RawDocList, list[msgspec.Raw]])
_DOCUMENT = msgspec.json.Decoder(_Doc)


def _flatten_typed(doc: Any) -> list[Any]:
    return [o for item in doc.items for o in _flatten_typed(item)] if isinstance(doc, _DocList) else [doc]


def _typed_document(doc: Any, out: list[Parsed | Other]) -> bool:
    """Append the model values of one decoded document (a List's items flattened); False if one
    is left to the plain way."""
    for obj in _flatten_typed(doc):
        kind = type(obj).__struct_config__.tag
        if obj.apiVersion != _API_VERSIONS[kind]:
            return False  # rare: the plain way names the object in the error
        parsed = _typed_parsed(kind, obj)
        if parsed is None:
            return False
        out.append(parsed)
    return True


def _typed_documents(raw: bytes) -> list[Parsed | Other] | None:
    out: list[Parsed | Other] = []
    try:
        top = _TOP_LEVEL.decode(raw)
    except msgspec.DecodeError:  # one document that is not a List (or not JSON): decoded whole
        try:
            doc = _DOCUMENTS.decode(raw)
        except msgspec.DecodeError:  # not JSON, or objects of other kinds: the plain way
            return None
        docs = doc if isinstance(doc, list) else [doc]
        return out if all(_typed_document(d, out) for d in docs) else None
    pieces = top.items if isinstance(top, _RawDocList) else top
    for i, piece in enumerate(pieces):
        pieces[i] = None  # its bytes' view goes with its structs
        try:
            doc = _DOCUMENT.decode(piece)
        except msgspec.DecodeError:  # objects of other kinds: the plain way
            return None
        if not _typed_document(doc, out):
            return None
    return out


def decode_documents(raw: bytes) -> list[Parsed | Other]:
    """A manifest file's JSON (one object, a ``kind: List``, or an array of them; Lists nested
    anywhere are flattened): one entry per object, in file order, so an entry's position is the
    object's index in the file. Raises DecodeError if the bytes are not JSON."""
    with _collector_paused():
        out = _typed_documents(raw)
    if out is not None:
        return out
    data = _json(raw, "manifest")
    out = []
    for obj in (o for d in (data if isinstance(data, list) else [data]) for o in flatten(d)):
        other = _other(obj)
        out.append(other if other is not None else parse(obj["kind"], obj))
    return out
