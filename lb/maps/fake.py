"""In-memory ServiceMaps, beside the real one: for tests of reconcile, and to see what a sync writes.

FakeServiceMaps records every operation in order; FaultyServiceMaps fails a chosen call after applying
some of its items, as a full map or a failing syscall would. ``dump_text`` is the golden-text view the
tests compare against.
"""
from __future__ import annotations

from ..model import Backend, Frontend
from .services import MapFullError, MapWriteError, Master
from .structs import BACKENDS_MAP, REVNAT_MAP, SERVICES_MAP


class FakeServiceMaps:
    def __init__(self) -> None:
        self.masters: dict[Frontend, Master] = {}
        self.slots: dict[tuple[Frontend, int], tuple[int, int]] = {}
        self.backends: dict[int, Backend] = {}
        self.revnat: dict[int, Frontend] = {}
        self.ops: list[str] = []

    # reads
    def dump_frontends(self):
        out: dict[Frontend, tuple[Master | None, dict[int, int]]] = {fe: (m, {}) for fe, m in self.masters.items()}
        for (fe, slot), (bid, _) in self.slots.items():
            out.setdefault(fe, (None, {}))[1][slot] = bid
        return out

    def dump_backends(self):
        return dict(self.backends)

    def dump_revnat(self):
        return {rid: (fe.ip, fe.port) for rid, fe in self.revnat.items()}

    # writes
    def write_backends(self, items):
        for bid, be in items:
            self.ops.append(f"backend {bid}")
            self.backends[bid] = be

    def write_slots(self, items):
        for fe, slot, bid, rid in items:
            self.ops.append(f"slot {fe} {slot}")
            self.slots[(fe, slot)] = (bid, rid)

    def write_revnat(self, items):
        for rid, fe in items:
            self.ops.append(f"revnat {rid}")
            self.revnat[rid] = fe

    def write_masters(self, items):
        for fe, m in items:
            self.ops.append(f"master {fe}")
            self.masters[fe] = m

    def delete_slots(self, items):
        for fe, slot in items:
            self.ops.append(f"delete slot {fe} {slot}")
            if slot == 0:
                self.masters.pop(fe, None)
            else:
                self.slots.pop((fe, slot), None)

    def delete_revnat(self, ids):
        for rid in ids:
            self.ops.append(f"delete revnat {rid}")
            self.revnat.pop(rid, None)

    def delete_backends(self, ids):
        for bid in ids:
            self.ops.append(f"delete backend {bid}")
            self.backends.pop(bid, None)

    # views
    def resolve(self, fe: Frontend) -> list[Backend] | None:
        """What the datapath would see: backends in slots 1..count, or None if a slot or backend
        it could read is missing (the invariant the write order protects)."""
        m = self.masters.get(fe)
        if m is None:
            return []
        out = []
        for s in range(1, m.count + 1):
            bid = self.slots.get((fe, s), (None, 0))[0]
            if bid is None or bid not in self.backends:
                return None
            out.append(self.backends[bid])
        return out

    def dump_text(self) -> str:
        lines = []
        for fe in sorted(self.masters):
            m = self.masters[fe]
            lines.append(f"SVC {fe} slot=0 count={m.count} id={m.rev_nat_id} flags={m.flags} affinity={m.affinity_timeout}")
            for s in range(1, m.count + 1):
                bid = self.slots[(fe, s)][0]
                lines.append(f"SVC {fe} slot={s} backend={bid} {self.backends[bid]}")
        for rid in sorted(self.revnat):
            lines.append(f"REVNAT {rid} {self.revnat[rid]}")
        for bid in sorted(self.backends):
            lines.append(f"BACKEND {bid} {self.backends[bid]}/{self.backends[bid].protocol}")
        return "\n".join(lines)


class FaultyServiceMaps(FakeServiceMaps):
    """Fails the ``fail_at``-th write call (counting every write_* and delete_* call, from 1) after
    applying its first ``partial`` items, as a kernel batch that stopped midway: a full map
    (MapFullError) for a write, a failing syscall (MapWriteError) for a delete, either with
    ``done=partial``. ``calls`` counts the write calls so far, ``log`` lists them as (method, items)."""

    def __init__(self, fail_at: int = 0, partial: int = 0) -> None:
        super().__init__()
        self.fail_at, self.partial, self.calls = fail_at, partial, 0
        self.log: list[tuple[str, int]] = []

    def _maybe_fail(self, method: str, name: str, items, apply) -> None:
        self.calls += 1
        self.log.append((method, len(items)))
        if self.calls == self.fail_at and items:
            apply(items[: self.partial])
            if method.startswith("delete"):
                raise MapWriteError(name, f"deleting from BPF map {name}: injected failure", self.partial)
            raise MapFullError(name, self.partial)
        apply(items)

    def write_backends(self, items):
        self._maybe_fail("write_backends", BACKENDS_MAP, items, super().write_backends)

    def write_slots(self, items):
        self._maybe_fail("write_slots", SERVICES_MAP, items, super().write_slots)

    def write_revnat(self, items):
        self._maybe_fail("write_revnat", REVNAT_MAP, items, super().write_revnat)

    def write_masters(self, items):
        self._maybe_fail("write_masters", SERVICES_MAP, items, super().write_masters)

    def delete_slots(self, items):
        self._maybe_fail("delete_slots", SERVICES_MAP, items, super().delete_slots)

    def delete_revnat(self, ids):
        self._maybe_fail("delete_revnat", REVNAT_MAP, ids, super().delete_revnat)

    def delete_backends(self, ids):
        self._maybe_fail("delete_backends", BACKENDS_MAP, ids, super().delete_backends)
