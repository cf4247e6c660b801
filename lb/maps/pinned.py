"""One map opened by its pin under the bpffs root (no compiler needed): the base of the map classes."""
from __future__ import annotations

import os

from . import bpfsys


class PinnedMap:
    """The map ``name`` pinned under ``bpf_root``; closing twice is harmless, and ``with`` closes it."""

    name: str  # set by each subclass: the pinned map's name (lb/maps/structs.py)

    def __init__(self, bpf_root: str):
        self.fd = bpfsys.obj_get(os.path.join(bpf_root, self.name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
