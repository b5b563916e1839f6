"""The command line (python3 tracer.py ...), run as a real subprocess: the
records and the table show exactly the bytes that loopback clients and
servers in other processes exchanged; --count, SIGINT and SIGTERM end it
with the last interval printed; errors are one line and the right exit
code; nothing of ours is left attached afterwards."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, need_root, need_tracepoint_backend
import cli
from traffic import Pair

PY_COMM = os.path.basename(sys.executable)[:15]  # the comm of processes we exec
HEAD = re.compile(r"^\d\d:\d\d:\d\d( \(final\))?  \d+ active, \d+ tracked  TX ")
READY_TIMEOUT = 30.0


class TracerCli(object):
    """python3 tracer.py ARGS in the background; its stdout and stderr lines
    are collected by threads so that a test can wait for what it needs."""

    def __init__(self, *args, **kw):
        env = dict(os.environ)
        env.update(kw.get("env", {}))
        self.proc = subprocess.Popen([sys.executable, "tracer.py"] + [str(a) for a in args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, universal_newlines=True)
        self.out, self.err = [], []
        self.threads = [threading.Thread(target=self._drain, args=(s, l))
                        for s, l in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.daemon = True
            t.start()

    @staticmethod
    def _drain(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, what, timeout=READY_TIMEOUT):
        """Wait until what() is true (the process may still be running)."""
        deadline = time.time() + timeout
        while not what():
            if self.proc.poll() is not None and all(not t.is_alive() for t in self.threads):
                assert what(), "tracer exited %d; stderr: %s" % (self.proc.returncode, self.err)
                return
            assert time.time() < deadline, "timed out; stdout: %s stderr: %s" % (self.out, self.err)
            time.sleep(0.02)

    def wait_ready_json(self):
        self.wait_for(lambda: any(l.startswith("tracer: tracing ") for l in self.err))

    def wait_ready_table(self):
        self.wait_for(lambda: any(l.startswith("Tracing ") for l in self.out))

    def table_heads(self):
        return [l for l in self.out if HEAD.match(l)]

    def finish(self, timeout=20):
        """Wait for exit; returns the exit code (the output is complete)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("tracer did not exit within %s s" % timeout)
        for t in self.threads:
            t.join(5)
        return self.proc.returncode

    def stop(self, signum=signal.SIGINT):
        self.proc.send_signal(signum)
        return self.finish()

    def records(self, type_=None):
        recs = [json.loads(l) for l in self.out]
        return [r for r in recs if type_ is None or r["type"] == type_]

    def latest(self, **match):
        """The last conn record matching (totals are in every record)."""
        found = [r for r in self.records("conn") if all(r[k] == v for k, v in match.items())]
        return found[-1] if found else None


@pytest.fixture
def run_cli():
    """Starts tracer processes; afterwards none is running and nothing of
    ours is attached."""
    started = []

    def start(*args, **kw):
        t = TracerCli(*args, **kw)
        started.append(t)
        return t
    yield start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
            pytest.fail("tracer process %d was still running" % t.proc.pid)
    if started:
        _assert_nothing_left()


def _assert_nothing_left():
    import bpfsys
    assert bpfsys.our_kprobe_events() == []
    path = "/sys/kernel/tracing/kprobe_events"
    if os.path.exists(path):
        with open(path) as f:
            assert [l for l in f if "tracer" in l] == []


def _expect(proto, send, reply):
    """sent/recv totals of the client and the server for a Pair."""
    return {"client": (sum(send), sum(reply)), "server": (sum(reply), sum(send))}


def _assert_pair_records(tc, pair, closed):
    exp = _expect(pair.proto, pair.send, pair.reply)
    for side, pid, lport, rport in (("client", pair.client_pid, pair.client_port, pair.server_port),
                                    ("server", pair.server_pid, pair.server_port, pair.client_port)):
        r = tc.latest(pid=pid, lport=lport, proto=pair.proto)
        assert r is not None, "no record for the %s (pid %d); got %s" % (side, pid, tc.out)
        assert (r["sent_bytes"], r["recv_bytes"]) == exp[side], (side, r)
        assert (r["family"], r["comm"], r["raddr"], r["rport"]) == (
            pair.family, PY_COMM, pair.addr, rport)
        assert r["laddr"] == pair.addr
        assert sorted(r) == sorted(cli_fields())
        if pair.proto == "tcp":
            assert r["direction"] == ("outgoing" if side == "client" else "incoming")
            if closed:
                assert r["state"] == "closed"
        # the deltas of all records of this connection add up to its totals
        recs = [x for x in tc.records("conn") if x["pid"] == pid and x["lport"] == lport]
        assert (sum(x["sent_delta"] for x in recs), sum(x["recv_delta"] for x in recs)) == exp[side]


def cli_fields():
    import conntrack
    return conntrack.FIELDS


def _pair_seen(tc, pair):
    def seen():
        exp = _expect(pair.proto, pair.send, pair.reply)
        c = tc.latest(pid=pair.client_pid, lport=pair.client_port)
        s = tc.latest(pid=pair.server_pid, lport=pair.server_port)
        done = c and s and (c["sent_bytes"], c["recv_bytes"]) == exp["client"] and \
            (s["sent_bytes"], s["recv_bytes"]) == exp["server"]
        if done and pair.proto == "tcp":
            done = c["state"] == "closed" and s["state"] == "closed"
        return bool(done)
    return seen


# --- pure formatting (no root) ---------------------------------------------

def test_human_bytes_exact_below_1k_then_units():
    cases = {0: "0", 500: "500", 1023: "1023", 1024: "1.0K", 3000: "2.9K", 4000: "3.9K",
             10240: "10K", 1023 * 1024: "1.0M", 1 << 20: "1.0M", 150 << 20: "150M",
             5 << 30: "5.0G", 3 << 40: "3.0T"}
    assert dict((n, cli.human_bytes(n)) for n in cases) == cases


def test_rows_sort_as_their_key_tuples_do():
    """sort_rows packs a row's sort key into one int: the order is the
    tuple's, negative deltas, u64 totals, ties and rows without ports
    (processes) included."""
    import random
    import types
    rnd = random.Random(7)

    def row(ports=True):
        r = types.SimpleNamespace(
            sent_delta=rnd.choice([0, 1, -5, 2**64 - 1, rnd.randrange(-1000, 1000)]),
            recv_delta=rnd.choice([0, 3, rnd.randrange(0, 10**6)]),
            sent_bytes=rnd.choice([0, 2**64 - 1, rnd.randrange(0, 2**64)]),
            recv_bytes=rnd.choice([0, 2**64 - 1, rnd.randrange(0, 10**6)]),
            pid=rnd.choice([1, 4242, 2**32 - 1]), conns=rnd.randrange(0, 5),
            duration=rnd.choice([None, 0.5, 3.0]))
        if ports:
            r.lport, r.rport = rnd.choice([0, 443, 65535]), rnd.choice([0, 80, 65535])
        return r
    for ports in (True, False):
        rows = [row(ports) for _ in range(3000)]
        for key, first in cli.SORTS.items():
            want = sorted(rows, key=lambda c: first(c) + (c.pid, getattr(c, "lport", 0),
                                                          getattr(c, "rport", 0)))
            assert [id(r) for r in cli.sort_rows(rows, key)] == [id(r) for r in want], key


def test_help_is_a_manual_with_examples():
    out = subprocess.check_output([sys.executable, "tracer.py", "--help"], cwd=ROOT,
                                  universal_newlines=True)
    for text in ("--interval", "--count", "--json", "--backend", "--check", "tracepoint",
                 "kprobe", "exit status", "examples:", "sudo python3 tracer.py --check"):
        assert text in out


# --- bad arguments: usage, exit 2 ----------------------------------------

@pytest.mark.parametrize("args", [["--interval", "0"], ["--interval", "abc"], ["--count", "-1"],
                                  ["--count", "0"], ["--backend", "foo"], ["--tcp", "--udp"],
                                  ["-4", "-6"], ["--port", "70000"], ["--pid", "x"]],
                         ids=lambda a: " ".join(a))
def test_bad_arguments_print_usage_and_exit_2(args):
    p = subprocess.run([sys.executable, "tracer.py"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith("usage: ")
    assert p.stderr.splitlines()[-1].startswith("tracer: error: argument " + args[0].split("=")[0]) \
        or "not allowed with" in p.stderr


# --- errors: one line on stderr, exit 1 ----------------------------------

def _run_error(args):
    cmd = [sys.executable, "tracer.py"] + args
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    _assert_nothing_left()
    return p


def _assert_one_error_line(p, *words):
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("tracer: error: ")
    for w in words:
        assert w in lines[0]


def test_unavailable_backend_is_one_line_exit_1():
    need_root()
    import backends
    missing = [b for b, (ok, _) in backends.availability().items() if not ok]
    if not missing:
        pytest.skip("every backend works on this kernel")
    p = _run_error(["--backend", missing[0]])
    _assert_one_error_line(p, "the %s backend is not available on this kernel" % missing[0],
                           "--backend")
    assert p.stdout == ""


def test_closed_standard_output_is_one_line_exit_1():
    # (sys.stdout is None in a process started with fd 1 closed)
    cmd = [sys.executable, "tracer.py", "0.2", "1"]
    p = subprocess.run("exec %s >&-" % " ".join(cmd), shell=True, cwd=ROOT,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    _assert_one_error_line(p, "standard output is closed")
    _assert_nothing_left()


def test_truncated_object_is_one_line_exit_1(tmp_path):
    need_tracepoint_backend()
    bad = tmp_path / "tracer.bpf.o"
    with open(os.path.join(ROOT, "tracer.bpf.o"), "rb") as f:
        bad.write_bytes(f.read()[:4096])
    p = _run_error(["--object", str(bad), "--count", "1"])
    _assert_one_error_line(p, "bad BPF object", str(bad), "truncated", "rebuild it with make")


def test_missing_object_is_one_line_exit_1(tmp_path):
    need_tracepoint_backend()
    missing = str(tmp_path / "nothing.bpf.o")
    p = _run_error(["--object", missing, "--json"])
    _assert_one_error_line(p, missing, "is missing")


def _unprivileged_python():
    """A python the nobody user can run (sys.executable may sit under /root)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is missing")
    for py in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c", "pass"]
        try:
            if subprocess.call(cmd, stderr=subprocess.DEVNULL, cwd=ROOT) == 0:
                return cmd[:-2]
        except OSError:
            continue
    pytest.skip("no python3 that user nobody can run")


@pytest.mark.parametrize("args", [[], ["--json"], ["--check"]], ids=["table", "json", "check"])
def test_not_root_says_use_sudo_exit_1(args):
    need_root()  # to switch to user nobody
    cmd = _unprivileged_python() + ["tracer.py"] + args
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    want = ("tracing needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this process lacks "
            "CAP_BPF and CAP_PERFMON: run it with sudo")
    if args == ["--check"]:
        assert p.stdout.splitlines()[-1] == "result:   FAILED: " + want
    else:
        assert p.stderr.splitlines() == ["tracer: error: " + want]


# --- --check ---------------------------------------------------------------

def test_check_reports_backend_hooks_offsets_and_exits_0(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--check")
    assert tc.finish(60) == 0
    text = "\n".join(tc.out)
    assert tc.out[0].startswith("kernel:   Linux %s" % os.uname()[2])
    assert "  tracepoint yes" in text
    assert "chosen:   tracepoint (auto: " in text
    assert "  tp_sock_send_length        raw_tracepoint  sock_send_length" in text
    assert "offsets:  guessed in " in text and "startup:  " in text
    assert tc.out[-1] == "result:   OK: tracing works (detached again)"


def test_check_json_is_one_object(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--check", "--json", "--backend", "tracepoint")
    assert tc.finish(60) == 0
    assert len(tc.out) == 1
    rep = json.loads(tc.out[0])
    assert (rep["ok"], rep["error"], rep["backend"], rep["kernel"]) == (
        True, None, "tracepoint", os.uname()[2])
    assert rep["backends"]["tracepoint"]["available"] is True
    assert {"program": "tp_sock_recv_length", "kind": "raw_tracepoint",
            "target": "sock_recv_length"} in rep["hooks"]
    assert rep["offsets"]["ready"] == 1 and "sport" in rep["offsets"]
    assert rep["guess_seconds"] >= 0 and rep["startup_seconds"] >= rep["guess_seconds"]


# --- --json records --------------------------------------------------------

TRAFFIC = [("tcp", 4), ("tcp", 6), ("udp", 4), ("udp", 6)]


@pytest.mark.parametrize("proto,family", TRAFFIC, ids=["tcp4", "tcp6", "udp4", "udp6"])
def test_json_records_show_exact_bytes_of_both_sides(run_cli, proto, family):
    need_tracepoint_backend()
    tc = run_cli("--json", "--interval", "0.3")
    tc.wait_ready_json()
    pair = Pair(proto, family, send=[3000, 1000, 1], reply=[500, 700]).run()
    tc.wait_for(_pair_seen(tc, pair), timeout=10)
    assert tc.stop(signal.SIGINT) == 0
    _assert_pair_records(tc, pair, closed=True)
    assert tc.err == [l for l in tc.err if l.startswith("tracer: tracing TCP and UDP with the ")]


def test_json_telemetry_record_each_interval(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--json", "--interval", "0.2", "--count", "4")
    assert tc.finish() == 0
    tele = tc.records("telemetry")
    assert [t["interval"] for t in tele] == [1, 2, 3, 4]
    assert [t["final"] for t in tele] == [False, False, False, True]
    assert tc.out[-1] == json.dumps(tele[-1])  # the telemetry closes each interval
    for t in tele:
        assert t["backend"] == "tracepoint" and t["lost"] == 0
        for key in ("tracked", "conn_lost", "closed_lost", "udp_lost", "bytes_lost", "stash_lost", "poll_seconds", "time"):
            assert key in t


def test_count_stops_after_n_intervals(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--json", "--interval", "0.5", "--count", "2")
    start = time.time()
    assert tc.finish(30) == 0
    assert time.time() - start < 30
    tele = tc.records("telemetry")
    assert len(tele) == 2
    assert len(tc.records()) == len(tc.out)  # every line is JSON


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_interval_prints_last_partial_interval(run_cli, signum):
    need_tracepoint_backend()
    tc = run_cli("--json", "--interval", "30")
    tc.wait_ready_json()
    pair = Pair("tcp", 4, send=[2000], reply=[3000, 3000]).run()
    udp = Pair("udp", 6, send=[111, 222], reply=[333]).run()
    time.sleep(0.2)  # well inside the 30 s interval: nothing printed yet
    assert tc.out == []
    assert tc.stop(signum) == 0
    _assert_pair_records(tc, pair, closed=True)
    _assert_pair_records(tc, udp, closed=False)
    tele = tc.records("telemetry")
    assert [(t["interval"], t["final"]) for t in tele] == [(1, True)]
    assert "Traceback" not in "\n".join(tc.err)


def _ours(tc, pairs):
    """(pid, lport) of the records that belong to these pairs."""
    mine = set()
    for p in pairs:
        mine |= set([(p.client_pid, p.client_port), (p.server_pid, p.server_port)])
    return set((r["pid"], r["lport"]) for r in tc.records("conn")) & mine


def test_udp_and_ipv6_filters_show_only_those(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--json", "--interval", "30", "--udp", "-6")
    tc.wait_ready_json()
    pairs = [Pair(proto, family, send=[5], reply=[6]).run() for proto, family in TRAFFIC]
    time.sleep(0.2)
    assert tc.stop() == 0
    udp6 = pairs[3]
    assert _ours(tc, pairs) == set([(udp6.client_pid, udp6.client_port),
                                    (udp6.server_pid, udp6.server_port)])


def test_port_filter_matches_local_or_remote_port(run_cli):
    need_tracepoint_backend()
    pair = Pair("tcp", 4, send=[10], reply=[20])
    # the server first, so that its port can be given to --port
    pair.server = pair._spawn("server", "tcp", 4, pair.addr, "10", "20")
    info = pair._read(pair.server)
    pair.server_pid, pair.server_port = info["pid"], info["port"]
    tc = run_cli("--json", "--interval", "30", "--port", pair.server_port)
    tc.wait_ready_json()
    pair.client = pair._spawn("client", "tcp", 4, pair.addr, pair.server_port, "10", "20")
    info = pair._read(pair.client)
    pair.client_pid, pair.client_port = info["pid"], info["lport"]
    pair.wait()
    other = Pair("tcp", 4, send=[7], reply=[8]).run()
    time.sleep(0.2)
    assert tc.stop() == 0
    assert _ours(tc, [pair, other]) == set([(pair.client_pid, pair.client_port),
                                            (pair.server_pid, pair.server_port)])
    _assert_pair_records(tc, pair, closed=True)


# --- the table ---------------------------------------------------------------

def _rows_for(lines, port):
    """Rows with this port as an endpoint's or as LPORT."""
    return [l.split() for l in lines if l.split() and l.split()[0].isdigit() and any(
        w == str(port) or w.endswith(":%d" % port) for w in l.split()[2:5])]


def test_table_rows_show_ports_and_bytes(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--interval", "0.5", "--count", "4", env={"COLUMNS": "200"})
    tc.wait_ready_table()
    pair = Pair("tcp", 4, send=[3000, 1000], reply=[500]).run()
    assert tc.finish() == 0
    assert tc.out[0] == "Tracing TCP and UDP with the tracepoint backend; Ctrl-C to end."
    heads = tc.table_heads()
    assert len(heads) == 4 and " (final)  " in heads[-1]
    client = _rows_for(tc.out, pair.client_port)
    server = [r for r in _rows_for(tc.out, pair.server_port) if r[0] == str(pair.server_pid)]
    client = [r for r in client if r[0] == str(pair.client_pid)]
    assert client and server
    # the last row of each: totals, state (by column name: a FAIL column
    # appears when any connection on the host failed in that interval)
    c, srv = _named(tc.out, client[-1]), _named(tc.out, server[-1])
    assert [c[k] for k in ("COMM", "PROTO", "LADDR:LPORT", "RADDR:RPORT")] == [
        PY_COMM, "tcp", "127.0.0.1:%d" % pair.client_port, "127.0.0.1:%d" % pair.server_port]
    assert [c[k] for k in ("TXTOT", "RXTOT", "STATE")] == ["3.9K", "500", "closed"]
    assert [srv[k] for k in ("TXTOT", "RXTOT", "STATE")] == ["500", "3.9K", "closed"]
    assert re.match(r"^\d+\.\d\ds$", c["DUR"])  # DUR: seen from the start
    assert tc.err == []


def _named(lines, row):
    """{column: value} of a row (split), by the column header above it."""
    at = [l.split() for l in lines].index(row)
    head = next(l.split() for l in reversed(lines[:at]) if l.split()[:2] == ["PID", "COMM"])
    return dict(zip(head, row))


LONG_V6 = "fd00:7ace:b0f0:1234:5678:9abc:def0:1234"


@pytest.fixture
def long_v6_addr():
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("no ip command to add a long IPv6 address to lo")
    if subprocess.call([ip, "-6", "addr", "add", LONG_V6 + "/128", "dev", "lo", "nodad"],
                       stderr=subprocess.DEVNULL) != 0:
        pytest.skip("cannot add an IPv6 address to lo")
    yield LONG_V6
    subprocess.call([ip, "-6", "addr", "del", LONG_V6 + "/128", "dev", "lo"])


def test_table_fits_80_columns_with_live_ipv6_traffic(run_cli, long_v6_addr):
    need_tracepoint_backend()
    tc = run_cli("--interval", "0.5", "--count", "4", env={"COLUMNS": "80"})
    tc.wait_ready_table()
    pair = Pair("udp", 6, send=[1500, 2500], reply=[100], addr=long_v6_addr).run()
    assert tc.finish() == 0
    too_long = [l for l in tc.out if len(l) > 80]
    assert too_long == []
    client = [r for r in _rows_for(tc.out, pair.client_port) if r[0] == str(pair.client_pid)]
    assert client, tc.out
    # at 80 columns two long IPv6 endpoints leave room for the local port only
    assert client[-1][1:] == [PY_COMM, str(pair.client_port),
                              "[%s]:%d" % (long_v6_addr, pair.server_port), "3.9K", "100"]


def test_sighup_detaches_and_exits_0(run_cli):
    need_tracepoint_backend()
    tc = run_cli("--json", "--interval", "30")
    tc.wait_ready_json()
    assert tc.stop(signal.SIGHUP) == 0  # the terminal went away: nothing more to print
    assert tc.out == []
    assert "Traceback" not in "\n".join(tc.err)
