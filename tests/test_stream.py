"""The reliable-stream engine (udpmux/stream.py), in virtual time.

Two Connections talk through the simulator of tests/netsim.py: a priority queue of
(arrival time, message), per-direction delay, bottleneck, random loss, reordering,
duplication and blackouts, and a virtual clock.  Sealing and opening are left out: each
side numbers its messages from 1 as a Session would, and the receiver gets (nonce, type,
tag, body) directly.  Every assertion about speed is about virtual time, never the
wall clock.
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsim import RATE, RTT, App, Link, Sim, bulk
from udpmux import stream as S
from udpmux.recovery import Recovery
from udpmux.stream import Connection, ProtocolError, StreamClosed
from udpmux.wire import (
    ACK, ACK_RANGE, HEADER_SIZE, MAC_SIZE, STREAM, STREAM_FIN, T_ACK, T_DATA, T_KEEPALIVE,
    T_RESET, T_STREAM, T_WINDOW, WINDOW,
)

ENGINE_TYPES = (T_STREAM, T_ACK, T_WINDOW, T_RESET)


# -- helpers

def pair(**settings):
    return Connection(True, **settings), Connection(False, **settings)


def make_sim(up, down, seed=0, client_settings=None, server_settings=None, link=None,
             down_link=None, read_rate=None, server_read_rate=None, opens=None):
    """A Sim where the client opens len(up) streams and writes up[i] on the i-th; the
    server writes down[i] on the same stream; both finish and read everything."""
    rng = random.Random(seed)
    client = Connection(True, **(client_settings or {}))
    server = Connection(False, **(server_settings or {}))
    up_data = {2 * i + 1: data for i, data in enumerate(up)}
    down_data = {2 * i + 1: data for i, data in enumerate(down)}
    link = dict(link or {})
    down_link = dict(down_link if down_link is not None else link)
    capp = App(client, lambda sid: up_data.get(sid, b""),
               opens=len(up) if opens is None else opens, read_rate=read_rate)
    sapp = App(server, lambda sid: down_data.get(sid, b""), read_rate=server_read_rate)
    sim = Sim(client, server, Link(rng, **link), Link(rng, **down_link), capp, sapp)
    sim.up_data = up_data
    sim.down_data = down_data
    return sim


def assert_delivered(sim):
    capp, sapp = sim.apps
    assert set(sapp.got) == set(sim.up_data)
    for sid, data in sim.up_data.items():
        assert bytes(sapp.got[sid]) == data, f"stream {sid} client->server"
        assert bytes(capp.got[sid]) == sim.down_data[sid], f"stream {sid} server->client"
    assert sim.conns[0].all_acknowledged() and sim.conns[1].all_acknowledged()
    assert not capp.resets and not sapp.resets


def random_sizes(rng, n, top):
    return [rng.choice((0, 1, rng.randrange(top), top)) for _ in range(n)]


def payloads(seed, sizes):
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes]


def ack_body(largest, first, ranges=(), delay=0, count=None):
    body = ACK.pack(largest, delay, first, len(ranges) if count is None else count)
    return body + b"".join(ACK_RANGE.pack(g, n) for g, n in ranges)


def stream_body(offset, data=b"", fin=False):
    return STREAM.pack(offset, STREAM_FIN if fin else 0) + data


# -- delivery through the simulated path

PATHS = {
    "clean": dict(delay=RTT / 2),
    "loss-5": dict(delay=RTT / 2, loss=0.05),
    "loss-20": dict(delay=RTT / 2, loss=0.20),
    "reorder": dict(delay=0.005, reorder=0.3, reorder_delay=0.01),
    "duplicate": dict(delay=RTT / 2, duplicate=0.2, reorder_delay=0.002),
    "everything": dict(delay=0.01, rate=2e6, queue=64 * 1024, loss=0.05, reorder=0.1,
                       reorder_delay=0.02, duplicate=0.05),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_byte_exact_both_ways_on_several_streams(path):
    rng = random.Random(path)
    up = payloads(1, random_sizes(rng, 4, 300_000))
    down = payloads(2, random_sizes(rng, 4, 300_000))
    sim = make_sim(up, down, seed=3, link=PATHS[path])
    sim.run(until=300)
    assert_delivered(sim)
    capp, sapp = sim.apps
    assert sorted(sapp.new) == [1, 3, 5, 7]         # the server learned of every stream
    assert capp.acked == sapp.acked == {1, 3, 5, 7}
    # once both directions ended, both ends forgot the streams
    assert sim.conns[0].stream_ids() == sim.conns[1].stream_ids() == []
    sim.drain()
    for conn in sim.conns:
        assert conn.bytes_in_flight == 0 and conn.committed == 0 and conn.send_buffered == 0


def test_half_close_one_direction_ends_first():
    """The client finishes at once; the server keeps sending long after."""
    up = [b"request"]
    down = payloads(5, [400_000])
    sim = make_sim(up, down, link=dict(delay=0.001, rate=1e6, loss=0.02))
    seen = {}

    def watch(sim):
        if 1 in sim.apps[1].eof and "server eof" not in seen:
            seen["server eof"] = sim.now
            seen["client got then"] = len(sim.apps[0].got[1])
    sim.on_step = watch
    sim.run(until=60)
    assert_delivered(sim)
    assert seen["client got then"] < len(down[0])    # still receiving after the server's EOF


def test_blackout_of_20_seconds_in_the_middle():
    up = payloads(7, [2_000_000])
    down = payloads(8, [500_000])
    blackout = ((0.5, 20.5),)
    link = dict(delay=0.01, rate=1e6, queue=256 * 1024, loss=0.01, blackouts=blackout)
    sim = make_sim(up, down, link=link)
    marks = {}

    def watch(sim):
        got = len(sim.apps[1].got.get(1, b""))
        if sim.now < 0.5:
            marks["before"] = got
        elif sim.now < 20.5:
            assert got == marks["before"] or sim.now < 0.6   # nothing crosses the blackout
            marks["unreachable"] = sim.conns[0].unreachable_for(sim.now)
        elif "after" not in marks and got > marks["before"]:
            marks["after"] = sim.now
    sim.on_step = watch
    sim.run(until=120)
    assert_delivered(sim)
    assert 0 < marks["before"] < len(up[0])          # the blackout came mid-transfer
    assert marks["unreachable"] > 15                  # the caller can see the silence
    assert marks["after"] - 20.5 < 1.5                # data flows again within ~max_pto
    assert sim.conns[0].counts["ptos"] >= 5
    assert sim.conns[0].counts["persistent_congestion"] >= 1


def test_laptop_sleep_mid_transfer():
    """Both ends stop for two hours (no timers, whatever was on the wire is gone), then
    the clock jumps: the transfer resumes at once and completes."""
    up = payloads(20, [1_000_000])
    down = payloads(21, [200_000])
    sim = make_sim(up, down, link=dict(delay=0.005, rate=2e6, loss=0.01))
    state = {}

    def sleep(sim):
        if "wake" not in state and sim.now > 0.2:
            state["got"] = len(sim.apps[1].got[1])
            sim.heap.clear()
            sim.now += 7200.0
            state["wake"] = sim.now
            for link in sim.links:
                link.busy_until = sim.now
        elif "wake" in state and "resumed" not in state \
                and len(sim.apps[1].got[1]) > state["got"]:
            state["resumed"] = sim.now
    sim.on_step = sleep
    seconds = sim.run(until=8000)
    assert_delivered(sim)
    assert 0 < state["got"] < len(up[0])
    assert state["resumed"] - state["wake"] < 0.5
    assert seconds - state["wake"] < 3.0
    assert sim.conns[0].srtt < 1.0                    # the sleep is no RTT sample


def test_slow_reader_is_bounded_by_the_windows():
    window = 96 * 1024
    settings = dict(stream_window=window, session_buffer=4 * window)
    up = payloads(9, [600_000, 300_000])
    down = payloads(10, [50_000, 0])
    sim = make_sim(up, down, client_settings=settings, server_settings=settings,
                   link=dict(delay=0.002, loss=0.02), server_read_rate=150_000)
    worst = {"buffered": 0, "ahead": 0}
    limit = max(window, S.INITIAL_WINDOW)

    def check(sim):
        client, server = sim.conns
        for sid, cs in client._streams.items():
            assert cs.snext <= cs.swin                # never beyond the grant
            ss = server._streams.get(sid)
            if ss is None:
                continue
            assert cs.swin <= ss.rwin                 # grants come from the receiver
            buffered = len(ss.rbuf) + ss.obytes
            assert buffered <= ss.rwin - ss.roff <= limit
            assert ss.rend + ss.obytes <= ss.rwin
            worst["buffered"] = max(worst["buffered"], buffered)
            worst["ahead"] = max(worst["ahead"], cs.snext - ss.roff)
            assert cs.snext - cs.sbase <= limit       # unacknowledged: within the window
        assert server.committed <= server.session_buffer
    sim.on_step = check
    seconds = sim.run(until=60)
    assert_delivered(sim)
    assert seconds > 900_000 / 150_000 * 0.9          # the reader set the pace
    assert worst["buffered"] > limit // 2             # ... and the window was used
    assert worst["ahead"] <= limit


def test_many_streams_share_the_session_buffer():
    settings = dict(stream_window=256 * 1024, session_buffer=512 * 1024)
    up = payloads(11, [150_000] * 6)
    down = payloads(12, [1000] * 6)
    sim = make_sim(up, down, client_settings=settings, server_settings=settings,
                   link=dict(delay=0.002, loss=0.03), server_read_rate=400_000)

    def check(sim):
        server = sim.conns[1]
        streams = server._streams.values()
        # grants beyond the INITIAL_WINDOW each stream has come out of session_buffer
        assert sum(max(0, s.commit - S.INITIAL_WINDOW) for s in streams) <= 512 * 1024
        assert server.committed <= 512 * 1024 + len(streams) * S.INITIAL_WINDOW
        total = sum(len(s.rbuf) + s.obytes for s in streams)
        assert total <= server.committed
    sim.on_step = check
    sim.run(until=60)
    assert_delivered(sim)


# -- acknowledgement, reset, refusal

def test_all_acknowledged_only_once_the_peer_acknowledged():
    client, server = pair()
    sid = client.open_stream()
    assert client.all_acknowledged()                  # nothing written yet
    client.write(sid, b"x" * 5000)
    client.finish(sid)
    assert not client.all_acknowledged()
    out = client.messages_to_send(0.0)
    for nonce, m in enumerate(out, 1):
        client.on_sent(nonce, m, 0.0)
        server.on_message(nonce, m.mtype, m.tag, m.body, 0.001)
    assert not client.all_acknowledged()              # delivered, but no ACK yet
    assert server.read(sid) == b"x" * 5000 and server.at_eof(sid)
    back = server.messages_to_send(0.001)
    acks = [m for m in back if m.mtype == T_ACK]
    assert acks
    for nonce, m in enumerate(back, 1):
        server.on_sent(nonce, m, 0.001)
    for nonce, m in enumerate(back, 1):
        if m.mtype == T_ACK:
            client.on_message(nonce, m.mtype, m.tag, m.body, 0.002)
    assert client.all_acknowledged()
    assert (S.EV_ACKED, sid) in [(e.kind, e.sid) for e in client.streams_ready()]


def test_all_acknowledged_stays_false_while_acks_are_lost():
    up = payloads(13, [5_000])                        # within the first flight
    sim = make_sim(up, [b""], link=dict(delay=0.001),
                   down_link=dict(delay=0.001, blackouts=((0.0, 1000.0),)))
    with pytest.raises(TimeoutError):
        sim.run(until=30)
    assert bytes(sim.apps[1].got[1]) == up[0]         # the server has every byte ...
    assert not sim.conns[0].all_acknowledged()        # ... but the client cannot know
    assert sim.conns[0].unreachable_for(sim.now) > 25
    assert 0 < sim.conns[0].next_timer(sim.now) <= 1.0   # still probing, every max_pto


@pytest.mark.parametrize("loss", [0.0, 0.2])
@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_is_reported_to_both_ends(loss, who):
    up = payloads(14, [3_000_000, 20_000])
    down = payloads(15, [3_000_000, 20_000])
    sim = make_sim(up, down, link=dict(delay=0.002, rate=2e6, loss=loss))
    side = 0 if who == "client" else 1
    done = {}

    def reset_midway(sim):
        if "reset" not in done and sim.now > 0.2 and 1 in sim.apps[side].out:
            sim.conns[side].reset(1, 42)
            done["reset"] = sim.now
            assert sim.conns[side].at_eof(1) and sim.conns[side].read(1) == b""
            with pytest.raises(StreamClosed):
                sim.conns[side].write(1, b"more")
            sim.apps[side].resets[1] = "local"
        other = sim.apps[1 - side]
        if 1 in other.resets and "seen" not in done:
            done["seen"] = sim.now
            with pytest.raises(StreamClosed):
                sim.conns[1 - side].write(1, b"more")
    sim.on_step = reset_midway
    other = sim.apps[1 - side]
    sim.apps[side].done = lambda: 3 in sim.apps[side].eof and 1 not in sim.conns[side]._streams
    other.done = lambda: 3 in other.eof and 1 in other.resets
    sim.run(until=120)                                # (run() also waits for all_acknowledged)
    assert other.resets == {1: 42}                     # the peer learned it, with the code
    assert bytes(sim.apps[1].got[3]) == up[1] and bytes(sim.apps[0].got[3]) == down[1]
    assert len(sim.apps[1].got[1]) < len(up[0]) or len(sim.apps[0].got[1]) < len(down[0])
    assert 1 not in sim.conns[0]._streams and 1 not in sim.conns[1]._streams


def test_streams_beyond_max_streams_are_refused():
    up = payloads(16, [1000, 1000, 1000])
    sim = make_sim(up, [b"", b"", b""], server_settings=dict(max_streams=2),
                   link=dict(delay=0.001))
    capp = sim.apps[0]
    capp.done = lambda: {1, 3} <= capp.eof and 5 in capp.resets
    sim.apps[1].done = lambda: {1, 3} <= sim.apps[1].eof
    sim.run(until=30)
    assert capp.resets == {5: S.RESET_REFUSED}
    assert sim.conns[1].counts["streams_refused"] >= 1
    assert sim.apps[1].new == [1, 3]


def test_a_flood_of_streams_ends_the_session_loudly():
    """Refused streams are refused with a RESET kept until acknowledged; a peer that
    opens so many that these cannot be kept is a protocol error, never silence."""
    server = Connection(False, max_streams=1)
    server.on_message(1, T_STREAM, 1, stream_body(0, b"x"), 0.0)
    sid = 3
    for nonce in range(2, 2 + S.REFUSED_MAX):
        server.on_message(nonce, T_STREAM, sid, stream_body(0, b"x"), 0.0)
        sid += 2
    assert server.counts["streams_refused"] == S.REFUSED_MAX
    resets = [m for m in server.messages_to_send(0.0, limit=100) if m.mtype == T_RESET]
    assert len(resets) == S.REFUSED_MAX
    with pytest.raises(ProtocolError) as e:
        server.on_message(100, T_STREAM, sid, stream_body(0, b"x"), 0.0)
    assert e.value.reason == S.E_STREAMS


def test_open_stream_stops_at_max_streams():
    client = Connection(True, max_streams=3)
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    with pytest.raises(StreamClosed):
        client.open_stream()


def test_streams_opened_out_of_order_are_all_learned():
    client, server = pair()
    sids = [client.open_stream() for _ in range(4)]
    msgs = []
    for sid in sids:
        client.write(sid, b"%d" % sid)
    out = client.messages_to_send(0.0)
    for nonce, m in enumerate(out, 1):
        client.on_sent(nonce, m, 0.0)
        msgs.append((nonce, m))
    for nonce, m in reversed(msgs):
        server.on_message(nonce, m.mtype, m.tag, m.body, 0.0)
    new = {e.sid for e in server.streams_ready() if e.kind == S.EV_NEW}
    assert new == set(sids)
    assert all(server.read(sid) == b"%d" % sid for sid in sids)


# -- protocol errors: bad input raises ProtocolError, nothing else, and stays bounded

def connected(**settings):
    """A client and a server that exchanged a little on stream 1."""
    client, server = pair(**settings)
    sid = client.open_stream()
    client.write(sid, b"hello")
    nonce = 0
    for m in client.messages_to_send(0.0):
        nonce += 1
        client.on_sent(nonce, m, 0.0)
        server.on_message(nonce, m.mtype, m.tag, m.body, 0.0)
    server.streams_ready()
    return client, server, nonce


def test_ack_of_a_nonce_never_sent():
    client, _server, sent = connected()
    with pytest.raises(ProtocolError) as e:
        client.on_message(1, T_ACK, 0, ack_body(sent + 1, 0), 0.1)
    assert e.value.reason == S.E_ACK_UNSENT
    # a nonce used by the caller for a message of its own may be acknowledged
    client.on_sent(sent + 1, None, 0.1)
    client.on_message(2, T_ACK, 0, ack_body(sent + 1, sent), 0.1)


@pytest.mark.parametrize("body, reason", [
    (ack_body(2, 0, count=1), S.E_LENGTH),               # count says 1, no range follows
    (ack_body(2, 0, [(1, 1)])[:-1], S.E_LENGTH),
    (ack_body(2, 2), S.E_ACK_RANGE),                     # reaches nonce 0
    (ack_body(2, 0, [(0, 1)]), S.E_ACK_RANGE),           # a gap of 0
    (ack_body(2, 0, [(1, 0)]), S.E_ACK_RANGE),           # a length of 0
    (ack_body(2, 0, [(1, 5)]), S.E_ACK_RANGE),           # below nonce 1
    (ack_body(0, 0), S.E_ACK_UNSENT),
    (b"\0" * 16, S.E_LENGTH),
])
def test_bad_acks(body, reason):
    client, _server, _sent = connected()
    with pytest.raises(ProtocolError) as e:
        client.on_message(1, T_ACK, 0, body, 0.1)
    assert e.value.reason == reason


def test_ack_with_a_tag():
    client, _server, _sent = connected()
    with pytest.raises(ProtocolError) as e:
        client.on_message(1, T_ACK, 7, ack_body(1, 0), 0.1)
    assert e.value.reason == S.E_TAG


def test_data_beyond_the_window():
    _client, server, _ = connected()
    server.on_message(10, T_STREAM, 1, stream_body((1 << 20) - 1, b"x"), 0.0)
    with pytest.raises(ProtocolError) as e:
        server.on_message(11, T_STREAM, 1, stream_body(1 << 20, b"x"), 0.0)
    assert e.value.reason == S.E_FLOW
    with pytest.raises(ProtocolError) as e:
        server.on_message(12, T_STREAM, 1, stream_body((1 << 64) - 1, b"x"), 0.0)
    assert e.value.reason == S.E_FLOW
    # with a small stream_window, a stream is granted the initial window only
    _client, server, _ = connected(stream_window=4096)
    assert server._streams[1].rwin == S.INITIAL_WINDOW
    server.on_message(10, T_STREAM, 1, stream_body(S.INITIAL_WINDOW - 1, b"x"), 0.0)
    with pytest.raises(ProtocolError) as e:
        server.on_message(11, T_STREAM, 1, stream_body(S.INITIAL_WINDOW, b"x"), 0.0)
    assert e.value.reason == S.E_FLOW


@pytest.mark.parametrize("first, second", [
    ((100, b"", True), (50, b"", True)),                 # two FINs at different offsets
    ((100, b"", True), (100, b"x", False)),              # data beyond FIN
    ((200, b"x", False), (100, b"", True)),              # FIN below data received
    ((10, b"abc", True), (10, b"ab", True)),
])
def test_conflicting_final_size(first, second):
    _client, server, _ = connected()
    server.on_message(10, T_STREAM, 1, stream_body(first[0], first[1], first[2]), 0.0)
    with pytest.raises(ProtocolError) as e:
        server.on_message(11, T_STREAM, 1, stream_body(second[0], second[1], second[2]), 0.0)
    assert e.value.reason == S.E_FINAL


def test_same_fin_twice_is_fine():
    _client, server, _ = connected()
    server.on_message(10, T_STREAM, 1, stream_body(5, b"", True), 0.0)
    server.on_message(11, T_STREAM, 1, stream_body(0, b"hello", True), 0.0)
    assert server.read(1) == b"hello" and server.at_eof(1)


@pytest.mark.parametrize("mtype, tag, body, reason", [
    (T_STREAM, 0, stream_body(0, b"x"), S.E_TAG),
    (T_WINDOW, 0, WINDOW.pack(5), S.E_TAG),
    (T_RESET, 0, b"\0", S.E_TAG),
    (T_STREAM, 1, b"\0" * 8, S.E_LENGTH),
    (T_WINDOW, 1, b"\0" * 7, S.E_LENGTH),
    (T_RESET, 1, b"", S.E_LENGTH),
    (T_STREAM, 1, STREAM.pack(0, 2), S.E_FLAGS),
    (T_STREAM, 4, stream_body(0, b"x"), S.E_STREAM_ID),  # the server's id, never opened
    (T_WINDOW, 2, WINDOW.pack(5), S.E_STREAM_ID),
    (T_STREAM, 1 + 2 * 1000, stream_body(0, b"x"), S.E_STREAM_ID),   # skips too many
])
def test_bad_messages(mtype, tag, body, reason):
    _client, server, _ = connected()
    with pytest.raises(ProtocolError) as e:
        server.on_message(50, mtype, tag, body, 0.0)
    assert e.value.reason == reason


def bounded(conn):
    """The engine's tables all within their bounds."""
    assert len(conn._rr) <= S.MAX_ACK_RANGES + 1
    assert len(conn._streams) <= conn.max_streams + 8
    assert conn._peer_open <= conn.max_streams
    assert len(conn._peer_skipped) <= conn.max_streams + S.REFUSED_MAX
    assert len(conn._refused) <= S.REFUSED_MAX
    # grants come out of session_buffer; only each stream's INITIAL_WINDOW may exceed it
    assert conn.committed <= conn.session_buffer + len(conn._streams) * S.INITIAL_WINDOW
    assert len(conn._recs) - conn._head <= 64
    assert len(conn._events) <= 5 * (len(conn._streams) + S.REFUSED_MAX) + 64
    for s in conn._streams.values():
        assert len(s.rbuf) + s.obytes <= s.rwin - s.roff
        assert s.rwin - s.roff <= max(conn.stream_window, S.INITIAL_WINDOW)


garbage = st.tuples(st.sampled_from(ENGINE_TYPES + (T_DATA, T_KEEPALIVE)),
                    st.one_of(st.integers(0, 8), st.integers(0, 2 ** 32 - 1)),
                    st.one_of(st.binary(max_size=64), st.binary(min_size=17, max_size=600)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(garbage, min_size=1, max_size=30))
def test_garbage_raises_protocol_error_only_and_stays_bounded(messages):
    client, server, used = connected(max_streams=16, session_buffer=4 << 20)
    sent = {client: used, server: 0}
    for target in (client, server):
        nonce = 100
        now = 1.0
        for mtype, tag, body in messages:
            nonce += 1
            now += 0.5
            try:
                target.on_message(nonce, mtype, tag, body, now)
            except ProtocolError as e:
                assert e.reason in S.PROTOCOL_ERRORS
            bounded(target)
            target.on_timer(now)
            for m in target.messages_to_send(now):
                sent[target] += 1
                target.on_sent(sent[target], m, now)
            bounded(target)


stream_msgs = st.lists(st.tuples(st.integers(0, 2 ** 32 - 1), st.integers(0, 70_000),
                                 st.integers(0, 3000), st.booleans()), max_size=40)


@settings(max_examples=200, deadline=None)
@given(stream_msgs)
def test_well_formed_stream_messages_within_bounds(msgs):
    """Plausible STREAM messages on many ids: bounded, or a ProtocolError."""
    _client, server, _ = connected(max_streams=8, session_buffer=1 << 20)
    for nonce, (sid, off, n, fin) in enumerate(msgs, 10):
        try:
            server.on_message(nonce, T_STREAM, sid % 64 or 1, stream_body(off, b"z" * n, fin),
                              0.0)
        except ProtocolError as e:
            assert e.reason in S.PROTOCOL_ERRORS
        bounded(server)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2 ** 31), st.lists(
    st.tuples(st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1)), max_size=40),
    st.integers(0, 2 ** 32 - 1))
def test_structured_acks_never_crash(largest, first, ranges, delay):
    client, _server, sent = connected()
    for n in range(sent + 1, 400):
        client.on_sent(n, None, 0.0)
    body = ack_body(largest, first, ranges, delay=delay)
    try:
        client.on_message(1, T_ACK, 0, body, 0.01)
    except ProtocolError as e:
        assert e.reason in (S.E_ACK_UNSENT, S.E_ACK_RANGE)
    bounded(client)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=20_000), st.randoms(use_true_random=False),
       st.integers(1, 1500), st.floats(0, 0.5))
def test_reassembly_in_any_order_with_overlaps(data, rnd, seg, dup):
    """Segments cut anywhere, shuffled, duplicated and overlapping: read() gives the
    bytes exactly once, in order."""
    _client, server, _ = connected()
    pieces = []
    off = 5                                     # "hello" came first
    full = b"hello" + data
    while off < len(full):
        n = rnd.randint(1, seg)
        pieces.append((off, full[off:off + n]))
        off += n
    extra = [(o, full[o:o + rnd.randint(1, 2 * seg)]) for o, _ in pieces if rnd.random() < dup]
    pieces += extra
    rnd.shuffle(pieces)
    pieces.append((len(full), b""))
    got = bytearray()
    for nonce, (o, d) in enumerate(pieces, 10):
        fin = o + len(d) == len(full) and o == len(full)
        server.on_message(nonce, T_STREAM, 1, stream_body(o, d, fin), 0.0)
        got += server.read(1, rnd.randint(1, 1 << 16))
    while not server.at_eof(1):
        chunk = server.read(1)
        assert chunk
        got += chunk
    assert bytes(got) == full
    s = server._streams.get(1)
    assert s is None or (not s.ostarts and s.obytes == 0)


# -- the parts of RFC 9002

def exchange(a, b, now, nonces, drop=lambda m: False):
    """Everything a has to send, delivered to b (unless drop(m)); returns the messages."""
    out = a.messages_to_send(now)
    for m in out:
        nonces[a] = nonces.get(a, 0) + 1
        a.on_sent(nonces[a], m, now)
        if not drop(m):
            b.on_message(nonces[a], m.mtype, m.tag, m.body, now)
    return out


def test_rtt_estimation():
    client, server = pair(initial_rtt=0.1)
    sid = client.open_stream()
    nonces = {}
    client.write(sid, b"a" * 3000)
    exchange(client, server, 0.0, nonces)
    exchange(server, client, 0.040, nonces)        # ACK after 40 ms (held 0 ms)
    assert client.srtt == pytest.approx(0.040) and client.rttvar == pytest.approx(0.020)
    assert client.min_rtt == pytest.approx(0.040)
    client.write(sid, b"b" * 3000)
    exchange(client, server, 1.0, nonces)
    server.on_timer(1.0 + S.MAX_ACK_DELAY)          # the second message waits for the timer
    exchange(server, client, 1.060, nonces)
    # 60 ms with 5 ms of ack delay: adjusted 55 ms
    assert client.latest_rtt == pytest.approx(0.060)
    assert client.srtt == pytest.approx(0.875 * 0.040 + 0.125 * 0.055)
    assert client.rttvar == pytest.approx(0.75 * 0.020 + 0.25 * 0.015)


def test_ack_ranges_on_the_wire():
    _client, server = pair()
    for n in (1, 2, 3, 5, 6, 9, 20, 19, 4):
        server.on_message(n, T_STREAM if n == 1 else T_KEEPALIVE, 1, stream_body(0), 0.0)
    assert not [x for x in server.messages_to_send(0.001) if x.mtype == T_ACK]
    assert server.next_timer(0.001) == pytest.approx(S.MAX_ACK_DELAY - 0.001)
    server.on_timer(0.006)
    (m,) = [x for x in server.messages_to_send(0.006) if x.mtype == T_ACK]
    largest, delay, first, count = ACK.unpack_from(m.body)
    assert (largest, first, count, delay) == (20, 1, 2, 6000)
    pairs = [ACK_RANGE.unpack_from(m.body, ACK.size + 8 * i) for i in range(count)]
    assert pairs == [(9, 1), (2, 6)]               # 10..18 missing, 9; 7..8 missing, 1..6
    assert m.size == HEADER_SIZE + MAC_SIZE + len(m.body) and not m.ack_eliciting


def test_old_ack_ranges_are_reported_a_few_times_then_dropped():
    _client, server = pair()
    n = 0
    for _ in range(10):                          # ten holes
        n += 2
        server.on_message(n, T_STREAM if n == 2 else T_WINDOW, 1,
                          stream_body(0) if n == 2 else WINDOW.pack(0), 0.0)
    counts = []
    for _ in range(5):
        n += 1
        server.on_message(n, T_WINDOW, 1, WINDOW.pack(0), 0.0)
        m = [x for x in server.messages_to_send(0.0) if x.mtype == T_ACK][0]
        counts.append(ACK.unpack_from(m.body)[3])
    assert counts[0] == 9 and counts[-1] == 0


def test_a_batch_gets_two_acks():
    """Messages processed as a batch get one ACK where single arrivals get several: a
    second copy goes out, so that losing one ACK does not stall a small window."""
    client, server = pair()
    sid = client.open_stream()
    client.write(sid, bytes(6 * client.mss))
    nonces = {}
    exchange(client, server, 0.0, nonces)
    acks = [m for m in server.messages_to_send(0.0) if m.mtype == T_ACK]
    assert len(acks) == 2 and acks[0].body == acks[1].body
    assert server.counts["acks_sent"] == 2


def test_packet_threshold_and_fast_retransmit():
    client, server = pair()
    sid = client.open_stream()
    client.write(sid, bytes(10 * client.mss))
    nonces = {}
    lost_offsets = []

    def drop(m):
        if m.mtype == T_STREAM and m.info[0] == client.mss:    # the second segment
            lost_offsets.append(m.info[0])
            return True
        return False
    exchange(client, server, 0.0, nonces, drop)
    assert client.counts["messages_lost"] == 0
    exchange(server, client, 0.0003, nonces)
    assert client.counts["messages_lost"] == 1      # three later ones were acknowledged
    out = [m for m in client.messages_to_send(0.0003) if m.mtype == T_STREAM]
    assert out[0].info[:2] == (client.mss, 2 * client.mss)     # sent again, first
    assert client.cwnd < 14720 and client.ssthresh == client.cwnd


def test_time_threshold_loss():
    client, server = pair(initial_rtt=0.01)
    sid = client.open_stream()
    nonces = {}
    client.write(sid, bytes(3 * client.mss))
    exchange(client, server, 0.0, nonces, drop=lambda m: m.tag and m.info and m.info[0] == 0)
    exchange(server, client, 0.010, nonces)        # acks segments 2 and 3, not 1
    exchange(client, server, 0.010, nonces)        # (the client acks the server's WINDOW)
    assert client.counts["messages_lost"] == 0      # 2 later: below the packet threshold
    wait = client.next_timer(0.010)
    assert 0 < wait <= 9 / 8 * 0.010
    client.on_timer(0.010 + wait + 1e-9)
    assert client.counts["messages_lost"] == 1


def test_pto_backs_off_to_max_pto_and_never_gives_up():
    client, server = pair(initial_rtt=0.001, max_pto=2.0)
    sid = client.open_stream()
    client.write(sid, b"x" * 1000)
    nonces = {}
    now = 0.0
    exchange(client, server, now, nonces, drop=lambda m: True)
    waits = []
    for _ in range(40):
        wait = client.next_timer(now)
        waits.append(wait)
        now += wait + 1e-9
        client.on_timer(now)
        out = client.messages_to_send(now)
        assert out and len([m for m in out if m.ack_eliciting]) <= S.PROBES + 2
        for m in out:
            nonces[client] += 1
            client.on_sent(nonces[client], m, now)
    assert waits[1] > waits[0] and max(waits) <= 2.0 + 1e-6
    assert waits[-1] == pytest.approx(2.0)
    assert client.pto_count == 40 and len(client._recs) - client._head < 20
    assert client.unreachable_for(now) > 60
    # the path comes back: the next probe gets through and everything flows
    back = now
    for _ in range(20):
        if client.all_acknowledged():
            break
        wait = client.next_timer(now)
        now += (wait or 0.0) + 1e-9
        client.on_timer(now)
        exchange(client, server, now, nonces)
        now += 0.001
        server.on_timer(now)
        exchange(server, client, now, nonces)
    assert client.all_acknowledged() and client.pto_count == 0
    assert now - back < 2.0 + 0.1
    assert server.read(sid) == b"x" * 1000


def test_idle_connection_has_no_timer():
    client, server, sent = connected()
    nonces = {client: sent}
    now = 0.0
    for _ in range(10):
        now += 0.01
        for conn in (client, server):
            if conn.next_timer(now) == 0:
                conn.on_timer(now)
        exchange(server, client, now, nonces)
        exchange(client, server, now, nonces)
    for conn in (client, server):
        assert conn.next_timer(now) is None
        assert conn.messages_to_send(now) == []
        assert conn.bytes_in_flight == 0


def test_sizes_fit_max_message():
    client, _server = pair(max_message=1232)
    sid = client.open_stream()
    client.write(sid, bytes(50_000))
    sizes = [m.size for m in client.messages_to_send(0.0)]
    assert max(sizes) == 1232
    assert client.mss == 1232 - HEADER_SIZE - MAC_SIZE - STREAM.size


def test_duplicate_nonces_and_foreign_types_are_harmless():
    _client, server, sent = connected()
    server.on_message(sent, T_STREAM, 1, stream_body(0, b"hello"), 0.0)   # replayed
    server.on_message(sent + 1, T_DATA, 9, b"a datagram", 0.0)
    assert server.read(1) == b"hello"


def test_on_not_sent_puts_everything_back():
    client, server = pair()
    sid = client.open_stream()
    client.write(sid, b"abc")
    client.finish(sid)
    first = client.messages_to_send(0.0)
    assert [m.mtype for m in first] == [T_WINDOW, T_WINDOW, T_STREAM]    # WINDOW twice
    for m in first:
        client.on_not_sent(m)
    again = client.messages_to_send(0.0)
    assert [(m.mtype, m.body) for m in again] == [(m.mtype, m.body) for m in first]
    for nonce, m in enumerate(again, 1):
        client.on_sent(nonce, m, 0.0)
        server.on_message(nonce, m.mtype, m.tag, m.body, 0.0)
    assert server.read(sid) == b"abc" and server.at_eof(sid)


def test_writable_after_a_short_write():
    client, server = pair(send_buffer=10_000)
    sid = client.open_stream()
    assert client.write(sid, bytes(25_000)) == 10_000
    assert client.write(sid, b"more") == 0 and client.send_space(sid) == 0
    nonces = {}
    exchange(client, server, 0.0, nonces)
    assert server.read(sid) == bytes(10_000)
    exchange(server, client, 0.001, nonces)
    kinds = [(e.kind, e.sid) for e in client.streams_ready()]
    assert (S.EV_WRITABLE, sid) in kinds
    assert client.send_space(sid) == 10_000


def test_write_after_finish_and_unknown_streams():
    client, _server = pair()
    sid = client.open_stream()
    client.finish(sid)
    with pytest.raises(StreamClosed):
        client.write(sid, b"x")
    with pytest.raises(StreamClosed):
        client.write(99, b"x")
    assert client.read(99) == b"" and client.at_eof(99)
    assert client.send_space(sid) == 0


def test_send_buffer_is_bounded_and_writable_follows():
    up = payloads(17, [400_000])
    sim = make_sim(up, [b""], client_settings=dict(send_buffer=100_000),
                   link=dict(delay=0.001))
    most = []

    def check(sim):
        most.append(sim.conns[0].send_buffered)
        assert sim.conns[0].send_buffered <= 100_000
    sim.on_step = check
    sim.run(until=30)
    assert_delivered(sim)
    assert max(most) > 90_000


# -- throughput in virtual time

def mathis_seconds(megabytes, loss, rtt, mss):
    """The NewReno steady state, MSS/RTT * sqrt(3/2) / sqrt(p) (Mathis et al.)."""
    rate = mss / rtt * (1.5 ** 0.5) / loss ** 0.5
    return megabytes * 1e6 / rate


def test_throughput_with_5_percent_loss():
    sim, seconds, ok = bulk(20, 0.05)
    assert ok
    model = mathis_seconds(20, 0.05, RTT, sim.conns[0].mss)       # about 1 s
    assert seconds < max(5.0, 4 * model), (seconds, model, sim.conns[0].stats())
    assert sim.conns[0].counts["persistent_congestion"] == 0


def test_throughput_on_a_clean_path_is_not_window_limited():
    peak = {"cwnd": 0}

    def watch(sim):
        peak["cwnd"] = max(peak["cwnd"], sim.conns[0].cwnd)
    sim, seconds, ok = bulk(20, 0.0, on_step=watch)
    assert ok
    bdp = RATE * RTT                                 # 37.5 kB
    # the bottleneck, not the windows, sets the pace: at least 70 % of it
    assert seconds < 20e6 / RATE / 0.7, seconds
    assert peak["cwnd"] > 2 * bdp and sim.conns[0].cwnd > bdp


def test_a_path_that_works_again_gets_its_window_back_and_its_flight_at_once():
    """A blackout long enough for persistent congestion, then the peer is heard on a new
    path (it moved): the outage was no congestion, so the window is the one the path had,
    the PTO back-off starts afresh, and what was in flight goes out again at once."""
    client, server = pair(initial_rtt=0.05)
    sid = client.open_stream()
    client.write(sid, bytes(400_000))
    nonces, now = {}, 0.0
    for _ in range(6):                          # a few clean round trips: the window grows
        exchange(client, server, now, nonces)
        now += 0.025
        server.on_timer(now)
        exchange(server, client, now, nonces)
        now += 0.025
    working = client.cc.cwnd
    assert working > client.cc.min_window * 4
    for _ in range(40):                         # the blackout: nothing arrives either way
        exchange(client, server, now, nonces, drop=lambda m: True)
        wait = client.next_timer(now)
        now += wait if wait is not None else 0.1
        client.on_timer(now)
    assert client.counts["persistent_congestion"] >= 1 and client.in_outage()
    assert client.cc.cwnd < working
    client.path_changed(now)
    assert client.cc.cwnd == working and client.recovery.pto_count == 0
    assert client.recovery.in_flight == 0 and client.cc.bytes_in_flight == 0
    again = exchange(client, server, now, nonces)
    assert again and again[0].mtype == T_STREAM      # the oldest unacknowledged bytes, now
    got = []
    for _ in range(200):                        # and the stream completes on the new path
        now += 0.025
        server.on_timer(now)
        exchange(server, client, now, nonces)
        client.on_timer(now)
        got.append(server.read(sid, 1 << 20))
        now += 0.025
        if client.all_acknowledged():
            break
        exchange(client, server, now, nonces)
    got.append(server.read(sid, 1 << 20))
    assert client.all_acknowledged() and b"".join(got) == bytes(400_000)


def test_once_all_in_flight_is_declared_lost_no_answer_is_waited_for():
    """What PTOs in a row declared lost goes out again with new records; until then
    nothing is unanswered, so an idle client does not take its old flight for a path
    that no longer answers (and rebind again and again)."""
    recovery = Recovery(initial_rtt=0.05)
    recovery.on_sent(1, 0.0, 1000, T_STREAM, 1, (0, 1000, False))
    now = 0.0
    while recovery.in_flight:
        now = recovery.deadline()
        recovery.on_pto(now)
    assert recovery.unreachable_for(now + 10) == 0.0


def test_unsent_bytes_wait_behind_no_more_than_two_round_trips_of_sending():
    """A keystroke written behind a download waits for what is unsent ahead of it: once
    the engine knows the path, a stream takes no more than about two round trips of
    sending ahead of the wire, and says when it has room again."""
    client, server = pair(initial_rtt=0.05)
    sid = client.open_stream()
    written = client.write(sid, bytes(1 << 20))     # before any ACK: the send buffer
    nonces, now = {}, 0.0
    exchange(client, server, now, nonces)
    now += 0.05
    server.on_timer(now)
    exchange(server, client, now, nonces)           # the first ACKs: the path is known
    limit = client.unsent_limit
    per_rtt = client.cc.cwnd
    assert S.UNSENT_MIN <= limit <= max(S.UNSENT_MIN, per_rtt * max(
        S.UNSENT_RTTS, S.UNSENT_TIME / client.srtt))
    assert written - limit > 100_000 and client.send_space(sid) == 0
    assert client.write(sid, b"keystroke") == 0
    list(client.streams_ready())
    for _ in range(100):                            # the backlog goes out
        exchange(client, server, now, nonces)
        now += 0.05
        server.on_timer(now)
        exchange(server, client, now, nonces)
        server.read(sid, 1 << 20)
        events = [e.kind for e in client.streams_ready()]
        if S.EV_WRITABLE in events:
            break
    assert client.send_space(sid) > 0 and client.write(sid, b"keystroke") == 9
