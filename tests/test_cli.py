"""The command line as a user meets it: help, errors, exit statuses, keygen, demo."""

import base64
import os
import re
import socket
import stat
import subprocess

import pytest

from procs import WAIT, Daemon, Notify, env, udpmux_argv
from udpmux import __version__, errors
from udpmux.cli import MODES, usage_lines


def run(*args, stdin=None):
    return subprocess.run(udpmux_argv(*args), env=env(), capture_output=True, text=True,
                          input=stdin, timeout=WAIT)


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"udpmux {__version__}"


def test_help_lists_every_mode_and_its_usage():
    out = run("--help")
    assert out.returncode == 0
    for mode in MODES.values():
        for line in usage_lines(mode.doc):
            assert line in out.stdout


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_has_its_own_help(mode):
    out = run(mode, "--help")
    assert out.returncode == 0
    assert out.stdout.startswith(f"udpmux {mode}:")
    assert "Options:" in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["punch", "--help"]])
def test_help_into_a_reader_that_stops_early(args):
    """`udpmux punch --help | head -3`: the reader closes its end; no traceback."""
    read, write = os.pipe()
    os.close(read)                      # a reader that has gone: every write is EPIPE
    out = subprocess.run(udpmux_argv(*args), env=env(), stdout=write, stderr=subprocess.PIPE,
                         text=True, timeout=WAIT)
    os.close(write)
    assert out.returncode == 0 and out.stderr == ""


def test_the_exit_statuses_in_help_are_those_the_code_uses():
    text = run("--help").stdout.split("Exit status:")[1]
    listed = {int(n) for n in re.findall(r"(\d+) [a-z]", text)}
    assert listed == set(errors.EXIT_NAMES) - {errors.EXIT_WORKER_BOOT}


def test_no_mode_is_a_usage_error():
    out = run()
    assert out.returncode == 64 and "which mode?" in out.stderr


def test_an_unknown_mode_is_named():
    out = run("relya")
    assert out.returncode == 64 and "unknown mode 'relya'" in out.stderr


@pytest.mark.parametrize("word, mode", [("exposee", "expose"), ("link-sever", "link-server"),
                                        ("uotclient", "uot-client")])
def test_a_mistyped_mode_gets_the_closest_one(word, mode):
    out = run(word, "--relay", "127.0.0.1:1")
    assert out.returncode == 64
    assert out.stderr == f"udpmux: unknown mode {word!r}; did you mean {mode!r}?\n"


def test_a_word_like_no_mode_gets_the_list():
    out = run("frobnicate")
    assert out.returncode == 64
    assert out.stderr == f"udpmux: unknown mode 'frobnicate'; modes: {', '.join(MODES)}\n"


@pytest.mark.parametrize("args, message", [
    (["relay", "--bogus"], "unknown option --bogus"),
    (["relay", "--public", "127.0.0.1:1", "--insecure", "extra"], "unexpected argument 'extra'"),
    (["keygen"], "missing FILE"),
    (["relay", "--public"], "--public requires argument"),
    (["relay", "--public", "127.0.0.1:1", "--insecure", "--max-flows", "lots"],
     "--max-flows: expected a whole number of at least 1, got 'lots'"),
    (["relay", "--public", "somewhere", "--insecure"], "expected HOST:PORT"),
    (["relay", "--public", "[::1:5", "--insecure"], "expected [IPv6]:PORT"),
    (["expose", "--relay", "127.0.0.1:1", "--service", "127.0.0.1:2", "--insecure",
      "--keepalive", "0"], "--keepalive: expected a number above 0, got 0.0"),
    (["expose", "--relay", "127.0.0.1:1", "--service", "127.0.0.1:2", "--insecure",
      "--carrier", "sctp"], "--carrier: expected udp or tcp"),
])
def test_bad_options_get_a_clear_message_and_status_64(args, message):
    out = run(*args)
    assert out.returncode == 64
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["relay", "-c", "relay.toml", "--metrics-listen", "127.0.0.1:9478"],
     "relay: --metrics-listen cannot be given with -c/--config "
     "(set metrics_listen in the file)"),
    (["relay", "--config=relay.toml", "--max-flows=5", "--no-tcp", "--debug", "--insecure"],
     "relay: --max-flows, --no-tcp and --insecure cannot be given with -c/--config "
     "(set max_flows, tcp = false and insecure = true in the file)"),
    (["relay", "--name", "wg", "-crelay.toml"],
     "relay: --name cannot be given with -c/--config "
     "(the file names each tunnel: [tunnels.NAME])"),
    (["expose", "-c", "expose.toml", "--carrier", "tcp"],
     "expose: --carrier cannot be given with -c/--config (set carrier in the file)"),
    (["punch", "-c", "punch.toml", "--key-file", "-"],
     "punch: --key-file cannot be given with -c/--config (set key_file in the file)"),
    (["punch", "-c", "punch.toml", "--once"],
     "punch: --once cannot be given with -c/--config"),
])
def test_options_given_with_a_config_file_are_named(args, message):
    out = run(*args)
    assert out.returncode == 64
    last = out.stderr.splitlines()[-1]
    assert last == f"udpmux: {message}; `udpmux {args[0]} --help` explains"


@pytest.mark.parametrize("mode, kind, peer", [
    ("uot-client", socket.SOCK_DGRAM, "--server"), ("uot-server", socket.SOCK_STREAM, "--target"),
])
def test_a_uot_listen_address_in_use_is_named_once(mode, kind, peer):
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        where = "127.0.0.1:%d" % taken.getsockname()[1]
        out = run(mode, "--listen", where, peer, "127.0.0.1:9", "--insecure")
    assert out.returncode == 71
    verb = "bind" if mode == "uot-client" else "listen on"
    assert out.stderr == f"udpmux: {mode}: --listen: cannot {verb} {where}: Address already in use\n"


def test_keygen_writes_a_private_key_file_once(tmp_path):
    path = tmp_path / "k"
    assert run("keygen", path).returncode == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(base64.b64decode(path.read_text())) == 32
    first = path.read_text()
    again = run("keygen", path)
    assert again.returncode == 1 and "exists; use --force" in again.stderr
    assert path.read_text() == first
    assert run("keygen", "--force", path).returncode == 0
    assert path.read_text() != first


def test_keygen_to_standard_output_and_a_key_from_standard_input():
    key = run("keygen", "-").stdout
    assert len(base64.b64decode(key)) == 32
    # A relay reads its key from stdin with --key-file -: a bad key is refused clearly.
    out = run("relay", "--public", "127.0.0.1:0", "--key-file", "-", stdin="not a key\n")
    assert out.returncode == 65 and "standard input: not a key" in out.stderr


@pytest.mark.parametrize("content, message", [
    ("", "empty"), ("@@@@\n", "not a key"), (base64.b64encode(b"x" * 16).decode(), "16"),
])
def test_bad_key_files_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "key"
    path.write_text(content)
    out = run("relay", "--public", "127.0.0.1:0", "--key-file", path)
    assert out.returncode == 65 and message in out.stderr and str(path) in out.stderr


def test_a_key_file_others_can_read_is_used_with_a_warning(tmp_path):
    path = tmp_path / "key"
    run("keygen", path)
    os.chmod(path, 0o644)
    notify = Notify(str(tmp_path))
    relay = Daemon(["relay", "--public", "127.0.0.1:0", "--key-file", path,
                    "--control-socket", tmp_path / "control.sock"], notify=notify)
    try:
        notify.wait_for("READY=1")
        relay.wait_log(f"key file {path} is readable by others (mode 0644); chmod 600 it")
    finally:
        assert relay.stop() == 0
        notify.close()


def test_demo_runs_and_shows_the_relay_working():
    out = subprocess.run(udpmux_argv("demo", "--clients", "5", "--datagrams", "10"),
                         env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "50 sent, 50 came back whole" in out.stdout
    assert "the echo service saw 5 source ports" in out.stdout
    assert "TUNNEL  STATE" in out.stdout and "running" in out.stdout


# -- udpmux check

def check(*args):
    return subprocess.run(udpmux_argv("check", *args), env=env(), capture_output=True,
                          text=True, timeout=WAIT)


def test_check_lists_every_problem_of_a_relay_file_and_exits_78(tmp_path):
    key = tmp_path / "key"
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    conf = tmp_path / "relay.toml"
    conf.write_text(f"""stop_timout = 3
[tunnels.a]
public = "127.0.0.1:5000"
key_file = "{key}"
max_flow = 10
[tunnels.b]
public = "127.0.0.1:nope"
insecure = true
[tunnels.c]
public = "127.0.0.1:5002"
key_file = "{tmp_path}/missing.key"
""")
    out = check("-c", conf)
    assert out.returncode == 78 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 4, out.stderr
    assert "unknown setting 'stop_timout'; did you mean 'stop_timeout'?" in lines[0]
    assert "[tunnels.a]: unknown setting 'max_flow'; did you mean 'max_flows'?" in lines[1]
    assert "[tunnels.b]: public:" in lines[2] and "port must be a number" in lines[2]
    assert "[tunnels.c]:" in lines[3] and "missing.key: no such key file" in lines[3]
    # The relay itself says the first and how many more there are.
    relay = subprocess.run(udpmux_argv("relay", "-c", conf), env=env(), capture_output=True,
                           text=True, timeout=WAIT)
    assert relay.returncode == 78
    assert "(and 3 more: `udpmux check` lists them)" in relay.stderr


def test_check_says_what_a_good_file_holds(tmp_path):
    key = tmp_path / "key"
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    relay = tmp_path / "relay.toml"
    relay.write_text(f'[tunnels.wg]\npublic = "127.0.0.1:5000"\nkey_file = "{key}"\n'
                     f'[tunnels.dns]\npublic = "127.0.0.1:5001"\nkey_file = "{key}"\n')
    out = check("-c", relay)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{relay}: a relay with 2 tunnels: dns, wg\n"
    expose = tmp_path / "expose.toml"
    expose.write_text(f'relay = "127.0.0.1:5566"\nservice = "127.0.0.1:51820"\n'
                      f'key_file = "{key}"\n')
    out = check("-c", expose)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{expose}: expose 127.0.0.1:51820 through the relay at " \
                         "127.0.0.1:5566\n"
    punch = tmp_path / "punch.toml"
    punch.write_text(f'relay = "127.0.0.1:5566"\nrendezvous = "mosh"\nkey_file = "{key}"\n'
                     'listen = "127.0.0.1:60001"\n')
    out = check("-c", punch)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{punch}: punch with the relay at 127.0.0.1:5566\n"


def test_check_needs_to_be_told_the_mode_of_a_file_that_does_not_say(tmp_path):
    conf = tmp_path / "what.toml"
    conf.write_text('keepalive = 10\n')
    out = check("-c", conf)
    assert out.returncode == 78 and "give --mode" in out.stderr
    out = check("-c", conf, "--mode", "expose")
    assert out.returncode == 78 and "relay: missing" in out.stderr
    out = check("-c", conf, "--mode", "uot")
    assert out.returncode == 64 and "--mode: expected relay, expose, punch, uot-server or uot-client" in out.stderr


@pytest.mark.parametrize("mode, args, message", [
    ("uot-client", ["--listen", "127.0.0.1:x", "--server", "127.0.0.1:5"],
     "uot-client: --listen: '127.0.0.1:x': port must be a number"),
    ("uot-client", ["--listen", "127.0.0.1:0", "--server", "host.invalid:5"],
     "uot-client: --server: cannot resolve 'host.invalid'"),
    ("uot-server", ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:0"],
     "uot-server: --target: '127.0.0.1:0': port 0 is not a destination"),
])
def test_a_bad_uot_address_is_named_by_its_option_once(mode, args, message):
    out = subprocess.run(udpmux_argv(mode, *args, "--insecure"), env=env(),
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 64, out.stderr
    assert f"udpmux: {message}" in out.stderr, out.stderr
