"""The agent's recording and sync rules against in-memory maps: nothing pruned before every source
listed, one Service's change reprograms that Service only, health follows pending changes, a failed
sync is retried without a restore."""
from __future__ import annotations

import asyncio

from conftest import make_service, make_slice
from lb.agent import Agent
from lb.maps.fake import FakeServiceMaps, FaultyServiceMaps
from lb.model import Backend, Frontend, FrontendState
from lb.objects import parse
from lb.reconcile import Reconciler
from lb.settings import Settings, SyncSettings
from lb.source.handler import Intake

OLD = Frontend("10.96.9.9", 80, "TCP")


def agent_with_maps(maps=None, **settings):
    maps = maps or FakeServiceMaps()
    Reconciler(maps).sync({OLD: FrontendState((Backend("10.0.0.9", 80, "TCP"),))})  # left by a previous agent
    a = Agent(Settings(node_name="n", healthz_bind="", metrics_bind="", sync=SyncSettings(min_interval=0.0),
                       **settings))
    a.use_maps(Reconciler(maps))
    return a, maps, Intake(a.tracker)


def svc(name, ip):
    return parse("Service", make_service("ns", name, lambda s: s["spec"].update(clusterIP=ip, clusterIPs=[ip])))


def es(name, service, ips):
    return parse("EndpointSlice", make_slice("ns", name, service, ips))


async def settle():
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_nothing_is_pruned_until_services_and_slices_are_listed():
    a, maps, intake = agent_with_maps()

    async def main():
        loop_task = asyncio.create_task(a.sync_loop())
        intake.listed("Service", [svc("web", "10.96.0.10")])  # Services listed, EndpointSlices not yet
        await settle()
        assert OLD in maps.masters and Frontend("10.96.0.10", 80, "TCP") not in maps.masters
        intake.listed("EndpointSlice", [es("web-1", "web", ["10.0.0.1"])])
        intake.synced()  # what the kube source does once every informer listed
        await settle()
        assert OLD not in maps.masters  # pruned only now
        assert maps.resolve(Frontend("10.96.0.10", 80, "TCP")) == [Backend("10.0.0.1", 8080, "TCP")]
        a.stop.set()
        a.runner.run()
        await loop_task
    asyncio.run(main())
    assert a.syncer.ready and a.health.healthy()[0]


def test_a_change_to_one_service_reprograms_that_service_only():
    a, maps, intake = agent_with_maps()
    intake.listed("Service", [svc(f"s{i}", f"10.96.1.{i}") for i in range(50)])
    intake.listed("EndpointSlice", [es(f"s{i}-1", f"s{i}", [f"10.0.1.{i}"]) for i in range(50)])
    intake.synced()
    asyncio.run(a.syncer(True))
    maps.ops.clear()
    intake.changed(es("s7-1", "s7", ["10.0.1.7", "10.0.2.7"]))
    asyncio.run(a.syncer(False))
    # one new backend (its ID reuses the one the pruned frontend freed), one slot, one master: nothing else
    assert maps.ops[0].startswith("backend ") and maps.ops[1:] == ["slot 10.96.1.7:80/TCP 2", "master 10.96.1.7:80/TCP"]


def test_a_failed_sync_keeps_its_services_and_the_retry_needs_no_restore():
    maps = FaultyServiceMaps(fail_at=10_000)  # armed below
    a, _, intake = agent_with_maps(maps)
    intake.listed("Service", [svc("a", "10.96.2.1")])
    intake.listed("EndpointSlice", [es("a-1", "a", ["10.0.3.1"])])
    intake.synced()
    asyncio.run(a.syncer(True))
    restores = []
    a.syncer.reconciler.restore = lambda: restores.append(1)  # a retry must not need it
    maps.fail_at, maps.calls = 1, 0  # the next write call fails: a full backends map
    intake.changed(es("a-1", "a", ["10.0.3.1", "10.0.3.2"]))
    try:
        asyncio.run(a.syncer(False))
        raise AssertionError("the sync should have failed")
    except Exception as e:
        assert "full" in str(e)
    assert a.tracker.dirty  # the Service is still to do
    asyncio.run(a.syncer(False))
    assert maps.resolve(Frontend("10.96.2.1", 80, "TCP")) == [Backend("10.0.3.1", 8080, "TCP"),
                                                              Backend("10.0.3.2", 8080, "TCP")]
    assert restores == [] and a.metrics.sync_errors._value.get() == 1


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
    Intake(a.tracker).listed("Node", [parse("Node", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"},
                             "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})])
    assert a.health.body(True)[0] == 503 and a.health.body(True)[1]["nodeEligible"] is False
    assert a.health.body(False)[0] == 200


def test_every_node_from_the_api_feeds_the_pod_network_plan():
    from lb.testing.cluster import node_object

    a, _, intake = agent_with_maps(network_mode="direct")
    a.settings = a.syncer.settings = Settings(node_name="node1", healthz_bind="", metrics_bind="", network_mode="direct")
    a.tracker.node_name = "node1"
    intake.listed("Node", [parse("Node", node_object(1, "node1")), parse("Node", node_object(2, "node2"))])
    intake.changed(parse("Node", node_object(3, "node3")))
    intake.synced()
    a.syncer.plan_and_reconcile(True)
    assert sorted((r.dst, r.gateway) for r in a.syncer.net_plan.routes) == [
        ("10.244.2.0/24", "192.168.50.2"), ("10.244.3.0/24", "192.168.50.3")]
    intake.deleted("Node", parse("Node", node_object(3, "node3")).key)
    a.syncer.plan_and_reconcile(False)
    assert [(r.dst, r.gateway) for r in a.syncer.net_plan.routes] == [("10.244.2.0/24", "192.168.50.2")]
