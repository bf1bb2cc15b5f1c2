"""`udpmux link` and `udpmux link-server`: reliable streams over UDP that survive loss,
roaming and sleep; made for ssh's ProxyCommand.

    ssh -o ProxyCommand="udpmux link %r@%h" host

link-server is started over ssh, which carries the key one way and the server's port
and PID the other, and then ends (linkstart.py); from then on, UDP alone::

    udpmux link                                                   udpmux link-server
      |== HELLO / WELCOME under the key; then STREAM, ACK, WINDOW, RESET (stream.py) ==>
      |                                                           each stream: a TCP
    stdin/stdout, or one stream per connection accepted           connection to --target
    on --listen-tcp

Every message is sealed with the session; the server's side moves to a new address once
that address answers a challenge (session.PathCheck), so the client may roam.  The
client rebinds its socket (a new source port, a new NAT mapping) when the server stops
answering, and either end keeps probing with a capped backoff, so the session comes
back within about a second of the path, after a blackout or a laptop's sleep.

Exit statuses of `udpmux link`: 0 when every byte went both ways and was acknowledged;
1 (with a message saying why) when the other end could not be reached for --idle-limit
seconds, when what the local side wrote was not acknowledged within --linger seconds
of it closing, or when the server refused a stream (its target did not answer).

How we name things:
  stream     one TCP connection (or stdin/stdout) carried over the session
  endpoint   the local side of a stream: stdin/stdout, or a TCP socket
  rebind     the client's new UDP socket, for a new NAT mapping
"""

import errno
import os
import socket
import sys
import time

from udpmux import addr, agentstatus, sockets, wire
from udpmux.batchio import Batch
from udpmux.bbr import Bbr
from udpmux.congestion import NewReno
from udpmux.datapath import BATCH, Drops, Sender, each_message
from udpmux.endpoint import (
    ENDED, LOST, MOVED, NEW, UP, Initiator, Responder, keepalive_body,
)
from udpmux.errors import EXIT_FAILURE, EXIT_OK
from udpmux.linkstart import BOOT_TIMEOUT
from udpmux.localend import Endpoint, Fd
from udpmux.log import Every
from udpmux.reasons import R_PROTOCOL, R_SESSION
from udpmux.recovery import PROBES
from udpmux.stream import (
    EV_ACKED, EV_NEW, EV_READABLE, EV_RESET, EV_WRITABLE, RESET_REFUSED, Connection,
    ProtocolError, StreamClosed,
)
from udpmux.watch import PeerWatch
from udpmux.worker import Worker
from udpmux.wire import CLOSE_SHUTDOWN, HEADER, REASON, T_BYE, T_KEEPALIVE

FIRST_CONTACT = 60.0                # seconds the server waits for the client's first word
HELLO_FIRST = 0.25                  # seconds before the first HELLO is repeated
HELLO_MOST = 2.0
KEEPALIVE_EVERY = 15.0              # seconds between keepalives when nothing else is sent
REBIND_AFTER = 3.0                  # seconds without an answer before the client rebinds
LIVENESS_MIN = 1.0                  # with streams open, a silent server is asked for a word
                                    # after max(this, 2 PTO); unanswered as long, a rebind
READ_CHUNK = 65536
CONTROLLERS = {"bbr": Bbr, "newreno": NewReno}     # --congestion
WINDOW_START = 256 << 10            # a stream's window at first: it grows while it holds
                                    # the stream back, up to --buffer
RESET_CONNECT = 2                   # the server could not connect to the target
WAITING_CONNECTIONS = 64            # local connections held until the session is up


# -- one end of a session

class LinkEnd(Worker):
    """What both ends share: the UDP socket, the session, the stream engine, and the
    pumping of bytes between streams and local endpoints."""

    def __init__(self, name, key, cfg, log):
        super().__init__(name, None, (), log)
        self.key = key
        self.packet_size = cfg.packet_size
        self.idle_limit = cfg.idle_limit
        self.buffer = cfg.buffer        # bytes each way: the largest window, all streams'
        self.congestion = CONTROLLERS[cfg.congestion]

    def setup(self):
        now = time.monotonic()
        self.conn = Connection(client=isinstance(self, LinkClient),
                               max_message=self.packet_size, congestion=self.congestion,
                               stream_window=self.buffer, session_buffer=self.buffer,
                               window_start=WINDOW_START)
        self.endpoints = {}             # sid -> Endpoint
        self.heard = now                # the peer's last authentic message
        self.sent = now
        self.status = EXIT_OK
        self.failure = None             # why the session failed, for the exit message
        self.bye_said = False
        self.limit_log = Every(60.0)
        self.drops = self.drop = Drops(self.log, self.name)
        self.batch = Batch(BATCH, wire.MAX_UDP_PAYLOAD + 64)
        self.sender = Sender(None, self.drops)

    @property
    def session(self):
        return self.endpoint.session

    # -- the network

    def on_udp(self):
        each_message(self.sock, self.batch, self.drops, self.on_message,
                     errors=self.receive_errors)
        self.pump(time.monotonic())

    def receive_errors(self, errors):
        """Receive errors by errno (ICMP errors), before they are counted."""

    def on_message(self, msg, key, now):
        got = self.receive(msg, key, now)
        if not got.settle(lambda reply, to: self.reply(reply, to, now), self.drop):
            return
        if got.session is None:
            return
        # The peer moved, or speaks again after an outage: the path works again.
        restored = got.event == MOVED or self.conn.in_outage()
        # ... or from an address it has yet to prove, after a silence (a NAT change).
        unproved = key != got.session.peer and (
            restored or now - self.heard >= 2 * self.conn.recovery.pto_base)
        if not self.handle(got, now):
            return
        self.heard = now
        body = msg[wire.HEADER_SIZE:len(msg) - (wire.MAC_SIZE if self.key else 0)]
        try:
            self.conn.on_message(got.nonce, got.mtype, got.tag, bytes(body), now)
        except ProtocolError as exc:
            self.drop(R_PROTOCOL)
            self.fail(f"the other end broke the stream protocol ({exc.reason})")
            return
        if unproved:
            self.to_candidate(key, now)
        elif restored:
            self.log.debug("the path works again: sending what was in flight at once")
            self.conn.path_changed(now)

    def to_candidate(self, key, now):
        """After a silence the peer speaks from an address it has yet to prove (its NAT
        changed), and is being challenged there: the oldest data in flight goes there at
        once, as much as the address sent us, as QUIC sends on a path it is validating.
        A stranger who got a raced copy of a message in first gets no more than it sent,
        and the session stays where it is until the challenge is answered."""
        conn, session = self.conn, self.session
        conn.probe_now(data=True)
        for message in conn.messages_to_send(now, PROBES + 4):
            if session.path.spend(key, message.size):
                self.sender.add(session.seal(message.mtype, message.tag, message.body), key)
                conn.on_sent(session.last_sent, message, now)
            else:
                conn.on_not_sent(message)
        self.flush()

    def reply(self, msg, to, now):
        """A message the endpoint made (WELCOME, a keepalive, a challenge): sent, and its
        nonce, if it has one, told to the engine so that the peer's ACK of it is not
        taken for nonsense."""
        nonce = HEADER.unpack_from(msg)[5]
        if nonce:
            self.conn.on_sent(nonce, None, now)
        self.sender.add(msg, to or self.peer)

    def send_plain(self, mtype, body, now):
        """A message the engine did not make (keepalive, bye), sealed and sent."""
        self.reply(self.session.seal(mtype, 0, body), None, now)

    def queue(self, msg):
        self.sender.add(msg, self.peer)

    def flush(self):
        if len(self.sender):
            self.sender.flush()
            self.sent = time.monotonic()

    def after_events(self):
        self.flush()

    # -- moving bytes

    def pump(self, now):
        """Act on the engine's events, move bytes between streams and endpoints, and send
        what the engine has to send."""
        if self.session is None:
            return
        conn = self.conn
        for _ in range(4):
            for event in conn.streams_ready():
                self.on_event(event, now)
            for sid, ep in list(self.endpoints.items()):
                self.deliver(sid, ep)
                self.take(sid, ep)
                self.refresh(ep)
            sending = conn.messages_to_send(now, 64)
            session, on_sent = self.session, conn.on_sent
            for message in sending:
                self.queue(session.seal(message.mtype, message.tag, message.body))
                on_sent(session.last_sent, message, now)
            self.flush()
            if len(sending) < 64:
                break
        self.check_done(now)

    def on_event(self, event, now):
        ep = self.endpoints.get(event.sid)
        if event.kind == EV_NEW:
            self.new_stream(event.sid, now)
        elif event.kind == EV_RESET and ep is not None:
            self.stream_reset(event.sid, event.code)
        elif event.kind == EV_WRITABLE and ep is not None:
            ep.room = True
        elif event.kind in (EV_READABLE, EV_ACKED):
            pass                        # deliver() and check_done() look at every stream

    def deliver(self, sid, ep):
        """Bytes the stream has for the local side, as far as the local side takes them."""
        conn = self.conn
        if not ep.write_open:
            return
        while True:
            if not ep.pending:
                ep.pending = conn.read(sid, READ_CHUNK)
                if not ep.pending:
                    break
            try:
                n = ep.write(ep.pending)
            except OSError:             # the local side is gone: nobody will read the rest
                ep.pending = b""
                ep.write_open = False
                conn.reset(sid)
                return
            ep.pending = ep.pending[n:]
            if ep.pending:
                return
        if conn.at_eof(sid):
            ep.shutdown_write()

    def take(self, sid, ep):
        """Bytes from the local side into the stream, as far as the stream takes them."""
        conn = self.conn
        while ep.read_open:
            space = conn.send_space(sid)
            ep.room = space > 0
            if not ep.room:             # EV_WRITABLE: room again
                return
            data = ep.read(min(space, READ_CHUNK))
            if data is None:
                return
            if not data:
                ep.read_open = False
                try:
                    conn.finish(sid)
                except StreamClosed:
                    pass
                return
            try:
                conn.write(sid, data)
            except StreamClosed:
                ep.read_open = False
                return

    def refresh(self, ep):
        """Register for what the endpoint needs now: reading while the stream takes more
        and the local side is open, writing while bytes wait for it; nothing else, so
        that a closed or full side never wakes the loop in vain."""
        want = {}
        if ep.read_open and ep.room:
            want[ep.rfd] = (True, False)
        if ep.write_open and ep.pending:
            read, _ = want.get(ep.wfd, (False, False))
            want[ep.wfd] = (read, True)
        for fd in list(ep.keys):
            if fd not in want:
                key, _ = ep.keys.pop(fd)
                self.poller.unregister(key)
        for fd, interest in want.items():
            entry = ep.keys.get(fd)
            if entry is None:
                key = Fd(fd)
                wake = self.on_endpoint
                self.poller.register(key, wake, wake)
                ep.keys[fd] = (key, (True, False))
                entry = ep.keys[fd]
            if entry[1] != interest:
                self.poller.interest(entry[0], *interest)
                ep.keys[fd] = (entry[0], interest)

    def on_endpoint(self):
        self.pump(time.monotonic())

    def close_stream(self, sid):
        ep = self.endpoints.pop(sid, None)
        if ep is None:
            return
        for key, _ in ep.keys.values():
            self.poller.unregister(key)
        ep.keys.clear()
        ep.close()

    def stream_reset(self, sid, code):
        self.close_stream(sid)

    def stream_done(self, sid):
        """Both directions of a stream ended, and what we wrote was acknowledged."""
        ep = self.endpoints.get(sid)
        return (ep is not None and not ep.read_open and not ep.write_open
                and not ep.pending and self.conn.all_acknowledged())

    def check_done(self, now):
        for sid in list(self.endpoints):
            if self.stream_done(sid):
                self.log.debug("stream %d done", sid)
                self.close_stream(sid)

    def fail(self, why):
        if self.failure is None:
            self.failure = why
            self.status = EXIT_FAILURE
        self.alive = False

    # -- timers

    def wake_at(self, now):
        timer = self.conn.next_timer(now) if self.session is not None else None
        return None if timer is None else now + timer

    def on_wake(self, now):
        self.conn.on_timer(now)
        self.pump(now)

    def log_stats(self, now):
        """At --debug, the engine's figures every few seconds."""
        if now - getattr(self, "stats_at", 0.0) >= 5.0 and self.log.isEnabledFor(10):
            self.stats_at = now
            st = self.conn.stats()
            cc = self.conn.cc
            model = (f", {cc.state}, bw {cc.btl_bw / 1e6:.2f} MB/s, pacing "
                     f"{cc.pacing_rate / 1e6:.2f} MB/s" if hasattr(cc, "btl_bw") else "")
            self.log.debug("rtt %.1f ms, cwnd %d, in flight %d, sent %s, lost %s, pto %d%s, "
                           "drops %s", st["srtt"] * 1000, st["cwnd"], st["bytes_in_flight"],
                           st["messages_sent"], st["messages_lost"], st["pto_count"], model,
                           self.drops.counts or "none")

    def summary(self):
        """The session's figures, for the line that ends it."""
        if self.session is None:
            return "no session"
        st = self.conn.stats()
        return (f"{st['stream_bytes_sent']} bytes sent, {st['stream_bytes_received']} "
                f"received; {st['messages_sent']} messages sent, {st['messages_lost']} lost; "
                f"rtt {st['srtt'] * 1000:.1f} ms")

    def keepalive(self, now):
        if self.session is not None and now - self.sent >= KEEPALIVE_EVERY:
            self.send_plain(T_KEEPALIVE, keepalive_body(now), now)
            self.flush()

    def say_bye(self, now):
        """Tell the other end the session is over (once), so that it leaves now instead
        of after its idle limit."""
        if self.session is not None and not self.bye_said:
            self.bye_said = True
            self.send_plain(T_BYE, REASON.pack(CLOSE_SHUTDOWN), now)
            self.flush()


# -- the server

class LinkServer(LinkEnd):
    def __init__(self, sock, target, key, cfg, log):
        super().__init__("link-server", key, cfg, log)
        self.sock = sock
        self.target = target            # (host, port) text, resolved per stream
        self.peer = None

    def setup(self):
        super().setup()
        self.endpoint = Responder(self.key, [wire.ROLE_LINK])
        self.sender.sock = self.sock
        self.started = time.monotonic()
        self.connecting = {}            # sid -> socket whose connect() is under way
        self.poller.register(self.sock, self.on_udp)

    def receive(self, msg, key, now):
        return self.endpoint.receive(msg, key, now, admit=self.first_only)

    def first_only(self, _key):
        """A link-server serves the first session confirmed and no other."""
        return R_SESSION if self.session is not None else None

    def handle(self, got, now):
        """After the endpoint: what the session's events mean here.  True when the
        message goes on to the engine."""
        session = got.session
        if got.event == NEW:
            self.peer = session.peer
            self.log.info("client %s: session up", addr.format_peer(self.peer))
        elif got.event == MOVED:
            self.log.info("client moved from %s to %s", addr.format_peer(got.old),
                          addr.format_peer(session.peer))
            self.peer = session.peer
        elif got.event == ENDED:
            self.on_bye(now)
            return False
        return True

    def new_stream(self, sid, now):
        """The client opened a stream: connect to the target for it."""
        host, port = self.target
        try:
            family, sockaddr = addr.resolve(host, port, socket.SOCK_STREAM)
        except ValueError as exc:
            self.log.warning("stream %d: %s", sid, exc)
            self.conn.reset(sid, RESET_CONNECT)
            return
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.log.warning("stream %d: cannot connect to %s: %s", sid,
                             addr.format_endpoint(family, sockaddr), os.strerror(err))
            self.conn.reset(sid, RESET_CONNECT)
            return
        self.connecting[sid] = sock
        self.poller.register(sock, lambda: self.connected(sid), lambda: self.connected(sid))
        self.poller.want_write(sock, True)

    def connected(self, sid):
        sock = self.connecting.pop(sid, None)
        if sock is None:
            return
        self.poller.unregister(sock)
        failure = sockets.connect_failure(sock)
        if failure is not None:
            self.log.warning("stream %d: cannot connect to %s:%d: %s", sid, *self.target,
                             failure)
            self.conn.reset(sid, RESET_CONNECT)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.endpoints[sid] = Endpoint(sock.fileno(), sock.fileno(), sock)
            self.log.debug("stream %d: connected to %s:%d", sid, *self.target)
        self.pump(time.monotonic())

    def stream_reset(self, sid, code):
        sock = self.connecting.pop(sid, None)
        if sock is not None:
            self.poller.unregister(sock)
            sock.close()
        super().stream_reset(sid, code)

    def on_bye(self, now):
        self.log.info("the client ended the session")
        self.alive = False

    def tick(self, now):
        if self.session is None:
            if now - self.started > FIRST_CONTACT:
                self.log.error("no client came within %d s; exiting", FIRST_CONTACT)
                self.status = EXIT_FAILURE
                self.alive = False
            return
        if now - self.heard > self.idle_limit:
            self.log.warning("no word from the client for %d s; exiting", now - self.heard)
            self.alive = False
            return
        self.endpoint.tick(now)
        self.pump(now)
        self.log_stats(now)
        self.drops.tick(now)

    def on_stop(self, final):
        self.say_bye(time.monotonic())
        self.alive = False

    def on_exit(self):
        for sid in list(self.endpoints):
            self.close_stream(sid)
        if self.failure is not None:
            self.log.error("session failed: %s; %s", self.failure, self.summary())
        else:
            self.log.info("session over: %s", self.summary())


# -- the client

class LinkClient(LinkEnd):
    HUP_STOPS = True                    # ssh hangs up its ProxyCommand when it exits

    def __init__(self, server, key, cfg, listener, log):
        super().__init__("link", key, cfg, log)
        self.server = server            # (family, sockaddr)
        self.listener = listener        # a TCP listener, or None for standard I/O
        self.linger = cfg.linger

    def setup(self):
        super().setup()
        now = time.monotonic()
        # Link keeps its own keepalive (KEEPALIVE_EVERY, when nothing was sent) and gives
        # up after --idle-limit: the endpoint only makes the handshake and answers.
        self.endpoint = Initiator(self.key, wire.ROLE_LINK, keepalive=self.idle_limit,
                                  hello_first=HELLO_FIRST, hello_most=HELLO_MOST,
                                  dead=self.idle_limit)
        self.endpoint.start(now)
        self.watch = PeerWatch(
            self.log, "link-server", lambda: addr.format_endpoint(*self.server),
            "UDP to its port is blocked by a firewall at either end, or the address ssh "
            "reached is not one UDP reaches; choose an open range with --bind")
        self.sock = None
        self.rebind(now)
        self.last_rebind = now
        self.closing_since = None       # when the local side closed (stdin EOF, a signal)
        self.probe_sent = None          # when a keepalive asked the silent server for a word
        self.started = now
        self.had_stream = False
        self.stopping = False           # a signal came: finishing, then exit
        self.waiting = []               # local connections accepted before the session
        if self.listener is not None:
            self.poller.register(self.listener, self.on_accept)

    def rebind(self, now):
        """A new UDP socket: a new source port, so a new NAT mapping, on the same path."""
        if self.sock is not None:
            self.flush()
            self.poller.unregister(self.sock)
            self.sock.close()
        family, sockaddr = self.server
        sock = sockets.udp_connected(family, sockaddr)
        self.sock = self.sender.sock = sock
        self.peer = self.endpoint.peer = addr.peer_key(family, sock.getpeername())
        self.poller.register(sock, self.on_udp)
        self.last_rebind = now
        if self.session is not None:
            # Say something at once from the new port, so that the server follows now,
            # even when we have no data to send.
            self.send_plain(T_KEEPALIVE, self.padded_keepalive(now), now)
            self.flush()

    def padded_keepalive(self, now):
        """A KEEPALIVE asking for a reply, as large as a packet: sent from where the
        server may not know us yet, so that it may answer there with as much."""
        return keepalive_body(now, size=self.packet_size - self.conn.overhead)

    def receive(self, msg, key, now):
        return self.endpoint.receive(msg, now)

    def handle(self, got, now):
        """After the endpoint: what the session's events mean here.  True when the
        message goes on to the engine."""
        if got.event == NEW:
            if got.old is not None:
                return False            # a second session: the first one's streams stay
            self.up(got.session, now)
            return False                # a WELCOME: not the engine's
        if got.event == LOST:
            self.on_bye(now)
            return False
        return True

    def up(self, session, now):
        """The session is up (the endpoint sent the message that confirms it)."""
        self.heard = now
        self.watch.answered(now)
        self.log.debug("session up; the server sees us as %s", session.observed)
        if self.listener is None:
            sid = self.conn.open_stream()
            self.endpoints[sid] = Endpoint(sys.stdin.fileno(), sys.stdout.fileno())
            self.had_stream = True
        for sock in self.waiting:
            self.new_local_stream(sock)
        self.waiting.clear()
        self.pump(now)

    def on_accept(self):
        def failed(exc):
            if self.limit_log("accept", time.monotonic()):
                self.log.error("cannot accept a connection: %s", exc.strerror)
        for sock, _sockaddr in sockets.accepted(self.listener, 16, failed):
            if self.session is None:
                if len(self.waiting) >= WAITING_CONNECTIONS:
                    sock.close()
                else:
                    self.waiting.append(sock)   # a stream once the session is up
                continue
            self.new_local_stream(sock)
        self.pump(time.monotonic())

    def new_local_stream(self, sock):
        try:
            sid = self.conn.open_stream()
        except StreamClosed:
            if self.limit_log("streams", time.monotonic()):
                self.log.warning("as many streams as the session carries are open; "
                                 "closing the new connection")
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.endpoints[sid] = Endpoint(sock.fileno(), sock.fileno(), sock)
        self.log.debug("stream %d: a local connection", sid)

    def new_stream(self, sid, now):
        """The server opened a stream: a client serves none, so it is refused."""
        self.conn.reset(sid, RESET_REFUSED)

    def stream_reset(self, sid, code):
        if code == RESET_CONNECT:
            why = "the server could not connect to the target"
        else:
            why = f"the server reset the stream (reason {code})"
        self.log.warning("stream %d: %s", sid, why)
        super().stream_reset(sid, code)
        if self.listener is None:
            self.fail(why)

    def on_bye(self, now):
        if self.endpoints or not self.conn.all_acknowledged():
            self.fail("the server ended the session")
        else:
            self.alive = False

    def check_done(self, now):
        super().check_done(now)
        if not self.endpoints and (self.stopping or self.listener is None and self.had_stream):
            self.say_bye(now)
            self.alive = False
        if self.closing_since is None and self.listener is None and self.endpoints:
            ep = next(iter(self.endpoints.values()))
            if not ep.read_open:
                self.closing_since = now

    def wake_at(self, now):
        wake = super().wake_at(now)
        for at in (self.endpoint.wake_at(), self.liveness_at()):
            if at is not None and (wake is None or at < wake):
                wake = at
        return wake

    def on_wake(self, now):
        if self.endpoint.state != UP:
            self.send_hello(now)
        if self.session is not None:
            liveness = self.liveness_at()
            if liveness is not None and now >= liveness:
                self.ask_for_a_word(now)
            super().on_wake(now)

    # -- a receiver that is never deaf for long

    def liveness_at(self, now=None):
        """When to ask the server for a word: with streams open, once it has been silent
        for max(LIVENESS_MIN, 2 PTO) (a downloading client sends only ACKs, which answer
        data: after a NAT change nothing would tell the server where we went), and as
        long again after each unanswered ask.  None without streams or a session."""
        if self.session is None or not self.endpoints:
            return None
        wait = max(LIVENESS_MIN, 2 * self.conn.recovery.pto_base)
        since = self.heard
        if self.probe_sent is not None and self.probe_sent > since:
            since = self.probe_sent
        return since + wait

    def ask_for_a_word(self, now):
        """A keepalive that asks for an answer; when the last one went unanswered, from a
        new socket (a new source port, so a new NAT mapping)."""
        if self.probe_sent is not None and self.probe_sent > self.heard \
                and now - self.last_rebind >= REBIND_AFTER:
            self.log.debug("no answer for %.1f s: a new socket", now - self.heard)
            self.rebind(now)            # which says something at once from the new port
        else:
            self.send_plain(T_KEEPALIVE, self.padded_keepalive(now), now)
            self.flush()
        self.probe_sent = now

    def receive_errors(self, errors):
        if self.session is None:
            self.watch.errors(time.monotonic(), errors)

    def send_hello(self, now):
        for msg, _to in self.endpoint.due(now).replies:
            self.watch.hello_sent(now)
            try:
                self.sock.send(msg)
            except OSError as exc:
                self.log.debug("sending HELLO: %s", exc.strerror)
                self.watch.errors(now, [exc.errno])
                if exc.errno != errno.ECONNREFUSED:
                    self.rebind(now)

    def tick(self, now):
        if self.session is None:
            if now - self.started > BOOT_TIMEOUT:
                self.fail(f"link-server never answered over UDP at "
                          f"{addr.format_endpoint(*self.server)} within {BOOT_TIMEOUT:.0f} s")
            return
        silent = now - self.heard
        if silent > self.idle_limit:
            self.fail(f"no word from the server for {silent:.0f} s")
            return
        if self.closing_since is not None and now - self.closing_since > self.linger:
            if not self.conn.all_acknowledged():
                self.fail(f"what was written was not all acknowledged within {self.linger:g} s "
                          "of the local side closing")
                return
            if self.stopping:           # stopped by a signal: ours is delivered; done
                self.say_bye(now)
                self.alive = False
                return
        waiting = self.conn.unreachable_for(now)
        if (waiting > REBIND_AFTER or silent > 2 * KEEPALIVE_EVERY) \
                and now - self.last_rebind > REBIND_AFTER:
            self.log.debug("no answer for %.1f s: a new socket", max(waiting, silent))
            self.rebind(now)
        self.keepalive(now)
        self.pump(now)
        self.log_stats(now)
        self.drops.tick(now)

    def stop(self, deadline, final=True):
        """A signal (SIGTERM, SIGINT, or SIGHUP from ssh): accept and read no more, and
        give what was written --linger seconds to be acknowledged.  A second signal
        ends the link at once."""
        now = time.monotonic()
        if self.stopping:
            self.fail("stopped by a second signal before everything was acknowledged")
            return
        self.stopping = True
        if self.session is None:
            self.fail("stopped before the session with the server was up")
            return
        self.closing_since = self.closing_since or now
        if self.listener is not None:
            self.poller.unregister(self.listener)
            self.listener.close()
            self.listener = None
        for sock in self.waiting:
            sock.close()
        self.waiting.clear()
        for sid, ep in self.endpoints.items():
            ep.read_open = False
            self.refresh(ep)
            try:
                self.conn.finish(sid)
            except StreamClosed:
                pass
        self.pump(now)

    def on_exit(self):
        self.say_bye(time.monotonic())
        for sid in list(self.endpoints):
            self.close_stream(sid)
        if self.failure is not None:
            self.log.error("%s", self.failure)
        self.log.debug("session over: %s", self.summary())

    # -- status

    def report(self, now):
        server = agentstatus.peer_report(
            "link-server", addr.format_endpoint(*self.server), self.endpoint, now,
            carrier="udp", path="direct", watch=self.watch)
        st = self.conn.stats()
        return {"peers": [server], "flows": len(self.endpoints), "max_flows": None,
                "counters": {"datagrams_in": st["messages_received"],
                             "bytes_in": st["stream_bytes_received"],
                             "datagrams_out": st["messages_sent"],
                             "bytes_out": st["stream_bytes_sent"]},
                "stream": {"srtt_ms": round(st["srtt"] * 1000, 1), "cwnd": st["cwnd"],
                           "bytes_in_flight": st["bytes_in_flight"],
                           "messages_lost": st["messages_lost"],
                           "window": st["window"], "buffer": self.buffer,
                           "congestion": self.congestion.__name__.lower()}}

    def flow_list(self, now, limit=None):
        return []
