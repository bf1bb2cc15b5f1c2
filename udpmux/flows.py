"""Flows, at the two ends of a carrier.

On the side of the clients (relay, punch --listen, uot-client) a flow is a client's
address, known by the tag a tag table gave it (ClientFlows).  On the side of the service
(expose, punch --forward, uot-server) a flow is a UDP socket connected to the service,
one per tag, so that the service sees one source port per client (ServiceFlows)::

    client A ---> [ClientFlows: A -> tag 7] ==== carrier ==== [ServiceFlows: tag 7 -> socket] ---> service
    client B ---> [            B -> tag 9]                    [            tag 9 -> socket] --->

Both are bounded (a new flow ends the idlest one), expire after flow_idle, and tell the
other end when a flow ends here (a CLOSE, through the `closed` callback).  A service
socket that cannot take a datagram now (its buffer is full) keeps a short queue of its
own, the oldest dropped first (R_QUEUE), and is written when it becomes writable.

How we name things:
  key      what names a service flow: the tag, or (connection, tag) at a uot-server
  closed   the mode's callback closed(tag, reason): tell the other end (CLOSE)
"""

import socket
import time
from collections import OrderedDict, deque

from udpmux.addr import format_endpoint
from udpmux.log import Every
from udpmux.reasons import R_QUEUE, R_SEND, R_TOO_LARGE
from udpmux.wire import CLOSE_EVICTED, CLOSE_IDLE, HEADER_SIZE, MAC_SIZE

SERVICE_DRAIN = 64              # datagrams read from one service socket per wake-up
SERVICE_QUEUE = 256             # datagrams a service socket may have waiting for room
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)


class ClientFlows:
    """Client addresses (peer keys) as flows over a TagTable; every flow that ends here,
    evicted for a new one or idle, is told to the other end through closed(tag, reason).
    A flow the other end closed is only forgotten."""

    def __init__(self, table, closed):
        self.table = table
        self.closed = closed
        self.created = 0                # flows since the start

    def insert(self, key, now):
        """The slot of a new flow for key; the idlest flow ends if the table is full."""
        slot, _tag, evicted = self.table.insert(key, now)
        self.created += 1
        if evicted is not None:
            self.closed(evicted[1], CLOSE_EVICTED)
        return slot

    def touch(self, key, now, size):
        """The slot of key's flow, a new one if it has none, touched for a datagram of
        size bytes from the client."""
        table = self.table
        slot = table.get(key)
        if slot is None:
            slot = self.insert(key, now)
        table.touch(slot, now, size)
        return slot

    def expire(self, now, idle):
        """End the flows idle for `idle` seconds; returns [(key, tag)] of them."""
        ended = self.table.expire(now, idle)
        for _key, tag in ended:
            self.closed(tag, CLOSE_IDLE)
        return ended

    def forget(self, tag):
        """The other end closed the flow: True if it was here."""
        slot = self.table.slot_of_tag(tag)
        if slot is None:
            return False
        self.table.remove(slot)
        return True


class ServiceFlow:
    __slots__ = ("key", "tag", "sock", "opened", "seen", "queue", "owner",
                 "n_in", "b_in", "n_out", "b_out")

    def __init__(self, key, tag, sock, seen, owner):
        self.key = key
        self.tag = tag
        self.sock = sock
        self.opened = self.seen = seen
        self.queue = None               # datagrams waiting for room in the socket
        self.owner = owner              # what the mode keeps with the flow
        self.n_in = self.b_in = 0       # datagrams and bytes to the service ("in")
        self.n_out = self.b_out = 0     # and from it, back to the client ("out")


class ServiceFlows:
    """One UDP socket connected to the service per flow, at most `max_flows`, the idlest
    first to go.

    What the service sends on a flow's socket goes to received(flow, buf, size): the
    datagram is at buf[HEADER_SIZE:HEADER_SIZE + size], with room for a header before
    it and a MAC after it, to be sealed in place.  `refused` is the reason counted when
    the service is not there (ICMP port unreachable)."""

    def __init__(self, poller, endpoint, max_flows, drops, log, received, closed, refused,
                 max_datagram):
        self.poller = poller
        self.endpoint = endpoint        # (family, sockaddr) of the service
        self.max_flows = max_flows
        self.drops = drops
        self.log = log
        self.received = received
        self.closed = closed
        self.refused = refused
        self.max_datagram = max_datagram
        self.flows = OrderedDict()      # key -> ServiceFlow, idlest first
        self.created = 0                # flows since the start
        self.retired = [0, 0, 0, 0]     # counters of flows gone: n_in, b_in, n_out, b_out
        self.buf = bytearray(HEADER_SIZE + max_datagram + 1 + MAC_SIZE)
        self.view = memoryview(self.buf)
        self.every = Every()

    def __len__(self):
        return len(self.flows)

    def get(self, key):
        return self.flows.get(key)

    def open(self, key, tag, now, owner=None):
        """A new flow's socket, or None (counted) when none can be opened."""
        if len(self.flows) >= self.max_flows:
            _key, old = self.flows.popitem(last=False)
            self._close(old)
            self.closed(old, CLOSE_EVICTED)
        family, sockaddr = self.endpoint
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._cannot(exc, now)
            return None
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            self._cannot(exc, now)
            return None
        sock.setblocking(False)
        flow = self.flows[key] = ServiceFlow(key, tag, sock, now, owner)
        self.created += 1
        self.poller.register(sock, lambda: self.readable(flow), lambda: self.writable(flow))
        return flow

    def _cannot(self, exc, now):
        self.drops(self.refused)
        if self.every("socket", now):
            self.log.error("cannot open a socket to %s: %s", format_endpoint(*self.endpoint),
                           exc.strerror or exc)

    def _refused(self):
        """The service's host said nothing listens there (ICMP port unreachable)."""
        self.drops(self.refused)
        if self.every("refused", time.monotonic()):
            self.log.warning("the service at %s refuses datagrams: nothing listens on that "
                             "port (ICMP port unreachable); is it running?",
                             format_endpoint(*self.endpoint))

    def send(self, flow, body, now):
        """One datagram to the service on the flow's socket."""
        flow.seen = now
        flow.n_in += 1
        flow.b_in += len(body)
        self.flows.move_to_end(flow.key)
        if flow.queue:
            self._queue(flow, body)
            return
        try:
            flow.sock.send(body)
        except BlockingIOError:
            self._queue(flow, body)
            self.poller.want_write(flow.sock, True)
        except ConnectionRefusedError:
            self._refused()
        except OSError:
            self.drops(R_SEND)

    def _queue(self, flow, body):
        if flow.queue is None:
            flow.queue = deque()
        elif len(flow.queue) >= SERVICE_QUEUE:
            flow.queue.popleft()
            self.drops(R_QUEUE)
        flow.queue.append(bytes(body))

    def writable(self, flow):
        queue = flow.queue
        while queue:
            try:
                flow.sock.send(queue[0])
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self._refused()
            except OSError:
                self.drops(R_SEND)
            queue.popleft()
        self.poller.want_write(flow.sock, False)

    def readable(self, flow):
        """What the service sent on one flow's socket, at most SERVICE_DRAIN datagrams."""
        buf, view, limit = self.buf, self.view, self.max_datagram
        body = view[HEADER_SIZE:HEADER_SIZE + limit + 1]
        received = self.received
        for _ in range(SERVICE_DRAIN):
            try:
                size = flow.sock.recv_into(body, limit + 1, MSG_TRUNC)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                self._refused()
                continue
            except OSError:
                self.drops(self.refused)
                break
            if size > limit:
                self.drops(R_TOO_LARGE)
                continue
            flow.n_out += 1
            flow.b_out += size
            received(flow, buf, size)
        if flow.key in self.flows:
            self.flows.move_to_end(flow.key)

    def close(self, key):
        """The other end closed the flow: forget it here (no CLOSE back)."""
        flow = self.flows.pop(key, None)
        if flow is not None:
            self._close(flow)
        return flow

    def expire(self, now, idle):
        """End the flows idle for `idle` seconds, telling the other end."""
        while self.flows:
            key, flow = next(iter(self.flows.items()))
            if now - flow.seen <= idle:
                break
            del self.flows[key]
            self._close(flow)
            self.closed(flow, CLOSE_IDLE)

    def close_all(self):
        for flow in self.flows.values():
            self._close(flow)
        self.flows.clear()

    def totals(self):
        """{"datagrams_in", "bytes_in", "datagrams_out", "bytes_out", "flows"} since the
        start, live flows and gone ones together."""
        n_in, b_in, n_out, b_out = self.retired
        for flow in self.flows.values():
            n_in += flow.n_in
            b_in += flow.b_in
            n_out += flow.n_out
            b_out += flow.b_out
        return {"datagrams_in": n_in, "bytes_in": b_in, "datagrams_out": n_out,
                "bytes_out": b_out, "flows": self.created}

    def _close(self, flow):
        retired = self.retired
        retired[0] += flow.n_in
        retired[1] += flow.b_in
        retired[2] += flow.n_out
        retired[3] += flow.b_out
        self.poller.unregister(flow.sock)
        flow.sock.close()
