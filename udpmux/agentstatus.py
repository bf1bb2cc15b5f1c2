"""What an agent (expose, punch, uot-server, uot-client, link) shows of itself:
`udpmux status` over its control socket, and Prometheus metrics over HTTP.

Both are served from the agent's own loop, on the relay's Connections (status.py, so the
same bounds: non-blocking, bounded requests, a newcomer closes the oldest), and every
answer is built when it is asked from the agent's live objects: the figures are those of
the moment, never a second behind the traffic.  What an answer holds is the worker's
report(now):

    {"peers": [...],        where the agent sends: the relay, the other punch side, the
                            uot-server or its clients, the link-server; each with its
                            address, state, carrier, path, last handshake and last word
     "flows", "max_flows",  flows now and the bound
     "counters"}            datagrams and bytes in (from clients) and out (to them),
                            flows since the start

with its drops by reason (worker.drops, reasons.py) and the STATUS_FLOWS latest of its
flow_list(now, limit); `udpmux status --flows MODE` gets the whole flow_list(now).

The default control socket is named after the mode (config.default_control_socket);
when another daemon of the same mode holds it, this one takes MODE-PID.sock beside it and
says so.
"""

import os
import selectors
import time

from udpmux.addr import format_endpoint, format_peer
from udpmux.config import default_control_socket
from udpmux.metrics import Families, MetricsServer
from udpmux.status import ControlServer

STATUS_FLOWS = 20               # flows in a status reply, the latest first; --flows: all


class PollerSelector:
    """The selector calls Connections makes, on a worker's Poller."""

    def __init__(self, poller):
        self.poller = poller

    def register(self, sock, events, callback):
        if events & selectors.EVENT_WRITE:
            self.poller.register(sock, _nothing, callback)
            self.poller.interest(sock, False, True)
        else:
            self.poller.register(sock, callback)

    def modify(self, sock, events, callback):
        self.poller.unregister(sock)
        self.register(sock, events, callback)

    def unregister(self, sock):
        self.poller.unregister(sock)


def _nothing():
    """A socket that is only written: hang-ups show when it is written."""


class AgentControl(ControlServer):
    """An agent's control socket."""

    def __init__(self, selector, path, log, worker, mode, config_path):
        super().__init__(selector, path, log)
        self.worker = worker
        self.mode = mode
        self.config_path = config_path

    def answer(self, request):
        """A request answered; a report that fails is logged and answered with an
        error, and the agent goes on."""
        try:
            return super().answer(request)
        except Exception as exc:
            self.log.exception("`udpmux status` could not be answered")
            return {"error": f"internal error: {type(exc).__name__}: {exc}"}

    def status(self):
        worker = self.worker
        now = time.monotonic()
        return {**self.head(self.mode), "config": self.config_path,
                "reload_error": worker.reload_error, **worker.report(now),
                "drops": dict(worker.drops.counts),
                "flow_list": worker.flow_list(now, STATUS_FLOWS)}

    def flows(self, name):
        if name != self.mode:
            return {"error": f"this is udpmux {self.mode}: its flows are "
                             f"`udpmux status --flows {self.mode}`"}
        return {"tunnel": name, "flows": self.worker.flow_list(time.monotonic())}


class Inspector:
    """An agent's control socket and (if asked) metrics endpoint, opened in its loop
    once it is set up (Worker.serve), expired by its timers, closed at its end."""

    def __init__(self, mode, control_socket, metrics_listen, log, config_path=None,
                 quiet=False):
        self.mode = mode
        self.quiet = quiet                      # the socket's path only in the debug log
        self.control_socket = control_socket    # None: the mode's default
        self.metrics_listen = metrics_listen    # (family, sockaddr) or None
        self.log = log
        self.config_path = config_path          # metrics_listen from a file, or options
        self.servers = []

    def open(self, worker):
        selector = PollerSelector(worker.poller)
        given = self.control_socket is not None
        path = self.control_socket or default_control_socket(self.mode)
        control = AgentControl(selector, path, self.log, worker, self.mode, self.config_path)
        if control.open(quiet=not given) is None and not given:
            # Another of this mode holds the default: this one's own name beside it.
            stem, ext = os.path.splitext(path)
            control.path = f"{stem}-{os.getpid()}{ext}"
            control.open()
        if control.sock is not None:
            (self.log.debug if self.quiet else self.log.info)(
                "`udpmux status` answers at %s", control.path)
        self.servers.append(control)
        if self.metrics_listen is not None:
            metrics = MetricsServer(selector, self.metrics_listen, control.status, self.log,
                                    "metrics_listen" if self.config_path else
                                    "--metrics-listen", exposition)
            self.servers.append(metrics)
            metrics.open()

    def expire(self, now):
        for server in self.servers:
            server.expire(now)

    def close(self):
        for server in self.servers:
            server.close()
        self.servers.clear()


# -- what the modes report, in common words

def peer_report(role, name, endpoint, now, address=None, carrier=None, path=None,
                watch=None):
    """A peer the agent speaks with through an endpoint.Initiator (or anything with its
    state, session, handshake_at and heard): for the `peers` of a report."""
    session = endpoint.session
    up = endpoint.state == "up"
    trouble = None
    if watch is not None and not up:
        trouble = watch.refusal or (f"{watch.unanswered} HELLOs unanswered"
                                    if watch.unanswered else None)
    return {
        "role": role,
        "name": name,
        "address": address,
        "state": endpoint.state,
        "carrier": carrier,
        "path": path,
        "handshake_ago": ago(now, getattr(endpoint, "handshake_at", None)),
        "heard_ago": ago(now, endpoint.heard) if session is not None else None,
        "seen_as": getattr(session, "observed", None),
        "trouble": trouble,
    }


def dialing(peer, dialer):
    """A peer over TCP with no connection now: connecting, or waiting to try again."""
    peer["state"] = "connecting" if dialer.sock is not None else "waiting"
    if dialer.failures:
        peer["trouble"] = f"{dialer.failures} connections failed"


def ago(now, moment):
    return None if moment is None else round(now - moment, 3)


def endpoint_text(family_sockaddr):
    return None if family_sockaddr is None else format_endpoint(*family_sockaddr)


def service_flows_report(flows, now, limit=None):
    """A ServiceFlows' flows for flow_list: each named by its socket's own address, the
    source the service sees it come from; the latest first, at most `limit`."""
    out = []
    for flow in reversed(flows.flows.values()):
        if limit is not None and len(out) >= limit:
            break
        try:
            local = format_endpoint(flow.sock.family, flow.sock.getsockname())
        except OSError:
            local = "-"
        out.append({"tag": flow.tag, "client": f"via {local}",
                    "age": round(now - flow.opened, 3), "idle": round(now - flow.seen, 3),
                    "datagrams_in": flow.n_in, "bytes_in": flow.b_in,
                    "datagrams_out": flow.n_out, "bytes_out": flow.b_out})
    return out


def table_totals(flows):
    """A ClientFlows' counters since the start, as a report's counters."""
    flows.table.sync()
    totals = flows.table.summary()["totals"]
    return {"datagrams_in": totals["pkts_in"], "bytes_in": totals["bytes_in"],
            "datagrams_out": totals["pkts_out"], "bytes_out": totals["bytes_out"],
            "flows": flows.created}


def table_flows_report(table, now, limit=None):
    """A writer's TagTable's flows (punch --listen, uot-client), the latest first."""
    out = []
    for key in reversed(table.lru_keys()):
        if limit is not None and len(out) >= limit:
            break
        f = table.flow(table.get(key))
        out.append({"tag": f.tag, "client": format_peer(f.key),
                    "age": round(now - f.created, 3), "idle": round(now - f.last_seen, 3),
                    "datagrams_in": f.pkts_in, "bytes_in": f.bytes_in,
                    "datagrams_out": f.pkts_out, "bytes_out": f.bytes_out})
    return out


# -- metrics

def exposition(status):
    """The text exposition of an agent's status reply (AgentControl.status())."""
    family = Families()
    mode = (("mode", status["mode"]),)
    peers = status["peers"]

    def each_peer(get):
        return [(mode + (("role", p["role"]), ("peer", p["name"])), get(p)) for p in peers]
    family("udpmux_peer_up", "gauge", "1 while the session with the peer is up.",
           each_peer(lambda p: int(p["state"] == "up")))
    family("udpmux_peer_heard_seconds", "gauge", "Seconds since the peer was last heard.",
           each_peer(lambda p: p["heard_ago"]))
    family("udpmux_peer_handshake_seconds", "gauge",
           "Seconds since the latest handshake with the peer.",
           each_peer(lambda p: p["handshake_ago"]))
    counters = status["counters"]
    family("udpmux_flows", "gauge", "Flows now.", [(mode, status["flows"])])
    family("udpmux_flows_max", "gauge", "The agent's max_flows.", [(mode, status["max_flows"])])
    family("udpmux_flows_created_total", "counter", "Flows created.",
           [(mode, counters.get("flows", 0))])
    for name, counter, text in (("udpmux_datagrams_total", "datagrams", "Datagrams carried"),
                                ("udpmux_bytes_total", "bytes", "Bytes of datagrams carried")):
        family(name, "counter", f"{text}: in from clients, out to them.",
               [(mode + (("direction", d),), counters.get(f"{counter}_{d}", 0))
                for d in ("in", "out")])
    family("udpmux_drops_total", "counter", "Datagrams and messages dropped, by reason.",
           [(mode + (("reason", reason),), n) for reason, n in sorted(status["drops"].items())])
    family("udpmux_uptime_seconds", "gauge", "Seconds since the agent started.",
           [((), status["uptime"])])
    return family.text()
