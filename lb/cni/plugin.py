"""The CNI plugin's logic (specification 1.1.0): ADD, DEL, CHECK, STATUS, GC, VERSION.

``handle(env, stdin)`` is pure protocol: it validates the environment and the network configuration,
answers in the version the configuration asks for (0.3.0 to 1.1.0), and turns every failure into CNI
error JSON with the code the specification gives it. The work is in ipam.py and netsetup.py.

Network configuration (the plugin's entry in the conflist):
    {"type": "bpflb-cni", "podCIDR": "10.244.1.0/24",   # optional when the agent knows its Node's podCIDR
     "mtu": 1450, "dataDir": "/var/lib/bpflb"}
``lo`` is brought up by the plugin itself, so no separate loopback plugin is chained.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any, Protocol

from . import netsetup
from .ipam import IPAM, PoolExhausted

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_DATA_DIR = "/var/lib/bpflb"
VALID_ATTACHMENTS = "cni.dev/valid-attachments"

# Error codes (SPEC.md "Error codes").
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50


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

    @property
    def data_dir(self) -> str:
        return self.config.get("dataDir") or DEFAULT_DATA_DIR

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def subnet(self) -> str:
        return self.config["podCIDR"]


def parse(env: dict[str, str], stdin: bytes) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"):
        raise CNIError(E_INVALID_ENV, f"CNI_COMMAND {command!r} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                       if command else "CNI_COMMAND is not set")
    try:
        config = json.loads(stdin or b"{}")
    except ValueError as e:
        raise CNIError(E_DECODE, f"network configuration is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CNIError(E_DECODE, "network configuration must be a JSON object")
    version = config.get("cniVersion", "")
    if command == "VERSION":
        return Request(command, "", "", "", version or SUPPORTED[-1], config)
    if version not in SUPPORTED:
        raise CNIError(E_INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED)}")
    if command in ("CHECK",) and _vt(version) < (0, 4, 0):
        raise CNIError(E_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {version}")
    if command in ("STATUS", "GC") and _vt(version) < (1, 1, 0):
        raise CNIError(E_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, not {version}")
    for key in ("name", "type"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise CNIError(E_INVALID_CONFIG, f"network configuration field {key!r} is missing")
    cid = env.get("CNI_CONTAINERID", "")
    netns = env.get("CNI_NETNS", "")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        missing = [k for k, v in (("CNI_CONTAINERID", cid), ("CNI_IFNAME", ifname)) if not v]
        if command != "DEL" and not netns:
            missing.append("CNI_NETNS")
        if missing:
            raise CNIError(E_INVALID_ENV, f"{', '.join(missing)} not set")
        if len(ifname) > 15 or "/" in ifname:
            raise CNIError(E_INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    if command in ("ADD", "CHECK", "STATUS", "GC", "DEL"):
        cidr = config.get("podCIDR")
        if command != "DEL" or cidr is not None:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
                if net.version != 4 or net.num_addresses < 4:
                    raise ValueError
            except (TypeError, ValueError):
                raise CNIError(E_INVALID_CONFIG, f"podCIDR {cidr!r} is not an IPv4 CIDR of /30 or larger") from None
        mtu = config.get("mtu", 1500)
        if not isinstance(mtu, int) or not 576 <= mtu <= 65535:
            raise CNIError(E_INVALID_CONFIG, f"mtu {mtu!r} must be an integer between 576 and 65535")
    return Request(command, cid, netns, ifname, version, config)


def _record_path(req: Request, cid: str | None = None, ifname: str | None = None) -> str:
    return os.path.join(req.data_dir, "endpoints", f"{cid or req.container_id}-{ifname or req.ifname}.json")


def _result(req: Request, ip: str, gateway: str, prefix: int, att: netsetup.Attachment) -> dict:
    ip_entry: dict[str, Any] = {"address": f"{ip}/{prefix}", "gateway": gateway, "interface": 1}
    if _vt(req.version) < (1, 0, 0):
        ip_entry["version"] = "4"
    return {"cniVersion": req.version,
            "interfaces": [{"name": att.host_if, "mac": att.host_mac},
                           {"name": req.ifname, "mac": att.pod_mac, "sandbox": req.netns}],
            "ips": [ip_entry],
            "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
            "dns": {}}


def cmd_add(req: Request, sink: EndpointSink | None = None) -> dict:
    if not os.path.exists(req.netns):
        raise CNIError(E_INVALID_ENV, f"CNI_NETNS {req.netns} does not exist")
    gateway = netsetup.gateway_of(req.subnet)
    try:
        ipam = IPAM(req.data_dir, req.name, req.subnet, gateway)
        ip = ipam.allocate(req.container_id, req.ifname)
    except PoolExhausted as e:
        raise CNIError(E_TRY_AGAIN, f"pod CIDR {req.subnet} is exhausted", str(e)) from None
    except OSError as e:
        raise CNIError(E_IO, f"IPAM state under {req.data_dir}: {e.strerror}") from None
    host_if = netsetup.host_ifname(req.container_id, req.ifname)
    try:
        netsetup.ensure_host_devices(gateway)
        att = netsetup.attach(req.netns, req.ifname, host_if, ip, gateway, req.config.get("mtu", 1500))
    except Exception as e:
        netsetup.detach(host_if)
        ipam.release(req.container_id, req.ifname)
        raise CNIError(E_IO, f"setting up {req.ifname} in {req.netns}: {e}") from None
    record = {"containerID": req.container_id, "ifname": req.ifname, "netns": req.netns, "ip": ip,
              "gateway": gateway, "hostInterface": host_if, "hostIfindex": att.host_index, "network": req.name,
              "podCIDR": req.subnet}
    path = _record_path(req)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    if sink is not None:
        sink.added(ip, att.host_index, att.pod_mac)
    return _result(req, ip, gateway, ipaddress.ip_network(req.subnet, strict=False).prefixlen, att)


def _remove(req: Request, cid: str, ifname: str, sink: EndpointSink | None = None) -> None:
    if sink is not None:
        try:
            with open(_record_path(req, cid, ifname)) as f:
                sink.removed(json.load(f)["ip"])  # unregistered before the device goes
        except (OSError, ValueError, KeyError):
            pass
    netsetup.detach(netsetup.host_ifname(cid, ifname))
    ipam_dir = os.path.join(req.data_dir, "ipam", req.name)
    if os.path.isdir(ipam_dir):
        IPAM(req.data_dir, req.name, req.config.get("podCIDR") or "0.0.0.0/0", "0.0.0.0").release(cid, ifname)
    try:
        os.unlink(_record_path(req, cid, ifname))
    except FileNotFoundError:
        pass


def cmd_del(req: Request, sink: EndpointSink | None = None) -> None:
    """Idempotent: an unknown container, a gone namespace, a second DEL all succeed."""
    _remove(req, req.container_id, req.ifname, sink)


def cmd_check(req: Request, sink: EndpointSink | None = None) -> None:
    try:
        with open(_record_path(req)) as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise CNIError(E_UNKNOWN_CONTAINER, f"no attachment {req.container_id}/{req.ifname}") from None
    problem = netsetup.check(req.netns, req.ifname, rec["hostInterface"], rec["ip"], rec["gateway"])
    if problem:
        raise CNIError(E_IO, f"CHECK failed: {problem}")


def cmd_status(req: Request, sink: EndpointSink | None = None) -> None:
    try:
        ipam = IPAM(req.data_dir, req.name, req.subnet, netsetup.gateway_of(req.subnet))
        probe = os.path.join(ipam.dir, ".status")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise CNIError(E_NOT_AVAILABLE, f"IPAM state under {req.data_dir} is not writable: {e.strerror}") from None
    if ipam.free() <= 0:
        raise CNIError(E_NOT_AVAILABLE, f"pod CIDR {req.subnet} has no free address")


def cmd_gc(req: Request, sink: EndpointSink | None = None) -> None:
    valid = req.config.get(VALID_ATTACHMENTS)
    if not isinstance(valid, list):
        raise CNIError(E_INVALID_CONFIG, f"GC needs {VALID_ATTACHMENTS} (a list)")
    keep = {(a.get("containerID"), a.get("ifname")) for a in valid if isinstance(a, dict)}
    seen = set()
    ipam = IPAM(req.data_dir, req.name, req.subnet, netsetup.gateway_of(req.subnet))
    for r in ipam.reservations():
        seen.add((r.container_id, r.ifname))
    edir = os.path.join(req.data_dir, "endpoints")
    for name in os.listdir(edir) if os.path.isdir(edir) else ():
        try:
            with open(os.path.join(edir, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if rec.get("network") == req.name:
            seen.add((rec.get("containerID"), rec.get("ifname")))
    for cid, ifname in seen - keep:
        _remove(req, cid, ifname, sink)


def handle(env: dict[str, str], stdin: bytes, sink: EndpointSink | None = None) -> tuple[bytes, int]:
    """One plugin invocation: (stdout, exit code). ``sink`` registers attachments for the datapath."""
    version = SUPPORTED[-1]
    try:
        try:
            version = json.loads(stdin or b"{}").get("cniVersion") or version
        except (ValueError, AttributeError):
            pass
        req = parse(env, stdin)
        version = req.version
        if req.command == "VERSION":
            return json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED)}).encode(), 0
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
        return json.dumps({"cniVersion": version, "code": E_IO, "msg": f"internal error: {e}"}).encode(), 1


def main() -> None:
    import sys

    out, rc = handle(dict(os.environ), sys.stdin.buffer.read())
    sys.stdout.buffer.write(out)
    sys.exit(rc)
