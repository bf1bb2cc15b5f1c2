"""`udpmux expose`: the inside end of a reverse tunnel.

Keeps a session with the relay (HELLO/WELCOME, then keepalives that also hold the NAT
mapping open) and, for every flow the relay announces by sending its first DATA,
opens one UDP socket towards the service, so that the service sees one source port
per outside client::

    relay ===== session (UDP, authenticated) ===== exposer --- socket for tag 7 ---> service
                                                           --- socket for tag 9 ---> service

The socket to the relay is connected, and so is each socket to the service: the
kernel drops whatever anyone else sends, so the exposer learns nothing from strangers.

Bounds: at most max_flows service sockets (a new flow closes the least recently used
one and tells the relay); flows idle for flow_idle are closed at both ends.

How we name things:
  relay     the public `udpmux relay` this exposer registers with
  service   the UDP service being exposed
  flow      one outside client, known here only by its tag; one service socket each
  epoch     names the relay's flow table: when it changes (the relay restarted), every
            tag from before means nothing, so every flow is closed
"""

import errno
import hashlib
import hmac
import socket
import time
from collections import OrderedDict

from udpmux import addr, wire
from udpmux.batchio import Batch, Outbox, recv_into
from udpmux.carrier import Dialer, TcpCarrier
from udpmux.config import expose_from_options, load_expose
from udpmux.limits import raise_open_files
from udpmux.log import DropLog, setup as setup_log
from udpmux.session import R_SESSION, Drop, Initiator
from udpmux.worker import Worker
from udpmux.auth import R_MAC, WINDOW
from udpmux.wire import (
    CLOSE_EVICTED, CLOSE_IDLE, CLOSE_SHUTDOWN, HEADER, HEADER_SIZE, KEEPALIVE, KEEPALIVE_REPLY,
    MAC_SIZE, MAX_DATAGRAM, REASON, T_BYE, T_CLOSE, T_DATA, T_KEEPALIVE, T_STALE, T_WELCOME,
    VERSION, Malformed, parse_header,
)

BATCH = 64
DRAIN_ROUNDS = 8
SERVICE_DRAIN = 64              # datagrams read from one service socket per wake-up
HELLO_FIRST = 0.5               # seconds before the first HELLO is repeated
CONNECT_TIMEOUT = 10.0          # seconds for a TCP connection to be welcomed
SOCKET_BUFFER = 4 * 1024 * 1024
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)

R_SERVICE = "service"           # the service refused a datagram (not running: ICMP)
R_SEND = "send"                 # the kernel refused to send
R_RECEIVE = "receive"           # receiving from the relay failed (an ICMP error, mostly)
R_NO_SESSION = "no-session"     # a service reply while no session with the relay is up


class Flow:
    __slots__ = ("tag", "sock", "seen")

    def __init__(self, tag, sock, seen):
        self.tag = tag
        self.sock = sock
        self.seen = seen


class ExposeWorker(Worker):
    def __init__(self, relay, service, key, keepalive=25.0, flow_idle=180.0, max_flows=1024,
                 carrier="udp", log=None):
        super().__init__("expose", None, (), log)
        self.tcp = carrier == "tcp"
        self.relay = relay              # (family, sockaddr)
        self.service = service
        self.key = key
        self.keyed = key is not None
        self.keepalive = keepalive
        self.flow_idle = flow_idle
        self.max_flows = max_flows

    def setup(self):
        now = time.monotonic()
        self.initiator = Initiator(self.key, wire.ROLE_EXPOSE)
        self.session = None
        self.epoch = None
        self.heard = now
        self.sent = 0.0
        self.hello_at = now
        self.hello_wait = HELLO_FIRST
        self.flows = OrderedDict()      # tag -> Flow, least recently used first
        self.drops = {}
        self.drop_log = DropLog(self.log, "expose", 60.0)
        self.batch = Batch(BATCH)
        self.outbox = Outbox(BATCH)
        self.scratch = bytearray(HEADER_SIZE + MAX_DATAGRAM + MAC_SIZE + 1)
        self.scratch_view = memoryview(self.scratch)
        self.relay_key = None
        self.sock = None
        self.carrier = None
        if self.tcp:
            self.hello_at = None        # HELLO goes once per connection
            self.dialer = Dialer(self.relay, self.poller, self.on_connected, self.log,
                                 "the relay")
        else:
            self.open_relay_socket()
        self.log.info("exposing %s through the relay at %s%s",
                      addr.format_endpoint(*self.service), addr.format_endpoint(*self.relay),
                      " over TCP" if self.tcp else "")

    def open_relay_socket(self):
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close()
        family, sockaddr = self.relay
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.connect(sockaddr)
        sock.setblocking(False)
        self.sock = sock
        self.relay_key = addr.peer_key(family, sock.getpeername())
        self.poller.register(sock, self.on_relay)

    def drop(self, reason, n=1):
        self.drops[reason] = self.drops.get(reason, 0) + n
        self.drop_log.count(reason, n)

    # -- from the relay

    def on_relay(self):
        """Messages from the relay.  DATA of the current session runs inline (header,
        replay window, MAC, then the body goes to its flow's service socket); the rest
        goes through from_relay()."""
        batch = self.batch
        unpack_from, blake2b, compare = HEADER.unpack_from, hashlib.blake2b, hmac.compare_digest
        trailer = MAC_SIZE if self.keyed else 0
        shortest = HEADER_SIZE + trailer
        flows = self.flows
        get, move = flows.get, flows.move_to_end
        for _ in range(DRAIN_ROUNDS):
            n = recv_into(self.sock, batch, 0)
            if not n:
                break
            now = time.monotonic()
            view, lengths, starts = batch.view, batch.lengths, batch.starts
            capacity = batch.capacity
            session = self.session
            if session is not None:
                local_id, flags_ok = session.local_id, session.flags
                mac_key, window = session.recv_key, session.window
            heard = False
            for i in range(n):
                start, length = starts[i], lengths[i]
                if session is not None and shortest <= length <= capacity:
                    version, mtype, flags, sid, tag, nonce = unpack_from(view, start)
                    top = window.top
                    if version == VERSION and mtype == T_DATA and flags == flags_ok \
                            and sid == local_id and nonce > top - WINDOW and nonce \
                            and (nonce > top or not window.bits >> (top - nonce) & 1):
                        end = start + length
                        if mac_key is not None and not compare(
                                blake2b(view[start:end - MAC_SIZE], key=mac_key,
                                        digest_size=MAC_SIZE).digest(),
                                view[end - MAC_SIZE:end]):
                            self.drop(R_MAC)
                            continue
                        window.accept(nonce)
                        heard = True
                        flow = get(tag)
                        if flow is None:
                            flow = self.open_flow(tag, now)
                            if flow is None:
                                continue
                        else:
                            move(tag)
                        flow.seen = now
                        try:
                            flow.sock.send(view[start + HEADER_SIZE:end - trailer])
                        except BlockingIOError:
                            self.drop(R_SEND)
                        except ConnectionRefusedError:
                            self.drop(R_SERVICE)
                        except OSError:
                            self.drop(R_SEND)
                        continue
                if length > capacity:
                    self.drop(wire.R_TOO_LARGE)
                    continue
                self.from_relay(view[start:start + length], now)
                if self.session is not session:
                    session = self.session
                    if session is not None:
                        local_id, flags_ok = session.local_id, session.flags
                        mac_key, window = session.recv_key, session.window
            if heard:
                self.heard = now
            if n < batch.count:
                break
        if batch.errors:
            self.drop(R_RECEIVE, sum(batch.errors.values()))
            batch.errors.clear()

    def from_relay(self, msg, now):
        try:
            mtype, sid, tag, nonce = parse_header(msg, self.keyed)
            session = self.session
            if session is not None and sid == session.local_id:
                session.open(msg, nonce)
            elif mtype == T_WELCOME:
                self.welcomed(self.initiator.welcome(msg), now)
                return
            elif mtype == T_STALE:
                self.initiator.stale(msg, session)
                self.log.info("the relay lost our session (it restarted?); registering again")
                self.start_handshake(now)
                return
            else:
                raise Drop(R_SESSION)
        except (Malformed, Drop) as exc:
            self.drop(exc.reason)
            if self.carrier is not None:    # a stream with a bad message in it is done
                self.carrier.close(f"a message refused ({exc.reason})")
            return
        self.heard = now
        if mtype == T_DATA:
            self.to_service(tag, msg[HEADER_SIZE:len(msg) - (MAC_SIZE if self.keyed else 0)], now)
        elif mtype == T_CLOSE:
            flow = self.flows.pop(tag, None)
            if flow is not None:
                self.close_flow(flow)
                self.log.debug("flow %d closed by the relay", tag)
        elif mtype == T_KEEPALIVE:
            flags, stamp, _echo = KEEPALIVE.unpack_from(msg, HEADER_SIZE)
            if flags & KEEPALIVE_REPLY:     # the relay asks (a challenge of our new address)
                self.tell_relay(T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, stamp))
        elif mtype == T_BYE:
            self.log.warning("the relay ended our session; registering again")
            self.session = None
            self.start_handshake(now)

    def welcomed(self, session, now):
        fresh = self.session is None
        self.session = session
        self.heard = now
        self.hello_at = None
        if self.tcp:
            self.dialer.succeeded()
            self.welcomed_here = True
        if self.epoch is not None and session.epoch != self.epoch and self.flows:
            self.log.info("the relay's flow table is new: closing %d flows", len(self.flows))
            for flow in self.flows.values():
                self.close_flow(flow)
            self.flows.clear()
        self.epoch = session.epoch
        # The first message under the new session confirms it at the relay.
        self.send_keepalive(now)
        if fresh:
            self.log.info("registered with the relay at %s, which sees us as %s",
                          addr.format_endpoint(*self.relay), session.observed)
        else:
            self.log.debug("new session with the relay (it sees us as %s)", session.observed)

    def to_service(self, tag, body, now):
        flow = self.flows.get(tag)
        if flow is None:
            flow = self.open_flow(tag, now)
            if flow is None:
                return
        else:
            self.flows.move_to_end(tag)
        flow.seen = now
        try:
            flow.sock.send(body)
        except BlockingIOError:
            self.drop(R_SEND)
        except ConnectionRefusedError:
            self.drop(R_SERVICE)
        except OSError:
            self.drop(R_SEND)

    def open_flow(self, tag, now):
        if len(self.flows) >= self.max_flows:
            _old_tag, old = self.flows.popitem(last=False)
            self.close_flow(old)
            self.tell_relay(T_CLOSE, old.tag, REASON.pack(CLOSE_EVICTED))
        family, sockaddr = self.service
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.connect(sockaddr)
        except OSError as exc:
            self.log.error("cannot open a socket to the service: %s", exc.strerror)
            self.drop(R_SERVICE)
            return None
        sock.setblocking(False)
        flow = self.flows[tag] = Flow(tag, sock, now)
        self.poller.register(sock, lambda: self.from_service(flow))
        self.log.debug("flow %d: new service socket, port %d", tag, sock.getsockname()[1])
        return flow

    def close_flow(self, flow):
        self.poller.unregister(flow.sock)
        flow.sock.close()

    # -- from the service

    def from_service(self, flow):
        session = self.session
        buf, view = self.scratch, self.scratch_view
        body = view[HEADER_SIZE:HEADER_SIZE + MAX_DATAGRAM + 1]
        for _ in range(SERVICE_DRAIN):
            try:
                size = flow.sock.recv_into(body, len(body), MSG_TRUNC)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                self.drop(R_SERVICE)
                continue
            if size > MAX_DATAGRAM:
                self.drop(wire.R_TOO_LARGE)
                continue
            flow.seen = time.monotonic()
            if session is None:
                self.drop(R_NO_SESSION)
                continue
            length = session.seal_into(buf, 0, size, T_DATA, flow.tag)
            self.send_relay(view[:length], flow.tag)
        if flow.tag in self.flows:
            self.flows.move_to_end(flow.tag)

    def after_events(self):
        if self.carrier is not None:
            self.carrier.flush()
            if self.carrier is not None and self.carrier.frames_out:
                self.carrier.frames_out = 0
                self.sent = time.monotonic()
        elif len(self.outbox):
            self.outbox.flush(self.sock)
            self.sent = time.monotonic()
            if self.outbox.drops:
                self.drop(R_SEND, sum(self.outbox.drops.values()))
                self.outbox.drops.clear()

    # -- the session

    def send_relay(self, msg, tag=None):
        """A message to the relay: over UDP (copied into the outbox) or over TCP (into the
        flow's queue on the connection, or the control queue for tag None)."""
        if self.tcp:
            if self.carrier is not None:
                self.carrier.send(bytes(msg), tag)
            return
        if not self.outbox.room(len(msg)):
            self.after_events()
        self.outbox.add(msg, self.relay_key)

    def tell_relay(self, mtype, tag, body):
        if self.session is not None:
            self.send_relay(self.session.seal(mtype, tag, body))

    # -- over TCP

    def on_connected(self, sock):
        self.welcomed_here = False      # whether this connection ever carried a session
        self.carrier = TcpCarrier(sock, self.poller, self.on_carrier_message,
                                  self.on_carrier_closed)
        self.carrier.send(self.initiator.hello())
        self.heard = time.monotonic()

    def on_carrier_message(self, carrier, msg):
        if carrier is self.carrier:
            self.from_relay(msg, time.monotonic())

    def on_carrier_closed(self, carrier, why):
        if carrier is not self.carrier:
            return
        self.carrier = None
        if not self.alive:
            return
        now = time.monotonic()
        if self.welcomed_here:
            if self.session is not None:
                self.log.warning("the connection to the relay ended (%s); connecting again",
                                 why)
            self.session = None
            self.dialer.lost(now)
        else:
            self.dialer.failed(now, why)

    def send_keepalive(self, now):
        stamp = int(now * 1000) & 0xFFFFFFFF
        self.tell_relay(T_KEEPALIVE, 0, KEEPALIVE.pack(KEEPALIVE_REPLY, stamp, 0))
        self.after_events()

    def start_handshake(self, now):
        if self.tcp:                    # a new connection starts a new session
            if self.carrier is not None:
                self.carrier.close("registering again")
            return
        if self.hello_at is None:
            self.hello_wait = HELLO_FIRST
            self.hello_at = now

    def send_hello(self, now):
        try:
            self.sock.send(self.initiator.hello())
        except BlockingIOError:
            pass
        except OSError as exc:
            # The relay is unreachable from here just now (ICMP), or our address went
            # away: start over with a fresh socket and keep trying.
            self.log.debug("sending HELLO: %s", exc.strerror)
            if exc.errno not in (errno.ECONNREFUSED,):
                self.open_relay_socket()
        self.hello_at = now + self.hello_wait
        self.hello_wait = min(self.hello_wait * 2, self.keepalive)

    def tick(self, now):
        if self.tcp:
            self.dialer.tick(now)
            if self.carrier is not None and self.session is None \
                    and now - self.heard > CONNECT_TIMEOUT:
                self.carrier.close("no answer to HELLO")
        elif self.hello_at is not None and now >= self.hello_at:
            self.send_hello(now)
        if self.session is not None:
            if now - self.heard > 2 * self.keepalive + 5:
                self.log.warning("no word from the relay for %d s; registering again",
                                 now - self.heard)
                self.session = None
                self.start_handshake(now)
            elif now - self.sent >= self.keepalive or now - self.heard >= self.keepalive:
                self.send_keepalive(now)
        while self.flows:
            tag, flow = next(iter(self.flows.items()))
            if now - flow.seen <= self.flow_idle:
                break
            del self.flows[tag]
            self.close_flow(flow)
            self.tell_relay(T_CLOSE, tag, REASON.pack(CLOSE_IDLE))
            self.log.debug("flow %d idle; closed", tag)
        self.after_events()
        self.drop_log.maybe_log(now)

    def on_stop(self, final):
        if self.session is not None:
            self.tell_relay(T_BYE, 0, REASON.pack(CLOSE_SHUTDOWN))
            self.after_events()
        self.alive = False
        if self.tcp:
            self.dialer.stop()
            if self.carrier is not None:
                self.carrier.close("stopping")

    def on_exit(self):
        for flow in self.flows.values():
            self.close_flow(flow)
        self.log.info("stopped")


def main(args):
    log = setup_log(args.get("--debug"))
    if args.get("--config"):
        config = load_expose(args["--config"], log)
    else:
        config = expose_from_options(args, log)
    raise_open_files(config.max_flows + 64, log, "max_flows service sockets")
    worker = ExposeWorker(config.relay, config.service, config.key, carrier=config.carrier,
                          keepalive=config.keepalive, flow_idle=config.flow_idle,
                          max_flows=config.max_flows, log=log)
    return worker.serve()
