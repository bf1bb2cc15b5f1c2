"""udpmux uot-server and uot-client: UDP over TCP, as real processes on loopback."""

import os
import signal
import socket
import struct
import subprocess

import psutil
import pytest

from procs import (
    WAIT, Daemon, Echo, deadline_loop, env, exchange, free_port, udp_client, udpmux_argv,
)
from udpmux import auth, wire
from udpmux.carrier import FLOW_QUEUE, TcpCarrier, tune
from udpmux.session import Initiator
from udpmux.uot import HANDSHAKE_TIMEOUT
from udpmux.worker import Poller

LOCAL = "127.0.0.1"


class Uot:
    """An echo target, a uot-server in front of it, and uot-clients."""

    def __init__(self, tmp_path):
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.echo = Echo()
        self.tcp = free_port()
        self.daemons = []

    def server(self, *extra, key=None, target=None):
        daemon = Daemon(["uot-server", "--listen", f"{LOCAL}:{self.tcp}", "--target",
                         target or f"localhost:{self.echo.port}",
                         *(["--insecure"] if key is False else ["--key-file", key or self.key]),
                         "--debug", *extra])
        self.daemons.append(daemon)
        daemon.wait_log("carrying UDP for")
        return daemon

    def client(self, *extra, key=None):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCAL, 0))
            port = s.getsockname()[1]
        daemon = Daemon(["uot-client", "--listen", f"{LOCAL}:{port}", "--server",
                         f"{LOCAL}:{self.tcp}",
                         *(["--insecure"] if key is False else ["--key-file", key or self.key]),
                         "--debug", *extra])
        self.daemons.append(daemon)
        daemon.port = port
        return daemon

    def connected_client(self, *extra):
        daemon = self.client(*extra)
        daemon.wait_log("connected to")
        return daemon

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.echo.close()


@pytest.fixture
def uot(tmp_path):
    u = Uot(tmp_path)
    yield u
    u.close()


@pytest.mark.parametrize("size", [0, 1, 1200, 9000, wire.MAX_UDP_PAYLOAD])
def test_datagrams_of_every_size_cross_whole_to_a_target_named_localhost(uot, size):
    uot.server()
    client = uot.connected_client()
    sock = udp_client()
    data = os.urandom(size)
    assert exchange(sock, data, (LOCAL, client.port)) == data


def test_each_client_address_is_a_flow_with_its_own_socket_at_the_server(uot):
    uot.server()
    client = uot.connected_client()
    socks = [udp_client() for _ in range(10)]
    for round_ in range(3):
        for n, sock in enumerate(socks):
            data = b"%d/%d" % (n, round_)
            assert exchange(sock, data, (LOCAL, client.port)) == data
    assert len(uot.echo.sources) == 10


def test_several_uot_clients_are_served_at_once(uot):
    server = uot.server()
    clients = [uot.connected_client() for _ in range(3)]
    for n, client in enumerate(clients):
        sock = udp_client()
        assert exchange(sock, b"via %d" % n, (LOCAL, client.port)) == b"via %d" % n
    assert len(uot.echo.sources) == 3
    assert server.log().count("connected") >= 3


def test_insecure_needs_to_be_asked_for(uot):
    out = subprocess.run(udpmux_argv("uot-server", "--listen", f"{LOCAL}:0", "--target",
                                     f"{LOCAL}:9"), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 64 and "missing --key-file or --insecure" in out.stderr
    uot.server(key=False)
    client = uot.client(key=False)
    client.wait_log("connected to")
    assert exchange(udp_client(), b"plain", (LOCAL, client.port)) == b"plain"


def test_a_client_with_the_wrong_key_is_refused(uot, tmp_path):
    server = uot.server()
    wrong = str(tmp_path / "wrong")
    subprocess.run(udpmux_argv("keygen", wrong), env=env(), check=True)
    client = uot.client(key=wrong)
    line = server.lines[server.wait_log("its messages fail authentication")]
    assert "another key" in line and "its connection is closed" in line, line
    line = client.lines[client.wait_log("cannot connect to")]
    assert "before the handshake ended: a uot-server with another key" in line, line
    sock = udp_client(timeout=0.5)
    sock.sendto(b"let me in", (LOCAL, client.port))
    with pytest.raises(socket.timeout):
        sock.recv(100)
    assert uot.echo.count == 0


@pytest.mark.parametrize("garbage, logged", [
    (b"GET / HTTP/1.0\r\n\r\n", "a frame that cannot be right (too-large)"),
    (struct.pack("!I", 3) + b"abc", "a frame that cannot be right (short)"),
    (struct.pack("!I", 40) + bytes(40), "a message refused (version)"),
])
def test_a_bad_stream_closes_that_connection_only(uot, garbage, logged):
    server = uot.server()
    client = uot.connected_client()
    sock = udp_client()
    assert exchange(sock, b"before", (LOCAL, client.port)) == b"before"
    with socket.create_connection((LOCAL, uot.tcp), timeout=WAIT) as bad:
        bad.sendall(garbage)
        assert bad.recv(100) == b""         # the server hung up
    server.wait_log(logged)
    assert exchange(sock, b"after", (LOCAL, client.port)) == b"after"


def test_data_before_a_handshake_or_under_another_key_is_refused(uot):
    server = uot.server()
    stranger = Initiator(auth.generate_key(), wire.ROLE_UOT)
    with socket.create_connection((LOCAL, uot.tcp), timeout=WAIT) as conn:
        conn.sendall(wire.frame(wire.pack_header(wire.T_DATA, 1, 7, 1, True) + bytes(30)))
        assert conn.recv(100) == b""
    server.wait_log("a message refused (unexpected)")
    with socket.create_connection((LOCAL, uot.tcp), timeout=WAIT) as conn:
        conn.sendall(wire.frame(stranger.hello()))
        assert conn.recv(100) == b""
    server.wait_log("its messages fail authentication")


def test_a_connection_that_never_shakes_hands_is_closed(uot):
    server = uot.server()
    with socket.create_connection((LOCAL, uot.tcp), timeout=WAIT + 5) as idle:
        assert idle.recv(100) == b""        # after HANDSHAKE_TIMEOUT
    server.wait_log(f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s")


def test_the_client_reconnects_and_keeps_its_flows(uot):
    server = uot.server()
    client = uot.connected_client()
    sock = udp_client()
    assert exchange(sock, b"one", (LOCAL, client.port)) == b"one"
    server.stop()
    client.wait_log("lost")
    uot.server()
    client.wait_log("connected to", start=client.wait_log("lost"))
    assert exchange(sock, b"two", (LOCAL, client.port)) == b"two"


def test_idle_flows_expire_at_both_ends_and_their_sockets_close(uot):
    server = uot.server("--flow-idle", "1")
    client = uot.connected_client("--flow-idle", "1")
    baseline = psutil.Process(server.pid).num_fds()
    socks = [udp_client() for _ in range(5)]
    for sock in socks:
        assert exchange(sock, b"x", (LOCAL, client.port)) == b"x"
    assert psutil.Process(server.pid).num_fds() == baseline + 5
    for _ in deadline_loop(what="the flows' sockets to close"):
        if psutil.Process(server.pid).num_fds() == baseline:
            break


def test_a_hundred_thousand_client_addresses_over_time(uot):
    """Tags are reused and every table is bounded: 100,000 addresses, 64 flows at most."""
    server = uot.server("--max-flows", "64")
    client = uot.connected_client("--max-flows", "64")
    baseline = {p: psutil.Process(p.pid).num_fds() for p in (server, client)}
    sent = 0
    for third in range(1, 5):               # 4 loopback addresses x 25,000 ports
        for _ in range(25_000):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((f"127.0.0.{third}", 0))
                s.sendto(b"hi", (LOCAL, client.port))
            sent += 1
    assert sent == 100_000
    sock = udp_client()
    assert exchange(sock, b"still here", (LOCAL, client.port)) == b"still here"
    for daemon in (server, client):
        assert daemon.proc.poll() is None
        assert psutil.Process(daemon.pid).num_fds() <= baseline[daemon] + 64 + 2


# -- the carrier itself: fairness and bounds, on a real socket pair

def test_one_flooding_flow_does_not_hold_up_another():
    with socket.create_server((LOCAL, 0)) as server:
        ours = socket.create_connection(server.getsockname())
        theirs, _ = server.accept()
    poller = Poller()
    closed = []
    carrier = TcpCarrier(ours, poller, lambda c, m: None, lambda c, why: closed.append(why))
    for n in range(5 * FLOW_QUEUE):
        carrier.send(b"A" * 100 + n.to_bytes(4, "big"), tag=1)
    for n in range(3):
        carrier.send(b"B" * 100 + n.to_bytes(4, "big"), tag=2)
    assert carrier.drops["queue"] == 4 * FLOW_QUEUE        # A's oldest, counted
    carrier.flush()
    theirs.settimeout(WAIT)
    deframer = wire.Deframer()
    got = []
    while len(got) < 64:
        deframer.feed(theirs.recv(65536))
        got += list(deframer.messages())
    # Flow B's three datagrams went out among the first, not behind A's backlog.
    assert [m for m in got[:8] if m.startswith(b"B")] == [
        b"B" * 100 + n.to_bytes(4, "big") for n in range(3)]
    # A's oldest were dropped: what is sent of A starts after them.
    first_a = next(m for m in got if m.startswith(b"A"))
    assert int.from_bytes(first_a[-4:], "big") == 4 * FLOW_QUEUE
    assert not closed
    ours.close()
    theirs.close()


def test_carrier_connections_have_nodelay_and_keepalive():
    with socket.create_server((LOCAL, 0)) as server, \
            socket.create_connection(server.getsockname()) as sock:
        tune(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


def test_sigterm_stops_both_ends_cleanly(uot):
    server = uot.server()
    client = uot.connected_client()
    client.signal(signal.SIGTERM)
    assert client.proc.wait(WAIT) == 0
    server.wait_log("the client said goodbye")
    server.signal(signal.SIGTERM)
    assert server.proc.wait(WAIT) == 0


def test_strangers_waiting_in_the_handshake_do_not_take_the_clients_places(uot):
    """Connections that never shake hands, from many addresses and reopened whenever
    closed: a client that holds the key still gets in, and the one already in keeps its
    place and its flows."""
    from test_attacks import Squatters
    server = uot.server("--max-clients", "2")
    client = uot.connected_client()
    sock = udp_client()
    assert exchange(sock, b"before", (LOCAL, client.port)) == b"before"
    squatters = Squatters(uot.tcp, 24)
    try:
        newcomer = uot.connected_client()
        other = udp_client()
        assert exchange(other, b"new", (LOCAL, newcomer.port)) == b"new"
        assert exchange(sock, b"after", (LOCAL, client.port)) == b"after"
        server.wait_log("closed for a newer connection")
        assert server.proc.poll() is None
    finally:
        squatters.close()
