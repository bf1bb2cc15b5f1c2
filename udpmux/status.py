"""`udpmux status`, and the control socket the relay's master serves it from.

The master listens on a unix stream socket (mode 0660).  A client sends one line of
JSON and reads one JSON document back, then the master closes the connection:

    {"request": "status"}                    -> {"version", "pid", "uptime", "tunnels": [...]}
    {"request": "flows", "tunnel": NAME}     -> {"tunnel": NAME, "flows": [...]}

Everything comes from memory the workers share with the master (each tunnel's state
block and tag table) and from psutil, so asking never disturbs a worker.

No client can hold the master, whose loop also respawns workers (Connections, which the
metrics server shares): every accepted connection is non-blocking and sits in the
master's selector with its own buffer and deadline; at most MAX_CLIENTS are kept, and a
newcomer when full closes the oldest, so idle connections cannot lock `udpmux status`
out; a request must be whole within REQUEST_TIMEOUT (else an error reply), and a reply
larger than the socket's buffer is written as the client reads it, the rest on
EVENT_WRITE, for as long as the client keeps reading.
"""

import functools
import glob
import json
import os
import selectors
import socket
import stat
import time

import psutil

from udpmux import __version__, sockets
from udpmux.config import default_control_socket
from udpmux.errors import EXIT_FAILURE, EXIT_NOINPUT, EXIT_USAGE, Fatal

MAX_REQUEST = 4096
MAX_CLIENTS = 16                # control connections held at once; a newcomer closes the oldest
REQUEST_TIMEOUT = 2.0           # seconds from accept to a whole request line
REPLY_TIMEOUT = 10.0            # seconds a reply may wait for the client to read more of it
ACCEPT_PAUSE = 1.0              # seconds a listener rests after accept() failed (EMFILE)


class Client:
    """One accepted connection: what it sent, what is left to send, and its deadline."""

    __slots__ = ("data", "out", "deadline")

    def __init__(self, deadline):
        self.data = b""
        self.out = None         # a memoryview of the reply once there is one
        self.deadline = deadline


class Connections:
    """A listener's connections, served in the master's selector loop without blocking it.

    Each accepted connection is non-blocking and registered with the selector, with its own
    buffer and deadline.  At most `limit` are held: a newcomer when full closes the oldest.
    A request is bounded in size (`max_request`) and must be whole (`complete()`) within
    `timeout` of the accept, or `late()` says what to answer; the reply of `respond()` is
    sent as far as the socket takes it, the rest on EVENT_WRITE, and the connection closes
    once it is all sent, or when the client has read nothing for `reply_timeout`.
    The master calls expire(now) from its timers and closes sockets() in every worker.
    """

    def __init__(self, selector, log, limit=MAX_CLIENTS, max_request=MAX_REQUEST,
                 timeout=REQUEST_TIMEOUT, reply_timeout=REPLY_TIMEOUT):
        self.selector = selector
        self.log = log
        self.limit = limit
        self.max_request = max_request
        self.timeout = timeout
        self.reply_timeout = reply_timeout
        self.sock = None
        self.clients = {}       # socket -> Client, oldest first
        self.paused_until = None    # while accept() fails: when to listen again

    # -- what a server says (subclasses)

    def complete(self, data):
        """True once data holds a whole request."""
        raise NotImplementedError

    def respond(self, data):
        """The reply (bytes) to a whole request."""
        raise NotImplementedError

    def too_large(self, data):
        """The reply to max_request bytes that are not a whole request; None: just close."""
        return None

    def late(self, data):
        """The reply to a request not whole in time; None: just close."""
        return None

    def at_end(self, data):
        """The reply to a client that stopped sending (EOF) before a whole request;
        None: just close."""
        return None

    # -- the loop's side

    def listen(self, sock):
        sock.setblocking(False)
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def sockets(self):
        """The listener and every accepted connection: what a forked worker must close."""
        return ([self.sock] if self.sock is not None else []) + list(self.clients)

    def on_accept(self):
        def failed(exc):
            # Out of descriptors (EMFILE, ENFILE) or buffers: the listener would stay
            # readable and spin the loop, so it rests until expire() a second later.
            self.log.warning("%s: cannot accept a connection: %s; pausing for %g s",
                             type(self).__name__, exc.strerror or exc, ACCEPT_PAUSE)
            self.selector.unregister(self.sock)
            self.paused_until = time.monotonic() + ACCEPT_PAUSE
        for conn, _ in sockets.accepted(self.sock, self.limit, failed):
            while len(self.clients) >= self.limit:
                self.drop(next(iter(self.clients)))
            conn.setblocking(False)
            self.clients[conn] = Client(time.monotonic() + self.timeout)
            self.selector.register(conn, selectors.EVENT_READ,
                                   functools.partial(self.on_read, conn))
            self.on_read(conn)          # a client that wrote before we accepted: at once

    def on_read(self, conn):
        client = self.clients.get(conn)
        if client is None or client.out is not None:
            return
        try:
            chunk = conn.recv(self.max_request)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.send(conn, self.at_end(client.data))
            return
        client.data += chunk
        if self.complete(client.data):
            self.send(conn, self.respond(client.data))
        elif len(client.data) >= self.max_request:
            self.send(conn, self.too_large(client.data))

    def send(self, conn, reply):
        """Start writing reply (None: close now); the rest goes out on EVENT_WRITE."""
        client = self.clients.get(conn)
        if client is None:
            return
        if reply is None:
            self.drop(conn)
            return
        client.data = b""
        client.out = memoryview(reply)
        client.deadline = time.monotonic() + self.reply_timeout
        self.selector.modify(conn, selectors.EVENT_WRITE, functools.partial(self.on_write, conn))
        self.on_write(conn)

    def on_write(self, conn):
        client = self.clients.get(conn)
        if client is None:
            return
        try:
            sent = conn.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(conn)
            return
        client.out = client.out[sent:]
        if not client.out:
            self.drop(conn)
            return
        client.deadline = time.monotonic() + self.reply_timeout

    def expire(self, now):
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            if self.sock is not None:
                self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)
        for conn, client in list(self.clients.items()):
            if now < client.deadline or conn not in self.clients:
                continue
            if client.out is None:
                self.send(conn, self.late(client.data))
            else:
                self.drop(conn)         # it stopped reading its reply

    def drop(self, conn):
        self.clients.pop(conn, None)
        sockets.release(self.selector, conn)

    def close(self):
        for conn in list(self.clients):
            self.drop(conn)
        if self.sock is not None:
            sockets.release(self.selector, self.sock)
            self.sock = None


class ControlServer(Connections):
    """A control socket: one line of JSON in, one JSON document out (answer()).  The
    relay's master serves one (StatusServer), and so does every agent (agentstatus.py)."""

    def __init__(self, selector, path, log):
        super().__init__(selector, log)
        self.path = path
        self.started = time.monotonic()

    def open(self, quiet=False):
        """Listen on the path; on failure log why (quiet: not when another daemon holds
        the path) and serve no status (never fatal).  Returns the socket or None."""
        path = self.path
        directory = os.path.dirname(path) or "."
        try:
            if not os.path.isdir(directory):
                # Ours alone: only its owner (and root) may ask for status.
                os.makedirs(directory, mode=0o700)
            owner = os.stat(directory).st_uid
            if owner not in (os.geteuid(), 0):
                self.log.warning("control socket %s: %s belongs to another user (uid %d); "
                                 "serving no status", path, directory, owner)
                return None
            if _in_use(path):
                if not quiet:
                    self.log.warning("control socket %s is in use by another udpmux; "
                                     "`udpmux status` will not reach this one", path)
                return None
            if os.path.lexists(path):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    self.log.warning("control socket %s: exists and is not a socket; "
                                     "serving no status", path)
                    return None
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.bind(path)
            os.chmod(path, 0o660)
            sock.listen(16)
        except OSError as exc:
            self.log.warning("control socket %s: %s; serving no status", path,
                             exc.strerror or exc)
            return None
        self.listen(sock)
        return sock

    def close(self):
        listening = self.sock is not None
        super().close()
        if listening:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def complete(self, data):
        return b"\n" in data

    def respond(self, data):
        try:
            reply = self.answer(json.loads(data.split(b"\n", 1)[0]))
        except (OSError, ValueError, RecursionError) as exc:
            reply = {"error": f"bad request: {exc}"}
        return json.dumps(reply).encode() + b"\n"

    def at_end(self, data):
        return self.respond(data) if data.strip() else None

    def too_large(self, data):
        return _error(f"bad request: no end of line in {MAX_REQUEST} bytes")

    def late(self, data):
        return _error(f"bad request: the request took too long (over {REQUEST_TIMEOUT:g} s)")

    def answer(self, request):
        kind = request.get("request") if isinstance(request, dict) else None
        if kind == "status":
            return self.status()
        if kind == "flows":
            name = request.get("tunnel")
            if not isinstance(name, str):
                return {"error": f"a flows request names a tunnel, not {name!r}"}
            return self.flows(name)
        return {"error": f"unknown request {kind!r}"}

    def head(self, mode):
        """What every status reply starts with."""
        return {"mode": mode, "version": __version__, "pid": os.getpid(),
                "uptime": round(time.monotonic() - self.started, 3)}

    def status(self):
        raise NotImplementedError

    def flows(self, name):
        raise NotImplementedError


class StatusServer(ControlServer):
    """The relay master's control socket, served from the master's selector."""

    def __init__(self, selector, master, path, log):
        super().__init__(selector, path, log)
        self.master = master

    def status(self):
        master = self.master
        return {
            **self.head("relay"),
            "config": getattr(master.config, "path", None),
            "reload_error": getattr(master, "reload_error", None),
            "tunnels": [tunnel_status(t, master.kind) for t in master.tunnels.values()],
        }

    def flows(self, name):
        tunnel = self.master.tunnels.get(name)
        if tunnel is None:
            return {"error": f"no tunnel named {name!r}"}
        return {"tunnel": name, "flows": self.master.kind.flows(tunnel)}


def tunnel_status(tunnel, kind):
    """A tunnel as `udpmux status` shows it: its lifecycle and worker, as the master
    knows them, and what its kind says of it (kind.describe)."""
    info = {
        "name": tunnel.name,
        "state": tunnel.state,
        "worker_pid": tunnel.pid,
        "restarts": tunnel.restarts,
        "cpu_seconds": None,
        "memory_bytes": None,
        **kind.describe(tunnel),
    }
    if tunnel.pid is not None:
        try:
            process = psutil.Process(tunnel.pid)
            times = process.cpu_times()
            info["cpu_seconds"] = round(times.user + times.system, 3)
            info["memory_bytes"] = process.memory_info().rss
        except psutil.Error:
            pass
    return info


def _in_use(path):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _error(text):
    return json.dumps({"error": text}).encode() + b"\n"


# -- the client: `udpmux status`

def ask(path, request, timeout=5.0):
    """Send one request to a daemon's control socket and return the decoded reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise Fatal(f"{path}: no such control socket; is the daemon running? "
                    "(--control-socket names another)", status=EXIT_NOINPUT) from None
    except OSError as exc:
        raise Fatal(f"{path}: {exc.strerror or exc}; is the daemon running?") from None
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise Fatal(f"{path}: {exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise Fatal(f"{path}: the answer is not JSON") from None
    if "error" in reply:
        raise Fatal(reply["error"])
    return reply


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_status(reply):
    lines = [f"udpmux {reply['version']}, master {reply['pid']}, up {reply['uptime']:.0f} s"]
    if reply.get("reload_error"):
        lines.append(f"reload failed: {reply['reload_error']}; the running configuration "
                     "stays until a reload works")
    header = ("TUNNEL", "STATE", "WORKER", "CPU", "MEM", "FLOWS", "IN", "OUT", "DROPS",
              "AGENTS")
    rows = [header]
    for t in reply["tunnels"]:
        c = t["counters"]
        if t.get("mode") == "rendezvous":
            agents = f"{t['peers']} peer" + ("s" if t["peers"] != 1 else "")
        elif t.get("exposer"):
            agents = f"{t['exposer']['address']} ({t['exposer']['heard_ago']:.0f} s ago)"
        else:
            agents = "no exposer"
        rows.append((
            t["name"], t["state"], str(t["worker_pid"] or "-"),
            "-" if t["cpu_seconds"] is None else f"{t['cpu_seconds']:.1f} s",
            "-" if t["memory_bytes"] is None else _size(t["memory_bytes"]),
            f"{t['flows']}/{t['max_flows']}",
            f"{c.get('datagrams_in', 0)} ({_size(c.get('bytes_in', 0))})",
            f"{c.get('datagrams_out', 0)} ({_size(c.get('bytes_out', 0))})",
            str(sum(t["drops"].values())),
            agents,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for t in reply["tunnels"]:
        if t["drops"]:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(t["drops"].items()))
            lines.append(f"{t['name']} drops: {detail}")
    for t in reply["tunnels"]:
        if t.get("pairs"):
            rows = [("RENDEZVOUS", "LISTEN", "FORWARD", "PATH", "RELAYED")] + [
                (p["name"], p["listen"] or "-", p["forward"] or "-", p["path"],
                 f"{p['relayed_datagrams']} ({_size(p['relayed_bytes'])})")
                for p in t["pairs"]]
            widths = [max(len(row[i]) for row in rows) for i in range(5)]
            lines.append(f"\n{t['name']}: punch pairs")
            lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                      for row in rows]
    return "\n".join(lines)


def format_flows(reply):
    header = ("TAG", "CLIENT", "AGE", "IDLE", "IN", "OUT")
    rows = [header] + [
        (str(f["tag"]), f["client"], f"{f['age']:.0f} s", f"{f['idle']:.0f} s",
         f"{f['datagrams_in']} ({_size(f['bytes_in'])})",
         f"{f['datagrams_out']} ({_size(f['bytes_out'])})") for f in reply["flows"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


STATE_WORDS = {"hello": "handshaking (sending HELLO)", "up": "up", "idle": "idle",
               "connecting": "connecting", "waiting": "waiting to connect again",
               "punching": "punching", "waiting-peer": "waiting for the peer"}


def format_agent(reply):
    """An agent's status (agentstatus.py) as `udpmux status` prints it, the way `wg show`
    shows a peer: where it is, when it was last heard, what passed and what was dropped."""
    def ago(seconds):
        return "never" if seconds is None else f"{seconds:.0f} s ago"
    lines = [f"udpmux {reply['version']} {reply['mode']}, pid {reply['pid']}, "
             f"up {reply['uptime']:.0f} s"]
    if reply.get("reload_error"):
        lines.append(f"reload failed: {reply['reload_error']}; the running configuration "
                     "stays until a reload works")
    for peer in reply["peers"]:
        where = peer["name"]
        if peer.get("address") and peer["address"] != where:
            where += f" ({peer['address']})"
        lines.append(f"{peer['role']}: {where}")
        state = "  " + STATE_WORDS.get(peer["state"], peer["state"])
        if peer.get("carrier"):
            state += f" over {peer['carrier'].upper()}"
        if peer.get("path") and peer["state"] == "up":
            state += f", {peer['path']}"
        lines.append(state)
        lines.append(f"  latest handshake: {ago(peer.get('handshake_ago'))}, "
                     f"last heard: {ago(peer.get('heard_ago'))}")
        if peer.get("seen_as"):
            lines.append(f"  it sees us as {peer['seen_as']}")
        if peer.get("trouble"):
            lines.append(f"  trouble: {peer['trouble']}")
    c = reply["counters"]
    flows = f"flows: {reply['flows']}"
    if reply.get("max_flows") is not None:
        flows += f"/{reply['max_flows']}"
    if "flows" in c:
        flows += f", {c['flows']} since start"
    lines.append(flows)
    if reply.get("stream"):
        lines.append("stream: " + ", ".join(f"{k} {v}" for k, v in reply["stream"].items()))
    lines.append(f"transfer: {c.get('datagrams_in', 0)} datagrams "
                 f"({_size(c.get('bytes_in', 0))}) in, {c.get('datagrams_out', 0)} "
                 f"({_size(c.get('bytes_out', 0))}) out")
    if reply["drops"]:
        lines.append("drops: " + ", ".join(f"{k} {v}" for k, v in
                                           sorted(reply["drops"].items())))
    if reply.get("flow_list"):
        lines += ["", format_flows({"flows": reply["flow_list"]})]
        more = reply["flows"] - len(reply["flow_list"])
        if more > 0:
            lines.append(f"(and {more} more: `udpmux status --flows {reply['mode']}` "
                         "lists them all)")
    return "\n".join(lines)


# -- finding a daemon

def control_sockets():
    """The control sockets in the default places that a daemon answers on, sorted."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        patterns = [os.path.join(runtime, "*.sock")]
    elif os.geteuid() == 0:
        patterns = ["/run/udpmux/*.sock", "/run/udpmux-*/*.sock"]
    else:
        base = os.path.dirname(default_control_socket())
        patterns = [os.path.join(base, "udpmux-*.sock")]
    found = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    return [path for path in found if _in_use(path)]


def find_control_socket():
    """The relay's default control socket if a relay answers there, else the one agent's
    that answers; Fatal when none does, or when several do."""
    relay = default_control_socket()
    if _in_use(relay):
        return relay
    live = control_sockets()
    if len(live) == 1:
        return live[0]
    if not live:
        raise Fatal(f"no udpmux daemon answers here (the relay's control socket is "
                    f"{relay}); is it running? (--control-socket names another)",
                    status=EXIT_NOINPUT)
    raise Fatal("several udpmux daemons answer here; name one with --control-socket: "
                + ", ".join(live), status=EXIT_USAGE)


def main(args):
    path = args["--control-socket"] or find_control_socket()
    if args["--flows"]:
        reply = ask(path, {"request": "flows", "tunnel": args["--flows"]})
        text = format_flows(reply)
    else:
        reply = ask(path, {"request": "status"})
        text = format_status(reply) if "tunnels" in reply else format_agent(reply)
    print(json.dumps(reply, indent=2) if args["--json"] else text)
    return 0 if not any(t.get("state") == "failed" for t in reply.get("tunnels", [])) \
        else EXIT_FAILURE
