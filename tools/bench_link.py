#!/usr/bin/env python3
"""How fast is `udpmux link` on a clean and on a lossy path, next to plain TCP on the same path?

    sudo python3 tools/bench_link.py [--megabytes 20] [--loss 0,1,5] [--directions up,down]
                                     [--timeout 30] [--no-tcp]

A benchmark, not a test: run it by hand, as root, on an otherwise idle machine.  It builds
the network lab of tests/lab.py, moves --megabytes MB (MB = 2**20 bytes, the stricter
reading of the targets) through `udpmux link` and through one plain TCP connection at each
--loss percent, prints one row per transfer and then whether the project's targets are met:

    at 5 % loss, 20 MB in under 11 s         (each direction measured)
    on a clean path, at least 25 MB/s        (each direction measured)

The exact command line, the udpmux version (and the repository's commit), the kernel and
the Python version are printed first.  A default run takes about a minute.

The path (tests/lab.py; read its docstring)::

    outside 10.22.0.2 -- nat_out (masquerade) -- wan (random loss) -- public 203.0.113.10

  link  bench (in outside) -> TCP 127.0.0.1:47100 -> `udpmux link --listen-tcp` (outside)
        ==UDP through nat_out and wan==> `udpmux link-server` (public) -> TCP 127.0.0.1:5001
        -> the target (public).  Only the UDP leg crosses the lossy wan.
  TCP   bench (in outside) -> TCP 203.0.113.10:5001 through nat_out and wan -> the target.

Loss: `lab.set_loss(p, protocols=("udp", "tcp"))` makes wan drop p % of UDP datagrams and of
TCP segments alike (each packet in either direction, independently), so the link's UDP and
the baseline's TCP see the same loss.  There is no delay in the lab (no netem), so the RTT is
a fraction of a millisecond plus whatever the endpoints queue.  Each host's TCP metrics cache
is off (net.ipv4.tcp_no_metrics_save=1), so a lossy TCP row leaves no ssthresh behind for the
next.

Starting the server end: `udpmux link` starts `udpmux link-server` itself through
--ssh-command, as it would with ssh.  No sshd is used: the "ssh" is this script in its
`_ssh` role, run in the public host's namespace (`ip netns exec <public> python3
tools/bench_link.py _ssh --client ADDR DEST COMMAND`).  Like tests/fakessh.py it runs COMMAND
through /bin/sh, but it sets SSH_CONNECTION as sshd on the public host would (the client's
address as public sees it, nat_out's WAN address, and the public host's own address), so
link-server reports 203.0.113.10, the address the client must use through the lab, and not
fakessh's 127.0.0.1.  The bootstrap therefore crosses no network (and is not measured):
what is measured is the link's UDP carriage, not ssh's encryption.

The target (this script in its `_target` role, on public, port 5001) is a TCP sink and
source: a connection starts with a line, "PUT <id>" (the target reads to EOF, then
answers "<bytes> <sha256>") or "GET <n> <id>" (the target sends n bytes, then closes its
side); it reports each finished connection, by id, on its standard output.  The data are random.Random(seed).randbytes(n) on both sides, so the bench knows their sha256
without trusting the target; "exact" means the byte count and the sha256 match.

One row per transfer.  "up" is outside -> public (the bench sends, the target counts), "down"
is public -> outside.  Seconds run from before connect() until the target's answer ("up")
or EOF after the last byte ("down"), so they include opening the stream (the link) or the
TCP handshake.  For each loss percent one `udpmux link` session carries both directions one
after the other (its setup, before the first connection, is not counted); it is then
stopped with SIGTERM and must exit with status 0, and its link-server must be gone within
3 s (else it is reported and stopped by PID).  Every transfer is bounded by --timeout
(seconds): a row that does not finish says "timed out" (with the bytes moved) and, when
py-spy is installed, the stacks of both link processes are printed under the table.

Columns: "1st byte" is the seconds from the start until the first payload byte reached the
receiver (the target's own CLOCK_MONOTONIC stamp for "up", the bench's for "down"): where a
row is slow, it tells opening the stream from moving the bytes.  "link/TCP" is the link's
MB/s over TCP's for the same loss and direction.
"retrans" is the sender's retransmissions: for TCP, tcpi_total_retrans of the sending socket
(TCP_INFO); for the link, the "lost" figure of the sending end's last `--debug` engine-stats
line ("rtt .. cwnd .. lost ..", logged every 5 s; cumulative over the session; the bench waits
up to 6 s for a line logged after the transfers), or "n/a" when that line has no number.
"dropped" is the wan's loss counter over the row (packets dropped, both directions).
"CPU s" is user+system CPU seconds used during the row by the link client + link-server
(psutil), which shows when an end is CPU-bound (here each end has one core at best: this
machine's cores are shared by the two link processes, the bench and the target).
The link always runs with --debug: its log is how the bench knows that the session is up
(both ends' "session up" lines) and reads the engine's figures.

Every process started here is stopped by PID (Popen.send_signal, or tests/lab.py's
pidfd-based kill_pids); the lab is always torn down (try/finally; it also removes anything
left in its namespaces).  Only the standard library and psutil are used.
"""

import argparse
import contextlib
import hashlib
import itertools
import json
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
import threading
import time

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
LISTEN_PORT = 47100             # the link's --listen-tcp, on outside's loopback
BIND = "47000-47099"            # link-server's UDP ports
CHUNK = 256 * 1024
SETUP_TIMEOUT = 20.0            # seconds for a link session to come up
EXIT_TIMEOUT = 15.0             # seconds for `udpmux link` to exit after SIGTERM
SERVER_GONE = 3.0               # seconds for link-server to exit after the client did
STATS_WAIT = 6.0                # seconds to wait for a fresh engine-stats line
TARGET_IDLE = 120.0             # the target gives up on a silent connection
TCP_INFO_RETRANS = struct.Struct("I")   # tcpi_total_retrans: a u32 at byte 100 of tcp_info
TCP_INFO_RETRANS_AT = 100

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


# ---- the target: runs on "public" ----------------------------------------------------------

def target_main(argv):
    """`_target --port P --megabytes N`: serve PUT and GET (module docstring), one thread
    per connection; one JSON line per finished connection on stdout."""
    parser = argparse.ArgumentParser(prog="bench_link.py _target")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    args = parser.parse_args(argv)
    data = payload(args.size)
    lock = threading.Lock()

    def report(**fields):
        with lock:
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()

    def serve(conn):
        conn.settimeout(TARGET_IDLE)
        with conn:
            try:
                head = b""
                while b"\n" not in head and len(head) < 100:
                    chunk = conn.recv(100)
                    if not chunk:
                        return
                    head += chunk
                line, _, rest = head.partition(b"\n")
                words = line.split()
                tag = words.pop().decode() if len(words) > 1 else None   # the bench's id
                if words == [b"PUT"]:
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
                elif len(words) == 2 and words[0] == b"GET" and words[1].isdigit():
                    n = min(int(words[1]), len(data))
                    conn.sendall(memoryview(data)[:n])
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(CHUNK):          # the client closes once it has it all
                        pass
                    report(op="GET", id=tag, bytes=n, retrans=tcp_retrans(conn))
            except OSError as exc:
                report(op="error", error=str(exc))

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
    def __init__(self, path, loss, direction, size):
        self.path, self.loss, self.direction, self.size = path, loss, direction, size
        self.seconds = None             # None: it did not finish
        self.first = None               # seconds until the first byte reached the receiver
        self.moved = 0
        self.exact = False
        self.error = None
        self.retrans = None             # int, or None (unknown)
        self.dropped = None
        self.cpu = None                 # link client + server CPU seconds

    @property
    def rate(self):
        return self.size / MB / self.seconds if self.seconds else None


_transfers = itertools.count(1)


def transfer(lab, dst, r, data, digest, timeout, target):
    """Move `data` up or down (r.direction) over one TCP connection from outside to dst,
    filling in Result r: seconds (None if it did not finish), first, moved, exact, error,
    and for plain TCP the sender's retransmissions."""
    size = len(data)
    tag = "%s-%g-%s-%d" % (r.path, r.loss, r.direction, next(_transfers))
    sock = lab.socket("outside", type=socket.SOCK_STREAM)
    start = time.monotonic()
    deadline = start + timeout
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(dst)
        except OSError as exc:
            r.error = "connect: %s" % exc
            return
        sock.setblocking(False)
        up = r.direction == "up"
        head = ("PUT %s\n" % tag if up else "GET %d %s\n" % (size, tag)).encode()
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
                r.retrans = tcp_retrans(sock) if r.path == "TCP" else None
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
                if r.path == "TCP":
                    sock.close()                # the target reports once we closed
                    report = target.wait_report(tag, 2.0)
                    r.retrans = report.get("retrans") if report else None
            r.seconds = elapsed
            return
    finally:
        sock.close()


# ---- the processes -------------------------------------------------------------------------

class Target:
    """The sink/source on public, and the JSON lines it reports."""

    def __init__(self, lab, size):
        self.proc = lab.popen("public", [sys.executable, THIS, "_target", "--port",
                                         str(TARGET_PORT), "--size", str(size)],
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


class Link:
    """One `udpmux link --listen-tcp` on outside, its server started through the _ssh
    stand-in on public; its stderr (both ends' log with --debug) is collected."""

    def __init__(self, lab):
        self.lab = lab
        ssh = "%s netns exec %s %s %s _ssh --client %s" % (
            shutil.which("ip") or "/usr/sbin/ip", lab.ns("public"), shlex.quote(sys.executable),
            shlex.quote(THIS), lab.public_addr("out"))
        server = "PYTHONPATH=%s %s -m udpmux" % (shlex.quote(ROOT), shlex.quote(sys.executable))
        self.argv = [sys.executable, "-m", "udpmux", "link",
                     "--listen-tcp", "127.0.0.1:%d" % LISTEN_PORT,
                     "--ssh-command", ssh, "--server-command", server,
                     "--target", "127.0.0.1:%d" % TARGET_PORT, "--bind", BIND, "--debug",
                     "root@%s" % lab.addr("public")]
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.started = time.monotonic()
        self.proc = lab.popen("outside", self.argv, env=env, stdin=subprocess.DEVNULL,
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

    def public_pids(self):
        """Every process in public's namespace (as tests/lab.py's down() finds them)."""
        with contextlib.suppress(OSError):
            return set(lablib._pids_in({lablib._ns_inode(self.lab.ns("public"))}))
        return set()

    def cpu(self):
        total = 0.0
        for pid in (self.proc.pid, self.server_pid):
            if pid is None:
                continue
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

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



# ---- the benchmark -------------------------------------------------------------------------

def run_link(lab, target, loss, directions, data, digest, timeout, notes, stacks):
    rows = []
    link = Link(lab)
    up = None
    try:
        up = link.wait_up()
        if up is None:
            why = "the link session did not come up within %d s" % SETUP_TIMEOUT
            if link.proc.poll() is not None:
                why = "udpmux link exited with status %s" % link.proc.returncode
            notes.append("link at %g %% loss: %s; its log:\n%s" % (loss, why, link.log_text()))
            for direction in directions:
                r = Result("link", loss, direction, len(data))
                r.error = why
                rows.append(r)
            return rows
        server_pid = link.server_pid
        for direction in directions:
            r = Result("link", loss, direction, len(data))
            cpu0, drop0 = link.cpu(), lab.counter("wan", "loss")
            transfer(lab, ("127.0.0.1", LISTEN_PORT), r, data, digest, timeout, target)
            r.cpu = link.cpu() - cpu0
            r.dropped = lab.counter("wan", "loss") - drop0
            if r.seconds is None and shutil.which("py-spy"):
                stacks.append(py_spy(link, server_pid, "link %s at %g %% loss" % (
                    direction, loss)))
            rows.append(r)
        done = time.monotonic()
        # the sending end's cumulative "lost": the client for up, the server for down
        ends = {"up": link.proc.pid, "down": server_pid}
        for r in rows:
            r.retrans = link.lost_since(ends[r.direction], done)
        return rows
    finally:
        status = stop_proc(link.proc, EXIT_TIMEOUT)
        summary = "link session at %g %% loss: up in %s s; " % (loss, fmt(up, ".2f"))
        summary += "exit status %s" % status if status == 0 else \
            "EXIT STATUS %s (expected 0)" % status
        left = set()
        end = time.monotonic() + SERVER_GONE
        while time.monotonic() < end:
            left = link.public_pids() - {target.proc.pid}
            if not left:
                break
            time.sleep(0.05)
        if left:
            summary += "; LINK-SERVER LEFT BEHIND (pid %s), stopped by PID" % sorted(left)
            lablib.kill_pids(left)
        else:
            summary += "; link-server gone"
        notes.append(summary)
        errors = [l for l in link.lines if l[2] in ("ERROR", "WARNING", "CRITICAL")
                  or (l[1] is None and l[3].strip())]
        for _, pid, lvl, msg in errors[:10]:
            notes.append("  log: [%s] %s %s" % (pid, lvl, msg))


def run_tcp(lab, target, loss, directions, data, digest, timeout):
    rows = []
    for direction in directions:
        r = Result("TCP", loss, direction, len(data))
        drop0 = lab.counter("wan", "loss")
        transfer(lab, (lab.addr("public"), TARGET_PORT), r, data, digest, timeout, target)
        r.dropped = lab.counter("wan", "loss") - drop0
        rows.append(r)
    return rows


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


def fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def print_table(rows, size):
    tcp = {(r.loss, r.direction): r for r in rows if r.path == "TCP"}
    head = ("size", "loss", "path", "dir", "seconds", "1st byte", "MB/s", "link/TCP",
            "retrans", "dropped", "CPU s", "exact")
    widths = (6, 4, 4, 4, 7, 8, 6, 8, 7, 7, 5, 0)
    print("  ".join(h.rjust(w) if w else h for h, w in zip(head, widths)))
    for r in rows:
        ratio = None
        base = tcp.get((r.loss, r.direction))
        if r.path == "link" and r.rate and base is not None and base.rate:
            ratio = r.rate / base.rate
        exact = "yes" if r.exact else ("no" if r.seconds is not None else "-")
        if r.error:
            exact += " (%s%s)" % (r.error, ", %.1f of %g MB %s" % (
                r.moved / MB, size / MB, "sent" if r.direction == "up" else "received")
                if r.seconds is None and r.moved else "")
        retrans = fmt(r.retrans, "d", "n/a" if r.path == "link" else "-")
        cells = ("%g MB" % (size / MB), "%g%%" % r.loss, r.path, r.direction,
                 fmt(r.seconds, ".2f"), fmt(r.first, ".2f"), fmt(r.rate, ".1f"),
                 fmt(ratio, ".2f"), retrans,
                 fmt(r.dropped, "d"), fmt(r.cpu, ".1f"), exact)
        print("  ".join(c.rjust(w) if w else c for c, w in zip(cells, widths)))


def print_targets(rows, size, directions):
    print()
    print("targets:")
    for label, loss, kind, bound in TARGETS:
        got = [r for r in rows if r.path == "link" and r.loss == loss]
        if not got:
            print("  %-34s not measured (add %g to --loss)" % (label, loss))
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


def versions():
    import udpmux
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        commit = res.stdout.strip() or "?"
    return ("udpmux %s (%s, commit %s; udpmux/*.py may hold uncommitted work)"
            % (udpmux.__version__, ROOT, commit),
            "kernel %s %s; Python %s; %d CPUs" % (platform.release(), platform.machine(),
                                                  platform.python_version(), os.cpu_count()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_target"]:
        return target_main(argv[1:])
    if argv[:1] == ["_ssh"]:
        return ssh_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tools/bench_link.py", description=(
        "Throughput of udpmux link beside plain TCP in the network lab, at several losses."))
    parser.add_argument("--megabytes", type=float, default=20.0,
                        help="MB (2**20 bytes) per transfer [20]")
    parser.add_argument("--loss", default="0,1,5", help="loss percents, comma list [0,1,5]")
    parser.add_argument("--directions", default="up,down",
                        help="up (outside -> public), down, or both [up,down]")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a transfer may take before its row fails [30]")
    parser.add_argument("--no-tcp", action="store_true", help="skip the plain TCP rows")
    args = parser.parse_args(argv)
    losses = [float(x) for x in args.loss.split(",") if x]
    directions = [d for d in args.directions.split(",") if d]
    if not set(directions) <= {"up", "down"} or not directions:
        parser.error("--directions: up and/or down")
    size = int(args.megabytes * MB)

    print("command: %s" % shlex.join([sys.executable] + sys.argv))
    for line in versions():
        print(line)
    reason = lablib.Lab.unavailable()
    if reason:
        print("bench_link: " + reason, file=sys.stderr)
        return 2
    data = payload(size)
    digest = hashlib.sha256(data).hexdigest()
    started = time.monotonic()
    rows, notes, stacks = [], [], []
    lab = lablib.Lab()
    target = None
    try:
        lab.up()
        for host in ("outside", "public"):
            with lab.netns(host):
                with open("/proc/sys/net/ipv4/tcp_no_metrics_save", "w") as f:
                    f.write("1")
        print("lab %s: outside %s behind nat_out %s, public %s"
              % (lab.prefix, lab.addr("outside"), lab.public_addr("out"), lab.addr("public")))
        print()
        target = Target(lab, size)
        for loss in losses:
            lab.set_loss(loss, protocols=("udp", "tcp"))
            got = run_link(lab, target, loss, directions, data, digest, args.timeout,
                           notes, stacks)
            if not args.no_tcp:
                got += run_tcp(lab, target, loss, directions, data, digest, args.timeout)
            for r in got:
                print("  measured: %s %s at %g %% loss: %s" % (
                    r.path, r.direction, loss,
                    "%.2f s" % r.seconds if r.seconds is not None else r.error), flush=True)
            rows += got
        lab.set_loss(0)
    finally:
        if target is not None:
            target.stop()
        lab.down()
    print()
    print_table(rows, size)
    if any(r.path == "link" for r in rows) and all(
            r.retrans is None for r in rows if r.path == "link"):
        print("  (link retrans n/a: the engine-stats lines carried no number for \"lost\")")
    print_targets(rows, size, directions)
    print()
    for note in notes:
        print(note)
    for text in stacks:
        print(text)
    print("total %.1f s" % (time.monotonic() - started))
    ok = all(r.exact for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
