"""A Tracer, and python3 tracer.py, given a broken copy of tracer.bpf.o
(issue 13): one line, "bad BPF object <path>: <what is wrong> (rebuild it
with make, or copy the tracer directory again)", exit 1 from the command
line, no traceback, and nothing made in the kernel: the object is checked
whole before the first bpf() call, so no fd, no tracefs entry and no cgroup
link can be left.
"""

import collections
import errno
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, need_root, need_tracepoint_backend
import abi
import backends
import bpfsys
import tracer
from test_abi import OFFSETS, SOCK_INFO, TELE_MAX, TUPLE, renamed_symbol, with_map_field
from test_elfload import Elf, _name_off, _nobits, _symbol_field, patched

OBJ = os.path.join(ROOT, "tracer.bpf.o")
HINT = " (rebuild it with make, or copy the tracer directory again)"

pytestmark = pytest.mark.root


def _object_bytes():
    with open(OBJ, "rb") as f:
        return f.read()


def _nobits_version(data):
    return _nobits(data, Elf(data).section("version"), len(data) + 4096)


def _two_functions_one_name(data):
    elf = Elf(data)
    kp, krp = elf.symbol("kp_tcp_sendmsg"), elf.symbol("krp_tcp_sendmsg")
    return patched(data, _symbol_field(elf, kp, 0), "<I", _name_off(data, elf, krp))


def _expected(data):
    """{case: (broken bytes, what the message says after the path)}"""
    elf = Elf(data)
    kp, krp = elf.symbol("kp_tcp_sendmsg"), elf.symbol("krp_tcp_sendmsg")
    return collections.OrderedDict([
        ("nobits-version", (_nobits_version(data),  # gap 1
                            "section %d 'version' is SHT_NOBITS: it has no bytes in the file"
                            % elf.section("version")["index"])),
        ("missing-offsets", (renamed_symbol(data, "offsets"),  # gap 3
                             "map 'offsets' is missing (expected ARRAY, key 4 bytes, value %d "
                             "bytes, 1 entry)" % OFFSETS)),
        ("short-telemetry", (with_map_field(data, "telemetry", "max_entries", 4),  # gap 4
                             "map 'telemetry': 4 entries, expected %d" % TELE_MAX)),
        ("two-functions", (_two_functions_one_name(data),  # gap 5
                           "two functions named 'krp_tcp_sendmsg': in section "
                           "'kprobe/tcp_sendmsg' at byte %d and in section "
                           "'kretprobe/tcp_sendmsg' at byte %d" % (kp["value"], krp["value"]))),
        ("lru-conns", (with_map_field(data, "conns", "type", 9),  # gap 6
                       "map 'conns': type LRU_HASH, expected HASH")),
        ("4-entry-conns", (with_map_field(data, "conns", "max_entries", 4),
                           "map 'conns': 4 entries, expected 65536")),
        ("conns-key", (with_map_field(data, "conns", "key_size", TUPLE - 4),
                       "map 'conns': key %d bytes, expected %d (struct conn_tuple)"
                       % (TUPLE - 4, TUPLE))),
        ("socks-value", (with_map_field(data, "socks", "value_size", SOCK_INFO - 8),
                         "map 'socks': value %d bytes, expected %d (struct sock_info)"
                         % (SOCK_INFO - 8, SOCK_INFO))),
    ])


CASES = list(_expected(_object_bytes()))


def _broken(tmp_path, case):
    """(path of the broken copy, the one line a user gets)"""
    data, what = _expected(_object_bytes())[case]
    path = str(tmp_path / "tracer.bpf.o")
    with open(path, "wb") as f:
        f.write(data)
    return path, "bad BPF object %s: %s%s" % (path, what, HINT)


def _forbid_the_kernel(monkeypatch):
    """Any bpf(), perf_event_open(), tracefs or backend probe fails the test."""
    def forbidden(what):
        def call(*args, **kw):
            raise AssertionError("%s called before the object was refused" % what)
        return call
    for name in ("bpf", "perf_event_open", "tracefs", "kprobe_pmu"):
        monkeypatch.setattr(bpfsys, name, forbidden("bpfsys." + name))
    monkeypatch.setattr(backends, "choose", forbidden("backends.choose"))


# --- the library ----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_tracer_refuses_a_broken_object_in_one_line_before_the_kernel(tmp_path, monkeypatch, case):
    need_root()
    path, line = _broken(tmp_path, case)
    before = bpfsys.open_fds()
    _forbid_the_kernel(monkeypatch)
    with pytest.raises(tracer.TracerError) as info:
        tracer.Tracer(obj_path=path)
    assert str(info.value) == line
    monkeypatch.undo()
    assert bpfsys.open_fds() == before
    assert bpfsys.our_kprobe_events() == []


def _a_backend():
    need_root()
    usable = [b for b, (ok, _) in sorted(backends.availability().items()) if ok]
    if not usable:
        pytest.skip("no backend works on this kernel")
    return usable[0]


def test_an_object_error_while_loading_is_a_bad_object_line(monkeypatch):
    # gap 2: an ObjectError from spec.load() came out as "unexpected ObjectError"
    backend = _a_backend()
    want = abi.programs_to_load
    monkeypatch.setattr(abi, "programs_to_load",
                        lambda backend, plan: want(backend, plan) + ["no_such_program"])
    monkeypatch.setattr(bpfsys, "bpf", lambda *a, **k: pytest.fail("bpf() called"))
    before = bpfsys.open_fds()
    with pytest.raises(tracer.TracerError) as info:
        tracer.Tracer(backend=backend)
    msg = str(info.value)
    assert msg.startswith("bad BPF object %s: no program named 'no_such_program' (have: cg_recvmsg4, "
                          % OBJ), msg
    assert msg.endswith(HINT) and "\n" not in msg
    monkeypatch.undo()
    assert bpfsys.open_fds() == before
    assert bpfsys.our_kprobe_events() == []


def test_max_conns_beyond_the_kernel_limit_is_one_line():
    need_root()
    with pytest.raises(tracer.TracerError) as info:
        tracer.Tracer(max_conns=1 << 31)
    assert str(info.value) == "max_conns 2147483648 is out of range (1 to 2147483647)"


def test_tracer_failing_to_attach_after_guessing_leaves_no_fd(monkeypatch):
    # (test_bpfsys.py made this failure with a 4-slot tp_fields map, which
    # abi now refuses before loading: here one attach point is missing)
    need_tracepoint_backend()
    real = bpfsys.attach_raw_tracepoint

    def attach(prog, name):
        if name == "tcp_destroy_sock":
            raise bpfsys.BPFError(errno.ENOENT, "bpf(BPF_RAW_TRACEPOINT_OPEN) for '%s' (program "
                                                "'%s')" % (name, prog.name))
        return real(prog, name)
    monkeypatch.setattr(bpfsys, "attach_raw_tracepoint", attach)
    before = bpfsys.open_fds()
    with pytest.raises(tracer.TracerError) as info:
        tracer.Tracer(backend="tracepoint")
    assert str(info.value) == (
        "attaching the tracepoint backend failed: bpf(BPF_RAW_TRACEPOINT_OPEN) for "
        "'tcp_destroy_sock' (program 'tp_tcp_destroy_sock'): ENOENT (No such file or directory)")
    assert bpfsys.open_fds() == before
    assert bpfsys.our_kprobe_events() == []


# --- the command line ---------------------------------------------------------------

# Loaded first by the tracer process (PYTHONPATH): records every bpf() and
# perf_event_open() call it makes, so that the test can say none was made.
SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, %r)
    import bpfsys

    def _recorded(name, real):
        def call(*args, **kw):
            with open(os.environ["TRACER_TEST_CALLS"], "a") as f:
                f.write(name + "\\n")
            return real(*args, **kw)
        return call
    bpfsys.bpf = _recorded("bpf", bpfsys.bpf)
    bpfsys.perf_event_open = _recorded("perf_event_open", bpfsys.perf_event_open)
""") % ROOT


Run = collections.namedtuple("Run", "pid returncode stdout stderr kernel_calls")


def _run_recorded(tmp_path, args):
    """python3 tracer.py ARGS, and the kernel calls it made."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    calls = tmp_path / "calls"
    if calls.exists():
        calls.unlink()
    env = dict(os.environ, PYTHONPATH=str(hook), TRACER_TEST_CALLS=str(calls))
    p = subprocess.Popen([sys.executable, "tracer.py"] + args, cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = p.communicate(timeout=60)
    return Run(p.pid, p.returncode, out, err, calls.read_text().split() if calls.exists() else [])


@pytest.mark.parametrize("case", CASES)
def test_cli_with_a_broken_object_is_one_line_exit_1(tmp_path, case):
    need_root()
    path, line = _broken(tmp_path, case)
    r = _run_recorded(tmp_path, ["--object", path, "--count", "1"])
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["tracer: error: " + line]
    assert r.stdout == ""
    assert r.kernel_calls == []  # no bpf(), no perf_event_open(): no fd, link or event to leave
    assert bpfsys.our_kprobe_events() == []
    assert not os.path.exists("/run/tracer-bpf-cgroup2-%d" % r.pid)


def test_the_recording_hook_sees_a_good_object_load(tmp_path):
    # the control for kernel_calls == [] above: with the real object it records
    need_tracepoint_backend()
    r = _run_recorded(tmp_path, ["--check", "--backend", "tracepoint"])
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.kernel_calls.count("bpf") > 10
