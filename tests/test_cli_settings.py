"""The agent's command line is built from lb/settings.py: every field whose docstring names a flag is
a flag, with the docstring as its help, and flags land in the right (nested) settings field."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from lb.cli import add_settings_flags, settings_from_flags
from lb.settings import MAP_SIZE_FLAGS, MapSizes, Paths, Settings, SyncSettings, field_docs, flag_of


def parser():
    p = argparse.ArgumentParser()
    add_settings_flags(p, Settings)
    return p


def flagged(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from flagged(hints[f.name], f"{prefix}{f.name}.")
        elif flag_of(cls, f.name):
            yield cls, prefix + f.name, f.name


def test_every_flagged_field_is_a_flag_with_its_docstring_as_help():
    help_text = " ".join(parser().format_help().split())
    fields = list(flagged(Settings))
    assert len(fields) >= 20
    for cls, _path, name in fields:
        flag = flag_of(cls, name)
        assert flag in help_text, flag
        first_words = " ".join(field_docs(cls)[name].split(":", 1)[1].split()[:4])
        assert first_words in help_text, (flag, first_words)


@pytest.mark.parametrize("argv, check", [
    pytest.param([], lambda s: s == dataclasses.replace(Settings(), node_name=s.node_name), id="no flags: the defaults"),
    pytest.param(["--svc-map-size", "1024", "--sync-period", "60"],
                 lambda s: s.maps.services == 1024 and s.sync.full_resync == 60.0 and s.maps.backends == MapSizes().backends,
                 id="nested groups"),
    pytest.param(["--no-strict", "--network-mode", "direct"], lambda s: not s.strict and s.network_mode == "direct",
                 id="bool and choices"),
    pytest.param(["--bpf-root", "/sys/fs/bpf/x", "--min-sync-period", "0.5"],
                 lambda s: s.paths.bpf_root == "/sys/fs/bpf/x" and s.sync == SyncSettings(min_interval=0.5),
                 id="paths and sync"),
])
def test_flags_fill_the_settings(argv, check):
    assert check(settings_from_flags(Settings, parser().parse_args(argv)))


def test_bad_choice_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--network-mode", "ipip"])
    assert "--network-mode" in capsys.readouterr().err


def test_map_size_flags_are_keyed_by_field():
    assert set(MAP_SIZE_FLAGS) == {f.name for f in dataclasses.fields(MapSizes)}
    assert MAP_SIZE_FLAGS["services"] == "--svc-map-size"
    assert flag_of(Paths, "cgroup_root") == "--cgroup-root"
