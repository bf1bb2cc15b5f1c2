"""The shared tag table: a dict model, real forks, a reader racing a writer, crash repair."""

import ctypes
import json
import mmap
import os
import random
import signal
import socket
import struct
import sys
import time
import traceback
import tracemalloc

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from udpmux import tagtable
from udpmux.addr import peer_key
from udpmux.tagtable import TAG_MAX, Flow, TagTable

# ------------------------------------------------------------------ helpers


def fork(child):
    """Run child() in a forked process; its exit status is child()'s return value (or 0).

    The child leaves through os._exit in a finally, whatever happens (status 99 on an
    exception, with the traceback on stderr).
    """
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            status = child() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    return pid


def wait(pid):
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def raw_cells(table):
    """(pos, gen, key, tag) of every occupied cell, read directly (no writer running)."""
    cells = []
    for pos in range(table.ncells):
        off = tagtable.HEADER_SIZE + pos * table.cell_size
        gen = table._words[off >> 3]
        fields = table._body.unpack_from(table._mm, off + tagtable.CELL_BODY_OFFSET)
        if fields[8]:
            cells.append((pos, gen, fields[9][:fields[8]], fields[0]))
    return cells


def all_gens_even(table):
    return all(table._words[(tagtable.HEADER_SIZE + pos * table.cell_size) >> 3] % 2 == 0
               for pos in range(table.ncells))


def keys_with_home(table, home, count, width=4):
    """count distinct keys that all hash to cell home."""
    found = []
    for i in range(1_000_000):
        key = i.to_bytes(width, "little")
        if table.home(key) == home:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("no colliding keys found")


def longest_probe(table):
    """The longest probe of the flows in the cells, counted from scratch."""
    return max(((pos - table.home(key)) & table.mask for pos, _gen, key, _tag
                in raw_cells(table)), default=0)


def loopback_keys_with_unseeded_home(ncells, home, count):
    """Peer keys of 127.a.b.c:5566 whose unseeded xxh3_64 lands on home: what an attacker
    who knows the table's size but not its seed would send from."""
    found = []
    for n in range(1 << 24):
        key = peer_key(socket.AF_INET, (f"127.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 5566))
        if tagtable._hash(key) & (ncells - 1) == home:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("no colliding keys found")


def tagged_key(tag):
    """A 16-byte key that names its tag, so a reader can check key and tag belong together."""
    return struct.pack("<I", tag) * 4


def resident_pages(table):
    """Pages of the table's shared memory resident now, by mincore(2); None without it."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    vec = ctypes.create_string_buffer(table.size // mmap.PAGESIZE)
    anchor = ctypes.c_char.from_buffer(table._mm)
    try:
        if libc.mincore(ctypes.addressof(anchor), table.size, vec) != 0:
            return None
    finally:
        del anchor
    return sum(b & 1 for b in vec.raw)


def overhead_pages(table):
    """The pages the header and the used map lie in: resident in any table."""
    first = table.used_offset // mmap.PAGESIZE
    last = (table.used_offset + table.nblocks - 1) // mmap.PAGESIZE
    return 1 + last - first + 1


# ------------------------------------------------------------------ basics


def test_fresh_table_reads_empty_and_refuses_writes_before_attach():
    table = TagTable(8)
    assert table.snapshot() == []
    assert len(table) == 0
    summary = table.summary()
    assert (summary["count"], summary["capacity"], summary["next_tag"]) == (0, 8, 1)
    assert summary["writer_pid"] == 0 and summary["attaches"] == 0
    for call in (lambda: table.get(b"k"), lambda: table.slot_of_tag(1),
                 lambda: table.insert(b"k", 0.0), lambda: table.remove(0),
                 lambda: table.expire(0.0, 1.0), table.sync):
        with pytest.raises(RuntimeError):
            call()


def test_memory_is_anonymous_and_sized_by_capacity():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    table = TagTable(1024)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after == before
    assert table.ncells == 2048 and table.cell_size == 96
    assert table.used_offset == tagtable.HEADER_SIZE + 2048 * 96 and table.nblocks == 64
    pages = -(-(tagtable.HEADER_SIZE + 2048 * 96 + 64) // mmap.PAGESIZE)
    assert table.size == pages * mmap.PAGESIZE
    for capacity in (1, 2, 3, 5, 6, 7, 100, 1000):   # fewest cells with load <= 3/4
        ncells = TagTable(capacity).ncells
        assert ncells & (ncells - 1) == 0 and capacity * 4 <= ncells * 3
        assert ncells == 2 or capacity * 4 > ncells // 2 * 3
    table.close()
    assert table._mm.closed


@pytest.mark.parametrize("capacity, key_size", [(0, 28), (-1, 28), (1.5, 28), (True, 28),
                                                (tagtable.CAPACITY_MAX + 1, 28), (8, 0),
                                                (8, 256)])
def test_bad_geometry_is_refused(capacity, key_size):
    with pytest.raises(ValueError):
        TagTable(capacity, key_size)


def test_insert_get_touch_remove():
    table = TagTable(8)
    table.attach()
    key = bytes(range(16))
    slot, tag, evicted = table.insert(key, 10.0)
    assert (tag, evicted) == (1, None)
    assert table.get(key) == slot and table.slot_of_tag(tag) == slot
    assert table.key_of(slot) == key and table.tag_of(slot) == tag
    table.touch(slot, 11.0, 100)
    table.touch(slot, 12.0, 300, outward=True)
    assert table.flow(slot) == Flow(key, 1, 10.0, 12.0, 1, 100, 1, 300)
    # Not synced yet: the shared cell still has the insert's values.
    assert table.snapshot() == [Flow(key, 1, 10.0, 10.0, 0, 0, 0, 0)]
    assert table.sync() == 1 and table.sync() == 0
    assert table.snapshot() == [Flow(key, 1, 10.0, 12.0, 1, 100, 1, 300)]
    assert table.lookup(key) == Flow(key, 1, 10.0, 12.0, 1, 100, 1, 300)
    assert table.remove(slot) == (key, tag)
    assert table.get(key) is None and table.slot_of_tag(tag) is None and len(table) == 0
    assert table.snapshot() == [] and table.lookup(key) is None
    totals = table.summary()["totals"]
    assert totals == {"pkts_in": 1, "bytes_in": 100, "pkts_out": 1, "bytes_out": 300}
    with pytest.raises(ValueError):
        table.remove(slot)
    with pytest.raises(KeyError):
        table.touch(slot, 13.0, 1)


def test_programming_errors_raise():
    table = TagTable(4, key_size=16)
    table.attach()
    table.insert(b"a" * 16, 0.0, tag=7)
    for key, tag in [(b"x" * 17, None), (b"", None), (b"a" * 16, None), (b"b", 0),
                     (b"b", TAG_MAX + 1), (b"b", 7), (b"b", -1)]:
        with pytest.raises(ValueError):
            table.insert(key, 1.0, tag)
    with pytest.raises(TypeError):
        table.insert("text", 1.0)
    with pytest.raises(ValueError):
        table.lookup(b"x" * 17)
    assert len(table) == 1 and table.lru_keys() == [b"a" * 16]


def test_tags_skip_zero_and_tags_in_use():
    table = TagTable(8)
    table.attach()
    table.insert(b"given", 0.0, tag=2)
    tags = [table.insert(bytes([i]), 0.0)[1] for i in range(3)]
    assert tags == [1, 3, 4]
    table._next_tag = TAG_MAX - 1
    tags = [table.insert(bytes([i]) * 2, 0.0)[1] for i in range(4)]
    assert tags == [TAG_MAX - 1, TAG_MAX, 5, 6]     # wrapped past 0, skipped 1..4
    assert table.summary()["next_tag"] == 7


def test_backward_shift_keeps_probe_chains_and_slots():
    table = TagTable(6)
    table.attach()
    a, b, c = keys_with_home(table, table.mask, 3)      # the cluster wraps around
    d = keys_with_home(table, 0, 1, width=5)[0]
    slots = {key: table.insert(key, float(i))[0] for i, key in enumerate([a, b, c, d])}
    # a at the last cell, b at 0, c at 1, d (home 0) at 2.
    assert [pos for pos, *_ in raw_cells(table)] == [0, 1, 2, table.mask]
    table.remove(slots[a])
    cells = {key: pos for pos, _gen, key, _tag in raw_cells(table)}
    assert cells == {b: table.mask, c: 0, d: 1}
    for key in (b, c, d):
        assert table.get(key) == slots[key]         # a slot does not move with its cell
        assert table.lookup(key).tag == table.tag_of(slots[key])
    table.touch(slots[d], 9.0, 100)
    table.sync()
    assert table.lookup(d).bytes_in == 100 and table.lookup(c).bytes_in == 0


# ------------------------------------------------------------------ hash flooding


def test_addresses_that_collide_without_the_seed_get_short_probes():
    """Clients that share a home cell under the unseeded hash would make one probe chain
    as long as their number: every insert walks it and every removal shifts it back."""
    capacity, count = 1024, 300
    unseeded = TagTable(capacity, key_size=16, seed=0)
    keys = loopback_keys_with_unseeded_home(unseeded.ncells, 77, count)
    unseeded.attach()
    for i, key in enumerate(keys):
        unseeded.insert(key, float(i))
    assert unseeded.probe_max() == longest_probe(unseeded) == count - 1    # the attack
    table = TagTable(capacity, key_size=16)
    assert table.ncells == unseeded.ncells and table.seed != 0
    table.attach()
    for i, key in enumerate(keys):
        table.insert(key, float(i))
    # At 300 flows in 2048 cells a probe of 32 has odds below 1e-14.
    assert table.probe_max() == longest_probe(table) < 32
    assert table.summary()["probe_max"] == table.probe_max()
    for key in keys[:150]:                          # and removals keep the figure right
        table.remove(table.get(key))
    assert table.probe_max() == longest_probe(table)
    for key in keys[150:]:
        table.remove(table.get(key))
    assert table.probe_max() == 0 and len(table) == 0


def test_the_seed_is_drawn_per_table_kept_in_the_header_and_checked_by_attach():
    tables = [TagTable(64) for _ in range(4)]
    assert len({t.seed for t in tables}) == 4
    table = tables[0]
    assert tagtable.HEAD_SEED.unpack_from(table._mm, tagtable.HEAD_SEED_OFFSET) == (table.seed,)
    key = peer_key(socket.AF_INET, ("192.0.2.1", 5566))

    def worker():
        table.attach()
        table.insert(key, 1.0)
        return 0 if table.home(key) == tagtable._hash(key, table.seed) & table.mask else 3

    assert wait(fork(worker)) == 0
    assert table.lookup(key).tag == 1              # the reader probes from the same home
    tagtable.HEAD_SEED.pack_into(table._mm, tagtable.HEAD_SEED_OFFSET, table.seed ^ 1)
    with pytest.raises(RuntimeError, match="damaged"):
        table.attach()
    with pytest.raises(ValueError):
        TagTable(64, seed=1 << 64)


# ------------------------------------------------------------------ the model


KEY_POOL = [bytes([i]) * (1 + i % 8) for i in range(1, 25)]


class TableAgainstModel(RuleBasedStateMachine):
    """Random inserts, touches, removes, expiries, syncs and re-attaches against dicts."""

    @initialize(capacity=st.integers(1, 9))
    def make(self, capacity):
        self.table = TagTable(capacity, key_size=8)
        self.table.attach()
        self.capacity = capacity
        self.now = 0.0
        # key -> [tag, created, seen, pkts_in, bytes_in, pkts_out, bytes_out]
        self.flows = {}
        self.synced = {}        # key -> the same, as written to shared memory at least
        self.order = []         # keys, least recently used first
        self.next_tag = 1
        self.evictions = self.expired = 0

    def tick(self, dt):
        self.now += dt
        return self.now

    def drop(self, key):
        del self.flows[key]
        del self.synced[key]
        self.order.remove(key)

    @rule(key=st.sampled_from(KEY_POOL), dt=st.integers(1, 4),
          given=st.none() | st.integers(1, 12) | st.just(TAG_MAX))
    def insert(self, key, dt, given):
        now = self.tick(dt)
        in_use = {flow[0] for flow in self.flows.values()}
        if key in self.flows or given in in_use:
            with pytest.raises(ValueError):
                self.table.insert(key, now, given)
            return
        evicted = None
        if len(self.flows) >= self.capacity:
            victim = self.order[0]
            evicted = (victim, self.flows[victim][0])
            in_use.discard(evicted[1])
            self.drop(victim)
            self.evictions += 1
        tag = given
        if tag is None:
            tag = self.next_tag
            while tag in in_use:
                tag = tag % TAG_MAX + 1
            self.next_tag = tag % TAG_MAX + 1
        slot, got_tag, got_evicted = self.table.insert(key, now, given)
        assert (got_tag, got_evicted) == (tag, evicted)
        self.flows[key] = [tag, now, now, 0, 0, 0, 0]
        self.synced[key] = list(self.flows[key])
        self.order.append(key)

    @precondition(lambda self: self.flows)
    @rule(data=st.data(), dt=st.integers(1, 4), nbytes=st.integers(0, 1500),
          outward=st.booleans())
    def touch(self, data, dt, nbytes, outward):
        key = data.draw(st.sampled_from(self.order))
        now = self.tick(dt)
        self.table.touch(self.table.get(key), now, nbytes, outward)
        flow = self.flows[key]
        flow[2] = now
        flow[5 if outward else 3] += 1
        flow[6 if outward else 4] += nbytes
        self.order.remove(key)
        self.order.append(key)

    @precondition(lambda self: self.flows)
    @rule(data=st.data())
    def remove(self, data):
        key = data.draw(st.sampled_from(self.order))
        assert self.table.remove(self.table.get(key)) == (key, self.flows[key][0])
        self.drop(key)

    @rule(dt=st.integers(0, 6), idle=st.integers(0, 12))
    def expire(self, dt, idle):
        now = self.tick(dt)
        idle_keys = [key for key in self.order if now - self.flows[key][2] > idle]
        expected = [(key, self.flows[key][0]) for key in idle_keys]
        assert self.table.expire(now, idle) == expected
        assert self.order[:len(idle_keys)] == idle_keys       # oldest first
        for key in idle_keys:
            self.drop(key)
        self.expired += len(idle_keys)

    @rule()
    def sync(self):
        self.table.sync()
        self.synced = {key: list(flow) for key, flow in self.flows.items()}
        assert {f.key: [f.tag, f.created, f.last_seen, f.pkts_in, f.bytes_in, f.pkts_out,
                        f.bytes_out] for f in self.table.snapshot()} == self.flows

    @rule()
    def respawn_after_clean_exit(self):
        self.table.sync()
        self.synced = {key: list(flow) for key, flow in self.flows.items()}
        self.table.attach()

    @rule()
    def respawn_after_crash(self):
        """attach() without sync(): mappings survive, counters fall back toward the last
        sync (a flow moved by a backward shift carried its newer counters along)."""
        self.table.attach()
        for key, flow in self.flows.items():
            got = self.table.flow(self.table.get(key))
            assert got.tag == flow[0] and got.created == flow[1]
            for field, low, high in zip(got[3:], self.synced[key][2:], flow[2:]):
                assert low <= field <= high
            self.flows[key] = [got.tag, got.created, got.last_seen, got.pkts_in,
                               got.bytes_in, got.pkts_out, got.bytes_out]
            self.synced[key] = list(self.flows[key])
        self.order.sort(key=lambda key: self.flows[key][2])

    @invariant()
    def table_matches_model(self):
        table = self.table
        assert len(table) == len(self.flows) <= self.capacity
        assert table.lru_keys() == self.order
        for key, flow in self.flows.items():
            slot = table.get(key)
            assert slot is not None and table.key_of(slot) == key
            assert table.tag_of(slot) == flow[0] and table.slot_of_tag(flow[0]) == slot
            assert list(table.flow(slot))[1:] == flow
        for key in KEY_POOL:
            if key not in self.flows:
                assert table.get(key) is None and table.lookup(key) is None

    @invariant()
    def shared_memory_matches_model(self):
        table = self.table
        flows = table.snapshot()
        assert table.scan_busy == table.scan_bad == 0
        assert sorted((f.key, f.tag) for f in flows) == \
            sorted((key, flow[0]) for key, flow in self.flows.items())
        assert 0 not in {f.tag for f in flows}
        assert len({f.tag for f in flows}) == len(flows)
        assert len(raw_cells(table)) == len(flows)          # no duplicates left behind
        for f in flows:
            assert table.lookup(f.key) == f                 # the probe chain is intact
            low, high = self.synced[f.key], self.flows[f.key]
            assert f.created == high[1]
            for field, lo, hi in zip(f[3:], low[2:], high[2:]):
                assert lo <= field <= hi
        summary = table.summary()
        assert summary["count"] == len(self.flows)
        assert summary["evictions"] == self.evictions
        assert summary["expired"] == self.expired
        assert summary["probe_max"] == longest_probe(table)
        assert all_gens_even(table)


TestTableAgainstModel = TableAgainstModel.TestCase
TestTableAgainstModel.settings = settings(max_examples=150, stateful_step_count=60,
                                          deadline=None)


# ------------------------------------------------------------------ bounds and expiry


def test_flood_of_new_keys_evicts_and_stays_bounded():
    capacity = 64
    table = TagTable(capacity, key_size=16)
    table.attach()
    size = table.size
    tracemalloc.start()
    try:
        evictions = 0
        for i in range(10 * capacity):
            if i == 3 * capacity:
                warm, _peak = tracemalloc.get_traced_memory()
            key = i.to_bytes(16, "little")
            slot, _tag, gone = table.insert(key, float(i))
            table.touch(slot, float(i), 100)
            assert len(table) <= capacity
            if i < capacity:
                assert gone is None
            else:
                assert gone == ((i - capacity).to_bytes(16, "little"), i - capacity + 1)
                evictions += 1
        table.sync()
        done, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert evictions == 9 * capacity
    summary = table.summary()
    assert (summary["count"], summary["evictions"]) == (capacity, 9 * capacity)
    assert summary["totals"]["pkts_in"] == 10 * capacity
    assert summary["live"]["flows"] == capacity
    assert table.size == size
    assert max(len(table._index), len(table._tags), len(table._lru)) == capacity
    assert len(table._free) == 0 and len(table._dirty) == 0
    assert done - warm < 16 * 1024, "in-process memory grew with the flood"


def test_expiry_removes_only_idle_flows_oldest_first():
    table = TagTable(16)
    table.attach()
    slots = {bytes([i]): table.insert(bytes([i]), float(i))[0] for i in range(10)}
    table.touch(slots[b"\x02"], 15.0, 10)       # 2 is busy again
    table.touch(slots[b"\x07"], 16.0, 10)
    # At 20 with idle 12, flows last seen before 8 are idle; one seen at exactly 8 is not.
    gone = table.expire(20.0, 12.0)
    assert gone == [(bytes([i]), i + 1) for i in (0, 1, 3, 4, 5, 6)]
    assert sorted(f.key for f in table.snapshot()) == [bytes([i]) for i in (2, 7, 8, 9)]
    assert table.expire(20.0, 12.0) == []
    assert table.expire(21.0, 12.0) == [(b"\x08", 9)]
    assert table.summary()["expired"] == 7
    assert table.lru_keys() == [b"\x09", b"\x02", b"\x07"]


# ------------------------------------------------------------ memory that grows with the flows


def test_a_large_table_costs_its_header_and_used_map_until_flows_come():
    table = TagTable(1 << 20, key_size=16)      # 2 Mi cells: 160 MiB mapped
    tracemalloc.start()
    try:
        table.attach()
        assert table.snapshot() == [] and table.lookup(b"k" * 16) is None
        assert table.summary()["count"] == 0
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 64 * 1024, f"the writer keeps {kept} bytes for an empty table"
    resident = resident_pages(table)
    if resident is not None:
        assert resident <= overhead_pages(table), "cells were touched with no flow"
    keys = [os.urandom(16) for _ in range(100)]
    for i, key in enumerate(keys):
        table.touch(table.insert(key, float(i))[0], float(i), 10)
    table.sync()
    table.attach()                              # as a respawned worker would
    assert sorted(f.key for f in table.snapshot()) == sorted(keys)
    assert all(table.lookup(key).pkts_in == 1 for key in keys)
    assert len(table._key) == 100
    resident = resident_pages(table)
    if resident is not None:                    # a cell spans at most two pages
        assert resident <= overhead_pages(table) + 2 * 100
    table.close()


def test_a_new_flow_takes_a_slot_given_back_before_a_new_one():
    table = TagTable(1000, key_size=16)
    table.attach()
    keys = [i.to_bytes(16, "little") for i in range(200)]
    slots = [table.insert(key, float(i))[0] for i, key in enumerate(keys[:100])]
    assert slots == list(range(100))
    for key in keys[:60]:
        table.remove(table.get(key))
    again = [table.insert(key, 100.0 + i)[0] for i, key in enumerate(keys[100:160])]
    assert sorted(again) == list(range(60)) and len(table._key) == 100
    assert table.insert(keys[160], 200.0)[0] == 100     # past the high-water mark
    assert len(table._key) == 101 and len(table) == 101
    for key in keys[60:161]:
        slot = table.get(key)
        assert table.key_of(slot) == key and table.lookup(key).tag == table.tag_of(slot)
    table.attach()                  # a respawned writer numbers the live flows afresh
    assert len(table._key) == len(table) == 101
    assert sorted(table.get(key) for key in keys[60:161]) == list(range(101))


def test_every_cell_written_lies_in_a_used_block():
    table = TagTable(4096, key_size=16)
    table.attach()
    keys = [os.urandom(16) for _ in range(40)]
    for i, key in enumerate(keys):
        table.insert(key, float(i))
    for key in keys[::2]:
        table.remove(table.get(key))            # backward shifts write cells too
    used = bytes(table._used)
    assert set(used) <= {0, 1}
    assert all(used[pos >> tagtable.BLOCK_SHIFT] for pos, *_ in raw_cells(table))
    assert 0 < sum(used) <= 40                  # a block for a flow at most, never cleared
    # An insert into a block never used before, cut short after the writer marked the
    # block and made the cell's gen odd: attach() finds the half-written cell and clears it.
    block = used.index(0)
    torn = block << tagtable.BLOCK_SHIFT
    off = tagtable.HEADER_SIZE + torn * table.cell_size
    table._used[block] = 1
    table._words[off >> 3] += 1
    table._body.pack_into(table._mm, off + 8, 77, 0, 0.0, 0.0, 0, 0, 0, 0, 16, b"z" * 16)
    table.snapshot()
    assert table.scan_busy == 1
    table.attach()
    assert sorted(f.key for f in table.snapshot()) == sorted(keys[1::2])
    assert table.scan_busy == 0 and all_gens_even(table) and len(table) == 20
    assert table.slot_of_tag(77) is None


# ------------------------------------------------------------------ across fork


def test_flows_survive_the_worker_and_the_master_only_reads():
    table = TagTable(256)
    first = [bytes([4, i]) + bytes(14) for i in range(100)]
    second = [bytes([10, i]) + bytes(26) for i in range(50)]

    def worker():
        table.attach()
        for i, key in enumerate(first):
            slot, _tag, _gone = table.insert(key, 1.0)
            for _ in range(i % 5 + 1):
                table.touch(slot, 2.0, 100)
        table.touch(table.get(first[0]), 3.0, 50, outward=True)
        table.sync()
        # Then flows it never syncs before it dies: their mappings are already shared.
        for key in second:
            table.touch(table.insert(key, 4.0)[0], 5.0, 1000)
        os.kill(os.getpid(), signal.SIGKILL)

    assert wait(fork(worker)) == -signal.SIGKILL
    assert not table._attached                          # the master never became a writer
    flows = {f.key: f for f in table.snapshot()}
    assert set(flows) == set(first) | set(second)
    assert len({f.tag for f in flows.values()}) == 150 and 0 not in {f.tag for f in flows.values()}
    for i, key in enumerate(first):
        assert (flows[key].pkts_in, flows[key].bytes_in) == (i % 5 + 1, 100 * (i % 5 + 1))
    assert flows[first[0]][6:] == (1, 50)
    for key in second:
        assert flows[key][3:] == (4.0, 0, 0, 0, 0)      # created and seen at insert, no counters
    summary = table.summary()
    assert summary["count"] == 150 and summary["attaches"] == 1
    assert summary["writer_pid"] not in (0, os.getpid())
    expected = {key: flow.tag for key, flow in flows.items()}

    def respawned():
        table.attach()
        for key, tag in expected.items():
            slot = table.get(key)
            if slot is None or table.tag_of(slot) != tag or table.slot_of_tag(tag) != slot:
                return 3
        if len(table) != 150:
            return 4
        slot, tag, _gone = table.insert(b"new", 6.0)
        table.sync()
        return 0 if tag not in expected.values() else 5

    assert wait(fork(respawned)) == 0
    after = {f.key: f.tag for f in table.snapshot()}
    assert after.pop(b"new") not in expected.values()
    assert after == expected
    assert table.summary()["attaches"] == 2


def test_reader_never_sees_a_torn_cell():
    """A writer process churns one table for a bounded time while a reader process
    snapshots it in a loop.  Every key names its tag and every datagram is 100 bytes,
    so any mix of two writes shows up as a key/tag or bytes/packets mismatch."""
    table = TagTable(48, key_size=16)
    flag = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    report_r, report_w = os.pipe()

    def writer():
        try:
            churn()
        finally:
            flag[0] = 1

    def churn():
        table.attach()
        rng = random.Random(1)
        deadline = time.monotonic() + 1.0
        ops = 0
        while time.monotonic() < deadline and ops < 2_000_000:
            ops += 1
            now = time.monotonic()
            choice = rng.random()
            if choice < 0.05 or len(table) < 8:
                tag = rng.randrange(1, 200)
                if table.slot_of_tag(tag) is None:
                    table.insert(tagged_key(tag), now, tag)
            elif choice < 0.08:
                table.remove(table.slot_of_tag(rng.choice(list(table._tags))))
            elif choice < 0.09:
                table.expire(now, 0.0005)
            elif choice < 0.15:
                table.sync()
            else:
                slot = table.slot_of_tag(rng.choice(list(table._tags)))
                table.touch(slot, now, 100, outward=choice < 0.5)
        table.sync()

    def reader():
        rounds = busy_rounds = flows_seen = 0
        bad = []
        give_up = time.monotonic() + 30.0
        while rounds < 1_000_000 and time.monotonic() < give_up:
            done = flag[0]
            flows = table.snapshot()
            rounds += 1
            busy_rounds += not done
            flows_seen += len(flows)
            if table.scan_bad:
                bad.append(f"check failed on {table.scan_bad} cells")
            for f in flows:
                if (f.key != tagged_key(f.tag) or f.bytes_in != 100 * f.pkts_in
                        or f.bytes_out != 100 * f.pkts_out or f.last_seen < f.created):
                    bad.append(repr(f))
            if done:
                break
        os.write(report_w, json.dumps({"rounds": busy_rounds, "flows": flows_seen,
                                       "bad": bad[:5]}).encode())
        return 0

    reader_pid = fork(reader)
    writer_pid = fork(writer)
    try:
        assert wait(writer_pid) == 0
        assert wait(reader_pid) == 0
    finally:
        os.close(report_w)
    with os.fdopen(report_r, "rb") as pipe:
        report = json.loads(pipe.read())
    assert report["bad"] == []
    assert report["rounds"] >= 20, report           # the reader did run during the churn
    assert report["flows"] > 0
    final = table.snapshot()
    assert table.scan_busy == 0 and len(final) == table.summary()["count"]
    assert sum(f.pkts_in + f.pkts_out for f in final) > 0


def test_writer_killed_at_random_moments_loses_no_mapping():
    """SIGKILL a churning writer after a random number of completed operations; a
    respawned writer must find every flow the log says is live, with its tag (give or
    take the one operation that was cut short), and a sound table."""
    table = TagTable(32, key_size=16)
    record = struct.Struct("<BI")                       # 1 = inserted, 2 = removed; tag
    rng = random.Random(7)
    log = {}                                            # tag -> live, per the dead writer

    for round_ in range(6):
        log_r, log_w = os.pipe()

        def writer(seed=round_):
            os.close(log_r)
            table.attach()
            wrng = random.Random(seed)
            for _ in range(1_000_000):
                now = time.monotonic()
                if len(table) < 24 and (wrng.random() < 0.6 or len(table) < 4):
                    tag = wrng.randrange(1, 100)
                    if table.slot_of_tag(tag) is None:
                        table.insert(tagged_key(tag), now, tag)
                        os.write(log_w, record.pack(1, tag))
                else:
                    tag = wrng.choice(list(table._tags))
                    table.remove(table.slot_of_tag(tag))
                    os.write(log_w, record.pack(2, tag))
                    table.touch(table.slot_of_tag(wrng.choice(list(table._tags))), now, 100)
                    if wrng.random() < 0.2:
                        table.sync()
            return 6

        pid = fork(writer)
        os.close(log_w)
        wanted, got = rng.randrange(50, 400) * record.size, b""
        while len(got) < wanted:
            chunk = os.read(log_r, wanted - len(got))
            assert chunk, "the writer stopped early"
            got += chunk
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        while chunk := os.read(log_r, 65536):
            got += chunk
        os.close(log_r)
        for op, tag in record.iter_unpack(got):
            log[tag] = op == 1

        def respawned():
            table.attach()
            return 0

        assert wait(fork(respawned)) == 0
        flows = {f.tag: f for f in table.snapshot()}
        live = {tag for tag, alive in log.items() if alive}
        missing, extra = live - set(flows), set(flows) - live
        assert len(missing) + len(extra) <= 1, (missing, extra)
        for tag, flow in flows.items():
            assert flow.key == tagged_key(tag)
            assert table.lookup(flow.key) == flow
        cells = raw_cells(table)
        assert len(cells) == len(flows) == table.summary()["count"]
        assert all_gens_even(table)
        for tag in missing | extra:                     # settle the cut-short operation
            log[tag] = tag in flows


# ------------------------------------------------------------------ crash repair, exactly


class Killed(Exception):
    """Stands for SIGKILL at one exact point of a write sequence."""


def test_attach_repairs_a_move_cut_short(monkeypatch):
    table = TagTable(6)
    table.attach()
    a, b, c = keys_with_home(table, 3, 3)
    slots = {key: table.insert(key, float(i))[0] for i, key in enumerate([a, b, c])}
    tags = {key: table.tag_of(slot) for key, slot in slots.items()}

    def die(pos):
        raise Killed
    monkeypatch.setattr(table, "_clear_cell", die)
    with pytest.raises(Killed):
        table.remove(slots[a])
    # b and c moved back one cell each; c's old cell was never cleared: c is there twice.
    assert [key for _pos, _gen, key, _tag in raw_cells(table)] == [b, c, c]
    assert sorted(f.key for f in table.snapshot()) == sorted([b, c])    # readers see it once
    monkeypatch.undo()
    table.attach()
    assert [key for _pos, _gen, key, _tag in raw_cells(table)] == [b, c]
    assert table.get(a) is None and len(table) == 2
    for key in (b, c):
        assert table.tag_of(table.get(key)) == tags[key]
        assert table.lookup(key).tag == tags[key]
    assert table.summary()["count"] == 2
    assert table.probe_max() == longest_probe(table)


def test_attach_repairs_a_first_move_cut_short(monkeypatch):
    table = TagTable(6)
    table.attach()
    a, b, c = keys_with_home(table, 3, 3)
    d = keys_with_home(table, 5, 1, width=5)[0]
    for i, key in enumerate([a, b, c, d]):          # cells 3, 4, 5, 6
        table.insert(key, float(i))
    write_cell = table._write_cell
    calls = []

    def die_on_second(pos, slot):
        calls.append(pos)
        if len(calls) == 2:
            raise Killed
        write_cell(pos, slot)
    monkeypatch.setattr(table, "_write_cell", die_on_second)
    with pytest.raises(Killed):
        table.remove(table.get(a))
    assert [key for _pos, _gen, key, _tag in raw_cells(table)] == [b, b, c, d]
    monkeypatch.undo()
    table.attach()
    assert sorted(key for _pos, _gen, key, _tag in raw_cells(table)) == sorted([b, c, d])
    for key in (b, c, d):
        assert table.lookup(key).tag == table.tag_of(table.get(key))
    assert table.probe_max() == longest_probe(table)


def test_attach_repairs_a_move_target_cut_short_inside_pack_into(monkeypatch):
    """struct's pack_into() zeroes the whole body before it writes the fields in order, so
    a move target cut short holds the moved flow's tag and keylen 0, and looks empty; the
    flow is still whole one cell on, and only a backward shift from the torn cell makes
    its probe chain whole again (clearing the torn cell alone left lookup() blind to it)."""
    table = TagTable(6)
    table.attach()
    a, b = keys_with_home(table, 3, 2)
    table.insert(a, 1.0)
    _slot, tag_b, _gone = table.insert(b, 2.0)              # a at cell 3, b at cell 4

    def die_inside_pack_into(pos, slot):
        off = tagtable.HEADER_SIZE + pos * table.cell_size
        table._words[off >> 3] |= 1
        with pytest.raises(struct.error):               # the real pack_into, cut short
            table._body.pack_into(table._mm, off + tagtable.CELL_BODY_OFFSET, tag_b,
                                  tagtable.check_of(b, tag_b), "killed", 0.0, 0, 0, 0, 0,
                                  len(b), b)
        raise Killed
    monkeypatch.setattr(table, "_write_cell", die_inside_pack_into)
    with pytest.raises(Killed):
        table.remove(table.get(a))
    fields = table._body.unpack_from(table._mm, tagtable.HEADER_SIZE + 3 * table.cell_size
                                     + tagtable.CELL_BODY_OFFSET)
    assert (fields[0], fields[8]) == (tag_b, 0)              # b's tag, and "empty"
    assert [(pos, key) for pos, _gen, key, _tag in raw_cells(table)] == [(4, b)]
    monkeypatch.undo()
    table.attach()
    assert [(pos, key) for pos, _gen, key, _tag in raw_cells(table)] == [(3, b)]
    assert table.lookup(b).tag == tag_b == table.tag_of(table.get(b))
    assert all_gens_even(table) and len(table) == 1
    assert table.probe_max() == longest_probe(table) == 0


def test_attach_drops_half_written_cells_and_keeps_whole_ones():
    table = TagTable(8, key_size=16)
    table.attach()
    keys = [bytes([i]) * 16 for i in range(5)]
    slots = [table.insert(key, float(i))[0] for i, key in enumerate(keys)]
    occupied = {pos for pos, *_ in raw_cells(table)}
    torn = next(pos for pos in range(table.ncells) if pos not in occupied)
    off = tagtable.HEADER_SIZE + torn * table.cell_size
    # An insert cut short: gen odd, tag and key written, check not yet.
    table._words[off >> 3] += 1
    table._body.pack_into(table._mm, off + 8, 77, 0, 0.0, 0.0, 0, 0, 0, 0, 16, b"z" * 16)
    # A sync cut short on a live cell: gen odd, key and tag whole.
    live = table._pos[slots[2]]
    table._words[(tagtable.HEADER_SIZE + live * table.cell_size) >> 3] += 1
    table.snapshot()
    assert table.scan_busy == 2                     # readers give up on odd cells, boundedly
    table.attach()
    assert sorted(f.key for f in table.snapshot()) == keys and table.scan_busy == 0
    assert table.get(b"z" * 16) is None and table.slot_of_tag(77) is None
    assert all_gens_even(table) and len(table) == 5
    assert all(table.lookup(key) for key in keys)
    assert table.probe_max() == longest_probe(table)
