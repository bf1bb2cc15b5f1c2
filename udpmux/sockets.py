"""Opening sockets, for every mode: UDP sockets bound or connected with large buffers,
TCP listeners, and the errors each can meet said in one line with the exit status the
man page documents (permission denied 77, anything else the system refused 71).

  udp(family, sockaddr, what)          a UDP socket bound to sockaddr
  udp_any(family, port, what)          a UDP socket on every address of family, at port
  udp_connected(family, sockaddr)      a UDP socket connected to sockaddr (an agent's
                                       socket towards its relay)
  tcp_listener(family, sockaddr, what) a TCP listening socket

Every socket returned is nonblocking and close-on-exec.  `what` names the setting or
option the address came from, so that the error points at what to change.
"""

import errno
import os
import socket

from udpmux.addr import format_endpoint
from udpmux.errors import EXIT_NOPERM, EXIT_OSERR, Fatal

BUFFER = 4 * 1024 * 1024        # SO_RCVBUF and SO_SNDBUF of a datagram socket (the kernel
                                # caps it at net.core.rmem_max / wmem_max)
BACKLOG = 128                   # connections a listener holds before accept()


def status_of(exc):
    """The exit status for an OSError met while opening a socket."""
    return EXIT_NOPERM if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_OSERR


def _open(family, kind, what, where):
    try:
        return socket.socket(family, kind | socket.SOCK_CLOEXEC)
    except OSError as exc:          # EMFILE, ENFILE, ENOBUFS, a family not built in
        raise Fatal(f"{what}: cannot open a socket for {where}: {exc.strerror or exc}",
                    status=status_of(exc)) from None


def _set_up(sock, failure, *steps):
    """sock after steps (calls), nonblocking; if one fails, sock closed and Fatal says
    failure and why."""
    try:
        for step in steps:
            step()
    except OSError as exc:
        sock.close()
        raise Fatal(f"{failure}: {exc.strerror or exc}", status=status_of(exc)) from None
    sock.setblocking(False)
    return sock


def _buffers(sock, size):
    if size:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, size)


def udp(family, sockaddr, what, buffer=BUFFER):
    """A nonblocking UDP socket bound to sockaddr, with buffer bytes each way (None:
    the system's default)."""
    where = format_endpoint(family, sockaddr)
    sock = _open(family, socket.SOCK_DGRAM, what, where)
    return _set_up(sock, f"{what}: cannot bind {where}",
                   lambda: _buffers(sock, buffer), lambda: sock.bind(sockaddr))


def wildcard(family):
    """The address meaning every address of family."""
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def udp_any(family, port, what, buffer=None):
    """A nonblocking UDP socket on every address of family, at port (0: any free one)."""
    return udp(family, (wildcard(family), port), what, buffer)


def udp_connected(family, sockaddr, buffer=BUFFER):
    """A nonblocking UDP socket connected to sockaddr: it hears only from there, and
    the kernel reports an ICMP error from there on the next call."""
    where = format_endpoint(family, sockaddr)
    sock = _open(family, socket.SOCK_DGRAM, "relay", where)
    return _set_up(sock, f"cannot reach {where}",
                   lambda: _buffers(sock, buffer), lambda: sock.connect(sockaddr))


def connect_failure(sock):
    """Once a nonblocking connect() on sock is done (writable): None when it worked,
    else what failed, in words (and sock is closed)."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if not err:
        return None
    sock.close()
    return os.strerror(err)


def accepted(listener, most, failed):
    """The connections waiting on listener, as (socket, sockaddr), at most `most` (so
    that a storm of them cannot starve the loop).  An error other than "none waiting"
    (out of descriptors or buffers) goes to failed(exc) and ends the round."""
    for _ in range(most):
        try:
            yield listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            failed(exc)
            return


def release(selector, sock):
    """Take sock out of selector (if it is there) and close it."""
    try:
        selector.unregister(sock)
    except (KeyError, ValueError):
        pass
    sock.close()


def tcp_listener(family, sockaddr, what, backlog=BACKLOG):
    """A nonblocking TCP socket listening at sockaddr (SO_REUSEADDR: a restart does not
    wait for the previous run's connections to time out)."""
    where = format_endpoint(family, sockaddr)
    sock = _open(family, socket.SOCK_STREAM, what, "TCP " + where)
    return _set_up(sock, f"{what}: cannot listen on {where}",
                   lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
                   lambda: sock.bind(sockaddr), lambda: sock.listen(backlog))
