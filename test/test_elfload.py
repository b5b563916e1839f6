"""elfload.parse: the checked-in tracer.bpf.o described exactly, and broken
copies of it rejected with an ObjectError that names what is wrong.

No privileges needed: parsing opens no kernel object.  The broken copies
are made by patching the real object with a small ELF reader below that
does not share code with elfload.
"""

import os
import re
import struct

import pytest

import abi
import backends
import bpfsys
import elfload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJ = os.path.join(ROOT, "tracer.bpf.o")

SELFTEST = os.path.join(ROOT, "test", "selftest.bpf.o")


def c_sections(source):
    """{program: ELF section} as the SEC() lines of a C source give them."""
    with open(os.path.join(ROOT, source)) as f:
        return dict((name, sec) for sec, name in
                    re.findall(r'^SEC\("([^"]+)"\)\nint (\w+)\(', f.read(), re.M))


# program -> ELF section (SEC() in tracer.bpf.c)
PROGRAM_SECTIONS = c_sections("tracer.bpf.c")

# section prefix -> (kind, BPF_PROG_TYPE_* number from include/uapi/linux/bpf.h)
KINDS = {"kprobe/": ("kprobe", 2), "kretprobe/": ("kretprobe", 2),
         "tracepoint/": ("tracepoint", 5), "raw_tracepoint/": ("raw_tracepoint", 17),
         "cgroup/": ("cgroup", 18)}

# map -> (type, key size, value size, max entries, flags): abi.MAPS, what
# MAP() in tracer.bpf.c must build (abi takes the sizes from the Python
# mirrors, which test_layout.py checks against the C structs)
MAPS = dict((m.name, (m.map_type, m.key_size, m.value_size, m.max_entries, m.flags))
            for m in abi.MAPS)


@pytest.fixture(scope="module")
def data():
    with open(OBJ, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def spec(data):
    return elfload.parse(data, OBJ)


@pytest.fixture(scope="module")
def selftest_data():
    """The self-test programs' object (test/selftest.bpf.c)."""
    with open(SELFTEST, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def selftest_spec(selftest_data):
    return elfload.parse(selftest_data, SELFTEST)


# --- a small independent ELF reader, for checking and patching ----------------

class Elf(object):
    """Section headers and symbols of a little-endian ELF64 file."""

    def __init__(self, data):
        self.data = data
        self.shoff = struct.unpack_from("<Q", data, 40)[0]
        self.shnum, self.shstrndx = struct.unpack_from("<HH", data, 60)
        self.sections = []
        for i in range(self.shnum):
            hdr = self.shoff + i * 64
            (name, stype, flags, _, off, size, link, info, _, entsize) = struct.unpack_from(
                "<IIQQQQIIQQ", data, hdr)
            self.sections.append(dict(index=i, hdr=hdr, name_off=name, type=stype, flags=flags,
                                      offset=off, size=size, link=link, info=info))
        strs = self.sections[self.shstrndx]
        for s in self.sections:
            s["name"] = self._str(strs, s["name_off"])
        self.symtab = next(s for s in self.sections if s["type"] == 2)
        strtab = self.sections[self.symtab["link"]]
        self.symbols = []
        for k in range(self.symtab["size"] // 24):
            name, info, _, shndx, value, size = struct.unpack_from(
                "<IBBHQQ", data, self.symtab["offset"] + k * 24)
            self.symbols.append(dict(index=k, name=self._str(strtab, name), type=info & 0xF,
                                     shndx=shndx, value=value, size=size))

    def _str(self, table, off):
        start = table["offset"] + off
        return self.data[start:self.data.index(b"\0", start)].decode()

    def section(self, name):
        return next(s for s in self.sections if s["name"] == name)

    def symbol(self, name):
        return next(s for s in self.symbols if s["name"] == name)

    def rels(self):
        """[(file offset of the entry, target section, r_offset, symbol, type)]"""
        out = []
        for s in self.sections:
            if s["type"] != 9:  # SHT_REL
                continue
            for k in range(s["size"] // 16):
                at = s["offset"] + k * 16
                r_off, r_info = struct.unpack_from("<QQ", self.data, at)
                out.append((at, self.sections[s["info"]], r_off, r_info >> 32, r_info & 0xFFFFFFFF))
        return out

    def function_at(self, section, off):
        return next(s["name"] for s in self.symbols if s["shndx"] == section["index"]
                    and s["type"] == 2 and s["value"] <= off < s["value"] + s["size"])


def patched(data, offset, fmt, *values):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


def rejected(data, *substrings):
    """parse(data) raises ObjectError whose message has every substring."""
    with pytest.raises(elfload.ObjectError) as info:
        elfload.parse(data, "broken.o")
    msg = str(info.value)
    assert msg.startswith("broken.o: "), msg
    for s in substrings:
        assert s in msg, "%r not in %r" % (s, msg)
    return msg


# --- the real object ------------------------------------------------------------

def test_programs_are_named_by_function_with_section_type_and_target(spec):
    assert sorted(spec.programs) == sorted(PROGRAM_SECTIONS)
    assert len(spec.programs) == len(PROGRAM_SECTIONS)
    for name, section in PROGRAM_SECTIONS.items():
        p = spec.programs[name]
        prefix = next(k for k in KINDS if section.startswith(k))
        kind, prog_type = KINDS[prefix]
        assert (p.name, p.section, p.kind, p.prog_type, p.target) == (
            name, section, kind, prog_type, section[len(prefix):]), name


def test_program_types_are_the_kernel_numbers():
    assert (bpfsys.BPF_PROG_TYPE_KPROBE, bpfsys.BPF_PROG_TYPE_TRACEPOINT,
            bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, bpfsys.BPF_PROG_TYPE_SOCKET_FILTER) == (2, 5, 17, 1)


def test_tracepoint_targets_are_category_slash_name(selftest_spec):
    assert selftest_spec.programs["test_send_calls_tp"].target == "sock/sock_send_length"
    assert selftest_spec.programs["test_send_bytes"].target == "sock_send_length"
    assert selftest_spec.programs["test_tcp_v4_connect"].target == "tcp_v4_connect"
    assert selftest_spec.programs["test_tcp_v4_connect_ret"].kind == "kretprobe"


def test_program_code_is_the_function_symbol_bytes(spec, data):
    elf = Elf(data)
    for name, p in spec.programs.items():
        sym = elf.symbol(name)
        sec = elf.sections[sym["shndx"]]
        assert sec["name"] == p.section
        start = sec["offset"] + sym["value"]
        assert p.insns == data[start:start + sym["size"]], name
        assert len(p.insns) % 8 == 0 and len(p.insns) > 0, name


def test_the_object_holds_exactly_the_programs_of_the_backends(spec):
    assert sorted(spec.programs) == sorted(abi.all_programs())
    for b in backends.REGISTRY:
        for pattern, _ in b.programs:
            for name in backends.variants(pattern):
                assert spec.programs[name].kind in ("kprobe", "kretprobe", "tracepoint",
                                                    "raw_tracepoint", "cgroup"), name


def test_maps_have_exact_types_and_sizes(spec):
    assert sorted(spec.maps) == sorted(MAPS)
    for name, want in MAPS.items():
        m = spec.maps[name]
        assert (m.map_type, m.key_size, m.value_size, m.max_entries, m.flags) == want, name
        assert m.name == name


def test_license_is_gpl_and_version_is_the_placeholder(spec):
    assert spec.license == "GPL"
    assert spec.kern_version == 0xFFFFFFFE


def test_relocations_of_the_self_test_programs(selftest_spec):
    assert selftest_spec.programs["test_send_bytes"].relocs == [
        (13, "test_bytes"), (21, "test_bytes"), (26, "test_bytes")]
    assert selftest_spec.programs["test_send_calls_tp"].relocs == [(4, "test_counts")]


def test_every_relocation_is_an_ld_imm64_of_a_map(spec, data):
    total = 0
    for name, p in spec.programs.items():
        for idx, map_name in p.relocs:
            assert map_name in spec.maps
            assert p.insns[idx * 8] == 0x18, (name, idx)   # BPF_LD | BPF_IMM | BPF_DW
            assert (idx + 2) * 8 <= len(p.insns), (name, idx)  # both halves inside
        total += len(p.relocs)
    # the same count as the object's REL sections hold for code sections
    elf = Elf(data)
    assert total == sum(1 for r in elf.rels() if r[1]["flags"] & 0x4)
    assert total > 0


def test_every_atomic_instruction_is_a_plain_add(spec):
    # kernels before 5.12 know one atomic operation, add without fetch
    # (the 5.10 verifier refuses others: "BPF_STX uses reserved fields");
    # clang turns some into others (an add of a constant 0 into an OR)
    import struct
    atomics = 0
    for name, p in spec.programs.items():
        for off in range(0, len(p.insns), 8):
            op = p.insns[off]
            if op in (0xc3, 0xdb):  # BPF_STX | BPF_ATOMIC | BPF_W or BPF_DW
                imm = struct.unpack_from("<i", p.insns, off + 4)[0]
                assert imm == 0, "%s: atomic operation %#x at instruction %d" % (name, imm, off // 8)
                atomics += 1
    assert atomics > 0


def test_parsing_opens_no_file_descriptors(data):
    before = bpfsys.open_fds()
    elfload.parse(data, OBJ)
    assert bpfsys.open_fds() == before


def test_parsing_needs_no_privilege():
    if os.geteuid() != 0:
        elfload.parse_file(OBJ)  # we are unprivileged already
        return
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, then parse
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            code = 0 if len(elfload.parse_file(OBJ).programs) == len(PROGRAM_SECTIONS) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_loading_an_unknown_program_name_is_refused_before_any_fd(spec):
    before = bpfsys.open_fds()
    with pytest.raises(elfload.ObjectError) as info:
        spec.load(["kp_tcp_sendmsg", "no_such_prog"])
    assert "no program named 'no_such_prog'" in str(info.value)
    assert "kp_tcp_sendmsg" in str(info.value)  # lists what there is
    assert bpfsys.open_fds() == before


# --- broken copies ----------------------------------------------------------------

def test_empty_file():
    rejected(b"", "truncated: 0 bytes is shorter than an ELF header")


@pytest.mark.parametrize("size", [1, 16, 40, 63])
def test_truncated_in_the_elf_header(data, size):
    rejected(data[:size], "truncated: %d bytes is shorter than an ELF header" % size)


def test_truncated_in_the_middle_of_the_section_table(data):
    elf = Elf(data)
    cut = elf.shoff + 64 * (elf.shnum // 2) + 13
    rejected(data[:cut], "truncated: the section header table ends at byte %d, the file at %d"
             % (elf.shoff + 64 * elf.shnum, cut))


def test_truncated_in_the_middle_of_section_data(data):
    # clang puts the section table last, so cutting inside section data also
    # loses the table: that is what the message says
    elf = Elf(data)
    prog = elf.section("tracepoint/sock/sock_send_length")
    cut = prog["offset"] + prog["size"] // 2
    rejected(data[:cut], "truncated: the section header table ends at byte %d, the file at %d"
             % (elf.shoff + 64 * elf.shnum, cut))


def test_section_data_cut_short_with_the_table_kept(data):
    # cut inside a program's code but keep a whole section table after it
    elf = Elf(data)
    prog = elf.section("tracepoint/sock/sock_send_length")
    cut = prog["offset"] + prog["size"] // 2
    table = data[elf.shoff:elf.shoff + 64 * elf.shnum]
    broken = patched(data[:cut] + table, 40, "<Q", cut)
    size = len(broken)
    first = next(s for s in elf.sections if s["type"] != 8 and s["offset"] + s["size"] > size)
    rejected(broken, "truncated: section %d ends at byte %d, the file at %d"
             % (first["index"], first["offset"] + first["size"], size))


def test_one_section_runs_past_the_end(data):
    elf = Elf(data)
    sec = elf.section("tracepoint/sock/sock_send_length")
    broken = patched(data, sec["hdr"] + 32, "<Q", len(data))  # sh_size
    rejected(broken, "truncated: section %d ends at byte %d, the file at %d"
             % (sec["index"], sec["offset"] + len(data), len(data)))


def test_wrong_magic(data):
    rejected(b"\x7fELG" + data[4:], "not an ELF file", "ELG")


def test_not_elf_at_all():
    rejected(b"#!/bin/sh\n" + b"x" * 100, "not an ELF file")


def test_32_bit_class(data):
    rejected(patched(data, 4, "B", 1), "not a 64-bit little-endian ELF object (class 1, data 1)")


def test_big_endian(data):
    rejected(patched(data, 5, "B", 2), "not a 64-bit little-endian ELF object (class 2, data 2)")


def test_not_a_bpf_machine(data):
    rejected(patched(data, 18, "<H", 62), "ELF machine 62 is not BPF (247)", "not a BPF object")


def test_section_table_offset_beyond_end_of_file(data):
    elf = Elf(data)
    shoff = len(data) + 4096
    rejected(patched(data, 40, "<Q", shoff),
             "truncated: the section header table ends at byte %d, the file at %d"
             % (shoff + 64 * elf.shnum, len(data)))


def test_section_entry_size_not_64(data):
    rejected(patched(data, 58, "<H", 40), "no usable section header table")


def test_no_sections(data):
    rejected(patched(data, 60, "<H", 0), "no usable section header table")


def test_bad_section_name_table_index(data):
    elf = Elf(data)
    rejected(patched(data, 62, "<H", elf.shnum + 3), "bad section name table index %d" % (elf.shnum + 3))


def test_no_symbol_table(data):
    elf = Elf(data)
    rejected(patched(data, elf.symtab["hdr"] + 4, "<I", 3), "no symbol table")  # SHT_SYMTAB -> STRTAB


def test_code_in_a_section_of_unknown_type(data):
    elf = Elf(data)
    sec = elf.section("tracepoint/sock/sock_send_length")
    strtab_name = elf.sections[elf.shstrndx]["name_off"]  # ".strtab"
    broken = patched(data, sec["hdr"], "<I", strtab_name)
    rejected(broken, "section '.strtab' holds code of an unknown program type")


def test_code_for_an_unknown_cgroup_hook(data):
    at = data.index(b"cgroup/sendmsg4\0")
    broken = data[:at] + b"cgroup/sendmsg9" + data[at + 15:]
    rejected(broken, "section 'cgroup/sendmsg9': unknown cgroup hook 'sendmsg9'")


def _first_rel(elf, function):
    sym = elf.symbol(function)
    return next(r for r in elf.rels() if r[1]["index"] == sym["shndx"]
                and sym["value"] <= r[2] < sym["value"] + sym["size"])


def test_relocation_against_a_symbol_that_is_not_a_map(selftest_data):
    elf = Elf(selftest_data)
    at, sec, r_off, _, rtype = _first_rel(elf, "test_send_calls_tp")
    lic = elf.symbol("_license")["index"]
    broken = patched(selftest_data, at + 8, "<Q", (lic << 32) | rtype)
    rejected(broken, "program test_send_calls_tp refers to '_license', which is not a map")


def test_relocation_against_a_function_symbol(selftest_data):
    elf = Elf(selftest_data)
    at, sec, r_off, _, rtype = _first_rel(elf, "test_send_bytes")
    fn = elf.symbol("test_send_calls_tp")["index"]
    broken = patched(selftest_data, at + 8, "<Q", (fn << 32) | rtype)
    rejected(broken, "program test_send_bytes refers to 'test_send_calls_tp', which is not a map")


def test_relocation_against_a_missing_symbol(selftest_data):
    elf = Elf(selftest_data)
    at, sec, r_off, _, rtype = _first_rel(elf, "test_send_bytes")
    broken = patched(selftest_data, at + 8, "<Q", (60000 << 32) | rtype)
    rejected(broken, "relocation in test_send_bytes names symbol 60000, which does not exist")


def test_relocation_of_the_wrong_type(selftest_data):
    elf = Elf(selftest_data)
    at, sec, r_off, sym, _ = _first_rel(elf, "test_send_calls_tp")
    broken = patched(selftest_data, at + 8, "<Q", (sym << 32) | 10)
    rejected(broken, "program test_send_calls_tp: relocation type 10 at instruction 4 is not a map load")


def test_relocation_outside_every_function(selftest_data):
    elf = Elf(selftest_data)
    at, sec, r_off, sym, rtype = _first_rel(elf, "test_send_calls_tp")
    broken = patched(selftest_data, at, "<Q", sec["size"] + 8)
    rejected(broken, "relocation at %s+%d is outside every function" % (sec["name"], sec["size"] + 8))


def test_map_definition_past_the_maps_section(selftest_data):
    elf = Elf(selftest_data)
    maps = elf.section("maps")
    sym = elf.symbol("test_bytes")
    symtab_entry = elf.symtab["offset"] + sym["index"] * 24
    broken = patched(selftest_data, symtab_entry + 8, "<Q", maps["size"] - 4)  # st_value
    rejected(broken, "map test_bytes: definition runs past the maps section")


def test_unreadable_file_names_the_path(tmp_path):
    path = str(tmp_path / "missing.bpf.o")
    with pytest.raises(elfload.ObjectError) as info:
        elfload.parse_file(path)
    assert str(info.value) == "%s: cannot read the BPF object: No such file or directory" % path


def test_parse_file_names_the_path_in_errors(tmp_path, data):
    path = tmp_path / "short.bpf.o"
    path.write_bytes(data[:100])
    with pytest.raises(elfload.ObjectError) as info:
        elfload.parse_file(str(path))
    assert str(info.value).startswith("%s: truncated: the section header table ends" % path)


# Found while fuzzing the header and section table: these once escaped as
# other exceptions (a traceback instead of one line).

def test_symbol_table_linked_to_a_missing_string_table(data):
    elf = Elf(data)
    rejected(patched(data, elf.symtab["hdr"] + 40, "<I", 200), "string table")


def test_license_that_is_not_text(data):
    elf = Elf(data)
    rejected(patched(data, elf.section("license")["offset"], "B", 0xFF), "license")


# --- issue 13: malformed objects found by fuzzing, each one ObjectError -------

def _name_off(data, elf, sym):
    """st_name of a symbol: where its name is in the string table."""
    return struct.unpack_from("<I", data, elf.symtab["offset"] + sym["index"] * 24)[0]


def _symbol_field(elf, sym, offset):
    """File offset of a field of sym's entry (st_name 0, st_value 8, st_size 16)."""
    return elf.symtab["offset"] + sym["index"] * 24 + offset


def _nobits(data, sec, offset=None):
    """sec made SHT_NOBITS, its sh_offset moved to offset."""
    broken = patched(data, sec["hdr"] + 4, "<I", 8)
    return broken if offset is None else patched(broken, sec["hdr"] + 24, "<Q", offset)


def test_nobits_version_section_past_the_end_of_the_file(data):
    # gap 1: struct.error escaped parse() (it read 4 bytes from past the end)
    sec = Elf(data).section("version")
    msg = rejected(_nobits(data, sec, len(data) + 4096))
    assert msg == "broken.o: section %d 'version' is SHT_NOBITS: it has no bytes in the file" % (
        sec["index"])


@pytest.mark.parametrize("name", ["version", "license", "maps", "kprobe/tcp_sendmsg"])
def test_a_section_whose_bytes_are_read_cannot_be_nobits(data, name):
    sec = Elf(data).section(name)
    rejected(_nobits(data, sec), "section %d %r is SHT_NOBITS: it has no bytes in the file"
             % (sec["index"], name))


def test_nobits_string_table(data):
    elf = Elf(data)
    rejected(_nobits(data, elf.sections[elf.shstrndx], len(data)),
             "the section name table (section %d) is SHT_NOBITS" % elf.shstrndx)


@pytest.mark.parametrize("size", [0, 2, 8])
def test_version_section_of_the_wrong_size(data, size):
    sec = Elf(data).section("version")
    rejected(patched(data, sec["hdr"] + 32, "<Q", size),
             "the version section is %d bytes, expected 4 (a u32 kernel version)" % size)


@pytest.mark.parametrize("renamed,to", [("kp_tcp_sendmsg", "krp_tcp_sendmsg"),
                                        ("guess_tcp_sendmsg", "kp_tcp_sendmsg")],
                         ids=["two-sections", "one-section"])
def test_two_functions_with_one_name_are_refused_naming_both(data, renamed, to):
    # gap 5: the second silently replaced the first, and a verifier error
    # then named the wrong program
    elf = Elf(data)
    a, b = elf.symbol(renamed), elf.symbol(to)
    broken = patched(data, _symbol_field(elf, a, 0), "<I", _name_off(data, elf, b))
    first, second = sorted([a, b], key=lambda s: (s["shndx"], s["value"]))
    msg = rejected(broken)
    assert msg == ("broken.o: two functions named %r: in section %r at byte %d and in section "
                   "%r at byte %d" % (to, elf.sections[first["shndx"]]["name"], first["value"],
                                      elf.sections[second["shndx"]]["name"], second["value"]))


def test_two_maps_with_one_name_are_refused_naming_both(data):
    elf = Elf(data)
    dirty, conns = elf.symbol("dirty"), elf.symbol("conns")
    broken = patched(data, _symbol_field(elf, dirty, 0), "<I", _name_off(data, elf, conns))
    first, second = sorted([dirty, conns], key=lambda s: s["index"])
    maps = elf.section("maps")["index"]
    msg = rejected(broken)
    assert msg == ("broken.o: two maps named 'conns': in section %d (maps) at byte %d and in "
                   "section %d (maps) at byte %d" % (maps, first["value"], maps, second["value"]))


def test_an_empty_function(data):
    elf = Elf(data)
    sym = elf.symbol("kp_tcp_sendmsg")
    rejected(patched(data, _symbol_field(elf, sym, 16), "<Q", 0),
             "function 'kp_tcp_sendmsg' in section 'kprobe/tcp_sendmsg' at byte %d is empty"
             % sym["value"])


def test_a_function_not_on_an_instruction_boundary(data):
    elf = Elf(data)
    sym = elf.symbol("kp_tcp_sendmsg")
    broken = patched(data, _symbol_field(elf, sym, 8), "<QQ", sym["value"] + 4, sym["size"] - 8)
    rejected(broken, "function 'kp_tcp_sendmsg' in section 'kprobe/tcp_sendmsg' at byte %d "
             "does not start on an instruction" % (sym["value"] + 4))


def test_a_function_without_a_name(data):
    elf = Elf(data)
    sym = elf.symbol("kp_tcp_sendmsg")
    rejected(patched(data, _symbol_field(elf, sym, 0), "<I", 0),
             "a function in section 'kprobe/tcp_sendmsg' at byte %d has no name" % sym["value"])


def test_relocation_inside_an_instruction(selftest_data):
    elf = Elf(selftest_data)
    at, sec, r_off, sym, rtype = _first_rel(elf, "test_send_calls_tp")
    rejected(patched(selftest_data, at, "<Q", r_off + 4),
             "program test_send_calls_tp: relocation type 1 at instruction 4 is not a map load")


def test_map_load_that_is_the_last_instruction(selftest_data):
    # an ld_imm64 takes two instructions: the second must be in the program
    elf = Elf(selftest_data)
    sym = elf.symbol("test_send_calls_tp")
    _, _, r_off, _, _ = _first_rel(elf, "test_send_calls_tp")
    idx = (r_off - sym["value"]) // 8
    rejected(patched(selftest_data, _symbol_field(elf, sym, 16), "<Q", (idx + 1) * 8),
             "program test_send_calls_tp: the map load at instruction %d runs past its end" % idx)


def test_a_name_with_a_line_break_stays_on_one_line(data):
    at = data.index(b"cgroup/sendmsg4\0")
    msg = rejected(data[:at] + b"cgroup/sendms\n4" + data[at + 15:])
    assert msg == ("broken.o: section 'cgroup/sendms\\n4': unknown cgroup hook 'sendms\\n4' "
                   "(known: recvmsg4, recvmsg6, sendmsg4, sendmsg6)")


@pytest.mark.parametrize("entries", [0, 1 << 32, -1])
def test_load_refuses_entries_out_of_range_before_any_fd(spec, entries):
    before = bpfsys.open_fds()
    with pytest.raises(elfload.ObjectError) as info:
        spec.load(["kp_tcp_sendmsg"], {"conns": entries})
    assert str(info.value) == "%s: map 'conns' cannot have %d entries (1 to 4294967295)" % (
        OBJ, entries)
    assert bpfsys.open_fds() == before


def test_load_refuses_resizing_a_map_it_does_not_have(spec):
    with pytest.raises(elfload.ObjectError) as info:
        spec.load(["kp_tcp_sendmsg"], {"no_such_map": 5})
    assert str(info.value).startswith("%s: no map named 'no_such_map' to resize (have: conns, "
                                      % OBJ)
