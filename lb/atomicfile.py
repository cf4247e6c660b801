"""Replace a file atomically: readers see the old content or the new, never a half-written file.

The data goes to a temporary file in the same directory (rename is atomic only within one
filesystem), is flushed and fsynced, gets its mode, and is renamed over the target; on any failure
the temporary file is removed and the target is untouched. A process that still has the old file
open or executing (a runtime running the CNI launcher) keeps the old inode.
"""
from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: bytes | str, mode: int = 0o644, durable: bool = True) -> None:
    """Write ``data`` (str is UTF-8) to ``path`` with permission bits ``mode``. ``durable=False`` skips
    the fsync, for a file whose loss after a power cut costs nothing (a hint)."""
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
