"""PURE: Services + EndpointSlices + this Node -> desired frontends. No I/O, no mutation.

Each rule mirrors a function of kube-proxy (kubernetes/kubernetes pkg/proxy, 1.34); the function is
named in a comment next to the rule. ``select_endpoints`` also records why each endpoint was left out,
which ``bpflb explain`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .model import (SCTP, Backend, Endpoint, EndpointSlice, Frontend, FrontendState, Node, ObjKey,
                    Service, ServicePort)
from .objects import LABEL_ZONE, family_of

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


@dataclass(frozen=True)
class NodeView:
    """What translation needs to know about the node it runs on."""
    name: str
    zone: str = ""

    @staticmethod
    def of(name: str, node: Node | None) -> "NodeView":
        return NodeView(name, (node.label(LABEL_ZONE) or "") if node else "")


@dataclass(frozen=True)
class Selection:
    """kube-proxy's CategorizeEndpoints result for one service port and family, with reasons."""
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    has_any: bool  # any ready or serving+terminating endpoint anywhere (else: REJECT)
    topology: str  # "", PreferSameNode or PreferSameZone
    topology_note: str
    excluded_cluster: dict[str, str] = field(default_factory=dict)  # ip -> reason
    excluded_local: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PortEndpoints:
    port: ServicePort
    family: str
    endpoints: tuple[tuple[Endpoint, int], ...]  # (endpoint, target port), deduplicated


def is_local(ep: Endpoint, node: NodeView) -> bool:
    return bool(node.name) and ep.node_name == node.name


def externally_accessible(svc: Service) -> bool:
    """serviceport.go ExternallyAccessible: NodePort, load-balancer IPs or externalIPs."""
    return (any(p.node_port for p in svc.ports) and svc.type in ("NodePort", "LoadBalancer")) \
        or bool(svc.lb_ingress_ips) or bool(svc.external_ips)


def uses_cluster_endpoints(svc: Service) -> bool:
    """serviceport.go UsesClusterEndpoints: iTP Cluster, or reachable from outside at all."""
    return not svc.internal_local or externally_accessible(svc)


def uses_local_endpoints(svc: Service) -> bool:
    """serviceport.go UsesLocalEndpoints."""
    return svc.internal_local or (svc.external_local and externally_accessible(svc))


def topology_mode(endpoints: Iterable[Endpoint], node: NodeView) -> tuple[str, str]:
    """topology.go topologyModeFromHints: node hints first (PreferSameNode), then zone hints; only
    when every ready endpoint is hinted and at least one hint names this node/zone. Hints of
    endpoints that are not ready are ignored."""
    all_node, for_node, all_zone, for_zone = True, False, True, False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.hint_nodes:
            all_node = False
        elif node.name in ep.hint_nodes:
            for_node = True
        if not ep.hint_zones:
            all_zone = False
            if not all_node:
                break  # neither kind of hint can apply any more
        elif node.zone in ep.hint_zones:
            for_zone = True
    if all_node and for_node:
        return PREFER_SAME_NODE, f"node hints for {node.name}"
    if all_zone:
        if for_zone:
            return PREFER_SAME_ZONE, f"zone hints for {node.zone}"
        if not node.zone:
            return "", f"hints ignored: node has no {LABEL_ZONE} label"
        return "", f"hints ignored: no endpoint hinted for zone {node.zone}"
    return "", "no topology hints (or not every ready endpoint hinted)"


def available_for_topology(ep: Endpoint, mode: str, node: NodeView) -> bool:
    """topology.go availableForTopology."""
    if mode == PREFER_SAME_NODE:
        return node.name in (ep.hint_nodes or ())
    if mode == PREFER_SAME_ZONE:
        return node.zone in (ep.hint_zones or ())
    return True


def _why_not_ready(ep: Endpoint) -> str:
    if ep.serving and ep.terminating:
        return "terminating (used only when no endpoint is ready)"
    if not ep.serving:
        return "not serving" + (" (terminating)" if ep.terminating else "")
    return "not ready"


def select_endpoints(endpoints: tuple[Endpoint, ...], svc: Service, node: NodeView) -> Selection:
    """topology.go CategorizeEndpoints, with the reason each endpoint was not chosen."""
    excl_c: dict[str, str] = {}
    excl_l: dict[str, str] = {}
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    has_any = False
    mode, note = "", ""
    if uses_cluster_endpoints(svc):
        mode, note = topology_mode(endpoints, node)
        if mode:
            cluster = tuple([ep for ep in endpoints if ep.ready and available_for_topology(ep, mode, node)])
        else:
            cluster = tuple([ep for ep in endpoints if ep.ready])
        for ep in endpoints if len(cluster) != len(endpoints) else ():  # else: none excluded
            if not ep.ready:
                excl_c[ep.ip] = _why_not_ready(ep)
            elif not available_for_topology(ep, mode, node):
                excl_c[ep.ip] = f"topology: {mode} and not hinted for this {'node' if mode == PREFER_SAME_NODE else 'zone'}"
        if not cluster:
            # No ready endpoint anywhere (topology would have been ignored otherwise): fall back to
            # serving+terminating endpoints.
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
            for ep in cluster:
                excl_c.pop(ep.ip, None)
            for ep in endpoints:
                if ep.ip in excl_c and not ep.ready and not (ep.serving and ep.terminating):
                    excl_c[ep.ip] = _why_not_ready(ep)
        has_any = bool(cluster)
    if uses_local_endpoints(svc):
        local_ready = any(ep.ready and is_local(ep, node) for ep in endpoints)
        for ep in endpoints:
            if ep.ready or (ep.serving and ep.terminating):
                has_any = True
        if local_ready:
            local = tuple(ep for ep in endpoints if is_local(ep, node) and ep.ready)
        else:
            local = tuple(ep for ep in endpoints if is_local(ep, node) and ep.serving and ep.terminating)
        chosen = {ep.ip for ep in local}
        for ep in endpoints:
            if ep.ip in chosen:
                continue
            if not is_local(ep, node):
                excl_l[ep.ip] = f"on node {ep.node_name or '(none)'}, not {node.name}"
            elif local_ready:
                excl_l[ep.ip] = _why_not_ready(ep)
            else:
                excl_l[ep.ip] = "not serving" if not ep.serving else "not ready"
    return Selection(cluster, local, has_any, mode, note, excl_c, excl_l)


def slices_by_service(slices: Iterable[EndpointSlice]) -> dict[ObjKey, list[EndpointSlice]]:
    index: dict[ObjKey, list[EndpointSlice]] = {}
    for s in slices:
        if not s.skip and s.service is not None:
            index.setdefault(s.service, []).append(s)
    return index


def _slice_name(s: EndpointSlice) -> str:
    return s.key.name


def port_endpoints(svc: Service, port: ServicePort, family: str,
                   slices: Iterable[EndpointSlice]) -> PortEndpoints:
    """endpointslicecache.go endpointInfoByServicePort/addEndpoints: slices of this family whose
    port has the Service port's name and protocol (targetPort is not consulted); one entry per
    IP:port, a non-terminating copy replacing a terminating one. Sorted by IP, then port."""
    slices = slices if isinstance(slices, (list, tuple)) else list(slices)
    merged: dict[tuple[str, int], Endpoint] = {}
    for s in slices if len(slices) < 2 else sorted(slices, key=_slice_name):
        if s.address_type != family:
            continue
        for sp in s.ports:
            if sp.name != port.name or sp.protocol != port.protocol:
                continue
            target = sp.port
            for ep in s.endpoints:
                k = (ep.ip, target)
                if not ep.terminating or k not in merged:
                    merged[k] = ep
    return PortEndpoints(port, family, tuple([(ep, k[1]) for k, ep in sorted(merged.items())]))


def _backends(pe: PortEndpoints, chosen: tuple[Endpoint, ...]) -> tuple[Backend, ...]:
    """Every target port of every chosen endpoint. ``chosen`` is a subsequence of pe's endpoints, and
    pe's (IP, port) pairs are sorted and distinct, so the backends come out sorted and distinct."""
    protocol = pe.port.protocol
    if len(chosen) == len(pe.endpoints):  # all of them
        return tuple([Backend(ep.ip, target, protocol) for ep, target in pe.endpoints])
    ips = {ep.ip for ep in chosen}
    return tuple([Backend(ep.ip, target, protocol) for ep, target in pe.endpoints if ep.ip in ips])


def frontend_count(svc: Service) -> int:
    """How many frontends translate_service would make for ``svc`` (without making them): TCP/UDP
    ports x the ClusterIPs, externalIPs and load-balancer IPs of the ClusterIPs' families. Admission
    uses it to refuse a huge Service before translating it."""
    if svc.skip:
        return 0
    families = {family_of(ip) for ip in svc.cluster_ips}
    ips = {ip for ip in svc.cluster_ips + svc.external_ips + svc.lb_ingress_ips if family_of(ip) in families}
    ports = {(p.port, p.protocol) for p in svc.ports if p.protocol != SCTP}
    return len(ips) * len(ports)


def translate_service(svc: Service, slices: Iterable[EndpointSlice], node: NodeView) -> dict[Frontend, FrontendState]:
    """The frontends one Service needs on this node (socket LB: traffic from this node's clients)."""
    out: dict[Frontend, FrontendState] = {}
    if svc.skip:
        return out
    slices = list(slices)
    by_family: dict[str, list[str]] = {}  # cluster IPs by family, in the Service's order
    for ip in svc.cluster_ips:
        by_family.setdefault(family_of(ip), []).append(ip)
    outside = svc.external_ips + svc.lb_ingress_ips
    for port in svc.ports:
        if port.protocol == SCTP:
            continue  # cgroup sock_addr hooks see TCP and UDP only
        name = f"{svc.key}:{port.name}" if port.name else str(svc.key)
        for family, cluster_ips in by_family.items():
            pe = port_endpoints(svc, port, family, slices)
            sel = select_endpoints(tuple([ep for ep, _ in pe.endpoints]), svc, node)
            # ClusterIP: internalTrafficPolicy picks the set (nftables proxier: internal chain).
            backends = _backends(pe, sel.local if svc.internal_local else sel.cluster)
            state = FrontendState(backends, sel.has_any and not backends, svc.affinity_timeout, name)
            for ip in cluster_ips:
                out[Frontend(ip, port.port, port.protocol)] = state
            # externalIPs and load-balancer IPs dialled from this node are in-cluster clients:
            # kube-proxy short-circuits them to the cluster set whatever the external policy.
            external = state
            for ip in outside:
                if family_of(ip) == family:
                    if external is state and svc.internal_local:
                        backends = _backends(pe, sel.cluster)
                        external = FrontendState(backends, sel.has_any and not backends, svc.affinity_timeout,
                                                 name)
                    out.setdefault(Frontend(ip, port.port, port.protocol), external)
    return out


def translate(services: Mapping[ObjKey, Service], slices: Iterable[EndpointSlice],
              node: NodeView) -> dict[ObjKey, dict[Frontend, FrontendState]]:
    """Every Service's frontends, keyed by Service (so one Service can be reprogrammed alone)."""
    index = slices_by_service(slices)
    return {key: translate_service(svc, index.get(key, ()), node) for key, svc in services.items()}
