"""`make conformance`: upstream's own Service tests against a real node with bpflb and no kube-proxy.

Builds what is missing (scripts/build-components.sh --node, scripts/build-node-images.sh,
scripts/build-image.sh), starts lb/testing/node.py's Node, and runs the pinned release's e2e.test as a process of
the first node (its network namespace and cgroup: every address it dials is a node's or a pod's, nothing
leaves the machine, and that node's socket programs serve it):

    [sig-network] Services ... [Conformance]
    [sig-network] Networking Granular Checks: Pods, intra-pod and node-pod, http and udp (one node suffices)
    [sig-network] EndpointSlice ... and EndpointSliceMirroring ...

JUnit goes to results/conformance/junit_01.xml (two nodes: results/conformance-two-node/); the last line
printed is `N passed, N failed`, and the exit status is 0 only when nothing failed.

With `--nodes 2` it starts two nodes (lb/testing/node.py) and runs the same set across them plus the two-node
specs of service.go (TWO_NODE_FOCUS: traffic policies, source IP, terminating endpoints, health-check NodePort).

    python -m lb.testing.conformance [--nodes 2] [--focus REGEX] [--keep-node] [--results DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .apiserver import ROOT
from .node import Node

FOCUS = "|".join([
    r"\[sig-network\] Services .*\[Conformance\]",
    r"\[sig-network\] Networking Granular Checks: Pods should function for (intra-pod|node-pod) communication: (http|udp)",
    r"\[sig-network\] EndpointSlice",
])
# Nothing in the focus needs a second node or a cloud: nothing is skipped.
SKIP = ""
# With two nodes (--nodes 2): the specs of test/e2e/network/service.go that skip on one node ("requires at
# least two ready nodes") and cover bpflb's rules: traffic policies, source IP, terminating endpoints,
# health-check NodePort. Left out, by name: "should allow creating a basic SCTP service with pod and
# endpoints" (bpflb does not handle SCTP) and "should implement NodePort and HealthCheckNodePort correctly
# when ExternalTrafficPolicy changes" (three nodes).
TWO_NODE_FOCUS = r"\[sig-network\] Services should (" + "|".join([
    r"preserve source pod IP for traffic thru service cluster IP",
    r"(be able|not be able) to connect to terminating and unready endpoints if PublishNotReadyAddresses",
    r"respect internalTrafficPolicy=Local",
    r"support externalTrafficPolicy=Local for type=NodePort",
    r"fail health check node port if there are only terminating endpoints",
    r"fallback to (local )?terminating endpoints when there are no ready endpoints",
]) + ")"
RESULTS = ROOT / "results" / "conformance"
RESULTS_TWO_NODE = ROOT / "results" / "conformance-two-node"


@dataclass(frozen=True)
class Case:
    name: str
    status: str        # passed | failed | skipped | pending ...
    seconds: float
    message: str


def read_junit(path: Path) -> list[Case]:
    """The spec cases of a ginkgo JUnit report (its suite-level nodes, e.g. [SynchronizedBeforeSuite], are
    counted too when they fail: a failed BeforeSuite fails every spec)."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "").removeprefix("[It] ")  # a spec: "[It] [sig-network] ..."; suite nodes: "[...Suite]"
        status = tc.get("status") or ("failed" if tc.find("failure") is not None or tc.find("error") is not None
                                      else "skipped" if tc.find("skipped") is not None else "passed")
        if status == "skipped" or (not name.startswith("[sig-") and status == "passed"):
            continue
        fail = tc.find("failure")
        if fail is None:
            fail = tc.find("error")
        msg = "" if fail is None else (fail.get("message") or fail.text or "").strip()
        cases.append(Case(name, status, float(tc.get("time") or 0), msg))
    return cases


def focus_for(nodes: int) -> str:
    """The default focus: the issue's set on one node; on more, the same set (now across nodes: pods, NodePorts
    and ClusterIPs reached from the other node) and the two-node specs."""
    return FOCUS if nodes == 1 else f"{FOCUS}|{TWO_NODE_FOCUS}"


def run_e2e(node: Node, focus: str, skip: str, results: Path, timeout: float) -> int:
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("junit*.xml"):
        old.unlink()
    argv = [node.bin["E2E_TEST"], f"--kubeconfig={node.kubeconfig}", "--provider=skeleton",
            f"--kubectl-path={node.bin['KUBECTL']}", f"--report-dir={results}", f"--ginkgo.focus={focus}", "--ginkgo.no-color", "--ginkgo.v",
            "--ginkgo.timeout=3h", f"--num-nodes={node.nodes}", "--dump-logs-on-failure=false",
            f"--e2e-output-dir={results}"]
    if skip:
        argv.append(f"--ginkgo.skip={skip}")
    with open(results / "e2e.log", "w") as log:
        p = subprocess.run(node.nsenter(argv), stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                           cwd=results, env={**os.environ, "KUBECONFIG": str(node.kubeconfig)})
    return p.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lb.testing.conformance", description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1, help="nodes to start (2: the two-node specs too by default)")
    ap.add_argument("--focus", help="ginkgo focus regex (default: the issue's set; with --nodes 2, TWO_NODE_FOCUS too)")
    ap.add_argument("--skip", default=SKIP)
    ap.add_argument("--results", type=Path, help=f"default: {RESULTS}, with --nodes 2 {RESULTS_TWO_NODE}")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--report-only", action="store_true", help="count an existing JUnit report; start nothing")
    ap.add_argument("--keep-node", action="store_true", help="leave the node up after the run, until Ctrl-C")
    args = ap.parse_args(argv)
    if args.focus is None:
        args.focus = focus_for(args.nodes)
    if args.results is None:
        args.results = RESULTS if args.nodes == 1 else RESULTS_TWO_NODE
    args.results = args.results.resolve()  # e2e.test runs in it (its own relative paths land there)
    if args.report_only:
        return report(args.results, 0)
    t0 = time.monotonic()
    node = Node(nodes=args.nodes, verbose=True)
    with node:
        started = time.monotonic() - t0
        print(f"node ready in {started:.0f} s: " + ", ".join(f"{s} {t:.0f}s" for s, t in node.timings), flush=True)
        t1 = time.monotonic()
        rc = run_e2e(node, args.focus, args.skip, args.results, args.timeout)
        ran = time.monotonic() - t1
        # What the agent said, for the failures' causes (the node's directory goes with the node).
        for host in node.node_names:
            pod = node.kubectl("-n", "bpflb-system", "get", "pods", f"--field-selector=spec.nodeName={host}", "-o",
                               "jsonpath={.items[0].metadata.name}", check=False).strip()
            (args.results / f"bpflb-agent-{host}.log").write_text(
                node.kubectl("-n", "bpflb-system", "logs", pod, "--tail=-1", check=False) if pod else "(no pod)\n")
        if args.keep_node:
            print(f"node kept: KUBECONFIG={node.kubeconfig}, {' '.join(node.nsenter(['sh']))}; Ctrl-C ends it")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    print(f"node start {started:.0f} s, e2e {ran:.0f} s, stop {dict(node.timings).get('stop', 0):.0f} s")
    return report(args.results, rc)


def report(results: Path, rc: int) -> int:
    junit = sorted(results.glob("junit*.xml"))
    if not junit:
        print(f"e2e.test wrote no JUnit report (exit {rc}); see {results / 'e2e.log'}")
        return 1
    cases = [c for j in junit for c in read_junit(j)]
    passed = [c for c in cases if c.status == "passed"]
    failed = [c for c in cases if c.status != "passed"]
    for c in failed:
        print(f"FAILED {c.name}\n    {c.message.splitlines()[0] if c.message else ''}")
    print(f"JUnit: {', '.join(map(str, junit))}")
    print(f"{len(passed)} passed, {len(failed)} failed")
    return 0 if not failed and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
