"""Tell systemd how the service is doing (sd_notify(3)), without a library.

Writes "READY=1", "RELOADING=1", "STOPPING=1" and "STATUS=..." datagrams to the
AF_UNIX socket named by $NOTIFY_SOCKET.  Outside systemd (no $NOTIFY_SOCKET) every
call does nothing.  A name starting with "@" is in the abstract namespace.

Sending never blocks the caller (the master's loop): when the socket's queue is full
(systemd slow to read), a state change (READY, RELOADING, STOPPING) waits in a short
queue of its own and goes out with the next send or flush(), in order; a STATUS line
that cannot go now is dropped, since a newer one follows.
"""

import os
import socket
import time
from collections import deque

PENDING_MAX = 16                # state changes kept while the socket's queue is full


class Notifier:
    def __init__(self, address=None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.sock = None
        self.pending = deque(maxlen=PENDING_MAX)

    def send(self, *fields, keep=True):
        """Send fields such as "READY=1" in one datagram; True when sent now.  With
        `keep`, one that cannot go now waits for flush()."""
        if self.address is None:
            return False
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        data = "\n".join(fields).encode()
        if self.flush() and self._send(data):
            return True
        if keep:
            self.pending.append(data)
        return False

    def flush(self):
        """Send what waits; True when nothing waits any more."""
        while self.pending:
            if not self._send(self.pending[0]):
                return False
            self.pending.popleft()
        return True

    def _send(self, data):
        try:
            self.sock.sendto(data, self.address)
        except BlockingIOError:
            return False
        except OSError:
            return True         # systemd went away or the socket is gone: nothing to tell
        return True

    def ready(self, status=None):
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self):
        # MONOTONIC_USEC lets Type=notify-reload units match this reload to its SIGHUP.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self):
        return self.send("STOPPING=1")

    def status(self, text):
        return self.send(f"STATUS={text}", keep=False)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
