"""Stand-ins for what a mode's worker does I/O with, so that its decisions run in a unit
test: a poller that registers nothing, a socket that sends nowhere, a Sender that keeps
what it is given, a TCP carrier that only remembers, and a relay tunnel as the master
would hand it to its worker (its shared memory real: that is no socket)."""

import socket
from types import SimpleNamespace

from udpmux import auth
from udpmux.config import TUNNEL, TunnelConfig
from udpmux.relay import RelayShared

KEY = auth.generate_key()


class Poller:
    def __init__(self):
        self.registered = []

    def register(self, fileobj, handler, writer=None):
        self.registered.append(fileobj)

    def unregister(self, fileobj):
        if fileobj in self.registered:
            self.registered.remove(fileobj)

    def want_write(self, fileobj, wanted):
        pass

    def interest(self, fileobj, read, write):
        pass


class Sock:
    """A UDP socket that sends nowhere: what was sent on it, and whether it was closed."""

    def __init__(self, family=socket.AF_INET, port=40000, peer=None):
        self.family = family
        self.port = port
        self.peer = peer
        self.sent = []
        self.closed = False

    def getsockname(self):
        return ("0.0.0.0", self.port)

    def getpeername(self):
        return self.peer

    def send(self, msg):
        self.sent.append(bytes(msg))
        return len(msg)

    def sendto(self, msg, sockaddr):
        self.sent.append((bytes(msg), sockaddr))
        return len(msg)

    def close(self):
        self.closed = True


class Outbox:
    """In place of a datapath.Sender: what would have gone out, and to whom."""

    def __init__(self, sock=None):
        self.sock = sock
        self.sent = []

    def add(self, msg, key):
        self.sent.append((bytes(msg), key))

    def flush(self):
        pass

    def __len__(self):
        return 0

    def to(self, key, mtype=None):
        """The messages for `key` (of type `mtype` only, if given) since the last call,
        taken out, oldest first."""
        def mine(msg, k):
            return k == key and (mtype is None or msg[1] == mtype)
        taken = [msg for msg, k in self.sent if mine(msg, k)]
        self.sent = [(msg, k) for msg, k in self.sent if not mine(msg, k)]
        return taken


class Carrier:
    """A TCP connection that remembers what it was given and why it was closed, and
    tells its owner as carrier.TcpCarrier does."""

    def __init__(self, on_closed=None):
        self.on_closed = on_closed
        self.sent = []
        self.closed = None
        self.drops = {}
        self.frames_out = 0

    def send(self, msg, tag=None):
        if self.closed is None:
            self.sent.append(bytes(msg))

    def flush(self):
        pass

    def forget(self, tag):
        pass

    def close(self, why):
        if self.closed is None:
            self.closed = why
            if self.on_closed is not None:
                self.on_closed(self, why)


def tunnel(mode="expose", key=KEY, **settings):
    """A relay tunnel as the master hands it to its worker: its settings (the defaults,
    but for `settings`), a public socket that sends nowhere, and its shared memory."""
    values = {name: s.default for name, s in TUNNEL.items()
              if name in TunnelConfig.__dataclass_fields__}
    values.update(name="t", public=(socket.AF_INET, ("192.0.2.100", 7000)), register=None,
                  mode=mode, key=key, previous_key=None, tcp=False, **settings)
    config = TunnelConfig(**values)
    return SimpleNamespace(name="t", config=config, sockets={"public": Sock()},
                           shared=RelayShared(config))


def started(worker, **setup):
    """A worker set up as after its fork, with Poller() for its own."""
    worker.poller = Poller()
    worker.setup(**setup)
    return worker
