"""Starting a link session: all that comes before the first HELLO.  This module owns
  - the client's side: its --listen-tcp listener (listen_tcp); link-server run over ssh,
    the key on ssh's standard input, the banner read back (start_server);
  - the server's side: a UDP port of --bind (bind_in_range); leaving the ssh session,
    the process that stays to serve telling the banner (detach);
  - the banner, written and read here alone (banner_line, parse_banner);
  - the chain: UDPMUX_LINK_CHAIN in the environment of link's ssh names the DESTs of the
    links above, so that a ProxyCommand which runs link for the server itself (and so
    link's own ssh runs it again) stops at its first repetition (chain_for_ssh).

    udpmux link                          ssh host ...                 server host
      | key = 32 random bytes                                   udpmux link-server
      |-- ssh DEST "udpmux link-server ..." -------------------> reads the key (stdin),
      |      key on ssh's standard input                          binds a UDP port of
      |                                                           --bind, forks; the child
      |<---- "UDPMUX-LINK 1 <address> <port> <pid>" (stdout) ---  prints this and stays to
      |      ssh ends: nothing but udpmux stays on the server     serve; the parent exits

address is where the ssh connection reached the server (the third word of
SSH_CONNECTION), "-" when not known; pid is the process that serves the session, so that
whoever started it can stop exactly that one.  A banner of four words, an older
server's, is read too.  The key never appears on a command line, in a log or on a
terminal: whatever the server's end prints before its banner (a terminal's echo of
standard input, a login message) is skipped unread.
"""

import base64
import errno
import os
import random
import select
import shlex
import signal
import socket
import subprocess
import time

from udpmux import addr, auth, sockets
from udpmux.errors import EXIT_FAILURE, EXIT_OK, EXIT_OSERR, Fatal, UsageError

BANNER = "UDPMUX-LINK 1"            # then: address port pid
BOOT_TIMEOUT = 60.0                 # seconds ssh may take to start the server (a password)
SSH_FAILED = 255                    # ssh's status when it, not the remote command, failed
CHAIN = "UDPMUX_LINK_CHAIN"         # the DESTs of the links whose ssh runs this process
CHAIN_MOST = 8                      # links nested at most, each under the ssh of the last
NO_RECURSION = ("give link --ssh-command 'ssh -o ProxyCommand=none' or narrow the Host "
                "pattern")


# -- the banner

def banner_line(address, port, pid):
    return f"{BANNER} {address} {port} {pid}\n"


def parse_banner(line):
    """(address, port, pid or None) from a banner line (str, without its newline), or
    None when it is not a banner this udpmux reads."""
    words = line.split()
    if words[:2] != BANNER.split() or len(words) not in (4, 5):
        return None
    if not all(w.isascii() and w.isdigit() for w in words[3:]):
        return None
    port = int(words[3])
    pid = int(words[4]) if len(words) == 5 else None
    if not 0 < port < 65536 or pid == 0:
        return None
    return words[2], port, pid


# -- the client's side: link-server over ssh

def chain_for_ssh(dest, environ=os.environ):
    """The CHAIN that the ssh starting link-server gets: this link's DEST after those of
    the links whose ssh runs this one.  ssh passes its environment to a ProxyCommand, so
    a ProxyCommand of the user's that runs `udpmux link` for the server itself, which
    would start link after link without end, is refused at its first repetition."""
    try:
        chain = shlex.split(environ.get(CHAIN, ""))
    except ValueError:
        chain = []
    if dest in chain:
        raise UsageError(f"started by the ssh of another `udpmux link` to {dest} (a "
                         f"ProxyCommand that matches the server itself); {NO_RECURSION}")
    if len(chain) >= CHAIN_MOST:
        raise UsageError(f"started by the ssh of {len(chain)} nested `udpmux link`s "
                         f"({' > '.join(chain)}); {NO_RECURSION}")
    return shlex.join(chain + [dest])


def server_command(args, cfg):
    parts = [args["--server-command"], "link-server",
             "--bind", shlex.quote(cfg.bind), "--target", shlex.quote(cfg.target),
             "--packet-size", str(cfg.packet_size), "--idle-limit", f"{cfg.idle_limit:g}",
             "--buffer", str(cfg.buffer), "--congestion", cfg.congestion]
    if args["--debug"]:
        parts.append("--debug")
    return " ".join(parts)


def start_server(args, cfg, key, log):
    """Run link-server on DEST over ssh; returns ((family, sockaddr) of the server, the
    ssh process if it stays (--debug carries the server's log), else None)."""
    dest = args["DEST"]
    chain = chain_for_ssh(dest)
    try:
        ssh = shlex.split(args["--ssh-command"])
    except ValueError as exc:
        raise UsageError(f"--ssh-command: {exc}") from None
    argv = ssh + [dest, server_command(args, cfg)]
    log.debug("starting the server: %s", " ".join(shlex.quote(a) for a in argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=dict(os.environ, **{CHAIN: chain}))
    except OSError as exc:
        raise Fatal(f"cannot run {ssh[0]}: {exc.strerror}", status=EXIT_OSERR) from None
    try:
        proc.stdin.write(base64.b64encode(key) + b"\n")
        proc.stdin.close()
    except OSError:
        pass
    host, port, pid = _read_banner(proc, dest, log)
    if pid is not None:
        log.debug("the server end is process %d on %s", pid, dest)
    if args.get("--server-address"):
        host = args["--server-address"]
    elif host == "-":
        host = _ssh_hostname(ssh, dest)
    try:
        server = addr.resolve(host, port)
    except ValueError as exc:
        proc.kill()
        raise Fatal(f"{dest}: {exc}") from None
    if args["--debug"]:
        return server, proc            # it carries the server's log to our stderr
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return server, None


def _read_banner(proc, dest, log):
    """(address, port, pid or None) from link-server's banner on ssh's output.  Lines
    before it (the echo of a terminal ssh allocated, which holds the key; a login
    message) are skipped and never shown: only their count reaches the debug log."""
    pending = b""
    skipped = 0
    end = time.monotonic() + BOOT_TIMEOUT
    prefix = BANNER.encode() + b" "
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line.startswith(prefix):
                banner = parse_banner(line.decode("ascii", errors="replace"))
                if banner is not None:
                    if skipped:
                        log.debug("skipped %d lines before the server's banner", skipped)
                    return banner
                proc.kill()
                raise Fatal(f"{dest}: the server end's banner is not one this udpmux reads "
                            "(another version there? --server-command)")
            skipped += 1
        if len(pending) > 4096:
            skipped += 1
            pending = b""
        left = end - time.monotonic()
        if left <= 0:
            proc.kill()
            raise Fatal(f"{dest}: link-server did not answer within {BOOT_TIMEOUT:.0f} s"
                        + (f" ({skipped} other lines came)" if skipped else ""))
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            status = proc.wait()
            if status == SSH_FAILED:
                raise Fatal(f"{dest}: could not start the server end (ssh exited with status "
                            f"{status}: ssh itself failed, as it says above)")
            raise Fatal(f"{dest}: could not start the server end (ssh exited with status "
                        f"{status}); is udpmux installed there? (--server-command)")
        pending += chunk


def _ssh_hostname(ssh, dest):
    """The host name ssh connects to for dest (its configuration may rename it)."""
    try:
        out = subprocess.run(ssh + ["-G", dest], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            if line.startswith("hostname "):
                return line.split(None, 1)[1]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return dest.rpartition("@")[2]


def listen_tcp(text):
    """The client's --listen-tcp listener, opened before ssh runs so that a bad address
    or a port taken fails at once."""
    try:
        family, sockaddr = addr.parse_endpoint(text, socket.SOCK_STREAM, passive=True)
    except ValueError as exc:
        raise UsageError(f"--listen-tcp: {exc}") from None
    return sockets.tcp_listener(family, sockaddr, "--listen-tcp")


# -- the server's side: a port, then out of the ssh session

def bind_in_range(low, high):
    """A nonblocking UDP socket on a port picked at random in low-high, for IPv6 and
    IPv4 where the host has both; at most 256 ports are tried."""
    ports = list(range(low, high + 1))
    random.shuffle(ports)
    last = None
    for port in ports[:256]:
        for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    sock.setsockopt(socket.SOL_SOCKET, option, sockets.BUFFER)
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno == errno.EADDRINUSE:
                    break               # this port is taken in any family: the next one
                continue                # no IPv6 here: IPv4 alone
            sock.setblocking(False)
            return sock
    raise Fatal(f"no free UDP port in {low}-{high}"
                + (f": {last.strerror}" if last is not None else ""), status=EXIT_OSERR)


def detach(port, debug):
    """Leave the ssh session, the banner told by the process that stays.

    A child, in a session of its own, writes the banner with its own PID on standard
    output, puts /dev/null in place of standard input and output (and error, without
    debug: with it, ssh carries the log back to the client) and then tells the parent,
    over a pipe, that the banner is out.  The parent, the process ssh started, waits
    for that before it exits, so that ssh has the banner before the session's channel
    closes.  Returns in the child only."""
    told_r, told_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        raise Fatal(f"cannot fork: {exc.strerror}", status=EXIT_OSERR) from None
    if pid:
        os.close(told_w)
        _parent_waits(pid, told_r)
    os.close(told_r)
    _child_tells(port, debug, told_w)


def _parent_waits(child, told):
    """Exit 0 once the child says the banner is out; with the child's status (or 1)
    when it ended without saying so."""
    if os.read(told, 1):
        os._exit(EXIT_OK)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code > 0 else EXIT_FAILURE)


def _child_tells(port, debug, told):
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    where = os.environ.get("SSH_CONNECTION", "").split()
    address = where[2] if len(where) == 4 else "-"
    line = banner_line(address, port, os.getpid()).encode()
    try:
        while line:
            line = line[os.write(1, line):]
    except OSError:
        os._exit(EXIT_OSERR)            # ssh went away: nobody will come
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if debug else (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    if debug:
        import logging
        logging.raiseExceptions = False     # a log line to a closed ssh is lost, no more
    os.write(told, b"1")
    os.close(told)


# -- the commands

def main(args):
    """`udpmux link`."""
    from udpmux.agentstatus import Inspector
    from udpmux.config import link_from_options
    from udpmux.link import LinkClient
    from udpmux.log import setup as setup_log
    log = setup_log(args["--debug"])
    cfg = link_from_options(args)
    listener = listen_tcp(args["--listen-tcp"]) if args["--listen-tcp"] else None
    key = auth.generate_key()
    server, ssh = start_server(args, cfg, key, log)
    log.debug("the server listens at %s", addr.format_endpoint(*server))
    client = LinkClient(server, key, cfg, listener, log)
    try:
        # As ssh's ProxyCommand, link says nothing on the terminal unless asked.
        client.serve(Inspector("link", args.get("--control-socket"), None, log, quiet=True))
    finally:
        if ssh is not None and ssh.poll() is None:
            ssh.terminate()
    return client.status


def server_main(args):
    """`udpmux link-server`: read the key, bind, detach (the process that stays tells
    its port and PID), serve."""
    from udpmux.config import link_from_options
    from udpmux.link import LinkServer
    from udpmux.log import setup as setup_log
    debug = args["--debug"]
    log = setup_log(debug)
    cfg = link_from_options(args)
    try:
        host, port = addr.split_hostport(cfg.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    key = auth.read_key("-")
    sock = bind_in_range(*addr.parse_port_range(cfg.bind))
    detach(sock.getsockname()[1], debug)
    server = LinkServer(sock, (host, port), key, cfg, log)
    server.serve()
    return server.status
