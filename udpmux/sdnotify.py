"""Tell systemd how the service is doing (sd_notify(3)), without a library.

Writes "READY=1", "RELOADING=1", "STOPPING=1" and "STATUS=..." datagrams to the
AF_UNIX socket named by $NOTIFY_SOCKET.  Outside systemd (no $NOTIFY_SOCKET) every
call does nothing.  A name starting with "@" is in the abstract namespace.
"""

import os
import socket
import time


class Notifier:
    def __init__(self, address=None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.sock = None

    def send(self, *fields):
        """Send fields such as "READY=1" in one datagram; True when sent."""
        if self.address is None:
            return False
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False        # systemd went away or the socket is gone: nothing to tell
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
        return self.send(f"STATUS={text}")

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
