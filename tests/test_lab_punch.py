"""udpmux punch across real NATs: the network lab of tests/lab.py.

    outside: client -> punch --listen --> nat_out ===== wan ===== nat_in --> punch --forward -> echo
                                              \\                 /
                                               public: relay, rendezvous tunnel "meet"

A UDP echo service (or mosh-server) runs on "inside" behind nat_in, `udpmux punch --forward`
next to it; `udpmux punch --listen` and the clients (or mosh-client, driven in tmux) run on
"outside" behind nat_out; the relay with its rendezvous tunnel runs on "public". Both NATs are
port-restricted cone NATs (the lab's port-preserving masquerade) unless a test makes one
symmetric, and wan can drop the UDP between the two NATs (lab.block_direct) while both still
reach the relay.

Every process is started in its host's namespace with `ip netns exec` and stopped by its PID.
Nothing waits by sleeping: readiness is READY=1, a log line, a status poll, a reply or a line
on a terminal, each with a deadline. Where a test says the relay carried nothing, it first makes
sure that the relay's status has counted everything sent before (see PunchRig.settled_pair).
"""

import os
import random
import re
import shutil
import subprocess
import time

import pytest

from lab import kill_pids
from procs import WAIT, Daemon, Echo, Notify, deadline_loop, env, exchange, tunnel, udpmux_argv
from test_lab_relay import IP

MEET = 5577             # the rendezvous tunnel's port on public
NAME = "mosh"           # the rendezvous name both sides give
LISTEN = 60001          # where clients on outside send (its loopback)
DIRECT_PORTS = {"in": 34730, "out": 34731}      # --port of each side in direct mode
SIZES = (0, 1, 1200, 9000, 65471)               # 65471: the largest datagram punch carries
MOSH_PORT = 60001       # mosh-server's UDP port on inside's loopback
MOSH_TOOLS = ("mosh-server", "mosh-client", "tmux")
UTF8 = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # mosh refuses to run without a UTF-8 locale


class PunchRig:
    """A relay on public, an echo service and punch --forward on inside, punch --listen and
    clients on outside."""

    def __init__(self, lab, tmp_path):
        self.lab = lab
        self.tmp = tmp_path
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.control = str(tmp_path / "control.sock")
        self.daemons = []
        self.clients = []
        self.echo = None
        self.notify = None
        self.markers = 0

    def start(self, host, args):
        daemon = Daemon(args, prefix=[IP, "netns", "exec", self.lab.ns(host)])
        self.daemons.append(daemon)
        return daemon

    # -- the relay and its status

    def relay(self):
        config = self.tmp / "relay.toml"
        config.write_text(f'control_socket = "{self.control}"\nstop_timeout = 3\n'
                          f'[tunnels.meet]\nmode = "rendezvous"\npublic = "0.0.0.0:{MEET}"\n'
                          f'key_file = "{self.key}"\n')
        self.notify = Notify(str(self.tmp))
        daemon = Daemon(["relay", "-c", config, "--debug"], notify=self.notify,
                        prefix=[IP, "netns", "exec", self.lab.ns("public")])
        self.daemons.append(daemon)
        self.notify.wait_for("READY=1")
        self.marker = self.lab.socket("public", bind=("0.0.0.0", 0))
        return daemon

    def pair(self, t=None):
        pairs = [p for p in (t or tunnel(self.control, "meet"))["pairs"] if p["name"] == NAME]
        return pairs[0] if pairs else None

    def wait_pair(self, what, check):
        """Poll the relay's status until check(pair) holds; return the pair."""
        for _ in deadline_loop(what=what):
            pair = self.pair()
            if pair is not None and check(pair):
                return pair

    def settled_pair(self):
        """The pair as the relay's status shows it once everything sent before this call has
        been counted. The relay writes its status once a second; a datagram too short for a
        header, sent to the tunnel now, is counted as a "short" drop in the same status, after
        every datagram the relay received before it. Everything that the test sent and got an
        answer to has passed the relay before, if it went through the relay at all."""
        self.markers += 1
        self.marker.sendto(b"?", (self.lab.addr("public"), MEET))
        for _ in deadline_loop(what="the relay's status to count the marker"):
            t = tunnel(self.control, "meet")
            if t["drops"].get("short", 0) >= self.markers:
                return self.pair(t)

    # -- the two punch sides, the service, the clients

    def start_echo(self):
        with self.lab.netns("inside"):
            self.echo = Echo("127.0.0.1")
        return self.echo

    def forward(self, *extra, service=None):
        """punch --forward on inside, brokered by the relay."""
        service = service or f"127.0.0.1:{self.start_echo().port}"
        return self.start("inside", [
            "punch", "--relay", f"{self.lab.addr('public')}:{MEET}", "--rendezvous", NAME,
            "--key-file", self.key, "--forward", service, "--debug", *extra])

    def listen(self, *extra):
        """punch --listen on outside, brokered by the relay."""
        return self.start("outside", [
            "punch", "--relay", f"{self.lab.addr('public')}:{MEET}", "--rendezvous", NAME,
            "--key-file", self.key, "--listen", f"127.0.0.1:{LISTEN}", "--debug", *extra])

    def client(self, timeout=3.0):
        sock = self.lab.socket("outside", bind=("127.0.0.1", 0))
        sock.settimeout(timeout)
        self.clients.append(sock)
        return sock

    def talk(self, client, count, label):
        """`count` datagrams, each answered with itself before the next is sent."""
        for n in range(count):
            data = f"{label} {n}".encode()
            assert exchange(client, data, ("127.0.0.1", LISTEN)) == data

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
            print(f"--- {' '.join(daemon.proc.args[4:])}\n{daemon.log()}")  # shown on failure
        if self.echo is not None:
            self.echo.close()
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def rig(lab, tmp_path):
    r = PunchRig(lab, tmp_path)
    try:
        yield r
    finally:
        r.close()


def test_cone_nats_punch_a_direct_path_and_the_relay_carries_no_data(rig):
    rig.relay()
    forwarder = rig.forward()
    listener = rig.listen()
    pair = rig.wait_pair("the pair to go direct", lambda p: p["path"] == "direct")
    # The relay saw each side at its NAT's public address, and each punched the other's
    # mapping there: the cone NATs kept the port that the relay saw for the peer too.
    assert pair["listen"].rsplit(":", 1)[0] == rig.lab.public_addr("out")
    assert pair["forward"].rsplit(":", 1)[0] == rig.lab.public_addr("in")
    listener.wait_log(f"direct path to {pair['forward']} is up")
    forwarder.wait_log(f"direct path to {pair['listen']} is up")
    client = rig.client()
    before = rig.settled_pair()
    rig.talk(client, 50, "direct")
    after = rig.settled_pair()
    assert rig.echo.count == 50
    assert after["path"] == "direct"
    assert after["relayed_datagrams"] == before["relayed_datagrams"] == 0


def test_direct_mode_without_a_relay_carries_every_size(rig):
    lab = rig.lab
    ports = DIRECT_PORTS
    echo = rig.start_echo()
    # Port-preserving NATs: a side's public port is its own --port.
    forwarder = rig.start("inside", [
        "punch", "--peer", f"{lab.public_addr('out')}:{ports['out']}", "--port", ports["in"],
        "--key-file", rig.key, "--forward", f"127.0.0.1:{echo.port}", "--debug"])
    listener = rig.start("outside", [
        "punch", "--peer", f"{lab.public_addr('in')}:{ports['in']}", "--port", ports["out"],
        "--key-file", rig.key, "--listen", f"127.0.0.1:{LISTEN}", "--debug"])
    listener.wait_log(f"direct path to {lab.public_addr('in')}:{ports['in']} is up")
    forwarder.wait_log(f"direct path to {lab.public_addr('out')}:{ports['out']} is up")
    clients = [rig.client() for _ in range(3)]
    for n, client in enumerate(clients):
        for size in SIZES:
            data = bytes([n + 1]) * size
            assert exchange(client, data, ("127.0.0.1", LISTEN)) == data
    assert len(echo.sources) == 3          # one service socket per client
    assert echo.count == 3 * len(SIZES)


def test_a_symmetric_nat_without_probing_stays_relayed_and_the_relay_carries_it(rig):
    lab = rig.lab
    lab.set_symmetric("in", True)       # a new public port for every destination
    rig.relay()
    forwarder = rig.forward("--probe-ports", "0")
    listener = rig.listen("--probe-ports", "0")
    # Both sides made a whole attempt, and its probes really went out and were dropped by
    # the NATs, which saw them as unsolicited: no direct path can be made here.
    listener.wait_log("no direct path this time")
    forwarder.wait_log("no direct path this time")
    assert lab.counter("nat_in", "unsolicited") > 0
    assert lab.counter("nat_out", "unsolicited") > 0
    assert "datagrams go through the relay" in listener.log()
    before = rig.wait_pair("the pair to be relayed", lambda p: p["path"] == "relayed")
    client = rig.client()
    rig.talk(client, 30, "relayed")
    after = rig.settled_pair()
    assert rig.echo.count == 30
    assert after["path"] == "relayed"
    # Each request and each reply crossed the relay once.
    assert after["relayed_datagrams"] - before["relayed_datagrams"] == 60
    assert "is up" not in listener.log() + forwarder.log()


def test_a_symmetric_nat_with_probing_keeps_the_flow_whether_or_not_it_goes_direct(rig):
    """Birthday probing (the default 256 ports) finds a way through a symmetric NAT in an
    attempt with a chance of about 64 %: the test cannot know which path it gets, but the
    datagrams must flow all along, by the relay until a probe finds the way, and by the
    direct path once one does, without the user doing anything."""
    lab = rig.lab
    lab.set_symmetric("in", True)
    rig.relay()
    forwarder = rig.forward("--retry", "1")
    listener = rig.listen("--retry", "1")
    listener.wait_log("the relay says the peer is at")
    client = rig.client()
    answered = 0
    for _ in deadline_loop(4 * WAIT, "a direct path or two failed attempts"):
        rig.talk(client, 1, f"all along {answered}")
        answered += 1
        log = listener.log()
        if "is up" in log or log.count("no direct path this time") >= 2:
            break
        with listener.cond:             # the next datagram after a log line or 0.1 s
            listener.cond.wait(0.1)
    before = rig.settled_pair()
    rig.talk(client, 20, "then")
    after = rig.settled_pair()
    assert rig.echo.count == answered + 20 and len(rig.echo.sources) == 1
    direct = re.search(r"direct path to (\S+) is up", listener.log())
    if direct:
        assert after["path"] == "direct"
        assert after["relayed_datagrams"] == before["relayed_datagrams"]
        # The probing found a port of nat_in's that the relay never saw (a random port
        # per destination; the same one twice has a chance of 1 in 64512).
        assert direct[1].rsplit(":", 1)[0] == lab.public_addr("in")
        assert direct[1] != after["forward"]
    else:
        assert after["path"] == "relayed"
        assert after["relayed_datagrams"] - before["relayed_datagrams"] == 40
    assert "gone" not in listener.log() + forwarder.log()


def test_the_path_moves_from_the_relay_to_direct_when_the_block_goes(rig):
    lab = rig.lab
    lab.block_direct(True)              # the NATs reach the relay, not each other
    rig.relay()
    forwarder = rig.forward("--retry", "1")
    listener = rig.listen("--retry", "1")
    listener.wait_log("no direct path this time")
    forwarder.wait_log("no direct path this time")
    assert lab.counter("wan", "block_direct") > 0       # the probes were sent, and dropped
    rig.wait_pair("the pair to be relayed", lambda p: p["path"] == "relayed")
    client = rig.client()
    before = rig.settled_pair()
    rig.talk(client, 20, "relayed")
    relayed = rig.settled_pair()
    assert relayed["relayed_datagrams"] - before["relayed_datagrams"] == 40

    start = len(listener.lines)
    lab.block_direct(False)
    n = 0
    for _ in deadline_loop(what="the direct path, with datagrams flowing meanwhile"):
        rig.talk(client, 1, f"moving {n}")
        n += 1
        if any("direct path to" in line and "is up" in line
               for line in listener.lines[start:]):
            break
    pair = rig.wait_pair("the pair to go direct", lambda p: p["path"] == "direct")
    listener.wait_log(f"direct path to {pair['forward']} is up", start=start)
    rig.talk(client, 1, "after the move")
    before = rig.settled_pair()
    rig.talk(client, 30, "direct")
    after = rig.settled_pair()
    assert after["path"] == "direct"
    assert after["relayed_datagrams"] == before["relayed_datagrams"]
    # One flow all along: the service saw the same source for the relayed datagrams and the
    # direct ones, and every one was answered.
    assert len(rig.echo.sources) == 1
    assert rig.echo.count == 20 + n + 1 + 30
    assert "gone" not in listener.log() + forwarder.log()


def need_mosh():
    """Skip without mosh and tmux, but fail where the lab is required (CI installs them)."""
    missing = [tool for tool in MOSH_TOOLS if shutil.which(tool) is None]
    if missing:
        reason = f"needs {', '.join(missing)}: apt-get install mosh tmux"
        if os.environ.get("UDPMUX_REQUIRE_LAB") == "1":
            pytest.fail("UDPMUX_REQUIRE_LAB=1 but this test " + reason, pytrace=False)
        pytest.skip(reason)


class Tmux:
    """A tmux server of its own (its socket in the test's directory) on a lab host, running
    one detached session; stopped by its PID."""

    def __init__(self, lab, host, socket_path, command, environment):
        self.argv = [IP, "netns", "exec", lab.ns(host), shutil.which("tmux"),
                     "-S", str(socket_path), "-f", "/dev/null"]
        self.env = environment
        self.pids = []
        self.tmux("new-session", "-d", "-x", "100", "-y", "30", command)
        self.pids = [int(self.tmux("display-message", "-p", what).strip())
                     for what in ("#{pid}", "#{pane_pid}")]

    def tmux(self, *args):
        out = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True,
                             timeout=WAIT)
        assert out.returncode == 0, f"tmux {args[0]} failed: {out.stderr}"
        return out.stdout

    def screen(self):
        return self.tmux("capture-pane", "-p").splitlines()

    def wait_screen(self, check, what):
        """Poll the screen until check(lines) holds (a few times a second, with a deadline)."""
        end = time.monotonic() + WAIT
        while True:
            lines = self.screen()
            if check(lines):
                return lines
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {WAIT} s waiting for {what}; the "
                                     "screen:\n" + "\n".join(lines))
            time.sleep(0.1)     # between two looks at the screen; the deadline bounds it

    def close(self):
        kill_pids(self.pids)


def test_a_mosh_session_runs_over_the_punched_path(rig, tmp_path):
    need_mosh()
    lab = rig.lab
    rig.relay()
    rig.forward(service=f"127.0.0.1:{MOSH_PORT}")
    listener = rig.listen()
    pair = rig.wait_pair("the pair to go direct", lambda p: p["path"] == "direct")
    listener.wait_log(f"direct path to {pair['forward']} is up")

    prompt = "udpmux-shell$ "
    server = lab.run("inside", ["mosh-server", "new", "-i", "127.0.0.1", "-p", str(MOSH_PORT),
                                "--", "/bin/sh"],
                     env={**env(), **UTF8, "PS1": prompt}, cwd=tmp_path, capture_output=True,
                     text=True, timeout=WAIT)
    detached = re.search(r"\[mosh-server detached, pid = (\d+)\]", server.stderr)
    assert server.returncode == 0 and detached, server.stdout + server.stderr
    client = None
    try:
        connect = re.search(r"^MOSH CONNECT (\d+) (\S+)$", server.stdout, re.M)
        assert connect and int(connect[1]) == MOSH_PORT, server.stdout
        client = Tmux(lab, "outside", tmp_path / "tmux.sock",
                      f"mosh-client 127.0.0.1 {LISTEN}",
                      {**env(), **UTF8, "MOSH_KEY": connect[2]})
        # The shell's prompt on mosh-client's screen: the session is up, across the NATs.
        client.wait_screen(lambda lines: any(line.startswith(prompt.strip()) for line in lines),
                           "the remote shell's prompt")
        number = random.randrange(10 ** 6)
        client.tmux("send-keys", "-l", f"echo udpmux-$(({number} + 1))-marker")
        client.tmux("send-keys", "Enter")
        # Only the shell on inside computes the number: the typed line does not show it.
        marker = f"udpmux-{number + 1}-marker"
        client.wait_screen(lambda lines: marker in lines, f"{marker!r} on the screen")
    finally:
        if client is not None:
            client.close()
        kill_pids([int(detached[1])])
    # mosh's datagrams all went the punched way: the relay carried none of them.
    after = rig.settled_pair()
    assert after["path"] == "direct" and after["relayed_datagrams"] == 0
