"""Batched datagram I/O: many datagrams per system call, one interface everywhere.

On Linux, recv_into() and Outbox.flush() use recvmmsg()/sendmmsg() through ctypes on
buffers and kernel structures built once; elsewhere (or with portable=True) they fall back to
loops of recvfrom_into()/sendto() over the same buffers.  Callers cannot tell the difference
except by speed.

How we name things:
  batch       a Batch: `count` receive slots in one preallocated bytearray (Batch.buf)
  slot        the `stride` bytes of Batch.buf that datagram i of a receive lands in
  headroom    bytes kept free at the front of each slot, so that a caller can write a header
              in front of a datagram in place and forward header + datagram without a copy
  capacity    slot_size - headroom: the largest datagram a slot holds whole
  truncated   a datagram longer than the capacity; its length is reported (> capacity), its
              bytes are not all there, and it must be dropped, never forwarded
  peer key    raw struct sockaddr bytes (udpmux.addr): 16 bytes IPv4, 28 bytes IPv6
  outbox      datagrams queued for one socket, sent together by flush()
  arena       an Outbox's own buffer for the datagrams queued by add() (copied in)
  fast path   recvmmsg()/sendmmsg() through ctypes (Linux)
  portable path  recvfrom_into()/sendto() loops (any platform, or portable=True)
  drop        a datagram not sent, counted in Outbox.drops by errno, never raised

Batch.buf: `count` slots of `stride` bytes (slot_size + 1, rounded up to SLOT_ALIGN):

  offset(0)                                            offset(1)
  |<----------------------- stride ------------------------>|
  +----------+--------------------------+-------------+--+--+----------+-------------
  | headroom | datagram 0               |   unused    |sp|  | headroom | datagram 1 ...
  +----------+--------------------------+-------------+--+--+----------+-------------
             ^ starts[0]                ^ starts[0] + lengths[0]
             |<---------- capacity ---------------->|
  |<-------------------- slot_size ---------------->|
  sp: one spare byte, so the portable path can ask for capacity + 1 bytes and see truncation.

Fast path kernel structures, built once per Batch and once per Outbox:

  mmsghdr[i]: | name | namelen | iov | iovlen=1 | control=0 | controllen=0 | flags | msg_len |
                 |                |                                        (out)    (out)
                 v                v
      names[i]: 28 bytes    iovecs[i]: (address, length)

  Batch:  iovecs[i] = (buf + offset(i) + headroom, capacity), rewritten only when the
          headroom changes; the kernel overwrites namelen, flags and msg_len, so a pristine
          copy of the mmsghdr array is restored with one slice assignment before each call.
  Outbox: iovecs[i] = (where datagram i is, its length) and names[i] = its peer key,
          zero-padded; namelen is always 28 (Linux accepts a name longer than the family's).

Rules for callers:
  * Sockets are non-blocking, or blocking without a timeout (both calls pass MSG_DONTWAIT).
  * Check Batch.any_truncated (one comparison per batch) and drop the datagrams for which
    lengths[i] > capacity.
  * add_from() and add_many_from() queue a reference, not a copy: flush() the Outbox before
    the next recv_into() on that Batch, or the datagrams sent will be the new ones.
"""

import array
import collections
import errno
import functools
import itertools
import socket
import struct
import sys

from udpmux.addr import SOCKADDR_MAX, from_peer_key, peer_key

try:
    import ctypes
except ImportError:     # a Python built without ctypes: the portable path only
    ctypes = None

MAX_PER_CALL = 64               # datagrams per recvmmsg()/sendmmsg() call
MAX_COUNT = 1024                # UIO_MAXIOV: the kernel's bound on one call's vector
DEFAULT_SLOT_SIZE = 65536 + 64  # any UDP datagram whole, with 64 bytes of headroom to spare
DEFAULT_ARENA_SIZE = 1 << 17    # an Outbox's copy buffer: one datagram of any size, or many small
SLOT_ALIGN = 64                 # slots start on a cache line
KEY_CACHE_MAX = 4096            # address tuple <-> peer key pairs kept by the portable path
RECV_ERROR_RETRIES = 4          # receive calls retried after an error that is not EAGAIN

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)
_LINUX = sys.platform.startswith("linux")

# Linux reports a datagram's real length when MSG_TRUNC is passed to recv*(); elsewhere the
# portable path asks for capacity + 1 bytes, so a truncated datagram reads as capacity + 1.
_RECV_FLAGS = MSG_DONTWAIT | MSG_TRUNC
_PORTABLE_RECV_FLAGS = MSG_DONTWAIT | (MSG_TRUNC if _LINUX else 0)
_SEND_FLAGS = MSG_DONTWAIT

_WOULD_BLOCK = frozenset((errno.EAGAIN, errno.EWOULDBLOCK))
# A send error meaning "no room right now": every later datagram of this flush would meet it too.
_NO_ROOM = _WOULD_BLOCK | {errno.ENOBUFS}
# Drops counted under this errno: the outbox or its arena had no room (the kernel's ENOBUFS
# means the same thing one layer down).
DROP_FULL = errno.ENOBUFS

_WORD = "L"     # array/memoryview code of a C pointer and of size_t on Linux (LP64 and ILP32)


def _load_mmsg():
    """(recvmmsg, sendmmsg) from libc, or None where the fast path is unavailable."""
    if ctypes is None or not _LINUX:
        return None
    if not (struct.calcsize(_WORD) == ctypes.sizeof(ctypes.c_void_p)
            == ctypes.sizeof(ctypes.c_size_t)):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p)
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_MMSG = _load_mmsg()
HAVE_MMSG = _MMSG is not None
# Set to True to make every Batch and Outbox built afterwards use the portable path.
FORCE_PORTABLE = False

if HAVE_MMSG:
    _recvmmsg, _sendmmsg = _MMSG

    class _IOVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class _MsgHdr(ctypes.Structure):
        # glibc's layout; musl's int + padding fields have the same bytes on little-endian.
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class _MMsgHdr(ctypes.Structure):
        _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]

    _MMSG_SIZE = ctypes.sizeof(_MMsgHdr)
    _IOV_SIZE = ctypes.sizeof(_IOVec)
    _OFF_NAMELEN = _MsgHdr.namelen.offset
    _OFF_MSGLEN = _MMsgHdr.len.offset
    # One mmsghdr with msg_iovlen = 1 and no control data: pack(name, namelen, iov, iovlen).
    _HDR = struct.Struct("@PI" + "x" * (_MsgHdr.iov.offset - _OFF_NAMELEN - 4) + "PN")
    _IOV = struct.Struct("@PN")
    _pack_iov = _IOV.pack_into

_NAME = struct.Struct("%ds" % SOCKADDR_MAX)     # a peer key, zero-padded to 28 bytes
_pack_name = _NAME.pack_into


@functools.lru_cache(maxsize=MAX_PER_CALL * 2)
def _names_struct(m):
    """m peer keys, each zero-padded to 28 bytes, side by side."""
    return struct.Struct("%ds" % SOCKADDR_MAX * m)


def _choose_portable(portable):
    """Resolve a constructor's portable argument: None means the fast path where available."""
    if portable is None:
        return FORCE_PORTABLE or not HAVE_MMSG
    if not portable and not HAVE_MMSG:
        raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available on this platform")
    return bool(portable)


def _address_of(buf, keep):
    """The address of a bytearray's storage.  The ctypes view that took it goes into the
    list `keep`, and while it lives the bytearray cannot be resized (BufferError)."""
    pinned = ctypes.c_char.from_buffer(buf)
    keep.append(pinned)
    return ctypes.addressof(pinned)


def _check_count(count):
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be from 1 to {MAX_COUNT}, not {count}")


def _check_spans(batch, starts, lengths):
    """ValueError unless every starts[i]:starts[i] + lengths[i] lies inside batch.buf."""
    if len(starts) != len(lengths):
        raise ValueError(f"{len(starts)} starts but {len(lengths)} lengths")
    size = len(batch.buf)
    if starts and (min(starts) < 0 or min(lengths) < 0
                   or max(starts) + max(lengths) > size):
        for start, length in zip(starts, lengths):
            if start < 0 or length < 0 or start + length > size:
                raise ValueError(f"bytes {start}:{start + length} are outside the batch buffer")


class Batch:
    """`count` slots of `slot_size` bytes in one preallocated bytearray (self.buf, self.view),
    with the kernel structures to receive into them.

    After recv_into() returned n, for i < n:
      lengths[i]   the datagram's real length (more than `capacity` when it was truncated)
      keys[i]      the sender's peer key (bytes)
      starts[i]    where the datagram begins in buf: offset(i) + headroom
    and any_truncated says whether some lengths[i] > capacity.  `errors` counts receive
    errors other than EAGAIN by errno (a collections.Counter).
    """

    def __init__(self, count=MAX_PER_CALL, slot_size=DEFAULT_SLOT_SIZE, portable=None):
        _check_count(count)
        if slot_size < 1:
            raise ValueError(f"slot_size must be positive, not {slot_size}")
        self.portable = _choose_portable(portable)
        self.count = count
        self.slot_size = slot_size
        self.stride = (slot_size + 1 + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
        self.buf = bytearray(count * self.stride)
        self.view = memoryview(self.buf)
        self._pinned_buffers = []
        self._addr = _address_of(self.buf, self._pinned_buffers) if ctypes else None
        self.errors = collections.Counter()
        self.n = 0
        self.lengths = []
        self.keys = []
        self.any_truncated = False
        self.headroom = None
        self._key_cache = {}
        if not self.portable:
            self._build_kernel_structures()
        self._set_headroom(0)

    def offset(self, i):
        """Start of slot i in self.buf."""
        return i * self.stride

    @property
    def truncated(self):
        """For each datagram of the last receive: was it truncated?"""
        capacity = self.capacity
        return [length > capacity for length in self.lengths]

    def datagram(self, i):
        """A memoryview of datagram i of the last receive (only its first `capacity` bytes
        if it was truncated)."""
        start = self.starts[i]
        return self.view[start:start + min(self.lengths[i], self.capacity)]

    def _build_kernel_structures(self):
        count = self.count
        self._names = bytearray(count * SOCKADDR_MAX)
        self._names_view = memoryview(self._names)
        self._iovs = bytearray(count * _IOV_SIZE)
        self._hdrs = bytearray(count * _MMSG_SIZE)
        keep = self._pinned_buffers
        names_addr = _address_of(self._names, keep)
        iovs_addr = _address_of(self._iovs, keep)
        self._hdrs_addr = _address_of(self._hdrs, keep)
        for i in range(count):
            _HDR.pack_into(self._hdrs, i * _MMSG_SIZE, names_addr + i * SOCKADDR_MAX,
                           SOCKADDR_MAX, iovs_addr + i * _IOV_SIZE, 1)
        self._pristine = bytes(self._hdrs)
        words = memoryview(self._hdrs).cast("I")
        step = _MMSG_SIZE // 4
        self._msglen_words = words[_OFF_MSGLEN // 4::step]
        self._namelen_words = words[_OFF_NAMELEN // 4::step]
        self._name_offsets = range(0, count * SOCKADDR_MAX, SOCKADDR_MAX)

    def _set_headroom(self, headroom):
        if not 0 <= headroom < self.slot_size:
            raise ValueError(f"headroom must be from 0 to {self.slot_size - 1}, not {headroom}")
        self.headroom = headroom
        self.capacity = self.slot_size - headroom
        self.starts = [i * self.stride + headroom for i in range(self.count)]
        if self.portable:
            span = self.capacity + 1
            self._slot_views = [self.view[start:start + span] for start in self.starts]
        else:
            for i, start in enumerate(self.starts):
                _pack_iov(self._iovs, i * _IOV_SIZE, self._addr + start, self.capacity)

    def _nothing(self):
        self.n = 0
        self.lengths = []
        self.keys = []
        self.any_truncated = False
        return 0

    def _recv_mmsg(self, sock, headroom):
        if headroom != self.headroom:
            self._set_headroom(headroom)
        fd = sock.fileno()
        hdrs = self._hdrs
        for _attempt in range(RECV_ERROR_RETRIES + 1):
            hdrs[:] = self._pristine
            n = _recvmmsg(fd, self._hdrs_addr, self.count, _RECV_FLAGS, None)
            if n > 0:
                break
            err = ctypes.get_errno()
            if err in _WOULD_BLOCK or n == 0:
                return self._nothing()
            # ECONNREFUSED and friends report an ICMP error about an earlier datagram once;
            # data may still be waiting behind it.
            self.errors[err] += 1
        else:
            return self._nothing()
        self.n = n
        self.lengths = lengths = self._msglen_words[:n].tolist()
        names = bytes(self._names_view[:n * SOCKADDR_MAX])
        self.keys = [names[offset:offset + namelen] for offset, namelen
                     in zip(self._name_offsets, self._namelen_words[:n].tolist())]
        self.any_truncated = max(lengths) > self.capacity
        return n

    def _recv_portable(self, sock, headroom):
        if headroom != self.headroom:
            self._set_headroom(headroom)
        recvfrom_into = sock.recvfrom_into
        cache = self._key_cache
        lengths = []
        keys = []
        add_length = lengths.append
        add_key = keys.append
        for view in self._slot_views:
            try:
                nbytes, address = recvfrom_into(view, 0, _PORTABLE_RECV_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                received = self._recv_after_error(sock, view, exc)
                if received is None:
                    break
                nbytes, address = received
            key = cache.get(address)
            if key is None:
                if len(cache) >= KEY_CACHE_MAX:
                    cache.clear()
                key = cache[address] = peer_key(sock.family, address)
            add_length(nbytes)
            add_key(key)
        self.n = n = len(lengths)
        self.lengths = lengths
        self.keys = keys
        self.any_truncated = n > 0 and max(lengths) > self.capacity
        return n

    def _recv_after_error(self, sock, view, exc):
        """Count a receive error, then retry the slot a bounded number of times:
        (nbytes, address), or None when nothing more is waiting."""
        self.errors[exc.errno or errno.EIO] += 1
        for _attempt in range(RECV_ERROR_RETRIES):
            try:
                return sock.recvfrom_into(view, 0, _PORTABLE_RECV_FLAGS)
            except BlockingIOError:
                return None
            except OSError as again:
                self.errors[again.errno or errno.EIO] += 1
        return None


def recv_into(sock, batch, headroom=0):
    """Receive up to batch.count datagrams without blocking; datagram i lands at
    batch.offset(i) + headroom (batch.starts[i]).

    Returns n, 0 when nothing is waiting.  Errors other than EAGAIN (ECONNREFUSED after an
    ICMP port unreachable, for one) are counted in batch.errors and never raised.  Raises
    ValueError if headroom leaves no room in a slot.
    """
    if batch.portable:
        return batch._recv_portable(sock, headroom)
    return batch._recv_mmsg(sock, headroom)


class Outbox:
    """Datagrams queued for one socket; flush() sends them with sendmmsg, 64 per call.

    Holds at most `count` datagrams and `arena_size` bytes of add()ed data; what does not
    fit is dropped and counted under DROP_FULL (ENOBUFS).  flush() sends everything, never
    raises for a datagram the kernel refuses, and leaves the outbox empty.  Counters
    (collections.Counter, by errno):
      drops    datagrams not sent
      errors   failed send calls, including ones whose datagram went out on a retry
    and `sent` is the running total of datagrams sent.

    A peer key longer than 28 bytes is not one: add() refuses it, add_from() and
    add_many_from() (the hot path) do not look and send to its first 28 bytes.
    """

    def __new__(cls, count=MAX_PER_CALL, arena_size=DEFAULT_ARENA_SIZE, portable=None):
        if cls is Outbox and _choose_portable(portable):
            cls = _PortableOutbox
        return super().__new__(cls)

    def __init__(self, count=MAX_PER_CALL, arena_size=DEFAULT_ARENA_SIZE, portable=None):
        _check_count(count)
        if arena_size < 0:
            raise ValueError(f"arena_size must not be negative, not {arena_size}")
        self.portable = _choose_portable(portable)
        self.count = count
        self.drops = collections.Counter()
        self.errors = collections.Counter()
        self.sent = 0
        self._arena = bytearray(arena_size)
        self._arena_view = memoryview(self._arena)
        self._arena_used = 0
        self._addr_cache = {}
        if not self.portable:
            self._init_kernel_structures()

    def _init_kernel_structures(self):
        count = self.count
        self._iovs = bytearray(count * _IOV_SIZE)
        self._iov_words = memoryview(self._iovs).cast(_WORD)
        self._names = bytearray(count * SOCKADDR_MAX)
        self._hdrs = bytearray(count * _MMSG_SIZE)
        keep = self._pinned_buffers = []
        iovs_addr = _address_of(self._iovs, keep)
        names_addr = _address_of(self._names, keep)
        self._hdrs_addr = _address_of(self._hdrs, keep)
        self._arena_addr = _address_of(self._arena, keep) if self._arena else 0
        for i in range(count):
            _HDR.pack_into(self._hdrs, i * _MMSG_SIZE, names_addr + i * SOCKADDR_MAX,
                           SOCKADDR_MAX, iovs_addr + i * _IOV_SIZE, 1)
        self._n = 0
        self._first = None      # (view, start, length, key) of entry 0, for a flush of one
        self._pins = []         # the Batches that queued entries point into
        self._pinned = None

    def __len__(self):
        return self._n

    def add_from(self, batch, start, length, key):
        """Queue batch.buf[start:start + length] to peer key `key` without copying it.
        True if queued, False if the outbox was full (a counted drop)."""
        n = self._n
        if n >= self.count:
            self.drops[DROP_FULL] += 1
            return False
        if start < 0 or length < 0 or start + length > len(batch.buf):
            raise ValueError(f"bytes {start}:{start + length} are outside the batch buffer")
        if batch is not self._pinned:
            self._pins.append(batch)
            self._pinned = batch
        if not n:
            self._first = (batch.view, start, length, key)
        _pack_iov(self._iovs, n * _IOV_SIZE, batch._addr + start, length)
        _pack_name(self._names, n * SOCKADDR_MAX, key)
        self._n = n + 1
        return True

    def add_many_from(self, batch, starts, lengths, keys):
        """Queue batch.buf[starts[i]:starts[i] + lengths[i]] to peer key keys[i] for every i,
        without copying; `keys` may also be one peer key (bytes) for all of them.

        The batch-at-a-time add_from(): a few C-level passes instead of a call per datagram.
        Returns how many were queued; the rest did not fit and are counted drops.
        """
        one_key = isinstance(keys, bytes)
        if not one_key and len(keys) != len(starts):
            raise ValueError(f"{len(starts)} starts but {len(keys)} keys")
        _check_spans(batch, starts, lengths)
        starts, lengths, keys, m = self._room_for(starts, lengths, keys, one_key)
        if not m:
            return 0
        n = self._n
        if batch is not self._pinned:
            self._pins.append(batch)
            self._pinned = batch
        if not n:
            self._first = (batch.view, starts[0], lengths[0], keys if one_key else keys[0])
        end = n + m
        base = batch._addr
        words = self._iov_words
        words[2 * n:2 * end:2] = array.array(_WORD, [base + start for start in starts])
        words[2 * n + 1:2 * end:2] = array.array(_WORD, lengths)
        if one_key:
            self._names[n * SOCKADDR_MAX:end * SOCKADDR_MAX] = _NAME.pack(keys) * m
        else:
            _names_struct(m).pack_into(self._names, n * SOCKADDR_MAX, *keys)
        self._n = end
        return m

    def _room_for(self, starts, lengths, keys, one_key):
        """Cut the lists to the room left, counting what is cut as drops."""
        m = len(starts)
        room = self.count - len(self)
        if m > room:
            self.drops[DROP_FULL] += m - room
            m = max(room, 0)
            starts = starts[:m]
            lengths = lengths[:m]
            if not one_key:
                keys = keys[:m]
        return starts, lengths, keys, m

    def add(self, data, key):
        """Queue a copy of the bytes-like `data` to peer key `key`.
        True if queued, False if the outbox or its arena was full (a counted drop)."""
        start = self._reserve(data, key)
        if start < 0:
            return False
        n = self._n
        length = self._arena_used - start
        if not n:
            self._first = (self._arena_view, start, length, key)
        _pack_iov(self._iovs, n * _IOV_SIZE, self._arena_addr + start, length)
        _pack_name(self._names, n * SOCKADDR_MAX, key)
        self._n = n + 1
        return True

    def room(self, length=0):
        """True if one more datagram fits: a slot, and `length` bytes of arena for add()
        (0 for add_from()).  Callers that must not drop flush when it is False."""
        return len(self) < self.count and self._arena_used + length <= len(self._arena)

    def _reserve(self, data, key):
        """Copy data into the arena; its start there, or -1 (a counted drop) if it is full."""
        if len(key) > SOCKADDR_MAX:
            raise ValueError(f"a peer key has at most {SOCKADDR_MAX} bytes, not {len(key)}")
        with memoryview(data) as raw, raw.cast("B") as octets:
            length = octets.nbytes
            start = self._arena_used
            if len(self) >= self.count or start + length > len(self._arena):
                self.drops[DROP_FULL] += 1
                return -1
            self._arena_view[start:start + length] = octets
        self._arena_used = start + length
        return start

    def flush(self, sock):
        """Send everything queued; return how many datagrams were sent.  One datagram goes
        by sendto() (cheaper than a sendmmsg() of one), more by sendmmsg()."""
        n = self._n
        if not n:
            return 0
        try:
            if n == 1:
                sent = self._send_one(sock, *self._first)
            else:
                sent = self._send_mmsg(sock, n)
        finally:
            self._n = 0
            self._first = None
            self._pins.clear()
            self._pinned = None
            self._arena_used = 0
        self.sent += sent
        return sent

    def _send_mmsg(self, sock, n):
        fd = sock.fileno()
        sent = 0
        retried = -1
        k = 0
        # Each pass sends at least one datagram, drops at least one, or retries datagram k
        # for the first and only time: at most 2 * n passes.
        while k < n:
            done = _sendmmsg(fd, self._hdrs_addr + k * _MMSG_SIZE, min(n - k, MAX_PER_CALL),
                             _SEND_FLAGS)
            if done > 0:
                k += done
                sent += done
                continue
            err = ctypes.get_errno()
            self.errors[err] += 1
            if err in _NO_ROOM:
                self.drops[err] += n - k
                break
            if retried != k:
                # A pending error (an ICMP about an earlier datagram) is reported once, on
                # whichever datagram comes next: give that datagram one more try.
                retried = k
                continue
            self.drops[err] += 1
            k += 1
        return sent

    def _send_one(self, sock, view, start, length, key):
        """sendto() one datagram: 1 if it was sent, else 0 (a counted drop)."""
        address = self._address(key)
        if address is None:
            return 0
        data = view[start:start + length]
        try:
            sock.sendto(data, _SEND_FLAGS, address)
            return 1
        except OSError as exc:
            return 0 if self._retry(sock, data, address, exc) else 1

    def _address(self, key):
        """The address tuple sendto() wants for a peer key (cached, bounded), or None and a
        counted drop when the key is no IPv4 or IPv6 address."""
        cache = self._addr_cache
        address = cache.get(key)
        if address is None:
            try:
                address = from_peer_key(key)[1]
            except ValueError:
                self.errors[errno.EINVAL] += 1
                self.drops[errno.EINVAL] += 1
                return None
            if len(cache) >= KEY_CACHE_MAX:
                cache.clear()
            cache[key] = address
        return address

    def _retry(self, sock, data, address, exc):
        """After a failed sendto(): count the error and, unless there is no room, try once
        more (the error may have been a pending one about an earlier datagram).
        0 if the datagram went out, else the errno it was dropped for."""
        err = exc.errno or errno.EIO
        self.errors[err] += 1
        if err not in _NO_ROOM:
            try:
                sock.sendto(data, _SEND_FLAGS, address)
                return 0
            except OSError as again:
                err = again.errno or errno.EIO
                self.errors[err] += 1
        self.drops[err] += 1
        return err


class _PortableOutbox(Outbox):
    """The same Outbox on a sendto() loop."""

    def __init__(self, count=MAX_PER_CALL, arena_size=DEFAULT_ARENA_SIZE, portable=None):
        super().__init__(count, arena_size, True)
        self._items = []        # (view, start, length, key)

    def __len__(self):
        return len(self._items)

    def add_from(self, batch, start, length, key):
        items = self._items
        if len(items) >= self.count:
            self.drops[DROP_FULL] += 1
            return False
        if start < 0 or length < 0 or start + length > len(batch.buf):
            raise ValueError(f"bytes {start}:{start + length} are outside the batch buffer")
        items.append((batch.view, start, length, key))
        return True

    def add_many_from(self, batch, starts, lengths, keys):
        one_key = isinstance(keys, bytes)
        if not one_key and len(keys) != len(starts):
            raise ValueError(f"{len(starts)} starts but {len(keys)} keys")
        _check_spans(batch, starts, lengths)
        starts, lengths, keys, m = self._room_for(starts, lengths, keys, one_key)
        if m:
            self._items.extend(zip(itertools.repeat(batch.view, m), starts, lengths,
                                   itertools.repeat(keys, m) if one_key else keys))
        return m

    def add(self, data, key):
        start = self._reserve(data, key)
        if start < 0:
            return False
        self._items.append((self._arena_view, start, self._arena_used - start, key))
        return True

    def flush(self, sock):
        items = self._items
        if not items:
            return 0
        sendto = sock.sendto
        cache = self._addr_cache
        sent = 0
        try:
            for k, (view, start, length, key) in enumerate(items):
                address = cache.get(key)
                if address is None:
                    address = self._address(key)
                    if address is None:
                        continue
                data = view[start:start + length]
                try:
                    sendto(data, _SEND_FLAGS, address)
                    sent += 1
                except OSError as exc:
                    err = self._retry(sock, data, address, exc)
                    if not err:
                        sent += 1
                    elif err in _NO_ROOM:
                        self.drops[err] += len(items) - k - 1
                        break
        finally:
            items.clear()
            self._arena_used = 0
        self.sent += sent
        return sent
