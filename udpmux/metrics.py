"""Prometheus metrics: the figures of `udpmux status`, served over HTTP by the relay's
master (and by every agent: agentstatus.py).

Set `metrics_listen` (udpmux.conf(5)) or --metrics-listen to a local address, and
GET /metrics returns the text exposition format (version 0.0.4).  The server lives
in the master's selector loop, on the same Connections as the control socket
(status.py): every connection is non-blocking, its request is bounded in size and
time, at most MAX_CLIENTS are held at once and a newcomer when full closes the oldest
(so idle connections cannot stop a scrape), the answer is written without blocking
(the rest on EVENT_WRITE), and it is built from shared memory, so scraping never
disturbs a worker.

    # TYPE udpmux_datagrams_total counter
    udpmux_datagrams_total{tunnel="wg",direction="in"} 1520
"""

from udpmux import sockets
from udpmux.addr import format_endpoint
from udpmux.status import Connections

MAX_REQUEST = 8192              # an HTTP request's head; the rest as the control socket's
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
    # An expose tunnel's exposer; a rendezvous tunnel has none and no samples.
    ("udpmux_exposer_up", "gauge", "1 while an exposer is registered.",
     lambda t: int(bool(t["exposer"])) if "exposer" in t else None),
    ("udpmux_exposer_heard_seconds", "gauge", "Seconds since the exposer was last heard.",
     lambda t: t["exposer"]["heard_ago"] if t.get("exposer") else None),
    ("udpmux_exposer_sessions_total", "counter", "Sessions the exposer started.",
     lambda t: t["counters"].get("sessions", 0) if "exposer" in t else None),
    ("udpmux_exposer_roams_total", "counter", "Times the exposer's address changed.",
     lambda t: t["counters"].get("roams", 0) if "exposer" in t else None),
]


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Families:
    """Lines of the text exposition, a metric family at a time."""

    def __init__(self):
        self.lines = []

    def __call__(self, name, kind, text, samples):
        """One family: samples are (((label, value), ...), value); a None value is left
        out."""
        lines = self.lines
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
            lines.append(f"{name}{{{inner}}} {value}")

    def text(self):
        return "\n".join(self.lines) + "\n"


def exposition(status):
    """The text exposition of a relay's status reply (status.StatusServer.status())."""
    family = Families()
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
    return family.text()


class MetricsServer(Connections):
    """The HTTP endpoint of the relay's master or of an agent; `answer()` returns the
    current status dict, `text(status)` its exposition."""

    def __init__(self, selector, endpoint, answer, log, what="metrics_listen",
                 text=None):
        super().__init__(selector, log, max_request=MAX_REQUEST)
        self.endpoint = endpoint
        self.answer = answer
        self.text = text or exposition  # a status reply's exposition: the relay's, or
                                        # an agent's (agentstatus.exposition)
        self.what = what                # the setting or option the address came from

    def open(self):
        family, sockaddr = self.endpoint
        sock = sockets.tcp_listener(family, sockaddr, self.what, backlog=16)
        self.listen(sock)
        self.log.info("metrics at http://%s/metrics",
                      format_endpoint(family, sock.getsockname()))
        return sock

    def complete(self, data):
        return b"\r\n\r\n" in data or b"\n\n" in data

    def too_large(self, data):
        return _http("431 Request Header Fields Too Large", "request too large\n")

    def respond(self, data):
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return _http("405 Method Not Allowed", "GET /metrics\n")
        if parts[1].split(b"?")[0] != b"/metrics":
            return _http("404 Not Found", "the metrics are at /metrics\n")
        body = self.text(self.answer())
        return _http("200 OK", body if parts[0] == b"GET" else "",
                     "text/plain; version=0.0.4; charset=utf-8", len(body.encode()))


def _http(code, body, kind="text/plain; charset=utf-8", length=None):
    """A whole HTTP/1.0 answer, closed after it."""
    payload = body.encode()
    head = (f"HTTP/1.0 {code}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(payload) if length is None else length}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return head + payload
