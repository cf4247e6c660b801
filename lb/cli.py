"""The ``bpflb`` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

from .settings import BPF_ROOT_DEFAULT, MAP_SIZE_FLAGS, MapSizes, Paths, Settings, default_cgroup_root


def _paths_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cgroup-root", default=None, help="cgroup2 directory the socket programs attach to "
                   "(default: the cgroup2 mount)")
    p.add_argument("--bpf-root", default=BPF_ROOT_DEFAULT, help=f"bpffs directory for pins (default {BPF_ROOT_DEFAULT})")


def _paths(a: argparse.Namespace) -> Paths:
    return Paths(cgroup_root=a.cgroup_root or default_cgroup_root(), bpf_root=a.bpf_root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bpflb", description="kube-proxy replacement: Services load-balanced by BPF")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    ag = sub.add_parser("agent", help="program the datapath from a manifest folder")
    ag.add_argument("--manifests", metavar="DIR", help="follow a folder of Service/EndpointSlice/Node YAML or JSON "
                    "instead of the API server")
    ag.add_argument("--kubeconfig", help="API server credentials (default: in-cluster configuration)")
    ag.add_argument("--healthz-bind-address", default=Settings.__dataclass_fields__["healthz_bind"].default,
                    help="/healthz and /livez address:port (default %(default)s; empty disables)")
    ag.add_argument("--metrics-bind-address", default=Settings.__dataclass_fields__["metrics_bind"].default,
                    help="/metrics address:port (default %(default)s; empty disables)")
    ag.add_argument("--network-mode", choices=["overlay", "direct", "none"], default="overlay",
                    help="pod traffic between nodes: VXLAN overlay (default), direct routes via node IPs, or none "
                         "(a routing daemon announces pod CIDRs)")
    ag.add_argument("--cni-socket", default="", help="serve the bundled CNI plugin on this unix socket "
                    "(the DaemonSet uses /run/bpflb/cni.sock)")
    ag.add_argument("--cni-bin-dir", default="", help="install the CNI launcher (bpflb-cni) here at start")
    ag.add_argument("--cni-conf-dir", default="", help="install the CNI conflist here at start")
    ag.add_argument("--remove-kube-proxy-rules", action="store_true",
                    default=os.environ.get("BPFLB_REMOVE_KUBE_PROXY_RULES", "").lower() == "true",
                    help="delete kube-proxy's iptables/nftables rules on this node instead of refusing to start "
                         "(default: $BPFLB_REMOVE_KUBE_PROXY_RULES == true)")
    ag.add_argument("--node-name", default=None, help="this node's name (default: hostname)")
    ag.add_argument("--strict", dest="strict", action="store_true", default=True,
                    help="refuse to start when a needed kernel hook is missing (default)")
    ag.add_argument("--no-strict", dest="strict", action="store_false")
    for f, flag in MAP_SIZE_FLAGS.items():
        ag.add_argument(flag, dest=f"map_{f}", type=int, default=getattr(MapSizes(), f),
                        help=f"entries in the {f.replace('_', ' ')} map (default %(default)s)")
    _paths_args(ag)

    pr = sub.add_parser("probe", help="report, hook by hook, what this kernel supports")
    pr.add_argument("--cgroup-root", default=None)
    pr.add_argument("-o", "--output", choices=["text", "json"], default="text")

    cl = sub.add_parser("cleanup", help="remove every program, attachment and pin bpflb made")
    _paths_args(cl)

    sv = sub.add_parser("service", help="inspect programmed services")
    svsub = sv.add_subparsers(dest="svc_cmd", required=True)
    ls = svsub.add_parser("list", help="frontends and backends as the datapath sees them (pinned maps)")
    ls.add_argument("-o", "--output", choices=["text", "json"], default="text")
    ls.add_argument("--bpf-root", default=BPF_ROOT_DEFAULT)

    ex = sub.add_parser("explain", help="why each endpoint of a Service is or is not used on this node")
    ex.add_argument("service", metavar="NAMESPACE/NAME[:PORT]")
    ex.add_argument("--manifests", metavar="DIR", required=True)
    ex.add_argument("--node-name", default=None)

    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if a.cmd == "agent":
        from . import agent
        from .datapath import DatapathError

        if a.manifests and not os.path.isdir(a.manifests):
            ap.error(f"agent: --manifests {a.manifests}: not a directory")
        if a.manifests and a.kubeconfig:
            ap.error("agent: --manifests and --kubeconfig are two sources; pick one")
        if not a.manifests and not a.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            ap.error("agent: no source: pass --manifests DIR or --kubeconfig FILE (or run in a cluster)")
        if a.kubeconfig and not os.path.isfile(a.kubeconfig):
            ap.error(f"agent: --kubeconfig {a.kubeconfig}: no such file")
        sizes = MapSizes(**{f: getattr(a, f"map_{f}") for f in MapSizes.__dataclass_fields__})
        settings = Settings(node_name=a.node_name or socket.gethostname(), manifests=a.manifests,
                            kubeconfig=a.kubeconfig, healthz_bind=a.healthz_bind_address,
                            metrics_bind=a.metrics_bind_address, network_mode=a.network_mode, cni_socket=a.cni_socket,
                            cni_bin_dir=a.cni_bin_dir, cni_conf_dir=a.cni_conf_dir, remove_kube_proxy_rules=a.remove_kube_proxy_rules,
                            strict=a.strict, paths=_paths(a), maps=sizes)
        try:
            agent.run(settings)
        except DatapathError as e:
            print(f"bpflb agent: {e}", file=sys.stderr)
            return 1
        return 0

    if a.cmd == "probe":
        from .probe import missing_required, probe

        results = probe(a.cgroup_root or default_cgroup_root())
        if a.output == "json":
            print(json.dumps([r.__dict__ for r in results], indent=2))
        else:
            for r in results:
                mark = "ok" if r.ok else ("MISSING" if r.required else "missing")
                need = "required" if r.required else "optional"
                print(f"{mark:8} {r.feature:48} {need}{'  ' + r.detail if r.detail else ''}")
        return 1 if missing_required(results) else 0

    if a.cmd == "cleanup":
        from .datapath import cleanup

        for item in cleanup(_paths(a)):
            print(f"removed {item}")
        return 0

    if a.cmd == "explain":
        from .explain import explain
        from .model import ObjKey
        from .source.manifests import ManifestFolder
        from .translate import NodeView

        ref, _, port = a.service.partition(":")
        ns, _, name = ref.rpartition("/")
        key = ObjKey(ns or "default", name)
        folder = ManifestFolder(a.manifests, report=lambda p: print(f"warning: {p}", file=sys.stderr))
        folder.scan()
        services, slices, nodes = folder.snapshot()
        if key not in services:
            print(f"bpflb explain: Service {key} not found in {a.manifests}", file=sys.stderr)
            return 1
        node_name = a.node_name or socket.gethostname()
        mine = [s for s in slices.values() if s.service == key]
        print(explain(services[key], [s for s in mine if not s.skip], NodeView.of(node_name, nodes.get(node_name)),
                      port or None, ignored_slices=[s for s in mine if s.skip]))
        return 0

    if a.cmd == "service" and a.svc_cmd == "list":
        from .inspect import format_rows, service_rows

        try:
            rows = service_rows(a.bpf_root)
        except FileNotFoundError as e:
            print(f"bpflb: {e}", file=sys.stderr)
            return 1
        print(json.dumps(rows, indent=2) if a.output == "json" else format_rows(rows))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
