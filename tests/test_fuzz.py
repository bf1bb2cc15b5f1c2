"""Fuzzing: mutated, truncated, replayed, spoofed and validly sealed messages thrown at
every listening socket of every mode, as real processes on loopback (the engine and the
targets are in tests/fuzzing.py; tools/fuzz.py runs the same for longer).

Each target gets COUNT datagrams or frames within SECONDS, then must pass: every process
alive (a relay's worker never restarted), no "Traceback", "crashed" or "internal error"
in any log, resident memory grown less than the target's bound, the legitimate flow
through the same daemon still working.  The seed is random and printed; to replay a
failure, UDPMUX_FUZZ_SEED=N (UDPMUX_FUZZ_COUNT and UDPMUX_FUZZ_SECONDS change the size):

    UDPMUX_FUZZ_SEED=1234 .venv/bin/python -m pytest -q tests/test_fuzz.py -k relay-tcp
"""

import os
import random

import pytest

from fuzzing import TARGETS, run_target

COUNT = int(os.environ.get("UDPMUX_FUZZ_COUNT", "20000"))
SECONDS = float(os.environ.get("UDPMUX_FUZZ_SECONDS", "9"))
SEED = os.environ.get("UDPMUX_FUZZ_SEED")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="capturing loopback traffic and spoofing addresses need root")


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(name, tmp_path):
    seed = int(SEED) if SEED else random.randrange(1 << 32)
    print(f"target {name}: seed {seed} (UDPMUX_FUZZ_SEED={seed} replays it)")
    result = run_target(TARGETS[name], tmp_path, COUNT, SECONDS, seed)
    print(f"{result.sent} {result.unit} in {result.seconds:.1f} s, drops {result.drops}, "
          f"phases {[(name, at) for name, at, _t in result.phases]}")
    for label, before in result.rss_before.items():
        after = result.rss_after.get(label)
        if before and after:
            print(f"{label}: RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert result.ok, result.explain()
    assert result.sent >= min(COUNT, 200), f"only {result.sent} {result.unit} were sent"
