#!/usr/bin/env python3
"""How fast is `udpmux relay` + `udpmux expose` (and uot), next to a C relay, socat and no relay?

    python3 tools/bench_relay.py [--quick] [--seconds S] [--rounds N] [--figures 1234]
                                 [--rounds4 N] [--flow-rate R] [--setup-rate R]
                                 [--wait-idle S] [--nice N] [--no-socat]

A benchmark, not a test: run it by hand, on an otherwise idle machine.  It builds
tools/crelay.c with gcc into tools/build/ when the binary is missing or older than the
source, starts everything itself on 127.0.0.1, and prints four figures measured in the same
run, whether the project's targets are met, and the exact command line.  Every load stops
by itself (bounded in time and in count); every process it starts is stopped by its PID.
The default run takes about 3 minutes; --quick about 40 s (0.6 s per measurement, one
round, flow counts 1, 1,000 and 100,000).  --figures 4 (for example) runs only figure 4.

Paths compared (figures 1-3):
  udpmux   client -> udpmux relay (worker) -> udpmux expose -> echo, and back.  The relay has
           separate --public and --register ports and a key (default limits).  CPU is the
           relay WORKER's (psutil on the worker_pid of `udpmux status --json`; the idle
           master is not counted) and the exposer's, shown apart and summed.
  udpmux shared  (figures 1-2 only) the same with ONE socket for clients and the exposer:
           the relay has --public and no --register, so the exposer registers on the public
           socket (the "shared register socket" path of udpmux/relay.py): every datagram
           arriving there is checked for being the exposer's message, and each of the
           exposer's messages takes the relay's per-message path (client_slow, then
           from_exposer) instead of the inline loop of a separate register socket.  CPU as
           for udpmux.
  uot      client -> udpmux uot-client -> TCP -> udpmux uot-server -> echo, and back: UDP
           carried over TCP, keyed; its two processes' CPU in the two columns of figure 2.
  C        crelay `fused` (tools/crelay.c; its header comment says exactly what it does): one
           process, epoll, recvmmsg/sendmmsg in batches of 64, a hash table of clients, one
           socket per client towards the service, no logging.  The baseline of every "x C"
           column: the udpmux pair's job without the hop between the two and without MACs.
  C split  crelay `relay` + crelay `expose`: udpmux's own topology in C (two processes,
           udpmux's 20-byte header and a 16-byte MAC slot between them, tag table,
           per-client service sockets); only computing and checking MACs and the replay
           window are missing.  It shows what the second hop costs by itself.
  socat    socat UDP4-LISTEN:P,bind=127.0.0.1,fork,reuseaddr UDP4:127.0.0.1:ECHO, the form
           that relays for many clients: a child per client, its socket connected to that
           client (UDP4-RECVFROM:P,fork forks a child for every datagram instead).  Its CPU is
           the parent's and all children's (including children that exited and were reaped).
  direct   client -> echo, no relay: the traffic side's own ceiling and latency.

The traffic side is C as well (crelay load, latency, raw, echo, sink), so that it is not what
limits a relay.  Pinning (os.sched_setaffinity, which fork inherits): with two or more CPUs,
the first runs the traffic side (loaders, echo or sinks, and this script) and the second the
whole relay side (udpmux master + worker + exposer, the C relay or both C split halves,
socat and all its children).  So udpmux's two processes share one core, as C split's halves
do, and the rates of figure 1 are what one core of relaying buys.  With one CPU, everything
shares it.

Figure 1: round trips per second, closed loop: 8 connected client sockets (8 flows), each
  sending up to 64 datagrams per sendmmsg(), at most 512 outstanding (one unanswered 50 ms
  after it was sent counts as lost), 64 B and 1,200 B payloads, replies counted over
  --seconds after a warm-up.  Best of --rounds rounds (paths interleaved; interference only
  makes a round look worse).  The bursts favour crelay, which sends a run of one flow's
  datagrams with one sendmmsg() where udpmux expose calls send() per datagram; figure 4b
  (flows interleaved) shows the other case.
Figure 2: relay CPU-seconds per million round trips, from the same runs: psutil cpu_times
  (user + system) of the relay's processes just before and just after the measured interval.
  Each round trip crosses the relay twice.  Lowest of the rounds.  Numerically it is the
  relay's CPU microseconds per round trip.
Figure 3: round-trip latency at a paced 10,000 datagrams/s (8 flows round robin, 64 B, the
  send time in the payload) over 2 x --seconds (--quick: 1 x); "+p50"/"+p99" is the path's
  percentile minus direct's; "relay CPU" is how busy the relay's processes were meanwhile.
  On a virtual machine the tails also depend on how often the relay's vCPU goes idle and
  must be woken (a busier relay core can show shorter tails).
Figure 4: CPU per datagram at 1, 1,000, 10,000 and 100,000 concurrent flows.
  Method: one-way, client -> relay [-> exposer] -> a sink that only counts, paced at a fixed
  rate (--flow-rate, 25,000 datagrams/s of 64 B) that every configuration sustains, so only
  the number of flows changes.  Each flow count is measured twice in a row for 1.5 s (--quick:
  once, 0.6 s) and the run with less CPU per datagram shown; CPU per datagram is CPU over
  the datagrams sent in the interval, and "delivered" checks that the sink got them all.
  The clients are one IPPROTO_RAW socket (crelay raw) writing whole IPv4/UDP packets from
  127.1.0.0 + i, port 40000, i < N round robin: N flows without N descriptors, and no
  replies to receive (and no ICMP for them).  Before each measurement one datagram from
  every source (paced at --setup-rate) makes the relay create all N flows, and the relay's
  table is checked to hold them (udpmux status; SIGUSR1 for crelay).
  Why not a socket per client: here RLIMIT_NOFILE's hard limit is 20,000 and root lacks
  CAP_SYS_RESOURCE, so no process may hold 100,000 sockets; several loader processes would
  get round that, but not the exposer (next paragraph).
  4a  relay half, 1 ... 100,000 flows: the udpmux relay WORKER, with a stand-in exposer (this
      script completes the real handshake with udpmux.session.Initiator, then hands the
      socket to `crelay sink fd=N`, which counts), against crelay `relay` (tag table, one
      upstream socket) into a sink.  Neither needs a descriptor per flow.
  4b  whole tunnel: udpmux relay worker + the real `udpmux expose` (one service socket per
      flow) -> sink, against crelay relay + crelay expose -> sink; at most 10,000 flows.  An
      exposer needs a socket per flow: 20,000 descriptors cap it near 19,990 flows, and
      connected UDP sockets towards one service address are capped by the ephemeral port
      range (32768-60999: 28,232 sockets for the whole host) whatever the descriptor limit.
  The relays of figure 4 run with --max-flows 200000 --new-flows-rate 10000000
  --new-flows-per-source 10000000 --max-sources 1000000 (the exposer --max-flows 200000).

Reading the figures: "other CPU" is what processes this benchmark did not start used during
the measured interval (all CPUs, % of one).  When it is not near 0 the machine was busy, and
rates and latencies (less so CPU per datagram) are worse than they should be; --wait-idle
waits for quiet first, and --nice -20 may shield the benchmark on a machine that stays
busy.  CPU times are sampled by the scheduler tick (4 ms here), so short runs (--quick) are
noisier; crelay raw paces at random intervals so that no load locks to the tick.
"""

import argparse
import os
import queue
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from udpmux import wire                                  # noqa: E402
from udpmux.auth import read_key                         # noqa: E402
from udpmux.errors import Fatal                          # noqa: E402
from udpmux.session import Drop, Initiator               # noqa: E402
from udpmux.status import ask as status_request          # noqa: E402

SOURCE = os.path.join(ROOT, "tools", "crelay.c")
BUILD = os.path.join(ROOT, "tools", "build")
CRELAY = os.path.join(BUILD, "crelay")
LOCAL = "127.0.0.1"

FLOWS = 8                   # client sockets in figures 1-3
WINDOW = 512                # datagrams outstanding in figure 1
SIZES = (64, 1200)
LATENCY_RATE = 10_000       # datagrams per second in figure 3
LATENCY_SIZE = 64
FLOW_COUNTS = (1, 1_000, 10_000, 100_000)
PAIR_MAX_FLOWS = 10_000     # the largest flow count figure 4b runs (see the docstring)
FLOW_SIZE = 64
FLOW_RATE = 25_000          # datagrams/s of figure 4
SETUP_RATE = 50_000         # new flows/s while figure 4 sets up a udpmux relay
C_SETUP_RATE = 150_000      # ... and a C relay
QUICK_FLOW_COUNTS = (1, 1_000, 100_000)
SECONDS = 2.0               # measured seconds per run (--quick: QUICK_SECONDS)
QUICK_SECONDS = 0.6
FIG4_SECONDS = 1.5          # measured seconds per run of figure 4 (it runs each twice)
WAIT = 20.0                 # seconds any readiness wait may take
SOCKET_BUFFER = 4 << 20

HIGH_LIMITS = ("--max-flows", "200000", "--new-flows-rate", "10000000",
               "--new-flows-per-source", "10000000", "--max-sources", "1000000")

# -------------------------------------------------------------------------- plumbing


class BenchError(Exception):
    pass


def cpu_sets():
    """(traffic CPUs, relay CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return {cpus[0]}, {cpus[1]}
    return set(cpus), set(cpus)


TRAFFIC, RELAY = cpu_sets()
NICE = 0                    # --nice: the niceness of every process started (and this one)
STARTED = []                # every Proc, for stopping by PID at the end


class Proc:
    """A process we started: pinned, its stdout lines in a queue, stopped by PID."""

    def __init__(self, name, argv, cpus, env=None, pass_fds=(), log_stderr=True):
        self.name = name
        self.argv = argv
        self.lines = queue.Queue()
        self.log = []
        self.log_cond = threading.Condition()
        # Affinity is per thread and inherited by fork: set ours, spawn, put it back.
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if log_stderr else subprocess.DEVNULL,
                pass_fds=pass_fds, text=True, bufsize=1)
        finally:
            os.sched_setaffinity(0, mine)
        self.pid = self.proc.pid
        self.known = {}               # every descendant seen: PID -> its creation time
        if NICE:
            os.setpriority(os.PRIO_PROCESS, self.pid, NICE)
        STARTED.append(self)
        threading.Thread(target=self._read_out, daemon=True).start()
        if log_stderr:
            threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _read_err(self):
        for line in self.proc.stderr:
            with self.log_cond:
                self.log.append(line.rstrip("\n"))
                self.log_cond.notify_all()

    def expect(self, prefix, timeout=WAIT):
        """The next stdout line starting with prefix (others are skipped)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {prefix!r} line within {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"{self.name}: exited ({self.proc.wait()}) before {prefix!r}"
                                 + ("\n" + "\n".join(self.log[-20:]) if self.log else ""))
            if line.startswith(prefix):
                return line

    def wait_log(self, text, timeout=WAIT):
        end = time.monotonic() + timeout
        with self.log_cond:
            while not any(text in line for line in self.log):
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise BenchError(f"{self.name}: no log line with {text!r}:\n"
                                     + "\n".join(self.log[-20:]))
                self.log_cond.wait(min(left, 0.2))

    def descendants(self):
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        for kid in kids:
            if kid.pid not in self.known:
                try:
                    self.known[kid.pid] = kid.create_time()
                except psutil.Error:
                    pass
        return [kid.pid for kid in kids]

    def pin(self, cpus):
        """Affinity (and --nice) again, for this process and every descendant so far."""
        for pid in [self.pid] + self.descendants():
            try:
                os.sched_setaffinity(pid, cpus)
                if NICE:
                    os.setpriority(os.PRIO_PROCESS, pid, NICE)
            except OSError:
                pass

    def stop(self, timeout=5.0):
        """SIGTERM, wait, SIGKILL; then every descendant ever seen, each by its PID."""
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for pid, created in self.known.items():
            try:
                child = psutil.Process(pid)
                if child.create_time() == created:      # still the same process
                    child.kill()
            except psutil.Error:
                pass


def stop_all():
    while STARTED:
        STARTED.pop().stop()


def our_pids():
    pids = {os.getpid()}
    for p in STARTED:
        if p.proc.poll() is None:
            pids.add(p.pid)
            pids.update(p.descendants())
    return pids


def busy_seconds():
    """CPU-seconds all CPUs spent on anything but idling (irq and softirq included: with
    tick accounting they are also charged to whichever process was running)."""
    t = psutil.cpu_times()
    return (t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


class Meter:
    """CPU of named groups of processes, and of everything else, over an interval.
    Processes that appear in between count from zero."""

    def __init__(self, groups):
        self.groups = groups          # name -> callable returning PIDs

    @staticmethod
    def _times(pids, reaped=False):
        """PID -> CPU-seconds; reaped: with its children that have exited and been waited
        for (so a socat child that ends in between moves into its parent's figure)."""
        out = {}
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system + (t.children_user + t.children_system
                                                if reaped else 0.0)
            except psutil.Error:
                pass
        return out

    def snapshot(self):
        return (time.monotonic(), busy_seconds(), self._times(our_pids()),
                {name: self._times(pids(), reaped=True) for name, pids in self.groups.items()})

    @staticmethod
    def delta(a, b):
        """(seconds, {group: CPU-seconds}, other processes' CPU in CPUs)."""
        seconds = b[0] - a[0]
        # A group's processes that ended in between were reaped into their parent's
        # children times, so totals are compared; ours are compared PID by PID.
        groups = {n: sum(b[3][n].values()) - sum(a[3].get(n, {}).values()) for n in b[3]}
        ours = sum(v - a[2].get(pid, 0.0) for pid, v in b[2].items())
        return seconds, groups, max(0.0, (b[1] - a[1]) - ours) / seconds


def other_cpu(seconds=0.5):
    """The share of one CPU that processes this script did not start use just now."""
    m = Meter({})
    a = m.snapshot()
    time.sleep(seconds)
    return Meter.delta(a, m.snapshot())[2]


def env_for_udpmux(notify=None):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("NOTIFY_SOCKET", None)
    if notify:
        e["NOTIFY_SOCKET"] = notify
    return e


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def build():
    """Compile crelay.c unless the binary is newer than the source."""
    if os.path.exists(CRELAY) and os.path.getmtime(CRELAY) >= os.path.getmtime(SOURCE):
        return "up to date"
    if not shutil.which("gcc"):
        raise BenchError("gcc not found: it builds tools/crelay.c")
    os.makedirs(BUILD, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", CRELAY + ".tmp", SOURCE]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise BenchError("building crelay failed:\n" + out.stderr)
    os.replace(CRELAY + ".tmp", CRELAY)
    return "built: gcc -O2 -Wall -Wextra -o tools/build/crelay tools/crelay.c"


def crelay(name, mode, cpus, **kw):
    return Proc(name, [CRELAY, mode] + [f"{k}={v}" for k, v in kw.items()], cpus)


def shown(proc, **ports):
    """A crelay command line as it ran, with port=0 replaced by the port it got."""
    words = ["crelay"] + proc.argv[1:]
    for key, port in ports.items():
        words = [f"{key}={port}" if w == f"{key}=0" else w for w in words]
    return " ".join(words)


def udpmux_argv(*args):
    return [sys.executable, "-m", "udpmux", *map(str, args)]


def udpmux_status(control):
    """The tunnel's part of `udpmux status --json --control-socket control`: the same
    request over the control socket, made in this process (no interpreter start-up)."""
    try:
        return status_request(control, {"request": "status"})["tunnels"][0]
    except Fatal as exc:
        raise BenchError(f"udpmux status: {exc}") from None


def retire(proc):
    """Stop a process we are done with and forget it."""
    proc.stop()
    if proc in STARTED:
        STARTED.remove(proc)


# -------------------------------------------------------------------------- the relays


class Relay:
    """One path: the port clients send to, and the processes whose CPU is the relay's."""

    name = "?"

    def groups(self):
        return {}

    def commands(self):
        return []

    def stop(self):
        for proc in reversed(self.procs):
            retire(proc)


class Udpmux(Relay):
    """shared: no --register, so that the exposer registers on the public socket (the
    relay then checks every datagram arriving there for being the exposer's message)."""

    name = "udpmux"

    def __init__(self, tmp, service_port, limits=(), exposer=True, tag="udpmux",
                 expose_limits=(), shared=False):
        if shared:
            self.name = "udpmux shared"
        self.key = os.path.join(tmp, "key")
        if not os.path.exists(self.key):
            subprocess.run(udpmux_argv("keygen", self.key), env=env_for_udpmux(),
                           check=True, capture_output=True)
        self.control = os.path.join(tmp, f"{tag}.sock")
        notify_path = os.path.join(tmp, f"{tag}.notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        self.port = free_port()
        self.register = self.port if shared else free_port()
        self.relay_args = ["relay", "--public", f"{LOCAL}:{self.port}",
                           *(() if shared else ("--register", f"{LOCAL}:{self.register}")),
                           "--key-file", self.key, "--control-socket", self.control, *limits]
        self.relay = Proc(f"{tag} relay", udpmux_argv(*self.relay_args), RELAY,
                          env=env_for_udpmux(notify_path), log_stderr=True)
        self.procs = [self.relay]
        end = time.monotonic() + WAIT
        try:
            while True:
                notify.settimeout(max(0.01, end - time.monotonic()))
                if "READY=1" in notify.recv(4096).decode().split("\n"):
                    break
        except socket.timeout:
            raise BenchError(f"{tag} relay: no READY=1:\n" + "\n".join(self.relay.log))
        finally:
            notify.close()
        self.worker_pid = udpmux_status(self.control)["worker_pid"]
        self.relay.pin(RELAY)
        self.expose_args = self.exposer = None
        if exposer:
            self.expose_args = ["expose", "--relay", f"{LOCAL}:{self.register}", "--service",
                                f"{LOCAL}:{service_port}", "--key-file", self.key,
                                *expose_limits]
            self.exposer = Proc(f"{tag} expose", udpmux_argv(*self.expose_args), RELAY,
                                env=env_for_udpmux(), log_stderr=True)
            self.procs.append(self.exposer)
            self.exposer.wait_log("registered with the relay")

    def groups(self):
        g = {"worker": lambda: [self.worker_pid]}
        if self.exposer:
            g["exposer"] = lambda: [self.exposer.pid]
        return g

    def commands(self):
        cmds = ["python3 -m udpmux " + " ".join(self.relay_args)]
        if self.expose_args:
            cmds.append("python3 -m udpmux " + " ".join(self.expose_args))
        return cmds

    def flows(self):
        return udpmux_status(self.control)["flows"]


class Uot(Relay):
    """UDP over TCP: client -> uot-client -> TCP -> uot-server -> service, and back."""

    name = "uot"

    def __init__(self, tmp, service_port):
        key = os.path.join(tmp, "key")
        if not os.path.exists(key):
            subprocess.run(udpmux_argv("keygen", key), env=env_for_udpmux(),
                           check=True, capture_output=True)
        tcp = free_port()
        self.port = free_port()
        self.server_args = ["uot-server", "--listen", f"{LOCAL}:{tcp}", "--target",
                            f"{LOCAL}:{service_port}", "--key-file", key]
        self.client_args = ["uot-client", "--listen", f"{LOCAL}:{self.port}", "--server",
                            f"{LOCAL}:{tcp}", "--key-file", key]
        self.server = Proc("uot-server", udpmux_argv(*self.server_args), RELAY,
                           env=env_for_udpmux(), log_stderr=True)
        self.procs = [self.server]
        self.server.wait_log("carrying UDP for")
        self.client = Proc("uot-client", udpmux_argv(*self.client_args), RELAY,
                           env=env_for_udpmux(), log_stderr=True)
        self.procs.append(self.client)
        self.client.wait_log("connected to")

    def groups(self):
        return {"relay": lambda: [self.server.pid], "exposer": lambda: [self.client.pid]}

    def commands(self):
        return ["python3 -m udpmux " + " ".join(a) for a in (self.server_args,
                                                             self.client_args)]


def c_flows(proc):
    proc.proc.send_signal(signal.SIGUSR1)
    return int(proc.expect("FLOWS", timeout=5).split()[1])


class CFused(Relay):
    name = "C"

    def __init__(self, service_port):
        self.proc = crelay("crelay fused", "fused", RELAY, public=0, service=service_port)
        self.port = int(self.proc.expect("READY").split()[1])
        self.procs = [self.proc]

    def groups(self):
        return {"relay": lambda: [self.proc.pid]}

    def commands(self):
        return [shown(self.proc, public=self.port)]


class CSplit(Relay):
    name = "C split"

    def __init__(self, service_port, exposer=True):
        self.relay = crelay("crelay relay", "relay", RELAY, public=0, register=0)
        _, port, register = self.relay.expect("READY").split()
        self.port, self.register = int(port), int(register)
        self.procs = [self.relay]
        self.exposer = None
        if exposer:
            self.exposer = crelay("crelay expose", "expose", RELAY, relay=self.register,
                                  service=service_port)
            self.procs.append(self.exposer)
            self.exposer.expect("READY")

    def groups(self):
        g = {"relay": lambda: [self.relay.pid]}
        if self.exposer:
            g["exposer"] = lambda: [self.exposer.pid]
        return g

    def commands(self):
        cmds = [shown(self.relay, public=self.port, register=self.register)]
        if self.exposer:
            cmds.append(shown(self.exposer))
        return cmds

    def flows(self):
        return c_flows(self.relay)


class Socat(Relay):
    name = "socat"

    def __init__(self, service_port):
        self.port = free_port()
        self.argv = ["socat", f"UDP4-LISTEN:{self.port},bind={LOCAL},fork,reuseaddr",
                     f"UDP4:{LOCAL}:{service_port}"]
        self.proc = Proc("socat", self.argv, RELAY)
        self.procs = [self.proc]
        # Ready when it answers (through the echo); the probe's child stays, idle.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.settimeout(0.1)
        end = time.monotonic() + WAIT
        while True:
            probe.sendto(b"probe", (LOCAL, self.port))
            try:
                if probe.recv(100) == b"probe":
                    break
            except OSError:
                if time.monotonic() > end:
                    raise BenchError("socat does not answer")
        probe.close()

    def groups(self):
        return {"relay": lambda: [self.proc.pid] + self.proc.descendants()}

    def commands(self):
        return [" ".join(self.argv)]


class Direct(Relay):
    name = "direct"
    procs = ()

    def __init__(self, service_port):
        self.port = service_port


# -------------------------------------------------------------------------- measurements


def measure(loader, relay, timeout):
    """Run a loader to its STOP line; the relay's CPU per group over START..STOP."""
    meter = Meter(relay.groups())
    try:
        loader.expect("START", timeout=WAIT + timeout)
        a = meter.snapshot()
        stop = loader.expect("STOP", timeout=WAIT + timeout)
        b = meter.snapshot()
    finally:
        retire(loader)
    seconds, cpu, other = Meter.delta(a, b)
    fields = {k: float(v) for k, v in (kv.split("=") for kv in stop.split()[1:])}
    fields["measured"] = seconds
    return fields, cpu, other


def throughput(relay, size, seconds, warmup):
    loader = crelay(f"load via {relay.name}", "load", TRAFFIC, port=relay.port, flows=FLOWS,
                    size=size, window=WINDOW, warmup=warmup, seconds=seconds,
                    count=int(5e6 * seconds))
    stop, cpu, other = measure(loader, relay, warmup + seconds)
    n = stop["received"]
    return {"rate": n / stop["seconds"], "lost": stop["lost"], "sent": stop["sent"],
            "other": other, "cpu": {k: v / n * 1e6 if n else NAN for k, v in cpu.items()}}


def latency(relay, seconds, warmup, size=LATENCY_SIZE):
    loader = crelay(f"latency via {relay.name}", "latency", TRAFFIC, port=relay.port,
                    flows=FLOWS, size=size, rate=LATENCY_RATE, warmup=warmup,
                    seconds=seconds)
    stop, cpu, other = measure(loader, relay, warmup + seconds)
    stop["other"] = other
    stop["busy"] = sum(cpu.values()) / stop["measured"] if cpu else None
    return stop


def sink_count(sink):
    """A sink's datagram count, once it has stopped growing (what was in flight landed)."""
    last = None
    for _ in range(40):
        sink.proc.send_signal(signal.SIGUSR1)
        count = int(sink.expect("COUNT", timeout=5).split()[1])
        if count == last:
            return count
        last = count
        time.sleep(0.02)
    return last


def establish(relay, flows, rate, passes=3):
    """Make the relay hold flows 0..flows-1 before measuring: one datagram from each, paced
    at `rate`, repeated (at most `passes` times) until its table has them all."""
    have = 0
    for _ in range(passes):
        loader = crelay(f"setup {relay.name}", "raw", TRAFFIC, port=relay.port, flows=flows,
                        size=FLOW_SIZE, rate=rate, warmup=0, seconds=flows / rate + 5,
                        count=flows)
        try:
            loader.expect("STOP", timeout=WAIT + flows / rate)
        finally:
            retire(loader)
        time.sleep(0.1)                 # the relay works through its queue
        have = relay.flows()
        if have >= flows:
            break
    return have


def one_way(relay, sink, flows, rate, seconds, warmup):
    """Figure 4: paced one-way load from `flows` raw-socket sources; CPU per datagram."""
    before = sink_count(sink)
    loader = crelay(f"raw via {relay.name}", "raw", TRAFFIC, port=relay.port, flows=flows,
                    size=FLOW_SIZE, rate=rate, warmup=warmup, seconds=seconds)
    stop, cpu, other = measure(loader, relay, warmup + seconds)
    delivered = (sink_count(sink) - before) / max(1.0, stop["total"])
    n = stop["sent"]
    return {"cpu": {k: v / n * 1e6 for k, v in cpu.items()}, "delivered": delivered,
            "other": other, "rate": n / stop["seconds"]}


def best_one_way(opts, relay, sink, flows, rate):
    """one_way() --rounds4 times in a row; the run with the least CPU per datagram."""
    runs = [one_way(relay, sink, flows, rate, opts.seconds4, opts.warmup)
            for _ in range(opts.rounds4)]
    return min(runs, key=lambda r: sum(r["cpu"].values()))


def standin_exposer(relay):
    """Register with a udpmux relay as its exposer (the real handshake); the socket."""
    key = read_key(relay.key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.bind((LOCAL, 0))
    sock.connect((LOCAL, relay.register))
    sock.settimeout(0.5)
    initiator = Initiator(key, wire.ROLE_EXPOSE)
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        sock.send(initiator.hello())
        try:
            session = initiator.welcome(sock.recv(70000))
            # The first authenticated message confirms the session at the relay.
            sock.send(session.seal(wire.T_KEEPALIVE, 0,
                                   wire.KEEPALIVE.pack(wire.KEEPALIVE_REPLY, 1, 0)))
            reply = sock.recv(70000)
        except (socket.timeout, Drop, wire.Malformed):
            continue
        if wire.parse_header(reply, True)[0] == wire.T_KEEPALIVE:
            return sock
    raise BenchError("the stand-in exposer could not register with the relay")


# -------------------------------------------------------------------------- report

NAN = float("nan")


def fmt(x, digits=2):
    if x is None or x != x:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def pct(x):
    return f"{100 * x:.0f}%"


def ratio(x, base):
    if x is None or base is None or x != x or base != base or not base:
        return "-"
    return f"{x / base:.2f}"


def table(title, header, rows, notes=()):
    print(title)
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for note in notes:
        print("  " + note)
    print()


def verdict(ok):
    return "MET" if ok else "NOT MET"


# -------------------------------------------------------------------------- figures


def figures_1_to_3(opts, tmp, results):
    echo = crelay("echo", "echo", TRAFFIC, port=0)
    echo_port = int(echo.expect("READY").split()[1])
    fig_1_2 = "1" in opts.figures or "2" in opts.figures
    paths = []
    shared = None                       # the shared-socket udpmux path: figures 1-2 only
    try:
        paths.append(Udpmux(tmp, echo_port))
        if fig_1_2:
            shared = Udpmux(tmp, echo_port, tag="udpmux-shared", shared=True)
            paths.append(shared)
        paths += [Uot(tmp, echo_port), CFused(echo_port), CSplit(echo_port)]
        if opts.socat:
            paths.append(Socat(echo_port))
        paths.append(Direct(echo_port))
        width = max(9, max(len(p.name) for p in paths))
        print("Commands (figures 1-3):")
        print(f"  {'echo':{width}} {shown(echo, port=echo_port)}")
        for p in paths:
            for c in p.commands():
                print(f"  {p.name:{width}} {c}" + ("  (figures 1-2 only)" if p is shared
                                                    else ""))
        print(f"  {'fig. 1-2':{width}} crelay load port=P flows={FLOWS} size=S window={WINDOW} "
              f"warmup={opts.warmup:g} seconds={opts.seconds:g} count={int(5e6 * opts.seconds)}")
        print(f"  {'fig. 3':{width}} crelay latency port=P flows={FLOWS} size=S "
              f"rate={LATENCY_RATE} warmup={opts.warmup:g} seconds={opts.lat_seconds:g}")
        print()
        runs = {}
        if fig_1_2:
            for _ in range(opts.rounds):
                for size in SIZES:
                    for p in paths:
                        runs.setdefault((p.name, size), []).append(
                            throughput(p, size, opts.seconds, opts.warmup))
            report_1_2(opts, paths, runs, results)
        if shared is not None:
            shared.stop()               # not part of figure 3: it leaves the relay core
            paths.remove(shared)
        if "3" in opts.figures:
            for size in SIZES:
                lat = {p.name: latency(p, opts.lat_seconds, opts.warmup, size) for p in paths}
                report_3(opts, paths, lat, results, size)
    finally:
        for p in reversed(paths):
            p.stop()
        retire(echo)


def report_1_2(opts, paths, runs, results):
    def best_rate(name, size):
        return max(runs[(name, size)], key=lambda r: r["rate"])

    def best_cpu(name, size):
        return min(runs[(name, size)], key=lambda r: sum(r["cpu"].values()))

    rows = []
    for p in paths:
        row = [p.name]
        for size in SIZES:
            b = best_rate(p.name, size)
            bound = (not isinstance(p, Direct)
                     and b["rate"] >= 0.9 * best_rate("direct", size)["rate"])
            row += [fmt(b["rate"]) + (" *" if bound else ""),
                    ratio(b["rate"], best_rate("C", size)["rate"]),
                    f"{b['lost'] / max(1, b['sent']):.1%}"]
        row.append(pct(max(r["other"] for s in SIZES for r in runs[(p.name, s)])))
        rows.append(row)
    table(f"Figure 1: round trips per second (closed loop, {FLOWS} flows, window {WINDOW}, "
          f"{opts.seconds:g} s each, best of {opts.rounds})",
          ["path", "64 B", "x C", "lost", "1200 B", "x C", "lost", "other CPU"], rows,
          ["x C: the path's rate / the C relay's (higher is better).  The relay side has one "
           "CPU, the traffic side the other.",
           "* within 10% of direct: the traffic side, not the relay, set this rate (a lower "
           "bound; figure 2 still compares).",
           "lost: datagrams of the window never answered (declared lost after 50 ms).",
           "other CPU: used by processes this benchmark did not start (worst run), % of "
           "one CPU."])
    rows = []
    for size in SIZES:
        base = sum(best_cpu("C", size)["cpu"].values())
        for p in paths:
            if isinstance(p, Direct):
                continue
            parts = best_cpu(p.name, size)["cpu"]
            total = sum(parts.values())
            first = parts.get("worker", parts.get("relay"))
            rows.append([p.name, f"{size} B", fmt(first) if len(parts) > 1 else "",
                         fmt(parts.get("exposer")) if len(parts) > 1 else "", fmt(total),
                         ratio(total, base)])
            results.setdefault("cpu", {})[(p.name, size)] = total
            if first is not None and len(parts) > 1:
                results.setdefault("cpu_relay", {})[(p.name, size)] = first
    table(f"Figure 2: relay CPU-seconds per million round trips (= CPU us per round trip, "
          f"each crossing the relay twice; lowest of {opts.rounds})",
          ["path", "size", "relay/worker", "exposer", "total", "x C"], rows,
          ["udpmux: relay worker + udpmux expose (the idle master not counted); udpmux "
           "shared: the same, the exposer registered on the public socket;",
           "uot: uot-server + uot-client; C split: crelay relay + crelay expose;",
           "socat: the parent and every child.  x C: total / the C relay's total (lower is "
           "better)."])


def report_3(opts, paths, lat, results, size):
    d = lat["direct"]
    c_add99 = lat["C"]["p99"] - d["p99"]
    rows = []
    for p in paths:
        s = lat[p.name]
        direct = isinstance(p, Direct)
        add50 = None if direct else s["p50"] - d["p50"]
        add99 = None if direct else s["p99"] - d["p99"]
        rows.append([p.name, fmt(s["p50"], 1), fmt(s["p90"], 1), fmt(s["p99"], 1),
                     fmt(s["p999"], 1), fmt(s["max"], 0), fmt(add50, 1), fmt(add99, 1),
                     "-" if direct else ratio(add99, c_add99),
                     "-" if direct else pct(s["busy"]),
                     f"{int(s['sent'] - s['received'])}/{int(s['sent'])}", pct(s["other"])])
        if size == LATENCY_SIZE:
            results.setdefault("latency", {})[p.name] = (add50, add99)
    table(f"Figure 3{'ab'[SIZES.index(size)]}: round-trip latency, us, at {LATENCY_RATE:,} "
          f"datagrams/s paced ({FLOWS} flows, {size} B, {opts.lat_seconds:g} s)",
          ["path", "p50", "p90", "p99", "p99.9", "max", "+p50", "+p99", "x C", "relay CPU",
           "lost/sent", "other CPU"], rows,
          ["+p50, +p99: what the path adds to direct's percentile; x C: +p99 / the C relay's "
           "+p99 (lower is better);",
           "relay CPU: how busy the relay's processes were at this rate, % of one CPU."])


def figure_4(opts, tmp, results):
    counts, rate, setup = opts.counts, opts.flow_rate, opts.setup_rate
    pair_counts = [n for n in counts if n <= PAIR_MAX_FLOWS]
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError as exc:
        print(f"Figure 4 skipped: no raw socket ({exc.strerror}; it needs CAP_NET_RAW)\n")
        return
    res = {}
    commands = []
    # 4a: the relay halves, each into a sink.
    um = Udpmux(tmp, 9, limits=HIGH_LIMITS, exposer=False, tag="udpmux-4a")
    cr = sink_u = sink_c = None
    try:
        standin = standin_exposer(um)
        fd = standin.fileno()
        sink_u = Proc("sink (stand-in exposer)", [CRELAY, "sink", f"fd={fd}"], TRAFFIC,
                      pass_fds=(fd,))
        sink_u.expect("READY")
        standin.close()
        cr = CSplit(0, exposer=False)
        sink_c = crelay("sink (C relay)", "sink", TRAFFIC, port=0, hello=cr.register)
        sink_c.expect("READY")
        time.sleep(0.05)                # its HELLO reaches the relay
        commands += um.commands() + ["(stand-in exposer: this script's handshake, then "
                                     "crelay sink fd=N on that socket)"]
        commands += cr.commands() + [shown(sink_c)]
        for n in counts:
            for key, relay, sink in (("udpmux", um, sink_u), ("C", cr, sink_c)):
                have = establish(relay, n, setup if key == "udpmux" else C_SETUP_RATE)
                res[("a", key, n)] = best_one_way(opts, relay, sink, n, rate)
                res[("a", key, n)]["flows"] = have
    finally:
        for proc in (sink_u, sink_c):
            if proc:
                retire(proc)
        for relay in (cr, um):
            if relay:
                relay.stop()
    # 4b: whole tunnels, one-way into a sink standing for the service.
    service_u = crelay("service sink (udpmux)", "sink", TRAFFIC, port=0)
    service_c = crelay("service sink (C split)", "sink", TRAFFIC, port=0)
    su = int(service_u.expect("READY").split()[1])
    sc = int(service_c.expect("READY").split()[1])
    um = cs = None
    try:
        um = Udpmux(tmp, su, limits=HIGH_LIMITS, tag="udpmux-4b",
                    expose_limits=("--max-flows", "200000"))
        cs = CSplit(sc)
        commands += [shown(service_u, port=su)] + um.commands()
        commands += [shown(service_c, port=sc)] + cs.commands()
        for n in pair_counts:
            for key, relay, sink in (("udpmux", um, service_u), ("C", cs, service_c)):
                have = establish(relay, n, setup if key == "udpmux" else C_SETUP_RATE)
                res[("b", key, n)] = best_one_way(opts, relay, sink, n, rate)
                res[("b", key, n)]["flows"] = have
    finally:
        for relay in (cs, um):
            if relay:
                relay.stop()
        retire(service_u)
        retire(service_c)
    commands.append(f"setup:   crelay raw port=P flows=N size={FLOW_SIZE} rate={setup} "
                    f"(C: {C_SETUP_RATE}) warmup=0 count=N  (until the relay holds N flows, "
                    f"at most 3 times)")
    commands.append(f"measure: crelay raw port=P flows=N size={FLOW_SIZE} rate={rate} "
                    f"warmup={opts.warmup:g} seconds={opts.seconds4:g}")
    print(f"Figure 4: CPU us per datagram by concurrent flows (one-way, {FLOW_SIZE} B, "
          f"paced at {rate:,}/s, raw-socket clients, {opts.seconds4:g} s each, best of "
          f"{opts.rounds4} in a row)")
    print("Commands:")
    for c in commands:
        print("  " + c)
    print()

    def ok(r, n):
        return "" if r["flows"] >= n and r["delivered"] >= 0.99 else " !"

    rows = []
    u1 = res[("a", "udpmux", counts[0])]["cpu"]["worker"]
    c1 = res[("a", "C", counts[0])]["cpu"]["relay"]
    for n in counts:
        u, c = res[("a", "udpmux", n)], res[("a", "C", n)]
        uw, cw = u["cpu"]["worker"], c["cpu"]["relay"]
        rows.append([f"{n:,}", fmt(uw) + ok(u, n), fmt(cw) + ok(c, n), ratio(uw, cw),
                     ratio(uw, u1), ratio(cw, c1), f"{u['flows']:,}/{c['flows']:,}",
                     f"{100 * u['delivered']:.1f}/{100 * c['delivered']:.1f}",
                     pct(max(u["other"], c["other"]))])
    results["flows_a"] = {n: res[("a", "udpmux", n)]["cpu"]["worker"] for n in counts}
    table("Figure 4a: relay half, client -> relay -> sink (udpmux worker with a stand-in "
          "exposer; crelay relay)",
          ["flows", "udpmux worker", "C relay", "x C", "udpmux vs 1", "C vs 1",
           "flows held", "delivered %", "other CPU"], rows,
          ["flows held: udpmux/C, in the relay's table before the measurement; delivered: "
           "% of the datagrams sent that reached the sink;",
           "! marks a figure whose run had flows missing or lost datagrams."])
    rows = []
    ub1 = sum(res[("b", "udpmux", pair_counts[0])]["cpu"].values())
    cb1 = sum(res[("b", "C", pair_counts[0])]["cpu"].values())
    for n in pair_counts:
        u, c = res[("b", "udpmux", n)], res[("b", "C", n)]
        ut, ct = sum(u["cpu"].values()), sum(c["cpu"].values())
        rows.append([f"{n:,}", fmt(u["cpu"]["worker"]), fmt(u["cpu"]["exposer"]),
                     fmt(ut) + ok(u, n), fmt(c["cpu"]["relay"]), fmt(c["cpu"]["exposer"]),
                     fmt(ct) + ok(c, n), ratio(ut, ct), ratio(ut, ub1), ratio(ct, cb1),
                     f"{100 * u['delivered']:.1f}/{100 * c['delivered']:.1f}",
                     pct(max(u["other"], c["other"]))])
    results["flows_b"] = {n: sum(res[("b", "udpmux", n)]["cpu"].values()) for n in pair_counts}
    results["ratio_b"] = {n: results["flows_b"][n] / sum(res[("b", "C", n)]["cpu"].values())
                          for n in pair_counts}
    table("Figure 4b: whole tunnel, client -> relay -> exposer -> sink (udpmux worker + "
          "expose; crelay relay + expose)",
          ["flows", "worker", "exposer", "udpmux", "C relay", "C expose", "C", "x C",
           "udpmux vs 1", "C vs 1", "delivered %", "other CPU"], rows,
          [f"Not run above {PAIR_MAX_FLOWS:,} flows: an exposer holds one socket per flow "
           f"(see the docstring: descriptor limit, ephemeral ports)."])


def report_targets(results):
    print("Targets")
    cpu = results.get("cpu", {})
    relay_cpu = results.get("cpu_relay", {})
    for size in SIZES:
        if ("udpmux", size) not in cpu:
            break
        c = cpu[("C", size)]
        # Two readings: the relay daemon alone (udpmux's worker: what runs on the public
        # host) against the C relay, and the whole tunnel (worker + exposer) against it.
        for what, u in (("relay (worker)", relay_cpu.get(("udpmux", size))),
                        ("whole tunnel (worker + exposer)", cpu[("udpmux", size)])):
            if u is None:
                continue
            line = (f"  {what} CPU per round trip at most 3 x the C relay's, {size} B: "
                    f"{u / c:.2f} x  {verdict(u <= 3 * c)}")
            if ("socat", size) in cpu:
                s = cpu[("socat", size)]
                line += f";  below socat's: {u:.1f} vs {s:.1f} us  {verdict(u < s)}"
            print(line)
    shared = [size for size in SIZES if ("udpmux shared", size) in cpu]
    if shared:
        print("    for comparison, one socket for clients and the exposer (udpmux shared), "
              "whole tunnel / relay worker against the C relay: "
              + ", ".join(f"{size} B {cpu[('udpmux shared', size)] / cpu[('C', size)]:.2f} x"
                          f" / {relay_cpu[('udpmux shared', size)] / cpu[('C', size)]:.2f} x"
                          for size in shared))
    if "flows_a" in results:
        a = results["flows_a"]
        first, last = min(a), max(a)
        print(f"  cost at {last:,} flows within 20% of 1 flow (relay worker, fig. 4a): "
              f"{a[last] / a[first]:.2f} x  {verdict(a[last] <= 1.2 * a[first])}")
        b = results["flows_b"]
        print(f"    whole tunnel (fig. 4b), {max(b):,} flows vs 1: {b[max(b)] / b[min(b)]:.2f} x;"
              f" {last:,} flows do not fit in one exposer on this machine")
        rb = results["ratio_b"]
        print("    for comparison, the C-ratio with interleaved flows (fig. 4b, one-way): "
              + ", ".join(f"{n:,} flow{'s' if n != 1 else ''} {rb[n]:.2f} x"
                          for n in sorted(rb)))
    if "latency" in results:
        add99 = results["latency"]["udpmux"][1]
        print(f"  added p99 latency under 1 ms at {LATENCY_RATE:,} datagrams/s: "
              f"{add99:.0f} us  {verdict(add99 < 1000)}")
    print()


# -------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(
        description="udpmux relay + expose against a C relay, socat and no relay, on "
                    "loopback (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="about 40 s instead of 3 min")
    parser.add_argument("--seconds", type=float, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, help="rounds of figures 1-2 (the best shown)")
    parser.add_argument("--figures", default="1234", help="which figures [default: 1234]")
    parser.add_argument("--rounds4", type=int,
                        help="runs per flow count in figure 4, the best shown [default: 2, "
                             "--quick: 1]")
    parser.add_argument("--flow-rate", type=int, default=FLOW_RATE,
                        help=f"datagrams/s of figure 4 [default: {FLOW_RATE}]")
    parser.add_argument("--setup-rate", type=int, default=SETUP_RATE,
                        help=f"new flows/s while figure 4 sets up [default: {SETUP_RATE}]")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for other processes to go quiet first")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of everything started, e.g. -20 on a busy machine "
                             "[default: 0]")
    parser.add_argument("--no-socat", action="store_true", help="leave socat out")
    opts = parser.parse_args()
    global NICE
    NICE = opts.nice
    if NICE:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    opts.seconds = opts.seconds or (QUICK_SECONDS if opts.quick else SECONDS)
    opts.rounds = opts.rounds or (1 if opts.quick else 2)
    opts.rounds4 = opts.rounds4 or (1 if opts.quick else 2)
    opts.seconds4 = opts.seconds if opts.quick else min(opts.seconds, FIG4_SECONDS)
    opts.warmup = 0.2 if opts.quick else 0.5
    opts.lat_seconds = opts.seconds if opts.quick else 2 * opts.seconds
    opts.counts = QUICK_FLOW_COUNTS if opts.quick else FLOW_COUNTS
    opts.socat = bool(shutil.which("socat")) and not opts.no_socat
    os.sched_setaffinity(0, TRAFFIC)
    began = time.monotonic()
    command = " ".join(shlex.quote(a) for a in ["python3"] + sys.argv)

    built = build()
    print("udpmux relay benchmark,", time.strftime("%Y-%m-%d %H:%M:%S"))
    print("command:", command, f"(in {os.getcwd()})")
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    u = os.uname()
    print(f"host: {os.cpu_count()} CPUs ({model}), {u.sysname} {u.release}, Python "
          f"{sys.version.split()[0]}, psutil {psutil.__version__}")
    if opts.socat:
        v = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
        print("socat:", next((l for l in v.splitlines() if l.startswith("socat version")), "?"))
    else:
        print("socat: not installed (apt-get install socat) or left out; its rows are missing")
    print(f"crelay: tools/build/crelay ({built})")
    print(f"pinning: CPU {','.join(map(str, sorted(TRAFFIC)))} runs the traffic side (loaders, "
          f"echo, sinks, this script); CPU {','.join(map(str, sorted(RELAY)))} the relay side "
          f"(udpmux master + worker + exposer; crelay; socat and its children)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ports = "-".join(f.read().split())
    if NICE:
        print(f"niceness: {NICE} for every process started and for this script")
    print(f"limits: RLIMIT_NOFILE soft {soft:,} hard {hard:,}; ephemeral ports {ports}")
    busy = other_cpu()
    end = time.monotonic() + opts.wait_idle
    while busy > 0.15 and time.monotonic() < end:
        busy = other_cpu(1.0)
    print(f"other processes' CPU before starting: {pct(busy)} of one CPU"
          + ("  (WARNING: the machine is busy; rates and latencies will suffer)"
             if busy > 0.15 else ""))
    print()

    results = {}
    steal0 = psutil.cpu_times()
    tmp = tempfile.mkdtemp(prefix="bench-relay-")
    try:
        if set("123") & set(opts.figures):
            figures_1_to_3(opts, tmp, results)
        if "4" in opts.figures:
            figure_4(opts, tmp, results)
        report_targets(results)
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    steal1 = psutil.cpu_times()
    total = sum(steal1) - sum(steal0)
    stolen = getattr(steal1, "steal", 0.0) - getattr(steal0, "steal", 0.0)
    print(f"total {time.monotonic() - began:.0f} s; CPU time stolen by the hypervisor meanwhile:"
          f" {100 * stolen / total if total else 0:.1f}%; command: {command}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except BenchError as exc:
        stop_all()
        sys.exit(f"bench_relay: {exc}")
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
