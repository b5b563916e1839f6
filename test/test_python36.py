"""The runtime really runs on the oldest Python it claims: 3.6."""

import glob
import json
import os
import shutil
import subprocess
import textwrap

import pytest

from conftest import ROOT, need_tracepoint_backend

SCRIPT = textwrap.dedent("""
    import json, socket, sys
    sys.path.insert(0, %r)
    import tracer
    with tracer.Tracer(backend="tracepoint") as t:
        lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
        c = socket.create_connection(lst.getsockname()); s, _ = lst.accept()
        c.sendall(b"x" * 12345); got = 0
        while got < 12345: got += len(s.recv(65536))
        recs = [r.as_dict() for r in t.poll() if r.lport == c.getsockname()[1]]
        print(json.dumps({"version": list(sys.version_info[:2]), "recs": recs}))
""")


def python36():
    """A real 3.6 interpreter (pyenv's shims may point at none)."""
    cands = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    cands += [p for p in [shutil.which("python3.6")] if p and "shims" not in p]
    for p in cands:
        if subprocess.call([p, "-c", "pass"], stderr=subprocess.DEVNULL) == 0:
            return p
    return None


def test_tracer_runs_and_counts_under_python_3_6():
    need_tracepoint_backend()
    py = python36()
    if py is None:
        pytest.skip("no Python 3.6 interpreter on this machine (tools/check_runtime.py still checks 3.6 syntax)")
    out = subprocess.check_output([py, "-c", SCRIPT % ROOT], universal_newlines=True)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["version"] == [3, 6]
    assert [(r["sent_bytes"], r["recv_bytes"], r["pid"] > 0) for r in got["recs"]] == [(12345, 0, True)]
