"""udpmux relay and udpmux expose, as real processes on loopback."""

import os
import signal
import socket
import subprocess

import pytest

from procs import (
    WAIT, Daemon, Echo, Notify, Tap, deadline_loop, env, exchange, free_port, status, tunnel,
    udp_client, udpmux_argv,
)
from udpmux import wire
from udpmux.auth import read_key
from udpmux.session import Initiator

LOCAL = "127.0.0.1"


class Rig:
    """A relay, its exposer and an echo service, started and stopped by the test."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.control = str(tmp_path / "control.sock")
        self.echo = Echo()
        self.daemons = []
        self.notify = Notify(str(tmp_path))

    def relay(self, *extra, key=True, public=None, register=None, wait=True):
        self.public = public or free_port()
        self.register = register or free_port()
        args = ["relay", "--public", f"{LOCAL}:{self.public}",
                "--register", f"{LOCAL}:{self.register}", "--control-socket", self.control,
                *(["--key-file", self.key] if key else ["--insecure"]), "--debug", *extra]
        daemon = self.start(args)
        if wait:
            self.notify.wait_for("READY=1")
        return daemon

    def start(self, args, **kw):
        daemon = Daemon(args, notify=self.notify, **kw)
        self.daemons.append(daemon)
        return daemon

    def expose(self, *extra, relay=None, key=None, wait=True):
        relay = relay or f"{LOCAL}:{self.register}"
        args = ["expose", "--relay", relay, "--service", f"{LOCAL}:{self.echo.port}",
                *(["--insecure"] if key is False else ["--key-file", key or self.key]),
                "--debug", *extra]
        daemon = self.start(args)
        if wait:
            daemon.wait_log("registered with the relay")
            # The relay counts the session once the exposer's first message under it
            # arrived, which may be after the exposer logged its WELCOME.
            for _ in deadline_loop(what="the relay to see the exposer"):
                if any(t.get("exposer") for t in status(self.control)["tunnels"]):
                    break
        return daemon

    def tunnel(self):
        return tunnel(self.control, "tunnel")

    def wait_tunnel(self, what, check):
        """Poll the relay's status until check(tunnel) holds."""
        for _ in deadline_loop(what=what):
            t = self.tunnel()
            if check(t):
                return t

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.echo.close()
        self.notify.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_datagrams_flow_both_ways_with_one_service_socket_per_client(rig):
    rig.relay()
    rig.expose()
    clients = [udp_client() for _ in range(20)]
    for round_ in range(5):
        for n, client in enumerate(clients):
            data = f"client {n} round {round_}".encode()
            assert exchange(client, data, (LOCAL, rig.public)) == data
    # The service saw one source port per client: one service socket each.
    assert len(rig.echo.sources) == 20
    t = rig.wait_tunnel("counters", lambda t: t["counters"]["datagrams_out"] >= 100)
    assert t["flows"] == 20
    assert t["counters"]["datagrams_in"] >= 100


def test_a_burst_of_100_new_clients_all_get_through(rig):
    rig.relay()
    rig.expose()
    clients = [udp_client() for _ in range(100)]
    for n, client in enumerate(clients):            # as fast as Python sends: ~1 ms
        client.sendto(b"hello %d" % n, (LOCAL, rig.public))
    for n, client in enumerate(clients):            # no resending: every first datagram
        assert client.recv(100) == b"hello %d" % n
    assert len(rig.echo.sources) == 100


@pytest.mark.parametrize("size", [0, 1, 1200, 1473, 9000, 32768, wire.MAX_DATAGRAM])
def test_datagrams_of_every_size_arrive_whole(rig, size):
    rig.relay()
    rig.expose()
    client = udp_client()
    data = os.urandom(size)
    assert exchange(client, data, (LOCAL, rig.public)) == data


def test_a_datagram_too_large_for_the_carrier_is_dropped_and_counted(rig):
    rig.relay()
    rig.expose()
    client = udp_client(timeout=0.5)
    for _ in range(3):
        client.sendto(bytes(wire.MAX_DATAGRAM + 1), (LOCAL, rig.public))
    assert exchange(client, b"still here", (LOCAL, rig.public)) == b"still here"
    with pytest.raises(socket.timeout):
        client.recv(70000)      # nothing for the oversized ones: not truncated, dropped
    rig.wait_tunnel("too-large drops", lambda t: t["drops"].get("too-large") == 3)
    # One warning, the first time, with the size and the client; the datagrams came from
    # the socket whose flow the worker logged next, so every warning is before that line.
    relay = rig.daemons[0]
    flow = relay.wait_log(f"new flow 1 from {LOCAL}:{client.getsockname()[1]}")
    warning = (f"tunnel tunnel: a datagram of {wire.MAX_DATAGRAM + 1} bytes from "
               f"{LOCAL}:{client.getsockname()[1]} is too large to carry (at most "
               f"{wire.MAX_DATAGRAM}); dropped, see MTU in udpmux(8)")
    warned = [line for line in relay.lines[:flow] if "too large" in line]
    assert len(warned) == 1 and warned[0].endswith(warning), warned


@pytest.mark.parametrize("mode", ["relay", "expose"])
def test_a_key_or_an_explicit_insecure_is_required(mode):
    args = {"relay": ["relay", "--public", "127.0.0.1:0"],
            "expose": ["expose", "--relay", "127.0.0.1:9", "--service", "127.0.0.1:9"]}[mode]
    out = subprocess.run(udpmux_argv(*args), env=env(), capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 64
    assert "missing --key-file or --insecure" in out.stderr


def test_insecure_mode_works_when_both_ends_ask_for_it(rig):
    rig.relay(key=False)
    rig.expose(key=False)
    client = udp_client()
    assert exchange(client, b"open", (LOCAL, rig.public)) == b"open"


def test_an_exposer_with_the_wrong_key_never_registers(rig, tmp_path):
    rig.relay()
    wrong = str(tmp_path / "wrong")
    subprocess.run(udpmux_argv("keygen", wrong), env=env(), check=True)
    rig.expose(key=wrong, wait=False)
    t = rig.wait_tunnel("mac drops", lambda t: t["drops"].get("mac", 0) >= 1)
    assert t["exposer"] is None
    client = udp_client(timeout=0.3)
    client.sendto(b"anyone?", (LOCAL, rig.public))
    with pytest.raises(socket.timeout):
        client.recv(100)
    rig.wait_tunnel("no-exposer drops", lambda t: t["drops"].get("no-exposer", 0) >= 1)


def test_a_missing_key_file_is_a_clear_error(tmp_path):
    out = subprocess.run(udpmux_argv("relay", "--public", "127.0.0.1:0", "--key-file",
                                     str(tmp_path / "nope")),
                         env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 66
    assert "no such key file" in out.stderr and "udpmux keygen" in out.stderr


@pytest.fixture
def tapped(rig):
    rig.relay()
    tap = Tap((LOCAL, rig.register))
    rig.expose("--keepalive", "1", relay=f"{LOCAL}:{tap.address[1]}")
    yield rig, tap
    tap.close()


def test_spoofed_and_replayed_messages_never_move_the_tunnel(tapped):
    rig, tap = tapped
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, rig.public)) == b"before"
    home = rig.wait_tunnel("exposer", lambda t: t["exposer"] is not None)["exposer"]["address"]
    attacker = udp_client()
    recorded = tap.captured()
    assert len(recorded) >= 3
    for data in recorded:                               # replays, from another address
        attacker.sendto(data, (LOCAL, rig.register))
    for data in recorded:                               # forgeries: one bit flipped
        forged = bytearray(data)
        forged[len(forged) // 2] ^= 0x10
        attacker.sendto(bytes(forged), (LOCAL, rig.register))
    t = rig.wait_tunnel("replay drops", lambda t: t["drops"].get("replay", 0)
                        + t["drops"].get("old", 0) + t["drops"].get("session", 0)
                        >= len(recorded) - 1)
    assert t["exposer"]["address"] == home
    assert t["counters"]["roams"] == 0
    assert exchange(client, b"after", (LOCAL, rig.public)) == b"after"


def test_the_exposer_roams_and_no_flow_is_lost(tapped):
    rig, tap = tapped
    client = udp_client()
    assert exchange(client, b"one", (LOCAL, rig.public)) == b"one"
    sources = set(rig.echo.sources)
    tap.rebind()
    new_port = tap.outward_address[1]
    rig.wait_tunnel("the relay to follow the exposer",
                    lambda t: t["exposer"]["address"] == f"{LOCAL}:{new_port}")
    assert exchange(client, b"two", (LOCAL, rig.public)) == b"two"
    assert rig.echo.sources == sources          # the same flow, the same service socket
    t = rig.tunnel()
    assert t["counters"]["roams"] == 1 and t["flows"] == 1


def test_a_stranger_never_gets_more_bytes_than_it_sent(rig):
    rig.relay()
    stranger = udp_client(timeout=0.3)
    sent = received = 0
    hello = Initiator(read_key(rig.key), wire.ROLE_EXPOSE).hello()
    probes = [hello, hello, b"\x01" * 64, os.urandom(300),
              wire.HEADER.pack(1, wire.T_KEEPALIVE, 1, 12345, 0, 7) + bytes(12 + 16),
              wire.HEADER.pack(1, wire.T_DATA, 1, 999, 5, 9) + bytes(16)]
    for probe in probes * 5:
        stranger.sendto(probe, (LOCAL, rig.register))
        sent += len(probe)
    while True:                     # bounded: each reply answers something sent
        try:
            received += len(stranger.recv(70000))
        except socket.timeout:
            break
    assert 0 < received <= sent     # it answered the HELLO, and never with more


def test_max_flows_evicts_the_idlest_at_both_ends(rig):
    relay = rig.relay("--max-flows", "4")
    exposer = rig.expose()
    clients = [udp_client() for _ in range(6)]
    for n, client in enumerate(clients):
        assert exchange(client, b"%d" % n, (LOCAL, rig.public)) == b"%d" % n
    t = rig.wait_tunnel("evictions", lambda t: t["counters"]["evicted"] == 2)
    assert t["flows"] == 4
    relay.wait_log("the flow table is full (max_flows 4)")
    exposer.wait_log("flow 1 closed by the relay")
    exposer.wait_log("flow 2 closed by the relay")
    # The evicted client is a new flow when it comes back.
    assert exchange(clients[0], b"back", (LOCAL, rig.public)) == b"back"


def test_a_flow_idle_at_the_relay_ends_at_both_ends(rig):
    rig.relay("--flow-idle", "1")
    exposer = rig.expose("--flow-idle", "600")
    client = udp_client()
    assert exchange(client, b"x", (LOCAL, rig.public)) == b"x"
    rig.wait_tunnel("expiry", lambda t: t["flows"] == 0 and t["counters"]["expired"] == 1)
    exposer.wait_log("flow 1 closed by the relay")


def test_a_flow_idle_at_the_exposer_ends_at_both_ends(rig):
    rig.relay("--flow-idle", "600")
    exposer = rig.expose("--flow-idle", "1")
    client = udp_client()
    assert exchange(client, b"x", (LOCAL, rig.public)) == b"x"
    exposer.wait_log("flow 1 idle; closed")
    t = rig.wait_tunnel("the exposer's CLOSE",
                        lambda t: t["flows"] == 0 and t["counters"]["closed"] == 1)
    assert t["counters"]["expired"] == 0


def burst(rig, clients):
    """Every client sends one datagram at once; how many got their answer."""
    for client in clients:
        client.sendto(b"new", (LOCAL, rig.public))
    answered = 0
    for client in clients:
        try:
            answered += client.recv(10) == b"new"
        except socket.timeout:
            pass
    return answered


def test_new_flows_are_rate_limited_per_source_address(rig):
    relay = rig.relay("--new-flows-rate", "100", "--new-flows-per-source", "3")
    rig.expose()
    assert burst(rig, [udp_client(timeout=0.5) for _ in range(12)]) == 3
    rig.wait_tunnel("rate drops", lambda t: t["drops"].get("source-rate") == 9)
    relay.wait_log("opens new flows faster than new_flows_per_source (3/s)")


def test_new_flows_are_rate_limited_per_tunnel(rig):
    relay = rig.relay("--new-flows-rate", "5", "--new-flows-per-source", "100")
    rig.expose()
    # Twelve source addresses: loopback answers to all of 127/8.
    clients = [udp_client(f"127.0.0.{n}", timeout=0.5) for n in range(2, 14)]
    assert burst(rig, clients) == 5
    rig.wait_tunnel("rate drops", lambda t: t["drops"].get("flow-rate") == 7)
    relay.wait_log("new flows arrive faster than new_flows_rate (5/s)")


def test_a_rate_below_one_a_second_still_lets_a_flow_in(rig):
    rig.relay("--new-flows-rate", "0.2", "--new-flows-per-source", "0.5")
    rig.expose()
    clients = [udp_client(f"127.0.0.{n}", timeout=0.5) for n in range(2, 6)]
    assert burst(rig, clients) == 1
    rig.wait_tunnel("rate drops", lambda t: t["drops"].get("flow-rate") == 3)


@pytest.mark.parametrize("garbage, reason", [
    (b"", "short"), (b"\x01\x10", "short"), (b"\x02" + bytes(40), "version"),
    (b"\x01\x7f\x00\x01" + bytes(40), "type"), (b"\x01\x10\x80\x01" + bytes(40), "flags"),
    (b"\x01\x01\x00\x01" + bytes(40), "length"), (b"\x01\x10\x00\x00" + bytes(40), "keyed"),
])
def test_malformed_messages_are_counted_drops(rig, garbage, reason):
    rig.relay()
    rig.expose()
    stranger = udp_client()
    for _ in range(4):
        stranger.sendto(garbage, (LOCAL, rig.register))
    rig.wait_tunnel(f"{reason} drops", lambda t: t["drops"].get(reason) == 4)
    client = udp_client()
    assert exchange(client, b"fine", (LOCAL, rig.public)) == b"fine"


def test_a_worker_killed_with_sigkill_comes_back_and_its_flows_keep_working(rig):
    relay = rig.relay()
    rig.expose()
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, rig.public)) == b"before"
    rig.wait_tunnel("the state block", lambda t: t["flows"] == 1 and t["exposer"])
    sources = set(rig.echo.sources)
    (worker,) = relay.children()
    os.kill(worker, signal.SIGKILL)
    t = rig.wait_tunnel("a new worker", lambda t: t["state"] == "running"
                        and t["worker_pid"] not in (None, worker))
    assert t["restarts"] == 1 and t["flows"] == 1
    assert exchange(client, b"after", (LOCAL, rig.public)) == b"after"
    assert rig.echo.sources == sources      # the same tag, so the same service socket
    relay.wait_log("carries on with the exposer")


def test_sigterm_stops_the_relay_and_all_its_workers(rig):
    relay = rig.relay()
    rig.expose()
    workers = relay.children()
    assert workers
    assert relay.stop() == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_ipv6_clients_and_an_ipv6_exposer(tmp_path):
    rig = Rig(tmp_path)
    try:
        rig.public, rig.register = free_port(), free_port()
        rig.start(["relay", "--public", f"[::1]:{rig.public}", "--register",
                   f"[::1]:{rig.register}", "--key-file", rig.key,
                   "--control-socket", rig.control])
        rig.notify.wait_for("READY=1")
        rig.expose(relay=f"[::1]:{rig.register}")
        client = udp_client("::1")
        assert exchange(client, b"over six", ("::1", rig.public)) == b"over six"
        t = rig.wait_tunnel("the exposer", lambda t: t["exposer"] is not None)
        assert t["exposer"]["address"].startswith("[::1]:")
        assert t["public"] == f"[::1]:{rig.public}"
    finally:
        rig.close()


def test_one_socket_for_clients_and_the_exposer(rig):
    port = free_port()
    rig.public = rig.register = port
    rig.start(["relay", "--public", f"{LOCAL}:{port}", "--key-file", rig.key,
               "--control-socket", rig.control])
    rig.notify.wait_for("READY=1")
    rig.expose()
    clients = [udp_client() for _ in range(5)]
    for n, client in enumerate(clients):
        assert exchange(client, b"shared %d" % n, (LOCAL, port)) == b"shared %d" % n
    t = rig.wait_tunnel("flows", lambda t: t["flows"] == 5)
    assert t["public"] == t["register"] == f"{LOCAL}:{port}"


def test_an_exposer_back_on_a_shared_socket_gets_waiting_datagrams_at_once(rig):
    """One socket for clients and the exposer: a new exposer's first message and a known
    client's datagram read in the same batch.  The worker forwards the datagram under
    the new session, and it is the same worker that does."""
    port = free_port()
    rig.public = rig.register = port
    rig.start(["relay", "--public", f"{LOCAL}:{port}", "--key-file", rig.key,
               "--control-socket", rig.control, "--debug"])
    rig.notify.wait_for("READY=1")
    exposer = rig.expose()
    client = udp_client()
    assert exchange(client, b"before", (LOCAL, port)) == b"before"
    exposer.stop()                                      # says BYE; the flow stays
    t = rig.wait_tunnel("the exposer to leave", lambda t: t["exposer"] is None)
    assert t["flows"] == 1
    worker = t["worker_pid"]
    # A new exposer, by hand: its handshake, then its first message and the client's
    # datagram queued while the worker is stopped, so that one read takes both.
    me = udp_client()
    initiator = Initiator(read_key(rig.key), wire.ROLE_EXPOSE)
    me.sendto(initiator.hello(), (LOCAL, port))
    session = initiator.welcome(me.recv(70000))
    os.kill(worker, signal.SIGSTOP)
    try:
        me.sendto(session.seal(wire.T_KEEPALIVE, 0, wire.KEEPALIVE.pack(0, 1, 0)),
                  (LOCAL, port))
        client.sendto(b"after", (LOCAL, port))
    finally:
        os.kill(worker, signal.SIGCONT)
    for _ in deadline_loop(what="the client's datagram at the new exposer"):
        msg = me.recv(70000)
        version, mtype, flags, sid, tag, nonce = wire.HEADER.unpack_from(msg)
        if mtype == wire.T_DATA:
            break
    assert sid == session.local_id
    assert msg[wire.HEADER_SIZE:-wire.MAC_SIZE] == b"after"
    assert session.open(msg, nonce)                     # sealed under the new session
    assert rig.tunnel()["worker_pid"] == worker         # and nothing was respawned


@pytest.mark.skipif(os.geteuid() != 0, reason="spoofing a source address needs root")
def test_garbage_from_the_exposers_address_on_a_shared_socket_makes_no_flow(rig):
    """Found by tests/test_fuzz.py: a datagram that is no message, sent (spoofed) from the
    exposer's address to a shared socket, made that address a client's flow; a later
    exposer's messages from there, its HELLO too, then went to the exposer of the day as
    a client's datagrams, and it could never register again."""
    from fuzzing import Spoofer
    port = free_port()
    rig.public = rig.register = port
    rig.start(["relay", "--public", f"{LOCAL}:{port}", "--key-file", rig.key,
               "--control-socket", rig.control, "--debug"])
    rig.notify.wait_for("READY=1")
    tap = Tap((LOCAL, port))
    spoofer = Spoofer()
    try:
        rig.expose("--keepalive", "1", relay=f"{LOCAL}:{tap.address[1]}")
        home = tap.outward_address
        client = udp_client()
        assert exchange(client, b"before", (LOCAL, port)) == b"before"
        spoofer.send(b"no message", home, (LOCAL, port))
        t = rig.wait_tunnel("the spoofed datagram dropped", lambda t: t["drops"].get("short"))
        assert t["flows"] == 1 and t["drops"]["short"] == 1
        # Another exposer takes the tunnel; the first comes back from its address.
        rig.expose()
        rig.daemons[0].wait_log("replaced by a new session from "
                                f"{home[0]}:{home[1]}")
        assert exchange(client, b"after", (LOCAL, port)) == b"after"
    finally:
        spoofer.close()
        tap.close()


def test_a_flood_on_one_tunnel_does_not_reach_the_other(tmp_path):
    """Two tunnels in one relay: one tunnel's port is flooded with garbage while the
    other's clients keep being served, and the flood's cost lands on the flooded
    tunnel's worker alone."""
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    ports = {name: (free_port(), free_port()) for name in ("calm", "flooded")}
    config = tmp_path / "relay.toml"
    config.write_text(f'control_socket = "{tmp_path}/control.sock"\n' + "".join(
        f'[tunnels.{name}]\npublic = "{LOCAL}:{pub}"\nregister = "{LOCAL}:{reg}"\n'
        f'key_file = "{key}"\n' for name, (pub, reg) in ports.items()))
    notify = Notify(str(tmp_path))
    echo = Echo()
    relay = Daemon(["relay", "-c", config], notify=notify)
    exposer = None
    try:
        notify.wait_for("READY=1")
        exposer = Daemon(["expose", "--relay", f"{LOCAL}:{ports['calm'][1]}", "--service",
                          f"{LOCAL}:{echo.port}", "--key-file", key])
        exposer.wait_log("registered with the relay")
        control = str(tmp_path / "control.sock")
        before = {t["name"]: t["cpu_seconds"] for t in status(control)["tunnels"]}
        flooder = udp_client()
        client = udp_client()
        garbage = bytes(200)
        for round_ in range(40):            # bounded: 40 x 1000 datagrams
            for _ in range(1000):
                flooder.sendto(garbage, (LOCAL, ports["flooded"][1]))
            data = b"calm %d" % round_
            assert exchange(client, data, (LOCAL, ports["calm"][0])) == data
        flooded = None
        for _ in deadline_loop(what="the flood to be counted"):
            tunnels = {t["name"]: t for t in status(control)["tunnels"]}
            flooded = tunnels["flooded"]
            # The kernel drops what the worker cannot read in time when the machine is
            # busy; a quarter of the flood counted is flood enough.
            if sum(flooded["drops"].values()) >= 10000:
                break
        assert tunnels["calm"]["drops"] == {}
        spent = {name: tunnels[name]["cpu_seconds"] - before[name] for name in tunnels}
        assert spent["calm"] < spent["flooded"], spent
    finally:
        for daemon in (exposer, relay):
            if daemon is not None:
                daemon.stop()
        echo.close()
        notify.close()


def test_an_exposer_from_a_config_file(rig, tmp_path):
    rig.relay()
    path = tmp_path / "expose-wg.toml"
    path.write_text(f'relay = "{LOCAL}:{rig.register}"\nservice = "{LOCAL}:{rig.echo.port}"\n'
                    f'key_file = "{rig.key}"\nkeepalive = 10\nmax_flows = 8\n')
    exposer = rig.start(["expose", "-c", path])
    exposer.wait_log("registered with the relay")
    client = udp_client()
    assert exchange(client, b"from a file", (LOCAL, rig.public)) == b"from a file"


@pytest.mark.parametrize("text, message", [
    ('service = "127.0.0.1:9"\ninsecure = true', "relay: missing"),
    ('relay = "127.0.0.1:9"\nservice = "127.0.0.1:9"', "key_file: missing"),
    ('relay = "127.0.0.1:9"\nservice = "127.0.0.1:9"\ninsecure = true\ncarier = "tcp"',
     "unknown setting 'carier'; did you mean 'carrier'?"),
    ('relay = "127.0.0.1:9"\nservice = "127.0.0.1:9"\ninsecure = true\ncarrier = "sctp"',
     "carrier: expected udp or tcp"),
    ('relay = "127.0.0.1:9"\nservice = "somewhere"\ninsecure = true', "service: 'somewhere'"),
    ('relay = "127.0.0.1:9"\nservice = "127.0.0.1:9"\nkey_file = "-"', "command line only"),
])
def test_a_bad_exposer_file_is_refused_with_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "expose.toml"
    path.write_text(text)
    out = subprocess.run(udpmux_argv("expose", "-c", path), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 78
    assert str(path) in out.stderr and message in out.stderr


@pytest.mark.parametrize("size", [1, 1200, wire.MAX_DATAGRAM])
def test_an_exposer_over_tcp(rig, size):
    rig.relay()
    exposer = rig.expose("--carrier", "tcp", wait=False)
    exposer.wait_log("registered with the relay")
    clients = [udp_client() for _ in range(3)]
    for n, client in enumerate(clients):
        data = bytes([n]) * size
        assert exchange(client, data, (LOCAL, rig.public)) == data
    t = rig.wait_tunnel("the exposer", lambda t: t["exposer"] is not None)
    assert t["exposer"]["carrier"] == "tcp" and t["flows"] == 3
    assert len(rig.echo.sources) == 3


def test_an_exposer_over_tcp_comes_back_after_the_relay_restarts(rig):
    relay = rig.relay()
    exposer = rig.expose("--carrier", "tcp")
    client = udp_client()
    assert exchange(client, b"one", (LOCAL, rig.public)) == b"one"
    assert relay.stop() == 0
    exposer.wait_log("the relay ended our session")
    rig.relay(public=rig.public, register=rig.register)
    exposer.wait_log("registered with the relay", start=exposer.wait_log("ended our session"))
    assert exchange(client, b"two", (LOCAL, rig.public)) == b"two"


def test_a_bad_stream_on_the_relays_tcp_port_is_closed_and_counted(rig):
    rig.relay()
    rig.expose()
    with socket.create_connection((LOCAL, rig.register), timeout=WAIT) as bad:
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert bad.recv(100) == b""
    client = udp_client()
    assert exchange(client, b"fine", (LOCAL, rig.public)) == b"fine"
    rig.wait_tunnel("a counted drop", lambda t: t["drops"].get("too-large", 0) >= 1)


def test_no_tcp_means_no_tcp(rig):
    rig.relay("--no-tcp")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCAL, rig.register), timeout=WAIT)


def test_sighup_reads_the_key_file_of_the_one_tunnel_form_again(rig):
    relay = rig.relay()
    first = rig.expose()
    client = udp_client()
    assert exchange(client, b"old key", (LOCAL, rig.public)) == b"old key"
    first.stop()
    subprocess.run(udpmux_argv("keygen", "--force", rig.key), env=env(), check=True)
    relay.signal(signal.SIGHUP)
    relay.wait_log("settings changed; restarting its worker")
    rig.notify.wait_for("READY=1")
    rig.expose()                        # with the new key
    assert exchange(client, b"new key", (LOCAL, rig.public)) == b"new key"


def test_only_allowed_networks_start_flows_and_the_rest_is_counted_as_denied(rig):
    relay = rig.relay("--allow", "127.0.0.2/32,127.0.1.0/24", "--deny", "127.0.1.9")
    rig.expose()
    assert exchange(udp_client("127.0.0.2"), b"allowed", (LOCAL, rig.public)) == b"allowed"
    assert exchange(udp_client("127.0.1.8"), b"allowed", (LOCAL, rig.public)) == b"allowed"
    for source in ("127.0.0.1", "127.0.1.9"):          # not allowed; allowed but denied
        client = udp_client(source, timeout=0.3)
        client.sendto(b"let me in", (LOCAL, rig.public))
        with pytest.raises(socket.timeout):
            client.recv(100)
    rig.wait_tunnel("denied drops", lambda t: t["drops"].get("denied") == 2)
    line = relay.lines[relay.wait_log("may not start flows")]
    assert f"{LOCAL}:" in line and "(allow, deny)" in line, line
    assert len(rig.echo.sources) == 2


@pytest.mark.parametrize("option, value, message", [
    ("--allow", "10.0.0.0/33", "'10.0.0.0/33' is not an IP network"),
    ("--deny", "example.net", "'example.net' is not an IP network"),
])
def test_a_bad_network_is_refused_with_the_option_named(rig, option, value, message):
    out = subprocess.run(udpmux_argv("relay", "--public", f"{LOCAL}:0", "--insecure",
                                     option, value), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 64, out.stderr
    assert f"{option}: {message}" in out.stderr
