"""The kprobe backend, run inside Debian kernels under qemu (make vm-test):
kprobes and kretprobes through the kprobe PMU and through tracefs
kprobe_events, cleanup of kprobe_events on every exit path, and the same
exact-count matrix as the tracepoint backend.  On a kernel without kprobes
(the host) every test here skips, saying so."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Collector, need_kprobes, need_root
import matrix
from traffic import Pair

pytestmark = pytest.mark.kprobe


def _need():
    need_root()
    need_kprobes()


@pytest.fixture(scope="module")
def tracer_kp():
    _need()
    import tracer
    t = tracer.Tracer(backend="kprobe")
    yield t
    t.close()


@pytest.fixture
def col(tracer_kp):
    c = Collector(tracer_kp)
    c.poll()
    return c


def _connect_n(n):
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(n)
    for _ in range(n):
        c = socket.create_connection(lst.getsockname())
        lst.accept()[0].close()
        c.close()
    lst.close()


@pytest.mark.parametrize("method", ["pmu", "tracefs"])
def test_tcp_v4_connect_kprobe_and_kretprobe_count_connections(method):
    _need()
    import bpfsys
    import elfload
    if method == "pmu" and bpfsys.kprobe_pmu() is None:
        pytest.skip("no kprobe PMU on %s" % os.uname()[2])
    if method == "tracefs" and bpfsys.kprobe_events_path() is None:
        pytest.skip("no tracefs kprobe_events on %s" % os.uname()[2])
    spec = elfload.parse_file(os.path.join(ROOT, "test", "selftest.bpf.o"))
    with spec.load(["test_tcp_v4_connect", "test_tcp_v4_connect_ret"]) as coll:
        entry = bpfsys.attach_kprobe(coll.programs["test_tcp_v4_connect"], "tcp_v4_connect",
                                     method=method)
        ret = bpfsys.attach_kprobe(coll.programs["test_tcp_v4_connect_ret"], "tcp_v4_connect",
                                   retprobe=True, method=method)
        try:
            assert len(bpfsys.our_kprobe_events()) == (2 if method == "tracefs" else 0)
            _connect_n(7)
            counts = coll.maps["test_counts"]
            got = [int.from_bytes(counts.lookup(i.to_bytes(4, "little")), "little") for i in (0, 1)]
            assert got == [7, 7]
        finally:
            entry.close()
            ret.close()
    assert bpfsys.our_kprobe_events() == []


TRACER_CMD = [sys.executable, os.path.join(ROOT, "tracer.py"), "--backend", "kprobe",
              "--kprobe-method", "tracefs", "--json", "--interval", "0.5"]


def _start_tracer_and_wait_for_probes():
    import bpfsys
    p = subprocess.Popen(TRACER_CMD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    line = p.stdout.readline()  # first interval's records: probes are in place
    assert line, p.stderr.read()
    assert bpfsys.our_kprobe_events(), "the tracer added no kprobe_events entries"
    return p


def test_no_kprobe_events_left_after_normal_exit():
    _need()
    import bpfsys
    out = subprocess.check_output(TRACER_CMD + ["--count", "1"], universal_newlines=True)
    assert '"type": "telemetry"' in out
    assert bpfsys.our_kprobe_events() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_no_kprobe_events_left_after_signal(sig):
    _need()
    import bpfsys
    p = _start_tracer_and_wait_for_probes()
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert bpfsys.our_kprobe_events() == []


def test_kprobe_events_of_a_killed_tracer_removed_by_the_next_start():
    _need()
    import bpfsys
    p = _start_tracer_and_wait_for_probes()
    p.kill()
    p.wait()
    left = bpfsys.our_kprobe_events()
    assert left and all("tracer_bpf_%d" % p.pid in l for l in left)
    out = subprocess.check_output(TRACER_CMD + ["--count", "1"], universal_newlines=True)
    assert bpfsys.our_kprobe_events() == []


# the shared matrix (test/matrix.py), run here against this module's `col`
from matrix import (test_tcp_bytes_pids_ports, test_udp_bytes_pids_ports,  # noqa: F401,E402
                    test_short_lived_connection_reported_once_as_closed,
                    test_200_concurrent_connections, test_msg_peek_not_counted,
                    test_sendfile_counts_bytes, test_partial_send_counts_what_the_kernel_accepted,
                    test_lifetimes_start_time_and_duration,
                    test_a_connection_opened_before_the_tracer_has_no_start,
                    test_blocking_read_returning_in_pieces_then_the_fin,
                    test_counts_are_exact_while_the_connection_is_open_and_idle)


def test_guessed_offsets_reported(tracer_kp):
    o = tracer_kp.offsets
    assert o.values["ready"] == 1 and o.ipv6
    assert (o.values["daddr"], o.values["saddr"], o.values["dport"], o.values["sport"],
            o.values["family"]) == (0, 4, 12, 14, 16)
    print("kernel %s offsets %s in %.4f s" % (os.uname()[2], o.as_dict(), o.seconds))


def test_guessing_and_counting_inside_a_fresh_network_namespace(tracer_kp):
    matrix.check_fresh_netns("kprobe", tracer_kp.offsets.as_dict())


def test_both_backends_agree_on_the_same_traffic(tracer_kp):
    import backends
    import tracer
    ok, why = backends.availability()["tracepoint"]
    if not ok:
        pytest.skip("tracepoint backend unavailable on %s: %s" % (os.uname()[2], why))
    with tracer.Tracer(backend="tracepoint") as tp:
        kcol, tcol = Collector(tracer_kp), Collector(tp)
        kcol.poll()
        tcol.poll()
        pairs = [Pair("tcp", 4, send=[1111, 2222], reply=[3333]).run(),
                 Pair("tcp", 6, send=[4444], reply=[555]).run(),
                 Pair("udp", 4, send=[66, 77], reply=[88]).run(),
                 Pair("udp", 6, send=[99], reply=[11], unconnected=True).run()]
        pids = set(p.client_pid for p in pairs) | set(p.server_pid for p in pairs)
        for p in pairs:
            kcol.one(pid=p.client_pid, lport=p.client_port)
            tcol.one(pid=p.client_pid, lport=p.client_port)
            kcol.one(pid=p.server_pid, lport=p.server_port)
            tcol.one(pid=p.server_pid, lport=p.server_port)
        mine = lambda col: [c for c in col.latest.values() if c.pid in pids]
        a, b = matrix.agree(mine(kcol), mine(tcol))
        assert len(a) == 8
        assert a == b


# how connections end (test/endings.py), run here against this module's `col`
# (retransmits: the guests load no nf_tables module, so their losses come
# from a socket filter; the nftables variant skips there, saying so)
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
                     test_conn_lost_counts_each_side_the_full_table_could_not_hold,
                     test_retransmits_equal_tcpi_total_retrans_under_random_loss,
                     test_short_connections_are_reported_once_closed_with_all_bytes)


# UDP sends (test/udpsends.py), run here against this module's `col`
from udpsends import (test_udp_sendto_several_peers_from_one_unconnected_socket,  # noqa: F401,E402
                      test_udp_several_calls_one_datagram, test_udp_sends_that_fail,
                      test_udp_socket_shared_after_fork_one_record_per_sender)


def test_churn_of_mixed_endings_every_side_exact(col):
    """150 connection lives of mixed endings (Python runs 10-20x slower in
    the guest): every side exactly one record (test/churn.py)."""
    import churn
    churn.check(col, n=150, clients=2, servers=1)


# --- events, failures and RTT (issue 12): the host's cases, kprobe backend ---

@pytest.mark.parametrize("case", ["exact_sequence_of_a_connection",
                                  "short_connections_within_one_poll", "refused_connect",
                                  "resets_both_ways", "timeout_and_unreachable",
                                  "another_tracer_starting", "burst_of_connections", "udp_open_and_expire",
                                  "rtt_matches_tcp_info", "rtt_with_netem_delay"])
def test_events(case):
    _need()
    import eventcases
    getattr(eventcases, case)("kprobe")


# system calls, flags and topologies (test/adversarial.py), run here against this module's `col`
from adversarial import *  # noqa: F401,F403,E402  (its __all__: every test_ of it)
