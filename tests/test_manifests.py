"""The manifest-folder source: formats, reports of bad input, last-good retention."""
from __future__ import annotations

import json
import os

import yaml

from conftest import make_service, make_slice
from lb.model import ObjKey
from lb.source.manifests import ManifestFolder

SVC_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: ns}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 53, protocol: UDP}]}
"""


def folder(tmp_path):
    problems = []
    return ManifestFolder(str(tmp_path), problems.append), problems


def test_multi_document_yaml_lists_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text(SVC_YAML)
    (tmp_path / "b.json").write_text(json.dumps(make_slice("ns", "a-1", "a", ["10.0.0.1"])))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(make_service("ns", "c", lambda s: s["spec"].update(clusterIP="10.96.0.3", clusterIPs=["10.96.0.3"]))))
    (tmp_path / "notes.txt").write_text("ignored")
    f, problems = folder(tmp_path)
    assert f.scan()
    services, slices, nodes = f.snapshot()
    assert sorted(str(k) for k in services) == ["ns/a", "ns/b", "ns/c"]
    assert list(slices) == [ObjKey("ns", "a-1")]
    assert problems == []
    assert not f.scan()  # nothing changed


def test_problems_name_file_object_and_field(tmp_path):
    bad = make_service("ns", "bad", lambda s: s["spec"]["ports"][0].update(protocol="XTP"))
    (tmp_path / "x.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [bad, make_service("ns", "ok")]}))
    (tmp_path / "y.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "z.yaml").write_text("apiVersion: v2\nkind: Service\nmetadata: {name: q}\n")
    f, problems = folder(tmp_path)
    f.scan()
    text = sorted(str(p) for p in problems)
    assert text[0] == "x.json: Service ns/bad: spec.ports[0].protocol: unsupported protocol 'XTP' (TCP, UDP or SCTP)"
    assert text[1].startswith("y.yaml: file: not valid YAML at line")
    assert text[2] == "z.yaml: Service default/q: apiVersion: unsupported apiVersion 'v2' for Service"
    assert list(f.snapshot()[0]) == [ObjKey("ns", "ok")]


def test_bad_edits_keep_the_last_good_objects(tmp_path):
    p = tmp_path / "s.json"
    good = make_service("ns", "s")
    p.write_text(json.dumps(good))
    f, problems = folder(tmp_path)
    f.scan()
    first = f.snapshot()[0]
    # the object turns malformed: its last good version stays
    p.write_text(json.dumps(make_service("ns", "s", lambda s: s["spec"]["ports"][0].update(port=-1))))
    os.utime(p, ns=(1, 1))
    f.scan()
    assert f.snapshot()[0] == first and problems
    # the file stops parsing: the same
    p.write_text("{")
    f.scan()
    assert f.snapshot()[0] == first
    # deleting the file is deliberate: its objects go
    p.unlink()
    assert f.scan()
    assert f.snapshot()[0] == {}
