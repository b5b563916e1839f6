"""ConnTable against fake maps (no kernel): the records a poll makes
decode, field by field, to what the raw map values say, poll after poll
(first sight, deltas, a TCP life that ends and moves from socks to conns,
snapshots), and Conn() stays a record whose fields can be set."""

import abi
import conntrack

NOW_NS = conntrack.monotonic_ns()


class FakeMap(object):
    def __init__(self, key_size, value_size):
        self.key_size, self.value_size = key_size, value_size
        self.d = {}

    def read_chunks(self, value_len=None):
        items = list(self.d.items())
        for at in range(0, len(items), 2):  # small batches: more than one
            yield [k for k, _ in items[at:at + 2]], [v[:value_len] for _, v in items[at:at + 2]]

    def batches(self, delete=False, raw=False):
        items, self.d = list(self.d.items()), ({} if delete else self.d)
        if items:
            yield b"".join(k for k, _ in items), b"".join(v for _, v in items)

    def lookup(self, key):
        return self.d.get(key)

    def delete_keys(self, keys):
        for k in keys:
            self.d.pop(k, None)


def tup(i, proto=abi.TRACER_PROTO_TCP, pid=4242):
    return abi.CONN_TUPLE.pack(saddr=b"\x7f\0\0\x01", daddr=bytes([10, 0, 0, i]).ljust(16, b"\0"),
                               netns=4026531840, pid=pid, sport=40000 + i, dport=443, family=4,
                               proto=proto, life=i)


def stats(sent, recv, state=abi.CONN_OPEN, retr=0, end=0, rtt=0):
    return abi.CONN_STATS.pack(sent_bytes=sent, recv_bytes=recv, retransmits=retr,
                               first_ns=NOW_NS - 5 * 10**9, last_ns=NOW_NS - 10**9, state=state,
                               direction=abi.DIR_OUTGOING, seen_start=1, end=end, rtt_us=rtt,
                               rtt_var_us=rtt // 2, comm=b"curl".ljust(16, b"\0"))


def sock(i, st):
    return abi.SOCK_INFO.pack(tuple=tup(i), has_tuple=1, stats=st)


def expected(key, st, old, c):
    """The record of (key, stats, old stats) decoded eagerly, as the tracer
    did before records decoded lazily (time and clocks taken from c)."""
    s = abi.CONN_STATS.unpack(st)
    o = abi.CONN_STATS.unpack(old) if old is not None else None
    k = conntrack.decode_tuple(key)
    closed = s.state == abi.CONN_CLOSED
    end = abi.ENDS.get(s.end) if closed else None
    p = c._poll
    return dict(type="conn", time=round(p.start, 3), proto=k.proto, family=k.family, pid=k.pid,
                comm="curl", laddr=k.laddr, lport=k.lport, raddr=k.raddr, rport=k.rport,
                netns=k.netns, sent_bytes=s.sent_bytes, recv_bytes=s.recv_bytes,
                sent_delta=s.sent_bytes - (o.sent_bytes if o else 0),
                recv_delta=s.recv_bytes - (o.recv_bytes if o else 0),
                retransmits=s.retransmits, state="closed" if closed else "open",
                direction="outgoing",
                start_time=round(p.start - (p.now_ns - s.first_ns) / 1e9, 3),
                duration=round(((s.last_ns if closed else p.now_ns) - s.first_ns) / 1e9, 3),
                end=end, failed_connects=int(end in conntrack.FAILED_CONNECT),
                resets_sent=int(end == "reset_sent"), resets_received=int(end == "reset_received"),
                rtt_us=s.rtt_us or None, rtt_var_us=s.rtt_var_us if s.rtt_us else None)


def check(c, key, st, old):
    want = expected(key, st, old, c)
    assert c.as_dict() == want
    assert dict((f, getattr(c, f)) for f in conntrack.FIELDS) == want  # field by field too
    assert c.key == conntrack.decode_tuple(key) and c._raw == key
    assert c.first_seen is (old is None)


def sk(i):
    return (0xffff888000000000 + i * 2048).to_bytes(8, "little")


def test_records_decode_to_the_raw_values_poll_after_poll():
    socks, conns = FakeMap(8, abi.SOCK_INFO.size), FakeMap(abi.CONN_TUPLE.size, abi.CONN_STATS.size)
    dirty = FakeMap(abi.CONN_TUPLE.size, 8)
    t = conntrack.ConnTable(conns, socks, dirty=dirty, set_gen=lambda gen: None)
    a0, b0, u0 = stats(100, 200, rtt=900), stats(5, 6), stats(7, 8)
    socks.d[sk(1)], socks.d[sk(2)] = sock(1, a0), sock(2, b0)
    udp = tup(3, proto=abi.TRACER_PROTO_UDP)
    conns.d[udp] = u0
    first = t.poll()
    assert t.last_poll_full and len(first) == 3
    got = dict((c._raw, c) for c in first)
    check(got[tup(1)], tup(1), a0, None)
    check(got[tup(2)], tup(2), b0, None)
    check(got[udp], udp, u0, None)
    assert t.poll() == []  # nothing moved
    # A moves bytes (the kernel marks it in dirty)
    a1 = stats(150, 260, retr=2, rtt=800)
    socks.d[sk(1)] = sock(1, a1)
    dirty.d[tup(1)] = sk(1)
    (c,) = t.poll()
    assert not t.last_poll_full
    check(c, tup(1), a1, a0)
    assert (c.sent_delta, c.recv_delta, c.retrans_delta) == (50, 60, 2)
    # A's life ends: the kernel moves it from socks to conns, closed
    a2 = stats(170, 260, state=abi.CONN_CLOSED, retr=2, end=abi.END_RESET_RECEIVED, rtt=800)
    del socks.d[sk(1)]
    conns.d[tup(1)] = a2
    dirty.d[tup(1)] = bytes(8)
    (c,) = t.poll()
    check(c, tup(1), a2, a1)
    assert (c.state, c.end, c.resets_received, c.sent_delta) == ("closed", "reset_received", 1, 20)
    assert tup(1) not in conns.d and sk(1) not in t.prev  # reported once, then deleted
    # a snapshot: every record, deltas 0, none first seen
    snap = t.snapshot() if hasattr(t, "snapshot") else t.poll(everything=True)
    assert sorted(c._raw for c in snap) == sorted([tup(2), udp])
    for c in snap:
        st = b0 if c._raw == tup(2) else u0
        check(c, c._raw, st, st)
    # a full read again (as after a dirty-map overflow): nothing moved, nothing reported
    assert t.poll(dirty_lost=1) == [] and t.last_poll_full


def test_a_conn_made_empty_holds_what_is_set():
    c = conntrack.Conn()
    assert not hasattr(c, "pid")
    c.pid, c.comm, c.sent_bytes = 7, "x", 3
    assert (c.pid, c.comm, c.sent_bytes) == (7, "x", 3)
    for f in conntrack.FIELDS:
        setattr(c, f, f)
    assert c.as_dict() == dict((f, f) for f in conntrack.FIELDS)


def test_a_set_field_overrides_the_decoded_one():
    socks, conns = FakeMap(8, abi.SOCK_INFO.size), FakeMap(abi.CONN_TUPLE.size, abi.CONN_STATS.size)
    socks.d[sk(1)] = sock(1, stats(1, 2))
    (c,) = conntrack.ConnTable(conns, socks).poll()
    c.sent_bytes = 99
    assert c.sent_bytes == 99 and c.as_dict()["sent_bytes"] == 99 and c.recv_bytes == 2


def tupn(i, pid=4242):
    """tup() for many: i up to 65535."""
    return abi.CONN_TUPLE.pack(saddr=b"\x7f\0\0\x01", daddr=bytes([10, 1, i >> 8, i & 255]).ljust(16, b"\0"),
                               netns=4026531840, pid=pid, sport=(20000 + i) & 0xFFFF, dport=443,
                               family=4, proto=abi.TRACER_PROTO_TCP, life=i + 1000)


def sockn(i, st):
    return abi.SOCK_INFO.pack(tuple=tupn(i), has_tuple=1, stats=st)


def test_a_full_read_forgets_what_the_kernel_deleted():
    """Entries the kernel deleted leave the table at a full read; a life
    that moved to conns meanwhile keeps its socket's counters."""
    socks, conns = FakeMap(8, abi.SOCK_INFO.size), FakeMap(abi.CONN_TUPLE.size, abi.CONN_STATS.size)
    dirty = FakeMap(abi.CONN_TUPLE.size, 8)
    t = conntrack.ConnTable(conns, socks, dirty=dirty, set_gen=lambda gen: None)
    n = 3000
    for i in range(n):
        socks.d[sk(i)] = sockn(i, stats(i, 2 * i))
    assert len(t.poll()) == n and t.tracked == n
    t.poll()  # (reads again what the first poll drained)
    for i in range(0, n, 7):  # gone without a record (as a socket never claimed)
        del socks.d[sk(i)]
    moved = [i for i in range(3, n, 11) if sk(i) in socks.d]
    for i in moved:  # lives that ended: in conns, closed, 5 bytes more
        del socks.d[sk(i)]
        conns.d[tupn(i)] = stats(i + 5, 2 * i, state=abi.CONN_CLOSED)
    got = t.poll(dirty_lost=1)  # a full read (as after a dirty-map overflow)
    assert t.last_poll_full
    assert sorted(c._raw for c in got) == sorted(tupn(i) for i in moved)
    assert all((c.sent_delta, c.recv_delta, c.first_seen) == (5, 0, False) for c in got)
    assert set(t.prev) == set(socks.d) and t.tracked == len(socks.d)
    assert t.poll(dirty_lost=2) == [] and t.tracked == len(socks.d)


def test_vanished_is_exact_where_slots_collide():
    held = dict((sk(i), None) for i in range(4000))
    size = 1 << max(16, (8 * len(held)).bit_length())
    slot = {}
    for i in held:  # a gone id sharing its slot with one read
        j = hash(i) & (size - 1)
        if j in slot:
            pair = (slot[j], i)
            break
        slot[j] = i
    gone = set(list(held)[::97]) | {pair[0]}
    read = [(b"".join(i for i in held if i not in gone), 8)]
    assert set(conntrack._vanished(held, read, len(gone))) == gone
    gone.discard(pair[0])
    assert set(conntrack._vanished(held, read + [(pair[0], 8)], len(gone))) == gone


def test_a_life_ends_as_its_socket_starts_another_while_the_index_grows():
    for first, new in ((10, 3990), (1500, 900)):  # a full read, then the dirty set
        socks, conns = FakeMap(8, abi.SOCK_INFO.size), FakeMap(abi.CONN_TUPLE.size, abi.CONN_STATS.size)
        dirty = FakeMap(abi.CONN_TUPLE.size, 8)
        t = conntrack.ConnTable(conns, socks, dirty=dirty, set_gen=lambda gen: None)
        for i in range(first):
            socks.d[sk(i)] = sockn(i, stats(100, 200))
        t.poll()
        t.poll()
        # socket 1's life ends (to conns, 7 bytes more) and the socket starts
        # another; new sockets (the index grows and is built again)
        conns.d[tupn(1)] = stats(107, 200, state=abi.CONN_CLOSED)
        dirty.d[tupn(1)] = bytes(8)
        socks.d[sk(1)] = sockn(4999, stats(1, 1))
        dirty.d[tupn(4999)] = sk(1)
        for i in range(first, first + new):
            socks.d[sk(i)] = sockn(i, stats(3, 4))
            dirty.d[tupn(i)] = sk(i)
        got = dict((c._raw, c) for c in t.poll())
        assert len(got) == new + 2 and t.last_poll_full == (first == 10)
        c = got[tupn(1)]
        assert (c.sent_delta, c.first_seen, c.state) == (7, False, "closed")
        assert got[tupn(4999)].first_seen and got[tupn(4999)].sent_delta == 1
        assert t.tracked == first + new and tupn(1) not in conns.d


def test_two_lives_of_a_socket_in_one_slot_of_the_index():
    """The index keeps one id a slot: where a socket's ended life and its
    next share a slot, the next still finds it when it ends in turn."""
    class OneSlot(conntrack._SockIndex):
        __slots__ = ()

        def fit(self, more, *tables):
            pass
    socks, conns = FakeMap(8, abi.SOCK_INFO.size), FakeMap(abi.CONN_TUPLE.size, abi.CONN_STATS.size)
    dirty = FakeMap(abi.CONN_TUPLE.size, 8)
    t = conntrack.ConnTable(conns, socks, dirty=dirty, set_gen=lambda gen: None)
    t.sock_of = OneSlot(1)
    for i in range(5):
        socks.d[sk(i)] = sockn(i, stats(100, 200))
    t.poll()
    t.poll()
    for first in (True, False):  # the new life read before the ended one, then after
        old = abi.SOCK_INFO.unpack(socks.d[sk(1)]).tuple
        conns.d[old] = stats(107, 200, state=abi.CONN_CLOSED)
        socks.d[sk(1)] = sockn(100 + first, stats(50, 60))
        marks = [(old, bytes(8)), (tupn(100 + first), sk(1))]
        dirty.d.update(marks[::-1] if first else marks)
        got = dict((c._raw, c) for c in t.poll())
        assert (got[old].sent_delta, got[old].first_seen) == ((7, False) if first else (57, False))
        assert got[tupn(100 + first)].first_seen
        assert t.tracked == 5
