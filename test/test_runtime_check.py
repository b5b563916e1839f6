"""tools/check_runtime.py: the runtime modules pass; code that needs a newer
Python or a third-party package fails, one line per violation."""

import importlib.util
import io
import os
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_runtime.py")

pytestmark = pytest.mark.skipif(sys.version_info < (3, 8),
                                reason="check_runtime needs Python 3.8+ (ast feature_version)")


def run_script(*args):
    """The checker as CI runs it: (exit status, stdout lines, stderr)."""
    p = subprocess.run([sys.executable, TOOL] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, cwd=ROOT)
    return p.returncode, p.stdout.splitlines(), p.stderr


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_runtime", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOOL_MODULE = _load_tool() if sys.version_info >= (3, 8) else None


def run(*args):
    """In-process (fast): (exit status, stdout lines), from the repo root."""
    cwd = os.getcwd()
    out = io.StringIO()
    try:
        os.chdir(ROOT)
        with redirect_stdout(out):
            rc = TOOL_MODULE.main(list(args))
    finally:
        os.chdir(cwd)
    return rc, out.getvalue().splitlines(), ""


def check(tmp_path, source, name="mod.py"):
    path = tmp_path / name
    path.write_text(source)
    return run(str(path))


def test_the_runtime_modules_pass():
    rc, out, err = run_script()
    top = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert {"tracer.py", "bpfsys.py", "elfload.py", "offsetguess.py", "conntrack.py",
            "backends.py"} <= set(top)
    assert (rc, out, err) == (0, ["check_runtime: %d files use Python 3.6 syntax and the "
                                  "standard library only" % len(top)], "")


def test_match_walrus_and_numpy_each_fail_on_their_line(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("import numpy\n")
    rc, out, _ = run_script(str(path))
    assert rc == 1
    assert out == ["%s:1: import of numpy: not in the standard library (runtime is stdlib-only)"
                   % os.path.relpath(str(tmp_path / "mod.py"), ROOT)]
    rc, out, _ = check(tmp_path, "x = 1\nif (n := 10) > 5:\n    pass\n")
    assert rc == 1 and len(out) == 1
    assert out[0].endswith(":2: not Python 3.6 syntax: Assignment expressions are only "
                           "supported in Python 3.8 and greater")
    rc, out, _ = check(tmp_path, "import sys\nmatch sys.argv:\n    case _:\n        pass\n")
    assert rc == 1 and len(out) == 1
    assert "not Python 3.6 syntax: Pattern matching is only supported in Python 3.10" in out[0]
    # all three in one file: the syntax error is what is reported
    rc, out, _ = check(tmp_path, "import numpy\nif (n := 1):\n    match n:\n        case 1:\n"
                                 "            pass\n")
    assert rc == 1 and len(out) == 1 and "not Python 3.6 syntax" in out[0]


@pytest.mark.parametrize("source,message", [
    ("def f(a, /):\n    return a\n", "Positional-only parameters"),
    ("x = 1\nprint(f'{x=}')\n", "self"),  # "self documenting" (parser) or "self-documenting" (ours)
    ("with (open('a') as a, open('b') as b):\n    pass\n", "Parenthesized context managers"),
    ("from __future__ import annotations\n", "from __future__ import annotations: added in Python 3.7"),
    ("import dataclasses\n", "import of dataclasses: added in Python 3.7"),
    ("from importlib import metadata\n", "import of importlib.metadata: added in Python 3.8"),
    ("import time\nt = time.monotonic_ns()\n", "time.monotonic_ns: added in Python 3.7"),
    ("from threading import get_native_id\n", "threading.get_native_id: added in Python 3.8"),
    ("import subprocess as sp\nsp.run(['true'], capture_output=True)\n",
     "subprocess.run(capture_output=...): added in Python 3.7"),
    ("s = 'ab'.removeprefix('a')\n", ".removeprefix(): added in Python 3.9"),
    ("def f(x: list[int]) -> None:\n    pass\n", "annotation list[...]: built-in generics need Python 3.9"),
    ("def f(x: int | None):\n    pass\n", "annotation X | Y: needs Python 3.10"),
    ("from . import bpfsys\n", "relative import"),
    ("import requests.adapters\n", "import of requests.adapters: not in the standard library"),
    ("m = __import__('yaml')\n", "import of yaml: not in the standard library"),
], ids=["posonly", "fstring_eq", "paren_with", "future_annotations", "dataclasses",
        "importlib_metadata", "monotonic_ns", "get_native_id", "capture_output", "removeprefix",
        "generic_annotation", "union_annotation", "relative", "requests", "dunder_import"])
def test_newer_than_36_or_not_stdlib_fails(tmp_path, source, message):
    rc, out, _ = check(tmp_path, source)
    assert rc == 1
    assert len(out) == 1 and message in out[0], out


def test_stdlib_and_own_modules_and_36_syntax_pass(tmp_path):
    source = (
        "import os, sys, socket, struct, ctypes, json, errno\n"
        "import os.path\n"
        "from collections import OrderedDict\n"
        "import bpfsys, elfload\n"          # the project's own modules
        "import helper\n"                   # a sibling of the checked file
        "x: int = 1\n"
        "def f(*, a, **kw):\n"
        "    return f'{a!r:>{x}}' + 'b'.upper()\n"
        "async def g():\n"
        "    return [i async for i in h()]\n"
        "n = 1_000\n"
        "print(time.monotonic(), *[1, 2])\n")
    (tmp_path / "helper.py").write_text("")
    rc, out, _ = check(tmp_path, source)
    assert (rc, out) == (0, ["check_runtime: 1 files use Python 3.6 syntax and the standard "
                             "library only"])


def test_every_violation_in_a_directory_is_reported(tmp_path):
    (tmp_path / "a.py").write_text("import numpy\nimport scipy\n")
    (tmp_path / "b.py").write_text("import os\n")
    (tmp_path / "c.py").write_text("y = (z := 2)\n")
    rc, out, _ = run(str(tmp_path))
    rel = lambda n: os.path.relpath(str(tmp_path / n), ROOT)
    assert rc == 1
    assert [l.split(": ", 1)[0] for l in out] == [rel("a.py") + ":1", rel("a.py") + ":2",
                                                   rel("c.py") + ":1"]
