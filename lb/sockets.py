"""Destroy connected UDP sockets that still point at a removed backend.

kube-proxy flushes conntrack when a UDP endpoint goes away; at the socket layer the translation is
in the socket itself (connect() fixed its peer), so the socket must go: the kernel's SOCK_DESTROY
(sock_diag netlink, CONFIG_INET_DIAG_DESTROY) aborts it and the application sees ECONNABORTED and
reconnects through the service again. Only sockets our programs translated to that backend are
touched: a socket is destroyed only if lb_sock_revnat holds (its cookie, the backend).

sock_diag works per network namespace, so every namespace of a process below the cgroup root is
visited (a thread joins it with setns just long enough to open a netlink socket there).

Unconnected UDP sockets are never destroyed: they have no peer (their flows live in the datapath,
which moves a flow off a removed backend at its next datagram), and destroying one would take its
local port from under the application.

The walk runs in a worker thread (lb/syncer.py) and is bounded by a deadline it checks between
namespaces and between sockets, with every netlink read under a timeout: a thread cannot be cancelled
from outside, so it stops itself, and the next sync's walk never finds the last one still running.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from typing import Iterable

from . import netns
from .maps.sockets import SocketRevNatMap
from .model import Backend

log = logging.getLogger("bpflb.sockets")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLH = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 head; then inet_diag_sockid (48 bytes)
_SOCKID = struct.Struct("=2s2s16s16sIQ")  # sport, dport (network order), src, dst, if, cookie


class DestroyTimeout(Exception):
    """The deadline passed; ``destroyed`` sockets were destroyed before it."""

    def __init__(self, destroyed: int) -> None:
        super().__init__(f"deadline passed after {destroyed} socket(s) destroyed")
        self.destroyed = destroyed


def _left(deadline: float | None) -> float | None:
    """Seconds until the deadline (None: no deadline); 0 once it passed."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def namespaces_below(cgroup_root: str, deadline: float | None = None) -> dict[tuple[int, int], int]:
    """(dev, inode) of each network namespace used by a process below the cgroup -> one pid in it.
    Stops at the deadline with what it found so far."""
    out: dict[tuple[int, int], int] = {}
    for dirpath, _dirs, files in os.walk(cgroup_root):
        if _left(deadline) == 0:
            break
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                st = os.stat(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            out.setdefault((st.st_dev, st.st_ino), pid)
    return out


def _netlink_in(pid: int) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket inside the network namespace of ``pid``."""
    return netns.run_in(f"/proc/{pid}/ns/net",
                        lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG))


def _request(nl: socket.socket, msg_type: int, flags: int, family: int, sockid: bytes, states: int = 0xFFFFFFFF,
             deadline: float | None = None) -> list[bytes]:
    """One request and its answer; socket.timeout (an OSError) if the deadline passes while waiting."""
    left = _left(deadline)
    if left == 0:
        raise socket.timeout("deadline passed")
    nl.settimeout(left)
    body = _REQ.pack(family, socket.IPPROTO_UDP, 0, states) + sockid
    nl.send(_NLH.pack(_NLH.size + len(body), msg_type, flags, 1, 0) + body)
    msgs = []
    while True:
        data = nl.recv(65536)
        off = 0
        while off < len(data):
            length, mtype, _f, _seq, _pid = _NLH.unpack_from(data, off)
            payload = data[off + _NLH.size: off + length]
            off += (length + 3) & ~3
            if mtype == NLMSG_DONE:
                return msgs
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                if err:
                    raise OSError(err, os.strerror(err))
                return msgs
            msgs.append(payload)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _plain(a: Address) -> Address:
    """An IPv4-mapped IPv6 address as the IPv4 address it maps (a dual-stack socket's peer)."""
    return (a.ipv4_mapped or a) if a.version == 6 else a


def _peer(family: int, dst: bytes, dport: bytes) -> tuple[Address, int]:
    """A socket's peer from inet_diag_sockid's fields (network byte order)."""
    ip = ipaddress.IPv4Address(dst[:4]) if family == socket.AF_INET else _plain(ipaddress.IPv6Address(dst))
    return ip, int.from_bytes(dport, "big")


def destroy_udp(cgroup_root: str, bpf_root: str, removed: Iterable[tuple[int, Backend]],
                timeout: float | None = None) -> int:
    """Destroy UDP sockets that frontend ``id`` translated to ``backend``, for each (id, backend) in
    ``removed`` (a socket of another frontend still using that backend is left alone); returns how many.
    With a timeout, stops once it has passed and raises DestroyTimeout (which says how many went)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    targets: dict[tuple[Address, int], set[int]] = {}  # compared as addresses, not as text
    for rid, b in removed:
        if b.protocol == "UDP":
            targets.setdefault((_plain(ipaddress.ip_address(b.ip)), b.port), set()).add(rid)
    if not targets:
        return 0
    destroyed = 0
    with SocketRevNatMap(bpf_root) as revnat:
        pids = namespaces_below(cgroup_root, deadline).values()
        if _left(deadline) == 0:
            raise DestroyTimeout(0)  # the cgroup walk took it all: not every namespace was found
        for pid in pids:
            if _left(deadline) == 0:
                raise DestroyTimeout(destroyed)
            try:
                nl = _netlink_in(pid)
            except OSError:
                continue  # the process is gone
            with nl:
                for family in (socket.AF_INET, socket.AF_INET6):
                    try:
                        msgs = _request(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, bytes(48),
                                        deadline=deadline)
                    except socket.timeout:
                        raise DestroyTimeout(destroyed) from None
                    except OSError:
                        continue
                    for m in msgs:
                        sockid = m[4:52]
                        _sport, dport, _src, dst, _ifx, cookie = _SOCKID.unpack(sockid)
                        peer = _peer(family, dst, dport)
                        if peer not in targets:
                            continue
                        ip, port = str(peer[0]), peer[1]
                        if revnat.frontend_of(cookie, ip, port) not in targets[peer]:
                            continue  # not translated by that frontend (or a direct connection): leave it
                        try:
                            _request(nl, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, sockid, deadline=deadline)
                            destroyed += 1
                            revnat.forget(cookie, ip, port)
                        except socket.timeout:
                            raise DestroyTimeout(destroyed) from None
                        except OSError as e:
                            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                                log.warning("cannot destroy UDP sockets (kernel without INET_DIAG_DESTROY): %s", e)
                                return destroyed
                            if e.errno != errno.ENOENT:
                                raise
    return destroyed
