"""host-local style IPAM: one file per reserved address under <dataDir>/ipam/<network>/, created with
O_EXCL under an flock, so concurrent ADDs never hand out an address twice and a crash never leaves a
half-written reservation; DEL and GC remove the files."""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from contextlib import contextmanager
from dataclasses import dataclass


class PoolExhausted(Exception):
    pass


@dataclass(frozen=True)
class Reservation:
    ip: str
    container_id: str
    ifname: str


class IPAM:
    def __init__(self, data_dir: str, network: str, subnet: str, gateway: str):
        self.dir = os.path.join(data_dir, "ipam", network)
        self.subnet = ipaddress.ip_network(subnet, strict=False)
        self.gateway = ipaddress.ip_address(gateway)
        os.makedirs(self.dir, exist_ok=True)

    @contextmanager
    def _locked(self):
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _candidates(self):
        for ip in self.subnet.hosts():
            if ip != self.gateway:
                yield ip

    def reservations(self) -> list[Reservation]:
        out = []
        for name in os.listdir(self.dir):
            if name.startswith("."):
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    cid, _, ifname = f.read().partition("\n")
            except OSError:
                continue
            out.append(Reservation(name, cid, ifname.strip()))
        return out

    def find(self, container_id: str, ifname: str) -> str | None:
        for r in self.reservations():
            if r.container_id == container_id and r.ifname == ifname:
                return r.ip
        return None

    def allocate(self, container_id: str, ifname: str) -> str:
        with self._locked():
            existing = self.find(container_id, ifname)
            if existing:
                return existing  # a retried ADD gets the same address
            last_file = os.path.join(self.dir, ".last")
            try:
                last = ipaddress.ip_address(open(last_file).read().strip())
            except (OSError, ValueError):
                last = None
            cands = list(self._candidates())
            start = cands.index(last) + 1 if last in cands else 0
            for ip in cands[start:] + cands[:start]:  # round robin: a freed address is not reused at once
                try:
                    fd = os.open(os.path.join(self.dir, str(ip)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        continue
                    raise
                with os.fdopen(fd, "w") as f:
                    f.write(f"{container_id}\n{ifname}")
                with open(last_file + ".tmp", "w") as f:
                    f.write(str(ip))
                os.replace(last_file + ".tmp", last_file)
                return str(ip)
            raise PoolExhausted(f"no free address in {self.subnet} ({len(cands)} in use)")

    def release(self, container_id: str, ifname: str) -> str | None:
        with self._locked():
            ip = self.find(container_id, ifname)
            if ip:
                try:
                    os.unlink(os.path.join(self.dir, ip))
                except FileNotFoundError:
                    pass
            return ip

    def free(self) -> int:
        return sum(1 for _ in self._candidates()) - len(self.reservations())
