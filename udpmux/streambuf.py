"""One stream's bytes, both ways: the send buffer with what the peer acknowledged and
what must go again, the cutting of STREAM bodies, the reassembly of what arrives in
any order, and the checks of the peer's offsets against our grant and its final size.

Pure code on one Stream; what spans the session (stream ids, the session buffer and
grants, the order streams send in, events) is Connection's, in udpmux/stream.py.

Offsets count bytes from the stream's start::

    sending     sbase            snext                  sbase + len(sbuf)   swin
                |  sent, some    |  written, not sent   |                   |
       acked    |  acked (sacked)|                      |                   |
    ------------+--------------- +----------------------+-------------------+
                sbuf holds [sbase, sbase + len(sbuf)); retx: ranges to send again

    receiving   roff             rend         rmax                 rwin
       read     |  rbuf: in order|  ooo chunks |                   |  (our grant)
    ------------+----------------+-------------+-------------------+
"""

from bisect import bisect_right

from udpmux.rangeset import add_interval, skip_acked
from udpmux.streamproto import E_FINAL, E_FLOW, INITIAL_WINDOW, ProtocolError
from udpmux.wire import STREAM, STREAM_FIN

_STREAM_SIZE = STREAM.size


class Stream:
    """Both directions of one stream."""

    __slots__ = (
        "sid", "local",
        # sending: sbuf holds bytes [sbase, sbase + len(sbuf)); below sbase all acked
        "sbuf", "sbase", "snext", "swin", "sfinal", "fin_sent", "fin_acked", "fin_retx",
        "sacked", "retx",
        # receiving: rbuf holds in-order bytes [roff, rend); ooo_* out-of-order chunks
        "rbuf", "roff", "rend", "rmax", "rfinal", "ostarts", "odatas", "obytes",
        "rwin", "win_pending", "win_acked", "commit", "wsize", "granted_at", "eof_read",
        "acked_told",
        # resetting
        "reset_code", "reset_pending",
    )

    def __init__(self, sid, local, wsize):
        self.sid = sid
        self.local = local
        self.sbuf = bytearray()
        self.sbase = 0
        self.snext = 0              # every byte below has been sent at least once
        self.swin = INITIAL_WINDOW  # the peer's grant
        self.sfinal = None          # set by finish(): the offset of FIN
        self.fin_sent = False
        self.fin_acked = False
        self.fin_retx = False       # a message with FIN was lost
        self.sacked = []            # [start, end) acknowledged above sbase, sorted
        self.retx = []              # [start, end) to send again, sorted, merged
        self.rbuf = bytearray()
        self.roff = 0               # read() position
        self.rend = 0               # the next in-order offset expected
        self.rmax = 0               # the highest offset received
        self.rfinal = None          # the peer's FIN offset, once known
        self.ostarts = []           # out-of-order chunks: starts, sorted ...
        self.odatas = []            # ... and their bytes (never overlapping)
        self.obytes = 0
        self.rwin = INITIAL_WINDOW  # our grant to the peer
        self.win_pending = False    # a WINDOW with rwin is to be sent
        self.win_acked = 0
        self.commit = 0             # our share of Connection.committed
        self.wsize = wsize          # how far past the reads we grant, at most
        self.granted_at = None      # when the last grant went out, by the engine clock
        self.eof_read = False       # the application read up to rfinal
        self.acked_told = False     # EV_ACKED was given
        self.reset_code = None      # we reset the stream with this code
        self.reset_pending = False  # a RESET is to be sent

    def send_done(self):
        """Every byte written and FIN acknowledged."""
        return self.fin_acked and self.sbase == self.sfinal

    def has_to_send(self):
        if self.reset_code is not None:
            return False
        if self.retx or self.fin_retx:
            return True
        limit = self.sbase + len(self.sbuf)
        if self.swin < limit:
            limit = self.swin
        if self.snext < limit:
            return True
        return self.sfinal is not None and not self.fin_sent and self.snext == self.sfinal

    def drop_buffers(self):
        """Forget every byte held either way (a reset, or the stream is over)."""
        self.sbuf = bytearray()
        self.retx = []
        self.sacked = []
        self.rbuf = bytearray()
        self.ostarts = []
        self.odatas = []
        self.obytes = 0

    # ------------------------------------------------------------------ sending

    def cut(self, mss):
        """The next STREAM body, at most mss bytes of the stream: lost bytes first, then
        new ones within the peer's grant, or a lone FIN.  (body, info) with info =
        (offset, end, fin, retransmission), or None when there is nothing to send."""
        sbase = self.sbase
        retx = self.retx
        while retx:
            r = retx[0]
            s, e = r
            if s < sbase:
                s = sbase
            s, stop = skip_acked(self.sacked, s, e)
            if s >= e:
                retx.pop(0)
                continue
            end = s + mss
            if end >= stop:
                end = stop
            if end >= e:
                retx.pop(0)
            else:
                r[0] = end
            fin = self.sfinal is not None and end == self.sfinal and not self.fin_acked
            if fin:
                self.fin_retx = False
                self.fin_sent = True
            return (STREAM.pack(s, STREAM_FIN if fin else 0) + self.sbuf[s - sbase:end - sbase],
                    (s, end, fin, True))
        snext = self.snext
        limit = sbase + len(self.sbuf)
        if self.swin < limit:
            limit = self.swin
        if snext < limit:
            end = snext + mss
            if end > limit:
                end = limit
            self.snext = end
            fin = self.sfinal is not None and end == self.sfinal
            if fin:
                self.fin_sent = True
                self.fin_retx = False
            return (STREAM.pack(snext, STREAM_FIN if fin else 0)
                    + self.sbuf[snext - sbase:end - sbase], (snext, end, fin, False))
        if self.sfinal is not None and snext == self.sfinal and \
                ((not self.fin_sent) or self.fin_retx) and not self.fin_acked:
            self.fin_sent = True
            self.fin_retx = False
            return STREAM.pack(snext, STREAM_FIN), (snext, snext, True, False)
        self.fin_retx = False
        return None

    def acked(self, off, end, fin):
        """Bytes [off, end) (and FIN) reached the peer.  Returns how many bytes left
        the send buffer (those below the first hole)."""
        if fin:
            self.fin_acked = True
            self.fin_retx = False
        base = self.sbase
        if end > base:
            if off <= base:
                sacked = self.sacked
                while sacked and sacked[0][0] <= end:
                    e = sacked.pop(0)[1]
                    if e > end:
                        end = e
                del self.sbuf[:end - base]
                self.sbase = end
                return end - base
            add_interval(self.sacked, off, end)
        return 0

    def requeue(self, off, end, fin):
        """Bytes [off, end) (and FIN) must be sent again; True when the stream has
        something to send again."""
        if off < self.sbase:
            off = self.sbase
        if end > off:
            add_interval(self.retx, off, end)
        if fin and not self.fin_acked:
            self.fin_retx = True
        return bool(self.retx or self.fin_retx)

    # ------------------------------------------------------------------ receiving

    def receive(self, off, end, fin, body):
        """Bytes [off, end) of a STREAM body (they follow its header), with FIN or
        not.  Keeps them in order in rbuf (with the chunks they make contiguous), or as
        an out-of-order chunk.  Returns how many were already there, or None when the
        stream takes no more bytes (reset by us, or read to its end).  Raises
        ProtocolError (E_FLOW, E_FINAL) for bytes beyond our grant or the final size."""
        if end > self.rwin:
            raise ProtocolError(E_FLOW)
        rfinal = self.rfinal
        if fin:
            if (rfinal is not None and rfinal != end) or self.rmax > end:
                raise ProtocolError(E_FINAL)
        elif rfinal is not None and end > rfinal:
            raise ProtocolError(E_FINAL)
        if end > self.rmax:
            self.rmax = end
        if self.reset_code is not None or self.eof_read:
            return None
        rend = self.rend
        if end <= rend:
            return end - off
        if off > rend:
            return self._insert_ooo(off, end, body)
        self.rbuf += memoryview(body)[_STREAM_SIZE + rend - off:]
        rend = end
        starts = self.ostarts
        if starts and starts[0] <= rend:
            datas = self.odatas
            while starts and starts[0] <= rend:
                s = starts.pop(0)
                d = datas.pop(0)
                self.obytes -= len(d)
                e = s + len(d)
                if e > rend:
                    self.rbuf += d[rend - s:]
                    rend = e
        self.rend = rend
        return 0

    def _insert_ooo(self, s, e, body):
        starts = self.ostarts
        datas = self.odatas
        base = s - _STREAM_SIZE                 # body offset of stream offset 0 is -base
        i = bisect_right(starts, s)
        if i:
            ps = starts[i - 1]
            pe = ps + len(datas[i - 1])
            if pe >= e:
                return e - s
            if pe > s:
                s = pe
        while i < len(starts) and starts[i] < e:
            ns = starts[i]
            ne = ns + len(datas[i])
            if ne <= e:
                del starts[i]
                self.obytes -= len(datas.pop(i))
            else:
                e = ns
                break
        if s >= e:
            return 0
        d = bytes(memoryview(body)[s - base:e - base])
        starts.insert(i, s)
        datas.insert(i, d)
        self.obytes += len(d)
        return 0

    def read(self, max_bytes):
        """At most max_bytes in-order bytes (rbuf must not be empty)."""
        rbuf = self.rbuf
        if max_bytes >= len(rbuf):
            data = bytes(rbuf)
            rbuf.clear()
        else:
            data = bytes(rbuf[:max_bytes])
            del rbuf[:max_bytes]
        self.roff += len(data)
        return data
