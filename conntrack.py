"""conntrack: turn the conns map into connection records, poll after poll.

The kernel side only ever adds to running totals; this module never clears
a live entry.  Each poll reads every entry (batched where the kernel can),
computes what changed since the previous poll from the totals it remembers,
and reports each connection that opened, moved bytes, retransmitted or
closed.  Closed entries are deleted after they were reported once; idle ones
expire (UDP after udp_idle seconds, TCP without a close after tcp_idle).
"""

import socket
import struct
import time

# struct conn_tuple in tracer.bpf.h
CONN_TUPLE = struct.Struct("<16s16sIIHHBBH")
# struct conn_stats in tracer.bpf.h
CONN_STATS = struct.Struct("<QQQQIBBH16s")
# struct sock_info in tracer.bpf.h (the tuple first)
SOCK_INFO_TUPLE = slice(0, CONN_TUPLE.size)

PROTO_NAMES = {6: "tcp", 17: "udp"}
DIRECTIONS = {0: "unknown", 1: "outgoing", 2: "incoming"}
STATE_CLOSED = 2

# the telemetry map's slots (TELE_* in tracer.bpf.h)
TELEMETRY_NAMES = ("conn_lost", "sock_lost", "stash_lost", "tuple_mismatch", "tuple_checked",
                   "read_faults", "pending_lost", "_unused")

FIELDS = ("type", "time", "proto", "family", "pid", "comm", "laddr", "lport", "raddr", "rport",
          "netns", "sent_bytes", "recv_bytes", "sent_delta", "recv_delta", "retransmits",
          "state", "direction")


class Conn(object):
    """One connection of one process, as the JSON "conn" record."""

    __slots__ = FIELDS + ("key", "retransmits_delta", "first_seen")

    def as_dict(self):
        return dict((f, getattr(self, f)) for f in FIELDS)

    def __repr__(self):
        return "Conn(%s %s %s:%d -> %s:%d pid=%d sent=%d recv=%d %s)" % (
            self.proto, self.comm, self.laddr, self.lport, self.raddr, self.rport, self.pid,
            self.sent_bytes, self.recv_bytes, self.state)


def decode_tuple(key):
    saddr, daddr, netns, pid, sport, dport, family, proto, _ = CONN_TUPLE.unpack(key)
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


class ConnTable(object):
    def __init__(self, conns, socks, udp_idle=30.0, tcp_idle=600.0):
        self.conns = conns
        self.socks = socks
        self.udp_idle_ns = int(udp_idle * 1e9)
        self.tcp_idle_ns = int(tcp_idle * 1e9)
        self.prev = {}        # key -> (sent, recv, retransmits)
        self.decoded = {}     # key -> decoded tuple (cache)
        self.last_poll_seconds = 0.0
        self.tracked = 0
        self.expired = 0

    def poll(self, include=None):
        """Connections active since the previous poll (include: a filter
        on the decoded record)."""
        start = time.time()
        now_wall = start
        now_ns = monotonic_ns()
        items = self.conns.items()
        out = []
        seen = set()
        closed_keys = []
        expired_keys = []
        expired_tcp = set()
        prev = self.prev
        for key, value in items:
            sent, recv, first_ns, last_ns, retr, direction, state, _, comm = CONN_STATS.unpack(value)
            seen.add(key)
            old = prev.get(key)
            closed = state == STATE_CLOSED
            tup = self.decoded.get(key)
            if tup is None:
                tup = self.decoded[key] = decode_tuple(key)
            if closed:
                closed_keys.append(key)
            elif now_ns - last_ns > (self.tcp_idle_ns if tup[0] == "tcp" else self.udp_idle_ns):
                expired_keys.append(key)
                if tup[0] == "tcp":
                    expired_tcp.add(key)
            if old is not None and old == (sent, recv, retr) and not closed:
                continue
            prev[key] = (sent, recv, retr)
            c = Conn()
            c.key = key
            (c.proto, c.family, c.pid, c.laddr, c.lport, c.raddr, c.rport, c.netns) = tup
            c.type = "conn"
            c.time = round(now_wall, 3)
            c.comm = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
            c.sent_bytes, c.recv_bytes, c.retransmits = sent, recv, retr
            c.sent_delta = sent - (old[0] if old else 0)
            c.recv_delta = recv - (old[1] if old else 0)
            c.retransmits_delta = retr - (old[2] if old else 0)
            c.state = "closed" if closed else "open"
            c.direction = DIRECTIONS.get(direction, "unknown")
            c.first_seen = old is None
            if include is None or include(c):
                out.append(c)
        gone = closed_keys + expired_keys
        if gone:
            self.conns.delete_keys(gone)
            if expired_tcp:
                self._forget_socks(expired_tcp)
            self.expired += len(expired_keys)
        for key in gone:
            prev.pop(key, None)
            self.decoded.pop(key, None)
        if len(prev) > len(seen):  # deleted behind our back (e.g. another poller)
            for key in [k for k in prev if k not in seen]:
                del prev[key]
                self.decoded.pop(key, None)
        self.tracked = len(items) - len(gone)
        self.last_poll_seconds = time.time() - start
        return out

    def _forget_socks(self, keys):
        """Drop the socks entries of expired TCP connections."""
        stale = [k for k, v in self.socks.items() if v[SOCK_INFO_TUPLE] in keys]
        self.socks.delete_keys(stale)
