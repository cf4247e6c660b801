"""lb_endpoints: local pod IP -> host veth ifindex and pod MAC. Written by the CNI plugin (through
the agent, which owns the maps) on ADD, removed on DEL and GC; read by the node datapath."""
from __future__ import annotations

from . import bpfsys
from .addr import pack_ip, unpack_ip
from .pinned import PinnedMap
from .structs import ENDPOINTS_MAP, Endpoint, EndpointKey, packer

_KEY = packer(EndpointKey)
_VAL = packer(Endpoint)


class PinnedEndpointMap(PinnedMap):
    name = ENDPOINTS_MAP

    def added(self, ip: str, ifindex: int, mac: str) -> None:
        raw = bytes(int(x, 16) for x in mac.split(":"))
        bpfsys.update(self.fd, _KEY.pack(pack_ip(ip)), _VAL.pack(ifindex, *raw, 0))

    def removed(self, ip: str) -> None:
        bpfsys.delete(self.fd, _KEY.pack(pack_ip(ip)))

    def dump(self) -> dict[str, tuple[int, str]]:
        out = {}
        for k, v in bpfsys.dump(self.fd, _KEY.size, _VAL.size):
            f = _VAL.unpack(v)
            out[unpack_ip(_KEY.unpack(k)[0])] = (f[0], ":".join(f"{b:02x}" for b in f[1:7]))
        return out
