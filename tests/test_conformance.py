"""Upstream's own Service tests (e2e.test of the pinned release) against a real node with bpflb and no
kube-proxy: lb/testing/conformance.py, what `make conformance` runs (and, on two nodes, `make
conformance-two-node`). Every spec the focus selects must pass.

How many the focus selects is asked of e2e.test itself (a ginkgo dry run), so a spec that never ran (a
BeforeSuite failure, a focus that stopped matching) fails this test as a failed spec would."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from lb.testing import conformance
from lb.testing.node import node_binaries

pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]


def selected_specs(e2e_test: str, focus: str = conformance.FOCUS, skip: str = conformance.SKIP) -> int:
    out = subprocess.run([e2e_test, "--ginkgo.dry-run", f"--ginkgo.focus={focus}", "--provider=skeleton",
                          "--ginkgo.no-color"] + ([f"--ginkgo.skip={skip}"] if skip else []),
                         capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"Ran (\d+) of \d+ Specs", out)
    assert m, out[-2000:]
    return int(m.group(1))


def run_conformance(*args: str) -> tuple[int, int, int, str]:
    """(passed, failed, exit status, tail of the output) of `python -m lb.testing.conformance ARGS`."""
    r = subprocess.run([sys.executable, "-m", "lb.testing.conformance", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=3300)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert m, tail
    return int(m.group(1)), int(m.group(2)), r.returncode, tail


def test_upstream_service_conformance_passes_against_bpflb():
    want = selected_specs(node_binaries()["E2E_TEST"])
    assert want >= 29  # v1.34.4 selects 29: the Services [Conformance] specs, 4 Networking, the EndpointSlice ones
    passed, failed, rc, tail = run_conformance()
    assert (passed, failed, rc) == (want, 0, 0), tail


def test_two_node_service_specs_pass_against_bpflb():
    """Two nodes (lb/testing/node.py Node(nodes=2)): the issue's set across them, and the specs of service.go
    that skip on one node."""
    e2e = node_binaries()["E2E_TEST"]
    two_node = selected_specs(e2e, conformance.TWO_NODE_FOCUS, "")
    assert two_node == 12  # v1.34.4: the 12 TWO_NODE_FOCUS names (all of service.go's two-node specs but SCTP)
    want = selected_specs(e2e, conformance.focus_for(2))
    assert want == selected_specs(e2e) + two_node
    passed, failed, rc, tail = run_conformance("--nodes", "2")
    assert (passed, failed, rc) == (want, 0, 0), tail
