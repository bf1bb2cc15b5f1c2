"""Fuzzing every listening socket of every mode, as real processes on loopback.

The engine that tests/test_fuzz.py runs for a few seconds per target and tools/fuzz.py
for as long as one asks.  Each target starts its daemons, has a legitimate flow of its
own through them (an echo round trip), and throws at one of their sockets, in phases:

  noise      random bytes, of every length class, from many addresses
  forged     messages with a right header (version, a known type, its body size),
             random ids and a random MAC: they get past the header checks
  mutated    real messages captured on the way (procs.Tap, procs.Sniffer, TcpTap),
             bit-flipped, truncated at every length class, lengthened, fields
             rewritten, spliced; over TCP framed with wrong lengths as well
  replayed   whole captures sent again, from another loopback address
  spoofed    mutated captures sent from the legitimate peer's own address and port
             (a raw socket: root only; skipped otherwise)
  keyed      with the valid key: sessions made with udpmux.session.Initiator, then
             validly sealed messages of every type with random and edge-case bodies,
             odd nonces and replays, to reach the parsers behind the MAC

After every BURST datagrams or frames the legitimate flow makes a round trip through
the same daemon (which also paces the fuzzing: the daemon has read the burst when the
answer comes), and after the target: every process watched is alive (a relay's worker
is the same one, never restarted), no log says "Traceback", "crashed" or "internal
error", resident memory grew less than RSS_GROWTH, and the legitimate flow still works.

Everything is drawn from one random.Random(seed): a failure names its seed, and the
same seed, count and target replay the same inputs (timing aside).

TARGETS names them all (tools/fuzz.py --list says what each fuzzes); stream-engine is
the one without a socket: link's stream engine in this process, a million times faster
than through a link-server, so that absurd messages reach every corner of it.  The
sd_notify sockets of the daemons are read as systemd reads them (NotifyReader).

How we name things:
  target   one socket of one mode, with the daemons it needs and a legitimate flow
  phase    one kind of input above, given a share of the target's count and time
  sources  the UDP sockets the fuzzing comes from (several ports on 127.0.0.1-3)
  legit    the legitimate flow's round trip
"""

import base64
import os
import random
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
from pathlib import Path

import psutil

from procs import (
    WAIT, Daemon, Echo, Sniffer, Tap, env, free_port, status, udp_client, udpmux_argv,
)
from udpmux import auth, wire
from udpmux.session import Drop, Initiator
from udpmux.stream import INITIAL_WINDOW, Connection, ProtocolError
from udpmux.wire import (
    BODY_MINIMUM, BODY_SIZES, FLAG_KEYED, FRAME, HEADER, HEADER_SIZE, KEEPALIVE,
    KEEPALIVE_REPLY, MAC_SIZE, MAX_DATAGRAM, MAX_FRAME, MAX_UDP_PAYLOAD, TYPE_NAMES, VERSION,
    Deframer, Malformed, parse_header,
)

LOCAL = "127.0.0.1"
OTHERS = ("127.0.0.2", "127.0.0.3")     # other hosts, for replays from elsewhere
BURST = 64                  # datagrams or frames between two legitimate round trips
RSS_GROWTH = 24 << 20       # resident memory a watched process may gain in one target
LOG_WORDS = ("Traceback", "crashed", "internal error")
ROUNDTRIP_TRIES = 4
ROUNDTRIP_WAIT = 1.5        # seconds for one try of a legitimate round trip
MiB = 1 << 20

ALL_TYPES = sorted(TYPE_NAMES)


def rss(pid):
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def can_spoof():
    return os.geteuid() == 0


# -- what is thrown

class Mutator:
    """Inputs drawn from one random.Random."""

    def __init__(self, rng, keyed=True):
        self.rng = rng
        self.keyed = keyed
        self.trailer = MAC_SIZE if keyed else 0

    def size(self):
        """A length from every class: empty, below a header, about a header and a MAC,
        small, a path MTU, jumbo, the largest a datagram or a carrier can be."""
        rng = self.rng
        r = rng.random()
        if r < 0.04:
            return 0
        if r < 0.30:
            return rng.randrange(1, HEADER_SIZE + MAC_SIZE + 3)
        if r < 0.85:
            return rng.randrange(HEADER_SIZE, 1500)
        if r < 0.985:
            return rng.randrange(1500, 9100)
        return rng.choice((MAX_DATAGRAM - 1, MAX_DATAGRAM, MAX_DATAGRAM + 1, MAX_UDP_PAYLOAD))

    def noise(self, most=MAX_UDP_PAYLOAD):
        rng = self.rng
        data = rng.randbytes(min(self.size(), most))
        if data and rng.random() < 0.5:        # now and then, a first byte that is right
            data = bytes([VERSION]) + data[1:]
        return data

    def number(self, bits):
        rng = self.rng
        top = (1 << bits) - 1
        return rng.choice((0, 1, 2, top, top - 1, top >> 1, (top >> 1) + 1,
                           rng.getrandbits(bits), rng.getrandbits(bits), rng.randrange(64)))

    def body(self, mtype):
        """A body of the size the type has (or may have), of random or edge bytes."""
        rng = self.rng
        size = BODY_SIZES.get(mtype)
        if size is None:
            least = BODY_MINIMUM.get(mtype, 0)
            size = least + rng.choice((0, 1, 7, 8, 63, 64, 65, rng.randrange(1400)))
        fill = rng.random()
        if fill < 0.2:
            return bytes(size)
        if fill < 0.3:
            return b"\xff" * size
        return rng.randbytes(size)

    def forged(self, sessions=()):
        """A message whose header checks pass; ids random or known, a MAC that is not."""
        rng = self.rng
        mtype = rng.choice(ALL_TYPES)
        flags = FLAG_KEYED if self.keyed else 0
        if rng.random() < 0.05:
            flags = rng.getrandbits(16)
        sid = rng.choice((0, self.number(32), *sessions)) if sessions else \
            rng.choice((0, self.number(32)))
        header = HEADER.pack(VERSION, mtype, flags, sid, self.number(32), self.number(64))
        return header + self.body(mtype) + rng.randbytes(self.trailer)

    def cut(self, length):
        """A truncation point from every class, for a message of `length` bytes."""
        rng = self.rng
        points = [0, 1, 2, 3, 4, 8, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1,
                  HEADER_SIZE + MAC_SIZE - 1, HEADER_SIZE + MAC_SIZE, length - MAC_SIZE - 1,
                  length - MAC_SIZE, length - MAC_SIZE + 1, length - 1,
                  rng.randrange(max(length, 1))]
        return max(0, min(length, rng.choice(points)))

    def mutate(self, msg, others=()):
        """msg changed in one to three ways."""
        rng = self.rng
        data = bytearray(msg)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op = rng.randrange(9)
            if op == 0 and data:                    # flip bits
                for _ in range(rng.choice((1, 1, 2, 3, 8))):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1:                           # truncate
                del data[self.cut(len(data)):]
            elif op == 2:                           # lengthen
                data += rng.randbytes(rng.choice((1, 2, MAC_SIZE, rng.randrange(1, 300))))
            elif op == 3 and len(data) >= HEADER_SIZE:     # rewrite a header field
                field = rng.randrange(6)
                if field == 0:
                    data[0] = rng.choice((0, 2, 255, rng.getrandbits(8)))
                elif field == 1:
                    data[1] = rng.choice((*ALL_TYPES, 0, 0x0F, 0x3F, 255, rng.getrandbits(8)))
                elif field == 2:
                    struct.pack_into("!H", data, 2, self.number(16))
                elif field == 3:
                    struct.pack_into("!I", data, 4, self.number(32))
                elif field == 4:
                    struct.pack_into("!I", data, 8, self.number(32))
                else:
                    struct.pack_into("!Q", data, 12, self.number(64))
            elif op == 4 and len(data) > HEADER_SIZE:      # a body byte, or the type
                data[rng.randrange(HEADER_SIZE, len(data))] = rng.getrandbits(8)
            elif op == 5 and others:                # splice with another message
                other = rng.choice(others)
                cut = rng.randrange(len(data) + 1)
                data = data[:cut] + other[rng.randrange(len(other) + 1):]
            elif op == 6 and len(data) > HEADER_SIZE + self.trailer:   # zero the MAC or body
                if rng.random() < 0.5 and self.trailer:
                    data[-MAC_SIZE:] = bytes(MAC_SIZE)
                else:
                    data[HEADER_SIZE:len(data) - self.trailer] = bytes(
                        len(data) - HEADER_SIZE - self.trailer)
            elif op == 7 and len(data) >= 2:        # another type, the same body
                data[1] = rng.choice(ALL_TYPES)
            elif op == 8:                           # duplicate a stretch
                if data:
                    s = rng.randrange(len(data))
                    data[s:s] = data[s:s + rng.randrange(1, 64)]
        return bytes(data[:MAX_UDP_PAYLOAD])

    def frames(self, msgs):
        """A TCP carrier's bytes: the messages framed, mostly right, then (often) one
        frame that cannot be right: a length too small, too large, off by one, or cut."""
        rng = self.rng
        out = bytearray()
        for msg in msgs:
            out += FRAME.pack(len(msg)) + msg
        r = rng.random()
        if r < 0.15 or not msgs:
            return bytes(out)
        msg = rng.choice(msgs)
        if r < 0.55:
            size = rng.choice((0, 1, HEADER_SIZE - 1, HEADER_SIZE, len(msg) - 1, len(msg) + 1,
                               MAX_FRAME, MAX_FRAME + 1, 0xFFFFFFFF, rng.getrandbits(32),
                               rng.randrange(HEADER_SIZE, 4096)))
            out += FRAME.pack(max(0, min(size, 0xFFFFFFFF))) + msg
        elif r < 0.75:
            framed = FRAME.pack(len(msg)) + msg
            out += framed[:rng.randrange(len(framed))]        # cut: then the end
        else:
            out += rng.randbytes(rng.randrange(1, 64))           # garbage between frames
        return bytes(out)


# -- where it is thrown from

class Sources:
    """UDP sockets to send from: several ports on 127.0.0.1 and on OTHERS; replies are
    read and counted (a stranger must never get more bytes back than it sent)."""

    def __init__(self, rng, per_host=3, hosts=(LOCAL, *OTHERS)):
        self.rng = rng
        self.socks = []
        for host in hosts:
            for _ in range(per_host):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((host, 0))
                sock.setblocking(False)
                self.socks.append(sock)
        self.sent = self.received = 0

    def send(self, data, dest, host=None, fresh=False):
        """Send from one of the sockets (on `host` if given), or from a new one."""
        if fresh:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((host or self.rng.choice((LOCAL, *OTHERS)), 0))
                return self._send(sock, data, dest)
        socks = self.socks if host is None else [
            s for s in self.socks if s.getsockname()[0] == host]
        return self._send(self.rng.choice(socks), data, dest)

    def _send(self, sock, data, dest):
        try:
            sock.sendto(data, dest)
        except OSError:         # too large, no buffer, an ICMP error of an earlier one
            return False
        self.sent += len(data)
        return True

    def drain(self):
        for sock in self.socks:
            for _ in range(1000):
                try:
                    self.received += len(sock.recv(70000))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue

    def close(self):
        for sock in self.socks:
            sock.close()


class Spoofer:
    """UDP datagrams with any source address and port on loopback: the legitimate peer's
    own address, as an attacker who spoofs it sends them (a raw socket: root only)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sent = 0

    def send(self, payload, source, dest):
        total = 28 + len(payload)
        if total > 65535:
            return False
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(source[0]), socket.inet_aton(dest[0]))
        udp = struct.pack("!HHHH", source[1], dest[1], 8 + len(payload), 0)
        try:
            self.sock.sendto(ip + udp + payload, (dest[0], 0))
        except OSError:
            return False
        self.sent += 1
        return True

    def close(self):
        self.sock.close()


def tcp_throw(dest, data, rng, host=LOCAL, read=None):
    """One TCP connection to dest that writes data (in pieces), maybe reads a little,
    and ends in one of the ways a stranger ends it.  Returns the bytes it got back."""
    got = 0
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.settimeout(2.0)
        sock.connect(dest)
    except OSError:
        return 0
    try:
        pos = 0
        while pos < len(data):
            step = rng.choice((len(data), len(data), 1, 7, rng.randrange(1, 9000)))
            sock.sendall(data[pos:pos + step])
            pos += step
        if read if read is not None else rng.random() < 0.1:
            sock.settimeout(0.005)
            try:
                got = len(sock.recv(65536))
            except OSError:
                pass
        how = rng.random()
        if how < 0.3:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how < 0.5:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
    return got


class TcpTap(threading.Thread):
    """A TCP path between an agent and its server that records the byte stream of each
    connection in both directions: an attacker's capture of a TCP carrier."""

    def __init__(self, upstream):
        super().__init__(daemon=True)
        self.upstream = upstream
        self.listener = socket.create_server((LOCAL, 0))
        self.listener.settimeout(0.1)
        self.address = self.listener.getsockname()
        self.out = []           # bytearray per connection, agent -> server
        self.back = []
        self.lock = threading.Lock()
        self.running = True
        self.pairs = []
        self.start()

    def run(self):
        while self.running:
            try:
                inner, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                outer = socket.create_connection(self.upstream, timeout=WAIT)
            except OSError:
                inner.close()
                continue
            out, back = bytearray(), bytearray()
            with self.lock:
                self.out.append(out)
                self.back.append(back)
                self.pairs.append((inner, outer))
            threading.Thread(target=self._pump, args=(inner, outer, out), daemon=True).start()
            threading.Thread(target=self._pump, args=(outer, inner, back), daemon=True).start()

    def _pump(self, src, dst, record):
        src.settimeout(0.2)
        while self.running:
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self.lock:
                record += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def streams(self):
        with self.lock:
            return [bytes(s) for s in self.out if s]

    def messages(self):
        """The whole messages the agent sent, in order, over every connection."""
        found = []
        for stream in self.streams():
            deframer = Deframer()
            deframer.feed(stream)
            try:
                found.extend(deframer.messages())
            except Malformed:
                pass
        return found

    def close(self):
        self.running = False
        self.listener.close()
        self.join(2)
        with self.lock:
            pairs = list(self.pairs)
        for a, b in pairs:
            a.close()
            b.close()


# -- legitimate flows

def roundtrip(sock, dest, rng, size=None, what="the legitimate flow"):
    """Send a fresh payload to dest and wait for it to come back (other datagrams that
    arrive meanwhile are skipped), trying a few times: UDP may lose one."""
    payload = b"legit " + rng.randbytes(size if size is not None else rng.randrange(1, 1200))
    for _ in range(ROUNDTRIP_TRIES):
        sock.sendto(payload, dest)
        end = time.monotonic() + ROUNDTRIP_WAIT
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            try:
                if sock.recv(70000) == payload:
                    return
            except OSError:
                break
    raise AssertionError(f"{what}: no echo from {dest[0]}:{dest[1]} after "
                         f"{ROUNDTRIP_TRIES} tries")


class UdpPeer:
    """An agent made of the library's session code on a UDP socket of its own, for the
    keyed phases: it shakes hands as an exposer, a punch peer or a link client would,
    then seals whatever it is told to."""

    def __init__(self, key, role, dest, host=LOCAL):
        self.key = key
        self.role = role
        self.dest = dest
        self.initiator = Initiator(key, role)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.address = self.sock.getsockname()
        self.session = None
        self.sent = []          # what was sealed, for replays

    def handshake(self, timeout=WAIT):
        """HELLO until a WELCOME (responders answer a few HELLOs a second per source),
        then a KEEPALIVE that confirms the session."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.sendto(self.initiator.hello(), self.dest)
            end_try = time.monotonic() + 0.3
            while (left := end_try - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    break
                msg = self.sock.recv(70000)
                try:
                    self.session = self.initiator.welcome(msg)
                except Drop:
                    continue
                self.seal(wire.T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, 0))
                return self.session
        raise AssertionError(f"no WELCOME from {self.dest} within {timeout} s")

    def seal(self, mtype, tag, body, send=True):
        msg = self.session.seal(mtype, tag, body)
        if send:
            self.send(msg)
        if mtype == wire.T_BYE:
            self.session = None         # the responder forgets it: so do we
        self.sent.append(msg)
        if len(self.sent) > 512:
            del self.sent[:256]
        return msg

    def send(self, msg):
        try:
            self.sock.sendto(msg, self.dest)
        except OSError:
            pass

    def receive(self, timeout):
        """[(mtype, tag, body)] of the session's messages that came within timeout (the
        first one waited for, the rest already there); keepalives that ask are answered."""
        got = []
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic() if not got else 0
            ready, _, _ = select.select([self.sock], [], [], max(left, 0))
            if not ready:
                return got
            msg, source = self.sock.recvfrom(70000)
            opened = self.open(msg)
            if opened is not None:
                got.append(opened)

    def open(self, msg):
        session = self.session
        try:
            mtype, sid, tag, nonce = parse_header(msg, self.key is not None)
            if mtype == wire.T_STALE:
                if self.initiator.stale(msg, session):
                    self.session = None
                return None
            if session is None or sid != session.local_id:
                return None
            session.open(msg, nonce)
        except (Malformed, Drop):
            return None
        body = bytes(msg[HEADER_SIZE:len(msg) - (MAC_SIZE if self.key else 0)])
        if mtype == wire.T_KEEPALIVE:
            flags, stamp, _echo = KEEPALIVE.unpack(body)
            if flags & KEEPALIVE_REPLY:
                self.seal(wire.T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, stamp))
        elif mtype == wire.T_BYE:
            self.session = None
        return mtype, tag, body

    def close(self):
        self.sock.close()


class TcpPeer(UdpPeer):
    """The same over a TCP carrier: one connection, framed messages."""

    def __init__(self, key, role, dest, host=LOCAL):
        self.key = key
        self.role = role
        self.dest = dest
        self.initiator = Initiator(key, role)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(WAIT)
        self.sock.connect(dest)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.address = self.sock.getsockname()
        self.deframer = Deframer()
        self.session = None
        self.sent = []
        self.closed = False

    def handshake(self, timeout=WAIT):
        self.send(self.initiator.hello())
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for msg in self._read(end - time.monotonic()):
                try:
                    self.session = self.initiator.welcome(msg)
                except Drop:
                    continue
                self.seal(wire.T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, 0))
                return self.session
            if self.closed:
                break
        raise AssertionError(f"no WELCOME over TCP from {self.dest}")

    def send(self, msg):
        if self.closed:
            return
        try:
            self.sock.sendall(FRAME.pack(len(msg)) + msg)
        except OSError:
            self.closed = True

    def send_raw(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def _read(self, timeout):
        if self.closed:
            return []
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return []
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        self.deframer.feed(data)
        try:
            return list(self.deframer.messages())
        except Malformed:
            self.closed = True
            return []

    def receive(self, timeout):
        got = []
        end = time.monotonic() + timeout
        while True:
            msgs = self._read(end - time.monotonic() if not got else 0)
            if not msgs:
                return got
            for msg in msgs:
                opened = self.open(msg)
                if opened is not None:
                    got.append(opened)


# -- a run

class NotifyReader(threading.Thread):
    """Reads sd_notify sockets as systemd does.  A relay's master writes STATUS= every
    few seconds, and blocks for good once the socket's queue is full (see the report in
    tools/fuzz.py): a Notify nobody reads stops a relay after about a minute here."""

    def __init__(self, notifies):
        super().__init__(daemon=True)
        self.socks = [n.sock for n in notifies]
        self.running = bool(self.socks)
        if self.running:
            self.start()

    def run(self):
        while self.running:
            ready, _, _ = select.select(self.socks, [], [], 0.2)
            for sock in ready:
                try:
                    sock.recv(4096, socket.MSG_DONTWAIT)
                except OSError:
                    pass

    def close(self):
        if self.running:
            self.running = False
            self.join(2)


class Run:
    """The count and the time of one target, shared by its phases; after every BURST
    datagrams or frames, the target's legitimate round trip."""

    def __init__(self, target, count, seconds):
        self.target = target
        self.count = count
        self.seconds = seconds
        self.started = time.monotonic()
        self.sent = 0
        self.syncs = 0
        self.unsynced = 0
        self.limit = 0
        self.deadline = self.started
        self.share = 0.0
        self.phases = []

    def phase(self, name, share):
        """The next phase may use `share` of the count and of the time (shares add up to
        1; a phase that ends early leaves the rest to those after it)."""
        self.share = min(1.0, self.share + share)
        self.limit = int(self.count * self.share)
        self.deadline = self.started + self.seconds * self.share
        self.phases.append([name, self.sent, time.monotonic() - self.started])

    def more(self):
        return self.sent < self.limit and time.monotonic() < self.deadline

    def add(self, n=1):
        self.sent += n
        self.unsynced += n
        if self.unsynced >= BURST:
            self.sync()

    def sync(self):
        self.unsynced = 0
        self.target.sync()
        self.syncs += 1


class Result:
    def __init__(self, name, seed):
        self.name = name
        self.seed = seed
        self.sent = 0
        self.seconds = 0.0
        self.drops = None
        self.logged_drops = None    # from the daemons' drop summaries, where no status
        self.rss_before = {}
        self.rss_after = {}
        self.rss_phases = []        # (phase, {label: RSS at its end})
        self.failures = []
        self.phases = []
        self.unit = "datagrams"
        self.count = self.budget = 0    # what it was given
        self.log_tail = ""

    @property
    def ok(self):
        return not self.failures

    @property
    def rate(self):
        return self.sent / self.seconds if self.seconds else 0.0

    def explain(self):
        return (f"target {self.name}, seed {self.seed}: " + "; ".join(self.failures)
                + f"\n(again: tools/fuzz.py --target {self.name} --seed {self.seed} "
                f"--count {self.count} --seconds {self.budget:g})"
                + (f"\nthe end of the log:\n{self.log_tail}" if self.log_tail else ""))


def run_target(cls, tmp, count, seconds, seed, rss_growth=None):
    """Start the target, fuzz it, check it, stop it; a Result (never raises for what the
    target does: that is what the Result's failures say).  `rss_growth` (bytes) replaces
    the target's own bound."""
    rng = random.Random(seed)
    target = cls(Path(tmp), rng)
    rss_growth = rss_growth or target.rss_growth
    result = Result(target.name, seed)
    result.unit = target.unit
    result.count, result.budget = count, seconds
    reader = None
    stage = "starting"
    try:
        target.start()
        reader = NotifyReader(target.notifies())
        target.legit()
        pids = target.watched()
        result.rss_before = {label: rss(pid) for label, pid in pids.items()}
        drops_before = target.drops()
        run = Run(target, count, seconds)
        try:
            for name, share, phase in target.phases():
                run.phase(name, share)
                phase(run)
                result.rss_phases.append((name, {label: rss(pid) for label, pid in pids.items()}))
            target.settle()
        except AssertionError as exc:
            result.failures.append(f"during phase {run.phases[-1][0] if run.phases else '?'}"
                                   f" after {run.sent} {target.unit}: {exc}")
        except Exception:                   # noqa: BLE001 - what the fuzzing is for
            result.failures.append(f"during phase {run.phases[-1][0] if run.phases else '?'}"
                                   f" after {run.sent} {target.unit}:\n"
                                   + traceback.format_exc())
        result.seconds = time.monotonic() - run.started
        result.sent = run.sent
        result.phases = run.phases
        stage = "checking"
        gone = [label for label, pid in pids.items() if not running(pid)]
        result.failures += [f"{label} (pid {pids[label]}) is gone" for label in gone]
        result.rss_after = {label: rss(pid) for label, pid in pids.items()}
        for label, before in result.rss_before.items():
            after = result.rss_after.get(label)
            if before is not None and after is not None and after - before > rss_growth:
                result.failures.append(f"{label}: resident memory grew by "
                                       f"{(after - before) / MiB:.1f} MiB "
                                       f"(bound {rss_growth / MiB:.0f} MiB)")
        if not gone:
            result.failures += target.problems()
            if target.sources is not None:
                target.sources.drain()
                if target.sources.received > target.sources.sent:
                    result.failures.append(
                        f"strangers got back {target.sources.received} bytes for the "
                        f"{target.sources.sent} they sent")
            stage = "after the fuzzing"
            target.final()
            after = target.drops()
            if after is not None and drops_before is not None:
                result.drops = after - drops_before
        if result.drops is None:
            result.logged_drops = target.logged_drops()
    except AssertionError as exc:
        result.failures.append(f"{stage}: {exc}")
    finally:
        if reader is not None:
            reader.close()
        text = target.logs()
        for word in LOG_WORDS:
            if word in text:
                lines = text.splitlines()
                at = next(i for i, line in enumerate(lines) if word in line)
                excerpt = "\n".join(lines[max(0, at - 3):at + 30])
                result.failures.append(f"{word!r} in the log:\n{excerpt}")
        if result.failures:
            result.log_tail = "\n".join(text.splitlines()[-60:])
        try:
            target.stop()
        except Exception as exc:       # noqa: BLE001 - a report, not a crash of the run
            result.failures.append(f"stopping: {exc!r}")
    return result


# -- targets

class Target:
    """One socket of one mode.  Subclasses start the daemons, name the processes to
    watch, make the legitimate round trip and list the phases."""

    name = "?"
    about = ""                  # one line: what is fuzzed
    unit = "datagrams"
    rss_growth = RSS_GROWTH

    def __init__(self, tmp, rng):
        self.tmp = tmp
        self.rng = rng
        self.mut = Mutator(rng)
        self.daemons = []
        self.closers = []
        self.sources = None
        self.spoofer = None
        self.sync_with = None           # the round trip for sync(), when not legit()

    def add(self, closer):
        self.closers.append(closer)
        return closer

    def keyfile(self):
        path = str(self.tmp / "key")
        if not os.path.exists(path):
            subprocess.run(udpmux_argv("keygen", path), env=env(), check=True)
        return path

    def start(self):
        raise NotImplementedError

    def watched(self):
        """{label: pid} of the processes that must live through it all."""
        return {}

    def legit(self):
        raise NotImplementedError

    def sync(self):
        if self.sources is not None:
            self.sources.drain()
        (self.sync_with or self.legit)()

    def final(self):
        """The legitimate flow after the fuzzing (and a few more ways in)."""
        self.legit()

    def settle(self):
        """After the last phase: let the daemon read what is still queued."""
        self.sync()

    def drops(self):
        return None

    def notifies(self):
        """The procs.Notify sockets the daemons report to, read (as systemd reads them)
        once the daemons are ready."""
        return []

    def logged_drops(self):
        """Drops the daemons logged in their summaries (DropLog: once a minute at most,
        so the last minute's are not there): for those without `udpmux status`."""
        total = None
        for line in self.logs().splitlines():
            if "dropped in the last " in line:
                detail = line.split("dropped in the last ", 1)[1].split(": ", 1)[-1]
                for item in detail.split(", "):
                    count = item.rsplit(" ", 1)[-1]
                    if count.isdigit():
                        total = (total or 0) + int(count)
        return total

    def problems(self):
        return []

    def logs(self):
        return "\n".join(d.log() for d in self.daemons)

    def phases(self):
        return []

    def stop(self):
        while self.closers:
            self.closers.pop()()

    # common phases on a UDP socket

    def udp_sources(self):
        if self.sources is None:
            self.sources = Sources(self.rng)
            self.add(self.sources.close)
        return self.sources

    def spoof(self):
        if self.spoofer is None and can_spoof():
            self.spoofer = Spoofer()
            self.add(self.spoofer.close)
        return self.spoofer

    def noise_phase(self, dest, fresh=0.05):
        def phase(run):
            src, mut, rng = self.udp_sources(), self.mut, self.rng
            while run.more():
                src.send(mut.noise(), dest, fresh=rng.random() < fresh)
                run.add()
        return phase

    def forged_phase(self, dest, sessions=lambda: ()):
        def phase(run):
            src, mut = self.udp_sources(), self.mut
            while run.more():
                src.send(mut.forged(sessions()), dest)
                run.add()
        return phase

    def mutated_phase(self, dest, captures, spoof_from=None, spoof_share=0.3):
        """Captured messages (captures() -> list), mutated, from the sources or, for a
        share of them, from the legitimate peer's own address (spoof_from() -> address)."""
        def phase(run):
            src, mut, rng = self.udp_sources(), self.mut, self.rng
            msgs = captures()
            if not msgs:
                raise AssertionError("nothing was captured to mutate")
            spoofer = self.spoof() if spoof_from is not None else None
            while run.more():
                data = mut.mutate(rng.choice(msgs), msgs)
                if spoofer is not None and rng.random() < spoof_share:
                    spoofer.send(data, spoof_from(), dest)
                else:
                    src.send(data, dest)
                run.add()
        return phase

    def replay_phase(self, dest, captures, spoof_from=None):
        """Whole captures again, in order, from another host (and from the peer's own
        address when it can be spoofed: replays the receiver has seen)."""
        def phase(run):
            src, rng = self.udp_sources(), self.rng
            msgs = captures()
            spoofer = self.spoof() if spoof_from is not None else None
            while run.more():
                for msg in msgs:
                    if not run.more():
                        break
                    if spoofer is not None and rng.random() < 0.5:
                        spoofer.send(msg, spoof_from(), dest)
                    else:
                        src.send(msg, dest, host=rng.choice(OTHERS))
                    run.add()
        return phase

    # common phases on a TCP listener

    def tcp_noise_phase(self, dest):
        def phase(run):
            while run.more():
                tcp_throw(dest, self.mut.noise(), self.rng,
                          host=self.rng.choice((LOCAL, *OTHERS)))
                run.add()
        return phase

    def tcp_forged_phase(self, dest):
        def phase(run):
            mut, rng = self.mut, self.rng
            while run.more():
                msgs = [mut.forged() for _ in range(rng.choice((1, 1, 2, 5)))]
                tcp_throw(dest, mut.frames(msgs), rng)
                run.add(len(msgs))
        return phase

    def tcp_mutated_phase(self, dest, captures):
        def phase(run):
            mut, rng = self.mut, self.rng
            msgs = captures()
            if not msgs:
                raise AssertionError("nothing was captured to mutate")
            while run.more():
                picked = [mut.mutate(rng.choice(msgs), msgs) if rng.random() < 0.8
                          else rng.choice(msgs) for _ in range(rng.choice((1, 1, 2, 4)))]
                tcp_throw(dest, mut.frames(picked), rng, host=rng.choice((LOCAL, *OTHERS)))
                run.add(len(picked))
        return phase

    def tcp_held_phase(self, dest, captures, held_max=48):
        """Connections from many addresses that send part of a frame (or a whole
        message) and stay, more of them than the daemon keeps waiting: the newest
        push out the oldest, and the legitimate flow goes on beside them."""
        def phase(run):
            rng, held = self.rng, []
            msgs = captures() or [self.mut.forged()]
            try:
                while run.more():
                    host = f"127.0.{rng.randrange(6, 9)}.{rng.randrange(1, 250)}"
                    try:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        sock.bind((host, 0))
                        sock.settimeout(2.0)
                        sock.connect(dest)
                        framed = wire.frame(rng.choice(msgs))
                        sock.send(framed[:rng.choice((1, 3, 4, 5, 20, len(framed)))])
                    except OSError:
                        sock.close()
                        run.add()
                        continue
                    held.append(sock)
                    if len(held) > held_max:
                        held.pop(rng.randrange(len(held))).close()
                    run.add()
            finally:
                for sock in held:
                    sock.close()
        return phase

    def tcp_replay_phase(self, dest, streams):
        def phase(run):
            rng = self.rng
            captured = streams()
            if not captured:
                raise AssertionError("no TCP stream was captured")
            while run.more():
                data = rng.choice(captured)
                tcp_throw(dest, data, rng, host=rng.choice(OTHERS))
                run.add(max(1, len(data) // 64))
        return phase

    # the keyed phases: validly sealed messages of every type

    def keyed_throw(self, peer, tags=(), data_max=MAX_DATAGRAM, bye=0.002, elsewhere=None,
                    exclude=(), games=0.07):
        """One message sealed with peer's session, of any type, with a random or an edge
        body; now and then a replay of its own, an old nonce, a gap in the nonces, or
        (elsewhere: a Sources) the message sent from another address.  `games` is the
        share of those nonce games (a TCP carrier ends the connection for each)."""
        rng, mut, session = self.rng, self.mut, peer.session
        r = rng.random() * 0.07 / games if games else 1.0
        if r < 0.03 and peer.sent:
            peer.send(rng.choice(peer.sent))
            return
        if r < 0.05:
            keep = session.send_nonce
            session.send_nonce = max(0, keep - rng.choice((1, 2, 63, 64, 65, 1000, keep)))
            msg = session.seal(wire.T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, 0))
            session.send_nonce = keep
            peer.send(msg)
            return
        if r < 0.07:
            session.send_nonce += rng.choice((1, 2, 63, 64, 65, 1 << 16, 1 << 32))
        r = rng.random()
        if r < bye:
            mtype = wire.T_BYE
        elif r < 0.45:
            mtype = wire.T_DATA
        elif r < 0.6:
            mtype = wire.T_CLOSE
        elif r < 0.75:
            mtype = wire.T_KEEPALIVE
        else:
            mtype = rng.choice([t for t in ALL_TYPES if t != wire.T_BYE and t not in exclude])
        tag = rng.choice(tags) if tags and rng.random() < 0.5 else mut.number(32)
        if mtype == wire.T_DATA:
            size = rng.choice((0, 1, rng.randrange(1, 200), rng.randrange(1, 1500),
                               rng.randrange(1, 1500), data_max if rng.random() < 0.05 else 1))
            body = rng.randbytes(size)
        elif mtype == wire.T_KEEPALIVE:
            body = KEEPALIVE.pack(rng.choice((0, 1, 1, 255, rng.getrandbits(8))),
                                  mut.number(32), mut.number(32))
        else:
            body = mut.body(mtype)
        away = elsewhere is not None and rng.random() < 0.05
        msg = peer.seal(mtype, tag, body, send=not away)
        if away:
            elsewhere.send(msg, peer.dest)


# -- relay: every socket of a tunnel in mode "expose"

class RelayTarget(Target):
    """A relay tunnel with an exposer (behind a Tap, or a TcpTap over TCP), an echo
    service and a client: the legitimate flow goes client -> public socket -> exposer
    -> service and back."""

    name = "relay-register"
    where = "register"          # the socket fuzzed: public, register, tcp, shared, control
    keyed = True                # False: --insecure at both ends (no MAC: every forgery
                                # that parses is taken for the exposer's)

    def start(self):
        from test_relay import Rig
        self.rig = rig = Rig(self.tmp)
        self.add(rig.close)
        self.key = auth.read_key(rig.key) if self.keyed else None
        self.mut = Mutator(self.rng, keyed=self.keyed)
        self.public = free_port()
        self.register = self.public if self.where == "shared" else free_port()
        args = ["relay", "--public", f"{LOCAL}:{self.public}", "--control-socket", rig.control,
                *(["--key-file", rig.key] if self.keyed else ["--insecure"]),
                "--metrics-listen", f"{LOCAL}:0", "--debug"]
        if self.where != "shared":
            args += ["--register", f"{LOCAL}:{self.register}"]
        self.relay = rig.start(args)
        self.daemons.append(self.relay)
        rig.notify.wait_for("READY=1")
        line = self.relay.lines[self.relay.wait_log("metrics at http://")]
        self.metrics = int(line.rsplit(":", 1)[1].split("/")[0])
        self.tap = self.tcptap = None
        if self.where == "tcp":
            self.tcptap = self.add_tcptap((LOCAL, self.register))
            self.exposer = self.expose("--carrier", "tcp", at=self.tcptap.address)
        else:
            self.tap = Tap((LOCAL, self.register))
            self.add(self.tap.close)
            self.exposer = self.expose(at=self.tap.address)
        self.client = udp_client()
        self.add(self.client.close)
        self.worker = self.tunnel()["worker_pid"]
        self.peer = None

    def add_tcptap(self, upstream):
        tap = TcpTap(upstream)
        self.add(tap.close)
        return tap

    def expose(self, *extra, at=None):
        exposer = self.rig.expose("--keepalive", "1", *extra, relay=f"{LOCAL}:{at[1]}",
                                  key=None if self.keyed else False)
        self.daemons.append(exposer)
        return exposer

    def tunnel(self):
        return self.rig.tunnel()

    def watched(self):
        return {"relay master": self.relay.pid, "relay worker": self.worker}

    def notifies(self):
        return [self.rig.notify]

    def legit(self):
        roundtrip(self.client, (LOCAL, self.public), self.rng)

    def drops(self):
        return sum(self.tunnel()["drops"].values())

    def worker_problems(self):
        t = self.tunnel()
        found = []
        if t["restarts"] or t["worker_pid"] != self.worker:
            found.append(f"the tunnel's worker was restarted ({t['restarts']} restarts, "
                         f"pid {self.worker} -> {t['worker_pid']})")
        return found

    def final(self):
        """The legitimate flow, then a real exposer registering again (after a keyed
        phase, one made of the library took its place) and the flow through it."""
        if self.peer is not None:
            self.legit_via_peer()
            self.peer.close()
            self.peer = None
            self.sync_with = None
            at = self.tcptap.address if self.tcptap else self.tap.address
            self.exposer = self.expose(*(["--carrier", "tcp"] if self.tcptap else []), at=at)
        elif not self.keyed:
            self.exposer.stop()
            at = self.tcptap.address if self.tcptap else self.tap.address
            self.exposer = self.expose(*(["--carrier", "tcp"] if self.tcptap else []), at=at)
        self.legit()

    def captures(self):
        if self.tcptap is not None:
            return self.tcptap.messages()
        return self.tap.captured() + self.tap.captured(direction="back")

    def exposer_address(self):
        return self.tap.outward_address

    def phases(self):
        reg = (LOCAL, self.register)
        if self.where == "public":
            pub = (LOCAL, self.public)
            return [("noise", 0.4, self.noise_phase(pub, fresh=0.3)),
                    ("mutated", 0.4, self.mutated_phase(pub, self.captures)),
                    ("replayed", 0.2, self.replay_phase(pub, self.captures))]
        if self.where == "control":
            return [("http", 0.5, self.http_phase), ("status", 0.5, self.status_phase)]
        if self.where == "tcp":
            return [("noise", 0.15, self.tcp_noise_phase(reg)),
                    ("held", 0.05, self.tcp_held_phase(reg, self.captures)),
                    ("forged", 0.15, self.tcp_forged_phase(reg)),
                    ("mutated", 0.25, self.tcp_mutated_phase(reg, self.captures)),
                    ("replayed", 0.05, self.tcp_replay_phase(reg, self.tcptap.streams)),
                    ("keyed", 0.35, self.keyed_phase)]
        sessions = lambda: [int.from_bytes(m[4:8], "big")  # noqa: E731
                            for m in self.captures()[-8:] if len(m) >= 8]
        return [("noise", 0.15, self.noise_phase(reg)),
                ("forged", 0.15, self.forged_phase(reg, sessions)),
                ("mutated", 0.25, self.mutated_phase(reg, self.captures,
                                                     spoof_from=self.exposer_address)),
                ("replayed", 0.1, self.replay_phase(reg, self.captures,
                                                    spoof_from=self.exposer_address)),
                ("keyed", 0.35, self.keyed_phase)]

    # -- keyed: an exposer made of the library's session code takes the real one's place

    def keyed_phase(self, run):
        self.exposer.stop()             # its log is still checked
        self.peer = self.new_peer()
        self.sync_with = self.legit_via_peer
        self.tags = []
        self.legit_via_peer()
        others = self.udp_sources() if self.where != "tcp" else None
        data_max = MAX_UDP_PAYLOAD if self.where == "tcp" else MAX_DATAGRAM
        while run.more():
            self.ensure_peer()
            self.keyed_throw(self.peer, self.tags, data_max=data_max, elsewhere=others,
                             games=0.07 if others is not None else 0.005)
            run.add()
            if self.rng.random() < 0.01:        # a stray HELLO, any role, from elsewhere
                hello = Initiator(self.key, self.rng.choice((0, 1, 2, 3, 4, 5, 255))).hello()
                if others is not None:
                    others.send(hello, (LOCAL, self.register))
                else:
                    tcp_throw((LOCAL, self.register), wire.frame(hello), self.rng)
                run.add()

    def new_peer(self):
        reg = (LOCAL, self.register)
        for n in range(50):
            host = f"127.0.1.{self.rng.randrange(1, 250)}"
            peer = (TcpPeer if self.where == "tcp" else UdpPeer)(self.key, wire.ROLE_EXPOSE,
                                                                  reg, host=host)
            try:
                peer.handshake(timeout=3.0)
                return peer
            except AssertionError:
                peer.close()
        raise AssertionError("an exposer made of the library could not register")

    def ensure_peer(self):
        peer = self.peer
        if peer.session is None or getattr(peer, "closed", False):
            peer.close()
            self.peer = self.new_peer()

    def legit_via_peer(self):
        """client -> public socket -> relay -> DATA to our exposer, which sends it back."""
        if self.sources is not None:
            self.sources.drain()
        for attempt in range(ROUNDTRIP_TRIES):
            self.ensure_peer()
            payload = b"legit " + self.rng.randbytes(self.rng.randrange(1, 1200))
            self.client.sendto(payload, (LOCAL, self.public))
            end = time.monotonic() + ROUNDTRIP_WAIT
            answered = False
            while not answered and time.monotonic() < end and self.peer.session is not None \
                    and not getattr(self.peer, "closed", False):
                for mtype, tag, body in self.peer.receive(end - time.monotonic()):
                    if mtype == wire.T_DATA and body == payload:
                        self.peer.seal(wire.T_DATA, tag, payload)
                        if tag not in self.tags:
                            self.tags = (self.tags + [tag])[-8:]
                        answered = True
                        break
            if not answered:
                continue
            while (left := end + ROUNDTRIP_WAIT - time.monotonic()) > 0:
                ready, _, _ = select.select([self.client], [], [], left)
                if not ready:
                    break
                if self.client.recv(70000) == payload:
                    return
        raise AssertionError("the legitimate flow through an exposer made of the library "
                             f"failed {ROUNDTRIP_TRIES} times")

    # -- the control socket and the metrics port

    def http_phase(self, run):
        rng, mut = self.rng, self.mut
        held = []
        dest = (LOCAL, self.metrics)
        requests = [b"GET /metrics HTTP/1.0\r\n\r\n", b"HEAD /metrics HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.0\r\n\r\n", b"POST /metrics HTTP/1.0\r\n\r\n", b"\r\n\r\n",
                    b"\n\n", b"GET\n\n", b"GET /metrics?" + b"a" * 9000 + b"\r\n\r\n",
                    b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 2000,
                    b"GET /\xff\xfe HTTP/1.0\r\n\r\n", b"GET " + b"/" * 8191]
        try:
            while run.more():
                r = rng.random()
                if r < 0.1:                             # slow: half a request, left open
                    sock = self._connect(dest)
                    if sock is not None:
                        try:
                            sock.send(rng.choice(requests)[:rng.randrange(1, 20)])
                        except OSError:
                            pass
                        held.append(sock)
                        if len(held) > 24:
                            held.pop(0).close()
                elif r < 0.5:
                    tcp_throw(dest, rng.choice(requests), rng)
                else:
                    data = mut.noise(20000)
                    if rng.random() < 0.5:
                        data += b"\r\n\r\n"
                    tcp_throw(dest, data, rng)
                run.add()
        finally:
            for sock in held:
                sock.close()

    def status_phase(self, run):
        rng, mut = self.rng, self.mut
        held = []
        requests = [b'{"request": "status"}\n', b'{"request": "flows", "tunnel": "tunnel"}\n',
                    b'{"request": "flows", "tunnel": ["x"]}\n', b'{"request": 7}\n',
                    b'[' * 100000 + b'\n', b'{"a":' * 5000 + b'\n', b'1' * 5000 + b'\n',
                    b'"\\ud800"\n', b'NaN\n', b'{"request": "status"}', b'\n', b'\xff\xfe\n',
                    b'{"request": "flows", "tunnel": "' + b'x' * 3000 + b'"}\n',
                    b'{"request": "status"}\n' * 50, b'x' * 5000]
        try:
            while run.more():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(2.0)
                try:
                    sock.connect(self.rig.control)
                    r = rng.random()
                    if r < 0.1:
                        sock.send(rng.choice(requests)[:rng.randrange(1, 30)])
                        held.append(sock)
                        if len(held) > 24:
                            held.pop(0).close()
                        sock = None
                    else:
                        data = rng.choice(requests) if r < 0.6 else mut.noise(6000)
                        if rng.random() < 0.3:
                            data += b"\n"
                        sock.sendall(data)
                        if rng.random() < 0.5:
                            sock.shutdown(socket.SHUT_WR)
                        sock.settimeout(0.01)
                        try:
                            sock.recv(65536)
                        except OSError:
                            pass
                except OSError:
                    pass
                finally:
                    if sock is not None:
                        sock.close()
                run.add()
        finally:
            for sock in held:
                sock.close()

    @staticmethod
    def _connect(dest):
        try:
            return socket.create_connection(dest, timeout=2.0)
        except OSError:
            return None

    def control_legit(self):
        """A status request on the control socket and a scrape, each answered."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT)
            sock.connect(self.rig.control)
            sock.sendall(b'{"request": "status"}\n')
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if b'"tunnels"' not in data:
            raise AssertionError(f"the control socket answered {data[:200]!r}")
        with socket.create_connection((LOCAL, self.metrics), timeout=WAIT) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if not data.startswith(b"HTTP/1.0 200") or b"udpmux_tunnel_up" not in data:
            raise AssertionError(f"the metrics port answered {data[:200]!r}")

    def sync(self):
        if self.where == "control":
            self.control_legit()
        if not self.keyed and self.peer is None:
            # Without a key anyone may register, and a forgery that parses is the
            # exposer's: the flow is not expected to survive the strangers, the relay
            # is (and final() registers an exposer again and checks the flow).
            if self.sources is not None:
                self.sources.drain()
            return
        super().sync()

    def problems(self):
        found = self.worker_problems()
        if not self.keyed and self.sources is not None:
            self.sources.received = 0      # a stranger that registered got the clients'
        return found

    def stop(self):
        if self.peer is not None:
            self.peer.close()
        super().stop()


RELAY_ABOUT = {
    "public": "a relay tunnel's public UDP socket (its clients')",
    "register": "a relay tunnel's register UDP socket, then an exposer with the key",
    "tcp": "a relay tunnel's TCP register listener, then an exposer with the key over TCP",
    "shared": "a relay tunnel's one UDP socket for clients and exposer, then an exposer "
              "with the key",
    "control": "a relay's metrics HTTP port and its status unix socket",
}


def relay_target(where, keyed=True):
    unit = {"tcp": "frames", "control": "requests"}.get(where, "datagrams")
    name = f"relay-{where}" if keyed else f"relay-{where}-insecure"
    about = RELAY_ABOUT[where] if keyed else \
        RELAY_ABOUT[where].replace("with the key", "") + " (--insecure: no MAC at all)"
    return type(f"Relay_{name}", (RelayTarget,), {"name": name, "where": where, "unit": unit,
                                                   "about": about, "keyed": keyed})


# -- rendezvous: where punch peers meet

class RendezvousTarget(Target):
    """A rendezvous tunnel with a real punch pair (captured with a Sniffer), and two
    peers made of the library, paired by the name "fuzz", whose DATA the relay carries:
    the legitimate flows are the real pair's (client -> punch -> echo) and ours."""

    name = "rendezvous"
    about = "a rendezvous tunnel's UDP socket, then punch peers with the key"

    def start(self):
        from test_punch import Pair
        self.pair = pair = Pair(self.tmp)
        self.add(pair.close)
        pair.relay()
        self.daemons.append(pair.relay_daemon)
        self.meet = (LOCAL, pair.meet)
        self.sniffer = Sniffer({pair.meet})
        self.add(self.sniffer.close)
        pair.brokered("mosh")
        self.daemons.extend([pair.forwarder, pair.listener])
        pair.listener.wait_log("direct path to")
        end = time.monotonic() + WAIT
        while not any(p["name"] == "mosh" and p["listen"] and p["forward"]
                      for p in self.tunnel()["pairs"]):
            if time.monotonic() > end:
                raise AssertionError("the punch pair never showed in the relay's status")
            time.sleep(0.1)
        self.key = auth.read_key(pair.key)
        self.client = udp_client()
        self.add(self.client.close)
        self.worker = status(pair.control)["tunnels"][0]["worker_pid"]
        self.a = self.b = None
        self.fuzzers = []
        self.meet_ours()

    def meet_ours(self):
        for peer in (self.a, self.b):
            if peer is not None:
                peer.close()
        self.a = self.registered(wire.SIDE_LISTEN, b"fuzz", host="127.0.3.1")
        self.b = self.registered(wire.SIDE_FORWARD, b"fuzz", host="127.0.3.2")

    def registered(self, side, name, host):
        peer = UdpPeer(self.key, wire.ROLE_PUNCH, self.meet, host=host)
        self.add(peer.close)
        peer.handshake()
        peer.seal(wire.T_RENDEZVOUS, 0, bytes([side]) + name)
        peer.name = name
        return peer

    def tunnel(self):
        return status(self.pair.control)["tunnels"][0]

    def notifies(self):
        return [self.pair.notify]

    def watched(self):
        return {"relay master": self.pair.relay_daemon.pid, "rendezvous worker": self.worker,
                "punch --listen": self.pair.listener.pid,
                "punch --forward": self.pair.forwarder.pid}

    def legit(self):
        roundtrip(self.client, (LOCAL, self.pair.listen), self.rng)
        self.relayed()

    def relayed(self):
        """DATA from our listen peer reaches our forward peer through the relay."""
        if self.sources is not None:
            self.sources.drain()
        for attempt in range(ROUNDTRIP_TRIES):
            if attempt or self.a.session is None or self.b.session is None:
                self.meet_ours()
            a, b = self.a, self.b
            payload = b"legit " + self.rng.randbytes(self.rng.randrange(1, 1200))
            a.seal(wire.T_DATA, 7, payload)
            end = time.monotonic() + ROUNDTRIP_WAIT
            while time.monotonic() < end:
                got = b.receive(end - time.monotonic())
                a.receive(0)
                if any(m == wire.T_DATA and body == payload for m, _t, body in got):
                    return
        raise AssertionError("DATA between two peers paired by the rendezvous was lost "
                             f"{ROUNDTRIP_TRIES} times")

    def drops(self):
        return sum(self.tunnel()["drops"].values())

    def problems(self):
        t = self.tunnel()
        if t["restarts"] or t["worker_pid"] != self.worker:
            return [f"the rendezvous worker was restarted ({t['restarts']} restarts)"]
        return []

    def captures(self):
        return [data for _port, data in self.sniffer.captured()]

    def agent_address(self):
        """Where one of the real punch agents sends from, as the relay sees it."""
        pairs = self.pair_status
        side = self.rng.choice(("listen", "forward"))
        host, port = pairs[side].rsplit(":", 1)
        return host, int(port)

    def phases(self):
        self.pair_status = next(p for p in self.tunnel()["pairs"] if p["name"] == "mosh")
        sessions = lambda: [int.from_bytes(m[4:8], "big")  # noqa: E731
                            for m in self.captures()[-8:] if len(m) >= 8]
        return [("noise", 0.15, self.noise_phase(self.meet)),
                ("forged", 0.15, self.forged_phase(self.meet, sessions)),
                ("mutated", 0.25, self.mutated_phase(self.meet, self.captures,
                                                     spoof_from=self.agent_address)),
                ("replayed", 0.1, self.replay_phase(self.meet, self.captures,
                                                    spoof_from=self.agent_address)),
                ("keyed", 0.35, self.keyed_phase)]

    NAMES = [b"fuzz-a", b"fuzz-b", b"x", "caf\u00e9".encode(), b"\xff\xfe", b"\x00",
             b"n" * 64, b"n" * 65, b"n" * 63 + b"\xc3", b"\x01" * 64, b" ", b"fuzz"]

    def keyed_phase(self, run):
        rng = self.rng
        hosts = [f"127.0.4.{n}" for n in range(1, 9)]
        for host in hosts:
            peer = UdpPeer(self.key, wire.ROLE_PUNCH, self.meet, host=host)
            self.add(peer.close)
            self.fuzzers.append(peer)
        elsewhere = self.udp_sources()
        while run.more():
            peer = rng.choice(self.fuzzers + [self.a, self.b])
            if peer.session is None:
                if peer in (self.a, self.b):
                    self.meet_ours()
                    continue
                try:
                    peer.handshake(timeout=1.0)
                except AssertionError:
                    continue
            r = rng.random()
            if r < 0.15 and peer not in (self.a, self.b):
                name = rng.choice(self.NAMES) if rng.random() < 0.8 else \
                    rng.randbytes(rng.randrange(0, 70))
                side = rng.choice((1, 2, 1, 2, 0, 3, 255))
                peer.seal(wire.T_RENDEZVOUS, 0, bytes([side]) + name)
            elif r < 0.25:
                peer.seal(wire.T_PATH, 0, bytes([rng.choice((0, 1, 2, 3, 255))]))
            else:
                ours = peer in (self.a, self.b)
                self.keyed_throw(peer, (7,), bye=0.0 if ours else 0.01, elsewhere=elsewhere,
                                 exclude=(wire.T_RENDEZVOUS,) if ours else ())
            if rng.random() < 0.05:
                peer.receive(0)
            run.add()           # last: its round trip may give us new peers of our own

    def stop(self):
        super().stop()


# -- punch: the main socket of either side, and the listen side's local socket

class PunchTarget(Target):
    """Two punch agents with a direct path (captured with a Sniffer) and an echo service
    behind the forward side: the legitimate flow goes client -> listen side -> forward
    side -> echo and back."""

    name = "punch-forward"
    about = "punch --forward's main UDP socket, then probes under the key"
    where = "forward"           # forward, listen: that side's main socket; local

    def start(self):
        keyfile = self.keyfile()
        self.key = auth.read_key(keyfile)
        self.echo = Echo()
        self.add(self.echo.close)
        a, b, self.listen = free_port(), free_port(), free_port()
        self.ports = {"forward": a, "listen": b}
        self.sniffer = Sniffer({a, b})
        self.add(self.sniffer.close)
        self.forwarder = Daemon(["punch", "--peer", f"{LOCAL}:{b}", "--port", a, "--key-file",
                                 keyfile, "--forward", f"{LOCAL}:{self.echo.port}",
                                 "--keepalive", "1", "--debug"])
        self.add(self.forwarder.stop)
        self.listener = Daemon(["punch", "--peer", f"{LOCAL}:{a}", "--port", b, "--key-file",
                                keyfile, "--listen", f"{LOCAL}:{self.listen}", "--keepalive",
                                "1", "--debug"])
        self.add(self.listener.stop)
        self.daemons += [self.forwarder, self.listener]
        self.listener.wait_log("direct path to")
        self.forwarder.wait_log("direct path to")
        self.client = udp_client()
        self.add(self.client.close)

    def watched(self):
        return {"punch --forward": self.forwarder.pid, "punch --listen": self.listener.pid}

    def legit(self):
        roundtrip(self.client, (LOCAL, self.listen), self.rng)

    def captures(self):
        return [data for _port, data in self.sniffer.captured()]

    def phases(self):
        if self.where == "local":
            dest = (LOCAL, self.listen)
            return [("noise", 0.5, self.noise_phase(dest, fresh=0.3)),
                    ("mutated", 0.3, self.mutated_phase(dest, self.captures)),
                    ("replayed", 0.2, self.replay_phase(dest, self.captures))]
        dest = (LOCAL, self.ports[self.where])
        other = "listen" if self.where == "forward" else "forward"
        peer = lambda: (LOCAL, self.ports[other])  # noqa: E731
        sessions = lambda: [int.from_bytes(m[4:8], "big")  # noqa: E731
                            for m in self.captures()[-8:] if len(m) >= 8]
        return [("noise", 0.15, self.noise_phase(dest)),
                ("forged", 0.15, self.forged_phase(dest, sessions)),
                ("mutated", 0.3, self.mutated_phase(dest, self.captures, spoof_from=peer)),
                ("replayed", 0.1, self.replay_phase(dest, self.captures, spoof_from=peer)),
                ("keyed", 0.3, self.keyed_phase(dest))]

    def keyed_phase(self, dest):
        """With the key, under the handshake key: probes, answers to probes (echoing the
        agents' own challenges, captured, or random ones), HELLO, WELCOME, STALE."""
        def phase(run):
            rng, mut = self.rng, self.mut
            src = self.udp_sources()
            init = Initiator(self.key, wire.ROLE_PUNCH)
            seen = [m[HEADER_SIZE:HEADER_SIZE + 16] for m in self.captures()
                    if len(m) > HEADER_SIZE + 32 and m[1] == wire.T_PUNCH]
            while run.more():
                r = rng.random()
                if r < 0.45:
                    challenge = rng.choice((wire.NO_RANDOM, rng.randbytes(16), rng.randbytes(16)))
                    echo = rng.choice((wire.NO_RANDOM, wire.NO_RANDOM, rng.randbytes(16),
                                       *(rng.choice(seen) for _ in range(1 if seen else 0))))
                    msg = init.seal(wire.T_PUNCH, 0, wire.PUNCH.pack(challenge, echo))
                elif r < 0.6:
                    msg = Initiator(self.key, rng.choice((4, 4, 4, 1, 0, 255))).hello()
                elif r < 0.8:
                    mtype = rng.choice(ALL_TYPES)
                    msg = init.seal(mtype, mut.number(32), mut.body(mtype))
                elif r < 0.83:
                    self.prove_a_path(dest, init)
                    run.add()
                    continue
                else:
                    mtype = rng.choice((wire.T_WELCOME, wire.T_STALE))
                    msg = init.seal(mtype, mut.number(32), mut.body(mtype))
                src.send(msg, dest)
                run.add()
        return phase

    def prove_a_path(self, dest, init):
        """A key holder elsewhere on this host answers a probe's challenge: the agent has
        a proven path to it (and the listen side says HELLO there)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOCAL, 0))
            sock.settimeout(0.3)
            mine = self.rng.randbytes(16)
            sock.sendto(init.seal(wire.T_PUNCH, 0, wire.PUNCH.pack(mine, wire.NO_RANDOM)), dest)
            try:
                for _ in range(4):
                    answer = sock.recv(70000)
                    if answer[1] != wire.T_PUNCH:
                        continue
                    challenge, echo = wire.PUNCH.unpack(init.open(answer, wire.T_PUNCH))
                    if echo == mine and challenge != wire.NO_RANDOM:
                        sock.sendto(init.seal(wire.T_PUNCH, 0,
                                              wire.PUNCH.pack(wire.NO_RANDOM, challenge)), dest)
                        return
            except (OSError, Drop):
                return


# -- uot: the server's TCP listener, the client's local UDP socket

class UotTarget(Target):
    """A uot-server before an echo service, and a uot-client that reaches it through a
    TcpTap: the legitimate flow goes client -> uot-client -> uot-server -> echo."""

    name = "uot-server"
    about = "uot-server's TCP listener, then uot clients with the key"
    where = "server"            # server: its TCP listener; client: its local UDP socket
    unit = "frames"

    def start(self):
        from test_uot import Uot
        self.uot = uot = Uot(self.tmp)
        self.add(uot.close)
        self.key = auth.read_key(uot.key)
        self.server = uot.server()
        self.tcptap = TcpTap((LOCAL, uot.tcp))
        self.add(self.tcptap.close)
        self.port = free_port()
        self.uclient = Daemon(["uot-client", "--listen", f"{LOCAL}:{self.port}", "--server",
                               f"{LOCAL}:{self.tcptap.address[1]}", "--key-file", uot.key,
                               "--debug"])
        uot.daemons.append(self.uclient)
        self.daemons += [self.server, self.uclient]
        self.uclient.wait_log("connected to")
        self.client = udp_client()
        self.add(self.client.close)
        self.peers = []

    def watched(self):
        return {"uot-server": self.server.pid, "uot-client": self.uclient.pid}

    def legit(self):
        roundtrip(self.client, (LOCAL, self.port), self.rng)

    def phases(self):
        if self.where == "client":
            dest = (LOCAL, self.port)
            captures = self.tcptap.messages
            return [("noise", 0.5, self.noise_phase(dest, fresh=0.3)),
                    ("mutated", 0.3, self.mutated_phase(dest, captures)),
                    ("replayed", 0.2, self.replay_phase(dest, captures))]
        dest = (LOCAL, self.uot.tcp)
        return [("noise", 0.15, self.tcp_noise_phase(dest)),
                ("held", 0.05, self.tcp_held_phase(dest, self.tcptap.messages)),
                ("forged", 0.15, self.tcp_forged_phase(dest)),
                ("mutated", 0.25, self.tcp_mutated_phase(dest, self.tcptap.messages)),
                ("replayed", 0.05, self.tcp_replay_phase(dest, self.tcptap.streams)),
                ("keyed", 0.35, self.keyed_phase)]

    def keyed_phase(self, run):
        """Clients made of the library: sessions over TCP, then sealed messages of every
        type (DATA to random flows opens sockets to the target, whose answers come back)."""
        rng = self.rng
        dest = (LOCAL, self.uot.tcp)
        while run.more():
            for peer in [p for p in self.peers if p.closed or p.session is None]:
                peer.close()
                self.peers.remove(peer)
            if len(self.peers) < 3:
                peer = TcpPeer(self.key, wire.ROLE_UOT, dest,
                               host=f"127.0.5.{rng.randrange(1, 250)}")
                try:
                    peer.handshake(timeout=3.0)
                except AssertionError:
                    peer.close()
                    continue
                self.peers.append(peer)
                run.add(2)
            peer = rng.choice(self.peers)
            self.keyed_throw(peer, (1, 2, 3), data_max=MAX_UDP_PAYLOAD, bye=0.005,
                             games=0.01)
            run.add()
            if rng.random() < 0.1:
                peer.receive(0)
            if rng.random() < 0.003:
                peer.send_raw(rng.randbytes(rng.randrange(1, 64)))   # bytes among frames

    def stop(self):
        for peer in self.peers:
            peer.close()
        super().stop()


# -- link: link-server's UDP socket, and link's --listen-tcp listener

def stop_pid(pid, timeout=WAIT):
    """SIGTERM, then SIGKILL, the process with this PID (one we started)."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass


class LinkClientSession:
    """A link client made of the library: a session (Initiator) and the stream engine
    (Connection) on a UDP socket, driven synchronously.  Stream `sid` carries the
    legitimate echo; messages for streams the engine does not know (those the keyed
    fuzzing opened) only have their nonces recorded, so that its ACKs stay whole."""

    def __init__(self, key, port, packet_size=1232):
        self.key = key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((LOCAL, 0))
        self.sock.connect((LOCAL, port))
        self.dest = (LOCAL, port)
        self.address = self.sock.getsockname()
        self.initiator = Initiator(key, wire.ROLE_LINK)
        self.conn = Connection(client=True, max_message=packet_size)
        self.session = None
        self.sid = None
        self.sent = []
        self.received = bytearray()

    def handshake(self, timeout=WAIT):
        end = time.monotonic() + timeout
        while self.session is None and time.monotonic() < end:
            self.sock.send(self.initiator.hello())
            ready, _, _ = select.select([self.sock], [], [], 0.3)
            if ready:
                try:
                    self.session = self.initiator.welcome(self.sock.recv(70000))
                except (Drop, OSError):
                    continue
        if self.session is None:
            raise AssertionError("link-server sent no WELCOME")
        self.raw(wire.T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, 0))
        self.sid = self.conn.open_stream()
        self.pump()

    def raw(self, mtype, tag, body, send=True):
        """A message sealed outside the engine; the engine is told of its nonce."""
        msg = self.session.seal(mtype, tag, body)
        self.conn.on_sent(self.session.send_nonce, None, time.monotonic())
        if send:
            self.send(msg)
        self.sent.append(msg)
        if len(self.sent) > 512:
            del self.sent[:256]
        return msg

    def send(self, msg):
        try:
            self.sock.send(msg)
        except OSError:
            pass

    def pump(self):
        now = time.monotonic()
        for _ in range(16):
            out = self.conn.messages_to_send(now, 64)
            for message in out:
                self.send(self.session.seal(message.mtype, message.tag, message.body))
                self.conn.on_sent(self.session.send_nonce, message, now)
            if len(out) < 64:
                break

    def receive(self, timeout):
        end = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], max(0, end - time.monotonic()))
            if not ready:
                break
            try:
                msg = self.sock.recv(70000)
            except OSError:
                break
            self.on_message(msg)
            timeout = 0
            end = time.monotonic()
        now = time.monotonic()
        self.conn.on_timer(now)
        data = self.conn.read(self.sid, 1 << 20)
        if data:
            self.received += data
        self.pump()

    def on_message(self, msg):
        try:
            mtype, sid, tag, nonce = parse_header(msg, True)
            if sid != self.session.local_id:
                return
            self.session.open(msg, nonce)
        except (Malformed, Drop):
            return
        body = bytes(msg[HEADER_SIZE:-MAC_SIZE])
        now = time.monotonic()
        known = tag in (0, self.sid) or mtype not in (wire.T_STREAM, wire.T_WINDOW,
                                                      wire.T_RESET)
        try:
            if known:
                self.conn.on_message(nonce, mtype, tag, body, now)
            else:
                self.conn.on_message(nonce, wire.T_KEEPALIVE, 0, b"", now)
        except ProtocolError as exc:
            raise AssertionError(f"link-server broke the stream protocol: {exc}") from None
        if mtype == wire.T_KEEPALIVE:
            flags, stamp, _echo = KEEPALIVE.unpack(body)
            if flags & KEEPALIVE_REPLY:
                self.raw(wire.T_KEEPALIVE, 0, KEEPALIVE.pack(0, 0, stamp))

    def roundtrip(self, rng, timeout=ROUNDTRIP_WAIT * ROUNDTRIP_TRIES):
        payload = b"legit " + rng.randbytes(rng.randrange(1, 3000))
        self.received.clear()
        self.conn.write(self.sid, payload)
        self.pump()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.receive(min(0.05, end - time.monotonic()))
            if len(self.received) >= len(payload):
                if bytes(self.received[:len(payload)]) != payload:
                    raise AssertionError("the legitimate stream came back changed")
                del self.received[:len(payload)]
                return
        raise AssertionError(f"the legitimate stream: {len(self.received)} of {len(payload)} "
                             f"bytes came back within {timeout:.0f} s")

    def bye(self):
        if self.session is not None:
            self.raw(wire.T_BYE, 0, wire.REASON.pack(wire.CLOSE_SHUTDOWN))

    def close(self):
        self.sock.close()


class StreamMessages:
    """Messages for a stream engine (udpmux/stream.py) from its peer: (mtype, tag, body).

    valid() draws ones the engine must take without ending the session: STREAM, WINDOW
    and RESET on streams of their own (ids of the peer's parity, opened in order, now
    and then one skipped and opened later), bytes within the first window at offsets
    anywhere in it, out of order and overlapping, FIN at one final size per stream;
    KEEPALIVE; messages of every other type, which the engine only counts.  absurd()
    draws anything: offsets near 2**64, ACKs of nonces never sent, ranges below 1,
    stream 0, the receiver's own ids, range counts that do not match the body."""

    POOL = 8        # streams in use at once; one that leaves is reset, so that the
                    # holes left in it do not hold the receiver's session buffer forever

    def __init__(self, rng, mut, first=3):
        self.rng, self.mut = rng, mut
        self.next = first               # the next id to open: odd for a client's
        self.pool = [first]
        self.next += 2
        self.finals, self.tops = {}, {}
        self.leaving = []

    def sid(self):
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            self.pool.append(self.next)
            self.next += 2
        elif r < 0.06:                  # one skipped: opened later, out of order
            self.pool += [self.next + 2, self.next]
            self.next += 4
        while len(self.pool) > self.POOL:
            self.leaving.append(self.pool.pop(0))
        return rng.choice(self.pool)

    def valid(self):
        rng, mut = self.rng, self.mut
        if self.leaving:
            return wire.T_RESET, self.leaving.pop(), bytes([rng.getrandbits(8)])
        r = rng.random()
        if r < 0.45:
            sid = self.sid()
            final = self.finals.get(sid)
            off = rng.choice((0, 0, rng.randrange(INITIAL_WINDOW), INITIAL_WINDOW - 1,
                              INITIAL_WINDOW, final if final is not None else 0))
            size = min(rng.choice((0, 1, rng.randrange(1200), 1189)), INITIAL_WINDOW - off)
            size = max(size, 0)
            end = off + size
            fin = False
            if final is not None:
                if end > final:
                    off, end = max(0, final - size), final
                    size = end - off
                fin = end == final and rng.random() < 0.5
            elif rng.random() < 0.2 and end >= self.tops.get(sid, 0):
                fin = True
                self.finals[sid] = end
            self.tops[sid] = max(self.tops.get(sid, 0), end)
            return (wire.T_STREAM, sid,
                    wire.STREAM.pack(off, wire.STREAM_FIN if fin else 0) + rng.randbytes(size))
        if r < 0.6:
            return wire.T_WINDOW, self.sid(), wire.WINDOW.pack(mut.number(64))
        if r < 0.65:
            return wire.T_RESET, self.sid(), bytes([rng.getrandbits(8)])
        if r < 0.8:
            return wire.T_KEEPALIVE, 0, KEEPALIVE.pack(rng.choice((0, 1, 255)), mut.number(32),
                                                       mut.number(32))
        mtype = rng.choice([t for t in ALL_TYPES if t not in (
            wire.T_STREAM, wire.T_ACK, wire.T_WINDOW, wire.T_RESET, wire.T_BYE)])
        return mtype, mut.number(32), mut.body(mtype)

    def absurd(self, largest_received, tags=()):
        """Anything; `largest_received` is the newest nonce of the receiver's that the
        sender has seen (the most an ACK may name)."""
        rng, mut = self.rng, self.mut
        mtype = rng.choice((wire.T_STREAM, wire.T_ACK, wire.T_WINDOW, wire.T_RESET,
                            rng.choice(ALL_TYPES)))
        tag = rng.choice((0, *tags, mut.number(32)))
        if mtype == wire.T_STREAM:
            off = mut.number(64)
            data = rng.randbytes(rng.choice((0, 1, 100, 1189)))
            if off + len(data) >= 1 << 64:
                off = (1 << 64) - 1 - len(data)
            body = wire.STREAM.pack(off, rng.choice((0, 1, 1, 2, 255))) + data
        elif mtype == wire.T_ACK:
            count = rng.choice((0, 1, 2, 3, 64, 255))
            ranges = b"".join(wire.ACK_RANGE.pack(mut.number(32), mut.number(32))
                              for _ in range(rng.choice((count, count, rng.randrange(8)))))
            largest = rng.choice((0, 1, mut.number(64), largest_received, largest_received,
                                  largest_received + 1))
            first = rng.choice((0, 1, mut.number(32), largest_received - 1))
            body = wire.ACK.pack(largest, mut.number(32), max(0, min(first, 2**32 - 1)),
                                 count) + ranges
            if tag and rng.random() < 0.8:
                tag = 0
        elif mtype == wire.T_WINDOW:
            body = wire.WINDOW.pack(mut.number(64))
        else:
            body = mut.body(mtype)
        return mtype, tag, body


class LinkServerTarget(Target):
    """link-server started as link starts it (key on standard input, banner, detach),
    serving one session: a client made of the library, whose stream to a TCP echo
    service is the legitimate flow."""

    name = "link-server"
    about = "link-server's UDP socket, then stream messages under the key (valid, absurd)"
    ABSURD_BATCH = 16           # sealed messages of any kind thrown at a fresh server
    # The stream engine holds, by design, up to session_buffer (16 MiB) + 256 streams x
    # INITIAL_WINDOW (64 KiB) received, and session_buffer written: its bound, not ours.
    rss_growth = 64 << 20

    def start(self):
        from test_link import TcpService
        self.service = TcpService()
        self.add(self.service.close)
        self.key = auth.generate_key()
        self.servers = []           # (pid, log path) of every link-server started
        self.server, self.port, self.logpath = self.start_server()
        self.sniffer = Sniffer({self.port})
        self.add(self.sniffer.close)
        self.client = self.connect(self.port)
        self.absurd = {"rounds": 0, "ended": 0, "alive": 0}

    def start_server(self):
        port = free_port()
        logpath = self.tmp / f"link-server-{port}.log"
        with open(logpath, "wb") as log:
            proc = subprocess.Popen(
                udpmux_argv("link-server", "--bind", port, "--target",
                            f"{LOCAL}:{self.service.port}", "--idle-limit", "60", "--debug"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env())
        try:
            proc.stdin.write(base64.b64encode(self.key) + b"\n")
            proc.stdin.close()
            ready, _, _ = select.select([proc.stdout], [], [], WAIT)
            banner = proc.stdout.readline().decode() if ready else ""
            proc.wait(WAIT)
        finally:
            proc.stdout.close()
        words = banner.split()
        if words[:2] != ["UDPMUX-LINK", "1"] or words[3:4] != [str(port)] or len(words) != 5 \
                or not words[4].isdigit():
            raise AssertionError(f"link-server said {banner!r}; log:\n{logpath.read_text()}")
        pid = int(words[4])             # the process that serves, as its banner says
        self.servers.append((pid, logpath))
        self.add(lambda: stop_pid(pid))
        return pid, port, logpath

    def connect(self, port):
        client = LinkClientSession(self.key, port)
        self.add(client.close)
        client.handshake()
        return client

    def watched(self):
        return {"link-server": self.server}

    def legit(self):
        self.client.roundtrip(self.rng)

    def logs(self):
        return "\n".join(path.read_text(errors="replace") for _pid, path in self.servers)

    def captures(self):
        return [data for _port, data in self.sniffer.captured()]

    def phases(self):
        dest = (LOCAL, self.port)
        client = lambda: self.client.address  # noqa: E731
        sessions = lambda: [self.client.session.peer_id]  # noqa: E731
        return [("noise", 0.15, self.noise_phase(dest)),
                ("forged", 0.15, self.forged_phase(dest, sessions)),
                ("mutated", 0.25, self.mutated_phase(dest, self.captures, spoof_from=client)),
                ("replayed", 0.1, self.replay_phase(dest, self.captures, spoof_from=client)),
                ("keyed", 0.32, self.keyed_phase),
                ("absurd", 0.03, self.absurd_phase)]

    # -- keyed: messages the session's engine must take without ending the session

    def keyed_phase(self, run):
        """Sealed messages the session's engine must take (StreamMessages.valid()), and
        replays of the session's own, which the session drops."""
        rng, client = self.rng, self.client
        messages = StreamMessages(rng, self.mut, first=3)       # after the legitimate 1
        while run.more():
            if rng.random() < 0.05 and client.sent:
                client.send(rng.choice(client.sent))
            else:
                client.raw(*messages.valid())
            run.add()
            if rng.random() < 0.2:
                client.receive(0)

    # -- absurd: anything at all, each batch at a server of its own

    def absurd_phase(self, run):
        """Fresh servers, each sent a batch of sealed messages of any type with absurd
        bodies (offsets near 2**64, ACKs of nonces never sent, ranges below 1, stream 0,
        the server's own stream ids, counts that do not match): each server must go on,
        or end the session for a broken protocol, and never crash."""
        while run.more():
            pid, port, logpath = self.start_server()
            client = self.connect(port)
            client.roundtrip(self.rng)
            for _ in range(self.ABSURD_BATCH):
                self.absurd_message(client)
                run.add()
            client.receive(0.1)
            self.absurd["rounds"] += 1
            end = time.monotonic() + 0.5
            while running(pid) and time.monotonic() < end:
                client.receive(0.05)
            log = logpath.read_text(errors="replace")
            if not running(pid):
                # It ends the session when the protocol is broken, and says why in the
                # line that ends it; or when the batch held a BYE (any type may come,
                # sealed under the session: the client's own word that it is done).
                if "session failed: the other end broke the stream protocol" not in log \
                        and "the client ended the session" not in log:
                    raise AssertionError(f"link-server {pid} exited without ending its "
                                         f"session:\n{log}")
                self.absurd["ended"] += 1
            else:
                self.absurd["alive"] += 1
            client.bye()
            stop_pid(pid)

    def absurd_message(self, client):
        session = client.session
        client.raw(*StreamMessages(self.rng, self.mut).absurd(
            session.window.top, (0, client.sid, 1, 2, 3, 4)))


class LinkListenTarget(Target):
    """`udpmux link --listen-tcp` with its server started through tests/fakessh.py:
    every connection accepted is a stream to a TCP echo service; the legitimate flow is
    one such connection that sends, half-closes and reads it all back."""

    name = "link-listen"
    about = "link --listen-tcp's TCP listener"
    unit = "connections"
    rss_growth = LinkServerTarget.rss_growth
    HELD = 32                   # connections held open, writing and never reading

    def start(self):
        from test_link import TcpService, link_argv
        self.service = TcpService()
        self.add(self.service.close)
        self.listen = free_port()
        bind = free_port()
        self.link = Daemon(None, argv=link_argv(self.service.port, "--listen-tcp",
                                                f"{LOCAL}:{self.listen}", "--debug",
                                                bind=str(bind)))
        self.daemons.append(self.link)
        self.add(self.link.stop)
        line = self.link.lines[self.link.wait_log("the server end is process")]
        self.server = int(line.split("the server end is process ")[1].split()[0])
        self.link.wait_log("session up")
        self.add(lambda: stop_pid(self.server))

    def watched(self):
        return {"link": self.link.pid, "link-server": self.server}

    def legit(self):
        payload = b"legit " + self.rng.randbytes(self.rng.randrange(1, 100_000))
        with socket.create_connection((LOCAL, self.listen), timeout=WAIT) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := conn.recv(65536):
                got += chunk
        if got != payload:
            raise AssertionError(f"a stream through link: {len(got)} of {len(payload)} bytes "
                                 "came back" + (" changed" if len(got) == len(payload) else ""))

    def phases(self):
        return [("noise", 0.5, self.noise_connections),
                ("held", 0.2, self.held_connections),
                ("churn", 0.3, self.churn)]

    def noise_connections(self, run):
        dest = (LOCAL, self.listen)
        while run.more():
            tcp_throw(dest, self.mut.noise(200_000), self.rng)
            run.add()

    def held_connections(self, run):
        """Connections that write a lot and read nothing: the echo backs up into the
        link's buffers, bounded; then they go, half of them with a reset."""
        held = []
        dest = (LOCAL, self.listen)
        try:
            while run.more():
                sock = RelayTarget._connect(dest)
                if sock is not None:
                    sock.setblocking(False)
                    try:
                        sock.send(self.rng.randbytes(self.rng.randrange(1, 1 << 20)))
                    except OSError:
                        pass
                    held.append(sock)
                    if len(held) > self.HELD:
                        old = held.pop(0)
                        if self.rng.random() < 0.5:
                            old.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                        old.close()
                run.add()
        finally:
            for sock in held:
                sock.close()

    def churn(self, run):
        """Connections that end at once: closed, reset, or half-closed unread."""
        dest = (LOCAL, self.listen)
        while run.more():
            tcp_throw(dest, b"", self.rng, read=self.rng.random() < 0.5)
            run.add()


class EnginePair:
    """A link client's and a link server's stream engines joined by a perfect path in
    memory, on a clock of their own, with an echo service behind the server: what the
    link does, without sockets, a million times faster."""

    STEP = 0.0005               # seconds of the pair's clock per step

    def __init__(self):
        self.now = 0.0
        self.client = Connection(client=True)
        self.server = Connection(client=False)
        self.nonces = {self.client: 0, self.server: 0}
        self.sid = self.client.open_stream()
        self.pending = {}           # server sid -> bytes its echo could not write yet
        self.received = bytearray()

    def inject(self, sender, mtype, tag, body):
        """A message from `sender`'s side that its engine did not make."""
        receiver = self.server if sender is self.client else self.client
        nonce = self.nonces[sender] = self.nonces[sender] + 1
        sender.on_sent(nonce, None, self.now)
        receiver.on_message(nonce, mtype, tag, body, self.now)

    def step(self):
        now = self.now
        self._carry(self.client, self.server)
        srv = self.server
        srv.streams_ready()
        for sid in srv.stream_ids():
            data = self.pending.pop(sid, b"") + srv.read(sid, 1 << 20)
            if data:
                try:
                    taken = srv.write(sid, data)
                except Exception:       # noqa: BLE001 - StreamClosed: reset meanwhile
                    taken = len(data)
                if taken < len(data):
                    self.pending[sid] = data[taken:]
            if srv.at_eof(sid) and sid not in self.pending:
                srv.finish(sid)
        self._carry(self.server, self.client)
        self.client.streams_ready()
        for sid in self.client.stream_ids():      # the legitimate one, and the rest read
            data = self.client.read(sid, 1 << 20)   # and thrown away
            if sid == self.sid:
                self.received += data
        for engine in (self.client, self.server):
            timer = engine.next_timer(now)
            if timer is not None and timer <= 0:
                engine.on_timer(now)
        self.now += self.STEP

    def _carry(self, sender, receiver):
        for _ in range(4):
            out = sender.messages_to_send(self.now, 64)
            for m in out:
                nonce = self.nonces[sender] = self.nonces[sender] + 1
                sender.on_sent(nonce, m, self.now)
                # Streams the fuzzing made up at one end are not the other's: only
                # their nonces cross, so that the ACKs stay whole.
                if m.tag not in (0, self.sid) and m.mtype in (
                        wire.T_STREAM, wire.T_WINDOW, wire.T_RESET):
                    receiver.on_message(nonce, wire.T_KEEPALIVE, 0, b"", self.now)
                else:
                    receiver.on_message(nonce, m.mtype, m.tag, m.body, self.now)
            if len(out) < 64:
                return

    def roundtrip(self, rng, steps=20000):
        payload = rng.randbytes(rng.randrange(1, 200_000))
        self.received.clear()
        taken = 0
        for _ in range(steps):
            if taken < len(payload):
                taken += self.client.write(self.sid, payload[taken:])
            self.step()
            if len(self.received) >= len(payload):
                if bytes(self.received[:len(payload)]) != payload:
                    raise AssertionError("the stream between two engines came back changed")
                return
        raise AssertionError(f"the stream between two engines: {len(self.received)} of "
                             f"{len(payload)} bytes came back in {steps} steps")

    def held(self):
        """Bytes the server's engine holds received (in order and out of order)."""
        return sum(len(st.rbuf) + st.obytes for st in self.server._streams.values())


class StreamEngineTarget(Target):
    """The stream engine of link (udpmux/stream.py) in this process: messages from
    StreamMessages into both ends of an EnginePair, between echo round trips.  Only
    ProtocolError may come out of on_message(), and only for absurd() messages; what a
    receiver holds stays within session_buffer + max_streams x INITIAL_WINDOW."""

    name = "stream-engine"
    about = "link's stream engine in this process: valid and absurd messages both ways"
    unit = "messages"

    def start(self):
        self.pair = EnginePair()
        self.absurd = False
        self.ended = 0
        self.slowest = 0.0

    def legit(self):
        self.pair.roundtrip(self.rng)

    def final(self):
        self.legit()
        bound = self.pair.server.session_buffer + 256 * INITIAL_WINDOW
        if self.pair.held() > bound:
            raise AssertionError(f"the server's engine holds {self.pair.held()} bytes, "
                                 f"beyond {bound}")

    def phases(self):
        return [("valid", 0.7, self.valid_phase), ("absurd", 0.3, self.absurd_phase)]

    def throw(self, sender, message):
        started = time.monotonic()
        try:
            self.pair.inject(sender, *message)
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)
            if self.slowest > 1.0:
                raise AssertionError(f"one message took {self.slowest:.1f} s: {message[:2]}")

    def valid_phase(self, run):
        rng, pair = self.rng, self.pair
        to_server = StreamMessages(rng, self.mut, first=3)      # after the client's 1
        to_client = StreamMessages(rng, self.mut, first=2)
        while run.more():
            if rng.random() < 0.5:
                self.throw(pair.client, to_server.valid())
            else:
                self.throw(pair.server, to_client.valid())
            run.add()
            if rng.random() < 0.3:
                pair.step()

    def absurd_phase(self, run):
        rng = self.rng
        self.absurd = True
        while run.more():
            pair = self.pair
            sender = rng.choice((pair.client, pair.server))
            receiver = pair.server if sender is pair.client else pair.client
            try:
                self.throw(sender, StreamMessages(rng, self.mut).absurd(
                    receiver._max_sent, (pair.sid, 1, 2, 3, 4)))
                if rng.random() < 0.3:
                    pair.step()
            except ProtocolError:
                self.ended += 1
                self.pair = EnginePair()
            run.add()

    def sync(self):
        if self.absurd:
            # An absurd ACK that names nonces the receiver did send is a lie it believes
            # (the bytes it acknowledges are lost): after absurd messages only a new pair
            # is expected to carry a stream.
            self.pair = EnginePair()
        try:
            self.legit()
        except ProtocolError as exc:
            raise AssertionError(f"an engine broke the protocol on a round trip: {exc}") \
                from None


TARGETS = {cls.name: cls for cls in [
    relay_target("public"), relay_target("register"), relay_target("tcp"),
    relay_target("shared"), relay_target("control"), relay_target("register", keyed=False),
    relay_target("tcp", keyed=False), RendezvousTarget,
    PunchTarget,
    type("Punch_listen", (PunchTarget,), {
        "name": "punch-listen", "where": "listen",
        "about": "punch --listen's main UDP socket, then probes under the key"}),
    type("Punch_local", (PunchTarget,), {
        "name": "punch-local", "where": "local",
        "about": "punch --listen's local UDP socket (its clients')"}),
    UotTarget,
    type("Uot_client", (UotTarget,), {
        "name": "uot-client", "where": "client", "unit": "datagrams",
        "about": "uot-client's local UDP socket (its clients')"}),
    LinkServerTarget, LinkListenTarget, StreamEngineTarget,
]}
