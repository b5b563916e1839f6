"""tracer.bpf.o and the tests' test/selftest.bpf.o are what `make` builds
from the checked-in sources, byte for byte, wherever the checkout lives and
however often they are built."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("tracer.bpf.c", "tracer.bpf.h", "Makefile", "test/selftest.bpf.c")
OBJECTS = ("tracer.bpf.o", "test/selftest.bpf.o")


def need_toolchain():
    missing = [t for t in ("clang", "make") if not shutil.which(t)]
    if missing:
        print("%s absent: the object is not rebuilt" % " and ".join(missing))
        pytest.skip("%s absent: cannot rebuild tracer.bpf.o (CI installs clang)" % " and ".join(missing))


def build(directory):
    """Copy the sources into directory, run make there, return the objects'
    bytes, one after the other."""
    os.makedirs(os.path.join(directory, "test"))
    for name in SOURCES:
        shutil.copy(os.path.join(ROOT, name), os.path.join(directory, name))
    proc = subprocess.run(["make", "-s"], cwd=directory, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode == 0, "make failed in %s:\n%s" % (directory, proc.stdout)
    return _read(directory)


def _read(directory):
    out = b""
    for name in OBJECTS:
        with open(os.path.join(directory, name), "rb") as f:
            out += f.read()
    return out


def checked_in():
    return _read(ROOT)


def first_difference(a, b):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return "sizes %d and %d, first difference at byte %d" % (len(a), len(b), n)


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    """One fresh build, shared by the tests below."""
    need_toolchain()
    return build(str(tmp_path_factory.mktemp("build") / "a"))


def test_checked_in_object_matches_a_fresh_build(first_build):
    fresh = first_build
    old = checked_in()
    assert fresh == old, "tracer.bpf.o or test/selftest.bpf.o is stale (run make and commit): " + \
        first_difference(fresh, old)


def test_building_twice_in_different_directories_gives_identical_bytes(first_build, tmp_path):
    a = first_build
    b = build(str(tmp_path / "a_much_longer_directory_name" / "nested" / "b"))
    assert a == b, "build depends on its directory: " + first_difference(a, b)


def test_builds_in_a_directory_with_a_space(tmp_path):
    need_toolchain()
    assert build(str(tmp_path / "with space")) == checked_in()
