"""The socket-level datapath on the real kernel, driven by the real agent over a manifest folder.

Clients run in the bed's client namespace (no route out) and in the served cgroup; backends are
identity servers in the backend namespace. A VIP the datapath failed to translate gets ENETUNREACH.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from conftest import (BE4, BE6, NODE, PORT, VIP4, VIP6, ROOT, backends_of, make_service, make_slice, programmed,
                      stop_client, wait_for, write_manifests)


def dual_stack(mutate=None):
    def m(s):
        s["spec"]["clusterIPs"] = [VIP4, VIP6]
        s["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
        s["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
        if mutate:
            mutate(s)
    return m


def web(ips4, ips6=()):
    objs = [make_service("demo", "web", dual_stack()),
            make_slice("demo", "web-v4", "web", list(ips4)),
            make_slice("demo", "web-v6", "web", list(ips6))]
    for es in objs[1:]:
        es["ports"].append({"name": "dns", "port": PORT, "protocol": "UDP"})
    return objs


def ids(addrs):
    return {f"[{a}]:{PORT}" if ":" in a else f"{a}:{PORT}" for a in addrs}


@pytest.fixture
def servers(bed):
    return bed.servers(BE4 + BE6, PORT)


@pytest.fixture
def web_agent(bed, agent, servers):
    write_manifests(agent.folder, "web.json", web(BE4[:3], BE6[:3]))
    return agent()


@pytest.mark.parametrize("target,expected", [
    (f"{VIP4}:80", BE4[:3]),
    (f"[{VIP6}]:80", BE6[:3]),
], ids=["tcp-v4", "tcp-v6"])
def test_tcp_spreads_over_every_ready_backend_and_peer_is_the_vip(bed, web_agent, target, expected):
    r = bed.run_client(target, "--count", "300")
    assert r["errors"] == {}
    assert set(r["answered"]) == {f"{a}:{PORT}" for a in expected}  # every backend, nothing else
    assert min(r["answered"].values()) > 300 / 3 * 0.5  # a fair spread, not one backend
    vip = target.rsplit(":", 1)[0].strip("[]")
    assert r["peers"] == {f"{vip}:80": 300}  # getpeername reports the ClusterIP


@pytest.mark.parametrize("target,mode,expected", [
    (f"{VIP4}:53", "udp", BE4[:3]),
    (f"[{VIP6}]:53", "udp", BE6[:3]),
    (f"{VIP4}:53", "udp-connected", BE4[:3]),
    (f"[{VIP6}]:53", "udp-connected", BE6[:3]),
], ids=["udp-v4", "udp-v6", "connected-udp-v4", "connected-udp-v6"])
def test_udp_replies_come_from_the_vip(bed, web_agent, target, mode, expected):
    r = bed.run_client(target, "--mode", mode, "--count", "150")
    assert r["errors"] == {}
    assert set(r["answered"]) == {f"{a}:{PORT}" for a in expected}
    vip = target.rsplit(":", 1)[0].strip("[]")
    if mode == "udp":
        assert r["sources"] == {f"{vip}:53": 150}  # recvfrom: the reply's source is the ClusterIP
    else:
        assert r["peers"] == {f"{vip}:53": 150}


@pytest.mark.parametrize("target,mode", [
    (f"{VIP4}:80", "tcp"),  # reverse NAT in the socket's storage: never in the map
    (f"[{VIP6}]:80", "tcp"),
    (f"{VIP4}:53", "udp-connected"),  # in the map until the release hook forgets it
    (f"[{VIP6}]:53", "udp-connected"),
], ids=["tcp-v4", "tcp-v6", "connected-udp-v4", "connected-udp-v6"])
def test_closed_sockets_leave_no_reverse_nat_entry(bed, web_agent, target, mode):
    from lb.maps.services import map_fill

    r = bed.run_client(target, "--mode", mode, "--count", "200")
    vip = target.rsplit(":", 1)[0].strip("[]")
    assert r["errors"] == {} and r["peers"] == {f"{vip}:{target.rsplit(':', 1)[1]}": 200}  # getpeername while open
    assert map_fill(bed.bpf_root)["lb_sock_revnat_v1"] == 0


def test_wrong_port_on_a_cluster_ip_is_not_translated(bed, web_agent):
    r = bed.run_client(f"{VIP4}:81", "--count", "5")
    assert r["errors"] == {"ENETUNREACH": 5}  # left alone: no route to the VIP in the client netns
    r = bed.run_client(f"{VIP4}:80", "--mode", "udp", "--count", "3", "--timeout", "0.3")
    assert r["errors"] == {"ENETUNREACH": 3}  # port 80 is TCP only


def test_no_ready_backend_refuses_at_once(bed, agent, servers):
    objs = web([])
    objs[1]["endpoints"] = [{"addresses": [BE4[0]], "conditions": {"ready": False, "serving": False}}]
    write_manifests(agent.folder, "web.json", objs)
    agent()
    for target, mode in ((f"{VIP4}:80", "tcp"), (f"[{VIP6}]:80", "tcp"), (f"{VIP4}:53", "udp"),
                         (f"{VIP4}:53", "udp-connected")):
        r = bed.run_client(target, "--mode", mode, "--count", "5")
        assert r["errors"] == {"ECONNREFUSED": 5}, (target, mode, r)
        assert r["seconds"] < 1.5  # at once, not after the 2 s client timeout


def test_backend_changes_under_a_connect_loop_never_fail_a_connect(bed, agent, servers):
    write_manifests(agent.folder, "web.json", web(BE4[:2]))
    agent()
    loop = bed.client(f"{VIP4}:80", "--count", "0", "--interval", "0.0005", "--timeout", "2")
    steps = [BE4[:3], BE4[:1], BE4[2:4], BE4[1:4], BE4[:2]]  # add, remove, replace, grow, shrink
    for ips in steps:
        write_manifests(agent.folder, "web.json", web(ips))
        wait_for(lambda: backends_of(bed, f"{VIP4}:80/TCP") == ids(ips), what=f"backends {ips}")
        subprocess.run(["sleep", "0.3"])  # let the loop run against each state
    r = stop_client(loop)
    assert r["attempts"] > 200
    assert r["errors"] == {}, r
    assert set(r["answered"]) == {f"{a}:{PORT}" for a in BE4}  # every state was exercised


def test_agent_killed_and_restarted_under_a_connect_loop(bed, agent, servers):
    write_manifests(agent.folder, "web.json", web(BE4[:3], BE6[:3]))
    first = agent()
    before = programmed(bed)
    loop = bed.client(f"{VIP4}:80", "--count", "0", "--interval", "0.0005")
    first.stop(signal.SIGKILL)
    subprocess.run(["sleep", "0.5"])  # the datapath keeps serving with no agent at all
    assert programmed(bed) == before
    second = agent()
    # Restarted: adopts the pinned state, IDs included, and rewrites nothing that is right.
    assert programmed(bed) == before
    assert not any("synced" in l for l in second.lines), second.lines
    # ... and still follows changes.
    write_manifests(agent.folder, "web.json", web(BE4[1:4], BE6[:3]))
    wait_for(lambda: backends_of(bed, f"{VIP4}:80/TCP") == ids(BE4[1:4]))
    second.stop(signal.SIGTERM)
    r = stop_client(loop)
    assert r["attempts"] > 200
    assert r["errors"] == {}, r
    assert programmed(bed)[f"{VIP4}:80/TCP"]["id"] == before[f"{VIP4}:80/TCP"]["id"]


def test_restart_prunes_what_was_deleted_while_down(bed, agent, servers):
    objs = web(BE4[:2]) + [make_service("demo", "gone", lambda s: s["spec"].update(clusterIP="10.96.0.20", clusterIPs=["10.96.0.20"]))]
    write_manifests(agent.folder, "web.json", objs)
    a = agent()
    assert "10.96.0.20:80/TCP" in programmed(bed)
    a.stop(signal.SIGKILL)
    write_manifests(agent.folder, "web.json", web(BE4[:2]))
    agent()
    assert "10.96.0.20:80/TCP" not in programmed(bed)
    assert backends_of(bed, f"{VIP4}:80/TCP") == ids(BE4[:2])


def test_manifest_folder_is_followed_add_edit_delete(bed, agent, servers):
    a = agent()
    write_manifests(agent.folder, "web.json", web(BE4[:1]))
    wait_for(lambda: backends_of(bed, f"{VIP4}:80/TCP") == ids(BE4[:1]), timeout=1.5, what="file added")
    write_manifests(agent.folder, "web.json", web(BE4[:2]))
    wait_for(lambda: backends_of(bed, f"{VIP4}:80/TCP") == ids(BE4[:2]), timeout=1.5, what="file edited")
    (agent.folder / "web.json").unlink()
    wait_for(lambda: f"{VIP4}:80/TCP" not in programmed(bed), timeout=1.5, what="file deleted")
    assert bed.run_client(f"{VIP4}:80", "--count", "2")["errors"] == {"ENETUNREACH": 2}
    assert a.proc.poll() is None


def test_malformed_manifests_next_to_good_ones(bed, agent, servers):
    write_manifests(agent.folder, "web.json", web(BE4[:2]))
    (agent.folder / "broken.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x\n")
    bad_port = make_service("demo", "badport", lambda s: s["spec"]["ports"][0].update(port=70000))
    bad_ip = make_service("demo", "badip", lambda s: s["spec"].update(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]))
    good = make_service("demo", "good", lambda s: s["spec"].update(clusterIP="10.96.0.30", clusterIPs=["10.96.0.30"]))
    write_manifests(agent.folder, "mixed.json", [bad_port, bad_ip, good, make_slice("demo", "good-1", "good", BE4[3:4])])
    a = agent()
    progs = programmed(bed)
    assert backends_of(bed, f"{VIP4}:80/TCP") == ids(BE4[:2])
    assert backends_of(bed, "10.96.0.30:80/TCP") == ids(BE4[3:4])
    a.wait_log("broken.yaml: file: not valid YAML")
    a.wait_log("mixed.json: Service demo/badport: spec.ports[0].port: must be between 1 and 65535, got 70000")
    a.wait_log("mixed.json: Service demo/badip: spec.clusterIPs[0]: not an IP address: '10.96.0.300'")
    # A good file turned bad keeps its last good objects programmed.
    (agent.folder / "web.json").write_text("{not json")
    a.wait_log("web.json: file: not valid JSON")
    assert programmed(bed)[f"{VIP4}:80/TCP"] == progs[f"{VIP4}:80/TCP"]
    assert bed.run_client(f"{VIP4}:80", "--count", "20")["errors"] == {}


def test_service_list_reads_the_pinned_maps(bed, web_agent):
    out = subprocess.run([sys.executable, "-m", "lb.cli", "service", "list", "-o", "json", "--bpf-root", bed.bpf_root],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    rows = {r["frontend"]: r for r in json.loads(out)}
    assert set(rows) == {f"{VIP4}:80/TCP", f"{VIP4}:53/UDP", f"[{VIP6}]:80/TCP", f"[{VIP6}]:53/UDP"}
    assert [b["address"] for b in rows[f"{VIP4}:80/TCP"]["backends"]] == [f"{a}:{PORT}" for a in BE4[:3]]
    assert all(r["action"] == "load-balance" and r["revnat_ok"] for r in rows.values())
    text = subprocess.run([sys.executable, "-m", "lb.cli", "service", "list", "--bpf-root", bed.bpf_root],
                          capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert f"{VIP4}:80/TCP" in text and f"{BE4[0]}:{PORT}" in text


def test_cleanup_removes_every_program_attachment_and_pin(bed, web_agent):
    import os

    from lb.datapath import HOOKS, attach_type
    from lb.maps import bpfsys

    web_agent.stop()
    cg = os.open(bed.cgroup, os.O_RDONLY)
    try:
        assert all(bpfsys.prog_query(cg, attach_type(h)) for h in HOOKS)
        out = subprocess.run([sys.executable, "-m", "lb.cli", "cleanup", "--cgroup-root", bed.cgroup, "--bpf-root",
                              bed.bpf_root], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        assert "removed link bpflb_conn4" in out and "removed map lb_services_v1" in out
        assert not any(bpfsys.prog_query(cg, attach_type(h)) for h in HOOKS)
    finally:
        os.close(cg)
    assert not os.path.exists(bed.bpf_root)
    assert bed.run_client(f"{VIP4}:80", "--count", "2")["errors"] == {"ENETUNREACH": 2}


HOLD_OPEN = r"""
import socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in vip else socket.AF_INET
socks = [socket.create_connection((vip, port)) for _ in range(n)]  # all open at once
print(" ".join(f"{s.getpeername()[0]}:{s.getpeername()[1]}" for s in socks))
"""


def test_tcp_peers_stay_exact_when_sockets_share_a_peer_slot(bed, servers):
    """With one peer slot, every socket after the first finds it taken and keeps its peer in its own
    storage: getpeername is the VIP for each of many sockets open at once, and again after they close."""
    from lb import datapath
    from lb.maps.services import PinnedServiceMaps
    from lb.model import TCP, Backend, Frontend, FrontendState
    from lb.reconcile import Reconciler
    from lb.settings import MapSizes, Paths

    datapath.attach(Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root),
                    MapSizes(services=64, backends=64, revnat=64, sock_revnat=1, affinity=64, endpoints=64))
    maps = PinnedServiceMaps(bed.bpf_root)
    try:
        Reconciler(maps, revnat_limit=64).sync({
            Frontend(VIP4, 80, TCP): FrontendState(tuple(Backend(b, PORT, TCP) for b in BE4[:3]), service="demo/web"),
            Frontend(VIP6, 80, TCP): FrontendState(tuple(Backend(b, PORT, TCP) for b in BE6[:3]), service="demo/web6"),
        }, prune=True)
    finally:
        maps.close()
    for vip in (VIP4, VIP6):
        for _ in range(2):
            p = bed.popen([sys.executable, "-c", HOLD_OPEN, vip, "80", "20"], bed.client_ns, True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            assert out.split() == [f"{vip}:80"] * 20
