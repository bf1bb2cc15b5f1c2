"""What an agent tells its operator about the peer it must reach (a relay, a uot-server,
a punch peer): that handshakes go unanswered and the likely causes, that the peer's
host refused (ICMP), and that the peer answers again.  The agent keeps trying all the
while; this only decides what to say and when, so that a log read an hour later
shows what was wrong without a line for every attempt.

    hello_sent(now)      after each HELLO: at the WORD_AFTER-th unanswered one a
                         warning, then again each time the count doubles, or when
                         QUIET_MOST seconds went by without one
    errors(now, codes)   errors sending or receiving (errno values): those that say
                         something of the peer go to refused()
    refused(now, why)    the host said nobody listens there (ECONNREFUSED from an ICMP
                         port unreachable), or the network is unreachable: said at once,
                         and again only when the reason changes or after QUIET_MOST
    answered(now)        a session is up: after any warning, one line saying so

`where()` returns the peer's address as the log shows it (a name and the address it
resolved to, when they differ); `hints` is the sentence of likely causes.
"""

import errno
import os
import time

from udpmux.addr import Unresolved, format_peer
from udpmux.reasons import R_KEYED, R_MAC

WORD_AFTER = 4                  # unanswered HELLOs before the first warning (about 7 s)
RESOLVE_FIRST, RESOLVE_MOST = 0.5, 30.0     # back-off while a name cannot resolve yet
QUIET_MOST = 300.0              # seconds between repeats of the same warning, at most


class PeerWatch:
    __slots__ = ("log", "what", "where", "hints", "word_after", "unanswered", "since",
                 "said_at", "next_word", "refusal", "troubled")

    def __init__(self, log, what, where, hints, word_after=WORD_AFTER):
        self.log = log
        self.what = what                # "the relay", "the uot-server", ...
        self.where = where
        self.hints = hints
        self.word_after = word_after    # tries before the first word
        self.unanswered = 0
        self.since = None               # when the first unanswered HELLO went
        self.said_at = None             # when a warning last went to the log
        self.next_word = word_after
        self.refusal = None
        self.troubled = False           # a warning was said since the last answer

    def begun(self, now):
        """Trying starts now (when that is before the first try counts)."""
        if self.since is None:
            self.since = now

    def hello_sent(self, now):
        if self.since is None:
            self.since = now
        self.unanswered += 1
        late = self.said_at is not None and now - self.said_at >= QUIET_MOST
        if self.unanswered >= self.next_word or (late and self.unanswered > self.word_after):
            self.next_word = self.unanswered * 2
            self.said_at = now
            self.troubled = True
            self.log.warning("no answer from %s at %s after %d %s in %.0f s: %s",
                             self.what, self.where(), self.unanswered,
                             "try" if self.unanswered == 1 else "tries", now - self.since,
                             self.hints)

    def refused(self, now, why):
        if self.since is None:
            self.since = now
        if why != self.refusal or self.said_at is None or now - self.said_at >= QUIET_MOST:
            self.refusal = why
            self.said_at = now
            self.troubled = True
            self.log.warning("%s at %s: %s; trying again", self.what, self.where(), why)

    def errors(self, now, codes):
        """Errors (errno values) sending to or receiving from the peer: those that say
        something of it (refusal()) are told, the rest (a full buffer) are not."""
        for code in codes:
            why = refusal(code)
            if why is not None:
                self.refused(now, why)

    def answered(self, now):
        if self.troubled:
            self.log.warning("%s at %s answers again, after %.0f s", self.what, self.where(),
                             now - self.since)
        self.unanswered = 0
        self.since = self.said_at = self.refusal = None
        self.next_word = self.word_after
        self.troubled = False


UNAUTHENTIC = {
    R_MAC: "fail authentication: an agent with another key, or not one of ours",
    R_KEYED: "carry a MAC where none is expected or lack one: one side runs with "
             "--insecure and the other with a key",
}


def resolved(destination, log, what):
    """destination's address, at start: while the resolver cannot answer yet (no network
    at boot), wait and try again with back-off, saying so."""
    wait = RESOLVE_FIRST
    while destination.address is None:
        try:
            destination.resolve()
        except Unresolved as exc:
            log.warning("%s at %s: %s; trying again in %g s", what, destination.text, exc,
                        wait)
            time.sleep(wait)
            wait = min(wait * 2, RESOLVE_MOST)
    return destination.address


def unauthentic(log, every, who, key, reason, now):
    """A responder's word on messages that fail authentication: the first source, at
    most once a minute (every: a log.Every) for each reason; the rest are only counted."""
    what = UNAUTHENTIC.get(reason)
    if what is not None and key is not None and every(("unauthentic", reason), now):
        log.warning("%s: messages from %s %s; more this minute are only counted", who,
                    format_peer(key), what)


def refusal(code):
    """What an error (errno) sending to or receiving from a peer means, in words, or None
    when it says nothing about the peer (a full buffer)."""
    if code == errno.ECONNREFUSED:
        return "nothing listens on that port (ICMP port unreachable)"
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"{os.strerror(code).lower()} (no route from here)"
    if code in (errno.EACCES, errno.EPERM):
        return "a local firewall refuses to send there"
    return None
