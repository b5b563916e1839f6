"""conntrack: turn the conns map into connection records, poll after poll.

The kernel side only ever adds to running totals; this module never clears
a live entry.  Each poll reads every entry (batched where the kernel can),
computes what changed since the previous poll from the totals it remembers,
and reports each connection that opened, moved bytes, retransmitted or
closed.  Closed entries are deleted after they were reported once; idle ones
expire (UDP after udp_idle seconds, TCP without a close after tcp_idle).
"""

import collections
import itertools
import operator
import socket
import time

import abi
import bpfsys

# where the hot loop finds a field in the raw bytes (abi's layouts)
SOCK_INFO_TUPLE = abi.SOCK_INFO.slice("tuple")
SOCK_INFO_STATS = abi.SOCK_INFO.slice("stats")
_HAS_TUPLE = abi.SOCK_INFO.slice("has_tuple")
_PID = abi.CONN_TUPLE.slice("pid")
_PROTO_OFFSET = abi.CONN_TUPLE.offset("proto")
_STATE_OFFSET = abi.CONN_STATS.offset("state")
_SOCK_ID = 8              # the length of a socks entry's id: its struct sock address
_NO_SOCK = bytes(8)       # dirty map value of a record in conns
_ZERO32 = bytes(4)        # has_tuple or pid 0
_TCP, _UDP, _CLOSED = abi.TRACER_PROTO_TCP, abi.TRACER_PROTO_UDP, abi.CONN_CLOSED
_DIRECTIONS, _ENDS = abi.DIRECTIONS, abi.ENDS
FAILED_CONNECT = ("refused", "connect_timeout", "unreachable")

FIELDS = ("type", "time", "proto", "family", "pid", "comm", "laddr", "lport", "raddr", "rport",
          "netns", "sent_bytes", "recv_bytes", "sent_delta", "recv_delta", "retransmits",
          "state", "direction", "start_time", "duration", "end", "failed_connects",
          "resets_sent", "resets_received", "rtt_us", "rtt_var_us")


ConnKey = collections.namedtuple(
    "ConnKey", "proto family pid laddr lport raddr rport netns life")
ConnKey.__doc__ = """A record's identity, readable: one life of one connection of one
process.  life tells two lives of one 4-tuple apart: a number per TCP
connect or passive open, and per UDP socket for the first flow it
carried (held in the socket's own entry); 0 for a UDP flow recorded
apart (another peer, another process) and for a TCP socket opened
before the tracer."""


class Conn(object):
    """One connection life of one process, as the JSON "conn" record.

    Attributes (the JSON fields, then two more):
      type        "conn"
      time        float, Unix time of the poll that reported it
      proto       "tcp" or "udp"
      family      4 or 6 (IPv4-mapped IPv6 is shown as 4)
      pid         int, the process (thread group id)
      comm        str, the process name (up to 15 characters)
      laddr, lport  local address (str) and port (int)
      raddr, rport  remote address and port; for UDP the peer of the datagrams
      netns       int, the network namespace's inode number
      sent_bytes, recv_bytes  int, bytes in total since the tracer first saw
                  the connection (TCP: accepted by the kernel on send, copied
                  to the user on receive; UDP: payload)
      sent_delta, recv_delta  int, bytes since the previous poll
      retransmits int, TCP segments retransmitted in total (tcpi_total_retrans)
      state       "open" or "closed" (closed once, at TCP_CLOSE, never back)
      direction   "outgoing" (connect), "incoming" (accept) or "unknown"
      start_time  float Unix time the connection started (connect or accept),
                  or None where the tracer did not see the start (opened
                  before it; UDP)
      duration    float seconds from start to close (or to now, if open), or
                  None where start_time is None
      end         TCP: how it ended, at TCP_CLOSE: "fin", "reset_sent",
                  "reset_received", "timeout" (retransmits or keepalives
                  timed out); a connect() that never established: "refused",
                  "connect_timeout", "unreachable" (an ICMP error) or
                  "aborted" (closed by its owner first); None while open, for
                  UDP, and where the kernel's error field was not found
      failed_connects  1 for a connect() that never established (refused,
                  connect_timeout, unreachable), else 0
      resets_sent, resets_received  1 when it ended by a reset we sent / the
                  peer sent, else 0
      rtt_us, rtt_var_us  TCP: the kernel's smoothed RTT and its variance in
                  microseconds (tcpi_rtt, tcpi_rttvar), read at connect,
                  accept, retransmits, every 64 KiB received and close;
                  None for UDP and where the offsets were not found
      key         ConnKey: the record's identity, stable from poll to poll
      first_seen  bool, True the first time a record is reported
      retrans_delta  int, retransmits since the previous poll
    """

    __slots__ = FIELDS + ("key", "first_seen", "retrans_delta", "_raw")

    def as_dict(self):
        return dict((f, getattr(self, f)) for f in FIELDS)

    def __repr__(self):
        return "Conn(%s %s %s -> %s pid=%d sent=%d recv=%d %s)" % (
            self.proto, self.comm, format_endpoint(self.laddr, self.lport),
            format_endpoint(self.raddr, self.rport), self.pid,
            self.sent_bytes, self.recv_bytes, self.state)


# conn_stats and conn_tuple decoded by field name, at C speed (the poll's hot loop)
_unpack_stats = abi.CONN_STATS.struct.unpack
_record_fields = abi.CONN_STATS.getter(
    "sent_bytes", "recv_bytes", "retransmits", "state", "direction", "seen_start", "end", "comm",
    "first_ns", "last_ns", "rtt_us", "rtt_var_us")
_counters = abi.CONN_STATS.getter("sent_bytes", "recv_bytes", "retransmits", "state")
_unpack_tuple = abi.CONN_TUPLE.struct.unpack
_tuple_fields = abi.CONN_TUPLE.getter(
    "saddr", "daddr", "netns", "pid", "sport", "dport", "family", "proto", "life")


def format_endpoint(addr, port):
    """'1.2.3.4:80', '[::1]:80'."""
    return ("[%s]:%d" if ":" in addr else "%s:%d") % (addr, port)


def decode_tuple(key):
    saddr, daddr, netns, pid, sport, dport, family, proto, life = _tuple_fields(_unpack_tuple(key))
    if family == 4:
        laddr = socket.inet_ntop(socket.AF_INET, saddr[:4])
        raddr = socket.inet_ntop(socket.AF_INET, daddr[:4])
    else:
        laddr = socket.inet_ntop(socket.AF_INET6, saddr)
        raddr = socket.inet_ntop(socket.AF_INET6, daddr)
    return ConnKey(abi.PROTO_NAMES.get(proto, str(proto)), family, pid, laddr, sport, raddr, dport,
                   netns, life)


def monotonic_ns():
    """bpf_ktime_get_ns()'s clock (CLOCK_MONOTONIC)."""
    return int(time.monotonic() * 1e9)


def _life(key):
    """A record's key without its pid: the connection life it belongs to."""
    return key[:_PID.start] + key[_PID.stop:]


class ConnTable(object):
    """Polls the records of the socks map (each TCP socket's current life,
    with its owner's counters) and of the conns map (UDP flows, ended TCP
    lives, other processes' use of a shared socket).

    Entries are held by id: the socket address (8 bytes) for a socks
    entry, the record's key (52 bytes) for a conns entry, so that telling
    what changed is a C-level comparison of raw values; only changed
    entries are decoded.  With a dirty map (the records the kernel changed
    since the poll generation began, and where each lives) a poll reads
    only those; every full_every seconds, or when the dirty set could not
    keep up, it reads both tables whole and expires idle entries."""

    def __init__(self, conns, socks, udp_idle=30.0, tcp_idle=600.0, dirty=None, set_gen=None,
                 keep_expired=False):
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
        self.prev = {}        # id -> raw value (sock_info or conn_stats) at the previous poll
        self.sock_of = {}     # record key -> socket id, for records seen in socks
        self.active = {}      # id -> monotonic ns of the last poll that saw it change
        self.siblings = {}    # life (key without pid) -> keys of other processes' records
        self.decoded = {}     # key -> decoded tuple (cache)
        self.last_poll_seconds = 0.0
        self.last_poll_full = True
        self.polled = False   # the first poll reads the whole tables
        self.tracked = 0
        self.expired = 0
        # with keep_expired: the records of UDP flows expired, until taken
        self.keep_expired = keep_expired
        self.expired_udp = []

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
        drained = dict(zip(keys, values))
        look = dict(self.drained_prev)
        look.update(drained)
        self.drained_prev = drained
        if dirty_lost != self.dirty_lost:  # the dirty map was full: read everything
            self.dirty_lost = dirty_lost
            return None
        return look

    def _read_dirty(self, look, cur):
        """Read the records named in look ({key: socket address}) into cur."""
        for key, sk in look.items():
            if sk != _NO_SOCK:
                v = self.socks.lookup(sk)
                if v is not None and v[SOCK_INFO_TUPLE] == key:
                    cur[sk] = v
                    continue
            v = self.conns.lookup(key)
            if v is not None:
                cur[key] = v

    def poll(self, include=None, dirty_lost=0, everything=False):
        """Connections active since the previous poll (include: a filter
        on the record; dirty_lost: the kernel's count of dirty-map misses);
        with everything, every connection tracked (deltas 0 where nothing
        moved)."""
        start = time.time()
        now_ns = monotonic_ns()
        look = None
        if self.dirty is not None:
            look = self._next_generation(dirty_lost)
        # the whole tables at a table's first poll (it reports every record:
        # entries the kernel marked before this table began are not in the
        # dirty set), without a dirty map, or when it overflowed; else what
        # the kernel marked
        full = look is None or not self.polled or len(look) > max(1024, len(self.prev) // 4)
        prev = self.prev
        if full:
            keys, values = self.conns.read_all()
            cur = dict(zip(keys, values))
            keys, values = self.socks.read_all()
            cur.update(zip(keys, values))
            fresh = cur
        else:
            fresh = {}
            self._read_dirty(look, fresh)
        # compared in C (map/compress): unchanged entries cost next to nothing
        ids = list(fresh.keys())
        changed = list(itertools.compress(ids, map(operator.ne, map(fresh.get, ids), map(prev.get, ids))))
        if full:
            before = prev
        else:  # what the changed entries held, before cur (= prev, updated in place) moves on
            before = dict((i, prev.get(i)) for i in changed)
            for i in changed:
                sk = self.sock_of.get(i) if len(i) != _SOCK_ID else None
                if sk is not None:
                    before[sk] = prev.get(sk)
            cur = prev
            cur.update(fresh)
        recs, gone = self._records(changed, cur, before)
        recs = self._close_siblings(recs, cur, gone)
        out = []
        for key, stats, old in recs:
            c = self._conn(key, stats, old, start, now_ns)
            if c is not None and (include is None or include(c)):
                out.append(c)
        if everything:  # the entries that did not change, too (deltas 0)
            seen = set(changed)
            seen.update(c._raw for c in out)
            out.extend(self._unchanged(seen, cur, start, now_ns, include))
        out.sort(key=lambda c: c.key)
        # expiry: on the values this process holds (the kernel marks every
        # change, so an entry idle here is idle there), every full_every
        expire = now_ns >= self.next_full_ns
        if expire:
            self.next_full_ns = now_ns + self.full_every_ns
            idle, idle_socks = self._idle(cur, now_ns)
            if self.keep_expired:  # UDP flows, in conns or in their socket's entry
                flows = [(k, cur[k]) for k in idle if k[_PROTO_OFFSET] == _UDP]
                flows += [(v[SOCK_INFO_TUPLE], v[SOCK_INFO_STATS]) for v in idle_socks
                          if v[_PROTO_OFFSET] == _UDP]
                self.expired_udp.extend(self._conn(k, v, v, start, now_ns, unchanged=True)
                                        for k, v in flows)
            gone.extend(idle)
        if gone:
            self.conns.delete_keys(gone)
        for key in gone:
            cur.pop(key, None)
            self.decoded.pop(key, None)
        if full or expire:
            self._prune(cur)
        self.prev = cur
        self.tracked = len(cur)
        self.last_poll_full = full
        self.polled = True
        self.last_poll_seconds = time.time() - start
        return out

    def _records(self, changed, cur, prev):
        """[(key, stats, old stats or None)] of the changed entries, and the
        conns keys of ended records (deleted once reported)."""
        out, gone = [], []
        active, now_ns = self.active, monotonic_ns()
        for i in changed:
            v = cur[i]
            old = prev.get(i)
            active[i] = now_ns
            if len(i) == _SOCK_ID:
                if v[_HAS_TUPLE] == _ZERO32:
                    continue
                key = v[SOCK_INFO_TUPLE]
                if key[_PID] == _ZERO32:
                    continue  # incoming, not claimed by a process yet
                self.sock_of[key] = i
                stats = v[SOCK_INFO_STATS]
                old = old[SOCK_INFO_STATS] if old is not None and old[SOCK_INFO_TUPLE] == key else None
            else:
                key, stats = i, v
                if old is None:  # an ended life that left socks since the last poll
                    sk = self.sock_of.pop(key, None)
                    was = prev.get(sk) if sk is not None else None
                    if was is not None and was[SOCK_INFO_TUPLE] == key:
                        old = was[SOCK_INFO_STATS]
                    now = cur.get(sk) if sk is not None else None
                    if now is not None and now[SOCK_INFO_TUPLE] == key:
                        del cur[sk]  # the socket's entry is gone from the kernel
                if v[_STATE_OFFSET] == _CLOSED:
                    gone.append(key)
            out.append((key, stats, old))
        return out, gone

    def _conn(self, key, value, old, start, now_ns, unchanged=False):
        """The record of one changed entry, or None if nothing it reports
        moved (unless unchanged: then it is reported anyway, with deltas 0).
        start, now_ns: the poll's wall clock and monotonic time (the
        kernel's clock)."""
        (sent, recv, retr, state, direction, seen_start, end, comm, first_ns, last_ns, rtt,
         rtt_var) = _record_fields(_unpack_stats(value))
        if old is not None:
            o_sent, o_recv, o_retr, o_state = _counters(_unpack_stats(old))
            if (o_sent, o_recv, o_retr, o_state) == (sent, recv, retr, state) and not unchanged:
                return None
        else:
            o_sent = o_recv = o_retr = 0
        tup = self.decoded.get(key)
        if tup is None:
            tup = self.decoded[key] = decode_tuple(key)
        c = Conn()
        c._raw = key
        c.key = tup
        (c.proto, c.family, c.pid, c.laddr, c.lport, c.raddr, c.rport, c.netns, _) = tup
        c.retrans_delta = retr - o_retr
        c.type = "conn"
        c.time = round(start, 3)
        c.comm = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        c.sent_bytes, c.recv_bytes, c.retransmits = sent, recv, retr
        c.sent_delta = sent - o_sent
        c.recv_delta = recv - o_recv
        c.state = "closed" if state == _CLOSED else "open"
        c.direction = _DIRECTIONS.get(direction, "unknown")
        c.first_seen = old is None
        if seen_start:  # the tracer saw the connection start (connect or accept)
            c.start_time = round(start - (now_ns - first_ns) / 1e9, 3)
            c.duration = round(max(0, (last_ns if state == _CLOSED else now_ns) - first_ns) / 1e9, 3)
        else:  # opened before the tracer, or UDP (no start): not guessed
            c.start_time = c.duration = None
        c.end = _ENDS.get(end) if state == _CLOSED else None
        c.failed_connects = int(c.end in FAILED_CONNECT)
        c.resets_sent = int(c.end == "reset_sent")
        c.resets_received = int(c.end == "reset_received")
        c.rtt_us, c.rtt_var_us = (rtt, rtt_var) if rtt else (None, None)
        return c

    def _unchanged(self, changed, cur, start, now_ns, include):
        """Records of the entries in cur not in changed, deltas 0."""
        out = []
        for i, v in cur.items():
            if i in changed:
                continue
            if len(i) == _SOCK_ID:
                if v[_HAS_TUPLE] == _ZERO32:
                    continue
                key, stats = v[SOCK_INFO_TUPLE], v[SOCK_INFO_STATS]
                if key[_PID] == _ZERO32:
                    continue
            else:
                key, stats = i, v
            c = self._conn(key, stats, stats, start, now_ns, unchanged=True)
            c.first_seen = False
            if include is None or include(c):
                out.append(c)
        return out

    def _close_siblings(self, recs, cur, gone):
        """A record of a process that shares a socket (after fork) closes
        with the socket's life, however many processes shared it (the kernel
        closes the first SOCK_OTHERS itself): recs, with those records
        closed; they are deleted from conns after this poll."""
        ended = []
        for key, stats, _ in recs:
            if key[_PROTO_OFFSET] != _TCP:
                continue
            if stats[_STATE_OFFSET] == _CLOSED:
                ended.append(_life(key))
            elif key in cur:  # an open conns record of TCP: a process sharing a socket
                self.siblings.setdefault(_life(key), set()).add(key)
        if not ended or not self.siblings:
            return recs
        now = dict((key, (stats, old)) for key, stats, old in recs)
        for life in ended:
            for k in self.siblings.pop(life, ()):
                stats, old = now.get(k) or (cur.get(k), cur.get(k))
                if stats is not None and stats[_STATE_OFFSET] != _CLOSED:
                    closed = stats[:_STATE_OFFSET] + bytes([_CLOSED]) + stats[_STATE_OFFSET + 1:]
                    now[k] = (closed, old)
                    gone.append(k)
        return [(k, s, o) for k, (s, o) in now.items()]

    def _idle(self, cur, now_ns):
        """Keys of the conns records idle past their protocol's limit, and
        the values of the idle socks entries, which are deleted here (and
        dropped from cur).  Idle: no
        counter moved in any poll since the limit (the kernel marks every
        change, and reads no clock on the hot path)."""
        udp_before, tcp_before = now_ns - self.udp_idle_ns, now_ns - self.tcp_idle_ns
        active = self.active
        idle_socks, idle = [], []
        for i in cur:
            t = active.get(i)
            if t is None:
                active[i] = now_ns
            elif len(i) == _SOCK_ID:  # a socket's own entry: TCP life, or a UDP socket's first flow
                if t < (tcp_before if cur[i][_PROTO_OFFSET] == _TCP else udp_before):
                    idle_socks.append(i)
            elif t < (tcp_before if i[_PROTO_OFFSET] == _TCP else udp_before):
                idle.append(i)
        # only entries the kernel still holds as they were (not a new life)
        idle_socks = [i for i in idle_socks if self.socks.lookup(i) in (cur[i], None)]
        values = [cur[i] for i in idle_socks]
        if idle_socks:
            self.socks.delete_keys(idle_socks)
            for i in idle_socks:
                cur.pop(i, None)
        for i in idle_socks + idle:
            active.pop(i, None)
        self.expired += len(idle) + len(idle_socks)
        return idle, values

    def _prune(self, cur):
        """After a full read: forget what no longer exists."""
        if len(self.decoded) > len(cur):
            keys = set(k for k in cur if len(k) != _SOCK_ID)
            keys.update(v[SOCK_INFO_TUPLE] for k, v in cur.items() if len(k) == _SOCK_ID)
            for key in self.decoded.keys() - keys:
                del self.decoded[key]
        if len(self.sock_of) > len(cur):
            for key, sk in list(self.sock_of.items()):
                if sk not in cur:
                    del self.sock_of[key]
        if len(self.active) > len(cur):
            for i in self.active.keys() - cur.keys():
                del self.active[i]
        for life in list(self.siblings):
            self.siblings[life] = set(k for k in self.siblings[life] if k in cur)
            if not self.siblings[life]:
                del self.siblings[life]
