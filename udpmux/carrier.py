"""The TCP carrier: udpmux messages framed on one TCP connection, fairly, never blocking.

Each message travels as a frame (wire.py)::

    +-------------------------------+------------------------------+
    |        length (32 bits)       |  message (header, body, MAC) |
    +-------------------------------+------------------------------+

Reading: whatever recv() returns feeds a Deframer; each whole message goes to the
owner's on_message(); a frame whose length cannot be right ends the connection, since
a byte stream cannot be resynchronised.

Writing: frames wait in queues, one for control messages and one per flow, each
bounded.  When a flow's queue is full its oldest datagram is dropped and counted, so a
flow that sends faster than the connection carries costs itself, not the others.  A
write takes every control message first, then one datagram from each flow in turn,
and gathers them into one send() of up to WRITE_CHUNK bytes.  What the kernel does not
take waits for EPOLLOUT.

How we name things:
  frame     a length and a message: what crosses the TCP connection
  queue     the frames of one flow (by tag) or the control frames, waiting to be sent
  pending   the rest of a gathered write that the kernel did not take yet
"""

import errno
import os
import socket
import time
from collections import OrderedDict, deque

from udpmux import addr, sockets
from udpmux.wire import FRAME, MAX_FRAME, Deframer, Malformed

WRITE_CHUNK = 256 * 1024        # bytes gathered into one send()
READ_CHUNK = 256 * 1024         # bytes asked of one recv()
FLOW_QUEUE = 256                # frames one flow may have waiting
CONTROL_QUEUE = 4096            # control frames waiting (CLOSE, KEEPALIVE, ...)
KEEPIDLE, KEEPINTVL, KEEPCNT = 30, 10, 3    # TCP keepalive: a dead peer noticed in ~60 s

R_QUEUE = "queue"               # a datagram dropped because its flow's queue was full


def tune(sock):
    """The options every carrier connection gets: no Nagle delay, TCP keepalive."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL),
                        ("TCP_KEEPCNT", KEEPCNT)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class TcpCarrier:
    """One connected TCP socket carrying messages.

    on_message(carrier, msg) is called for each message received; on_closed(carrier,
    why) once, when the connection ends for any reason (why is a phrase for the log).
    """

    def __init__(self, sock, poller, on_message, on_closed, flow_queue=FLOW_QUEUE,
                 max_frame=MAX_FRAME):
        self.sock = sock
        self.poller = poller
        self.on_message = on_message
        self.on_closed = on_closed
        self.flow_queue = flow_queue
        self.deframer = Deframer(max_frame)
        self.control = deque()
        self.flows = OrderedDict()      # tag -> deque of frames, in round-robin order
        self.pending = b""
        self.waiting = False            # asked the poller for EPOLLOUT
        self.closed = False
        self.drops = {}
        self.frames_out = 0
        sock.setblocking(False)
        tune(sock)
        poller.register(sock, self.on_readable, self.on_writable)

    # -- sending

    def send(self, msg, tag=None):
        """Queue one message: a control message (tag None) or a datagram of flow `tag`."""
        if self.closed:
            return
        frame = FRAME.pack(len(msg)) + msg
        if tag is None:
            if len(self.control) >= CONTROL_QUEUE:
                self.control.popleft()
                self.count(R_QUEUE)
            self.control.append(frame)
            return
        queue = self.flows.get(tag)
        if queue is None:
            queue = self.flows[tag] = deque()
        elif len(queue) >= self.flow_queue:
            queue.popleft()
            self.count(R_QUEUE)
        queue.append(frame)

    def queued(self):
        """Frames waiting, and whether part of a write is pending."""
        return len(self.control) + sum(len(q) for q in self.flows.values()), bool(self.pending)

    def forget(self, tag):
        """Drop what waits for a flow that has ended."""
        self.flows.pop(tag, None)

    def flush(self):
        """Write what waits, as far as the kernel takes it now."""
        if self.closed or self.waiting:
            return
        self._write()

    def _gather(self):
        parts = []
        size = 0
        control, flows = self.control, self.flows
        while control and size < WRITE_CHUNK:
            frame = control.popleft()
            parts.append(frame)
            size += len(frame)
        while flows and size < WRITE_CHUNK:
            for tag in list(flows):
                queue = flows[tag]
                frame = queue.popleft()
                parts.append(frame)
                size += len(frame)
                if queue:
                    flows.move_to_end(tag)
                else:
                    del flows[tag]
                if size >= WRITE_CHUNK:
                    break
        self.frames_out += len(parts)
        return b"".join(parts)

    def _write(self):
        while True:
            if not self.pending:
                self.pending = self._gather()
                if not self.pending:
                    break
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close(f"sending failed: {exc.strerror}")
                return
            self.pending = self.pending[sent:]
            if self.pending:
                if not self.waiting:
                    self.waiting = True
                    self.poller.want_write(self.sock, True)
                return
        if self.waiting:
            self.waiting = False
            self.poller.want_write(self.sock, False)

    def on_writable(self):
        if not self.closed:
            self._write()

    # -- receiving

    def on_readable(self):
        if self.closed:
            return
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"receiving failed: {exc.strerror}")
            return
        if not data:
            self.close("closed by the peer")
            return
        self.deframer.feed(data)
        try:
            for msg in self.deframer.messages():
                self.on_message(self, msg)
                if self.closed:
                    return
        except Malformed as exc:
            self.count(exc.reason)
            self.close(f"a frame that cannot be right ({exc.reason})")

    # -- the end

    def count(self, reason):
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def close(self, why):
        """End the connection (once) and tell the owner why."""
        if self.closed:
            return
        self.closed = True
        self.poller.unregister(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.control.clear()
        self.flows.clear()
        self.pending = b""
        self.on_closed(self, why)


class Dialer:
    """Connects to a destination (addr.Destination), and again after each failure or
    loss, with backoff; after a failure the next of its addresses, and past the last the
    name resolved again.

    on_connected(sock) gets each connected socket; failed(now, why) after a connect
    that did not work, or lost(now) after a connection that worked and ended, schedule
    the next attempt.  tick(now) starts attempts and times out the slow ones.
    """

    def __init__(self, endpoint, poller, on_connected, log, what,
                 first=0.5, most=30.0, timeout=10.0):
        self.destination = endpoint         # an addr.Destination
        self.poller = poller
        self.on_connected = on_connected
        self.log = log
        self.what = what
        self.first, self.most, self.timeout = first, most, timeout
        self.backoff = first
        self.next_at = 0.0                  # when to try; None while a connection is up
        self.sock = None                    # a connect() under way
        self.deadline = None
        self.failures = 0

    def tick(self, now):
        if self.sock is not None and now >= self.deadline:
            self._abandon()
            self.failed(now, "timed out")
        if self.sock is None and self.next_at is not None and now >= self.next_at:
            self._start(now)

    def _start(self, now):
        if self.destination.address is None:
            try:
                self.destination.resolve()
            except (addr.Unresolved, ValueError) as exc:
                self.failed(now, str(exc))
                return
        family, sockaddr = self.destination.address
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed(now, os.strerror(err))
            return
        self.sock = sock
        self.deadline = now + self.timeout
        self.poller.register(sock, self._done, self._done)
        self.poller.want_write(sock, True)

    def _abandon(self):
        sock, self.sock = self.sock, None
        self.poller.unregister(sock)
        sock.close()

    def _done(self):
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.poller.unregister(sock)
        failure = sockets.connect_failure(sock)
        if failure is not None:
            self.failed(time.monotonic(), failure)
            return
        self.next_at = None
        self.on_connected(sock)

    def failed(self, now, why):
        """A connect, or a handshake on a new connection, did not work: try again later."""
        self.failures += 1
        if self.failures == 1 or self.failures % 10 == 0:
            self.log.warning("cannot connect to %s at %s: %s; trying again in %.1f s",
                             self.what, self.destination, why, self.backoff)
        if self.destination.address is not None:
            self.destination.advance()
        self.next_at = now + self.backoff
        self.backoff = min(self.most, self.backoff * 2)

    def succeeded(self):
        """The connection works (its handshake is done): the next loss retries at once."""
        self.failures = 0
        self.backoff = self.first

    def lost(self, now):
        """A working connection ended: connect again now."""
        self.next_at = now

    def stop(self):
        if self.sock is not None:
            self._abandon()
        self.next_at = None
