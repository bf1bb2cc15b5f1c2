"""SIGHUP on the agents, and a key rotated without an outage: the relay takes the new key
with the old one as previous_key_file, the exposer is given the new key and reloads, the
relay drops the old one.  Real processes on loopback, every file edited as an operator
would and every reload asked for with SIGHUP."""

import json
import signal
import subprocess

import pytest

from procs import Daemon, Echo, Notify, deadline_loop, env, exchange, free_port, udp_client, \
    udpmux_argv
from test_agent_status import agent_status

LOCAL = "127.0.0.1"


def keygen(path):
    subprocess.run(udpmux_argv("keygen", path), env=env(), check=True)
    return str(path)


class Rotation:
    """A relay and an exposer, each from a file, and an echo service behind them."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.old, self.new = keygen(tmp_path / "old.key"), keygen(tmp_path / "new.key")
        self.echo = Echo()
        self.public, self.register = free_port(), free_port()
        self.control = str(tmp_path / "relay.sock")
        self.expose_control = str(tmp_path / "expose.sock")
        self.relay_file = tmp_path / "relay.toml"
        self.expose_file = tmp_path / "expose.toml"
        self.notify = Notify(str(tmp_path))
        self.daemons = []

    def write_relay(self, key, previous=None):
        self.relay_file.write_text(
            f'control_socket = "{self.control}"\n[tunnels.wg]\n'
            f'public = "{LOCAL}:{self.public}"\nregister = "{LOCAL}:{self.register}"\n'
            f'key_file = "{key}"\n'
            + (f'previous_key_file = "{previous}"\n' if previous else ""))

    def write_expose(self, key, extra=""):
        self.expose_file.write_text(
            f'relay = "{LOCAL}:{self.register}"\nservice = "{LOCAL}:{self.echo.port}"\n'
            f'key_file = "{key}"\ncontrol_socket = "{self.expose_control}"\n{extra}')

    def start(self):
        self.relay = Daemon(["relay", "-c", self.relay_file], notify=self.notify)
        self.daemons.append(self.relay)
        self.notify.wait_for("READY=1")
        self.expose = Daemon(["expose", "-c", self.expose_file, "--debug"])
        self.daemons.append(self.expose)
        self.expose.wait_log("registered with the relay")

    def reload(self, daemon, done):
        """SIGHUP, and the index of the log line that says how it went."""
        start = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        return daemon.wait_log(done, start=start)

    def carried(self, client):
        """The echo comes back through relay and exposer, once they are set again."""
        for _ in deadline_loop(what="a datagram through the tunnel"):
            try:
                return exchange(client, b"still there", (LOCAL, self.public), tries=1)
            except AssertionError:
                continue

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.echo.close()
        self.notify.close()


@pytest.fixture
def rotation(tmp_path):
    r = Rotation(tmp_path)
    yield r
    r.close()


def test_a_key_is_rotated_without_waiting_out_a_session(rotation):
    rotation.write_relay(rotation.old)
    rotation.write_expose(rotation.old)
    rotation.start()
    client = udp_client(timeout=0.5)
    assert rotation.carried(client) == b"still there"
    # 1. The relay: the new key, the old one still accepted.
    rotation.write_relay(rotation.new, previous=rotation.old)
    rotation.reload(rotation.relay, "settings changed; restarting its worker")
    assert rotation.carried(client) == b"still there"
    # 2. The exposer: the new key, by SIGHUP; it registers again under it.
    rotation.write_expose(rotation.new)
    line = rotation.expose.lines[rotation.reload(rotation.expose, "reloaded:")]
    assert "key_file" not in line and "key changed" in line, line
    assert rotation.carried(client) == b"still there"
    # 3. The relay drops the old key.
    rotation.write_relay(rotation.new)
    rotation.reload(rotation.relay, "settings changed; restarting its worker")
    assert rotation.carried(client) == b"still there"
    peer = agent_status(rotation.expose_control)["peers"][0]
    assert peer["state"] == "up"
    # At no step did the exposer wait for a silent session to die (55 s): each STALE
    # came under a key it holds, and it never went unanswered.
    log = rotation.expose.log()
    assert "no word from the relay" not in log and "no answer from the relay" not in log


def test_an_exposer_with_only_the_old_key_is_refused_once_it_is_dropped(rotation):
    rotation.write_relay(rotation.new, previous=rotation.old)
    rotation.write_expose(rotation.old)
    rotation.start()                    # welcomed under the previous key
    rotation.write_relay(rotation.new)
    rotation.reload(rotation.relay, "settings changed; restarting its worker")
    rotation.expose.wait_log("no answer from the relay")


def test_a_bad_reload_leaves_the_exposer_running_and_says_why(rotation):
    rotation.write_relay(rotation.old)
    rotation.write_expose(rotation.old)
    rotation.start()
    client = udp_client(timeout=0.5)
    rotation.expose_file.write_text("relay = [broken\n")
    line = rotation.expose.lines[rotation.reload(rotation.expose, "reload failed")]
    assert str(rotation.expose_file) in line and "the running configuration stays" in line
    got = agent_status(rotation.expose_control)
    assert str(rotation.expose_file) in got["reload_error"]
    text = subprocess.run(udpmux_argv("status", "--control-socket", rotation.expose_control),
                          env=env(), capture_output=True, text=True).stdout
    assert "reload failed:" in text
    assert rotation.carried(client) == b"still there"
    # A setting that only a restart changes is refused by name; a good file then works.
    rotation.write_expose(rotation.old, extra='carrier = "tcp"\n')
    line = rotation.expose.lines[rotation.reload(rotation.expose, "reload failed")]
    assert "carrier changes only when the agent restarts" in line, line
    rotation.write_expose(rotation.old, extra="flow_idle = 60\n")
    line = rotation.expose.lines[rotation.reload(rotation.expose, "reloaded:")]
    assert "flow_idle changed" in line, line
    assert agent_status(rotation.expose_control)["reload_error"] is None


def test_a_uot_server_welcomes_the_previous_key_and_reloads_to_the_next(tmp_path):
    old, new = keygen(tmp_path / "old.key"), keygen(tmp_path / "new.key")
    echo = Echo()
    tcp, udp = free_port(), free_port()
    server_file = tmp_path / "server.toml"
    server_file.write_text(f'listen = "{LOCAL}:{tcp}"\ntarget = "{LOCAL}:{echo.port}"\n'
                           f'key_file = "{new}"\nprevious_key_file = "{old}"\n')
    server = Daemon(["uot-server", "-c", server_file])
    client = None
    try:
        server.wait_log("carrying UDP for")
        client = Daemon(["uot-client", "--listen", f"{LOCAL}:{udp}", "--server",
                         f"{LOCAL}:{tcp}", "--key-file", old])
        client.wait_log("connected to")
        sock = udp_client()
        assert exchange(sock, b"old key", (LOCAL, udp)) == b"old key"
        # The server forgets the old key: the client's connection goes on, a new one
        # under the old key is refused.
        server_file.write_text(f'listen = "{LOCAL}:{tcp}"\ntarget = "{LOCAL}:{echo.port}"\n'
                               f'key_file = "{new}"\n')
        start = len(server.lines)
        server.signal(signal.SIGHUP)
        line = server.lines[server.wait_log("reloaded:", start=start)]
        assert "previous_key changed" in line, line
        assert exchange(sock, b"still up", (LOCAL, udp)) == b"still up"
    finally:
        for daemon in (client, server):
            if daemon is not None:
                daemon.stop()
        echo.close()


@pytest.mark.parametrize("text, message", [
    ('key_file = "{key}"\nprevious_key_file = "{key}"\n', "the same key as key_file"),
    ('insecure = true\nprevious_key_file = "{key}"\n', "no key to rotate"),
])
def test_bad_previous_keys(tmp_path, text, message):
    key = keygen(tmp_path / "k")
    path = tmp_path / "relay.toml"
    path.write_text(f'[tunnels.wg]\npublic = "{LOCAL}:{free_port()}"\n'
                    + text.format(key=key))
    out = subprocess.run(udpmux_argv("check", "-c", path), env=env(), capture_output=True,
                         text=True)
    assert out.returncode == 78 and message in out.stderr, out.stderr


def test_udpmux_status_json_of_a_reloaded_agent_names_its_file(rotation):
    rotation.write_relay(rotation.old)
    rotation.write_expose(rotation.old)
    rotation.start()
    got = json.loads(subprocess.run(
        udpmux_argv("status", "--json", "--control-socket", rotation.expose_control),
        env=env(), capture_output=True, text=True).stdout)
    assert got["config"] == str(rotation.expose_file) and got["reload_error"] is None
