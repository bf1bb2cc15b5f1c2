"""The master: binds every tunnel's sockets, forks a worker per tunnel, keeps them running.

One selectors loop.  Signal handlers do nothing but wake it (signal.set_wakeup_fd);
the loop reads which signal came and calls its handler:

    SIGHUP   reload the configuration: start new tunnels, stop removed ones, restart
             changed ones and ones whose worker could not boot, leave the others alone
    SIGTERM  stop: ask every worker to stop, wait up to stop_timeout, then kill
    SIGINT   the same; a second SIGTERM or SIGINT kills the workers at once
    SIGCHLD  reap workers; respawn a crashed one with backoff, but not one that
             could not boot

Each tunnel's flow table and report block are mapped here, before the fork, so a
respawned worker finds its predecessor's flows.  Readiness goes to systemd through
sd_notify: READY=1 once every worker reported ready, RELOADING=1 and STOPPING=1.

Tunnel states, as the master sees them, and the only ways between them (every change
goes through Tunnel.change_state(), which refuses any other):

    NEW       made, not forked yet                 -> STARTING, BACKOFF
    STARTING  forked, waiting for MSG_READY        -> RUNNING, STOPPING, BACKOFF, FAILED
    RUNNING   the worker said it is ready          -> STOPPING, BACKOFF
    STOPPING  asked to stop (removed, changed, or the master is stopping)
    BACKOFF   crashed; will be respawned when its backoff ends   -> STARTING, STOPPING
    FAILED    could not boot; waits for the next reload          -> STOPPING

A worker that fails before it is ready (any exception, see worker.py) exits with
EXIT_WORKER_BOOT and its tunnel is FAILED: respawning it would fail the same way.
"""

import logging
import os
import selectors
import signal
import socket
import time

from udpmux import control, sockets
from udpmux.errors import EXIT_FAILURE, EXIT_OK, EXIT_OSERR, EXIT_WORKER_BOOT, Fatal
from udpmux.sdnotify import Notifier

NEW = "new"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
BACKOFF = "backoff"
FAILED = "failed"
TRANSITIONS = {
    NEW: {STARTING, BACKOFF},
    STARTING: {RUNNING, STOPPING, BACKOFF, FAILED},
    RUNNING: {STOPPING, BACKOFF},
    STOPPING: {STOPPING},
    BACKOFF: {STARTING, BACKOFF, STOPPING},
    FAILED: {STOPPING},
}

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0         # a worker that ran this long restarts without delay
NOTIFY_RETRY = 0.1         # seconds between tries of a notification systemd could not take
STATUS_EVERY = 5.0          # seconds between sd_notify STATUS= lines with the traffic

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def bind(endpoint, what):
    """A nonblocking socket bound to endpoint: UDP with large buffers, or a TCP listener."""
    family, sockaddr, kind = endpoint
    if kind == socket.SOCK_STREAM:
        return sockets.tcp_listener(family, sockaddr, what, backlog=16)
    return sockets.udp(family, sockaddr, what)


class Tunnel:
    """The master's record of one tunnel."""

    def __init__(self, config, sockets, shared):
        self.config = config
        self.name = config.name
        self.sockets = sockets          # label -> bound socket
        self.shared = shared            # what the worker kind maps before fork (tables...)
        self.state = NEW
        self.pid = None
        self.pipe = None
        self.started = 0.0
        self.backoff = 0.0
        self.respawn_at = None
        self.restarts = 0
        self.replacement = None         # a Tunnel that takes over once this one's worker exits
        self.removed = False
        self.kill_at = None             # when a stopping worker gets SIGKILL

    def change_state(self, new):
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"tunnel {self.name}: no way from {self.state} to {new}")
        self.state = new


class Master:
    """Run tunnels in workers.  `kind` knows the tunnel type:

        kind.load()                       -> config with .tunnels, .stop_timeout
        kind.shared(tunnel_config, old)   -> what to map before fork (old: the
                                             previous Tunnel's, for a changed tunnel)
        kind.worker(tunnel, pipe, inherited, log) -> a Worker, built before fork
        kind.traffic(tunnels)             -> (flows, datagrams) for sd_notify's STATUS=
        kind.describe(tunnel)             -> what `udpmux status` shows of a tunnel
                                             beyond its lifecycle (a dict for JSON)
        kind.flows(tunnel)                -> its flows, for `udpmux status --flows`
    """

    def __init__(self, kind, log=None, notifier=None):
        self.kind = kind
        self.log = log or logging.getLogger("udpmux")
        self.notifier = notifier or Notifier()
        self.tunnels = {}
        self.by_pid = {}
        self.config = None
        self.selector = None
        self.stopping = False
        self.reloading = False
        self.ready_sent = False
        self._wake_r = self._wake_w = None
        self.extra = []                 # more selector entries (the control socket)
        self.status_server = None
        self.metrics = None
        self.status = EXIT_OK           # the master's exit status
        self.reload_error = None        # why the last reload failed, until one works
        self.next_status = None         # when to tell systemd the traffic figures next
        self.last_count = None          # (time, datagrams) at the last STATUS=

    # -- process seams (tests may replace these)

    def fork(self):
        return os.fork()

    def kill(self, pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self):
        """(pid, exit code) of each child that ended; signals as negative codes."""
        ended = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ended.append((pid, os.waitstatus_to_exitcode(status)))
        return ended

    # -- the loop

    def run(self):
        self.config = self.kind.load()
        self.setup()
        try:
            self.open_control_socket()
            for tunnel_config in self.config.tunnels.values():
                self.start_tunnel(self.open_tunnel(tunnel_config))
            self.check_ready()
            while not (self.stopping and not self.by_pid):
                timeout = self.next_timeout()
                for key, _ in self.selector.select(timeout):
                    # An earlier handler in this round may have closed this one's socket.
                    if self.selector.get_map().get(key.fd) is key:
                        key.data()
                self.on_timers(time.monotonic())
        finally:
            self.cleanup()
        return self.status

    def setup(self):
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _ignore)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self.on_signal)

    def open_control_socket(self):
        path = getattr(self.config, "control_socket", None)
        if not path:
            return
        from udpmux.status import StatusServer
        self.status_server = StatusServer(self.selector, self, path, self.log)
        self.status_server.open()
        endpoint = getattr(self.config, "metrics_listen", None)
        if endpoint is not None:
            from udpmux.metrics import MetricsServer
            what = "metrics_listen" if getattr(self.config, "path", None) else \
                "--metrics-listen"
            self.metrics = MetricsServer(self.selector, endpoint, self.status_server.status,
                                         self.log, what)
            self.metrics.open()

    def cleanup(self):
        if self.metrics is not None:
            self.metrics.close()
        if self.status_server is not None:
            self.status_server.close()
        for tunnel in self.tunnels.values():
            self.close_tunnel(tunnel)
        self.notifier.close()
        signal.set_wakeup_fd(-1)

    def next_timeout(self):
        now = time.monotonic()
        moments = [m for t in self.tunnels.values() for m in (t.respawn_at, t.kill_at)
                   if m is not None]
        if self.next_status is not None:
            moments.append(self.next_status)
        if self.notifier.pending:
            moments.append(now + NOTIFY_RETRY)
        if not moments:
            return 1.0
        return max(0.0, min(min(moments) - now, 1.0))

    def on_timers(self, now):
        if self.notifier.pending:
            self.notifier.flush()
        if self.metrics is not None:
            self.metrics.expire(now)
        if self.status_server is not None:
            self.status_server.expire(now)
        if self.next_status is not None and now >= self.next_status:
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self.summary(traffic=True))
        for tunnel in list(self.tunnels.values()):
            if tunnel.respawn_at is not None and now >= tunnel.respawn_at:
                tunnel.respawn_at = None
                self.spawn(tunnel)
            if tunnel.kill_at is not None and now >= tunnel.kill_at:
                tunnel.kill_at = None
                if tunnel.pid is not None:
                    self.log.warning("tunnel %s: worker %d did not stop in time; killing it",
                                     tunnel.name, tunnel.pid)
                    self.kill(tunnel.pid, signal.SIGKILL)

    # -- signals

    def on_signal(self):
        try:
            data = self._wake_r.recv(64)
        except BlockingIOError:
            return
        # A stop first: a worker that died of the same SIGTERM must not be respawned.
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum in data:
                self.handle_term(signum)
        if signal.SIGHUP in data:
            self.handle_hup()
        if signal.SIGCHLD in data:
            self.handle_chld()

    def handle_chld(self):
        for pid, code in self.reap():
            tunnel = self.by_pid.pop(pid, None)
            if tunnel is None:
                continue
            self.worker_exited(tunnel, pid, code)

    def handle_term(self, signum):
        if self.stopping:
            self.log.warning("second %s: killing the workers now", signal.Signals(signum).name)
            for pid in list(self.by_pid):
                self.kill(pid, signal.SIGKILL)
            return
        self.log.info("stopping (%s)", signal.Signals(signum).name)
        self.notifier.stopping()
        self.stopping = True
        for tunnel in self.tunnels.values():
            tunnel.respawn_at = None
            self.stop_worker(tunnel)

    def handle_hup(self):
        """Reload: read the configuration, then bind and map what new and changed tunnels
        need.  Only when all of that worked does anything change; a failure of any kind
        (a bad file, a port taken, memory the kernel refused, a bug) is logged, told to
        systemd, and leaves the running tunnels and configuration as they were."""
        if self.stopping:
            return
        self.log.info("reloading the configuration")
        self.notifier.reloading()
        try:
            config = self.kind.load()
            opened = self.open_changed(config)
        except Exception as exc:        # whatever it was, the master goes on
            self.reload_failed(exc)
            return
        for name in ("control_socket", "metrics_listen"):
            if getattr(config, name, None) != getattr(self.config, name, None):
                self.log.warning("%s changes take effect when the relay restarts", name)
        self.config = config
        self.reload_error = None
        self.reloading = True
        self.ready_sent = False
        for name in list(self.tunnels):
            if name not in config.tunnels:
                self.log.info("tunnel %s: removed from the configuration", name)
                tunnel = self.tunnels[name]
                tunnel.removed = True
                self.retire(tunnel)
        for name, new in opened.items():
            old = self.tunnels.get(name)
            try:
                if old is None:
                    self.start_tunnel(new)
                else:
                    self.replace(old, new)
            except Exception as exc:    # a bug or the system: the other tunnels go on
                self.log.error("tunnel %s: not started: %s", name, _reason(exc))
                self.log.debug("tunnel %s: the error in full", name, exc_info=True)
                if self.tunnels.get(name) is new:
                    del self.tunnels[name]
                if old is not None and old.replacement is new:
                    old.replacement = None
                self.close_tunnel(new, keep=_sockets(old, old and old.replacement))
        self.check_ready()

    def replace(self, old, new):
        """Let `new` take over from `old` once old's worker has exited.  A reload that
        comes while an earlier replacement still waits supersedes it; a tunnel removed
        by one reload and given back by the next, before its worker exited, comes back."""
        waiting = old.replacement
        if old.removed and waiting is None:
            self.log.info("tunnel %s: back in the configuration", old.name)
        else:
            self.log.info("tunnel %s: settings changed; restarting its worker", old.name)
        old.replacement = new
        old.removed = False
        if waiting is not None:
            self.close_tunnel(waiting, keep=_sockets(old, new))
        if old.state != STOPPING:
            self.retire(old)

    def open_changed(self, config):
        """{name: Tunnel} bound and mapped for every tunnel that is new, changed, or
        failed before; on any failure, close what was opened and raise."""
        opened = {}
        try:
            for name, tunnel_config in config.tunnels.items():
                old = self.tunnels.get(name)
                # What runs next: a replacement an earlier reload made, still waiting for
                # the old worker to exit, or the old tunnel unless it is on its way out.
                current = old and (old.replacement or (None if old.removed else old))
                if current is None or current.config != tunnel_config or \
                        current.state == FAILED:
                    opened[name] = self.open_tunnel(tunnel_config, current or old)
        except BaseException:
            for name, tunnel in opened.items():
                old = self.tunnels.get(name)
                self.close_tunnel(tunnel, keep=_sockets(old, old and old.replacement))
            raise
        return opened

    def reload_failed(self, exc):
        reason = _reason(exc)
        self.log.error("reload failed; the running configuration stays: %s", reason)
        if not isinstance(exc, (Fatal, OSError, MemoryError)):
            self.log.debug("the reload's error in full", exc_info=True)
        # systemd waits for READY=1 after RELOADING=1, failed or not; STATUS= says which.
        self.reload_error = reason
        self.notifier.ready(_one_line(self.summary()))

    # -- tunnels

    def open_tunnel(self, tunnel_config, old=None):
        """Bind a tunnel's sockets (reusing the old tunnel's where the address stayed) and
        map its shared memory; Fatal says what failed, and nothing stays open."""
        sockets = {}
        name = tunnel_config.name
        try:
            for label, endpoint in tunnel_config.endpoints().items():
                reuse = None
                if old is not None:
                    for old_label, old_endpoint in old.config.endpoints().items():
                        if old_endpoint == endpoint:
                            reuse = old.sockets[old_label]
                sockets[label] = reuse or bind(endpoint, f"tunnel {name}")
            try:
                shared = self.kind.shared(tunnel_config, old)
            except (OSError, MemoryError, ValueError) as exc:   # mmap() refused
                raise Fatal(f"tunnel {name}: cannot map its shared memory: {_reason(exc)}",
                            status=EXIT_OSERR) from None
        except BaseException:
            for sock in sockets.values():
                if old is None or sock not in old.sockets.values():
                    sock.close()
            raise
        return Tunnel(tunnel_config, sockets, shared)

    def start_tunnel(self, tunnel):
        self.tunnels[tunnel.name] = tunnel
        self.spawn(tunnel)

    def spawn(self, tunnel):
        try:
            master_end, worker_end = control.pair()
        except OSError as exc:
            self.log.error("tunnel %s: cannot make its control pipe: %s", tunnel.name,
                           exc.strerror or exc)
            self.schedule_respawn(tunnel)
            return
        try:
            inherited = self.inherited(keep=tunnel) + [master_end]
            worker = self.kind.worker(tunnel, worker_end, inherited, self.log)
            pid = self.fork()
        except Exception as exc:        # noqa: BLE001 -- any of it, and the master stays
            master_end.close()
            worker_end.close()
            self.log.error("tunnel %s: cannot start its worker: %s", tunnel.name, _reason(exc))
            self.schedule_respawn(tunnel)
            return
        if pid == 0:
            worker.run()            # never returns
        worker_end.close()
        tunnel.pid = pid
        tunnel.pipe = master_end
        tunnel.change_state(STARTING)
        tunnel.started = time.monotonic()
        self.by_pid[pid] = tunnel
        self.selector.register(master_end, selectors.EVENT_READ,
                               lambda: self.on_worker_message(tunnel, master_end))
        self.log.debug("tunnel %s: worker %d started", tunnel.name, pid)

    def inherited(self, keep):
        """Everything of the master's that a worker for `keep` must close after fork."""
        things = [self.selector, self._wake_r, self._wake_w] + list(self.extra)
        # The control and metrics listeners and every connection accepted on them: a
        # worker that kept one would hold a client's connection open after the master
        # closed it.
        for server in (self.status_server, self.metrics):
            if server is not None:
                things += server.sockets()
        mine = set(keep.sockets.values())
        for tunnel in self.tunnels.values():
            if tunnel.pipe is not None:
                things.append(tunnel.pipe)
            for other in (tunnel, tunnel.replacement):
                if other is not None and other is not keep:
                    things.extend(s for s in other.sockets.values() if s not in mine)
        return things

    def on_worker_message(self, tunnel, pipe):
        try:
            message = control.recv(pipe)
        except ValueError:
            return
        except OSError:
            message = None
        if message is None:         # the worker closed its end: it exited, SIGCHLD follows
            sockets.release(self.selector, pipe)
            if tunnel.pipe is pipe:
                tunnel.pipe = None
            return
        mtype, body = message
        body = body or {}
        if mtype == control.MSG_READY:
            self.worker_ready(tunnel)
        elif mtype == control.MSG_FAILED:
            self.log.error("tunnel %s: %s", tunnel.name, body.get("error", "failed to start"))
        else:
            self.log.warning("tunnel %s: worker %s sent %s, which a master does not take",
                             tunnel.name, tunnel.pid, control.MSG_NAMES.get(mtype, mtype))

    def worker_ready(self, tunnel):
        if tunnel.state != STARTING:
            return                      # asked to stop meanwhile: it is on its way out
        tunnel.change_state(RUNNING)
        self.log.info("tunnel %s: up (worker %d)", tunnel.name, tunnel.pid)
        self.check_ready()

    def stop_worker(self, tunnel):
        if tunnel.pid is None:
            return
        tunnel.change_state(STOPPING)
        tunnel.kill_at = time.monotonic() + self.config.stop_timeout
        final = self.stopping or tunnel.removed
        if tunnel.pipe is None or not control.send(
                tunnel.pipe, control.MSG_STOP,
                {"deadline": self.config.stop_timeout, "final": final}):
            self.kill(tunnel.pid, signal.SIGTERM)

    def retire(self, tunnel):
        """Stop a tunnel's worker; once it exits, its replacement (if any) starts."""
        tunnel.respawn_at = None
        if tunnel.pid is None:
            self.finish_retire(tunnel)
        else:
            self.stop_worker(tunnel)

    def finish_retire(self, tunnel):
        new = tunnel.replacement
        keep = set(new.sockets.values()) if new is not None else set()
        self.close_tunnel(tunnel, keep)
        del self.tunnels[tunnel.name]
        if new is not None:
            self.start_tunnel(new)
        self.check_ready()

    def worker_exited(self, tunnel, pid, code):
        tunnel.pid = None
        tunnel.kill_at = None
        if tunnel.pipe is not None:
            sockets.release(self.selector, tunnel.pipe)
            tunnel.pipe = None
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if self.stopping:
            self.log.debug("tunnel %s: worker %d stopped (%s)", tunnel.name, pid, how)
            return
        if tunnel.removed or tunnel.replacement is not None:
            self.finish_retire(tunnel)
            return
        if code == EXIT_WORKER_BOOT and tunnel.state == STARTING:
            tunnel.change_state(FAILED)
            self.log.error("tunnel %s: worker %d could not start; not respawning it until "
                           "the next reload (SIGHUP)", tunnel.name, pid)
            self.check_ready()
            return
        tunnel.restarts += 1
        if code == 0:
            self.log.warning("tunnel %s: worker %d exited unasked; respawning", tunnel.name, pid)
        else:
            self.log.error("tunnel %s: worker %d died (%s); respawning", tunnel.name, pid, how)
        self.schedule_respawn(tunnel)

    def schedule_respawn(self, tunnel):
        now = time.monotonic()
        if now - tunnel.started >= STABLE_AFTER:
            tunnel.backoff = 0.0
        else:
            tunnel.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, tunnel.backoff * 2))
        tunnel.change_state(BACKOFF)
        tunnel.respawn_at = now + tunnel.backoff

    def close_tunnel(self, tunnel, keep=()):
        for sock in tunnel.sockets.values():
            if sock not in keep:
                sock.close()
        if tunnel.pipe is not None:
            sockets.release(self.selector, tunnel.pipe)
            tunnel.pipe = None

    # -- readiness

    def check_ready(self):
        if self.stopping or self.ready_sent:
            return
        if any(t.state in (STARTING, STOPPING) or t.replacement is not None
               for t in self.tunnels.values()):
            return
        if not self.reloading and all(t.state == FAILED for t in self.tunnels.values()):
            # Nothing to serve: stop, so that systemd shows the failure.
            self.log.error("no tunnel could start; stopping")
            self.status = EXIT_FAILURE
            self.stopping = True
            return
        self.ready_sent = True
        if self.reloading:
            self.reloading = False
            self.log.info("reload done: %s", self.summary())
        else:
            self.log.info("ready: %s", self.summary())
        self.notifier.ready(self.summary())
        if self.notifier.address is not None and self.next_status is None:
            self.next_status = time.monotonic() + STATUS_EVERY

    def summary(self, traffic=False):
        """One line for logs and systemd: tunnels, and with traffic, flows and rate."""
        states = [t.state for t in self.tunnels.values()]
        text = f"{states.count(RUNNING)} of {len(states)} tunnels running"
        if states.count(FAILED):
            text += f", {states.count(FAILED)} failed"
        if self.reload_error is not None:
            text = (f"reload failed: {self.reload_error}; the running configuration stays; "
                    + text)
        if traffic:
            flows, datagrams = self.kind.traffic(self.tunnels.values())
            now = time.monotonic()
            rate = 0.0
            if self.last_count is not None and now > self.last_count[0]:
                rate = max(0, datagrams - self.last_count[1]) / (now - self.last_count[0])
            self.last_count = (now, datagrams)
            text += f", {flows} flows, {rate:.0f} datagrams/s"
        return text


def _sockets(*tunnels):
    """The sockets of these tunnels (None stands for no tunnel), as a set."""
    return {sock for tunnel in tunnels if tunnel is not None for sock in tunnel.sockets.values()}


def _reason(exc):
    """An exception in one phrase: a Fatal's message, or what the system said."""
    if isinstance(exc, Fatal):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _one_line(text):
    """Text fit for one sd_notify field: no newline, and nothing UTF-8 cannot encode
    (a path from the command line may hold undecodable bytes)."""
    text = " ".join(text.splitlines())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _ignore(signum, frame):
    """A handler that does nothing: the wake-up descriptor carries the signal to the loop."""
