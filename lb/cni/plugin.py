"""The CNI plugin's logic (specification 1.1.0): ADD, DEL, CHECK, STATUS, GC, VERSION.

``handle(env, stdin) -> (stdout, exit code)`` is the whole protocol: it validates the environment and
the network configuration, answers in the version the configuration asks for (0.3.0 to 1.1.0), and
turns every failure into CNI error JSON with the code the specification gives it. The kernel work is
in netsetup.py, the address bookkeeping in ipam.py.

Network configuration (the plugin's entry in the conflist; the runtime adds cniVersion and name):
    {"type": "bpflb-cni",
     "podCIDR": "10.244.1.0/24",      # optional when served by the agent: it fills in its Node's spec.podCIDR
     "mtu": 1450,                      # default 1500
     "dataDir": "/var/lib/bpflb",      # IPAM reservations (ipam/<name>/) and endpoint records (endpoints/)
     "agentSocket": "/run/bpflb/cni.sock"}  # read by the launcher only
``lo`` is brought up by the plugin itself, so no separate loopback plugin is chained.

Endpoint registry: <dataDir>/endpoints/<containerID>-<ifname>.json per attachment (pod IP, host veth
name and ifindex, MACs, netns, pod name from CNI_ARGS), written after the attachment is complete and
removed on DEL/GC. The agent also mirrors each one into the lb_endpoints BPF map through ``sink``.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2 import NetlinkError

from .. import sysctl
from ..atomicfile import write_atomic
from . import netsetup
from .ipam import IPAM, Pool, PoolExhausted

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
DEFAULT_DATA_DIR = "/var/lib/bpflb"
DEFAULT_MTU = 1500
VALID_ATTACHMENTS = ("cni.dev/valid-attachments", "cni.dev/attachments")  # libcni 1.2.3+ sends both

# Error codes (SPEC.md "Error").
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
E_LIMITED_CONNECTIVITY = 51
E_CHECK_FAILED = 100  # plugin-specific: the attachment is not as ADD left it

_NAME = re.compile(r"^[a-zA-Z0-9_.\-]+$")  # SPEC.md: network name
_CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")  # SPEC.md: CNI_CONTAINERID


class EndpointSink(Protocol):
    """Where attachments are registered for the datapath (lb.maps.endpoints.PinnedEndpointMap)."""
    def added(self, ip: str, ifindex: int, mac: str) -> None: ...
    def removed(self, ip: str) -> None: ...


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _vt(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    version: str
    config: dict
    args: dict  # CNI_ARGS

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def data_dir(self) -> str:
        return self.config.get("dataDir") or DEFAULT_DATA_DIR

    @property
    def mtu(self) -> int:
        return self.config.get("mtu", DEFAULT_MTU)

    @property
    def pool(self) -> Pool | None:
        cidr = self.config.get("podCIDR")
        return Pool.of(cidr) if cidr else None

    @property
    def ipam_dir(self) -> str:
        return os.path.join(self.data_dir, "ipam", self.name)

    def record_path(self, cid: str | None = None, ifname: str | None = None) -> str:
        return os.path.join(self.data_dir, "endpoints", f"{cid or self.container_id}-{ifname or self.ifname}.json")


# ---- parsing: environment and configuration -> Request, or the spec's error --------------------------
def _config(stdin: bytes) -> dict:
    try:
        config = json.loads(stdin or b"{}")
    except ValueError as e:  # UnicodeDecodeError is one too
        raise CNIError(E_DECODE, f"network configuration is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CNIError(E_DECODE, "network configuration must be a JSON object")
    return config


def _cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS: "K=V;K2=V2" (containerd and kubelet pass K8S_POD_NAMESPACE, K8S_POD_NAME, ...)."""
    out = {}
    for pair in filter(None, raw.split(";")):
        k, eq, v = pair.partition("=")
        if not eq or not k:
            raise CNIError(E_INVALID_ENV, f"CNI_ARGS {raw!r} is not a list of KEY=VALUE pairs separated by ';'")
        out[k] = v
    return out


def _check_config(command: str, config: dict) -> None:
    for key in ("name", "type"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise CNIError(E_INVALID_CONFIG, f"network configuration field {key!r} is missing")
    if not _NAME.match(config["name"]):
        raise CNIError(E_INVALID_CONFIG, f"network name {config['name']!r} may hold only letters, digits, '_', '.' "
                                         "and '-'")
    if "ipam" in config:
        raise CNIError(E_UNSUPPORTED_FIELD, f"unsupported field ipam={json.dumps(config['ipam'])}",
                       "bpflb-cni allocates pod addresses itself, from podCIDR")
    data_dir = config.get("dataDir")
    if data_dir is not None and (not isinstance(data_dir, str) or not os.path.isabs(data_dir)):
        raise CNIError(E_INVALID_CONFIG, f"dataDir {data_dir!r} must be an absolute path")
    cidr = config.get("podCIDR")
    if cidr is not None and command != "DEL":  # DEL needs no pool: it must always work
        try:
            net = ipaddress.IPv4Network(cidr, strict=False)
            if net.num_addresses < 4:
                raise ValueError
        except (TypeError, ValueError):
            raise CNIError(E_INVALID_CONFIG, f"podCIDR {cidr!r} is not an IPv4 CIDR of /30 or larger") from None
    mtu = config.get("mtu", DEFAULT_MTU)
    if command == "ADD" and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535):
        raise CNIError(E_INVALID_CONFIG, f"mtu {mtu!r} must be an integer between 576 and 65535")


def parse(env: dict[str, str], stdin: bytes) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(E_INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}"
                       if command else "CNI_COMMAND is not set")
    config = _config(stdin)
    version = config.get("cniVersion", "")
    if command == "VERSION":
        return Request(command, "", "", "", version if isinstance(version, str) and version else LATEST, config, {})
    if version not in SUPPORTED:
        raise CNIError(E_INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported" if version else
                       "cniVersion is missing", f"supported: {', '.join(SUPPORTED)}")
    if command == "CHECK" and _vt(version) < (0, 4, 0):
        raise CNIError(E_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {version}")
    if command in ("STATUS", "GC") and _vt(version) < (1, 1, 0):
        raise CNIError(E_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, not {version}")
    cid, netns, ifname = env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""), env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        required = ["CNI_CONTAINERID", "CNI_IFNAME"] + (["CNI_NETNS"] if command != "DEL" else [])
        missing = [k for k in required if not env.get(k)]
        if missing:
            raise CNIError(E_INVALID_ENV, f"{', '.join(missing)} not set")
        if not _CONTAINER_ID.match(cid):
            raise CNIError(E_INVALID_ENV, f"CNI_CONTAINERID {cid!r} must start with a letter or digit and hold only "
                                          "letters, digits, '_', '.' and '-'")
        if len(ifname) > 15 or ifname in (".", "..") or any(c in ifname for c in "/: \t\n"):
            raise CNIError(E_INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    args = _cni_args(env.get("CNI_ARGS", ""))
    _check_config(command, config)
    return Request(command, cid, netns, ifname, version, config, args)


# ---- the commands ----------------------------------------------------------------------------------
def _result(req: Request, pool: Pool, ip: str, att: netsetup.Attachment) -> dict:
    gateway = str(pool.gateway)
    ip_entry: dict[str, Any] = {"address": f"{ip}/{pool.subnet.prefixlen}", "gateway": gateway, "interface": 1}
    host: dict[str, Any] = {"name": att.host_if, "mac": att.host_mac}
    pod: dict[str, Any] = {"name": req.ifname, "mac": att.pod_mac, "sandbox": req.netns}
    if _vt(req.version) < (1, 0, 0):
        ip_entry["version"] = "4"
    if _vt(req.version) >= (1, 1, 0):
        host["mtu"] = pod["mtu"] = att.mtu
    return {"cniVersion": req.version, "interfaces": [host, pod], "ips": [ip_entry],
            "routes": [{"dst": "0.0.0.0/0", "gw": gateway}], "dns": {}}


def _write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(doc), 0o644)


NO_POD_CIDR = "no pod CIDR yet: the configuration has no podCIDR and the agent has not seen its Node's spec.podCIDR"


def cmd_add(req: Request, sink: EndpointSink | None = None) -> dict:
    if not os.path.exists(req.netns):
        raise CNIError(E_INVALID_ENV, f"CNI_NETNS {req.netns} does not exist")
    pool = req.pool
    if pool is None:
        raise CNIError(E_TRY_AGAIN, NO_POD_CIDR)
    try:
        ipam = IPAM(req.data_dir, req.name)
        ip = ipam.allocate(pool, req.container_id, req.ifname)
    except PoolExhausted as e:
        raise CNIError(E_TRY_AGAIN, f"pod CIDR {pool.subnet} is exhausted", str(e)) from None
    except OSError as e:
        raise CNIError(E_IO, f"IPAM state under {req.ipam_dir}: {e.strerror}") from None
    host_if = netsetup.host_ifname(req.container_id, req.ifname)
    try:
        att = netsetup.attach(req.netns, req.ifname, host_if, ip, str(pool.gateway), req.mtu)
        _write_json(req.record_path(), {
            "containerID": req.container_id, "ifname": req.ifname, "netns": req.netns, "network": req.name,
            "ip": ip, "gateway": str(pool.gateway), "podCIDR": str(pool.subnet),
            "hostInterface": host_if, "hostIfindex": att.host_index, "hostMAC": att.host_mac, "podMAC": att.pod_mac,
            "podNamespace": req.args.get("K8S_POD_NAMESPACE", ""), "podName": req.args.get("K8S_POD_NAME", "")})
    except Exception as e:  # leave nothing behind: the runtime need not call DEL after a failed ADD
        _undo(req, host_if)
        if isinstance(e, netsetup.SetupError):
            raise CNIError(E_IO, str(e)) from None
        raise CNIError(E_IO, f"setting up {req.ifname} in {req.netns}: {e}") from None
    if sink is not None:
        try:
            sink.added(ip, att.host_index, att.pod_mac)
        except Exception as e:
            _undo(req, host_if)
            raise CNIError(E_IO, f"registering {ip} for the datapath: {e}") from None
    return _result(req, pool, ip, att)


def _undo(req: Request, host_if: str) -> None:
    """Best effort: the error that made ADD fail is what the runtime needs to see."""
    for step in (lambda: netsetup.detach(host_if),
                 lambda: IPAM(req.data_dir, req.name).release(req.container_id, req.ifname),
                 lambda: os.unlink(req.record_path())):
        try:
            step()
        except Exception:
            pass


def _remove(req: Request, cid: str, ifname: str, sink: EndpointSink | None = None) -> None:
    """Everything of one attachment, in the reverse order of ADD: unregistered before its device goes,
    the record last (so a DEL cut short leaves a record for the next DEL or GC to find)."""
    path = req.record_path(cid, ifname)
    if sink is not None:
        try:
            with open(path) as f:
                ip = json.load(f)["ip"]
        except (OSError, ValueError, KeyError):
            ip = None
        if ip:
            _unregister(req, sink, ip, (cid, ifname))
    host_if = netsetup.host_ifname(cid, ifname)
    try:
        netsetup.detach(host_if)
    except NetlinkError as e:
        raise CNIError(E_IO, f"removing {host_if}: {e}") from None
    if os.path.isdir(req.ipam_dir):  # no IPAM directory: nothing was ever reserved here
        try:
            IPAM(req.data_dir, req.name).release(cid, ifname)
        except OSError as e:
            raise CNIError(E_IO, f"releasing the address of {cid}/{ifname} under {req.ipam_dir}: {e.strerror}") from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unregister(req: Request, sink: EndpointSink, ip: str, attachment: tuple[str, str]) -> None:
    """Take ``ip`` out of the datapath's map, unless it already belongs to another pod: a record left by
    a DEL cut short after its address was released must not unregister the address's next owner.
    Under the IPAM lock, so no ADD takes the address between the look and the removal."""
    try:
        ipam = IPAM(req.data_dir, req.name) if os.path.isdir(req.ipam_dir) else None
        if ipam is None:
            sink.removed(ip)
            return
        with ipam.locked():
            if ipam.owner(ip) in (None, attachment):
                sink.removed(ip)
    except OSError as e:
        raise CNIError(E_IO, f"unregistering {ip} from the datapath: {e}") from None


def cmd_del(req: Request, sink: EndpointSink | None = None) -> None:
    """Idempotent: an unknown container, a gone namespace, a second DEL all succeed."""
    _remove(req, req.container_id, req.ifname, sink)


def cmd_check(req: Request, sink: EndpointSink | None = None) -> None:
    try:
        with open(req.record_path()) as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise CNIError(E_UNKNOWN_CONTAINER, f"no attachment {req.container_id}/{req.ifname} in network {req.name}") \
            from None
    except (OSError, ValueError) as e:
        raise CNIError(E_IO, f"reading the record of {req.container_id}/{req.ifname}: {e}") from None
    prev = req.config.get("prevResult")
    if isinstance(prev, dict):  # what the runtime was told on ADD must still be what we hold
        told = {str(i.get("address", "")).split("/")[0] for i in prev.get("ips") or ()}
        if rec["ip"] not in told:
            raise CNIError(E_CHECK_FAILED, f"prevResult does not list {rec['ip']}, the address of "
                                           f"{req.container_id}/{req.ifname}")
    if not os.path.isdir(req.ipam_dir) or IPAM(req.data_dir, req.name).find(req.container_id, req.ifname) != rec["ip"]:
        raise CNIError(E_CHECK_FAILED, f"the IPAM reservation of {rec['ip']} for {req.container_id}/{req.ifname} "
                                       "is missing")
    problem = netsetup.check(req.netns, req.ifname, rec["hostInterface"], rec["ip"], rec["gateway"])
    if problem:
        raise CNIError(E_CHECK_FAILED, f"CHECK failed: {problem}")


def cmd_status(req: Request, sink: EndpointSink | None = None) -> None:
    pool = req.pool
    if pool is None:
        raise CNIError(E_NOT_AVAILABLE, NO_POD_CIDR)
    try:
        ipam = IPAM(req.data_dir, req.name)
        probe = os.path.join(ipam.dir, f".status-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
        free = ipam.free(pool)
        in_use = pool.size - free
    except OSError as e:
        raise CNIError(E_NOT_AVAILABLE, f"IPAM state under {req.ipam_dir} is not writable: {e.strerror}") from None
    if in_use and not _node_forwards(str(pool.gateway)):
        raise CNIError(E_LIMITED_CONNECTIVITY, f"the node lost its pod gateway ({netsetup.HOST_DEV} with "
                                               f"{pool.gateway}, ip_forward): existing pods may be cut off")
    if free <= 0:
        raise CNIError(E_NOT_AVAILABLE, f"pod CIDR {pool.subnet} has no free address (all {pool.size} reserved)")


def _node_forwards(gateway: str) -> bool:
    from pyroute2 import IPRoute

    try:
        if sysctl.read("net/ipv4/ip_forward") != "1":
            return False
        with IPRoute() as ipr:
            host = netsetup.host_devices(ipr)
            return host is not None and gateway in {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host)}
    except OSError:
        return False


def cmd_gc(req: Request, sink: EndpointSink | None = None) -> None:
    """Remove every attachment of this network the runtime no longer lists; keep going past a failure
    and report them all at the end (SPEC.md GC). Without a list, remove nothing: an absent list is not
    an empty one."""
    key = next((k for k in VALID_ATTACHMENTS if k in req.config), None)
    if key is None:  # libcni sends none when its caller gave no list (cnitool gc): nothing is known stale
        return
    valid = req.config[key]
    if not isinstance(valid, list) or not all(isinstance(a, dict) for a in valid):
        raise CNIError(E_INVALID_CONFIG, f"GC needs {VALID_ATTACHMENTS[0]}, a list of "
                                         '{"containerID": ..., "ifname": ...}')
    keep = {(a.get("containerID"), a.get("ifname")) for a in valid}
    known = set()
    if os.path.isdir(req.ipam_dir):
        known |= {(r.container_id, r.ifname) for r in IPAM(req.data_dir, req.name).reservations()}
    edir = os.path.join(req.data_dir, "endpoints")
    for name in os.listdir(edir) if os.path.isdir(edir) else ():
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(edir, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if rec.get("network") == req.name:
            known.add((rec.get("containerID"), rec.get("ifname")))
    failed = []
    for cid, ifname in sorted(known - keep):
        try:
            _remove(req, cid, ifname, sink)
        except Exception as e:
            failed.append(f"{cid}/{ifname}: {getattr(e, 'msg', e)}")
    if failed:
        raise CNIError(E_IO, f"GC could not remove {len(failed)} stale attachment(s)", "; ".join(failed))


def handle(env: dict[str, str], stdin: bytes, sink: EndpointSink | None = None) -> tuple[bytes, int]:
    """One plugin invocation: (stdout, exit code). ``sink`` registers attachments for the datapath."""
    version = LATEST
    try:
        asked = json.loads(stdin or b"{}").get("cniVersion")
        if asked in SUPPORTED:
            version = asked  # errors too are answered in the version asked, when we speak it
    except (ValueError, AttributeError):
        pass
    try:
        req = parse(env, stdin)
        if req.command == "VERSION":  # SPEC.md: cniVersion is the one given on input
            return json.dumps({"cniVersion": req.version, "supportedVersions": list(SUPPORTED)}).encode(), 0
        if req.command == "ADD":
            return json.dumps(cmd_add(req, sink)).encode(), 0
        {"DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}[req.command](req, sink)
        return b"", 0
    except CNIError as e:
        err = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            err["details"] = e.details
        return json.dumps(err).encode(), 1
    except Exception as e:  # never a traceback on the runtime's stdout
        return json.dumps({"cniVersion": version, "code": E_IO, "msg": f"internal error: {e!r}"}).encode(), 1


def main() -> None:
    """The plugin run directly (`python -m lb.cni`, the `bpflb-cni` console script of a venv install)."""
    import sys

    out, rc = handle(dict(os.environ), sys.stdin.buffer.read())
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.exit(rc)
