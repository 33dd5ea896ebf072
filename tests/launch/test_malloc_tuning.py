"""The CLI's one restart with glibc's huge-page malloc: when it happens, what it passes on, when
it does not, and a bad VISTAX_MALLOC_TUNING value named."""

import platform
import sys

import pytest

from vistax.launch import cli

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def execs(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("VISTAX_MALLOC_TUNING", raising=False)
    return calls


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's tunables exist on Linux with glibc only")
def test_restarts_once_with_the_tunable_added(execs, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    cli._reexec_with_malloc_tuning()
    ((path, argv),) = execs
    assert path == sys.executable and argv == [sys.executable] + sys.orig_argv[1:]
    assert cli.os.environ["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:"
                                                 "glibc.malloc.hugetlb=1")
    cli._reexec_with_malloc_tuning()  # the restarted process sees the tunable: no second exec
    assert len(execs) == 1


def test_the_users_setting_and_the_switch_are_respected(execs, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    cli._reexec_with_malloc_tuning()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("VISTAX_MALLOC_TUNING", "0")
    cli._reexec_with_malloc_tuning()
    assert execs == []


def test_a_bad_switch_value_is_named(execs, monkeypatch):
    monkeypatch.setenv("VISTAX_MALLOC_TUNING", "yes")
    with pytest.raises(SystemExit, match="VISTAX_MALLOC_TUNING='yes'"):
        cli._reexec_with_malloc_tuning()
    assert execs == []
