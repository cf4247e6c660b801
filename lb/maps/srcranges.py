"""lb_src_ranges: loadBalancerSourceRanges, an LPM trie keyed by (frontend's rev_nat_id, client prefix).

tc checks it for frontends flagged LB_SVC_F_SRC_RANGES (kube-proxy nftables: the firewall check on
the LoadBalancer IP); a client in no range of its frontend is dropped. The prefix length counts the
bits after the prefixlen field: 32 for the ID, then the address bits (IPv4 is IPv4-mapped, so its
prefix starts 96 bits in).
"""
from __future__ import annotations

import ipaddress

from . import bpfsys
from .addr import pack_ip, unpack_ip
from .pinned import PinnedMap
from .structs import SRC_RANGES_MAP, SrcRange, SrcRangeKey, packer

_KEY = packer(SrcRangeKey)
_VAL = packer(SrcRange)


def pack_range(rev_nat_id: int, cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr, strict=False)
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return _KEY.pack(32 + bits, rev_nat_id, pack_ip(str(net.network_address)))


def unpack_range(raw: bytes) -> tuple[int, str]:
    prefixlen, rev_nat_id, addr = _KEY.unpack(raw)
    ip = unpack_ip(addr)
    bits = prefixlen - 32 - (96 if ":" not in ip else 0)
    return rev_nat_id, f"{ip}/{bits}"


class PinnedSourceRanges(PinnedMap):
    name = SRC_RANGES_MAP

    def replace(self, ranges: dict[int, tuple[str, ...]]) -> None:
        """Make the map exactly these ranges (rev_nat_id -> CIDRs); idempotent."""
        want = {pack_range(rid, c) for rid, cidrs in ranges.items() for c in cidrs}
        have = {k for k, _ in bpfsys.dump(self.fd, _KEY.size, _VAL.size)}
        for k in have - want:
            bpfsys.delete(self.fd, k)
        for k in want - have:
            bpfsys.update(self.fd, k, _VAL.pack(1, 0, 0, 0))

    def dump(self) -> dict[int, tuple[str, ...]]:
        out: dict[int, list[str]] = {}
        for k, _ in bpfsys.dump(self.fd, _KEY.size, _VAL.size):
            rid, cidr = unpack_range(k)
            out.setdefault(rid, []).append(cidr)
        return {rid: tuple(sorted(c)) for rid, c in out.items()}
