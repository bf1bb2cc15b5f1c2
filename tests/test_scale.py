"""10,000 clients through one relay tunnel with the default limits, as real processes.

A `udpmux relay` with one expose tunnel and no limit given (max_flows, new_flows_rate and
new_flows_per_source at their defaults), a `udpmux expose` (its max_flows at the default
too) and a UDP echo service, all on loopback.  10,000 client sockets, every one on
127.0.10.1: one source address, so that the per-source new-flow rate applies to all of
them, as to the clients of an office behind one CG-NAT address.  Each sends one datagram
of its own and must get that same datagram back; then the relay must hold 10,000 flows,
one per client, and must have evicted none, and the exposer must have 10,000 sockets
towards the service.

The clients are not on 127.0.0.1, where other tests' agents run (punch probes random
ports there): a datagram that does not come from the relay's public address is not an
echo and is only counted.

A datagram may be lost (a socket buffer overflows during the burst, or the relay refuses
a new flow over the per-source rate, silently): a client not answered is sent again in
the next round, as any UDP client retries; the rounds are bounded in count and in time.
Nothing here measures time: the figures are for tools/bench_relay.py and udpmux(8).
"""

import resource
import selectors
import socket
import subprocess
import time

import psutil
import pytest

from procs import WAIT, Daemon, Echo, Notify, deadline_loop, env, free_port, tunnel, udpmux_argv

LOCAL = "127.0.0.1"
CLIENT_HOST = "127.0.10.1"  # the clients' one source address
CLIENTS = 10_000
WINDOW = 256            # datagrams sent before waiting for their echoes
QUIET = 0.25            # seconds without any echo after which a window's rest is resent later
ROUNDS = 20             # passes over the clients not yet answered
BUDGET = 60.0           # seconds all the rounds together may take
SPARE_FILES = 512       # descriptors beyond the clients' for the test process itself


@pytest.fixture
def open_files():
    """Room for CLIENTS sockets: the soft RLIMIT_NOFILE raised towards the hard one (the
    exposer, started from here, inherits it and raises its own as far as it needs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = CLIENTS + SPARE_FILES
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit on open files is {hard}; this test needs {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Clients:
    """count UDP sockets on CLIENT_HOST, each with a datagram of its own, sent to
    `relay` and expected back from it."""

    def __init__(self, count, relay):
        self.relay = relay
        self.socks = []
        self.selector = selectors.DefaultSelector()
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.socks.append(sock)
            sock.bind((CLIENT_HOST, 0))
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, i)
        self.wrong = []         # (client, what the relay sent it) where not its own
        self.strays = 0         # datagrams from anyone but the relay

    @staticmethod
    def payload(i):
        return b"client %05d" % i

    def echo_all(self):
        """Send every client's datagram until its echo is back; returns the clients
        still unanswered after ROUNDS rounds or BUDGET seconds."""
        pending = set(range(len(self.socks)))
        end = time.monotonic() + BUDGET
        for _ in range(ROUNDS):
            order = sorted(pending)
            for first in range(0, len(order), WINDOW):
                window = order[first:first + WINDOW]
                for i in window:
                    self.socks[i].sendto(self.payload(i), self.relay)
                self._collect(window, pending, end)
                if time.monotonic() >= end:
                    return pending
            if not pending:
                break
        return pending

    def _collect(self, window, pending, end):
        """Echoes until the window is answered or QUIET seconds pass without one."""
        waiting = set(window)
        while waiting & pending and time.monotonic() < end:
            events = self.selector.select(QUIET)
            if not events:
                return
            for key, _mask in events:
                i = key.data
                while True:
                    try:
                        data, source = key.fileobj.recvfrom(100)
                    except BlockingIOError:
                        break
                    if source != self.relay:
                        self.strays += 1
                    elif data == self.payload(i):
                        pending.discard(i)
                    else:
                        self.wrong.append((i, data))

    def close(self):
        self.selector.close()
        for sock in self.socks:
            sock.close()


def test_ten_thousand_clients_from_one_address_fit_the_default_limits(tmp_path, open_files):
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    control = str(tmp_path / "control.sock")
    echo = Echo()
    notify = Notify(str(tmp_path))
    daemons = []
    clients = None
    try:
        public, register = free_port(), free_port()
        daemons.append(Daemon(["relay", "--public", f"{LOCAL}:{public}",
                               "--register", f"{LOCAL}:{register}",
                               "--control-socket", control, "--key-file", key],
                              notify=notify))
        notify.wait_for("READY=1")
        exposer = Daemon(["expose", "--relay", f"{LOCAL}:{register}",
                          "--service", f"{LOCAL}:{echo.port}", "--key-file", key])
        daemons.append(exposer)
        exposer.wait_log("registered with the relay")
        for _ in deadline_loop(what="the relay to see the exposer"):
            if tunnel(control, "tunnel").get("exposer"):
                break

        clients = Clients(CLIENTS, (LOCAL, public))
        unanswered = clients.echo_all()
        assert clients.wrong == [], f"the relay sent clients others' echoes: {clients.wrong[:5]}"
        assert not unanswered, (f"{len(unanswered)} of {CLIENTS} clients never got their "
                                f"echo; relay: {tunnel(control, 'tunnel')}")
        # One service socket per client, each still open: the service saw them all.
        service = {c.laddr for c in psutil.Process(exposer.pid).net_connections("udp")
                   if c.raddr == echo.address}
        assert len(service) == CLIENTS and service <= echo.sources

        # The worker's counters reach status about once a second; the flow count is the
        # table's own, at once.
        for _ in deadline_loop(WAIT, "the relay's counters to count every flow"):
            t = tunnel(control, "tunnel")
            if t["counters"].get("flows", 0) >= CLIENTS:
                break
        assert t["max_flows"] >= CLIENTS        # the default
        assert t["flows"] == CLIENTS
        assert t["counters"]["flows"] == CLIENTS     # one flow per client, none started twice
        assert t["counters"]["evicted"] == 0
        assert t["counters"]["closed"] == 0          # and the exposer closed none
    finally:
        if clients is not None:
            clients.close()
        for daemon in reversed(daemons):
            daemon.stop()
        echo.close()
        notify.close()
