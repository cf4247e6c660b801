"""Frontend ownership is decided by the claims alone: a ClusterIP beats an externalIP or load-balancer
claim, then the older Service, then namespace/name; never the order Services arrive in."""
from __future__ import annotations

import itertools

import pytest

from lb.model import Backend, Frontend, FrontendState, ObjKey, Service, ServicePort
from lb.service_table import ServiceTable
from lb.translate import NodeView, translate_service

VIP = "10.96.0.10"


def svc(name, cluster_ip, external=(), created="2026-01-01T00:00:00Z", ns="ns", lb=()):
    return Service(ObjKey(ns, name), "LoadBalancer" if lb else "ClusterIP", (cluster_ip,),
                   (ServicePort("", 80, "TCP"),), tuple(external), tuple(lb), created=created)


def frontends(s: Service):
    return translate_service(s, [], NodeView("n"))


def owners(services, order):
    """Feed the Services in ``order`` (and re-translate what the table asks to retry) -> owner by frontend."""
    table = ServiceTable()
    todo = [services[i] for i in order]
    while todo:
        retry = set()
        for s in todo:
            retry |= table.update(s.key, frontends(s), s)[1]
        todo = [s for s in services if s.key in retry]
    return {str(fe): str(k) for fe, k in table.owner.items()}


CASES = [
    pytest.param([svc("victim", VIP), svc("tenant", "10.96.0.99", external=[VIP], created="2020-01-01T00:00:00Z")],
                 {f"{VIP}:80/TCP": "ns/victim", "10.96.0.99:80/TCP": "ns/tenant"},
                 id="ClusterIP beats an older Service's externalIP (CVE-2020-8554)"),
    pytest.param([svc("victim", VIP), svc("lb", "10.96.0.98", lb=[VIP], created="2020-01-01T00:00:00Z")],
                 {f"{VIP}:80/TCP": "ns/victim", "10.96.0.98:80/TCP": "ns/lb"},
                 id="ClusterIP beats a load-balancer claim"),
    pytest.param([svc("new", "10.96.0.1", external=["192.168.1.1"], created="2026-05-01T00:00:00Z"),
                  svc("old", "10.96.0.2", external=["192.168.1.1"], created="2026-04-01T00:00:00Z")],
                 {"10.96.0.1:80/TCP": "ns/new", "10.96.0.2:80/TCP": "ns/old", "192.168.1.1:80/TCP": "ns/old"},
                 id="between two externalIP claims the older wins"),
    pytest.param([svc("b", "10.96.0.1", external=["192.168.1.1"]), svc("a", "10.96.0.2", external=["192.168.1.1"]),
                  svc("c", "10.96.0.3", external=["192.168.1.1"], ns="aa")],
                 {"10.96.0.1:80/TCP": "ns/b", "10.96.0.2:80/TCP": "ns/a", "10.96.0.3:80/TCP": "aa/c",
                  "192.168.1.1:80/TCP": "aa/c"},
                 id="equal age: namespace then name"),
]


@pytest.mark.parametrize("services, want", CASES)
def test_the_owner_does_not_depend_on_arrival_order(services, want):
    for order in itertools.permutations(range(len(services))):
        assert owners(services, order) == want, order


def test_a_freed_frontend_goes_to_the_next_claim_and_the_loser_keeps_its_others():
    table = ServiceTable()
    old = svc("old", "10.96.0.2", external=["192.168.1.1"], created="2026-04-01T00:00:00Z")
    new = svc("new", "10.96.0.1", external=["192.168.1.1"], created="2026-05-01T00:00:00Z")
    table.update(new.key, frontends(new), new)
    touched, retry = table.update(old.key, frontends(old), old)
    assert table.owner[Frontend("192.168.1.1", 80, "TCP")] == old.key  # taken over
    assert table.owner[Frontend("10.96.0.1", 80, "TCP")] == new.key  # the loser keeps its ClusterIP
    # the older Service goes away: its externalIP is freed and the newer one is asked to retry
    touched, retry = table.update(old.key, {}, None)
    assert retry == {new.key}
    table.update(new.key, frontends(new), new)
    assert table.owner[Frontend("192.168.1.1", 80, "TCP")] == new.key
    assert table.want[Frontend("192.168.1.1", 80, "TCP")] == frontends(new)[Frontend("192.168.1.1", 80, "TCP")]
