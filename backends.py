"""backends: which programs of tracer.bpf.o run where, and how they attach.

Two backends share the object's maps and produce the same records:
  kprobe      kprobes/kretprobes on the TCP/UDP functions (any kernel with
              CONFIG_KPROBES; the seed's method);
  tracepoint  stable tracepoints only (sock:inet_sock_set_state,
              sock:sock_send_length/sock_recv_length, tcp:tcp_retransmit_skb,
              syscalls:sys_{enter,exit}_{sendto,sendmsg,recvfrom,recvmsg}),
              raw where the kernel can; for kernels built without kprobes.
`auto` picks tracepoint when the kernel has the sock length tracepoints
(6.3+): one cheap raw-tracepoint program per send and receive, no
kretprobe that can be missed; else kprobe.  choose() says which and why.
"""

import errno
import os

import abi
import bpfsys
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
    abi.TPF_SYSEXIT_RET: ("syscalls", "sys_exit_recvfrom", "ret"),
    abi.TPF_SSL_SK: ("sock", "sock_send_length", "sk"),
    abi.TPF_SSL_RET: ("sock", "sock_send_length", "ret"),
    abi.TPF_SSL_FLAGS: ("sock", "sock_send_length", "flags"),
    abi.TPF_RETRANS_SKADDR: ("tcp", "tcp_retransmit_skb", "skaddr"),
    abi.TPF_RETRANS_SKBADDR: ("tcp", "tcp_retransmit_skb", "skbaddr"),
    abi.TPF_ISS_OLDSTATE: ("sock", "inet_sock_set_state", "oldstate"),
}

# (program, attach kind, target, needed for: "tcp", "udp" or "both")
TRACEPOINT_PROGRAMS = (
    ("tp_inet_sock_set_state", "tracepoint", "sock/inet_sock_set_state", "tcp"),
    ("tp_sock_send_length", "raw_tracepoint", "sock_send_length", "both"),
    ("tp_sock_recv_length", "raw_tracepoint", "sock_recv_length", "both"),
    ("tp_tcp_retransmit_skb{err}", "raw_tracepoint", "tcp_retransmit_skb", "tcp"),
    ("tp_tcp_destroy_sock", "raw_tracepoint", "tcp_destroy_sock", "tcp"),
    ("tp_tcp_retransmit_synack", "raw_tracepoint", "tcp_retransmit_synack", "tcp"),
    ("tp_sk_data_ready?", "raw_tracepoint", "sk_data_ready", "udp"),
    ("cg_sendmsg4", "cgroup", "sendmsg4", "udp"),
    ("cg_sendmsg6", "cgroup", "sendmsg6", "udp"),
    ("cg_recvmsg4", "cgroup", "recvmsg4", "udp"),
    ("cg_recvmsg6", "cgroup", "recvmsg6", "udp"),
)
# Where the cgroup hooks cannot be attached (no cgroup2, before 5.7): the
# message addresses from syscall tracepoints instead, which put every
# syscall of every task on the traced slow path while attached.
SYSCALL_FALLBACK = (
    ("tp_sys_enter_sendto", "tracepoint", "syscalls/sys_enter_sendto"),
    ("tp_sys_enter_sendmsg", "tracepoint", "syscalls/sys_enter_sendmsg"),
    ("tp_sys_enter_recvfrom", "tracepoint", "syscalls/sys_enter_recvfrom"),
    ("tp_sys_enter_recvmsg", "tracepoint", "syscalls/sys_enter_recvmsg"),
    ("tp_sys_exit_recvfrom", "tracepoint", "syscalls/sys_exit_recvfrom"),
    ("tp_sys_exit_recvmsg", "tracepoint", "syscalls/sys_exit_recvmsg"),
    ("tp_sys_exit_sendto", "tracepoint", "syscalls/sys_exit_sendto"),
    ("tp_sys_exit_sendmsg", "tracepoint", "syscalls/sys_exit_sendmsg"),
)
# perf-tracepoint stand-ins for raw tracepoints
PERF_FALLBACK = {
    "tp_sock_send_length": ("tpp_sock_send_length", "sock/sock_send_length"),
    "tp_sock_recv_length": ("tpp_sock_recv_length", "sock/sock_recv_length"),
    "tp_tcp_retransmit_skb": ("tpp_tcp_retransmit_skb", "tcp/tcp_retransmit_skb"),
}

# (program, kind, function, needed for); "{recv}" picks the 5.19 variant
KPROBE_PROGRAMS = (
    ("kp_tcp_set_state", "kprobe", "tcp_set_state", "tcp"),
    ("krp_inet_csk_accept", "kretprobe", "inet_csk_accept", "tcp"),
    ("kp_tcp_sendmsg", "kprobe", "tcp_sendmsg", "tcp"),
    ("krp_tcp_sendmsg", "kretprobe", "tcp_sendmsg", "tcp"),
    ("kp_tcp_sendpage", "kprobe", "tcp_sendpage?", "tcp"),
    ("krp_tcp_sendpage", "kretprobe", "tcp_sendpage?", "tcp"),
    ("kp_tcp_recvmsg{recv}", "kprobe", "tcp_recvmsg", "tcp"),
    ("krp_tcp_recvmsg", "kretprobe", "tcp_recvmsg", "tcp"),
    ("tp_tcp_retransmit_skb{err}", "raw_tracepoint", "tcp_retransmit_skb", "tcp"),
    ("tp_tcp_destroy_sock", "raw_tracepoint", "tcp_destroy_sock", "tcp"),
    ("tp_tcp_retransmit_synack", "raw_tracepoint", "tcp_retransmit_synack", "tcp"),
    ("kp_udp_sendmsg", "kprobe", "udp_sendmsg", "udp"),
    ("krp_udp_sendmsg", "kretprobe", "udp_sendmsg", "udp"),
    ("kp_udpv6_sendmsg", "kprobe", "udpv6_sendmsg", "udp"),
    ("krp_udpv6_sendmsg", "kretprobe", "udpv6_sendmsg", "udp"),
    ("kp_skb_consume_udp", "kprobe", "skb_consume_udp", "udp"),
)

GUESS_PROGRAMS = {
    "tracepoint": (("guess_sock_send_length", "raw_tracepoint", "sock_send_length"),
                   ("guess_inet_sock_set_state", "raw_tracepoint", "inet_sock_set_state")),
    "kprobe": (("guess_udp_sendmsg", "kprobe", "udp_sendmsg"),
               ("guess_tcp_sendmsg", "kprobe", "tcp_sendmsg"),
               ("guess_skb_consume_udp", "kprobe", "skb_consume_udp"),
               ("guess_inet_sock_set_state", "raw_tracepoint", "inet_sock_set_state")),
}


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


def has_kprobes():
    return bpfsys.kprobe_pmu() is not None or bpfsys.kprobe_events_path() is not None


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


def availability():
    """{backend: (usable, why)} for this kernel."""
    if os.geteuid() != 0:
        why = "cannot tell without root (tracefs and kprobe sysfs files are root-only)"
        return {"tracepoint": (False, why), "kprobe": (False, why)}
    kp = has_kprobes()
    try:
        tp = has_sock_tracepoints()
        tp_why = ("sock:sock_send_length, sock:sock_recv_length and sock:inet_sock_set_state present"
                  if tp else "sock:sock_send_length/sock_recv_length tracepoints missing (kernel < 6.3)")
    except OSError as e:
        tp, tp_why = False, str(e)
    kp_why = ("kprobe PMU present" if bpfsys.kprobe_pmu() else "tracefs kprobe_events present") if kp \
        else "kernel built without kprobes (no kprobe PMU, no kprobe_events)"
    return {"tracepoint": (tp, tp_why), "kprobe": (kp, kp_why)}


def choose(requested="auto"):
    """(backend, reason).  Raises BackendError when it cannot run here."""
    avail = availability()
    if requested in ("kprobe", "tracepoint"):
        ok, why = avail[requested]
        if not ok:
            others = [b for b in sorted(avail) if avail[b][0] and b != requested]
            hint = ("use --backend auto (%s works here)" % others[0]) if others else \
                "no backend works on this kernel; see --check"
            raise BackendError("the %s backend is not available on this kernel (%s): %s"
                               % (requested, why, hint))
        return requested, "requested; " + why
    if requested != "auto":
        raise BackendError("unknown backend %r (use auto, kprobe or tracepoint)" % requested)
    if avail["tracepoint"][0]:
        return "tracepoint", "auto: stable tracepoints present (%s)" % avail["tracepoint"][1]
    if avail["kprobe"][0]:
        return "kprobe", "auto: %s; %s" % (avail["kprobe"][1], avail["tracepoint"][1])
    raise BackendError("no usable backend: %s; %s" % (avail["kprobe"][1], avail["tracepoint"][1]))


def _wanted(need, tcp, udp):
    return need == "both" and (tcp or udp) or (need == "tcp" and tcp) or (need == "udp" and udp)


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


def plan(backend, tcp=True, udp=True, symbols=None, version=None, err=None):
    """[(program, kind, target)] the backend attaches on this kernel."""
    out = []
    err = retransmit_variant() if err is None and tcp else (err or "")
    if backend == "tracepoint":
        for prog, kind, target, need in TRACEPOINT_PROGRAMS:
            if not _wanted(need, tcp, udp):
                continue
            if prog.endswith("?"):  # optional: only where the kernel has it
                prog = prog[:-1]
                if not _raw_tracepoint_exists(target):
                    continue
            out.append((prog.format(err=err), kind, target))
        return out
    version = version or kernel_version()
    recv = "" if version >= (5, 19) else "_pre_5_19"
    symbols = symbols if symbols is not None else bpfsys.kallsyms_functions()
    for prog, kind, func, need in KPROBE_PROGRAMS:
        if not _wanted(need, tcp, udp):
            continue
        if kind == "raw_tracepoint":
            out.append((prog.format(err=err), kind, func))
            continue
        optional = func.endswith("?")
        func = func.rstrip("?")
        real = bpfsys.resolve_function(func, symbols)
        if real is None:
            if optional:
                continue  # e.g. tcp_sendpage is gone from 6.5
            raise BackendError("kernel function %s not found in /proc/kallsyms" % func)
        out.append((prog.format(recv=recv), kind, real))
    return out


def attach(coll, prog, kind, target, kprobe_method="auto", cgroup=None):
    """Attach one program (loaded now if it was not); returns the link."""
    p = coll.program(prog)
    if kind == "cgroup":
        return bpfsys.attach_cgroup(p, target, cgroup)
    if kind == "raw_tracepoint":
        return bpfsys.attach_raw_tracepoint(p, target)
    if kind == "tracepoint":
        category, name = target.split("/", 1)
        return bpfsys.attach_tracepoint(p, category, name)
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


def run_guess(coll, backend, ipv6=True, kprobe_method="auto"):
    """Attach the backend's guess programs, guess, detach; returns Offsets."""
    links = []
    try:
        for prog, kind, target in GUESS_PROGRAMS[backend]:
            links.append(attach(coll, prog, kind, target, kprobe_method))
        return offsetguess.guess(coll.maps, want_protocol=(backend == "tracepoint"), ipv6=ipv6,
                                 want_skb=(backend == "kprobe"),
                                 want_queues=(backend == "tracepoint"))
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
    fill_tp_fields(coll.maps["tp_fields"], set(tuple(t.split("/", 1)) for _, _, t in SYSCALL_FALLBACK))
    for prog, kind, target in SYSCALL_FALLBACK:
        links.append(attach(coll, prog, kind, target))


def attach_all(coll, backend, programs, kprobe_method="auto", notes=None):
    """Attach the planned programs; on any failure detach what was attached
    and raise.  Returns the links; notes (a list) gets what was done
    differently from the plan and why."""
    links = []
    notes = notes if notes is not None else []
    try:
        if backend == "tracepoint":
            events = set()
            for prog, kind, target in programs:
                if kind == "tracepoint":
                    events.add(tuple(target.split("/", 1)))
            events |= set((c, e) for p, (alt, t) in PERF_FALLBACK.items() for c, e in [t.split("/")])
            fill_tp_fields(coll.maps["tp_fields"], events)
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
                alt, target = PERF_FALLBACK[prog]
                links.append(attach(coll, alt, "tracepoint", target))
    except Exception:
        for l in links:
            l.close()
        raise
    return links
