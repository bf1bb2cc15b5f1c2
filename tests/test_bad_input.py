"""Bad input on the command line and in files, as a user meets it: one line and a
documented exit status (sysexits), never a traceback and never a hang.

Every case runs the real `udpmux` process.  Reloads of a running relay with bad
input are in test_master.py, next to the relay fixture.
"""

import os
import resource
import stat
import subprocess

import pytest

from procs import WAIT, env, udpmux_argv

LOCAL = "127.0.0.1"
HIT = f"{LOCAL}:5566"           # a destination; nothing is sent to it in these tests


def run(*args, stdin=None, stdout=subprocess.PIPE, timeout=WAIT):
    """Run udpmux; stdin is bytes to write to it, or a file to read from."""
    feed = {"input": stdin} if isinstance(stdin, bytes) or stdin is None else {"stdin": stdin}
    return subprocess.run(udpmux_argv(*args), env=env(), stdout=stdout, stderr=subprocess.PIPE,
                          timeout=timeout, **feed)


def refused(out, status, *phrases):
    """The command ended with `status` and said why in one line, quoting `phrases`."""
    err = out.stderr.decode(errors="backslashreplace")
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("udpmux:")]
    assert len(lines) == 1 and len(err.splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in lines[0], err
    assert out.returncode == status, err
    return lines[0]


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "key"
    subprocess.run(udpmux_argv("keygen", path), env=env(), check=True)
    return path


def fifo(tmp_path, name="fifo"):
    path = tmp_path / name
    os.mkfifo(path)
    return path


# -- configuration files: every mode that reads one

CONFIG_MODES = ["relay", "expose", "punch"]


@pytest.mark.parametrize("mode", CONFIG_MODES)
@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01 not text", bytes(range(256)) * 8,
                                     b"control_socket = \"caf\xe9\"\n"],
                         ids=["non-utf8", "binary", "latin1"])
def test_a_config_file_of_bytes_that_are_not_utf8_is_one_line_and_78(tmp_path, mode, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    refused(run(mode, "-c", path), 78, str(path), "not UTF-8 text")


@pytest.mark.parametrize("mode", CONFIG_MODES)
@pytest.mark.parametrize("what", ["fifo", "directory", "/dev/zero"])
def test_a_config_file_that_is_not_a_regular_file_is_refused_without_reading_it(
        tmp_path, mode, what):
    if what == "fifo":
        path, words = fifo(tmp_path), "is a FIFO"
    elif what == "directory":
        path, words = tmp_path, "is a directory"
    else:
        path, words = what, "is a character device"
    refused(run(mode, "-c", path), 78, str(path), words, "not a configuration file")


def test_a_config_nested_past_the_parser_depth_is_one_line(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    refused(run("relay", "-c", path), 78, str(path), "nested too deeply")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1" + "0" * 400])
def test_a_number_setting_in_a_file_must_be_finite(tmp_path, value):
    path = tmp_path / "relay.toml"
    path.write_text(f"[tunnels.a]\npublic = '{LOCAL}:0'\ninsecure = true\nflow_idle = {value}\n")
    refused(run("relay", "-c", path), 78, str(path), "flow_idle: expected a number above 0")


# -- key files: every mode that takes --key-file, and a key_file in a file

def key_file_commands(path):
    return {
        "relay": ["relay", "--public", f"{LOCAL}:0", "--key-file", path],
        "expose": ["expose", "--relay", HIT, "--service", HIT, "--key-file", path],
        "punch": ["punch", "--peer", HIT, "--port", "0", "--key-file", path, "--listen", "0"],
        "punch-relay": ["punch", "--relay", HIT, "--rendezvous", "r", "--key-file", path,
                        "--listen", "0"],
        "uot-server": ["uot-server", "--listen", f"{LOCAL}:0", "--target", HIT,
                       "--key-file", path],
        "uot-client": ["uot-client", "--listen", f"{LOCAL}:0", "--server", HIT,
                       "--key-file", path],
    }


@pytest.mark.parametrize("command", list(key_file_commands("x")))
@pytest.mark.parametrize("what", ["fifo", "directory", "/dev/zero"])
def test_a_key_file_that_is_not_a_regular_file_is_refused_by_every_mode(
        tmp_path, command, what):
    # open() of a FIFO blocks until a writer comes: before, every mode hung here.
    if what == "fifo":
        path, words = fifo(tmp_path), "is a FIFO, not a key file"
    elif what == "directory":
        path, words = tmp_path, "is a directory, not a key file"
    else:
        path, words = what, "is a character device, not a key file"
    refused(run(*key_file_commands(path)[command]), 65, str(path), words)


@pytest.mark.parametrize("mode", CONFIG_MODES)
def test_a_key_file_in_a_config_file_that_is_a_fifo_is_a_config_error(tmp_path, mode):
    key = fifo(tmp_path)
    text = {
        "relay": f"[tunnels.a]\npublic = '{LOCAL}:0'\nkey_file = '{key}'\n",
        "expose": f"relay = '{HIT}'\nservice = '{HIT}'\nkey_file = '{key}'\n",
        "punch": f"peer = '{HIT}'\nlisten = '0'\nkey_file = '{key}'\n",
    }[mode]
    path = tmp_path / "conf.toml"
    path.write_text(text)
    refused(run(mode, "-c", path), 78, str(path), f"{key}: is a FIFO, not a key file")


@pytest.mark.parametrize("data, words", [
    (b"\xff\xfe\n", "standard input: not a key"),
    (b"@" * 100000, "standard input: not a key"),       # no newline: read no further
])
def test_a_key_on_standard_input_that_is_not_text_is_one_line(data, words):
    out = run("relay", "--public", f"{LOCAL}:0", "--key-file", "-", stdin=data)
    refused(out, 65, words)


def test_a_key_on_standard_input_that_never_ends_is_one_line():
    # readline() of /dev/zero never returns: the relay hung, its memory growing.
    with open("/dev/zero", "rb") as zero:
        out = run("relay", "--public", f"{LOCAL}:0", "--key-file", "-", stdin=zero)
    refused(out, 65, "standard input: not a key")


# -- addresses

DESTINATIONS = {
    "expose --relay": ["expose", "--relay", f"{LOCAL}:0", "--service", HIT, "--insecure"],
    "expose --service": ["expose", "--relay", HIT, "--service", f"{LOCAL}:0", "--insecure"],
    "punch --peer": ["punch", "--peer", f"{LOCAL}:0", "--port", "0", "--insecure",
                     "--listen", "0"],
    "punch --relay": ["punch", "--relay", f"{LOCAL}:0", "--rendezvous", "r", "--key-file",
                      "KEY", "--listen", "0"],
    "punch --forward": ["punch", "--peer", HIT, "--port", "0", "--insecure", "--forward",
                        f"{LOCAL}:0"],
    "uot-client --server": ["uot-client", "--listen", f"{LOCAL}:0", "--server", f"{LOCAL}:0",
                            "--insecure"],
    "uot-server --target": ["uot-server", "--listen", f"{LOCAL}:0", "--target", f"{LOCAL}:0",
                            "--insecure"],
    "link-server --target": ["link-server", "--target", f"{LOCAL}:0"],
}


@pytest.mark.parametrize("name", list(DESTINATIONS))
def test_port_0_is_refused_as_a_destination(key, name):
    args = [str(key) if a == "KEY" else a for a in DESTINATIONS[name]]
    refused(run(*args), 64, name.split()[1] + ":", "port 0 is not a destination")


def test_port_0_in_a_file_is_refused_as_a_destination(tmp_path):
    path = tmp_path / "expose.toml"
    path.write_text(f"relay = '{LOCAL}:0'\nservice = '{HIT}'\ninsecure = true\n")
    refused(run("expose", "-c", path), 78, str(path), "relay:", "port 0 is not a destination")


@pytest.mark.parametrize("port", ["\u00b2", "\u0665\u0665\u0666\u0666", "+5", "5_0",
                                  "\uff15", "0x10", "65536", "0000005"])
def test_a_port_is_ascii_digits_only(port):
    # int() takes most of these (and str.isdigit() took "²", which int() then refused
    # with "invalid literal"); "٥٥٦٦" bound port 5566.
    refused(run("relay", "--public", f"{LOCAL}:{port}", "--insecure"), 64,
            "--public:", "port must be a number from 0 to 65535")


@pytest.mark.parametrize("text", ["\u0665", "+5", " 5", "5_0", "1-\u0662", "40000-+40010"])
def test_a_port_range_is_ascii_digits_only(text):
    refused(run("link-server", "--bind", text), 64, "--bind:", "expected PORT or MIN-MAX")


@pytest.mark.parametrize("text, words", [
    ("[]:5566", "the address in brackets is missing"),
    (":5566", "the host is missing"),
    ("127.0.0.1 :5566", "no spaces"),
    ("a..b:5566", "is not a valid host name"),
])
def test_an_address_needs_a_host(text, words):
    refused(run("relay", "--public", text, "--insecure"), 64, "--public:", words)
    refused(run("expose", "--relay", text, "--service", HIT, "--insecure"), 64,
            "--relay:", words)


# -- numbers given as options

@pytest.mark.parametrize("option, value, words", [
    ("--flow-idle", "inf", "expected a number above 0"),
    ("--flow-idle", "nan", "expected a number above 0"),
    ("--flow-idle", "1e999", "expected a number above 0"),
    ("--flow-idle", "1e3", "expected a number above 0"),
    ("--flow-idle", "1_000", "expected a number above 0"),
    ("--flow-idle", "\u0665", "expected a number above 0"),
    ("--flow-idle", "9" * 400, "expected a number above 0"),
    ("--new-flows-rate", " 5", "expected a number above 0"),
    ("--max-flows", "1_000", "expected a whole number"),
    ("--max-flows", "\u0661\u0660", "expected a whole number"),
    ("--max-flows", "+5", "expected a whole number"),
    ("--max-sources", "10.0", "expected a whole number"),
])
def test_numbers_in_options_are_plain_decimals(option, value, words):
    refused(run("relay", "--public", f"{LOCAL}:0", "--insecure", option, value), 64,
            f"{option}: {words}")


def test_plain_decimals_are_still_numbers():
    # The same options in plain decimals get past the checks: the relay then stops at
    # an address no interface has (192.0.2.0/24 is for documentation), not at them.
    out = run("relay", "--public", "192.0.2.1:5566", "--insecure", "--flow-idle", "2.5",
              "--max-flows", "010", "--new-flows-rate", ".5", "--exposer-timeout", "7.")
    refused(out, 71, "cannot bind 192.0.2.1:5566")


@pytest.mark.parametrize("option", ["--keepalive", "--flow-idle"])
def test_numbers_in_expose_options_are_plain_decimals(option):
    refused(run("expose", "--relay", HIT, "--service", HIT, "--insecure", option, "inf"), 64,
            f"{option}: expected a number above 0")


@pytest.mark.parametrize("option", ["--probe-ports", "--max-flows"])
def test_numbers_in_punch_options_are_plain_decimals(option):
    refused(run("punch", "--peer", HIT, "--port", "0", "--insecure", "--listen", "0",
                option, "\u0665"), 64, f"{option}: expected a whole number")


def test_a_tunnel_name_with_a_newline_is_refused(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(f"[tunnels.\"a\\n\"]\npublic = '{LOCAL}:0'\ninsecure = true\n")
    refused(run("relay", "-c", path), 78, "tunnel name 'a\\n'")
    refused(run("relay", "--public", f"{LOCAL}:0", "--insecure", "--name", "a\n"), 64,
            "tunnel name 'a\\n'")


def test_shared_memory_the_system_refuses_at_start_is_one_line_and_71():
    # A flow table of 16 Mi flows needs 3 GiB; under a 600 MB address-space limit
    # mmap() fails.  Before, the relay ended with a traceback and status 70.
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (600 << 20, resource.RLIM_INFINITY))
    out = subprocess.run(udpmux_argv("relay", "--public", f"{LOCAL}:0", "--insecure",
                                     "--max-flows", "16777216"),
                         env=env(), capture_output=True, timeout=WAIT, preexec_fn=limit)
    refused(out, 71, "tunnel tunnel: cannot map its shared memory: OSError: Cannot allocate")


# -- the control socket's path

LONG = "/tmp/" + "x" * 120 + "/control.sock"


def test_a_control_socket_path_too_long_for_af_unix_is_refused_when_read(tmp_path):
    words = f"control socket path is {len(LONG)} bytes; at most 107"
    refused(run("relay", "--public", f"{LOCAL}:0", "--insecure", "--control-socket", LONG),
            64, "--control-socket:", words)
    path = tmp_path / "relay.toml"
    path.write_text(f"control_socket = '{LONG}'\n[tunnels.a]\npublic = '{LOCAL}:0'\n"
                    "insecure = true\n")
    refused(run("relay", "-c", path), 78, str(path), "control_socket:", words)
    # `udpmux status` said "...: None; is the relay running?" with status 1.
    refused(run("status", "--control-socket", LONG), 64, "--control-socket:", words)


def test_a_control_socket_path_of_107_bytes_is_taken(tmp_path):
    path = str(tmp_path / "x")
    path += "x" * (107 - len(path))
    out = run("status", "--control-socket", path)
    refused(out, 66, "no such control socket")


# -- writing

def test_keygen_into_a_full_device_is_one_line_and_71():
    mode = os.stat("/dev/full").st_mode
    out = run("keygen", "--force", "/dev/full")
    refused(out, 71, "/dev/full: cannot write the key: No space left on device")
    # Before, keygen also made the device mode 0600, as it does its key files.
    assert os.stat("/dev/full").st_mode == mode


def test_keygen_to_standard_output_that_is_full_is_one_line_and_71():
    with open("/dev/full", "wb") as full:
        out = run("keygen", "-", stdout=full)
    refused(out, 71, "cannot write the key: No space left on device")


def test_keygen_onto_a_directory_is_one_line(tmp_path):
    out = run("keygen", tmp_path)
    refused(out, 1, "exists")
    out = run("keygen", "--force", tmp_path)
    refused(out, 71, "Is a directory")


def test_keygen_into_a_fifo_nobody_reads_does_not_block(tmp_path):
    path = fifo(tmp_path)
    refused(run("keygen", "--force", path), 71, str(path))
    assert stat.S_ISFIFO(os.stat(path).st_mode)


def test_help_into_a_full_device_is_one_line_and_71():
    with open("/dev/full", "wb") as full:
        out = run("--help", stdout=full)
    refused(out, 71, "cannot write to standard output: No space left on device")
