"""kube_proxy_rules against the real kube-proxy v1.34.4, on the real kernel, in network namespaces.

Each comparison builds the same ruleset in two namespaces, A and B: kubelet's chains, the real kube-proxy
(iptables mode on iptables-nft or iptables-legacy, or nftables mode) run against a real API server until it
programmed three Services, then kube-router's chains. In A our remove() runs, in B `kube-proxy --cleanup`;
the two must end equal (every iptables backend of both families, the nft ruleset, the links), with
kubelet's and kube-router's chains untouched. find() must name exactly what kube-proxy's cleanup removed,
and nothing in a namespace holding only other components' KUBE-* chains.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

from lb import kube_proxy_rules
from lb.testing.apiserver import ControlPlane
from lb.testing.kube_proxy_bed import (LoopbackRelay, Netns, add_ipvs_mode_chains, add_kube_router_chains,
                                       add_kubelet_chains, in_ns_python, kube_proxy_binary, kube_proxy_cleanup,
                                       node_objects, ruleset, run_kube_proxy)

ROOT = Path(__file__).resolve().parent.parent
# Chains of other components that must survive, and never be reported (kubelet's, then kube-router's).
FOREIGN = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "KUBE-FIREWALL", "KUBE-ROUTER-INPUT",
           "KUBE-ROUTER-FORWARD", "KUBE-ROUTER-OUTPUT", "KUBE-NWPLCY-DEFAULT", "KUBE-POD-FW-")


def ours(ns: Netns, fn: str) -> list[str]:
    out = in_ns_python(ns, f"import json; from lb.kube_proxy_rules import {fn}; print(json.dumps({fn}()))", ROOT)
    return json.loads(out.stdout)


def assert_same(a: dict[str, str], b: dict[str, str], what: str) -> None:
    for key in b:
        diff = "\n".join(difflib.unified_diff(a[key].splitlines(), b[key].splitlines(), "A", "B", lineterm=""))
        assert not diff, f"{key}: {what}\n{diff}"


def unordered(rules: dict[str, str]) -> dict[str, str]:
    """A ruleset with the order of its lines (nft: of its words) sorted away. kube-proxy writes its Services
    in Go map order, so two runs on the same objects differ in the order of KUBE-SERVICES' rules and of
    nft set elements; only the starting rulesets are compared this way, the results of removal exactly."""
    return {k: "\n".join(sorted(re.split(r"[\s,]+", v) if k == "nft" else v.splitlines()))
            for k, v in rules.items()}


def save_chains(text: str) -> set[tuple[str, str]]:
    """(table, chain) of every chain in an iptables-save dump."""
    return {(table, c) for table, (chains, _) in kube_proxy_rules.parse_save(text).items() for c in chains}


def removed_chains(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """What find() says for every chain that went away between two rulesets (iptables-save dumps)."""
    out = set()
    for saver in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
        tool = saver.removesuffix("-save")
        out |= {f"{tool} -t {t} chain {c}" for t, c in save_chains(before[saver]) - save_chains(after[saver])}
    return out


def assert_foreign_intact(rules: dict[str, str], variant: str) -> None:
    for saver in (f"iptables-{variant}-save", f"ip6tables-{variant}-save"):
        for name in FOREIGN:
            if name == "KUBE-FIREWALL" and saver.startswith("ip6"):
                continue  # kubelet makes it for IPv4 only
            assert f":{name}" in rules[saver], f"{name} missing from {saver}"
    v4 = rules[f"iptables-{variant}-save"]
    assert "-A INPUT -j KUBE-FIREWALL" in v4 and "-A OUTPUT -j KUBE-FIREWALL" in v4
    assert '--comment "block incoming localnet connections"' in v4  # the CVE-2020-8558 rule
    assert "-j KUBE-ROUTER-FORWARD" in v4


@pytest.fixture(scope="module")
def cp():
    kube_proxy_binary()  # built before the API server's clock starts (minutes, the first time)
    with ControlPlane() as cp:
        node_objects(cp)
        yield cp


def kube_proxy_synced(ns: Netns, mode: str):
    """kube-proxy's IPv4 and IPv6 proxiers sync on their own: both must have written their first full sync
    (it comes after the informers synced, so it holds every Service; one iptables-restore or one nft
    transaction per family, so a part of it means all of it)."""
    if mode == "iptables":
        def synced() -> bool:
            v4 = ns.run("iptables-save", "-t", "nat", check=False).stdout
            v6 = ns.run("ip6tables-save", "-t", "nat", check=False).stdout
            return (all(p in v4 for p in (":KUBE-SVC-", ":KUBE-SEP-", ":KUBE-SVL-", ":KUBE-FW-", ":KUBE-EXT-"))
                    and "-j KUBE-NODEPORTS" in v6)
    else:
        def synced() -> bool:
            v4 = ns.run("nft", "list", "table", "ip", "kube-proxy", check=False).stdout
            v6 = ns.run("nft", "list", "table", "ip6", "kube-proxy", check=False).stdout
            return all(f"default/{s}/tcp/http" in v4 for s in ("web", "local", "lb")) and "map service-ips" in v6
    return synced


def node_with_kube_proxy(ns: Netns, cp: ControlPlane, mode: str) -> None:
    add_kubelet_chains(ns)
    with LoopbackRelay(ns, cp.port) as relay:
        run_kube_proxy(ns, cp, relay.port, mode, kube_proxy_synced(ns, mode))
    add_kube_router_chains(ns)


@pytest.mark.parametrize("mode,variant", [("iptables", "nft"), ("iptables", "legacy"), ("nftables", "nft")],
                         ids=["iptables-mode-on-iptables-nft", "iptables-mode-on-iptables-legacy",
                              "nftables-mode"])
def test_remove_leaves_what_kube_proxy_cleanup_leaves(cp, mode, variant):
    with Netns("kpxa", variant) as a, Netns("kpxb", variant) as b:
        for ns in (a, b):
            node_with_kube_proxy(ns, cp, mode)
        before = ruleset(a)
        assert_same(unordered(before), unordered(ruleset(b)), "the two namespaces must start from the same ruleset")

        found = ours(a, "find")
        removed = ours(a, "remove")
        r = kube_proxy_cleanup(b, mode)
        assert r.returncode == 0, r.stdout + r.stderr
        after_a, after_b = ruleset(a), ruleset(b)

        assert_same(after_a, after_b, "differs after remove() (A) vs kube-proxy --cleanup (B)")
        assert_foreign_intact(after_a, variant)
        assert not any(name in item for item in found + removed for name in FOREIGN), (found, removed)
        # find() names exactly the chains kube-proxy's cleanup removed, and the nft tables
        assert {f for f in found if " chain " in f} == removed_chains(before, after_b)
        if mode == "nftables":
            assert {f for f in found if f.startswith("nftables")} == {"nftables table ip kube-proxy",
                                                                       "nftables table ip6 kube-proxy"}
            assert "table ip kube-proxy" in before["nft"] and "kube-proxy" not in after_b["nft"]
        else:
            assert f"iptables-{variant} -t nat rule in PREROUTING jumping to KUBE-SERVICES" in found
            assert any(":KUBE-SEP-" in line for line in before[f"iptables-{variant}-save"].splitlines())
        assert len(removed) >= len([f for f in found if " chain " in f])
        assert ours(a, "find") == []


def test_ipvs_mode_chains_removed_as_kube_proxy_cleanup_does(cp):
    """IPVS mode's chains and jumps (written by hand: no IPVS in this kernel, nor dummy links for
    kube-ipvs0); the reference is kube-proxy --cleanup with a `modprobe` that succeeds, so its ipvs
    cleanup runs."""
    with Netns("kpxa") as a, Netns("kpxb") as b:
        for ns in (a, b):
            add_kubelet_chains(ns)
            add_ipvs_mode_chains(ns)
            add_kube_router_chains(ns)
        before = ruleset(a)
        assert_same(before, ruleset(b), "the two namespaces must start from the same ruleset")
        found = ours(a, "find")
        ours(a, "remove")
        r = kube_proxy_cleanup(b, "ipvs")
        # Its iptables-mode step fails on filter first (it deletes only iptables mode's own jump rules, and
        # ipvs mode's KUBE-PROXY-FIREWALL jump has another comment, so that -X fails); the ipvs step after
        # it removes everything. The end state is what counts.
        assert "Error removing iptables rules in ipvs proxier" not in r.stdout + r.stderr
        after_a, after_b = ruleset(a), ruleset(b)
        assert_same(after_a, after_b, "differs after remove() (A) vs kube-proxy --cleanup (B)")
        assert_foreign_intact(after_a, "nft")
        assert "iptables-nft -t filter rule in INPUT jumping to KUBE-IPVS-FILTER" in found
        assert {f for f in found if " chain " in f} == removed_chains(before, after_b)
        assert ours(a, "find") == []


@pytest.mark.parametrize("variant", ["nft", "legacy"], ids=["iptables-nft", "iptables-legacy"])
def test_kubelet_and_kube_router_chains_are_not_kube_proxys(variant):
    """Strict mode's check: a node with kubelet (and a network policy agent) but no kube-proxy is clean."""
    with Netns("kpxk", variant) as ns:
        add_kubelet_chains(ns)
        add_kube_router_chains(ns)
        before = ruleset(ns)
        assert ours(ns, "find") == []
        assert ours(ns, "remove") == []
        assert ruleset(ns) == before


def test_any_jump_into_kube_proxys_chains_goes_with_them(cp):
    """A jump kube-proxy did not write itself (another version's comment, a hand-made one): kube-proxy's
    cleanup deletes only its exact jump rules, so the chain stays and that table's cleanup fails; ours
    deletes every rule whose target is one of kube-proxy's chains, and no other rule."""
    with Netns("kpxj") as ns:
        add_kubelet_chains(ns)
        ns.ipt("4", "-t", "nat", "-N", "KUBE-SERVICES")
        ns.ipt("4", "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "kube-proxy v1.10 portals",
               "-j", "KUBE-SERVICES")
        ns.ipt("4", "-t", "nat", "-N", "KUBE-MARK-MASQ")
        ns.ipt("4", "-t", "nat", "-N", "OTHER")
        ns.ipt("4", "-t", "nat", "-A", "OTHER", "-p", "tcp", "-g", "KUBE-MARK-MASQ")
        ns.ipt("4", "-t", "nat", "-A", "OTHER", "-p", "udp", "-j", "RETURN")
        add_kube_router_chains(ns)
        found = ours(ns, "find")
        assert sorted(found) == sorted([
            "iptables-nft -t nat chain KUBE-SERVICES", "iptables-nft -t nat chain KUBE-MARK-MASQ",
            "iptables-nft -t nat rule in PREROUTING jumping to KUBE-SERVICES",
            "iptables-nft -t nat rule in OTHER jumping to KUBE-MARK-MASQ"])
        ours(ns, "remove")
        after = ruleset(ns)
        assert ours(ns, "find") == []
        assert "-A OTHER -p udp -j RETURN" in after["iptables-nft-save"]
        assert "-A OTHER -p tcp" not in after["iptables-nft-save"]
        assert_foreign_intact(after, "nft")


@pytest.mark.parametrize("table,chain,owned", [
    ("nat", "KUBE-SERVICES", True), ("filter", "KUBE-SERVICES", True), ("nat", "KUBE-MARK-MASQ", True),
    ("filter", "KUBE-MARK-MASQ", False), ("nat", "KUBE-SVC-CDGGSHYLG3RE2FKL", True),
    ("filter", "KUBE-SVC-CDGGSHYLG3RE2FKL", False), ("nat", "KUBE-XLB-CDGGSHYLG3RE2FKL", True),
    ("mangle", "KUBE-PROXY-CANARY", True), ("filter", "KUBE-NODE-PORT", True), ("filter", "KUBE-IPVS-FILTER", True),
    ("filter", "KUBE-FIREWALL", False), ("mangle", "KUBE-KUBELET-CANARY", False),
    ("mangle", "KUBE-IPTABLES-HINT", False), ("nat", "KUBE-MARK-DROP", False),
    ("filter", "KUBE-ROUTER-INPUT", False), ("filter", "KUBE-NWPLCY-DEFAULT", False),
    ("filter", "KUBE-POD-FW-TLOVEAHMUMTJRLDR", False), ("nat", "KUBE-SERVICES-EXTRA", False),
], ids=lambda v: str(v))
def test_owned_chain(table, chain, owned):
    assert kube_proxy_rules.owned_chain(table, chain) is owned


@pytest.mark.parametrize("line,target", [
    ('-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES', "KUBE-SERVICES"),
    ('-A OTHER -p tcp -g KUBE-MARK-MASQ', "KUBE-MARK-MASQ"),
    ('-A OTHER -m comment --comment "-j KUBE-SERVICES" -j ACCEPT', "ACCEPT"),
    ('-A OTHER -m comment --comment -j -j RETURN', "RETURN"),
    ('-A KUBE-FW-X -m comment --comment "other traffic will be dropped"', ""),
], ids=["jump", "goto", "jump-in-comment", "comment-is-flag", "no-target"])
def test_rule_target(line, target):
    [(chain, rules)] = [v for v in kube_proxy_rules.parse_save(f"*nat\n:OTHER - [0:0]\n{line}\nCOMMIT\n").values()]
    assert rules[0].target == target and rules[0].chain == line.split()[1]
