"""The tracepoint backend on the host kernel: exact counts for the matrix of
TCP/UDP x IPv4/IPv6 x connected/unconnected UDP x long-lived/short-lived,
200 concurrent connections, sendfile, MSG_PEEK, partial sends, the
run-time cross-check of the guessed offsets, and guessing in a fresh
network namespace."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, Collector, need_tracepoint_backend
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


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("hold", [False, True], ids=["short", "long"])
def test_tcp_bytes_pids_ports(col, family, hold):
    matrix.check_tcp(col, family, hold)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("unconnected", [False, True], ids=["connected", "unconnected"])
@pytest.mark.parametrize("hold", [False, True], ids=["short", "long"])
def test_udp_bytes_pids_ports(col, family, unconnected, hold):
    matrix.check_udp(col, family, unconnected, hold)


def test_short_lived_connection_reported_once_as_closed(col):
    cli, srv = matrix.check_tcp(col, 4, hold=False)
    later = col.poll()
    assert [c for c in later if c.key in (cli.key, srv.key)] == []
    assert cli.sent_delta == 3007 and srv.recv_delta == 3007


def test_200_concurrent_connections(col):
    assert matrix.check_many(col, 200) == 200


def test_msg_peek_not_counted(col):
    matrix.check_peek_not_counted(col)


def test_sendfile_counts_bytes(col, tmp_path):
    matrix.check_sendfile(col, tmp_path)


def test_partial_send_counts_what_the_kernel_accepted(col):
    matrix.check_partial_send_counts_accepted(col)


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


NETNS_RUN = textwrap.dedent("""
    import json, os, socket, subprocess, sys, time
    sys.path[:0] = [%(root)r, %(root)r + "/test"]
    subprocess.check_call(["ip", "link", "set", "lo", "up"])
    import tracer
    from conftest import Collector
    import matrix
    t = tracer.Tracer(backend="tracepoint")
    col = Collector(t)
    cli, srv = matrix.check_tcp(col, 4, hold=False)
    print(json.dumps({"netns": cli.netns, "mine": os.stat("/proc/self/ns/net").st_ino,
                      "offsets": t.offsets.as_dict()}))
    t.close()
""")


def test_guessing_and_counting_inside_a_fresh_network_namespace(tracer_tp):
    if subprocess.call(["which", "unshare"], stdout=subprocess.DEVNULL) != 0:
        pytest.skip("unshare (util-linux) not installed")
    out = subprocess.check_output(["unshare", "--net", sys.executable, "-c",
                                   NETNS_RUN % {"root": ROOT}], universal_newlines=True)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["netns"] == got["mine"] != os.stat("/proc/self/ns/net").st_ino
    assert got["offsets"] == tracer_tp.offsets.as_dict()
