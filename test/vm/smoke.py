"""Smoke check of the qemu harness, run on the host:

    python3 test/vm/smoke.py [--kernel 6.1,...]     # default: all kernels

For each kernel it boots a VM running this file with --guest, which checks:
the kprobe PMU and tracefs kprobe_events exist and a kprobe event on
tcp_v4_connect can be added and removed; TCP and UDP over 127.0.0.1 and ::1;
``python -m pytest --version``; and writes a marker file into the checkout.
The host then checks the guest's output, exit status and that the marker file
arrived.  Last, one VM is crashed on purpose (sysrq) and one timed out: both
must be reported as infrastructure failures (exit 125).  Exit 0 if all passed.
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def guest(marker):
    """Runs inside the VM; prints one 'ok ...' line per check, raises on failure."""
    with open("/proc/version") as f:
        print("ok version", f.read().strip())
    pmus = sorted(os.listdir("/sys/bus/event_source/devices"))
    assert "kprobe" in pmus, pmus
    print("ok pmus", " ".join(pmus))
    events = "/sys/kernel/tracing/kprobe_events"
    fd = os.open(events, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"p:tvm_smoke tcp_v4_connect\n")
    os.write(fd, b"-:tvm_smoke\n")
    os.close(fd)
    print("ok kprobe_events add/remove")
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = socket.socket(family)
        srv.bind((addr, 0))
        srv.listen(1)
        cli = socket.create_connection(srv.getsockname()[:2], timeout=10)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        u1 = socket.socket(family, socket.SOCK_DGRAM)
        u2 = socket.socket(family, socket.SOCK_DGRAM)
        u1.bind((addr, 0))
        u2.sendto(b"pong", u1.getsockname())
        assert u1.recv(4) == b"pong"
        for s in (srv, cli, conn, u1, u2):
            s.close()
        print("ok tcp+udp", addr)
    out = subprocess.check_output([sys.executable, "-m", "pytest", "--version"],
                                  stderr=subprocess.STDOUT).decode().strip()
    print("ok", out)
    with open(marker, "w") as f:
        f.write(os.uname().release + "\n")
    print("ok wrote", marker)


def host(versions):
    sys.path.insert(0, HERE)
    import run
    failed = []
    for v in versions:
        marker = os.path.join(HERE, ".smoke-%s.tmp" % v)
        if os.path.exists(marker):
            os.unlink(marker)
        out, err = io.BytesIO(), io.BytesIO()
        r = run.run(v, [sys.executable, os.path.relpath(__file__, run.REPO),
                        "--guest", marker], timeout=300, stdout=out, stderr=err)
        text = out.getvalue().decode()
        sys.stdout.write(text)
        sys.stdout.write(err.getvalue().decode())
        problems = []
        if r.infra or r.status != 0:
            problems.append("exit %s" % r.exit_code)
        if text.count("ok ") < 7:
            problems.append("missing checks")
        if not os.path.exists(marker):
            problems.append("marker file did not reach the host")
        else:
            with open(marker) as f:
                if f.read().strip() != r.release:
                    problems.append("marker has the wrong release")
            os.unlink(marker)
        print(r.summary() + (": FAILED: " + ", ".join(problems) if problems
                             else ": smoke ok"))
        if problems:
            failed.append(v)
    for what, argv, timeout in (
            ("crash", ["sh", "-c", "echo c >/proc/sysrq-trigger; sleep 60"], 120),
            ("hang", ["sleep", "600"], 20)):
        t0 = time.monotonic()
        r = run.run(versions[0], argv, timeout=timeout)
        good = r.exit_code == run.INFRA_EXIT
        print("vm: %s on %s -> exit %s in %.1f s: %s (%s)" % (
            what, versions[0], r.exit_code, time.monotonic() - t0,
            "ok" if good else "FAILED", r.infra))
        if not good:
            failed.append(what)
    print("smoke: %s" % ("FAILED: " + ", ".join(failed) if failed else "all ok"))
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="5.10,6.1,6.12")
    ap.add_argument("--guest", metavar="MARKER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.guest:
        guest(args.guest)
        return 0
    return host(args.kernel.split(","))


if __name__ == "__main__":
    sys.exit(main())
