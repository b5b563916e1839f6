"""abi: what tracer.bpf.o must hold, and check_object() refusing copies
whose maps or programs differ, with one exact line each.  Also a seeded
fuzz of the object: parse() and check_object() raise ObjectError and
nothing else.

No privileges needed: nothing here opens a kernel object.
"""

import os
import random
import struct
import time

import pytest

import abi
import backends
import elfload
from test_elfload import Elf, patched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJ = os.path.join(ROOT, "tracer.bpf.o")
MAP_FIELDS = ("type", "key_size", "value_size", "max_entries", "flags")  # struct bpf_map_def


@pytest.fixture(scope="module")
def data():
    with open(OBJ, "rb") as f:
        return f.read()


def with_map_field(data, name, field, value):
    """The object with one field of map name's struct bpf_map_def changed."""
    elf = Elf(data)
    at = elf.section("maps")["offset"] + elf.symbol(name)["value"] + 4 * MAP_FIELDS.index(field)
    return patched(data, at, "<I", value)


def renamed_symbol(data, name):
    """The object with symbol name renamed to name[1:] (its own suffix)."""
    elf = Elf(data)
    sym = elf.symbol(name)
    at = elf.symtab["offset"] + sym["index"] * 24
    return patched(data, at, "<I", struct.unpack_from("<I", data, at)[0] + 1)


def refused(data, programs=None):
    """check_object's message for a copy that parses."""
    spec = elfload.parse(data, "broken.o")
    with pytest.raises(elfload.ObjectError) as info:
        abi.check_object(spec, programs)
    return str(info.value)


# --- what abi says ---------------------------------------------------------------

def test_the_checked_in_object_has_everything_the_tracer_needs(data):
    spec = elfload.parse(data, OBJ)
    assert abi.check_object(spec) is None
    assert abi.check_object(spec, list(spec.programs)) is None


def test_map_sizes_come_from_the_python_mirrors():
    m = abi.MAPS_BY_NAME
    assert (m["conns"].key_size, m["conns"].value_size) == (abi.CONN_TUPLE.size,
                                                            abi.CONN_STATS.size)
    assert m["socks"].value_size == abi.SOCK_INFO.size
    assert m["offsets"].value_size == abi.OFFSETS.size
    assert m["guess_req"].value_size == abi.GUESS_REQ.size
    assert m["guess_dump"].value_size == abi.GUESS_DUMP.size
    assert m["telemetry"].max_entries == len(abi.TELEMETRY_NAMES)
    assert max(backends.TP_FIELDS) < m["tp_fields"].max_entries
    assert m["skc_copy"].value_size == abi.SCRATCH_BYTES >= abi.SKC_BLOCK + 16
    assert not [n for n in abi.MAPS_BY_NAME if n.startswith("test")]  # test/selftest.bpf.o


def test_programs_are_every_variant_of_the_backends_registry():
    p = abi.all_programs()
    for name in ("kp_tcp_recvmsg", "kp_tcp_recvmsg_pre_5_19", "tp_tcp_retransmit_skb",
                 "tp_tcp_retransmit_skb_err", "kp_tcp_sendpage", "tp_sk_data_ready",
                 "tpp_sock_send_length", "tp_sys_exit_sendmsg", "guess_skb_consume_udp",
                 "cg_recvmsg6"):
        assert name in p
    assert not [n for n in p if "{" in n or "?" in n]
    assert len(p) == len(set(p))


def test_programs_to_load_are_the_plan_and_the_guess_programs():
    """Fallbacks (perf and syscall tracepoints) are loaded only when an
    attach needs them: Collection.program loads them then."""
    plan = [("tp_sock_send_length", "raw_tracepoint", "sock_send_length"),
            ("cg_sendmsg4", "cgroup", "sendmsg4")]
    names = abi.programs_to_load("tracepoint", plan)
    assert names == ["tp_sock_send_length", "cg_sendmsg4", "guess_sock_send_length",
                     "guess_inet_sock_set_state"]
    assert abi.programs_to_load("kprobe", [("kp_tcp_set_state", "kprobe", "tcp_set_state")]) == [
        "kp_tcp_set_state", "guess_udp_sendmsg", "guess_tcp_sendmsg", "guess_skb_consume_udp",
        "guess_inet_sock_set_state", "guess_udp_send_skb", "guess_udp_v6_send_skb"]
    fallbacks = list(backends.PERF_FALLBACK.values()) + list(backends.SYSCALL_FALLBACK)
    assert set(names + fallbacks) <= set(abi.all_programs())


def test_max_conns_resizes_the_connection_tables():
    assert abi.map_entries(None) is None
    assert abi.map_entries(64) == {"conns": 64, "socks": 64, "dirty": 128}
    assert abi.map_entries(abi.MAX_CONNS_LIMIT)["dirty"] == (1 << 32) - 2
    with pytest.raises(ValueError) as info:
        abi.map_entries(abi.MAX_CONNS_LIMIT + 1)
    assert str(info.value) == "max_conns 2147483648 is out of range (1 to 2147483647)"


# --- objects the tracer cannot use: one line each ------------------------------------

def test_a_missing_map(data):
    # gap 3: "unexpected KeyError: 'offsets'" once the Tracer had loaded it
    assert refused(renamed_symbol(data, "offsets")) == (
        "broken.o: map 'offsets' is missing (expected ARRAY, key 4 bytes, value %d bytes, "
        "1 entry)" % OFFSETS)


def test_a_telemetry_map_with_fewer_entries(data):
    # gap 4: a TypeError at the first poll, after tracing had started
    assert refused(with_map_field(data, "telemetry", "max_entries", 4)) == (
        "broken.o: map 'telemetry': 4 entries, expected %d" % TELE_MAX)


# the sizes as the mirrors say today (tracer.bpf.h grows)
TUPLE, STATS, SOCK_INFO = abi.CONN_TUPLE.size, abi.CONN_STATS.size, abi.SOCK_INFO.size
OFFSETS, TELE_MAX = abi.OFFSETS.size, abi.TELE_MAX
WRONG_MAPS = [  # gap 6: these loaded and ran, exit 0
    ("conns", "type", 9, "map 'conns': type LRU_HASH, expected HASH"),
    ("conns", "max_entries", 4, "map 'conns': 4 entries, expected 65536"),
    ("conns", "key_size", TUPLE - 4,
     "map 'conns': key %d bytes, expected %d (struct conn_tuple)" % (TUPLE - 4, TUPLE)),
    ("conns", "value_size", STATS - 8,
     "map 'conns': value %d bytes, expected %d (struct conn_stats)" % (STATS - 8, STATS)),
    ("socks", "value_size", SOCK_INFO - 8,
     "map 'socks': value %d bytes, expected %d (struct sock_info)" % (SOCK_INFO - 8, SOCK_INFO)),
    ("socks", "key_size", 4, "map 'socks': key 4 bytes, expected 8 (__u64 struct sock address)"),
    ("dirty", "max_entries", 1024, "map 'dirty': 1024 entries, expected 65536"),
    ("stash", "value_size", abi.STASH.size - 8, "map 'stash': value %d bytes, expected %d "
     "(struct stash)" % (abi.STASH.size - 8, abi.STASH.size)),
    ("skip_socks", "type", 1, "map 'skip_socks': type HASH, expected LRU_HASH"),
    ("udp_next", "value_size", 16, "map 'udp_next': value 16 bytes, expected %d (struct peer)"
     % abi.PEER.size),
    ("synack_retrans", "max_entries", 1, "map 'synack_retrans': 1 entry, expected 4096"),
    ("offsets", "type", 6, "map 'offsets': type PERCPU_ARRAY, expected ARRAY"),
    ("offsets", "value_size", OFFSETS - 4,
     "map 'offsets': value %d bytes, expected %d (struct offsets)" % (OFFSETS - 4, OFFSETS)),
    ("tp_fields", "max_entries", 4, "map 'tp_fields': 4 entries, expected %d" % abi.TPF_MAX),
    ("guess_dump", "value_size", 4096,
     "map 'guess_dump': value 4096 bytes, expected %d (struct guess_dump)" % abi.GUESS_DUMP.size),
    ("guess_req", "flags", 1, "map 'guess_req': flags 0x1, expected 0x0"),
    ("life_seq", "type", 200, "map 'life_seq': type 200, expected ARRAY"),
]


@pytest.mark.parametrize("name,field,value,message", WRONG_MAPS,
                         ids=["%s-%s" % (m[0], m[1]) for m in WRONG_MAPS])
def test_a_map_of_the_wrong_shape(data, name, field, value, message):
    assert refused(with_map_field(data, name, field, value)) == "broken.o: " + message


def test_a_missing_program(data):
    assert refused(renamed_symbol(data, "tp_sock_send_length")) == (
        "broken.o: program 'tp_sock_send_length' is missing")


def test_a_program_in_the_wrong_section(data):
    # kprobe/tcp_sendpage's section header named like kretprobe/tcp_sendpage
    elf = Elf(data)
    kp, krp = elf.section("kprobe/tcp_sendpage"), elf.section("kretprobe/tcp_sendpage")
    broken = patched(data, kp["hdr"], "<I", krp["name_off"])
    assert refused(broken) == ("broken.o: program 'kp_tcp_sendpage': section "
                               "'kretprobe/tcp_sendpage', expected kprobe/... (its name starts "
                               "with kp_)")


def test_only_the_named_programs_are_required(data):
    spec = elfload.parse(renamed_symbol(data, "tp_sock_send_length"), "broken.o")
    abi.check_object(spec, ["kp_tcp_set_state", "tp_sock_recv_length"])
    with pytest.raises(elfload.ObjectError) as info:
        abi.check_object(spec, ["tp_sock_recv_length", "no_such_program"])
    assert str(info.value) == "broken.o: program 'no_such_program' is missing"


def test_a_license_that_is_not_gpl(data):
    at = Elf(data).section("license")["offset"]
    assert refused(patched(data, at, "4s", b"MIT\0")) == (
        "broken.o: license 'MIT', expected 'GPL' (the programs call GPL-only helpers)")


# --- fuzz: ObjectError and nothing else ------------------------------------------------

def _mutants(data, count, seed=13):
    """count seeded copies of the object with a few bytes changed, mostly
    where the loader looks (ELF header, section table, symbols, string
    tables, relocations, maps, license, version), sometimes cut short."""
    elf = Elf(data)
    regions = [(0, 64), (elf.shoff, 64 * elf.shnum), (elf.symtab["offset"], elf.symtab["size"])]
    regions += [(s["offset"], s["size"]) for s in elf.sections
                if s["size"] and (s["type"] in (3, 9) or s["name"] in ("maps", "license", "version"))]
    fields = [(s["hdr"] + off, fmt) for s in elf.sections for off, fmt in
              ((4, "<I"), (24, "<Q"), (32, "<Q"), (40, "<I"), (44, "<I"))]
    fields += [(elf.symtab["offset"] + sym["index"] * 24 + off, fmt) for sym in elf.symbols
               if sym["name"] and not sym["name"].startswith("LBB") for off, fmt in
               ((0, "<I"), (6, "<H"), (8, "<Q"), (16, "<Q"))]
    rnd = random.Random(seed)
    for _ in range(count):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 6)):
            if rnd.random() < 0.5:
                off, size = rnd.choice(regions)
                i = off + rnd.randrange(size)
                b[i] = rnd.choice((0, 0xFF, rnd.randrange(256), b[i] ^ (1 << rnd.randrange(8))))
            else:
                at, fmt = rnd.choice(fields)
                cur = struct.unpack_from(fmt, b, at)[0]
                top = 1 << (8 * struct.calcsize(fmt))
                struct.pack_into(fmt, b, at, rnd.choice(
                    (0, 1, 4, 8, 9, cur + 1, cur + 4, cur - 8, cur * 2, rnd.randrange(top),
                     len(data), top - 1)) % top)
        if rnd.random() < 0.05:
            del b[rnd.randrange(len(b)):]
        yield bytes(b)


def test_fuzzed_objects_raise_object_error_and_nothing_else(data):
    start = time.time()
    outcomes = {"refused": 0, "accepted": 0}
    for n, mutant in enumerate(_mutants(data, 300)):
        try:
            abi.check_object(elfload.parse(mutant, "fuzz-%d.o" % n))
            outcomes["accepted"] += 1
        except elfload.ObjectError as e:
            msg = str(e)
            assert msg.startswith("fuzz-%d.o: " % n) and "\n" not in msg and msg.isprintable(), msg
            outcomes["refused"] += 1
        # anything else (struct.error, KeyError, IndexError, ...) fails the test here
    print("\n300 mutants of tracer.bpf.o: %(refused)d refused, %(accepted)d accepted "
          "(changes the kernel's verifier judges)" % outcomes)
    assert outcomes["refused"] >= 150
    assert time.time() - start < 10
