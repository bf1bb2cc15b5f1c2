"""The reliable-stream engine of `udpmux link`: streams, acknowledgements, loss
recovery and congestion control over a session's messages, as QUIC does it
(RFC 9000 streams, RFC 9002 loss detection and NewReno), adapted to udpmux.

This module owns Connection, which ties the engine's parts together: it is the
table of a session's streams, and it makes the messages, acknowledges them, and
recovers what was lost:

    streamproto.py  what both ends agree on: limits, RESET reasons, ProtocolError
    rangeset.py     the nonces received and the ACK bodies that report them
    recovery.py     sent records, RTT, loss detection, PTO (RFC 9002 sections 5-6)
    congestion.py   the congestion controller interface, and NewReno
    streamtable.py  the streams: ids, flow control, events, the application's calls
    streambuf.py    one stream's bytes both ways: buffers, cutting, reassembly

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
at most MAX_ACK_RANGES (gap, length) ranges downwards: rangeset.py).  A receiver
acknowledges every ack_every-th ack-eliciting message, and at once on a gap, on bytes
out of order, on FIN, WINDOW and RESET; otherwise within MAX_ACK_DELAY.  A batch of at
least 2 x ack_every of them gets the ACK twice, so that one lost ACK does not leave a
small window waiting for the PTO.  Lost bytes are sent again in a new message with a
new nonce, never as "the same packet", so every RTT sample is unambiguous.  ACK
messages elicit no ACK and do not count in flight; STREAM, WINDOW and RESET do.

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
the stream's window past the reads (less when many streams share session_buffer: a
window starts at window_start and grows, up to stream_window, while it holds the
stream back, so it follows the bandwidth-delay product), and grants
beyond INITIAL_WINDOW only while the session's grants stay within session_buffer: the
bytes a receiver holds are at most session_buffer + INITIAL_WINDOW per open stream
(defaults: 16 MiB + 256 x 64 KiB).  Bytes beyond the grant are a protocol error.
write() takes at most send_buffer bytes per stream and session_buffer in all.

Loss detection and congestion control follow RFC 9002: recovery.py says what was
lost (by packet and time threshold, or PTO_LOST_AFTER PTOs in a row) and when a probe
timeout (PTO, with backoff capped at max_pto) sends PROBES messages whatever the window;
the congestion controller (congestion.py: NewReno unless Connection is given another)
says how much may be in flight.  The engine never gives up: after a blackout or a
laptop's sleep data flows again within max_pto of the path coming back.  The
application decides when the peer is unreachable, from unreachable_for(now) (and
last_received, for a session with nothing in flight).

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

from collections import namedtuple

from udpmux.congestion import NewReno
from udpmux.rangeset import (
    ACK_REPEAT, MAX_ACK_RANGES, OUT_OF_ORDER, ReceivedRanges, ack_ranges, parse_ack,
)
from udpmux.recovery import (
    GRANULARITY, INFO, INITIAL_RTT, MAX_RTT_SAMPLE, PACKET_THRESHOLD, PERSISTENT_CONGESTION,
    PROBES, PTO_LOST_AFTER, SID, TIME_THRESHOLD, TIMER_SLACK, TYPE, Recovery,
)
from udpmux.streambuf import Stream
from udpmux.streamproto import (
    E_ACK_RANGE, E_ACK_UNSENT, E_FINAL, E_FLAGS, E_FLOW, E_LENGTH, E_STREAM_ID, E_STREAMS, E_TAG,
    INITIAL_WINDOW, MAX_ACK_DELAY, MAX_OFFSET, PROTOCOL_ERRORS, RESET_CANCEL, RESET_REFUSED, U32,
    ProtocolError,
)
from udpmux.streamtable import (
    EV_ACKED, EV_NEW, EV_READABLE, EV_RESET, EV_WRITABLE, REFUSED_MAX, Event, StreamClosed,
    StreamTable,
)
from udpmux.wire import (
    HEADER_SIZE, MAC_SIZE, REASON, STREAM, T_ACK, T_RESET, T_STREAM, T_WINDOW, WINDOW,
)

__all__ = (
    # the API
    "Connection", "Outgoing", "Event", "ProtocolError", "StreamClosed",
    "EV_NEW", "EV_READABLE", "EV_WRITABLE", "EV_ACKED", "EV_RESET",
    "RESET_CANCEL", "RESET_REFUSED", "PROTOCOL_ERRORS", "E_LENGTH", "E_TAG", "E_FLAGS",
    "E_ACK_UNSENT", "E_ACK_RANGE", "E_FLOW", "E_FINAL", "E_STREAM_ID", "E_STREAMS",
    # the limits, from the modules that own them
    "INITIAL_WINDOW", "MAX_ACK_RANGES", "ACK_REPEAT", "MAX_ACK_DELAY", "MAX_OFFSET", "U32",
    "PACKET_THRESHOLD", "TIME_THRESHOLD", "GRANULARITY", "INITIAL_RTT", "MAX_RTT_SAMPLE",
    "PERSISTENT_CONGESTION", "PTO_LOST_AFTER", "PROBES", "TIMER_SLACK", "REFUSED_MAX",
    "Stream", "StreamTable",
)

UNSENT_RTTS = 2                 # a stream's unsent bytes: at most what goes out in this
UNSENT_TIME = 0.05              # many round trips, or in this many seconds if longer (a
UNSENT_MIN = 64 * 1024          # short path's refills cost), and at least UNSENT_MIN

_WINDOW_SIZE = WINDOW.size
_REASON_SIZE = REASON.size

Outgoing = namedtuple("Outgoing", "mtype tag body ack_eliciting size info")
Outgoing.__doc__ = """A message for the caller to seal and send: mtype, tag and body go to
Session.seal(); ack_eliciting and size (the whole message, header and MAC included)
are for the caller's information; info is the engine's and must be left alone."""

_out = tuple.__new__             # _out(Outgoing, (...)): no keyword handling, faster


class Connection(StreamTable):
    """One session's streams (a StreamTable, whose methods are the application's)
    and the messages that carry them: see the module docstring for the contract.

    Settings:
      client          True at the end that sent HELLO: it opens odd stream ids
      max_message     the largest whole message (header, body, MAC) to send; 1232 fits
                      a 1280-byte IPv6 path (1280 - 40 IPv6 - 8 UDP)
      stream_window   how far ahead of the application's reads a peer may send on a stream
      window_start    where a stream's window starts (default: stream_window); it grows
                      while it holds the stream back, up to stream_window
      session_buffer  bytes granted in all streams at most; also the most bytes write()
                      takes in all streams
      send_buffer     bytes write() takes per stream, sent or not, until acknowledged
                      (default: stream_window)
      max_streams     the peer's streams open at once; more are refused with RESET
      initial_rtt     the RTT assumed before the first sample (e.g. the handshake's)
      max_pto         the most seconds between probes, however long the backoff
      ack_every       ack-eliciting messages received before an ACK goes out at once
      overhead        header and MAC bytes of a message
      congestion      the congestion controller's class (udpmux/congestion.py), called
                      with (max_message, session_buffer)

    Its parts: .recovery (a Recovery), .cc (the congestion controller).
    """

    COUNTS = (
        "messages_sent", "messages_received", "stream_bytes_sent", "bytes_retransmitted",
        "messages_retransmitted", "messages_lost", "acks_sent", "acks_received",
        "ptos", "probes_sent", "congestion_events", "persistent_congestion", "path_changes",
        "resets_sent", "resets_received", "streams_refused", "stream_bytes_received",
        "duplicate_bytes_received")

    def __init__(self, client, max_message=1232, stream_window=1 << 20,
                 session_buffer=16 << 20, send_buffer=None, max_streams=256,
                 initial_rtt=INITIAL_RTT, max_pto=1.0, ack_every=2,
                 max_ack_delay=MAX_ACK_DELAY, overhead=HEADER_SIZE + MAC_SIZE,
                 congestion=NewReno, window_start=None):
        self.max_message = max_message
        self.overhead = overhead
        self.mss = max_message - overhead - STREAM.size
        if self.mss < 1:
            raise ValueError("max_message leaves no room for stream bytes")
        super().__init__(client, stream_window, session_buffer, send_buffer, max_streams,
                         window_start)
        self.max_pto = max_pto
        self.ack_every = max(1, ack_every)
        self.max_ack_delay = max_ack_delay

        # receiving: the nonces, for ACKs
        self._rr = ReceivedRanges()
        self._ae_unacked = 0                        # ack-eliciting received since the last ACK
        self._ack_now = False
        self._ack_deadline = None
        self.last_received = None                   # when on_message() was last called

        # sending: records, RTT and timers; the window
        self.recovery = Recovery(initial_rtt, max_ack_delay, max_pto)
        self.cc = congestion(max_message, session_buffer)
        self._pacing = hasattr(self.cc, "pace")     # a pacing controller (udpmux/bbr.py)
        self._planned = 0                           # bytes returned, not yet on_sent()
        self._probes = 0
        self._probe_data = False                    # the probes are to carry stream bytes
        self._working = None            # the window while the path last worked (snapshot)

    # the parts' figures, as Connection attributes (read only; the last three are what
    # tests/test_stream.py and tests/fuzzing.py look at)
    srtt = property(lambda self: self.recovery.srtt)
    rttvar = property(lambda self: self.recovery.rttvar)
    min_rtt = property(lambda self: self.recovery.min_rtt)
    latest_rtt = property(lambda self: self.recovery.latest_rtt)
    pto_count = property(lambda self: self.recovery.pto_count)
    cwnd = property(lambda self: self.cc.cwnd)
    ssthresh = property(lambda self: self.cc.ssthresh)
    bytes_in_flight = property(lambda self: self.cc.bytes_in_flight)
    _recs = property(lambda self: self.recovery.recs)
    _head = property(lambda self: self.recovery.head)
    _max_sent = property(lambda self: self.recovery.max_sent)

    def _clock(self):
        """Windows tune themselves by the engine's clock (the latest arrival) and the
        RTT, once measured."""
        if self.last_received is None or not self.recovery.has_sample:
            return None
        return self.last_received, self.recovery.srtt

    def unreachable_for(self, now):
        """Seconds this end has been waiting for the peer to acknowledge anything new
        (0.0 when everything it sent was acknowledged).  The engine never gives up by
        itself: the application compares this to its own limit."""
        return self.recovery.unreachable_for(now)

    def stats(self):
        """A snapshot of the engine's figures and counters."""
        out = dict(self.counts)
        rec = self.recovery
        cc = self.cc
        out.update(srtt=rec.srtt, rttvar=rec.rttvar, min_rtt=rec.min_rtt,
                   latest_rtt=rec.latest_rtt, cwnd=int(cc.cwnd),
                   ssthresh=None if cc.ssthresh == float("inf") else int(cc.ssthresh),
                   bytes_in_flight=cc.bytes_in_flight, pto_count=rec.pto_count,
                   streams=len(self._streams), committed=self.committed,
                   send_buffered=self.send_buffered,
                   window=max((st.wsize for st in self._streams.values()), default=0))
        return out

    # ------------------------------------------------------------------ network: input

    def on_message(self, nonce, mtype, tag, body, now):
        """An authenticated message from the peer.  Raises ProtocolError."""
        self.last_received = now
        self.counts["messages_received"] += 1
        order = self._rr.add(nonce, now)
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
        if order == OUT_OF_ORDER or urgent or self._ae_unacked >= self.ack_every:
            self._ack_now = True
        elif self._ack_deadline is None:
            self._ack_deadline = now + self.max_ack_delay

    def _on_ack(self, tag, body, now):
        largest, delay, first, count = parse_ack(body)
        if tag:
            raise ProtocolError(E_TAG)
        recovery = self.recovery
        if largest > recovery.max_sent or largest == 0:
            raise ProtocolError(E_ACK_UNSENT)
        ranges = ack_ranges(body, largest, first, count)
        self.counts["acks_received"] += 1
        newly = recovery.on_ack(largest, delay / 1e6, ranges, now)
        if not newly:
            return
        self._on_acked(newly)
        cc = self.cc
        cc.on_packets_acked(newly, now)
        self._working = cc.snapshot()           # the path works: its estimate, kept
        srtt = max(recovery.srtt, GRANULARITY)
        rate = cc.pacing_rate if self._pacing else cc.cwnd / srtt
        ahead = rate * max(UNSENT_RTTS * srtt, UNSENT_TIME)
        self.unsent_limit = max(UNSENT_MIN, min(int(ahead), self.send_buffer))
        lost = recovery.detect_lost(now)
        if lost:
            self._on_lost(lost, now)
        recovery.advance_head()

    def _on_acked(self, newly):
        """Records just acknowledged: streams, window updates, resets."""
        streams = self._streams
        pst = None                  # stream bytes acked in a row are handled at once
        poff = pend = 0
        pfin = False
        for rec in newly:
            mtype = rec[TYPE]
            st = streams.get(rec[SID])
            if mtype == T_STREAM:
                if st is not None and st.reset_code is None:
                    info = rec[INFO]
                    if st is pst and info[0] == pend and not pfin:
                        pend = info[1]
                        pfin = info[2]
                    else:
                        if pst is not None:
                            self._stream_acked(pst, poff, pend, pfin)
                        pst = st
                        poff, pend, pfin = info[0], info[1], info[2]
            elif mtype == T_WINDOW:
                if st is not None and rec[INFO][0] > st.win_acked:
                    st.win_acked = rec[INFO][0]
            elif mtype == T_RESET:
                if st is not None and st.reset_code is not None:
                    st.reset_pending = False
                    self._forget(st)
                else:
                    self._refused.pop(rec[SID], None)
        if pst is not None and pst.reset_code is None and pst.sid in streams:
            self._stream_acked(pst, poff, pend, pfin)

    def _on_lost(self, lost, now):
        """Records declared lost: their content goes out again, the window shrinks."""
        self._requeue_lost(lost)
        self.counts["messages_lost"] += len(lost)
        if self.cc.on_packets_lost(lost, now):
            self.counts["congestion_events"] += 1
        if self.recovery.persistent(lost):
            self.cc.on_persistent_congestion(now)
            self.counts["persistent_congestion"] += 1

    def in_outage(self):
        """True while the peer has acknowledged nothing for two PTOs in a row."""
        return self.recovery.pto_count >= 2

    def path_changed(self, now):
        """The peer is reachable again on another path (it moved, or was silent through
        an outage and speaks again): what was in flight went on the old one and goes out
        again at once; the PTO back-off starts afresh; and the outage was no congestion,
        so the window is the one the path had before it, as QUIC restores its state once
        a new path is validated."""
        lost = self.recovery.all_lost()
        if lost:
            self._requeue_lost(lost)
            self.cc.on_packets_discarded(lost)
            self.recovery.advance_head()
        if self._working is not None:
            self.cc.restore(self._working)
        self.counts["path_changes"] += 1

    def _requeue_lost(self, lost):
        """The content of records that will never be acknowledged, to be sent again."""
        streams = self._streams
        for rec in lost:
            mtype = rec[TYPE]
            sid = rec[SID]
            st = streams.get(sid)
            if mtype == T_STREAM:
                if st is not None and st.reset_code is None:
                    info = rec[INFO]
                    self._requeue_stream(st, info[0], info[1], info[2])
            elif mtype == T_WINDOW:
                if st is not None and st.rfinal is None and rec[INFO][0] > st.win_acked \
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

    # ------------------------------------------------------------------ timers

    def next_timer(self, now):
        """Seconds until on_timer() must run (0.0: now), or None when no timer is set."""
        if self._ack_now or self._probes:
            return 0.0
        deadline = self.recovery.deadline()
        if self._ack_deadline is not None and (deadline is None or self._ack_deadline < deadline):
            deadline = self._ack_deadline
        if self._pacing and self.cc.paced and self._sendable:
            paced = self.cc.next_send_at()
            if deadline is None or paced < deadline:
                deadline = paced
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
        recovery = self.recovery
        loss_time = recovery.loss_time
        if loss_time is not None:
            if due >= loss_time:
                when = max(now, loss_time)
                lost = recovery.detect_lost(when)
                if lost:
                    self._on_lost(lost, when)
                recovery.advance_head()
            return
        if recovery.pto_due(due):
            self._on_pto(now)

    def _on_pto(self, now):
        recovery = self.recovery
        self.counts["ptos"] += 1
        lost = recovery.on_pto(now)
        if lost:
            self._on_lost(lost, now)
            recovery.advance_head()
        self.probe_now()

    def probe_now(self, data=False):
        """Send PROBES messages at once, whatever the window: new or lost stream bytes
        when there are some, else the oldest in flight again (a PTO's probes, which a
        WINDOW or RESET due may be instead).  With data, stream bytes: what the peer
        waits for most, the oldest in flight, first."""
        self._probes = PROBES
        self._probe_data = data
        if data or not self._sendable and not self._control:
            self._requeue_oldest(PROBES, data)

    def _requeue_oldest(self, n, data=False):
        """Send the content of the n oldest records in flight again (PTO probes); with
        data, of the n oldest that carry stream bytes."""
        streams = self._streams
        for rec in self.recovery.in_flight_records():
            if n <= 0:
                break
            st = streams.get(rec[SID])
            if st is None:
                continue
            mtype = rec[TYPE]
            if mtype == T_STREAM and st.reset_code is None:
                info = rec[INFO]
                self._requeue_stream(st, info[0], info[1], info[2])
            elif data:
                continue
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
            if not self._probe_data:
                probes -= sum(1 for msg in out if msg.ack_eliciting)
            self._probe_data = False
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
        cc = self.cc
        cc.cwnd_limited = False
        if self._pacing:
            cc.pace(now)
        if self._sendable:
            while len(out) < limit:
                if not cc.can_send(self._planned):
                    break
                msg = self._next_stream_message()
                if msg is None:
                    break
                out.append(msg)
                self._planned += msg.size
        if self._pacing and not self._sendable and not cc.cwnd_limited \
                and not self._write_blocked:
            cc.app_limited()
        if self._write_blocked and out:
            self._tell_writable()           # what went out makes room for more
        return out

    def _make_ack(self, now):
        body = self._rr.ack_body(now)
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
                win = Outgoing(T_WINDOW, sid, WINDOW.pack(st.rwin), True,
                               size + _WINDOW_SIZE, (st.rwin,))
                # twice: a lost WINDOW leaves the sender waiting for a PTO, and
                # with a window that grows with the path, every grant counts
                out.append(win)
                out.append(_out(Outgoing, tuple(win)))
            if len(out) >= limit:
                return

    def _ping(self):
        """An ack-eliciting message with nothing new in it (a probe when there is
        nothing to send again): an empty STREAM at offset 0 of a stream in flight."""
        for rec in self.recovery.in_flight_records():
            body = STREAM.pack(0, 0)
            return Outgoing(T_STREAM, rec[SID], body, True, self.overhead + len(body),
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
            cut = st.cut(self.mss)
            if cut is not None:
                sendable[sid] = None        # to the back of the line (dropped when empty)
                body, info = cut
                if info[3]:
                    self.counts["bytes_retransmitted"] += info[1] - info[0]
                    self.counts["messages_retransmitted"] += 1
                else:
                    self.counts["stream_bytes_sent"] += info[1] - info[0]
                return _out(Outgoing, (T_STREAM, sid, body, True, self.overhead + len(body),
                                       info))
        return None

    def on_sent(self, nonce, message, now):
        """The caller sealed `message` (an Outgoing, or None for a message the engine
        did not make) with `nonce` and sent it (or tried to)."""
        recovery = self.recovery
        if nonce > recovery.max_sent:
            recovery.max_sent = nonce
        if message is None:
            return
        self.counts["messages_sent"] += 1
        if not message.ack_eliciting:
            return
        size = message.size
        rec = recovery.on_sent(nonce, now, size, message[0], message[1], message[5])
        self._planned -= size
        if self._planned < 0:
            self._planned = 0
        self.cc.on_packet_sent(size, now, rec)

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
