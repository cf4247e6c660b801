"""The CNI plugin's logic (specification 1.1.0): ADD, DEL, CHECK, STATUS, GC, VERSION.

``handle(env, stdin) -> (stdout, exit code)`` is the whole protocol: it validates the environment and
the network configuration, answers in the version the configuration asks for (0.3.0 to 1.1.0), and
turns every failure into CNI error JSON with the code the specification gives it. The kernel work is
in netsetup.py, the address bookkeeping in ipam.py.

Network configuration (the plugin's entry in the conflist; the runtime adds cniVersion and name):
    {"type": "bpflb-cni",
     "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"],  # optional when served by the agent: it fills in
                                       # its Node's spec.podCIDRs; one range per family, either order
     "podCIDR": "10.244.1.0/24",      # the older single-range form (IPv4); podCIDRs[0] if both are given
     "mtu": 1450,                      # default 1500
     "dataDir": "/var/lib/bpflb",      # IPAM reservations (ipam/<name>/) and endpoint records (endpoints/)
     "agentSocket": "/run/bpflb/cni.sock"}  # read by the launcher only
``lo`` is brought up by the plugin itself, so no separate loopback plugin is chained.

Dual stack: a pod gets one address per configured range (host-local style, both under the IPAM lock; if
the second allocation fails the first is given back, so nothing leaks), both on eth0, with a default
route per family (netsetup.py); the result lists both, each with the pod interface's index. CHECK checks
both, DEL releases both, and both are registered for the datapath. A node with one range behaves as
before.

Endpoint registry: <dataDir>/endpoints/<containerID>:<ifname>.json per attachment (pod IP, host veth
name and ifindex, MACs, netns, pod name from CNI_ARGS), written after the attachment is complete and
removed on DEL/GC. ':' is in neither a container ID nor an interface name (both validated as SPEC.md
says), so two attachments never share a name; records of the older "<id>-<ifname>.json" form are
still found by their content. The agent also mirrors each one into the lb_endpoints BPF map through
``sink``.

One lock per attachment (<dataDir>/locks/<containerID>:<ifname>.lock, flock) serialises ADD, DEL and
CHECK of it, across threads and processes; GC skips an attachment whose lock is held (an ADD in
progress) and one whose ADD finished after the GC request arrived.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2 import NetlinkError

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

# SPEC.md: a network name and CNI_CONTAINERID "must start with an alphanumeric character, optionally
# followed by any combination of one or more alphanumeric characters, underscore, dot or hyphen";
# matched against the whole string (fullmatch: `$` would let a trailing newline through).
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_CONTAINER_ID = _NAME
IFNAMSIZ = 16  # the kernel's limit, with the NUL: names of at most 15 bytes
MAX_CONTAINER_ID = 200  # bytes; names a file with the interface name: "<id>:<ifname>.json" fits NAME_MAX
MAX_NETWORK_NAME = 200  # bytes; names a directory


def ifname_problem(ifname: str) -> str | None:
    """Why ``ifname`` is not an interface name (libcni's ValidateInterfaceName, the kernel's
    dev_valid_name), or None."""
    try:
        size = len(ifname.encode())
    except UnicodeEncodeError:
        return "is not UTF-8"
    if size >= IFNAMSIZ:
        return f"is {size} bytes long, over the limit of {IFNAMSIZ - 1}"
    if ifname in (".", ".."):
        return "may not be '.' or '..'"
    if any(c in "/:\0" or c.isspace() for c in ifname):
        return "may not hold '/', ':', NUL or whitespace"
    return None


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
    def pools(self) -> list[Pool]:
        """One per configured range, in the configuration's order (empty: no pod CIDR yet)."""
        return [Pool.of(c) for c in pod_cidrs(self.config)]

    @property
    def ipam_dir(self) -> str:
        return os.path.join(self.data_dir, "ipam", self.name)

    def record_path(self, cid: str | None = None, ifname: str | None = None) -> str:
        cid, ifname = (self.container_id, self.ifname) if cid is None else (cid, ifname)
        return os.path.join(self.data_dir, "endpoints", f"{attachment_key(cid, ifname)}.json")

    def legacy_record_path(self, cid: str, ifname: str) -> str:
        """Where versions before the ':' naming kept the record (ambiguous: read its content)."""
        return os.path.join(self.data_dir, "endpoints", f"{cid}-{ifname}.json")


def attachment_key(cid: str, ifname: str) -> str:
    """A file name for one attachment, unique: a container ID holds no ':'."""
    return f"{cid}:{ifname}"


def key_of(name: str) -> tuple[str, str] | None:
    """(containerID, ifname) from "<id>:<ifname>.json", or None for any other name."""
    if not name.endswith(".json") or ":" not in name:
        return None
    cid, _, ifname = name[:-5].partition(":")
    return (cid, ifname) if _CONTAINER_ID.fullmatch(cid) and ifname_problem(ifname) is None else None


class Busy(Exception):
    """The attachment's lock is held (GC's non-blocking attempt)."""


class Held:
    """What the holder of an attachment's lock decides: ``remove`` (the attachment is gone) takes
    the lock file away when the block ends, while still held."""
    def __init__(self, remove: bool):
        self.remove = remove


@contextmanager
def attachment_lock(data_dir: str, cid: str, ifname: str, wait: bool = True, remove: bool = False):
    """Hold the attachment's lock file; yields a Held (``remove`` its initial decision). A waiter
    that gets the lock on a file removed meanwhile sees that the path no longer names its file and
    takes the lock again on the new one."""
    path = os.path.join(data_dir, "locks", f"{attachment_key(cid, ifname)}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(f"{cid}/{ifname}") from None
            try:
                st, now = os.fstat(fd), os.stat(path)
                current = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    held = Held(remove)
    try:
        yield held
    finally:
        if held.remove:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(fd)


# ---- parsing: environment and configuration -> Request, or the spec's error --------------------------
def pod_cidrs(config: dict) -> list[str]:
    """The configured ranges: podCIDRs if given, else podCIDR (validated by _check_pod_cidrs)."""
    if config.get("podCIDRs"):
        return list(config["podCIDRs"])
    return [config["podCIDR"]] if config.get("podCIDR") else []


def _range(field: str, cidr: object, versions: tuple[int, ...]) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    families = " or ".join(f"IPv{v}" for v in versions)
    try:
        net = ipaddress.ip_network(cidr, strict=False)  # type: ignore[arg-type]
        if net.version not in versions or net.num_addresses < 4:
            raise ValueError
    except (TypeError, ValueError):
        size = "/30" if versions == (4,) else "/30 (IPv4) or /126 (IPv6)"
        raise CNIError(E_INVALID_CONFIG, f"{field} {cidr!r} is not an {families} CIDR of {size} or larger") from None
    return net


def _check_pod_cidrs(config: dict) -> None:
    cidr = config.get("podCIDR")
    if cidr is not None:
        _range("podCIDR", cidr, (4,))
    cidrs = config.get("podCIDRs")
    if cidrs is None:
        return
    if not isinstance(cidrs, list) or not 1 <= len(cidrs) <= 2:
        raise CNIError(E_INVALID_CONFIG, f"podCIDRs {json.dumps(cidrs)[:200]} must be a list of one or two CIDRs, "
                                         "at most one per family (a Node's spec.podCIDRs)")
    nets = [_range(f"podCIDRs[{i}]", c, (4, 6)) for i, c in enumerate(cidrs)]
    if len(nets) == 2 and nets[0].version == nets[1].version:
        raise CNIError(E_INVALID_CONFIG, f"podCIDRs {cidrs} holds two IPv{nets[0].version} ranges: at most one "
                                         "per family")
    if cidr is not None and cidr != cidrs[0]:
        raise CNIError(E_INVALID_CONFIG, f"podCIDR {cidr!r} is not podCIDRs[0] {cidrs[0]!r} (as on a Node, the "
                                         "two must agree)")


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
    if not _NAME.fullmatch(config["name"]) or len(config["name"]) > MAX_NETWORK_NAME:
        raise CNIError(E_INVALID_CONFIG, f"network name {config['name']!r} must start with a letter or digit, hold "
                                         f"only letters, digits, '_', '.' and '-', and be at most {MAX_NETWORK_NAME} "
                                         "bytes long")
    if "ipam" in config:
        raise CNIError(E_UNSUPPORTED_FIELD, f"unsupported field ipam={json.dumps(config['ipam'])}",
                       "bpflb-cni allocates pod addresses itself, from podCIDR")
    data_dir = config.get("dataDir")
    if data_dir is not None and (not isinstance(data_dir, str) or not os.path.isabs(data_dir) or "\0" in data_dir):
        raise CNIError(E_INVALID_CONFIG, f"dataDir {data_dir!r} must be an absolute path")
    prev = config.get("prevResult")
    if command == "CHECK" and prev is not None and not (
            isinstance(prev, dict) and isinstance(prev.get("ips", []), list)
            and all(isinstance(i, dict) and isinstance(i.get("address", ""), str) for i in prev.get("ips", []))):
        raise CNIError(E_INVALID_CONFIG, "prevResult must be a result object whose ips are "
                                         '[{"address": "<ip>/<prefix>", ...}]')
    if command != "DEL":  # DEL needs no pool: it must always work
        _check_pod_cidrs(config)
    mtu = config.get("mtu", DEFAULT_MTU)
    if command == "ADD" and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535):
        raise CNIError(E_INVALID_CONFIG, f"mtu {mtu!r} must be an integer between 576 and 65535")


def parse(env: dict[str, str], stdin: bytes) -> Request:
    """The request, or CNIError with the specification's code and a message naming the field."""
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
        if not _CONTAINER_ID.fullmatch(cid):
            raise CNIError(E_INVALID_ENV, f"CNI_CONTAINERID {cid!r} must start with a letter or digit and hold only "
                                          "letters, digits, '_', '.' and '-'")
        if len(cid) > MAX_CONTAINER_ID:
            raise CNIError(E_INVALID_ENV, f"CNI_CONTAINERID is {len(cid)} bytes long, over the limit of "
                                          f"{MAX_CONTAINER_ID}")
        problem = ifname_problem(ifname)
        if problem:
            raise CNIError(E_INVALID_ENV, f"CNI_IFNAME {ifname!r} {problem}")
        if command != "DEL" and "\0" in netns:
            raise CNIError(E_INVALID_ENV, f"CNI_NETNS {netns!r} holds a NUL")
    args = _cni_args(env.get("CNI_ARGS", ""))
    _check_config(command, config)
    return Request(command, cid, netns, ifname, version, config, args)


# ---- the commands ----------------------------------------------------------------------------------
def _result(req: Request, given: list[tuple[Pool, str]], att: netsetup.Attachment) -> dict:
    """Every address with its interface (1: the pod's eth0, ``interfaces[1]``) and a default route per family."""
    ips, routes = [], []
    for pool, ip in given:
        gateway = str(pool.gateway)
        entry: dict[str, Any] = {"address": f"{ip}/{pool.subnet.prefixlen}", "gateway": gateway, "interface": 1}
        if _vt(req.version) < (1, 0, 0):
            entry["version"] = str(pool.version)
        ips.append(entry)
        routes.append({"dst": "0.0.0.0/0" if pool.version == 4 else "::/0", "gw": gateway})
    host: dict[str, Any] = {"name": att.host_if, "mac": att.host_mac}
    pod: dict[str, Any] = {"name": req.ifname, "mac": att.pod_mac, "sandbox": req.netns}
    if _vt(req.version) >= (1, 1, 0):
        host["mtu"] = pod["mtu"] = att.mtu
    return {"cniVersion": req.version, "interfaces": [host, pod], "ips": ips, "routes": routes, "dns": {}}


def _write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(doc), 0o644)


NO_POD_CIDR = "no pod CIDR yet: the configuration has no podCIDR and the agent has not seen its Node's spec.podCIDR"


def cmd_add(req: Request, sink: EndpointSink | None = None) -> dict:
    try:
        netns_fd = netsetup.open_pod_netns(req.netns)
    except netsetup.BadNetns as e:
        raise CNIError(E_INVALID_ENV, str(e)) from None
    try:
        return _add(req, netns_fd, sink)
    finally:
        os.close(netns_fd)


def _add(req: Request, netns_fd: int, sink: EndpointSink | None) -> dict:
    pools = req.pools
    if not pools:
        raise CNIError(E_TRY_AGAIN, NO_POD_CIDR)
    # ADD again for an attachment that exists in another netns, without DEL (the spec forbids it): refused
    # before anything is touched, so the failed ADD's undo cannot take down the first one's veth, address and
    # record. (A record exists only once an ADD succeeded: it is written last. A repeated ADD into the same
    # netns is answered as before, idempotently.)
    for path in _records(req, req.container_id, req.ifname):
        rec = _read_record(path)
        if rec is not None and rec.get("netns") != req.netns:
            raise CNIError(E_INVALID_ENV, f"container {req.container_id} already has interface {req.ifname} "
                                          f"(in {rec.get('netns', '?')}): DEL it first")
    given = _allocate(req, pools)
    host_if = netsetup.host_ifname(req.container_id, req.ifname)
    addrs = [netsetup.Address(ip, str(pool.gateway)) for pool, ip in given]
    try:
        att = netsetup.attach(netns_fd, req.ifname, host_if, addrs, req.mtu, req.netns)
        first_pool, first_ip = given[0]
        _write_json(req.record_path(), {
            "containerID": req.container_id, "ifname": req.ifname, "netns": req.netns, "network": req.name,
            # "ip", "gateway" and "podCIDR": the first address (what a single-stack record held); "ips": all
            "ip": first_ip, "gateway": str(first_pool.gateway), "podCIDR": str(first_pool.subnet),
            "ips": [{"ip": ip, "gateway": str(pool.gateway), "podCIDR": str(pool.subnet)} for pool, ip in given],
            "hostInterface": host_if, "hostIfindex": att.host_index, "hostMAC": att.host_mac, "podMAC": att.pod_mac,
            "podNamespace": req.args.get("K8S_POD_NAMESPACE", ""), "podName": req.args.get("K8S_POD_NAME", "")})
    except Exception as e:  # leave nothing behind: the runtime need not call DEL after a failed ADD
        _undo(req, host_if)
        if isinstance(e, netsetup.SetupError):
            raise CNIError(E_IO, str(e)) from None
        raise CNIError(E_IO, f"setting up {req.ifname} in {req.netns}: {e}") from None
    if sink is not None:
        registered: list[str] = []
        for _, ip in given:
            try:
                sink.added(ip, att.host_index, att.pod_mac)
            except Exception as e:
                _undo(req, host_if, sink, registered)
                raise CNIError(E_IO, f"registering {ip} for the datapath: {e}") from None
            registered.append(ip)
    return _result(req, given, att)


def _allocate(req: Request, pools: list[Pool]) -> list[tuple[Pool, str]]:
    """An address from each pool. If one fails, the addresses this call reserved are given back (those
    the attachment held before, a retried ADD's, stay). A family no longer configured is given back."""
    try:
        ipam = IPAM(req.data_dir, req.name)
        held = set(ipam.find_all(req.container_id, req.ifname))
    except OSError as e:
        raise CNIError(E_IO, f"IPAM state under {req.ipam_dir}: {e.strerror}") from None
    given: list[tuple[Pool, str]] = []
    try:
        for pool in pools:
            given.append((pool, ipam.allocate(pool, req.container_id, req.ifname)))
        for version in {4, 6} - {p.version for p in pools}:
            ipam.release(req.container_id, req.ifname, version)
    except (PoolExhausted, OSError) as e:
        for _, ip in given:
            if ip not in held:
                try:
                    ipam.release_ip(ip, req.container_id, req.ifname)
                except OSError:
                    pass
        if isinstance(e, PoolExhausted):
            raise CNIError(E_TRY_AGAIN, f"pod CIDR {pools[len(given)].subnet} is exhausted", str(e)) from None
        raise CNIError(E_IO, f"IPAM state under {req.ipam_dir}: {e.strerror}") from None
    return given


def _undo(req: Request, host_if: str, sink: EndpointSink | None = None, registered: list[str] = ()) -> None:
    """Best effort: the error that made ADD fail is what the runtime needs to see."""
    steps = [lambda ip=ip: sink.removed(ip) for ip in registered] if sink is not None else []
    steps += [lambda: netsetup.detach(host_if),
              lambda: IPAM(req.data_dir, req.name).release_all(req.container_id, req.ifname),
              lambda: os.unlink(req.record_path())]
    for step in steps:
        try:
            step()
        except Exception:
            pass


def _is_ip(ip: str) -> bool:
    try:
        ipaddress.ip_address(ip)
        return True
    except ValueError:
        return False


def _record_addresses(rec: dict) -> list[netsetup.Address] | None:
    """A record's addresses ("ips"; a single-stack record of an older version: "ip" and "gateway"), or
    None if they do not read as addresses."""
    entries = rec.get("ips") if "ips" in rec else [{"ip": rec.get("ip"), "gateway": rec.get("gateway")}]
    if not isinstance(entries, list) or not entries:
        return None
    out = []
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("ip"), str) and isinstance(e.get("gateway"), str)
                and _is_ip(e["ip"])):
            return None
        out.append(netsetup.Address(e["ip"], e["gateway"]))
    return out


def _read_record(path: str) -> dict | None:
    """The record's content, or None if it is missing or damaged (not a JSON object)."""
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def _records(req: Request, cid: str, ifname: str) -> list[str]:
    """The attachment's record files: its own name, and an older version's name if its content says so."""
    legacy = req.legacy_record_path(cid, ifname)
    rec = _read_record(legacy)
    mine = rec is not None and (rec.get("containerID"), rec.get("ifname")) == (cid, ifname)
    return [req.record_path(cid, ifname)] + ([legacy] if mine else [])


def _remove(req: Request, cid: str, ifname: str, sink: EndpointSink | None = None) -> None:
    """Everything of one attachment, in the reverse order of ADD: unregistered before its device goes,
    the record last (so a DEL cut short leaves a record for the next DEL or GC to find)."""
    paths = _records(req, cid, ifname)
    if sink is not None:
        ips: set = set()
        if os.path.isdir(req.ipam_dir):
            ips.update(IPAM(req.data_dir, req.name).find_all(cid, ifname))
        for path in paths:
            rec = _read_record(path) or {}
            entries = rec.get("ips") if isinstance(rec.get("ips"), list) else []
            ips.update(e.get("ip") for e in entries if isinstance(e, dict))
            ips.add(rec.get("ip"))
        for ip in sorted(ip for ip in ips if isinstance(ip, str) and _is_ip(ip)):
            _unregister(req, sink, ip, (cid, ifname))
    host_if = netsetup.host_ifname(cid, ifname)
    try:
        netsetup.detach(host_if)
    except NetlinkError as e:
        raise CNIError(E_IO, f"removing {host_if}: {e}") from None
    if os.path.isdir(req.ipam_dir):  # no IPAM directory: nothing was ever reserved here
        try:
            IPAM(req.data_dir, req.name).release_all(cid, ifname)
        except OSError as e:
            raise CNIError(E_IO, f"releasing the address of {cid}/{ifname} under {req.ipam_dir}: {e.strerror}") from None
    for path in paths:
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
    paths = [p for p in _records(req, req.container_id, req.ifname) if os.path.exists(p)]
    if not paths:
        raise CNIError(E_UNKNOWN_CONTAINER, f"no attachment {req.container_id}/{req.ifname} in network {req.name}")
    rec = _read_record(paths[0])
    addrs = _record_addresses(rec) if rec is not None and isinstance(rec.get("hostInterface"), str) else None
    if addrs is None:
        raise CNIError(E_IO, f"the record of {req.container_id}/{req.ifname} ({paths[0]}) is damaged")
    try:
        os.close(netsetup.open_pod_netns(req.netns))
    except netsetup.BadNetns as e:
        raise CNIError(E_INVALID_ENV, str(e)) from None
    prev = req.config.get("prevResult")
    if isinstance(prev, dict):  # what the runtime was told on ADD must still be what we hold
        told = {i.get("address", "").split("/")[0] for i in prev.get("ips") or ()}
        for a in addrs:
            if a.ip not in told:
                raise CNIError(E_CHECK_FAILED, f"prevResult does not list {a.ip}, an address of "
                                               f"{req.container_id}/{req.ifname}")
    held = IPAM(req.data_dir, req.name).find_all(req.container_id, req.ifname) if os.path.isdir(req.ipam_dir) else []
    for a in addrs:
        if a.ip not in held:
            raise CNIError(E_CHECK_FAILED, f"the IPAM reservation of {a.ip} for {req.container_id}/{req.ifname} "
                                           "is missing")
    problem = netsetup.check(req.netns, req.ifname, rec["hostInterface"], addrs)
    if problem:
        raise CNIError(E_CHECK_FAILED, f"CHECK failed: {problem}")


def cmd_status(req: Request, sink: EndpointSink | None = None) -> None:
    pools = req.pools
    if not pools:
        raise CNIError(E_NOT_AVAILABLE, NO_POD_CIDR)
    try:
        ipam = IPAM(req.data_dir, req.name)
        probe = os.path.join(ipam.dir, f".status-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
        free = [ipam.free(pool) for pool in pools]
    except OSError as e:
        raise CNIError(E_NOT_AVAILABLE, f"IPAM state under {req.ipam_dir} is not writable: {e.strerror}") from None
    for pool, left in zip(pools, free):
        if pool.size - left and not _node_forwards(pool):
            what = (f"its pod gateway ({netsetup.HOST_DEV} with {pool.gateway}, ip_forward)" if pool.version == 4
                    else "IPv6 forwarding (net.ipv6.conf.all.forwarding)")
            raise CNIError(E_LIMITED_CONNECTIVITY, f"the node lost {what}: existing pods may be cut off")
    for pool, left in zip(pools, free):
        if left <= 0:
            raise CNIError(E_NOT_AVAILABLE, f"pod CIDR {pool.subnet} has no free address (all {pool.size} reserved)")


def _node_forwards(pool: Pool) -> bool:
    from pyroute2 import IPRoute

    if pool.version == 6:
        return netsetup.node_forwards(6)
    gateway = str(pool.gateway)
    try:
        if not netsetup.node_forwards():
            return False
        with IPRoute() as ipr:
            host = netsetup.host_devices(ipr)
            return host is not None and gateway in {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host)}
    except OSError:
        return False


def _valid_list(req: Request) -> set[tuple[str, str]] | None:
    key = next((k for k in VALID_ATTACHMENTS if k in req.config), None)
    if key is None:  # libcni sends none when its caller gave no list (cnitool gc): nothing is known stale
        return None
    valid = req.config[key]
    if not isinstance(valid, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
            for a in valid):
        raise CNIError(E_INVALID_CONFIG, f"GC needs {VALID_ATTACHMENTS[0]}, a list of "
                                         '{"containerID": ..., "ifname": ...}')
    return {(a["containerID"], a["ifname"]) for a in valid}


def _other_networks_hold(req: Request, cid: str, ifname: str) -> bool:
    root = os.path.join(req.data_dir, "ipam")
    for network in os.listdir(root) if os.path.isdir(root) else ():
        if network != req.name and _NAME.fullmatch(network) and IPAM(req.data_dir, network).find(cid, ifname):
            return True
    return False


def cmd_gc(req: Request, sink: EndpointSink | None = None) -> None:
    """Remove every attachment of this network the runtime no longer lists; keep going past a failure
    and report them all at the end (SPEC.md GC). Without a list, remove nothing: an absent list is not
    an empty one. Never removed: an attachment whose ADD is in progress (its lock is held) or finished
    after this request arrived (its record is newer: the runtime's list predates it). A damaged record
    or reservation does not stop GC: a record is known by its file name, a reservation with no
    readable owner is freed."""
    arrived = time.time()
    keep = _valid_list(req)
    if keep is None:
        return
    known: set[tuple[str, str]] = set()
    damaged: list[str] = []
    if os.path.isdir(req.ipam_dir):
        for r in IPAM(req.data_dir, req.name).reservations():
            if r.damaged:
                damaged.append(r.ip)
            else:
                known.add((r.container_id, r.ifname))
    edir = os.path.join(req.data_dir, "endpoints")
    for name in os.listdir(edir) if os.path.isdir(edir) else ():
        if not name.endswith(".json"):
            continue
        rec = _read_record(os.path.join(edir, name))
        if rec is not None and isinstance(rec.get("containerID"), str) and isinstance(rec.get("ifname"), str):
            if rec.get("network") == req.name:
                known.add((rec["containerID"], rec["ifname"]))
            continue
        key = key_of(name)  # damaged: the name still says whose it is, and its network is whoever holds its address
        if key is not None and not _other_networks_hold(req, *key):
            known.add(key)
    failed = []
    for cid, ifname in sorted(known - keep):
        if not _CONTAINER_ID.fullmatch(cid) or ifname_problem(ifname) is not None:
            failed.append(f"{cid!r}/{ifname!r}: not a valid attachment name")
            continue
        try:
            with attachment_lock(req.data_dir, cid, ifname, wait=False) as held:
                try:
                    if os.stat(req.record_path(cid, ifname)).st_mtime >= arrived:
                        continue  # added after the runtime made its list
                except FileNotFoundError:
                    pass
                _remove(req, cid, ifname, sink)
                held.remove = True
        except Busy:
            continue  # an ADD, DEL or CHECK in progress: not this GC's to judge
        except Exception as e:
            failed.append(f"{cid}/{ifname}: {getattr(e, 'msg', e)}")
    for ip in damaged:
        try:
            IPAM(req.data_dir, req.name).release_damaged(ip)
        except OSError as e:
            failed.append(f"damaged reservation {ip}: {e.strerror}")
    if failed:
        raise CNIError(E_IO, f"GC could not remove {len(failed)} stale attachment(s)", "; ".join(failed))


def _locked(req: Request, work):
    """``work()`` under the attachment's lock (ADD, DEL, CHECK); DEL takes the lock file with it."""
    if req.command == "DEL" and not os.path.isdir(req.data_dir):
        return work()  # nothing was ever added here (an ADD makes the directory before it locks): no lock needed
    try:
        with attachment_lock(req.data_dir, req.container_id, req.ifname, remove=req.command == "DEL") as held:
            try:
                return work()
            except CNIError as e:  # a failed ADD undid itself, a CHECK found nothing: no lock file left either
                held.remove = req.command == "ADD" or (req.command == "CHECK" and e.code == E_UNKNOWN_CONTAINER)
                raise
            except BaseException:
                held.remove = False
                raise
    except OSError as e:
        raise CNIError(E_IO, f"locking {req.container_id}/{req.ifname} under {req.data_dir}/locks: {e.strerror}") \
            from None


def handle(env: dict[str, str], stdin: bytes, sink: EndpointSink | None = None) -> tuple[bytes, int]:
    """One plugin invocation: (stdout, exit code). ``sink`` registers attachments for the datapath."""
    version = LATEST
    try:
        asked = json.loads(stdin or b"{}").get("cniVersion")
        if isinstance(asked, str) and asked in SUPPORTED:
            version = asked  # errors too are answered in the version asked, when we speak it
    except (ValueError, AttributeError, RecursionError):
        pass
    try:
        try:
            req = parse(env, stdin)
        except RecursionError:
            raise CNIError(E_DECODE, "network configuration is nested too deeply") from None
        if req.command == "VERSION":  # SPEC.md: cniVersion is the one given on input
            return json.dumps({"cniVersion": req.version, "supportedVersions": list(SUPPORTED)}).encode(), 0
        if req.command == "ADD":
            return json.dumps(_locked(req, lambda: cmd_add(req, sink))).encode(), 0
        if req.command in ("DEL", "CHECK"):
            _locked(req, lambda: {"DEL": cmd_del, "CHECK": cmd_check}[req.command](req, sink))
        else:
            {"STATUS": cmd_status, "GC": cmd_gc}[req.command](req, sink)
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
