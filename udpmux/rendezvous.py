"""A rendezvous tunnel of `udpmux relay` (mode = "rendezvous"): where `udpmux punch`
peers meet, learn each other's public address, and, when no direct path can be made,
what carries their datagrams.

    punch --listen  ==session==>  relay (rendezvous tunnel)  <==session==  punch --forward
        RENDEZVOUS(listen, "mosh")  -->  pairs them by name  <--  RENDEZVOUS(forward, "mosh")
        <--  PEER (the other's address, as the relay sees it)  -->
        ====================== PUNCH, HELLO, ... directly ======================
        DATA  -->  (re-sealed for the partner's session)  -->  DATA     (only while relayed)

Each peer keeps an authenticated session with the relay (the tunnel's key): a stranger
learns no address from it and moves no peer; a peer's new address is followed once it
answered a challenge (session.PathCheck), and its partner is told at once.  A name
pairs one listen side with one forward side; a newer registration of the same name and
side takes the place of the older.  PATH tells the relay whether the pair's datagrams
go directly or through it, for `udpmux status`.

Bounds: at most max_flows peers (a HELLO beyond is not answered), each forgotten after
flow_idle seconds without a word; handshakes as for every responder.  The report block
that `udpmux status` reads lists every pair: it is sized for max_flows records of the
largest size a record can have (report_size()), and max_flows itself is bounded
(config.RENDEZVOUS_MAX_FLOWS) when the configuration is read.

How we name things:
  peer      one `udpmux punch` registered here, with its session and its address
  pair      a listen peer and a forward peer of the same name
  partner   the other peer of a pair
"""

import json
import os
import time

from udpmux import wire
from udpmux.addr import format_peer
from udpmux.batchio import Batch
from udpmux.datapath import BATCH, Drops, Sender, each_message
from udpmux.endpoint import ENDED, MOVED, NEW, Responder
from udpmux.reasons import R_FULL, R_NAME, R_NO_PARTNER
from udpmux.session import observed_fields
from udpmux.shm import DEFAULT_SIZE
from udpmux.log import Every
from udpmux.watch import unauthentic
from udpmux.worker import Worker
from udpmux.wire import (
    PATH, PATH_DIRECT, PATH_RELAYED, PEER, RENDEZVOUS_NAME_MAX, SIDE_FORWARD, SIDE_LISTEN,
    T_CLOSE, T_DATA, T_PATH, T_RENDEZVOUS,
)

PATH_NAMES = {PATH_DIRECT: "direct", PATH_RELAYED: "relayed"}


def _record(name, listen, forward, path, datagrams, size):
    """One pair as the report block lists it."""
    return {"name": name, "listen": listen, "forward": forward, "path": path,
            "relayed_datagrams": datagrams, "relayed_bytes": size}


# The longest a pair's record can be, as JSON: the longest name in the most escapes
# (every byte a control character, \u00XX), the longest addresses and counters.
RECORD_MAX = len(json.dumps(_record("\x01" * RENDEZVOUS_NAME_MAX,
                                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                                    "punching", 2 ** 64, 2 ** 64), separators=(",", ":"))) + 1


def report_size(max_flows):
    """The bytes of the report block of a rendezvous tunnel with max_flows peers."""
    return DEFAULT_SIZE + max_flows * RECORD_MAX


class Peer:
    __slots__ = ("session", "name", "side", "partner", "path", "heard", "since",
                 "relayed", "relayed_bytes", "pair")

    def __init__(self, session, now):
        self.session = session
        self.name = None
        self.side = None
        self.partner = None
        self.path = None
        self.heard = self.since = now
        self.relayed = self.relayed_bytes = 0
        self.pair = 0

    @property
    def key(self):
        """Where the peer is: its session's address."""
        return self.session.peer


class RendezvousWorker(Worker):
    def __init__(self, tunnel, pipe, inherited=(), log=None):
        super().__init__(tunnel.name, pipe, inherited, log)
        self.config = tunnel.config
        self.sock = tunnel.sockets["public"]
        self.report = tunnel.shared.report
        self.keyed = self.config.key is not None

    def setup(self):
        self.endpoint = Responder(self.config.key, [wire.ROLE_PUNCH], name=self.name,
                                  single=False, stale=True, previous=self.config.previous_key)
        self.peers = {}                 # our session id -> Peer
        self.names = {}                 # (name, side) -> Peer
        self.pairs = 0
        self.counters = dict.fromkeys(("sessions", "pairs", "relayed", "relayed_bytes"), 0)
        self.drops = self.drop = Drops(self.log, f"tunnel {self.name}")
        self.limit_log = Every()             # log lines about strangers, once a minute
        self.batch = Batch(BATCH)
        self.sender = Sender(self.sock, self.drops)
        self.poller.register(self.sock, self.on_udp)

    def send(self, msg, key):
        self.sender.add(msg, key)

    def after_events(self):
        self.sender.flush()

    # -- messages

    def on_udp(self):
        each_message(self.sock, self.batch, self.drops,
                     lambda msg, key, now: self.on_message(bytes(msg), key, now),
                     self.sender.flush)

    def full(self, _key):
        """A HELLO when max_flows agents are registered already is not answered."""
        return R_FULL if len(self.peers) >= self.config.max_flows else None

    def on_message(self, msg, key, now):
        got = self.endpoint.receive(msg, key, now, admit=self.full)
        if not got.settle(self.send, self.drop):
            unauthentic(self.log, self.limit_log, f"tunnel {self.name}", key, got.reason, now)
            return
        session = got.session
        if session is None:                 # a HELLO, answered
            return
        if got.event == NEW:
            self.peers[session.local_id] = Peer(session, now)
            self.counters["sessions"] += 1
            self.log.debug("tunnel %s: a punch peer registered from %s", self.name,
                           format_peer(session.peer))
        peer = self.peers[session.local_id]
        peer.heard = now
        if got.event == MOVED:
            self.log.info("tunnel %s: peer %s moved from %s to %s", self.name,
                          peer.name or "?", format_peer(got.old), format_peer(peer.key))
            if peer.partner is not None:
                self.tell_peer(peer.partner, peer)
        elif got.event == ENDED:
            self.forget(peer, "said goodbye")
            return
        mtype = got.mtype
        body = msg[wire.HEADER_SIZE:len(msg) - (wire.MAC_SIZE if self.keyed else 0)]
        if mtype in (T_DATA, T_CLOSE):
            partner = peer.partner
            if partner is None:
                self.drop(R_NO_PARTNER)
                return
            self.send(partner.session.seal(mtype, got.tag, body), partner.key)
            if mtype == T_DATA:
                peer.relayed += 1
                peer.relayed_bytes += len(body)
                self.counters["relayed"] += 1
                self.counters["relayed_bytes"] += len(body)
        elif mtype == T_RENDEZVOUS:
            self.register(peer, body, now)
        elif mtype == T_PATH:
            (path,) = PATH.unpack(body)
            if path in PATH_NAMES and path != peer.path:
                peer.path = path
                self.log.debug("tunnel %s: pair %s goes %s", self.name, peer.name,
                               PATH_NAMES[path])

    def register(self, peer, body, now):
        side = body[0]
        try:
            name = bytes(body[1:]).decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        if side not in (SIDE_LISTEN, SIDE_FORWARD) or not name \
                or len(body) - 1 > RENDEZVOUS_NAME_MAX:
            self.drop(R_NAME)
            return
        if peer.name is not None and (peer.name, peer.side) != (name, side):
            self.unpair(peer)
            self.names.pop((peer.name, peer.side), None)
        older = self.names.get((name, side))
        if older is not None and older is not peer:
            self.log.info("tunnel %s: a newer %s peer for %r, from %s, takes the place of "
                          "the one at %s", self.name, _side(side), name,
                          format_peer(peer.key), format_peer(older.key))
            self.forget(older, "replaced")
        peer.name, peer.side = name, side
        self.names[(name, side)] = peer
        partner = self.names.get((name, SIDE_FORWARD if side == SIDE_LISTEN else SIDE_LISTEN))
        if partner is None:
            return
        if peer.partner is not partner:
            self.pairs += 1
            self.counters["pairs"] += 1
            peer.pair = partner.pair = self.pairs
            peer.partner, partner.partner = partner, peer
            peer.path = partner.path = None
            self.log.info("tunnel %s: %r paired: %s (listen) and %s (forward)", self.name,
                          name, format_peer(peer.key if side == SIDE_LISTEN else partner.key),
                          format_peer(partner.key if side == SIDE_LISTEN else peer.key))
        # Each learns the other's address (again, if this was a repeated RENDEZVOUS).
        self.tell_peer(peer, partner)
        self.tell_peer(partner, peer)

    def tell_peer(self, peer, other):
        """Tell `peer` where `other` is, as this relay sees it."""
        family, port, address = observed_fields(other.key)
        self.send(peer.session.seal(wire.T_PEER, 0, PEER.pack(family, port, address,
                                                              peer.pair)), peer.key)

    def unpair(self, peer):
        partner = peer.partner
        if partner is not None:
            partner.partner = None
            peer.partner = None

    def forget(self, peer, why):
        self.unpair(peer)
        if peer.name is not None and self.names.get((peer.name, peer.side)) is peer:
            del self.names[(peer.name, peer.side)]
        self.peers.pop(peer.session.local_id, None)
        self.endpoint.end(peer.session)
        self.log.debug("tunnel %s: peer %s at %s %s", self.name, peer.name or "?",
                       format_peer(peer.key), why)

    # -- housekeeping

    def tick(self, now):
        for peer in list(self.peers.values()):
            if now - peer.heard > self.config.flow_idle:
                self.forget(peer, f"silent for {now - peer.heard:.0f} s")
        self.endpoint.tick(now)
        self.sender.flush()
        self.write_report(now)
        self.drops.tick(now)

    def write_report(self, now):
        pairs = []
        for (name, side), peer in self.names.items():
            if side != SIDE_LISTEN:
                continue
            partner = peer.partner
            paths = {PATH_NAMES.get(p.path) for p in (peer, partner) if p is not None}
            path = ("direct" if paths == {"direct"} else "relayed" if "relayed" in paths
                    else "punching" if partner is not None else "waiting")
            pairs.append(_record(
                name, format_peer(peer.key),
                format_peer(partner.key) if partner is not None else None, path,
                peer.relayed + (partner.relayed if partner else 0),
                peer.relayed_bytes + (partner.relayed_bytes if partner else 0)))
        for (name, side), peer in self.names.items():
            if side == SIDE_FORWARD and peer.partner is None:
                pairs.append(_record(name, None, format_peer(peer.key), "waiting",
                                     peer.relayed, peer.relayed_bytes))
        self.report.write_json({
            "pid": os.getpid(),
            "mode": "rendezvous",
            "counters": {**self.counters, "datagrams_in": self.counters["relayed"],
                         "datagrams_out": self.counters["relayed"],
                         "bytes_in": self.counters["relayed_bytes"],
                         "bytes_out": self.counters["relayed_bytes"]},
            "drops": self.drops.counts,
            "peers": len(self.peers),
            "pairs": sorted(pairs, key=lambda p: p["name"]),
        })

    def on_stop(self, final):
        if final:
            for peer in self.peers.values():
                self.send(peer.session.seal(wire.T_BYE, 0,
                                            wire.REASON.pack(wire.CLOSE_SHUTDOWN)), peer.key)
            self.sender.flush()
        self.alive = False

    def on_exit(self):
        self.write_report(time.monotonic())


def _side(side):
    return "listen" if side == SIDE_LISTEN else "forward"
