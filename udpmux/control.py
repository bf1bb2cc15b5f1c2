"""Control messages between the master and a worker, over a SOCK_SEQPACKET socketpair.

A SEQPACKET pair keeps message boundaries, so each message is one send() and one
recv()::

    +--------+--------+----------------+---------------------------+
    |  type  |  zero  |  zero (16 bit) |  body: UTF-8 JSON, or none |
    +--------+--------+----------------+---------------------------+

The worker treats EOF on its end as "the master is gone": it stops at once.
"""

import json
import socket
import struct

HEADER = struct.Struct("!BxH")
MAX_MESSAGE = 65536

MSG_READY = 1           # worker -> master: booted and serving
MSG_STOP = 2            # master -> worker: stop gracefully (body: {"deadline": seconds})
MSG_FAILED = 4          # worker -> master: cannot serve (body: {"error": text}); exit follows

MSG_NAMES = {MSG_READY: "READY", MSG_STOP: "STOP", MSG_FAILED: "FAILED"}     # for logs


def pair():
    """(master end, worker end), both blocking and close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send(sock, mtype, body=None):
    data = HEADER.pack(mtype, 0) + (json.dumps(body).encode() if body is not None else b"")
    try:
        sock.send(data)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        return False    # the other end is gone or stuck; its EOF or SIGCHLD will tell
    return True


def recv(sock):
    """(type, body) of the next message, or None at EOF.  Malformed messages raise ValueError."""
    try:
        data = sock.recv(MAX_MESSAGE)
    except ConnectionResetError:
        return None
    if not data:
        return None
    if len(data) < HEADER.size:
        raise ValueError("short control message")
    mtype, _ = HEADER.unpack_from(data)
    body = json.loads(data[HEADER.size:]) if len(data) > HEADER.size else None
    return mtype, body
