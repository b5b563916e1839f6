"""Seeded mutations of tracer.bpf.o for the loader's fuzz test (issue 13).

mutant(data, elf, seed, case) gives one broken copy and a line saying what
was changed.  Case n is of kind KINDS[n % len(KINDS)] and draws from its own
random.Random(seed, n), so any case can be made again alone:

    python3 test/objfuzz.py SEED CASE [OUT]   # what it changes, and the loader's answer

elf is test_elfload.Elf of the unbroken object: the mutations aim at what
the loader reads (ELF header, section table, symbols, relocations, map
definitions, string tables) as well as at random bytes.  build() makes
objects from scratch, for shapes no mutation of the real one reaches.
"""

import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script too
import abi  # noqa: E402
import elfload  # noqa: E402

# ELF64 field offsets and formats: Elf64_Ehdr, Elf64_Shdr, Elf64_Sym, Elf64_Rel
EHDR = {"e_shoff": (40, "<Q"), "e_shentsize": (58, "<H"), "e_shnum": (60, "<H"),
        "e_shstrndx": (62, "<H"), "e_machine": (18, "<H"), "ei_class": (4, "B")}
SHDR = {"sh_name": (0, "<I"), "sh_type": (4, "<I"), "sh_flags": (8, "<Q"),
        "sh_offset": (24, "<Q"), "sh_size": (32, "<Q"), "sh_link": (40, "<I"),
        "sh_info": (44, "<I"), "sh_entsize": (56, "<Q")}
SYM = {"st_name": (0, "<I"), "st_info": (4, "B"), "st_shndx": (6, "<H"),
       "st_value": (8, "<Q"), "st_size": (16, "<Q")}
REL = {"r_offset": (0, "<Q"), "r_type": (8, "<I"), "r_sym": (12, "<I")}
MAP_DEF = {"type": 0, "key_size": 4, "value_size": 8, "max_entries": 12, "flags": 16}
SHT_NOBITS, SHT_REL, SHT_SYMTAB, SHT_STRTAB = 8, 9, 2, 3


def before_the_kernel(data, path):
    """What Tracer does with an object before its first bpf() call: parse,
    check against the ABI, link every program's map loads."""
    spec = elfload.parse(data, path)
    abi.check_object(spec)
    fds = dict((name, 100 + k) for k, name in enumerate(sorted(spec.maps)))
    for p in spec.programs.values():
        p.linked(fds)


class Mutator(object):
    """One case: a copy of the object, a random source, and a log of edits."""

    def __init__(self, data, elf, rnd):
        self.b = bytearray(data)
        self.size = len(data)
        self.elf = elf
        self.rnd = rnd
        self.log = []

    def put(self, at, fmt, value, what):
        top = 1 << (8 * struct.calcsize(fmt))
        if at + struct.calcsize(fmt) > len(self.b):
            return  # cut off by an earlier truncation
        struct.pack_into(fmt, self.b, at, value % top)
        self.log.append("%s=%#x" % (what, value % top))

    def value(self, cur, fmt, *extra):
        """An interesting value for a field holding cur."""
        top = 1 << (8 * struct.calcsize(fmt))
        return self.rnd.choice((0, 1, 7, 8, 24, 64, cur + 1, cur - 1, cur + 8, cur - 8, cur * 2,
                                self.size, self.size + 1, top - 1, top >> 1,
                                self.rnd.randrange(top)) + extra)

    def field(self, base, table, name, what, *extra):
        off, fmt = table[name]
        inside = base + off + struct.calcsize(fmt) <= len(self.b)
        cur = struct.unpack_from(fmt, self.b, base + off)[0] if inside else 0
        self.put(base + off, fmt, self.value(cur, fmt, *extra), "%s.%s" % (what, name))

    def section(self):
        return self.rnd.choice(self.elf.sections)

    def regions(self):
        """(offset, size) of everything the loader reads but code."""
        elf = self.elf
        out = [(0, 64), (elf.shoff, 64 * elf.shnum)]
        return out + [(s["offset"], s["size"]) for s in elf.sections
                      if s["size"] and not s["flags"] & 0x4 and s["type"] != SHT_NOBITS]

    def somewhere(self):
        if self.rnd.random() < 0.5:
            return self.rnd.randrange(self.size)
        off, size = self.rnd.choice(self.regions())
        return off + self.rnd.randrange(size)


def bits(m):
    for _ in range(m.rnd.randint(1, 16)):
        at, bit = m.somewhere(), m.rnd.randrange(8)
        m.b[at] ^= 1 << bit
        m.log.append("bit %d of byte %d" % (bit, at))


def overwrite(m):
    for _ in range(m.rnd.randint(1, 4)):
        fmt = m.rnd.choice(("B", "<H", "<I", "<Q"))
        at = m.somewhere()
        m.put(at, fmt, m.value(0, fmt, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80), "%s at %d" % (fmt, at))


def truncate(m):
    elf = m.elf
    s = m.section()
    k = m.rnd.randrange(max(elf.shnum, 1))
    at = m.rnd.choice((m.rnd.randrange(m.size), s["offset"], s["offset"] + s["size"],
                       s["offset"] + s["size"] - 1, elf.shoff, elf.shoff + 64 * k,
                       elf.shoff + 64 * k + 40, elf.symtab["offset"] + 24 * k + 8, 63, 64, 0))
    del m.b[at:]
    m.log.append("cut at byte %d of %d" % (at, m.size))


def header(m):
    elf = m.elf
    name = m.rnd.choice(("e_shoff", "e_shoff", "e_shnum", "e_shnum", "e_shstrndx", "e_shstrndx",
                         "e_shentsize", "e_machine", "ei_class"))
    m.field(0, EHDR, name, "ehdr", elf.shnum, elf.shnum - 1, elf.shstrndx, elf.symtab["index"],
            elf.shoff + 64, m.size - 64 * elf.shnum, 0xFFFF, 40, 63, 65, 128, 247, 2)


def section(m):
    elf = m.elf
    s = m.section()
    other = m.section()
    name = m.rnd.choice(sorted(SHDR))
    m.field(s["hdr"], SHDR, name, "section %d" % s["index"], elf.shnum, elf.shnum + 1,
            0xFFFFFFFF, other["index"], other["offset"], other["size"], SHT_NOBITS, SHT_REL,
            SHT_SYMTAB, SHT_STRTAB, 0x4, 0x6, m.size - s["offset"], 1 << 40, 23, 25)


def nobits(m, case):
    """Every section in turn made SHT_NOBITS, its offset and size kept or not."""
    s = m.elf.sections[case // len(KINDS) % m.elf.shnum]
    m.put(s["hdr"] + 4, "<I", SHT_NOBITS, "section %d (%s).sh_type" % (s["index"], s["name"]))
    how = m.rnd.randrange(4)
    if how == 1:
        m.put(s["hdr"] + 24, "<Q", m.size + 4096, "sh_offset")
    elif how == 2:
        m.put(s["hdr"] + 32, "<Q", 1 << 40, "sh_size")
    elif how == 3:
        m.put(s["hdr"] + 32, "<Q", (1 << 64) - 1, "sh_size")


def oversized(m):
    """A section longer than the file, or laid over another one."""
    s, other = m.section(), m.section()
    size = m.rnd.choice((1 << 40, (1 << 64) - 1, (1 << 63) + 8, m.size, m.size - s["offset"],
                         m.size - s["offset"] + 1, other["offset"] + other["size"] - s["offset"]))
    if m.rnd.random() < 0.3:
        m.put(s["hdr"] + 24, "<Q", other["offset"], "section %d.sh_offset" % s["index"])
    m.put(s["hdr"] + 32, "<Q", size, "section %d.sh_size" % s["index"])


def _symbol(m, named=True):
    """A function's or map's symbol, mostly; else any (most are jump labels)."""
    if named and m.rnd.random() < 0.8:
        return m.rnd.choice([s for s in m.elf.symbols if s["type"] in (1, 2) and s["name"]])
    return m.rnd.choice(m.elf.symbols)


def _name_off(m, sym):
    return struct.unpack_from("<I", m.b, m.elf.symtab["offset"] + 24 * sym["index"])[0]


def symbol(m):
    elf = m.elf
    sym, other = _symbol(m), _symbol(m)
    m.field(elf.symtab["offset"] + 24 * sym["index"], SYM, m.rnd.choice(sorted(SYM)),
            "symbol %r" % sym["name"], _name_off(m, other), other["shndx"], other["value"],
            elf.section("maps")["index"], elf.shnum, 0xFFF1, 0xFFFF, 0x12, 0x11, 0x03,
            elf.sections[sym["shndx"]]["size"] if sym["shndx"] < elf.shnum else 0)


def duplicate(m):
    """A function or map given another one's name."""
    elf = m.elf
    named = [s for s in elf.symbols if s["type"] in (1, 2) and s["name"]]
    sym, other = m.rnd.choice(named), m.rnd.choice(named)
    m.put(elf.symtab["offset"] + 24 * sym["index"], "<I", _name_off(m, other),
          "symbol %r.st_name (now %r)" % (sym["name"], other["name"]))


def reloc(m):
    elf = m.elf
    at, sec, r_off, sym, rtype = m.rnd.choice(elf.rels())
    m.field(at, REL, m.rnd.choice(sorted(REL)), "relocation at %d" % at, len(elf.symbols),
            len(elf.symbols) + 1, r_off + 4, r_off + 1, r_off + 16, sec["size"], sec["size"] - 8,
            2, 10, m.rnd.randrange(len(elf.symbols)))


def mapdef(m):
    elf = m.elf
    maps = elf.section("maps")
    sym = m.rnd.choice([s for s in elf.symbols if s["shndx"] == maps["index"] and s["name"]])
    name = m.rnd.choice(sorted(MAP_DEF))
    at = maps["offset"] + sym["value"] + MAP_DEF[name]
    cur = struct.unpack_from("<I", m.b, at)[0]
    m.put(at, "<I", m.value(cur, "<I", 9, 27, 4, 0xFFFFFFFF), "map %r.%s" % (sym["name"], name))


def strings(m):
    """String tables: the last NUL gone, NULs gone in a window, odd bytes."""
    tables = [s for s in m.elf.sections if s["type"] == SHT_STRTAB and s["size"]]
    s = m.rnd.choice(tables)
    start, end = s["offset"], s["offset"] + s["size"]
    how = m.rnd.randrange(4)
    if how == 0:
        m.b[end - 1] = ord("A")
        m.log.append("section %d: last NUL gone" % s["index"])
    elif how == 1:
        a = m.rnd.randrange(start, end)
        b = min(end, a + m.rnd.choice((16, 256, 4096, s["size"])))
        m.b[a:b] = m.b[a:b].replace(b"\0", b"x")
        m.log.append("section %d: no NUL in bytes %d-%d" % (s["index"], a, b))
    elif how == 2:
        at = m.rnd.randrange(start, end)
        m.b[at] = m.rnd.choice((0xFF, 0x80, 0x0A, 0x1B, 0x7F, 0xC3))
        m.log.append("section %d: byte %d=%#x" % (s["index"], at, m.b[at]))
    else:
        m.put(s["hdr"] + 32, "<Q", s["size"] - m.rnd.randint(1, 64),
              "section %d.sh_size" % s["index"])


def stacked(m):
    """Two to four edits of the kinds above, sometimes cut short after."""
    for _ in range(m.rnd.randint(2, 4)):
        kind = m.rnd.choice([k for k in KINDS if k not in (truncate, stacked)])
        if kind is nobits:
            kind(m, m.rnd.randrange(len(KINDS) * m.elf.shnum))
        else:
            kind(m)
    if m.rnd.random() < 0.3:
        truncate(m)


def build(sections, symbols):
    """A BPF ELF object made from scratch.  sections: [(name, sh_type, sh_flags, body, sh_link, sh_info)], numbered
    from 1; then come .strtab and .symtab.  symbols: [(name, st_info,
    st_shndx, st_value, st_size)]; names of both go in .strtab (a symbol's
    name may be a number instead: its st_name)."""
    strtab = bytearray(b"\0")

    def name(text):
        strtab.extend(text.encode() + b"\0")
        return len(strtab) - len(text) - 1
    n = len(sections)
    symtab = b"\0" * 24 + b"".join(struct.pack("<IBBHQQ", name(sn) if isinstance(sn, str) else sn,
                                                info, 0, shndx, value, size)
                                    for sn, info, shndx, value, size in symbols)
    rows = [(name(sn), stype, flags, body, link, info) for sn, stype, flags, body, link, info in
            sections] + [(name(".strtab"), SHT_STRTAB, 0, None, 0, 0),
                         (name(".symtab"), SHT_SYMTAB, 0, symtab, n + 1, 1)]
    out = bytearray(64)
    table = bytearray(64)  # the null section
    for name_off, stype, flags, body, link, info in rows:
        body = bytes(strtab) if body is None else body
        out.extend(b"\0" * (-len(out) % 8))
        table.extend(struct.pack("<IIQQQQIIQQ", name_off, stype, flags, 0, len(out), len(body),
                                 link, info, 8, {SHT_SYMTAB: 24, SHT_REL: 16}.get(stype, 0)))
        out.extend(body)
    out.extend(b"\0" * (-len(out) % 8))
    struct.pack_into("<4sBBBBB7xHHIQQQIHHHHHH", out, 0, b"\x7fELF", 2, 1, 1, 0, 0, 1, 247, 1, 0,
                     0, len(out), 0, 64, 0, 0, 64, n + 3, n + 1)
    return bytes(out + table)


EXIT = b"\x95" + b"\0" * 7  # BPF_JMP | BPF_EXIT
LOAD_MAP = b"\x18\x01" + b"\0" * 14  # r1 = a map (ld_imm64, for a relocation to fill)
CODE, DATA = 0x6, 0x3  # sh_flags: SHF_ALLOC | SHF_EXECINSTR, SHF_WRITE | SHF_ALLOC


def many_sections(n):
    """n code sections of one function each."""
    return build([("kprobe/f%d" % k, 1, CODE, EXIT, 0, 0) for k in range(n)],
                 [("f%d" % k, 0x12, k + 1, 0, len(EXIT)) for k in range(n)])


def many_relocations(n):
    """One code section of n functions, each loading map m."""
    fn = LOAD_MAP + EXIT
    rels = b"".join(struct.pack("<QQ", k * len(fn), 1 << 32 | 1) for k in range(n))
    return build([("kprobe/f", 1, CODE, fn * n, 0, 0), ("maps", 1, DATA, b"\1\0\0\0" * 5, 0, 0),
                  (".relkprobe/f", SHT_REL, 0, rels, 5, 1)],
                 [("m", 0x11, 2, 0, 20)] + [("f%d" % k, 0x12, 1, k * len(fn), len(fn))
                                            for k in range(n)])


def long_names(n, length):
    """n symbols whose names are suffixes of one name of length bytes."""
    return build([], [("x" * length, 0x11, 0, 0, 0)] + [(1 + k, 0x11, 0, 0, 0) for k in range(n)])


KINDS = (bits, overwrite, truncate, header, section, nobits, oversized, symbol, duplicate, reloc,
         mapdef, strings, stacked)


def mutant(data, elf, seed, case):
    """(broken bytes, "kind: what changed") of case number case."""
    kind = KINDS[case % len(KINDS)]
    m = Mutator(data, elf, random.Random("%d/%d" % (seed, case)))
    if kind is nobits:
        kind(m, case)
    else:
        kind(m)
    return bytes(m.b), "%s: %s" % (kind.__name__, ", ".join(m.log))


def main(seed, case, out=None):
    """Case number case of a run with seed made again: what it changes, and
    what the loader says (a traceback is the bug to fix)."""
    from test_elfload import OBJ, Elf
    with open(OBJ, "rb") as f:
        original = f.read()
    broken, what = mutant(original, Elf(original), seed, case)
    print(what)
    if out:
        with open(out, "wb") as f:
            f.write(broken)
    try:
        before_the_kernel(broken, out or "seed-%d-case-%d.o" % (seed, case))
        print("accepted")
    except elfload.ObjectError as e:
        print("refused: %s" % e)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4])
