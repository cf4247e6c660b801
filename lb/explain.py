"""`bpflb explain`: for one Service on this node, which endpoints were selected for cluster and
local traffic, which set each frontend uses, and the rule that excluded every other endpoint.
Pure text from the same functions translate uses, so it cannot disagree with what is programmed."""
from __future__ import annotations

from typing import Iterable

from .model import SCTP, EndpointSlice, Service
from .maps.structs import SCOPE_EXTERNAL
from .objects import family_of
from .translate import (NodeView, externally_accessible, port_endpoints, select_endpoints, translate_service,
                        uses_cluster_endpoints, uses_local_endpoints)


def explain(svc: Service, slices: Iterable[EndpointSlice], node: NodeView, port_name: str | None = None,
            ignored_slices: Iterable[EndpointSlice] = ()) -> str:
    slices = list(slices)
    out = [f"Service {svc.key} on node {node.name or '(unnamed)'} (zone {node.zone or 'unset'})"]
    if svc.skip:
        return "\n".join(out + [f"  not proxied: {svc.skip}"])
    policies = (f"internalTrafficPolicy {'Local' if svc.internal_local else 'Cluster'}, "
                f"externalTrafficPolicy {'Local' if svc.external_local else 'Cluster'}"
                f"{'' if externally_accessible(svc) else ' (not externally accessible: no effect)'}")
    out.append(f"  {policies}")
    if svc.affinity_timeout:
        out.append(f"  sessionAffinity ClientIP, timeout {svc.affinity_timeout}s (client = the caller's network namespace)")
    for s in ignored_slices:
        out.append(f"  EndpointSlice {s.key} ignored: {s.skip}")
    frontends = translate_service(svc, slices, node)
    ports = [p for p in svc.ports if port_name is None or p.name == port_name or str(p.port) == port_name]
    if not ports:
        return "\n".join(out + [f"  no port named {port_name!r} (ports: {', '.join(p.name or str(p.port) for p in svc.ports)})"])
    families = sorted({family_of(ip) for ip in svc.cluster_ips})
    for port in ports:
        for family in families:
            out.append(f"  port {port.name or '(unnamed)'} {port.port}/{port.protocol} {family}:")
            if port.protocol == SCTP:
                out.append("    SCTP is not handled by the socket hooks")
                continue
            pe = port_endpoints(svc, port, family, slices)
            if not pe.endpoints:
                out.append(f"    no endpoints: no {family} EndpointSlice of this Service has a port named "
                           f"{port.name!r}/{port.protocol}")
            sel = select_endpoints(tuple(ep for ep, _ in pe.endpoints), svc, node)
            targets = {}
            for ep, t in pe.endpoints:
                targets.setdefault(ep.ip, []).append(t)
            if uses_cluster_endpoints(svc):
                out.append(f"    cluster set ({sel.topology_note}):")
                out += [f"      + {_hp(ep.ip, targets[ep.ip])}  node {ep.node_name or '-'}"
                        f"{'  (serving, terminating)' if not ep.ready else ''}" for ep in sel.cluster]
                out += [f"      - {ip}  {why}" for ip, why in sel.excluded_cluster.items()]
            if uses_local_endpoints(svc):
                out.append("    local set (endpoints on this node):")
                out += [f"      + {_hp(ep.ip, targets[ep.ip])}" for ep in sel.local]
                out += [f"      - {ip}  {why}" for ip, why in sel.excluded_local.items()]
            for fe, st in sorted(frontends.items()):
                if fe.protocol != port.protocol or family_of(fe.ip) != family:
                    continue
                nodeport = st.nodeport
                if fe.port != (port.node_port if nodeport else port.port):
                    continue
                external = fe.scope == SCOPE_EXTERNAL
                if nodeport:
                    kind = "NodePort " + ("(arriving at the node)" if external else "(from this node: cluster set)")
                elif fe.ip in svc.cluster_ips:
                    kind = "ClusterIP"
                elif external:
                    kind = "external/LB IP (arriving at the node)"
                else:
                    kind = "external/LB IP (from this node: cluster set)"
                if st.backends:
                    action = f"-> {len(st.backends)} backend(s): {', '.join(map(str, st.backends))}"
                elif st.drop_empty:
                    action = "-> DROP: endpoints exist, but the Local policy leaves none on this node"
                else:
                    action = "-> REJECT (ECONNREFUSED): no serving endpoint anywhere"
                if external and st.snat:
                    action += " (source NAT to the node: externalTrafficPolicy Cluster)"
                local = (svc.internal_local and kind == "ClusterIP") or (external and svc.external_local)
                out.append(f"    {kind} {fe} uses the {'local' if local else 'cluster'} set {action}")
    return "\n".join(out)


def _hp(ip: str, ports: list[int]) -> str:
    return f"{f'[{ip}]' if ':' in ip else ip}:{','.join(map(str, ports))}"
