"""Kernel settings under /proc/sys, read and written by key ("net/ipv4/ip_forward", or with an
interface: "net/ipv4/conf/<if>/rp_filter"; slashes, so an interface name may hold dots). A failure
is a SysctlError that names the setting and the value, as ``sysctl -w`` would show them."""
from __future__ import annotations

import os

ROOT = "/proc/sys"


class SysctlError(OSError):
    def __init__(self, err: int, key: str, value: str | None = None):
        what = key.replace("/", ".") + ("" if value is None else f"={value}")
        super().__init__(err, f"sysctl {what}: {os.strerror(err)}")
        self.key, self.value = key, value

    def __str__(self) -> str:
        return self.strerror


def read(key: str) -> str:
    """The current value, without the trailing newline."""
    try:
        with open(os.path.join(ROOT, key)) as f:
            return f.read().strip()
    except OSError as e:
        raise SysctlError(e.errno, key) from None


def write(key: str, value: str) -> bool:
    """Set ``key`` to ``value``; True if it changed. An equal value is not written again (no write
    access needed for a setting that is already right)."""
    path = os.path.join(ROOT, key)
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return False
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as e:
        raise SysctlError(e.errno, key, value) from None
