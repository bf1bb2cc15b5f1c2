"""Every message that crosses a carrier: byte layouts, packing and parsing.

Pure code: bytes in, values or a counted reason out.  man/udpmux-protocol.7 is the
same description for people; change both together.

Every message starts with one fixed header, in network byte order::

     0               1               2               3
     0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
    +---------------+---------------+-------------------------------+
  0 |    version    |     type      |             flags             |
    +---------------+---------------+-------------------------------+
  4 |                 session (the receiver's id)                   |
    +---------------------------------------------------------------+
  8 |                   tag (the flow, 0 = none)                    |
    +---------------------------------------------------------------+
 12 |                                                               |
    +                 nonce (64-bit sender counter)                 +
 16 |                                                               |
    +---------------------------------------------------------------+
 20 |                   body (layout by type) ...                   |
    +---------------------------------------------------------------+
    |           MAC, 16 bytes (only when flags has KEYED)           |
    +---------------------------------------------------------------+

The MAC covers everything before it, header included.  On the UDP carrier each
datagram is one message.  On the TCP carrier each message is preceded by its
length as a 32-bit unsigned integer in network byte order::

    +-------------------------------+------------------------------+
    |        length (32 bits)       |  message (header, body, MAC) |
    +-------------------------------+------------------------------+

Bodies by type (offsets from the start of the body):

    HELLO (72)    0 initiator id u32 | 4 initiator random 16B | 20 role u8 | 21 zero 51B
    WELCOME (72)  0 responder id u32 | 4 initiator random 16B | 20 responder random 16B |
                  36 family u8 (4|6) | 37 zero u8 | 38 port u16 | 40 address 16B |
                  56 epoch u64 | 64 responder 8B
                  (address: the initiator's, as the responder saw it; epoch: names the
                  responder's flow table, and changes when tags from before mean nothing;
                  responder: names the responder for STALE, the same after its restarts)
    KEEPALIVE(12..) 0 flags u8 (1 = reply, please) | 1 zero 3B | 4 stamp u32 | 8 echo u32 |
                  12 zero padding, ignored
                  (a path challenge is a KEEPALIVE asking for a reply, with a random stamp;
                  a probe from an address the peer may not know yet is padded to a full
                  packet, so that the peer may answer that address with as much)
    STALE (12)    0 session id the sender does not know u32 | 4 nonce of that message u64
                  (under the stale key of the responder named in WELCOME)
    BYE (1)       0 reason u8
    DATA (0..)    the datagram, whole
    CLOSE (1)     0 reason u8
    STREAM (9..)  0 offset u64 | 8 flags u8 (1 = FIN: the stream ends after these bytes) |
                  9 the stream's bytes from offset on
    ACK (17..)    0 largest nonce received u64 | 8 delay u32 (us the ACK was held) |
                  12 first u32 (nonces received just below largest) | 16 count u8 |
                  17 count x (gap u32 | length u32): further ranges, downwards
                  (tag 0.  The top range is largest - first .. largest; below it each
                  pair says: gap nonces not received (>= 1), then length nonces received
                  (>= 1).  Every nonce of the session counts, whatever its message type.)
    WINDOW (8)    0 the offset up to which the sender may write on the stream (u64)
                  (before any WINDOW a sender may write 65536 bytes of a stream)
    RESET (1)     0 reason u8: the stream is abandoned in both directions, its bytes
                  undelivered (0 = cancelled, 1 = refused: too many streams,
                  2 = the server could not connect to the target)
    PUNCH (32)    0 challenge 16B (zero: no answer wanted) | 16 echo 16B (zero: answers
                  nothing; else the challenge of the PUNCH this one answers)
                  (under the handshake key, session 0: it opens a NAT mapping)
    RENDEZVOUS    0 side u8 (1 listen, 2 forward) | 1 the rendezvous name, 1-64 bytes UTF-8
    PEER (24)     0 family u8 (4|6) | 1 zero | 2 port u16 | 4 address 16B | 20 pair u32
    PATH (1)      0 path u8 (1 direct, 2 through the relay)

Streams (STREAM, WINDOW, RESET: tag = stream id, never 0): the initiator (client) opens
odd ids, the responder even ones, each in increasing order; an end learns of a peer's
stream from its first STREAM or WINDOW.  udpmux/stream.py is the engine.

How we name things:
  message   one header + body (+ MAC): a UDP datagram, or one frame of a TCP stream
  datagram  what an application sent; the body of a DATA message
  session   an authenticated association between two agents; each end picks an id
            and the other end writes it in the header's session field
  tag       a flow's 32-bit number, the same at both ends of a carrier
  nonce     the sender's message counter within a session, never reused
  reason    a short word naming why a message was dropped; it is what gets counted
"""

import struct

from udpmux.reasons import (
    R_FLAGS, R_KEYED, R_LENGTH, R_SHORT, R_TOO_LARGE, R_TYPE, R_VERSION,
)

VERSION = 1

HEADER = struct.Struct("!BBHIIQ")       # version, type, flags, session, tag, nonce
HEADER_SIZE = HEADER.size               # 20
MAC_SIZE = 16
FRAME = struct.Struct("!I")             # TCP carrier: message length
FRAME_SIZE = FRAME.size

FLAG_KEYED = 0x0001                     # a MAC follows the body
FLAGS_KNOWN = FLAG_KEYED

# The largest UDP payload IPv4 can carry; no datagram of any size up to it is ever cut.
MAX_UDP_PAYLOAD = 65507
# The largest datagram a DATA message carries on a UDP carrier, keyed or not, so that
# setting a key never changes what fits.
MAX_DATAGRAM = MAX_UDP_PAYLOAD - HEADER_SIZE - MAC_SIZE
# The largest message on a TCP carrier: any UDP datagram, whole.
MAX_FRAME = HEADER_SIZE + MAX_UDP_PAYLOAD + MAC_SIZE

# Message types.  Numbers are grouped so that each family has room to grow.
# 0x01-0x0f: session
T_HELLO = 0x01          # initiator -> responder: start a session
T_WELCOME = 0x02        # responder -> initiator: the session's ids and randoms
T_KEEPALIVE = 0x03      # either way: the session is alive; holds NAT mappings open
T_STALE = 0x04          # "I know no session with this id": start again
T_BYE = 0x05            # the sender ends the session
# 0x10-0x1f: datagram flows
T_DATA = 0x10           # one datagram of the flow named by the tag
T_CLOSE = 0x11          # the flow named by the tag is gone at the sender
# 0x20-0x2f: stream flows (the reliable stream of `udpmux link`)
T_STREAM = 0x20         # bytes of the stream named by the tag, at an offset
T_ACK = 0x21            # which messages (by nonce) arrived, as ranges
T_WINDOW = 0x22         # how far the peer may write on the stream named by the tag
T_RESET = 0x23          # the stream named by the tag is abandoned
# 0x30-0x3f: hole punching and rendezvous
T_PUNCH = 0x30          # a probe that opens a NAT mapping (handshake key, no session)
T_RENDEZVOUS = 0x31     # to a rendezvous relay: meet the peer of this name
T_PEER = 0x32           # from a rendezvous relay: your peer's address, as the relay sees it
T_PATH = 0x33           # to a rendezvous relay: how the pair's datagrams travel now

TYPE_NAMES = {
    T_HELLO: "HELLO",
    T_WELCOME: "WELCOME",
    T_KEEPALIVE: "KEEPALIVE",
    T_STALE: "STALE",
    T_BYE: "BYE",
    T_DATA: "DATA",
    T_CLOSE: "CLOSE",
    T_STREAM: "STREAM",
    T_ACK: "ACK",
    T_WINDOW: "WINDOW",
    T_RESET: "RESET",
    T_PUNCH: "PUNCH",
    T_RENDEZVOUS: "RENDEZVOUS",
    T_PEER: "PEER",
    T_PATH: "PATH",
}

# Roles an initiator asks for in HELLO; a responder refuses roles it does not serve.
ROLE_EXPOSE = 1         # an exposer registering with a relay's tunnel
ROLE_LINK = 2           # a reliable-stream client
ROLE_UOT = 3            # a UDP-over-TCP client
ROLE_PUNCH = 4          # a hole-punching peer

HELLO = struct.Struct("!I16sB51x")
WELCOME = struct.Struct("!I16s16sBxH16sQ8s")
KEEPALIVE = struct.Struct("!B3xII")
STREAM = struct.Struct("!QB")           # offset, flags; the bytes follow
ACK = struct.Struct("!QIIB")            # largest, delay, first, count; the ranges follow
ACK_RANGE = struct.Struct("!II")        # gap, length
WINDOW = struct.Struct("!Q")
STREAM_FIN = 0x01
PUNCH = struct.Struct("!16s16s")        # challenge, echo
PEER = struct.Struct("!BxH16sI")        # family 4|6, port, address, pair number
PATH = struct.Struct("!B")              # PATH_DIRECT or PATH_RELAYED
NO_RANDOM = bytes(16)                   # PUNCH: no challenge, or no echo
PATH_DIRECT = 1
PATH_RELAYED = 2
RENDEZVOUS_NAME_MAX = 64                # bytes of UTF-8
SIDE_LISTEN = 1                         # RENDEZVOUS: the side that listens for local clients
SIDE_FORWARD = 2                        # ... and the side that forwards to a local service
STALE = struct.Struct("!IQ")
REASON = struct.Struct("!B")
RANDOM_SIZE = 16
RESPONDER_SIZE = 8

KEEPALIVE_REPLY = 0x01

# Why a flow or a session ended (CLOSE and BYE bodies).
CLOSE_IDLE = 0
CLOSE_EVICTED = 1
CLOSE_REFUSED = 2
CLOSE_ERROR = 3
CLOSE_SHUTDOWN = 4
CLOSE_NAMES = {CLOSE_IDLE: "idle", CLOSE_EVICTED: "evicted", CLOSE_REFUSED: "refused",
               CLOSE_ERROR: "error", CLOSE_SHUTDOWN: "shutdown"}

# Fixed body sizes; DATA is the only type whose body size varies.
BODY_SIZES = {
    T_HELLO: HELLO.size,
    T_WELCOME: WELCOME.size,
    T_STALE: STALE.size,
    T_BYE: REASON.size,
    T_CLOSE: REASON.size,
    T_WINDOW: WINDOW.size,
    T_RESET: REASON.size,
    T_PUNCH: PUNCH.size,
    T_PEER: PEER.size,
    T_PATH: PATH.size,
}
# Types whose body size varies, with the least it can be.
BODY_MINIMUM = {T_DATA: 0, T_STREAM: STREAM.size, T_ACK: ACK.size, T_RENDEZVOUS: 2,
                T_KEEPALIVE: KEEPALIVE.size}

class Malformed(Exception):
    """A message that cannot be parsed; .reason is the counted reason."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def pack_header(mtype, session, tag, nonce, keyed):
    return HEADER.pack(VERSION, mtype, FLAG_KEYED if keyed else 0, session, tag, nonce)


def parse_header(msg, keyed):
    """Check the fixed header of `msg` and return (type, session, tag, nonce).

    `keyed` says whether this receiver expects a MAC.  The body size is checked
    against the type; a DATA body may have any size up to MAX_UDP_PAYLOAD.
    Raises Malformed with the reason to count.
    """
    trailer = MAC_SIZE if keyed else 0
    if len(msg) < HEADER_SIZE + trailer:
        raise Malformed(R_SHORT)
    version, mtype, flags, session, tag, nonce = HEADER.unpack_from(msg)
    if version != VERSION:
        raise Malformed(R_VERSION)
    if flags & ~FLAGS_KNOWN:
        raise Malformed(R_FLAGS)
    if bool(flags & FLAG_KEYED) != keyed:
        raise Malformed(R_KEYED)
    body_size = len(msg) - HEADER_SIZE - trailer
    expected = BODY_SIZES.get(mtype)
    if expected is None:
        least = BODY_MINIMUM.get(mtype)
        if least is None:
            raise Malformed(R_TYPE)
        if body_size > MAX_UDP_PAYLOAD:
            raise Malformed(R_TOO_LARGE)
        if body_size < least:
            raise Malformed(R_LENGTH)
    elif body_size != expected:
        raise Malformed(R_LENGTH)
    return mtype, session, tag, nonce


def body_of(msg, keyed):
    """The body of a message whose header parse_header() accepted."""
    end = len(msg) - MAC_SIZE if keyed else len(msg)
    return msg[HEADER_SIZE:end]


def frame(msg):
    """A message as it travels on the TCP carrier."""
    return FRAME.pack(len(msg)) + msg


class Deframer:
    """Cut a TCP carrier's byte stream into messages.

    feed() takes whatever recv() returned; messages() yields each complete one.
    A frame whose length is below a header or above MAX_FRAME raises Malformed:
    the stream cannot be resynchronised, so the caller closes the connection.
    """

    def __init__(self, max_frame=MAX_FRAME):
        self.max_frame = max_frame
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def messages(self):
        buf = self.buf
        start = 0
        try:
            while len(buf) - start >= FRAME_SIZE:
                (size,) = FRAME.unpack_from(buf, start)
                if size < HEADER_SIZE:
                    raise Malformed(R_SHORT)
                if size > self.max_frame:
                    raise Malformed(R_TOO_LARGE)
                end = start + FRAME_SIZE + size
                if end > len(buf):
                    break
                yield bytes(buf[start + FRAME_SIZE:end])
                start = end
        finally:
            del buf[:start]

    def pending(self):
        """Bytes received that do not yet make a whole message."""
        return len(self.buf)
