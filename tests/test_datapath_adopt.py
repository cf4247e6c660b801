"""A restarted agent adopts the attached programs when they are this very build, and recompiles and
swaps them (BPF_LINK_UPDATE, same links) when the sources or the compiler flags changed.

Real kernel: the bed's cgroup and bpffs directory; "compiled or not" is read from the kernel (the
program ID behind each pinned link: a compile loads new programs, adopting keeps the old ones) and,
in-process, from a compiler that fails the test if it is called.
"""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import BE4, PORT, VIP4
from lb import datapath
from lb.maps import bpfsys
from lb.maps.services import PinnedServiceMaps
from lb.model import TCP, Backend, Frontend, FrontendState
from lb.reconcile import Reconciler
from lb.settings import MapSizes, Paths

SIZES = MapSizes(services=64, backends=64, revnat=64, sock_revnat=64, affinity=64, endpoints=64)


def link_programs(paths: Paths) -> dict[str, tuple[int, int]]:
    """Hook -> (link ID, program ID) of every pinned link."""
    out = {}
    for h in datapath.HOOKS:
        fd = bpfsys.obj_get(os.path.join(paths.bpf_root, datapath.LINKS_DIR, h.func))
        try:
            info = bpfsys.link_info(fd)
            out[h.func] = (link_id(fd), info[1])
        finally:
            os.close(fd)
    return out


def link_id(fd: int) -> int:
    import ctypes

    info = ctypes.create_string_buffer(64)
    n = ctypes.c_uint32(64)
    assert bpfsys._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(n)) == 0
    return ctypes.c_uint32.from_buffer(info, 4).value


def serves_the_vip(bed) -> None:
    """A ClusterIP programmed now is translated (new connections) and looks like the VIP."""
    maps = PinnedServiceMaps(bed.bpf_root)
    try:
        Reconciler(maps, revnat_limit=SIZES.revnat).sync(
            {Frontend(VIP4, 80, TCP): FrontendState((Backend(BE4[0], PORT, TCP),), service="demo/web")}, prune=True)
    finally:
        maps.close()
    r = bed.run_client(f"{VIP4}:80", "--count", "5")
    assert r["errors"] == {} and r["answered"] == {f"{BE4[0]}:{PORT}": 5} and r["peers"] == {f"{VIP4}:80": 5}


@pytest.fixture
def paths(bed):
    return Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)


@pytest.fixture
def bpf_copy(tmp_path, monkeypatch):
    """bpf/ copied, so a test may change a source without touching the tree."""
    d = tmp_path / "bpf"
    shutil.copytree(datapath.BPF_DIR, d)
    monkeypatch.setattr(datapath, "BPF_DIR", d)
    return d


def test_attach_types_match_bcc():
    import bcc

    for h in datapath.HOOKS:
        assert datapath.ATTACH_TYPES[h.attach] == int(getattr(bcc.BPFAttachType, h.attach)), h.attach


def test_restart_in_the_child_with_unchanged_programs_loads_nothing_new(bed, paths):
    bed.servers(BE4[:1], PORT, udp=False)
    assert datapath.attach_in_child(paths, SIZES) == []
    first = link_programs(paths)
    assert datapath.adoptable(paths, SIZES)
    assert datapath.attach_in_child(paths, SIZES) == []  # as the agent starts after a restart
    assert link_programs(paths) == first  # same links, same programs: nothing was loaded
    serves_the_vip(bed)


def test_unchanged_build_is_adopted_without_the_compiler(bed, paths, monkeypatch):
    bed.servers(BE4[:1], PORT, udp=False)
    datapath.attach(paths, SIZES)
    first = link_programs(paths)
    calls = []
    monkeypatch.setattr(datapath, "compile_sock_lb", lambda *a: calls.append(a))
    assert datapath.attach(paths, SIZES) == []
    assert calls == [] and link_programs(paths) == first
    serves_the_vip(bed)


@pytest.mark.parametrize("change", [
    pytest.param(lambda d, s: (d / "sock_lb.c").write_text((d / "sock_lb.c").read_text() + "\n/* changed */\n"),
                 id="source"),
    pytest.param(lambda d, s: (d / "lb_structs.h").write_text((d / "lb_structs.h").read_text() + "\n"), id="header"),
    pytest.param(lambda d, s: s.update(affinity=128), id="cflags-map-size"),
])
def test_changed_sources_or_flags_recompile_and_swap_in_the_same_links(bed, paths, bpf_copy, change):
    bed.servers(BE4[:1], PORT, udp=False)
    sizes = dict(vars(SIZES))
    datapath.attach(paths, MapSizes(**sizes))
    first = link_programs(paths)
    change(bpf_copy, sizes)
    assert not datapath.adoptable(paths, MapSizes(**sizes))
    assert datapath.attach(paths, MapSizes(**sizes)) == []
    second = link_programs(paths)
    for func, (link, prog) in first.items():
        assert second[func][0] == link  # the same link, updated in place: never an instant without a program
        assert second[func][1] != prog  # a new program
    assert datapath.adoptable(paths, MapSizes(**sizes))  # and the next start adopts it
    serves_the_vip(bed)


def test_a_missing_mark_or_link_means_recompile(bed, paths):
    datapath.attach(paths, SIZES)
    links = os.path.join(paths.bpf_root, datapath.LINKS_DIR)
    mark = next(n for n in os.listdir(links) if n.startswith(datapath.BUILD_MARK))
    os.rmdir(os.path.join(links, mark))  # as after a crash between swapping and marking
    assert not datapath.adoptable(paths, SIZES)
    datapath.attach(paths, SIZES)
    assert datapath.adoptable(paths, SIZES)
    os.unlink(os.path.join(links, "bpflb_send6"))  # one attachment gone (e.g. removed by hand)
    assert not datapath.adoptable(paths, SIZES)
    datapath.attach(paths, SIZES)
    assert datapath.adoptable(paths, SIZES) and "bpflb_send6" in datapath.attached(paths)


def test_cleanup_removes_the_build_mark(bed, paths):
    datapath.attach(paths, SIZES)
    removed = datapath.cleanup(paths)
    assert "link bpflb_conn4" in removed and "map lb_sock_peer_v1" in removed
    assert not os.path.exists(paths.bpf_root)


def test_a_size_change_refits_the_maps_and_the_programs_are_never_adopted_onto_the_old_ones(bed, paths):
    """The agent's start (datapath.prepare_maps, then attach) with a map size changed since the pins were
    made: the pin is refitted, and the attached build, though its flags match again after a rollback, is
    not adopted (its programs use the map the refit replaced, which no pin names any more). The sequence:
    start with sizes A, a start with B that dies before its compile, a start with A again."""
    bed.servers(BE4[:1], PORT, udp=False)
    a, b = SIZES, MapSizes(**{**vars(SIZES), "services": 128})
    assert datapath.prepare_maps(paths, a) == []
    datapath.attach(paths, a)
    first = link_programs(paths)
    assert datapath.adoptable(paths, a)
    assert len(datapath.prepare_maps(paths, b)) == 1  # lb_services 64 -> 128 ... and the start dies here
    assert len(datapath.prepare_maps(paths, a)) == 1  # back to 64: a third map
    assert not datapath.adoptable(paths, a)  # the mark is A's build, but its programs hold the first map
    assert datapath.attach(paths, a) == []
    assert all(link_programs(paths)[f][1] != prog for f, (_, prog) in first.items())  # compiled anew
    serves_the_vip(bed)  # written into the pinned maps, read by the programs
