"""udpmux.batchio on real loopback sockets, through both the fast and the portable path.

No sleeps: tests wait for readiness with poll() and a deadline; an alarm fails any test that
blocks.
"""

import errno
import gc
import os
import select
import signal
import socket
import struct
import time
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udpmux import batchio
from udpmux.addr import peer_key
from udpmux.batchio import Batch, Outbox, recv_into
from udpmux.wire import MAX_UDP_PAYLOAD

WAIT = 5.0              # seconds to wait for a datagram that loopback should deliver at once
TEST_ALARM = 30         # seconds before a test that blocks is failed instead of hanging
BIG_RCVBUF = 4 << 20

PATHS = [pytest.param(False, id="fast"), pytest.param(True, id="portable")]
FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def _has_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = _has_ipv6()


class Blocked(Exception):
    pass


@pytest.fixture(autouse=True)
def alarm():
    """Turn a blocked test into a failure."""
    def ring(_signum, _frame):
        raise Blocked(f"the test was still running after {TEST_ALARM} s")
    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(TEST_ALARM)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(params=PATHS)
def portable(request):
    if not request.param and not batchio.HAVE_MMSG:
        pytest.skip("recvmmsg/sendmmsg are not available here")
    return request.param


@pytest.fixture(params=FAMILIES)
def family(request):
    if request.param == socket.AF_INET6 and not HAVE_IPV6:
        pytest.skip("no IPv6 loopback")
    return request.param


class Sockets:
    """Sockets bound on loopback, closed at the end of the test."""

    def __init__(self):
        self.all = []

    def udp(self, family, blocking=False, rcvbuf=BIG_RCVBUF):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.all.append(sock)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((LOOPBACK[family], 0))
        sock.setblocking(blocking)
        return sock

    def close(self):
        for sock in self.all:
            sock.close()


@pytest.fixture
def sockets():
    made = Sockets()
    yield made
    made.close()


def key_of(sock):
    return peer_key(sock.family, sock.getsockname())


def closed_port(family):
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK[family], 0))
        return sock.getsockname()[1]


def wait_readable(sock, timeout):
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, timeout) * 1000))


def receive(sock, batch, expected, headroom=0, timeout=WAIT):
    """recv_into() until `expected` datagrams came or the deadline passed:
    [(bytes, key, truncated)], in arrival order."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable(sock, left):
            break
        n = recv_into(sock, batch, headroom)
        for i in range(n):
            got.append((bytes(batch.datagram(i)), batch.keys[i],
                        batch.lengths[i] > batch.capacity))
    return got


def recv_plain(sock, expected, timeout=WAIT):
    """Plain recvfrom() until `expected` datagrams came or the deadline passed."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable(sock, left):
            break
        data, address = sock.recvfrom(1 << 17)
        got.append((data, peer_key(sock.family, address)))
    return got


def payload(i, size):
    """Distinct bytes for datagram i."""
    pattern = struct.pack("!I", i) + bytes(range(256))
    return (pattern * (size // len(pattern) + 1))[:size]


# ---------------------------------------------------------------------------------- receive


def test_recv_on_empty_socket_returns_zero(portable, family, sockets):
    batch = Batch(8, 2048, portable=portable)
    for blocking in (False, True):      # MSG_DONTWAIT: a blocking socket must not block either
        sock = sockets.udp(family, blocking=blocking)
        assert recv_into(sock, batch) == 0
        assert (batch.n, batch.lengths, batch.keys, batch.any_truncated) == (0, [], [], False)
    assert not batch.errors             # EAGAIN is no error


def test_many_datagrams_round_trip_with_peer_keys(portable, family, sockets):
    receiver = sockets.udp(family)
    senders = [sockets.udp(family) for _ in range(3)]
    sizes = [0, 1, 7, 64, 500, 1200, 1472, 9000, 33] * 12
    sent = []
    for i, size in enumerate(sizes):
        sender = senders[i % len(senders)]
        data = payload(i, size)
        sender.sendto(data, receiver.getsockname())
        sent.append((data, key_of(sender), False))
    batch = Batch(portable=portable)
    got = receive(receiver, batch, len(sent))
    assert got == sent
    assert not batch.errors

    # ...and back through an Outbox, zero-copy from the batch, each to its own sender.
    out = Outbox(portable=portable)
    sender_of = {key_of(s): s for s in senders}
    got_back = {}
    for start in range(0, len(sizes), batch.count):
        chunk = sent[start:start + batch.count]
        for data, key, _ in chunk:
            sender_of[key].sendto(data, receiver.getsockname())
        assert receive(receiver, batch, len(chunk)) == chunk
        for i in range(batch.n):
            assert out.add_from(batch, batch.starts[i], batch.lengths[i], batch.keys[i])
        assert len(out) == len(chunk)
        assert out.flush(receiver) == len(chunk)
        assert len(out) == 0
    for sender in senders:
        got_back[key_of(sender)] = [data for data, _ in
                                    recv_plain(sender, len(sizes) // len(senders))]
    for sender in senders:
        expected = [data for data, key, _ in sent if key == key_of(sender)]
        assert got_back[key_of(sender)] == expected
    assert out.sent == len(sizes) and not out.drops


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 4000), min_size=1, max_size=80),
       headroom=st.integers(0, 100), slot_size=st.integers(200, 5000),
       portable=st.booleans() if batchio.HAVE_MMSG else st.just(True))
def test_any_sizes_arrive_exact_or_flagged(sizes, headroom, slot_size, portable):
    made = Sockets()
    try:
        receiver = made.udp(socket.AF_INET)
        sender = made.udp(socket.AF_INET)
        for i, size in enumerate(sizes):
            sender.sendto(payload(i, size), receiver.getsockname())
        batch = Batch(16, slot_size, portable=portable)
        got = receive(receiver, batch, len(sizes), headroom)
        capacity = slot_size - headroom
        expected = [(payload(i, size)[:capacity], key_of(sender), size > capacity)
                    for i, size in enumerate(sizes)]
        assert got == expected
    finally:
        made.close()


def test_largest_datagrams_arrive_whole(portable, family, sockets):
    receiver = sockets.udp(family)
    sender = sockets.udp(family)
    sent = [payload(i, MAX_UDP_PAYLOAD) for i in range(3)]
    for data in sent:
        sender.sendto(data, receiver.getsockname())
    batch = Batch(portable=portable)
    got = receive(receiver, batch, len(sent))
    assert [data for data, _, _ in got] == sent
    assert not any(truncated for _, _, truncated in got)

    # Forward them whole: by reference (sendmmsg of 3, sendto of 1) and copied.
    receiver.sendto(sent[0], sender.getsockname())
    for data in sent:
        sender.sendto(data, receiver.getsockname())
    out = Outbox(portable=portable)
    assert receive(receiver, batch, 3) == [(data, key_of(sender), False) for data in sent]
    for i in range(3):
        out.add_from(batch, batch.starts[i], batch.lengths[i], key_of(sender))
    assert out.flush(receiver) == 3
    out.add(sent[1], key_of(sender))
    assert out.flush(receiver) == 1
    assert [data for data, _ in recv_plain(sender, 5)] == [sent[0]] + sent + [sent[1]]


def test_oversized_datagram_is_flagged_truncated(portable, family, sockets):
    receiver = sockets.udp(family)
    sender = sockets.udp(family)
    slot_size = 1000
    sizes = [1500, 1000, 1001, 10, MAX_UDP_PAYLOAD]
    for i, size in enumerate(sizes):
        sender.sendto(payload(i, size), receiver.getsockname())
    batch = Batch(8, slot_size, portable=portable)
    got = receive(receiver, batch, len(sizes))
    assert [truncated for _, _, truncated in got] == [True, False, True, False, True]
    assert [data for data, _, _ in got] == [payload(i, size)[:slot_size]
                                           for i, size in enumerate(sizes)]
    # Everything came in one batch here (loopback delivers at once), so check its flags.
    assert batch.n == len(sizes)
    assert batch.any_truncated
    assert batch.truncated == [True, False, True, False, True]
    if batchio._LINUX:      # the real length where the platform reports it
        assert batch.lengths == sizes
    else:
        assert batch.lengths == [min(size, slot_size + 1) for size in sizes]

    sender.sendto(b"small", receiver.getsockname())
    assert receive(receiver, batch, 1) == [(b"small", key_of(sender), False)]
    assert not batch.any_truncated


def test_portable_truncation_without_the_linux_msg_trunc(monkeypatch, family, sockets):
    """Elsewhere recv*() does not report a real length: the portable path asks for one byte
    more than the capacity, and a datagram that fills it is truncated."""
    monkeypatch.setattr(batchio, "_PORTABLE_RECV_FLAGS", batchio.MSG_DONTWAIT)
    receiver = sockets.udp(family)
    sender = sockets.udp(family)
    capacity = 500 - 8
    sizes = [capacity, capacity + 1, capacity + 50, 3]
    for i, size in enumerate(sizes):
        sender.sendto(payload(i, size), receiver.getsockname())
    batch = Batch(8, 500, portable=True)
    got = receive(receiver, batch, len(sizes), headroom=8)
    assert [truncated for _, _, truncated in got] == [False, True, True, False]
    assert batch.lengths == [capacity, capacity + 1, capacity + 1, 3]
    assert [data for data, _, _ in got] == [payload(i, size)[:capacity]
                                           for i, size in enumerate(sizes)]


def test_headroom_places_data_and_leaves_room_for_a_header(portable, family, sockets):
    receiver = sockets.udp(family)
    sender = sockets.udp(family)
    headroom = 37
    batch = Batch(8, 3000, portable=portable)
    batch.buf[:] = b"\xaa" * len(batch.buf)
    sent = [payload(i, size) for i, size in enumerate([5, 0, 2963, 700])]
    for data in sent:
        sender.sendto(data, receiver.getsockname())
    assert wait_readable(receiver, WAIT)
    n = 0
    deadline = time.monotonic() + WAIT
    while n < len(sent) and time.monotonic() < deadline:   # all land in slots 0..3 at once
        n = recv_into(receiver, batch, headroom)
        assert n in (0, len(sent))
    assert n == len(sent)
    for i, data in enumerate(sent):
        start = batch.offset(i) + headroom
        assert batch.starts[i] == start
        assert batch.buf[start:start + len(data)] == data
        assert batch.buf[batch.offset(i):start] == b"\xaa" * headroom
    assert batch.capacity == 3000 - headroom

    # Write a header in front of each datagram in place and forward header + datagram.
    out = Outbox(portable=portable)
    for i in range(n):
        header = b"H%02d" % i + b"\x00" * (headroom - 3)
        start = batch.starts[i] - headroom
        batch.buf[start:start + headroom] = header
        out.add_from(batch, start, headroom + batch.lengths[i], key_of(sender))
    assert out.flush(receiver) == n
    assert [data for data, _ in recv_plain(sender, n)] == [
        b"H%02d" % i + b"\x00" * (headroom - 3) + data for i, data in enumerate(sent)]


def test_bad_headroom_is_refused(portable, sockets):
    receiver = sockets.udp(socket.AF_INET)
    batch = Batch(4, 100, portable=portable)
    for headroom in (-1, 100, 101):
        with pytest.raises(ValueError):
            recv_into(receiver, batch, headroom)


def test_recv_counts_a_pending_icmp_error_and_reads_on(portable, family, sockets):
    sock = sockets.udp(family)
    port = closed_port(family)
    sock.connect((LOOPBACK[family], port))
    sock.send(b"to nobody")             # ICMP port unreachable -> ECONNREFUSED on sock
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    assert poller.poll(WAIT * 1000)
    peer = socket.socket(family, socket.SOCK_DGRAM)
    sockets.all.append(peer)
    try:
        peer.bind((LOOPBACK[family], port))
    except OSError:
        pytest.skip("the closed port was taken meanwhile")
    peer.sendto(b"hello", sock.getsockname())
    batch = Batch(4, 2048, portable=portable)
    got = receive(sock, batch, 1)
    assert got == [(b"hello", key_of(peer), False)]
    assert batch.errors == {errno.ECONNREFUSED: 1}


# ---------------------------------------------------------------------------------- send


@pytest.mark.parametrize("count", [1, 5], ids=["sendto", "sendmmsg"])
def test_add_from_sends_the_batch_bytes_not_a_copy(portable, family, sockets, count):
    receiver = sockets.udp(family)
    sender = sockets.udp(family)
    for i in range(count):
        sender.sendto(b"before%d" % i, receiver.getsockname())
    batch = Batch(8, 256, portable=portable)
    assert len(receive(receiver, batch, count)) == count
    out = Outbox(portable=portable)
    for i in range(count):
        out.add_from(batch, batch.starts[i], batch.lengths[i], batch.keys[i])
    for i in range(count):          # change the batch after add_from(), before flush()
        start = batch.starts[i]
        batch.buf[start:start + 6] = b"AFTER!"
    assert out.flush(receiver) == count
    assert [data for data, _ in recv_plain(sender, count)] == [
        b"AFTER!%d" % i for i in range(count)]


@pytest.mark.parametrize("count", [1, 6], ids=["sendto", "sendmmsg"])
def test_add_many_from_forwards_a_batch_by_reference(portable, family, sockets, count):
    receiver = sockets.udp(family)
    senders = [sockets.udp(family) for _ in range(2)]
    sent = [payload(i, 10 + 97 * i) for i in range(count)]
    for i, data in enumerate(sent):
        senders[i % 2].sendto(data, receiver.getsockname())
    batch = Batch(8, 2048, portable=portable)
    got = receive(receiver, batch, count, headroom=4)
    assert len(got) == count and batch.n == count
    out = Outbox(portable=portable)
    # Each back to its sender (a list of keys), with a 4-byte header written in front.
    for i in range(count):
        batch.buf[batch.starts[i] - 4:batch.starts[i]] = b"H%03d" % i
    starts = [start - 4 for start in batch.starts[:count]]
    lengths = [length + 4 for length in batch.lengths]
    assert out.add_many_from(batch, starts, lengths, batch.keys) == count
    for i in range(count):          # by reference: a change before flush() is what is sent
        batch.buf[batch.starts[i] - 4] = ord("h")
    assert out.flush(receiver) == count
    for k, sender in enumerate(senders):
        assert [data for data, _ in recv_plain(sender, len(sent[k::2]))] == [
            b"h%03d" % i + sent[i] for i in range(k, count, 2)]
    # All to one key, mixed with add_from() and add().
    out.add(b"first", key_of(senders[0]))
    assert out.add_many_from(batch, batch.starts[:count], batch.lengths,
                             key_of(senders[0])) == count
    out.add_from(batch, batch.starts[0], 3, key_of(senders[0]))
    assert len(out) == count + 2
    assert out.flush(receiver) == count + 2
    assert [data for data, _ in recv_plain(senders[0], count + 2)] == (
        [b"first"] + sent + [sent[0][:3]])
    assert not out.drops


def test_queued_datagrams_keep_their_batch_alive(portable, sockets):
    receiver = sockets.udp(socket.AF_INET)
    out = Outbox(portable=portable)
    first, second = Batch(2, 100, portable=portable), Batch(2, 100, portable=portable)
    first.buf[:5] = b"alive"
    second.buf[:5] = b"still"
    out.add_from(first, 0, 5, key_of(receiver))
    out.add_many_from(second, [0], [5], key_of(receiver))
    refs = [weakref.ref(first), weakref.ref(second)]
    del first, second
    gc.collect()
    if not portable:    # the portable outbox holds the buffers' memoryviews instead
        assert all(ref() is not None for ref in refs)
    assert out.flush(receiver) == 2
    gc.collect()
    assert all(ref() is None for ref in refs)       # and lets them go after flush()
    assert [data for data, _ in recv_plain(receiver, 2)] == [b"alive", b"still"]


def test_batch_buffers_cannot_be_resized(portable):
    batch = Batch(2, 100, portable=portable)
    with pytest.raises(BufferError):
        batch.buf.extend(b"x")


def test_add_many_from_keeps_to_the_room_left(portable, sockets):
    receiver = sockets.udp(socket.AF_INET)
    batch = Batch(8, 100, portable=portable)
    for i in range(8):
        batch.buf[batch.starts[i]] = ord("a") + i
    out = Outbox(count=5, portable=portable)
    out.add(b"x", key_of(receiver))
    assert out.add_many_from(batch, batch.starts[:6], [1] * 6, [key_of(receiver)] * 6) == 4
    assert out.drops == {batchio.DROP_FULL: 2}
    assert out.add_many_from(batch, batch.starts[:2], [1, 1], key_of(receiver)) == 0
    assert out.drops == {batchio.DROP_FULL: 4}
    assert out.add_many_from(batch, [], [], key_of(receiver)) == 0
    assert out.flush(receiver) == 5
    assert [data for data, _ in recv_plain(receiver, 5)] == [b"x", b"a", b"b", b"c", b"d"]


def test_add_many_from_refuses_what_is_not_the_batch(portable):
    batch = Batch(2, 100, portable=portable)
    out = Outbox(portable=portable)
    key = peer_key(socket.AF_INET, ("127.0.0.1", 9))
    size = len(batch.buf)
    for starts, lengths in (([0, -1], [1, 1]), ([0, 0], [1, -1]), ([0, size - 4], [1, 5]),
                            ([0], [1, 2])):
        with pytest.raises(ValueError):
            out.add_many_from(batch, starts, lengths, key)
    with pytest.raises(ValueError):
        out.add_many_from(batch, [0, 1], [1, 1], [key])
    assert len(out) == 0 and not out.drops


@pytest.mark.parametrize("count", [1, 5], ids=["sendto", "sendmmsg"])
def test_add_copies_into_the_arena(portable, family, sockets, count):
    receiver = sockets.udp(family)
    out = Outbox(portable=portable)
    sources = [bytearray(b"data %d" % i) for i in range(count)]
    for source in sources:
        assert out.add(source, key_of(receiver))
        source[:4] = b"XXXX"            # the caller may reuse its buffer at once
    out.add(memoryview(b"\x01\x02\x03\x04").cast("I"), key_of(receiver))  # any bytes-like
    assert out.flush(receiver) == count + 1
    assert [data for data, _ in recv_plain(receiver, count + 1)] == (
        [b"data %d" % i for i in range(count)] + [b"\x01\x02\x03\x04"])


def test_mixing_a_portable_batch_and_a_fast_outbox(sockets):
    if not batchio.HAVE_MMSG:
        pytest.skip("recvmmsg/sendmmsg are not available here")
    receiver = sockets.udp(socket.AF_INET)
    sender = sockets.udp(socket.AF_INET)
    for batch_portable in (True, False):
        for i in range(3):
            sender.sendto(b"mix%d" % i, receiver.getsockname())
        batch = Batch(4, 100, portable=batch_portable)
        assert len(receive(receiver, batch, 3)) == 3
        out = Outbox(portable=not batch_portable)
        for i in range(3):
            out.add_from(batch, batch.starts[i], batch.lengths[i], batch.keys[i])
        assert out.flush(receiver) == 3
        assert [data for data, _ in recv_plain(sender, 3)] == [b"mix0", b"mix1", b"mix2"]


def test_a_flush_sends_more_than_one_call_holds(portable, sockets):
    receiver = sockets.udp(socket.AF_INET)
    total = batchio.MAX_PER_CALL * 2 + 7
    out = Outbox(count=total, portable=portable)
    for i in range(total):
        out.add(b"%d" % i, key_of(receiver))
    assert out.flush(receiver) == total
    assert [data for data, _ in recv_plain(receiver, total)] == [b"%d" % i for i in range(total)]


def test_outbox_full_drops_and_counts(portable, sockets):
    receiver = sockets.udp(socket.AF_INET)
    batch = Batch(2, 100, portable=portable)
    out = Outbox(count=3, arena_size=10, portable=portable)
    assert out.add(b"123456", key_of(receiver))
    assert not out.add(b"12345", key_of(receiver))          # the arena is full
    assert out.add(b"1234", key_of(receiver))
    assert out.add_from(batch, 0, 5, key_of(receiver))
    assert not out.add_from(batch, 0, 5, key_of(receiver))  # the outbox is full
    assert not out.add(b"", key_of(receiver))
    assert len(out) == 3
    assert out.drops == {batchio.DROP_FULL: 3}
    assert out.flush(receiver) == 3
    assert len(out) == 0
    assert out.add(b"1234567890", key_of(receiver))          # flush emptied the arena
    assert out.flush(receiver) == 1
    assert [data for data, _ in recv_plain(receiver, 4)] == [
        b"123456", b"1234", bytes(5), b"1234567890"]


def test_add_from_outside_the_batch_is_refused(portable):
    batch = Batch(2, 100, portable=portable)
    out = Outbox(portable=portable)
    key = peer_key(socket.AF_INET, ("127.0.0.1", 9))
    for start, length in ((-1, 5), (0, len(batch.buf) + 1), (len(batch.buf) - 4, 5), (0, -1)):
        with pytest.raises(ValueError):
            out.add_from(batch, start, length, key)
    assert len(out) == 0
    with pytest.raises(ValueError):
        out.add(b"x", bytes(29))


@pytest.mark.parametrize("count", [1, 4], ids=["sendto", "sendmmsg"])
def test_flush_to_a_closed_port_does_not_raise(portable, family, sockets, count):
    sock = sockets.udp(family)
    dead = peer_key(family, (LOOPBACK[family], closed_port(family)))
    live = sockets.udp(family)
    out = Outbox(portable=portable)
    for round_ in range(3):     # the ICMP errors of one round meet the next one
        for i in range(count):
            out.add(b"lost %d" % i, dead)
        out.add(b"alive %d" % round_, key_of(live))
        sent = out.flush(sock)
        assert len(out) == 0
        assert sent <= count + 1
        assert out.sent + sum(out.drops.values()) == (count + 1) * (round_ + 1)
    # An unconnected UDP socket hears nothing of ICMP errors: everything was sent.
    assert out.sent == (count + 1) * 3 and not out.drops
    assert [data for data, _ in recv_plain(live, 3)] == [b"alive 0", b"alive 1", b"alive 2"]


@pytest.mark.parametrize("count", [1, 3], ids=["sendto", "sendmmsg"])
def test_a_pending_icmp_error_costs_no_datagram(portable, family, sockets, count):
    sock = sockets.udp(family)
    sock.connect((LOOPBACK[family], closed_port(family)))
    sock.send(b"to nobody")             # ICMP port unreachable -> ECONNREFUSED on sock
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    assert poller.poll(WAIT * 1000)
    live = sockets.udp(family)
    out = Outbox(portable=portable)
    for i in range(count):
        out.add(b"innocent %d" % i, key_of(live))
    assert out.flush(sock) == count
    assert out.errors == {errno.ECONNREFUSED: 1}
    assert not out.drops
    assert [data for data, _ in recv_plain(live, count)] == [
        b"innocent %d" % i for i in range(count)]


@pytest.mark.parametrize("count", [1, 3], ids=["sendto", "sendmmsg"])
def test_a_refused_datagram_is_dropped_and_the_rest_sent(portable, sockets, count):
    receiver = sockets.udp(socket.AF_INET)
    sender = sockets.udp(socket.AF_INET)
    out = Outbox(arena_size=1 << 18, portable=portable)
    too_big = MAX_UDP_PAYLOAD + 1          # EMSGSIZE over IPv4
    out.add(bytes(too_big), key_of(receiver))
    for i in range(count - 1):
        out.add(b"fine %d" % i, key_of(receiver))
    assert out.flush(sender) == count - 1
    assert out.drops == {errno.EMSGSIZE: 1}
    assert len(out) == 0
    assert [data for data, _ in recv_plain(receiver, count - 1)] == [
        b"fine %d" % i for i in range(count - 1)]


def test_a_key_that_is_no_address_is_a_counted_drop(portable, sockets):
    receiver = sockets.udp(socket.AF_INET)
    out = Outbox(portable=portable)
    out.add(b"nowhere", bytes(16))      # family 0
    out.add(b"somewhere", key_of(receiver))
    assert out.flush(receiver) == 1
    assert sum(out.drops.values()) == 1
    assert recv_plain(receiver, 1)[0][0] == b"somewhere"


def test_flush_into_a_full_udp_path_never_blocks(portable, family, sockets):
    """Smallest send and receive buffers, a receiver that never reads, a *blocking* sender.

    Loopback hands each datagram to the receiver at once (the sender's buffer is released in
    loopback_xmit), so the kernel drops the overflow at the receiver rather than refusing
    the send: this checks that flush() neither blocks nor loses count.  The next test makes
    the kernel really refuse with EAGAIN.
    """
    sink = sockets.udp(family, rcvbuf=1)
    sender = sockets.udp(family, blocking=True)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    batch = Batch(4, MAX_UDP_PAYLOAD, portable=portable)
    out = Outbox(portable=portable)
    queued = 0
    for _ in range(10):
        for _ in range(batchio.MAX_PER_CALL):
            out.add_from(batch, 0, MAX_UDP_PAYLOAD, key_of(sink))
            queued += 1
        out.flush(sender)
        assert len(out) == 0
    assert out.sent + sum(out.drops.values()) == queued
    arrived = 0
    for _ in range(queued):         # loopback delivered at once: drain what is there
        try:
            sink.recv(MAX_UDP_PAYLOAD)
        except BlockingIOError:
            break
        arrived += 1
    assert arrived < queued         # the sink's buffer overflowed


def test_flush_into_a_full_socket_buffer_drops_and_counts(portable, sockets):
    """A datagram socket whose peer's queue is full refuses with EAGAIN: the outbox drops
    the rest of that flush, counts them, and does not block although the socket does."""
    name = b"\0udpmux-test-" + os.urandom(6).hex().encode()
    name = name[:26].ljust(26, b".")    # sockaddr_un of 28 bytes: the names sendmmsg passes
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sockets.all.append(sink)
    sink.bind(name)
    key = struct.pack("=H", socket.AF_UNIX) + name
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sockets.all.append(sender)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    if portable:
        # sendto() needs an address tuple, and peer keys are IPv4 or IPv6: give the portable
        # outbox the socket's own address form for this key.
        out = Outbox(portable=True)
        out._addr_cache[key] = name
    else:
        out = Outbox(portable=False)
    queued = 0
    for _ in range(10):
        for i in range(batchio.MAX_PER_CALL):
            out.add(b"%d" % i * 100, key)
            queued += 1
        out.flush(sender)
        assert len(out) == 0
    assert out.drops[errno.EAGAIN] > 0
    assert set(out.drops) == {errno.EAGAIN}
    assert out.sent > 0
    assert out.sent + out.drops[errno.EAGAIN] == queued
    # One refused call per flush: the rest of the flush is dropped without trying.
    assert out.errors[errno.EAGAIN] <= 10


# ---------------------------------------------------------------------------------- choosing


def test_the_fast_path_is_there_on_linux():
    if not batchio._LINUX:
        pytest.skip("not Linux")
    assert batchio.HAVE_MMSG
    assert not Batch(1, 10).portable
    assert not Outbox().portable


def test_force_portable(monkeypatch):
    monkeypatch.setattr(batchio, "FORCE_PORTABLE", True)
    assert Batch(1, 10).portable
    out = Outbox()
    assert out.portable and type(out) is not Outbox and isinstance(out, Outbox)
    assert Batch(1, 10, portable=True).portable


def test_bad_sizes_are_refused():
    for count in (0, batchio.MAX_COUNT + 1):
        with pytest.raises(ValueError):
            Batch(count)
        with pytest.raises(ValueError):
            Outbox(count)
    with pytest.raises(ValueError):
        Batch(4, 0)
    with pytest.raises(ValueError):
        Outbox(arena_size=-1)
