"""One map opened by its pin under the bpffs root (no compiler needed): the base of the map classes."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass

from . import bpfsys
from .structs import (DEV_ADDRS_MAP, DEV_ADDRS_SIZE, MAP_TYPES, MAPS, SHARED_MAPS, SOCK_PEER_MAP, SOCK_PEER_SIZE,
                      SOCK_REVNAT_MAP, DevAddr)

log = logging.getLogger(__name__)


def create_shared_maps(bpf_root: str, sizes) -> list[str]:
    """Create and pin each of SHARED_MAPS that is not pinned yet, as bpf/lb_maps.h declares it
    (``sizes``: settings.MapSizes); the names created. A pin that exists is adopted (a restarted agent
    keeps its maps, and bcc opens these pins instead of creating its own) if it has the shape this agent
    would give it; one that differs (a size changed since it was made) is refitted: see refit()."""
    created = []
    for name in SHARED_MAPS:
        pin = os.path.join(bpf_root, name)
        if name == DEV_ADDRS_MAP:
            kind, key, value, entries, flags = "hash", ctypes.c_uint32, DevAddr, DEV_ADDRS_SIZE, 0
        else:
            spec = MAPS[name]
            kind, key, value, entries, flags = spec.kind, spec.key, spec.value, getattr(sizes, spec.size), spec.flags
        shape = MapShape(MAP_TYPES[kind], ctypes.sizeof(key), ctypes.sizeof(value), entries, flags)
        if os.path.exists(pin):
            refit(pin, shape)
            continue
        fd = bpfsys.map_create(shape.type, name, shape.key_size, shape.value_size, entries, flags)
        try:
            bpfsys.obj_pin(fd, pin)
        except FileExistsError:
            pass  # pinned meanwhile (another start): that one is the map
        finally:
            os.close(fd)
        created.append(name)
    # The socket program's own pinned maps sized by a setting: bcc creates them, and adopts a pin as it is.
    spec = MAPS[SOCK_REVNAT_MAP]
    entries = getattr(sizes, spec.size)
    for name, shape, rekey in (
            (SOCK_REVNAT_MAP, MapShape(MAP_TYPES[spec.kind], ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
                                       entries, spec.flags), None),
            (SOCK_PEER_MAP, MapShape(MAP_TYPES["array"], 4, SOCK_PEER_SIZE, entries, 0), _sock_peer_slots)):
        pin = os.path.join(bpf_root, name)
        if os.path.exists(pin):
            refit(pin, shape, rekey)
    return created


@dataclass(frozen=True)
class MapShape:
    """What BPF_MAP_CREATE was given, as bpf_map_info reports it back."""
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


def _sock_peer_slots(items: list[tuple[bytes, bytes]], entries: int) -> list[tuple[bytes, bytes]]:
    """lb_sock_peer's used slots at their index in an array of ``entries`` (bpf/sock_lb.c's peer_slot:
    cookie % SOCK_REVNAT_SIZE; struct lb_sock_peer starts with its cookie, 0 = free)."""
    out = {}
    for _, v in items:
        cookie = int.from_bytes(v[:8], "little")
        if cookie:
            out[cookie % entries] = v
    return [(idx.to_bytes(4, "little"), v) for idx, v in sorted(out.items())]


def refit(pin: str, want: MapShape, rekey=None) -> str | None:
    """Give the map pinned at ``pin`` the shape ``want`` if it has another one (a --*-map-size changed
    since it was made; the kernel cannot resize a map): a new map of that shape takes the pin's place in
    one rename, with as many of the old map's entries as it holds (``rekey(items, max_entries)`` first
    maps them to their new keys: an array indexed modulo its size). What changed, or None. The programs
    loaded after this open the new map; entries the old programs write until they are replaced are lost
    (flows that start in that moment), as under Cilium, which recreates a map whose properties changed."""
    fd = bpfsys.obj_get(pin)
    try:
        info = bpfsys.map_info(fd)
        have = MapShape(*(info[f] for f in ("type", "key_size", "value_size", "max_entries", "map_flags")))
        if have == want:
            return None
        same_layout = (have.type, have.key_size, have.value_size) == (want.type, want.key_size, want.value_size)
        items = bpfsys.dump(fd, have.key_size, have.value_size) if same_layout else []
    finally:
        os.close(fd)
    if rekey is not None:
        items = rekey(items, want.max_entries)
    name = os.path.basename(pin)
    new = bpfsys.map_create(want.type, name, want.key_size, want.value_size, want.max_entries, want.map_flags)
    try:
        copied = 0
        for k, v in items[:want.max_entries]:
            try:
                bpfsys.update(new, k, v)
            except OSError:
                break  # full (a map made smaller than its content): the rest are lost
            copied += 1
        tmp = pin + "_refit"  # (bpffs refuses names with a dot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a refit that died before its rename
        bpfsys.obj_pin(new, tmp)
        os.rename(tmp, pin)
    finally:
        os.close(new)
    changed = ", ".join(f"{f} {getattr(have, f)} -> {getattr(want, f)}" for f in MapShape.__dataclass_fields__
                        if getattr(have, f) != getattr(want, f))
    what = f"{name}: {changed}; {copied} of {len(items)} entries carried over"
    log.warning("pinned map refitted: %s", what)
    return what


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
