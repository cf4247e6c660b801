"""Standalone source: a folder of Kubernetes YAML/JSON, followed as it changes.

Every ``*.yaml``/``*.yml``/``*.json`` is read (multi-document YAML and ``kind: List`` included).
The folder is polled (stat of each file, every ``poll_interval``): cheap, works on every filesystem
and in containers where inotify on a bind mount misses edits made from the host.

Bad input never loses what is programmed: a file that fails to parse keeps its last good objects,
and a malformed object keeps its last good version (lb/source/handler.py's LastGood, the rule both
sources share); both are reported with file, object and field.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from ..model import EndpointSlice, Node, ObjKey, Service
from ..objects import ENDPOINT_SLICE, NODE, SERVICE, Other, Parsed, decode_documents, flatten, parse_document
from .handler import Handler, LastGood

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
    items: list[Parsed] = field(default_factory=list)  # every object of a kind we read, good or not
    problems: list[Problem] = field(default_factory=list)


def _entries(path: str, raw: bytes) -> list[Parsed | Other]:
    """Every object of a file, in order: JSON straight from bytes (lb/objects.py's typed decoder),
    YAML through the safe loader and the dict parsers."""
    if path.endswith(".json"):
        return decode_documents(raw)
    docs = [d for d in yaml.load_all(raw.decode("utf-8"), Loader=_Loader) if d is not None]
    return [parse_document(o) for d in docs for o in flatten(d)]


def parse_file(path: str, raw: bytes) -> tuple[list[Parsed] | None, list[Problem]]:
    """The objects of one file, malformed ones included (as Parsed with an error: the folder's
    LastGood gives them their last good version); None if the file itself does not parse."""
    name = os.path.basename(path)
    try:
        entries = _entries(path, raw)
    except (yaml.YAMLError, ValueError) as e:  # DecodeError and UnicodeDecodeError are ValueErrors
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        return None, [Problem(name, "file", "", f"not valid {'JSON' if path.endswith('.json') else 'YAML'}{at}: "
                              f"{getattr(e, 'problem', None) or e}")]
    items: list[Parsed] = []
    seen: set[tuple] = set()
    problems: list[Problem] = []
    for i, e in enumerate(entries):
        if isinstance(e, Other):
            if e.error is not None:
                if e.key is not None:
                    desc = f"Node {e.key.name}" if e.kind == NODE[1] else f"{e.kind} {e.key}"
                else:
                    desc = f"document {i + 1}" + (f" ({e.kind})" if e.kind else "")
                problems.append(Problem(name, desc, e.error.field, e.error.reason))
            continue  # other kinds (Deployments, ...) are not ours to read
        if not e.key.name:
            problems.append(Problem(name, f"document {i + 1} ({e.kind})", "metadata.name", "missing"))
            continue
        desc = f"Node {e.key.name}" if e.kind == NODE[1] else f"{e.kind} {e.key}"
        if (e.kind, e.key) in seen:
            problems.append(Problem(name, desc, "metadata.name", "defined twice in this file; the first one is used"))
            continue
        seen.add((e.kind, e.key))
        if e.error is not None:
            problems.append(Problem(name, desc, e.error.field, e.error.reason))
        items.append(e)
    return items, problems


class ManifestFolder:
    def __init__(self, path: str, report: Callable[[Problem], None] | None = None):
        self.path = path
        self.files: dict[str, _File] = {}
        self.report = report or (lambda p: log.error("bad manifest: %s", p))
        self.last = LastGood()

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
                with open(p, "rb") as f:
                    raw = f.read()
            except OSError as e:
                self.report(Problem(n, "file", "", f"unreadable: {e}"))
                continue
            items, problems = parse_file(p, raw)
            for prob in problems:
                self.report(prob)
            # A file that does not parse keeps its last good objects (a file-level LastGood).
            self.files[p] = _File(stamp, old.items if items is None and old else items or [], problems)
            changed = True
        for p in set(self.files) - seen:
            del self.files[p]
            changed = True
        return changed

    def problems(self) -> list[Problem]:
        return [p for f in self.files.values() for p in f.problems]

    def _collect(self) -> dict[str, tuple[dict[ObjKey, Any], dict[ObjKey, float]]]:
        """Per kind: (values by key, trigger times by Service), the first file (by name) winning."""
        by_kind: dict[str, list[Parsed]] = {SERVICE[1]: [], ENDPOINT_SLICE[1]: [], NODE[1]: []}
        seen: set[tuple[str, ObjKey]] = set()
        for p in sorted(self.files):
            for item in self.files[p].items:
                if (item.kind, item.key) in seen:
                    if item.kind == SERVICE[1]:
                        self.report(Problem(os.path.basename(p), f"Service {item.key}", "metadata.name",
                                            "also defined in an earlier file; that one is used"))
                    continue
                seen.add((item.kind, item.key))
                by_kind[item.kind].append(item)
        out = {}
        for kind, items in by_kind.items():
            values, triggers, _bad = self.last.listed(kind, items)  # reported by parse_file, with the file
            out[kind] = values, triggers
        return out

    def snapshot(self) -> tuple[dict[ObjKey, Service], dict[ObjKey, EndpointSlice], dict[str, Node]]:
        c = self._collect()
        return c[SERVICE[1]][0], c[ENDPOINT_SLICE[1]][0], {k.name: v for k, v in c[NODE[1]][0].items()}

    def deliver(self, handler: Handler) -> None:
        """The whole folder, as complete lists, to the handler."""
        c = self._collect()
        handler.services_listed(c[SERVICE[1]][0])
        handler.slices_listed(*c[ENDPOINT_SLICE[1]])
        handler.nodes_listed({k.name: v for k, v in c[NODE[1]][0].items()})


async def follow(folder: ManifestFolder, handler: Handler, stop: asyncio.Event, poll_interval: float,
                 max_iterations: int | None = None) -> None:
    """The manifest source: the folder, read whole at start (then the handler is told it is synced)
    and again whenever a file changes."""
    n = 0
    first = True
    while not stop.is_set():
        if folder.scan() or first:
            folder.deliver(handler)
            if first:
                handler.synced()  # a folder is "listed" once it has been read whole
                first = False
        n += 1
        if max_iterations is not None and n >= max_iterations:
            return
        try:
            await asyncio.wait_for(stop.wait(), poll_interval)
        except asyncio.TimeoutError:
            pass
