"""udpsends: UDP sends counted exactly by either backend.

What a send hook could get wrong: the peer of each sendto() on one
unconnected socket (IPv4, IPv6, IPv4-mapped IPv6), several calls that make
one datagram (MSG_MORE, UDP_CORK), IP options (the transport offset),
sends that fail (EMSGSIZE; a datagram dropped on its way out), connected
sockets, and a socket shared across fork().  The kprobe backend counts a
datagram where the kernel hands it to IP (udp_send_skb), the tracepoint
backend counts the return value of sendmsg.

Shared by test_tracepoint.py and test_kprobe.py as test/endings.py is (its
helpers run each scenario in a child process that prints its ground truth).
"""

import os

import pytest

from endings import FAMILIES, expect_exact, run

# helpers of the scripts below
UDP = r'''
    def udp_side(fam, laddr, lport, raddr, rport, sent=0, recv=0):
        say(side=dict(pid=os.getpid(), proto="udp", family=fam, laddr=laddr, lport=lport,
                      raddr=raddr, rport=rport, sent=sent, recv=recv, state="open"))

    def server_and_client(fam):
        """(address, server socket, its address, a client socket bound)"""
        addr = ADDR[fam]
        srv = socket.socket(AF[fam], socket.SOCK_DGRAM)
        srv.bind((addr, 0))
        srv.settimeout(20)
        c = socket.socket(AF[fam], socket.SOCK_DGRAM)
        c.bind((addr, 0))
        return addr, srv, srv.getsockname()[:2], c
'''

SENDTO_PEERS = UDP + r'''
    kind = sys.argv[1]
    fam = 6 if kind == "6" else 4
    addr = ADDR[fam]
    servers = []
    for i in range(3):
        s = socket.socket(AF[fam], socket.SOCK_DGRAM)
        s.bind((addr, 0))
        s.settimeout(20)
        servers.append(s)
    if kind == "mapped":  # an IPv6 socket sending to IPv4 peers: reported as IPv4
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        c.bind(("::", 0))
        dest = lambda s: ("::ffff:" + addr, s.getsockname()[1])
        claddr = "0.0.0.0"
    else:
        c = socket.socket(AF[fam], socket.SOCK_DGRAM)
        c.bind((addr, 0))
        dest = lambda s: s.getsockname()[:2]
        claddr = addr
    if kind == "opts":  # IP options: a 28-byte IPv4 header
        c.setsockopt(socket.IPPROTO_IP, 4, b"\x01" * 7 + b"\x00")
    sizes = [[100, 7, 1200, 1], [999, 3], [30000, 5, 64, 64, 2]]
    sent, got, peer = [0, 0, 0], [0, 0, 0], [None] * 3
    for j in range(max(len(x) for x in sizes)):
        for i, s in enumerate(servers):
            if j < len(sizes[i]):
                sent[i] += c.sendto(bytes([65 + j]) * sizes[i][j], dest(s))
    for i, s in enumerate(servers):
        for _ in sizes[i]:
            data, peer[i] = s.recvfrom(65536)
            got[i] += len(data)
    cport = c.getsockname()[1]
    for i, s in enumerate(servers):
        sport = s.getsockname()[1]
        udp_side(4 if kind == "mapped" else fam, claddr, cport, addr, sport, sent=sent[i])
        udp_side(fam, addr, sport, peer[i][0], peer[i][1], recv=got[i])
'''


@pytest.mark.parametrize("kind", ["4", "6", "mapped", "opts"])
def test_udp_sendto_several_peers_from_one_unconnected_socket(col, kind):
    """One unconnected socket sends datagrams of 1 to 30,000 bytes to three
    servers in turn (IPv4, IPv6, IPv4-mapped from an IPv6 socket, IPv4 with
    8 bytes of IP options): one record per peer with exactly its bytes."""
    h = run(SENDTO_PEERS, kind)
    assert [s["sent"] for s in h.sides[::2]] == [1308, 1002, 30135]
    expect_exact(col, h.sides, "sendto() to three peers (%s)" % kind)


CORKED = UDP + r'''
    fam, how = int(sys.argv[1]), sys.argv[2]
    addr, srv, dst, c = server_and_client(fam)
    sent = 0
    if how != "udp_cork":  # a second server, and a UDP socket this thread reads from
        srv2 = socket.socket(AF[fam], socket.SOCK_DGRAM)
        srv2.bind((addr, 0))
        srv2.settimeout(20)
        dst2 = srv2.getsockname()[:2]
        r = socket.socket(AF[fam], socket.SOCK_DGRAM)
        r.bind((addr, 0))
        r.settimeout(20)
        c2 = socket.socket(AF[fam], socket.SOCK_DGRAM)
        c2.bind((addr, 0))
        sent2 = 0
    for k in range(4):
        if how == "msg_more":  # unconnected: the address on each call
            sent += c.sendto(b"a" * (10 + k), socket.MSG_MORE, dst)
            sent += c.sendto(b"b" * (200 + k), socket.MSG_MORE, dst)
            sent += c.sendto(b"c" * 5, dst)
        elif how == "msg_more_mixed":
            # between a datagram's calls: a sendto() to another peer from
            # another socket, and a recvfrom() of a datagram from a third
            sent += c.sendto(b"a" * (10 + k), socket.MSG_MORE, dst)
            sent2 += c2.sendto(b"q" * (40 + k), dst2)
            c2.sendto(b"r" * 3, r.getsockname()[:2])
            sent2 += 3
            r.recvfrom(100)
            sent += c.sendto(b"b" * (200 + k), socket.MSG_MORE, dst)
            sent += c.sendto(b"c" * 5, dst)
        elif how == "cork_unconnected":  # UDP_CORK, each sendto() with its address
            c.setsockopt(socket.IPPROTO_UDP, 1, 1)
            sent += c.sendto(b"x" * (300 + k), dst)
            sent += c.sendto(b"y" * 11, dst2)  # appended: the datagram goes to dst
            sent += c.sendto(b"z", dst)
            c.setsockopt(socket.IPPROTO_UDP, 1, 0)
        else:  # UDP_CORK on a connected socket, released by setsockopt
            c.connect(dst)
            c.setsockopt(socket.IPPROTO_UDP, 1, 1)
            sent += c.send(b"x" * (300 + k))
            sent += c.send(b"y" * 11)
            sent += c.send(b"z")
            c.setsockopt(socket.IPPROTO_UDP, 1, 0)
    got = []
    for _ in range(4):
        data, peer = srv.recvfrom(65536)
        got.append(len(data))
    if len(got) != 4 or sum(got) != sent:
        fail("expected 4 datagrams of %d bytes in all, got %r" % (sent, got))
    udp_side(fam, addr, c.getsockname()[1], addr, dst[1], sent=sent)
    udp_side(fam, addr, dst[1], peer[0], peer[1], recv=sum(got))
    if how == "msg_more_mixed":
        got2 = sum(len(srv2.recvfrom(65536)[0]) for _ in range(4))
        udp_side(fam, addr, c2.getsockname()[1], addr, dst2[1], sent=sent2 - 12)
        udp_side(fam, addr, c2.getsockname()[1], addr, r.getsockname()[1], sent=12)
        udp_side(fam, addr, dst2[1], addr, c2.getsockname()[1], recv=got2)
        udp_side(fam, addr, r.getsockname()[1], addr, c2.getsockname()[1], recv=12)
'''


@FAMILIES
@pytest.mark.parametrize("how", ["msg_more", "msg_more_mixed", "cork_unconnected", "udp_cork"])
def test_udp_several_calls_one_datagram(col, family, how):
    """Three sendto(MSG_MORE ...) calls, or three sends under UDP_CORK,
    make one datagram, four times: the bytes the calls returned, all to
    the peer the first call named (the kernel ignores the address of the
    calls that append: on the tracepoint backend they pass no cgroup hook).
    msg_more_mixed: other sends and a receive of this thread between a
    datagram's calls; cork_unconnected: UDP_CORK on an unconnected socket,
    an appending call naming another peer."""
    lost = col.tracer.telemetry()["pending_lost"]
    h = run(CORKED, family, how)
    expect_exact(col, h.sides, "one datagram from several calls (%s, v%d)" % (how, family))
    assert col.tracer.telemetry()["pending_lost"] == lost, "a send's peer was not found"


FAILED = UDP + r'''
    import errno
    sys.path.insert(0, sys.argv[1])
    addr, srv, dst, c = server_and_client(4)

    def refused(fn, err):
        try:
            fn()
        except OSError as e:
            if e.errno != err:
                fail("expected %s, got %r" % (errno.errorcode[err], e))
            return
        fail("expected %s, the send succeeded" % errno.errorcode[err])

    c.connect(dst)
    sent = c.send(b"m" * 10, socket.MSG_MORE)          # pending, corked
    refused(lambda: c.send(b"x" * 70000), errno.EMSGSIZE)
    sent += c.send(b"z" * 3)                           # one datagram of 13
    refused(lambda: c.send(b"x" * 70000), errno.EMSGSIZE)
    sent += c.send(b"k" * 17)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unconnected
    u.bind((addr, 0))
    refused(lambda: u.sendto(b"x" * 70000, dst), errno.EMSGSIZE)
    usent = u.sendto(b"e" * 5, dst)
    dropped = 0
    # a datagram IP drops on its way out (a cgroup egress program that
    # drops everything, in a cgroup of this helper alone): EPERM
    import bpfsys
    root = bpfsys.Cgroup2Root()
    mine = os.path.join(root.path, "tracer-test-%d" % os.getpid())
    try:
        os.mkdir(mine)
        with open(os.path.join(mine, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        prog = bpfsys.Program(8, bytes.fromhex("b700000000000000" "9500000000000000"),
                              name="test_drop", expected_attach_type=1)  # CGROUP_SKB, INET_EGRESS
        fd = os.open(mine, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = bpfsys.bpf(bpfsys.BPF_LINK_CREATE, bpfsys._attr("IIII", prog.fd, fd, 1, 0))
        finally:
            os.close(fd)
        # (a socket belongs to the cgroup it was made in)
        d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        d.bind((addr, 0))
        try:
            refused(lambda: d.sendto(b"d" * 77, dst), errno.EPERM)
            dropped = 77
            say(dropped_from=d.getsockname()[1])
        finally:
            os.close(link)
            prog.close()
            d.close()
    except OSError as e:
        say(note="no egress drop (%s)" % e)
    finally:
        with open(os.path.join(root.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        if os.path.isdir(mine):
            os.rmdir(mine)
        root.release()
    got = {}
    for _ in range(3):
        data, peer = srv.recvfrom(65536)
        got[peer[1]] = got.get(peer[1], 0) + len(data)
    if got != {c.getsockname()[1]: sent, u.getsockname()[1]: usent}:
        fail("the server received %r" % got)
    say(dropped=dropped)
    for s, n in ((c, sent), (u, usent)):
        udp_side(4, addr, s.getsockname()[1], addr, dst[1], sent=n)
        udp_side(4, addr, dst[1], addr, s.getsockname()[1], recv=n)
'''


def test_udp_sends_that_fail(col):
    """EMSGSIZE (70,000 bytes) counts nothing, also while a MSG_MORE
    datagram is pending (13 + 17 bytes from a connected socket, 5 from an
    unconnected one).  A datagram that IP drops on its way out (a cgroup
    egress program: EPERM) is not counted by the tracepoint backend (the
    call failed); the kprobe backend counts it where it is handed to IP,
    before the drop (README: "What is counted")."""
    from conftest import ROOT
    h = run(FAILED, ROOT)
    dropped = h.info("dropped")
    if not dropped:
        print("egress drop not tried: %s" % h.info("note"))
    assert [s["sent"] for s in h.sides] == [30, 0, 5, 0]
    sides = list(h.sides)
    if dropped and col.tracer.backend == "kprobe":
        sides.append(dict(sides[2], lport=h.info("dropped_from"), sent=dropped))
    expect_exact(col, sides, "sends that fail (egress drop of %d bytes)" % dropped)


FORK_SHARED = UDP + r'''
    fam = int(sys.argv[1])
    addr, srv, dst, c = server_and_client(fam)
    cport = c.getsockname()[1]
    side = lambda n: udp_side(fam, addr, cport, addr, dst[1], sent=n)
    child = os.fork()
    if child == 0:
        n = c.sendto(b"c" * 30, dst) + c.sendto(b"C" * 3, dst)
        side(n)
        os._exit(0)
    os.waitpid(child, 0)
    n = c.sendto(b"p" * 40, dst)
    got = sum(len(srv.recv(65536)) for _ in range(3))
    side(n)
    udp_side(fam, addr, dst[1], addr, cport, recv=got)
'''


@FAMILIES
def test_udp_socket_shared_after_fork_one_record_per_sender(col, family):
    """An unconnected socket used by a forked child (33 bytes) and then by
    its parent (40 bytes): one record per process, each with its bytes."""
    h = run(FORK_SHARED, family)
    assert sorted(s["sent"] for s in h.sides) == [0, 33, 40]
    expect_exact(col, h.sides, "a UDP socket shared after fork (v%d)" % family)
