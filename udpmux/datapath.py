"""The chores of every data path: counting drops, reading a socket in bounded batches,
and sending through an outbox whose flush always counts what the kernel refused.

    socket --batches()--> handler(n) ...          Drops: reason -> count, all time
                                                  (status, the report block), and a
    Sender.add(msg, key) ... Sender.flush() -->   summary in the log at most once a
        (refused datagrams: Drops, R_SEND)        minute (log.DropLog)

How we name things:
  drops    counted datagrams or messages that were not delivered, by reason (reasons.py)
  round    one recvmmsg() of a drain: a socket gets at most DRAIN_ROUNDS per wake-up, so
           one busy socket cannot starve the others or the control pipe
"""

import time

from udpmux.batchio import Outbox, recv_into
from udpmux.log import DropLog
from udpmux.reasons import R_RECEIVE, R_SEND, R_TOO_LARGE

BATCH = 64                      # datagrams per recvmmsg() and sendmmsg()
DRAIN_ROUNDS = 8                # batches read from one socket per wake-up, at most
DROP_LOG_EVERY = 60.0           # seconds between summaries of drops in the log


class Drops:
    """Drops by reason: `counts` since the start (what status shows), and a summary in
    the log at most every DROP_LOG_EVERY seconds (tick())."""

    __slots__ = ("counts", "summary")

    def __init__(self, log, what, interval=DROP_LOG_EVERY):
        self.counts = {}
        self.summary = DropLog(log, what, interval)

    def __call__(self, reason, n=1):
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.summary.count(reason, n)

    def take(self, counter, reason=None):
        """Count and clear a Counter of drops kept elsewhere (an outbox's by errno, a
        carrier's by reason): under `reason`, or under each of its own keys."""
        if not counter:
            return
        if reason is None:
            for key, n in counter.items():
                self(key, n)
        else:
            self(reason, sum(counter.values()))
        counter.clear()

    def restore(self, counts):
        """Carry on from a predecessor's counts (a respawned worker)."""
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n

    def tick(self, now):
        self.summary.maybe_log(now)


def batches(sock, batch, drops, headroom=0, rounds=DRAIN_ROUNDS, errors=None):
    """Read sock into batch, yielding the count of each batch read, at most `rounds`
    times; stop once a batch comes back short (the socket is drained: the call that
    would say so is spared).  Receive errors the batch saw are counted at the end, after
    errors(counter by errno), if given, has seen them (an ICMP error on a connected
    socket says something of its peer)."""
    try:
        for _ in range(rounds):
            n = recv_into(sock, batch, headroom)
            if not n:
                return
            yield n
            if n < batch.count:
                return
    finally:
        if errors is not None and batch.errors:
            errors(batch.errors)
        drops.take(batch.errors, R_RECEIVE)


def each_message(sock, batch, drops, handle, after_batch=None, errors=None):
    """Drain sock (batches()) and call handle(msg, key, now) for each datagram: msg a
    memoryview into the batch, valid during the call.  One larger than the batch's slot
    is counted (R_TOO_LARGE), not handled.  after_batch(), if given, runs after each
    batch.  For the paths that take a datagram at a time; the relay's and the
    exposer's fast paths walk their batches themselves.  errors: as for batches()."""
    for n in batches(sock, batch, drops, errors=errors):
        now = time.monotonic()
        view, lengths, keys, starts = batch.view, batch.lengths, batch.keys, batch.starts
        for i in range(n):
            if lengths[i] > batch.capacity:
                drops(R_TOO_LARGE)
                continue
            start = starts[i]
            handle(view[start:start + lengths[i]], keys[i], now)
        if after_batch is not None:
            after_batch()


class Sender:
    """Messages queued for one socket (an Outbox), sent by flush(), which counts what the
    kernel refused under R_SEND.  `before_flush`, if given, runs before anything leaves
    (the relay records its nonces there).  The socket may be replaced (a rebind)."""

    __slots__ = ("sock", "outbox", "drops", "before_flush")

    def __init__(self, sock, drops, count=2 * BATCH, before_flush=None):
        self.sock = sock
        self.outbox = Outbox(count)
        self.drops = drops
        self.before_flush = before_flush

    def __len__(self):
        return len(self.outbox)

    def add(self, msg, key):
        """Queue one message (copied) for peer key `key`."""
        if not self.outbox.room(len(msg)):
            self.flush()
        self.outbox.add(msg, key)

    def add_from(self, batch, start, length, key):
        """Queue a datagram of a receive batch, without a copy."""
        if not self.outbox.room():
            self.flush()
        self.outbox.add_from(batch, start, length, key)

    def add_many_from(self, batch, starts, sizes, keys):
        """Queue datagrams of a receive batch (one key, or one per datagram) without a
        copy, flushing first if they would not fit; empties the lists."""
        if not starts:
            return
        if len(self.outbox) + len(starts) > self.outbox.count:
            self.flush()
        self.outbox.add_many_from(batch, starts, sizes, keys)
        starts.clear()
        sizes.clear()
        if isinstance(keys, list):
            keys.clear()

    def flush(self):
        if len(self.outbox):
            if self.before_flush is not None:
                self.before_flush()
            self.outbox.flush(self.sock)
            self.drops.take(self.outbox.drops, R_SEND)
