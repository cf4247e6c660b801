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


# ---- north-south: what the agent programs for NodePort / LoadBalancer / externalIP Services ------------

from lb.maps.structs import SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_DROP_EMPTY  # noqa: E402
from lb.reconcile import SVC_F_NODEPORT, SVC_F_SNAT, SVC_F_SRC_RANGES  # noqa: E402
from lb.testing.cluster import node_object  # noqa: E402

FLAG_NAMES = ((SVC_F_DROP_EMPTY, "drop-empty"), (SVC_F_AFFINITY, "affinity"), (SVC_F_SNAT, "snat"),
              (SVC_F_SRC_RANGES, "src-ranges"), (SVC_F_NODEPORT, "nodeport"))


class FakeNorthSouth:
    """Records what the syncer writes to the tc datapath's maps and loader."""

    def __init__(self):
        self.node_addrs, self.src_ranges, self.attached, self.calls = None, None, [], []

    def write_node_addrs(self, local, remote):
        self.node_addrs = (set(local), set(remote))
        self.calls.append("node_addrs")

    def write_src_ranges(self, ranges):
        self.src_ranges = dict(ranges)
        self.calls.append("src_ranges")

    def attach(self, devices):
        self.attached.append(list(devices))
        return []


def programmed_lines(maps) -> list[str]:
    """Golden text: scope, frontend, master flags, backends (ClusterIPs included)."""
    out = []
    for fe in sorted(maps.masters):
        m = maps.masters[fe]
        flags = [n for f, n in FLAG_NAMES if m.flags & f]
        bes = ",".join(b.ip for b in maps.resolve(fe)) or ("DROP" if m.flags & SVC_F_DROP_EMPTY else "REJECT")
        out.append(f"{'EXT' if fe.scope == SCOPE_EXTERNAL else 'INT'} {fe} [{' '.join(flags)}] -> {bes}")
    return out


def ns_agent(**settings):
    maps, ns = FakeServiceMaps(), FakeNorthSouth()
    a = Agent(Settings(node_name="node1", healthz_bind="", metrics_bind="", sync=SyncSettings(min_interval=0.0),
                       **settings))
    ifaces = {"lo": ("127.0.0.1", "::1"), "eth0": ("192.168.50.1", "fd00:50::1"), "eth9": ("10.9.9.9",)}
    a.use_maps(Reconciler(maps), ns, interfaces=lambda: ifaces)
    intake = Intake(a.tracker)
    intake.listed("Node", [parse("Node", node_object(1, "node1")), parse("Node", node_object(2, "node2"))])
    return a, maps, ns, intake


def ext_service(name, policy, mutate=None):
    def m(s):
        s["spec"].update(type="NodePort", externalTrafficPolicy=policy)
        s["spec"]["ports"][0]["nodePort"] = 30080
        if mutate:
            mutate(s)
    return parse("Service", make_service("ns", name, m))


def endpoints_on(name, service, placed):
    """placed: [(ip, node)]"""
    def m(e):
        e["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": n} for ip, n in placed]
    return parse("EndpointSlice", make_slice("ns", name, service, [], m))


PLACED = [("10.244.1.5", "node1"), ("10.244.2.5", "node2")]


def test_nodeport_etp_cluster_programs_wildcards_node_addresses_and_devices():
    a, maps, ns, intake = ns_agent()
    intake.listed("Service", [ext_service("web", "Cluster")])
    intake.listed("EndpointSlice", [endpoints_on("web-1", "web", PLACED)])
    intake.synced()
    asyncio.run(a.syncer(True))
    assert programmed_lines(maps) == [
        "INT 0.0.0.0:30080/TCP [nodeport] -> 10.244.1.5,10.244.2.5",
        "EXT 0.0.0.0:30080/TCP [snat nodeport] -> 10.244.1.5,10.244.2.5",
        "INT 10.96.0.10:80/TCP [] -> 10.244.1.5,10.244.2.5"]
    # --nodeport-addresses primary: the Node's InternalIP (/32); IPv6, where the Node has no address,
    # matches every non-loopback address (NewNodePortAddresses); the other node's IP for local callers
    assert ns.node_addrs == ({"192.168.50.1", "fd00:50::1"}, {"192.168.50.2"})
    assert ns.attached == [["eth0"]] and ns.src_ranges == {}
    # nothing changed: nothing rewritten, nothing re-attached
    ns.calls.clear()
    asyncio.run(a.syncer(False))
    assert ns.calls == [] and ns.attached == [["eth0"]]


def test_nodeport_etp_local_drops_without_a_local_endpoint_and_rejects_without_any():
    a, maps, ns, intake = ns_agent()
    intake.listed("Service", [ext_service("web", "Local")])
    intake.listed("EndpointSlice", [endpoints_on("web-1", "web", PLACED)])
    intake.synced()
    asyncio.run(a.syncer(True))
    assert programmed_lines(maps) == [
        "INT 0.0.0.0:30080/TCP [nodeport] -> 10.244.1.5,10.244.2.5",
        "EXT 0.0.0.0:30080/TCP [nodeport] -> 10.244.1.5",
        "INT 10.96.0.10:80/TCP [] -> 10.244.1.5,10.244.2.5"]
    intake.changed(endpoints_on("web-1", "web", PLACED[1:]))
    asyncio.run(a.syncer(False))
    assert programmed_lines(maps)[1] == "EXT 0.0.0.0:30080/TCP [drop-empty nodeport] -> DROP"
    intake.changed(endpoints_on("web-1", "web", []))
    asyncio.run(a.syncer(False))
    assert programmed_lines(maps) == [
        "INT 0.0.0.0:30080/TCP [nodeport] -> REJECT",
        "EXT 0.0.0.0:30080/TCP [nodeport] -> REJECT",
        "INT 10.96.0.10:80/TCP [] -> REJECT"]


def lb_status(vip="192.0.2.10", ranges=None, affinity=False, hc_port=0, external_ips=()):
    def m(s):
        s["spec"]["type"] = "LoadBalancer"
        s["status"] = {"loadBalancer": {"ingress": [{"ip": vip}]}}
        if ranges:
            s["spec"]["loadBalancerSourceRanges"] = ranges
        if affinity:
            s["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
        if hc_port:
            s["spec"]["healthCheckNodePort"] = hc_port
        if external_ips:
            s["spec"]["externalIPs"] = list(external_ips)
    return m


def test_load_balancer_source_ranges_are_written_by_frontend_id_and_follow_the_service():
    a, maps, ns, intake = ns_agent()
    intake.listed("Service", [ext_service("web", "Cluster", lb_status(ranges=["203.0.113.0/24"], affinity=True))])
    intake.listed("EndpointSlice", [endpoints_on("web-1", "web", PLACED)])
    intake.synced()
    asyncio.run(a.syncer(True))
    lines = programmed_lines(maps)
    assert "EXT 192.0.2.10:80/TCP [affinity snat src-ranges] -> 10.244.1.5,10.244.2.5" in lines
    assert "INT 192.0.2.10:80/TCP [affinity src-ranges] -> 10.244.1.5,10.244.2.5" in lines
    assert "EXT 0.0.0.0:30080/TCP [affinity snat nodeport] -> 10.244.1.5,10.244.2.5" in lines  # not filtered
    ids = {maps.masters[fe].rev_nat_id for fe in maps.masters if fe.ip == "192.0.2.10"}
    assert len(ids) == 2 and ns.src_ranges == {i: ("203.0.113.0/24",) for i in ids}
    # ranges removed from the Service: the entries go, and so does the flag
    intake.changed(ext_service("web", "Cluster", lb_status(affinity=True)))
    asyncio.run(a.syncer(False))
    assert ns.src_ranges == {} and not any(m.flags & SVC_F_SRC_RANGES for m in maps.masters.values())


def test_external_ips_are_served_in_both_scopes_by_policy():
    for policy, ext in (("Cluster", "[snat] -> 10.244.1.5,10.244.2.5"), ("Local", "[] -> 10.244.1.5")):
        a, maps, ns, intake = ns_agent()
        svc = parse("Service", make_service("ns", "web", lambda s: s["spec"].update(
            externalIPs=["198.51.100.7"], externalTrafficPolicy=policy)))
        intake.listed("Service", [svc])
        intake.listed("EndpointSlice", [endpoints_on("web-1", "web", PLACED)])
        intake.synced()
        asyncio.run(a.syncer(True))
        assert programmed_lines(maps) == [
            "INT 10.96.0.10:80/TCP [] -> 10.244.1.5,10.244.2.5",
            "INT 198.51.100.7:80/TCP [] -> 10.244.1.5,10.244.2.5",
            f"EXT 198.51.100.7:80/TCP {ext}"], policy


def test_health_check_node_port_follows_local_endpoints_and_the_service():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def get():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        status = (await reader.readline()).decode().strip()
        writer.close()
        return status

    async def main():
        a, maps, ns, intake = ns_agent(nodeport_addresses="127.0.0.0/8")
        intake.listed("Service", [ext_service("web", "Local", lb_status(hc_port=port))])
        intake.listed("EndpointSlice", [endpoints_on("web-1", "web", PLACED)])
        intake.synced()
        await a.syncer(True)
        seen = [await get()]
        intake.changed(endpoints_on("web-1", "web", PLACED[1:]))  # no local endpoint left
        await a.syncer(False)
        seen.append(await get())
        assert programmed_lines(maps)[1] == "EXT 0.0.0.0:30080/TCP [drop-empty nodeport] -> DROP"
        intake.changed(ext_service("web", "Cluster", lb_status(hc_port=port)))  # no longer needs a health check
        await a.syncer(False)
        try:
            await get()
            seen.append("open")
        except ConnectionRefusedError:
            seen.append("closed")
        await a.syncer.close()
        return seen
    assert asyncio.run(main()) == ["HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable", "closed"]
