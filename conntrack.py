"""conntrack: turn the conns map into connection records, poll after poll.

The kernel side only ever adds to running totals; this module never clears
a live entry.  Each poll reads every entry (batched where the kernel can),
computes what changed since the previous poll from the totals it remembers,
and reports each connection that opened, moved bytes, retransmitted or
closed.  Closed entries are deleted after they were reported once; idle ones
expire (UDP after udp_idle seconds, TCP without a close after tcp_idle).
"""

import itertools
import operator
import socket
import struct
import time

import bpfsys

# struct conn_tuple in tracer.bpf.h (the record's name: one life of one
# connection of one process)
CONN_TUPLE = struct.Struct("<16s16sIIHHBBHI")
# struct conn_stats in tracer.bpf.h
CONN_STATS = struct.Struct("<QQQQIBBBB16sII")
# struct sock_info in tracer.bpf.h: the owner's tuple, has_tuple, the
# owner's stats, the other processes
SOCK_INFO = struct.Struct("<%dsI%ds12sI" % (CONN_TUPLE.size, CONN_STATS.size))
SOCK_INFO_TUPLE = slice(0, CONN_TUPLE.size)
SOCK_INFO_STATS = slice(CONN_TUPLE.size + 4, CONN_TUPLE.size + 4 + CONN_STATS.size)
_HAS_TUPLE = struct.Struct("<I")
_PID_OFFSET = 36          # conn_tuple.pid
_PROTO_OFFSET = 45        # conn_tuple.proto

PROTO_NAMES = {6: "tcp", 17: "udp"}
DIRECTIONS = {0: "unknown", 1: "outgoing", 2: "incoming"}
STATE_CLOSED = 2

# the telemetry map's slots (TELE_* in tracer.bpf.h)
TELEMETRY_NAMES = ("conn_lost", "closed_lost", "stash_lost", "tuple_mismatch", "tuple_checked",
                   "read_faults", "pending_lost", "dirty_lost", "bytes_lost", "udp_lost",
                   "shared_overflow")

FIELDS = ("type", "time", "proto", "family", "pid", "comm", "laddr", "lport", "raddr", "rport",
          "netns", "sent_bytes", "recv_bytes", "sent_delta", "recv_delta", "retransmits",
          "state", "direction")


class Conn(object):
    """One connection of one process, as the JSON "conn" record."""

    __slots__ = FIELDS + ("key", "first_seen")

    def as_dict(self):
        return dict((f, getattr(self, f)) for f in FIELDS)

    def __repr__(self):
        return "Conn(%s %s %s:%d -> %s:%d pid=%d sent=%d recv=%d %s)" % (
            self.proto, self.comm, self.laddr, self.lport, self.raddr, self.rport, self.pid,
            self.sent_bytes, self.recv_bytes, self.state)


def decode_tuple(key):
    saddr, daddr, netns, pid, sport, dport, family, proto, _, _ = CONN_TUPLE.unpack(key)
    if family == 4:
        laddr = socket.inet_ntop(socket.AF_INET, saddr[:4])
        raddr = socket.inet_ntop(socket.AF_INET, daddr[:4])
    else:
        laddr = socket.inet_ntop(socket.AF_INET6, saddr)
        raddr = socket.inet_ntop(socket.AF_INET6, daddr)
    return (PROTO_NAMES.get(proto, str(proto)), family, pid, laddr, sport, raddr, dport, netns)


def monotonic_ns():
    """bpf_ktime_get_ns()'s clock (CLOCK_MONOTONIC)."""
    return int(time.monotonic() * 1e9)


_LAST_NS = struct.Struct("<Q")
_LAST_NS_OFFSET = 24  # conn_stats.last_ns
_STATE_OFFSET = 37    # conn_stats.state


def _life(key):
    """A record's key without its pid: the connection life it belongs to."""
    return key[:_PID_OFFSET] + key[_PID_OFFSET + 4:]


def sock_record(value):
    """(key, stats) of a socks entry's owner record, or None while it has
    no tuple or no owner yet."""
    if not _HAS_TUPLE.unpack_from(value, CONN_TUPLE.size)[0]:
        return None
    key = value[SOCK_INFO_TUPLE]
    if not key[_PID_OFFSET:_PID_OFFSET + 4].strip(b"\0"):
        return None
    return key, value[SOCK_INFO_STATS]


class ConnTable(object):
    """Polls the records of the conns map (UDP flows, ended TCP lives, other
    processes' use of a shared socket) and of the socks map (each TCP
    socket's current life, its owner's counters).  With a dirty map (the
    records the kernel changed since the poll generation began, and where
    each lives) a poll reads only what changed; every full_every seconds,
    or when the dirty set could not keep up, it reads both tables whole
    (which also expires idle entries)."""

    def __init__(self, conns, socks, udp_idle=30.0, tcp_idle=600.0, dirty=None, set_gen=None):
        self.conns = conns
        self.socks = socks
        self.dirty = dirty
        self.set_gen = set_gen
        self.gen = 0
        self.udp_idle_ns = int(udp_idle * 1e9)
        self.tcp_idle_ns = int(tcp_idle * 1e9)
        # expiry needs every entry's last_ns: a full read only now and then
        self.full_every_ns = max(int(min(udp_idle, tcp_idle) * 1e9 / 4), 1)
        self.next_full_ns = 0
        self.drained_prev = {}
        self.dirty_lost = 0
        self.prev = {}        # key -> raw conn_stats bytes at the previous poll
        self.where = {}       # key -> struct sock address (socks records only)
        self.siblings = {}    # life (key without pid) -> keys of other processes' records
        self.decoded = {}     # key -> decoded tuple (cache)
        self.last_poll_seconds = 0.0
        self.last_poll_full = True
        self.tracked = 0
        self.expired = 0

    def _next_generation(self, dirty_lost):
        """Start a new generation, then drain the records marked in the old
        one.  The records drained by the previous poll are read again: an
        update that raced with that drain saw the old generation and did
        not mark."""
        self.gen = (self.gen + 1) & 0xFFFFFFFF
        self.set_gen(self.gen)
        try:
            keys, values = self.dirty.read_batch(delete=True)
        except bpfsys.BPFError:
            self.dirty = None  # no LOOKUP_AND_DELETE_BATCH (before 5.6): full reads
            return None
        drained = dict(zip(keys, (int.from_bytes(v, "little") for v in values)))
        look = dict(self.drained_prev)
        look.update(drained)
        self.drained_prev = drained
        if dirty_lost != self.dirty_lost:  # the dirty map was full: read everything
            self.dirty_lost = dirty_lost
            return None
        return look

    def _read_all(self):
        """{key: stats} of every record, and {key: sk} of those in socks."""
        keys, values = self.conns.read_all()
        cur = dict(zip(keys, values))
        where = {}
        skeys, svalues = self.socks.read_all()
        for sk, v in zip(skeys, svalues):
            rec = sock_record(v)
            if rec is not None:
                cur[rec[0]] = rec[1]
                where[rec[0]] = int.from_bytes(sk, "little")
        return cur, where

    def _lookup(self, key, sk):
        """(stats, sk or 0) of one record, wherever it is now; None if gone."""
        if sk:
            v = self.socks.lookup(sk.to_bytes(8, "little"))
            if v is not None:
                rec = sock_record(v)
                if rec is not None and rec[0] == key:
                    return rec[1], sk
        v = self.conns.lookup(key)
        if v is not None:
            return v, 0
        return None

    def poll(self, include=None, dirty_lost=0):
        """Connections active since the previous poll (include: a filter
        on the record; dirty_lost: the kernel's count of dirty-map misses)."""
        start = time.time()
        now_ns = monotonic_ns()
        look = None
        if self.dirty is not None:
            look = self._next_generation(dirty_lost)
        full = look is None or now_ns >= self.next_full_ns or len(look) > max(1024, len(self.prev) // 4)
        prev = self.prev
        if full:
            cur, where = self._read_all()
            keys, values = list(cur.keys()), list(cur.values())
            self.next_full_ns = now_ns + self.full_every_ns
        else:
            keys, values = [], []
            cur, where = prev, self.where
            for k, sk in look.items():
                got = self._lookup(k, sk or where.get(k, 0))
                if got is None:
                    continue
                keys.append(k)
                values.append(got[0])
                if got[1]:
                    where[k] = got[1]
                else:
                    where.pop(k, None)
        # records in conns that ended: reported (if changed), then deleted
        gone = [k for k, v in zip(keys, values)
                if k not in where and v[_STATE_OFFSET] == STATE_CLOSED]
        # compared in C (map/compress): unchanged entries cost next to nothing
        changed = list(itertools.compress(zip(keys, values),
                                          map(operator.ne, values, map(prev.get, keys))))
        changed = self._close_siblings(changed, cur, where, gone)
        out = []
        for key, value in changed:
            sent, recv, first_ns, last_ns, retr, direction, state, _, _, comm, _, _ = CONN_STATS.unpack(value)
            old = prev.get(key)
            if old is not None:
                o_sent, o_recv, _, _, o_retr, _, o_state, _, _, _, _, _ = CONN_STATS.unpack(old)
                if (o_sent, o_recv, o_retr, o_state) == (sent, recv, retr, state):
                    continue
            else:
                o_sent = o_recv = o_retr = 0
            closed = state == STATE_CLOSED
            tup = self.decoded.get(key)
            if tup is None:
                tup = self.decoded[key] = decode_tuple(key)
            c = Conn()
            c.key = key
            (c.proto, c.family, c.pid, c.laddr, c.lport, c.raddr, c.rport, c.netns) = tup
            c.type = "conn"
            c.time = round(start, 3)
            c.comm = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
            c.sent_bytes, c.recv_bytes, c.retransmits = sent, recv, retr
            c.sent_delta = sent - o_sent
            c.recv_delta = recv - o_recv
            c.state = "closed" if closed else "open"
            c.direction = DIRECTIONS.get(direction, "unknown")
            c.first_seen = old is None
            if include is None or include(c):
                out.append(c)
        if not full:
            cur.update(changed)
        out.sort(key=lambda c: c.key)
        if full:
            gone.extend(self._idle(cur, where, now_ns))
        if gone:
            self.conns.delete_keys(gone)
        for key in gone:
            cur.pop(key, None)
            self.decoded.pop(key, None)
        if full and len(self.decoded) > len(cur):
            for key in self.decoded.keys() - cur.keys():
                del self.decoded[key]
        if full and self.siblings:
            for life in list(self.siblings):
                self.siblings[life] = set(k for k in self.siblings[life] if k in cur)
                if not self.siblings[life]:
                    del self.siblings[life]
        self.prev = cur
        self.where = where
        self.tracked = len(cur)
        self.last_poll_full = full
        self.last_poll_seconds = time.time() - start
        return out

    def _close_siblings(self, changed, cur, where, gone):
        """A record of a process that shares a socket (after fork) closes
        with the socket's life, however many processes shared it (the kernel
        closes the first SOCK_OTHERS itself): changed, with those records
        closed; they are deleted from conns after this poll."""
        ended = []
        for k, v in changed:
            if k[_PROTO_OFFSET] != 6:
                continue
            if v[_STATE_OFFSET] == STATE_CLOSED:
                ended.append(_life(k))
            elif k not in where:
                self.siblings.setdefault(_life(k), set()).add(k)
        if not ended or not self.siblings:
            return changed
        now = dict(changed)
        for life in ended:
            for k in self.siblings.pop(life, ()):
                v = now.get(k) or cur.get(k)
                if v is not None and v[_STATE_OFFSET] != STATE_CLOSED and k not in where:
                    now[k] = v[:_STATE_OFFSET] + bytes([STATE_CLOSED]) + v[_STATE_OFFSET + 1:]
                    gone.append(k)
        return list(now.items())

    def _idle(self, cur, where, now_ns):
        """Keys of the conns records idle past their protocol's limit; idle
        socks records are deleted here (and dropped from cur)."""
        udp_before, tcp_before = now_ns - self.udp_idle_ns, now_ns - self.tcp_idle_ns
        unpack = _LAST_NS.unpack_from
        idle = []
        for key, value in cur.items():
            last = unpack(value, _LAST_NS_OFFSET)[0]
            if last < (tcp_before if key[_PROTO_OFFSET] == 6 else udp_before):
                idle.append(key)
        self.expired += len(idle)
        socks = [k for k in idle if k in where]
        if socks:
            self.socks.delete_keys([where.pop(k).to_bytes(8, "little") for k in socks])
            for k in socks:
                cur.pop(k, None)
                self.decoded.pop(k, None)
        return [k for k in idle if k in cur]
