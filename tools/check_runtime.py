#!/usr/bin/env python3
"""check_runtime: the runtime modules run on Python 3.6 with the standard
library only.

For each top-level *.py of the repository (or each file or directory given):
  - the syntax parses as Python 3.6 (ast.parse with feature_version=(3, 6):
    no walrus, positional-only parameters, match, parenthesized context
    managers, except*, f"{x=}");
  - `from __future__ import annotations` (3.7) and annotations that
    evaluate to built-in generics or X | Y (3.9, 3.10) are refused;
  - every import is of the standard library (sys.stdlib_module_names, less
    the modules added after 3.6) or of the project's own top-level modules;
  - a short list of standard-library names added after 3.6 is refused
    (time.monotonic_ns, threading.get_native_id, subprocess's
    capture_output/text, str.removeprefix, ...).

Prints one line per violation (path:line: what) and exits 1; exits 0 and
says how many files it checked otherwise.  Needs Python 3.8+ to run (for
feature_version); what it checks is 3.6.

    python3 tools/check_runtime.py [PATH ...]
"""

import ast
import importlib.util
import os
import re
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = (3, 6)

# standard-library modules newer than the target, with the version that added them
NEW_MODULES = {
    "dataclasses": "3.7", "contextvars": "3.7", "importlib.resources": "3.7",
    "importlib.metadata": "3.8", "graphlib": "3.9", "zoneinfo": "3.9", "tomllib": "3.11",
}
# module attributes newer than the target
NEW_ATTRS = {
    ("time", "monotonic_ns"): "3.7", ("time", "time_ns"): "3.7", ("time", "perf_counter_ns"): "3.7",
    ("time", "process_time_ns"): "3.7", ("time", "thread_time_ns"): "3.7",
    ("time", "clock_gettime_ns"): "3.7",
    ("contextlib", "nullcontext"): "3.7", ("contextlib", "asynccontextmanager"): "3.7",
    ("asyncio", "run"): "3.7", ("asyncio", "create_task"): "3.7",
    ("threading", "get_native_id"): "3.8", ("math", "prod"): "3.8", ("math", "isqrt"): "3.8",
    ("math", "comb"): "3.8", ("math", "perm"): "3.8", ("math", "dist"): "3.8",
    ("shlex", "join"): "3.8", ("functools", "cached_property"): "3.8",
    ("socket", "create_server"): "3.8", ("socket", "has_dualstack_ipv6"): "3.8",
    ("functools", "cache"): "3.9", ("os", "waitstatus_to_exitcode"): "3.9",
    ("os", "pidfd_open"): "3.9", ("random", "randbytes"): "3.9", ("math", "lcm"): "3.9",
    ("itertools", "pairwise"): "3.10", ("sys", "stdlib_module_names"): "3.10",
    ("os", "eventfd"): "3.10", ("os", "splice"): "3.10",
}
# methods of built-in types newer than the target (any object's attribute)
NEW_METHODS = {"removeprefix": "3.9", "removesuffix": "3.9", "bit_count": "3.10"}
# keyword arguments newer than the target: (module, function) -> {kwarg: version}
NEW_KWARGS = {
    ("subprocess", "run"): {"capture_output": "3.7", "text": "3.7"},
    ("subprocess", "Popen"): {"text": "3.7"},
    ("subprocess", "check_output"): {"text": "3.7"},
    ("subprocess", "check_call"): {"text": "3.7"},
    ("subprocess", "call"): {"text": "3.7"},
}
BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def _parser_catches(src):
    try:
        ast.parse(src, feature_version=TARGET)
    except SyntaxError:
        return True
    return False


# Python 3.8-3.10 accept f"{x=}" whatever feature_version says
_FSTRING_DEBUG_CAUGHT = _parser_catches('f"{x=}"')
_FSTRING_DEBUG = re.compile(r"[^=!<>]=\s*(![rsa])?\s*(:[^{}]*)?}")


def stdlib_modules():
    if hasattr(sys, "stdlib_module_names"):
        return set(sys.stdlib_module_names)
    return None  # decided per module by where it lives


def _is_stdlib_by_location(name):
    if name in sys.builtin_module_names:
        return True
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    where = os.path.realpath(spec.origin or "")
    return where.startswith(stdlib + os.sep) and "site-packages" not in where


def own_modules(paths):
    """Top-level module names of the project and of the checked files' directories."""
    dirs = set([ROOT]) | set(os.path.dirname(os.path.abspath(p)) for p in paths)
    names = set()
    for d in dirs:
        for f in os.listdir(d):
            if f.endswith(".py"):
                names.add(f[:-3])
    return names


def runtime_files(args):
    if not args:
        args = [ROOT]
    out = []
    for a in args:
        if os.path.isdir(a):
            out.extend(os.path.join(a, f) for f in sorted(os.listdir(a)) if f.endswith(".py"))
        else:
            out.append(a)
    return out


class Checker(ast.NodeVisitor):
    def __init__(self, path, src, stdlib, own):
        self.path = path
        self.src = src
        self.stdlib = stdlib
        self.own = own
        self.aliases = {}  # local name -> module it is bound to
        self.problems = []

    def say(self, node, msg):
        self.problems.append((getattr(node, "lineno", 0), msg))

    # imports
    def _module(self, node, name):
        top = name.split(".")[0]
        for new, version in NEW_MODULES.items():
            if name == new or name.startswith(new + "."):
                self.say(node, "import of %s: added in Python %s (runtime must run on 3.6)"
                         % (name, version))
                return
        if top in self.own:
            return
        ok = top in self.stdlib if self.stdlib is not None else _is_stdlib_by_location(top)
        if not ok:
            self.say(node, "import of %s: not in the standard library (runtime is stdlib-only)" % name)

    def visit_Import(self, node):
        for a in node.names:
            self._module(node, a.name)
            if a.asname:
                self.aliases[a.asname] = a.name
            else:
                self.aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        if node.level:
            self.say(node, "relative import: runtime modules are flat top-level files")
        elif node.module == "__future__":
            for a in node.names:
                if a.name == "annotations":
                    self.say(node, "from __future__ import annotations: added in Python 3.7")
        else:
            self._module(node, node.module)
            for a in node.names:
                version = NEW_ATTRS.get((node.module, a.name))
                if version:
                    self.say(node, "%s.%s: added in Python %s" % (node.module, a.name, version))
                elif "%s.%s" % (node.module, a.name) in NEW_MODULES:
                    self._module(node, "%s.%s" % (node.module, a.name))
        self.generic_visit(node)

    # newer names
    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            mod = self.aliases[node.value.id]
            version = NEW_ATTRS.get((mod, node.attr))
            if version:
                self.say(node, "%s.%s: added in Python %s" % (mod, node.attr, version))
        if node.attr in NEW_METHODS:
            self.say(node, ".%s(): added in Python %s" % (node.attr, NEW_METHODS[node.attr]))
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in self.aliases:
            new = NEW_KWARGS.get((self.aliases[f.value.id], f.attr), {})
            for kw in node.keywords:
                if kw.arg in new:
                    self.say(node, "%s.%s(%s=...): added in Python %s" % (
                        self.aliases[f.value.id], f.attr, kw.arg, new[kw.arg]))
        if isinstance(f, ast.Name) and f.id == "__import__" or (
                isinstance(f, ast.Attribute) and f.attr == "import_module"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                self._module(node, node.args[0].value)
        self.generic_visit(node)

    # annotations are evaluated at definition time on 3.6
    def _annotation(self, ann):
        if ann is None:
            return
        for n in ast.walk(ann):
            if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and \
                    n.value.id in BUILTIN_GENERICS:
                self.say(n, "annotation %s[...]: built-in generics need Python 3.9" % n.value.id)
            elif isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
                self.say(n, "annotation X | Y: needs Python 3.10")

    def visit_arg(self, node):
        self._annotation(node.annotation)
        self.generic_visit(node)

    def _function(self, node):
        self._annotation(node.returns)
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node):
        self._annotation(node.annotation)
        self.generic_visit(node)

    def visit_JoinedStr(self, node):
        if not _FSTRING_DEBUG_CAUGHT:
            seg = ast.get_source_segment(self.src, node) or ""
            if _FSTRING_DEBUG.search(seg):
                self.say(node, 'f-string "{x=}": self-documenting expressions need Python 3.8')
        self.generic_visit(node)


def check_file(path, stdlib, own):
    """[(line, message)] for one file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (IOError, OSError) as e:
        return [(0, "cannot read: %s" % e.strerror)]
    try:
        src = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [(0, "not UTF-8 (Python 3 source default): %s" % e)]
    try:
        tree = ast.parse(src, filename=path, feature_version=TARGET)
    except SyntaxError as e:
        return [(e.lineno or 0, "not Python 3.6 syntax: %s" % e.msg)]
    c = Checker(path, src, stdlib, own)
    c.visit(tree)
    return sorted(c.problems)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if sys.version_info < (3, 8):
        print("check_runtime: needs Python 3.8 or newer to run (ast feature_version)", file=sys.stderr)
        return 2
    files = runtime_files(args)
    stdlib, own = stdlib_modules(), own_modules(files)
    bad = 0
    for path in files:
        rel = os.path.relpath(path)
        for line, msg in check_file(path, stdlib, own):
            print("%s:%d: %s" % (rel, line, msg))
            bad += 1
    if bad:
        return 1
    print("check_runtime: %d files use Python 3.6 syntax and the standard library only" % len(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
