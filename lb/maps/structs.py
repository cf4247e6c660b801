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
SVC_F_SNAT = 1 << 2
SVC_F_SRC_RANGES = 1 << 3
SVC_F_NODEPORT = 1 << 4
SVC_F_EXT_LOCAL = 1 << 5
NODE_ADDR_F_NODEPORT = 1 << 0
NODE_ADDR_F_REMOTE = 1 << 1
CT_F_SNAT = 1 << 0
CT_F_LOCAL = 1 << 1
CT_F_REPLIED = 1 << 2
CT_F_CLOSING = 1 << 3
CT_F_NODEPORT = 1 << 4
CT_F_RST = 1 << 5
CT_F_ENDED = 1 << 6
DEV_F_PEER = 1 << 0
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


_A16 = ctypes.c_uint32 * 4  # a 16-byte address


class NodeAddrKey(ctypes.Structure):
    _fields_ = [("addr", _A16)]


class NodeAddr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32)]


class SrcRangeKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint32), ("addr", _A16)]


class SrcRange(ctypes.Structure):
    _fields_ = [("allow", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class ExtAffinityKey(ctypes.Structure):
    _fields_ = [("client", _A16), ("rev_nat_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class DevAddr(ctypes.Structure):
    _fields_ = [("v4", _A16), ("v6", _A16), ("flags", ctypes.c_uint32)]


class CtTuple(ctypes.Structure):
    _fields_ = [("saddr", _A16), ("daddr", _A16), ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class CtVal(ctypes.Structure):
    _fields_ = [("backend", _A16), ("nat_addr", _A16), ("backend_port", ctypes.c_uint16),
                ("nat_port", ctypes.c_uint16), ("backend_id", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint32),
                ("ifindex_in", ctypes.c_uint32), ("ifindex_out", ctypes.c_uint32), ("slot", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16),
                ("created_ns", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


class NatVal(ctypes.Structure):
    _fields_ = [("client", _A16), ("frontend", _A16), ("client_port", ctypes.c_uint16),
                ("frontend_port", ctypes.c_uint16), ("ifindex_in", ctypes.c_uint32), ("flags", ctypes.c_uint16),
                ("gen", ctypes.c_uint16), ("rev_nat_id", ctypes.c_uint32), ("last_ns", ctypes.c_uint64)]


_FMT = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}


def packer(cls: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct with the same layout as ``cls``. Address arrays become 16-byte strings."""
    fmt = "="
    offset = 0
    for name, ctype in cls._fields_:
        field = getattr(cls, name)
        if field.offset > offset:
            fmt += f"{field.offset - offset}x"
        if ctype is _A16 or name == "addr":
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
    kind: str = "hash"
    """The BPF_TABLE_PINNED type, as in bpf/ (tests/test_structs.py compares with what bcc creates)."""
    flags: int = 0
    """map_flags, as in bpf/."""


BPF_F_NO_PREALLOC = 1
# Map type numbers (uapi enum bpf_map_type) of the kinds used in bpf/.
MAP_TYPES = {"hash": 1, "array": 2, "lru_hash": 9, "lpm_trie": 11}

# Map name -> spec. Names carry the layout version.
MAPS = {
    f"lb_services_{MAP_VERSION}": MapSpec(SvcKey, SvcVal, "services", "SVC_MAP_SIZE"),
    f"lb_backends_{MAP_VERSION}": MapSpec(ctypes.c_uint32, Backend, "backends", "BACKEND_MAP_SIZE"),
    f"lb_revnat_{MAP_VERSION}": MapSpec(ctypes.c_uint32, RevNat, "revnat", "REVNAT_MAP_SIZE"),
    f"lb_sock_revnat_{MAP_VERSION}": MapSpec(SockKey, SockVal, "sock_revnat", "SOCK_REVNAT_SIZE", "lru_hash"),
    f"lb_affinity_{MAP_VERSION}": MapSpec(AffinityKey, AffinityVal, "affinity", "AFFINITY_MAP_SIZE", "lru_hash"),
    f"lb_endpoints_{MAP_VERSION}": MapSpec(EndpointKey, Endpoint, "endpoints", "ENDPOINT_MAP_SIZE"),
    f"lb_node_addrs_{MAP_VERSION}": MapSpec(NodeAddrKey, NodeAddr, "node_addrs", "NODE_ADDR_MAP_SIZE"),
    f"lb_src_ranges_{MAP_VERSION}": MapSpec(SrcRangeKey, SrcRange, "src_ranges", "SRC_RANGE_MAP_SIZE", "lpm_trie",
                                                    BPF_F_NO_PREALLOC),
    f"lb_ext_affinity_{MAP_VERSION}": MapSpec(ExtAffinityKey, AffinityVal, "ext_affinity", "EXT_AFFINITY_MAP_SIZE",
                                                      "lru_hash"),
    f"lb_ct_{MAP_VERSION}": MapSpec(CtTuple, CtVal, "ct", "CT_MAP_SIZE", "lru_hash"),
    f"lb_nat_{MAP_VERSION}": MapSpec(CtTuple, NatVal, "nat", "NAT_MAP_SIZE", "lru_hash"),
}
(SERVICES_MAP, BACKENDS_MAP, REVNAT_MAP, SOCK_REVNAT_MAP, AFFINITY_MAP, ENDPOINTS_MAP, NODE_ADDRS_MAP, SRC_RANGES_MAP,
 EXT_AFFINITY_MAP, CT_MAP, NAT_MAP) = MAPS
DEV_ADDRS_MAP = f"lb_dev_addrs_{MAP_VERSION}"  # written by the loader only (lb/datapath.py); fixed size
DEV_ADDRS_SIZE = 1024
# bpf/sock_lb.c's array of connected sockets' peers, indexed by cookie % SOCK_REVNAT_SIZE (sized by
# MapSizes.sock_revnat, as lb_sock_revnat is); its value is struct lb_sock_peer, which starts with the
# owning socket's cookie (tests/test_structs.py checks both).
SOCK_PEER_MAP = f"lb_sock_peer_{MAP_VERSION}"
SOCK_PEER_SIZE = 48
# The maps bpf/lb_maps.h declares, which both programs share: the agent creates them before it starts
# the two loader children (lb/maps/pinned.create_shared_maps), so they compile at once without racing
# to create them, and it programs them while they compile. bcc then opens these pins.
SHARED_MAPS = tuple(n for n in MAPS if n != SOCK_REVNAT_MAP) + (DEV_ADDRS_MAP,)
