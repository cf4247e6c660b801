"""Reconcile: desired frontends vs what the kernel holds; idempotent, ordered, restartable.

Contract (as Cilium's reconciler): writing what is already there is a no-op, deleting what is
missing is success, and pruning is only done with the full desired set (``prune=True``), which the
caller only passes once every source has finished its initial list.

MAP WRITE ORDER (an invariant: the datapath reads master.count, then one slot in 1..count, then the
backend; every intermediate state it can observe must be a working service):
  0. removals        deleted frontends: master first, then slots, then reverse NAT (with any
                     reverse-NAT entry no master names). First, so the room they held is free
                     before new frontends take it: admission (lb/syncer.py) counts a replaced
                     Service's room as free, and a nearly full map never blocks on its own
                     leftovers. A deleted frontend is no other frontend's make-before-break.
  1. backends        new backends exist before any slot names them
  2. slots 1..N      surviving backends keep their slot; holes are filled (affinity relies on it)
  3. reverse NAT     before the frontend becomes visible, so replies are rewritten from the start
  4. master (slot 0) count last: only now may the datapath read the new slots
  5. trim            slots N+1.. of a shrunk frontend, now unreachable
  6. orphans         backends no readable slot names any more
IDs (frontend reverse-NAT IDs, backend IDs) are restored from the maps on start, so a restarted
agent rewrites nothing that is already right.

STATE FOLLOWS THE KERNEL (Cilium: "any updates to state must happen only after the maps were
written"). The reconciler's view -- each frontend's master and slots, the backends, reference
counts, reverse-NAT entries, allocated IDs -- changes only after a write returned, and only by the
items the kernel applied: all of them, or the first ``MapWriteError.done`` of a batch that stopped
midway. IDs for new backends and frontends are tentative until written; a failed sync gives back
those it did not write. So a failed write at any step stops the sync there (the order above holds
for what was written), leaves the view equal to what the kernel holds (no restore() needed), and
keeps the frontends it had still to write owed: the next sync, whatever its scope, plans them again
against the view and writes only what is still missing. Backends no readable slot names
(``orphan_candidates``) and reverse-NAT entries no master names (``spare``) are noted as they
appear, so a sync's work follows its change, not the number of frontends programmed.
"""
from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Callable, Iterable, Sequence

from .maps.services import MapWriteError, Master, ServiceMaps
from .maps import structs as _structs
from .maps.structs import SVC_F_AFFINITY, SVC_F_DROP_EMPTY
from .model import Backend, Frontend, FrontendState

log = logging.getLogger("bpflb.reconcile")


@dataclass(slots=True)
class Programmed:
    """What the kernel holds for one frontend."""
    rev_nat_id: int  # the master's; 0 without a master
    slots: list[int]  # backend ID in slot i+1, readable (i < count) or not; 0: no entry
    master: Master | None

    @property
    def count(self) -> int:
        """Slots the datapath reads."""
        return self.master.count if self.master else 0


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
    """IDs from 1: released ones first (last released, first out), then the next never used.
    IDs taken by restored state are marked used."""

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

    def give_back(self, ids: Sequence[int]) -> None:
        """Return IDs allocated but never written, newest first: they are handed out again in the order
        they were first, so a retry programs the IDs a sync without the failure would have."""
        for i in reversed(ids):
            self.release(i)


# The north-south flags (docs: /work/issue10-contract.md), from lb/maps/structs.py once the tc
# datapath defines them there; the contract's values until then.
SVC_F_SNAT = getattr(_structs, "SVC_F_SNAT", 1 << 2)
SVC_F_SRC_RANGES = getattr(_structs, "SVC_F_SRC_RANGES", 1 << 3)
SVC_F_NODEPORT = getattr(_structs, "SVC_F_NODEPORT", 1 << 4)
SVC_F_EXT_LOCAL = _structs.SVC_F_EXT_LOCAL


def master_of(state: FrontendState, rev_nat_id: int, count: int) -> Master:
    flags = (SVC_F_DROP_EMPTY if state.drop_empty and count == 0 else 0) | \
        (SVC_F_AFFINITY if state.affinity_timeout else 0) | \
        (SVC_F_SNAT if state.snat else 0) | \
        (SVC_F_SRC_RANGES if state.src_ranges else 0) | \
        (SVC_F_NODEPORT if state.nodeport else 0) | \
        (SVC_F_EXT_LOCAL if state.ext_local else 0)
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


_frontend_order = attrgetter("ip", "port", "protocol", "scope")  # Frontend's own order, compared in C


def _write(write: Callable[[list], None], items: list, applied: Callable[[list], None]) -> None:
    """Write ``items``, then tell the view about those the kernel applied: all of them, or the first
    ``done`` of a write that failed midway. Any other error comes before the syscall: none applied."""
    if not items:
        return
    try:
        write(items)
    except MapWriteError as e:
        applied(items[:e.done])
        raise
    applied(items)


class Rows(SequenceABC):
    """A list of equal-length tuples held column by column: an ``array`` for each integer column (its
    typecode given), a list for each object column (None). Iterated, indexed and sliced as that list
    of tuples, which ServiceMaps' writes take. A first sync plans 100 000 slots at once: as tuples of
    a Frontend and three ints they took ~100 bytes a slot (~10 MiB at the sync's peak), here 24.
    (Backend IDs stay in lists: the view keeps the very int objects, where an array would make a new
    one per ID read, ~3 MiB more for each place holding 100 000 of them.)"""
    __slots__ = ("cols",)

    def __init__(self, *typecodes: str | None):
        self.cols = tuple(array(t) if t else [] for t in typecodes)

    def __len__(self) -> int:
        return len(self.cols[0])

    def __iter__(self):
        return zip(*self.cols)

    def __getitem__(self, i):
        if isinstance(i, slice):
            part = Rows.__new__(Rows)
            part.cols = tuple(c[i] for c in self.cols)
            return part
        return tuple(c[i] for c in self.cols)

    def append(self, row: tuple) -> None:
        for c, v in zip(self.cols, row):
            c.append(v)

    def __repr__(self) -> str:
        return f"Rows({list(self)!r})"


@dataclass
class Plan:
    """One sync's writes, by step of the MAP WRITE ORDER. IDs in it are tentative until written."""
    backends: Rows = field(default_factory=lambda: Rows(None, None))  # (ID, backend) new, in allocation order
    fresh: dict[Backend, int] = field(default_factory=dict)  # the same, by backend
    slots: Rows = field(default_factory=lambda: Rows(None, "I", None, "I"))  # (frontend, slot, backend, rev NAT)
    revnat: list[tuple[int, Frontend]] = field(default_factory=list)  # new reverse-NAT IDs, in allocation order
    masters: list[tuple[Frontend, Master]] = field(default_factory=list)
    trims: list[tuple[Frontend, int]] = field(default_factory=list)  # slots past a shrunk frontend's count
    removed: list[Frontend] = field(default_factory=list)
    dirty: list[Frontend] = field(default_factory=list)  # frontends with any write planned
    dropping: set[tuple[int, Backend]] = field(default_factory=set)  # (frontend ID, a readable backend it drops)
    dropped_by: dict[int, Frontend] = field(default_factory=dict)  # those frontends by ID
    complete: bool = False


class Reconciler:
    def __init__(self, maps: ServiceMaps, revnat_limit: int = 65535, backend_limit: int = (1 << 32) - 1):
        self.maps = maps
        # The view: what the kernel holds.
        self.have: dict[Frontend, Programmed] = {}
        self.backend_id: dict[Backend, int] = {}
        self.backend_of: dict[int, Backend] = {}
        self.refs: dict[int, int] = {}  # backend ID -> readable slots naming it; 0 for an unused backend
        self.orphan_candidates: set[int] = set()  # backends that may have refs 0: step 7 deletes those that do
        self.revnat: set[int] = set()  # reverse-NAT IDs
        # Reverse-NAT IDs no master names -> the frontend it was written for, or (restored) its address.
        self.spare: dict[int, Frontend | tuple[str, int]] = {}
        self.revnat_ids = IDAllocator(revnat_limit)
        self.backend_ids = IDAllocator(backend_limit)
        # Not the kernel's: what is still to do.
        self.owed: set[Frontend] = set()  # frontends a failed sync had still to write
        self.unreported: set[tuple[int, Backend]] = set()  # stopped using, in a failed sync: for stats.removed
        self.restore()

    # ---- restore from the kernel -----------------------------------------------------------
    def restore(self) -> None:
        """Adopt what the pinned maps hold: a restarted agent, or the periodic full resync (drift is
        then rewritten). A failed write needs none: the view already follows the kernel."""
        self.have.clear()
        self.backend_id.clear()
        self.backend_of.clear()
        refs = self.refs
        refs.clear()
        for bid, be in self.maps.dump_backends().items():
            self.backend_of[bid] = be
            self.backend_id.setdefault(be, bid)
            refs[bid] = 0
        for fe, (master, slots) in self.maps.dump_frontends().items():
            prog = Programmed(master.rev_nat_id if master else 0,
                              [slots.get(i, 0) for i in range(1, max(slots, default=0) + 1)], master)
            self.have[fe] = prog
            for bid in prog.slots[:prog.count]:
                if bid:
                    refs[bid] = refs.get(bid, 0) + 1
        self.orphan_candidates = {bid for bid, n in refs.items() if not n}
        revnat = self.maps.dump_revnat()
        self.revnat = set(revnat)
        named = {p.rev_nat_id for p in self.have.values() if p.rev_nat_id}
        self.spare = {rid: revnat[rid] for rid in sorted(self.revnat - named)}
        self.revnat_ids = IDAllocator(self.revnat_ids.limit)
        for rid in named | self.revnat:
            self.revnat_ids.take(rid)
        self.backend_ids = IDAllocator(self.backend_ids.limit)
        for bid in refs:
            self.backend_ids.take(bid)

    # ---- sync --------------------------------------------------------------------------------
    def sync(self, want: dict[Frontend, FrontendState], scope: Iterable[Frontend] | None = None,
             prune: bool = False) -> SyncStats:
        """Make the kernel match ``want`` for the frontends in ``scope`` (all of ``want`` if None) and
        those a failed sync left owed. With ``prune``, every programmed frontend missing from ``want``
        is removed too. A failed write raises, with the view equal to the kernel (see the top)."""
        todo = set(want) if scope is None else set(scope)
        todo |= self.owed
        if prune:
            todo.update(self.have)
        plan = Plan()
        try:
            self._plan(plan, want, todo)
            stats = self._write_plan(plan)
        except BaseException:
            # The view holds what was written; give back the IDs that were not, owe the rest.
            self.backend_ids.give_back([bid for bid, _ in plan.backends if bid not in self.backend_of])
            self.orphan_candidates.update(bid for bid, _ in plan.backends if bid in self.backend_of)
            self.revnat_ids.give_back([rid for rid, _ in plan.revnat if rid not in self.revnat])
            self.owed = set(plan.dirty) if plan.complete else self.owed | todo
            self._note_dropped(plan)
            raise
        self.owed = set()
        stats.removed = plan.dropping
        if self.unreported:
            stats.removed |= self.unreported
            self.unreported = set()
        return stats

    def _plan(self, plan: Plan, want: dict[Frontend, FrontendState], todo: set[Frontend]) -> None:
        """The writes that bring the frontends in ``todo`` from the view to ``want``: a diff, so a
        frontend half written by a failed sync gets only what it still lacks. IDs are tentative."""
        have, backend_id, backend_of = self.have, self.backend_id, self.backend_of
        alloc_backend, alloc_revnat = self.backend_ids.alloc, self.revnat_ids.alloc
        fresh = plan.fresh
        new_backends, slot_writes, revnat_writes, master_writes, trims, dirty, dropping = (
            plan.backends, plan.slots, plan.revnat, plan.masters, plan.trims, plan.dirty, plan.dropping)
        new_ids, new_backends_of = new_backends.cols
        slot_fe, slot_nr, slot_bid, slot_rid = slot_writes.cols
        claim = self._spare_claims() if self.spare else None
        known = backend_id.get if backend_id else None  # nothing programmed yet: look in fresh only
        for fe in sorted(todo, key=_frontend_order):
            state = want.get(fe)
            cur = have.get(fe)
            if state is None:
                if cur is not None:
                    plan.removed.append(fe)
                    dirty.append(fe)
                    if cur.count:
                        rid = cur.rev_nat_id
                        plan.dropped_by[rid] = fe
                        dropping.update((rid, backend_of[b]) for b in cur.slots[:cur.count] if b in backend_of)
                continue
            ids = []
            for be in state.backends:
                bid = known(be) if known else None
                if bid is None:
                    bid = fresh.get(be)
                    if bid is None:
                        bid = fresh[be] = alloc_backend()
                        new_ids.append(bid)
                        new_backends_of.append(be)
                ids.append(bid)
            writes = len(slot_writes) + len(revnat_writes) + len(master_writes) + len(trims)
            old, oc, rid = (cur.slots, cur.count, cur.rev_nat_id) if cur else ((), 0, 0)
            layout = stable_slots(old[:oc], ids) if oc else ids
            if oc:
                gone = set(old[:oc]).difference(layout)
                if gone:
                    plan.dropped_by[rid] = fe
                    dropping.update((rid, backend_of[b]) for b in gone if b in backend_of)
            if not rid:
                rid = claim(fe) if claim else 0
                if not rid:
                    rid = alloc_revnat()
                    revnat_writes.append((rid, fe))
            n_old = len(old)
            if n_old:
                for i, bid in enumerate(layout):  # a slot already holding its backend is not rewritten
                    if i >= n_old or old[i] != bid:
                        slot_writes.append((fe, i + 1, bid, rid))
            else:
                n = len(layout)
                slot_fe.extend(repeat(fe, n))
                slot_nr.extend(range(1, n + 1))
                slot_bid.extend(layout)
                slot_rid.extend(repeat(rid, n))
            master = master_of(state, rid, len(layout))
            if cur is None or cur.master != master:
                master_writes.append((fe, master))
            if n_old > len(layout):
                trims.extend([(fe, s) for s in range(len(layout) + 1, n_old + 1) if old[s - 1]])
            if len(slot_writes) + len(revnat_writes) + len(master_writes) + len(trims) > writes:
                dirty.append(fe)
        plan.complete = True

    def _write_plan(self, plan: Plan) -> SyncStats:
        """The plan's writes in the MAP WRITE ORDER; the view follows each as the kernel accepts it."""
        stats = SyncStats()
        maps, have = self.maps, self.have
        # 0. removals: master first, so the frontend disappears before its slots do; then every
        # reverse-NAT entry no master names (the removed frontends', and any a failed sync left).
        _write(maps.delete_slots, [(fe, 0) for fe in plan.removed if have[fe].master], self._masters_deleted)
        gone = [(fe, s) for fe in plan.removed if fe in have for s, bid in enumerate(have[fe].slots, 1) if bid]
        _write(maps.delete_slots, gone, lambda done: self._removed_slots_deleted(done, len(gone), plan.removed))
        claimed = {m.rev_nat_id for _, m in plan.masters}  # spare entries this plan names again
        _write(maps.delete_revnat, sorted(set(self.spare) - claimed), self._revnat_deleted)
        # 1..4: make before break.
        _write(maps.write_backends, plan.backends, lambda done: self._backends_written(done, plan.fresh))
        stats.backends_written = len(plan.backends)
        _write(maps.write_slots, plan.slots, self._slots_written)
        stats.slots_written = len(plan.slots)
        _write(maps.write_revnat, plan.revnat, self._revnat_written)
        _write(maps.write_masters, plan.masters, self._masters_written)
        stats.masters_written = len(plan.masters)
        # 5. trim
        _write(maps.delete_slots, plan.trims, self._slots_deleted)
        stats.deleted = len(plan.trims) + len(plan.removed)
        # 6. backends no readable slot names: the candidates that still have none and are still there
        refs = self.refs
        orphans = sorted(b for b in self.orphan_candidates if not refs.get(b, 1) and b in self.backend_of)
        _write(maps.delete_backends, orphans, self._backends_deleted)
        self.orphan_candidates = set()  # kept until now: a failed delete leaves them for the next sync
        stats.deleted += len(orphans)
        return stats

    def _spare_claims(self) -> Callable[[Frontend], int]:
        """Reverse-NAT entries no master names are reused by a frontend that needs an ID: the one
        written for it (a failed sync's), else one with its address (restored): no rewrite needed."""
        mine = {fe: rid for rid, fe in self.spare.items() if isinstance(fe, Frontend)}
        by_addr: dict[tuple[str, int], list[int]] = {}
        for rid, addr in sorted(self.spare.items()):
            if not isinstance(addr, Frontend):
                by_addr.setdefault(addr, []).append(rid)

        def claim(fe: Frontend) -> int:
            rid = mine.pop(fe, 0)
            if not rid:
                free = by_addr.get((fe.ip, fe.port))
                rid = free.pop(0) if free else 0
            return rid
        return claim

    def _note_dropped(self, plan: Plan) -> None:
        """After a failed sync: the backends a frontend did stop reading, for the next sync to report."""
        readable = {}
        for rid, fe in plan.dropped_by.items():
            prog = self.have.get(fe)
            readable[rid] = {self.backend_of.get(b) for b in prog.slots[:prog.count]} if prog else set()
        self.unreported.update((rid, be) for rid, be in plan.dropping if be not in readable[rid])

    # ---- the view follows what the kernel applied ------------------------------------------------
    def _unref(self, bids: Iterable[int]) -> None:
        """One readable slot fewer names each of ``bids`` (0: no entry)."""
        refs, backend_of = self.refs, self.backend_of
        for bid in bids:
            if not bid:
                continue
            n = refs[bid] - 1
            if n:
                refs[bid] = n
            elif bid in backend_of:
                refs[bid] = 0
                self.orphan_candidates.add(bid)
            else:  # a slot named a backend the map does not hold (drift): no longer
                del refs[bid]
                self.backend_ids.release(bid)

    def _backends_written(self, items: list[tuple[int, Backend]], fresh: dict[Backend, int]) -> None:
        """``fresh``: the sync's new backends (``items`` of them were written)."""
        if len(items) < len(fresh):
            self.backend_id.update((be, bid) for bid, be in items)
        elif len(fresh) > len(self.backend_id):  # the larger dict takes the smaller: no Backend hashed
            fresh.update(self.backend_id)        # again, and no second copy of a first sync's backends
            self.backend_id = fresh
        else:
            self.backend_id.update(fresh)
        self.backend_of.update(items)
        refs = self.refs
        for bid, _ in items:
            refs[bid] = 0  # orphan candidates only if the sync fails: it names them all

    def _slots_written(self, items: list[tuple[Frontend, int, int, int]]) -> None:
        have, refs = self.have, self.refs
        last = prog = None
        count = 0
        for fe, s, bid, _ in items:
            if fe is not last:
                last = fe
                prog = have.get(fe)
                if prog is None:
                    prog = have[fe] = Programmed(0, [], None)
                count = prog.count
            slots = prog.slots
            if s > len(slots):  # past the end: no one reads it yet
                if s > len(slots) + 1:
                    slots.extend([0] * (s - 1 - len(slots)))
                slots.append(bid)
                continue
            old = slots[s - 1]
            slots[s - 1] = bid
            if s <= count and old != bid:  # the datapath reads it at once
                refs[bid] += 1
                self._unref((old,))

    def _revnat_written(self, items: list[tuple[int, Frontend]]) -> None:
        for rid, fe in items:
            self.revnat.add(rid)
            self.spare[rid] = fe  # until its master names it

    def _masters_written(self, items: list[tuple[Frontend, Master]]) -> None:
        have, refs = self.have, self.refs
        for fe, m in items:
            prog = have.get(fe)
            if prog is None:  # a frontend without backends: no slots
                prog = have[fe] = Programmed(0, [], None)
            old, count, slots = prog.count, m.count, prog.slots
            for i in range(old, count):  # now readable
                refs[slots[i]] += 1
            if count < old:
                self._unref(prog.slots[count:old])
            if prog.rev_nat_id != m.rev_nat_id:
                if prog.rev_nat_id:
                    self._unnamed(prog.rev_nat_id, fe)
                self.spare.pop(m.rev_nat_id, None)
                prog.rev_nat_id = m.rev_nat_id
            prog.master = m

    def _masters_deleted(self, items: list[tuple[Frontend, int]]) -> None:
        have = self.have
        for fe, _ in items:
            prog = have[fe]
            self._unref(prog.slots[:prog.count])
            if prog.rev_nat_id:
                self._unnamed(prog.rev_nat_id, fe)
            prog.rev_nat_id, prog.master = 0, None
            if not prog.slots:
                del have[fe]

    def _unnamed(self, rid: int, fe: Frontend) -> None:
        """No master names reverse-NAT ID ``rid`` any more."""
        if rid in self.revnat:
            self.spare[rid] = fe
        else:
            self.revnat_ids.release(rid)

    def _slots_deleted(self, items: list[tuple[Frontend, int]]) -> None:
        have = self.have

        def tidy(fe: Frontend, prog: Programmed) -> None:
            slots = prog.slots
            while slots and not slots[-1]:
                slots.pop()
            if not slots and prog.master is None:
                del have[fe]

        last = prog = None
        count = 0
        for fe, s in items:
            if fe is not last:
                if prog is not None:
                    tidy(last, prog)
                last, prog = fe, have.get(fe)
                count = prog.count if prog else 0
            if prog is not None and s <= len(prog.slots):
                bid, prog.slots[s - 1] = prog.slots[s - 1], 0
                if s <= count:
                    self._unref((bid,))
        if prog is not None:
            tidy(last, prog)

    def _removed_slots_deleted(self, items: list[tuple[Frontend, int]], planned: int, removed: list[Frontend]) -> None:
        """The slots of removed frontends, their masters already deleted: when all ``planned`` went,
        so did the frontends."""
        if len(items) < planned:
            self._slots_deleted(items)
        else:
            for fe in removed:
                self.have.pop(fe, None)

    def _revnat_deleted(self, rids: list[int]) -> None:
        for rid in rids:
            self.revnat.discard(rid)
            self.spare.pop(rid, None)
            self.revnat_ids.release(rid)

    def _backends_deleted(self, bids: list[int]) -> None:
        backend_of, backend_id, refs, release = self.backend_of, self.backend_id, self.refs, self.backend_ids.release
        for bid in bids:
            be = backend_of.pop(bid, None)
            if be is not None:
                other = backend_id.pop(be, bid)
                if other != bid:  # the same address under another ID (drift): that one stays
                    backend_id[be] = other
            refs.pop(bid, None)
            release(bid)
