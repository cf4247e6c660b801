"""The desired frontends, kept per Service so one Service can be re-translated alone.

Each frontend has one owner, chosen by a rule that depends only on the claims, never on the order in
which Services arrive (a set, a file, a relist):
  1. a ClusterIP claim beats an externalIP or load-balancer claim on the same address/port: the API
     server's allocator guarantees ClusterIPs are unique, while externalIPs and load-balancer
     addresses are user claims (CVE-2020-8554: a tenant's externalIP must not capture another
     Service's traffic);
  2. between two claims of the same kind, the older Service wins (metadata.creationTimestamp, then
     namespace/name).
A claim is on an address (ip, port, protocol) in both scopes at once: the Service that owns an
address owns its frontend for local callers and its frontend for traffic arriving at the node, so a
tenant's externalIP equal to another Service's ClusterIP cannot capture the traffic that arrives at
the node for it either.
A Service that loses a frontend keeps its others, is logged once, and is re-translated whenever a
frontend is freed (it may win it then).
"""
from __future__ import annotations

import logging

from .model import Backend, Frontend, FrontendState, ObjKey, Service

log = logging.getLogger("bpflb.service_table")

Claim = tuple[int, str, str, str]  # (0 ClusterIP | 1 external, creationTimestamp, namespace, name)
Addr = tuple[str, int, str]  # (ip, port, protocol): what a claim is on, whatever the scope


def addr_of(fe: Frontend) -> Addr:
    return (fe.ip, fe.port, fe.protocol)


def claim_of(svc: Service, fe: Frontend) -> Claim:
    """The rank of ``svc``'s claim on ``fe``: lower wins."""
    return (0 if fe.ip in svc.cluster_ips else 1, svc.created, svc.key.namespace, svc.key.name)


class ServiceTable:
    def __init__(self) -> None:
        self.want: dict[Frontend, FrontendState] = {}
        self.owner: dict[Frontend, ObjKey] = {}
        self.claim: dict[Frontend, Claim] = {}
        self.frontends_of: dict[ObjKey, set[Frontend]] = {}
        self.conflicts: dict[ObjKey, set[Frontend]] = {}  # Service -> frontends it wants but does not own
        self.entries = 0  # lb_services entries the owned frontends need (master + one per backend slot)
        self.backend_refs: dict[Backend, int] = {}  # distinct backends (lb_backends entries) and their users
        self.addr_owner: dict[Addr, tuple[ObjKey, Claim, int]] = {}  # address -> (owner, its claim, its frontends there)

    # ---- usage (admission: does a Service fit the maps?) ----------------------------------------
    def _own(self, fe: Frontend, key: ObjKey, state: FrontendState, claim: Claim) -> None:
        self.owner[fe], self.want[fe], self.claim[fe] = key, state, claim
        a = addr_of(fe)
        held = self.addr_owner.get(a)
        self.addr_owner[a] = (key, min(claim, held[1]) if held else claim, held[2] + 1 if held else 1)
        self.entries += 1 + len(state.backends)
        refs = self.backend_refs
        for b in state.backends:
            refs[b] = refs.get(b, 0) + 1

    def _disown(self, fe: Frontend) -> None:
        state = self.want.pop(fe)
        del self.owner[fe], self.claim[fe]
        a = addr_of(fe)
        key, claim, n = self.addr_owner[a]
        if n > 1:
            self.addr_owner[a] = (key, claim, n - 1)
        else:
            del self.addr_owner[a]
        self.entries -= 1 + len(state.backends)
        refs = self.backend_refs
        for b in state.backends:
            n = refs[b] - 1
            if n:
                refs[b] = n
            else:
                del refs[b]

    def usage_if(self, key: ObjKey, frontends: dict[Frontend, FrontendState]) -> tuple[int, int, int]:
        """(lb_services entries, frontends, distinct backends) the table would need if ``key``'s
        frontends were replaced by ``frontends`` (claims lost to others are not subtracted: an upper
        bound)."""
        mine = [fe for fe in self.frontends_of.get(key, ()) if self.owner.get(fe) == key]
        own_refs: dict[Backend, int] = {}
        entries = self.entries
        for fe in mine:
            state = self.want[fe]
            entries -= 1 + len(state.backends)
            for b in state.backends:
                own_refs[b] = own_refs.get(b, 0) + 1
        gone = sum(1 for b, n in own_refs.items() if self.backend_refs[b] == n)
        new = set()
        for state in frontends.values():
            entries += 1 + len(state.backends)
            new.update(b for b in state.backends if self.backend_refs.get(b, 0) == own_refs.get(b, 0))
        return entries, len(self.want) - len(mine) + len(frontends), len(self.backend_refs) - gone + len(new)

    def update(self, key: ObjKey, frontends: dict[Frontend, FrontendState],
               svc: Service | None = None) -> tuple[set[Frontend], set[ObjKey]]:
        """Replace one Service's frontends (``svc`` ranks its claims); returns (frontends touched,
        Services to re-translate: those that lost a frontend to it, and, when a frontend was
        freed, those that wanted one)."""
        touched: set[Frontend] = set()
        retry: set[ObjKey] = set()
        freed = False
        for fe in self.frontends_of.pop(key, set()):
            if self.owner.get(fe) == key:
                self._disown(fe)
                touched.add(fe)
                freed = True
        had_conflicts = self.conflicts.pop(key, set())
        mine: set[Frontend] = set()
        lost: set[Frontend] = set()
        # A Service's claim on an address is its best claim on any frontend there (a ClusterIP's
        # frontend for local callers ranks its frontend for arriving traffic too).
        best: dict[Addr, Claim] = {}
        for fe in frontends:
            c = claim_of(svc, fe) if svc is not None else (1, "", key.namespace, key.name)
            a = addr_of(fe)
            best[a] = min(c, best.get(a, c))
        for fe, state in frontends.items():
            a = addr_of(fe)
            c = best[a]
            held = self.addr_owner.get(a)
            other = held[0] if held else None
            if other is not None and other != key:
                if held[1] <= c:
                    lost.add(fe)
                    if fe not in had_conflicts:
                        log.warning("frontend %s of Service %s is Service %s's (%s); ignored", fe, key, other,
                                    _why(held[1], c))
                    continue
                # This claim wins: the other Service loses the address (and keeps its others).
                log.warning("frontend %s taken from Service %s by Service %s (%s)", fe, other, key,
                            _why(c, held[1]))
                for ofe in [f for f in self.frontends_of[other] if addr_of(f) == a]:
                    self.frontends_of[other].discard(ofe)
                    self.conflicts.setdefault(other, set()).add(ofe)
                    self._disown(ofe)
                    touched.add(ofe)
            self._own(fe, key, state, c)
            mine.add(fe)
            touched.add(fe)
        if mine:
            self.frontends_of[key] = mine
        if lost:
            self.conflicts[key] = lost
        if freed:
            gone = {addr_of(fe) for fe in touched}
            retry = {k for k, fes in self.conflicts.items() if k != key and any(addr_of(fe) in gone for fe in fes)}
        return touched, retry


def _why(winner: Claim, loser: Claim) -> str:
    if winner[0] != loser[0]:
        return "a ClusterIP beats an externalIP or load-balancer claim"
    if winner[1] != loser[1]:
        return "the older Service wins"
    return "equal age: the first by namespace/name wins"
