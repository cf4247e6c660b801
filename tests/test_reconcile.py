"""Reconcile against the in-memory maps: golden dumps, the write order, idempotence, restore, faults."""
from __future__ import annotations

import textwrap

import pytest

from lb.maps.fake import FakeServiceMaps, FaultyServiceMaps
from lb.maps.services import MapFullError
from lb.model import Backend, Frontend, FrontendState
from lb.reconcile import Reconciler, stable_slots

FE = Frontend("10.96.0.10", 80, "TCP")
FE6 = Frontend("fd00:96::10", 80, "TCP")


def be(n: int, port: int = 8080) -> Backend:
    return Backend(f"10.200.1.{n}", port, "TCP")


def state(*ns: int, **kw) -> FrontendState:
    return FrontendState(backends=tuple(be(n) for n in ns), **kw)


def test_golden_dump_of_a_first_sync():
    maps = FakeServiceMaps()
    Reconciler(maps).sync({FE: state(11, 12), FE6: FrontendState((Backend("fd00:201::11", 8080, "TCP"),)),
                           Frontend("10.96.0.11", 53, "UDP"): FrontendState((), drop_empty=True),
                           Frontend("10.96.0.12", 53, "UDP"): state(13, affinity_timeout=30)})
    assert maps.dump_text() == textwrap.dedent("""\
        SVC 10.96.0.10:80/TCP slot=0 count=2 id=1 flags=0 affinity=0
        SVC 10.96.0.10:80/TCP slot=1 backend=1 10.200.1.11:8080
        SVC 10.96.0.10:80/TCP slot=2 backend=2 10.200.1.12:8080
        SVC 10.96.0.11:53/UDP slot=0 count=0 id=2 flags=1 affinity=0
        SVC 10.96.0.12:53/UDP slot=0 count=1 id=3 flags=2 affinity=30
        SVC 10.96.0.12:53/UDP slot=1 backend=3 10.200.1.13:8080
        SVC [fd00:96::10]:80/TCP slot=0 count=1 id=4 flags=0 affinity=0
        SVC [fd00:96::10]:80/TCP slot=1 backend=4 [fd00:201::11]:8080
        REVNAT 1 10.96.0.10:80/TCP
        REVNAT 2 10.96.0.11:53/UDP
        REVNAT 3 10.96.0.12:53/UDP
        REVNAT 4 [fd00:96::10]:80/TCP
        BACKEND 1 10.200.1.11:8080/TCP
        BACKEND 2 10.200.1.12:8080/TCP
        BACKEND 3 10.200.1.13:8080/TCP
        BACKEND 4 [fd00:201::11]:8080/TCP""")


def test_write_order_is_make_before_break():
    maps = FakeServiceMaps()
    r = Reconciler(maps)
    r.sync({FE: state(11, 12, 13)})
    maps.ops.clear()
    r.sync({FE: state(14)})
    kinds = [op.split()[0] if not op.startswith("delete") else " ".join(op.split()[:2]) for op in maps.ops]
    assert kinds == ["backend", "slot", "master", "delete slot", "delete slot", "delete backend", "delete backend",
                     "delete backend"]
    assert maps.resolve(FE) == [be(14)]


def test_removal_deletes_master_before_slots_and_revnat():
    maps = FakeServiceMaps()
    r = Reconciler(maps)
    r.sync({FE: state(11, 12)})
    maps.ops.clear()
    r.sync({}, prune=True)
    assert maps.ops == ["delete slot 10.96.0.10:80/TCP 0", "delete slot 10.96.0.10:80/TCP 1",
                        "delete slot 10.96.0.10:80/TCP 2", "delete revnat 1", "delete backend 1", "delete backend 2"]
    assert maps.dump_text() == ""


def test_second_sync_and_restarted_agent_write_nothing():
    maps = FakeServiceMaps()
    want = {FE: state(11, 12), FE6: FrontendState((Backend("fd00:201::11", 8080, "TCP"),), affinity_timeout=5)}
    Reconciler(maps).sync(want)
    before = maps.dump_text()
    maps.ops.clear()
    assert Reconciler(maps).sync(want, prune=True).writes == 0  # a new agent adopting the maps
    assert maps.ops == [] and maps.dump_text() == before


def test_surviving_backends_keep_their_slot():
    maps = FakeServiceMaps()
    r = Reconciler(maps)
    r.sync({FE: state(11, 12, 13)})
    r.sync({FE: state(12, 13, 14)})
    slots = {s: maps.backends[maps.slots[(FE, s)][0]] for s in (1, 2, 3)}
    assert slots == {1: be(14), 2: be(12), 3: be(13)}


@pytest.mark.parametrize("old,new,want", [
    ([1, 2, 3], [2, 3, 4], [4, 2, 3]),
    ([1, 2, 3], [3], [3]),
    ([1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
    ([], [5, 6], [5, 6]),
    ([1, 2, 3, 4], [4, 1], [1, 4]),
], ids=["replace-first", "shrink-to-last", "grow", "new", "shrink-keep-first"])
def test_stable_slots(old, new, want):
    assert stable_slots(old, new) == want


def test_shared_backend_survives_while_another_frontend_uses_it():
    maps = FakeServiceMaps()
    r = Reconciler(maps)
    r.sync({FE: state(11), FE6: state(11)})
    assert len(maps.backends) == 1
    r.sync({FE6: state(11)}, prune=True)
    assert maps.resolve(FE6) == [be(11)] and len(maps.backends) == 1


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4], ids=["backends", "slots", "revnat", "masters"])
@pytest.mark.parametrize("partial", [0, 1])
def test_a_failing_write_never_breaks_what_was_programmed(fail_at, partial):
    """A full map at any step of an update: every slot an existing frontend exposes still names a
    live backend of the old or the new set (never a hole, never empty), and a retry converges."""
    maps = FaultyServiceMaps(fail_at=10**9)
    r = Reconciler(maps)
    r.sync({FE: state(11, 12)})
    maps.fail_at, maps.partial, maps.calls = fail_at, partial, 0
    want = {FE: state(13, 14, 15), FE6: state(16)}
    with pytest.raises(MapFullError) as e:
        r.sync(want)
    assert "--" in str(e.value)  # names the setting that sizes the map
    seen = maps.resolve(FE)
    assert seen and set(seen) <= {be(n) for n in (11, 12, 13, 14, 15)}
    assert maps.resolve(FE6) in ([], [be(16)])
    maps.fail_at = 10**9
    r.restore()
    r.sync(want, prune=True)
    assert maps.resolve(FE) == [be(13), be(14), be(15)] and maps.resolve(FE6) == [be(16)]
    assert set(maps.backends) == {bid for (fe, s), (bid, _) in maps.slots.items()}  # nothing leaked


def test_ids_are_reused_after_deletion_and_restored_after_restart():
    maps = FakeServiceMaps()
    r = Reconciler(maps)
    a, b, c = (Frontend(f"10.96.0.{n}", 80, "TCP") for n in (1, 2, 3))
    r.sync({a: state(11), b: state(12)})
    r.sync({a: state(11)}, prune=True)
    r2 = Reconciler(maps)  # restart
    r2.sync({a: state(11), c: state(13)})
    assert maps.masters[a].rev_nat_id == 1 and maps.masters[c].rev_nat_id == 2
