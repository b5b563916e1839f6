#!/usr/bin/env python3
"""bench/run.py: tracer-bpf's figures next to bpftrace's, on this machine.

    sudo python3 bench/run.py [--only startup,hotpath,poll,mem,rss,correct]
                              [--rounds N] [--seconds S] [--quick] [--json FILE]

Prints, for the tracepoint backend on the host kernel:
  1. startup: exec of a Python process to its first poll returned (median of
     N runs), next to a bpftrace tracepoint script's exec to its BEGIN line;
  2. hot path: bench/pingpong.c (64-byte TCP and UDP round trips on
     127.0.0.1, client and server pinned to one CPU; and getpid(), pipe and unix socket
     loops, unrelated work) with nothing attached, the tracer attached, a
     bpftrace tcptop-like script attached, a minimal per-socket counter
     (bench/counter.bpf.c), the tracer with all this traffic filtered out,
     do-nothing programs on exactly the tracer's hooks (the floor) and, with
     --baseline DIR, the tracer of another checkout; the configurations
     alternate in ABBA order, medians reported;
  3. poll cost with 1k, 10k and 100k synthetic connections in the conns map
     (batch and per-key reads, first and steady-state polls);
  3b. (mem) VmHWM and poll times with 100k synthetic connections, each run
     a fresh process: the library, tracer.py --json and tracer.py -C, this
     tree and, with --baseline DIR, the other;
  4. peak RSS (VmHWM) of a tracer process running its poll loop, next to
     bpftrace's, under the same traffic;
  5. a known transfer's bytes as the tracer, bpftrace's sum of the returned
     sizes, the requested sizes (what libbpf-tools' tcptop counts) and
     BCC's KB rounding show them.
These are figures, not assertions: nothing here fails on a slow result.
Needs root, a C compiler (pingpong.c is built into a temp dir) and, for the
peer columns, bpftrace (apt-get install bpftrace); a missing peer is
reported as such and skipped.

The same module holds the pieces bench/vm.py runs in a kprobe guest:
    python3 bench/run.py --hold tracer|floor [--backend B]   (attach, print
    "ready", poll every --poll-interval s until stdin closes)
"""

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
PY = sys.executable

# r0 = 0; exit  -- the do-nothing program every floor hook runs
NOP_INSNS = bytes.fromhex("b700000000000000" "9500000000000000")
# r0 = 1; exit  -- the same for a cgroup hook, where 1 means "allow"
ALLOW_INSNS = bytes.fromhex("b700000001000000" "9500000000000000")

# A tcptop-like bpftrace script on the tracepoints our tracepoint backend
# also uses for bytes: per (pid, comm, addresses, ports) sums, printed and
# cleared every interval as tcptop does.
BPFTRACE_TCPTOP = r"""
BEGIN { printf("ready\n"); }
tracepoint:sock:sock_send_length /args->ret > 0/ {
  $sk = (struct sock *)args->sk;
  @tx[pid, comm, $sk->__sk_common.skc_rcv_saddr, $sk->__sk_common.skc_num,
      $sk->__sk_common.skc_daddr, $sk->__sk_common.skc_dport] = sum(args->ret);
}
tracepoint:sock:sock_recv_length /args->ret > 0/ {
  $sk = (struct sock *)args->sk;
  @rx[pid, comm, $sk->__sk_common.skc_rcv_saddr, $sk->__sk_common.skc_num,
      $sk->__sk_common.skc_daddr, $sk->__sk_common.skc_dport] = sum(args->ret);
}
interval:s:1 { print(@tx); print(@rx); clear(@tx); clear(@rx); }
"""

# For the correctness figure: what the kernel accepted / copied per local
# port, and what the process asked to send per fd (sendto's len).
BPFTRACE_COUNTS = r"""
BEGIN { printf("ready\n"); }
tracepoint:sock:sock_send_length /pid == $1 && args->ret > 0/ {
  @accepted[((struct sock *)args->sk)->__sk_common.skc_num] = sum(args->ret);
}
tracepoint:sock:sock_recv_length /pid == $1 && args->ret > 0 && !(args->flags & 2)/ {
  $d = ((struct sock *)args->sk)->__sk_common.skc_dport;
  @copied[((struct sock *)args->sk)->__sk_common.skc_num, (($d & 0xff) << 8) | ($d >> 8)] =
      sum(args->ret);
}
tracepoint:syscalls:sys_enter_sendto /pid == $1/ { @requested[args->fd] = sum(args->len); }
"""


_T0 = time.monotonic()


def log(msg):
    sys.stderr.write("bench: [%5.1fs] %s\n" % (time.monotonic() - _T0, msg))
    sys.stderr.flush()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ncpus():
    return len(os.sched_getaffinity(0))


def load_cpu():
    """The CPU the ping-pong runs on (1, as `taskset -c 1`), and the one
    the tracer/peer process is kept on (0)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[1], cpus[0]) if len(cpus) > 1 else (cpus[0], cpus[0])


def vm_hwm_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except IOError:
        return None


def other_bpf_holders(exclude=()):
    """Processes other than ours (and exclude: our holders) holding BPF
    program or link fds: something else attached while we measure would
    skew the hot-path figures."""
    mine = {os.getpid()} | set(exclude)
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        n = 0
        for fd in fds:
            try:
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) in ("anon_inode:bpf-prog",
                                                                 "anon_inode:bpf_link"):
                    n += 1
            except OSError:
                pass
        if n:
            try:
                with open("/proc/%s/comm" % pid) as f:
                    comm = f.read().strip()
            except IOError:
                comm = "?"
            out.append("%s(%s): %d" % (comm, pid, n))
    return out


# --- the load generator ----------------------------------------------------------

def build_pingpong(tmpdir):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise SystemExit("bench: no C compiler (cc, gcc or clang) to build bench/pingpong.c")
    exe = os.path.join(tmpdir, "pingpong")
    subprocess.check_call([cc, "-O2", "-o", exe, os.path.join(HERE, "pingpong.c")])
    return exe


def pingpong(exe, proto, seconds=None, rounds=None, cpu=1, timeout=120):
    """(wall ns per round trip, round trips per second, CPU ns per round
    trip) of one run."""
    cmd = [exe, proto, "-c", str(cpu)]
    cmd += ["-n", str(rounds)] if rounds else ["-t", str(seconds)]
    out = subprocess.check_output(cmd, universal_newlines=True, timeout=timeout)
    kv = dict(w.split("=", 1) for w in out.split())
    return float(kv["ns_per_rt"]), float(kv["rate"]), float(kv["cpu_ns_per_rt"])


# --- holders: a process that attaches something and keeps it attached ----------

class Holder(object):
    """A child that attaches probes, says "ready" on stdout, and detaches
    when its stdin closes (or on SIGINT for bpftrace).  Its stdout is read
    by a thread so that a chatty child (bpftrace) never blocks."""

    def __init__(self, name, cmd, cpu=None, stop_signal=None, ready_timeout=180,
                 ready=lambda line: line.startswith("ready"), ready_offset=0.0, env=None):
        """ready(line) says which output line means attached; ready_offset
        is added to that line's time (a tool that prints only after its
        first interval: minus the interval)."""
        self.name = name
        self.stop_signal = stop_signal
        self.lines = []
        self._is_ready = ready
        self._ready = threading.Event()
        def pre():
            # a shell that started us in the background left SIGINT ignored,
            # and an ignored signal stays ignored across exec
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
        self.t_exec = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=pre,
                                     universal_newlines=True, cwd=REPO, env=env)
        self.t_ready = None
        self._err = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        if not self._ready.wait(ready_timeout) or self.t_ready is None:
            self.stop()
            raise RuntimeError("%s did not get ready: %s" % (name, "".join(self._err)[-2000:]))
        self.ready_s = self.t_ready - self.t_exec + ready_offset

    def _read(self):
        for line in self.proc.stdout:
            if self.t_ready is None and self._is_ready(line):
                self.t_ready = time.monotonic()
                self._ready.set()
            self.lines.append(line)
        self._ready.set()

    def _read_err(self):
        for line in self.proc.stderr:
            self._err.append(line)

    def hwm_kb(self):
        return vm_hwm_kb(self.proc.pid)

    def stop(self, timeout=20):
        """Stop the child; returns its peak RSS in kB (VmHWM just before,
        else wait4's ru_maxrss); also kept as self.peak_kb."""
        self.peak_kb = self.hwm_kb()
        if self.stop_signal is not None and self.proc.returncode is None:
            self.proc.send_signal(self.stop_signal)
        try:
            self.proc.stdin.close()
        except (IOError, OSError):
            pass
        t0 = time.monotonic()
        maxrss = None
        while time.monotonic() - t0 < timeout:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = status
                maxrss = ru.ru_maxrss
                break
            time.sleep(0.01)
            if time.monotonic() - t0 > timeout / 2:
                os.kill(self.proc.pid, signal.SIGTERM)  # not reaped yet: wait4 said so
        else:
            self.proc.kill()
            self.proc.wait()
        self.stop_s = time.monotonic() - t0
        self.peak_kb = self.peak_kb or maxrss
        return self.peak_kb

    def output(self):
        return "".join(self.lines)


def hold_tracer(backend="auto", cpu=None, poll_interval=1.0, timeout=180, pid=None,
                events=False, tcp_only=False):
    return Holder("tracer(%s)" % backend,
                  [PY, os.path.join(HERE, "run.py"), "--hold", "tracer", "--backend", backend,
                   "--poll-interval", str(poll_interval)] + (["--pid", str(pid)] if pid else [])
                  + (["--events"] if events else []) + (["--tcp-only"] if tcp_only else []),
                  cpu=cpu, ready_timeout=timeout)


def hold_counter(cpu=None, timeout=180):
    return Holder("per-socket counter",
                  [PY, os.path.join(HERE, "run.py"), "--hold", "counter"], cpu=cpu,
                  ready_timeout=timeout)


def hold_baseline(tree, backend="tracepoint", cpu=None, timeout=180):
    """The tracer of another checkout (an earlier version, side by side)."""
    return Holder("tracer(%s)" % tree,
                  [PY, os.path.join(tree, "bench", "run.py"), "--hold", "tracer", "--backend",
                   backend], cpu=cpu, ready_timeout=timeout)


def attach_counter():
    """bench/counter.bpf.c, built with clang into a temp dir and attached."""
    import bpfsys
    import elfload
    clang = shutil.which("clang")
    if not clang:
        raise RuntimeError("clang is not installed: cannot build bench/counter.bpf.c")
    with tempfile.TemporaryDirectory() as d:
        obj = os.path.join(d, "counter.bpf.o")
        subprocess.check_call([clang, "-O2", "-g0", "-target", "bpf", "-c",
                               os.path.join(HERE, "counter.bpf.c"), "-o", obj])
        spec = elfload.parse_file(obj)
    coll = spec.load(["counter_send", "counter_recv"])
    links = [bpfsys.attach_raw_tracepoint(coll.programs["counter_send"], "sock_send_length"),
             bpfsys.attach_raw_tracepoint(coll.programs["counter_recv"], "sock_recv_length")]
    return links, [coll]


def hold_floor(backend, cpu=None, timeout=180, tree=None):
    """Do-nothing programs on the hooks the tracer of this checkout (or of
    the checkout tree) attaches."""
    here = os.path.join(tree, "bench") if tree else HERE
    return Holder("floor(%s%s)" % (backend, ", " + tree if tree else ""),
                  [PY, os.path.join(here, "run.py"), "--hold", "floor", "--backend", backend],
                  cpu=cpu, ready_timeout=timeout)


def hold_bpftrace(script, args=(), cpu=None):
    exe = shutil.which("bpftrace")
    if not exe:
        raise RuntimeError("bpftrace is not installed (apt-get install -y bpftrace)")
    return Holder("bpftrace", [exe, "-e", script] + list(args), cpu=cpu,
                  stop_signal=signal.SIGINT)


# tcptop's own hooks (libbpf-tools and BCC): a do-nothing program on each is
# the floor the kprobe backend's TCP path is held to (each entry: a program
# of the object whose type the do-nothing program takes, kind, target)
TCPTOP_HOOKS = (("kp_tcp_push", "kprobe", "tcp_sendmsg"),
                ("kp_tcp_cleanup_rbuf", "kprobe", "tcp_cleanup_rbuf"))


def attach_floor(backend):
    """Do-nothing programs on exactly the hooks `backend` attaches to (or,
    for "tcptop", tcptop's); returns (links, programs)."""
    import backends
    import bpfsys
    bpfsys.tracefs()
    plan = TCPTOP_HOOKS if backend == "tcptop" else backends.plan(backend)
    types = backends.object_spec().programs  # each planned program's type
    progs, links = {}, []
    root = None
    try:
        for name, kind, target in plan:
            ptype = types[name].prog_type
            if kind == "cgroup":  # a cgroup program says "allow" (r0 = 1)
                p = bpfsys.Program(ptype, ALLOW_INSNS, name="bench_allow",
                                   expected_attach_type=bpfsys.CGROUP_ATTACH_TYPES[target])
                progs[target] = p
                root = root or bpfsys.Cgroup2Root()
            else:
                p = progs.get(ptype)
                if p is None:
                    p = progs[ptype] = bpfsys.Program(ptype, NOP_INSNS, name="bench_nop")
            links.append(backends.attach_program(p, kind, target, cgroup=root))
    except Exception:
        for l in links:
            l.close()
        for p in progs.values():
            p.close()
        raise
    return links, list(progs.values())


def hold_main(args):
    """--hold: attach, say ready, poll (tracer) until stdin closes."""
    if args.hold == "tracer":
        import tracer
        t = tracer.Tracer(backend=args.backend, pid=args.pid, events=args.events,
                          udp=not args.tcp_only)
        t.poll()
        print("ready backend=%s ready_seconds=%.4f" % (t.backend, t.ready_seconds), flush=True)
        closer = t.close

        def poll():
            t.poll()
            if args.events:  # as --events does: take what the ring buffer holds
                t.read_events()
    else:
        if args.hold == "counter":
            links, progs = attach_counter()
            backend = "counter"
        else:
            import backends
            backend = args.backend if args.backend == "tcptop" else backends.choose(args.backend)[0]
            links, progs = attach_floor(backend)
        print("ready backend=%s hooks=%d" % (backend, len(links)), flush=True)

        def closer():
            for l in links:
                l.close()
            for p in progs:
                p.close()
        poll = None
    try:
        while True:
            r, _, _ = select.select([sys.stdin], [], [], args.poll_interval)
            if r and not sys.stdin.readline():
                break
            if poll is not None:
                poll()
    except KeyboardInterrupt:
        pass
    finally:
        closer()
    return 0


# --- 1. startup ----------------------------------------------------------------------

STARTUP_SNIPPET = """
import sys; sys.path.insert(0, %r)
import tracer
t = tracer.Tracer(backend=%r)
t.poll()
print("ready %%.4f" %% t.ready_seconds, flush=True)
t.close()
"""


def startup_tracer(runs, backend="auto"):
    """(median exec->first poll returned, median in-process ready_seconds,
    median exit (detach) time, median `python -c pass`)."""
    total, inproc, teardown, bare = [], [], [], []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.Popen([PY, "-c", STARTUP_SNIPPET % (REPO, backend)],
                             stdout=subprocess.PIPE, universal_newlines=True)
        line = p.stdout.readline()
        t1 = time.monotonic()
        p.wait()
        t2 = time.monotonic()
        if not line.startswith("ready"):
            raise RuntimeError("tracer startup failed (exit %s)" % p.returncode)
        total.append(t1 - t0)
        inproc.append(float(line.split()[1]))
        teardown.append(t2 - t1)
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.check_call([PY, "-c", "pass"])
        bare.append(time.monotonic() - t0)
    return median(total), median(inproc), median(teardown), median(bare)


def startup_bpftrace(runs):
    script = ("BEGIN { printf(\"ready\\n\"); }\n"
              "tracepoint:sock:sock_send_length { @tx[pid] = sum(args->ret); }\n"
              "tracepoint:sock:sock_recv_length { @rx[pid] = sum(args->ret); }\n")
    xs = []
    for _ in range(runs):
        h = hold_bpftrace(script)
        xs.append(h.ready_s)
        h.stop()
    return median(xs)


def bench_startup(a, res):
    runs = a.startup_runs
    log("startup: tracer x%d" % runs)
    total, inproc, teardown, bare = startup_tracer(runs)
    res["startup"] = {"tracer_s": total, "tracer_inprocess_s": inproc, "tracer_exit_s": teardown,
                      "python_bare_s": bare, "runs": runs}
    try:
        log("startup: bpftrace x%d" % runs)
        res["startup"]["bpftrace_s"] = startup_bpftrace(runs)
    except Exception as e:
        res["startup"]["bpftrace_error"] = str(e)


# --- 2. hot path -----------------------------------------------------------------------

def wait_quiet(max_s, exclude=()):
    """Wait up to max_s for no other process to hold BPF programs; returns
    the holders still there."""
    t0 = time.monotonic()
    while True:
        others = other_bpf_holders(exclude)
        if not others or time.monotonic() - t0 >= max_s:
            return others
        time.sleep(0.2)


def abba_hotpath(exe, configs, rounds, seconds, load, protos=("tcp", "udp"), quiet_s=0.0,
                 before_stop=None):
    """configs: [(name, start() -> Holder or None)].  Visits them in ABBA
    order (ABCD DCBA ABCD ...); each visit attaches, runs each protocol for
    `seconds`, detaches; two visits in a row of one configuration (the turn
    of ABBA) share one attach.  Returns ({name: {proto: [ns per round
    trip]}}, {name: error}, {name: [Holder]}, samples taken while other
    processes held BPF programs).  before_stop(name, holder) runs before
    each detach."""
    samples = dict((name, dict((p, []) for p in protos)) for name, _ in configs)
    errors, holders = {}, {}
    visits = []
    for r in range(rounds):
        visits.extend(configs if r % 2 == 0 else configs[::-1])
    h = None
    contaminated = 0
    for i, (name, start) in enumerate(visits):
        if name in errors:
            continue
        if h is None:
            try:
                h = start()
            except Exception as e:
                errors[name] = str(e).splitlines()[0] if str(e) else repr(e)
                log("hot path: %s unavailable: %s" % (name, errors[name]))
                continue
            if h is not None:
                holders.setdefault(name, []).append(h)
        try:
            if quiet_s and wait_quiet(quiet_s, [h.proc.pid] if h is not None else []):
                contaminated += 1
            for p in protos:
                wall, _, cpu = pingpong(exe, p, seconds=seconds, cpu=load)
                samples[name][p].append((wall, cpu))
        finally:
            if h is not None and (i + 1 == len(visits) or visits[i + 1][0] != name):
                if before_stop is not None:
                    try:
                        before_stop(name, h)
                    except Exception as e:
                        log("hot path: after %s: %s" % (name, e))
                h.stop()
                h = None
        if (i + 1) % len(configs) == 0:
            log("hot path: round %d/%d done" % ((i + 1) // len(configs), rounds))
    return samples, errors, holders, contaminated


def summarize_hotpath(samples, base="none"):
    """Per configuration and protocol: median wall ns per round trip, the
    rate kept against `base`, and the CPU time added per round trip (median
    against median, and fastest against fastest)."""
    out = {}
    for name, per in samples.items():
        out[name] = {}
        for p, xs in per.items():
            if not xs or not samples[base][p]:
                continue
            bw = median([w for w, _ in samples[base][p]])
            bc = [c for _, c in samples[base][p]]
            w = median([w for w, _ in xs])
            c = [c for _, c in xs]
            out[name][p] = {"ns_per_rt": w, "rate_kept": bw / w, "cpu_ns_per_rt": median(c),
                            "added_ns": median(c) - median(bc), "added_min_ns": min(c) - min(bc),
                            "n": len(xs)}
    return out


def bench_hotpath(a, res, exe):
    load, hold_cpu = load_cpu()
    others = other_bpf_holders()
    if others:
        log("warning: other processes hold BPF programs/links: %s" % ", ".join(others))
    configs = [
        ("none", lambda: None),
        ("tracer tracepoint", lambda: hold_tracer("tracepoint", cpu=hold_cpu)),
        ("bpftrace tcptop-like", lambda: hold_bpftrace(BPFTRACE_TCPTOP, cpu=hold_cpu)),
        ("per-socket counter", lambda: hold_counter(cpu=hold_cpu)),
        ("tracer, filtered out", lambda: hold_tracer("tracepoint", cpu=hold_cpu, pid=1)),
        ("tracer with --events", lambda: hold_tracer("tracepoint", cpu=hold_cpu, events=True)),
        # tracing TCP alone (--tcp) leaves out the UDP hooks: sk_data_ready, which
        # fires for every socket's data, and the cgroup hooks
        ("tracer, TCP only (--tcp)", lambda: hold_tracer("tracepoint", cpu=hold_cpu,
                                                         tcp_only=True)),
        ("do-nothing floor", lambda: hold_floor("tracepoint", cpu=hold_cpu)),
    ]
    if a.baseline:
        configs.append(("tracer baseline", lambda: hold_baseline(a.baseline, cpu=hold_cpu)))
    log("hot path: %d ABBA rounds of %d configurations, %.1f s per protocol" % (
        a.rounds, len(configs), a.seconds))
    samples, errors, _, contaminated = abba_hotpath(exe, configs, a.rounds, a.seconds, load,
                                                    protos=("tcp", "udp", "getpid", "pipe", "unix"),
                                                    quiet_s=1.0)
    res["hotpath"] = {"cpu": load, "holder_cpu": hold_cpu, "rounds": a.rounds,
                      "seconds": a.seconds, "summary": summarize_hotpath(samples),
                      "samples": samples, "errors": errors, "other_bpf": others,
                      "contaminated_visits": contaminated}


# --- 3. poll cost ------------------------------------------------------------------------

class Synthetic(object):
    """Synthetic TCP connections as the kernel keeps them in socks: each
    socket's life and its owner's counters (sk(i): the socket address,
    key(i): the record key, value(i): the socks value)."""

    def __init__(self):
        import abi
        import conntrack
        self.abi = abi
        self.now_ns = conntrack.monotonic_ns()
        self.comm = b"bench".ljust(16, b"\0")

    @staticmethod
    def sk(i):
        return (0xffff888000000000 + i * 2048).to_bytes(8, "little")

    def key(self, i):
        daddr = bytes([127, 1 + (i >> 16) % 200, (i >> 8) & 255, i & 255]).ljust(16, b"\0")
        return self.abi.CONN_TUPLE.pack(saddr=b"\x7f\0\0\x01", daddr=daddr, netns=4026531840,
                                        pid=0x7ff00000, sport=40000 + i % 20000, dport=443,
                                        family=4, proto=self.abi.TRACER_PROTO_TCP, life=i + 1)

    def value(self, i, extra=0):
        abi = self.abi
        stats = abi.CONN_STATS.pack(sent_bytes=1000 + i + extra, recv_bytes=2000 + i,
                                    first_ns=self.now_ns, last_ns=self.now_ns,
                                    direction=abi.DIR_OUTGOING, state=abi.CONN_OPEN,
                                    seen_start=1, comm=self.comm)
        return abi.SOCK_INFO.pack(tuple=self.key(i), has_tuple=1, stats=stats)


def poll_child(sizes):
    """In a child: fill the socks map with synthetic TCP connections (each
    socket's life and its owner's counters, as the kernel keeps them) and
    time reads and polls; prints one JSON object."""
    import tracer
    t = tracer.Tracer(max_conns=max(sizes) * 2)
    socks = t.map("socks")
    syn = Synthetic()
    sk, key, value = syn.sk, syn.key, syn.value

    def timed(fn, n=3):
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return median(xs)

    dirty = t.map("dirty")
    out = {"sizes": {}}
    filled = 0
    for n in sizes:
        while filled < n:
            socks.update(sk(filled), value(filled))
            filled += 1
        r = {}
        r["items_batch_s"] = timed(socks.items_batch)
        r["items_per_key_s"] = timed(socks.items_per_key, 1 if n >= 100000 else 3)
        r["entries"] = len(socks.items_batch())
        t.new_table(dirty=False)
        t0 = time.perf_counter()
        first = t.poll()
        r["poll_first_s"] = time.perf_counter() - t0
        r["poll_first_records"] = len(first)
        del first
        r["poll_steady_s"] = timed(t.poll)
        for i in range(n):      # every connection moved bytes since the last poll
            socks.update(sk(i), value(i, 1))
        t0 = time.perf_counter()
        changed = t.poll()
        r["poll_all_changed_s"] = time.perf_counter() - t0
        r["poll_all_changed_records"] = len(changed)
        del changed
        socks._batch_ok = False
        r["poll_steady_per_key_s"] = timed(t.poll, 1 if n >= 100000 else 3)
        socks._batch_ok = True
        # the dirty set: the kernel marks changed records, a poll reads those
        table = t.new_table()
        table.poll()  # the first poll reads everything
        r["poll_steady_dirty_s"] = timed(table.poll)
        for i in range(0, n, 100):  # 1 % of the connections move, as the kernel would mark them
            socks.update(sk(i), value(i, 2))
            dirty.update(key(i), sk(i))
        t0 = time.perf_counter()
        r["poll_1pct_dirty_records"] = len(table.poll())
        r["poll_1pct_dirty_s"] = time.perf_counter() - t0
        # the periodic expiry pass (on the values held in user space), with the dirty set
        table.next_full_ns = 0
        t0 = time.perf_counter()
        table.poll()
        r["poll_with_expiry_s"] = time.perf_counter() - t0
        r["vm_hwm_kb"] = vm_hwm_kb(os.getpid())
        out["sizes"][str(n)] = r
    t.close()
    print(json.dumps(out), flush=True)


def fill_synthetic(t, n, syn):
    """n synthetic connections into the tracer t's socks map, each marked in
    the dirty set as the kernel marks a new entry (a full dirty set counts
    dirty_lost, as the kernel does, so that the next poll reads the tables)."""
    import abi
    import bpfsys
    socks, dirty, tele = t.map("socks"), t.map("dirty"), t.map("telemetry")
    lost = 0
    for i in range(n):
        socks.update(syn.sk(i), syn.value(i))
        if not lost:
            try:
                dirty.update(syn.key(i), syn.sk(i))
            except bpfsys.BPFError:
                lost = 1
    if lost:
        slot = abi.TELE_DIRTY_LOST.to_bytes(4, "little")
        was = int.from_bytes(tele.lookup(slot), "little")
        tele.update(slot, (was + 1).to_bytes(8, "little"))


def mem_child(mode, n, tree):
    """In a fresh child, the tracer of checkout tree with n synthetic
    connections: mode "library" polls as a library caller does (the first
    poll reports all n, then steady polls, 1 % moving, the expiry pass, a
    snapshot); "json" and "table" run the command line (tracer.py --json,
    tracer.py -C) for 3 intervals, stdout to /dev/null.  Prints one JSON
    object with VmHWM (kB) and times."""
    sys.path.insert(0, tree)
    for m in ("abi", "bpfsys", "conntrack", "tracer", "cli"):
        sys.modules.pop(m, None)
    import tracer
    syn = Synthetic()
    r = {"mode": mode, "entries": n, "tree": tree}
    if mode != "library":
        import cli
        opened = tracer.Tracer._open

        def _open(self, *args):
            opened(self, *args)
            fill_synthetic(self, n, syn)
            r["filled_hwm_kb"] = vm_hwm_kb(os.getpid())
        tracer.Tracer._open = _open
        argv = ["--max-conns", str(2 * n), "--interval", "0.5", "--count", "3"]
        argv += ["--json"] if mode == "json" else ["-C"]
        stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
        try:
            r["rc"] = cli.main(argv)
        finally:
            sys.stdout.close()
            sys.stdout = stdout
        r["vm_hwm_kb"] = vm_hwm_kb(os.getpid())
        print(json.dumps(r), flush=True)
        return
    t = tracer.Tracer(max_conns=2 * n)
    fill_synthetic(t, n, syn)
    r["filled_hwm_kb"] = vm_hwm_kb(os.getpid())
    t0 = time.perf_counter()
    recs = t.poll()
    r["poll_first_s"] = time.perf_counter() - t0
    r["poll_first_records"] = len(recs)
    r["first_hwm_kb"] = vm_hwm_kb(os.getpid())
    steady = []
    for _ in range(5):  # the second poll reads again what the first drained
        t0 = time.perf_counter()
        recs = t.poll()
        steady.append(time.perf_counter() - t0)
    r["poll_second_s"], r["poll_steady_s"] = steady[0], median(steady[2:])
    socks, dirty = t.map("socks"), t.map("dirty")
    for i in range(0, n, 100):  # 1 % of the connections move
        socks.update(syn.sk(i), syn.value(i, 2))
        dirty.update(syn.key(i), syn.sk(i))
    t0 = time.perf_counter()
    recs = t.poll()
    r["poll_1pct_s"] = time.perf_counter() - t0
    r["poll_1pct_records"] = len(recs)
    t._table.next_full_ns = 0
    t0 = time.perf_counter()
    recs = t.poll()
    r["poll_with_expiry_s"] = time.perf_counter() - t0
    del recs
    t0 = time.perf_counter()
    snap = t.snapshot()
    r["snapshot_s"] = time.perf_counter() - t0
    r["snapshot_records"] = len(snap)
    del snap
    r["vm_hwm_kb"] = vm_hwm_kb(os.getpid())
    t.close()
    print(json.dumps(r), flush=True)


def bench_mem(a, res):
    """VmHWM and poll times at 100k connections, each in a fresh process:
    the library and the command line (--json, -C), this tree and, with
    --baseline, the other, one after the other."""
    n = 100000 if not a.quick else 20000
    trees = [("tracer", REPO)] + ([("baseline", os.path.abspath(a.baseline))] if a.baseline else [])
    res["mem"] = {"entries": n, "runs": []}
    for mode in ("library", "json", "table"):
        for name, tree in trees:
            log("memory at %d connections: %s, %s" % (n, mode, name))
            try:
                out = subprocess.check_output(
                    [PY, os.path.join(HERE, "run.py"), "--mem-child", "%s,%d,%s" % (mode, n, tree)],
                    universal_newlines=True, timeout=600)
                r = json.loads(out.strip().splitlines()[-1])
            except (subprocess.SubprocessError, ValueError) as e:
                r = {"mode": mode, "error": str(e).splitlines()[0]}
            r["name"] = name
            res["mem"]["runs"].append(r)


def bench_poll(a, res):
    sizes = [1000, 10000, 100000] if not a.quick else [1000, 10000]
    log("poll cost: %s entries" % ", ".join(map(str, sizes)))
    out = subprocess.check_output([PY, os.path.join(HERE, "run.py"), "--poll-child",
                                   ",".join(map(str, sizes))], universal_newlines=True,
                                  timeout=600)
    res["poll"] = json.loads(out.strip().splitlines()[-1])


# --- 4. peak memory ------------------------------------------------------------------------

def bench_rss(a, res, exe):
    load, hold_cpu = load_cpu()
    res["rss"] = {}
    bare = subprocess.check_output([PY, "-c", "import re; print(re.search(r'VmHWM:\\s+(\\d+)', "
                                    "open('/proc/self/status').read()).group(1))"],
                                   universal_newlines=True)
    res["rss"]["python_bare_kb"] = int(bare)
    cli = [PY, os.path.join(REPO, "tracer.py"), "--interval", "0.5", "--json"]
    for name, start in (("tracer", lambda: hold_tracer("auto", cpu=hold_cpu, poll_interval=0.5)),
                        ("tracer_cli", lambda: Holder("tracer.py CLI", cli, cpu=hold_cpu,
                                                      ready=lambda l: l.startswith("{"),
                                                      stop_signal=signal.SIGINT)),
                        ("bpftrace", lambda: hold_bpftrace(BPFTRACE_TCPTOP, cpu=hold_cpu))):
        if name == "tracer_cli" and not os.path.exists(os.path.join(REPO, "cli.py")):
            continue
        log("peak RSS: %s" % name)
        try:
            h = start()
        except Exception as e:
            res["rss"][name + "_error"] = str(e).splitlines()[0]
            continue
        for p in ("tcp", "udp"):
            pingpong(exe, p, seconds=a.rss_seconds / 2.0, cpu=load)
        hwm = h.hwm_kb()
        maxrss = h.stop()
        res["rss"][name + "_kb"] = hwm or maxrss


# --- 5. correctness -------------------------------------------------------------------------

def known_transfer():
    """One connection: 10 blocking sends of 100,000 bytes, all read.  A
    second: one non-blocking 4 MiB send to a peer that does not read yet
    (partly accepted), a second one that fails with EAGAIN, then the peer
    reads everything.  Returns the facts as the application saw them."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    port = srv.getsockname()[1]
    got = {}
    go = threading.Event()

    def serve(tag, wait=None):
        c, _ = srv.accept()
        if wait is not None:
            wait.wait(10)
        n = 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
        got[tag] = (n, c.getsockname()[1], c.getpeername()[1])
        c.close()

    facts = {}
    th = threading.Thread(target=serve, args=("A",))
    th.start()
    a = socket.create_connection(("127.0.0.1", port))
    chunk = b"a" * 100000
    sent = [a.send(chunk) for _ in range(10)]
    facts["A"] = {"fd": a.fileno(), "lport": a.getsockname()[1], "accepted": sum(sent),
                  "requested": 10 * len(chunk)}
    a.shutdown(socket.SHUT_WR)  # EOF for the server; the fd stays ours (fds are keys)
    th.join()
    th = threading.Thread(target=serve, args=("B", go))
    th.start()
    b = socket.create_connection(("127.0.0.1", port))
    b.setblocking(False)
    big = b"b" * (4 << 20)
    accepted = b.send(big)
    again = 0
    try:
        b.send(big)
    except BlockingIOError:
        again = 1
    facts["B"] = {"fd": b.fileno(), "lport": b.getsockname()[1], "accepted": accepted,
                  "requested": len(big) * 2 if again else len(big) + accepted, "eagain": again}
    go.set()
    b.setblocking(True)
    b.shutdown(socket.SHUT_WR)
    th.join()
    a.close()
    b.close()
    srv.close()
    for tag in ("A", "B"):
        facts[tag]["server_received"], facts[tag]["server_lport"], _ = got[tag]
    return facts


def bench_correct(a, res):
    import tracer
    log("correctness: a known transfer")
    out = {}
    bt = None
    try:
        bt = hold_bpftrace(BPFTRACE_COUNTS, [str(os.getpid())])
    except Exception as e:
        out["bpftrace_error"] = str(e).splitlines()[0]
    t = tracer.Tracer()
    t.poll()
    facts = known_transfer()
    time.sleep(0.2)
    recs = [c for c in t.poll() if c.pid == os.getpid() and c.proto == "tcp"]
    t.close()
    bpft = {}
    if bt is not None:
        bt.stop()
        for m in re.finditer(r"@(\w+)\[([\d, ]+)\]: (\d+)", bt.output()):
            k = tuple(int(x) for x in m.group(2).split(","))
            bpft.setdefault(m.group(1), {})[k if len(k) > 1 else k[0]] = int(m.group(3))
    rows = []
    for tag in ("A", "B"):
        f = facts[tag]
        cli = [c for c in recs if c.lport == f["lport"]]
        srv = [c for c in recs if c.rport == f["lport"] and c.lport != f["lport"]]
        rows.append({
            "conn": tag, "app_sent": f["accepted"], "app_received": f["server_received"],
            "tracer_sent": sum(c.sent_bytes for c in cli) if cli else None,
            "tracer_received": sum(c.recv_bytes for c in srv) if srv else None,
            "bpftrace_ret_sent": bpft.get("accepted", {}).get(f["lport"]),
            "bpftrace_ret_received": bpft.get("copied", {}).get((f["server_lport"], f["lport"])),
            "requested": bpft.get("requested", {}).get(f["fd"], f["requested"]),
            "requested_from": "bpftrace sys_enter_sendto len" if f["fd"] in bpft.get(
                "requested", {}) else "application",
            "bcc_kb": f["accepted"] // 1024, "eagain": f.get("eagain", 0)})
    out["rows"] = rows
    res["correct"] = out


# --- report --------------------------------------------------------------------------------

def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except IOError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "bpftrace": (subprocess.check_output(["bpftrace", "--version"],
                                                 universal_newlines=True).strip()
                         if shutil.which("bpftrace") else None)}


def fmt_s(x):
    return "%.3f s" % x if x == x else "-"


def print_hotpath_table(summary):
    print("   %-24s %9s %6s %8s %8s   %9s %6s %8s %8s" % (
        "attached", "TCP ns/rt", "kept", "added", "@min", "UDP ns/rt", "kept", "added", "@min"))
    for name, per in summary.items():
        cells = []
        for p in ("tcp", "udp"):
            x = per.get(p)
            cells.append("%9.0f %5.1f%% %+8.0f %+8.0f" % (x["ns_per_rt"], 100 * x["rate_kept"],
                                                         x["added_ns"], x["added_min_ns"])
                         if x else "%9s %6s %8s %8s" % ("-", "-", "-", "-"))
        print("   %-24s %s   %s" % (name, cells[0], cells[1]))
    print("   ns/rt: wall time per round trip; kept: rate against none; added: CPU time\n"
          "   (client+server, schedstat) added per round trip, median vs median; @min:\n"
          "   fastest vs fastest sample, which other load on the machine cannot inflate")
    if any("getpid" in per for per in summary.values()):
        print("\n   unrelated work while attached (no TCP or UDP socket involved):")
        print("   %-24s %9s %6s %8s   %9s %6s %8s   %9s %6s %8s" % (
            "attached", "getpid ns", "kept", "added", "pipe ns", "kept", "added",
            "unix ns", "kept", "added"))
        for name, per in summary.items():
            cells = []
            for p in ("getpid", "pipe", "unix"):
                x = per.get(p)
                cells.append("%9.1f %5.1f%% %+8.1f" % (x["ns_per_rt"], 100 * x["rate_kept"],
                                                       x["added_ns"])
                             if x else "%9s %6s %8s" % ("-", "-", "-"))
            print("   %-24s %s   %s   %s" % (name, cells[0], cells[1], cells[2]))
        print("   one getpid(), or one 1-byte write+read on a pipe or on a unix stream socket\n"
              "   pair (the sock tracepoints fire for every socket), CPU time per op")
    ratios = []
    for p in ("tcp", "udp"):
        t, c = summary.get("tracer tracepoint", {}).get(p), summary.get("per-socket counter", {}).get(p)
        if t and c and c["added_ns"] > 0:
            ratios.append("%s %.2fx" % (p.upper(), t["added_ns"] / c["added_ns"]))
    t = summary.get("tracer, TCP only (--tcp)", {}).get("tcp")
    c = summary.get("per-socket counter", {}).get("tcp")
    if t and c and c["added_ns"] > 0:
        ratios.append("TCP with --tcp %.2fx" % (t["added_ns"] / c["added_ns"]))
    if ratios:
        print("   tracer / per-socket counter, CPU added (medians): " + ", ".join(ratios))


def report(res):
    m = res["machine"]
    print("tracer-bpf benchmarks  %s  kernel %s  %s x%d  Python %s  %s" % (
        m["date"], m["kernel"], m["cpu"], m["cpus"], m["python"], m["bpftrace"] or "no bpftrace"))
    s = res.get("startup")
    if s:
        print("\n1. startup (exec -> first poll ready, median of %d)" % s["runs"])
        print("   %-36s %s   (in-process Tracer() %.3f s; python -c pass %.3f s; "
              "exit/detach %.3f s)" % ("tracer.py (tracepoint)", fmt_s(s["tracer_s"]),
                                       s["tracer_inprocess_s"], s["python_bare_s"],
                                       s["tracer_exit_s"]))
        if "bpftrace_s" in s:
            print("   %-36s %s" % ("bpftrace tracepoint script", fmt_s(s["bpftrace_s"])))
        else:
            print("   bpftrace: %s" % s.get("bpftrace_error"))
    h = res.get("hotpath")
    if h:
        print("\n2. hot path: 64-byte ping-pong on 127.0.0.1, client+server on CPU %d, "
              "%d ABBA rounds x %.1f s, medians" % (h["cpu"], h["rounds"], h["seconds"]))
        print_hotpath_table(h["summary"])
        for name, e in h["errors"].items():
            print("   %s: not measured: %s" % (name, e))
        if h.get("contaminated_visits"):
            print("   note: in %d of %d visits another process held BPF programs (a test "
                  "run beside us?); figures from a quiet machine are cleaner"
                  % (h["contaminated_visits"], h["rounds"] * len(h["summary"])))
    p = res.get("poll")
    if p:
        print("\n3. poll cost (synthetic TCP connections in the socks map)")
        print("   full read of the tables (first poll; every poll without a dirty map):")
        print("   %8s %10s %10s %11s %11s %13s %14s %10s" % (
            "entries", "batch rd", "per-key rd", "first poll", "steady poll", "all-changed",
            "steady per-key", "VmHWM"))
        for n, r in p["sizes"].items():
            print("   %8s %8.1fms %8.1fms %9.1fms %9.1fms %11.1fms %12.1fms %8.1fMB" % (
                n, 1e3 * r["items_batch_s"], 1e3 * r["items_per_key_s"], 1e3 * r["poll_first_s"],
                1e3 * r["poll_steady_s"], 1e3 * r["poll_all_changed_s"],
                1e3 * r["poll_steady_per_key_s"], r["vm_hwm_kb"] / 1024.0))
        print("   with the dirty set (every poll after the first):")
        print("   %8s %14s %16s %18s" % ("entries", "nothing moved", "1 % moved", "expiry pass too"))
        for n, r in p["sizes"].items():
            print("   %8s %12.2fms %14.2fms %16.2fms" % (n, 1e3 * r["poll_steady_dirty_s"],
                                                      1e3 * r["poll_1pct_dirty_s"],
                                                      1e3 * r.get("poll_with_expiry_s", 0)))
    m = res.get("mem")
    if m:
        print("\n3b. %d connections, each run a fresh process (VmHWM: its peak RSS)" % m["entries"])
        print("   %-8s %-9s %9s %12s %11s %11s %11s %11s %11s" % (
            "mode", "tree", "VmHWM", "(1st poll)", "first poll", "steady", "1 % moved",
            "expiry too", "snapshot"))
        for r in m["runs"]:
            if "error" in r:
                print("   %-8s %-9s %s" % (r["mode"], r["name"], r["error"]))
                continue
            ms = lambda k: "%9.1fms" % (1e3 * r[k]) if k in r else "%11s" % "-"
            first = ("%10.1fMB" % (r["first_hwm_kb"] / 1024.0) if r.get("first_hwm_kb")
                     else "%12s" % "-")
            print("   %-8s %-9s %7.1fMB %s %s %s %s %s %s" % (
                r["mode"], r["name"], r["vm_hwm_kb"] / 1024.0, first, ms("poll_first_s"),
                ms("poll_steady_s"), ms("poll_1pct_s"), ms("poll_with_expiry_s"),
                ms("snapshot_s")))
    r = res.get("rss")
    if r:
        print("\n4. peak RSS (VmHWM) under the ping-pong load, polling every 0.5 s")
        for k, label in (("tracer", "tracer (library poll loop)"),
                         ("tracer_cli", "tracer.py --interval 0.5 --json"),
                         ("bpftrace", "bpftrace tcptop-like script")):
            if k + "_kb" in r:
                print("   %-36s %6.1f MB" % (label, r[k + "_kb"] / 1024.0))
            elif k + "_error" in r:
                print("   %-36s %s" % (label, r[k + "_error"]))
        print("   %-36s %6.1f MB" % ("(python -c pass)", r["python_bare_kb"] / 1024.0))
    c = res.get("correct")
    if c:
        print("\n5. bytes shown for a known transfer (A: 10 x 100,000 B blocking; "
              "B: non-blocking 4 MiB send, partly accepted, then one EAGAIN)")
        print("   %-4s %-9s %10s %10s %14s %16s %9s" % (
            "conn", "direction", "actual", "tracer.py", "bpftrace(ret)", "requested size",
            "BCC KB"))
        for row in c["rows"]:
            print("   %-4s %-9s %10s %10s %14s %16s %9s" % (
                row["conn"], "sent", row["app_sent"], row["tracer_sent"],
                row["bpftrace_ret_sent"], row["requested"], row["bcc_kb"]))
            print("   %-4s %-9s %10s %10s %14s %16s %9s" % (
                row["conn"], "received", row["app_received"], row["tracer_received"],
                row["bpftrace_ret_received"], "", row["app_received"] // 1024))
        if "bpftrace_error" in c:
            print("   bpftrace: %s" % c["bpftrace_error"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="startup,hotpath,poll,mem,rss,correct")
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds (default 4)")
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="seconds per ping-pong sample (default 1)")
    ap.add_argument("--startup-runs", type=int, default=5)
    ap.add_argument("--rss-seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and entries")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results here")
    ap.add_argument("--hold", choices=("tracer", "floor", "counter"), help=argparse.SUPPRESS)
    ap.add_argument("--baseline", metavar="DIR",
                    help="also time the tracer of another checkout (e.g. an earlier commit's "
                         "tree) in the hot-path rounds, side by side")
    ap.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--events", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tcp-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--poll-child", help=argparse.SUPPRESS)
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.hold:
        return hold_main(a)
    if a.poll_child:
        poll_child([int(x) for x in a.poll_child.split(",")])
        return 0
    if a.mem_child:
        mode, n, tree = a.mem_child.split(",", 2)
        mem_child(mode, int(n), tree)
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("bench: needs root (it loads BPF programs)\n")
        return 1
    if a.quick:
        a.rounds, a.seconds, a.startup_runs, a.rss_seconds = 2, 0.5, 3, 1.0
    only = set(a.only.split(","))
    import bpfsys
    bpfsys.tracefs()
    res = {"machine": machine()}
    tmp = tempfile.mkdtemp(prefix="tracer-bench-")
    try:
        exe = build_pingpong(tmp)
        if "startup" in only:
            bench_startup(a, res)
        if "hotpath" in only:
            bench_hotpath(a, res, exe)
        if "poll" in only:
            bench_poll(a, res)
        if "mem" in only:
            bench_mem(a, res)
        if "rss" in only:
            bench_rss(a, res, exe)
        if "correct" in only:
            bench_correct(a, res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
