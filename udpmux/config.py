"""Every mode's configuration, checked: the relay's from a TOML file (udpmux.conf(5))
or one tunnel from options; expose's and punch's from a file of top-level keys or
options; uot's and link's from options.  Each becomes a frozen dataclass
(RelayConfig and TunnelConfig, ExposeConfig, PunchConfig, UotConfig, LinkConfig).

    control_socket = "/run/udpmux/control.sock"     # global settings
    [defaults]                                      # tunnel settings for every tunnel
    max_flows = 4096
    [tunnels.wg]                                    # one table per tunnel, named
    public = "0.0.0.0:51820"
    register = "0.0.0.0:5566"
    key_file = "/etc/udpmux/wg.key"

Every setting is declared once below, in a table per mode, with its default and its
check; nowhere else holds a default.  The command line's defaults, the man page and
the example file are tested against these tables.  What a Setting is, the checks the
tables share and the reading of options and TOML tables are in settings.py.
Loading reads the key files and resolves the addresses, so every mistake is found
when the relay starts or reloads, not when the first datagram arrives.
"""

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field

from udpmux import addr, auth, wire
from udpmux.addr import shown
from udpmux.endpoint import KEEPALIVE_EVERY
from udpmux.errors import ConfigError, Fatal, UsageError
from udpmux.settings import (
    Setting, boolean, check_settings, in_option_words, nonempty_text, option_values,
    positive_int, positive_number, raise_problems, settled, whole_numbers,
)
from udpmux.tagtable import CAPACITY_MAX

try:
    import tomllib
except ModuleNotFoundError:            # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")      # whole names: NAME.fullmatch()
CONFIG_FILE_MAX = 1 << 20       # bytes; a configuration of a thousand tunnels takes 200 KiB
# sizeof(sun_path) is 108 bytes on Linux; one stays for the NUL that C code expects.
CONTROL_SOCKET_MAX = 107
RENDEZVOUS_MAX_FLOWS = 65536    # agents a rendezvous tunnel holds at most (its report block)
PROBE_PORTS_MAX = 4096          # punch's birthday sockets and guesses at most


_flow_count = whole_numbers(1, CAPACITY_MAX, " flows")
_probe_count = whole_numbers(0, PROBE_PORTS_MAX)


def control_socket_path(value):
    """A path an AF_UNIX socket can be bound to; ValueError says why not.

    The kernel takes at most 108 bytes and Python says only "AF_UNIX path too long"
    when the socket is bound, long after the configuration was read."""
    value = nonempty_text(value)
    size = len(os.fsencode(value))
    if "\0" in value:
        raise ValueError(f"{shown(value)}: a path holds no NUL character")
    if size > CONTROL_SOCKET_MAX:
        raise ValueError(f"control socket path is {size} bytes; at most {CONTROL_SOCKET_MAX} "
                         "fit in a socket address")
    return value


def _udp_listen(name, value):
    try:
        return addr.parse_endpoint(nonempty_text(value), socket.SOCK_DGRAM, passive=True)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


# Settings more than one mode has.
PREVIOUS_KEY = Setting("previous_key_file", nonempty_text, None,
                       "a key being rotated out: still accepted from agents that have it, "
                       "never used to send anything else")
FLOW_IDLE = Setting("flow_idle", positive_number, 180.0,
                    "seconds without datagrams before a flow ends")


def _keepalive(nat):
    return Setting("keepalive", positive_number, float(KEEPALIVE_EVERY),
                   f"seconds between keepalives; below the {nat} UDP timeout")


def _networks(value):
    """IP networks, as a TOML array of strings or a comma-separated string (an option):
    "203.0.113.0/24", "2001:db8::/32", or one address."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a list of networks such as [\"203.0.113.0/24\"], got "
                         f"{shown(value)}")
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{shown(item)} is not an IP network such as 203.0.113.0/24"
                             ) from None
    return tuple(networks)


def _mode(value):
    if value not in ("expose", "rendezvous"):
        raise ValueError(f"expected \"expose\" or \"rendezvous\", got {shown(value)}")
    return value


TUNNEL_SETTINGS = [
    Setting("mode", _mode, "expose",
            "expose: clients reach an exposer's service; rendezvous: punch peers meet"),
    Setting("public", nonempty_text, None, "the UDP address clients send to"),
    Setting("register", nonempty_text, None, "where the exposer registers (default: the public socket)"),
    Setting("key_file", nonempty_text, None, "the tunnel's key file"),
    Setting("insecure", boolean, False, "run without a key"),
    PREVIOUS_KEY,
    Setting("tcp", boolean, True,
            "also accept exposers over TCP at the register address (for networks that drop UDP)"),
    Setting("max_flows", _flow_count, 65536, "flows kept at once; the idlest goes first"),
    FLOW_IDLE,
    Setting("exposer_timeout", positive_number, 90.0,
            "seconds without a word from the exposer before the tunnel is down"),
    Setting("new_flows_rate", positive_number, 10000.0, "new flows accepted per second"),
    Setting("new_flows_per_source", positive_number, 5000.0,
            "new flows accepted per second from one client IP address"),
    Setting("max_sources", positive_int, 4096,
            "client IP addresses whose new-flow rate is tracked at once"),
    Setting("allow", _networks, None, "client networks that may start flows (none: any)"),
    Setting("deny", _networks, None, "client networks that may not start flows"),
]
GLOBAL_SETTINGS = [
    Setting("control_socket", nonempty_text, None, "where `udpmux status` finds the relay"),
    Setting("metrics_listen", nonempty_text, None,
            "a TCP address to serve Prometheus metrics on, e.g. 127.0.0.1:9478"),
    Setting("stop_timeout", positive_number, 10.0,
            "seconds a worker has to stop before it is killed"),
]
TUNNEL = {s.name: s for s in TUNNEL_SETTINGS}
GLOBAL = {s.name: s for s in GLOBAL_SETTINGS}


def default_control_socket(mode="relay"):
    """Where a mode's daemon serves `udpmux status` unless told: in $RUNTIME_DIRECTORY
    (systemd's RuntimeDirectory=) or /run/udpmux as root, else in $XDG_RUNTIME_DIR or
    /tmp, per user; the relay's is control.sock, an agent's is named after its mode."""
    name = "control" if mode == "relay" else mode
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, f"{name}.sock")
    if os.geteuid() == 0:
        return f"/run/udpmux/{name}.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/udpmux-{os.geteuid()}"
    return os.path.join(base, f"udpmux-{name}.sock")


@dataclass(frozen=True)
class TunnelConfig:
    name: str
    public: tuple               # (family, sockaddr)
    register: tuple | None      # None: the public socket
    key: bytes | None           # None: --insecure
    previous_key: bytes | None  # a key being rotated out
    mode: str                   # the rest as TUNNEL_SETTINGS says (and defaults)
    tcp: bool
    max_flows: int
    flow_idle: float
    exposer_timeout: float
    new_flows_rate: float
    new_flows_per_source: float
    max_sources: int
    allow: tuple | None         # ipaddress networks; None: any client
    deny: tuple | None
    source: str = field(default="", compare=False)     # where it was defined, for messages

    def endpoints(self):
        """The sockets this tunnel needs, by label: (family, sockaddr, socket type)."""
        points = {"public": (*self.public, socket.SOCK_DGRAM)}
        if self.mode == "rendezvous":
            return points           # peers register where they meet: one UDP socket
        if self.register is not None:
            points["register"] = (*self.register, socket.SOCK_DGRAM)
        if self.tcp:
            points["tcp"] = (*(self.register or self.public), socket.SOCK_STREAM)
        return points


@dataclass(frozen=True)
class RelayConfig:
    tunnels: dict
    control_socket: str
    stop_timeout: float         # GLOBAL_SETTINGS
    path: str | None = None     # the file it came from; None: the command line
    metrics_listen: tuple | None = None     # (family, sockaddr) of the metrics endpoint


def _metrics_endpoint(text):
    """A TCP listening address for metrics; ValueError names the problem."""
    return addr.parse_endpoint(nonempty_text(text), socket.SOCK_STREAM, passive=True)


def _tunnel(name, values, where, log):
    """A TunnelConfig from checked setting values; ValueError on a problem."""
    if not NAME.fullmatch(name):
        raise ValueError(f"tunnel name {shown(name)}: use up to 32 letters, digits, '.', '_', "
                         "'-'")
    if values.get("public") is None:
        raise ValueError("public: missing (the UDP address clients send to)")
    public = _udp_listen("public", values["public"])
    register = None
    if values.get("register") is not None:
        register = _udp_listen("register", values["register"])
        if register == public and public[1][1] != 0:    # port 0: two ports the kernel picks
            register = None
    if values.get("mode") == "rendezvous" \
            and values.get("max_flows", 0) > RENDEZVOUS_MAX_FLOWS:
        raise ValueError(f"max_flows: a rendezvous tunnel holds at most {RENDEZVOUS_MAX_FLOWS} "
                         f"agents, not {values['max_flows']}")
    key = _key(values, where, log)
    numbers = settled(TUNNEL_SETTINGS, values, exclude=("public", "register", "key_file",
                                                         "insecure", "previous_key_file"))
    return TunnelConfig(name=name, public=public, register=register, key=key,
                        previous_key=_previous_key(values, key, where, log), source=where,
                        **numbers)


def _key(values, where, log):
    """The key that key_file names, or None with insecure; ValueError when neither or both."""
    if values.get("insecure"):
        if values.get("key_file"):
            raise ValueError("key_file and insecure: choose one")
        return None
    if values.get("key_file") == "-" and where != "options":
        raise ValueError("key_file: \"-\" (standard input) works on the command line only")
    if values.get("key_file"):
        return auth.read_key(values["key_file"], log)
    raise ValueError("key_file: missing (or set insecure = true to run without a key)")


def _previous_key(values, key, where, log):
    """The key that previous_key_file names, or None; ValueError when it cannot be one."""
    path = values.get("previous_key_file")
    if path is None:
        return None
    if key is None:
        raise ValueError("previous_key_file: without a key there is no key to rotate")
    if path == "-" and where != "options":
        raise ValueError("previous_key_file: \"-\" (standard input) works on the command "
                         "line only")
    previous = auth.read_key(path, log)
    if previous == key:
        raise ValueError("previous_key_file: the same key as key_file; a rotation's previous "
                         "key is the one being replaced")
    return previous


def _check_unique(tunnels, complain):
    seen = {}
    for tunnel in tunnels.values():
        for label, (family, sockaddr, kind) in tunnel.endpoints().items():
            key = (kind, family, sockaddr[:2])
            if sockaddr[1] == 0:
                continue            # port 0: the kernel picks a free port for each
            if key in seen:
                complain(f"tunnel {tunnel.name}: {label} address "
                         f"{addr.format_endpoint(family, sockaddr)} is already {seen[key]}")
            seen[key] = f"tunnel {tunnel.name}'s {label} address"


def read_toml(path):
    """The table a TOML file holds; ConfigError names the file and what is wrong with it.

    Only a regular file is read (a FIFO would block the reader for ever, /dev/zero
    would never end), and at most CONFIG_FILE_MAX bytes of it."""
    try:
        data, _mode = auth.read_regular(path, CONFIG_FILE_MAX)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except auth.NotRegularFile as exc:
        raise ConfigError(f"{path}: is {exc.args[0]}, not a configuration file") from None
    except OSError as exc:          # a path through a file, a name too long, a loop, EIO
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > CONFIG_FILE_MAX:
        raise ConfigError(f"{path}: larger than {CONFIG_FILE_MAX >> 10} KiB; "
                          "is it the configuration file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte 0x{data[exc.start]:02x} "
                          f"on line {line}); is it the configuration file?") from None
    try:
        return dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def load(path, log=None):
    """Read and check a configuration file; ConfigError names the file and the key."""
    data = read_toml(path)
    defaults = data.pop("defaults", {})
    tunnels_table = data.pop("tunnels", None)
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    if not isinstance(tunnels_table, dict) or not tunnels_table:
        raise ConfigError(f"{path}: no tunnels; add at least one [tunnels.NAME] table")
    problems = []
    globals_ = check_settings(data, GLOBAL, path, problems)
    defaults = check_settings(defaults, TUNNEL, f"{path}: [defaults]", problems)
    tunnels = {}
    for name, table in tunnels_table.items():
        where = f"{path}: [tunnels.{name}]"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        before = len(problems)
        values = {**defaults, **check_settings(table, TUNNEL, where, problems)}
        if len(problems) > before:
            continue                    # a setting left out would only say "missing"
        try:
            tunnels[name] = _tunnel(name, values, where, log)
        except (ValueError, Fatal) as exc:
            problems.append(f"{where}: {exc}")
    raise_problems(problems)
    return _relay_config(tunnels, globals_, ConfigError, f"{path}: ", lambda name: name,
                         path=path)


def _relay_config(tunnels, given, error, where, words, path=None):
    """A RelayConfig of checked tunnels and the global settings given; error
    (ConfigError or UsageError) says a problem after where, naming a setting in
    words(name): the file's key or the option."""
    def complain(message):
        raise error(f"{where}{message}")
    _check_unique(tunnels, complain)
    values = settled(GLOBAL_SETTINGS, given)
    for name, check in (("metrics_listen", _metrics_endpoint),
                        ("control_socket", control_socket_path)):
        if values[name]:
            try:
                values[name] = check(values[name])
            except ValueError as exc:
                raise error(f"{where}{words(name)}: {exc}") from None
    if not values["control_socket"]:
        values["control_socket"] = _default_socket(words("control_socket"), error, where)
    return RelayConfig(tunnels=tunnels, path=path, **values)


def _default_socket(name, error, where=""):
    """default_control_socket(), checked; `error` names `name` as the way to another."""
    path = default_control_socket()
    try:
        return control_socket_path(path)
    except ValueError as exc:
        raise error(f"{where}the default {exc} (set {name})") from None


def from_options(args, log=None):
    """The one-tunnel form of `udpmux relay`; UsageError names the option."""
    values = option_values(args, TUNNEL_SETTINGS)
    values["tcp"] = not args.get("--no-tcp")
    name = args.get("--name") or "tunnel"
    try:
        tunnel = _tunnel(name, values, "options", log)
    except ValueError as exc:
        raise UsageError(in_option_words(str(exc), TUNNEL_SETTINGS)) from None
    given = {name: args.get(GLOBAL[name].option) for name in ("metrics_listen",
                                                              "control_socket")}
    return _relay_config({name: tunnel}, given, UsageError, "",
                         lambda name: GLOBAL[name].option)


# -- single-host agents

# What every agent serves of itself: `udpmux status` and metrics (agentstatus.py).
INSPECT_SETTINGS = [
    Setting("control_socket", control_socket_path, None,
            "where `udpmux status` finds this agent (default: named after its mode)"),
    Setting("metrics_listen", _metrics_endpoint, None,
            "a TCP address to serve Prometheus metrics on, e.g. 127.0.0.1:9479"),
]
INSPECT = tuple(s.name for s in INSPECT_SETTINGS)

UOT_SETTINGS = [
    Setting("listen", nonempty_text, None, "uot-server: the TCP address clients connect to; "
            "uot-client: the UDP address local clients send to"),
    Setting("target", nonempty_text, None, "uot-server: the UDP service, HOST:PORT"),
    Setting("server", nonempty_text, None, "uot-client: the uot-server's address, HOST:PORT"),
    Setting("key_file", nonempty_text, None, "the key both ends share"),
    Setting("insecure", boolean, False, "run without a key"),
    PREVIOUS_KEY,
    FLOW_IDLE,
    Setting("max_flows", _flow_count, 16384, "flows (UDP sockets at the server) kept at once"),
    Setting("max_clients", positive_int, 64, "uot-client connections served at once"),
    *INSPECT_SETTINGS,
]
UOT = {s.name: s for s in UOT_SETTINGS}


@dataclass(frozen=True)
class UotConfig:
    """uot-server: listen is its TCP listener, peer the UDP target; uot-client: listen is
    its UDP socket, peer the server's TCP address."""
    listen: tuple               # (family, sockaddr)
    peer: object                # the server's target (family, sockaddr); the client's
                                # server, an addr.Destination
    key: bytes | None
    previous_key: bytes | None  # uot-server: a key being rotated out
    path: str | None            # the file read, None from options
    flow_idle: float            # the rest as UOT_SETTINGS says (and defaults)
    max_flows: int
    max_clients: int
    control_socket: str | None
    metrics_listen: tuple | None


def _uot(values, where, log, server):
    """uot-server's (server true) or uot-client's UotConfig from checked values;
    ValueError in the words of the file's keys or of the options."""
    def n(name):
        return UOT[name].option if where == "options" else name
    mine, other = ("target", "server") if server else ("server", "target")
    for required in ("listen", mine):
        if values.get(required) is None:
            raise ValueError(f"{n(required)}: missing ({UOT[required].help})")
    for name in (other,) if server else (other, "previous_key_file"):
        if values.get(name) is not None:
            raise ValueError(f"{n(name)}: not a uot-{'server' if server else 'client'}'s "
                             f"setting ({UOT[name].help})")
    name = "listen"
    try:
        listen = addr.parse_endpoint(values[name], socket.SOCK_STREAM if server
                                     else socket.SOCK_DGRAM, passive=True)
        if server:
            name = "target"
            peer = addr.parse_endpoint(values[name])
    except ValueError as exc:
        raise ValueError(f"{n(name)}: {exc}") from None
    if not server:          # resolved again when the client connects
        peer = _destination(n("server"), values["server"], socket.SOCK_STREAM)
    key = _key(values, where, log)
    return UotConfig(listen, peer, key, _previous_key(values, key, where, log), _path(where),
                     **settled(UOT_SETTINGS, values, only=("flow_idle", "max_flows",
                                                           "max_clients") + INSPECT))


def _path(where):
    return None if where == "options" else where


def load_uot(path, server, log=None):
    """Read and check a uot-server's or uot-client's file (uot-server-NAME.toml)."""
    return _load_agent(path, UOT, lambda values, where, log: _uot(values, where, log, server),
                       log)


def uot_from_options(args, server, log=None):
    """uot-server's (server true) or uot-client's command line as a UotConfig."""
    return _agent_from_options(
        args, UOT_SETTINGS, lambda values, where, log: _uot(values, where, log, server), log)


def _port_range(value):
    low, high = addr.parse_port_range(nonempty_text(value))
    return f"{low}-{high}" if low != high else str(low)


def _hostport(value):
    """A HOST:PORT to connect to: port 0 is nobody's."""
    _host, port = addr.split_hostport(nonempty_text(value))
    if port == 0:
        raise ValueError(f"{shown(value)}: port 0 is not a destination; give the port to reach")
    return value


def _packet_size(value):
    value = positive_int(value)
    if not 576 <= value <= wire.MAX_UDP_PAYLOAD:
        raise ValueError(f"expected 576 to {wire.MAX_UDP_PAYLOAD} bytes, got {value}")
    return value


_MULTIPLES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_TEXT = re.compile(r"([0-9]+)([KMG])", re.ASCII)
BUFFER_LEAST, BUFFER_MOST = 1 << 20, 1 << 30


def _buffer(value):
    """Bytes, as a whole number or with K, M or G (binary multiples): 32M."""
    if isinstance(value, str):
        match = _SIZE_TEXT.fullmatch(value.upper())
        if match is None:
            raise ValueError(f"expected bytes, as a number or with K, M or G (32M), "
                             f"got {shown(value)}")
        value = int(match[1]) * _MULTIPLES[match[2]]
    value = positive_int(value)
    if not BUFFER_LEAST <= value <= BUFFER_MOST:
        raise ValueError(f"expected 1M to 1G bytes, got {value}")
    return value


def _congestion(value):
    if value not in ("bbr", "newreno"):
        raise ValueError(f"expected bbr or newreno, got {shown(value)}")
    return value


LINK_SETTINGS = [
    Setting("target", _hostport, "127.0.0.1:22", "the TCP service, as the server sees it"),
    Setting("bind", _port_range, "40000-40999", "the server's UDP port or MIN-MAX range"),
    Setting("packet_size", _packet_size, 1232,
            "largest UDP payload sent; 1232 fits a 1,280-byte IPv6 path"),
    Setting("idle_limit", positive_number, 43200.0,
            "seconds without a word from the other end before giving up"),
    Setting("linger", positive_number, 30.0,
            "seconds to wait, once the local side closed, for the rest to be acknowledged"),
    Setting("buffer", _buffer, 32 << 20,
            "memory for the streams' bytes each way; windows grow to it with the path"),
    Setting("congestion", _congestion, "bbr",
            "bbr (a model of the path; random loss is no congestion) or newreno"),
]
LINK = {s.name: s for s in LINK_SETTINGS}


@dataclass(frozen=True)
class LinkConfig:
    """What link and link-server share (as LINK_SETTINGS says, and defaults)."""
    target: str                 # HOST:PORT, resolved by the server
    bind: str                   # PORT or MIN-MAX
    packet_size: int
    idle_limit: float
    linger: float
    buffer: int                 # bytes
    congestion: str             # bbr or newreno


def link_from_options(args):
    """link's or link-server's options as a LinkConfig; UsageError names the option."""
    return LinkConfig(**settled(LINK_SETTINGS, option_values(args, LINK_SETTINGS)))


# `udpmux expose` (one exposer per file or command line)

def _carrier(value):
    if value not in ("udp", "tcp"):
        raise ValueError(f"expected udp or tcp, got {shown(value)}")
    return value


EXPOSE_SETTINGS = [
    Setting("relay", nonempty_text, None, "the relay's register address, HOST:PORT"),
    Setting("service", nonempty_text, None, "the UDP service to expose, HOST:PORT"),
    Setting("key_file", nonempty_text, None, "the tunnel's key file"),
    Setting("insecure", boolean, False, "run without a key"),
    Setting("carrier", _carrier, "udp", "udp, or tcp where UDP to the relay is blocked"),
    _keepalive("NAT's"),
    FLOW_IDLE,
    Setting("max_flows", _flow_count, 16384, "flows (service sockets) kept at once"),
    *INSPECT_SETTINGS,
]
EXPOSE = {s.name: s for s in EXPOSE_SETTINGS}


@dataclass(frozen=True)
class ExposeConfig:
    relay: object               # an addr.Destination
    service: tuple
    key: bytes | None
    path: str | None            # the file read, None from options
    carrier: str                # the rest as EXPOSE_SETTINGS says (and defaults)
    keepalive: float
    flow_idle: float
    max_flows: int
    control_socket: str | None
    metrics_listen: tuple | None


def _expose(values, where, log):
    """An ExposeConfig from checked values; ValueError on a problem."""
    for required in ("relay", "service"):
        if values.get(required) is None:
            raise ValueError(f"{required}: missing ({EXPOSE[required].help})")
    try:
        service = addr.parse_endpoint(values["service"])
    except ValueError as exc:
        raise ValueError(f"service: {exc}") from None
    rest = settled(EXPOSE_SETTINGS, values, only=("carrier", "keepalive", "flow_idle",
                                                  "max_flows") + INSPECT)
    kind = socket.SOCK_STREAM if rest["carrier"] == "tcp" else socket.SOCK_DGRAM
    relay = _destination("relay", values["relay"], kind)
    key = _key(values, where, log)
    return ExposeConfig(relay=relay, service=service, key=key, path=_path(where), **rest)


def _destination(name, text, kind):
    """An addr.Destination, resolved now if it can be: a name that cannot resolve for
    good is an error now; one that cannot just now (no network yet at boot) is the
    agent's to try again."""
    try:
        destination = addr.Destination(text, kind)
        destination.resolve()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    except addr.Unresolved:
        pass
    return destination


def _load_agent(path, settings, build, log):
    """Read and check one agent's file of top-level keys, and build its config with
    build(values, path, log); ConfigError names the file and the key."""
    problems = []
    values = check_settings(read_toml(path), settings, path, problems)
    raise_problems(problems)
    try:
        return build(values, path, log)
    except (ValueError, Fatal) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_expose(path, log=None):
    """Read and check an exposer's file (expose-NAME.toml)."""
    return _load_agent(path, EXPOSE, _expose, log)


def _agent_from_options(args, settings, build, log):
    """An agent's config from its command line, built by build(values, "options",
    log); UsageError names the option."""
    try:
        return build(option_values(args, settings), "options", log)
    except ValueError as exc:
        raise UsageError(in_option_words(str(exc), settings)) from None


def expose_from_options(args, log=None):
    return _agent_from_options(args, EXPOSE_SETTINGS, _expose, log)


# `udpmux punch` (one side of a punched path per file or command line)

def _port(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"expected a port, 0 to 65535, got {shown(value)}")
    return value


def _rendezvous(value):
    value = nonempty_text(value)
    if len(value.encode()) > wire.RENDEZVOUS_NAME_MAX:
        raise ValueError(f"expected at most {wire.RENDEZVOUS_NAME_MAX} bytes, got {shown(value)}")
    return value


PUNCH_SETTINGS = [
    Setting("peer", nonempty_text, None, "the other side's public address, HOST:PORT (direct mode)"),
    Setting("port", _port, 0, "the local UDP port to punch from (0: any)"),
    Setting("relay", nonempty_text, None, "a relay's rendezvous tunnel, HOST:PORT (brokered mode)"),
    Setting("rendezvous", _rendezvous, None, "the name both sides give the relay"),
    Setting("key_file", nonempty_text, None, "the key both sides (and the relay's tunnel) share"),
    Setting("insecure", boolean, False, "run without a key (direct mode only)"),
    Setting("forward", nonempty_text, None, "the local UDP service datagrams go to, HOST:PORT"),
    Setting("listen", nonempty_text, None, "where local UDP clients send, ADDR"),
    _keepalive("NATs'"),
    Setting("probe_ports", _probe_count, 256,
            "extra sockets and guessed ports against a symmetric NAT (0: none)"),
    Setting("retry", positive_number, 30.0, "seconds between direct attempts while relayed"),
    FLOW_IDLE,
    Setting("max_flows", _flow_count, 16384, "flows kept at once"),
    *INSPECT_SETTINGS,
]
PUNCH = {s.name: s for s in PUNCH_SETTINGS}


@dataclass(frozen=True)
class PunchConfig:
    key: bytes | None
    port: int                           # as PUNCH_SETTINGS says (and defaults)
    rendezvous: str | None
    keepalive: float
    probe_ports: int
    retry: float
    flow_idle: float
    max_flows: int
    control_socket: str | None
    metrics_listen: tuple | None
    path: str | None = None             # the file read, None from options
    peer: object = None                 # an addr.Destination; None: not this side's way
    relay: object = None
    forward: tuple | None = None
    listen: tuple | None = None


def _punch(values, where, log):
    """A PunchConfig from checked values; ValueError on a problem, in the words of the
    file's keys or, from the command line, of its options."""
    def n(name):
        return PUNCH[name].option if where == "options" else name
    if (values.get("peer") is None) == (values.get("relay") is None):
        raise ValueError(f"give either {n('peer')} (direct) or {n('relay')} and "
                         f"{n('rendezvous')} (brokered by a relay)")
    if values.get("relay") is not None and values.get("rendezvous") is None:
        raise ValueError(f"{n('rendezvous')}: missing (the name both sides give the relay)")
    if values.get("rendezvous") is not None and values.get("relay") is None:
        raise ValueError(f"{n('rendezvous')}: it is given to a relay; add {n('relay')}")
    if (values.get("forward") is None) == (values.get("listen") is None):
        raise ValueError(f"give either {n('forward')} (on the service's side) or "
                         f"{n('listen')} (on the clients' side)")
    if values.get("relay") is not None and values.get("insecure"):
        raise ValueError(f"{n('insecure')}: a relay's rendezvous tunnel needs a key")
    endpoints = {}
    for name in ("forward", "listen"):
        if values.get(name) is not None:
            try:
                endpoints[name] = addr.parse_endpoint(values[name], passive=name == "listen")
            except ValueError as exc:
                raise ValueError(f"{n(name)}: {exc}") from None
    for name in ("peer", "relay"):          # names resolved again when the agent starts
        if values.get(name) is not None:
            endpoints[name] = _destination(n(name), values[name], socket.SOCK_DGRAM)
    try:
        key = _key(values, where, log)
    except ValueError as exc:
        raise ValueError(str(exc).replace("key_file", n("key_file"))
                         .replace("insecure", n("insecure"))) from None
    rest = settled(PUNCH_SETTINGS, values, only=("port", "rendezvous", "keepalive",
                                                 "probe_ports", "retry", "flow_idle",
                                                 "max_flows") + INSPECT)
    return PunchConfig(key=key, path=_path(where), **endpoints, **rest)


def load_punch(path, log=None):
    """Read and check a punch file (punch-NAME.toml)."""
    return _load_agent(path, PUNCH, _punch, log)


def punch_from_options(args, log=None):
    return _agent_from_options(args, PUNCH_SETTINGS, _punch, log)
