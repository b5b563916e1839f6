"""prometheus: the tracer's counters on an HTTP /metrics endpoint, in the
Prometheus text exposition format (version 0.0.4), standard library only.

    exp = prometheus.Exporter(max_series=1000)
    host, port = exp.serve("0.0.0.0", 9100)   # a daemon thread serves GET /metrics
    exp.update(tracer.poll(), tracer.telemetry())   # after each poll
    exp.close()                                # stops the server, frees the port

Counters (accumulated here from each record's deltas, so that they stay
monotonic after a connection closes and leaves the tracer's tables):
tracer_sent_bytes_total, tracer_received_bytes_total,
tracer_connections_opened_total (records reported for the first time),
tracer_connections_closed_total (records reported closed, counted once
each), tracer_retransmits_total (the records' retrans_delta),
tracer_failed_connects_total, tracer_resets_sent_total and
tracer_resets_received_total (counted when the record closes).  Their labels:

    pid, comm, proto   the process and the protocol
    direction          outgoing, incoming or unknown (as the record's)
    raddr              the remote address
    port               the service port: the remote port of an outgoing
                       connection, the local port of an incoming one (an
                       incoming client's ephemeral port would make a series
                       per connection), and the lower of the two where the
                       direction is unknown (UDP, connections opened before
                       the tracer): service ports are the low ones

Bounded label set: at most max_series label sets have a series of their
own.  When a new one comes and none is free, the least recently active
series is dropped if it has been idle for idle_seconds (default 10 min),
else the record is folded into the one series whose labels are all
"other".  A dropped series' counts move into "other", so the sum of a
counter over all series never goes down and "other" stays monotonic.
tracer_series_folded_total counts the records folded (one per connection
per poll that it was reported in), tracer_series_dropped_total the series
dropped.  Telemetry (Tracer.telemetry()) is exported as gauges.
"""

import collections
import http.server
import re
import socket
import socketserver
import threading
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ("pid", "comm", "proto", "direction", "raddr", "port")
OTHER = ("other",) * len(LABELS)
# the per-series counters, in the order of _Series.counts
COUNTERS = (
    ("tracer_sent_bytes_total", "Bytes sent (accepted by the kernel on send; UDP payload)."),
    ("tracer_received_bytes_total", "Bytes received (copied to the process; UDP payload)."),
    ("tracer_connections_opened_total",
     "Connections reported for the first time (opened, or already open when tracing began)."),
    ("tracer_connections_closed_total", "Connections reported closed."),
    ("tracer_retransmits_total", "TCP segments retransmitted."),
    ("tracer_failed_connects_total",
     "TCP connect() attempts that never established (refused, timed out, unreachable)."),
    ("tracer_resets_sent_total", "TCP connections ended by a reset this host sent."),
    ("tracer_resets_received_total", "TCP connections ended by a reset the peer sent."),
)
LABEL_HELP = (" port: the remote port of outgoing connections, the local port of incoming ones, "
              "the lower of the two where the direction is unknown; labels all \"other\" "
              "beyond max_series label sets.")
# (telemetry field, gauge, help)
GAUGES = (
    ("tracked", "tracer_tracked_connections", "Connection records in the kernel tables."),
    ("lost", "tracer_lost_entries",
     "Entries the kernel could not store because a table was full, since tracing began."),
    ("bytes_lost", "tracer_lost_bytes", "Bytes of the entries lost, since tracing began."),
    ("missed", "tracer_missed_probes", "Probe hits the tracer's programs did not run for."),
    ("expired", "tracer_expired_connections", "Idle connection records expired."),
    ("tuple_mismatch", "tracer_offset_mismatches",
     "Run-time cross-checks of the guessed struct sock offsets that failed."),
    ("poll_seconds", "tracer_poll_seconds", "Seconds the last poll of the kernel tables took."),
)
# records counted closed, remembered: a snapshot, or a closed socket that
# still moves bytes (read after a reset), reports one again
_CLOSED_MEMORY = 4096


class _Series(object):
    """One label set: its counters, when it last moved, its label text."""

    __slots__ = ("counts", "last", "text")

    def __init__(self, labels, now):
        self.counts = [0] * len(COUNTERS)
        self.last = now
        self.text = ",".join('%s="%s"' % (n, escape(v)) for n, v in zip(LABELS, labels))


def escape(value):
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels_of(c):
    """The label values of a record (see the module docstring for port)."""
    if c.direction == "outgoing":
        port = c.rport
    elif c.direction == "incoming":
        port = c.lport
    else:
        port = min(c.lport, c.rport)
    return (str(c.pid), c.comm, c.proto, c.direction, c.raddr, str(port))


def parse_address(text):
    """--prometheus [ADDR:]PORT -> (host, port).  "9100" and ":9100" listen
    on every IPv4 address (0.0.0.0, as node_exporter's ":9100"); "[::]:9100"
    on every address; IPv6 addresses go in brackets.  Port 0 picks a free
    port.  ValueError (one line) on anything else."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket:
            raise ValueError("%r: unbalanced brackets" % text)
        if not port.startswith(":"):
            raise ValueError("%r: a port must follow the address, as in [::1]:9100" % text)
        port = port[1:]
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise ValueError("%r: %r is not an IPv6 address" % (text, host))
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("%r: an IPv6 address goes in brackets, as in [::1]:9100" % text)
        if "[" in host or "]" in host:
            raise ValueError("%r: unbalanced brackets" % text)
    if not re.match(r"^[0-9]{1,5}$", port) or int(port) > 65535:
        raise ValueError("%r: the port must be a number from 0 to 65535" % text)
    return host or "0.0.0.0", int(port)


class Exporter(object):
    """The counters of the records it is given, and the HTTP server that
    shows them.  update() and render() may run in different threads."""

    def __init__(self, max_series=1000, idle_seconds=600.0):
        if max_series < 1:
            raise ValueError("max_series must be 1 or more")
        self.max_series = max_series
        self.idle_seconds = idle_seconds
        self.series = collections.OrderedDict()  # labels -> _Series, least recently active first
        self.other = None                        # the "other" _Series, once used
        self.folded = self.dropped = 0
        self.telemetry = {}
        self.url = None
        self._closed = collections.OrderedDict()  # keys of the latest records counted closed
        self._lock = threading.Lock()
        self._server = self._thread = None

    def update(self, conns, telemetry=None, now=None):
        """Count one poll's records (Tracer.poll()); telemetry: the
        Tracer.telemetry() dict; now: time.monotonic() by default."""
        if now is None:
            now = time.monotonic()
        with self._lock:
            recs = [(labels_of(c), c) for c in conns]
            for labels, _ in recs:  # first: no series of this poll is dropped as idle
                s = self.series.get(labels)
                if s is not None:
                    s.last = now
                    self.series.move_to_end(labels)
            for labels, c in recs:
                s = self._series_for(labels, now)
                n = s.counts
                n[0] += c.sent_delta
                n[1] += c.recv_delta
                n[2] += bool(c.first_seen)
                closing = self._closing(c)
                n[3] += closing
                n[4] += c.retrans_delta
                if closing:
                    n[5] += getattr(c, "failed_connects", 0)
                    n[6] += getattr(c, "resets_sent", 0)
                    n[7] += getattr(c, "resets_received", 0)
            if telemetry is not None:
                self.telemetry = dict(telemetry)

    def _series_for(self, labels, now):
        s = self.series.get(labels)
        if s is None:
            if len(self.series) < self.max_series or self._drop_idle(now):
                s = self.series[labels] = _Series(labels, now)
            else:
                self.folded += 1
                s = self._other(now)
        return s

    def _drop_idle(self, now):
        """Move the least recently active series into "other" if it has
        been idle long enough; True if it was."""
        labels, s = next(iter(self.series.items()))
        if now - s.last < self.idle_seconds:
            return False
        del self.series[labels]
        other = self._other(now)
        other.counts = [a + b for a, b in zip(other.counts, s.counts)]
        self.dropped += 1
        return True

    def _other(self, now):
        if self.other is None:
            self.other = _Series(OTHER, now)
        return self.other

    def _closing(self, c):
        """1 the first time a record is reported closed, else 0."""
        if c.state != "closed" or c.key in self._closed:
            return 0
        self._closed[c.key] = True
        if len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)
        return 1

    def render(self):
        """The /metrics body."""
        with self._lock:
            rows = [self.series[k] for k in sorted(self.series)]
            if self.other is not None:
                rows.append(self.other)
            out = []
            for i, (name, text) in enumerate(COUNTERS):
                out += ["# HELP %s %s%s" % (name, text, LABEL_HELP), "# TYPE %s counter" % name]
                out += ["%s{%s} %d" % (name, s.text, s.counts[i]) for s in rows]
            out += _family("tracer_series_folded_total", "counter",
                           "Records (one per connection per poll) counted in the \"other\" "
                           "series because max_series label sets were in use.", self.folded)
            out += _family("tracer_series_dropped_total", "counter",
                           "Series idle too long whose counts moved into \"other\" to make room.",
                           self.dropped)
            out += _family("tracer_series", "gauge",
                           "Label sets with a series of their own (at most max_series).",
                           len(self.series))
            for field, name, text in GAUGES:
                if field in self.telemetry:
                    out += _family(name, "gauge", text, self.telemetry[field])
            if "backend" in self.telemetry:
                out += _family("tracer_info", "gauge", "The kernel backend tracing (always 1).", 1,
                               'backend="%s"' % escape(self.telemetry["backend"]))
        return "\n".join(out) + "\n"

    def serve(self, host="0.0.0.0", port=9100):
        """Serve GET /metrics from a daemon thread; returns the bound
        (host, port), port 0 meaning a free one.  self.url is its URL."""
        cls = _Server6 if ":" in host else _Server
        self._server = cls((host, port), _Handler)
        self._server.exporter = self
        host, port = self._server.server_address[:2]
        self.url = "http://%s:%d/metrics" % ("[%s]" % host if ":" in host else host, port)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name="prometheus")
        self._thread.daemon = True
        self._thread.start()
        return host, port

    def close(self):
        """Stop serving and close the listening socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join()


def _family(name, kind, text, value, labels=None):
    sample = "%s{%s}" % (name, labels) if labels else name
    return ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind),
            "%s %s" % (sample, value if isinstance(value, int) else repr(float(value)))]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = self.server.exporter.render().encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # no line on stderr per request


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer's would look up the host's FQDN: a DNS query that can hang
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        pass  # a scraper that hung up: not worth a traceback on stderr


class _Server6(_Server):
    address_family = socket.AF_INET6
