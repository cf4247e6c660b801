"""The pure translation layer, table-driven. Cases named after the kube-proxy rule (and, where one
exists, the kube-proxy unit test) they mirror."""
from __future__ import annotations

import pytest

from conftest import make_endpoint, make_service, make_slice
from lb.maps.structs import SCOPE_EXTERNAL
from lb.model import Backend, Frontend
from lb.objects import parse_endpoint_slice, parse_node, parse_service
from lb.translate import NodeView, translate_service

NODE = NodeView("node-a", "zone-a")
FE = Frontend("10.96.0.10", 80, "TCP")


ep = make_endpoint


def run(svc_mut=None, endpoints=(), slices=None, node=NODE):
    svc = parse_service(make_service("ns", "svc", svc_mut))
    if slices is None:
        slices = [make_slice("ns", "svc-1", "svc", [], lambda e: e.update(endpoints=list(endpoints)))]
    return translate_service(svc, [parse_endpoint_slice(s) for s in slices], node)


def ips(out, fe=FE):
    st = out[fe]
    return sorted(b.ip for b in st.backends), ("drop" if st.drop_empty else "reject") if not st.backends else "lb"


CASES = [
    # --- endpoint conditions (endpointslicecache.go addEndpoints) ---
    ("ready-endpoints-only", None, [ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=False)], (["10.0.0.1"], "lb")),
    ("absent-conditions-mean-ready", None, [{"addresses": ["10.0.0.1"]}], (["10.0.0.1"], "lb")),
    ("no-endpoints-rejects", None, [], ([], "reject")),
    ("only-not-serving-rejects", None, [ep("10.0.0.1", ready=False, serving=False)], ([], "reject")),
    # --- CategorizeEndpoints: terminating fallback (TestCategorizeEndpoints "only terminating") ---
    ("terminating-fallback-when-none-ready", None,
     [ep("10.0.0.1", ready=False, serving=True, terminating=True), ep("10.0.0.2", ready=False, serving=False, terminating=True)],
     (["10.0.0.1"], "lb")),
    ("ready-wins-over-terminating", None,
     [ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=True, terminating=True)], (["10.0.0.1"], "lb")),
    # --- internalTrafficPolicy Local (TestCategorizeEndpoints "iTP: Local") ---
    ("itp-local-uses-local-ready", lambda s: s["spec"].update(internalTrafficPolicy="Local"),
     [ep("10.0.0.1"), ep("10.0.0.2", node="node-b")], (["10.0.0.1"], "lb")),
    ("itp-local-none-here-drops", lambda s: s["spec"].update(internalTrafficPolicy="Local"),
     [ep("10.0.0.2", node="node-b")], ([], "drop")),
    ("itp-local-none-anywhere-rejects", lambda s: s["spec"].update(internalTrafficPolicy="Local"),
     [ep("10.0.0.2", ready=False, serving=False, node="node-b")], ([], "reject")),
    ("itp-local-terminating-local-fallback", lambda s: s["spec"].update(internalTrafficPolicy="Local"),
     [ep("10.0.0.1", ready=False, serving=True, terminating=True), ep("10.0.0.2", node="node-b")], (["10.0.0.1"], "lb")),
    # eTP Local only matters for external traffic: ClusterIP of such a Service uses the cluster set.
    ("etp-local-clusterip-uses-cluster-set", lambda s: s["spec"].update(type="NodePort", externalTrafficPolicy="Local",
                                                                        ports=[dict(s["spec"]["ports"][0], nodePort=30080)]),
     [ep("10.0.0.1"), ep("10.0.0.2", node="node-b")], (["10.0.0.1", "10.0.0.2"], "lb")),
    # --- topology (topologyModeFromHints / availableForTopology) ---
    ("zone-hints-filter", None, [ep("10.0.0.1", zones=["zone-a"]), ep("10.0.0.2", zones=["zone-b"])], (["10.0.0.1"], "lb")),
    ("zone-hints-ignored-unless-every-ready-endpoint-hinted", None,
     [ep("10.0.0.1", zones=["zone-a"]), ep("10.0.0.2")], (["10.0.0.1", "10.0.0.2"], "lb")),
    ("zone-hints-of-unready-endpoints-ignored", None,
     [ep("10.0.0.1", zones=["zone-a"]), ep("10.0.0.2", zones=["zone-b"]), ep("10.0.0.3", ready=False, serving=False)],
     (["10.0.0.1"], "lb")),
    ("zone-hints-ignored-when-none-for-this-zone", None,
     [ep("10.0.0.1", zones=["zone-b"]), ep("10.0.0.2", zones=["zone-c"])], (["10.0.0.1", "10.0.0.2"], "lb")),
    ("node-hints-prefer-same-node", None,
     [ep("10.0.0.1", zones=["zone-a"], nodes=["node-a"]), ep("10.0.0.2", zones=["zone-a"], nodes=["node-b"])],
     (["10.0.0.1"], "lb")),
    ("node-hints-none-for-this-node-fall-back-to-zone", None,
     [ep("10.0.0.1", zones=["zone-a"], nodes=["node-c"]), ep("10.0.0.2", zones=["zone-b"], nodes=["node-b"])],
     (["10.0.0.1"], "lb")),
    # --- family / port matching ---
    ("port-matched-by-name-not-target-port", lambda s: s["spec"]["ports"][0].update(targetPort=9999),
     [ep("10.0.0.1")], (["10.0.0.1"], "lb")),
]


@pytest.mark.parametrize("svc_mut,endpoints,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(svc_mut, endpoints, want):
    assert ips(run(svc_mut, endpoints)) == want


def test_zone_hints_ignored_when_node_has_no_zone_label():
    out = run(None, [ep("10.0.0.1", zones=["zone-a"]), ep("10.0.0.2", zones=["zone-b"])], node=NodeView("node-a", ""))
    assert ips(out) == (["10.0.0.1", "10.0.0.2"], "lb")


def test_node_view_reads_the_zone_label():
    node = parse_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {
        "topology.kubernetes.io/zone": "z9"}}})
    assert NodeView.of("n1", node) == NodeView("n1", "z9")


def test_duplicate_endpoint_across_slices_non_terminating_wins():
    slices = [make_slice("ns", "a", "svc", [], lambda e: e.update(endpoints=[ep("10.0.0.1", ready=False, serving=True, terminating=True)])),
              make_slice("ns", "b", "svc", [], lambda e: e.update(endpoints=[ep("10.0.0.1")]))]
    out = run(None, slices=slices)
    assert ips(out) == (["10.0.0.1"], "lb")
    assert len(out[FE].backends) == 1


def test_unnamed_port_and_protocol_must_match():
    slices = [make_slice("ns", "a", "svc", ["10.0.0.1"], port_name="other"),
              make_slice("ns", "b", "svc", ["10.0.0.2"], protocol="UDP"),
              make_slice("ns", "c", "svc", ["10.0.0.3"])]
    assert ips(run(None, slices=slices)) == (["10.0.0.3"], "lb")


def test_families_filtered_each_cluster_ip_gets_its_own_family():
    def dual(s):
        s["spec"]["clusterIPs"] = ["10.96.0.10", "fd00:96::10"]
    slices = [make_slice("ns", "v4", "svc", ["10.0.0.1"]), make_slice("ns", "v6", "svc", ["fd00:1::1"])]
    out = run(dual, slices=slices)
    assert out[FE].backends == (Backend("10.0.0.1", 8080, "TCP"),)
    assert out[Frontend("fd00:96::10", 80, "TCP")].backends == (Backend("fd00:1::1", 8080, "TCP"),)


def test_single_stack_service_ignores_other_family_slices_and_external_ips():
    def ext(s):
        s["spec"]["externalIPs"] = ["192.168.50.1", "fd00:50::1"]
    out = run(ext, slices=[make_slice("ns", "v6", "svc", ["fd00:1::1"]), make_slice("ns", "v4", "svc", ["10.0.0.1"])])
    assert set(out) == {FE, Frontend("192.168.50.1", 80, "TCP"), Frontend("192.168.50.1", 80, "TCP", SCOPE_EXTERNAL)}


@pytest.mark.parametrize("mutate", [
    lambda s: s["spec"].update(clusterIP="None", clusterIPs=["None"]),
    lambda s: s["spec"].update(type="ExternalName", clusterIP="", clusterIPs=[]),
    lambda s: s["metadata"].update(labels={"service.kubernetes.io/service-proxy-name": "x"}),
], ids=["headless", "external-name", "other-proxy"])
def test_skipped_services_have_no_frontends(mutate):
    assert run(mutate, [ep("10.0.0.1")]) == {}


def test_session_affinity_timeout_is_carried():
    out = run(lambda s: s["spec"].update(sessionAffinity="ClientIP"), [ep("10.0.0.1")])
    assert out[FE].affinity_timeout == 10800
    out = run(lambda s: s["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 7}}),
              [ep("10.0.0.1")])
    assert out[FE].affinity_timeout == 7


def test_sctp_ports_are_not_socket_frontends():
    out = run(lambda s: s["spec"]["ports"].append({"name": "s", "port": 9, "protocol": "SCTP"}), [ep("10.0.0.1")])
    assert set(out) == {FE}
