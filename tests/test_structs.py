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
from lb.maps.pinned import create_shared_maps
from lb.maps.services import MapFullError
from lb.maps.structs import (SHARED_MAPS, CT_F_CLOSING, CT_F_LOCAL, CT_F_NODEPORT, CT_F_REPLIED, CT_F_SNAT, DEV_ADDRS_MAP,
                             DEV_ADDRS_SIZE, MAPS, NODE_ADDR_F_NODEPORT, SOCK_REVNAT_MAP, SVC_F_EXT_LOCAL, SVC_F_NODEPORT,
                             SVC_F_SNAT, SVC_F_SRC_RANGES, DevAddr, packer)
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
                  ("LB_CT_F_NODEPORT", CT_F_NODEPORT), ("LB_NODE_ADDR_F_NODEPORT", NODE_ADDR_F_NODEPORT)):
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
