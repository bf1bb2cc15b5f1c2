"""punch's choice of path, without processes or sockets: the worker on stand-ins
(tests/unitfakes.py), the rendezvous relay a responder, the other punch a prover and a
session endpoint at an address.  Each test checks where the datagrams go, what the
relay is told, and when probes and HELLOs leave.  Real NATs are in
tests/test_lab_punch.py, real processes in tests/test_punch.py."""

import socket

import pytest

from unitfakes import KEY, Outbox, Poller, Sock
from udpmux import sockets, wire
from udpmux.addr import peer_key
from udpmux.endpoint import NEW, Initiator, Responder, dead_after
from udpmux.probes import PUNCH_TIMEOUT, Prover
from udpmux.punch import PARTNER_WORD, RETRY_EVERY, SLOW_PUNCH, PunchWorker
from udpmux.reasons import R_NO_PATH, R_UNPROVEN
from udpmux.session import observed_fields
from udpmux.wire import (
    HEADER_SIZE, PATH, PATH_DIRECT, PATH_RELAYED, PEER, T_DATA, T_PATH, T_PEER, T_PUNCH,
    T_RENDEZVOUS,
)

RELAY = (socket.AF_INET, ("203.0.113.1", 7000))
RELAY_KEY = peer_key(*RELAY)
FORWARD_SEEN = peer_key(socket.AF_INET, ("198.51.100.7", 4002))    # as the others see it
LISTEN_SEEN = peer_key(socket.AF_INET, ("192.0.2.1", 4001))
LISTEN_OTHER_PORT = peer_key(socket.AF_INET, ("192.0.2.1", 6001))   # its NAT's other mapping


@pytest.fixture
def no_sockets(monkeypatch):
    monkeypatch.setattr(sockets, "udp_any",
                        lambda family, port, what, buffer=None: Sock(family, port or 40000))
    monkeypatch.setattr(sockets, "udp",
                        lambda family, sockaddr, what, buffer=None: Sock(family, sockaddr[1]))


def punch(side, **options):
    """A punch worker, set up at time 0, on the `side` given, probe ports off."""
    if side == "forward":
        options["forward"] = (socket.AF_INET, ("127.0.0.1", 9))
    else:
        options["listen"] = (socket.AF_INET, ("127.0.0.1", 5000))
    options.setdefault("probe_ports", 0)
    worker = PunchWorker(KEY, 4002, **options)
    worker.poller = Poller()
    worker.setup(now=0.0)
    worker.sender = Outbox(worker.sock)
    if side != "forward":
        worker.to_local = Outbox()
    return worker


def brokered(side="forward"):
    return punch(side, relay=RELAY, rendezvous="mosh")


class Relay:
    """The rendezvous tunnel, as one punch agent sees it."""

    def __init__(self, worker, seen=FORWARD_SEEN):
        self.worker = worker
        self.seen = seen                # where it sees the agent
        self.end = Responder(KEY, [wire.ROLE_PUNCH], single=False)

    def join(self, now=0.0):
        worker = self.worker
        worker.on_wake(now)
        (hello,) = worker.sender.to(RELAY_KEY)
        (welcome, _), = self.end.receive(hello, self.seen, now).replies
        worker.on_message(welcome, RELAY_KEY, now, worker.sock)
        confirm, rendezvous = worker.sender.to(RELAY_KEY)
        self.session = self.end.receive(confirm, self.seen, now).session
        assert self.end.receive(rendezvous, self.seen, now).mtype == T_RENDEZVOUS

    def tell(self, peer, now):
        """PEER: the other agent is at `peer`."""
        family, port, address = observed_fields(peer)
        msg = self.session.seal(T_PEER, 0, PEER.pack(family, port, address, 1))
        self.worker.on_message(msg, RELAY_KEY, now, self.worker.sock)

    def heard(self, now):
        """[(received, message)] of what the agent sent the relay."""
        return [(self.end.receive(msg, self.seen, now), msg)
                for msg in self.worker.sender.to(RELAY_KEY)]

    def paths(self, now):
        return [PATH.unpack_from(msg, HEADER_SIZE)[0] for got, msg in self.heard(now)
                if got.mtype == T_PATH]


class Other:
    """The other punch: its probes' prover, and its end of the direct session, at
    `where` as the worker sees it; the worker is at `worker_seen` as it sees it."""

    def __init__(self, worker, where, worker_seen, listen):
        self.worker = worker
        self.where = where
        self.worker_seen = worker_seen
        if listen:
            self.end = Initiator(KEY, wire.ROLE_PUNCH, peer=worker_seen)
            keys = self.end.handshake
        else:
            self.end = Responder(KEY, [wire.ROLE_PUNCH])
            keys = self.end.acceptor
        self.keys = keys
        self.prover = Prover(keys.seal)
        self.sock = object()

    def probes(self):
        return self.worker.sender.to(self.where, T_PUNCH)

    def answer(self, probe, now, where=None):
        """Answer one of the worker's probes (from `where`: another port of ours)."""
        worker = self.worker
        reply, _ = self.prover.received(self.keys.open(probe, T_PUNCH), self.sock,
                                        self.worker_seen, now)
        worker.on_message(reply, where or self.where, now, worker.sock)
        for echo in worker.sender.to(where or self.where, T_PUNCH):
            self.prover.received(self.keys.open(echo, T_PUNCH), self.sock, self.worker_seen,
                                 now)

    def handshake(self, now):
        """As the listen side: HELLO, WELCOME, the first message; True when it is up."""
        worker = self.worker
        self.end.start(now)
        (hello, _), = self.end.due(now).replies
        worker.on_message(hello, self.where, now, worker.sock)
        welcome = worker.sender.to(self.where)
        if not welcome:
            return False
        got = self.end.receive(welcome[0], now, self.worker_seen)
        (confirm, _), = got.replies
        worker.on_message(confirm, self.where, now, worker.sock)
        return got.event == NEW

    def data(self, now):
        """The DATA bodies the worker sent us directly."""
        out = []
        for msg in self.worker.sender.to(self.where):
            got = self.end.receive(msg, now, self.worker_seen) if isinstance(self.end, Initiator) \
                else self.end.receive(msg, self.worker_seen, now)
            if got.mtype == T_DATA:
                out.append(bytes(msg[HEADER_SIZE:HEADER_SIZE + 5]))
        return out


def relayed_data(relay, now):
    return [bytes(msg[HEADER_SIZE:HEADER_SIZE + 5]) for got, msg in relay.heard(now)
            if got.mtype == T_DATA]


def paired_forward_side():
    """A brokered forward side, paired with a listen side at LISTEN_SEEN at time 1."""
    worker = brokered()
    relay = Relay(worker)
    relay.join(0.0)
    relay.tell(LISTEN_SEEN, 1.0)
    return worker, relay, Other(worker, LISTEN_SEEN, FORWARD_SEEN, listen=True)


def go_direct(worker, other, now):
    worker.on_wake(now)                     # the attempt's probes
    other.answer(other.probes()[-1], now)
    assert other.handshake(now)


def test_datagrams_have_no_path_until_the_relay_pairs_the_two_then_go_through_it(no_sockets):
    worker = brokered()
    relay = Relay(worker)
    relay.join(0.0)
    worker.send_data(T_DATA, 7, b"early")
    assert worker.drops.counts == {R_NO_PATH: 1}
    relay.tell(LISTEN_SEEN, 1.0)
    assert relay.paths(1.0) == [PATH_RELAYED]
    worker.send_data(T_DATA, 7, b"hello")
    assert relayed_data(relay, 1.0) == [b"hello"]


def test_a_proven_path_and_a_handshake_move_the_datagrams_off_the_relay(no_sockets):
    worker, relay, other = paired_forward_side()
    relay.heard(1.0)
    go_direct(worker, other, 1.5)
    assert relay.paths(1.5) == [PATH_DIRECT]
    worker.send_data(T_DATA, 7, b"hello")
    assert other.data(1.5) == [b"hello"] and relayed_data(relay, 1.5) == []


def test_the_forward_side_answers_no_hello_from_a_path_no_challenge_proved(no_sockets):
    worker, relay, other = paired_forward_side()
    assert not other.handshake(1.1)
    assert worker.drops.counts == {R_UNPROVEN: 1} and worker.path == PATH_RELAYED
    worker.on_wake(1.2)
    other.answer(other.probes()[-1], 1.2)
    assert other.handshake(1.3) and worker.path == PATH_DIRECT


def test_a_failed_attempt_stays_relayed_and_the_next_starts_retry_every_later(no_sockets):
    worker, relay, other = paired_forward_side()
    now, probed = 1.0, []
    while worker.wake_at(now) is not None:          # the loop's timers, and nothing else
        now = worker.wake_at(now)
        worker.on_wake(now)
        probed += [now] * len(other.probes())
    assert probed[0] == 1.0 and probed[-1] < 1.0 + PUNCH_TIMEOUT <= now
    assert worker.path == PATH_RELAYED
    worker.tick(now + RETRY_EVERY - 0.5)
    assert worker.wake_at(now + RETRY_EVERY - 0.5) is None
    worker.tick(now + RETRY_EVERY)
    assert worker.wake_at(now + RETRY_EVERY) == now + RETRY_EVERY
    worker.on_wake(now + RETRY_EVERY)
    assert len(other.probes()) == 1


def test_a_silent_direct_path_falls_back_to_the_relay_and_punches_where_it_said(no_sockets):
    worker, relay, other = paired_forward_side()
    go_direct(worker, other, 1.5)
    # While direct, the relay's news of the peer waits for the next attempt.
    relay.tell(LISTEN_OTHER_PORT, 2.0)
    assert worker.peer_key == LISTEN_SEEN and worker.path == PATH_DIRECT
    relay.heard(2.0)
    silent = 1.5 + dead_after(worker.keepalive) + 1
    keepalive = relay.session.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    worker.on_message(keepalive, RELAY_KEY, silent - 1, worker.sock)   # the relay is there
    worker.tick(silent)
    assert PATH_RELAYED in relay.paths(silent) and worker.path == PATH_RELAYED
    worker.send_data(T_DATA, 7, b"again")
    assert relayed_data(relay, silent) == [b"again"]
    worker.on_wake(silent)
    assert len(worker.sender.to(LISTEN_OTHER_PORT, T_PUNCH)) == 1


def test_a_direct_path_alone_keeps_knocking_slowly_after_an_attempt(no_sockets):
    worker = punch("forward", peer=(socket.AF_INET, ("192.0.2.1", 4001)))
    other = Other(worker, LISTEN_SEEN, FORWARD_SEEN, listen=True)
    worker.on_wake(0.0)
    assert len(other.probes()) == 1
    worker.on_wake(PUNCH_TIMEOUT)
    assert other.probes() == []
    assert worker.wake_at(PUNCH_TIMEOUT) == PUNCH_TIMEOUT + SLOW_PUNCH
    worker.on_wake(PUNCH_TIMEOUT + SLOW_PUNCH)
    assert len(other.probes()) == 1
    worker.send_data(T_DATA, 1, b"x")
    assert worker.drops.counts == {R_NO_PATH: 1}


def listen_side_up(keepalive):
    """A direct listen side whose session with a forward side at FORWARD_SEEN came up
    at 0.1, with two more of its challenges (sent at 0.1 and 0.2) not yet answered."""
    worker = punch("listen", peer=(socket.AF_INET, ("198.51.100.7", 4002)),
                   keepalive=keepalive)
    other = Other(worker, FORWARD_SEEN, LISTEN_SEEN, listen=False)
    worker.on_wake(0.0)
    worker.on_wake(0.1)
    worker.on_wake(0.2)
    first, second, third = other.probes()
    other.answer(first, 0.1)
    (hello,) = worker.sender.to(FORWARD_SEEN)           # it offers the session at once
    (welcome, _), = other.end.receive(hello, LISTEN_SEEN, 0.1).replies
    worker.on_message(welcome, FORWARD_SEEN, 0.1, worker.sock)
    (confirm,) = worker.sender.to(FORWARD_SEEN)
    assert other.end.receive(confirm, LISTEN_SEEN, 0.1).event == NEW
    assert worker.path == PATH_DIRECT
    return worker, other, second, third


def test_a_late_proof_of_the_path_not_taken_changes_nothing_while_the_session_is_heard(
        no_sockets):
    worker, other, second, third = listen_side_up(keepalive=5.0)
    other.answer(second, 1.0, where=peer_key(socket.AF_INET, ("198.51.100.7", 6002)))
    assert worker.sender.sent == []                     # no HELLO there
    assert worker.direct_end.peer == FORWARD_SEEN and worker.peer_key == FORWARD_SEEN
    assert worker.path == PATH_DIRECT


def test_a_proof_after_the_session_went_quiet_offers_a_new_one_there(no_sockets):
    worker, other, second, third = listen_side_up(keepalive=5.0)
    elsewhere = peer_key(socket.AF_INET, ("198.51.100.7", 6002))
    other.answer(third, 5.1, where=elsewhere)           # nothing heard since 0.1
    (hello,) = worker.sender.to(elsewhere)
    assert hello[1] == wire.T_HELLO and worker.direct_end.peer == elsewhere


def test_a_proof_of_the_path_in_use_starts_no_new_handshake_even_when_quiet(no_sockets):
    worker, other, second, third = listen_side_up(keepalive=5.0)
    session = worker.direct
    other.answer(third, 5.1)                            # from where the session is
    assert worker.sender.sent == [] and worker.direct is session


def test_the_listen_side_takes_a_welcome_only_from_where_its_hello_went(no_sockets):
    worker = punch("listen", peer=(socket.AF_INET, ("198.51.100.7", 4002)))
    other = Other(worker, FORWARD_SEEN, LISTEN_SEEN, listen=False)
    worker.on_wake(0.0)
    (probe,) = other.probes()
    other.answer(probe, 0.1)
    (hello,) = worker.sender.to(FORWARD_SEEN)
    (welcome, _), = other.end.receive(hello, LISTEN_SEEN, 0.1).replies
    worker.on_message(welcome, peer_key(socket.AF_INET, ("203.0.113.9", 4002)), 0.1,
                      worker.sock)
    assert worker.drops.counts == {R_UNPROVEN: 1} and worker.direct is None
    worker.on_message(welcome, FORWARD_SEEN, 0.1, worker.sock)
    assert worker.direct is not None and worker.path == PATH_DIRECT


def test_losing_the_relay_leaves_a_relayed_pair_without_a_path(no_sockets):
    worker, relay, other = paired_forward_side()
    bye = relay.session.seal(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    worker.on_message(bye, RELAY_KEY, 2.0, worker.sock)
    assert worker.path is None and not worker.paired
    worker.send_data(T_DATA, 7, b"lost")
    assert worker.drops.counts == {R_NO_PATH: 1}


def test_losing_the_relay_leaves_a_direct_path_alone(no_sockets):
    worker, relay, other = paired_forward_side()
    go_direct(worker, other, 1.5)
    bye = relay.session.seal(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    worker.on_message(bye, RELAY_KEY, 2.0, worker.sock)
    assert worker.path == PATH_DIRECT
    worker.send_data(T_DATA, 7, b"still")
    assert other.data(2.0) == [b"still"] and worker.drops.counts == {}


def test_a_side_left_alone_at_the_relay_says_so_and_what_to_check(no_sockets, caplog):
    worker = brokered("forward")
    Relay(worker).join(now=0.0)
    caplog.set_level("WARNING", logger="udpmux")
    worker.tick(PARTNER_WORD - 1)
    assert "no listen side" not in caplog.text
    worker.tick(PARTNER_WORD)
    assert "registered with the relay for 30 s, and no listen side has given the " \
           "rendezvous 'mosh'" in caplog.text
    assert "same --rendezvous and key" in caplog.text
    worker.tick(PARTNER_WORD + 1)                   # not again at every tick
    assert caplog.text.count("no listen side") == 1


def test_a_relay_that_never_answers_is_named_with_the_likely_causes(no_sockets, caplog):
    worker = brokered("listen")
    caplog.set_level("WARNING", logger="udpmux")
    now = 0.0
    while "no answer from the relay" not in caplog.text and now < 60:
        worker.on_wake(now)
        now = worker.wake_at(now) or now + 1
    assert "no answer from the relay at 203.0.113.1:7000 after 4 tries" in caplog.text
    assert "its rendezvous tunnel has another key" in caplog.text
