"""The tracepoint backend on the host kernel: exact counts for the matrix of
TCP/UDP x IPv4/IPv6 x connected/unconnected UDP x long-lived/short-lived,
200 concurrent connections, sendfile, MSG_PEEK, partial sends, the
run-time cross-check of the guessed offsets, and guessing in a fresh
network namespace."""

import os

import pytest

from conftest import Collector, need_tracepoint_backend
import matrix


@pytest.fixture(scope="module")
def tracer_tp():
    need_tracepoint_backend()
    import tracer
    t = tracer.Tracer(backend="tracepoint")
    yield t
    t.close()


@pytest.fixture
def col(tracer_tp):
    c = Collector(tracer_tp)
    c.poll()  # start from a clean interval
    return c


# the shared matrix (test/matrix.py), run here against this module's `col`
from matrix import (test_tcp_bytes_pids_ports, test_udp_bytes_pids_ports,  # noqa: F401,E402
                    test_short_lived_connection_reported_once_as_closed,
                    test_200_concurrent_connections, test_msg_peek_not_counted,
                    test_sendfile_counts_bytes, test_partial_send_counts_what_the_kernel_accepted,
                    test_lifetimes_start_time_and_duration,
                    test_a_connection_opened_before_the_tracer_has_no_start,
                    test_blocking_read_returning_in_pieces_then_the_fin,
                    test_counts_are_exact_while_the_connection_is_open_and_idle)


def test_cross_check_of_guessed_offsets(col, tracer_tp):
    matrix.check_tcp(col, 4, hold=False)
    tel = tracer_tp.telemetry()
    assert tel["tuple_checked"] >= 2
    assert tel["tuple_mismatch"] == 0
    assert tel["lost"] == 0


def test_guessed_offsets_reported(tracer_tp):
    o = tracer_tp.offsets
    assert o.values["ready"] == 1 and o.ipv6
    # struct sock_common has kept these since 4.x on x86-64
    assert (o.values["daddr"], o.values["saddr"], o.values["dport"], o.values["sport"],
            o.values["family"]) == (0, 4, 12, 14, 16)
    assert 0 < o.seconds < 5


def test_guessing_and_counting_inside_a_fresh_network_namespace(tracer_tp):
    matrix.check_fresh_netns("tracepoint", tracer_tp.offsets.as_dict())


def test_full_map_loss_is_counted_not_silent():
    need_tracepoint_backend()
    import socket
    import tracer
    with tracer.Tracer(backend="tracepoint", tcp=False, max_conns=8) as t:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        for i in range(12):  # 12 flows: one per destination port
            s.sendto(b"d" * (i + 1), ("127.0.0.1", 20000 + i))
        mine = [c for c in t.poll() if c.pid == os.getpid()]
        tel = t.telemetry()
        # 8 flows in conns, and the socket's first flow in its own socks entry
        assert len(mine) <= tel["tracked"] <= 8 + 1
        # every flow is either in the table or counted lost (other processes'
        # flows, on a busy machine, can only add to the losses)
        assert len(mine) + tel["udp_lost"] >= 12
        assert tel["lost"] >= tel["udp_lost"] >= 12 - 8 - 1
        # the datagrams of the flows not stored are counted in bytes too
        stored = set(c.rport - 20000 for c in mine)
        assert tel["bytes_lost"] >= sum(i + 1 for i in range(12) if i not in stored)
        s.close()


RETRANSMIT_RUN = r"""
import json, socket, struct, subprocess, sys, time
sys.path[:0] = [%(root)r]
subprocess.check_call(["ip", "link", "set", "lo", "up"])
import tracer
t = tracer.Tracer(backend="tracepoint", udp=False)
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
port = lst.getsockname()[1]
cli = socket.create_connection(("127.0.0.1", port)); srv, _ = lst.accept()
nft = lambda cmd: subprocess.check_call(["nft", cmd])
nft("add table inet rtx")
# dropped on input, so every (re)transmission itself succeeds
nft("add chain inet rtx inp { type filter hook input priority 0 ; }")
nft("add rule inet rtx inp tcp dport %%d tcp flags & psh == psh drop" %% port)
cli.send(b"r" * 1000)
time.sleep(0.7)  # the data is dropped: RTO (200 ms, then backed off) retransmits it
nft("delete table inet rtx")
got = 0
while got < 1000: got += len(srv.recv(65536))
info = cli.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
total_retrans = struct.unpack_from("<I", info, 100)[0]  # struct tcp_info.tcpi_total_retrans
rec = [c for c in t.poll() if c.lport == cli.getsockname()[1]]
print(json.dumps({"kernel": total_retrans, "traced": [(c.retransmits, c.sent_bytes) for c in rec]}))
t.close()
"""


def test_retransmits_counted_as_the_kernel_counts_them():
    need_tracepoint_backend()
    import shutil
    import subprocess
    import sys
    from conftest import ROOT
    if not shutil.which("nft") or not shutil.which("unshare"):
        pytest.skip("nft (nftables) or unshare missing: cannot drop packets in a private netns")
    out = subprocess.check_output(["unshare", "--net", sys.executable, "-c",
                                   RETRANSMIT_RUN % {"root": ROOT}], universal_newlines=True)
    got = __import__("json").loads(out.strip().splitlines()[-1])
    assert got["kernel"] >= 1
    assert got["traced"] == [[got["kernel"], 1000]]


def test_idle_udp_flows_expire():
    need_tracepoint_backend()
    import socket
    import time
    import tracer
    with tracer.Tracer(backend="tracepoint", tcp=False, udp_idle=0.4) as t:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"e" * 42, ("127.0.0.1", 9))
        first = [c for c in t.poll() if c.lport == s.getsockname()[1]]
        assert [(c.sent_bytes, c.pid) for c in first] == [(42, os.getpid())]
        key = first[0]._raw  # the map key
        time.sleep(0.5)
        t.poll()  # past udp_idle: the entry goes
        assert t._coll.maps["conns"].lookup(key) is None
        # (the socket's first flow lives in its socks entry: gone too)
        assert not [v for _, v in t._coll.maps["socks"].items() if v[:len(key)] == key]
        assert t.telemetry()["expired"] >= 1
        s.sendto(b"e" * 8, ("127.0.0.1", 9))  # the flow comes back as a new entry
        again = [c for c in t.poll() if c.lport == s.getsockname()[1]]
        assert [(c.sent_bytes, c.sent_delta, c.first_seen) for c in again] == [(8, 8, True)]
        s.close()


def test_polls_between_full_reads_read_only_what_changed():
    need_tracepoint_backend()
    import tracer
    # idle limits of 10 minutes: a full table read every 150 s, none in this test
    with tracer.Tracer(backend="tracepoint", udp_idle=600) as t:
        col = Collector(t)
        col.poll()
        col.poll()
        assert t._table.last_poll_full is False  # the dirty set, not a table read
        cli, srv = matrix.check_tcp(col, 4, hold=True)
        assert t._table.last_poll_full is False
        assert (cli.sent_bytes, srv.recv_bytes) == (3007, 3007)


def test_udp_message_addresses_come_from_cgroup_hooks_not_syscall_tracepoints():
    """No syscalls: tracepoint is attached (they would tax every syscall of
    every task); the unconnected UDP peers are still exact."""
    need_tracepoint_backend()
    import tracer
    with tracer.Tracer(backend="tracepoint") as t:
        kinds = sorted(set(l.what.split(" ")[0] for l in t._links if hasattr(l, "what")))
        assert t.attach_notes == []
        assert not [l for l in t._links if "syscalls" in getattr(l, "what", "")], kinds
        assert len([l for l in t._links if getattr(l, "what", "").startswith("cgroup/")]) == 4
        # the fallbacks were not even loaded (their verification costs startup)
        assert [n for n in t._coll.programs if n.startswith(("tp_sys_", "tpp_"))] == []
        col = Collector(t)
        col.poll()
        matrix.check_udp(col, 4, unconnected=True, hold=False)
        matrix.check_udp(col, 6, unconnected=True, hold=False)
    assert not [d for d in os.listdir("/run") if d.startswith("tracer-bpf-cgroup2")]


def test_a_private_cgroup2_mount_is_gone_while_tracing(monkeypatch):
    """Where no cgroup2 hierarchy is mounted, the tracer mounts one only to
    open its root and detaches it at once: nothing stays mounted, even if
    the tracer is killed."""
    need_tracepoint_backend()
    import bpfsys
    import tracer
    monkeypatch.setattr(bpfsys, "_cgroup2_mount", lambda: None)
    with tracer.Tracer(backend="tracepoint") as t:
        assert t.attach_notes == []
        with open("/proc/self/mountinfo") as f:
            assert "tracer-bpf" not in f.read()
        assert not [d for d in os.listdir("/run") if d.startswith("tracer-bpf-cgroup2")]
        col = Collector(t)
        col.poll()
        matrix.check_udp(col, 6, unconnected=True, hold=False)


def test_without_cgroup2_the_syscall_tracepoints_give_the_udp_peers(monkeypatch):
    need_tracepoint_backend()
    import bpfsys
    import errno
    import tracer

    def no_cgroup2():
        raise OSError(errno.EPERM, "cgroup2 refused (test)")
    monkeypatch.setattr(bpfsys, "Cgroup2Root", no_cgroup2)
    with tracer.Tracer(backend="tracepoint") as t:
        assert len(t.attach_notes) == 1 and "cgroup2 refused (test)" in t.attach_notes[0]
        assert len([l for l in t._links if "syscalls" in getattr(l, "what", "")]) == 8
        col = Collector(t)
        col.poll()
        matrix.check_udp(col, 4, unconnected=True, hold=False)
        matrix.check_udp(col, 6, unconnected=True, hold=False)
        # a sendto with an address on a socket that is not UDP leaves no
        # per-thread entry behind (it would take a UDP flow's peer later)
        import socket
        import struct
        import threading
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

        def unix_sendto():
            try:
                a.sendto(b"x", "/nonexistent-tracer-test")
            except OSError:
                pass
            a.send(b"y")
        ths = [threading.Thread(target=unix_sendto) for _ in range(20)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        # (the kernel clears a thread's entry in place once taken: none may
        # still hold a peer, a user address or a socket; struct stash)
        # (this process's threads: others on the machine may be inside a call)
        live = [v for k, v in t._coll.maps["stash"].items()
                if struct.unpack("<Q", k)[0] >> 32 == os.getpid() and
                (v[0:8] != bytes(8) or v[16:24] != bytes(8) or v[64] != 0)]
        assert live == []
        a.close()
        b.close()


def _kernel_entries(t):
    """(pid, proto, lport, rport) of every record the kernel holds."""
    import abi
    import conntrack
    out = []
    for k, v in t._coll.maps["socks"].items():
        tup = conntrack.decode_tuple(abi.SOCK_INFO.unpack(v).tuple)
        out.append((tup[2], tup[0], tup[4], tup[6]))
    for k, v in t._coll.maps["conns"].items():
        tup = conntrack.decode_tuple(k)
        out.append((tup[2], tup[0], tup[4], tup[6]))
    return out


def _tcp_exchange(lst, sent, replied):
    import socket
    c = socket.create_connection(lst.getsockname()[:2])
    s, _ = lst.accept()
    c.sendall(b"q" * sent)
    got = 0
    while got < sent:
        got += len(s.recv(65536))
    s.sendall(b"a" * replied)
    got = 0
    while got < replied:
        got += len(c.recv(65536))
    lport = c.getsockname()[1]
    c.close()
    s.close()
    return lport


@pytest.mark.parametrize("how", ["pid", "port", "udp_only", "v6_only"])
def test_filters_are_applied_in_the_kernel(how):
    """Filtered-out traffic creates no kernel entry; what passes is exact."""
    need_tracepoint_backend()
    import socket
    import time
    import tracer
    from traffic import Pair
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    port = lst.getsockname()[1]
    args = {"pid": {"pid": os.getpid()}, "port": {"port": port},
            "udp_only": {"tcp": False}, "v6_only": {"ipv4": False}}[how]
    with tracer.Tracer(backend="tracepoint", **args) as t:
        col = Collector(t)
        col.poll()
        mine = _tcp_exchange(lst, 700, 300)
        tcp4 = Pair("tcp", 4, send=[321], reply=[12]).run()
        tcp6 = Pair("tcp", 6, send=[1234], reply=[55]).run()
        udp4 = Pair("udp", 4, send=[77], reply=[88]).run()
        time.sleep(0.2)
        got = col.poll()
        entries = _kernel_entries(t)
        if how == "pid":
            assert set(e[0] for e in entries) <= {0, os.getpid()}, entries
            assert [c for c in got if c.pid != os.getpid()] == []
            col.one(lport=mine, sent_bytes=700, recv_bytes=300, state="closed")
        elif how == "port":
            assert all(port in (e[2], e[3]) for e in entries), entries
            assert [c for c in got if port not in (c.lport, c.rport)] == []
            col.one(lport=mine, sent_bytes=700, recv_bytes=300, state="closed")
            col.one(lport=port, rport=mine, sent_bytes=300, recv_bytes=700, state="closed")
        elif how == "udp_only":
            assert all(e[1] == "udp" for e in entries), entries
            assert [c for c in got if c.proto == "tcp"] == []
            col.one(pid=udp4.client_pid, lport=udp4.client_port, sent_bytes=77, recv_bytes=88)
        else:
            assert [c for c in got if c.family == 4] == []
            col.one(pid=tcp6.client_pid, lport=tcp6.client_port, sent_bytes=1234, recv_bytes=55)
        assert tcp4.client_pid  # it ran, and (but for udp_only and port) left no entry
        assert t.telemetry()["bytes_lost"] == 0
    lst.close()


# how connections end (test/endings.py), run here against this module's `col`
from endings import (test_half_close_client_reads_the_reply_to_eof,  # noqa: F401,E402
                     test_half_closed_connection_stays_open_until_tcp_close,
                     test_both_sides_half_close_then_read_to_eof, test_reset_with_unread_data,
                     test_reset_during_a_blocking_send,
                     test_tuple_reused_within_one_interval_is_two_records,
                     test_one_socket_two_lives_through_connect_af_unspec,
                     test_socket_shared_after_fork_one_record_per_process,
                     test_socket_shared_by_many_processes_all_records_close,
                     test_last_holders_of_shared_sockets_that_never_did_io_have_no_record,
                     test_owner_exits_without_closing, test_udp_peer_of_every_datagram_is_its_own,
                     test_udp_server_has_one_record_per_client,
                     test_udp_socket_reconnected_shared_and_replaced,
                     test_comm_is_the_process_name_not_the_threads,
                     test_retransmits_equal_tcpi_total_retrans_under_random_loss,
                     test_conn_lost_counts_each_side_the_full_table_could_not_hold,
                     test_short_connections_are_reported_once_closed_with_all_bytes)


# UDP sends (test/udpsends.py), run here against this module's `col`
from udpsends import (test_udp_sendto_several_peers_from_one_unconnected_socket,  # noqa: F401,E402
                      test_udp_several_calls_one_datagram, test_udp_sends_that_fail,
                      test_udp_socket_shared_after_fork_one_record_per_sender)


def test_churn_of_mixed_endings_every_side_exact(col):
    """10000 connection lives (normal close, half-close, resets with unread
    data, tuple reuse; v4 and v6) from 4 client processes to 2 servers,
    polled every 0.5 s: every side exactly one record (test/churn.py)."""
    import churn
    churn.check(col, n=10000, clients=4, servers=2)


# system calls, flags and topologies (test/adversarial.py), run here against this module's `col`
from adversarial import *  # noqa: F401,F403,E402  (its __all__: every test_ of it)
