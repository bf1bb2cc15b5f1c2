"""A model-based congestion controller for the stream engine, after BBR: it sends at the
bottleneck bandwidth it measures and keeps about two bandwidth-delay products in flight,
so that random loss, which barely changes the rate at which data is delivered, does not
cut the rate as a loss-based controller (NewReno, congestion.py) does.

    bandwidth   the windowed maximum, over BW_ROUNDS round trips, of delivery-rate
                samples: bytes delivered between a message's send and its ACK over the
                longer of the two intervals (as in draft-cheng-iccrg-delivery-rate-
                estimation); samples taken while the sender had nothing to send count
                only when they raise the estimate
    min_rtt     the smallest round trip seen in MIN_RTT_WINDOW seconds
    BDP         bandwidth x min_rtt
    phases      STARTUP (pacing and window gain 2.89, until the bandwidth grew less than
                25 % in three rounds the application filled; again when data come
                after the estimate was only the application's, an idle terminal
                before a download), DRAIN (what STARTUP queued drains), PROBE_BW
                (gains 1.25, 0.75, then 1 for six rounds, over and over), PROBE_RTT
                (half the BDP, at least four messages, in flight for 0.2 s when
                min_rtt is MIN_RTT_WINDOW old: the queue drains, the stream moves)
    window      cwnd_gain x BDP + 64 messages, a batch (at least 4 messages)
    pacing      pacing_gain x bandwidth, as a token bucket (pace(now), next_send_at())
    loss        random loss is measured, not punished: the "ambient" loss is the average
                share lost in rounds that cruise (pacing gain at most 1, in flight about
                one BDP, so nothing queues).  A round that loses more than twice that
                (at least 2 %) is congestion: in-flight is capped at 0.7 x the window,
                never below the BDP, and the cap grows 5 % each round that does not.
                STARTUP ends at a round that loses 20 %.  Persistent
                congestion (an outage) empties the window to the minimum; the rate model
                stays, and the window is back within a round once ACKs come again

Each record (udpmux/recovery.py) carries, after the recovery's own fields, the delivery
state when it was sent: DELIVERED, DELIVERED_TIME, FIRST_SENT, APP_LIMITED.
"""

from collections import deque

from udpmux.congestion import INITIAL_PACKETS, MINIMUM_PACKETS, CongestionController
from udpmux.recovery import SIZE, TIME

DELIVERED, DELIVERED_TIME, FIRST_SENT, APP_LIMITED = 8, 9, 10, 11

STARTUP, DRAIN, PROBE_BW, PROBE_RTT = "startup", "drain", "probe_bw", "probe_rtt"
HIGH_GAIN = 2.885                   # 2 / ln 2: doubles the rate each round trip
CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
CWND_GAIN = 2.0
BW_ROUNDS = 10                      # round trips the bandwidth maximum looks back
FULL_BW_GROWTH = 1.25               # STARTUP ends when three rounds grew less than this
FULL_BW_ROUNDS = 3
MIN_RTT_WINDOW = 10.0               # seconds a min_rtt sample stands
PROBE_RTT_TIME = 0.2
PROBE_RTT_PACKETS = 4               # in flight during PROBE_RTT: at least this many
PROBE_RTT_GAIN = 0.5                # messages, and half the BDP (as BBRv2): the stream
                                    # keeps moving while the queue drains
STARTUP_LOSS = 0.2                  # share of a round's bytes lost that ends STARTUP
LOSS_MIN = 0.02                     # past STARTUP, a round losing more than the larger of
AMBIENT_FACTOR = 2.0                # this and twice the ambient loss (+ LOSS_MARGIN) is
LOSS_MARGIN = 0.01                  # congested ...
LOSS_MAX = 0.3                      # ... and always above this
QUANTUM_PACKETS = 64                # above 2 BDP, the window holds one batch of sends:
                                    # ACKs come a batch at a time, on a short path too
ROUND_MESSAGES = 50                 # a share lost is told over this many messages at least
AMBIENT_WEIGHT = 0.125              # EWMA weight of a cruising round's loss in the ambient
LOSS_CAP = 0.7                      # in-flight cap after a congested round, of the window
CAP_GROWTH = 1.05                   # the cap grows this much each clean round
INITIAL_RTT_GUESS = 0.1             # for the pacing rate before the first sample
BURST = 0.005                       # seconds of the pacing rate that may leave at once


class Bbr(CongestionController):
    """The controller (see the module docstring); attributes for stats: state, btl_bw
    (bytes/s), min_rtt (s), pacing_rate (bytes/s), cwnd."""

    def __init__(self, max_datagram, max_window):
        super().__init__(max_datagram, max_window)
        self.min_window = MINIMUM_PACKETS * max_datagram
        self.max_cwnd = max(max_window, 4 * self.min_window)
        self.delivered = 0
        self.delivered_time = 0.0
        self.first_sent = 0.0
        self.app_limited_mark = 0           # while not 0, what is sent is app-limited,
                                            # until delivered passes it
        self.samples = deque()              # (round, bandwidth), the max filter
        self.btl_bw = 0.0
        self.round = 0
        self.round_end = 0                  # delivered at which the round ends
        self.round_lost = self.round_delivered = 0
        self.full_bw = 0.0
        self.full_bw_count = 0
        self.filled = False                 # STARTUP found the bandwidth
        self.sample_app_limited = False     # the latest sample measured the application
        self.bw_app_limited = False         # and so does the bandwidth estimate
        self.min_rtt = None
        self.min_rtt_at = 0.0
        self.state = STARTUP
        self.pacing_gain = self.cwnd_gain = HIGH_GAIN
        self.cycle = 0
        self.cycle_at = 0.0
        self.probe_rtt_done = None
        self.prior_cwnd = None
        self.cap = None                     # in-flight cap after congestion, or None
        self.congested = False              # a round found congestion: said at next loss
        self.ambient = 0.0                  # the share of bytes lost while cruising
        self.pacing_rate = HIGH_GAIN * self.cwnd / INITIAL_RTT_GUESS
        self.tokens = float(INITIAL_PACKETS * max_datagram)
        self.tokens_at = None
        self.paced = False                  # can_send() said no for want of tokens

    # -- the engine's calls

    def pace(self, now):
        """Refill the pacing bucket up to `now`; the engine calls it before sending."""
        if self.tokens_at is not None:
            self.tokens += (now - self.tokens_at) * self.pacing_rate
            most = max(4 * self.max_datagram, self.pacing_rate * BURST)
            if self.tokens > most:
                self.tokens = most
        self.tokens_at = now
        self.paced = False

    def can_send(self, planned):
        if self.bytes_in_flight + planned >= self.cwnd:
            self.cwnd_limited = True
            return False
        if planned >= self.tokens + self.max_datagram:
            self.paced = True
            return False
        return True

    def next_send_at(self):
        """When the bucket holds a message again (only meaningful while paced)."""
        need = self.max_datagram - self.tokens
        if need <= 0 or self.tokens_at is None:
            return self.tokens_at or 0.0
        return self.tokens_at + need / self.pacing_rate

    def app_limited(self):
        """The engine had nothing more to send: samples until what is in flight now is
        delivered measure the application, not the path."""
        self.app_limited_mark = max(self.delivered + self.bytes_in_flight, 1)

    def on_packet_sent(self, size, now, rec=None):
        if not self.bytes_in_flight:
            self.first_sent = self.delivered_time = now
        if rec is not None:
            rec.extend((self.delivered, self.delivered_time, self.first_sent,
                        self.app_limited_mark != 0))
        self.bytes_in_flight += size
        self.tokens -= size

    def on_packets_acked(self, records, now):
        acked = sum(rec[SIZE] for rec in records)
        self.bytes_in_flight -= acked
        self.delivered += acked
        self.round_delivered += acked
        if self.app_limited_mark and self.delivered > self.app_limited_mark:
            self.app_limited_mark = 0
        self.delivered_time = now
        last = records[-1]
        if len(last) <= APP_LIMITED:        # sent before this controller kept state
            return
        self.first_sent = last[TIME]
        rtt = now - last[TIME]
        if self.min_rtt is None or rtt <= self.min_rtt or now - self.min_rtt_at > MIN_RTT_WINDOW:
            if self.min_rtt is not None and rtt > self.min_rtt and self.state != PROBE_RTT:
                self.enter_probe_rtt(now)
            self.min_rtt = rtt
            self.min_rtt_at = now
        interval = max(last[TIME] - last[FIRST_SENT], now - last[DELIVERED_TIME])
        self.sample_app_limited = last[APP_LIMITED]
        if interval > 0:
            bw = (self.delivered - last[DELIVERED]) / interval
            if not last[APP_LIMITED] or bw >= self.btl_bw:
                self.add_sample(bw, last[APP_LIMITED])
            if not last[APP_LIMITED] and self.bw_app_limited and self.state == PROBE_BW:
                # The model knows only what the application asked for (an idle terminal,
                # then a download): find the path's bandwidth as at the start.
                self.restart()
        if last[DELIVERED] >= self.round_end:
            self.new_round()
        self.advance(now)
        self.set_window(acked)

    def on_packets_lost(self, records, now):
        lost = sum(rec[SIZE] for rec in records)
        self.bytes_in_flight -= lost
        self.round_lost += lost
        congested, self.congested = self.congested, False
        return congested

    def on_persistent_congestion(self, now):
        self.prior_cwnd = max(self.prior_cwnd or 0, self.cwnd)
        self.cwnd = self.min_window

    def restore(self, state):
        super().restore(state)
        self.cap = None

    # -- the model

    def add_sample(self, bw, app_limited=False):
        samples = self.samples
        while samples and samples[-1][1] <= bw:
            samples.pop()
        samples.append((self.round, bw, app_limited))
        while samples[0][0] <= self.round - BW_ROUNDS:
            samples.popleft()
        self.btl_bw = samples[0][1]
        self.bw_app_limited = samples[0][2]

    def restart(self):
        """STARTUP again: the path's bandwidth is measured afresh, without the cap an
        earlier model's congestion left."""
        self.state = STARTUP
        self.pacing_gain = self.cwnd_gain = HIGH_GAIN
        self.cap = None
        self.filled = False
        self.full_bw = 0.0
        self.full_bw_count = 0

    def new_round(self):
        """A round trip ended: its share of bytes lost tells congestion from noise."""
        self.round += 1
        self.round_end = self.delivered + self.bytes_in_flight
        sent = self.round_delivered + self.round_lost
        share = self.round_lost / sent if sent else 0.0
        if sent < ROUND_MESSAGES * self.max_datagram:
            # too few messages to tell a share lost (one of four is 25 %, at any loss):
            # they count with the next round's
            share = 0.0
        else:
            self.round_lost = self.round_delivered = 0
            if self.state == PROBE_BW and self.pacing_gain <= 1.0:
                self.ambient += AMBIENT_WEIGHT * (share - self.ambient)
        if self.state == STARTUP:
            if share > STARTUP_LOSS:
                self.enter_drain()
        elif share > min(LOSS_MAX, max(LOSS_MIN, AMBIENT_FACTOR * self.ambient + LOSS_MARGIN)) \
                and not self.sample_app_limited:
            # (a round the application did not fill, a receiver's WINDOWs, was no
            # congestion of ours, whatever it lost)
            # Never below the BDP: loss alone, however heavy, does not starve the path.
            cap = max(self.bdp(), LOSS_CAP * max(self.cwnd, self.bytes_in_flight))
            if self.cap is None or cap < self.cap:
                self.cap = cap
                self.congested = True
        elif self.cap is not None:
            self.cap *= CAP_GROWTH
            if self.cap > self.max_cwnd:
                self.cap = None
        if self.state == STARTUP and not self.sample_app_limited:
            # A round the application did not fill says nothing of the path's bandwidth.
            if self.btl_bw >= self.full_bw * FULL_BW_GROWTH:
                self.full_bw = self.btl_bw
                self.full_bw_count = 0
            else:
                self.full_bw_count += 1
                if self.full_bw_count >= FULL_BW_ROUNDS:
                    self.enter_drain()

    def bdp(self, gain=1.0):
        if self.min_rtt is None or not self.btl_bw:
            return INITIAL_PACKETS * self.max_datagram
        return gain * self.btl_bw * self.min_rtt

    def enter_drain(self):
        self.filled = True
        self.state = DRAIN
        self.pacing_gain = 1 / HIGH_GAIN
        self.cwnd_gain = HIGH_GAIN

    def enter_probe_bw(self, now):
        self.state = PROBE_BW
        self.cwnd_gain = CWND_GAIN
        self.cycle = 2                      # start cruising: not at once above the rate
        self.cycle_at = now
        self.pacing_gain = CYCLE[self.cycle]

    def enter_probe_rtt(self, now):
        self.state = PROBE_RTT
        self.pacing_gain = 1.0
        self.prior_cwnd = max(self.prior_cwnd or 0, self.cwnd)
        self.probe_rtt_done = now + PROBE_RTT_TIME

    def advance(self, now):
        state = self.state
        if state == DRAIN and self.bytes_in_flight <= self.bdp():
            self.enter_probe_bw(now)
        elif state == PROBE_BW and self.min_rtt is not None \
                and now - self.cycle_at > self.min_rtt:
            gain = self.pacing_gain
            if gain > 1 and self.bytes_in_flight < self.bdp(gain):
                return                      # probing: not yet at the higher in-flight
            if gain < 1 and self.bytes_in_flight > self.bdp():
                return                      # draining: not yet down to the BDP
            self.cycle = (self.cycle + 1) % len(CYCLE)
            self.cycle_at = now
            self.pacing_gain = CYCLE[self.cycle]
        elif state == PROBE_RTT and now >= self.probe_rtt_done:
            self.min_rtt_at = now
            if self.prior_cwnd is not None:
                self.cwnd = max(self.cwnd, self.prior_cwnd)
                self.prior_cwnd = None
            if self.filled:
                self.enter_probe_bw(now)
            else:
                self.state = STARTUP
                self.pacing_gain = self.cwnd_gain = HIGH_GAIN

    def set_window(self, acked):
        if self.btl_bw:
            rate = self.pacing_gain * self.btl_bw
            self.pacing_rate = max(rate, 4 * self.max_datagram / (self.min_rtt or 1.0))
        if self.state == PROBE_RTT:
            self.cwnd = max(PROBE_RTT_PACKETS * self.max_datagram, self.bdp(PROBE_RTT_GAIN))
            return
        target = self.bdp(self.cwnd_gain) + QUANTUM_PACKETS * self.max_datagram
        if not self.filled:
            cwnd = self.cwnd + acked        # grow as fast as ACKs come, as in slow start
            if cwnd > target and self.btl_bw:
                cwnd = max(target, self.cwnd)
        else:
            cwnd = min(self.cwnd + acked, target)
        if self.prior_cwnd is not None and self.state != PROBE_RTT:
            cwnd = max(cwnd, min(self.prior_cwnd, target))
            self.prior_cwnd = None
        if self.cap is not None and cwnd > self.cap:
            cwnd = self.cap
        self.cwnd = min(max(cwnd, 4 * self.max_datagram), self.max_cwnd)
