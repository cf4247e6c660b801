"""Reconcile against the in-memory maps: golden dumps, the write order, idempotence, restore, faults."""
from __future__ import annotations

import copy
import re
import ctypes
import os
import sys
import textwrap
import uuid

import pytest

from lb.maps import bpfsys, services
from lb.maps.fake import FakeServiceMaps, FaultyServiceMaps
from lb.maps.services import MapFullError, MapWriteError, Master, PinnedServiceMaps
from lb.maps.structs import BACKENDS_MAP, MAPS, REVNAT_MAP, SERVICES_MAP
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


# ---- a failed write: the view stays the kernel's, the next sync does the rest -------------------------
def fe(n: int, port: int = 80, proto: str = "TCP") -> Frontend:
    return Frontend(f"10.96.1.{n}", port, proto)


# One realistic change, every kind of write in it: a frontend grows, one shrinks in place (a readable
# slot rewritten), one is removed (its backends orphaned, one shared), one keeps going untouched,
# new frontends come (with new, shared and no backends, and a TCP/UDP pair on one address).
BEFORE = {fe(1): state(11, 12, 13), fe(2): state(21), fe(3): state(31, 32), fe(4): state(32, 41),
          fe(7): state(71, 72, 73)}
AFTER = {fe(1): state(11, 12, 13, 14, 15), fe(2): state(22, 21, 23), fe(4): state(32, 41),
         fe(5): state(51, 52, 12), fe(6): FrontendState((), drop_empty=True), fe(7): state(73),
         fe(8, 53, "TCP"): FrontendState((Backend("10.200.1.81", 53, "TCP"),)),
         fe(8, 53, "UDP"): FrontendState((Backend("10.200.1.81", 53, "UDP"), Backend("10.200.1.82", 53, "UDP")))}


def view(r: Reconciler) -> dict:
    """Everything the reconciler believes the kernel holds."""
    return {"have": r.have, "backends": r.backend_of, "backend ids": r.backend_id, "refs": r.refs,
            "revnat": r.revnat, "spare": set(r.spare), "allocated revnat": r.revnat_ids.used,
            "allocated backends": r.backend_ids.used}


def assert_view_is_the_kernel(r: Reconciler, maps: FakeServiceMaps) -> None:
    assert view(r) == view(Reconciler(maps))  # a reconciler restored from the same maps
    assert {b for b, n in r.refs.items() if n == 0} <= r.orphan_candidates


def assert_datapath_works(maps: FakeServiceMaps, *wants: dict) -> None:
    """Every master the datapath can read names slots and backends that exist, of the old or new set."""
    for f in maps.masters:
        seen = maps.resolve(f)
        assert seen is not None, f
        allowed = {b for w in wants if f in w for b in w[f].backends}
        assert set(seen) <= allowed, f


def held(maps: FakeServiceMaps) -> tuple:
    """Every entry of every map, slots past a master's count included (dump_text shows only the
    readable ones): the golden dump plus nothing leaked. IDs are compared by what they name, not by
    number: removals come first in the write order, so a retry may reuse an ID a removal freed
    where the sync without the failure allocated a fresh one (both are right)."""
    masters = {fe: (m.count, m.flags, m.affinity_timeout, maps.revnat.get(m.rev_nat_id)) for fe, m in maps.masters.items()}
    slots = {(fe, s): (maps.backends.get(bid), maps.revnat.get(rid)) for (fe, s), (bid, rid) in maps.slots.items()}
    return masters, slots, sorted(maps.backends.values()), sorted(maps.revnat.values()), len(maps.revnat)


_NUMBERED = re.compile(r"^(backend|revnat|delete backend|delete revnat) \d+$")


def kinds(ops: list[str]) -> list[str]:
    """Ops with backend and reverse-NAT ID numbers left out (see held)."""
    return sorted(m.group(1) if (m := _NUMBERED.match(op)) else op for op in ops)


def reference_run() -> tuple[tuple, list[str], list[tuple[str, int]], set]:
    """The change without a failure: what the maps hold, the ops, the write calls, stats.removed."""
    maps = FaultyServiceMaps()
    r = Reconciler(maps)
    r.sync(BEFORE)
    maps.ops.clear()
    maps.log.clear()
    stats = r.sync(AFTER, prune=True)
    return held(maps), list(maps.ops), list(maps.log), stats.removed


GOLDEN, GOLDEN_OPS, CALLS, GOLDEN_REMOVED = reference_run()
FAULTS = [pytest.param(i, partial, id=f"call{i}-{method}-{partial}of{n}")
          for i, (method, n) in enumerate(CALLS, 1) for partial in range(n)]


def test_the_reference_change_writes_every_kind_of_call():
    assert [m for m, _ in CALLS] == ["delete_slots", "delete_slots", "delete_revnat", "write_backends",
                                     "write_slots", "write_revnat", "write_masters", "delete_slots",
                                     "delete_backends"]
    assert 0 not in {n for _, n in CALLS}  # no empty call: the call numbers mean steps


@pytest.mark.parametrize("call,partial", FAULTS)
def test_a_failed_write_leaves_the_view_equal_to_the_kernel_and_the_retry_does_the_rest(call, partial):
    maps = FaultyServiceMaps()
    r = Reconciler(maps)
    r.sync(BEFORE)
    maps.ops.clear()
    maps.calls, maps.fail_at, maps.partial = 0, call, partial
    with pytest.raises(MapWriteError) as e:
        r.sync(AFTER, prune=True)
    assert e.value.done == partial
    assert_datapath_works(maps, BEFORE, AFTER)
    assert_view_is_the_kernel(r, maps)  # no restore()
    restarted = copy.deepcopy(maps)  # the same kernel state, for an agent restarted now
    failed_ops = list(maps.ops)

    maps.fail_at = 0
    maps.ops.clear()
    stats = r.sync(AFTER, scope=())  # nothing new: only what the failed sync owes
    assert held(maps) == GOLDEN
    assert kinds(failed_ops + maps.ops) == kinds(GOLDEN_OPS)  # each write done once: the retry redid none
    assert len(maps.ops) == len(GOLDEN_OPS) - len(failed_ops)
    assert stats.removed == GOLDEN_REMOVED  # what the datapath stopped using, reported once it is done
    assert_view_is_the_kernel(r, maps)
    maps.ops.clear()
    assert r.sync(AFTER, scope=()).writes == 0 and maps.ops == [] and not r.owed

    Reconciler(restarted).sync(AFTER, prune=True)
    assert held(restarted) == GOLDEN


def test_a_sync_failing_at_every_attempt_still_converges_write_by_write():
    maps = FaultyServiceMaps()
    r = Reconciler(maps)
    r.sync(BEFORE)
    for attempt in range(len(GOLDEN_OPS) + 1):
        maps.calls, maps.fail_at, maps.partial = 0, 1, 1  # the first call of each sync applies one item, fails
        try:
            r.sync(AFTER, prune=attempt == 0, scope=None if attempt == 0 else ())
            break
        except MapWriteError:
            assert_datapath_works(maps, BEFORE, AFTER)
            assert_view_is_the_kernel(r, maps)
    else:
        pytest.fail("no progress")
    assert held(maps) == GOLDEN


@pytest.mark.parametrize("scope,prune", [(None, False), ((), False), (None, True)],
                         ids=["same-want", "empty-scope", "full-resync"])
def test_the_retry_after_a_failure_needs_no_restore_whatever_its_scope(scope, prune):
    maps = FaultyServiceMaps(fail_at=2, partial=3)  # slots: three written, then the map is full
    r = Reconciler(maps)
    with pytest.raises(MapFullError):
        r.sync(AFTER)
    assert r.owed == set(AFTER)
    maps.fail_at = 0
    r.sync(AFTER, scope=scope, prune=prune)
    reference = FakeServiceMaps()
    Reconciler(reference).sync(AFTER)
    assert maps.dump_text() == reference.dump_text() and not r.owed


def test_ids_of_a_sync_that_could_not_plan_are_given_back():
    maps = FakeServiceMaps()
    r = Reconciler(maps, revnat_limit=2)
    with pytest.raises(RuntimeError, match="no free ID"):
        r.sync({fe(1): state(11), fe(2): state(12), fe(3): state(13)})  # three frontends, two IDs
    assert maps.ops == [] and r.backend_ids.used == set() and r.revnat_ids.used == set()
    r.sync({fe(1): state(11), fe(2): state(12)})
    assert [m.rev_nat_id for m in maps.masters.values()] == [1, 2] and sorted(maps.backends) == [1, 2]


# ---- planning follows the change, not what is programmed ---------------------------------------------
def lines_run(fn) -> int:
    """Lines of lb/reconcile.py executed by fn(): loop iterations included, time not involved."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename.endswith("lb/reconcile.py"):
            if event == "line":
                count += 1
            return tracer
        return None
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def cost_of_a_small_change(unrelated: int) -> tuple[int, int]:
    """(lines run, map ops) of a sync of three frontends, with ``unrelated`` others programmed."""
    others = {Frontend(f"10.97.{i // 250}.{i % 250}", 80, "TCP"): state(100 + i % 50, 150 + i % 7)
              for i in range(unrelated)}
    maps = FakeServiceMaps()
    r = Reconciler(maps)
    r.sync({**BEFORE, **others})
    maps.ops.clear()
    want = {**BEFORE, fe(1): state(11, 14), fe(2): state(22), **others}  # shrink, replace
    del want[fe(3)]  # removed: backend 31 orphaned
    lines = lines_run(lambda: r.sync(want, scope=[fe(1), fe(2), fe(3)]))
    assert maps.resolve(fe(1)) == [be(11), be(14)] and maps.resolve(fe(2)) == [be(22)]
    assert fe(3) not in maps.masters and be(31) not in maps.backends.values()
    return lines, len(maps.ops)


def test_a_sync_of_a_few_frontends_costs_the_same_whatever_else_is_programmed():
    assert cost_of_a_small_change(0) == cost_of_a_small_change(50) == cost_of_a_small_change(500)


# ---- the real maps: a kernel batch that stops midway says how far it got ---------------------------
@pytest.fixture
def small_maps():
    """lb_services/lb_backends/lb_revnat as the kernel makes them, but tiny (the backends map holds 4),
    pinned under a directory of their own; removed afterwards."""
    lib = bpfsys._lib
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.c_uint32, ctypes.c_void_p]
    lib.bpf_map_create.restype = ctypes.c_int
    root = f"/sys/fs/bpf/bpflb-test-reconcile-{uuid.uuid4().hex[:8]}"
    os.mkdir(root)
    try:
        for name, entries in ((SERVICES_MAP, 64), (BACKENDS_MAP, 4), (REVNAT_MAP, 8)):
            k, v = MAPS[name].key, MAPS[name].value
            fd = bpfsys._check(lib.bpf_map_create(1, None, ctypes.sizeof(k), ctypes.sizeof(v), entries, None),
                               f"create {name}")  # 1: BPF_MAP_TYPE_HASH
            try:
                bpfsys.obj_pin(fd, os.path.join(root, name))
            finally:
                os.close(fd)
        maps = PinnedServiceMaps(root)
        yield maps
        maps.close()
    finally:
        for name in os.listdir(root):
            os.unlink(os.path.join(root, name))
        os.rmdir(root)


def pinned_view(maps: PinnedServiceMaps) -> tuple:
    return maps.dump_frontends(), maps.dump_backends(), maps.dump_revnat()


def test_a_full_kernel_map_stops_the_sync_with_the_view_equal_to_the_maps(small_maps):
    r = Reconciler(small_maps)
    with pytest.raises(MapFullError) as e:
        r.sync({FE: state(1, 2, 3, 4, 5, 6)})  # six backends, room for four
    assert e.value.done == 4 and "--" in str(e.value)
    assert sorted(small_maps.dump_backends()) == [1, 2, 3, 4] and small_maps.dump_frontends() == {}
    assert view(r) == view(Reconciler(small_maps))
    assert r.backend_ids.used == {1, 2, 3, 4}  # 5 and 6 were given back

    r.sync({FE: state(2, 3, 1)}, scope=())  # what was owed, with the want of now: fits
    fes, backends, revnat = pinned_view(small_maps)
    assert fes == {FE: (Master(1, 3, 0, 0), {1: 2, 2: 3, 3: 1})}
    assert backends == {1: be(1), 2: be(2), 3: be(3)} and revnat == {1: (FE.ip, FE.port)}  # 4: orphan, deleted
    assert view(r) == view(Reconciler(small_maps)) and not r.owed


@pytest.mark.parametrize("chunk", [1, 3], ids=["chunks-of-1", "full-in-the-second-chunk"])
def test_a_write_in_chunks_counts_what_every_chunk_applied(small_maps, monkeypatch, chunk):
    """Writes go to the kernel BATCH_ITEMS at a time: a full map in a later chunk reports the items
    of the chunks before it too, and the sync's view still equals the maps."""
    monkeypatch.setattr(services, "BATCH_ITEMS", chunk)
    r = Reconciler(small_maps)
    with pytest.raises(MapFullError) as e:
        r.sync({FE: state(1, 2, 3, 4, 5, 6)})  # six backends, room for four
    assert e.value.done == 4
    assert sorted(small_maps.dump_backends()) == [1, 2, 3, 4] and small_maps.dump_frontends() == {}
    assert view(r) == view(Reconciler(small_maps))
    r.sync({FE: state(2, 3, 1)}, scope=())
    assert view(r) == view(Reconciler(small_maps)) and not r.owed
    small_maps.delete_backends([1, 7, 3, 9])  # missing keys in other chunks are success too
    assert small_maps.dump_backends() == {2: be(2)}


def test_kernel_batch_deletes_of_present_and_missing_keys(small_maps):
    small_maps.write_backends([(1, be(1)), (2, be(2)), (3, be(3))])
    small_maps.delete_backends([1, 7, 3, 9])  # the kernel batch stops at 7: the rest one by one
    assert small_maps.dump_backends() == {2: be(2)}
