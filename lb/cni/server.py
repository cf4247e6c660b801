"""The agent's side of the launcher: a unix-socket server running each CNI request in a worker thread
(plugin work is blocking netlink; pyroute2 must not see the agent's event loop).

Wire format (lb/cni/launcher.c; all integers u32 little-endian), one request per connection:
    request:  n_env, n_env x (len, "CNI_KEY=VALUE"), stdin_len, stdin bytes
    response: exit_code, stdout_len, stdout bytes

The agent fills in ``podCIDR`` from its Node's spec.podCIDR when the network configuration has none.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import sys
from typing import Awaitable, Callable

from ..settings import CNI_SOCKET_DEFAULT
from .plugin import handle

log = logging.getLogger("bpflb.cni")
_U32 = struct.Struct("<I")
MAX_ENV = 1024  # CNI_* variables in one request
MAX_BYTES = 16 << 20  # one variable, or the configuration
READ_TIMEOUT = 30.0  # seconds for the launcher to send its whole request


class BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    async def u32(limit: int, what: str) -> int:
        (n,) = _U32.unpack(await reader.readexactly(4))
        if n > limit:
            raise BadRequest(f"{what} of {n} is over the limit of {limit}")
        return n

    env = {}
    for _ in range(await u32(MAX_ENV, "environment count")):
        k, _, v = (await reader.readexactly(await u32(MAX_BYTES, "variable length"))).decode(errors="replace") \
            .partition("=")
        env[k] = v
    stdin = await reader.readexactly(await u32(MAX_BYTES, "configuration length"))
    return env, stdin


def _answer(rc: int, out: bytes) -> bytes:
    return _U32.pack(rc) + _U32.pack(len(out)) + out


def with_defaults(stdin: bytes, defaults: dict) -> bytes:
    if not defaults:
        return stdin
    try:
        conf = json.loads(stdin)
    except ValueError:
        return stdin  # the plugin reports the decoding error
    if not isinstance(conf, dict):
        return stdin
    for k, v in defaults.items():
        conf.setdefault(k, v)
    return json.dumps(conf).encode()


async def serve(path: str, stop: asyncio.Event, defaults: Callable[[], dict] = dict, sink=None) -> None:
    """Serve the launcher; ``sink`` (an EndpointSink) registers each attachment for the datapath."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                env, stdin = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
            except BadRequest as e:
                log.warning("CNI request refused: %s", e)
                writer.write(_answer(1, json.dumps({"cniVersion": "1.1.0", "code": 5, "msg": f"bpflb agent: {e}"})
                                     .encode()))
                await writer.drain()
                return
            out, rc = await asyncio.to_thread(handle, env, with_defaults(stdin, defaults()), sink)
            if env.get("CNI_COMMAND") in ("ADD", "DEL", "GC") or rc != 0:
                log.info("CNI %s %s/%s: %s", env.get("CNI_COMMAND"), env.get("CNI_CONTAINERID", "")[:12],
                         env.get("CNI_IFNAME", ""), "ok" if rc == 0 else out.decode(errors="replace"))
            writer.write(_answer(rc, out))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            log.warning("CNI request cut short: %r", e)
        except Exception as e:  # answer with a CNI error rather than a reset connection
            log.exception("CNI request failed")
            writer.write(_answer(1, json.dumps({"cniVersion": "1.1.0", "code": 5, "msg": f"bpflb agent: {e}"}).encode()))
        finally:
            writer.close()

    server = await asyncio.start_unix_server(one, path=path, backlog=512)
    os.chmod(path, 0o600)
    async with server:
        await stop.wait()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def serve_for_agent(settings, tracker, stop: asyncio.Event, datapath_ready: Callable[[], Awaitable[None]]) -> None:
    """The agent's CNI plugin: the launcher and conflist installed first (if asked), then requests
    served once the datapath's maps exist (each pod is registered in lb_endpoints)."""
    from .. import nodenet
    from ..maps.endpoints import PinnedEndpointMap
    from . import install

    s = settings
    if s.cni_bin_dir and s.cni_conf_dir:
        launcher = os.environ.get("BPFLB_CNI_LAUNCHER") or await asyncio.to_thread(install.build_launcher)
        node = tracker.node
        mtu = await asyncio.to_thread(nodenet.pod_mtu, s.network_mode, nodenet.node_ip(node) if node else None)
        binary, conf = install.install(s.cni_bin_dir, s.cni_conf_dir, launcher=launcher, mtu=mtu,
                                       socket=s.cni_socket)
        log.info("installed CNI plugin %s and %s (pod MTU %d)", binary, conf, mtu)

    def defaults() -> dict:
        """The pod CIDR comes from this node's Node object unless the conflist names one."""
        node = tracker.node
        v4 = [c for c in (node.pod_cidrs if node else ()) if ":" not in c]
        return {"podCIDR": v4[0]} if v4 else {}

    await datapath_ready()
    endpoints = PinnedEndpointMap(s.paths.bpf_root)
    try:
        await serve(s.cni_socket, stop, defaults, endpoints)
    finally:
        endpoints.close()


def main() -> int:
    """`python -m lb.cni.server SOCKET [BPF_ROOT]`: the server alone (tests, and nodes without the agent)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = sys.argv[1] if len(sys.argv) > 1 else CNI_SOCKET_DEFAULT
    sink = None
    if len(sys.argv) > 2:  # a bpf-root: register endpoints in its lb_endpoints map
        from ..maps.endpoints import PinnedEndpointMap

        sink = PinnedEndpointMap(sys.argv[2])

    async def run() -> None:
        stop = asyncio.Event()
        import signal

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        task = asyncio.create_task(serve(path, stop, sink=sink))
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
