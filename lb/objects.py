"""Kubernetes objects (plain dicts, as decoded from YAML or the API's JSON) -> model values.

Every source (manifest folder, API watch) goes through here, so validation and kube-proxy's
"what is watched and skipped" rules live in one place. A bad object raises ObjectError naming the
field; the caller reports it and keeps everything else.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any

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
    """An IP in canonical form. Like kube-proxy's netutils.ParseIPSloppy, IPv4 octets may carry
    leading zeros ("10.180.00.001" is 10.180.0.1, decimal, not octal)."""
    if not isinstance(value, str) or not value:
        raise ObjectError(field, f"not an IP address: {value!r}")
    try:  # fast path: most addresses are already canonical
        if ":" in value:
            if socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, value)) == value:
                return value
        elif socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value)) == value:
            return value
    except OSError:
        pass
    text = value.strip()
    try:
        if "." in text and ":" not in text:
            parts = text.split(".")
            if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
                raise ValueError
            octets = [int(p, 10) for p in parts]
            if any(o > 255 for o in octets):
                raise ValueError
            return str(ipaddress.IPv4Address(bytes(octets)))
        addr = ipaddress.IPv6Address(text)
        return str(addr)
    except ValueError:
        raise ObjectError(field, f"not an IP address: {value!r}") from None


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


def parse_service(obj: dict) -> Service:
    key, labels = _meta(obj)
    svc_type = _get(obj, "spec.type", str, "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ObjectError("spec.type", f"unknown Service type {svc_type!r}")
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
    names = [p.name for p in ports]
    if len(set(names)) != len(names):
        raise ObjectError("spec.ports", "port names must be unique")

    affinity = _get(obj, "spec.sessionAffinity", str, "None")
    timeout = 0
    if affinity == "ClientIP":
        timeout = _int(_get(obj, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", int, DEFAULT_AFFINITY_TIMEOUT),
                       "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, MAX_AFFINITY_TIMEOUT)
    elif affinity != "None":
        raise ObjectError("spec.sessionAffinity", f"must be None or ClientIP, got {affinity!r}")

    policies = {}
    for name in ("internalTrafficPolicy", "externalTrafficPolicy"):
        value = _get(obj, f"spec.{name}", str, "Cluster")
        if value not in ("Cluster", "Local"):
            raise ObjectError(f"spec.{name}", f"must be Cluster or Local, got {value!r}")
        policies[name] = value == "Local"

    skip = ""
    if LABEL_PROXY_NAME in labels:
        skip = f"labelled {LABEL_PROXY_NAME}={labels[LABEL_PROXY_NAME]} (another proxy's)"
    elif LABEL_HEADLESS in labels:
        skip = f"labelled {LABEL_HEADLESS}"
    elif svc_type == "ExternalName":
        skip = "type ExternalName"
    elif not cluster_ips or cluster_ips[0] in ("None", ""):
        skip = "headless (clusterIP None)" if cluster_ips else "no clusterIP"
    ips: tuple[str, ...] = ()
    if not skip:
        ips = tuple(parse_ip_sloppy(ip, f"{field}[{i}]" if field.endswith("s") else field)
                    for i, ip in enumerate(cluster_ips))
    external = tuple(parse_ip_sloppy(ip, f"spec.externalIPs[{i}]")
                     for i, ip in enumerate(_get(obj, "spec.externalIPs", list, [])))
    ingress = []
    for i, ing in enumerate(_get(obj, "status.loadBalancer.ingress", list, [])):
        if not isinstance(ing, dict) or not ing.get("ip"):
            continue  # hostname-only ingress: nothing to program
        if ing.get("ipMode", "VIP") == "Proxy":
            continue  # kube-proxy: ipMode Proxy means the load balancer itself proxies; no rule
        ingress.append(parse_ip_sloppy(ing["ip"], f"status.loadBalancer.ingress[{i}].ip"))
    return Service(key=key, type=svc_type, cluster_ips=ips, ports=tuple(ports), external_ips=external,
                   lb_ingress_ips=tuple(ingress), affinity_timeout=timeout,
                   internal_local=policies["internalTrafficPolicy"],
                   external_local=policies["externalTrafficPolicy"], skip=skip)


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
    address_type = _get(obj, "addressType", str, "")
    if address_type not in (IPV4, IPV6, "FQDN"):
        raise ObjectError("addressType", f"must be IPv4, IPv6 or FQDN, got {address_type!r}")
    svc_name = labels.get(LABEL_SERVICE_NAME)
    skip = ""
    if LABEL_PROXY_NAME in labels:
        skip = f"labelled {LABEL_PROXY_NAME}"
    elif LABEL_HEADLESS in labels:
        skip = f"labelled {LABEL_HEADLESS}"
    elif address_type == "FQDN":
        skip = "addressType FQDN"
    elif not svc_name:
        skip = f"no {LABEL_SERVICE_NAME} label"
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
        if skip:
            ip = str(addrs[0])
        else:
            # Only the first address counts (the API allows exactly one; kube-proxy reads [0]).
            ip = parse_ip_sloppy(addrs[0], f"{f}.addresses[0]")
            if family_of(ip) != address_type:
                raise ObjectError(f"{f}.addresses[0]", f"{ip} is not an {address_type} address")
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
            node_name=str(node), zone=str(e.get("zone") or ""),
            hint_zones=_hints(e.get("hints"), "forZones", f"{f}.hints"),
            hint_nodes=_hints(e.get("hints"), "forNodes", f"{f}.hints")))
    service = ObjKey(key.namespace, svc_name) if svc_name else None
    return EndpointSlice(key=key, service=service, address_type=address_type, ports=tuple(ports),
                         endpoints=tuple(endpoints), skip=skip)


def parse_node(obj: dict) -> Node:
    key, labels = _meta(obj)
    cidrs = _get(obj, "spec.podCIDRs", list, []) or ([_get(obj, "spec.podCIDR", str)] if _get(obj, "spec.podCIDR", str) else [])
    for i, c in enumerate(cidrs):
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise ObjectError(f"spec.podCIDRs[{i}]", f"not a CIDR: {c!r}") from None
    addrs = tuple((str(a.get("type", "")), str(a.get("address", "")))
                  for a in _get(obj, "status.addresses", list, []) if isinstance(a, dict))
    taints = _get(obj, "spec.taints", list, [])
    deleting = bool(_get(obj, "metadata.deletionTimestamp", str, "")) or any(
        isinstance(t, dict) and t.get("key") == "ToBeDeletedByClusterAutoscaler" for t in taints)
    return Node(name=key.name, labels=tuple(sorted(labels.items())), pod_cidrs=tuple(cidrs), addresses=addrs,
                deleting=deleting)


def kind_of(obj: Any) -> tuple[str, str] | None:
    if not isinstance(obj, dict):
        return None
    return (obj.get("apiVersion", ""), obj.get("kind", ""))


PARSERS = {SERVICE: parse_service, ENDPOINT_SLICE: parse_endpoint_slice, NODE: parse_node}


# ---- the source layer's entry points: one object (or one API page) in, Parsed values out ---------
# Both sources (manifest folder, API watch) hand their objects to these; lb/source/handler.py keeps
# the last good version of an object that fails. Decoding bytes lives here so a faster decoder can
# replace the json.loads + dict walk without the sources noticing.

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


def parse(kind: str, obj: Any) -> Parsed:
    """One plain object (from YAML, JSON or the API) of a known kind. Never raises."""
    key = key_of(kind, obj)
    if not isinstance(obj, dict):
        return Parsed(kind, key, error=ObjectError("", "not an object"))
    try:
        value = KIND_PARSERS[kind](obj)
    except ObjectError as e:
        return Parsed(kind, key, error=e)
    if kind == "Node":
        key = ObjKey("", value.name)
    else:
        key = value.key
    return Parsed(kind, key, value, trigger=trigger_time(obj) if kind == "EndpointSlice" else None)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of an API list: the parsed items, the continue token and the list's resourceVersion."""
    items: list[Parsed]
    cont: str
    resource_version: str


class DecodeError(ValueError):
    """The bytes are not the JSON the API server sends (truncated stream, wrong shape)."""


def decode_page(kind: str, raw: bytes) -> Page:
    """One page of ``GET <collection>?limit=..`` (a v1 List-shaped JSON body)."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise DecodeError(f"list of {kind}: not JSON: {e}") from None
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
    try:
        ev = json.loads(raw)
    except ValueError as e:
        raise DecodeError(f"watch of {kind}: not JSON: {e}") from None
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
