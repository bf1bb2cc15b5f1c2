#!/usr/bin/env python3
"""How fast is `udpmux link` over a long, lossy path, next to TCP and ssh on the same path?

    sudo python3 tools/bench_link.py [--rtt 0,50,200] [--loss 0,1,5,10] [--megabytes 20]
                                     [--tools link,cubic,bbr,ssh] [--repeat 1]
                                     [--directions up,down] [--timeout 30] [--no-tcp]
                                     [--ssh-cc cubic] [--json PATH] [--svg PATH]
                                     [--scenarios roam,blackout,keys] [--no-matrix]
                                     [--scenario-rtt 50] [--roams 3]
                                     [--blackout-megabytes 40] [--blackout-seconds 20]
                                     [--keys-loss 0,1] [--keys-seconds 15]
                                     [--before TREE]

A benchmark, not a test: run it by hand, as root, on an otherwise idle machine; it is the
figure link's performance work is judged by.  It builds the network lab of tests/lab.py
and, for every cell of the matrix --rtt (round trip, ms) x --loss (percent), moves
--megabytes MB (MB = 2**20 bytes) up and down with every tool of --tools:

    link      `udpmux link --listen-tcp`: one TCP connection through the link per transfer
    cubic     one plain TCP connection, congestion control cubic
    bbr       one plain TCP connection, congestion control BBR
    ssh       a real OpenSSH: `ssh root@public cat FILE` (down) or `cat > FILE` (up)
    ssh-link  the same ssh with `udpmux link` as its ProxyCommand (not in the default set)
    before    `udpmux link` as link runs it, from the source tree --before names (a git
              worktree of an older commit, say), both ends: the figures before a change,
              measured in the same run (not in the default set)

Within a cell the tools run one after the other (link, then cubic, then bbr, ...), and
--repeat N runs the whole row of tools N times before the next cell, so that a slow
minute of the machine hits every tool alike; the summary reports the median.  The cells
run rtt by rtt, loss by loss, in the order given.

Output, in this order: the exact command line, the machine, kernel, Python, OpenSSH,
udpmux version and commit (and whether udpmux/ holds uncommitted changes: the working
tree is what runs), the lab's TCP settings; one "measured:" line as each transfer ends;
then one row per transfer (below), a summary table per direction (one row per (rtt,
loss), one column of MB/s per tool, "timeout" where the median transfer did not finish
within --timeout, "failed" where it ended otherwise without the exact bytes, and
link/bbr: the link's MB/s over BBR's), the project's targets, and notes (each session's
setup and exit, the delay line's counters, log lines of note).  --json PATH writes every
transfer and the summary as JSON; --svg PATH draws MB/s against loss, one line per tool,
one panel per RTT and direction (a hand-written SVG: no plotting library needed).  The
run exits 1 if any transfer failed (ended, other than by timing out, without the exact
bytes); timeouts are results, not failures.

Time: a cell takes roughly (tools x directions x repeat) transfers, each at most
--timeout, plus each ssh master's setup and up to 6 s per link session for its last
engine-stats line; where TCP cannot finish (cubic, and ssh over it, at 50 ms or more with
1 % loss or more) it is the timeouts that add up.  `--megabytes 20 --rtt 0,50,200 --loss
0,1,5 --timeout 40` took 16 minutes on a 2-core machine, 11 of them in timeouts.

The project's targets (checked on the link rows at rtt 0, the path they were set on):

    at 5 % loss, 20 MB in under 11 s         (each direction measured)
    on a clean path, at least 25 MB/s        (each direction measured)

Scenarios (--scenarios, a comma list; none by default; they run after the matrix, in the
lab and with the processes the matrix uses; --no-matrix runs them alone), each at
--scenario-rtt (50 ms) round trip, each bounded by timeouts, each printing a "measured:"
line or two as it ends and a line under "scenarios" at the end (and in --json, under
"scenarios"):

  roam      A terminal-like session: one TCP connection through `udpmux link --listen-tcp`
            to the target, which sends a line "<seq> <CLOCK_MONOTONIC>" every 100 ms (the
            "TICK n id" request).  3 s in, and every 5 s after (--roams times, 3 by
            default), `lab.roam("out")`: nat_out takes a fresh WAN address and flushes its
            conntrack, so the client's mapping changes under the session.  The gap of a
            roam is the seconds from just before the roam call began until the first line
            the target stamped after that moment arrived (the namespaces share one
            monotonic clock; a line merely in flight does not count); "longest silence" is
            the longest time between two lines' arrivals near it; the lines' usual spacing
            and delay are printed beside.  Target: max gap <= 1 s + 1 RTT.
  blackout  One link session, two downloads of --blackout-megabytes (40 MB; the matrix's
            GET): a clean one, then one during which wan drops all UDP
            (`lab.block_udp(True)`) for --blackout-seconds (20 s) from the moment a quarter
            of it has arrived.  Reported: both times, the blackout as measured, how long
            after it the next bytes arrived, and the cost beyond the blackout = with -
            clean - the blackout's nominal length.  (Data the sockets and the link had
            buffered keep arriving during the blackout, so the cost can be slightly
            negative.)  Target: cost <= 2 s.
  keys      Keystrokes behind a bulk download in the same ssh session: the real ssh
            client on outside, `udpmux link` as its ProxyCommand (as the ssh-link tool),
            to the sshd on public, running KEYS_REMOTE (a python3 -c script) for
            --keys-seconds (15 s): it writes bulk '.' bytes to stdout as fast as ssh takes
            them and echoes every byte read from stdin at once as "#<byte>", ahead of any
            bulk not yet written.  From 1 s after its first output until 1 s before its
            end the bench writes one byte every 50-100 ms (uniformly random) to ssh's stdin
            and times each until its echo is read from ssh's stdout (the echoes come back
            in order).  One session per --keys-loss value (0 and 1 %, UDP and TCP alike).
            Reported: count, p50, p99, max of the echo times, and the bulk's MB/s (bytes
            read / --keys-seconds).  Target: p99 <= RTT + 100 ms.

The path (tests/lab.py; read its docstring)::

    outside 10.22.0.2 -- nat_out (masquerade) -- wan (delay, loss) -- public 203.0.113.10

  link  bench (in outside) -> TCP 127.0.0.1:47100 -> `udpmux link --listen-tcp` (outside)
        ==UDP through nat_out and wan==> `udpmux link-server` (public) -> TCP 127.0.0.1:5001
        -> the target (public).  Only the UDP leg crosses the wan.
  TCP   bench (in outside) -> TCP 203.0.113.10:5001 through nat_out and wan -> the target.
  ssh   ssh (outside) -> TCP 203.0.113.10:2222 -> sshd (public) -> cat.
  ssh-link  ssh (outside) -> ProxyCommand `udpmux link` ==UDP==> link-server (public)
        -> TCP 127.0.0.1:2222 -> sshd -> cat; link's own bootstrap is a real ssh too.

Delay and loss, the same for every tool: `lab.set_delay(rtt / 2)` makes wan hold every
packet it forwards rtt/2 ms (tools/nfdelay, an NFQUEUE delay line: each packet crosses wan
once each way, so a round trip takes rtt; rtt 0 runs no delay line), and
`lab.set_loss(p, protocols=("udp", "tcp"))` drops p % of UDP datagrams and of TCP
segments alike (each packet in either direction, independently; delayed first, then
perhaps dropped).  The delay line is a user-space program on this machine's cores: what
it costs in CPU every tool pays alike, and its counters (overruns: packets the kernel
dropped because the line was full) are in the notes.  Each host's TCP metrics cache is off
(net.ipv4.tcp_no_metrics_save=1), so a lossy row leaves no ssthresh behind for the next.
The lab's TCP buffers are the host's (tcp_rmem, tcp_wmem are printed); they bound what
TCP can keep in flight at a long RTT.

Congestion control: the cubic and bbr rows set TCP_CONGESTION on the sending socket (for
"up" the bench's, for "down" the target's: the request line names it) and the sender
checks that it took (a row fails otherwise).  ssh cannot be asked, so outside's and
public's default routes carry `congctl --ssh-cc` (cubic by default, as on a stock Linux),
which every TCP connection made or accepted on them starts with; the routes are printed.
(The namespaces' own default, net.ipv4.tcp_congestion_control, is the host's and can only
be set to an algorithm in net.ipv4.tcp_allowed_congestion_control, a host-wide setting
this script leaves alone.)

Starting the link's server end: `udpmux link` starts `udpmux link-server` itself through
--ssh-command, as it would with ssh.  No sshd is used for the link rows: the "ssh" is this
script in its `_ssh` role, run in the public host's namespace (`ip netns exec <public>
python3 tools/bench_link.py _ssh --client ADDR DEST COMMAND`).  Like tests/fakessh.py it
runs COMMAND through /bin/sh, but it sets SSH_CONNECTION as sshd on the public host would
(the client's address as public sees it, nat_out's WAN address, and the public host's own
address), so link-server reports 203.0.113.10, the address the client must use through
the lab, and not fakessh's 127.0.0.1.  The bootstrap therefore crosses no network (and is
not measured): what is measured is the link's UDP carriage, not ssh's encryption.

The ssh rows use a real sshd (OpenSSH, /usr/sbin/sshd) started on public, port 2222, with
a host key and an authorized key made for this run in a temporary directory (removed at
the end), and the ssh client from outside with -F /dev/null (no user configuration).  Each
ssh transfer first opens a master connection (ControlMaster, untimed: key exchange and
authentication, like the link's session setup), then times one `ssh -S CONTROL root@public
COMMAND` over it (opening the channel included, as opening the stream is for the link and
the handshake for TCP), then closes the master.  So every ssh transfer has a TCP
connection of its own, as the cubic and bbr rows do.  "down" reads a file of the payload
from the temporary directory; "up" writes one there, compared by sha256 afterwards.

The target (this script in its `_target` role, on public, port 5001) is a TCP sink and
source: a connection starts with a line, "PUT <id> [<cc>]" (the target reads to EOF, then
answers "<bytes> <sha256>"), "GET <n> <id> [<cc>]" (the target sets congestion control
<cc> on its socket, sends n bytes, then closes its side) or "TICK <n> <id>" (n lines
"<seq> <CLOCK_MONOTONIC>\n", 100 ms apart, then it closes its side); it reports each finished
connection, by id, on its standard output.  The data are random.Random(seed).randbytes(n)
on both sides, so the bench knows their sha256 without trusting the target; "exact" means
the byte count and the sha256 match.

One row per transfer.  "up" is outside -> public (the bench sends, the target counts), "down"
is public -> outside.  Seconds run from before connect() (or before starting the ssh
command) until the target's answer ("up"), EOF after the last byte ("down"), or ssh's
exit, so they include opening the stream (the link), the TCP handshake, or the ssh
channel.  For each cell (and repeat) one `udpmux link` session carries both directions one
after the other (its setup, before the first connection, is not counted); it is then
stopped with SIGTERM and must exit with status 0, and its link-server must be gone within
3 s (else it is reported and stopped by PID).  Every transfer is bounded by --timeout
(seconds) and stops itself: the socket is closed or the ssh client stopped by PID.  A row
that does not finish says "timed out" (with the bytes moved) and, when py-spy is installed,
the stacks of both link processes are printed under the table.

Columns: "1st byte" is the seconds from the start until the first payload byte reached the
receiver (the target's own CLOCK_MONOTONIC stamp for "up", the bench's for "down"; "-" for
ssh up): where a row is slow, it tells opening the stream from moving the bytes.
"link/bbr" is the link's MB/s over BBR's for the same cell, direction and repeat.
"retrans" is the sender's retransmissions: for TCP, tcpi_total_retrans of the sending socket
(TCP_INFO); for the link, the "lost" figure of the sending end's last `--debug` engine-stats
line ("rtt .. cwnd .. lost ..", logged every 5 s; cumulative over the session; the bench waits
up to 6 s for a line logged after the transfers), or "n/a" when that line has no number;
"-" for ssh.  "dropped" is the wan's loss counter over the row (packets dropped, both
directions).  "CPU s" is user+system CPU seconds used during the row by the link client +
link-server (psutil), or for ssh by the ssh master and everything it started and the
session's processes on public; it shows when an end is CPU-bound (here each end has one
core at best: this machine's cores are shared by both ends, the delay line, the bench and
the target).  The link always runs with --debug: its log is how the bench knows that the
session is up (both ends' "session up" lines) and reads the engine's figures.

Every process started here is stopped by PID (Popen.send_signal, or tests/lab.py's
pidfd-based kill_pids); the lab is always torn down (try/finally; it also removes anything
left in its namespaces), and so is the temporary directory.  Only the standard library and
psutil are used, plus OpenSSH for the ssh rows.
"""

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from xml.sax.saxutils import escape

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# tests/ goes first even if it is already on the path: this script's own directory (tools/)
# is sys.path[0], and `import lab` there would find tools/lab.py (the lab's command line).
sys.path.insert(0, os.path.join(ROOT, "tests"))

import lab as lablib     # noqa: E402

MB = 1 << 20
SEED = 20240601
TARGET_PORT = 5001
SSH_PORT = 2222
LISTEN_PORT = 47100             # the link's --listen-tcp, on outside's loopback
BIND = "47000-47099"            # link-server's UDP ports
CHUNK = 256 * 1024
SETUP_TIMEOUT = 20.0            # seconds for a link session to come up
SSH_SETUP_TIMEOUT = 30.0        # seconds for an ssh master (key exchange, auth) to come up
EXIT_TIMEOUT = 15.0             # seconds for `udpmux link` to exit after SIGTERM
SERVER_GONE = 3.0               # seconds for link-server (or sshd's session) to exit after
STATS_WAIT = 6.0                # seconds to wait for a fresh engine-stats line
TARGET_IDLE = 120.0             # the target gives up on a silent connection
TCP_INFO_RETRANS = struct.Struct("I")   # tcpi_total_retrans: a u32 at byte 100 of tcp_info
TCP_INFO_RETRANS_AT = 100
TCP_CA_NAME_MAX = 16

TOOLS = ("link", "before", "cubic", "bbr", "ssh", "ssh-link")
DEFAULT_TOOLS = "link,cubic,bbr,ssh"
TCP_TOOLS = ("cubic", "bbr")    # tool name = congestion control name
SSH_TOOLS = ("ssh", "ssh-link")
COLOURS = {"link": "#d62728", "cubic": "#1f77b4", "bbr": "#2ca02c", "ssh": "#9467bd",
           "ssh-link": "#ff7f0e", "before": "#7f7f7f"}

TARGETS = (("5 % loss: 20 MB in under 11 s", 5.0, "seconds", 11.0),
           ("clean path: at least 25 MB/s", 0.0, "rate", 25.0))

LOG_RE = re.compile(r"udpmux\[(\d+)\]: (\w+): (.*)")
STATS_RE = re.compile(r"rtt .* cwnd .* lost (\S+?),")


def payload(size):
    return random.Random(SEED).randbytes(size)


def tcp_retrans(sock):
    """tcpi_total_retrans of a TCP socket, or None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return TCP_INFO_RETRANS.unpack_from(info, TCP_INFO_RETRANS_AT)[0]
    except (OSError, struct.error):
        return None


def congestion(sock):
    """The congestion control in effect on a TCP socket ("cubic"), or None."""
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, TCP_CA_NAME_MAX)
        return raw.split(b"\0", 1)[0].decode()
    return None


# ---- the target: runs on "public" ----------------------------------------------------------

def parse_request(line):
    """("PUT", None, id, cc), ("GET", n, id, cc) or ("TICK", n, id, None) from a request
    line; None if bad."""
    words = line.decode(errors="replace").split()
    if words[:1] == ["TICK"] and len(words) == 3 and words[1].isdigit():
        return "TICK", int(words[1]), words[2], None
    if words[:1] == ["PUT"] and 2 <= len(words) <= 3:
        return "PUT", None, words[1], (words[2:] or [None])[0]
    if words[:1] == ["GET"] and 3 <= len(words) <= 4 and words[1].isdigit():
        return "GET", int(words[1]), words[2], (words[3:] or [None])[0]
    return None


def target_main(argv):
    """`_target --port P --size N[,N...]`: serve PUT, GET and TICK (module docstring), one
    thread per connection; one JSON line per finished connection on stdout.  The payloads
    of the sizes given are made before "ready"; a GET of another size makes its own."""
    parser = argparse.ArgumentParser(prog="bench_link.py _target")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", required=True)
    args = parser.parse_args(argv)
    blobs = {n: payload(n) for n in map(int, args.size.split(","))}
    lock = threading.Lock()

    def report(**fields):
        with lock:
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()

    def serve(conn):
        conn.settimeout(TARGET_IDLE)
        tag = None
        with conn:
            try:
                head = b""
                while b"\n" not in head and len(head) < 100:
                    chunk = conn.recv(100)
                    if not chunk:
                        return
                    head += chunk
                line, _, rest = head.partition(b"\n")
                request = parse_request(line)
                if request is None:
                    report(op="error", error="bad request %r" % line[:100])
                    return
                op, n, tag, cc = request
                if op == "TICK":            # n lines "<seq> <CLOCK_MONOTONIC>", 100 ms apart
                    start = time.monotonic()
                    for seq in range(n):
                        delay = start + seq * 0.1 - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        conn.sendall(b"%d %.6f\n" % (seq, time.monotonic()))
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(CHUNK):
                        pass
                    report(op="TICK", id=tag, lines=n)
                elif op == "PUT":
                    digest, count = hashlib.sha256(rest), len(rest)
                    first = time.monotonic() if rest else None
                    while True:
                        chunk = conn.recv(CHUNK)
                        if not chunk:
                            break
                        first = first or time.monotonic()
                        digest.update(chunk)
                        count += len(chunk)
                    conn.sendall(b"%d %s\n" % (count, digest.hexdigest().encode()))
                    report(op="PUT", id=tag, bytes=count, first=first)
                else:
                    if cc:                  # the sender sets it; an error ends the request
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION,
                                        cc.encode())
                    data = blobs.get(n) or payload(n)
                    conn.sendall(memoryview(data))
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(CHUNK):          # the client closes once it has it all
                        pass
                    report(op="GET", id=tag, bytes=n, retrans=tcp_retrans(conn),
                           cc=congestion(conn))
            except OSError as exc:
                report(op="error", id=tag, error=str(exc))

    server = socket.create_server(("0.0.0.0", args.port), backlog=16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# ---- the stand-in for ssh: runs on "public" ------------------------------------------------

def ssh_main(argv):
    """`_ssh --client ADDR DEST COMMAND...`: run COMMAND through /bin/sh here, with
    SSH_CONNECTION as sshd on DEST's host would set it."""
    if len(argv) < 4 or argv[0] != "--client":
        sys.exit("usage: bench_link.py _ssh --client ADDR DEST COMMAND...")
    client, dest, command = argv[1], argv[2], argv[3:]
    os.environ["SSH_CONNECTION"] = "%s 50000 %s 22" % (client, dest.rpartition("@")[2])
    os.execv("/bin/sh", ["sh", "-c", " ".join(command)])


# ---- one transfer, from "outside" ----------------------------------------------------------

class Result:
    def __init__(self, tool, rtt, loss, direction, size, repeat=0):
        self.tool, self.rtt, self.loss, self.direction = tool, rtt, loss, direction
        self.size, self.repeat = size, repeat
        self.seconds = None             # None: it did not finish
        self.first = None               # seconds until the first byte reached the receiver
        self.moved = 0
        self.exact = False
        self.error = None
        self.retrans = None             # int, or None (unknown)
        self.dropped = None
        self.cpu = None                 # CPU seconds of the tool's processes

    @property
    def rate(self):
        return self.size / MB / self.seconds if self.seconds else None

    @property
    def status(self):
        """"ok" (finished, exact), "timeout", or "failed" (anything else)."""
        if self.seconds is not None and self.exact:
            return "ok"
        return "timeout" if self.error == "timed out" else "failed"

    def key(self):
        return self.rtt, self.loss, self.direction, self.tool

    def as_dict(self):
        return {"rtt_ms": self.rtt, "loss": self.loss, "tool": self.tool,
                "direction": self.direction, "repeat": self.repeat + 1, "bytes": self.size,
                "status": self.status, "seconds": self.seconds, "mbps": self.rate,
                "first_byte": self.first, "moved": self.moved, "exact": self.exact,
                "error": self.error, "retrans": self.retrans, "dropped": self.dropped,
                "cpu_seconds": self.cpu}


_transfers = itertools.count(1)


def transfer(bench, dst, r, cc=None):
    """Move the payload up or down (r.direction) over one TCP connection from outside to
    dst, filling in Result r: seconds (None if it did not finish), first, moved, exact,
    error, and for plain TCP (cc: the congestion control the sender sets) the sender's
    retransmissions."""
    data, digest, target = bench.data, bench.digest, bench.target
    size = len(data)
    tag = "%s-%g-%g-%s-%d" % (r.tool, r.rtt, r.loss, r.direction, next(_transfers))
    up = r.direction == "up"
    sock = bench.lab.socket("outside", type=socket.SOCK_STREAM)
    start = time.monotonic()
    deadline = start + bench.timeout
    try:
        sock.settimeout(bench.timeout)
        try:
            sock.connect(dst)
        except OSError as exc:
            r.error = "connect: %s" % exc
            return
        if cc and up:           # after connect(): the route's congctl is set at connect
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
            except OSError as exc:
                r.error = "TCP_CONGESTION %s: %s" % (cc, exc)
                return
            if congestion(sock) != cc:
                r.error = "congestion control %s, not %s" % (congestion(sock), cc)
                return
        sock.setblocking(False)
        suffix = " %s" % cc if cc else ""
        head = ("PUT %s%s\n" % (tag, suffix) if up
                else "GET %d %s%s\n" % (size, tag, suffix)).encode()
        out = memoryview(head + data if up else head)
        answer, got, sent = b"", hashlib.sha256(), 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                r.error = "timed out"
                return
            readable, writable, _ = select.select([sock], [sock] if sent < len(out) else [],
                                                  [], left)
            if writable:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(out[sent:sent + CHUNK])
                if up:
                    r.moved = max(0, sent - len(head))
                    if sent == len(out):
                        sock.shutdown(socket.SHUT_WR)
            if not readable:
                continue
            try:
                chunk = sock.recv(CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                r.error = "recv: %s" % exc
                return
            if chunk and up:
                answer += chunk
                continue
            if chunk:
                if r.first is None:
                    r.first = time.monotonic() - start
                got.update(chunk)
                r.moved += len(chunk)
                continue
            # EOF
            elapsed = time.monotonic() - start
            if up:
                r.retrans = tcp_retrans(sock) if cc else None
                sock.close()
                report = target.wait_report(tag, 2.0)
                if report and report.get("first"):
                    r.first = report["first"] - start
                words = answer.split()
                r.exact = (len(words) == 2 and words[0] == b"%d" % size
                           and words[1].decode() == digest)
                if not answer:
                    r.error = "closed without an answer"
                    return
                if not r.exact:
                    r.error = "answer %r" % answer[:100]
            else:
                r.exact = r.moved == size and got.hexdigest() == digest
                if not r.exact:
                    r.error = "%d of %d bytes%s" % (r.moved, size,
                                                    ", sha256 differs" if r.moved == size else "")
                if cc:
                    sock.close()                # the target reports once we closed
                    report = target.wait_report(tag, 2.0) or {}
                    r.retrans = report.get("retrans")
                    if report.get("cc") != cc:
                        r.exact = False
                        r.error = "the target's congestion control %s, not %s (%s)" % (
                            report.get("cc"), cc, report.get("error", "no report"))
            r.seconds = elapsed
            return
    finally:
        sock.close()


# ---- the processes -------------------------------------------------------------------------

class Target:
    """The sink/source on public, and the JSON lines it reports."""

    def __init__(self, lab, sizes):
        self.proc = lab.popen("public", [sys.executable, THIS, "_target", "--port",
                                         str(TARGET_PORT), "--size",
                                         ",".join(map(str, sizes))],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.reports = []
        self.cond = threading.Condition()
        line = self._readline(15.0)
        if line != "ready":
            raise RuntimeError("the target did not start (%r)" % line)
        threading.Thread(target=self._read, daemon=True).start()

    def _readline(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                with contextlib.suppress(ValueError):
                    self.reports.append(json.loads(line))
                self.cond.notify_all()

    def wait_report(self, tag, timeout):
        """The report of the connection whose header carried `tag`, within timeout s."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for item in self.reports:
                    if item.get("id") == tag:
                        return item
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def stop(self):
        stop_proc(self.proc)


def stop_proc(proc, timeout=5.0):
    """SIGTERM by PID, then SIGKILL; returns the exit status (or None)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    return proc.returncode


def drain(pipe, lines):
    """Read a text pipe to EOF in a daemon thread, appending its lines to `lines`."""
    def read():
        with contextlib.suppress(OSError, ValueError):
            for line in pipe:
                lines.append(line.rstrip())
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def public_pids(lab):
    """Every process in public's namespace (as tests/lab.py's down() finds them)."""
    with contextlib.suppress(OSError):
        return set(lablib._pids_in({lablib._ns_inode(lab.ns("public"))}))
    return set()


def reap_pidfds(fds):
    """Wait up to SERVER_GONE s for each process (a pidfd, opened while it was surely
    ours) to exit by itself; stop those that do not (SIGTERM, then SIGKILL), close every
    pidfd, and return how many had to be stopped."""
    left = 0
    for fd in fds:
        if not select.select([fd], [], [], SERVER_GONE)[0]:     # not gone by itself
            left += 1
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)
                if select.select([fd], [], [], 2.0)[0]:
                    break
        os.close(fd)
    return left


def reap_public(bench, what, draining=()):
    """Wait up to SERVER_GONE s for the processes a session started on public to exit;
    stop any left by PID.  Processes named in `draining` (sshd: its session still sending
    what a timed-out transfer queued over a slow path) are stopped without counting as
    left behind.  A note for the summary."""
    left = set()
    end = time.monotonic() + SERVER_GONE
    while time.monotonic() < end:
        left = public_pids(bench.lab) - bench.residents()
        if not left:
            return "%s gone" % what
        time.sleep(0.05)
    names = {}
    for pid in left:
        with contextlib.suppress(psutil.Error):
            names[pid] = psutil.Process(pid).name()
    lablib.kill_pids(left)
    listed = ", ".join("%d %s" % (pid, names.get(pid, "?")) for pid in sorted(left))
    if all(names.get(pid) in draining for pid in left):
        return "%s still there after %g s (%s), stopped by PID" % (what, SERVER_GONE, listed)
    bench.leftovers += 1
    return "%s LEFT BEHIND (%s), stopped by PID" % (what.upper(), listed)


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        if pid is None:
            continue
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Link:
    """One `udpmux link --listen-tcp` on outside, its server started through the _ssh
    stand-in on public; its stderr (both ends' log with --debug) is collected."""

    def __init__(self, lab, root=ROOT):
        self.lab = lab
        ssh = "%s netns exec %s %s %s _ssh --client %s" % (
            shutil.which("ip") or "/usr/sbin/ip", lab.ns("public"), shlex.quote(sys.executable),
            shlex.quote(THIS), lab.public_addr("out"))
        # from root, and with root first on the path, both ends: `python -m` puts the
        # working directory ahead of PYTHONPATH
        server = "cd %s && PYTHONPATH=%s %s -m udpmux" % (
            shlex.quote(root), shlex.quote(root), shlex.quote(sys.executable))
        self.argv = [sys.executable, "-m", "udpmux", "link",
                     "--listen-tcp", "127.0.0.1:%d" % LISTEN_PORT,
                     "--ssh-command", ssh, "--server-command", server,
                     "--target", "127.0.0.1:%d" % TARGET_PORT, "--bind", BIND, "--debug",
                     "root@%s" % lab.addr("public")]
        env = dict(os.environ, PYTHONPATH=root)
        self.started = time.monotonic()
        self.proc = lab.popen("outside", self.argv, env=env, cwd=root,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []                 # (monotonic time, pid, level, message)
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.server_pid = None

    def _read(self):
        for raw in self.proc.stderr:
            m = LOG_RE.search(raw)
            item = (time.monotonic(), int(m[1]), m[2], m[3]) if m else \
                (time.monotonic(), None, "", raw.rstrip())
            with self.cond:
                self.lines.append(item)
                self.cond.notify_all()

    def wait_for(self, pred, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for item in self.lines:
                    if pred(item):
                        return item
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    return None
                self.cond.wait(min(left, 0.2))

    def wait_up(self):
        """Seconds until both ends said "session up" (None if not within SETUP_TIMEOUT);
        learns link-server's PID from its line."""
        up = lambda i: i[1] is not None and "session up" in i[3]     # noqa: E731
        client = self.wait_for(lambda i: up(i) and i[1] == self.proc.pid, SETUP_TIMEOUT)
        server = self.wait_for(lambda i: up(i) and i[1] != self.proc.pid,
                               SETUP_TIMEOUT) if client else None
        if not (client and server):
            return None
        self.server_pid = server[1]
        return max(client[0], server[0]) - self.started

    def cpu(self):
        return cpu_seconds((self.proc.pid, self.server_pid))

    def stats_lost(self, pid):
        """(time, "lost" text) of `pid`'s last engine-stats line, or None."""
        with self.cond:
            for t, p, _, msg in reversed(self.lines):
                m = STATS_RE.search(msg) if p == pid else None
                if m:
                    return t, m[1]
        return None

    def lost_since(self, pid, since):
        """The sending end's cumulative "lost" from a stats line logged after `since`
        (waiting up to STATS_WAIT for one), or None when its lines carry no number."""
        last = self.stats_lost(pid)
        if last is not None and not last[1].isdigit():
            return None
        if last is None or last[0] < since:
            self.wait_for(lambda i: i[1] == pid and i[0] >= since and STATS_RE.search(i[3]),
                          STATS_WAIT)
            last = self.stats_lost(pid)
        if last is None or last[0] < since or not last[1].isdigit():
            return None
        return int(last[1])

    def log_text(self):
        with self.cond:
            return "\n".join("    %s %s %s" % (p, lvl, msg) for _, p, lvl, msg in self.lines)


class Sshd:
    """A real sshd on public (port SSH_PORT) with keys made for this run in `tmp`, the
    payload as a file there for "down", and the ssh client options to reach it."""

    def __init__(self, lab, tmp, data):
        self.lab, self.tmp = lab, tmp
        self.key = os.path.join(tmp, "id")
        host_key = os.path.join(tmp, "host_key")
        for path in (self.key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path],
                           check=True, timeout=30)
        authorized = os.path.join(tmp, "authorized_keys")
        shutil.copyfile(self.key + ".pub", authorized)
        config = os.path.join(tmp, "sshd_config")
        with open(config, "w") as f:
            f.write("Port %d\nListenAddress 0.0.0.0\nHostKey %s\nPidFile %s\n"
                    "AuthorizedKeysFile %s\nStrictModes no\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                    "LogLevel ERROR\n" % (SSH_PORT, host_key, os.path.join(tmp, "sshd.pid"),
                                          authorized))
        self.source = os.path.join(tmp, "payload")
        with open(self.source, "wb") as f:
            f.write(data)
        self.options = ["-F", "/dev/null", "-i", self.key, "-p", str(SSH_PORT),
                        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "LogLevel=ERROR"]
        self.dest = "root@%s" % lab.addr("public")
        os.makedirs("/run/sshd", exist_ok=True)       # its privilege separation directory
        self.log = []
        self.proc = lab.popen("public", ["/usr/sbin/sshd", "-D", "-e", "-f", config],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        drain(self.proc.stderr, self.log)
        self.wait_ready()

    def wait_ready(self):
        """sshd answers a plain ssh from outside (before any delay or loss is set)."""
        end = time.monotonic() + SSH_SETUP_TIMEOUT
        while time.monotonic() < end and self.proc.poll() is None:
            out = self.lab.run("outside", ["ssh", *self.options, self.dest, "true"],
                               capture_output=True, text=True, timeout=SSH_SETUP_TIMEOUT)
            if out.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("sshd did not come up: %s" % "\n".join(self.log[-10:]))

    def proxy_option(self):
        """-o ProxyCommand=`udpmux link ...` for the ssh-link tool."""
        udpmux = "env PYTHONPATH=%s %s -m udpmux" % (shlex.quote(ROOT),
                                                      shlex.quote(sys.executable))
        inner = "ssh " + " ".join(shlex.quote(o) for o in self.options)
        proxy = ("%s link --ssh-command %s --server-command %s -t 127.0.0.1:%d --bind %s %%r@%%h"
                 % (udpmux, shlex.quote(inner), shlex.quote(udpmux), SSH_PORT, BIND))
        return ["-o", "ProxyCommand=" + proxy]

    def stop(self):
        stop_proc(self.proc)


class SshMaster:
    """An ssh ControlMaster from outside to the Sshd (through link for ssh-link), whose
    control socket the timed commands use."""

    def __init__(self, lab, sshd, proxy):
        self.lab, self.sshd = lab, sshd
        self.ctl = os.path.join(sshd.tmp, "ctl-%d" % next(_transfers))
        self.extra = sshd.proxy_option() if proxy else []
        self.log = []
        self.left_behind = False
        self.started = time.monotonic()
        self.proc = lab.popen("outside", ["ssh", *sshd.options, *self.extra, "-M", "-N",
                                          "-S", self.ctl, "-o", "ControlPersist=no",
                                          sshd.dest],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        drain(self.proc.stderr, self.log)

    def wait_up(self):
        """Seconds until the control socket exists (None if not within SSH_SETUP_TIMEOUT
        or the master exited)."""
        end = self.started + SSH_SETUP_TIMEOUT
        while time.monotonic() < end and self.proc.poll() is None:
            if os.path.exists(self.ctl):
                return time.monotonic() - self.started
            time.sleep(0.02)
        return None

    def pids(self):
        """The master and everything it started (the ProxyCommand's link)."""
        with contextlib.suppress(psutil.Error):
            return [self.proc.pid] + [p.pid for p in psutil.Process(self.proc.pid).children(
                recursive=True)]
        return [self.proc.pid]

    def command(self, command):
        return ["ssh", *self.sshd.options, "-S", self.ctl, "-o", "ControlMaster=no",
                self.sshd.dest, command]

    def stop(self):
        """`ssh -O exit`, else SIGTERM by PID; what it started is stopped by PID too.
        Returns how it ended, as text."""
        started = []                    # pidfds, opened while these are surely ours
        for pid in self.pids()[1:]:
            with contextlib.suppress(OSError):
                started.append(os.pidfd_open(pid))
        how = "had exited (status %s)" % self.proc.returncode
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.lab.run("outside", ["ssh", *self.sshd.options, "-S", self.ctl, "-O",
                                         "exit", self.sshd.dest],
                             capture_output=True, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            how = "closed (ssh -O exit)"
            if self.proc.poll() is None:
                how = "stopped by PID (status %s)" % stop_proc(self.proc)
        if reap_pidfds(started):
            self.left_behind = True
            how += "; ITS PROXYCOMMAND WAS LEFT BEHIND, stopped by PID"
        return how


def ssh_transfer(bench, master, r):
    """Time one ssh command over `master`: `cat FILE` (down) or `cat > FILE` (up),
    filling in Result r.  The ssh client is stopped by PID at the deadline."""
    data, size = bench.data, len(bench.data)
    up = r.direction == "up"
    dest = os.path.join(bench.tmp, "up-%d" % next(_transfers))
    command = "cat > %s" % shlex.quote(dest) if up else "cat %s" % shlex.quote(
        bench.sshd.source)
    start = time.monotonic()
    deadline = start + bench.timeout
    proc = bench.lab.popen("outside", master.command(command),
                           stdin=subprocess.PIPE if up else subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL if up else subprocess.PIPE,
                           stderr=subprocess.PIPE)
    readers = {proc.stderr.fileno(): "err"}
    if not up:
        readers[proc.stdout.fileno()] = "out"
    writer = proc.stdin.fileno() if up else None
    for fd in list(readers) + ([writer] if up else []):
        os.set_blocking(fd, False)
    view, sent, got, errtext = memoryview(data), 0, hashlib.sha256(), b""
    try:
        while readers or writer is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                r.error = "timed out"
                return
            readable, writable, _ = select.select(
                list(readers), [writer] if writer is not None else [], [], left)
            if writable:
                try:
                    sent += os.write(writer, view[sent:sent + CHUNK])
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    sent = -1
                r.moved = max(sent, 0)
                if sent == size or sent < 0:
                    proc.stdin.close()
                    writer = None
            for fd in readable:
                try:
                    chunk = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    del readers[fd]
                elif readers[fd] == "err":
                    errtext = (errtext + chunk)[-2000:]
                else:
                    if r.first is None:
                        r.first = time.monotonic() - start
                    got.update(chunk)
                    r.moved += len(chunk)
        try:
            status = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.error = "timed out"
            return
        r.seconds = time.monotonic() - start
        if up:
            got = hashlib.sha256()
            with contextlib.suppress(OSError), open(dest, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    got.update(chunk)
            r.moved = os.path.getsize(dest) if os.path.exists(dest) else 0
        r.exact = status == 0 and r.moved == size and got.hexdigest() == bench.digest
        if status != 0:
            r.error = "ssh exit status %s: %s" % (status, errtext.decode(
                errors="replace").strip()[-200:])
        elif not r.exact:
            r.error = "%d of %d bytes%s" % (r.moved, size,
                                            ", sha256 differs" if r.moved == size else "")
    finally:
        if proc.poll() is None:
            proc.kill()                 # by PID: the master closes the channel
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(OSError):
            os.unlink(dest)


# ---- the benchmark -------------------------------------------------------------------------

class Bench:
    """What every tool's run shares: the lab, the target, sshd, the payload, the limits,
    and the notes and stacks collected on the way."""

    def __init__(self, lab, data, timeout, directions, tmp):
        self.lab, self.data, self.timeout, self.directions = lab, data, timeout, directions
        self.digest = hashlib.sha256(data).hexdigest()
        self.tmp = tmp
        self.target = None
        self.sshd = None
        self.notes, self.stacks = [], []
        self.leftovers = 0              # sessions that left a process behind

    def residents(self):
        """The processes on public that live for the whole run."""
        return {p.proc.pid for p in (self.target, self.sshd) if p is not None}

    def dropped(self):
        return self.lab.counter("wan", "loss")


def where(rtt, loss):
    return "rtt %g ms, %g %% loss" % (rtt, loss)


def run_link(bench, rtt, loss, repeat, tool="link"):
    """udpmux link, or with tool "before" the link of the tree --before names."""
    rows = []
    lab = bench.lab
    link = Link(lab, bench.before if tool == "before" else ROOT)
    up = None
    try:
        up = link.wait_up()
        if up is None:
            why = "the link session did not come up within %d s" % SETUP_TIMEOUT
            if link.proc.poll() is not None:
                why = "udpmux link exited with status %s" % link.proc.returncode
            bench.notes.append("%s at %s: %s; its log:\n%s" % (
                tool, where(rtt, loss), why, link.log_text()))
            for direction in bench.directions:
                r = Result(tool, rtt, loss, direction, len(bench.data), repeat)
                r.error = why
                rows.append(r)
            return rows
        server_pid = link.server_pid
        for direction in bench.directions:
            r = Result(tool, rtt, loss, direction, len(bench.data), repeat)
            cpu0, drop0 = link.cpu(), bench.dropped()
            began = time.monotonic()
            transfer(bench, ("127.0.0.1", LISTEN_PORT), r)
            r.cpu = link.cpu() - cpu0
            r.dropped = bench.dropped() - drop0
            if r.seconds is None:
                with link.cond:
                    tail = [l for l in link.lines if l[0] >= began][-40:]
                bench.notes.append("%s %s at %s timed out; both ends' log since it began:\n%s"
                                   % (tool, direction, where(rtt, loss), "\n".join(
                                       "    %.2f %s %s %s" % (t - began, p, lvl, msg)
                                       for t, p, lvl, msg in tail)))
            if r.seconds is None and shutil.which("py-spy"):
                bench.stacks.append(py_spy(link, server_pid, "link %s at %s" % (
                    direction, where(rtt, loss))))
            rows.append(r)
        done = time.monotonic()
        # the sending end's cumulative "lost": the client for up, the server for down
        ends = {"up": link.proc.pid, "down": server_pid}
        for r in rows:
            r.retrans = link.lost_since(ends[r.direction], done)
        return rows
    finally:
        end_link(bench, link, "link session at %s: up in %s s" % (where(rtt, loss),
                                                                   fmt(up, ".2f")))


def run_tcp(bench, cc, rtt, loss, repeat):
    rows = []
    for direction in bench.directions:
        r = Result(cc, rtt, loss, direction, len(bench.data), repeat)
        drop0 = bench.dropped()
        transfer(bench, (bench.lab.addr("public"), TARGET_PORT), r, cc=cc)
        r.dropped = bench.dropped() - drop0
        rows.append(r)
    return rows


def run_ssh(bench, tool, rtt, loss, repeat):
    """One ssh master per transfer (set up untimed), one timed command over it."""
    rows = []
    for direction in bench.directions:
        r = Result(tool, rtt, loss, direction, len(bench.data), repeat)
        rows.append(r)
        master = SshMaster(bench.lab, bench.sshd, proxy=tool == "ssh-link")
        up = None
        try:
            up = master.wait_up()
            if up is None:
                r.error = "the ssh master did not come up within %d s" % SSH_SETUP_TIMEOUT
                if master.proc.poll() is not None:
                    r.error = "the ssh master exited with status %s" % master.proc.returncode
                continue
            pids = master.pids() + sorted(public_pids(bench.lab) - bench.residents())
            cpu0, drop0 = cpu_seconds(pids), bench.dropped()
            ssh_transfer(bench, master, r)
            r.cpu = cpu_seconds(pids) - cpu0
            r.dropped = bench.dropped() - drop0
        finally:
            how = master.stop()
            bench.leftovers += master.left_behind
            note = "%s master for %s at %s: up in %s s; %s; " % (
                tool, direction, where(rtt, loss), fmt(up, ".2f"), how)
            note += reap_public(bench, "its processes on public", draining=("sshd",))
            bench.notes.append(note)
            if r.error and up is None:
                for line in master.log[-5:]:
                    bench.notes.append("  ssh: %s" % line)
    return rows


def run_tool(bench, tool, rtt, loss, repeat):
    if tool in ("link", "before"):
        return run_link(bench, rtt, loss, repeat, tool)
    if tool in TCP_TOOLS:
        return run_tcp(bench, tool, rtt, loss, repeat)
    return run_ssh(bench, tool, rtt, loss, repeat)


# ---- the scenarios (--scenarios) -----------------------------------------------------------

SCENARIOS = ("roam", "blackout", "keys")
ROAM_FIRST, ROAM_EVERY, ROAM_AFTER = 3.0, 5.0, 4.0    # seconds: first roam, between, after last
TICK = 0.1                      # the ticker's period, seconds
KEYS_EVERY = (0.05, 0.1)        # seconds between keystrokes, drawn uniformly
KEYS_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"

# The remote end of "keys", run by sshd on public as `python3 -c KEYS_REMOTE SECONDS`: bulk
# '.' bytes on stdout for SECONDS, and every byte read from stdin echoed at once as '#' and
# the byte (ahead of any bulk not yet written); "#!" first, "#E" last.
KEYS_REMOTE = r"""
import os, select, sys, time
end = time.monotonic() + float(sys.argv[1])
os.write(1, b"#!")
os.set_blocking(1, False)
bulk, echo, reading = b"." * 65536, b"", True
while time.monotonic() < end:
    r, w, _ = select.select([0] if reading else [], [1], [], 0.2)
    if r:
        got = os.read(0, 4096)
        reading = bool(got)
        echo += b"".join(b"#" + bytes([c]) for c in got if c != 35)
    if w:
        try:
            if echo:
                echo = echo[os.write(1, echo):]
            else:
                os.write(1, bulk)
        except BlockingIOError:
            pass
os.set_blocking(1, True)
os.write(1, echo + b"#E")
"""


def percentile(values, p):
    """The p-th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def link_session(bench, what):
    """A Link session that is up, or None (a note says why; the caller ends it either way
    with end_link)."""
    link = Link(bench.lab)
    up = link.wait_up()
    if up is None:
        why = ("udpmux link exited with status %s" % link.proc.returncode
               if link.proc.poll() is not None
               else "the link session did not come up within %d s" % SETUP_TIMEOUT)
        bench.notes.append("%s: %s; its log:\n%s" % (what, why, link.log_text()))
    return link, up


def end_link(bench, link, head):
    """Stop a link session by its PID and note how it went, after `head` (what it was
    and how long it took to come up): its exit status, its link-server gone, and the
    first warnings and errors it logged."""
    status = stop_proc(link.proc, EXIT_TIMEOUT)
    summary = head + "; "
    summary += "exit status %s" % status if status == 0 else \
        "EXIT STATUS %s (expected 0)" % status
    if status != 0:
        bench.leftovers += 1
    summary += "; " + reap_public(bench, "link-server")
    bench.notes.append(summary)
    errors = [l for l in link.lines if l[2] in ("ERROR", "WARNING", "CRITICAL")
              or (l[1] is None and l[3].strip())]
    for _, pid, lvl, msg in errors[:10]:
        bench.notes.append("  log: [%s] %s %s" % (pid, lvl, msg))


def scenario_roam(bench, rtt, roams):
    """`roams` roams of the outside NAT under a session of lines 100 ms apart (the target's
    TICK through `udpmux link --listen-tcp`); the gap after each."""
    lab = bench.lab
    lines = int((ROAM_FIRST + (roams - 1) * ROAM_EVERY + ROAM_AFTER) / TICK)
    out = {"rtt_ms": rtt, "roams": [], "lines": lines, "received": 0, "error": None}
    link, up = link_session(bench, "roam")
    events = []                     # (monotonic before, after, new WAN address)
    stop = threading.Event()
    arrivals = []                   # (arrival, seq, the target's stamp)
    try:
        if up is None:
            out["error"] = "the link session did not come up"
            return out
        sock = lab.socket("outside", type=socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", LISTEN_PORT))
        sock.sendall(b"TICK %d roam-%d\n" % (lines, next(_transfers)))
        begin = time.monotonic()

        def roamer():
            for k in range(roams):
                if stop.wait(max(0.0, begin + ROAM_FIRST + k * ROAM_EVERY - time.monotonic())):
                    return
                before = time.monotonic()
                new = lab.roam("out")
                events.append((before, time.monotonic(), new))
        thread = threading.Thread(target=roamer, daemon=True)
        thread.start()
        deadline = begin + lines * TICK + bench.timeout
        buf = b""
        sock.setblocking(False)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    out["error"] = "timed out"
                    break
                if not select.select([sock], [], [], left)[0]:
                    continue
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                now = time.monotonic()
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    seq, stamp = line.split()
                    arrivals.append((now, int(seq), float(stamp)))
        except OSError as exc:
            out["error"] = "recv: %s" % exc
        finally:
            stop.set()
            thread.join(5)
            sock.close()
    finally:
        end_link(bench, link, "roam session: link up in %s s" % fmt(up, ".2f"))
    out["received"] = len(arrivals)
    if out["error"] is None and len(arrivals) != lines:
        out["error"] = "%d of %d lines" % (len(arrivals), lines)
    for before, after, new in events:
        nxt = next((a for a in arrivals if a[2] > before), None)
        window = [a[0] for a in arrivals if before - 1 <= a[0] <= before + 10]
        stall = max((b - a for a, b in zip(window, window[1:])), default=None)
        out["roams"].append({"at": round(before - arrivals[0][0], 3) if arrivals else None,
                             "new_wan": new, "roam_call": after - before,
                             "gap": nxt[0] - before if nxt else None, "stall": stall})
    quiet = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])
             if not any(e[0] - 1 <= b[0] <= e[0] + 10 for e in events)]
    out["baseline_max_interval"] = max(quiet, default=None)
    out["line_delay_p50"] = (percentile([a[0] - a[2] for a in arrivals], 50)
                             if arrivals else None)
    gaps = [r["gap"] for r in out["roams"]]
    out["max_gap"] = None if not gaps or None in gaps else max(gaps)
    out["target"] = 1.0 + rtt / 1000
    return out


def scenario_blackout(bench, rtt, size, blackout, timeout):
    """One link session: a clean download of `size` bytes, then the same with `blackout`
    seconds of UDP blocked on wan from when a quarter has arrived."""
    lab = bench.lab
    data = payload(size)
    ns = type("Ns", (), {})()
    ns.data, ns.digest, ns.target, ns.lab = data, hashlib.sha256(data).hexdigest(), \
        bench.target, lab
    out = {"rtt_ms": rtt, "bytes": size, "blackout": blackout, "error": None}
    link, up = link_session(bench, "blackout")
    try:
        if up is None:
            out["error"] = "the link session did not come up"
            return out
        clean = Result("link", rtt, 0, "down", size)
        ns.timeout = timeout
        transfer(ns, ("127.0.0.1", LISTEN_PORT), clean)
        out["clean"] = clean.seconds
        out["clean_error"] = clean.error
        print("  measured: blackout scenario, clean download: %s" % (
            "%.2f s, %.2f MB/s" % (clean.seconds, clean.rate) if clean.seconds is not None
            else clean.error), flush=True)
        dark = Result("link", rtt, 0, "down", size)
        marks = {}
        stop = threading.Event()

        def blacker():
            while dark.moved < size // 4:
                if stop.wait(0.005):
                    return
            marks["moved_at_start"] = dark.moved
            marks["start"] = time.monotonic()
            lab.block_udp(True)
            try:
                stop.wait(blackout)
            finally:
                lab.block_udp(False)
                marks["end"] = time.monotonic()
            moved = dark.moved
            while dark.moved == moved and dark.seconds is None and not stop.is_set():
                time.sleep(0.002)
            if dark.moved != moved:
                marks["resumed"] = time.monotonic() - marks["end"]
        thread = threading.Thread(target=blacker, daemon=True)
        thread.start()
        ns.timeout = timeout + blackout
        try:
            transfer(ns, ("127.0.0.1", LISTEN_PORT), dark)
        finally:
            stop.set()
            thread.join(blackout + 10)
            lab.block_udp(False)
        out["total"] = dark.seconds
        out["error"] = dark.error
        out["moved"] = dark.moved
        if "start" in marks:
            out["blackout_measured"] = marks["end"] - marks["start"]
            out["resumed_after"] = marks.get("resumed")
        if dark.seconds is not None and clean.seconds is not None and "start" in marks:
            out["cost"] = dark.seconds - clean.seconds - blackout
        return out
    finally:
        end_link(bench, link, "blackout session: link up in %s s" % fmt(up, ".2f"))


def keys_children(proc):
    with contextlib.suppress(psutil.Error):
        return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    return []


def scenario_keys(bench, rtt, loss, seconds):
    """One ssh through link (ProxyCommand) running KEYS_REMOTE: keystrokes' echo times
    behind a bulk download in the same session."""
    lab, sshd = bench.lab, bench.sshd
    out = {"rtt_ms": rtt, "loss": loss, "seconds": seconds, "error": None}
    command = "%s -c %s %g" % (shlex.quote(sys.executable), shlex.quote(KEYS_REMOTE), seconds)
    started = time.monotonic()
    proc = lab.popen("outside", ["ssh", *sshd.options, *sshd.proxy_option(), sshd.dest,
                                 command],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fds = []                        # pidfds of what ssh started (its ProxyCommand)
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    for fd in (out_fd, err_fd):
        os.set_blocking(fd, False)
    rng = random.Random(SEED)
    sent = []                       # (byte, monotonic) not yet echoed
    latencies, wrong, errtext = [], 0, b""
    samples = []                    # (seconds into the session, echo seconds)
    state = {"ready": None, "end": False, "bulk": 0, "pending": b""}

    def parse(chunk, now):
        nonlocal wrong
        buf, i = state["pending"] + chunk, 0
        state["pending"] = b""
        while True:
            j = buf.find(b"#", i)
            if j < 0:
                state["bulk"] += len(buf) - i
                return
            state["bulk"] += j - i
            if j + 1 >= len(buf):
                state["pending"] = b"#"
                return
            c = buf[j + 1]
            i = j + 2
            if c == ord("!"):
                state["ready"] = now
            elif c == ord("E"):
                state["end"] = True
            elif sent:
                byte, when = sent.pop(0)
                latencies.append(now - when)
                # when in the session (seconds since the remote end was ready) and how
                # long: in --json, to see whether the slow echoes cluster (the bulk's
                # start, a probe of the path) or not
                samples.append((round(when - (state["ready"] or when), 3),
                                round(now - when, 4)))
                wrong += byte != c
            else:
                wrong += 1
    try:
        deadline = started + SSH_SETUP_TIMEOUT + seconds + bench.timeout
        next_key = None
        streams = [out_fd, err_fd]
        while streams:
            now = time.monotonic()
            if now >= deadline:
                out["error"] = "timed out"
                break
            if state["ready"] and not fds:
                for pid in keys_children(proc):
                    with contextlib.suppress(OSError):
                        fds.append(os.pidfd_open(pid))
            if state["ready"] and next_key is None:
                next_key, stop_keys = now + 1.0, state["ready"] + seconds - 1.0
            if next_key is not None and now >= next_key and in_fd is not None:
                if now < stop_keys:
                    byte = KEYS_ALPHABET[len(latencies) % len(KEYS_ALPHABET)]
                    sent.append((byte, time.monotonic()))
                    os.write(in_fd, bytes([byte]))
                    next_key = now + rng.uniform(*KEYS_EVERY)
                else:
                    proc.stdin.close()
                    in_fd = None
            wait = deadline - now
            if next_key is not None and in_fd is not None:
                wait = min(wait, max(0.0, next_key - now))
            readable = select.select(streams, [], [], wait)[0]
            now = time.monotonic()
            for fd in readable:
                try:
                    chunk = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    streams.remove(fd)
                elif fd == err_fd:
                    errtext = (errtext + chunk)[-2000:]
                else:
                    parse(chunk, now)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        how = "ssh exit status %s" % proc.returncode
        left = reap_pidfds(fds)
        if left:
            bench.leftovers += left
            how += "; ITS PROXYCOMMAND WAS LEFT BEHIND, stopped by PID"
        bench.notes.append("keys session at %s: %s; %s" % (
            where(rtt, loss), how, reap_public(bench, "its processes on public",
                                               draining=("sshd",))))
    out["setup"] = state["ready"] - started if state["ready"] else None
    if out["error"] is None and not state["end"]:
        out["error"] = "no end marker (ssh exit status %s: %s)" % (
            proc.returncode, errtext.decode(errors="replace").strip()[-200:])
    out["count"], out["unanswered"], out["wrong"] = len(latencies), len(sent), wrong
    out["bulk_bytes"] = state["bulk"]
    out["bulk_mbps"] = state["bulk"] / MB / seconds
    if latencies:
        out.update(p50=percentile(latencies, 50), p99=percentile(latencies, 99),
                   max=max(latencies))
    out["samples"] = samples
    out["target"] = (rtt + 100) / 1000
    return out


def print_scenarios(results):
    """The scenarios' figures against their targets, one block each."""
    print("scenarios (targets in brackets):")
    r = results.get("roam")
    if r:
        print("  roam at rtt %g ms: gaps %s s, max %s s [<= 1 s + 1 RTT = %.3f s: %s]%s" % (
            r["rtt_ms"], ", ".join(fmt(e["gap"], ".3f") for e in r["roams"]) or "-",
            fmt(r["max_gap"], ".3f"), r["target"],
            "met" if r["max_gap"] is not None and r["max_gap"] <= r["target"] else "NOT MET",
            "; " + r["error"] if r["error"] else ""))
    r = results.get("blackout")
    if r:
        cost = r.get("cost")
        print("  blackout at rtt %g ms: %g MB with %g s of UDP blocked %s s, without %s s: "
              "cost beyond the blackout %s s [<= 2 s: %s]%s" % (
                  r["rtt_ms"], r["bytes"] / MB, r["blackout"], fmt(r.get("total"), ".2f"),
                  fmt(r.get("clean"), ".2f"), fmt(cost, ".2f"),
                  "met" if cost is not None and cost <= 2 else "NOT MET",
                  "; " + r["error"] if r["error"] else ""))
    for r in results.get("keys", []):
        print("  keys at %s: %d echoes, p50 %s s, p99 %s s, max %s s, behind %.2f MB/s "
              "[p99 <= RTT + 100 ms = %.3f s: %s]%s" % (
                  where(r["rtt_ms"], r["loss"]), r["count"], fmt(r.get("p50"), ".3f"),
                  fmt(r.get("p99"), ".3f"), fmt(r.get("max"), ".3f"), r["bulk_mbps"],
                  r["target"], "met" if r.get("p99") is not None and r["p99"] <= r["target"]
                  else "NOT MET", "; " + r["error"] if r["error"] else ""))


def run_scenarios(bench, scenarios, args):
    """Each scenario of `scenarios`, in order, at --scenario-rtt; their figures printed as
    they end and returned as {name: figures}."""
    lab, rtt = bench.lab, args.scenario_rtt
    results = {}
    lab.set_delay(rtt / 2)
    try:
        for name in scenarios:
            lab.set_loss(0)
            if name == "roam":
                r = results["roam"] = scenario_roam(bench, rtt, args.roams)
                for k, e in enumerate(r["roams"], 1):
                    print("  measured: roam %d (to %s, %.2f s into the session; the roam "
                          "itself took %.3f s): next line after %s s, longest silence %s s"
                          % (k, e["new_wan"], e["at"] or 0, e["roam_call"],
                             fmt(e["gap"], ".3f"),
                              fmt(e["stall"], ".3f")), flush=True)
                print("  roam: %d of %d lines%s; max gap %s s (target <= %.3f s: %s); "
                      "without a roam lines arrive at most %s s apart, %s s after sent "
                      "(p50)" % (r["received"], r["lines"],
                                 "; " + r["error"] if r["error"] else "",
                                 fmt(r["max_gap"], ".3f"), r["target"],
                                 "met" if r["max_gap"] is not None
                                 and r["max_gap"] <= r["target"] else "NOT MET",
                                 fmt(r.get("baseline_max_interval"), ".3f"),
                                 fmt(r.get("line_delay_p50"), ".3f")), flush=True)
            elif name == "blackout":
                size = int(args.blackout_megabytes * MB)
                r = results["blackout"] = scenario_blackout(bench, rtt, size,
                                                            args.blackout_seconds,
                                                            args.timeout)
                cost = r.get("cost")
                print("  blackout: %g MB down, %g s of UDP blocked from %s MB on: %s s "
                      "(measured blackout %s s, data again %s s after it); clean %s s; "
                      "cost beyond the blackout %s s (target <= 2 s: %s)%s" % (
                          size / MB, args.blackout_seconds,
                          fmt(size / 4 / MB, ".1f"), fmt(r.get("total"), ".2f"),
                          fmt(r.get("blackout_measured"), ".2f"),
                          fmt(r.get("resumed_after"), ".2f"), fmt(r.get("clean"), ".2f"),
                          fmt(cost, ".2f"),
                          "met" if cost is not None and cost <= 2 else "NOT MET",
                          "; " + r["error"] if r["error"] else ""), flush=True)
            elif name == "keys":
                results["keys"] = []
                for loss in args.keys_loss:
                    lab.set_loss(loss, protocols=("udp", "tcp"))
                    r = scenario_keys(bench, rtt, loss, args.keys_seconds)
                    results["keys"].append(r)
                    print("  keys at %s: %d keystrokes echoed (%d unanswered, %d wrong) "
                          "behind %.2f MB/s of bulk in the same ssh: p50 %s s, p99 %s s, "
                          "max %s s (target p99 <= %.3f s: %s); ssh up in %s s%s" % (
                              where(rtt, loss), r["count"], r["unanswered"], r["wrong"],
                              r["bulk_mbps"], fmt(r.get("p50"), ".3f"),
                              fmt(r.get("p99"), ".3f"), fmt(r.get("max"), ".3f"),
                              r["target"], "met" if r.get("p99") is not None
                              and r["p99"] <= r["target"] else "NOT MET",
                              fmt(r["setup"], ".2f"),
                              "; " + r["error"] if r["error"] else ""), flush=True)
    finally:
        lab.set_loss(0)
        lab.block_udp(False)
        counts = lab.delay_counters() if rtt else None
        lab.set_delay(0)
        if rtt:
            bench.notes.append("delay line in the scenarios: %s" % (", ".join(
                "%s %s" % kv for kv in (counts or {}).items()) or "no counters"))
    return results


def py_spy(link, server_pid, what):
    out = ["stacks (py-spy dump) after %s timed out:" % what]
    for name, pid in (("udpmux link", link.proc.pid), ("link-server", server_pid)):
        if pid is None:
            continue
        res = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30)
        out.append("  %s (pid %d):\n%s" % (name, pid, "\n".join(
            "    " + l for l in (res.stdout or res.stderr).splitlines())))
    return "\n".join(out)


# ---- reporting -----------------------------------------------------------------------------

def fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def fmt_rate(value):
    return "%.1f" % value if value >= 10 else "%.2f" % value


def ratio_text(a, b, timeout):
    """a's MB/s over b's as text, from two {"status", "mbps", "moved"} (a transfer's or a
    summary's); a bound (">", "<") where one of them timed out."""
    if a is None or b is None:
        return None
    if a["status"] == "ok" and b["status"] == "ok":
        return "%.2f" % (a["mbps"] / b["mbps"])
    if a["status"] == "ok" and b["status"] == "timeout":
        ceiling = b["moved"] / MB / timeout           # b's rate was below this
        return ">%.1f" % (a["mbps"] / ceiling) if ceiling else "inf"
    if a["status"] == "timeout" and b["status"] == "ok":
        return "<%.2f" % (a["moved"] / MB / timeout / b["mbps"])
    return None


def print_table(rows, size, timeout, repeats):
    bbr = {(r.rtt, r.loss, r.direction, r.repeat): r for r in rows if r.tool == "bbr"}
    ratio = bool(bbr) and any(r.tool == "link" for r in rows)
    head = ("size", "rtt", "loss", "tool", "dir") + (("rep",) if repeats > 1 else ()) + (
        "seconds", "1st byte", "MB/s") + (("link/bbr",) if ratio else ()) + (
        "retrans", "dropped", "CPU s", "exact")
    widths = (6, 6, 4, 8, 4) + ((3,) if repeats > 1 else ()) + (7, 8, 6) + (
        (8,) if ratio else ()) + (7, 7, 5, 0)
    print("  ".join(h.rjust(w) if w else h for h, w in zip(head, widths)))
    for r in rows:
        link_bbr = None
        if r.tool == "link":
            base = bbr.get((r.rtt, r.loss, r.direction, r.repeat))
            link_bbr = ratio_text(r.as_dict(), base and base.as_dict(), timeout)
        exact = "yes" if r.exact else ("no" if r.seconds is not None else "-")
        if r.error:
            exact += " (%s%s)" % (r.error, ", %.1f of %g MB %s" % (
                r.moved / MB, size / MB, "sent" if r.direction == "up" else "received")
                if r.seconds is None and r.moved else "")
        retrans = fmt(r.retrans, "d", "n/a" if r.tool == "link" else "-")
        cells = ("%g MB" % (size / MB), "%g ms" % r.rtt, "%g%%" % r.loss, r.tool,
                 r.direction) + (("%d" % (r.repeat + 1),) if repeats > 1 else ()) + (
                 fmt(r.seconds, ".2f"), fmt(r.first, ".2f"), fmt(r.rate, ".1f")) + (
                 (link_bbr or "-",) if ratio else ()) + (
                 retrans, fmt(r.dropped, "d"), fmt(r.cpu, ".1f"), exact)
        print("  ".join(c.rjust(w) if w else c for c, w in zip(cells, widths)))


def median(results):
    """The median of a cell's repeats: (status, MB/s or None, the lower middle Result).
    A transfer that did not finish ranks below every one that did; with an even count the
    two middle rates are averaged when both finished, else the lower middle stands."""
    ranked = sorted(results, key=lambda r: (r.status == "ok", r.rate or 0.0,
                                            r.status == "timeout", r.moved))
    n = len(ranked)
    low, high = ranked[(n - 1) // 2], ranked[n // 2]
    if low.status == "ok" and high.status == "ok":
        return "ok", (low.rate + high.rate) / 2, low
    return low.status, None, low


def summarize(rows, rtts, losses, directions, tools):
    """One entry per (rtt, loss, direction, tool) that ran, in matrix order."""
    cells = {}
    for r in rows:
        cells.setdefault(r.key(), []).append(r)
    out = []
    for rtt, loss, direction, tool in itertools.product(rtts, losses, directions, tools):
        got = cells.get((rtt, loss, direction, tool))
        if not got:
            continue
        status, rate, typical = median(got)
        out.append({"rtt_ms": rtt, "loss": loss, "direction": direction, "tool": tool,
                    "status": status, "mbps": rate, "runs": len(got),
                    "finished": sum(r.status == "ok" for r in got),
                    "inexact": sum(r.seconds is not None and not r.exact for r in got),
                    "moved": typical.moved})
    return out


def print_summary(summary, rtts, losses, directions, tools, timeout, repeats):
    by = {(s["rtt_ms"], s["loss"], s["direction"], s["tool"]): s for s in summary}
    ratio = "link" in tools and "bbr" in tools
    for direction in directions:
        print()
        print("summary, %s (MB/s%s; timeout: not done within %g s):" % (
            direction, ", median of %d" % repeats if repeats > 1 else "", timeout))
        head = ["rtt", "loss"] + list(tools) + (["link/bbr"] if ratio else [])
        widths = [6, 5] + [max(8, len(t)) for t in tools] + ([8] if ratio else [])
        print("  " + "  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for rtt, loss in itertools.product(rtts, losses):
            cells = ["%g ms" % rtt, "%g%%" % loss]
            for tool in tools:
                s = by.get((rtt, loss, direction, tool))
                text = "-" if s is None else (fmt_rate(s["mbps"]) if s["status"] == "ok"
                                              else s["status"])
                if s is not None and s["inexact"]:
                    text += "!"
                cells.append(text)
            if ratio:
                link, bbr = by.get((rtt, loss, direction, "link")), by.get(
                    (rtt, loss, direction, "bbr"))
                cells.append(ratio_text(link, bbr, timeout) or "-")
            print("  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    if any(s["inexact"] for s in summary):
        print("  (!: a transfer of that cell finished without the exact bytes)")


def print_targets(rows, size):
    print()
    print("targets (link at rtt 0):")
    for label, loss, kind, bound in TARGETS:
        got = [r for r in rows if r.tool == "link" and r.loss == loss and r.rtt == 0]
        if not got:
            print("  %-34s not measured (needs rtt 0 and loss %g)" % (label, loss))
            continue
        if kind == "seconds" and size != 20 * MB:
            print("  %-34s not measured (needs --megabytes 20)" % label)
            continue
        parts, met = [], True
        for r in got:
            if kind == "seconds":
                ok = r.exact and r.seconds is not None and r.seconds < bound
                parts.append("%s %s s" % (r.direction, fmt(r.seconds, ".2f", "timed out")))
            else:
                ok = r.exact and r.rate is not None and r.rate >= bound
                parts.append("%s %s MB/s" % (r.direction, fmt(r.rate, ".1f", "-")))
            met = met and ok
        print("  %-34s %s  (%s)" % (label, "MET" if met else "NOT MET", ", ".join(parts)))


def log_ticks(low, high):
    """Tick values 1, 2, 5 x 10**k from the decade at or below `low` to the one at or above
    `high`: (bottom, top, ticks)."""
    bottom, top = 10.0 ** math.floor(math.log10(low)), 10.0 ** math.ceil(math.log10(high))
    if top <= bottom:
        top = bottom * 10
    ticks, decade = [], bottom
    while decade < top * 1.001:
        ticks += [decade * m for m in (1, 2, 5) if decade * m <= top * 1.001]
        decade *= 10
    return bottom, top, ticks


def write_svg(path, summary, rtts, losses, directions, tools, title):
    """`title`: two lines.  MB/s against loss, one line per tool, one panel per (direction, rtt): columns are
    RTTs, rows directions.  The y axis is logarithmic and shared, so that equal ratios
    (link/bbr) look equal everywhere; a transfer that did not finish is drawn as a cross
    under the axis, and its tool's line breaks there."""
    by = {(s["rtt_ms"], s["loss"], s["direction"], s["tool"]): s for s in summary}
    rates = [s["mbps"] for s in summary if s["mbps"]] or [1.0]
    bottom, top, ticks = log_ticks(min(rates), max(rates))
    pw, ph = 300, 240                   # a panel's plot area
    left, right, upper, lower = 60, 20, 40, 60
    cw, chh = left + pw + right, upper + ph + lower
    legend_h = 70
    width, height = max(cw * len(rtts), 720), legend_h + chh * len(directions)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="12">' % (width, height),
           '<rect width="100%" height="100%" fill="white"/>']
    for y, line, size in zip((18, 36), title, (15, 12)):
        out.append('<text x="%d" y="%d" font-size="%d" text-anchor="middle">%s</text>'
                   % (width / 2, y, size, escape(line)))
    x = 20
    for tool in tools:
        out.append('<line x1="%d" y1="56" x2="%d" y2="56" stroke="%s" stroke-width="%g"/>'
                   % (x, x + 24, COLOURS[tool], 3 if tool == "link" else 2))
        out.append('<text x="%d" y="60">%s</text>' % (x + 30, escape(tool)))
        x += 30 + 8 * len(tool) + 20
    out.append('<text x="%d" y="60" fill="#555">&#215; under the axis: did not finish'
               '</text>' % x)
    n = len(losses)

    def px(i):
        return pw * (i + 0.5) / n

    def py(v):
        return ph * (1 - math.log10(v / bottom) / math.log10(top / bottom))

    for row, direction in enumerate(directions):
        for col, rtt in enumerate(rtts):
            ox, oy = col * cw + left, legend_h + row * chh + upper
            out.append('<g transform="translate(%d,%d)">' % (ox, oy))
            out.append('<text x="%d" y="-10" text-anchor="middle" font-size="13">%s, rtt %g '
                       'ms</text>' % (pw / 2, direction, rtt))
            for tick in ticks:
                major = abs(math.log10(tick) - round(math.log10(tick))) < 1e-9
                out.append('<line x1="0" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>'
                           % (py(tick), pw, py(tick), "#bbb" if major else "#eee"))
                out.append('<text x="-6" y="%.1f" text-anchor="end"%s>%g</text>'
                           % (py(tick) + 4, "" if major else ' fill="#777" font-size="10"',
                              float("%.3g" % tick)))
            out.append('<rect width="%d" height="%d" fill="none" stroke="#444"/>' % (pw, ph))
            for i, loss in enumerate(losses):
                out.append('<text x="%.1f" y="%d" text-anchor="middle">%g %%</text>'
                           % (px(i), ph + 30, loss))
            out.append('<text x="%d" y="%d" text-anchor="middle">loss</text>'
                       % (pw / 2, ph + 48))
            out.append('<text transform="translate(-42,%d) rotate(-90)" '
                       'text-anchor="middle">MB/s</text>' % (ph / 2))
            for k, tool in enumerate(tools):
                colour = COLOURS[tool]
                wide = 3 if tool == "link" else 2
                segment = []
                for i, loss in enumerate(losses):
                    s = by.get((rtt, loss, direction, tool))
                    if s is not None and s["status"] == "ok":
                        segment.append((px(i), py(s["mbps"])))
                        out.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title>%s: '
                                   '%.2f MB/s</title></circle>' % (
                                       px(i), py(s["mbps"]), colour, tool, s["mbps"]))
                        continue
                    if len(segment) > 1:
                        out.append(polyline(segment, colour, wide))
                    segment = []
                    if s is not None:       # a cross under the axis, tools side by side
                        cx = px(i) + (k - (len(tools) - 1) / 2) * 9
                        out.append('<path d="M%.1f,%d l6,6 m0,-6 l-6,6" stroke="%s" '
                                   'stroke-width="2"><title>%s: %s</title></path>' % (
                                       cx - 3, ph + 6, colour, tool, s["status"]))
                if len(segment) > 1:
                    out.append(polyline(segment, colour, wide))
            out.append('</g>')
    out.append('</svg>')
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def polyline(points, colour, wide):
    return '<polyline fill="none" stroke="%s" stroke-width="%g" points="%s"/>' % (
        colour, wide, " ".join("%.1f,%.1f" % p for p in points))


def git(*args, root=ROOT):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=10)
        if res.returncode == 0:
            return res.stdout.strip()
    return None


def machine():
    """{"host", "cpu", "cpus", "memory_gb", "kernel", "python", "openssh", "udpmux",
    "commit", "dirty", "load"}: what the figures were measured on."""
    import udpmux
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True) if shutil.which(
        "ssh") else None
    status = git("status", "--porcelain", "--", "udpmux")
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": "%s %s" % (platform.release(), platform.machine()),
            "python": platform.python_version(),
            "openssh": ssh.stderr.strip() if ssh else None,
            "udpmux": udpmux.__version__, "commit": git("rev-parse", "HEAD"),
            "dirty": None if status is None else len(status.splitlines()),
            "load": ["%.2f" % v for v in os.getloadavg()]}


def print_machine(m):
    print("machine: %s, %s, %d CPUs, %g GB" % (m["host"], m["cpu"], m["cpus"],
                                              m["memory_gb"]))
    print("kernel %s; Python %s; %s; load average %s at the start" % (
        m["kernel"], m["python"], m["openssh"] or "no ssh", " ".join(m["load"])))
    dirty = ("udpmux/ as committed" if m["dirty"] == 0 else
             "udpmux/ HAS %s UNCOMMITTED FILES (the working tree is what runs)" % m["dirty"]
             if m["dirty"] else "udpmux/ state unknown")
    print("udpmux %s (%s, commit %s; %s)" % (m["udpmux"], ROOT, m["commit"] or "?", dirty))


def lab_tcp(lab, ssh_cc):
    """Set the end hosts' TCP (no metrics cache; congestion control `ssh_cc` on their
    default routes, for ssh) and return what the lab's TCP runs with, as {name: value}."""
    settings = {}
    for host in ("outside", "public"):
        with lab.netns(host):
            with open("/proc/sys/net/ipv4/tcp_no_metrics_save", "w") as f:
                f.write("1")
            for key in ("tcp_rmem", "tcp_wmem", "tcp_slow_start_after_idle",
                        "tcp_congestion_control"):
                with open("/proc/sys/net/ipv4/" + key) as f:
                    settings.setdefault(key, {})[host] = " ".join(f.read().split())
        route = lab.run(host, ["ip", "route", "show", "default"], capture_output=True,
                        text=True, check=True).stdout.split()
        if "congctl" in route:
            del route[route.index("congctl"):route.index("congctl") + 2]
        lab.run(host, ["ip", "route", "replace", *route, "congctl", ssh_cc],
                capture_output=True, text=True, check=True)
        route = lab.run(host, ["ip", "route", "show", "default"], capture_output=True,
                        text=True, check=True).stdout.strip()
        settings.setdefault("default route", {})[host] = route
    return {k: v["outside"] if v["outside"] == v["public"] else v for k, v in settings.items()}


def number_list(text, what, parser):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error("%s: a comma list of numbers, not %r" % (what, text))
    if not values or any(v < 0 for v in values):
        parser.error("%s: a comma list of numbers >= 0, not %r" % (what, text))
    return values


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_target"]:
        return target_main(argv[1:])
    if argv[:1] == ["_ssh"]:
        return ssh_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tools/bench_link.py", description=(
        "Throughput of udpmux link beside TCP (cubic, BBR) and ssh in the network lab, "
        "over a matrix of round-trip times and losses."))
    parser.add_argument("--megabytes", type=float, default=20.0,
                        help="MB (2**20 bytes) per transfer [20]")
    parser.add_argument("--rtt", default="0,50,200",
                        help="round-trip times in ms, comma list (wan delays each way by "
                             "half) [0,50,200]")
    parser.add_argument("--loss", default="0,1,5,10",
                        help="loss percents, UDP and TCP alike, comma list [0,1,5,10]")
    parser.add_argument("--directions", default="up,down",
                        help="up (outside -> public), down, or both [up,down]")
    parser.add_argument("--tools", default=DEFAULT_TOOLS,
                        help="what to measure, in this order within each cell: some of %s "
                             "[%s]" % (",".join(TOOLS), DEFAULT_TOOLS))
    parser.add_argument("--no-tcp", action="store_true",
                        help="skip the plain TCP rows (cubic and bbr)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each cell's tools N times, interleaved; report the "
                             "median [1]")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a transfer may take before it stops as timed out [30]")
    parser.add_argument("--ssh-cc", default="cubic",
                        help="TCP congestion control on the lab hosts' default routes, "
                             "which ssh uses [cubic]")
    parser.add_argument("--scenarios", default="",
                        help="after the matrix, some of %s (comma list; module docstring) "
                             "[none]" % ",".join(SCENARIOS))
    parser.add_argument("--no-matrix", action="store_true",
                        help="run the scenarios only, not the throughput matrix")
    parser.add_argument("--scenario-rtt", type=float, default=50.0,
                        help="round trip of every scenario, ms [50]")
    parser.add_argument("--roams", type=int, default=3,
                        help="roams in the roam scenario, %g s apart [3]" % ROAM_EVERY)
    parser.add_argument("--blackout-megabytes", type=float, default=40.0,
                        help="MB of the blackout scenario's download [40]")
    parser.add_argument("--blackout-seconds", type=float, default=20.0,
                        help="seconds UDP is blocked in the blackout scenario [20]")
    parser.add_argument("--keys-loss", default="0,1",
                        help="loss percents the keys scenario runs at, comma list [0,1]")
    parser.add_argument("--keys-seconds", type=float, default=15.0,
                        help="seconds of bulk download in each keys session [15]")
    parser.add_argument("--before", metavar="TREE",
                        help="a udpmux source tree (e.g. `git worktree add /tmp/old "
                             "COMMIT`) whose link the tool 'before' runs")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--svg", metavar="PATH", help="plot MB/s against loss as SVG")
    args = parser.parse_args(argv)
    rtts = number_list(args.rtt, "--rtt", parser)
    losses = number_list(args.loss, "--loss", parser)
    if any(loss > 100 for loss in losses):
        parser.error("--loss: percents within 0..100")
    directions = [d for d in args.directions.split(",") if d]
    if not set(directions) <= {"up", "down"} or not directions:
        parser.error("--directions: up and/or down")
    tools = [t for t in args.tools.split(",") if t]
    if not tools or not set(tools) <= set(TOOLS) or len(set(tools)) != len(tools):
        parser.error("--tools: some of %s, each once" % ",".join(TOOLS))
    if args.no_tcp:
        tools = [t for t in tools if t not in TCP_TOOLS]
    if ("before" in tools) != bool(args.before):
        parser.error("--before TREE and the tool 'before' go together")
    if args.before:
        args.before = os.path.abspath(args.before)
        if not os.path.isfile(os.path.join(args.before, "udpmux", "link.py")):
            parser.error("--before: %s holds no udpmux/link.py" % args.before)
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    size = int(args.megabytes * MB)
    scenarios = [x for x in args.scenarios.split(",") if x]
    if not set(scenarios) <= set(SCENARIOS) or len(set(scenarios)) != len(scenarios):
        parser.error("--scenarios: some of %s, each once" % ",".join(SCENARIOS))
    if args.no_matrix and not scenarios:
        parser.error("--no-matrix: only with --scenarios")
    args.keys_loss = number_list(args.keys_loss, "--keys-loss", parser)
    if args.roams < 1 or args.scenario_rtt < 0 or args.blackout_seconds <= 0:
        parser.error("--roams at least 1, --scenario-rtt >= 0, --blackout-seconds > 0")
    matrix = not args.no_matrix
    if not matrix:
        rtts, losses, tools = [], [], []

    command = [sys.executable] + sys.argv
    print("command: %s" % shlex.join(command))
    info = machine()
    print_machine(info)
    if args.before:
        info["before"] = {"tree": args.before, "commit": git("rev-parse", "HEAD",
                                                            root=args.before)}
        print("before: udpmux link of %s, commit %s" % (args.before,
                                                        info["before"]["commit"] or "?"))
    reason = lablib.Lab.unavailable()
    if reason is None and (any(rtts) or (scenarios and args.scenario_rtt)):
        reason = lablib.delay_unavailable()
    if reason is None and (set(tools) & set(SSH_TOOLS) or "keys" in scenarios) and not (
            os.path.exists("/usr/sbin/sshd") and shutil.which("ssh")
            and shutil.which("ssh-keygen")):
        reason = "the ssh rows and keys need OpenSSH: apt-get install openssh-server openssh-client"
    if reason:
        print("bench_link: " + reason, file=sys.stderr)
        return 2
    data = payload(size)
    started = time.monotonic()
    began = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    scenario_results = {}
    lab = lablib.Lab()
    tmp = tempfile.mkdtemp(prefix="bench_link-")
    bench = Bench(lab, data, args.timeout, directions, tmp)
    bench.before = args.before
    tcp = {}
    try:
        lab.up()
        tcp = lab_tcp(lab, args.ssh_cc)
        print("lab %s: outside %s behind nat_out %s, public %s"
              % (lab.prefix, lab.addr("outside"), lab.public_addr("out"), lab.addr("public")))
        print("lab TCP: %s" % "; ".join("%s %s" % (k, v if isinstance(v, str) else ", ".join(
            "%s: %s" % hv for hv in v.items())) for k, v in tcp.items()))
        if scenarios:
            print("scenarios: %s at rtt %g ms (roam: %d roams; blackout: %g MB down, %g s "
                  "of UDP blocked; keys: %g s sessions at loss %s %%)" % (
                      ",".join(scenarios), args.scenario_rtt, args.roams,
                      args.blackout_megabytes, args.blackout_seconds, args.keys_seconds,
                      ",".join("%g" % v for v in args.keys_loss)))
        if matrix:
            print("matrix: rtt %s ms x loss %s %% x %s; tools %s; %g MB each; repeat %d; "
                  "timeout %g s" % (",".join("%g" % v for v in rtts),
                                    ",".join("%g" % v for v in losses), ",".join(directions),
                                    ",".join(tools), size / MB, args.repeat, args.timeout))
        print()
        sizes = [size] if matrix else []
        if "blackout" in scenarios:
            sizes.append(int(args.blackout_megabytes * MB))
        bench.target = Target(lab, sizes or [size])
        if set(tools) & set(SSH_TOOLS) or "keys" in scenarios:
            bench.sshd = Sshd(lab, tmp, data)
        for rtt in rtts:
            lab.set_delay(rtt / 2)
            for loss in losses:
                lab.set_loss(loss, protocols=("udp", "tcp"))
                for repeat in range(args.repeat):
                    for tool in tools:
                        got = run_tool(bench, tool, rtt, loss, repeat)
                        for r in got:
                            print("  measured: %s, %s %s%s: %s" % (
                                where(rtt, loss), r.tool, r.direction,
                                " (%d)" % (repeat + 1) if args.repeat > 1 else "",
                                "%.2f s, %.2f MB/s" % (r.seconds, r.rate)
                                if r.seconds is not None else r.error), flush=True)
                        rows += got
            lab.set_loss(0)
            if rtt:
                counts = lab.delay_counters()
                lab.set_delay(0)
                bench.notes.append("delay line at rtt %g ms: %s" % (rtt, ", ".join(
                    "%s %s" % kv for kv in (counts or {}).items()) or "no counters"))
        if scenarios:
            if matrix:
                print()
            scenario_results = run_scenarios(bench, scenarios, args)
    finally:
        if bench.sshd is not None:
            bench.sshd.stop()
        if bench.target is not None:
            bench.target.stop()
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    summary = summarize(rows, rtts, losses, directions, tools) if matrix else []
    if matrix:
        print_table(rows, size, args.timeout, args.repeat)
        if any(r.tool == "link" for r in rows) and all(
                r.retrans is None for r in rows if r.tool == "link"):
            print("  (link retrans n/a: the engine-stats lines carried no number for "
                  "\"lost\")")
        print_summary(summary, rtts, losses, directions, tools, args.timeout, args.repeat)
        print_targets(rows, size)
        print()
    if scenarios:
        print_scenarios(scenario_results)
        print()
    for note in bench.notes:
        print(note)
    for text in bench.stacks:
        print(text)
    if bench.leftovers:
        print("%d session(s) left a process behind: see the notes" % bench.leftovers)
    total = time.monotonic() - started
    print("total %.1f s" % total)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "started": began, "seconds": round(total, 1),
                       "machine": info, "lab_tcp": tcp, "megabytes": size / MB,
                       "timeout": args.timeout, "repeat": args.repeat, "rtts_ms": rtts,
                       "losses": losses, "directions": directions, "tools": tools,
                       "ssh_cc": args.ssh_cc,
                       "summary": summary, "scenarios": scenario_results,
                       "transfers": [r.as_dict() for r in rows], "notes": bench.notes},
                      f, indent=1)
            f.write("\n")
        print("wrote %s" % args.json)
    if args.svg and matrix:
        title = ("udpmux link beside TCP and ssh: MB/s against loss",
                 "%g MB per transfer%s, timeout %g s; commit %s; %s; %s" % (
                     size / MB, ", median of %d" % args.repeat if args.repeat > 1 else "",
                     args.timeout, (info["commit"] or "?")[:10] + (
                         " + uncommitted udpmux/" if info["dirty"] else ""),
                     info["host"], began[:10]))
        write_svg(args.svg, summary, rtts, losses, directions, tools, title)
        print("wrote %s" % args.svg)
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
