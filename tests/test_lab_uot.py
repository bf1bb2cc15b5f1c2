"""UDP over TCP across the lab's router when it drops UDP: uot-client/uot-server, and an
exposer that reaches its relay over TCP.

    outside: UDP client -> uot-client ==TCP==> wan (drops all UDP) ==> public: uot-server -> echo
    inside: echo <- udpmux expose ==TCP==> nat_in (UDP blocked) ==> public: relay <- outside client
"""

import socket

import pytest

from procs import Echo, deadline_loop, exchange
from test_lab_relay import LabRig, PORTS

UOT_PORT = 40000


@pytest.fixture
def rig(lab, tmp_path):
    r = LabRig(lab, tmp_path)
    yield r
    r.close()


def test_a_udp_client_reaches_a_loopback_service_while_all_udp_is_dropped(rig):
    lab = rig.lab
    with lab.netns("public"):
        echo = rig.echoes["public"] = Echo("127.0.0.1")
    server = rig.start("public", ["uot-server", "--listen", f"0.0.0.0:{UOT_PORT}", "--target",
                                  f"localhost:{echo.port}", "--key-file", rig.key, "--debug"])
    server.wait_log("carrying UDP for")
    lab.block_udp(True)
    # The switch is on: plain UDP from outside to public goes nowhere.
    probe = lab.socket("public", bind=("0.0.0.0", 0))
    probe.settimeout(0.5)
    plain = rig.client()
    plain.sendto(b"plain udp", (lab.addr("public"), probe.getsockname()[1]))
    with pytest.raises(socket.timeout):
        probe.recvfrom(100)
    assert lab.counter("wan", "block_udp") >= 1
    client = rig.start("outside", ["uot-client", "--listen", "127.0.0.1:30000", "--server",
                                   f"{lab.addr('public')}:{UOT_PORT}", "--key-file", rig.key,
                                   "--debug"])
    client.wait_log("connected to")
    app = lab.socket("outside", bind=("127.0.0.1", 0))
    app.settimeout(2.0)
    for size in (1, 1200, 65507):
        data = bytes([size % 251]) * size
        assert exchange(app, data, ("127.0.0.1", 30000)) == data
    assert len(echo.sources) == 1       # one flow: one socket at the server


def test_an_exposer_behind_a_nat_that_drops_udp_registers_over_tcp(rig):
    lab = rig.lab
    rig.relay("wg")
    lab.block_udp(True, side="in")
    rig.expose("wg", "--carrier", "tcp")
    t = rig.wait_tunnel("wg", "the exposer", lambda t: t["exposer"] is not None)
    assert t["exposer"]["carrier"] == "tcp"
    assert t["exposer"]["address"].startswith(lab.public_addr("in") + ":")
    clients = [rig.client(timeout=2.0) for _ in range(3)]
    for n, client in enumerate(clients):
        data = b"outside %d over udp, inside over tcp" % n
        assert exchange(client, data, rig.public("wg")) == data
    assert len(rig.echoes["wg"].sources) == 3


def test_a_udp_exposer_behind_that_nat_cannot_register(rig):
    """The same NAT without the TCP carrier: the relay never hears the exposer."""
    lab = rig.lab
    rig.relay("wg")
    lab.block_udp(True, side="in")
    echo = rig.echo("wg")
    rig.start("inside", ["expose", "--relay", f"{lab.addr('public')}:{PORTS['wg'][1]}",
                         "--service", f"127.0.0.1:{echo.port}", "--key-file", rig.key])
    for _ in deadline_loop(what="the exposer's HELLOs to be dropped"):
        if lab.counter("wan", "block_udp") >= 2:
            break
    assert rig.tunnels()["wg"]["exposer"] is None
