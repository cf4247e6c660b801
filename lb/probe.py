"""Kernel probe: compile and load the real programs and attach them to a scratch cgroup, hook by
hook; create each map type bpflb uses or will use; try batch operations. Nothing is inferred from
version numbers."""
from __future__ import annotations

import ctypes
import os
import tempfile
import uuid
from dataclasses import dataclass

from . import datapath
from .maps import bpfsys
from .settings import MapSizes, Paths


@dataclass(frozen=True)
class Result:
    feature: str
    ok: bool
    detail: str = ""
    required: bool = True


class _MapCreateOpts(ctypes.Structure):
    """libbpf's struct bpf_map_create_opts (libbpf 1.x)."""
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64), ("numa_node", ctypes.c_uint32),
                ("map_ifindex", ctypes.c_uint32)]


# enum bpf_map_type (uapi)
MAP_TYPES = {"hash": (1, 8, 8, 0, False), "lru_hash": (9, 8, 8, 0, True), "lpm_trie": (11, 8, 8, 1, False),
             "hash_of_maps": (12, 4, 4, 0, False), "ringbuf": (27, 0, 0, 0, False)}


def _map_create(kind: str) -> int:
    lib = bpfsys._lib
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.c_uint32, ctypes.c_void_p]
    lib.bpf_map_create.restype = ctypes.c_int
    mtype, ks, vs, flags, _ = MAP_TYPES[kind]
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts))
    entries = 4096 if kind == "ringbuf" else 16
    inner = -1
    if kind == "lpm_trie":
        opts.map_flags = 1  # BPF_F_NO_PREALLOC, required
    if kind == "hash_of_maps":
        inner = _map_create("hash")
        opts.inner_map_fd = inner
    try:
        return bpfsys._check(lib.bpf_map_create(mtype, kind.encode(), ks, vs, entries, ctypes.byref(opts)),
                             f"create {kind} map")
    finally:
        if inner >= 0:
            os.close(inner)


def probe(cgroup_parent: str) -> list[Result]:
    results: list[Result] = []
    for kind in MAP_TYPES:
        try:
            fd = _map_create(kind)
            if kind == "hash":
                keys = (ctypes.c_uint64 * 2)(1, 2)
                try:
                    bpfsys._check(bpfsys._lib.bpf_map_update_batch(fd, keys, keys, ctypes.byref(ctypes.c_uint32(2)), None),
                                  "batch update")
                    results.append(Result("map batch operations", True, required=False))
                except OSError as e:
                    results.append(Result("map batch operations", False, f"{e.strerror} (one-by-one fallback is used)", False))
            os.close(fd)
            results.append(Result(f"map type {kind}", True, required=kind in ("hash", "lru_hash")))
        except OSError as e:
            results.append(Result(f"map type {kind}", False, e.strerror, kind in ("hash", "lru_hash")))

    scratch = os.path.join(cgroup_parent, f"bpflb-probe-{uuid.uuid4().hex[:8]}")
    pins = tempfile.mkdtemp(prefix="bpflb-probe-", dir="/sys/fs/bpf") if os.path.isdir("/sys/fs/bpf") else None
    try:
        os.mkdir(scratch)
    except OSError as e:
        return results + [Result(f"cgroup {h.what}", False, f"cannot create scratch cgroup under {cgroup_parent}: {e.strerror}")
                          for h in datapath.HOOKS]
    cg = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if pins is None:
            raise datapath.DatapathError("bpffs is not mounted at /sys/fs/bpf")
        b = datapath.compile_sock_lb(Paths(cgroup_root=scratch, bpf_root=os.path.join(pins, "maps")),
                                     MapSizes(services=64, backends=64, revnat=64, sock_revnat=64, affinity=64))
        for h in datapath.HOOKS:
            try:
                fd = datapath.load_hook(b, h)
                link = bpfsys.link_create(fd, cg, datapath.attach_type(h))
                os.close(link)
                results.append(Result(f"cgroup {h.what}", True, required=h.required))
            except (datapath.DatapathError, OSError) as e:
                results.append(Result(f"cgroup {h.what}", False, str(e), required=h.required))
        b.cleanup()
    except datapath.DatapathError as e:
        results += [Result(f"cgroup {h.what}", False, str(e)) for h in datapath.HOOKS]
    finally:
        os.close(cg)
        os.rmdir(scratch)
        if pins:
            for dirpath, dirs, files in os.walk(pins, topdown=False):
                for f in files:
                    os.unlink(os.path.join(dirpath, f))
                os.rmdir(dirpath)
    results += _probe_tc(pins_root="/sys/fs/bpf")
    results += _probe_tc_xdp()
    return results


def _probe_tc(pins_root: str) -> list[Result]:
    """The real tc programs (bpf/tc_lb.c) loaded, and a tcx link on a scratch veth in a scratch network
    namespace. Required: a node without them serves no NodePort, LoadBalancer or ExternalIP."""
    import subprocess

    from . import netns

    out = []
    pins = tempfile.mkdtemp(prefix="bpflb-probe-tc-", dir=pins_root) if os.path.isdir(pins_root) else None
    ns = f"bpflb-probe-{uuid.uuid4().hex[:8]}"
    try:
        if pins is None:
            raise datapath.DatapathError("bpffs is not mounted at /sys/fs/bpf")
        import bcc

        b = datapath.compile_tc_lb(Paths(cgroup_root="/nonexistent", bpf_root=os.path.join(pins, "maps")),
                                   MapSizes(services=64, backends=64, revnat=64, sock_revnat=64, affinity=64,
                                            endpoints=64, node_addrs=8, src_ranges=8, ext_affinity=64, ct=64,
                                            nat=64))
        try:
            fds = {}
            for p in datapath.TC_PROGS:
                try:
                    fds[p.func] = b.load_func(p.func.encode(), bcc.BPF.SCHED_CLS).fd
                    out.append(Result(p.what, True))
                except Exception as e:
                    out.append(Result(p.what, False, str(e)))
            if fds:
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)

                def attach() -> None:
                    from pyroute2 import IPRoute

                    with IPRoute() as ipr:
                        ipr.link("add", ifname="probe0", kind="veth", peer="probe1")
                        idx = ipr.link_lookup(ifname="probe0")[0]
                    link = bpfsys.link_create(next(iter(fds.values())), idx, datapath.TCX_INGRESS)
                    os.close(link)
                try:
                    netns.run_in(f"/run/netns/{ns}", attach)
                    out.append(Result("tcx links (kernel 6.6+)", True))
                except OSError as e:
                    out.append(Result("tcx links (kernel 6.6+)", False, e.strerror or str(e)))
        finally:
            b.cleanup()
    except (datapath.DatapathError, subprocess.CalledProcessError, OSError) as e:
        out += [Result(p.what, False, str(e)) for p in datapath.TC_PROGS]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if pins:
            for dirpath, dirs, files in os.walk(pins, topdown=False):
                for f in files:
                    os.unlink(os.path.join(dirpath, f))
                os.rmdir(dirpath)
    return out


_TC_XDP = r"""
int tc_probe(struct __sk_buff *skb) { return 0; }
int xdp_probe(struct xdp_md *ctx) { return XDP_PASS; }
"""


def _probe_tc_xdp() -> list[Result]:
    import bcc

    out = []
    try:
        b = bcc.BPF(text=_TC_XDP)
    except Exception as e:
        return [Result("tc sched_cls", False, str(e), False), Result("XDP", False, str(e), False)]
    for name, ptype, what in (("tc_probe", bcc.BPF.SCHED_CLS, "tc sched_cls"),
                              ("xdp_probe", bcc.BPF.XDP, "XDP")):
        try:
            b.load_func(name.encode(), ptype)
            out.append(Result(what, True, required=False))
        except Exception as e:
            out.append(Result(what, False, str(e), required=False))
    b.cleanup()
    return out


def missing_required(results: list[Result]) -> list[Result]:
    return [r for r in results if r.required and not r.ok]
