"""`udpmux relay`: the public end of reverse tunnels.

One worker per tunnel.  Each tunnel has a public socket, which outside clients send
to, and a register socket (the same one unless configured apart), where the exposer
keeps a session::

    client A ---\\                      tunnel "wg"                     /--- service
    client B ----> public socket --> [ worker ] --> register socket ===> exposer
    client C ---/    (flows by client      |           (one session,
                      address, tagged)     |            authenticated)
                                      tag table (shared with the master)

A client's datagram becomes a DATA message with the client's tag, sealed in place in
the receive buffer (the header goes into the slot's headroom, the MAC after the
datagram) and sent to the exposer in batches.  A DATA message from the exposer is
opened and its body sent to the client its tag names, again without a copy.

Bounds: at most max_flows flows (a new client evicts the least recently used, and the
exposer is told to close it too); flows idle for flow_idle end at both ends; new flows
are limited per second per client IP address, then on the tunnel
(limits.FlowAdmission); pending handshakes are bounded; HELLO and STALE answers are
rate limited and never larger than what they answer; TCP connections that have not
registered are bounded per source and in all, and one of them makes room for a
newcomer (limits.to_make_room).  Nothing a stranger sends moves or replaces the
exposer's session: it moves to a new address only once that address answered a
challenge (session.PathCheck), and only a completed handshake replaces it.

A respawned worker carries on with its predecessor's session (from the report block)
and never accepts a message its predecessor could have accepted: before anything
leaves the worker, the highest nonce received is written to a record in shared memory
(SessionRecord), with the send nonces reserved ahead.

How we name things:
  client    an outside host sending to the public socket (not authenticated)
  exposer   the `udpmux expose` agent serving the tunnel (authenticated)
  flow      one client address, known by its tag at both ends
  report    the tunnel's shared block: counters, drops, and the exposer's session, for
            `udpmux status` and so that a respawned worker carries on with the same
            session and the same flows (not the tunnel's state, which is the master's)
  record    the session's nonces, in a few words of shared memory written before every
            send (the report block is JSON, written once a second)
"""

import mmap
import os
import time

from udpmux import sockets, wire
from udpmux.addr import format_endpoint, format_peer, peer_key
from udpmux.batchio import Batch
from udpmux.carrier import TcpCarrier
from udpmux.config import from_options, load
from udpmux.datapath import BATCH, DROP_LOG_EVERY, Drops, Sender, batches
from udpmux.endpoint import ENDED, MOVED, NEW, Responder
from udpmux.flows import ClientFlows
from udpmux.limits import FlowAdmission, Networks, source_of, to_make_room
from udpmux.log import Every, setup as setup_log
from udpmux.master import Master
from udpmux.reasons import (
    R_DENIED, R_FLOW_RATE, R_NO_EXPOSER, R_SOURCE_RATE, R_TCP_FULL, R_TCP_SILENT, R_TOO_LARGE,
    R_UNKNOWN_TAG,
)
from udpmux.rendezvous import RendezvousWorker, report_size
from udpmux.session import Session
from udpmux.shm import DEFAULT_SIZE, SharedBlock
from udpmux.tagtable import TagTable
from udpmux.worker import Worker
from udpmux.watch import unauthentic
from udpmux.wire import (
    CLOSE_NAMES, CLOSE_REFUSED, CLOSE_SHUTDOWN, HEADER_SIZE, MAC_SIZE, MAX_DATAGRAM,
    REASON, T_BYE, T_CLOSE, T_DATA, Malformed, parse_header,
)

TCP_WAITING = 16                # TCP connections that have not registered, at most
TCP_WAITING_PER_SOURCE = 4      # ... from one source (IPv4 address, IPv6 /64)
TCP_HANDSHAKE = 5.0             # seconds a TCP connection has to register
NONCE_RESERVE = 1 << 24         # nonces a worker may use before its record says so again


class SessionRecord:
    """The exposer's session's nonces, in shared memory, one 8-byte word each, so that
    each is written by a single store (a worker killed mid-write leaves the old value or
    the new one, never a mix)::

        word 0  the session's local id (0: none)
        word 1  the highest nonce received and accepted
        word 2  the send nonces reserved: the worker sends none at or above this
    """

    def __init__(self):
        self.mem = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.words = memoryview(self.mem).cast("Q")

    def read(self):
        """(local id, highest received, reserved)."""
        return tuple(self.words[:3])


class RelayShared:
    """What the master maps for a tunnel before forking its worker."""

    def __init__(self, config, old=None):
        if old is not None and old.config.max_flows == config.max_flows:
            self.table, self.epoch = old.shared.table, old.shared.epoch
        else:
            self.table = TagTable(config.max_flows)
            self.epoch = int.from_bytes(os.urandom(8), "big") or 1
        size = report_size(config.max_flows) if config.mode == "rendezvous" else DEFAULT_SIZE
        # The exposer's session goes on with a successor that still takes its key: the
        # same, or the one a rotation keeps as previous (restore() checks which it was).
        if old is not None and old.config.key in (config.key, config.previous_key) \
                and old.shared.report.size == size:
            self.report, self.record = old.shared.report, old.shared.record
        else:
            self.report, self.record = SharedBlock(size), SessionRecord()


class RelayKind:
    """Tells the master how to run relay tunnels."""

    def __init__(self, args, log):
        self.args = args
        self.log = log
        self.from_options = None

    def load(self):
        if self.args.get("--config"):
            return load(self.args["--config"], self.log)
        # A reload of the one-tunnel form reads its key file again (options do not
        # change); a key from standard input can be read only once, so with one the
        # reload retries failed workers, no more.
        if self.from_options is None or self.args.get("--key-file") != "-":
            self.from_options = from_options(self.args, self.log)
        return self.from_options

    def shared(self, config, old):
        return RelayShared(config, old)

    def worker(self, tunnel, pipe, inherited, log):
        if tunnel.config.mode == "rendezvous":
            return RendezvousWorker(tunnel, pipe, inherited, log)
        return RelayWorker(tunnel, pipe, inherited, log)

    def describe(self, tunnel):
        """A tunnel's sockets, flows, counters and drops, and its exposer (expose mode)
        or its punch pairs (rendezvous mode), from the master's sockets and the shared
        memory the worker writes (its report at most a second old)."""
        config = tunnel.config
        try:
            report = tunnel.shared.report.read_json(patience=0.2)
        except TimeoutError:
            report = {}     # its worker died while writing; the next one writes it again
        info = {
            "mode": config.mode,
            "public": _bound(tunnel, "public"),
            "register": _bound(tunnel, "register" if "register" in tunnel.sockets
                               else "public"),
            "tcp": _bound(tunnel, "tcp") if "tcp" in tunnel.sockets else None,
            "keyed": config.key is not None,
            "flows": len(tunnel.shared.table),
            "max_flows": config.max_flows,
            "probe_max": tunnel.shared.table.probe_max(),
            "counters": report.get("counters", {}),
            "drops": report.get("drops", {}),
        }
        if config.mode == "rendezvous":
            info["peers"] = report.get("peers", 0)
            info["pairs"] = report.get("pairs", [])
        else:
            info["exposer"] = report.get("exposer")
        return info

    def flows(self, tunnel):
        """A tunnel's flows, by tag, from its table in shared memory."""
        now = time.monotonic()
        return [{"tag": f.tag, "client": format_peer(f.key), "age": round(now - f.created, 3),
                 "idle": round(now - f.last_seen, 3),
                 "datagrams_in": f.pkts_in, "bytes_in": f.bytes_in,
                 "datagrams_out": f.pkts_out, "bytes_out": f.bytes_out}
                for f in sorted(tunnel.shared.table.snapshot(), key=lambda f: f.tag)]

    def traffic(self, tunnels):
        """(flows now, datagrams carried so far) over all tunnels, from shared memory."""
        flows = datagrams = 0
        for tunnel in tunnels:
            flows += len(tunnel.shared.table)       # the header's count: no scan
            try:
                counters = tunnel.shared.report.read_json(patience=0.05).get("counters", {})
            except TimeoutError:
                continue
            datagrams += counters.get("datagrams_in", 0) + counters.get("datagrams_out", 0)
        return flows, datagrams


def _bound(tunnel, label):
    """The address a tunnel's socket is bound to (the port the kernel chose for port 0)."""
    sock = tunnel.sockets[label]
    try:
        return format_endpoint(sock.family, sock.getsockname())
    except OSError:
        return format_endpoint(*tunnel.config.endpoints()[label][:2])


class RelayWorker(Worker):
    def __init__(self, tunnel, pipe, inherited=(), log=None):
        super().__init__(tunnel.name, pipe, inherited, log)
        self.config = tunnel.config
        self.public = tunnel.sockets["public"]
        self.register = tunnel.sockets.get("register", self.public)
        self.shared_socket = self.register is self.public
        self.tcp_listener = tunnel.sockets.get("tcp")
        self.table = tunnel.shared.table
        self.report = tunnel.shared.report
        self.record = tunnel.shared.record
        self.epoch = tunnel.shared.epoch
        self.keyed = self.config.key is not None

    # -- after fork

    def setup(self, now=None):
        """After fork; `now` (time.monotonic() by default) is when, for unit tests."""
        config = self.config
        now = time.monotonic() if now is None else now
        self.table.attach()
        self.drops = self.drop = Drops(self.log, f"tunnel {self.name}")
        self.endpoint = Responder(config.key, [wire.ROLE_EXPOSE], name=self.name, stale=True,
                                  epoch=self.epoch, previous=config.previous_key)
        self.flows = ClientFlows(self.table, self.flow_closed)
        self.carrier = None             # the exposer's TCP connection, when it came over TCP
        self.tcp_peers = {}             # TcpCarrier -> Waiting, oldest first
        self.recorded = (0, 0, 0)       # what self.record says: (id, received, reserved)
        self.restored = False           # the session came from a dead predecessor
        self.heard = 0.0                # when the exposer last sent an authentic message
        self.registered = 0.0
        self.admission = FlowAdmission(config.new_flows_rate, config.new_flows_per_source,
                                       config.max_sources, now,
                                       Networks(config.allow or (), config.deny or ()))
        self.counters = dict.fromkeys(
            ("datagrams_in", "bytes_in", "datagrams_out", "bytes_out", "flows", "evicted",
             "expired", "closed", "sessions", "roams"), 0)
        self.limit_log = Every(DROP_LOG_EVERY)
        self.in_batch = Batch(BATCH, HEADER_SIZE + MAX_DATAGRAM + MAC_SIZE)
        self.reg_batch = self.in_batch if self.shared_socket else Batch(BATCH)
        # Room for a whole batch of DATA plus a control message for each of them.
        self.to_exposer = Sender(self.register, self.drops, 2 * BATCH, self.note_nonces)
        self.to_clients = Sender(self.public, self.drops, 2 * BATCH, self.note_nonces)
        try:
            report = self.report.read_json(patience=0.5)
        except TimeoutError:
            self.log.warning("tunnel %s: the last worker died while saving its state; "
                             "starting with a new session", self.name)
            report = {}
        self.restore(report, now)
        self.poller.register(self.public, self.on_public)
        if not self.shared_socket:
            self.poller.register(self.register, self.on_register)
        if self.tcp_listener is not None:
            self.poller.register(self.tcp_listener, self.on_tcp_accept)

    @property
    def session(self):
        """The exposer's session, or None."""
        return self.endpoint.session

    def restore(self, report, now):
        """Carry on from a predecessor's report block: counters and the exposer's session."""
        for name, value in report.get("counters", {}).items():
            if name in self.counters:
                self.counters[name] = value
        self.drops.restore(report.get("drops", {}))
        saved = report.get("session")
        # A session over TCP died with its connection: the exposer connects again.
        if not saved or saved.get("keyed") != self.keyed or saved.get("carrier") == "tcp":
            return
        responder = bytes.fromhex(saved.get("responder") or "") or self.acceptor_names()[0]
        session = Session(saved["local_id"], saved["peer_id"],
                          bytes.fromhex(saved["send_key"]) if self.keyed else None,
                          bytes.fromhex(saved["recv_key"]) if self.keyed else None,
                          wire.ROLE_EXPOSE, bytes.fromhex(saved["peer"]))
        # Never reuse a nonce: skip past every one the predecessor may have used, and
        # accept nothing at or below the highest it had accepted.  The record has the
        # exact figures when it is of this session (it is written before every send;
        # the report block once a second).
        received, reserved = saved["recv_top"], saved["send_reserved"]
        local_id, recorded_top, recorded_reserve = self.record.read()
        if local_id == session.local_id:
            received = max(received, recorded_top)
            reserved = max(reserved, recorded_reserve)
        session.resume(reserved, received)
        session.confirmed = True
        session.responder = responder
        if responder not in self.acceptor_names():
            # Its key was rotated out: a last BYE under the session, so that the exposer
            # registers again now, with the key it has been given or to hear nothing.
            self.log.info("tunnel %s: the exposer at %s had a key no longer accepted; "
                          "its session ends", self.name, format_peer(session.peer))
            self.send_to(session.seal(T_BYE, 0, REASON.pack(CLOSE_SHUTDOWN)), session.peer)
            return
        self.endpoint.restore(session)
        self.restored = True
        self.note_nonces()
        self.heard = now
        self.registered = now - saved.get("age", 0.0)
        self.log.info("tunnel %s: worker %d carries on with the exposer at %s",
                      self.name, os.getpid(), format_peer(session.peer))

    def acceptor_names(self):
        """The responder names of the keys this tunnel takes: its key's, then the
        previous key's during a rotation."""
        acceptor = self.endpoint.acceptor
        return [acceptor.responder] + ([acceptor.previous.responder]
                                       if acceptor.previous is not None else [])

    # -- from clients

    def on_public(self):
        """Client datagrams, a batch at a time (public_batch())."""
        shared = self.shared_socket
        for n in batches(self.public, self.in_batch, self.drops, HEADER_SIZE):
            self.public_batch(n, time.monotonic())
            self.to_exposer.flush()
            if shared:
                self.to_clients.flush()

    def public_batch(self, n, now):
        """Tag the datagrams of known flows and seal them in place, a run at a time (the
        header in each slot's headroom, the MAC after the datagram); anything else (a new
        flow, no exposer, on a shared socket the exposer's own message) goes through
        client_slow(), in order."""
        batch, table = self.in_batch, self.table
        get, touch, tags = table.get, table.touch, table.tags
        lengths, keys = batch.lengths, batch.keys
        session = self.session
        exposer = None if session is None else session.peer
        shared = self.shared_socket
        starts, sizes, flow_tags = [], [], []
        count_in = size_in = 0
        for i in range(n):
            key, length = keys[i], lengths[i]
            slot = get(key)
            if slot is None or length > MAX_DATAGRAM or exposer is None \
                    or (shared and key == exposer):
                self.forward(starts, sizes, flow_tags)
                slot = self.client_slow(i, now)
                session = self.session
                exposer = None if session is None else session.peer
                if slot is None or session is None:
                    continue
            else:
                touch(slot, now, length)
            starts.append(batch.starts[i])
            sizes.append(length)
            flow_tags.append(tags[slot])
            count_in += 1
            size_in += length
        self.forward(starts, sizes, flow_tags)
        self.counters["datagrams_in"] += count_in
        self.counters["bytes_in"] += size_in

    def forward(self, starts, sizes, flow_tags):
        """Seal client datagrams of the receive batch under the exposer's session and hand
        them to it: over UDP, queued without a copy; over its TCP connection, a copy each
        into its flow's queue there.  Empties the lists."""
        if not starts:
            return
        batch = self.in_batch
        self.session.seal_batch(batch.buf, batch.view, starts, sizes, flow_tags)
        carrier = self.carrier
        if carrier is None:
            self.to_exposer.add_many_from(batch, starts, sizes, self.session.peer)
        else:
            view = batch.view
            for start, size, tag in zip(starts, sizes, flow_tags):
                carrier.send(bytes(view[start:start + size]), tag)
            starts.clear()
            sizes.clear()
        flow_tags.clear()

    def client_slow(self, i, now):
        """A client datagram off the common path: a new flow, one too large, one while no
        exposer is registered, or (on a shared socket) the exposer's own message.
        Returns the slot to forward it on (touched), or None when it is done with."""
        batch = self.in_batch
        key, length = batch.keys[i], batch.lengths[i]
        session = self.session
        get = self.table.get
        if self.shared_socket and (session is None or key == session.peer or get(key) is None) \
                and self.maybe_exposer(batch, i, now):
            return None
        if length > MAX_DATAGRAM:
            self.drop(R_TOO_LARGE)
            if self.limit_log(R_TOO_LARGE, now):
                self.log.warning("tunnel %s: a datagram of %d bytes from %s is too large to "
                                 "carry (at most %d); dropped, see MTU in udpmux(8)",
                                 self.name, length, format_peer(key), MAX_DATAGRAM)
            return None
        slot = get(key)
        if slot is None:
            slot = self.new_flow(key, now)
            if slot is None:
                return None
        if self.session is None:
            self.drop(R_NO_EXPOSER)
            return None
        self.table.touch(slot, now, length)
        return slot

    def maybe_exposer(self, batch, i, now):
        """On a shared socket: handle datagram i as the exposer's if it is a message.
        What is no message but comes from the exposer's address is a counted drop: that
        address is never a client's (a flow there would take the exposer's later
        messages, its HELLO too, for a client's datagrams)."""
        start, length = batch.starts[i], batch.lengths[i]
        msg = batch.view[start:start + min(length, batch.capacity)]
        try:
            parse_header(msg, self.keyed)
        except Malformed as exc:
            if self.session is not None and batch.keys[i] == self.session.peer:
                self.drop(exc.reason)
                return True
            return False
        self.from_exposer(msg, batch.keys[i], now, start)
        return True

    def new_flow(self, key, now):
        """The slot of a new flow for this client, or None (counted) if refused."""
        if self.session is None or self.down(now):
            self.drop(R_NO_EXPOSER)
            return None
        refused = self.admission.refused(key, now)
        if refused is not None:
            self.drop(refused)
            if refused == R_SOURCE_RATE and self.limit_log(refused, now):
                self.log.warning("tunnel %s: %s opens new flows faster than "
                                 "new_flows_per_source (%g/s); refusing the excess",
                                 self.name, format_peer(key), self.config.new_flows_per_source)
            elif refused == R_DENIED and self.limit_log(refused, now):
                self.log.warning("tunnel %s: %s may not start flows (allow, deny); refused, "
                                 "and others this minute only counted", self.name,
                                 format_peer(key))
            elif refused == R_FLOW_RATE and self.limit_log(refused, now):
                self.log.warning("tunnel %s: new flows arrive faster than new_flows_rate "
                                 "(%g/s); refusing the excess", self.name,
                                 self.config.new_flows_rate)
            return None
        slot = self.flows.insert(key, now)
        self.counters["flows"] += 1
        self.log.debug("tunnel %s: new flow %d from %s", self.name, self.table.tags[slot],
                       format_peer(key))
        return slot

    def flow_closed(self, tag, reason):
        """A flow ended here: evicted for a new one, or idle.  The exposer ends it too."""
        self.counters["evicted" if reason != wire.CLOSE_IDLE else "expired"] += 1
        if reason == wire.CLOSE_EVICTED and self.limit_log("max_flows", time.monotonic()):
            self.log.warning("tunnel %s: the flow table is full (max_flows %d); each new "
                             "client now ends the flow idle longest", self.name,
                             self.config.max_flows)
        self.tell_exposer(T_CLOSE, tag, REASON.pack(reason))
        self.log.debug("tunnel %s: flow %d %s; closed", self.name, tag, CLOSE_NAMES[reason])

    # -- from the exposer

    def on_register(self):
        """Messages on the register socket, a batch at a time (register_batch())."""
        for n in batches(self.register, self.reg_batch, self.drops):
            self.register_batch(n, time.monotonic())
            self.note_nonces()      # even when nothing goes out: a successor must know
            self.to_clients.flush()
            self.to_exposer.flush()

    def register_batch(self, n, now):
        """DATA of the exposer's session is opened in place a batch at a time and its body
        queued for its client without a copy; everything else, and anything doubtful,
        goes through from_exposer(), in order."""
        batch, table = self.reg_batch, self.table
        slot_of_tag, touch, flow_keys = table.slot_of_tag, table.touch, table.keys
        view, starts, lengths = batch.view, batch.starts, batch.lengths
        session = self.session
        if session is None or self.restored:
            results = [None] * n
        else:
            results = session.open_batch(view, starts, lengths, batch.keys, n, self.drop)
        trailer = HEADER_SIZE + (MAC_SIZE if self.keyed else 0)
        queued, sizes, clients = [], [], []
        count_out = size_out = 0
        for i in range(n):
            tag = results[i]
            if tag is None:
                # Off the common path: keep the order of what is already queued.
                self.to_clients.add_many_from(batch, queued, sizes, clients)
                if lengths[i] > batch.capacity:
                    self.drop(R_TOO_LARGE)
                else:
                    self.from_exposer(view[starts[i]:starts[i] + lengths[i]], batch.keys[i],
                                      now, starts[i])
                if self.session is not session:     # the rest under the new session
                    session = self.session
                    results[i + 1:] = [None] * (n - i - 1)
                continue
            if tag < 0:
                continue
            slot = slot_of_tag(tag)
            if slot is None:
                self.drop(R_UNKNOWN_TAG)
                self.tell_exposer(T_CLOSE, tag, REASON.pack(CLOSE_REFUSED))
                continue
            body = lengths[i] - trailer
            touch(slot, now, body, True)
            queued.append(starts[i] + HEADER_SIZE)
            sizes.append(body)
            clients.append(flow_keys[slot])
            count_out += 1
            size_out += body
        if size_out:
            self.heard = now
        self.counters["datagrams_out"] += count_out
        self.counters["bytes_out"] += size_out
        self.to_clients.add_many_from(batch, queued, sizes, clients)

    def from_exposer(self, msg, key, now, start=None, carrier=None):
        """One message from the exposer's side: from the register socket (msg a view into
        the receive batch at `start`, where DATA bodies are sent from without a copy), or
        from a TCP connection (`carrier`; msg is bytes)."""
        got = self.endpoint.receive(msg, key, now, where=carrier)
        for reply, to in got.replies:
            if carrier is None:
                self.send_to(reply, to)
            elif got.reason is None:
                carrier.send(reply)
        if got.reason is not None:
            unauthentic(self.log, self.limit_log, f"tunnel {self.name}", key, got.reason, now)
            self.refuse(got.reason, carrier)
            return
        session = got.session
        if session is None:                 # a HELLO, answered
            if carrier is not None:
                self.tcp_peers[carrier].hello = True
            return
        self.heard = now
        if got.event == NEW:
            self.new_session(session, got.old, now, carrier)
        elif got.event == MOVED:
            self.log.info("tunnel %s: exposer moved from %s to %s", self.name,
                          format_peer(got.old), format_peer(session.peer))
            self.counters["roams"] += 1
        elif got.event == ENDED:
            self.log.info("tunnel %s: the exposer at %s said goodbye", self.name,
                          format_peer(session.peer))
            self.end_session()
            return
        if self.restored:
            # A restored session lives on memory a dead process left: ask the exposer
            # for a new handshake.
            self.restored = False
            self.send_to(self.endpoint.acceptor.stale(session.local_id, got.nonce, session),
                         session.peer)
        if got.mtype == T_DATA:
            self.to_client(msg, got.tag, now, start, carrier)
        elif got.mtype == T_CLOSE:
            if self.flows.forget(got.tag):
                self.counters["closed"] += 1
                self.log.debug("tunnel %s: the exposer closed flow %d", self.name, got.tag)

    def to_client(self, msg, tag, now, start, carrier):
        slot = self.table.slot_of_tag(tag)
        body = len(msg) - HEADER_SIZE - (MAC_SIZE if self.keyed else 0)
        if slot is None:
            self.drop(R_UNKNOWN_TAG)
            self.tell_exposer(T_CLOSE, tag, REASON.pack(CLOSE_REFUSED))
            return
        self.table.touch(slot, now, body, outward=True)
        if carrier is None:
            self.to_clients.add_from(self.reg_batch, start + HEADER_SIZE, body,
                                     self.table.key_of(slot))
        else:
            self.to_clients.add(memoryview(msg)[HEADER_SIZE:HEADER_SIZE + body],
                                self.table.key_of(slot))
        self.counters["datagrams_out"] += 1
        self.counters["bytes_out"] += body

    def refuse(self, reason, carrier):
        """Count a refused message; on a TCP connection it also ends the connection, since
        a stream with one bad message in it cannot be trusted further."""
        self.drop(reason)
        if carrier is not None:
            carrier.close(f"a message refused ({reason})")

    def new_session(self, session, old, now, carrier=None):
        old_carrier = self.carrier
        key = session.peer
        self.carrier = carrier
        self.restored = False
        self.registered = self.heard = now     # before write_report() below reports them
        self.counters["sessions"] += 1
        how = "over TCP " if carrier is not None else ""
        if old is None:
            self.log.info("tunnel %s: exposer registered %sfrom %s", self.name, how,
                          format_peer(key))
        elif old.peer != key:
            self.log.info("tunnel %s: exposer at %s replaced by a new session %sfrom %s",
                          self.name, format_peer(old.peer), how, format_peer(key))
        else:
            self.log.debug("tunnel %s: exposer at %s started a new session", self.name,
                           format_peer(key))
        if old_carrier is not None and old_carrier is not carrier:
            old_carrier.close("replaced by a new session")
        self.write_report(now)           # first the keys, then the nonces: see restore()
        self.note_nonces()

    def end_session(self):
        self.endpoint.end_all()
        if self.carrier is not None:
            carrier, self.carrier = self.carrier, None
            carrier.flush()
            carrier.close("the session ended")

    # -- exposers over TCP

    def on_tcp_accept(self):
        def failed(exc):
            if self.limit_log("accept", time.monotonic()):
                self.log.error("tunnel %s: cannot accept a TCP connection: %s", self.name,
                               exc.strerror)
        for sock, sockaddr in sockets.accepted(self.tcp_listener, 16, failed):
            peer = peer_key(sock.family, sockaddr)
            self.make_room(source_of(peer))
            carrier = TcpCarrier(sock, self.poller, self.on_tcp_message, self.on_tcp_closed)
            self.tcp_peers[carrier] = Waiting(carrier, peer, time.monotonic())
            carrier.on_readable()       # its HELLO, if here already, before the next one

    def make_room(self, source):
        """Before a new TCP connection from `source` joins those not yet registered."""
        waiting = [w for c, w in self.tcp_peers.items() if c is not self.carrier]
        oldest = to_make_room(waiting, source, TCP_WAITING_PER_SOURCE, TCP_WAITING,
                              time.monotonic())
        if oldest is not None:
            self.drop(R_TCP_FULL)
            oldest.carrier.close("closed for a newer connection")

    def on_tcp_message(self, carrier, msg):
        waiting = self.tcp_peers.get(carrier)
        if waiting is not None:
            self.from_exposer(msg, waiting.peer, time.monotonic(), carrier=carrier)

    def on_tcp_closed(self, carrier, why):
        waiting = self.tcp_peers.pop(carrier, None)
        self.drops.take(carrier.drops)
        if carrier is self.carrier:
            self.carrier = None
            if self.session is not None:
                self.endpoint.end_all()
                self.log.info("tunnel %s: the exposer's TCP connection from %s ended (%s)",
                              self.name, format_peer(waiting.peer) if waiting else "?", why)

    # -- sending

    def tell_exposer(self, mtype, tag, body):
        session = self.session
        if session is None:
            return
        msg = session.seal(mtype, tag, body)
        if self.carrier is not None:
            self.carrier.send(msg, tag if mtype == T_DATA else None)
        else:
            self.send_to(msg, session.peer)

    def send_to(self, msg, key):
        self.to_exposer.add(msg, key)

    def note_nonces(self):
        """Before anything leaves: the record learns of every nonce received and sent so
        far, so that nothing leaves that a successor could repeat."""
        session = self.session
        if session is None or self.carrier is not None:
            return
        local_id, received, reserved = self.recorded
        top, sent = session.received_top, session.last_sent
        words = self.record.words
        if local_id != session.local_id:
            words[0] = 0                        # no session while the words change
            words[1] = top
            reserved = sent + NONCE_RESERVE
            words[2] = reserved
            words[0] = session.local_id
        elif received != top:
            words[1] = top
        if sent + NONCE_RESERVE // 2 > reserved:
            reserved = sent + NONCE_RESERVE
            words[2] = reserved
        self.recorded = (session.local_id, top, reserved)

    def after_events(self):
        self.to_exposer.flush()
        self.to_clients.flush()
        for carrier in list(self.tcp_peers):
            carrier.flush()

    # -- housekeeping

    def down(self, now):
        return now - self.heard > self.config.exposer_timeout

    def tick(self, now):
        self.flows.expire(now, self.config.flow_idle)
        self.endpoint.tick(now)
        if self.session is not None and self.down(now):
            self.log.warning("tunnel %s: no word from the exposer at %s for %d s; the tunnel "
                             "is down until it registers again", self.name,
                             format_peer(self.session.peer), now - self.heard)
            self.end_session()
        for carrier, waiting in list(self.tcp_peers.items()):
            if carrier is not self.carrier and now - waiting.since > TCP_HANDSHAKE:
                self.drop(R_TCP_SILENT)
                carrier.close(f"no registration within {TCP_HANDSHAKE:.0f} s")
            self.drops.take(carrier.drops)
        self.table.sync()
        self.write_report(now)
        self.drops.tick(now)

    def write_report(self, now):
        session = self.session
        saved = None
        if session is not None:
            saved = {
                "keyed": self.keyed,
                "local_id": session.local_id,
                "peer_id": session.peer_id,
                "send_key": session.send_key.hex() if self.keyed else None,
                "recv_key": session.recv_key.hex() if self.keyed else None,
                "send_reserved": session.last_sent + NONCE_RESERVE,
                "recv_top": session.received_top,
                "peer": session.peer.hex(),
                "responder": session.responder.hex() if session.responder else None,
                "age": now - self.registered,
                "carrier": "tcp" if self.carrier is not None else "udp",
            }
        self.report.write_json({
            "pid": os.getpid(),
            "counters": self.counters,
            "drops": self.drops.counts,
            "flows_now": len(self.table),
            "exposer": None if session is None else {
                "address": format_peer(session.peer),
                "carrier": "tcp" if self.carrier is not None else "udp",
                "registered_ago": round(now - self.registered, 3),
                "heard_ago": round(now - self.heard, 3),
            },
            "session": saved,
        })

    def on_stop(self, final):
        # Flows and the session stay in shared memory for a successor.  When there is
        # none (the relay stops, the tunnel was removed), tell the exposer, which then
        # registers again as soon as a relay answers.
        if final and self.session is not None:
            self.tell_exposer(T_BYE, 0, REASON.pack(CLOSE_SHUTDOWN))
            self.to_exposer.flush()
            self.end_session()
        self.alive = False

    def on_exit(self):
        self.table.sync()
        self.write_report(time.monotonic())


class Waiting:
    """A TCP connection at the register address, until its exposer registers."""

    __slots__ = ("carrier", "peer", "source", "since", "hello")

    def __init__(self, carrier, peer, since):
        self.carrier = carrier
        self.peer = peer                # peer key
        self.source = source_of(peer)
        self.since = since
        self.hello = False              # it sent a HELLO that verified and was new


def main(args):
    log = setup_log(args.get("--debug"))
    return Master(RelayKind(args, log), log).run()
