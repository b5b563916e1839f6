"""elfload: read a BPF ELF object into a plain description, then load it.

Step one, parse(): no privileges, no file descriptors.  The object becomes an
ObjectSpec: programs by function name (with section, program type and attach
target), legacy maps from the "maps" section, license and kernel version, and
the map relocations of each program.  A truncated, malformed or foreign file
raises ObjectError naming what is wrong, in one line; no other exception
escapes parse() or load() for what the file holds, and parse() takes time
and memory in proportion to the file (test_fuzz.py).  Whether the object has
what the tracer needs (maps of the right shape, its programs) is abi.py's
question.

Step two, ObjectSpec.load(): create the maps, patch each relocated ld_imm64
with its map's fd, and load only the programs asked for.  The result, a
Collection, owns every fd and closes them all on close() -- also when a
step in the middle fails.
"""

import bisect
import collections
import re
import struct

import abi
import bpfsys

EM_BPF = 247
SHT_SYMTAB = 2
SHT_REL = 9
SHT_NOBITS = 8  # occupies no bytes in the file
SHT_NULL = 0
SHF_EXECINSTR = 0x4
STT_FUNC = 2
STT_OBJECT = 1
BPF_LD_IMM64 = 0x18
INSN = 8  # bytes per instruction; an ld_imm64 takes two
R_BPF_64_64 = 1
SYM_SIZE, REL_SIZE = 24, 16  # Elf64_Sym, Elf64_Rel
# the longest name read from a string table: far above any symbol or section
# name (a kernel symbol is at most 512), and a bound on what names can cost
MAX_NAME = 1024
MAP_DEF = abi.BPF_MAP_DEF.struct
# an ld_imm64 of 0 from no source: what clang leaves for the loader to fill
# (a map's address); a constant 0 it would load with a mov
_UNFILLED_LOAD = re.compile(b"\x18[\x00-\x0f]\x00{14}")

# section prefix -> (program type, attach kind)
SECTION_KINDS = (
    ("kprobe/", bpfsys.BPF_PROG_TYPE_KPROBE, "kprobe"),
    ("kretprobe/", bpfsys.BPF_PROG_TYPE_KPROBE, "kretprobe"),
    ("tracepoint/", bpfsys.BPF_PROG_TYPE_TRACEPOINT, "tracepoint"),
    ("raw_tracepoint/", bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, "raw_tracepoint"),
    ("socket", bpfsys.BPF_PROG_TYPE_SOCKET_FILTER, "socket"),
    ("cgroup/", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, "cgroup"),
)


class ObjectError(ValueError):
    """The file is not a BPF object this loader can use."""


class MapSpec(object):
    def __init__(self, name, map_type, key_size, value_size, max_entries, flags):
        self.name = name
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.flags = flags

    def __repr__(self):
        return "MapSpec(%s, type=%d, key=%d, value=%d, max=%d)" % (
            self.name, self.map_type, self.key_size, self.value_size, self.max_entries)


class ProgramSpec(object):
    """One program: its instructions and the maps its ld_imm64s refer to."""

    def __init__(self, name, section, prog_type, kind, target, insns, relocs):
        self.name = name
        self.section = section
        self.prog_type = prog_type
        self.kind = kind          # kprobe, kretprobe, tracepoint, raw_tracepoint, socket
        self.target = target      # function, "category/name", or tracepoint name
        self.insns = insns        # bytes, 8 per instruction
        self.relocs = relocs      # [(instruction index, map name)]

    def __repr__(self):
        return "ProgramSpec(%s, %s, %d insns)" % (self.name, self.section, len(self.insns) // 8)

    def linked(self, map_fds):
        """The instructions as BPF_PROG_LOAD takes them: each relocated
        ld_imm64 loads its map's fd (map_fds: {map name: fd})."""
        insns = bytearray(self.insns)
        for idx, map_name in self.relocs:
            off = idx * INSN
            # ld_imm64: src_reg = BPF_PSEUDO_MAP_FD, imm = the map's fd
            insns[off + 1] = (insns[off + 1] & 0x0F) | (bpfsys.BPF_PSEUDO_MAP_FD << 4)
            struct.pack_into("<i", insns, off + 4, map_fds[map_name])
        return bytes(insns)


class ObjectSpec(object):
    def __init__(self, path, programs, maps, license, kern_version):
        self.path = path
        self.programs = programs  # {name: ProgramSpec}
        self.maps = maps          # {name: MapSpec}
        self.license = license
        self.kern_version = kern_version

    def load(self, programs=None, max_entries=None):
        """Create the maps and load the named programs (all when None).
        max_entries: {map name: entries} overrides."""
        names = list(self.programs) if programs is None else _unique(programs)
        for n in names:
            if n not in self.programs:
                raise ObjectError(_one_line("%s: no program named %r (have: %s)" % (
                    self.path, n, ", ".join(sorted(self.programs)))))
        for n, entries in sorted((max_entries or {}).items()):
            if n not in self.maps:
                raise ObjectError(_one_line("%s: no map named %r to resize (have: %s)" % (
                    self.path, n, ", ".join(sorted(self.maps)))))
            if not 0 < entries < 1 << 32:
                raise ObjectError("%s: map %r cannot have %r entries (1 to %d)" % (
                    self.path, n, entries, (1 << 32) - 1))
        coll = Collection(self)
        try:
            for m in self.maps.values():
                entries = (max_entries or {}).get(m.name, m.max_entries)
                coll.maps[m.name] = bpfsys.Map(m.map_type, m.key_size, m.value_size, entries,
                                               m.flags, m.name)
            for n in names:
                coll.programs[n] = self._load_program(self.programs[n], coll.maps)
        except Exception:
            coll.close()
            raise
        return coll

    def _load_program(self, spec, maps):
        insns = spec.linked(dict((name, m.fd) for name, m in maps.items()))
        return bpfsys.Program(spec.prog_type, insns, self.license, spec.name,
                              self.kern_version,
                              bpfsys.CGROUP_ATTACH_TYPES.get(spec.target, 0) if spec.kind == "cgroup" else 0)


def _unique(names):
    """names without repeats, in their first order (a program loads once)."""
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


class Collection(object):
    """Live maps and programs of one object; close() releases them all."""

    def __init__(self, spec=None):
        self.spec = spec
        self.maps = {}
        self.programs = {}

    def program(self, name):
        """The named program, loaded now if it was not loaded at first (a
        fallback needed only on some kernels)."""
        p = self.programs.get(name)
        if p is None:
            if self.spec is None or name not in self.spec.programs:
                raise ObjectError("no program named %r to load" % name)
            p = self.programs[name] = self.spec._load_program(self.spec.programs[name], self.maps)
        return p

    def close(self):
        for obj in list(self.programs.values()) + list(self.maps.values()):
            obj.close()
        self.programs.clear()
        self.maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (IOError, OSError) as e:
        raise ObjectError("%s: cannot read the BPF object: %s" % (path, e.strerror))
    return parse(data, path)


def _one_line(text):
    """Names come from the file: escape what would break the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse(data, path="<bytes>"):
    """Describe a BPF ELF object (bytes) as an ObjectSpec."""
    def bad(msg):
        return ObjectError("%s: %s" % (path, _one_line(msg)))

    if len(data) < 64:
        raise bad("truncated: %d bytes is shorter than an ELF header" % len(data))
    if data[:4] != b"\x7fELF":
        raise bad("not an ELF file (magic %r)" % data[:4])
    if data[4] != 2 or data[5] != 1:
        raise bad("not a 64-bit little-endian ELF object (class %d, data %d)" % (data[4], data[5]))
    (e_type, e_machine, _, _, _, e_shoff, _, _, _, _, e_shentsize, e_shnum,
     e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    if e_machine != EM_BPF:
        raise bad("ELF machine %d is not BPF (%d): not a BPF object" % (e_machine, EM_BPF))
    if e_shentsize != 64 or e_shnum == 0:
        raise bad("no usable section header table")
    if e_shoff + e_shnum * 64 > len(data):
        raise bad("truncated: the section header table ends at byte %d, the file at %d" % (
            e_shoff + e_shnum * 64, len(data)))

    sections = []
    for i in range(e_shnum):
        (name_off, sh_type, flags, _, off, size, link, info, _, entsize) = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * 64)
        if sh_type != SHT_NOBITS and off + size > len(data):
            raise bad("truncated: section %d ends at byte %d, the file at %d" % (i, off + size, len(data)))
        sections.append([name_off, sh_type, flags, off, size, link, info, entsize])
    if e_shstrndx >= e_shnum:
        raise bad("bad section name table index %d" % e_shstrndx)

    def in_file(i, what):
        """Section i, whose bytes we read: they must be in the file."""
        if sections[i][1] == SHT_NOBITS:
            raise bad("%s is SHT_NOBITS: it has no bytes in the file" % what)
        return sections[i]

    shstr = in_file(e_shstrndx, "the section name table (section %d)" % e_shstrndx)

    def cstr(table_off, table_size, off):
        if off >= table_size:
            raise bad("string offset %d outside its table" % off)
        start = table_off + off
        end = data.find(b"\0", start, min(table_off + table_size, start + MAX_NAME + 1))
        if end < 0 and table_size - off > MAX_NAME:
            raise bad("a name of over %d bytes in a string table" % MAX_NAME)
        if end < 0:
            raise bad("unterminated string in a string table")
        return data[start:end].decode("utf-8", "replace")

    names = [cstr(shstr[3], shstr[4], s[0]) for s in sections]

    def body(i):
        in_file(i, "section %d %r" % (i, names[i]))
        return data[sections[i][3]:sections[i][3] + sections[i][4]]

    symtab = [i for i, s in enumerate(sections) if s[1] == SHT_SYMTAB]
    if not symtab:
        raise bad("no symbol table")
    st = in_file(symtab[0], "the symbol table (section %d)" % symtab[0])
    if st[4] % SYM_SIZE:
        raise bad("the symbol table (section %d) is %d bytes, not a whole number of %d-byte "
                  "symbols" % (symtab[0], st[4], SYM_SIZE))
    if st[5] >= len(sections):
        raise bad("the symbol table links to string table %d, which does not exist" % st[5])
    strtab = in_file(st[5], "the symbol string table (section %d)" % st[5])
    symbols = []
    in_section = collections.defaultdict(list)  # section index -> its symbols' indexes
    for k in range(st[4] // SYM_SIZE):
        (s_name, s_info, _, s_shndx, s_value, s_size) = struct.unpack_from(
            "<IBBHQQ", data, st[3] + k * SYM_SIZE)
        symbols.append((cstr(strtab[3], strtab[4], s_name), s_info & 0xF, s_shndx, s_value, s_size))
        in_section[s_shndx].append(k)

    license = "GPL"
    kern_version = 0
    maps = {}
    map_at = {}   # map name -> where its definition is, for a second one
    map_by_sym = {}
    for i, n in enumerate(names):
        if n == "license":
            try:
                license = body(i).split(b"\0")[0].decode("ascii")
            except UnicodeDecodeError:
                raise bad("the license section is not ASCII text")
        elif n == "version":
            raw = body(i)
            if len(raw) != 4:
                raise bad("the version section is %d bytes, expected 4 (a u32 kernel version)" % len(raw))
            kern_version = struct.unpack("<I", raw)[0]
        elif n == "maps":
            raw = body(i)
            for k in in_section[i]:
                sname, _, _, value, _ = symbols[k]
                if not sname:
                    continue
                if value + MAP_DEF.size > len(raw):
                    raise bad("map %s: definition runs past the maps section" % sname)
                where = "section %d (maps) at byte %d" % (i, value)
                if sname in maps:
                    raise bad("two maps named %r: in %s and in %s" % (sname, map_at[sname], where))
                maps[sname] = MapSpec(sname, *MAP_DEF.unpack_from(raw, value))
                map_at[sname] = where
                map_by_sym[k] = sname

    programs = {}
    prog_at = {}      # program name -> where its code is, for a second one
    prog_ranges = {}  # section index -> ([start], [(start, end, name)]), in order
    for i, n in enumerate(names):
        if not (sections[i][2] & SHF_EXECINSTR) or sections[i][4] == 0:
            continue
        kind = next((k for k in SECTION_KINDS if n.startswith(k[0])), None)
        if kind is None:
            raise bad("section %r holds code of an unknown program type" % n)
        prefix, prog_type, kname = kind
        target = n[len(prefix):]
        if kname == "cgroup" and target not in bpfsys.CGROUP_ATTACH_TYPES:
            raise bad("section %r: unknown cgroup hook %r (known: %s)" % (
                n, target, ", ".join(sorted(bpfsys.CGROUP_ATTACH_TYPES))))
        code = body(i)
        funcs = sorted((value, size, sname) for sname, stype, _, value, size in
                       (symbols[k] for k in in_section[i]) if stype == STT_FUNC)
        if not funcs:
            raise bad("section %r has code but no function symbol" % n)
        ranges = []
        for value, size, fname in funcs:
            if value + size > len(code) or size % INSN:
                raise bad("function %s runs past its section %r" % (fname, n))
            where = "section %r at byte %d" % (n, value)
            if not fname:
                raise bad("a function in %s has no name" % where)
            if size == 0:
                raise bad("function %r in %s is empty" % (fname, where))
            if value % INSN:
                raise bad("function %r in %s does not start on an instruction" % (fname, where))
            if ranges and value < ranges[-1][1]:
                raise bad("functions %r and %r overlap in section %r" % (ranges[-1][2], fname, n))
            if fname in programs:
                raise bad("two functions named %r: in %s and in %s" % (fname, prog_at[fname], where))
            programs[fname] = ProgramSpec(fname, n, prog_type, kname, target,
                                          code[value:value + size], [])
            prog_at[fname] = where
            ranges.append((value, value + size, fname))
        prog_ranges[i] = ([a for a, _, _ in ranges], ranges)

    for i, n in enumerate(names):
        if sections[i][1] != SHT_REL:
            continue
        target_sec = sections[i][6]
        if target_sec not in prog_ranges:
            continue
        raw = body(i)
        if len(raw) % REL_SIZE:
            raise bad("section %d %r is %d bytes, not a whole number of %d-byte relocations" % (
                i, n, len(raw), REL_SIZE))
        starts, ranges = prog_ranges[target_sec]
        for k in range(len(raw) // REL_SIZE):
            r_off, r_info = struct.unpack_from("<QQ", raw, k * REL_SIZE)
            sym, rtype = r_info >> 32, r_info & 0xFFFFFFFF
            j = bisect.bisect_right(starts, r_off) - 1
            if j < 0 or r_off >= ranges[j][1]:
                raise bad("relocation at %s+%d is outside every function" % (names[target_sec], r_off))
            start, _, prog = ranges[j]
            if sym >= len(symbols):
                raise bad("relocation in %s names symbol %d, which does not exist" % (prog, sym))
            if sym not in map_by_sym:
                raise bad("program %s refers to %r, which is not a map (calls to "
                          "non-inlined functions and global data are not supported)" % (
                              prog, symbols[sym][0]))
            spec = programs[prog]
            idx = (r_off - start) // INSN
            if rtype != R_BPF_64_64 or (r_off - start) % INSN or spec.insns[idx * INSN] != BPF_LD_IMM64:
                raise bad("program %s: relocation type %d at instruction %d is not a map load" % (
                    prog, rtype, idx))
            if (idx + 2) * INSN > len(spec.insns):
                raise bad("program %s: the map load at instruction %d runs past its end" % (prog, idx))
            spec.relocs.append((idx, map_by_sym[sym]))

    # a relocation section lost (its type, target or size changed) leaves
    # map loads the kernel would take for a constant 0
    for name in sorted(programs):
        spec = programs[name]
        done = set(idx for idx, _ in spec.relocs)
        for m in _UNFILLED_LOAD.finditer(spec.insns):
            if m.start() % INSN == 0 and m.start() // INSN not in done:
                raise bad("program %s: the map load at instruction %d has no relocation naming "
                          "its map" % (name, m.start() // INSN))

    # each byte of the file is one thing's: sections that share bytes (with
    # each other, the ELF header or the section table) were not laid out by a linker
    spans = sorted([(0, 64, "the ELF header"), (e_shoff, e_shoff + e_shnum * 64, "the section table")]
                   + [(s[3], s[3] + s[4], "section %d %r" % (i, names[i])) for i, s in enumerate(sections)
                      if s[1] not in (SHT_NULL, SHT_NOBITS) and s[4]])
    last = spans[0]
    for span in spans[1:]:
        if span[0] < last[1]:
            raise bad("%s (bytes %d-%d) overlaps %s (bytes %d-%d)" % (last[2], last[0], last[1],
                                                                     span[2], span[0], span[1]))
        last = max(last, span, key=lambda sp: sp[1])
    return ObjectSpec(path, programs, maps, license, kern_version)
