"""A uot-server's decisions about connections, without processes or sockets: the
server on stand-ins (tests/unitfakes.py), each connection a Carrier that remembers, each
uot-client an endpoint.Initiator.  Which connection still shaking hands makes room for a
newcomer, what ends a connection, and max_clients.  The real processes are in
tests/test_uot.py."""

import socket

from unitfakes import KEY, Carrier, Sock, started
from udpmux import wire
from udpmux.addr import peer_key
from udpmux.endpoint import Initiator
from udpmux.limits import GRACE
from udpmux.reasons import R_TCP_FULL, R_UNEXPECTED
from udpmux.uot import HANDSHAKE_TIMEOUT, HANDSHAKING, HANDSHAKING_PER_SOURCE, UotServer


def at(host, port=5000):
    return peer_key(socket.AF_INET, (host, port))


def server(**options):
    return started(UotServer(Sock(), (socket.AF_INET, ("127.0.0.1", 9)), KEY, **options))


def connect(srv, peer, now):
    """A new connection from `peer`: its Client at the server."""
    return srv.join(Carrier(srv.on_closed), peer, now)


def hello(srv, client, now):
    """The uot-client's HELLO on the connection; its endpoint, answered."""
    end = Initiator(KEY, wire.ROLE_UOT, repeat=False)
    end.start(now)
    (msg, _), = end.due(now).replies
    srv.from_client(client, msg, now)
    return end


def handshake(srv, client, now):
    end = hello(srv, client, now)
    (confirm, _), = end.receive(client.carrier.sent[-1], now).replies
    srv.from_client(client, confirm, now)
    return end


def open_ones(srv):
    return list(srv.clients.values())


def test_a_source_with_its_bound_shaking_hands_gives_up_its_oldest_silent_one():
    srv = server()
    other = connect(srv, at("198.51.100.1"), 0.0)
    mine = [connect(srv, at("192.0.2.1", 5000 + i), 0.1 * i)
            for i in range(HANDSHAKING_PER_SOURCE)]
    newcomer = connect(srv, at("192.0.2.1", 6000), GRACE + 1)
    assert mine[0].carrier.closed == "closed for a newer connection"
    assert srv.drops.counts == {R_TCP_FULL: 1}
    assert open_ones(srv) == [other, *mine[1:], newcomer]


def test_all_sources_together_give_up_the_oldest_silent_one():
    srv = server()
    waiting = [connect(srv, at(f"10.0.0.{i}"), float(i)) for i in range(HANDSHAKING)]
    connect(srv, at("192.0.2.99"), HANDSHAKING + GRACE)
    assert [c.carrier.closed is not None for c in waiting] == [True] + [False] * (HANDSHAKING - 1)


def test_a_connection_whose_hello_verified_outlasts_silent_ones():
    srv = server()
    mine = [connect(srv, at("192.0.2.1", 5000 + i), 0.0)
            for i in range(HANDSHAKING_PER_SOURCE)]
    hello(srv, mine[0], 0.5)
    assert mine[0].hello
    connect(srv, at("192.0.2.1", 6000), GRACE + 1)
    assert mine[0].carrier.closed is None and mine[1].carrier.closed is not None


def test_connections_with_a_session_leave_the_bound_to_those_shaking_hands():
    srv = server()
    for i in range(HANDSHAKING_PER_SOURCE + 2):     # a second apart: HELLO answers are rated
        handshake(srv, connect(srv, at("192.0.2.1", 5000 + i), float(i)), float(i))
    newcomer = connect(srv, at("192.0.2.1", 6000), HANDSHAKING_PER_SOURCE + 2 + GRACE)
    assert srv.drops.counts == {} and len(srv.clients) == HANDSHAKING_PER_SOURCE + 3
    assert newcomer.carrier.closed is None


def test_a_connection_is_one_handshake_and_anything_else_ends_it():
    srv = server()
    # A session's first message on another connection than its HELLO's: the shared
    # acceptor would confirm it, but that connection never said HELLO.
    said_hello, other = connect(srv, at("192.0.2.1"), 0.0), connect(srv, at("192.0.2.2"), 0.0)
    end = hello(srv, said_hello, 0.0)
    (confirm, _), = end.receive(said_hello.carrier.sent[-1], 0.0).replies
    srv.from_client(other, confirm, 0.0)
    assert other.carrier.closed == f"a message refused ({R_UNEXPECTED})"
    assert other.session is None
    # A second HELLO.
    srv.from_client(said_hello, end.handshake.hello(), 0.1)
    assert said_hello.carrier.closed == f"a message refused ({R_UNEXPECTED})"
    assert srv.drops.counts == {R_UNEXPECTED: 2} and srv.clients == {}


def test_a_handshake_beyond_max_clients_is_refused():
    srv = server(max_clients=1)
    first = connect(srv, at("192.0.2.1"), 0.0)
    handshake(srv, first, 0.0)
    second = connect(srv, at("192.0.2.2"), 0.0)
    handshake(srv, second, 0.0)
    assert second.carrier.closed == "max_clients (1) already connected"
    assert first.carrier.closed is None and srv.drops.counts == {R_TCP_FULL: 1}


def test_a_connection_that_does_not_finish_its_handshake_in_time_is_closed():
    srv = server()
    slow = connect(srv, at("192.0.2.1"), 0.0)
    done = connect(srv, at("192.0.2.2"), 0.0)
    handshake(srv, done, 0.0)
    srv.tick(HANDSHAKE_TIMEOUT)
    assert slow.carrier.closed is None
    srv.tick(HANDSHAKE_TIMEOUT + 0.1)
    assert slow.carrier.closed == f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    assert done.carrier.closed is None and open_ones(srv) == [done]
