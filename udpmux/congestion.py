"""Congestion control for the stream engine: how many bytes may be in flight.

A controller owns the congestion window and the count of bytes in flight, and nothing
else.  The engine (Connection, udpmux/stream.py) tells it what was sent, acknowledged
and lost, and asks it before each message whether the window has room:

    can_send(planned)               room for `planned` bytes more (returned to the
                                    caller, not yet sent)?  A no also notes that the
                                    window, not the application, limits sending
    on_packet_sent(size, now, rec)  an ack-eliciting message went out (rec: its record,
                                    to which a controller may append fields of its own)
    pace(now), paced, next_send_at(), app_limited()
                                    a pacing controller's (udpmux/bbr.py): the engine
                                    refills its bucket before sending, wakes when it is
                                    paced, and says when it had nothing more to send
    on_packets_acked(records, now)  records of udpmux/recovery.py, just acknowledged
    on_packets_lost(records, now)   records just declared lost; True when this is a
                                    new congestion event (the window was reduced)
    on_persistent_congestion(now)   recovery found persistent congestion (RFC 9002 7.6)
    on_packets_discarded(records)   records gone with a path that changed: out of flight,
                                    and no sign of congestion
    snapshot(), restore(state)      the window as it was while the path worked, and back
                                    to it once a path works again after an outage

CongestionController is that interface; NewReno (RFC 9002 section 7) is the one
Connection uses unless given another (Connection(congestion=...): a class called with
(max_datagram, max_window)).  A record is a list; a controller reads its SIZE and TIME
(udpmux/recovery.py) and must not change it.
"""

from udpmux.recovery import SIZE, TIME

INITIAL_PACKETS = 10
MINIMUM_PACKETS = 2


class CongestionController:
    """The interface, with the bookkeeping of bytes in flight.

    Attributes the engine reads: cwnd (bytes, for stats), ssthresh (inf when the
    controller has none), bytes_in_flight; cwnd_limited is set by can_send() and
    cleared by the engine at each round of sending."""

    def __init__(self, max_datagram, max_window):
        self.max_datagram = max_datagram
        self.max_window = max_window
        self.cwnd = float(min(INITIAL_PACKETS * max_datagram, max(14720, 2 * max_datagram)))
        self.ssthresh = float("inf")
        self.bytes_in_flight = 0
        self.cwnd_limited = False

    def can_send(self, planned):
        if self.bytes_in_flight + planned >= self.cwnd:
            self.cwnd_limited = True
            return False
        return True

    def on_packet_sent(self, size, now, rec=None):
        self.bytes_in_flight += size

    def on_packets_acked(self, records, now):
        for rec in records:
            self.bytes_in_flight -= rec[SIZE]

    def on_packets_lost(self, records, now):
        for rec in records:
            self.bytes_in_flight -= rec[SIZE]
        return False

    def on_persistent_congestion(self, now):
        pass

    def on_packets_discarded(self, records):
        for rec in records:
            self.bytes_in_flight -= rec[SIZE]

    def snapshot(self):
        return (self.cwnd, self.ssthresh)

    def restore(self, state):
        self.cwnd, self.ssthresh = state


class NewReno(CongestionController):
    """RFC 9002 section 7: slow start, then one datagram a round trip; half the window
    at a loss, once per recovery period (keyed by the sent time of the lost message);
    the minimum window at persistent congestion.  The window grows only while it is
    what limits sending (RFC 9002 7.8), and not beyond max_window."""

    def __init__(self, max_datagram, max_window):
        super().__init__(max_datagram, max_window)
        self.min_window = MINIMUM_PACKETS * max_datagram
        self.max_cwnd = max(max_window, 4 * self.min_window)
        self.recovery_start = None

    def on_packets_acked(self, records, now):
        acked = 0
        grow = 0
        recovery = self.recovery_start
        for rec in records:
            size = rec[SIZE]
            acked += size
            if recovery is None or rec[TIME] > recovery:
                grow += size
        limited = self.cwnd_limited or 2 * self.bytes_in_flight >= self.cwnd
        self.bytes_in_flight -= acked
        if grow and limited and self.cwnd < self.max_cwnd:
            if self.cwnd < self.ssthresh:
                self.cwnd += grow
            else:
                self.cwnd += self.max_datagram * grow / self.cwnd

    def on_packets_lost(self, records, now):
        lost = 0
        for rec in records:
            lost += rec[SIZE]
        self.bytes_in_flight -= lost
        newest = records[-1][TIME]
        if self.recovery_start is None or newest > self.recovery_start:
            self.recovery_start = now
            self.ssthresh = max(self.cwnd * 0.5, self.min_window)
            self.cwnd = self.ssthresh
            return True
        return False

    def on_persistent_congestion(self, now):
        self.cwnd = self.min_window
        self.recovery_start = None

    def restore(self, state):
        super().restore(state)
        self.recovery_start = None
