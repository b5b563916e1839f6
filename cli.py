"""cli: the command line of tracer-bpf (python3 tracer.py ...).

Parses the arguments, builds a tracer.Tracer, and every interval prints the
connections that were active in it: a table for a person (fixed columns
that fit the terminal) or NDJSON for a program.  --check reports what this
kernel offers without tracing.  Errors are one line on stderr and exit 1;
SIGINT and SIGTERM print the last partial interval, detach, and exit 0.
"""

import argparse
import ipaddress
import json
import os
import platform
import select
import shutil
import signal
import sys
import textwrap
import time
import traceback
import unicodedata

import backends
import bpfsys
import tracer

PROG = "tracer"

DESCRIPTION = """\
Trace TCP and UDP connections with eBPF and show, per connection, the bytes
sent and received: in each interval and in total since the tracer first saw
the connection.

How: a prebuilt BPF object (tracer.bpf.o) is loaded with raw bpf() and
perf_event_open() syscalls; the kernel's struct sock offsets are guessed at
start-up with loopback sockets (no kernel headers, no BTF, no compiler on
this host); the programs count bytes into a BPF hash map that this tool
polls every interval.

%(backends)s

What is counted: TCP over IPv4 and IPv6 (connect, accept, close, bytes the
kernel accepted on send, bytes copied to the user on receive, MSG_PEEK
excluded, retransmitted segments as tcpi_total_retrans counts them) and UDP
over IPv4 and IPv6, connected or not (payload bytes; the peer of every
datagram is its own, recv() and read() on an unconnected socket included).
A record is one connection life of one process: (pid, proto, family, local
addr:port, remote addr:port, network namespace) and which life of that
tuple it is, so a tuple reused within an interval shows twice.  The tuple
is the one the connection had while open: bytes read after a reset or a
half-close stay on it.  A record turns closed once, at TCP_CLOSE, and
never back; each process sharing a socket has its own.  comm is the
process name.  IPv4-mapped IPv6 is shown as IPv4.  A connection that opens,
transfers and closes between two intervals is still shown once, with its
bytes and state closed.  Idle UDP flows expire after --udp-idle seconds,
TCP records idle for --tcp-idle.  --pid, --tcp/--udp, -4/-6 and a single
port are applied in the kernel: filtered-out traffic creates no entry.

Requirements: Linux 5.8 or newer with BPF (x86_64), CAP_BPF and CAP_PERFMON (or
CAP_SYS_ADMIN; in practice root, for tracefs and cgroup2), tracefs
(mounted on demand).  Python 3.6 or newer, standard library only."""

EPILOG = """\
the screen (default):
  On a terminal the screen is redrawn each interval (-C appends; output that
  is not a terminal is appended).  A header line: time ("(final)" on the
  last interval), connections active in the interval and tracked in the
  kernel tables, bytes sent (TX) and received (RX) in the interval and
  their rate, lost (entries the kernel could not store: nothing is dropped
  silently), missed (when not 0), the backend.  Then one row per connection
  active in the interval, --sort order (most bytes first), capped to the
  terminal's height with a "+N more" line (--rows N):
    PID COMM        process id, name (up to 15 characters)
    PROTO           tcp or udp
    LADDR:LPORT     local address:port, [v6]:port for IPv6
    RADDR:RPORT     remote address:port; for UDP the datagrams' peer
    TX RX           bytes sent / received in the interval (TX/s RX/s: --rate)
    TXTOT RXTOT     bytes sent / received since first seen
    DUR             the connection's age (until it closed); - if its start
                    was not seen
    STATE           open or closed
  tcptop's PID COMM LADDR RADDR TX_KB RX_KB are PID COMM LADDR:LPORT
  RADDR:RPORT TX RX here (in bytes); tcplife's MS is DUR.
  Addresses are never cut: on a narrow terminal whole columns give way, in
  this order: TXTOT/RXTOT, STATE, the local address (LPORT stays), DUR,
  PROTO, LPORT; then COMM is narrowed.  Bytes are exact below 1024, then
  K, M, G, T (powers of 1024).
  -P: one row per process: PID COMM CONNS (open connections) TCP UDP TX RX
  (in the interval, or /s) TXTOT RXTOT (since the tracer started, ended
  connections included).

output (--json): one JSON object per line on stdout.  After each interval,
  one {"type": "conn", ...} per connection active in it (fields: time,
  proto, family, pid, comm, laddr, lport, raddr, rport, netns, sent_bytes,
  recv_bytes, sent_delta, recv_delta, retransmits, state, direction,
  start_time, duration: null where the start was not seen; TCP: end (how it
  ended: fin, reset_sent, reset_received, timeout, refused, connect_timeout,
  unreachable, aborted), failed_connects, resets_sent, resets_received,
  rtt_us, rtt_var_us (the kernel's smoothed RTT, as TCP_INFO)), or with -P one
  {"type": "process", ...} per process (pid, comm, conns, tcp, udp,
  sent_delta, recv_delta, sent_bytes, recv_bytes); then one
  {"type": "telemetry", ...} (tracked, lost, conn_lost, closed_lost,
  udp_lost, bytes_lost, stash_lost, shared_overflow, dirty_lost, missed,
  tuple_checked, tuple_mismatch, poll_seconds, ..., plus "interval": its
  1-based number, "records": records printed, "final": true on the last,
  "interval_seconds").  A line "tracer: tracing ..." on stderr says when
  tracing has started.

--events: one line per connection event as it happens instead of the table:
  time, event (connect, accept, close, connect_failed, udp_open,
  udp_expire), pid, comm, proto, local endpoint, > (outgoing) or <
  (incoming), remote endpoint, then for close and connect_failed the bytes,
  duration and how it ended, and the RTT.  --json: {"type": "event", ...}
  records (fields: event, time, proto, family, pid, comm, laddr, lport,
  raddr, rport, netns, direction, sent_bytes, recv_bytes, retransmits,
  start_time, duration, end, rtt_us, rtt_var_us) and each interval's
  telemetry record.  Events come through a BPF ring buffer (Linux 5.8+);
  telemetry counts them (events) and any the buffer had no room for
  (events_lost).  A FAIL column appears in the table when a connection
  failed or was reset.

--prometheus [ADDR:]PORT: http://ADDR:PORT/metrics in the Prometheus text
  format, next to the screen or JSON (alone with -q).  Counters
  tracer_sent_bytes_total, tracer_received_bytes_total,
  tracer_connections_opened_total, tracer_connections_closed_total,
  tracer_retransmits_total, labelled pid, comm, proto, direction, raddr and
  port (remote port of outgoing connections, local service port of
  incoming ones); at most --prometheus-max-series label sets, the rest
  folded into a series labelled "other" (tracer_series_folded_total);
  telemetry as gauges (tracer_tracked_connections, tracer_lost_entries,
  tracer_missed_probes, tracer_poll_seconds, ...).

ending: after count intervals, or on SIGINT (Ctrl-C) or SIGTERM, which
  print the last partial interval first.  Every probe is detached on exit.

exit status:
  0  traced until the end, or --check found that tracing works
  1  an error (no privilege, no BPF, backend unavailable, bad object file,
     offset guessing failed, no tracefs), one line on stderr saying what
     to do; with --check, the reason tracing cannot work
  2  bad arguments

examples:
  sudo python3 tracer.py                    # live view every 2 s until Ctrl-C
  sudo python3 tracer.py 5 12               # every 5 s, 12 times
  sudo python3 tracer.py -P --rate          # per process, bytes per second
  sudo python3 tracer.py --tcp --port 80,443 --sort total
  sudo python3 tracer.py --rport 5432 --raddr 10.0.0.0/8 --comm java
  sudo python3 tracer.py --pid 1234 -4      # one process, IPv4 only
  sudo python3 tracer.py --json 1 | jq 'select(.type=="conn")'
  sudo python3 tracer.py --events           # connections as they open and close
  sudo python3 tracer.py --prometheus :9464 -q   # a /metrics endpoint only
  sudo python3 tracer.py --backend kprobe   # force the kprobe backend
  sudo python3 tracer.py --check            # what works on this kernel"""


def _backends_help():
    """The Backends paragraph of --help, from backends.REGISTRY."""
    lines = ["Backends (--backend):"]
    wrap = lambda text: textwrap.wrap(text, 76, initial_indent=" " * 14,
                                      subsequent_indent=" " * 14)
    for b in backends.REGISTRY:
        body = wrap(b.summary)
        lines.append("  %-11s %s" % (b.name, body[0].lstrip()))
        lines.extend(body[1:])
    auto = wrap("(default) the first of %s that the kernel offers; the first line of the output "
                "and --check say which and why." % ", ".join(backends.NAMES))
    lines.append("  %-11s %s" % ("auto", auto[0].lstrip()))
    lines.extend(auto[1:])
    return "\n".join(lines)


DESCRIPTION = DESCRIPTION % {"backends": _backends_help()}


class CliError(Exception):
    """A one-line error for the user (printed as 'tracer: error: ...')."""


# --- arguments -----------------------------------------------------------

def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text)
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError("%r: must be more than 0 seconds" % text)
    return v


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    if v < 1:
        raise argparse.ArgumentTypeError("%r: must be 1 or more" % text)
    return v


def _port(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port number" % text)
    if not 0 < v < 65536:
        raise argparse.ArgumentTypeError("%r: a port is 1 to 65535" % text)
    return v


def _listed(convert):
    """An argparse type for comma-separated values: a list of convert()s
    (with action="append": a list of lists, flattened later)."""
    def parse(text):
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError("%r: an empty item in the list" % text)
        return [convert(t) for t in items]
    return parse


def _network(text):
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an address or CIDR (10.0.0.0/8, ::1)" % text)
    return text


def _comm(text):
    if len(text.encode("utf-8", "surrogateescape")) > 15:
        raise argparse.ArgumentTypeError("%r: a process name is at most 15 characters "
                                         "(bytes: the kernel's comm)" % text)
    return text


def _listen_address(text):
    import prometheus
    try:
        return prometheus.parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


SORT_KEYS = ("bytes", "total", "tx", "rx", "pid", "duration", "conns")


def parser():
    p = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        usage="sudo python3 tracer.py [options] [interval [count]]\n"
              "       python3 tracer.py --check [--json]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("interval_pos", nargs="?", type=_positive_float, metavar="interval",
                   help="seconds between outputs, as --interval")
    p.add_argument("count_pos", nargs="?", type=_positive_int, metavar="count",
                   help="number of outputs, as --count")
    p.add_argument("--interval", type=_positive_float, metavar="SECONDS",
                   help="seconds between outputs (default 2)")
    p.add_argument("--count", type=_positive_int, metavar="N",
                   help="stop after N intervals (default: until Ctrl-C or SIGTERM)")
    view = p.add_argument_group("what is shown")
    view.add_argument("-P", "--by-process", action="store_true",
                      help="one row per process (its connections, bytes and rates) instead of "
                           "one per connection")
    view.add_argument("--sort", choices=SORT_KEYS, default="bytes",
                      help="row order: bytes (in the interval, default), total (since first "
                           "seen), tx, rx (in the interval), pid, duration (connections: the "
                           "longest first), conns (-P: the most connections first)")
    view.add_argument("--rate", action="store_true",
                      help="TX/s and RX/s (bytes per second over the interval) instead of "
                           "bytes in the interval")
    view.add_argument("-C", "--scroll", action="store_true",
                      help="append each interval instead of redrawing the screen (the default "
                           "when stdout is not a terminal)")
    view.add_argument("--rows", type=_positive_int, metavar="N",
                      help="at most N rows an interval, then a '+M more' line (default: what "
                           "fits the terminal, never more on a redrawn screen; all when stdout "
                           "is not a terminal)")
    view.add_argument("--json", action="store_true",
                      help="NDJSON on stdout instead of the table (with --check: one JSON object)")
    view.add_argument("--events", action="store_true",
                      help="print connection events as they happen (connect, accept, close "
                           "with how it ended, connect_failed, udp_open, udp_expire) instead of "
                           "the table; with --json, event records and each interval's "
                           "telemetry")
    view.add_argument("-q", "--quiet", action="store_true",
                      help="print no intervals (with --prometheus: only serve the metrics)")
    filt = p.add_argument_group("filters (a connection must match every one given)")
    filt.add_argument("--pid", type=_positive_int, metavar="PID",
                      help="only this process's connections")
    proto = filt.add_mutually_exclusive_group()
    proto.add_argument("--tcp", action="store_true", help="only TCP")
    proto.add_argument("--udp", action="store_true", help="only UDP")
    fam = filt.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="ipv4_only", action="store_true", help="only IPv4")
    fam.add_argument("-6", dest="ipv6_only", action="store_true", help="only IPv6")
    filt.add_argument("--port", type=_listed(_port), action="append", metavar="PORT[,PORT]",
                      help="local or remote port is one of these (repeatable)")
    filt.add_argument("--lport", type=_listed(_port), action="append", metavar="PORT[,PORT]",
                      help="local port is one of these (repeatable)")
    filt.add_argument("--rport", type=_listed(_port), action="append", metavar="PORT[,PORT]",
                      help="remote port is one of these (repeatable)")
    filt.add_argument("--raddr", type=_listed(_network), action="append",
                      metavar="ADDR[/BITS][,...]",
                      help="remote address is one of these or in one of these networks "
                           "(repeatable)")
    filt.add_argument("--comm", type=_listed(_comm), action="append", metavar="NAME[,NAME]",
                      help="process name is one of these, exactly as shown in COMM (repeatable)")
    prom = p.add_argument_group("Prometheus")
    prom.add_argument("--prometheus", type=_listen_address, metavar="[ADDR:]PORT",
                      help="serve the counters on http://ADDR:PORT/metrics (all addresses "
                           "when ADDR is left out; port 0: any free port, said on stderr)")
    prom.add_argument("--prometheus-max-series", type=_positive_int, default=1000, metavar="N",
                      help="at most N label sets per metric; the rest fold into one series "
                           "labelled other, counted in tracer_series_folded_total "
                           "(default 1000)")
    tune = p.add_argument_group("tracing")
    tune.add_argument("--backend", choices=("auto",) + backends.NAMES, default="auto",
                      help="how to hook the kernel (default auto: see above)")
    tune.add_argument("--udp-idle", type=_positive_float, default=30.0, metavar="SECONDS",
                      help="forget a UDP flow idle this long (default 30)")
    tune.add_argument("--tcp-idle", type=_positive_float, default=600.0, metavar="SECONDS",
                      help="forget a TCP connection never seen closing, idle this long "
                           "(default 600)")
    tune.add_argument("--max-conns", type=_positive_int, metavar="N",
                      help="capacity of the kernel's tables (default 65536): N live TCP "
                           "sockets, and N other records (UDP flows, TCP connections ended "
                           "since the last poll, other processes' use of a shared socket); "
                           "what does not fit is counted in telemetry (conn_lost, closed_lost, "
                           "udp_lost, bytes_lost), never dropped silently")
    tune.add_argument("--check", action="store_true",
                      help="report the kernel, backends, hooks and guessed offsets; exit 0 if "
                           "tracing works, else 1")
    tune.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    tune.add_argument("--kprobe-method", choices=("auto", "pmu", "tracefs"), default="auto",
                      help="for developers: attach kprobes through the kprobe PMU, tracefs "
                           "kprobe_events, or auto (the PMU where present)")
    tune.add_argument("--object", metavar="PATH",
                      help="for developers: load this BPF object instead of tracer.bpf.o")
    return p


def parse_args(argv=None):
    """The arguments, checked together; argparse's exit 2 on bad ones."""
    p = parser()
    # the positional interval and count may stand among the options (3.7+)
    args = getattr(p, "parse_intermixed_args", p.parse_args)(argv)
    for name in ("interval", "count"):
        pos = getattr(args, name + "_pos")
        if pos is not None:
            if getattr(args, name) is not None:
                p.error("the %s is given twice (as --%s and as a positional argument)"
                        % (name, name))
            setattr(args, name, pos)
    if args.interval is None:
        args.interval = 2.0
    for name in ("port", "lport", "rport", "raddr", "comm"):
        lists = getattr(args, name)
        setattr(args, name, None if lists is None else sorted(set(sum(lists, []))))
    if args.sort == "conns" and not args.by_process:
        p.error("argument --sort: conns is for the per-process view (-P)")
    if args.sort == "duration" and args.by_process:
        p.error("argument --sort: duration is for the connection view (without -P)")
    if args.events and args.by_process:
        p.error("argument --events: not with -P (events are per connection)")
    if args.quiet and args.prometheus is None:
        p.error("argument -q/--quiet: only with --prometheus (else nothing would be shown)")
    return args


# --- formatting ----------------------------------------------------------

def human_bytes(n):
    """Exact below 1024, else K, M, G, T (powers of 1024), at most 4 chars."""
    if n < 1024:
        return str(n)
    v = float(n)
    for unit in "KMGTP":
        v /= 1024.0
        if v < 9.95:
            return "%.1f%s" % (v, unit)
        if v < 999.5:
            return "%d%s" % (int(round(v)), unit)
    return "%dE" % int(round(v / 1024.0))


def human_duration(seconds):
    """'-' for unknown, else at most 6 characters: 0.25s, 42.0s, 12m05s,
    3h07m, 5d04h."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return "%.2fs" % seconds
    if seconds < 60:
        return "%.1fs" % seconds
    s = int(seconds)
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def endpoint(addr, port):
    """'10.0.0.1:80', '[::1]:80': never shortened."""
    return ("[%s]:%d" if ":" in addr else "%s:%d") % (addr, port)


def shown(text):
    """A process name as the terminal gets it: every character that is not
    printable (an escape sequence, a newline: any process can name itself
    so), or that the output's encoding lacks, as a backslash escape:
    "\\x1b[2J" and not a cleared screen."""
    if text.isprintable() and _encodable(text):
        return text
    return "".join(c if c.isprintable() and _encodable(c) else
                   c.encode("unicode_escape").decode("ascii") for c in text)


# the encoding of the terminal or file the text output goes to (main sets it)
OUT_ENCODING = "utf-8"


def _encodable(text):
    try:
        text.encode(OUT_ENCODING)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def text_width(text):
    """Terminal columns text takes: East Asian wide characters two,
    combining marks none."""
    if text.isascii() if hasattr(text, "isascii") else all(ord(c) < 128 for c in text):
        return len(text)
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def fit(text, w, right=False):
    """text cut to at most w columns, then padded to w (right: aligned
    right)."""
    if text_width(text) > w:
        out, used = [], 0
        for c in text:
            cw = text_width(c)
            if used + cw > w:
                break
            out.append(c)
            used += cw
        text = "".join(out)
    pad = " " * (w - text_width(text))
    return pad + text if right else text + pad


def _duration_key(c):
    return -1.0 if c.duration is None else c.duration


# sort keys: the first item is the --sort choice, then ties by bytes
SORTS = {
    "bytes": lambda c: (-(c.sent_delta + c.recv_delta), -(c.sent_bytes + c.recv_bytes)),
    "total": lambda c: (-(c.sent_bytes + c.recv_bytes), -(c.sent_delta + c.recv_delta)),
    "tx": lambda c: (-c.sent_delta, -c.sent_bytes),
    "rx": lambda c: (-c.recv_delta, -c.recv_bytes),
    "pid": lambda c: (c.pid,),
    "duration": lambda c: (-_duration_key(c),),
    "conns": lambda c: (-c.conns, -(c.sent_delta + c.recv_delta)),
}


_PACK_OFFSET = 1 << 127  # |a key's int| < 2**127: sums and differences of u64 counters, pids


def _packed(first):
    """first(c)'s ints, then pid, lport and rport (32, 16, 16 bits), made
    one int that orders as their tuple does: about 80 bytes a row where the
    tuple of five ints took 240 (16 MB at 100,000 rows)."""
    def key(c):
        k = 0
        for x in first(c):
            k = (k << 128) | (x + _PACK_OFFSET)
        return (((k << 32 | c.pid) << 16 | getattr(c, "lport", 0)) << 16) | getattr(c, "rport", 0)
    return key


def sort_rows(rows, key="bytes"):
    first = SORTS[key]
    if key != "duration":  # (ints only: one int a row)
        try:
            return sorted(rows, key=_packed(first))
        except TypeError:  # (a field set to something else than an int)
            pass
    return sorted(rows, key=lambda c: first(c) + (c.pid, getattr(c, "lport", 0),
                                                  getattr(c, "rport", 0)))


class Column(object):
    """A table column: header, alignment, how to show a row, and when to
    give way on a narrow terminal (drop: dropped in rising order, 0 never;
    narrow: the least width it can be cut to, None: never cut)."""

    def __init__(self, head, align, show, drop=0, narrow=None):
        self.head, self.align, self.show, self.drop, self.narrow = head, align, show, drop, narrow


def _interval_bytes(attr, seconds):
    if seconds:
        return lambda c: human_bytes(int(round(getattr(c, attr) / seconds)))
    return lambda c: human_bytes(getattr(c, attr))


def conn_columns(rate_seconds=None):
    """The columns of the connection view; with rate_seconds, TX/s, RX/s."""
    suffix = "/s" if rate_seconds else ""
    return [
        Column("PID", ">", lambda c: str(c.pid)),
        Column("COMM", "<", lambda c: shown(c.comm), narrow=7),
        Column("PROTO", "<", lambda c: c.proto, drop=5),
        Column("LADDR:LPORT", "<", lambda c: endpoint(c.laddr, c.lport), drop=3),
        Column("LPORT", ">", lambda c: str(c.lport), drop=6),  # where LADDR:LPORT is dropped
        Column("RADDR:RPORT", "<", lambda c: endpoint(c.raddr, c.rport)),
        Column("TX" + suffix, ">", _interval_bytes("sent_delta", rate_seconds)),
        Column("RX" + suffix, ">", _interval_bytes("recv_delta", rate_seconds)),
        Column("TXTOT", ">", lambda c: human_bytes(c.sent_bytes), drop=1),
        Column("RXTOT", ">", lambda c: human_bytes(c.recv_bytes), drop=1),
        Column("DUR", ">", lambda c: human_duration(c.duration), drop=4),
        Column("STATE", "<", lambda c: c.state, drop=2),
    ]


# FAIL: how a failed or reset connection ended
FAIL_NAMES = {"refused": "refused", "connect_timeout": "timeout", "unreachable": "unreach",
              "reset_sent": "rst-out", "reset_received": "rst-in", "timeout": "timeout"}


def fail_column():
    return Column("FAIL", "<", lambda c: FAIL_NAMES.get(getattr(c, "end", None), "-"), drop=4.5)


def has_failures(conns):
    return any(getattr(c, "end", None) in FAIL_NAMES for c in conns)


def process_columns(rate_seconds=None):
    suffix = "/s" if rate_seconds else ""
    return [
        Column("PID", ">", lambda p: str(p.pid)),
        Column("COMM", "<", lambda p: shown(p.comm), narrow=7),
        Column("CONNS", ">", lambda p: str(p.conns)),
        Column("TCP", ">", lambda p: str(p.tcp), drop=2),
        Column("UDP", ">", lambda p: str(p.udp), drop=2),
        Column("TX" + suffix, ">", _interval_bytes("sent_delta", rate_seconds)),
        Column("RX" + suffix, ">", _interval_bytes("recv_delta", rate_seconds)),
        Column("TXTOT", ">", lambda p: human_bytes(p.sent_bytes), drop=1),
        Column("RXTOT", ">", lambda p: human_bytes(p.recv_bytes), drop=1),
    ]


def render_table(columns, rows, line_width):
    """The header line and one line per row, each at most line_width
    terminal columns: columns with a drop rank give way first (lowest rank
    first; LPORT is shown only where LADDR:LPORT gave way), then the
    narrowable ones are cut; an address is never cut."""
    cells = [[col.show(r) for col in columns] for r in rows]
    widths = [max([len(col.head)] + [text_width(row[i]) for row in cells]) for i, col in enumerate(columns)]
    on = [col.head != "LPORT" for col in columns]

    def total():
        return sum(w for w, s in zip(widths, on) if s) + sum(on) - 1

    for rank in sorted(set(c.drop for c in columns if c.drop)):
        if total() <= line_width:
            break
        for i, col in enumerate(columns):
            if col.drop == rank:
                on[i] = False
            if col.head == "LPORT" and columns[i - 1].drop == rank:
                on[i] = True  # the local port stays where its address goes
    for i, col in enumerate(columns):
        if on[i] and col.narrow is not None and total() > line_width:
            widths[i] = max(col.narrow, len(col.head), widths[i] - (total() - line_width))

    def line(values):
        out = [fit(v, w, col.align == ">") for col, w, s, v in zip(columns, widths, on, values) if s]
        return fit(" ".join(out).rstrip(), line_width).rstrip()

    return [line([c.head for c in columns])] + [line(r) for r in cells]


class Proc(object):
    """One row of the per-process view."""
    __slots__ = ("pid", "comm", "conns", "tcp", "udp", "sent_delta", "recv_delta",
                 "sent_bytes", "recv_bytes")

    def as_dict(self, now):
        d = dict((f, getattr(self, f)) for f in self.__slots__)
        d["type"], d["time"] = "process", now
        return d


class ProcessTotals(object):
    """Per-process totals from snapshots: the connections each process has
    now, and its bytes since the tracer first saw it (connections that
    ended included)."""

    def __init__(self):
        self.totals = {}   # pid -> [sent, recv]

    def update(self, conns):
        procs = {}
        for c in conns:
            p = procs.get(c.pid)
            if p is None:
                p = procs[c.pid] = Proc()
                p.pid, p.comm = c.pid, c.comm
                p.conns = p.tcp = p.udp = p.sent_delta = p.recv_delta = 0
            if c.state == "open":
                p.conns += 1
                if c.proto == "tcp":
                    p.tcp += 1
                else:
                    p.udp += 1
            p.sent_delta += c.sent_delta
            p.recv_delta += c.recv_delta
        totals = {}
        for pid, p in procs.items():
            t = self.totals.get(pid, (0, 0))
            totals[pid] = (t[0] + p.sent_delta, t[1] + p.recv_delta)
            p.sent_bytes, p.recv_bytes = totals[pid]
        # a process with no connection now keeps its totals while it lives
        # (its next connection adds to them); one that is gone is forgotten
        for pid, t in self.totals.items():
            if pid not in totals and os.path.exists("/proc/%d" % pid):
                totals[pid] = t
        self.totals = totals
        return list(procs.values())


def terminal_size(real=False):
    """(columns, lines) to lay the table out for (at least 40 x 5), or with
    real, the terminal's own."""
    size = shutil.get_terminal_size((80, 24))
    if real:
        return size.columns, size.lines
    return max(40, size.columns), max(5, size.lines)


def redraws(stream):
    """Whether the screen can be redrawn in place: a terminal that knows the
    cursor controls (not TERM=dumb, as in an editor's shell buffer)."""
    return stream.isatty() and os.environ.get("TERM", "") not in ("dumb", "")


def describe_filters(args):
    what = "TCP" if args.tcp else "UDP" if args.udp else "TCP and UDP"
    if args.ipv4_only:
        what += " over IPv4"
    elif args.ipv6_only:
        what += " over IPv6"
    for name, label in (("pid", "pid"), ("comm", "comm"), ("port", "port"), ("lport", "lport"),
                        ("rport", "rport"), ("raddr", "raddr")):
        v = getattr(args, name)
        if v:
            what += " %s %s" % (label, v if isinstance(v, int) else ",".join(map(str, v)))
    return what


# --- stopping on signals -------------------------------------------------

class Stopper(object):
    """SIGINT, SIGTERM and SIGHUP set a flag and wake wait() at once
    (through a wakeup pipe), so the last partial interval can still be
    printed and every probe detached."""

    def __init__(self):
        self.signum = None
        self._rfd, self._wfd = os.pipe()
        for fd in (self._rfd, self._wfd):
            os.set_blocking(fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wfd)
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def wait(self, seconds, fd=None):
        """Sleep up to seconds, or until fd is readable; True if a stop
        signal came."""
        deadline = time.monotonic() + seconds
        while self.signum is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ready = select.select([self._rfd] + ([fd] if fd is not None else []), [], [],
                                      left)[0]
            except InterruptedError:
                ready = []
            if fd is not None and fd in ready:
                break
            try:
                while os.read(self._rfd, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        return self.signum is not None

    def restore(self):
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old.items():
            signal.signal(s, h)
        os.close(self._rfd)
        os.close(self._wfd)


# --- tracing -------------------------------------------------------------

def open_tracer(args):
    return tracer.Tracer(backend=args.backend, tcp=not args.udp, udp=not args.tcp,
                         ipv4=not args.ipv6_only, ipv6=not args.ipv4_only, pid=args.pid,
                         port=args.port, lport=args.lport, rport=args.rport, raddr=args.raddr,
                         comm=args.comm, udp_idle=args.udp_idle, tcp_idle=args.tcp_idle,
                         max_conns=args.max_conns, obj_path=args.object,
                         kprobe_method=args.kprobe_method, events=getattr(args, "events", False))


# the terminal: cursor home, clear to the end of the line / of the screen
HOME, CLEAR_EOL, CLEAR_EOS = "\033[H", "\033[K", "\033[J"


class Output(object):
    """Writes each interval: a screen redrawn in place (a terminal), a
    table appended (-C, or stdout not a terminal), or NDJSON."""

    def __init__(self, args, tr, stream):
        self.args, self.tr, self.out = args, tr, stream
        self.intervals = 0
        self.live = redraws(stream) and not args.scroll and not args.json
        self.procs = ProcessTotals() if args.by_process else None
        self.last_at = time.monotonic()

    def start(self):
        msg = "tracing %s with the %s backend" % (describe_filters(self.args), self.tr.backend)
        if self.args.json or self.args.quiet or self.args.events:
            sys.stderr.write("%s: %s\n" % (PROG, msg))
            sys.stderr.flush()
            return
        msg = msg[0].upper() + msg[1:] + "; Ctrl-C to end."
        self.out.write(textwrap.fill(msg, terminal_size()[0]) + "\n")
        self.out.flush()

    def interval(self, conns, final=False):
        """conns: what Tracer.poll() (snapshot() with -P) returned."""
        self.intervals += 1
        now = time.monotonic()
        seconds, self.last_at = max(now - self.last_at, 1e-3), now
        tele = self.tr.telemetry()
        rows = self.procs.update(conns) if self.procs is not None else conns
        rows = sort_rows(rows, self.args.sort)
        if self.args.json:
            stamp = round(time.time(), 3)
            # a thousand lines at a time: 100,000 records as one string would
            # hold each line twice (~100 MB)
            for at in range(0, len(rows), 1000):
                self.out.write("".join(
                    json.dumps(r.as_dict(stamp) if self.procs is not None else r.as_dict()) + "\n"
                    for r in rows[at:at + 1000]))
            tele.update(interval=self.intervals, records=len(rows), final=final,
                        interval_seconds=round(seconds, 3))
            self.out.write(json.dumps(tele) + "\n")
        else:
            self.out.write(self.screen(rows, conns, tele, seconds, final))
        self.out.flush()

    def telemetry(self, final):
        """--events --json: the telemetry record of the interval."""
        tele = self.tr.telemetry()
        tele.update(interval=self.intervals, final=final)
        self.out.write(json.dumps(tele) + "\n")
        self.out.flush()

    def screen(self, rows, conns, tele, seconds, final):
        width, height = terminal_size()
        rate = seconds if self.args.rate else None
        columns = process_columns(rate) if self.procs is not None else conn_columns(rate)
        if self.procs is None and has_failures(rows):
            columns.append(fail_column())
        limit = self.args.rows
        fits = max(2, height - 3)  # header, column header, the cursor's line
        if limit is None and (self.live or self.out.isatty()):
            limit = fits
        elif limit is not None and self.live:
            limit = min(limit, fits)  # more would scroll the header away
        more = 0
        if limit is not None and len(rows) > limit:
            more, rows = len(rows) - (limit - 1), rows[:limit - 1]
        lines = [self.header(conns, rows, tele, seconds, final, width)]
        lines += render_table(columns, rows, width)
        if more:
            lines.append(("+%d more (%s)" % (more, "--rows, or a taller terminal, shows more"
                                             if self.live else "--rows shows more"))[:width])
        if self.live:
            # narrower or lower than the least the layout takes: lines cut at
            # the edge and the screen's last rows left out (a line that
            # wrapped would scroll the screen and garble every redraw)
            cols, high = terminal_size(real=True)
            lines = [fit(l, cols).rstrip() if text_width(l) > cols else l
                     for l in lines[:max(1, high - 1)]]
            return HOME + "".join(l + CLEAR_EOL + "\n" for l in lines) + CLEAR_EOS
        return "\n" + "\n".join(lines) + "\n"

    def header(self, conns, rows, tele, seconds, final, width):
        """One line: time, backend, what is shown, totals and rates."""
        sent = sum(c.sent_delta for c in conns)
        recv = sum(c.recv_delta for c in conns)
        if self.procs is not None:
            procs = len(set(c.pid for c in conns))
            opened = sum(1 for c in conns if c.state == "open")
            what = "%d process%s, %d connection%s" % (procs, "" if procs == 1 else "es",
                                                     opened, "" if opened == 1 else "s")
        else:  # tracked: in the kernel's tables at this poll, those closing now included
            what = "%d active, %d tracked" % (
                len(conns), tele["tracked"] + sum(1 for c in conns if c.state == "closed"))
        parts = [time.strftime("%H:%M:%S") + (" (final)" if final else ""), what,
                 "TX %s %s/s" % (human_bytes(sent), human_bytes(int(sent / seconds))),
                 "RX %s %s/s" % (human_bytes(recv), human_bytes(int(recv / seconds))),
                 "lost %d" % tele["lost"]]
        fails = sum(1 for c in conns if getattr(c, "end", None) in FAIL_NAMES)
        if fails:
            parts.append("fail %d" % fails)
        if tele.get("missed"):
            parts.append("missed %d" % tele["missed"])
        parts.append(self.tr.backend)
        line = parts[0]
        for p in parts[1:]:  # what does not fit is left out whole
            if len(line) + 2 + len(p) <= width:
                line += "  " + p
        return line


def event_line(e):
    """One event as a line of text: time, event, pid, comm, proto,
    endpoints, then what the event tells."""
    stamp = time.strftime("%H:%M:%S", time.localtime(e.time)) + (".%03d" % (e.time % 1 * 1000))
    out = "%s %-14s %7d %s %s %s %s %s" % (
        stamp, e.event, e.pid, fit(shown(e.comm), 15), e.proto, endpoint(e.laddr, e.lport),
        "<" if e.direction == "incoming" else ">", endpoint(e.raddr, e.rport))
    if e.event in ("close", "connect_failed", "udp_expire"):
        out += "  tx %s rx %s" % (human_bytes(e.sent_bytes), human_bytes(e.recv_bytes))
        if e.duration is not None:
            out += " dur %s" % human_duration(e.duration)
    if e.end:
        out += " " + e.end
    if e.retransmits:
        out += " retrans %d" % e.retransmits
    if e.rtt_us is not None:
        out += " rtt %.3fms" % (e.rtt_us / 1000.0)
    return out


def print_events(args, tr, stream):
    evs = tr.read_events()
    if evs:
        if args.json:
            stream.write("".join(json.dumps(e.as_dict()) + "\n" for e in evs))
        else:
            stream.write("".join(event_line(e) + "\n" for e in evs))
        stream.flush()


def _warn(text):
    sys.stderr.write("%s: warning: %s\n" % (PROG, text))
    sys.stderr.flush()


def trace(args):
    stopper = Stopper()
    tr = exporter = None
    try:
        if args.pid is not None and not os.path.exists("/proc/%d" % args.pid):
            _warn("no process has pid %d now; its connections show if it starts" % args.pid)
        tr = open_tracer(args)
        if stopper.signum is not None:  # stopped while starting: nothing was traced
            return 0
        if args.prometheus is not None:
            import prometheus
            exporter = prometheus.Exporter(max_series=args.prometheus_max_series)
            try:
                host, port = exporter.serve(*args.prometheus)
            except OSError as e:
                raise CliError("--prometheus %s:%d: %s" % (args.prometheus[0] or "*",
                                                           args.prometheus[1],
                                                           e.strerror or e))
            sys.stderr.write("%s: metrics on http://%s:%d/metrics\n" % (
                PROG, "[%s]" % host if ":" in host else host, port))
            sys.stderr.flush()
        out = Output(args, tr, sys.stdout)
        out.start()
        ring = tr.events_fd() if args.events else None
        next_at = time.monotonic() + args.interval
        while True:
            stopped = stopper.wait(next_at - time.monotonic(), ring)
            if ring is not None:
                print_events(args, tr, sys.stdout)
                if not stopped and time.monotonic() < next_at:
                    continue
            conns = tr.snapshot() if args.by_process else tr.poll()
            if stopper.signum == signal.SIGHUP:
                return 0  # the terminal is gone: nobody to print to
            last = stopped or (args.count is not None and out.intervals + 1 >= args.count)
            if exporter is not None:
                exporter.update(conns, tr.telemetry())
            if args.events:
                print_events(args, tr, sys.stdout)  # a poll may expire UDP flows
                out.intervals += 1
                if args.json:
                    out.telemetry(last)
            elif args.quiet:
                out.intervals += 1
            else:
                out.interval(conns, final=last)
            if last:
                return 0
            next_at += args.interval
            now = time.monotonic()
            if next_at < now:  # fell behind (suspended, slow terminal): restart the beat
                next_at = now + args.interval
    except BrokenPipeError:
        # the reader went away (| head): stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    finally:
        if exporter is not None:
            exporter.close()
        if tr is not None:
            tr.close()
        stopper.restore()


# --- --check -------------------------------------------------------------

def check(args):
    """Report what this kernel offers; 0 if a Tracer starts, else 1."""
    import backends
    uname = os.uname()
    rep = {"kernel": uname[2], "machine": platform.machine(), "python": platform.python_version(),
           "root": os.geteuid() == 0, "backends": {}, "backend": None, "backend_reason": None,
           "hooks": [], "offsets": None, "offset_notes": [], "offset_rounds": None,
           "guess_seconds": None, "startup_seconds": None, "ok": False, "error": None}
    missing = bpfsys.missing_capabilities()
    rep["missing_capabilities"] = missing
    if bpfsys.machine_error():
        rep["error"] = bpfsys.machine_error()
    elif missing:
        # and so does probing: tracefs is root-only, every backend would look missing
        rep["error"] = tracer.needs_privilege(missing)
    else:
        try:
            for name, (ok, why) in backends.availability().items():
                rep["backends"][name] = {"available": bool(ok), "why": why}
        except OSError as e:
            rep["error"] = "cannot read the kernel's tracing features: %s" % _error_text(e)
    if rep["error"] is None:
        tr = None
        try:
            tr = open_tracer(args)
            rep["backend"], rep["backend_reason"] = tr.backend, tr.backend_reason
            rep["hooks"] = [{"program": p, "kind": k, "target": t} for p, k, t in tr.plan]
            rep["offsets"] = tr.offsets.as_dict()
            rep["offset_notes"] = list(tr.offsets.notes) + list(tr.attach_notes)
            rep["offset_rounds"] = tr.offsets.rounds
            rep["guess_seconds"] = round(tr.offsets.seconds, 4)
            rep["startup_seconds"] = round(tr.ready_seconds, 4)
            rep["ok"] = True
        except Exception as e:
            if args.verbose:
                traceback.print_exc()
            rep["error"] = _error_text(e)
        finally:
            if tr is not None:
                tr.close()
    if args.json:
        sys.stdout.write(json.dumps(rep, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_check(rep))
    sys.stdout.flush()
    return 0 if rep["ok"] else 1


def format_check(rep):
    out = ["kernel:   Linux %s %s (python %s%s)" % (rep["kernel"], rep["machine"], rep["python"],
                                                    ", root" if rep["root"] else ", not root"),
           "backends:" + ("" if rep["backends"] else " not probed")]
    for name, b in sorted(rep["backends"].items()):
        out.append("  %-10s %-3s  %s" % (name, "yes" if b["available"] else "no", b["why"]))
    if rep["backend"]:
        out.append("chosen:   %s (%s)" % (rep["backend"], rep["backend_reason"]))
        out.append("hooks:    %d attached" % len(rep["hooks"]))
        for h in rep["hooks"]:
            out.append("  %-26s %-15s %s" % (h["program"], h["kind"], h["target"]))
        out.append("offsets:  guessed in %.3f s, %d probe sends" % (rep["guess_seconds"],
                                                                   rep["offset_rounds"]))
        names = sorted(rep["offsets"])
        for i in range(0, len(names), 4):
            out.append("  " + "  ".join("%-10s %4d" % (n, rep["offsets"][n]) for n in names[i:i + 4]))
        for note in rep["offset_notes"]:
            out.append("  note: %s" % note)
        out.append("startup:  %.3f s (load, guess, attach)" % rep["startup_seconds"])
    if rep["ok"]:
        out.append("result:   OK: tracing works (detached again)")
    else:
        out.append("result:   FAILED: %s" % rep["error"])
    return "\n".join(out) + "\n"


# --- main ----------------------------------------------------------------

def _error_text(e):
    if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
        what = e.strerror or str(e)
        if e.filename:
            what = "%s: %s" % (e.filename, what)
        return "%s (run with --verbose for details; --check says what this kernel offers)" % what
    return str(e)


def _escape_unencodable(stream):
    """stream, writing what its encoding cannot (a process name in Chinese
    to an ASCII terminal or PYTHONIOENCODING=ascii) as backslash escapes
    instead of failing."""
    if getattr(stream, "errors", None) != "strict" or not hasattr(stream, "buffer"):
        return stream
    if hasattr(stream, "reconfigure"):  # 3.7+
        stream.reconfigure(errors="backslashreplace")
        return stream
    import io
    return io.TextIOWrapper(stream.buffer, encoding=stream.encoding, errors="backslashreplace",
                            line_buffering=stream.line_buffering)


def main(argv=None):
    global OUT_ENCODING
    sys.stdout = _escape_unencodable(sys.stdout)
    OUT_ENCODING = getattr(sys.stdout, "encoding", None) or "utf-8"
    args = parse_args(argv)
    if sys.stdout is None:  # started with standard output closed
        if not args.quiet:
            sys.stderr.write("%s: error: standard output is closed: nothing to show the "
                             "connections on (-q with --prometheus needs none)\n" % PROG)
            return 1
        sys.stdout = open(os.devnull, "w")
    try:
        if args.check:
            return check(args)
        if bpfsys.machine_error():
            raise CliError(bpfsys.machine_error())
        missing = bpfsys.missing_capabilities()
        if missing:
            raise CliError(tracer.needs_privilege(missing))
        return trace(args)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        text = _error_text(e)
        if not isinstance(e, (CliError, tracer.TracerError, OSError)):
            # not an error we know: likely a bug, say how to see where
            text = "unexpected %s: %s (run with --verbose for the traceback, and report it)" % (
                type(e).__name__, e)
        sys.stderr.write("%s: error: %s\n" % (PROG, text))
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
