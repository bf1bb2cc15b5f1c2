"""Limits: token buckets, alone or one per source address in a bounded table, the
admission of a new flow (its source's rate first, then the tunnel's), room for
newcomers among connections not yet authenticated, and the process's open-files limit."""

import ipaddress
import random
import resource
from collections import OrderedDict

from udpmux.addr import from_peer_key
from udpmux.reasons import R_DENIED, R_FLOW_RATE, R_SOURCE_RATE

GRACE = 1.0                     # seconds a new connection has to say HELLO before it may go


class TokenBucket:
    """`rate` tokens a second, holding at most `burst` (by default one second's worth, and
    never less than one token, so that a rate below 1 still lets one through now and then)."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate, burst=None, now=0.0):
        self.rate = rate
        self.burst = max(rate, 1.0) if burst is None else burst
        self.tokens = self.burst
        self.last = now

    def take(self, now, n=1.0):
        """True (and n tokens spent) if n tokens are there."""
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens < n:
            self.tokens = tokens
            return False
        self.tokens = tokens - n
        return True


class PerSource:
    """A token bucket per source, for at most `size` sources (the least recently seen
    is forgotten first, and starts again with a full bucket if it comes back)."""

    def __init__(self, rate, size, burst=None):
        self.rate = rate
        self.burst = burst
        self.size = size
        self.buckets = OrderedDict()

    def take(self, source, now):
        bucket = self.buckets.get(source)
        if bucket is None:
            if len(self.buckets) >= self.size:
                self.buckets.popitem(last=False)
            bucket = self.buckets[source] = TokenBucket(self.rate, self.burst, now)
        else:
            self.buckets.move_to_end(source)
        return bucket.take(now)

    def __len__(self):
        return len(self.buckets)


class Networks:
    """Who may start a flow: an address in none of `deny` and, when `allow` is not
    empty, in one of `allow` (ipaddress networks).  An IPv4 client of a dual-stack
    socket (::ffff:a.b.c.d) is judged by a.b.c.d."""

    def __init__(self, allow=(), deny=()):
        self.allow = tuple(allow)
        self.deny = tuple(deny)

    def __bool__(self):
        return bool(self.allow or self.deny)

    def admits(self, peer):
        _family, sockaddr = from_peer_key(peer)
        address = ipaddress.ip_address(sockaddr[0].partition("%")[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny if net.version == address.version):
            return False
        return not self.allow or any(address in net for net in self.allow
                                     if net.version == address.version)


class FlowAdmission:
    """Whether a new flow may start: from an address `networks` admit, at most
    `per_source` a second from one source (of the `max_sources` seen last) and `rate` a
    second in all.  The source's own limit is asked first, so that a source over it
    does not spend the tunnel's allowance."""

    def __init__(self, rate, per_source, max_sources, now=0.0, networks=None):
        self.tunnel = TokenBucket(rate, now=now)
        self.sources = PerSource(per_source, max_sources)
        self.networks = networks or Networks()

    def refused(self, peer, now):
        """None when a new flow from peer key `peer` may start now, else the reason to
        count: R_DENIED, R_SOURCE_RATE or R_FLOW_RATE."""
        if self.networks and not self.networks.admits(peer):
            return R_DENIED
        if not self.sources.take(source_of(peer), now):
            return R_SOURCE_RATE
        if not self.tunnel.take(now):
            return R_FLOW_RATE
        return None


_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_of(peer):
    """What per-source limits count by: the IPv4 address, or the IPv6 /64.  An IPv4
    client of a dual-stack socket ([::]) arrives as ::ffff:a.b.c.d and counts by a.b.c.d."""
    if len(peer) == 16:
        return peer[4:8]
    if peer[8:20] == _V4_MAPPED:
        return peer[20:24]
    return peer[8:16]


def to_make_room(waiting, source, per_source, most, now):
    """Which of `waiting` (unauthenticated connections, oldest first, each with .source,
    .since and .hello: whether it sent a HELLO that verified) to close so that a newcomer
    from `source` fits, or None when it fits already.

    A source with per_source of them, or all sources with `most`, give one up: the
    oldest that never sent a HELLO and has had GRACE seconds to, so that connections that
    idle cannot keep those with the key out; if all of them are younger, one of them at
    random, so that strangers who reconnect as fast as they are closed cannot push a
    newcomer out before its HELLO has arrived (it survives each further newcomer with a
    chance of 1 - 1/most)."""
    mine = [c for c in waiting if c.source == source]
    for among, bound in ((mine, per_source), (waiting, most)):
        if len(among) >= bound:
            idle = [c for c in among if not c.hello]
            idle_old = [c for c in idle if now - c.since >= GRACE]
            if idle_old:
                return idle_old[0]
            return random.choice(idle) if idle else among[0]
    return None


def raise_open_files(needed, log, what):
    """Make room for `needed` open descriptors: raise the soft limit as far as the hard
    one allows.  When even that is too low, say so: beyond it, new flows are refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < needed:
        log.warning("%s need up to %d open files but the limit is %d; flows beyond it will be "
                    "refused (raise LimitNOFILE= or `ulimit -n`)", what, needed, new)
    return new
