"""The model-based congestion controller (udpmux/bbr.py) in the simulated network of
tests/netsim.py: deterministic, so what is asserted is what the algorithm does, on
simulated time, never the wall clock."""

import random

import pytest

from netsim import App, Link, Sim, bulk
from udpmux.bbr import PROBE_BW, STARTUP, Bbr
from udpmux.congestion import NewReno
from udpmux.stream import Connection

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


# -- windows that follow the path

BUFFER = 32 << 20


def grown(rtt, loss=0.0, buffer=BUFFER, window_start=256 << 10, read_rate=None,
          megabytes=20):
    """A download with windows that start small: (simulated seconds, the receiver's
    largest grant past its reads, its stream's largest window)."""
    rng = random.Random(1)
    payload = random.Random(2).randbytes(megabytes * 1_000_000)
    ends = [Connection(side, congestion=Bbr, stream_window=buffer, session_buffer=buffer,
                       window_start=window_start) for side in (True, False)]
    sim = Sim(*ends, Link(rng, rtt / 2, RATE, 256 * 1024, loss),
              Link(rng, rtt / 2, RATE, 256 * 1024, loss),
              App(ends[0], lambda sid: payload, opens=1),
              App(ends[1], lambda sid: b"", read_rate=read_rate))
    seen = {"ahead": 0, "window": 0}

    def on_step(sim):
        st = ends[1]._streams.get(1)
        if st is not None:
            seen["ahead"] = max(seen["ahead"], st.rwin - st.roff)
            seen["window"] = max(seen["window"], st.wsize)

    sim.on_step = on_step
    seconds = sim.run()
    assert bytes(sim.apps[1].got[1]) == payload, "the stream did not arrive byte-exact"
    return seconds, seen["ahead"], seen["window"]


@pytest.mark.parametrize("loss", [0.0, 0.01])
def test_a_window_grows_until_it_fills_a_long_path(loss):
    """200 ms at 20 MB/s holds 4 MB: a window that starts at 256 KiB grows past that,
    with loss too (bytes held behind a loss fill the window while the sender waits),
    and the download takes about as long as with the whole buffer granted at once
    (simulated seconds: 3.2 against 3.0 clean, 3.9 against 3.3 at 1 %), where a window
    that stayed at 256 KiB (1.3 MB/s) would take 16."""
    seconds, _ahead, window = grown(0.2, loss)
    fixed, _ahead, _window = grown(0.2, loss, window_start=BUFFER)
    assert window >= 0.2 * RATE
    assert seconds < 1.4 * fixed


def test_a_window_never_grows_past_the_buffer():
    limit = 2 << 20
    _seconds, ahead, window = grown(0.2, buffer=limit)
    assert window == limit and ahead <= limit


def test_on_a_short_path_a_window_stays_small():
    """1 ms at 20 MB/s holds 20 KB: the window stays far from the 32 MiB it may take
    (a sender's burst of 64 messages may make it grow once)."""
    _seconds, ahead, window = grown(0.001)
    assert window <= 1 << 20 and ahead <= 1 << 20


def test_a_slow_reader_keeps_its_window_small():
    """A reader of 0.5 MB/s on a 200 ms path needs 100 KB ahead of it, not the buffer."""
    _seconds, ahead, window = grown(0.2, read_rate=0.5e6, megabytes=2)
    assert window <= 1 << 20 and ahead <= 1 << 20


# -- a model built while the application sent little

def test_a_round_of_a_few_messages_tells_no_share_lost():
    """One message of four lost is 25 %, whatever the path's loss: STARTUP goes on,
    nothing is taken for congestion, and the share is told once 50 messages count."""
    cc = Bbr(1200, 32 << 20)
    cc.round_delivered, cc.round_lost = 3 * 1200, 1200
    cc.new_round()
    assert cc.state == STARTUP and cc.cap is None
    cc.round_delivered += 46 * 1200             # they count with the next rounds'
    cc.new_round()
    assert cc.state == STARTUP and cc.round_lost == 0


def test_a_download_after_an_upload_finds_the_path():
    """An upload, then a download in the same session, at 50 ms with 10 % loss: the
    server, which only sent WINDOWs and ACKs while it received, finds the path's
    bandwidth for the download as a fresh session would (simulated seconds: 1.9 up,
    1.9 down; 15 down when a loss share taken from rounds of a few messages, or the
    cap it set, outlived the upload)."""
    rng = random.Random(1)
    payload = random.Random(2).randbytes(20_000_000)
    ends = [Connection(side, congestion=Bbr, stream_window=BUFFER, session_buffer=BUFFER,
                       window_start=256 << 10) for side in (True, False)]
    client, server = (App(ends[0], lambda sid: payload, opens=1),
                      App(ends[1], lambda sid: b"" if sid == 1 else payload))
    sim = Sim(*ends, Link(rng, 0.025, RATE, 256 * 1024, 0.10),
              Link(rng, 0.025, RATE, 256 * 1024, 0.10), client, server)
    up = sim.run()
    client.data_for = lambda sid: b""
    client.opens = 0
    client.start(up)
    client._add(ends[0].open_stream())
    down = sim.run(until=up + 60) - up
    assert bytes(client.got[3]) == payload
    assert down < 2 * up
