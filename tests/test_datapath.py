"""Drop counting (datapath.Drops), without sockets: counts by reason for status, counts
taken over from elsewhere, a predecessor's restored, and the log's summaries."""

from collections import Counter

from udpmux.datapath import DROP_LOG_EVERY, Drops
from udpmux.reasons import R_MAC, R_QUEUE, R_RECEIVE, R_REPLAY, R_SEND, REASONS


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, fmt, *args):
        self.lines.append(fmt % args)


def test_drops_count_by_reason():
    drops = Drops(Log(), "tunnel t")
    drops(R_MAC)
    drops(R_MAC)
    drops(R_REPLAY, 5)
    assert drops.counts == {R_MAC: 2, R_REPLAY: 5}
    assert set(drops.counts) <= set(REASONS)


def test_take_counts_a_counter_under_one_reason_and_clears_it():
    drops = Drops(Log(), "t")
    errors = Counter({111: 3, 105: 2})          # a batch's errors, by errno
    drops.take(errors, R_SEND)
    assert drops.counts == {R_SEND: 5} and not errors
    drops.take(errors, R_SEND)                  # nothing new: nothing counted
    assert drops.counts == {R_SEND: 5}


def test_take_without_a_reason_counts_under_the_counters_own_reasons():
    drops = Drops(Log(), "t")
    drops(R_QUEUE)
    carrier = {R_QUEUE: 2, R_RECEIVE: 1}
    drops.take(carrier)
    assert drops.counts == {R_QUEUE: 3, R_RECEIVE: 1} and carrier == {}


def test_restored_counts_add_to_the_totals_but_not_to_the_next_summary():
    log = Log()
    drops = Drops(log, "tunnel t")
    drops.restore({R_MAC: 7, R_SEND: 1})
    drops(R_MAC)
    assert drops.counts == {R_MAC: 8, R_SEND: 1}
    drops.tick(0.0)
    drops.tick(DROP_LOG_EVERY)
    assert log.lines == [f"tunnel t: dropped in the last {DROP_LOG_EVERY:.0f} s: mac 1"]


def test_the_log_gets_a_summary_at_most_once_an_interval_and_status_keeps_the_totals():
    log = Log()
    drops = Drops(log, "tunnel t", interval=60.0)
    drops.tick(0.0)
    drops(R_MAC, 3)
    drops(R_REPLAY)
    drops.tick(59.0)
    assert log.lines == []
    drops.tick(60.0)
    assert log.lines == ["tunnel t: dropped in the last 60 s: mac 3, replay 1"]
    drops.tick(120.0)                           # nothing dropped since: no line
    drops(R_MAC)
    drops.tick(150.0)
    assert len(log.lines) == 1
    drops.tick(180.0)
    assert log.lines[-1] == "tunnel t: dropped in the last 60 s: mac 1"
    assert drops.counts == {R_MAC: 4, R_REPLAY: 1}
