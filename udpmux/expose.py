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
import time

from udpmux import addr, agentstatus, sockets, wire
from udpmux.agentreload import Reloader
from udpmux.batchio import Batch
from udpmux.carrier import Dialer, TcpCarrier
from udpmux.config import expose_from_options, load_expose
from udpmux.datapath import BATCH, Drops, Sender, batches
from udpmux.endpoint import LOST, NEW, UP, Initiator
from udpmux.flows import ServiceFlows
from udpmux.limits import raise_open_files
from udpmux.log import setup as setup_log
from udpmux.reasons import R_NO_SESSION, R_SERVICE, R_TOO_LARGE
from udpmux.watch import RESOLVE_FIRST, RESOLVE_MOST, PeerWatch
from udpmux.worker import Worker
from udpmux.wire import (
    CLOSE_NAMES, CLOSE_REFUSED, CLOSE_SHUTDOWN, HEADER_SIZE, MAC_SIZE, MAX_DATAGRAM, REASON, T_BYE, T_CLOSE, T_DATA,
)

CONNECT_TIMEOUT = 10.0          # seconds for a TCP connection to be welcomed
TRY_NEXT_AFTER = 2              # unanswered HELLOs to one address before the next
UDP_HINTS = ("the relay is down, it has another key (or runs without one where we have "
             "one), or UDP to it is blocked; where UDP is blocked, try --carrier tcp")


class ExposeWorker(Worker):
    def __init__(self, relay, service, key, keepalive=25.0, flow_idle=180.0, max_flows=1024,
                 carrier="udp", log=None):
        super().__init__("expose", None, (), log)
        self.tcp = carrier == "tcp"
        self.relay = relay              # an addr.Destination
        self.service = service
        self.key = key
        self.keyed = key is not None
        self.keepalive = keepalive
        self.flow_idle = flow_idle
        self.max_flows = max_flows

    def setup(self, now=None):
        """After start; `now` (time.monotonic() by default) is when, for unit tests."""
        now = time.monotonic() if now is None else now
        self.drops = self.drop = Drops(self.log, "expose")
        self.endpoint = Initiator(self.key, wire.ROLE_EXPOSE, keepalive=self.keepalive,
                                  repeat=not self.tcp)
        self.epoch = None
        self.registered = False         # told the log; again after a session is lost
        self.flows = ServiceFlows(self.poller, self.service, self.max_flows, self.drops,
                                  self.log, self.from_service, self.flow_closed, R_SERVICE,
                                  MAX_DATAGRAM)
        self.batch = Batch(BATCH)
        self.sock = self.carrier = None
        self.sender = Sender(None, self.drops, BATCH)
        self.watch = PeerWatch(self.log, "the relay", lambda: str(self.relay), UDP_HINTS)
        self.resolve_at, self.resolve_wait = now, RESOLVE_FIRST
        if self.tcp:
            self.dialer = Dialer(self.relay, self.poller, self.on_connected, self.log,
                                 "the relay")
        self.log.info("exposing %s through the relay at %s%s",
                      addr.format_endpoint(*self.service), self.relay,
                      " over TCP" if self.tcp else "")
        if not self.tcp:
            self.reach(now)

    def reach(self, now):
        """Over UDP: a socket to the relay's address, once its name resolves (again with
        back-off while the resolver cannot say), and a HELLO from it."""
        if self.relay.address is None:
            try:
                self.relay.resolve()
            except (addr.Unresolved, ValueError) as exc:
                self.watch.refused(now, str(exc))
                self.resolve_at = now + self.resolve_wait
                self.resolve_wait = min(self.resolve_wait * 2, RESOLVE_MOST)
                return
        self.resolve_at, self.resolve_wait = None, RESOLVE_FIRST
        self.open_relay_socket()
        self.endpoint.start(now)

    def open_relay_socket(self):
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close()
        family, sockaddr = self.relay.address
        sock = sockets.udp_connected(family, sockaddr)
        self.sock = self.sender.sock = sock
        self.endpoint.peer = addr.peer_key(family, sock.getpeername())
        if self.endpoint.session is not None:
            self.endpoint.session.peer = self.endpoint.peer
        self.poller.register(sock, self.on_relay)

    # -- from the relay

    def on_relay(self):
        """Messages from the relay, a batch at a time (relay_batch())."""
        for n in batches(self.sock, self.batch, self.drops, errors=self.receive_errors):
            self.relay_batch(n, time.monotonic())

    def receive_errors(self, errors):
        """An ICMP error from the relay's address, reported on the connected socket."""
        if self.endpoint.state != UP:
            self.watch.errors(time.monotonic(), errors)

    def relay_batch(self, n, now):
        """DATA of the current session is opened in place and its body goes to its flow's
        service socket; anything else goes through from_relay(), in order."""
        batch, flows = self.batch, self.flows
        get, send = flows.flows.get, flows.send
        view, lengths, starts = batch.view, batch.lengths, batch.starts
        session = self.endpoint.session
        if session is None:
            results = [None] * n
        else:
            results = session.open_batch(view, starts, lengths, batch.keys, n, self.drop)
            trailer = HEADER_SIZE + (MAC_SIZE if session.keyed else 0)
        for i in range(n):
            tag = results[i]
            if tag is None:
                self.slow(i, now)
                if self.endpoint.session is not session:
                    for j in range(i + 1, n):   # a new session: the rest the slow way
                        self.slow(j, now)
                    return
            elif tag >= 0:
                self.endpoint.heard = now
                flow = get(tag) or self.open_flow(tag, now)
                if flow is not None:
                    start = starts[i] + HEADER_SIZE
                    send(flow, view[start:start + lengths[i] - trailer], now)

    def slow(self, i, now):
        batch = self.batch
        start, length = batch.starts[i], batch.lengths[i]
        if length > batch.capacity:
            self.drop(R_TOO_LARGE)
        else:
            self.from_relay(batch.view[start:start + length], now)

    def from_relay(self, msg, now):
        got = self.endpoint.receive(msg, now)
        for reply, _to in got.replies:
            self.send_relay(reply)
        if got.reason is not None:
            self.drop(got.reason)
            if self.carrier is not None:    # a stream with a bad message in it is done
                self.carrier.close(f"a message refused ({got.reason})")
            return
        if got.event == NEW:
            self.welcomed(got.session, got.old)
            return
        if got.event == LOST:
            if got.mtype == T_BYE:
                self.log.warning("the relay ended our session; registering again")
            else:
                self.log.info("the relay lost our session (it restarted?); registering again")
            self.lost(now)
            return
        if got.mtype == T_DATA:
            body = msg[HEADER_SIZE:len(msg) - (MAC_SIZE if self.keyed else 0)]
            flow = self.flows.get(got.tag) or self.open_flow(got.tag, now)
            if flow is not None:
                self.flows.send(flow, body, now)
        elif got.mtype == T_CLOSE:
            if self.flows.close(got.tag) is not None:
                self.log.debug("flow %d closed by the relay", got.tag)

    def welcomed(self, session, old):
        if self.tcp:
            self.dialer.succeeded()
            self.welcomed_here = True
        if self.epoch is not None and session.epoch != self.epoch and len(self.flows):
            self.log.info("the relay's flow table is new: closing %d flows", len(self.flows))
            self.flows.close_all()
        self.epoch = session.epoch
        self.watch.answered(time.monotonic())
        if old is None and not self.registered:
            self.log.info("registered with the relay at %s, which sees us as %s",
                          self.relay, session.observed)
        else:
            self.log.debug("new session with the relay (it sees us as %s)", session.observed)
        self.registered = True

    def lost(self, now):
        """The session is gone: a new handshake, over TCP on a new connection; over UDP
        to the relay's name resolved again (its address may have changed)."""
        self.registered = False
        if not self.tcp:
            before = self.relay.address
            try:
                self.relay.resolve()
            except (addr.Unresolved, ValueError) as exc:
                self.log.warning("the relay at %s: %s; trying its last address", self.relay,
                                 exc)
            else:
                if self.relay.address != before:
                    self.log.info("the relay's name now resolves to %s", self.relay)
                    self.open_relay_socket()
        if self.tcp and self.carrier is not None:
            self.carrier.close("registering again")

    # -- to and from the service

    def from_service(self, flow, buf, size):
        session = self.endpoint.session
        if session is None:
            self.drop(R_NO_SESSION)
            return
        length = session.seal_into(buf, 0, size, T_DATA, flow.tag)
        self.send_relay(self.flows.view[:length], flow.tag)

    def open_flow(self, tag, now):
        """A service socket for a new flow; when none can be opened (out of descriptors,
        logged once a minute), the relay is told to close the flow, so that its client
        is not black-holed."""
        flow = self.flows.open(tag, tag, now)
        if flow is None:
            self.tell_relay(T_CLOSE, tag, REASON.pack(CLOSE_REFUSED))
        return flow

    def flow_closed(self, flow, reason):
        """A flow ended here (idle, or evicted for a new one): the relay ends it too."""
        self.tell_relay(T_CLOSE, flow.tag, REASON.pack(reason))
        self.log.debug("flow %d %s; closed", flow.tag, CLOSE_NAMES[reason])

    # -- to the relay

    def send_relay(self, msg, tag=None):
        """A message to the relay: over UDP (copied into the outbox) or over TCP (into the
        flow's queue on the connection, or the control queue for tag None)."""
        if self.tcp:
            if self.carrier is not None:
                self.carrier.send(bytes(msg), tag)
            return
        self.sender.add(msg, self.endpoint.peer)

    def tell_relay(self, mtype, tag, body):
        if self.endpoint.session is not None:
            self.send_relay(self.endpoint.session.seal(mtype, tag, body))

    def after_events(self):
        if self.carrier is not None:
            self.carrier.flush()
            if self.carrier is not None and self.carrier.frames_out:
                self.carrier.frames_out = 0
                self.endpoint.sent = time.monotonic()
        elif len(self.sender):
            self.sender.flush()
            self.endpoint.sent = time.monotonic()

    # -- over TCP

    def on_connected(self, sock):
        self.welcomed_here = False      # whether this connection ever carried a session
        self.carrier = TcpCarrier(sock, self.poller, self.on_carrier_message,
                                  self.on_carrier_closed)
        self.endpoint.peer = None
        self.endpoint.start(time.monotonic())
        self.send_due(time.monotonic())

    def on_carrier_message(self, carrier, msg):
        if carrier is self.carrier:
            self.from_relay(msg, time.monotonic())

    def on_carrier_closed(self, carrier, why):
        if carrier is not self.carrier:
            return
        self.carrier = None
        now = time.monotonic()
        up = self.endpoint.state == UP
        self.endpoint.stop(now)
        if not self.alive:
            return
        if self.welcomed_here:
            if up:
                self.log.warning("the connection to the relay ended (%s); connecting again",
                                 why)
            self.registered = False
            self.dialer.lost(now)
        else:
            self.dialer.failed(now, why)

    # -- timers

    def send_due(self, now):
        got = self.endpoint.due(now)
        if got.event == LOST:
            self.log.warning("no word from the relay for %d s; registering again",
                             now - self.endpoint.heard)
            self.lost(now)
            got = self.endpoint.due(now)
        for msg, _to in got.replies:
            if self.tcp:
                self.send_relay(msg)
            elif self.endpoint.state == UP:
                self.send_relay(msg)
            else:
                self.send_hello(msg, now)

    def send_hello(self, msg, now):
        self.watch.hello_sent(now)
        if self.watch.unanswered % TRY_NEXT_AFTER == 0:
            self.try_next(now)
        try:
            self.sock.send(msg)
        except BlockingIOError:
            pass
        except OSError as exc:
            # The relay is unreachable from here just now (ICMP), or our address went
            # away: say so, start over with a fresh socket and keep trying.
            self.log.debug("sending HELLO: %s", exc.strerror)
            self.watch.errors(now, [exc.errno])
            if exc.errno not in (errno.ECONNREFUSED,):
                self.open_relay_socket()

    def try_next(self, now):
        """Unanswered: the relay's next address (past the last, its name resolved again),
        on a new socket when the address is another."""
        before = self.relay.address
        if self.relay.advance() != before:
            self.log.debug("trying the relay at %s", self.relay)
            self.open_relay_socket()

    def wake_at(self, now):
        return self.endpoint.wake_at()

    def on_wake(self, now):
        self.send_due(now)

    def tick(self, now):
        if self.resolve_at is not None and now >= self.resolve_at:
            self.reach(now)
        if self.tcp:
            self.dialer.tick(now)
            if self.carrier is not None and self.endpoint.state != UP \
                    and now - self.endpoint.heard > CONNECT_TIMEOUT:
                self.carrier.close("no answer to HELLO: not a udpmux relay, or one with "
                                   "another key")
        self.send_due(now)
        self.flows.expire(now, self.flow_idle)
        self.drops.tick(now)

    def on_stop(self, final):
        if self.endpoint.session is not None:
            self.tell_relay(T_BYE, 0, REASON.pack(CLOSE_SHUTDOWN))
            self.after_events()
        self.alive = False
        if self.tcp:
            self.dialer.stop()
            if self.carrier is not None:
                self.carrier.close("stopping")

    def on_exit(self):
        self.flows.close_all()
        self.log.info("stopped")

    # -- reload (agentreload.py)

    FIXED = ("carrier",)                # the rest changes in place

    def apply(self, config, changed):
        self.keepalive, self.flow_idle = config.keepalive, config.flow_idle
        self.max_flows = self.flows.max_flows = config.max_flows
        if "max_flows" in changed:
            raise_open_files(config.max_flows + 64, self.log, "max_flows service sockets")
        if "service" in changed:        # every flow's next datagram opens a new socket
            self.service = self.flows.endpoint = config.service
            self.flows.close_all()
        if "relay" in changed:
            self.relay = config.relay
            if self.tcp:
                self.dialer.destination = config.relay
        if {"key", "relay", "keepalive"} & set(changed):
            self.key, self.keyed = config.key, config.key is not None
            self.register_again(time.monotonic())

    def register_again(self, now):
        """A new handshake, under the key and with the relay of the configuration."""
        self.endpoint = Initiator(self.key, wire.ROLE_EXPOSE, keepalive=self.keepalive,
                                  repeat=not self.tcp)
        self.registered = False
        if self.tcp:
            if self.carrier is not None:
                self.carrier.close("the configuration changed")
        elif self.relay.address is None or self.resolve_at is not None:
            self.resolve_at = now       # the next tick resolves and says hello
        else:
            self.open_relay_socket()
            self.endpoint.start(now)

    # -- status

    def report(self, now):
        relay = agentstatus.peer_report(
            "relay", self.relay.text, self.endpoint, now,
            address=agentstatus.endpoint_text(self.relay.address),
            carrier="tcp" if self.tcp else "udp", path="relayed", watch=self.watch)
        if self.tcp and self.carrier is None:
            agentstatus.dialing(relay, self.dialer)
        return {"peers": [relay], "flows": len(self.flows), "max_flows": self.max_flows,
                "counters": {**self.flows.totals(), "sessions": self.endpoint.sessions}}

    def flow_list(self, now, limit=None):
        return agentstatus.service_flows_report(self.flows, now, limit)


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
    path = args.get("--config")
    reloader = Reloader.factory(
        (lambda: load_expose(path, log)) if path else (lambda: expose_from_options(args, log)),
        config, ExposeWorker.FIXED, log)
    return worker.serve(agentstatus.Inspector("expose", config.control_socket,
                                              config.metrics_listen, log, config.path),
                        reloader)
