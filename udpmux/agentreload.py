"""SIGHUP for the agents that run unattended (expose, punch, uot-server, uot-client): the
configuration read again, as at start (a file: -c FILE; else the command line's key
files), compared with the running one, and applied where it changed, or not at all:

    load() fails (a bad file, a key file gone)   -> the reload failed
    a setting only a restart changes has changed -> the reload failed, naming it
    control_socket, metrics_listen changed       -> said to wait for a restart
    otherwise                                    -> worker.apply(new, changed)

A failed reload is logged and kept in worker.reload_error, which `udpmux status` shows,
until a reload works; the agent goes on as it was.  A changed key is how a key is
rotated: the agent starts a new handshake under it and keeps its flows (a relay tunnel
or a uot-server accepts the old key meanwhile: previous_key_file).
"""

import dataclasses

from udpmux import addr
from udpmux.errors import ConfigError, Fatal, UsageError

LATER = ("control_socket", "metrics_listen")    # changed by a restart, said so


def _same(a, b):
    if isinstance(a, addr.Destination) and isinstance(b, addr.Destination):
        return a.text == b.text and a.kind == b.kind
    return a == b


def _and(words):
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


class Reloader:
    """What SIGHUP does in an agent: `load()` makes its config again; `fixed` names the
    settings it cannot change in place."""

    def __init__(self, worker, load, config, fixed, log):
        self.worker = worker
        self.load = load
        self.config = config
        self.fixed = frozenset(fixed)
        self.log = log

    @classmethod
    def factory(cls, load, config, fixed, log):
        """What Worker.serve() takes: the worker's Reloader, once there is a worker."""
        return lambda worker: cls(worker, load, config, fixed, log)

    def __call__(self):
        self.log.info("reloading the configuration")
        try:
            new = self.load()
        except (ConfigError, UsageError, Fatal, OSError, ValueError) as exc:
            self.failed(str(exc))
            return
        changed = [f.name for f in dataclasses.fields(new) if f.name != "path"
                   and not _same(getattr(new, f.name), getattr(self.config, f.name))]
        fixed = [name for name in changed if name in self.fixed]
        if fixed:
            self.failed(f"{_and(fixed)} change{'s' if len(fixed) == 1 else ''} only when "
                        "the agent restarts")
            return
        for name in changed:
            if name in LATER:
                self.log.warning("%s changes take effect when the agent restarts", name)
        now = [name for name in changed if name not in LATER]
        try:
            self.worker.apply(new, now)
        except Exception as exc:        # a bug: the agent goes on as it was
            self.log.exception("applying the new configuration failed")
            self.failed(f"{type(exc).__name__}: {exc}")
            return
        self.config = new
        self.worker.reload_error = None
        self.log.info("reloaded: %s", f"{_and(now)} changed" if now else "nothing changed")

    def failed(self, reason):
        self.worker.reload_error = reason
        self.log.error("reload failed; the running configuration stays: %s", reason)
