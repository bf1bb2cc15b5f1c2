#!/usr/bin/env python3
"""Stands in for ssh in loopback tests of `udpmux link`: `fakessh.py DEST COMMAND` runs
COMMAND through /bin/sh on this host, as sshd would run it on DEST, with SSH_CONNECTION
set as sshd sets it.  The lab tests use the real OpenSSH instead."""

import os
import sys

if len(sys.argv) < 3:
    sys.exit("usage: fakessh.py DEST COMMAND")
os.environ["SSH_CONNECTION"] = "127.0.0.1 50000 127.0.0.1 22"
os.execv("/bin/sh", ["sh", "-c", " ".join(sys.argv[2:])])
