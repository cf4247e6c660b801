"""What a source hands over, and the one rule every source follows for bad objects.

A source (the manifest folder, the API server's informers) turns what it reads into model values with
lb/objects.py (``parse``, ``decode_page``, ``decode_event``: parsing, keys and last-change-trigger
times are read there once) and calls a ``Handler`` with them. The tracker is the handler: it records,
the sync loop acts.

Bad input never loses what is programmed (``LastGood``): a malformed object in a complete list keeps
its last good version, a malformed change is ignored, and both are reported naming the field. The
same class serves both sources, so the rule exists once.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol

from ..model import EndpointSlice, Node, ObjKey, Service
from ..objects import Parsed

log = logging.getLogger("bpflb.source")

SERVICE, ENDPOINT_SLICE, NODE = "Service", "EndpointSlice", "Node"


class Handler(Protocol):
    """Model values from a source. ``*_listed`` is a complete list (initial list, relist after 410, a
    folder snapshot) that replaces what came before; the others are single changes."""

    def services_listed(self, services: dict[ObjKey, Service]) -> None: ...
    def service_changed(self, svc: Service) -> None: ...
    def service_deleted(self, key: ObjKey) -> None: ...
    def slices_listed(self, slices: dict[ObjKey, EndpointSlice], triggers: dict[ObjKey, float]) -> None: ...
    def slice_changed(self, es: EndpointSlice, trigger: float | None) -> None: ...
    def slice_deleted(self, key: ObjKey) -> None: ...
    def nodes_listed(self, nodes: dict[str, Node]) -> None: ...
    def node_changed(self, node: Node) -> None: ...
    def node_deleted(self, name: str) -> None: ...
    def synced(self) -> None:
        """Every source has delivered its complete initial list: pruning is allowed from now on."""


def describe(p: Parsed) -> str:
    return f"{p.kind} {p.key.name}" if p.kind == NODE else f"{p.kind} {p.key}"


class LastGood:
    """The last good model value per (kind, key): what a malformed object falls back to."""

    def __init__(self) -> None:
        self.good: dict[str, dict[ObjKey, Any]] = {SERVICE: {}, ENDPOINT_SLICE: {}, NODE: {}}

    def listed(self, kind: str, items: Iterable[Parsed]) -> tuple[dict[ObjKey, Any], dict[ObjKey, float], list[Parsed]]:
        """A complete list -> (values by key, trigger times by Service, the malformed items). A malformed
        item keeps its last good value; an item missing from the list is gone."""
        old = self.good[kind]
        values: dict[ObjKey, Any] = {}
        triggers: dict[ObjKey, float] = {}
        bad: list[Parsed] = []
        for p in items:
            if p.error is not None:
                bad.append(p)
                if p.key in old and p.key not in values:
                    values[p.key] = old[p.key]
                continue
            values[p.key] = p.value
            if p.trigger is not None and p.value.service is not None:
                t = triggers.get(p.value.service)
                triggers[p.value.service] = p.trigger if t is None else min(t, p.trigger)
        self.good[kind] = values
        return values, triggers, bad

    def changed(self, p: Parsed) -> bool:
        """A single change; False (and nothing recorded) if the object is malformed."""
        if p.error is not None:
            return False
        self.good[p.kind][p.key] = p.value
        return True

    def deleted(self, kind: str, key: ObjKey) -> None:
        self.good[kind].pop(key, None)


def log_bad(p: Parsed, where: str) -> None:
    assert p.error is not None
    field = f"{p.error.field}: " if p.error.field else ""
    log.error("bad object from %s: %s: %s%s (last good version kept)", where, describe(p), field, p.error.reason)


class Intake:
    """Parsed items of one source -> the handler, through the last-good rule."""

    def __init__(self, handler: Handler, where: str = "the API server",
                 report: Callable[[Parsed, str], None] = log_bad) -> None:
        self.handler, self.where, self.report = handler, where, report
        self.last = LastGood()

    def listed(self, kind: str, items: Iterable[Parsed]) -> None:
        values, triggers, bad = self.last.listed(kind, items)
        for p in bad:
            self.report(p, self.where)
        if kind == SERVICE:
            self.handler.services_listed(values)
        elif kind == ENDPOINT_SLICE:
            self.handler.slices_listed(values, triggers)
        else:
            self.handler.nodes_listed({k.name: v for k, v in values.items()})

    def changed(self, p: Parsed) -> None:
        if not self.last.changed(p):
            self.report(p, self.where)
            return
        if p.kind == SERVICE:
            self.handler.service_changed(p.value)
        elif p.kind == ENDPOINT_SLICE:
            self.handler.slice_changed(p.value, p.trigger)
        else:
            self.handler.node_changed(p.value)

    def deleted(self, kind: str, key: ObjKey) -> None:
        self.last.deleted(kind, key)
        if kind == SERVICE:
            self.handler.service_deleted(key)
        elif kind == ENDPOINT_SLICE:
            self.handler.slice_deleted(key)
        else:
            self.handler.node_deleted(key.name)

    def synced(self) -> None:
        self.handler.synced()
