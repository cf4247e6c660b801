"""The CNI plugin's IPAM on its own: files under a temp dir, no kernel. Concurrency is tested with
separate processes, each with its own descriptors, as separate `bpflb-cni` runs would be."""
from __future__ import annotations

import ipaddress
import multiprocessing
import os

import pytest

from lb.cni.ipam import IPAM, Pool, PoolExhausted


def reserved(ipam: IPAM) -> list[str]:
    return sorted((f for f in os.listdir(ipam.dir) if not f.startswith(".")), key=ipaddress.IPv4Address)


@pytest.mark.parametrize("cidr,size,gateway", [
    ("10.244.0.0/30", 1, "10.244.0.1"),
    ("10.244.0.0/29", 5, "10.244.0.1"),
    ("10.244.0.0/24", 253, "10.244.0.1"),
    ("10.244.0.77/24", 253, "10.244.0.1"),  # host bits ignored, as kubelet's podCIDR never has them anyway
], ids=["slash30", "slash29", "slash24", "host-bits"])
def test_pool_excludes_network_broadcast_and_gateway(cidr, size, gateway):
    pool = Pool.of(cidr)
    assert pool.size == size and str(pool.gateway) == gateway
    net = pool.subnet
    assert net.network_address not in pool and net.broadcast_address not in pool and pool.gateway not in pool
    assert "not an address" not in pool and "fd00::1" not in pool


def test_round_robin_retry_release_and_exhaustion(tmp_path):
    ipam, pool = IPAM(str(tmp_path), "net"), Pool.of("10.244.0.0/29")
    got = [ipam.allocate(pool, f"c{i}", "eth0") for i in range(5)]
    assert got == [f"10.244.0.{n}" for n in range(2, 7)]
    assert ipam.allocate(pool, "c3", "eth0") == "10.244.0.5"  # a retried ADD keeps its address
    assert ipam.free(pool) == 0
    with pytest.raises(PoolExhausted, match=r"all 5 addresses of 10.244.0.0/29 are reserved"):
        ipam.allocate(pool, "c9", "eth0")
    assert ipam.release("c1", "eth0") == "10.244.0.3"
    assert ipam.release("c1", "eth0") is None  # a second DEL: nothing to give back, no error
    assert ipam.allocate(pool, "c9", "eth0") == "10.244.0.3"
    ipam.release("c9", "eth0")
    ipam.release("c0", "eth0")
    assert ipam.allocate(pool, "c10", "eth0") == "10.244.0.2"  # the pool wraps around from .6
    assert ipam.find("c10", "eth0") == "10.244.0.2" and ipam.find("c10", "net1") is None


def test_same_container_two_interfaces_get_two_addresses(tmp_path):
    ipam, pool = IPAM(str(tmp_path), "net"), Pool.of("10.244.0.0/24")
    a, b = ipam.allocate(pool, "c", "eth0"), ipam.allocate(pool, "c", "net1")
    assert a != b
    assert {(r.ip, r.container_id, r.ifname) for r in ipam.reservations()} == {(a, "c", "eth0"), (b, "c", "net1")}


def test_a_changed_pod_cidr_moves_a_retried_add_into_the_new_pool(tmp_path):
    ipam = IPAM(str(tmp_path), "net")
    old = ipam.allocate(Pool.of("10.244.1.0/24"), "c", "eth0")
    new = ipam.allocate(Pool.of("10.244.2.0/24"), "c", "eth0")
    assert old.startswith("10.244.1.") and new.startswith("10.244.2.") and reserved(ipam) == [new]


def _worker(args) -> list[str]:
    data, worker, n = args
    ipam, pool = IPAM(data, "net"), Pool.of("10.244.0.0/24")
    got = []
    for i in range(n):
        got.append(ipam.allocate(pool, f"w{worker}-{i}", "eth0"))
        if i % 3 == 0:  # interleave releases with other processes' allocations
            assert ipam.release(f"w{worker}-{i}", "eth0") == got.pop()
    return got


def test_concurrent_processes_never_share_an_address_and_leak_nothing(tmp_path):
    with multiprocessing.get_context("fork").Pool(8) as procs:
        results = procs.map(_worker, [(str(tmp_path), w, 45) for w in range(8)])
    held = [ip for r in results for ip in r]
    assert len(held) == 8 * 30 and len(set(held)) == len(held)
    ipam = IPAM(str(tmp_path), "net")
    assert reserved(ipam) == sorted(held, key=ipaddress.IPv4Address)
    for w in range(8):
        for i in range(45):
            ipam.release(f"w{w}-{i}", "eth0")
    assert reserved(ipam) == []
