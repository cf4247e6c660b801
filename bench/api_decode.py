"""How fast each source's bytes become model values: msgspec's typed decode (lb.objects.decode_page /
decode_documents: JSON straight into typed structs, then model values) against the raw-JSON path
(json.loads + the dict parsers, lb.objects.parse), and, for the API, the kubernetes client's typed
models (V1ServiceList), which would still have to be converted after. All in one run, interleaved.

    .venv/bin/python bench/api_decode.py [--services N] [--endpoints E] [--rounds R]

The API case: a ServiceList and an EndpointSliceList as the API server sends them (items without
kind/apiVersion, with uid, resourceVersion, managedFields-free metadata), decoded as one page each.
The manifest case: one ``kind: List`` file holding both, as bench/program_time.py writes it.
Nothing asserts on time; medians are printed with the ratio.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb.objects import decode_documents, decode_page, parse  # noqa: E402


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{1 + i % 250}"


def endpoint_ip(k: int) -> str:
    k += 1
    return f"10.{128 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}"


def service(i: int) -> dict:
    return {"metadata": {"name": f"svc-{i:05d}", "namespace": "bench", "resourceVersion": str(100 + i), "uid": f"u{i}"},
            "spec": {"clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)], "type": "ClusterIP",
                     "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "internalTrafficPolicy": "Cluster",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
            "status": {"loadBalancer": {}}}


def endpoint_slice(i: int, e: int) -> dict:
    return {"metadata": {"name": f"svc-{i:05d}-abcde", "namespace": "bench", "resourceVersion": str(100 + i),
                         "uid": f"e{i}", "labels": {"kubernetes.io/service-name": f"svc-{i:05d}",
                                                     "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [endpoint_ip(i * e + j)],
                           "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": f"node-{j}", "targetRef": {"kind": "Pod", "name": f"p{i}-{j}", "namespace": "bench"}}
                          for j in range(e)]}


def timed(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    n, e = a.services, a.endpoints
    svcs = [service(i) for i in range(n)]
    slices = [endpoint_slice(i, e) for i in range(n)]
    svc_page = json.dumps({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "5"},
                           "items": svcs}).encode()
    slice_page = json.dumps({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                             "metadata": {"resourceVersion": "5"}, "items": slices}).encode()
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        o for i in range(n) for o in ({"apiVersion": "v1", "kind": "Service", **svcs[i]},
                                      {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", **slices[i]})]}).encode()

    def raw_page(kind: str, raw: bytes) -> list:
        return [parse(kind, o) for o in json.loads(raw)["items"]]

    def raw_documents(raw: bytes) -> list:
        return [parse(o["kind"], o) for o in json.loads(raw)["items"]]

    # Same answers first: the comparison is only fair if both paths agree.
    assert decode_page("Service", svc_page).items == raw_page("Service", svc_page)
    assert decode_page("EndpointSlice", slice_page).items == raw_page("EndpointSlice", slice_page)
    assert decode_documents(manifest) == raw_documents(manifest)

    cases = {
        f"API: {n} Services (one page, {len(svc_page) / 1e6:.1f} MB)":
            (lambda: decode_page("Service", svc_page), lambda: raw_page("Service", svc_page)),
        f"API: {n} EndpointSlices x {e} (one page, {len(slice_page) / 1e6:.1f} MB)":
            (lambda: decode_page("EndpointSlice", slice_page), lambda: raw_page("EndpointSlice", slice_page)),
        f"manifest .json: both ({len(manifest) / 1e6:.1f} MB)":
            (lambda: decode_documents(manifest), lambda: raw_documents(manifest)),
    }
    try:
        from kubernetes import client
        api = client.ApiClient()
        text = svc_page.decode()
        typed_models = lambda: api.deserialize(text, "V1ServiceList", "application/json")  # noqa: E731
    except ImportError:
        typed_models = None
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    k8s: list[float] = []
    for _ in range(a.rounds):  # interleaved rounds, medians
        for name, (fast, slow) in cases.items():
            times[name][0].append(timed(fast))
            times[name][1].append(timed(slow))
        if typed_models:
            k8s.append(timed(typed_models))
    print(f"{'':<48} {'msgspec':>9} {'json+dict':>9}  ratio")
    for name, (fast, slow) in times.items():
        f, s = median(fast), median(slow)
        print(f"{name:<48} {f:>8.3f}s {s:>8.3f}s  {s / f:.1f}x")
    if k8s:
        print(f"(kubernetes client typed models, {n} Services, not yet converted: {median(k8s):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
