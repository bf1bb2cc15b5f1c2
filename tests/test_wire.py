"""The wire format, the replay window and sessions, as pure functions."""

import pytest
from hypothesis import given, settings, strategies as st

from udpmux import auth, reasons, wire
from udpmux.session import (
    CHALLENGE_EVERY, PENDING_PER_SOURCE, Acceptor, Drop, Initiator, Session, challenge_size,
    responder_name,
)

PEER = bytes.fromhex("020015be" "c0000201" + "00" * 8)     # 192.0.2.1:5566
ELSEWHERE = bytes.fromhex("02001f90" "cb007105" + "00" * 8)  # 203.0.113.5:8080

REASONS = {reasons.R_SHORT, reasons.R_VERSION, reasons.R_TYPE, reasons.R_FLAGS, reasons.R_LENGTH, reasons.R_KEYED,
           reasons.R_TOO_LARGE, reasons.R_MAC, reasons.R_REPLAY, reasons.R_OLD, reasons.R_NONCE,
           "role", "unexpected", "session"}


def pair(psk, role=wire.ROLE_EXPOSE):
    """An initiator's and a responder's Session after a real handshake."""
    initiator = Initiator(psk, role)
    acceptor = Acceptor(psk, [role], responder_name(psk, "tunnel"))
    welcome, _pending = acceptor.hello(initiator.hello(), PEER, 0.0)
    mine = initiator.welcome(welcome)
    first = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    _t, sid, _tag, nonce = wire.parse_header(first, mine.keyed)
    theirs = acceptor.confirm(sid, first, nonce)
    return mine, theirs


def receive(session, msg):
    """What a receiver does with msg: (type, tag, body), or the reason it is dropped."""
    try:
        mtype, sid, tag, nonce = wire.parse_header(msg, session.keyed)
        if sid != session.local_id:
            return "session"
        session.open(msg, nonce)
    except (wire.Malformed, Drop) as exc:
        return exc.reason
    return mtype, tag, bytes(wire.body_of(msg, session.keyed))


KEY = auth.generate_key()
messages = st.one_of(
    st.tuples(st.just(wire.T_DATA), st.integers(1, 2**32 - 1), st.binary(max_size=2048)),
    st.tuples(st.just(wire.T_CLOSE), st.integers(1, 2**32 - 1),
              st.integers(0, 4).map(wire.REASON.pack)),
    st.tuples(st.just(wire.T_KEEPALIVE), st.just(0),
              st.tuples(st.integers(0, 1), st.integers(0, 2**32 - 1),
                        st.integers(0, 2**32 - 1)).map(lambda t: wire.KEEPALIVE.pack(*t))),
    st.tuples(st.just(wire.T_BYE), st.just(0), st.integers(0, 4).map(wire.REASON.pack)),
)


@given(messages, st.sampled_from([KEY, None]))
def test_every_message_round_trips(message, psk):
    mine, theirs = pair(psk)
    mtype, tag, body = message
    assert receive(theirs, mine.seal(mtype, tag, body)) == (mtype, tag, body)
    assert receive(mine, theirs.seal(mtype, tag, body)) == (mtype, tag, body)


@given(messages, st.data())
def test_every_truncation_is_refused(message, data):
    mine, theirs = pair(KEY)
    msg = mine.seal(*message)
    cut = data.draw(st.integers(0, len(msg) - 1))
    assert receive(theirs, msg[:cut]) in REASONS


@given(messages, st.data())
def test_every_bit_flip_is_refused(message, data):
    mine, theirs = pair(KEY)
    msg = bytearray(mine.seal(*message))
    bit = data.draw(st.integers(0, len(msg) * 8 - 1))
    msg[bit // 8] ^= 1 << (bit % 8)
    assert receive(theirs, bytes(msg)) in REASONS


@given(messages)
def test_a_wrong_key_is_refused(message):
    mine, _ = pair(KEY)
    _, stranger = pair(auth.generate_key())
    msg = mine.seal(*message)
    stranger.local_id = mine.peer_id            # even naming the right session
    assert receive(stranger, msg) == reasons.R_MAC


@given(messages, st.integers(0, 255).filter(lambda v: v != wire.VERSION))
def test_a_wrong_version_is_refused(message, version):
    mine, theirs = pair(KEY)
    msg = bytearray(mine.seal(*message))
    msg[0] = version
    assert receive(theirs, bytes(msg)) == reasons.R_VERSION


def test_unknown_type_and_flags_are_refused():
    mine, theirs = pair(None)
    msg = bytearray(mine.seal(wire.T_DATA, 1, b"x"))
    msg[1] = 0x7f
    assert receive(theirs, bytes(msg)) == reasons.R_TYPE
    msg = bytearray(mine.seal(wire.T_DATA, 1, b"x"))
    msg[3] |= 0x80
    assert receive(theirs, bytes(msg)) == reasons.R_FLAGS


def test_a_missing_or_unexpected_mac_is_refused():
    keyed, keyed_peer = pair(KEY)
    plain, plain_peer = pair(None)
    keyed_peer.keyed = False                    # a receiver that expects no MAC
    assert receive(keyed_peer, keyed.seal(wire.T_DATA, 1, b"x")) == reasons.R_KEYED
    plain_peer.keyed = True                     # a receiver that expects a MAC
    assert receive(plain_peer, plain.seal(wire.T_DATA, 1, b"x" * 40)) == reasons.R_KEYED


def test_replays_are_refused_and_counted():
    mine, theirs = pair(KEY)
    msg = mine.seal(wire.T_DATA, 5, b"once")
    assert receive(theirs, msg) == (wire.T_DATA, 5, b"once")
    assert receive(theirs, msg) == reasons.R_REPLAY


@given(st.permutations(range(1, 300)))
def test_reordering_within_the_window_is_accepted_once(order):
    mine, theirs = pair(KEY)
    theirs.window = auth.ReplayWindow()         # forget the handshake's first message
    mine.send_nonce = 0
    sealed = [mine.seal(wire.T_DATA, 1, n.to_bytes(2, "big")) for n in range(1, 300)]
    for n in order:
        assert receive(theirs, sealed[n - 1])[2] == n.to_bytes(2, "big")
    for n in order[:20]:
        assert receive(theirs, sealed[n - 1]) == reasons.R_REPLAY


def test_a_nonce_behind_the_window_is_refused():
    mine, theirs = pair(KEY)
    old = mine.seal(wire.T_DATA, 1, b"late")
    mine.send_nonce += auth.WINDOW
    assert receive(theirs, mine.seal(wire.T_DATA, 1, b"new")) == (wire.T_DATA, 1, b"new")
    assert receive(theirs, old) == reasons.R_OLD


@settings(max_examples=300)
@given(st.lists(st.integers(0, 5000), max_size=300))
def test_replay_window_matches_a_model(nonces):
    window = auth.ReplayWindow()
    seen, top = set(), 0
    for n in nonces:
        expect = n != 0 and n not in seen and (n > top or top - n < auth.WINDOW)
        assert (window.check(n) is None) == expect
        if expect:
            window.accept(n)
            seen.add(n)
            top = max(top, n)


def test_sealing_in_place_equals_sealing_a_copy():
    mine, theirs = pair(KEY)
    buf = bytearray(200)
    buf[40 + wire.HEADER_SIZE:40 + wire.HEADER_SIZE + 5] = b"hello"
    size = mine.seal_into(buf, 40, 5, wire.T_DATA, 77)
    assert size == wire.HEADER_SIZE + 5 + wire.MAC_SIZE
    assert receive(theirs, bytes(buf[40:40 + size])) == (wire.T_DATA, 77, b"hello")


def test_a_datagram_too_large_for_any_carrier_is_refused():
    mine, theirs = pair(None)
    msg = mine.seal(wire.T_DATA, 1, bytes(wire.MAX_UDP_PAYLOAD + 1))
    assert receive(theirs, msg) == reasons.R_TOO_LARGE
    msg = mine.seal(wire.T_DATA, 1, bytes(wire.MAX_UDP_PAYLOAD))
    assert receive(theirs, msg)[0] == wire.T_DATA


# -- the handshake

def test_handshake_reports_the_observed_address():
    initiator, acceptor = Initiator(KEY, wire.ROLE_EXPOSE), Acceptor(KEY, [wire.ROLE_EXPOSE])
    welcome, _ = acceptor.hello(initiator.hello(), PEER, 0.0)
    assert initiator.welcome(welcome).observed == "192.0.2.1:5566"


def test_a_replayed_hello_is_refused():
    initiator, acceptor = Initiator(KEY, wire.ROLE_EXPOSE), Acceptor(KEY, [wire.ROLE_EXPOSE])
    hello = initiator.hello()
    acceptor.hello(hello, PEER, 0.0)
    with pytest.raises(Drop, match="replay"):
        acceptor.hello(hello, PEER, 1.0)


def test_a_replayed_welcome_is_refused():
    initiator, acceptor = Initiator(KEY, wire.ROLE_EXPOSE), Acceptor(KEY, [wire.ROLE_EXPOSE])
    welcome, _ = acceptor.hello(initiator.hello(), PEER, 0.0)
    initiator.welcome(welcome)
    with pytest.raises(Drop, match="unexpected"):
        initiator.welcome(welcome)


def test_hello_with_a_wrong_key_or_role_is_refused():
    acceptor = Acceptor(KEY, [wire.ROLE_EXPOSE])
    with pytest.raises(Drop, match="mac"):
        acceptor.hello(Initiator(auth.generate_key(), wire.ROLE_EXPOSE).hello(), PEER, 0.0)
    with pytest.raises(Drop, match="role"):
        acceptor.hello(Initiator(KEY, wire.ROLE_LINK).hello(), PEER, 0.0)
    assert not acceptor.pending


def test_pending_sessions_are_bounded_and_expire():
    acceptor = Acceptor(KEY, [wire.ROLE_EXPOSE], pending_max=4, pending_ttl=10.0)
    for now in range(10):
        acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), PEER, float(now))
    assert len(acceptor.pending) == 4
    acceptor.expire(100.0)
    assert not acceptor.pending


def test_a_forged_confirmation_leaves_the_pending_session():
    initiator, acceptor = Initiator(KEY, wire.ROLE_EXPOSE), Acceptor(KEY, [wire.ROLE_EXPOSE])
    welcome, pending = acceptor.hello(initiator.hello(), PEER, 0.0)
    forged = Session(1, pending.local_id, auth.generate_key(), None, wire.ROLE_EXPOSE)
    msg = forged.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    with pytest.raises(Drop, match="mac"):
        acceptor.confirm(pending.local_id, msg, 1)
    mine = initiator.welcome(welcome)
    msg = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    assert acceptor.confirm(pending.local_id, msg, 1) is pending


def test_stale_is_believed_only_for_the_current_session_and_a_recent_nonce():
    mine, theirs = pair(KEY)
    initiator = Initiator(KEY, wire.ROLE_EXPOSE)
    restarted = Acceptor(KEY, [wire.ROLE_EXPOSE], responder_name(KEY, "tunnel"))
    mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))   # the message STALE answers
    sid, nonce = mine.peer_id, mine.send_nonce
    assert initiator.stale(restarted.stale(sid, nonce), mine)
    with pytest.raises(Drop, match="unexpected"):
        initiator.stale(restarted.stale(sid + 1, nonce), mine)
    with pytest.raises(Drop, match="old"):
        initiator.stale(restarted.stale(sid, nonce + 1), mine)
    with pytest.raises(Drop, match="mac"):
        initiator.stale(Acceptor(auth.generate_key(), [1]).stale(sid, nonce), mine)


def test_a_stale_from_another_tunnel_that_shares_the_key_is_not_believed():
    """A stranger can get a STALE for any session id from any tunnel: sent to a tunnel
    that never had the session, the id and nonce of a captured message come back signed.
    The exposer believes only one keyed for the responder it registered with."""
    mine, _theirs = pair(KEY)
    initiator = Initiator(KEY, wire.ROLE_EXPOSE)
    mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    other_tunnel = Acceptor(KEY, [wire.ROLE_EXPOSE], responder_name(KEY, "other"))
    with pytest.raises(Drop, match="mac"):
        initiator.stale(other_tunnel.stale(mine.peer_id, mine.send_nonce), mine)


def test_unknown_sessions_get_a_stale_no_larger_and_rate_limited_per_source():
    acceptor = Acceptor(KEY, [wire.ROLE_EXPOSE], responder_name(KEY, "tunnel"))
    mine, _ = pair(KEY)
    msg = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    (stale,) = acceptor.answer_unknown(msg, mine.peer_id, mine.send_nonce, PEER, 0.0)
    assert len(stale) <= len(msg)
    assert acceptor.answer_unknown(msg[:-1], 7, 1, ELSEWHERE, 0.0) == []        # smaller
    assert acceptor.answer_unknown(msg, 0, 1, ELSEWHERE, 0.0) == []             # session 0
    answered = sum(acceptor.answer_unknown(msg, 7, 1, PEER, 0.0) != [] for _ in range(50))
    assert answered < 5                     # one source gets a few a second
    assert acceptor.answer_unknown(msg, 7, 1, ELSEWHERE, 0.0) != []


NEW_KEY = auth.generate_key()


def rotating(name="tunnel"):
    """A tunnel's acceptor half-way through a key rotation: NEW_KEY, and KEY before it."""
    return Acceptor(NEW_KEY, [wire.ROLE_EXPOSE], responder_name(NEW_KEY, name),
                    previous=KEY, previous_responder=responder_name(KEY, name))


def test_a_previous_key_is_still_answered_under_itself_during_a_rotation():
    acceptor = rotating()
    for key in (KEY, NEW_KEY):              # an initiator with either key gets a session
        initiator = Initiator(key, wire.ROLE_EXPOSE)
        welcome, pending = acceptor.hello(initiator.hello(), PEER, 1.0)
        mine = initiator.welcome(welcome)
        confirm = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
        theirs = acceptor.confirm(pending.local_id, confirm, 1)
        reply = theirs.seal(wire.T_DATA, 3, b"both ways")
        assert mine.open(reply, 1) is not None
    with pytest.raises(Drop, match="mac"):  # a third key is still nobody's
        acceptor.hello(Initiator(auth.generate_key(), wire.ROLE_EXPOSE).hello(), PEER, 1.0)


def test_a_hello_under_the_previous_key_replayed_is_refused_and_so_is_it_once_dropped():
    acceptor = rotating()
    hello = Initiator(KEY, wire.ROLE_EXPOSE).hello()
    acceptor.hello(hello, PEER, 1.0)
    with pytest.raises(Drop, match="replay"):      # captured and sent again, elsewhere
        acceptor.hello(hello, ELSEWHERE, 2.0)
    rotated = Acceptor(NEW_KEY, [wire.ROLE_EXPOSE], responder_name(NEW_KEY, "tunnel"))
    with pytest.raises(Drop, match="mac"):         # the rotation is over: no longer a key
        rotated.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), PEER, 3.0)


def test_an_initiator_with_the_previous_key_believes_the_stale_it_is_sent():
    before = Acceptor(KEY, [wire.ROLE_EXPOSE], responder_name(KEY, "tunnel"))
    initiator = Initiator(KEY, wire.ROLE_EXPOSE)
    welcome, _pending = before.hello(initiator.hello(), PEER, 0.0)
    mine = initiator.welcome(welcome)
    msg = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    # The tunnel restarted with the new key and the old one as previous: of the two
    # STALEs, the old key's is the one this initiator can check, and it does.
    stales = rotating().answer_unknown(msg, mine.peer_id, mine.send_nonce, PEER, 0.0)
    assert len(stales) == 2 and all(len(stale) <= len(msg) for stale in stales)
    believed = []
    for stale in stales:
        try:
            believed.append(initiator.stale(stale, mine))
        except Drop:
            pass
    assert believed == [True]


def test_pending_sessions_of_one_source_do_not_push_out_anothers():
    acceptor = Acceptor(KEY, [wire.ROLE_EXPOSE], pending_max=16)
    _welcome, theirs = acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), PEER, 0.0)
    for now in range(40):
        acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), ELSEWHERE, now / 4)
    assert theirs.local_id in acceptor.pending
    assert len(acceptor.pending) == 1 + PENDING_PER_SOURCE


def test_one_source_cannot_spend_the_hello_answers_of_another():
    acceptor = Acceptor(KEY, [wire.ROLE_EXPOSE])
    refused = 0
    for _ in range(50):
        try:
            acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), ELSEWHERE, 1.0)
        except Drop as exc:
            assert exc.reason == "hello-rate"
            refused += 1
    assert refused > 40
    acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), PEER, 1.0)


def test_no_handshake_message_is_larger_than_what_it_answers():
    initiator, acceptor = Initiator(KEY, wire.ROLE_EXPOSE), Acceptor(KEY, [wire.ROLE_EXPOSE])
    hello = initiator.hello()
    welcome, _ = acceptor.hello(hello, PEER, 0.0)
    assert len(welcome) <= len(hello)
    mine, _ = pair(KEY)
    keepalive = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 0))
    assert len(acceptor.stale(1, 1)) <= len(keepalive)


# -- the TCP carrier's framing

@given(st.lists(st.binary(min_size=wire.HEADER_SIZE, max_size=3000), max_size=20), st.data())
def test_deframer_cuts_any_split_of_the_stream_into_the_messages(msgs, data):
    stream = b"".join(wire.frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    deframer, got, start = wire.Deframer(), [], 0
    for cut in cuts + [len(stream)]:
        deframer.feed(stream[start:cut])
        start = cut
        got.extend(deframer.messages())
    assert got == msgs
    assert deframer.pending() == 0


@pytest.mark.parametrize("size, reason", [(3, reasons.R_SHORT), (wire.MAX_FRAME + 1, reasons.R_TOO_LARGE)])
def test_deframer_refuses_impossible_lengths(size, reason):
    deframer = wire.Deframer()
    deframer.feed(wire.FRAME.pack(size) + b"GET / HTTP/1.0\r\n")
    with pytest.raises(wire.Malformed, match=reason):
        list(deframer.messages())


def test_unauthentic_hellos_do_not_spend_the_answer_allowance():
    acceptor = Acceptor(KEY, [wire.ROLE_EXPOSE], hello_rate=2)
    for _ in range(10):
        with pytest.raises(Drop, match="mac"):
            acceptor.hello(Initiator(auth.generate_key(), wire.ROLE_EXPOSE).hello(), PEER, 5.0)
    for _ in range(2):
        acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), PEER, 5.0)
    with pytest.raises(Drop, match="hello-rate"):
        acceptor.hello(Initiator(KEY, wire.ROLE_EXPOSE).hello(), PEER, 5.0)


def test_welcome_carries_the_responders_epoch():
    initiator, acceptor = Initiator(KEY, wire.ROLE_EXPOSE), Acceptor(KEY, [wire.ROLE_EXPOSE])
    welcome, pending = acceptor.hello(initiator.hello(), PEER, 0.0, epoch=0xDEADBEEF12)
    assert initiator.welcome(welcome).epoch == pending.epoch == 0xDEADBEEF12


# -- moving a session to a new address

def moved_pair():
    mine, theirs = pair(KEY)
    theirs.peer = PEER
    return mine, theirs


def arrive(session, msg, key, now=0.0):
    """What the receiver's session does with an authentic msg from key."""
    _t, _sid, _tag, nonce = wire.parse_header(msg, session.keyed)
    session.open(msg, nonce)
    return session.from_address(key, msg, now)


def answer(mine, challenge):
    flags, stamp, _echo = wire.KEEPALIVE.unpack_from(challenge, wire.HEADER_SIZE)
    assert flags & wire.KEEPALIVE_REPLY
    return mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, stamp))


def test_a_session_moves_only_once_the_new_address_answers_its_challenge():
    mine, theirs = moved_pair()
    moved, challenge = arrive(theirs, mine.seal(wire.T_DATA, 1, b"x" * 40), ELSEWHERE)
    assert not moved and theirs.peer == PEER and challenge is not None
    assert len(challenge) == challenge_size(True)
    moved, _ = arrive(theirs, answer(mine, challenge), ELSEWHERE, 0.01)
    assert moved and theirs.peer == ELSEWHERE


def test_a_raced_message_from_a_strangers_address_moves_nothing():
    """An attacker who got a fresh message to the receiver first, from its own address:
    the message is genuine, the address is not.  The challenge goes to the attacker, and
    the true peer's answer (to a challenge it never saw, or from its own address) moves
    nothing."""
    mine, theirs = moved_pair()
    captured = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(1, 5, 0))
    moved, challenge = arrive(theirs, captured, ELSEWHERE)
    assert not moved and challenge is not None
    # The true peer answers from where it is: no move, and no move to the stranger.
    moved, _ = arrive(theirs, answer(mine, challenge), PEER, 0.01)
    assert not moved and theirs.peer == PEER
    # A reply that echoes something else, from the stranger's address: no move.
    wrong = mine.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 0, 12345))
    moved, _ = arrive(theirs, wrong, ELSEWHERE, 0.02)
    assert not moved and theirs.peer == PEER


def test_a_candidate_is_sent_no_more_than_it_sent():
    mine, theirs = moved_pair()
    sent = received = 0
    for n in range(40):
        msg = mine.seal(wire.T_DATA, 1, b"")            # 36 bytes: less than a challenge
        received += len(msg)
        _moved, challenge = arrive(theirs, msg, ELSEWHERE, n * CHALLENGE_EVERY)
        sent += len(challenge or b"")
    assert 0 < sent <= received


def test_challenges_to_a_candidate_are_paced():
    mine, theirs = moved_pair()
    challenges = [arrive(theirs, mine.seal(wire.T_DATA, 1, b"x" * 100), ELSEWHERE, n / 1000)[1]
                  for n in range(100)]
    assert sum(c is not None for c in challenges) == 1
