"""The one loader of bpf/ programs: compile (bcc), load, attach, and remove.

Socket programs are attached to the cgroup with bpf_links pinned under ``<bpf-root>/links``:
the attachment survives the agent (SIGTERM or kill -9), a restarted agent swaps its freshly
loaded program in atomically with BPF_LINK_UPDATE (no instant without a program), other tools'
programs on the same cgroup keep running (links are multi-attach), and removing the pins is what
``bpflb cleanup`` does to detach.

A restarted agent whose programs did not change adopts the attached ones without compiling: next to
the link pins, ``links/build-<id>`` (an empty bpffs directory) names the build that is attached,
where the ID hashes everything that decides the programs (the bpf/ sources, the compiler flags, which
include the pin root and map sizes, the kernel release and the hook list). It is removed before any
link is swapped and written after every hook is attached, so a crash in between means "recompile".

tc programs (bpf/tc_lb.c, north-south traffic) attach the same way, by tcx bpf_links (kernel 6.6+),
pinned under ``<bpf-root>/tc``: ``ext_<ifindex>`` on the ingress of each external device (--devices),
``pod_<ifindex>`` on the ingress of each local pod's host veth (the ifindexes lb_endpoints holds).
The programs themselves are pinned there too (``prog_ext``, ``prog_pod``) with their own build mark,
so a restarted agent adopts them, and pod veths come and go (``sync_tc_endpoints``) without a compiler.
tcx needs no qdisc: bpflb adds none, and removing the pins detaches everything it attached, leaving
any other tc filter or qdisc on those devices as it was.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .maps import bpfsys
from .maps.pinned import create_shared_maps, refit_pins
from .maps.structs import DEV_ADDRS_MAP, MAPS, SOCK_PEER_MAP, SOCK_REVNAT_MAP
from .settings import ConntrackSettings, MapSizes, Paths

log = logging.getLogger("bpflb.datapath")

# bpf/ next to lb/ in a checkout (pip install -e); an installed image points at its copy.
BPF_DIR = Path(os.environ.get("BPFLB_BPF_DIR") or Path(__file__).resolve().parent.parent / "bpf")
LINKS_DIR = "links"
DATAPATH_MAPS = (SOCK_PEER_MAP, "lb_sock_peer_sk_v1", "lb_udp_flows_v1", DEV_ADDRS_MAP)  # pinned maps only the programs read (not in maps.structs.MAPS)
BUILD_MARK = "build-"  # + build ID (bpffs names may not contain a dot): the directory under LINKS_DIR naming the attached build
LINK_TYPE_CGROUP = 3  # enum bpf_link_type


@dataclass(frozen=True)
class Hook:
    func: str  # function in bpf/sock_lb.c (also the kernel's program name)
    attach: str  # bcc BPFAttachType member
    what: str
    prog_type: str = "CGROUP_SOCK_ADDR"  # bcc BPFProgType member
    required: bool = True  # strict mode refuses to start without it


HOOKS = (
    Hook("bpflb_conn4", "CGROUP_INET4_CONNECT", "connect4 (IPv4 TCP and connected UDP)"),
    Hook("bpflb_conn6", "CGROUP_INET6_CONNECT", "connect6 (IPv6 TCP and connected UDP)"),
    Hook("bpflb_send4", "CGROUP_UDP4_SENDMSG", "sendmsg4 (IPv4 unconnected UDP)"),
    Hook("bpflb_send6", "CGROUP_UDP6_SENDMSG", "sendmsg6 (IPv6 unconnected UDP)"),
    Hook("bpflb_recv4", "CGROUP_UDP4_RECVMSG", "recvmsg4 (IPv4 UDP reply source)"),
    Hook("bpflb_recv6", "CGROUP_UDP6_RECVMSG", "recvmsg6 (IPv6 UDP reply source)"),
    Hook("bpflb_peer4", "CGROUP_INET4_GETPEERNAME", "getpeername4"),
    Hook("bpflb_peer6", "CGROUP_INET6_GETPEERNAME", "getpeername6"),
    Hook("bpflb_release", "CGROUP_INET_SOCK_RELEASE", "sock_release (frees reverse-NAT entries; kernel >= 5.9)",
         prog_type="CGROUP_SOCK", required=False),
)


class DatapathError(RuntimeError):
    pass


def ensure_headers() -> None:
    """bcc compiles against /lib/modules/$(uname -r)/build; Debian's headers are for another kernel
    version, so the setup script links the installed ones. Say so clearly if that was skipped."""
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise DatapathError(f"kernel headers missing: {build} does not exist (run ./scripts/setup.sh, which installs "
                            f"linux-headers-amd64 and links /lib/modules/{os.uname().release})")


def _mount_of(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the mount holding ``path``."""
    best = ("/", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, parts[2])
    return best


def ensure_bpffs(root: str) -> None:
    root = os.path.abspath(root)
    mnt, fstype = _mount_of(root)
    if fstype != "bpf":
        if not root.startswith("/sys/fs/bpf/"):
            raise DatapathError(f"--bpf-root {root} is not on a bpffs mount")
        os.makedirs("/sys/fs/bpf", exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    os.makedirs(os.path.join(root, LINKS_DIR), exist_ok=True)


def cflags(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()) -> list[str]:
    """Include path, pin root, each map's size macro (lb/maps/structs.py MAPS says which field), and
    the UDP flow timeouts in nanoseconds."""
    return [f"-I{BPF_DIR}", f'-DPIN_ROOT="{paths.bpf_root}"',
            *(f"-D{spec.macro}={getattr(sizes, spec.size)}" for spec in MAPS.values()),
            f"-DUDP_TIMEOUT_NS={round(conntrack.udp_timeout * 1e9)}ULL",
            f"-DUDP_STREAM_TIMEOUT_NS={round(conntrack.udp_stream_timeout * 1e9)}ULL"]


def compile_bpf(source: str, paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()):
    """Compile bpf/<source> (bcc creates or reuses the pinned maps both programs share)."""
    import bcc  # imported here: only the loader child and the probe need a compiler

    ensure_headers()
    ensure_bpffs(paths.bpf_root)
    try:
        return bcc.BPF(src_file=str(BPF_DIR / source).encode(), cflags=cflags(paths, sizes, conntrack))
    except Exception as e:
        raise DatapathError(f"compiling bpf/{source} failed: {e}") from None


def compile_sock_lb(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()):
    return compile_bpf("sock_lb.c", paths, sizes, conntrack)


def load_hook(b, hook: Hook) -> int:
    import bcc

    try:
        fn = b.load_func(hook.func.encode(), getattr(bcc.BPFProgType, hook.prog_type),
                         attach_type=getattr(bcc.BPFAttachType, hook.attach))
    except Exception as e:
        raise DatapathError(f"kernel refused the {hook.what} program: {e}") from None
    return fn.fd


def load_hooks(b, hooks) -> list:
    """Each hook's program fd, or the DatapathError that refused it. The verifier (most of a load's
    time) runs in the bpf() syscall, which ctypes calls without the GIL: loads in threads run at once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(h: Hook):
        try:
            return load_hook(b, h)
        except DatapathError as e:
            return e

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, hooks))


# enum bpf_attach_type (uapi, stable) for the hooks' bcc member names: attachments are checked and
# removed without importing bcc. tests/test_datapath_adopt.py compares it with bcc's.
ATTACH_TYPES = {"CGROUP_INET4_CONNECT": 10, "CGROUP_INET6_CONNECT": 11, "CGROUP_UDP4_SENDMSG": 14,
                "CGROUP_UDP6_SENDMSG": 15, "CGROUP_UDP4_RECVMSG": 19, "CGROUP_UDP6_RECVMSG": 20,
                "CGROUP_INET4_GETPEERNAME": 29, "CGROUP_INET6_GETPEERNAME": 30, "CGROUP_INET_SOCK_RELEASE": 34}


def attach_type(hook: Hook) -> int:
    if hook.attach in ATTACH_TYPES:
        return ATTACH_TYPES[hook.attach]
    import bcc

    return int(getattr(bcc.BPFAttachType, hook.attach))


def build_id(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()) -> str:
    """What the attached programs were built from: equal IDs, equal programs."""
    h = hashlib.sha256()
    for f in sorted(BPF_DIR.iterdir()):
        if f.suffix in (".c", ".h"):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update("\0".join(cflags(paths, sizes, conntrack)).encode() + b"\0" + os.uname().release.encode())
    h.update(repr([(k.func, k.attach, k.prog_type) for k in HOOKS]).encode())
    return h.hexdigest()[:32]


def _marks(links: str) -> list[str]:
    return [n for n in os.listdir(links) if n.startswith(BUILD_MARK)] if os.path.isdir(links) else []


def _drop_marks(d: str) -> None:
    """No build is marked as attached under d any more: the next attach compiles, never adopts."""
    for mark in _marks(d):
        os.rmdir(os.path.join(d, mark))


def prepare_maps(paths: Paths, sizes: MapSizes) -> list[str]:
    """Before the programs load: refit the pinned maps whose size setting or layout changed (their attached
    programs then use maps no pin names any more: their build marks go, so the next attach compiles and
    swaps them, never adopts them), then create the shared maps not pinned yet. What was refitted."""
    ensure_bpffs(paths.bpf_root)
    refitted = refit_pins(paths.bpf_root, sizes)
    if refitted:
        for d in (os.path.join(paths.bpf_root, LINKS_DIR), _tc_dir(paths)):
            _drop_marks(d)
    create_shared_maps(paths.bpf_root, sizes)
    return refitted


def adoptable(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()) -> bool:
    """True if every hook's pinned link is alive, attached to this cgroup, runs our program of that name,
    and the attached build is the one these sources and flags would produce (nothing to compile)."""
    links = os.path.join(paths.bpf_root, LINKS_DIR)
    if _marks(links) != [BUILD_MARK + build_id(paths, sizes, conntrack)]:
        return False
    if not all(os.path.exists(os.path.join(paths.bpf_root, m)) for m in (*MAPS, *DATAPATH_MAPS)):
        return False
    try:
        cgroup_id = os.stat(paths.cgroup_root).st_ino
    except OSError:
        return False
    for h in HOOKS:
        try:
            fd = bpfsys.obj_get(os.path.join(links, h.func))
        except OSError:
            return False
        try:
            ltype, prog_id, cg, at = bpfsys.link_info(fd)
            if ltype != LINK_TYPE_CGROUP or cg != cgroup_id or at != attach_type(h) or prog_id == 0:
                return False
            pfd, name = bpfsys.prog_name(prog_id)
            os.close(pfd)
            if name != h.func[:15]:
                return False
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


def attach(paths: Paths, sizes: MapSizes, strict: bool = True,
           conntrack: ConntrackSettings = ConntrackSettings()) -> list[str]:
    """Load every socket program and attach it to the cgroup (or swap it into the pinned link).
    Strict: any program the kernel refuses stops everything before an attachment is touched.
    Not strict: the refused hooks are skipped and returned.
    If the attached programs are this very build (``adoptable``), they are kept and nothing is compiled."""
    if adoptable(paths, sizes, conntrack):
        log.info("attached programs are build %s: adopted, not recompiled", build_id(paths, sizes, conntrack))
        return []
    b = compile_sock_lb(paths, sizes, conntrack)
    progs = {}
    skipped = []
    for h, loaded in zip(HOOKS, load_hooks(b, HOOKS)):  # load all before touching attachments
        if isinstance(loaded, DatapathError):
            if strict and h.required:
                raise DatapathError(f"strict mode: {loaded}; refusing to start (--no-strict runs without it)") from None
            log.warning("%s; continuing without it (--no-strict)", loaded)
            skipped.append(h.what)
        else:
            progs[h.func] = loaded
    created = []
    try:
        cg = os.open(paths.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DatapathError(f"--cgroup-root {paths.cgroup_root}: {e.strerror}") from None
    links = os.path.join(paths.bpf_root, LINKS_DIR)
    _drop_marks(links)  # from here until the new mark, the attached build is unknown
    try:
        for h in HOOKS:
            if h.func not in progs:
                continue
            pin = os.path.join(paths.bpf_root, LINKS_DIR, h.func)
            if os.path.exists(pin):
                link = bpfsys.obj_get(pin)
                try:
                    bpfsys.link_update(link, progs[h.func])
                finally:
                    os.close(link)
                continue
            try:
                link = bpfsys.link_create(progs[h.func], cg, attach_type(h))
            except OSError as e:
                for p in created:  # all or nothing: undo this run's new attachments
                    os.unlink(p)
                raise DatapathError(f"attaching {h.what} to {paths.cgroup_root} failed: {e.strerror}") from None
            try:
                bpfsys.obj_pin(link, pin)
                created.append(pin)
            finally:
                os.close(link)
    finally:
        os.close(cg)
    # The programs stay alive through their links; the bcc object (and its fds) may now go.
    b.cleanup()
    if not skipped:  # a partial attachment is never adopted: the next start tries the missing hooks again
        os.mkdir(os.path.join(links, BUILD_MARK + build_id(paths, sizes, conntrack)))
    return skipped


def attached(paths: Paths) -> list[str]:
    d = os.path.join(paths.bpf_root, LINKS_DIR)
    return sorted(n for n in os.listdir(d) if not n.startswith(BUILD_MARK)) if os.path.isdir(d) else []


def cleanup(paths: Paths) -> list[str]:
    """Remove every attachment and pin bpflb made under these paths; returns what was removed."""
    removed = cleanup_tc(paths)
    links = os.path.join(paths.bpf_root, LINKS_DIR)
    if os.path.isdir(links):
        _drop_marks(links)
        for name in sorted(os.listdir(links)):
            os.unlink(os.path.join(links, name))  # last reference gone -> link detaches
            removed.append(f"link {name}")
        os.rmdir(links)
    # Legacy/foreign check: programs of ours attached without a link (none expected).
    try:
        cg = os.open(paths.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        cg = -1
    if cg >= 0:
        try:
            for h in HOOKS:
                try:
                    ids = bpfsys.prog_query(cg, attach_type(h))
                except (OSError, ImportError):
                    continue
                for pid in ids:
                    try:
                        fd, name = bpfsys.prog_name(pid)
                    except OSError:
                        continue
                    try:
                        if name == h.func[:15]:
                            try:
                                bpfsys.prog_detach(fd, cg, attach_type(h))
                                removed.append(f"attachment {name}")
                            except OSError as e:
                                if e.errno not in (errno.ENOENT, errno.EINVAL, errno.EPERM):
                                    raise
                    finally:
                        os.close(fd)
        finally:
            os.close(cg)
    if os.path.isdir(paths.bpf_root):
        for name in sorted(os.listdir(paths.bpf_root)):
            if name in MAPS or name.startswith("lb_"):
                os.unlink(os.path.join(paths.bpf_root, name))
                removed.append(f"map {name}")
        try:
            os.rmdir(paths.bpf_root)
        except OSError:
            pass
    return removed


# ---- tc (north-south) -----------------------------------------------------------------------------

TC_DIR = "tc"
LINK_TYPE_TCX = 11  # enum bpf_link_type
TCX_INGRESS = 46  # enum bpf_attach_type BPF_TCX_INGRESS (kernel 6.6+)


@dataclass(frozen=True)
class TcProg:
    func: str  # function in bpf/tc_lb.c
    pin: str  # program pin (and link-name prefix) under <bpf-root>/tc
    what: str


TC_PROGS = (
    TcProg("bpflb_tc_ext", "ext", "tc ingress of external devices (NodePort, LoadBalancer, ExternalIP)"),
    TcProg("bpflb_tc_pod", "pod", "tc ingress of pod veths (replies of translated flows)"),
)


def compile_tc_lb(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()):
    return compile_bpf("tc_lb.c", paths, sizes, conntrack)


def tc_build_id(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()) -> str:
    return hashlib.sha256((build_id(paths, sizes, conntrack) + repr(TC_PROGS)).encode()).hexdigest()[:32]


def _tc_dir(paths: Paths) -> str:
    return os.path.join(paths.bpf_root, TC_DIR)


def tcx_link_info(fd: int) -> tuple[int, int, int, int]:
    """(link type, program ID, ifindex, attach type) of a tcx link; ifindex 0 once its device is gone."""
    import ctypes

    info = ctypes.create_string_buffer(64)
    n = ctypes.c_uint32(64)
    bpfsys._check(bpfsys._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(n)), "link info")
    u32 = lambda off: ctypes.c_uint32.from_buffer(info, off).value  # noqa: E731
    return u32(0), u32(8), u32(16), u32(20)


def _prog_id(fd: int) -> int:
    import ctypes

    info = ctypes.create_string_buffer(256)
    n = ctypes.c_uint32(256)
    bpfsys._check(bpfsys._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(n)), "program info")
    return ctypes.c_uint32.from_buffer(info, 4).value  # struct bpf_prog_info: type, id


def _tc_progs_adoptable(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings) -> bool:
    d = _tc_dir(paths)
    if _marks(d) != [BUILD_MARK + tc_build_id(paths, sizes, conntrack)]:
        return False
    # The maps tc_lb.c declares (bpf/lb_maps.h): every shared one but the socket programs' own.
    tc_maps = [m for m in MAPS if m != SOCK_REVNAT_MAP] + [DEV_ADDRS_MAP]
    return all(os.path.exists(os.path.join(d, "prog_" + p.pin)) for p in TC_PROGS) and \
        all(os.path.exists(os.path.join(paths.bpf_root, m)) for m in tc_maps)


def _ifindex(ifname: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise DatapathError(f"--devices: no device {ifname} in this network namespace")
    return found[0]


def _tc_links(paths: Paths) -> dict[str, str]:
    """Link pin name -> path, of every tc link pinned under <bpf-root>/tc."""
    d = _tc_dir(paths)
    if not os.path.isdir(d):
        return {}
    return {n: os.path.join(d, n) for n in os.listdir(d)
            if any(n.startswith(p.pin + "_") for p in TC_PROGS)}


def _link_ok(pin: str, ifindex: int) -> tuple[bool, int]:
    """(alive on ifindex as a tcx ingress link, its program ID)."""
    try:
        fd = bpfsys.obj_get(pin)
    except OSError:
        return False, 0
    try:
        ltype, prog_id, ifi, at = tcx_link_info(fd)
        return ltype == LINK_TYPE_TCX and ifi == ifindex and at == TCX_INGRESS, prog_id
    except OSError:
        return False, 0
    finally:
        os.close(fd)


def _sync_tc_links(paths: Paths, want: dict[str, tuple[int, int]]) -> list[str]:
    """Make the pinned tc links exactly ``want`` (pin name -> (ifindex, program fd)): stale ones are
    removed (detached), live ones moved to the program given (BPF_LINK_UPDATE), missing ones created.
    Returns the pins that failed to attach, with the reason."""
    failed = []
    for name, pin in _tc_links(paths).items():
        if name not in want:
            os.unlink(pin)
    for name, (ifindex, prog_fd) in want.items():
        pin = os.path.join(_tc_dir(paths), name)
        ok, prog_id = _link_ok(pin, ifindex)
        if ok:
            if prog_id != _prog_id(prog_fd):
                link = bpfsys.obj_get(pin)
                try:
                    bpfsys.link_update(link, prog_fd)
                finally:
                    os.close(link)
            continue
        if os.path.exists(pin):
            os.unlink(pin)  # its device went away (or it is not ours): attach again
        try:
            link = bpfsys.link_create(prog_fd, ifindex, TCX_INGRESS)
        except OSError as e:
            failed.append(f"{name} (ifindex {ifindex}): tcx attach failed: {e.strerror} (kernel 6.6+ needed)")
            continue
        try:
            bpfsys.obj_pin(link, pin)
        finally:
            os.close(link)
    return failed


def _endpoint_ifindexes(paths: Paths) -> set[int]:
    from pyroute2 import IPRoute

    from .maps.endpoints import PinnedEndpointMap

    with PinnedEndpointMap(paths.bpf_root) as m:
        wanted = {ifindex for ifindex, _ in m.dump().values()}
    with IPRoute() as ipr:
        present = {link["index"] for link in ipr.get_links()}
    return wanted & present


PEER_KINDS = ("veth", "netkit")
"""Link kinds whose peer bpf_redirect_peer reaches (the kernel's ndo_get_peer_dev)."""


def peer_devices(ipr) -> set[int]:
    """ifindexes of the veth (netkit) devices whose peer is in another network namespace (the link
    carries IFLA_LINK_NETNSID): a tc ingress program may hand their packets straight to the peer. A
    peer in the same namespace is not reachable that way (the kernel drops such a redirect)."""
    out = set()
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        if (info is not None and info.get_attr("IFLA_INFO_KIND") in PEER_KINDS
                and link.get_attr("IFLA_LINK_NETNSID") is not None):
            out.add(link["index"])
    return out


def write_device_addrs(paths: Paths) -> dict[int, tuple[str, str, int]]:
    """lb_dev_addrs: each device's first global IPv4 and IPv6 address, the masquerade source of
    flows leaving through it, and DEV_F_PEER when the device is a veth whose peer is in another
    namespace (the tc programs then send through it by bpf_redirect_peer). Exact set (devices without
    a global address are removed). ifindex -> (IPv4, IPv6, flags)."""
    import socket

    from pyroute2 import IPRoute

    from .maps.addr import pack_ip
    from .maps.structs import DEV_F_PEER, DevAddr, packer

    val = packer(DevAddr)
    found: dict[int, list[str]] = {}
    with IPRoute() as ipr:
        for a in ipr.get_addr():
            if a["scope"] != 0:  # RT_SCOPE_UNIVERSE only
                continue
            ip = a.get_attr("IFA_ADDRESS")
            fam = 0 if a["family"] == socket.AF_INET else 1
            slot = found.setdefault(a["index"], ["", ""])
            if not slot[fam]:
                slot[fam] = ip
        peers = peer_devices(ipr)
    rows = {i: (v4, v6, DEV_F_PEER if i in peers else 0) for i, (v4, v6) in found.items()}
    fd = bpfsys.obj_get(os.path.join(paths.bpf_root, DEV_ADDRS_MAP))
    try:
        for k, _ in bpfsys.dump(fd, 4, val.size):
            if int.from_bytes(k, "little") not in rows:
                bpfsys.delete(fd, k)
        for ifindex, (v4, v6, flags) in rows.items():
            bpfsys.update(fd, ifindex.to_bytes(4, "little"),
                          val.pack(pack_ip(v4) if v4 else b"\0" * 16, pack_ip(v6) if v6 else b"\0" * 16, flags))
    finally:
        os.close(fd)
    return rows


def attach_tc(paths: Paths, sizes: MapSizes, devices: list[str] | None, strict: bool = True,
              conntrack: ConntrackSettings = ConntrackSettings()) -> list[str]:
    """Attach bpflb_tc_ext to the ingress of each device in ``devices`` and bpflb_tc_pod to each local pod's
    veth (lb_endpoints), by pinned tcx links; links on devices no longer listed are removed. Adopts the
    pinned programs when they are this very build (nothing compiled, links untouched). Strict: a program
    the kernel refuses or a device it cannot attach to stops with DatapathError naming it; not strict:
    returns what was skipped. Run in the node's network namespace (device names and ifindexes are its).
    ``devices`` None: the devices already attached stay (a restarted agent's loader child does not know
    them yet; the sync names them once it has read the Node), moved to the new program if recompiled."""
    if devices is None:
        ifindexes = {n: int(n[4:]) for n in _tc_links(paths) if n.startswith("ext_")}
    else:
        ifindexes = {name: _ifindex(name) for name in devices}
    d = _tc_dir(paths)
    ensure_bpffs(paths.bpf_root)
    os.makedirs(d, exist_ok=True)
    skipped: list[str] = []
    if not _tc_progs_adoptable(paths, sizes, conntrack):
        import bcc

        b = compile_tc_lb(paths, sizes, conntrack)
        fds = {}
        for p in TC_PROGS:
            try:
                fds[p.pin] = b.load_func(p.func.encode(), bcc.BPF.SCHED_CLS).fd
            except Exception as e:
                if strict:
                    raise DatapathError(f"strict mode: kernel refused the {p.what} program: {e}; refusing to start "
                                        f"(--no-strict runs without it)") from None
                skipped.append(p.what)
        _drop_marks(d)
        for p in TC_PROGS:
            pin = os.path.join(d, "prog_" + p.pin)
            if os.path.exists(pin):
                os.unlink(pin)
            if p.pin in fds:
                bpfsys.obj_pin(fds[p.pin], pin)
        prog_fds = {pin: bpfsys.obj_get(os.path.join(d, "prog_" + pin)) for pin in fds}
        b.cleanup()
        adopted = False
    else:
        prog_fds = {p.pin: bpfsys.obj_get(os.path.join(d, "prog_" + p.pin)) for p in TC_PROGS}
        adopted = True
    try:
        write_device_addrs(paths)
        want = {}
        if "ext" in prog_fds:
            want.update({f"ext_{i}": (i, prog_fds["ext"]) for i in ifindexes.values()})
        if "pod" in prog_fds:
            want.update({f"pod_{i}": (i, prog_fds["pod"]) for i in _endpoint_ifindexes(paths)})
        failed = _sync_tc_links(paths, want)
    finally:
        for fd in prog_fds.values():
            os.close(fd)
    if failed and strict:
        raise DatapathError("strict mode: " + "; ".join(failed) + "; refusing to start (--no-strict runs without it)")
    skipped += failed
    if not adopted and not skipped:
        os.mkdir(os.path.join(d, BUILD_MARK + tc_build_id(paths, sizes, conntrack)))
    elif adopted:
        log.info("tc programs are build %s: adopted, not recompiled", tc_build_id(paths, sizes, conntrack))
    return skipped


def sync_tc_endpoints(paths: Paths) -> list[str]:
    """Attach the pinned pod program to every local pod veth lb_endpoints names, and drop the links of
    veths that are gone; no compiler. Call after the CNI plugin added or removed an endpoint.
    Returns the veths that failed to attach (empty if the pod program is not loaded)."""
    pin = os.path.join(_tc_dir(paths), "prog_pod")
    if not os.path.exists(pin):
        return []
    fd = bpfsys.obj_get(pin)
    try:
        want = {n: (int(n[4:]), fd) for n in _tc_links(paths) if n.startswith("ext_")}
        ext_fd = None
        if want:
            ext_fd = bpfsys.obj_get(os.path.join(_tc_dir(paths), "prog_ext"))
            want = {n: (i, ext_fd) for n, (i, _) in want.items()}
        want.update({f"pod_{i}": (i, fd) for i in _endpoint_ifindexes(paths)})
        try:
            return _sync_tc_links(paths, want)
        finally:
            if ext_fd is not None:
                os.close(ext_fd)
    finally:
        os.close(fd)


def tc_attached(paths: Paths) -> dict[str, bool]:
    """tc link pin -> still attached to a device."""
    out = {}
    for name, pin in sorted(_tc_links(paths).items()):
        out[name] = _link_ok(pin, int(name.split("_", 1)[1]))[0]
    return out


def cleanup_tc(paths: Paths) -> list[str]:
    """Remove every tc link and program bpflb pinned (the links detach; bpflb added no qdisc)."""
    removed = []
    d = _tc_dir(paths)
    if not os.path.isdir(d):
        return removed
    _drop_marks(d)
    for name in sorted(os.listdir(d)):
        os.unlink(os.path.join(d, name))
        removed.append(f"tc {name}")
    os.rmdir(d)
    return removed


def tc_adoptable(paths: Paths, sizes: MapSizes, conntrack: ConntrackSettings = ConntrackSettings()) -> bool:
    """The pinned tc programs are this build: attach_tc needs no compiler (nor bcc in the process)."""
    return _tc_progs_adoptable(paths, sizes, conntrack)


def start_attach_child(paths: Paths, sizes: MapSizes, strict: bool = True,
                       conntrack: ConntrackSettings = ConntrackSettings(),
                       devices: list[str] | None = None, tc_only: bool = False, nice: int = 0) -> subprocess.Popen:
    """attach() in a short-lived child process. bcc and LLVM stay resident once loaded (~130 MB
    measured); the agent only needs the pinned maps and links, so it never imports them. The agent
    reads its sources while the child compiles (0.7 s here). ``devices`` (not None): attach_tc too;
    ``tc_only``: attach_tc alone (the agent runs it beside the socket programs' child, so the two
    compiles overlap and the tc one is not on the way to the first sync); ``nice``: its CPU priority below
    the agent's."""
    import json
    import sys
    from dataclasses import asdict

    args = json.dumps({"paths": asdict(paths), "sizes": asdict(sizes), "strict": strict,
                       "conntrack": asdict(conntrack), "devices": devices, "tc_only": tc_only})
    # The child dies with the agent (PR_SET_PDEATHSIG): a killed agent's loader must not pin programs
    # afterwards, under a bpf-root someone may be cleaning up. (The signal follows the forking *thread*:
    # a child started from a worker thread is waited for by that same thread.)
    # An agent that dies between the fork and the prctl sends no signal: the child checks it still has
    # its parent after the prctl.
    libc = ctypes.CDLL(None, use_errno=True)
    agent = os.getpid()

    def prepare() -> None:  # in the child, between fork and exec
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != agent:
            os._exit(1)
        if nice:
            os.nice(nice)

    return subprocess.Popen([sys.executable, "-m", "lb.datapath", args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=prepare)


def finish_attach_child(proc: subprocess.Popen) -> list[str]:
    """Wait for the child; the hooks it skipped (not strict), or DatapathError with its reason."""
    import json

    out, err = proc.communicate()
    for line in err.splitlines():
        if line.startswith("WARNING "):
            log.warning("%s", line[8:])
    if proc.returncode != 0:
        lines = [l for l in err.strip().splitlines() if l.startswith("ERROR ")]
        raise DatapathError(lines[-1][6:] if lines else f"loading the datapath failed: {err.strip()[-2000:]}")
    return json.loads(out or "[]")


def attach_in_child(paths: Paths, sizes: MapSizes, strict: bool = True,
                    conntrack: ConntrackSettings = ConntrackSettings(),
                    devices: list[str] | None = None) -> list[str]:
    return finish_attach_child(start_attach_child(paths, sizes, strict, conntrack, devices))


def _main(argv: list[str]) -> int:
    import json
    import sys

    a = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        paths, sizes, conntrack = Paths(**a["paths"]), MapSizes(**a["sizes"]), ConntrackSettings(**a.get("conntrack", {}))
        skipped = [] if a.get("tc_only") else attach(paths, sizes, a["strict"], conntrack)
        if a.get("tc_only") or a.get("devices") is not None:
            skipped += attach_tc(paths, sizes, a.get("devices"), a["strict"], conntrack)
    except DatapathError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    print(json.dumps(skipped))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
