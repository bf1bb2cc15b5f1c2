"""Ranges of numbers for the stream engine: the nonces received, the ACK body that
reports them, and intervals of a stream's bytes.

  ReceivedRanges   the nonces received, as ranges newest first, and when the largest
                   came: what the next ACK says (ack_body())
  parse_ack()      an ACK body's fixed part, and ack_ranges() its ranges, checked
  add_interval()   sorted, disjoint [start, end) intervals of stream bytes (acknowledged
  skip_acked()     above a stream's base, or to send again), merged as they grow

An ACK body (udpmux/wire.py draws the header before it)::

     0               1               2               3
     0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
    +---------------------------------------------------------------+
  0 |                                                               |
    +              largest: the largest nonce received              +
  4 |                                                               |
    +---------------------------------------------------------------+
  8 |                delay: us the ACK was held (u32)               |
    +---------------------------------------------------------------+
 12 |           first: nonces received just below largest           |
    +---------------+-----------------------------------------------+
 16 |     count     |  count x (gap u32, length u32), downwards ...
    +---------------+-----------------------------------------------+

The top range is largest - first .. largest; below it each pair says: gap nonces not
received (>= 1), then length nonces received (>= 1).  An ACK carries at most
MAX_ACK_RANGES pairs; a range below the top one is reported in ACK_REPEAT ACKs after
it last changed, then forgotten: the peer has most likely heard of it, and if not it
only sends those bytes again.  At most MAX_ACK_RANGES + 1 ranges are kept.

Pure code: no sockets, no clock (the caller passes `now`).
"""

from bisect import bisect_left, bisect_right

from udpmux.streamproto import E_ACK_RANGE, E_LENGTH, U32, ProtocolError
from udpmux.wire import ACK, ACK_RANGE

MAX_ACK_RANGES = 32             # (gap, length) pairs an ACK carries at most
ACK_REPEAT = 3                  # ACKs that report a range below the top one
KEEP_RANGES = MAX_ACK_RANGES + 1

ACK_SIZE = ACK.size
RANGE_SIZE = ACK_RANGE.size

# how ReceivedRanges.add() found a nonce
IN_ORDER, OUT_OF_ORDER, DUPLICATE = 0, 1, 2


class ReceivedRanges:
    """The nonces received.  .ranges holds [lo, hi, reported] lists, newest (highest)
    first, never touching; `reported` counts the ACKs that reported a range below the
    top one since it last changed.  .largest_time is when the largest nonce came."""

    __slots__ = ("ranges", "largest_time")

    def __init__(self):
        self.ranges = []
        self.largest_time = 0.0

    def __len__(self):
        return len(self.ranges)

    def __bool__(self):
        return bool(self.ranges)

    def largest(self):
        """The largest nonce received, or None."""
        return self.ranges[0][1] if self.ranges else None

    def add(self, n, now):
        """Nonce n came at `now`: IN_ORDER (it extends the top range), OUT_OF_ORDER (it
        opens or fills a gap), or DUPLICATE (already there, 0, or too old to tell)."""
        rr = self.ranges
        if rr:
            top = rr[0]
            hi = top[1]
            if n == hi + 1:
                top[1] = n
                self.largest_time = now
                return IN_ORDER
            if n > hi:
                rr.insert(0, [n, n, 0])
                if len(rr) > KEEP_RANGES:
                    rr.pop()
                self.largest_time = now
                return OUT_OF_ORDER
        elif n > 0:
            rr.append([n, n, 0])
            self.largest_time = now
            return IN_ORDER if n == 1 else OUT_OF_ORDER
        else:
            return DUPLICATE
        for i, r in enumerate(rr):
            if n > r[1]:
                above = rr[i - 1]           # n is in the gap between r and the range above
                if n == r[1] + 1:
                    if above[0] == n + 1:
                        above[0] = r[0]
                        above[2] = 0
                        del rr[i]
                    else:
                        r[1] = n
                        r[2] = 0
                elif above[0] == n + 1:
                    above[0] = n
                    above[2] = 0
                else:
                    rr.insert(i, [n, n, 0])
                    if len(rr) > KEEP_RANGES:
                        rr.pop()
                return OUT_OF_ORDER
            if n >= r[0]:
                return DUPLICATE
        last = rr[-1]
        if n < 1:
            return DUPLICATE
        if n == last[0] - 1:
            last[0] = n
            last[2] = 0
        elif len(rr) < KEEP_RANGES:
            rr.append([n, n, 0])
        return OUT_OF_ORDER

    def ack_body(self, now):
        """The body of an ACK of the nonces received (at least one), held since the
        largest came.  Counts a report of each range below the top one, and forgets
        those reported ACK_REPEAT times."""
        rr = self.ranges
        top = rr[0]
        lo, largest = top[0], top[1]
        first = largest - lo
        if first > U32:
            first = U32
            lo = largest - first
        delay = int((now - self.largest_time) * 1e6)
        if delay < 0:
            delay = 0
        elif delay > U32:
            delay = U32
        if len(rr) == 1:
            return ACK.pack(largest, delay, first, 0)
        parts = []
        keep = [top]
        prev = lo
        for k in range(1, len(rr)):
            r = rr[k]
            if len(parts) >= MAX_ACK_RANGES:
                keep.append(r)
                continue
            gap = prev - r[1] - 1
            length = r[1] - r[0] + 1
            if gap > U32 or length > U32:
                continue
            parts.append(ACK_RANGE.pack(gap, length))
            prev = r[0]
            r[2] += 1
            if r[2] < ACK_REPEAT:
                keep.append(r)
        self.ranges = keep
        return ACK.pack(largest, delay, first, len(parts)) + b"".join(parts)


def parse_ack(body):
    """(largest, delay in us, first, count) of an ACK body whose size fits its count.
    Raises ProtocolError(E_LENGTH)."""
    size = len(body)
    if size < ACK_SIZE:
        raise ProtocolError(E_LENGTH)
    fields = ACK.unpack_from(body)
    if size != ACK_SIZE + fields[3] * RANGE_SIZE:
        raise ProtocolError(E_LENGTH)
    return fields


def ack_ranges(body, largest, first, count):
    """The nonces an ACK body acknowledges, as (lo, hi) pairs, highest first (what
    parse_ack() gave, then the count pairs after it).  Raises ProtocolError(E_ACK_RANGE)
    for a range that reaches below nonce 1, or a gap or length of 0."""
    lo = largest - first
    if lo < 1:
        raise ProtocolError(E_ACK_RANGE)
    ranges = [(lo, largest)]
    pos = ACK_SIZE
    for _ in range(count):
        gap, length = ACK_RANGE.unpack_from(body, pos)
        pos += RANGE_SIZE
        hi = lo - gap - 1
        lo = hi - length + 1
        if not gap or not length or lo < 1:
            raise ProtocolError(E_ACK_RANGE)
        ranges.append((lo, hi))
    return ranges


def add_interval(intervals, s, e):
    """Add [s, e) to a sorted list of disjoint [start, end) lists, merging."""
    if not intervals or intervals[-1][1] < s:
        intervals.append([s, e])
        return
    i = bisect_left(intervals, [s])
    if i and intervals[i - 1][1] >= s:
        i -= 1
    j = i
    while j < len(intervals) and intervals[j][0] <= e:
        s = min(s, intervals[j][0])
        e = max(e, intervals[j][1])
        j += 1
    intervals[i:j] = [[s, e]]


def skip_acked(intervals, s, e):
    """(s moved past the interval holding it, the end of the run from s to e that no
    interval covers): the next bytes of [s, e) still to send."""
    if not intervals:
        return s, e
    i = bisect_right(intervals, [s, float("inf")])
    if i and intervals[i - 1][1] > s:
        s = intervals[i - 1][1]
    while i < len(intervals) and intervals[i][1] <= s:
        i += 1
    if i < len(intervals) and intervals[i][0] < e:
        return s, max(s, intervals[i][0])
    return s, e
