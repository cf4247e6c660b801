"""One map opened by its pin under the bpffs root (no compiler needed): the base of the map classes."""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

from . import bpfsys
from .structs import (DEV_ADDRS_MAP, DEV_ADDRS_SIZE, MAP_TYPES, MAPS, NAT_MAP, SHARED_MAPS, SOCK_PEER_MAP,
                      SOCK_PEER_SIZE, SOCK_REVNAT_MAP, DevAddr, NatVal)

log = logging.getLogger(__name__)


def _shapes(sizes) -> list[tuple[str, "MapShape", object]]:
    """(name, shape, rekey) of every pinned map a size setting decides: the shared ones as bpf/lb_maps.h
    declares them, and the socket program's own two (bcc creates those; they take the pins it finds)."""
    out = []
    for name in SHARED_MAPS:
        if name == DEV_ADDRS_MAP:
            kind, key, value, entries, flags = "hash", ctypes.c_uint32, DevAddr, DEV_ADDRS_SIZE, 0
        else:
            spec = MAPS[name]
            kind, key, value, entries, flags = spec.kind, spec.key, spec.value, getattr(sizes, spec.size), spec.flags
        out.append((name, MapShape(MAP_TYPES[kind], ctypes.sizeof(key), ctypes.sizeof(value), entries, flags),
                    _nat_released if name == NAT_MAP else None))
    spec = MAPS[SOCK_REVNAT_MAP]
    entries = getattr(sizes, spec.size)
    out.append((SOCK_REVNAT_MAP, MapShape(MAP_TYPES[spec.kind], ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
                                          entries, spec.flags), None))
    out.append((SOCK_PEER_MAP, MapShape(MAP_TYPES["array"], 4, SOCK_PEER_SIZE, entries, 0), _sock_peer_slots))
    return out


def create_shared_maps(bpf_root: str, sizes) -> list[str]:
    """Create and pin each of SHARED_MAPS that is not pinned yet, as bpf/lb_maps.h declares it
    (``sizes``: settings.MapSizes); the names created. A pin that exists is kept as it is (a restarted
    agent adopts its maps, and bcc opens these pins instead of creating its own): refit_pins() first
    gives those of another shape the one these sizes make."""
    created = []
    shared = set(SHARED_MAPS)
    for name, shape, _ in _shapes(sizes):
        pin = os.path.join(bpf_root, name)
        if name not in shared or os.path.exists(pin):
            continue
        fd = bpfsys.map_create(shape.type, name, shape.key_size, shape.value_size, shape.max_entries, shape.map_flags)
        try:
            bpfsys.obj_pin(fd, pin)
        except FileExistsError:
            pass  # pinned meanwhile (another start): that one is the map
        finally:
            os.close(fd)
        created.append(name)
    return created


def refit_pins(bpf_root: str, sizes) -> list[str]:
    """Refit (refit()) every pinned map whose shape differs from the one ``sizes`` make; what changed, per
    map. The programs attached before use the maps replaced: the caller must not adopt them
    (lb/datapath.prepare_maps drops their build marks). A refit left half done by a killed start is removed first."""
    for n in os.listdir(bpf_root) if os.path.isdir(bpf_root) else []:
        if n.endswith(REFIT_SUFFIX):
            os.unlink(os.path.join(bpf_root, n))
    done = []
    for name, shape, rekey in _shapes(sizes):
        pin = os.path.join(bpf_root, name)
        if os.path.exists(pin):
            what = refit(pin, shape, rekey)
            if what:
                done.append(what)
    return done


REFIT_SUFFIX = "_refit"  # the new map's pin until its rename (bpffs refuses names with a dot)


@dataclass(frozen=True)
class MapShape:
    """What BPF_MAP_CREATE was given, as bpf_map_info reports it back."""
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


def _nat_released(items: list[tuple[bytes, bytes]], entries: int) -> list[tuple[bytes, bytes]]:
    """lb_nat's entries as a refit copies them, each released: an entry the old programs held at the
    moment of the copy (an odd gen: bpf/tc_lb.c nat_lock) would stay held in the new map for good, and
    no flow could take its port over or mark it again."""
    out = []
    for k, v in items:
        gen = int.from_bytes(v[_NAT_GEN:_NAT_GEN + 2], "little") & ~1
        out.append((k, v[:_NAT_GEN] + gen.to_bytes(2, "little") + v[_NAT_GEN + 2:]))
    return out


_NAT_GEN = NatVal.gen.offset


def _sock_peer_slots(items: list[tuple[bytes, bytes]], entries: int) -> list[tuple[bytes, bytes]]:
    """lb_sock_peer's used slots at their index in an array of ``entries`` (bpf/sock_lb.c's peer_slot:
    cookie % SOCK_REVNAT_SIZE; struct lb_sock_peer starts with its cookie, 0 = free). Two sockets whose
    cookies meet at one index keep the later cookie's peer (the other's getpeername then shows the
    backend, as after any slot collision)."""
    out = {}
    for _, v in items:
        cookie = int.from_bytes(v[:8], "little")
        if cookie:
            out[cookie % entries] = v
    return [(idx.to_bytes(4, "little"), v) for idx, v in sorted(out.items())]


def refit(pin: str, want: MapShape, rekey=None) -> str | None:
    """Give the map pinned at ``pin`` the shape ``want`` if it has another one (a --*-map-size changed
    since it was made; the kernel cannot resize a map): a new map of that shape, filled with the old
    map's entries (``rekey(items, max_entries)`` first maps them to their new keys: an array indexed
    modulo its size), takes the pin's place in one rename. A smaller map keeps what fits (an LRU map its
    newest inserts). What changed, or None. On an error the old pin is left as it was.
    Entries the old programs write until they are replaced are not carried over (north-south connections
    that start in that moment lose their entries and are likely reset), as under Cilium, which recreates
    a map whose properties changed."""
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
    tmp = pin + REFIT_SUFFIX
    new = bpfsys.map_create(want.type, name, want.key_size, want.value_size, want.max_entries, want.map_flags)
    try:
        for k, v in items:
            try:
                bpfsys.update(new, k, v)
            except OSError:
                break  # full (a hash map made smaller than its content): the rest are lost
        kept = len(bpfsys.dump(new, want.key_size, want.value_size)) if items else 0
        if want.type == MAP_TYPES["array"]:
            kept = len(items)  # (an array's every index is there: count what was written)
        bpfsys.obj_pin(new, tmp)
        try:
            os.rename(tmp, pin)
        except OSError:
            os.unlink(tmp)
            raise
    finally:
        os.close(new)
    changed = ", ".join(f"{f} {getattr(have, f)} -> {getattr(want, f)}" for f in MapShape.__dataclass_fields__
                        if getattr(have, f) != getattr(want, f))
    what = f"{name}: {changed}; {kept} of {len(items)} entries carried over"
    log.warning("pinned map refitted (its size setting or its layout changed since it was made): %s", what)
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
