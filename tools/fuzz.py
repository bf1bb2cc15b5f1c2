#!/usr/bin/env python3
"""Fuzz every listening socket of every udpmux mode, as real processes on loopback.

The engine is tests/fuzzing.py (tests/test_fuzz.py runs it briefly); this runs it for
longer: --count datagrams or frames in all, shared among the targets, each target
bounded by its share of --seconds.  For each target it prints what was sent, the rate,
the drops the daemon counted (`udpmux status` of a relay; the drop summaries the others
log once a minute, marked *; "-" where there is neither), the resident memory of the
processes watched (their sum) before and after, and PASS or FAIL; a failure is
explained below the table with its seed and the command that runs it again.  Exit
status 0 when all passed.  --list names the targets.

    sudo .venv/bin/python tools/fuzz.py                      # 1,000,000 in all
    sudo .venv/bin/python tools/fuzz.py --target relay-register --count 50000 --seed 7

Root is needed for the raw socket that spoofs a peer's address and for the packet
socket that captures loopback traffic; traffic goes to loopback only.
"""

import argparse
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

from fuzzing import MiB, RSS_GROWTH, TARGETS, run_target  # noqa: E402


def _rss(values):
    known = [v for v in values.values() if v is not None]
    return f"{sum(known) / MiB:.1f}" if known else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000,
                        help="datagrams or frames in all, shared among the targets "
                             "(default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1800.0,
                        help="time bound for all the targets together (default: %(default)s)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="fuzz only this target (repeatable); default: all")
    parser.add_argument("--seed", type=int, help="the first target's seed; each next "
                        "target gets the next number (default: random)")
    parser.add_argument("--list", action="store_true", help="name the targets and exit")
    parser.add_argument("--rss-growth", type=float,
                        help="MiB a watched process may grow by (default: "
                             f"{RSS_GROWTH // MiB}, 64 for link's stream buffers)")
    args = parser.parse_args(argv)
    if args.list:
        for name, cls in TARGETS.items():
            print(f"{name:<24} {cls.about}")
        return 0
    names = args.target or list(TARGETS)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    count = max(1, args.count // len(names))
    seconds = args.seconds / len(names)
    print(f"udpmux fuzz: {len(names)} targets, {count} each, at most {seconds:.0f} s each, "
          f"seeds from {seed}", flush=True)
    header = (f"{'target':<24} {'sent':>9} {'unit':<11} {'rate/s':>8} {'drops':>8} "
              f"{'RSS MiB before':>14} {'after':>7}  result")
    print(header)
    print("-" * len(header), flush=True)
    results = []
    started = time.monotonic()
    for n, name in enumerate(names):
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
            result = run_target(TARGETS[name], tmp, count, seconds, seed + n,
                                rss_growth=int(args.rss_growth * MiB) if args.rss_growth
                                else None)
        results.append(result)
        drops = str(result.drops) if result.drops is not None else \
            f"{result.logged_drops}*" if result.logged_drops is not None else "-"
        print(f"{name:<24} {result.sent:>9} {result.unit:<11} {result.rate:>8.0f} {drops:>8} "
              f"{_rss(result.rss_before):>14} {_rss(result.rss_after):>7}  "
              f"{'PASS' if result.ok else 'FAIL'}", flush=True)
    total = sum(r.sent for r in results)
    print("-" * len(header))
    print(f"{'all':<24} {total:>9} {'':<11} {total / (time.monotonic() - started):>8.0f}"
          f"{'':>9} {'':>14} {'':>7}  "
          f"{'PASS' if all(r.ok for r in results) else 'FAIL'}  "
          f"({time.monotonic() - started:.0f} s)")
    print("drops: counted by the relay (udpmux status); N*: at least, from the drop "
          "summaries the daemon logs once a minute; -: none to read")
    for result in results:
        if not result.ok:
            print("\nFAIL " + result.explain())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
