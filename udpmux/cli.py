"""The command line: one docopt usage text per mode, which is also the man page's synopsis.

`udpmux MODE --help` prints that mode's text; `udpmux --help` prints every mode's
usage lines.  tests/test_docs.py fails when an option here is missing from man/udpmux.8.
"""

import difflib
import importlib
import logging
import os
import re
import sys

from docopt import DocoptExit, docopt

from udpmux import __version__
from udpmux.addr import format_endpoint
from udpmux.config import (
    EXPOSE as _EXPOSE, GLOBAL as _GLOBAL, LINK as _LINK, PUNCH as _PUNCH, TUNNEL as _TUNNEL,
    UOT as _UOT, control_socket_path,
)
from udpmux.errors import (
    EXIT_OK, EXIT_OSERR, EXIT_SOFTWARE, EXIT_USAGE, ConfigError, Fatal, UsageError,
)
from udpmux.settings import default_text


def _d(name):
    return default_text(_TUNNEL[name])


def _e(name):
    return default_text(_EXPOSE[name])


def _l(name):
    return default_text(_LINK[name])


def _mib(name):
    return f"{_LINK[name].default >> 20}M"


def _p(name):
    return default_text(_PUNCH[name])


RELAY = f"""\
udpmux relay: the public end of reverse tunnels.  Outside clients send UDP to a
tunnel's public port; the relay passes each client's datagrams, tagged, to the
exposer registered on that tunnel, and the exposer's replies back to the client.

Usage:
  udpmux relay -c FILE [--debug]
  udpmux relay --public ADDR [--register ADDR] (--key-file FILE | --insecure) [--debug] [options]
  udpmux relay -h | --help

Options:
  -c FILE, --config FILE      Tunnels from a TOML file (see udpmux.conf(5)).
  --public ADDR               One tunnel: the UDP address clients send to, e.g.
                              0.0.0.0:51820.
  --register ADDR             Where the exposer registers; the public socket if not given.
  --key-file FILE             The tunnel's key, shared with the exposer ("-": standard
                              input).
  --insecure                  No key: any host may register as the exposer.
  --previous-key-file FILE    A key being rotated out: exposers that still have it are
                              welcomed under it (see KEYS in udpmux(8)).
  --mode MODE                 expose, or rendezvous: where punch peers meet
                              [default: {_d("mode")}].
  --no-tcp                    Accept exposers over UDP only, not also over TCP at the
                              register address.
  --name NAME                 The tunnel's name in logs and status [default: tunnel].
  --max-flows N               Flows kept at once; the idlest goes first
                              [default: {_d("max_flows")}].
  --flow-idle SECONDS         A flow without datagrams this long ends
                              [default: {_d("flow_idle")}].
  --exposer-timeout SECONDS   Without a word from the exposer this long, the tunnel is down
                              [default: {_d("exposer_timeout")}].
  --new-flows-rate N          New flows accepted per second on the tunnel
                              [default: {_d("new_flows_rate")}].
  --new-flows-per-source N    New flows accepted per second from one client IP address
                              [default: {_d("new_flows_per_source")}].
  --max-sources N             Client IP addresses whose rate is tracked at once
                              [default: {_d("max_sources")}].
  --allow NETS                Only clients in these networks start flows, comma-separated,
                              e.g. 203.0.113.0/24,2001:db8::/32 (default: any client).
  --deny NETS                 Clients in these networks may not start flows.
  --control-socket PATH       Where `udpmux status` finds the relay (default: see
                              udpmux(8)).
  --metrics-listen ADDR       Serve Prometheus metrics over HTTP here, e.g.
                              127.0.0.1:9478.
  --debug                     Log every flow and session event.
  -h, --help                  Show this text.
"""

EXPOSE = f"""\
udpmux expose: make a UDP service behind NAT reachable through a relay.  Registers
with the relay (authenticated keepalives hold the NAT mapping open) and opens one UDP
socket towards the service for each outside client, so the service sees one source
port per client.

Usage:
  udpmux expose -c FILE [--debug]
  udpmux expose --relay HOST:PORT --service HOST:PORT (--key-file FILE | --insecure) [--debug] [options]
  udpmux expose -h | --help

Options:
  -c FILE, --config FILE      Settings from a TOML file (see udpmux.conf(5)).
  --relay HOST:PORT           The relay's register address.
  --service HOST:PORT         The UDP service to expose, e.g. 127.0.0.1:51820.
  --key-file FILE             The tunnel's key, shared with the relay ("-": standard input).
  --insecure                  No key (the relay must run with --insecure too).
  --carrier KIND              udp, or tcp where UDP to the relay is blocked
                              [default: {_e("carrier")}].
  --keepalive SECONDS         Keepalive interval; below the NAT's UDP timeout
                              [default: {_e("keepalive")}].
  --flow-idle SECONDS         A flow without datagrams this long ends
                              [default: {_e("flow_idle")}].
  --max-flows N               Flows (service sockets) kept at once
                              [default: {_e("max_flows")}].
  --control-socket PATH       Where `udpmux status` finds this one (default: see
                              udpmux(8)).
  --metrics-listen ADDR       Serve Prometheus metrics over HTTP here, e.g.
                              127.0.0.1:9479.
  --debug                     Log every flow and session event.
  -h, --help                  Show this text.
"""

LINK = f"""\
udpmux link: a reliable stream over UDP that survives loss, roaming and sleep.  Made
for ssh's ProxyCommand: starts its server end over ssh, then carries standard input and
output to a TCP target on the server's side.

Usage:
  udpmux link [options] DEST
  udpmux link -h | --help

Options:
  -t HOST:PORT, --target HOST:PORT
                              The TCP service, as the server sees it
                              [default: {_l("target")}].
  -b RANGE, --bind RANGE      The server's UDP port, or a MIN-MAX range to pick from
                              [default: {_l("bind")}].
  --listen-tcp ADDR           Accept local TCP connections here, each its own stream,
                              instead of using standard input and output.
  --ssh-command CMD           The ssh that starts the server end [default: ssh].
  --server-command CMD        How the server runs udpmux [default: udpmux].
  --server-address HOST       Send to this address of the server instead of the one ssh
                              reached (a server behind a port forward or a jump host).
  --packet-size BYTES         Largest UDP payload sent, header and MAC included
                              [default: {_l("packet_size")}].
  --idle-limit SECONDS        Give up after this long without a word from the other end
                              [default: {_l("idle_limit")}].
  --linger SECONDS            After the local side closed, how long to wait for the rest
                              to be acknowledged [default: {_l("linger")}].
  --buffer BYTES              Memory for the streams' bytes, each way and at each end:
                              a stream's window grows with the path's bandwidth-delay
                              product up to it; K, M or G multiply [default: {_mib("buffer")}].
  --congestion NAME           The congestion controller of both ends: bbr, which tells
                              random loss from congestion, or newreno
                              [default: {_l("congestion")}].
  --control-socket PATH       Where `udpmux status` finds this link (default: see
                              udpmux(8)).
  --debug                     Log both ends' session events.
  -h, --help                  Show this text.
"""

LINK_SERVER = f"""\
udpmux link-server: the server end of `udpmux link`, started by it over ssh.  Reads
the session key on standard input, prints the address and port it bound, leaves the
ssh session, and serves one session.

Usage:
  udpmux link-server [options]
  udpmux link-server -h | --help

Options:
  -t HOST:PORT, --target HOST:PORT
                              The TCP service to connect streams to
                              [default: {_l("target")}].
  -b RANGE, --bind RANGE      The UDP port, or a MIN-MAX range to pick from
                              [default: {_l("bind")}].
  --packet-size BYTES         Largest UDP payload sent [default: {_l("packet_size")}].
  --idle-limit SECONDS        Exit after this long without the client
                              [default: {_l("idle_limit")}].
  --buffer BYTES              Memory for the streams' bytes, each way
                              [default: {_mib("buffer")}].
  --congestion NAME           bbr or newreno [default: {_l("congestion")}].
  --debug                     Log session events to standard error (through ssh).
  -h, --help                  Show this text.
"""

PUNCH = f"""\
udpmux punch: a direct UDP path between two hosts behind NAT, with a rendezvous relay
as broker and as fallback.  One side forwards to a local UDP service, the other listens
for local UDP clients.

Usage:
  udpmux punch -c FILE [--debug]
  udpmux punch --peer HOST:PORT --port PORT (--key-file FILE | --insecure) (--forward HOST:PORT | --listen ADDR) [--debug] [options]
  udpmux punch --relay HOST:PORT --rendezvous NAME --key-file FILE (--forward HOST:PORT | --listen ADDR) [--debug] [options]
  udpmux punch --once --peer HOST:PORT --port PORT [--debug]
  udpmux punch -h | --help

Options:
  -c FILE, --config FILE      Settings from a TOML file (see udpmux.conf(5)).
  --peer HOST:PORT            The other host's public address.
  --port PORT                 The local UDP port to punch from (0: any)
                              [default: {_p("port")}].
  --relay HOST:PORT           A relay's rendezvous tunnel: it brokers the meeting and
                              carries the datagrams while no direct path works.
  --rendezvous NAME           The name both sides give the relay.
  --key-file FILE             The key both sides (and the relay's tunnel) share ("-":
                              standard input).
  --insecure                  No key.
  --forward HOST:PORT         Pass datagrams to this local UDP service.
  --listen ADDR               Accept datagrams from local UDP clients here.
  --once                      Send a few probes from --port and exit, leaving the hole
                              for another program.
  --keepalive SECONDS         Keepalive interval [default: {_p("keepalive")}].
  --probe-ports N             Sockets and guessed ports for symmetric NATs (0: none)
                              [default: {_p("probe_ports")}].
  --retry SECONDS             While relayed, try a direct path again this often
                              [default: {_p("retry")}].
  --flow-idle SECONDS         A flow without datagrams this long ends
                              [default: {_p("flow_idle")}].
  --max-flows N               Flows kept at once [default: {_p("max_flows")}].
  --control-socket PATH       Where `udpmux status` finds this one (default: see
                              udpmux(8)).
  --metrics-listen ADDR       Serve Prometheus metrics over HTTP here, e.g.
                              127.0.0.1:9479.
  --debug                     Log every punch attempt.
  -h, --help                  Show this text.
"""

def _u(name):
    return default_text(_UOT[name])


UOT_SERVER = f"""\
udpmux uot-server: carry UDP datagrams over TCP, the end next to the UDP service.

Usage:
  udpmux uot-server -c FILE [--debug]
  udpmux uot-server --listen ADDR --target HOST:PORT (--key-file FILE | --insecure) [--debug] [options]
  udpmux uot-server -h | --help

Options:
  -c FILE, --config FILE      Settings from a TOML file (see udpmux.conf(5)).
  --listen ADDR               The TCP address uot-clients connect to.
  --target HOST:PORT          The UDP service.
  --key-file FILE             The key shared with clients ("-": standard input).
  --insecure                  No key.
  --previous-key-file FILE    A key being rotated out: clients that still have it are
                              welcomed under it (see KEYS in udpmux(8)).
  --flow-idle SECONDS         A flow without datagrams this long ends
                              [default: {_u("flow_idle")}].
  --max-flows N               Flows (UDP sockets towards the target) kept at once, all
                              connections together [default: {_u("max_flows")}].
  --max-clients N             Connections served at once [default: {_u("max_clients")}].
  --control-socket PATH       Where `udpmux status` finds this one (default: see
                              udpmux(8)).
  --metrics-listen ADDR       Serve Prometheus metrics over HTTP here, e.g.
                              127.0.0.1:9479.
  --debug                     Log every connection and flow event.
  -h, --help                  Show this text.
"""

UOT_CLIENT = f"""\
udpmux uot-client: carry UDP datagrams over TCP, the end next to the UDP clients.

Usage:
  udpmux uot-client -c FILE [--debug]
  udpmux uot-client --listen ADDR --server HOST:PORT (--key-file FILE | --insecure) [--debug] [options]
  udpmux uot-client -h | --help

Options:
  -c FILE, --config FILE      Settings from a TOML file (see udpmux.conf(5)).
  --listen ADDR               The UDP address local clients send to.
  --server HOST:PORT          The uot-server's TCP address.
  --key-file FILE             The key shared with the server ("-": standard input).
  --insecure                  No key.
  --flow-idle SECONDS         A flow without datagrams this long ends
                              [default: {_u("flow_idle")}].
  --max-flows N               Flows (local client addresses) kept at once; the idlest
                              goes first [default: {_u("max_flows")}].
  --control-socket PATH       Where `udpmux status` finds this one (default: see
                              udpmux(8)).
  --metrics-listen ADDR       Serve Prometheus metrics over HTTP here, e.g.
                              127.0.0.1:9479.
  --debug                     Log every connection and flow event.
  -h, --help                  Show this text.
"""

STATUS = """\
udpmux status: show a running relay's tunnels, flows and counters, or an agent's
peers, flows and counters (expose, punch, uot-server, uot-client, link).

Usage:
  udpmux status [--json] [--flows TUNNEL] [--control-socket PATH]
  udpmux status -h | --help

Options:
  --json                      Print JSON instead of a table.
  --flows TUNNEL              List one tunnel's flows.
  --control-socket PATH       The daemon's control socket (default: the relay's if one
                              answers, else the one agent's that does; see udpmux(8)).
  -h, --help                  Show this text.
"""

CHECK = """\
udpmux check: check a configuration file before it is used, as nginx -t does.

Usage:
  udpmux check -c FILE [--mode MODE]
  udpmux check -h | --help

Options:
  -c FILE, --config FILE      A relay's file (udpmux.conf(5)), an exposer's, punch's,
                              a uot-server's or a uot-client's.
  --mode MODE                 relay, expose, punch, uot-server or uot-client, when the
                              file's keys do not tell.
  -h, --help                  Show this text.

The file is read as the mode would read it at start or on SIGHUP: its key files
read and its names resolved.  Exit status 0 when it is good, with one line saying
what it holds; 78 with every problem found, a line each.
"""

KEYGEN = """\
udpmux keygen: write a new random key to FILE (mode 0600), or to standard output for "-".

Usage:
  udpmux keygen [--force] FILE
  udpmux keygen -h | --help

Options:
  --force                     Replace FILE if it exists.
  -h, --help                  Show this text.
"""

DEMO = """\
udpmux demo: run a relay, an exposer and a UDP echo service on loopback, send traffic
through them as clients would, print the relay's status and exit 0 if every datagram
came back.

Usage:
  udpmux demo [--clients N] [--datagrams N] [--debug]
  udpmux demo -h | --help

Options:
  --clients N                 Outside clients, each with its own flow [default: 20].
  --datagrams N               Datagrams each client sends [default: 50].
  --debug                     Show the relay's and the exposer's logs.
  -h, --help                  Show this text.
"""


class Mode:
    def __init__(self, name, doc, summary, entry):
        self.name = name
        self.doc = doc
        self.summary = summary
        self.entry = entry      # "module:function" that runs the mode


MODES = {m.name: m for m in [
    Mode("relay", RELAY, "run the public relay: tunnels from a config file, or one from options",
         "udpmux.relay:main"),
    Mode("expose", EXPOSE, "make a UDP service behind NAT reachable through a relay",
         "udpmux.expose:main"),
    Mode("link", LINK, "a reliable stream over UDP for ssh's ProxyCommand and local TCP listeners",
         "udpmux.linkstart:main"),
    Mode("link-server", LINK_SERVER, "the server end of link, started by link over ssh",
         "udpmux.linkstart:server_main"),
    Mode("punch", PUNCH, "punch a direct UDP path through NAT between two hosts",
         "udpmux.punch:main"),
    Mode("uot-server", UOT_SERVER, "carry UDP over TCP: the end next to the UDP service",
         "udpmux.uot:server_main"),
    Mode("uot-client", UOT_CLIENT, "carry UDP over TCP: the end next to the UDP clients",
         "udpmux.uot:client_main"),
    Mode("status", STATUS, "show a running relay or agent: peers, flows, counters",
         "udpmux.status:main"),
    Mode("check", CHECK, "check a configuration file before using it",
         "udpmux.cli:check"),
    Mode("keygen", KEYGEN, "write a new random key file", "udpmux.cli:keygen"),
    Mode("demo", DEMO, "run a relay, an exposer and an echo service on loopback",
         "udpmux.demo:main"),
]}


def usage_lines(doc):
    """The pattern lines of a docopt text's Usage: section, without -h/--help."""
    lines = doc.split("Usage:", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    return [line.strip() for line in lines if "-h | --help" not in line]


def main_doc():
    patterns = "\n".join("  " + line for m in MODES.values() for line in usage_lines(m.doc))
    summaries = "\n".join(f"  {m.name:<12} {m.summary}" for m in MODES.values())
    return f"""\
udpmux {__version__}: carry UDP and TCP flows through NAT, firewalls and lossy links.

Usage:
{patterns}
  udpmux -h | --help
  udpmux --version

Modes:
{summaries}

`udpmux MODE --help` shows a mode's options; man udpmux(8) tells everything.
Exit status: 0 ok; 1 the job failed; 64 bad command line; 65 bad key file;
66 missing input; 70 internal error; 71 the system refused (bind, fork,
write); 77 permission denied; 78 bad configuration.
"""


OPTION_WORD = r"(?<![\w-])--?[\w-]+"      # an option in a usage line, not a hyphen in a name


# The settings that a mode's -c FILE holds: an option given with -c is named, with the
# key to set in the file instead.
FILE_SETTINGS = {"relay": [_TUNNEL, _GLOBAL], "expose": [_EXPOSE], "punch": [_PUNCH],
                 "uot-server": [_UOT], "uot-client": [_UOT]}


def takes_value(doc):
    """The options of a docopt text that take a value (`--name NAME`, `-c FILE`)."""
    return set(re.findall(r"(--?[\w-]+)[ =][A-Z]", doc))


def _and(words):
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def given_options(doc, argv):
    """The options in argv, in order, each once, by the name the Options: section gives
    first (-c for --config); the values of options that take one are skipped."""
    valued = takes_value(doc)
    alias = {long: short for short, long in
             re.findall(r"^\s*(-\w)[ =]\S+, (--[\w-]+)", doc, re.M)}
    given, skip = [], False
    for word in argv:
        if skip or not word.startswith("-") or word == "-":
            skip = False
            continue
        name = word.split("=")[0]
        if len(name) > 2 and name[1] != "-":        # -cFILE
            name = name[:2]
        else:
            skip = name in valued and "=" not in word
        name = alias.get(name, name)
        if name not in given:
            given.append(name)
    return given


def config_clash(mode, doc, argv):
    """What is wrong when options come with -c/--config: which ones, and what to set in
    the file instead; None when -c is not given or nothing else clashes with it."""
    given = given_options(doc, argv)
    file_form = [line for line in usage_lines(doc) if re.search(r"(?<![\w-])-c FILE", line)]
    if "-c" not in given or not file_form:
        return None
    allowed = set(re.findall(OPTION_WORD, file_form[0])) | {"-h", "--help"}
    clash = [word for word in given if word not in allowed]
    if not clash:
        return None
    settings = {}
    for table in FILE_SETTINGS.get(mode, []):
        settings.update({s.option: s.name for s in table.values()})
    valued = takes_value(doc)
    keys, hints = [], []
    for word in clash:
        if word in settings:
            keys.append(settings[word] if word in valued else f"{settings[word]} = true")
        elif word.startswith("--no-") and "--" + word[5:] in settings:
            keys.append(f"{settings['--' + word[5:]]} = false")
        elif word == "--name" and mode == "relay":
            hints.append("the file names each tunnel: [tunnels.NAME]")
    if keys:
        hints.insert(0, f"set {_and(keys)} in the file")
    return f"{_and(clash)} cannot be given with -c/--config" \
        + (f" ({'; '.join(hints)})" if hints else "")


def diagnose(doc, argv, exc, mode=None):
    """Say what is wrong with a command line that docopt refused, in one phrase."""
    message = str(exc)
    first = message.splitlines()[0] if message else ""
    if first and not first.startswith(("Warning: found unmatched", "Usage:")):
        return first
    known = set(re.findall(r"(?<![\w-])(--?[\w-]+)", doc))
    for word in argv:
        name = word.split("=")[0] if word.startswith("--") else word[:2]   # -cFILE
        if word.startswith("-") and word != "-" and name not in known:
            return f"unknown option {name}"
    clash = config_clash(mode, doc, argv)
    if clash:
        return clash
    valued = takes_value(doc)
    words = [w for i, w in enumerate(argv)
             if not w.startswith("-") and not (i and argv[i - 1] in valued)]
    if first.startswith("Warning: found unmatched"):
        for extra in re.findall(r"Argument\(None, '([^']*)'\)", first):
            if extra in words:
                return f"unexpected argument {extra!r}"
    given = {word.split("=")[0] for word in argv if word.startswith("-")}
    best = best_score = None
    for line in usage_lines(doc):
        required = re.sub(r"\[[^\]]*\]", "", line)
        required = re.sub(r"(--?[\w-]+) [A-Z][A-Z:_-]*", r"\1", required)
        positionals = re.findall(r"(?<![\w-])[A-Z][A-Z_]+(?![\w:-])", required)
        groups = [re.findall(OPTION_WORD, g) for g in re.findall(r"\(([^)]*)\)", required)]
        singles = re.findall(OPTION_WORD, re.sub(r"\([^)]*\)", "", required))
        missing = [s for s in singles if s not in given]
        missing += [" or ".join(g) for g in groups if not given & set(g)]
        missing += positionals[len(words):]
        # The form that uses most of what was given, then the one that lacks least.
        score = (-len(given & set(re.findall(OPTION_WORD, line))), len(missing))
        if best is None or score < best_score:
            best, best_score = missing, score
    if best:
        return "missing " + ", ".join(best)
    return "these options do not go together"


CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def error(message, status):
    """One line on standard error, even when the message quotes a name with a newline."""
    message = CONTROL.sub(lambda m: repr(m.group())[1:-1], message)
    print(f"udpmux: {message}", file=sys.stderr)
    return status


def main(argv=None):
    try:
        status = _main(sys.argv[1:] if argv is None else list(argv))
        if sys.stdout is not None:
            sys.stdout.flush()      # now, so that a failure is reported and not lost at exit
        return status
    except BrokenPipeError:
        # The reader went away (`udpmux punch --help | head`): it read all it wanted.
        _stdout_to_devnull()
        return EXIT_OK
    except OSError as exc:          # standard output is a full disk, /dev/full, EIO
        _stdout_to_devnull()
        return error(f"cannot write to standard output: {exc.strerror or exc}", EXIT_OSERR)


def _stdout_to_devnull():
    """What stays buffered for standard output would fail again at exit: let it go."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# Options that several modes share, checked before the mode runs, so that each mode
# meets them in the same words (`udpmux status` as much as `udpmux relay`).
COMMON_CHECKS = {"--control-socket": control_socket_path}


def _main(argv):
    if not argv:
        print(main_doc().split("\nModes:")[0], file=sys.stderr)
        return error("which mode?  `udpmux --help` lists them", EXIT_USAGE)
    if argv[0] in ("-h", "--help"):
        print(main_doc(), end="")
        return EXIT_OK
    if argv[0] == "--version":
        print(f"udpmux {__version__}")
        return EXIT_OK
    mode = MODES.get(argv[0])
    if mode is None:
        close = difflib.get_close_matches(argv[0], MODES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"modes: {', '.join(MODES)}"
        return error(f"unknown mode {argv[0]!r}; {hint}", EXIT_USAGE)
    try:
        args = docopt(mode.doc, argv)
    except DocoptExit as exc:
        print(mode.doc.split("Options:")[0].split("\n\n", 1)[1].strip(), file=sys.stderr)
        return error(f"{mode.name}: {diagnose(mode.doc, argv[1:], exc, mode.name)}; "
                     f"`udpmux {mode.name} --help` explains", EXIT_USAGE)
    for option, check in COMMON_CHECKS.items():
        if args.get(option):
            try:
                check(args[option])
            except ValueError as exc:
                return error(f"{mode.name}: {option}: {exc}", EXIT_USAGE)
    module, _, function = mode.entry.partition(":")
    run = getattr(importlib.import_module(module), function)
    try:
        return run(args) or EXIT_OK
    except Fatal as exc:
        return error(f"{mode.name}: {exc}", exc.status)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`udpmux status | head`): what it read is all it wanted.
        _stdout_to_devnull()
        return EXIT_OK
    except Exception:       # a bug: say so, with the traceback an issue report needs
        logging.getLogger("udpmux").exception("internal error; please report it")
        return EXIT_SOFTWARE


def check_file(path, mode=None):
    """Read and check a configuration file of any mode (the relay's, expose's, punch's,
    uot-server's or uot-client's; by its keys, unless `mode` says): a sentence saying
    what it holds, or ConfigError with every problem found."""
    from udpmux import config
    if mode is None:
        keys = set(config.read_toml(path))
        mode = "relay" if "tunnels" in keys else "expose" if "service" in keys else \
            "uot-server" if "target" in keys else "uot-client" if "server" in keys else \
            "punch" if {"rendezvous", "peer", "forward", "listen"} & keys else None
        if mode is None:
            raise ConfigError(f"{path}: neither a relay's (no [tunnels.NAME]), an exposer's "
                              "(no service), a uot-server's (no target), a uot-client's (no "
                              "server) nor punch's file; give --mode")
    if mode == "relay":
        tunnels = sorted(config.load(path).tunnels)
        return f"{path}: a relay with {len(tunnels)} tunnel" \
               f"{'s' if len(tunnels) != 1 else ''}: {', '.join(tunnels)}"
    if mode == "expose":
        expose = config.load_expose(path)
        return f"{path}: expose {format_endpoint(*expose.service)} through the relay at " \
               f"{expose.relay}"
    if mode in ("uot-server", "uot-client"):
        uot = config.load_uot(path, mode == "uot-server")
        peer = format_endpoint(*uot.peer) if mode == "uot-server" else uot.peer
        return f"{path}: {mode} at {format_endpoint(*uot.listen)} for {peer}"
    punch = config.load_punch(path)
    return f"{path}: punch " + (f"with the relay at {punch.relay}" if punch.relay
                                else f"towards {punch.peer}")


CHECK_MODES = ("relay", "expose", "punch", "uot-server", "uot-client")


def check(args):
    mode = args["--mode"]
    if mode not in (None, *CHECK_MODES):
        raise UsageError(f"--mode: expected {_or(CHECK_MODES)}, got {mode!r}")
    try:
        print(check_file(args["--config"], mode))
    except ConfigError as exc:
        for problem in exc.problems:
            error(f"check: {problem}", exc.status)
        return exc.status
    return EXIT_OK


def _or(words):
    return ", ".join(words[:-1]) + " or " + words[-1]


def keygen(args):
    from udpmux.auth import write_key_file
    write_key_file(args["FILE"], force=args["--force"])
    return EXIT_OK
