"""Find (and on request remove) kube-proxy's rules on this node.

Two service proxies on one node fight: kube-proxy's DNAT would catch traffic bpflb's programs did not
translate and hide bugs, and its stale rules outlive it. Strict mode refuses to start while they are
there; --remove-kube-proxy-rules removes them the way `kube-proxy --cleanup` does: jumps from the
built-in chains into KUBE-* chains, then the KUBE-* chains themselves (iptables and ip6tables, nft and
legacy backends), and nftables mode's `kube-proxy` tables. IPVS mode's kube-ipvs0 device is reported.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess

TABLES = ("nat", "filter", "mangle")
SAVERS = ("iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save")


def _run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def _iptables_findings() -> list[tuple[str, str, str, list[str]]]:
    """(saver, table, chain, rule args) for every KUBE-* chain (rule args empty) and every jump into one."""
    out = []
    for saver in SAVERS:
        if not shutil.which(saver):
            continue
        for table in TABLES:
            for line in _run([saver, "-t", table]).splitlines():
                if line.startswith(":KUBE-"):
                    out.append((saver, table, line[1:].split()[0], []))
                elif line.startswith("-A ") and " KUBE-" in line:
                    args = shlex.split(line)
                    if not args[1].startswith("KUBE-") and any(a.startswith("KUBE-") for a in args[2:]):
                        out.append((saver, table, args[1], args[2:]))
    return out


def _nft_tables() -> list[tuple[str, str]]:
    if not shutil.which("nft"):
        return []
    found = []
    for line in _run(["nft", "list", "tables"]).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2] == "kube-proxy":
            found.append((parts[1], parts[2]))
    return found


def find() -> list[str]:
    """Human-readable list of kube-proxy leftovers on this node (empty: none)."""
    found = []
    for saver, table, chain, args in _iptables_findings():
        tool = saver.replace("-save", "")
        found.append(f"{tool} -t {table} chain {chain}" if not args else f"{tool} -t {table} rule in {chain} jumping to kube-proxy")
    found += [f"nftables table {fam} {name}" for fam, name in _nft_tables()]
    if _run(["ip", "-o", "link", "show", "kube-ipvs0"]):
        found.append("IPVS device kube-ipvs0")
    return found


def remove() -> list[str]:
    done = []
    findings = _iptables_findings()
    for saver, table, chain, args in findings:  # jumps first, so the chains can be deleted
        if args:
            tool = saver.replace("-save", "")
            if subprocess.run([tool, "-t", table, "-D", chain, *args], capture_output=True).returncode == 0:
                done.append(f"{tool} -t {table} -D {chain} {' '.join(args)}")
    for op in ("-F", "-X"):
        for saver, table, chain, args in findings:
            if not args:
                tool = saver.replace("-save", "")
                if subprocess.run([tool, "-t", table, op, chain], capture_output=True).returncode == 0 and op == "-X":
                    done.append(f"{tool} -t {table} -X {chain}")
    for fam, name in _nft_tables():
        if subprocess.run(["nft", "delete", "table", fam, name], capture_output=True).returncode == 0:
            done.append(f"nft delete table {fam} {name}")
    if _run(["ip", "-o", "link", "show", "kube-ipvs0"]):
        if subprocess.run(["ip", "link", "del", "kube-ipvs0"], capture_output=True).returncode == 0:
            done.append("ip link del kube-ipvs0")
    return done
