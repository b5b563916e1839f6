"""abi: what tracer.bpf.o must hold for this Python side to use it.

The one place on the Python side that says which maps the object defines
(MAPS: type, key and value size, entries, flags) and which programs the
tracer loads from it (PROGRAMS: kind and target).  Key and value sizes come
from the struct.Struct mirrors of tracer.bpf.h (conntrack.py,
offsetguess.py, and here for the structs only the kernel reads); entry
counts are the object's built values, and max_conns resizes the connection
tables when they are created (RESIZED_BY_MAX_CONNS).  The programs come
from backends.py's tables, every variant of each.

check_object() compares a parsed object (elfload.ObjectSpec) with this
before anything touches the kernel, and raises elfload.ObjectError naming
the first difference in one line, e.g.
    tracer.bpf.o: map 'conns': type LRU_HASH, expected HASH
"""

import collections
import itertools
import struct

import backends
import bpfsys
import conntrack
import elfload
import offsetguess

# enum bpf_map_type (include/uapi/linux/bpf.h): the types named in messages
MAP_TYPE_NAMES = {0: "UNSPEC", 1: "HASH", 2: "ARRAY", 3: "PROG_ARRAY", 4: "PERF_EVENT_ARRAY",
                  5: "PERCPU_HASH", 6: "PERCPU_ARRAY", 7: "STACK_TRACE", 8: "CGROUP_ARRAY",
                  9: "LRU_HASH", 10: "LRU_PERCPU_HASH", 11: "LPM_TRIE", 12: "ARRAY_OF_MAPS",
                  13: "HASH_OF_MAPS", 27: "RINGBUF"}
HASH = bpfsys.BPF_MAP_TYPE_HASH
ARRAY = bpfsys.BPF_MAP_TYPE_ARRAY
PERCPU_ARRAY = bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY
LRU_HASH = 9  # BPF_MAP_TYPE_LRU_HASH

U32, U64 = 4, 8
# struct peer in tracer.bpf.h (a message's peer address; kernel-only)
PEER = struct.Struct("<16sHB5s")
# struct stash in tracer.bpf.h (one thread's syscall state; kernel-only)
STASH = struct.Struct("<QQQqq%dsB7s" % PEER.size)
GUESS_DUMP_SIZE = offsetguess.GUESS_DUMP_HEAD.size + offsetguess.GUESS_SK_BYTES + \
    offsetguess.GUESS_NET_BYTES  # struct guess_dump
TELE_MAX = len(conntrack.TELEMETRY_NAMES)  # TELE_MAX in tracer.bpf.h
TPF_MAX = 24  # TPF_MAX in tracer.bpf.h: tp_fields slots (backends.TP_FIELDS uses the first ones)
CONN_TABLE_ENTRIES = 65536  # conns, socks and dirty as built (--max-conns changes them at load)
LICENSE = "GPL"  # the programs call GPL-only helpers (bpf_probe_read_kernel, ...)

MapABI = collections.namedtuple("MapABI", "name map_type key_size value_size max_entries flags "
                                          "key_is value_is required")


def _map(name, map_type, key, value, entries, required=True):
    """key, value: (size, what it is) -- the C type, for messages."""
    return MapABI(name, map_type, key[0], value[0], entries, 0, key[1], value[1], required)


_TUPLE = (conntrack.CONN_TUPLE.size, "struct conn_tuple")
_SOCK = (U64, "__u64 struct sock address")
_TID = (U64, "__u64 pid_tgid")
_INDEX = (U32, "__u32 index")
_COUNTER = (U64, "__u64")

# every map of tracer.bpf.c (MAP(...) lines), in its order
MAPS = (
    _map("conns", HASH, _TUPLE, (conntrack.CONN_STATS.size, "struct conn_stats"), CONN_TABLE_ENTRIES),
    _map("socks", HASH, _SOCK, (conntrack.SOCK_INFO.size, "struct sock_info"), CONN_TABLE_ENTRIES),
    _map("stash", LRU_HASH, _TID, (STASH.size, "struct stash"), 16384),
    _map("dirty", HASH, _TUPLE, (U64, "__u64 struct sock address"), CONN_TABLE_ENTRIES),
    _map("skip_socks", LRU_HASH, _SOCK, (U32, "__u32 SKIP_*"), 16384),
    _map("udp_next", LRU_HASH, _SOCK, (PEER.size, "struct peer"), 16384),
    _map("synack_retrans", LRU_HASH, _TUPLE, (U32, "__u32 count"), 4096),
    # per-CPU copy of the start of a struct sock (read_tuple_block): SKC_BLOCK
    # (128) + 16 bytes; new in tracer.bpf.c, so checked where the object has it
    _map("skc_copy", PERCPU_ARRAY, _INDEX, (offsetguess.SKC_BLOCK + 16, "SKC_BLOCK + 16 bytes"), 1),
    _map("life_seq", ARRAY, _INDEX, _COUNTER, 1),
    _map("offsets", ARRAY, _INDEX, (offsetguess.OFFSETS.size, "struct offsets"), 1),
    _map("telemetry", ARRAY, _INDEX, _COUNTER, TELE_MAX),
    _map("tp_fields", ARRAY, _INDEX, (U32, "__u32 field offset"), TPF_MAX),
    _map("guess_req", ARRAY, _INDEX, (offsetguess.GUESS_REQ.size, "struct guess_req"), 1),
    _map("guess_dump", ARRAY, _INDEX, (GUESS_DUMP_SIZE, "struct guess_dump"), 1),
    # the self-test programs' maps: checked where the object has them
    _map("test_counts", ARRAY, _INDEX, _COUNTER, 4, required=False),
    _map("test_bytes", HASH, (U32, "__u32 pid"), _COUNTER, 1024, required=False),
)
MAPS_BY_NAME = collections.OrderedDict((m.name, m) for m in MAPS)

# max_conns resizes these, times the factor, when the maps are created
RESIZED_BY_MAX_CONNS = collections.OrderedDict([("conns", 1), ("socks", 1), ("dirty", 2)])
MAX_CONNS_LIMIT = ((1 << 32) - 1) // max(RESIZED_BY_MAX_CONNS.values())

# the placeholders of backends' program names, and every value plan() gives them
_NAME_VARIANTS = collections.OrderedDict([("recv", ("", "_pre_5_19")), ("err", ("", "_err"))])


def _variants(name):
    names = []
    for values in itertools.product(*_NAME_VARIANTS.values()):
        n = name.rstrip("?").format(**dict(zip(_NAME_VARIANTS, values)))
        if n not in names:
            names.append(n)
    return names


def _programs():
    """{program: (kind, target)} of every program the tracer may load."""
    out = collections.OrderedDict()
    rows = [(p, k, t) for p, k, t, _ in backends.TRACEPOINT_PROGRAMS]
    rows += [(p, k, t) for p, k, t, _ in backends.KPROBE_PROGRAMS]
    rows += list(backends.SYSCALL_FALLBACK)
    rows += [(alt, "tracepoint", t) for alt, t in backends.PERF_FALLBACK.values()]
    for backend in sorted(backends.GUESS_PROGRAMS):
        rows += list(backends.GUESS_PROGRAMS[backend])
    for prog, kind, target in rows:
        for name in _variants(prog):
            out.setdefault(name, (kind, target.rstrip("?")))
    return out


PROGRAMS = _programs()


def programs_to_load(backend, plan):
    """Names of the programs a Tracer loads at start: the plan's and the
    backend's guess programs.  The fallbacks attach_all may turn to (perf
    tracepoints for raw ones, syscall tracepoints for the cgroup hooks) are
    loaded only when needed: their verification would cost startup time
    that almost no kernel needs (check_object has made sure they exist)."""
    return [p for p, _, _ in plan] + [p for p, _, _ in backends.GUESS_PROGRAMS[backend]]


def map_entries(max_conns):
    """{map: entries} overrides for ObjectSpec.load (None: as built)."""
    if not max_conns:
        return None
    if not 0 < max_conns <= MAX_CONNS_LIMIT:
        raise ValueError("max_conns %d is out of range (1 to %d)" % (max_conns, MAX_CONNS_LIMIT))
    return dict((name, k * max_conns) for name, k in RESIZED_BY_MAX_CONNS.items())


def _type_name(t):
    return MAP_TYPE_NAMES.get(t, str(t))


def _entries(n):
    return "%d entr%s" % (n, "y" if n == 1 else "ies")


def _shape(m):
    return "%s, key %d bytes, value %d bytes, %s" % (
        _type_name(m.map_type), m.key_size, m.value_size, _entries(m.max_entries))


def check_object(spec, programs=None):
    """Raise elfload.ObjectError naming the first way spec differs from
    what the tracer needs: a map missing, unknown, or of another type, key
    size, value size, entry count or flags; a program missing or with another
    kind or target; a license that is not GPL.  programs: the names to
    check (every one in PROGRAMS when None).  Returns None."""
    def bad(msg):
        return elfload.ObjectError("%s: %s" % (spec.path, msg))

    for want in MAPS:
        got = spec.maps.get(want.name)
        if got is None:
            if want.required:
                raise bad("map %r is missing (expected %s)" % (want.name, _shape(want)))
            continue
        if got.map_type != want.map_type:
            raise bad("map %r: type %s, expected %s" % (
                want.name, _type_name(got.map_type), _type_name(want.map_type)))
        if got.key_size != want.key_size:
            raise bad("map %r: key %d bytes, expected %d (%s)" % (
                want.name, got.key_size, want.key_size, want.key_is))
        if got.value_size != want.value_size:
            raise bad("map %r: value %d bytes, expected %d (%s)" % (
                want.name, got.value_size, want.value_size, want.value_is))
        if got.max_entries != want.max_entries:
            raise bad("map %r: %s, expected %d" % (want.name, _entries(got.max_entries),
                                                  want.max_entries))
        if got.flags != want.flags:
            raise bad("map %r: flags 0x%x, expected 0x%x" % (want.name, got.flags, want.flags))
    for name in sorted(spec.maps):
        if name not in MAPS_BY_NAME:
            # load() would make it in the kernel, with whatever shape it has
            raise bad("map %r is unknown to this tracer (its maps: %s)" % (
                name, ", ".join(MAPS_BY_NAME)))
    for name in (PROGRAMS if programs is None else programs):
        got = spec.programs.get(name)
        want = PROGRAMS.get(name)
        if got is None:
            raise bad("program %r is missing%s" % (
                name, " (expected in section '%s/%s')" % want if want else ""))
        if want is not None and (got.kind, got.target) != want:
            raise bad("program %r: section %r, expected '%s/%s'" % (name, got.section,
                                                                   want[0], want[1]))
    if spec.license != LICENSE:
        raise bad("license %r, expected %r (the programs call GPL-only helpers)" % (
            spec.license, LICENSE))
