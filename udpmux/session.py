"""Sessions between two agents: the handshake that starts one, sealing and opening its
messages, and the rules that say when a message may change where an agent sends.
Pure code: bytes and time in, bytes, a decision or a counted reason out.

The handshake (HELLO and WELCOME carry a MAC under the handshake key when keyed)::

    initiator                                              responder
      HELLO   session=0  (id_i, random_i, role)  ------------->
                                                  (a pending session, bounded, expires)
              <--------  WELCOME  session=id_i  (id_r, random_i, random_r, your address,
                                                 epoch, responder)
      any message under the session keys, session=id_r  ----->
                                                  (the pending session is confirmed)

Both ends derive the session keys from the PSK, the two ids and the two randoms, so
a replayed HELLO yields a session that nobody but the true initiator can use, and a
replayed WELCOME echoes a random the initiator no longer waits for.  A HELLO changes
nothing at the responder but a bounded table of pending sessions, and the WELCOME it
gets is no larger than itself.  Every message after the handshake carries the sender's
nonce counter and is checked against the receiver's replay window.

Freshness is not enough to move a session to a new source address: an attacker who
races a captured message to the receiver makes it fresh from the wrong address.  So a
new address is only a candidate (PathCheck): it is sent a challenge, a KEEPALIVE that
asks for a reply with a random stamp, and the session moves when an authentic, fresh
reply echoing that stamp comes from that address (QUIC's path validation).  What a
candidate is sent never exceeds what it sent.

A responder that restarted knows no session.  When it receives a message for a session
id it does not know, it may answer STALE, naming the id and the nonce it saw, under a
key derived from the responder's name (the 8-byte responder field of WELCOME, the same
after every restart of that responder and different for every other one), so a STALE
cannot be had from another relay's tunnel that shares the key.  The initiator believes
it only for its current session and a nonce it sent recently, and starts again.

How we name things:
  initiator  the end that sends HELLO (exposer, link client, uot client)
  responder  the end that answers with WELCOME (relay, link server, uot server)
  pending    a session the responder has welcomed but not yet heard from
  peer       the other end's address, as a peer key (see addr.py)
  source     what per-source limits count by: an IPv4 address or an IPv6 /64
  candidate  a new address a session's peer sent from, not yet proven
"""

import hashlib
import hmac
import os
import socket
import struct
from collections import OrderedDict

from udpmux import auth
from udpmux.auth import ReplayWindow
from udpmux.limits import PerSource, TokenBucket, source_of
from udpmux.reasons import (
    R_HELLO_RATE, R_MAC, R_OLD, R_REPLAY, R_ROLE, R_SESSION, R_UNEXPECTED,
)
from udpmux.auth import WINDOW
from udpmux.wire import (
    FLAG_KEYED, HEADER, HEADER_SIZE, HELLO, KEEPALIVE, KEEPALIVE_REPLY, MAC_SIZE, RANDOM_SIZE,
    RESPONDER_SIZE, STALE, T_DATA, T_HELLO, T_KEEPALIVE, T_STALE, T_WELCOME, VERSION,
    WELCOME, Malformed, body_of, parse_header,
)

PENDING_MAX = 64                # welcomed sessions awaiting their first message
PENDING_PER_SOURCE = 4          # ... of which from one source
HELLO_RATE = 100.0              # HELLOs answered per second (after they authenticate)
HELLO_RATE_PER_SOURCE = 5.0     # ... from one source
PENDING_TTL = 10.0              # seconds a pending session waits
HELLO_MEMORY = 4096             # HELLO randoms remembered, so a replayed HELLO is refused
SOURCES_TRACKED = 4096          # sources whose HELLO and STALE rates are tracked at once
STALE_RATE = 20.0               # STALE answers per second
STALE_RATE_PER_SOURCE = 2.0     # ... to one source
CHALLENGE_EVERY = 0.2           # seconds before a challenge to a candidate is repeated

_ID = struct.Struct("!I")
_STAMP = struct.Struct("!I")


class Drop(Exception):
    """A message that is dropped; .reason is the counted reason."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def new_id(taken=()):
    """A random nonzero 32-bit session id not in `taken`."""
    while True:
        (sid,) = _ID.unpack(os.urandom(4))
        if sid and sid not in taken:
            return sid


def challenge_size(keyed):
    """The bytes of a path challenge: a KEEPALIVE."""
    return HEADER_SIZE + KEEPALIVE.size + (MAC_SIZE if keyed else 0)


def responder_name(psk, name):
    """The responder field of a responder that must be the same after a restart (a
    relay's tunnel: derived from its name), and different for every other name."""
    if psk is None:
        return bytes(RESPONDER_SIZE)
    return auth.derive(psk, b"responder " + name.encode())[:RESPONDER_SIZE]


def observed_fields(peer):
    """WELCOME's address fields (family 4|6, port, 16-byte address) for a peer key."""
    if len(peer) == 16:
        return 4, int.from_bytes(peer[2:4], "big"), peer[4:8].ljust(16, b"\0")
    return 6, int.from_bytes(peer[2:4], "big"), peer[8:24]


def observed_text(family, port, address):
    if family == 4:
        return f"{socket.inet_ntop(socket.AF_INET, address[:4])}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, address)}]:{port}"


class Session:
    """One established session, at either end: keys, nonce counter, replay window."""

    __slots__ = ("local_id", "peer_id", "keyed", "flags", "send_key", "recv_key",
                 "send_nonce", "window", "peer", "role", "observed", "confirmed", "epoch",
                 "responder", "path", "send_mac", "recv_mac")

    def __init__(self, local_id, peer_id, send_key, recv_key, role, peer=None):
        self.local_id = local_id
        self.peer_id = peer_id
        self.keyed = send_key is not None
        self.flags = FLAG_KEYED if self.keyed else 0
        self.send_key = send_key
        self.recv_key = recv_key
        self.send_nonce = 0
        self.window = ReplayWindow()
        self.peer = peer
        self.role = role
        self.observed = None            # initiator: its address as the responder saw it
        self.confirmed = False          # responder: heard from the initiator since WELCOME
        self.epoch = 0                  # the responder's flow-table epoch (see WELCOME)
        self.responder = None           # initiator: the responder's name (see WELCOME)
        self.path = PathCheck()         # a new address of the peer, until it is proven
        # Keyed BLAKE2b states to copy(): cheaper than keying one for every message.
        self.send_mac = _keyed(send_key)
        self.recv_mac = _keyed(recv_key)

    @property
    def last_sent(self):
        """The nonce of the last message sealed (0: none yet)."""
        return self.send_nonce

    @property
    def received_top(self):
        """The highest nonce accepted from the peer."""
        return self.window.top

    def resume(self, sent, received):
        """Carry on from another process's use of this session: the next message sealed
        has a nonce above `sent`, and no nonce at or below `received` is accepted."""
        self.send_nonce = max(self.send_nonce, sent)
        self.window.refuse_through(received)

    def seal(self, mtype, tag, body=b""):
        """A whole message of this session."""
        self.send_nonce += 1
        msg = HEADER.pack(VERSION, mtype, self.flags, self.peer_id, tag, self.send_nonce) + body
        if self.keyed:
            return msg + auth.mac(self.send_key, msg)
        return msg

    def seal_into(self, buf, start, body_size, mtype, tag):
        """Seal in place: the body is already at buf[start + HEADER_SIZE:]; write the
        header before it and the MAC after it.  Returns the message's length."""
        self.send_nonce += 1
        HEADER.pack_into(buf, start, VERSION, mtype, self.flags, self.peer_id, tag,
                         self.send_nonce)
        end = start + HEADER_SIZE + body_size
        if self.keyed:
            buf[end:end + MAC_SIZE] = auth.mac(self.send_key, memoryview(buf)[start:end])
            end += MAC_SIZE
        return end - start

    def seal_batch(self, buf, view, starts, lengths, tags):
        """Seal DATA in place in a receive batch: datagram i is buf[starts[i]:starts[i] +
        lengths[i]], with HEADER_SIZE bytes of headroom before it and room for a MAC after
        it; its header goes into the headroom and its MAC after it.  starts and lengths
        become each message's start and size."""
        pack_into = HEADER.pack_into
        flags, peer_id, mac = self.flags, self.peer_id, self.send_mac
        nonce = self.send_nonce
        for i in range(len(starts)):
            end = starts[i] + lengths[i]
            start = starts[i] - HEADER_SIZE
            nonce += 1
            pack_into(buf, start, VERSION, T_DATA, flags, peer_id, tags[i], nonce)
            if mac is not None:
                h = mac.copy()
                h.update(view[start:end])
                buf[end:end + MAC_SIZE] = h.digest()
                end += MAC_SIZE
            starts[i] = start
            lengths[i] = end - start
        self.send_nonce = nonce

    def open_batch(self, view, starts, lengths, keys, n, drop):
        """Open in place the DATA messages of this session from its peer in a receive
        batch of n messages.  Returns a list with, for message i, its tag when it is one
        (authentic, fresh, now accepted: its body follows the header), -1 when its MAC
        failed (counted through drop(R_MAC)), and None for anything else, which the
        caller takes the slow way (another type, another address, a doubtful header)."""
        results = [None] * n
        unpack_from, compare = HEADER.unpack_from, hmac.compare_digest
        window, mac = self.window, self.recv_mac
        local_id, flags_ok, peer = self.local_id, self.flags, self.peer
        trailer = MAC_SIZE if mac is not None else 0
        shortest = HEADER_SIZE + trailer
        for i in range(n):
            start, length = starts[i], lengths[i]
            if length < shortest or keys[i] != peer:
                continue
            version, mtype, flags, sid, tag, nonce = unpack_from(view, start)
            top = window.top
            if version != VERSION or mtype != T_DATA or flags != flags_ok \
                    or sid != local_id or not nonce or nonce <= top - WINDOW \
                    or nonce <= top and window.bits >> (top - nonce) & 1:
                continue
            if mac is not None:
                end = start + length - MAC_SIZE
                h = mac.copy()
                h.update(view[start:end])
                if not compare(h.digest(), view[end:end + MAC_SIZE]):
                    drop(R_MAC)
                    results[i] = -1
                    continue
            window.accept(nonce)
            results[i] = tag
        return results

    def open(self, msg, nonce):
        """Authenticate a message addressed to this session (its header already parsed).

        Returns True when its nonce is the newest yet.  Raises Drop with the reason
        otherwise."""
        reason = self.window.check(nonce)
        if reason is not None:
            raise Drop(reason)
        if self.keyed and not auth.verify(self.recv_key, msg):
            raise Drop(R_MAC)
        newest = nonce > self.window.top
        self.window.accept(nonce)
        return newest

    def from_address(self, key, msg, now):
        """After open(): the message came from `key`.  Returns (moved, challenge): moved
        is True when key is now the session's peer because it answered our challenge
        (msg is a KEEPALIVE reply echoing it); challenge is a message to send to key
        (a path challenge), or None.  The caller sends challenge to key, not to the peer."""
        if key == self.peer:
            return False, None
        path = self.path
        if msg[1] == T_KEEPALIVE and path.answers(key, msg):
            self.peer = key
            self.path = PathCheck()
            return True, None
        return False, path.challenge(self, key, len(msg), now)


def _keyed(key):
    return None if key is None else hashlib.blake2b(key=key, digest_size=MAC_SIZE)


class PathCheck:
    """A session's candidate address: what it sent, the challenge it was sent.

    A candidate is sent at most as many bytes as it sent (so a raced, replayed message
    from a stranger's address gets no more back than it carried), and a challenge at
    most every CHALLENGE_EVERY seconds.  A message from another address makes that one
    the candidate instead."""

    __slots__ = ("candidate", "stamp", "credit", "sent_at")

    def __init__(self):
        self.candidate = None
        self.stamp = 0
        self.credit = 0
        self.sent_at = None

    def challenge(self, session, key, size, now):
        if key != self.candidate:
            self.candidate = key
            self.stamp = 0
            while not self.stamp:
                (self.stamp,) = _STAMP.unpack(os.urandom(4))
            self.credit = 0
            self.sent_at = None
        self.credit += size
        if self.credit < challenge_size(session.keyed) \
                or self.sent_at is not None and now - self.sent_at < CHALLENGE_EVERY:
            return None
        msg = session.seal(T_KEEPALIVE, 0, KEEPALIVE.pack(KEEPALIVE_REPLY, self.stamp, 0))
        self.credit -= len(msg)
        self.sent_at = now
        return msg

    def spend(self, key, size):
        """True when `size` more bytes may go to candidate `key` before it answers: they
        are counted against what it sent."""
        if key != self.candidate or size > self.credit:
            return False
        self.credit -= size
        return True

    def answers(self, key, msg):
        """True when msg (an authentic KEEPALIVE from key) echoes our challenge to key."""
        if key != self.candidate or not self.stamp:
            return False
        flags, _stamp, echo = KEEPALIVE.unpack_from(msg, HEADER_SIZE)
        return not flags & KEEPALIVE_REPLY and echo == self.stamp


def _keys(psk, id_i, id_r, random_i, random_r):
    material = _ID.pack(id_i) + _ID.pack(id_r) + random_i + random_r
    return auth.derive(psk, b"i2r" + material), auth.derive(psk, b"r2i" + material)


def _stale_key(psk, responder):
    return auth.derive(psk, b"stale " + responder)


class _HandshakeKey:
    """MACs of HELLO, WELCOME and PUNCH (the handshake key) and of STALE (a responder's
    stale key), which no session key covers."""

    def __init__(self, psk):
        self.psk = psk
        self.keyed = psk is not None
        self.key = auth.derive(psk, b"handshake") if self.keyed else None

    def seal(self, mtype, session, body, key=None):
        msg = HEADER.pack(VERSION, mtype, FLAG_KEYED if self.keyed else 0, session, 0, 0) + body
        return msg + auth.mac(key or self.key, msg) if self.keyed else msg

    def open(self, msg, mtype, key=None):
        """Check a handshake message of the given type and return its body."""
        try:
            got, _session, _tag, _nonce = parse_header(msg, self.keyed)
        except Malformed as exc:
            raise Drop(exc.reason) from None
        if got != mtype:
            raise Drop(R_UNEXPECTED)
        if self.keyed and not auth.verify(key or self.key, msg):
            raise Drop(R_MAC)
        return body_of(msg, self.keyed)


class Initiator(_HandshakeKey):
    """The end that starts sessions: builds HELLO, turns WELCOME into a Session."""

    def __init__(self, psk, role):
        super().__init__(psk)
        self.role = role
        self.local_id = new_id()
        self.random = None
        self.stale_keys = {}            # responder -> its stale key

    def hello(self):
        """A HELLO with a fresh random; any earlier HELLO's WELCOME is no longer accepted."""
        self.random = os.urandom(RANDOM_SIZE)
        return self.seal(T_HELLO, 0, HELLO.pack(self.local_id, self.random, self.role))

    def welcome(self, msg):
        """The Session that a WELCOME establishes; Drop when it answers no HELLO of ours."""
        body = self.open(msg, T_WELCOME)
        id_r, random_i, random_r, family, port, address, epoch, responder = WELCOME.unpack(body)
        (session_field,) = _ID.unpack_from(msg, 4)
        if self.random is None or random_i != self.random or session_field != self.local_id:
            raise Drop(R_UNEXPECTED)
        self.random = None
        if self.keyed:
            k_i2r, k_r2i = _keys(self.psk, self.local_id, id_r, random_i, random_r)
        else:
            k_i2r = k_r2i = None
        session = Session(self.local_id, id_r, k_i2r, k_r2i, self.role)
        if family in (4, 6):
            session.observed = observed_text(family, port, address)
        session.epoch = epoch
        session.responder = responder
        # A later session gets a fresh id, so the responder can never confuse the two.
        self.local_id = new_id((self.local_id,))
        return session

    def stale(self, msg, session):
        """True when a STALE genuinely says the responder of `session` lost it."""
        if session is None:
            raise Drop(R_UNEXPECTED)
        key = None
        if self.keyed:
            key = self.stale_keys.get(session.responder)
            if key is None:
                self.stale_keys.clear()
                key = self.stale_keys[session.responder] = _stale_key(self.psk,
                                                                      session.responder)
        body = self.open(msg, T_STALE, key)
        unknown_id, nonce = STALE.unpack(body)
        if unknown_id != session.peer_id:
            raise Drop(R_UNEXPECTED)
        if not session.send_nonce - auth.WINDOW < nonce <= session.send_nonce:
            raise Drop(R_OLD)
        return True


class Acceptor(_HandshakeKey):
    """The end that answers HELLO: keeps pending sessions, bounded, until confirmed.

    `responder` is the name this responder gives in WELCOME and keys its STALE with:
    responder_name() for one that answers STALE after a restart, random otherwise.

    `previous` is a key being rotated out: a HELLO under it is still answered, under it,
    and its sessions keyed from it (with `previous_responder` as their responder's name),
    and a STALE goes out under it as well as under the key, so that initiators that
    still have it lose nothing while they are given the new one.  Nothing else is ever
    sent with it."""

    def __init__(self, psk, roles, responder=None, pending_max=PENDING_MAX,
                 pending_ttl=PENDING_TTL, hello_rate=HELLO_RATE, previous=None,
                 previous_responder=None):
        super().__init__(psk)
        self.roles = frozenset(roles)
        self.responder = responder or os.urandom(RESPONDER_SIZE)
        self.stale_key = _stale_key(psk, self.responder) if self.keyed else None
        self.previous = None
        if previous is not None and self.keyed:
            self.previous = _HandshakeKey(previous)
            self.previous.responder = previous_responder or self.responder
            self.previous.stale_key = _stale_key(previous, self.previous.responder)
        self.answers = TokenBucket(hello_rate)
        self.answers_from = PerSource(min(hello_rate, HELLO_RATE_PER_SOURCE), SOURCES_TRACKED)
        self.stales = TokenBucket(STALE_RATE)
        self.stales_to = PerSource(STALE_RATE_PER_SOURCE, SOURCES_TRACKED)
        self.pending_max = pending_max
        self.pending_ttl = pending_ttl
        self.pending = OrderedDict()    # local id -> (Session, welcomed at), oldest first
        self.seen = OrderedDict()       # HELLO randoms seen, oldest first

    def hello(self, msg, peer, now, taken=(), epoch=0):
        """Answer a HELLO from peer: returns (WELCOME message, pending Session).

        Nothing changes but the pending table.  The rate of answers is limited only
        after the HELLO authenticated and proved new, so strangers cannot spend the
        allowance of the true initiator, and per source first, so that one source
        cannot spend the others'."""
        keys = self
        try:
            body = self.open(msg, T_HELLO)
        except Drop as exc:
            if exc.reason != R_MAC or self.previous is None:
                raise
            keys = self.previous
            body = keys.open(msg, T_HELLO)
        id_i, random_i, role = HELLO.unpack(body)
        if role not in self.roles:
            raise Drop(R_ROLE)
        if random_i in self.seen:
            raise Drop(R_REPLAY)
        self.seen[random_i] = None
        if len(self.seen) > HELLO_MEMORY:
            self.seen.popitem(last=False)
        source = source_of(peer)
        if not self.answers_from.take(source, now) or not self.answers.take(now):
            raise Drop(R_HELLO_RATE)
        self.expire(now)
        mine = [sid for sid, (s, _t) in self.pending.items() if source_of(s.peer) == source]
        if len(mine) >= PENDING_PER_SOURCE:
            del self.pending[mine[0]]
        while len(self.pending) >= self.pending_max:
            self.pending.popitem(last=False)
        id_r = new_id(set(taken) | self.pending.keys())
        random_r = os.urandom(RANDOM_SIZE)
        if self.keyed:
            k_i2r, k_r2i = _keys(keys.psk, id_i, id_r, random_i, random_r)
        else:
            k_i2r = k_r2i = None
        session = Session(id_r, id_i, k_r2i, k_i2r, role, peer)
        session.epoch = epoch
        session.responder = keys.responder
        self.pending[id_r] = (session, now)
        family, port, address = observed_fields(peer)
        welcome = keys.seal(T_WELCOME, id_i, WELCOME.pack(id_r, random_i, random_r, family,
                                                          port, address, epoch, keys.responder))
        return welcome, session

    def confirm(self, session_id, msg, nonce):
        """The pending session that msg (its header parsed) authenticates for, now confirmed
        and no longer pending.  Drop leaves the pending session as it was.  The session's
        peer is where the HELLO came from (where WELCOME went); a confirmation from
        elsewhere goes through Session.from_address() like any later message."""
        entry = self.pending.get(session_id)
        if entry is None:
            raise Drop(R_SESSION)
        session = entry[0]
        session.open(msg, nonce)
        del self.pending[session_id]
        session.confirmed = True
        return session

    def expire(self, now):
        while self.pending:
            _sid, (_session, since) = next(iter(self.pending.items()))
            if now - since < self.pending_ttl:
                break
            self.pending.popitem(last=False)

    def stale(self, unknown_id, nonce, session=None):
        """STALE for a message that named a session this responder does not know (or no
        longer trusts: `session`, under the key it was made with)."""
        if session is not None and self.previous is not None \
                and session.responder == self.previous.responder != self.responder:
            return self.previous.seal(T_STALE, 0, STALE.pack(unknown_id, nonce),
                                      self.previous.stale_key)
        return self.seal(T_STALE, 0, STALE.pack(unknown_id, nonce), self.stale_key)

    def answer_unknown(self, msg, sid, nonce, peer, now):
        """The STALEs to send to `peer` for a message that named a session id this
        responder does not know: one, and one more under a previous key; none for
        session 0, none larger than what they answer, and rate limited per source and in
        all."""
        if sid == 0 or len(msg) < HEADER_SIZE + STALE.size + (MAC_SIZE if self.keyed else 0):
            return []
        if not self.stales_to.take(source_of(peer), now) or not self.stales.take(now):
            return []
        stale = STALE.pack(sid, nonce)
        out = [self.seal(T_STALE, 0, stale, self.stale_key)]
        if self.previous is not None:   # the session may have been under the previous key
            out.append(self.previous.seal(T_STALE, 0, stale, self.previous.stale_key))
        return out
