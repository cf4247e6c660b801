"""The agent's recording and sync logic against in-memory maps: nothing pruned before every source
listed, one Service's change reprograms that Service only, health follows pending changes."""
from __future__ import annotations

import asyncio

from conftest import make_service, make_slice
from lb.agent import Agent
from lb.maps.fake import FakeServiceMaps
from lb.model import Backend, Frontend, FrontendState
from lb.reconcile import Reconciler
from lb.settings import Settings, SyncSettings

OLD = Frontend("10.96.9.9", 80, "TCP")


def agent_with_maps():
    maps = FakeServiceMaps()
    Reconciler(maps).sync({OLD: FrontendState((Backend("10.0.0.9", 80, "TCP"),))})  # left by a previous agent
    a = Agent(Settings(node_name="n", healthz_bind="", metrics_bind="", sync=SyncSettings(min_interval=0.0)))
    a.reconciler = Reconciler(maps)
    return a, maps


def svc(name, ip):
    return make_service("ns", name, lambda s: s["spec"].update(clusterIP=ip, clusterIPs=[ip]))


async def settle(a: Agent):
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_nothing_is_pruned_until_services_and_slices_are_listed():
    a, maps = agent_with_maps()

    async def main():
        loop_task = asyncio.create_task(a.sync_loop())
        a.api_services([svc("web", "10.96.0.10")])  # Services listed, EndpointSlices not yet
        await settle(a)
        assert OLD in maps.masters and Frontend("10.96.0.10", 80, "TCP") not in maps.masters
        a.api_slices([make_slice("ns", "web-1", "web", ["10.0.0.1"])])
        a.listed = True  # what the informers' all_listed task does
        a.changed()
        await settle(a)
        assert OLD not in maps.masters  # pruned only now
        assert maps.resolve(Frontend("10.96.0.10", 80, "TCP")) == [Backend("10.0.0.1", 8080, "TCP")]
        a.stop.set()
        a.wake.set()
        await loop_task
    asyncio.run(main())
    assert a.ready and a.health.healthy()[0]


def test_a_change_to_one_service_reprograms_that_service_only():
    a, maps = agent_with_maps()
    a.api_services([svc(f"s{i}", f"10.96.1.{i}") for i in range(50)])
    a.api_slices([make_slice("ns", f"s{i}-1", f"s{i}", [f"10.0.1.{i}"]) for i in range(50)])
    a.listed = True
    a.sync_once(full=True)
    maps.ops.clear()
    a.api_slice_event("MODIFIED", make_slice("ns", "s7-1", "s7", ["10.0.1.7", "10.0.2.7"]))
    a.sync_once()
    # one new backend (its ID reuses the one the pruned frontend freed), one slot, one master: nothing else
    assert maps.ops[0].startswith("backend ") and maps.ops[1:] == ["slot 10.96.1.7:80/TCP 2", "master 10.96.1.7:80/TCP"]


def test_health_fails_when_a_change_stays_unprogrammed_too_long():
    now = [1000.0]
    a = Agent(Settings(node_name="n", healthz_bind="", metrics_bind="", health_timeout=60), wall=lambda: now[0])
    assert a.health.body(True)[0] == 200  # starting: healthy
    a.changed()
    now[0] += 59
    assert a.health.body(True)[0] == 200
    now[0] += 2
    status, doc = a.health.body(True)
    assert status == 503 and set(doc) == {"lastUpdated", "currentTime", "nodeEligible"}
    a.health.updated()
    assert a.health.body(True)[0] == 200


def test_node_being_deleted_fails_healthz_but_not_livez():
    a = Agent(Settings(node_name="n", healthz_bind="", metrics_bind=""))
    a.api_nodes([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"},
                  "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}])
    assert a.health.body(True) [0] == 503 and a.health.body(True)[1]["nodeEligible"] is False
    assert a.health.body(False)[0] == 200


def test_every_node_from_the_api_feeds_the_pod_network_plan():
    from lb.testing.cluster import node_object

    a = Agent(Settings(node_name="node1", healthz_bind="", metrics_bind="", network_mode="direct"))
    a.api_nodes([node_object(1, "node1"), node_object(2, "node2")])
    a.api_node_event("ADDED", node_object(3, "node3"))
    a.reconciler = Reconciler(FakeServiceMaps())
    a.listed = True
    a.sync_once(full=True)
    assert sorted((r.dst, r.gateway) for r in a.net_plan.routes) == [
        ("10.244.2.0/24", "192.168.50.2"), ("10.244.3.0/24", "192.168.50.3")]
    a.api_node_event("DELETED", node_object(3, "node3"))
    a.sync_once()
    assert [(r.dst, r.gateway) for r in a.net_plan.routes] == [("10.244.2.0/24", "192.168.50.2")]
