"""bpfsys: the kernel interface of tracer-bpf, in ctypes and the standard library.

Raw bpf() and perf_event_open() syscalls, the ioctls that bind a program to a
perf event, tracefs (found or mounted; kprobe_events entries), and one small
owner class per kernel object (Map, Program, and the links) whose close()
releases it.  Every ABI number and struct layout used lives in this file.
"""

import ctypes
import errno
import mmap
import os
import platform
import resource
import struct
import threading

# --- ABI numbers -----------------------------------------------------------

# x86-64 only: the BPF programs read x86-64 struct pt_regs, and the offset
# guesser knows x86-64 kernel pointers (README: "x86_64 only")
_SYSCALLS = {  # machine: (bpf, perf_event_open, gettid)
    "x86_64": (321, 298, 186),
}


def machine_error(machine=None):
    """None on x86_64, else the one-line reason tracing cannot run here."""
    m = machine or platform.machine()
    if m in _SYSCALLS:
        return None
    return ("tracer-bpf runs on x86_64 only (its BPF programs read x86-64 registers and "
            "its offset guessing knows x86-64 kernel addresses); this machine is %s" % m)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28

CMD_NAMES = {
    BPF_MAP_CREATE: "BPF_MAP_CREATE", BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM", BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY", BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_RAW_TRACEPOINT_OPEN: "BPF_RAW_TRACEPOINT_OPEN",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_MAP_LOOKUP_BATCH: "BPF_MAP_LOOKUP_BATCH",
    BPF_MAP_LOOKUP_AND_DELETE_BATCH: "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
    BPF_MAP_DELETE_BATCH: "BPF_MAP_DELETE_BATCH",
}

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18

# expected_attach_type / attach_type of the cgroup sock_addr hooks
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
CGROUP_ATTACH_TYPES = {"sendmsg4": BPF_CGROUP_UDP4_SENDMSG, "sendmsg6": BPF_CGROUP_UDP6_SENDMSG,
                       "recvmsg4": BPF_CGROUP_UDP4_RECVMSG, "recvmsg6": BPF_CGROUP_UDP6_RECVMSG}

BPF_PSEUDO_MAP_FD = 1

PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_BPF = 0x40042408

ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space

# struct bpf_prog_info (uapi): size, and offsets of the counters we read
_PROG_INFO_SIZE = 232
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_RUN_CNT = 200
_PROG_INFO_RECURSION_MISSES = 208  # 5.12+; older kernels leave it 0

# union bpf_attr is 128+ bytes; we pass a zeroed buffer of this size.
_ATTR_SIZE = 128
# struct perf_event_attr, PERF_ATTR_SIZE_VER5.
_PERF_ATTR_SIZE = 112

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)


class BPFError(OSError):
    """A failed kernel call: which call, on what, the errno name, and for a
    verifier rejection the tail of the verifier log."""

    def __init__(self, err, what, log=""):
        name = errno.errorcode.get(err, "ENOTSUPP" if err == ENOTSUPP else str(err))
        msg = "%s: %s (%s)" % (what, name, os.strerror(err) if err != ENOTSUPP else "operation not supported")
        if log:
            msg += "\nverifier log (last lines):\n" + log
        OSError.__init__(self, err, msg)
        self.what = what
        self.log = log

    def __str__(self):
        return self.args[1]


def _machine():
    m = platform.machine()
    if m not in _SYSCALLS:
        raise OSError(errno.ENOSYS, machine_error(m))
    return m


def _buf(size):
    return ctypes.create_string_buffer(size)


def _addr(buf):
    return ctypes.addressof(buf) if buf is not None else 0


def release_freed():
    """Hand the C heap's free pages back to the kernel (glibc's
    malloc_trim; elsewhere nothing).  A full read of a large table frees
    megabytes of batches in the heap's middle, which glibc keeps resident
    until asked: a caller's peak RSS counts them under what it allocates
    next."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def bpf(cmd, attr, what=None):
    """bpf(cmd, attr): returns the result, raises BPFError with context."""
    nr = _SYSCALLS[_machine()][0]
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, what or "bpf(%s)" % CMD_NAMES.get(cmd, cmd))
    return ret


def _attr(fmt, *values):
    attr = _buf(_ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


def gettid():
    """The calling thread's id (threading.get_native_id needs 3.8)."""
    return _libc.syscall(_SYSCALLS[_machine()][2])


CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def missing_capabilities(status="/proc/self/status"):
    """The capabilities tracing needs that this process's effective set
    lacks: [] with CAP_SYS_ADMIN, or with CAP_BPF and CAP_PERFMON; else the
    names of those of CAP_BPF and CAP_PERFMON missing."""
    with open(status) as f:
        eff = int([l.split()[1] for l in f if l.startswith("CapEff:")][0], 16)
    if eff >> CAP_SYS_ADMIN & 1:
        return []
    return [n for n, bit in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON))
            if not eff >> bit & 1]


def raise_memlock_limit():
    """Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass


def close_fd(fd):
    try:
        os.close(fd)
    except OSError:
        pass


# --- owners of kernel objects -------------------------------------------------

class KernelObject(object):
    """One file descriptor (or other kernel state) with close()."""

    fd = -1

    def close(self):
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# the errors of a kernel (or map type) without batch operations
_NO_BATCH = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP, errno.ENOSYS)


class Map(KernelObject):
    """A BPF map.  Keys and values are bytes of key_size and value_size."""

    def __init__(self, map_type, key_size, value_size, max_entries, flags=0, name=""):
        raise_memlock_limit()
        attr = _attr("IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0,
                     _kname(name))
        what = "bpf(BPF_MAP_CREATE) for map '%s' (type %d, key %d, value %d, %d entries)" % (
            name, map_type, key_size, value_size, max_entries)
        try:
            self.fd = bpf(BPF_MAP_CREATE, attr, what)
        except BPFError as e:
            if e.errno != errno.EINVAL or not name:
                raise
            # kernels before 4.15 reject map names
            attr = _attr("IIIIIII", map_type, key_size, value_size, max_entries, flags, 0, 0)
            self.fd = bpf(BPF_MAP_CREATE, attr, what)
        self.name = name
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._batch_ok = None  # unknown until tried
        self._batch_bufs = None

    def _elem(self, cmd, key, value=None, flags=0):
        kbuf = _buf(self.key_size)
        kbuf.raw = _fit(key, self.key_size, "key")
        attr = _attr("IIQQQ", self.fd, 0, _addr(kbuf), _addr(value), flags)
        return bpf(cmd, attr, "bpf(%s) on map '%s'" % (CMD_NAMES[cmd], self.name))

    def lookup(self, key):
        """The value of key as bytes, or None when absent."""
        vbuf = _buf(self.value_size)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, vbuf)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return vbuf.raw

    def update(self, key, value, flags=BPF_ANY):
        vbuf = _buf(self.value_size)
        vbuf.raw = _fit(value, self.value_size, "value")
        self._elem(BPF_MAP_UPDATE_ELEM, key, vbuf, flags)

    def delete(self, key):
        """Delete key; False when it was absent."""
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self):
        """All keys, by BPF_MAP_GET_NEXT_KEY."""
        kbuf = _buf(self.key_size)
        nbuf = _buf(self.key_size)
        attr = _attr("IIQQ", self.fd, 0, 0, _addr(nbuf))  # NULL key: the first one
        what = "bpf(BPF_MAP_GET_NEXT_KEY) on map '%s'" % self.name
        out = []
        while True:
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr, what)
            except BPFError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nbuf.raw)
            ctypes.memmove(kbuf, nbuf, self.key_size)
            struct.pack_into("IIQQ", attr, 0, self.fd, 0, _addr(kbuf), _addr(nbuf))

    def items_per_key(self):
        """All (key, value) pairs by get-next-key then lookup."""
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:  # deleted meanwhile
                out.append((k, v))
        return out

    def read_batch(self, delete=False):
        """All entries as (keys, values), two lists of bytes, with
        BPF_MAP_LOOKUP_BATCH (or, with delete, LOOKUP_AND_DELETE_BATCH).
        Raises BPFError(EINVAL/ENOTSUPP) where the kernel or map type lacks it."""
        out_k, out_v = [], []
        for keys, values in self.batches(delete):
            out_k.extend(keys)
            out_v.extend(values)
        return out_k, out_v

    def batches(self, delete=False, raw=False, value_len=None):
        """The entries, one kernel batch at a time (up to 2048): yields
        (keys, values), two lists of bytes, as read_batch reads them; a
        caller that keeps few of them never holds the whole map.  With raw,
        (keys, values) are each one bytes object, the batch's keys (or
        values) end to end.  With value_len (not raw), each value is cut to
        its first value_len bytes."""
        cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
        what = "bpf(%s) on map '%s'" % (CMD_NAMES[cmd], self.name)
        ks, vs = self.key_size, self.value_size
        vl = min(value_len or vs, vs)
        if self._batch_bufs is None:  # kept: a poll loop reads every interval
            # (2048: what a batch's objects cost while it is split, ~0.5 MB
            # for socks, stays small; the syscalls are not what costs)
            count = max(64, min(self.max_entries, 2048))
            self._batch_bufs = (count, _buf(ks * count), _buf(vs * count))
        count, keys, values = self._batch_bufs
        tok_in = _buf(max(ks, 8))
        tok_out = _buf(max(ks, 8))
        first = True
        while True:
            attr = _attr("QQQQIIQQ", 0 if first else _addr(tok_in), _addr(tok_out),
                         _addr(keys), _addr(values), count, self.fd, 0, 0)
            done = False
            try:
                bpf(cmd, attr, what)
            except BPFError as e:
                if e.errno == errno.ENOSPC:
                    # a bucket holds more entries than count: grow and retry
                    count *= 2
                    keys = _buf(ks * count)
                    values = _buf(vs * count)
                    self._batch_bufs = (count, keys, values)
                    continue
                if e.errno != errno.ENOENT:
                    raise
                done = True
            n = struct.unpack_from("I", attr, 32)[0]
            if n:
                kraw, vraw = ctypes.string_at(keys, n * ks), ctypes.string_at(values, n * vs)
                if raw:
                    yield kraw, vraw
                else:
                    chunk = ([kraw[i:i + ks] for i in range(0, n * ks, ks)],
                             [vraw[i:i + vl] for i in range(0, n * vs, vs)])
                    del kraw, vraw  # (not held while the caller has the chunk)
                    yield chunk
                    del chunk
                kraw = vraw = None
            if done:
                return
            ctypes.memmove(tok_in, tok_out, len(tok_out))
            first = False

    def items_batch(self, delete=False):
        """All (key, value) pairs by batch lookup (see read_batch)."""
        keys, values = self.read_batch(delete)
        return list(zip(keys, values))

    def read_all(self):
        """All entries as (keys, values): batched where the kernel can, else
        per key."""
        if self._batch_ok is not False:
            try:
                out = self.read_batch()
                self._batch_ok = True
                return out
            except BPFError as e:
                if e.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        pairs = self.items_per_key()
        return [k for k, _ in pairs], [v for _, v in pairs]

    def read_chunks(self, value_len=None):
        """All entries, yielded as (keys, values) a kernel batch at a time
        where the kernel can batch, else in one chunk read per key.  With
        value_len, each value is cut to its first value_len bytes."""
        if self._batch_ok is not False:
            yielded = False
            try:
                for chunk in self.batches(value_len=value_len):
                    self._batch_ok = yielded = True
                    yield chunk
                    chunk = None  # (not held while the next batch is read)
                self._batch_ok = True
                return
            except BPFError as e:
                # the first batch fails where the kernel cannot batch
                if yielded or e.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        keys, values = self.read_all()
        if value_len is not None and value_len < self.value_size:
            values = [v[:value_len] for v in values]
        yield keys, values

    def items(self):
        """All (key, value) pairs: batched where the kernel can, else per key."""
        keys, values = self.read_all()
        return list(zip(keys, values))

    def delete_keys(self, keys):
        """Delete many keys (batched where possible); returns how many went."""
        keys = list(keys)
        if not keys:
            return 0
        if self._batch_ok:
            kbuf = _buf(self.key_size * len(keys))
            kbuf.raw = b"".join(keys)
            attr = _attr("QQQQIIQQ", 0, 0, _addr(kbuf), 0, len(keys), self.fd, 0, 0)
            try:
                bpf(BPF_MAP_DELETE_BATCH, attr, "bpf(BPF_MAP_DELETE_BATCH) on map '%s'" % self.name)
                return len(keys)
            except BPFError as e:
                if e.errno != errno.ENOENT:
                    raise
                # the kernel stopped at a key already gone, having deleted
                # the `count` keys before it: go on key by key after it
                done = struct.unpack_from("I", attr, 32)[0]
                return done + sum(1 for k in keys[done + 1:] if self.delete(k))
        return sum(1 for k in keys if self.delete(k))


class RingBuffer(object):
    """The reading side of a BPF ring buffer map (Linux 5.8+), memory-mapped
    as the kernel lays it out: a consumer page (read-write), then a producer
    page and the data pages, mapped twice in a row so that a record that
    wraps reads as one (read-only).  select() on fileno() waits for data."""

    BUSY, DISCARD, HEADER = 1 << 31, 1 << 30, 8

    def __init__(self, bpf_map):
        self.map = bpf_map
        self.size = bpf_map.max_entries
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(bpf_map.fd, page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._prod = mmap.mmap(bpf_map.fd, page + 2 * self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        except BaseException:
            self._cons.close()
            raise
        self._page = page

    def fileno(self):
        return self.map.fd

    def read(self, limit=None):
        """The records written since the last read (bytes each, oldest
        first; at most limit), and their space handed back to the kernel."""
        out = []
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        mask = self.size - 1
        while cons < prod and (limit is None or len(out) < limit):
            at = self._page + (cons & mask)
            length = struct.unpack_from("<I", self._prod, at)[0]
            if length & self.BUSY:  # reserved, not yet committed
                break
            n = length & ~(self.BUSY | self.DISCARD)
            if not length & self.DISCARD:
                out.append(self._prod[at + self.HEADER:at + self.HEADER + n])
            cons += (n + self.HEADER + 7) & ~7
            struct.pack_into("<Q", self._cons, 0, cons)
            if cons >= prod:
                prod = struct.unpack_from("<Q", self._prod, 0)[0]
        return out

    def close(self):
        for m in (self._cons, self._prod):
            m.close()


def _fit(data, size, what):
    if len(data) != size:
        raise ValueError("%s is %d bytes, the map wants %d" % (what, len(data), size))
    return data


def _kname(name):
    """Kernel object names: 15 chars of [A-Za-z0-9_.]."""
    clean = "".join(c if (c.isalnum() or c in "_.") else "_" for c in name)
    return clean[:15].encode()


class Program(KernelObject):
    """A loaded BPF program."""

    def __init__(self, prog_type, insns, license="GPL", name="", kern_version=0,
                 expected_attach_type=0):
        raise_memlock_limit()
        self.name = name
        self.prog_type = prog_type
        self.expected_attach_type = expected_attach_type
        self.fd = self._load(prog_type, insns, license, name, kern_version, None,
                             expected_attach_type)

    def stats(self):
        """{run_cnt, run_time_ns (0 unless kernel.bpf_stats_enabled),
        recursion_misses (runs the kernel skipped; 5.12+)}."""
        info = _buf(_PROG_INFO_SIZE)
        attr = _attr("IIQ", self.fd, _PROG_INFO_SIZE, _addr(info))
        bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "bpf(BPF_OBJ_GET_INFO_BY_FD) for program '%s'" % self.name)
        return {
            "run_time_ns": struct.unpack_from("Q", info, _PROG_INFO_RUN_TIME_NS)[0],
            "run_cnt": struct.unpack_from("Q", info, _PROG_INFO_RUN_CNT)[0],
            "recursion_misses": struct.unpack_from("Q", info, _PROG_INFO_RECURSION_MISSES)[0],
        }

    @staticmethod
    def _load(prog_type, insns, license, name, kern_version, log, expected_attach_type=0):
        insn_buf = _buf(len(insns))
        insn_buf.raw = insns
        lic = ctypes.create_string_buffer(license.encode())
        log_level, log_size = (1, len(log)) if log is not None else (0, 0)
        # ..., prog_flags, prog_name, prog_ifindex, expected_attach_type
        attr = _attr("IIQQIIQII16sII", prog_type, len(insns) // 8, _addr(insn_buf), _addr(lic),
                     log_level, log_size, _addr(log), kern_version, 0, _kname(name), 0,
                     expected_attach_type)
        what = "bpf(BPF_PROG_LOAD) for program '%s'" % name
        try:
            return bpf(BPF_PROG_LOAD, attr, what)
        except BPFError as e:
            if log is not None:
                raise BPFError(e.errno, what, _log_tail(log))
            if e.errno in (errno.EACCES, errno.EINVAL, errno.E2BIG, errno.ENOSPC):
                # load again with the verifier log on, to say why
                return Program._load(prog_type, insns, license, name, kern_version,
                                     _buf(4 << 20), expected_attach_type)
            raise


def _log_tail(log, lines=25):
    text = log.value.decode("utf-8", "replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:])


# --- perf events and attach points -----------------------------------------------

def perf_event_open(ptype, config, cpu=0, pid=-1, config1=0, config2=0, what="perf_event_open"):
    attr = _buf(_PERF_ATTR_SIZE)
    # type, size, config, sample_period, sample_type, read_format, flags(bits),
    # wakeup_events, bp_type, config1, config2
    struct.pack_into("IIQQQQQIIQQ", attr, 0, ptype, _PERF_ATTR_SIZE, config, 1, 0, 0, 0, 1, 0,
                     config1, config2)
    nr = _SYSCALLS[_machine()][1]
    fd = _libc.syscall(nr, attr, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise BPFError(ctypes.get_errno(), what)
    return fd


def _ioctl(fd, req, arg, what):
    if _libc.ioctl(fd, req, arg) < 0:
        raise BPFError(ctypes.get_errno(), what)


class PerfEventLink(KernelObject):
    """A program attached to one perf event (tracepoint or kprobe).  For a
    tracepoint or kprobe, the kernel runs the program on every CPU, so one
    event (cpu 0, any pid) is enough.  Optionally owns a tracefs kprobe
    entry, removed on close."""

    def __init__(self, prog, ptype, config, what, config1=0, tracefs_entry=None):
        self.tracefs_entry = tracefs_entry
        try:
            self.fd = perf_event_open(ptype, config, config1=config1, what="perf_event_open(%s)" % what)
            _ioctl(self.fd, PERF_EVENT_IOC_SET_BPF, prog.fd, "ioctl(PERF_EVENT_IOC_SET_BPF) on %s" % what)
            _ioctl(self.fd, PERF_EVENT_IOC_ENABLE, 0, "ioctl(PERF_EVENT_IOC_ENABLE) on %s" % what)
        except Exception:
            self.close()
            raise
        self.what = what

    def close(self):
        if self.fd >= 0:
            _libc.ioctl(self.fd, PERF_EVENT_IOC_DISABLE, 0)
        KernelObject.close(self)
        if self.tracefs_entry is not None:
            entry, self.tracefs_entry = self.tracefs_entry, None
            entry.remove()


class RawTracepointLink(KernelObject):
    def __init__(self, prog, name):
        cname = ctypes.create_string_buffer(name.encode())
        attr = _attr("QI", _addr(cname), prog.fd)
        self.fd = bpf(BPF_RAW_TRACEPOINT_OPEN, attr,
                      "bpf(BPF_RAW_TRACEPOINT_OPEN) for '%s' (program '%s')" % (name, prog.name))
        self.what = "raw_tracepoint/" + name


class CgroupLink(KernelObject):
    """A cgroup program attached with BPF_LINK_CREATE (5.7+): detached when
    the link fd closes, by close() or by the process's end, so a killed
    tracer leaves nothing attached.  Owns a cgroup2 mount it made."""

    def __init__(self, prog, hook, cgroup):
        self.cgroup = cgroup
        self.what = "cgroup/%s on %s" % (hook, cgroup.path)
        try:
            attr = _attr("IIII", prog.fd, cgroup.fd, CGROUP_ATTACH_TYPES[hook], 0)
            self.fd = bpf(BPF_LINK_CREATE, attr, "bpf(BPF_LINK_CREATE) for %s (program '%s')"
                          % (self.what, prog.name))
        except Exception:
            self.close()
            raise

    def close(self):
        KernelObject.close(self)
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            cgroup.release()


class Cgroup2Root(object):
    """An open fd of the cgroup2 hierarchy's root: the machine's, where
    mounted; else a private mount made for us, detached again as soon as
    the fd is open.  Programs attached to the root run for every process."""

    def __init__(self):
        self.refs = 0
        self.mounted = None
        self.path = _cgroup2_mount()
        if self.path is None:
            path = "/run/tracer-bpf-cgroup2-%d" % os.getpid()
            os.makedirs(path, exist_ok=True)
            if _libc.mount(b"none", path.encode(), b"cgroup2", 0, None) != 0:
                err = ctypes.get_errno()
                os.rmdir(path)
                raise OSError(err, "no cgroup2 hierarchy, and mounting one on %s failed: %s"
                              % (path, os.strerror(err)))
            self.path = self.mounted = path
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            # the fd holds the cgroup: a private mount is not needed after
            # this, and a tracer killed with SIGKILL leaves none behind
            self._unmount()

    def acquire(self):
        self.refs += 1
        return self

    def release(self):
        self.refs -= 1
        if self.refs <= 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._unmount()

    def _unmount(self):
        if self.mounted:
            _libc.umount2(self.mounted.encode(), 2)  # MNT_DETACH
            try:
                os.rmdir(self.mounted)
            except OSError:
                pass
            self.mounted = None


def _cgroup2_mount():
    """Where the cgroup2 hierarchy is mounted at its root, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if parts[sep + 1] == "cgroup2" and parts[3] == "/":
                    return parts[4]
    except (IOError, OSError, ValueError, IndexError):
        pass
    return None


def attach_cgroup(prog, hook, cgroup):
    """Attach a cgroup sock_addr program (hook: sendmsg4, recvmsg6, ...)."""
    return CgroupLink(prog, hook, cgroup.acquire())


# --- tracefs -------------------------------------------------------------------

_TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_tracefs_lock = threading.Lock()


def tracefs(mount=True):
    """The tracefs directory; mounted at /sys/kernel/tracing when absent.
    Raises OSError saying why when it can be neither found nor mounted."""
    with _tracefs_lock:
        for d in _TRACEFS_CANDIDATES:
            if os.path.isdir(os.path.join(d, "events")):
                return d
        if not mount:
            raise OSError(errno.ENOENT, "tracefs is not mounted")
        target = _TRACEFS_CANDIDATES[0]
        if _libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "tracefs is not mounted and mounting it on %s failed: %s "
                          "(mount it with: mount -t tracefs nodev %s)" % (target, os.strerror(err), target))
        return target


def tracepoint_id(category, name):
    path = os.path.join(tracefs(), "events", category, name, "id")
    try:
        with open(path) as f:
            return int(f.read())
    except (IOError, OSError):
        raise OSError(errno.ENOENT, "tracepoint %s:%s not found (%s missing)" % (category, name, path))


def tracepoint_fields(category, name):
    """{field name: (offset, size)} from the tracepoint's format file."""
    path = os.path.join(tracefs(), "events", category, name, "format")
    fields = {}
    try:
        with open(path) as f:
            text = f.read()
    except (IOError, OSError):
        raise OSError(errno.ENOENT, "tracepoint %s:%s not found (%s missing)" % (category, name, path))
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = dict(p.strip().split(":", 1) for p in line.split(";") if ":" in p)
        decl = parts["field"].strip()
        fname = decl.split()[-1].split("[")[0].lstrip("*")
        fields[fname] = (int(parts["offset"]), int(parts["size"]))
    return fields


def attach_tracepoint(prog, category, name):
    return PerfEventLink(prog, PERF_TYPE_TRACEPOINT, tracepoint_id(category, name),
                         "tracepoint %s:%s" % (category, name))


def attach_raw_tracepoint(prog, name):
    return RawTracepointLink(prog, name)


def kprobe_pmu():
    """(type, retprobe config bit) of the kprobe PMU, or None without one."""
    base = "/sys/bus/event_source/devices/kprobe"
    try:
        with open(base + "/type") as f:
            ptype = int(f.read())
        with open(base + "/format/retprobe") as f:
            bit = int(f.read().strip().split(":")[1])  # "config:0"
    except (IOError, OSError, ValueError, IndexError):
        return None
    return ptype, bit


def kprobe_events_path():
    try:
        path = os.path.join(tracefs(), "kprobe_events")
    except OSError:
        return None
    return path if os.path.exists(path) else None


_KPROBE_GROUP_PREFIX = "tracer_bpf_"
_kprobe_seq = [0]


def kprobe_group():
    """Our tracefs event group: unique per process."""
    return "%s%d" % (_KPROBE_GROUP_PREFIX, os.getpid())


class KprobeEvent(object):
    """One entry in tracefs kprobe_events, written with a unique name."""

    def __init__(self, func, retprobe=False, maxactive=0):
        self.path = kprobe_events_path()
        if self.path is None:
            raise OSError(errno.ENOENT, "no kprobe_events in tracefs: this kernel has no kprobes "
                          "(CONFIG_KPROBES off); use --backend tracepoint")
        _kprobe_seq[0] += 1
        self.group = kprobe_group()
        self.name = "%s_%s_%d" % ("r" if retprobe else "p", _kname(func).decode(), _kprobe_seq[0])
        kind = ("r%d" % maxactive if maxactive else "r") if retprobe else "p"
        self._write("%s:%s/%s %s" % (kind, self.group, self.name, func),
                    "adding kprobe_events entry for %s" % func)
        self.removed = False
        idpath = os.path.join(os.path.dirname(self.path), "events", self.group, self.name, "id")
        try:
            with open(idpath) as f:
                self.id = int(f.read())
        except Exception:
            self.remove()
            raise

    def _write(self, line, what):
        # O_APPEND without seeking: open(..., "a") fails with EINVAL here
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (line + "\n").encode())
        except OSError as e:
            raise OSError(e.errno, "%s: %s" % (what, os.strerror(e.errno)))
        finally:
            os.close(fd)

    def remove(self):
        if not self.removed:
            self.removed = True
            try:
                self._write("-:%s/%s" % (self.group, self.name), "removing kprobe %s" % self.name)
            except OSError:
                pass


def kprobe_misses(names):
    """Missed hits (kprobe_profile) of our tracefs kprobe events, by name."""
    try:
        with open(os.path.join(tracefs(mount=False), "kprobe_profile")) as f:
            lines = f.read().splitlines()
    except (IOError, OSError):
        return 0
    total = 0
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0].split("/")[-1] in names:
            total += int(parts[2])
    return total


def remove_stale_kprobes():
    """Remove kprobe_events entries left by tracer processes that no longer
    run (killed with SIGKILL).  Returns the names removed."""
    path = kprobe_events_path()
    if path is None:
        return []
    removed = []
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        event = parts[0].split(":", 1)[1]
        group = event.split("/", 1)[0]
        if not group.startswith(_KPROBE_GROUP_PREFIX):
            continue
        pid = group[len(_KPROBE_GROUP_PREFIX):]
        if pid.isdigit() and (int(pid) == os.getpid() or os.path.exists("/proc/" + pid)):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, ("-:%s\n" % event).encode())
            removed.append(event)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def our_kprobe_events():
    """kprobe_events lines of any tracer-bpf process (tests check this)."""
    path = kprobe_events_path()
    if path is None:
        return []
    with open(path) as f:
        return [l for l in f.read().splitlines() if _KPROBE_GROUP_PREFIX in l]


def attach_kprobe(prog, func, retprobe=False, maxactive=0, method="auto"):
    """Attach prog at func's entry (or return).  method: 'pmu' (the kprobe
    PMU), 'tracefs' (kprobe_events), or 'auto' (PMU where present)."""
    kind = "kretprobe" if retprobe else "kprobe"
    pmu = kprobe_pmu() if method in ("auto", "pmu") else None
    if pmu is not None and not (retprobe and maxactive):
        ptype, bit = pmu
        name = ctypes.create_string_buffer(func.encode())
        link = PerfEventLink(prog, ptype, (1 << bit) if retprobe else 0,
                             "%s %s" % (kind, func), config1=_addr(name))
        link._func_name = name  # keep alive
        return link
    if method == "pmu":
        raise OSError(errno.ENOENT, "no kprobe PMU on this kernel")
    entry = KprobeEvent(func, retprobe, maxactive)
    try:
        return PerfEventLink(prog, PERF_TYPE_TRACEPOINT, entry.id, "%s %s (tracefs)" % (kind, func),
                             tracefs_entry=entry)
    except Exception:
        entry.remove()
        raise


def kallsyms_functions():
    """Names of the kernel's text symbols (compiler clones included)."""
    names = set()
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in ("t", "T"):
                names.add(parts[2])
    return names


def resolve_function(name, symbols):
    """The probe-able name for name: itself, else a compiler clone of it
    (name.isra.0, name.constprop.0, ...), else None."""
    if name in symbols:
        return name
    clones = sorted(s for s in symbols if s.startswith(name + ".") and not s.endswith(".cold"))
    return clones[0] if clones else None


def open_fds():
    """This process's open fds and what they point at (tests use this)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            pass
    return out
