"""offsetguess: discover the running kernel's struct sock layout.

No headers and no BTF: the guessing thread makes loopback sockets whose
addresses, ports and family it chose at random, sends one byte on each, and
a guess program (attached to a hook that sees the struct sock in the sending
thread's own context, and only that thread's: matched by pid *and* thread
id) copies the raw bytes of that struct sock into the guess_dump map.  User
space then looks for the known values in the bytes.  Each field has its own
bound on tries; a failure names the field and the bound reached.

Fields: daddr, saddr (rcv_saddr), dport, sport (skc_num), family, protocol
(sk_protocol), v6_daddr, v6_saddr, net (skc_net) and the inode number's
offset inside struct net.  With IPv6 unavailable the v6 fields are left out,
and the result says so.
"""

import contextlib
import errno
import os
import random
import socket
import struct
import time

import abi
import bpfsys
from abi import (FL_BLOCK, GUESS_QSKB_AT, GUESS_SEND_SKB, GUESS_SK_BYTES, GUESS_SKB_AT,
                 GUESS_SKB_BEFORE, GUESS_SOCK, GUESS_STATE, GUESS_TASK, GUESS_TASK_AT, SKC_BLOCK)

TCP_FIN_WAIT1, TCP_CLOSE = 4, 7
AF_INET, AF_INET6 = 2, 10
ROUNDS_PER_FIELD = 4      # independent random sockets per address/port field
NET_CANDIDATES = 24       # 8-byte slots tried for skc_net


class GuessError(RuntimeError):
    """Guessing failed: names the field and the limit reached."""


class Offsets(object):
    """The guessed layout, and how guessing went."""

    def __init__(self, values, seconds, notes, rounds):
        self.values = values      # field name -> offset (ints)
        self.seconds = seconds
        self.notes = notes        # list of strings (e.g. IPv6 unavailable)
        self.rounds = rounds      # how many probe sends were made

    @property
    def ipv6(self):
        return bool(self.values.get("ipv6"))

    filters = {}  # want, pid_filter, port_filter: set by the tracer, not guessed

    def pack(self, gen=0):
        """struct offsets, with the poll generation gen and the filters."""
        return abi.OFFSETS.pack(**dict((f, gen if f == "gen" else self.filters.get(f, self.values.get(f, 0)))
                                       for f in abi.OFFSETS.names))

    def as_dict(self):
        return dict((k, v) for k, v in self.values.items() if not k.startswith("_"))


class _Prober(object):
    """Sends on a socket from this thread and returns the dumped bytes."""

    def __init__(self, maps):
        self.req = maps["guess_req"]
        self.dump = maps["guess_dump"]
        self.seq = 0
        self.rounds = 0
        self.pid_tgid = (os.getpid() << 32) | bpfsys.gettid()

    def probe(self, sock, net_off=0, mode=GUESS_SOCK, pid_tgid=None):
        """(first area, second area, dumped address) of what the guess
        program saw when this thread (or thread pid_tgid) sent on sock."""
        def send():
            try:
                sock.send(b"g")
            except OSError:
                pass  # the hook fired before any error; the dump tells
        return self.probe_with(send, net_off, mode, pid_tgid)

    def probe_with(self, action, net_off=0, mode=GUESS_SOCK, pid_tgid=None, state=0):
        """The same, for whatever action() makes the hooked function run
        (GUESS_STATE: a socket of this thread entering TCP state)."""
        self.seq += 1
        self.rounds += 1
        self.req.update(b"\0\0\0\0", abi.GUESS_REQ.pack(pid_tgid=pid_tgid or self.pid_tgid,
                                                         net_off=net_off, seq=self.seq, mode=mode,
                                                         state=state))
        action()
        raw = self.dump.lookup(b"\0\0\0\0")
        d = abi.GUESS_DUMP.unpack(raw)
        if d.seq != self.seq:
            return None
        return _valid(d.sk_bytes, d.sk_ok), _valid(d.net_bytes, d.net_ok), d.sk

    def stop(self):
        self.req.update(b"\0\0\0\0", abi.GUESS_REQ.pack())


def _valid(data, okmask, chunk=abi.GUESS_CHUNK):
    """Bytes up to the first chunk the kernel could not read."""
    n = 0
    while n < len(data) // chunk and okmask & (1 << n):
        n += 1
    return data[:n * chunk]


def _find_all(hay, needle, align, limit=None):
    out = []
    i = hay.find(needle)
    while i >= 0 and (limit is None or i < limit):
        if i % align == 0:
            out.append(i)
        i = hay.find(needle, i + 1)
    return out


def _rand_v4():
    return "127.%d.%d.%d" % (random.randint(1, 254), random.randint(1, 254), random.randint(2, 254))


def _udp_pair(family, local, remote):
    """A UDP socket bound to local and connected to remote."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind(local)
        s.connect(remote)
    except Exception:
        s.close()
        raise
    return s


def _guess_udp(prober, family, rand_addr, patterns):
    """Send from ROUNDS_PER_FIELD UDP sockets bound and connected to random
    addresses (rand_addr()) and ports; patterns(laddr, lport, raddr, rport)
    gives {field: (bytes, alignment)} to find in each dump.  Returns
    ({field: candidate offsets found in every dump}, dumps)."""
    cands = None
    dumps = []
    for _ in range(ROUNDS_PER_FIELD):
        laddr, raddr = rand_addr(), rand_addr()
        s = _udp_pair(family, (laddr, 0), (raddr, random.randint(20000, 60000)))
        try:
            want = patterns(laddr, s.getsockname()[1], raddr, s.getpeername()[1])
            got = prober.probe(s)
        finally:
            s.close()
        if got is None:
            continue
        dumps.append(got[0])
        found = dict((f, _find_all(got[0], b, align)) for f, (b, align) in want.items())
        cands = found if cands is None else dict(
            (f, [o for o in cands[f] if o in found[f]]) for f in cands)
        if len(dumps) >= 2 and all(len(v) == 1 for v in cands.values()):
            break
    if cands is None:
        raise GuessError("guessing saw no struct sock from its own thread after %d UDP sends "
                         "(family %d): the guess program did not run" % (ROUNDS_PER_FIELD, family))
    for field, offs in sorted(cands.items()):
        if not offs:
            raise GuessError("could not find the offset of %s in struct sock after %d tries"
                             % (field, ROUNDS_PER_FIELD))
    return cands, dumps


def _guess_v4(prober):
    """daddr, saddr, dport and sport candidates from IPv4 UDP sockets."""
    return _guess_udp(prober, socket.AF_INET, _rand_v4, lambda la, lp, ra, rp: {
        "daddr": (socket.inet_aton(ra), 4),
        "saddr": (socket.inet_aton(la), 4),
        "dport": (struct.pack(">H", rp), 2),
        "sport": (struct.pack("<H", lp), 2),
    })


def _guess_v6(prober):
    """v6_daddr and v6_saddr from IPv6 UDP sockets.  v4-mapped addresses
    make source and destination differ on a loopback-only host."""
    v6 = lambda a: socket.inet_pton(socket.AF_INET6, a)
    return _guess_udp(prober, socket.AF_INET6, lambda: "::ffff:" + _rand_v4(),
                      lambda la, lp, ra, rp: {"v6_daddr": (v6(ra), 4), "v6_saddr": (v6(la), 4)})


def _u16s(data, value):
    return set(_find_all(data, struct.pack("<H", value), 2))


def _guess_family(v4_dumps, v6_dumps, limit):
    """The u16 slot holding AF_INET in every v4 dump and AF_INET6 in every v6
    one (in struct sock_common: below the v6 addresses)."""
    offs = None
    for d in v4_dumps:
        offs = _u16s(d, AF_INET) if offs is None else offs & _u16s(d, AF_INET)
    for d in v6_dumps:
        offs &= _u16s(d, AF_INET6)
    offs = sorted(o for o in (offs or ()) if o < limit)
    if not offs:
        raise GuessError("could not find the offset of family in struct sock (%d v4 and %d v6 dumps)"
                         % (len(v4_dumps), len(v6_dumps)))
    return offs[0]


def _guess_family_v4_only(v4_dumps, fields):
    """Without IPv6: the AF_INET slot right after the ports (sock_common's
    skc_family follows skc_num)."""
    want = fields["sport"] + 2
    if all(d[want:want + 2] == struct.pack("<H", AF_INET) for d in v4_dumps):
        return want
    raise GuessError("could not find the offset of family in struct sock without IPv6")


def _tcp_dump(prober):
    """The struct sock of a connected TCP socket bound to a random address
    and port: (dump, local port).  UDP keeps its local port in
    skc_u16hashes as well as in skc_num; TCP does not, which tells the two
    apart."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli.bind((_rand_v4(), 0))
        cli.connect(lst.getsockname())
        srv, _ = lst.accept()
        try:
            got = prober.probe(cli)
        finally:
            srv.close()
        lport = cli.getsockname()[1]
    finally:
        cli.close()
        lst.close()
    if got is None:
        raise GuessError("guessing saw no struct sock of its own TCP socket: the guess program did not run")
    return got[0], lport


def _guess_protocol(tcp, udp_dumps, family_off):
    """sk_protocol: the u16 that is 6 in a TCP socket and 17 in the UDP ones,
    with sk_type (1 and 2) just before it."""
    offs = _u16s(tcp, 6)
    for d in udp_dumps:
        offs &= _u16s(d, 17)
    offs = sorted(o for o in offs if o > family_off)
    typed = [o for o in offs if tcp[o - 2:o] == struct.pack("<H", 1)
             and all(d[o - 2:o] == struct.pack("<H", 2) for d in udp_dumps)]
    if typed:
        return typed[0]
    if offs:
        return offs[0]
    raise GuessError("could not find the offset of protocol in struct sock")


def _guess_net(prober, sk_dump, lowest):
    """skc_net and the inode number's offset inside struct net: try each
    kernel-pointer-looking slot as skc_net and look for our netns inode in
    the struct it points to."""
    inum = os.stat("/proc/self/ns/net").st_ino
    needle = struct.pack("<I", inum)
    slots = [o for o in range(lowest - lowest % 8, min(len(sk_dump), 512), 8)
             if struct.unpack_from("<Q", sk_dump, o)[0] >= 0xffff800000000000]
    tried = 0
    for off in slots[:NET_CANDIDATES]:
        tried += 1
        s = _udp_pair(socket.AF_INET, ("127.0.0.1", 0), ("127.0.0.1", random.randint(20000, 60000)))
        try:
            got = prober.probe(s, net_off=off)
        finally:
            s.close()
        if got is None:
            continue
        hits = _find_all(got[1], needle, 4)
        if hits:
            return off, hits[0]
    raise GuessError("could not find the offset of net (netns inode %d) after %d candidate slots"
                     % (inum, tried))


def _int_offsets(dump, value, limit=None):
    return set(_find_all(dump[:limit], struct.pack("<i", value), 4))


def _closed_dump(prober, how):
    """The struct sock of a TCP socket of this thread as it enters
    TCP_CLOSE, how: "refused" (a connect() to a port nobody listens on:
    sk_err ECONNREFUSED) or "reset" (the peer aborts: ECONNRESET)."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv = None
    try:
        lst.bind(("127.0.0.1", 0))
        if how == "refused":  # bound, not listening: the SYN gets a reset
            action = lambda: cli.connect_ex(lst.getsockname())
        else:
            lst.listen(1)
            cli.connect(lst.getsockname())
            srv, _ = lst.accept()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            action = srv.close
        got = prober.probe_with(action, mode=GUESS_STATE, state=TCP_CLOSE)
    finally:
        for s in (cli, lst, srv):
            if s is not None:
                s.close()
    return got[0] if got else None


def _guess_inet_sport(prober, tcp, tcp_lport, sport):
    """inet_sport: the local port in network order (struct inet_sock), which
    the kernel keeps after it released skc_num (a connect() refused)."""
    other, other_lport = _tcp_dump(prober)
    cands = set(_find_all(tcp, struct.pack(">H", tcp_lport), 2)) & \
        set(_find_all(other, struct.pack(">H", other_lport), 2))
    cands = sorted(o for o in cands if o >= SKC_BLOCK and o != sport)
    if not cands:
        raise GuessError("could not find the offset of inet_sport in struct inet_sock")
    return cands[0]


def _guess_sk_err(prober, tcp_dump):
    """sk_err: the int that is ECONNREFUSED in a socket whose connect() was
    refused, ECONNRESET in one the peer reset, and 0 in a healthy one; each
    dumped as the socket enters TCP_CLOSE, right after the kernel set it."""
    cands = None
    for how, err in (("refused", errno.ECONNREFUSED), ("reset", errno.ECONNRESET),
                     ("refused", errno.ECONNREFUSED)):
        dump = _closed_dump(prober, how)
        if dump is None:
            raise GuessError("could not find the offset of sk_err: no dump of a socket "
                             "entering TCP_CLOSE")
        offs = _int_offsets(dump, err, GUESS_SK_BYTES)
        cands = offs if cands is None else cands & offs
    cands = sorted(o for o in cands if tcp_dump[o:o + 4] == bytes(4))
    if not cands:
        raise GuessError("could not find the offset of sk_err in struct sock")
    return cands[0]


TCP_INFO_RTT = struct.Struct("<II")  # tcpi_rtt, tcpi_rttvar (struct tcp_info, at 68)
TCP_INFO_RTT_AT = 68
RTT_ROUNDS, RTT_ROUNDS_MAX = 4, 16  # connections dumped: at least, at most (until one candidate)


def _rtt_info(sock):
    return TCP_INFO_RTT.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104),
                                    TCP_INFO_RTT_AT)


def _tcp_connection():
    """(listener, client, server) of a new loopback TCP connection."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli = socket.create_connection(lst.getsockname())
    except Exception:
        lst.close()
        raise
    return lst, cli, lst.accept()[0]


def _rtt_dump(prober):
    """(dump of a struct tcp_sock, tcpi_rtt, tcpi_rttvar) of a connection
    with RTT samples, dumped as it enters FIN_WAIT1 (shutdown(), before
    its FIN goes out and is acknowledged)."""
    lst, cli, srv = _tcp_connection()
    try:
        # several RTT windows (mdev_max_us moves off mdev_us), some of many
        # segments: the RTT and its variance differ from one connection to
        # the next, which constant fields (snd_cwnd, ...) do not
        for n in range(random.randint(3, 8)):
            size = random.choice((random.randint(1, 3000), random.randint(1, 200000)))
            cli.sendall(b"r" * size)
            got = 0
            while got < size:
                got += len(srv.recv(1 << 20))
        time.sleep(0.001)
        rtt = _rtt_info(cli)
        got = prober.probe_with(lambda: cli.shutdown(socket.SHUT_WR), mode=GUESS_STATE,
                                state=TCP_FIN_WAIT1)
    finally:
        for s in (cli, lst, srv):
            s.close()
    if got is None:
        return None
    return got[0] + got[1], rtt[0], rtt[1]


def _guess_rtt(prober):
    """srtt_us and mdev_us of struct tcp_sock: the u32s that, shifted as
    TCP_INFO does (>> 3, >> 2), give tcpi_rtt and tcpi_rttvar of the same
    socket, in several connections; then checked on one more."""
    srtt = mdev = None
    seen = set()  # (tcpi_rtt, tcpi_rttvar) pairs met: one alone would leave constant fields in
    for n in range(RTT_ROUNDS_MAX):
        if n >= RTT_ROUNDS and srtt is not None and len(srtt) == 1 and mdev is not None \
                and len(mdev) == 1 and len(seen) > 2:
            break
        got = _rtt_dump(prober)
        if got is None:
            raise GuessError("could not find the offset of srtt: no dump of a socket "
                             "entering FIN_WAIT1")
        dump, rtt, var = got
        seen.add((rtt, var))
        words = [(o, struct.unpack_from("<I", dump, o)[0])
                 for o in range(GUESS_SK_BYTES // 2, len(dump) - 3, 4)]
        if rtt:  # (a 0 tells nothing: too many fields are 0)
            s = set(o for o, v in words if v >> 3 == rtt)
            srtt = s if srtt is None else srtt & s
        if var:
            m = set(o for o, v in words if v >> 2 == var)
            mdev = m if mdev is None else mdev & m
    if not srtt or not mdev:
        raise GuessError("could not find the offsets of srtt_us and mdev_us in struct tcp_sock")
    if len(seen) < 3:
        raise GuessError("the RTT of %d connections took only %d values: srtt_us and mdev_us "
                         "cannot be told from constant fields" % (RTT_ROUNDS_MAX, len(seen)))
    dump, rtt, var = _rtt_dump(prober) or (None, 0, 0)
    held = [(a, b) for a in sorted(srtt) for b in sorted(mdev) if a != b and dump is not None
            and struct.unpack_from("<I", dump, a)[0] >> 3 == rtt
            and struct.unpack_from("<I", dump, b)[0] >> 2 == var]
    if len(held) != 1:  # better no RTT than another field's value
        raise GuessError("the offsets of srtt_us and mdev_us: %d candidates held on a last "
                         "connection, not 1" % len(held))
    return held[0]


SEQ_ROUNDS, SEQ_ROUNDS_MAX = 3, 8  # dumps compared: at least, at most (until one candidate each)
SIOCINQ, SIOCOUTQNSD = 0x541B, 0x894B
MSG_MORE = 0x8000
TCP_QUICKACK = 12
SEQ_FIELDS = ("write_seq", "copied_seq", "rcv_nxt")


def _ioctl_int(sock, request):
    import array
    import fcntl
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), request, buf, True)
    return buf[0]


def _u32_moves(dumps, moves):
    """The 4-aligned u32 slots of struct tcp_sock that moved by exactly
    moves[k] (mod 2**32) from dump k to dump k+1, every time."""
    n = min(len(d) for d in dumps) - 3
    u32 = lambda d, o: struct.unpack_from("<I", d, o)[0]
    return set(o for o in range(0, n, 4)
               if all((u32(dumps[k + 1], o) - u32(dumps[k], o)) & 0xffffffff == moves[k]
                      for k in range(len(moves))))


def _guess_seqs(prober, connections=3):
    """_guess_seq_once on up to `connections` connections: on one whose
    ACKs all went out at once, rcv_nxt and rcv_wup cannot be told apart."""
    for n in range(connections):
        try:
            return _guess_seqs_once(prober)
        except GuessError:
            if n == connections - 1:
                raise


def _guess_seqs_once(prober):
    """struct tcp_sock's write_seq, copied_seq, rcv_nxt and sent_seq (the
    kprobe backend counts a TCP socket's bytes as the moves of write_seq
    and copied_seq).  A connected socket S is corked; each round its peer
    sends A bytes, S reads R < A of them, S queues N with MSG_MORE (so
    nothing goes out for 200 ms; S acknowledges late, so rcv_wup lags
    rcv_nxt), then S is dumped at an empty send.  Between two dumps
    write_seq moves by exactly N, copied_seq by R and rcv_nxt by A, with
    random sizes, until one slot each is left (S's corked bytes stay under
    536, the smallest MSS, so no full segment goes out; the peer's
    segments stay under 536 bytes and 64 KiB in all, so the receive-RTT
    estimate, and with it rcvq_space.seq, does not move).
    Checked against the kernel's own counts (SIOCINQ: rcv_nxt - copied_seq;
    SIOCOUTQNSD: write_seq - snd_nxt)."""
    lst, s, p = _tcp_connection()
    try:
        p.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        dumps, sends, reads, arrivals = [], [], [], []
        cands = None
        for k in range(SEQ_ROUNDS_MAX + 1):
            a = random.randint(2, 500)
            r = random.randint(1, a - 1)
            n = random.randint(1, 50)  # all corked bytes under 536: no full segment goes out
            # delayed ACKs: rcv_wup (rcv_nxt when S last sent a window) lags
            s.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)
            p.sendall(b"a" * a)
            got = 0
            while got < r:
                got += len(s.recv(r - got, socket.MSG_WAITALL))
            s.send(b"w" * n, MSG_MORE)
            sends.append(n)
            reads.append(r)
            arrivals.append(a)
            got = prober.probe_with(lambda: s.send(b"", MSG_MORE))
            if got is None or len(got[0]) + len(got[1]) < 2 * GUESS_SK_BYTES:
                raise GuessError("TCP sequence counters: no dump of our own TCP socket")
            dumps.append(got[0] + got[1])
            if len(dumps) < 2:
                continue
            cands = dict((f, _u32_moves(dumps, [m[i + 1] for i in range(len(dumps) - 1)]))
                         for f, m in (("write_seq", sends), ("copied_seq", reads),
                                      ("rcv_nxt", arrivals)))
            # what the kernel says of the same socket picks among them (a
            # byte count such as sk_wmem_queued can move like write_seq)
            inq, notsent = _ioctl_int(s, SIOCINQ), _ioctl_int(s, SIOCOUTQNSD)
            at = lambda o: struct.unpack_from("<I", dumps[-1], o)[0]
            pairs = [(r, c) for r in cands["rcv_nxt"] for c in cands["copied_seq"]
                     if (at(r) - at(c)) & 0xffffffff == inq]
            cands["rcv_nxt"], cands["copied_seq"] = set(p[0] for p in pairs), set(p[1] for p in pairs)
            # (corked bytes go out when the probe timer fires, 200 ms on)
            slots = range(0, len(dumps[-1]) - 3, 4)
            pairs = [(w, n) for w in cands["write_seq"] for n in slots
                     if n != w and (at(w) - at(n)) & 0xffffffff == notsent]
            cands["write_seq"], cands["sent_seq"] = set(p[0] for p in pairs), set(p[1] for p in pairs)
            if len(dumps) > SEQ_ROUNDS and all(len(cands[f]) == 1 for f in SEQ_FIELDS):
                break
        many = ["%s (%d candidates)" % (f, len(cands[f])) for f in SEQ_FIELDS if len(cands[f]) != 1]
        if many:
            raise GuessError("could not find the TCP sequence counters in struct tcp_sock after %d "
                             "rounds: %s" % (len(dumps), ", ".join(many)))
        found = dict((f, cands[f].pop()) for f in SEQ_FIELDS)
        # sent_seq: where sending stands (snd_nxt, snd_una or snd_sml: all
        # stood at write_seq less the bytes not sent, and reach write_seq once
        # uncorked; on an idle socket they are equal, which is all adopting
        # a socket at its first send asks of it); the one nearest rcv_nxt
        # (snd_nxt, in every layout seen; rtt_seq can lag)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = prober.probe_with(lambda: s.send(b""))
        last = got[0] + got[1] if got else b""
        sent = sorted((o for o in cands["sent_seq"] if len(last) >= 2 * GUESS_SK_BYTES and
                       last[o:o + 4] == last[found["write_seq"]:found["write_seq"] + 4]),
                      key=lambda o: abs(o - found["rcv_nxt"]))
        if sent:
            found["sent_seq"] = sent[0]
        return found
    finally:
        for x in (s, p, lst):
            x.close()


def _probe_sock():
    return _udp_pair(socket.AF_INET, ("127.0.0.1", 0), ("127.0.0.1", random.randint(20000, 60000)))


def _task_dump(prober, mode=GUESS_TASK, at=0, pid_tgid=None):
    """(4096 bytes of a task_struct, its address) or None."""
    s = _probe_sock()
    try:
        got = prober.probe(s, net_off=at, mode=mode, pid_tgid=pid_tgid)
    finally:
        s.close()
    if got is None or len(got[0]) < GUESS_SK_BYTES:
        return None
    return got[0] + got[1], got[2]


def _set_thread_name(name):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME


def _guess_task(prober):
    """struct task_struct's comm and group_leader: a thread of ours with a
    random name is dumped, its name found in the bytes (comm); among the
    pointer slots it shares with this thread, group_leader is the one that
    points to a task named like our process whose own slot points to
    itself (a thread group leader leads itself)."""
    import threading
    name = ("tg%x" % random.getrandbits(48)).encode()[:15]
    out = {}

    def run():
        try:
            _set_thread_name(name)
            out["dump"] = _task_dump(prober, pid_tgid=(os.getpid() << 32) | bpfsys.gettid())
        except Exception as e:  # reported below
            out["error"] = e

    why = "no dump of a thread of ours"
    for _ in range(3):
        t = threading.Thread(target=run)
        t.start()
        t.join()
        theirs = out.pop("dump", None)
        mine = _task_dump(prober)
        if theirs is None or mine is None:
            continue
        theirs = theirs[0]
        comm = _find_all(theirs, name.ljust(16, b"\0"), 8)
        if len(comm) != 1:
            why = "the thread's name found %d times" % len(comm)
            continue
        with open("/proc/%d/comm" % os.getpid(), "rb") as f:
            main_name = f.read().rstrip(b"\n")[:15]
        tried = 0
        shared = [off for off in range(0, len(theirs) - 8, 8)
                  if theirs[off:off + 8] == mine[0][off:off + 8]
                  and struct.unpack_from("<Q", theirs, off)[0] >= 0xffff800000000000]
        # called from the main thread, group_leader points at this very task: try those first
        shared.sort(key=lambda off: struct.unpack_from("<Q", theirs, off)[0] != mine[1])
        for off in shared:
            tried += 1
            got = _task_dump(prober, GUESS_TASK_AT, off)
            if got is None:
                continue
            leader, leader_addr = got
            if leader[off:off + 8] == struct.pack("<Q", leader_addr) and \
                    leader[comm[0]:comm[0] + 16].split(b"\0")[0] == main_name:
                return comm[0], off
        why = "comm at %d; no group_leader among %d shared pointers (main thread %r)" % (
            comm[0], tried, main_name)
    raise GuessError("process names: could not find comm and group_leader in struct task_struct "
                     "(%s)" % (out.get("error") or why))


def _is_our_datagram(at, payload, sport):
    """at: the bytes around a pointer in an sk_buff (GUESS_SKB_BEFORE before
    it): the pointer is skb->data when our payload is there, with our UDP
    header (its source port first) right before it."""
    return (at[GUESS_SKB_BEFORE:GUESS_SKB_BEFORE + len(payload)] == payload
            and at[GUESS_SKB_BEFORE - 8:GUESS_SKB_BEFORE - 6] == sport)


def _guess_skb_data(prober):
    """struct sk_buff's data pointer, seen in skb_consume_udp(): the slot
    pointing at the payload of a datagram we sent ourselves, with our UDP
    header (source port) right before it."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        b.settimeout(1.0)
        payload = os.urandom(32)

        def exchange():
            a.sendto(payload, b.getsockname())
            b.recv(64)
        got = prober.probe_with(exchange)
        if got is None:
            raise GuessError("skb data: the guess program saw no datagram of ours in skb_consume_udp")
        skb = got[0]
        sport = struct.pack(">H", a.getsockname()[1])
        for off in range(0, min(len(skb), 256), 8):
            if struct.unpack_from("<Q", skb, off)[0] < 0xffff800000000000:
                continue
            got = prober.probe_with(exchange, off, GUESS_SKB_AT)
            if got is None:
                continue
            if _is_our_datagram(got[0], payload, sport):
                return off
    finally:
        a.close()
        b.close()
    raise GuessError("could not find the data pointer in struct sk_buff")


SEND_SKB_ROUNDS, SEND_SKB_ROUNDS_MAX = 6, 12  # datagrams dumped: at least, at most
# IP options (NOPs, then an end of list) that make the IPv4 header 24 or 28 bytes
IP_OPTS = (b"", b"\x01\x01\x01\x00", b"\x01\x01\x01\x01\x01\x01\x01\x00")
IP_OPTIONS = 4  # setsockopt(IPPROTO_IP, IP_OPTIONS)
KERNEL_PTR = 0xffff800000000000
FLOW_BYTES = 128  # where a flow's daddr and dport are looked for (struct flowi6 is ~90 bytes)


def _send_skb_dump(prober, family, ipopt):
    """One datagram of a random size from a fresh unconnected socket to a
    random address (IPv6: ::1) and port, dumped where udp_send_skb or
    udp_v6_send_skb sees it.  Returns a dict: the socket's address (sk;
    IPv4 only, None for IPv6),
    payload size, IP header length, destination, port and the two dumps
    (sk_buff, flow); None when a dump is missing."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET:
            s.bind((_rand_v4(), 0))
            dst = _rand_v4()
            if ipopt:
                s.setsockopt(socket.IPPROTO_IP, IP_OPTIONS, ipopt)
        else:
            s.bind(("::1", 0))
            dst = "::1"
        port = random.randint(20000, 60000)
        size = random.randint(1, 1400)
        payload = os.urandom(size)
        send = lambda: s.sendto(payload, (dst, port))
        # the struct sock's address, where guess_udp_sendmsg sees it (IPv4)
        sk = prober.probe_with(send) if family == socket.AF_INET else None
        got = prober.probe_with(send, mode=GUESS_SEND_SKB)
    finally:
        s.close()
    if (family == socket.AF_INET and sk is None) or got is None or \
            len(got[0]) < abi.GUESS_CHUNK or len(got[1]) < FL_BLOCK:
        return None
    return dict(sk=sk and sk[2], size=size, iphdr=(20 + len(ipopt)) if family == socket.AF_INET else 40,
                dst=socket.inet_pton(family, dst), port=port, skb=got[0], fl=got[1], family=family)


def _send_skb_fields(d, skb_data):
    """{field: candidate offsets} in one dump of _send_skb_dump."""
    skb, fl = d["skb"], d["fl"]
    u64 = lambda at: struct.unpack_from("<Q", skb, at)[0]
    data = u64(skb_data)
    c = {"skb_len": set(_find_all(skb, struct.pack("<I", d["size"] + 8 + d["iphdr"]), 4))}
    if d["sk"]:
        c["skb_sk"] = set(_find_all(skb, struct.pack("<Q", d["sk"]), 8))
    # head: a pointer a little below data; transport_header: the u16 that is
    # the IP header's length past data, counted from head
    pairs = set()
    for h in range(0, len(skb) - 7, 8):
        head = u64(h)
        if h == skb_data or head < KERNEL_PTR or not 0 <= data - head < 0x8000:
            continue
        pairs.update((h, t) for t in _u16s(skb, data - head + d["iphdr"]))
    c["skb_head+thdr"] = pairs
    v = "4" if d["family"] == socket.AF_INET else "6"
    c["fl%s_daddr" % v] = set(_find_all(fl[:FLOW_BYTES], d["dst"], 4))
    c["fl%s_dport" % v] = set(_find_all(fl[:FLOW_BYTES], struct.pack(">H", d["port"]), 2))
    return c


def _flow_layout(cands, ipv6):
    """The candidates left once the flows' layout holds: struct flowi4 is
    flowi_common, saddr, daddr, then the ports (dport first); struct flowi6
    is flowi_common, daddr, saddr, flowlabel, then the ports.  (The sender's
    stack holds other copies of the address and port near the flow.)"""
    left = dict((f, sorted(v)) for f, v in cands.items())
    v4 = left["fl4_daddr"]
    left["fl4_daddr"] = [o for o in v4 if o + 4 in left["fl4_dport"]]
    left["fl4_dport"] = [o for o in left["fl4_dport"] if o - 4 in v4]
    if ipv6 and "fl6_daddr" in left:
        v6 = left["fl6_daddr"]
        left["fl6_daddr"] = [o for o in v6 if o + 36 in left["fl6_dport"] and o + 4 in v4]
        left["fl6_dport"] = [o for o in left["fl6_dport"] if o - 36 in v6]
    return left


def _guess_send_skb(prober, skb_data, ipv6):
    """The sk_buff and flow fields that udp_send_skb / udp_v6_send_skb
    give a UDP datagram: skb->sk, len, head and transport_header (the
    payload is len - (head + transport_header - data) - 8), the flow's
    daddr and dport.  Datagrams of random sizes from sockets of random
    addresses to random ports, IPv4 with 0, 4 and 8 bytes of IP options
    and IPv6, until every field has one candidate left (_flow_layout).
    IPv6 on a loopback has one address (::1, source and destination
    alike): struct flowi6's daddr is the ::1 that lies 36 bytes before its
    dport and 4 bytes before flowi4's daddr (both follow flowi_common)."""
    cands = {}
    families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
    for n in range(SEND_SKB_ROUNDS_MAX):
        family = families[n % len(families)]
        opts = IP_OPTS[(n // len(families)) % len(IP_OPTS)] if family == socket.AF_INET else b""
        d = _send_skb_dump(prober, family, opts)
        if d is None:
            raise GuessError("udp_send_skb: the guess program saw no datagram of ours")
        for f, offs in _send_skb_fields(d, skb_data).items():
            cands[f] = offs if f not in cands else cands[f] & offs
        left = _flow_layout(cands, ipv6)
        if n + 1 >= SEND_SKB_ROUNDS and all(len(v) == 1 for v in left.values()):
            break
    for f, offs in sorted(left.items()):
        if len(offs) != 1:
            raise GuessError("udp_send_skb: %d candidates for %s after %d datagrams, not 1"
                             % (len(offs), f.replace("+", " and "), n + 1))
    (head, thdr), = left.pop("skb_head+thdr")
    out = dict((f, offs[0]) for f, offs in left.items())
    out.update(skb_head=head, skb_thdr=thdr)
    # what the kernel side reads in one go: len, transport_header, head and
    # data within SKC_BLOCK bytes from len; each flow's dport within
    # FL_BLOCK bytes after its daddr
    fields = ((out["skb_thdr"], 2), (out["skb_head"], 8), (skb_data, 8))
    if any(not out["skb_len"] < at <= out["skb_len"] + SKC_BLOCK - size for at, size in fields):
        raise GuessError("udp_send_skb: sk_buff's len, transport_header, head and data (at %d, %d, "
                         "%d, %d) do not lie within %d bytes" % (
                             out["skb_len"], out["skb_thdr"], out["skb_head"], skb_data, SKC_BLOCK))
    for v in ("4", "6") if ipv6 else ("4",):
        daddr, dport = out["fl%s_daddr" % v], out["fl%s_dport" % v]
        if not daddr < dport <= daddr + FL_BLOCK - 2:
            raise GuessError("udp_send_skb: struct flowi%s's dport (at %d) is not within %d bytes "
                             "after its daddr (at %d)" % (v, dport, FL_BLOCK, daddr))
    return out


def _guess_udp_queues(prober):
    """struct sock's sk_receive_queue, udp_sock's reader_queue (each a
    struct sk_buff_head: next, prev, qlen) and sk_buff's data pointer, for
    the source of a datagram still queued.  An empty queue points to
    itself; the receive queue is the one that then holds our 2 datagrams;
    after one read, the reader queue holds the other; data is the slot of
    the queued skb that points at our payload, after our UDP header."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u32 = lambda d, at: struct.unpack_from("<I", d, at)[0]
    u64 = lambda d, at: struct.unpack_from("<Q", d, at)[0]
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        b.settimeout(1.0)

        def dump_b(net_off=0, mode=GUESS_SOCK):
            got = prober.probe_with(lambda: b.sendto(b"g", a.getsockname()), net_off, mode)
            if got is None:
                raise GuessError("UDP queues: the guess program saw no send of ours")
            return got

        d0, _, sk = dump_b()
        empty = [q for q in range(0, len(d0) - 24, 8)
                 if u64(d0, q) == u64(d0, q + 8) == sk + q and u32(d0, q + 16) == 0]
        payload = os.urandom(24)
        a.sendto(payload, b.getsockname())
        a.sendto(b"second", b.getsockname())
        time.sleep(0.005)  # loopback delivers before sendto returns; to be sure
        d2 = dump_b()[0]
        rcvq = [q for q in empty if u32(d2, q + 16) == 2]
        if len(rcvq) != 1:
            raise GuessError("could not find sk_receive_queue in struct sock (%d candidates)"
                             % len(rcvq))
        rcvq = rcvq[0]
        sport = struct.pack(">H", a.getsockname()[1])
        data = None
        for off in range(0, 256, 8):
            if _is_our_datagram(dump_b(rcvq | (off << 16), GUESS_QSKB_AT)[0], payload, sport):
                data = off
                break
        if data is None:
            raise GuessError("could not find the data pointer in struct sk_buff")
        b.recv(64)
        d3 = dump_b()[0]
        readerq = [q for q in empty if q != rcvq and u32(d3, q + 16) == 1 and u32(d3, rcvq + 16) == 0]
        if len(readerq) != 1:
            raise GuessError("could not find reader_queue in struct udp_sock (%d candidates)"
                             % len(readerq))
        return rcvq, readerq[0], data
    finally:
        a.close()
        b.close()


@contextlib.contextmanager
def guessing_name():
    """The process named abi.GUESS_COMM while the probe connections are
    made, its own name back after: every other tracer running leaves the
    new connections of a process so named out (its programs compare the
    name where a connection is first seen), so that they do not report
    this tracer's probes as traffic, refused and reset connections
    included.  (New connections of the process's other threads in that
    fraction of a second are left out of the other tracers too.)"""
    path = "/proc/self/comm"   # the process's: its main thread's name
    try:
        with open(path, "rb") as f:
            own = f.read().rstrip(b"\n")
        with open(path, "wb") as f:
            f.write(abi.GUESS_COMM)
    except OSError:
        own = None
    try:
        yield
    finally:
        if own is not None:
            try:
                with open(path, "wb") as f:
                    f.write(own)
            except OSError:
                pass


def guess(maps, want_protocol=True, ipv6=True, want_skb=False, want_queues=False,
          want_send_skb=False, want_seqs=False):
    """Guess the offsets with the guess program already attached; returns
    Offsets.  maps: the object's live maps (guess_req, guess_dump)."""
    start = time.time()
    prober = _Prober(maps)
    notes = []
    try:
        cands, v4_dumps = _guess_v4(prober)
        values = dict((f, offs[0]) for f, offs in cands.items())
        tcp, tcp_lport = _tcp_dump(prober)
        sport = [o for o in cands["sport"] if tcp[o:o + 2] == struct.pack("<H", tcp_lport)]
        if not sport:
            raise GuessError("could not find the offset of sport in struct sock: no slot holds "
                             "the local port of both a UDP and a TCP socket")
        values["sport"] = sport[0]
        v6_dumps = []
        if ipv6:
            try:
                v6, v6_dumps = _guess_v6(prober)
                values.update((f, offs[0]) for f, offs in v6.items())
                values["ipv6"] = 1
            except OSError as e:
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENETUNREACH,
                                   errno.EPROTONOSUPPORT):
                    raise
                notes.append("IPv6 unavailable (%s): IPv6 connections are not traced"
                             % os.strerror(e.errno))
        else:
            notes.append("IPv6 tracing disabled")
        if v6_dumps:
            values["family"] = _guess_family(v4_dumps, v6_dumps, min(values["v6_daddr"], values["v6_saddr"]))
        else:
            values["family"] = _guess_family_v4_only(v4_dumps, values)
        values["state"] = values["family"] + 2  # skc_state follows skc_family
        if want_protocol:
            values["protocol"] = _guess_protocol(tcp, v4_dumps, values["family"])
        values["net"], values["netns_inum"] = _guess_net(prober, v4_dumps[0], values["family"] + 4)
        if want_skb:
            values["skb_data"] = _guess_skb_data(prober)
        if want_send_skb:
            values.update(_guess_send_skb(prober, values["skb_data"], bool(values.get("ipv6"))))
        if want_queues:
            try:
                values["sk_rcvq"], values["udp_readerq"], values["skb_data"] = _guess_udp_queues(prober)
            except GuessError as e:
                notes.append("%s: UDP read without an address on an unconnected socket is "
                             "counted with the socket's own peer" % e)
        try:
            values["task_comm"], values["task_leader"] = _guess_task(prober)
        except GuessError as e:
            notes.append("%s: records show the name of the thread that opened them" % e)
        try:
            values["sk_err"] = _guess_sk_err(prober, tcp)
        except GuessError as e:
            notes.append("%s: how a TCP connection ended (end) is left out" % e)
        try:
            values["inet_sport"] = _guess_inet_sport(prober, tcp, tcp_lport, values["sport"])
        except GuessError as e:
            notes.append("%s: a failed connect() shows local port 0" % e)
        if want_seqs:  # the kprobe backend counts TCP bytes with them: no fallback
            values.update(_guess_seqs(prober))
        try:
            values["srtt"], values["mdev"] = _guess_rtt(prober)
        except GuessError as e:
            notes.append("%s: rtt_us and rtt_var_us are left out" % e)
    finally:
        prober.stop()
    # every tuple field in the first SKC_BLOCK bytes: one probe read per tuple
    span = max(values.get(f, 0) + size for f, size in (
        ("daddr", 4), ("saddr", 4), ("dport", 2), ("sport", 2), ("family", 2), ("v6_daddr", 16),
        ("v6_saddr", 16), ("net", 8)))
    values["skc_block"] = 1 if span <= SKC_BLOCK else 0
    values["ready"] = 1
    return Offsets(values, time.time() - start, notes, prober.rounds)
