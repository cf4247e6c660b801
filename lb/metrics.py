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
        # ---- kube-proxy's families (pkg/proxy/metrics/metrics.go) ----
        self.sync_duration = Histogram(
            "bpflb_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds (full and partial syncs)",
            buckets=SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "bpflb_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs (every Service, kernel maps re-read, stale pruned)",
            buckets=SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            "bpflb_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial syncs (only the changed Services)",
            buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge("bpflb_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=r)
        self.last_queued = Gauge("bpflb_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", registry=r)
        self.programming_latency = Histogram(
            "bpflb_network_programming_duration_seconds",
            "From an EndpointSlice change (endpoints.kubernetes.io/last-change-trigger-time) to the maps being programmed",
            buckets=PROGRAMMING_BUCKETS, registry=r)
        self.service_changes = Counter("bpflb_sync_proxy_rules_service_changes",
                                       "Cumulative proxy rules Service changes", registry=r)
        self.endpoint_changes = Counter("bpflb_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint (EndpointSlice) changes", registry=r)
        self.healthz = Counter("bpflb_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez = Counter("bpflb_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        # ---- bpflb's own ----
        self.pending = Gauge("bpflb_sync_proxy_rules_pending_changes",
                             "Services changed but not yet programmed", registry=r)
        self.services = Gauge("bpflb_services_programmed", "Frontends programmed in the datapath", registry=r)
        self.backends = Gauge("bpflb_backends_programmed", "Distinct backends programmed in the datapath", registry=r)
        self.map_fill = Gauge("bpflb_map_fill_ratio", "Entries / capacity of each BPF map", ["map"], registry=r)
        self.api_errors = Counter("bpflb_api_errors", "Errors talking to the API server", ["code"], registry=r)
        self.sync_errors = Counter("bpflb_sync_errors", "Syncs that failed and will be retried", registry=r)

    def observe_sync(self, seconds: float, full: bool) -> None:
        """One successful sync took ``seconds``: counted in the overall and in the full or partial histogram."""
        self.sync_duration.observe(seconds)
        (self.sync_full_duration if full else self.sync_partial_duration).observe(seconds)

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) of every family."""
        return generate_latest(self.registry)
