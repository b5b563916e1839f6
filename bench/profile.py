#!/usr/bin/env python3
"""bench/profile.py: where the tracer's hot-path nanoseconds go, per program.

    sudo python3 bench/profile.py [--round-trips N] [--proto tcp,udp] [--tree DIR]

Attaches the tracer (of this checkout, or of --tree DIR), turns on
kernel.bpf_stats_enabled, runs bench/pingpong.c for N round trips per
protocol, and prints each program's runs per round trip and ns per run
(run_time_ns / run_cnt), and the total per round trip: the kernel's own
accounting, steadier than CPU time, and it names the program."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round-trips", type=int, default=100000)
    ap.add_argument("--proto", default="tcp,udp")
    ap.add_argument("--tree", default=os.path.dirname(HERE))
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--backend", default="tracepoint")
    ap.add_argument("--pid", type=int, help="the tracer's pid filter (1: this traffic filtered out)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.tree))
    import tracer
    d = tempfile.mkdtemp()
    exe = os.path.join(d, "pingpong")
    subprocess.check_call([shutil.which("cc") or "gcc", "-O2", "-o", exe,
                           os.path.join(HERE, "pingpong.c")])
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        old = f.read().strip()
    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
        f.write("1")
    try:
        with tracer.Tracer(backend=a.backend, pid=a.pid) as t:
            progs = t._coll.programs
            for proto in a.proto.split(","):
                before = {n: p.stats() for n, p in progs.items()}
                subprocess.check_output([exe, proto, "-n", str(a.round_trips), "-c", str(a.cpu)])
                total = 0.0
                print("%s, %d round trips:" % (proto, a.round_trips))
                for n, p in sorted(progs.items()):
                    s = p.stats()
                    cnt = s["run_cnt"] - before[n]["run_cnt"]
                    ns = s["run_time_ns"] - before[n]["run_time_ns"]
                    if cnt:
                        total += ns / a.round_trips
                        print("  %-28s %6.2f runs/rt %7.1f ns/run %7.1f ns/rt" %
                              (n, cnt / a.round_trips, ns / cnt, ns / a.round_trips))
                print("  %-28s %36.1f ns/rt" % ("total", total))
                t.poll()
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(old)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
