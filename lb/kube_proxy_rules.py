"""Find (and on request remove) kube-proxy's rules on this node, and nobody else's.

Two service proxies on one node fight: kube-proxy's DNAT would catch traffic bpflb's programs did not
translate and hide bugs, and its stale rules outlive it. Strict mode refuses to start while they are there;
--remove-kube-proxy-rules removes them as `kube-proxy --cleanup` (v1.34) does, which cleans every mode
whatever --proxy-mode says (cmd/kube-proxy/app/server_linux.go, platformCleanup):

- iptables mode (pkg/proxy/iptables/proxier.go, cleanupLeftoversForFamily): the fixed chains below per table,
  and in nat every per-service chain (isServiceChainName: KUBE-SVC-, KUBE-SVL-, KUBE-SEP-, KUBE-FW-, KUBE-EXT-);
- ipvs mode (pkg/proxy/ipvs/proxier.go, cleanupLeftovers): its fixed chains, its ipsets, the kube-ipvs0 dummy;
- nftables mode (pkg/proxy/nftables/proxier.go, CleanupLeftovers): the `kube-proxy` table in ip and ip6.

Everything else named KUBE-* is someone else's and is neither reported nor touched: kubelet's
KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY and KUBE-FIREWALL with its CVE-2020-8558 localhost drop rule
(pkg/kubelet/kubelet_network_linux.go; kube-proxy's iptables mode writes a copy of KUBE-FIREWALL but its
cleanup leaves it, on purpose), kube-router's KUBE-ROUTER-*, KUBE-NWPLCY-*, KUBE-POD-FW-*, and so on.

Where this differs from kube-proxy's cleanup, on purpose:
- Jumps: kube-proxy deletes only the exact jump rules it writes (same match arguments and comment), so a
  jump written by another version, or by hand, keeps its target chain alive and makes that table's whole
  cleanup fail (one iptables-restore). Here any rule outside kube-proxy's chains whose -j/-g target is one
  of them is deleted; a rule with any other target is never touched.
- Backends: kube-proxy runs whichever `iptables` is first in PATH (its image's wrapper picks the backend
  kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY are in). Here both iptables-nft and iptables-legacy are
  read, since leftovers of either backend still intercept traffic. Legacy tables are only read if the
  kernel already has them (iptables-legacy-save reads /proc/net/ip_tables_names), so no table is created.
- KUBE-XLB-* (the per-service local-traffic chains of kube-proxy before v1.24, which v1.34 no longer
  knows) count as kube-proxy's too.
- IPVS virtual servers: kube-proxy flushes the whole IPVS table; they are not reported or flushed here,
  since nothing says whose they are. Without kube-ipvs0 holding the service addresses they match no
  local traffic anyway.
"""
from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute

log = logging.getLogger(__name__)

# pkg/proxy/iptables/proxier.go (v1.34), cleanupLeftoversForFamily: nat, filter, and the mangle canary.
IPTABLES_MODE_CHAINS: dict[str, frozenset[str]] = {
    "nat": frozenset({"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY"}),
    "filter": frozenset({"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                         "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY"}),
    "mangle": frozenset({"KUBE-PROXY-CANARY"}),
}
# isServiceChainName, in nat only; KUBE-XLB- is the pre-v1.24 name of the local-traffic chains.
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-", "KUBE-XLB-")
# pkg/proxy/ipvs/proxier.go (v1.34), iptablesCleanupChains.
IPVS_MODE_CHAINS: dict[str, frozenset[str]] = {
    "nat": frozenset({"KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ"}),
    "filter": frozenset({"KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                         "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"}),
}
# pkg/proxy/ipvs/ipset.go (v1.34), ipsetInfo.
IPVS_SETS = frozenset({
    "KUBE-LOOP-BACK", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP", "KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-IPVS-IPS",
})
IPVS_DEVICE = "kube-ipvs0"
# pkg/proxy/nftables/proxier.go (v1.34): kubeProxyTable, in the ip and ip6 families only.
NFT_TABLE = "kube-proxy"
NFT_FAMILIES = ("ip", "ip6")


def owned_chain(table: str, chain: str) -> bool:
    """True if `kube-proxy --cleanup` deletes this chain of this table."""
    if chain in IPTABLES_MODE_CHAINS.get(table, ()) or chain in IPVS_MODE_CHAINS.get(table, ()):
        return True
    return table == "nat" and chain.startswith(SERVICE_CHAIN_PREFIXES)


@dataclass(frozen=True)
class Tool:
    """One iptables binary family: `iptables-nft` reads and writes with `iptables-nft-save`/`-restore`."""
    name: str

    @property
    def save(self) -> str:
        return f"{self.name}-save"

    @property
    def restore(self) -> str:
        return f"{self.name}-restore"


def tools() -> list[Tool]:
    """Both backends of both families where the variant binaries exist; else the plain `iptables` ones."""
    out = []
    for family in ("iptables", "ip6tables"):
        variants = [Tool(f"{family}-{v}") for v in ("nft", "legacy") if shutil.which(f"{family}-{v}-save")]
        if not variants and shutil.which(f"{family}-save"):
            variants = [Tool(family)]
        out += variants
    return out


@dataclass(frozen=True)
class Rule:
    chain: str
    line: str      # as iptables-save writes it: `-A CHAIN ...`
    target: str    # the -j/-g target ("" if none)


@dataclass(frozen=True)
class TableLeftovers:
    """What of one table (of one iptables backend) is kube-proxy's."""
    tool: Tool
    table: str
    chains: tuple[str, ...]   # kube-proxy's chains present in the table
    jumps: tuple[Rule, ...]   # rules in other chains whose target is one of those


def _target(line: str) -> str:
    try:
        args = shlex.split(line)
    except ValueError:
        return ""
    target = ""
    for flag, value in zip(args, args[1:]):
        if flag in ("-j", "--jump", "-g", "--goto"):
            target = value  # the last one: iptables-save writes the target after every match
    return target


def parse_save(text: str) -> dict[str, tuple[list[str], list[Rule]]]:
    """iptables-save output -> {table: (chains in order, rules)}. Comments and counters are ignored."""
    tables: dict[str, tuple[list[str], list[Rule]]] = {}
    chains: list[str] = []
    rules: list[Rule] = []
    for line in text.splitlines():
        if line.startswith("*"):
            chains, rules = [], []
            tables[line[1:].strip()] = (chains, rules)
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split(None, 2)
            rules.append(Rule(parts[1], line, _target(line)))
    return tables


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, input=stdin)


def iptables_leftovers() -> list[TableLeftovers]:
    """kube-proxy's chains, and the jumps into them, in every table of every iptables backend."""
    out = []
    for tool in tools():
        r = _run([tool.save])
        if r.returncode != 0:
            log.warning("%s failed (%s): its kube-proxy rules are not checked", tool.save, r.stderr.strip())
            continue
        for table, (chains, rules) in parse_save(r.stdout).items():
            ours = tuple(c for c in chains if owned_chain(table, c))
            jumps = tuple(x for x in rules if x.target in ours and x.chain not in ours)
            if ours:
                out.append(TableLeftovers(tool, table, ours, jumps))
    return out


def nft_tables() -> list[str]:
    """The families that hold a `kube-proxy` nftables table ("ip", "ip6")."""
    if not shutil.which("nft"):
        return []
    found = []
    for line in _run(["nft", "list", "tables"]).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[1] in NFT_FAMILIES and parts[2] == NFT_TABLE:
            found.append(parts[1])
    return found


def ipvs_sets() -> list[str]:
    if not shutil.which("ipset"):
        return []
    return [n for n in _run(["ipset", "list", "-n"]).stdout.split() if n in IPVS_SETS]


def ipvs_device() -> bool:
    """kube-ipvs0 exists and is a dummy (kube-proxy deletes it only then: netlink_linux.go DeleteDummyDevice).
    Over netlink: the agent's image carries no iproute2."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifname=IPVS_DEVICE) if ipr.link_lookup(ifname=IPVS_DEVICE) else []
    return any(link.get_attr("IFLA_LINKINFO") is not None
               and link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "dummy" for link in links)


def find() -> list[str]:
    """Human-readable list of kube-proxy leftovers on this node (empty: none)."""
    found = []
    for t in iptables_leftovers():
        found += [f"{t.tool.name} -t {t.table} chain {c}" for c in t.chains]
        found += [f"{t.tool.name} -t {t.table} rule in {j.chain} jumping to {j.target}" for j in t.jumps]
    found += [f"nftables table {fam} {NFT_TABLE}" for fam in nft_tables()]
    found += [f"ipset {name}" for name in ipvs_sets()]
    if ipvs_device():
        found.append(f"IPVS device {IPVS_DEVICE}")
    return found


def _restore_input(t: TableLeftovers) -> str:
    """One --noflush iptables-restore transaction, as kube-proxy's: flush (`:CHAIN - [0:0]`) every chain of
    ours, delete the jumps into them, delete the chains."""
    lines = [f"*{t.table}"]
    lines += [f":{c} - [0:0]" for c in t.chains]
    lines += ["-D" + j.line[2:] for j in t.jumps]
    lines += [f"-X {c}" for c in t.chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _remove_table(t: TableLeftovers) -> list[str]:
    r = _run([t.tool.restore, "--noflush"], _restore_input(t))
    if r.returncode == 0:
        return ([f"{t.tool.name} -t {t.table} {j.line.replace('-A ', '-D ', 1)}" for j in t.jumps] +
                [f"{t.tool.name} -t {t.table} -X {c}" for c in t.chains])
    # The transaction failed as a whole (e.g. a rule we do not know references a chain in some other way):
    # do what can be done one step at a time, and say what could not.
    log.warning("%s -t %s: one-transaction removal failed (%s); removing step by step",
                t.tool.restore, t.table, r.stderr.strip())
    done = []
    for j in t.jumps:
        args = shlex.split(j.line)[2:]
        if _run([t.tool.name, "-w", "-t", t.table, "-D", j.chain, *args]).returncode == 0:
            done.append(f"{t.tool.name} -t {t.table} {j.line.replace('-A ', '-D ', 1)}")
    for c in t.chains:
        _run([t.tool.name, "-w", "-t", t.table, "-F", c])
    for c in t.chains:
        r = _run([t.tool.name, "-w", "-t", t.table, "-X", c])
        if r.returncode == 0:
            done.append(f"{t.tool.name} -t {t.table} -X {c}")
        else:
            log.warning("%s -t %s -X %s: %s", t.tool.name, t.table, c, r.stderr.strip())
    return done


def remove() -> list[str]:
    """Remove kube-proxy's leftovers (see the module doc); returns what was removed, human-readable."""
    done = []
    for t in iptables_leftovers():
        done += _remove_table(t)
    for fam in nft_tables():
        r = _run(["nft", "delete", "table", fam, NFT_TABLE])
        if r.returncode == 0:
            done.append(f"nft delete table {fam} {NFT_TABLE}")
        else:
            log.warning("nft delete table %s %s: %s", fam, NFT_TABLE, r.stderr.strip())
    for name in ipvs_sets():  # after iptables: a set still referenced by a rule cannot be destroyed
        if _run(["ipset", "destroy", name]).returncode == 0:
            done.append(f"ipset destroy {name}")
    if ipvs_device():
        with IPRoute() as ipr:
            ipr.link("del", ifname=IPVS_DEVICE)
        done.append(f"ip link del {IPVS_DEVICE}")
    return done
