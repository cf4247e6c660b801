"""What both benchmarks share: a test bed that is always torn down, SIGTERM as an exception, and
robust statistics for noisy machines (medians and quartiles, never means)."""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from lb import datapath
from lb.settings import Paths
from lb.testing.bed import Bed


def sigterm_exits() -> None:
    """SIGTERM (and SIGHUP) raise SystemExit, so every ``finally`` below runs as on Ctrl-C.

    Only in this process: pyroute2 forks helpers (netns.create, IPRoute(netns=...)) that inherit
    the handler and are stopped with SIGTERM; one that raised would unwind *our* stack in the
    child and tear the bed down (namespaces removed under the parent's feet). They just exit."""
    main_pid = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def code_version() -> str:
    """The commit measured, and whether lb/ or bpf/ had uncommitted changes (figures depend on them)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lb", "bpf"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in lb/ or bpf/" if dirty else "")


def paths_of(bed: Bed) -> Paths:
    return Paths(cgroup_root=bed.cgroup, bpf_root=bed.bpf_root)


@contextlib.contextmanager
def bench_bed(backends: int = 1) -> Iterator[Bed]:
    """A test bed whose datapath (links, pins) is removed before its namespaces and cgroup,
    whatever happens; afterwards, anything left behind is reported on stderr."""
    bed = Bed(tag="bn" + uuid.uuid4().hex[:4], backends=backends)
    try:
        with bed:
            try:
                yield bed
            finally:
                datapath.cleanup(paths_of(bed))
    finally:
        for item in leftovers(bed):
            print(f"WARNING: left behind: {item}", file=sys.stderr)


def leftovers(bed: Bed) -> list[str]:
    out = []
    for ns in (bed.client_ns, bed.backend_ns):
        if os.path.exists(f"/run/netns/{ns}"):
            out.append(f"network namespace {ns}")
    for path, what in ((bed.bpf_root, "bpffs directory"), (bed.cgroup, "cgroup")):
        if os.path.exists(path):
            out.append(f"{what} {path}")
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; the spread a reader needs to judge a median."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def build_c(name: str) -> str:
    """Compile bench/<name>.c once per source version (cached in the temp dir); returns the binary's path."""
    import hashlib
    import tempfile

    src = Path(__file__).resolve().parent / f"{name}.c"
    flags = ["-O2", "-Wall", "-Wextra"]
    digest = hashlib.sha256(src.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "bpflb-bench"
    cache.mkdir(exist_ok=True)
    binary = cache / f"{name}-{digest}"
    if not binary.exists():
        tmp = cache / f".{name}-{digest}.{os.getpid()}"
        subprocess.run(["gcc", *flags, "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, binary)
    return str(binary)


def percentile(xs: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), nearest rank on the sorted samples."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


@contextlib.contextmanager
def bpf_stats(on: bool = True) -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the block (run_time_ns / run_cnt per program), then as it was."""
    from lb import sysctl

    if not on:
        yield
        return
    before = sysctl.read("kernel/bpf_stats_enabled")
    sysctl.write("kernel/bpf_stats_enabled", "1")
    try:
        yield
    finally:
        sysctl.write("kernel/bpf_stats_enabled", before)
