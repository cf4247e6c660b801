"""North-south translation, table-driven: the frontends a NodePort / LoadBalancer / externalIP Service
gets on this node, for local callers (INT, socket hooks) and for traffic arriving at the node (EXT, tc),
as golden text lines. Each case names the kube-proxy rule it mirrors (nftables proxier.go
syncProxyRules unless said otherwise)."""
from __future__ import annotations

import pytest

from conftest import make_endpoint, make_service, make_slice
from lb.maps.structs import SCOPE_EXTERNAL
from lb.model import Node
from lb.objects import parse_endpoint_slice, parse_node, parse_service
from lb.translate import (NodeView, default_devices, firewall_ranges, frontend_count, health_check_addresses,
                          local_ready_endpoints, needs_health_check, node_addresses, node_host_ips, nodeport_cidrs,
                          translate_service)

ep = make_endpoint
NODE = NodeView("node-a", "zone-a", ("192.168.50.1",))
LOCAL, LOCAL2, REMOTE = "10.244.1.5", "10.244.1.6", "10.244.2.5"


def nodeport(s, policy="Cluster", node_port=30080):
    s["spec"].update(type="NodePort", externalTrafficPolicy=policy)
    s["spec"]["ports"][0]["nodePort"] = node_port


def lb(s, policy="Cluster", vips=("192.0.2.10",), ranges=None):
    nodeport(s, policy)
    s["spec"]["type"] = "LoadBalancer"
    s["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in vips]}}
    if ranges is not None:
        s["spec"]["loadBalancerSourceRanges"] = list(ranges)


def both(*muts):
    def m(s):
        for f in muts:
            f(s)
    return m


def run(svc_mut, endpoints, node=NODE, slices=None):
    svc = parse_service(make_service("ns", "svc", svc_mut))
    if slices is None:
        slices = [make_slice("ns", "svc-1", "svc", [], lambda e: e.update(endpoints=list(endpoints)))]
    return translate_service(svc, [parse_endpoint_slice(s) for s in slices], node)


def dump(out, clusterip=False) -> list[str]:
    """One line per frontend: scope, address, flags, then backends / DROP / REJECT (ClusterIPs left out
    unless asked: test_translate.py covers them)."""
    lines = []
    for fe, st in sorted(out.items()):
        if fe.ip == "10.96.0.10" and not clusterip:
            continue
        flags = [f for f, on in (("snat", st.snat), ("nodeport", st.nodeport), ("ext-local", st.ext_local)) if on]
        if st.affinity_timeout:
            flags.append(f"affinity={st.affinity_timeout}")
        if st.src_ranges:
            flags.append("from=" + ",".join(st.src_ranges))
        what = ",".join(b.ip for b in st.backends) if st.backends else ("DROP" if st.drop_empty else "REJECT")
        lines.append(f"{'EXT' if fe.scope == SCOPE_EXTERNAL else 'INT'} {fe}{''.join(' ' + f for f in flags)} -> {what}")
    return lines


READY = [ep(LOCAL), ep(REMOTE, node="node-b")]

CASES = [
    # --- externalTrafficPolicy Cluster: masquerade ("jump mark-for-masquerade" in the EXT chain), any endpoint
    ("nodeport-etp-cluster-masquerades-to-any-endpoint", nodeport, READY, [
        f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL},{REMOTE}",
        f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL},{REMOTE}"]),
    # --- externalTrafficPolicy Local: the local policy chain, client IP kept; local callers short-circuited
    # to the cluster chain ("short-circuit pod traffic" / "short-circuit local traffic")
    ("nodeport-etp-local-uses-node-local-endpoints", lambda s: nodeport(s, "Local"), READY, [
        f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {LOCAL},{REMOTE}",
        f"EXT 0.0.0.0:30080/TCP nodeport -> {LOCAL}"]),
    ("etp-local-terminating-local-endpoint-used-when-none-ready-here (KEP-1669)", lambda s: nodeport(s, "Local"),
     [ep(LOCAL, ready=False, serving=True, terminating=True), ep(REMOTE, node="node-b")], [
         f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {REMOTE}",
         f"EXT 0.0.0.0:30080/TCP nodeport -> {LOCAL}"]),
    ("etp-local-ready-local-endpoint-beats-terminating-one", lambda s: nodeport(s, "Local"),
     [ep(LOCAL), ep(LOCAL2, ready=False, serving=True, terminating=True)], [
         f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {LOCAL}",
         f"EXT 0.0.0.0:30080/TCP nodeport -> {LOCAL}"]),
    ("etp-local-not-serving-local-endpoint-is-not-a-fallback", lambda s: nodeport(s, "Local"),
     [ep(LOCAL, ready=False, serving=False, terminating=True), ep(REMOTE, node="node-b")], [
         f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {REMOTE}",
         "EXT 0.0.0.0:30080/TCP nodeport -> DROP"]),
    ("etp-local-no-local-endpoint-drops-silently (externalTrafficFilterVerdict drop)", lambda s: nodeport(s, "Local"),
     [ep(REMOTE, node="node-b")], [
         f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {REMOTE}",
         "EXT 0.0.0.0:30080/TCP nodeport -> DROP"]),
    ("etp-local-no-endpoint-anywhere-rejects (rejectChain)", lambda s: nodeport(s, "Local"),
     [ep(REMOTE, ready=False, serving=False, node="node-b")], [
         "INT 0.0.0.0:30080/TCP nodeport ext-local -> REJECT",
         "EXT 0.0.0.0:30080/TCP nodeport -> REJECT"]),
    ("etp-cluster-no-endpoint-anywhere-rejects", nodeport, [], [
        "INT 0.0.0.0:30080/TCP nodeport -> REJECT",
        "EXT 0.0.0.0:30080/TCP snat nodeport -> REJECT"]),
    ("etp-cluster-only-terminating-endpoints-are-the-fallback", nodeport,
     [ep(REMOTE, ready=False, serving=True, terminating=True, node="node-b")], [
         f"INT 0.0.0.0:30080/TCP nodeport -> {REMOTE}",
         f"EXT 0.0.0.0:30080/TCP snat nodeport -> {REMOTE}"]),
    # --- internalTrafficPolicy Local does not narrow external traffic (externalPolicyChain is the cluster chain)
    ("itp-local-etp-cluster-external-and-local-callers-use-the-cluster-set",
     lambda s: (nodeport(s), s["spec"].update(internalTrafficPolicy="Local")), [ep(REMOTE, node="node-b")], [
         f"INT 0.0.0.0:30080/TCP nodeport -> {REMOTE}",
         f"EXT 0.0.0.0:30080/TCP snat nodeport -> {REMOTE}",
         "INT 10.96.0.10:80/TCP -> DROP"]),
    # --- LoadBalancer VIPs (status.loadBalancer.ingress[].ip) and the node ports that come with them
    ("lb-vip-etp-cluster", lb, READY, [
        f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL},{REMOTE}",
        f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL},{REMOTE}",
        f"INT 192.0.2.10:80/TCP -> {LOCAL},{REMOTE}",
        f"EXT 192.0.2.10:80/TCP snat -> {LOCAL},{REMOTE}"]),
    ("lb-vip-etp-local-none-here-drops-external-only", lambda s: lb(s, "Local"), [ep(REMOTE, node="node-b")], [
        f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {REMOTE}",
        "EXT 0.0.0.0:30080/TCP nodeport -> DROP",
        f"INT 192.0.2.10:80/TCP -> {REMOTE}",
        "EXT 192.0.2.10:80/TCP -> DROP"]),
    ("lb-ip-mode-proxy-gets-no-frontend (IsVIPMode)",
     lambda s: (lb(s), s["status"]["loadBalancer"]["ingress"][0].update(ipMode="Proxy")), READY, [
         f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL},{REMOTE}",
         f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL},{REMOTE}"]),
    # --- loadBalancerSourceRanges: the firewall chain on the VIPs only, for both scopes (firewall-check
    # is hooked at prerouting and output); "nodeports are not subject to loadBalancerSourceRanges"
    ("source-ranges-filter-the-vip-not-the-nodeport", lambda s: lb(s, ranges=["203.0.113.0/24"]), READY, [
        f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL},{REMOTE}",
        f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL},{REMOTE}",
        f"INT 192.0.2.10:80/TCP from=203.0.113.0/24 -> {LOCAL},{REMOTE}",
        f"EXT 192.0.2.10:80/TCP snat from=203.0.113.0/24 -> {LOCAL},{REMOTE}"]),
    ("source-ranges-kept-when-the-vip-drops", lambda s: lb(s, "Local", ranges=["203.0.113.0/24"]),
     [ep(REMOTE, node="node-b")], [
         f"INT 0.0.0.0:30080/TCP nodeport ext-local -> {REMOTE}",
         "EXT 0.0.0.0:30080/TCP nodeport -> DROP",
         f"INT 192.0.2.10:80/TCP from=203.0.113.0/24 -> {REMOTE}",
         "EXT 192.0.2.10:80/TCP from=203.0.113.0/24 -> DROP"]),
    ("source-ranges-do-not-filter-external-ips",
     lambda s: (lb(s, ranges=["203.0.113.0/24"]), s["spec"].update(externalIPs=["198.51.100.7"])), [ep(LOCAL)], [
         f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL}",
         f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL}",
         f"INT 192.0.2.10:80/TCP from=203.0.113.0/24 -> {LOCAL}",
         f"EXT 192.0.2.10:80/TCP snat from=203.0.113.0/24 -> {LOCAL}",
         f"INT 198.51.100.7:80/TCP -> {LOCAL}",
         f"EXT 198.51.100.7:80/TCP snat -> {LOCAL}"]),
    ("source-range-containing-the-node-ip-allows-the-vip-itself (allowFromNode)",
     lambda s: lb(s, ranges=["192.168.0.0/16"]), [ep(LOCAL)], [
         f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL}",
         f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL}",
         f"INT 192.0.2.10:80/TCP from=192.168.0.0/16,192.0.2.10/32 -> {LOCAL}",
         f"EXT 192.0.2.10:80/TCP snat from=192.168.0.0/16,192.0.2.10/32 -> {LOCAL}"]),
    ("zero-length-source-range-means-allow-any", lambda s: lb(s, ranges=["203.0.113.0/24", "0.0.0.0/0"]), [ep(LOCAL)], [
        f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL}",
        f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL}",
        f"INT 192.0.2.10:80/TCP -> {LOCAL}",
        f"EXT 192.0.2.10:80/TCP snat -> {LOCAL}"]),
    ("source-ranges-of-the-other-family-only-filter-nothing", lambda s: lb(s, ranges=["fd00:1::/64"]), [ep(LOCAL)], [
        f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL}",
        f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL}",
        f"INT 192.0.2.10:80/TCP -> {LOCAL}",
        f"EXT 192.0.2.10:80/TCP snat -> {LOCAL}"]),
    # --- externalIPs: served for traffic arriving at the node and for local callers (cluster set)
    ("external-ip-etp-cluster", lambda s: s["spec"].update(externalIPs=["198.51.100.7"]), READY, [
        f"INT 198.51.100.7:80/TCP -> {LOCAL},{REMOTE}",
        f"EXT 198.51.100.7:80/TCP snat -> {LOCAL},{REMOTE}"]),
    ("external-ip-on-a-clusterip-service-honours-etp-local (ExternalPolicyLocal)",
     lambda s: s["spec"].update(externalIPs=["198.51.100.7"], externalTrafficPolicy="Local"), READY, [
         f"INT 198.51.100.7:80/TCP -> {LOCAL},{REMOTE}",
         f"EXT 198.51.100.7:80/TCP -> {LOCAL}"]),
    # --- sessionAffinity ClientIP applies to every frontend of the service port
    ("affinity-on-external-frontends",
     lambda s: (nodeport(s, "Local"), s["spec"].update(sessionAffinity="ClientIP",
                                                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})),
     READY, [
         f"INT 0.0.0.0:30080/TCP nodeport ext-local affinity=30 -> {LOCAL},{REMOTE}",
         f"EXT 0.0.0.0:30080/TCP nodeport affinity=30 -> {LOCAL}"]),
    # --- ExternallyAccessible is per service port: a port without nodePort, VIP or externalIP has none
    ("port-without-node-port-has-no-external-frontend (ExternallyAccessible per port)",
     lambda s: (s["spec"].update(type="LoadBalancer", externalTrafficPolicy="Local", allocateLoadBalancerNodePorts=False)),
     READY, []),
    ("clusterip-service-has-no-external-frontend", None, READY, []),
]


@pytest.mark.parametrize("mutate,endpoints,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_external_rules(mutate, endpoints, want):
    assert dump(run(mutate, endpoints), clusterip=any(" 10.96.0.10:" in w for w in want)) == want


def test_itp_local_external_access_is_per_port():
    """ExternallyAccessible is per port: iTP Local with a nodePort on one port only gets external
    frontends (with the cluster set) on that port; both ClusterIP ports drop (no local endpoint)."""
    def m(s):
        s["spec"].update(type="NodePort", internalTrafficPolicy="Local")
        s["spec"]["ports"] = [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "other", "port": 81}]
    slices = [make_slice("ns", "a", "svc", [], lambda e: e.update(
        ports=[{"name": "http", "port": 8080}, {"name": "other", "port": 8081}], endpoints=[ep(REMOTE, node="node-b")]))]
    out = dump(run(m, (), slices=slices), clusterip=True)
    assert out == [f"INT 0.0.0.0:30080/TCP nodeport -> {REMOTE}", f"EXT 0.0.0.0:30080/TCP snat nodeport -> {REMOTE}",
                   "INT 10.96.0.10:80/TCP -> DROP", "INT 10.96.0.10:81/TCP -> DROP"]


def test_dual_stack_nodeport_has_a_wildcard_per_family():
    def m(s):
        nodeport(s)
        s["spec"].update(clusterIPs=["10.96.0.10", "fd00:96::10"], ipFamilies=["IPv4", "IPv6"])
    slices = [make_slice("ns", "v4", "svc", [LOCAL]), make_slice("ns", "v6", "svc", ["fd00:244:1::5"])]
    out = [line for line in dump(run(m, (), slices=slices)) if "nodeport" in line]
    assert out == [f"INT 0.0.0.0:30080/TCP nodeport -> {LOCAL}", f"EXT 0.0.0.0:30080/TCP snat nodeport -> {LOCAL}",
                   "INT [::]:30080/TCP nodeport -> fd00:244:1::5", "EXT [::]:30080/TCP snat nodeport -> fd00:244:1::5"]


def test_udp_and_sctp_node_ports():
    def m(s):
        nodeport(s)
        s["spec"]["ports"] = [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                              {"name": "s", "port": 9, "protocol": "SCTP", "nodePort": 30009}]
    slices = [make_slice("ns", "a", "svc", [LOCAL], port=53, port_name="dns", protocol="UDP")]
    out = [line for line in dump(run(m, (), slices=slices)) if "nodeport" in line]
    assert out == [f"INT 0.0.0.0:30053/UDP nodeport -> {LOCAL}", f"EXT 0.0.0.0:30053/UDP snat nodeport -> {LOCAL}"]


@pytest.mark.parametrize("mutate", [
    nodeport, lambda s: lb(s, vips=("192.0.2.10", "192.0.2.11")),
    lambda s: (lb(s), s["spec"].update(externalIPs=["198.51.100.7", "192.0.2.10"], clusterIPs=["10.96.0.10", "fd00::a"])),
], ids=["nodeport", "two-vips", "dual-stack-overlapping-external-and-vip"])
def test_frontend_count_bounds_what_translate_makes(mutate):
    svc = parse_service(make_service("ns", "svc", mutate))
    assert len(translate_service(svc, [], NODE)) <= frontend_count(svc)


def test_an_ip_both_external_and_vip_is_filtered_as_a_vip():
    svc = parse_service(make_service("ns", "svc", lambda s: (lb(s, ranges=["203.0.113.0/24"]),
                                                             s["spec"].update(externalIPs=["192.0.2.10"]))))
    out = dump(translate_service(svc, [], NODE))
    assert "EXT 192.0.2.10:80/TCP snat from=203.0.113.0/24 -> REJECT" in out


@pytest.mark.parametrize("node_ips,ranges,want", [
    ((), ["127.0.0.0/8"], ["127.0.0.0/8", "192.0.2.10/32"]),  # detectNodeIPs: loopback when the Node has none
    (("fd00::5", "192.168.50.1"), ["192.168.50.0/24"], ["192.168.50.0/24", "192.0.2.10/32"]),
    (("192.168.50.1",), ["10.0.0.0/8"], ["10.0.0.0/8"]),
], ids=["no-node-ip-means-loopback", "node-ip-of-the-family", "range-without-the-node"])
def test_firewall_ranges_allow_from_node(node_ips, ranges, want):
    svc = parse_service(make_service("ns", "svc", lambda s: lb(s, ranges=ranges)))
    assert list(firewall_ranges(svc, "IPv4", NodeView("n", "", node_ips))) == want


# ---- node addresses, health-check addresses, devices ------------------------------------------------

def node(*addresses) -> Node:
    return parse_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                       "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}})


@pytest.mark.parametrize("addrs,want", [
    ([("Hostname", "node-a"), ("ExternalIP", "203.0.113.1"), ("InternalIP", "192.168.50.1")], ("192.168.50.1",)),
    ([("InternalIP", "192.168.50.1"), ("InternalIP", "192.168.50.2"), ("InternalIP", "fd00::1")],
     ("192.168.50.1", "fd00::1")),
    ([("InternalIP", "fd00::1"), ("ExternalIP", "203.0.113.1")], ("fd00::1", "203.0.113.1")),
    ([("InternalIP", "bogus"), ("Hostname", "x")], ()),
], ids=["internal-before-external", "one-per-family", "ipv6-primary-external-second-family", "none-parsable"])
def test_node_host_ips(addrs, want):
    """pkg/util/node GetNodeHostIPs."""
    assert node_host_ips(node(*addrs)) == want


IFACES = ["127.0.0.1", "192.168.50.1", "10.0.0.7", "::1", "fd00::1", "fe80::1"]


@pytest.mark.parametrize("setting,node_ips,want", [
    # nftables default "primary": the Node's IPs as /32 and /128; a family without one matches all
    (("primary",), ("192.168.50.1",), {"192.168.50.1", "fd00::1", "fe80::1"}),
    (("primary",), ("192.168.50.1", "fd00::1"), {"192.168.50.1", "fd00::1"}),
    (("primary",), (), {"192.168.50.1", "10.0.0.7", "fd00::1", "fe80::1"}),  # no Node IPs: everything but loopback
    (("10.0.0.0/8",), (), {"10.0.0.7", "fd00::1", "fe80::1"}),
    (("10.0.0.0/8", "fd00::/64"), (), {"10.0.0.7", "fd00::1"}),
    (("0.0.0.0/0", "10.0.0.0/8"), (), {"192.168.50.1", "10.0.0.7", "fd00::1", "fe80::1"}),
    (("127.0.0.0/8",), (), {"fd00::1", "fe80::1"}),  # "localhost NodePorts are not supported"
], ids=["primary-v4-node", "primary-dual-stack-node", "primary-without-node-ips", "cidr-v4-only", "cidrs-both",
        "zero-cidr-matches-all", "loopback-never"])
def test_node_addresses(setting, node_ips, want):
    assert node_addresses(nodeport_cidrs(setting, NodeView("n", "", node_ips)), IFACES) == want


@pytest.mark.parametrize("setting,want", [
    (("primary",), {"IPv4": ("192.168.50.1",), "IPv6": ("::",)}),
    (("127.0.0.1/32",), {"IPv4": ("127.0.0.1",), "IPv6": ("::",)}),  # loopback is fine for the health server
    (("0.0.0.0/0", "::/0"), {"IPv4": ("0.0.0.0",), "IPv6": ("::",)}),
], ids=["primary", "loopback-cidr", "match-all"])
def test_health_check_addresses(setting, want):
    """healthcheck/service_health.go newServiceHealthServer: GetNodeIPs, or every address (MatchAll)."""
    assert health_check_addresses(nodeport_cidrs(setting, NodeView("n", "", ("192.168.50.1",))), IFACES) == want


def test_default_devices_carry_the_node_addresses():
    interfaces = {"lo": ["127.0.0.1"], "eth0": ["192.168.50.1", "fd00::1"], "eth1": ["203.0.113.1"], "eth2": ["10.9.9.9"]}
    n = node(("Hostname", "h"), ("InternalIP", "192.168.50.1"), ("InternalIP", "fd00::1"),
             ("ExternalIP", "203.0.113.1"), ("ExternalIP", "198.51.100.1"))
    assert default_devices(n, interfaces) == ["eth0", "eth1"]
    assert default_devices(None, interfaces) == []


def test_local_ready_endpoints_count_ips_once_and_not_terminating():
    """endpointschangetracker.go LocalReadyEndpoints: ready local endpoints, squashed by IP."""
    svc = parse_service(make_service("ns", "svc", lambda s: s["spec"]["ports"].append({"name": "b", "port": 81})))
    sl = parse_endpoint_slice(make_slice("ns", "a", "svc", [], lambda e: e.update(
        ports=[{"name": "http", "port": 8080}, {"name": "b", "port": 8081}],
        endpoints=[ep(LOCAL), ep(LOCAL2, ready=False, serving=True, terminating=True), ep(REMOTE, node="node-b")])))
    assert local_ready_endpoints(svc, [sl], NODE, "IPv4") == 1


@pytest.mark.parametrize("mutate,want", [
    (lambda s: lb(s, "Local"), True), (lambda s: lb(s, "Cluster"), False), (lambda s: nodeport(s, "Local"), False),
], ids=["lb-local", "lb-cluster", "nodeport-local"])
def test_needs_health_check(mutate, want):
    """pkg/api/v1/service NeedsHealthCheck: type LoadBalancer with ExternalPolicyLocal only."""
    assert needs_health_check(parse_service(make_service("ns", "svc", mutate))) is want
