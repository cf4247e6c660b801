"""A real control plane on loopback for tests and `make demo-cluster`: etcd and kube-apiserver (built by
scripts/build-components.sh), with their own certificates, a static token file, RBAC on.

    with ControlPlane() as cp:
        cp.kubectl("get", "ns")
        cp.stop_apiserver(); cp.start_apiserver()     # etcd keeps running
        cp.compact()                                  # force 410 Gone on the next re-watch

The API server runs with --watch-cache=false, so a watch resumed from a compacted resourceVersion
gets 410 Gone from etcd itself: the only reliable way to force one (the watch cache's window moves
with load). Nothing here listens on anything but 127.0.0.1.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = Path(os.environ.get("BPFLB_CACHE", "/var/cache/bpflb")) / "components.env"
ADMIN_TOKEN = "bpflb-admin-token"
SERVICE_CIDR = "10.96.0.0/16"


def components() -> dict[str, str]:
    """Paths of the built binaries; builds them the first time (minutes, once per machine)."""
    if not ENV_FILE.exists():
        subprocess.run([str(ROOT / "scripts" / "build-components.sh")], check=True)
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass
class ControlPlane:
    extra_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (user, groups)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bpflb-cp-")))
    etcd: subprocess.Popen | None = None
    apiserver: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.bin = components()
        self.etcd_port, self.etcd_peer = free_port(), free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca = self.dir / "ca.crt"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.token = ADMIN_TOKEN

    # ---- lifecycle ----
    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._certs()
        tokens = [f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"']
        tokens += [f'{tok},{user},{user}-uid,"{groups}"' for tok, (user, groups) in self.extra_tokens.items()]
        (self.dir / "tokens.csv").write_text("\n".join(tokens) + "\n")
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN, "admin")
        self.etcd = subprocess.Popen(
            [self.bin["ETCD"], "--data-dir", str(self.dir / "etcd"), "--name", "bpflb-test",
             "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-cluster", f"bpflb-test=http://127.0.0.1:{self.etcd_peer}",
             "--log-level", "error", "--quota-backend-bytes", str(4 << 30)],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "etcd.log", "w"))
        self.start_apiserver()

    def start_apiserver(self, timeout: float = 90) -> None:
        log = open(self.dir / "apiserver.log", "a")
        self.apiserver = subprocess.Popen(
            [self.bin["KUBE_APISERVER"], f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
             "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--advertise-address=127.0.0.1",
             f"--tls-cert-file={self.dir / 'apiserver.crt'}", f"--tls-private-key-file={self.dir / 'apiserver.key'}",
             f"--client-ca-file={self.ca}", f"--token-auth-file={self.dir / 'tokens.csv'}",
             "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             f"--service-account-key-file={self.dir / 'sa.pub'}",
             f"--service-account-signing-key-file={self.dir / 'sa.key'}",
             f"--cert-dir={self.dir / 'certs'}", "--watch-cache=false", "--profiling=false",
             "--enable-priority-and-fairness=false", "--max-requests-inflight=2000",
             "--max-mutating-requests-inflight=1000", "--v=0"],
            stdout=log, stderr=log)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.ca))
        while time.monotonic() < deadline:
            if self.apiserver.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited: {(self.dir / 'apiserver.log').read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("kube-apiserver did not become ready")

    def stop_apiserver(self) -> None:
        if self.apiserver and self.apiserver.poll() is None:
            self.apiserver.send_signal(signal.SIGTERM)
            try:
                self.apiserver.wait(10)
            except subprocess.TimeoutExpired:
                self.apiserver.kill()
                self.apiserver.wait()

    def close(self) -> None:
        self.stop_apiserver()
        if self.etcd and self.etcd.poll() is None:
            self.etcd.kill()
            self.etcd.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers ----
    def _certs(self) -> None:
        d = self.dir
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bpflb-test-ca",
                 "-keyout", str(d / "ca.key"), "-out", str(self.ca))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver", "-keyout",
                 str(d / "apiserver.key"), "-out", str(d / "apiserver.csr"))
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc\n")
        _openssl("x509", "-req", "-in", str(d / "apiserver.csr"), "-CA", str(self.ca), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "apiserver.crt"))
        _openssl("genrsa", "-out", str(d / "sa.key"), "2048")
        _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))

    def write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.url}", certificate-authority: "{self.ca}"}}
users:
- name: {user}
  user: {{token: "{token}"}}
contexts:
- name: test
  context: {{cluster: test, user: {user}}}
current-context: test
""")
        return path

    def kubeconfig_for(self, token: str) -> Path:
        user = self.extra_tokens[token][0]
        return self.write_kubeconfig(self.dir / f"{user}.kubeconfig", token, user)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, kubeconfig: Path | None = None) -> str:
        r = subprocess.run([self.bin["KUBECTL"], f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
                           capture_output=True, text=True, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def compact(self) -> int:
        """Compact etcd to its current revision: every older resourceVersion is gone (410)."""
        ep = f"http://127.0.0.1:{self.etcd_port}"
        out = subprocess.run([self.bin["ETCDCTL"], f"--endpoints={ep}", "endpoint", "status", "-w", "json"],
                             capture_output=True, text=True, check=True).stdout
        import json

        rev = json.loads(out)[0]["Status"]["header"]["revision"]
        subprocess.run([self.bin["ETCDCTL"], f"--endpoints={ep}", "compact", str(rev)], check=True, capture_output=True)
        return rev


def main() -> int:
    with ControlPlane() as cp:
        print(f"kube-apiserver {cp.url}; KUBECONFIG={cp.kubeconfig}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
