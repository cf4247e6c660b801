"""The handler contract, the same for both sources: one table of object lists goes through the
manifest folder and through the API source's decode + Intake, and the handler must receive the same
model values (bad objects keep their last good version; trigger times per Service; deletions)."""
from __future__ import annotations

import json

import pytest

from conftest import make_service, make_slice, write_manifests
from lb.model import ObjKey
from lb.objects import decode_page
from lb.source.handler import Intake
from lb.source.manifests import ManifestFolder

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


class Recorder:
    """A Handler that keeps the last complete list of each kind (both sources deliver lists here)."""

    def __init__(self) -> None:
        self.services, self.slices, self.nodes, self.triggers = {}, {}, {}, {}
        self.synced_calls = 0

    def services_listed(self, services):
        self.services = dict(services)

    def slices_listed(self, slices, triggers):
        self.slices = dict(slices)
        self.triggers.update(triggers)

    def nodes_listed(self, nodes):
        self.nodes = dict(nodes)

    def synced(self):
        self.synced_calls += 1


def svc(name, port=80):
    return make_service("ns", name, lambda s: s["spec"]["ports"][0].update(port=port))


def bad_svc(name):
    return make_service("ns", name, lambda s: s["spec"]["ports"][0].update(port="eighty"))


def slc(name, service, trigger=None):
    def m(es):
        if trigger:
            es["metadata"]["annotations"] = {TRIGGER: trigger}
    return make_slice("ns", name, service, ["10.0.0.1"], m)


def node(name, **labels):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


# Each case: successive complete states of the cluster; after each, what the handler must hold.
CASES = [
    pytest.param([[svc("a"), svc("b")]], [{"a": 80, "b": 80}], id="plain list"),
    pytest.param([[svc("a"), svc("b", 81)], [bad_svc("a"), svc("b", 82)]], [{"a": 80, "b": 81}, {"a": 80, "b": 82}],
                 id="a malformed object keeps its last good version, the others follow"),
    pytest.param([[bad_svc("a"), svc("b")]], [{"b": 80}], id="malformed with no good version is left out"),
    pytest.param([[svc("a"), svc("b")], [svc("b")]], [{"a": 80, "b": 80}, {"b": 80}], id="missing from the list is deleted"),
    pytest.param([[svc("a")], [bad_svc("a")], [svc("a", 90)]], [{"a": 80}, {"a": 80}, {"a": 90}],
                 id="a repaired object replaces the kept one"),
]


def via_manifests(tmp_path, states):
    rec, out = Recorder(), []
    folder = ManifestFolder(str(tmp_path), report=lambda p: None)
    for i, objs in enumerate(states):
        write_manifests(tmp_path, "all.json", objs)
        import os
        os.utime(tmp_path / "all.json", ns=(i + 1, i + 1))  # a new stamp even within one clock tick
        folder.scan()
        folder.deliver(rec)
        out.append({k.name: v.ports[0].port for k, v in rec.services.items()})
    return out, rec


def via_api(states):
    rec, out = Recorder(), []
    intake = Intake(rec, report=lambda p, where: None)
    for objs in states:
        by_kind = {"Service": [], "EndpointSlice": [], "Node": []}
        for o in objs:
            by_kind[o["kind"]].append(o)
        for kind, items in by_kind.items():
            page = decode_page(kind, json.dumps({"kind": f"{kind}List", "metadata": {"resourceVersion": "1"},
                                                 "items": items}).encode())
            intake.listed(kind, page.items)
        out.append({k.name: v.ports[0].port for k, v in rec.services.items()})
    return out, rec


@pytest.mark.parametrize("states, want", CASES)
def test_both_sources_hand_over_the_same_services(tmp_path, states, want):
    assert via_manifests(tmp_path, states)[0] == want
    assert via_api(states)[0] == want


def test_both_sources_hand_over_slices_with_trigger_times_and_nodes(tmp_path):
    states = [[svc("a"), slc("a-1", "a", "2026-11-30T10:00:00Z"), slc("a-2", "a", "2026-11-30T09:00:00Z"),
               slc("b-1", "b"), node("n1", zone="z1")]]
    _, m = via_manifests(tmp_path, states)
    _, k = via_api(states)
    assert m.slices == k.slices and set(m.slices) == {ObjKey("ns", "a-1"), ObjKey("ns", "a-2"), ObjKey("ns", "b-1")}
    # the earliest trigger time of a Service's slices, from both sources
    assert m.triggers == k.triggers == {ObjKey("ns", "a"): 1796029200.0}  # 2026-11-30T09:00:00Z
    assert m.nodes == k.nodes and m.nodes["n1"].label("zone") == "z1"
