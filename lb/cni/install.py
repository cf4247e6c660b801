"""Build the launcher and install it, with the conflist, where the container runtime looks.

k3s: bin /var/lib/rancher/k3s/data/current/bin, conf /var/lib/rancher/k3s/agent/etc/cni/net.d.
Both writes are atomic (temp file, then rename): a runtime never executes or reads half a file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFLIST_NAME = "05-bpflb.conflist"


def build_launcher(out: str | None = None) -> str:
    """gcc -static: the launcher must run on a node with nothing but a kernel and a runtime."""
    out = out or os.path.join(os.environ.get("BPFLB_CACHE", "/var/cache/bpflb"), "bin", "bpflb-cni")
    src = HERE / "launcher.c"
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", tmp, str(src)], check=True)
    os.replace(tmp, out)
    return out


def conflist(pod_cidr: str | None = None, mtu: int = 1450, name: str = "bpflb") -> dict:
    plugin = {"type": "bpflb-cni", "mtu": mtu}
    if pod_cidr:
        plugin["podCIDR"] = pod_cidr
    return {"cniVersion": "1.1.0", "name": name, "plugins": [plugin]}


def _atomic(path: str, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".bpflb-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(bin_dir: str, conf_dir: str, launcher: str | None = None, **conf) -> tuple[str, str]:
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(conf_dir, exist_ok=True)
    src = launcher or build_launcher()
    binary = os.path.join(bin_dir, "bpflb-cni")
    with open(src, "rb") as f:
        _atomic(binary, f.read(), 0o755)
    conf_path = os.path.join(conf_dir, CONFLIST_NAME)
    _atomic(conf_path, json.dumps(conflist(**conf), indent=2).encode(), 0o644)
    return binary, conf_path


if __name__ == "__main__":
    b, c = install(sys.argv[1], sys.argv[2])
    print(f"installed {b} and {c}")
