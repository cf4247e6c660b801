"""The kernel side of a pod attachment (pyroute2): the node's host devices, the pod's veth pair, its
address, routes and sysctls, and their removal. Runs in the caller's network namespace (the node's);
the pod's namespace is entered by path. Never called with an event loop running in the thread
(pyroute2 0.9 would drive its sockets with it): the CNI server calls it from worker threads."""
from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

HOST_DEV, NET_DEV = "bpflb_host", "bpflb_net"
RTNH_F_ONLINK = 4


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
CLONE_NEWNET = 0x40000000


@contextmanager
def ipr_in(netns: str):
    """An IPRoute bound to another network namespace, without pyroute2's netns helper (it forks, and
    a fork of the multi-threaded agent inherits its sockets). A netlink socket belongs to the
    namespace it was created in, so this thread enters the namespace just long enough to open it."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            ipr = IPRoute()
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    try:
        yield ipr
    finally:
        ipr.close()


def host_ifname(container_id: str, ifname: str) -> str:
    return "lxc" + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def ensure_host_devices(gateway: str) -> None:
    """bpflb_host/bpflb_net: the pair holding the pod CIDR's gateway address on the node. With a local
    route to the gateway, proxy ARP on each pod's host veth answers the pods' ARP for it."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=HOST_DEV):
            try:
                ipr.link("add", ifname=HOST_DEV, kind="veth", peer={"ifname": NET_DEV})
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: a concurrent ADD made it
                    raise
        host = ipr.link_lookup(ifname=HOST_DEV)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host)}
        if gateway not in have:
            try:
                ipr.addr("add", index=host, address=gateway, prefixlen=32)
            except NetlinkError as e:
                if e.code != 17:
                    raise
        ipr.link("set", index=host, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname=NET_DEV)[0], state="up")
    _sysctl("/proc/sys/net/ipv4/ip_forward", "1")


@dataclass(frozen=True)
class Attachment:
    host_if: str
    host_index: int
    pod_mac: str
    host_mac: str


def attach(netns: str, ifname: str, host_if: str, ip: str, gateway: str, mtu: int) -> Attachment:
    fd = os.open(netns, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=host_if):  # a retried ADD: start clean
                ipr.link("del", index=ipr.link_lookup(ifname=host_if)[0])
            ipr.link("add", ifname=host_if, kind="veth", mtu=mtu, peer={"ifname": ifname, "net_ns_fd": fd, "mtu": mtu})
            host = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=host, state="up")
            host_mac = ipr.get_links(host)[0].get_attr("IFLA_ADDRESS")
            _sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp", "1")
            _sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding", "1")
            ipr.route("replace", dst=f"{ip}/32", oif=host, scope=253)
    finally:
        os.close(fd)
    with ipr_in(netns) as pod:
        lo = pod.link_lookup(ifname="lo")[0]
        pod.link("set", index=lo, state="up")
        eth = pod.link_lookup(ifname=ifname)[0]
        pod.addr("add", index=eth, address=ip, prefixlen=32)
        pod.link("set", index=eth, state="up")
        pod.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth, flags=RTNH_F_ONLINK)
        pod_mac = pod.get_links(eth)[0].get_attr("IFLA_ADDRESS")
    return Attachment(host_if, host, pod_mac, host_mac)


def detach(host_if: str) -> bool:
    """Delete the pair by its host end (the pod end goes with it). Missing is success."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host_if)
        if not idx:
            return False
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as e:
            if e.code != 19:  # ENODEV
                raise
        return True


def check(netns: str, ifname: str, host_if: str, ip: str, gateway: str) -> str | None:
    """None if the attachment is as recorded, else what is wrong."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=host_if):
            return f"host interface {host_if} is missing"
    if not os.path.exists(netns):
        return f"network namespace {netns} is gone"
    with ipr_in(netns) as pod:
        idx = pod.link_lookup(ifname=ifname)
        if not idx:
            return f"interface {ifname} is missing in {netns}"
        addrs = {a.get_attr("IFA_ADDRESS") for a in pod.get_addr(index=idx[0])}
        if ip not in addrs:
            return f"{ifname} does not hold {ip}"
        gws = {r.get_attr("RTA_GATEWAY") for r in pod.get_routes(family=2) if r["dst_len"] == 0}
        if gateway not in gws:
            return f"no default route via {gateway} in {netns}"
    return None


def gateway_of(subnet: str) -> str:
    return str(next(ipaddress.ip_network(subnet, strict=False).hosts()))
