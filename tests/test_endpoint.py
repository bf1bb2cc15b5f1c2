"""The session endpoints' decisions, as pure functions: a responder and an initiator
talk to each other through lists, and an attacker replays what it saw."""

import pytest

from udpmux import auth, endpoint, wire
from udpmux.endpoint import (
    ENDED, HELLO, IDLE, LOST, MOVED, NEW, UP, Initiator, Responder, dead_after,
)
from udpmux.reasons import R_MAC, R_REPLAY, R_SESSION, R_UNEXPECTED

KEY = auth.generate_key()
CLIENT = bytes.fromhex("020015be" "c0000201" + "00" * 8)       # 192.0.2.1:5566
ROAMED = bytes.fromhex("020015bf" "c0000202" + "00" * 8)       # 192.0.2.2:5567
STRANGER = bytes.fromhex("02001f90" "cb007105" + "00" * 8)     # 203.0.113.5:8080


def handshake(now=0.0, responder=None, initiator=None):
    responder = responder or Responder(KEY, [wire.ROLE_EXPOSE], name="t", stale=True)
    initiator = initiator or Initiator(KEY, wire.ROLE_EXPOSE)
    if initiator.state == IDLE:
        initiator.start(now)
    (hello, _), = initiator.due(now).replies
    (welcome, to), = responder.receive(hello, CLIENT, now).replies
    assert to == CLIENT
    got = initiator.receive(welcome, now)
    assert got.event == NEW and initiator.state == UP
    (confirm, _), = got.replies
    confirmed = responder.receive(confirm, CLIENT, now)
    assert confirmed.event == NEW and confirmed.session is responder.session
    return responder, initiator


def test_a_handshake_and_a_datagram_each_way():
    responder, initiator = handshake()
    msg = initiator.session.seal(wire.T_DATA, 7, b"hi")
    got = responder.receive(msg, CLIENT, 1.0)
    assert (got.mtype, got.tag, got.reason) == (wire.T_DATA, 7, None)
    back = responder.session.seal(wire.T_DATA, 7, b"ho")
    got = initiator.receive(back, 1.0)
    assert (got.mtype, got.tag, got.reason) == (wire.T_DATA, 7, None)


def test_hellos_are_repeated_with_back_off_until_a_welcome():
    initiator = Initiator(KEY, wire.ROLE_EXPOSE, keepalive=25.0)
    initiator.start(0.0)
    times = []
    now = 0.0
    while now < 60.0:
        if initiator.due(now).replies:
            times.append(now)
        now = round(now + 0.05, 2)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] == pytest.approx(endpoint.HELLO_FIRST, abs=0.06)
    assert gaps == sorted(gaps) and max(gaps) <= endpoint.HELLO_MOST + 0.06


def test_a_tcp_initiator_says_hello_once():
    initiator = Initiator(KEY, wire.ROLE_UOT, repeat=False)
    initiator.start(0.0)
    assert len(initiator.due(0.0).replies) == 1
    assert not initiator.due(100.0).replies


def test_an_idle_session_keeps_alive_and_a_silent_one_is_lost():
    responder, initiator = handshake()
    keepalive = initiator.keepalive
    assert not initiator.due(keepalive / 2).replies
    (msg, _), = initiator.due(keepalive + 0.1).replies
    assert responder.receive(msg, CLIENT, keepalive).reason is None
    got = initiator.due(dead_after(keepalive) + 1)
    assert got.event == LOST and initiator.state == HELLO


def test_a_replayed_hello_and_confirmation_change_nothing():
    responder, initiator = handshake()
    session = responder.session
    got = responder.receive(initiator.handshake.hello(), STRANGER, 1.0)
    assert got.replies and got.event is None and responder.session is session
    # The first session's confirmation again, from elsewhere: an old nonce.
    confirm = initiator.session.seal(wire.T_KEEPALIVE, 0, endpoint.keepalive_body(1.0))
    assert responder.receive(confirm, CLIENT, 1.0).reason is None
    assert responder.receive(confirm, STRANGER, 1.1).reason == R_REPLAY
    assert responder.session is session and session.peer == CLIENT


def test_the_peer_moves_only_once_its_new_address_answers():
    responder, initiator = handshake()
    msg = initiator.session.seal(wire.T_KEEPALIVE, 0, endpoint.keepalive_body(2.0))
    got = responder.receive(msg, ROAMED, 2.0)
    assert got.event is None and responder.session.peer == CLIENT
    (challenge, to), = [r for r in got.replies if r[1] == ROAMED]
    answer = initiator.receive(challenge, 2.01)
    (reply, _), = answer.replies
    got = responder.receive(reply, ROAMED, 2.02)
    assert got.event == MOVED and got.old == CLIENT and responder.session.peer == ROAMED


def test_a_message_raced_from_a_strangers_address_does_not_move_the_peer():
    responder, initiator = handshake()
    fresh = initiator.session.seal(wire.T_DATA, 1, b"x" * 100)
    got = responder.receive(fresh, STRANGER, 3.0)
    assert got.reason is None                   # genuine: delivered
    assert responder.session.peer == CLIENT     # but nothing moves
    (challenge, to), = got.replies
    assert to == STRANGER and len(challenge) <= len(fresh)


def test_bye_ends_the_session_at_the_responder_and_starts_again_at_the_initiator():
    responder, initiator = handshake()
    bye = initiator.session.seal(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    assert responder.receive(bye, CLIENT, 4.0).event == ENDED and responder.session is None
    responder, initiator = handshake()
    bye = responder.session.seal(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    assert initiator.receive(bye, 4.0).event == LOST and initiator.state == HELLO


def test_a_responder_that_restarted_answers_stale_and_the_initiator_starts_again():
    _old, initiator = handshake()
    restarted = Responder(KEY, [wire.ROLE_EXPOSE], name="t", stale=True)
    msg = initiator.session.seal(wire.T_KEEPALIVE, 0, endpoint.keepalive_body(5.0))
    got = restarted.receive(msg, CLIENT, 5.0)
    assert got.reason == R_SESSION
    (stale, to), = got.replies
    assert initiator.receive(stale, 5.0).event == LOST and initiator.state == HELLO


def test_a_stale_from_another_responder_is_refused():
    _old, initiator = handshake()
    other = Responder(KEY, [wire.ROLE_EXPOSE], name="other", stale=True)
    msg = initiator.session.seal(wire.T_KEEPALIVE, 0, endpoint.keepalive_body(5.0))
    (stale, _), = other.receive(msg, CLIENT, 5.0).replies
    assert initiator.receive(stale, 5.0).reason == R_MAC and initiator.state == UP


def test_a_new_session_replaces_the_old_one_at_a_single_responder():
    responder, first = handshake()
    old = responder.session
    second = Initiator(KEY, wire.ROLE_EXPOSE)
    second.start(6.0)
    (hello, _), = second.due(6.0).replies
    (welcome, _), = responder.receive(hello, ROAMED, 6.0).replies
    (confirm, _), = second.receive(welcome, 6.0).replies
    got = responder.receive(confirm, ROAMED, 6.0)
    assert got.event == NEW and got.old is old and responder.session is not old
    stale_msg = first.session.seal(wire.T_DATA, 1, b"late")
    assert responder.receive(stale_msg, CLIENT, 6.1).reason == R_SESSION


def test_a_welcome_to_an_earlier_hello_is_refused():
    responder = Responder(KEY, [wire.ROLE_EXPOSE])
    initiator = Initiator(KEY, wire.ROLE_EXPOSE)
    initiator.start(0.0)
    (first, _), = initiator.due(0.0).replies
    (welcome, _), = responder.receive(first, CLIENT, 0.0).replies
    initiator.due(10.0)                         # a newer HELLO went out meanwhile
    assert initiator.receive(welcome, 10.0).reason == R_UNEXPECTED


def test_admit_refuses_a_hello_with_its_reason():
    responder = Responder(KEY, [wire.ROLE_PUNCH])
    hello = Initiator(KEY, wire.ROLE_PUNCH).handshake.hello()
    got = responder.receive(hello, STRANGER, 0.0, admit=lambda key: "unproven")
    assert got.reason == "unproven" and not got.replies and not responder.acceptor.pending
