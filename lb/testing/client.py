"""Client program: dial a service N times (or until SIGTERM) and report, as JSON, which backends
answered, every error by errno name, and what getpeername / recvfrom showed."""
from __future__ import annotations

import argparse
import collections
import errno
import json
import signal
import socket
import sys
import time


def _addr(text: str) -> tuple[int, tuple]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    return fam, (host, int(port))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--mode", choices=["tcp", "udp", "udp-connected", "udp-persistent"], default="tcp",
                    help="udp-persistent: one connected UDP socket, reconnected only after an error; "
                         "prints one JSON line per reply or error as it happens")
    ap.add_argument("--count", type=int, default=1, help="connections; 0 = until SIGTERM")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--interval", type=float, default=0.0)
    a = ap.parse_args()
    fam, addr = _addr(a.target)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    answered = collections.Counter()
    errors = collections.Counter()
    peers = collections.Counter()
    sources = collections.Counter()
    n = 0
    t0 = time.monotonic()
    if a.mode == "udp-persistent":
        s = None
        while not stop and (a.count == 0 or n < a.count):
            n += 1
            try:
                if s is None:
                    s = socket.socket(fam, socket.SOCK_DGRAM)
                    s.settimeout(a.timeout)
                    s.connect(addr)
                s.send(b"hi\n")
                event = {"answer": s.recv(2048).decode().strip()}
            except socket.timeout:
                event = {"error": "ETIMEDOUT"}
            except OSError as e:
                event = {"error": errno.errorcode.get(e.errno, str(e.errno))}
                s.close()
                s = None
            print(json.dumps(event), flush=True)
            if "answer" in event:
                answered[event["answer"]] += 1
            else:
                errors[event["error"]] += 1
            time.sleep(a.interval or 0.01)
        print(json.dumps({"attempts": n, "answered": answered, "errors": errors}), flush=True)
        return
    while not stop and (a.count == 0 or n < a.count):
        n += 1
        s = socket.socket(fam, socket.SOCK_STREAM if a.mode == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(a.timeout)
        try:
            if a.mode == "udp":
                s.sendto(b"hi\n", addr)
                data, src = s.recvfrom(2048)
                sources[f"{src[0]}:{src[1]}"] += 1
            else:
                s.connect(addr)
                p = s.getpeername()
                peers[f"{p[0]}:{p[1]}"] += 1
                if a.mode == "udp-connected":
                    s.send(b"hi\n")
                data = s.recv(2048)
            answered[data.decode().strip()] += 1
        except socket.timeout:
            errors["ETIMEDOUT"] += 1
        except OSError as e:
            errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
        finally:
            s.close()
        if a.interval:
            time.sleep(a.interval)
    json.dump({"attempts": n, "answered": answered, "errors": errors, "peers": peers, "sources": sources,
               "seconds": time.monotonic() - t0}, sys.stdout)


if __name__ == "__main__":
    main()
