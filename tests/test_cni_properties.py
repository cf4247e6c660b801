"""Property tests (hypothesis) of the CNI plugin's parsers of untrusted input, the environment and the
network configuration on stdin: any input either parses or is answered with the CNI error whose code
the specification gives and whose message names the field, never another exception; and a request
that fails changes nothing that was set up (files, the node's devices, the datapath's map)."""
from __future__ import annotations

import json
import os
import subprocess

from hypothesis import HealthCheck, given, settings, strategies as st

from lb.cni.plugin import COMMANDS, CNIError, handle, parse

from test_cni_spec import CIDR, FakeSink, Scratch

SPEC_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 100}
PARSE_CODES = {1, 2, 4, 6, 7}  # what validation alone may answer
FIELDS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "cniVersion", "'name'", "'type'",
          "network name", "podCIDR", "mtu", "dataDir", "ipam", "prevResult", "cni.dev/valid-attachments",
          "network configuration")

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=6)


def base_conf(data: str) -> dict:
    return {"cniVersion": "1.1.0", "name": "bpflb", "type": "bpflb-cni", "podCIDR": CIDR, "dataDir": data, "mtu": 1500}


def configs(data: str):
    """A valid configuration with some fields replaced, dropped or added; or any bytes."""
    keys = list(base_conf(data)) + ["prevResult", "ipam", "cni.dev/valid-attachments", "agentSocket", "podCIDRs"]
    mutated = st.builds(
        lambda drop, over, versions: json.dumps(
            {**{k: v for k, v in base_conf(data).items() if k not in drop}, **over,
             **({"cniVersion": versions} if versions else {})}).encode(),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=3),
        st.sampled_from([None, "0.3.1", "0.4.0", "1.0.0", "9.9.9", ""]))
    return mutated | st.binary(max_size=64) | st.text(max_size=40).map(str.encode)


def envs(netns_paths: list[str]):
    def text(valid):
        return st.sampled_from(valid) | st.text(max_size=24)

    return st.fixed_dictionaries({}, optional={
        "CNI_COMMAND": st.sampled_from(COMMANDS + ("", "add", "FROB")),
        "CNI_CONTAINERID": text(["c1", "a-b", "x.y_z", "-bad", "bad\n", "a:b"]),
        "CNI_NETNS": st.sampled_from(netns_paths) | st.text(max_size=24),
        "CNI_IFNAME": text(["eth0", "net1", "eth0\n", "é" * 8, ".", "a/b", "a b", "x" * 16]),
        "CNI_ARGS": text(["", "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b", "IgnoreUnknown=1", "novalue"]),
        "CNI_PATH": st.just("/opt/cni/bin"),
    })


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parse_returns_a_request_or_the_spec_error_naming_the_field(data):
    env = data.draw(envs(["/run/netns/x", "/proc/self/ns/net"]))
    stdin = data.draw(configs("/var/lib/bpflb-test-never-written"))
    try:
        req = parse(env, stdin)
    except CNIError as e:
        assert e.code in PARSE_CODES, (e.code, e.msg)
        assert any(f in e.msg for f in FIELDS), e.msg
        return
    assert req.command in COMMANDS


def snapshot(ns: Scratch, sink: FakeSink) -> tuple:
    files = []
    for root, _, names in os.walk(ns.data):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                files.append((os.path.relpath(path, ns.data), f.read()))
    links = subprocess.run(["ip", "-n", os.path.basename(ns.node), "-o", "link"], capture_output=True,
                           text=True).stdout
    # The pod's addresses, without the kernel's own changes over time (an IPv6 link-local address
    # leaves "tentative" when duplicate address detection ends): device and address only.
    pod = subprocess.run(["ip", "-n", os.path.basename(ns.pod), "-o", "addr"], capture_output=True, text=True).stdout
    pod_addrs = sorted(tuple(l.split()[1:4]) for l in pod.splitlines())
    return sorted(files), sorted(l.split(":")[1] for l in links.splitlines()), pod_addrs, dict(sink.map)


def test_any_request_is_answered_and_a_failed_one_changes_nothing(tmp_path):
    ns = Scratch(str(tmp_path / "data"))
    try:
        ns.pod = ns.netns()
        sink = FakeSink()
        rc, res = ns.call({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "keep", "CNI_NETNS": ns.pod, "CNI_IFNAME": "eth0"},
                          base_conf(ns.data), sink)
        assert rc == 0, res
        others = ns.netns()  # where a fuzzed ADD may succeed

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(env=envs([ns.pod, others, ns.node, "/proc/self/ns/mnt"]), stdin=configs(ns.data))
        def one(env, stdin):
            before = snapshot(ns, sink)
            rc, out = ns.call(env, stdin, sink)  # raises if handle() itself raised
            if rc == 1:
                assert out["code"] in SPEC_CODES and out["msg"], out
                assert "internal error" not in out["msg"], out
                assert snapshot(ns, sink) == before, (env, stdin, out)
            elif env.get("CNI_COMMAND") not in ("GC", "DEL"):  # the ones that may legitimately remove "keep"
                after = snapshot(ns, sink)
                assert after[2] == before[2] and set(before[3].items()) <= set(after[3].items())

        one()
    finally:
        ns.close()
