#!/usr/bin/env python3
"""Which MAC: keyed BLAKE2s, keyed BLAKE2b or HMAC-SHA256, all from the standard library.

    python3 tools/bench_mac.py [--rounds N]

Prints microseconds per MAC of a message of each size, 16-byte tags (BLAKE2 asked for a
16-byte digest; HMAC-SHA256 computed in full and cut to 16 bytes, as it would be on the
wire), and each one's cost relative to the BLAKE2b that udpmux uses.  The best of
`--rounds` timing runs is kept, which filters out a busy machine's noise.
"""

import argparse
import hashlib
import hmac
import os
import platform
import timeit

SIZES = (64, 256, 1200, 1500, 8192, 65507)
KEY = os.urandom(32)


def candidates(data):
    return {
        "blake2s": lambda: hashlib.blake2s(data, key=KEY, digest_size=16).digest(),
        "blake2b (udpmux)": lambda: hashlib.blake2b(data, key=KEY, digest_size=16).digest(),
        "hmac-sha256": lambda: hmac.digest(KEY, data, "sha256")[:16],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    print(f"python {platform.python_version()}, {platform.machine()}, "
          f"SHA extensions: {'yes' if ' sha_ni' in flags else 'no'}")
    print(f"{'bytes':>6}  " + "  ".join(f"{name:>22}" for name in candidates(b"")))
    for size in SIZES:
        data = os.urandom(size)
        number = max(200, 2_000_000 // (size + 200))
        costs = {name: min(timeit.repeat(fn, number=number, repeat=args.rounds)) / number * 1e6
                 for name, fn in candidates(data).items()}
        base = costs["blake2b (udpmux)"]
        print(f"{size:>6}  " + "  ".join(f"{us:8.2f} us ({us / base:4.2f}x)".rjust(22)
                                         for us in costs.values()))


if __name__ == "__main__":
    main()
