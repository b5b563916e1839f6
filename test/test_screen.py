"""The live view (issue 11): python3 tracer.py in a real pseudo-terminal of
80x24 and 200x50, its screen read back through a terminal emulator.  The
screen is redrawn in place, the header stays on the first line, no line
wraps, addresses are whole ([v6]:port), rows stop at the terminal's height
with a "+N more" line, and the numbers are the bytes the test moved."""

import re

import pytest

from conftest import need_tracepoint_backend
from screen import END_OF_FRAME, ESCAPE, Fleet, Terminal
import cli

HEADER = re.compile(r"^\d\d:\d\d:\d\d( \(final\))?  \d+ (active|process|processes), ")

pytestmark = pytest.mark.root


def screen_lines(raw):
    """The lines of one redraw as written (cursor controls removed)."""
    return [l.rstrip("\r") for l in ESCAPE.sub(b"", raw).decode("utf-8", "replace").split("\n")]


def _rows(frame, comm, pid=None):
    """The rows of processes named comm (and of pid, where given: a test
    run elsewhere on the machine may use the same name)."""
    return [l.split() for l in frame if len(l.split()) > 2 and l.split()[1] == comm
            and (pid is None or l.split()[0] == str(pid))]


def _assert_screen_sane(term, frames):
    assert frames, term.raw[-2000:]
    for frame in frames:
        assert len(frame) == term.rows
        assert HEADER.match(frame[0]), frame[:3]
        assert frame[1].split()[:2] == ["PID", "COMM"], frame[:3]
    too_long = [l for l in term.printed_lines() if len(l) > term.cols]
    assert too_long == []
    assert b"Traceback" not in term.raw


def _traffic_frame(frames, comm, n, pid=None):
    """The first frame showing the bytes of comm's n sockets (all of them,
    or as many as fit above a "+N more" line)."""
    for f in frames:
        head = f[1].split()
        moved = [r for r in _rows(f, comm, pid) if len(r) == len(head) and
                 (r[head.index("TX")], r[head.index("RX")]) != ("0", "0")]
        if moved and (len(moved) >= n or any(l.startswith("+") for l in f)):
            return f
    raise AssertionError("no frame shows the traffic of %s: %s" % (comm, frames))


def test_80x24_redraws_caps_rows_with_more_line_and_keeps_addresses_whole():
    need_tracepoint_backend()
    with Terminal(80, 24, "--interval", "1", "--count", "3", "--tcp") as term:
        term.wait_for("Ctrl-C to end")
        fleet = Fleet("fleet80", 30)     # 60 sockets: 30 clients, 30 server sides
        try:
            term.wait_frames(1)  # just after a redraw: the traffic falls in one interval
            fleet.send(1000)
            assert term.finish() == 0
        finally:
            fleet.close()
    frames = term.frames()
    _assert_screen_sane(term, frames)
    f = _traffic_frame(frames, "fleet80", 60, fleet.pid)
    # 24 lines: header, column header, 20 rows, "+N more", the cursor's line
    active = int(f[0].split()[1] if "(final)" not in f[0] else f[0].split()[3])
    assert active >= 60
    assert all(len(l.split()) >= 7 for l in f[2:22]), f
    assert f[22] == "+%d more (--rows, or a taller terminal, shows more)" % (active - 20), f
    assert f[23] == ""
    rows = _rows(f, "fleet80", fleet.pid)
    # the biggest first: client 30 sent 30000 bytes, its server side read them
    top = rows[:2]
    assert [r[0] for r in top] == [str(fleet.pid)] * 2
    remote = f[1].split().index("RADDR:RPORT")
    ports = set(fleet.clients + [fleet.port])
    for r in rows:
        m = re.match(r"^127\.0\.0\.1:(\d+)$", r[remote])
        assert m and int(m.group(1)) in ports, r
    # TX of client i is (i + 1) * 1000 bytes: the top rows are 29.3K (30000 B)
    head = f[1].split()
    tx, rx = head.index("TX"), head.index("RX")
    assert sorted([top[0][tx], top[0][rx], top[1][tx], top[1][rx]]) == \
        sorted(["29K", "0", "0", "29K"])


def test_200x50_shows_every_column_and_exact_small_counts():
    need_tracepoint_backend()
    with Terminal(200, 50, "--interval", "1", "--count", "3", "--tcp") as term:
        term.wait_for("Ctrl-C to end")
        fleet = Fleet("fleet200", 5)
        try:
            term.wait_frames(1)  # just after a redraw: the traffic falls in one interval
            fleet.send(100)   # client i sends (i + 1) * 100 bytes: all below 1024, exact
            assert term.finish() == 0
        finally:
            fleet.close()
    frames = term.frames()
    _assert_screen_sane(term, frames)
    f = _traffic_frame(frames, "fleet200", 10, fleet.pid)
    # (and FAIL, when some connection on the host failed in that interval)
    assert f[1].split()[:11] == ["PID", "COMM", "PROTO", "LADDR:LPORT", "RADDR:RPORT", "TX", "RX",
                                 "TXTOT", "RXTOT", "DUR", "STATE"]
    assert f[1].split()[11:] in ([], ["FAIL"])
    rows = _rows(f, "fleet200", fleet.pid)
    got = sorted((r[3], r[4], r[5], r[6], r[7], r[8], r[10]) for r in rows)
    want = []
    for i, cport in enumerate(fleet.clients):
        n = str((i + 1) * 100)
        c, s = "127.0.0.1:%d" % cport, "127.0.0.1:%d" % fleet.port
        want.append((c, s, n, "0", n, "0", "open"))
        want.append((s, c, "0", n, "0", n, "open"))
    assert got == sorted(want)
    # sorted by bytes in the interval: 500, 500, 400, 400, ...
    assert [int(r[5]) + int(r[6]) for r in rows] == sorted(
        [int(r[5]) + int(r[6]) for r in rows], reverse=True)
    # seen from the start: a duration, not "-"
    assert all(re.match(r"^\d+\.\d\ds$", r[9]) for r in rows), rows


def test_ipv6_in_brackets_never_cut_at_80_columns(long_v6):
    need_tracepoint_backend()
    with Terminal(80, 24, "--interval", "1", "--count", "3", "--tcp", "-6") as term:
        term.wait_for("Ctrl-C to end")
        fleet = Fleet("fleet6", 2, addr=long_v6)
        try:
            term.wait_frames(1)  # just after a redraw: the traffic falls in one interval
            fleet.send(10)
            assert term.finish() == 0
        finally:
            fleet.close()
    frames = term.frames()
    _assert_screen_sane(term, frames)
    f = _traffic_frame(frames, "fleet6", 4, fleet.pid)
    remote = f[1].split().index("RADDR:RPORT")
    ends = set(r[remote] for r in _rows(f, "fleet6", fleet.pid))
    assert ends == set("[%s]:%d" % (long_v6, p) for p in fleet.clients + [fleet.port])


def test_by_process_screen_counts_connections_and_bytes():
    need_tracepoint_backend()
    with Terminal(80, 24, "-P", "--interval", "1", "--count", "4", "--tcp") as term:
        term.wait_for("Ctrl-C to end")
        fleet = Fleet("fleetP", 4)
        try:
            term.wait_frames(1)  # just after a redraw: the traffic falls in one interval
            fleet.send(100)     # 100+200+300+400 = 1000 bytes each way
            term.wait_frames(2)
            fleet.send(10)      # 100 more
            assert term.finish() == 0
        finally:
            fleet.close()
    frames = term.frames()
    _assert_screen_sane(term, frames)
    assert frames[-1][1].split() == ["PID", "COMM", "CONNS", "TCP", "UDP", "TX", "RX",
                                     "TXTOT", "RXTOT"]
    last = _rows(frames[-1], "fleetP", fleet.pid)
    assert [r[:5] + r[7:] for r in last] == [[str(fleet.pid), "fleetP", "8", "8", "0", "1.1K",
                                              "1.1K"]]
    # the per-interval columns add up to the totals
    tx = sum(int(r[5]) if r[5].isdigit() else 1024 * float(r[5][:-1])
             for f in frames for r in _rows(f, "fleetP", fleet.pid))
    assert 1100 - 60 < tx <= 1100 + 60  # 1.1K is rounded; the sum of exact intervals


EVIL_COMM = "\x1b[2J\x1b[31mX\n"  # clear the screen, turn red, a new line: 11 bytes


def test_process_names_cannot_write_escape_sequences_and_wide_names_keep_columns():
    # any process can name itself (prctl PR_SET_NAME): an escape sequence
    # in its name must reach the terminal as text, and a name in wide
    # (East Asian) characters must not shift the columns after it
    need_tracepoint_backend()
    with Terminal(120, 24, "--interval", "1", "--count", "3", "--tcp") as term:
        term.wait_for("Ctrl-C to end")
        evil, wide = Fleet(EVIL_COMM, 2), Fleet("\u6570\u636e\u5e93", 2)  # 3 wide characters
        try:
            term.wait_frames(1)
            evil.send(100)
            wide.send(300)
            assert term.finish() == 0
        finally:
            evil.close()
            wide.close()
    assert b"\x1b[31m" not in term.raw and b"\x1b[2J" not in term.raw
    frames = term.frames()
    _assert_screen_sane(term, frames)
    shown = cli.shown(EVIL_COMM)
    assert shown == "\\x1b[2J\\x1b[31mX\\n"
    f = _traffic_frame(frames, shown, 4, evil.pid)
    head = f[1]
    rows = [l for l in f if l.split()[:1] in ([str(evil.pid)], [str(wide.pid)])]
    assert sorted((r.split()[0], r.split()[1], r.split()[5], r.split()[6]) for r in rows) == sorted(
        [(str(evil.pid), shown, "100", "0"), (str(evil.pid), shown, "0", "100"),
         (str(evil.pid), shown, "200", "0"), (str(evil.pid), shown, "0", "200"),
         (str(wide.pid), "\u6570\u636e\u5e93", "300", "0"),
         (str(wide.pid), "\u6570\u636e\u5e93", "0", "300"),
         (str(wide.pid), "\u6570\u636e\u5e93", "600", "0"),
         (str(wide.pid), "\u6570\u636e\u5e93", "0", "600")])
    # every column starts where its header does, in terminal columns
    for name in ("PROTO", "LADDR:LPORT", "RADDR:RPORT"):
        at = head.index(name)
        for r in rows:
            field = r.split()[head.split().index(name)]
            assert cli.text_width(r[:r.index(" " + field) + 1]) == at, (name, r, head)


def test_shown_and_fit_count_terminal_columns():
    assert cli.shown("nginx") == "nginx"
    assert cli.shown("a\tb\x7f") == "a\\tb\\x7f"
    assert cli.text_width("\u6570\u636e") == 4 and cli.text_width("e\u0301") == 1
    assert cli.fit("\u6570\u636e\u5e93", 5) == "\u6570\u636e "
    assert cli.fit("ab", 4, right=True) == "  ab"


def test_a_name_the_output_encoding_lacks_is_escaped_not_an_error():
    need_tracepoint_backend()
    import subprocess
    import sys
    from screen import ROOT
    wide = Fleet("\u6570\u636e\u5e93", 1)
    try:
        env = dict(__import__("os").environ, PYTHONIOENCODING="ascii")
        p = subprocess.Popen([sys.executable, "tracer.py", "--tcp", "--interval", "1", "--count", "2"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.readline()  # "Tracing ...": attached
        wide.send(50)
        out, err = p.communicate(timeout=60)
        out = first + out
    finally:
        wide.close()
    assert p.returncode == 0, err
    rows = [l.split() for l in out.decode("ascii").splitlines() if l.split()[:1] == [str(wide.pid)]]
    assert rows and all(r[1] == "\\u6570\\u636e\\u5e93" for r in rows), out


def test_terminal_smaller_than_the_layout_cuts_lines_instead_of_wrapping():
    """30x6, below the 40x5 the table is laid out for: each redraw stays
    within the screen (lines cut at its edge, no more lines than it has),
    so the header stays on the first line and nothing scrolls."""
    need_tracepoint_backend()
    with Terminal(30, 6, "--interval", "1", "--count", "3", "--tcp") as term:
        term.wait_for("Ctrl-C to end")
        fleet = Fleet("fleet30", 3)
        try:
            term.wait_frames(1)
            fleet.send(100)
            assert term.finish() == 0
        finally:
            fleet.close()
    frames = term.frames()
    assert len(frames) == 3, term.raw[-2000:]
    redraws = term.raw.split(b"Ctrl-C to end.", 1)[1].split(END_OF_FRAME)[:-1]
    for frame, raw in zip(frames, redraws):
        assert HEADER.match(frame[0]), frame
        assert frame[1].split()[:2] == ["PID", "COMM"], frame
        assert len([l for l in screen_lines(raw) if l]) <= 5, raw   # the cursor's line is the 6th
        assert all(len(l) <= 30 for l in screen_lines(raw)), raw
    assert any(l.split()[:2] == [str(fleet.pid), "fleet30"] for f in frames for l in f), frames
    assert b"Traceback" not in term.raw


def test_dumb_terminal_appends_without_cursor_controls():
    """TERM=dumb (an editor's shell buffer): tables appended, as with -C."""
    need_tracepoint_backend()
    with Terminal(80, 24, "--interval", "0.5", "--count", "2", "--tcp",
                  env={"TERM": "dumb"}) as term:
        assert term.finish() == 0
    assert b"\x1b[" not in term.raw, term.raw[-2000:]
    heads = [l for l in term.printed_lines() if HEADER.match(l)]
    assert len(heads) == 2, term.raw[-2000:]


@pytest.fixture
def long_v6():
    import shutil
    import subprocess
    addr = "fd00:7ace:b0f0:1234:5678:9abc:def0:4321"
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("no ip command to add a long IPv6 address to lo")
    if subprocess.call([ip, "-6", "addr", "add", addr + "/128", "dev", "lo", "nodad"],
                       stderr=subprocess.DEVNULL) != 0:
        pytest.skip("cannot add an IPv6 address to lo")
    yield addr
    subprocess.call([ip, "-6", "addr", "del", addr + "/128", "dev", "lo"])


def test_render_table_drops_optional_columns_before_cutting_comm():
    class R(object):
        pid, comm, proto, state, duration = 4194304, "systemd-resolved"[:15], "tcp", "open", 3.5
        sent_delta = recv_delta = sent_bytes = recv_bytes = 1
        laddr, lport = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", 65535
        raddr, rport = "2001:db8:1111:2222:3333:4444:5555:6666", 443
    lines = cli.render_table(cli.conn_columns(), [R()], 80)
    assert all(len(l) <= 80 for l in lines)
    # the optional columns went, the local address gave way to its port; COMM is whole
    assert lines[0].split() == ["PID", "COMM", "LPORT", "RADDR:RPORT", "TX", "RX"]
    assert lines[1].split() == ["4194304", "systemd-resolve", "65535",
                                "[2001:db8:1111:2222:3333:4444:5555:6666]:443", "1", "1"]
    # narrower than that: COMM gives way (as little as it must), the address stays whole
    narrow = cli.render_table(cli.conn_columns(), [R()], 70)
    assert narrow[1].split() == ["4194304", "systemd-res",
                                 "[2001:db8:1111:2222:3333:4444:5555:6666]:443", "1", "1"]
    mid = cli.render_table(cli.conn_columns(), [R()], 100)
    assert mid[0].split() == ["PID", "COMM", "PROTO", "LPORT", "RADDR:RPORT", "TX", "RX", "DUR"]
    wide = cli.render_table(cli.conn_columns(), [R()], 200)
    assert wide[0].split()[3] == "LADDR:LPORT" and "STATE" in wide[0] and "DUR" in wide[0]
