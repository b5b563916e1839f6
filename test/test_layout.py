"""The Python struct mirrors match the C structs of tracer.bpf.h.

A tiny C program that includes tracer.bpf.h prints sizeof and offsetof of
every field (compiled with the host cc/clang; x86-64 lays these structs out
as BPF does), and the offsets of each struct.Struct in conntrack.py and
offsetguess.py are compared field by field, as are the map key/value sizes
in the parsed object.  With clang, the same numbers are also checked for
-target bpf with _Static_assert (compile only).
"""

import os
import shutil
import struct
import subprocess

import pytest

import backends
import conntrack
import elfload
import offsetguess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# C struct -> its fields in declaration order (tracer.bpf.h)
C_FIELDS = {
    "conn_tuple": ("saddr", "daddr", "netns", "pid", "sport", "dport", "family", "proto", "_pad",
                   "life"),
    "conn_stats": ("sent_bytes", "recv_bytes", "first_ns", "last_ns", "retransmits", "direction",
                   "state", "seen_start", "end", "comm", "gen", "rtt_us", "rtt_var_us", "_pad2"),
    "sock_info": ("tuple", "has_tuple", "stats", "others", "_pad"),
    "offsets": offsetguess.OFFSET_FIELDS,
    "guess_req": ("pid_tgid", "net_off", "seq", "mode", "state"),
    "conn_event": ("ts_ns", "tuple", "type", "end", "direction", "seen_start", "sent_bytes",
                   "recv_bytes", "first_ns", "retransmits", "rtt_us", "rtt_var_us", "_pad", "comm"),
    "guess_dump": ("seq", "sk_ok", "net_ok", "_pad", "sk", "sk_bytes", "net_bytes"),
    "stash": ("sk", "msg", "uaddr", "bytes", "flags", "peer", "has_peer", "_pad"),
    "peer": ("addr", "port", "family", "_pad"),
}
MACROS = ("SKC_BLOCK", "GUESS_SOCK", "GUESS_TASK", "GUESS_TASK_AT", "GUESS_SKB_AT", "GUESS_QSKB_AT", "GUESS_STATE",
          "WANT_EVENTS", "TELE_EVENTS", "TELE_EVENTS_LOST", "EV_CONNECT", "EV_ACCEPT", "EV_CLOSE",
          "EV_CONNECT_FAILED", "EV_UDP_OPEN", "END_FIN", "END_RESET_SENT", "END_RESET_RECEIVED",
          "END_TIMEOUT", "END_REFUSED", "END_CONNECT_TIMEOUT", "END_UNREACHABLE", "END_ABORTED", "GUESS_SKB_BEFORE", "GUESS_SK_BYTES", "GUESS_NET_BYTES", "GUESS_CHUNK", "TELE_MAX", "TPF_MAX",
          "TELE_CONN_LOST", "TELE_CLOSED_LOST", "TELE_STASH_LOST", "TELE_BYTES_LOST",
          "TELE_UDP_LOST", "TELE_SHARED_OVERFLOW", "TELE_DIRTY_LOST", "SOCK_OTHERS", "TELE_TUPLE_MISMATCH",
          "TELE_TUPLE_CHECKED", "TELE_READ_FAULT", "TELE_PENDING_LOST",
          "TPF_ISS_SKADDR", "TPF_ISS_NEWSTATE", "TPF_ISS_SPORT", "TPF_ISS_DPORT", "TPF_ISS_FAMILY",
          "TPF_ISS_PROTOCOL", "TPF_ISS_SADDR", "TPF_ISS_DADDR", "TPF_ISS_SADDR_V6",
          "TPF_ISS_DADDR_V6", "TPF_SENDTO_ADDR", "TPF_SENDMSG_MSG", "TPF_RECVFROM_ADDR",
          "TPF_RECVMSG_MSG", "TPF_SYSEXIT_RET", "TPF_SSL_SK", "TPF_SSL_RET", "TPF_SSL_FLAGS",
          "TPF_RETRANS_SKADDR", "TPF_RETRANS_SKBADDR", "TPF_ISS_OLDSTATE", "TEST_SEND_CALLS", "CONN_CLOSED")


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
    for s, fields in C_FIELDS.items():
        lines.append('printf("%s %%zu\\n", sizeof(struct %s));' % (s, s))
        lines.extend("F(%s, %s);" % (s, f) for f in fields)
    lines.extend('printf("%s %%d\\n", (int)(%s));' % (m, m) for m in MACROS)
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


def py_layout(st):
    """[(offset, size)] of each field of a struct.Struct with a "<" format."""
    fmt = st.format if isinstance(st.format, str) else st.format.decode()
    assert fmt[0] == "<", fmt
    codes, count = [], ""
    for ch in fmt[1:]:
        if ch.isdigit():
            count += ch
            continue
        if ch == "s":
            codes.append(count + "s")
        else:
            codes.extend([ch] * int(count or 1))
        count = ""
    out, off = [], 0
    for code in codes:
        size = struct.calcsize("<" + code)
        out.append((off, size))
        off += size
    assert off == st.size
    return out


def assert_mirrors(c, name, st, fields=None):
    """st mirrors struct name field by field (fields: a leading subset, for
    a struct.Struct that covers only the head of the C struct)."""
    if fields is None:
        fields = C_FIELDS[name]
        assert st.size == c[name], "struct %s is %d bytes in C, %d in Python" % (name, c[name], st.size)
    got = py_layout(st)
    assert len(got) == len(fields), name
    for field, (off, size) in zip(fields, got):
        assert c["%s.%s" % (name, field)] == (off, size), "%s.%s" % (name, field)


def test_conn_tuple_mirrors_the_c_struct(c_layout):
    assert c_layout["conn_tuple"] == conntrack.CONN_TUPLE.size == 52
    assert_mirrors(c_layout, "conn_tuple", conntrack.CONN_TUPLE)


def test_conn_stats_mirrors_the_c_struct(c_layout):
    assert c_layout["conn_stats"] == conntrack.CONN_STATS.size == 72
    assert c_layout["conn_stats.state"][0] == conntrack._STATE_OFFSET
    assert c_layout["conn_tuple.pid"][0] == conntrack._PID_OFFSET
    assert c_layout["conn_tuple.proto"][0] == conntrack._PROTO_OFFSET
    assert_mirrors(c_layout, "conn_stats", conntrack.CONN_STATS)


def test_sock_info_mirrors_the_c_struct(c_layout):
    assert c_layout["sock_info.tuple"] == (0, 52)
    sl = conntrack.SOCK_INFO_TUPLE
    assert (sl.start, sl.stop) == (0, c_layout["conn_tuple"])
    st = conntrack.SOCK_INFO_STATS
    assert (st.start, st.stop - st.start) == c_layout["sock_info.stats"]
    assert c_layout["sock_info.others"][1] == 4 * c_layout["SOCK_OTHERS"]
    assert c_layout["sock_info"] == conntrack.SOCK_INFO.size == 144
    assert_mirrors(c_layout, "sock_info", conntrack.SOCK_INFO)


def test_offsets_mirrors_the_c_struct_field_by_name(c_layout):
    # OFFSET_FIELDS are the C field names: the probe compiled with them
    assert c_layout["offsets"] == offsetguess.OFFSETS.size == 108
    assert c_layout["SKC_BLOCK"] == offsetguess.SKC_BLOCK
    assert_mirrors(c_layout, "offsets", offsetguess.OFFSETS)


def test_guess_modes_are_the_c_macros(c_layout):
    assert (c_layout["GUESS_SOCK"], c_layout["GUESS_TASK"], c_layout["GUESS_TASK_AT"],
            c_layout["GUESS_SKB_AT"], c_layout["GUESS_QSKB_AT"], c_layout["GUESS_SKB_BEFORE"]) == (
        offsetguess.GUESS_SOCK, offsetguess.GUESS_TASK, offsetguess.GUESS_TASK_AT,
        offsetguess.GUESS_SKB_AT, offsetguess.GUESS_QSKB_AT, offsetguess.GUESS_SKB_BEFORE)


def test_conn_event_mirrors_the_c_struct(c_layout):
    import abi
    import events
    assert c_layout["conn_event"] == abi.EVENT.size == 120
    assert_mirrors(c_layout, "conn_event", abi.EVENT)
    assert events.KINDS == dict((c_layout[m], n) for m, n in (
        ("EV_CONNECT", "connect"), ("EV_ACCEPT", "accept"), ("EV_CLOSE", "close"),
        ("EV_CONNECT_FAILED", "connect_failed"), ("EV_UDP_OPEN", "udp_open")))
    assert conntrack.ENDS == dict((c_layout[m], n) for m, n in (
        ("END_FIN", "fin"), ("END_RESET_SENT", "reset_sent"),
        ("END_RESET_RECEIVED", "reset_received"), ("END_TIMEOUT", "timeout"),
        ("END_REFUSED", "refused"), ("END_CONNECT_TIMEOUT", "connect_timeout"),
        ("END_UNREACHABLE", "unreachable"), ("END_ABORTED", "aborted")))
    assert c_layout["WANT_EVENTS"] == offsetguess.WANT_EVENTS
    assert c_layout["GUESS_STATE"] == offsetguess.GUESS_STATE


def test_guess_req_mirrors_the_c_struct(c_layout):
    assert c_layout["guess_req"] == offsetguess.GUESS_REQ.size == 24
    assert_mirrors(c_layout, "guess_req", offsetguess.GUESS_REQ)


def test_guess_dump_header_and_byte_areas(c_layout):
    head = offsetguess.GUESS_DUMP_HEAD
    assert_mirrors(c_layout, "guess_dump", head, C_FIELDS["guess_dump"][:5])
    assert (c_layout["GUESS_SK_BYTES"], c_layout["GUESS_NET_BYTES"]) == (
        offsetguess.GUESS_SK_BYTES, offsetguess.GUESS_NET_BYTES)
    assert c_layout["guess_dump.sk_bytes"] == (head.size, offsetguess.GUESS_SK_BYTES)
    assert c_layout["guess_dump.net_bytes"] == (head.size + offsetguess.GUESS_SK_BYTES,
                                                offsetguess.GUESS_NET_BYTES)
    assert c_layout["guess_dump"] == head.size + offsetguess.GUESS_SK_BYTES + \
        offsetguess.GUESS_NET_BYTES == 4120


def test_telemetry_names_follow_the_tele_indexes(c_layout):
    names = conntrack.TELEMETRY_NAMES
    assert len(names) == c_layout["TELE_MAX"]
    for macro, name in (("TELE_CONN_LOST", "conn_lost"), ("TELE_CLOSED_LOST", "closed_lost"),
                        ("TELE_BYTES_LOST", "bytes_lost"), ("TELE_UDP_LOST", "udp_lost"),
                        ("TELE_SHARED_OVERFLOW", "shared_overflow"), ("TELE_DIRTY_LOST", "dirty_lost"),
                        ("TELE_STASH_LOST", "stash_lost"), ("TELE_TUPLE_MISMATCH", "tuple_mismatch"),
                        ("TELE_TUPLE_CHECKED", "tuple_checked"), ("TELE_READ_FAULT", "read_faults"),
                        ("TELE_PENDING_LOST", "pending_lost"), ("TELE_EVENTS_LOST", "events_lost"),
                        ("TELE_EVENTS", "events")):
        assert names[c_layout[macro]] == name, macro


def test_tp_fields_slots_follow_the_tpf_indexes(c_layout):
    want = {
        "TPF_ISS_SKADDR": ("sock", "inet_sock_set_state", "skaddr"),
        "TPF_ISS_NEWSTATE": ("sock", "inet_sock_set_state", "newstate"),
        "TPF_ISS_SPORT": ("sock", "inet_sock_set_state", "sport"),
        "TPF_ISS_DPORT": ("sock", "inet_sock_set_state", "dport"),
        "TPF_ISS_FAMILY": ("sock", "inet_sock_set_state", "family"),
        "TPF_ISS_PROTOCOL": ("sock", "inet_sock_set_state", "protocol"),
        "TPF_ISS_SADDR": ("sock", "inet_sock_set_state", "saddr"),
        "TPF_ISS_DADDR": ("sock", "inet_sock_set_state", "daddr"),
        "TPF_ISS_SADDR_V6": ("sock", "inet_sock_set_state", "saddr_v6"),
        "TPF_ISS_DADDR_V6": ("sock", "inet_sock_set_state", "daddr_v6"),
        "TPF_SENDTO_ADDR": ("syscalls", "sys_enter_sendto", "addr"),
        "TPF_SENDMSG_MSG": ("syscalls", "sys_enter_sendmsg", "msg"),
        "TPF_RECVFROM_ADDR": ("syscalls", "sys_enter_recvfrom", "addr"),
        "TPF_RECVMSG_MSG": ("syscalls", "sys_enter_recvmsg", "msg"),
        "TPF_SYSEXIT_RET": ("syscalls", "sys_exit_recvfrom", "ret"),
        "TPF_SSL_SK": ("sock", "sock_send_length", "sk"),
        "TPF_SSL_RET": ("sock", "sock_send_length", "ret"),
        "TPF_SSL_FLAGS": ("sock", "sock_send_length", "flags"),
        "TPF_RETRANS_SKADDR": ("tcp", "tcp_retransmit_skb", "skaddr"),
        "TPF_RETRANS_SKBADDR": ("tcp", "tcp_retransmit_skb", "skbaddr"),
        "TPF_ISS_OLDSTATE": ("sock", "inet_sock_set_state", "oldstate"),
    }
    assert dict((c_layout[m], v) for m, v in want.items()) == backends.TP_FIELDS
    assert max(backends.TP_FIELDS) < c_layout["TPF_MAX"]


def test_state_and_self_test_slots(c_layout):
    assert c_layout["CONN_CLOSED"] == conntrack.STATE_CLOSED
    assert c_layout["TEST_SEND_CALLS"] == 2


def test_map_sizes_in_the_object_are_the_struct_sizes(c_layout):
    maps = elfload.parse_file(os.path.join(ROOT, "tracer.bpf.o")).maps
    sizes = lambda n: (maps[n].key_size, maps[n].value_size)
    assert sizes("conns") == (c_layout["conn_tuple"], c_layout["conn_stats"]) == (
        conntrack.CONN_TUPLE.size, conntrack.CONN_STATS.size)
    assert sizes("socks") == (8, c_layout["sock_info"])
    assert sizes("stash") == (8, c_layout["stash"])
    assert sizes("offsets") == (4, c_layout["offsets"]) == (4, offsetguess.OFFSETS.size)
    assert sizes("guess_req") == (4, c_layout["guess_req"]) == (4, offsetguess.GUESS_REQ.size)
    assert sizes("guess_dump") == (4, c_layout["guess_dump"])
    assert maps["telemetry"].max_entries == c_layout["TELE_MAX"]
    assert maps["tp_fields"].max_entries == c_layout["TPF_MAX"]


def test_bpf_target_lays_the_structs_out_the_same(c_layout, tmp_path):
    if not shutil.which("clang"):
        print("clang absent: -target bpf layout check skipped")
        pytest.skip("clang absent: cannot compile for -target bpf")
    lines = ['#include "tracer.bpf.h"', "#define OFF(s, f) __builtin_offsetof(struct s, f)"]
    for key, val in sorted(c_layout.items()):
        if "." in key:
            s, f = key.split(".")
            lines.append("_Static_assert(OFF(%s, %s) == %d, \"%s\");" % (s, f, val[0], key))
        elif key in C_FIELDS:
            lines.append("_Static_assert(sizeof(struct %s) == %d, \"%s\");" % (key, val, key))
    src = tmp_path / "bpf_layout.c"
    src.write_text("\n".join(lines) + "\n")
    subprocess.check_call(["clang", "-target", "bpf", "-fsyntax-only", "-Wall", "-Werror",
                           "-I", ROOT, str(src)])
