"""host-local style IPAM: one file per reserved address under <dataDir>/ipam/<network>/, named by the
address and holding "<containerID>\\n<ifname>".

Every change happens under an flock on <dir>/.lock. A reservation is written whole to a temporary
file (".tmp-*") and then linked to its address's name: link(2) fails if the name exists, so the
address is claimed exclusively (what O_EXCL gave), and a reservation is never seen half written (a
crash leaves at worst a temporary file, removed by the next allocation). So concurrent ADDs (threads
of one agent, or separate `python -m lb.cni` processes) never hand out an address twice. A file that
still does not read as "<containerID>\n<ifname>" (a disk fault, an older version's crash) is a
damaged reservation: listed with no owner, and only GC removes it. DEL and GC remove the files; nothing else holds state, so a restarted agent needs no
recovery. Addresses are handed out round robin from the last one given (<dir>/.last for IPv4,
<dir>/.last6 for IPv6), so a freed address is not reused at once by the next pod.

Dual stack (the Node's spec.podCIDRs: one range per family): an attachment holds at most one address
per family, each its own file in the same directory, allocated under the same lock. An IPv4 pool's
gateway is its first host address (kept out of the pool); an IPv6 pool's is the link-local GATEWAY6,
which each pod's host veth holds (as Calico and Cilium route pods through a link-local next hop), so
every address of the range but the subnet-router anycast one (::0) and the last one is a pod's.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from contextlib import contextmanager
from dataclasses import dataclass

from ..atomicfile import write_atomic


GATEWAY6 = ipaddress.IPv6Address("fe80::1")  # every pod's IPv6 next hop, on its host veth


class PoolExhausted(Exception):
    pass


@dataclass(frozen=True)
class Pool:
    """The addresses pods get: every host address of ``subnet`` except ``gateway``."""
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address

    @classmethod
    def of(cls, cidr: str) -> "Pool":
        """The pool of a pod CIDR: IPv4, its first host address is the gateway; IPv6, GATEWAY6."""
        subnet = ipaddress.ip_network(cidr, strict=False)
        return cls(subnet, subnet.network_address + 1 if subnet.version == 4 else GATEWAY6)

    @property
    def version(self) -> int:
        return self.subnet.version

    def address(self, n: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv4Address(n) if self.version == 4 else ipaddress.IPv6Address(n)

    @property
    def first(self) -> int:
        return int(self.subnet.network_address) + 1

    @property
    def last(self) -> int:
        return int(self.subnet.broadcast_address) - 1

    @property
    def size(self) -> int:
        return self.last - self.first + 1 - (1 if self.gateway in self.subnet else 0)

    def __contains__(self, ip: object) -> bool:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return a.version == self.version and self.first <= int(a) <= self.last and a != self.gateway


@dataclass(frozen=True)
class Reservation:
    ip: str
    container_id: str  # "" with ifname "": a damaged reservation (no owner can be read)
    ifname: str

    @property
    def damaged(self) -> bool:
        return not self.container_id


def _owner(data: bytes) -> tuple[str, str]:
    """("", "") for anything but "<containerID>\n<ifname>" in UTF-8."""
    try:
        cid, sep, ifname = data.decode().partition("\n")
    except UnicodeDecodeError:
        return "", ""
    ifname = ifname.strip()
    return (cid, ifname) if sep and cid and ifname and "\n" not in ifname else ("", "")


MAX_PROBES = 1 << 16  # IPv6 addresses tried per allocation: a /64 is too large to walk whole


def _version(ip: str) -> int | None:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return None


def _order(ip: str) -> tuple:
    a = ipaddress.ip_address(ip) if _version(ip) else None
    return (a.version, int(a)) if a else (9, 0)


class IPAM:
    """The reservations of one network (the conflist's ``name``)."""

    def __init__(self, data_dir: str, network: str):
        self.dir = os.path.join(data_dir, "ipam", network)
        os.makedirs(self.dir, exist_ok=True)

    @contextmanager
    def locked(self):
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor drops the lock

    def reservations(self) -> list[Reservation]:
        out = []
        for name in os.listdir(self.dir):
            if name.startswith("."):
                continue
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    cid, ifname = _owner(f.read(4096))
            except FileNotFoundError:  # released meanwhile
                continue
            except OSError:  # unreadable (EIO, a directory): damaged
                cid, ifname = "", ""
            out.append(Reservation(name, cid, ifname))
        return out

    def owner(self, ip: str) -> tuple[str, str] | None:
        """(containerID, ifname) holding ``ip`` (("", "") if damaged), or None. Call under ``locked()``
        to act on the answer."""
        try:
            with open(os.path.join(self.dir, ip), "rb") as f:
                return _owner(f.read(4096))
        except FileNotFoundError:
            return None
        except OSError:
            return "", ""

    def release_damaged(self, ip: str) -> bool:
        """Remove ``ip``'s reservation if it is (still) damaged; True if it was."""
        with self.locked():
            if self.owner(ip) != ("", ""):
                return False
            path = os.path.join(self.dir, ip)
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                self._unlink(ip)
            return True

    def find(self, container_id: str, ifname: str, version: int | None = None) -> str | None:
        """The attachment's address (of one family if ``version`` is given; else any), or None."""
        return next(iter(self.find_all(container_id, ifname, version)), None)

    def find_all(self, container_id: str, ifname: str, version: int | None = None) -> list[str]:
        """The attachment's addresses (at most one per family unless a crash left more), IPv4 first."""
        return sorted((r.ip for r in self.reservations() if (r.container_id, r.ifname) == (container_id, ifname)
                       and (version is None or _version(r.ip) == version)), key=_order)

    def allocate(self, pool: Pool, container_id: str, ifname: str) -> str:
        """The attachment's address of the pool's family: the one it already holds (a retried ADD), else
        the next free one. Its addresses of the other family are left alone."""
        with self.locked():
            existing = self.find_all(container_id, ifname, pool.version)
            if existing and existing[0] in pool:
                return existing[0]
            for ip in existing:  # the pod CIDR changed under a retried ADD: give the old one back
                self._unlink(ip)
            for name in os.listdir(self.dir):  # under the lock, any temporary file is a crash's leftover
                if name.startswith(".tmp-"):
                    self._unlink(name)
            start = self._last(pool) + 1
            span = pool.last - pool.first + 1
            tmp = os.path.join(self.dir, f".tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(f"{container_id}\n{ifname}")  # no fsync: no attachment outlives a reboot either
            try:
                probes = span if pool.version == 4 else min(span, MAX_PROBES)
                for i in range(probes):
                    ip = pool.address(pool.first + (start - pool.first + i) % span)
                    if ip == pool.gateway:
                        continue
                    try:
                        os.link(tmp, os.path.join(self.dir, str(ip)))
                    except FileExistsError:
                        continue
                    # A hint (a lost one restarts the round robin): not worth an fsync per ADD.
                    write_atomic(self._last_path(pool), str(ip), 0o644, durable=False)
                    return str(ip)
            finally:
                self._unlink(os.path.basename(tmp))
            if probes < span:
                raise PoolExhausted(f"the {probes} addresses of {pool.subnet} after the last one given are reserved")
            raise PoolExhausted(f"all {pool.size} addresses of {pool.subnet} are reserved")

    def release(self, container_id: str, ifname: str, version: int | None = None) -> str | None:
        """Give the attachment's addresses back (of one family if ``version`` is given); returns the
        first given back (the IPv4 one of a dual-stack attachment), None if it held none (a repeated DEL)."""
        return next(iter(self.release_all(container_id, ifname, version)), None)

    def release_all(self, container_id: str, ifname: str, version: int | None = None) -> list[str]:
        """Like ``release``; returns every address given back, IPv4 first."""
        with self.locked():
            ips = self.find_all(container_id, ifname, version)
            for ip in ips:
                self._unlink(ip)
            return ips

    def release_ip(self, ip: str, container_id: str, ifname: str) -> bool:
        """Give ``ip`` back if the attachment (still) holds it; True if it did."""
        with self.locked():
            if self.owner(ip) != (container_id, ifname):
                return False
            self._unlink(ip)
            return True

    def free(self, pool: Pool) -> int:
        return pool.size - sum(1 for r in self.reservations() if r.ip in pool)

    def _last_path(self, pool: Pool) -> str:
        return os.path.join(self.dir, ".last" if pool.version == 4 else ".last6")

    def _last(self, pool: Pool) -> int:
        try:
            with open(self._last_path(pool)) as f:
                last = ipaddress.ip_address(f.read().strip())
        except (OSError, ValueError):
            return pool.first - 1
        return int(last) if last.version == pool.version and pool.first <= int(last) <= pool.last else pool.first - 1

    def _unlink(self, ip: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, ip))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
