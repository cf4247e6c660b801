"""Thin ctypes bindings to libbpf's low-level calls (map access by fd, pins, cgroup attachments).

libbpf (Debian's libbpf1, pulled in by python3-bpfcc) is used instead of bcc's table classes so that
map access needs no compiled program: the CLI and a restarted agent open maps by their pins.
libbpf >= 1.0 returns a negative errno; every failure here becomes an OSError with that errno.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

ENOTSUPP = 524  # kernel-internal "operation not supported" (no batch ops for a map type)
_NO_BATCH = (-errno.EINVAL, -ENOTSUPP, -errno.EOPNOTSUPP)

_lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

_c = ctypes.c_void_p


class _MapCreateOpts(ctypes.Structure):
    """libbpf's struct bpf_map_create_opts, up to map_flags (sz says how much of it is given)."""
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]
_u32p = ctypes.POINTER(ctypes.c_uint32)
for _name, _args in {
    "bpf_obj_get": [ctypes.c_char_p],
    "bpf_map_create": [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.POINTER(_MapCreateOpts)],
    "bpf_obj_pin": [ctypes.c_int, ctypes.c_char_p],
    "bpf_map_update_elem": [ctypes.c_int, _c, _c, ctypes.c_uint64],
    "bpf_map_lookup_elem": [ctypes.c_int, _c, _c],
    "bpf_map_delete_elem": [ctypes.c_int, _c],
    "bpf_map_get_next_key": [ctypes.c_int, _c, _c],
    "bpf_map_update_batch": [ctypes.c_int, _c, _c, _u32p, _c],
    "bpf_map_lookup_batch": [ctypes.c_int, _c, _c, _c, _c, _u32p, _c],
    "bpf_map_delete_batch": [ctypes.c_int, _c, _u32p, _c],
    "bpf_prog_query": [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, _u32p, _u32p, _u32p],
    "bpf_prog_get_fd_by_id": [ctypes.c_uint32],
    "bpf_obj_get_info_by_fd": [ctypes.c_int, _c, _u32p],
    "bpf_prog_detach2": [ctypes.c_int, ctypes.c_int, ctypes.c_int],
}.items():
    getattr(_lib, _name).argtypes = _args
    getattr(_lib, _name).restype = ctypes.c_int


def _errno(ret: int) -> int:
    return -ret if ret != -1 else ctypes.get_errno()


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = _errno(ret)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    """A new map (no BTF); its fd."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(_lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries,
                                      ctypes.byref(opts)), f"create map {name}")


def map_info(fd: int) -> dict[str, int]:
    """struct bpf_map_info's head: type, id, key_size, value_size, max_entries, map_flags."""
    info = ctypes.create_string_buffer(88)
    n = ctypes.c_uint32(88)
    _check(_lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(n)), "map info")
    fields = ("type", "id", "key_size", "value_size", "max_entries", "map_flags")
    return {f: ctypes.c_uint32.from_buffer(info, 4 * i).value for i, f in enumerate(fields)}


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pin {path}")


def update(fd: int, key: bytes, value: bytes) -> None:
    _check(_lib.bpf_map_update_elem(fd, key, value, 0), "map update")


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    ret = _lib.bpf_map_lookup_elem(fd, key, buf)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "map lookup")
    return buf.raw


def delete(fd: int, key: bytes) -> None:
    """Deleting a missing key is success."""
    ret = _lib.bpf_map_delete_elem(fd, key)
    if ret != -errno.ENOENT:
        _check(ret, "map delete")


class BatchError(OSError):
    """A batch write that failed after the kernel applied its first ``done`` items (in order)."""

    def __init__(self, err: int, what: str, done: int, count: int):
        super().__init__(err, f"{what}: {os.strerror(err)} ({done} of {count} applied)")
        self.done = done


def _applied(reported: int, count: int) -> int:
    """Items a failed batch applied. The kernel writes back how many it processed once it starts on
    the items; when it fails before (no batch op for the map type, bad flags) libbpf hands back the
    count we passed in, unchanged: nothing was applied."""
    return reported if reported < count else 0


def update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Update ``count`` packed keys/values in one syscall (kernel map batch ops). On failure raises
    BatchError with how many the kernel applied: it processes the items in order and reports that
    count back in attr.batch.count even when it stops with an error."""
    if not count:
        return
    n = ctypes.c_uint32(count)
    ret = _lib.bpf_map_update_batch(fd, keys, values, ctypes.byref(n), None)
    if ret == 0:
        return
    done = _applied(n.value, count)
    if ret not in _NO_BATCH:
        raise BatchError(_errno(ret), "map batch update", done, count)
    # No batch support for this map type on this kernel: one by one from there, same result.
    ks, vs = len(keys) // count, len(values) // count
    for i in range(done, count):
        r = _lib.bpf_map_update_elem(fd, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs], 0)
        if r < 0:
            raise BatchError(_errno(r), "map update", i, count)


def delete_batch(fd: int, keys: bytes, count: int, key_size: int) -> None:
    """Delete many keys; keys already missing are success (the kernel batch stops at the first
    missing key, so go on with single deletes from there). On failure raises BatchError with how
    many keys, from the first, are gone."""
    if not count:
        return
    n = ctypes.c_uint32(count)
    ret = _lib.bpf_map_delete_batch(fd, keys, ctypes.byref(n), None)
    if ret == 0:
        return
    for i in range(_applied(n.value, count), count):
        r = _lib.bpf_map_delete_elem(fd, keys[i * key_size:(i + 1) * key_size])
        if r < 0 and r != -errno.ENOENT:
            raise BatchError(_errno(r), "map delete", i, count)


def dump(fd: int, key_size: int, value_size: int, max_entries: int = 0) -> list[tuple[bytes, bytes]]:
    """Every (key, value) in the map, read in batches where the kernel allows it."""
    out: list[tuple[bytes, bytes]] = []
    chunk = 4096
    keys = ctypes.create_string_buffer(key_size * chunk)
    vals = ctypes.create_string_buffer(value_size * chunk)
    in_tok = ctypes.create_string_buffer(max(8, key_size))
    out_tok = ctypes.create_string_buffer(max(8, key_size))
    first = True
    while True:
        n = ctypes.c_uint32(chunk)
        ret = _lib.bpf_map_lookup_batch(fd, None if first else in_tok, out_tok, keys, vals, ctypes.byref(n), None)
        if ret < 0 and ret != -errno.ENOENT:
            if first and ret in _NO_BATCH:
                return _dump_iter(fd, key_size, value_size)
            _check(ret, "map batch lookup")
        kraw, vraw = keys.raw, vals.raw
        for i in range(n.value):
            out.append((kraw[i * key_size:(i + 1) * key_size], vraw[i * value_size:(i + 1) * value_size]))
        if ret == -errno.ENOENT:
            return out
        ctypes.memmove(in_tok, out_tok, len(out_tok))
        first = False


def _dump_iter(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    out = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while _lib.bpf_map_get_next_key(fd, cur, nxt) == 0:
        k = nxt.raw
        v = lookup(fd, k, value_size)
        if v is not None:
            out.append((k, v))
        cur = k
    return out


# ---- cgroup attachments -------------------------------------------------------------------------

def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    cnt = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    _check(_lib.bpf_prog_query(cgroup_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt)), "prog query")
    return list(ids[: cnt.value])


def prog_name(prog_id: int) -> tuple[int, str]:
    """(fd, name) of a loaded program by ID; the caller closes fd."""
    fd = _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"open program {prog_id}")
    info = ctypes.create_string_buffer(256)
    n = ctypes.c_uint32(256)
    _check(_lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(n)), "program info")
    # struct bpf_prog_info: char name[16] at offset 64 (stable uapi).
    return fd, info.raw[64:80].split(b"\0", 1)[0].decode()


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _check(_lib.bpf_prog_detach2(prog_fd, cgroup_fd, attach_type), "detach")


# ---- bpf_link: attachments that outlive the agent (pinned) and are replaced atomically ----------

for _name, _args in {
    "bpf_link_create": [ctypes.c_int, ctypes.c_int, ctypes.c_int, _c],
    "bpf_link_update": [ctypes.c_int, ctypes.c_int, _c],
}.items():
    getattr(_lib, _name).argtypes = _args
    getattr(_lib, _name).restype = ctypes.c_int


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(_lib.bpf_link_create(prog_fd, target_fd, attach_type, None), "link create")


def link_update(link_fd: int, prog_fd: int) -> None:
    _check(_lib.bpf_link_update(link_fd, prog_fd, None), "link update")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def link_info(link_fd: int) -> tuple[int, int, int, int]:
    """(link type, program ID, cgroup ID, attach type) of a link; the last two are a cgroup link's."""
    info = ctypes.create_string_buffer(64)
    n = ctypes.c_uint32(64)
    _check(_lib.bpf_obj_get_info_by_fd(link_fd, info, ctypes.byref(n)), "link info")
    # struct bpf_link_info: type, id, prog_id (u32 each); the union at offset 16: cgroup_id (u64), attach_type.
    ltype, prog_id = ctypes.c_uint32.from_buffer(info, 0).value, ctypes.c_uint32.from_buffer(info, 8).value
    return ltype, prog_id, ctypes.c_uint64.from_buffer(info, 16).value, ctypes.c_uint32.from_buffer(info, 24).value
