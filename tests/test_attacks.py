"""An attacker with real packets: captured from the path (procs.Tap), replayed from
another address, raced ahead of the original, sent to another tunnel that shares the
key, or replayed after a worker was killed; and strangers that hold connections open.
Every test runs the real daemons and checks what a user would: where the datagrams
go, what the relay's status says, what the logs say."""

import os
import random
import select
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from procs import (
    WAIT, Daemon, Echo, Notify, Tap, deadline_loop, env, exchange, free_port, status,
    udp_client, udpmux_argv,
)
from test_relay import LOCAL, Rig
from udpmux import wire
from udpmux.endpoint import keepalive_body

# Drops of messages that are genuine but not fresh.
STALE_REASONS = ("replay", "old", "session")


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def tapped(rig):
    """A relay, and an exposer that reaches it through a tap."""
    rig.relay()
    tap = Tap((LOCAL, rig.register))
    rig.exposer = rig.expose("--keepalive", "1", relay=f"{LOCAL}:{tap.address[1]}")
    yield rig, tap
    tap.close()


def stale_drops(t):
    return sum(t["drops"].get(reason, 0) for reason in STALE_REASONS)


def drain(sock):
    """Bytes waiting on sock (its timeout ends the wait)."""
    got = 0
    while True:
        try:
            got += len(sock.recv(70000))
        except (socket.timeout, BlockingIOError):
            return got


def test_a_raced_message_from_another_address_does_not_move_the_exposer(tapped):
    """The path from the exposer is cut; an attacker who sees its keepalives gets each
    to the relay first, from its own address.  They are genuine and fresh, yet the
    exposer stays where it was: the attacker cannot answer the challenge, and gets back
    no more bytes than it sent."""
    rig, tap = tapped
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, rig.public)) == b"before"
    home = rig.tunnel()["exposer"]["address"]
    tap.block()
    seen = len(tap.captured(wire.T_KEEPALIVE))
    attacker = udp_client(timeout=0.5)
    sent = 0
    for _ in deadline_loop(what="three fresh keepalives raced to the relay"):
        fresh = tap.captured(wire.T_KEEPALIVE)[seen:]
        for msg in fresh:
            attacker.sendto(msg, (LOCAL, rig.register))
            sent += len(msg)
        seen += len(fresh)
        if sent >= 3 * len(fresh[0] if fresh else b"x" * 48):
            break
        time.sleep(0.05)
    received = drain(attacker)
    assert 0 < received <= sent              # challenged, and no more than it sent
    t = rig.tunnel()
    assert t["exposer"]["address"] == home and t["counters"]["roams"] == 0
    tap.block(False)
    assert exchange(client, b"after", (LOCAL, rig.public)) == b"after"
    assert "moved" not in rig.daemons[0].log()


def test_replays_after_a_worker_is_killed_are_refused(tapped):
    """kill -9 of the tunnel's worker: its successor carries on with the session, and
    accepts none of the messages the dead worker had accepted, from any address."""
    rig, tap = tapped
    client = udp_client()
    for n in range(50):
        assert exchange(client, b"%d" % n, (LOCAL, rig.public)) == b"%d" % n
    captured = [m for m in tap.captured() if m[1] in (wire.T_DATA, wire.T_KEEPALIVE)]
    t = rig.tunnel()
    home, worker, before = t["exposer"]["address"], t["worker_pid"], stale_drops(t)
    os.kill(worker, signal.SIGKILL)
    rig.wait_tunnel("a new worker", lambda t: t["worker_pid"] not in (None, worker)
                    and t["state"] == "running")
    tap.block()                         # only the attacker speaks to the relay now
    attacker = udp_client(timeout=0.5)
    for msg in captured:
        attacker.sendto(msg, (LOCAL, rig.register))
    t = rig.wait_tunnel("every replay dropped",
                        lambda t: stale_drops(t) >= before + len(captured))
    assert stale_drops(t) == before + len(captured)
    assert t["exposer"]["address"] == home and t["counters"]["roams"] == 0
    sent = sum(map(len, captured))
    # The HELLO that started the session, replayed to the new worker, which has never
    # seen it: a WELCOME to a session nobody can confirm, no more.
    for msg in tap.captured(wire.T_HELLO):
        attacker.sendto(msg, (LOCAL, rig.register))
        sent += len(msg)
    assert drain(attacker) <= sent
    t = rig.tunnel()
    assert t["exposer"]["address"] == home and t["counters"]["sessions"] == 1
    tap.block(False)
    for n in range(5):                  # and the flows go on, to the true exposer
        assert exchange(client, b"again %d" % n, (LOCAL, rig.public)) == b"again %d" % n


def test_a_stale_from_another_tunnel_with_the_same_key_is_not_believed(tmp_path):
    """Two tunnels share a key.  A stranger sends the exposer's message to the other
    tunnel, which knows no such session and answers STALE; the stranger passes it to the
    exposer as if from its relay.  The exposer keeps its session."""
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    ports = {name: (free_port(), free_port()) for name in ("ours", "other")}
    config = tmp_path / "relay.toml"
    control = str(tmp_path / "control.sock")
    config.write_text(f'control_socket = "{control}"\n' + "".join(
        f'[tunnels.{name}]\npublic = "{LOCAL}:{pub}"\nregister = "{LOCAL}:{reg}"\n'
        f'key_file = "{key}"\n' for name, (pub, reg) in ports.items()))
    notify, echo = Notify(str(tmp_path)), Echo()
    relay = Daemon(["relay", "-c", config], notify=notify)
    tap = Tap((LOCAL, ports["ours"][1]))
    exposer = None
    try:
        notify.wait_for("READY=1")
        exposer = Daemon(["expose", "--relay", f"{LOCAL}:{tap.address[1]}", "--service",
                          f"{LOCAL}:{echo.port}", "--key-file", key, "--keepalive", "1",
                          "--debug"])
        exposer.wait_log("registered with the relay")
        client = udp_client()
        assert exchange(client, b"one", (LOCAL, ports["ours"][0])) == b"one"
        attacker = udp_client()
        keepalive = tap.captured(wire.T_KEEPALIVE)[-1]
        attacker.sendto(keepalive, (LOCAL, ports["other"][1]))
        stale = attacker.recv(100)
        assert stale[1] == wire.T_STALE         # the other tunnel answers it
        tap.inject(stale)
        assert exchange(client, b"two", (LOCAL, ports["ours"][0])) == b"two"
        ours = next(t for t in status(control)["tunnels"] if t["name"] == "ours")
        assert ours["counters"]["sessions"] == 1
        assert "lost our session" not in exposer.log()
    finally:
        for daemon in (exposer, relay):
            if daemon is not None:
                daemon.stop()
        tap.close()
        echo.close()
        notify.close()


def test_the_exposer_comes_back_at_once_after_the_relay_master_is_killed(rig):
    """kill -9 of the relay's master: its worker says goodbye to the exposer, which
    registers again as soon as a relay answers, not at its next keepalive."""
    relay = rig.relay()
    exposer = rig.expose("--keepalive", "60")
    client = udp_client()
    assert exchange(client, b"one", (LOCAL, rig.public)) == b"one"
    worker = psutil.Process(rig.tunnel()["worker_pid"])
    relay.signal(signal.SIGKILL)
    line = exposer.wait_log("the relay ended our session")
    worker.wait(WAIT)
    rig.relay(public=rig.public, register=rig.register)
    exposer.wait_log("registered with the relay", start=line)
    assert exchange(client, b"two", (LOCAL, rig.public)) == b"two"


class Squatters:
    """Strangers that hold TCP connections open to a port, from many loopback addresses,
    and open a new one whenever one is closed; bounded in time."""

    def __init__(self, port, count, seconds=WAIT * 2):
        self.port, self.count = port, count
        self.until = time.monotonic() + seconds
        self.closed = 0
        self.socks = [self.connect(n) for n in range(count)]
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.running = True
        self.thread.start()

    def connect(self, n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((f"127.0.{n % 4 + 1}.{n // 4 + 2}", 0))
        sock.connect((LOCAL, self.port))
        return sock

    def run(self):
        while self.running and time.monotonic() < self.until:
            ready, _, _ = select.select(self.socks, [], [], 0.05)
            for sock in ready:
                try:
                    data = sock.recv(100)
                except OSError:
                    data = b""
                if not data:
                    n = self.socks.index(sock)
                    sock.close()
                    self.closed += 1
                    try:
                        self.socks[n] = self.connect(n)
                    except OSError:
                        self.socks[n] = socket.socket()

    def close(self):
        self.running = False
        self.thread.join(2)
        for sock in self.socks:
            sock.close()


def test_idle_tcp_connections_do_not_keep_an_exposer_out(rig):
    rig.relay()
    squatters = Squatters(rig.register, 24)
    try:
        rig.expose("--carrier", "tcp")
        client = udp_client()
        assert exchange(client, b"in", (LOCAL, rig.public)) == b"in"
        assert rig.tunnel()["drops"].get("tcp-full", 0) >= 1
    finally:
        squatters.close()


def test_datagrams_are_counted_once_each_both_ways(rig):
    """Counters count every datagram, also those of a batch that held a new flow."""
    rig.relay()
    rig.expose()
    clients = [udp_client() for _ in range(10)]
    sent = 0
    for round_ in range(20):
        for client in clients:
            client.sendto(b"%d" % round_, (LOCAL, rig.public))
            sent += 1
        if round_ == 10:
            clients.append(udp_client())        # a new flow in the middle of a batch
    got = 0
    for client in clients:
        while True:
            try:
                client.settimeout(0.5)
                client.recv(100)
                got += 1
            except socket.timeout:
                break
    assert got == sent
    rig.wait_tunnel("the counters", lambda t: t["counters"]["datagrams_in"] == sent
                    and t["counters"]["datagrams_out"] == sent)


# -- punch

ATTACKER = "127.0.0.2"          # another host on loopback


class Punched:
    """Two punch agents whose paths to each other go through taps: the listen side
    sends to `to_forwarder`, the forward side to `to_listener`."""

    def __init__(self, tmp_path):
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.echo = Echo()
        a, b, self.listen = free_port(), free_port(), free_port()
        self.ports = {"forwarder": a, "listener": b}
        self.to_listener, self.to_forwarder = Tap((LOCAL, b)), Tap((LOCAL, a))
        self.forwarder = Daemon(["punch", "--peer", f"{LOCAL}:{self.to_listener.address[1]}",
                                 "--port", a, "--key-file", self.key, "--forward",
                                 f"{LOCAL}:{self.echo.port}", "--keepalive", "1", "--debug"])
        self.listener = Daemon(["punch", "--peer", f"{LOCAL}:{self.to_forwarder.address[1]}",
                                "--port", b, "--key-file", self.key, "--listen",
                                f"{LOCAL}:{self.listen}", "--keepalive", "1", "--debug"])

    def block(self, blocked=True):
        self.to_listener.block(blocked)
        self.to_forwarder.block(blocked)

    def close(self):
        for daemon in (self.listener, self.forwarder):
            daemon.stop()
        for tap in (self.to_listener, self.to_forwarder):
            tap.close()
        self.echo.close()


@pytest.fixture
def punched(tmp_path):
    p = Punched(tmp_path)
    yield p
    p.close()


def wait_captured(tap, mtype, count=1):
    for _ in deadline_loop(what=f"{count} captured messages of type {mtype:#x}"):
        got = tap.captured(mtype)
        if len(got) >= count:
            return got
        time.sleep(0.05)


def test_a_replayed_punch_gets_one_answer_of_its_size_and_moves_nothing(punched):
    """The two agents cannot reach each other.  A stranger replays a probe it captured
    to the listen side, over and over: each gets at most one answer no larger than
    itself, nothing follows once the stranger stops, and the stranger is no peer."""
    punched.block()
    probe = wait_captured(punched.to_listener, wire.T_PUNCH)[0]
    attacker = udp_client(ATTACKER, timeout=0.2)
    sent = 0
    for _ in range(20):
        attacker.sendto(probe, (LOCAL, punched.ports["listener"]))
        sent += len(probe)
    received = drain(attacker)
    assert received <= sent
    attacker.settimeout(1.5)
    assert drain(attacker) == 0                 # and nothing after
    assert ATTACKER not in punched.listener.log()


def test_a_stranger_that_forwards_replayed_punches_is_not_made_the_path(punched):
    """Both agents are cut off from each other.  A stranger replays the newest probe of
    each side to the other, and forwards between them whatever comes back: it never
    becomes the direct path."""
    punched.block()
    from_forwarder = wait_captured(punched.to_listener, wire.T_PUNCH)[-1]
    from_listener = wait_captured(punched.to_forwarder, wire.T_PUNCH)[-1]
    near_listener, near_forwarder = udp_client(ATTACKER, 0.05), udp_client(ATTACKER, 0.05)
    listener = (LOCAL, punched.ports["listener"])
    forwarder = (LOCAL, punched.ports["forwarder"])
    near_listener.sendto(from_forwarder, listener)
    near_forwarder.sendto(from_listener, forwarder)
    until = time.monotonic() + 3.0          # bounded: three seconds of forwarding
    while time.monotonic() < until:
        ready, _, _ = select.select([near_listener, near_forwarder], [], [], 0.05)
        for sock in ready:
            data = sock.recv(70000)
            if sock is near_listener:
                near_forwarder.sendto(data, forwarder)
            else:
                near_listener.sendto(data, listener)
    for daemon in (punched.listener, punched.forwarder):
        assert f"direct path to {ATTACKER}" not in daemon.log()
        assert f"path to {ATTACKER}" not in daemon.log()


def test_a_replayed_hello_does_not_take_the_direct_path(punched):
    punched.listener.wait_log("direct path to")
    punched.forwarder.wait_log("direct path to")
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, punched.listen)) == b"before"
    # The listen side's HELLO took whichever path it proved first: through the tap it
    # sends to, or back through the tap the forward side sends to.
    for _ in deadline_loop(what="a captured HELLO"):
        hellos = (punched.to_forwarder.captured(wire.T_HELLO)
                  + punched.to_listener.captured(wire.T_HELLO, direction="back"))
        if hellos:
            break
        time.sleep(0.05)
    hello = hellos[-1]
    attacker = udp_client(ATTACKER, timeout=0.5)
    for _ in range(3):
        attacker.sendto(hello, (LOCAL, punched.ports["forwarder"]))
    for n in range(45):
        assert exchange(client, b"%d" % n, (LOCAL, punched.listen)) == b"%d" % n
    assert drain(attacker) == 0
    assert ATTACKER not in punched.forwarder.log()


def test_the_direct_session_follows_a_peer_that_moved(punched):
    """The NAT in front of one side gives it a new port: the other side follows once the
    new address answers its challenge, and the datagrams flow on."""
    line = punched.forwarder.lines[punched.forwarder.wait_log("direct path to")]
    punched.listener.wait_log("direct path to")
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, punched.listen)) == b"before"
    # The session took whichever path was proven first; the NAT that rebinds is the one
    # in front of the side the path leaves from.
    if line.endswith(f"{LOCAL}:{punched.to_forwarder.outward_address[1]} is up"):
        tap, follower = punched.to_forwarder, punched.forwarder
    else:
        tap, follower = punched.to_listener, punched.listener
    tap.rebind()
    port = tap.outward_address[1]
    follower.wait_log(f"the peer moved from {LOCAL}:")
    assert f"to {LOCAL}:{port}" in follower.log()
    for _ in deadline_loop(what="datagrams over the moved path"):
        try:
            assert exchange(client, b"after", (LOCAL, punched.listen), tries=1) == b"after"
            break
        except AssertionError:
            continue


# -- rendezvous

def test_a_rendezvous_peer_is_not_moved_by_a_raced_message(tmp_path):
    """A punch agent reaches the rendezvous tunnel through a tap; a stranger gets the
    agent's fresh keepalives to the relay first, from its own address.  The relay does
    not follow, and the agent's partner is never told of the stranger's address."""
    from test_punch import Pair
    pair = Pair(tmp_path)
    tap = None
    try:
        pair.relay()
        tap = Tap((LOCAL, pair.meet))
        pair.listen = free_port()
        forwarder = pair.start(["punch", "--relay", f"{LOCAL}:{tap.address[1]}",
                                "--rendezvous", "mosh", "--key-file", pair.key, "--forward",
                                f"{LOCAL}:{pair.echo.port}", "--keepalive", "1", "--debug"])
        listener = pair.start(["punch", "--relay", f"{LOCAL}:{pair.meet}", "--rendezvous",
                               "mosh", "--key-file", pair.key, "--listen",
                               f"{LOCAL}:{pair.listen}", "--debug"])
        listener.wait_log("direct path to")
        forwarder.wait_log("direct path to")
        attacker = udp_client(ATTACKER, timeout=0.5)
        old = tap.captured()
        for msg in old:                         # replays: refused
            attacker.sendto(msg, (LOCAL, pair.meet))
        tap.block()
        seen, sent = len(tap.captured()), sum(map(len, old))
        for _ in deadline_loop(what="fresh messages raced to the relay"):
            fresh = tap.captured()[seen:]
            for msg in fresh:
                attacker.sendto(msg, (LOCAL, pair.meet))
                sent += len(msg)
            seen += len(fresh)
            if len(tap.captured()) - len(old) >= 3:
                break
            time.sleep(0.05)
        assert drain(attacker) <= sent
        assert ATTACKER not in pair.relay_daemon.log() + listener.log()
    finally:
        pair.close()
        if tap is not None:
            tap.close()


def test_a_key_holder_filling_a_rendezvous_tunnel_does_not_crash_it(tmp_path):
    """Peers with the longest names, as many as max_flows allows: the state block that
    status reads holds them all, and the worker serves on."""
    from test_punch import Pair
    from udpmux.auth import read_key
    from udpmux.session import Initiator
    pair = Pair(tmp_path)
    socks = []
    try:
        pair.relay()
        key = read_key(pair.key)
        count = 300
        for n in range(count):
            sock = udp_client(f"127.0.{n // 250 + 1}.{n % 250 + 2}", timeout=0.2)
            initiator = Initiator(key, wire.ROLE_PUNCH)
            for _ in deadline_loop(what="a WELCOME (HELLOs are answered 100 a second)"):
                sock.sendto(initiator.hello(), (LOCAL, pair.meet))
                try:
                    session = initiator.welcome(sock.recv(1000))
                    break
                except socket.timeout:
                    continue
            name = (b"\x01" * 58) + b"%06d" % n     # 64 bytes, each escaped in JSON
            sock.sendto(session.seal(wire.T_RENDEZVOUS, 0, bytes([wire.SIDE_FORWARD]) + name),
                        (LOCAL, pair.meet))
            socks.append(sock)
        from procs import tunnel
        for _ in deadline_loop(what="every peer in the status"):
            t = tunnel(pair.control, "meet")
            if len(t["pairs"]) == count:
                break
        assert t["restarts"] == 0 and t["state"] == "running"
        assert "crashed" not in pair.relay_daemon.log()
    finally:
        for sock in socks:
            sock.close()
        pair.close()


# -- link

def test_a_terminal_that_echoes_the_key_does_not_show_it(tmp_path):
    """An ssh that allocates a terminal echoes the session key back before the server's
    banner: the link works, and the key is nowhere in what the user sees."""
    from test_link import TcpService, link_argv
    service = TcpService()
    keyfile = tmp_path / "echoed"
    try:
        data = os.urandom(50_000)
        out = subprocess.run(link_argv(service.port, "--debug", bind="47900-47919"),
                             input=data, env={**env(), "FAKESSH_ECHO": str(keyfile)},
                             capture_output=True, timeout=60)
        key = keyfile.read_bytes().strip()
        assert len(key) == 44                   # the key did go through the echo
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == data
        assert key not in out.stderr and key not in out.stdout
    finally:
        service.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing loopback traffic needs root")
def test_replayed_link_messages_from_another_address_change_nothing():
    """A stranger who captured the client's messages replays them to the server from
    another address while the session runs: the server keeps sending to the client,
    every byte arrives, and the stranger gets nothing back."""
    from procs import Sniffer
    from test_link import TcpService, link_argv
    service = TcpService()
    low, high = 47920, 47939
    sniffer = Sniffer(range(low, high + 1))
    proc = subprocess.Popen(link_argv(service.port, "--debug", bind=f"{low}-{high}"),
                            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = os.urandom(200_000)
        proc.stdin.write(first)
        proc.stdin.flush()
        assert proc.stdout.read(len(first)) == first
        captured = sniffer.captured()
        assert captured
        attacker = udp_client(ATTACKER, timeout=0.5)
        for port, msg in captured:
            attacker.sendto(msg, (LOCAL, port))
        second = os.urandom(200_000)
        proc.stdin.write(second)
        proc.stdin.close()
        assert proc.stdout.read() == second
        assert proc.wait(WAIT) == 0
        err = proc.stderr.read().decode()
        assert "moved" not in err and ATTACKER not in err
        assert drain(attacker) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        sniffer.close()
        service.close()


# -- link after an outage: answering an address not yet proved

@pytest.fixture
def silent_link(tmp_path):
    """A link-server and a client made of the library whose stream reaches a TCP echo
    service.  The client writes, then reads nothing until the server has sent the echo
    three times (once, and again at two PTOs): the server is in an outage.  Yields the
    target, the client, the payload and the server's messages kept unread."""
    from fuzzing import LinkServerTarget
    target = LinkServerTarget(tmp_path, random.Random(13))
    try:
        target.start()
        client = target.client
        payload = b"the terminal's next line\n"
        client.conn.write(client.sid, payload)
        client.pump()
        unread, copies = [], 0
        for left in deadline_loop(what="the echo sent three times unanswered"):
            ready, _, _ = select.select([client.sock], [], [], left)
            if ready:
                msg = client.sock.recv(70000)
                unread.append(msg)
                copies += _stream_at_start(msg, client.sid)
            if copies >= 3:
                break
        yield target, client, payload, unread
    finally:
        target.stop()


def _stream_at_start(msg, sid):
    """1 when msg carries stream sid's bytes from offset 0, else 0."""
    mtype, _session, tag, _nonce = wire.parse_header(msg, True)
    return int(mtype == wire.T_STREAM and tag == sid
               and wire.STREAM.unpack_from(msg, wire.HEADER_SIZE)[0] == 0)


def padded_keepalive(client):
    """The KEEPALIVE a link client sends from an address the server may not know."""
    body = keepalive_body(time.monotonic(), size=1232 - wire.HEADER_SIZE - wire.MAC_SIZE)
    return client.raw(wire.T_KEEPALIVE, 0, body, send=False)


def read_echo(client, unread, payload):
    for msg in unread:
        client.on_message(msg)
    for _ in deadline_loop(what="the echo"):
        client.receive(0.05)
        if len(client.received) >= len(payload):
            break
    assert bytes(client.received) == payload


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing loopback traffic needs root")
def test_a_raced_word_after_an_outage_gets_no_more_than_it_carried(silent_link):
    """A stranger got the client's first word after an outage in first, from its own
    address: the server sends it the challenge and data, no more bytes than the word
    had, and stays with the client, which then gets the echo."""
    target, client, payload, unread = silent_link
    word = padded_keepalive(client)
    attacker = udp_client(ATTACKER, timeout=0.5)
    attacker.sendto(word, (LOCAL, target.port))
    got = drain(attacker)
    challenge = wire.HEADER_SIZE + wire.KEEPALIVE.size + wire.MAC_SIZE
    assert challenge < got <= len(word)
    read_echo(client, unread, payload)
    assert "moved" not in target.logs()


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing loopback traffic needs root")
def test_after_an_outage_a_client_that_moved_gets_data_before_it_answers(silent_link):
    """The client's NAT changed during an outage: its first word from the new address
    brings the echo back there at once, with the challenge, not a round trip later;
    once it answers, the session moves there."""
    target, client, payload, unread = silent_link
    client.sock.close()
    client.sock = udp_client(LOCAL)
    client.sock.connect((LOCAL, target.port))
    client.send(padded_keepalive(client))
    arrived = []
    for left in deadline_loop(what="the echo at the new address"):
        ready, _, _ = select.select([client.sock], [], [], left)
        if ready:
            arrived.append(client.sock.recv(70000))
            if any(_stream_at_start(msg, client.sid) for msg in arrived):
                break
    read_echo(client, unread + arrived, payload)
    for _ in deadline_loop(what="the server to follow"):
        client.receive(0.05)
        if "client moved from" in target.logs():
            break
