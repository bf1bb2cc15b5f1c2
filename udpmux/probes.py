"""PUNCH probes and the proof of a path, for `udpmux punch`.  Pure: messages, sockets
(as opaque objects), peer keys and time in; messages to send and decisions out.

A path is proven, never assumed: each probe carries a fresh challenge, and a path counts
only when an answer echoing a challenge we sent in this attempt comes back from the host
we sent it to (its port may differ behind a symmetric NAT) on the socket it left from::

    A -- PUNCH(challenge a, echo -) -->  B      B answers any probe once, no larger,
    A <-- PUNCH(challenge b, echo a) --  B      and changes nothing but its challenges
    A -- PUNCH(challenge -, echo b)  -->  B      A has proven the path; now B has too

A probe replayed from anywhere gets one answer of its own size and moves nothing; an old
answer echoes a challenge nobody waits for.

How we name things:
  challenge  the random a PUNCH carries for the other end to echo
  proven     an address a challenge was answered from, for PROVEN_TTL seconds
"""

import os
from collections import OrderedDict

from udpmux.addr import SOCKADDR_IN_LEN
from udpmux.limits import PerSource, TokenBucket, source_of
from udpmux.reasons import R_ANSWER_RATE, R_UNEXPECTED
from udpmux.session import Drop
from udpmux.wire import NO_RANDOM, PUNCH, RANDOM_SIZE, T_PUNCH

PUNCH_TIMEOUT = 5.0             # seconds an attempt lasts
PROBE_RATE = 2000               # birthday probes a second at most
CHALLENGES_MAX = 8192           # challenges of our probes remembered until answered
CHALLENGE_TTL = 2 * PUNCH_TIMEOUT   # seconds an answer to a challenge is accepted
PROVEN_MAX = 64                 # proven paths remembered (the forward side answers HELLO there)
PROVEN_TTL = 60.0               # seconds a proven path stays proven without a session
ANSWER_RATE = 2 * PROBE_RATE    # probes answered a second in all, and from one source


def host_of(key):
    """The host part of a peer key: the IPv4 or IPv6 address, without the port."""
    return key[4:8] if len(key) == SOCKADDR_IN_LEN else key[8:24]


class Prover:
    """Our probes' challenges, the answers to others' probes, and the paths proven.

    `seal(mtype, session, body)` makes a message under the handshake key (the
    session.Initiator of the agent)."""

    def __init__(self, seal, now=0.0):
        self.seal = seal
        self.challenges = OrderedDict()     # challenge -> (socket, sent to, sent at)
        self.proven = OrderedDict()         # peer key -> when a challenge proved it
        self.answers = TokenBucket(ANSWER_RATE, now=now)
        self.answers_to = PerSource(ANSWER_RATE, 1024)

    def probe(self, sock, to, now, echo=NO_RANDOM, challenge=True):
        """A PUNCH to send to `to` from `sock`: with a fresh challenge, remembered until
        answered, and echoing `echo`."""
        mine = NO_RANDOM
        if challenge:
            while mine == NO_RANDOM:
                mine = os.urandom(RANDOM_SIZE)
            self.challenges[mine] = (sock, to, now)
            if len(self.challenges) > CHALLENGES_MAX:
                self.challenges.popitem(last=False)
        return self.seal(T_PUNCH, 0, PUNCH.pack(mine, echo))

    def received(self, body, sock, key, now):
        """A PUNCH's body (it verified) from `key` on `sock`.  Returns (reply, proven):
        the PUNCH to send back to key from sock, or None; proven is True when this
        answer proves the path.  Raises Drop with the reason to count."""
        challenge, echo = PUNCH.unpack(body)
        if echo == NO_RANDOM:
            if challenge == NO_RANDOM:
                raise Drop(R_UNEXPECTED)
            # A probe, perhaps replayed: one answer of its size, and nothing else changes.
            if not self.answers_to.take(source_of(key), now) or not self.answers.take(now):
                raise Drop(R_ANSWER_RATE)
            return self.probe(sock, key, now, echo=challenge), False
        sent = self.challenges.get(echo)
        if sent is None or sent[0] is not sock or host_of(sent[1]) != host_of(key) \
                or now - sent[2] > CHALLENGE_TTL:
            raise Drop(R_UNEXPECTED)        # late, replayed, or not where we asked
        del self.challenges[echo]
        self.prove(key, now)
        reply = None
        if challenge != NO_RANDOM:          # the other end proves the path with this
            reply = self.probe(sock, key, now, echo=challenge, challenge=False)
        return reply, True

    def prove(self, key, now):
        self.proven[key] = now
        self.proven.move_to_end(key)
        while len(self.proven) > PROVEN_MAX or \
                now - next(iter(self.proven.values())) > PROVEN_TTL:
            self.proven.popitem(last=False)

    def is_proven(self, key, now):
        when = self.proven.get(key)
        return when is not None and now - when <= PROVEN_TTL
