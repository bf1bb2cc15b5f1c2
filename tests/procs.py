"""Running udpmux for real in tests: processes, readiness, UDP peers.

Everything started here is stopped by its PID; nothing waits by sleeping: readiness is
a READY=1 from sd_notify, a log line, or a datagram, each with a deadline.
"""

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 15.0         # seconds any readiness wait may take before the test fails


def udpmux_argv(*args):
    return [sys.executable, "-m", "udpmux", *map(str, args)]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("NOTIFY_SOCKET", None)
    e.pop("JOURNAL_STREAM", None)
    return e


def deadline_loop(timeout=WAIT, what="condition"):
    """Yield until the caller breaks out; fail the test when time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        yield end - time.monotonic()
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Notify:
    """An sd_notify socket a daemon reports to (NOTIFY_SOCKET)."""

    def __init__(self, directory):
        self.path = os.path.join(directory, f"notify-{id(self)}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen = []
        self.daemons = []       # the processes told of this socket, newest last

    def wait_for(self, field, timeout=WAIT):
        """Wait for a datagram with `field` (e.g. "READY=1"); return its fields."""
        return self.wait_match(lambda fields: field in fields, timeout, field)

    def wait_match(self, check, timeout=WAIT, what="a notification"):
        """Wait for a datagram whose fields satisfy check(fields); return its fields.

        Fails at once, with the daemon's log, when the newest daemon reporting here
        has exited with nothing left to read; on a timeout the log is shown too."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if ready:
                fields = self.sock.recv(4096).decode().split("\n")
                self.seen.append(fields)
                if check(fields):
                    return fields
            elif self.daemons and self.daemons[-1].proc.poll() is not None:
                daemon = self.daemons[-1]
                raise AssertionError(f"the daemon exited ({daemon.proc.returncode}) before "
                                     f"{what}; log:\n{daemon.log()}")
        logs = "\n".join(d.log() for d in self.daemons[-1:])
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; log:\n{logs}")

    def close(self):
        self.sock.close()


class Daemon:
    """A udpmux process whose stderr is collected and searchable."""

    def __init__(self, args, notify=None, stdin=None, argv=None, prefix=(), extra_env=None):
        """`prefix` goes before the argv, e.g. ["ip", "netns", "exec", NS]: it must exec
        the program, so that self.pid is the program's own PID; `extra_env` is added to
        its environment."""
        e = {**env(), **(extra_env or {})}
        if notify is not None:
            e["NOTIFY_SOCKET"] = notify.path
            notify.daemons.append(self)
        argv = [*prefix, *(argv or udpmux_argv(*args))]
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(argv, env=e, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if stdin:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.pid = self.proc.pid
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_log(self, text, timeout=WAIT, start=0):
        """Wait for a log line containing text (from line `start` on); return its index."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError(f"no log line with {text!r}; log:\n" + self.log())
                self.cond.wait(min(left, 0.2))

    def log(self):
        with self.cond:
            return "\n".join(self.lines)

    def children(self):
        try:
            return [p.pid for p in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum):
        os.kill(self.pid, signum)

    def stop(self, timeout=WAIT):
        """SIGTERM, wait, then SIGKILL this process (and any child it left) by PID."""
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for pid in kids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        self.reader.join(timeout)
        return self.proc.returncode


class Echo:
    """A UDP echo service on loopback (a thread), which remembers who sent what."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.address = self.sock.getsockname()
        self.port = self.address[1]
        self.sources = set()
        self.count = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data, peer = self.sock.recvfrom(70000)
            except OSError:
                continue
            self.sources.add(peer)
            self.count += 1
            self.sock.sendto(data, peer)

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def udp_client(host="127.0.0.1", timeout=3.0):
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(timeout)
    return sock


_handed_out = set()


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host="127.0.0.1"):
    """A port free for UDP and TCP on host, for a daemon to bind.

    Drawn below the kernel's ephemeral range, so that no client socket bound to port 0
    takes it before the daemon starts, and never the same one twice in a run."""
    low = min(_ephemeral_range()[0], 32768)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(low - 12000, 1024), low)
        if port in _handed_out:
            continue
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(family, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port below {low} on {host}")


def exchange(sock, data, address, tries=3):
    """Send data and return the reply, resending on timeout (UDP may lose one)."""
    for _ in range(tries):
        sock.sendto(data, address)
        try:
            return sock.recv(70000)
        except socket.timeout:
            continue
    raise AssertionError(f"no reply from {address} after {tries} tries")


def status(control_socket):
    out = subprocess.run(udpmux_argv("status", "--json", "--control-socket", control_socket),
                         env=env(), capture_output=True, text=True, timeout=WAIT)
    if out.returncode != 0:
        raise AssertionError(f"udpmux status failed: {out.stderr}")
    return json.loads(out.stdout)


def tunnel(control_socket, name):
    for t in status(control_socket)["tunnels"]:
        if t["name"] == name:
            return t
    raise AssertionError(f"no tunnel {name}")


class Tap:
    """A UDP path between an agent and its peer that the test controls, as a router on
    the path would be: the agent sends to tap.address; the tap sends on from a socket of
    its own (`outward`) to the peer, and what the peer sends back to the agent.  It keeps
    every datagram (an attacker's capture), can move to a new outward port (a NAT that
    rebinds), stop carrying (a blocked path), and send to the agent as if it were the
    peer (an attacker who spoofs the peer's address)."""

    def __init__(self, peer, host="127.0.0.1"):
        self.peer = peer
        self.host = host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.inner = socket.socket(self.family, socket.SOCK_DGRAM)
        self.inner.bind((host, 0))
        self.address = self.inner.getsockname()
        self.outward = self._socket()
        self.agent = None               # where the agent sends from
        self.out, self.back = [], []    # datagrams agent -> peer, peer -> agent
        self.blocked = False
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _socket(self):
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.bind((self.host, 0))
        return sock

    @property
    def outward_address(self):
        return self.outward.getsockname()

    def _serve(self):
        while self.running:
            with self.lock:
                socks = [self.inner, self.outward]
            ready, _, _ = select.select(socks, [], [], 0.05)
            for sock in ready:
                try:
                    data, source = sock.recvfrom(70000)
                except OSError:
                    continue
                with self.lock:
                    if sock is self.inner:
                        self.agent = source
                        self.out.append(data)
                        if not self.blocked:
                            self.outward.sendto(data, self.peer)
                    elif sock is self.outward and self.agent is not None:
                        self.back.append(data)
                        if not self.blocked:
                            self.inner.sendto(data, self.agent)

    def rebind(self):
        """From now on the peer sees the agent at a new port."""
        with self.lock:
            old, self.outward = self.outward, self._socket()
        old.close()

    def block(self, blocked=True):
        with self.lock:
            self.blocked = blocked

    def inject(self, data):
        """Send data to the agent from the address the agent sends to: to the agent it
        comes from its peer."""
        self.inner.sendto(data, self.agent)

    def captured(self, mtype=None, direction="out"):
        """Datagrams that crossed, agent to peer ("out") or back, of one message type."""
        with self.lock:
            got = list(self.out if direction == "out" else self.back)
        return [d for d in got if mtype is None or (len(d) > 1 and d[1] == mtype)]

    def close(self):
        self.running = False
        self.thread.join(2)
        self.inner.close()
        self.outward.close()


class Sniffer:
    """The UDP payloads sent to some ports on loopback (a range, or a set), as an
    attacker on the host sees them (a packet socket; root only).  Start it before the
    traffic to capture."""

    def __init__(self, ports):
        self.ports = ports
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.bind(("lo", 0x0800))
        self.seen = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            packet, (_ifname, _proto, pkttype, *_rest) = self.sock.recvfrom(70000)
            if pkttype != socket.PACKET_HOST or len(packet) < 28 or packet[9] != 17:
                continue
            ihl = (packet[0] & 0x0F) * 4
            port = int.from_bytes(packet[ihl + 2:ihl + 4], "big")
            if port in self.ports:
                with self.lock:
                    self.seen.append((port, bytes(packet[ihl + 8:])))

    def captured(self, mtype=None):
        """(port, payload) of what was sent to the ports, of one message type."""
        with self.lock:
            got = list(self.seen)
        return [(p, d) for p, d in got if mtype is None or (len(d) > 1 and d[1] == mtype)]

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()
