"""The Python mirrors in lb/maps/structs.py match, field by field, what bcc compiles from bpf/lb_structs.h."""
from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import uuid

import pytest

from lb import datapath
from lb.maps.services import MapFullError
from lb.maps.structs import MAPS, packer
from lb.settings import MAP_SIZE_FLAGS, MapSizes, Paths

# A distinct size per map, so a macro passed to the wrong map shows.
SIZES = MapSizes(services=8, backends=9, revnat=10, sock_revnat=11, affinity=12, endpoints=13)


@pytest.fixture(scope="module")
def compiled():
    root = f"/sys/fs/bpf/bpflb-structs-{uuid.uuid4().hex[:6]}"
    b = datapath.compile_sock_lb(Paths(cgroup_root="/nonexistent", bpf_root=root), SIZES)
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
    src = (datapath.BPF_DIR / "sock_lb.c").read_text()
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
    src = (datapath.BPF_DIR / "sock_lb.c").read_text()
    decl = re.search(rf"BPF_TABLE_PINNED\([^;]*\b{name}, (\w+),", src)
    assert decl and decl.group(1) == MAPS[name].macro
    assert f"-D{MAPS[name].macro}={getattr(SIZES, MAPS[name].size)}" in datapath.cflags(Paths(bpf_root="/x"), SIZES)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_a_full_map_names_the_flag_that_sizes_it(name):
    assert MAP_SIZE_FLAGS[MAPS[name].size] in str(MapFullError(name))
