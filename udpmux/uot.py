"""`udpmux uot-server` and `udpmux uot-client`: UDP datagrams carried over TCP.

For networks that drop UDP, services that listen on loopback only, and channels that
carry only TCP (ssh -L, adb forward)::

    UDP clients ---> uot-client ====== one TCP connection ======> uot-server ---> UDP target
    (each address     (a tag per       (framed, authenticated      (one UDP socket
     is a flow)        client address)  messages: wire.py)          per flow)

The client starts a session with HELLO/WELCOME on each connection (a challenge and
a response: both ends' randoms make the session keys), so every later frame carries a
MAC and a nonce: bytes injected into the stream, or a stream taken over, end the
connection instead of reaching the target.  One connection's bad frame ends that
connection only; the server and its other clients carry on.

Head-of-line: a flow whose target socket cannot take more waits in its own bounded
queue (the oldest datagram is dropped and counted when it is full), and the TCP
connection serves its flows' queues in turn (carrier.py), so one slow flow never
holds up the others.

Bounds: the server holds at most max_clients connections and max_flows flows (UDP
sockets) in all, closing the idlest flow for a new one; flows idle for flow_idle end
at both ends; a connection must finish its handshake within HANDSHAKE_TIMEOUT, and
connections still shaking hands are bounded per source and in all, the oldest of
them closed to make room for a newcomer (limits.to_make_room), so strangers holding
connections open cannot keep a client with the key out.  The
client keeps at most max_flows flows in its tag table; tags are reused after expiry,
so any number of client addresses over time is fine.  When the connection drops the
client reconnects with backoff and keeps its flows.

How we name things:
  client    on the server: one TCP connection from a uot-client
  flow      one local UDP client address (uot-client) / its UDP socket to the target
            (uot-server), known at both ends by its tag
"""

import errno
import socket
import time
from collections import OrderedDict, deque

from udpmux import addr, wire
from udpmux.auth import read_key
from udpmux.batchio import Batch, Outbox, recv_into
from udpmux.carrier import Dialer, TcpCarrier
from udpmux.config import UOT_SETTINGS, option_values
from udpmux.errors import EXIT_NOPERM, EXIT_OSERR, Fatal, UsageError
from udpmux.limits import raise_open_files, source_of, to_make_room
from udpmux.log import DropLog, Every, setup as setup_log
from udpmux.session import Acceptor, Drop, Initiator
from udpmux.tagtable import TagTable
from udpmux.worker import Worker
from udpmux.wire import (
    CLOSE_EVICTED, CLOSE_IDLE, CLOSE_SHUTDOWN, HEADER_SIZE, KEEPALIVE, KEEPALIVE_REPLY,
    MAC_SIZE, MAX_UDP_PAYLOAD, REASON, T_BYE, T_CLOSE, T_DATA, T_HELLO, T_KEEPALIVE,
    T_WELCOME, Malformed, parse_header,
)

HANDSHAKE_TIMEOUT = 5.0         # seconds a new connection has to finish its handshake
HANDSHAKING = 16                # connections at once that have not finished their handshake
HANDSHAKING_PER_SOURCE = 4      # ... from one source (IPv4 address, IPv6 /64)
KEEPALIVE_EVERY = 15.0          # seconds between the client's keepalives when idle
DEAD_AFTER = 3                  # keepalive intervals without a word: the connection is dead
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
TARGET_QUEUE = 256              # datagrams a flow may have waiting for its target socket
SERVICE_DRAIN = 64              # datagrams read from one target socket per wake-up
BATCH = 64
SOCKET_BUFFER = 4 * 1024 * 1024

R_TOO_LARGE = wire.R_TOO_LARGE
R_QUEUE = "queue"               # the oldest datagram of a full per-flow queue
R_TARGET = "target"             # the target refused a datagram (not running: ICMP)
R_NO_CONNECTION = "no-connection"   # a local datagram while the client is not connected
R_UNKNOWN_TAG = "unknown-tag"   # data from the server for a flow the client no longer has
R_TCP_FULL = "tcp-full"         # a connection closed for a newer one, or beyond max_clients
R_RECEIVE = "receive"           # receiving on the client's UDP socket failed (ICMP, mostly)


def _tcp_listen(endpoint, what):
    family, sockaddr = endpoint
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise Fatal(f"{what}: cannot listen on {addr.format_endpoint(family, sockaddr)}: "
                    f"{exc.strerror}",
                    status=EXIT_NOPERM if exc.errno == errno.EACCES else EXIT_OSERR) from None
    sock.setblocking(False)
    return sock


def _udp_bind(endpoint, what):
    family, sockaddr = endpoint
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise Fatal(f"{what}: cannot bind {addr.format_endpoint(family, sockaddr)}: "
                    f"{exc.strerror}",
                    status=EXIT_NOPERM if exc.errno == errno.EACCES else EXIT_OSERR) from None
    sock.setblocking(False)
    return sock


# -- the server

class TargetFlow:
    """One flow at the server: a UDP socket connected to the target."""

    __slots__ = ("client", "tag", "sock", "seen", "queue")

    def __init__(self, client, tag, sock, seen):
        self.client = client
        self.tag = tag
        self.sock = sock
        self.seen = seen
        self.queue = deque()            # datagrams the socket could not take yet


class Client:
    """One connection at the server."""

    def __init__(self, carrier, peer, now):
        self.carrier = carrier
        self.peer = peer                # its address, as a peer key
        self.source = source_of(peer)
        self.hello = False              # it sent a HELLO that verified and was new
        self.name = addr.format_peer(peer)
        self.since = now
        self.session = None
        self.pending = None             # the session id welcomed, not yet confirmed
        self.heard = now
        self.flows = {}                 # tag -> TargetFlow
        self.ended = None               # why the server ended it, for the log


class UotServer(Worker):
    def __init__(self, listener, target, key, flow_idle=180.0, max_flows=1024, max_clients=64,
                 log=None):
        super().__init__("uot-server", None, (), log)
        self.listener = listener
        self.target = target            # (family, sockaddr)
        self.key = key
        self.keyed = key is not None
        self.flow_idle = flow_idle
        self.max_flows = max_flows
        self.max_clients = max_clients

    def setup(self):
        self.acceptor = Acceptor(self.key, [wire.ROLE_UOT])
        self.clients = {}               # carrier -> Client
        self.lru = OrderedDict()        # (client, tag) -> TargetFlow, idlest first
        self.drops = {}
        self.drop_log = DropLog(self.log, "uot-server", 60.0)
        self.every = Every(60.0)
        self.buf = bytearray(HEADER_SIZE + MAX_UDP_PAYLOAD + MAC_SIZE + 1)
        self.view = memoryview(self.buf)
        self.poller.register(self.listener, self.on_accept)
        self.log.info("carrying UDP for %s over TCP at %s", addr.format_endpoint(*self.target),
                      addr.format_endpoint(self.listener.family, self.listener.getsockname()))

    def drop(self, reason, n=1):
        self.drops[reason] = self.drops.get(reason, 0) + n
        self.drop_log.count(reason, n)

    # -- connections

    def on_accept(self):
        for _ in range(64):
            try:
                sock, sockaddr = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:          # out of descriptors: say so, try again later
                if self.every("accept", time.monotonic()):
                    self.log.error("cannot accept a connection: %s", exc.strerror)
                return
            # Connections still shaking hands have their own, small bound, so strangers
            # cannot take the places of clients that hold the key.
            peer = addr.peer_key(sock.family, sockaddr)
            waiting = [c for c in self.clients.values() if c.session is None]
            oldest = to_make_room(waiting, source_of(peer), HANDSHAKING_PER_SOURCE, HANDSHAKING)
            if oldest is not None:
                self.end(oldest, "closed for a newer connection", R_TCP_FULL)
            carrier = TcpCarrier(sock, self.poller, self.on_message, self.on_closed)
            client = Client(carrier, peer, time.monotonic())
            self.clients[carrier] = client
            self.log.debug("connection from %s", client.name)

    def end(self, client, why, reason=None):
        """End a connection because of what it sent: counted, and logged (at most a line
        per reason every minute, so that strangers do not write the log)."""
        client.ended = why
        if reason is not None:
            self.drop(reason)
        client.carrier.close(why)

    def on_closed(self, carrier, why):
        client = self.clients.pop(carrier, None)
        if client is None:
            return
        for reason, n in carrier.drops.items():
            self.drop(reason, n)
        carrier.drops.clear()
        for flow in list(client.flows.values()):
            self.close_flow(flow)
        if client.ended is not None:
            if self.every(client.ended, time.monotonic()):
                self.log.warning("client %s: %s; its connection is closed", client.name, why)
        elif client.session is not None:
            self.log.info("client %s: connection closed (%s)", client.name, why)
        else:
            self.log.debug("client %s: connection closed before its handshake (%s)",
                           client.name, why)

    # -- messages from a client

    def on_message(self, carrier, msg):
        client = self.clients.get(carrier)
        if client is None:
            return
        now = time.monotonic()
        try:
            mtype, sid, tag, nonce = parse_header(msg, self.keyed)
            session = client.session
            if session is None:
                session = self.handshake(client, msg, mtype, sid, nonce, now)
                if session is None:
                    return
            elif sid != session.local_id:
                raise Drop("session")
            else:
                session.open(msg, nonce)
        except (Malformed, Drop) as exc:
            self.end(client, f"a message refused ({exc.reason})", exc.reason)
            return
        client.heard = now
        if mtype == T_DATA:
            self.to_target(client, tag, memoryview(msg)[HEADER_SIZE:len(msg) - self.trailer()],
                           now)
        elif mtype == T_CLOSE:
            flow = client.flows.get(tag)
            if flow is not None:
                self.close_flow(flow)
        elif mtype == T_KEEPALIVE:
            flags, stamp, _echo = KEEPALIVE.unpack_from(msg, HEADER_SIZE)
            if flags & KEEPALIVE_REPLY:
                carrier.send(session.seal(T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, stamp)))
        elif mtype == T_BYE:
            carrier.close("the client said goodbye")

    def trailer(self):
        return MAC_SIZE if self.keyed else 0

    def handshake(self, client, msg, mtype, sid, nonce, now):
        """HELLO, then the first message of the session; returns the session once
        confirmed.  Anything else ends the connection (Drop)."""
        if client.pending is None:
            if mtype != T_HELLO:
                raise Drop("unexpected")
            welcome, pending = self.acceptor.hello(msg, client.peer, now,
                                                   taken=(), epoch=0)
            client.pending = pending.local_id
            client.hello = True
            client.carrier.send(welcome)
            return None
        if sid != client.pending:
            raise Drop("unexpected")
        session = self.acceptor.confirm(sid, msg, nonce)
        if len(self.clients) - sum(1 for c in self.clients.values() if c.session is None) \
                >= self.max_clients:
            self.end(client, f"max_clients ({self.max_clients}) already connected", R_TCP_FULL)
            return None
        client.session = session
        self.log.info("client %s: connected", client.name)
        return session

    # -- flows

    def to_target(self, client, tag, body, now):
        flow = client.flows.get(tag)
        if flow is None:
            flow = self.open_flow(client, tag, now)
            if flow is None:
                return
        else:
            self.lru.move_to_end((client, tag))
        flow.seen = now
        if flow.queue:
            self.queue(flow, bytes(body))
            return
        try:
            flow.sock.send(body)
        except BlockingIOError:
            self.queue(flow, bytes(body))
            self.poller.want_write(flow.sock, True)
        except ConnectionRefusedError:
            self.drop(R_TARGET)
        except OSError:
            self.drop(R_TARGET)

    def queue(self, flow, data):
        if len(flow.queue) >= TARGET_QUEUE:
            flow.queue.popleft()
            self.drop(R_QUEUE)
        flow.queue.append(data)

    def on_target_writable(self, flow):
        while flow.queue:
            try:
                flow.sock.send(flow.queue[0])
            except BlockingIOError:
                return
            except OSError:
                self.drop(R_TARGET)
            flow.queue.popleft()
        self.poller.want_write(flow.sock, False)

    def open_flow(self, client, tag, now):
        if len(self.lru) >= self.max_flows:
            _key, old = self.lru.popitem(last=False)
            self.close_flow(old, tell=CLOSE_EVICTED)
        family, sockaddr = self.target
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.connect(sockaddr)
        except OSError as exc:
            if self.every("socket", now):
                self.log.error("cannot open a socket to the target: %s", exc.strerror)
            self.drop(R_TARGET)
            return None
        sock.setblocking(False)
        flow = TargetFlow(client, tag, sock, now)
        client.flows[tag] = flow
        self.lru[(client, tag)] = flow
        self.poller.register(sock, lambda: self.from_target(flow),
                             lambda: self.on_target_writable(flow))
        self.log.debug("client %s: flow %d opened", client.name, tag)
        return flow

    def close_flow(self, flow, tell=None):
        client = flow.client
        client.flows.pop(flow.tag, None)
        self.lru.pop((client, flow.tag), None)
        client.carrier.forget(flow.tag)
        self.poller.unregister(flow.sock)
        flow.sock.close()
        if tell is not None and client.session is not None:
            client.carrier.send(client.session.seal(T_CLOSE, flow.tag, REASON.pack(tell)))

    def from_target(self, flow):
        client = flow.client
        session = client.session
        body = self.view[HEADER_SIZE:HEADER_SIZE + MAX_UDP_PAYLOAD + 1]
        for _ in range(SERVICE_DRAIN):
            try:
                size = flow.sock.recv_into(body, len(body), socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                self.drop(R_TARGET)
                continue
            except OSError:
                break
            if size > MAX_UDP_PAYLOAD:
                self.drop(R_TOO_LARGE)
                continue
            flow.seen = time.monotonic()
            length = session.seal_into(self.buf, 0, size, T_DATA, flow.tag)
            client.carrier.send(bytes(self.view[:length]), flow.tag)
        if (client, flow.tag) in self.lru:
            self.lru.move_to_end((client, flow.tag))

    # -- housekeeping

    def after_events(self):
        for carrier in list(self.clients):
            carrier.flush()

    def tick(self, now):
        for client in list(self.clients.values()):
            if client.session is None and now - client.since > HANDSHAKE_TIMEOUT:
                self.end(client, "no handshake within %d s" % HANDSHAKE_TIMEOUT)
            elif client.session is not None and now - client.heard > DEAD_AFTER * KEEPALIVE_EVERY:
                self.end(client, f"no word for {now - client.heard:.0f} s")
        while self.lru:
            (_client, _tag), flow = next(iter(self.lru.items()))
            if now - flow.seen <= self.flow_idle:
                break
            self.close_flow(flow, tell=CLOSE_IDLE)
        self.acceptor.expire(now)
        for carrier in self.clients:
            for reason, n in carrier.drops.items():
                self.drop(reason, n)
            carrier.drops.clear()
        self.after_events()
        self.drop_log.maybe_log(now)

    def on_stop(self, final):
        for client in list(self.clients.values()):
            if client.session is not None:
                client.carrier.send(client.session.seal(T_BYE, 0, REASON.pack(CLOSE_SHUTDOWN)))
                client.carrier.flush()
            client.carrier.close("the server stopped")
        self.alive = False

    def on_exit(self):
        self.listener.close()
        self.log.info("stopped")


# -- the client

class UotClient(Worker):
    def __init__(self, udp, server, key, flow_idle=180.0, max_flows=1024, log=None):
        super().__init__("uot-client", None, (), log)
        self.udp = udp                  # the bound UDP socket local clients send to
        self.server = server            # (family, sockaddr)
        self.key = key
        self.keyed = key is not None
        self.flow_idle = flow_idle
        self.max_flows = max_flows

    def setup(self):
        now = time.monotonic()
        self.table = TagTable(self.max_flows)
        self.table.attach()
        self.initiator = Initiator(self.key, wire.ROLE_UOT)
        self.session = None
        self.carrier = None
        self.dialer = Dialer(self.server, self.poller, self.on_connected, self.log,
                             "the uot-server", BACKOFF_FIRST, BACKOFF_MAX, CONNECT_TIMEOUT)
        self.heard = now
        self.sent = now
        self.drops = {}
        self.drop_log = DropLog(self.log, "uot-client", 60.0)
        self.batch = Batch(BATCH)
        self.outbox = Outbox(2 * BATCH)
        self.poller.register(self.udp, self.on_udp)
        self.log.info("carrying UDP from %s over TCP to %s",
                      addr.format_endpoint(self.udp.family, self.udp.getsockname()),
                      addr.format_endpoint(*self.server))

    def drop(self, reason, n=1):
        self.drops[reason] = self.drops.get(reason, 0) + n
        self.drop_log.count(reason, n)

    # -- the connection

    def on_connected(self, sock):
        self.carrier = TcpCarrier(sock, self.poller, self.on_message, self.on_closed)
        self.carrier.send(self.initiator.hello())
        self.heard = self.sent = time.monotonic()

    def on_closed(self, carrier, why):
        if carrier is not self.carrier:
            return
        self.carrier = None
        if not self.alive:
            return
        now = time.monotonic()
        if self.session is not None:
            self.log.warning("connection to %s lost (%s); reconnecting, the flows stay",
                             addr.format_endpoint(*self.server), why)
            self.session = None
            self.dialer.lost(now)
        else:
            self.dialer.failed(now, why)

    def on_message(self, carrier, msg):
        now = time.monotonic()
        try:
            mtype, sid, tag, nonce = parse_header(msg, self.keyed)
            session = self.session
            if session is None:
                if mtype != T_WELCOME:
                    raise Drop("unexpected")
                self.session = session = self.initiator.welcome(msg)
                self.dialer.succeeded()
                self.log.info("connected to %s", addr.format_endpoint(*self.server))
                self.keepalive(now)         # confirms the session at the server
                self.heard = now
                return
            if sid != session.local_id:
                raise Drop("session")
            session.open(msg, nonce)
        except (Malformed, Drop) as exc:
            carrier.close(f"a message refused ({exc.reason})")
            return
        self.heard = now
        if mtype == T_DATA:
            slot = self.table.slot_of_tag(tag)
            if slot is None:
                self.drop(R_UNKNOWN_TAG)
                return
            body = memoryview(msg)[HEADER_SIZE:len(msg) - (MAC_SIZE if self.keyed else 0)]
            self.table.touch(slot, now, len(body), outward=True)
            if not self.outbox.room(len(body)):
                self.flush_udp()
            self.outbox.add(body, self.table.keys[slot])
        elif mtype == T_CLOSE:
            slot = self.table.slot_of_tag(tag)
            if slot is not None:
                self.table.remove(slot)
        elif mtype == T_BYE:
            carrier.close("the server said goodbye")

    def keepalive(self, now):
        if self.session is not None and self.carrier is not None:
            stamp = int(now * 1000) & 0xFFFFFFFF
            self.carrier.send(self.session.seal(T_KEEPALIVE, 0,
                                                KEEPALIVE.pack(KEEPALIVE_REPLY, stamp, 0)))
            self.sent = now

    # -- local datagrams

    def on_udp(self):
        batch = self.batch
        table = self.table
        for _ in range(8):
            n = recv_into(self.udp, batch, 0)
            if not n:
                break
            now = time.monotonic()
            session, carrier = self.session, self.carrier
            view, lengths, keys, starts = batch.view, batch.lengths, batch.keys, batch.starts
            for i in range(n):
                length = lengths[i]
                if length > MAX_UDP_PAYLOAD or length > batch.capacity:
                    self.drop(R_TOO_LARGE)
                    continue
                key = keys[i]
                slot = table.get(key)
                if slot is None:
                    slot, tag, evicted = table.insert(key, now)
                    if evicted is not None and session is not None:
                        carrier.send(session.seal(T_CLOSE, evicted[1],
                                                  REASON.pack(CLOSE_EVICTED)))
                table.touch(slot, now, length)
                if session is None:
                    self.drop(R_NO_CONNECTION)
                    continue
                start = starts[i]
                carrier.send(session.seal(T_DATA, table.tags[slot],
                                          view[start:start + length]), table.tags[slot])
            if n < batch.count:
                break
        if batch.errors:
            self.drop(R_RECEIVE, sum(batch.errors.values()))
            batch.errors.clear()

    def flush_udp(self):
        if len(self.outbox):
            self.outbox.flush(self.udp)
            if self.outbox.drops:
                self.drop("send", sum(self.outbox.drops.values()))
                self.outbox.drops.clear()

    def after_events(self):
        if self.carrier is not None:
            self.carrier.flush()
            if self.carrier is not None and self.carrier.frames_out:
                self.sent = time.monotonic()
                self.carrier.frames_out = 0
        self.flush_udp()

    # -- housekeeping

    def tick(self, now):
        self.dialer.tick(now)
        if self.carrier is not None:
            if self.session is None and now - self.heard > CONNECT_TIMEOUT:
                self.carrier.close("no answer to the handshake")
            elif now - self.heard > DEAD_AFTER * KEEPALIVE_EVERY:
                self.carrier.close(f"no word for {now - self.heard:.0f} s")
            elif now - self.sent >= KEEPALIVE_EVERY or now - self.heard >= KEEPALIVE_EVERY:
                self.keepalive(now)
        for _key, tag in self.table.expire(now, self.flow_idle):
            if self.session is not None:
                self.carrier.send(self.session.seal(T_CLOSE, tag, REASON.pack(CLOSE_IDLE)))
        if self.carrier is not None:
            for reason, n in self.carrier.drops.items():
                self.drop(reason, n)
            self.carrier.drops.clear()
        self.after_events()
        self.drop_log.maybe_log(now)

    def on_stop(self, final):
        self.alive = False
        self.dialer.stop()
        if self.carrier is not None:
            if self.session is not None:
                self.carrier.send(self.session.seal(T_BYE, 0, REASON.pack(CLOSE_SHUTDOWN)))
            self.carrier.flush()
            self.carrier.close("stopping")

    def on_exit(self):
        self.udp.close()
        self.log.info("stopped")


# -- command lines

def _endpoint(args, name, kind=socket.SOCK_DGRAM, passive=False):
    try:
        return addr.parse_endpoint(args[name], kind, passive=passive)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def _settings(args):
    values = option_values(args, UOT_SETTINGS)
    return {s.name: values.get(s.name, s.default) for s in UOT_SETTINGS}


def _key(args, log):
    return None if args["--insecure"] else read_key(args["--key-file"], log)


def server_main(args):
    log = setup_log(args.get("--debug"))
    values = _settings(args)
    listen = _endpoint(args, "--listen", socket.SOCK_STREAM, passive=True)
    target = _endpoint(args, "--target")
    key = _key(args, log)
    raise_open_files(values["max_flows"] + values["max_clients"] + 64, log,
                     "--max-flows and --max-clients")
    listener = _tcp_listen(listen, "uot-server")
    return UotServer(listener, target, key, flow_idle=values["flow_idle"],
                     max_flows=values["max_flows"], max_clients=values["max_clients"],
                     log=log).serve()


def client_main(args):
    log = setup_log(args.get("--debug"))
    values = _settings(args)
    listen = _endpoint(args, "--listen", passive=True)
    server = _endpoint(args, "--server", socket.SOCK_STREAM)
    key = _key(args, log)
    udp = _udp_bind(listen, "uot-client")
    return UotClient(udp, server, key, flow_idle=values["flow_idle"],
                     max_flows=values["max_flows"], log=log).serve()
