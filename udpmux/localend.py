"""The local side of a `udpmux link` stream: what the bytes of a stream come from and go
to, either a TCP connection (--listen-tcp, or the target at the server) or standard input
and output (ssh's ProxyCommand), each read and written without blocking.

    Endpoint(rfd, wfd, sock)   read(n) -> bytes, b"" at EOF, None for nothing now;
                               write(data) -> bytes taken; shutdown_write(); close()
"""

import os
import socket


class Fd:
    """A descriptor as the poller wants it: something with fileno()."""

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


class Endpoint:
    """The local side of a stream: a read descriptor and a write descriptor (the same
    socket for TCP, 0 and 1 for standard I/O), non-blocking."""

    def __init__(self, rfd, wfd, sock=None):
        self.rfd, self.wfd, self.sock = rfd, wfd, sock
        # Standard I/O may share its file with others (a terminal, a shell): put back
        # the blocking mode found there when done.
        self.blocking = {fd: os.get_blocking(fd) for fd in {rfd, wfd}} if sock is None else {}
        for fd in {rfd, wfd}:
            os.set_blocking(fd, False)
        self.pending = b""              # bytes for the local side that it has not taken
        self.read_open = True           # not yet at EOF on the read side
        self.write_open = True
        self.room = True                # the stream takes more bytes (else stop reading)
        self.keys = {}                  # fd -> (Fd, (read, write) interest) registered

    def read(self, n):
        """Bytes, b"" at EOF, None when nothing is there now."""
        try:
            return os.read(self.rfd, n)
        except BlockingIOError:
            return None
        except OSError:                 # a reset connection: as good as EOF
            return b""

    def write(self, data):
        """How many bytes the local side took; OSError when it is gone."""
        try:
            return os.write(self.wfd, data)
        except BlockingIOError:
            return 0

    def shutdown_write(self):
        if not self.write_open:
            return
        self.write_open = False
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            self.release(self.wfd)

    def release(self, fd):
        """Close one of standard I/O's descriptors, its blocking mode put back."""
        try:
            if self.blocking.get(fd):
                os.set_blocking(fd, True)
            os.close(fd)
        except OSError:
            pass

    def close(self):
        if self.sock is not None:
            self.sock.close()
            return
        self.release(self.rfd)
        if self.write_open:
            self.shutdown_write()
