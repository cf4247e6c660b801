"""The desired frontends, kept per Service so one Service can be re-translated alone.

Each frontend has one owner. A Service that wants a frontend another Service already owns is
refused that frontend (logged) and retried whenever a frontend is freed.
"""
from __future__ import annotations

import logging

from .model import Frontend, FrontendState, ObjKey

log = logging.getLogger("bpflb.service_table")


class ServiceTable:
    def __init__(self) -> None:
        self.want: dict[Frontend, FrontendState] = {}
        self.owner: dict[Frontend, ObjKey] = {}
        self.frontends_of: dict[ObjKey, set[Frontend]] = {}
        self.conflicts: set[ObjKey] = set()

    def update(self, key: ObjKey, frontends: dict[Frontend, FrontendState]) -> tuple[set[Frontend], set[ObjKey]]:
        """Replace one Service's frontends; returns (frontends touched, Services to retry after a
        frontend they wanted was freed)."""
        touched = set()
        freed = False
        for fe in self.frontends_of.pop(key, set()):
            if self.owner.get(fe) == key:
                del self.owner[fe]
                del self.want[fe]
                touched.add(fe)
                freed = True
        mine = set()
        for fe, state in frontends.items():
            other = self.owner.get(fe)
            if other is not None and other != key:
                log.warning("frontend %s of Service %s is already Service %s's; ignored", fe, key, other)
                self.conflicts.add(key)
                continue
            self.owner[fe] = key
            self.want[fe] = state
            mine.add(fe)
            touched.add(fe)
        if mine:
            self.frontends_of[key] = mine
        retry: set[ObjKey] = set()
        if freed and self.conflicts:
            retry, self.conflicts = self.conflicts - {key}, set()
        return touched, retry
