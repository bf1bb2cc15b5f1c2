"""Sessions between two agents: the handshake that starts one, and sealing and
opening its messages.  Pure code: bytes in, bytes or a counted reason out.

The handshake (HELLO and WELCOME carry a MAC under the handshake key when keyed)::

    initiator                                              responder
      HELLO   session=0  (id_i, random_i, role)  ------------->
                                                  (a pending session, bounded, expires)
              <--------  WELCOME  session=id_i  (id_r, random_i, random_r, your address,
                                                 epoch)
      any message under the session keys, session=id_r  ----->
                                                  (the pending session is confirmed)

Both ends derive the session keys from the PSK, the two ids and the two randoms, so
a replayed HELLO yields a session that nobody but the true initiator can use, and a
replayed WELCOME echoes a random the initiator no longer waits for.  Every message
after the handshake carries the sender's nonce counter and is checked against the
receiver's replay window.  Only a message with the newest nonce yet may move a
session to a new source address (roaming).

A responder that restarted knows no session.  When it receives a message for a session
id it does not know, it may answer STALE (under the handshake key), naming the id and
the nonce it saw; the initiator believes it only for its current session and a nonce it
sent recently, and then starts a new handshake.

How we name things:
  initiator  the end that sends HELLO (exposer, link client, uot client)
  responder  the end that answers with WELCOME (relay, link server, uot server)
  pending    a session the responder has welcomed but not yet heard from
  peer       the other end's address, as a peer key (see addr.py)
"""

import os
import socket
import struct
from collections import OrderedDict

from udpmux import auth
from udpmux.auth import R_MAC, ReplayWindow
from udpmux.limits import TokenBucket
from udpmux.wire import (
    FLAG_KEYED, HEADER, HEADER_SIZE, HELLO, MAC_SIZE, RANDOM_SIZE, STALE, T_HELLO, T_STALE,
    T_WELCOME, VERSION, WELCOME, Malformed, body_of, parse_header,
)

R_ROLE = "role"                 # HELLO asks for a role this responder does not serve
R_UNEXPECTED = "unexpected"     # a handshake message nobody waits for
R_SESSION = "session"           # a session id this receiver does not know
R_HELLO_RATE = "hello-rate"     # an authentic HELLO beyond the answers allowed per second

PENDING_MAX = 16                # welcomed sessions awaiting their first message
HELLO_RATE = 20.0               # HELLOs answered per second (after they authenticate)
PENDING_TTL = 10.0              # seconds a pending session waits
HELLO_MEMORY = 4096             # HELLO randoms remembered, so a replayed HELLO is refused

_ID = struct.Struct("!I")


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
                 "send_nonce", "window", "peer", "role", "observed", "confirmed", "epoch")

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

    def open(self, msg, nonce):
        """Authenticate a message addressed to this session (its header already parsed).

        Returns True when its nonce is the newest yet: only such a message may move the
        session to a new address.  Raises Drop with the reason otherwise.
        """
        reason = self.window.check(nonce)
        if reason is not None:
            raise Drop(reason)
        if self.keyed and not auth.verify(self.recv_key, msg):
            raise Drop(R_MAC)
        newest = nonce > self.window.top
        self.window.accept(nonce)
        return newest


def _keys(psk, id_i, id_r, random_i, random_r):
    material = _ID.pack(id_i) + _ID.pack(id_r) + random_i + random_r
    return auth.derive(psk, b"i2r" + material), auth.derive(psk, b"r2i" + material)


class _HandshakeKey:
    """MACs of HELLO, WELCOME and STALE, which no session key covers yet."""

    def __init__(self, psk):
        self.psk = psk
        self.keyed = psk is not None
        self.key = auth.derive(psk, b"handshake") if self.keyed else None

    def seal(self, mtype, session, body):
        msg = HEADER.pack(VERSION, mtype, FLAG_KEYED if self.keyed else 0, session, 0, 0) + body
        return msg + auth.mac(self.key, msg) if self.keyed else msg

    def open(self, msg, mtype):
        """Check a handshake message of the given type and return its body."""
        try:
            got, _session, _tag, _nonce = parse_header(msg, self.keyed)
        except Malformed as exc:
            raise Drop(exc.reason) from None
        if got != mtype:
            raise Drop(R_UNEXPECTED)
        if self.keyed and not auth.verify(self.key, msg):
            raise Drop(R_MAC)
        return body_of(msg, self.keyed)


class Initiator(_HandshakeKey):
    """The end that starts sessions: builds HELLO, turns WELCOME into a Session."""

    def __init__(self, psk, role):
        super().__init__(psk)
        self.role = role
        self.local_id = new_id()
        self.random = None

    def hello(self):
        """A HELLO with a fresh random; any earlier HELLO's WELCOME is no longer accepted."""
        self.random = os.urandom(RANDOM_SIZE)
        return self.seal(T_HELLO, 0, HELLO.pack(self.local_id, self.random, self.role))

    def welcome(self, msg):
        """The Session that a WELCOME establishes; Drop when it answers no HELLO of ours."""
        body = self.open(msg, T_WELCOME)
        id_r, random_i, random_r, family, port, address, epoch = WELCOME.unpack(body)
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
        # A later session gets a fresh id, so the responder can never confuse the two.
        self.local_id = new_id((self.local_id,))
        return session

    def stale(self, msg, session):
        """True when a STALE genuinely says the responder lost `session`."""
        body = self.open(msg, T_STALE)
        unknown_id, nonce = STALE.unpack(body)
        if session is None or unknown_id != session.peer_id:
            raise Drop(R_UNEXPECTED)
        if not session.send_nonce - auth.WINDOW < nonce <= session.send_nonce:
            raise Drop(auth.R_OLD)
        return True


class Acceptor(_HandshakeKey):
    """The end that answers HELLO: keeps pending sessions, bounded, until confirmed."""

    def __init__(self, psk, roles, pending_max=PENDING_MAX, pending_ttl=PENDING_TTL,
                 hello_rate=HELLO_RATE):
        super().__init__(psk)
        self.roles = frozenset(roles)
        self.answers = TokenBucket(hello_rate)
        self.pending_max = pending_max
        self.pending_ttl = pending_ttl
        self.pending = OrderedDict()    # local id -> (Session, welcomed at)
        self.seen = OrderedDict()       # HELLO randoms seen, oldest first

    def hello(self, msg, peer, now, taken=(), epoch=0):
        """Answer a HELLO from peer: returns (WELCOME message, pending Session).

        The rate of answers is limited only after the HELLO authenticated and proved
        new, so strangers cannot spend the allowance of the true initiator."""
        body = self.open(msg, T_HELLO)
        id_i, random_i, role = HELLO.unpack(body)
        if role not in self.roles:
            raise Drop(R_ROLE)
        if random_i in self.seen:
            raise Drop(auth.R_REPLAY)
        self.seen[random_i] = None
        if len(self.seen) > HELLO_MEMORY:
            self.seen.popitem(last=False)
        if not self.answers.take(now):
            raise Drop(R_HELLO_RATE)
        self.expire(now)
        while len(self.pending) >= self.pending_max:
            self.pending.popitem(last=False)
        id_r = new_id(set(taken) | self.pending.keys())
        random_r = os.urandom(RANDOM_SIZE)
        if self.keyed:
            k_i2r, k_r2i = _keys(self.psk, id_i, id_r, random_i, random_r)
        else:
            k_i2r = k_r2i = None
        session = Session(id_r, id_i, k_r2i, k_i2r, role, peer)
        session.epoch = epoch
        self.pending[id_r] = (session, now)
        family, port, address = observed_fields(peer)
        welcome = self.seal(T_WELCOME, id_i,
                            WELCOME.pack(id_r, random_i, random_r, family, port, address, epoch))
        return welcome, session

    def confirm(self, session_id, msg, nonce):
        """The pending session that msg (its header parsed) authenticates for, now confirmed
        and no longer pending.  Drop leaves the pending session as it was."""
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

    def stale(self, unknown_id, nonce):
        """STALE for a message that named a session this responder does not know."""
        return self.seal(T_STALE, 0, STALE.pack(unknown_id, nonce))


def stale_of(msg):
    """(session id, nonce) of a message, for answering it with STALE."""
    _v, _t, _f, session, _tag, nonce = HEADER.unpack_from(msg)
    return session, nonce
