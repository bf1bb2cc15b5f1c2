"""Keys, MACs and the replay window.  Pure code, except for reading and writing key files.

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

from udpmux.errors import EXIT_NOINPUT, EXIT_NOPERM, EXIT_OSERR, Fatal, KeyFileError
from udpmux.wire import MAC_SIZE

KEY_SIZE = 32
WINDOW = 2048                   # nonces; WireGuard keeps 2048, IPsec at least 32

R_MAC = "mac"                   # the MAC does not verify: wrong key, or altered in transit
R_REPLAY = "replay"             # a nonce already accepted
R_OLD = "old"                   # a nonce below the replay window
R_NONCE = "nonce"               # nonce 0, which no sender uses


def derive(psk, label):
    """A 32-byte key for one purpose, derived from the PSK."""
    return hashlib.blake2b(b"udpmux v1 " + label, key=psk, digest_size=KEY_SIZE).digest()


def mac(key, data):
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def seal(key, msg):
    """msg followed by its MAC (msg must already carry the KEYED flag)."""
    return msg + mac(key, msg)


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


def read_key(path, log=None):
    """Read a key from a file, or from standard input when path is "-".

    A key file that every user may read gets a warning through `log`.  (Group access
    is how a service account is given a key: root:udpmux, mode 0640.)
    """
    if path == "-":
        return decode_key(sys.stdin.readline(), "standard input")
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(4096)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file; create one with `udpmux keygen {path}`",
                           status=EXIT_NOINPUT) from None
    except PermissionError:
        raise KeyFileError(f"{path}: permission denied", status=EXIT_NOPERM) from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a key file") from None
    except OSError as exc:          # a path through a file, a name too long, a loop, EIO
        raise KeyFileError(f"{path}: cannot read the key file: {exc.strerror}",
                           status=EXIT_NOINPUT) from None
    if log is not None and mode & stat.S_IRWXO:
        log.warning("key file %s is readable by others (mode %04o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a key: expected one line of base64") from None
    return decode_key(text, path)


def write_key_file(path, force=False):
    """Write a new random key to path with mode 0600, or to standard output for "-"."""
    text = encode_key(generate_key())
    if path == "-":
        sys.stdout.write(text)
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise Fatal(f"{path}: exists; use --force to replace it") from None
    except PermissionError as exc:
        raise Fatal(f"{path}: {exc.strerror}", status=EXIT_NOPERM) from None
    except OSError as exc:
        raise Fatal(f"{path}: {exc.strerror}", status=EXIT_OSERR) from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
