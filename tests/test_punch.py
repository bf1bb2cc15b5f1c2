"""udpmux punch and rendezvous tunnels, as real processes on loopback.  Real NATs (cone
and symmetric), the relayed fallback and its upgrade, and mosh are in
tests/test_lab_punch.py."""

import re
import socket
import subprocess
import urllib.request

import pytest

from procs import (
    WAIT, Daemon, Echo, Notify, Tap, deadline_loop, env, exchange, free_port, tunnel,
    udp_client, udpmux_argv,
)
from udpmux import auth, wire
from udpmux.session import Initiator

LOCAL = "127.0.0.1"


class Pair:
    """An echo service, and two punch agents: one forwarding to it, one listening."""

    def __init__(self, tmp_path):
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.echo = Echo()
        self.daemons = []
        self.tmp = tmp_path

    def start(self, args):
        daemon = Daemon(args)
        self.daemons.append(daemon)
        return daemon

    def direct(self, key=None):
        a, b, self.listen = free_port(), free_port(), free_port()
        self.forwarder = self.start(["punch", "--peer", f"{LOCAL}:{b}", "--port", a,
                                     "--key-file", self.key, "--forward",
                                     f"{LOCAL}:{self.echo.port}", "--debug"])
        self.listener = self.start(["punch", "--peer", f"{LOCAL}:{a}", "--port", b,
                                    "--key-file", key or self.key, "--listen",
                                    f"{LOCAL}:{self.listen}", "--debug"])

    def relay(self):
        self.control = str(self.tmp / "control.sock")
        self.meet = free_port()
        config = self.tmp / "relay.toml"
        config.write_text(f'control_socket = "{self.control}"\n'
                          f'metrics_listen = "{LOCAL}:0"\n[tunnels.meet]\n'
                          f'mode = "rendezvous"\npublic = "{LOCAL}:{self.meet}"\n'
                          f'key_file = "{self.key}"\n')
        self.notify = Notify(str(self.tmp))
        self.relay_daemon = Daemon(["relay", "-c", config, "--debug"], notify=self.notify)
        self.daemons.append(self.relay_daemon)
        self.notify.wait_for("READY=1")

    def brokered(self, name="mosh"):
        self.listen = free_port()
        self.forwarder = self.start(["punch", "--relay", f"{LOCAL}:{self.meet}",
                                     "--rendezvous", name, "--key-file", self.key,
                                     "--forward", f"{LOCAL}:{self.echo.port}", "--debug"])
        self.listener = self.start(["punch", "--relay", f"{LOCAL}:{self.meet}",
                                    "--rendezvous", name, "--key-file", self.key,
                                    "--listen", f"{LOCAL}:{self.listen}", "--debug"])

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.echo.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_two_agents_punch_a_direct_path_and_carry_every_size(pair):
    pair.direct()
    pair.listener.wait_log("direct path to")
    pair.forwarder.wait_log("direct path to")
    clients = [udp_client() for _ in range(3)]
    for n, client in enumerate(clients):
        for size in (0, 1200, wire.MAX_DATAGRAM):
            data = bytes([n]) * size
            assert exchange(client, data, (LOCAL, pair.listen)) == data
    assert len(pair.echo.sources) == 3          # one service socket per local client


def test_a_peer_with_another_key_gets_no_path(pair, tmp_path):
    other = str(tmp_path / "other")
    subprocess.run(udpmux_argv("keygen", other), env=env(), check=True)
    pair.direct(key=other)
    client = udp_client(timeout=0.5)
    client.sendto(b"anyone?", (LOCAL, pair.listen))
    with pytest.raises(socket.timeout):
        client.recv(100)
    assert pair.echo.count == 0
    assert "direct path" not in pair.listener.log()


def test_the_relay_pairs_two_peers_by_name_and_they_go_direct(pair):
    pair.relay()
    pair.brokered()
    pair.listener.wait_log("direct path to")
    client = udp_client()
    assert exchange(client, b"met", (LOCAL, pair.listen)) == b"met"
    for _ in deadline_loop(what="the pair in the relay's status"):
        pairs = tunnel(pair.control, "meet")["pairs"]
        if pairs and pairs[0]["path"] == "direct":
            break
    assert pairs[0]["name"] == "mosh" and pairs[0]["listen"] and pairs[0]["forward"]
    assert pairs[0]["relayed_datagrams"] == 0
    line = pair.relay_daemon.lines[pair.relay_daemon.wait_log("metrics at")]
    url = re.search(r"(http://\S+/metrics)", line).group(1)
    with urllib.request.urlopen(url, timeout=WAIT) as reply:
        text = reply.read().decode()
    assert 'udpmux_punch_pairs{tunnel="meet",path="direct"} 1' in text
    assert 'udpmux_punch_pairs{tunnel="meet",path="relayed"} 0' in text


def test_the_direct_path_stays_when_the_relay_sees_the_peer_elsewhere(pair):
    """Behind a symmetric NAT, or once a birthday probe socket has taken over, the relay
    sees a peer at another port than the direct path does. When the relay says so, the
    direct session keeps the address that its own messages came from."""
    pair.relay()
    mapping = Tap((LOCAL, pair.meet))          # the forwarder's NAT towards the relay
    try:
        pair.listen = free_port()
        forwarder = pair.start(["punch", "--relay", f"{LOCAL}:{mapping.address[1]}",
                                "--rendezvous", "mosh", "--key-file", pair.key, "--forward",
                                f"{LOCAL}:{pair.echo.port}", "--keepalive", "2", "--debug"])
        listener = pair.start(["punch", "--relay", f"{LOCAL}:{pair.meet}", "--rendezvous",
                               "mosh", "--key-file", pair.key, "--listen",
                               f"{LOCAL}:{pair.listen}", "--debug"])
        listener.wait_log("direct path to")
        client = udp_client(timeout=1.0)
        assert exchange(client, b"before", (LOCAL, pair.listen)) == b"before"
        mapping.rebind()
        port = mapping.outward_address[1]
        # The forwarder's next keepalive to the relay leaves from the new port; the relay
        # tells the listener, which must go on sending to where the direct session is.
        pair.relay_daemon.wait_log(f"moved from {LOCAL}:")
        listener.wait_log(f"the relay says the peer is at {LOCAL}:{port}")
        for n in range(5):
            data = b"after %d" % n
            assert exchange(client, data, (LOCAL, pair.listen), tries=1) == data
        assert "gone" not in listener.log() + forwarder.log()
    finally:
        mapping.close()


@pytest.mark.parametrize("side", ["forwarder", "listener"])
def test_a_path_proven_elsewhere_leaves_the_direct_sessions_datagrams_where_they_go(
        pair, side):
    """Found by tests/test_fuzz.py: a key holder elsewhere on the peer's host (a late
    answer from one of the peer's birthday probe sockets is one) answered a probe while
    the direct session was up.  The agent then sent the session's datagrams there, while
    the session stayed with the peer: the flow was lost until the path timed out."""
    pair.direct()
    pair.listener.wait_log("direct path to")
    pair.forwarder.wait_log("direct path to")
    agent = getattr(pair, side)
    port = int(agent.lines[agent.wait_log("punching from port")].split("port ")[1].split()[0])
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, pair.listen)) == b"before"
    initiator = Initiator(auth.read_key(pair.key), wire.ROLE_PUNCH)
    holder = udp_client()
    mine = bytes(range(16))
    holder.sendto(initiator.seal(wire.T_PUNCH, 0, wire.PUNCH.pack(mine, wire.NO_RANDOM)),
                  (LOCAL, port))
    for _ in deadline_loop(what="the agent's answer to the probe"):
        msg = holder.recv(1000)
        if msg[1] == wire.T_PUNCH:
            challenge, echo = wire.PUNCH.unpack(initiator.open(msg, wire.T_PUNCH))
            if echo == mine:
                break
    holder.sendto(initiator.seal(wire.T_PUNCH, 0, wire.PUNCH.pack(wire.NO_RANDOM, challenge)),
                  (LOCAL, port))
    agent.wait_log(f"a path to {LOCAL}:{holder.getsockname()[1]} is proven")
    for n in range(10):
        data = b"after %d" % n
        assert exchange(client, data, (LOCAL, pair.listen), tries=1) == data
    assert "gone" not in pair.listener.log() + pair.forwarder.log()


def test_strangers_learn_no_address_from_the_rendezvous(pair):
    pair.relay()
    pair.brokered()
    pair.listener.wait_log("direct path to")
    stranger = udp_client(timeout=0.5)
    hello = Initiator(auth.generate_key(), wire.ROLE_PUNCH).hello()
    stranger.sendto(hello, (LOCAL, pair.meet))
    with pytest.raises(socket.timeout):
        stranger.recv(1000)
    for _ in deadline_loop(what="the stranger's HELLO counted"):
        if tunnel(pair.control, "meet")["drops"].get("mac"):
            break


def test_a_bad_rendezvous_name_is_a_counted_drop(pair):
    pair.relay()
    key = auth.read_key(pair.key)
    initiator = Initiator(key, wire.ROLE_PUNCH)
    sock = udp_client()
    sock.sendto(initiator.hello(), (LOCAL, pair.meet))
    session = initiator.welcome(sock.recv(1000))
    for side, name in ((3, b"x"), (1, b"\xff\xfe"), (2, b"y" * 65)):
        sock.sendto(session.seal(wire.T_RENDEZVOUS, 0, bytes([side]) + name),
                    (LOCAL, pair.meet))
    for _ in deadline_loop(what="the drops"):
        if tunnel(pair.control, "meet")["drops"].get("name") == 3:
            break


def test_once_punches_and_leaves_the_port_free(pair):
    receiver = udp_client(timeout=WAIT)
    port = free_port()
    out = subprocess.run(udpmux_argv("punch", "--once", "--peer",
                                     f"{LOCAL}:{receiver.getsockname()[1]}", "--port", port),
                         env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    data, source = receiver.recvfrom(100)
    assert source[1] == port and data.startswith(b"udpmux punch")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app:
        app.bind(("0.0.0.0", port))             # the program can have the port now


@pytest.mark.parametrize("args, message", [
    (["--relay", "127.0.0.1:1", "--rendezvous", "x" * 65, "--key-file", "k", "--listen",
      "127.0.0.1:0"], "--rendezvous: expected at most 64 bytes"),
    (["--peer", "127.0.0.1:1", "--port", "70000", "--insecure", "--listen", "127.0.0.1:0"],
     "--port: expected a port, 0 to 65535, got 70000"),
    (["--peer", "127.0.0.1:1", "--port", "5", "--insecure", "--listen", "127.0.0.1:0",
      "--probe-ports", "many"], "--probe-ports: expected a whole number of at least 0"),
    (["--peer", "nowhere", "--port", "5", "--insecure", "--forward", "127.0.0.1:9"],
     "--peer: "),
    (["--once", "--peer", "127.0.0.1:1", "--port", "65536"],
     "--port: expected a port, 0 to 65535, got 65536"),
    (["--once", "--peer", "127.0.0.1:1", "--port", "\u0665"],
     "--port: expected a port, 0 to 65535, got '\u0665'"),
])
def test_bad_punch_options(args, message):
    out = subprocess.run(udpmux_argv("punch", *args), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 64 and message in out.stderr


def write_punch(path, text):
    path.write_text(text)
    return str(path)


def test_each_side_from_a_file(pair):
    """punch -c FILE, as the udpmux-punch@ unit runs it: the same two sides as from
    options."""
    a, b, listen = free_port(), free_port(), free_port()
    forward = write_punch(pair.tmp / "punch-a.toml", f"""
        peer = "{LOCAL}:{b}"
        port = {a}
        key_file = "{pair.key}"
        forward = "{LOCAL}:{pair.echo.port}"
        keepalive = 10
        probe_ports = 0
        """.replace("\n        ", "\n"))
    listener = write_punch(pair.tmp / "punch-b.toml", f"""
        peer = "{LOCAL}:{a}"
        port = {b}
        key_file = "{pair.key}"
        listen = "{LOCAL}:{listen}"
        max_flows = 8
        """.replace("\n        ", "\n"))
    pair.start(["punch", "-c", forward, "--debug"])
    side = pair.start(["punch", "-c", listener, "--debug"])
    side.wait_log("direct path to")
    client = udp_client()
    try:
        for n in range(5):
            assert exchange(client, b"from a file %d" % n, (LOCAL, listen)) == b"from a file %d" % n
    finally:
        client.close()


@pytest.mark.parametrize("text, message", [
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\nkey_file = "K"\ncolour = "red"\n',
     "colour"),
    ('forward = "127.0.0.1:9"\nkey_file = "K"\n',
     "give either peer (direct) or relay and rendezvous"),
    ('peer = "127.0.0.1:1"\nrelay = "127.0.0.1:2"\nrendezvous = "m"\nforward = "127.0.0.1:9"\n'
     'key_file = "K"\n', "give either peer (direct) or relay"),
    ('relay = "127.0.0.1:2"\nforward = "127.0.0.1:9"\nkey_file = "K"\n',
     "rendezvous: missing"),
    ('peer = "127.0.0.1:1"\nkey_file = "K"\n', "give either forward"),
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\nlisten = "127.0.0.1:8"\nkey_file = "K"\n',
     "give either forward"),
    ('relay = "127.0.0.1:2"\nrendezvous = "m"\nforward = "127.0.0.1:9"\ninsecure = true\n',
     "insecure: a relay's rendezvous tunnel needs a key"),
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\n', "key_file: missing"),
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\nkey_file = "-"\n',
     "works on the command line only"),
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\nkey_file = "K"\nport = -1\n',
     "port: expected a port"),
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\nkey_file = "K"\nprobe_ports = 1.5\n',
     "probe_ports: expected a whole number"),
    ('peer = "127.0.0.1:1"\nforward = "127.0.0.1:9"\nkey_file = "K"\nretry = 0\n',
     "retry: expected a number above 0"),
    ('peer = "127.0.0.1:1\n', "not valid TOML"),
])
def test_bad_punch_files(pair, text, message):
    path = write_punch(pair.tmp / "punch-bad.toml", text.replace('"K"', f'"{pair.key}"'))
    out = subprocess.run(udpmux_argv("punch", "-c", path), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 78, out.stderr
    assert path in out.stderr and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
