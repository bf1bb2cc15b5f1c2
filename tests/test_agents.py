"""What an agent says when it cannot do its job, as an operator reads it in the log:
a relay that does not answer (another key, down), one whose host refuses, a service
that is not there, and the line that says it works again.  Real processes on
loopback; the relay's side of each mistake too."""

import subprocess

import pytest

from procs import Daemon, env, free_port, udp_client, udpmux_argv
from test_relay import LOCAL, Rig


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def other_key(rig):
    path = str(rig.tmp / "other.key")
    subprocess.run(udpmux_argv("keygen", path), env=env(), check=True)
    return path


def test_an_exposer_with_another_key_says_why_it_may_not_be_heard(rig):
    rig.relay()
    expose = rig.expose(key=other_key(rig), wait=False)
    line = expose.lines[expose.wait_log(f"no answer from the relay at {LOCAL}:{rig.register}")]
    assert "another key" in line and "UDP to it is blocked" in line, line
    assert "--carrier tcp" in line, line
    relay = rig.daemons[0]
    line = relay.lines[relay.wait_log("fail authentication")]
    assert f"messages from {LOCAL}:" in line and "another key" in line, line
    assert "registered with the relay" not in expose.log()


def test_an_insecure_exposer_at_a_keyed_relay_is_named_at_the_relay(rig):
    rig.relay()
    expose = rig.expose(key=False, wait=False)
    expose.wait_log("no answer from the relay")
    relay = rig.daemons[0]
    line = relay.lines[relay.wait_log("one side runs with --insecure")]
    assert f"messages from {LOCAL}:" in line, line


def test_a_relay_that_is_not_there_is_reported_at_once_and_its_return_too(rig):
    register = free_port()
    expose = rig.expose(relay=f"{LOCAL}:{register}", wait=False)
    line = expose.lines[expose.wait_log("nothing listens on that port")]
    assert f"the relay at {LOCAL}:{register}" in line and "ICMP port unreachable" in line
    # The relay comes up on that port: the exposer registers by itself and says so.
    rig.relay(register=register)
    expose.wait_log("registered with the relay")
    line = expose.lines[expose.wait_log(f"the relay at {LOCAL}:{register} answers again")]
    assert " s" in line.split("answers again, after")[1], line


def test_a_service_that_is_not_listening_is_named_with_its_address(rig):
    rig.relay()
    dead = free_port()
    expose = rig.start(["expose", "--relay", f"{LOCAL}:{rig.register}",
                        "--service", f"{LOCAL}:{dead}", "--key-file", rig.key])
    expose.wait_log("registered with the relay")
    client = udp_client(timeout=0.2)
    line = None
    for _ in range(20):         # datagrams until the service's host has said no
        client.sendto(b"anyone there?", (LOCAL, rig.public))
        try:
            line = expose.lines[expose.wait_log("refuses datagrams", timeout=0.5)]
            break
        except AssertionError:
            continue
    assert line is not None, expose.log()
    assert f"the service at {LOCAL}:{dead} refuses datagrams" in line, line
    assert "is it running?" in line


def test_punch_says_when_its_relay_does_not_answer(rig):
    relay = free_port()
    punch = rig.start(["punch", "--relay", f"{LOCAL}:{relay}", "--rendezvous", "game",
                       "--key-file", rig.key, "--forward", f"{LOCAL}:{rig.echo.port}"])
    line = punch.lines[punch.wait_log(f"no answer from the relay at {LOCAL}:{relay}")]
    assert "another key" in line and "UDP to it is blocked" in line, line


def test_punch_says_when_its_peer_does_not_answer(rig):
    peer = free_port()
    punch = rig.start(["punch", "--peer", f"{LOCAL}:{peer}", "--port", "0",
                       "--key-file", rig.key, "--listen", f"{LOCAL}:0"])
    line = punch.lines[punch.wait_log(f"no answer from the peer at {LOCAL}:{peer}")]
    assert "the other side is not running" in line and "still trying" in line, line


def test_an_exposer_out_of_descriptors_closes_the_flows_it_cannot_serve(rig):
    """Under a hard limit of 40 open files the exposer cannot open a socket for every
    one of 60 clients: it says so once, not once a datagram, and tells the relay to
    close each flow it cannot serve, so that no client is left with a flow that goes
    nowhere."""
    rig.relay()
    expose = Daemon(["expose", "--relay", f"{LOCAL}:{rig.register}", "--service",
                     f"{LOCAL}:{rig.echo.port}", "--key-file", rig.key],
                    prefix=["prlimit", "--nofile=40:40", "--"])
    rig.daemons.append(expose)
    expose.wait_log("registered with the relay")
    clients = [udp_client(timeout=0.3) for _ in range(60)]
    for client in clients:
        client.sendto(b"serve me", (LOCAL, rig.public))
    t = rig.wait_tunnel("flows the exposer closed", lambda t: t["counters"]["closed"] >= 20)
    served = sum(1 for client in clients if _answered(client))
    assert served + t["counters"]["closed"] >= 60, (served, t["counters"])
    assert 0 < served < 60
    assert sum("cannot open a socket to" in line for line in expose.lines) == 1, expose.log()


def _answered(client):
    try:
        return client.recv(100) == b"serve me"
    except OSError:
        return False
