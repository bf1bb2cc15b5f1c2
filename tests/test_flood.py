"""Hash flooding, for real: a relay's flow table against clients whose addresses were
chosen so that, hashed without the table's secret seed, they would all land next to one
another and make one probe chain as long as their number."""

import socket
import struct

import pytest

from procs import Daemon, Echo, Notify, deadline_loop, exchange, free_port, status, udp_client
from udpmux.addr import peer_key
from udpmux.tagtable import TagTable, _hash

LOCAL = "127.0.0.1"
MAX_FLOWS = 4096
FLOOD = 5000            # more than MAX_FLOWS: the table fills, then each newcomer evicts
BATCH = 250             # flood datagrams between two of the legitimate client's exchanges
TARGET, WINDOW = 1000, 64   # unseeded homes in these cells pile up into one cluster
PROBE_BOUND = 128       # 4096 flows in 8192 seeded cells: a probe past 128 has odds ~1e-7


def colliding_sources(port, ncells, count):
    """Addresses 127.a.b.c (a from 100) whose peer keys with port hash, unseeded, into
    WINDOW cells from TARGET: what an attacker who knows max_flows would send from."""
    prefix = struct.pack("=H", socket.AF_INET) + port.to_bytes(2, "big")
    zeros = bytes(8)
    mask = ncells - 1
    found = []
    for n in range(100 << 16, 255 << 16):
        if n & 255 in (0, 255):
            continue
        octets = bytes((127, n >> 16, (n >> 8) & 255, n & 255))
        if (_hash(prefix + octets + zeros) - TARGET) & mask < WINDOW:
            found.append(socket.inet_ntoa(octets))
            if len(found) == count:
                break
    assert len(found) == count
    assert prefix + socket.inet_aton(found[0]) + zeros == peer_key(socket.AF_INET,
                                                                   (found[0], port))
    return found


def send_from(host, port, address):
    """One datagram from host:port; False if that address cannot be bound here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        sock.sendto(b"flood", address)
    return True


@pytest.fixture
def relay(tmp_path):
    """A relay for 4096 flows with an exposer and an echo service: (public, control)."""
    public, register = free_port(), free_port()
    control = str(tmp_path / "control.sock")
    notify = Notify(str(tmp_path))
    echo = Echo()
    daemons = []
    try:
        daemons.append(Daemon(["relay", "--public", f"{LOCAL}:{public}", "--register",
                               f"{LOCAL}:{register}", "--insecure", "--max-flows", MAX_FLOWS,
                               "--new-flows-rate", 1_000_000, "--control-socket", control],
                              notify=notify))
        notify.wait_for("READY=1")
        daemons.append(Daemon(["expose", "--relay", f"{LOCAL}:{register}", "--service",
                               f"{LOCAL}:{echo.port}", "--insecure", "--max-flows", MAX_FLOWS]))
        daemons[-1].wait_log("registered with the relay")
        yield public, control
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        echo.close()
        notify.close()


def test_a_flood_from_colliding_addresses_keeps_probes_short_and_the_client_served(relay):
    public, control = relay
    address = (LOCAL, public)
    client = udp_client()
    assert exchange(client, b"before", address) == b"before"
    (before,) = status(control)["tunnels"]
    port = free_port()
    sources = colliding_sources(port, TagTable(MAX_FLOWS).ncells, FLOOD)
    sent = 0
    for start in range(0, FLOOD, BATCH):
        sent += sum(send_from(host, port, address) for host in sources[start:start + BATCH])
        # Queued behind the batch on the public socket: the worker has read the batch
        # by the time it answers.
        data = b"still served after %d" % sent
        assert exchange(client, data, address) == data
    assert sent >= FLOOD * 9 // 10
    for _ in deadline_loop(what="every flow of the flood in the relay's counters"):
        (after,) = status(control)["tunnels"]
        if after["counters"].get("flows", 0) >= sent + 1:
            break
    print(f"flood of {sent}: worker CPU {after['cpu_seconds'] - before['cpu_seconds']:.2f} s, "
          f"probe_max {after['probe_max']}")
    assert after["flows"] == MAX_FLOWS
    ended = after["counters"]["evicted"] + after["counters"]["closed"]
    assert ended == sent + 1 - MAX_FLOWS
    assert after["restarts"] == 0 and after["worker_pid"] == before["worker_pid"]
    assert after["probe_max"] < PROBE_BOUND
    client.close()
