"""Prometheus metrics: the figures of `udpmux status`, served over HTTP by the master.

Set `metrics_listen` (udpmux.conf(5)) or --metrics-listen to a local address, and
GET /metrics returns the text exposition format (version 0.0.4).  The server lives
in the master's selector loop: every connection is non-blocking, its request is
bounded in size and time, at most MAX_CLIENTS are served at once, and the answer is
built from shared memory, so scraping never disturbs a worker.

    # TYPE udpmux_datagrams_total counter
    udpmux_datagrams_total{tunnel="wg",direction="in"} 1520
"""

import errno
import selectors
import socket
import time

from udpmux.addr import format_endpoint
from udpmux.errors import Fatal

MAX_CLIENTS = 16
MAX_REQUEST = 8192
CLIENT_TIMEOUT = 2.0
PAIR_PATHS = ("waiting", "punching", "relayed", "direct")

# (name, type, help, value of a tunnel's status) for one sample per tunnel.
TUNNEL_METRICS = [
    ("udpmux_tunnel_up", "gauge", "1 when the tunnel's worker is running.",
     lambda t: int(t["state"] == "running")),
    ("udpmux_worker_restarts_total", "counter", "Times the tunnel's worker was respawned.",
     lambda t: t["restarts"]),
    ("udpmux_worker_cpu_seconds_total", "counter", "CPU time of the tunnel's worker.",
     lambda t: t["cpu_seconds"]),
    ("udpmux_worker_memory_bytes", "gauge", "Resident memory of the tunnel's worker.",
     lambda t: t["memory_bytes"]),
    ("udpmux_flows", "gauge", "Flows in the tunnel's table.", lambda t: t["flows"]),
    ("udpmux_flows_max", "gauge", "The tunnel's max_flows.", lambda t: t["max_flows"]),
    ("udpmux_flows_probe_max", "gauge",
     "The longest probe in the tunnel's flow table, in cells past a flow's home.",
     lambda t: t["probe_max"]),
    ("udpmux_flows_created_total", "counter", "Flows created.",
     lambda t: t["counters"].get("flows", 0)),
    ("udpmux_flows_evicted_total", "counter", "Flows evicted to make room for new ones.",
     lambda t: t["counters"].get("evicted", 0)),
    ("udpmux_flows_expired_total", "counter", "Flows ended by flow_idle at the relay.",
     lambda t: t["counters"].get("expired", 0)),
    ("udpmux_flows_closed_total", "counter", "Flows the exposer closed.",
     lambda t: t["counters"].get("closed", 0)),
    ("udpmux_exposer_up", "gauge", "1 while an exposer is registered.",
     lambda t: int(bool(t["exposer"]))),
    ("udpmux_exposer_heard_seconds", "gauge", "Seconds since the exposer was last heard.",
     lambda t: t["exposer"]["heard_ago"] if t["exposer"] else None),
    ("udpmux_exposer_sessions_total", "counter", "Sessions the exposer started.",
     lambda t: t["counters"].get("sessions", 0)),
    ("udpmux_exposer_roams_total", "counter", "Times the exposer's address changed.",
     lambda t: t["counters"].get("roams", 0)),
]


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(status):
    """The text exposition of a status reply (status.StatusServer.status())."""
    lines = []

    def family(name, kind, text, samples):
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
            lines.append(f"{name}{{{inner}}} {value}")

    tunnels = status["tunnels"]
    for name, kind, text, get in TUNNEL_METRICS:
        family(name, kind, text, [((("tunnel", t["name"]),), get(t)) for t in tunnels])
    for name, counter, text in (("udpmux_datagrams_total", "datagrams", "Datagrams carried"),
                                ("udpmux_bytes_total", "bytes", "Bytes of datagrams carried")):
        family(name, "counter", f"{text}: in from clients, out to them.",
               [((("tunnel", t["name"]), ("direction", d)),
                 t["counters"].get(f"{counter}_{d}", 0))
                for t in tunnels for d in ("in", "out")])
    family("udpmux_drops_total", "counter", "Datagrams and messages dropped, by reason.",
           [((("tunnel", t["name"]), ("reason", reason)), n)
            for t in tunnels for reason, n in sorted(t["drops"].items())])
    family("udpmux_punch_pairs", "gauge",
           "Punch pairs of a rendezvous tunnel, by path: waiting for a partner, "
           "punching, relayed or direct.",
           [((("tunnel", t["name"]), ("path", path)),
             sum(1 for p in t["pairs"] if p["path"] == path))
            for t in tunnels if t.get("pairs") is not None for path in PAIR_PATHS])
    family("udpmux_uptime_seconds", "gauge", "Seconds since the relay started.",
           [((), status["uptime"])])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """The master's HTTP endpoint; `answer()` returns the current status dict."""

    def __init__(self, selector, endpoint, answer, log):
        self.selector = selector
        self.endpoint = endpoint
        self.answer = answer
        self.log = log
        self.sock = None
        self.clients = {}       # socket -> (bytes read, deadline)

    def open(self):
        family, sockaddr = self.endpoint
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            where = format_endpoint(family, sockaddr)
            raise Fatal(f"metrics_listen: cannot listen on {where}: {exc.strerror}",
                        status=77 if exc.errno == errno.EACCES else 71) from None
        sock.setblocking(False)
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)
        self.log.info("metrics at http://%s/metrics",
                      format_endpoint(family, sock.getsockname()))
        return sock

    def sockets(self):
        return ([self.sock] if self.sock is not None else []) + list(self.clients)

    def on_accept(self):
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        self.clients[conn] = (b"", time.monotonic() + CLIENT_TIMEOUT)
        self.selector.register(conn, selectors.EVENT_READ, lambda: self.on_read(conn))

    def on_read(self, conn):
        data, deadline = self.clients[conn]
        try:
            chunk = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.drop(conn)
            return
        data += chunk
        if b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) >= MAX_REQUEST:
                self.reply(conn, "431 Request Header Fields Too Large", "request too large\n")
            else:
                self.clients[conn] = (data, deadline)
            return
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            self.reply(conn, "405 Method Not Allowed", "GET /metrics\n")
        elif parts[1].split(b"?")[0] != b"/metrics":
            self.reply(conn, "404 Not Found", "the metrics are at /metrics\n")
        else:
            body = exposition(self.answer())
            self.reply(conn, "200 OK", body if parts[0] == b"GET" else "",
                       "text/plain; version=0.0.4; charset=utf-8", len(body.encode()))

    def reply(self, conn, code, body, kind="text/plain; charset=utf-8", length=None):
        payload = body.encode()
        head = (f"HTTP/1.0 {code}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(payload) if length is None else length}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            conn.setblocking(True)
            conn.settimeout(0.5)    # the answer fits the socket's buffer, or the client is stuck
            conn.sendall(head + payload)
        except OSError:
            pass
        self.drop(conn)

    def drop(self, conn):
        self.clients.pop(conn, None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def expire(self, now):
        for conn, (_data, deadline) in list(self.clients.items()):
            if now >= deadline:
                self.drop(conn)

    def close(self):
        for conn in list(self.clients):
            self.drop(conn)
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
