"""The ``bpflb`` command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import typing

from .settings import Paths, Settings, field_docs, flag_of


# ---- flags built from the settings' fields and docstrings (lb/settings.py) -----------------------
def add_settings_flags(p: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """A flag for each field of ``cls`` (and of its nested settings groups) whose docstring names one.
    Defaults stay in the dataclasses: an absent flag is None here and the dataclass default applies."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_settings_flags(p, hint, f"{prefix}{f.name}.")
            continue
        flag = flag_of(cls, f.name)
        if flag is None:
            continue
        help_text = field_docs(cls)[f.name].split(":", 1)[1].strip().replace("%", "%%")
        has_default = f.default is not dataclasses.MISSING
        if has_default and f.default not in (None, "", False) and "(default" not in help_text:
            help_text = help_text.rstrip(".") + f" (default {f.default})"
        kw: dict = {"dest": prefix + f.name, "default": None, "help": help_text}
        if hint is not bool:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        args = typing.get_args(hint)
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kw["choices"] = args
        else:
            kw["type"] = next((a for a in args if a is not type(None)), hint) if args else hint
        p.add_argument(flag, **kw)


def settings_from_flags(cls: type, a: argparse.Namespace, prefix: str = ""):
    """An instance of ``cls`` with the flags given on the command line; defaults for the rest."""
    hints = typing.get_type_hints(cls)
    given = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            given[f.name] = settings_from_flags(hints[f.name], a, f"{prefix}{f.name}.")
        elif getattr(a, prefix + f.name, None) is not None:
            given[f.name] = getattr(a, prefix + f.name)
    return cls(**given)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bpflb", description="kube-proxy replacement: Services load-balanced by BPF")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    ag = sub.add_parser("agent", help="program the datapath from the Kubernetes API server (in-cluster or "
                        "--kubeconfig) or from a folder of manifests (--manifests)")
    add_settings_flags(ag, Settings)

    pr = sub.add_parser("probe", help="report, hook by hook, what this kernel supports")
    pr.add_argument("--cgroup-root", default=None, help=field_docs(Paths)["cgroup_root"].split(":", 1)[1].strip())
    pr.add_argument("-o", "--output", choices=["text", "json"], default="text")

    cl = sub.add_parser("cleanup", help="remove every program, attachment and pin bpflb made")
    add_settings_flags(cl, Paths)

    sv = sub.add_parser("service", help="inspect programmed services")
    svsub = sv.add_subparsers(dest="svc_cmd", required=True)
    ls = svsub.add_parser("list", help="frontends and backends as the datapath sees them (pinned maps)")
    ls.add_argument("-o", "--output", choices=["text", "json"], default="text")
    ls.add_argument("--bpf-root", default=Paths.bpf_root, help=field_docs(Paths)["bpf_root"].split(":", 1)[1].strip())
    ls.add_argument("--state-dir", default=Paths.state_dir, help=field_docs(Paths)["state_dir"].split(":", 1)[1].strip())

    for cmd, what in (("ct", "connections from outside the node the tc programs translate (lb_ct)"),
                      ("nat", "reply tuples and masquerade ports of those connections (lb_nat)")):
        sp = sub.add_parser(cmd, help=f"inspect {what}")
        spsub = sp.add_subparsers(dest=f"{cmd}_cmd", required=True)
        sl = spsub.add_parser("list", help=what)
        sl.add_argument("-o", "--output", choices=["text", "json"], default="text")
        sl.add_argument("--bpf-root", default=Paths.bpf_root,
                        help=field_docs(Paths)["bpf_root"].split(":", 1)[1].strip())

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
        settings = settings_from_flags(Settings, a)
        try:
            agent.run(settings)
        except DatapathError as e:
            print(f"bpflb agent: {e}", file=sys.stderr)
            return 1
        return 0

    if a.cmd == "probe":
        from .probe import missing_required, probe

        results = probe(a.cgroup_root or Paths().cgroup_root)
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

        for item in cleanup(settings_from_flags(Paths, a)):
            print(f"removed {item}")
        return 0

    if a.cmd in ("ct", "nat"):
        from .maps import conntrack

        try:
            rows = (conntrack.ct_rows if a.cmd == "ct" else conntrack.nat_rows)(a.bpf_root)
        except FileNotFoundError as e:
            print(f"bpflb: {e}", file=sys.stderr)
            return 1
        if a.output == "json":
            print(json.dumps(rows, indent=2))
        else:
            print((conntrack.format_ct if a.cmd == "ct" else conntrack.format_nat)(rows))
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
        from .inspect import format_refused, format_rows, refused_rows, service_rows

        try:
            rows = service_rows(a.bpf_root)
        except FileNotFoundError as e:
            print(f"bpflb: {e}", file=sys.stderr)
            return 1
        refused = refused_rows(a.state_dir)
        if a.output == "json":
            rows += [{"frontend": None, "service": k, "action": "refused", "limit": r.get("limit"),
                      "reason": r.get("reason"), "backends": []} for k, r in sorted(refused.items())]
            print(json.dumps(rows, indent=2))
        else:
            print(format_rows(rows) + format_refused(refused))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
