#!/usr/bin/env python3
"""Stands in for ssh in loopback tests of `udpmux link`: `fakessh.py DEST COMMAND` runs
COMMAND through /bin/sh on this host, as sshd would run it on DEST, with SSH_CONNECTION
set as sshd sets it.  The lab tests use the real OpenSSH instead.

With FAKESSH_ECHO=FILE it behaves as an ssh that allocated a terminal on the server: what
comes on standard input is echoed to standard output first (a terminal's echo); the
first line is also written to FILE, for the test to look for it where it must not be.

With FAKESSH_BANNERS=FILE it carries COMMAND's standard output itself, as ssh carries a
channel, and appends each link-server banner line to FILE before passing it on: a test
learns from it the PID of the server that serves, and stops that process alone.  It
exits when COMMAND has exited and its standard output is closed, as ssh does."""

import os
import subprocess
import sys

if len(sys.argv) < 3:
    sys.exit("usage: fakessh.py DEST COMMAND")
os.environ["SSH_CONNECTION"] = "127.0.0.1 50000 127.0.0.1 22"
echo = os.environ.pop("FAKESSH_ECHO", None)
if echo:
    line = sys.stdin.buffer.readline()
    with open(echo, "wb") as f:
        f.write(line)
    os.write(1, line.replace(b"\n", b"\r\n"))
    r, w = os.pipe()
    os.write(w, line)
    os.close(w)
    os.dup2(r, 0)
    os.close(r)
command = ["/bin/sh", "-c", " ".join(sys.argv[2:])]
banners = os.environ.pop("FAKESSH_BANNERS", None)
if not banners:
    os.execv(command[0], command)
sh = subprocess.Popen(command, stdout=subprocess.PIPE)
for line in iter(sh.stdout.readline, b""):
    if line.startswith(b"UDPMUX-LINK "):
        with open(banners, "ab") as f:
            f.write(line)
    os.write(1, line)
sys.exit(sh.wait())
