"""The network lab (tests/lab.py) is what it claims to be, shown with real sockets.

Every socket lives in one of the lab's namespaces (lab.socket); no traffic leaves them. Waits
are select() with a deadline; where a test shows that something did NOT arrive, it first proves
that it was sent and dropped on the way (an nft counter rose, or a later packet on the same path
arrived), then checks the receiving socket without waiting.
"""

import os
import select
import signal
import socket
import sys
import time

import pytest

import lab as lablib

TIMEOUT = 5.0
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)    # Linux; not in Python 3.11
HOST = {"in": "inside", "out": "outside"}
OTHER = {"in": "outside", "out": "inside"}


def udp(lab, host):
    return lab.socket(host, bind=("0.0.0.0", 0))


def port(sock):
    return sock.getsockname()[1]


def recv(sock, timeout=TIMEOUT):
    """(data, addr) of the next datagram, or None if none comes within `timeout` seconds."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return None
    return sock.recvfrom(65535)


def expect(sock, timeout=TIMEOUT):
    """Like recv(), but a datagram must come."""
    item = recv(sock, timeout)
    assert item is not None, "nothing arrived on %s within %s s" % (sock.getsockname(), timeout)
    return item


def wait_counter(lab, host, name, target, timeout=TIMEOUT):
    """Poll an nft counter until it reaches `target` (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        value = lab.counter(host, name)
        if value >= target or time.monotonic() > deadline:
            return value
        time.sleep(0.005)
    return value


@pytest.mark.parametrize("side", ["in", "out"])
def test_udp_is_masqueraded_and_the_reply_comes_back(lab, side):
    srv = udp(lab, "public")
    cli = udp(lab, HOST[side])
    cli.sendto(b"hello", (lab.addr("public"), port(srv)))
    got = recv(srv)
    assert got is not None, "datagram from %s never reached public" % HOST[side]
    data, (src, sport) = got
    assert data == b"hello"
    assert src == lab.public_addr(side)
    assert src != lab.addr(HOST[side])
    srv.sendto(b"reply", (src, sport))
    assert recv(cli) == (b"reply", (lab.addr("public"), port(srv)))


@pytest.mark.parametrize("side", ["in", "out"])
def test_unsolicited_inbound_never_reaches_the_host_behind_nat(lab, side):
    nat = lablib.NATS[side]
    mapped = udp(lab, HOST[side])        # has a mapping to srv
    idle = udp(lab, HOST[side])          # never sends: no mapping at all
    srv = udp(lab, "public")
    other_port = udp(lab, "public")
    stranger = udp(lab, OTHER[side])
    mapped.sendto(b"open", (lab.addr("public"), port(srv)))
    data, (paddr, pport) = expect(srv)
    assert (data, paddr) == (b"open", lab.public_addr(side))

    before = lab.counter(nat, "unsolicited")
    stranger.sendto(b"stranger", (paddr, pport))        # the mapped port, another host
    other_port.sendto(b"other port", (paddr, pport))    # the mapped port, another port
    srv.sendto(b"no mapping", (paddr, port(idle)))      # a port nobody opened
    assert wait_counter(lab, nat, "unsolicited", before + 3) == before + 3

    srv.sendto(b"reply", (paddr, pport))                # the one allowed answer
    assert recv(mapped) == (b"reply", (lab.addr("public"), port(srv)))
    assert recv(mapped, 0) is None
    assert recv(idle, 0) is None


@pytest.mark.parametrize("side", ["in", "out"])
def test_roam_changes_the_source_address_public_sees(lab, side):
    srv = udp(lab, "public")
    cli = udp(lab, HOST[side])
    dst = (lab.addr("public"), port(srv))
    cli.sendto(b"one", dst)
    _, (first, _) = expect(srv)
    assert first == lab.public_addr(side)

    seen = {first}
    for n in range(2):
        new = lab.roam(side)
        assert new not in seen and lab.public_addr(side) == new
        seen.add(new)
        cli.sendto(b"after roam %d" % n, dst)        # the same socket, an existing flow
        data, (src, sport) = expect(srv)
        assert (data, src) == (b"after roam %d" % n, new)
        srv.sendto(b"back", (src, sport))
        assert recv(cli) == (b"back", dst)


def test_block_udp_stops_udp_but_not_tcp(lab):
    srv = udp(lab, "public")
    cli = udp(lab, "inside")
    dst = (lab.addr("public"), port(srv))
    cli.sendto(b"before", dst)
    assert expect(srv)[0] == b"before"

    lab.block_udp(True)
    before = lab.counter("wan", "block_udp")
    cli.sendto(b"blocked", dst)
    listener = lab.socket("public", type=socket.SOCK_STREAM, bind=("0.0.0.0", 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    conn = lab.socket("inside", type=socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT)
    conn.connect((lab.addr("public"), port(listener)))
    conn.sendall(b"tcp passes")
    accepted, peer = listener.accept()
    with accepted:
        accepted.settimeout(TIMEOUT)
        assert accepted.recv(100) == b"tcp passes"
    assert peer[0] == lab.public_addr("in")
    assert wait_counter(lab, "wan", "block_udp", before + 1) == before + 1
    assert recv(srv, 0) is None

    lab.block_udp(False)
    cli.sendto(b"after", dst)
    assert expect(srv)[0] == b"after"


def test_loss_drops_a_share_and_zero_restores_a_lossless_path(lab):
    srv = udp(lab, "public")
    srv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    cli = udp(lab, "inside")
    dst = (lab.addr("public"), port(srv))

    lab.set_loss(50)
    dropped_before = lab.counter("wan", "loss")
    for i in range(400):
        cli.sendto(b"%d" % i, dst)
    lab.set_loss(0)
    cli.sendto(b"end", dst)                 # cannot be lost: marks the end of the burst
    got = set()
    for _ in range(402):
        item = recv(srv)
        assert item is not None, "end marker never arrived"
        if item[0] == b"end":
            break
        got.add(item[0])
    while (item := recv(srv, 0)) is not None:
        got.add(item[0])
    dropped = lab.counter("wan", "loss") - dropped_before
    assert 80 <= len(got) <= 320, "%d of 400 received at 50%% loss" % len(got)
    assert len(got) + dropped == 400

    for i in range(100):
        cli.sendto(b"%d" % i, dst)
    got = set()
    for _ in range(100):
        item = recv(srv)
        assert item is not None, "only %d of 100 arrived with loss 0" % len(got)
        got.add(item[0])
    assert got == {b"%d" % i for i in range(100)}
    assert lab.counter("wan", "loss") - dropped_before == dropped


def _tcp_transfer(lab, size, timeout=20.0):
    """Send `size` bytes over one TCP connection inside -> public through nat_in and wan
    (one thread, select with a deadline); returns the bytes that arrived."""
    listener = lab.socket("public", type=socket.SOCK_STREAM, bind=("0.0.0.0", 0))
    listener.listen(1)
    sender = lab.socket("inside", type=socket.SOCK_STREAM)
    sender.settimeout(TIMEOUT)
    sender.connect((lab.addr("public"), port(listener)))
    listener.settimeout(TIMEOUT)
    receiver, _ = listener.accept()
    with receiver:
        sender.setblocking(False)
        receiver.setblocking(False)
        data = memoryview(os.urandom(size))
        sent, got = 0, bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < size:
            left = deadline - time.monotonic()
            assert left > 0, "only %d of %d bytes arrived in %s s" % (len(got), size, timeout)
            readable, writable, _ = select.select(
                [receiver], [sender] if sent < size else [], [], left)
            if writable:
                sent += sender.send(data[sent:sent + 65536])
            if readable:
                got += receiver.recv(65536)
    return bytes(got) == bytes(data)


def test_loss_can_apply_to_tcp_too(lab):
    """set_loss(p) drops UDP only; with protocols=("udp", "tcp") TCP segments are dropped
    as well, one by one (not whole GSO bursts), and TCP still delivers every byte."""
    before = lab.counter("wan", "loss")
    lab.set_loss(30)
    assert _tcp_transfer(lab, 256 * 1024)
    assert lab.counter("wan", "loss") == before

    lab.set_loss(10, protocols=("udp", "tcp"))
    assert _tcp_transfer(lab, 1024 * 1024)
    # 1 MB is ~720 segments and a few hundred ACKs: ~100 drops expected at 10 %.  Were
    # segments still sent as 64 KB GSO bursts there would be ~30 packets, ~3 drops.
    assert lab.counter("wan", "loss") - before > 30
    with pytest.raises(ValueError):
        lab.set_loss(5, protocols=("udp", "icmp"))
    lab.set_loss(0)


def _mapped_ports(lab, servers):
    """Ports that public sees for one new inside socket talking to each server in turn."""
    cli = udp(lab, "inside")
    seen = []
    for srv in servers:
        cli.sendto(b"x", (lab.addr("public"), port(srv)))
        data, (src, sport) = expect(srv)
        assert src == lab.public_addr("in")
        seen.append(sport)
    return port(cli), seen


def test_symmetric_nat_maps_each_destination_to_its_own_port(lab):
    servers = [udp(lab, "public") for _ in range(3)]
    # Default masquerade keeps a free source port, whatever the destination.
    src, seen = _mapped_ports(lab, servers)
    assert seen == [src] * 3

    lab.set_symmetric("in", True)
    src, seen = _mapped_ports(lab, servers)
    # fully-random: an independent random port per destination. All three equal, or all
    # equal to the inside port, has a probability below 1e-9.
    assert len(set(seen)) > 1, seen
    assert set(seen) != {src}

    lab.set_symmetric("in", False)
    src, seen = _mapped_ports(lab, servers)
    assert seen == [src] * 3


def test_two_labs_coexist_and_symmetric_can_be_chosen_at_build(lab, lab_factory):
    other = lab_factory(symmetric=("in",))
    assert not {lab.ns(h) for h in lablib.HOSTS} & {other.ns(h) for h in lablib.HOSTS}
    assert other.addr("public") == lab.addr("public")
    # Same addresses and even the same port in both labs: they are separate networks.
    mine = udp(lab, "public")
    theirs = other.socket("public", bind=("0.0.0.0", port(mine)))
    cli = udp(other, "inside")
    cli.sendto(b"other lab", (other.addr("public"), port(mine)))
    assert expect(theirs)[0] == b"other lab"
    assert recv(mine, 0) is None
    rules = other.run("nat_in", ["nft", "list", "chain", "ip", lablib.TABLE, "postrouting"],
                      capture_output=True, text=True, check=True).stdout
    assert "fully-random" in rules


def test_down_stops_lab_processes_and_removes_everything(lab_factory):
    lab = lab_factory()
    # A daemon the test does not track, which ignores SIGTERM: only down()'s search of the
    # lab's namespaces for processes, and the SIGKILL after the grace period, can stop it.
    daemon = ("import os, signal, sys, time\n"
              "if os.fork() == 0:\n"
              "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "    os.closerange(0, 3)\n"
              "    time.sleep(60)\n"
              "    os._exit(0)\n"
              "print(os.getpid(), flush=True)\n")
    out = lab.python("inside", daemon, capture_output=True, text=True, check=True).stdout
    parent_pid = int(out)
    ns = os.stat(os.path.join(lablib.NETNS_DIR, lab.ns("inside")))
    orphans = [p for p in lablib._pids_in({(ns.st_dev, ns.st_ino)}) if p != parent_pid]
    assert len(orphans) == 1
    pidfd = os.pidfd_open(orphans[0])
    # A tracked child, started with popen: `ip netns exec` execs, so its PID is the program's.
    proc = lab.popen("public", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(1000):        # bounded: until the exec has happened
            pub = os.stat(os.path.join(lablib.NETNS_DIR, lab.ns("public")))
            mine = os.stat("/proc/%d/ns/net" % proc.pid)
            if (mine.st_dev, mine.st_ino) == (pub.st_dev, pub.st_ino):
                break
            time.sleep(0.005)
        assert (mine.st_dev, mine.st_ino) == (pub.st_dev, pub.st_ino)
        sock = udp(lab, "public")

        lab.down()
        assert select.select([pidfd], [], [], 0)[0], "the daemon outlived down()"
        assert proc.poll() is not None
        assert sock.fileno() == -1
        left = [n for n in os.listdir(lablib.NETNS_DIR) if n.startswith(lab.prefix + "-")]
        assert left == []
        assert not lab.is_up
        lab.down()                                             # idempotent
    finally:
        if not select.select([pidfd], [], [], 0)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.usefixtures("lab_factory")       # for its skip/fail logic only
def test_failed_up_leaves_nothing_behind(monkeypatch):
    broken = lablib.Lab()
    monkeypatch.setattr(broken, "_wan_ruleset", lambda: "this is not nft\n")
    with pytest.raises(lablib.LabError):
        broken.up()                     # fails at the last step, after every namespace
    assert not broken.is_up
    left = [n for n in os.listdir(lablib.NETNS_DIR) if n.startswith(broken.prefix + "-")]
    assert left == []


def test_block_udp_can_close_one_nat_only(lab):
    """block_udp(side="in") stops UDP to and from nat_in; outside's UDP still passes."""
    receiver = lab.socket("public", bind=("0.0.0.0", 0))
    port = receiver.getsockname()[1]
    receiver.settimeout(1.0)
    lab.block_udp(True, side="in")
    inside = lab.socket("inside", bind=("0.0.0.0", 0))
    outside = lab.socket("outside", bind=("0.0.0.0", 0))
    inside.sendto(b"from inside", (lab.addr("public"), port))
    outside.sendto(b"from outside", (lab.addr("public"), port))
    assert receiver.recvfrom(100)[0] == b"from outside"
    with pytest.raises(socket.timeout):
        receiver.recvfrom(100)
    assert lab.counter("wan", "block_udp") >= 1
    lab.block_udp(False)
    inside.sendto(b"again", (lab.addr("public"), port))
    assert receiver.recvfrom(100)[0] == b"again"


def test_block_direct_stops_udp_between_the_nats_but_not_to_public(lab):
    """block_direct(True) drops UDP that wan forwards between nat_in and nat_out, both ways;
    UDP from either side to public still passes; False restores the direct path."""
    inside, outside, srv = udp(lab, "inside"), udp(lab, "outside"), udp(lab, "public")
    # Port-preserving NATs: each socket's public port is its own. Opening both mappings
    # lets the two talk directly (each NAT has seen its host send to the other first).
    to_outside = (lab.public_addr("out"), port(outside))
    to_inside = (lab.public_addr("in"), port(inside))
    outside.sendto(b"open", to_inside)                  # nat_in drops it: unsolicited
    inside.sendto(b"direct", to_outside)
    assert expect(outside) == (b"direct", to_inside)

    lab.block_direct(True)
    before = lab.counter("wan", "block_direct")
    inside.sendto(b"blocked in->out", to_outside)
    outside.sendto(b"blocked out->in", to_inside)
    assert wait_counter(lab, "wan", "block_direct", before + 2) == before + 2
    for host, sock in (("in", inside), ("out", outside)):
        sock.sendto(b"to public", (lab.addr("public"), port(srv)))
        assert expect(srv) == (b"to public", (lab.public_addr(host), port(sock)))
    assert recv(outside, 0) is None
    assert recv(inside, 0) is None

    lab.block_direct(False)
    inside.sendto(b"direct again", to_outside)
    assert expect(outside) == (b"direct again", to_inside)
    assert lab.counter("wan", "block_direct") == before + 2


def _echo_all(lab, count, size=64):
    """count datagrams from inside to an echo on public, all sent before any is read back;
    (what was sent, in order; what came back, in order)."""
    server = lab.socket("public", bind=("0.0.0.0", 0))
    client = lab.socket("inside", bind=("0.0.0.0", 0))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    server.settimeout(10)
    client.settimeout(10)
    sent = [n.to_bytes(4, "big") * (size // 4) for n in range(count)]
    for data in sent:
        client.sendto(data, (lab.addr("public"), server.getsockname()[1]))
    got = []
    for _ in sent:
        data, peer = server.recvfrom(2048)
        got.append(data)
    for data in got:
        server.sendto(data, peer)
    back = [client.recv(2048) for _ in sent]
    return sent, got, back


def test_the_wan_delays_every_forwarded_packet_once_both_ways(lab, delay):
    lab.set_delay(20)
    sent, got, back = _echo_all(lab, 50)
    assert got == sent and back == sent         # every one, byte-exact, in order
    counters = lab.delay_counters()
    assert counters["held"] >= 100 and counters["overruns"] == 0, counters
    lab.set_delay(0)                            # what it held it lets go, then it is gone
    last = lab.delay_counters()
    assert last["holding"] == 0 and last["released"] == last["held"], last
    sent, _got, back = _echo_all(lab, 5)
    assert back == sent


def test_jitter_keeps_the_order_unless_reordering_is_asked(lab, delay):
    lab.set_delay(2, jitter=6)
    sent, got, back = _echo_all(lab, 200)
    assert got == sent and back == sent
    lab.set_delay(2, jitter=6, reorder=True)
    sent, got, back = _echo_all(lab, 200)
    assert sorted(got) == sorted(sent) and got != sent     # all of them, some overtaken
