"""PURE: Services + EndpointSlices + this Node -> desired frontends. No I/O, no mutation.

Each rule mirrors a function of kube-proxy (kubernetes/kubernetes pkg/proxy, 1.34); the function is
named in a comment next to the rule. ``select_endpoints`` also records why each endpoint was left out,
which ``bpflb explain`` prints.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .maps.structs import SCOPE_EXTERNAL, SCOPE_INTERNAL
from .model import (IPV4, IPV6, SCTP, Backend, Endpoint, EndpointSlice, Frontend, FrontendState, Node, ObjKey,
                    Service, ServicePort)
from .objects import LABEL_ZONE, ObjectError, family_of, parse_ip_sloppy

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


WILDCARD = {IPV4: "0.0.0.0", IPV6: "::"}  # a NodePort frontend's address: any node address (lb_node_addrs)
LOOPBACK = {IPV4: "127.0.0.1", IPV6: "::1"}


def node_host_ips(node: Node | None) -> tuple[str, ...]:
    """pkg/util/node GetNodeHostIPs: the Node's InternalIPs, then its ExternalIPs (unparsable ones
    skipped); the first of them, then the first of the other family, if any."""
    if node is None:
        return ()
    ips = []
    for wanted in ("InternalIP", "ExternalIP"):
        for typ, addr in node.addresses:
            if typ == wanted:
                try:
                    ips.append(parse_ip_sloppy(addr, "status.addresses"))
                except ObjectError:
                    pass
    if not ips:
        return ()
    other = next((ip for ip in ips if family_of(ip) != family_of(ips[0])), None)
    return (ips[0],) if other is None else (ips[0], other)


@dataclass(frozen=True)
class NodeView:
    """What translation needs to know about the node it runs on."""
    name: str
    zone: str = ""
    ips: tuple[str, ...] = ()  # node_host_ips of its Node object: at most one per family

    @staticmethod
    def of(name: str, node: Node | None) -> "NodeView":
        return NodeView(name, (node.label(LABEL_ZONE) or "") if node else "", node_host_ips(node))

    def ip_of(self, family: str) -> str:
        """cmd/kube-proxy server.go detectNodeIPs: the node IP of ``family``, loopback when unknown."""
        return next((ip for ip in self.ips if family_of(ip) == family), LOOPBACK[family])


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


def _of_family(ips: Iterable[str], family: str | None) -> list[str]:
    return [ip for ip in ips if family is None or family_of(ip) == family]


def externally_accessible(svc: Service, port: ServicePort | None = None, family: str | None = None) -> bool:
    """serviceport.go ExternallyAccessible, per service port and family (newBaseServiceInfo filters
    externalIPs and load-balancer VIPs by family): a nodePort, a load-balancer VIP or an externalIP.
    Without ``port``/``family``: for any of them."""
    node_port = port.node_port if port is not None else any(p.node_port for p in svc.ports)
    return bool(node_port) or bool(_of_family(svc.lb_ingress_ips, family)) or bool(_of_family(svc.external_ips, family))


def external_policy_local(svc: Service) -> bool:
    """pkg/api/v1/service ExternalPolicyLocal: externalTrafficPolicy Local counts only for a Service
    the API calls externally accessible (LoadBalancer, NodePort, or ClusterIP with externalIPs)."""
    accessible = svc.type in ("LoadBalancer", "NodePort") or (svc.type == "ClusterIP" and bool(svc.external_ips))
    return accessible and svc.external_local


def needs_health_check(svc: Service) -> bool:
    """pkg/api/v1/service NeedsHealthCheck: LoadBalancer Services with ExternalPolicyLocal only."""
    return svc.type == "LoadBalancer" and external_policy_local(svc)


def uses_cluster_endpoints(svc: Service, accessible: bool | None = None) -> bool:
    """serviceport.go UsesClusterEndpoints: iTP Cluster, or reachable from outside at all."""
    return not svc.internal_local or (externally_accessible(svc) if accessible is None else accessible)


def uses_local_endpoints(svc: Service, accessible: bool | None = None) -> bool:
    """serviceport.go UsesLocalEndpoints."""
    return svc.internal_local or (external_policy_local(svc) and
                                  (externally_accessible(svc) if accessible is None else accessible))


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


def select_endpoints(endpoints: tuple[Endpoint, ...], svc: Service, node: NodeView,
                     accessible: bool | None = None) -> Selection:
    """topology.go CategorizeEndpoints, with the reason each endpoint was not chosen. ``accessible``:
    whether this service port and family is externally accessible (None: any of the Service's)."""
    excl_c: dict[str, str] = {}
    excl_l: dict[str, str] = {}
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    has_any = False
    mode, note = "", ""
    if uses_cluster_endpoints(svc, accessible):
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
    if uses_local_endpoints(svc, accessible):
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
    """How many frontends translate_service would make for ``svc`` at most (without making them):
    per TCP/UDP port and ClusterIP family, one per ClusterIP, two (local callers and traffic
    arriving at the node) per externalIP and load-balancer IP of that family, and two wildcard
    node-address frontends if the port has a nodePort. Admission uses it to refuse a huge Service
    before translating it."""
    if svc.skip:
        return 0
    families = {family_of(ip) for ip in svc.cluster_ips}
    ips = {ip for ip in svc.cluster_ips if family_of(ip) in families}
    outside = {ip for ip in svc.external_ips + svc.lb_ingress_ips if family_of(ip) in families} - ips
    ports = {(p.port, p.protocol) for p in svc.ports if p.protocol != SCTP}
    node_ports = {(p.node_port, p.protocol) for p in svc.ports if p.protocol != SCTP and p.node_port}
    return len(ports) * (len(ips) + 2 * len(outside)) + 2 * len(node_ports) * len(families)


def _contains(cidr: str, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def firewall_ranges(svc: Service, family: str, node: NodeView) -> tuple[str, ...]:
    """The sources allowed to the Service's load-balancer IPs of ``family``; () for no filter.
    serviceport.go newBaseServiceInfo: loadBalancerSourceRanges of the family, a zero-length prefix
    meaning "allow any"; nftables proxier.go syncProxyRules: the firewall chain is used only when the
    Service has load-balancer VIPs and source ranges (usesFWChain), and when a range contains the
    node IP (detectNodeIPs) the VIPs themselves are allowed too (allowFromNode: a VIP configured on
    the node loops back with itself as the source)."""
    vips = _of_family(svc.lb_ingress_ips, family)
    cidrs = _of_family(svc.lb_source_ranges, family)
    if not vips or not cidrs or any(c.endswith("/0") for c in cidrs):
        return ()
    node_ip = node.ip_of(family)
    if any(_contains(c, node_ip) for c in cidrs):
        cidrs += [f"{ip}/{32 if family == IPV4 else 128}" for ip in vips]
    return tuple(dict.fromkeys(cidrs))


def translate_service(svc: Service, slices: Iterable[EndpointSlice], node: NodeView) -> dict[Frontend, FrontendState]:
    """The frontends one Service needs on this node: SCOPE_INTERNAL ones for callers on this node
    (socket hooks) and SCOPE_EXTERNAL ones for traffic arriving at the node (tc), as kube-proxy's
    nftables proxier.go syncProxyRules programs them."""
    out: dict[Frontend, FrontendState] = {}
    if svc.skip:
        return out
    slices = list(slices)
    by_family: dict[str, list[str]] = {}  # cluster IPs by family, in the Service's order
    for ip in svc.cluster_ips:
        by_family.setdefault(family_of(ip), []).append(ip)
    ext_local = external_policy_local(svc)
    for port in svc.ports:
        if port.protocol == SCTP:
            continue  # cgroup sock_addr hooks see TCP and UDP only
        name = f"{svc.key}:{port.name}" if port.name else str(svc.key)
        proto, affinity = port.protocol, svc.affinity_timeout
        for family, cluster_ips in by_family.items():
            pe = port_endpoints(svc, port, family, slices)
            accessible = externally_accessible(svc, port, family)
            sel = select_endpoints(tuple([ep for ep, _ in pe.endpoints]), svc, node, accessible)
            # ClusterIP: internalTrafficPolicy picks the set (the internal policy chain); no
            # endpoint anywhere: reject; iTP Local with none here: drop.
            backends = _backends(pe, sel.local if svc.internal_local else sel.cluster)
            state = FrontendState(backends, sel.has_any and not backends, affinity, name)
            for ip in cluster_ips:
                out[Frontend(ip, port.port, proto)] = state
            if not accessible:
                continue
            # Local callers (pods and the node itself) dialling an externalIP, a load-balancer IP or
            # node-address:nodePort: the EXT chain short-circuits them to the cluster policy chain
            # whatever externalTrafficPolicy says ("short-circuit pod traffic", "short-circuit local
            # traffic"), so they get the cluster set; none anywhere: reject.
            if svc.internal_local:
                cluster = _backends(pe, sel.cluster)
                inside = FrontendState(cluster, sel.has_any and not cluster, affinity, name)
            else:
                inside = state
            # Traffic arriving at the node: externalTrafficPolicy picks the set (externalPolicyChain).
            # Cluster: masqueraded ("jump mark-for-masquerade" in the EXT chain), any endpoint;
            # Local: the client's address kept, node-local endpoints (with the terminating fallback
            # of CategorizeEndpoints); none here but some elsewhere: drop (externalTrafficFilterVerdict
            # "drop"); none anywhere: reject (rejectChain). ClientIP affinity applies as for every
            # frontend of the service port.
            ext = _backends(pe, sel.local if ext_local else sel.cluster)
            outside = FrontendState(ext, sel.has_any and not ext, affinity, name, snat=not ext_local)
            # loadBalancerSourceRanges: the firewall-check chain (hooked at prerouting and output,
            # so local callers too) filters the load-balancer VIPs only; nodePorts are not subject
            # to them ("For better or for worse, nodeports are not subject to
            # loadBalancerSourceRanges"), nor are externalIPs.
            ranges = firewall_ranges(svc, family, node)
            vips = set(_of_family(svc.lb_ingress_ips, family))
            for ip in dict.fromkeys(_of_family(svc.external_ips + svc.lb_ingress_ips, family)):
                src = ranges if ip in vips else ()
                out.setdefault(Frontend(ip, port.port, proto, SCOPE_INTERNAL),
                               inside if not src else _with(inside, src_ranges=src))
                out.setdefault(Frontend(ip, port.port, proto, SCOPE_EXTERNAL),
                               outside if not src else _with(outside, src_ranges=src))
            if port.node_port:
                # A nodePort on every node address --nodeport-addresses selects (lb_node_addrs):
                # one wildcard frontend per family and scope (serviceNodePortsMap).
                wildcard = WILDCARD[family]
                # Local callers get the cluster set on this node's addresses; on another node's, an
                # externalTrafficPolicy Local port is that node's to serve (ext_local: not translated at
                # the socket, as kube-proxy's rules for it run on that node only).
                out[Frontend(wildcard, port.node_port, proto, SCOPE_INTERNAL)] = _with(inside, nodeport=True,
                                                                                       ext_local=ext_local)
                out[Frontend(wildcard, port.node_port, proto, SCOPE_EXTERNAL)] = _with(outside, nodeport=True)
    return out


def _with(state: FrontendState, **changes) -> FrontendState:
    from msgspec.structs import replace

    return replace(state, **changes)


def local_ready_endpoints(svc: Service, slices: Iterable[EndpointSlice], node: NodeView, family: str) -> int:
    """endpointschangetracker.go LocalReadyEndpoints: this node's ready endpoints (terminating ones
    do not count) of ``family`` over all the Service's ports, each IP counted once."""
    ips = set()
    for port in svc.ports:
        for ep, _ in port_endpoints(svc, port, family, slices).endpoints:
            if ep.ready and is_local(ep, node):
                ips.add(ep.ip)
    return len(ips)


# ---- node addresses (--nodeport-addresses) and devices (--devices) --------------------------------

NODEPORT_PRIMARY = "primary"


def nodeport_cidrs(setting: tuple[str, ...], node: NodeView) -> dict[str, tuple[str, ...]]:
    """--nodeport-addresses -> the CIDRs of each family, () meaning every address of it (matchAll).
    cmd/kube-proxy server.go newProxyServer: "primary" becomes the node IPs of the Node object as
    /32 and /128 (loopback ones left out; nftables' default, server_linux.go platformApplyDefaults);
    util/nodeport_addresses.go NewNodePortAddresses: a family without CIDRs, or with a zero-length
    one, matches all."""
    if tuple(setting) == (NODEPORT_PRIMARY,):
        setting = tuple(f"{ip}/{32 if family_of(ip) == IPV4 else 128}" for ip in node.ips
                        if not ipaddress.ip_address(ip).is_loopback)
    out = {}
    for family in (IPV4, IPV6):
        cidrs = [c for c in setting if family_of(c.split("/")[0]) == family]
        out[family] = () if not cidrs or any(c.endswith("/0") for c in cidrs) else tuple(cidrs)
    return out


def node_addresses(cidrs: Mapping[str, tuple[str, ...]], interface_ips: Iterable[str]) -> set[str]:
    """The addresses NodePorts are served on: nftables proxier.go setupNFTables fills nodeport-ips
    with util.NodePortAddresses.GetNodeIPs (this node's interface addresses inside the CIDRs) minus
    loopback ("localhost NodePorts are not supported"); a family matching all uses "fib daddr type
    local" minus loopback (noLocalhost), i.e. every address of the node of that family."""
    out = set()
    for ip in interface_ips:
        addr = ipaddress.ip_address(ip)
        if addr.is_loopback:
            continue
        family = IPV4 if addr.version == 4 else IPV6
        want = cidrs.get(family, ())
        if not want or any(addr in ipaddress.ip_network(c) for c in want):
            out.add(str(addr))
    return out


def health_check_addresses(cidrs: Mapping[str, tuple[str, ...]], interface_ips: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Where a family's healthCheckNodePort servers listen: healthcheck/service_health.go
    newServiceHealthServer: every address when the family matches all (the wildcard), else
    GetNodeIPs (interface addresses inside the CIDRs, loopback included)."""
    out = {}
    for family, want in cidrs.items():
        if not want:
            out[family] = (WILDCARD[family],)
            continue
        nets = [ipaddress.ip_network(c) for c in want]
        out[family] = tuple(sorted({str(a) for a in map(ipaddress.ip_address, interface_ips)
                                    if (a.version == 4) == (family == IPV4) and any(a in n for n in nets)}))
    return out


def default_devices(node: Node | None, interfaces: Mapping[str, Iterable[str]]) -> list[str]:
    """--devices default: the devices carrying the Node object's InternalIP and ExternalIP addresses
    (``interfaces``: device -> its addresses), in the order the Node lists them."""
    wanted = []
    for typ, addr in node.addresses if node is not None else ():
        if typ in ("InternalIP", "ExternalIP"):
            try:
                wanted.append(parse_ip_sloppy(addr, "status.addresses"))
            except ObjectError:
                pass
    by_ip = {}
    for dev, ips in interfaces.items():
        for ip in ips:
            by_ip.setdefault(str(ipaddress.ip_address(ip)), dev)
    return list(dict.fromkeys(by_ip[ip] for ip in wanted if ip in by_ip))


def translate(services: Mapping[ObjKey, Service], slices: Iterable[EndpointSlice],
              node: NodeView) -> dict[ObjKey, dict[Frontend, FrontendState]]:
    """Every Service's frontends, keyed by Service (so one Service can be reprogrammed alone)."""
    index = slices_by_service(slices)
    return {key: translate_service(svc, index.get(key, ()), node) for key, svc in services.items()}
