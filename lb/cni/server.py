"""The agent's side of the launcher: a unix-socket server running each CNI request on the CNI server's
own bounded thread pool (plugin work is blocking netlink; pyroute2 must not see the agent's event loop,
and a burst of pods must not starve the sync loop's asyncio.to_thread work, or the other way round).

Wire format (lb/cni/launcher.c; all integers u32 little-endian), one request per connection:
    request:  n_env, n_env x (len, "CNI_KEY=VALUE"), stdin_len, stdin bytes
    response: exit_code, stdout_len, stdout bytes

Who may call: the node's container runtime only (``PeerCheck``). The socket is bound inside a fresh
0700 directory, chmod 0600 there, and renamed into place, so its path never names a socket anyone but
root can connect to (a process-wide umask around bind would race the agent's other threads). Each
connection's peer (SO_PEERCRED, pinned by SO_PEERPIDFD) must be uid 0 and live in the node's mount
namespace and network namespace: a container that mounted /run (or /run/bpflb) as root still has its
own mount namespace, and usually its own network namespace, so it is refused. The runtime itself
(containerd, CRI-O, kubelet's dockershim) runs in the host's; the agent sees the host's through
hostPID (/proc/1 is the host's init) and hostNetwork, and reads other processes' namespaces with
CAP_SYS_PTRACE, all of which the DaemonSet grants.

DEL while the agent is down: the launcher queues the request in <socket dir>/del-queue/ (a file per
request, in the wire format, written then renamed) and reports success, as Cilium's plugin does, so a
pod never sticks in Terminating. The kernel half of the attachment already went with the pod's
namespace; the agent replays the queue (IPAM, record, lb_endpoints entry) before it listens again.

The agent fills in ``podCIDRs`` from its Node's spec.podCIDRs (one range per family) when the network
configuration names no range (neither podCIDR nor podCIDRs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

from ..settings import CNI_SOCKET_DEFAULT
from .plugin import handle

log = logging.getLogger("bpflb.cni")
_U32 = struct.Struct("<I")
_UCRED = struct.Struct("3i")
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
MAX_ENV = 1024  # CNI_* variables in one request
MAX_BYTES = 16 << 20  # one variable, or the configuration
READ_TIMEOUT = 30.0  # seconds for the launcher to send its whole request
WORKERS = 8  # threads doing plugin work (netlink, files); more requests wait their turn on the loop
MAX_CONNECTIONS = 256  # connections being served at once; more wait in the listen backlog
DEL_QUEUE = "del-queue"


class BadRequest(Exception):
    pass


class Refused(Exception):
    """The peer is not the node's runtime; the message says why."""


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class PeerCheck:
    """The node's runtime: uid 0, in the reference mount and network namespaces (read once, here)."""

    def __init__(self, mnt_ns: str = "/proc/1/ns/mnt", net_ns: str = "/proc/self/ns/net"):
        try:
            self.mnt, self.net = _ns_id(mnt_ns), _ns_id(net_ns)
        except OSError as e:
            raise OSError(e.errno, f"the CNI socket checks that its callers are in the node's namespaces, and "
                                   f"cannot read {e.filename}: {e.strerror} (the agent needs hostPID and "
                                   "CAP_SYS_PTRACE)") from None

    def check(self, sock: socket.socket) -> None:
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:
            raise Refused(f"caller uid {uid} is not root")
        if pid <= 0:
            raise Refused("caller is in another PID namespace")
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:  # before Linux 6.5: the caller waits for our answer, so its pid is not reused meanwhile
            pidfd = -1
        try:
            try:
                mnt, net = _ns_id(f"/proc/{pid}/ns/mnt"), _ns_id(f"/proc/{pid}/ns/net")
            except OSError as e:
                raise Refused(f"caller pid {pid}: {e.strerror}") from None
            if pidfd >= 0:
                try:
                    signal.pidfd_send_signal(pidfd, 0)  # still the process that connected: its pid was not reused
                except ProcessLookupError:
                    raise Refused(f"caller pid {pid} is gone") from None
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        if mnt != self.mnt:
            raise Refused(f"caller pid {pid} is not in the node's mount namespace (a container?)")
        if net != self.net:
            raise Refused(f"caller pid {pid} is not in the node's network namespace")


def _decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """A whole request from bytes (the delete queue's files)."""
    off = 0

    def take(n: int) -> bytes:
        nonlocal off
        if off + n > len(data):
            raise BadRequest("truncated")
        off += n
        return data[off - n:off]

    def u32(limit: int, what: str) -> int:
        (n,) = _U32.unpack(take(4))
        if n > limit:
            raise BadRequest(f"{what} of {n} is over the limit of {limit}")
        return n

    env = {}
    for _ in range(u32(MAX_ENV, "environment count")):
        k, _, v = take(u32(MAX_BYTES, "variable length")).decode(errors="replace").partition("=")
        env[k] = v
    return env, take(u32(MAX_BYTES, "configuration length"))


async def _read_request(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    async def u32(limit: int, what: str) -> int:
        (n,) = _U32.unpack(await reader.readexactly(4))
        if n > limit:
            raise BadRequest(f"{what} of {n} is over the limit of {limit}")
        return n

    env = {}
    for _ in range(await u32(MAX_ENV, "environment count")):
        k, _, v = (await reader.readexactly(await u32(MAX_BYTES, "variable length"))).decode(errors="replace") \
            .partition("=")
        env[k] = v
    stdin = await reader.readexactly(await u32(MAX_BYTES, "configuration length"))
    return env, stdin


def listen(path: str) -> socket.socket:
    """A listening socket at ``path``, never connectable by anyone but root: bound in a private 0700
    directory, chmod 0600, then renamed over ``path`` (which also replaces a stale socket in one step)."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    private = tempfile.mkdtemp(dir=parent, prefix=".s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        tmp = os.path.join(private, "s")
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(512)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        raise
    finally:
        try:
            os.unlink(os.path.join(private, "s"))
        except FileNotFoundError:
            pass
        os.rmdir(private)
    return sock


class Attachments:
    """One asyncio lock per (container ID, ifname): requests for one attachment wait here, on the
    loop, instead of holding a worker thread while the plugin's file lock is busy."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def lock(self, env: dict[str, str]):
        key = (env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""))
        if env.get("CNI_COMMAND") not in ("ADD", "DEL", "CHECK"):
            yield
            return
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _answer(rc: int, out: bytes) -> bytes:
    return _U32.pack(rc) + _U32.pack(len(out)) + out


RANGE_KEYS = ("podCIDR", "podCIDRs")  # one setting: a configuration naming either keeps its own ranges


def with_defaults(stdin: bytes, defaults: dict) -> bytes:
    if not defaults:
        return stdin
    try:
        conf = json.loads(stdin)
    except ValueError:
        return stdin  # the plugin reports the decoding error
    if not isinstance(conf, dict):
        return stdin
    own_ranges = any(k in conf for k in RANGE_KEYS)
    for k, v in defaults.items():
        if not (own_ranges and k in RANGE_KEYS):
            conf.setdefault(k, v)
    return json.dumps(conf).encode()


def node_pod_cidrs(cidrs) -> list[str]:
    """A Node's spec.podCIDRs as the plugin takes them: the first range of each family, in order."""
    out, seen = [], set()
    for c in cidrs:
        family = 6 if ":" in c else 4
        if family not in seen:
            seen.add(family)
            out.append(c)
    return out


async def _refuse(writer: asyncio.StreamWriter, what: str, why: str) -> None:
    """Answer a request that is not handled with a CNI error (code 5: I/O failure) and log it."""
    log.warning("%s: %s", what, why)
    writer.write(_answer(1, json.dumps({"cniVersion": "1.1.0", "code": 5, "msg": f"bpflb agent: {why}"}).encode()))
    await writer.drain()


async def serve(path: str, stop: asyncio.Event, defaults: Callable[[], dict] = dict, sink=None,
                peer: PeerCheck | None = None, listening: Callable[[], None] | None = None,
                workers: int = WORKERS) -> None:
    """Serve the launcher; ``sink`` (an EndpointSink) registers each attachment for the datapath.
    First the DEL requests queued while no server listened are done; ``listening()`` runs (on the
    pool) once the socket accepts connections (the agent installs the conflist there)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cni")
    loop = asyncio.get_running_loop()
    attachments = Attachments()
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def run(env: dict[str, str], stdin: bytes) -> tuple[bytes, int]:
        async with attachments.lock(env):
            return await loop.run_in_executor(pool, handle, env, with_defaults(stdin, defaults()), sink)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with slots:
            try:
                if peer is not None:
                    try:
                        peer.check(writer.get_extra_info("socket"))
                    except Refused as e:
                        await _refuse(writer, "CNI caller refused", f"refused: {e}")
                        return
                try:
                    env, stdin = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
                except BadRequest as e:
                    await _refuse(writer, "CNI request refused", str(e))
                    return
                out, rc = await run(env, stdin)
                _log(env, out, rc)
                writer.write(_answer(rc, out))
                await writer.drain()
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
                log.warning("CNI request cut short: %r", e)
            except Exception as e:  # answer with a CNI error rather than a reset connection
                log.exception("CNI request failed")
                writer.write(_answer(1, json.dumps({"cniVersion": "1.1.0", "code": 5,
                                                    "msg": f"bpflb agent: {e}"}).encode()))
            finally:
                writer.close()

    try:
        await replay_deletes(os.path.join(os.path.dirname(path) or ".", DEL_QUEUE), run)
        sock = listen(path)
        ident = os.stat(path).st_ino
        server = await asyncio.start_unix_server(one, sock=sock)
        try:
            async with server:
                if listening is not None:
                    await loop.run_in_executor(pool, listening)
                await stop.wait()
        finally:
            try:
                if os.stat(path).st_ino == ident:  # still ours, not a newer server's
                    os.unlink(path)
            except FileNotFoundError:
                pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _log(env: dict[str, str], out: bytes, rc: int) -> None:
    if env.get("CNI_COMMAND") in ("ADD", "DEL", "GC") or rc != 0:
        log.info("CNI %s %s/%s: %s", env.get("CNI_COMMAND"), env.get("CNI_CONTAINERID", "")[:12],
                 env.get("CNI_IFNAME", ""), "ok" if rc == 0 else out.decode(errors="replace"))


async def replay_deletes(queue: str, run: Callable[[dict, bytes], Awaitable[tuple[bytes, int]]]) -> int:
    """Do the DELs the launcher queued while no server listened, oldest first; each file goes once
    done (a failure is logged: GC takes what is left). Only root's regular files in a directory only
    root can write are read. A DEL is skipped if its attachment was added again after it was queued.
    Returns the number done."""
    os.makedirs(queue, mode=0o700, exist_ok=True)
    st = os.lstat(queue)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        log.error("not replaying queued CNI DELs: %s must be a directory only root can write", queue)
        return 0
    done = 0
    for name in sorted(os.listdir(queue)):
        if not name.endswith(".del"):
            continue
        path = os.path.join(queue, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode) or fst.st_uid != 0 or fst.st_size > 2 * MAX_BYTES:
                    raise BadRequest("not a regular file of root's")
                with os.fdopen(os.dup(fd), "rb") as f:
                    env, stdin = _decode_request(f.read())
            finally:
                os.close(fd)
            if env.get("CNI_COMMAND") != "DEL":
                raise BadRequest(f"CNI_COMMAND {env.get('CNI_COMMAND')!r} is not DEL")
            if _added_since(env, stdin, fst.st_mtime):
                log.info("queued CNI DEL %s/%s skipped: added again since", env.get("CNI_CONTAINERID", "")[:12],
                         env.get("CNI_IFNAME", ""))
            else:
                out, rc = await run(env, stdin)
                _log(env, out, rc)
                done += rc == 0
        except (OSError, BadRequest) as e:
            log.warning("queued CNI request %s dropped: %s", path, e)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return done


def _added_since(env: dict[str, str], stdin: bytes, queued: float) -> bool:
    from .plugin import Request, parse, CNIError

    try:
        req: Request = parse(env, stdin)
        return os.stat(req.record_path()).st_mtime > queued
    except (CNIError, OSError, ValueError, RecursionError):
        return False


class DatapathEndpoints:
    """The agent's endpoint sink: each pod in lb_endpoints (the socket and tc programs read it), and
    the tc pod program on its host veth right after (replies from local pods are reverse-NATed there)."""

    def __init__(self, paths) -> None:
        from ..maps.endpoints import PinnedEndpointMap

        self.paths = paths
        self.map = PinnedEndpointMap(paths.bpf_root)
        self.lock = threading.Lock()  # ADDs run in parallel; the tc links are synced one at a time

    def _sync_tc(self) -> None:
        from .. import datapath

        with self.lock:
            failed = datapath.sync_tc_endpoints(self.paths)
        if failed:
            log.warning("tc pod program not attached: %s", "; ".join(failed))

    def added(self, ip: str, ifindex: int, mac: str) -> None:
        """One entry per pod address (a dual-stack pod has two, with one ifindex and MAC)."""
        self.map.added(ip, ifindex, mac)
        self._sync_tc()

    def removed(self, ip: str) -> None:
        self.map.removed(ip)
        self._sync_tc()

    def close(self) -> None:
        self.map.close()


async def serve_for_agent(settings, tracker, stop: asyncio.Event, datapath_ready: Callable[[], Awaitable[None]]) -> None:
    """The agent's CNI plugin: the launcher installed first (if asked; inert without a conflist),
    requests served once the datapath's maps exist (each pod is registered in lb_endpoints), and the
    conflist written only once the socket listens, naming that socket, so a runtime that finds the
    conflist finds a working plugin. The conflist stays when the agent stops: ADDs meanwhile fail
    with "try again later", DELs are queued."""
    from .. import nodenet
    from . import install

    s = settings
    try:
        try:
            peer = PeerCheck(getattr(s, "cni_node_mntns", "/proc/1/ns/mnt"))
        except PermissionError:
            # A PID 1 that holds a capability no other process can have (one outside every bounding set,
            # as on some VMs' init) cannot be inspected even with CAP_SYS_PTRACE. Under hostPID our parent
            # is the runtime's shim (containerd-shim, conmon), which lives in the node's mount namespace.
            peer = PeerCheck(f"/proc/{os.getppid()}/ns/mnt")
            log.info("the CNI socket takes its parent's (pid %d) mount namespace for the node's: /proc/1 is "
                     "not readable", os.getppid())
    except OSError as e:
        # Not the DaemonSet (no hostPID): the agent runs on the host itself (a systemd unit, the tests),
        # so its own mount namespace is the node's. In a container this refuses every caller, loudly:
        # stricter, never weaker.
        log.warning("%s; callers must share the agent's own mount namespace instead", e.strerror)
        peer = PeerCheck("/proc/self/ns/mnt")
    listening = None
    if s.cni_bin_dir and s.cni_conf_dir:
        launcher = os.environ.get("BPFLB_CNI_LAUNCHER") or await asyncio.to_thread(install.build_launcher)
        binary = await asyncio.to_thread(install.install_launcher, s.cni_bin_dir, launcher)
        node = tracker.node
        mtu = await asyncio.to_thread(nodenet.pod_mtu, s.network_mode, nodenet.node_ip(node) if node else None)

        def listening() -> None:
            conf = install.install_conflist(s.cni_conf_dir, mtu=mtu, socket=s.cni_socket)
            log.info("installed CNI plugin %s and %s (pod MTU %d, socket %s)", binary, conf, mtu, s.cni_socket)

    def defaults() -> dict:
        """The pod CIDRs come from this node's Node object unless the conflist names its own."""
        node = tracker.node
        cidrs = node_pod_cidrs(node.pod_cidrs if node else ())
        return {"podCIDRs": cidrs} if cidrs else {}

    await datapath_ready()
    endpoints = DatapathEndpoints(s.paths)
    try:
        await serve(s.cni_socket, stop, defaults, endpoints, peer=peer, listening=listening)
    finally:
        endpoints.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m lb.cni.server SOCKET [BPF_ROOT]`: the server alone (tests, and nodes without the agent).
    --node-mntns: the mount namespace callers must share (default /proc/1/ns/mnt, the host's with hostPID)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m lb.cni.server")
    ap.add_argument("socket", nargs="?", default=CNI_SOCKET_DEFAULT)
    ap.add_argument("bpf_root", nargs="?", help="register endpoints in this bpf-root's lb_endpoints map")
    ap.add_argument("--node-mntns", default="/proc/1/ns/mnt")
    ap.add_argument("--install", nargs=2, metavar=("BIN_DIR", "CONF_DIR"),
                    help="install the launcher and, once listening, the conflist naming SOCKET")
    a = ap.parse_args(argv)
    sink = None
    if a.bpf_root:
        from ..maps.endpoints import PinnedEndpointMap

        sink = PinnedEndpointMap(a.bpf_root)
    peer = PeerCheck(mnt_ns=a.node_mntns)
    listening = None
    if a.install:
        from . import install

        install.install_launcher(a.install[0], install.build_launcher())

        def listening() -> None:
            install.install_conflist(a.install[1], socket=a.socket)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        ready = asyncio.Event()

        def announce() -> None:
            if listening is not None:
                listening()
            loop.call_soon_threadsafe(ready.set)

        task = asyncio.create_task(serve(a.socket, stop, sink=sink, peer=peer, listening=announce))
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            print("ready", flush=True)
        await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
