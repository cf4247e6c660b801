"""kube-proxy's service semantics on the real datapath: for ClusterIP traffic, exactly which backends
receive connections (300 connections over 2-4 candidates: a missing or extra backend cannot hide)."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest

from conftest import BE4, NODE, PORT, VIP4, backends_of, make_endpoint, make_service, make_slice, wait_for, write_manifests

N = 300


def node(zone="zone-a"):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}}}


endpoint = make_endpoint


def program(agent_folder, endpoints, svc_mut=None, protocol="TCP"):
    def mut(s):
        s["spec"]["ports"][0]["protocol"] = protocol
        if svc_mut:
            svc_mut(s)
    write_manifests(agent_folder, "svc.json", [
        node(), make_service("demo", "web", mut),
        make_slice("demo", "web-1", "web", [], lambda e: e.update(endpoints=endpoints), protocol=protocol)])


def answered(bed, target=f"{VIP4}:80", count=N, mode="tcp"):
    r = bed.run_client(target, "--mode", mode, "--count", str(count))
    return r


def addrs(ips):
    return {f"{ip}:{PORT}" for ip in ips}


@pytest.fixture
def setup(bed, agent):
    bed.servers(BE4, PORT)
    return agent


@pytest.mark.parametrize("name,endpoints,svc_mut,want", [
    ("topology-zone-hints", [endpoint(BE4[0], zones=["zone-a"]), endpoint(BE4[1], zones=["zone-a"]),
                             endpoint(BE4[2], zones=["zone-b"])], None, BE4[:2]),
    ("topology-ignored-when-not-all-hinted", [endpoint(BE4[0], zones=["zone-a"]), endpoint(BE4[1])], None, BE4[:2]),
    ("itp-local", [endpoint(BE4[0]), endpoint(BE4[1], node="node-b"), endpoint(BE4[2], node="node-b")],
     lambda s: s["spec"].update(internalTrafficPolicy="Local"), BE4[:1]),
    ("terminating-fallback", [endpoint(BE4[0], ready=False, serving=True, terminating=True),
                              endpoint(BE4[1], ready=False, serving=False, terminating=True),
                              endpoint(BE4[2], ready=False, serving=True, terminating=True)], None, [BE4[0], BE4[2]]),
    ("not-ready-excluded", [endpoint(BE4[0]), endpoint(BE4[1], ready=False), endpoint(BE4[2])], None, [BE4[0], BE4[2]]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_exactly_the_selected_backends_receive_connections(bed, setup, name, endpoints, svc_mut, want):
    program(setup.folder, endpoints, svc_mut)
    setup()
    r = answered(bed)
    assert r["errors"] == {}
    assert set(r["answered"]) == addrs(want)
    assert sum(r["answered"].values()) == N


def test_reject_when_no_serving_endpoint_anywhere(bed, setup):
    program(setup.folder, [endpoint(BE4[0], ready=False, serving=False)])
    setup()
    r = answered(bed, count=5)
    assert r["errors"] == {"ECONNREFUSED": 5} and r["seconds"] < 1.5


def test_drop_when_local_policy_leaves_none_here(bed, setup):
    program(setup.folder, [endpoint(BE4[0], node="node-b")], lambda s: s["spec"].update(internalTrafficPolicy="Local"))
    setup()
    r = answered(bed, count=5)
    assert r["answered"] == {}  # never a connection
    assert r["errors"] == {"EHOSTUNREACH": 5}  # an immediate error, distinct from the reject above


def test_session_affinity_sticks_then_expires(bed, setup):
    program(setup.folder, [endpoint(ip) for ip in BE4[:3]],
            lambda s: s["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 1}}))
    setup()
    first = answered(bed, count=60)
    assert first["errors"] == {} and len(first["answered"]) == 1  # one client, one backend
    sticky = next(iter(first["answered"]))
    # The timeout counts from the last new connection: after 1 s of silence the choice is free
    # again. Each round is a fresh 1-in-3 draw; 12 rounds all landing on `sticky` is < 1e-5.
    seen = {sticky}
    for _ in range(12):
        time.sleep(1.3)  # kernel time has to pass: the datapath reads bpf_ktime_get_boot_ns()
        r = answered(bed, count=20)
        assert r["errors"] == {} and len(r["answered"]) == 1
        seen |= set(r["answered"])
        if len(seen) > 1:
            break
    assert len(seen) > 1, "affinity never expired"


def test_affinity_never_picks_an_endpoint_the_policy_dropped(bed, setup):
    svc_mut = lambda s: s["spec"].update(sessionAffinity="ClientIP")  # noqa: E731 (default 10800 s)
    program(setup.folder, [endpoint(ip) for ip in BE4[:3]], svc_mut)
    setup()
    r = answered(bed, count=30)
    sticky = next(iter(r["answered"])).rsplit(":", 1)[0]
    others = [ip for ip in BE4[:3] if ip != sticky]
    program(setup.folder, [endpoint(sticky, ready=False)] + [endpoint(ip) for ip in others], svc_mut)
    wait_for(lambda: backends_of(bed, f"{VIP4}:80/TCP") == {f"{ip}:{PORT}" for ip in others})
    r = answered(bed, count=30)
    assert r["errors"] == {} and len(r["answered"]) == 1 and set(r["answered"]) <= addrs(others)


@pytest.mark.parametrize("target", [f"{VIP4}:80", f"[::ffff:{VIP4}]:80"], ids=["ipv4", "dual-stack-socket"])
def test_connected_udp_socket_leaves_a_removed_backend(bed, setup, target):
    """The dual-stack case: an AF_INET6 socket dialling the IPv4-mapped VIP is found by the AF_INET6
    sock_diag dump (its peer is the mapped backend) and destroyed all the same."""
    program(setup.folder, [endpoint(BE4[0])], protocol="UDP")
    setup()
    client = bed.client(target, "--mode", "udp-persistent", "--count", "0", "--interval", "0.01", "--timeout", "0.5")
    events: list[dict] = []
    threading.Thread(target=lambda: [events.append(json.loads(l)) for l in client.stdout], daemon=True).start()
    wait_for(lambda: sum(1 for e in events if e.get("answer") == f"{BE4[0]}:{PORT}") >= 10, what="replies from the first backend")
    program(setup.folder, [endpoint(BE4[1])], protocol="UDP")  # the first backend is removed (its server keeps running)
    wait_for(lambda: any(e.get("answer") == f"{BE4[1]}:{PORT}" for e in events), timeout=10,
             what="the socket to move to the new backend")
    mark = len(events)
    wait_for(lambda: len(events) >= mark + 20, what="more replies")
    client.send_signal(signal.SIGTERM)
    client.wait(timeout=10)
    errors = [e["error"] for e in events if "error" in e]
    # Destroyed once, then reconnected through the service. The errno depends on where the
    # application was: blocked in recv() -> ECONNABORTED; its next send() on the now unconnected
    # socket -> EDESTADDRREQ.
    assert len(errors) == 1 and errors[0] in ("ECONNABORTED", "EDESTADDRREQ"), errors
    after = [e.get("answer") for e in events[mark:] if "answer" in e]
    assert after and set(after) == {f"{BE4[1]}:{PORT}"}
