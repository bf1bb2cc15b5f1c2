"""The documentation against the code it describes.

man/udpmux.8 must list every mode's usage lines (SYNOPSIS) and options with their
defaults (one subsection per mode) and every exit status of udpmux/errors.py;
man/udpmux.conf.5 every configuration key with its type and default;
man/udpmux-protocol.7 every drop reason the code counts, test vectors that the
code reproduces, and the limits, protocol errors and RESET reasons of the stream
engine as `udpmux link` runs it; conf/relay.toml must load and use every key.  The
pages must pass `mandoc -T lint` and render.

The mdoc source is read with a small interpreter of the few macros these pages use
in list heads and bodies (Fl, Ar, Cm, Ns, ...); the SYNOPSIS is checked as mandoc or
groff renders it.
"""

import os
import re
import shutil
import socket
import subprocess
import types
from fractions import Fraction
from pathlib import Path
from unittest import mock

import pytest

try:
    import tomllib
except ModuleNotFoundError:            # Python 3.10
    import tomli as tomllib

from udpmux import (
    addr, auth, carrier, cli, config, endpoint, errors, link, linkstart, probes, punch, relay,
    session, settings, stream, uot, wire,
)

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "man"
PAGES = ["udpmux.8", "udpmux.conf.5", "udpmux-protocol.7"]
EXAMPLE = REPO / "conf" / "relay.toml"

# Exit statuses the page may list beyond errors.py: cli.main() returns 130 when
# SIGINT arrives before the mode handles it.
EXTRA_EXIT_STATUSES = {130}


# -- reading mdoc source

def page(name):
    return (MAN / name).read_text()


def blocks(src, macro):
    """{title: [lines]} for each `.Sh` or `.Ss` block of src (up to the next one of
    the same macro, or for .Ss also the next .Sh)."""
    stops = (".Sh ",) if macro == ".Sh" else (".Sh ", ".Ss ")
    out, title = {}, None
    for line in src.splitlines():
        if line.startswith(stops):
            title = line[4:].strip() if line.startswith(macro + " ") else None
            if title is not None:
                out[title] = []
            continue
        if title is not None:
            out[title].append(line)
    return out


MACROS = {"Fl", "Ar", "Cm", "Ic", "Li", "Dq", "Qq", "Ql", "Pq", "Op", "Bq", "Sq", "Ns",
          "No", "Va", "Dv", "Ev", "Pa", "Sy", "Em", "Xr", "Nm", "Sx", "It", "Ta", "Ms"}
CLOSING = {",", ".", ";", ":", ")", "]", "?", "!"}


def text_of(line):
    """The text that an mdoc line shows, without fonts and enclosures."""
    line = line.replace("\\&", "").replace("\\-", "-").replace("\\e", "\\")
    if not line.startswith("."):
        return line
    words, flag, glue = [], False, False
    for token in re.findall(r'"[^"]*"|\S+', line[1:]):
        token = token.strip('"')
        if token in MACROS:
            if token == "Ns":
                glue = True
            else:
                flag = token == "Fl"
            continue
        word = "-" + token if flag and token != "|" and token not in CLOSING else token
        if (token in CLOSING or glue) and words:
            words[-1] += word
        else:
            words.append(word)
        glue = False
    return " ".join(words)


def normal(text):
    return re.sub(r"\s+", " ", text).strip()


def items(lines):
    """[(head, body)] of every `.It` in lines: head and body as text."""
    out = []
    for line in lines:
        if line.startswith(".It"):
            out.append([text_of(line), []])
        elif line.startswith((".El", ".Bl")):
            continue
        elif out:
            out[-1][1].append(text_of(line))
    return [(normal(head), normal(" ".join(body))) for head, body in out]


# -- rendering

def render_cmd(path):
    """mandoc, or groff where mandoc is missing: both render these pages alike."""
    if shutil.which("mandoc"):
        return ["mandoc", "-T", "ascii", str(path)]
    if shutil.which("groff"):
        return ["groff", "-mandoc", "-Tascii", "-P-c", str(path)]
    return None


def render(name):
    cmd = render_cmd(MAN / name)
    if cmd is None:
        pytest.skip("neither mandoc nor groff is installed: apt-get install mandoc")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return re.sub(r".\x08", "", done.stdout)


# -- the docopt texts

def docopt_options(doc):
    """[(spec, default or None)] of the Options: section, e.g. ("-c FILE, --config FILE", None)."""
    entries = []            # [option spec, its description with its continuation lines]
    for line in doc.split("Options:", 1)[1].splitlines():
        m = re.match(r"\s*(-\S.*?)(?:\s{2,}|$)", line)
        if m:
            entries.append([m.group(1), line[m.end():]])
        elif entries and line.startswith("      "):
            entries[-1][1] += " " + line.strip()
    out = []
    for spec, description in entries:
        default = re.search(r"\[default: ([^\]]*)\]", description)
        out.append((spec, default.group(1) if default else None))
    return out


def main_usage_lines():
    text = cli.main_doc()
    return [line.strip() for line in
            text.split("Usage:", 1)[1].split("\n\n", 1)[0].strip().splitlines()]


def mode_sections():
    subs = blocks(page("udpmux.8"), ".Ss")
    return {name: subs.get(f"udpmux {name}") for name in cli.MODES}


# -- (a) every option of every mode, with its default

@pytest.mark.parametrize("mode", list(cli.MODES))
def test_every_option_is_in_its_mode_section(mode):
    lines = mode_sections()[mode]
    assert lines is not None, f"man/udpmux.8 has no `.Ss udpmux {mode}` subsection"
    documented = dict(items(lines))
    options = docopt_options(cli.MODES[mode].doc)
    assert options, f"no options parsed from {mode}'s docopt text"
    for spec, default in options:
        assert spec in documented, f"udpmux {mode}: option {spec!r} is not in man/udpmux.8"
        if default is not None:
            want = f"The default is {default}."
            assert want in documented[spec], \
                f"udpmux {mode}: {spec}: the page does not say {want!r}"
    stale = set(documented) - {spec for spec, _ in options}
    assert not stale, f"udpmux {mode}: the page documents options the mode lacks: {stale}"


# -- (b) the SYNOPSIS is the usage text

def test_synopsis_has_every_usage_line_in_order():
    text = render("udpmux.8")
    synopsis = text.split("SYNOPSIS", 1)[1].split("\nDESCRIPTION", 1)[0]
    shown = [normal(entry) for entry in re.split(r"(?=\budpmux )", normal(synopsis)) if entry]
    expected = main_usage_lines()
    assert len(expected) > 10
    missing = [line for line in expected if line not in shown]
    assert not missing, f"usage lines missing from the SYNOPSIS: {missing}"
    assert shown == expected, "the SYNOPSIS differs from `udpmux --help`'s usage lines"


# -- (c) every configuration key, its type and its default

TYPES = {settings.positive_int: {"integer"}, settings.positive_number: {"number"},
         settings.boolean: {"boolean"}, settings.nonempty_text: {"string", "address"},
         config._carrier: {"string"}, config._mode: {"string"}, config._port: {"integer"},
         config._rendezvous: {"string"},
         config._probe_count: {"integer"},
         config._flow_count: {"integer"}, config._networks: {"array"},
         config.control_socket_path: {"string"}, config._metrics_endpoint: {"address"}}


def default_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@pytest.mark.parametrize("group,settings", [("Global settings", config.GLOBAL_SETTINGS),
                                            ("Tunnel settings", config.TUNNEL_SETTINGS),
                                            ("Exposer settings", config.EXPOSE_SETTINGS),
                                            ("Punch settings", config.PUNCH_SETTINGS),
                                            ("uot settings", config.UOT_SETTINGS)])
def test_every_config_key_and_default_is_in_the_conf_page(group, settings):
    lines = blocks(page("udpmux.conf.5"), ".Ss").get(group)
    assert lines is not None, f"man/udpmux.conf.5 has no `.Ss {group}`"
    documented = {}
    for head, body in items(lines):
        key, _, kind = head.partition(" ")
        documented[key] = (kind, body)
    assert settings
    for setting in settings:
        assert setting.name in documented, f"{group}: {setting.name} is not in udpmux.conf.5"
        kind, body = documented[setting.name]
        assert kind in TYPES[setting.check], f"{setting.name}: documented as {kind!r}"
        if setting.default is None:
            assert "Required" in body or "The default is" in body, \
                f"{setting.name}: the page says neither that it is required nor its default"
        else:
            want = f"The default is {default_text(setting.default)}."
            assert want in body, f"{setting.name}: the page does not say {want!r}"
    stale = set(documented) - {s.name for s in settings}
    assert not stale, f"{group}: the page documents keys config.py lacks: {stale}"


# -- (d) every drop reason the code counts

def code_drop_reasons():
    reasons = {}
    for path in sorted((REPO / "udpmux").glob("*.py")):
        src = path.read_text()
        for m in re.finditer(r'^(R_[A-Z0-9_]+)\s*=\s*"([^"]+)"', src, re.M):
            reasons[m.group(2)] = f"{path.name}: {m.group(1)}"
        for m in re.finditer(r'\b(?:drop|Drop|Malformed)\(\s*"([^"]+)"', src):
            reasons[m.group(1)] = f"{path.name}: a literal"
    return reasons


def test_every_drop_reason_is_in_the_protocol_page():
    lines = blocks(page("udpmux-protocol.7"), ".Sh").get("DROP REASONS")
    assert lines is not None, "udpmux-protocol.7 has no DROP REASONS section"
    documented = {head for head, _ in items(lines)}
    reasons = code_drop_reasons()
    assert {"short", "mac", "replay", "no-exposer"} <= set(reasons)
    missing = {r: where for r, where in reasons.items() if r not in documented}
    assert not missing, f"drop reasons missing from udpmux-protocol.7: {missing}"
    stale = documented - set(reasons)
    assert not stale, f"udpmux-protocol.7 lists reasons the code never counts: {stale}"


# -- (e) every exit status

def test_every_exit_status_is_in_exit_status():
    lines = blocks(page("udpmux.8"), ".Sh").get("EXIT STATUS")
    assert lines is not None, "udpmux.8 has no EXIT STATUS section"
    documented = {head for head, _ in items(lines)}
    statuses = {value for name, value in vars(errors).items()
                if name.startswith("EXIT_") and isinstance(value, int)}
    assert len(statuses) >= 10
    missing = {s for s in statuses if str(s) not in documented}
    assert not missing, f"exit statuses missing from udpmux.8: {sorted(missing)}"
    stale = {d for d in documented if not d.isdigit()
             or int(d) not in statuses | EXTRA_EXIT_STATUSES}
    assert not stale, f"udpmux.8 lists exit statuses the code never uses: {stale}"


def statuses_told(text):
    """The exit statuses that prose tells: "exits with status 0", "exit 0 if ...", "The
    exit status is 0, or 1 if ...; 66 if ..."."""
    told = re.findall(r"\bstatus (\d+)\b", text) + re.findall(r"\bexits? (\d+)\b", text)
    for m in re.finditer(r"\bexit status is ([^.]*)", text):
        told += re.findall(r"(?:^|[;,] (?:or )?)(\d+)\b", m.group(1))
    return {int(n) for n in told}


def test_every_status_told_anywhere_is_one_the_code_uses():
    """Not only EXIT STATUS: a mode's section, the other pages and the usage texts."""
    statuses = {value for name, value in vars(errors).items()
                if name.startswith("EXIT_") and isinstance(value, int)}
    texts = {name: normal(" ".join(text_of(line) for line in page(name).splitlines()))
             for name in PAGES}
    texts.update({f"udpmux {m.name} --help": normal(m.doc) for m in cli.MODES.values()})
    texts["udpmux --help"] = normal(cli.main_doc())
    told = {name: statuses_told(text) for name, text in texts.items()}
    assert {0, 1, 64, 66, 71, 78} <= set().union(*told.values())
    stale = {name: sorted(t - statuses - EXTRA_EXIT_STATUSES) for name, t in told.items()
             if t - statuses - EXTRA_EXIT_STATUSES}
    assert not stale, f"statuses the code never uses: {stale}"


# -- (f) the relay's command-line defaults are config.py's

def option_defaults(doc):
    options = {}
    for spec, default in docopt_options(doc):
        for name in re.findall(r"--[\w-]+", spec):
            options[name] = default
    return options


def check_option_defaults(mode, options, settings):
    for setting in settings:
        option = setting.option
        if setting.default is True:
            # A setting that is on by default is turned off on the command line.
            option = "--no-" + setting.name.replace("_", "-")
        assert option in options, f"{mode} has no option {option}"
        given = options[option]
        if setting.default is None or isinstance(setting.default, bool):
            assert given is None, f"{option}: [default: {given}] but config.py has none"
            continue
        assert given is not None, f"{option}: no [default: ...] in {mode}'s usage text"
        if isinstance(setting.default, str):
            value = given
        elif isinstance(setting.default, float):
            value = float(given)
        else:
            value = int(given) if given.isdigit() else given    # 32M: the check reads it
        assert setting.check(value) == setting.default, \
            f"{option}: [default: {given}] but config.py says {setting.default!r}"


def test_relay_option_defaults_match_config():
    check_option_defaults("relay", option_defaults(cli.RELAY), config.TUNNEL_SETTINGS)


def test_uot_option_defaults_match_config():
    # One table for both ends' files; each end's options are its own part of it.
    server = option_defaults(cli.UOT_SERVER)
    mine = [s for s in config.UOT_SETTINGS if s.name != "server"]
    check_option_defaults("uot-server", server, mine)
    client = option_defaults(cli.UOT_CLIENT)
    shared = [s for s in config.UOT_SETTINGS if s.option in client]
    assert {s.name for s in config.UOT_SETTINGS} - {s.name for s in shared} == \
        {"target", "previous_key_file", "max_clients"}
    check_option_defaults("uot-client", client, shared)


def test_punch_option_defaults_match_config():
    check_option_defaults("punch", option_defaults(cli.PUNCH), config.PUNCH_SETTINGS)


def test_link_option_defaults_match_config():
    check_option_defaults("link", option_defaults(cli.LINK), config.LINK_SETTINGS)
    server = option_defaults(cli.LINK_SERVER)
    shared = [s for s in config.LINK_SETTINGS if s.option in server]
    assert {s.name for s in shared} == {"target", "bind", "packet_size", "idle_limit",
                                        "buffer", "congestion"}
    check_option_defaults("link-server", server, shared)


# -- (g) the example configuration loads and shows every key

def with_temp_keys(text, tmp_path):
    def key_for(m):
        path = tmp_path / Path(m.group(2)).name
        if not path.exists():
            auth.write_key_file(str(path))
        return f'{m.group(1)}"{path}"'
    return re.sub(r'^(\s*key_file\s*=\s*)"([^"]+)"', key_for, text, flags=re.M)


def load_text(text, tmp_path, name):
    path = tmp_path / name
    path.write_text(with_temp_keys(text, tmp_path))
    return config.load(str(path))


def test_example_config_loads(tmp_path):
    loaded = load_text(EXAMPLE.read_text(), tmp_path, "relay.toml")
    assert len(loaded.tunnels) == 3
    assert all(t.key is not None for t in loaded.tunnels.values())
    modes = sorted(t.mode for t in loaded.tunnels.values())
    assert modes == ["expose", "expose", "rendezvous"], f"conf/relay.toml: modes {modes}"
    meet = next(t for t in loaded.tunnels.values() if t.mode == "rendezvous")
    assert set(meet.endpoints()) == {"public"}, "a rendezvous tunnel binds its public socket only"


def test_example_config_shows_every_key_and_true_defaults():
    text = EXAMPLE.read_text()
    used = set()
    data = tomllib.loads(text)
    used |= {k for k, v in data.items() if not isinstance(v, dict)}
    used |= set(data.get("defaults", {}))
    for table in data.get("tunnels", {}).values():
        used |= set(table)
    for m in re.finditer(r"^#\s*(\w+)\s*=\s*(.+)$", text, re.M):
        name, value = m.group(1), m.group(2)
        setting = config.TUNNEL.get(name) or config.GLOBAL.get(name)
        if setting is None:
            continue
        used.add(name)
        if setting.default is not None:
            shown = tomllib.loads(f"v = {value}")["v"]
            assert shown == setting.default, \
                f"conf/relay.toml shows {name} = {value} as the default; it is {setting.default!r}"
    every = {s.name for s in config.TUNNEL_SETTINGS + config.GLOBAL_SETTINGS}
    assert every <= used, f"conf/relay.toml never shows {sorted(every - used)}"


def assert_shows_every_key(text, settings, examples=()):
    """An agent's example file sets or shows (commented out) every key of `settings`; a
    commented-out key shows its default, unless it is one of `examples`."""
    shown = set(tomllib.loads(text))
    for m in re.finditer(r"^#\s*(\w+)\s*=\s*(.+)$", text, re.M):
        setting = settings.get(m.group(1))
        if setting is not None:
            shown.add(setting.name)
            if setting.name not in examples:
                assert tomllib.loads(f"v = {m.group(2)}")["v"] == setting.default, m.group(0)
    assert shown == set(settings), f"never shown: {set(settings) - shown}"


EXPOSE_EXAMPLE = REPO / "conf" / "expose-wg.toml"


def test_example_exposer_file_loads_and_shows_every_key(tmp_path):
    text = with_temp_keys(EXPOSE_EXAMPLE.read_text(), tmp_path)
    # The example's relay is a name only a real deployment resolves.
    path = tmp_path / "expose-wg.toml"
    path.write_text(text.replace('"relay.example.net:5566"', '"127.0.0.1:5566"'))
    loaded = config.load_expose(str(path))
    assert loaded.key is not None and loaded.service[1] == ("127.0.0.1", 51820)
    assert_shows_every_key(text, config.EXPOSE, examples=set(config.INSPECT))


PUNCH_EXAMPLE = REPO / "conf" / "punch-mosh.toml"


def test_example_punch_file_loads_and_shows_every_key(tmp_path):
    text = with_temp_keys(PUNCH_EXAMPLE.read_text(), tmp_path)
    path = tmp_path / "punch-mosh.toml"
    path.write_text(text.replace('"relay.example.net:5577"', '"127.0.0.1:5577"'))
    loaded = config.load_punch(str(path))
    assert loaded.key is not None and loaded.rendezvous == "mosh"
    assert loaded.forward[1] == ("127.0.0.1", 60001) and loaded.listen is None
    # peer and listen are the other form's keys, shown commented out as examples.
    assert_shows_every_key(text, config.PUNCH, examples={"peer", "listen", *config.INSPECT})


@pytest.mark.parametrize("mode", ["uot-server", "uot-client"])
def test_example_uot_files_load_and_show_every_key(tmp_path, mode):
    text = with_temp_keys((REPO / "conf" / f"{mode}-dns.toml").read_text(), tmp_path)
    path = tmp_path / f"{mode}-dns.toml"
    path.write_text(text.replace('"gateway.example.net:8053"', '"127.0.0.1:8053"'))
    loaded = config.load_uot(str(path), mode == "uot-server")
    assert loaded.key is not None and loaded.path == str(path)
    own = {name: s for name, s in config.UOT.items()
           if name not in (("server",) if mode == "uot-server"
                           else ("target", "previous_key_file", "max_clients"))}
    assert_shows_every_key(text, own, examples={"previous_key_file", *config.INSPECT})


def literal_blocks(lines):
    out, current = [], None
    for line in lines:
        if line.startswith(".Bd -literal"):
            current = []
        elif line.startswith(".Ed") and current is not None:
            out.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line.replace("\\e", "\\"))
    return out


def test_man_page_config_examples_load(tmp_path):
    examples = literal_blocks(blocks(page("udpmux.conf.5"), ".Sh")["EXAMPLES"])
    examples += [b for b in literal_blocks(blocks(page("udpmux.8"), ".Sh")["EXAMPLES"])
                 if "[tunnels." in b]
    assert len(examples) >= 2
    for i, text in enumerate(examples):
        assert load_text(text, tmp_path, f"example{i}.toml").tunnels


# -- the protocol page's test vectors are what the code sends

def protocol_vectors():
    """The literal blocks of udpmux-protocol.7's TEST VECTORS, computed by the session code."""
    psk = bytes(range(32))
    ids = iter([0x11111111, 0x22222222, 0x33333333])
    randoms = iter([bytes(range(0xa0, 0xb0)), bytes(range(0xb0, 0xc0))])
    fake_os = types.SimpleNamespace(urandom=lambda n: next(randoms))
    peer = addr.peer_key(socket.AF_INET, ("192.0.2.1", 40000))
    epoch = 0x0102030405060708
    with mock.patch.object(session, "new_id", lambda taken=(): next(ids)), \
            mock.patch.object(session, "os", fake_os):
        initiator = session.Initiator(psk, wire.ROLE_EXPOSE)
        hello = initiator.hello()
        acceptor = session.Acceptor(psk, [wire.ROLE_EXPOSE], session.responder_name(psk, "wg"))
        welcome, _pending = acceptor.hello(hello, peer, 0.0, epoch=epoch)
        s = initiator.welcome(welcome)
    keepalive = s.seal(wire.T_KEEPALIVE, 0,
                       wire.KEEPALIVE.pack(wire.KEEPALIVE_REPLY, 0x01020304, 0))
    stale = acceptor.stale(s.peer_id, s.send_nonce)

    def dump(title, data):
        rows = [f"{title}, {len(data)} bytes:"]
        for at in range(0, len(data), 16):
            row = data[at:at + 16]
            cells = " ".join(f"{b:02x}" for b in row[:8])
            if len(row) > 8:
                cells += "  " + " ".join(f"{b:02x}" for b in row[8:])
            rows.append(f"{at:4d}  {cells}")
        return rows

    keys = []
    for name, key in (("handshake key", auth.derive(psk, b"handshake")),
                      ("i2r key", s.send_key), ("r2i key", s.recv_key),
                      ("stale key", acceptor.stale_key)):
        keys += [f"{name:<15}{key[:16].hex()}", f"{'':<15}{key[16:].hex()}"]
    keys.append(f"{'responder':<15}{acceptor.responder.hex()}")
    return ["\n".join(rows) + "\n" for rows in (
        keys,
        dump("HELLO, role 1", hello),
        dump("WELCOME to 192.0.2.1:40000, epoch 0x0102030405060708, tunnel wg", welcome),
        dump("first KEEPALIVE, REPLY, stamp 0x01020304", keepalive),
        dump("STALE from tunnel wg for that KEEPALIVE", stale))]


def test_protocol_test_vectors_match_the_code():
    blocks_ = literal_blocks(blocks(page("udpmux-protocol.7"), ".Sh")["TEST VECTORS"])
    assert blocks_ == protocol_vectors(), \
        "udpmux-protocol.7's TEST VECTORS differ from what udpmux.session computes"


def table_rows(lines):
    return [[normal(cell) for cell in line[4:].split(" Ta ")]
            for line in lines if line.startswith(".It ") and " Ta " in line]


def test_protocol_limits_and_types_match_the_code():
    sections = blocks(page("udpmux-protocol.7"), ".Sh")
    limits = {row[0]: row[1] for row in table_rows(sections["LIMITS"])}
    expected = {
        "header": wire.HEADER_SIZE, "MAC": wire.MAC_SIZE, "TCP length field": wire.FRAME_SIZE,
        "bytes added to a datagram, UDP carrier": wire.HEADER_SIZE + wire.MAC_SIZE,
        "bytes added to a datagram, TCP carrier": wire.FRAME_SIZE + wire.HEADER_SIZE
        + wire.MAC_SIZE,
        "largest UDP payload": wire.MAX_UDP_PAYLOAD,
        "largest DATA body, UDP carrier": wire.MAX_DATAGRAM,
        "largest TCP carrier message": wire.MAX_FRAME,
        "PSK and derived keys": auth.KEY_SIZE, "handshake random": wire.RANDOM_SIZE,
        "replay window, nonces": auth.WINDOW, "pending sessions": session.PENDING_MAX,
        "pending sessions, per source": session.PENDING_PER_SOURCE,
        "pending session lifetime": f"{session.PENDING_TTL:g} s",
        "HELLO randoms remembered": session.HELLO_MEMORY,
        "HELLOs answered, per tunnel": f"{session.HELLO_RATE:g}/s",
        "HELLOs answered, per source": f"{session.HELLO_RATE_PER_SOURCE:g}/s",
        "STALEs sent, per tunnel": f"{session.STALE_RATE:g}/s",
        "STALEs sent, per source": f"{session.STALE_RATE_PER_SOURCE:g}/s",
        "path challenges to a candidate, at most every": f"{session.CHALLENGE_EVERY:g} s",
        "nonces reserved ahead by a relay worker": f"2^{relay.NONCE_RESERVE.bit_length() - 1}",
        "TCP messages queued per flow": carrier.FLOW_QUEUE,
        "TCP control messages queued": carrier.CONTROL_QUEUE,
        "TCP connections waiting, per tunnel": relay.TCP_WAITING,
        "TCP connections waiting, per source": relay.TCP_WAITING_PER_SOURCE,
        "TCP registration time, relay": f"{relay.TCP_HANDSHAKE:g} s",
        "TCP handshakes waiting, uot-server": uot.HANDSHAKING,
        "TCP handshake time, uot-server": f"{uot.HANDSHAKE_TIMEOUT:g} s",
        "uot-client keepalive interval": f"{endpoint.KEEPALIVE_EVERY:g} s",
        "uot-client silence before reconnecting": f"{uot.DEAD_AFTER:g} s",
        "punch attempt": f"{probes.PUNCH_TIMEOUT:g} s",
        "PUNCH interval in an attempt": f"{punch.PUNCH_EVERY:g} s",
        "PUNCH interval, no relay, after an attempt": f"{punch.SLOW_PUNCH:g} s",
        "punch retry, default": f"{punch.RETRY_EVERY:g} s",
        "random-port PUNCH a second, at most": probes.PROBE_RATE,
        "PUNCH challenges remembered": probes.CHALLENGES_MAX,
        "PUNCH answer accepted within": f"{probes.CHALLENGE_TTL:g} s",
        "probes answered a second, at most": f"{probes.ANSWER_RATE:g}",
        "rendezvous name, bytes": wire.RENDEZVOUS_NAME_MAX,
        "rendezvous agents, max_flows at most": config.RENDEZVOUS_MAX_FLOWS,
    }
    assert relay.NONCE_RESERVE == 1 << (relay.NONCE_RESERVE.bit_length() - 1)
    for name, value in expected.items():
        assert limits.get(name) == str(value), \
            f"LIMITS: {name} is {limits.get(name)!r} in the page, {value} in the code"
    first_table = sections["MESSAGE TYPES"][:sections["MESSAGE TYPES"].index(".El")]
    types_ = {row[0]: row for row in table_rows(first_table)[1:]}
    assert set(types_) == {f"0x{t:02x}" for t in wire.TYPE_NAMES}, "MESSAGE TYPES: codes differ"
    for mtype, name in wire.TYPE_NAMES.items():
        row = types_[f"0x{mtype:02x}"]
        size = wire.BODY_SIZES.get(mtype)
        body = str(size) if size is not None \
            else f"{wire.BODY_MINIMUM[mtype]} to {wire.MAX_UDP_PAYLOAD}"
        assert row[1] == name and row[3] == body, f"MESSAGE TYPES: {row} is not {name}, {body}"


# What a datagram costs on the path, for the MTU section of udpmux.8.
IPV4, IPV6, UDP = 20, 40, 8             # header bytes
WIREGUARD = 32                          # a data packet's header (16) and tag (16)
WIREGUARD_MTU = 1420                    # wg-quick's default
PATH_MTU = 1500


def test_the_mtu_section_has_the_codes_overheads_and_what_follows():
    lines = blocks(page("udpmux.8"), ".Ss")["MTU"]
    tables = "\n".join(lines).split(".El")
    added = {row[0]: int(row[1]) for row in table_rows(tables[0].splitlines())[1:]}
    udp = wire.HEADER_SIZE + wire.MAC_SIZE
    assert added == {
        "UDP carrier": udp, "UDP carrier, without a key": wire.HEADER_SIZE,
        "TCP carrier": wire.FRAME_SIZE + udp,
        "TCP carrier, without a key": wire.FRAME_SIZE + wire.HEADER_SIZE}, added
    mtus = {row[0]: [int(n) for n in row[1:]] for row in table_rows(tables[1].splitlines())[1:]}
    assert mtus == {
        "IPv4": [PATH_MTU - IPV4 - UDP - WIREGUARD, PATH_MTU - IPV4 - UDP - WIREGUARD - udp],
        "IPv6": [PATH_MTU - IPV6 - UDP - WIREGUARD, PATH_MTU - IPV6 - UDP - WIREGUARD - udp],
    }, mtus
    text = normal(" ".join(text_of(line) for line in lines))
    payload = WIREGUARD_MTU + WIREGUARD
    for figures in [
        f"a UDP payload of N + {udp} bytes, an IPv4 packet of N + {udp + IPV4 + UDP}",
        f"an IPv6 packet of N + {udp + IPV6 + UDP}",
        f"datagrams of up to {wire.MAX_DATAGRAM} bytes, {wire.MAX_UDP_PAYLOAD} less {udp}",
        f"UDP payloads of M + {WIREGUARD} bytes, and M + {WIREGUARD + udp} through",
        f"Its default MTU, {WIREGUARD_MTU}, fits a {PATH_MTU}-byte IPv6 path "
        f"{WIREGUARD_MTU} + {WIREGUARD} + {UDP} + {IPV6} = {PATH_MTU};",
        f"its {payload}-byte datagrams become UDP payloads of {payload + udp} bytes, IPv4 "
        f"packets of {payload + udp + IPV4 + UDP} bytes and IPv6 packets of "
        f"{payload + udp + IPV6 + UDP}, and are fragmented",
        f"the path's MTU less {IPV4 + UDP + WIREGUARD + udp} over IPv4 and less "
        f"{IPV6 + UDP + WIREGUARD + udp} over IPv6; {mtus['IPv6'][1]} fits both",
    ]:
        assert figures in text, f"udpmux.8, MTU: not {figures!r}"
    assert payload + udp + IPV4 + UDP > PATH_MTU >= mtus["IPv4"][1] + WIREGUARD + udp + IPV4 + UDP
    example = normal(" ".join(text_of(line) for line in blocks(page("udpmux.8"), ".Ss")[
        "WireGuard behind carrier-grade NAT"]))
    assert f"MTU = {mtus['IPv6'][1]}" in example


def link_engine():
    """The stream engine as `udpmux link` sets it up for a session."""
    end = link.LinkServer(None, ("127.0.0.1", 22), None, config.link_from_options({}), None)
    link.LinkEnd.setup(end)
    return end.conn


def test_protocol_stream_limits_match_the_code():
    sections = blocks(page("udpmux-protocol.7"), ".Sh")
    limits = {row[0]: row[1] for row in table_rows(sections["LIMITS"])}
    conn = link_engine()
    mib = 1 << 20
    assert conn.stream_window % mib == 0 and conn.session_buffer % mib == 0
    expected = {
        "stream bytes before a WINDOW": stream.INITIAL_WINDOW,
        "ACK ranges below the top one": stream.MAX_ACK_RANGES,
        "ACKs that report a lower range": stream.ACK_REPEAT,
        "ACK delay, at most": f"{conn.max_ack_delay:g} s",
        "loss threshold, messages": stream.PACKET_THRESHOLD,
        "loss threshold, round trips": Fraction(stream.TIME_THRESHOLD).limit_denominator(100),
        "round-trip time before a sample": f"{conn.srtt:g} s",
        "longest round-trip sample": f"{stream.MAX_RTT_SAMPLE:g} s",
        "probes per PTO": stream.PROBES,
        "PTOs in a row before loss": stream.PTO_LOST_AFTER,
        "PTO, at most, link": f"{conn.max_pto:g} s",
        "stream window at first, link": f"{conn.window_start >> 10} KiB",
        "stream window, at most, link": f"{conn.stream_window // mib} MiB",
        "session buffer, link": f"{conn.session_buffer // mib} MiB",
        "peer's streams open at once, link": conn.max_streams,
        "link HELLO repeated after": f"{link.HELLO_FIRST:g} s",
        "link HELLO interval, at most": f"{link.HELLO_MOST:g} s",
        "link wait for the server, each step": f"{link.BOOT_TIMEOUT:g} s",
        "link-server wait for its client": f"{link.FIRST_CONTACT:g} s",
        "link keepalive interval": f"{link.KEEPALIVE_EVERY:g} s",
        "link new socket, nothing acknowledged": f"{link.REBIND_AFTER:g} s",
        "link new socket, nothing heard": f"{2 * link.KEEPALIVE_EVERY:g} s",
        "link asks a silent server for a word, at least": f"{link.LIVENESS_MIN:g} s",
        "link connections waiting for a session": link.WAITING_CONNECTIONS,
    }
    for name, value in expected.items():
        assert limits.get(name) == str(value), \
            f"LIMITS: {name} is {limits.get(name)!r} in the page, {value} in the code"


def test_protocol_errors_and_reset_reasons_match_the_code():
    sections = blocks(page("udpmux-protocol.7"), ".Ss")
    documented = {head for head, _ in items(sections["Protocol errors"])}
    assert documented == set(stream.PROTOCOL_ERRORS), \
        f"Protocol errors: the page lists {sorted(documented)}, stream.py {stream.PROTOCOL_ERRORS}"
    codes = [row[0] for row in table_rows(sections["STREAM, ACK, WINDOW and RESET"])]
    assert codes == [str(c) for c in (stream.RESET_CANCEL, stream.RESET_REFUSED,
                                      link.RESET_CONNECT)], f"RESET reasons: {codes}"


def test_link_banner_is_in_the_page():
    text = normal(render("udpmux.8"))
    assert f"{linkstart.BANNER} ADDRESS PORT PID" in text


def test_links_chain_is_in_the_page():
    text = normal(render("udpmux.8"))
    assert f"goes on, up to {linkstart.CHAIN_MOST} links deep" in text
    environment = dict(items(blocks(page("udpmux.8"), ".Sh")["ENVIRONMENT"]))
    assert linkstart.CHAIN in environment
    assert linkstart.NO_RECURSION in text


# -- (h) mandoc -T lint

@pytest.mark.parametrize("name", PAGES)
def test_mandoc_lint_is_clean(name):
    if not shutil.which("mandoc"):
        pytest.skip("mandoc is not installed (apt-get install -y mandoc); lint not run")
    done = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(MAN / name)],
                          capture_output=True, text=True)
    report = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not report, f"mandoc -T lint {name}:\n{report}"


# -- (i) every page renders

@pytest.mark.parametrize("name", PAGES)
def test_page_renders(name):
    title = name.rsplit(".", 1)[0]
    ran = 0
    commands = []
    if shutil.which("mandoc"):
        commands.append(["mandoc", "-T", "utf8", str(MAN / name)])
    if shutil.which("man") and shutil.which("groff"):
        commands.append(["man", "-l", "-P", "cat", str(MAN / name)])
    if not commands:
        pytest.skip("neither mandoc nor man with groff is installed: apt-get install mandoc")
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0", LC_ALL="C.UTF-8")
    for cmd in commands:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out = re.sub(r".\x08", "", done.stdout)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
        complaints = [line for line in done.stderr.splitlines()
                      if re.search(r"warn|error", line, re.I) and "locale" not in line]
        assert not complaints, f"{' '.join(cmd)}:\n" + "\n".join(complaints)
        for heading in ("NAME", "DESCRIPTION", "SEE ALSO"):
            assert re.search(rf"^{heading}$", out, re.M), f"{cmd[0]}: no {heading} in {name}"
        assert title in out and len(out.splitlines()) > 40, f"{cmd[0]}: {name} rendered empty"
        ran += 1
    assert ran


def test_every_metric_is_named_in_the_man_page():
    names = set(re.findall(r'"(udpmux_[a-z_]+)"', (REPO / "udpmux" / "metrics.py").read_text()))
    assert "udpmux_punch_pairs" in names and len(names) > 15
    text = page("udpmux.8")
    missing = sorted(n for n in names if f".Li {n}" not in text)
    assert not missing, f"metrics missing from udpmux(8), --metrics-listen: {missing}"
