"""Build the launcher and install it, with the conflist, where the container runtime looks.

k3s: bin /var/lib/rancher/k3s/data/cni, conf /var/lib/rancher/k3s/agent/etc/cni/net.d.
Both writes are atomic (lb/atomicfile.py): a runtime never executes or reads half a file, and a
running launcher keeps its old inode. The agent writes the launcher first and the conflist only once
its socket listens (lb/cni/server.py), with ``agentSocket`` naming that socket.

The conflist (template: conflist.json) holds one plugin. No `loopback` entry: the plugin brings `lo`
up in the pod namespace itself. No `portmap`: hostPort is not offered, and a chained plugin missing
from the node's bin directory would fail every ADD. `cniVersion` 1.0.0 with `cniVersions` [1.0.0,
1.1.0]: libcni 1.2+ (containerd 2) picks 1.1.0 (STATUS, GC), older runtimes read 1.0.0 and still
work; a bare "1.1.0" would make libcni 1.1 (containerd 1.7) reject every result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..atomicfile import write_atomic
from ..settings import CNI_SOCKET_DEFAULT

HERE = Path(__file__).resolve().parent
CONFLIST_NAME = "05-bpflb.conflist"


def build_launcher(out: str | None = None) -> str:
    """gcc -static: the launcher must run on a node with nothing but a kernel and a runtime."""
    out = out or os.path.join(os.environ.get("BPFLB_CACHE", "/var/cache/bpflb"), "bin", "bpflb-cni")
    src = HERE / "launcher.c"
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory() as build:
        binary = os.path.join(build, "bpflb-cni")
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", f'-DDEFAULT_SOCKET="{CNI_SOCKET_DEFAULT}"',
                        "-o", binary, str(src)], check=True)
        with open(binary, "rb") as f:
            write_atomic(out, f.read(), 0o755)
    return out


def conflist(pod_cidr: str | None = None, mtu: int | None = None, name: str | None = None,
             data_dir: str | None = None, socket: str | None = None, pod_cidrs: list[str] | None = None) -> dict:
    """The template with this node's settings; a setting left None keeps the template's (or is absent).
    ``pod_cidrs``: a Node's spec.podCIDRs (one range per family: a dual-stack node's pods get an address
    of each); ``pod_cidr``: the older single IPv4 range. The agent writes neither: it fills in its
    Node's ranges on each request (lb/cni/server.py)."""
    with open(HERE / "conflist.json") as f:
        doc = json.load(f)
    plugin = doc["plugins"][0]
    for key, value in (("podCIDR", pod_cidr), ("podCIDRs", list(pod_cidrs) if pod_cidrs else None), ("mtu", mtu),
                       ("dataDir", data_dir), ("agentSocket", socket)):
        if value is not None:
            plugin[key] = value
    if name is not None:
        doc["name"] = name
    return doc


def install_launcher(bin_dir: str, launcher: str | None = None) -> str:
    """Copy the launcher to <bin_dir>/bpflb-cni; returns its path."""
    os.makedirs(bin_dir, exist_ok=True)
    binary = os.path.join(bin_dir, "bpflb-cni")
    with open(launcher or build_launcher(), "rb") as f:
        write_atomic(binary, f.read(), 0o755)
    return binary


def install_conflist(conf_dir: str, **conf) -> str:
    """Write <conf_dir>/05-bpflb.conflist; ``conf`` goes to ``conflist()``. Returns its path."""
    os.makedirs(conf_dir, exist_ok=True)
    conf_path = os.path.join(conf_dir, CONFLIST_NAME)
    write_atomic(conf_path, json.dumps(conflist(**conf), indent=2), 0o644)
    return conf_path


def install(bin_dir: str, conf_dir: str, launcher: str | None = None, **conf) -> tuple[str, str]:
    """Both, launcher first (tests, and an install without the agent). Returns both paths."""
    return install_launcher(bin_dir, launcher), install_conflist(conf_dir, **conf)


if __name__ == "__main__":
    b, c = install(sys.argv[1], sys.argv[2])
    print(f"installed {b} and {c}")
