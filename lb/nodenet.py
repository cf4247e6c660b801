"""Node-to-node pod networking: VXLAN overlay (default) or direct routing.

  plan()   PURE: this node + every Node (name, InternalIP, podCIDRs) -> routes, neighbours, FDB entries
  apply()  idempotent netlink (pyroute2): create what is missing, replace what differs, and prune the
           routes bpflb owns (protocol RTPROT_BPFLB) and the FDB/neighbour entries on its VXLAN device
           that the plan no longer has, so a removed node's routes and tunnel entries go.

Overlay, flannel-style: each node's bpflb_vxlan holds the first address of its pod CIDR (x.y.z.0/32);
a remote pod CIDR is routed via the remote's .0 on bpflb_vxlan (onlink), a permanent neighbour entry
gives that .0 the remote VTEP MAC, and an FDB entry sends that MAC to the remote node IP. A VTEP MAC
is derived from the node IP (0e:bf:a.b.c.d), so no annotation has to be published and read back.

Direct routing: a remote pod CIDR is routed via the remote node IP, out of the uplink: the device that
holds this node's IP (found at apply time, whatever its name), else the default route's device. That
needs every node on one L2 segment (the next hop must be directly reachable); across routers, announce
the pod CIDRs with a routing daemon (BGP) instead and run with --network-mode none.

IPv6 (dual-stack Nodes: spec.podCIDRs holds an IPv6 range too): in direct mode a remote node's IPv6 pod
CIDR is routed via its IPv6 InternalIP (else ExternalIP) out of the same uplink, refused on the same
grounds as an IPv4 one; a node with no IPv6 address gets no IPv6 route (named in the plan's problems).
The VXLAN overlay carries IPv6 inside the same IPv4 tunnel: a remote IPv6 pod CIDR is routed via its first
address (onlink) on bpflb_vxlan, whose permanent neighbour entry names the remote VTEP MAC, and this node's
bpflb_vxlan holds the first address of its own IPv6 range (/128), as for IPv4. IPv6 forwards only when net.ipv6.conf.all.forwarding is 1 (the
node-wide switch; Linux 6.17's per-device force_forwarding is a /proc/sys file as well, and RTM_SETLINK
sets no IPv6 devconf): apply() warns when it is 0.

Kernel settings go over netlink (RTM_SETLINK, IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF), per device and in
the namespace of the IPRoute given, never through /proc/sys: kubelet mounts /proc/sys read-only in a
non-privileged container, and CAP_NET_ADMIN (which the DaemonSet grants) is all RTM_SETLINK needs.
  forwarding=1 on the uplink and on bpflb_vxlan: the kernel forwards a packet when its *input* device
      forwards (IN_DEV_FORWARD in ip_route_input_slow), so net.ipv4.ip_forward (conf/all) may stay 0;
      the pods' host veths are the CNI plugin's to set.
  rp_filter=0 on bpflb_vxlan. The kernel applies max(conf/all, conf/dev), and conf/all has no netlink
      setter: a node with net.ipv4.conf.all.rp_filter=1 keeps strict checking there, which the overlay
      passes anyway (every source arriving on bpflb_vxlan, a remote pod or a remote .0, is routed back
      out of bpflb_vxlan).
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass

from .model import Node

log = logging.getLogger("bpflb.nodenet")

RTPROT_BPFLB = 193  # "proto 193" in `ip route`: the routes bpflb owns and may prune
VXLAN_DEV = "bpflb_vxlan"
VXLAN_PORT = 8472
VXLAN_VNI = 1
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTM_SETLINK = 19
IFLA_AF_SPEC = 26
IPV4_DEVCONF = {"forwarding": 1, "rp_filter": 8}  # include/uapi/linux/ip.h, IPV4_DEVCONF_*


@dataclass(frozen=True, order=True)
class RouteSpec:
    dst: str  # CIDR
    gateway: str
    dev: str | None  # None: the uplink, the device that holds the node IP (resolved by apply)
    onlink: bool = False


@dataclass(frozen=True)
class Plan:
    mode: str
    node_ip: str | None
    vtep_addr: str | None  # overlay: this node's bpflb_vxlan address
    routes: frozenset[RouteSpec] = frozenset()
    vtep_addr6: str | None = None  # overlay, dual-stack: its IPv6 address there
    neighbours: frozenset[tuple[str, str]] = frozenset()  # (ip, mac) on bpflb_vxlan
    fdb: frozenset[tuple[str, str]] = frozenset()  # (mac, remote node ip) on bpflb_vxlan
    problems: tuple[str, ...] = ()


def node_ip(node: Node) -> str | None:
    """InternalIP first, as kubelet reports it; IPv4 (the overlay's tunnel is IPv4, for both families inside)."""
    for kind in ("InternalIP", "ExternalIP"):
        for t, addr in node.addresses:
            if t == kind and ":" not in addr:
                return addr
    return None


def node_ip6(node: Node) -> str | None:
    """The IPv6 InternalIP (else ExternalIP): the next hop of the node's IPv6 pod CIDR in direct mode."""
    for kind in ("InternalIP", "ExternalIP"):
        for t, addr in node.addresses:
            if t == kind and ":" in addr:
                return addr
    return None


def _pod_cidr(node: Node, version: int):
    for c in node.pod_cidrs:
        net = ipaddress.ip_network(c, strict=False)
        if net.version == version:
            return net
    return None


def v4_pod_cidr(node: Node) -> ipaddress.IPv4Network | None:
    return _pod_cidr(node, 4)


def v6_pod_cidr(node: Node) -> ipaddress.IPv6Network | None:
    return _pod_cidr(node, 6)


def vtep_mac(ip: str) -> str:
    return "0e:bf:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


def plan(self_name: str, nodes: dict[str, Node], mode: str, uplink: str | None = None) -> Plan:
    """``uplink`` names the direct-routing device; None (the default): the device holding the node IP."""
    me = nodes.get(self_name)
    if mode == "none" or me is None:
        return Plan(mode, None, None, problems=() if mode == "none" else (f"Node {self_name} not known yet",))
    my_ip = node_ip(me)
    my_cidr = v4_pod_cidr(me)
    problems = []
    if my_ip is None:
        problems.append(f"Node {self_name} has no InternalIP")
    routes, neigh, fdb = set(), set(), set()
    node_ips = [ipaddress.ip_address(a) for n in nodes.values() for a in (node_ip(n), node_ip6(n)) if a]
    accepted: list[tuple[ipaddress.IPv4Network, str]] = [(my_cidr, self_name)] if my_cidr else []
    accepted6: list[tuple[ipaddress.IPv6Network, str]] = [(c, self_name)] if (c := v6_pod_cidr(me)) else []
    for name, node in sorted(nodes.items()):
        if name == self_name:
            continue
        ip, cidr, cidr6 = node_ip(node), v4_pod_cidr(node), v6_pod_cidr(node)
        if cidr6 is not None:
            # direct: via the remote's IPv6 address; overlay: IPv6 inside the IPv4 tunnel, as the IPv4
            # range, via the range's first address (onlink) whose neighbour entry names the remote VTEP MAC
            hop = node_ip6(node) if mode == "direct" else ip
            if hop is None:
                problems.append(f"Node {name}: IPv6 podCIDR {cidr6} not routed: the Node has no "
                                + ("IPv6 address" if mode == "direct" else "IPv4 address (the tunnel's endpoint)"))
            elif why := route_refusal(cidr6, node_ips, accepted6):
                problems.append(f"Node {name}: IPv6 podCIDR {cidr6} not routed: it {why}")
            else:
                accepted6.append((cidr6, name))
                if mode == "direct":
                    routes.add(RouteSpec(str(cidr6), hop, uplink))
                else:
                    gw6, mac = str(cidr6.network_address), vtep_mac(hop)
                    routes.add(RouteSpec(str(cidr6), gw6, VXLAN_DEV, onlink=True))
                    neigh.add((gw6, mac))
                    fdb.add((mac, hop))
        if cidr is None and cidr6 is not None:
            continue  # an IPv6-only node: nothing to route over IPv4
        if ip is None or cidr is None:
            problems.append(f"Node {name} skipped: {'no InternalIP' if ip is None else 'no IPv4 podCIDR'}")
            continue
        why = route_refusal(cidr, node_ips, accepted)
        if why:
            problems.append(f"Node {name} skipped: podCIDR {cidr} {why}")
            continue
        accepted.append((cidr, name))
        if mode == "direct":
            routes.add(RouteSpec(str(cidr), ip, uplink))
        else:
            gw = str(cidr.network_address)
            mac = vtep_mac(ip)
            routes.add(RouteSpec(str(cidr), gw, VXLAN_DEV, onlink=True))
            neigh.add((gw, mac))
            fdb.add((mac, ip))
    vtep = f"{my_cidr.network_address}" if (mode == "overlay" and my_cidr) else None
    my_cidr6 = v6_pod_cidr(me)
    vtep6 = f"{my_cidr6.network_address}" if (mode == "overlay" and my_cidr6) else None
    return Plan(mode, my_ip, vtep, routes=frozenset(routes), vtep_addr6=vtep6, neighbours=frozenset(neigh),
                fdb=frozenset(fdb), problems=tuple(problems))


_NOT_POD_NETWORKS = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
                                                       "240.0.0.0/4",
                                                       # IPv4-compatible (with :: and ::1), IPv4-mapped,
                                                       # link-local, multicast
                                                       "::/96", "::ffff:0:0/96", "fe80::/10", "ff00::/8")]
MIN_POD_PREFIX = 8  # a remote pod CIDR broader than a /8 would swallow other networks' routes
MIN_POD_PREFIX6 = 32  # the same for IPv6: a node's range is a /64 or so; a /32 is a whole provider's


def route_refusal(cidr, node_ips: list, accepted: list) -> str:
    """Why a remote Node's pod CIDR must not become a route here ("" if it may). Node objects are
    written by kubelets and controllers, not by bpflb: a wrong one must not turn into a default route,
    hijack this node's own pods or the node network, or shadow another node's pods."""
    least = MIN_POD_PREFIX if cidr.version == 4 else MIN_POD_PREFIX6
    if cidr.prefixlen < least:
        return f"is broader than /{least} (a default or near-default route)"
    for net in _NOT_POD_NETWORKS:
        if cidr.overlaps(net):
            return f"overlaps {net}, which is not a pod network"
    for ip in node_ips:
        if ip in cidr:
            return f"contains the node address {ip} (the node network)"
    for other, owner in accepted:
        if cidr.overlaps(other):
            return f"overlaps {other} of Node {owner}"
    return ""


def mtu_for(mode: str, uplink_mtu: int) -> int:
    """The MTU inside the pod network: in overlay mode the outer headers take VXLAN_OVERHEAD bytes, so
    a full-size inner packet must leave that much room on the uplink (or every one is fragmented: a 5x
    throughput loss measured here); otherwise the uplink's own MTU. The VXLAN device and the pods'
    eth0 (the CNI conflist) both get it."""
    return uplink_mtu - VXLAN_OVERHEAD if mode == "overlay" else uplink_mtu


def uplink_mtu(node_ip: str | None, ipr=None) -> int:
    """MTU of the device holding the node IP (else of the default route's device; else 1500)."""
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        dev = uplink_index(ipr, node_ip)
        if dev:
            links = ipr.get_links(dev)
            if links:
                return links[0].get_attr("IFLA_MTU")
    except Exception as e:  # noqa: BLE001 - a guess is better than no pod network
        log.warning("cannot read the uplink MTU (%s); assuming 1500", e)
    finally:
        if own:
            ipr.close()
    return 1500


def pod_mtu(mode: str, node_ip: str | None) -> int:
    return mtu_for(mode, uplink_mtu(node_ip))


def _device_with(ipr, ip: str) -> int | None:
    for a in ipr.get_addr(family=socket.AF_INET):
        if a.get_attr("IFA_ADDRESS") == ip:
            return a["index"]
    return None


def uplink_index(ipr, node_ip: str | None) -> int | None:
    """The uplink's ifindex: the device holding the node IP, else the default route's device."""
    dev = _device_with(ipr, node_ip) if node_ip else None
    if dev is None:
        for r in ipr.get_default_routes(family=socket.AF_INET):
            if dev := r.get_attr("RTA_OIF"):
                break
    return dev


@functools.cache
def _setlink_inet_conf() -> type:
    """RTM_SETLINK carrying only IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_*: u32 } } }
    (the kernel's inet_set_link_af). pyroute2's ifinfmsg decodes the GETLINK form of IFLA_INET_CONF (a
    flat array) but does not encode this nested SETLINK form. Defined on first use: importing pyroute2
    costs the agent ~11 MiB RSS and ~50 ms at start, and with --network-mode none it never needs it."""
    from pyroute2.netlink import nla, nlmsg

    class setlink_inet_conf(nlmsg):
        fields = (("family", "B"), ("__align", "x"), ("ifi_type", "H"), ("index", "i"), ("flags", "I"),
                  ("change", "I"))
        nla_map = ((IFLA_AF_SPEC, "IFLA_AF_SPEC", "af_spec"),)

        class af_spec(nla):
            nla_map = ((socket.AF_INET, "AF_INET", "inet"),)

            class inet(nla):
                nla_map = ((1, "IFLA_INET_CONF", "conf"),)

                class conf(nla):
                    nla_map = tuple((num, name, "uint32") for name, num in IPV4_DEVCONF.items())
    return setlink_inet_conf


def devconf(ipr, index: int) -> dict[str, int]:
    """This device's IPv4 settings (``IPV4_DEVCONF`` names), from RTM_GETLINK."""
    inet = ipr.get_links(index)[0].get_attr("IFLA_AF_SPEC").get_attr("AF_INET")
    return {name: inet[name] for name in IPV4_DEVCONF}


def set_devconf(ipr, index: int, **want: int) -> dict[str, int]:
    """Set IPv4 per-device settings over netlink (what ``sysctl -w net.ipv4.conf.<dev>.<name>=<v>`` does,
    without /proc/sys); returns those that changed. Needs CAP_NET_ADMIN in the device's namespace."""
    have = devconf(ipr, index)
    diff = {k: v for k, v in want.items() if have[k] != v}
    if not diff:
        return {}
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

    msg = _setlink_inet_conf()()
    msg["family"], msg["index"] = socket.AF_UNSPEC, index
    msg["attrs"] = [("IFLA_AF_SPEC", {"attrs": [("AF_INET", {"attrs": [
        ("IFLA_INET_CONF", {"attrs": sorted(diff.items())})]})]})]
    flags = NLM_F_REQUEST | NLM_F_ACK
    try:
        tuple(ipr.nlm_request(msg, msg_type=RTM_SETLINK, msg_flags=flags))
    except KeyError:  # pyroute2 0.9: the sync nlm_request reads a status key it never sets (before sending)
        tuple(ipr._generate_with_cleanup(ipr.asyncore.nlm_request, msg, RTM_SETLINK, flags, None, None, None))
    return diff


def _devconf_changes(ipr, index: int, name: str, **want: int) -> list[str]:
    try:
        return [f"{name} {k}={v}" for k, v in set_devconf(ipr, index, **want).items()]
    except Exception as e:  # noqa: BLE001 - a node the agent may not configure still gets its routes
        log.warning("cannot set %s on %s: %s", ", ".join(f"{k}={v}" for k, v in want.items()), name, e)
        return []


def _family(cidr: str) -> int:
    return socket.AF_INET6 if ":" in cidr else socket.AF_INET


_ipv6_forwarding_warned = False


def _warn_ipv6_forwarding(needed: bool) -> None:
    """Once: IPv6 pod routes on a node whose net.ipv6.conf.all.forwarding is 0 (read, never written)."""
    global _ipv6_forwarding_warned
    if not needed or _ipv6_forwarding_warned:
        return
    from . import sysctl

    try:
        on = sysctl.read("net/ipv6/conf/all/forwarding") == "1"
    except sysctl.SysctlError:
        on = False
    if not on:
        _ipv6_forwarding_warned = True
        log.warning("IPv6 pod routes are installed but net.ipv6.conf.all.forwarding is 0: this node forwards no "
                    "IPv6 pod traffic until its administrator sets it to 1")


def apply(p: Plan, ipr=None) -> list[str]:
    """Make this network namespace match the plan; returns what changed."""
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    changes: list[str] = []
    try:
        if p.mode == "none" or p.node_ip is None:
            return changes  # nothing known about this node yet: touch nothing
        uplink = uplink_index(ipr, p.node_ip)
        if uplink is None:
            log.warning("no device holds the node IP %s and there is no default route: no uplink", p.node_ip)
        else:
            changes += _devconf_changes(ipr, uplink, ipr.get_links(uplink)[0].get_attr("IFLA_IFNAME"), forwarding=1)
        dev = None
        if p.mode == "overlay" and p.node_ip:
            found = ipr.link_lookup(ifname=VXLAN_DEV)
            if not found:
                extra = {"vxlan_link": uplink} if uplink else {}
                ipr.link("add", ifname=VXLAN_DEV, kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_port=VXLAN_PORT,
                         vxlan_local=p.node_ip, vxlan_learning=0, address=vtep_mac(p.node_ip), **extra)
                found = ipr.link_lookup(ifname=VXLAN_DEV)
                changes.append(f"created {VXLAN_DEV}")
            dev = found[0]
            if uplink:
                mtu = mtu_for(p.mode, ipr.get_links(uplink)[0].get_attr("IFLA_MTU"))
                if ipr.get_links(dev)[0].get_attr("IFLA_MTU") != mtu:
                    ipr.link("set", index=dev, mtu=mtu)
                    changes.append(f"{VXLAN_DEV} mtu {mtu}")
            ipr.link("set", index=dev, state="up")
            changes += _devconf_changes(ipr, dev, VXLAN_DEV, forwarding=1, rp_filter=0)
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=dev)}
            if p.vtep_addr and p.vtep_addr not in have:
                ipr.addr("add", index=dev, address=p.vtep_addr, prefixlen=32)
                changes.append(f"{VXLAN_DEV} address {p.vtep_addr}/32")
            if p.vtep_addr6 and p.vtep_addr6 not in have:
                ipr.addr("add", index=dev, address=p.vtep_addr6, prefixlen=128, flags=0x02)  # IFA_F_NODAD
                changes.append(f"{VXLAN_DEV} address {p.vtep_addr6}/128")
            # FDB: remote VTEP MAC -> remote node IP
            have_fdb = set()
            for e in ipr.fdb("dump", ifindex=dev):
                mac, dst = e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST")
                if dst and mac and mac != "00:00:00:00:00:00":
                    have_fdb.add((mac, dst))
            for mac, dst in sorted(p.fdb - have_fdb):
                ipr.fdb("append", ifindex=dev, lladdr=mac, dst=dst)
                changes.append(f"fdb {mac} -> {dst}")
            for mac, dst in sorted(have_fdb - p.fdb):
                ipr.fdb("del", ifindex=dev, lladdr=mac, dst=dst)
                changes.append(f"fdb {mac} -> {dst} removed")
            have_neigh = {(n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
                          for family in (socket.AF_INET, socket.AF_INET6)
                          for n in ipr.get_neighbours(ifindex=dev, family=family) if n["state"] & NUD_PERMANENT}
            for ip, mac in sorted(p.neighbours - have_neigh):
                ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=dev, state=NUD_PERMANENT, family=_family(ip))
                changes.append(f"neigh {ip} {mac}")
            for ip, mac in sorted(have_neigh - p.neighbours):
                ipr.neigh("del", dst=ip, lladdr=mac, ifindex=dev, family=_family(ip))
                changes.append(f"neigh {ip} removed")
        # Routes we own, of both families.
        have_routes = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, proto=RTPROT_BPFLB):
                if r["proto"] != RTPROT_BPFLB:
                    continue
                dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
                have_routes[dst] = r
        want = {r.dst: r for r in p.routes}
        _warn_ipv6_forwarding(any(":" in dst for dst in want))
        for dst, spec in sorted(want.items()):
            idx = [uplink] if spec.dev is None and uplink is not None else ipr.link_lookup(ifname=spec.dev or "")
            if not idx:
                log.warning("route %s: device %s missing", dst, spec.dev or "(uplink)")
                continue
            cur = have_routes.get(dst)
            if cur is not None and cur.get_attr("RTA_GATEWAY") == spec.gateway and cur.get_attr("RTA_OIF") == idx[0]:
                continue
            ipr.route("replace", dst=dst, gateway=spec.gateway, oif=idx[0], proto=RTPROT_BPFLB,
                      family=_family(dst), flags=4 if spec.onlink else 0)  # RTNH_F_ONLINK
            changes.append(f"route {dst} via {spec.gateway} dev {spec.dev or ipr.get_links(idx[0])[0].get_attr('IFLA_IFNAME')}")
        for dst in sorted(set(have_routes) - set(want)):
            ipr.route("del", dst=dst, proto=RTPROT_BPFLB, family=_family(dst))
            changes.append(f"route {dst} removed")
        return changes
    finally:
        if own:
            ipr.close()
