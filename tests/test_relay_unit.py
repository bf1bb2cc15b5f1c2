"""A relay tunnel's admission of new client flows, without processes or sockets: the
worker on stand-ins (tests/unitfakes.py), the exposer an endpoint.Initiator.  The rates
themselves are limits.FlowAdmission's (tests/test_limits.py); here, that the worker
asks them at the right moment and tells the exposer what ends.  The real processes
are in tests/test_relay.py and tests/test_flood.py."""

import socket

from unitfakes import KEY, Outbox, started, tunnel
from udpmux import wire
from udpmux.addr import peer_key
from udpmux.endpoint import Initiator
from udpmux.reasons import R_FLOW_RATE, R_NO_EXPOSER, R_SOURCE_RATE
from udpmux.relay import RelayWorker
from udpmux.wire import CLOSE_EVICTED, CLOSE_IDLE, REASON, T_CLOSE

EXPOSER = peer_key(socket.AF_INET, ("198.51.100.7", 4002))


def client(host, port=5000):
    return peer_key(socket.AF_INET, (host, port))


def relay(**settings):
    worker = started(RelayWorker(tunnel(**settings), None), now=0.0)
    worker.to_exposer, worker.to_clients = Outbox(), Outbox()
    return worker


def register(worker, now=0.0):
    """An exposer's handshake with the worker; its endpoint."""
    exposer = Initiator(KEY, wire.ROLE_EXPOSE)
    exposer.start(now)
    (hello, _), = exposer.due(now).replies
    worker.from_exposer(hello, EXPOSER, now)
    (welcome,) = worker.to_exposer.to(EXPOSER)
    (confirm, _), = exposer.receive(welcome, now).replies
    worker.from_exposer(confirm, EXPOSER, now)
    assert worker.session is not None
    return exposer


def closes(worker, exposer, now):
    """[(tag, reason)] of the CLOSEs the exposer was sent."""
    out = []
    for msg in worker.to_exposer.to(EXPOSER):
        got = exposer.receive(msg, now)
        if got.mtype == T_CLOSE:
            out.append((got.tag, REASON.unpack_from(msg, wire.HEADER_SIZE)[0]))
    return out


def test_no_flow_starts_while_no_exposer_is_registered():
    worker = relay()
    assert worker.new_flow(client("192.0.2.1"), 1.0) is None
    assert worker.drops.counts == {R_NO_EXPOSER: 1} and len(worker.table) == 0


def test_new_flows_are_refused_over_the_sources_rate_then_over_the_tunnels():
    worker = relay(new_flows_per_source=2, new_flows_rate=3)
    register(worker)
    got = [worker.new_flow(client("192.0.2.1", port), 1.0) for port in (1, 2, 3)]
    assert got[2] is None and None not in got[:2]
    assert worker.drops.counts == {R_SOURCE_RATE: 1}
    got = [worker.new_flow(client(f"198.51.100.{n}"), 1.0) for n in (1, 2, 3)]
    assert got[0] is not None and got[1:] == [None, None]
    assert worker.drops.counts == {R_SOURCE_RATE: 1, R_FLOW_RATE: 2}
    assert len(worker.table) == 3 and worker.counters["flows"] == 3
    assert worker.table.get(client("198.51.100.2")) is None


def test_the_rates_come_back_with_time():
    worker = relay(new_flows_per_source=1, new_flows_rate=1000)
    register(worker)
    assert worker.new_flow(client("192.0.2.1", 1), 1.0) is not None
    assert worker.new_flow(client("192.0.2.1", 2), 1.5) is None
    assert worker.new_flow(client("192.0.2.1", 2), 2.0) is not None


def test_no_flow_starts_once_the_exposer_has_been_silent_for_exposer_timeout():
    worker = relay(exposer_timeout=90.0)
    register(worker, now=0.0)
    assert worker.new_flow(client("192.0.2.1", 1), 90.0) is not None
    assert worker.new_flow(client("192.0.2.1", 2), 90.5) is None
    assert worker.drops.counts == {R_NO_EXPOSER: 1}


def test_a_new_flow_in_a_full_table_ends_the_idlest_and_the_exposer_closes_it_too():
    worker = relay(max_flows=2)
    exposer = register(worker)
    first = worker.table.tag_of(worker.new_flow(client("192.0.2.1"), 1.0))
    worker.new_flow(client("192.0.2.2"), 2.0)
    worker.new_flow(client("192.0.2.3"), 3.0)
    assert closes(worker, exposer, 3.0) == [(first, CLOSE_EVICTED)]
    assert worker.counters["evicted"] == 1 and len(worker.table) == 2


def test_idle_flows_end_at_both_ends():
    worker = relay(flow_idle=60.0)
    exposer = register(worker)
    tag = worker.table.tag_of(worker.new_flow(client("192.0.2.1"), 1.0))
    worker.new_flow(client("192.0.2.2"), 30.0)
    worker.tick(61.0)
    assert closes(worker, exposer, 61.0) == []
    worker.tick(61.5)
    assert closes(worker, exposer, 61.5) == [(tag, CLOSE_IDLE)]
    assert worker.counters["expired"] == 1 and len(worker.table) == 1
