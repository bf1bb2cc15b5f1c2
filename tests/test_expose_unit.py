"""The exposer's reaction to what its session with the relay does, without processes or
sockets: the worker on stand-ins (tests/unitfakes.py), the relay a responder.  A lost
session (a STALE believed, a BYE, silence) means registering again; a new relay's flow
table means closing every flow; a STALE not from the relay changes nothing.  The real
processes are in tests/test_relay.py."""

import socket

import pytest

from unitfakes import KEY, Carrier, Outbox, Sock, started
from udpmux.addr import Destination
from udpmux import auth, sockets, wire
from udpmux.addr import peer_key
from udpmux.endpoint import HELLO, IDLE, UP, Responder, dead_after
from udpmux.expose import ExposeWorker
from udpmux.flows import ServiceFlow
from udpmux.reasons import R_MAC
from udpmux.wire import T_HELLO

RELAY_TEXT = "203.0.113.1:7000"


def relay_destination():
    """The relay, as the exposer's config gives it (a numeric address: no resolver)."""
    destination = Destination(RELAY_TEXT)
    destination.resolve()
    return destination
SEEN = peer_key(socket.AF_INET, ("198.51.100.7", 4002))     # the exposer, as the relay sees it


@pytest.fixture
def no_sockets(monkeypatch):
    monkeypatch.setattr(sockets, "udp_connected",
                        lambda family, sockaddr, buffer=None: Sock(family, 40000, sockaddr))


def relay(epoch=1, name="wg", key=KEY):
    return Responder(key, [wire.ROLE_EXPOSE], name=name, stale=True, epoch=epoch)


def exposer(carrier="udp"):
    worker = started(ExposeWorker(relay_destination(), (socket.AF_INET, ("127.0.0.1", 9)), KEY,
                                  carrier=carrier), now=0.0)
    worker.sender = Outbox(worker.sock)
    return worker


def hellos(worker):
    """The HELLOs the exposer sent on its socket (UDP, before a session), taken out."""
    sent = [msg for msg in worker.sock.sent if msg[1] == T_HELLO]
    worker.sock.sent.clear()
    return sent


def register(worker, responder, now):
    """The exposer's handshake with `responder`, HELLO sent at `now`."""
    worker.send_due(now)
    (hello,) = hellos(worker)
    (welcome, _), = responder.receive(hello, SEEN, now).replies
    worker.from_relay(welcome, now)
    (confirm,) = worker.sender.to(worker.endpoint.peer)
    assert responder.receive(confirm, SEEN, now).event == "new"
    assert worker.endpoint.state == UP and worker.registered


def add_flow(worker, tag):
    sock = Sock()
    worker.flows.flows[tag] = ServiceFlow(tag, tag, sock, 0.0, None)
    return sock


def a_message(worker):
    """What the exposer sends next (a service's datagram), sealed under its session."""
    return worker.endpoint.session.seal(wire.T_DATA, 7, b"d" * 64)


def test_a_relay_that_restarted_is_believed_and_the_exposer_registers_again(no_sockets):
    worker = exposer()
    register(worker, relay(epoch=1), 0.0)
    flow = add_flow(worker, 7)
    restarted = relay(epoch=2)
    (stale, _), = restarted.receive(a_message(worker), SEEN, 1.0).replies
    worker.from_relay(stale, 1.0)
    assert worker.endpoint.state == HELLO and not worker.registered
    assert not flow.closed                              # the flows wait for the new table
    register(worker, restarted, 1.0)                    # HELLO again at once
    assert flow.closed and len(worker.flows) == 0       # a new epoch: every tag is void


def test_a_new_session_with_the_same_relay_keeps_the_flows(no_sockets):
    worker = exposer()
    responder = relay(epoch=1)
    register(worker, responder, 0.0)
    flow = add_flow(worker, 7)
    bye = responder.session.seal(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    worker.from_relay(bye, 1.0)
    assert worker.endpoint.state == HELLO and not worker.registered
    register(worker, responder, 1.0)
    assert not flow.closed and len(worker.flows) == 1


@pytest.mark.parametrize("forger", ["another tunnel", "another key"])
def test_a_stale_not_from_the_relay_changes_nothing(no_sockets, forger):
    worker = exposer()
    register(worker, relay(), 0.0)
    other = relay(name="other") if forger == "another tunnel" else relay(key=auth.generate_key())
    (stale, _), = other.receive(a_message(worker), SEEN, 1.0).replies
    session = worker.endpoint.session
    worker.from_relay(stale, 1.0)
    assert worker.drops.counts == {R_MAC: 1}
    assert worker.endpoint.state == UP and worker.endpoint.session is session
    worker.send_due(1.0)
    assert hellos(worker) == []


def test_a_silent_relay_is_lost_and_registered_with_again(no_sockets):
    worker = exposer()
    register(worker, relay(), 0.0)
    worker.send_due(dead_after(worker.keepalive))
    assert worker.endpoint.state == UP
    worker.send_due(dead_after(worker.keepalive) + 0.1)
    assert not worker.registered and len(hellos(worker)) == 1


def test_over_tcp_a_lost_session_ends_the_connection_and_a_new_one_registers():
    worker = exposer(carrier="tcp")
    worker.carrier = carrier = Carrier(worker.on_carrier_closed)    # as on_connected does
    worker.welcomed_here = False
    worker.endpoint.start(0.0)
    worker.send_due(0.0)
    responder = relay()
    (hello,) = carrier.sent
    (welcome, _), = responder.receive(hello, SEEN, 0.0).replies
    worker.from_relay(welcome, 0.0)
    assert worker.endpoint.state == UP and worker.welcomed_here
    responder.receive(carrier.sent[-1], SEEN, 0.0)
    bye = responder.session.seal(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    worker.from_relay(bye, 1.0)
    assert carrier.closed == "registering again"
    assert worker.carrier is None and worker.endpoint.state == IDLE
    assert worker.dialer.next_at is not None                # it connects again
