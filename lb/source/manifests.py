"""Standalone source: a folder of Kubernetes YAML/JSON, followed as it changes.

Every ``*.yaml``/``*.yml``/``*.json`` is read (multi-document YAML and ``kind: List`` included).
The folder is polled (stat of each file, every ``poll_interval``): cheap, works on every filesystem
and in containers where inotify on a bind mount misses edits made from the host.

Bad input never loses what is programmed: a file that fails to parse keeps its last good objects,
and a malformed object keeps its last good version; both are reported with file, object and field.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from ..model import EndpointSlice, Node, ObjKey, Service
from ..objects import ENDPOINT_SLICE, NODE, PARSERS, SERVICE, ObjectError, kind_of

log = logging.getLogger("bpflb.source.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Problem:
    file: str
    obj: str  # "Kind ns/name" or "document N"
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.obj}: {self.field}: {self.reason}" if self.field else \
            f"{self.file}: {self.obj}: {self.reason}"


@dataclass
class _File:
    stamp: tuple
    objects: dict[tuple, Any] = field(default_factory=dict)  # (kind, ObjKey) -> model value
    problems: list[Problem] = field(default_factory=list)


def _documents(path: str, text: str) -> list[Any]:
    if path.endswith(".json"):
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def _flatten(doc: Any) -> list[Any]:
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        out = []
        for item in doc["items"]:
            out.extend(_flatten(item))
        return out
    return [doc]


def _describe(obj: Any, index: int) -> tuple[str, tuple | None]:
    kind = kind_of(obj)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    ns = (meta.get("namespace") or "default") if isinstance(meta, dict) else "default"
    if kind and isinstance(name, str) and name:
        key = ObjKey(ns if kind != NODE else "", name)
        return f"{kind[1]} {key}" if kind != NODE else f"Node {name}", (kind, key)
    return f"document {index + 1}" + (f" ({kind[1]})" if kind and kind[1] else ""), None


def parse_file(path: str, text: str, previous: dict[tuple, Any]) -> tuple[dict[tuple, Any], list[Problem]]:
    """Objects in one file. ``previous`` (the last good objects of this file) fills in for a file
    that does not parse and for objects that are malformed."""
    name = os.path.basename(path)
    try:
        docs = _documents(path, text)
    except (yaml.YAMLError, ValueError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        return dict(previous), [Problem(name, "file", "", f"not valid {'JSON' if path.endswith('.json') else 'YAML'}{at}: "
                                        f"{getattr(e, 'problem', None) or e}")]
    objects: dict[tuple, Any] = {}
    problems: list[Problem] = []
    for i, obj in enumerate(o for d in docs for o in _flatten(d)):
        desc, key = _describe(obj, i)
        kind = kind_of(obj)
        if kind is None:
            problems.append(Problem(name, desc, "", "not an object"))
            continue
        parser = PARSERS.get(kind)
        if parser is None:
            if kind[1] in ("Service", "EndpointSlice", "Node"):
                problems.append(Problem(name, desc, "apiVersion", f"unsupported apiVersion {kind[0]!r} for {kind[1]}"))
            continue  # other kinds (Deployments, ...) are not ours to read
        if key is None:
            problems.append(Problem(name, desc, "metadata.name", "missing"))
            continue
        try:
            value = parser(obj)
        except ObjectError as e:
            problems.append(Problem(name, desc, e.field, e.reason))
            if key in previous:
                objects[key] = previous[key]
            continue
        if key in objects:
            problems.append(Problem(name, desc, "metadata.name", "defined twice in this file; the first one is used"))
            continue
        objects[key] = value
    return objects, problems


class ManifestFolder:
    def __init__(self, path: str, report: Callable[[Problem], None] | None = None):
        self.path = path
        self.files: dict[str, _File] = {}
        self.report = report or (lambda p: log.error("bad manifest: %s", p))

    def scan(self) -> bool:
        """Re-read files that changed; True if anything was added, changed or removed."""
        try:
            names = sorted(n for n in os.listdir(self.path) if n.endswith(SUFFIXES) and not n.startswith("."))
        except OSError as e:
            log.error("cannot read manifest folder %s: %s", self.path, e.strerror)
            return False
        changed = False
        seen = set()
        for n in names:
            p = os.path.join(self.path, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            seen.add(p)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            old = self.files.get(p)
            if old is not None and old.stamp == stamp:
                continue
            try:
                with open(p, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                self.report(Problem(n, "file", "", f"unreadable: {e}"))
                continue
            objects, problems = parse_file(p, text, old.objects if old else {})
            for prob in problems:
                self.report(prob)
            self.files[p] = _File(stamp, objects, problems)
            changed = True
        for p in set(self.files) - seen:
            del self.files[p]
            changed = True
        return changed

    def problems(self) -> list[Problem]:
        return [p for f in self.files.values() for p in f.problems]

    def snapshot(self) -> tuple[dict[ObjKey, Service], dict[ObjKey, EndpointSlice], dict[str, Node]]:
        services: dict[ObjKey, Service] = {}
        slices: dict[ObjKey, EndpointSlice] = {}
        nodes: dict[str, Node] = {}
        for p in sorted(self.files):
            for (kind, key), value in self.files[p].objects.items():
                if kind == SERVICE:
                    if key in services:
                        self.report(Problem(os.path.basename(p), f"Service {key}", "metadata.name", "also defined in an earlier file; that one is used"))
                        continue
                    services[key] = value
                elif kind == ENDPOINT_SLICE:
                    slices.setdefault(key, value)
                elif kind == NODE:
                    nodes.setdefault(key.name, value)
        return services, slices, nodes
