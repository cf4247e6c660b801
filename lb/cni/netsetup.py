"""The kernel side of a pod attachment (pyroute2): the node's host devices, the pod's veth pair, its
address, routes and sysctls, and their removal.

Runs in the caller's network namespace (the node's); the pod's namespace is entered by path. Never
called with an event loop running in the thread (pyroute2 0.9 would drive its sockets with it): the
CNI server calls it from worker threads.

The pod's view: eth0 holds <pod ip>/32 and a default route via the pod CIDR's gateway, marked onlink.
The node's view: the gateway address sits on bpflb_host; each pod has a host veth "lxc<hash>" with a
/32 route to the pod through it and proxy ARP on, so the pod's ARP for the gateway is always answered
by the node whatever the node's arp_ignore setting.

IPv6 (a dual-stack or IPv6 node): eth0 also holds <pod ip6>/128, added with IFA_F_NODAD so it is usable
at once (no duplicate address detection: the IPAM owns the range), and a default route via fe80::1
(ipam.GATEWAY6) on eth0. The host veth holds fe80::1/64 itself (also NODAD), so the pod's neighbour
solicitation for its next hop is answered by the node (Calico and Cilium route pods through a link-local
next hop the same way), and the node has a /128 route to the pod through the veth. The pod's namespace
needs no sysctl for it: IPv6 is on in a new namespace, and an address with NODAD needs no accept_dad.
Forwarding is the node's: IPv6 forwards only when net.ipv6.conf.all.forwarding is 1 (ip6_forward reads
the global switch; the per-device force_forwarding of Linux 6.17+ is a /proc/sys file too, and RTM_SETLINK
sets no IPv6 devconf), so ADD warns once when it is 0, as for IPv4.

Nothing here writes /proc/sys: kubelet mounts it read-only in every container that is not privileged.
A device's proxy_arp and forwarding are set over rtnetlink (RTM_SETLINK with IFLA_AF_SPEC/AF_INET/
IFLA_INET_CONF, what `ip link set` uses; CAP_NET_ADMIN, which the agent holds anyway). The node-wide
net.ipv4.ip_forward has no netlink setter, and it is the node's to set, not a pod's. It is not needed
either: the kernel forwards a packet when its *input* device has forwarding on (IN_DEV_FORWARD in
ip_route_input_slow), so the host veth's forwarding (set here) carries pod egress and the uplink's and
VXLAN device's (set by lb/nodenet.py) carry traffic into pods. ADD reads ip_forward only to warn once
when it is 0 and the node is not bpflb's to route (--network-mode none leaves the uplink alone).
"""
from __future__ import annotations

import errno
import logging
import fcntl
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable, TypeVar

from pyroute2 import IPRoute, NetlinkError

from .. import netns as netns_
from .. import sysctl

HOST_DEV, NET_DEV = "bpflb_host", "bpflb_net"
HOST_IF_PREFIX = "lxc"
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253
AF_INET, AF_INET6 = 2, 10
IFF_UP = 1
IFA_F_NODAD = 0x02
GATEWAY6 = "fe80::1"  # ipam.GATEWAY6: every pod's IPv6 next hop, held by its host veth

T = TypeVar("T")


class SetupError(Exception):
    """A step of the attachment failed; the message names the step and the object."""


def in_netns(netns: str, work: Callable[[IPRoute], T]) -> T:
    """``work(ipr)`` with an IPRoute bound to another network namespace (lb/netns.py says why not
    ``IPRoute(netns=...)``)."""
    def run() -> T:
        with IPRoute() as ipr:
            return work(ipr)
    return netns_.run_in(netns, run)


def host_ifname(container_id: str, ifname: str) -> str:
    """The host end's name: stable for an attachment (DEL and GC find it without any record)."""
    return HOST_IF_PREFIX + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


# ---- a device's IPv4 settings over rtnetlink (include/uapi/linux/{if_link,ip,netlink,rtnetlink}.h) ----
IPV4_DEVCONF_FORWARDING, IPV4_DEVCONF_PROXY_ARP = 1, 3
IFLA_AF_SPEC, IFLA_INET_CONF = 26, 1
RTM_SETLINK, NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 19, 1, 4, 2
NLA_F_NESTED = 1 << 15
_NLMSG, _IFINFO, _NLA = struct.Struct("=IHHII"), struct.Struct("=BxHiII"), struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    head = _NLA.pack(_NLA.size + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def set_inet_conf(index: int, values: dict[int, int]) -> None:
    """Set IPv4 devconf entries (IPV4_DEVCONF_*) of one device in the caller's network namespace, as
    writing /proc/sys/net/ipv4/conf/<dev>/<key> would (the kernel's inet_set_link_af)."""
    conf = b"".join(_nla(k, struct.pack("=I", v)) for k, v in sorted(values.items()))
    attrs = _nla(IFLA_AF_SPEC | NLA_F_NESTED, _nla(AF_INET | NLA_F_NESTED, _nla(IFLA_INET_CONF | NLA_F_NESTED, conf)))
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + attrs
    msg = _NLMSG.pack(_NLMSG.size + len(body), RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.settimeout(5)
        s.sendto(msg, (0, 0))
        while True:
            data = s.recv(65536)
            _, kind, _, seq, _ = _NLMSG.unpack_from(data)
            if kind == NLMSG_ERROR and seq == 1:
                (err,) = struct.unpack_from("=i", data, _NLMSG.size)
                if err:
                    raise NetlinkError(-err, os.strerror(-err))
                return


def _devconf(index: int, name: str, **values: int) -> None:
    keys = {"forwarding": IPV4_DEVCONF_FORWARDING, "proxy_arp": IPV4_DEVCONF_PROXY_ARP}
    try:
        set_inet_conf(index, {keys[k]: v for k, v in values.items()})
    except (OSError, NetlinkError) as e:
        what = ", ".join(f"net.ipv4.conf.{name}.{k}={v}" for k, v in values.items())
        raise SetupError(f"setting {what} over netlink: {e}") from None


log = logging.getLogger("bpflb.cni.netsetup")

IP_FORWARD_OFF = ("net.ipv4.ip_forward is 0 on this node: bpflb forwards per device (the pods' host veths, and "
                  "the uplink and VXLAN device in overlay/direct mode), so its own paths work; with --network-mode "
                  "none, whatever routes between nodes must enable forwarding on the uplink (Kubernetes expects "
                  "sysctl -w net.ipv4.ip_forward=1). bpflb does not write /proc/sys: it is read-only in its container")
IPV6_FORWARD_OFF = ("net.ipv6.conf.all.forwarding is 0 on this node: pods' IPv6 traffic to and from other hosts "
                    "is not forwarded (the kernel forwards IPv6 on the node-wide switch, which has no netlink "
                    "setter); the node's administrator must run sysctl -w net.ipv6.conf.all.forwarding=1 "
                    "(Kubernetes expects it on dual-stack nodes)")
_warned_forwarding = False
_warned_forwarding6 = False


def node_forwards(version: int = 4) -> bool:
    """net.ipv4.ip_forward (or net.ipv6.conf.all.forwarding) of the caller's network namespace
    (/proc/sys/net reflects the reader's)."""
    try:
        return sysctl.read("net/ipv4/ip_forward" if version == 4 else "net/ipv6/conf/all/forwarding") == "1"
    except sysctl.SysctlError:
        return False


# ---- the pod's namespace, as the runtime names it ---------------------------------------------------
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
CLONE_NEWNET = 0x40000000


class BadNetns(Exception):
    """CNI_NETNS is not a usable pod network namespace; the message says why."""


def open_pod_netns(path: str) -> int:
    """A descriptor of the network namespace at ``path``, checked: a network namespace (not a file, a
    FIFO that would block, or another kind of namespace), and not the node's own (the thread's, which is
    the agent's: hostNetwork). Later steps use the descriptor, so the path cannot be swapped meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise BadNetns(f"CNI_NETNS {path}: {e.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != CLONE_NEWNET:
            raise BadNetns(f"CNI_NETNS {path} is not a network namespace")
        st, own = os.fstat(fd), os.stat("/proc/thread-self/ns/net")
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            raise BadNetns(f"CNI_NETNS {path} is the node's own network namespace")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _link(ipr: IPRoute, ifname: str):
    """The link's message (index, flags, IFLA_ADDRESS) in one request, or None."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _up(ipr: IPRoute, link) -> None:
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=link["index"], state="up")


def host_devices(ipr: IPRoute) -> int | None:
    """bpflb_host's index if it is there and up, else None."""
    host = _link(ipr, HOST_DEV)
    return host["index"] if host is not None and host["flags"] & IFF_UP else None


def ensure_host_devices(ipr: IPRoute, gateway: str | None, ipv6: bool = False) -> None:
    """bpflb_host/bpflb_net, the node's end of the pod network, with the IPv4 gateway address (if any)
    on bpflb_host; forwarding checked (never written: see the module's docstring). Idempotent, and safe
    when concurrent ADDs race to create them."""
    global _warned_forwarding, _warned_forwarding6
    if gateway is not None and not _warned_forwarding and not node_forwards():
        _warned_forwarding = True
        log.warning("%s", IP_FORWARD_OFF)
    if ipv6 and not _warned_forwarding6 and not node_forwards(6):
        _warned_forwarding6 = True
        log.warning("%s", IPV6_FORWARD_OFF)
    host = _link(ipr, HOST_DEV)
    if host is None:
        try:
            ipr.link("add", ifname=HOST_DEV, kind="veth", peer={"ifname": NET_DEV})
        except NetlinkError as e:
            if e.code != errno.EEXIST:  # EEXIST: a concurrent ADD made it
                raise SetupError(f"creating {HOST_DEV}/{NET_DEV}: {e}") from None
        host = _link(ipr, HOST_DEV)
    have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host["index"], family=AF_INET)}
    if gateway is not None and gateway not in have:
        try:
            ipr.addr("add", index=host["index"], address=gateway, prefixlen=32)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise SetupError(f"adding {gateway} to {HOST_DEV}: {e}") from None
    _up(ipr, host)
    net = _link(ipr, NET_DEV)
    if net is not None:
        _up(ipr, net)


@dataclass(frozen=True)
class Address:
    """One of the pod's addresses and the next hop of its family's default route."""
    ip: str
    gateway: str

    @property
    def version(self) -> int:
        return 6 if ":" in self.ip else 4


@dataclass(frozen=True)
class Attachment:
    host_if: str
    host_index: int
    host_mac: str
    pod_mac: str
    mtu: int


def attach(netns_fd: int, ifname: str, host_if: str, addrs: list[Address], mtu: int, netns: str = "") -> Attachment:
    """The node's devices, then the pair, created with its pod end directly in the pod's namespace
    (``netns_fd``, from open_pod_netns; ``netns`` its path, for messages); then both ends configured
    with every address of ``addrs`` (at most one per family)."""
    fd = netns_fd
    netns = netns or f"/proc/self/fd/{fd}"
    v4 = [a for a in addrs if a.version == 4]
    v6 = [a for a in addrs if a.version == 6]
    with IPRoute() as ipr:
        ensure_host_devices(ipr, v4[0].gateway if v4 else None, ipv6=bool(v6))
        stale = _link(ipr, host_if)
        if stale is not None:  # a retried ADD: its pair goes, the pod end with it
            ipr.link("del", index=stale["index"])
        try:
            ipr.link("add", ifname=host_if, kind="veth", mtu=mtu,
                     peer={"ifname": ifname, "net_ns_fd": fd, "mtu": mtu})
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise SetupError(f"interface {ifname} already exists in {netns}") from None
            raise SetupError(f"creating veth {host_if}/{ifname}: {e}") from None
        host = _link(ipr, host_if)
        _devconf(host["index"], host_if, proxy_arp=1, forwarding=1)
        _up(ipr, host)
        for a in v4:
            ipr.route("replace", dst=f"{a.ip}/32", oif=host["index"], scope=RT_SCOPE_LINK)
        for a in v6:
            try:
                ipr.addr("add", index=host["index"], address=a.gateway, prefixlen=64, flags=IFA_F_NODAD)
            except NetlinkError as e:
                raise SetupError(f"adding {a.gateway} to {host_if} (is IPv6 disabled on the node?): {e}") from None
            ipr.route("replace", dst=f"{a.ip}/128", oif=host["index"], family=AF_INET6)

    def pod_side(pod: IPRoute) -> str:
        _up(pod, _link(pod, "lo"))  # no loopback plugin needed
        eth = _link(pod, ifname)
        for a in v4:
            pod.addr("add", index=eth["index"], address=a.ip, prefixlen=32)
        for a in v6:
            pod.addr("add", index=eth["index"], address=a.ip, prefixlen=128, flags=IFA_F_NODAD)
        pod.link("set", index=eth["index"], state="up")
        for a in v4:
            pod.route("add", dst="0.0.0.0/0", gateway=a.gateway, oif=eth["index"], flags=RTNH_F_ONLINK)
        for a in v6:  # a link-local next hop needs no onlink: it is on eth0 by definition
            pod.route("add", dst="::/0", gateway=a.gateway, oif=eth["index"], family=AF_INET6)
        return eth.get_attr("IFLA_ADDRESS")

    try:
        pod_mac = in_netns(f"/proc/self/fd/{fd}", pod_side)
    except NetlinkError as e:
        raise SetupError(f"configuring {ifname} in {netns}: {e}") from None
    return Attachment(host_if, host["index"], host.get_attr("IFLA_ADDRESS"), pod_mac, mtu)


def detach(host_if: str) -> bool:
    """Delete the pair by its host end (the pod end goes with it; the kernel drops the /32 route).
    Missing is success."""
    with IPRoute() as ipr:
        link = _link(ipr, host_if)
        if link is None:
            return False
        try:
            ipr.link("del", index=link["index"])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
        return True


def check(netns: str, ifname: str, host_if: str, addrs: list[Address]) -> str | None:
    """None if the attachment is as recorded, else what is wrong."""
    with IPRoute() as ipr:
        host = _link(ipr, host_if)
        if host is None:
            return f"host interface {host_if} is missing"
        if not host["flags"] & IFF_UP:
            return f"host interface {host_if} is down"
        for a in addrs:
            family, bits = (AF_INET, 32) if a.version == 4 else (AF_INET6, 128)
            routes = ipr.get_routes(family=family, oif=host["index"])
            if not [r for r in routes if r["dst_len"] == bits and r.get_attr("RTA_DST") == a.ip]:
                return f"no route to {a.ip} via {host_if} on the node"
            if a.version == 6 and a.gateway not in {x.get_attr("IFA_ADDRESS") for x in
                                                    ipr.get_addr(index=host["index"], family=AF_INET6)}:
                return f"host interface {host_if} does not hold the pods' IPv6 gateway {a.gateway}"
    if not os.path.exists(netns):
        return f"network namespace {netns} is gone"

    def pod_side(pod: IPRoute) -> str | None:
        eth = _link(pod, ifname)
        if eth is None:
            return f"interface {ifname} is missing in {netns}"
        if not eth["flags"] & IFF_UP:
            return f"{ifname} is down in {netns}"
        for a in addrs:
            family = AF_INET if a.version == 4 else AF_INET6
            held = {x.get_attr("IFA_ADDRESS") for x in pod.get_addr(index=eth["index"], family=family)}
            if a.ip not in held:
                return f"{ifname} does not hold {a.ip}"
            gws = {r.get_attr("RTA_GATEWAY") for r in pod.get_routes(family=family, table=254) if r["dst_len"] == 0}
            if a.gateway not in gws:
                return f"no {'IPv6 ' if a.version == 6 else ''}default route via {a.gateway} in {netns}"
        return None

    return in_netns(netns, pod_side)
