"""The agent on a real kube-apiserver (built from k8s.io/kubernetes, see scripts/build-components.sh):
it follows Services and EndpointSlices, rides out API server restarts, 410 Gone and outages without
dropping what is programmed, and runs with exactly the ClusterRole in manifests/."""
from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import BE4, NODE, PORT, ROOT, AgentProc, backends_of, programmed, stop_client, wait_for
from lb.testing.apiserver import ControlPlane

AGENT_TOKEN = "bpflb-agent-token"


@pytest.fixture(scope="module")
def cp():
    with ControlPlane(extra_tokens={AGENT_TOKEN: ("bpflb-agent", "bpflb-agents")}) as c:
        yield c


@pytest.fixture
def ns(cp, request):
    name = f"t{abs(hash(request.node.name)) % 10**8}"
    cp.kubectl("create", "namespace", name)
    yield name
    for kind in ("services", "endpointslices.discovery.k8s.io", "configmaps"):
        cp.kubectl("-n", name, "delete", kind, "--all", "--wait=false", check=False)


def service(ns, name, ip, port=80, protocol="TCP", **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": port, "protocol": protocol,
                                                                      "targetPort": PORT}], **spec}}


def eslice(ns, name, svc, ips, trigger=None):
    meta = {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}}
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4",
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE} for ip in ips]}


def apply(cp, *objs):
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def ids(ips):
    return {f"{ip}:{PORT}" for ip in ips}


@pytest.fixture
def kube_agent(bed, cp):
    bed.servers(BE4, PORT)
    started = []

    def start(kubeconfig=None, wait_ready=True, extra=()):
        a = AgentProc(bed, None, ["--kubeconfig", str(kubeconfig or cp.kubeconfig), *extra])
        started.append(a)
        return a.start(wait_ready)
    yield start
    for a in started:
        a.stop(signal.SIGKILL)


def test_follows_services_and_slices(bed, cp, ns, kube_agent):
    apply(cp, service(ns, "web", "10.96.5.10"), eslice(ns, "web-1", "web", BE4[:2]))
    kube_agent()
    wait_for(lambda: backends_of(bed, "10.96.5.10:80/TCP") == ids(BE4[:2]), what="service programmed")
    r = bed.run_client("10.96.5.10:80", "--count", "100")
    assert r["errors"] == {} and set(r["answered"]) == ids(BE4[:2])
    apply(cp, eslice(ns, "web-1", "web", BE4[2:4]))
    wait_for(lambda: backends_of(bed, "10.96.5.10:80/TCP") == ids(BE4[2:4]), what="slice update")
    cp.kubectl("-n", ns, "delete", "service", "web")
    wait_for(lambda: "10.96.5.10:80/TCP" not in programmed(bed), what="service deleted")


def test_apiserver_restart_and_410_gone_relist_keeps_state(bed, cp, ns, kube_agent):
    apply(cp, service(ns, "web", "10.96.5.11"), eslice(ns, "web-1", "web", BE4[:2]))
    a = kube_agent()
    wait_for(lambda: backends_of(bed, "10.96.5.11:80/TCP") == ids(BE4[:2]))
    loop = bed.client("10.96.5.11:80", "--count", "0", "--interval", "0.002")
    cp.stop_apiserver()
    # Move etcd on and compact while the API server is down: the agent's resourceVersions are gone.
    cp.start_apiserver()
    for i in range(20):
        cp.kubectl("-n", ns, "create", "configmap", f"c{i}", "--from-literal=a=b")
    cp.compact()
    cp.stop_apiserver()
    cp.start_apiserver()
    a.wait_log("is gone (410); relisting", timeout=60)
    apply(cp, eslice(ns, "web-1", "web", BE4[1:3]))
    wait_for(lambda: backends_of(bed, "10.96.5.11:80/TCP") == ids(BE4[1:3]), timeout=30, what="followed after relist")
    r = stop_client(loop)
    assert r["attempts"] > 100 and r["errors"] == {}, r


def test_api_server_cut_off_for_30_seconds_while_a_client_connects(bed, cp, ns, kube_agent):
    apply(cp, service(ns, "web", "10.96.5.12"), eslice(ns, "web-1", "web", BE4[:3]))
    a = kube_agent()
    wait_for(lambda: backends_of(bed, "10.96.5.12:80/TCP") == ids(BE4[:3]))
    loop = bed.client("10.96.5.12:80", "--count", "0", "--interval", "0.005")
    cp.stop_apiserver()
    time.sleep(30)  # the outage itself is what is tested: the datapath must not notice
    assert backends_of(bed, "10.96.5.12:80/TCP") == ids(BE4[:3])
    cp.start_apiserver()
    apply(cp, eslice(ns, "web-1", "web", BE4[:1]))
    wait_for(lambda: backends_of(bed, "10.96.5.12:80/TCP") == ids(BE4[:1]), timeout=60, what="recovered")
    r = stop_client(loop)
    assert r["attempts"] > 1000 and r["errors"] == {}, r
    assert any("watch failing, backing off" in l for l in a.lines)


def test_agent_restarted_while_the_api_server_is_down_serves_pinned_state(bed, cp, ns, kube_agent):
    apply(cp, service(ns, "web", "10.96.5.13"), eslice(ns, "web-1", "web", BE4[:2]))
    first = kube_agent()
    wait_for(lambda: backends_of(bed, "10.96.5.13:80/TCP") == ids(BE4[:2]))
    before = programmed(bed)
    first.stop(signal.SIGKILL)
    cp.stop_apiserver()
    try:
        second = kube_agent(wait_ready=False)
        second.wait_log("watch failing, backing off", timeout=30)
        assert programmed(bed) == before  # nothing pruned: nothing was listed
        r = bed.run_client("10.96.5.13:80", "--count", "50")
        assert r["errors"] == {} and set(r["answered"]) == ids(BE4[:2])
    finally:
        cp.start_apiserver()
    second.wait_log("initial sync complete", timeout=60)
    assert backends_of(bed, "10.96.5.13:80/TCP") == ids(BE4[:2])


def test_install_manifests_apply_server_side_and_grant_exactly_what_the_agent_uses(bed, cp, ns, kube_agent):
    cp.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests"))
    # What the API server stored is what was shipped: no field dropped as unknown, none defaulted away.
    ds = json.loads(cp.kubectl("-n", "bpflb-system", "get", "daemonset", "bpflb", "-o", "json"))["spec"]["template"]
    (c,) = ds["spec"]["containers"]
    assert c["image"] == "localhost/bpflb:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert {c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"/livez"}
    assert c["securityContext"]["appArmorProfile"] == {"type": "Unconfined"} and not c["securityContext"]["privileged"]
    assert ds["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/agent"] == "unconfined"
    paths = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["volumes"] if "hostPath" in v}
    assert (paths["cni-bin"], paths["cni-conf"]) == ("/var/lib/rancher/k3s/data/cni", "/var/lib/rancher/k3s/agent/etc/cni/net.d")
    data = json.loads(cp.kubectl("-n", "bpflb-system", "get", "configmap", "bpflb-config", "-o", "json"))["data"]
    refs = {e["valueFrom"]["configMapKeyRef"]["key"] for e in c["env"] if "configMapKeyRef" in e.get("valueFrom", {})}
    assert refs <= set(data) and data["metrics-bind-address"] == "127.0.0.1:10249"
    sa = "system:serviceaccount:bpflb-system:bpflb"
    allowed = [("list", "services"), ("watch", "services"), ("list", "endpointslices.discovery.k8s.io"),
               ("watch", "endpointslices.discovery.k8s.io"), ("list", "nodes"), ("watch", "nodes")]
    denied = [("get", "secrets"), ("create", "services"), ("delete", "services"), ("update", "endpointslices.discovery.k8s.io"),
              ("list", "pods"), ("patch", "nodes"), ("get", "services"), ("list", "configmaps")]
    for verb, res in allowed:
        assert cp.kubectl("auth", "can-i", verb, res, "--all-namespaces", f"--as={sa}", check=False).strip() == "yes", (verb, res)
    for verb, res in denied:
        assert cp.kubectl("auth", "can-i", verb, res, "--all-namespaces", f"--as={sa}", check=False).strip() == "no", (verb, res)
    # The same ClusterRole bound to another identity is enough to run the agent for real.
    cp.kubectl("create", "clusterrolebinding", "bpflb-test-agent", "--clusterrole=bpflb", "--user=bpflb-agent")
    apply(cp, service(ns, "web", "10.96.5.14"), eslice(ns, "web-1", "web", BE4[:1]))
    a = kube_agent(kubeconfig=cp.kubeconfig_for(AGENT_TOKEN))
    wait_for(lambda: backends_of(bed, "10.96.5.14:80/TCP") == ids(BE4[:1]))
    assert not any("refused us" in l for l in a.lines)


def test_healthz_livez_and_metrics(bed, cp, ns, kube_agent):
    from lb.testing.apiserver import free_port

    hp, mp = free_port(), free_port()
    a = kube_agent(extra=("--healthz-bind-address", f"127.0.0.1:{hp}", "--metrics-bind-address", f"127.0.0.1:{mp}"))
    trigger = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    apply(cp, service(ns, "web", "10.96.5.15"), eslice(ns, "web-1", "web", BE4[:2], trigger=trigger))
    wait_for(lambda: backends_of(bed, "10.96.5.15:80/TCP") == ids(BE4[:2]))
    with urllib.request.urlopen(f"http://127.0.0.1:{hp}/healthz", timeout=5) as r:
        doc = json.loads(r.read())
        assert r.status == 200 and set(doc) == {"lastUpdated", "currentTime", "nodeEligible"}
    with urllib.request.urlopen(f"http://127.0.0.1:{hp}/livez", timeout=5) as r:
        assert r.status == 200 and "nodeEligible" not in json.loads(r.read())

    def metrics():
        with urllib.request.urlopen(f"http://127.0.0.1:{mp}/metrics", timeout=5) as r:
            return r.read().decode()
    text = wait_for(lambda: m if "bpflb_network_programming_duration_seconds_count 1" in (m := metrics()) else None,
                    what="programming latency observed")
    for name in ("bpflb_sync_proxy_rules_duration_seconds_count", "bpflb_services_programmed",
                 "bpflb_backends_programmed", 'bpflb_map_fill_ratio{map="lb_services_v1"}',
                 "bpflb_sync_proxy_rules_pending_changes"):
        assert name in text
