"""Why a datagram or a message was dropped: every reason udpmux counts, in one table.

A receiver counts what it cannot accept under one of these words (datapath.Drops);
`udpmux status`, the metrics and the once-a-minute log summaries show the counts, and
udpmux-protocol(7) DROP REASONS says what each means (tests/test_docs.py holds the two
together).  Code names a reason by its constant, never by a string of its own.
"""

# The message itself (wire.py)
R_SHORT = "short"               # shorter than a header (+ MAC); a TCP frame length too small
R_VERSION = "version"           # a version this build does not speak
R_TYPE = "type"                 # an unknown message type
R_FLAGS = "flags"               # unknown flag bits set
R_LENGTH = "length"             # the body's size does not fit the type
R_KEYED = "keyed"               # MAC present where none is expected, or missing where one is
R_TOO_LARGE = "too-large"       # a datagram too large for the carrier

# Authentication and freshness (auth.py, session.py)
R_MAC = "mac"                   # the MAC does not verify: wrong key, or altered in transit
R_REPLAY = "replay"             # a nonce already accepted, a HELLO random already seen
R_OLD = "old"                   # a nonce below the replay window
R_NONCE = "nonce"               # nonce 0, which no sender uses
R_ROLE = "role"                 # HELLO asks for a role this responder does not serve
R_UNEXPECTED = "unexpected"     # a handshake message nobody waits for
R_SESSION = "session"           # a session id this receiver does not know
R_HELLO_RATE = "hello-rate"     # an authentic HELLO beyond the answers allowed per second

# Flows and sockets (every mode)
R_SEND = "send"                 # the kernel refused to send (a full buffer, unreachable)
R_RECEIVE = "receive"           # receiving failed (an ICMP error for an earlier datagram)
R_QUEUE = "queue"               # the oldest datagram of a full queue
R_UNKNOWN_TAG = "unknown-tag"   # data for a flow the receiver no longer has
R_SERVICE = "service"           # the local service refused a datagram, or no socket to it

# The relay (relay.py)
R_NO_EXPOSER = "no-exposer"     # a client datagram while no exposer is registered
R_FLOW_RATE = "flow-rate"       # a new flow over the tunnel's new_flows_rate
R_SOURCE_RATE = "source-rate"   # a new flow over new_flows_per_source for its IP address
R_DENIED = "denied"             # a new flow from an address the tunnel's allow/deny refuse
R_TCP_FULL = "tcp-full"         # an unauthenticated TCP connection closed for a newer one
R_TCP_SILENT = "tcp-silent"     # a TCP connection that did not register in time

# The exposer (expose.py)
R_NO_SESSION = "no-session"     # a service reply while no session with the relay is up

# Rendezvous and punch (rendezvous.py, punch.py)
R_FULL = "full"                 # a HELLO beyond a rendezvous tunnel's max_flows agents
R_NO_PARTNER = "no-partner"     # data from a peer whose partner has not registered
R_NAME = "name"                 # a RENDEZVOUS whose side or name cannot be right
R_NO_PATH = "no-path"           # a datagram while neither a direct path nor the relay works
R_UNPROVEN = "unproven"         # a HELLO or WELCOME from a path no challenge proved
R_ANSWER_RATE = "answer-rate"   # a probe beyond the answers allowed per second

# UDP over TCP (uot.py)
R_TARGET = "target"             # the uot-server's target refused a datagram
R_NO_CONNECTION = "no-connection"   # a local datagram while the uot-client is not connected

# The reliable stream (link.py)
R_PROTOCOL = "protocol"         # the peer broke the stream protocol

REASONS = tuple(value for name, value in sorted(globals().items()) if name.startswith("R_"))
