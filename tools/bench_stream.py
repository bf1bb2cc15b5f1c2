#!/usr/bin/env python3
"""The stream engine (udpmux/stream.py) in a simulated network, in virtual time.

    python3 tools/bench_stream.py [--megabytes N] [--rtt SECONDS] [--loss 0,0.01,0.05]

Moves N MB (20 by default) on one stream from a client Connection to a server
Connection over a simulated path (0.3 ms RTT, a 1 Gbit/s bottleneck with a 256 KB
queue, random loss both ways) and prints, for each loss rate, the virtual transfer
time and the CPU time the two engines spent per MB moved and per message (measured
with time.process_time around the engine calls of each step: the simulator's links and
queue are left out; "total CPU" includes them).  The simulator calls the engines once
per arriving message, the worst case for per-call overheads; a second table runs the
two engines alone in lockstep, a batch of messages per turn as an event loop that
drains its socket would, which is the floor of their cost.

The simulator (Link, Sim, App, bulk) is tests/netsim.py, which tests/test_stream.py drives
too; read its docstring.
"""

import argparse
import os
import random
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from netsim import QUEUE, RATE, RTT, bulk   # noqa: E402
from udpmux import stream as engine         # noqa: E402


def lockstep(megabytes, batch=64, seed=1):
    """The engines alone, the floor of their cost: no network, no loss; each turn the
    client sends a batch, the server takes it whole, reads and answers (one ACK a
    batch, as an event loop that drains its socket in batches would).  Returns
    (CPU seconds, data messages, ACK messages, ok)."""
    payload = random.Random(seed + 1).randbytes(int(megabytes * 1e6))
    client = engine.Connection(True)
    server = engine.Connection(False)
    sid = client.open_stream()
    got = bytearray()
    nonces = {client: 0, server: 0}
    counts = {client: 0, server: 0}
    written = 0
    now = 0.0
    t0 = time.process_time()

    def turn(a, b):
        out = a.messages_to_send(now, batch)
        first = nonces[a] + 1
        for m in out:
            nonces[a] += 1
            a.on_sent(nonces[a], m, now)
        for i, m in enumerate(out):
            b.on_message(first + i, m.mtype, m.tag, m.body, now)
        counts[a] += len(out)

    while not (len(got) == len(payload) and server.at_eof(sid) and client.all_acknowledged()):
        now += 0.0001
        if written < len(payload):
            written += client.write(sid, memoryview(payload)[written:])
            if written == len(payload):
                client.finish(sid)
        turn(client, server)
        server.streams_ready()
        while True:
            data = server.read(sid, 1 << 20)
            if not data:
                break
            got += data
        for conn in (client, server):
            if conn.next_timer(now) == 0:
                conn.on_timer(now)
        turn(server, client)
        client.streams_ready()
    cpu = time.process_time() - t0
    return cpu, counts[client], counts[server], bytes(got) == payload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--megabytes", type=float, default=20.0)
    ap.add_argument("--rtt", type=float, default=RTT)
    ap.add_argument("--loss", default="0,0.01,0.05")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each run")
    args = ap.parse_args(argv)
    mb = args.megabytes
    print(f"{mb:g} MB, one stream, RTT {args.rtt * 1e3:g} ms, "
          f"bottleneck {RATE * 8 / 1e9:g} Gbit/s, queue {QUEUE // 1024} KB, one engine call "
          "per arrival (no batching)")
    print(f"{'loss':>6} {'virtual s':>10} {'MB/s':>8} {'engine CPU s/MB':>16} "
          f"{'us/message':>11} {'total CPU s/MB':>15} {'msgs c->s':>10} {'msgs s->c':>10} "
          f"{'lost':>6} {'PTOs':>5} {'ok':>3}")
    for loss in (float(x) for x in args.loss.split(",")):
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
        t0 = time.process_time()
        sim, seconds, ok = bulk(mb, loss, args.rtt, seed=args.seed)
        total = time.process_time() - t0
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        c = sim.conns[0].counts
        messages = sim.messages[0] + sim.messages[1]
        print(f"{loss:>6.2%} {seconds:>10.3f} {mb / seconds:>8.1f} "
              f"{sim.engine_cpu / mb:>16.4f} {sim.engine_cpu / messages * 1e6:>11.1f} "
              f"{total / mb:>15.4f} {sim.messages[0]:>10} {sim.messages[1]:>10} "
              f"{c['messages_lost']:>6} {c['ptos']:>5} {'yes' if ok else 'NO':>3}")
    print("\nthe engines alone, lossless, in lockstep (best of 3): the floor of their cost")
    print(f"{'batch':>6} {'engine CPU s/MB':>16} {'us/data msg':>12} {'data msgs':>10} "
          f"{'ACKs':>6} {'ok':>3}")
    for batch in (64, 8):
        cpu, data, acks, ok = min(lockstep(mb, batch, args.seed) for _ in range(3))
        print(f"{batch:>6} {cpu / mb:>16.4f} {cpu / data * 1e6:>12.2f} {data:>10} {acks:>6} "
              f"{'yes' if ok else 'NO':>3}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
