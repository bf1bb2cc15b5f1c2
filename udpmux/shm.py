"""A small block of memory shared across fork, written by one process under a seqlock.

The master maps it before forking a worker; the worker writes its state into it (its
counters, its session with the peer) about once a second, and the master reads it for
`udpmux status` without asking the worker anything.  A respawned worker reads what its
predecessor wrote and carries on from there.

    +------------------+------------------+---------------------------------+
    | generation (u64) |   length (u32)   |  payload: UTF-8 JSON (length B)  |
    +------------------+------------------+---------------------------------+

The writer makes the generation odd, writes, then makes it even; a reader retries
while the generation is odd or changed under it, so it never sees a torn write.
"""

import json
import mmap
import os
import struct
import time

HEADER = struct.Struct("=QI")
DEFAULT_SIZE = 64 * 1024
SPIN_TRIES = 100                # quick retries before a reader starts yielding the CPU
READ_PATIENCE = 2.0             # seconds a reader waits for a writer (one that died mid-write)


class SharedBlock:
    def __init__(self, size=DEFAULT_SIZE):
        self.size = size
        self.mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def write(self, payload):
        if len(payload) > self.size - HEADER.size:
            raise ValueError(f"{len(payload)} bytes do not fit a {self.size}-byte block")
        (gen,) = struct.unpack_from("=Q", self.mem, 0)
        gen += gen & 1          # odd: a writer was killed halfway; its write is void
        struct.pack_into("=Q", self.mem, 0, gen + 1)             # odd: writing
        struct.pack_into("=I", self.mem, 8, len(payload))
        self.mem[HEADER.size:HEADER.size + len(payload)] = payload
        struct.pack_into("=Q", self.mem, 0, gen + 2)             # even: done

    def read(self, patience=READ_PATIENCE):
        """The last complete payload (b"" if nothing was written yet).

        A writer descheduled halfway through a write holds readers up for as long as it
        is off the CPU, so after a few quick retries the reader yields the CPU to it."""
        deadline = None
        tries = 0
        while True:
            gen, length = HEADER.unpack_from(self.mem, 0)
            if not gen & 1:
                data = self.mem[HEADER.size:HEADER.size + min(length, self.size - HEADER.size)]
                if struct.unpack_from("=Q", self.mem, 0)[0] == gen:
                    return data
            tries += 1
            if tries >= SPIN_TRIES:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + patience
                elif now > deadline:
                    raise TimeoutError("shared block: the writer never finished a write")
                os.sched_yield()

    def write_json(self, value):
        self.write(json.dumps(value, separators=(",", ":")).encode())

    def read_json(self, patience=READ_PATIENCE):
        """The last value written; TimeoutError if a write never finished (a writer
        killed halfway), until the next write."""
        data = self.read(patience)
        return json.loads(data) if data else {}

    def close(self):
        self.mem.close()
