"""events: connection events as they happen (the events ring buffer).

The kernel pushes one struct conn_event (tracer.bpf.h) per TCP connect,
accept, close and failed connect, and per new UDP flow, into a BPF ring
buffer that user space memory-maps (bpfsys.RingBuffer); UDP flows that
expire are added by the poll that expires them.  Nothing is dropped
silently: an event the ring buffer had no room for is counted in
telemetry (events_lost).
"""

import time

import abi
import conntrack

UDP_EXPIRE = "udp_expire"   # from user space: a UDP flow idle past --udp-idle

FIELDS = ("type", "event", "time", "proto", "family", "pid", "comm", "laddr", "lport", "raddr",
          "rport", "netns", "direction", "sent_bytes", "recv_bytes", "retransmits", "start_time",
          "duration", "end", "rtt_us", "rtt_var_us")


class Event(object):
    """One connection event, as the JSON "event" record.

      type        "event"
      event       "connect" (outgoing TCP established), "accept" (incoming
                  TCP, when its process accepts or first uses it),
                  "close" (TCP_CLOSE of an established connection),
                  "connect_failed" (closed before it was established),
                  "udp_open" (a UDP flow's first datagram), "udp_expire"
                  (a UDP flow idle past udp_idle, seen by a poll)
      time        float, Unix time of the event
      proto, family, pid, comm, laddr, lport, raddr, rport, netns, direction
                  as in a Conn record
      sent_bytes, recv_bytes, retransmits  the connection's totals at the event
      start_time, duration  its start and age (None where the start was not seen)
      end         close and connect_failed: how it ended (see Conn.end)
      rtt_us, rtt_var_us  TCP: the kernel's smoothed RTT and variance at the
                  event (None where unknown)
    """

    __slots__ = FIELDS + ("key",)

    def as_dict(self):
        return dict((f, getattr(self, f)) for f in FIELDS)

    def __repr__(self):
        return "Event(%s %s %s %s -> %s pid=%d)" % (
            self.event, self.proto, self.comm, conntrack.format_endpoint(self.laddr, self.lport),
            conntrack.format_endpoint(self.raddr, self.rport), self.pid)


def decode(raw, now=None, now_ns=None):
    """The Event of one struct conn_event (bytes); now, now_ns: the wall
    clock and the kernel's monotonic clock read together."""
    if now is None:
        now, now_ns = time.time(), conntrack.monotonic_ns()
    r = abi.CONN_EVENT.unpack(raw)
    ts, first_ns = r.ts_ns, r.first_ns
    e = Event()
    e.key = conntrack.decode_tuple(r.tuple)
    e.proto, e.family, e.pid, e.laddr, e.lport, e.raddr, e.rport, e.netns, _ = e.key
    e.type = "event"
    e.event = abi.EVENT_KINDS.get(r.type, str(r.type))
    e.time = round(now - (now_ns - ts) / 1e9, 6)
    e.comm = r.comm.split(b"\0", 1)[0].decode("utf-8", "replace")
    e.direction = abi.DIRECTIONS.get(r.direction, "unknown")
    e.sent_bytes, e.recv_bytes, e.retransmits = r.sent_bytes, r.recv_bytes, r.retransmits
    if r.seen_start:
        e.start_time = round(now - (now_ns - first_ns) / 1e9, 6)
        e.duration = round(max(0, ts - first_ns) / 1e9, 6)
    else:
        e.start_time = e.duration = None
    e.end = abi.ENDS.get(r.end) if r.type in (abi.EV_CLOSE, abi.EV_CONNECT_FAILED) else None
    e.rtt_us, e.rtt_var_us = (r.rtt_us, r.rtt_var_us) if r.rtt_us else (None, None)
    return e


def expired(conn, now):
    """The udp_expire Event of a UDP record (a conntrack.Conn) that a poll
    expired."""
    e = Event()
    for f in FIELDS:
        if hasattr(conn, f) and f not in ("type", "time"):
            setattr(e, f, getattr(conn, f))
    e.key = conn.key
    e.type, e.event, e.time = "event", UDP_EXPIRE, round(now, 6)
    e.end = None
    e.rtt_us = e.rtt_var_us = None
    return e
