#!/usr/bin/env python3
"""tracer: per-connection TCP and UDP byte counts with eBPF, stdlib only.

Library:
    import tracer
    with tracer.Tracer(tcp=True, udp=True, rport=443) as t:
        for conns in t.watch(2):  # every 2 s: the connections active in it
            for c in conns:       # tracer.Conn: help(tracer.Conn) lists the fields
                print(c.pid, c.comm, c.raddr, c.rport, c.sent_delta, c.recv_delta)

    t.poll() returns what changed since the previous poll, t.snapshot()
    every connection tracked, t.telemetry() the tracer's own counters.

Command line: sudo python3 tracer.py --interval 2 (see --help).
"""

import ipaddress
import os
import select
import sys
import threading
import time

import abi
import backends
import bpfsys
import conntrack
import elfload
import events as events_mod
import offsetguess

_TELE_DIRTY_LOST = abi.TELE_DIRTY_LOST.to_bytes(4, "little")
OBJECT_PATH = abi.OBJECT_PATH


class TracerError(RuntimeError):
    """A failure the user can act on; str() is one line (or a few, for a
    verifier rejection) saying what failed."""


Conn = conntrack.Conn
ConnKey = conntrack.ConnKey
Event = events_mod.Event
__all__ = ["Tracer", "Conn", "ConnKey", "Event", "TracerError"]


def needs_privilege(missing):
    """The one-line error for missing capabilities (names)."""
    fix = ("it runs as root, but with a bounded capability set (a container, capsh, setpriv): "
           "grant them" if os.geteuid() == 0 else "run it with sudo")
    return ("tracing needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this process lacks %s: %s"
            % (" and ".join(missing), fix))


def _net_admin(status="/proc/self/status"):
    """Whether this process's effective set has CAP_NET_ADMIN or CAP_SYS_ADMIN."""
    try:
        with open(status) as f:
            eff = int([l.split()[1] for l in f if l.startswith("CapEff:")][0], 16)
    except (OSError, IndexError, ValueError):
        return True  # unknown: try, and let the kernel say
    return bool(eff >> _CAP_NET_ADMIN & 1 or eff >> bpfsys.CAP_SYS_ADMIN & 1)


_CAP_NET_ADMIN = 12


def _bad_object(e):
    """The TracerError of an ObjectError ("<path>: what is wrong"): one line."""
    return TracerError("bad BPF object %s (rebuild it with make, or copy the tracer directory "
                       "again)" % "\\n".join(str(e).splitlines()))


def _items(value, single):
    """[value] where it is one item (an instance of single), else the
    iterable's items; None where it is neither."""
    if isinstance(value, single):
        return [value]
    try:
        return list(value)
    except TypeError:
        return None


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _ports(value, what):
    """A set of ports from None, an int, or an iterable of ints."""
    if value is None:
        return None
    ports = _items(value, int)
    if not ports or not all(_whole(p) and 0 < p < 65536 for p in ports):
        raise TracerError("%s: a port is a whole number from 1 to 65535, got %r" % (what, value))
    return frozenset(ports)


_NETWORK_TYPES = (str, ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address,
                  ipaddress.IPv6Address)


def _networks(value):
    """A tuple of ipaddress networks from None, an address or CIDR (a
    string or an ipaddress object), or an iterable of them."""
    if value is None:
        return None
    items = _items(value, _NETWORK_TYPES)
    if not items or not all(isinstance(a, _NETWORK_TYPES) for a in items):
        raise TracerError("raddr: an address or CIDR (\"10.0.0.0/8\", \"::1\"), or a list of "
                          "them, got %r" % (value,))
    try:
        nets = [ipaddress.ip_network(a, strict=False) for a in items]
    except ValueError as e:
        raise TracerError("raddr: %s" % e)
    # records show IPv4-mapped IPv6 as IPv4: so is it matched
    return tuple(ipaddress.ip_network("%s/%d" % (n.network_address.ipv4_mapped, n.prefixlen - 96))
                 if n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped
                 else n for n in nets)


def _comms(value):
    """A frozenset of process names from None, a name, or an iterable of names."""
    if value is None:
        return None
    names = _items(value, str)
    if not names or not all(isinstance(c, str) and 0 < len(c.encode("utf-8", "surrogateescape")) <= 15
                            for c in names):
        raise TracerError("comm: a process name of 1 to 15 characters (the kernel's comm), "
                          "or a list of them, got %r" % (value,))
    return frozenset(names)


class Tracer(object):
    """Loads tracer.bpf.o, guesses offsets, attaches a backend, polls.

    backend: "auto" or a name in backends.NAMES ("tracepoint", "kprobe").
    tcp/udp/ipv4/ipv6: what to trace.  Filters (a connection must match all
    that are given):
      pid     only this process's connections
      port    a port or ports: connections with one of them as local or
              remote port
      lport, rport  a port or ports: the local / remote port must be one
      raddr   an address or CIDR ("10.0.0.0/8", "::1"), or several: the
              remote address must be in one
      comm    a process name or names (exact, as shown: 1 to 15 chars)
    pid, tcp/udp, the families and a single port (of port, else lport,
    else rport) are applied in the kernel: traffic they exclude creates no
    entry; the rest is applied to the records.  udp_idle/tcp_idle: seconds
    after which an idle UDP flow, or a TCP connection never seen closing,
    expires.  max_conns: size of the connection tables in the kernel.

    poll() returns the connections that changed since the previous poll,
    snapshot() every connection tracked, watch(interval) yields poll()
    every interval; each record is a conntrack.Conn (help(tracer.Conn)
    lists its fields).  After close(), they raise TracerError.
    """

    def __init__(self, backend="auto", tcp=True, udp=True, ipv6=True, pid=None,
                 ipv4=True, port=None, udp_idle=30.0, tcp_idle=600.0, max_conns=None, obj_path=None,
                 kprobe_method="auto", lport=None, rport=None, raddr=None, comm=None,
                 events=False):
        # poll(), telemetry(), read_events() and close() one at a time:
        # close() from another thread (ending a watch()) waits for a poll
        self._lock = threading.RLock()
        self._coll = None
        self._links = []
        self._ring = None
        self.events_enabled = bool(events)
        self._pending = []  # events taken from the ring or the polls, not yet returned
        self.started = time.time()
        if not (tcp or udp):
            raise TracerError("nothing to trace: both TCP and UDP are off")
        if not (ipv4 or ipv6):
            raise TracerError("nothing to trace: both IPv4 and IPv6 are off")
        self.tcp, self.udp, self.ipv4, self.ipv6 = tcp, udp, ipv4, ipv6
        if pid is not None and not (_whole(pid) and 0 < pid < 1 << 32):
            raise TracerError("pid: a process id is a whole number above 0, got %r" % (pid,))
        self.pid = pid
        self.port, self.lport, self.rport = _ports(port, "port"), _ports(lport, "lport"), \
            _ports(rport, "rport")
        self.raddr = _networks(raddr)
        self.comm = _comms(comm)
        try:
            self._open(backend, obj_path or OBJECT_PATH, max_conns, kprobe_method,
                       udp_idle, tcp_idle)
        except BaseException:
            self.close()
            raise
        self.ready_seconds = time.time() - self.started

    def _open(self, backend, obj_path, max_conns, kprobe_method, udp_idle, tcp_idle):
        if bpfsys.machine_error():
            raise TracerError(bpfsys.machine_error())
        missing = bpfsys.missing_capabilities()
        if missing:
            raise TracerError(needs_privilege(missing))
        if not os.path.exists(obj_path):
            raise TracerError("the BPF object %s is missing: copy the whole tracer directory "
                              "(or run make to build it)" % obj_path)
        try:
            sizes = abi.map_entries(max_conns, self.events_enabled)
        except ValueError as e:
            raise TracerError(str(e))
        # all of the object is checked before anything touches the kernel
        try:
            spec = elfload.parse_file(obj_path)
            abi.check_object(spec)
        except elfload.ObjectError as e:
            raise _bad_object(e)
        try:
            self.backend, self.backend_reason = backends.choose(backend)
        except (backends.BackendError, OSError) as e:
            raise TracerError(str(e))
        try:
            self.plan = backends.plan(self.backend, self.tcp, self.udp, spec=spec)
        except backends.BackendError as e:
            raise TracerError(str(e))
        if backends.uses_kprobes(self.plan):
            bpfsys.remove_stale_kprobes()
        names = abi.programs_to_load(self.backend, self.plan)
        if not _net_admin():
            # the kernel loads cgroup sock_addr programs only with CAP_NET_ADMIN
            # (or CAP_SYS_ADMIN): without it (CAP_BPF and CAP_PERFMON, as
            # containers grant) their load at attach fails, and attach_all
            # turns to the syscall tracepoints instead
            names = [n for n in names if n not in set(p for p, k, _ in self.plan if k == "cgroup")]
        try:
            self._coll = spec.load(names, sizes)
        except elfload.ObjectError as e:
            raise _bad_object(e)
        except bpfsys.BPFError as e:
            raise TracerError("loading the BPF programs failed: %s" % e)
        try:
            self.offsets = backends.run_guess(self._coll, self.backend, self.ipv6, kprobe_method,
                                              self.plan)
        except bpfsys.BPFError as e:
            raise TracerError("offset guessing could not attach: %s" % e)
        except offsetguess.GuessError as e:
            raise TracerError("offset guessing failed: %s" % e)
        # the filters, applied in the kernel: filtered-out traffic creates no entry
        self.offsets.filters = {
            "want": ((abi.WANT_TCP if self.tcp else 0) | (abi.WANT_UDP if self.udp else 0)
                     | (abi.WANT_V4 if self.ipv4 else 0) | (abi.WANT_V6 if self.ipv6 else 0)
                     | (abi.WANT_EVENTS if self.events_enabled else 0)),
            "pid_filter": self.pid or 0, "port_filter": self._kernel_port()}
        self._coll.maps["offsets"].update(b"\0\0\0\0", self.offsets.pack())
        try:
            self.attach_notes = []
            self._links = backends.attach_all(self._coll, self.plan, kprobe_method,
                                              self.attach_notes)
        except (bpfsys.BPFError, OSError, backends.BackendError) as e:
            raise TracerError("attaching the %s backend failed: %s" % (self.backend, e))
        if self.events_enabled:
            try:
                self._ring = bpfsys.RingBuffer(self._coll.maps["events"])
            except (OSError, ValueError) as e:
                raise TracerError("events need a BPF ring buffer (Linux 5.8+): mapping it "
                                  "failed: %s" % e)
        self._udp_idle, self._tcp_idle = udp_idle, tcp_idle
        self.new_table()

    def _kernel_port(self):
        """The one port every wanted connection has on one side, or 0."""
        for ports in (self.port, self.lport, self.rport):
            if ports is not None and len(ports) == 1:
                return next(iter(ports))
        return 0

    def _include(self, c):
        if self.pid is not None and c.pid != self.pid:
            return False
        # a record decodes a field when it is read: only those a filter needs
        if not (self.tcp and self.udp):
            proto = c.proto
            if (proto == "tcp" and not self.tcp) or (proto == "udp" and not self.udp):
                return False
        if not (self.ipv4 and self.ipv6):
            family = c.family
            if (family == 6 and not self.ipv6) or (family == 4 and not self.ipv4):
                return False
        if self.port is not None and c.lport not in self.port and c.rport not in self.port:
            return False
        if self.lport is not None and c.lport not in self.lport:
            return False
        if self.rport is not None and c.rport not in self.rport:
            return False
        if self.comm is not None and c.comm not in self.comm:
            return False
        if self.raddr is not None:
            a = ipaddress.ip_address(c.raddr)
            if not any(a.version == n.version and a in n for n in self.raddr):
                return False
        return True

    def _table_or_raise(self):
        if self._coll is None:
            raise TracerError("the tracer is closed")
        return self._table

    def map(self, name):
        """The live BPF map called name (a bpfsys.Map; abi.MAPS lists them
        and abi's structs decode their entries)."""
        if self._coll is None:
            raise TracerError("the tracer is closed")
        return self._coll.maps[name]

    def new_table(self, dirty=True):
        """Forget what the polls so far saw and poll afresh: the next poll
        reports every record as first seen.  Without dirty, every poll
        reads the tables whole (as on kernels before 5.6).  Returns the
        conntrack.ConnTable that poll() now uses."""
        maps, offsets_map = self._coll.maps, self.map("offsets")
        self._table = conntrack.ConnTable(
            maps["conns"], maps["socks"], self._udp_idle, self._tcp_idle,
            dirty=maps["dirty"] if dirty else None,
            set_gen=lambda gen: offsets_map.update(b"\0\0\0\0", self.offsets.pack(gen)),
            keep_expired=self.events_enabled)
        return self._table

    def poll(self):
        """Connections that opened, moved bytes, retransmitted or closed since
        the previous poll: a list of Conn (help(tracer.Conn))."""
        return self._poll(False)

    def snapshot(self):
        """Every connection tracked (open, or closed since the previous
        poll): a poll that also returns the records that did not change
        (their deltas are 0)."""
        return self._poll(True)

    def _poll(self, everything):
        with self._lock:
            table = self._table_or_raise()
            lost = self._coll.maps["telemetry"].lookup(_TELE_DIRTY_LOST)
            out = table.poll(self._include, int.from_bytes(lost, "little"), everything)
            if table.expired_udp:
                self._take_ring()  # what the ring holds happened before the expiry
                now = time.time()
                self._pending.extend(events_mod.expired(c, now) for c in table.expired_udp
                                     if self._include(c))
                del table.expired_udp[:]
            return out

    def _poll_open(self, everything):
        """_poll(), or None where close() came first (from another thread)."""
        try:
            return self._poll(everything)
        except TracerError:
            if self._coll is None:
                return None
            raise

    def _take_ring(self):
        raw = self._ring.read()
        if raw:
            now, now_ns = time.time(), conntrack.monotonic_ns()
            for r in raw:
                e = events_mod.decode(r, now, now_ns)
                if self._include(e):
                    self._pending.append(e)

    def events_fd(self):
        """A file descriptor that select() reports readable when the kernel
        has pushed events (Tracer(events=True) only)."""
        self._table_or_raise()
        if self._ring is None:
            raise TracerError("events are off: make the Tracer with events=True")
        return self._ring.fileno()

    def read_events(self):
        """The events since the previous call, oldest first, without
        waiting: a list of events.Event."""
        with self._lock:
            self.events_fd()
            self._take_ring()
            out, self._pending = self._pending, []
            return out

    def events(self, timeout=None):
        """Yield each event (events.Event) as it happens, until close(), or
        until timeout seconds pass without one (None: no limit)."""
        quiet_since = time.monotonic()
        while self._coll is not None:
            try:
                batch = self.read_events()
            except TracerError:
                if self._coll is None:  # closed meanwhile
                    return
                raise
            for e in batch:
                yield e
            if batch:
                quiet_since = time.monotonic()
                continue
            wait = 0.2
            if timeout is not None:
                wait = min(wait, timeout - (time.monotonic() - quiet_since))
                if wait <= 0:
                    return
            try:
                select.select([self._ring], [], [], wait)
            except (OSError, ValueError):  # closed meanwhile
                return

    def watch(self, interval=2.0, count=None, everything=False):
        """Yield poll() (snapshot() with everything) every interval seconds,
        count times or until close() or Ctrl-C; on Ctrl-C the partial
        interval is yielded last and the iteration ends."""
        if not interval > 0:
            raise TracerError("interval: must be more than 0 seconds, got %r" % (interval,))
        self._table_or_raise()
        n = 0
        next_at = time.monotonic() + interval
        while count is None or n < count:
            try:
                time.sleep(max(0.0, next_at - time.monotonic()))
            except KeyboardInterrupt:
                got = self._poll_open(everything)
                if got is not None:
                    yield got
                return
            got = self._poll_open(everything)
            if got is None:
                return
            yield got
            n += 1
            next_at = max(next_at + interval, time.monotonic())

    def telemetry(self):
        """Counters: connections tracked, entries lost, poll time, ..."""
        with self._lock:
            return self._telemetry()

    def _telemetry(self):
        self._table_or_raise()
        raw = dict(self._coll.maps["telemetry"].items())
        t = {"type": "telemetry", "time": round(time.time(), 3), "backend": self.backend,
             "tracked": self._table.tracked, "expired": self._table.expired,
             "poll_seconds": round(self._table.last_poll_seconds, 6)}
        for i, name in enumerate(abi.TELEMETRY_NAMES):
            if not name.startswith("_"):
                v = raw.get(i.to_bytes(4, "little"))
                t[name] = int.from_bytes(v, "little") if v else 0
        t["lost"] = t["conn_lost"] + t["closed_lost"] + t["udp_lost"] + t["stash_lost"]
        t["missed"] = self._missed()
        return t

    def _missed(self):
        """Probe hits the kernel did not run our programs for: BPF recursion
        misses of every program, plus tracefs kprobe misses (kretprobes
        beyond maxactive)."""
        missed = 0
        for prog in self._coll.programs.values():
            try:
                missed += prog.stats()["recursion_misses"]
            except bpfsys.BPFError:
                pass
        names = [l.tracefs_entry.name for l in self._links
                 if getattr(l, "tracefs_entry", None) is not None]
        if names:
            missed += bpfsys.kprobe_misses(set(names))
        return missed

    def close(self):
        """Detach every probe and close every fd (idempotent)."""
        with self._lock:
            self._close()

    def _close(self):
        # closing a perf event waits for an RCU grace period (~70 ms here):
        # close them side by side, not one after the other
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        links, self._links = self._links, []
        threads = [threading.Thread(target=l.close) for l in links]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if self._coll is not None:
            self._coll.close()
            self._coll = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":  # python3 tracer.py: the command line (importing tracer never loads it)
    import cli
    sys.exit(cli.main())
