"""The install as shipped: manifests/, the image scripts/build-image.sh makes, and README's k3s section agree
with each other and with the agent; the agent runs with exactly the DaemonSet's capabilities, no privilege
escalation and /proc/sys read-only (as kubelet starts a non-privileged container); the image builds from
Debian's archive and PyPI alone, holds a working `bpflb`, and a real containerd imports it under the name the
DaemonSet asks for. (Applying manifests/ server-side to a real API server: tests/test_kube_agent.py.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import yaml

from conftest import BE4, NODE, PORT, ROOT, VIP4, backends_of, make_service, make_slice, wait_for, write_manifests

MANIFESTS = ROOT / "manifests"
K3S_CNI_BIN = "/var/lib/rancher/k3s/data/cni"
K3S_CNI_CONF = "/var/lib/rancher/k3s/agent/etc/cni/net.d"


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def version() -> str:
    return re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]


@pytest.fixture(scope="module")
def ds() -> dict:
    return load("daemonset.yaml")


@pytest.fixture(scope="module")
def agent_container(ds) -> dict:
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def config() -> dict:
    return load("configmap.yaml")["data"]


def env_of(container: dict, config: dict) -> dict[str, str]:
    """The container's environment as kubelet resolves it (ConfigMap keys must exist; the pod's own
    fields are left as their path)."""
    out = {}
    for e in container["env"]:
        src = e.get("valueFrom", {})
        if "configMapKeyRef" in src:
            assert src["configMapKeyRef"]["name"] == "bpflb-config"
            out[e["name"]] = config[src["configMapKeyRef"]["key"]]
        elif "fieldRef" in src:
            out[e["name"]] = src["fieldRef"]["fieldPath"]
        else:
            out[e["name"]] = e["value"]
    return out


def args_of(container: dict, config: dict) -> dict[str, str]:
    env = env_of(container, config)
    args = {}
    for a in container["args"][1:]:
        k, _, v = a.partition("=")
        args[k] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], v)
    return args


# ---- the DaemonSet, read as kubelet reads it ---------------------------------------------------------

def test_probes_use_livez_on_the_health_port(agent_container, config):
    """/livez for liveness and readiness: /healthz also fails while the node is being deleted (for external
    load balancers), which would restart a healthy agent or stall a rollout on a draining node."""
    port = int(config["healthz-bind-address"].rsplit(":", 1)[1])
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent_container[kind]["httpGet"] == {"host": "127.0.0.1", "path": "/livez", "port": port}, kind


def test_metrics_on_loopback_as_the_agent_default_and_kube_proxy(agent_container, config):
    from lb.settings import Settings

    args = args_of(agent_container, config)
    assert args["--metrics-bind-address"] == Settings.__dataclass_fields__["metrics_bind"].default == "127.0.0.1:10249"
    assert args["--healthz-bind-address"] == "0.0.0.0:10256"  # kube-proxy's: external load balancers check it


def test_api_server_is_k3s_local_endpoint_from_the_configmap(agent_container, config):
    env = env_of(agent_container, config)
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6444")
    assert (config["api-server-host"], config["api-server-port"]) == ("127.0.0.1", "6444")


def test_cni_dirs_are_k3s_stable_paths_and_the_args_name_their_mounts(ds, agent_container, config):
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in agent_container["volumeMounts"]}
    args = args_of(agent_container, config)
    for flag, host in (("--cni-bin-dir", K3S_CNI_BIN), ("--cni-conf-dir", K3S_CNI_CONF)):
        assert volumes[mounts[args[flag]]]["hostPath"]["path"] == host, flag
    assert "current" not in json.dumps(volumes)  # data/current/bin goes stale at the next k3s upgrade
    # every host path the agent is told about is a mount, not the container's own filesystem
    for flag in ("--cgroup-root", "--bpf-root", "--cni-socket", "--cni-bin-dir", "--cni-conf-dir"):
        assert any(args[flag] == p or args[flag].startswith(p.rstrip("/") + "/") for p in mounts), flag


def test_not_privileged_and_apparmor_unconfined_as_cilium(ds, agent_container):
    sc = agent_container["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    # the annotation says the same (API servers >= 1.30 refuse a mismatch; older kubelets read only it)
    assert ds["spec"]["template"]["metadata"]["annotations"] == {
        "container.apparmor.security.beta.kubernetes.io/agent": "unconfined"}
    assert sc["capabilities"]["drop"] == ["ALL"]
    # each capability says why, on its own line
    text = (MANIFESTS / "daemonset.yaml").read_text()
    for cap in sc["capabilities"]["add"]:
        assert re.search(rf"^\s+- {cap}\s+# \S", text, re.M), cap


def test_image_reference_is_one_name_everywhere(agent_container):
    image = f"localhost/bpflb:{version()}"
    assert agent_container["image"] == image
    assert 'IMAGE=${BPFLB_IMAGE:-localhost/bpflb:$VERSION}' in (ROOT / "scripts/build-image.sh").read_text()
    readme = (ROOT / "README.md").read_text()
    k3s = readme[readme.index("## On k3s"):readme.index("\n## ", readme.index("## On k3s") + 1)]
    assert image in k3s and f"k3s ctr images import build/bpflb-{version()}.tar" in k3s
    assert "images:" not in load("kustomization.yaml")  # no rewrite to a registry nobody can reach


# ---- the agent as the DaemonSet runs it ---------------------------------------------------------------

def capeff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("CapEff:")), 16)


def test_the_agent_runs_with_the_daemonsets_capabilities_and_read_only_proc_sys(bed, tmp_path, agent_container):
    """uid 0 with only the capabilities the DaemonSet adds, no_new_privs (allowPrivilegeEscalation: false),
    /proc/sys read-only: the agent loads, attaches, programs a Service, and answers /livez."""
    import urllib.request

    from lb.testing.apiserver import free_port

    caps = [c.lower() for c in agent_container["securityContext"]["capabilities"]["add"]]
    folder = tmp_path / "manifests"
    folder.mkdir()
    write_manifests(folder, "svc.json", [make_service("demo", "web"), make_slice("demo", "web-1", "web", BE4[:2])])
    hp = free_port()
    wrap = ("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
            f"exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,{','.join('+' + c for c in caps)} "
            '-- "$@"')
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrap, "sh",
         sys.executable, "-m", "lb.cli", "agent", "--manifests", str(folder), "--node-name", NODE,
         "--cgroup-root", bed.cgroup, "--bpf-root", bed.bpf_root, "--healthz-bind-address", f"127.0.0.1:{hp}",
         "--metrics-bind-address", "127.0.0.1:0", "--network-mode", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(l.rstrip() for l in proc.stderr), daemon=True).start()
    try:
        def synced():
            if proc.poll() is not None:
                raise AssertionError(f"agent exited ({proc.returncode}):\n" + "\n".join(lines))
            return any("initial sync complete" in l for l in lines)
        wait_for(synced, 60, "initial sync under the DaemonSet's capabilities")
        assert backends_of(bed, f"{VIP4}:80/TCP") == {f"{ip}:{PORT}" for ip in BE4[:2]}
        with urllib.request.urlopen(f"http://127.0.0.1:{hp}/livez", timeout=5) as r:
            assert r.status == 200
        # the restriction took effect: the agent (sh exec'd setpriv, setpriv exec'd python) holds these alone
        # (less any this machine's own bounding set lacks: SYS_RESOURCE here, not needed on kernels >= 5.11)
        want = 0
        for c in caps:
            want |= 1 << {"dac_override": 1, "net_admin": 12, "sys_ptrace": 19, "sys_admin": 21, "sys_resource": 24,
                          "perfmon": 38, "bpf": 39}[c]
        assert capeff(proc.pid) == want & capeff(os.getpid())
        with open(f"/proc/{proc.pid}/status") as f:
            assert "NoNewPrivs:\t1" in f.read()
        assert not [l for l in lines if "Read-only file system" in l or "EROFS" in l]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the image ------------------------------------------------------------------------------------------

def oci_blob(layout: tarfile.TarFile, digest: str) -> bytes:
    return layout.extractfile("./blobs/" + digest.replace(":", "/")).read()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """scripts/build-image.sh, once for this module: (archive path, seconds it took)."""
    if not all(shutil.which(t) for t in ("mmdebstrap", "buildah")):
        pytest.fail("scripts/build-image.sh needs mmdebstrap and buildah: apt-get install mmdebstrap buildah")
    out = tmp_path_factory.mktemp("image") / "bpflb.tar"
    t = time.monotonic()
    r = subprocess.run(["sh", str(ROOT / "scripts/build-image.sh"), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, time.monotonic() - t


def test_image_has_the_entrypoint_bpflb_lb_and_bcc(image, tmp_path, agent_container):
    path, seconds = image
    print(f"image: {path.stat().st_size / 2**20:.0f} MiB archive, built in {seconds:.0f} s")
    with tarfile.open(path) as layout:
        (m,) = json.loads(layout.extractfile("./index.json").read())["manifests"]
        assert m["annotations"]["io.containerd.image.name"] == agent_container["image"]
        manifest = json.loads(oci_blob(layout, m["digest"]))
        config = json.loads(oci_blob(layout, manifest["config"]["digest"]))["config"]
        assert config["Entrypoint"] == ["/opt/bpflb/bin/bpflb"] == agent_container["command"]
        env = dict(e.split("=", 1) for e in config["Env"])
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        for layer in manifest["layers"]:
            blob = tmp_path / "layer.tar"
            blob.write_bytes(oci_blob(layout, layer["digest"]))
            subprocess.run(["tar", "-xpf", str(blob), "-C", str(rootfs)], check=True)
            blob.unlink()
    for p in (env["BPFLB_BPF_DIR"] + "/lb_structs.h", env["BPFLB_CNI_LAUNCHER"], "opt/bpflb/bin/bpflb"):
        assert (rootfs / p.lstrip("/")).exists(), p
    run = ["chroot", str(rootfs), "env", "-i", *(f"{k}={v}" for k, v in env.items())]
    r = subprocess.run([*run, "/opt/bpflb/bin/python", "-c",
                        "import lb.agent, lb.cli, lb.source.kube, lb.cni.server, bcc, pyroute2, kubernetes, msgspec, "
                        "prometheus_client, uvloop, yaml; print(bcc.__file__)"], capture_output=True, text=True)
    assert r.returncode == 0 and "dist-packages/bcc" in r.stdout, r.stderr  # Debian's bcc, through the venv
    r = subprocess.run([*run, "/opt/bpflb/bin/bpflb", "agent", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--cni-bin-dir" in r.stdout, r.stderr
    # static: it runs in the image as on a bare node, and answers in CNI's error format
    r = subprocess.run([*run, env["BPFLB_CNI_LAUNCHER"]], capture_output=True, text=True, input="")
    assert r.returncode == 1 and json.loads(r.stdout)["msg"].startswith("bpflb agent not reachable"), r.stdout + r.stderr


def test_containerd_imports_the_archive_under_the_daemonsets_image_name(image, tmp_path, agent_container):
    """`k3s ctr images import` is containerd's `ctr images import`: run Debian's containerd on a private
    socket and root, import the archive into the k8s.io namespace, and find it by the DaemonSet's name."""
    if not shutil.which("containerd"):
        pytest.fail("needs containerd (apt-get install containerd)")
    path, _ = image
    sock = tmp_path / "containerd.sock"
    conf = tmp_path / "config.toml"
    conf.write_text(f'version = 2\nroot = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n'
                    f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\naddress = "{sock}"\n')
    d = subprocess.Popen(["containerd", "--config", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 20, "containerd socket")
        ctr = ["ctr", "--address", str(sock), "--namespace", "k8s.io"]
        r = subprocess.run([*ctr, "images", "import", "--snapshotter", "native", str(path)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        names = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
        assert names == [agent_container["image"]]
    finally:
        d.terminate()
        d.wait(timeout=20)
