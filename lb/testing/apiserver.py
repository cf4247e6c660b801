"""A real control plane on loopback for tests and `make demo-cluster`: etcd and kube-apiserver (built once by
scripts/build-components.sh), with their own certificates, a static token file, RBAC on, and nothing else
(no controller-manager, no scheduler: a Service gets its ClusterIP, nothing makes its EndpointSlices).

    with ControlPlane(extra_tokens={"t0k": ("alice", "devs")}) as cp:
        cp.kubectl("get", "ns")                       # admin (system:masters)
        cp.kubeconfig_for("alice")                    # a kubeconfig for another token's user (RBAC applies)
        cp.stop(); cp.start()                         # restart kube-apiserver alone: etcd keeps running
        with cp.apiserver_down(): time.sleep(30)      # cut the API server off for a while
        cp.compact()                                  # 410 Gone for every older resourceVersion

Forcing "410 Gone" / "too old resource version": the API server runs with --watch-cache=false (the
default here), so a watch or a list continued from a resourceVersion older than etcd's compaction point
gets 410 from etcd itself, at once: write, `compact()`, then watch from the old resourceVersion. No restart
or timing is involved (tests/test_apiserver_fixture.py checks it). With the watch cache on
(`watch_cache=True`, as in real clusters) a compaction changes nothing the cache already holds; there
`stop(); start()` is what does it: the new cache starts at the current revision, so a watch from any older
one gets 410 "too old resource version" (checked by hand; timing-free too).

RBAC: the admin token is in system:masters; extra_tokens' users start with no grant at all. Bind them to
roles with explicit rules: the aggregated ClusterRoles (view, edit, admin) stay empty here, since filling
them is kube-controller-manager's job.

Everything it starts dies with it: close() (the with block's end, even on an exception) kills etcd and
kube-apiserver and removes the temp dir; if the Python process itself is killed, the children get SIGKILL
from the kernel (PR_SET_PDEATHSIG) and the next ControlPlane removes the temp dir left behind. Nothing
here listens on anything but 127.0.0.1.

`python -m lb.testing.apiserver` starts one, prints the admin kubeconfig's path and waits for Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from . import pki

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = Path(os.environ.get("BPFLB_CACHE", "/var/cache/bpflb")) / "components.env"
ADMIN_TOKEN = "bpflb-admin-token"
SERVICE_CIDR = "10.96.0.0/16"
HOST = "127.0.0.1"


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
        s.bind((HOST, 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _popen(argv: list[str], log: IO) -> subprocess.Popen:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only tie the child to the main thread.
    pre = _die_with_parent if threading.current_thread() is threading.main_thread() else None
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pre)


DIR_PREFIX = "bpflb-cp-"


def _sweep_stale_dirs() -> None:
    """Remove the temp dirs of control planes whose Python process was SIGKILLed (the one thing close()
    cannot clean up; their etcd and kube-apiserver died with it)."""
    for d in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            os.kill(int((d / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass  # no owner.pid (not ours, or being made): leave it


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class ControlPlane:
    # token -> (user, groups): groups is one string, comma-separated ("" for none); a plain user name works too.
    extra_tokens: dict[str, tuple[str, str] | str] = field(default_factory=dict)
    watch_cache: bool = False          # False: 410 Gone comes straight from etcd after compact() (see above)
    apiserver_args: tuple[str, ...] = ()  # extra kube-apiserver flags, e.g. ("--default-watch-cache-size=0",)
    ready_timeout: float = 90.0

    def __post_init__(self) -> None:
        self.bin = components()
        self.dir: Path | None = None
        self.etcd: subprocess.Popen | None = None
        self.apiserver: subprocess.Popen | None = None
        self._logs: list[IO] = []
        self.etcd_port, self.etcd_peer, self.port = free_port(), free_port(), free_port()
        self.url = f"https://{HOST}:{self.port}"
        self.etcd_url = f"http://{HOST}:{self.etcd_port}"
        self.token = ADMIN_TOKEN
        self.startup_seconds: float | None = None  # first start: certificates + etcd + apiserver until /readyz
        self._users = {tok: ((v, "") if isinstance(v, str) else tuple(v)) for tok, v in self.extra_tokens.items()}

    # The paths below exist once start() has run.
    @property
    def ca(self) -> Path:
        return self._d / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self._d / "admin.kubeconfig"

    @property
    def _d(self) -> Path:
        if self.dir is None:
            raise RuntimeError("ControlPlane not started")
        return self.dir

    # ---- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout: float | None = None) -> None:
        """First call: certificates, token file, etcd and kube-apiserver. Later calls (after stop()): start
        kube-apiserver alone, on the same port, against the same etcd. Returns once /readyz says ok."""
        if self.etcd is None:
            t0 = time.monotonic()
            self._bring_up_etcd()
            self._start_apiserver(timeout)
            self.startup_seconds = time.monotonic() - t0
        else:
            self._start_apiserver(timeout)

    def stop(self) -> None:
        """Stop kube-apiserver alone (SIGTERM, then SIGKILL after 10 s); etcd and every object stay."""
        p = self.apiserver
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # the names the first tests used
    start_apiserver = start
    stop_apiserver = stop

    @contextlib.contextmanager
    def apiserver_down(self) -> Iterator[None]:
        """`with cp.apiserver_down(): ...`: the API server is unreachable inside the block (connections
        refused), back and ready after it, even if the block raises."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Kill everything this started and remove its temp dir. Safe to call more than once."""
        try:
            self.stop()
        finally:
            if self.etcd and self.etcd.poll() is None:
                self.etcd.kill()
                self.etcd.wait()
            for f in self._logs:
                f.close()
            self._logs.clear()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _log(self, name: str) -> IO:
        f = open(self._d / name, "a")
        self._logs.append(f)
        return f

    def _bring_up_etcd(self) -> None:
        _sweep_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
        self._certs()
        lines = [f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"']
        for tok, (user, groups) in self._users.items():
            lines.append(f'{tok},{user},{user}-uid' + (f',"{groups}"' if groups else ""))
        (self.dir / "tokens.csv").write_text("\n".join(lines) + "\n")
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN, "admin")
        peer = f"http://{HOST}:{self.etcd_peer}"
        self.etcd = _popen(
            [self.bin["ETCD"], "--data-dir", str(self.dir / "etcd"), "--name", "bpflb-test",
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bpflb-test={peer}",
             # throwaway data: no fsync (writes go at memory speed instead of the disk's)
             "--unsafe-no-fsync", "--log-level", "error", "--quota-backend-bytes", str(4 << 30)],
            self._log("etcd.log"))

    def _start_apiserver(self, timeout: float | None) -> None:
        if self.apiserver and self.apiserver.poll() is None:
            return
        d = self._d
        self.apiserver = _popen(
            [self.bin["KUBE_APISERVER"], f"--etcd-servers={self.etcd_url}",
             f"--bind-address={HOST}", f"--secure-port={self.port}", f"--advertise-address={HOST}",
             f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
             f"--client-ca-file={self.ca}", f"--token-auth-file={d / 'tokens.csv'}",
             "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             f"--service-account-key-file={d / 'sa.pub'}",
             f"--service-account-signing-key-file={d / 'sa.key'}",
             f"--cert-dir={d / 'certs'}", f"--watch-cache={str(self.watch_cache).lower()}", "--profiling=false",
             "--enable-priority-and-fairness=false", "--max-requests-inflight=2000",
             "--max-mutating-requests-inflight=1000", "--v=0", *self.apiserver_args],
            self._log("apiserver.log"))
        self.wait_ready(timeout or self.ready_timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.ca))
        while time.monotonic() < deadline:
            for name, p in (("kube-apiserver", self.apiserver), ("etcd", self.etcd)):
                if p is None or p.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self._logs_tail()}")
            try:
                req = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"kube-apiserver not ready after {timeout} s:\n{self._logs_tail()}")

    def _logs_tail(self) -> str:
        return "\n".join(f"--- {n} (tail) ---\n{_tail(self._d / n)}" for n in ("etcd.log", "apiserver.log"))

    # ---- certificates and kubeconfigs ------------------------------------------------------------
    def _certs(self) -> None:
        d = self._d
        ca = pki.CA.create(d, "bpflb-test-ca")
        ca.issue(d, "apiserver", "kube-apiserver", ips=["127.0.0.1", "10.96.0.1"],
                  dns=["localhost", "kubernetes.default.svc"])
        pki.service_account_keys(d)

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

    def token_for(self, user_or_token: str) -> str:
        if user_or_token in self._users:
            return user_or_token
        for tok, (user, _) in self._users.items():
            if user == user_or_token:
                return tok
        raise KeyError(f"no token for {user_or_token!r} (pass it in extra_tokens)")

    def kubeconfig_for(self, user_or_token: str) -> Path:
        """A kubeconfig authenticating as one of extra_tokens' users (named by user name or by token)."""
        tok = self.token_for(user_or_token)
        user = self._users[tok][0]
        return self.write_kubeconfig(self._d / f"{user}.kubeconfig", tok, user)

    # ---- tools ------------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, input: str | None = None, kubeconfig: Path | None = None) -> str:
        """Run the built kubectl (admin unless kubeconfig= says otherwise); returns stdout."""
        r = subprocess.run([self.bin["KUBECTL"], f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
                           capture_output=True, text=True, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def etcdctl(self, *args: str) -> str:
        return subprocess.run([self.bin["ETCDCTL"], f"--endpoints={self.etcd_url}", *args],
                              capture_output=True, text=True, check=True).stdout

    def compact(self) -> int:
        """Compact etcd to its current revision: a watch or a list continued from any older resourceVersion
        then gets 410 Gone (at once with the default watch_cache=False). Returns that revision."""
        rev = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"]
        self.etcdctl("compact", str(rev))
        return rev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lb.testing.apiserver",
                                 description="etcd + kube-apiserver on 127.0.0.1 until Ctrl-C")
    ap.add_argument("--token", action="append", default=[], metavar="USER=TOKEN",
                    help="an extra static token for USER (no groups: RBAC applies); repeatable")
    ap.add_argument("--watch-cache", action="store_true", help="run kube-apiserver with its watch cache on")
    args = ap.parse_args(argv)
    extra = {tok: user for user, _, tok in (t.partition("=") for t in args.token)}
    # SIGTERM (make, systemd, kill) ends it the same way as Ctrl-C: children killed, temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ControlPlane(extra_tokens=extra, watch_cache=args.watch_cache) as cp:
        print(f"kube-apiserver {cp.url} ready in {cp.startup_seconds:.1f} s (etcd {cp.etcd_url})", flush=True)
        for tok, (user, _) in cp._users.items():
            print(f"kubeconfig for {user}: {cp.kubeconfig_for(tok)}")
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        print(f"kubectl: {cp.bin['KUBECTL']}", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
