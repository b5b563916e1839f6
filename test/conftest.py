"""Shared fixtures: the repository on sys.path, root and kernel-feature
checks that skip with a printed reason, and a Tracer collector."""

import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "test"))


def pytest_configure(config):
    config.addinivalue_line("markers", "kprobe: needs a kernel with kprobes (run by make vm-test)")
    config.addinivalue_line("markers", "root: needs root")


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs (CI runs as root)")


def need_kprobes():
    import bpfsys
    if bpfsys.kprobe_pmu() is None and bpfsys.kprobe_events_path() is None:
        pytest.skip("kernel %s has no kprobes: these tests run under qemu via make vm-test"
                    % os.uname()[2])


def need_tracepoint_backend():
    need_root()
    import backends
    ok, why = backends.availability()["tracepoint"]
    if not ok:
        pytest.skip("tracepoint backend unavailable on %s: %s" % (os.uname()[2], why))


class Collector(object):
    """Polls a Tracer and keeps the latest record of every connection."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.latest = {}
        self.records = []

    def poll(self):
        got = self.tracer.poll()
        self.records.extend(got)
        for c in got:
            self.latest[c.key] = c
        return got

    def find(self, **match):
        return [c for c in self.latest.values()
                if all(getattr(c, k) == v for k, v in match.items())]

    def one(self, timeout=5.0, **match):
        """The single connection matching, once its match is complete."""
        deadline = time.time() + timeout
        while True:
            self.poll()
            found = self.find(**match)
            if len(found) == 1 or time.time() > deadline:
                assert len(found) == 1, "expected one connection matching %r, found %r (all: %r)" % (
                    match, found, list(self.latest.values()))
                return found[0]
            time.sleep(0.05)
