"""The command line: probe, strict mode, inspection errors."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT
from lb import datapath
from lb.datapath import DatapathError, Hook
from lb.settings import MapSizes, Paths
from lb.testing.bed import CGROUP2


def bpflb(*args, check=False):
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True, text=True, cwd=ROOT, check=check)


def test_probe_loads_and_attaches_every_hook():
    r = bpflb("probe", "-o", "json")
    assert r.returncode == 0, r.stderr
    results = {x["feature"]: x for x in json.loads(r.stdout)}
    for h in datapath.HOOKS:
        assert results[f"cgroup {h.what}"]["ok"] and results[f"cgroup {h.what}"]["required"] == h.required
    assert results["map type lru_hash"]["ok"]
    assert not [d for d in os.listdir("/sys/fs/bpf") if d.startswith("bpflb-probe")]  # cleaned up
    assert not [d for d in os.listdir(CGROUP2) if d.startswith("bpflb-probe")]


def test_strict_mode_refuses_a_missing_hook_and_attaches_nothing(bed, monkeypatch):
    # A hook the kernel cannot load stands for a kernel without it.
    monkeypatch.setattr(datapath, "HOOKS", datapath.HOOKS + (Hook("no_such_prog", "CGROUP_INET4_BIND", "bind4 (test)"),))
    paths = Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)
    with pytest.raises(DatapathError) as e:
        datapath.attach(paths, MapSizes(services=64, backends=64, revnat=64, sock_revnat=64, affinity=64))
    assert "strict mode" in str(e.value) and "bind4 (test)" in str(e.value)
    assert datapath.attached(paths) == []
    skipped = datapath.attach(paths, MapSizes(services=64, backends=64, revnat=64, sock_revnat=64, affinity=64),
                              strict=False)
    assert skipped == ["bind4 (test)"]
    assert len(datapath.attached(paths)) == len(datapath.HOOKS) - 1


def test_service_list_without_maps_says_what_is_wrong(tmp_path):
    r = bpflb("service", "list", "--bpf-root", "/sys/fs/bpf/bpflb-does-not-exist")
    assert r.returncode == 1 and "bpflb maps not found under /sys/fs/bpf/bpflb-does-not-exist" in r.stderr


def test_agent_flags_are_checked(tmp_path):
    r = bpflb("agent", "--manifests", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = bpflb("agent", "--manifests", str(tmp_path), "--cgroup-root", "/nonexistent-cg", "--bpf-root",
              "/sys/fs/bpf/bpflb-flagtest")
    try:
        assert r.returncode == 1 and "--cgroup-root /nonexistent-cg" in r.stderr
    finally:
        datapath.cleanup(Paths(cgroup_root="/nonexistent-cg", bpf_root="/sys/fs/bpf/bpflb-flagtest"))


def test_strict_mode_refuses_kube_proxy_rules_unless_told_to_remove_them(bed, tmp_path):
    """The agent runs in the bed's backend namespace, whose tables get kube-proxy-like rules."""
    ns = ["nsenter", f"--net=/run/netns/{bed.backend_ns}"]
    for cmd in (["iptables", "-t", "nat", "-N", "KUBE-SERVICES"], ["iptables", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
                ["ip6tables", "-t", "nat", "-N", "KUBE-POSTROUTING"], ["nft", "add", "table", "ip", "kube-proxy"]):
        subprocess.run(ns + cmd, check=True)
    argv = ns + [sys.executable, "-m", "lb.cli", "agent", "--manifests", str(tmp_path), "--node-name", "n",
                 "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root, "--healthz-bind-address", "",
                 "--metrics-bind-address", ""]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert "kube-proxy's rules are present" in r.stderr and "chain KUBE-SERVICES" in r.stderr
    assert "nftables table ip kube-proxy" in r.stderr
    assert datapath.attached(Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)) == []
    p = subprocess.Popen(argv + ["--remove-kube-proxy-rules"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    threading.Timer(60, p.kill).start()  # the loop below ends even if the agent never says it is ready
    try:
        for line in p.stderr:
            if "initial sync complete" in line:
                break
        else:
            raise AssertionError("agent did not start after removing the rules")
    finally:
        p.kill()
        p.wait()
    save = subprocess.run(ns + ["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert "KUBE-" not in save
    assert "KUBE-" not in subprocess.run(ns + ["ip6tables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert "kube-proxy" not in subprocess.run(ns + ["nft", "list", "tables"], capture_output=True, text=True).stdout


def test_the_first_sync_overlaps_the_compile_but_counts_only_once_attached(bed, tmp_path):
    """The agent creates the service maps and programs them while its child compiles the programs; the
    sync is done ("initial sync complete", ready) only once the programs are attached. With one Service
    the maps are written long before the compile ends, so the log order shows both."""
    (tmp_path / "svc.yaml").write_text("""
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.7.7, clusterIPs: [10.96.7.7], ports: [{port: 80, protocol: TCP, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.1.0.5], conditions: {ready: true}}]
""")
    paths = Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)
    datapath.cleanup(paths)
    p = subprocess.Popen([sys.executable, "-m", "lb.cli", "agent", "--manifests", str(tmp_path), "--node-name", "n",
                          "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root, "--healthz-bind-address", "",
                          "--metrics-bind-address", "", "--network-mode", "none"],
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    threading.Timer(90, p.kill).start()
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if "initial sync complete" in line:
                break
        else:
            raise AssertionError("agent never completed its first sync:\n" + "".join(lines))
        assert len(datapath.attached(paths)) == len(datapath.HOOKS)
    finally:
        p.kill()
        p.wait()
    text = "".join(lines)
    synced, attached, complete = (text.index(s) for s in ("synced 1 frontends", "datapath attached",
                                                          "initial sync complete"))
    assert synced < attached < complete


def test_a_killed_agent_takes_its_loader_children_with_it(bed, tmp_path):
    """kill -9 while the programs compile: the loader children die too (PR_SET_PDEATHSIG), so nothing pins
    programs under the bpf-root after the agent is gone (a cleanup in between would otherwise be undone)."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "lb.cli", "agent", "--manifests", str(tmp_path), "--node-name", "n",
                          "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root, "--healthz-bind-address", "",
                          "--metrics-bind-address", "", "--network-mode", "none"],
                         stderr=subprocess.DEVNULL, cwd=ROOT)

    def children() -> list[int]:
        out = []
        for task in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        return out

    pinned = lambda: sorted(os.listdir(os.path.join(bed.bpf_root, "tc"))) if os.path.isdir(  # noqa: E731
        os.path.join(bed.bpf_root, "tc")) else []
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while len(kids := children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(kids) == 2, kids  # the socket programs' and the tc programs' loaders, still compiling
        while not all(_loader(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.01)  # past the exec: the death signal is set
        assert all(_loader(k) for k in kids), kids
        # Frozen mid-compile, so the kill below lands while both still have everything to pin (left
        # running, one may finish between this check and the kill). SIGKILL ends a stopped process; a
        # loader that did not get it stays stopped, and is seen below.
        for k in kids:
            os.kill(k, signal.SIGSTOP)
        assert pinned() == [] and datapath.attached(Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)) == []
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    try:
        deadline = time.monotonic() + 5
        while (left := [k for k in kids if _alive(k)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == []
    finally:
        for k in kids:  # what the agent's death did not take (a failed test): not left stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
    assert pinned() == [] and datapath.attached(Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)) == []


def _loader(pid: int) -> bool:
    """pid runs lb.datapath (it has exec'd: the agent's code between its fork and exec is done)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"lb.datapath" in f.read().split(b"\0")
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    """pid runs or is stopped (a zombie, reaped by init soon, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
