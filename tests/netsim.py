"""A simulated network for the stream engine (udpmux/stream.py), in virtual time.

Two Connections talk through it with no sockets and no real clock: a priority queue of
(arrival time, message) and a virtual clock, so a transfer of megabytes over a lossy path is
deterministic (seeded) and runs as fast as the CPU allows.  tests/test_stream.py
drives it, and tools/bench_stream.py times the engines with it.

    Link    one direction of the path: one-way delay, an optional bottleneck (rate and
            a drop-tail queue), random loss, reordering, duplication, blackouts
    Sim     two Connections joined by two Links, a priority queue of (arrival time,
            message) and a virtual clock; it calls the engines as a udpmux event loop
            would (on_message, the application, messages_to_send / on_sent, on_timer),
            and numbers each side's messages from 1 as a Session would
    App     an application at one end: opens streams, writes the bytes given for each
            stream and finishes it, reads everything (or slowly), records the events
    bulk    one stream of N MB from client to server over a Link each way

The default path is 0.3 ms RTT and a 1 Gbit/s bottleneck with a 256 KB queue (RTT, RATE,
QUEUE).  Sim.engine_cpu is the CPU time spent inside the engine calls (time.process_time),
without the simulator's own links and queue.
"""

import heapq
import random
import time

from udpmux import stream as engine

RTT = 0.0003
RATE = 125e6                    # bytes/s: 1 Gbit/s
QUEUE = 256 * 1024              # bytes the bottleneck holds
TIMER_SLACK = 1e-9              # a timer runs this long after its deadline (float rounding)


class Stalled(Exception):
    """Nothing left to happen, but the applications are not done."""


class Link:
    """One direction of the simulated path."""

    def __init__(self, rng, delay=RTT / 2, rate=None, queue=None, loss=0.0, reorder=0.0,
                 reorder_delay=0.001, duplicate=0.0, blackouts=()):
        self.rng = rng
        self.delay = delay
        self.rate = rate
        self.queue = queue
        self.loss = loss
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self.duplicate = duplicate
        self.blackouts = tuple(blackouts)
        self.busy_until = 0.0
        self.sent = self.lost = self.overflow = self.blacked_out = 0

    def dark(self, t):
        for start, end in self.blackouts:
            if start <= t < end:
                return True
        return False

    def transmit(self, now, size):
        """Arrival times of a message sent now (none if it is lost, two if duplicated)."""
        self.sent += 1
        t = now
        if self.rate:
            start = max(now, self.busy_until)
            if self.queue is not None and (start - now) * self.rate + size > self.queue:
                self.overflow += 1
                return ()
            self.busy_until = start + size / self.rate
            t = self.busy_until
        t += self.delay
        rng = self.rng
        if self.blackouts and (self.dark(now) or self.dark(t)):
            self.blacked_out += 1
            return ()
        if self.loss and rng.random() < self.loss:
            self.lost += 1
            return ()
        if self.reorder and rng.random() < self.reorder:
            t += rng.random() * self.reorder_delay
        if self.duplicate and rng.random() < self.duplicate:
            return (t, t + rng.random() * self.reorder_delay)
        return (t,)


class App:
    """The application at one end.

    data_for(sid) gives the bytes this end writes on a stream (then it finishes it);
    `opens` streams are opened at the start (client).  read_rate None reads everything
    at once; otherwise read_rate bytes a second, read_quantum seconds apart."""

    def __init__(self, conn, data_for, opens=0, read_rate=None, read_quantum=0.002,
                 finish=True):
        self.conn = conn
        self.data_for = data_for
        self.opens = opens
        self.read_rate = read_rate
        self.read_quantum = read_quantum
        self.finish = finish
        self.out = {}                   # sid -> [bytes, offset written, finished]
        self.got = {}                   # sid -> bytearray
        self.eof = set()
        self.resets = {}                # sid -> code
        self.acked = set()
        self.new = []
        self.wakeup = None
        self._next_read = 0.0

    def start(self, now):
        for _ in range(self.opens):
            self._add(self.conn.open_stream())

    def _add(self, sid):
        self.out[sid] = [self.data_for(sid), 0, False]
        self.got[sid] = bytearray()

    def step(self, now):
        conn = self.conn
        for ev in conn.streams_ready():
            if ev.kind == engine.EV_NEW:
                self.new.append(ev.sid)
                self._add(ev.sid)
            elif ev.kind == engine.EV_RESET:
                self.resets[ev.sid] = ev.code
            elif ev.kind == engine.EV_ACKED:
                self.acked.add(ev.sid)
        for sid, w in self.out.items():
            if w[2] or sid in self.resets:
                continue
            data, off = w[0], w[1]
            if off < len(data):
                w[1] = off = off + conn.write(sid, memoryview(data)[off:])
            if off == len(data) and self.finish:
                conn.finish(sid)
                w[2] = True
        if self.read_rate is None:
            for sid, buf in self.got.items():
                if sid in self.eof:
                    continue
                while True:
                    data = conn.read(sid, 1 << 20)
                    if not data:
                        break
                    buf += data
                if conn.at_eof(sid):
                    self.eof.add(sid)
        elif now >= self._next_read:
            budget = int(self.read_rate * self.read_quantum)
            for sid, buf in self.got.items():
                if sid in self.eof:
                    continue
                data = conn.read(sid, budget)
                budget -= len(data)
                buf += data
                if conn.at_eof(sid):
                    self.eof.add(sid)
            self._next_read = now + self.read_quantum
            self.wakeup = self._next_read

    def done(self):
        return all(w[2] for w in self.out.values()) and self.eof >= set(self.got)


class Sim:
    """Two Connections, two Links, a virtual clock."""

    def __init__(self, client, server, up, down, client_app, server_app, batch=64):
        self.now = 0.0
        self.conns = (client, server)
        self.links = (up, down)         # up: client -> server
        self.apps = (client_app, server_app)
        self.nonces = [0, 0]
        self.heap = []
        self.order = 0
        self.batch = batch
        self.steps = 0
        self.engine_cpu = 0.0
        self.messages = [0, 0]
        self.on_step = None             # called with the Sim after every step

    def _collect(self, side):
        """The messages side sends now, each with its nonce (on_sent() done)."""
        conn = self.conns[side]
        now = self.now
        sent = []
        for _ in range(1000):
            msgs = conn.messages_to_send(now, self.batch)
            for m in msgs:
                self.nonces[side] += 1
                nonce = self.nonces[side]
                conn.on_sent(nonce, m, now)
                sent.append((nonce, m))
            if len(msgs) < self.batch:
                break
        return sent

    def _transmit(self, side, sent):
        link = self.links[side]
        other = 1 - side
        now = self.now
        heap = self.heap
        for nonce, m in sent:
            self.messages[side] += 1
            for t in link.transmit(now, m.size):
                self.order += 1
                heapq.heappush(heap, (t, self.order, other, nonce, m.mtype, m.tag, m.body))

    def start(self):
        for side in (0, 1):
            self.apps[side].start(self.now)
            self._transmit(side, self._collect(side))

    def next_time(self):
        times = []
        if self.heap:
            times.append(self.heap[0][0])
        for side in (0, 1):
            t = self.conns[side].next_timer(self.now)
            if t is not None:
                times.append(self.now + t + TIMER_SLACK)
            wakeup = self.apps[side].wakeup
            if wakeup is not None:
                times.append(max(wakeup, self.now))
        return min(times) if times else None

    def step(self):
        t = self.next_time()
        if t is None:
            raise Stalled(f"nothing to do at t={self.now:.6f}")
        if t > self.now:
            self.now = t
        now = self.now
        heap = self.heap
        conns = self.conns
        t0 = time.process_time()
        while heap and heap[0][0] <= now:
            _t, _o, side, nonce, mtype, tag, body = heapq.heappop(heap)
            conns[side].on_message(nonce, mtype, tag, body, now)
        for side in (0, 1):
            conn = conns[side]
            wait = conn.next_timer(now)
            if wait is not None and wait <= 0:
                conn.on_timer(now)
        for side in (0, 1):
            self.apps[side].step(now)
        sent = (self._collect(0), self._collect(1))
        self.engine_cpu += time.process_time() - t0
        self._transmit(0, sent[0])
        self._transmit(1, sent[1])
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)

    def done(self):
        return (self.apps[0].done() and self.apps[1].done()
                and self.conns[0].all_acknowledged() and self.conns[1].all_acknowledged())

    def run(self, until=600.0, max_steps=10_000_000):
        """Run until both applications are done and everything is acknowledged;
        returns the virtual time it took."""
        self.start()
        while not self.done():
            if self.now > until or self.steps > max_steps:
                raise TimeoutError(f"not done at t={self.now:.3f} after {self.steps} steps")
            self.step()
        return self.now


    def drain(self, until=600.0, max_steps=1_000_000):
        """Go on until neither end has a message in flight: a retransmission sent just
        before its original was acknowledged waits for its own ACK, or is declared lost.
        Raises TimeoutError when something stays in flight (a leak)."""
        steps = self.steps + max_steps
        while any(conn.bytes_in_flight for conn in self.conns):
            if self.now > until or self.steps > steps or self.next_time() is None:
                raise TimeoutError(f"still in flight at t={self.now:.3f}: "
                                   f"{[c.bytes_in_flight for c in self.conns]} bytes")
            self.step()


def bulk(megabytes, loss, rtt=RTT, rate=RATE, queue=QUEUE, seed=1, on_step=None,
         **conn_settings):
    """One stream of `megabytes` MB from client to server; returns (sim, seconds, ok)."""
    rng = random.Random(seed)
    payload = random.Random(seed + 1).randbytes(int(megabytes * 1e6))
    client = engine.Connection(True, **conn_settings)
    server = engine.Connection(False, **conn_settings)
    up = Link(rng, rtt / 2, rate, queue, loss)
    down = Link(rng, rtt / 2, rate, queue, loss)
    sim = Sim(client, server, up, down,
              App(client, lambda sid: payload, opens=1), App(server, lambda sid: b""))
    sim.on_step = on_step
    seconds = sim.run()
    ok = bytes(sim.apps[1].got[1]) == payload
    return sim, seconds, ok
