"""udpmux link and link-server on loopback, the server started through a stand-in for ssh
(tests/fakessh.py runs the remote command here).  The real OpenSSH, NATs, loss, roaming
and a blackout are in tests/test_lab_link.py."""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import psutil
import pytest

from procs import ROOT, WAIT, Daemon, deadline_loop, env, udpmux_argv

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


def servers(bind):
    """link-server processes started for this bind range (to watch, and stop, by PID)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "link-server" in cmd and bind in cmd:
            found.append(p.pid)
    return found


@pytest.fixture
def bind_range():
    """A bind range of its own for each test, and every server left in it stopped."""
    low = 47300 + (os.getpid() % 50) * 20
    bind = f"{low}-{low + 19}"
    yield bind
    for pid in servers(bind):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_link(port, data, *extra, bind, timeout=60):
    return subprocess.run(link_argv(port, *extra, bind=bind), input=data, env=env(),
                          capture_output=True, timeout=timeout)


def test_a_stream_both_ways_byte_exact(service, bind_range):
    data = os.urandom(5_000_000)
    out = run_link(service.port, data, bind=bind_range)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == data
    for _ in deadline_loop(what="the server to exit after the session"):
        if not servers(bind_range):
            break


def test_half_close_the_answer_comes_after_our_end(bind_range):
    """Like `cat file | ssh host sort`: the client's side ends first, the answer follows."""
    service = TcpService(reply=lambda got: hashlib.sha256(got).digest() * 100_000)
    try:
        data = os.urandom(2_000_000)
        out = run_link(service.port, data, bind=bind_range)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == hashlib.sha256(data).digest() * 100_000
    finally:
        service.close()


def test_local_tcp_connections_are_each_a_stream(service, bind_range):
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        listen = s.getsockname()[1]
    proc = subprocess.Popen(link_argv(service.port, "--listen-tcp", f"{LOCAL}:{listen}",
                                      "--debug", bind=bind_range),
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


def test_connections_made_while_the_session_is_up_are_served(service, bind_range):
    """Connections to --listen-tcp made after the session is up (the usual case: the
    link runs, clients come later), one after the other, each a stream of its own."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        listen = s.getsockname()[1]
    daemon = Daemon(None, argv=link_argv(service.port, "--listen-tcp", f"{LOCAL}:{listen}",
                                         "--debug", bind=bind_range))
    try:
        daemon.wait_log("session up")
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


def test_a_refused_target_fails_with_a_message(bind_range):
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        closed = s.getsockname()[1]         # nothing listens here
    out = run_link(closed, b"hello", bind=bind_range)
    assert out.returncode == 1
    assert b"could not connect to the target" in out.stderr


def test_the_key_is_never_on_a_command_line(service, bind_range):
    proc = subprocess.Popen(link_argv(service.port, bind=bind_range), env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"ping")
        proc.stdin.flush()
        for _ in deadline_loop(what="the server"):
            pids = servers(bind_range)
            if pids:
                break
        cmdlines = [" ".join(psutil.Process(pid).cmdline()) for pid in pids + [proc.pid]]
        for line in cmdlines:
            assert not re.search(r"[A-Za-z0-9+/]{43}=", line), line
    finally:
        proc.stdin.close()
        proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()


def test_a_server_that_vanishes_makes_the_client_fail_not_succeed(service, bind_range):
    proc = subprocess.Popen(link_argv(service.port, "--linger", "2", "--idle-limit", "4",
                                      bind=bind_range),
                            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(os.urandom(100_000))
        proc.stdin.flush()
        for _ in deadline_loop(what="the server"):
            pids = servers(bind_range)
            if pids:
                break
        proc.stdout.read(1000)              # the session carries data ...
        for pid in pids:
            os.kill(pid, signal.SIGKILL)    # ... and then the server is gone
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


def test_the_server_gives_up_on_a_client_that_vanished(service, bind_range):
    proc = subprocess.Popen(link_argv(service.port, "--idle-limit", "2", bind=bind_range),
                            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"hello")
        proc.stdin.flush()
        assert proc.stdout.read(5) == b"hello"
        pids = servers(bind_range)
        assert len(pids) == 1
        proc.kill()                         # no goodbye: the server must notice by itself
        for _ in deadline_loop(what="the server to give up"):
            if not psutil.pid_exists(pids[0]) or \
                    psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE:
                break
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


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
