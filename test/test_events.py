"""Connection events, failures and RTT (issue 12) on the host's
tracepoint backend; the same cases run on the kprobe backend in the
guests (test_kprobe.py).  See eventcases.py."""

import pytest

from conftest import need_tracepoint_backend
import eventcases

pytestmark = pytest.mark.root

CASES = ["exact_sequence_of_a_connection", "short_connections_within_one_poll",
         "refused_connect", "resets_both_ways", "timeout_and_unreachable",
         "another_tracer_starting",
         "burst_of_connections", "udp_open_and_expire", "rtt_matches_tcp_info",
         "rtt_with_netem_delay"]


@pytest.mark.parametrize("case", CASES)
def test_events(case):
    need_tracepoint_backend()
    getattr(eventcases, case)("tracepoint")
