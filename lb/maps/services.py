"""The service maps: frontends (master entry + slots), backends, reverse NAT.

ServiceMaps is the interface reconcile programs against (a fake with the same methods stands in
tests); PinnedServiceMaps is the real one, opening the maps by their pins. Model values go in and
come out; packing and byte order live here (addresses, ports, protocols: addr.py) and nowhere else.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Protocol, Sequence

from ..model import Backend, Frontend
from ..settings import MAP_SIZE_FLAGS
from . import bpfsys
from .addr import PROTO_NUM, host_port, net_port, pack_ip, proto_name, unpack_ip
from .structs import BACKENDS_MAP, MAPS, REVNAT_MAP, SERVICES_MAP, Backend as CBackend, RevNat, SvcKey, SvcVal, packer

_KEY = packer(SvcKey)
_VAL = packer(SvcVal)
_BACKEND = packer(CBackend)
_REVNAT = packer(RevNat)
_U32 = struct.Struct("=I")

# Items per batch syscall (BPF_MAP_UPDATE_BATCH / DELETE_BATCH): only one chunk's packed keys and values
# exist at a time. (A first sync's 100 000 slots packed into one buffer held ~15 MiB at the sync's peak,
# in one list of bytes per key and value plus the joined copies; 8192 items cost 13 syscalls.)
BATCH_ITEMS = 8192

# Map name -> the flag that sizes it (named in "map is full" errors).
SIZE_SETTING = {name: MAP_SIZE_FLAGS[spec.size] for name, spec in MAPS.items()}


class MapWriteError(RuntimeError):
    """A write to map ``map`` failed after its first ``done`` items were applied (in the order given)."""

    def __init__(self, name: str, message: str, done: int = 0):
        super().__init__(message)
        self.map, self.done = name, done


class MapFullError(MapWriteError):
    def __init__(self, name: str, done: int = 0):
        super().__init__(name, f"BPF map {name} is full: raise {SIZE_SETTING.get(name, 'its size setting')} "
                               f"and restart the agent (bpflb cleanup first, the map size is fixed at creation)", done)


def pack_frontend(fe: Frontend, slot: int) -> bytes:
    return _KEY.pack(pack_ip(fe.ip), net_port(fe.port), PROTO_NUM[fe.protocol], fe.scope, slot, 0)


@dataclass(frozen=True)
class Master:
    """Slot 0 of a frontend."""
    rev_nat_id: int
    count: int
    flags: int
    affinity_timeout: int


class ServiceMaps(Protocol):
    """Writes apply their items in order; a failing one raises MapWriteError (MapFullError when the
    map is full) whose ``done`` says how many of the first items were applied."""
    def dump_frontends(self) -> dict[Frontend, tuple[Master | None, dict[int, int]]]: ...
    def dump_backends(self) -> dict[int, Backend]: ...
    def dump_revnat(self) -> dict[int, tuple[str, int]]: ...
    def write_backends(self, items: Sequence[tuple[int, Backend]]) -> None: ...
    def write_slots(self, items: Sequence[tuple[Frontend, int, int, int]]) -> None: ...
    def write_revnat(self, items: Sequence[tuple[int, Frontend]]) -> None: ...
    def write_masters(self, items: Sequence[tuple[Frontend, Master]]) -> None: ...
    def delete_slots(self, items: list[tuple[Frontend, int]]) -> None: ...
    def delete_revnat(self, ids: list[int]) -> None: ...
    def delete_backends(self, ids: list[int]) -> None: ...


class PinnedServiceMaps:
    """The real maps, opened from their pins under bpf_root."""

    def __init__(self, bpf_root: str):
        self.root = bpf_root
        self.fd = {}
        try:
            for name in (SERVICES_MAP, BACKENDS_MAP, REVNAT_MAP):
                self.fd[name] = bpfsys.obj_get(os.path.join(bpf_root, name))
        except OSError as e:
            self.close()
            raise FileNotFoundError(f"bpflb maps not found under {bpf_root} ({e.strerror}): "
                                    f"is the agent running with --bpf-root {bpf_root}?") from None

    def close(self) -> None:
        for fd in self.fd.values():
            os.close(fd)
        self.fd = {}

    def _chunks(self, name: str, items: Iterable, call: Callable[[int, list], None], deleting: bool = False) -> None:
        """``call(fd, chunk)`` for every BATCH_ITEMS items, in order. A failure's ``done`` counts the items
        applied in all chunks so far. An error before a syscall (packing) is raised as is while nothing
        was applied yet, else as a MapWriteError with that count: the caller's view needs it exact."""
        fd, done, it = self.fd[name], 0, iter(items)
        try:
            while chunk := list(islice(it, BATCH_ITEMS)):
                call(fd, chunk)
                done += len(chunk)
        except bpfsys.BatchError as e:
            if not deleting and e.errno in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC):
                raise MapFullError(name, done + e.done) from None
            raise MapWriteError(name, f"{'deleting from' if deleting else 'writing'} BPF map {name}: {e.strerror}",
                                done + e.done) from e
        except Exception as e:
            if not done:
                raise
            raise MapWriteError(name, f"{'deleting from' if deleting else 'writing'} BPF map {name}: {e}", done) from e

    def _batch(self, name: str, items: Iterable, pack: Callable[[list], tuple[bytes, bytes]]) -> None:
        """Update ``items``; ``pack(chunk)`` gives a chunk's keys and values, each joined."""
        self._chunks(name, items, lambda fd, chunk: bpfsys.update_batch(fd, *pack(chunk), len(chunk)))

    def _delete(self, name: str, items: Iterable, pack: Callable[[list], bytes], key_size: int) -> None:
        """Delete ``items`` (a missing key is success); ``pack(chunk)`` gives a chunk's keys, joined."""
        self._chunks(name, items, lambda fd, chunk: bpfsys.delete_batch(fd, pack(chunk), len(chunk), key_size),
                     deleting=True)

    # ---- reads ----
    def dump_frontends(self) -> dict[Frontend, tuple[Master | None, dict[int, int]]]:
        out: dict[Frontend, tuple[Master | None, dict[int, int]]] = {}
        for k, v in bpfsys.dump(self.fd[SERVICES_MAP], _KEY.size, _VAL.size):
            addr, dport, proto, scope, slot, _ = _KEY.unpack(k)
            backend_id, rev_nat_id, count, flags, timeout = _VAL.unpack(v)
            fe = Frontend(unpack_ip(addr), host_port(dport), proto_name(proto), scope)
            master, slots = out.get(fe, (None, {}))
            if slot == 0:
                master = Master(rev_nat_id, count, flags, timeout)
            else:
                slots[slot] = backend_id
            out[fe] = (master, slots)
        return out

    def dump_backends(self) -> dict[int, Backend]:
        out = {}
        for k, v in bpfsys.dump(self.fd[BACKENDS_MAP], 4, _BACKEND.size):
            addr, port, proto, _flags = _BACKEND.unpack(v)
            out[_U32.unpack(k)[0]] = Backend(unpack_ip(addr), host_port(port), proto_name(proto))
        return out

    def dump_revnat(self) -> dict[int, tuple[str, int]]:
        out = {}
        for k, v in bpfsys.dump(self.fd[REVNAT_MAP], 4, _REVNAT.size):
            addr, port, _ = _REVNAT.unpack(v)
            out[_U32.unpack(k)[0]] = (unpack_ip(addr), host_port(port))
        return out

    # ---- writes (reconcile decides the order; see reconcile.py) ----
    def write_backends(self, items: Sequence[tuple[int, Backend]]) -> None:
        self._batch(BACKENDS_MAP, items, lambda c: (
            b"".join([_U32.pack(i) for i, _ in c]),
            b"".join([_BACKEND.pack(pack_ip(b.ip), net_port(b.port), PROTO_NUM[b.protocol], 0) for _, b in c])))

    def write_slots(self, items: Sequence[tuple[Frontend, int, int, int]]) -> None:
        self._batch(SERVICES_MAP, items, lambda c: (
            b"".join([pack_frontend(fe, slot) for fe, slot, _, _ in c]),
            b"".join([_VAL.pack(bid, rid, 0, 0, 0) for _, _, bid, rid in c])))

    def write_revnat(self, items: Sequence[tuple[int, Frontend]]) -> None:
        self._batch(REVNAT_MAP, items, lambda c: (
            b"".join([_U32.pack(i) for i, _ in c]),
            b"".join([_REVNAT.pack(pack_ip(fe.ip), net_port(fe.port), 0) for _, fe in c])))

    def write_masters(self, items: Sequence[tuple[Frontend, Master]]) -> None:
        self._batch(SERVICES_MAP, items, lambda c: (
            b"".join([pack_frontend(fe, 0) for fe, _ in c]),
            b"".join([_VAL.pack(0, m.rev_nat_id, m.count, m.flags, m.affinity_timeout) for _, m in c])))

    def delete_slots(self, items: list[tuple[Frontend, int]]) -> None:
        self._delete(SERVICES_MAP, items, lambda c: b"".join([pack_frontend(fe, s) for fe, s in c]), _KEY.size)

    def delete_revnat(self, ids: list[int]) -> None:
        self._delete(REVNAT_MAP, ids, lambda c: b"".join([_U32.pack(i) for i in c]), 4)

    def delete_backends(self, ids: list[int]) -> None:
        self._delete(BACKENDS_MAP, ids, lambda c: b"".join([_U32.pack(i) for i in c]), 4)


def map_fill(bpf_root: str) -> dict[str, int]:
    """Entries per pinned map (for inspection and metrics)."""
    out = {}
    for name, spec in MAPS.items():
        try:
            fd = bpfsys.obj_get(os.path.join(bpf_root, name))
        except OSError:
            continue
        try:
            out[name] = len(bpfsys.dump(fd, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value)))
        finally:
            os.close(fd)
    return out
