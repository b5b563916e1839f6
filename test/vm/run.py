"""Run a command as root inside a Debian kernel (5.10, 6.1, 6.12) under qemu.

The host kernel has no kprobes; Debian's kernels do.  This boots one of them
(fetched by kernels.py) under qemu TCG and runs a command there:

    python3 test/vm/run.py --kernel 6.1 [--timeout 600] -- CMD ARGS...
    python3 test/vm/run.py --all -- CMD ARGS...        # 5.10, 6.1, 6.12 in turn

How: the uncompressed vmlinux (cut out of Debian's bzImage once, cached) boots
through qemu's PVH entry with a tiny cached initramfs: static busybox as /init
plus the modules needed for 9p and overlayfs.  The host's / is shared read-only
over virtio-9p, with a tmpfs overlay on top so the guest can write; the
checkout (the parent of test/) is shared read-write at its own path.  /init
mounts proc, sys, devtmpfs, tracefs, debugfs, bpffs and cgroup2, brings lo up
(127.0.0.1 and ::1), then chroots into the host's tree and runs the command
with cwd = checkout, stdin /dev/null, a clean environment (PATH starting with
this Python's directory, HOME=/root, PYTHONDONTWRITEBYTECODE=1,
TRACER_VM_KERNEL=<version>).

Serial ports: ttyS0 = kernel console -> <run dir>/console.log, ttyS1 = the
command's stdout, ttyS2 = its stderr (both streamed live to ours), ttyS3 =
status lines from /init (START, EXIT <status>).

Environment: TRACER_VM_CACHE (kernel cache, see kernels.py), TRACER_VM_CPU
(qemu -cpu model, default qemu64).

Exit status: the command's own, or 125 (INFRA_EXIT) with a line
"vm: infrastructure failure: ..." on stderr when the VM timed out, crashed,
panicked or never reported a status.  With several kernels: 0 if all passed,
125 if any infrastructure failure, else 1; one summary line per kernel.
"""

import argparse
import hashlib
import lzma
import os
import re
import selectors
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels  # noqa: E402

INFRA_EXIT = 125
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUSYBOX = "/bin/busybox"
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay",
           "sch_netem", "veth", "crc32c_generic", "nf_tables", "nft_reject_inet", "nft_numgen"]  # tests in netns
CMDLINE = ("console=ttyS0 mitigations=off nokaslr pci=noacpi cryptomgr.notests "
           "quiet panic=-1 rdinit=/init")
# qemu64 (qemu's default CPU model) rather than "max": under TCG, 5.10 runs
# processes 2-3x slower with "max"; 6.x does not care.  TRACER_VM_CPU overrides.
QEMU = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-m", "1024", "-smp", "2",
        "-cpu", os.environ.get("TRACER_VM_CPU", "qemu64"), "-M", "pc",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]

# /init in the initramfs.  Per-run values come from the kernel command line
# (the kernel hands unknown name=value words to init as environment):
# tvm_run = the host run directory holding cmd.sh, tvm_repo = the checkout.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for t in 1 2 3; do stty -F /dev/ttyS$t raw -echo; done
status() { echo "$*" >/dev/ttyS3; }
fail() { echo "vm-init: $*" >/dev/ttyS0; status "INFRA $*"; sync; reboot -f; }
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || fail "insmod $m failed"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay"
mkdir -p /newroot$tvm_repo
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 repo /newroot$tvm_repo \
    || fail "cannot mount the checkout over 9p"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs $R/sys/kernel/debug
[ -e $R/sys/kernel/tracing/kprobe_events ] \
    || mount -t tracefs tracefs $R/sys/kernel/debug/tracing 2>/dev/null
mount -t bpf bpf $R/sys/fs/bpf
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
hostname tracer-vm
echo 0 >/proc/sys/net/ipv6/conf/all/disable_ipv6
echo 0 >/proc/sys/net/ipv6/conf/lo/disable_ipv6
ip link set lo up
status "START $(cut -d' ' -f1 /proc/uptime)"
chroot $R /bin/sh $tvm_run/cmd.sh </dev/null >/dev/ttyS1 2>/dev/ttyS2
rc=$?
sync
status "EXIT $rc $(cut -d' ' -f1 /proc/uptime)"
reboot -nf
"""


class Result(object):
    """Outcome of one VM run: status is the command's exit status, or None
    with infra set to the reason when the VM itself failed."""

    def __init__(self, version, release):
        self.version, self.release = version, release
        self.status = None
        self.infra = None
        self.boot_s = self.cmd_s = None

    def summary(self):
        head = "vm: kernel %s (%s): " % (self.version, self.release)
        if self.infra:
            return head + "INFRASTRUCTURE FAILURE: " + self.infra
        return head + "exit %d, boot %.1f s, command %.1f s" % (
            self.status, self.boot_s, self.cmd_s)

    @property
    def exit_code(self):
        return INFRA_EXIT if self.infra else self.status


def extract_vmlinux(bzimage, out):
    """Cut the compressed payload out of a bzImage and decompress it."""
    with open(bzimage, "rb") as f:
        data = f.read()
    setup_sects = data[0x1f1] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[start + offset:start + offset + length]
    if payload.startswith(b"\xfd7zXZ\0"):
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):       # zstd, size appended
        elf = subprocess.run(["zstd", "-dc"], input=payload[:-4],
                             stdout=subprocess.PIPE, check=True).stdout
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise SystemExit("vm: %s: unknown compression %r" % (bzimage, payload[:4]))
    if not elf.startswith(b"\x7fELF"):
        raise SystemExit("vm: %s: payload is not an ELF vmlinux" % bzimage)
    tmp = "%s.%d.tmp" % (out, os.getpid())
    with open(tmp, "wb") as f:
        f.write(elf)
    os.rename(tmp, out)


def _read_module(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, stdout=subprocess.PIPE,
                              check=True).stdout
    return data


def _modules_in_order(kernel):
    """[(name, decompressed .ko bytes)] for MODULES and their depends=, deps first."""
    index = {}
    for top, _, files in os.walk(kernel.modules):
        for name in files:
            m = re.match(r"(.*)\.ko(\.xz|\.zst|\.gz)?$", name)
            if m:
                index[m.group(1).replace("-", "_")] = os.path.join(top, name)
    builtin = set()
    try:
        with open(os.path.join(kernel.modules, "modules.builtin")) as f:
            builtin = {os.path.basename(l.strip())[:-3].replace("-", "_") for l in f}
    except IOError:
        pass
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            if name in builtin:
                return
            raise SystemExit("vm: module %s not found for %s" % (name, kernel.release))
        data = _read_module(index[name])
        m = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                visit(dep)
        order.append((name, data))

    for name in MODULES:
        visit(name)
    return order


def _cpio(entries):
    """A newc cpio archive from [(name, mode, data_or_(major, minor))]."""
    out = []
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        rdev = (0, 0)
        if isinstance(data, tuple):
            rdev, data = data, b""
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        hdr = b"070701" + b"".join(b"%08x" % v for v in fields) + name.encode() + b"\0"
        out.append(hdr + b"\0" * (-len(hdr) % 4))
        out.append(data + b"\0" * (-len(data) % 4))
    return b"".join(out)


def initramfs(kernel):
    """Path of the cached initramfs for ``kernel`` (rebuilt when INIT changes)."""
    key = hashlib.sha1((INIT + repr(MODULES)).encode()).hexdigest()[:10]
    path = os.path.join(kernels.CACHE, kernel.version, "initramfs-%s.cpio" % key)
    if os.path.exists(path):
        return path
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    mods = _modules_in_order(kernel)
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "modules")]
    entries += [("dev/console", 0o20600, (5, 1)),
                ("bin/busybox", 0o100755, busybox),
                ("init", 0o100755, INIT.encode()),
                ("modules/order", 0o100644,
                 "".join(n + "\n" for n, _ in mods).encode())]
    entries += [("modules/%s.ko" % n, 0o100644, data) for n, data in mods]
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(_cpio(entries))
    os.rename(tmp, path)
    return path


def vmlinux(kernel):
    path = os.path.join(kernels.CACHE, kernel.version, "vmlinux")
    if not os.path.exists(path):
        extract_vmlinux(kernel.vmlinuz, path)
    return path


def _cmd_script(argv, version, env):
    """The guest's cmd.sh: clean environment, cwd = checkout, exec argv."""
    path = os.path.dirname(sys.executable) + \
        ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    variables = ["PATH=" + path, "HOME=/root", "USER=root", "LOGNAME=root",
                 "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8", "TERM=dumb",
                 "TRACER_VM_KERNEL=" + version] + list(env)
    return "cd %s || exit 125\nexec /usr/bin/env -i %s %s\n" % (
        shlex.quote(REPO), " ".join(shlex.quote(v) for v in variables),
        " ".join(shlex.quote(a) for a in argv))


def _tail(path, n=6):
    """The console's first panic/oops line (if any) and its last n lines."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace").replace("\r", "")
    except IOError:
        return ""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    bad = [l for l in lines if re.search(r"Kernel panic|BUG:|Oops|sysrq: Trigger", l)]
    return " | ".join(bad[:1] + [l for l in lines[-n:] if l not in bad[:1]])


def run(version, argv, timeout=600, env=(), stdout=None, stderr=None):
    """Boot kernel ``version``, run ``argv`` in it; stream its output to the
    binary streams ``stdout``/``stderr`` (default: ours).  Returns a Result."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    kernel = kernels.fetch(version)
    result = Result(version, kernel.release)
    image, initrd = vmlinux(kernel), initramfs(kernel)
    rundir = tempfile.mkdtemp(prefix="tracer-vm-")
    try:
        with open(os.path.join(rundir, "cmd.sh"), "w") as f:
            f.write(_cmd_script(argv, version, env))
        console = os.path.join(rundir, "console.log")
        listeners = {}
        for name in ("out", "err", "ctl"):
            s = socket.socket(socket.AF_UNIX)
            s.bind(os.path.join(rundir, name + ".sock"))
            s.listen(1)
            listeners[name] = s
        cmd = QEMU + [
            "-kernel", image, "-initrd", initrd,
            "-append", "%s tvm_run=%s tvm_repo=%s" % (CMDLINE, rundir, REPO),
            "-chardev", "file,id=con,path=" + console, "-serial", "chardev:con"]
        for name in ("out", "err", "ctl"):
            cmd += ["-chardev", "socket,id=%s,path=%s" % (name, os.path.join(
                rundir, name + ".sock")), "-serial", "chardev:" + name]
        cmd += ["-fsdev", "local,id=root,path=/,readonly=on,security_model=none,"
                "multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
                "-fsdev", "local,id=repo,path=%s,security_model=none,multidevs=remap"
                % REPO,
                "-device", "virtio-9p-pci,fsdev=repo,mount_tag=repo"]
        _boot(cmd, listeners, result, timeout, stdout, stderr, console)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return result


def _boot(cmd, listeners, result, timeout, stdout, stderr, console):
    t0 = time.monotonic()
    deadline = t0 + timeout
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    for name, s in listeners.items():
        sel.register(s, selectors.EVENT_READ, ("listen", name))
    sel.register(qemu.stdout, selectors.EVENT_READ, ("qemu", None))
    sinks = {"out": stdout, "err": stderr}
    ctl, qemu_msgs, open_streams = b"", b"", 1
    t_start = t_exit = None
    try:
        while open_streams:     # qemu's stdout and serial sockets close when it exits
            left = deadline - time.monotonic()
            if left <= 0:
                result.infra = "kernel %s timed out after %d s (%s)" % (
                    result.version, timeout, "while booting" if t_start is None else
                    "command ran %.0f s" % (time.monotonic() - t_start))
                break
            for key, _ in sel.select(min(left, 1.0)):
                kind, name = key.data
                if kind == "listen":
                    conn, _ = key.fileobj.accept()
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    sel.register(conn, selectors.EVENT_READ, ("conn", name))
                    open_streams += 1
                    continue
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if kind == "qemu":
                    qemu_msgs += data
                elif name == "ctl":
                    ctl += data
                    if t_start is None and b"START" in ctl:
                        t_start = time.monotonic()
                    if t_exit is None and b"EXIT" in ctl:
                        t_exit = time.monotonic()
                else:
                    sinks[name].write(data)
                    sinks[name].flush()
        if not result.infra:
            qemu.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        result.infra = "kernel %s: qemu did not exit" % result.version
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        sel.close()
    exited = re.search(rb"^EXIT (\d+)", ctl, re.M)
    if result.infra:
        pass
    elif exited:
        result.status = int(exited.group(1))
        result.boot_s = (t_start or t0) - t0
        result.cmd_s = t_exit - (t_start or t0)
    else:
        infra = re.search(rb"^INFRA (.*)", ctl, re.M)
        why = infra.group(1).decode() if infra else "never reported a status"
        if qemu.returncode:
            why += " (qemu exit %d: %s)" % (
                qemu.returncode, qemu_msgs.decode("utf-8", "replace").strip()[-300:])
        result.infra = "kernel %s: %s" % (result.version, why)
    if result.infra:
        result.infra += " (last console lines: %s)" % (_tail(console) or "none")


def main():
    ap = argparse.ArgumentParser(
        usage="%(prog)s (--kernel VERSION[,VERSION...] | --all) [--timeout S] "
              "[-e NAME=VALUE] -- CMD [ARGS...]",
        description="Run CMD as root in a Debian kernel under qemu (see module doc).")
    ap.add_argument("--kernel", help="kernel(s), comma-separated: %s" % ", ".join(
        kernels.KERNELS))
    ap.add_argument("--all", action="store_true", help="run on every kernel in turn")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds per VM, boot included (default 600)")
    ap.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment variable for CMD")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no summary line for a single kernel")
    ap.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv or bool(args.all) == bool(args.kernel):
        ap.error("need CMD and exactly one of --kernel / --all")
    versions = list(kernels.KERNELS) if args.all else args.kernel.split(",")
    for v in versions:
        if v not in kernels.KERNELS:
            ap.error("unknown kernel %r (choose from %s)"
                     % (v, ", ".join(kernels.KERNELS)))
    results = []
    for v in versions:
        if len(versions) > 1:
            sys.stderr.write("vm: === kernel %s ===\n" % v)
            sys.stderr.flush()
        r = run(v, argv, args.timeout, args.env)
        results.append(r)
        if r.infra:
            sys.stderr.write("vm: infrastructure failure: %s\n" % r.infra)
        elif len(versions) == 1 and not args.quiet:
            sys.stderr.write(r.summary() + "\n")
        sys.stderr.flush()
    if len(results) == 1:
        return results[0].exit_code
    for r in results:
        sys.stderr.write(r.summary() + "\n")
    if any(r.infra for r in results):
        return INFRA_EXIT
    return 1 if any(r.status for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
