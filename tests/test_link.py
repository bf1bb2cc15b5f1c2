"""udpmux link and link-server on loopback, the server started through a stand-in for ssh
(tests/fakessh.py runs the remote command here).  The real OpenSSH, NATs, loss, roaming
and a blackout are in tests/test_lab_link.py."""

import base64
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import psutil
import pytest

from procs import ROOT, WAIT, Daemon, deadline_loop, env, udpmux_argv
from udpmux import auth
from udpmux.linkstart import parse_banner

LOCAL = "127.0.0.1"
FAKESSH = f"{sys.executable} {os.path.join(ROOT, 'tests', 'fakessh.py')}"
SERVER = f"PYTHONPATH={ROOT} {sys.executable} -m udpmux"


class TcpService(threading.Thread):
    """A TCP service on loopback: echo (each connection gets back what it sends), or
    `reply`: read everything, then send `reply(received)` and close."""

    def __init__(self, reply=None):
        super().__init__(daemon=True)
        self.sock = socket.create_server((LOCAL, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.running = True
        self.connections = 0
        self.start()

    def run(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        conn.settimeout(WAIT)
        received = []
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                if self.reply is None:
                    conn.sendall(data)
                else:
                    received.append(data)
            if self.reply is not None:
                conn.sendall(self.reply(b"".join(received)))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.running = False
        self.join(2)
        self.sock.close()


@pytest.fixture
def service():
    s = TcpService()
    yield s
    s.close()


def link_argv(port, *extra, bind="47200-47299"):
    return udpmux_argv("link", "--ssh-command", FAKESSH, "--server-command", SERVER,
                       "-t", f"{LOCAL}:{port}", "--bind", bind, *extra, "testhost")


class Servers:
    """The link-servers that one test starts, each known by the PID its banner gives:
    tests/fakessh.py appends every banner it carries to a file (FAKESSH_BANNERS, set
    for the test's processes), and a test that runs link-server itself adds the PID it
    read.  Only these processes are stopped, through a pidfd opened while the PID is
    the server's, so that a PID the system gave out again is never signalled."""

    def __init__(self, tmp_path):
        low = 47300 + (os.getpid() % 50) * 20
        self.bind = f"{low}-{low + 19}"
        self.banners = tmp_path / "banners"
        self.fds = {}           # pid -> pidfd, None when it had gone before we looked

    def add(self, pid):
        if pid not in self.fds:
            try:
                self.fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                self.fds[pid] = None

    def pids(self):
        """The PIDs of the servers whose banners came so far, oldest first."""
        if self.banners.exists():
            for line in self.banners.read_text().splitlines():
                self.add(int(line.split()[4]))
        return list(self.fds)

    def wait(self, count=1):
        """The PIDs once `count` banners came."""
        for _ in deadline_loop(what=f"{count} link-server banners in {self.banners}"):
            if len(self.pids()) >= count:
                return self.pids()
            time.sleep(0.01)

    def running(self, pid):
        fd = self.fds[pid]
        return fd is not None and not select.select([fd], [], [], 0)[0]

    def wait_gone(self, pid, timeout=WAIT):
        """Wait, at most timeout seconds, for one of our servers to exit."""
        fd = self.fds[pid]
        if fd is not None and not select.select([fd], [], [], timeout)[0]:
            raise AssertionError(f"link-server {pid} still runs after {timeout} s")

    def stop(self, pid, signum=signal.SIGTERM, timeout=WAIT):
        """Signal one of our servers, by its pidfd, and wait for it to be gone."""
        if self.running(pid):
            try:
                signal.pidfd_send_signal(self.fds[pid], signum)
            except ProcessLookupError:  # it exited just now
                pass
        self.wait_gone(pid, timeout)

    def close(self):
        for pid in self.pids():
            try:
                self.stop(pid)
            except AssertionError:
                self.stop(pid, signal.SIGKILL)
            if self.fds[pid] is not None:
                os.close(self.fds[pid])


@pytest.fixture
def servers(tmp_path, monkeypatch):
    """A bind range of its own for each test; every server it started stopped, by PID."""
    s = Servers(tmp_path)
    monkeypatch.setenv("FAKESSH_BANNERS", str(s.banners))
    yield s
    s.close()


def run_link(port, data, *extra, servers, timeout=60):
    return subprocess.run(link_argv(port, *extra, bind=servers.bind), input=data, env=env(),
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("congestion", ["bbr", "newreno"])
def test_a_stream_both_ways_byte_exact(congestion, service, servers):
    data = os.urandom(5_000_000)
    out = run_link(service.port, data, "--congestion", congestion, servers=servers)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == data
    [pid] = servers.pids()
    servers.wait_gone(pid)              # the client's BYE ended it


def test_half_close_the_answer_comes_after_our_end(servers):
    """Like `cat file | ssh host sort`: the client's side ends first, the answer follows."""
    service = TcpService(reply=lambda got: hashlib.sha256(got).digest() * 100_000)
    try:
        data = os.urandom(2_000_000)
        out = run_link(service.port, data, servers=servers)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == hashlib.sha256(data).digest() * 100_000
    finally:
        service.close()


def test_local_tcp_connections_are_each_a_stream(service, servers):
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        listen = s.getsockname()[1]
    proc = subprocess.Popen(link_argv(service.port, "--listen-tcp", f"{LOCAL}:{listen}",
                                      "--debug", bind=servers.bind),
                            env=env(), stderr=subprocess.PIPE, text=True)
    try:
        for _ in deadline_loop(what="the local listener"):
            try:
                socket.create_connection((LOCAL, listen), timeout=1).close()
            except ConnectionRefusedError:
                continue
            break
        payloads = [os.urandom(300_000 * (n + 1)) for n in range(3)]
        results = {}

        def talk(n):
            with socket.create_connection((LOCAL, listen), timeout=WAIT) as conn:
                conn.sendall(payloads[n])
                conn.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            results[n] = got
        threads = [threading.Thread(target=talk, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 2)
        assert [results.get(n) == payloads[n] for n in range(3)] == [True] * 3
        assert service.connections >= 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        proc.stderr.close()


def test_connections_made_while_the_session_is_up_are_served(service, servers):
    """Connections to --listen-tcp made after the session is up (the usual case: the
    link runs, clients come later), one after the other, each a stream of its own.
    The client's debug log names the server's process, as its banner does."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        listen = s.getsockname()[1]
    daemon = Daemon(None, argv=link_argv(service.port, "--listen-tcp", f"{LOCAL}:{listen}",
                                         "--debug", bind=servers.bind))
    try:
        daemon.wait_log("session up")
        told = re.search(r"the server end is process (\d+) on testhost",
                         daemon.log()).group(1)
        assert servers.pids() == [int(told)]
        for n in (1, 3):
            with socket.create_connection((LOCAL, listen), timeout=WAIT) as conn:
                payload = os.urandom(20_000)
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(65536):
                    got += chunk
                assert got == payload, f"stream {n}: {len(got)} of {len(payload)} bytes"
            daemon.wait_log(f"stream {n} done")
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_refused_target_fails_with_a_message(servers):
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        closed = s.getsockname()[1]         # nothing listens here
    out = run_link(closed, b"hello", servers=servers)
    assert out.returncode == 1
    assert b"could not connect to the target" in out.stderr


def test_the_key_is_never_on_a_command_line(service, servers):
    proc = subprocess.Popen(link_argv(service.port, bind=servers.bind), env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"ping")
        proc.stdin.flush()
        [pid] = servers.wait()
        cmdlines = [" ".join(psutil.Process(p).cmdline()) for p in (pid, proc.pid)]
        for line in cmdlines:
            assert not re.search(r"[A-Za-z0-9+/]{43}=", line), line
    finally:
        proc.stdin.close()
        proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()


def test_a_server_that_vanishes_makes_the_client_fail_not_succeed(service, servers):
    proc = subprocess.Popen(link_argv(service.port, "--linger", "2", "--idle-limit", "4",
                                      bind=servers.bind),
                            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(os.urandom(100_000))
        proc.stdin.flush()
        [pid] = servers.wait()
        proc.stdout.read(1000)              # the session carries data ...
        servers.stop(pid, signal.SIGKILL)   # ... and then the server is gone
        proc.stdin.write(os.urandom(100_000))
        proc.stdin.close()
        assert proc.wait(WAIT + 10) == 1
        err = proc.stderr.read().decode()
        assert "not all acknowledged within 2 s" in err or "no word from the server" in err
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_the_server_gives_up_on_a_client_that_vanished(service, servers):
    proc = subprocess.Popen(link_argv(service.port, "--idle-limit", "2", bind=servers.bind),
                            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"hello")
        proc.stdin.flush()
        assert proc.stdout.read(5) == b"hello"
        [pid] = servers.pids()
        proc.kill()                         # no goodbye: the server must notice by itself
        servers.wait_gone(pid)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_the_banner_names_the_process_that_serves(servers):
    """link-server's banner carries the PID of the process that serves, not of the one
    ssh started (that one has exited), whose UDP port is the banner's; that process let
    go of standard output, so that ssh can end, and stopping that PID ends the server."""
    proc = subprocess.Popen(udpmux_argv("link-server", "--bind", servers.bind),
                            env={**env(), "SSH_CONNECTION": "192.0.2.1 50000 192.0.2.2 22"},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdin.write(base64.b64encode(auth.generate_key()) + b"\n")
        proc.stdin.close()
        assert select.select([proc.stdout], [], [], WAIT)[0], "no banner"
        banner = proc.stdout.readline().decode()
        assert proc.wait(WAIT) == 0
        assert select.select([proc.stdout], [], [], WAIT)[0], "standard output still held"
        assert proc.stdout.read() == b""
    finally:
        proc.stdout.close()
    words = banner.split()
    assert words[:3] == ["UDPMUX-LINK", "1", "192.0.2.2"] and len(words) == 5, banner
    port, pid = int(words[3]), int(words[4])
    servers.add(pid)
    assert pid != proc.pid and servers.running(pid)
    serving = psutil.Process(pid)
    assert "link-server" in serving.cmdline()
    assert port in {c.laddr.port for c in serving.net_connections(kind="udp")}
    servers.stop(pid)
    assert not servers.running(pid)


@pytest.mark.parametrize("line, read", [
    ("UDPMUX-LINK 1 192.0.2.2 40123 4711", ("192.0.2.2", 40123, 4711)),
    ("UDPMUX-LINK 1 - 40123 4711", ("-", 40123, 4711)),
    ("UDPMUX-LINK 1 192.0.2.2 40123", ("192.0.2.2", 40123, None)),   # an older server
    ("UDPMUX-LINK 1 192.0.2.2 40123 0", None),
    ("UDPMUX-LINK 1 192.0.2.2 40123 x", None),
    ("UDPMUX-LINK 1 192.0.2.2 70000 4711", None),
    ("UDPMUX-LINK 1 192.0.2.2 40123 4711 more", None),
    ("UDPMUX-LINK 2 192.0.2.2 40123 4711", None),
    ("UDPMUX-LINK 1 192.0.2.2 \u0661\u0662 4711", None),              # digits, not ASCII
])
def test_banner_lines_read(line, read):
    assert parse_banner(line) == read


def test_listen_tcp_on_a_port_taken_names_the_option():
    with socket.create_server((LOCAL, 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run(udpmux_argv("link", "--ssh-command", "false", "--listen-tcp",
                                         f"{LOCAL}:{port}", "testhost"),
                             env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 71, out.stderr
    assert f"--listen-tcp: cannot listen on {LOCAL}:{port}: Address already in use" \
        in out.stderr


def test_listen_tcp_on_a_port_not_allowed_is_status_77():
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 1:
            pytest.skip("port 1 is not privileged here")
    prefix = []
    if os.geteuid() == 0:
        # root without CAP_NET_BIND_SERVICE, as a user is
        prefix = ["setpriv", "--bounding-set=-net_bind_service",
                  "--inh-caps=-net_bind_service"]
        if not shutil.which("setpriv") or subprocess.run(prefix + ["true"]).returncode:
            pytest.skip("cannot drop CAP_NET_BIND_SERVICE here (setpriv)")
    out = subprocess.run(prefix + udpmux_argv("link", "--ssh-command", "false",
                                              "--listen-tcp", f"{LOCAL}:1", "testhost"),
                         env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 77, out.stderr
    assert f"--listen-tcp: cannot listen on {LOCAL}:1: Permission denied" in out.stderr


@pytest.mark.parametrize("stdin, message, status", [
    ("not a key\n", "standard input: not a key", 65),
    ("", "standard input: empty", 65),
])
def test_link_server_refuses_a_bad_key(stdin, message, status):
    out = subprocess.run(udpmux_argv("link-server", "--bind", "47290"), input=stdin,
                         env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == status and message in out.stderr


def test_no_free_port_in_the_range_is_a_clear_error():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
        port = taken.getsockname()[1]
        out = subprocess.run(udpmux_argv("link-server", "--bind", str(port)),
                             input="A" * 43 + "=\n", env=env(), capture_output=True,
                             text=True, timeout=WAIT)
    assert out.returncode == 71 and f"no free UDP port in {port}-{port}" in out.stderr


def test_an_ssh_that_fails_is_reported(service):
    out = subprocess.run(udpmux_argv("link", "--ssh-command", "false", "testhost"),
                         input=b"", env=env(), capture_output=True, timeout=WAIT)
    assert out.returncode == 1
    assert b"could not start the server end (ssh exited with status 1)" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--bind", "9-2"], "--bind: '9-2': expected ports from 1 to 65535"),
    (["--packet-size", "100"], "--packet-size: expected 576 to 65507 bytes"),
    (["-t", "nowhere"], "--target: 'nowhere': expected HOST:PORT"),
    (["--buffer", "64K"], "--buffer: expected 1M to 1G bytes, got 65536"),
    (["--congestion", "cubic"], "--congestion: expected bbr or newreno, got 'cubic'"),
    (["--buffer", "2T"], "--buffer: expected bytes, as a number or with K, M or G (32M), "
                         "got '2T'"),
])
def test_bad_link_options(args, message):
    out = subprocess.run(udpmux_argv("link", *args, "testhost"), env=env(),
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 64 and message in out.stderr


OPENING_SERVER = '''
"""A stand-in for link-server that opens a stream of its own once the session is up,
and writes down the client's RESETs of it."""
import base64, socket, sys, time
from udpmux import wire
from udpmux.session import Acceptor
key = base64.b64decode(sys.stdin.readline())
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(f"UDPMUX-LINK 1 127.0.0.1 {sock.getsockname()[1]}", flush=True)
sys.stdout.close()
acceptor, session = Acceptor(key, [wire.ROLE_LINK]), None
sock.settimeout(0.5)
end = time.monotonic() + 10
with open(sys.argv[1], "a") as seen:
    while time.monotonic() < end and not seen.tell():
        try:
            msg, peer = sock.recvfrom(70000)
        except socket.timeout:
            continue
        mtype, sid, tag, nonce = wire.parse_header(msg, True)
        if mtype == wire.T_HELLO:
            sock.sendto(acceptor.hello(msg, bytes(16), time.monotonic())[0], peer)
        elif session is None and sid in acceptor.pending:
            session = acceptor.confirm(sid, msg, nonce)
            sock.sendto(session.seal(wire.T_STREAM, 2, wire.STREAM.pack(0, 0) + b"hi"), peer)
        elif mtype == wire.T_RESET:
            seen.write(f"RESET {tag}\\n")
            seen.flush()
'''


def test_a_stream_the_server_opens_is_refused_not_a_crash(tmp_path):
    """Found while fuzzing the stream engine (tests/fuzzing.py): the client learnt of a
    stream the server opened (an even id, which the protocol gives the server), and
    crashed: "'LinkClient' object has no attribute 'new_stream'"."""
    server, seen = tmp_path / "server.py", tmp_path / "seen"
    server.write_text(OPENING_SERVER)
    seen.write_text("")
    out = subprocess.run(
        udpmux_argv("link", "--ssh-command", FAKESSH, "--server-command",
                    f"{sys.executable} {server} {seen} #", "--linger", "1", "--debug",
                    "testhost"),
        input=b"", env=env(), capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert "Traceback" not in err and out.returncode != 70, err
    for _ in deadline_loop(what="the client's RESET of the server's stream"):
        if "RESET 2" in seen.read_text():
            break


# -- a ProxyCommand that runs link for the server itself

RECURSION = ("udpmux: link: started by the ssh of another `udpmux link` to loop (a "
             "ProxyCommand that matches the server itself); give link --ssh-command "
             "'ssh -o ProxyCommand=none' or narrow the Host pattern")


def run_bounded(argv, environ=None):
    """Run argv to its end within WAIT seconds; (status, stderr).  On a timeout every
    process it started is stopped, each by its PID, and the test fails."""
    proc = subprocess.Popen(argv, env=environ or env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{argv} still ran after {WAIT} s") from None
    return proc.returncode, err


@pytest.fixture
def ssh_config(tmp_path):
    """An ssh configuration whose Host loop runs, as its ProxyCommand, `udpmux link` for
    %n through a script that notes each run's UDPMUX_LINK_CHAIN and stops at the sixth:
    a recursion the check misses fails the test instead of forking on.  Host
    loop-direct is the same server without the ProxyCommand, at a port that refuses."""
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("OpenSSH's client is not installed (apt-get install openssh-client)")
    config, proxy, runs = tmp_path / "ssh_config", tmp_path / "proxy.sh", tmp_path / "runs"
    with socket.socket() as closed:
        closed.bind((LOCAL, 0))
        port = closed.getsockname()[1]
    ssh_command = f"{ssh} -F {config} -o BatchMode=yes"
    proxy.write_text(f"""\
echo "$UDPMUX_LINK_CHAIN" >> {runs}
[ "$(wc -l < {runs})" -le 5 ] || exit 1
exec {sys.executable} -m udpmux link --ssh-command "{ssh_command}" "$1"
""")
    config.write_text(f"""\
Host loop
    HostName {LOCAL}
    Port {port}
    ProxyCommand /bin/sh {proxy} %n
Host loop-direct
    HostName {LOCAL}
    Port {port}
""")
    return types.SimpleNamespace(ssh=ssh_command, proxy=proxy, runs=runs)


def test_a_proxycommand_that_matches_the_server_itself_stops_at_once(ssh_config):
    """link's ssh to loop runs the ProxyCommand, which runs link for loop again, whose
    ssh would run it again...: the real ssh hands the ProxyCommand the chain that link
    set, and the link it starts refuses, so the ProxyCommand runs once."""
    status, err = run_bounded(udpmux_argv("link", "--ssh-command", ssh_config.ssh, "loop"))
    assert ssh_config.runs.read_text().splitlines() == ["loop"]
    assert err.splitlines().count(RECURSION) == 1, err
    assert status == 1
    assert ("udpmux: link: loop: could not start the server end (ssh exited with status "
            "255: ssh itself failed, as it says above)") in err.splitlines(), err


def test_the_advice_for_a_proxycommand_that_matches_the_server_works(ssh_config):
    status, err = run_bounded(udpmux_argv(
        "link", "--ssh-command", ssh_config.ssh + " -o ProxyCommand=none", "loop"))
    assert not ssh_config.runs.exists(), "ssh ran the ProxyCommand"
    assert status == 1 and "Connection refused" in err and RECURSION not in err


def test_a_link_under_a_link_to_another_server_is_no_recursion(ssh_config):
    """A ProxyCommand that reaches the server's ssh through a link to another DEST (a
    jump host of the user's, say) goes on: the inner link runs, and fails here only
    because loop-direct refuses connections."""
    ssh_config.proxy.write_text(ssh_config.proxy.read_text().replace('"$1"', "loop-direct"))
    status, err = run_bounded(udpmux_argv("link", "--ssh-command", ssh_config.ssh, "loop"))
    assert ssh_config.runs.read_text().splitlines() == ["loop"]
    assert "Connection refused" in err and "started by the ssh" not in err, err
    assert status == 1


@pytest.mark.parametrize("chain, message", [
    ("jump 'alice@loop'", "started by the ssh of another `udpmux link` to alice@loop"),
    (" ".join(f"hop{n}" for n in range(8)),
     "started by the ssh of 8 nested `udpmux link`s (hop0 > hop1 > hop2 > hop3 > hop4 > "
     "hop5 > hop6 > hop7)"),
])
def test_a_link_refuses_before_it_runs_ssh(chain, message):
    status, err = run_bounded(udpmux_argv("link", "--ssh-command", "false", "alice@loop"),
                              dict(env(), UDPMUX_LINK_CHAIN=chain))
    assert status == 64 and message in err and "could not start" not in err, err
