"""lb_node_addrs: the node addresses NodePorts are served on.

This node's addresses (``--nodeport-addresses``) carry NODE_ADDR_F_NODEPORT: tc serves a packet to one
of them on a NodePort, and the socket programs translate a local connect to one. Other nodes'
addresses (``remote``) carry NODE_ADDR_F_REMOTE: only the socket programs use them, so a pod dialling
another node's IP:NodePort is translated at its socket and no packet hairpins through that node; except
on an externalTrafficPolicy Local port (SVC_F_EXT_LOCAL), which is that node's to serve.
"""
from __future__ import annotations

from . import bpfsys
from .addr import pack_ip, unpack_ip
from .pinned import PinnedMap
from .structs import NODE_ADDR_F_NODEPORT, NODE_ADDR_F_REMOTE, NODE_ADDRS_MAP, NodeAddr, NodeAddrKey, packer

_KEY = packer(NodeAddrKey)
_VAL = packer(NodeAddr)


class PinnedNodeAddrs(PinnedMap):
    name = NODE_ADDRS_MAP

    def replace(self, addrs: set[str], remote: set[str] | frozenset[str] = frozenset()) -> None:
        """Make the map exactly ``addrs`` (this node's) plus ``remote`` (other nodes'); idempotent.
        An address in both is this node's."""
        want = {pack_ip(a): NODE_ADDR_F_NODEPORT for a in addrs}
        for a in remote:
            want.setdefault(pack_ip(a), NODE_ADDR_F_REMOTE)
        have = self._raw()
        for k in have.keys() - want.keys():
            bpfsys.delete(self.fd, _KEY.pack(k))
        for k, flags in want.items():
            if have.get(k) != flags:
                bpfsys.update(self.fd, _KEY.pack(k), _VAL.pack(flags))

    def _raw(self) -> dict[bytes, int]:
        return {_KEY.unpack(k)[0]: _VAL.unpack(v)[0] for k, v in bpfsys.dump(self.fd, _KEY.size, _VAL.size)}

    def dump(self) -> dict[str, int]:
        """Address -> flags."""
        return {unpack_ip(k): f for k, f in self._raw().items()}
