"""matrix: the traffic matrix both backends must count exactly.

Shared by test_tracepoint.py (host kernel) and test_kprobe.py (qemu guests):
each check runs real loopback traffic between two processes and asserts the
exact bytes, pids, ports and family that the tracer reports for both sides.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from traffic import LOOPBACK, Pair


def check_tcp(col, family, hold):
    """A client sends 1000+2000+7 bytes, the server answers 5000."""
    p = Pair("tcp", family, send=[1000, 2000, 7], reply=[5000], hold=hold).start()
    if hold:
        p.wait_holding()
        cli = col.one(pid=p.client_pid, lport=p.client_port, proto="tcp", sent_bytes=3007,
                      recv_bytes=5000)
        assert cli.state == "open"
        srv = col.one(pid=p.server_pid, lport=p.server_port, rport=p.client_port, sent_bytes=5000,
                      recv_bytes=3007)
        assert srv.state == "open"
        p.release()
    p.wait()
    cli = col.one(pid=p.client_pid, lport=p.client_port, proto="tcp", state="closed")
    srv = col.one(pid=p.server_pid, lport=p.server_port, rport=p.client_port, state="closed")
    addr = LOOPBACK[family]
    assert (cli.family, cli.laddr, cli.raddr, cli.rport) == (family, addr, addr, p.server_port)
    assert (cli.sent_bytes, cli.recv_bytes, cli.direction) == (3007, 5000, "outgoing")
    assert (srv.family, srv.laddr, srv.raddr) == (family, addr, addr)
    assert (srv.sent_bytes, srv.recv_bytes, srv.direction) == (5000, 3007, "incoming")
    assert cli.comm.startswith("python") and srv.comm.startswith("python")
    assert cli.netns == srv.netns == os.stat("/proc/self/ns/net").st_ino
    return cli, srv


def check_udp(col, family, unconnected, hold):
    """Datagrams of 100 and 200 bytes one way, 50 back."""
    p = Pair("udp", family, send=[100, 200], reply=[50], unconnected=unconnected, hold=hold).start()
    if hold:
        p.wait_holding()
    else:
        p.wait()
    addr = LOOPBACK[family]
    cli = col.one(pid=p.client_pid, lport=p.client_port, proto="udp", sent_bytes=300, recv_bytes=50)
    srv = col.one(pid=p.server_pid, lport=p.server_port, proto="udp", sent_bytes=50, recv_bytes=300)
    assert (cli.family, cli.laddr, cli.raddr, cli.rport) == (family, addr, addr, p.server_port)
    assert (srv.family, srv.laddr, srv.raddr, srv.rport) == (family, addr, addr, p.client_port)
    assert cli.direction == "outgoing" and srv.direction == "incoming"
    assert cli.state == srv.state == "open"  # UDP has no close: idle flows expire
    assert (cli.start_time, cli.duration) == (None, None)  # nor a start
    if hold:
        p.release()
        p.wait()
    return cli, srv


MANY = textwrap.dedent("""
    import json, socket, sys, threading
    n, family = int(sys.argv[1]), int(sys.argv[2])
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    addr = "127.0.0.1" if family == 4 else "::1"
    role = sys.argv[3]
    size = lambda i: 1000 + 37 * i
    if role == "server":
        lst = socket.socket(af); lst.bind((addr, 0)); lst.listen(n)
        print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
        conns = [lst.accept()[0] for _ in range(n)]
        for c in conns:
            i = int(c.recv(4).decode()); got = 4
            need = size(i)
            while got < need: got += len(c.recv(65536))
            c.sendall(b"r" * (i + 1))
        for c in conns: c.recv(1); c.close()
    else:
        port = int(sys.argv[4])
        socks = [socket.create_connection((addr, port)) for _ in range(n)]
        out = []
        for i, s in enumerate(socks):
            s.sendall(("%04d" % i).encode() + b"c" * (size(i) - 4))
            out.append((s.getsockname()[1], i))
        for i, s in enumerate(socks):
            got = 0
            while got < i + 1: got += len(s.recv(65536))
        print(json.dumps(out), flush=True)
        for s in socks: s.close()
""")


def check_many(col, n=200, family=4):
    """n concurrent connections, connection i sends 1000+37*i bytes and
    receives i+1."""
    srv = subprocess.Popen([sys.executable, "-c", MANY, str(n), str(family), "server"],
                           stdout=subprocess.PIPE, universal_newlines=True)
    import json
    port = json.loads(srv.stdout.readline())["port"]
    cli = subprocess.Popen([sys.executable, "-c", MANY, str(n), str(family), "client", str(port)],
                           stdout=subprocess.PIPE, universal_newlines=True)
    ports = json.loads(cli.stdout.readline())
    assert cli.wait(60) == 0 and srv.wait(60) == 0
    col.one(pid=cli.pid, lport=ports[-1][0], state="closed")
    for lport, i in ports:
        c = col.one(pid=cli.pid, lport=lport, rport=port, proto="tcp")
        assert (c.sent_bytes, c.recv_bytes, c.state) == (1000 + 37 * i, i + 1, "closed")
        s = col.one(pid=srv.pid, lport=port, rport=lport, proto="tcp")
        assert (s.sent_bytes, s.recv_bytes, s.state) == (i + 1, 1000 + 37 * i, "closed")
    return len(ports)


def check_peek_not_counted(col):
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    c.sendall(b"p" * 600)
    assert len(s.recv(600, socket.MSG_PEEK | socket.MSG_WAITALL)) == 600
    assert len(s.recv(600, socket.MSG_WAITALL)) == 600
    pid = os.getpid()
    rec = col.one(pid=pid, lport=s.getsockname()[1], recv_bytes=600)
    assert rec.sent_bytes == 0
    for x in (c, s, lst):
        x.close()


def check_sendfile(col, tmpdir, size=200000):
    path = os.path.join(str(tmpdir), "payload")
    with open(path, "wb") as f:
        f.write(b"f" * size)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    got = []

    def drain():
        n = 0
        while n < size:
            n += len(s.recv(65536))
        got.append(n)
    import threading
    t = threading.Thread(target=drain)
    t.start()
    with open(path, "rb") as f:
        sent = os.sendfile(c.fileno(), f.fileno(), 0, size)
        while sent < size:
            sent += os.sendfile(c.fileno(), f.fileno(), sent, size - sent)
    t.join()
    rec = col.one(pid=os.getpid(), lport=c.getsockname()[1], sent_bytes=size)
    assert rec.recv_bytes == 0 and got == [size]
    for x in (c, s, lst):
        x.close()


def check_partial_send_counts_accepted(col):
    """A non-blocking send of more than the socket buffer: only what the
    kernel accepted counts, and a send that fails (EAGAIN) counts nothing."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    c.setblocking(False)
    accepted = c.send(b"x" * (64 << 20))
    assert 0 < accepted < (64 << 20)
    try:  # the buffer is full now: this send fails with EAGAIN and adds nothing
        c.send(b"y" * 8192)
        raise AssertionError("a send into a full socket buffer succeeded")
    except BlockingIOError:
        pass
    rec = col.one(pid=os.getpid(), lport=c.getsockname()[1], sent_bytes=accepted)
    assert rec.sent_bytes == accepted
    for x in (c, s, lst):
        x.close()


NETNS_RUN = textwrap.dedent("""
    import json, os, socket, subprocess, sys, time
    sys.path[:0] = [%(root)r, %(root)r + "/test"]
    subprocess.check_call(["ip", "link", "set", "lo", "up"])
    import tracer
    from conftest import Collector
    import matrix
    t = tracer.Tracer(backend=%(backend)r)
    col = Collector(t)
    cli, srv = matrix.check_tcp(col, 4, hold=False)
    print(json.dumps({"netns": cli.netns, "mine": os.stat("/proc/self/ns/net").st_ino,
                      "offsets": t.offsets.as_dict()}))
    t.close()
""")


def check_fresh_netns(backend, expected_offsets):
    """Guess and count inside a new network namespace (unshare --net)."""
    import json
    import pytest
    from conftest import ROOT
    if subprocess.call(["sh", "-c", "command -v unshare"], stdout=subprocess.DEVNULL) != 0:
        pytest.skip("unshare (util-linux) not installed")
    out = subprocess.check_output(["unshare", "--net", sys.executable, "-c",
                                   NETNS_RUN % {"root": ROOT, "backend": backend}],
                                  universal_newlines=True)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["netns"] == got["mine"] != os.stat("/proc/self/ns/net").st_ino
    assert got["offsets"] == expected_offsets


def agree(records_a, records_b):
    """Both backends saw the same connections with the same totals."""
    def summary(recs):
        return sorted((c.proto, c.family, c.pid, c.laddr, c.lport, c.raddr, c.rport, c.netns,
                       c.sent_bytes, c.recv_bytes, c.state, c.direction) for c in recs)
    return summary(records_a), summary(records_b)


# The matrix as tests: a test module imports these and defines a `col`
# fixture (a conftest.Collector over its backend's Tracer).

@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("hold", [False, True], ids=["short", "long"])
def test_tcp_bytes_pids_ports(col, family, hold):
    check_tcp(col, family, hold)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("unconnected", [False, True], ids=["connected", "unconnected"])
@pytest.mark.parametrize("hold", [False, True], ids=["short", "long"])
def test_udp_bytes_pids_ports(col, family, unconnected, hold):
    check_udp(col, family, unconnected, hold)


def test_short_lived_connection_reported_once_as_closed(col):
    cli, srv = check_tcp(col, 4, hold=False)
    later = col.poll()
    assert [c for c in later if c.key in (cli.key, srv.key)] == []
    assert cli.sent_delta == 3007 and srv.recv_delta == 3007


def test_200_concurrent_connections(col):
    assert check_many(col, 200) == 200


def test_msg_peek_not_counted(col):
    check_peek_not_counted(col)


def test_sendfile_counts_bytes(col, tmp_path):
    check_sendfile(col, tmp_path)


def test_partial_send_counts_what_the_kernel_accepted(col):
    check_partial_send_counts_accepted(col)


def test_lifetimes_start_time_and_duration(col):
    """A connection the tracer saw start: its wall-clock start and how long
    it lived (until TCP_CLOSE)."""
    import time
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    t0 = time.time()
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    c.sendall(b"l" * 100)
    s.recv(100)
    time.sleep(0.4)
    c.close()
    s.close()
    t1 = time.time()
    cli = col.one(pid=os.getpid(), rport=lst.getsockname()[1], state="closed")
    srv = col.one(pid=os.getpid(), lport=lst.getsockname()[1], state="closed")
    for rec in (cli, srv):
        assert t0 - 0.05 <= rec.start_time <= t0 + 0.2, (rec.start_time, t0)
        assert 0.35 <= rec.duration <= t1 - t0 + 0.05, (rec.duration, t1 - t0)
    lst.close()


def test_a_connection_opened_before_the_tracer_has_no_start(col):
    """Adopted at its first send: start_time and duration are null, not
    guessed."""
    import tracer
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    with tracer.Tracer(backend=col.tracer.backend) as t:
        from conftest import Collector
        late = Collector(t)
        late.poll()
        c.sendall(b"a" * 321)
        s.recv(321)
        rec = late.one(pid=os.getpid(), lport=c.getsockname()[1], sent_bytes=321)
        assert (rec.start_time, rec.duration, rec.direction) == (None, None, "unknown")
    for x in (c, s, lst):
        x.close()



def _tcp_pair():
    from eventcases import _pair
    lst, c, s = _pair()
    lst.close()
    return c, s


def test_blocking_read_returning_in_pieces_then_the_fin(col):
    """One blocking recv(MSG_WAITALL) gets 300 + 300 + 100 bytes sent
    apart, then the peer's FIN (it returns 700, having read the FIN):
    700 received, the FIN not counted; exact while both stay open."""
    import threading
    import time
    c, s = _tcp_pair()
    got = []
    reader = threading.Thread(target=lambda: got.append(len(s.recv(1000, socket.MSG_WAITALL))))
    reader.start()
    for n in (300, 300, 100):
        c.sendall(b"p" * n)
        time.sleep(0.2)
    c.shutdown(socket.SHUT_WR)
    reader.join(30)
    assert got == [700]
    assert s.recv(10) == b""
    s.sendall(b"r" * 50)
    assert c.recv(100) == b"r" * 50
    col.one(pid=os.getpid(), lport=s.getsockname()[1], sent_bytes=50, recv_bytes=700)
    col.one(pid=os.getpid(), lport=c.getsockname()[1], sent_bytes=700, recv_bytes=50)
    c.close()
    s.close()


def test_counts_are_exact_while_the_connection_is_open_and_idle(col, tmp_path):
    """A send, a sendfile() and reads in pieces (a MSG_PEEK among them),
    then nothing: the next polls already hold every byte, with both
    sockets still open."""
    c, s = _tcp_pair()
    path = tmp_path / "data"
    path.write_bytes(b"f" * 100000)
    c.sendall(b"x" * 1234)
    with open(str(path), "rb") as f:
        sent = 0
        while sent < 100000:
            sent += os.sendfile(c.fileno(), f.fileno(), sent, 100000 - sent)
    assert len(s.recv(100, socket.MSG_PEEK)) == 100
    total = 0
    while total < 101234:
        total += len(s.recv(min(7000, 101234 - total)))
    s.sendall(b"y" * 77)
    assert len(c.recv(77, socket.MSG_WAITALL)) == 77
    cli = col.one(pid=os.getpid(), lport=c.getsockname()[1], sent_bytes=101234, recv_bytes=77)
    srv = col.one(pid=os.getpid(), lport=s.getsockname()[1], sent_bytes=77, recv_bytes=101234)
    assert cli.state == srv.state == "open"
    c.close()
    s.close()
