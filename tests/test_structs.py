"""The Python mirrors in lb/maps/structs.py match, field by field, what bcc compiles from bpf/lb_structs.h."""
from __future__ import annotations

import ctypes
import os
import shutil
import uuid

import pytest

from lb import datapath
from lb.maps.structs import MAPS, packer
from lb.settings import MapSizes, Paths


@pytest.fixture(scope="module")
def compiled():
    root = f"/sys/fs/bpf/bpflb-structs-{uuid.uuid4().hex[:6]}"
    b = datapath.compile_sock_lb(Paths(cgroup_root="/nonexistent", bpf_root=root),
                                 MapSizes(services=8, backends=8, revnat=8, sock_revnat=8, affinity=8))
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
    key, value = MAPS[name]
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(key)
    assert ctypes.sizeof(table.Leaf) == ctypes.sizeof(value)
    assert layout(table.Key) == layout(key)
    assert layout(table.Leaf) == layout(value)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_packers_have_the_struct_size(name):
    for t in MAPS[name]:
        if hasattr(t, "_fields_"):
            assert packer(t).size == ctypes.sizeof(t)


def test_map_names_carry_the_header_version():
    header = (datapath.BPF_DIR / "lb_structs.h").read_text()
    version = header.split('#define LB_MAP_VERSION "')[1].split('"')[0]
    assert all(n.endswith("_" + version) for n in MAPS)
    src = (datapath.BPF_DIR / "sock_lb.c").read_text()
    assert all(n in src for n in MAPS)
