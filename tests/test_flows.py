"""Client flows (flows.ClientFlows) over a real tag table, without sockets: which flow
ends when, and what the other end is told (the `closed` callback)."""

import socket

import pytest

from udpmux.addr import peer_key
from udpmux.flows import ClientFlows
from udpmux.tagtable import TagTable
from udpmux.wire import CLOSE_EVICTED, CLOSE_IDLE


def client(n):
    return peer_key(socket.AF_INET, (f"192.0.2.{n}", 40000 + n))


@pytest.fixture
def made():
    """(flows over a table of 3, the closes told to the other end)."""
    table = TagTable(3)
    table.attach()
    told = []
    yield ClientFlows(table, lambda tag, reason: told.append((tag, reason))), told
    table.close()


def test_touch_makes_a_flow_once_and_counts_what_the_client_sent(made):
    flows, told = made
    slot = flows.touch(client(1), 0.0, 100)
    assert flows.touch(client(1), 1.0, 20) == slot
    assert len(flows.table) == 1
    flow = flows.table.flow(slot)
    assert (flow.key, flow.pkts_in, flow.bytes_in, flow.last_seen) == (client(1), 2, 120, 1.0)
    assert (flow.pkts_out, flow.bytes_out) == (0, 0)
    assert flows.touch(client(2), 1.0, 5) != slot
    assert told == []


def test_a_new_flow_in_a_full_table_ends_the_idlest_and_tells_the_other_end(made):
    flows, told = made
    tags = {n: flows.table.tag_of(flows.touch(client(n), float(n), 10)) for n in (1, 2, 3)}
    flows.touch(client(1), 4.0, 10)                 # 1 is busy again: 2 is the idlest now
    slot = flows.touch(client(4), 5.0, 10)
    assert told == [(tags[2], CLOSE_EVICTED)]
    assert flows.table.get(client(2)) is None and flows.table.slot_of_tag(tags[2]) is None
    assert flows.table.get(client(1)) is not None and flows.table.key_of(slot) == client(4)
    assert len(flows.table) == 3


def test_insert_evicts_only_when_full(made):
    flows, told = made
    flows.insert(client(1), 0.0)
    flows.insert(client(2), 0.0)
    flows.insert(client(3), 0.0)
    assert told == []
    flows.insert(client(4), 1.0)
    assert [reason for _tag, reason in told] == [CLOSE_EVICTED]
    assert flows.table.get(client(1)) is None


def test_idle_flows_expire_and_the_other_end_is_told(made):
    flows, told = made
    old = flows.table.tag_of(flows.touch(client(1), 0.0, 1))
    flows.touch(client(2), 5.0, 1)
    assert flows.expire(10.0, 10.0) == [] and told == []        # idle exactly 10 s: not yet
    ended = flows.expire(10.5, 10.0)
    assert ended == [(client(1), old)] and told == [(old, CLOSE_IDLE)]
    assert flows.table.get(client(2)) is not None


def test_a_flow_the_other_end_closed_is_forgotten_without_telling_it_back(made):
    flows, told = made
    tag = flows.table.tag_of(flows.touch(client(1), 0.0, 1))
    assert flows.forget(tag) is True
    assert flows.table.get(client(1)) is None and told == []
    assert flows.forget(tag) is False               # a CLOSE for a flow no longer here
    assert flows.expire(1000.0, 1.0) == [] and told == []
    fresh = flows.touch(client(1), 1.0, 1)          # the client again: a new flow
    assert flows.table.flow(fresh).pkts_in == 1
