"""The agent's Prometheus metrics (prometheus-client), named as kube-proxy's (pkg/proxy/metrics) with
bpflb_ for kubeproxy_ where kube-proxy has one, so its dashboards and alerts carry over.

Each AgentMetrics has its own CollectorRegistry: two agents in one process (tests) never share a
series, and nothing from the library's default registry (process and GC collectors) is served.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

# kube-proxy serves no <name>_created series; this process serves only bpflb's registries.
disable_created_metrics()


def exponential(start: float, factor: float, n: int) -> tuple[float, ...]:
    return tuple(start * factor ** i for i in range(n))


SYNC_BUCKETS = exponential(0.001, 2, 15)  # kube-proxy's, 1 ms .. 16 s
PROGRAMMING_BUCKETS = exponential(0.001, 2, 18)  # 1 ms .. 131 s: bpflb programs in milliseconds


class AgentMetrics:
    """Every family the agent serves on /metrics; ``render()`` is the body, ``content_type`` its type."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        def histogram(name: str, doc: str, buckets=SYNC_BUCKETS) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=r)  # served as <name>_total

        # ---- kube-proxy's families (pkg/proxy/metrics/metrics.go) ----
        self.sync_duration = histogram("bpflb_sync_proxy_rules_duration_seconds",
                                       "SyncProxyRules latency in seconds (full and partial syncs)")
        self.sync_full_duration = histogram(
            "bpflb_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs (every Service, kernel maps re-read, stale pruned)")
        self.sync_partial_duration = histogram("bpflb_sync_partial_proxy_rules_duration_seconds",
                                               "SyncProxyRules latency in seconds for partial syncs (changed Services only)")
        self.last_sync = gauge("bpflb_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced")
        self.last_queued = gauge("bpflb_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued")
        self.programming_latency = histogram(
            "bpflb_network_programming_duration_seconds",
            "From an EndpointSlice change (endpoints.kubernetes.io/last-change-trigger-time) to the maps being programmed",
            PROGRAMMING_BUCKETS)
        self.service_changes = counter("bpflb_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes")
        self.endpoint_changes = counter("bpflb_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint (EndpointSlice) changes")
        self.healthz = counter("bpflb_proxy_healthz", "Cumulative proxy healthz HTTP status", "code")
        self.livez = counter("bpflb_proxy_livez", "Cumulative proxy livez HTTP status", "code")
        # ---- bpflb's own ----
        self.pending = gauge("bpflb_sync_proxy_rules_pending_changes", "Services changed but not yet programmed")
        self.services = gauge("bpflb_services_programmed", "Frontends programmed in the datapath")
        self.backends = gauge("bpflb_backends_programmed", "Distinct backends programmed in the datapath")
        self.map_fill = gauge("bpflb_map_fill_ratio", "Entries / capacity of each BPF map", "map")
        self.api_errors = counter("bpflb_api_errors", "Errors talking to the API server", "code")
        self.sync_errors = counter("bpflb_sync_errors", "Syncs that failed and will be retried")
        self.refused = gauge("bpflb_services_refused", "Services refused admission (they do not fit a limit)")
        self.refusals = counter("bpflb_service_refusals", "Services refused admission, by the limit they exceed",
                                "limit")

    def observe_sync(self, seconds: float, full: bool) -> None:
        """One successful sync took ``seconds``: counted in the overall and in the full or partial histogram."""
        self.sync_duration.observe(seconds)
        (self.sync_full_duration if full else self.sync_partial_duration).observe(seconds)

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) of every family."""
        return generate_latest(self.registry)
