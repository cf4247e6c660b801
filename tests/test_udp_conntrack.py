"""UDP and socket protocols as kube-proxy's conntrack treats them, on the real datapath.

A UDP flow is (socket, frontend): it keeps its backend while conntrack would keep the flow (the
--conntrack-udp-timeout / --conntrack-udp-timeout-stream settings, the kernel's 30 s / 120 s by
default), leaves a removed backend at the next datagram, and its replies come from its own frontend
even when another frontend the socket talks to shares the backend. Only TCP (and MPTCP) and UDP
sockets are services. Clients run in the bed's client namespace (no route out): a VIP the datapath
leaves alone fails there with ENETUNREACH.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from conftest import BE4, BE6, PORT, VIP4, VIP6, backends_of, make_service, make_slice, wait_for, write_manifests

VIP4_B = "10.96.0.11"
VIP6_B = "fd00:96::11"

# One unconnected UDP socket per entry of a plan; every datagram answered before the next is sent
# unless "burst" (send all, then read all). Prints, per socket, the (reply source, answering backend) pairs.
UDP_PLAN = r"""
import json, socket, sys, time
plan = json.loads(sys.argv[1])
out = []
cur = None
for step in plan:
    if "sleep" in step:
        time.sleep(step["sleep"])
        continue
    if not (step.get("reuse") and cur):
        fam = socket.AF_INET6 if ":" in step["to"][0][0] else socket.AF_INET
        cur = socket.socket(fam, socket.SOCK_DGRAM)
        cur.settimeout(2)
    s = cur
    got = []
    for _ in range(step.get("repeat", 1)):
        if step.get("burst"):
            for ip, port in step["to"]:
                s.sendto(b"hi\n", (ip, port))
            for _ in step["to"]:
                data, src = s.recvfrom(2048)
                got.append([f"{src[0]}:{src[1]}", data.decode().strip()])
        else:
            for ip, port in step["to"]:
                s.sendto(b"hi\n", (ip, port))
                data, src = s.recvfrom(2048)
                got.append([f"{src[0]}:{src[1]}", data.decode().strip()])
        if step.get("every"):
            time.sleep(step["every"])
    out.append(got)
    if not step.get("keep"):
        s.close()
        cur = None
print(json.dumps(out))
"""


def run_plan(bed, plan: list[dict]) -> list[list[list[str]]]:
    p = bed.popen([sys.executable, "-c", UDP_PLAN, json.dumps(plan)], bed.client_ns, True,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out)


def udp_service(name: str, vips: list[str], ips4: list[str], ips6: list[str] = ()) -> list[dict]:
    def mut(s):
        s["spec"]["clusterIP"] = vips[0]
        s["spec"]["clusterIPs"] = vips
        s["spec"]["ipFamilies"] = ["IPv6" if ":" in v else "IPv4" for v in vips]
        s["spec"]["ports"] = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": PORT}]
    objs = [make_service("demo", name, mut)]
    for fam, ips in (("v4", ips4), ("v6", ips6)):
        if ips:
            objs.append(make_slice("demo", f"{name}-{fam}", name, list(ips), port_name="dns", protocol="UDP"))
    return objs


@pytest.fixture
def servers(bed):
    return bed.servers(BE4 + BE6, PORT)


def ident(ip: str) -> str:
    return f"{ip}:{PORT}"


# ---- item 4: a flow keeps its backend --------------------------------------------------------------

@pytest.mark.parametrize("vip,backends", [(VIP4, BE4[:3]), (VIP6, BE6[:3])], ids=["v4", "v6"])
def test_unconnected_socket_keeps_its_backend_and_sockets_spread(bed, agent, servers, vip, backends):
    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4, VIP6], BE4[:3], BE6[:3]))
    agent()
    out = run_plan(bed, [{"to": [[vip, 53]], "repeat": 10}] * 30)
    per_socket = [{answer for _src, answer in got} for got in out]
    assert all(len(s) == 1 for s in per_socket), per_socket  # one backend per (socket, frontend)
    # 30 sockets over 3 backends: all three are drawn unless the draw is broken (3 x (2/3)^30 < 2e-5)
    assert set().union(*per_socket) == {ident(b) for b in backends}
    assert {src for got in out for src, _ in got} == {f"{vip}:53"}  # every reply from the VIP


def test_flow_lives_as_long_as_conntrack_keeps_it(bed, agent, servers):
    """--conntrack-udp-timeout 1, --conntrack-udp-timeout-stream 4 (seconds). A quick exchange expires 1 s
    after its last datagram and the next one draws again; a flow with replies still active after 2 s is a
    stream and outlives 1 s of silence. Kernel time must pass here: the datapath reads the boot clock."""
    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4], BE4[:3]))
    a = agent(["--conntrack-udp-timeout", "1", "--conntrack-udp-timeout-stream", "4"])
    assert a.proc.poll() is None
    to = {"to": [[VIP4, 53]]}
    # Refreshed every 0.3 s for 1.5 s: never expires (it would, 1 s after the first datagram, if the
    # timeout did not count from the last one).
    out = run_plan(bed, [dict(to, repeat=6, every=0.3)])
    assert len({answer for _s, answer in out[0]}) == 1
    # Idle for 1.3 s: a new draw each time; 12 draws all landing on the first backend is < 1e-5.
    plan = [dict(to, keep=True)]
    for _ in range(12):
        plan += [{"sleep": 1.3}, dict(to, reuse=True, keep=True)]
    seen = {answer for got in run_plan(bed, plan) for _s, answer in got}
    assert len(seen) > 1, "the flow never expired"
    # A stream (replies, active for 2.4 s) survives 1.5 s of silence, four times over.
    plan = [dict(to, repeat=9, every=0.3, keep=True)]
    for _ in range(4):
        plan += [{"sleep": 1.5}, dict(to, reuse=True, keep=True)]
    seen = {answer for got in run_plan(bed, plan) for _s, answer in got}
    assert len(seen) == 1, seen


# The long-running client of the next test: one unconnected socket, a datagram every 20 ms; a JSON line
# per reply or error.
UDP_LOOP = r"""
import json, signal, socket, sys, time, errno
ip, port = sys.argv[1], int(sys.argv[2])
stop = False
def term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, term)
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
while not stop:
    try:
        s.sendto(b"hi\n", (ip, port))
        data, src = s.recvfrom(2048)
        print(json.dumps({"answer": data.decode().strip(), "source": f"{src[0]}:{src[1]}"}), flush=True)
    except OSError as e:
        print(json.dumps({"error": errno.errorcode.get(e.errno, str(e))}), flush=True)
    time.sleep(0.02)
"""


def test_flow_stays_through_unrelated_changes_and_leaves_a_removed_backend(bed, agent, servers):
    """As conntrack: adding endpoints leaves an established flow where it is; removing its endpoint
    (kube-proxy flushes its conntrack entries) sends the very next datagram to a live backend. The
    socket is not destroyed: an unconnected socket has no peer to go stale."""
    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4], BE4[:2]))
    agent()
    client = bed.popen([sys.executable, "-c", UDP_LOOP, VIP4, "53"], bed.client_ns, True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[dict] = []
    threading.Thread(target=lambda: [events.append(json.loads(l)) for l in client.stdout], daemon=True).start()
    wait_for(lambda: sum("answer" in e for e in events) >= 10, what="replies")
    first = events[-1]["answer"]
    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4], BE4[:4]))  # two more endpoints
    wait_for(lambda: backends_of(bed, f"{VIP4}:53/UDP") == {ident(b) for b in BE4[:4]}, what="endpoints added")
    mark = len(events)
    wait_for(lambda: len(events) >= mark + 20, what="replies after the addition")
    assert {e.get("answer") for e in events[mark:]} == {first}
    rest = [b for b in BE4[:4] if ident(b) != first]
    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4], rest))  # its endpoint goes (server stays up)
    wait_for(lambda: backends_of(bed, f"{VIP4}:53/UDP") == {ident(b) for b in rest}, what="endpoint removed")
    mark = len(events)
    wait_for(lambda: len(events) >= mark + 20, what="replies after the removal")
    client.terminate()
    client.wait(timeout=10)
    after = events[mark + 1:]  # one datagram may have been in flight while the maps changed
    assert all("answer" in e for e in events), [e for e in events if "error" in e]
    assert {e["answer"] for e in after} <= {ident(b) for b in rest}
    assert len({e["answer"] for e in after}) == 1  # and keeps the new one
    assert {e["source"] for e in events} == {f"{VIP4}:53"}


# ---- item 5: replies told apart per frontend ---------------------------------------------------------

@pytest.mark.parametrize("fam,shared", [("v4", 1), ("v4", 3), ("v6", 1)],
                         ids=["v4-one-shared-backend", "v4-three-shared-backends", "v6-one-shared-backend"])
def test_replies_come_from_their_own_frontend_when_frontends_share_a_backend(bed, agent, servers, fam, shared):
    """Two Services over the same endpoints; one socket sends to both. With several shared backends the
    second flow takes another backend (exact); with one, replies are matched in send order."""
    a_vip, b_vip = (VIP4, VIP4_B) if fam == "v4" else (VIP6, VIP6_B)
    ips = (BE4 if fam == "v4" else BE6)[:shared]
    v4, v6 = (ips, ()) if fam == "v4" else ((), ips)
    write_manifests(agent.folder, "svc.json", udp_service("dns-a", [a_vip], v4, v6) + udp_service("dns-b", [b_vip], v4, v6))
    agent()
    A, B = [a_vip, 53], [b_vip, 53]
    rounds = [[A, B], [B, A], [A, A, B], [B, B, A, A], [A, B, A, B]]
    plan = [{"to": r, "keep": True, "reuse": i > 0} for i, r in enumerate(rounds)]  # answered one by one
    plan += [{"to": r, "burst": True, "keep": True, "reuse": True} for r in rounds]  # all sent, then all read
    out = run_plan(bed, plan)
    backend_of = {}
    for r, got in zip(rounds + rounds, out):
        sent = [f"{ip}:{port}" for ip, port in r]
        if shared == 1:
            assert [src for src, _ in got] == sent  # one backend answers in order
        else:
            assert sorted(src for src, _ in got) == sorted(sent)
        for src, answer in got:
            assert backend_of.setdefault(src, answer) == answer  # each frontend keeps its backend
    if shared > 1:
        assert backend_of[f"{a_vip}:53"] != backend_of[f"{b_vip}:53"]  # the second flow avoided the first's


def test_closed_unconnected_sockets_leave_no_map_entry(bed, agent, servers):
    """Unconnected sockets keep their flows in their own storage, which the kernel frees with them: after
    200 sockets (half of them talking to two frontends), the reverse-NAT LRU holds nothing (it held one entry per socket
    and backend, leaked, before)."""
    from lb.maps.services import map_fill

    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4, VIP6], BE4[:3], BE6[:3]))
    agent()
    # dual-stack sockets talking to both frontends, and IPv4 sockets
    out = run_plan(bed, [{"to": [[f"::ffff:{VIP4}", 53], [VIP6, 53]]}, {"to": [[VIP4, 53]]}] * 100)
    assert sum(len(got) for got in out) == 300
    assert map_fill(bed.bpf_root)["lb_sock_revnat_v1"] == 0


# ---- item 6: only TCP (and MPTCP) and UDP sockets are services -------------------------------------

PROTOCOLS = r"""
import errno, json, socket, sys
case, vip = sys.argv[1], sys.argv[2]
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
def result(fn):
    try:
        return fn()
    except OSError as e:
        return "error " + errno.errorcode.get(e.errno, str(e.errno))
if case == "mptcp":
    def go():
        s = socket.socket(fam, socket.SOCK_STREAM, 262)  # IPPROTO_MPTCP
        s.settimeout(2)
        s.connect((vip, 80))
        peer = s.getpeername()
        return {"answer": s.recv(100).decode().strip(), "peer": f"{peer[0]}:{peer[1]}",
                "mptcp": s.getsockopt(socket.SOL_SOCKET, 38) == 262}  # SO_PROTOCOL
    print(json.dumps(result(go)))
    sys.exit()
if case in ("icmp", "icmp6"):
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:  # this namespace's own; ping sockets for root
        f.write("0 2147483647")
proto = {"udplite": (socket.SOCK_DGRAM, 136), "icmp": (socket.SOCK_DGRAM, 1), "icmp6": (socket.SOCK_DGRAM, 58),
         "raw-udp": (socket.SOCK_RAW, 17)}[case]
def sock():
    s = socket.socket(fam, *proto)
    s.settimeout(1)
    return s
ping = b"\x08\x00\x00\x00\x00\x00\x00\x01" if case == "icmp" else b"\x80\x00\x00\x00\x00\x00\x00\x01"
payload = ping if case.startswith("icmp") else b"\x00" * 8 + b"hi\n"
print(json.dumps({"sendto": result(lambda: sock().sendto(payload, (vip, 53)) and "sent"),
                  "connect": result(lambda: sock().connect((vip, 53)) or "connected")}))
"""


def protocol_case(bed, case: str, vip: str) -> dict | str:
    p = bed.popen([sys.executable, "-c", PROTOCOLS, case, vip], bed.client_ns, True,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return json.loads(out)


def kernel_has(family: int, type_: int, proto: int) -> bool:
    import socket

    try:
        socket.socket(family, type_, proto).close()
        return True
    except OSError as e:
        return e.errno == 13  # EACCES: the protocol exists (ping sockets need ping_group_range)


@pytest.fixture
def tcp_udp_agent(bed, agent, servers):
    def mut(s):
        s["spec"]["clusterIPs"] = [VIP4, VIP6]
        s["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
        s["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": PORT})
    objs = [make_service("demo", "web", mut)]
    for fam, ips in (("v4", BE4[:2]), ("v6", BE6[:2])):
        es = make_slice("demo", f"web-{fam}", "web", ips)
        es["ports"].append({"name": "dns", "port": PORT, "protocol": "UDP"})
        objs.append(es)
    write_manifests(agent.folder, "svc.json", objs)
    return agent()


@pytest.mark.parametrize("vip,backends", [(VIP4, BE4[:2]), (VIP6, BE6[:2])], ids=["v4", "v6"])
def test_mptcp_is_translated_as_tcp(bed, tcp_udp_agent, vip, backends):
    import socket

    if not kernel_has(socket.AF_INET, socket.SOCK_STREAM, 262):
        pytest.skip("kernel without MPTCP")
    r = protocol_case(bed, "mptcp", vip)
    assert isinstance(r, dict), r
    assert r["mptcp"] and r["answer"] in {ident(b) for b in backends}  # a TCP backend answered (fallback)
    assert r["peer"] == f"{vip}:80"


@pytest.mark.parametrize("case,vip", [("udplite", VIP4), ("udplite", VIP6), ("icmp", VIP4), ("icmp6", VIP6),
                                      ("raw-udp", VIP4)])
def test_other_protocols_are_never_sent_to_a_service_backend(bed, tcp_udp_agent, case, vip):
    """SOCK_DGRAM is not UDP (UDP-Lite, ICMP echo sockets), nor is a raw socket: the VIP stays the VIP,
    which has no route here. (This kernel has no SCTP, the SOCK_STREAM case: it is refused by the same
    protocol check that MPTCP passes.)"""
    import socket

    proto = {"udplite": (socket.SOCK_DGRAM, 136), "icmp": (socket.SOCK_DGRAM, 1), "icmp6": (socket.SOCK_DGRAM, 58),
             "raw-udp": (socket.SOCK_RAW, 17)}[case]
    if not kernel_has(socket.AF_INET6 if ":" in vip else socket.AF_INET, *proto):
        pytest.skip(f"kernel without {case}")
    r = protocol_case(bed, case, vip)
    assert r == {"sendto": "error ENETUNREACH", "connect": "error ENETUNREACH"}, r


# ---- item 10 (part): the UDP socket destroy stops itself at its timeout --------------------------------

HOLD_CONNECTED = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], 53))
for line in sys.stdin:
    try:
        s.send(b"hi\n")
        print(s.recv(100).decode().strip(), flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"""


def test_socket_destroy_is_bounded_by_its_timeout(bed, agent, servers):
    """destroy_udp runs in a worker thread, which cannot be cancelled: it checks its own deadline between
    namespaces and sockets. Past it (timeout 0) it stops before touching anything and says so; in time,
    it destroys the connected socket aimed at the removed backend."""
    from conftest import programmed
    from lb.model import UDP, Backend
    from lb.sockets import DestroyTimeout, destroy_udp

    write_manifests(agent.folder, "svc.json", udp_service("dns", [VIP4], BE4[:1]))
    agent()
    rid = programmed(bed)[f"{VIP4}:53/UDP"]["id"]
    holder = bed.popen([sys.executable, "-c", HOLD_CONNECTED, VIP4], bed.client_ns, True, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask() -> str:
        holder.stdin.write("x\n")
        holder.stdin.flush()
        return holder.stdout.readline().strip()

    assert ask() == ident(BE4[0])
    removed = [(rid, Backend(BE4[0], PORT, UDP))]
    with pytest.raises(DestroyTimeout) as e:
        destroy_udp(bed.cgroup, bed.bpf_root, removed, timeout=0)
    assert e.value.destroyed == 0
    assert ask() == ident(BE4[0])  # untouched
    assert destroy_udp(bed.cgroup, bed.bpf_root, removed, timeout=5) == 1
    assert ask() in ("ECONNABORTED", "EDESTADDRREQ")
    holder.stdin.close()
    holder.wait(timeout=10)
