"""The ControlPlane fixture itself (lb/testing/apiserver.py): a real etcd + kube-apiserver on 127.0.0.1 that
the kubernetes client talks to, that restarts alone, keeps RBAC on, and can be made to answer 410 Gone."""
from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from lb.testing.apiserver import ADMIN_TOKEN, ControlPlane

ALICE_TOKEN = "alice-token"  # an authenticated user with no RBAC grant at all
NS = "fixture"


@pytest.fixture(scope="module")
def cp():
    with ControlPlane(extra_tokens={ALICE_TOKEN: ("alice", "devs")}) as c:
        c.kubectl("create", "namespace", NS)
        yield c


def api(kubeconfig) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


def raw_get(cp, path: str, token: str = ADMIN_TOKEN, timeout: float = 5) -> tuple[int, str]:
    """(HTTP status, first line of the body): a watch's first line is its first event."""
    ctx = ssl.create_default_context(cafile=str(cp.ca))
    req = urllib.request.Request(cp.url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.readline().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_loopback_only_and_ready(cp):
    assert cp.url.startswith("https://127.0.0.1:") and cp.etcd_url.startswith("http://127.0.0.1:")
    assert cp.startup_seconds is not None and cp.startup_seconds < 60
    assert raw_get(cp, "/readyz")[0] == 200
    assert "kube-system" in cp.kubectl("get", "namespaces", "-o", "name")


def test_service_and_endpointslice_with_the_python_client(cp):
    conf = client.Configuration()  # load_kube_config(path), without changing the process-wide default
    config.load_kube_config(str(cp.kubeconfig), client_configuration=conf)
    with client.ApiClient(conf) as a:
        core, disc = client.CoreV1Api(a), client.DiscoveryV1Api(a)
        core.create_namespaced_service(NS, {
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.7.7", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        disc.create_namespaced_endpoint_slice(NS, {
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.200.1.11"], "conditions": {"ready": True}}]})
        svcs = core.list_namespaced_service(NS)
        assert [(s.metadata.name, s.spec.cluster_ip) for s in svcs.items] == [("web", "10.96.7.7")]
        slices = disc.list_namespaced_endpoint_slice(NS, label_selector="kubernetes.io/service-name=web")
        assert [e.addresses for s in slices.items for e in s.endpoints] == [["10.200.1.11"]]
        # The service CIDR is the one configured: an address outside it is refused.
        with pytest.raises(ApiException) as e:
            core.create_namespaced_service(NS, {"metadata": {"name": "bad"},
                                                "spec": {"clusterIP": "10.97.0.1", "ports": [{"port": 80}]}})
        assert e.value.status == 422


def test_restart_apiserver_alone_keeps_objects(cp):
    etcd_pid, api_pid = cp.etcd.pid, cp.apiserver.pid
    cp.stop()
    with pytest.raises(OSError):  # down: nothing listens on the port
        socket.create_connection(("127.0.0.1", cp.port), timeout=2).close()
    assert cp.etcd.poll() is None
    cp.start()
    assert cp.etcd.pid == etcd_pid and cp.apiserver.pid != api_pid
    with api(cp.kubeconfig) as a:
        assert [s.metadata.name for s in client.CoreV1Api(a).list_namespaced_service(NS).items] == ["web"]


def test_apiserver_down_block_restores_it_even_on_error(cp):
    with pytest.raises(ZeroDivisionError):
        with cp.apiserver_down():
            assert cp.apiserver.poll() is not None
            1 / 0
    assert raw_get(cp, "/readyz")[0] == 200


def test_non_admin_token_is_authenticated_but_forbidden(cp):
    with api(cp.kubeconfig_for("alice")) as a:
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(a).list_namespaced_service(NS)
        assert e.value.status == 403 and 'User "alice" cannot list' in json.loads(e.value.body)["message"]
    assert cp.kubeconfig_for("alice") == cp.kubeconfig_for(ALICE_TOKEN)
    assert raw_get(cp, f"/api/v1/namespaces/{NS}/services", token="not-a-token")[0] == 401
    # ... and RBAC is what decides: a binding for alice's group makes the same call work.
    # (Not --clusterrole=view: the aggregated roles stay empty without kube-controller-manager.)
    cp.kubectl("-n", NS, "create", "role", "svc-reader", "--verb=get,list,watch", "--resource=services")
    cp.kubectl("-n", NS, "create", "rolebinding", "devs-read", "--role=svc-reader", "--group=devs")
    deadline = time.monotonic() + 10
    while True:
        try:
            with api(cp.kubeconfig_for("alice")) as a:
                assert [s.metadata.name for s in client.CoreV1Api(a).list_namespaced_service(NS).items] == ["web"]
            break
        except ApiException as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert cp.kubectl("auth", "can-i", "delete", "services", "-n", NS, "--as=alice", "--as-group=devs",
                      check=False).strip() == "no"


def test_compact_forces_410_gone_on_watch_and_list(cp):
    path = f"/api/v1/namespaces/{NS}/configmaps"
    rv = json.loads(raw_get(cp, path)[1])["metadata"]["resourceVersion"]
    for i in range(3):
        cp.kubectl("-n", NS, "create", "configmap", f"c{i}", "--from-literal=a=b")
    # Before compaction the old resourceVersion still replays history.
    status, line = raw_get(cp, f"{path}?watch=1&resourceVersion={rv}")
    assert status == 200 and json.loads(line)["type"] == "ADDED"
    cp.compact()
    status, line = raw_get(cp, f"{path}?watch=1&resourceVersion={rv}")
    ev = json.loads(line)
    assert status == 200 and ev["type"] == "ERROR" and ev["object"]["code"] == 410, ev
    status, body = raw_get(cp, f"{path}?resourceVersion={rv}&resourceVersionMatch=Exact")
    assert status == 410 and json.loads(body)["reason"] == "Expired"


def test_everything_is_gone_after_close():
    c = ControlPlane()
    with c:
        d, procs = c.dir, (c.etcd, c.apiserver)
        assert d.exists()
    assert not d.exists() and all(p.poll() is not None for p in procs)
    bad = ControlPlane(apiserver_args=("--no-such-flag",), ready_timeout=30)
    with pytest.raises(RuntimeError, match="kube-apiserver exited"):
        with bad:
            pass
    assert not bad.dir.exists() and bad.etcd.poll() is not None
