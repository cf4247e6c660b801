"""North-south scenarios (issue 10) on the real kernel: NodePort, LoadBalancer and ExternalIP Services
reached by a client outside the nodes, each scenario run against the real kube-proxy (nftables mode, the
reference) and against bpflb, in the same bed (lb/testing/northsouth.py: netns nodes on a bridge, pods by
the bundled CNI through cnitool, a real kube-apiserver) with the same assertions. Where the two differ,
bpflb is wrong unless a comment here says why.

One bed per mode for the module; every test makes its own Services (its own nodePorts) and the fixture
deletes them after it. A test waits for the proxies to program a change by polling what a client sees
(bed.wait), never by sleeping.
"""
from __future__ import annotations

import json
import signal

import pytest

from lb.testing.cluster import node_ip, node_ip6
from lb.testing.northsouth import (MODES, OUTSIDE_V4, OUTSIDE_V6, POD_PORT, NorthSouthBed, endpoint_slice,
                                   external_ip, lb_ip, outside_only_routes_ok, service)

DROP_TIMEOUT = 1.5   # a silent drop shows as a connect timeout; a refusal comes back before it


@pytest.fixture(scope="module", params=MODES)
def shared_bed(request, tmp_path_factory):
    with NorthSouthBed(request.param, tmp_path_factory.mktemp(f"ns-{request.param}")) as bed:
        bed.a = bed.pod(1, "a")      # node 1
        bed.b = bed.pod(2, "b")      # node 2
        bed.c = bed.pod(1, "c")      # node 1: the in-cluster caller
        yield bed


@pytest.fixture
def bed(shared_bed):
    yield shared_bed
    shared_bed.clean()


def answered(bed: NorthSouthBed, ip: str, port: int) -> bool:
    return not bed.outside_tcp(ip, port).error


def backend(pod, family: str = "IPv4") -> str:
    # as peer_server writes its own address (no brackets for IPv6)
    return f"{pod.ip6 if family == 'IPv6' else pod.ip}:{POD_PORT}"


def test_outside_client_routes_only_to_the_bed(bed):
    assert outside_only_routes_ok(bed)


def test_nodeport_cluster_local_and_remote_backend_sees_the_node_ip(bed):
    """eTP Cluster: node 1 has the backend (local), node 2 does not (remote); both masquerade to their
    own node IP (kube-proxy: KUBE-MARK-MASQ in the service's external chain)."""
    bed.apply(service("np-one", node_port=30100), endpoint_slice("np-one", [bed.a]))
    for n in (1, 2):
        bed.wait(lambda: answered(bed, node_ip(n), 30100), what=f"NodePort on node {n}")
        r = bed.outside_tcp(node_ip(n), 30100)
        assert (r.server, r.client_ip) == (backend(bed.a), node_ip(n)), r
    bed.apply(service("np-two", node_port=30110), endpoint_slice("np-two", [bed.a, bed.b]))
    bed.wait(lambda: answered(bed, node_ip(1), 30110), what="NodePort np-two")
    seen = {bed.outside_tcp(node_ip(1), 30110).server for _ in range(40)}
    assert seen == {backend(bed.a), backend(bed.b)}


def test_etp_local_client_ip_kept_and_silent_drop_without_local_endpoint(bed):
    bed.apply(service("np-local", node_port=30101, mutate=lambda s: s["spec"].update(externalTrafficPolicy="Local")),
              endpoint_slice("np-local", [bed.a]))
    bed.wait(lambda: answered(bed, node_ip(1), 30101), what="eTP Local NodePort on node 1")
    r = bed.outside_tcp(node_ip(1), 30101)
    assert (r.server, r.client_ip) == (backend(bed.a), OUTSIDE_V4), r
    # node 2 has no local endpoint: a silent drop (timeout), never a refusal. Before the proxy programs
    # the Service the node itself refuses (nothing listens there), so wait for the change first.
    bed.wait(lambda: bed.outside_tcp(node_ip(2), 30101, timeout=DROP_TIMEOUT).error == "ETIMEDOUT",
             what="eTP Local drop on node 2")
    for _ in range(2):
        assert bed.outside_tcp(node_ip(2), 30101, timeout=DROP_TIMEOUT).error == "ETIMEDOUT"


def _health_body(name: str, count: int) -> bytes:
    # pkg/proxy/healthcheck/service_health.go (hcHandler.ServeHTTP): the dedented JSON, trimmed of newlines
    return (f'{{\n\t"service": {{\n\t\t"namespace": "default",\n\t\t"name": "{name}"\n\t}},\n'
            f'\t"localEndpoints": {count},\n\t"serviceProxyHealthy": true\n}}').encode()


def test_etp_local_health_check_node_port(bed):
    bed.apply(service("hc-local", type="LoadBalancer", node_port=30111,
                      mutate=lambda s: s["spec"].update(externalTrafficPolicy="Local")),
              endpoint_slice("hc-local", [bed.a]))
    hc = bed.get("service", "hc-local")["spec"]["healthCheckNodePort"]
    bed.wait(lambda: bed.http_get(node_ip(1), hc)[0] == 200, what="healthCheckNodePort 200 on node 1")
    bed.wait(lambda: bed.http_get(node_ip(2), hc)[0] == 503, what="healthCheckNodePort 503 on node 2")
    for n, status, count in ((1, 200, 1), (2, 503, 0)):
        got, headers, body = bed.http_get(node_ip(n), hc)
        assert got == status
        assert json.loads(body) == {"service": {"namespace": "default", "name": "hc-local"},
                                    "localEndpoints": count, "serviceProxyHealthy": True}
        assert body == _health_body("hc-local", count)
        assert {k: v for k, v in headers.items() if k not in ("Date", "Content-Length")} == {
            "Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
            "X-Load-Balancing-Endpoint-Weight": str(count)}


def test_no_endpoints_is_refused_at_once(bed):
    bed.apply(service("np-empty", node_port=30102), endpoint_slice("np-empty", [bed.a]))
    bed.wait(lambda: answered(bed, node_ip(1), 30102), what="NodePort with an endpoint")
    bed.apply(endpoint_slice("np-empty", []))
    for n in (1, 2):  # each node's proxy programs the removal in its own time
        bed.wait(lambda: bed.outside_tcp(node_ip(n), 30102).error, what=f"endpoint removal programmed on node {n}")
    for n in (1, 2):
        for _ in range(3):
            # refused, not dropped: the error comes back well inside the 2 s connect timeout
            assert bed.outside_tcp(node_ip(n), 30102).error == "ECONNREFUSED"


def test_load_balancer_ip_with_and_without_source_ranges(bed):
    ip = lb_ip(10)
    bed.apply(service("lb", type="LoadBalancer", node_port=30103), endpoint_slice("lb", [bed.a, bed.b]))
    bed.set_lb_ingress("lb", ip)
    bed.wait(lambda: answered(bed, ip, 80), what="LoadBalancer IP")
    assert {bed.outside_tcp(ip, 80).server for _ in range(30)} == {backend(bed.a), backend(bed.b)}
    # A range holding the client: still served.
    bed.apply(service("lb", type="LoadBalancer", node_port=30103,
                      mutate=lambda s: s["spec"].update(loadBalancerSourceRanges=[f"{OUTSIDE_V4}/32"])))
    bed.wait(lambda: bed.get("service", "lb")["spec"].get("loadBalancerSourceRanges"), what="ranges stored")
    assert not bed.outside_tcp(ip, 80).error
    # Ranges without the client: dropped on the LB IP (kube-proxy nftables: the firewall-check chain),
    # the NodePort stays open (kube-proxy applies the ranges to the LB IP only).
    bed.apply(service("lb", type="LoadBalancer", node_port=30103,
                      mutate=lambda s: s["spec"].update(loadBalancerSourceRanges=["192.0.2.0/24"])))
    bed.wait(lambda: bed.outside_tcp(ip, 80, timeout=DROP_TIMEOUT).error == "ETIMEDOUT", what="source ranges drop")
    assert bed.outside_tcp(ip, 80, timeout=DROP_TIMEOUT).error == "ETIMEDOUT"
    assert answered(bed, node_ip(1), 30103)


def test_external_ip_from_outside(bed):
    ip = external_ip(10)
    bed.apply(service("ext", type="ClusterIP", mutate=lambda s: s["spec"].update(externalIPs=[ip])),
              endpoint_slice("ext", [bed.a, bed.b]))
    bed.wait(lambda: answered(bed, ip, 80), what="ExternalIP")
    replies = [bed.outside_tcp(ip, 80) for _ in range(30)]
    assert {r.server for r in replies} == {backend(bed.a), backend(bed.b)}
    assert {r.client_ip for r in replies} <= bed.node_addresses(1) | bed.node_addresses(2)  # masqueraded
    # kube-proxy also serves an ExternalIP to a pod's connections (CVE-2020-8554 is its documented
    # behaviour, not fixed by kube-proxy): bpflb does the same by default.
    r = bed.local_tcp(1, bed.c, ip, 80, count=5)
    assert r["errors"] == {} and sum(r["answered"].values()) == 5


def test_udp_nodeport(bed):
    bed.apply(service("udp", node_port=30104, proto="UDP"), endpoint_slice("udp", [bed.a], proto="UDP"))
    for n in (1, 2):
        bed.wait(lambda: not bed.outside_udp(node_ip(n), 30104, timeout=0.5)[0].error, what=f"UDP NodePort node {n}")
        r, src = bed.outside_udp(node_ip(n), 30104)
        assert (r.server, r.client_ip, src) == (backend(bed.a), node_ip(n), f"{node_ip(n)}:30104"), (r, src)
        # forwarded once by the node it reached (and once more by the backend's node), as routers do: the
        # outside client sends with TTL 64
        assert r.ttl == (63 if n == 1 else 62), r


def test_a_backends_port_unreachable_reaches_the_outside_client(bed):
    """A UDP NodePort whose endpoint's port has nothing listening: the pod answers ICMP port unreachable.
    Behind kube-proxy, conntrack translates it as a RELATED packet and the outside client's connected
    socket fails at once with ECONNREFUSED, through the backend's node and through the other one."""
    es = endpoint_slice("udp-closed", [bed.a], proto="UDP")
    es["ports"][0]["port"] = 9999  # nothing listens there
    bed.apply(service("udp-closed", node_port=30118, proto="UDP"), es)
    for n in (1, 2):
        bed.wait(lambda: bed.outside_udp(node_ip(n), 30118, timeout=0.5, connected=True)[0].error == "ECONNREFUSED",
                 what=f"ECONNREFUSED through node {n}")


def test_a_fragmented_datagram_to_a_udp_nodeport(bed):
    """A 4000-byte datagram leaves the outside client in three IPv4 fragments; only the first carries the
    ports. kube-proxy's conntrack reassembles before it translates; the datagram reaches the backend
    through the backend's node and through the other one."""
    bed.apply(service("udp-frag", node_port=30119, proto="UDP"), endpoint_slice("udp-frag", [bed.a], proto="UDP"))
    for n in (1, 2):
        bed.wait(lambda: not bed.outside_udp(node_ip(n), 30119, timeout=0.5)[0].error, what=f"UDP NodePort node {n}")
        r, src = bed.outside_udp(node_ip(n), 30119, size=4000)
        assert (r.server, r.client_ip, src) == (backend(bed.a), node_ip(n), f"{node_ip(n)}:30119"), (r, src)


def test_session_affinity_from_outside(bed):
    bed.apply(service("aff", node_port=30105, mutate=lambda s: s["spec"].update(sessionAffinity="ClientIP")),
              endpoint_slice("aff", [bed.a, bed.b]))
    for n in (1, 2):
        bed.wait(lambda: answered(bed, node_ip(n), 30105), what=f"affinity NodePort node {n}")
        assert len({bed.outside_tcp(node_ip(n), 30105).server for _ in range(30)}) == 1


def test_nodeport_from_a_pod_and_from_the_node(bed):
    bed.apply(service("np-local-callers", node_port=30106), endpoint_slice("np-local-callers", [bed.a, bed.b]))
    bed.wait(lambda: answered(bed, node_ip(1), 30106) and answered(bed, node_ip(2), 30106), what="NodePort")
    for caller in (bed.c, None):  # a pod of node 1, then node 1 itself
        for target in (node_ip(1), node_ip(2)):
            r = bed.local_tcp(1, caller, target, 30106, count=10)
            assert r["errors"] == {} and sum(r["answered"].values()) == 10, (caller, target, r)


def test_pods_are_dual_stack_from_the_bundled_cni(bed):
    """Every pod of the bed is the plugin's, with an address from each of its node's spec.podCIDRs; with
    bpflb the agent registers both in lb_endpoints (one host veth and MAC) and DEL takes both out (the
    kube-proxy modes have no such map: the CNI server runs alone there)."""
    for pod in (bed.a, bed.b, bed.c):
        assert pod.ip.startswith(f"10.244.{pod.node}.") and pod.ip6.startswith(f"fd00:244:{pod.node:x}::"), pod
    if not bed.bpflb:
        return
    from lb.maps.endpoints import PinnedEndpointMap

    def endpoints(n: int) -> dict:
        m = PinnedEndpointMap(bed.cluster.bpf_root(n))
        try:
            return m.dump()
        finally:
            m.close()

    for pod in (bed.a, bed.b, bed.c):
        got = endpoints(pod.node)
        assert pod.ip in got and got.get(pod.ip6) == got[pod.ip], (pod, got)
    tmp = bed.pod(2, "tmp", serve=False)
    assert {tmp.ip, tmp.ip6} <= set(endpoints(2))
    bed.remove_pod(tmp)
    assert not {tmp.ip, tmp.ip6} & set(endpoints(2))


def test_ipv6_nodeport(bed):
    """IPv6 backends are the CNI's dual-stack pods (their IPv6 addresses): a local and a remote one."""
    bed.apply(service("np6", node_port=30107, family="IPv6"),
              endpoint_slice("np6", [bed.a, bed.b], family="IPv6"))
    for n in (1, 2):
        bed.wait(lambda: answered(bed, node_ip6(n), 30107), what=f"IPv6 NodePort node {n}")
        replies = [bed.outside_tcp(node_ip6(n), 30107) for _ in range(30)]
        assert {r.server for r in replies} == {backend(bed.a, "IPv6"), backend(bed.b, "IPv6")}
        assert {r.client_ip for r in replies} == {node_ip6(n)}
    bed.apply(service("np6-local", node_port=30117, family="IPv6",
                      mutate=lambda s: s["spec"].update(externalTrafficPolicy="Local")),
              endpoint_slice("np6-local", [bed.a], family="IPv6"))
    bed.wait(lambda: answered(bed, node_ip6(1), 30117), what="IPv6 eTP Local")
    assert bed.outside_tcp(node_ip6(1), 30117).client_ip == OUTSIDE_V6


def _streams_to_each(bed, ip, port, servers: set[str], tries: int = 40):
    """Open outside streams until one reached each of `servers`; close the rest."""
    got = {}
    for _ in range(tries):
        s = bed.outside_stream(ip, port)
        if s.server in servers and s.server not in got:
            got[s.server] = s
        else:
            s.close()
        if set(got) == servers:
            return got
    for s in got.values():
        s.close()
    raise AssertionError(f"streams reached only {sorted(got)}")


def test_backend_removed_while_an_outside_client_streams(bed):
    d, e = bed.pod(1, "d"), bed.pod(2, "e")
    bed.apply(service("np-rm", node_port=30108), endpoint_slice("np-rm", [d, e]))
    bed.wait(lambda: answered(bed, node_ip(1), 30108), what="NodePort np-rm")
    streams = _streams_to_each(bed, node_ip(1), 30108, {backend(d), backend(e)})
    try:
        assert all(s.answers_after(3) for s in streams.values())
        # The backend goes: out of the EndpointSlice, and its pod deleted (as the endpoints controller and
        # kubelet do it).
        bed.apply(endpoint_slice("np-rm", [d]))
        bed.remove_pod(e)
        gone, kept = streams[backend(e)], streams[backend(d)]
        assert not gone.answers_after(1, timeout=4), "the removed backend's flow still answers"
        assert kept.answers_after(5) and not kept.error
        bed.wait(lambda: all(bed.outside_tcp(node_ip(1), 30108).server == backend(d) for _ in range(5)),
                 what="new flows to the remaining backend")
        assert {bed.outside_tcp(node_ip(1), 30108).server for _ in range(20)} == {backend(d)}
    finally:
        for s in streams.values():
            s.close()
        bed.remove_pod(d)


def test_proxy_kill9_while_an_outside_client_streams(bed):
    bed.apply(service("np-kill", node_port=30109), endpoint_slice("np-kill", [bed.a, bed.b]))
    bed.wait(lambda: answered(bed, node_ip(1), 30109), what="NodePort np-kill")
    streams = list(_streams_to_each(bed, node_ip(1), 30109, {backend(bed.a), backend(bed.b)}).values())
    try:
        bed.kill_proxy(1, signal.SIGKILL)
        for s in streams:  # established flows live on with the proxy dead: no reset, no silence
            assert s.answers_after(10) and not s.error, s.error
        bed.restart_proxy(1)
        for s in streams:  # and across its restart
            assert s.answers_after(10) and not s.error, s.error
        assert answered(bed, node_ip(1), 30109)
    finally:
        for s in streams:
            s.close()
        if bed.proxies[1].poll() is not None:
            bed.restart_proxy(1)
