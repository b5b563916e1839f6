"""backends: which programs of tracer.bpf.o run where, and how they attach.

Each backend is a Backend in REGISTRY, in the order `auto` prefers them;
--backend, --check, README's hook tables (test_backends checks them) and
bench read it.  A backend names the programs it wants and its policy
(optional, kernel-version variants, TCP or UDP); each program's kind and
attach target are its section in tracer.bpf.o.  Two backends share the
object's maps and produce the same records:
  tracepoint  stable tracepoints only, raw where the kernel can, cgroup
              sock_addr hooks for UDP peers; Linux 6.3+ (the sock length
              tracepoints), for kernels built without kprobes;
  kprobe      kprobes/kretprobes on the TCP/UDP functions (any kernel with
              CONFIG_KPROBES; the seed's method).
auto picks tracepoint where it is available: one cheap raw-tracepoint
program per send and receive, no kretprobe that can be missed; else
kprobe.  choose() says which and why.
"""

import collections
import errno
import itertools
import os

import abi
import bpfsys
import elfload
import offsetguess

# tp_fields map slots (abi.TPF_*): the perf tracepoint field whose offset each holds
TP_FIELDS = {
    abi.TPF_ISS_SKADDR: ("sock", "inet_sock_set_state", "skaddr"),
    abi.TPF_ISS_NEWSTATE: ("sock", "inet_sock_set_state", "newstate"),
    abi.TPF_ISS_SPORT: ("sock", "inet_sock_set_state", "sport"),
    abi.TPF_ISS_DPORT: ("sock", "inet_sock_set_state", "dport"),
    abi.TPF_ISS_FAMILY: ("sock", "inet_sock_set_state", "family"),
    abi.TPF_ISS_PROTOCOL: ("sock", "inet_sock_set_state", "protocol"),
    abi.TPF_ISS_SADDR: ("sock", "inet_sock_set_state", "saddr"),
    abi.TPF_ISS_DADDR: ("sock", "inet_sock_set_state", "daddr"),
    abi.TPF_ISS_SADDR_V6: ("sock", "inet_sock_set_state", "saddr_v6"),
    abi.TPF_ISS_DADDR_V6: ("sock", "inet_sock_set_state", "daddr_v6"),
    abi.TPF_SENDTO_ADDR: ("syscalls", "sys_enter_sendto", "addr"),
    abi.TPF_SENDMSG_MSG: ("syscalls", "sys_enter_sendmsg", "msg"),
    abi.TPF_RECVFROM_ADDR: ("syscalls", "sys_enter_recvfrom", "addr"),
    abi.TPF_RECVMSG_MSG: ("syscalls", "sys_enter_recvmsg", "msg"),
    abi.TPF_SSL_SK: ("sock", "sock_send_length", "sk"),
    abi.TPF_SSL_RET: ("sock", "sock_send_length", "ret"),
    abi.TPF_SSL_FLAGS: ("sock", "sock_send_length", "flags"),
    abi.TPF_RETRANS_SKADDR: ("tcp", "tcp_retransmit_skb", "skaddr"),
    abi.TPF_RETRANS_SKBADDR: ("tcp", "tcp_retransmit_skb", "skbaddr"),
    abi.TPF_ISS_OLDSTATE: ("sock", "inet_sock_set_state", "oldstate"),
}

# What a backend wants, by program name; each program's kind and attach
# target are its section in tracer.bpf.o (SEC("kprobe/tcp_sendmsg")).
# A name may end in "?" (optional: left out where the kernel lacks its
# hook) and hold "{recv}" / "{err}" (the variant for this kernel: VARIANTS).
# Each is wanted for TCP, UDP or BOTH.
TCP, UDP, BOTH = "tcp", "udp", "both"

# the placeholders of program names, and every value they take
VARIANTS = collections.OrderedDict([("recv", ("", "_pre_5_19")), ("err", ("", "_err"))])

# Where the cgroup hooks cannot be attached (no cgroup2, before 5.7): the
# message addresses from syscall tracepoints instead, which put every
# syscall of every task on the traced slow path while attached.
SYSCALL_FALLBACK = ("tp_sys_enter_sendto", "tp_sys_enter_sendmsg", "tp_sys_enter_recvfrom",
                    "tp_sys_enter_recvmsg", "tp_sys_exit_recvfrom", "tp_sys_exit_recvmsg",
                    "tp_sys_exit_sendto", "tp_sys_exit_sendmsg")
# The kprobe backend counts TCP bytes from the sockets' sequence counters at
# these two hooks (one kprobe each, no kretprobe); where the kernel lacks
# either, it counts each call's return value with kprobe/kretprobe pairs.
SEQ_HOOKS = ("kp_tcp_push", "kp_tcp_cleanup_rbuf")
RETVAL_FALLBACK = ("kp_tcp_sendmsg", "krp_tcp_sendmsg", "kp_tcp_sendpage?", "krp_tcp_sendpage?",
                   "kp_tcp_recvmsg{recv}", "krp_tcp_recvmsg")
# perf-tracepoint stand-ins for raw tracepoints (kernels without raw ones)
PERF_FALLBACK = collections.OrderedDict([
    ("tp_sock_send_length", "tpp_sock_send_length"),
    ("tp_sock_recv_length", "tpp_sock_recv_length"),
    ("tp_tcp_retransmit_skb", "tpp_tcp_retransmit_skb"),
])


class Backend(object):
    """One way of tracing: name, a line for --help, the programs it wants
    (with the policy: optional, variants, TCP/UDP), its guess programs and
    what offsetguess must find for them, and its availability check
    (available() -> (usable, why))."""

    def __init__(self, name, summary, programs, guess, available, guess_options, fallbacks=()):
        self.name = name
        self.summary = summary
        self.programs = tuple(programs)  # (name pattern, TCP/UDP/BOTH)
        self.guess = tuple(guess)
        self.available = available
        self.guess_options = guess_options
        self.fallbacks = tuple(fallbacks)  # loaded only when plan or attach_all turns to them

    def every_program(self):
        """Every program name it may load: each variant, the fallbacks
        and the guess programs."""
        names = []
        for pattern in [p for p, _ in self.programs] + list(self.fallbacks):
            names.extend(variants(pattern))
        names += [PERF_FALLBACK[n] for n in list(names) if n in PERF_FALLBACK]
        return _unique(names + list(self.guess))

    def __repr__(self):
        return "Backend(%r)" % self.name


def variants(pattern):
    """Every program name a pattern stands for."""
    names = []
    for values in itertools.product(*VARIANTS.values()):
        n = pattern.rstrip("?").format(**dict(zip(VARIANTS, values)))
        if n not in names:
            names.append(n)
    return names


def _unique(names):
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


# tasks that can be inside one kretprobed function at once (tracefs r<N>:
# the kernel's limit is 4096); blocking sends and receives hold one each
KRETPROBE_MAXACTIVE = min(4096, max(512, 64 * (os.cpu_count() or 1)))


class BackendError(RuntimeError):
    pass


def kernel_version(release=None):
    """(major, minor) of the running kernel."""
    release = release or os.uname()[2]
    nums = []
    for part in release.split("-")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        nums.append(int(digits or 0))
    while len(nums) < 2:
        nums.append(0)
    return tuple(nums)


def _has_tracepoint(category, name):
    try:
        bpfsys.tracepoint_id(category, name)
        return True
    except OSError:
        return False


def has_sock_tracepoints():
    return all(_has_tracepoint(*t) for t in (("sock", "inet_sock_set_state"),
                                           ("sock", "sock_send_length"),
                                           ("sock", "sock_recv_length")))


def _tracepoint_available():
    try:
        if has_sock_tracepoints():
            return True, "sock:sock_send_length, sock:sock_recv_length and sock:inet_sock_set_state present"
        return False, "sock:sock_send_length/sock_recv_length tracepoints missing (kernel < 6.3)"
    except OSError as e:
        return False, str(e)


def _kprobe_available():
    if bpfsys.kprobe_pmu() is not None:
        return True, "kprobe PMU present"
    if bpfsys.kprobe_events_path() is not None:
        return True, "tracefs kprobe_events present"
    return False, "kernel built without kprobes (no kprobe PMU, no kprobe_events)"


# every backend, in the order auto prefers them
REGISTRY = (
    Backend("tracepoint",
            "stable tracepoints only: sock:sock_send_length, sock:sock_recv_length, "
            "sock:inet_sock_set_state, sock:sk_data_ready, tcp:tcp_retransmit_skb, "
            "tcp:tcp_destroy_sock, and cgroup sendmsg/recvmsg hooks for the UDP message "
            "address (syscall tracepoints where cgroup2 cannot be used).  Needs Linux 6.3 or "
            "newer; works on kernels built without kprobes.",
            programs=(
                ("tp_inet_sock_set_state", TCP),
                ("tp_sock_send_length", BOTH),
                ("tp_sock_recv_length", BOTH),
                ("tp_tcp_retransmit_skb{err}", TCP),
                ("tp_tcp_destroy_sock", TCP),
                ("tp_tcp_retransmit_synack", TCP),
                ("tp_sk_data_ready?", UDP),
                ("cg_sendmsg4", UDP),
                ("cg_sendmsg6", UDP),
                ("cg_recvmsg4", UDP),
                ("cg_recvmsg6", UDP)),
            guess=("guess_sock_send_length", "guess_inet_sock_set_state"),
            available=_tracepoint_available,
            guess_options=dict(want_protocol=True, want_skb=False, want_queues=True),
            fallbacks=SYSCALL_FALLBACK),
    Backend("kprobe",
            "kprobes on tcp_push and tcp_cleanup_rbuf (TCP bytes from the sockets' sequence "
            "counters; kprobe/kretprobe pairs on tcp_sendmsg and tcp_recvmsg where those "
            "are missing), kprobes on udp_send_skb, udp_v6_send_skb and skb_consume_udp, ... "
            "(kprobe PMU, else tracefs kprobe_events with unique names "
            "removed on exit; kretprobes through tracefs with a large maxactive) and the tcp "
            "tracepoints.  Linux 5.8+ with CONFIG_KPROBES.",
            programs=(
                ("kp_tcp_set_state", TCP),
                ("krp_inet_csk_accept", TCP),
                ("kp_tcp_push", TCP),  # else RETVAL_FALLBACK (tcp_sendpage: gone from 6.5)
                ("kp_tcp_cleanup_rbuf", TCP),
                ("tp_tcp_retransmit_skb{err}", TCP),
                ("tp_tcp_destroy_sock", TCP),
                ("tp_tcp_retransmit_synack", TCP),
                ("kp_udp_send_skb", UDP),
                ("kp_udp_v6_send_skb", UDP),
                ("kp_skb_consume_udp", UDP)),
            guess=("guess_udp_sendmsg", "guess_tcp_sendmsg", "guess_skb_consume_udp",
                   "guess_inet_sock_set_state", "guess_udp_send_skb", "guess_udp_v6_send_skb"),
            available=_kprobe_available,
            guess_options=dict(want_protocol=False, want_skb=True, want_queues=False,
                               want_send_skb=True, want_seqs=True),
            fallbacks=RETVAL_FALLBACK),
)
BY_NAME = collections.OrderedDict((b.name, b) for b in REGISTRY)
NAMES = tuple(BY_NAME)


def get(name):
    """The Backend called name; BackendError if there is none."""
    b = BY_NAME.get(name)
    if b is None:
        raise BackendError("unknown backend %r (use auto, %s)" % (name, " or ".join(NAMES)))
    return b


def availability():
    """{backend: (usable, why)} for this kernel."""
    if os.geteuid() != 0:
        why = "cannot tell without root (tracefs and kprobe sysfs files are root-only)"
        return collections.OrderedDict((b.name, (False, why)) for b in REGISTRY)
    return collections.OrderedDict((b.name, b.available()) for b in REGISTRY)


def choose(requested="auto"):
    """(backend name, reason): the requested one, or with auto the first
    usable one in REGISTRY's order.  Raises BackendError when it cannot run
    here."""
    if requested != "auto":
        get(requested)
    avail = availability()
    if requested != "auto":
        ok, why = avail[requested]
        if not ok:
            others = [b for b in avail if avail[b][0] and b != requested]
            hint = ("use --backend auto (%s works here)" % others[0]) if others else \
                "no backend works on this kernel; see --check"
            raise BackendError("the %s backend is not available on this kernel (%s): %s"
                               % (requested, why, hint))
        return requested, "requested; " + why
    for i, (name, (ok, why)) in enumerate(avail.items()):
        if ok:
            passed = "; ".join(w for _, w in list(avail.values())[:i])
            return name, "auto: %s%s" % (why, "; " + passed if passed else "")
    raise BackendError("no usable backend: %s" % "; ".join(w for _, w in avail.values()))


def _wanted(need, tcp, udp):
    return need == BOTH and (tcp or udp) or (need == TCP and tcp) or (need == UDP and udp)


def _raw_tracepoint_exists(name):
    try:
        events = os.path.join(bpfsys.tracefs(), "events")
        return any(os.path.isdir(os.path.join(events, cat, name)) for cat in os.listdir(events))
    except OSError:
        return False


def retransmit_variant():
    """"_err" when tcp:tcp_retransmit_skb carries err (6.13+: it then also
    fires for retransmits that failed before the kernel counted them)."""
    try:
        return "_err" if "err" in bpfsys.tracepoint_fields("tcp", "tcp_retransmit_skb") else ""
    except OSError:
        return ""


_SPEC = []


def object_spec():
    """The parsed tracer.bpf.o (elfload.ObjectSpec), parsed once."""
    if not _SPEC:
        _SPEC.append(elfload.parse_file(abi.OBJECT_PATH))
    return _SPEC[0]


def plan(backend, tcp=True, udp=True, symbols=None, version=None, err=None, spec=None):
    """[(program, kind, target)] the backend attaches on this kernel: its
    programs for TCP and/or UDP, in their variant for this kernel, kind and
    target from their section in spec (tracer.bpf.o by default), kernel
    functions resolved in /proc/kallsyms, optional ones left out where the
    kernel lacks the hook."""
    b = get(backend)
    spec = spec or object_spec()
    err = retransmit_variant() if err is None and tcp else (err or "")
    values = {"err": err}
    out = []
    programs = list(b.programs)
    if tcp and any(n in SEQ_HOOKS for n, _ in programs):
        if symbols is None:
            symbols = bpfsys.kallsyms_functions()
        if not all(bpfsys.resolve_function(spec.programs[n].target, symbols) for n in SEQ_HOOKS):
            programs = [(p, need) for p, need in programs if p not in SEQ_HOOKS] + \
                [(p, TCP) for p in RETVAL_FALLBACK]
    if any("{recv}" in p for p, need in programs if _wanted(need, tcp, udp)):
        values["recv"] = "" if (version or kernel_version()) >= (5, 19) else "_pre_5_19"
    for pattern, need in programs:
        if not _wanted(need, tcp, udp):
            continue
        optional = pattern.endswith("?")
        name = pattern.rstrip("?").format(**values)
        p = spec.programs.get(name)
        if p is None:
            raise BackendError("%s: no program %r for the %s backend" % (spec.path, name, b.name))
        target = p.target
        if p.kind in ("kprobe", "kretprobe"):
            if symbols is None:
                symbols = bpfsys.kallsyms_functions()
            real = bpfsys.resolve_function(target, symbols)
            if real is None:
                if optional:
                    continue
                raise BackendError("kernel function %s not found in /proc/kallsyms" % target)
            target = real
        elif optional and p.kind == "raw_tracepoint" and not _raw_tracepoint_exists(target):
            continue
        out.append((name, p.kind, target))
    return out


def uses_kprobes(programs):
    """Whether a plan attaches kprobes (stale ones of ours are removed first)."""
    return any(kind in ("kprobe", "kretprobe") for _, kind, _ in programs)


def attach(coll, prog, kind=None, target=None, kprobe_method="auto", cgroup=None):
    """Attach one program of coll (loaded now if it was not) to target as
    kind (by default: its section's); returns the link."""
    if kind is None:
        spec = coll.spec.programs[prog]
        kind, target = spec.kind, spec.target
    return attach_program(coll.program(prog), kind, target, kprobe_method, cgroup)


def attach_program(p, kind, target, kprobe_method="auto", cgroup=None):
    """Attach a loaded bpfsys.Program to target as kind ("kprobe",
    "kretprobe", "tracepoint" with target "category/name",
    "raw_tracepoint", or "cgroup" on the Cgroup2Root cgroup); returns the
    link."""
    if kind == "cgroup":
        return bpfsys.attach_cgroup(p, target, cgroup)
    if kind == "raw_tracepoint":
        return bpfsys.attach_raw_tracepoint(p, target)
    if kind == "tracepoint":
        category, name = target.split("/", 1)
        return bpfsys.attach_tracepoint(p, category, name)
    if kind not in ("kprobe", "kretprobe"):
        raise BackendError("cannot attach a program of kind %r" % kind)
    retprobe = kind == "kretprobe"
    # a kretprobe holds an instance per task inside the function; a task
    # that finds none free is missed (its bytes lost).  The kprobe PMU takes
    # the kernel's default (10 or 2 per CPU): tracefs can ask for more.
    maxactive = KRETPROBE_MAXACTIVE if retprobe and kprobe_method != "pmu" else 0
    return bpfsys.attach_kprobe(p, target, retprobe=retprobe, maxactive=maxactive,
                                method=kprobe_method)


def fill_tp_fields(tp_fields_map, needed_events):
    """Write each perf tracepoint field offset read from its format file."""
    formats = {}
    for slot, (cat, ev, field) in sorted(TP_FIELDS.items()):
        if (cat, ev) not in needed_events:
            continue
        if (cat, ev) not in formats:
            formats[(cat, ev)] = bpfsys.tracepoint_fields(cat, ev)
        fields = formats[(cat, ev)]
        if field not in fields:
            raise BackendError("tracepoint %s:%s has no field %r (format: %s)" % (
                cat, ev, field, ", ".join(sorted(fields))))
        tp_fields_map.update(slot.to_bytes(4, "little"), fields[field][0].to_bytes(4, "little"))


def run_guess(coll, backend, ipv6=True, kprobe_method="auto", programs=None):
    """Attach the backend's guess programs, guess, detach; returns Offsets.
    programs: the plan; the sequence counters are guessed only where it
    counts TCP bytes with them."""
    b = get(backend)
    options = dict(b.guess_options)
    if programs is not None and options.get("want_seqs"):
        options["want_seqs"] = any(p in SEQ_HOOKS for p, _, _ in programs)
    links = []
    try:
        for prog in b.guess:
            links.append(attach(coll, prog, kprobe_method=kprobe_method))
        with offsetguess.guessing_name():
            return offsetguess.guess(coll.maps, ipv6=ipv6, **options)
    finally:
        for l in links:
            l.close()


def _attach_cgroup_hooks(coll, programs, links, notes):
    """The cgroup sock_addr hooks on the cgroup2 root; where that cannot be
    done, the syscall tracepoints that do the same job (notes says why)."""
    if not programs:
        return
    first = len(links)
    try:
        root = bpfsys.Cgroup2Root()
        try:
            for prog, kind, target in programs:
                links.append(attach(coll, prog, kind, target, cgroup=root))
        finally:
            if root.refs == 0:
                root.release()
        return
    except (bpfsys.BPFError, OSError) as e:
        for l in links[first:]:
            l.close()
        del links[first:]
        notes.append("UDP message addresses from syscall tracepoints (every syscall pays while "
                     "tracing): the cgroup hooks could not be attached (%s)" % e)
    fill_tp_fields(coll.maps["tp_fields"], _perf_events(coll, SYSCALL_FALLBACK))
    for prog in SYSCALL_FALLBACK:
        links.append(attach(coll, prog))


def _perf_events(coll, names):
    """{(category, event)} of the named perf tracepoint programs."""
    return set(tuple(coll.spec.programs[n].target.split("/", 1)) for n in names)


def attach_all(coll, programs, kprobe_method="auto", notes=None):
    """Attach the planned programs; on any failure detach what was attached
    and raise.  Returns the links; notes (a list) gets what was done
    differently from the plan and why."""
    links = []
    notes = notes if notes is not None else []
    try:
        fill_tp_fields(coll.maps["tp_fields"], set(
            tuple(target.split("/", 1)) for _, kind, target in programs if kind == "tracepoint"))
        _attach_cgroup_hooks(coll, [p for p in programs if p[1] == "cgroup"], links, notes)
        for prog, kind, target in programs:
            if kind == "cgroup":
                continue
            try:
                links.append(attach(coll, prog, kind, target, kprobe_method))
            except bpfsys.BPFError as e:
                # only a kernel without raw tracepoints (EINVAL: unknown
                # command) falls back; a wrong name (ENOENT) is an error
                if kind != "raw_tracepoint" or prog not in PERF_FALLBACK or e.errno not in (
                        errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                alt = PERF_FALLBACK[prog]
                fill_tp_fields(coll.maps["tp_fields"], _perf_events(coll, [alt]))
                links.append(attach(coll, alt))
    except Exception:
        for l in links:
            l.close()
        raise
    return links
