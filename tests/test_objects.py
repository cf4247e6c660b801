"""Parsing and validation of Kubernetes objects: bad input names its field."""
from __future__ import annotations

import pytest

from conftest import make_service, make_slice
from lb.objects import ObjectError, parse_endpoint_slice, parse_ip_sloppy, parse_service


@pytest.mark.parametrize("text,want", [
    ("10.180.00.001", "10.180.0.1"),  # kube-proxy ParseIPSloppy: leading zeros are decimal
    ("010.096.000.010", "10.96.0.10"),
    ("fd00:96:0:0::010", "fd00:96::10"),
    ("FD00:96::A", "fd00:96::a"),
], ids=["leading-zeros", "all-octets-padded", "v6-compressed", "v6-case"])
def test_ips_are_normalised_like_kube_proxy(text, want):
    assert parse_ip_sloppy(text, "f") == want


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
], ids=["port-zero", "port-string", "protocol", "second-cluster-ip", "cluster-ip", "type", "affinity",
        "affinity-timeout", "itp", "duplicate-port-names", "no-name", "external-ip"])
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


def test_lb_ingress_ip_mode_proxy_gets_no_rule():
    svc = parse_service(make_service("ns", "svc", lambda s: s.update(status={"loadBalancer": {"ingress": [
        {"ip": "192.168.9.1", "ipMode": "Proxy"}, {"ip": "192.168.9.2", "ipMode": "VIP"}, {"ip": "192.168.9.3"},
        {"hostname": "lb.example"}]}})))
    assert svc.lb_ingress_ips == ("192.168.9.2", "192.168.9.3")
