"""An attacker with real packets: captured from the path (procs.Tap), replayed from
another address, raced ahead of the original, sent to another tunnel that shares the
key, or replayed after a worker was killed; and strangers that hold connections open.
Every test runs the real daemons and checks what a user would: where the datagrams
go, what the relay's status says, what the logs say."""

import os
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
    assert drain(attacker) <= sum(map(len, captured))
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
