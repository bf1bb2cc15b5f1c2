"""The reliable-stream engine of `udpmux link`: streams, acknowledgements, loss
recovery and congestion control over a session's messages, as QUIC does it
(RFC 9000 streams, RFC 9002 loss detection and NewReno), adapted to udpmux.

Pure code: no sockets, no clock.  The caller passes `now` (seconds, any monotonic
origin) and moves messages between the engine and a Session::

    application                    Connection                          network
    -----------                    ----------                          -------
    open_stream() write()  --->  send buffers (per stream,     messages_to_send(now)
    finish() reset()             bounded), lost bytes   ---->  [Outgoing(STREAM|WINDOW|
                                 congestion window              RESET|ACK, tag, body, ..)]
                                                                   |  caller: Session.seal()
                                                                   |  gives the nonce; send
                                 sent records by nonce  <---- on_sent(nonce, message, now)
    read() at_eof()  <-----      reassembly (per stream, <---- on_message(nonce, type, tag,
    streams_ready()              bounded by the grant)          body, now)  (after
                                 nonces received -> ACK         Session.open() accepted it)
                                 RTT, loss, PTO timers  <---- on_timer(now) when
                                                               next_timer(now) seconds passed

Two agents, each with a Connection for their session:

    client                                                    server
    open_stream() -> 1
       WINDOW tag=1 (1 MiB)      ------------------------>    streams_ready(): (new, 1)
       STREAM tag=1 off=0 "..."  ------------------------>    read(1)
                                 <------------------------    ACK largest=2 first=1
                                 <------------------------    WINDOW tag=1 (1 MiB)
                                 <------------------------    STREAM tag=1 off=0 "..."
       ACK largest=3 first=2     ------------------------>
    finish(1)
       STREAM tag=1 off=N FIN    ------------------------>    read(1) ... at_eof(1)
                                 <------------------------    ACK  -> (acked, 1) at the client
    (a lost message's bytes go out again in a new STREAM with a new nonce)

Packet numbers are the session's nonces: every message a side sends has a new, larger
nonce, and the peer acknowledges nonces (ACK: the largest, the ones just below it, then
at most MAX_ACK_RANGES (gap, length) ranges downwards; a range below the top one is
reported ACK_REPEAT times, then forgotten).  A receiver acknowledges every ack_every-th
ack-eliciting message, and at once on a gap, on bytes out of order, on FIN, WINDOW and
RESET; otherwise within MAX_ACK_DELAY.  A batch of at least 2 x ack_every of them gets
the ACK twice, so that one lost ACK does not leave a small window waiting for the PTO.
Lost bytes are sent again in a new message with a new nonce, never as "the same
packet", so every RTT sample is unambiguous.  ACK messages elicit no ACK and do not
count in flight; STREAM, WINDOW and RESET do.

Streams are named by the message tag.  The client opens odd ids (1, 3, 5, ...), the
server even ones (2, 4, ...), in increasing order; an end learns of a peer's stream from
its first STREAM or WINDOW (open_stream() sends a WINDOW at once, so the peer learns of a
stream before its first byte; ids skipped by reordering are remembered).  Each direction
ends with FIN: the writer is done when every byte and FIN are acknowledged (EV_ACKED),
the reader when it has read every byte before FIN (at_eof()).  A stream is forgotten
once both directions are done.  RESET abandons both directions at once; it is sent
until acknowledged and the peer gets EV_RESET with its code.  A peer beyond max_streams
open streams gets RESET(RESET_REFUSED).

Flow control: before any WINDOW a sender may write INITIAL_WINDOW bytes of a stream;
the receiver grants more with WINDOW(max offset) as its application reads, up to
stream_window past the reads (less when many streams share session_buffer), and grants
beyond INITIAL_WINDOW only while the session's grants stay within session_buffer: the
bytes a receiver holds are at most session_buffer + INITIAL_WINDOW per open stream
(defaults: 16 MiB + 256 x 64 KiB).  Bytes beyond the grant are a protocol error.
write() takes at most send_buffer bytes per stream and session_buffer in all.

Loss detection and congestion control follow RFC 9002: a message is lost when one sent
PACKET_THRESHOLD ack-eliciting messages later is acknowledged, or when it is older than
9/8 of the RTT (at least GRANULARITY) and something later was acknowledged; RTT as
RFC 9002 section 5 (smoothed, variation, minimum, the peer's ACK delay); a probe timeout
(PTO) with exponential backoff capped at max_pto sends PROBES messages whatever the
window; NewReno with one reduction per recovery period and persistent congestion.  At
PTO_LOST_AFTER PTOs in a row, what was in flight before the previous PTO is declared
lost, which bounds the records kept through a long blackout.  The engine never gives up:
after a blackout or a laptop's sleep data flows again within max_pto of the path coming
back.  The application decides when the peer is unreachable, from unreachable_for(now)
(and last_received, for a session with nothing in flight).

The caller's contract:
  * on_message() for every message of the session that Session.open() accepted,
    whatever its type (the engine acts on STREAM, ACK, WINDOW, RESET and only records
    the nonce of the others, so that its ACK ranges stay contiguous).  ProtocolError
    (.reason one of PROTOCOL_ERRORS) means the peer sent nonsense: end the session.
  * After a batch of on_message(), on_timer(), or application calls, call
    messages_to_send(now) and send what it returns, in order; for each call
    on_sent(nonce, message, now) with the nonce Session.seal() gave it (even when the
    kernel refused to send it: it will be found lost), or on_not_sent(message) if it was
    never sealed.  Call on_sent(nonce, None, now) for the session's other messages
    (KEEPALIVE, DATA) too, so that an ACK of their nonce is not an ACK of a nonce never
    sent.  When messages_to_send() returned `limit` messages, call it again.
  * Call on_timer(now) when next_timer(now) seconds have passed (None: no timer), then
    messages_to_send(now).
  * Act on streams_ready() (EV_NEW, EV_READABLE, EV_WRITABLE, EV_ACKED, EV_RESET) and
    exit cleanly only when all_acknowledged(); an EV_RESET means bytes were abandoned.

How we name things:
  sid        a stream's id: the tag of its messages
  record     what the engine remembers of an ack-eliciting message it sent
  in flight  sent, ack-eliciting, neither acknowledged nor declared lost
  grant      the offset up to which the peer may send on a stream (WINDOW)
  commit     bytes a receiver promised to hold: its grants, less what was read
  probe      an ack-eliciting message sent when the PTO fires, whatever the window
"""

from bisect import bisect_left, bisect_right
from collections import namedtuple

from udpmux.wire import (
    ACK, ACK_RANGE, HEADER_SIZE, MAC_SIZE, REASON, STREAM, STREAM_FIN, T_ACK, T_RESET,
    T_STREAM, T_WINDOW, WINDOW,
)

# -- protocol constants (both ends must agree on these)
INITIAL_WINDOW = 65536          # bytes a sender may write on a stream before any WINDOW
MAX_ACK_RANGES = 32             # (gap, length) pairs an ACK carries at most
ACK_REPEAT = 3                  # ACKs that report a range below the top one
MAX_ACK_DELAY = 0.005           # seconds a receiver may hold an ACK (the PTO counts on it)
MAX_OFFSET = (1 << 62) - 1      # no stream is longer than this
U32 = 0xFFFFFFFF

# -- loss detection (RFC 9002 section 6)
PACKET_THRESHOLD = 3
TIME_THRESHOLD = 9 / 8
GRANULARITY = 0.001
INITIAL_RTT = 0.333
MAX_RTT_SAMPLE = 30.0           # a longer sample is a sleep, not a path: ignored
PERSISTENT_CONGESTION = 3       # PTO periods of loss in a row: back to the minimum window
PTO_LOST_AFTER = 3              # at this many PTOs in a row, what was in flight before
                                # the previous PTO is declared lost (keeps records bounded)
PROBES = 2                      # messages sent when the PTO fires
TIMER_SLACK = 1e-6              # a timer this close to its deadline is due (float rounding)

# -- congestion control (RFC 9002 section 7, NewReno)
INITIAL_PACKETS = 10
MINIMUM_PACKETS = 2

# -- reset reasons the engine itself uses; the application may use any u8
RESET_CANCEL = 0                # the application abandoned the stream
RESET_REFUSED = 1               # the receiver has max_streams of the sender's open

# -- events (see Connection.streams_ready)
EV_NEW = "new"                  # the peer opened this stream
EV_READABLE = "readable"        # read() has bytes, or at_eof() became true
EV_WRITABLE = "writable"        # write() was short or refused; there is room again
EV_ACKED = "acked"              # every byte written and FIN acknowledged by the peer
EV_RESET = "reset"              # the peer reset the stream (or refused it); .code says why

# -- protocol errors: what the peer did wrong; the caller ends the session and counts it
E_LENGTH = "bad-length"         # a body whose size does not fit its type (ACK: its count)
E_TAG = "bad-tag"               # tag 0 on STREAM/WINDOW/RESET, or a tag on an ACK
E_FLAGS = "bad-flags"           # STREAM flags other than FIN
E_ACK_UNSENT = "ack-unsent"     # an ACK of a nonce this end never used
E_ACK_RANGE = "ack-range"       # an ACK range below nonce 1, or a gap or length of 0
E_FLOW = "flow-control"         # stream bytes beyond the granted window
E_FINAL = "final-size"          # FIN at an offset other than an earlier FIN or the data
E_STREAM_ID = "stream-id"       # a stream id the peer may not use (ours, never opened;
                                # or one skipping more than max_streams ids at once)
E_STREAMS = "stream-limit"      # more streams than max_streams + REFUSED_MAX open at once
PROTOCOL_ERRORS = (E_LENGTH, E_TAG, E_FLAGS, E_ACK_UNSENT, E_ACK_RANGE, E_FLOW, E_FINAL,
                   E_STREAM_ID, E_STREAMS)

_STREAM_SIZE = STREAM.size
_ACK_SIZE = ACK.size
_RANGE_SIZE = ACK_RANGE.size
_WINDOW_SIZE = WINDOW.size
_REASON_SIZE = REASON.size
_KEEP_RANGES = MAX_ACK_RANGES + 1
REFUSED_MAX = 64                # refused stream ids whose RESET awaits an ACK

# A sent record is a list (cheaper than an object): these are its fields.  INFO is the
# Outgoing's info: (offset, end, fin, retransmission) of a STREAM, (value,) of a WINDOW,
# (code,) of a RESET.
_NONCE, _SEQ, _TIME, _SIZE, _TYPE, _SID, _INFO, _STATE = range(8)
_IN_FLIGHT, _ACKED, _LOST = 0, 1, 2


class ProtocolError(Exception):
    """The peer broke the stream protocol; .reason is one of PROTOCOL_ERRORS."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class StreamClosed(Exception):
    """write() or finish() on a stream that can take no more bytes: unknown, already
    finished, or reset (by either end)."""


Outgoing = namedtuple("Outgoing", "mtype tag body ack_eliciting size info")
Outgoing.__doc__ = """A message for the caller to seal and send: mtype, tag and body go to
Session.seal(); ack_eliciting and size (the whole message, header and MAC included)
are for the caller's information; info is the engine's and must be left alone."""

_out = tuple.__new__             # _out(Outgoing, (...)): no keyword handling, faster

Event = namedtuple("Event", "kind sid code")
Event.__doc__ = """Something the application may act on: kind is one of the EV_*
constants, sid the stream, code the reason of a reset (None for other kinds)."""


class Stream:
    """Both directions of one stream.  Offsets count bytes from the stream's start."""

    __slots__ = (
        "sid", "local",
        # sending: sbuf holds bytes [sbase, sbase + len(sbuf)); below sbase all acked
        "sbuf", "sbase", "snext", "swin", "sfinal", "fin_sent", "fin_acked", "fin_retx",
        "sacked", "retx",
        # receiving: rbuf holds in-order bytes [roff, rend); ooo_* out-of-order chunks
        "rbuf", "roff", "rend", "rmax", "rfinal", "ostarts", "odatas", "obytes",
        "rwin", "win_pending", "win_acked", "commit", "eof_read", "acked_told",
        # resetting
        "reset_code", "reset_pending",
    )

    def __init__(self, sid, local):
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


class Connection:
    """One session's streams: see the module docstring for the contract.

    Settings:
      client          True at the end that sent HELLO: it opens odd stream ids
      max_message     the largest whole message (header, body, MAC) to send; 1232 fits
                      a 1280-byte IPv6 path (1280 - 40 IPv6 - 8 UDP)
      stream_window   how far ahead of the application's reads a peer may send on a stream
      session_buffer  bytes granted in all streams at most; also the most bytes write()
                      takes in all streams
      send_buffer     bytes write() takes per stream, sent or not, until acknowledged
                      (default: stream_window)
      max_streams     the peer's streams open at once; more are refused with RESET
      initial_rtt     the RTT assumed before the first sample (e.g. the handshake's)
      max_pto         the most seconds between probes, however long the backoff
      ack_every       ack-eliciting messages received before an ACK goes out at once
      overhead        header and MAC bytes of a message
    """

    def __init__(self, client, max_message=1232, stream_window=1 << 20,
                 session_buffer=16 << 20, send_buffer=None, max_streams=256,
                 initial_rtt=INITIAL_RTT, max_pto=1.0, ack_every=2,
                 max_ack_delay=MAX_ACK_DELAY, overhead=HEADER_SIZE + MAC_SIZE):
        self.client = client
        self.max_message = max_message
        self.overhead = overhead
        self.mss = max_message - overhead - _STREAM_SIZE
        if self.mss < 1:
            raise ValueError("max_message leaves no room for stream bytes")
        self.stream_window = max(stream_window, 1)
        self.session_buffer = session_buffer
        self.send_buffer = stream_window if send_buffer is None else send_buffer
        self.max_streams = max_streams
        self.max_pto = max_pto
        self.ack_every = max(1, ack_every)
        self.max_ack_delay = max_ack_delay

        self._streams = {}
        self._next_local = 1 if client else 2
        self._peer_next = 2 if client else 1        # the lowest peer id not yet seen
        self._peer_skipped = set()                  # peer ids below _peer_next not yet seen
        self._peer_open = 0                         # peer-opened streams in _streams
        self._refused = {}                          # sid -> reset pending (bool)
        self._sendable = {}                         # sids with bytes or FIN to send (ordered)
        self._control = {}                          # sids with a WINDOW or RESET to send
        self._starved = {}                          # sids waiting for session buffer to grant
        self._write_blocked = {}                    # sids whose write() was short
        self._events = {}                           # (kind, sid) -> Event, in order
        self.committed = 0                          # sum of the streams' commits
        self.send_buffered = 0                      # sum of len(sbuf)

        # receiving: nonce ranges [lo, hi], newest first, for ACKs
        self._rr = []
        self._largest_recv_time = 0.0
        self._ae_unacked = 0                        # ack-eliciting received since the last ACK
        self._ack_now = False
        self._ack_deadline = None
        self.last_received = None                   # when on_message() was last called

        # sending: records of ack-eliciting messages, in nonce order
        self._recs = []
        self._nonces = []
        self._head = 0                              # records before it are done with
        self._seq = 0                               # ordinal of ack-eliciting messages sent
        self._max_sent = 0                          # the largest nonce used
        self._inflight = 0                          # records in flight
        self._planned = 0                           # bytes returned, not yet on_sent()
        self._largest_acked = 0                     # nonce and ...
        self._largest_acked_seq = 0                 # ... seq of the largest acked record
        self._last_ae_sent = 0.0
        self._loss_time = None
        self._probes = 0
        self._last_pto = None
        self._last_progress = None                  # when an ACK last acked something new
        self._loss_run = None                       # [first, last sent, declared] lost in a row
        self._acked_sent_max = 0.0                  # the latest send time of an acked record
        self._waiting_since = None                  # when the first unacked message was sent
        self._first_sample_time = None

        # RTT (RFC 9002 section 5)
        self.srtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self._pto_base = 0.0
        self._set_pto_base()
        self.min_rtt = None
        self.latest_rtt = 0.0
        self._has_sample = False

        # congestion control
        self.max_datagram = max_message
        self.min_window = MINIMUM_PACKETS * max_message
        self.cwnd = float(min(INITIAL_PACKETS * max_message, max(14720, 2 * max_message)))
        self.max_cwnd = max(session_buffer, 4 * self.min_window)
        self.ssthresh = float("inf")
        self.bytes_in_flight = 0
        self._recovery_start = None
        self._cwnd_limited = False
        self.pto_count = 0

        self.counts = dict.fromkeys((
            "messages_sent", "stream_bytes_sent", "bytes_retransmitted",
            "messages_retransmitted", "messages_lost", "acks_sent", "acks_received",
            "ptos", "probes_sent", "congestion_events", "persistent_congestion",
            "resets_sent", "resets_received", "streams_refused", "stream_bytes_received",
            "duplicate_bytes_received"), 0)

    # ------------------------------------------------------------------ application

    def open_stream(self):
        """A new stream of ours; the peer learns of it at once (a WINDOW goes out).
        Raises StreamClosed when max_streams of ours are open (the peer, with the same
        setting, would refuse another with RESET(RESET_REFUSED)), or the session has
        used up its ids (2**31 streams)."""
        sid = self._next_local
        if sid > U32 or len(self._streams) - self._peer_open >= self.max_streams:
            raise StreamClosed(sid)
        self._next_local = sid + 2
        st = self._streams[sid] = Stream(sid, True)
        self._commit(st, INITIAL_WINDOW)
        st.win_pending = True
        self._grant(st)
        self._control[sid] = None
        return sid

    def write(self, sid, data):
        """Take as many of `data`'s bytes as the send buffers hold; returns how many
        (0 when full: EV_WRITABLE says when there is room again)."""
        st = self._streams.get(sid)
        if st is None or st.sfinal is not None or st.reset_code is not None:
            raise StreamClosed(sid)
        room = min(self.send_buffer - len(st.sbuf), self.session_buffer - self.send_buffered)
        n = len(data)
        if n > room:
            n = max(room, 0)
            self._write_blocked[sid] = None
        if n:
            st.sbuf += data[:n] if n < len(data) else data
            self.send_buffered += n
            if st.snext < st.swin:
                self._sendable[sid] = None
        return n

    def send_space(self, sid):
        """The bytes write() would take now (0 for a stream that takes no more)."""
        st = self._streams.get(sid)
        if st is None or st.sfinal is not None or st.reset_code is not None:
            return 0
        return max(0, min(self.send_buffer - len(st.sbuf),
                          self.session_buffer - self.send_buffered))

    def finish(self, sid):
        """No more writes: FIN follows the last byte written.  Nothing happens on a
        stream that is gone (reset, or unknown) or already finished."""
        st = self._streams.get(sid)
        if st is None or st.reset_code is not None:
            return
        if st.sfinal is None:
            st.sfinal = st.sbase + len(st.sbuf)
            self._sendable[sid] = None

    def read(self, sid, max_bytes=65536):
        """In-order bytes of the stream, at most max_bytes; b"" if none (yet)."""
        st = self._streams.get(sid)
        if st is None or not st.rbuf:
            if st is not None and st.rfinal == st.roff and not st.eof_read:
                self._eof_read(st)
            return b""
        rbuf = st.rbuf
        if max_bytes >= len(rbuf):
            data = bytes(rbuf)
            rbuf.clear()
        else:
            data = bytes(rbuf[:max_bytes])
            del rbuf[:max_bytes]
        st.roff += len(data)
        if st.rfinal is None:
            window = self._window()
            if st.roff + window - st.rwin >= (window + 1) // 2:
                self._grant(st)
            else:
                self._commit(st, st.rwin - st.roff)
        else:
            self._commit(st, st.rfinal - st.roff)
            if st.roff == st.rfinal:
                self._eof_read(st)
        if self._starved:
            self._feed_starved()
        return data

    def readable_bytes(self, sid):
        st = self._streams.get(sid)
        return len(st.rbuf) if st is not None else 0

    def at_eof(self, sid):
        """True when no more bytes will come: the peer's FIN and every byte before it
        read, or the stream reset, or unknown (forgotten once both directions ended)."""
        st = self._streams.get(sid)
        if st is None or st.reset_code is not None:
            return True
        return st.rfinal is not None and st.roff == st.rfinal

    def reset(self, sid, code=RESET_CANCEL):
        """Abandon both directions of the stream; the peer gets RESET with `code`."""
        st = self._streams.get(sid)
        if st is None or st.reset_code is not None:
            return
        st.reset_code = code & 0xFF
        st.reset_pending = True
        self._drop_buffers(st)
        self._control[sid] = None
        self.counts["resets_sent"] += 1

    def streams_ready(self):
        """The events since the last call, oldest first, each (kind, sid) at most once:
        a list of Event(kind, sid, code)."""
        if not self._events:
            return []
        events = list(self._events.values())
        self._events.clear()
        return events

    def all_acknowledged(self):
        """True when every byte written on every stream, every FIN and every RESET of
        ours has been acknowledged (streams the peer reset are not counted: their
        EV_RESET said that their bytes were abandoned)."""
        for st in self._streams.values():
            if st.reset_code is not None:
                return False        # a stream we reset stays until its RESET is acked
            if st.sbuf or (st.sfinal is not None and not st.fin_acked):
                return False
        return True

    def stream_ids(self):
        return list(self._streams)

    def unreachable_for(self, now):
        """Seconds this end has been waiting for the peer to acknowledge anything new
        (0.0 when everything it sent was acknowledged).  The engine never gives up by
        itself: the application compares this to its own limit."""
        since = self._waiting_since
        if since is None:
            return 0.0
        if self._last_progress is not None and self._last_progress > since:
            since = self._last_progress
        return max(0.0, now - since)

    def stats(self):
        """A snapshot of the engine's figures and counters."""
        out = dict(self.counts)
        out.update(srtt=self.srtt, rttvar=self.rttvar, min_rtt=self.min_rtt,
                   latest_rtt=self.latest_rtt, cwnd=int(self.cwnd),
                   ssthresh=None if self.ssthresh == float("inf") else int(self.ssthresh),
                   bytes_in_flight=self.bytes_in_flight, pto_count=self.pto_count,
                   streams=len(self._streams), committed=self.committed,
                   send_buffered=self.send_buffered)
        return out

    # ------------------------------------------------------------------ network: input

    def on_message(self, nonce, mtype, tag, body, now):
        """An authenticated message from the peer.  Raises ProtocolError."""
        self.last_received = now
        rr = self._rr
        if rr and nonce == rr[0][1] + 1:
            rr[0][1] = nonce
            self._largest_recv_time = now
            order = 0
        else:
            order = self._record_nonce(nonce, now)
        if mtype == T_STREAM:
            urgent = self._on_stream(tag, body)
        elif mtype == T_ACK:
            self._on_ack(tag, body, now)
            return
        elif mtype == T_WINDOW:
            self._on_window(tag, body)
            urgent = True               # rare, and the peer's only RTT samples
        elif mtype == T_RESET:
            self._on_reset(tag, body)
            urgent = True
        else:
            return
        self._ae_unacked += 1
        if order == 1 or urgent or self._ae_unacked >= self.ack_every:
            self._ack_now = True
        elif self._ack_deadline is None:
            self._ack_deadline = now + self.max_ack_delay

    def _record_nonce(self, n, now):
        """Add nonce n to the received ranges: 0 in order, 1 out of order, 2 duplicate
        (or too old to tell)."""
        rr = self._rr
        if rr:
            top = rr[0]
            hi = top[1]
            if n == hi + 1:
                top[1] = n
                self._largest_recv_time = now
                return 0
            if n > hi:
                rr.insert(0, [n, n, 0])
                if len(rr) > _KEEP_RANGES:
                    rr.pop()
                self._largest_recv_time = now
                return 1
        elif n > 0:
            rr.append([n, n, 0])
            self._largest_recv_time = now
            return 0 if n == 1 else 1
        else:
            return 2
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
                    if len(rr) > _KEEP_RANGES:
                        rr.pop()
                return 1
            if n >= r[0]:
                return 2
        last = rr[-1]
        if n < 1:
            return 2
        if n == last[0] - 1:
            last[0] = n
            last[2] = 0
        elif len(rr) < _KEEP_RANGES:
            rr.append([n, n, 0])
        return 1

    def _on_stream(self, sid, body):
        """A STREAM message; returns True when it should be acknowledged at once."""
        if len(body) < _STREAM_SIZE:
            raise ProtocolError(E_LENGTH)
        if not sid:
            raise ProtocolError(E_TAG)
        off, flags = STREAM.unpack_from(body)
        if flags & ~STREAM_FIN:
            raise ProtocolError(E_FLAGS)
        n = len(body) - _STREAM_SIZE
        end = off + n
        st = self._streams.get(sid)
        if st is None:
            st = self._stream_for(sid)
            if st is None:
                return False
        if end > st.rwin:
            raise ProtocolError(E_FLOW)
        fin = flags & STREAM_FIN
        rfinal = st.rfinal
        if fin:
            if (rfinal is not None and rfinal != end) or st.rmax > end:
                raise ProtocolError(E_FINAL)
        elif rfinal is not None and end > rfinal:
            raise ProtocolError(E_FINAL)
        if end > st.rmax:
            st.rmax = end
        self.counts["stream_bytes_received"] += n
        if st.reset_code is not None or st.eof_read:
            return False
        rend = st.rend
        progressed = False
        if end <= rend:
            self.counts["duplicate_bytes_received"] += n
        elif off <= rend:
            mv = memoryview(body)
            st.rbuf += mv[_STREAM_SIZE + rend - off:]
            rend = end
            starts = st.ostarts
            if starts and starts[0] <= rend:
                datas = st.odatas
                while starts and starts[0] <= rend:
                    s = starts.pop(0)
                    d = datas.pop(0)
                    st.obytes -= len(d)
                    e = s + len(d)
                    if e > rend:
                        st.rbuf += d[rend - s:]
                        rend = e
            st.rend = rend
            progressed = True
        else:
            self._insert_ooo(st, off, end, body)
        if fin and st.rfinal is None:
            st.rfinal = end
            self._commit(st, end - st.roff)
            st.win_pending = False
            self._starved.pop(sid, None)
            if self._starved:
                self._feed_starved()
        if progressed or (fin and st.rfinal == rend):
            key = (EV_READABLE, sid)
            if key not in self._events:
                self._events[key] = Event(EV_READABLE, sid, None)
        return bool(fin or st.ostarts)

    def _insert_ooo(self, st, s, e, body):
        """Keep the bytes [s, e) of a STREAM body that arrived ahead of the stream."""
        starts = st.ostarts
        datas = st.odatas
        base = s - _STREAM_SIZE                 # body offset of stream offset 0 is -base
        i = bisect_right(starts, s)
        if i:
            ps = starts[i - 1]
            pe = ps + len(datas[i - 1])
            if pe >= e:
                self.counts["duplicate_bytes_received"] += e - s
                return
            if pe > s:
                s = pe
        while i < len(starts) and starts[i] < e:
            ns = starts[i]
            ne = ns + len(datas[i])
            if ne <= e:
                del starts[i]
                st.obytes -= len(datas.pop(i))
            else:
                e = ns
                break
        if s >= e:
            return
        d = bytes(memoryview(body)[s - base:e - base])
        starts.insert(i, s)
        datas.insert(i, d)
        st.obytes += len(d)

    def _on_window(self, sid, body):
        if len(body) != _WINDOW_SIZE:
            raise ProtocolError(E_LENGTH)
        if not sid:
            raise ProtocolError(E_TAG)
        st = self._stream_for(sid)
        if st is None or st.reset_code is not None:
            return
        (value,) = WINDOW.unpack(body)
        if value > st.swin:
            st.swin = value
            if st.has_to_send():
                self._sendable[sid] = None

    def _on_reset(self, sid, body):
        if len(body) != _REASON_SIZE:
            raise ProtocolError(E_LENGTH)
        if not sid:
            raise ProtocolError(E_TAG)
        st = self._stream_for(sid, create=False)
        if st is None:
            return
        self.counts["resets_received"] += 1
        self._event(EV_RESET, sid, body[0])
        self._forget(st)

    def _stream_for(self, sid, create=True):
        """The stream a peer's message names; None for one that is closed (or refused).
        Raises ProtocolError for an id the peer may not use."""
        st = self._streams.get(sid)
        if st is not None:
            return st
        if (sid & 1) == (1 if self.client else 0):      # one of ours
            if sid < self._next_local:
                return None
            raise ProtocolError(E_STREAM_ID)
        if sid < self._peer_next:
            if sid not in self._peer_skipped:
                return None
            self._peer_skipped.discard(sid)
        else:
            skipped = (sid - self._peer_next) // 2
            if skipped:
                if len(self._peer_skipped) + skipped > self.max_streams + REFUSED_MAX:
                    raise ProtocolError(E_STREAM_ID)
                self._peer_skipped.update(range(self._peer_next, sid, 2))
            self._peer_next = sid + 2
        if not create:
            return None
        if self._peer_open >= self.max_streams:
            # Refused with RESET, sent until acknowledged: never dropped in silence,
            # or the peer would take the ACKs of its bytes for their delivery.
            if len(self._refused) >= REFUSED_MAX:
                raise ProtocolError(E_STREAMS)
            self.counts["streams_refused"] += 1
            self._refused[sid] = True
            self._control[sid] = None
            return None
        st = self._streams[sid] = Stream(sid, False)
        self._peer_open += 1
        self._commit(st, INITIAL_WINDOW)
        self._event(EV_NEW, sid)
        self._grant(st)
        return st

    def _on_ack(self, tag, body, now):
        size = len(body)
        if size < _ACK_SIZE:
            raise ProtocolError(E_LENGTH)
        largest, delay, first, count = ACK.unpack_from(body)
        if size != _ACK_SIZE + count * _RANGE_SIZE:
            raise ProtocolError(E_LENGTH)
        if tag:
            raise ProtocolError(E_TAG)
        if largest > self._max_sent or largest == 0:
            raise ProtocolError(E_ACK_UNSENT)
        lo = largest - first
        if lo < 1:
            raise ProtocolError(E_ACK_RANGE)
        ranges = [(lo, largest)]
        pos = _ACK_SIZE
        for _ in range(count):
            gap, length = ACK_RANGE.unpack_from(body, pos)
            pos += _RANGE_SIZE
            hi = lo - gap - 1
            lo = hi - length + 1
            if not gap or not length or lo < 1:
                raise ProtocolError(E_ACK_RANGE)
            ranges.append((lo, hi))
        self.counts["acks_received"] += 1

        recs = self._recs
        nonces = self._nonces
        head = self._head
        total = len(recs)
        if head >= total:
            return
        smallest = nonces[head]
        newly = []
        for lo, hi in ranges:
            if hi < smallest:
                break
            i = head if lo <= smallest else bisect_left(nonces, lo, head)
            j = total if hi >= nonces[-1] else bisect_right(nonces, hi, i)
            for k in range(i, j):
                rec = recs[k]
                if rec[_STATE] == _IN_FLIGHT:
                    rec[_STATE] = _ACKED
                    newly.append(rec)
        if not newly:
            return
        top = max(newly, key=_nonce_of) if len(newly) > 1 else newly[0]
        if top[_NONCE] > self._largest_acked:
            self._largest_acked = top[_NONCE]
            self._largest_acked_seq = top[_SEQ]
        if top[_NONCE] == largest:
            self._rtt_sample(now - top[_TIME], delay / 1e6, now)
        elif top[_NONCE] >= ranges[0][0]:
            # The largest is a message that elicits no ACK (one of our ACKs), received
            # after this record: the sample is an overestimate by at most the peer's
            # delay in acknowledging this record, so the ACK's delay field is not used.
            self._rtt_sample(now - top[_TIME], 0.0, now)
        self._on_acked(newly)
        self.pto_count = 0
        self._last_pto = None
        self._last_progress = now
        self._detect_lost(now)
        self._advance_head()

    def _rtt_sample(self, latest, ack_delay, now):
        if latest > MAX_RTT_SAMPLE or latest < 0:
            return
        self.latest_rtt = latest
        if not self._has_sample:
            self._has_sample = True
            self._first_sample_time = now
            self.min_rtt = latest
            self.srtt = latest
            self.rttvar = latest / 2
            self._set_pto_base()
            return
        if latest < self.min_rtt:
            self.min_rtt = latest
        if ack_delay > self.max_ack_delay:
            ack_delay = self.max_ack_delay
        adjusted = latest
        if latest >= self.min_rtt + ack_delay:
            adjusted = latest - ack_delay
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - adjusted)
        self.srtt = 0.875 * self.srtt + 0.125 * adjusted
        self._set_pto_base()

    def _set_pto_base(self):
        """The PTO before backoff: srtt + max(4 rttvar, granularity) + max_ack_delay."""
        self._pto_base = self.srtt + max(4 * self.rttvar, GRANULARITY) + self.max_ack_delay

    def _on_acked(self, newly):
        """Records just acknowledged: congestion window, streams, resets."""
        acked_bytes = 0
        grow = 0
        recovery = self._recovery_start
        streams = self._streams
        run = self._loss_run
        latest = self._acked_sent_max
        pst = None                  # stream bytes acked in a row are handled at once
        poff = pend = 0
        pfin = False
        for rec in newly:
            size = rec[_SIZE]
            acked_bytes += size
            sent = rec[_TIME]
            if recovery is None or sent > recovery:
                grow += size
            if sent > latest:
                latest = sent
            if run is not None and run[0] <= sent <= run[1]:
                run = self._loss_run = None
            mtype = rec[_TYPE]
            st = streams.get(rec[_SID])
            if mtype == T_STREAM:
                if st is not None and st.reset_code is None:
                    info = rec[_INFO]
                    if st is pst and info[0] == pend and not pfin:
                        pend = info[1]
                        pfin = info[2]
                    else:
                        if pst is not None:
                            self._stream_acked(pst, poff, pend, pfin)
                        pst = st
                        poff, pend, pfin = info[0], info[1], info[2]
            elif mtype == T_WINDOW:
                if st is not None and rec[_INFO][0] > st.win_acked:
                    st.win_acked = rec[_INFO][0]
            elif mtype == T_RESET:
                if st is not None and st.reset_code is not None:
                    st.reset_pending = False
                    self._forget(st)
                else:
                    self._refused.pop(rec[_SID], None)
        if pst is not None and pst.reset_code is None and pst.sid in streams:
            self._stream_acked(pst, poff, pend, pfin)
        self._acked_sent_max = latest
        limited = self._cwnd_limited or 2 * self.bytes_in_flight >= self.cwnd
        self.bytes_in_flight -= acked_bytes
        self._inflight -= len(newly)
        if not self._inflight:
            self._waiting_since = None
        if grow and limited and self.cwnd < self.max_cwnd:
            if self.cwnd < self.ssthresh:
                self.cwnd += grow
            else:
                self.cwnd += self.max_datagram * grow / self.cwnd

    def _stream_acked(self, st, off, end, fin):
        if fin:
            st.fin_acked = True
            st.fin_retx = False
        base = st.sbase
        if end > base:
            if off <= base:
                sacked = st.sacked
                while sacked and sacked[0][0] <= end:
                    e = sacked.pop(0)[1]
                    if e > end:
                        end = e
                del st.sbuf[:end - base]
                self.send_buffered -= end - base
                st.sbase = end
                if self._write_blocked:
                    self._tell_writable()
            else:
                _add_interval(st.sacked, off, end)
        if st.fin_acked and st.sbase == st.sfinal and not st.acked_told:
            st.acked_told = True
            self._event(EV_ACKED, st.sid)
            if st.eof_read:
                self._forget(st)

    def _detect_lost(self, now):
        """RFC 9002 DetectAndRemoveLostPackets, over the records up to the largest acked."""
        self._loss_time = None
        largest = self._largest_acked
        if not largest:
            return
        rtt = self.latest_rtt if self.latest_rtt > self.srtt else self.srtt
        delay = TIME_THRESHOLD * rtt
        if delay < GRANULARITY:
            delay = GRANULARITY
        lost_before = now - delay
        seq_limit = self._largest_acked_seq - PACKET_THRESHOLD
        recs = self._recs
        lost = None
        for k in range(self._head, len(recs)):
            rec = recs[k]
            if rec[_NONCE] > largest:
                break
            if rec[_STATE] != _IN_FLIGHT:
                continue
            if rec[_SEQ] <= seq_limit or rec[_TIME] <= lost_before:
                rec[_STATE] = _LOST
                if lost is None:
                    lost = [rec]
                else:
                    lost.append(rec)
            else:
                self._loss_time = rec[_TIME] + delay
                break
        if lost:
            self._on_lost(lost, now)

    def _on_lost(self, lost, now):
        """Records declared lost: their content goes out again, the window shrinks."""
        streams = self._streams
        lost_bytes = 0
        for rec in lost:
            lost_bytes += rec[_SIZE]
            mtype = rec[_TYPE]
            sid = rec[_SID]
            st = streams.get(sid)
            if mtype == T_STREAM:
                if st is not None and st.reset_code is None:
                    info = rec[_INFO]
                    self._requeue_stream(st, info[0], info[1], info[2])
            elif mtype == T_WINDOW:
                if st is not None and st.rfinal is None and rec[_INFO][0] > st.win_acked \
                        and st.reset_code is None:
                    st.win_pending = True
                    self._control[sid] = None
            elif mtype == T_RESET:
                if st is not None and st.reset_code is not None:
                    st.reset_pending = True
                    self._control[sid] = None
                elif sid in self._refused:
                    self._refused[sid] = True
                    self._control[sid] = None
        self.bytes_in_flight -= lost_bytes
        self._inflight -= len(lost)
        self.counts["messages_lost"] += len(lost)
        # one reduction per recovery period, keyed by the sent time of the lost message
        newest = lost[-1][_TIME]
        if self._recovery_start is None or newest > self._recovery_start:
            self._recovery_start = now
            self.ssthresh = max(self.cwnd * 0.5, self.min_window)
            self.cwnd = self.ssthresh
            self.counts["congestion_events"] += 1
        if self._persistent(lost):
            self.cwnd = self.min_window
            self._recovery_start = None
            self.counts["persistent_congestion"] += 1

    def _persistent(self, lost):
        """RFC 9002 7.6: messages lost in a row (none sent between them acknowledged),
        sent after the first RTT sample, over more than PERSISTENT_CONGESTION PTO
        periods.  The run may grow over several detections (a blackout)."""
        first = self._first_sample_time
        if first is None:
            return False
        span = self._pto_base * PERSISTENT_CONGESTION
        run = self._loss_run
        declared = False
        for rec in lost:
            t = rec[_TIME]
            if t < first:
                continue
            if run is None or self._acked_sent_max > run[1]:
                # something sent after the run was acknowledged: a new run starts
                run = self._loss_run = [t, t, False]
            elif t > run[1]:
                run[1] = t
            elif t < run[0]:
                run[0] = t
            if not run[2] and run[1] - run[0] > span:
                run[2] = declared = True
        return declared

    def _requeue_stream(self, st, off, end, fin):
        """Bytes [off, end) (and FIN) of the stream must be sent again."""
        if off < st.sbase:
            off = st.sbase
        if end > off:
            _add_interval(st.retx, off, end)
        if fin and not st.fin_acked:
            st.fin_retx = True
        if st.retx or st.fin_retx:
            self._sendable[st.sid] = None

    def _advance_head(self):
        recs = self._recs
        head = self._head
        total = len(recs)
        while head < total and recs[head][_STATE] != _IN_FLIGHT:
            head += 1
        if head > 1024 and head * 2 > total:
            del recs[:head]
            del self._nonces[:head]
            head = 0
        self._head = head

    # ------------------------------------------------------------------ timers

    def _pto_period(self):
        """The PTO with its backoff, capped at max_pto."""
        count = self.pto_count
        period = self._pto_base * (1 << count) if count < 30 else self.max_pto
        return period if period < self.max_pto else self.max_pto

    def next_timer(self, now):
        """Seconds until on_timer() must run (0.0: now), or None when no timer is set."""
        deadline = None
        if self._ack_now or self._probes:
            return 0.0
        if self._loss_time is not None:
            deadline = self._loss_time
        elif self._inflight:
            deadline = self._last_ae_sent + self._pto_period()
        if self._ack_deadline is not None and (deadline is None or self._ack_deadline < deadline):
            deadline = self._ack_deadline
        if deadline is None:
            return None
        return deadline - now if deadline > now else 0.0

    def on_timer(self, now):
        """Run whatever timer is due: loss detection, PTO, delayed ACK.  Then call
        messages_to_send()."""
        due = now + TIMER_SLACK
        if self._ack_deadline is not None and due >= self._ack_deadline:
            self._ack_now = True
            self._ack_deadline = None
        if self._loss_time is not None:
            if due >= self._loss_time:
                self._detect_lost(max(now, self._loss_time))
                self._advance_head()
            return
        if self._inflight and due >= self._last_ae_sent + self._pto_period():
            self._on_pto(now)

    def _on_pto(self, now):
        self.pto_count += 1
        self.counts["ptos"] += 1
        if self.pto_count >= PTO_LOST_AFTER and self._last_pto is not None:
            before = self._last_pto
            lost = []
            recs = self._recs
            for k in range(self._head, len(recs)):
                rec = recs[k]
                if rec[_TIME] >= before:
                    break
                if rec[_STATE] == _IN_FLIGHT:
                    rec[_STATE] = _LOST
                    lost.append(rec)
            if lost:
                self._on_lost(lost, now)
                self._advance_head()
        self._last_pto = now
        self._probes = PROBES
        if not self._sendable and not self._control:
            self._requeue_oldest(PROBES)

    def _requeue_oldest(self, n):
        """Send the content of the n oldest records in flight again (PTO probes)."""
        recs = self._recs
        streams = self._streams
        for k in range(self._head, len(recs)):
            if n <= 0:
                break
            rec = recs[k]
            if rec[_STATE] != _IN_FLIGHT:
                continue
            st = streams.get(rec[_SID])
            if st is None:
                continue
            mtype = rec[_TYPE]
            if mtype == T_STREAM and st.reset_code is None:
                info = rec[_INFO]
                self._requeue_stream(st, info[0], info[1], info[2])
            elif mtype == T_WINDOW and st.reset_code is None and st.rfinal is None:
                st.win_pending = True
                self._control[st.sid] = None
            elif mtype == T_RESET and st.reset_code is not None:
                st.reset_pending = True
                self._control[st.sid] = None
            else:
                continue
            n -= 1

    # ------------------------------------------------------------------ network: output

    def messages_to_send(self, now, limit=64):
        """What to send now, at most `limit` messages: an ACK, resets and window
        updates, probes, then lost and new stream bytes as the congestion window
        allows.  A list of Outgoing; see the module docstring for what to do with it."""
        self._planned = 0
        if not (self._ack_now or self._ack_deadline is not None or self._control
                or self._probes or self._sendable):
            return []
        out = []
        if self._ack_now or (self._ack_deadline is not None
                             and now + TIMER_SLACK >= self._ack_deadline):
            if self._rr:
                ack = self._make_ack(now)
                out.append(ack)
                if self._ae_unacked >= 2 * self.ack_every:
                    # A batch of messages gets one ACK where one-at-a-time arrivals
                    # get several: a second copy, so that one lost ACK does not leave
                    # a small window waiting for the PTO.
                    out.append(_out(Outgoing, tuple(ack)))
                    self.counts["acks_sent"] += 1
            self._ack_now = False
            self._ack_deadline = None
            self._ae_unacked = 0
        if self._control:
            self._send_control(out, limit)
            for msg in out:
                if msg.ack_eliciting:
                    self._planned += msg.size
        probes = self._probes
        if probes:
            self._probes = 0
            probes -= sum(1 for msg in out if msg.ack_eliciting)
            while probes > 0 and len(out) < limit:
                msg = self._next_stream_message()
                if msg is None:
                    msg = self._ping()
                    if msg is None:
                        break
                out.append(msg)
                self._planned += msg.size
                probes -= 1
                self.counts["probes_sent"] += 1
        self._cwnd_limited = False
        if self._sendable:
            cwnd = self.cwnd
            while len(out) < limit:
                if self.bytes_in_flight + self._planned >= cwnd:
                    self._cwnd_limited = True
                    break
                msg = self._next_stream_message()
                if msg is None:
                    break
                out.append(msg)
                self._planned += msg.size
        return out

    def _make_ack(self, now):
        """An ACK of the nonces received.  A range below the top one is reported in
        ACK_REPEAT ACKs after it last changed, then forgotten: the peer has most
        likely heard of it, and if not it only sends those bytes again."""
        rr = self._rr
        top = rr[0]
        lo, largest = top[0], top[1]
        first = largest - lo
        if first > U32:
            first = U32
            lo = largest - first
        delay = int((now - self._largest_recv_time) * 1e6)
        if delay < 0:
            delay = 0
        elif delay > U32:
            delay = U32
        body = ACK.pack(largest, delay, first, 0)
        if len(rr) > 1:
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
            self._rr = keep
            body = ACK.pack(largest, delay, first, len(parts)) + b"".join(parts)
        self.counts["acks_sent"] += 1
        return Outgoing(T_ACK, 0, body, False, self.overhead + len(body), None)

    def _send_control(self, out, limit):
        control = self._control
        size = self.overhead
        for sid in list(control):
            if len(out) >= limit:
                return
            del control[sid]
            st = self._streams.get(sid)
            if st is None:
                if self._refused.get(sid):
                    self._refused[sid] = False
                    out.append(Outgoing(T_RESET, sid, REASON.pack(RESET_REFUSED), True,
                                        size + _REASON_SIZE, (RESET_REFUSED,)))
                continue
            if st.reset_code is not None:
                if st.reset_pending:
                    st.reset_pending = False
                    out.append(Outgoing(T_RESET, sid, REASON.pack(st.reset_code), True,
                                        size + _REASON_SIZE, (st.reset_code,)))
                continue
            if st.win_pending and st.rfinal is None:
                st.win_pending = False
                out.append(Outgoing(T_WINDOW, sid, WINDOW.pack(st.rwin), True,
                                    size + _WINDOW_SIZE, (st.rwin,)))
            if len(out) >= limit:
                return
        return

    def _ping(self):
        """An ack-eliciting message with nothing new in it (a probe when there is
        nothing to send again): an empty STREAM at offset 0 of a stream in flight."""
        recs = self._recs
        for k in range(self._head, len(recs)):
            rec = recs[k]
            if rec[_STATE] == _IN_FLIGHT:
                body = STREAM.pack(0, 0)
                return Outgoing(T_STREAM, rec[_SID], body, True, self.overhead + len(body),
                                (0, 0, False, False))
        return None

    def _next_stream_message(self):
        """One STREAM message from the next stream in turn, or None."""
        sendable = self._sendable
        streams = self._streams
        while sendable:
            sid = next(iter(sendable))
            del sendable[sid]
            st = streams.get(sid)
            if st is None or st.reset_code is not None:
                continue
            msg = self._cut(st, self.mss)
            if msg is not None:
                sendable[sid] = None        # to the back of the line (dropped when empty)
                return msg
        return None

    def _cut(self, st, mss):
        """The next STREAM message of a stream: lost bytes first, then new ones."""
        sbase = st.sbase
        retx = st.retx
        while retx:
            r = retx[0]
            s, e = r
            if s < sbase:
                s = sbase
            s, stop = _skip_acked(st.sacked, s, e)
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
            fin = st.sfinal is not None and end == st.sfinal and not st.fin_acked
            if fin:
                st.fin_retx = False
                st.fin_sent = True
            body = STREAM.pack(s, STREAM_FIN if fin else 0) + st.sbuf[s - sbase:end - sbase]
            self.counts["bytes_retransmitted"] += end - s
            self.counts["messages_retransmitted"] += 1
            return _out(Outgoing, (T_STREAM, st.sid, body, True, self.overhead + len(body),
                                   (s, end, fin, True)))
        snext = st.snext
        limit = sbase + len(st.sbuf)
        if st.swin < limit:
            limit = st.swin
        if snext < limit:
            end = snext + mss
            if end > limit:
                end = limit
            st.snext = end
            fin = st.sfinal is not None and end == st.sfinal
            if fin:
                st.fin_sent = True
                st.fin_retx = False
            body = STREAM.pack(snext, STREAM_FIN if fin else 0) + \
                st.sbuf[snext - sbase:end - sbase]
            self.counts["stream_bytes_sent"] += end - snext
            return _out(Outgoing, (T_STREAM, st.sid, body, True, self.overhead + len(body),
                                   (snext, end, fin, False)))
        if st.sfinal is not None and snext == st.sfinal and \
                ((not st.fin_sent) or st.fin_retx) and not st.fin_acked:
            st.fin_sent = True
            st.fin_retx = False
            body = STREAM.pack(snext, STREAM_FIN)
            return Outgoing(T_STREAM, st.sid, body, True, self.overhead + len(body),
                            (snext, snext, True, False))
        st.fin_retx = False
        return None

    def on_sent(self, nonce, message, now):
        """The caller sealed `message` (an Outgoing, or None for a message the engine
        did not make) with `nonce` and sent it (or tried to)."""
        if nonce > self._max_sent:
            self._max_sent = nonce
        if message is None:
            return
        self.counts["messages_sent"] += 1
        if not message.ack_eliciting:
            return
        if self._nonces and nonce <= self._nonces[-1]:
            raise ValueError("on_sent(): nonces must increase")
        size = message.size
        self._planned -= size
        if self._planned < 0:
            self._planned = 0
        self._seq += 1
        self._recs.append([nonce, self._seq, now, size, message[0], message[1], message[5],
                           _IN_FLIGHT])
        self._nonces.append(nonce)
        self._inflight += 1
        self.bytes_in_flight += size
        self._last_ae_sent = now
        if self._waiting_since is None:
            self._waiting_since = now

    def on_not_sent(self, message):
        """A message messages_to_send() returned that was never sealed: its content
        goes back in the queues."""
        mtype = message.mtype
        if not message.ack_eliciting:
            self._ack_now = True
            return
        self._planned = max(0, self._planned - message.size)
        st = self._streams.get(message.tag)
        if mtype == T_STREAM:
            if st is not None and st.reset_code is None:
                off, end, fin, _retx = message.info
                self._requeue_stream(st, off, end, fin)
        elif mtype == T_WINDOW:
            if st is not None and st.reset_code is None and st.rfinal is None:
                st.win_pending = True
                self._control[message.tag] = None
        elif mtype == T_RESET:
            if st is not None and st.reset_code is not None:
                st.reset_pending = True
                self._control[message.tag] = None
            elif message.tag in self._refused:
                self._refused[message.tag] = True
                self._control[message.tag] = None

    # ------------------------------------------------------------------ bookkeeping

    def _event(self, kind, sid, code=None):
        key = (kind, sid)
        if key not in self._events:
            self._events[key] = Event(kind, sid, code)

    def _commit(self, st, amount):
        """Set the stream's share of the session buffer to `amount` bytes."""
        self.committed += amount - st.commit
        st.commit = amount

    def _window(self):
        """How far past its reads a stream may be granted: stream_window, or a fair
        share of session_buffer when many streams are open (never below the
        INITIAL_WINDOW every stream has anyway)."""
        share = self.session_buffer // (len(self._streams) or 1)
        if share >= self.stream_window:
            return self.stream_window
        return share if share > INITIAL_WINDOW else INITIAL_WINDOW

    def _grant(self, st):
        """Raise the stream's grant to _window() past the reads, within the session
        buffer; a WINDOW goes out when it moved."""
        target = st.roff + self._window()
        room = self.session_buffer - (self.committed - st.commit)
        if target - st.roff > room:
            target = st.roff + max(room, 0)
            self._starved[st.sid] = None
        if target > st.rwin:
            st.rwin = target
            st.win_pending = True
            self._control[st.sid] = None
        self._commit(st, st.rwin - st.roff)

    def _feed_starved(self):
        for sid in list(self._starved):
            del self._starved[sid]
            st = self._streams.get(sid)
            if st is not None and st.rfinal is None and st.reset_code is None:
                self._grant(st)
            if self.committed >= self.session_buffer:
                break

    def _tell_writable(self):
        """EV_WRITABLE for the streams whose write() was short and that have room now
        (their own buffer, or the session's, emptied)."""
        for sid in list(self._write_blocked):
            st = self._streams.get(sid)
            if st is None or st.reset_code is not None or st.sfinal is not None:
                del self._write_blocked[sid]
            elif self.send_space(sid) > 0:
                del self._write_blocked[sid]
                self._event(EV_WRITABLE, sid)

    def _eof_read(self, st):
        st.eof_read = True
        self._commit(st, 0)
        if st.send_done():
            self._forget(st)

    def _drop_buffers(self, st):
        self.send_buffered -= len(st.sbuf)
        st.sbuf = bytearray()
        st.retx = []
        st.sacked = []
        st.rbuf = bytearray()
        st.ostarts = []
        st.odatas = []
        st.obytes = 0
        self._commit(st, 0)
        self._sendable.pop(st.sid, None)
        self._starved.pop(st.sid, None)
        self._write_blocked.pop(st.sid, None)
        if self._write_blocked:
            self._tell_writable()

    def _forget(self, st):
        """Both directions are over: the stream leaves the table."""
        sid = st.sid
        self._drop_buffers(st)
        del self._streams[sid]
        self._control.pop(sid, None)
        if not st.local:
            self._peer_open -= 1


def _nonce_of(rec):
    return rec[_NONCE]


def _add_interval(intervals, s, e):
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


def _skip_acked(intervals, s, e):
    """(s moved past the acked interval holding it, the end of the unacked run from s)."""
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
