"""offsetguess: discover the running kernel's struct sock layout.

No headers and no BTF: the guessing thread makes loopback sockets whose
addresses, ports and family it chose at random, sends one byte on each, and
a guess program (attached to a hook that sees the struct sock in the sending
thread's own context, and only that thread's: matched by pid *and* thread
id) copies the raw bytes of that struct sock into the guess_dump map.  User
space then looks for the known values in the bytes.  Each field has its own
bound on tries; a failure names the field and the bound reached.

Fields: daddr, saddr (rcv_saddr), dport, sport (skc_num), family, protocol
(sk_protocol), v6_daddr, v6_saddr, net (skc_net) and the inode number's
offset inside struct net.  With IPv6 unavailable the v6 fields are left out,
and the result says so.
"""

import errno
import os
import random
import socket
import struct
import time

import bpfsys

# struct offsets in tracer.bpf.h
OFFSETS = struct.Struct("<14I")
OFFSET_FIELDS = ("ready", "ipv6", "daddr", "saddr", "dport", "sport", "family", "state",
                 "protocol", "v6_daddr", "v6_saddr", "net", "netns_inum", "gen")
# struct guess_req in tracer.bpf.h
GUESS_REQ = struct.Struct("<QII")
# struct guess_dump in tracer.bpf.h: header, then the sk and net bytes
GUESS_DUMP_HEAD = struct.Struct("<IIIIQ")
GUESS_SK_BYTES = 2048
GUESS_NET_BYTES = 2048

AF_INET, AF_INET6 = 2, 10
ROUNDS_PER_FIELD = 4      # independent random sockets per address/port field
NET_CANDIDATES = 24       # 8-byte slots tried for skc_net


class GuessError(RuntimeError):
    """Guessing failed: names the field and the limit reached."""


class Offsets(object):
    """The guessed layout, and how guessing went."""

    def __init__(self, values, seconds, notes, rounds):
        self.values = values      # field name -> offset (ints)
        self.seconds = seconds
        self.notes = notes        # list of strings (e.g. IPv6 unavailable)
        self.rounds = rounds      # how many probe sends were made

    @property
    def ipv6(self):
        return bool(self.values.get("ipv6"))

    def pack(self, gen=0):
        """struct offsets, with the poll generation gen."""
        return OFFSETS.pack(*[gen if f == "gen" else self.values.get(f, 0) for f in OFFSET_FIELDS])

    def as_dict(self):
        return dict((k, v) for k, v in self.values.items() if not k.startswith("_"))


class _Prober(object):
    """Sends on a socket from this thread and returns the dumped bytes."""

    def __init__(self, maps):
        self.req = maps["guess_req"]
        self.dump = maps["guess_dump"]
        self.seq = 0
        self.rounds = 0
        self.pid_tgid = (os.getpid() << 32) | bpfsys.gettid()

    def probe(self, sock, net_off=0):
        self.seq += 1
        self.rounds += 1
        self.req.update(b"\0\0\0\0", GUESS_REQ.pack(self.pid_tgid, net_off, self.seq))
        try:
            sock.send(b"g")
        except OSError:
            pass  # the hook fired before any error; the dump tells
        raw = self.dump.lookup(b"\0\0\0\0")
        seq, sk_ok, net_ok, _, sk = GUESS_DUMP_HEAD.unpack_from(raw)
        if seq != self.seq:
            return None
        base = GUESS_DUMP_HEAD.size
        sk_bytes = _valid(raw[base:base + GUESS_SK_BYTES], sk_ok)
        net_bytes = _valid(raw[base + GUESS_SK_BYTES:base + GUESS_SK_BYTES + GUESS_NET_BYTES], net_ok)
        return sk_bytes, net_bytes

    def stop(self):
        self.req.update(b"\0\0\0\0", GUESS_REQ.pack(0, 0, 0))


def _valid(data, okmask, chunk=512):
    """Bytes up to the first chunk the kernel could not read."""
    n = 0
    while n < len(data) // chunk and okmask & (1 << n):
        n += 1
    return data[:n * chunk]


def _find_all(hay, needle, align, limit=None):
    out = []
    i = hay.find(needle)
    while i >= 0 and (limit is None or i < limit):
        if i % align == 0:
            out.append(i)
        i = hay.find(needle, i + 1)
    return out


def _rand_v4():
    return "127.%d.%d.%d" % (random.randint(1, 254), random.randint(1, 254), random.randint(2, 254))


def _udp_pair(family, local, remote):
    """A UDP socket bound to local and connected to remote."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind(local)
        s.connect(remote)
    except Exception:
        s.close()
        raise
    return s


def _guess_udp(prober, family, rand_addr, patterns):
    """Send from ROUNDS_PER_FIELD UDP sockets bound and connected to random
    addresses (rand_addr()) and ports; patterns(laddr, lport, raddr, rport)
    gives {field: (bytes, alignment)} to find in each dump.  Returns
    ({field: candidate offsets found in every dump}, dumps)."""
    cands = None
    dumps = []
    for _ in range(ROUNDS_PER_FIELD):
        laddr, raddr = rand_addr(), rand_addr()
        s = _udp_pair(family, (laddr, 0), (raddr, random.randint(20000, 60000)))
        try:
            want = patterns(laddr, s.getsockname()[1], raddr, s.getpeername()[1])
            got = prober.probe(s)
        finally:
            s.close()
        if got is None:
            continue
        dumps.append(got[0])
        found = dict((f, _find_all(got[0], b, align)) for f, (b, align) in want.items())
        cands = found if cands is None else dict(
            (f, [o for o in cands[f] if o in found[f]]) for f in cands)
        if len(dumps) >= 2 and all(len(v) == 1 for v in cands.values()):
            break
    if cands is None:
        raise GuessError("guessing saw no struct sock from its own thread after %d UDP sends "
                         "(family %d): the guess program did not run" % (ROUNDS_PER_FIELD, family))
    for field, offs in sorted(cands.items()):
        if not offs:
            raise GuessError("could not find the offset of %s in struct sock after %d tries"
                             % (field, ROUNDS_PER_FIELD))
    return cands, dumps


def _guess_v4(prober):
    """daddr, saddr, dport and sport candidates from IPv4 UDP sockets."""
    return _guess_udp(prober, socket.AF_INET, _rand_v4, lambda la, lp, ra, rp: {
        "daddr": (socket.inet_aton(ra), 4),
        "saddr": (socket.inet_aton(la), 4),
        "dport": (struct.pack(">H", rp), 2),
        "sport": (struct.pack("<H", lp), 2),
    })


def _guess_v6(prober):
    """v6_daddr and v6_saddr from IPv6 UDP sockets.  v4-mapped addresses
    make source and destination differ on a loopback-only host."""
    v6 = lambda a: socket.inet_pton(socket.AF_INET6, a)
    return _guess_udp(prober, socket.AF_INET6, lambda: "::ffff:" + _rand_v4(),
                      lambda la, lp, ra, rp: {"v6_daddr": (v6(ra), 4), "v6_saddr": (v6(la), 4)})


def _u16s(data, value):
    return set(_find_all(data, struct.pack("<H", value), 2))


def _guess_family(v4_dumps, v6_dumps, limit):
    """The u16 slot holding AF_INET in every v4 dump and AF_INET6 in every v6
    one (in struct sock_common: below the v6 addresses)."""
    offs = None
    for d in v4_dumps:
        offs = _u16s(d, AF_INET) if offs is None else offs & _u16s(d, AF_INET)
    for d in v6_dumps:
        offs &= _u16s(d, AF_INET6)
    offs = sorted(o for o in (offs or ()) if o < limit)
    if not offs:
        raise GuessError("could not find the offset of family in struct sock (%d v4 and %d v6 dumps)"
                         % (len(v4_dumps), len(v6_dumps)))
    return offs[0]


def _guess_family_v4_only(v4_dumps, fields):
    """Without IPv6: the AF_INET slot right after the ports (sock_common's
    skc_family follows skc_num)."""
    want = fields["sport"] + 2
    if all(d[want:want + 2] == struct.pack("<H", AF_INET) for d in v4_dumps):
        return want
    raise GuessError("could not find the offset of family in struct sock without IPv6")


def _tcp_dump(prober):
    """The struct sock of a connected TCP socket bound to a random address
    and port: (dump, local port).  UDP keeps its local port in
    skc_u16hashes as well as in skc_num; TCP does not, which tells the two
    apart."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli.bind((_rand_v4(), 0))
        cli.connect(lst.getsockname())
        srv, _ = lst.accept()
        try:
            got = prober.probe(cli)
        finally:
            srv.close()
        lport = cli.getsockname()[1]
    finally:
        cli.close()
        lst.close()
    if got is None:
        raise GuessError("guessing saw no struct sock of its own TCP socket: the guess program did not run")
    return got[0], lport


def _guess_protocol(tcp, udp_dumps, family_off):
    """sk_protocol: the u16 that is 6 in a TCP socket and 17 in the UDP ones,
    with sk_type (1 and 2) just before it."""
    offs = _u16s(tcp, 6)
    for d in udp_dumps:
        offs &= _u16s(d, 17)
    offs = sorted(o for o in offs if o > family_off)
    typed = [o for o in offs if tcp[o - 2:o] == struct.pack("<H", 1)
             and all(d[o - 2:o] == struct.pack("<H", 2) for d in udp_dumps)]
    if typed:
        return typed[0]
    if offs:
        return offs[0]
    raise GuessError("could not find the offset of protocol in struct sock")


def _guess_net(prober, sk_dump, lowest):
    """skc_net and the inode number's offset inside struct net: try each
    kernel-pointer-looking slot as skc_net and look for our netns inode in
    the struct it points to."""
    inum = os.stat("/proc/self/ns/net").st_ino
    needle = struct.pack("<I", inum)
    slots = [o for o in range(lowest - lowest % 8, min(len(sk_dump), 512), 8)
             if struct.unpack_from("<Q", sk_dump, o)[0] >= 0xffff800000000000]
    tried = 0
    for off in slots[:NET_CANDIDATES]:
        tried += 1
        s = _udp_pair(socket.AF_INET, ("127.0.0.1", 0), ("127.0.0.1", random.randint(20000, 60000)))
        try:
            got = prober.probe(s, net_off=off)
        finally:
            s.close()
        if got is None:
            continue
        hits = _find_all(got[1], needle, 4)
        if hits:
            return off, hits[0]
    raise GuessError("could not find the offset of net (netns inode %d) after %d candidate slots"
                     % (inum, tried))


def guess(maps, want_protocol=True, ipv6=True):
    """Guess the offsets with the guess program already attached; returns
    Offsets.  maps: the object's live maps (guess_req, guess_dump)."""
    start = time.time()
    prober = _Prober(maps)
    notes = []
    try:
        cands, v4_dumps = _guess_v4(prober)
        values = dict((f, offs[0]) for f, offs in cands.items())
        tcp, tcp_lport = _tcp_dump(prober)
        sport = [o for o in cands["sport"] if tcp[o:o + 2] == struct.pack("<H", tcp_lport)]
        if not sport:
            raise GuessError("could not find the offset of sport in struct sock: no slot holds "
                             "the local port of both a UDP and a TCP socket")
        values["sport"] = sport[0]
        v6_dumps = []
        if ipv6:
            try:
                v6, v6_dumps = _guess_v6(prober)
                values.update((f, offs[0]) for f, offs in v6.items())
                values["ipv6"] = 1
            except OSError as e:
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENETUNREACH,
                                   errno.EPROTONOSUPPORT):
                    raise
                notes.append("IPv6 unavailable (%s): IPv6 connections are not traced"
                             % os.strerror(e.errno))
        else:
            notes.append("IPv6 tracing disabled")
        if v6_dumps:
            values["family"] = _guess_family(v4_dumps, v6_dumps, min(values["v6_daddr"], values["v6_saddr"]))
        else:
            values["family"] = _guess_family_v4_only(v4_dumps, values)
        values["state"] = values["family"] + 2  # skc_state follows skc_family
        if want_protocol:
            values["protocol"] = _guess_protocol(tcp, v4_dumps, values["family"])
        values["net"], values["netns_inum"] = _guess_net(prober, v4_dumps[0], values["family"] + 4)
    finally:
        prober.stop()
    values["ready"] = 1
    return Offsets(values, time.time() - start, notes, prober.rounds)
