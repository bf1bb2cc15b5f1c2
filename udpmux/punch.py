"""`udpmux punch`: a direct UDP path between two hosts behind NAT, with a rendezvous
relay as broker and as fallback.

One side forwards datagrams to a local UDP service (--forward, e.g. mosh-server's
port); the other listens for local UDP clients (--listen, e.g. where mosh-client is
pointed).  The listen side tags each local client address (a flow); the forward side
opens one socket towards the service per flow, as `udpmux expose` does::

    mosh-client -> [--listen] punch ==== punched UDP path ==== punch [--forward] -> mosh-server
                                  \\== or, while none works: the relay ==/

Direct (--peer HOST:PORT --port PORT): both sides send PUNCH probes (under the key) to
each other's address from --port, paced, until the other answers; the listen side then
starts the session (HELLO/WELCOME) on the hole.  Keepalives hold the mapping; after an
address change the session follows once the new address answered a challenge
(session.PathCheck), and a path that goes silent is punched again.

A path is proven, never assumed: each probe carries a fresh challenge, and a path
counts only when an answer echoing a challenge we sent in this attempt comes back
from the address we sent it to (the same host; its port may differ behind a
symmetric NAT) on the socket it left from::

    A -- PUNCH(challenge a, echo -) -->  B      B answers any probe once, no larger,
    A <-- PUNCH(challenge b, echo a) --  B      and changes nothing but its challenges
    A -- PUNCH(challenge -, echo b)  -->  B      A has proven the path; now B has too

Only then does the listen side send HELLO there, and the forward side answers HELLO
only from a path it proved.  A probe replayed from anywhere gets one answer of its own
size and moves nothing; an old answer echoes a challenge nobody waits for.

Brokered (--relay HOST:PORT --rendezvous NAME): each side keeps a session with a relay
tunnel in mode "rendezvous", which pairs the two by name and tells each the other's
public address as it sees it (PEER).  Both then punch at once.  Until a direct session
is up -- PUNCH_TIMEOUT seconds at first, and for good when the NATs do not allow one --
datagrams go through the relay; punching is tried again every RETRY_EVERY seconds, and
the flow moves to the direct path when it comes up, and back when it fails, without
breaking.  PATH tells the relay which, for `udpmux status`.

Symmetric NATs (a new public port for every destination) defeat plain punching.  With
--probe-ports N (the birthday approach), halfway through an attempt each side opens N
more sockets that punch the peer's address (new mappings, if it is itself symmetric),
and sends N probes to random ports of the peer's address (one may hit a mapping of a
symmetric peer).  With N = 256 both ways against a cone NAT the chance of a hit is
about 1 - exp(-256 * 256 / 64512), 64 %; probes are paced at PROBE_RATE a second and
the extra sockets closed after the attempt.

--once only sends a few probes from --port to --peer and exits, so that a program that
binds --port afterwards (mosh-server -p PORT) finds the hole open: mosh-nat's workflow.

How we name things:
  peer      the other `udpmux punch`
  path      direct (a session with the peer) or relayed (sessions with the relay)
  attempt   a round of punching: PUNCH_TIMEOUT seconds of probes
"""

import os
import random
import socket
import time
from collections import OrderedDict

from udpmux import addr, config, wire
from udpmux.batchio import Batch, Outbox, recv_into
from udpmux.errors import EXIT_NOPERM, EXIT_OSERR, Fatal, UsageError
from udpmux.limits import PerSource, TokenBucket, raise_open_files, source_of
from udpmux.log import DropLog, setup as setup_log
from udpmux.session import R_SESSION, R_UNEXPECTED, Acceptor, Drop, Initiator
from udpmux.tagtable import TagTable
from udpmux.worker import Worker
from udpmux.wire import (
    CLOSE_EVICTED, CLOSE_IDLE, CLOSE_SHUTDOWN, HEADER_SIZE, KEEPALIVE, KEEPALIVE_REPLY, MAC_SIZE,
    MAX_DATAGRAM, NO_RANDOM, PATH, PATH_DIRECT, PATH_RELAYED, PEER, PUNCH, REASON,
    SIDE_FORWARD, SIDE_LISTEN, T_BYE, T_CLOSE, T_DATA, T_HELLO, T_KEEPALIVE, T_PATH, T_PEER,
    T_PUNCH, T_RENDEZVOUS, T_STALE, T_WELCOME, Malformed, parse_header,
)

PUNCH_EVERY = 0.1               # seconds between probes during an attempt
PUNCH_TIMEOUT = 5.0             # seconds an attempt lasts
SLOW_PUNCH = 2.0                # seconds between probes after an attempt (direct mode)
RETRY_EVERY = 30.0              # seconds between attempts while relayed (--retry)
PROBE_RATE = 2000               # birthday probes a second at most
HELLO_FIRST = 0.25
BATCH = 64
SERVICE_DRAIN = 64
ONCE_PROBES = 3
CHALLENGES_MAX = 8192           # challenges of our probes remembered until answered
CHALLENGE_TTL = 2 * PUNCH_TIMEOUT   # seconds an answer to a challenge is accepted
PROVEN_MAX = 64                 # proven paths remembered (the forward side answers HELLO there)
PROVEN_TTL = 60.0               # seconds a proven path stays proven without a session
ANSWER_RATE = 2 * PROBE_RATE    # probes answered a second in all, and from one source

R_NO_PATH = "no-path"           # a datagram while neither a direct path nor the relay works
R_SERVICE = "service"
R_UNPROVEN = "unproven"         # a HELLO or WELCOME from a path no challenge proved
R_ANSWER_RATE = "answer-rate"   # a probe beyond the answers allowed per second


class Flow:
    __slots__ = ("tag", "sock", "seen")

    def __init__(self, tag, sock, seen):
        self.tag, self.sock, self.seen = tag, sock, seen


class PunchWorker(Worker):
    def __init__(self, key, port, peer=None, relay=None, rendezvous=None, forward=None,
                 listen=None, keepalive=25.0, probe_ports=256, flow_idle=180.0,
                 max_flows=1024, retry=RETRY_EVERY, log=None):
        super().__init__("punch", None, (), log)
        self.key = key
        self.keyed = key is not None
        self.port = port
        self.peer_endpoint = peer           # (family, sockaddr) given with --peer
        self.relay = relay                  # (family, sockaddr) given with --relay
        self.rendezvous = rendezvous
        self.forward = forward              # the local service's endpoint
        self.listen = listen                # where local clients send
        self.side = SIDE_FORWARD if forward is not None else SIDE_LISTEN
        self.keepalive = keepalive
        self.probe_ports = probe_ports
        self.retry = retry
        self.flow_idle = flow_idle
        self.max_flows = max_flows

    # -- after start

    def setup(self):
        now = time.monotonic()
        self.sock = self.bind_main()
        self.poller.register(self.sock, lambda: self.on_socket(self.sock))
        self.probes = []                    # the birthday attempt's extra sockets
        self.batch = Batch(BATCH)
        self.outbox = Outbox(2 * BATCH)
        self.drops = {}
        self.drop_log = DropLog(self.log, "punch", 60.0)
        # The direct session: the listen side starts it, the forward side answers.
        self.initiator = Initiator(self.key, wire.ROLE_PUNCH)
        self.acceptor = Acceptor(self.key, [wire.ROLE_PUNCH])
        self.direct = None
        self.peer_key = None                # the peer's address that works (or to try)
        self.peer_told = None               # where the relay saw the peer while direct
        self.peer_heard = now
        self.direct_sent = now
        self.attempt_until = None
        self.next_probe = now
        self.next_attempt = now
        self.birthday_at = None
        self.birthday_left = 0
        self.challenges = OrderedDict()     # our probes' challenges: -> (socket, to, sent at)
        self.proven = OrderedDict()         # peer key -> when a challenge proved it
        self.hello_to = None                # listen side: the proven address HELLO goes to
        self.answers = TokenBucket(ANSWER_RATE, now=now)
        self.answers_to = PerSource(ANSWER_RATE, 1024)
        # The relay.
        self.relay_key = None
        self.relay_session = None
        self.relay_initiator = Initiator(self.key, wire.ROLE_PUNCH)
        self.relay_hello_at = now if self.relay is not None else None
        self.relay_hello_wait = HELLO_FIRST
        self.relay_heard = now
        self.relay_sent = now
        self.paired = False
        self.path = None
        if self.relay is not None:
            family, sockaddr = self.relay
            self.relay_key = addr.peer_key(family, sockaddr)
        if self.peer_endpoint is not None:
            family, sockaddr = self.peer_endpoint
            self.peer_key = addr.peer_key(family, sockaddr)
            self.begin_attempt(now)
        # Local flows.
        if self.side == SIDE_LISTEN:
            self.local = _bind_udp(self.listen, "--listen")
            self.poller.register(self.local, self.on_local)
            self.table = TagTable(self.max_flows)
            self.table.attach()
            self.to_local = Outbox(2 * BATCH)
        else:
            self.flows = OrderedDict()      # tag -> Flow, idlest first
        self.scratch = bytearray(HEADER_SIZE + MAX_DATAGRAM + MAC_SIZE + 1)
        self.view = memoryview(self.scratch)
        self.log.info("punching from port %d %s; %s", self.sock.getsockname()[1],
                      f"towards {addr.format_peer(self.peer_key)}" if self.peer_key else
                      f"to meet {self.rendezvous!r} at the relay "
                      f"{addr.format_endpoint(*self.relay)}",
                      f"forwarding to {addr.format_endpoint(*self.forward)}"
                      if self.forward is not None else
                      f"listening at {addr.format_endpoint(*self.listen)}")

    def bind_main(self):
        family = (self.peer_endpoint or self.relay)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", self.port))
        except OSError as exc:
            sock.close()
            raise Fatal(f"--port: cannot bind UDP port {self.port}: {exc.strerror}",
                        status=EXIT_OSERR) from None
        sock.setblocking(False)
        return sock

    def drop(self, reason, n=1):
        self.drops[reason] = self.drops.get(reason, 0) + n
        self.drop_log.count(reason, n)

    # -- sending

    def send(self, msg, key, sock=None):
        sock = sock or self.sock
        if sock is not self.sock:
            try:
                sock.sendto(msg, addr.from_peer_key(key)[1])
            except OSError:
                self.drop("send")
            return
        if not self.outbox.room(len(msg)):
            self.flush()
        self.outbox.add(msg, key)

    def flush(self):
        if len(self.outbox):
            self.outbox.flush(self.sock)
            if self.outbox.drops:
                self.drop("send", sum(self.outbox.drops.values()))
                self.outbox.drops.clear()

    def send_data(self, mtype, tag, body):
        """A DATA or CLOSE to the other side, by the best path there is now."""
        if self.direct is not None:
            self.send(self.direct.seal(mtype, tag, body), self.peer_key)
            self.direct_sent = time.monotonic()
        elif self.relay_session is not None and self.paired:
            self.send(self.relay_session.seal(mtype, tag, body), self.relay_key)
            self.relay_sent = time.monotonic()
        elif mtype == T_DATA:
            self.drop(R_NO_PATH)

    def after_events(self):
        self.flush()
        if self.side == SIDE_LISTEN and len(self.to_local):
            self.to_local.flush(self.local)
            self.to_local.drops.clear()

    # -- punching

    def begin_attempt(self, now):
        if self.peer_key is None:
            return
        self.attempt_until = now + PUNCH_TIMEOUT
        self.next_probe = now
        self.birthday_at = now + PUNCH_TIMEOUT / 2 if self.probe_ports else None
        self.log.debug("punching towards %s", addr.format_peer(self.peer_key))

    def punch(self, key, now, sock=None, echo=NO_RANDOM, challenge=True):
        """A PUNCH to key from sock (the main socket by default): with a fresh challenge,
        remembered until answered, and echoing `echo`."""
        sock = sock or self.sock
        mine = NO_RANDOM
        if challenge:
            mine = os.urandom(16)
            self.challenges[mine] = (sock, key, now)
            if len(self.challenges) > CHALLENGES_MAX:
                self.challenges.popitem(last=False)
        self.send(self.initiator.seal(T_PUNCH, 0, PUNCH.pack(mine, echo)), key, sock)

    def probe_round(self, now):
        """The probes due now: one to the peer (and HELLO from the listen side once a path
        is proven), and, in the second half of an attempt, the birthday probes, paced."""
        if self.peer_key is None:
            return
        self.punch(self.peer_key, now)
        if self.side == SIDE_LISTEN and self.hello_to is not None:
            self.send(self.initiator.hello(), self.hello_to)
        if self.birthday_at is not None and now >= self.birthday_at:
            self.birthday_at = None
            self.start_birthday()
        if self.birthday_left:
            family, sockaddr = addr.from_peer_key(self.peer_key)
            count = min(self.birthday_left, int(PROBE_RATE * PUNCH_EVERY) or 1)
            self.birthday_left -= count
            for _ in range(count):
                guess = addr.peer_key(family, (sockaddr[0], random.randint(1024, 65535),
                                               *sockaddr[2:]))
                self.punch(guess, now)
            for sock in self.probes:
                self.punch(self.peer_key, now, sock)

    def start_birthday(self):
        self.close_probes()
        family = self.sock.family
        raise_open_files(self.probe_ports + 64, self.log, "--probe-ports")
        for _ in range(self.probe_ports):
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            except OSError:
                break
            sock.setblocking(False)
            self.probes.append(sock)
            self.poller.register(sock, lambda s=sock: self.on_socket(s))
        self.birthday_left = self.probe_ports
        self.log.debug("birthday probing: %d sockets, %d guesses", len(self.probes),
                       self.probe_ports)

    def close_probes(self, keep=None):
        for sock in self.probes:
            if sock is not keep:
                self.poller.unregister(sock)
                sock.close()
        self.probes = []
        self.birthday_left = 0

    def adopt(self, sock):
        """A probe socket reached the peer: it becomes the main socket."""
        if sock is self.sock:
            return
        self.close_probes(keep=sock)
        self.poller.unregister(self.sock)
        self.flush()
        self.sock.close()
        self.sock = sock
        self.poller.unregister(sock)
        self.poller.register(sock, lambda: self.on_socket(self.sock))
        self.log.debug("a birthday probe found the way: port %d", sock.getsockname()[1])

    # -- receiving

    def on_socket(self, sock):
        batch = self.batch
        for _ in range(8):
            n = recv_into(sock, batch, 0)
            if not n:
                break
            now = time.monotonic()
            view, lengths, keys, starts = batch.view, batch.lengths, batch.keys, batch.starts
            for i in range(n):
                if lengths[i] > batch.capacity:
                    self.drop(wire.R_TOO_LARGE)
                    continue
                start = starts[i]
                self.on_message(bytes(view[start:start + lengths[i]]), keys[i], now, sock)
            self.flush()
            if n < batch.count:
                break
        self.after_events()

    def on_message(self, msg, key, now, sock):
        try:
            mtype, sid, tag, nonce = parse_header(msg, self.keyed)
        except Malformed as exc:
            self.drop(exc.reason)
            return
        if key == self.relay_key and sock is self.sock:
            self.from_relay(msg, mtype, sid, tag, nonce, now)
        else:
            self.from_peer(msg, mtype, sid, tag, nonce, key, now, sock)

    def from_peer(self, msg, mtype, sid, tag, nonce, key, now, sock):
        try:
            if self.direct is not None and sid == self.direct.local_id:
                self.direct.open(msg, nonce)
                if sock is not self.sock:
                    return
                if key != self.direct.peer:
                    self.new_address(key, msg, now)
            elif mtype == T_PUNCH:
                self.on_punch(msg, key, now, sock)
                return
            elif mtype == T_HELLO and self.side == SIDE_FORWARD:
                if sock is not self.sock or key not in self.proven:
                    raise Drop(R_UNPROVEN)
                welcome, _pending = self.acceptor.hello(msg, key, now)
                self.send(welcome, key)
                return
            elif mtype == T_WELCOME and self.side == SIDE_LISTEN:
                if sock is not self.sock or key != self.hello_to:
                    raise Drop(R_UNPROVEN)
                session = self.initiator.welcome(msg)
                session.peer = key
                self.direct_up(session, now)
                stamp = int(now * 1000) & 0xFFFFFFFF      # confirms it at the peer
                self.send(self.direct.seal(T_KEEPALIVE, 0,
                                           KEEPALIVE.pack(KEEPALIVE_REPLY, stamp, 0)), key)
                return
            elif sid in self.acceptor.pending and sock is self.sock:
                self.direct_up(self.acceptor.confirm(sid, msg, nonce), now)
                if key != self.direct.peer:
                    self.new_address(key, msg, now)
            else:
                raise Drop(R_SESSION)
        except (Malformed, Drop) as exc:
            self.drop(exc.reason)
            return
        self.peer_heard = now
        self.deliver(mtype, tag, msg, now, self.direct)

    def on_punch(self, msg, key, now, sock):
        """A PUNCH that verified: answer a probe, or take an answer as the proof of a path."""
        challenge, echo = PUNCH.unpack(self.initiator.open(msg, T_PUNCH))
        if echo == NO_RANDOM:
            if challenge == NO_RANDOM:
                raise Drop(R_UNEXPECTED)
            # A probe, perhaps replayed: one answer of its size, and nothing else changes.
            if not self.answers_to.take(source_of(key), now) or not self.answers.take(now):
                raise Drop(R_ANSWER_RATE)
            self.punch(key, now, sock, echo=challenge)
            return
        sent = self.challenges.get(echo)
        if sent is None or sent[0] is not sock or _host(sent[1]) != _host(key) \
                or now - sent[2] > CHALLENGE_TTL:
            raise Drop(R_UNEXPECTED)        # late, replayed, or not where we asked
        del self.challenges[echo]
        if challenge != NO_RANDOM:          # the other end proves the path with this
            self.punch(key, now, sock, echo=challenge, challenge=False)
        self.proved(sock, key, now)

    def proved(self, sock, key, now):
        """A key holder at `key` answered a challenge sent from `sock`: the path works.
        While a direct session is up, the datagrams still go where the session is (it
        moves only when its peer answers a challenge: new_address()); the path is for a
        new session, which the forward side accepts there and the listen side offers
        only when its session has gone quiet (the peer restarted, say): a proof that
        comes late, for the path not taken, changes nothing."""
        if self.direct is not None and key == self.direct.peer:
            return
        first = key not in self.proven
        if self.direct is None:
            self.adopt(sock)
        self.proven[key] = now
        self.proven.move_to_end(key)
        while len(self.proven) > PROVEN_MAX or \
                now - next(iter(self.proven.values())) > PROVEN_TTL:
            self.proven.popitem(last=False)
        if first:
            self.log.debug("a path to %s is proven", addr.format_peer(key))
        if self.direct is None:
            self.peer_key = key
        if self.side == SIDE_LISTEN and (self.direct is None
                                         or now - self.peer_heard >= self.keepalive):
            self.hello_to = key
            self.send(self.initiator.hello(), key)

    def new_address(self, key, msg, now):
        """The direct session heard from a new address: it moves there once the address
        answers a challenge."""
        old = self.direct.peer
        moved, challenge = self.direct.from_address(key, msg, now)
        if moved:
            self.log.info("the peer moved from %s to %s", addr.format_peer(old),
                          addr.format_peer(key))
            self.peer_key = key
        elif challenge is not None:
            self.send(challenge, key)

    def direct_up(self, session, now):
        first = self.direct is None
        self.direct = session
        self.peer_key = session.peer
        self.hello_to = None
        self.peer_heard = now
        self.attempt_until = None
        self.close_probes()
        if first:
            self.log.info("direct path to %s is up", addr.format_peer(session.peer))
        self.set_path(PATH_DIRECT)

    def direct_down(self, now, why):
        if self.direct is None:
            return
        self.direct = None
        self.log.warning("the direct path to %s is gone (%s)%s", addr.format_peer(self.peer_key),
                         why, "; through the relay meanwhile" if self.paired else "")
        self.set_path(PATH_RELAYED if self.paired else None)
        if self.peer_told is not None:
            self.peer_key, self.peer_told = self.peer_told, None
        self.begin_attempt(now)

    def set_path(self, path):
        if path == self.path:
            return
        self.path = path
        if path == PATH_RELAYED:
            self.log.info("no direct path yet: datagrams go through the relay")
        if self.relay_session is not None and path is not None:
            self.send(self.relay_session.seal(T_PATH, 0, PATH.pack(path)), self.relay_key)

    def from_relay(self, msg, mtype, sid, tag, nonce, now):
        session = self.relay_session
        try:
            if session is not None and sid == session.local_id:
                session.open(msg, nonce)
            elif mtype == T_WELCOME:
                self.relay_session = session = self.relay_initiator.welcome(msg)
                self.relay_hello_at = None
                self.relay_heard = now
                self.log.info("registered with the relay, which sees us as %s",
                              session.observed)
                name = self.rendezvous.encode()
                self.send(session.seal(T_RENDEZVOUS, 0, bytes([self.side]) + name),
                          self.relay_key)
                return
            elif mtype == T_STALE:
                self.relay_initiator.stale(msg, session)
                self.relay_lost(now, "the relay lost our session")
                return
            else:
                raise Drop(R_SESSION)
        except (Malformed, Drop) as exc:
            self.drop(exc.reason)
            return
        self.relay_heard = now
        if mtype == T_PEER:
            family, port, address, _pair = PEER.unpack_from(msg, HEADER_SIZE)
            if family == 4:
                key = addr.peer_key(socket.AF_INET,
                                    (socket.inet_ntop(socket.AF_INET, address[:4]), port))
            else:
                key = addr.peer_key(socket.AF_INET6,
                                    (socket.inet_ntop(socket.AF_INET6, address), port))
            text = addr.format_peer(key)
            fresh = not self.paired
            self.paired = True
            if self.direct is None:
                self.log.info("the relay says the peer is at %s", text)
                self.peer_key = key
                self.begin_attempt(now)
            else:
                # The direct session follows the peer's own newest message.  The relay sees
                # the peer's mapping towards the relay, another port behind a symmetric NAT
                # or once a birthday probe socket took over: it is for the next attempt.
                if key != self.peer_key:
                    self.log.info("the relay says the peer is at %s; the direct path to %s "
                                  "stays", text, addr.format_peer(self.peer_key))
                self.peer_told = key
            if fresh and self.direct is None:
                self.set_path(PATH_RELAYED)
        elif mtype in (T_DATA, T_CLOSE, T_KEEPALIVE):
            self.deliver(mtype, tag, msg, now, session)
        elif mtype == T_BYE:
            self.relay_lost(now, "the relay ended our session")

    def relay_lost(self, now, why):
        self.log.warning("%s; registering again", why)
        self.relay_session = None
        self.paired = False
        self.relay_hello_at = now
        self.relay_hello_wait = HELLO_FIRST
        if self.direct is None:
            self.set_path(None)

    # -- datagrams to and from the local side

    def deliver(self, mtype, tag, msg, now, session):
        body = memoryview(msg)[HEADER_SIZE:len(msg) - (MAC_SIZE if self.keyed else 0)]
        if mtype == T_DATA:
            if self.side == SIDE_LISTEN:
                slot = self.table.slot_of_tag(tag)
                if slot is None:
                    self.drop("unknown-tag")
                    return
                self.table.touch(slot, now, len(body), outward=True)
                if not self.to_local.room(len(body)):
                    self.to_local.flush(self.local)
                self.to_local.add(body, self.table.keys[slot])
            else:
                self.to_service(tag, body, now)
        elif mtype == T_CLOSE:
            if self.side == SIDE_LISTEN:
                slot = self.table.slot_of_tag(tag)
                if slot is not None:
                    self.table.remove(slot)
            else:
                flow = self.flows.pop(tag, None)
                if flow is not None:
                    self.close_flow(flow)
        elif mtype == T_KEEPALIVE and session is not None:
            flags, stamp, _echo = KEEPALIVE.unpack_from(msg, HEADER_SIZE)
            if flags & KEEPALIVE_REPLY:
                to = self.peer_key if session is self.direct else self.relay_key
                self.send(session.seal(T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, stamp)), to)
        elif mtype == T_BYE and session is self.direct:
            self.direct_down(now, "the peer said goodbye")

    def on_local(self):
        """Datagrams from local clients (the listen side)."""
        batch, table = self.batch, self.table
        for _ in range(8):
            n = recv_into(self.local, batch, 0)
            if not n:
                break
            now = time.monotonic()
            view, lengths, keys, starts = batch.view, batch.lengths, batch.keys, batch.starts
            for i in range(n):
                length = lengths[i]
                if length > MAX_DATAGRAM:
                    self.drop(wire.R_TOO_LARGE)
                    continue
                key = keys[i]
                slot = table.get(key)
                if slot is None:
                    slot, _tag, evicted = table.insert(key, now)
                    if evicted is not None:
                        self.send_data(T_CLOSE, evicted[1], REASON.pack(CLOSE_EVICTED))
                table.touch(slot, now, length)
                start = starts[i]
                self.send_data(T_DATA, table.tags[slot], view[start:start + length])
            if n < batch.count:
                break
        self.after_events()

    def to_service(self, tag, body, now):
        flow = self.flows.get(tag)
        if flow is None:
            if len(self.flows) >= self.max_flows:
                _tag, old = self.flows.popitem(last=False)
                self.close_flow(old)
                self.send_data(T_CLOSE, old.tag, REASON.pack(CLOSE_EVICTED))
            family, sockaddr = self.forward
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.connect(sockaddr)
            except OSError:
                self.drop(R_SERVICE)
                return
            sock.setblocking(False)
            flow = self.flows[tag] = Flow(tag, sock, now)
            self.poller.register(sock, lambda: self.from_service(flow))
        else:
            self.flows.move_to_end(tag)
        flow.seen = now
        try:
            flow.sock.send(body)
        except OSError:
            self.drop(R_SERVICE)

    def from_service(self, flow):
        body = self.view[:MAX_DATAGRAM + 1]
        for _ in range(SERVICE_DRAIN):
            try:
                size = flow.sock.recv_into(body, len(body), socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError:
                self.drop(R_SERVICE)
                continue
            if size > MAX_DATAGRAM:
                self.drop(wire.R_TOO_LARGE)
                continue
            flow.seen = time.monotonic()
            self.send_data(T_DATA, flow.tag, bytes(body[:size]))
        if flow.tag in self.flows:
            self.flows.move_to_end(flow.tag)
        self.after_events()

    def close_flow(self, flow):
        self.poller.unregister(flow.sock)
        flow.sock.close()

    # -- timers

    def wake_at(self, now):
        times = [t for t in (self.next_probe if self.attempt_until is not None else None,
                             self.relay_hello_at) if t is not None]
        return min(times) if times else None

    def on_wake(self, now):
        if self.relay_hello_at is not None and now >= self.relay_hello_at:
            self.send(self.relay_initiator.hello(), self.relay_key)
            self.relay_hello_at = now + self.relay_hello_wait
            self.relay_hello_wait = min(self.relay_hello_wait * 2, self.keepalive)
        if self.attempt_until is not None and now >= self.next_probe:
            if now >= self.attempt_until:
                self.attempt_over(now)
            else:
                self.probe_round(now)
                self.next_probe = now + PUNCH_EVERY
        self.flush()

    def attempt_over(self, now):
        self.close_probes()
        if self.relay is not None:
            self.attempt_until = None           # relayed; tick() tries again later
            self.next_attempt = now + self.retry
            if self.paired:
                self.set_path(PATH_RELAYED)
            self.log.debug("no direct path this time; trying again in %g s", self.retry)
        else:
            # Direct only: keep knocking, slower, until the peer answers.
            self.attempt_until = float("inf")
            self.birthday_at = None
            self.next_probe = now + SLOW_PUNCH

    def tick(self, now):
        if self.attempt_until == float("inf"):
            self.next_probe = min(self.next_probe, now + SLOW_PUNCH)
        if self.direct is not None:
            if now - self.peer_heard > 2 * self.keepalive + 5:
                self.direct_down(now, f"no word for {now - self.peer_heard:.0f} s")
            elif now - self.direct_sent >= self.keepalive \
                    or now - self.peer_heard >= self.keepalive:
                stamp = int(now * 1000) & 0xFFFFFFFF
                self.send(self.direct.seal(T_KEEPALIVE, 0,
                                           KEEPALIVE.pack(KEEPALIVE_REPLY, stamp, 0)),
                          self.peer_key)
                self.direct_sent = now
        elif self.relay is not None and self.paired and self.attempt_until is None \
                and now >= self.next_attempt:
            self.begin_attempt(now)
        if self.relay_session is not None:
            if now - self.relay_heard > 2 * self.keepalive + 5:
                self.relay_lost(now, f"no word from the relay for {now - self.relay_heard:.0f} s")
            elif now - self.relay_sent >= self.keepalive:
                stamp = int(now * 1000) & 0xFFFFFFFF
                self.send(self.relay_session.seal(T_KEEPALIVE, 0,
                                                  KEEPALIVE.pack(KEEPALIVE_REPLY, stamp, 0)),
                          self.relay_key)
                if self.path is not None:   # and remind the relay of the path
                    self.send(self.relay_session.seal(T_PATH, 0, PATH.pack(self.path)),
                              self.relay_key)
                self.relay_sent = now
        self.expire(now)
        self.flush()
        self.drop_log.maybe_log(now)

    def expire(self, now):
        if self.side == SIDE_LISTEN:
            for _key, tag in self.table.expire(now, self.flow_idle):
                self.send_data(T_CLOSE, tag, REASON.pack(CLOSE_IDLE))
            return
        while self.flows:
            tag, flow = next(iter(self.flows.items()))
            if now - flow.seen <= self.flow_idle:
                break
            del self.flows[tag]
            self.close_flow(flow)
            self.send_data(T_CLOSE, tag, REASON.pack(CLOSE_IDLE))

    def on_stop(self, final):
        bye = REASON.pack(CLOSE_SHUTDOWN)
        if self.direct is not None:
            self.send(self.direct.seal(T_BYE, 0, bye), self.peer_key)
        if self.relay_session is not None:
            self.send(self.relay_session.seal(T_BYE, 0, bye), self.relay_key)
        self.flush()
        self.alive = False

    def on_exit(self):
        self.close_probes()
        self.log.info("stopped")


def _host(key):
    """The host part of a peer key: the IPv4 or IPv6 address, without the port."""
    return key[4:8] if len(key) == addr.SOCKADDR_IN_LEN else key[8:24]


def _bind_udp(endpoint, what):
    family, sockaddr = endpoint
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise Fatal(f"{what}: cannot bind {addr.format_endpoint(family, sockaddr)}: "
                    f"{exc.strerror}", status=EXIT_OSERR) from None
    sock.setblocking(False)
    return sock


def _port(args, name):
    try:
        value = config.whole_number(args[name])
    except ValueError:
        raise UsageError(f"{name}: expected a port, 0 to 65535, got {args[name]!r}") from None
    if value > 65535:
        raise UsageError(f"{name}: expected a port, 0 to 65535, got {value}")
    return value


def _endpoint(args, name, passive=False):
    try:
        return addr.parse_endpoint(args[name], passive=passive)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def once(peer, port, log):
    """mosh-nat's workflow: a few probes from port to peer, then the port is free for
    another program, and the hole it punched stays open for a while."""
    family, sockaddr = peer
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        for n in range(ONCE_PROBES):
            sock.sendto(b"udpmux punch %d" % n, sockaddr)
    except OSError as exc:
        raise Fatal(f"cannot punch from port {port}: {exc.strerror}",
                    status=EXIT_NOPERM if exc.errno == 13 else EXIT_OSERR) from None
    finally:
        sock.close()
    log.info("punched from port %d towards %s; the port is free for the program now",
             port, addr.format_endpoint(family, sockaddr))
    return 0


def main(args):
    log = setup_log(args["--debug"])
    if args["--once"]:
        port = _port(args, "--port")
        return once(_endpoint(args, "--peer"), port, log)
    if args["--config"]:
        settings = config.load_punch(args["--config"], log)
    else:
        settings = config.punch_from_options(args, log)
    raise_open_files(settings.max_flows + 64, log, "max_flows service sockets")
    worker = PunchWorker(settings.key, settings.port, peer=settings.peer, relay=settings.relay,
                         rendezvous=settings.rendezvous, forward=settings.forward,
                         listen=settings.listen, keepalive=settings.keepalive,
                         probe_ports=settings.probe_ports, flow_idle=settings.flow_idle,
                         max_flows=settings.max_flows, retry=settings.retry, log=log)
    return worker.serve()
