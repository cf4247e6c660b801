"""Hostile or unusual objects. One Service that does not fit is refused alone (issue: a 17 KB Service with 260 ports and 261
externalIPs used to stop programming for everyone). On the real datapath, with the real agent: the
hostile Service is refused with its limit named (log, `bpflb service list`, metrics), health stays
200, and every other Service keeps following changes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import pytest

from conftest import BE4, PORT, ROOT, backends_of, make_service, make_slice, programmed, wait_for, write_manifests

NORMAL_VIP = "10.96.0.10"
HOSTILE_VIP = "10.96.7.7"


def hostile():
    """260 ports x (1 ClusterIP + 261 externalIPs x 2 scopes) = 135 980 frontends, in about 17 KB of JSON."""
    def m(s):
        s["spec"].update(clusterIP=HOSTILE_VIP, clusterIPs=[HOSTILE_VIP],
                         externalIPs=[f"172.30.{i // 250}.{i % 250 + 1}" for i in range(261)],
                         ports=[{"name": f"p{i}", "port": 1000 + i, "protocol": "TCP"} for i in range(260)])
    return make_service("evil", "wide", m)


def normal(ips):
    return [make_service("ns", "web"), make_slice("ns", "web-1", "web", ips)]


def port_of(agent, what):
    line = agent.wait_log(f"serving {what} on")
    return int(re.search(r"\(port (\d+)\)", line).group(1))


def http(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_service_too_wide_is_refused_alone_and_the_rest_keeps_syncing(bed, agent, tmp_path):
    bed.servers(BE4, PORT)
    assert len(json.dumps(hostile())) > 15000
    write_manifests(agent.folder, "a-hostile.json", [hostile()])
    write_manifests(agent.folder, "b-web.json", normal(BE4[:2]))
    state = tmp_path / "state"
    a = agent(["--state-dir", str(state)])
    line = a.wait_log("Service evil/wide refused")
    assert "135980 frontends" in line and "--max-frontends-per-service 4096" in line
    assert backends_of(bed, f"{NORMAL_VIP}:80/TCP") == {f"{ip}:{PORT}" for ip in BE4[:2]}
    assert not any(HOSTILE_VIP in fe for fe in programmed(bed))
    r = bed.run_client(f"{NORMAL_VIP}:80", "--count", "50")
    assert r["errors"] == {} and set(r["answered"]) == {f"{ip}:{PORT}" for ip in BE4[:2]}
    # health is the agent's, not one object's; the refusal is counted and listed
    assert http(port_of(a, "healthz"), "/healthz")[0] == 200
    metrics = http(port_of(a, "metrics"), "/metrics")[1]
    assert 'bpflb_service_refusals_total{limit="max-frontends-per-service"} 1.0' in metrics
    assert "bpflb_services_refused 1.0" in metrics
    out = subprocess.run([sys.executable, "-m", "lb.cli", "service", "list", "--bpf-root", bed.bpf_root,
                          "--state-dir", str(state)], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "REFUSED" in out and "evil/wide: 135980 frontends" in out
    # the others keep following changes
    write_manifests(agent.folder, "b-web.json", normal(BE4[:3]))
    wait_for(lambda: backends_of(bed, f"{NORMAL_VIP}:80/TCP") == {f"{ip}:{PORT}" for ip in BE4[:3]},
             what="the normal Service follows its new endpoint")
    # the hostile Service shrunk to something sane is admitted
    small = hostile()
    small["spec"]["externalIPs"] = small["spec"]["externalIPs"][:3]
    small["spec"]["ports"] = small["spec"]["ports"][:10]
    write_manifests(agent.folder, "a-hostile.json", [small])
    a.wait_log("Service evil/wide admitted")
    wait_for(lambda: f"{HOSTILE_VIP}:1000/TCP" in programmed(bed), what="the shrunk Service programmed")
    wait_for(lambda: json.loads((state / "refused.json").read_text()) == {}, what="the refusal cleared")


def test_a_full_map_refuses_the_newest_service_and_keeps_the_older_ones(bed, agent, tmp_path):
    """--svc-map-size 8: room for two Services of one port and two backends (1 master + 2 slots each);
    the third, newer, is refused, whatever order the files are in; deleting an older one admits it."""
    bed.servers(BE4, PORT)

    def svc(name, vip, created):
        return [make_service("ns", name, lambda s: (s["spec"].update(clusterIP=vip, clusterIPs=[vip]),
                                                    s["metadata"].update(creationTimestamp=created))),
                make_slice("ns", f"{name}-1", name, BE4[:2])]
    write_manifests(agent.folder, "a.json", svc("newest", "10.96.0.3", "2026-03-01T00:00:00Z"))
    write_manifests(agent.folder, "b.json", svc("oldest", "10.96.0.1", "2026-01-01T00:00:00Z"))
    write_manifests(agent.folder, "c.json", svc("middle", "10.96.0.2", "2026-02-01T00:00:00Z"))
    a = agent(["--state-dir", str(tmp_path), "--svc-map-size", "8"])
    line = a.wait_log("Service ns/newest refused")
    assert "--svc-map-size 8" in line
    assert set(programmed(bed)) == {"10.96.0.1:80/TCP", "10.96.0.2:80/TCP"}
    (agent.folder / "b.json").unlink()
    a.wait_log("Service ns/newest admitted")
    wait_for(lambda: set(programmed(bed)) == {"10.96.0.2:80/TCP", "10.96.0.3:80/TCP"}, what="newest programmed")
    r = bed.run_client("10.96.0.3:80", "--count", "20")
    assert r["errors"] == {}


@pytest.mark.parametrize("external, tenant_vip", [
    pytest.param(NORMAL_VIP, "10.96.0.66", id="plain externalIP, older tenant, tenant's file first"),
    pytest.param(f"::ffff:{NORMAL_VIP}", "fd00:96::66", id="IPv4-mapped externalIP on an IPv6 Service"),
])
def test_an_external_ip_claim_never_takes_a_clusterip(bed, agent, external, tenant_vip):
    """CVE-2020-8554 class: an older Service claims another's ClusterIP as its externalIP, plainly or
    IPv4-mapped (which Go's ParseIP reads as the same IPv4 address, and which packs to the same map key).
    The ClusterIP owner keeps it whatever the file order; the tenant keeps its own ClusterIP."""
    bed.servers(BE4, PORT)
    victim = [make_service("ns", "victim", lambda s: s["metadata"].update(creationTimestamp="2026-06-01T00:00:00Z")),
              make_slice("ns", "victim-1", "victim", BE4[:1])]
    tenant = [make_service("evil", "tenant", lambda s: (
                  s["spec"].update(clusterIP=tenant_vip, clusterIPs=[tenant_vip], externalIPs=[external]),
                  s["metadata"].update(creationTimestamp="2020-01-01T00:00:00Z"))),
              make_slice("evil", "tenant-1", "tenant", BE4[2:3])]
    write_manifests(agent.folder, "a.json", tenant)  # the tenant's file first
    write_manifests(agent.folder, "b.json", victim)
    agent()
    r = bed.run_client(f"{NORMAL_VIP}:80", "--count", "20")
    assert r["errors"] == {} and set(r["answered"]) == {f"{BE4[0]}:{PORT}"}, r
    if ":" not in tenant_vip:
        r = bed.run_client(f"{tenant_vip}:80", "--count", "20")
        assert r["errors"] == {} and set(r["answered"]) == {f"{BE4[2]}:{PORT}"}, r
    assert backends_of(bed, f"{NORMAL_VIP}:80/TCP") == {f"{BE4[0]}:{PORT}"}
