"""The agent's metrics (prometheus-client) and the HTTP server that serves them with /healthz and /livez."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.health import HealthState, HttpServer
from lb.metrics import AgentMetrics

# kube-proxy's families (pkg/proxy/metrics/metrics.go) that bpflb serves, kubeproxy_ -> bpflb_.
KUBE_PROXY_FAMILIES = {
    "bpflb_sync_proxy_rules_duration_seconds": "histogram",
    "bpflb_sync_full_proxy_rules_duration_seconds": "histogram",
    "bpflb_sync_partial_proxy_rules_duration_seconds": "histogram",
    "bpflb_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "bpflb_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "bpflb_network_programming_duration_seconds": "histogram",
    "bpflb_sync_proxy_rules_service_changes": "counter",
    "bpflb_sync_proxy_rules_endpoint_changes": "counter",
    "bpflb_proxy_healthz": "counter",
    "bpflb_proxy_livez": "counter",
}


def families(m: AgentMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def sample(m: AgentMetrics, name: str, **labels: str) -> float | None:
    for f in text_string_to_metric_families(m.render().decode()):
        for s in f.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def test_kube_proxy_families_are_served_with_their_types():
    got = {name: f.type for name, f in families(AgentMetrics()).items()}
    assert {n: got.get(n) for n in KUBE_PROXY_FAMILIES} == KUBE_PROXY_FAMILIES


@pytest.mark.parametrize("value", [
    'say "hi"',
    "back\\slash",
    "two\nlines",
    '\\"\n mixed "\\n" literal',
    "ünïcode ✓",
], ids=["quotes", "backslash", "newline", "mixed", "unicode"])
def test_label_values_are_escaped_and_read_back_unchanged(value):
    m = AgentMetrics()
    m.api_errors.labels(code=value).inc()
    text = m.render().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("bpflb_api_errors_total{"))
    assert "\n" not in line  # one sample, one line
    assert line == 'bpflb_api_errors_total{code="%s"} 1.0' % (
        value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    assert sample(m, "bpflb_api_errors_total", code=value) == 1.0


def test_each_agent_metrics_has_its_own_registry():
    a, b = AgentMetrics(), AgentMetrics()
    a.sync_errors.inc()
    a.map_fill.labels(map="lb_services_v1").set(0.25)
    assert sample(a, "bpflb_sync_errors_total") == 1.0 and sample(b, "bpflb_sync_errors_total") == 0.0
    assert sample(b, "bpflb_map_fill_ratio", map="lb_services_v1") is None
    assert "process_" not in a.render().decode()  # the library's default collectors are not served


@pytest.mark.parametrize("full, counted, not_counted", [
    (True, "bpflb_sync_full_proxy_rules_duration_seconds_count", "bpflb_sync_partial_proxy_rules_duration_seconds_count"),
    (False, "bpflb_sync_partial_proxy_rules_duration_seconds_count", "bpflb_sync_full_proxy_rules_duration_seconds_count"),
], ids=["full", "partial"])
def test_a_sync_counts_in_the_overall_and_its_kind(full, counted, not_counted):
    m = AgentMetrics()
    m.observe_sync(0.003, full=full)
    assert sample(m, "bpflb_sync_proxy_rules_duration_seconds_count") == 1.0
    assert sample(m, counted) == 1.0 and sample(m, not_counted) == 0.0
    assert sample(m, "bpflb_sync_proxy_rules_duration_seconds_bucket", le="0.004") == 1.0
    assert sample(m, "bpflb_sync_proxy_rules_duration_seconds_bucket", le="0.002") == 0.0


def test_no_created_series():
    assert "_created" not in AgentMetrics().render().decode()


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(ln.split(": ", 1) for ln in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_the_server_serves_metrics_and_counts_probes_by_code():
    metrics = AgentMetrics()
    health = HealthState(health_timeout=60, wall=lambda: 1000.0)

    async def scenario():
        server = HttpServer(health, metrics)
        port = await server.listen("127.0.0.1:0")
        try:
            assert (await _get(port, "/healthz"))[0] == 200
            assert (await _get(port, "/livez"))[0] == 200
            health.node_eligible = False  # the node is being deleted: /healthz fails, /livez does not
            assert (await _get(port, "/healthz"))[0] == 503
            assert (await _get(port, "/livez"))[0] == 200
            metrics.api_errors.labels(code='x"y').inc()
            return await _get(port, "/metrics")
        finally:
            server.close()

    status, headers, body = asyncio.run(scenario())
    assert status == 200
    assert headers["Content-Type"] == metrics.content_type and int(headers["Content-Length"]) == len(body)
    served = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(KUBE_PROXY_FAMILIES) <= set(served)
    counts = {(s.name, s.labels.get("code")): s.value
              for name in ("bpflb_proxy_healthz", "bpflb_proxy_livez") for s in served[name].samples}
    assert counts == {("bpflb_proxy_healthz_total", "200"): 1.0, ("bpflb_proxy_healthz_total", "503"): 1.0,
                      ("bpflb_proxy_livez_total", "200"): 2.0}
    assert [s.labels for s in served["bpflb_api_errors"].samples] == [{"code": 'x"y'}]


def test_a_slow_or_greedy_client_never_holds_the_health_server():
    """Slowloris (a request line, then nothing), a flood of idle connections and oversized headers:
    each is cut off, and a proper probe is answered once the bound has passed."""
    metrics = AgentMetrics()
    health = HealthState(health_timeout=60, wall=lambda: 1000.0)

    async def read_all(reader):
        """What the server sent before closing ("" if nothing; a reset counts as nothing)."""
        try:
            return await asyncio.wait_for(reader.read(), 3)
        except ConnectionResetError:
            return b""

    async def scenario():
        server = HttpServer(health, metrics, request_timeout=0.3, max_connections=2)
        port = await server.listen("127.0.0.1:0")
        loop = asyncio.get_running_loop()
        try:
            # slowloris: the server closes it after request_timeout, without an answer
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /healthz HTTP/1.1\r\n")
            t0 = loop.time()
            assert await read_all(r) == b""
            slow = loop.time() - t0
            w.close()
            # a flood: two idle connections take the slots; a third is closed at once, unanswered
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.05)
            r3, w3 = await asyncio.open_connection("127.0.0.1", port)
            w3.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            t0 = loop.time()
            assert await read_all(r3) == b""
            refused = loop.time() - t0
            w3.close()
            for _, w in idle:  # they are timed out by the server too
                w.close()
            await asyncio.sleep(0.4)
            assert (await _get(port, "/healthz"))[0] == 200
            # headers over the limit: 431
            r4, w4 = await asyncio.open_connection("127.0.0.1", port)
            w4.write(b"GET /healthz HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n")
            answer = await read_all(r4)
            w4.close()
            return slow, refused, answer
        finally:
            server.close()

    slow, refused, answer = asyncio.run(scenario())
    assert 0.25 <= slow < 2.0
    assert refused < 0.25
    assert answer.startswith(b"HTTP/1.1 431")
