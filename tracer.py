#!/usr/bin/env python3
"""tracer: per-connection TCP and UDP byte counts with eBPF, stdlib only.

Library:
    import tracer
    with tracer.Tracer(backend="auto", tcp=True, udp=True, ipv6=True) as t:
        for conn in t.poll():     # connections active since the previous poll
            print(conn.pid, conn.laddr, conn.lport, conn.sent_bytes)

Command line: sudo python3 tracer.py --interval 2 (see --help).
"""

import os
import sys
import threading
import time

import abi
import backends
import bpfsys
import conntrack
import elfload
import offsetguess

_TELE_DIRTY_LOST = conntrack.TELEMETRY_NAMES.index("dirty_lost").to_bytes(4, "little")
OBJECT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tracer.bpf.o")


class TracerError(RuntimeError):
    """A failure the user can act on; str() is one line (or a few, for a
    verifier rejection) saying what failed."""


def _bad_object(e):
    """The TracerError of an ObjectError ("<path>: what is wrong"): one line."""
    return TracerError("bad BPF object %s (rebuild it with make, or copy the tracer directory "
                       "again)" % "\\n".join(str(e).splitlines()))


class Tracer(object):
    """Loads tracer.bpf.o, guesses offsets, attaches a backend, polls.

    backend: "auto", "kprobe" or "tracepoint".  tcp/udp/ipv4/ipv6: what to
    trace.  pid: only this process's connections; port: only connections
    with this local or remote port.  udp_idle/tcp_idle: seconds after
    which an idle UDP flow, or a TCP connection never seen closing, expires.
    max_conns: size of the connection table in the kernel.
    """

    def __init__(self, backend="auto", tcp=True, udp=True, ipv6=True, pid=None,
                 ipv4=True, port=None, udp_idle=30.0, tcp_idle=600.0, max_conns=None, obj_path=None,
                 kprobe_method="auto"):
        self._coll = None
        self._links = []
        self.started = time.time()
        if not (tcp or udp):
            raise TracerError("nothing to trace: both TCP and UDP are off")
        if not (ipv4 or ipv6):
            raise TracerError("nothing to trace: both IPv4 and IPv6 are off")
        self.tcp, self.udp, self.ipv4, self.ipv6 = tcp, udp, ipv4, ipv6
        self.pid, self.port = pid, port
        try:
            self._open(backend, obj_path or OBJECT_PATH, max_conns, kprobe_method,
                       udp_idle, tcp_idle)
        except BaseException:
            self.close()
            raise
        self.ready_seconds = time.time() - self.started

    def _open(self, backend, obj_path, max_conns, kprobe_method, udp_idle, tcp_idle):
        if os.geteuid() != 0:
            raise TracerError("tracer-bpf needs root (CAP_BPF and CAP_PERFMON): run it with sudo")
        if not os.path.exists(obj_path):
            raise TracerError("the BPF object %s is missing: copy the whole tracer directory "
                              "(or run make to build it)" % obj_path)
        try:
            sizes = abi.map_entries(max_conns)
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
        if self.backend == "kprobe":
            bpfsys.remove_stale_kprobes()
        try:
            self.plan = backends.plan(self.backend, self.tcp, self.udp)
        except backends.BackendError as e:
            raise TracerError(str(e))
        names = abi.programs_to_load(self.backend, self.plan)
        try:
            self._coll = spec.load(names, sizes)
        except elfload.ObjectError as e:
            raise _bad_object(e)
        except bpfsys.BPFError as e:
            raise TracerError("loading the BPF programs failed: %s" % e)
        try:
            self.offsets = backends.run_guess(self._coll, self.backend, self.ipv6, kprobe_method)
        except bpfsys.BPFError as e:
            raise TracerError("offset guessing could not attach: %s" % e)
        except offsetguess.GuessError as e:
            raise TracerError("offset guessing failed: %s" % e)
        # the filters, applied in the kernel: filtered-out traffic creates no entry
        self.offsets.filters = {
            "want": ((offsetguess.WANT_TCP if self.tcp else 0) | (offsetguess.WANT_UDP if self.udp else 0)
                     | (offsetguess.WANT_V4 if self.ipv4 else 0) | (offsetguess.WANT_V6 if self.ipv6 else 0)),
            "pid_filter": self.pid or 0, "port_filter": self.port or 0}
        self._coll.maps["offsets"].update(b"\0\0\0\0", self.offsets.pack())
        try:
            self.attach_notes = []
            self._links = backends.attach_all(self._coll, self.backend, self.plan, kprobe_method,
                                              self.attach_notes)
        except (bpfsys.BPFError, OSError, backends.BackendError) as e:
            raise TracerError("attaching the %s backend failed: %s" % (self.backend, e))
        offsets_map = self._coll.maps["offsets"]
        self._table = conntrack.ConnTable(
            self._coll.maps["conns"], self._coll.maps["socks"], udp_idle, tcp_idle,
            dirty=self._coll.maps["dirty"],
            set_gen=lambda gen: offsets_map.update(b"\0\0\0\0", self.offsets.pack(gen)))

    def _include(self, c):
        if self.pid is not None and c.pid != self.pid:
            return False
        if (c.proto == "tcp" and not self.tcp) or (c.proto == "udp" and not self.udp):
            return False
        if (c.family == 6 and not self.ipv6) or (c.family == 4 and not self.ipv4):
            return False
        if self.port is not None and self.port not in (c.lport, c.rport):
            return False
        return True

    def poll(self):
        """Connections that opened, moved bytes, retransmitted or closed since
        the previous poll; each a conntrack.Conn with the JSON fields."""
        lost = self._coll.maps["telemetry"].lookup(_TELE_DIRTY_LOST)
        return self._table.poll(self._include, int.from_bytes(lost, "little"))

    def telemetry(self):
        """Counters: connections tracked, entries lost, poll time, ..."""
        raw = dict(self._coll.maps["telemetry"].items())
        t = {"type": "telemetry", "time": round(time.time(), 3), "backend": self.backend,
             "tracked": self._table.tracked, "expired": self._table.expired,
             "poll_seconds": round(self._table.last_poll_seconds, 6)}
        for i, name in enumerate(conntrack.TELEMETRY_NAMES):
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
        # closing a perf event waits for an RCU grace period (~70 ms here):
        # close them side by side, not one after the other
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


def main(argv=None):
    import cli
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
