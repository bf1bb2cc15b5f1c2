"""Logging: one line per event an operator acts on.

Under systemd (stderr is the journal) lines carry a syslog priority prefix such as
"<4>" and no timestamp, since journald adds its own.  Elsewhere they carry a time.
Per-packet problems are never logged one by one: workers count them and log a
summary now and then (see DropLog).
"""

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record):
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def under_journal(stream=None):
    """True when stream (stderr by default) is connected to journald ($JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isascii() and dev.isdigit() and ino.isascii() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup(debug=False, stream=None):
    """Configure the "udpmux" logger for this process; returns it."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if under_journal(stream):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s udpmux[%(process)d]: %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log = logging.getLogger("udpmux")
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    return log


class Every:
    """Allows a log line about the same thing at most once per interval."""

    def __init__(self, interval=60.0):
        self.interval = interval
        self.last = {}

    def __call__(self, what, now):
        last = self.last.get(what)
        if last is not None and now - last < self.interval:
            return False
        self.last[what] = now
        return True


class DropLog:
    """Counts dropped messages by reason and logs a summary at most every `interval` s."""

    def __init__(self, log, what, interval=60.0):
        self.log = log
        self.what = what
        self.interval = interval
        self.counts = {}
        self.last = None

    def count(self, reason, n=1):
        self.counts[reason] = self.counts.get(reason, 0) + n

    def maybe_log(self, now):
        if self.last is None:
            self.last = now
        if now - self.last < self.interval:
            return
        if self.counts:
            detail = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
            self.log.warning("%s: dropped in the last %d s: %s", self.what, now - self.last, detail)
            self.counts = {}
        self.last = now
