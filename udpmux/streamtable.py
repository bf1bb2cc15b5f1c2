"""The streams of a session: their table, ids, flow control and events, and the
application's calls on them (open_stream, write, read, finish, reset, ...).

StreamTable owns which streams exist (ours odd or even, the peer's as they come,
refused beyond max_streams), what each may send and receive (the grants: WINDOW
values within stream_window and the session_buffer they share, and write()'s
send_buffer), the STREAM, WINDOW and RESET bodies that arrive, and the events the
application reads.  It keeps queues of the streams that have bytes to send
(_sendable) and a WINDOW or RESET to send (_control); Connection (udpmux/stream.py),
which is a StreamTable, turns them into messages, acknowledges and recovers them.
One stream's bytes are a Stream (udpmux/streambuf.py).  The module docstring of
udpmux/stream.py describes the streams and flow control as the peer sees them.

Pure code: no sockets, no clock, no messages.
"""

from collections import namedtuple

from udpmux.streambuf import Stream
from udpmux.streamproto import (
    E_FLAGS, E_LENGTH, E_STREAM_ID, E_STREAMS, E_TAG, INITIAL_WINDOW, RESET_CANCEL, U32,
    ProtocolError,
)
from udpmux.wire import REASON, STREAM, STREAM_FIN, WINDOW

# -- events (see StreamTable.streams_ready)
EV_NEW = "new"                  # the peer opened this stream
EV_READABLE = "readable"        # read() has bytes, or at_eof() became true
EV_WRITABLE = "writable"        # write() was short or refused; there is room again
EV_ACKED = "acked"              # every byte written and FIN acknowledged by the peer
EV_RESET = "reset"              # the peer reset the stream (or refused it); .code says why

REFUSED_MAX = 64                # refused stream ids whose RESET awaits an ACK
WINDOW_GROWTH = 4               # a window that holds its stream back grows this many times

_STREAM_SIZE = STREAM.size
_WINDOW_SIZE = WINDOW.size
_REASON_SIZE = REASON.size


class StreamClosed(Exception):
    """write() or finish() on a stream that can take no more bytes: unknown, already
    finished, or reset (by either end)."""


Event = namedtuple("Event", "kind sid code")
Event.__doc__ = """Something the application may act on: kind is one of the EV_*
constants, sid the stream, code the reason of a reset (None for other kinds)."""


class StreamTable:
    """One session's streams.  Settings as Connection's (udpmux/stream.py)."""

    COUNTS = ("resets_sent", "resets_received", "streams_refused", "stream_bytes_received",
              "duplicate_bytes_received")

    def __init__(self, client, stream_window=1 << 20, session_buffer=16 << 20,
                 send_buffer=None, max_streams=256, window_start=None):
        self.client = client
        self.stream_window = max(stream_window, 1)
        self.window_start = self.stream_window if window_start is None \
            else max(INITIAL_WINDOW, min(window_start, self.stream_window))
        self.session_buffer = session_buffer
        self.send_buffer = stream_window if send_buffer is None else send_buffer
        self.max_streams = max_streams

        self._streams = {}
        self._next_local = 1 if client else 2
        self._peer_next = 2 if client else 1        # the lowest peer id not yet seen
        self._peer_skipped = set()                  # peer ids below _peer_next not yet seen
        self._peer_open = 0                         # peer-opened streams in _streams
        self._refused = {}                          # sid -> reset pending (bool)
        self._sendable = {}                         # sids with bytes or FIN to send (ordered)
        self._control = {}                          # sids with a WINDOW or RESET to send
        self._starved = {}                          # sids waiting for session buffer to grant
        self._write_blocked = {}                    # sids whose write() was short
        self._events = {}                           # (kind, sid) -> Event, in order
        self.committed = 0                          # sum of the streams' commits
        self.send_buffered = 0                      # sum of len(sbuf)
        # bytes written and not yet sent once, per stream: the engine bounds them near
        # what it sends in two round trips, so that what is written next (a keystroke
        # behind a download) waits behind no more than that
        self.unsent_limit = self.send_buffer
        self.counts = dict.fromkeys(self.COUNTS, 0)

    # ------------------------------------------------------------------ application

    def open_stream(self):
        """A new stream of ours; the peer learns of it at once (a WINDOW goes out).
        Raises StreamClosed when max_streams of ours are open (the peer, with the same
        setting, would refuse another with RESET(RESET_REFUSED)), or the session has
        used up its ids (2**31 streams)."""
        sid = self._next_local
        if sid > U32 or len(self._streams) - self._peer_open >= self.max_streams:
            raise StreamClosed(sid)
        self._next_local = sid + 2
        st = self._streams[sid] = Stream(sid, True, self.window_start)
        self._commit(st, INITIAL_WINDOW)
        st.win_pending = True
        self._grant(st)
        self._control[sid] = None
        return sid

    def write(self, sid, data):
        """Take as many of `data`'s bytes as the send buffers hold; returns how many
        (0 when full: EV_WRITABLE says when there is room again)."""
        st = self._streams.get(sid)
        if st is None or st.sfinal is not None or st.reset_code is not None:
            raise StreamClosed(sid)
        room = min(self.send_buffer - len(st.sbuf), self.session_buffer - self.send_buffered,
                   self.unsent_limit - (st.sbase + len(st.sbuf) - st.snext))
        n = len(data)
        if n > room:
            n = max(room, 0)
            self._write_blocked[sid] = None
        if n:
            st.sbuf += data[:n] if n < len(data) else data
            self.send_buffered += n
            if st.snext < st.swin:
                self._sendable[sid] = None
        return n

    def send_space(self, sid):
        """The bytes write() would take now (0 for a stream that takes no more)."""
        st = self._streams.get(sid)
        if st is None or st.sfinal is not None or st.reset_code is not None:
            return 0
        space = min(self.send_buffer - len(st.sbuf), self.session_buffer - self.send_buffered,
                    self.unsent_limit - (st.sbase + len(st.sbuf) - st.snext))
        if space <= 0:
            # The application has more: EV_WRITABLE tells it when there is room, and
            # until then the engine is not short of data (not app-limited).
            self._write_blocked[sid] = None
            return 0
        return space

    def finish(self, sid):
        """No more writes: FIN follows the last byte written.  Nothing happens on a
        stream that is gone (reset, or unknown) or already finished."""
        st = self._streams.get(sid)
        if st is None or st.reset_code is not None:
            return
        if st.sfinal is None:
            st.sfinal = st.sbase + len(st.sbuf)
            self._sendable[sid] = None

    def read(self, sid, max_bytes=65536):
        """In-order bytes of the stream, at most max_bytes; b"" if none (yet)."""
        st = self._streams.get(sid)
        if st is None or not st.rbuf:
            if st is not None and st.rfinal == st.roff and not st.eof_read:
                self._eof_read(st)
            return b""
        data = st.read(max_bytes)
        if st.rfinal is None:
            window = self._window(st)
            if st.roff + window - st.rwin >= (window + 1) // 2:
                self._tune(st)
                self._grant(st)
            else:
                self._commit(st, st.rwin - st.roff)
        else:
            self._commit(st, st.rfinal - st.roff)
            if st.roff == st.rfinal:
                self._eof_read(st)
        if self._starved:
            self._feed_starved()
        return data

    def readable_bytes(self, sid):
        st = self._streams.get(sid)
        return len(st.rbuf) if st is not None else 0

    def at_eof(self, sid):
        """True when no more bytes will come: the peer's FIN and every byte before it
        read, or the stream reset, or unknown (forgotten once both directions ended)."""
        st = self._streams.get(sid)
        if st is None or st.reset_code is not None:
            return True
        return st.rfinal is not None and st.roff == st.rfinal

    def reset(self, sid, code=RESET_CANCEL):
        """Abandon both directions of the stream; the peer gets RESET with `code`."""
        st = self._streams.get(sid)
        if st is None or st.reset_code is not None:
            return
        st.reset_code = code & 0xFF
        st.reset_pending = True
        self._drop_buffers(st)
        self._control[sid] = None
        self.counts["resets_sent"] += 1

    def streams_ready(self):
        """The events since the last call, oldest first, each (kind, sid) at most once:
        a list of Event(kind, sid, code)."""
        if not self._events:
            return []
        events = list(self._events.values())
        self._events.clear()
        return events

    def all_acknowledged(self):
        """True when every byte written on every stream, every FIN and every RESET of
        ours has been acknowledged (streams the peer reset are not counted: their
        EV_RESET said that their bytes were abandoned)."""
        for st in self._streams.values():
            if st.reset_code is not None:
                return False        # a stream we reset stays until its RESET is acked
            if st.sbuf or (st.sfinal is not None and not st.fin_acked):
                return False
        return True

    def stream_ids(self):
        return list(self._streams)

    # ------------------------------------------------------------------ the peer's messages

    def _on_stream(self, sid, body):
        """A STREAM message; returns True when it should be acknowledged at once."""
        if len(body) < _STREAM_SIZE:
            raise ProtocolError(E_LENGTH)
        if not sid:
            raise ProtocolError(E_TAG)
        off, flags = STREAM.unpack_from(body)
        if flags & ~STREAM_FIN:
            raise ProtocolError(E_FLAGS)
        n = len(body) - _STREAM_SIZE
        end = off + n
        st = self._streams.get(sid)
        if st is None:
            st = self._stream_for(sid)
            if st is None:
                return False
        fin = flags & STREAM_FIN
        rend = st.rend
        duplicate = st.receive(off, end, fin, body)
        self.counts["stream_bytes_received"] += n
        if duplicate is None:
            return False
        if duplicate:
            self.counts["duplicate_bytes_received"] += duplicate
        if fin and st.rfinal is None:
            st.rfinal = end
            self._commit(st, end - st.roff)
            st.win_pending = False
            self._starved.pop(sid, None)
            if self._starved:
                self._feed_starved()
        else:
            self._held_back(st, rend)
        if st.rend > rend or (fin and st.rfinal == st.rend):
            key = (EV_READABLE, sid)
            if key not in self._events:
                self._events[key] = Event(EV_READABLE, sid, None)
        return bool(fin or st.ostarts)

    def _on_window(self, sid, body):
        if len(body) != _WINDOW_SIZE:
            raise ProtocolError(E_LENGTH)
        if not sid:
            raise ProtocolError(E_TAG)
        st = self._stream_for(sid)
        if st is None or st.reset_code is not None:
            return
        (value,) = WINDOW.unpack(body)
        if value > st.swin:
            st.swin = value
            if st.has_to_send():
                self._sendable[sid] = None

    def _on_reset(self, sid, body):
        if len(body) != _REASON_SIZE:
            raise ProtocolError(E_LENGTH)
        if not sid:
            raise ProtocolError(E_TAG)
        st = self._stream_for(sid, create=False)
        if st is None:
            return
        self.counts["resets_received"] += 1
        self._event(EV_RESET, sid, body[0])
        self._forget(st)

    def _stream_for(self, sid, create=True):
        """The stream a peer's message names; None for one that is closed (or refused).
        Raises ProtocolError for an id the peer may not use."""
        st = self._streams.get(sid)
        if st is not None:
            return st
        if (sid & 1) == (1 if self.client else 0):      # one of ours
            if sid < self._next_local:
                return None
            raise ProtocolError(E_STREAM_ID)
        if sid < self._peer_next:
            if sid not in self._peer_skipped:
                return None
            self._peer_skipped.discard(sid)
        else:
            skipped = (sid - self._peer_next) // 2
            if skipped:
                if len(self._peer_skipped) + skipped > self.max_streams + REFUSED_MAX:
                    raise ProtocolError(E_STREAM_ID)
                self._peer_skipped.update(range(self._peer_next, sid, 2))
            self._peer_next = sid + 2
        if not create:
            return None
        if self._peer_open >= self.max_streams:
            # Refused with RESET, sent until acknowledged: never dropped in silence,
            # or the peer would take the ACKs of its bytes for their delivery.
            if len(self._refused) >= REFUSED_MAX:
                raise ProtocolError(E_STREAMS)
            self.counts["streams_refused"] += 1
            self._refused[sid] = True
            self._control[sid] = None
            return None
        st = self._streams[sid] = Stream(sid, False, self.window_start)
        self._peer_open += 1
        self._commit(st, INITIAL_WINDOW)
        self._event(EV_NEW, sid)
        self._grant(st)
        return st

    # ------------------------------------------------------------------ our messages' fate

    def _stream_acked(self, st, off, end, fin):
        freed = st.acked(off, end, fin)
        if freed:
            self.send_buffered -= freed
            if self._write_blocked:
                self._tell_writable()
        if st.fin_acked and st.sbase == st.sfinal and not st.acked_told:
            st.acked_told = True
            self._event(EV_ACKED, st.sid)
            if st.eof_read:
                self._forget(st)

    def _requeue_stream(self, st, off, end, fin):
        """Bytes [off, end) (and FIN) of the stream must be sent again."""
        if st.requeue(off, end, fin):
            self._sendable[st.sid] = None

    # ------------------------------------------------------------------ bookkeeping

    def _event(self, kind, sid, code=None):
        key = (kind, sid)
        if key not in self._events:
            self._events[key] = Event(kind, sid, code)

    def _commit(self, st, amount):
        """Set the stream's share of the session buffer to `amount` bytes."""
        self.committed += amount - st.commit
        st.commit = amount

    def _window(self, st):
        """How far past its reads a stream may be granted: its window (window_start,
        grown by _tune() and _held_back() up to stream_window), or a fair share of session_buffer when
        many streams are open (never below the INITIAL_WINDOW every stream has anyway)."""
        size = st.wsize
        share = self.session_buffer // (len(self._streams) or 1)
        if share >= size:
            return size
        return share if share > INITIAL_WINDOW else INITIAL_WINDOW

    def _tune(self, st):
        """Before a grant the reads made due: the stream's window grows WINDOW_GROWTH
        times, up to stream_window, when grants come less than two round trips apart:
        half a window W is then read within 2 RTT, so at a rate R, W < 4 x R x RTT."""
        clock = self._clock()
        if clock is None:
            return
        now, rtt = clock
        if st.granted_at is not None and now - st.granted_at < 2 * rtt:
            self._grow(st)
        st.granted_at = now

    def _held_back(self, st, rend):
        """After bytes arrived: when the peer has sent up to the grant (within an eighth
        of the window) while the reader keeps up (it had read all but a quarter of the
        window of what was in order before: the rest is in flight, or held behind a
        loss), the window is what holds the stream back: it grows, and the grant goes out
        at once.  A slow reader leaves half its window unread, and no more is granted."""
        size = st.wsize
        if st.rwin - st.rmax <= size >> 3 and rend - st.roff <= size >> 2 \
                and size < self.stream_window and self._clock() is not None:
            self._grow(st)
            self._grant(st)

    def _grow(self, st):
        st.wsize = min(WINDOW_GROWTH * st.wsize, self.stream_window)

    def _clock(self):
        """(now, the smoothed RTT) for _tune(), or None: the table alone never tunes."""
        return None

    def _grant(self, st):
        """Raise the stream's grant to _window() past the reads, within the session
        buffer; a WINDOW goes out when it moved."""
        target = st.roff + self._window(st)
        room = self.session_buffer - (self.committed - st.commit)
        if target - st.roff > room:
            target = st.roff + max(room, 0)
            self._starved[st.sid] = None
        if target > st.rwin:
            st.rwin = target
            st.win_pending = True
            self._control[st.sid] = None
        self._commit(st, st.rwin - st.roff)

    def _feed_starved(self):
        for sid in list(self._starved):
            del self._starved[sid]
            st = self._streams.get(sid)
            if st is not None and st.rfinal is None and st.reset_code is None:
                self._grant(st)
            if self.committed >= self.session_buffer:
                break

    def _tell_writable(self):
        """EV_WRITABLE for the streams whose write() was short and that have room now
        (their own buffer, or the session's, emptied)."""
        for sid in list(self._write_blocked):
            st = self._streams.get(sid)
            if st is None or st.reset_code is not None or st.sfinal is not None:
                del self._write_blocked[sid]
            elif self.send_space(sid) > 0:
                del self._write_blocked[sid]
                self._event(EV_WRITABLE, sid)

    def _eof_read(self, st):
        st.eof_read = True
        self._commit(st, 0)
        if st.send_done():
            self._forget(st)

    def _drop_buffers(self, st):
        self.send_buffered -= len(st.sbuf)
        st.drop_buffers()
        self._commit(st, 0)
        self._sendable.pop(st.sid, None)
        self._starved.pop(st.sid, None)
        self._write_blocked.pop(st.sid, None)
        if self._write_blocked:
            self._tell_writable()

    def _forget(self, st):
        """Both directions are over: the stream leaves the table."""
        sid = st.sid
        self._drop_buffers(st)
        del self._streams[sid]
        self._control.pop(sid, None)
        if not st.local:
            self._peer_open -= 1
