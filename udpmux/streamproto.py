"""What both ends of the stream protocol agree on: the limits a peer counts on, the
RESET reasons the engine itself uses, and the errors a peer can make (ProtocolError,
whose .reason is one of PROTOCOL_ERRORS).  man/udpmux-protocol.7 lists the same.

Every module of the stream engine imports these (rangeset, recovery, streambuf,
stream); udpmux/stream.py re-exports them for its callers.
"""

# -- protocol constants (both ends must agree on these)
INITIAL_WINDOW = 65536          # bytes a sender may write on a stream before any WINDOW
MAX_ACK_DELAY = 0.005           # seconds a receiver may hold an ACK (the PTO counts on it)
MAX_OFFSET = (1 << 62) - 1      # no stream is longer than this
U32 = 0xFFFFFFFF

# -- reset reasons the engine itself uses; the application may use any u8
RESET_CANCEL = 0                # the application abandoned the stream
RESET_REFUSED = 1               # the receiver has max_streams of the sender's open

# -- protocol errors: what the peer did wrong; the caller ends the session and counts it
E_LENGTH = "bad-length"         # a body whose size does not fit its type (ACK: its count)
E_TAG = "bad-tag"               # tag 0 on STREAM/WINDOW/RESET, or a tag on an ACK
E_FLAGS = "bad-flags"           # STREAM flags other than FIN
E_ACK_UNSENT = "ack-unsent"     # an ACK of a nonce this end never used
E_ACK_RANGE = "ack-range"       # an ACK range below nonce 1, or a gap or length of 0
E_FLOW = "flow-control"         # stream bytes beyond the granted window
E_FINAL = "final-size"          # FIN at an offset other than an earlier FIN or the data
E_STREAM_ID = "stream-id"       # a stream id the peer may not use (ours, never opened;
                                # or one skipping more than max_streams ids at once)
E_STREAMS = "stream-limit"      # more streams than max_streams + REFUSED_MAX open at once
PROTOCOL_ERRORS = (E_LENGTH, E_TAG, E_FLAGS, E_ACK_UNSENT, E_ACK_RANGE, E_FLOW, E_FINAL,
                   E_STREAM_ID, E_STREAMS)


class ProtocolError(Exception):
    """The peer broke the stream protocol; .reason is one of PROTOCOL_ERRORS."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason
