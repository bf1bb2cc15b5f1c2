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

import dataclasses
import random
import socket
import time

from udpmux import addr, agentstatus, config, sockets, wire
from udpmux.agentreload import Reloader
from udpmux.batchio import Batch
from udpmux.datapath import BATCH, Drops, Sender, batches, each_message
from udpmux.endpoint import (
    ENDED, HELLO, IDLE, KEEPALIVE_DUE, LOST, MOVED, NEW, UP, Initiator, Responder,
    keepalive_body, liveness,
)
from udpmux.errors import Fatal, UsageError
from udpmux.flows import ClientFlows, ServiceFlows
from udpmux.limits import raise_open_files
from udpmux.log import setup as setup_log
from udpmux.probes import PROBE_RATE, PUNCH_TIMEOUT, Prover
from udpmux.reasons import (
    R_NO_PATH, R_SEND, R_SERVICE, R_SESSION, R_TOO_LARGE, R_UNKNOWN_TAG, R_UNPROVEN,
)
from udpmux.session import Drop
from udpmux.settings import whole_number
from udpmux.tagtable import TagTable
from udpmux.log import Every
from udpmux.watch import QUIET_MOST, PeerWatch, resolved
from udpmux.worker import Worker
from udpmux.wire import (
    CLOSE_REFUSED, CLOSE_SHUTDOWN, HEADER_SIZE, MAC_SIZE, MAX_DATAGRAM, PATH, PATH_DIRECT,
    PATH_RELAYED, PEER, REASON, SIDE_FORWARD, SIDE_LISTEN, T_BYE, T_CLOSE, T_DATA, T_HELLO,
    T_KEEPALIVE, T_PATH, T_PEER, T_PUNCH, T_RENDEZVOUS, T_WELCOME,
)

PUNCH_EVERY = 0.1               # seconds between probes during an attempt
PARTNER_WORD = 30.0             # seconds registered without a partner before saying so
SLOW_PUNCH = 2.0                # seconds between probes after an attempt (direct mode)
RETRY_EVERY = 30.0              # seconds between attempts while relayed (--retry)
HELLO_FIRST = 0.25              # the relay's and the direct path's HELLO repeated after
ONCE_PROBES = 3


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
        self.relay_name = None              # its addr.Destination, to resolve again
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

    def setup(self, now=None):
        """After start; `now` (time.monotonic() by default) is when, for unit tests."""
        now = time.monotonic() if now is None else now
        self.drops = self.drop = Drops(self.log, "punch")
        self.sock = self.bind_main()
        self.poller.register(self.sock, lambda: self.on_socket(self.sock))
        self.sender = Sender(self.sock, self.drops)
        self.probes = []                    # the birthday attempt's extra sockets
        self.batch = Batch(BATCH)
        # The direct session: the listen side starts it, the forward side answers.
        if self.side == SIDE_LISTEN:
            self.direct_end = Initiator(self.key, wire.ROLE_PUNCH, keepalive=self.keepalive,
                                        hello_first=HELLO_FIRST)
        else:
            self.direct_end = Responder(self.key, [wire.ROLE_PUNCH])
        self.prover = Prover(self.direct_handshake().seal, now)
        self.peer_key = None                # the peer's address that works (or to try)
        self.peer_told = None               # where the relay saw the peer while direct
        self.heard = self.sent = now        # the direct session's, at the forward side
        self.direct_at = None               # when the direct session last began
        self.attempt_until = None
        self.next_probe = now
        self.next_attempt = now
        self.birthday_at = None
        self.birthday_left = 0
        self.own_ports = set()
        # The relay.
        self.relay_key = None
        self.relay_end = None
        self.paired = False
        self.path = None
        self.registered_at = None           # when the relay last welcomed us
        self.every = Every(QUIET_MOST)
        self.relay_watch = PeerWatch(
            self.log, "the relay", lambda: addr.format_endpoint(*self.relay),
            "the relay is down, its rendezvous tunnel has another key, or UDP to it is "
            "blocked")
        self.peer_watch = PeerWatch(
            self.log, "the peer", lambda: addr.format_endpoint(*self.peer_endpoint)
            if self.peer_endpoint is not None else addr.format_peer(self.peer_key),
            "the other side is not running, has another key, or a NAT or firewall on "
            "the way drops the probes (both sides must punch, each towards the other's "
            "public address); still trying", word_after=1)
        if self.relay is not None:
            family, sockaddr = self.relay
            self.relay_key = addr.peer_key(family, sockaddr)
            self.relay_end = Initiator(self.key, wire.ROLE_PUNCH, keepalive=self.keepalive,
                                       hello_first=HELLO_FIRST, peer=self.relay_key)
            self.relay_end.start(now)
        if self.peer_endpoint is not None:
            family, sockaddr = self.peer_endpoint
            self.peer_key = addr.peer_key(family, sockaddr)
            self.begin_attempt(now)
        # Local flows.
        if self.side == SIDE_LISTEN:
            self.local = sockets.udp(*self.listen, "--listen", buffer=None)
            self.poller.register(self.local, self.on_local)
            self.table = TagTable(self.max_flows)
            self.table.attach()
            self.flows = ClientFlows(self.table, self.client_closed)
            self.to_local = Sender(self.local, self.drops)
        else:
            self.flows = ServiceFlows(self.poller, self.forward, self.max_flows, self.drops,
                                      self.log, self.from_service, self.service_closed,
                                      R_SERVICE, MAX_DATAGRAM)
        self.log.info("punching from port %d %s; %s", self.sock.getsockname()[1],
                      f"towards {addr.format_peer(self.peer_key)}" if self.peer_key else
                      f"to meet {self.rendezvous!r} at the relay "
                      f"{addr.format_endpoint(*self.relay)}",
                      f"forwarding to {addr.format_endpoint(*self.forward)}"
                      if self.forward is not None else
                      f"listening at {addr.format_endpoint(*self.listen)}")

    def bind_main(self):
        family = (self.peer_endpoint or self.relay)[0]
        return sockets.udp_any(family, self.port, "--port")

    def direct_handshake(self):
        """What seals and opens PUNCH: the handshake key of the direct endpoint."""
        return self.direct_end.handshake if self.side == SIDE_LISTEN \
            else self.direct_end.acceptor

    @property
    def direct(self):
        """The direct session, or None."""
        return self.direct_end.session

    @property
    def relay_session(self):
        return self.relay_end.session if self.relay_end is not None else None

    # -- sending

    def send(self, msg, key, sock=None):
        if sock is not None and sock is not self.sock:
            try:
                sock.sendto(msg, addr.from_peer_key(key)[1])
            except OSError:
                self.drop(R_SEND)
            return
        self.sender.add(msg, key)

    def send_data(self, mtype, tag, body):
        """A DATA or CLOSE to the other side, by the best path there is now."""
        if self.direct is not None:
            self.send(self.direct.seal(mtype, tag, body), self.peer_key)
            self.sent = self.direct_end.sent = time.monotonic()
        elif self.relay_session is not None and self.paired:
            self.send(self.relay_session.seal(mtype, tag, body), self.relay_key)
            self.relay_end.sent = time.monotonic()
        elif mtype == T_DATA:
            self.drop(R_NO_PATH)

    def after_events(self):
        self.sender.flush()
        if self.side == SIDE_LISTEN:
            self.to_local.flush()

    # -- punching

    def begin_attempt(self, now):
        if self.peer_key is None:
            return
        self.attempt_until = now + PUNCH_TIMEOUT
        self.peer_watch.begun(now)
        self.next_probe = now
        self.birthday_at = now + PUNCH_TIMEOUT / 2 if self.probe_ports else None
        self.log.debug("punching towards %s", addr.format_peer(self.peer_key))

    def punch(self, key, now, sock=None):
        self.send(self.prover.probe(sock or self.sock, key, now), key, sock)

    def probe_round(self, now):
        """The probes due now: one to the peer, and, in the second half of an attempt,
        the birthday probes, paced."""
        if self.peer_key is None:
            return
        self.punch(self.peer_key, now)
        if self.birthday_at is not None and now >= self.birthday_at:
            self.birthday_at = None
            self.start_birthday()
        if self.birthday_left:
            family, sockaddr = addr.from_peer_key(self.peer_key)
            count = min(self.birthday_left, int(PROBE_RATE * PUNCH_EVERY) or 1)
            self.birthday_left -= count
            for _ in range(count):
                port = random.randint(1024, 65535)
                if port in self.own_ports:
                    continue        # a peer on this host: never a probe to ourselves
                self.punch(addr.peer_key(family, (sockaddr[0], port, *sockaddr[2:])), now)
            for sock in self.probes:
                self.punch(self.peer_key, now, sock)

    def start_birthday(self):
        self.close_probes()
        family = self.sock.family
        raise_open_files(self.probe_ports + 64, self.log, "--probe-ports")
        for _ in range(self.probe_ports):
            try:
                sock = sockets.udp_any(family, 0, "--probe-ports")
            except Fatal:
                break               # out of ports or descriptors: probe with what there is
            self.probes.append(sock)
            self.poller.register(sock, lambda s=sock: self.on_socket(s))
        self.birthday_left = self.probe_ports
        self.own_ports = {s.getsockname()[1] for s in (self.sock, *self.probes)}
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
        self.sender.flush()
        self.sock.close()
        self.sock = self.sender.sock = sock
        self.poller.unregister(sock)
        self.poller.register(sock, lambda: self.on_socket(self.sock))
        self.log.debug("a birthday probe found the way: port %d", sock.getsockname()[1])

    # -- receiving

    def on_socket(self, sock):
        each_message(sock, self.batch, self.drops,
                     lambda msg, key, now: self.on_message(bytes(msg), key, now, sock),
                     self.sender.flush)

    def on_message(self, msg, key, now, sock):
        mtype = msg[1] if len(msg) >= HEADER_SIZE else None
        if key == self.relay_key and sock is self.sock:
            self.from_relay(msg, now)
        elif mtype == T_PUNCH:
            try:
                reply, proven = self.prover.received(
                    self.direct_handshake().open(msg, T_PUNCH), sock, key, now)
            except Drop as exc:
                self.drop(exc.reason)
                return
            if reply is not None:
                self.send(reply, key, sock)
            if proven:
                self.proved(sock, key, now)
        elif sock is not self.sock:
            self.drop(R_UNPROVEN if mtype in (T_HELLO, T_WELCOME) else R_SESSION)
        elif self.side == SIDE_LISTEN:
            self.from_forward_side(msg, key, now, mtype)
        else:
            self.from_listen_side(msg, key, now)

    def proved(self, sock, key, now):
        """A key holder at `key` answered a challenge sent from `sock`: the path works.
        While a direct session is up, the datagrams still go where the session is (it
        moves only when its peer answers a challenge); the path is for a new session,
        which the forward side accepts there and the listen side offers only when its
        session has gone quiet (the peer restarted, say): a proof that comes late, for
        the path not taken, changes nothing."""
        direct = self.direct
        if direct is not None and key == direct.peer:
            return
        if direct is None:
            self.adopt(sock)
            self.peer_key = key
        self.log.debug("a path to %s is proven", addr.format_peer(key))
        if self.side == SIDE_LISTEN and (direct is None
                                         or now - self.direct_end.heard >= self.keepalive):
            self.direct_end.peer = key
            self.direct_end.start(now)
            self.send_direct_due(now)

    def from_forward_side(self, msg, key, now, mtype):
        """The listen side: a message from the forward side (WELCOME, the session's)."""
        end = self.direct_end
        if mtype == T_WELCOME and key != end.peer:
            self.drop(R_UNPROVEN)           # a WELCOME from where no HELLO went
            return
        got = end.receive(msg, now, key)
        if got.settle(lambda reply, to: self.send(reply, to or end.peer), self.drop):
            self.on_direct(got, msg, now)

    def from_listen_side(self, msg, key, now):
        """The forward side: a message from the listen side (HELLO, the session's)."""
        got = self.direct_end.receive(msg, key, now, admit=lambda k: self.admit(k, now))
        if not got.settle(self.send, self.drop) or got.session is None:
            return                          # dropped, or a HELLO answered
        self.heard = now
        self.on_direct(got, msg, now)

    def on_direct(self, got, msg, now):
        """A message of the direct session, as its endpoint took it."""
        if got.event == NEW:
            self.direct_up(now)
        elif got.event == MOVED:
            self.moved(got.old, now)
        elif got.event in (LOST, ENDED):
            self.direct_down(now, "the peer said goodbye")
            return
        self.deliver(got.mtype, got.tag, msg, now)

    def admit(self, key, now):
        """The forward side answers HELLO only on a path it proved."""
        return None if self.prover.is_proven(key, now) else R_UNPROVEN

    def moved(self, old, now):
        self.peer_key = self.direct.peer
        self.log.info("the peer moved from %s to %s", addr.format_peer(old),
                      addr.format_peer(self.peer_key))

    def direct_up(self, now):
        first = self.path != PATH_DIRECT
        self.peer_key = self.direct.peer
        self.heard = self.sent = self.direct_at = now
        self.attempt_until = None
        self.close_probes()
        self.peer_watch.answered(now)
        if first:
            self.log.info("direct path to %s is up", addr.format_peer(self.peer_key))
        self.set_path(PATH_DIRECT)

    def direct_down(self, now, why):
        if self.path != PATH_DIRECT:
            return
        if self.side == SIDE_LISTEN:
            self.direct_end.stop(now)
        else:
            self.direct_end.end_all()
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

    # -- the relay

    def from_relay(self, msg, now):
        got = self.relay_end.receive(msg, now)
        if not got.settle(self.send, self.drop, to=self.relay_key):
            return
        if got.event == NEW:
            self.relay_watch.answered(now)
            self.registered_at = now
            self.log.info("registered with the relay, which sees us as %s",
                          got.session.observed)
            name = self.rendezvous.encode()
            self.send(got.session.seal(T_RENDEZVOUS, 0, bytes([self.side]) + name),
                      self.relay_key)
            return
        if got.event == LOST:
            self.relay_lost(now, "the relay ended our session" if got.mtype == T_BYE
                            else "the relay lost our session")
            return
        if got.mtype == T_PEER:
            self.told(msg, now)
        elif got.mtype in (T_DATA, T_CLOSE):
            self.deliver(got.mtype, got.tag, msg, now)

    def told(self, msg, now):
        """PEER: where the relay sees the peer."""
        family, port, address, _pair = PEER.unpack_from(msg, HEADER_SIZE)
        if family == 4:
            key = addr.peer_key(socket.AF_INET,
                                (socket.inet_ntop(socket.AF_INET, address[:4]), port))
        else:
            key = addr.peer_key(socket.AF_INET6,
                                (socket.inet_ntop(socket.AF_INET6, address), port))
        text = addr.format_peer(key)
        fresh = not self.paired
        if fresh and self.registered_at is not None \
                and now - self.registered_at >= PARTNER_WORD:
            self.log.warning("the other side of %r has registered; pairing", self.rendezvous)
        self.paired = True
        if self.direct is None:
            self.log.info("the relay says the peer is at %s", text)
            self.peer_key = key
            self.begin_attempt(now)
        else:
            # The direct session follows the peer's own messages.  The relay sees the
            # peer's mapping towards the relay, another port behind a symmetric NAT or
            # once a birthday probe socket took over: it is for the next attempt.
            if key != self.peer_key:
                self.log.info("the relay says the peer is at %s; the direct path to %s "
                              "stays", text, addr.format_peer(self.peer_key))
            self.peer_told = key
        if fresh and self.direct is None:
            self.set_path(PATH_RELAYED)

    def re_resolve_relay(self):
        """Before registering anew: the relay's name again (its address may have
        changed); an address of the main socket's family only."""
        name = self.relay_name
        if name is None:
            return
        try:
            name.resolve()
        except (addr.Unresolved, ValueError) as exc:
            self.log.warning("the relay at %s: %s; trying its last address", name.text, exc)
            return
        for family, sockaddr in name.addresses:
            if family == self.sock.family:
                if (family, sockaddr) != self.relay:
                    self.relay = (family, sockaddr)
                    self.relay_key = self.relay_end.peer = addr.peer_key(family, sockaddr)
                    self.log.info("the relay's name now resolves to %s",
                                  addr.format_endpoint(family, sockaddr))
                return

    def waiting_for_partner(self, now):
        """Registered, and still no word of the other side: say so, now and then."""
        if self.paired or self.relay_end.state != UP or self.registered_at is None \
                or now - self.registered_at < PARTNER_WORD or not self.every("partner", now):
            return
        other = "forward" if self.side == SIDE_LISTEN else "listen"
        self.log.warning("registered with the relay for %.0f s, and no %s side has given "
                         "the rendezvous %r: is it running, with the same --rendezvous and "
                         "key, at the same relay?", now - self.registered_at, other,
                         self.rendezvous)

    def relay_lost(self, now, why):
        self.log.warning("%s; registering again", why)
        self.re_resolve_relay()
        self.paired = False
        self.registered_at = None
        if self.direct is None:
            self.set_path(None)

    # -- datagrams to and from the local side

    def deliver(self, mtype, tag, msg, now):
        body = memoryview(msg)[HEADER_SIZE:len(msg) - (MAC_SIZE if self.keyed else 0)]
        if mtype == T_DATA:
            if self.side == SIDE_LISTEN:
                slot = self.table.slot_of_tag(tag)
                if slot is None:
                    self.drop(R_UNKNOWN_TAG)
                    return
                self.table.touch(slot, now, len(body), outward=True)
                self.to_local.add(body, self.table.keys[slot])
            else:
                flow = self.flows.get(tag) or self.flows.open(tag, tag, now)
                if flow is not None:
                    self.flows.send(flow, body, now)
                else:                   # no socket (logged): the other side closes it
                    self.send_data(T_CLOSE, tag, REASON.pack(CLOSE_REFUSED))
        elif mtype == T_CLOSE:
            if self.side == SIDE_LISTEN:
                self.flows.forget(tag)
            else:
                self.flows.close(tag)

    def on_local(self):
        """Datagrams from local clients (the listen side)."""
        batch, table = self.batch, self.table
        for n in batches(self.local, batch, self.drops):
            now = time.monotonic()
            view, lengths, keys, starts = batch.view, batch.lengths, batch.keys, batch.starts
            for i in range(n):
                length = lengths[i]
                if length > MAX_DATAGRAM:
                    self.drop(R_TOO_LARGE)
                    continue
                slot = self.flows.touch(keys[i], now, length)
                start = starts[i]
                self.send_data(T_DATA, table.tags[slot], view[start:start + length])

    def client_closed(self, tag, reason):
        self.send_data(T_CLOSE, tag, REASON.pack(reason))

    def from_service(self, flow, buf, size):
        self.send_data(T_DATA, flow.tag, bytes(buf[HEADER_SIZE:HEADER_SIZE + size]))

    def service_closed(self, flow, reason):
        self.send_data(T_CLOSE, flow.tag, REASON.pack(reason))

    # -- timers

    def wake_at(self, now):
        times = [t for t in (self.next_probe if self.attempt_until is not None else None,
                             self.relay_end.wake_at() if self.relay_end else None,
                             self.direct_end.wake_at() if self.side == SIDE_LISTEN else None)
                 if t is not None]
        return min(times) if times else None

    def on_wake(self, now):
        if self.relay_end is not None:
            self.send_relay_due(now)
        if self.side == SIDE_LISTEN and self.direct_end.state != UP:
            self.send_direct_due(now)
        if self.attempt_until is not None and now >= self.next_probe:
            if now >= self.attempt_until:
                self.attempt_over(now)
            else:
                self.probe_round(now)
                self.next_probe = now + PUNCH_EVERY
        self.sender.flush()

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
            self.peer_watch.hello_sent(now)
            self.attempt_until = float("inf")
            self.birthday_at = None
            self.next_probe = now + SLOW_PUNCH

    def send_relay_due(self, now):
        got = self.relay_end.due(now)
        if got.event == LOST:
            self.relay_lost(now, f"no word from the relay for {now - self.relay_end.heard:.0f} s")
            got = self.relay_end.due(now)
        for msg, _to in got.replies:
            self.send(msg, self.relay_key)
            if self.relay_end.state == HELLO:
                self.relay_watch.hello_sent(now)
            if self.relay_end.state == UP and self.path is not None:
                # With each keepalive, remind the relay of the path.
                self.send(self.relay_session.seal(T_PATH, 0, PATH.pack(self.path)),
                          self.relay_key)

    def send_direct_due(self, now):
        """The listen side's HELLOs, its keepalives, and its session's silence."""
        end = self.direct_end
        if end.state == IDLE:
            return
        got = end.due(now)
        if got.event == LOST:
            self.direct_down(now, f"no word for {now - end.heard:.0f} s")
            return
        for msg, _to in got.replies:
            self.send(msg, end.peer)

    def tick(self, now):
        if self.attempt_until == float("inf"):
            self.next_probe = min(self.next_probe, now + SLOW_PUNCH)
        if self.side == SIDE_LISTEN:
            if self.direct_end.state == UP:
                self.send_direct_due(now)
        elif self.direct is not None:
            due = liveness(now, self.sent, self.heard, self.keepalive)
            if due == LOST:
                self.direct_down(now, f"no word for {now - self.heard:.0f} s")
            elif due == KEEPALIVE_DUE:
                self.send(self.direct.seal(T_KEEPALIVE, 0, keepalive_body(now)), self.peer_key)
                self.sent = now
        if self.direct is None and self.relay is not None and self.paired \
                and self.attempt_until is None and now >= self.next_attempt:
            self.begin_attempt(now)
        if self.relay_end is not None:
            self.send_relay_due(now)
            self.waiting_for_partner(now)
        self.flows.expire(now, self.flow_idle)
        if self.side == SIDE_FORWARD:
            self.direct_end.tick(now)
        self.sender.flush()
        self.drops.tick(now)

    def on_stop(self, final):
        bye = REASON.pack(CLOSE_SHUTDOWN)
        if self.direct is not None:
            self.send(self.direct.seal(T_BYE, 0, bye), self.peer_key)
        if self.relay_session is not None:
            self.send(self.relay_session.seal(T_BYE, 0, bye), self.relay_key)
        self.sender.flush()
        self.alive = False

    def on_exit(self):
        self.close_probes()
        if self.side == SIDE_FORWARD:
            self.flows.close_all()
        self.log.info("stopped")

    # -- reload (agentreload.py): the timers change in place; the rest (the key, the
    # peer, the relay, the ports) with a restart, which punches afresh.

    FIXED = tuple(f.name for f in dataclasses.fields(config.PunchConfig)
                  if f.name not in ("flow_idle", "retry", "path", *config.INSPECT))

    def apply(self, settings, changed):
        self.flow_idle, self.retry = settings.flow_idle, settings.retry

    # -- status

    def report(self, now):
        direct = self.direct
        heard = (self.direct_end.heard if self.side == SIDE_LISTEN else self.heard) \
            if direct is not None else None
        peer = {
            "role": "peer",
            "name": addr.format_endpoint(*self.peer_endpoint) if self.peer_endpoint
            else addr.format_peer(self.peer_key) if self.peer_key else "(from the relay)",
            "address": addr.format_peer(self.peer_key) if self.peer_key else None,
            "state": "up" if direct is not None else "punching"
            if self.attempt_until is not None else "waiting",
            "carrier": "udp", "path": "direct" if direct is not None else None,
            "handshake_ago": agentstatus.ago(now, self.direct_at) if direct else None,
            "heard_ago": agentstatus.ago(now, heard), "seen_as": None,
            "trouble": None if direct is not None else self.peer_watch.refusal,
        }
        peers = [peer]
        if self.relay_end is not None:
            peers.append(agentstatus.peer_report(
                "relay", self.relay_name.text if self.relay_name else
                addr.format_peer(self.relay_key), self.relay_end, now,
                address=addr.format_peer(self.relay_key), carrier="udp",
                path="relayed" if self.path == PATH_RELAYED else None,
                watch=self.relay_watch))
        listen = self.side == SIDE_LISTEN
        return {"peers": peers, "flows": len(self.table if listen else self.flows),
                "max_flows": self.max_flows,
                "counters": agentstatus.table_totals(self.flows) if listen
                else self.flows.totals()}

    def flow_list(self, now, limit=None):
        if self.side == SIDE_LISTEN:
            return agentstatus.table_flows_report(self.table, now, limit)
        return agentstatus.service_flows_report(self.flows, now, limit)



def _port(args, name):
    try:
        value = whole_number(args[name])
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
    sock = sockets.udp_any(family, port, "--port")
    try:
        for n in range(ONCE_PROBES):
            sock.sendto(b"udpmux punch %d" % n, sockaddr)
    except OSError as exc:
        raise Fatal(f"cannot punch from port {port}: {exc.strerror}",
                    status=sockets.status_of(exc)) from None
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
    peer = settings.peer and resolved(settings.peer, log, "the peer")
    relay = settings.relay and resolved(settings.relay, log, "the relay")
    worker = PunchWorker(settings.key, settings.port, peer=peer, relay=relay,
                         rendezvous=settings.rendezvous, forward=settings.forward,
                         listen=settings.listen, keepalive=settings.keepalive,
                         probe_ports=settings.probe_ports, flow_idle=settings.flow_idle,
                         max_flows=settings.max_flows, retry=settings.retry, log=log)
    worker.relay_name = settings.relay
    path = args["--config"]
    reloader = Reloader.factory(
        (lambda: config.load_punch(path, log)) if path else
        (lambda: config.punch_from_options(args, log)), settings, PunchWorker.FIXED, log)
    return worker.serve(agentstatus.Inspector("punch", settings.control_socket,
                                              settings.metrics_listen, log, settings.path),
                        reloader)
