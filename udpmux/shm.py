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
import struct

HEADER = struct.Struct("=QI")
DEFAULT_SIZE = 64 * 1024
READ_TRIES = 1000


class SharedBlock:
    def __init__(self, size=DEFAULT_SIZE):
        self.size = size
        self.mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def write(self, payload):
        if len(payload) > self.size - HEADER.size:
            raise ValueError(f"{len(payload)} bytes do not fit a {self.size}-byte block")
        (gen,) = struct.unpack_from("=Q", self.mem, 0)
        struct.pack_into("=Q", self.mem, 0, gen + 1)             # odd: writing
        struct.pack_into("=I", self.mem, 8, len(payload))
        self.mem[HEADER.size:HEADER.size + len(payload)] = payload
        struct.pack_into("=Q", self.mem, 0, gen + 2)             # even: done

    def read(self):
        """The last complete payload (b"" if nothing was written yet)."""
        for _ in range(READ_TRIES):
            gen, length = HEADER.unpack_from(self.mem, 0)
            if gen & 1:
                continue
            data = self.mem[HEADER.size:HEADER.size + min(length, self.size - HEADER.size)]
            if struct.unpack_from("=Q", self.mem, 0)[0] == gen:
                return data
        raise TimeoutError("shared block: the writer never finished")

    def write_json(self, value):
        self.write(json.dumps(value, separators=(",", ":")).encode())

    def read_json(self):
        data = self.read()
        return json.loads(data) if data else {}

    def close(self):
        self.mem.close()
