"""`bpflb explain`: the selected endpoints per traffic kind and the rule that excluded each other one."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, make_service, make_slice, write_manifests
from lb.explain import explain
from lb.objects import parse_endpoint_slice, parse_service
from lb.translate import NodeView


def test_explain_names_the_rule_for_every_excluded_endpoint():
    svc = parse_service(make_service("ns", "web", lambda s: s["spec"].update(internalTrafficPolicy="Local")))
    es = parse_endpoint_slice(make_slice("ns", "web-1", "web", [], lambda e: e.update(endpoints=[
        {"addresses": ["10.0.0.1"], "nodeName": "node-a"},
        {"addresses": ["10.0.0.2"], "nodeName": "node-b"},
        {"addresses": ["10.0.0.3"], "nodeName": "node-a", "conditions": {"ready": False, "serving": False}}])))
    text = explain(svc, [es], NodeView("node-a", "zone-a"))
    assert "internalTrafficPolicy Local" in text
    assert "+ 10.0.0.1:8080" in text
    assert "- 10.0.0.2  on node node-b, not node-a" in text
    assert "- 10.0.0.3  not serving" in text
    assert "ClusterIP 10.96.0.10:80/TCP uses the local set -> 1 backend(s): 10.0.0.1:8080" in text


def test_explain_drop_and_reject():
    svc = parse_service(make_service("ns", "web", lambda s: s["spec"].update(internalTrafficPolicy="Local")))
    remote = parse_endpoint_slice(make_slice("ns", "w", "web", ["10.0.0.2"], node="node-b"))
    assert "DROP: endpoints exist, but the Local policy leaves none on this node" in explain(svc, [remote], NodeView("node-a"))
    assert "REJECT (ECONNREFUSED): no serving endpoint anywhere" in explain(svc, [], NodeView("node-a"))


def test_explain_command_reads_the_manifest_folder(tmp_path):
    write_manifests(tmp_path, "a.json", [
        make_service("ns", "web"),
        make_slice("ns", "web-1", "web", ["10.0.0.1", "10.0.0.2"], lambda e: e["endpoints"][1].update(
            conditions={"ready": False, "serving": True, "terminating": True})),
        make_slice("ns", "web-2", "web", ["x.example"], lambda e: e.update(addressType="FQDN"))])
    r = subprocess.run([sys.executable, "-m", "lb.cli", "explain", "ns/web:http", "--manifests", str(tmp_path),
                        "--node-name", "node-a"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "- 10.0.0.2  terminating (used only when no endpoint is ready)" in r.stdout
    assert "EndpointSlice ns/web-2 ignored: addressType FQDN" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lb.cli", "explain", "ns/nope", "--manifests", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Service ns/nope not found" in r.stderr


def test_explain_names_nodeport_and_external_frontends_with_their_policy():
    def m(s):
        s["spec"].update(type="NodePort", externalTrafficPolicy="Local")
        s["spec"]["ports"][0]["nodePort"] = 30080
    svc = parse_service(make_service("ns", "web", m))
    remote = parse_endpoint_slice(make_slice("ns", "w", "web", ["10.0.0.2"], node="node-b"))
    text = explain(svc, [remote], NodeView("node-a"))
    assert "NodePort (arriving at the node) 0.0.0.0:30080/TCP uses the local set -> DROP" in text
    assert "NodePort (from this node: cluster set) 0.0.0.0:30080/TCP uses the cluster set -> 1 backend(s)" in text
