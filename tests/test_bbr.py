"""The model-based congestion controller (udpmux/bbr.py) in the simulated network of
tests/netsim.py: deterministic, so what is asserted is what the algorithm does, on
simulated time, never the wall clock."""

import pytest

from netsim import bulk
from udpmux.bbr import PROBE_BW, STARTUP, Bbr
from udpmux.congestion import NewReno

RATE = 20e6                         # bytes/s at the bottleneck
WINDOWS = dict(stream_window=8 << 20, session_buffer=32 << 20)


def run(loss, rtt=0.05, queue=256 * 1024, megabytes=10, congestion=Bbr):
    sim, seconds, ok = bulk(megabytes, loss, rtt=rtt, rate=RATE, queue=queue,
                            congestion=congestion, **WINDOWS)
    assert ok, "the stream did not arrive byte-exact"
    return sim.conns[0], seconds


@pytest.mark.parametrize("loss", [0.01, 0.05, 0.10])
def test_random_loss_leaves_the_bandwidth_estimate_near_the_path(loss):
    conn, _seconds = run(loss, megabytes=30)
    cc = conn.cc
    assert cc.state == PROBE_BW
    assert cc.btl_bw > 0.8 * RATE               # the model sees the path, not the loss
    assert cc.ambient == pytest.approx(loss, abs=0.03)   # and measures the loss as noise
    assert cc.cap is None or cc.cap >= cc.bdp()  # which never starves the window


def test_at_five_percent_loss_it_moves_a_stream_far_sooner_than_newreno():
    _conn, bbr = run(0.05)
    _conn, newreno = run(0.05, congestion=NewReno)
    assert bbr * 10 < newreno                   # simulated seconds: 0.8 against 40


def test_a_shallow_queue_that_overflows_is_congestion():
    conn, _seconds = run(0.0, queue=64 * 1024, megabytes=40)
    assert conn.counts["congestion_events"] >= 1
    assert conn.cc.ambient < 0.05


def test_startup_fills_the_pipe_then_leaves():
    conn, _seconds = run(0.0, megabytes=10)
    assert conn.cc.state != STARTUP and conn.cc.filled


def test_after_an_outage_the_window_comes_back_from_the_model():
    """Persistent congestion empties the window; the first ACKs after it bring back
    what the model says the path holds."""
    cc = Bbr(1200, 32 << 20)
    cc.add_sample(RATE)
    cc.min_rtt, cc.min_rtt_at, cc.filled, cc.state = 0.05, 10.0, True, PROBE_BW
    cc.cwnd = cc.bdp(2) + 3 * 1200
    before = cc.cwnd
    cc.on_persistent_congestion(10.0)
    assert cc.cwnd == cc.min_window
    rec = [1, 1, 10.0, 1200, 0, 1, None, 1]
    cc.on_packet_sent(1200, 10.0, rec)
    cc.on_packets_acked([rec], 10.05)
    assert cc.cwnd >= 0.9 * before
