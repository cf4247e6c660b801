"""Identity servers: on TCP accept, send "ip:port\\n" of the listening socket and close; on UDP,
answer each datagram with the same text."""
from __future__ import annotations

import argparse
import selectors
import socket
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("addrs", nargs="+")
    a = ap.parse_args()
    sel = selectors.DefaultSelector()
    for ip in a.addrs:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        t = socket.socket(fam, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((ip, a.port))
        t.listen(4096)
        t.setblocking(False)
        ident = f"{ip}:{a.port}\n".encode()
        sel.register(t, selectors.EVENT_READ, ("tcp", ident))
        if a.udp:
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.bind((ip, a.port))
            u.setblocking(False)
            sel.register(u, selectors.EVENT_READ, ("udp", ident))
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            kind, ident = key.data
            if kind == "tcp":
                try:
                    c, _ = key.fileobj.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                try:
                    c.send(ident)
                except OSError:
                    pass
                c.close()
            else:
                try:
                    while True:
                        _, peer = key.fileobj.recvfrom(2048)
                        key.fileobj.sendto(ident, peer)
                except BlockingIOError:
                    pass


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
