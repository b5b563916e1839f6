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
import struct
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
_BY_ID = operator.attrgetter("_id")
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


# conn_tuple decoded by field name, at C speed
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


class _Poll(object):
    """What the records of one poll share: its wall clock (start; time,
    rounded as records show it) and the kernel's monotonic clock (now_ns)."""
    __slots__ = ("start", "time", "now_ns")

    def __init__(self, start, now_ns):
        self.start, self.time, self.now_ns = start, round(start, 3), now_ns


_CONN_STATS_SIZE = abi.CONN_STATS.size
_STATS_AT = SOCK_INFO_STATS.start
# conn_stats up to its trailing padding (68 of 72 bytes), unpacked
_STATS_FORMAT = abi.CONN_STATS.struct.format
_STATS_FORMAT = _STATS_FORMAT.decode() if isinstance(_STATS_FORMAT, bytes) else _STATS_FORMAT  # (3.6)
assert abi.CONN_STATS.names[-1] == "_pad2" and _STATS_FORMAT.endswith("I")
_STATS_USED = abi.CONN_STATS.offset("_pad2")
_unpack_stats_from = struct.Struct(_STATS_FORMAT[:-1]).unpack_from
assert struct.calcsize(_STATS_FORMAT[:-1]) == _STATS_USED
# what the table keeps of a socks value (and its records hold): the tuple,
# has_tuple and the stats but their padding, not the tail the kernel alone
# reads (others, the sequence snapshots): 124 bytes of 152, a 160-byte
# object (128 bytes would take 176, 152 took 192)
_HELD = _STATS_AT + _STATS_USED
_unpack_tuple_from = abi.CONN_TUPLE.struct.unpack_from
_ST = dict((n, i) for i, n in enumerate(abi.CONN_STATS.names))   # a field's index in the unpacked stats
_TU = dict((n, i) for i, n in enumerate(abi.CONN_TUPLE.names))
_ST_SENT, _ST_RECV, _ST_RETR, _ST_STATE = _ST["sent_bytes"], _ST["recv_bytes"], _ST["retransmits"], _ST["state"]


def _stats_of(v):
    """conn_stats unpacked, from a conns value or a socks value (sock_info,
    whole or its first _HELD bytes)."""
    return _unpack_stats_from(v, 0 if len(v) == _CONN_STATS_SIZE else _STATS_AT)


def _stats_bytes(v):
    """The conn_stats bytes (72) of a conns or a socks value."""
    return v if len(v) == _CONN_STATS_SIZE else v[SOCK_INFO_STATS].ljust(_CONN_STATS_SIZE, b"\0")


_SOCK_STATE_AT = _STATS_AT + _STATE_OFFSET


def _closed(v):
    """Whether a conns or socks value's state is closed."""
    return v[_STATE_OFFSET if len(v) == _CONN_STATS_SIZE else _SOCK_STATE_AT] == _CLOSED


def _held(v):
    """A socks value as the table keeps it (None stays None)."""
    return v if v is None else v[:_HELD]


class Conn(object):
    """One connection life of one process, as the JSON "conn" record.

    Attributes (the JSON fields, then three more):
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

    A record a poll made holds the raw map values it came from (shared
    with the table's own copy) and decodes a field when it is read:
    100,000 records cost about 64 bytes each, not 30 decoded fields.  A
    field may be set (Conn() makes an empty record whose fields are all
    set); a set value is read back as it was set."""

    # _p: the poll's _Poll, shared, or the record's own _Extra once its key
    # is decoded or a field set (four slots: 64 bytes a record)
    __slots__ = ("_id", "_v", "_old", "_p")

    def __init__(self, _id=None, _v=None, _old=None, _poll=None):
        self._id, self._v, self._old, self._p = _id, _v, _old, _poll

    @property
    def _poll(self):
        x = self._p
        return x.poll if x.__class__ is _Extra else x

    @property
    def _key(self):
        """The ConnKey, where decoded and kept."""
        x = self._p
        return x.key if x.__class__ is _Extra else None

    @property
    def _set(self):
        """{field: value} of the fields set, or None."""
        x = self._p
        return x.set if x.__class__ is _Extra else None

    @property
    def _raw(self):
        """The record's key in the maps (conn_tuple bytes)."""
        i = self._id
        return self._v[SOCK_INFO_TUPLE] if len(i) == _SOCK_ID else i

    def _tuple_field(self, index):
        i = self._id
        return _unpack_tuple_from(self._v if len(i) == _SOCK_ID else i)[index]

    def _moved(self):
        """Whether a counter or the state moved since old (or there is no old)."""
        old = self._old
        if old is None:
            return True
        a, b = _stats_of(self._v), _stats_of(old)
        return (a[_ST_SENT] != b[_ST_SENT] or a[_ST_RECV] != b[_ST_RECV]
                or a[_ST_RETR] != b[_ST_RETR] or a[_ST_STATE] != b[_ST_STATE])

    def _closed_now(self):
        """The record with its state closed (a sibling of a socket life that ended)."""
        stats = _stats_bytes(self._v)
        self._v = stats[:_STATE_OFFSET] + bytes([_CLOSED]) + stats[_STATE_OFFSET + 1:]

    def as_dict(self):
        if self._v is None or self._set:
            return dict((f, getattr(self, f)) for f in FIELDS)
        return dict(zip(FIELDS, self._decode()))

    def _decode(self):
        """Every field of FIELDS, in order, from the raw values."""
        (sent, recv, first_ns, last_ns, retr, direction, state, seen_start, end, comm, _, rtt,
         rtt_var) = _stats_of(self._v)
        o_sent, o_recv = self._old_counters()[:2]
        proto, family, pid, laddr, lport, raddr, rport, netns, _ = (
            self._key or decode_tuple(self._raw))  # not kept: as_dict of every record
        p = self._poll
        closed = state == _CLOSED
        end = _ENDS.get(end) if closed else None
        if seen_start:
            start_time = round(p.start - (p.now_ns - first_ns) / 1e9, 3)
            duration = round(max(0, (last_ns if closed else p.now_ns) - first_ns) / 1e9, 3)
        else:
            start_time = duration = None
        return ("conn", p.time, proto, family, pid, _comm(comm), laddr, lport, raddr, rport,
                netns, sent, recv, sent - o_sent, recv - o_recv, retr,
                "closed" if closed else "open", _DIRECTIONS.get(direction, "unknown"),
                start_time, duration, end, int(end in FAILED_CONNECT), int(end == "reset_sent"),
                int(end == "reset_received")) + ((rtt, rtt_var) if rtt else (None, None))

    def _old_counters(self):
        old = self._old
        if old is None:
            return 0, 0, 0
        s = _stats_of(old)
        return s[_ST_SENT], s[_ST_RECV], s[_ST_RETR]

    def __repr__(self):
        return "Conn(%s %s %s -> %s pid=%d sent=%d recv=%d %s)" % (
            self.proto, self.comm, format_endpoint(self.laddr, self.lport),
            format_endpoint(self.raddr, self.rport), self.pid,
            self.sent_bytes, self.recv_bytes, self.state)


class _Extra(object):
    """What a record holds beyond the shared: its poll, its decoded key,
    the fields set on it."""
    __slots__ = ("poll", "key", "set")

    def __init__(self, poll):
        self.poll, self.key, self.set = poll, None, None


def _extra(c):
    x = c._p
    if x.__class__ is not _Extra:
        x = c._p = _Extra(x)
    return x


def _comm(raw):
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _conn_key(c):
    x = c._p
    if x.__class__ is _Extra and x.key is not None:
        return x.key
    k = _extra(c).key = decode_tuple(c._raw)
    return k


def _stat(name):
    i = _ST[name]
    return lambda c: _stats_of(c._v)[i]


def _start_time(c):
    s = _stats_of(c._v)
    if not s[_ST["seen_start"]]:
        return None
    p = c._poll
    return round(p.start - (p.now_ns - s[_ST["first_ns"]]) / 1e9, 3)


def _duration(c):
    s = _stats_of(c._v)
    if not s[_ST["seen_start"]]:
        return None
    end_ns = s[_ST["last_ns"]] if s[_ST_STATE] == _CLOSED else c._poll.now_ns
    return round(max(0, end_ns - s[_ST["first_ns"]]) / 1e9, 3)


def _end(c):
    s = _stats_of(c._v)
    return _ENDS.get(s[_ST["end"]]) if s[_ST_STATE] == _CLOSED else None


def _rtt(name):
    i, rtt = _ST[name], _ST["rtt_us"]

    def get(c):
        s = _stats_of(c._v)
        return s[i] if s[rtt] else None
    return get


# how a record decodes each field from its raw values (key fields: laddr
# and raddr through the ConnKey, decoded once and kept; the others at
# each read)
_DECODE = {
    "type": lambda c: "conn",
    "time": lambda c: c._poll.time,
    "key": _conn_key,
    "proto": lambda c: abi.PROTO_NAMES.get(c._tuple_field(_TU["proto"]),
                                           str(c._tuple_field(_TU["proto"]))),
    "family": lambda c: c._tuple_field(_TU["family"]),
    "pid": lambda c: c._tuple_field(_TU["pid"]),
    "laddr": lambda c: _conn_key(c).laddr,
    "lport": lambda c: c._tuple_field(_TU["sport"]),
    "raddr": lambda c: _conn_key(c).raddr,
    "rport": lambda c: c._tuple_field(_TU["dport"]),
    "netns": lambda c: c._tuple_field(_TU["netns"]),
    "comm": lambda c: _comm(_stats_of(c._v)[_ST["comm"]]),
    "sent_bytes": _stat("sent_bytes"),
    "recv_bytes": _stat("recv_bytes"),
    "retransmits": _stat("retransmits"),
    "sent_delta": lambda c: _stats_of(c._v)[_ST_SENT] - c._old_counters()[0],
    "recv_delta": lambda c: _stats_of(c._v)[_ST_RECV] - c._old_counters()[1],
    "retrans_delta": lambda c: _stats_of(c._v)[_ST_RETR] - c._old_counters()[2],
    "state": lambda c: "closed" if _stats_of(c._v)[_ST_STATE] == _CLOSED else "open",
    "direction": lambda c: _DIRECTIONS.get(_stats_of(c._v)[_ST["direction"]], "unknown"),
    "first_seen": lambda c: c._old is None,
    "start_time": _start_time,
    "duration": _duration,
    "end": _end,
    "failed_connects": lambda c: int(_end(c) in FAILED_CONNECT),
    "resets_sent": lambda c: int(_end(c) == "reset_sent"),
    "resets_received": lambda c: int(_end(c) == "reset_received"),
    "rtt_us": _rtt("rtt_us"),
    "rtt_var_us": _rtt("rtt_var_us"),
}


def _field(name, decode):
    def get(c):
        x = c._p
        if x.__class__ is _Extra:
            s = x.set
            if s is not None and name in s:
                return s[name]
        if c._v is None:  # Conn(): only what was set
            raise AttributeError(name)
        return decode(c)

    def put(c, value):
        x = _extra(c)
        if x.set is None:
            x.set = {}
        x.set[name] = value
    return property(get, put)


for _name, _decode in _DECODE.items():
    setattr(Conn, _name, _field(_name, _decode))
del _name, _decode
assert set(_DECODE) == set(FIELDS) | {"key", "first_seen", "retrans_delta"}


class _SockIndex(object):
    """hash(record key) -> the ids of the socks entries that held that key:
    how a conns record that left socks finds its socket's entry.  A list of
    slots, each an id or a tuple of the ids that share it (no int objects:
    about 20 bytes an entry at 100k, where a dict of hash -> id took 90).
    It may hold stale ids (a socket since reused, gone or expired):
    whoever uses an id checks its entry's tuple."""
    __slots__ = ("slots", "mask", "n")

    def __init__(self, size=1024):
        self.slots = [None] * size
        self.mask = size - 1
        self.n = 0  # ids held, stale ones included

    def __len__(self):
        return self.n

    def get(self, h):
        """The ids in hash h's slot (a tuple, maybe empty)."""
        x = self.slots[h & self.mask]
        if x is None:
            return ()
        return (x,) if x.__class__ is bytes else x

    def add(self, h, sk):
        j = h & self.mask
        x = self.slots[j]
        if x is None:
            self.slots[j] = sk
        elif x.__class__ is bytes:
            if x == sk:
                return
            self.slots[j] = (x, sk)
        elif sk in x:
            return
        else:
            self.slots[j] = x + (sk,)
        self.n += 1

    def discard(self, h, sk):
        j = h & self.mask
        x = self.slots[j]
        if x is None:
            return
        if x.__class__ is bytes:
            if x != sk:
                return
            self.slots[j] = None
        elif sk not in x:
            return
        else:
            x = tuple(y for y in x if y != sk)
            self.slots[j] = x if len(x) > 1 else x[0]
        self.n -= 1

    def fit(self, more, *tables):
        """Room for more ids (a slot an id, at most two on average): grows,
        and then indexes afresh what the tables hold."""
        if self.n + more <= 2 * len(self.slots):
            return
        size = len(self.slots)
        while size < self.n + more:
            size *= 2
        self.rebuild(size, *tables)

    def rebuild(self, size, *tables):
        """Index afresh the socks entries of tables ({id: value}) that name
        a process's record: the stale ids go."""
        held = self.n
        self.__init__(size)
        if not held:
            return
        add = self.add
        for table in tables:
            for i, v in table.items():
                if len(i) == _SOCK_ID and v[_HAS_TUPLE] != _ZERO32 and v[_PID] != _ZERO32:
                    add(hash(v[SOCK_INFO_TUPLE]), i)


def _split(raw, size):
    return [raw[i:i + size] for i in range(0, len(raw), size)]


def _vanished(held, read, n):
    """The n ids of held that no chunk of read ((ids end to end, id size))
    holds.  A byte a slot marks the slots of the ids read: the ids held in
    an unmarked slot are gone (about a megabyte at 100k, all in C).  Where
    that finds fewer than n (one gone shares its slot with one read), a set
    of the ids held, less those read (4 MB at 100k)."""
    size = 1 << max(16, (8 * len(held)).bit_length())
    mask, one = itertools.repeat(size - 1), itertools.repeat(1)
    marks = bytearray(size)
    for raw, ks in read:
        collections.deque(map(marks.__setitem__, map(operator.and_, map(hash, _split(raw, ks)), mask),
                              one), 0)
    gone = list(itertools.compress(held, map(operator.not_, map(
        marks.__getitem__, map(operator.and_, map(hash, held), mask)))))
    if len(gone) == n:
        return gone
    del marks, gone
    gone = set(held)
    for raw, ks in read:
        gone.difference_update(_split(raw, ks))
    return gone


class ConnTable(object):
    """Polls the records of the socks map (each TCP socket's current life,
    with its owner's counters) and of the conns map (UDP flows, ended TCP
    lives, other processes' use of a shared socket).

    Entries are held by id: the socket address (8 bytes) for a socks
    entry, the record's key (52 bytes) for a conns entry, so that telling
    what changed is a C-level comparison of raw values.  Records hold the
    raw values they came from and decode a field when it is read (a poll
    decodes only the counters of the changed entries).  With a dirty map (the records the kernel changed
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
        self.drained_prev = []   # the dirty map's batches the previous poll drained
        self.dirty_lost = 0
        # id -> raw value at the previous poll (conn_stats, or the first
        # _HELD bytes of a sock_info)
        self.prev = {}
        # hash(record key) -> socket ids, for records seen in socks (whoever
        # uses it checks the socket's tuple)
        self.sock_of = _SockIndex()
        # id -> monotonic ns of the last poll that saw it change, for the ids
        # that changed since the first poll (the others: first_ns)
        self.active = {}
        self.first_ns = 0
        self.siblings = {}    # life (key without pid) -> keys of other processes' records
        self.last_poll_seconds = 0.0
        self.last_poll_full = True
        self.polled = False   # the first poll reads the whole tables
        self.tracked = 0
        self.expired = 0
        # with keep_expired: the records of UDP flows expired, until taken
        self.keep_expired = keep_expired
        self.expired_udp = []

    def _next_generation(self, dirty_lost, limit):
        """Start a new generation, then drain the records marked in the old
        one: {key: socket address} of what to read, or None where the whole
        tables must be read (more than limit records marked, or the dirty
        map was full).  The records drained by the previous poll are read
        again: an update that raced with that drain saw the old generation
        and did not mark.  What was drained is held as the kernel's batches
        (the keys end to end), not as a dict, until it is looked at."""
        self.gen = (self.gen + 1) & 0xFFFFFFFF
        self.set_gen(self.gen)
        try:
            drained = list(self.dirty.batches(delete=True, raw=True))
        except bpfsys.BPFError:
            self.dirty = None  # no LOOKUP_AND_DELETE_BATCH (before 5.6): full reads
            return None
        ks, vs = self.dirty.key_size, self.dirty.value_size
        drained_prev, self.drained_prev = self.drained_prev, drained
        if dirty_lost != self.dirty_lost:  # the dirty map was full: read everything
            self.dirty_lost = dirty_lost
            return None
        if drained_prev is None:  # the previous drain alone was over the limit
            return None
        batches = drained_prev + drained
        # counted with the records both drains hold twice: at worst a full
        # read where the union would have been just under limit
        if sum(len(k) for k, _ in batches) // ks > limit:
            return None
        look = {}
        for kraw, vraw in batches:
            look.update(zip([kraw[i:i + ks] for i in range(0, len(kraw), ks)],
                            [vraw[i:i + vs] for i in range(0, len(vraw), vs)]))
        return look

    def _read_dirty(self, look, cur):
        """Read the records named in look ({key: socket address}) into cur."""
        for key, sk in look.items():
            if sk != _NO_SOCK:
                v = self.socks.lookup(sk)
                if v is not None and v[SOCK_INFO_TUPLE] == key:
                    cur[sk] = v[:_HELD]
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
        # the whole tables at a table's first poll (it reports every record:
        # entries the kernel marked before this table began are not in the
        # dirty set), without a dirty map, when it overflowed, or when it
        # marked more than a quarter of the table; else what the kernel marked
        limit = max(1024, len(self.prev) // 4) if self.polled else -1
        if self.dirty is not None:
            look = self._next_generation(dirty_lost, limit)
        full = look is None or len(look) > limit
        prev = self.prev
        fresh, vanished = {}, None
        if full:
            # a kernel batch at a time, compared in C (map/compress) with what
            # is held: only the changed entries are kept, never a second copy
            # of the tables; of the ids read, only a count of those held
            # (and the batch's ids end to end, for when some held are gone)
            read = []
            held = 0
            for m, vlen in ((self.conns, None), (self.socks, _HELD)):
                for keys, values in m.read_chunks(vlen):
                    if prev:
                        held += sum(map(prev.__contains__, keys))
                        read.append((b"".join(keys), m.key_size))
                    fresh.update(itertools.compress(
                        zip(keys, values), map(operator.ne, values, map(prev.get, keys))))
                    del keys, values  # (not held while the next batch is read)
            if held != len(prev):  # what the kernel no longer holds
                vanished = _vanished(prev, read, len(prev) - held)
            del read
        else:
            self._read_dirty(look, fresh)
        del look
        changed = list(itertools.compress(fresh, map(operator.ne, fresh.values(), map(prev.get, fresh))))
        # what the changed entries held (and the sockets the conns records
        # among them lived in), before cur (= prev, updated in place) moves on
        before = dict((i, prev[i]) for i in changed if i in prev)
        for i in changed:
            if len(i) != _SOCK_ID:
                for sk in self.sock_of.get(hash(i)):
                    v = prev.get(sk)
                    if v is not None and v[SOCK_INFO_TUPLE] == i:
                        before[sk] = v
        if not prev:
            cur = fresh
        else:
            cur = prev
            if vanished:
                for i in vanished:
                    del cur[i]
            cur.update(fresh)
        del fresh, vanished
        # the batches drained for the next poll to read again: where they
        # alone are more than its limit (it reads the whole tables), only
        # that is kept
        if self.drained_prev and self.dirty is not None and (
                sum(len(k) for k, _ in self.drained_prev) // self.dirty.key_size
                > max(1024, len(cur) // 4)):
            self.drained_prev = None
        if full:  # what the read and the drain freed goes back before records are made
            bpfsys.release_freed()
        if not self.polled:
            self.first_ns = now_ns
        at = _Poll(start, now_ns)
        recs, gone = self._records(changed, cur, before, at)
        seen = set(changed) if everything else None
        del changed, before  # (the sort's keys below take the list's room)
        out = self._close_siblings(recs, cur, gone, at)
        del recs
        if include is None:
            keep = bytearray(map(Conn._moved, out))
        else:
            keep = bytearray(c._moved() and bool(include(c)) for c in out)
        if not all(keep):  # (the first poll keeps every record: no second list)
            out = list(itertools.compress(out, keep))
        del keep
        if everything:  # the entries that did not change, too (deltas 0)
            seen.update(c._id for c in out)
            seen.update(c._raw for c in out if len(c._id) == _SOCK_ID)
            out.extend(self._unchanged(seen, cur, at, include))
            del seen
        # by map id (the socket's address, or the record key): the order of
        # the maps, not of the decoded keys (sorting by those would decode
        # every record).  (Making the records in that order would spare the
        # sort keys, but visiting the entries in id order, not in the order
        # they lie in memory, made the first poll of 100k 70 ms slower.)
        out.sort(key=_BY_ID)
        # expiry: on the values this process holds (the kernel marks every
        # change, so an entry idle here is idle there), every full_every
        expire = now_ns >= self.next_full_ns
        if expire:
            self.next_full_ns = now_ns + self.full_every_ns
            idle, idle_socks = self._idle(cur, now_ns)
            if self.keep_expired:  # UDP flows, in conns or in their socket's entry
                flows = [(k, cur[k]) for k in idle if k[_PROTO_OFFSET] == _UDP]
                flows += [(i, v) for i, v in idle_socks if v[_PROTO_OFFSET] == _UDP]
                self.expired_udp.extend(Conn(i, v, v, at) for i, v in flows)
            gone.extend(idle)
        if gone:
            self.conns.delete_keys(gone)
        for key in gone:
            cur.pop(key, None)
        if full or expire:
            self._prune(cur)
        self.prev = cur
        self.tracked = len(cur)
        self.last_poll_full = full
        self.polled = True
        self.last_poll_seconds = time.time() - start
        return out

    def _records(self, changed, cur, prev, at):
        """The records of the changed entries (whether a counter moved is
        told later: Conn._moved), and the conns keys of ended records
        (deleted once reported)."""
        out, gone = [], []
        active, now_ns = self.active, at.now_ns
        sock_of = self.sock_of
        sock_of.fit(len(changed), cur, prev)  # (prev: the lives that ended this poll)
        slots, mask, added = sock_of.slots, sock_of.mask, 0
        first = not self.polled  # every entry is new: active since first_ns
        for i in changed:
            v = cur[i]
            old = prev.get(i)
            if not first:
                active[i] = now_ns
            if len(i) == _SOCK_ID:
                if v[_HAS_TUPLE] == _ZERO32:
                    continue
                if v[_PID] == _ZERO32:
                    continue  # incoming, not claimed by a process yet
                key = v[SOCK_INFO_TUPLE]
                h = hash(key)
                if slots[h & mask] is None:  # (sock_of.add, inline where the slot is free)
                    slots[h & mask] = i
                    added += 1
                else:
                    sock_of.add(h, i)
                if old is not None and old[SOCK_INFO_TUPLE] != key:
                    old = None
            else:
                key = i
                if old is None:  # an ended life that left socks since the last poll
                    h = hash(key)
                    for sk in sock_of.get(h):
                        was, now = prev.get(sk), cur.get(sk)
                        ours = False
                        if was is not None and was[SOCK_INFO_TUPLE] == key:
                            ours = True
                            if old is None:
                                old = was
                        if now is not None and now[SOCK_INFO_TUPLE] == key:
                            ours = True
                            del cur[sk]  # the socket's entry is gone from the kernel
                            now = None
                        if ours:
                            sock_of.discard(h, sk)
                            if now is not None and now[_HAS_TUPLE] != _ZERO32 and now[_PID] != _ZERO32:
                                # the socket's next life, where its slot is this one
                                sock_of.add(hash(now[SOCK_INFO_TUPLE]), sk)
                if v[_STATE_OFFSET] == _CLOSED:
                    gone.append(key)
            out.append(Conn(i, v, old, at))
        sock_of.n += added
        return out, gone

    def _unchanged(self, changed, cur, at, include):
        """Records of the entries in cur not in changed, deltas 0 (yielded:
        the caller's list is the only one)."""
        for i, v in cur.items():
            if i in changed:
                continue
            if len(i) == _SOCK_ID and (v[_HAS_TUPLE] == _ZERO32 or v[_PID] == _ZERO32):
                continue
            c = Conn(i, v, v, at)
            if include is None or include(c):
                yield c

    def _close_siblings(self, recs, cur, gone, at):
        """A record of a process that shares a socket (after fork) closes
        with the socket's life, however many processes shared it (the kernel
        closes the first SOCK_OTHERS itself): recs, with those records
        closed; they are deleted from conns after this poll."""
        ended = []
        for c in recs:
            i, v = c._id, c._v  # (as read: a socks value is not 72 bytes)
            if len(i) == _SOCK_ID:
                if v[_PROTO_OFFSET] != _TCP:
                    continue
                key = v[SOCK_INFO_TUPLE]
                closed = v[_SOCK_STATE_AT] == _CLOSED
            else:
                if i[_PROTO_OFFSET] != _TCP:
                    continue
                key = i
                closed = v[_STATE_OFFSET] == _CLOSED
            if closed:
                ended.append(_life(key))
            elif key in cur:  # an open conns record of TCP: a process sharing a socket
                self.siblings.setdefault(_life(key), set()).add(key)
        if not ended or not self.siblings:
            return recs
        now = dict((c._raw, c) for c in recs)
        for life in ended:
            for k in self.siblings.pop(life, ()):
                c = now.get(k)
                if c is None:
                    if cur.get(k) is None:
                        continue
                    c = now[k] = Conn(k, cur[k], cur[k], at)
                if not _closed(c._v):
                    c._closed_now()
                    gone.append(k)
        return list(now.values())

    def _idle(self, cur, now_ns):
        """Keys of the conns records idle past their protocol's limit, and
        (id, value) of the idle socks entries, which are deleted here (and
        dropped from cur).  Idle: no
        counter moved in any poll since the limit (the kernel marks every
        change, and reads no clock on the hot path)."""
        udp_before, tcp_before = now_ns - self.udp_idle_ns, now_ns - self.tcp_idle_ns
        active, first_ns = self.active, self.first_ns
        idle_socks, idle = [], []
        for i in cur:
            t = active.get(i, first_ns)
            if len(i) == _SOCK_ID:  # a socket's own entry: TCP life, or a UDP socket's first flow
                if t < (tcp_before if cur[i][_PROTO_OFFSET] == _TCP else udp_before):
                    idle_socks.append(i)
            elif t < (tcp_before if i[_PROTO_OFFSET] == _TCP else udp_before):
                idle.append(i)
        # only entries the kernel still holds as they were (not a new life)
        idle_socks = [i for i in idle_socks if _held(self.socks.lookup(i)) in (cur[i], None)]
        values = [(i, cur[i]) for i in idle_socks]
        if idle_socks:
            self.socks.delete_keys(idle_socks)
            for i, v in values:
                del cur[i]
                if v[_HAS_TUPLE] != _ZERO32:
                    self.sock_of.discard(hash(v[SOCK_INFO_TUPLE]), i)
        for i in idle_socks + idle:
            active.pop(i, None)
        self.expired += len(idle) + len(idle_socks)
        return idle, values

    def _prune(self, cur):
        """After a full read: forget what no longer exists."""
        if len(self.sock_of) > len(cur) + len(cur) // 8:  # stale ids
            self.sock_of.rebuild(len(self.sock_of.slots), cur)
        if len(self.active) > len(cur):
            for i in self.active.keys() - cur.keys():
                del self.active[i]
        for life in list(self.siblings):
            self.siblings[life] = set(k for k in self.siblings[life] if k in cur)
            if not self.siblings[life]:
                del self.siblings[life]
