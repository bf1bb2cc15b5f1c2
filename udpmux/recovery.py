"""Loss recovery for the stream engine, RFC 9002 sections 5 and 6: the records of the
ack-eliciting messages sent, the round-trip time, loss detection, the probe timeout
(PTO), and when losses in a row amount to persistent congestion (section 7.6).

Pure code: nonces, sizes and times in, records out.  Recovery decides what was
acknowledged and what was lost; the caller (Connection, udpmux/stream.py) sends the
content of lost records again and tells its congestion controller
(udpmux/congestion.py).

  RTT       as RFC 9002 section 5: smoothed, variation, minimum, the peer's ACK delay
            (at most max_ack_delay); a sample beyond MAX_RTT_SAMPLE is a sleep, not a
            path, and is ignored
  loss      a record is lost when one sent PACKET_THRESHOLD ack-eliciting messages
            later is acknowledged, or when it is older than TIME_THRESHOLD x the RTT
            (at least GRANULARITY) and something later was acknowledged
  PTO       srtt + max(4 rttvar, GRANULARITY) + max_ack_delay, doubled at each PTO in
            a row, capped at max_pto; the caller sends PROBES messages whatever the
            window.  At PTO_LOST_AFTER PTOs in a row, what was in flight before the
            previous PTO is declared lost, which bounds the records kept through a
            long blackout.  Recovery never gives up: after a blackout or a laptop's
            sleep the next probe goes within max_pto of the path coming back.
  persistent congestion  records lost in a row (none sent between them acknowledged),
            sent after the first RTT sample, over more than PERSISTENT_CONGESTION PTOs

Nonces are the session's: every message has a new, larger one, and a lost message's
content goes out again with a new nonce, so every RTT sample is unambiguous.
"""

from bisect import bisect_left, bisect_right

from udpmux.streamproto import MAX_ACK_DELAY

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

# A sent record is a list (cheaper than an object): these are its fields.  TYPE, SID
# and INFO are the caller's (the message type, its tag, and what the caller needs to
# send its content again); Recovery keeps them and never looks inside.
NONCE, SEQ, TIME, SIZE, TYPE, SID, INFO, STATE = range(8)
IN_FLIGHT, ACKED, LOST = 0, 1, 2


def _nonce_of(rec):
    return rec[NONCE]


class Recovery:
    """The sent records and the timers of one session.

    Attributes the caller reads: srtt, rttvar, min_rtt (None before a sample),
    latest_rtt, pto_count, in_flight (records), max_sent (the largest nonce used),
    loss_time (when detect_lost() must run again, or None), last_ae_sent."""

    def __init__(self, initial_rtt=INITIAL_RTT, max_ack_delay=MAX_ACK_DELAY, max_pto=1.0):
        self.max_ack_delay = max_ack_delay
        self.max_pto = max_pto

        self.recs = []                              # records, in nonce order
        self.nonces = []                            # their nonces
        self.head = 0                               # records before it are done with
        self.seq = 0                                # ordinal of ack-eliciting messages sent
        self.max_sent = 0                           # the largest nonce used
        self.in_flight = 0                          # records in flight
        self.largest_acked = 0                      # nonce and ...
        self.largest_acked_seq = 0                  # ... seq of the largest acked record
        self.last_ae_sent = 0.0
        self.loss_time = None
        self.pto_count = 0
        self.last_pto = None
        self.last_progress = None                   # when an ACK last acked something new
        self.loss_run = None                        # [first, last sent, declared] lost in a row
        self.acked_sent_max = 0.0                   # the latest send time of an acked record
        self.waiting_since = None                   # when the first unacked message was sent
        self.first_sample_time = None

        self.srtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.pto_base = 0.0
        self._set_pto_base()
        self.min_rtt = None
        self.latest_rtt = 0.0
        self.has_sample = False

    # ------------------------------------------------------------------ sending

    def on_sent(self, nonce, now, size, mtype, sid, info):
        """An ack-eliciting message went out with `nonce` (the caller also keeps
        max_sent for the others); returns its record.  Raises ValueError when nonces do
        not increase."""
        nonces = self.nonces
        if nonces and nonce <= nonces[-1]:
            raise ValueError("on_sent(): nonces must increase")
        if nonce > self.max_sent:
            self.max_sent = nonce
        self.seq += 1
        rec = [nonce, self.seq, now, size, mtype, sid, info, IN_FLIGHT]
        self.recs.append(rec)
        nonces.append(nonce)
        self.in_flight += 1
        self.last_ae_sent = now
        if self.waiting_since is None:
            self.waiting_since = now
        return rec

    def in_flight_records(self):
        """The records in flight, oldest first."""
        recs = self.recs
        for k in range(self.head, len(recs)):
            rec = recs[k]
            if rec[STATE] == IN_FLIGHT:
                yield rec

    # ------------------------------------------------------------------ acknowledgements

    def on_ack(self, largest, ack_delay, ranges, now):
        """An ACK of `ranges` ((lo, hi) nonce pairs, highest first, the first one ending
        at `largest`), held `ack_delay` seconds by the peer.  Returns the records it
        acknowledged for the first time, in nonce order (empty: nothing new).  Then
        call detect_lost(now) and advance_head()."""
        recs = self.recs
        nonces = self.nonces
        head = self.head
        total = len(recs)
        if head >= total:
            return ()
        smallest = nonces[head]
        newly = []
        latest = self.acked_sent_max
        run = self.loss_run
        for lo, hi in ranges:
            if hi < smallest:
                break
            i = head if lo <= smallest else bisect_left(nonces, lo, head)
            j = total if hi >= nonces[-1] else bisect_right(nonces, hi, i)
            for k in range(i, j):
                rec = recs[k]
                if rec[STATE] == IN_FLIGHT:
                    rec[STATE] = ACKED
                    newly.append(rec)
                    sent = rec[TIME]
                    if sent > latest:
                        latest = sent
                    if run is not None and run[0] <= sent <= run[1]:
                        run = self.loss_run = None
        if not newly:
            return newly
        top = max(newly, key=_nonce_of) if len(newly) > 1 else newly[0]
        if top[NONCE] > self.largest_acked:
            self.largest_acked = top[NONCE]
            self.largest_acked_seq = top[SEQ]
        if top[NONCE] == largest:
            self.rtt_sample(now - top[TIME], ack_delay, now)
        elif top[NONCE] >= ranges[0][0]:
            # The largest is a message that elicits no ACK (one of our ACKs), received
            # after this record: the sample is an overestimate by at most the peer's
            # delay in acknowledging this record, so the ACK's delay field is not used.
            self.rtt_sample(now - top[TIME], 0.0, now)
        self.acked_sent_max = latest
        self.in_flight -= len(newly)
        if not self.in_flight:
            self.waiting_since = None
        self.pto_count = 0
        self.last_pto = None
        self.last_progress = now
        return newly

    def rtt_sample(self, latest, ack_delay, now):
        """RFC 9002 section 5: one round trip of `latest` seconds, `ack_delay` of it
        spent by the peer holding its ACK."""
        if latest > MAX_RTT_SAMPLE or latest < 0:
            return
        self.latest_rtt = latest
        if not self.has_sample:
            self.has_sample = True
            self.first_sample_time = now
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
        self.pto_base = self.srtt + max(4 * self.rttvar, GRANULARITY) + self.max_ack_delay

    # ------------------------------------------------------------------ losses

    def detect_lost(self, now):
        """RFC 9002 DetectAndRemoveLostPackets, over the records up to the largest
        acknowledged: the records lost (marked LOST, out of flight), oldest first, or
        None.  Sets loss_time for the first record not yet lost by time."""
        self.loss_time = None
        largest = self.largest_acked
        if not largest:
            return None
        rtt = self.latest_rtt if self.latest_rtt > self.srtt else self.srtt
        delay = TIME_THRESHOLD * rtt
        if delay < GRANULARITY:
            delay = GRANULARITY
        lost_before = now - delay
        seq_limit = self.largest_acked_seq - PACKET_THRESHOLD
        recs = self.recs
        lost = None
        for k in range(self.head, len(recs)):
            rec = recs[k]
            if rec[NONCE] > largest:
                break
            if rec[STATE] != IN_FLIGHT:
                continue
            if rec[SEQ] <= seq_limit or rec[TIME] <= lost_before:
                rec[STATE] = LOST
                if lost is None:
                    lost = [rec]
                else:
                    lost.append(rec)
            else:
                self.loss_time = rec[TIME] + delay
                break
        if lost:
            self.in_flight -= len(lost)
            if not self.in_flight:
                self.waiting_since = None
        return lost

    def all_lost(self):
        """Every record in flight, declared lost at once (the path it went on is gone),
        oldest first; the PTO back-off and the run of losses start afresh."""
        lost = list(self.in_flight_records())
        for rec in lost:
            rec[STATE] = LOST
        self.in_flight = 0
        self.waiting_since = None
        self.pto_count = 0
        self.last_pto = None
        self.loss_run = None
        return lost

    def persistent(self, lost):
        """RFC 9002 7.6, for records just declared lost: True when they complete a run
        of losses in a row (none sent between them acknowledged), sent after the first
        RTT sample, over more than PERSISTENT_CONGESTION PTO periods.  The run may grow
        over several detections (a blackout); each run is declared once."""
        first = self.first_sample_time
        if first is None:
            return False
        span = self.pto_base * PERSISTENT_CONGESTION
        run = self.loss_run
        declared = False
        for rec in lost:
            t = rec[TIME]
            if t < first:
                continue
            if run is None or self.acked_sent_max > run[1]:
                # something sent after the run was acknowledged: a new run starts
                run = self.loss_run = [t, t, False]
            elif t > run[1]:
                run[1] = t
            elif t < run[0]:
                run[0] = t
            if not run[2] and run[1] - run[0] > span:
                run[2] = declared = True
        return declared

    def advance_head(self):
        """Move past the records done with (acknowledged or lost); drop them from the
        lists now and then."""
        recs = self.recs
        head = self.head
        total = len(recs)
        while head < total and recs[head][STATE] != IN_FLIGHT:
            head += 1
        if head > 1024 and head * 2 > total:
            del recs[:head]
            del self.nonces[:head]
            head = 0
        self.head = head

    # ------------------------------------------------------------------ timers

    def pto_period(self):
        """The PTO with its backoff, capped at max_pto."""
        count = self.pto_count
        period = self.pto_base * (1 << count) if count < 30 else self.max_pto
        return period if period < self.max_pto else self.max_pto

    def deadline(self):
        """When loss detection or the PTO must run (on_timer of the caller), or None."""
        if self.loss_time is not None:
            return self.loss_time
        if self.in_flight:
            return self.last_ae_sent + self.pto_period()
        return None

    def pto_due(self, due):
        """True when the PTO has expired by `due` (no loss timer is set)."""
        return bool(self.in_flight) and due >= self.last_ae_sent + self.pto_period()

    def on_pto(self, now):
        """The PTO fired: one more in a row.  Returns the records declared lost because
        PTO_LOST_AFTER PTOs came in a row (those sent before the previous PTO), or None;
        the caller sends PROBES messages."""
        self.pto_count += 1
        lost = None
        if self.pto_count >= PTO_LOST_AFTER and self.last_pto is not None:
            before = self.last_pto
            lost = []
            recs = self.recs
            for k in range(self.head, len(recs)):
                rec = recs[k]
                if rec[TIME] >= before:
                    break
                if rec[STATE] == IN_FLIGHT:
                    rec[STATE] = LOST
                    lost.append(rec)
            self.in_flight -= len(lost)
            if not self.in_flight:
                self.waiting_since = None
        self.last_pto = now
        return lost

    def unreachable_for(self, now):
        """Seconds spent waiting for the peer to acknowledge anything new (0.0 when
        everything sent was acknowledged)."""
        since = self.waiting_since
        if since is None:
            return 0.0
        if self.last_progress is not None and self.last_progress > since:
            since = self.last_progress
        return max(0.0, now - since)
