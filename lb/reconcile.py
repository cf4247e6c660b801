"""Reconcile: desired frontends vs what the kernel holds; idempotent, ordered, restartable.

Contract (as Cilium's reconciler): writing what is already there is a no-op, deleting what is
missing is success, and pruning is only done with the full desired set (``prune=True``), which the
caller only passes once every source has finished its initial list.

MAP WRITE ORDER (an invariant: the datapath reads master.count, then one slot in 1..count, then the
backend; every intermediate state it can observe must be a working service):
  1. backends        new backends exist before any slot names them
  2. slots 1..N      surviving backends keep their slot; holes are filled (affinity relies on it)
  3. reverse NAT     before the frontend becomes visible, so replies are rewritten from the start
  4. master (slot 0) count last: only now may the datapath read the new slots
  5. trim            slots N+1.. of a shrunk frontend, now unreachable
  6. removals        deleted frontends: master first, then slots, then reverse NAT
  7. orphans         backends no slot names any more
IDs (frontend reverse-NAT IDs, backend IDs) are restored from the maps on start, so a restarted
agent rewrites nothing that is already right.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from .maps.services import Master, ServiceMaps
from .maps.structs import SVC_F_AFFINITY, SVC_F_DROP_EMPTY
from .model import Backend, Frontend, FrontendState

log = logging.getLogger("bpflb.reconcile")


@dataclass
class Programmed:
    """What the kernel holds for one frontend."""
    rev_nat_id: int
    slots: list[int]  # backend ID of slot i+1
    master: Master | None


@dataclass
class SyncStats:
    backends_written: int = 0
    slots_written: int = 0
    masters_written: int = 0
    deleted: int = 0
    removed: set[tuple[int, Backend]] = field(default_factory=set)  # (frontend ID, backend it stopped using)


    @property
    def writes(self) -> int:
        return self.backends_written + self.slots_written + self.masters_written + self.deleted


class IDAllocator:
    """Lowest free ID first, from 1; IDs taken by restored state are marked used."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used: set[int] = set()
        self.next = 1
        self.free: list[int] = []

    def take(self, i: int) -> None:
        self.used.add(i)
        self.next = max(self.next, i + 1)

    def alloc(self) -> int:
        while self.free:
            i = self.free.pop()
            if i not in self.used:
                self.used.add(i)
                return i
        if self.next > self.limit:
            raise RuntimeError(f"no free ID below {self.limit}")
        i = self.next
        self.next += 1
        self.used.add(i)
        return i

    def release(self, i: int) -> None:
        if i in self.used:
            self.used.discard(i)
            self.free.append(i)


def master_of(state: FrontendState, rev_nat_id: int, count: int) -> Master:
    flags = (SVC_F_DROP_EMPTY if state.drop_empty and count == 0 else 0) | \
        (SVC_F_AFFINITY if state.affinity_timeout else 0)
    return Master(rev_nat_id, count, flags, state.affinity_timeout)


def stable_slots(old: list[int], new_ids: list[int]) -> list[int]:
    """New slot layout: a surviving backend keeps its slot when it still fits; the rest fill holes."""
    want = set(new_ids)
    n = len(new_ids)
    layout: list[int | None] = [None] * n
    placed = set()
    for i, bid in enumerate(old[:n]):
        if bid in want and bid not in placed:
            layout[i] = bid
            placed.add(bid)
    rest = iter(b for b in new_ids if b not in placed)
    return [b if b is not None else next(rest) for b in layout]


class Reconciler:
    def __init__(self, maps: ServiceMaps, revnat_limit: int = 65535, backend_limit: int = (1 << 32) - 1):
        self.maps = maps
        self.have: dict[Frontend, Programmed] = {}
        self.backend_id: dict[Backend, int] = {}
        self.backend_of: dict[int, Backend] = {}
        self.refs: dict[int, int] = {}
        self.revnat_ids = IDAllocator(revnat_limit)
        self.backend_ids = IDAllocator(backend_limit)
        self.restore()

    # ---- restore from the kernel -----------------------------------------------------------
    def restore(self) -> None:
        """Adopt what the pinned maps hold (a restarted agent, or a resync after an error)."""
        self.have.clear()
        self.backend_id.clear()
        self.backend_of.clear()
        self.refs.clear()
        self.revnat_ids = IDAllocator(self.revnat_ids.limit)
        self.backend_ids = IDAllocator(self.backend_ids.limit)
        for bid, be in self.maps.dump_backends().items():
            self.backend_ids.take(bid)
            self.backend_of[bid] = be
            self.backend_id.setdefault(be, bid)
            self.refs[bid] = 0
        for fe, (master, slots) in self.maps.dump_frontends().items():
            count = master.count if master else 0
            layout = [slots.get(i, 0) for i in range(1, max(slots, default=0) + 1)]
            rid = master.rev_nat_id if master else 0
            if rid:
                self.revnat_ids.take(rid)
            self.have[fe] = Programmed(rid, layout, master)
            for bid in layout[:count]:
                self.refs[bid] = self.refs.get(bid, 0) + 1
            for bid in layout[count:]:
                self.refs.setdefault(bid, 0)

    # ---- sync --------------------------------------------------------------------------------
    def sync(self, want: dict[Frontend, FrontendState], scope: Iterable[Frontend] | None = None,
             prune: bool = False) -> SyncStats:
        """Make the kernel match ``want`` for the frontends in ``scope`` (all of ``want`` if None).
        With ``prune``, every programmed frontend missing from ``want`` is removed too."""
        stats = SyncStats()
        todo = set(want) if scope is None else set(scope)
        if prune:
            todo |= set(self.have)
        new_backends: list[tuple[int, Backend]] = []
        slot_writes: list[tuple[Frontend, int, int, int]] = []
        revnat_writes: list[tuple[int, Frontend]] = []
        master_writes: list[tuple[Frontend, Master]] = []
        trims: list[tuple[Frontend, int]] = []
        removed: list[Frontend] = []
        layouts: dict[Frontend, Programmed] = {}

        for fe in sorted(todo):
            state = want.get(fe)
            cur = self.have.get(fe)
            if state is None:
                if cur is not None:
                    removed.append(fe)
                    count = cur.master.count if cur.master else 0
                    stats.removed.update((cur.rev_nat_id, self.backend_of[b]) for b in cur.slots[:count]
                                         if b in self.backend_of)
                continue
            ids = []
            for be in state.backends:
                bid = self.backend_id.get(be)
                if bid is None:
                    bid = self.backend_ids.alloc()
                    self.backend_id[be] = bid
                    self.backend_of[bid] = be
                    self.refs[bid] = 0
                    new_backends.append((bid, be))
                ids.append(bid)
            old = cur.slots if cur else []
            old_count = cur.master.count if cur and cur.master else 0
            layout = stable_slots(old[:old_count], ids)
            if cur:
                stats.removed.update((cur.rev_nat_id, self.backend_of[b]) for b in set(old[:old_count]) - set(layout)
                                     if b in self.backend_of)
            rid = cur.rev_nat_id if cur and cur.rev_nat_id else 0
            if not rid:
                rid = self.revnat_ids.alloc()
                revnat_writes.append((rid, fe))
            for i, bid in enumerate(layout):
                if i >= len(old) or old[i] != bid or i >= old_count:
                    slot_writes.append((fe, i + 1, bid, rid))
            master = master_of(state, rid, len(layout))
            if cur is None or cur.master != master:
                master_writes.append((fe, master))
            for s in range(len(layout) + 1, len(old) + 1):
                trims.append((fe, s))
            layouts[fe] = Programmed(rid, layout, master)

        # 1..4: make before break.
        self.maps.write_backends(new_backends)
        stats.backends_written = len(new_backends)
        self.maps.write_slots(slot_writes)
        stats.slots_written = len(slot_writes)
        self.maps.write_revnat(revnat_writes)
        self.maps.write_masters(master_writes)
        stats.masters_written = len(master_writes)
        # Commit the new layouts (reference counts follow the slots the datapath can now read).
        for fe, prog in layouts.items():
            cur = self.have.get(fe)
            if cur and cur.master:
                for bid in cur.slots[:cur.master.count]:
                    self.refs[bid] -= 1
            for bid in prog.slots:
                self.refs[bid] = self.refs.get(bid, 0) + 1
            self.have[fe] = prog
        # 5. trim
        self.maps.delete_slots(trims)
        # 6. removals: master first, so the frontend disappears before its slots do.
        if removed:
            self.maps.delete_slots([(fe, 0) for fe in removed])
            self.maps.delete_slots([(fe, s) for fe in removed for s in range(1, len(self.have[fe].slots) + 1)])
            self.maps.delete_revnat([self.have[fe].rev_nat_id for fe in removed if self.have[fe].rev_nat_id])
            for fe in removed:
                prog = self.have.pop(fe)
                for bid in prog.slots[:prog.master.count if prog.master else 0]:
                    self.refs[bid] -= 1
                self.revnat_ids.release(prog.rev_nat_id)
        stats.deleted = len(trims) + len(removed)
        # 7. orphaned backends
        orphans = [bid for bid, n in self.refs.items() if n <= 0]
        if orphans:
            self.maps.delete_backends(orphans)
            for bid in orphans:
                del self.refs[bid]
                be = self.backend_of.pop(bid)
                if self.backend_id.get(be) == bid:
                    del self.backend_id[be]
                self.backend_ids.release(bid)
            stats.deleted += len(orphans)
        return stats
