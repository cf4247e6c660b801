"""A minimal Prometheus registry and text exposition (the design card carries no metrics library;
this is the small subset the agent needs)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    buckets: tuple[float, ...] = ()
    values: dict = field(default_factory=dict)  # labels -> value, or [bucket counts, sum, count]

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = float(value)

    def observe(self, value: float, **labels: str) -> None:
        h = self.values.setdefault(tuple(sorted(labels.items())), [[0] * len(self.buckets), 0.0, 0])
        i = bisect.bisect_left(self.buckets, value)  # first bucket whose upper bound >= value
        if i < len(self.buckets):
            h[0][i] += 1
        h[1] += value
        h[2] += 1

    def count(self, **labels: str) -> int:
        h = self.values.get(tuple(sorted(labels.items())))
        return h[2] if h else 0

    def render(self) -> str:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, v in sorted(self.values.items()):
            if self.kind != "histogram":
                out.append(f"{self.name}{_labels(key)} {v:g}")
                continue
            counts, total, n = v
            acc = 0
            for b, c in zip(self.buckets, counts):
                acc += c
                out.append(f"{self.name}_bucket{_labels(key + (('le', f'{b:g}'),))} {acc}")
            out.append(f"{self.name}_bucket{_labels(key + (('le', '+Inf'),))} {n}")
            out.append(f"{self.name}_sum{_labels(key)} {total:g}")
            out.append(f"{self.name}_count{_labels(key)} {n}")
        return "\n".join(out)


def exponential(start: float, factor: float, n: int) -> tuple[float, ...]:
    return tuple(start * factor ** i for i in range(n))


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def add(self, name: str, help: str, kind: str, buckets: tuple[float, ...] = ()) -> Metric:
        m = Metric(name, help, kind, buckets)
        self.metrics[name] = m
        return m

    def render(self) -> str:
        return "\n".join(m.render() for m in self.metrics.values()) + "\n"


class AgentMetrics:
    """Names follow kube-proxy's where a kube-proxy metric exists (kubeproxy_ -> bpflb_)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.sync_duration = r.add("bpflb_sync_proxy_rules_duration_seconds",
                                   "Time to translate and program one sync", "histogram", exponential(0.001, 2, 15))
        self.programming_latency = r.add(
            "bpflb_network_programming_duration_seconds",
            "From an EndpointSlice change (endpoints.kubernetes.io/last-change-trigger-time) to the maps being programmed",
            "histogram", exponential(0.001, 2, 18))
        self.pending = r.add("bpflb_sync_proxy_rules_pending_changes", "Services changed but not yet programmed", "gauge")
        self.services = r.add("bpflb_services_programmed", "Frontends programmed in the datapath", "gauge")
        self.backends = r.add("bpflb_backends_programmed", "Distinct backends programmed in the datapath", "gauge")
        self.map_fill = r.add("bpflb_map_fill_ratio", "Entries / capacity of each BPF map", "gauge")
        self.api_errors = r.add("bpflb_api_errors_total", "Errors talking to the API server", "counter")
        self.sync_errors = r.add("bpflb_sync_errors_total", "Syncs that failed and will be retried", "counter")
        self.last_sync = r.add("bpflb_sync_proxy_rules_last_timestamp_seconds", "Unix time of the last successful sync", "gauge")
