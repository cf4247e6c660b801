"""Backend for the north-south bed: it says which address it was reached on and which client address
it sees, and then echoes, so a test can tell the backend, the source NAT and whether a flow lives on.

    python -m lb.testing.peer_server --port 8080 [--udp] ADDR [ADDR ...]

TCP: on accept, send "<local ip>:<port> <peer ip>:<port>\\n", then echo whatever arrives until the client
closes (a stream). UDP: answer each datagram with the same line and the TTL (hop limit) it arrived with,
"ttl=N". Prints "ready" once every socket is
bound. One thread per TCP connection: tests hold a handful at a time.
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading


def _fmt(addr: tuple) -> str:
    return f"{addr[0]}:{addr[1]}"


def _serve_tcp(lsock: socket.socket) -> None:
    while True:
        try:
            c, peer = lsock.accept()
        except OSError:
            return
        threading.Thread(target=_echo, args=(c, peer), daemon=True).start()


def _echo(c: socket.socket, peer: tuple) -> None:
    with c:
        try:
            c.sendall(f"{_fmt(c.getsockname())} {_fmt(peer)}\n".encode())
            while data := c.recv(65536):
                c.sendall(data)
        except OSError:
            pass


def _serve_udp(u: socket.socket) -> None:
    v6 = u.family == socket.AF_INET6
    # IP_RECVTTL is 12 in <linux/in.h> (Python's socket module does not name it)
    level, opt = (socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT) if v6 else (socket.IPPROTO_IP, getattr(socket, "IP_RECVTTL", 12))
    u.setsockopt(level, opt, 1)
    while True:
        try:
            _, anc, _, peer = u.recvmsg(2048, socket.CMSG_SPACE(4))
            ttl = next((int.from_bytes(data[:4], sys.byteorder) for lvl, _, data in anc if lvl == level), -1)
            u.sendto(f"{_fmt(u.getsockname())} {_fmt(peer)} ttl={ttl}\n".encode(), peer)
        except OSError:
            return


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m lb.testing.peer_server")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("addrs", nargs="+")
    a = ap.parse_args()
    threads = []
    for ip in a.addrs:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        t = socket.socket(fam, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((ip, a.port))
        t.listen(1024)
        threads.append(threading.Thread(target=_serve_tcp, args=(t,), daemon=True))
        if a.udp:
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.bind((ip, a.port))
            threads.append(threading.Thread(target=_serve_udp, args=(u,), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
