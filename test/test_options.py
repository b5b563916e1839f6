"""Every option and library item of issue 11, tried adversarially: the real
tracer (the command, or tracer.Tracer in this process) against loopback
traffic of known sizes from processes whose pids, ports and names the test
knows, with exact byte counts.

Where the order of intervals matters, a tracer is frozen (SIGSTOP) right
after it printed an interval, the traffic is made, and it is let go
(SIGCONT): the next interval then holds all of that traffic, however slow
this machine is."""

import ipaddress
import json
import os
import pydoc
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, need_root, need_tracepoint_backend
from test_cli import _assert_nothing_left, run_cli  # noqa: F401 (run_cli: a fixture)
from traffic import Pair, _csv
import cli
import conntrack
import tracer

pytestmark = pytest.mark.root

HEADER = re.compile(r"^\d\d:\d\d:\d\d( \(final\))?  \d+ (active|process|processes), ")
CONN_HEAD = "PID COMM PROTO LADDR:LPORT RADDR:RPORT TX RX TXTOT RXTOT DUR STATE"
PROC_HEAD = "PID COMM CONNS TCP UDP TX RX TXTOT RXTOT"
WIDE = {"COLUMNS": "200", "LINES": "50"}

# --- a process of known name with loopback connections it controls ----------

HERD = r"""
import ctypes, json, os, socket, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)   # PR_SET_NAME: the comm
addr = sys.argv[2]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
lst = socket.socket(fam)
lst.bind((addr, 0))
lst.listen(64)
conns, keep, blast = {}, [], []

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def fill(s, n):
    got = 0
    while got < n:
        b = s.recv(min(1 << 20, n - got))
        assert b, "peer closed"
        got += len(b)

say(pid=os.getpid(), port=lst.getsockname()[1])
n = 0
for line in sys.stdin:
    w = line.split()
    if w[0] == "open":           # a TCP connection to our own listener
        c = socket.socket(fam)
        c.connect((addr, lst.getsockname()[1]))
        s, _ = lst.accept()
        conns[n] = (c, s)
        say(i=n, client=c.getsockname()[1])
        n += 1
    elif w[0] == "send":         # i tx rx: the client sends tx, the server side rx back
        c, s = conns[int(w[1])]
        tx, rx = int(w[2]), int(w[3])
        if tx:
            c.sendall(b"c" * tx)
            fill(s, tx)
        if rx:
            s.sendall(b"s" * rx)
            fill(c, rx)
        say(ok=1)
    elif w[0] == "close":        # i: both sides closed
        c, s = conns.pop(int(w[1]))
        c.close()
        s.close()
        say(ok=1)
    elif w[0] == "udp":          # tx rx: a connected UDP pair, one datagram each way
        a, b = socket.socket(fam, socket.SOCK_DGRAM), socket.socket(fam, socket.SOCK_DGRAM)
        a.bind((addr, 0))
        b.bind((addr, 0))
        a.connect(b.getsockname())
        b.connect(a.getsockname())
        a.send(b"u" * int(w[1]))
        assert len(b.recv(65536)) == int(w[1])
        b.send(b"v" * int(w[2]))
        assert len(a.recv(65536)) == int(w[2])
        keep += [a, b]
        say(a=a.getsockname()[1], b=b.getsockname()[1])
    elif w[0] == "blast":        # n: one datagram to a port nobody listens on
        if not blast:
            t = socket.socket(fam, socket.SOCK_DGRAM)
            t.bind((addr, 0))
            dead = t.getsockname()[1]
            t.close()
            blast += [socket.socket(fam, socket.SOCK_DGRAM), dead]
            blast[0].bind((addr, 0))
        blast[0].sendto(b"b" * int(w[1]), (addr, blast[1]))
        say(lport=blast[0].getsockname()[1], rport=blast[1])
"""


class Herd(object):
    """A process named comm with loopback TCP connections to its own
    listener (both sides are its records), UDP pairs and UDP datagrams to
    a closed port, made on command."""

    def __init__(self, comm, addr="127.0.0.1"):
        self.comm, self.addr = comm, addr
        self.proc = subprocess.Popen([sys.executable, "-c", HERD, comm, addr],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     universal_newlines=True)
        info = self._ask(None)
        self.pid, self.port = info["pid"], info["port"]
        self.clients = {}  # i -> the client side's local port

    def _ask(self, line):
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        assert out, "herd %s died (exit %s)" % (self.comm, self.proc.poll())
        return json.loads(out)

    def open(self):
        r = self._ask("open")
        self.clients[r["i"]] = r["client"]
        return r["i"]

    def send(self, i, tx, rx):
        self._ask("send %d %d %d" % (i, tx, rx))

    def close_conn(self, i):
        self._ask("close %d" % i)

    def udp(self, tx, rx):
        r = self._ask("udp %d %d" % (tx, rx))
        return r["a"], r["b"]

    def blast(self, n):
        r = self._ask("blast %d" % n)
        return r["lport"], r["rport"]

    def sides(self, i):
        """{(pid, lport): "c"/"s"} of connection i's two records."""
        return {(self.pid, self.clients[i]): "c", (self.pid, self.port): "s"}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


@pytest.fixture
def herds():
    """herds(comm, ...) starts a Herd; all are stopped afterwards."""
    made = []

    def make(comm, addr="127.0.0.1"):
        h = Herd(comm, addr)
        made.append(h)
        return h
    yield make
    for h in made:
        try:
            h.stop()
        except Exception:
            h.proc.kill()
            h.proc.wait()


# --- staged traffic: the server first (its port goes into the filters) --------

def serve(proto, family, send, reply, addr=None):
    p = Pair(proto, family, send=send, reply=reply, addr=addr)
    p.server = p._spawn("server", proto, family, p.addr, _csv(p.send), _csv(p.reply))
    info = p._read(p.server)
    p.server_pid, p.server_port = info["pid"], info["port"]
    return p


def connect(p):
    p.client = p._spawn("client", p.proto, p.family, p.addr, p.server_port, _csv(p.send),
                        _csv(p.reply))
    info = p._read(p.client)
    p.client_pid, p.client_port = info["pid"], info["lport"]
    return p


def pair_expect(p):
    """{(pid, lport): (sent, recv)} of a finished Pair's two records."""
    return {(p.client_pid, p.client_port): (sum(p.send), sum(p.reply)),
            (p.server_pid, p.server_port): (sum(p.reply), sum(p.send))}


# --- reading a tracer's output ----------------------------------------------------

def json_intervals(tc):
    """[(records, telemetry)] of a --json run, interval by interval."""
    out, cur = [], []
    for r in tc.records():
        if r["type"] == "telemetry":
            out.append((cur, r))
            cur = []
        else:
            cur.append(r)
    assert cur == [], "records after the last telemetry: %s" % cur
    return out


def table_intervals(lines):
    """[[header, column header, row...]] of a table run."""
    out = []
    for l in lines:
        if HEADER.match(l):
            out.append([l])
        elif out and l:
            out[-1].append(l)
    return out


def marks(tc):
    """Intervals printed so far (JSON: telemetry lines; table: headers)."""
    return sum(1 for l in list(tc.out) if l.startswith('{"type": "telemetry"') or HEADER.match(l))


def freeze(tcs):
    """Stop each tracer just after it printed an interval (it is waiting
    for the next then, not polling)."""
    for tc in tcs:
        n = marks(tc)
        tc.wait_for(lambda: marks(tc) > n, timeout=10)
        tc.proc.send_signal(signal.SIGSTOP)


def thaw(tcs, then=None):
    """Let them go (then: a signal sent first, delivered as they resume);
    returns the interval count each had, the next holds what came between."""
    n = [marks(tc) for tc in tcs]
    for tc in tcs:
        if then is not None:
            tc.proc.send_signal(then)
        tc.proc.send_signal(signal.SIGCONT)
    return n


def after_thaw(tcs, counts):
    for tc, n in zip(tcs, counts):
        tc.wait_for(lambda: marks(tc) > n, timeout=10)


def start_all(run_cli, argvs, env=None):
    tcs = [run_cli(*a, env=env or {}) for a in argvs]
    for tc, a in zip(tcs, argvs):
        if "--json" in a:
            tc.wait_ready_json()
        else:
            tc.wait_ready_table()
    return tcs


def ids_in(records, universe):
    return set((r["pid"], r["lport"]) for r in records) & set(universe)


def totals(records):
    """{(pid, lport): (last sent_bytes, last recv_bytes, sum of sent_delta, sum of recv_delta)}"""
    out = {}
    for r in records:
        k = (r["pid"], r["lport"])
        s, rv = out.get(k, (0, 0, 0, 0))[2:]
        out[k] = (r["sent_bytes"], r["recv_bytes"], s + r["sent_delta"], rv + r["recv_delta"])
    return out


def usage_error(args):
    """Run with bad arguments: (exit status, the error line), checking that
    nothing but argparse's usage and one error line was printed."""
    p = subprocess.run([sys.executable, "tracer.py"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    lines = p.stderr.splitlines()
    assert p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("usage: ") and all(
        l.startswith(("usage: ", "       ")) for l in lines[:-1]), p.stderr
    assert [l for l in lines if "error" in l] == lines[-1:], p.stderr
    assert lines[-1].startswith("tracer: error: "), p.stderr
    return p.returncode, lines[-1]


# --- positional interval and count ----------------------------------------------

def test_positional_interval_and_count(run_cli):
    need_tracepoint_backend()
    start = time.monotonic()
    tc = run_cli("0.4", "3", "--json")
    assert tc.finish(30) == 0
    took = time.monotonic() - start
    tele = [t for _, t in json_intervals(tc)]
    assert [(t["interval"], t["final"]) for t in tele] == [(1, False), (2, False), (3, True)]
    assert all(abs(t["interval_seconds"] - 0.4) < 0.1 for t in tele), tele
    assert 1.2 <= took < 10
    # the options may stand on either side of them, or between (Python 3.7+)
    argvs = [["--json", "0.2", "2"], ["0.2", "2", "--json"]]
    if sys.version_info >= (3, 7):
        argvs.append(["0.2", "--json", "2"])
    for tc in [run_cli(*a) for a in argvs]:
        assert tc.finish(30) == 0
        assert [(t["interval"], t["final"]) for _, t in json_intervals(tc)] == [(1, False), (2, True)]


@pytest.mark.parametrize("args,what", [
    (["0.5", "3", "--interval", "0.5"], "interval"),
    (["0.5", "3", "--count", "3"], "count"),
    (["--interval", "1", "2"], "interval"),
    (["0.5", "--interval=0.5", "--json"], "interval"),
], ids=["both-interval", "both-count", "option-then-positional", "equals-form"])
def test_positional_and_option_together_is_a_usage_error(args, what):
    rc, line = usage_error(args)
    assert rc == 2
    assert line == ("tracer: error: the %s is given twice (as --%s and as a positional argument)"
                    % (what, what))


@pytest.mark.parametrize("args,arg", [
    (["--port", "0"], "--port"), (["--port", "80,"], "--port"), (["--port", ",80"], "--port"),
    (["--lport", "65536"], "--lport"), (["--rport", "http"], "--rport"),
    (["--raddr", "10.0.0.0/33"], "--raddr"), (["--raddr", "::1/129"], "--raddr"),
    (["--raddr", "localhost"], "--raddr"), (["--comm", "a-sixteen-char-x"], "--comm"),
    (["--comm", "\u00e9" * 8], "--comm"), (["--comm", ""], "--comm"),
    (["--comm", "ok,"], "--comm"), (["--sort", "conns"], "--sort"),
    (["-P", "--sort", "duration"], "--sort"), (["--sort", "size"], "--sort"),
    (["--rows", "0"], "--rows"), (["0"], "interval"), (["1", "0"], "count"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_values_are_one_usage_error_exit_2(args, arg):
    rc, line = usage_error(args)
    assert rc == 2
    assert line.startswith("tracer: error: argument %s" % arg), line


# --- filters ------------------------------------------------------------------------

def test_filters_show_exactly_the_matching_side(run_cli, herds):
    """Fourteen tracers at once, each with other filters, see the same
    traffic: a TCP pair on 127.0.0.1, one on ::1, a UDP pair, a TCP pair to
    127.0.0.2 (the client's own address is 127.0.0.1: only its record has
    raddr 127.0.0.2), and a process named optsherd."""
    need_tracepoint_backend()
    t4 = serve("tcp", 4, [1000, 234], [567])
    t6 = serve("tcp", 6, [2000], [300])
    u4 = serve("udp", 4, [111, 222], [333])
    t2 = serve("tcp", 4, [40], [50], addr="127.0.0.2")
    herd = herds("optsherd")
    a, b = herd.open(), herd.open()
    T4, U4, HP = t4.server_port, u4.server_port, herd.port
    cases = [
        (["--port", T4, "--port", U4], lambda r: r["lport"] in (T4, U4) or r["rport"] in (T4, U4)),
        (["--port", "%d,%d" % (T4, U4)], lambda r: r["lport"] in (T4, U4) or r["rport"] in (T4, U4)),
        (["--lport", T4], lambda r: r["lport"] == T4),
        (["--rport", T4], lambda r: r["rport"] == T4),
        (["--raddr", "127.0.0.2"], lambda r: r["raddr"] == "127.0.0.2"),
        (["--raddr", "127.0.0.0/8"], lambda r: r["raddr"].startswith("127.")),
        (["--raddr", "::1"], lambda r: r["raddr"] == "::1"),
        (["--raddr", "::1/128,127.0.0.2", "--raddr", "192.0.2.0/24"],
         lambda r: r["raddr"] in ("::1", "127.0.0.2") or r["raddr"].startswith("192.0.2.")),
        (["--raddr", "10.0.0.0/8"], lambda r: ipaddress.ip_address(r["raddr"]) in
         ipaddress.ip_network("10.0.0.0/8")),
        (["--comm", "optsherd"], lambda r: r["comm"] == "optsherd"),
        (["--comm", "optsherd", "--lport", HP], lambda r: r["comm"] == "optsherd" and r["lport"] == HP),
        (["--raddr", "127.0.0.0/8", "--rport", T4], lambda r: r["rport"] == T4),
        (["--tcp", "--port", U4], lambda r: False),
        (["--lport", T4, "--rport", T4], lambda r: False),
    ]
    tcs = start_all(run_cli, [["--json", "--interval", "30"] + [str(x) for x in args]
                              for args, _ in cases])
    for p in (t4, t6, u4, t2):
        connect(p)
    herd.send(a, 3000, 40)
    herd.send(b, 5, 6000)
    for p in (t4, t6, u4, t2):
        p.wait()
    time.sleep(0.1)
    for tc in tcs:
        assert tc.stop() == 0
    c4, s4 = (t4.client_pid, t4.client_port), (t4.server_pid, t4.server_port)
    c6, s6 = (t6.client_pid, t6.client_port), (t6.server_pid, t6.server_port)
    cu, su = (u4.client_pid, u4.client_port), (u4.server_pid, u4.server_port)
    c2, s2 = (t2.client_pid, t2.client_port), (t2.server_pid, t2.server_port)
    ha, hb, hs = (herd.pid, herd.clients[a]), (herd.pid, herd.clients[b]), (herd.pid, HP)
    want = [
        {c4, s4, cu, su}, {c4, s4, cu, su}, {s4}, {c4}, {c2},
        {c4, s4, cu, su, c2, s2, ha, hb, hs}, {c6, s6}, {c6, s6, c2}, set(),
        {ha, hb, hs}, {hs}, {c4}, set(), set(),
    ]
    exact = {}
    for p in (t4, t6, u4, t2):
        exact.update(pair_expect(p))
    exact.update({ha: (3000, 40), hb: (5, 6000)})
    universe = set(exact) | {hs}
    failures = []
    for (args, match), tc, w in zip(cases, tcs, want):
        recs = tc.records("conn")
        got = ids_in(recs, universe)
        if got != w:
            failures.append("%s: got %s, want %s" % (args, sorted(got), sorted(w)))
        wrong = [r for r in recs if not match(r)]
        if wrong:
            failures.append("%s: records that do not match: %s" % (args, wrong[:3]))
        for k, (sent, recv) in exact.items():
            if k in got:
                t = totals([r for r in recs if (r["pid"], r["lport"]) == k and
                            (k != hs or r["rport"] == herd.clients[a])])
                if t[k] != (sent, recv, sent, recv):
                    failures.append("%s: %s counted %s, want %s" % (args, k, t[k], (sent, recv)))
    assert failures == []
    # the start line names every filter
    assert tcs[0].err[0] == "tracer: tracing TCP and UDP port %s with the tracepoint backend" % (
        ",".join(str(p) for p in sorted([T4, U4])))


# --- sort keys ----------------------------------------------------------------------

def _sort_scene(run_cli, herds, argvs, env=None):
    """Two processes (lo: the lower pid, hi) and four connections: W opened
    before the tracers (no start seen), X moving 10000 bytes in a first
    interval, then in the final one X 100/50, Z 500/2000 (opened then),
    Y 3000/200 (opened 50 ms after Z, in hi), W 1/1.  Returns the tracers,
    the records' names ({(pid, client lport): "Xc"}, {(pid, port, "X"): "Xs"}),
    the two Herds and {connection name: its number in its Herd}."""
    lo, hi = sorted([herds("sortlo"), herds("sorthi")], key=lambda h: h.pid)
    w = lo.open()
    tcs = start_all(run_cli, argvs, env)
    freeze(tcs)
    x = lo.open()
    lo.send(x, 10000, 0)
    after_thaw(tcs, thaw(tcs))
    freeze(tcs)
    z = lo.open()
    time.sleep(0.05)
    y = hi.open()
    lo.send(x, 100, 50)
    hi.send(y, 3000, 200)
    lo.send(z, 500, 2000)
    lo.send(w, 1, 1)
    thaw(tcs, then=signal.SIGINT)
    for tc in tcs:
        assert tc.finish() == 0
    names = {}
    for h, i, n in ((lo, w, "W"), (lo, x, "X"), (lo, z, "Z"), (hi, y, "Y")):
        names[(h.pid, h.clients[i])] = n + "c"
        names[(h.pid, h.port, n)] = n + "s"   # server sides share the port: told apart by rport
    return tcs, names, lo, hi, {"W": w, "X": x, "Y": y, "Z": z}


# the final interval of _sort_scene: name -> (sent_delta, recv_delta, sent_bytes, recv_bytes)
SORT_FINAL = {"Xc": (100, 50, 10100, 50), "Xs": (50, 100, 50, 10100),
              "Yc": (3000, 200, 3000, 200), "Ys": (200, 3000, 200, 3000),
              "Zc": (500, 2000, 500, 2000), "Zs": (2000, 500, 2000, 500),
              "Wc": (1, 1, 1, 1), "Ws": (1, 1, 1, 1)}


def _name(r, names, herds_by_pid, conns):
    k = (r["pid"], r["lport"])
    if k in names:
        return names[k]
    h = herds_by_pid.get(r["pid"])
    assert h is not None, "a record of neither process of the scene: %s" % (r,)
    for n, i in conns.items():
        if (h.pid, h.port, n) in names and r["rport"] == h.clients[i]:
            return n + "s"
    raise AssertionError("a record not of the scene: %s" % r)


SORT_KEYS = {   # documented: the first item decides, larger first except pid
    "bytes": lambda r: -(r["sent_delta"] + r["recv_delta"]),
    "total": lambda r: -(r["sent_bytes"] + r["recv_bytes"]),
    "tx": lambda r: -r["sent_delta"],
    "rx": lambda r: -r["recv_delta"],
    "pid": lambda r: r["pid"],
    "duration": lambda r: float("inf") if r["duration"] is None else -r["duration"],
}


def test_sort_orders_json_and_table_rows(run_cli, herds):
    need_tracepoint_backend()
    base = ["--json", "--interval", "0.3", "--comm", "sortlo,sorthi"]
    argvs = [base + ["--sort", k] for k in SORT_KEYS] + [
        base + ["-P", "--sort", "conns"], base + ["-P"],
        ["--interval", "0.3", "--comm", "sortlo,sorthi", "--sort", "total"]]
    tcs, names, lo, hi, conns = _sort_scene(run_cli, herds, argvs, env=WIDE)
    by_pid = {lo.pid: lo, hi.pid: hi}
    orders = {}
    for key, tc in zip(SORT_KEYS, tcs):
        recs, tele = json_intervals(tc)[-1]
        assert tele["final"] is True
        got = [_name(r, names, by_pid, conns) for r in recs]
        assert sorted(got) == sorted(SORT_FINAL), (key, got)
        for r, n in zip(recs, got):
            assert (r["sent_delta"], r["recv_delta"], r["sent_bytes"], r["recv_bytes"]) == \
                SORT_FINAL[n], (key, n, r)
        keys = [SORT_KEYS[key](r) for r in recs]
        assert keys == sorted(keys), (key, got, keys)
        orders[key] = [n[0] for n in got]
    # the orders the scene was made for: each key gives another order
    assert orders["bytes"] == list("YYZZXXWW")
    assert orders["total"] == list("XXYYZZWW")
    assert [n for n in orders["tx"]] == list("YZZYXXWW")     # 3000 2000 500 200 100 50 1 1
    assert [n for n in orders["rx"]] == list("YZZYXXWW")     # the other sides: 3000 2000 ...
    assert orders["pid"][-2:] == ["Y", "Y"] and sorted(orders["pid"][:6]) == list("WWXXZZ")
    assert orders["duration"] == list("XXZZYYWW")            # W: start not seen, last
    assert [r["duration"] for r in json_intervals(tcs[5])[-1][0]][-2:] == [None, None]
    # -P: lo has 6 connections (X, Z, W, both sides), 5304 bytes; hi 2, 6400 bytes
    lo_row = {"type": "process", "pid": lo.pid, "comm": "sortlo", "conns": 6, "tcp": 6, "udp": 0,
              "sent_delta": 2652, "recv_delta": 2652, "sent_bytes": 12652, "recv_bytes": 12652}
    hi_row = {"type": "process", "pid": hi.pid, "comm": "sorthi", "conns": 2, "tcp": 2, "udp": 0,
              "sent_delta": 3200, "recv_delta": 3200, "sent_bytes": 3200, "recv_bytes": 3200}
    for tc, want in ((tcs[6], [lo_row, hi_row]), (tcs[7], [hi_row, lo_row])):
        recs = json_intervals(tc)[-1][0]
        assert [dict((k, v) for k, v in r.items() if k != "time") for r in recs] == want
    # the table follows --sort too: total, X (10150) first
    last = table_intervals(tcs[8].out)[-1]
    assert last[1].split() == CONN_HEAD.split()
    rows = [l.split() for l in last[2:]]
    got = []
    for r in rows:
        pid, lport = int(r[0]), int(r[3].rsplit(":", 1)[1])
        got.append(_name({"pid": pid, "lport": lport, "rport": int(r[4].rsplit(":", 1)[1])},
                         names, by_pid, conns))
    assert [n[0] for n in got] == list("XXYYZZWW"), rows
    for r, n in zip(rows, got):
        d = SORT_FINAL[n]
        assert r[5:9] == [cli.human_bytes(v) for v in d], (n, r)


# --- rates ---------------------------------------------------------------------------

def _seconds_range(nbytes, shown, rounding):
    """The interval lengths (s) for which nbytes / s shows as shown (an
    exact count below 1024): round() for the rows, int() for the header."""
    if rounding == "round":
        lo, hi = shown - 0.5, shown + 0.5
    else:
        lo, hi = shown, shown + 1
    return (nbytes / hi, nbytes / lo if lo > 0 else float("inf"))


def _burst(tc, herd, i, sizes, moved):
    """Just after tc printed an interval, connection i of herd moves
    (tx, rx): the next interval holds all of it, unless this machine was
    so slow that it was split; then again with the next sizes.  moved:
    [tx, rx] so far, updated.  Returns the interval and the (tx, rx)."""
    for tx, rx in sizes:
        n = marks(tc)
        tc.wait_for(lambda: marks(tc) > n)
        herd.send(i, tx, rx)
        moved[0] += tx
        moved[1] += rx
        tc.wait_for(lambda: marks(tc) > n + 1)
        hits = [iv for iv in table_intervals(tc.out) if "  TX %d " % (tx + rx) in iv[0]]
        if hits:
            return hits[0], (tx, rx)
    raise AssertionError("every burst was split between intervals: %s" % tc.out)


def test_rate_columns_are_bytes_per_second_of_the_interval(run_cli, herds):
    need_tracepoint_backend()
    herd = herds("rateherd")
    i = herd.open()
    table, procs = start_all(run_cli, [["--rate", "--interval", "0.5", "--comm", "rateherd"],
                                       ["--rate", "-P", "--interval", "0.5", "--comm", "rateherd"]],
                             env=WIDE)
    js = start_all(run_cli, [["--rate", "--json", "--interval", "0.25", "--count", "6"]])[0]
    moved = [0, 0]
    iv, (tx, rx) = _burst(table, herd, i, [(200, 150), (201, 151), (202, 152)], moved)
    conn_totals = tuple(moved)
    piv, (ptx, prx) = _burst(procs, herd, i, [(90, 210), (91, 211), (92, 212)], moved)
    for tc in (table, procs):
        assert tc.stop() == 0
    assert js.finish() == 0
    # the connection view: TX/s and RX/s of both sides and the header's rates
    head, cols, rows = iv[0], iv[1].split(), [l.split() for l in iv[2:]]
    assert cols[5:7] == ["TX/s", "RX/s"], cols
    m = re.search(r"  TX %d (\d+)/s  RX %d (\d+)/s  " % (tx + rx, tx + rx), head)
    assert m, head
    ranges = [_seconds_range(tx + rx, int(m.group(1)), "int"),
              _seconds_range(tx + rx, int(m.group(2)), "int")]
    want = {herd.clients[i]: (tx, rx, conn_totals), herd.port: (rx, tx, conn_totals[::-1])}
    assert sorted(int(r[3].rsplit(":", 1)[1]) for r in rows) == sorted(want)
    for r in rows:
        sent, recv, tot = want[int(r[3].rsplit(":", 1)[1])]
        ranges += [_seconds_range(sent, int(r[5]), "round"),
                   _seconds_range(recv, int(r[6]), "round")]
        assert r[7:9] == [str(t) for t in tot], r     # TXTOT, RXTOT: bytes, not rates
    lo, hi = max(a for a, _ in ranges), min(b for _, b in ranges)
    assert lo <= hi, "no one interval length explains %s: %s" % (rows, ranges)
    assert 0.45 < hi and lo < 0.65, (lo, hi)
    # the per-process view: one row, its client sent ptx, its server side prx
    cols, row = piv[1].split(), [l.split() for l in piv[2:]]
    assert cols == ["PID", "COMM", "CONNS", "TCP", "UDP", "TX/s", "RX/s", "TXTOT", "RXTOT"]
    assert len(row) == 1 and row[0][:5] == [str(herd.pid), "rateherd", "2", "2", "0"]
    assert row[0][5] == row[0][6]
    s = _seconds_range(ptx + prx, int(row[0][5]), "round")
    assert s[0] < 0.65 and s[1] > 0.45, (row, s)
    assert row[0][7:] == [str(sum(moved))] * 2
    # JSON: the interval's real length, for a reader's own rates
    tele = [t for _, t in json_intervals(js)]
    assert len(tele) == 6
    for a, b in zip(tele, tele[1:]):
        assert abs(b["interval_seconds"] - (b["time"] - a["time"])) < 0.03, (a, b)
        assert abs(b["interval_seconds"] - 0.25) < 0.1, b


# --- the per-process view ---------------------------------------------------------------

def test_by_process_json_over_intervals(run_cli, herds):
    """procherd keeps a UDP flow open throughout; gapherd has no connection
    at all between its first and its last interval: its totals go on."""
    need_tracepoint_backend()
    herd, gap = herds("procherd"), herds("gapherd")
    tc = start_all(run_cli, [["-P", "--json", "--interval", "0.3", "--comm",
                              "procherd,gapherd"]])[0]
    # per pid, the process record after each phase:
    # (conns, tcp, udp, sent_delta, recv_delta, sent_bytes, recv_bytes)
    phases = {herd.pid: [], gap.pid: []}

    def phase(do, expect, final=False):
        freeze([tc])
        do()
        n = thaw([tc], then=signal.SIGINT if final else None)
        if not final:
            after_thaw([tc], n)
        for pid, v in expect.items():
            phases[pid].append(v)

    def one():
        a, b = herd.open(), herd.open()
        herd.send(a, 1000, 100)
        herd.send(b, 2000, 200)
        herd.blast(777)
        one.conns = a, b
        g = gap.open()
        gap.send(g, 1000, 10)
        gap.close_conn(g)
    phase(one, {herd.pid: (5, 4, 1, 4077, 3300, 4077, 3300),
                gap.pid: (0, 0, 0, 1010, 1010, 1010, 1010)})
    phase(lambda: (herd.send(one.conns[0], 10, 20), herd.close_conn(one.conns[1])),
          {herd.pid: (3, 2, 1, 30, 30, 4107, 3330)})
    # every connection of it closed: the totals stay
    phase(lambda: herd.close_conn(one.conns[0]), {herd.pid: (1, 0, 1, 0, 0, 4107, 3330)})

    def four():
        herd.send(herd.open(), 5, 6)
        gap.send(gap.open(), 2, 3)
    phase(four, {herd.pid: (3, 2, 1, 11, 11, 4118, 3341),
                 gap.pid: (2, 2, 0, 5, 5, 1015, 1015)}, final=True)
    assert tc.finish() == 0
    seen = {herd.pid: [], gap.pid: []}
    ivs = json_intervals(tc)
    assert ivs[-1][1]["final"] is True
    for recs, tele in ivs:
        assert [r["type"] for r in recs] == ["process"] * len(recs)
        assert tele["records"] == len(recs)
        assert len(set(r["pid"] for r in recs)) == len(recs)
        for r in recs:
            assert sorted(r) == sorted(["type", "time", "pid", "comm", "conns", "tcp", "udp",
                                        "sent_delta", "recv_delta", "sent_bytes", "recv_bytes"])
            assert r["comm"] == {herd.pid: "procherd", gap.pid: "gapherd"}[r["pid"]]
            v = (r["conns"], r["tcp"], r["udp"], r["sent_delta"], r["recv_delta"],
                 r["sent_bytes"], r["recv_bytes"])
            last = seen[r["pid"]][-1:]
            # an interval with nothing new repeats the totals with deltas 0
            if last and v[3:5] == (0, 0) and v[:3] + v[5:] == last[0][:3] + last[0][5:]:
                continue
            seen[r["pid"]].append(v)
    assert seen == phases
    # the last interval: both, the bigger first
    assert [r["pid"] for r in ivs[-1][0]] == [herd.pid, gap.pid]


def test_by_process_rows_cap_and_empty_header(run_cli):
    need_tracepoint_backend()
    tc = run_cli("-P", "--interval", "0.2", "--count", "1", "--comm", "nosuchproc42", env=WIDE)
    assert tc.finish() == 0
    iv = table_intervals(tc.out)
    assert len(iv) == 1 and iv[0][1:] == [PROC_HEAD], iv
    assert re.match(r"^\d\d:\d\d:\d\d \(final\)  0 processes, 0 connections  TX 0 0/s  RX 0 0/s"
                    r"  lost 0  tracepoint$", iv[0][0]), iv[0][0]


# --- --pid of no process -------------------------------------------------------------------

def test_pid_of_no_process_warns_once_and_runs(run_cli):
    need_tracepoint_backend()
    assert not os.path.exists("/proc/999999")
    tc = run_cli("--pid", "999999", "--json", "--interval", "0.2", "--count", "2")
    assert tc.finish() == 0
    assert tc.err == ["tracer: warning: no process has pid 999999 now; its connections show if "
                      "it starts",
                      "tracer: tracing TCP and UDP pid 999999 with the tracepoint backend"]
    assert [r["type"] for r in tc.records()] == ["telemetry", "telemetry"]


# --- privilege by capabilities ----------------------------------------------------------------

def _setpriv(caps):
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is missing")
    return [setpriv, "--bounding-set=-all," + ",".join("+" + c for c in caps),
            "--inh-caps=-all", sys.executable, "tracer.py"]


def _run(cmd, timeout=60):
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def test_cap_bpf_alone_names_cap_perfmon():
    need_tracepoint_backend()
    # root, so "run it with sudo" would not help: it says what limits it
    want = ("tracer: error: tracing needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this "
            "process lacks CAP_PERFMON: it runs as root, but with a bounded capability set (a "
            "container, capsh, setpriv): grant them")
    p = _run(_setpriv(["bpf"]) + ["--json", "--count", "1"])
    assert (p.returncode, p.stdout, p.stderr.splitlines()) == (1, "", [want])
    p = _run(_setpriv(["perfmon"]) + ["--count", "1"])
    assert (p.returncode, p.stderr.splitlines()) == (1, [want.replace("lacks CAP_PERFMON",
                                                                      "lacks CAP_BPF")])
    p = _run(_setpriv(["bpf"]) + ["--check", "--json"])
    rep = json.loads(p.stdout)
    assert (p.returncode, rep["missing_capabilities"], rep["ok"]) == (1, ["CAP_PERFMON"], False)
    assert "tracer: error: " + rep["error"] == want
    p = _run([sys.executable, "tracer.py", "--check", "--json"])
    rep = json.loads(p.stdout)
    assert (p.returncode, rep["missing_capabilities"], rep["ok"]) == (0, [], True)
    _assert_nothing_left()


@pytest.mark.parametrize("caps", [["bpf", "perfmon"], ["sys_admin"]], ids=["bpf+perfmon", "sys_admin"])
def test_enough_capabilities_trace_exactly(caps):
    """CAP_BPF + CAP_PERFMON (what containers grant) and CAP_SYS_ADMIN
    alone pass the check, and trace: without CAP_NET_ADMIN the cgroup hooks
    cannot load, and the syscall tracepoints give the UDP addresses."""
    need_tracepoint_backend()
    p = _run(_setpriv(caps) + ["--check", "--json"])
    rep = json.loads(p.stdout)
    assert (rep["missing_capabilities"], rep["error"], rep["ok"], p.returncode) == ([], None, True, 0)
    # the cgroup hooks need CAP_NET_ADMIN (CAP_SYS_ADMIN has its powers)
    fallback = [n for n in rep["offset_notes"] if "from syscall tracepoints" in n]
    assert len(fallback) == (1 if caps == ["bpf", "perfmon"] else 0), rep["offset_notes"]
    cmd = _setpriv(caps) + ["--json", "--interval", "30"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        deadline = time.time() + 30
        line = proc.stderr.readline()
        assert line.startswith("tracer: tracing "), (line, proc.poll())
        tcp = Pair("tcp", 4, send=[1234], reply=[55]).run()
        udp = Pair("udp", 6, send=[77, 88], reply=[99], unconnected=True).run()
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err, err
    recs = [json.loads(l) for l in out.splitlines()]
    got = totals([r for r in recs if r["type"] == "conn"])
    want = pair_expect(tcp)
    want.update(pair_expect(udp))
    assert dict((k, got.get(k, (None,) * 4)[:2]) for k in want) == want
    # an unconnected UDP socket: each record has its datagrams' peer
    peer = [r for r in recs if r["type"] == "conn" and (r["pid"], r["lport"]) ==
            (udp.client_pid, udp.client_port)]
    assert set((r["raddr"], r["rport"]) for r in peer) == {("::1", udp.server_port)}
    _assert_nothing_left()
    assert [d for d in os.listdir("/run") if d.startswith("tracer-bpf-")] == []


# --- the library ---------------------------------------------------------------------------------

@pytest.fixture
def lib_tracer():
    made = []

    def make(**kw):
        t = tracer.Tracer(backend="tracepoint", **kw)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()


def _mine(conns, pid):
    return dict(((c.lport, c.rport), c) for c in conns if c.pid == pid)


def test_watch_yields_count_intervals_of_exact_records(lib_tracer, herds):
    need_tracepoint_backend()
    herd = herds("watchherd")
    t = lib_tracer(comm="watchherd")
    i = herd.open()
    herd.send(i, 7, 8)
    c, s = (herd.clients[i], herd.port), (herd.port, herd.clients[i])
    sizes = [(7, 8), (100, 200), (300, 400)]
    got, stamps = [], []
    start = time.monotonic()
    for n, conns in enumerate(t.watch(0.2, 3)):
        stamps.append(time.monotonic() - start)
        got.append(dict((k, (v.sent_delta, v.recv_delta)) for k, v in _mine(conns, herd.pid).items()))
        if n + 1 < len(sizes):
            herd.send(i, *sizes[n + 1])
    assert got == [{c: (tx, rx), s: (rx, tx)} for tx, rx in sizes]
    assert len(stamps) == 3
    for n, at in enumerate(stamps):
        assert 0.2 * (n + 1) - 0.01 <= at < 0.2 * (n + 1) + 0.15, stamps
    # everything=True: snapshots (the idle connection, deltas 0)
    snaps = list(t.watch(0.05, 2, everything=True))
    assert [sorted((k, v.sent_delta, v.sent_bytes) for k, v in _mine(x, herd.pid).items())
            for x in snaps] == [sorted([(c, 0, 407), (s, 0, 608)])] * 2
    # until close(), from another thread: the iteration ends
    closer = threading.Timer(0.25, t.close)
    closer.start()
    n = sum(1 for _ in t.watch(0.1))
    closer.join()
    assert 1 <= n <= 3
    with pytest.raises(tracer.TracerError):
        list(t.watch(0.1, 1))


def test_close_from_another_thread_ends_watch_cleanly(lib_tracer):
    """close() while watch() polls as fast as it can in another thread:
    the iteration ends, nothing reads a closed (or reused) fd."""
    need_tracepoint_backend()
    for _ in range(5):
        t = lib_tracer()
        errors, polls = [], []

        def run():
            try:
                for conns in t.watch(0.0005, everything=True):
                    polls.append(len(conns))
            except Exception as e:
                errors.append(e)
        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.05)
        t.close()
        th.join(5)
        assert not th.is_alive() and errors == [] and polls


def test_watch_rejects_a_bad_interval(lib_tracer):
    need_tracepoint_backend()
    t = lib_tracer()
    for bad in (0, -1, float("nan")):
        with pytest.raises(tracer.TracerError) as e:
            list(t.watch(bad, 1))
        assert "\n" not in str(e.value) and "interval" in str(e.value)


def test_snapshot_returns_every_tracked_connection_poll_only_changed(lib_tracer, herds):
    need_tracepoint_backend()
    herd = herds("snapherd")
    t = lib_tracer(comm="snapherd")
    a, b = herd.open(), herd.open()
    herd.send(a, 1500, 25)
    herd.send(b, 60, 70)
    ua, ub = herd.udp(11, 22)
    first = _mine(t.poll(), herd.pid)
    A, As = (herd.clients[a], herd.port), (herd.port, herd.clients[a])
    B, Bs = (herd.clients[b], herd.port), (herd.port, herd.clients[b])
    U, Us = (ua, ub), (ub, ua)
    want = {A: (1500, 25), As: (25, 1500), B: (60, 70), Bs: (70, 60), U: (11, 22), Us: (22, 11)}
    assert dict((k, (v.sent_delta, v.recv_delta)) for k, v in first.items()) == want
    assert all(v.first_seen for v in first.values())
    assert _mine(t.poll(), herd.pid) == {}
    snap = _mine(t.snapshot(), herd.pid)
    assert dict((k, (v.sent_delta, v.recv_delta, v.sent_bytes, v.recv_bytes, v.state))
                for k, v in snap.items()) == dict((k, (0, 0) + v + ("open",)) for k, v in want.items())
    assert not any(v.first_seen for v in snap.values())
    herd.send(b, 5, 0)
    # a snapshot is a poll: it reports the change, the next poll has nothing
    snap = _mine(t.snapshot(), herd.pid)
    assert dict((k, v.sent_delta) for k, v in snap.items()) == {A: 0, As: 0, B: 5, Bs: 0, U: 0, Us: 0}
    assert (snap[Bs].recv_delta, snap[Bs].recv_bytes) == (5, 65)
    assert _mine(t.poll(), herd.pid) == {}
    herd.close_conn(a)
    closed = _mine(t.poll(), herd.pid)
    assert dict((k, (v.state, v.sent_delta)) for k, v in closed.items()) == {
        A: ("closed", 0), As: ("closed", 0)}
    snap = _mine(t.snapshot(), herd.pid)
    assert sorted(snap) == sorted([B, Bs, U, Us])


def test_conn_key_is_readable_stable_and_tells_lives_apart(lib_tracer):
    need_tracepoint_backend()
    t = lib_tracer(pid=os.getpid())
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    sport = lst.getsockname()[1]
    tmp = socket.socket()
    tmp.bind(("127.0.0.1", 0))
    cport = tmp.getsockname()[1]
    tmp.close()
    recs = []

    def life(n, poll):
        """One life of the 4-tuple 127.0.0.1:cport -> :sport: n bytes, a
        poll (if poll), n more; the client aborts (RST): no TIME_WAIT."""
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind(("127.0.0.1", cport))
        c.connect(("127.0.0.1", sport))
        s, _ = lst.accept()
        for _ in range(2):
            c.sendall(b"x" * n)
            got = 0
            while got < n:
                got += len(s.recv(4096))
            if poll:
                recs.extend(x for x in t.poll() if x.lport == cport)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        s.close()

    life(100, True)
    life(200, True)
    life(300, False)   # two lives between two polls: two records
    life(400, False)
    recs.extend(x for x in t.poll() if x.lport == cport)
    lst.close()
    seen = {}
    for x in recs:
        seen.setdefault(x.key, []).append((x.sent_bytes, x.state))
    assert list(seen.values()) == [[(100, "open"), (200, "open"), (200, "closed")],
                                   [(200, "open"), (400, "open"), (400, "closed")],
                                   [(600, "closed")], [(800, "closed")]], seen
    keys = list(seen)
    netns = os.stat("/proc/self/ns/net").st_ino
    for k in keys:
        assert isinstance(k, tracer.ConnKey) and isinstance(k, tuple)
        assert k[:-1] == ("tcp", 4, os.getpid(), "127.0.0.1", cport, "127.0.0.1", sport, netns)
        assert k._asdict()["life"] == k.life and isinstance(k.life, int)
        assert repr(k) == ("ConnKey(proto='tcp', family=4, pid=%d, laddr='127.0.0.1', lport=%d, "
                           "raddr='127.0.0.1', rport=%d, netns=%d, life=%d)"
                           % (os.getpid(), cport, sport, netns, k.life))
    # four lives of one 4-tuple: four keys, told apart by life alone
    assert len(set(k.life for k in keys)) == 4
    # the Conn's fields are its key's
    x = recs[0]
    assert (x.proto, x.family, x.pid, x.laddr, x.lport, x.raddr, x.rport, x.netns) == x.key[:-1]


def test_after_close_every_call_raises_tracer_error(lib_tracer):
    need_tracepoint_backend()
    t = lib_tracer()
    t.poll()
    t.close()
    t.close()   # idempotent
    for call in (t.poll, t.snapshot, t.telemetry, lambda: next(t.watch(0.1))):
        with pytest.raises(tracer.TracerError) as e:
            call()
        assert str(e.value) == "the tracer is closed"


def test_library_filters(lib_tracer, herds):
    need_tracepoint_backend()
    t4 = serve("tcp", 4, [321], [123])
    t6 = serve("tcp", 6, [444], [55])
    t2 = serve("tcp", 4, [66], [77], addr="127.0.0.2")
    herd = herds("libherd")
    i = herd.open()
    T4 = t4.server_port
    kws = [dict(lport=T4), dict(rport=T4), dict(rport=[T4, t6.server_port]),
           dict(raddr="127.0.0.2"), dict(raddr=["::1"]), dict(raddr="127.0.0.0/30"),
           dict(comm="libherd"), dict(comm=["libherd", "nosuch"], lport=herd.port),
           dict(port={T4}, raddr="::/0"), dict(port=frozenset([T4, t2.server_port]), tcp=True),
           dict(raddr="::ffff:127.0.0.2"), dict(raddr=[ipaddress.ip_network("::ffff:127.0.0.0/126")])]
    ts = [lib_tracer(**kw) for kw in kws]
    for p in (t4, t6, t2):
        connect(p).wait()
    herd.send(i, 9, 99)
    c4, s4 = (t4.client_pid, t4.client_port), (t4.server_pid, T4)
    c6, s6 = (t6.client_pid, t6.client_port), (t6.server_pid, t6.server_port)
    c2, s2 = (t2.client_pid, t2.client_port), (t2.server_pid, t2.server_port)
    hc, hs = (herd.pid, herd.clients[i]), (herd.pid, herd.port)
    want = [{s4}, {c4}, {c4, c6}, {c2}, {c6, s6}, {c4, s4, c2, s2, hc, hs}, {hc, hs}, {hs}, set(),
            {c4, s4, c2, s2}, {c2}, {c4, s4, c2, s2, hc, hs}]
    universe = {c4, s4, c6, s6, c2, s2, hc, hs}
    got = []
    for t in ts:
        got.append(set((c.pid, c.lport) for c in t.poll()) & universe)
    assert got == want
    # IPv4-mapped IPv6 matches as the IPv4 address the records show
    assert ts[5].raddr == ts[11].raddr == (ipaddress.ip_network("127.0.0.0/30"),)


@pytest.mark.parametrize("kw", [
    dict(port=0), dict(port=65536), dict(lport=[80, 0]), dict(rport="80"), dict(port=True),
    dict(lport=[]), dict(raddr="10.0.0.0/33"), dict(raddr="not an address"), dict(raddr=5),
    dict(raddr=[]), dict(comm=5), dict(comm=[]), dict(comm=""), dict(comm="x" * 16),
    dict(comm="\u00e9" * 8), dict(comm=b"bytes"),
    dict(comm=["ok", 7]), dict(pid=0), dict(pid=-1), dict(pid="1"), dict(pid=True),
], ids=lambda kw: ",".join("%s=%r" % i for i in kw.items()))
def test_bad_filter_values_raise_one_line_tracer_error(kw):
    need_root()
    with pytest.raises(tracer.TracerError) as e:
        tracer.Tracer(**kw).close()
    text = str(e.value)
    assert "\n" not in text and text.split(":")[0] in kw, text


def test_help_of_conn_documents_every_field():
    text = pydoc.render_doc(tracer.Conn, renderer=pydoc.plaintext)
    documented = set()
    for line in tracer.Conn.__doc__.split("Attributes", 1)[1].splitlines():
        m = re.match(r"^      ([a-z_]+(?:, [a-z_]+)*)(?: |$)", line)
        if m:
            documented.update(m.group(1).split(", "))
    assert set(conntrack.FIELDS) | {"key", "first_seen", "retrans_delta"} <= documented
    for f in conntrack.FIELDS:
        assert re.search(r"\b%s\b" % f, text)
    assert "ConnKey" in text
    assert tracer.ConnKey._fields == ("proto", "family", "pid", "laddr", "lport", "raddr",
                                      "rport", "netns", "life")
    assert "life" in pydoc.render_doc(tracer.ConnKey, renderer=pydoc.plaintext)


# --- the live view ------------------------------------------------------------------------------

def test_scroll_on_a_terminal_appends_without_clearing(herds):
    need_tracepoint_backend()
    from screen import Terminal
    herd = herds("scrollherd")
    i = herd.open()
    with Terminal(120, 24, "-C", "--interval", "0.3", "--count", "3", "--comm", "scrollherd") as term:
        term.wait_for("Ctrl-C to end")
        herd.send(i, 1234, 56)
        assert term.finish() == 0
    assert b"\x1b[" not in term.raw and b"\x1bc" not in term.raw, term.raw[-500:]
    lines = term.printed_lines()
    heads = [l for l in lines if HEADER.match(l)]
    assert len(heads) == 3 and "(final)" in heads[2] and "(final)" not in heads[1]
    rows = [l.split() for l in lines if l.split()[1:2] == ["scrollherd"]]
    assert sorted(r[3:7] for r in rows) == sorted([
        ["127.0.0.1:%d" % herd.clients[i], "127.0.0.1:%d" % herd.port, "1.2K", "56"],
        ["127.0.0.1:%d" % herd.port, "127.0.0.1:%d" % herd.clients[i], "56", "1.2K"]])


def test_pipe_appends_every_row_and_rows_caps(run_cli, herds):
    need_tracepoint_backend()
    herd = herds("pipeherd")
    conns = [herd.open() for _ in range(6)]       # 12 records
    argv = ["--interval", "30", "--comm", "pipeherd"]
    tcs = start_all(run_cli, [argv, argv + ["--rows", "5"], argv + ["--rows", "12"],
                              argv + ["--rows", "11"], argv + ["--rows", "1"]],
                    env={"COLUMNS": "200", "LINES": "8"})
    for n, i in enumerate(conns):
        herd.send(i, 100 * (n + 1), 0)
    time.sleep(0.1)
    for tc in tcs:
        assert tc.stop() == 0
    shown = []
    for tc in tcs:
        assert not any("\x1b" in l for l in tc.out)
        ivs = table_intervals(tc.out)
        assert len(ivs) == 1
        shown.append(ivs[0][2:])
    # not a terminal: every row, though LINES says 8
    assert len(shown[0]) == 12 and not shown[0][-1].startswith("+")
    # by bytes in the interval: each connection's two sides, the biggest first
    cells = [l.split() for l in shown[0]]
    assert [int(r[5]) + int(r[6]) for r in cells] == [600, 600, 500, 500, 400, 400, 300, 300,
                                                      200, 200, 100, 100]
    assert sorted(r[5:7] for r in cells) == sorted([[str(100 * n), "0"] for n in range(1, 7)] +
                                                   [["0", str(100 * n)] for n in range(1, 7)])
    assert shown[1][:4] == shown[0][:4] and shown[1][4:] == ["+8 more (--rows shows more)"]
    assert shown[2] == shown[0]
    assert shown[3][:10] == shown[0][:10] and shown[3][10:] == ["+2 more (--rows shows more)"]
    assert shown[4] == ["+12 more (--rows shows more)"]


def test_empty_interval_prints_an_aligned_header(run_cli):
    need_tracepoint_backend()
    wide = run_cli("--interval", "0.2", "--count", "2", "--comm", "nosuchproc42", env=WIDE)
    narrow = run_cli("--interval", "0.2", "--count", "1", "--comm", "nosuchproc42",
                     env={"COLUMNS": "40"})
    assert wide.finish() == 0 and narrow.finish() == 0
    for tc in (wide, narrow):
        for iv in table_intervals(tc.out):
            assert len(iv) == 2, iv
            assert re.match(r"^\d\d:\d\d:\d\d( \(final\))?  0 active, \d+ tracked", iv[0]), iv
            assert iv[1] == re.sub(" +", " ", iv[1]).strip()
    assert [iv[1] for iv in table_intervals(wide.out)] == [CONN_HEAD, CONN_HEAD]
    assert len(table_intervals(narrow.out)[0][1]) <= 40
    assert table_intervals(narrow.out)[0][1].split()[:2] == ["PID", "COMM"]


def test_live_empty_interval_and_rows_on_a_terminal(herds):
    need_tracepoint_backend()
    from screen import Terminal
    herd = herds("liveherd")
    conns = [herd.open() for _ in range(4)]
    with Terminal(100, 24, "--interval", "0.3", "--count", "4", "--rows", "5",
                  "--comm", "liveherd") as term:
        term.wait_frames(1)
        for n, i in enumerate(conns):
            herd.send(i, 10 * (n + 1), 0)
        assert term.finish() == 0
    frames = term.frames()
    assert len(frames) == 4
    first = frames[0]
    assert HEADER.match(first[0]) and " 0 active, " in first[0]
    assert first[1] == CONN_HEAD and all(l == "" for l in first[2:])
    busy = [f for f in frames if any(l.startswith("+") for l in f)]
    assert busy, frames
    f = busy[0]
    assert [int(l.split()[5]) + int(l.split()[6]) for l in f[2:6]] == [40, 40, 30, 30]
    assert f[6] == "+4 more (--rows, or a taller terminal, shows more)"
    assert all(l == "" for l in f[7:])


def test_live_view_never_scrolls_its_header_away_whatever_rows_says(herds):
    """--rows above the terminal's height: a redrawn screen still shows
    only what fits (else the header scrolls away)."""
    need_tracepoint_backend()
    from screen import Terminal
    herd = herds("tallherd")
    conns = [herd.open() for _ in range(8)]        # 16 records on a 12-line terminal
    with Terminal(100, 12, "--interval", "0.3", "--count", "3", "--rows", "50",
                  "--comm", "tallherd") as term:
        term.wait_frames(1)
        for n, i in enumerate(conns):
            herd.send(i, 10 * (n + 1), 0)
        assert term.finish() == 0
    frames = term.frames()
    assert len(frames) == 3
    for f in frames:
        assert HEADER.match(f[0]) and f[1].split()[:2] == ["PID", "COMM"], f
    busy = [f for f in frames if any(l.startswith("+") for l in f)]
    assert busy, frames
    # 12 lines: header, column header, 8 rows, "+8 more", the cursor's line
    assert busy[0][10] == "+8 more (--rows, or a taller terminal, shows more)", busy[0]
    assert [int(l.split()[5]) + int(l.split()[6]) for l in busy[0][2:10]] == \
        [80, 80, 70, 70, 60, 60, 50, 50]

