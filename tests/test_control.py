"""Control messages, shared blocks, rate limits, sd_notify and the control servers' connections:
the small parts, for real."""

import errno
import logging
import os
import selectors
import socket
import struct

import pytest

from procs import deadline_loop
from udpmux import control
from udpmux.limits import PerSource, TokenBucket, source_of
from udpmux.sdnotify import Notifier
from udpmux.shm import SharedBlock
from udpmux.status import Connections


def test_control_messages_keep_their_boundaries_and_bodies():
    master, worker = control.pair()
    with master, worker:
        assert control.send(worker, control.MSG_READY, {"pid": 42})
        assert control.send(worker, control.MSG_FAILED, {"error": "x" * 3000})
        assert control.send(master, control.MSG_STOP)
        assert control.recv(master) == (control.MSG_READY, {"pid": 42})
        assert control.recv(master) == (control.MSG_FAILED, {"error": "x" * 3000})
        assert control.recv(worker) == (control.MSG_STOP, None)


def test_the_end_of_the_pipe_reads_as_none_and_sending_to_it_is_refused():
    master, worker = control.pair()
    master.close()
    with worker:
        assert control.recv(worker) is None
        assert control.send(worker, control.MSG_READY) is False


def test_a_short_control_message_is_refused():
    master, worker = control.pair()
    with master, worker:
        master.send(b"\x01")
        with pytest.raises(ValueError):
            control.recv(worker)


def test_a_shared_block_is_seen_by_a_forked_reader_whole():
    block = SharedBlock(4096)
    block.write_json({"n": 0})
    pid = os.fork()
    if pid == 0:
        try:
            for n in range(1, 2001):
                block.write_json({"n": n, "pad": "x" * (n % 500)})
        finally:
            os._exit(0)
    seen = set()
    while True:
        value = block.read_json()       # never a torn write: always valid JSON
        seen.add(value["n"])
        if value["n"] == 2000:
            break
    os.waitpid(pid, 0)
    assert 2000 in seen


def test_a_shared_block_refuses_what_does_not_fit():
    block = SharedBlock(64)
    with pytest.raises(ValueError):
        block.write(b"x" * 100)
    assert block.read() == b""


def test_a_token_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(rate=10, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(20)) == 10
    assert sum(bucket.take(0.5) for _ in range(20)) == 5


def test_per_source_limits_forget_the_oldest_source_first():
    limits = PerSource(rate=1, size=3)
    for source in (b"a", b"b", b"c", b"d"):
        assert limits.take(source, 0.0)
    assert len(limits) == 3
    assert not limits.take(b"d", 0.0)       # d's bucket is empty
    assert limits.take(b"a", 0.0)           # a was forgotten: a fresh bucket


def test_sources_are_ipv4_addresses_and_ipv6_slash_64s():
    v4 = bytes.fromhex("0200" "1234" "c0000201" + "00" * 8)
    v4_other_port = bytes.fromhex("0200" "9999" "c0000201" + "00" * 8)
    assert source_of(v4) == source_of(v4_other_port) == bytes.fromhex("c0000201")
    v6 = bytes.fromhex("0a00" "1234" "00000000" "20010db8000000010000000000000001" "00000000")
    assert source_of(v6) == bytes.fromhex("20010db800000001")
    mapped = bytes.fromhex("0a00" "1234" "00000000" "00000000000000000000ffffc0000201" "00000000")
    assert source_of(mapped) == bytes.fromhex("c0000201")


def test_sd_notify_writes_to_the_socket_named_in_the_environment(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    with sock:
        notifier = Notifier(path)
        assert notifier.ready("2 of 2 tunnels running")
        assert sock.recv(100) == b"READY=1\nSTATUS=2 of 2 tunnels running"
        assert notifier.stopping()
        assert sock.recv(100) == b"STOPPING=1"
        notifier.close()


def test_sd_notify_never_blocks_and_keeps_state_changes_for_later(tmp_path):
    """systemd slow to read: the socket's queue fills.  Sending returns at once; STATUS
    lines that cannot go are dropped, READY waits and goes, in order, once there is room."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        systemd.bind(path)
        notifier = Notifier(path)
        sent = [notifier.status(f"traffic {n}") for n in range(100)]   # never blocks
        assert not all(sent)
        assert notifier.ready("up") is False and len(notifier.pending) == 1
        systemd.setblocking(False)
        got = []
        while True:
            try:
                got.append(systemd.recv(4096).decode())
            except BlockingIOError:
                break
        assert notifier.flush() and not notifier.pending
        got.append(systemd.recv(4096).decode())
        assert got[-1] == "READY=1\nSTATUS=up"
        assert all(g.startswith("STATUS=traffic") for g in got[:-1])
    notifier.close()


def test_sd_notify_without_systemd_does_nothing():
    assert Notifier("").ready() is False


def test_a_write_cut_short_by_a_dead_writer_is_void_until_the_next_write():
    block = SharedBlock(4096)
    block.write_json({"n": 1})
    block.mem[0:8] = struct.pack("=Q", 3)           # a writer killed halfway: odd generation
    with pytest.raises(TimeoutError):
        block.read_json(patience=0.05)
    block.write_json({"n": 2})                      # its successor writes again
    assert block.read_json() == {"n": 2}


def test_logs_to_the_journal_carry_priorities_and_no_timestamps(tmp_path, monkeypatch):
    from udpmux import log as udpmux_log
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logger = udpmux_log.setup(stream=stream)
        logger.info("tunnel wg: up")
        logger.warning("tunnel wg: the flow table is full")
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")         # a terminal, say
        udpmux_log.setup(stream=stream).error("tunnel wg: down")
        stream.seek(0)
        lines = stream.read().splitlines()
    logging.getLogger("udpmux").handlers.clear()
    assert lines[:2] == ["<6>tunnel wg: up", "<4>tunnel wg: the flow table is full"]
    assert lines[2].endswith("ERROR: tunnel wg: down") and lines[2][:4].isdigit()


def test_drop_summaries_come_at_most_once_an_interval():
    from udpmux.log import DropLog

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    recorder = Recorder()
    logger = logging.getLogger("test.drops")
    logger.addHandler(recorder)
    drops = DropLog(logger, "tunnel wg", interval=60)
    drops.maybe_log(0.0)
    for _ in range(1000):
        drops.count("mac")
    drops.count("replay", 3)
    drops.maybe_log(30.0)
    assert recorder.lines == []
    drops.maybe_log(61.0)
    assert recorder.lines == ["tunnel wg: dropped in the last 61 s: mac 1000, replay 3"]
    drops.maybe_log(200.0)
    assert len(recorder.lines) == 1         # nothing dropped since: nothing said


def test_a_listener_that_cannot_accept_rests_instead_of_spinning_the_loop():

    class OutOfDescriptors(socket.socket):
        def accept(self):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    selector = selectors.DefaultSelector()
    server = Connections(selector, logging.getLogger("test.connections"), limit=4,
                         max_request=100, timeout=2.0, reply_timeout=2.0)
    listener = OutOfDescriptors(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()), selector:
        server.listen(listener)
        assert [key.fileobj for key, _ in selector.select(5.0)] == [listener]
        server.on_accept()
        assert listener not in [key.fileobj for key in selector.get_map().values()]
        resume = server.paused_until
        server.expire(resume - 0.5)
        assert listener not in [key.fileobj for key in selector.get_map().values()]
        server.expire(resume)
        assert [key.fileobj for key in selector.get_map().values()] == [listener]
        server.close()


def test_connections_close_the_oldest_for_a_newcomer_and_write_a_long_reply_in_pieces(
        tmp_path):

    class Lines(Connections):
        def complete(self, data):
            return b"\n" in data

        def respond(self, data):
            return data.split(b"\n", 1)[0] * 500_000

    def serve():
        for key, _ in selector.select(0):
            key.data()

    selector = selectors.DefaultSelector()
    server = Lines(selector, logging.getLogger("test.connections"), limit=2,
                   max_request=100, timeout=2.0, reply_timeout=2.0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen()
    server.listen(listener)
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            clients[-1].connect(str(tmp_path / "s"))
            serve()                                 # accepts it
        oldest, idle, asking = clients
        assert len(server.clients) == 2
        oldest.settimeout(5.0)
        assert oldest.recv(1) == b""                # closed to make room
        asking.sendall(b"ab\n")
        asking.setblocking(False)
        reply = b""
        for _ in deadline_loop(5.0, "the whole reply"):
            serve()                                 # writes what the socket takes
            try:
                chunk = asking.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            reply += chunk
        assert reply == b"ab" * 500_000             # 1 MB: many times the socket's buffer
        assert len(server.clients) == 1             # the idle one, still held open
        idle.setblocking(False)
        with pytest.raises(BlockingIOError):
            idle.recv(1)
    finally:
        for conn in clients:
            conn.close()
        server.close()
        selector.close()
