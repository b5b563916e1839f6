"""cli: the command line of tracer-bpf (python3 tracer.py ...).

Parses the arguments, builds a tracer.Tracer, and every interval prints the
connections that were active in it: a table for a person (fixed columns
that fit the terminal) or NDJSON for a program.  --check reports what this
kernel offers without tracing.  Errors are one line on stderr and exit 1;
SIGINT and SIGTERM print the last partial interval, detach, and exit 0.
"""

import argparse
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

Backends (--backend):
  tracepoint  stable tracepoints only: sock:sock_send_length,
              sock:sock_recv_length, sock:inet_sock_set_state,
              sock:sk_data_ready, tcp:tcp_retransmit_skb,
              tcp:tcp_destroy_sock, and cgroup sendmsg/recvmsg hooks for the
              UDP message address (syscall tracepoints where cgroup2 cannot
              be used).  Needs Linux 6.3 or newer; works on kernels built
              without kprobes.
  kprobe      kprobes and kretprobes on tcp_sendmsg, tcp_recvmsg,
              udp_sendmsg, skb_consume_udp, ... (kprobe PMU, else tracefs
              kprobe_events with unique names removed on exit; kretprobes
              through tracefs with a large maxactive) and the tcp
              tracepoints.  Any kernel with CONFIG_KPROBES.
  auto        (default) tracepoint where the kernel has it, else kprobe; the
              first line of the output and --check say which and why.

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
TCP records idle for --tcp-idle.  --pid, --port, --tcp/--udp, -4/-6 are
applied in the kernel: filtered-out traffic creates no entry.

Requirements: Linux with BPF (x86_64), root (CAP_BPF and CAP_PERFMON), and
tracefs (mounted on demand).  Python 3.6 or newer, standard library only."""

EPILOG = """\
output (table):
  The first line says which backend traces and why.  Then, every interval,
  a header line: time, backend, conns (connections tracked in the kernel
  table), shown (rows below), lost (entries lost because a BPF map was
  full; nothing is dropped silently).  One row per connection active in the
  interval, most bytes in the interval first:
    PID COMM PROTO          process id, name, tcp or udp
    LADDR:LPORT RADDR:RPORT local and remote address:port (long addresses
                            are shortened in the middle to fit the terminal)
    TX RX                   bytes sent / received in the interval
    TXTOT RXTOT             bytes sent / received in total, since first seen
    STATE                   open or closed
  Byte counts below 1024 are exact; above, K, M, G, T (powers of 1024).

output (--json): one JSON object per line on stdout.  After each interval,
  one {"type": "conn", ...} per connection active in it (fields: time,
  proto, family, pid, comm, laddr, lport, raddr, rport, netns, sent_bytes,
  recv_bytes, sent_delta, recv_delta, retransmits, state, direction,
  start_time, duration: null where the start was not seen), then
  one {"type": "telemetry", ...} (tracked, lost, conn_lost, closed_lost,
  udp_lost, bytes_lost, stash_lost, shared_overflow, dirty_lost, missed,
  tuple_checked, tuple_mismatch,
  poll_seconds, ..., plus "interval": its 1-based number,
  "records": conn records printed, "final": true on the last).  A line
  "tracer: tracing ..." on stderr says when tracing has started.

ending: after --count intervals, or on SIGINT (Ctrl-C) or SIGTERM, which
  print the last partial interval first.  Every probe is detached on exit.

exit status:
  0  traced until the end, or --check found that tracing works
  1  an error (not root, no BPF, backend unavailable, bad object file,
     offset guessing failed, no tracefs), one line on stderr saying what
     to do; with --check, the reason tracing cannot work
  2  bad arguments

examples:
  sudo python3 tracer.py                    # table every 2 s until Ctrl-C
  sudo python3 tracer.py --interval 5 --count 12
  sudo python3 tracer.py --tcp --port 443   # TCP to or from port 443
  sudo python3 tracer.py --pid 1234 -4      # one process, IPv4 only
  sudo python3 tracer.py --json --interval 1 | jq 'select(.type=="conn")'
  sudo python3 tracer.py --backend kprobe   # force the kprobe backend
  sudo python3 tracer.py --check            # what works on this kernel"""


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


def parser():
    p = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        usage="sudo python3 tracer.py [options]   or   python3 tracer.py --check [--json]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS",
                   help="seconds between outputs (default 2)")
    p.add_argument("--count", type=_positive_int, metavar="N",
                   help="stop after N intervals (default: until Ctrl-C or SIGTERM)")
    p.add_argument("--json", action="store_true",
                   help="NDJSON on stdout instead of the table (with --check: one JSON object)")
    p.add_argument("--backend", choices=("auto", "kprobe", "tracepoint"), default="auto",
                   help="how to hook the kernel (default auto: see above)")
    p.add_argument("--pid", type=_positive_int, metavar="PID",
                   help="only this process's connections")
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--tcp", action="store_true", help="only TCP")
    proto.add_argument("--udp", action="store_true", help="only UDP")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="ipv4_only", action="store_true", help="only IPv4")
    fam.add_argument("-6", dest="ipv6_only", action="store_true", help="only IPv6")
    p.add_argument("--port", type=_port, metavar="PORT",
                   help="only connections with this local or remote port")
    p.add_argument("--udp-idle", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="forget a UDP flow idle this long (default 30)")
    p.add_argument("--tcp-idle", type=_positive_float, default=600.0, metavar="SECONDS",
                   help="forget a TCP connection never seen closing, idle this long (default 600)")
    p.add_argument("--max-conns", type=_positive_int, metavar="N",
                   help="capacity of the kernel's tables (default 65536): N live TCP "
                        "sockets, and N other records (UDP flows, TCP connections ended since "
                        "the last poll, other processes' use of a shared socket); what does "
                        "not fit is counted in telemetry (conn_lost, closed_lost, udp_lost, "
                        "bytes_lost), never dropped silently")
    p.add_argument("--check", action="store_true",
                   help="report the kernel, backends, hooks and guessed offsets; exit 0 if "
                        "tracing works, else 1")
    p.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    p.add_argument("--kprobe-method", choices=("auto", "pmu", "tracefs"), default="auto",
                   help="for developers: attach kprobes through the kprobe PMU, tracefs "
                        "kprobe_events, or auto (the PMU where present)")
    p.add_argument("--object", metavar="PATH",
                   help="for developers: load this BPF object instead of tracer.bpf.o")
    return p


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


def ellipsize(text, width):
    """text shortened in the middle to width, keeping both ends."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    if width <= 3:
        return text[:width]
    head = (width - 2) // 2
    tail = width - 2 - head
    return text[:head] + ".." + text[len(text) - tail:]


def endpoint(addr, port, width=None):
    """'addr:port' ('[v6]:port' is avoided: columns separate endpoints);
    shortened in the address, never in the port."""
    tail = ":%d" % port
    if width is None or len(addr) + len(tail) <= width:
        return addr + tail
    return ellipsize(addr, max(1, width - len(tail))) + tail


def sort_key(c):
    return (-(c.sent_delta + c.recv_delta), -(c.sent_bytes + c.recv_bytes), c.pid, c.lport)


# (header, align) of each column; widths are fitted to the rows
COLUMNS = (("PID", ">"), ("COMM", "<"), ("PROTO", "<"), ("LADDR:LPORT", "<"),
           ("RADDR:RPORT", "<"), ("TX", ">"), ("RX", ">"), ("TXTOT", ">"), ("RXTOT", ">"),
           ("STATE", "<"))
COMM_MAX, COMM_MIN = 12, 7
ADDR_MIN = 12


def table_rows(conns, width):
    """Header and rows (strings, none longer than width where the
    connection fits at all) for these connections, in sort order."""
    cells = []
    for c in sorted(conns, key=sort_key):
        cells.append([str(c.pid), c.comm, c.proto, (c.laddr, c.lport), (c.raddr, c.rport),
                      human_bytes(c.sent_delta), human_bytes(c.recv_delta),
                      human_bytes(c.sent_bytes), human_bytes(c.recv_bytes), c.state])
    widths = [len(h) for h, _ in COLUMNS]
    for row in cells:
        for i, v in enumerate(row):
            n = len(endpoint(*v)) if isinstance(v, tuple) else len(v)
            widths[i] = max(widths[i], n)
    widths[1] = min(widths[1], COMM_MAX)
    # shrink to the terminal: COMM first, then the addresses, local first
    over = sum(widths) + len(widths) - 1 - width
    if over > 0:
        cut = min(over, widths[1] - max(COMM_MIN, len("COMM")))
        widths[1] -= max(0, cut)
        over -= max(0, cut)
    while over > 0 and max(widths[3], widths[4]) > ADDR_MIN:
        widths[3 if widths[3] >= widths[4] else 4] -= 1  # the longer, local on a tie
        over -= 1
    if over > 0:  # a very narrow terminal: share what is left
        for i in (3, 4):
            cut = min(over, widths[i] - len("RADDR:RPORT"))
            if cut > 0:
                widths[i] -= cut
                over -= cut

    def line(values):
        out = []
        for (head, align), w, v in zip(COLUMNS, widths, values):
            if isinstance(v, tuple):
                v = endpoint(v[0], v[1], w)
            out.append(("%" + ("-" if align == "<" else "") + "*s") % (w, v[:w]))
        return " ".join(out).rstrip()

    return [line([h for h, _ in COLUMNS])] + [line(r) for r in cells]


def terminal_width():
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def describe_filters(args):
    what = "TCP" if args.tcp else "UDP" if args.udp else "TCP and UDP"
    if args.ipv4_only:
        what += " over IPv4"
    elif args.ipv6_only:
        what += " over IPv6"
    if args.pid:
        what += " of pid %d" % args.pid
    if args.port:
        what += " on port %d" % args.port
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

    def wait(self, seconds):
        """Sleep up to seconds; True if a stop signal came."""
        deadline = time.monotonic() + seconds
        while self.signum is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([self._rfd], [], [], left)
            except InterruptedError:
                pass
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
    import tracer
    return tracer.Tracer(backend=args.backend, tcp=not args.udp, udp=not args.tcp,
                         ipv4=not args.ipv6_only, ipv6=not args.ipv4_only, pid=args.pid,
                         port=args.port, udp_idle=args.udp_idle, tcp_idle=args.tcp_idle,
                         max_conns=args.max_conns, obj_path=args.object,
                         kprobe_method=args.kprobe_method)


class Output(object):
    """Writes each interval as a table or as NDJSON, flushed."""

    def __init__(self, args, tr, stream):
        self.args, self.tr, self.out = args, tr, stream
        self.intervals = 0

    def start(self):
        what = describe_filters(self.args)
        msg = "Tracing %s with the %s backend (%s)." % (what, self.tr.backend, self.tr.backend_reason)
        if self.args.json:
            sys.stderr.write("%s: %s\n" % (PROG, msg[0].lower() + msg[1:]))
            sys.stderr.flush()
            return
        msg += " Ctrl-C to end."
        self.out.write(textwrap.fill(msg, terminal_width()) + "\n")
        self.out.flush()

    def interval(self, conns, final=False):
        """conns: what Tracer.poll() returned (filters applied)."""
        self.intervals += 1
        tele = self.tr.telemetry()
        if self.args.json:
            lines = [json.dumps(c.as_dict()) for c in sorted(conns, key=sort_key)]
            tele["interval"] = self.intervals
            tele["records"] = len(conns)
            tele["final"] = final
            lines.append(json.dumps(tele))
        else:
            width = terminal_width()
            # conns: in the kernel table at this poll, those closing now included
            tracked = tele["tracked"] + sum(1 for c in conns if c.state == "closed")
            head = "%s backend=%s conns=%d shown=%d lost=%d" % (
                time.strftime("%H:%M:%S"), self.tr.backend, tracked, len(conns), tele["lost"])
            if final:
                head += " (final)"
            lines = ["", head] + table_rows(conns, width)
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def trace(args):
    stopper = Stopper()
    tr = None
    try:
        tr = open_tracer(args)
        if stopper.signum is not None:  # stopped while starting: nothing was traced
            return 0
        out = Output(args, tr, sys.stdout)
        out.start()
        next_at = time.monotonic() + args.interval
        while True:
            stopped = stopper.wait(next_at - time.monotonic())
            conns = tr.poll()
            if stopper.signum == signal.SIGHUP:
                return 0  # the terminal is gone: nobody to print to
            last = stopped or (args.count is not None and out.intervals + 1 >= args.count)
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
    if not rep["root"]:
        # tracefs is root-only: without root every backend would look missing
        rep["error"] = "tracing needs root (CAP_BPF and CAP_PERFMON), and so does probing " \
                       "the backends: run it with sudo"
    else:
        try:
            for name, (ok, why) in sorted(backends.availability().items()):
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


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.check:
            return check(args)
        if os.geteuid() != 0:
            raise CliError("tracing needs root (CAP_BPF and CAP_PERFMON): run it with sudo")
        return trace(args)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        import tracer
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
