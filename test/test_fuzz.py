"""Issue 13's fuzz test: broken copies of tracer.bpf.o are refused with the
loader's own error and nothing else, quickly, in bounded memory, and
without touching the kernel.

COUNT seeded mutations (test/objfuzz.py: bit flips, byte overwrites,
truncations, ELF header, section, symbol, relocation, map definition and
string table edits, NOBITS on every section, oversized and overlapping
sections, duplicate names, several at once) each go through all that
Tracer does before its first bpf() call: elfload.parse, abi.check_object,
and linking every program's map loads (objfuzz.before_the_kernel).  Each case runs
under a 1 s alarm and an address-space limit of MEMORY_LIMIT above the
process's own: elfload.ObjectError, one printable line naming the file, is
the only exception allowed.  A sample of the refused copies then goes
through Tracer() and through python3 tracer.py (root): one line, exit 1,
no bpf() call, nothing left in the kernel.

TRACER_FUZZ_SEED and TRACER_FUZZ_COUNT change the run; a failure names
the seed and case, and `python3 test/objfuzz.py SEED CASE OUT` makes that
copy again.
"""

import collections
import os
import resource
import signal
import time

import pytest

import abi
import bpfsys
import elfload
import objfuzz
import tracer
from conftest import ROOT, need_root
from test_bad_object import HINT, _forbid_the_kernel, _run_recorded
from test_elfload import Elf, _symbol_field, patched

OBJ = os.path.join(ROOT, "tracer.bpf.o")
SEED = int(os.environ.get("TRACER_FUZZ_SEED", "13"))
COUNT = int(os.environ.get("TRACER_FUZZ_COUNT", str(200 * len(objfuzz.KINDS))))
TIME_LIMIT = 1.0  # seconds per case
MEMORY_LIMIT = 200 << 20  # bytes of address space a case may add

Case = collections.namedtuple("Case", "number kind what refusal failure seconds")


class Hang(Exception):
    """A case ran past TIME_LIMIT (raised by SIGALRM)."""


def limited(fn, *args):
    """fn(*args) under a TIME_LIMIT alarm and an address space of at most
    MEMORY_LIMIT more than now: (the ObjectError's message or None, what
    went wrong or None, seconds taken)."""
    def alarm(signum, frame):
        raise Hang("over %.1f s" % TIME_LIMIT)
    with open("/proc/self/statm") as f:
        cap = int(f.read().split()[0]) * resource.getpagesize() + MEMORY_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    old = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_AS, (min(v for v in (cap, soft) if v != resource.RLIM_INFINITY),
                                            hard))
    refusal = failure = None
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
        try:
            fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except elfload.ObjectError as e:
        refusal = str(e)
    except Exception as e:  # a loader bug: struct.error, KeyError, MemoryError, Hang, ...
        failure = "%s: %s" % (type(e).__name__, e)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old)
    took = time.monotonic() - start
    if took > TIME_LIMIT and failure is None:
        failure = "took %.2f s" % took
    return refusal, failure, took


def run_case(data, elf, number):
    broken, what = objfuzz.mutant(data, elf, SEED, number)
    path = "seed-%d-case-%d.o" % (SEED, number)
    refusal, failure, took = limited(objfuzz.before_the_kernel, broken, path)
    if refusal is not None and not (refusal.startswith(path + ": ") and refusal.isprintable()):
        failure = "not one printable line naming the file: %r" % refusal
    return Case(number, what.split(":")[0], what, refusal, failure, took)


@pytest.fixture(scope="module")
def data():
    with open(OBJ, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def cases(data):
    elf = Elf(data)
    start = time.monotonic()
    out = [run_case(data, elf, n) for n in range(COUNT)]
    print("\n%d mutations of tracer.bpf.o (seed %d) in %.1f s, the slowest %.3f s" % (
        COUNT, SEED, time.monotonic() - start, max(c.seconds for c in out)))
    return out


def _sample(cases, data, tmp_path):
    """The first refused case of each kind: [(case, its file)]."""
    first = collections.OrderedDict()
    for c in cases:
        if c.refusal is not None:
            first.setdefault(c.kind, c)
    out = []
    elf = Elf(data)
    for c in first.values():
        path = str(tmp_path / ("case-%d.o" % c.number))
        with open(path, "wb") as f:
            f.write(objfuzz.mutant(data, elf, SEED, c.number)[0])
        out.append((c, path))
    return out


# --- in this process, without privileges ------------------------------------------------

def test_mutations_raise_object_error_and_nothing_else_within_1_s_and_200_mb(cases):
    failures = ["seed %d case %d (%s): %s" % (SEED, c.number, c.what[:300], c.failure)
                for c in cases if c.failure]
    assert not failures, "%d of %d cases failed; remake one with python3 test/objfuzz.py " \
        "SEED CASE OUT:\n%s" % (len(failures), len(cases), "\n".join(failures[:20]))


def test_every_kind_of_mutation_is_made_and_mostly_refused(cases):
    assert len(cases) >= 2000
    refused = collections.Counter(c.kind for c in cases if c.refusal)
    made = collections.Counter(c.kind for c in cases)
    print("\nrefused/made per kind: " + ", ".join("%s %d/%d" % (k.__name__, refused[k.__name__],
                                                                 made[k.__name__])
                                                   for k in objfuzz.KINDS))
    assert sorted(made) == sorted(k.__name__ for k in objfuzz.KINDS)
    assert all(refused[k] > 0 for k in made), refused
    # accepted copies are changes only the verifier can judge (code bytes, a
    # symbol nobody reads, a value set to what it was)
    assert sum(refused.values()) > 0.7 * len(cases)


def test_nobits_is_tried_on_every_section(cases, data):
    made = set(c.what.split(" (")[0] for c in cases if c.kind == "nobits")
    assert made == set("nobits: section %d" % s["index"] for s in Elf(data).sections)


@pytest.mark.parametrize("build", [
    lambda: objfuzz.many_sections(12000),       # a symbol scan per section was quadratic
    lambda: objfuzz.many_relocations(12000),    # a function scan per relocation was quadratic
    lambda: objfuzz.long_names(3000, 100000),   # 3000 names of ~100 kB each: 300 MB
], ids=["many-sections", "many-relocations", "long-names"])
def test_objects_no_mutation_reaches_are_handled_in_time_and_memory(build):
    refusal, failure, _ = limited(objfuzz.before_the_kernel, build(), "big.o")
    assert failure is None
    assert refusal is not None and refusal.startswith("big.o: ")


def _spin():
    while True:
        pass


def test_the_limits_catch_a_hang_and_a_huge_allocation():
    assert limited(bytearray, 2 * MEMORY_LIMIT)[:2] == (None, "MemoryError: ")
    assert limited(_spin)[:2] == (None, "Hang: over 1.0 s")


# --- what fuzzing made the loader refuse, one line each ------------------------------

def _refused(broken):
    with pytest.raises(elfload.ObjectError) as info:
        objfuzz.before_the_kernel(broken, "broken.o")
    return str(info.value)


def test_a_section_laid_over_the_next_one(data):
    elf = Elf(data)
    sec = elf.section("kprobe/tcp_sendmsg")
    after = next(s for s in elf.sections if s["offset"] == sec["offset"] + sec["size"] and s["size"])
    assert _refused(patched(data, sec["hdr"] + 32, "<Q", sec["size"] + 8)) == (
        "broken.o: section %d 'kprobe/tcp_sendmsg' (bytes %d-%d) overlaps section %d %r "
        "(bytes %d-%d)" % (sec["index"], sec["offset"], sec["offset"] + sec["size"] + 8,
                           after["index"], after["name"], after["offset"],
                           after["offset"] + after["size"]))


def test_two_functions_sharing_instructions(data):
    elf = Elf(data)
    guess = elf.symbol("guess_tcp_sendmsg")  # first in kprobe/tcp_sendmsg, kp_tcp_sendmsg next
    assert _refused(patched(data, _symbol_field(elf, guess, 16), "<Q", guess["size"] + 8)) == (
        "broken.o: functions 'guess_tcp_sendmsg' and 'kp_tcp_sendmsg' overlap in section "
        "'kprobe/tcp_sendmsg'")


def test_a_symbol_table_cut_inside_a_symbol(data):
    elf = Elf(data)
    size = elf.symtab["size"] - 8
    assert _refused(patched(data, elf.symtab["hdr"] + 32, "<Q", size)) == (
        "broken.o: the symbol table (section %d) is %d bytes, not a whole number of 24-byte "
        "symbols" % (elf.symtab["index"], size))


def test_a_relocation_section_cut_inside_a_relocation(data):
    elf = Elf(data)
    rel = next(s for s in elf.sections if s["type"] == 9)
    assert _refused(patched(data, rel["hdr"] + 32, "<Q", rel["size"] - 8)) == (
        "broken.o: section %d %r is %d bytes, not a whole number of 16-byte relocations"
        % (rel["index"], rel["name"], rel["size"] - 8))


def test_a_name_longer_than_any_kernel_name():
    assert _refused(objfuzz.long_names(1, elfload.MAX_NAME + 1)) == (
        "broken.o: a name of over 1024 bytes in a string table")


def test_a_map_the_tracer_does_not_know(data):
    # it would be made in the kernel with whatever shape the file gives it
    spec = elfload.parse(data, "broken.o")
    spec.maps["extra"] = elfload.MapSpec("extra", abi.HASH, 4, 4, 1, 0)
    with pytest.raises(elfload.ObjectError) as info:
        abi.check_object(spec)
    assert str(info.value) == (
        "broken.o: map 'extra' is unknown to this tracer (its maps: %s)"
        % ", ".join(abi.MAPS_BY_NAME))


# --- through Tracer and the command line (root) -----------------------------------------

def test_refused_mutations_through_tracer_raise_one_line_before_the_kernel(cases, data, tmp_path,
                                                                          monkeypatch):
    need_root()
    for c, path in _sample(cases, data, tmp_path)[::3]:
        line = "bad BPF object %s: %s%s" % (path, c.refusal.split(": ", 1)[1], HINT)
        before = bpfsys.open_fds()
        _forbid_the_kernel(monkeypatch)
        with pytest.raises(tracer.TracerError) as info:
            tracer.Tracer(obj_path=path)
        monkeypatch.undo()
        assert str(info.value) == line, c.what
        assert bpfsys.open_fds() == before, c.what
        assert bpfsys.our_kprobe_events() == []


def test_refused_mutations_through_the_cli_are_one_line_exit_1_and_leave_nothing(cases, data,
                                                                               tmp_path):
    need_root()
    sample = _sample(cases, data, tmp_path)
    assert len(sample) == len(objfuzz.KINDS)
    for c, path in sample:
        line = "tracer: error: bad BPF object %s: %s%s" % (path, c.refusal.split(": ", 1)[1], HINT)
        r = _run_recorded(tmp_path, ["--object", path, "--interval", "1", "--count", "1"])
        where = "seed %d case %d (%s)" % (SEED, c.number, c.what[:200])
        assert (r.returncode, r.stdout, r.stderr.splitlines()) == (1, "", [line]), where
        assert r.kernel_calls == [], where  # no bpf(), no perf_event_open(): nothing to leave
        assert bpfsys.our_kprobe_events() == [], where
        assert not os.path.exists("/run/tracer-bpf-cgroup2-%d" % r.pid), where
