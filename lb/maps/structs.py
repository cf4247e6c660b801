"""Python mirrors of the structs in bpf/lb_structs.h (the one definition).

Reading or writing maps must not need a compiler (``bpflb service list`` runs without bcc), so the
layouts are mirrored here as ctypes structures; tests/test_structs.py compares every field's name,
size and offset with what bcc compiles from the header. Bulk packing uses ``struct.Struct`` formats
derived from the same ctypes fields, so there is one list of fields on this side too.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

MAP_VERSION = "v1"

# Flags and scopes, as in lb_structs.h.
SVC_F_DROP_EMPTY = 1 << 0
SVC_F_AFFINITY = 1 << 1
SCOPE_INTERNAL = 0
SCOPE_EXTERNAL = 1


class SvcKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("scope", ctypes.c_uint8), ("slot", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class SvcVal(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint32), ("count", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("affinity_timeout", ctypes.c_uint32)]


class Backend(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("flags", ctypes.c_uint8)]


class RevNat(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class SockKey(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64), ("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16 * 3)]


class SockVal(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("rev_nat_id", ctypes.c_uint32)]


class AffinityKey(ctypes.Structure):
    _fields_ = [("client", ctypes.c_uint64), ("rev_nat_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class AffinityVal(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("slot", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("last_used_ns", ctypes.c_uint64)]


class EndpointKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4)]


class Endpoint(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("mac", ctypes.c_uint8 * 6), ("flags", ctypes.c_uint16)]


_FMT = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}


def packer(cls: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct with the same layout as ``cls``. Address arrays become 16-byte strings."""
    fmt = "="
    offset = 0
    for name, ctype in cls._fields_:
        field = getattr(cls, name)
        if field.offset > offset:
            fmt += f"{field.offset - offset}x"
        if name == "addr":
            fmt += "16s"
        elif issubclass(ctype, ctypes.Array):
            fmt += f"{ctype._length_}{_FMT[ctype._type_]}"
        else:
            fmt += _FMT[ctype]
        offset = field.offset + field.size
    if ctypes.sizeof(cls) > offset:
        fmt += f"{ctypes.sizeof(cls) - offset}x"
    packed = struct.Struct(fmt)
    assert packed.size == ctypes.sizeof(cls), (cls.__name__, fmt)
    return packed


@dataclass(frozen=True)
class MapSpec:
    """One pinned map: its key and value layouts, and what sizes it."""
    key: type
    value: type
    size: str
    """The MapSizes field giving max_entries (settings.MAP_SIZE_FLAGS[size] is its flag)."""
    macro: str
    """The C macro bpf/sock_lb.c sizes the map with (lb/datapath.py passes it as -D<macro>=N)."""


# Map name -> spec. Names carry the layout version.
MAPS = {
    f"lb_services_{MAP_VERSION}": MapSpec(SvcKey, SvcVal, "services", "SVC_MAP_SIZE"),
    f"lb_backends_{MAP_VERSION}": MapSpec(ctypes.c_uint32, Backend, "backends", "BACKEND_MAP_SIZE"),
    f"lb_revnat_{MAP_VERSION}": MapSpec(ctypes.c_uint32, RevNat, "revnat", "REVNAT_MAP_SIZE"),
    f"lb_sock_revnat_{MAP_VERSION}": MapSpec(SockKey, SockVal, "sock_revnat", "SOCK_REVNAT_SIZE"),
    f"lb_affinity_{MAP_VERSION}": MapSpec(AffinityKey, AffinityVal, "affinity", "AFFINITY_MAP_SIZE"),
    f"lb_endpoints_{MAP_VERSION}": MapSpec(EndpointKey, Endpoint, "endpoints", "ENDPOINT_MAP_SIZE"),
}
SERVICES_MAP, BACKENDS_MAP, REVNAT_MAP, SOCK_REVNAT_MAP, AFFINITY_MAP, ENDPOINTS_MAP = MAPS
