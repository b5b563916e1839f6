"""The Prometheus exporter (prometheus.py): exact counters per label set
from synthetic records, poll after poll, after connections leave, folded
into "other" beyond max_series; label escaping; --prometheus addresses;
every rendered text checked by a parser written to the format's spec
(test/promparse.py) and by promtool where installed; a real Tracer's
loopback traffic scraped over HTTP; the command line's endpoint."""

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import need_tracepoint_backend
import conntrack
import prometheus
import promparse


class Life(object):
    """One synthetic connection; report() is its record in one poll, with
    totals and deltas as conntrack computes them."""

    def __init__(self, pid=100, comm="curl", proto="tcp", direction="outgoing", laddr="10.0.0.2",
                 lport=40000, raddr="10.0.0.1", rport=443):
        self.tuple = dict(pid=pid, comm=comm, proto=proto, direction=direction, laddr=laddr,
                          lport=lport, raddr=raddr, rport=rport)
        self.sent = self.recv = self.retr = 0
        self.reported = self.closed = False

    def report(self, sent=0, recv=0, retr=0, closed=False):
        c = conntrack.Conn()
        for k, v in self.tuple.items():
            setattr(c, k, v)
        c.family = 6 if ":" in c.raddr else 4
        c.netns = 4026531840
        c.key = conntrack.ConnKey(c.proto, c.family, c.pid, c.laddr, c.lport, c.raddr, c.rport,
                                  c.netns, 1)
        self.sent += sent
        self.recv += recv
        self.retr += retr
        c.sent_bytes, c.recv_bytes, c.retransmits = self.sent, self.recv, self.retr
        c.sent_delta, c.recv_delta, c.retrans_delta = sent, recv, retr
        self.closed = closed
        c.state = "closed" if closed else "open"
        c.first_seen = not self.reported
        c.start_time = c.duration = None
        self.reported = True
        return c


def render(exp):
    """exp.render(), parsed (so every rendered text is checked)."""
    return promparse.parse(exp.render())


def labels(pid=100, comm="curl", proto="tcp", direction="outgoing", raddr="10.0.0.1", port=443):
    return dict(pid=str(pid), comm=comm, proto=proto, direction=direction, raddr=raddr,
                port=str(port))


OTHER = dict((k, "other") for k in prometheus.LABELS)
COUNTERS = [name for name, _ in prometheus.COUNTERS][:5]  # bytes, opened, closed, retransmits
FAILURES = [name for name, _ in prometheus.COUNTERS][5:]


def counts(fams, **lab):
    """(sent, received, opened, closed, retransmits) of one series (0
    where it has no sample)."""
    return tuple(int(fams[name].get(0, **lab)) for name in COUNTERS)


def totals(fams):
    """Each counter summed over all its series."""
    return tuple(int(sum(fams[name].samples.values())) for name in COUNTERS)


# -- counters from synthetic records ------------------------------------------

def test_failures_and_resets_count_once_when_the_record_closes():
    exp = prometheus.Exporter()
    for end, fields in (("refused", (1, 0, 0)), ("reset_sent", (0, 1, 0)),
                        ("reset_received", (0, 0, 1)), ("fin", (0, 0, 0))):
        f = Life(rport=1000 + len(end))
        c = f.report(sent=5)
        exp.update([c])
        c = f.report(closed=True)
        c.end = end
        c.failed_connects, c.resets_sent, c.resets_received = fields
        exp.update([c])
        exp.update([c])  # reported again (a snapshot): not counted twice
        fams = render(exp)
        got = tuple(int(fams[n].get(0, **labels(port=1000 + len(end)))) for n in FAILURES)
        assert got == fields, (end, got)

def test_counters_are_the_sums_of_each_label_sets_deltas_across_polls():
    exp = prometheus.Exporter()
    a, b = Life(lport=40001), Life(lport=40002)  # two connections of one series
    exp.update([a.report(sent=100, recv=1000), b.report(sent=10, recv=20)])
    assert counts(render(exp), **labels()) == (110, 1020, 2, 0, 0)
    exp.update([a.report(sent=50), b.report(recv=5, closed=True)])
    assert counts(render(exp), **labels()) == (160, 1025, 2, 1, 0)
    exp.update([a.report(recv=7, closed=True)])
    assert counts(render(exp), **labels()) == (160, 1032, 2, 2, 0)


def test_counters_stay_after_connections_close_and_leave_the_tracer():
    exp = prometheus.Exporter()
    a = Life()
    exp.update([a.report(sent=300, recv=400, closed=True)])
    for _ in range(3):  # polls without the connection: it left the tracer's tables
        exp.update([])
        assert counts(render(exp), **labels()) == (300, 400, 1, 1, 0)
    b = Life(lport=40009)  # a new connection of the same series adds to it
    exp.update([b.report(sent=5)])
    assert counts(render(exp), **labels()) == (305, 400, 2, 1, 0)


def test_counters_are_monotonic_poll_after_poll():
    exp = prometheus.Exporter(max_series=3, idle_seconds=1.0)
    lives = [Life(raddr="10.0.1.%d" % i, lport=41000 + i) for i in range(6)]
    prev, prev_totals = {}, (0,) * len(COUNTERS)
    for step in range(12):
        recs = [l.report(sent=step + i, recv=2 * i, retr=step % 2,
                         closed=(step == 11)) for i, l in enumerate(lives) if (step + i) % 3]
        exp.update(recs, now=float(step))
        fams = render(exp)
        now = {}
        for name in COUNTERS:
            for series, value in fams[name].samples.items():
                # while it has a series (one dropped for idleness starts anew)
                assert value >= prev.get(series, 0), (step, series)
                now[series] = value
        prev = now
        assert all(a <= b for a, b in zip(prev_totals, totals(fams)))
        prev_totals = totals(fams)
    assert prev_totals == (sum(l.sent for l in lives), sum(l.recv for l in lives), 6,
                           sum(l.closed for l in lives), sum(l.retr for l in lives))
    assert fams["tracer_series_dropped_total"].value() > 0


def test_incoming_connections_share_the_local_service_port():
    exp = prometheus.Exporter()
    clients = [Life(comm="nginx", direction="incoming", laddr="10.0.0.1", lport=8080,
                    raddr="10.0.0.9", rport=50000 + i) for i in range(3)]
    exp.update([c.report(recv=100, sent=1000, closed=True) for c in clients])
    fams = render(exp)
    lab = labels(comm="nginx", direction="incoming", raddr="10.0.0.9", port=8080)
    assert counts(fams, **lab) == (3000, 300, 3, 3, 0)
    assert len(fams["tracer_sent_bytes_total"].samples) == 1


def test_unknown_direction_takes_the_lower_port():
    exp = prometheus.Exporter()
    server = Life(comm="dnsd", proto="udp", direction="unknown", lport=53, raddr="10.0.0.7",
                  rport=41234)
    client = Life(comm="dig", proto="udp", direction="unknown", lport=41234, raddr="10.0.0.1",
                  rport=53)
    exp.update([server.report(recv=40, sent=80), client.report(sent=40, recv=80)])
    fams = render(exp)
    assert counts(fams, **labels(comm="dnsd", proto="udp", direction="unknown",
                                 raddr="10.0.0.7", port=53)) == (80, 40, 1, 0, 0)
    assert counts(fams, **labels(comm="dig", proto="udp", direction="unknown",
                                 raddr="10.0.0.1", port=53)) == (40, 80, 1, 0, 0)


def test_retransmits_are_the_sums_of_retrans_delta():
    exp = prometheus.Exporter()
    a, b = Life(lport=40001), Life(lport=40002)
    exp.update([a.report(sent=1, retr=2), b.report(sent=1, retr=1)])
    exp.update([a.report(sent=1, retr=3)])
    exp.update([a.report(retr=1, closed=True), b.report(sent=1)])
    assert counts(render(exp), **labels()) == (4, 0, 2, 1, 7)


def test_a_record_reported_closed_again_is_counted_closed_once():
    # a snapshot (-P) reports a closed socket the process still holds every
    # poll; bytes read after a reset report it again too
    exp = prometheus.Exporter()
    a = Life()
    exp.update([a.report(sent=10, closed=True)])
    exp.update([a.report(recv=3, closed=True)])
    exp.update([a.report(closed=True)])
    assert counts(render(exp), **labels()) == (10, 3, 1, 1, 0)


# -- the bounded label set -----------------------------------------------------

def test_label_sets_beyond_max_series_fold_into_other_and_each_record_is_counted():
    exp = prometheus.Exporter(max_series=3)
    lives = [Life(raddr="10.0.2.%d" % i, lport=42000 + i) for i in range(5)]
    exp.update([l.report(sent=10 * (i + 1)) for i, l in enumerate(lives)])
    fams = render(exp)
    for i in range(3):
        assert counts(fams, **labels(raddr="10.0.2.%d" % i)) == (10 * (i + 1), 0, 1, 0, 0)
    assert counts(fams, **OTHER) == (40 + 50, 0, 2, 0, 0)
    assert fams["tracer_series_folded_total"].value() == 2
    assert fams["tracer_series"].value() == 3
    # the next poll: the two folded connections again, and their close
    exp.update([l.report(sent=1, closed=True) for l in lives])
    fams = render(exp)
    assert counts(fams, **OTHER) == (92, 0, 2, 2, 0)
    assert fams["tracer_series_folded_total"].value() == 4
    assert totals(fams) == (150 + 5, 0, 5, 5, 0)
    assert len(fams["tracer_sent_bytes_total"].samples) == 4


def test_a_series_idle_for_idle_seconds_makes_room_and_its_counts_move_into_other():
    exp = prometheus.Exporter(max_series=2, idle_seconds=60)
    a, b, c, d = [Life(raddr="10.0.3.%d" % i, lport=43000 + i) for i in range(4)]
    exp.update([a.report(sent=1), b.report(sent=2)], now=0.0)
    exp.update([c.report(sent=4)], now=30.0)       # none idle for 60 s: c folds
    fams = render(exp)
    assert counts(fams, **OTHER) == (4, 0, 1, 0, 0)
    assert fams["tracer_series_folded_total"].value() == 1
    exp.update([a.report(sent=8)], now=50.0)       # a moves, b is now the least recently active
    exp.update([d.report(sent=16)], now=100.0)     # b idle 100 s: dropped, d takes its place
    fams = render(exp)
    assert counts(fams, **OTHER) == (4 + 2, 0, 2, 0, 0)
    assert counts(fams, **labels(raddr="10.0.3.0")) == (9, 0, 1, 0, 0)
    assert counts(fams, **labels(raddr="10.0.3.3")) == (16, 0, 1, 0, 0)
    assert ("tracer_sent_bytes_total", tuple(sorted(labels(raddr="10.0.3.1").items()))) \
        not in fams["tracer_sent_bytes_total"].samples
    assert fams["tracer_series_dropped_total"].value() == 1
    assert fams["tracer_series_folded_total"].value() == 1
    assert totals(fams) == (31, 0, 4, 0, 0)


# -- the text ------------------------------------------------------------------

def test_label_values_are_escaped():
    exp = prometheus.Exporter()
    comm = 'a"b\\c\nd'
    exp.update([Life(comm=comm).report(sent=7)])
    text = exp.render()
    assert 'comm="a\\"b\\\\c\\nd"' in text
    assert counts(promparse.parse(text), **labels(comm=comm)) == (7, 0, 1, 0, 0)


def test_ipv6_remote_addresses_are_label_values_as_they_are():
    exp = prometheus.Exporter()
    exp.update([Life(raddr="2001:db8::1", rport=443).report(recv=9)])
    assert counts(render(exp), **labels(raddr="2001:db8::1")) == (0, 9, 1, 0, 0)


TELEMETRY = {"type": "telemetry", "time": 1764000000.125, "backend": "tracepoint",
             "tracked": 12, "expired": 3, "poll_seconds": 0.0012, "lost": 5, "missed": 2,
             "conn_lost": 5, "closed_lost": 0, "udp_lost": 0, "bytes_lost": 777, "stash_lost": 0,
             "tuple_checked": 4, "tuple_mismatch": 0}


def test_telemetry_as_gauges():
    exp = prometheus.Exporter()
    exp.update([], TELEMETRY)
    fams = render(exp)
    got = dict((name, fams[name].value()) for _, name, _ in prometheus.GAUGES)
    assert got == {"tracer_tracked_connections": 12, "tracer_lost_entries": 5,
                   "tracer_lost_bytes": 777, "tracer_missed_probes": 2,
                   "tracer_expired_connections": 3, "tracer_offset_mismatches": 0,
                   "tracer_poll_seconds": 0.0012}
    assert all(fams[name].type == "gauge" for name in got)
    assert fams["tracer_info"].value(backend="tracepoint") == 1


def test_every_family_has_help_and_type_and_the_text_ends_with_a_newline():
    exp = prometheus.Exporter(max_series=1)
    exp.update([Life(lport=1).report(sent=1), Life(raddr="10.9.9.9").report(sent=1)], TELEMETRY)
    text = exp.render()
    assert text.endswith("\n") and not text.endswith("\n\n")
    fams = promparse.parse(text)
    assert all(f.help and f.type for f in fams.values())
    assert all(fams[name].type == "counter" for name in COUNTERS)


def test_render_before_any_update():
    fams = render(prometheus.Exporter())
    assert all(fams[name].samples == {} for name in COUNTERS)
    assert fams["tracer_series"].value() == 0
    assert "tracer_tracked_connections" not in fams  # no telemetry yet


def test_updates_and_renders_in_two_threads():
    exp = prometheus.Exporter(max_series=50)
    lives = [Life(raddr="10.0.4.%d" % i) for i in range(100)]

    def updates():
        for _ in range(50):
            exp.update([l.report(sent=1, recv=2) for l in lives], TELEMETRY)
    th = threading.Thread(target=updates)
    th.start()
    while th.is_alive():
        assert totals(render(exp))[0] % 100 == 0  # never half a poll
    th.join()
    assert totals(render(exp))[:3] == (5000, 10000, 100)


def test_promtool_accepts_the_text():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package); "
                    "test/promparse.py checks the format instead")
    exp = prometheus.Exporter(max_series=2)
    exp.update([Life(comm='x"\\\n').report(sent=1), Life(raddr="::1").report(recv=2),
                Life(raddr="10.7.7.7").report(sent=3)], TELEMETRY)
    p = subprocess.run([promtool, "check", "metrics"], input=exp.render(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("text", [
    "a 1",                                        # no final newline
    "a 1\na 2\n",                                 # the same series twice
    'a{x="1"} 1\na{x="1"} 2\n',
    "a 1\n# TYPE a counter\n",                    # TYPE after samples
    "# TYPE a counter\n# TYPE a counter\na 1\n",
    "# TYPE a counter\na 1\nb 1\na{x=\"2\"} 1\n",   # a family's lines apart
    'a{x="\\t"} 1\n',                             # unknown escape
    'a{x="1} 1\n',                                # unterminated value
    "a{x=1} 1\n",
    "a one\n",
    "1a 1\n",
    "a 1 2.5\n",                                  # timestamp not an integer
    "# TYPE a countr\n",
])
def test_the_parser_refuses_what_the_format_forbids(text):
    with pytest.raises(promparse.FormatError):
        promparse.parse(text)


def test_the_parser_reads_what_the_format_allows():
    fams = promparse.parse('# a comment\n# HELP a x\\ny\n# TYPE a counter\n'
                           'a{l="q\\"\\\\\\n",m="",} 1.5e3 1700000000000\n\n'
                           'b NaN\nc +Inf\n# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 3\n'
                           'h_count 2\n')
    assert fams["a"].help == "x\ny" and fams["a"].value(l='q"\\\n', m="") == 1500
    assert sorted(fams) == ["a", "b", "c", "h"]
    assert len(fams["h"].samples) == 3


# -- --prometheus [ADDR:]PORT ----------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("9100", ("0.0.0.0", 9100)),
    (":9100", ("0.0.0.0", 9100)),
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("[::1]:9100", ("::1", 9100)),
    ("[::]:0", ("::", 0)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_address(text, want):
    assert prometheus.parse_address(text) == want


@pytest.mark.parametrize("text, why", [
    ("", "port"), ("abc", "port"), ("127.0.0.1:", "port"), ("127.0.0.1:x", "port"),
    ("65536", "port"), ("-1", "port"), ("::1:9100", "brackets"), ("[::1]", "port"),
    ("[::1:9100", "brackets"), ("[1.2.3.4]:80", "not an IPv6"), ("[::1]:9100x", "port"),
])
def test_parse_address_refuses(text, why):
    with pytest.raises(ValueError) as e:
        prometheus.parse_address(text)
    assert why in str(e.value) and "\n" not in str(e.value)


# -- HTTP ------------------------------------------------------------------------

def get(url):
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode("utf-8")


def test_serves_metrics_404_elsewhere_logs_nothing_and_close_frees_the_port(capfd):
    exp = prometheus.Exporter()
    exp.update([Life(comm='we"ird').report(sent=3, recv=4)], TELEMETRY)
    host, port = exp.serve("127.0.0.1", 0)
    try:
        assert (host, port > 0) == ("127.0.0.1", True)
        assert exp.url == "http://127.0.0.1:%d/metrics" % port
        status, ctype, body = get(exp.url)
        assert (status, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert body == exp.render()
        assert counts(promparse.parse(body), **labels(comm='we"ird')) == (3, 4, 1, 0, 0)
        assert get("http://127.0.0.1:%d/metrics?x=1" % port)[0] == 200
        for path in ("/", "/metric", "/metrics/x"):
            assert get("http://127.0.0.1:%d%s" % (port, path))[0] == 404
    finally:
        exp.close()
    exp.close()  # idempotent
    assert capfd.readouterr().err == ""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    again = prometheus.Exporter()  # a restarted exporter gets the same port
    assert again.serve("127.0.0.1", port) == ("127.0.0.1", port)
    again.close()


def test_serves_on_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.skip("no IPv6 loopback here: %s" % e)
    exp = prometheus.Exporter()
    try:
        host, port = exp.serve("::1", 0)
        assert exp.url == "http://[::1]:%d/metrics" % port
        assert get(exp.url)[0] == 200
    finally:
        exp.close()


def test_serve_on_a_port_in_use_raises_oserror():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(OSError):
            prometheus.Exporter().serve("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()


# -- a real tracer -----------------------------------------------------------------

def _recv_exact(s, n):
    got = 0
    while got < n:
        chunk = s.recv(min(65536, n - got))
        assert chunk, "peer closed after %d of %d bytes" % (got, n)
        got += len(chunk)


def _settle(t, exp, done, timeout=5.0):
    """Poll and update until done(parsed render) or the timeout."""
    deadline = time.time() + timeout
    while True:
        exp.update(t.poll(), t.telemetry())
        fams = render(exp)
        if done(fams) or time.time() > deadline:
            return fams
        time.sleep(0.05)


def test_a_real_tracers_loopback_traffic_scraped_over_http():
    need_tracepoint_backend()
    import tracer
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    port = lst.getsockname()[1]
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    out = labels(pid=os.getpid(), comm=comm, direction="outgoing", raddr="127.0.0.1", port=port)
    inc = dict(out, direction="incoming")
    exp = prometheus.Exporter()
    # the kernel filters: only this process's connections on this port (not the scrapes)
    with tracer.Tracer(backend="tracepoint", pid=os.getpid(), port=port) as t:
        _, mport = exp.serve("127.0.0.1", 0)
        try:
            # one connection: 12345 bytes out, 6789 back, closed
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = lst.accept()
            c.sendall(b"c" * 12345)
            _recv_exact(s, 12345)
            s.sendall(b"s" * 6789)
            _recv_exact(c, 6789)
            c.close()
            s.close()
            _settle(t, exp, lambda f: counts(f, **out)[3] == counts(f, **inc)[3] == 1)
            # another of the same series, across three polls, after the first left
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = lst.accept()
            c.sendall(b"c" * 1000)
            _recv_exact(s, 1000)
            exp.update(t.poll(), t.telemetry())
            assert counts(render(exp), **out) == (13345, 6789, 2, 1, 0)
            c.sendall(b"c" * 2000)
            _recv_exact(s, 2000)
            s.sendall(b"s" * 300)
            _recv_exact(c, 300)
            exp.update(t.poll(), t.telemetry())
            c.close()
            s.close()
            _settle(t, exp, lambda f: counts(f, **out)[3] == counts(f, **inc)[3] == 2)
            status, ctype, body = get("http://127.0.0.1:%d/metrics" % mport)
        finally:
            exp.close()
    lst.close()
    assert (status, ctype) == (200, prometheus.CONTENT_TYPE)
    fams = promparse.parse(body)
    assert counts(fams, **out) == (15345, 7089, 2, 2, 0)
    assert counts(fams, **inc) == (7089, 15345, 2, 2, 0)
    assert len(fams["tracer_sent_bytes_total"].samples) == 2  # the scrapes were filtered out
    assert fams["tracer_lost_entries"].value() == 0
    assert fams["tracer_info"].value(backend="tracepoint") == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mport), timeout=5)


# -- the command line --------------------------------------------------------------

def test_the_command_line_serves_metrics_until_its_count_ends():
    need_tracepoint_backend()
    from test_cli import TracerCli
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    port = lst.getsockname()[1]
    cli = TracerCli("--prometheus", "127.0.0.1:0", "--interval", "0.5", "--count", "10",
                    "--port", port, "--json")
    try:
        line = re.compile(r"^tracer: metrics on http://127\.0\.0\.1:(\d+)/metrics$")
        cli.wait_for(lambda: any(line.match(l) for l in cli.err))
        cli.wait_ready_json()
        mport = int([line.match(l) for l in cli.err if line.match(l)][0].group(1))
        url = "http://127.0.0.1:%d/metrics" % mport
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = lst.accept()
        c.sendall(b"c" * 4321)
        _recv_exact(s, 4321)
        s.sendall(b"s" * 1234)
        _recv_exact(c, 1234)
        c.close()
        s.close()
        with open("/proc/self/comm") as f:
            out = labels(pid=os.getpid(), comm=f.read().strip(), raddr="127.0.0.1", port=port)
        deadline = time.time() + 10
        while True:
            status, ctype, body = get(url)
            fams = promparse.parse(body)
            if counts(fams, **out)[3] == 1 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert (status, ctype) == (200, prometheus.CONTENT_TYPE)
        assert counts(fams, **out) == (4321, 1234, 1, 1, 0)
        assert counts(fams, **dict(out, direction="incoming")) == (1234, 4321, 1, 1, 0)
        assert fams["tracer_tracked_connections"].type == "gauge"
        assert cli.finish() == 0
    finally:
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.wait()
        lst.close()
    with pytest.raises(ConnectionRefusedError):  # the server closed with the tracer
        socket.create_connection(("127.0.0.1", mport), timeout=5)
