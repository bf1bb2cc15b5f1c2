"""Session endpoints: what the responding end and the initiating end of a session do
with each message and at each moment, the same for every mode.  Pure: bytes, addresses
and time in; what to send, what happened and what to deliver out.  The modes do the
I/O, and act on what is delivered (DATA, CLOSE, STREAM, RENDEZVOUS, ...).

    Initiator                                      Responder, per session
      IDLE --start()--> HELLO --WELCOME--> UP        HELLO --> pending (session.Acceptor)
                          ^  (repeated, back-off)    |      first authentic message
                          |                          |        --> confirmed: NEW (replaces
                          +--- STALE, BYE, silence --+            the one before, if single)
                                                              BYE --> ENDED

Every rule about freshness and addresses lives in session.py and is applied here: a
message changes nothing unless it authenticates with a fresh nonce; a peer moves only
once its new address answered a challenge (MOVED); a STALE is believed only under the
responder's stale key, for the current session and a nonce sent lately; a responder's
answers to strangers (WELCOME, STALE) are never larger than what they answer.

Timing, one set for every mode (a mode may give its own keepalive):
  KEEPALIVE       a keepalive after this long without sending or hearing anything (25 s:
                  below the 30 s a NAT commonly keeps a UDP mapping)
  dead_after()    a session silent for twice the keepalive and 5 s more is gone
  HELLO_FIRST     a HELLO is repeated after this long, then at doubling intervals up to
                  the keepalive, HELLO_MOST at most

How we name things:
  received   what receive() decided about one message (Received)
  replies    messages to send now, each with the address to send it to (None: the peer)
  event      NEW, MOVED, ENDED or LOST, with `old` the session or address before
"""

from udpmux.reasons import R_SESSION
from udpmux.session import Acceptor, Drop, Initiator as Handshake, responder_name
from udpmux.wire import (
    HEADER_SIZE, KEEPALIVE, KEEPALIVE_REPLY, T_BYE, T_HELLO, T_KEEPALIVE, T_STALE,
    T_WELCOME, Malformed, parse_header,
)

KEEPALIVE_EVERY = 25.0
HELLO_FIRST = 0.5
HELLO_MOST = 8.0

# Initiator states
IDLE = "idle"                   # not started, or stopped
HELLO = "hello"                 # sending HELLO until a WELCOME comes
UP = "up"                       # the session is established

# Events
NEW = "new"                     # a session began (old: the one it replaced, or None)
MOVED = "moved"                 # the session's peer moved (old: its address before)
ENDED = "ended"                 # the peer said BYE; the session is over
LOST = "lost"                   # initiator: the session is gone (STALE, BYE, silence)
KEEPALIVE_DUE = "keepalive"     # liveness(): time for a keepalive


def dead_after(keepalive):
    """Seconds without an authentic message after which a session is gone."""
    return 2 * keepalive + 5


def liveness(now, sent, heard, keepalive, dead=None):
    """What an idle session needs now: LOST when nothing was heard for `dead` seconds
    (dead_after() by default), KEEPALIVE_DUE when nothing was sent or heard for a
    keepalive interval, else None."""
    if now - heard > (dead_after(keepalive) if dead is None else dead):
        return LOST
    if now - sent >= keepalive or now - heard >= keepalive:
        return KEEPALIVE_DUE
    return None


def keepalive_body(now, reply=True, size=KEEPALIVE.size):
    """A KEEPALIVE's body: REPLY asked for, the stamp our clock in milliseconds, and zero
    padding up to `size` bytes."""
    body = KEEPALIVE.pack(KEEPALIVE_REPLY if reply else 0, int(now * 1000) & 0xFFFFFFFF, 0)
    return body + bytes(size - len(body)) if size > len(body) else body


class Received:
    """What an endpoint decided about one message: delivered to `session` when there is
    one and no `reason`; a drop when `reason` is set."""

    __slots__ = ("session", "mtype", "tag", "nonce", "event", "old", "replies", "reason")

    def __init__(self):
        self.session = None
        self.mtype = self.tag = self.nonce = 0
        self.event = self.old = self.reason = None
        self.replies = []

    def drop(self, reason):
        self.reason = reason
        return self

    def settle(self, send, drop, to=None):
        """Send the replies (send(msg, address): to, or where the endpoint says) and
        count a drop; True when the message goes on to the mode."""
        for reply, where in self.replies:
            send(reply, to or where)
        if self.reason is not None:
            drop(self.reason)
            return False
        return True

    @classmethod
    def of(cls, msg, keyed):
        """(a Received with msg's header, its session id), or (a drop, None) when the
        header is malformed."""
        out = cls()
        try:
            mtype, sid, tag, nonce = parse_header(msg, keyed)
        except Malformed as exc:
            return out.drop(exc.reason), None
        out.mtype, out.tag, out.nonce = mtype, tag, nonce
        return out, sid


def _answer_keepalive(session, msg, out, to):
    """A KEEPALIVE that asks for a reply gets one, with its stamp in the echo."""
    flags, stamp, _echo = KEEPALIVE.unpack_from(msg, HEADER_SIZE)
    if flags & KEEPALIVE_REPLY:
        out.replies.append((session.seal(T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, stamp)), to))


class Responder:
    """The responding end: answers HELLO, confirms pending sessions, opens every message
    of its sessions and follows their peers.

    `single`: one session at a time, a new one replacing it (a relay tunnel's exposer,
    link-server, punch's forward side), or any number (a rendezvous tunnel).  `name`
    (a relay tunnel's) gives WELCOME a responder field that stays the same across
    restarts, so this responder may answer STALE for sessions it does not know
    (`stale`).  `previous` is a key being rotated out (session.Acceptor).  `acceptor`
    lets several responders share one (a uot-server's
    connections), with its bounds and HELLO memory.  A session belongs to the carrier
    its handshake came on (`where`: a TCP connection, or None for the UDP socket); its
    messages on another are refused."""

    def __init__(self, psk, roles, name=None, single=True, stale=False, epoch=0,
                 acceptor=None, previous=None):
        self.keyed = psk is not None
        self.acceptor = acceptor or Acceptor(
            psk, roles, responder_name(psk, name) if name else None, previous=previous,
            previous_responder=responder_name(previous, name) if name and previous else None)
        self.single = single
        self.stale = stale
        self.epoch = epoch
        self.sessions = {}              # our session id -> Session
        self.carriers = {}              # our session id -> where it lives, if not UDP

    @property
    def session(self):
        """The session of a single responder, or None."""
        if not self.sessions:
            return None
        return next(iter(self.sessions.values()))

    def receive(self, msg, key, now, admit=None, where=None):
        """One message from `key` (on carrier `where`).  `admit(key)` may refuse a HELLO
        with a reason (punch: an unproven path; a rendezvous tunnel: full)."""
        out, sid = Received.of(msg, self.keyed)
        if out.reason is not None:
            return out
        mtype, nonce = out.mtype, out.nonce
        session = self.sessions.get(sid)
        try:
            if session is not None:
                if self.carriers.get(sid) is not where:
                    raise Drop(R_SESSION)
                session.open(msg, nonce)
            elif mtype == T_HELLO:
                reason = admit(key) if admit is not None else None
                if reason is not None:
                    raise Drop(reason)
                welcome, _pending = self.acceptor.hello(msg, key, now, self.sessions.keys(),
                                                        self.epoch)
                out.replies.append((welcome, key))
                return out
            elif sid in self.acceptor.pending:
                session = self.acceptor.confirm(sid, msg, nonce)
                out.event = NEW
                if self.single and self.sessions:
                    out.old = self.session
                    self.end_all()
                self.sessions[sid] = session
                if where is not None:
                    self.carriers[sid] = where
            else:
                if self.stale and where is None:
                    for stale in self.acceptor.answer_unknown(msg, sid, nonce, key, now):
                        out.replies.append((stale, key))
                return out.drop(R_SESSION)
        except Drop as exc:
            return out.drop(exc.reason)
        out.session = session
        if key != session.peer:
            old = session.peer
            moved, challenge = session.from_address(key, msg, now)
            if moved:
                out.event, out.old = MOVED, old
            elif challenge is not None:
                out.replies.append((challenge, key))
        if mtype == T_KEEPALIVE:
            _answer_keepalive(session, msg, out, session.peer)
        elif mtype == T_BYE:
            self.end(session)
            out.event = ENDED
        return out

    def restore(self, session):
        """A session a predecessor had (a respawned relay worker)."""
        self.sessions[session.local_id] = session

    def end(self, session):
        self.sessions.pop(session.local_id, None)
        self.carriers.pop(session.local_id, None)

    def end_all(self):
        self.sessions.clear()
        self.carriers.clear()

    def tick(self, now):
        self.acceptor.expire(now)


class Initiator:
    """The initiating end: HELLO, repeated with back-off until a WELCOME, then the
    session; keepalives when idle; a new handshake when the session is lost (a STALE
    believed, a BYE, silence for dead_after()).

    `repeat` is False over TCP: one HELLO per connection, and the connection is what
    ends when the session does.  `peer` is the responder's address: the session's peer.
    On a connected socket or a connection nothing else can speak; on a socket that is
    not (punch), receive() is given where each message came from, and the session
    follows its peer to a new address once the address answers a challenge."""

    def __init__(self, psk, role, keepalive=KEEPALIVE_EVERY, hello_first=HELLO_FIRST,
                 hello_most=HELLO_MOST, repeat=True, peer=None, dead=None):
        self.handshake = Handshake(psk, role)
        self.keyed = psk is not None
        self.keepalive = keepalive
        self.hello_first = hello_first
        self.hello_most = min(hello_most, keepalive)
        self.repeat = repeat
        self.peer = peer
        self.dead = dead                # seconds of silence that lose the session
        self.state = IDLE
        self.session = None
        self.hello_at = None
        self.hello_wait = hello_first
        self.heard = self.sent = 0.0
        self.tries = 0                  # HELLOs sent since the last session
        self.handshake_at = None        # when the last WELCOME came, for status
        self.sessions = 0               # sessions begun, for status

    def change_state(self, new, now):
        self.state = new
        if new == HELLO:
            self.session = None
            self.hello_at = now
            self.hello_wait = self.hello_first
            self.tries = 0
        elif new == IDLE:
            self.session = None
            self.hello_at = None

    def start(self, now):
        self.heard = now
        self.change_state(HELLO, now)

    def stop(self, now):
        self.change_state(IDLE, now)

    def wake_at(self):
        return self.hello_at if self.state == HELLO else None

    def due(self, now):
        """What to send now (HELLO, a keepalive), and LOST when the session went silent."""
        out = Received()
        if self.state == HELLO and self.hello_at is not None and now >= self.hello_at:
            out.replies.append((self.handshake.hello(), None))
            self.tries += 1
            self.hello_at = now + self.hello_wait if self.repeat else None
            self.hello_wait = min(self.hello_wait * 2, self.hello_most)
        elif self.state == UP:
            due = liveness(now, self.sent, self.heard, self.keepalive, self.dead)
            if due == LOST:
                out.event, out.old = LOST, self.session
                self.change_state(HELLO, now)
            elif due == KEEPALIVE_DUE:
                out.replies.append((self.session.seal(T_KEEPALIVE, 0, keepalive_body(now)),
                                    None))
        if out.replies:
            self.sent = now
        return out

    def receive(self, msg, now, key=None):
        """One message from the responder (from `key`, when the socket is not
        connected)."""
        out, sid = Received.of(msg, self.keyed)
        if out.reason is not None:
            return out
        mtype, nonce = out.mtype, out.nonce
        session = self.session
        try:
            if session is not None and sid == session.local_id:
                session.open(msg, nonce)
            elif mtype == T_WELCOME:
                new = self.handshake.welcome(msg)       # only one to our latest HELLO
                new.peer = self.peer
                out.event, out.old = NEW, self.session
                self.session, self.state, self.hello_at = new, UP, None
                self.heard = self.sent = self.handshake_at = now
                self.sessions += 1
                # The first message under the session confirms it at the responder.
                out.replies.append((new.seal(T_KEEPALIVE, 0, keepalive_body(now)), None))
                out.session = new
                return out
            elif mtype == T_STALE:
                self.handshake.stale(msg, session)
                out.event, out.old = LOST, session
                self.change_state(HELLO, now)
                return out
            else:
                raise Drop(R_SESSION)
        except Drop as exc:
            return out.drop(exc.reason)
        self.heard = now
        out.session = session
        if key is not None and key != session.peer:
            old = session.peer
            moved, challenge = session.from_address(key, msg, now)
            if moved:
                out.event, out.old = MOVED, old
                self.peer = key
            elif challenge is not None:
                out.replies.append((challenge, key))
        if mtype == T_KEEPALIVE:
            _answer_keepalive(session, msg, out, None)
        elif mtype == T_BYE:
            out.event, out.old = LOST, session
            self.change_state(HELLO, now)
        if out.replies:
            self.sent = now
        return out
