"""Keys, MACs and the replay window.  Pure code, except for reading and writing key files
(and read_regular(), which reads any small file that must be a regular one: a key file,
a configuration file).

A key file holds 32 random bytes as one line of base64 (what `udpmux keygen` writes).
Keys are read from a file or from standard input, never from the command line,
where `ps` would show them.

The MAC is keyed BLAKE2b with a 16-byte digest (BLAKE2's own digest_size parameter,
which is not the same as cutting a 64-byte digest short).  Measured here with
tools/bench_mac.py (keyed BLAKE2s, keyed BLAKE2b and HMAC-SHA256, all from the
standard library): BLAKE2s is fastest for 64-byte messages, BLAKE2b from 256 bytes
to about 1,500 (the sizes of VPN and game traffic: 1.76 us at 1,200 bytes against
2.24 for HMAC-SHA256 and 2.72 for BLAKE2s), and HMAC-SHA256 beyond that, but only
where the CPU has SHA extensions.  BLAKE2b is within 10 % of the best at 64 bytes and
the best where most traffic is, on any CPU.

Keys derived from the shared key (the PSK), so that one key file serves every
session and no two sessions share a MAC key::

    handshake key   BLAKE2b(key=PSK, "udpmux v1 handshake")
    session keys    BLAKE2b(key=PSK, "udpmux v1 " + direction + ids + randoms)
                    direction is "i2r" (initiator to responder) or "r2i"

How we name things:
  PSK      the pre-shared key from the key file
  nonce    a 64-bit message counter; each sender starts a session at 1
  window   the replay window: a bitmap of the WINDOW nonces ending at the highest
           accepted (that one included); anything older is refused as too old
"""

import base64
import binascii
import hashlib
import hmac
import os
import stat
import sys

from udpmux.reasons import R_NONCE, R_OLD, R_REPLAY
from udpmux.errors import (
    EXIT_NOINPUT, EXIT_NOPERM, EXIT_OSERR, Fatal, KeyFileError,
)
from udpmux.wire import MAC_SIZE

KEY_SIZE = 32
WINDOW = 2048                   # nonces; WireGuard keeps 2048, IPsec at least 32



def derive(psk, label):
    """A 32-byte key for one purpose, derived from the PSK."""
    return hashlib.blake2b(b"udpmux v1 " + label, key=psk, digest_size=KEY_SIZE).digest()


def mac(key, data):
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def verify(key, msg):
    """True when the last MAC_SIZE bytes of msg are the MAC of the rest."""
    return hmac.compare_digest(mac(key, msg[:-MAC_SIZE]), msg[-MAC_SIZE:])


class ReplayWindow:
    """Accept every nonce at most once, tolerating reordering within WINDOW.

    check() is cheap and changes nothing; accept() records a nonce.  Call accept()
    only after the MAC verified, or a forger could slide the window.
    """

    __slots__ = ("top", "bits")

    def __init__(self):
        self.top = 0            # the highest nonce accepted
        self.bits = 0           # bit d set: nonce top - d was accepted

    def check(self, nonce):
        """None if nonce would be accepted, else the reason to count."""
        if nonce > self.top:
            return None
        if nonce == 0:
            return R_NONCE
        behind = self.top - nonce
        if behind >= WINDOW:
            return R_OLD
        if self.bits >> behind & 1:
            return R_REPLAY
        return None

    def accept(self, nonce):
        if nonce > self.top:
            shift = nonce - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = nonce
        else:
            self.bits |= 1 << (self.top - nonce)

    def refuse_through(self, top):
        """Accept nothing at or below top from now on (a predecessor may have): the
        window moves up to top, every place in it taken."""
        if top > self.top:
            self.top = top
            self.bits = (1 << WINDOW) - 1


def generate_key():
    return os.urandom(KEY_SIZE)


def encode_key(key):
    return base64.b64encode(key).decode("ascii") + "\n"


def decode_key(text, source):
    """Parse a key file's text; KeyFileError names the source and the problem."""
    text = text.strip()
    if not text:
        raise KeyFileError(f"{source}: empty; write a key with `udpmux keygen FILE`")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source}: not a key: expected one line of base64, "
                           "as `udpmux keygen` writes") from None
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"{source}: a key is {KEY_SIZE} bytes, this one is {len(key)}")
    return key


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket")]


class NotRegularFile(OSError):
    """The path names something other than a regular file; args[0] says what it is."""


def kind_of(mode):
    """What a non-regular file is, in words: "a FIFO", "a directory"..."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "a special file"


def read_regular(path, limit):
    """(up to limit + 1 bytes of a regular file, its st_mode), without ever blocking.

    Anything but a regular file is refused with NotRegularFile before it is read:
    open() blocks on a FIFO until a writer comes, a device such as /dev/zero never
    ends, and opening some devices does something.  Other failures raise the OSError
    that os.open() or read() raised; a path holding a NUL byte raises ValueError.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode        # the file opened, not the one stat() saw
            if stat.S_ISREG(mode):
                chunks, size = [], 0
                while size <= limit:
                    chunk = os.read(fd, limit + 1 - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                return b"".join(chunks), mode
        finally:
            os.close(fd)
    raise NotRegularFile(kind_of(mode))


KEY_FILE_MAX = 4096             # bytes read of a key file; a key is 45


def read_key(path, log=None):
    """Read a key from a file, or from standard input when path is "-".

    A key file that every user may read gets a warning through `log`.  (Group access
    is how a service account is given a key: root:udpmux, mode 0640.)  Anything but a
    regular file is refused: a FIFO or a device would block or never end.
    """
    if path == "-":
        return decode_key(_read_stdin_line(), "standard input")
    try:
        data, mode = read_regular(path, KEY_FILE_MAX)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file; create one with `udpmux keygen {path}`",
                           status=EXIT_NOINPUT) from None
    except PermissionError:
        raise KeyFileError(f"{path}: permission denied", status=EXIT_NOPERM) from None
    except NotRegularFile as exc:
        raise KeyFileError(f"{path}: is {exc.args[0]}, not a key file") from None
    except OSError as exc:          # a path through a file, a name too long, a loop, EIO
        raise KeyFileError(f"{path}: cannot read the key file: {exc.strerror or exc}",
                           status=EXIT_NOINPUT) from None
    except ValueError:              # os.stat() and os.open() refuse a NUL byte
        raise KeyFileError(f"{path!r}: a file name holds no NUL character",
                           status=EXIT_NOINPUT) from None
    if log is not None and mode & stat.S_IRWXO:
        log.warning("key file %s is readable by others (mode %04o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a key: expected one line of base64") from None
    return decode_key(text, path)


def _read_stdin_line():
    """The first line of standard input, as text; at most KEY_FILE_MAX bytes of it."""
    if sys.stdin is None:
        raise KeyFileError("standard input is closed; give the key on it, or a key file",
                           status=EXIT_NOINPUT)
    try:
        data = sys.stdin.buffer.readline(KEY_FILE_MAX)
    except OSError as exc:
        raise KeyFileError(f"standard input: cannot read the key: {exc.strerror or exc}",
                           status=EXIT_NOINPUT) from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError("standard input: not a key: expected one line of base64") from None


def write_key_file(path, force=False):
    """Write a new random key to path with mode 0600, or to standard output for "-".

    Only a regular file gets mode 0600: with --force the path may name a device
    (/dev/null), whose mode is not ours to change.  A failed write or close is one
    line with EXIT_OSERR, and a file this call created is removed again."""
    text = encode_key(generate_key())
    if path == "-":
        _write_stdout(text)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise Fatal(f"{path}: exists; use --force to replace it") from None
    except PermissionError as exc:
        raise Fatal(f"{path}: {exc.strerror}", status=EXIT_NOPERM) from None
    except OSError as exc:          # ENXIO: a FIFO that nobody reads; EISDIR, ENOSPC, EROFS
        raise Fatal(f"{path}: {exc.strerror}", status=EXIT_OSERR) from None
    try:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
            data = text.encode("ascii")
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as exc:
        if not force:
            try:
                os.unlink(path)         # ours, and incomplete: a retry must not find it
            except OSError:
                pass
        raise Fatal(f"{path}: cannot write the key: {exc.strerror or exc}",
                    status=EXIT_OSERR) from None


def _write_stdout(text):
    """Write text to standard output now, so that a failure is reported, not lost at exit."""
    if sys.stdout is None:
        raise Fatal("standard output is closed", status=EXIT_OSERR)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise                           # the reader went away: the command line's business
    except OSError as exc:
        # What stays buffered would fail again at exit: send it where it cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise Fatal(f"standard output: cannot write the key: {exc.strerror or exc}",
                    status=EXIT_OSERR) from None
