"""Socket addresses: parsing what users type, and the raw form the data path keys on.

How we name things:
  hostport   what a user types: "relay.example:5566", "[2001:db8::1]:5566", "0.0.0.0:5566"
  endpoint   a resolved (family, sockaddr tuple) pair, ready for bind() or sendto()
  destination  a HOST:PORT an agent reaches (a relay, a uot-server, a peer): resolved
             when it starts and again when it must register anew, every address tried
             in turn (Destination)
  peer key   the raw struct sockaddr bytes, as recvmmsg() returns them: 16 bytes for
             IPv4, 28 for IPv6.  Dict keys, tag-table keys and sendmmsg() names are peer
             keys, so the data path never builds a Python tuple per datagram.
"""

import re
import socket
import struct

# struct sockaddr_in / sockaddr_in6: sa_family_t is in host byte order, the port,
# address and flow label are in network byte order, scope_id in host byte order.
_SIN = struct.Struct("=H2s4s8x")
_SIN6 = struct.Struct("=H2s4s16sI")
SOCKADDR_IN_LEN = _SIN.size      # 16
SOCKADDR_IN6_LEN = _SIN6.size    # 28
SOCKADDR_MAX = SOCKADDR_IN6_LEN

_DIGITS = re.compile(r"[0-9]+")        # ASCII digits only: str.isdigit() takes "²" and "٥"
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")


def shown(value, limit=72):
    """repr(value) for a message, cut short: what a user typed may be a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _port(text, whole):
    """A port written in ASCII digits, 0 to 65535; ValueError naming `whole` otherwise.

    int() is not used alone: it also takes "+5", " 5", "5_0" and digits of other
    scripts ("٥٥٦٦"), none of which is a port anyone means to write."""
    if not _DIGITS.fullmatch(text) or len(text) > 5 or int(text) > 65535:
        raise ValueError(f"{shown(whole)}: port must be a number from 0 to 65535")
    return int(text)


def split_hostport(text, default_host=None):
    """Split "host:port", "[v6]:port" or (with default_host) a bare "port".

    Raises ValueError with a message that names what is wrong.
    """
    if not text:
        raise ValueError("empty address")
    if _SPACE.search(text):
        raise ValueError(f"{shown(text)}: an address has no spaces or control characters")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{shown(text)}: expected [IPv6]:PORT")
        if not host:
            raise ValueError(f"{shown(text)}: the address in brackets is missing")
        port = rest[1:]
    elif _DIGITS.fullmatch(text) and default_host is not None:
        host, port = default_host, text
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{shown(text)}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"{shown(text)}: write IPv6 addresses in brackets, as [::1]:PORT")
        if not host:
            raise ValueError(f"{shown(text)}: the host is missing; expected HOST:PORT")
    return host, _port(port, text)


def resolve(host, port, kind=socket.SOCK_DGRAM, passive=False):
    """Resolve to the first (family, sockaddr) that getaddrinfo() offers.

    Raises ValueError naming the host when it cannot be resolved.
    """
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, kind, 0, flags)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {shown(host)}: {exc.strerror}") from None
    except UnicodeError:        # the IDNA codec: an empty or overlong label, a stray byte
        raise ValueError(f"{shown(host)} is not a valid host name") from None
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return family, sockaddr
    raise ValueError(f"{shown(host)} has no IPv4 or IPv6 address")


# Resolver failures that may pass (no network yet at boot, a resolver that timed out):
# tried again, with back-off, where other failures end the command.
TRANSIENT = {socket.EAI_AGAIN, socket.EAI_FAIL, getattr(socket, "EAI_SYSTEM", None)} - {None}


class Unresolved(Exception):
    """A name that cannot be resolved just now (TRANSIENT): try again later."""


class Destination:
    """A HOST:PORT to reach.  resolve() looks the name up (blocking; agents do it while
    they have no session, so no traffic waits) and orders the addresses as RFC 8305
    does: the families alternate, the one the system prefers first.  `address` is the
    one to try now; advance() moves to the next, and past the last resolves the name
    again, so a relay whose address changed is found at its new one."""

    def __init__(self, text, kind=socket.SOCK_DGRAM):
        self.text = text
        self.host, self.port = split_hostport(text)
        if self.port == 0:
            raise ValueError(f"{shown(text)}: port 0 is not a destination; give the port "
                             "to reach")
        self.kind = kind
        self.addresses = []
        self.index = 0

    def resolve(self):
        """Look the name up again; ValueError when it has no address for good,
        Unresolved when it may have one later."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC, self.kind)
        except socket.gaierror as exc:
            if exc.errno in TRANSIENT:
                raise Unresolved(f"cannot resolve {self.host} now: {exc.strerror}") from None
            raise ValueError(f"cannot resolve {shown(self.host)}: {exc.strerror}") from None
        except UnicodeError:
            raise ValueError(f"{shown(self.host)} is not a valid host name") from None
        found = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in found:
                found.append((family, sockaddr))
        if not found:
            raise ValueError(f"{shown(self.host)} has no IPv4 or IPv6 address")
        first = [a for a in found if a[0] == found[0][0]]
        other = [a for a in found if a[0] != found[0][0]]
        order = [a for pair in zip(first, other) for a in pair]
        self.addresses = order + first[len(other):] + other[len(first):]
        self.index = 0
        return self.addresses

    @property
    def address(self):
        """(family, sockaddr) to try now, or None before a resolve() worked."""
        return self.addresses[self.index] if self.addresses else None

    def advance(self):
        """The next address to try; after the last, the name is resolved again (when
        that fails for now, the addresses known go round again)."""
        self.index += 1
        if self.index >= len(self.addresses):
            try:
                self.resolve()
            except (Unresolved, ValueError):
                self.index = 0
        return self.address

    def __str__(self):
        """The name as given, and the address tried when the name is not one."""
        if self.address is None:
            return self.text
        shown_address = format_endpoint(*self.address)
        return self.text if shown_address == self.text else f"{self.text} ({shown_address})"


def parse_endpoint(text, kind=socket.SOCK_DGRAM, passive=False):
    """Parse and resolve user text to (family, sockaddr); ValueError on failure.

    An address to listen on (passive) may have port 0: the kernel picks one.  An
    address to send or connect to may not: nothing listens on port 0."""
    host, port = split_hostport(text, default_host="0.0.0.0" if passive else None)
    if port == 0 and not passive:
        raise ValueError(f"{shown(text)}: port 0 is not a destination; give the port to reach")
    return resolve(host, port, kind, passive)


def parse_port_range(text):
    """Parse "PORT" or "MIN-MAX" into an inclusive (low, high) pair."""
    low, sep, high = text.partition("-")
    numbers = [low, high] if sep else [low]
    if not all(_DIGITS.fullmatch(n) and len(n) <= 5 for n in numbers):
        raise ValueError(f"{shown(text)}: expected PORT or MIN-MAX")
    low, high = int(numbers[0]), int(numbers[-1])
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{shown(text)}: expected ports from 1 to 65535, MIN not above MAX")
    return low, high


def peer_key(family, sockaddr):
    """Pack a sockaddr tuple into the raw bytes the kernel uses (a peer key)."""
    if family == socket.AF_INET:
        host, port = sockaddr[:2]
        return _SIN.pack(socket.AF_INET, port.to_bytes(2, "big"),
                         socket.inet_pton(socket.AF_INET, host))
    host, port = sockaddr[:2]
    flowinfo = sockaddr[2] if len(sockaddr) > 2 else 0
    scope_id = sockaddr[3] if len(sockaddr) > 3 else 0
    return _SIN6.pack(socket.AF_INET6, port.to_bytes(2, "big"), flowinfo.to_bytes(4, "big"),
                      socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), scope_id)


def from_peer_key(key):
    """Unpack a peer key into (family, sockaddr tuple); ValueError if it is neither form."""
    if len(key) == SOCKADDR_IN_LEN:
        family, port, host, = _SIN.unpack(key)
        if family == socket.AF_INET:
            return family, (socket.inet_ntop(family, host), int.from_bytes(port, "big"))
    elif len(key) == SOCKADDR_IN6_LEN:
        family, port, flowinfo, host, scope_id = _SIN6.unpack(key)
        if family == socket.AF_INET6:
            return family, (socket.inet_ntop(family, host), int.from_bytes(port, "big"),
                            int.from_bytes(flowinfo, "big"), scope_id)
    raise ValueError(f"not a sockaddr_in or sockaddr_in6: {key.hex()}")


def format_peer(key):
    """A peer key as people write it: 192.0.2.1:5566 or [2001:db8::1]:5566."""
    try:
        family, sockaddr = from_peer_key(key)
    except ValueError:
        return "?" + key.hex()
    return format_endpoint(family, sockaddr)


def format_endpoint(family, sockaddr):
    host, port = sockaddr[:2]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
