"""One map opened by its pin under the bpffs root (no compiler needed): the base of the map classes."""
from __future__ import annotations

import ctypes
import os

from . import bpfsys
from .structs import DEV_ADDRS_MAP, DEV_ADDRS_SIZE, MAP_TYPES, MAPS, SHARED_MAPS, DevAddr


def create_shared_maps(bpf_root: str, sizes) -> list[str]:
    """Create and pin each of SHARED_MAPS that is not pinned yet, as bpf/lb_maps.h declares it
    (``sizes``: settings.MapSizes); the names created. A pin that exists is kept as it is: a restarted
    agent adopts its maps, and bcc opens these pins instead of creating its own."""
    created = []
    for name in SHARED_MAPS:
        pin = os.path.join(bpf_root, name)
        if os.path.exists(pin):
            continue
        if name == DEV_ADDRS_MAP:
            kind, key, value, entries, flags = "hash", ctypes.c_uint32, DevAddr, DEV_ADDRS_SIZE, 0
        else:
            spec = MAPS[name]
            kind, key, value, entries, flags = spec.kind, spec.key, spec.value, getattr(sizes, spec.size), spec.flags
        fd = bpfsys.map_create(MAP_TYPES[kind], name, ctypes.sizeof(key), ctypes.sizeof(value), entries, flags)
        try:
            bpfsys.obj_pin(fd, pin)
        except FileExistsError:
            pass  # pinned meanwhile (another start): that one is the map
        finally:
            os.close(fd)
        created.append(name)
    return created


class PinnedMap:
    """The map ``name`` pinned under ``bpf_root``; closing twice is harmless, and ``with`` closes it."""

    name: str  # set by each subclass: the pinned map's name (lb/maps/structs.py)

    def __init__(self, bpf_root: str):
        self.fd = bpfsys.obj_get(os.path.join(bpf_root, self.name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
