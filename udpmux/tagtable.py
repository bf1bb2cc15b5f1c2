"""Flow tag tables: one per tunnel, in memory the master shares with the tunnel's worker.

A worker keeps one flow per outside client address and gives each flow a tag that both
agents use on the carrier.  The table must outlive the worker (the master respawns a dead
worker, which re-attaches and finds every flow with its tag) and must be readable by
`udpmux status` in the master while the worker runs.  So:

* the master maps the table (an anonymous MAP_SHARED mmap) in __init__, before it forks:
  no name, nothing in /dev/shm, no resource tracker; every child shares the same pages;
* exactly one process writes it (the tunnel's worker, after attach()); any number read it;
* the shared memory is an open-addressing hash table (linear probing, backward-shift
  deletion, no tombstones) keyed by xxh3_64 of the peer key, seeded with a secret the
  master draws when it makes the table (os.urandom, kept in the header), so that nobody
  outside can pick client addresses that share a home cell and stretch one probe chain
  over the whole table; every cell has a generation counter used as a seqlock, so a
  reader never sees a torn cell;
* memory grows with the flows in use, not with capacity: the pages of the shared array
  are only made resident when touched (anonymous MAP_SHARED), and nobody touches a cell
  the writer never used.  A map of used blocks (one byte per BLOCK_CELLS cells, set by
  the writer before its first write to a cell of the block, never cleared) tells
  attach(), snapshot() and lookup() which blocks can hold a flow; every other block is
  empty and is skipped unread;
* the writer's per-datagram work stays inside its process: dicts key->slot and tag->slot, an
  OrderedDict for exact LRU order, counters in lists indexed by slot.  Those lists grow
  with the flows: a slot comes from a free list of slots given back, else past the
  high-water mark (the lists grow by one), so they hold as many entries as the most flows
  live at once since attach(), never capacity.  Where flows lie in the cells is a dict
  cell->slot of the occupied cells; a cell's gen is read from the cell itself (the writer
  is its only writer).  Nothing the writer keeps is sized by capacity or ncells.  sync()
  copies dirty counters to the shared cells (the worker calls it about once a second and
  at exit).  insert() and remove() write the shared cells and the header at once, so a
  crash loses at most the counters since the last sync(), never a key->tag mapping.

How we name things:
  peer key  raw struct sockaddr bytes (see addr.py): 16 bytes IPv4, 28 IPv6; the table key
  flow      one peer key with its tag, times and counters
  tag       the 32-bit flow number carried on the wire; never 0, unique among live flows
  slot      the writer's handle for a live flow: an int from 0 to capacity-1, stable while
            the flow lives and reused after it goes.  A new flow takes a slot given back
            if there is one, else the next past the highest so far, so every slot is
            below the most flows live at once since attach().  It is not a place in
            shared memory.
  cell      one record of the shared array.  Backward-shift deletion moves flows between
            cells, never between slots, so a slot the caller keeps stays right.
  seed      the table's secret hash seed: 64 random bits drawn by __init__, in the header
  home      the cell a key hashes to: xxh3_64(key, seed=seed) & (ncells - 1)
  probe     how far a flow's cell lies past its home: (cell - home) & (ncells - 1);
            probe_max, the longest among live flows, is in the header
  gen       a cell's (or the header's) seqlock: odd while the writer is changing it
  check     low 32 bits of xxh3_64(key, seed=tag): lets attach() tell a whole cell from
            one a crashed writer left half written
  capacity  the bound on live flows: insert() at capacity evicts the least recently used
  ncells    cells in the array: a power of two, so that capacity <= ncells * MAX_LOAD
  block     BLOCK_CELLS consecutive cells (cell >> BLOCK_SHIFT); "used" once the writer has
            written any of its cells, so that readers leave the others alone
  in, out   "in" is from the outside client, "out" is towards it
  dirty     a slot whose last-seen time or counters changed since the last sync()
  retired   counters of flows already removed, kept in the header for all-time totals

Layout: little-endian, offsets in bytes, K = key_size (28 by default: addr.SOCKADDR_MAX).
Gen words are written and read as whole aligned 64-bit words (a memoryview cast to "Q").

  header, HEADER_SIZE = 128 bytes
   off size field
  +---+----+--------------+-----------------------------------------------+
  |  0|   8| magic        | b"UDPMUXTT"                                   | HEAD_FIXED,
  |  8|   2| version      | 3 (2 had no used map, readers read every      | written once
  |   |    |              | cell; 1 had no seed: homes were unseeded)     | by __init__
  | 10|   2| key_size     | K                                             |
  | 12|   4| cell_size    | CELL_SIZE                                     |
  | 16|   4| capacity     | the bound on live flows                       |
  | 20|   4| ncells       | a power of two                                |
  +---+----+--------------+-----------------------------------------------+
  | 24|   8| gen          | seqlock over HEAD_STATE                       |
  +---+----+--------------+-----------------------------------------------+
  | 32|   4| count        | live flows                                    | HEAD_STATE,
  | 36|   4| next_tag     | where the next tag search starts              | written by
  | 40|   4| writer_pid   | the attached worker; 0 until one attaches     | insert(),
  | 44|   4| attaches     | 1 = first worker, 2 = respawned once, ...     | remove(),
  | 48|   8| evictions    | flows evicted at capacity                     | expire(),
  | 56|   8| expired      | flows removed by expire()                     | attach()
  | 64|  32| retired      | pkts_in, bytes_in, pkts_out, bytes_out (u64)  |
  | 96|   4| probe_max    | the longest probe of a live flow, in cells    |
  +---+----+--------------+-----------------------------------------------+
  |100|   4| (reserved)   | zero                                          |
  +---+----+--------------+-----------------------------------------------+
  |104|   8| seed         | the home hash's seed (u64), from os.urandom   | HEAD_SEED,
  |   |    |              | in the master; attach() refuses another one   | written once
  |   |    |              |                                               | by __init__
  +---+----+--------------+-----------------------------------------------+
  |112|  16| (reserved)   | zero                                          |
  +---+----+--------------+-----------------------------------------------+

  cell i, at HEADER_SIZE + i * CELL_SIZE; CELL_SIZE = 65 + K rounded up to 8 (96 for K = 28)
   off size field
  +---+----+--------------+-----------------------------------------------+
  |  0|   8| gen          | seqlock over the rest of the cell             |
  +---+----+--------------+-----------------------------------------------+
  |  8|   4| tag          |                                               | CELL_BODY
  | 12|   4| check        | low 32 bits of xxh3_64(key, seed=tag)         | (8 .. 64+K)
  | 16|   8| created      | f64, time.monotonic() seconds                 |
  | 24|   8| last_seen    | f64                  -+                       |
  | 32|   8| pkts_in      | u64                   | CELL_COUNTERS         |
  | 40|   8| bytes_in     | u64                   | (24 .. 63):           |
  | 48|   8| pkts_out     | u64                   | what sync() writes    |
  | 56|   8| bytes_out    | u64                  -+                       |
  | 64|   1| keylen       | 0: the cell is empty                          |
  | 65|   K| key          | zero-padded                                   |
  +---+----+--------------+-----------------------------------------------+

  used map, at used_offset = HEADER_SIZE + ncells * CELL_SIZE (after the last cell)
   off size field
  +---+----+--------------+-----------------------------------------------+
  |  b|   1| used         | block b: 0 = none of its cells was ever       | set to 1 by
  |   |    |              | written (all empty, their pages perhaps never | the writer
  |   |    |              | resident), 1 = used; b < nblocks =            | before it
  |   |    |              | ceil(ncells / BLOCK_CELLS)                    | writes a cell
  |   |    |              |                                               | of block b;
  |   |    |              |                                               | never cleared
  +---+----+--------------+-----------------------------------------------+

Seqlock: the writer sets gen odd, writes, sets gen even (one higher).  A reader reads gen,
retries while it is odd, reads the cell, reads gen again and retries if it changed.  A reader
gives up on a cell after READ_TRIES (a writer killed mid-write leaves it odd until the next
attach()) and counts it in scan_busy.  A move (backward shift) copies a flow into an earlier
cell before the later one is overwritten or cleared, so a scan during a move may see a flow
twice (snapshot() keeps one) or miss it once; it never sees a torn cell.  A scan reads the
used map first: a flow written meanwhile to a block used for the first time is missed by
that scan, like one written to a cell the scan had passed.  The writer marks a block used
before it makes any of its gens odd, so a half-written cell always lies in a used block.

Crash repair (attach): a cell whose check fails, or whose gen is odd with keylen 0, was half
written (an insert, a move target or a clear) and is deleted with the same backward shift;
of two cells holding one key (a move cut short) one is kept; count is recounted.  At every
step of insert() and remove() the cells satisfy the probe invariant, counting a half-written
cell as occupied, so this repair is sound.  A half-written cell that reads as empty is
occupied too: struct's pack_into() zeroes the whole body before it writes the fields in
order, so a move target cut short may hold the moved flow's tag and keylen 0, with that flow
still whole in a later cell of the cluster, which only the backward shift brings back.
"""

import mmap
import os
import struct
import time
from collections import OrderedDict, namedtuple

import xxhash

MAGIC = b"UDPMUXTT"
VERSION = 3

KEY_SIZE_DEFAULT = 28           # addr.SOCKADDR_MAX: an IPv6 peer key
KEY_SIZE_MAX = 255              # keylen is one byte
CAPACITY_DEFAULT = 1024
CAPACITY_MAX = 1 << 24          # 16 Mi flows: 3 GiB of cells; far past any sane setting
MAX_LOAD = (3, 4)               # at most 3/4 of the cells hold a flow: probes stay short
TAG_MIN = 1
TAG_MAX = 0xFFFFFFFF
CHECK_MASK = 0xFFFFFFFF

BLOCK_SHIFT = 5                 # a block of the used map is 32 cells (3 KiB for K = 28)
BLOCK_CELLS = 1 << BLOCK_SHIFT

READ_TRIES = 1000               # a reader's attempts at one cell before it counts it busy
SPIN_TRIES = 8                  # attempts before each further retry yields the CPU

HEADER_SIZE = 128
HEAD_FIXED = struct.Struct("<8sHHIII")  # magic, version, key_size, cell_size, capacity, ncells
HEAD_GEN_OFFSET = 24
HEAD_STATE_OFFSET = 32
# count, next_tag, writer_pid, attaches, evictions, expired, retired pkts/bytes in/out,
# probe_max
HEAD_STATE = struct.Struct("<IIIIQQQQQQI")
HEAD_SEED_OFFSET = 104
HEAD_SEED = struct.Struct("<Q")

CELL_BODY_OFFSET = 8
CELL_COUNTERS_OFFSET = 24
CELL_KEY_OFFSET = 65
CELL_COUNTERS = struct.Struct("<dQQQQ")  # last_seen, pkts_in, bytes_in, pkts_out, bytes_out

GARBAGE = -1                    # _at[cell]: a half-written cell that attach() will delete

Flow = namedtuple("Flow", "key tag created last_seen pkts_in bytes_in pkts_out bytes_out")

_hash = xxhash.xxh3_64_intdigest
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def cell_body(key_size):
    """The Struct of a cell from CELL_BODY_OFFSET: tag, check, created, the counters, key."""
    return struct.Struct(f"<IIddQQQQB{key_size}s")


def cell_size(key_size):
    return (CELL_KEY_OFFSET + key_size + 7) & ~7


def check_of(key, tag):
    return _hash(key, seed=tag) & CHECK_MASK


class TagTable:
    """One tunnel's flows.  Made by the master before it forks; written by one worker.

    Writer side (after attach()): get, slot_of_tag, insert, touch, remove, expire, sync,
    key_of, tag_of, flow, lru_keys, len.  Reader side (any process, any time): snapshot,
    lookup, summary, probe_max, home.  Writer methods are not safe from two processes at once.
    """

    def __init__(self, capacity=CAPACITY_DEFAULT, key_size=KEY_SIZE_DEFAULT, seed=None):
        """In the master, before fork: maps the shared memory; no other I/O.

        seed is the home hash's seed; None (always, outside tests) draws a secret one.
        """
        if type(capacity) is not int or not 1 <= capacity <= CAPACITY_MAX:
            raise ValueError(f"tag table capacity must be from 1 to {CAPACITY_MAX}")
        if type(key_size) is not int or not 1 <= key_size <= KEY_SIZE_MAX:
            raise ValueError(f"tag table key size must be from 1 to {KEY_SIZE_MAX}")
        ncells = 2
        while ncells * MAX_LOAD[0] < capacity * MAX_LOAD[1]:
            ncells <<= 1
        self.capacity = capacity
        self.key_size = key_size
        self.ncells = ncells
        self.mask = ncells - 1
        self.cell_size = cell_size(key_size)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        elif type(seed) is not int or not 0 <= seed < 1 << 64:
            raise ValueError("tag table seed must be a 64-bit unsigned int")
        self.seed = seed
        self._body = cell_body(key_size)
        self._zeros = bytes(self.cell_size - CELL_BODY_OFFSET)
        self.nblocks = -(-ncells // BLOCK_CELLS)
        self.used_offset = HEADER_SIZE + ncells * self.cell_size
        size = self.used_offset + self.nblocks
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        # Zero-filled by the kernel, page by page as each is first touched: nothing here
        # may write or read the cells (the header and the used map are all it touches).
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._mm)
        self._words = self._view.cast("Q")
        self._used = self._view[self.used_offset:self.used_offset + self.nblocks]
        HEAD_FIXED.pack_into(self._mm, 0, MAGIC, VERSION, key_size, self.cell_size,
                             capacity, ncells)
        HEAD_STATE.pack_into(self._mm, HEAD_STATE_OFFSET, 0, TAG_MIN, 0, 0, 0, 0, 0, 0, 0, 0,
                             0)
        HEAD_SEED.pack_into(self._mm, HEAD_SEED_OFFSET, seed)
        self._attached = False
        self.scan_busy = 0      # cells the last snapshot() gave up on (writer mid-write or dead)
        self.scan_bad = 0       # cells whose check failed under a stable gen (never expected)

    @property
    def size(self):
        """Bytes of shared memory mapped: fixed at construction (resident: as used)."""
        return len(self._mm)

    def close(self):
        """Unmap (in this process only)."""
        self._used.release()
        self._words.release()
        self._view.release()
        self._mm.close()

    # ---------------------------------------------------------------- writer side

    def attach(self):
        """Become the writer: rebuild this process's indexes from the shared cells.

        A respawned worker calls this and finds every flow with its tag and its counters as
        of the dead worker's last sync().  Cells a crash left half written are repaired.
        Anything this process had not synced is discarded.  Reads only the used blocks:
        a table that never held a flow costs its header and used map, whatever its size.
        """
        mm, words, K = self._mm, self._words, self.key_size
        fixed = HEAD_FIXED.unpack_from(mm, 0)
        seed, = HEAD_SEED.unpack_from(mm, HEAD_SEED_OFFSET)
        if fixed != (MAGIC, VERSION, K, self.cell_size, self.capacity, self.ncells) \
                or seed != self.seed:
            raise RuntimeError("tag table header is damaged: the shared memory was overwritten")
        mask = self.mask
        (_count, next_tag, _pid, attaches, self._evictions, self._expired,
         self._rpin, self._rbin, self._rpout, self._rbout, _probe_max) = \
            HEAD_STATE.unpack_from(mm, HEAD_STATE_OFFSET)
        hgen = words[HEAD_GEN_OFFSET >> 3]
        self._hgen = hgen + (hgen & 1)
        self._next_tag = next_tag or TAG_MIN
        self._attaches = attaches + 1

        self._index = {}            # key -> slot
        self._tags = {}             # tag -> slot
        self._lru = OrderedDict()   # slot -> None, least recently used first
        self._dirty = set()
        self._free = []             # slots given back, below the high-water mark
        # Per slot, as many as the most flows live at once (see _new_slot()).
        self._key = []              # None: a free slot
        self._tag = []
        self._pos = []              # the slot's cell
        self._home = []             # the cell its key hashes to
        self._created = []
        self._seen = []
        self._pin = []
        self._bin = []
        self._pout = []
        self._bout = []
        self._at = {}               # cell -> its slot, or GARBAGE; no entry: empty
        self._probes = []           # [d]: live flows d cells past their home; no trailing 0

        kept = {}                   # key -> the cell's fields
        owner = {}                  # tag -> key
        garbage, unsettled = [], []
        for pos in self._used_cells():
            off = HEADER_SIZE + pos * self.cell_size
            gen = words[off >> 3]
            fields = self._body.unpack_from(mm, off + CELL_BODY_OFFSET)
            tag, check, keylen, key = fields[0], fields[1], fields[8], fields[9]
            if keylen == 0:
                if gen & 1:
                    garbage.append(pos)     # half written: see "Crash repair" above
                continue
            key = key[:keylen]
            if keylen > K or tag == 0 or check != check_of(key, tag):
                garbage.append(pos)
                continue
            if gen & 1:
                unsettled.append(pos)
            other = kept.get(key)
            if other is None and tag not in owner:
                kept[key] = (pos,) + fields
                owner[tag] = key
            elif other is not None and other[1] == tag and fields[3] > other[4]:
                garbage.append(other[0])   # a move cut short: keep the fresher copy
                kept[key] = (pos,) + fields
            else:
                garbage.append(pos)

        # Slots in LRU order: least recently seen (as of the last sync) first.
        order = sorted(kept.values(), key=lambda f: (f[4], f[3], f[0]))
        for pos, tag, _check, created, seen, pin, bin_, pout, bout, keylen, key in order:
            key = key[:keylen]
            slot = self._new_slot()
            self._key[slot], self._tag[slot] = key, tag
            self._pos[slot], self._created[slot], self._seen[slot] = pos, created, seen
            self._pin[slot], self._bin[slot] = pin, bin_
            self._pout[slot], self._bout[slot] = pout, bout
            self._at[pos] = slot
            self._home[slot] = home = _hash(key, seed) & mask
            self._count_probe((pos - home) & mask)
            self._index[key] = slot
            self._tags[tag] = slot
            self._lru[slot] = None

        for pos in unsettled:
            if pos in self._at:
                self._write_cell(pos, self._at[pos])
        for pos in garbage:
            self._at[pos] = GARBAGE     # its home is itself: never moved by a backward shift
        for pos in garbage:
            self._delete_at(pos)

        self._pid = os.getpid()
        self._write_header()
        self._attached = True
        # The hot path: bound dict methods and the per-slot lists themselves, read
        # without a Python frame (key_of(slot) is keys[slot], tag_of(slot) tags[slot]).
        # The lists only ever grow in place, so these stay the writer's own.
        self.get = self._index.get
        self.slot_of_tag = self._tags.get
        self.keys = self._key
        self.tags = self._tag

    def _new_slot(self):
        """A slot past the high-water mark: every per-slot list grows by one."""
        slot = len(self._key)
        self._key.append(None)
        self._tag.append(0)
        self._pos.append(0)
        self._home.append(0)
        self._created.append(0.0)
        self._seen.append(0.0)
        self._pin.append(0)
        self._bin.append(0)
        self._pout.append(0)
        self._bout.append(0)
        return slot

    def _need_writer(self):
        if not self._attached:
            raise RuntimeError("tag table: call attach() in the writing process first")

    def get(self, key):
        """The slot of key's flow, or None.  After attach() this is the dict's own get()."""
        self._need_writer()

    def slot_of_tag(self, tag):
        """The slot of the flow with this tag, or None.  After attach(): the dict's get()."""
        self._need_writer()

    def insert(self, key, now, tag=None):
        """Add a flow for key, seen at now: returns (slot, tag, evicted).

        The tag is the header's next tag (32-bit, never 0, skipping tags in use) unless one
        is given.  At capacity the least recently used flow is removed first and returned
        as evicted=(key, tag); otherwise evicted is None.  ValueError (a programming error)
        for a key that is empty, longer than key_size or already present, and for a given
        tag that is 0, too large or in use: check with get() and slot_of_tag() first.
        """
        self._need_writer()
        if not isinstance(key, bytes):
            raise TypeError(f"tag table keys are bytes, not {type(key).__name__}")
        if not 0 < len(key) <= self.key_size:
            raise ValueError(f"tag table key of {len(key)} bytes: expected 1 to {self.key_size}")
        if key in self._index:
            raise ValueError(f"tag table already holds key {key.hex()}")
        if tag is not None:
            if type(tag) is not int or not TAG_MIN <= tag <= TAG_MAX:
                raise ValueError(f"tag {tag!r}: expected {TAG_MIN} to {TAG_MAX}")
            if tag in self._tags:
                raise ValueError(f"tag {tag} is in use")
        evicted = None
        if len(self._index) >= self.capacity:
            evicted = self._drop(next(iter(self._lru)))
            self._evictions += 1
        if tag is None:
            tag = self._allocate_tag()
        slot = self._free.pop() if self._free else self._new_slot()
        mask, at = self.mask, self._at
        home = pos = _hash(key, self.seed) & mask
        for _ in range(self.ncells):
            if pos not in at:
                break
            pos = (pos + 1) & mask
        else:
            raise RuntimeError("tag table has no empty cell: its indexes are corrupt")
        self._key[slot], self._tag[slot] = key, tag
        self._pos[slot] = pos
        self._home[slot] = home
        self._created[slot] = self._seen[slot] = now
        self._pin[slot] = self._bin[slot] = self._pout[slot] = self._bout[slot] = 0
        at[pos] = slot
        self._count_probe((pos - home) & mask)
        self._write_cell(pos, slot)
        self._index[key] = slot
        self._tags[tag] = slot
        self._lru[slot] = None
        self._write_header()
        return slot, tag, evicted

    def touch(self, slot, now, nbytes, outward=False):
        """A datagram of nbytes on this flow at now: last-seen, counters, LRU order."""
        self._lru.move_to_end(slot)     # first: KeyError on a slot that holds no flow
        self._seen[slot] = now
        if outward:
            self._pout[slot] += 1
            self._bout[slot] += nbytes
        else:
            self._pin[slot] += 1
            self._bin[slot] += nbytes
        self._dirty.add(slot)

    def remove(self, slot):
        """Remove the flow in slot; returns its (key, tag)."""
        self._need_writer()
        if not 0 <= slot < len(self._key) or self._key[slot] is None:
            raise ValueError(f"tag table slot {slot} holds no flow")
        gone = self._drop(slot)
        self._write_header()
        return gone

    def expire(self, now, idle):
        """Remove the flows not seen for more than idle seconds, oldest first.

        Returns [(key, tag), ...].  Walks the LRU order, so it costs O(flows expired) as
        long as callers pass times that do not go backwards.
        """
        self._need_writer()
        gone = []
        lru, seen = self._lru, self._seen
        while lru:
            slot = next(iter(lru))
            if now - seen[slot] <= idle:
                break
            gone.append(self._drop(slot))
        if gone:
            self._expired += len(gone)
            self._write_header()
        return gone

    def sync(self):
        """Write dirty last-seen times and counters to the shared cells; returns how many."""
        self._need_writer()
        dirty = self._dirty
        if not dirty:
            return 0
        mm, words, pos_of = self._mm, self._words, self._pos
        pack, size = CELL_COUNTERS.pack_into, self.cell_size
        seen, pin, bin_, pout, bout = self._seen, self._pin, self._bin, self._pout, self._bout
        for slot in dirty:
            off = HEADER_SIZE + pos_of[slot] * size
            word = off >> 3
            gen = words[word]
            gen += (gen & 1) + 1        # odd, one past the even gen the cell was left at
            words[word] = gen
            pack(mm, off + CELL_COUNTERS_OFFSET, seen[slot], pin[slot], bin_[slot],
                 pout[slot], bout[slot])
            words[word] = gen + 1
        count = len(dirty)
        dirty.clear()
        return count

    def key_of(self, slot):
        return self._key[slot]

    def tag_of(self, slot):
        return self._tag[slot]

    def flow(self, slot):
        """The flow in slot as this process knows it (counters exact, not as of sync)."""
        return Flow(self._key[slot], self._tag[slot], self._created[slot], self._seen[slot],
                    self._pin[slot], self._bin[slot], self._pout[slot], self._bout[slot])

    def lru_keys(self):
        """Keys, least recently used (the next to be evicted) first."""
        return [self._key[slot] for slot in self._lru]

    def __len__(self):
        """Live flows: exact in the writer, the header's count elsewhere."""
        if self._attached:
            return len(self._index)
        return self._read_header()[0]

    def _count_probe(self, probe, n=1):
        """One more (n=-1: one fewer) live flow probe cells past its home."""
        probes = self._probes
        if n > 0:
            while len(probes) <= probe:
                probes.append(0)
            probes[probe] += 1
        else:
            probes[probe] -= 1
            while probes and not probes[-1]:
                probes.pop()

    def _allocate_tag(self):
        tag, tags = self._next_tag, self._tags
        while tag in tags:
            tag = tag + 1 if tag < TAG_MAX else TAG_MIN
        self._next_tag = tag + 1 if tag < TAG_MAX else TAG_MIN
        return tag

    def _drop(self, slot):
        """Remove a flow from the cells and the indexes; the caller writes the header."""
        key, tag = self._key[slot], self._tag[slot]
        self._delete_at(self._pos[slot])
        del self._index[key]
        del self._tags[tag]
        del self._lru[slot]
        self._dirty.discard(slot)
        self._rpin += self._pin[slot]
        self._rbin += self._bin[slot]
        self._rpout += self._pout[slot]
        self._rbout += self._bout[slot]
        self._key[slot] = None
        self._free.append(slot)
        return key, tag

    def _delete_at(self, hole):
        """Empty cell hole, shifting later flows of its cluster back (no tombstones).

        Each moved flow is written to its new cell before its old cell is reused or
        cleared, so the cells satisfy the probe invariant after every single write.
        A GARBAGE cell counts as occupied and stays where it is (its home is itself).
        """
        mask, at, home_of, pos_of = self.mask, self._at, self._home, self._pos
        slot = at[hole]
        if slot >= 0:
            self._count_probe((hole - home_of[slot]) & mask, -1)
        cell = hole
        for _ in range(self.ncells):
            cell = (cell + 1) & mask
            slot = at.get(cell)
            if slot is None:
                break
            if slot < 0:
                continue
            # Move it back unless its home lies cyclically in (hole, cell].
            probe = (cell - home_of[slot]) & mask
            if probe >= (cell - hole) & mask:
                at[hole] = slot
                pos_of[slot] = hole
                self._write_cell(hole, slot)
                self._dirty.discard(slot)
                self._count_probe(probe, -1)
                self._count_probe((hole - home_of[slot]) & mask)
                hole = cell
        else:
            raise RuntimeError("tag table has no empty cell: its indexes are corrupt")
        self._clear_cell(hole)
        del at[hole]

    def _write_cell(self, pos, slot):
        """Write slot's flow whole to cell pos, marking its block used first."""
        used, block = self._used, pos >> BLOCK_SHIFT
        if not used[block]:
            used[block] = 1
        off = HEADER_SIZE + pos * self.cell_size
        words, word = self._words, off >> 3
        gen = words[word]
        gen += (gen & 1) + 1
        words[word] = gen
        key, tag = self._key[slot], self._tag[slot]
        self._body.pack_into(self._mm, off + CELL_BODY_OFFSET, tag, check_of(key, tag),
                             self._created[slot], self._seen[slot],
                             self._pin[slot], self._bin[slot], self._pout[slot],
                             self._bout[slot], len(key), key)
        words[word] = gen + 1

    def _clear_cell(self, pos):
        """Empty cell pos: one that held something, so its block is used already."""
        off = HEADER_SIZE + pos * self.cell_size
        words, word = self._words, off >> 3
        gen = words[word]
        gen += (gen & 1) + 1
        words[word] = gen
        self._mm[off + CELL_BODY_OFFSET:off + self.cell_size] = self._zeros
        words[word] = gen + 1

    def _write_header(self):
        gen = self._hgen + 1
        words = self._words
        words[HEAD_GEN_OFFSET >> 3] = gen
        HEAD_STATE.pack_into(self._mm, HEAD_STATE_OFFSET, len(self._index), self._next_tag,
                             self._pid, self._attaches, self._evictions, self._expired,
                             self._rpin, self._rbin, self._rpout, self._rbout,
                             len(self._probes) - 1 if self._probes else 0)
        words[HEAD_GEN_OFFSET >> 3] = gen + 1
        self._hgen = gen + 1

    # ---------------------------------------------------------------- reader side

    def _used_cells(self):
        """The cells of the used blocks, in order, from one read of the used map.  Every
        other cell is empty and was never written (its page may not be resident)."""
        used, ncells = bytes(self._used), self.ncells
        block = used.find(1)
        while block >= 0:
            first = block << BLOCK_SHIFT
            yield from range(first, min(first + BLOCK_CELLS, ncells))
            block = used.find(1, block + 1)

    def _read_cell(self, pos):
        """A cell's CELL_BODY fields under its seqlock, or None if it never settled."""
        off = HEADER_SIZE + pos * self.cell_size
        word, words = off >> 3, self._words
        unpack, mm = self._body.unpack_from, self._mm
        for attempt in range(READ_TRIES):
            gen = words[word]
            if not gen & 1:
                fields = unpack(mm, off + CELL_BODY_OFFSET)
                if words[word] == gen:
                    return fields
            if attempt >= SPIN_TRIES:
                _yield()
        return None

    def _read_header(self):
        """HEAD_STATE fields under the header's seqlock (the last read if it never settles)."""
        words, word = self._words, HEAD_GEN_OFFSET >> 3
        for attempt in range(READ_TRIES):
            gen = words[word]
            state = HEAD_STATE.unpack_from(self._mm, HEAD_STATE_OFFSET)
            if not gen & 1 and words[word] == gen:
                break
            if attempt >= SPIN_TRIES:
                _yield()
        return state

    def _flow_of(self, fields):
        """Flow from a cell's fields; None if empty; False if its check fails."""
        tag, check, created, seen, pin, bin_, pout, bout, keylen, key = fields
        if keylen == 0:
            return None
        key = key[:keylen]
        if keylen > self.key_size or tag == 0 or check != check_of(key, tag):
            return False
        return Flow(key, tag, created, seen, pin, bin_, pout, bout)

    def snapshot(self):
        """Every flow, each read consistently (seqlock), counters as of the last sync().

        In cell order, one Flow per key.  A flow moved during the scan may be missed;
        cells that never settled are skipped and counted in scan_busy.  Reads only the
        used blocks.
        """
        flows = {}
        busy = bad = 0
        for pos in self._used_cells():
            fields = self._read_cell(pos)
            if fields is None:
                busy += 1
                continue
            flow = self._flow_of(fields)
            if flow:
                flows[flow.key] = flow
            elif flow is False:
                bad += 1
        self.scan_busy, self.scan_bad = busy, bad
        return list(flows.values())

    def lookup(self, key):
        """One flow by key, probing from its home cell like the table does; or None."""
        if not 0 < len(key) <= self.key_size:
            raise ValueError(f"tag table key of {len(key)} bytes: expected 1 to {self.key_size}")
        pos, used = self.home(key), self._used
        for _ in range(self.ncells):
            if not used[pos >> BLOCK_SHIFT]:
                return None             # a block never written: this cell is empty
            fields = self._read_cell(pos)
            if fields is not None:
                if fields[8] == 0:
                    return None
                flow = self._flow_of(fields)
                if flow and flow.key == key:
                    return flow
            pos = (pos + 1) & self.mask
        return None

    def home(self, key):
        """The cell key hashes to, where its probe starts."""
        return _hash(key, self.seed) & self.mask

    def probe_max(self):
        """The longest probe among live flows, in cells past the home (the header's)."""
        return self._read_header()[10]

    def summary(self):
        """The header and totals, for `udpmux status`.

        totals = counters of live flows (as of the last sync) + retired ones.
        """
        (count, next_tag, pid, attaches, evictions, expired,
         rpin, rbin, rpout, rbout, probe_max) = self._read_header()
        flows = self.snapshot()
        live = {"flows": len(flows),
                "pkts_in": sum(f.pkts_in for f in flows),
                "bytes_in": sum(f.bytes_in for f in flows),
                "pkts_out": sum(f.pkts_out for f in flows),
                "bytes_out": sum(f.bytes_out for f in flows)}
        return {
            "count": count, "capacity": self.capacity, "cells": self.ncells,
            "key_size": self.key_size, "bytes": self.size, "next_tag": next_tag,
            "writer_pid": pid, "attaches": attaches,
            "evictions": evictions, "expired": expired, "probe_max": probe_max,
            "live": live,
            "totals": {"pkts_in": live["pkts_in"] + rpin, "bytes_in": live["bytes_in"] + rbin,
                       "pkts_out": live["pkts_out"] + rpout,
                       "bytes_out": live["bytes_out"] + rbout},
            "busy": self.scan_busy, "bad": self.scan_bad,
        }


def _bench():
    """python3 -m udpmux.tagtable: what each call costs, in ns."""
    import timeit
    table = TagTable(1024)
    table.attach()
    keys = [os.urandom(16) for _ in range(1025)]
    slots = [table.insert(key, 0.0)[0] for key in keys[:1000]]
    env = {"table": table, "slot": slots[500], "key": keys[500], "miss": keys[1000],
           "spare": keys[1024]}
    cases = [("touch", "table.touch(slot, 1.5, 1200)", 1_000_000),
             ("touch outward", "table.touch(slot, 1.5, 1200, True)", 1_000_000),
             ("get, hit", "table.get(key)", 1_000_000),
             ("get, miss", "table.get(miss)", 1_000_000),
             ("insert + remove", "table.remove(table.insert(spare, 1.0)[0])", 100_000),
             ("snapshot, 1000 flows", "table.snapshot()", 20)]
    for name, stmt, number in cases:
        best = min(timeit.repeat(stmt, globals=env, number=number, repeat=5)) / number
        print(f"{name:24} {best * 1e9:12.0f}")
    best = float("inf")
    for _ in range(5):
        for slot in slots:
            table.touch(slot, 2.0, 100)
        start = time.perf_counter()
        table.sync()
        best = min(best, (time.perf_counter() - start) / len(slots))
    print(f"{'sync, per dirty flow':24} {best * 1e9:12.0f}")


if __name__ == "__main__":
    _bench()
