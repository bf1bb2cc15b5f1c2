"""The udpmux network lab: real hosts, NAT routers and a lossy WAN in network namespaces.

This module is the lab's library, for the tests (the ``lab`` fixture of tests/conftest.py and
the test_lab*.py files) and for tools/bench_link.py; it builds, changes and tears down labs.
tools/lab.py is its command line, for building one by hand (see "CLI" at the end).

Every box below is a Linux network namespace joined to its neighbours by veth pairs. The
names in the boxes are the lab's host names (``lab.addr("inside")``); the namespaces
themselves are called ``<prefix>-<host>``, where the prefix is ``udpmux-<pid>-<n>`` (the
building process and a counter), so two test runs or two labs in one run never collide.
Interface names (``eth0``, ``lan``, ``wan``, ``to_in`` ...) are the same in every lab: each
veth pair is created directly inside its two namespaces and never exists in the host's
namespace, so equal names cannot clash and nothing is left on the host if a build stops
half way.

::

   LAN 10.11.0.0/24                                              LAN 10.22.0.0/24
  +-----------+   +------------------+                +-------------------+   +-----------+
  |  inside   |   |      nat_in      |                |      nat_out      |   |  outside  |
  | 10.11.0.2 |---| lan 10.11.0.1    |                |    10.22.0.1 lan  |---| 10.22.0.2 |
  |   eth0    |   | wan 192.0.2.10   |                | 198.51.100.10 wan |   |   eth0    |
  +-----------+   | (masquerade)     |                | (masquerade)      |   +-----------+
                  +--------+---------+                +---------+---------+
                           | 192.0.2.0/24: pool .10-.254        | 198.51.100.0/24: pool .10-.254
                           | (NAT side /32, routed by wan)      |
                           |                                    |
                           |  to_in 192.0.2.1  +-----------+    |  to_out 198.51.100.1
                           +-------------------|    wan    |----+
                                               |  router:  |
                                               |loss, block|
                                               +-----+-----+
                                                     |  to_pub 203.0.113.1/24
                                              +------+-------+
                                              |    public    |  the relay's host
                                              | 203.0.113.10 |
                                              |     eth0     |
                                              +--------------+

- ``inside`` (the exposer behind CG-NAT) and ``outside`` (a client behind another NAT) each sit on
  a private LAN behind their NAT router. ``public`` (the relay) has a routable address.
- ``nat_in`` / ``nat_out`` masquerade their LAN to their one WAN address (a /32 from their pool,
  routed to them by ``wan``). Their forward chain accepts LAN->WAN and established/related
  replies only, and their input chain drops (and counts) every new connection arriving from the
  WAN, so nothing unsolicited ever reaches the host behind them; there is no ICMP answer either,
  as with a carrier NAT. Mapping is port preserving by default (an inside port keeps its number
  when it is free, for every destination: endpoint-independent mapping, address-and-port-dependent
  filtering); ``set_symmetric()`` switches to ``masquerade fully-random`` (a fresh random port for
  every new destination: a symmetric NAT).
- ``wan`` routes between them. Its forward chain can drop every UDP datagram
  (``block_udp(True)``), only the UDP datagrams that pass directly between the two NATs
  (``block_direct(True)``: ``to_in`` <-> ``to_out``, both ways, while each NAT's UDP to and
  from ``public`` still passes, as where a firewall lets a relay through but no peer-to-peer
  UDP), and/or a random share of UDP datagrams (``set_loss(percent)``, nft
  ``numgen random``); TCP is dropped at random too only when asked
  (``set_loss(percent, protocols=("udp", "tcp"))``, for a TCP baseline on the same lossy path),
  and ICMP is never touched.
- The machine has no netem, so ``wan`` delays with a program of its own: ``set_delay(ms)``
  starts tools/nfdelay (built from tools/nfdelay.c on first use; it needs gcc and
  libnetfilter-queue-dev) in ``wan`` and adds an iptables-legacy rule to its mangle FORWARD
  chain that queues every forwarded packet to it (NFQUEUE); nfdelay accepts each packet once
  it is due.  Each packet is delayed once, so a round trip between any two hosts takes twice
  the delay.  With ``jitter`` each packet waits up to that much more, in order unless
  ``reorder=True``.  The mangle chain comes before the filter chain, so a packet is delayed,
  then may be lost.  Only forwarded packets are delayed: a sender's own OUTPUT is left
  alone, where TCP small queues would throttle it.
- While TCP loss is on, the end hosts' ``eth0`` (inside, outside, public) have ``gso_max_segs 1``:
  otherwise a TCP sender hands the veth 64 KB GSO super-packets that cross every router whole,
  and "p % of packets" would drop p % of 45-segment bursts. It applies to connections made after
  the call; ``set_loss`` without "tcp" puts the default (65535) back.
- Every neighbour entry is static (``nud permanent``), so the first packet of a test never waits
  for ARP, and IPv6 is off on every veth (``::1`` still works on each host's loopback).

What this kernel does (checked on 6.x, nftables 1.0.6), which tests may rely on:

- Default ``masquerade`` keeps a free source port for every destination; ``random`` and
  ``fully-random`` both draw a new random port (1024-65535) per new conntrack entry, so the two
  modes look the same for SNAT. The lab uses ``fully-random``.
- Removing the masqueraded address already makes the kernel drop that address's conntrack
  entries; ``roam()`` flushes the table anyway, which also drops unreplied and non-masquerade ones.
- Deleting a namespace's name kills nothing: the namespace and its veths live on while a process
  or socket holds it (see teardown below).
- ``fwd`` is an nft keyword (a chain called ``fwd`` fails to parse); Python 3.11 has no
  ``os.setns`` (ctypes is used) and no ``socket.SO_RCVBUFFORCE`` (it is 33 on Linux).

API::

    with Lab() as lab:                       # or lab = Lab(); lab.up(); ...; lab.down()
        lab.addr("public")                   # "203.0.113.10"; "inside" -> "10.11.0.2", ...
        lab.public_addr("in")                # nat_in's current WAN address, what public sees
        lab.ns("inside")                     # the namespace's name, for `ip netns exec`
        p = lab.popen("inside", argv, **kw)  # subprocess.Popen via `ip netns exec` (which execs:
                                             #   p.pid is the program's own PID)
        lab.run("public", argv, **kw)        # subprocess.run, same way (timeout 60 s unless given)
        lab.python("inside", code, *args)    # run(sys.executable -c code args...)
        s = lab.socket("inside", bind=("0.0.0.0", 0))   # a socket living in that host's
                                             #   namespace, usable from the test process
        with lab.netns("outside"): ...       # this *thread* is in that namespace for the block
        lab.set_loss(5)                      # % of UDP dropped by wan (float ok; 0 removes it)
        lab.set_loss(5, protocols=("udp", "tcp"))   # the same share of TCP segments as well
                                             #   (end hosts then send no GSO bursts)
        lab.set_delay(25, jitter=2)          # wan holds every packet it forwards 25 ms (up to
                                             #   2 ms more): a round trip takes 2 x 25 ms; 0 ends
        lab.delay_counters()                 # what the delay line held and released so far
        lab.block_udp(True)                  # wan drops all UDP; False restores
        lab.block_direct(True)               # wan drops UDP between nat_in and nat_out only
                                             #   (UDP to public passes); False restores
        lab.roam("in")                       # nat_in gets a fresh WAN address; returns it
        lab.set_symmetric("in", True)        # fully-random port mapping on nat_in
        lab.counter("nat_in", "unsolicited") # packets counted by a named nft counter
        lab.conntrack("nat_in")              # `conntrack -L` output of that router
    # Lab(symmetric=("out",)) builds nat_out symmetric from the start.

Counters (nft named counters, packets): on ``nat_in``/``nat_out``: ``unsolicited`` (new inbound
from the WAN, dropped) and ``forward_drop`` (anything else the router would not forward); on
``wan``: ``loss``, ``block_udp`` and ``block_direct``. Tests can use them to prove that a packet
was really sent and really dropped, instead of waiting for something not to happen.

Processes and teardown: ``down()`` removes every namespace this lab made, and with them every
veth and nft table. It is idempotent, runs after a partial ``up()`` failure, and is also
registered with ``atexit``. Deleting a namespace's name does not end the processes inside it (the
namespace lives on, unnamed, with its veths), so ``down()`` first finds every process whose network
namespace is one of this lab's (by namespace inode, through /proc, as ``ip netns pids`` does),
which can only be processes started in the lab, and stops each one by PID through a pidfd:
SIGTERM, up to 2 s, then SIGKILL. It never kills by name. Tests should stop their own processes
first; this is the safety net. Sockets made by ``lab.socket()`` are closed by ``down()``; a socket
the test made itself inside ``lab.netns()`` keeps its namespace alive (invisible, unnamed) until
the test closes it.

CLI, for manual use (tools/lab.py, which imports this module)::

    python3 tools/lab.py up [--prefix P] [--symmetric in,out]   # prefix default: udpmux-cli
    python3 tools/lab.py status                                 # every lab on this machine
    python3 tools/lab.py down [--prefix P] | --stale            # --stale: labs whose building
                                                                # process is gone
    ip netns exec udpmux-cli-inside bash                        # then work inside a host

Only the standard library is used. It needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2,
nftables and conntrack-tools. ``Lab.unavailable()`` says why a lab cannot be built here, or None.
"""

import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
NS_PREFIX = "udpmux"
TABLE = "udpmux_lab"
LOSS_PROTOCOLS = ("udp", "tcp")          # what set_loss() may drop
END_HOSTS = ("inside", "outside", "public")
GSO_MAX_SEGS = 65535                     # the kernel's default for a veth

HOSTS = ("inside", "nat_in", "wan", "nat_out", "outside", "public")
ROUTERS = ("nat_in", "wan", "nat_out")
NATS = {"in": "nat_in", "out": "nat_out"}
SIDE_OF = {"in": "in", "inside": "in", "nat_in": "in",
           "out": "out", "outside": "out", "nat_out": "out"}

# veth pairs: (host, ifname, peer host, peer ifname). MACs are fixed: 02:75:6d:<link>:<end>:01.
LINKS = (
    ("inside", "eth0", "nat_in", "lan"),
    ("nat_in", "wan", "wan", "to_in"),
    ("outside", "eth0", "nat_out", "lan"),
    ("nat_out", "wan", "wan", "to_out"),
    ("public", "eth0", "wan", "to_pub"),
)

LAN = {"in": ("10.11.0.1", "10.11.0.2"), "out": ("10.22.0.1", "10.22.0.2")}  # (router, host)
WAN_NET = {"in": ipaddress.ip_network("192.0.2.0/24"),
           "out": ipaddress.ip_network("198.51.100.0/24")}
WAN_GW = {"in": "192.0.2.1", "out": "198.51.100.1"}      # wan's own address on that link
POOL_FIRST = 10                                            # NAT addresses: .10 .. .254
PUBLIC_NET = "203.0.113.0/24"
PUBLIC_GW = "203.0.113.1"
PUBLIC_HOST = "203.0.113.10"

ADDR = {"inside": LAN["in"][1], "nat_in": LAN["in"][0],
        "outside": LAN["out"][1], "nat_out": LAN["out"][0],
        "public": PUBLIC_HOST, "wan": PUBLIC_GW}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
_LAB_NS_RE = re.compile(r"^(?P<prefix>%s-[A-Za-z0-9_.-]+)-(?P<host>%s)$"
                        % (NS_PREFIX, "|".join(HOSTS)))
_AUTO_PREFIX_RE = re.compile(r"^%s-(?P<pid>\d+)-\d+$" % NS_PREFIX)
_TOOLS = ("ip", "nft", "conntrack")
_DELAY_HINT = "apt-get install gcc libnetfilter-queue-dev iptables"
DELAY_QUEUE = 0                          # the NFQUEUE number wan's delay line reads
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INSTALL_HINT = "apt-get install iproute2 nftables conntrack"

_live_labs = set()          # labs that are up, torn down at exit if the caller forgot
_libc = None


class LabError(RuntimeError):
    """Building, changing or tearing down the lab failed."""


def _mac(link, end):
    return "02:75:6d:%02x:%02x:01" % (link, end)


def _link_of(host, ifname):
    for i, (a, ia, b, ib) in enumerate(LINKS):
        if (a, ia) == (host, ifname):
            return i, 0
        if (b, ib) == (host, ifname):
            return i, 1
    raise KeyError((host, ifname))


def _mac_of(host, ifname):
    return _mac(*_link_of(host, ifname))


def _tool(name):
    """Absolute path of an admin tool; /usr/sbin and /sbin are searched even if not on PATH."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin:/usr/bin:/bin"
    return shutil.which(name, path=path)


def _setns(fd):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: " + os.strerror(err))


def _unshare_netns_works():
    """Try unshare(CLONE_NEWNET) in a forked child; returns None or the error text."""
    pid = os.fork()
    if pid == 0:                                 # child: touch nothing, leave through _exit
        code = 0
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                code = ctypes.get_errno() or 1
        except BaseException:
            code = 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    return os.strerror(code) if 0 < code < 255 else "exit status %d" % code


def _ns_inode(name):
    st = os.stat(os.path.join(NETNS_DIR, name))
    return st.st_dev, st.st_ino


def _pids_in(inodes):
    """PIDs of processes whose network namespace is one of (dev, ino) `inodes`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat("/proc/%s/ns/net" % entry)
        except OSError:                          # gone, a zombie, or a kernel thread
            continue
        if (st.st_dev, st.st_ino) in inodes:
            found.append(int(entry))
    return found


def _wait_exit(fds, timeout):
    """Wait until every pidfd in `fds` (pid -> fd) is readable (process exited) or timeout."""
    pending = dict(fds)
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in pending.values():
        poller.register(fd, select.POLLIN)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            pending = {p: f for p, f in pending.items() if f != fd}
    return pending


def kill_pids(pids, grace=2.0):
    """Stop processes by PID: SIGTERM, `grace` seconds, SIGKILL, `grace` seconds. Returns the
    PIDs that were still there at the end. Uses pidfds, so a reused PID is never signalled."""
    fds = {}
    for pid in set(pids):
        if pid == os.getpid():
            continue
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
    try:
        pending = fds
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for fd in pending.values():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)
            pending = _wait_exit(pending, grace)
            if not pending:
                break
        return sorted(pending)
    finally:
        for fd in fds.values():
            os.close(fd)


def list_labs():
    """{prefix: [host, ...]} for every lab namespace on this machine."""
    labs = {}
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        names = []
    for name in names:
        m = _LAB_NS_RE.match(name)
        if m:
            labs.setdefault(m["prefix"], []).append(m["host"])
    return labs


def stale_prefixes():
    """Prefixes of automatically named labs whose building process no longer exists."""
    stale = []
    for prefix in list_labs():
        m = _AUTO_PREFIX_RE.match(prefix)
        if not m:
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:
            stale.append(prefix)
        except PermissionError:
            pass
    return stale


def build_nfdelay():
    """tools/build/nfdelay, compiled from tools/nfdelay.c when missing or older; LabError
    says what is missing to build it."""
    source = os.path.join(ROOT, "tools", "nfdelay.c")
    binary = os.path.join(ROOT, "tools", "build", "nfdelay")
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(source):
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LabError("the lab's delay needs gcc to build tools/nfdelay.c: " + _DELAY_HINT)
    os.makedirs(os.path.dirname(binary), exist_ok=True)
    out = subprocess.run([gcc, "-O2", "-Wall", "-o", binary + ".new", source,
                          "-lnetfilter_queue"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise LabError("cannot build tools/nfdelay.c (%s): %s"
                       % (_DELAY_HINT, out.stderr.strip()[-400:]))
    os.replace(binary + ".new", binary)
    return binary


def delay_unavailable():
    """None if Lab.set_delay() can work here, else a one-line reason."""
    if _tool("iptables-legacy") is None:
        return "the lab's delay needs iptables-legacy: " + _DELAY_HINT
    try:
        build_nfdelay()
    except LabError as e:
        return str(e)
    return None


def _delay_counts(lines):
    """nfdelay's last counters line as a dict, or None."""
    for line in reversed(lines):
        m = re.search(r"held (\d+), released (\d+), holding (\d+), most at once (\d+), "
                      r"overruns (\d+)", line)
        if m:
            return dict(zip(("held", "released", "holding", "most", "overruns"),
                            map(int, m.groups())))
    return None


class Lab:
    """A set of network namespaces forming the topology drawn in the module docstring."""

    _counter = itertools.count()

    def __init__(self, prefix=None, symmetric=(), register_atexit=True):
        if prefix is not None and not _NAME_RE.match(prefix):
            raise ValueError("bad lab prefix %r" % (prefix,))
        self._auto_prefix = prefix is None
        self.prefix = prefix or self._next_prefix()
        self._symmetric = {}
        for side in symmetric:
            self._symmetric[self._side(side)] = True
        self._register_atexit = register_atexit
        self._loss = 0
        self._loss_protocols = ("udp",)
        self._udp_blocked = False
        self._direct_blocked = False
        self._wan_addr = {side: str(WAN_NET[side][POOL_FIRST]) for side in NATS}
        self._pool_next = {side: POOL_FIRST + 1 for side in NATS}
        self._sockets = []
        self._procs = []
        self._delay = None          # (nfdelay's Popen, its stderr lines, their reader)
        self._delay_last = None     # the counters the last delay line stopped with
        self._is_up = False
        self.build_seconds = None
        self.teardown_seconds = None

    @classmethod
    def _next_prefix(cls):
        return "%s-%d-%d" % (NS_PREFIX, os.getpid(), next(cls._counter))

    # ---- availability --------------------------------------------------------------------

    @staticmethod
    def unavailable():
        """None if a lab can be built here, else a one-line reason."""
        if os.geteuid() != 0:
            return "the network lab needs root to create network namespaces"
        missing = [t for t in _TOOLS if _tool(t) is None]
        if missing:
            return ("the network lab needs iproute2 and nftables (%s not found): %s"
                    % (", ".join(missing), _INSTALL_HINT))
        err = _unshare_netns_works()
        if err:
            return ("the network lab cannot create network namespaces here "
                    "(unshare(CLONE_NEWNET): %s); run as root with CAP_SYS_ADMIN" % err)
        return None

    # ---- names and addresses -------------------------------------------------------------

    def ns(self, host):
        """The network namespace name of `host`."""
        if host not in HOSTS:
            raise KeyError("unknown lab host %r (one of %s)" % (host, ", ".join(HOSTS)))
        return "%s-%s" % (self.prefix, host)

    @staticmethod
    def _side(side):
        try:
            return SIDE_OF[side]
        except KeyError:
            raise KeyError("unknown NAT side %r (use 'in' or 'out')" % (side,)) from None

    def addr(self, host):
        """A host's own address: the LAN address for inside/outside (and the LAN side of
        nat_in/nat_out), the public address for public, wan's address facing public."""
        self.ns(host)
        return ADDR[host]

    def public_addr(self, side):
        """The current WAN address of nat_in ("in") or nat_out ("out"): what public sees."""
        return self._wan_addr[self._side(side)]

    @property
    def is_up(self):
        return self._is_up

    # ---- build and teardown --------------------------------------------------------------

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()

    def _existing(self):
        return [h for h in HOSTS if os.path.exists(os.path.join(NETNS_DIR, self.ns(h)))]

    def up(self):
        """Build the lab. On any failure everything made so far is removed and LabError raised."""
        if self._is_up:
            return self
        for _ in range(100):
            if not self._existing():
                break
            if not self._auto_prefix:
                raise LabError("a lab with prefix %r already exists (namespaces %s); "
                               "tear it down first" % (self.prefix, ", ".join(
                                   self.ns(h) for h in self._existing())))
            self.prefix = self._next_prefix()
        else:
            raise LabError("no free lab prefix found")
        start = time.monotonic()
        self._is_up = True            # from here on down() has something to do
        if self._register_atexit:
            _live_labs.add(self)
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        self.build_seconds = time.monotonic() - start
        return self

    def _build(self):
        self._ip(None, ["netns add %s" % self.ns(h) for h in HOSTS])
        for host in HOSTS:
            self._sysctls(host)
        self._ip(None, [
            "link add %s address %s netns %s type veth peer name %s address %s netns %s"
            % (ia, _mac(i, 0), self.ns(a), ib, _mac(i, 1), self.ns(b))
            for i, (a, ia, b, ib) in enumerate(LINKS)])
        for host in HOSTS:
            self._ip(host, self._host_config(host))
        for side in NATS:
            self._nft(NATS[side], self._nat_ruleset(side))
        self._nft("wan", self._wan_ruleset())

    def _sysctls(self, host):
        values = {"net/ipv4/conf/all/rp_filter": "0",
                  "net/ipv4/conf/default/rp_filter": "0",
                  "net/ipv4/ip_forward": "1" if host in ROUTERS else "0"}
        if os.path.exists("/proc/sys/net/ipv6/conf/default/disable_ipv6"):
            # Links made after this have no IPv6; lo (made with the namespace) keeps ::1.
            values["net/ipv6/conf/default/disable_ipv6"] = "1"
        with self.netns(host):
            for key, value in values.items():
                with open("/proc/sys/" + key, "w") as f:
                    f.write(value)

    def _host_config(self, host):
        cmds = ["link set lo up"]
        for a, ia, b, ib in LINKS:
            if host in (a, b):
                cmds.append("link set %s up" % (ia if host == a else ib))

        def neigh(addr, dev, peer, peer_if):
            cmds.append("neigh replace %s lladdr %s dev %s nud permanent"
                        % (addr, _mac_of(peer, peer_if), dev))

        if host in ("inside", "outside"):
            side = SIDE_OF[host]
            gw, me = LAN[side]
            cmds += ["addr add %s/24 dev eth0" % me, "route add default via %s" % gw]
            neigh(gw, "eth0", NATS[side], "lan")
        elif host in NATS.values():
            side = SIDE_OF[host]
            gw, me = LAN[side]
            cmds.append("addr add %s/24 dev lan" % gw)
            neigh(me, "lan", "inside" if side == "in" else "outside", "eth0")
            cmds += ["addr add %s/32 dev wan" % self._wan_addr[side],
                     "route add default via %s dev wan onlink" % WAN_GW[side]]
            neigh(WAN_GW[side], "wan", "wan", "to_" + side)
        elif host == "wan":
            for side in NATS:
                dev = "to_" + side
                cmds += ["addr add %s/32 dev %s" % (WAN_GW[side], dev),
                         "route add %s/32 dev %s" % (self._wan_addr[side], dev)]
                neigh(self._wan_addr[side], dev, NATS[side], "wan")
            cmds.append("addr add %s/24 dev to_pub" % PUBLIC_GW)
            neigh(PUBLIC_HOST, "to_pub", "public", "eth0")
        elif host == "public":
            cmds += ["addr add %s/24 dev eth0" % PUBLIC_HOST,
                     "route add default via %s" % PUBLIC_GW]
            neigh(PUBLIC_GW, "eth0", "wan", "to_pub")
        return cmds

    def _masquerade_rule(self, side):
        mode = " fully-random" if self._symmetric.get(side) else ""
        return ('add rule ip %s postrouting oifname "wan" masquerade%s comment "masquerade"\n'
                % (TABLE, mode))

    def _nat_ruleset(self, side):
        return """\
table ip %(t)s {
    counter unsolicited { }
    counter forward_drop { }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
        counter name "forward_drop" drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname != "wan" accept
        ct state established,related accept
        counter name "unsolicited" drop
    }
}
""" % {"t": TABLE} + self._masquerade_rule(side)

    def _wan_ruleset(self):
        return """\
table ip %(t)s {
    counter loss { }
    counter block_udp { }
    counter block_direct { }
    chain forward {
        type filter hook forward priority filter; policy accept;
    }
}
""" % {"t": TABLE} + self._wan_rules()

    def _wan_rules(self):
        rules = "flush chain ip %s forward\n" % TABLE
        if self._udp_blocked is True:
            rules += ('add rule ip %s forward meta l4proto udp counter name "block_udp" drop\n'
                      % TABLE)
        elif self._udp_blocked:
            for way in ("iifname", "oifname"):
                rules += ('add rule ip %s forward meta l4proto udp %s "to_%s" counter name '
                          '"block_udp" drop\n' % (TABLE, way, self._udp_blocked))
        if self._direct_blocked:
            for src, dst in (("in", "out"), ("out", "in")):
                rules += ('add rule ip %s forward meta l4proto udp iifname "to_%s" oifname '
                          '"to_%s" counter name "block_direct" drop\n' % (TABLE, src, dst))
        if self._loss > 0:
            rules += ('add rule ip %s forward meta l4proto { %s } numgen random mod 10000 < %d '
                      'counter name "loss" drop\n'
                      % (TABLE, ", ".join(self._loss_protocols), self._loss))
        return rules

    def down(self):
        """Remove everything this lab made: stop processes left in its namespaces (by PID),
        close its sockets, delete its namespaces. Idempotent; raises LabError only if a
        namespace could not be removed."""
        start = time.monotonic()
        with contextlib.suppress(Exception):
            self._stop_delay()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()
        existing = self._existing()
        problems = []
        if existing:
            inodes = set()
            for host in existing:
                with contextlib.suppress(OSError):
                    inodes.add(_ns_inode(self.ns(host)))
            left = kill_pids(_pids_in(inodes))
            if left:
                problems.append("processes %s did not exit" % left)
        for proc in self._procs:                 # reap the children we started
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=2)
        self._procs.clear()
        if existing:
            try:
                self._ip(None, ["netns del %s" % self.ns(h) for h in existing], force=True)
            except LabError as e:
                problems.append(str(e))
        remaining = self._existing()
        if not remaining:
            self._is_up = False
            _live_labs.discard(self)
            self.teardown_seconds = time.monotonic() - start
            return
        raise LabError("could not remove namespaces %s: %s"
                       % (", ".join(self.ns(h) for h in remaining), "; ".join(problems)))

    # ---- running things in a host ----------------------------------------------------------

    @contextlib.contextmanager
    def netns(self, host):
        """Put the calling thread into `host`'s network namespace for the with-block.

        Sockets created inside the block belong to that namespace for their whole life and may
        be used after the block. Other threads are unaffected. Children forked inside the block
        start in that namespace."""
        path = os.path.join(NETNS_DIR, self.ns(host))
        with open("/proc/thread-self/ns/net") as home, open(path) as target:
            _setns(target.fileno())
            try:
                here = os.stat("/proc/thread-self/ns/net")
                there = os.fstat(target.fileno())
                if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
                    raise LabError("setns did not enter %s" % path)
                yield
            finally:
                _setns(home.fileno())

    def socket(self, host, family=socket.AF_INET, type=socket.SOCK_DGRAM, proto=0,
               bind=None):
        """A socket in `host`'s namespace, optionally bound; closed by down() if not before."""
        with self.netns(host):
            sock = socket.socket(family, type, proto)
        try:
            if bind is not None:
                sock.bind(bind)
        except BaseException:
            sock.close()
            raise
        self._sockets.append(sock)
        return sock

    def _wrap(self, host, argv):
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a sequence of arguments, not a string")
        return [_tool("ip"), "netns", "exec", self.ns(host), *map(os.fspath, argv)]

    def popen(self, host, argv, **kw):
        """subprocess.Popen(argv) in `host`; `ip netns exec` execs, so .pid is argv's PID."""
        proc = subprocess.Popen(self._wrap(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host, argv, **kw):
        """subprocess.run(argv) in `host` (timeout 60 s unless given)."""
        kw.setdefault("timeout", 60)
        return subprocess.run(self._wrap(host, argv), **kw)

    def python(self, host, code, *args, **kw):
        """Run Python code (`python -c code args...`) in `host` with this interpreter."""
        return self.run(host, [sys.executable, "-c", code, *args], **kw)

    # ---- changing the network ------------------------------------------------------------

    def set_loss(self, percent, protocols=("udp",)):
        """wan drops `percent` % of forwarded UDP datagrams at random (0 removes the rule).
        `protocols` ("udp" and/or "tcp") says what is dropped; each call replaces the last."""
        if not 0 <= percent <= 100:
            raise ValueError("loss percent must be within 0..100")
        if isinstance(protocols, str):
            protocols = (protocols,)
        chosen = tuple(p for p in LOSS_PROTOCOLS if p in protocols)
        if not chosen or len(chosen) != len(set(protocols)):
            raise ValueError("loss protocols must be some of %s, not %r"
                             % (", ".join(LOSS_PROTOCOLS), protocols))
        self._loss = int(round(percent * 100))        # in 1/10000
        if ("tcp" in chosen) != ("tcp" in self._loss_protocols):
            segs = 1 if "tcp" in chosen else GSO_MAX_SEGS
            for host in END_HOSTS:
                self._ip(host, ["link set dev eth0 gso_max_segs %d" % segs])
        self._loss_protocols = chosen
        self._nft("wan", self._wan_rules())

    def set_delay(self, ms, jitter=0.0, reorder=False, seed=1):
        """wan holds every packet it forwards `ms` milliseconds, plus up to `jitter` more
        (uniform; in order unless `reorder`); set_delay(0) ends it.  Each call replaces
        the last: the old delay line lets what it holds go first."""
        if not 0 <= ms <= 60000 or not 0 <= jitter <= 60000:
            raise ValueError("delay and jitter must be within 0..60000 ms")
        self._stop_delay()
        if ms == 0 and jitter == 0:
            return
        if _tool("iptables-legacy") is None:
            raise LabError("the lab's delay needs iptables-legacy: " + _DELAY_HINT)
        argv = [build_nfdelay(), "--queue", str(DELAY_QUEUE), "--delay", "%g" % ms,
                "--jitter", "%g" % jitter, "--seed", str(seed)] + (["--reorder"] if reorder
                                                                   else [])
        proc = self.popen("wan", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
        lines = []
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else ""
        if "ready" not in line:
            proc.kill()
            raise LabError("nfdelay did not start: %s%s" % (line, proc.stderr.read()))
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        self._delay = (proc, lines, reader)
        self._run_in("wan", [_tool("iptables-legacy"), "-t", "mangle", "-A", "FORWARD",
                             "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE)])

    def delay_counters(self):
        """{"held", "released", "holding", "most", "overruns"} of the delay line now (or
        as it stopped); None without one."""
        if self._delay is None:
            return self._delay_last
        proc, lines, _reader = self._delay
        start = len(lines)
        proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + 5
        while len(lines) <= start and time.monotonic() < end:
            time.sleep(0.01)
        return _delay_counts(lines[start:])

    def _stop_delay(self):
        if self._delay is None:
            return
        proc, lines, reader = self._delay
        self._delay = None
        with contextlib.suppress(LabError):
            self._run_in("wan", [_tool("iptables-legacy"), "-t", "mangle", "-F", "FORWARD"])
        proc.terminate()                # it lets every packet it holds go, then exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        self._delay_last = _delay_counts(lines)

    def block_udp(self, blocked=True, side=None):
        """wan drops every forwarded UDP datagram (True) or none (False); with side "in" or
        "out", only those to and from that NAT (the other side's UDP still passes). TCP
        always passes."""
        self._udp_blocked = (self._side(side) if side else True) if blocked else False
        self._nft("wan", self._wan_rules())

    def block_direct(self, blocked=True):
        """wan drops every UDP datagram forwarded between nat_in and nat_out, both ways
        (True), or none (False). UDP between either NAT and public, and all TCP, still pass:
        peers behind the two NATs reach a relay but not each other."""
        self._direct_blocked = bool(blocked)
        self._nft("wan", self._wan_rules())

    def roam(self, side):
        """Give nat_in ("in") or nat_out ("out") a fresh WAN address from its pool and return
        it. The old address is removed, wan's route follows, and the router's conntrack table
        is flushed so that existing flows leave with the new source address."""
        side = self._side(side)
        nat, dev = NATS[side], "to_" + side
        old = self._wan_addr[side]
        net = WAN_NET[side]
        n = self._pool_next[side]
        new = str(net[n])
        self._pool_next[side] = n + 1 if n + 1 < net.num_addresses - 1 else POOL_FIRST
        self._ip(nat, ["addr add %s/32 dev wan" % new])
        self._ip("wan", ["route add %s/32 dev %s" % (new, dev),
                         "neigh replace %s lladdr %s dev %s nud permanent"
                         % (new, _mac_of(nat, "wan"), dev)])
        self._wan_addr[side] = new
        self._ip(nat, ["addr del %s/32 dev wan" % old])
        self._ip("wan", ["route del %s/32 dev %s" % (old, dev),
                         "neigh del %s dev %s" % (old, dev)])
        self.flush_conntrack(nat)
        return new

    def set_symmetric(self, side, symmetric=True, flush=True):
        """Switch a NAT between port-preserving masquerade and `masquerade fully-random`
        (a new random public port for every new destination). With `flush`, existing
        mappings are dropped so they too follow the new mode."""
        side = self._side(side)
        self._symmetric[side] = bool(symmetric)
        self._nft(NATS[side], "flush chain ip %s postrouting\n" % TABLE
                  + self._masquerade_rule(side))
        if flush:
            self.flush_conntrack(NATS[side])

    def flush_conntrack(self, host):
        """Forget every connection-tracking entry (every NAT mapping) of a router."""
        self._run_in(host, [_tool("conntrack"), "-F"])

    def conntrack(self, host):
        """`conntrack -L` of a router, as text (for diagnostics)."""
        return self._run_in(host, [_tool("conntrack"), "-L"]).stdout

    def counter(self, host, name):
        """Packets counted so far by the named nft counter `name` on router `host`."""
        out = self._run_in(host, [_tool("nft"), "-j", "list", "counter", "ip", TABLE, name])
        for item in json.loads(out.stdout)["nftables"]:
            if "counter" in item:
                return item["counter"]["packets"]
        raise LabError("no counter %r on %s" % (name, host))

    def describe(self):
        """A few lines naming every host, its namespace and its addresses."""
        lines = ["lab %s (%s)" % (self.prefix, "up" if self._is_up else "down")]
        for host in HOSTS:
            extra = ""
            if host in NATS.values():
                side = SIDE_OF[host]
                extra = " wan %s%s" % (self._wan_addr[side],
                                       " symmetric" if self._symmetric.get(side) else "")
            lines.append("  %-8s %-28s %s%s" % (host, self.ns(host), ADDR[host], extra))
        return "\n".join(lines)

    # ---- plumbing --------------------------------------------------------------------------

    def _ip(self, host, commands, force=False):
        argv = [_tool("ip")]
        if host is not None:
            argv += ["-n", self.ns(host)]
        if force:
            argv.append("-force")
        argv += ["-batch", "-"]
        res = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            raise LabError("ip %s failed: %s" % (host or "", res.stderr.strip()))

    def _nft(self, host, text):
        self._run_in(host, [_tool("nft"), "-f", "-"], input=text)

    def _run_in(self, host, argv, input=None):
        with self.netns(host):                   # forked child inherits this thread's netns
            res = subprocess.run(argv, input=input, capture_output=True, text=True,
                                 timeout=30)
        if res.returncode != 0:
            raise LabError("%s on %s failed: %s"
                           % (" ".join(argv), host, (res.stderr or res.stdout).strip()))
        return res


@atexit.register
def _down_forgotten_labs():
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.down()
