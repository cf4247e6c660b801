"""The node's images (scripts/build-node-images.sh) in a real containerd: a throwaway containerd of this
test's own (root, state and socket in a temporary directory) imports the OCI archives, lists them under the
exact upstream names the kubelet asks for, and runs them with `ctr run`, each container in a new network
namespace of its own (no --net-host). `make test` builds the images before the tests (minutes, once);
select or deselect with `-m node`."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.node

CACHE = Path(os.environ.get("BPFLB_CACHE", "/var/cache/bpflb"))
IMAGES_ENV = CACHE / "images.env"
if not IMAGES_ENV.exists():  # `make test` builds them first; a bare pytest run builds them here (minutes)
    subprocess.run([str(Path(__file__).resolve().parents[1] / "scripts" / "build-node-images.sh")], check=True)
IMAGES = dict(line.split("=", 1) for line in IMAGES_ENV.read_text().splitlines() if "=" in line)
NAMES = ("PAUSE", "AGNHOST", "COREDNS", "NGINX")


class Ctr:
    """`ctr` against one containerd, namespace k8s.io (where the kubelet's images live)."""

    def __init__(self, address: str, cgroup_parent: str) -> None:
        self.address = address
        self.cgroup_parent = cgroup_parent

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", self.address, "-n", "k8s.io", *args], capture_output=True,
                              text=True, check=check, timeout=timeout)

    def run(self, image: str, *cmd: str, detach: bool = False, opts: tuple[str, ...] = ()) -> tuple[str, subprocess.CompletedProcess]:
        """ctr run (--rm unless detached: stop() removes those); the container's cgroup under this test's own
        parent."""
        cid = f"t-{uuid.uuid4().hex[:10]}"
        args = ["run", "-d" if detach else "--rm", "--cgroup", f"{self.cgroup_parent}/{cid}", *opts]
        return cid, self(*args, image, cid, *cmd, check=False)

    def task_pid(self, cid: str) -> int:
        for line in self("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields[0] == cid and fields[2] == "RUNNING":
                return int(fields[1])
        raise AssertionError(f"task {cid} not running: {self('tasks', 'ls').stdout}")

    def stop(self, cid: str) -> None:
        self("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for _ in range(100):
            if self("tasks", "delete", cid, check=False).returncode == 0 or cid not in self("tasks", "ls").stdout:
                break
            time.sleep(0.1)
        self("containers", "delete", cid, check=False)


@pytest.fixture(scope="module")
def ctr() -> Iterator[Ctr]:
    work = Path(tempfile.mkdtemp(prefix="bpflb-ctrd-", dir="/var/tmp"))
    sock = work / "containerd.sock"
    # No CRI plugin: this containerd only stores and runs what ctr asks for.
    (work / "config.toml").write_text(f'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                                      f'[grpc]\n  address = "{sock}"\n')
    cgroup_parent = f"/bpflb-test-images-{os.getpid()}"
    log = open(work / "containerd.log", "w")
    proc = subprocess.Popen(["containerd", "-c", str(work / "config.toml"), "--root", str(work / "root"),
                             "--state", str(work / "state"), "--address", str(sock)], stdout=log, stderr=log)
    c = Ctr(str(sock), cgroup_parent)
    try:
        deadline = time.monotonic() + 20
        while c("version", check=False).returncode != 0:
            assert proc.poll() is None, (work / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not answer"
            time.sleep(0.1)
        yield c
    finally:
        for line in c("tasks", "ls", check=False).stdout.splitlines()[1:]:
            c.stop(line.split()[0])
        for cid in c("containers", "ls", "-q", check=False).stdout.split():
            c("containers", "delete", cid, check=False)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            if str(work) in line.split()[1]:
                subprocess.run(["umount", "-l", line.split()[1]], check=False)
        shutil.rmtree(work, ignore_errors=True)
        # runc makes the parent in every hierarchy: on a hybrid host each v1 controller's and unified/
        root = Path("/sys/fs/cgroup")
        for base in [root] + [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]:
            cg = base / cgroup_parent.lstrip("/")
            if cg.is_dir():
                for sub in sorted(cg.rglob("*"), key=lambda x: -len(x.parts)):
                    if sub.is_dir():
                        sub.rmdir()
                cg.rmdir()


@pytest.fixture(scope="module")
def imported(ctr: Ctr) -> Ctr:
    for name in NAMES:
        ctr("images", "import", IMAGES[f"{name}_TAR"], timeout=300)
    return ctr


def test_archives_import_under_the_upstream_names(imported: Ctr) -> None:
    listed = set(imported("images", "ls", "-q").stdout.split())
    for name in NAMES:
        assert IMAGES[f"{name}_IMAGE"] in listed, (name, listed)
    assert IMAGES["PAUSE_IMAGE"] == "registry.k8s.io/pause:3.10.1"
    assert IMAGES["AGNHOST_IMAGE"] == "registry.k8s.io/e2e-test-images/agnhost:2.56"
    assert IMAGES["COREDNS_IMAGE"] == "registry.k8s.io/coredns/coredns:v1.12.1"


def test_pause_runs_as_65535_and_exits_0_on_sigterm(imported: Ctr) -> None:
    _, r = imported.run(IMAGES["PAUSE_IMAGE"], "/pause", "-v")
    assert r.returncode == 0 and "v3.10.1" in r.stdout + r.stderr, r
    # The image's own entrypoint and user, attached: `ctr run` exits with the task's status.
    cid = f"t-{uuid.uuid4().hex[:10]}"
    proc = subprocess.Popen(["ctr", "--address", imported.address, "-n", "k8s.io", "run", "--rm", "--cgroup",
                             f"{imported.cgroup_parent}/{cid}", IMAGES["PAUSE_IMAGE"], cid],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(100):
            if f"{cid} " in imported("tasks", "ls").stdout:
                break
            time.sleep(0.1)
        pid = imported.task_pid(cid)
        uid = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid == "65535"
        imported("tasks", "kill", "-s", "SIGTERM", cid)
        assert proc.wait(20) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            imported.stop(cid)
            proc.wait(20)


def test_agnhost_has_the_tools_the_e2e_tests_exec(imported: Ctr) -> None:
    image = IMAGES["AGNHOST_IMAGE"]
    _, r = imported.run(image, "/agnhost", "netexec", "--help")
    assert r.returncode == 0 and "--http-port" in r.stdout, r
    _, r = imported.run(image, "/agnhost-2", "--help")
    assert r.returncode == 0, r
    tools = "sh bash curl nc wget dig nslookup ip ss iperf timeout dd hostname"
    _, r = imported.run(image, "sh", "-c", f"for t in {tools}; do command -v $t || exit 1; done; ls /usr/local/bin/iperf")
    assert r.returncode == 0, r
    _, r = imported.run(image, "sh", "-c", "id user-defined-in-image; test -d /uploads; ls /localhost.crt /localhost.key /coredns")
    assert r.returncode == 0 and "uid=1000" in r.stdout and "50000(group-defined-in-image)" in r.stdout, r


def test_agnhost_netexec_answers_inside_its_own_netns(imported: Ctr) -> None:
    # netexec in the background, then curl and nc in the same container: the container's own loopback.
    script = ("/agnhost netexec --http-port 8080 --udp-port 8081 & "
              "for i in $(seq 50); do curl -s -m 1 http://127.0.0.1:8080/hostname && break; sleep 0.2; done; echo; "
              "echo hostName | nc -u -w 2 127.0.0.1 8081; echo; "
              "ip -o link show | grep -c ': '")
    _, r = imported.run(IMAGES["AGNHOST_IMAGE"], "sh", "-c", script)
    assert r.returncode == 0, r
    lines = r.stdout.split()
    hostname = lines[0]
    assert lines[1] == hostname, r.stdout       # the UDP echo of hostName names the same host
    assert lines[2] == "1", r.stdout            # a network namespace of its own: only lo


def test_coredns_binds_53_as_nonroot_and_answers(imported: Ctr, tmp_path: Path) -> None:
    conf = tmp_path / "coredns"
    conf.mkdir()
    (conf / "Corefile").write_text(".:53 {\n    errors\n    hosts {\n        10.0.0.53 probe.bpflb.test\n    }\n}\n")
    conf.chmod(0o755)
    (conf / "Corefile").chmod(0o644)
    cid, r = imported.run(IMAGES["COREDNS_IMAGE"], "/coredns", "-conf", "/etc/coredns/Corefile", detach=True,
                          opts=("--mount", f"type=bind,src={conf},dst=/etc/coredns,options=rbind:ro"))
    assert r.returncode == 0, r
    try:
        pid = imported.task_pid(cid)
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Uid:\t65532" in status, status
        # dig from an agnhost container joined to CoreDNS's network namespace.
        _, r = imported.run(IMAGES["AGNHOST_IMAGE"], "sh", "-c",
                            "for i in $(seq 50); do dig +short +time=1 +tries=1 @127.0.0.1 probe.bpflb.test "
                            "| grep . && exit 0; sleep 0.2; done; exit 1",
                            opts=("--with-ns", f"network:/proc/{pid}/ns/net"))
        assert r.returncode == 0 and r.stdout.split()[-1] == "10.0.0.53", r
    finally:
        imported.stop(cid)
    _, r = imported.run(IMAGES["COREDNS_IMAGE"], "/coredns", "-plugins")
    plugins = set(r.stdout.split())
    assert {"kubernetes", "cache", "health", "ready", "hosts"} <= plugins and "forward" not in plugins, r


def test_nginx_serves_port_80(imported: Ctr) -> None:
    cid, r = imported.run(IMAGES["NGINX_IMAGE"], detach=True)
    assert r.returncode == 0, r
    try:
        pid = imported.task_pid(cid)
        _, r = imported.run(IMAGES["AGNHOST_IMAGE"], "sh", "-c",
                            "for i in $(seq 50); do curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/ "
                            "&& exit 0; sleep 0.2; done; exit 1",
                            opts=("--with-ns", f"network:/proc/{pid}/ns/net"))
        assert r.returncode == 0 and r.stdout == "200", r
    finally:
        imported.stop(cid)
