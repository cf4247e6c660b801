"""The Python mirrors in lb/maps/structs.py match, field by field, what bcc compiles from bpf/lb_structs.h."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import uuid

import pytest

from lb import datapath
from lb.maps import bpfsys
from lb.maps.pinned import MapShape, create_shared_maps, refit, refit_pins
from lb.maps.services import MapFullError
from lb.maps.structs import (SHARED_MAPS, CT_F_CLOSING, CT_F_LOCAL, CT_F_NODEPORT, CT_F_REPLIED, CT_F_RST, CT_F_SNAT,
                             CT_F_ENDED, DEV_ADDRS_MAP, DEV_F_PEER,
                             DEV_ADDRS_SIZE, MAPS, NODE_ADDR_F_NODEPORT, SOCK_PEER_MAP, SOCK_PEER_SIZE,
                             SOCK_REVNAT_MAP, SVC_F_EXT_LOCAL, SVC_F_NODEPORT,
                             SVC_F_SNAT, SVC_F_SRC_RANGES, CtTuple, DevAddr, NatVal, packer)
from lb.settings import MAP_SIZE_FLAGS, MapSizes, Paths

# A distinct size per map, so a macro passed to the wrong map shows.
SIZES = MapSizes(services=8, backends=9, revnat=10, sock_revnat=11, affinity=12, endpoints=13, node_addrs=14,
                 src_ranges=15, ext_affinity=16, ct=17, nat=18)


def sources() -> str:
    """Every map declaration: sock_lb.c's own and the shared ones (lb_maps.h, also read by tc_lb.c)."""
    return "".join((datapath.BPF_DIR / f).read_text() for f in ("lb_maps.h", "sock_lb.c"))


@pytest.fixture(scope="module")
def compiled():
    root = f"/sys/fs/bpf/bpflb-structs-{uuid.uuid4().hex[:6]}"
    b = datapath.compile_sock_lb(Paths(cgroup_root="/nonexistent", bpf_root=root), SIZES)
    b.bpflb_root = root
    try:
        yield b
    finally:
        b.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def layout(t):
    if not hasattr(t, "_fields_"):
        return ("scalar", ctypes.sizeof(t))
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


@pytest.mark.parametrize("name", sorted(MAPS))
def test_mirror_matches_compiled_layout(compiled, name):
    table = compiled[name.encode()]
    key, value = MAPS[name].key, MAPS[name].value
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(key)
    assert ctypes.sizeof(table.Leaf) == ctypes.sizeof(value)
    assert layout(table.Key) == layout(key)
    assert layout(table.Leaf) == layout(value)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_packers_have_the_struct_size(name):
    for t in (MAPS[name].key, MAPS[name].value):
        if hasattr(t, "_fields_"):
            assert packer(t).size == ctypes.sizeof(t)


def test_map_names_carry_the_header_version():
    header = (datapath.BPF_DIR / "lb_structs.h").read_text()
    version = header.split('#define LB_MAP_VERSION "')[1].split('"')[0]
    assert all(n.endswith("_" + version) for n in MAPS)
    src = sources()
    assert all(n in src for n in MAPS)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_each_map_is_sized_by_its_field(compiled, name):
    assert compiled[name.encode()].max_entries == getattr(SIZES, MAPS[name].size)


def test_every_size_field_sizes_one_map_and_has_a_flag():
    fields = [f.name for f in dataclasses.fields(MapSizes)]
    assert sorted(spec.size for spec in MAPS.values()) == sorted(fields)
    assert set(MAP_SIZE_FLAGS) == set(fields)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_the_c_declaration_uses_the_macro_the_loader_passes(name):
    src = sources()
    decl = re.search(rf"BPF_TABLE_PINNED\([^;]*\b{name}, (\w+),", src)
    assert decl and decl.group(1) == MAPS[name].macro
    assert f"-D{MAPS[name].macro}={getattr(SIZES, MAPS[name].size)}" in datapath.cflags(Paths(bpf_root="/x"), SIZES)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_a_full_map_names_the_flag_that_sizes_it(name):
    assert MAP_SIZE_FLAGS[MAPS[name].size] in str(MapFullError(name))


@pytest.fixture(scope="module")
def compiled_tc():
    root = f"/sys/fs/bpf/bpflb-structs-tc-{uuid.uuid4().hex[:6]}"
    b = datapath.compile_tc_lb(Paths(cgroup_root="/nonexistent", bpf_root=root), SIZES)
    try:
        yield b
    finally:
        b.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(n for n in MAPS if n != SOCK_REVNAT_MAP) + [DEV_ADDRS_MAP])
def test_tc_program_sees_the_same_layouts(compiled_tc, name):
    table = compiled_tc[name.encode()]
    if name == DEV_ADDRS_MAP:
        key, value, size = ctypes.c_uint32, DevAddr, DEV_ADDRS_SIZE
    else:
        key, value, size = MAPS[name].key, MAPS[name].value, getattr(SIZES, MAPS[name].size)
    assert layout(table.Key) == layout(key) and layout(table.Leaf) == layout(value)
    assert table.max_entries == size


def test_flags_match_the_header():
    header = (datapath.BPF_DIR / "lb_structs.h").read_text()
    for c, py in (("LB_SVC_F_SNAT", SVC_F_SNAT), ("LB_SVC_F_SRC_RANGES", SVC_F_SRC_RANGES),
                  ("LB_SVC_F_NODEPORT", SVC_F_NODEPORT), ("LB_SVC_F_EXT_LOCAL", SVC_F_EXT_LOCAL),
                  ("LB_CT_F_SNAT", CT_F_SNAT), ("LB_CT_F_LOCAL", CT_F_LOCAL),
                  ("LB_CT_F_REPLIED", CT_F_REPLIED), ("LB_CT_F_CLOSING", CT_F_CLOSING),
                  ("LB_CT_F_NODEPORT", CT_F_NODEPORT), ("LB_CT_F_RST", CT_F_RST), ("LB_CT_F_ENDED", CT_F_ENDED), ("LB_NODE_ADDR_F_NODEPORT", NODE_ADDR_F_NODEPORT),
                  ("LB_DEV_F_PEER", DEV_F_PEER)):
        m = re.search(rf"#define {c}\s+\(1 << (\d+)\)", header)
        assert m and 1 << int(m.group(1)) == py, c


def pinned_info(root: str, name: str) -> dict[str, int]:
    fd = bpfsys.obj_get(f"{root}/{name}")
    try:
        return bpfsys.map_info(fd)
    finally:
        os.close(fd)


def test_the_shared_maps_are_those_lb_maps_h_declares():
    declared = re.findall(r"BPF_TABLE_PINNED\([^;]*?\b(lb_\w+_v\d+), \w+, PIN", (datapath.BPF_DIR / "lb_maps.h").read_text())
    assert sorted(declared) == sorted(SHARED_MAPS)


@pytest.mark.parametrize("name", SHARED_MAPS)
def test_the_agent_creates_the_maps_bcc_would(compiled, name):
    """The agent creates the shared maps itself (so both programs compile at once, and it programs them
    meanwhile): type, key and value size, max_entries and flags as bcc makes them from the C declaration."""
    root = f"/sys/fs/bpf/bpflb-structs-agent-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    try:
        assert create_shared_maps(root, SIZES) == list(SHARED_MAPS)
        mine, bccs = pinned_info(root, name), pinned_info(compiled.bpflb_root, name)
        del mine["id"], bccs["id"]
        assert mine == bccs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_bcc_adopts_the_maps_the_agent_created():
    """What the agent wrote before the compile is what the programs read: bcc opens the pins."""
    root = f"/sys/fs/bpf/bpflb-structs-adopt-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    b = None
    try:
        create_shared_maps(root, SIZES)
        ids = {n: pinned_info(root, n)["id"] for n in SHARED_MAPS}
        assert create_shared_maps(root, SIZES) == []  # existing pins are kept
        b = datapath.compile_sock_lb(Paths(cgroup_root="/nonexistent", bpf_root=root), SIZES)
        for n in SHARED_MAPS:
            assert bpfsys.map_info(b[n.encode()].map_fd)["id"] == ids[n]
    finally:
        if b is not None:
            b.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_sock_peer_mirror(compiled):
    table = compiled[SOCK_PEER_MAP.encode()]
    assert ctypes.sizeof(table.Leaf) == SOCK_PEER_SIZE
    first = table.Leaf._fields_[0]
    assert first[0] == "cookie" and ctypes.sizeof(first[1]) == 8
    assert table.Leaf.cookie.offset == 0
    info = pinned_info(compiled.bpflb_root, SOCK_PEER_MAP)
    assert (info["type"], info["key_size"], info["max_entries"]) == (2, 4, SIZES.sock_revnat)


def _fill(fd: int, key_size: int, value_size: int, n: int) -> dict[bytes, bytes]:
    items = {i.to_bytes(key_size, "little"): bytes([i + 1]) * value_size for i in range(n)}
    for k, v in items.items():
        bpfsys.update(fd, k, v)
    return items


def test_a_pin_made_with_other_sizes_is_refitted_keeping_its_entries():
    """A map size setting changed since the pins were made (the kernel cannot resize a map): a restart
    used to adopt the old pin silently, so the setting never took effect. Each differing pin is replaced
    in one rename by a map of the new size holding the old entries (as many as fit); a matching one is
    kept as it is."""
    root = f"/sys/fs/bpf/bpflb-structs-refit-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    try:
        create_shared_maps(root, SIZES)
        ids = {n: pinned_info(root, n)["id"] for n in SHARED_MAPS}
        filled = {}
        for name, n in ((MAPS_BY_SIZE["ct"], 10), (MAPS_BY_SIZE["services"], 6)):
            fd = bpfsys.obj_get(f"{root}/{name}")
            try:
                info = bpfsys.map_info(fd)
                filled[name] = _fill(fd, info["key_size"], info["value_size"], n)
            finally:
                os.close(fd)
        bigger_ct_smaller_services = dataclasses.replace(SIZES, ct=40, services=4)
        assert create_shared_maps(root, bigger_ct_smaller_services) == []  # kept as they are
        assert {n: pinned_info(root, n)["id"] for n in SHARED_MAPS} == ids
        done = refit_pins(root, bigger_ct_smaller_services)
        assert sorted(done) == sorted([f"{MAPS_BY_SIZE['ct']}: max_entries 17 -> 40; 10 of 10 entries carried over",
                                       f"{MAPS_BY_SIZE['services']}: max_entries 8 -> 4; 4 of 6 entries carried over"])
        for name in SHARED_MAPS:
            info = pinned_info(root, name)
            if name in filled:
                assert info["id"] != ids[name]
                assert info["max_entries"] == {"ct": 40, "services": 4}[MAPS[name].size]
            else:
                assert info["id"] == ids[name], name  # unchanged: adopted
        fd = bpfsys.obj_get(f"{root}/{MAPS_BY_SIZE['ct']}")
        try:
            info = bpfsys.map_info(fd)
            assert dict(bpfsys.dump(fd, info["key_size"], info["value_size"])) == filled[MAPS_BY_SIZE["ct"]]
        finally:
            os.close(fd)
        fd = bpfsys.obj_get(f"{root}/{MAPS_BY_SIZE['services']}")
        try:
            info = bpfsys.map_info(fd)
            kept = dict(bpfsys.dump(fd, info["key_size"], info["value_size"]))
        finally:
            os.close(fd)
        assert len(kept) == 4 and kept.items() <= filled[MAPS_BY_SIZE["services"]].items()
        again = {n: pinned_info(root, n)["id"] for n in SHARED_MAPS}
        assert refit_pins(root, bigger_ct_smaller_services) == []  # refitted once
        assert {n: pinned_info(root, n)["id"] for n in SHARED_MAPS} == again
        assert not [f for f in os.listdir(root) if f.endswith("_refit")]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_refit_releases_the_lb_nat_entries_the_old_programs_held():
    """A refit copies lb_nat while the old programs still run: an entry one of them held at that moment
    (an odd gen, bpf/tc_lb.c nat_lock) would stay held in the new map for good, its port never taken over
    nor marked again. The copy carries every entry released (gen even), the rest of it as it was."""
    root = f"/sys/fs/bpf/bpflb-structs-natrefit-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    try:
        create_shared_maps(root, SIZES)
        name = MAPS_BY_SIZE["nat"]
        want = {}
        fd = bpfsys.obj_get(f"{root}/{name}")
        try:
            for port, gen in ((61000, 3), (61001, 4), (61002, 0)):
                key = CtTuple(sport=port, dport=8080, proto=6)
                val = NatVal(client_port=port, frontend_port=30080, flags=CT_F_SNAT | CT_F_CLOSING, gen=gen,
                             rev_nat_id=7, last_ns=port)
                bpfsys.update(fd, bytes(key), bytes(val))
                val.gen = gen & ~1
                want[bytes(key)] = bytes(val)
        finally:
            os.close(fd)
        assert refit_pins(root, dataclasses.replace(SIZES, nat=SIZES.nat * 2))
        fd = bpfsys.obj_get(f"{root}/{name}")
        try:
            got = dict(bpfsys.dump(fd, ctypes.sizeof(CtTuple), ctypes.sizeof(NatVal)))
        finally:
            os.close(fd)
        assert got == want
        assert NatVal.from_buffer_copy(got[bytes(CtTuple(sport=61000, dport=8080, proto=6))]).gen == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


MAPS_BY_SIZE = {spec.size: name for name, spec in MAPS.items()}


def test_the_socket_programs_maps_are_refitted_and_their_peers_reindexed():
    """lb_sock_revnat and lb_sock_peer (bcc creates them, sized by sock_revnat) are refitted the same way;
    a connected socket's peer slot moves to its index in the new array (cookie % size), so getpeername
    keeps answering for it; bcc then adopts the new pins."""
    root = f"/sys/fs/bpf/bpflb-structs-sockrefit-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    b = None
    try:
        create_shared_maps(root, SIZES)
        b = datapath.compile_sock_lb(Paths(cgroup_root="/nonexistent", bpf_root=root), SIZES)
        b.cleanup()
        b = None
        cookie = 1000003
        peer = cookie.to_bytes(8, "little") + bytes(range(1, SOCK_PEER_SIZE - 8 + 1))
        fd = bpfsys.obj_get(f"{root}/{SOCK_PEER_MAP}")
        try:
            bpfsys.update(fd, (cookie % SIZES.sock_revnat).to_bytes(4, "little"), peer)
        finally:
            os.close(fd)
        assert refit_pins(root, SIZES) == []  # what bcc made is what the agent wants: no refit at each start
        bigger = dataclasses.replace(SIZES, sock_revnat=29)
        assert len(refit_pins(root, bigger)) == 2
        for name in (SOCK_PEER_MAP, SOCK_REVNAT_MAP):
            assert pinned_info(root, name)["max_entries"] == 29
        fd = bpfsys.obj_get(f"{root}/{SOCK_PEER_MAP}")
        try:
            assert bpfsys.lookup(fd, (cookie % 29).to_bytes(4, "little"), SOCK_PEER_SIZE) == peer
            assert bpfsys.lookup(fd, (cookie % SIZES.sock_revnat).to_bytes(4, "little"), SOCK_PEER_SIZE) == \
                bytes(SOCK_PEER_SIZE)
        finally:
            os.close(fd)
        ids = {n: pinned_info(root, n)["id"] for n in (SOCK_PEER_MAP, SOCK_REVNAT_MAP)}
        b = datapath.compile_sock_lb(Paths(cgroup_root="/nonexistent", bpf_root=root), bigger)
        for n, i in ids.items():
            assert bpfsys.map_info(b[n.encode()].map_fd)["id"] == i
    finally:
        if b is not None:
            b.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_refit_of_a_pin_of_another_type_starts_empty():
    """A pin whose type or layout differs cannot lend its entries: the new map starts empty."""
    root = f"/sys/fs/bpf/bpflb-structs-refit-type-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    try:
        fd = bpfsys.map_create(1, "m", 4, 8, 8)
        try:
            bpfsys.update(fd, b"\1\0\0\0", b"x" * 8)
            bpfsys.obj_pin(fd, f"{root}/m")
        finally:
            os.close(fd)
        what = refit(f"{root}/m", MapShape(9, 4, 8, 8, 0))
        assert what == "m: type 1 -> 9; 0 of 0 entries carried over"
        info = pinned_info(root, "m")
        assert info["type"] == 9
        assert refit(f"{root}/m", MapShape(9, 4, 8, 8, 0)) is None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_refit_left_half_done_is_swept_at_the_next_start():
    """A start killed between pinning a refitted map and its rename leaves NAME_refit: the next start
    removes it (a full-size map no one uses) before refitting anything."""
    root = f"/sys/fs/bpf/bpflb-structs-refit-stale-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    try:
        create_shared_maps(root, SIZES)
        fd = bpfsys.map_create(1, "stale", 4, 4, 8)
        try:
            bpfsys.obj_pin(fd, f"{root}/{MAPS_BY_SIZE['ct']}_refit")
        finally:
            os.close(fd)
        assert refit_pins(root, SIZES) == []
        assert sorted(os.listdir(root)) == sorted(SHARED_MAPS)
    finally:
        shutil.rmtree(root, ignore_errors=True)
