"""Limits as pure functions: which waiting connection makes room for a newcomer
(limits.to_make_room), the admission of new flows (limits.FlowAdmission), and what
tests/test_control.py leaves out of token buckets and per-source tables."""

import random
import socket

import pytest

from udpmux import limits
from udpmux.addr import peer_key
from udpmux.limits import GRACE, FlowAdmission, PerSource, TokenBucket, to_make_room
from udpmux.reasons import R_FLOW_RATE, R_SOURCE_RATE


class Conn:
    def __init__(self, source, since, hello=False):
        self.source, self.since, self.hello = source, since, hello

    def __repr__(self):
        return f"Conn({self.source!r}, {self.since}, hello={self.hello})"


def key(host, port=5000):
    return peer_key(socket.AF_INET, (host, port))


# -- to_make_room

def test_a_newcomer_that_fits_closes_nobody():
    waiting = [Conn(b"a", 0.0), Conn(b"a", 0.0), Conn(b"b", 0.0)]
    assert to_make_room(waiting, b"a", 3, 4, 10.0) is None
    assert to_make_room([], b"a", 1, 1, 10.0) is None


def test_a_source_at_its_bound_gives_up_its_own_oldest_silent_one_not_anyone_elses():
    others = Conn(b"b", 0.0)
    mine = [Conn(b"a", 1.0), Conn(b"a", 2.0), Conn(b"a", 3.0)]
    waiting = [others, *mine]
    assert to_make_room(waiting, b"a", 3, 16, 10.0) is mine[0]
    assert to_make_room(waiting, b"c", 3, 16, 10.0) is None
    # At both bounds at once, still its own: the source's bound is asked first.
    assert to_make_room(waiting, b"a", 3, 4, 10.0) is mine[0]


def test_all_sources_at_the_bound_give_up_the_oldest_silent_one():
    waiting = [Conn(b"a", 1.0, hello=True), Conn(b"b", 2.0), Conn(b"c", 3.0)]
    assert to_make_room(waiting, b"d", 4, 3, 10.0) is waiting[1]


def test_a_connection_that_said_hello_goes_only_when_none_is_silent():
    keyholder = Conn(b"a", 0.0, hello=True)
    silent = Conn(b"a", 9.5)                        # younger than GRACE, even
    assert to_make_room([keyholder, silent], b"a", 2, 16, 10.0) is silent
    both = [Conn(b"a", 0.0, hello=True), Conn(b"a", 1.0, hello=True)]
    assert to_make_room(both, b"a", 2, 16, 10.0) is both[0]


def test_grace_counts_from_when_the_connection_came(monkeypatch):
    monkeypatch.setattr(limits.random, "choice", lambda among: among[0])
    young, old = Conn(b"b", 10.0 - GRACE + 0.01), Conn(b"a", 10.0 - GRACE)
    assert to_make_room([young, old], b"c", 4, 2, 10.0) is old   # old: exactly GRACE


def test_when_every_silent_one_is_younger_than_grace_one_of_them_goes_at_random(monkeypatch):
    offered = []

    def choice(among):
        offered.append(list(among))
        return among[-1]

    monkeypatch.setattr(limits.random, "choice", choice)
    keyholder = Conn(b"a", 9.0, hello=True)
    young = [Conn(b"b", 9.5), Conn(b"c", 9.6)]
    assert to_make_room([keyholder, *young], b"d", 4, 3, 10.0) is young[1]
    assert offered == [young]                       # never the one that said HELLO


def test_strangers_reconnecting_fast_push_a_newcomer_out_only_by_chance(monkeypatch):
    monkeypatch.setattr(limits.random, "choice", random.Random(1).choice)
    waiting = [Conn(bytes([i]), 10.0) for i in range(16)]
    picked = {id(to_make_room(waiting, b"x", 4, 16, 10.0)) for _ in range(200)}
    assert len(picked) > 8                          # not always the same one (the oldest)


# -- FlowAdmission

def test_new_flows_are_limited_per_source_then_on_the_tunnel():
    admission = FlowAdmission(rate=5, per_source=2, max_sources=100, now=0.0)
    # One source: its own limit, whatever port it comes from.
    assert [admission.refused(key("192.0.2.1", p), 0.0) for p in (1, 2, 3)] == \
        [None, None, R_SOURCE_RATE]
    # Many sources: the tunnel's limit (2 of 5 spent above).
    got = [admission.refused(key(f"198.51.100.{i}"), 0.0) for i in range(5)]
    assert got == [None, None, None, R_FLOW_RATE, R_FLOW_RATE]
    assert admission.refused(key("198.51.100.9"), 0.2) is None   # a second's rate comes back


def test_a_source_over_its_limit_does_not_spend_the_tunnels_allowance():
    admission = FlowAdmission(rate=10, per_source=1, max_sources=100, now=0.0)
    busy = key("192.0.2.1")
    assert admission.refused(busy, 0.0) is None
    for _ in range(50):
        assert admission.refused(busy, 0.0) == R_SOURCE_RATE
    allowed = [admission.refused(key(f"198.51.100.{i}"), 0.0) for i in range(9)]
    assert allowed == [None] * 9


def test_sources_beyond_max_sources_are_forgotten_but_the_tunnel_still_holds_them():
    admission = FlowAdmission(rate=20, per_source=1, max_sources=4, now=0.0)
    hosts = [key(f"10.0.{i}.1") for i in range(40)]
    allowed = sum(admission.refused(h, 0.0) is None for h in hosts)
    assert len(admission.sources) == 4
    assert allowed == 20                            # new addresses are held by the rate
    # The last ones are remembered; a forgotten one starts again with a full bucket.
    assert admission.refused(hosts[-1], 0.5) == R_SOURCE_RATE
    assert admission.refused(hosts[0], 0.5) is None


# -- TokenBucket and PerSource, beyond tests/test_control.py

def test_a_rate_below_one_still_lets_one_through_now_and_then():
    bucket = TokenBucket(rate=0.5, now=0.0)
    assert bucket.take(0.0) and not bucket.take(0.0)
    assert not bucket.take(1.9) and bucket.take(3.9)


def test_a_long_idle_bucket_holds_its_burst_and_no_more():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert sum(bucket.take(1000.0) for _ in range(10)) == 3


def test_a_refused_take_spends_nothing():
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.05)                    # half a token: refused, kept
    assert bucket.take(0.1)                         # the other half: one whole token


def test_a_bucket_takes_several_tokens_at_once_or_none():
    bucket = TokenBucket(rate=10, now=0.0)
    assert bucket.take(0.0, n=8) and not bucket.take(0.0, n=3)
    assert bucket.take(0.0, n=2) and not bucket.take(0.0)


def test_per_source_buckets_have_the_burst_given():
    table = PerSource(rate=1, size=2, burst=3)
    assert [table.take(b"a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert table.take(b"b", 0.0)


@pytest.mark.parametrize("rate", [1, 100])
def test_per_source_buckets_refill_at_the_rate(rate):
    table = PerSource(rate=rate, size=8)
    assert sum(table.take(b"a", 0.0) for _ in range(2 * rate)) == rate
    assert sum(table.take(b"a", 0.5) for _ in range(2 * rate)) == max(rate // 2, 0)


def test_networks_admit_by_allow_and_deny_and_judge_mapped_ipv4_by_its_address():
    import ipaddress
    from udpmux.addr import peer_key
    from udpmux.limits import Networks
    nets = Networks([ipaddress.ip_network("203.0.113.0/24"),
                     ipaddress.ip_network("2001:db8::/32")],
                    [ipaddress.ip_network("203.0.113.66/32")])
    v4 = lambda a: peer_key(socket.AF_INET, (a, 1))             # noqa: E731
    v6 = lambda a: peer_key(socket.AF_INET6, (a, 1, 0, 0))      # noqa: E731
    assert nets.admits(v4("203.0.113.5")) and nets.admits(v6("2001:db8::1"))
    assert not nets.admits(v4("203.0.113.66"))                  # deny wins
    assert not nets.admits(v4("198.51.100.1")) and not nets.admits(v6("2001:db9::1"))
    assert nets.admits(v6("::ffff:203.0.113.5"))                # a dual-stack socket's
    assert not nets.admits(v6("::ffff:203.0.113.66"))
    anyone = Networks()
    assert not anyone and anyone.admits(v4("198.51.100.1"))
    only_deny = Networks((), [ipaddress.ip_network("10.0.0.0/8")])
    assert only_deny.admits(v4("192.0.2.1")) and not only_deny.admits(v4("10.1.2.3"))
