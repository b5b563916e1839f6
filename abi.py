"""abi: the C<->Python contract with tracer.bpf.o, on the Python side.

The one Python mirror of tracer.bpf.h: one CStruct per C struct (an ordered
list of (field, struct format) giving a struct.Struct, decoded by field
name) and every shared constant, each written once here under its C name
(name tables such as ENDS and TELEMETRY_NAMES are derived from the
constants).  test/test_layout.py compiles the header and checks every
struct, field and constant below against it.

It also says what tracer.bpf.o must hold for this Python side to use it:
the maps (MAPS: type, key and value size, entries, flags) and the programs
the tracer loads from it (all_programs(): the names backends.REGISTRY
wants; their kind and target are their sections).  Entry counts are the
object's built values, and max_conns resizes the connection tables when
they are created (RESIZED_BY_MAX_CONNS).

check_object() compares a parsed object (elfload.ObjectSpec) with this
before anything touches the kernel, and raises elfload.ObjectError naming
the first difference in one line, e.g.
    tracer.bpf.o: map 'conns': type LRU_HASH, expected HASH

Imports no module of the tracer but bpfsys at module level: the others
(elfload included) import this one.
"""

import collections
import operator
import os
import struct

import bpfsys


class CStruct(object):
    """One C struct of tracer.bpf.h, packed as the compiler lays it out
    (every field at its natural alignment, padding written as _pad fields):
    .struct (a struct.Struct), .size, .names, .offset(name), .slice(name),
    unpack(data, offset=0) -> namedtuple, pack(**fields) (missing fields 0),
    and getter(*names) for hot loops: a function from .struct.unpack's tuple
    to those fields' values (operator.itemgetter, no Python frame)."""

    def __init__(self, c_name, fields):
        self.c_name = c_name
        self.fields = tuple(fields)
        self.names = tuple(name for name, _ in self.fields)
        self.formats = collections.OrderedDict(self.fields)
        self.struct = struct.Struct("<" + "".join(fmt for _, fmt in self.fields))
        self.size = self.struct.size
        self._offsets = {}
        at = 0
        for name, fmt in self.fields:
            self._offsets[name] = at
            at += struct.calcsize("<" + fmt)
        # _pad fields are renamed _<index> in the namedtuple
        self.record = collections.namedtuple(
            "".join(p.title() for p in c_name.split("_")), self.names, rename=True)
        self._zero = self.record(*[b"" if fmt.endswith("s") else 0 for _, fmt in self.fields])

    def offset(self, name):
        return self._offsets[name]

    def field_size(self, name):
        return struct.calcsize("<" + self.formats[name])

    def slice(self, name):
        """The bytes of field name inside a packed struct."""
        at = self._offsets[name]
        return slice(at, at + self.field_size(name))

    def getter(self, *names):
        return operator.itemgetter(*[self.names.index(n) for n in names])

    def unpack(self, data, offset=0):
        return self.record._make(self.struct.unpack_from(data, offset))

    def pack(self, **fields):
        unknown = set(fields) - set(self.names)
        if unknown:
            raise TypeError("struct %s has no field %s" % (self.c_name, ", ".join(sorted(unknown))))
        return self.struct.pack(*[fields.get(name, zero) for name, zero in zip(self.names, self._zero)])

    def __repr__(self):
        return "CStruct(%r, %d bytes)" % (self.c_name, self.size)


# --- constants of tracer.bpf.h, each under its C name ---------------------------------------

TRACER_PROTO_TCP = 6
TRACER_PROTO_UDP = 17

DIR_UNKNOWN = 0
DIR_OUTGOING = 1
DIR_INCOMING = 2

CONN_OPEN = 1
CONN_CLOSED = 2

# conn_stats.end: how a TCP connection ended (see tracer.bpf.h)
END_NONE = 0
END_FIN = 1
END_RESET_SENT = 2
END_RESET_RECEIVED = 3
END_TIMEOUT = 4
END_REFUSED = 5
END_CONNECT_TIMEOUT = 6
END_UNREACHABLE = 7
END_ABORTED = 8

# conn_event.type
EV_CONNECT = 1
EV_ACCEPT = 2
EV_CLOSE = 3
EV_CONNECT_FAILED = 4
EV_UDP_OPEN = 5

SOCK_OTHERS = 3
SKC_BLOCK = 128  # the bytes of struct sock that read_tuple_block copies
SCRATCH_BYTES = 288  # skc_copy's value: SKC_BLOCK + 16, or 256 + 32 (peer_from_ipv6_ext)
FL_BLOCK = 64  # the bytes of a struct flowi4/flowi6 read from its daddr

# sock_info.seq_flags (kprobe backend: bytes from the sequence counters)
SEQ_SEND = 1
SEQ_RECV = 2
SEQ_FIN = 4

# offsets.want
WANT_TCP = 1
WANT_UDP = 2
WANT_V4 = 4
WANT_V6 = 8
WANT_EVENTS = 16

# the process name while guessing (other tracers leave its connections out)
GUESS_COMM_LO = 0x673a726563617274
GUESS_COMM_HI = 0x00676e6973736575
GUESS_COMM = struct.pack("<QQ", GUESS_COMM_LO, GUESS_COMM_HI).rstrip(b"\0")  # b"tracer:guessing"

# guess_req.mode
GUESS_SOCK = 0
GUESS_TASK = 1
GUESS_TASK_AT = 2
GUESS_SKB_AT = 3
GUESS_QSKB_AT = 4
GUESS_STATE = 5
GUESS_SEND_SKB = 6
GUESS_SKB_BEFORE = 128
GUESS_SK_BYTES = 2048
GUESS_NET_BYTES = 2048
GUESS_CHUNK = 512

# the telemetry map's slots; TELEMETRY_NAMES is their lower-case names in order
TELE_CONN_LOST = 0
TELE_CLOSED_LOST = 1
TELE_STASH_LOST = 2
TELE_TUPLE_MISMATCH = 3
TELE_TUPLE_CHECKED = 4
TELE_READ_FAULTS = 5
TELE_PENDING_LOST = 6
TELE_DIRTY_LOST = 7
TELE_BYTES_LOST = 8
TELE_UDP_LOST = 9
TELE_SHARED_OVERFLOW = 10
TELE_EVENTS_LOST = 11
TELE_EVENTS = 12
TELE_MAX = 13

# tp_fields map slots: perf tracepoint field offsets (backends.TP_FIELDS says which)
TPF_ISS_SKADDR = 0
TPF_ISS_NEWSTATE = 1
TPF_ISS_SPORT = 2
TPF_ISS_DPORT = 3
TPF_ISS_FAMILY = 4
TPF_ISS_PROTOCOL = 5
TPF_ISS_SADDR = 6
TPF_ISS_DADDR = 7
TPF_ISS_SADDR_V6 = 8
TPF_ISS_DADDR_V6 = 9
TPF_SENDTO_ADDR = 10
TPF_SENDMSG_MSG = 11
TPF_RECVFROM_ADDR = 12
TPF_RECVMSG_MSG = 13
TPF_SSL_SK = 15
TPF_SSL_RET = 16
TPF_SSL_FLAGS = 17
TPF_RETRANS_SKADDR = 18
TPF_RETRANS_SKBADDR = 19
TPF_ISS_OLDSTATE = 20
TPF_MAX = 24

# the prefixes of the constants above: test_layout checks each against the header
C_PREFIXES = ("TRACER_PROTO_", "DIR_", "CONN_", "END_", "EV_", "SOCK_OTHERS", "SKC_BLOCK", "SCRATCH_BYTES", "WANT_",
              "GUESS_", "TELE_", "TPF_", "FL_BLOCK", "SEQ_")
CONSTANTS = collections.OrderedDict(
    (k, v) for k, v in sorted(globals().items(), key=lambda kv: kv[0])
    if k.startswith(C_PREFIXES) and isinstance(v, int))


def _names(prefix, skip=()):
    """{value: name} of the constants PREFIX_NAME: the name in lower case."""
    return dict((v, k[len(prefix):].lower()) for k, v in CONSTANTS.items()
                if k.startswith(prefix) and k not in skip)


PROTO_NAMES = _names("TRACER_PROTO_")              # {6: "tcp", 17: "udp"}
DIRECTIONS = _names("DIR_")                        # {1: "outgoing", ...}
CONN_STATES = _names("CONN_")                      # {1: "open", 2: "closed"}
ENDS = _names("END_", skip=("END_NONE",))          # {1: "fin", ...}
EVENT_KINDS = _names("EV_")                        # {1: "connect", ...}
_tele = _names("TELE_", skip=("TELE_MAX",))
TELEMETRY_NAMES = tuple(_tele[i] for i in range(TELE_MAX))  # ("conn_lost", ...)
del _tele


# --- the structs of tracer.bpf.h -------------------------------------------------------------

# struct conn_tuple: key of the conns map, the name of every record
CONN_TUPLE = CStruct("conn_tuple", [
    ("saddr", "16s"), ("daddr", "16s"), ("netns", "I"), ("pid", "I"), ("sport", "H"),
    ("dport", "H"), ("family", "B"), ("proto", "B"), ("_pad", "H"), ("life", "I")])
# struct conn_stats: value of the conns map, and in a socks entry
CONN_STATS = CStruct("conn_stats", [
    ("sent_bytes", "Q"), ("recv_bytes", "Q"), ("first_ns", "Q"), ("last_ns", "Q"),
    ("retransmits", "I"), ("direction", "B"), ("state", "B"), ("seen_start", "B"), ("end", "B"),
    ("comm", "16s"), ("gen", "I"), ("rtt_us", "I"), ("rtt_var_us", "I"), ("_pad2", "I")])
# struct sock_info: value of the socks map (one TCP socket's current life)
SOCK_INFO = CStruct("sock_info", [
    ("tuple", "%ds" % CONN_TUPLE.size), ("has_tuple", "I"), ("stats", "%ds" % CONN_STATS.size),
    ("others", "%ds" % (4 * SOCK_OTHERS)), ("seq_flags", "I"), ("write_seq", "I"),
    ("copied_seq", "I")])
# struct peer: a message's peer address (kernel-only)
PEER = CStruct("peer", [("addr", "16s"), ("port", "H"), ("family", "B"), ("_pad", "5s")])
# struct stash: one thread's syscall state (kernel-only)
STASH = CStruct("stash", [
    ("sk", "Q"), ("msg", "Q"), ("uaddr", "Q"), ("bytes", "q"), ("flags", "q"),
    ("peer", "%ds" % PEER.size), ("has_peer", "B"), ("_pad", "7s"),
    ("sent_to", "%ds" % PEER.size), ("sent_sk", "Q")])
# struct offsets: the guessed struct sock layout and the filters (offsets map)
OFFSETS = CStruct("offsets", [(name, "I") for name in (
    "ready", "ipv6", "daddr", "saddr", "dport", "sport", "family", "state", "protocol",
    "v6_daddr", "v6_saddr", "net", "netns_inum", "gen", "task_comm", "task_leader", "skb_data",
    "skb_sk", "skb_len", "skb_head", "skb_thdr", "fl4_daddr", "fl4_dport", "fl6_daddr", "fl6_dport",
    "sk_rcvq", "udp_readerq", "want", "pid_filter", "port_filter", "skc_block", "sk_err", "srtt",
    "mdev", "inet_sport", "write_seq", "copied_seq", "rcv_nxt",
    "sent_seq")])
# struct guess_req: what the guessing thread asks for (guess_req map)
GUESS_REQ = CStruct("guess_req", [
    ("pid_tgid", "Q"), ("net_off", "I"), ("seq", "I"), ("mode", "I"), ("state", "I")])
# struct guess_dump: the dumped struct sock and struct net bytes (guess_dump map)
GUESS_DUMP = CStruct("guess_dump", [
    ("seq", "I"), ("sk_ok", "I"), ("net_ok", "I"), ("_pad", "I"), ("sk", "Q"),
    ("sk_bytes", "%ds" % GUESS_SK_BYTES), ("net_bytes", "%ds" % GUESS_NET_BYTES)])
# struct conn_event: one record of the events ring buffer
CONN_EVENT = CStruct("conn_event", [
    ("ts_ns", "Q"), ("tuple", "%ds" % CONN_TUPLE.size), ("type", "B"), ("end", "B"),
    ("direction", "B"), ("seen_start", "B"), ("sent_bytes", "Q"), ("recv_bytes", "Q"),
    ("first_ns", "Q"), ("retransmits", "I"), ("rtt_us", "I"), ("rtt_var_us", "I"), ("_pad", "I"),
    ("comm", "16s")])
# struct bpf_map_def: a map's definition in the object's "maps" section (elfload reads it)
BPF_MAP_DEF = CStruct("bpf_map_def", [
    ("type", "I"), ("key_size", "I"), ("value_size", "I"), ("max_entries", "I"),
    ("map_flags", "I")])
STRUCTS = (CONN_TUPLE, CONN_STATS, SOCK_INFO, PEER, STASH, OFFSETS, GUESS_REQ, GUESS_DUMP,
           CONN_EVENT, BPF_MAP_DEF)


# --- what tracer.bpf.o must hold --------------------------------------------------------------

# enum bpf_map_type (include/uapi/linux/bpf.h): the types named in messages
MAP_TYPE_NAMES = {0: "UNSPEC", 1: "HASH", 2: "ARRAY", 3: "PROG_ARRAY", 4: "PERF_EVENT_ARRAY",
                  5: "PERCPU_HASH", 6: "PERCPU_ARRAY", 7: "STACK_TRACE", 8: "CGROUP_ARRAY",
                  9: "LRU_HASH", 10: "LRU_PERCPU_HASH", 11: "LPM_TRIE", 12: "ARRAY_OF_MAPS",
                  13: "HASH_OF_MAPS", 27: "RINGBUF"}
HASH, ARRAY, PERCPU_ARRAY, RINGBUF = (bpfsys.BPF_MAP_TYPE_HASH, bpfsys.BPF_MAP_TYPE_ARRAY,
                                     bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, bpfsys.BPF_MAP_TYPE_RINGBUF)
LRU_HASH = 9  # BPF_MAP_TYPE_LRU_HASH

U32, U64 = 4, 8
CONN_TABLE_ENTRIES = 65536  # conns, socks and dirty as built (--max-conns changes them at load)
PER_THREAD_ENTRIES = 16384  # stash, skip_socks, udp_next
SYNACK_ENTRIES = 4096
EVENTS_BYTES = 1 << 20  # the events ring buffer as built; one page when events are off
EVENTS_OFF_BYTES = 4096
OBJECT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tracer.bpf.o")
LICENSE = "GPL"  # the programs call GPL-only helpers (bpf_probe_read_kernel, ...)

MapABI = collections.namedtuple("MapABI", "name map_type key_size value_size max_entries flags "
                                          "key_is value_is")


def _map(name, map_type, key, value, entries):
    """key, value: (size, what it is) -- the C type, for messages."""
    return MapABI(name, map_type, key[0], value[0], entries, 0, key[1], value[1])


_TUPLE = (CONN_TUPLE.size, "struct conn_tuple")
_SOCK = (U64, "__u64 struct sock address")
_TID = (U64, "__u64 pid_tgid")
_INDEX = (U32, "__u32 index")
_COUNTER = (U64, "__u64")


def _struct(s):
    return (s.size, "struct %s" % s.c_name)


# every map of tracer.bpf.c (MAP(...) lines), in its order
MAPS = (
    _map("conns", HASH, _TUPLE, _struct(CONN_STATS), CONN_TABLE_ENTRIES),
    _map("socks", HASH, _SOCK, _struct(SOCK_INFO), CONN_TABLE_ENTRIES),
    _map("stash", LRU_HASH, _TID, _struct(STASH), PER_THREAD_ENTRIES),
    _map("dirty", HASH, _TUPLE, (U64, "__u64 struct sock address"), CONN_TABLE_ENTRIES),
    _map("skip_socks", LRU_HASH, _SOCK, (U32, "__u32 SKIP_*"), PER_THREAD_ENTRIES),
    _map("udp_next", LRU_HASH, _SOCK, _struct(PEER), PER_THREAD_ENTRIES),
    _map("udp_sent", LRU_HASH, _SOCK, _struct(PEER), 4096),
    _map("synack_retrans", LRU_HASH, _TUPLE, (U32, "__u32 count"), SYNACK_ENTRIES),
    # per-CPU copy of the start of a struct sock (read_tuple_block)
    _map("skc_copy", PERCPU_ARRAY, _INDEX, (SCRATCH_BYTES, "SCRATCH_BYTES bytes"), 1),
    _map("life_seq", ARRAY, _INDEX, _COUNTER, 1),
    _map("offsets", ARRAY, _INDEX, _struct(OFFSETS), 1),
    _map("telemetry", ARRAY, _INDEX, _COUNTER, TELE_MAX),
    _map("tp_fields", ARRAY, _INDEX, (U32, "__u32 field offset"), TPF_MAX),
    _map("guess_req", ARRAY, _INDEX, _struct(GUESS_REQ), 1),
    _map("guess_dump", ARRAY, _INDEX, _struct(GUESS_DUMP), 1),
    _map("events", RINGBUF, (0, "none"), (0, "none"), EVENTS_BYTES),
)
MAPS_BY_NAME = collections.OrderedDict((m.name, m) for m in MAPS)

# max_conns resizes these, times the factor, when the maps are created
RESIZED_BY_MAX_CONNS = collections.OrderedDict([("conns", 1), ("socks", 1), ("dirty", 2)])
MAX_CONNS_LIMIT = ((1 << 32) - 1) // max(RESIZED_BY_MAX_CONNS.values())

# the kind a program's name prefix promises (tracer.bpf.c's naming rule)
PROGRAM_PREFIXES = (("kp_", ("kprobe",)), ("krp_", ("kretprobe",)), ("tpp_", ("tracepoint",)),
                    ("tp_", ("raw_tracepoint", "tracepoint")), ("cg_", ("cgroup",)))


def all_programs():
    """Names of every program the tracer may load: each backend's (every
    variant, fallback and guess program), from backends.REGISTRY."""
    import backends  # backends imports abi
    names = []
    for b in backends.REGISTRY:
        names.extend(n for n in b.every_program() if n not in names)
    return names


def programs_to_load(backend, plan):
    """Names of the programs a Tracer loads at start: the plan's and the
    backend's guess programs.  The fallbacks attach_all may turn to (perf
    tracepoints for raw ones, syscall tracepoints for the cgroup hooks) are
    loaded only when needed: their verification would cost startup time
    that almost no kernel needs (check_object has made sure they exist)."""
    import backends
    return [p for p, _, _ in plan] + list(backends.get(backend).guess)


def map_entries(max_conns, events=True):
    """{map: entries} overrides for ObjectSpec.load (None: as built);
    without events, the events ring buffer is one page."""
    sizes = {} if events else {"events": EVENTS_OFF_BYTES}
    if not max_conns:
        return sizes or None
    if not 0 < max_conns <= MAX_CONNS_LIMIT:
        raise ValueError("max_conns %d is out of range (1 to %d)" % (max_conns, MAX_CONNS_LIMIT))
    sizes.update((name, k * max_conns) for name, k in RESIZED_BY_MAX_CONNS.items())
    return sizes


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
    size, value size, entry count or flags; a program missing or in a section
    of another kind than its name's prefix says; a license that is not GPL.
    programs: the names to check (all_programs() when None).  Returns None."""
    import elfload  # elfload imports abi

    def bad(msg):
        return elfload.ObjectError("%s: %s" % (spec.path, msg))

    for want in MAPS:
        got = spec.maps.get(want.name)
        if got is None:
            raise bad("map %r is missing (expected %s)" % (want.name, _shape(want)))
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
    for name in (all_programs() if programs is None else programs):
        got = spec.programs.get(name)
        if got is None:
            raise bad("program %r is missing" % name)
        kinds = next((k for prefix, k in PROGRAM_PREFIXES if name.startswith(prefix)), None)
        if kinds is not None and got.kind not in kinds:
            raise bad("program %r: section %r, expected %s (its name starts with %s)" % (
                name, got.section, " or ".join("%s/..." % k for k in kinds), name.split("_")[0] + "_"))
    if spec.license != LICENSE:
        raise bad("license %r, expected %r (the programs call GPL-only helpers)" % (
            spec.license, LICENSE))
