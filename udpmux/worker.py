"""The worker: one tunnel's process, forked by the master.

The fork boundary shows in the names: __init__ runs in the master before the fork
and touches nothing; run() is the child's whole life: init_process() sets the child
up (its own poller, its own signal wake-up, the master's other descriptors closed),
then loop() serves until the master says stop or goes away, and the child leaves
through os._exit() with a status the master understands:

    0                 stopped when asked
    EXIT_WORKER_BOOT  could not start: anything that went wrong before it was ready
                      (the master does not respawn it; it would fail the same way)
    EXIT_SOFTWARE     crashed once it was serving (the master respawns it, with backoff)

The master's end of the control pipe reaching EOF means the master died: the worker
says goodbye to its peers and stops at once.  Per-tunnel behaviour (the relay's data path, for instance) lives in
subclasses, which implement setup(), after_events(), tick(), on_stop() and on_exit().

The single-host modes (expose, for instance) run the same class without a master:
serve() runs it in the calling process, where SIGTERM and SIGINT stop it gracefully.
"""

import logging
import os
import select
import signal
import socket
import time

from udpmux import control
from udpmux.errors import EXIT_OK, EXIT_SOFTWARE, EXIT_WORKER_BOOT


class BootError(Exception):
    """The worker cannot start; the master will not respawn it."""


class Worker:
    TICK = 1.0          # seconds between tick() calls at most
    HUP_STOPS = False   # standalone: SIGHUP stops too (what ssh sends its ProxyCommand)

    def __init__(self, name, pipe, inherited=(), log=None):
        """In the master, before fork: remember, do nothing."""
        self.name = name
        self.pipe = pipe                # our end of the control socketpair
        self.inherited = inherited      # the master's objects to close in the child
        self.log = log or logging.getLogger("udpmux")
        self.poller = None
        self.alive = True
        self.stopping_until = None
        self._wake_r = self._wake_w = None
        self.inspector = None           # standalone: its control socket and metrics
        self.reloader = None            # standalone: what SIGHUP does (agentreload.py)
        self.reload_error = None        # standalone: why the last reload failed, if it did

    # -- the child's life

    def run(self):
        """In the child: never returns."""
        status = EXIT_SOFTWARE
        booted = False
        try:
            try:
                self.init_process()
            except BootError:
                raise
            except Exception as exc:        # whatever it was, it would be again
                self.log.exception("tunnel %s: cannot start", self.name)
                raise BootError(f"{type(exc).__name__}: {exc}") from None
            booted = True
            control.send(self.pipe, control.MSG_READY, {"pid": os.getpid()})
            self.loop()
            status = EXIT_OK
        except BootError as exc:
            self.log.error("tunnel %s: cannot start: %s", self.name, exc)
            control.send(self.pipe, control.MSG_FAILED, {"error": str(exc)})
            status = EXIT_WORKER_BOOT
        except BaseException:
            self.log.exception("tunnel %s: worker crashed%s", self.name,
                               "" if booted else " while starting")
        finally:
            os._exit(status)

    def serve(self, inspector=None, reloader=None):
        """Run in this process, without a master; returns the exit status.  The
        inspector (agentstatus.Inspector) serves `udpmux status` and metrics from the
        loop once the worker is set up; the reloader, given the worker, is what SIGHUP
        does (agentreload.Reloader)."""
        self.reloader = reloader and reloader(self)
        self.init_process(standalone=True)
        self.inspector = inspector
        try:
            if inspector is not None:
                inspector.open(self)
            self.loop()
        finally:
            if inspector is not None:
                inspector.close()
        return EXIT_OK

    def init_process(self, standalone=False):
        # Signals first: the master's wake-up descriptor came with the fork, and a
        # signal here must not look like the master's own.
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, _ignore)      # handled in the loop: a graceful stop
        # Under a master, ^C reaches the whole process group: the master decides.
        signal.signal(signal.SIGINT, _ignore if standalone else signal.SIG_IGN)
        # Reloads go through the master; alone, a hang-up means "reload" to an agent
        # that reloads, and may mean "stop" (ssh's ProxyCommand).
        signal.signal(signal.SIGHUP, _ignore if standalone and (self.HUP_STOPS or
                                                                self.reloader is not None)
                      else signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for thing in self.inherited:
            try:
                thing.close()
            except OSError:
                pass
        # Our own poller: an epoll set inherited from the master shares its
        # registrations with it, so touching it here would change the master's.
        self.poller = Poller()
        if self.pipe is not None:
            self.poller.register(self.pipe, self.on_control)
        self.poller.register(self._wake_r, self.on_signal)
        self.setup()

    def loop(self):
        next_tick = time.monotonic()
        while self.alive:
            now = time.monotonic()
            wake = self.wake_at(now)
            timeout = max(0.0, (next_tick if wake is None else min(wake, next_tick)) - now)
            handlers, writers = self.poller.handlers, self.poller.writers
            for fd, events in self.poller.poll(timeout):
                # An earlier handler in this round may have closed this one's socket.
                if events & WRITABLE:
                    writer = writers.get(fd)
                    if writer is not None:
                        writer()
                if events & READABLE:
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler()
            now = time.monotonic()
            wake = self.wake_at(now)
            if wake is not None and now >= wake:
                self.on_wake(now)
            if now >= next_tick:
                if self.inspector is not None:
                    self.inspector.expire(now)
                self.tick(now)
                next_tick = now + self.TICK
                if self.stopping_until is not None and now >= self.stopping_until:
                    self.alive = False
            self.after_events()         # what the handlers and timers queued goes out
        self.on_exit()

    # -- events

    def on_control(self):
        try:
            message = control.recv(self.pipe)
        except ValueError:
            return
        if message is None:             # the master is gone
            self.log.warning("tunnel %s: the master went away; stopping", self.name)
            self.poller.unregister(self.pipe)
            # No successor will carry on with our sessions: say goodbye to the peers, so
            # that they register again at once with whatever relay comes next.
            self.stop(0.0, final=True)
            self.alive = False
            return
        mtype, body = message
        if mtype == control.MSG_STOP:
            body = body or {}
            self.stop(body.get("deadline", 5.0), final=body.get("final", True))
        else:
            self.log.warning("tunnel %s: the master sent %s, which a worker does not take",
                             self.name, control.MSG_NAMES.get(mtype, mtype))

    def on_signal(self):
        try:
            data = self._wake_r.recv(64)
        except BlockingIOError:
            return
        if signal.SIGTERM in data or signal.SIGINT in data or \
                (signal.SIGHUP in data and self.HUP_STOPS):
            self.stop(5.0, final=True)
        elif signal.SIGHUP in data and self.reloader is not None:
            self.reloader()

    def stop(self, deadline, final=True):
        """Begin a graceful stop: subclasses say goodbye in on_stop(), then the loop
        ends at the next tick, or earlier if on_stop() clears self.alive.  `final` is
        False when a successor takes over (a changed configuration)."""
        if self.stopping_until is None:
            self.stopping_until = time.monotonic() + min(deadline, 1.0)
            self.on_stop(final)

    # -- for subclasses

    def setup(self):
        """After fork: register sockets with self.poller, attach tables."""

    def after_events(self):
        """After each round of events and timers: flush what they queued.  Only the
        loop calls it (and a mode's on_stop(), for its last words)."""

    def wake_at(self, now):
        """When (time.monotonic(), `now` at the latest if it is due) the loop must call
        on_wake(), or None: for timers finer than tick()'s second."""
        return None

    def on_wake(self, now):
        """The time wake_at() named has come."""

    def tick(self, now):
        """About once a second: expiry, keepalives, syncing shared state."""

    def on_stop(self, final):
        """A graceful stop began: tell peers (if final), stop accepting."""
        self.alive = False

    def on_exit(self):
        """The loop ended: flush what must survive into shared memory."""

    def report(self, now):
        """Standalone: what `udpmux status` shows (agentstatus.py) besides self.drops
        and flow_list(): peers, flows, max_flows and counters."""
        raise NotImplementedError

    def flow_list(self, now, limit=None):
        """Standalone: the flows, the most recently used first, at most `limit`, for
        `udpmux status` (and all of them for --flows)."""
        raise NotImplementedError

    def apply(self, config, changed):
        """Standalone: a reloaded configuration whose `changed` settings (names of its
        fields) differ from the running ones, all of which this agent can change."""
        raise NotImplementedError


_EPOLL = hasattr(select, "epoll")
# Readable includes hang-up and error, so that a handler's recv() finds out what happened.
READABLE = (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR if _EPOLL
            else select.POLLIN | select.POLLHUP | select.POLLERR)
WRITABLE = select.EPOLLOUT if _EPOLL else select.POLLOUT
_IN = select.EPOLLIN if _EPOLL else select.POLLIN


class Poller:
    """The few calls a worker makes of a selector, straight on epoll (poll elsewhere):
    selectors' bookkeeping costs microseconds per wake-up, which on a busy data path
    is a share worth having back."""

    def __init__(self):
        self._epoll = select.epoll() if _EPOLL else None
        self._poll = None if _EPOLL else select.poll()
        self.handlers = {}              # fd -> what to call when it is readable
        self.writers = {}               # fd -> what to call when it is writable, if asked

    def register(self, fileobj, handler, writer=None):
        """Call handler() when fileobj is readable; writer() when it is writable, once
        want_write(fileobj, True) asked for that."""
        fd = fileobj.fileno()
        if self._epoll is not None:
            self._epoll.register(fd, _IN)
        else:
            self._poll.register(fd, _IN)
        self.handlers[fd] = handler
        if writer is not None:
            self.writers[fd] = writer

    def want_write(self, fileobj, wanted):
        self.interest(fileobj, True, wanted)

    def interest(self, fileobj, read, write):
        """What to be woken for: readable, writable, both or (hang-ups and errors still
        wake) neither."""
        fd = fileobj.fileno()
        mask = (_IN if read else 0) | (WRITABLE if write else 0)
        if self._epoll is not None:
            self._epoll.modify(fd, mask)
        else:
            self._poll.modify(fd, mask)

    def unregister(self, fileobj):
        fd = fileobj.fileno()
        self.writers.pop(fd, None)
        if self.handlers.pop(fd, None) is None:
            return
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                self._poll.unregister(fd)
        except (OSError, KeyError):
            pass                        # closed already: the kernel forgot it itself

    def poll(self, timeout):
        """[(fd, events)] ready within timeout seconds."""
        if self._epoll is not None:
            return self._epoll.poll(timeout)
        return self._poll.poll(timeout * 1000.0)

    def close(self):
        if self._epoll is not None:
            self._epoll.close()


def _ignore(signum, frame):
    """A handler that does nothing: the wake-up descriptor carries the signal to the loop."""
