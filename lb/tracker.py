"""Tracker: the current object per key; drops no-op changes; says which Services need a sync.

The tracker is the sources' Handler (lb/source/handler.py): sources only record changes here, and
``notify`` is called after each one that matters. The sync loop (lb/syncer.py) asks for the dirty
Services and acts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .model import EndpointSlice, Node, ObjKey, Service


@dataclass
class Tracker:
    node_name: str
    services: dict[ObjKey, Service] = field(default_factory=dict)
    slices: dict[ObjKey, EndpointSlice] = field(default_factory=dict)
    node: Node | None = None
    nodes: dict[str, Node] = field(default_factory=dict)  # every Node (pod networking)
    nodes_dirty: bool = False
    dirty: set[ObjKey] = field(default_factory=set)
    all_dirty: bool = False
    slices_of: dict[ObjKey, set[ObjKey]] = field(default_factory=dict)  # service -> its slice keys
    triggers: dict[ObjKey, float] = field(default_factory=dict)  # service -> earliest pending trigger time
    listed: bool = False  # every source delivered its initial list: pruning is allowed
    service_changes: int = 0  # cumulative, for kube-proxy's sync_proxy_rules_service_changes_total
    endpoint_changes: int = 0  # cumulative EndpointSlice changes
    notify: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    @property
    def node_eligible(self) -> bool:
        """kube-proxy's nodeEligible: false while this node is being deleted (or tainted for it)."""
        return not (self.node and self.node.deleting)

    @property
    def pending(self) -> bool:
        return bool(self.dirty or self.all_dirty or self.nodes_dirty)

    # ---- the Handler protocol ----------------------------------------------------------------
    def services_listed(self, services: dict[ObjKey, Service]) -> None:
        self.replace_services(services)
        self.notify()

    def service_changed(self, svc: Service) -> None:
        if self.set_service(svc.key, svc):
            self.notify()

    def service_deleted(self, key: ObjKey) -> None:
        if self.set_service(key, None):
            self.notify()

    def slices_listed(self, slices: dict[ObjKey, EndpointSlice], triggers: dict[ObjKey, float]) -> None:
        self.replace_slices(slices)
        for svc, when in triggers.items():
            self.note_trigger(svc, when)
        self.notify()

    def slice_changed(self, es: EndpointSlice, trigger: float | None) -> None:
        if self.set_slice(es.key, es):
            if es.service is not None and trigger is not None:
                self.note_trigger(es.service, trigger)
            self.notify()

    def slice_deleted(self, key: ObjKey) -> None:
        if self.set_slice(key, None):
            self.notify()

    def nodes_listed(self, nodes: dict[str, Node]) -> None:
        self.replace_nodes(nodes)
        self.notify()

    def node_changed(self, node: Node) -> None:
        if self.set_any_node(node.name, node):
            self.notify()

    def node_deleted(self, name: str) -> None:
        if self.set_any_node(name, None):
            self.notify()

    def synced(self) -> None:
        self.listed = True
        self.all_dirty = True  # the first sync after the lists is full (with prune)
        self.notify()

    # ---- recording -----------------------------------------------------------------------------

    def set_service(self, key: ObjKey, svc: Service | None) -> bool:
        old = self.services.get(key)
        if old == svc:
            return False
        if svc is None:
            del self.services[key]
        else:
            self.services[key] = svc
        self.dirty.add(key)
        self.service_changes += 1
        return True

    def set_slice(self, key: ObjKey, es: EndpointSlice | None) -> bool:
        old = self.slices.get(key)
        if old == es:
            return False
        if old is not None and old.service is not None:
            self.dirty.add(old.service)
            self.slices_of.get(old.service, set()).discard(key)
        if es is None:
            del self.slices[key]
        else:
            self.slices[key] = es
            if es.service is not None:
                self.dirty.add(es.service)
                self.slices_of.setdefault(es.service, set()).add(key)
        self.endpoint_changes += 1
        return True

    def set_node(self, node: Node | None) -> bool:
        """This node (its labels: topology zone). Only set_any_node calls it."""
        if node is not None and node.name != self.node_name:
            return False
        if node == self.node:
            return False
        # Only the labels matter to translation (zone); anything else is a no-op for services.
        relevant = (self.node.labels if self.node else None) != (node.labels if node else None)
        self.node = node
        if relevant:
            self.all_dirty = True
        return relevant

    def set_any_node(self, name: str, node: Node | None) -> bool:
        """Every Node matters to pod networking (its IP, its pod CIDR); this node's also to services
        (and to health: nodeEligible)."""
        if self.nodes.get(name) == node:
            return False
        if node is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = node
        self.nodes_dirty = True
        if name == self.node_name:
            self.set_node(node)
        return True

    def replace_nodes(self, nodes: dict[str, Node]) -> None:
        for name in set(self.nodes) - set(nodes):
            self.set_any_node(name, None)
        for name, node in nodes.items():
            self.set_any_node(name, node)
        if self.node_name not in nodes:
            self.set_node(None)

    def replace_services(self, services: dict[ObjKey, Service]) -> None:
        """A complete list (initial list, relist after 410, a folder snapshot): diffed, so only
        what really changed becomes dirty."""
        for key in set(self.services) - set(services):
            self.set_service(key, None)
        for key, svc in services.items():
            self.set_service(key, svc)

    def replace_slices(self, slices: dict[ObjKey, EndpointSlice]) -> None:
        for key in set(self.slices) - set(slices):
            self.set_slice(key, None)
        for key, es in slices.items():
            self.set_slice(key, es)

    def note_trigger(self, service: ObjKey, when: float) -> None:
        """The earliest last-change-trigger-time of a Service's pending EndpointSlice changes."""
        if service not in self.triggers or when < self.triggers[service]:
            self.triggers[service] = when

    def take_triggers(self, services: set[ObjKey]) -> list[float]:
        return [self.triggers.pop(k) for k in services if k in self.triggers]

    def slices_for(self, key: ObjKey) -> list[EndpointSlice]:
        return [self.slices[k] for k in self.slices_of.get(key, ()) if k in self.slices]

    def take_dirty(self) -> tuple[set[ObjKey], bool]:
        """(dirty Services, whether every Service is dirty); clears both."""
        dirty, full = self.dirty, self.all_dirty
        self.dirty, self.all_dirty = set(), False
        return dirty, full
