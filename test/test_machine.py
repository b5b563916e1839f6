"""x86-64 only (issue 13): on another machine the library, the command line
and --check say so in one line, before anything touches the kernel."""

import platform

import pytest

import bpfsys
import cli
import tracer


@pytest.fixture
def arm(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")


def test_machine_error_names_the_machine():
    assert bpfsys.machine_error("x86_64") is None
    msg = bpfsys.machine_error("aarch64")
    assert msg.startswith("tracer-bpf runs on x86_64 only") and msg.endswith("this machine is aarch64")
    assert "\n" not in msg


def test_library_refuses_another_machine(arm):
    with pytest.raises(tracer.TracerError) as e:
        tracer.Tracer()
    assert str(e.value) == bpfsys.machine_error("aarch64")


def test_cli_and_check_refuse_another_machine(arm, monkeypatch, capsys):
    assert cli.main(["--count", "1"]) == 1
    err = capsys.readouterr().err
    assert err == "tracer: error: %s\n" % bpfsys.machine_error("aarch64")
    assert cli.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "result:   FAILED: %s" % bpfsys.machine_error("aarch64")
