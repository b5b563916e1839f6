"""backends.REGISTRY: one object per backend that --backend, --check, abi,
bench and README's hook table all read; each program's kind and target
come from its section in tracer.bpf.o.

No privileges needed: plans are made against a given symbol table.
"""

import os
import re

import pytest

import abi
import backends
import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYMBOLS = set(["tcp_set_state", "inet_csk_accept", "tcp_push", "tcp_cleanup_rbuf", "tcp_sendmsg",
               "tcp_recvmsg", "udp_send_skb", "udp_v6_send_skb", "skb_consume_udp"])


def _readme_rows():
    """{backend: its row of README's "Backends" hook table}"""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|[^|]*\|$", text.split("## Backends", 1)[1], re.M)
    return dict((name, hooks) for name, hooks in rows if name in backends.NAMES)


def _named(text):
    """The names in backquotes of a README cell, with {a,b} and 4/6 spelled out."""
    out = set()
    for token in re.findall(r"`([^`]+)`", text):
        token = token.split(":")[-1]
        m = re.match(r"(.*)\{([^}]*)\}(.*)$", token)
        parts = [m.group(1) + x + m.group(3) for x in m.group(2).split(",")] if m else [token]
        for part in parts:
            m = re.match(r"(\w*?)(\d)/(\d)$", part)
            out.update([m.group(1) + m.group(2), m.group(1) + m.group(3)] if m else [part])
    return out


def _targets(names):
    """The hook names (a tracepoint's event, a function, a cgroup hook) of programs."""
    spec = backends.object_spec()
    return set(spec.programs[n].target.split("/")[-1] for n in names)


def test_the_registry_lists_each_backend_once_in_auto_order():
    assert backends.NAMES == ("tracepoint", "kprobe")
    assert [b.name for b in backends.REGISTRY] == list(backends.BY_NAME)
    with pytest.raises(backends.BackendError) as info:
        backends.get("ebpf")
    assert str(info.value) == "unknown backend 'ebpf' (use auto, tracepoint or kprobe)"


@pytest.mark.parametrize("name", backends.NAMES)
def test_readme_lists_exactly_the_hooks_of_each_backend(name):
    b = backends.get(name)
    every = _targets(abi.all_programs())
    wanted = _targets(n for n in b.every_program() if n not in b.guess)
    named = _named(_readme_rows()[name]) & every
    assert sorted(wanted - named) == [], "hooks the README row of %s does not name" % name
    assert sorted(named - wanted) == [], "hooks README names that %s does not attach" % name


def test_help_describes_every_backend_and_offers_them_as_choices():
    for b in backends.REGISTRY:
        assert "\n  %-11s " % b.name in cli.DESCRIPTION
    action = next(a for a in cli.parser()._actions if a.dest == "backend")
    assert tuple(action.choices) == ("auto",) + backends.NAMES


def test_plan_takes_kind_and_target_from_the_section():
    plan = backends.plan("kprobe", symbols=SYMBOLS, version=(6, 1), err="")
    assert ("kp_tcp_push", "kprobe", "tcp_push") in plan
    assert ("kp_tcp_cleanup_rbuf", "kprobe", "tcp_cleanup_rbuf") in plan
    assert ("krp_inet_csk_accept", "kretprobe", "inet_csk_accept") in plan
    assert ("tp_tcp_retransmit_skb", "raw_tracepoint", "tcp_retransmit_skb") in plan
    assert not [p for p in plan if "sendmsg" in p[0] and "tcp" in p[0]]  # no kretprobe on TCP I/O
    old = dict((p, t) for p, _, t in backends.plan("kprobe", symbols=SYMBOLS, version=(5, 10),
                                                     err="_err"))
    assert "tp_tcp_retransmit_skb_err" in old


def test_plan_counts_return_values_where_a_sequence_hook_is_missing():
    for missing in ("tcp_push", "tcp_cleanup_rbuf"):
        plan = [p for p, _, _ in backends.plan("kprobe", symbols=SYMBOLS - {missing},
                                                version=(5, 10), err="")]
        assert "kp_tcp_push" not in plan and "kp_tcp_cleanup_rbuf" not in plan
        assert ["kp_tcp_sendmsg", "krp_tcp_sendmsg", "kp_tcp_recvmsg_pre_5_19",
                "krp_tcp_recvmsg"] == [p for p in plan if "tcp_sendmsg" in p or "tcp_recvmsg" in p]
        assert not [p for p in plan if "sendpage" in p]  # optional, absent from these symbols
    udp = backends.plan("kprobe", tcp=False, symbols=SYMBOLS, version=(6, 1), err="")
    assert udp == [("kp_udp_send_skb", "kprobe", "udp_send_skb"),
                   ("kp_udp_v6_send_skb", "kprobe", "udp_v6_send_skb"),
                   ("kp_skb_consume_udp", "kprobe", "skb_consume_udp")]


def test_a_missing_kernel_function_is_one_error():
    with pytest.raises(backends.BackendError) as info:
        backends.plan("kprobe", symbols=SYMBOLS - {"tcp_set_state"}, version=(6, 1), err="")
    assert str(info.value) == "kernel function tcp_set_state not found in /proc/kallsyms"


def test_every_program_includes_fallbacks_and_guess_programs():
    tp = backends.get("tracepoint").every_program()
    assert "tpp_sock_send_length" in tp and "tp_sys_exit_sendmsg" in tp
    assert tp[-2:] == ["guess_sock_send_length", "guess_inet_sock_set_state"]
    kp = backends.get("kprobe").every_program()
    assert "tpp_tcp_retransmit_skb" in kp and "tp_sys_exit_sendmsg" not in kp
