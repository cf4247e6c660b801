"""Read-only views of the pinned maps, as the datapath sees them (not the agent's memory)."""
from __future__ import annotations

import json
import os

from .maps.services import PinnedServiceMaps
from .maps.structs import SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_DROP_EMPTY
from .reconcile import SVC_F_NODEPORT, SVC_F_SNAT, SVC_F_SRC_RANGES


def service_rows(bpf_root: str) -> list[dict]:
    maps = PinnedServiceMaps(bpf_root)
    try:
        frontends = maps.dump_frontends()
        backends = maps.dump_backends()
        revnat = maps.dump_revnat()
    finally:
        maps.close()
    rows = []
    for fe in sorted(frontends):
        master, slots = frontends[fe]
        count = master.count if master else 0
        flags = master.flags if master else 0
        bes = []
        for slot in range(1, count + 1):
            bid = slots.get(slot)
            be = backends.get(bid) if bid is not None else None
            bes.append({"slot": slot, "backend_id": bid, "address": str(be) if be else None,
                        "state": "ok" if be else "MISSING"})
        rn = revnat.get(master.rev_nat_id) if master else None
        if master is None:
            action = "incomplete (no master entry)"
        elif count:
            action = "load-balance"
        else:
            action = "drop" if flags & SVC_F_DROP_EMPTY else "reject"
        external = fe.scope == SCOPE_EXTERNAL
        # An address served in both scopes has two rows; the one for traffic arriving at the node says so.
        name = (f"*:{fe.port}/{fe.protocol}" if flags & SVC_F_NODEPORT else str(fe)) + (" (external)" if external else "")
        rows.append({"frontend": name, "ip": fe.ip, "port": fe.port, "protocol": fe.protocol,
                     "scope": "external" if external else "internal",
                     "nodeport": bool(flags & SVC_F_NODEPORT), "snat": bool(flags & SVC_F_SNAT),
                     "source_ranges": bool(flags & SVC_F_SRC_RANGES),
                     "id": master.rev_nat_id if master else None, "action": action,
                     "affinity_timeout": master.affinity_timeout if master and flags & SVC_F_AFFINITY else 0,
                     "revnat_ok": rn == (fe.ip, fe.port), "backends": bes})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'ID':>5}  {'FRONTEND':<42} {'ACTION':<13} BACKENDS"]
    for r in rows:
        extra = f" affinity={r['affinity_timeout']}s" if r["affinity_timeout"] else ""
        extra += " snat" if r.get("snat") else ""
        extra += " source-ranges" if r.get("source_ranges") else ""
        bes = ", ".join(f"{b['slot']}:{b['address'] or 'MISSING'}" for b in r["backends"]) or "-"
        warn = "" if r["revnat_ok"] else "  (reverse NAT entry missing)"
        lines.append(f"{r['id'] or '-':>5}  {r['frontend']:<42} {r['action'] + extra:<13} {bes}{warn}")
    return "\n".join(lines)


def refused_rows(state_dir: str) -> dict[str, dict]:
    """Services the agent refused admission (lb/syncer.py writes the file): {"ns/name": {limit, reason}}."""
    try:
        with open(os.path.join(state_dir, "refused.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def format_refused(refused: dict[str, dict]) -> str:
    if not refused:
        return ""
    lines = ["", f"REFUSED ({len(refused)} Service(s) not programmed: they exceed a limit)"]
    for key, r in sorted(refused.items()):
        lines.append(f"  {key}: {r.get('reason', '')}")
    return "\n".join(lines)
