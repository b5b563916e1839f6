"""abi.py mirrors tracer.bpf.h: every struct, every field, every constant.

A tiny C program generated from abi's descriptions includes tracer.bpf.h
and prints sizeof and offsetof of every field of every abi.STRUCTS entry and
the value of every abi.CONSTANTS macro (compiled with the host cc/clang;
x86-64 lays these structs out as BPF does); each is compared with abi.  A
field or macro abi names that the header lacks fails the compile; one the
header has that abi lacks is found by reading the header's struct and
#define names.  With clang, the same layout is also checked for -target bpf
with _Static_assert (compile only).
"""

import os
import re
import shutil
import subprocess

import pytest

import abi
import backends
import elfload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "tracer.bpf.h")


def _compiler():
    for cc in (os.environ.get("CC"), "cc", "clang", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _program():
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "tracer.bpf.h"',
             '#define F(s, f) printf("%s.%s %zu %zu\\n", #s, #f, offsetof(struct s, f), '
             'sizeof(((struct s *)0)->f))',
             'int main(void) {']
    for st in abi.STRUCTS:
        lines.append('printf("%s %%zu\\n", sizeof(struct %s));' % (st.c_name, st.c_name))
        lines.extend("F(%s, %s);" % (st.c_name, f) for f in st.names)
    lines.extend('printf("%s %%lld\\n", (long long)(%s));' % (m, m) for m in abi.CONSTANTS)
    lines.append("return 0; }")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """{"struct": size, "struct.field": (offset, size), "MACRO": value}"""
    cc = _compiler()
    if cc is None:
        print("no C compiler (cc, clang or gcc): layout checks skipped")
        pytest.skip("no C compiler (cc, clang or gcc) to compile the layout probe; CI installs clang")
    d = tmp_path_factory.mktemp("layout")
    src, exe = str(d / "layout.c"), str(d / "layout")
    with open(src, "w") as f:
        f.write(_program())
    subprocess.check_call([cc, "-Wall", "-Werror", "-I", ROOT, src, "-o", exe])
    out = {}
    for line in subprocess.check_output([exe], universal_newlines=True).splitlines():
        parts = line.split()
        out[parts[0]] = tuple(int(x) for x in parts[1:]) if len(parts) > 2 else int(parts[1])
    return out


@pytest.fixture(scope="module")
def header():
    with open(HEADER) as f:
        return f.read()


@pytest.mark.parametrize("st", abi.STRUCTS, ids=lambda st: st.c_name)
def test_struct_mirrors_the_c_struct_field_by_field(c_layout, st):
    assert st.size == c_layout[st.c_name], "struct %s is %d bytes in C, %d in abi" % (
        st.c_name, c_layout[st.c_name], st.size)
    for name in st.names:
        assert (st.offset(name), st.field_size(name)) == c_layout["%s.%s" % (st.c_name, name)], \
            "%s.%s" % (st.c_name, name)


def test_every_constant_has_the_c_value(c_layout):
    wrong = dict((m, (v, c_layout[m])) for m, v in abi.CONSTANTS.items() if c_layout[m] != v)
    assert wrong == {}, "macro: (abi, C)"


def test_every_struct_and_macro_of_the_header_is_in_abi(header):
    structs = set(re.findall(r"^struct (\w+) \{", header, re.M))
    assert structs == set(st.c_name for st in abi.STRUCTS)
    # the macros with a value (not the include guard, not SEC() or MAP())
    macros = set(re.findall(r"^#define (\w+)[ \t]", header, re.M))
    assert macros == set(abi.CONSTANTS)


def test_the_probe_fails_on_a_field_the_header_lacks(tmp_path):
    """The check can fail: a field abi names that C does not have stops the
    compile (the same happens for a renamed constant)."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler (cc, clang or gcc) to compile the layout probe")
    src = tmp_path / "bad.c"
    src.write_text('#include <stddef.h>\n#include "tracer.bpf.h"\n'
                   "int x = offsetof(struct conn_tuple, no_such_field);\n")
    res = subprocess.run([cc, "-c", "-I", ROOT, str(src), "-o", str(tmp_path / "bad.o")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert res.returncode != 0


def test_abi_structs_have_no_gaps_so_a_c_field_cannot_hide():
    """abi packs every field after the previous one: with equal offsets,
    sizes and struct size, C can have no field abi does not name."""
    for st in abi.STRUCTS:
        at = 0
        for name in st.names:
            assert st.offset(name) == at, (st.c_name, name)
            at += st.field_size(name)
        assert at == st.size


def test_name_tables_follow_the_macros():
    assert abi.TELEMETRY_NAMES[abi.TELE_READ_FAULTS] == "read_faults"
    assert abi.TELEMETRY_NAMES[abi.TELE_EVENTS] == "events"
    assert len(abi.TELEMETRY_NAMES) == abi.TELE_MAX
    assert abi.ENDS[abi.END_CONNECT_TIMEOUT] == "connect_timeout" and abi.END_NONE not in abi.ENDS
    assert abi.EVENT_KINDS == {1: "connect", 2: "accept", 3: "close", 4: "connect_failed",
                               5: "udp_open"}
    assert abi.DIRECTIONS == {0: "unknown", 1: "outgoing", 2: "incoming"}
    assert abi.PROTO_NAMES == {6: "tcp", 17: "udp"}


def test_decoding_by_field_name():
    raw = abi.CONN_STATS.pack(sent_bytes=5, state=abi.CONN_CLOSED, comm=b"curl")
    s = abi.CONN_STATS.unpack(raw)
    assert (s.sent_bytes, s.recv_bytes, s.state, s.comm) == (5, 0, 2, b"curl".ljust(16, b"\0"))
    assert raw[abi.CONN_STATS.offset("state")] == abi.CONN_CLOSED
    assert abi.CONN_STATS.getter("state", "sent_bytes")(abi.CONN_STATS.struct.unpack(raw)) == (2, 5)
    assert abi.SOCK_INFO.unpack(b"\0" * 4 + abi.SOCK_INFO.pack(has_tuple=1), 4).has_tuple == 1
    with pytest.raises(TypeError):
        abi.CONN_STATS.pack(no_such_field=1)


def test_tp_fields_slots_are_the_tpf_macros():
    slots = dict((v, k) for k, v in abi.CONSTANTS.items() if k.startswith("TPF_") and k != "TPF_MAX")
    assert sorted(backends.TP_FIELDS) == sorted(slots)
    assert max(backends.TP_FIELDS) < abi.TPF_MAX


def test_map_sizes_in_the_object_are_the_struct_sizes(c_layout):
    maps = elfload.parse_file(os.path.join(ROOT, "tracer.bpf.o")).maps
    sizes = lambda n: (maps[n].key_size, maps[n].value_size)
    assert sizes("conns") == (c_layout["conn_tuple"], c_layout["conn_stats"])
    assert sizes("socks") == (8, c_layout["sock_info"])
    assert sizes("stash") == (8, c_layout["stash"])
    assert sizes("udp_next") == (8, c_layout["peer"])
    assert sizes("offsets") == (4, c_layout["offsets"])
    assert sizes("guess_req") == (4, c_layout["guess_req"])
    assert sizes("guess_dump") == (4, c_layout["guess_dump"])
    assert maps["telemetry"].max_entries == c_layout["TELE_MAX"]
    assert maps["tp_fields"].max_entries == c_layout["TPF_MAX"]


def test_bpf_target_lays_the_structs_out_the_same(c_layout, tmp_path):
    if not shutil.which("clang"):
        print("clang absent: -target bpf layout check skipped")
        pytest.skip("clang absent: cannot compile for -target bpf")
    lines = ['#include "tracer.bpf.h"', "#define OFF(s, f) __builtin_offsetof(struct s, f)"]
    for st in abi.STRUCTS:
        lines.append("_Static_assert(sizeof(struct %s) == %d, \"%s\");" % (st.c_name, st.size, st.c_name))
        for f in st.names:
            lines.append("_Static_assert(OFF(%s, %s) == %d, \"%s.%s\");" % (
                st.c_name, f, st.offset(f), st.c_name, f))
    src = tmp_path / "bpf_layout.c"
    src.write_text("\n".join(lines) + "\n")
    subprocess.check_call(["clang", "-target", "bpf", "-fsyntax-only", "-Wall", "-Werror",
                           "-I", ROOT, str(src)])
