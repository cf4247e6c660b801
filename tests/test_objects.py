"""Parsing and validation of Kubernetes objects: bad input names its field."""
from __future__ import annotations

import pytest

from conftest import make_service, make_slice
from lb.objects import KIND_PARSERS, ObjectError, parse_endpoint_slice, parse_ip_sloppy, parse_service


@pytest.mark.parametrize("text,want", [
    ("10.180.00.001", "10.180.0.1"),  # kube-proxy ParseIPSloppy: leading zeros are decimal
    ("010.096.000.010", "10.96.0.10"),
    ("fd00:96:0:0::010", "fd00:96::10"),
    ("FD00:96::A", "fd00:96::a"),
    ("::ffff:10.96.0.10", "10.96.0.10"),  # Go's ParseIP: an IPv4-mapped address IS the IPv4 address
    ("::FFFF:a60:a", "10.96.0.10"),
], ids=["leading-zeros", "all-octets-padded", "v6-compressed", "v6-case", "v4-mapped", "v4-mapped-hex"])
def test_ips_are_normalised_like_kube_proxy(text, want):
    assert parse_ip_sloppy(text, "f") == want


@pytest.mark.parametrize("text", [" 10.0.0.1", "10.0.0.1 ", "fe80::1%eth0", "10.0.0.256", "1.2.3", "::ffff:1.2.3.256",
                                  "١٠.0.0.1"])
def test_what_go_refuses_is_not_an_ip(text):
    with pytest.raises(ObjectError, match="not an IP address"):
        parse_ip_sloppy(text, "f")


def test_an_ipv4_mapped_external_ip_is_ipv4_and_cannot_take_an_ipv4_clusterip():
    from lb.model import Frontend
    from lb.service_table import ServiceTable
    from lb.translate import NodeView, translate_service

    def svc(name, cluster_ip, external=(), created=""):
        return parse_service({"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
                              "spec": {"clusterIP": cluster_ip, "externalIPs": list(external),
                                       "ports": [{"port": 80}]}})
    tenant = svc("tenant", "10.96.0.99", ["::ffff:10.96.0.10"], created="2020-01-01T00:00:00Z")
    assert tenant.external_ips == ("10.96.0.10",)
    victim = svc("victim", "10.96.0.10", created="2026-01-01T00:00:00Z")
    table = ServiceTable()
    for s in (tenant, victim):
        table.update(s.key, translate_service(s, [], NodeView("n")), s)
    assert table.owner[Frontend("10.96.0.10", 80, "TCP")] == victim.key
    # dual-stack-looking tenant (IPv6 ClusterIP): the mapped address is IPv4, filtered out by family
    v6 = svc("v6", "fd00:96::99", ["::ffff:10.96.0.10"])
    assert all(":" in fe.ip for fe in translate_service(v6, [], NodeView("n")))


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda s: s["spec"]["ports"][0].update(port=0), "spec.ports[0].port", "between 1 and 65535"),
    (lambda s: s["spec"]["ports"][0].update(port="80"), "spec.ports[0].port", "expected an integer"),
    (lambda s: s["spec"]["ports"][0].update(protocol="ICMP"), "spec.ports[0].protocol", "unsupported protocol"),
    (lambda s: s["spec"].update(clusterIPs=["10.96.0.1", "nope"]), "spec.clusterIPs[1]", "not an IP address"),
    (lambda s: s["spec"].update(clusterIPs=None, clusterIP="1.2.3.4.5"), "spec.clusterIP", "not an IP address"),
    (lambda s: s["spec"].update(type="Weird"), "spec.type", "unknown Service type"),
    (lambda s: s["spec"].update(sessionAffinity="Cookie"), "spec.sessionAffinity", "None or ClientIP"),
    (lambda s: s["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "between 1 and 86400"),
    (lambda s: s["spec"].update(internalTrafficPolicy="Nearby"), "spec.internalTrafficPolicy", "Cluster or Local"),
    (lambda s: s["spec"]["ports"].append(dict(s["spec"]["ports"][0])), "spec.ports", "unique"),
    (lambda s: s["metadata"].pop("name"), "metadata.name", "missing"),
    (lambda s: s["spec"].update(externalIPs=["x"]), "spec.externalIPs[0]", "not an IP address"),
    (lambda s: s["spec"].update(healthCheckNodePort=70000), "spec.healthCheckNodePort", "between 0 and 65535"),
    (lambda s: s["spec"].update(healthCheckNodePort="30000"), "spec.healthCheckNodePort", "expected an integer"),
    (lambda s: s["spec"].update(loadBalancerSourceRanges="10.0.0.0/8"), "spec.loadBalancerSourceRanges",
     "expected list"),
    (lambda s: s["spec"].update(loadBalancerSourceRanges=["10.0.0.0/8", 7]), "spec.loadBalancerSourceRanges[1]",
     "expected a string"),
], ids=["port-zero", "port-string", "protocol", "second-cluster-ip", "cluster-ip", "type", "affinity",
        "affinity-timeout", "itp", "duplicate-port-names", "no-name", "external-ip", "health-check-port-range",
        "health-check-port-string", "source-ranges-not-a-list", "source-range-not-a-string"])
def test_bad_service_names_the_field(mutate, field, reason):
    with pytest.raises(ObjectError) as e:
        parse_service(make_service("ns", "svc", mutate))
    assert e.value.field == field
    assert reason in e.value.reason


@pytest.mark.parametrize("mutate,field", [
    (lambda e: e.update(addressType="IPX"), "addressType"),
    (lambda e: e["endpoints"][0].update(addresses=["10.1.1.999"]), "endpoints[0].addresses[0]"),
    (lambda e: e["endpoints"][0].update(addresses=["fd00::1"]), "endpoints[0].addresses[0]"),
    (lambda e: e["endpoints"][0].update(conditions={"ready": "yes"}), "endpoints[0].conditions.ready"),
    (lambda e: e["ports"][0].update(port=65536), "ports[0].port"),
], ids=["address-type", "bad-ip", "wrong-family", "condition-type", "port-range"])
def test_bad_slice_names_the_field(mutate, field):
    with pytest.raises(ObjectError) as e:
        parse_endpoint_slice(make_slice("ns", "s", "svc", ["10.1.1.1"], mutate))
    assert e.value.field == field


def test_conditions_default_as_kube_proxy():
    es = parse_endpoint_slice(make_slice("ns", "s", "svc", ["10.1.1.1"], lambda e: e["endpoints"][0].pop("conditions")))
    ep = es.endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating) == (True, True, False)


def test_slice_ports_without_name_or_port_are_ignored():
    es = parse_endpoint_slice(make_slice("ns", "s", "svc", ["10.1.1.1"], lambda e: e.update(ports=[
        {"port": 80, "protocol": "TCP"}, {"name": "a", "port": 0}, {"name": "b"}, {"name": "", "port": 81}])))
    assert [(p.name, p.port) for p in es.ports] == [("", 81)]


def test_only_the_first_address_counts():
    es = parse_endpoint_slice(make_slice("ns", "s", "svc", ["10.1.1.1"],
                                         lambda e: e["endpoints"][0].update(addresses=["10.1.1.1", "10.1.1.2"])))
    assert [ep.ip for ep in es.endpoints] == ["10.1.1.1"]


@pytest.mark.parametrize("mutate,skip", [
    (lambda s: s["metadata"].update(labels={"service.kubernetes.io/service-proxy-name": "other"}), "service-proxy-name"),
    (lambda s: s["metadata"].update(labels={"service.kubernetes.io/headless": ""}), "headless"),
    (lambda s: s["spec"].update(clusterIP="None", clusterIPs=["None"]), "headless"),
    (lambda s: s["spec"].update(type="ExternalName", externalName="x.example", clusterIP="", clusterIPs=[]), "ExternalName"),
], ids=["proxy-name-label", "headless-label", "cluster-ip-none", "external-name"])
def test_services_kube_proxy_skips(mutate, skip):
    assert skip in parse_service(make_service("ns", "svc", mutate)).skip


@pytest.mark.parametrize("mutate,skip", [
    (lambda e: e.update(addressType="FQDN", endpoints=[{"addresses": ["a.example"]}]), "FQDN"),
    (lambda e: e["metadata"].update(labels={}), "service-name"),
    (lambda e: e["metadata"]["labels"].update({"service.kubernetes.io/service-proxy-name": "x"}), "service-proxy-name"),
], ids=["fqdn", "no-service-name", "proxy-name-label"])
def test_slices_kube_proxy_skips(mutate, skip):
    assert skip in parse_endpoint_slice(make_slice("ns", "s", "svc", ["10.1.1.1"], mutate)).skip


@pytest.mark.parametrize("ranges,want", [
    ([" 10.0.0.0/8 "], ("10.0.0.0/8",)),  # serviceport.go: whitespace padding trimmed
    (["10.1.2.3/16"], ("10.1.0.0/16",)),  # ParseCIDRSloppy masks the host bits
    (["010.001.0.0/016"], ("10.1.0.0/16",)),  # leading zeros are decimal, in the address and the prefix
    (["fd00::1/64", "0.0.0.0/0"], ("fd00::/64", "0.0.0.0/0")),
    (["nope", "", "10.0.0.0/33", "10.0.0.0"], ()),  # MapCIDRsByIPFamily: what does not parse is ignored
], ids=["trimmed", "host-bits-masked", "leading-zeros", "both-families-and-zero", "unparsable-ignored"])
def test_source_ranges_are_read_as_kube_proxy_reads_them(ranges, want):
    svc = parse_service(make_service("ns", "svc", lambda s: s["spec"].update(loadBalancerSourceRanges=ranges)))
    assert svc.lb_source_ranges == want


def test_health_check_node_port_is_read():
    svc = parse_service(make_service("ns", "svc", lambda s: s["spec"].update(healthCheckNodePort=31234)))
    assert svc.health_check_node_port == 31234


def test_lb_ingress_ip_mode_proxy_gets_no_rule():
    svc = parse_service(make_service("ns", "svc", lambda s: s.update(status={"loadBalancer": {"ingress": [
        {"ip": "192.168.9.1", "ipMode": "Proxy"}, {"ip": "192.168.9.2", "ipMode": "VIP"}, {"ip": "192.168.9.3"},
        {"hostname": "lb.example"}]}})))
    assert svc.lb_ingress_ips == ("192.168.9.2", "192.168.9.3")


# ---- the bytes decoders (msgspec typed path, dict parsers as the reference) ------------------------------

import copy  # noqa: E402
import json  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import make_endpoint  # noqa: E402
from lb.objects import (DecodeError, Event, Other, Page, Parsed, decode_documents, decode_event,  # noqa: E402
                        decode_page, parse)


def view(p):
    """A Parsed / Other as comparable data (ObjectError compares by identity)."""
    if isinstance(p, Other):
        return ("other", p.api_version, p.kind, p.error and (p.error.field, p.error.reason))
    assert isinstance(p, Parsed)
    assert (p.value is None) != (p.error is None) or (p.value is None and p.error is None)
    return (p.kind, p.key, p.value, p.trigger, p.error and (p.error.field, p.error.reason))


def page_bytes(objs: list, cont: str = "", rv: str = "7") -> bytes:
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {"continue": cont, "resourceVersion": rv},
                       "items": objs}).encode()


def test_page_with_one_bad_object_keeps_the_others_and_names_the_field():
    good = make_service("ns", "a")
    bad = make_service("ns", "b", lambda s: s["spec"]["ports"].append({"name": "x", "port": 70000}))
    page = decode_page("Service", page_bytes([good, bad], cont="next", rv="42"))
    assert (page.cont, page.resource_version) == ("next", "42")
    assert page.items[0].value == parse_service(good)
    assert page.items[1].value is None and page.items[1].key.name == "b"
    assert (page.items[1].error.field, "between 1 and 65535" in page.items[1].error.reason) == ("spec.ports[1].port", True)


@pytest.mark.parametrize("line,want", [
    ({"type": "ADDED", "object": make_slice("ns", "s", "svc", ["10.1.1.1"])}, ("ADDED", "ns/s", True)),
    ({"type": "DELETED", "object": {"metadata": {"name": "s", "namespace": "ns", "resourceVersion": "9"}}},
     ("DELETED", "ns/s", False)),
    ({"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": "9"}}},
     ("BOOKMARK", None, False)),
    ({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}, ("ERROR", None, False)),
], ids=["added", "deleted", "bookmark", "error"])
def test_watch_lines(line, want):
    ev = decode_event("EndpointSlice", json.dumps(line).encode())
    assert (ev.type, ev.item and str(ev.item.key), bool(ev.item and ev.item.value)) == want
    if ev.type == "ERROR":
        assert (ev.status_code, ev.message) == (410, "too old")
    if ev.type in ("DELETED", "BOOKMARK"):
        assert ev.resource_version == "9"


def test_manifest_documents_in_file_order():
    svc = make_service("ns", "a")
    doc = [{"apiVersion": "v1", "kind": "List", "items": [svc, {"apiVersion": "apps/v1", "kind": "Deployment"}]},
           {"apiVersion": "v2", "kind": "Service", "metadata": {"name": "b"}}, 5,
           make_slice("ns", "s", "a", ["10.1.1.1"])]
    got = [view(p) for p in decode_documents(json.dumps(doc).encode())]
    assert got == [view(parse("Service", svc)), ("other", "apps/v1", "Deployment", None),
                   ("other", "v2", "Service", ("apiVersion", "unsupported apiVersion 'v2' for Service")),
                   ("other", "", "", ("", "not an object")),
                   view(parse("EndpointSlice", doc[3]))]
    with pytest.raises(DecodeError):
        decode_documents(b'{"kind": "List", "items": [')


# Rich objects with every field the parsers read, mutated at random paths to random JSON values: the
# typed path must give exactly what the dict parsers give (value, or the error's field and reason).

def rich_service() -> dict:
    def mutate(s):
        s["metadata"]["labels"] = {"app": "x"}
        s["spec"].update(type="LoadBalancer", clusterIPs=["10.96.0.10", "fd00:96::10"], externalIPs=["192.0.2.1"],
                         sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
                         internalTrafficPolicy="Local", externalTrafficPolicy="Cluster", healthCheckNodePort=30999,
                         loadBalancerSourceRanges=["10.0.0.0/8", " 192.168.07.0/24 ", "fd00::/64", "bogus"])
        s["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053})
        s["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.9", "ipMode": "VIP"}, {"hostname": "h"}]}}
    return make_service("ns", "svc", mutate)


def rich_slice() -> dict:
    def mutate(e):
        e["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"}
        e["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
        e["endpoints"] = [make_endpoint("10.1.1.1", zones=["a"], nodes=["node-a"]),
                          make_endpoint("10.1.1.2", ready=False, serving=True, terminating=True),
                          {"addresses": ["10.1.1.3"], "zone": "b"}]
    return make_slice("ns", "s", "svc", ["10.1.1.1"], mutate)


def rich_node() -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "a"}},
            "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:244::/64"],
                     "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.5"}]}}


BASES = {"Service": rich_service, "EndpointSlice": rich_slice, "Node": rich_node}
PLAUSIBLE = st.sampled_from([
    "", "TCP", "UDP", "SCTP", "ICMP", "None", "ClientIP", "Cluster", "Local", "IPv4", "IPv6", "FQDN", "ClusterIP",
    "NodePort", "LoadBalancer", "ExternalName", "Proxy", "VIP", "10.1.1.1", "010.001.1.1", "fd00::1", "FD00::A",
    "1.2.3.4\n5.6.7.8", " 10.1.1.1", "2024-01-01T00:00:00Z", "10.0.0.0/24", "kubernetes.io/service-name",
    "service.kubernetes.io/headless", "ToBeDeletedByClusterAutoscaler", 0, 1, 80, 65535, 65536, -1, 86400,
    86401, 2 ** 63, 2 ** 64 + 1, 80.0, True, False, None])
SCALARS = PLAUSIBLE | st.text(max_size=8) | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6) | st.sampled_from(["name", "port", "ip", "ready"]),
                                      inner, max_size=3), max_leaves=6)


def paths(obj, prefix=()):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from paths(v, prefix + (k,))


@st.composite
def mutated(draw, kind: str):
    obj = BASES[kind]()
    for _ in range(draw(st.integers(1, 3))):
        where = sorted(paths(obj), key=repr)
        path = draw(st.sampled_from(where))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return obj


def both_ways(kind: str, obj: dict) -> None:
    want = view(parse(kind, obj))
    assert [view(p) for p in decode_page(kind, page_bytes([obj])).items] == [want]
    assert view(decode_event(kind, json.dumps({"type": "MODIFIED", "object": obj}).encode()).item) == want
    listed = copy.deepcopy(obj)
    if isinstance(listed, dict) and kind_ok(listed, kind):
        assert [view(p) for p in decode_documents(json.dumps(listed).encode())] == [want]


def kind_ok(obj: dict, kind: str) -> bool:
    return obj.get("kind") == kind and obj.get("apiVersion") == BASES[kind]()["apiVersion"]


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", list(BASES))
def test_rich_objects_parse_the_same_both_ways(kind):
    obj = BASES[kind]()
    assert parse(kind, obj).value is not None
    both_ways(kind, obj)


@pytest.mark.parametrize("kind", list(BASES))
@FUZZ
@given(data=st.data())
def test_mutated_objects_parse_or_name_a_field_the_same_both_ways(kind, data):
    obj = data.draw(mutated(kind))
    p = parse(kind, obj)  # never raises
    assert (p.value is None) == (p.error is not None)
    if p.error is not None:
        assert isinstance(p.error.field, str) and p.error.reason
    try:
        KIND_PARSERS[kind](obj)
    except ObjectError:
        pass  # the only exception the dict parsers may raise
    both_ways(kind, obj)


@pytest.mark.parametrize("kind", list(BASES))
@FUZZ
@given(obj=JSON)
def test_any_json_parses_or_names_a_field(kind, obj):
    p = parse(kind, obj)
    assert (p.value is None) == (p.error is not None)
    if isinstance(obj, dict):
        both_ways(kind, obj)


@FUZZ
@given(raw=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode())
       | st.builds(lambda objs, cut: page_bytes(objs)[:cut], st.lists(JSON, max_size=2), st.integers(0, 200)))
def test_any_bytes_decode_or_raise_decode_error(raw):
    for kind in BASES:
        for decode, result in ((decode_page, Page), (decode_event, Event)):
            try:
                assert isinstance(decode(kind, raw), result)
            except DecodeError:
                pass
    try:
        assert all(isinstance(p, (Parsed, Other)) for p in decode_documents(raw))
    except DecodeError:
        pass


@pytest.mark.parametrize("kind", list(BASES))
def test_every_field_set_to_every_plausible_value_parses_the_same_both_ways(kind):
    """The exhaustive complement of the random walk above: one field changed (or removed) at a time."""
    values = PLAUSIBLE.wrapped_strategy.elements if hasattr(PLAUSIBLE, "wrapped_strategy") else PLAUSIBLE.elements
    base = BASES[kind]()
    for path in list(paths(base)):
        for value in [*values, {}, [], [{}], "REMOVE"]:
            obj = copy.deepcopy(base)
            parent = obj
            for k in path[:-1]:
                parent = parent[k]
            if value == "REMOVE":
                if not isinstance(parent, dict):
                    continue
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(value)
            both_ways(kind, obj)
