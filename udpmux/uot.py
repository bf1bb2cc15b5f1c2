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

import time

from udpmux import addr, agentstatus, config, sockets, wire
from udpmux.agentreload import Reloader
from udpmux.batchio import Batch
from udpmux.carrier import Dialer, TcpCarrier
from udpmux.datapath import BATCH, Drops, Sender, batches
from udpmux.endpoint import (
    ENDED, KEEPALIVE_EVERY, LOST, NEW, UP, Initiator, Responder, dead_after,
)
from udpmux.flows import ClientFlows, ServiceFlows
from udpmux.limits import raise_open_files, source_of, to_make_room
from udpmux.log import Every, setup as setup_log
from udpmux.reasons import (
    R_NO_CONNECTION, R_SESSION, R_TARGET, R_TCP_FULL, R_TOO_LARGE, R_UNEXPECTED,
    R_UNKNOWN_TAG,
)
from udpmux.session import Acceptor
from udpmux.tagtable import TagTable
from udpmux.watch import UNAUTHENTIC
from udpmux.worker import Worker
from udpmux.wire import (
    CLOSE_REFUSED, CLOSE_SHUTDOWN, HEADER_SIZE, MAC_SIZE, MAX_UDP_PAYLOAD, REASON, T_BYE,
    T_CLOSE, T_DATA, T_HELLO, Malformed, parse_header,
)

HANDSHAKE_TIMEOUT = 5.0         # seconds a new connection has to finish its handshake
HANDSHAKING = 16                # connections at once that have not finished their handshake
HANDSHAKING_PER_SOURCE = 4      # ... from one source (IPv4 address, IPv6 /64)
DEAD_AFTER = dead_after(KEEPALIVE_EVERY)     # seconds without a word: the connection is dead
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

def refused(reason):
    """Why a connection ends for a message it sent, in words."""
    what = UNAUTHENTIC.get(reason)
    return f"its messages {what}" if what else f"a message refused ({reason})"


# -- the server

class Client:
    """One connection at the server, with its session (a responder of its own, sharing
    the server's Acceptor and its bounds)."""

    def __init__(self, carrier, peer, now, acceptor):
        self.carrier = carrier
        self.peer = peer                # its address, as a peer key
        self.source = source_of(peer)
        self.hello = False              # it sent a HELLO that verified and was new
        self.name = addr.format_peer(peer)
        self.since = now
        self.endpoint = Responder(acceptor.psk, (), acceptor=acceptor)
        self.heard = now
        self.tags = set()               # its flows
        self.ended = None               # why the server ended it, for the log

    @property
    def session(self):
        return self.endpoint.session


class UotServer(Worker):
    def __init__(self, listener, target, key, flow_idle=180.0, max_flows=1024, max_clients=64,
                 previous_key=None, log=None):
        super().__init__("uot-server", None, (), log)
        self.previous_key = previous_key    # a key being rotated out, still welcomed
        self.listener = listener
        self.target = target            # (family, sockaddr)
        self.key = key
        self.keyed = key is not None
        self.flow_idle = flow_idle
        self.max_flows = max_flows
        self.max_clients = max_clients

    def setup(self):
        self.acceptor = Acceptor(self.key, [wire.ROLE_UOT], previous=self.previous_key)
        self.clients = {}               # carrier -> Client
        self.drops = self.drop = Drops(self.log, "uot-server")
        self.every = Every(60.0)
        self.flows = ServiceFlows(self.poller, self.target, self.max_flows, self.drops,
                                  self.log, self.from_target, self.flow_closed, R_TARGET,
                                  MAX_UDP_PAYLOAD)
        self.poller.register(self.listener, self.on_accept)
        self.log.info("carrying UDP for %s over TCP at %s", addr.format_endpoint(*self.target),
                      addr.format_endpoint(self.listener.family, self.listener.getsockname()))

    # -- connections

    def on_accept(self):
        def failed(exc):                # out of descriptors: say so, try again later
            if self.every("accept", time.monotonic()):
                self.log.error("cannot accept a connection: %s", exc.strerror)
        for sock, sockaddr in sockets.accepted(self.listener, 64, failed):
            carrier = TcpCarrier(sock, self.poller, self.on_message, self.on_closed)
            self.join(carrier, addr.peer_key(sock.family, sockaddr), time.monotonic())
            carrier.on_readable()       # its HELLO, if here already, before the next one

    def join(self, carrier, peer, now):
        """A new connection from `peer`.  Connections still shaking hands have their own,
        small bound, so strangers cannot take the places of clients that hold the key:
        the one to_make_room() names is closed for it."""
        waiting = [c for c in self.clients.values() if c.session is None]
        oldest = to_make_room(waiting, source_of(peer), HANDSHAKING_PER_SOURCE, HANDSHAKING,
                              now)
        if oldest is not None:
            self.end(oldest, "closed for a newer connection", R_TCP_FULL)
        client = self.clients[carrier] = Client(carrier, peer, now, self.acceptor)
        self.log.debug("connection from %s", client.name)
        return client

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
        self.drops.take(carrier.drops)
        for tag in client.tags:
            self.flows.close((client, tag))
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
        if client is not None:
            self.from_client(client, msg, time.monotonic())

    def from_client(self, client, msg, now):
        carrier = client.carrier
        if client.session is None:
            # A connection is one handshake: first its HELLO, then the first message of
            # that session; anything else, a second HELLO too, ends it.
            try:
                is_hello = parse_header(msg, self.keyed)[0] == T_HELLO
            except Malformed as exc:
                self.end(client, refused(exc.reason), exc.reason)
                return
            if is_hello == client.hello:
                self.end(client, f"a message refused ({R_UNEXPECTED})", R_UNEXPECTED)
                return
        got = client.endpoint.receive(msg, client.peer, now)
        if got.reason is not None:
            reason = R_UNEXPECTED if got.reason == R_SESSION and not client.session \
                else got.reason
            self.end(client, refused(reason), reason)
            return
        for reply, _to in got.replies:
            carrier.send(reply)
        if got.session is None:             # its HELLO, answered
            client.hello = True
            return
        client.heard = now
        if got.event == NEW:
            established = sum(1 for c in self.clients.values() if c.session is not None)
            if established > self.max_clients:
                self.end(client, f"max_clients ({self.max_clients}) already connected",
                         R_TCP_FULL)
                return
            self.log.info("client %s: connected", client.name)
        elif got.event == ENDED:
            carrier.close("the client said goodbye")
        elif got.mtype == T_DATA:
            self.to_target(client, got.tag,
                           memoryview(msg)[HEADER_SIZE:len(msg) - self.trailer()], now)
        elif got.mtype == T_CLOSE:
            if self.flows.close((client, got.tag)) is not None:
                client.tags.discard(got.tag)
                client.carrier.forget(got.tag)

    def trailer(self):
        return MAC_SIZE if self.keyed else 0

    # -- flows

    def to_target(self, client, tag, body, now):
        key = (client, tag)
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows.open(key, tag, now, owner=client)
            if flow is None:            # no socket (logged): the client closes the flow
                if client.session is not None:
                    client.carrier.send(client.session.seal(T_CLOSE, tag,
                                                            REASON.pack(CLOSE_REFUSED)), tag)
                return
            client.tags.add(tag)
            self.log.debug("client %s: flow %d opened", client.name, tag)
        self.flows.send(flow, body, now)

    def from_target(self, flow, buf, size):
        client = flow.owner
        session = client.session
        if session is None:
            return
        length = session.seal_into(buf, 0, size, T_DATA, flow.tag)
        client.carrier.send(bytes(self.flows.view[:length]), flow.tag)

    def flow_closed(self, flow, reason):
        """A flow ended here (idle, or evicted): the client is told."""
        client = flow.owner
        client.tags.discard(flow.tag)
        client.carrier.forget(flow.tag)
        if client.session is not None:
            client.carrier.send(client.session.seal(T_CLOSE, flow.tag, REASON.pack(reason)))

    # -- housekeeping

    def after_events(self):
        for carrier in list(self.clients):
            carrier.flush()

    def tick(self, now):
        for client in list(self.clients.values()):
            if client.session is None and now - client.since > HANDSHAKE_TIMEOUT:
                self.end(client, "no handshake within %d s" % HANDSHAKE_TIMEOUT)
            elif client.session is not None and now - client.heard > DEAD_AFTER:
                self.end(client, f"no word for {now - client.heard:.0f} s")
        self.flows.expire(now, self.flow_idle)
        self.acceptor.expire(now)
        for carrier in self.clients:
            self.drops.take(carrier.drops)
        self.drops.tick(now)

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

    # -- reload (agentreload.py)

    FIXED = ("listen",)

    def apply(self, config, changed):
        self.flow_idle, self.max_clients = config.flow_idle, config.max_clients
        self.max_flows = self.flows.max_flows = config.max_flows
        if {"max_flows", "max_clients"} & set(changed):
            raise_open_files(config.max_flows + config.max_clients + 64, self.log,
                             "max_flows and max_clients")
        if "peer" in changed:           # every flow's next datagram opens a new socket
            self.target = self.flows.endpoint = config.peer
            self.flows.close_all()
        if {"key", "previous_key"} & set(changed):
            # New connections are welcomed under the new keys; those that are up go on.
            self.key, self.keyed = config.key, config.key is not None
            self.acceptor = Acceptor(self.key, [wire.ROLE_UOT], previous=config.previous_key)

    # -- status

    def report(self, now):
        peers = [{"role": "client", "name": c.name, "address": c.name,
                  "state": "up" if c.session is not None else "hello", "carrier": "tcp",
                  "path": None, "handshake_ago": None, "seen_as": None, "trouble": None,
                  "heard_ago": agentstatus.ago(now, c.heard) if c.session else None}
                 for c in self.clients.values()]
        return {"peers": peers, "flows": len(self.flows), "max_flows": self.max_flows,
                "counters": self.flows.totals()}

    def flow_list(self, now, limit=None):
        return agentstatus.service_flows_report(self.flows, now, limit)


# -- the client

class UotClient(Worker):
    def __init__(self, udp, server, key, flow_idle=180.0, max_flows=1024, log=None):
        super().__init__("uot-client", None, (), log)
        self.udp = udp                  # the bound UDP socket local clients send to
        self.server = server            # an addr.Destination
        self.key = key
        self.keyed = key is not None
        self.flow_idle = flow_idle
        self.max_flows = max_flows

    def setup(self):
        self.table = TagTable(self.max_flows)
        self.table.attach()
        self.flows = ClientFlows(self.table, self.flow_closed)
        self.endpoint = Initiator(self.key, wire.ROLE_UOT, repeat=False)
        self.carrier = None
        self.dialer = Dialer(self.server, self.poller, self.on_connected, self.log,
                             "the uot-server", BACKOFF_FIRST, BACKOFF_MAX, CONNECT_TIMEOUT)
        self.drops = self.drop = Drops(self.log, "uot-client")
        self.batch = Batch(BATCH)
        self.sender = Sender(self.udp, self.drops)
        self.poller.register(self.udp, self.on_udp)
        self.log.info("carrying UDP from %s over TCP to %s",
                      addr.format_endpoint(self.udp.family, self.udp.getsockname()),
                      self.server)

    # -- the connection

    def on_connected(self, sock):
        self.carrier = TcpCarrier(sock, self.poller, self.on_message, self.on_closed)
        self.welcomed_here = False      # whether this connection ever carried a session
        now = time.monotonic()
        self.endpoint.start(now)
        self.send_due(now)

    def on_closed(self, carrier, why):
        if carrier is not self.carrier:
            return
        self.drops.take(carrier.drops)
        self.carrier = None
        now = time.monotonic()
        self.endpoint.stop(now)
        if not self.alive:
            return
        if self.welcomed_here:
            self.log.warning("connection to %s lost (%s); reconnecting, the flows stay",
                             self.server, why)
            self.dialer.lost(now)
        else:
            # Closed before a WELCOME: a server that cannot verify our HELLO says
            # nothing and closes.
            self.dialer.failed(now, f"{why} before the handshake ended: a uot-server with "
                               "another key (or without one)?")

    def on_message(self, carrier, msg):
        now = time.monotonic()
        got = self.endpoint.receive(msg, now)
        if got.reason is not None:
            carrier.close(f"a message refused ({got.reason})")
            return
        for reply, _to in got.replies:
            carrier.send(reply)
        if got.event == NEW:
            self.dialer.succeeded()
            self.welcomed_here = True
            self.log.info("connected to %s", self.server)
        elif got.event == LOST:
            carrier.close("the server said goodbye")
        elif got.mtype == T_DATA:
            slot = self.table.slot_of_tag(got.tag)
            if slot is None:
                self.drop(R_UNKNOWN_TAG)
                return
            body = memoryview(msg)[HEADER_SIZE:len(msg) - (MAC_SIZE if self.keyed else 0)]
            self.table.touch(slot, now, len(body), outward=True)
            self.sender.add(body, self.table.keys[slot])
        elif got.mtype == T_CLOSE:
            self.flows.forget(got.tag)

    def flow_closed(self, tag, reason):
        """A flow ended here (idle, or evicted for a new one): the server ends it too."""
        session = self.endpoint.session
        if session is not None and self.carrier is not None:
            self.carrier.send(session.seal(T_CLOSE, tag, REASON.pack(reason)))

    # -- local datagrams

    def on_udp(self):
        batch, table = self.batch, self.table
        for n in batches(self.udp, batch, self.drops):
            now = time.monotonic()
            session, carrier = self.endpoint.session, self.carrier
            view, lengths, keys, starts = batch.view, batch.lengths, batch.keys, batch.starts
            for i in range(n):
                length = lengths[i]
                if length > MAX_UDP_PAYLOAD or length > batch.capacity:
                    self.drop(R_TOO_LARGE)
                    continue
                slot = self.flows.touch(keys[i], now, length)
                if session is None:
                    self.drop(R_NO_CONNECTION)
                    continue
                start = starts[i]
                tag = table.tags[slot]
                carrier.send(session.seal(T_DATA, tag, view[start:start + length]), tag)

    def after_events(self):
        if self.carrier is not None:
            self.carrier.flush()
            if self.carrier is not None and self.carrier.frames_out:
                self.endpoint.sent = time.monotonic()
                self.carrier.frames_out = 0
        self.sender.flush()

    # -- housekeeping

    def send_due(self, now):
        got = self.endpoint.due(now)
        if got.event == LOST and self.carrier is not None:
            self.carrier.close(f"no word for {now - self.endpoint.heard:.0f} s")
            return
        for msg, _to in got.replies:
            if self.carrier is not None:
                self.carrier.send(msg)

    def tick(self, now):
        self.dialer.tick(now)
        if self.carrier is not None:
            if self.endpoint.state != UP and now - self.endpoint.heard > CONNECT_TIMEOUT:
                self.carrier.close("no answer to the handshake")
            else:
                self.send_due(now)
        self.flows.expire(now, self.flow_idle)
        if self.carrier is not None:
            self.drops.take(self.carrier.drops)
        self.drops.tick(now)

    def on_stop(self, final):
        self.alive = False
        self.dialer.stop()
        if self.carrier is not None:
            if self.endpoint.session is not None:
                self.carrier.send(self.endpoint.session.seal(T_BYE, 0,
                                                             REASON.pack(CLOSE_SHUTDOWN)))
            self.carrier.flush()
            self.carrier.close("stopping")

    def on_exit(self):
        self.udp.close()
        self.log.info("stopped")

    # -- reload (agentreload.py)

    FIXED = ("listen", "max_flows")     # max_flows: the flow table's size

    def apply(self, config, changed):
        self.flow_idle = config.flow_idle
        if "peer" in changed:
            self.server = self.dialer.destination = config.peer
        if {"key", "peer"} & set(changed):
            self.key, self.keyed = config.key, config.key is not None
            self.endpoint = Initiator(self.key, wire.ROLE_UOT, repeat=False)
            if self.carrier is not None:    # connect again, and say hello under it
                self.carrier.close("the configuration changed")

    # -- status

    def report(self, now):
        server = agentstatus.peer_report(
            "server", self.server.text, self.endpoint, now,
            address=agentstatus.endpoint_text(self.server.address), carrier="tcp")
        if self.carrier is None:
            agentstatus.dialing(server, self.dialer)
        return {"peers": [server], "flows": len(self.table), "max_flows": self.max_flows,
                "counters": agentstatus.table_totals(self.flows)}

    def flow_list(self, now, limit=None):
        return agentstatus.table_flows_report(self.table, now, limit)


# -- command lines

def _settings(args, server, log):
    if args.get("--config"):
        return config.load_uot(args["--config"], server, log)
    return config.uot_from_options(args, server, log)


def _serve(worker, mode, args, settings, log):
    server = mode == "uot-server"
    return worker.serve(
        agentstatus.Inspector(mode, settings.control_socket, settings.metrics_listen, log,
                              settings.path),
        Reloader.factory(lambda: _settings(args, server, log), settings, worker.FIXED, log))


def server_main(args):
    log = setup_log(args.get("--debug"))
    settings = _settings(args, True, log)
    raise_open_files(settings.max_flows + settings.max_clients + 64, log,
                     "max_flows and max_clients")
    listener = sockets.tcp_listener(*settings.listen, "listen" if settings.path
                                    else "--listen")
    worker = UotServer(listener, settings.peer, settings.key, flow_idle=settings.flow_idle,
                       max_flows=settings.max_flows, max_clients=settings.max_clients,
                       previous_key=settings.previous_key, log=log)
    return _serve(worker, "uot-server", args, settings, log)


def client_main(args):
    log = setup_log(args.get("--debug"))
    settings = _settings(args, False, log)
    udp = sockets.udp(*settings.listen, "listen" if settings.path else "--listen")
    worker = UotClient(udp, settings.peer, settings.key, flow_idle=settings.flow_idle,
                       max_flows=settings.max_flows, log=log)
    return _serve(worker, "uot-client", args, settings, log)
