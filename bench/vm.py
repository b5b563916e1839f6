#!/usr/bin/env python3
"""bench/vm.py: the kprobe backend's figures next to BCC's and libbpf-tools'
tcptop, inside one boot of a Debian kernel under qemu (test/vm/run.py).

    sudo python3 bench/vm.py [--kernel 6.1] [--rounds 2] [--seconds 1]
                             [--install-peers] [--no-bcc] [--json FILE]

The host kernel has no kprobes, so these run in a guest: startup (exec to
the first poll ready) of tracer.py's kprobe backend, libbpf-tools' tcptop
and BCC's tcptop; bench/pingpong.c with nothing attached, the tracer's
kprobe backend, do-nothing programs on exactly its kprobes/kretprobes (the
floor) and on tcptop's two hooks (kprobe tcp_sendmsg + kprobe
tcp_cleanup_rbuf), libbpf-tools' tcptop and BCC's tcptop (with --baseline: the
tracer of another checkout and do-nothing programs on its hooks), in ABBA order
in the same boot; each tool's peak RSS; and the bytes each shows for a known
transfer.
Everything runs under qemu TCG (software emulation): absolute times are
10-20x the host's, so compare only within one run.

Peers come from Debian: libbpf-tools and bpfcc-tools, plus
linux-headers-<guest release> for BCC, all from the host's own suite, so
the default guest is 6.1 on a bookworm host (--install-peers installs what
is missing with apt-get; the guest sees the host's / read-only).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "test", "vm"))


def _load_bench_run():
    """bench/run.py as a module (test/vm/run.py shares its name)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(HERE, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hostbench = _load_bench_run()

PY = sys.executable
LIBBPF_TCPTOP = "/usr/sbin/tcptop"
BCC_TCPTOP = "/usr/sbin/tcptop-bpfcc"
MARK = "BENCH-JSON "
# one tcptop row: PID COMM LADDR:LPORT RADDR:RPORT RX_KB TX_KB
ROW = re.compile(r"^\s*(\d+)\s+(.+?)\s+(\S+):(\d+)\s+(\S+):(\d+)\s+(\d+)\s+(\d+)\s*$")


def log(msg):
    sys.stderr.write("vm-bench: %s\n" % msg)
    sys.stderr.flush()


# --- in the guest ------------------------------------------------------------------

def tcptop_holder(exe, cpu, bcc):
    """A tcptop printing every second; ready when it is attached: BCC says
    "Tracing..." after compiling, loading and attaching; libbpf-tools' first
    output comes one interval after attaching."""
    if bcc:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return hostbench.Holder("BCC tcptop", [exe, "-C", "1"], cpu=cpu, ready_timeout=400,
                                ready=lambda l: l.startswith("Tracing"), env=env,
                                stop_signal=hostbench.signal.SIGINT)
    cmd = [exe, "-C", "1"]
    if shutil.which("stdbuf"):      # its stdout is a pipe: line-buffer it
        cmd = ["stdbuf", "-oL"] + cmd
    return hostbench.Holder("libbpf-tools tcptop", cmd, cpu=cpu, ready_timeout=120,
                            ready=lambda l: bool(l.strip()), ready_offset=-1.0,
                            stop_signal=hostbench.signal.SIGINT)


def tcptop_counts(output, pid):
    """{(lport, rport): [rx_kb, tx_kb]} summed over intervals for pid."""
    out = {}
    for line in output.splitlines():
        m = ROW.match(line)
        if m and int(m.group(1)) == pid:
            k = (int(m.group(4)), int(m.group(6)))
            v = out.setdefault(k, [0, 0])
            v[0] += int(m.group(7))
            v[1] += int(m.group(8))
    return out


def transfer_rows(facts, tool_counts, tracer_recs):
    """Per connection: actual bytes, tracer's, and each tcptop's KB."""
    rows = []
    for tag in ("A", "B"):
        f = facts[tag]
        row = {"conn": tag, "actual_sent": f["accepted"], "requested": f["requested"],
               "actual_received": f["server_received"]}
        if tracer_recs is not None:
            row["tracer_sent"] = sum(c.sent_bytes for c in tracer_recs if c.lport == f["lport"])
            row["tracer_received"] = sum(c.recv_bytes for c in tracer_recs
                                         if c.rport == f["lport"] and c.lport != f["lport"])
        for tool, counts in tool_counts.items():
            cli = counts.get((f["lport"], f["server_lport"]), [None, None])
            srv = counts.get((f["server_lport"], f["lport"]), [None, None])
            row[tool + "_tx_kb"] = cli[1]
            row[tool + "_rx_kb"] = srv[0]
        rows.append(row)
    return rows


def guest(a):
    import tracer
    res = {"kernel": os.uname()[2], "vm_kernel": os.environ.get("TRACER_VM_KERNEL"),
           "rounds": a.rounds, "seconds": a.seconds}
    load, hold_cpu = hostbench.load_cpu()
    exe = a.pingpong
    peers = {"libbpf-tools tcptop": LIBBPF_TCPTOP if os.path.exists(LIBBPF_TCPTOP) else None,
             "BCC tcptop": BCC_TCPTOP if os.path.exists(BCC_TCPTOP) and not a.no_bcc else None}
    bcc_headers = os.path.exists("/lib/modules/%s/build/Makefile" % os.uname()[2])
    if peers["BCC tcptop"] and not bcc_headers:
        res["bcc_error"] = "no kernel headers at /lib/modules/%s/build" % os.uname()[2]
        peers["BCC tcptop"] = None

    log("startup: tracer kprobe x%d" % a.startup_runs)
    total, inproc, teardown, bare = hostbench.startup_tracer(a.startup_runs, backend="kprobe")
    st = res["startup"] = {"tracer_s": total, "tracer_inprocess_s": inproc,
                           "tracer_exit_s": teardown, "python_bare_s": bare}
    if peers["libbpf-tools tcptop"]:
        xs = []
        for _ in range(a.startup_runs):
            h = tcptop_holder(LIBBPF_TCPTOP, None, bcc=False)
            xs.append(h.ready_s)
            h.stop()
        st["libbpf_tcptop_s"] = hostbench.median(xs)

    # the known transfer, for the tracer itself
    t = tracer.Tracer(backend="kprobe")
    t.poll()
    facts = hostbench.known_transfer()
    time.sleep(0.3)
    tracer_recs = [c for c in t.poll() if c.pid == os.getpid()]
    t.close()
    transfers = {"tracer": (facts, tracer_recs)}

    def before_stop(name, h):
        """While a tcptop is attached: the known transfer, then two
        intervals so that it printed everything."""
        if name in ("libbpf-tools tcptop", "BCC tcptop") and name not in transfers:
            f = hostbench.known_transfer()
            time.sleep(2.5)
            transfers[name] = (f, None)

    configs = [("none", lambda: None),
               ("tracer kprobe", lambda: hostbench.hold_tracer("kprobe", cpu=hold_cpu,
                                                               timeout=300)),
               ("do-nothing floor", lambda: hostbench.hold_floor("kprobe", cpu=hold_cpu,
                                                                 timeout=300)),
               ("do-nothing on tcptop's hooks", lambda: hostbench.hold_floor(
                   "tcptop", cpu=hold_cpu, timeout=300))]
    if a.baseline:  # the tracer of another checkout, side by side in this boot
        configs.append(("tracer baseline", lambda: hostbench.hold_baseline(
            a.baseline, backend="kprobe", cpu=hold_cpu, timeout=300)))
        # and do-nothing programs on its hooks, where they differ from ours
        configs.append(("do-nothing floor, baseline's hooks", lambda: hostbench.hold_floor(
            "kprobe", cpu=hold_cpu, timeout=300, tree=os.path.abspath(a.baseline))))
    for name, exe_path in peers.items():
        if exe_path:
            configs.append((name, (lambda p=exe_path, b=(name == "BCC tcptop"):
                                   tcptop_holder(p, hold_cpu, bcc=b))))
    log("hot path: %d ABBA rounds of %s" % (a.rounds, ", ".join(n for n, _ in configs)))
    samples, errors, holders, _ = hostbench.abba_hotpath(exe, configs, a.rounds, a.seconds, load,
                                                         before_stop=before_stop)
    res["hotpath"] = {"summary": hostbench.summarize_hotpath(samples), "samples": samples,
                      "errors": errors, "cpu": load}
    rss = res["rss"] = {}
    for name, hs in holders.items():
        rss[name] = max(h.peak_kb or 0 for h in hs)
        if name == "BCC tcptop":
            st["bcc_tcptop_s"] = hostbench.median([h.ready_s for h in hs])
    counts = {}
    for name, hs in holders.items():
        if name in transfers and name != "tracer":
            out = "".join(h.output() for h in hs)
            counts[name] = tcptop_counts(out, os.getpid())
    # one row set per tool: each tool saw its own transfer (other ports)
    res["correct"] = {"tracer": transfer_rows(facts, {}, tracer_recs)}
    for name in counts:
        res["correct"][name] = transfer_rows(transfers[name][0], {name: counts[name]}, None)
    sys.stdout.write(MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


# --- on the host -------------------------------------------------------------------

def ensure_peers(release, install):
    """Which peers the guest will find; installs the missing ones with
    apt-get when asked.  Returns {what: problem} for what is missing."""
    want = {"libbpf-tools": LIBBPF_TCPTOP, "bpfcc-tools": BCC_TCPTOP,
            "linux-headers-" + release: "/lib/modules/%s/build/Makefile" % release}
    missing = [pkg for pkg, path in want.items() if not os.path.exists(path)]
    if missing and install:
        log("installing %s" % " ".join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends"] + missing,
                           env=env, timeout=900, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        missing = [pkg for pkg, path in want.items() if not os.path.exists(path)]
    return dict((pkg, "not installed (apt-get install %s)" % pkg) for pkg in missing)


def goal_lines(samples, tracer="tracer kprobe", peer="libbpf-tools tcptop",
               floor="do-nothing on tcptop's hooks"):
    """Issue 14's goals for TCP, round by round (each round's sample of every
    configuration was taken within one ABBA visit): the CPU the tracer adds
    per round trip below tcptop's, and at most 1.5x a do-nothing program's
    on tcptop's own two hooks."""
    per = dict((n, [c for _, c in samples.get(n, {}).get("tcp", [])]) for n in
               ("none", tracer, peer, floor))
    n = min(len(v) for v in per.values())
    if not n:
        return ["TCP goals: not measured (needs %s, %s and %s)" % (tracer, peer, floor)]
    added = dict((k, [per[k][i] - per["none"][i] for i in range(n)]) for k in per)
    below = sum(added[tracer][i] < added[peer][i] for i in range(n))
    within = sum(added[tracer][i] <= 1.5 * added[floor][i] for i in range(n))
    med = lambda xs: hostbench.median(xs)
    return ["TCP goals, round by round (%d rounds): tracer below %s in %d, within 1.5x the "
            "do-nothing programs on tcptop's hooks in %d" % (n, peer, below, within),
            "  median added: tracer %.0f ns, %s %.0f ns, do-nothing on tcptop's hooks %.0f ns "
            "(tracer/do-nothing %.2fx)" % (med(added[tracer]), peer, med(added[peer]),
                                          med(added[floor]),
                                          med(added[tracer]) / med(added[floor])
                                          if med(added[floor]) > 0 else float("nan"))]


def report(res, kernel):
    st = res["startup"]
    print("tracer-bpf kprobe benchmarks in a qemu TCG guest, kernel %s, %s" % (
        res["kernel"], time.strftime("%Y-%m-%d %H:%M:%S")))
    print("(software emulation: absolute times are 10-20x the host's; compare within this run)")
    print("\n1. startup (exec -> first poll ready / attached)")
    print("   %-28s %7.2f s   (in-process Tracer() %.2f s, python -c pass %.2f s, exit %.2f s)"
          % ("tracer.py (kprobe)", st["tracer_s"], st["tracer_inprocess_s"],
             st["python_bare_s"], st["tracer_exit_s"]))
    for k, name in (("libbpf_tcptop_s", "libbpf-tools tcptop"), ("bcc_tcptop_s", "BCC tcptop")):
        if k in st:
            print("   %-28s %7.2f s" % (name, st[k]))
    h = res["hotpath"]
    print("\n2. hot path: 64-byte ping-pong, client+server on CPU %d, %d ABBA rounds x %.1f s"
          % (h["cpu"], res["rounds"], res["seconds"]))
    hostbench.print_hotpath_table(h["summary"])
    none = h["summary"].get("none", {})
    for p in ("tcp", "udp"):
        for who, floor in (("tracer kprobe", "do-nothing floor"),
                           ("tracer baseline", "do-nothing floor, baseline's hooks")):
            tr, fl = h["summary"].get(who, {}), h["summary"].get(floor, {})
            if p in tr and p in fl and p in none:
                print("   %s: %s adds %.0f ns, %s %.0f ns: %.2fx the floor's cost" % (
                    p.upper(), who, tr[p]["added_ns"], floor, fl[p]["added_ns"],
                    tr[p]["added_ns"] / fl[p]["added_ns"] if fl[p]["added_ns"] > 0
                    else float("nan")))
    for line in goal_lines(h["samples"]):
        print("   " + line)
    for name, e in h["errors"].items():
        print("   %s: not measured: %s" % (name, e))
    print("\n4. peak RSS (VmHWM)")
    for name, kb in res["rss"].items():
        print("   %-28s %7.1f MB" % (name, kb / 1024.0))
    print("\n5. bytes shown for the known transfer (A: 10 x 100,000 B; B: non-blocking 4 MiB, "
          "partly accepted, then EAGAIN)")
    for tool, rows in res["correct"].items():
        for r in rows:
            if tool == "tracer":
                print("   %-20s %s sent %9d (actual %9d)  received %9d (actual %9d)" % (
                    "tracer.py kprobe", r["conn"], r["tracer_sent"], r["actual_sent"],
                    r["tracer_received"], r["actual_received"]))
            else:
                print("   %-20s %s TX_KB %6s (actual %d KB, requested %d KB)  RX_KB %6s "
                      "(actual %d KB)" % (tool, r["conn"], r.get(tool + "_tx_kb"),
                                          r["actual_sent"] // 1024, r["requested"] // 1024,
                                          r.get(tool + "_rx_kb"), r["actual_received"] // 1024))
    if "bcc_error" in res:
        print("   BCC tcptop: %s" % res["bcc_error"])
    for what, why in res.get("missing", {}).items():
        print("   %s: %s" % (what, why))


def host(a):
    import kernels
    if os.geteuid() != 0:
        sys.stderr.write("vm-bench: needs root (qemu, apt)\n")
        return 1
    k = kernels.fetch(a.kernel)
    missing = ensure_peers(k.release, a.install_peers)
    tmp = tempfile.mkdtemp(prefix="tracer-vmbench-", dir="/tmp")  # the guest sees the host's /
    try:
        exe = hostbench.build_pingpong(tmp)
        cmd = [PY, os.path.join(REPO, "test", "vm", "run.py"), "--kernel", a.kernel,
               "--timeout", str(a.timeout), "--", PY, os.path.join(HERE, "vm.py"), "--guest",
               "--pingpong", exe, "--rounds", str(a.rounds), "--seconds", str(a.seconds),
               "--startup-runs", str(a.startup_runs)] + (["--no-bcc"] if a.no_bcc else []) + (
                   ["--baseline", os.path.abspath(a.baseline)] if a.baseline else [])
        log("booting %s (%s) under qemu; BCC compiles for minutes there" % (a.kernel, k.release))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, universal_newlines=True)
        res = None
        for line in p.stdout:
            if line.startswith(MARK):
                res = json.loads(line[len(MARK):])
            else:
                sys.stderr.write(line)
        rc = p.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if res is None:
        sys.stderr.write("vm-bench: no results from the guest (run.py exit %d)\n" % rc)
        return 1
    res["missing"] = missing
    report(res, k)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="6.1", help="guest kernel (default 6.1: matches the "
                    "host's bookworm BCC and headers)")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds (default 2)")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per ping-pong sample")
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1200, help="guest timeout, seconds")
    ap.add_argument("--install-peers", action="store_true",
                    help="apt-get install libbpf-tools, bpfcc-tools and the guest's headers")
    ap.add_argument("--no-bcc", action="store_true", help="skip BCC (minutes of compiling)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also time the tracer of another checkout (e.g. an earlier commit's "
                    "tree, outside the repository) in the same boot, side by side")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pingpong", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    return guest(a) if a.guest else host(a)


if __name__ == "__main__":
    sys.exit(main())
