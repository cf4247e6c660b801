"""The one atomic-write helper (lb/atomicfile.py) and the one sysctl helper (lb/sysctl.py)."""
from __future__ import annotations

import builtins
import os
import stat
import subprocess
import sys

import pytest

from lb import atomicfile, sysctl
from lb.atomicfile import write_atomic


@pytest.mark.parametrize("data, mode, durable", [
    (b"\x7fELF binary", 0o755, True),
    ("text é", 0o644, True),
    ("hint", 0o600, False),
], ids=["bytes-exec", "str-utf8", "not-durable"])
def test_write_atomic_replaces_the_file_with_its_mode(tmp_path, data, mode, durable):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    old_inode = path.stat().st_ino
    with open(path, "rb") as reader:  # a reader (or a running binary) keeps the old file
        write_atomic(str(path), data, mode, durable=durable)
        assert reader.read() == b"old"
    assert path.read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.stat().st_ino != old_inode
    assert os.listdir(tmp_path) == ["f"]  # no temporary left


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomicfile.os, "replace", refuse)
    with pytest.raises(OSError):
        write_atomic(str(path), b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_write_atomic_into_a_missing_directory_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(str(tmp_path / "nope" / "f"), b"x")


@pytest.fixture
def fake_proc(tmp_path, monkeypatch):
    (tmp_path / "net/ipv4/conf/eth0.100").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("0\n")
    (tmp_path / "net/ipv4/conf/eth0.100/rp_filter").write_text("1\n")
    monkeypatch.setattr(sysctl, "ROOT", str(tmp_path))
    return tmp_path


def test_sysctl_write_then_read(fake_proc):
    assert sysctl.read("net/ipv4/ip_forward") == "0"
    assert sysctl.write("net/ipv4/ip_forward", "1") is True
    assert sysctl.read("net/ipv4/ip_forward") == "1"
    assert sysctl.write("net/ipv4/ip_forward", "1") is False  # already right: not written again


def test_an_equal_value_is_only_read(fake_proc, monkeypatch):
    """No write access is needed for a setting that is already right (a read-only /proc/sys)."""
    modes = []
    real_open = builtins.open

    def spy(path, mode="r", *a, **kw):
        modes.append(mode)
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(builtins, "open", spy)
    assert sysctl.write("net/ipv4/conf/eth0.100/rp_filter", "1") is False
    assert modes == ["r"]


@pytest.mark.parametrize("call, message", [
    (lambda: sysctl.read("net/ipv4/conf/nope0/rp_filter"), "sysctl net.ipv4.conf.nope0.rp_filter: No such file"),
    (lambda: sysctl.write("net/ipv4/conf/nope0/rp_filter", "0"), "sysctl net.ipv4.conf.nope0.rp_filter=0: No such file"),
], ids=["read", "write"])
def test_a_failure_names_the_setting(fake_proc, call, message):
    with pytest.raises(sysctl.SysctlError) as e:
        call()
    assert str(e.value).startswith(message) and isinstance(e.value, OSError) and e.value.errno == 2


def test_sysctl_on_the_real_kernel_in_a_fresh_network_namespace():
    """Written in a namespace of its own (unshare), so the host's settings are never touched."""
    code = ("from lb import sysctl; before = sysctl.read('net/ipv4/ip_forward'); "
            "changed = sysctl.write('net/ipv4/ip_forward', '1'); "
            "print(before, changed, sysctl.read('net/ipv4/ip_forward'), sysctl.write('net/ipv4/ip_forward', '1'))")
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True).stdout.split()
    assert out == ["0", "True", "1", "False"]
