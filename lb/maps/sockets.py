"""lb_sock_revnat: for each socket the programs translated, the backend it was sent to and the
frontend (rev_nat_id) that chose it. The datapath writes it (connect/sendmsg) and reads it (recvmsg,
getpeername) and the release hook forgets it; the agent reads it only to find the UDP sockets that a
removed backend strands (lb/sockets.py), and forgets the ones it destroyed."""
from __future__ import annotations

from . import bpfsys
from .addr import net_port, pack_ip
from .pinned import PinnedMap
from .structs import SOCK_REVNAT_MAP, SockKey, SockVal, packer

_KEY = packer(SockKey)
_VAL = packer(SockVal)


class SocketRevNatMap(PinnedMap):
    """Read and forget entries by (socket cookie, backend ip, backend port)."""
    name = SOCK_REVNAT_MAP

    @staticmethod
    def _key(cookie: int, ip: str, port: int) -> bytes:
        return _KEY.pack(cookie, pack_ip(ip), net_port(port), 0, 0, 0)

    def frontend_of(self, cookie: int, ip: str, port: int) -> int | None:
        """The rev_nat_id of the frontend that sent socket ``cookie`` to backend ip:port, or None if
        no program translated it there (a direct connection, or one already forgotten)."""
        raw = bpfsys.lookup(self.fd, self._key(cookie, ip, port), _VAL.size)
        return None if raw is None else _VAL.unpack(raw)[-1]

    def forget(self, cookie: int, ip: str, port: int) -> None:
        """Drop the entry; a missing one is success."""
        bpfsys.delete(self.fd, self._key(cookie, ip, port))
