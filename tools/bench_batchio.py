#!/usr/bin/env python3
"""Measure udpmux.batchio in a relay-like loop on loopback.

    python3 tools/bench_batchio.py [--seconds S] [--size BYTES]

Three processes per run, all on loopback:

    sender --(A)--> relay (this process) --(B)--> sink
    sendmmsg,       receive on A, look the      recvmmsg,
    64 a call       source up in a dict, send   counts
                    every datagram on from B

The relay is measured with getrusage(RUSAGE_SELF), which excludes the sender and the sink
(separate processes).  Paths:
  (1)  fast      recv_into() + Outbox.add_many_from() + flush(): recvmmsg/sendmmsg (ctypes)
  (1b) fast      the same with one Outbox.add_from() call per datagram
  (2)  portable  (1) with portable=True: recvfrom_into/sendto loops
  (3)  naive     one recvfrom() and one sendto() per selector wakeup
The sender sends as fast as it can (bounded in count and time), so the relay runs
saturated: "CPU s/M" (CPU-seconds per million datagrams relayed) is the efficiency figure,
"vs (1)" the ratio of path (1)'s CPU per datagram to this path's (1.00 = as efficient).
With two or more CPUs the relay is pinned to one CPU and the sender and sink to the others.
Each configuration runs ROUNDS times, interleaved, and the round with the least CPU per
datagram is shown: other load on the machine only ever makes a round look worse.
"""

import argparse
import os
import resource
import selectors
import signal
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from udpmux import batchio, wire                # noqa: E402
from udpmux.addr import from_peer_key, peer_key  # noqa: E402

DEFAULT_SECONDS = 1.0       # measured seconds per run
DEFAULT_ROUNDS = 2          # runs per configuration (4 paths x 2 sizes x 2 rounds = 16 runs)
DEFAULT_SIZES = (64, 1200)
WARMUP = 0.2                # seconds of relaying before the measurement starts
CHILD_SLACK = 0.2           # sender and sink outlive the measurement by this much
MAX_RATE = 5_000_000        # datagrams per second the sender may send at most
SENDER_SOCKETS = 4          # distinct source addresses, so the relay's lookup sees several keys
DRAIN_BATCHES = 8           # batches a relay takes per wakeup before looking at the selector
SELECT_TIMEOUT = 0.05
SOCKET_BUFFER = 4 << 20
LOOPBACK = "127.0.0.1"

PATHS = (("(1) recvmmsg/sendmmsg", "fast"),
         ("(1b) same, add_from each", "fast-each"),
         ("(2) recvfrom_into/sendto", "portable"),
         ("(3) recvfrom+sendto/wakeup", "naive"))


def udp_socket(buffers=SOCKET_BUFFER):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def pin(cpus):
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


# ------------------------------------------------------------------------------ children


def run_sender(relay_key, size, deadline):
    """Send `size`-byte datagrams to the relay until the deadline or the count bound."""
    socks = [udp_socket() for _ in range(SENDER_SOCKETS)]
    max_count = int(MAX_RATE * (deadline - time.monotonic()))
    batch = batchio.Batch(1, size, portable=True)
    batch.buf[:size] = bytes(i & 0xFF for i in range(size))
    out = batchio.Outbox(portable=not batchio.HAVE_MMSG)
    for _ in range(batchio.MAX_PER_CALL):
        out.add_from(batch, 0, size, relay_key)
    sent = 0
    rounds = 0
    if batchio.HAVE_MMSG:
        # The outbox's records are not changed by sending: send the same 64 over and over.
        while sent < max_count and time.monotonic() < deadline:
            sent += out._send_mmsg(socks[rounds % SENDER_SOCKETS], batchio.MAX_PER_CALL)
            rounds += 1
    else:
        data = bytes(batch.buf[:size])
        address = from_peer_key(relay_key)[1]
        while sent < max_count and time.monotonic() < deadline:
            sock = socks[rounds % SENDER_SOCKETS]
            for _ in range(batchio.MAX_PER_CALL):
                try:
                    sock.sendto(data, address)
                    sent += 1
                except OSError:
                    pass
            rounds += 1
    return sent


def run_sink(sock, deadline):
    """Count datagrams until the deadline."""
    batch = batchio.Batch()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    total = 0
    while time.monotonic() < deadline:
        if selector.select(SELECT_TIMEOUT):
            for _ in range(DRAIN_BATCHES):
                n = batchio.recv_into(sock, batch)
                if not n:
                    break
                total += n
    return total


def spawn(cpus, work, *args):
    """Fork a child that runs work(*args) and writes the result to a pipe."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(rfd)
            pin(cpus)
            result = work(*args)
            os.write(wfd, str(result).encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(wfd)
    return pid, rfd


def reap(pid, rfd, deadline):
    """The child's result (an int), waiting for it at most until the deadline."""
    chunks = []
    with selectors.DefaultSelector() as selector:
        selector.register(rfd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                chunk = os.read(rfd, 64)
                if not chunk:           # EOF: the child has exited
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    os.close(rfd)
    os.waitpid(pid, 0)
    text = b"".join(chunks)
    return int(text) if text else 0


# ------------------------------------------------------------------------------ relays


def relay_batched(sock_in, sock_out, sink_key, path, stop_at, measure_at):
    """Paths (1), (1b) and (2).  Returns (datagrams, calls, user, sys, wall) over the
    measurement."""
    portable = path == "portable"
    each = path == "fast-each"
    batch = batchio.Batch(portable=portable)
    out = batchio.Outbox(portable=portable)
    routes = {}
    selector = selectors.DefaultSelector()
    selector.register(sock_in, selectors.EVENT_READ)
    recv_into = batchio.recv_into
    relayed = calls = 0
    mark = None
    while True:
        now = time.monotonic()
        if mark is None and now >= measure_at:
            mark = (relayed, calls, *cpu_seconds(), now)
        if now >= stop_at:
            break
        if not selector.select(SELECT_TIMEOUT):
            continue
        for _ in range(DRAIN_BATCHES):
            n = recv_into(sock_in, batch)
            if not n:
                break
            calls += 1
            if batch.any_truncated:
                continue            # not in this benchmark: sizes fit
            # A relay's per-datagram decision: look the source up (here every source goes
            # to the sink).
            dests = [routes.get(key, sink_key) for key in batch.keys]
            if each:
                starts, lengths = batch.starts, batch.lengths
                for i in range(n):
                    out.add_from(batch, starts[i], lengths[i], dests[i])
            else:
                out.add_many_from(batch, batch.starts[:n], batch.lengths, dests)
            relayed += out.flush(sock_out)
    return finish(mark, relayed, calls)


def relay_naive(sock_in, sock_out, sink_key, _path, stop_at, measure_at):
    """Path (3): one recvfrom() and one sendto() per selector wakeup."""
    sink_address = from_peer_key(sink_key)[1]
    routes = {}
    selector = selectors.DefaultSelector()
    selector.register(sock_in, selectors.EVENT_READ)
    relayed = calls = 0
    mark = None
    while True:
        now = time.monotonic()
        if mark is None and now >= measure_at:
            mark = (relayed, calls, *cpu_seconds(), now)
        if now >= stop_at:
            break
        if not selector.select(SELECT_TIMEOUT):
            continue
        try:
            data, address = sock_in.recvfrom(65536)
        except BlockingIOError:
            continue
        calls += 1
        dest = routes.get(address)
        if dest is None:
            dest = routes[address] = sink_address
        try:
            sock_out.sendto(data, dest)
            relayed += 1
        except OSError:
            pass
    return finish(mark, relayed, calls)


def finish(mark, relayed, calls):
    user, system = cpu_seconds()
    now = time.monotonic()
    if mark is None:
        return 0, 0, 0.0, 0.0, 0.0
    relayed0, calls0, user0, system0, now0 = mark
    return relayed - relayed0, calls - calls0, user - user0, system - system0, now - now0


RELAYS = {"fast": relay_batched, "fast-each": relay_batched, "portable": relay_batched,
          "naive": relay_naive}


def run(path, size, seconds, cpus_relay, cpus_children):
    relay_in, relay_out, sink = udp_socket(), udp_socket(), udp_socket()
    sink_key = peer_key(socket.AF_INET, sink.getsockname())
    start = time.monotonic()
    measure_at = start + WARMUP
    stop_at = measure_at + seconds
    child_deadline = stop_at + CHILD_SLACK
    sink_child = spawn(cpus_children, run_sink, sink, child_deadline)
    sender_child = spawn(cpus_children, run_sender,
                         peer_key(socket.AF_INET, relay_in.getsockname()), size, child_deadline)
    sink.close()
    pin(cpus_relay)
    try:
        result = RELAYS[path](relay_in, relay_out, sink_key, path, stop_at, measure_at)
    finally:
        relay_in.close()
        relay_out.close()
    sent = reap(*sender_child, child_deadline + 2)
    received = reap(*sink_child, child_deadline + 2)
    return result, sent, received



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"measured seconds per run (default {DEFAULT_SECONDS})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"runs per configuration, best shown (default {DEFAULT_ROUNDS})")
    parser.add_argument("--size", type=int, action="append",
                        help="datagram size in bytes (repeatable; default 64 and 1200)")
    args = parser.parse_args(argv)
    sizes = args.size or DEFAULT_SIZES
    if not 0 < args.seconds <= 60:
        parser.error("--seconds must be more than 0 and at most 60")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be from 1 to 20")
    if any(not 0 <= size <= wire.MAX_UDP_PAYLOAD for size in sizes):
        parser.error(f"--size must be from 0 to {wire.MAX_UDP_PAYLOAD}")
    if not batchio.HAVE_MMSG:
        print("recvmmsg/sendmmsg are not available here: path (1) runs the portable code",
              file=sys.stderr)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus_relay, cpus_children = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (None, None)
    print(f"udpmux.batchio relay benchmark: {args.seconds:g} s per run, best of "
          f"{args.rounds}, {len(cpus) or '?'} CPUs, relay pinned: "
          f"{'yes' if cpus_relay else 'no'}, Python {sys.version.split()[0]}")

    best = {}
    for _round in range(args.rounds):
        for size in sizes:
            for _label, path in PATHS:
                (relayed, calls, user, system, wall), sent, received = run(
                    path, size, args.seconds, cpus_relay, cpus_children)
                if not relayed or not wall:
                    continue
                figures = dict(cpu_per_m=(user + system) / relayed * 1e6,
                               user_per_m=user / relayed * 1e6,
                               sys_per_m=system / relayed * 1e6,
                               rate=relayed / wall, busy=(user + system) / wall,
                               per_call=relayed / calls, sink_got=received / max(sent, 1))
                kept = best.get((size, path))
                if kept is None or figures["cpu_per_m"] < kept["cpu_per_m"]:
                    best[size, path] = figures

    header = (f"{'size':>5}  {'path':<27} {'dgrams/s':>10} {'CPU s/M':>8} {'user':>6} "
              f"{'sys':>6} {'busy':>5} {'per call':>8} {'sink got':>8} {'vs (1)':>7} "
              f"{'rate vs (1)':>11}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        base = best.get((size, PATHS[0][1]))
        for label, path in PATHS:
            row = best.get((size, path))
            if row is None:
                print(f"{size:>5}  {label:<27} nothing relayed")
                continue
            ratio = f"{base['cpu_per_m'] / row['cpu_per_m']:>7.2f}" if base else f"{'-':>7}"
            rate_ratio = f"{row['rate'] / base['rate']:>11.2f}" if base else f"{'-':>11}"
            print(f"{size:>5}  {label:<27} {row['rate']:>10,.0f} {row['cpu_per_m']:>8.3f} "
                  f"{row['user_per_m']:>6.3f} {row['sys_per_m']:>6.3f} {row['busy']:>5.0%} "
                  f"{row['per_call']:>8.1f} {row['sink_got']:>8.0%} {ratio} {rate_ratio}")
    print("CPU s/M, user, sys: relay CPU-seconds per million datagrams relayed; busy: relay "
          "CPU / wall time;\nper call: datagrams per receive call; sink got: share of the "
          "sender's datagrams the sink counted\n(the rest overflowed a socket buffer, as UDP "
          "does under overload); vs (1): CPU efficiency relative to path (1).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
