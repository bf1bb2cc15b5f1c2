"""punch's probes and the proof of a path (probes.Prover), as pure functions: two
provers talk through lists, sockets are plain objects, and every time is given."""

import socket

import pytest

from udpmux import auth, wire
from udpmux.addr import peer_key
from udpmux.probes import (
    ANSWER_RATE, CHALLENGE_TTL, CHALLENGES_MAX, PROVEN_MAX, PROVEN_TTL, Prover, host_of,
)
from udpmux.reasons import R_ANSWER_RATE, R_MAC, R_UNEXPECTED
from udpmux.session import Drop, Initiator
from udpmux.wire import NO_RANDOM, PUNCH, T_PUNCH

KEY = auth.generate_key()
A = peer_key(socket.AF_INET, ("192.0.2.1", 4001))           # one end, as the other sees it
A_OTHER_PORT = peer_key(socket.AF_INET, ("192.0.2.1", 5999))  # its symmetric NAT's other port
B = peer_key(socket.AF_INET, ("198.51.100.7", 4002))        # the other end
STRANGER = peer_key(socket.AF_INET, ("203.0.113.5", 4001))
V6 = peer_key(socket.AF_INET6, ("2001:db8::1", 4003))
V6_OTHER_PORT = peer_key(socket.AF_INET6, ("2001:db8::1", 4004))


class End:
    """One agent's prover, sealing and opening PUNCH under the handshake key."""

    def __init__(self, key=KEY, now=0.0):
        self.keys = Initiator(key, wire.ROLE_PUNCH)
        self.prover = Prover(self.keys.seal, now)
        self.sock = object()            # the socket its probes leave from

    def probe(self, to, now):
        return self.prover.probe(self.sock, to, now)

    def receive(self, msg, frm, now, sock=None):
        """(reply, proven) for a PUNCH from `frm`; raises Drop."""
        body = self.keys.open(msg, T_PUNCH)
        return self.prover.received(body, self.sock if sock is None else sock, frm, now)


def fields(msg):
    """(challenge, echo) of a sealed PUNCH."""
    return PUNCH.unpack_from(msg, wire.HEADER_SIZE)


def plain():
    """A prover whose messages are the bare body: for counting, not for keys."""
    return Prover(lambda mtype, session, body: body)


def probe_body():
    return PUNCH.pack(b"c" * 16, NO_RANDOM)


def test_the_three_messages_prove_the_path_at_both_ends():
    a, b = End(), End()
    probe = a.probe(B, 0.0)
    answer, proven = b.receive(probe, A, 0.1)
    assert not proven and not b.prover.is_proven(A, 0.1)
    assert fields(answer)[1] == fields(probe)[0]        # it echoes a's challenge
    last, proven = a.receive(answer, B, 0.2)
    assert proven and a.prover.is_proven(B, 0.2)
    assert fields(last) == (NO_RANDOM, fields(answer)[0])   # no new challenge: no answer
    reply, proven = b.receive(last, A, 0.3)
    assert proven and reply is None and b.prover.is_proven(A, 0.3)


def test_a_probe_gets_one_answer_of_its_own_size_and_proves_nothing():
    a, b = End(), End()
    probe = a.probe(B, 0.0)
    for frm in (A, STRANGER, V6):                       # replayed from anywhere
        answer, proven = b.receive(probe, frm, 1.0)
        assert len(answer) == len(probe) and not proven
    assert not b.prover.proven
    assert len(b.prover.challenges) == 3                # its own challenges, nothing else


def test_a_probe_under_another_key_is_not_opened():
    probe = End(key=auth.generate_key()).probe(B, 0.0)
    with pytest.raises(Drop) as refused:
        End().receive(probe, A, 0.0)
    assert refused.value.reason == R_MAC


def test_an_answer_counts_from_the_host_it_was_sent_to_even_from_another_port():
    a, b = End(), End()
    answer, _ = b.receive(a.probe(A, 0.0), B, 0.1)
    _, proven = a.receive(answer, A_OTHER_PORT, 0.2)
    assert proven and a.prover.is_proven(A_OTHER_PORT, 0.2)
    assert not a.prover.is_proven(A, 0.2)


def test_an_answer_from_another_host_is_refused_and_the_true_one_still_counts():
    a, b = End(), End()
    answer, _ = b.receive(a.probe(B, 0.0), A, 0.1)
    with pytest.raises(Drop) as refused:
        a.receive(answer, STRANGER, 0.2)
    assert refused.value.reason == R_UNEXPECTED
    assert not a.prover.proven
    _, proven = a.receive(answer, B, 0.3)
    assert proven and list(a.prover.proven) == [B]


def test_an_answer_on_another_socket_than_the_probe_left_from_is_refused():
    a, b = End(), End()
    answer, _ = b.receive(a.probe(B, 0.0), A, 0.1)
    with pytest.raises(Drop) as refused:
        a.receive(answer, B, 0.2, sock=object())
    assert refused.value.reason == R_UNEXPECTED and not a.prover.proven


def test_an_answer_counts_within_the_challenges_ttl_and_not_after():
    a, b = End(), End()
    late, _ = b.receive(a.probe(B, 0.0), A, 0.0)
    in_time, _ = b.receive(a.probe(B, 100.0), A, 100.0)
    with pytest.raises(Drop) as refused:
        a.receive(late, B, CHALLENGE_TTL + 0.001)
    assert refused.value.reason == R_UNEXPECTED and not a.prover.proven
    _, proven = a.receive(in_time, B, 100.0 + CHALLENGE_TTL)
    assert proven


def test_a_proof_is_accepted_once_and_its_replay_from_anywhere_is_refused():
    a, b = End(), End()
    answer, _ = b.receive(a.probe(B, 0.0), A, 0.1)
    assert a.receive(answer, B, 0.2)[1]
    for frm in (B, STRANGER):
        with pytest.raises(Drop) as refused:
            a.receive(answer, frm, 0.3)
        assert refused.value.reason == R_UNEXPECTED
    assert list(a.prover.proven) == [B]


def test_a_punch_with_neither_challenge_nor_echo_is_refused():
    with pytest.raises(Drop) as refused:
        plain().received(PUNCH.pack(NO_RANDOM, NO_RANDOM), object(), A, 0.0)
    assert refused.value.reason == R_UNEXPECTED


def test_answers_are_limited_per_source_and_in_all():
    prover, sock = plain(), object()

    def answered(frm, now, tries):
        n = 0
        for _ in range(tries):
            try:
                prover.received(probe_body(), sock, frm, now)
                n += 1
            except Drop as exc:
                assert exc.reason == R_ANSWER_RATE
        return n

    assert answered(A, 0.0, ANSWER_RATE + 50) == ANSWER_RATE
    before = len(prover.challenges)
    assert answered(A_OTHER_PORT, 0.0, 10) == 0         # the same source: the same bucket
    assert answered(B, 0.0, 10) == 0                    # all sources: the whole allowance spent
    assert len(prover.challenges) == before             # a refused probe changes nothing
    assert answered(B, 0.5, ANSWER_RATE) == ANSWER_RATE // 2     # the rate comes back
    assert answered(A, 1.0, ANSWER_RATE) == ANSWER_RATE // 2


def test_challenges_remembered_are_bounded_and_the_oldest_go_first():
    a, b = End(), End()
    first, _ = b.receive(a.probe(B, 0.0), A, 0.0)
    for _ in range(CHALLENGES_MAX - 1):
        a.prover.probe(a.sock, B, 0.0)
    kept, _ = b.receive(a.probe(B, 0.0), A, 0.0)        # the one that pushes the first out
    assert len(a.prover.challenges) == CHALLENGES_MAX
    with pytest.raises(Drop):
        a.receive(first, B, 0.1)
    assert a.receive(kept, B, 0.1)[1]


def test_a_proof_lasts_proven_ttl_and_at_most_proven_max_paths_are_kept():
    prover = plain()
    prover.prove(A, 0.0)
    assert prover.is_proven(A, PROVEN_TTL) and not prover.is_proven(A, PROVEN_TTL + 0.001)
    hosts = [peer_key(socket.AF_INET, ("10.0.0.1", 1000 + i)) for i in range(PROVEN_MAX + 1)]
    for i, key in enumerate(hosts):
        prover.prove(key, 1.0 + i * 0.001)
    assert len(prover.proven) == PROVEN_MAX
    assert not prover.is_proven(hosts[0], 2.0) and prover.is_proven(hosts[-1], 2.0)


def test_the_host_of_a_peer_key_leaves_the_port_out():
    assert host_of(A) == socket.inet_aton("192.0.2.1") == host_of(A_OTHER_PORT)
    assert host_of(A) != host_of(B)
    address = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert host_of(V6) == address == host_of(V6_OTHER_PORT)
    assert host_of(V6) != host_of(peer_key(socket.AF_INET6, ("2001:db8::2", 4003)))
