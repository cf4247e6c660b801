"""Entering a network namespace by path: the one place bpflb calls setns(2).

``enter`` switches the calling thread (in a child before exec: the process). ``run_in`` runs work on
a short-lived thread that enters the namespace and then ends, so no thread ever has to find its way
back. A socket belongs to the namespace it was created in, so a netlink socket opened there keeps
working from any thread. (pyroute2's own ``netns=`` forks, and a fork of the multi-threaded agent
inherits its locks and sockets.)
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"entering network namespace {path}")
    finally:
        os.close(fd)


def run_in(path: str, work: Callable[[], T]) -> T:
    """``work()`` inside the network namespace at ``path``; its result or its exception."""
    out: dict = {}

    def run() -> None:
        try:
            enter(path)
            out["value"] = work()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name=f"netns:{os.path.basename(path)}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
