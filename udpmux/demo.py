"""`udpmux demo`: a relay, an exposer and a UDP echo service on loopback, used as a
client would use them, with the relay's status at the end.

Everything runs as real processes on real sockets: the relay (a master and its
worker) and the exposer are started as `udpmux relay` and `udpmux expose` with a
fresh key in a temporary directory; the echo service is a thread of this process.
The demo exits 0 when every datagram came back whole, 1 otherwise.
"""

import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from udpmux.auth import write_key_file
from udpmux.settings import whole_number
from udpmux.errors import EXIT_FAILURE, EXIT_OK, Fatal, UsageError
from udpmux.status import ask, format_flows, format_status

LOCAL = "127.0.0.1"
START_TIMEOUT = 20.0
REPLY_TIMEOUT = 1.0
TRIES = 3


class Echo(threading.Thread):
    """A UDP echo service on loopback."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCAL, 0))
        self.port = self.sock.getsockname()[1]
        self.sources = set()
        self.running = True

    def run(self):
        while self.running:
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if ready:
                data, peer = self.sock.recvfrom(65535)
                self.sources.add(peer)
                self.sock.sendto(data, peer)

    def stop(self):
        self.running = False
        self.join(2)
        self.sock.close()


def _count(args, name):
    try:
        value = whole_number(args[name])
    except ValueError:
        raise UsageError(f"{name}: expected a whole number, got {args[name]!r}") from None
    if not 1 <= value <= 10000:
        raise UsageError(f"{name}: expected 1 to 10000, got {value}")
    return value


class Demo:
    def __init__(self, clients, datagrams, debug):
        self.clients = clients
        self.datagrams = datagrams
        self.debug = debug
        self.procs = []
        self.tmp = tempfile.TemporaryDirectory(prefix="udpmux-demo-")
        self.dir = self.tmp.name
        self.control = os.path.join(self.dir, "control.sock")
        self.key = os.path.join(self.dir, "demo.key")

    def start(self, *args, notify=None):
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify
        out = None if self.debug else subprocess.DEVNULL
        proc = subprocess.Popen([sys.executable, "-m", "udpmux", *args,
                                 *(["--debug"] if self.debug else [])],
                                env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def wait_ready(self, notify_sock, proc):
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise Fatal(f"the relay exited with status {proc.returncode} "
                            "(run `udpmux demo --debug` to see why)")
            ready, _, _ = select.select([notify_sock], [], [], 0.2)
            if ready and b"READY=1" in notify_sock.recv(4096).split(b"\n"):
                return
        raise Fatal("the relay did not become ready in time")

    def wait_exposer(self, proc):
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise Fatal(f"the exposer exited with status {proc.returncode}")
            tunnel = ask(self.control, {"request": "status"})["tunnels"][0]
            if tunnel["exposer"]:
                return tunnel
            time.sleep(0.05)
        raise Fatal("the exposer did not register in time")

    def run(self):
        write_key_file(self.key)
        echo = Echo()
        echo.start()
        notify_path = os.path.join(self.dir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        try:
            print("udpmux demo: a relay, an exposer and a UDP echo service on loopback")
            relay = self.start("relay", "--public", f"{LOCAL}:0", "--register", f"{LOCAL}:0",
                               "--key-file", self.key, "--control-socket", self.control,
                               "--name", "demo", notify=notify_path)
            self.wait_ready(notify, relay)
            tunnel = ask(self.control, {"request": "status"})["tunnels"][0]
            public = tunnel["public"].rpartition(":")
            print(f"  echo service  {LOCAL}:{echo.port}")
            print(f"  relay         master {relay.pid}, worker {tunnel['worker_pid']}; "
                  f"clients send to {tunnel['public']}, the exposer registers at "
                  f"{tunnel['register']}")
            exposer = self.start("expose", "--relay", tunnel["register"], "--service",
                                 f"{LOCAL}:{echo.port}", "--key-file", self.key)
            tunnel = self.wait_exposer(exposer)
            print(f"  exposer       pid {exposer.pid}, registered; the relay sees it at "
                  f"{tunnel['exposer']['address']}")
            lost, times = self.traffic((public[0], int(public[2])))
            total = self.clients * self.datagrams
            p50 = statistics.median(times) * 1000 if times else 0.0
            p99 = sorted(times)[int(len(times) * 0.99) - 1] * 1000 if times else 0.0
            print(f"\n{self.clients} clients x {self.datagrams} datagrams: {total} sent, "
                  f"{total - lost} came back whole; round trip p50 {p50:.2f} ms, "
                  f"p99 {p99:.2f} ms")
            print(f"the echo service saw {len(echo.sources)} source ports: one per client\n")
            print(format_status(self.settled_status(total - lost)))
            flows = ask(self.control, {"request": "flows", "tunnel": "demo"})
            flows["flows"] = flows["flows"][:5]
            print("\nthe first flows (`udpmux status --flows demo`):")
            print(format_flows(flows))
            return EXIT_OK if lost == 0 else EXIT_FAILURE
        finally:
            self.stop()
            echo.stop()
            notify.close()
            self.tmp.cleanup()

    def settled_status(self, echoed):
        """The relay's status once its counters show the echoed datagrams (a worker
        publishes them about once a second)."""
        end = time.monotonic() + 3.0
        while True:
            reply = ask(self.control, {"request": "status"})
            if reply["tunnels"][0]["counters"].get("datagrams_out", 0) >= echoed \
                    or time.monotonic() > end:
                return reply
            time.sleep(0.1)

    def traffic(self, public):
        """Each client sends its datagrams one at a time and waits for each echo."""
        socks = []
        lost = 0
        times = []
        try:
            for _ in range(self.clients):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((LOCAL, 0))
                sock.settimeout(REPLY_TIMEOUT)
                socks.append(sock)
            for n in range(self.datagrams):
                for c, sock in enumerate(socks):
                    data = f"client {c} datagram {n} ".encode() * (1 + (n % 40))
                    for _ in range(TRIES):
                        start = time.perf_counter()
                        sock.sendto(data, public)
                        try:
                            if sock.recv(65535) == data:
                                times.append(time.perf_counter() - start)
                                break
                        except socket.timeout:
                            continue
                    else:
                        lost += 1
        finally:
            for sock in socks:
                sock.close()
        return lost, times

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main(args):
    return Demo(_count(args, "--clients"), _count(args, "--datagrams"), args["--debug"]).run()
