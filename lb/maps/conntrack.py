"""The tc datapath's translation state, read from lb_ct (client's direction) and lb_nat (replies and
masquerade ports), for ``bpflb ct list`` and ``bpflb nat list``. Read-only: the programs own them."""
from __future__ import annotations

import os
import time

from . import bpfsys
from .addr import host_port, proto_name, unpack_ip
from .structs import (CT_F_CLOSING, CT_F_ENDED, CT_F_LOCAL, CT_F_NODEPORT, CT_F_REPLIED, CT_F_RST, CT_F_SNAT, CT_MAP, NAT_MAP, CtTuple,
                      CtVal, NatVal, packer)

_TUPLE = packer(CtTuple)
_CT = packer(CtVal)
_NAT = packer(NatVal)
_FLAGS = ((CT_F_SNAT, "snat"), (CT_F_LOCAL, "local"), (CT_F_REPLIED, "replied"), (CT_F_CLOSING, "closing"),
          (CT_F_NODEPORT, "nodeport"), (CT_F_RST, "rst"))


def _hostport(raw: bytes, port: int) -> str:
    ip = unpack_ip(raw)
    return f"[{ip}]:{host_port(port)}" if ":" in ip else f"{ip}:{host_port(port)}"


def flag_names(flags: int) -> list[str]:
    return [n for f, n in _FLAGS if flags & f]


def _dump(bpf_root: str, name: str, val_size: int) -> list[tuple[bytes, bytes]]:
    try:
        fd = bpfsys.obj_get(os.path.join(bpf_root, name))
    except OSError as e:
        raise FileNotFoundError(f"{name} not found under {bpf_root} ({e.strerror}): "
                                f"is the agent running with --bpf-root {bpf_root}?") from None
    try:
        return bpfsys.dump(fd, _TUPLE.size, val_size)
    finally:
        os.close(fd)


def _tuple(raw: bytes) -> tuple[str, str, str]:
    saddr, daddr, sport, dport, proto, *_ = _TUPLE.unpack(raw)
    return proto_name(proto), _hostport(saddr, sport), _hostport(daddr, dport)


def ct_rows(bpf_root: str) -> list[dict]:
    """One row per tracked flow: as the client sent it, where it goes, and its state. (An entry whose flow
    is over and whose masquerade port another flow took, CT_F_ENDED, is no flow: not listed.)"""
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    rows = []
    for k, v in _dump(bpf_root, CT_MAP, _CT.size):
        proto, client, frontend = _tuple(k)
        (backend, nat_addr, backend_port, nat_port, backend_id, rev_nat_id, ifindex_in, ifindex_out, slot, flags,
         *rest) = _CT.unpack(v)
        created_ns, last_ns = rest[-2], rest[-1]
        if flags & CT_F_ENDED:
            continue
        rows.append({"protocol": proto, "client": client, "frontend": frontend,
                     "backend": _hostport(backend, backend_port),
                     "masquerade": _hostport(nat_addr, nat_port) if flags & CT_F_SNAT else None,
                     "service_id": rev_nat_id, "backend_id": backend_id, "slot": slot, "flags": flag_names(flags),
                     "in_ifindex": ifindex_in, "out_ifindex": ifindex_out if flags & CT_F_LOCAL else None,
                     "age_s": round((now - created_ns) / 1e9, 3), "idle_s": round((now - last_ns) / 1e9, 3)})
    return sorted(rows, key=lambda r: (r["frontend"], r["client"]))


def nat_rows(bpf_root: str) -> list[dict]:
    """One row per reply tuple: what a backend's reply looks like on arrival and what it becomes."""
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    rows = []
    for k, v in _dump(bpf_root, NAT_MAP, _NAT.size):
        proto, backend, to = _tuple(k)
        client, frontend, client_port, frontend_port, ifindex_in, flags, _gen, rev_nat_id, last_ns = _NAT.unpack(v)
        rows.append({"protocol": proto, "backend": backend, "reply_to": to,
                     "client": _hostport(client, client_port), "frontend": _hostport(frontend, frontend_port),
                     "masquerade": bool(flags & CT_F_SNAT), "service_id": rev_nat_id, "flags": flag_names(flags),
                     "out_ifindex": ifindex_in, "idle_s": round((now - last_ns) / 1e9, 3)})
    return sorted(rows, key=lambda r: (r["frontend"], r["client"]))


def format_ct(rows: list[dict]) -> str:
    lines = [f"{'PROTO':<5} {'CLIENT':<28} {'FRONTEND':<28} {'BACKEND':<28} {'MASQUERADE':<28} FLAGS  IDLE"]
    for r in rows:
        lines.append(f"{r['protocol']:<5} {r['client']:<28} {r['frontend']:<28} {r['backend']:<28} "
                     f"{r['masquerade'] or '-':<28} {','.join(r['flags']) or '-'}  {r['idle_s']}s")
    return "\n".join(lines)


def format_nat(rows: list[dict]) -> str:
    lines = [f"{'PROTO':<5} {'BACKEND':<28} {'REPLY TO':<28} {'CLIENT':<28} {'FRONTEND':<28} IDLE"]
    for r in rows:
        to = r["reply_to"] + (" (masq)" if r["masquerade"] else "")
        lines.append(f"{r['protocol']:<5} {r['backend']:<28} {to:<28} {r['client']:<28} {r['frontend']:<28} "
                     f"{r['idle_s']}s")
    return "\n".join(lines)
