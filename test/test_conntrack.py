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

    def read_chunks(self):
        items = list(self.d.items())
        for at in range(0, len(items), 2):  # small batches: more than one
            yield [k for k, _ in items[at:at + 2]], [v for _, v in items[at:at + 2]]

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
