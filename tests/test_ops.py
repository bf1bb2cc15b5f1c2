"""Running udpmux as a service: status and metrics agree with the traffic, systemd units
verify, sd_notify reports the traffic."""

import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from procs import (
    ROOT, WAIT, Daemon, Echo, Notify, deadline_loop, env, exchange, free_port, status,
    udp_client, udpmux_argv,
)
from udpmux.status import MAX_CLIENTS, REQUEST_TIMEOUT

LOCAL = "127.0.0.1"


@pytest.fixture
def service(tmp_path, request):
    """A relay with one tunnel, metrics on, and its exposer: (relay, ports, urls).

    Parametrized indirectly with a number, both ends keep that many flows and the relay
    takes new ones as fast as they come."""
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    public, register = free_port(), free_port()
    control = str(tmp_path / "control.sock")
    config = tmp_path / "relay.toml"
    max_flows = getattr(request, "param", None)
    flows = f"max_flows = {max_flows}\nnew_flows_rate = 1000000\n" if max_flows else ""
    config.write_text(f'control_socket = "{control}"\nmetrics_listen = "{LOCAL}:0"\n'
                      f'[tunnels.wg]\npublic = "{LOCAL}:{public}"\n'
                      f'register = "{LOCAL}:{register}"\nkey_file = "{key}"\n{flows}')
    notify = Notify(str(tmp_path))
    echo = Echo()
    relay = Daemon(["relay", "-c", config], notify=notify)
    exposer = None
    try:
        notify.wait_for("READY=1")
        line = relay.lines[relay.wait_log("metrics at http://")]
        url = re.search(r"(http://\S+/metrics)", line).group(1)
        exposer = Daemon(["expose", "--relay", f"{LOCAL}:{register}", "--service",
                          f"{LOCAL}:{echo.port}", "--key-file", key,
                          *(["--max-flows", max_flows] if max_flows else [])])
        exposer.wait_log("registered with the relay")
        yield relay, notify, control, public, register, url
    finally:
        for daemon in (exposer, relay):
            if daemon is not None:
                daemon.stop()
        echo.close()
        notify.close()


def scrape(url):
    with urllib.request.urlopen(url, timeout=WAIT) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples_of(reply.read().decode())


def samples_of(text):
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def metrics_address(url):
    host, port = url.split("/")[2].split(":")
    return host, int(port)


def get_metrics(address):
    """One GET /metrics over a plain socket, not retried: the samples."""
    with socket.create_connection(address, timeout=WAIT) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: udpmux\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK"), f"the metrics server answered {reply[:200]!r}"
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) == len(body)
    return samples_of(body.decode())


def test_status_and_metrics_report_the_traffic_that_was_sent(service):
    _relay, _notify, control, public, register, url = service
    sizes = [1, 100, 1000]
    clients = [udp_client() for _ in range(3)]
    for n, client in enumerate(clients):
        for _ in range(7):
            data = bytes([n]) * sizes[n]
            assert exchange(client, data, (LOCAL, public), tries=1) == data
    stranger = udp_client()
    for _ in range(5):
        stranger.sendto(b"\x01\x10", (LOCAL, register))       # short: a counted drop
    expect = {"datagrams_in": 21, "datagrams_out": 21, "bytes_in": 7 * sum(sizes),
              "bytes_out": 7 * sum(sizes)}
    for _ in deadline_loop(what="the counters"):
        (tunnel,) = status(control)["tunnels"]
        if all(tunnel["counters"][k] == v for k, v in expect.items()) \
                and tunnel["drops"].get("short") == 5:
            break
    assert tunnel["flows"] == 3 and tunnel["counters"]["flows"] == 3
    samples = scrape(url)
    for direction in ("in", "out"):
        labels = f'{{tunnel="wg",direction="{direction}"}}'
        assert samples["udpmux_datagrams_total" + labels] == expect[f"datagrams_{direction}"]
        assert samples["udpmux_bytes_total" + labels] == expect[f"bytes_{direction}"]
    assert samples['udpmux_flows{tunnel="wg"}'] == 3
    assert samples['udpmux_flows_created_total{tunnel="wg"}'] == 3
    assert samples['udpmux_drops_total{tunnel="wg",reason="short"}'] == 5
    assert samples['udpmux_exposer_up{tunnel="wg"}'] == 1
    assert samples['udpmux_tunnel_up{tunnel="wg"}'] == 1
    assert samples['udpmux_worker_memory_bytes{tunnel="wg"}'] > 0


def test_the_metrics_endpoint_answers_only_metrics(service):
    url = service[-1]
    base = url.rsplit("/", 1)[0]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/elsewhere", timeout=WAIT)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"),
                               timeout=WAIT)
    assert err.value.code == 405


def test_idle_and_garbage_connections_do_not_stop_the_metrics(service):
    url = service[-1]
    host, port = url.split("/")[2].split(":")
    idle = []
    for _ in range(40):                         # more than it serves at once, all silent
        conn = socket.create_connection((host, int(port)), timeout=WAIT)
        idle.append(conn)
    garbage = socket.create_connection((host, int(port)), timeout=WAIT)
    garbage.sendall(os.urandom(9000))
    try:
        for _ in deadline_loop(what="a scrape past the idle connections"):
            try:
                samples = scrape(url)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                continue
        assert samples['udpmux_tunnel_up{tunnel="wg"}'] == 1
    finally:
        for conn in idle + [garbage]:
            conn.close()


def ask_raw(control, data):
    """Send bytes to the control socket as they are; return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(WAIT)
        conn.connect(control)
        conn.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(65536)
            assert chunk, f"the control socket closed after {reply!r}"
            reply += chunk
    return json.loads(reply)


@pytest.mark.parametrize("request_bytes, error", [
    (b'{"request": "flows", "tunnel": []}\n', "a flows request names a tunnel, not []"),
    (b'{"request": "flows", "tunnel": "nope"}\n', "no tunnel named 'nope'"),
    (b'{"request": "reboot"}\n', "unknown request 'reboot'"),
    (b'[' * 4000 + b'\n', "bad request"),
    (b'\xff\xfe not json\n', "bad request"),
    (b'{"request": "status"', "bad request: the request took too long"),
])
def test_a_bad_control_request_gets_an_error_and_the_relay_carries_on(service, request_bytes,
                                                                       error):
    relay, _notify, control, public, _register, _url = service
    (before,) = status(control)["tunnels"]
    assert error in ask_raw(control, request_bytes)["error"]
    (after,) = status(control)["tunnels"]
    assert after["worker_pid"] == before["worker_pid"]
    assert relay.proc.poll() is None
    client = udp_client()
    assert exchange(client, b"still here", (LOCAL, public)) == b"still here"


def test_systemd_hears_the_traffic_in_the_status_line(service):
    _relay, notify, _control, public, _register, _url = service
    client = udp_client()
    assert exchange(client, b"counted", (LOCAL, public)) == b"counted"
    fields = notify.wait_match(lambda fields: any("flows" in f for f in fields),
                               what="STATUS= with the traffic")
    (line,) = [f for f in fields if f.startswith("STATUS=")]
    assert re.fullmatch(r"STATUS=1 of 1 tunnels running, 1 flows, \d+ datagrams/s", line)


# -- no client holds the master


def connect_unix(path):
    """A connection to a unix socket; while its backlog is full, connect() waits (up to
    WAIT: a blocking connect waits for SO_SNDTIMEO, where one with settimeout() fails
    with EAGAIN at once)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", int(WAIT), 0))
    conn.connect(path)
    conn.settimeout(WAIT)
    return conn


class Dribblers(threading.Thread):
    """`count` connections to the control socket, held open by a thread: each sends one
    more byte of a request that never ends every TICK.  One the relay closes (at its
    deadline, after an error reply, or as the oldest to make room) is opened again at
    once; what each got before its end is kept in `replies`."""

    TICK = 0.05
    REQUEST = b'{"request": "status", "padding": "' + b"x" * 1000

    def __init__(self, path, count):
        super().__init__(daemon=True)
        self.path = path
        self.count = count
        self.conns = {}             # socket -> [bytes received, bytes sent]
        self.replies = []
        self.opened = 0
        self.failure = None
        self.ready = threading.Event()
        self.done = threading.Event()

    def open(self):
        conn = connect_unix(self.path)
        conn.setblocking(False)
        self.conns[conn] = [b"", 0]
        self.opened += 1

    def run(self):
        try:
            for _ in range(self.count):
                self.open()
            self.ready.set()
            drip = time.monotonic()
            while not self.done.is_set():
                readable, _, _ = select.select(list(self.conns), [], [], self.TICK)
                for conn in readable:
                    try:
                        chunk = conn.recv(65536)
                    except ConnectionResetError:    # closed with our bytes unread
                        chunk = b""
                    if chunk:
                        self.conns[conn][0] += chunk
                        continue
                    self.replies.append(self.conns.pop(conn)[0])
                    conn.close()
                    self.open()
                if time.monotonic() >= drip:
                    drip = time.monotonic() + self.TICK
                    for conn, state in self.conns.items():
                        try:
                            state[1] += conn.send(self.REQUEST[state[1]:state[1] + 1])
                        except OSError:
                            pass            # closed: the next select() reads its end
        except Exception as exc:            # noqa: BLE001 - reported by stop()
            self.failure = exc
        finally:
            self.ready.set()

    def stop(self):
        self.done.set()
        self.join(WAIT)
        for conn in self.conns:
            conn.close()
        assert self.failure is None, f"a dribbler failed: {self.failure!r}"


def held_by(pid, control, metrics_port):
    """The control and metrics sockets (listeners or accepted) process pid holds."""
    return [c for c in psutil.Process(pid).net_connections("all")
            if (c.family == socket.AF_UNIX and c.laddr == control)
            or (c.family != socket.AF_UNIX and c.laddr and c.laddr.port == metrics_port)]


def test_status_answers_past_dribbling_and_idle_clients_and_a_killed_worker_comes_back(
        service):
    _relay, _notify, control, public, _register, url = service
    (before,) = status(control)["tunnels"]
    dribblers = Dribblers(control, 6)
    dribblers.start()
    idle = []
    try:
        assert dribblers.ready.wait(WAIT) and dribblers.failure is None
        # More connections than the master holds: a newcomer closes the oldest.
        idle = [connect_unix(control) for _ in range(MAX_CLIENTS)]
        idle.append(socket.create_connection(metrics_address(url), timeout=WAIT))
        (now,) = status(control)["tunnels"]
        assert now["worker_pid"] == before["worker_pid"] and now["state"] == "running"
        os.kill(before["worker_pid"], signal.SIGKILL)
        for _ in deadline_loop(what="a respawned worker"):
            (now,) = status(control)["tunnels"]
            if now["state"] == "running" and now["worker_pid"] not in (None,
                                                                      before["worker_pid"]):
                break
        assert now["restarts"] == 1
        assert dribblers.is_alive() and dribblers.failure is None
        # Forked while control and metrics clients were connected, the new worker holds
        # none of their sockets: the master alone decides when they close.
        assert held_by(now["worker_pid"], control, metrics_address(url)[1]) == []
        assert exchange(udp_client(), b"after", (LOCAL, public)) == b"after"
    finally:
        dribblers.stop()
        for conn in idle:
            conn.close()
    late = {"error": f"bad request: the request took too long (over {REQUEST_TIMEOUT:g} s)"}
    for reply in dribblers.replies:         # closed as the oldest, or answered at the deadline
        assert reply == b"" or json.loads(reply) == late


@pytest.mark.parametrize("service", [4096], indirect=True)
def test_a_reply_larger_than_the_socket_buffer_arrives_whole_while_status_answers(service):
    _relay, _notify, control, public, _register, _url = service
    port = free_port()
    count = 3000
    for n in range(count):                  # one flow per address: 127.3.x.y
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((f"127.3.{n // 250}.{n % 250 + 1}", port))
            sock.sendto(b"hello", (LOCAL, public))
    for _ in deadline_loop(what=f"{count} flows"):
        if status(control)["tunnels"][0]["flows"] == count:
            break
    reader = connect_unix(control)
    with reader:
        reader.sendall(b'{"request": "flows", "tunnel": "wg"}\n')
        # Not read yet: the master keeps the rest of the reply and serves others.
        (tunnel,) = status(control)["tunnels"]
        assert tunnel["flows"] == count
        data = b""
        while chunk := reader.recv(65536):
            data += chunk
        assert len(data) > reader.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    reply = json.loads(data)
    assert len(reply["flows"]) == count
    assert {f["client"] for f in reply["flows"]} == {
        f"127.3.{n // 250}.{n % 250 + 1}:{port}" for n in range(count)}


def test_a_scrape_gets_the_metrics_past_20_idle_connections(service):
    address = metrics_address(service[-1])
    idle = [socket.create_connection(address, timeout=WAIT) for _ in range(20)]
    try:
        assert len(idle) > MAX_CLIENTS
        samples = get_metrics(address)      # once, without waiting for the idle to time out
        assert samples['udpmux_tunnel_up{tunnel="wg"}'] == 1
        for conn in idle[:len(idle) + 1 - MAX_CLIENTS]:
            assert conn.recv(1) == b""      # the oldest were closed to make room
    finally:
        for conn in idle:
            conn.close()


def test_a_metrics_address_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(udpmux_argv("relay", "--public", f"{LOCAL}:0", "--insecure",
                                         "--control-socket", tmp_path / "c.sock",
                                         "--metrics-listen", f"{LOCAL}:{port}"),
                             env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 71
    assert f"--metrics-listen: cannot listen on {LOCAL}:{port}" in out.stderr


# -- systemd units

UNIT_DIR = os.path.join(ROOT, "conf", "systemd")
UNITS = sorted(name for name in os.listdir(UNIT_DIR) if name.endswith(".service"))
AGENTS = ["expose", "punch", "uot-server", "uot-client"]       # one template each


def unit(name):
    with open(os.path.join(UNIT_DIR, name)) as f:
        return f.read()


def settings(text):
    found = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def exec_start(name):
    """The unit's ExecStart= as (program, the rest)."""
    (line,) = settings(unit(name))["ExecStart"]
    program, _, rest = line.partition(" ")
    return program, rest


def test_every_mode_that_runs_as_a_service_has_a_unit():
    assert UNITS == sorted(["udpmux-relay.service"] + [f"udpmux-{m}@.service" for m in AGENTS])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
@pytest.mark.parametrize("name", UNITS)
def test_units_pass_systemd_analyze_verify(tmp_path, name):
    # The units run udpmux where tools/install links it (tests/test_install.py checks
    # that place); here the checkout's bin/udpmux stands in for it.
    program, _ = exec_start(name)
    text = unit(name)
    for key in ("ExecStart", "ExecReload"):
        text = text.replace(f"{key}={program} ", f"{key}={ROOT}/bin/udpmux ")
    (tmp_path / name).write_text(text)
    instance = name.replace("@.", "@test.")
    if instance != name:
        (tmp_path / instance).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / instance)],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


@pytest.mark.parametrize("name", UNITS)
def test_units_run_hardened_as_the_udpmux_user(name):
    found = settings(unit(name))
    for key, value in {"User": "udpmux", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet":
                       found.get("AmbientCapabilities", [""])[0],
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
                       "SystemCallFilter": "@system-service", "Restart": "on-failure"}.items():
        assert found.get(key) == [value], f"{name}: {key}"
    assert "man:udpmux(8)" in found["Documentation"][0]
    assert "78" in found["RestartPreventExitStatus"][0].split()


def test_the_relay_unit_is_a_notify_service_that_reloads_with_sighup():
    found = settings(unit("udpmux-relay.service"))
    assert found["Type"] == ["notify"] and found["KillMode"] == ["mixed"]
    assert found["ExecReload"] == ["/usr/local/bin/udpmux check -c /etc/udpmux/relay.toml",
                                   "/bin/kill -HUP $MAINPID"]
    assert found["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert exec_start("udpmux-relay.service")[1] == "relay -c /etc/udpmux/relay.toml"


@pytest.mark.parametrize("mode", AGENTS)
def test_the_templates_pick_their_file_by_instance_name_and_reload_it(mode):
    name = f"udpmux-{mode}@.service"
    found = settings(unit(name))
    assert exec_start(name)[1] == f"{mode} -c /etc/udpmux/{mode}-%i.toml"
    assert found["ExecReload"] == [
        f"/usr/local/bin/udpmux check -c /etc/udpmux/{mode}-%i.toml --mode {mode}",
        "/bin/kill -HUP $MAINPID"]
    assert found["RuntimeDirectory"] == [f"udpmux-{mode}-%i"]
    assert found.get("AmbientCapabilities") is None


def test_the_uot_units_carry_datagrams_with_the_example_files(tmp_path):
    """conf/uot-server-dns.toml and conf/uot-client-dns.toml, installed as the units read
    them, with loopback addresses and a key of the test's in place of the examples'."""
    key = tmp_path / "dns.key"
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    echo = Echo()
    tcp, udp = free_port(), free_port()
    local = {"0.0.0.0:8053": f"{LOCAL}:{tcp}", "gateway.example.net:8053": f"{LOCAL}:{tcp}",
             "127.0.0.1:53": f"{LOCAL}:{echo.port}", "127.0.0.1:5353": f"{LOCAL}:{udp}",
             "/etc/udpmux/dns.key": str(key)}
    daemons = []
    try:
        for mode, ready in (("uot-server", "carrying UDP for"), ("uot-client", "connected to")):
            text = open(os.path.join(ROOT, "conf", f"{mode}-dns.toml")).read()
            for example, mine in local.items():
                text = text.replace(f'"{example}"', f'"{mine}"')
            installed = tmp_path / f"{mode}-dns.toml"
            installed.write_text(text)
            _program, rest = exec_start(f"udpmux-{mode}@.service")
            argv = rest.replace("%i", "dns").replace(f"/etc/udpmux/{mode}-dns.toml",
                                                     str(installed)).split()
            daemons.append(Daemon(argv, extra_env={"RUNTIME_DIRECTORY": str(tmp_path)}))
            daemons[-1].wait_log(ready)
        assert exchange(udp_client(), b"example.org?", (LOCAL, udp)) == b"example.org?"
        assert (tmp_path / "uot-client.sock").exists()
    finally:
        stopped = [(daemon.stop(), daemon) for daemon in reversed(daemons)]
        echo.close()
    for code, daemon in stopped:            # SIGTERM: a clean stop
        assert code == 0, daemon.log()


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed (apt-get install systemd)")
def test_the_sysusers_file_creates_the_udpmux_user(tmp_path):
    (tmp_path / "etc").mkdir()
    out = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                          os.path.join(UNIT_DIR, "udpmux.sysusers")],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^udpmux:x:\d+:\d+:", (tmp_path / "etc/passwd").read_text(), re.M)


def run_exec_reload(conf, pid, name="udpmux-relay.service", installed="/etc/udpmux/relay.toml"):
    """A unit's ExecReload= lines, run as systemd runs them: in order, the first that
    fails failing the reload.  Returns (status, standard error)."""
    import shlex
    for line in settings(unit(name))["ExecReload"]:
        argv = shlex.split(line.replace(installed, str(conf)).replace("$MAINPID", str(pid)))
        if argv[0] == "/usr/local/bin/udpmux":
            argv = udpmux_argv(*argv[1:])
        out = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=WAIT)
        if out.returncode != 0:
            return out.returncode, out.stderr
    return 0, ""


def test_the_relay_units_reload_of_a_bad_file_fails_and_leaves_the_relay_alone(tmp_path):
    key = tmp_path / "key"
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    conf = tmp_path / "relay.toml"
    head = f'control_socket = "{tmp_path}/control.sock"\n'
    conf.write_text(head + f'[tunnels.a]\npublic = "127.0.0.1:0"\nkey_file = "{key}"\n')
    notify = Notify(str(tmp_path))
    relay = Daemon(["relay", "-c", conf], notify=notify)
    try:
        notify.wait_for("READY=1")
        conf.write_text(head + f'[tunnels.a]\npublic = "127.0.0.1:0"\nkey_fle = "{key}"\n')
        status, err = run_exec_reload(conf, relay.pid)
        assert status == 78, err
        assert "unknown setting 'key_fle'; did you mean 'key_file'?" in err
        conf.write_text(head + f'[tunnels.a]\npublic = "127.0.0.1:0"\nkey_file = "{key}"\n'
                        f'[tunnels.b]\npublic = "127.0.0.1:0"\nkey_file = "{key}"\n')
        assert run_exec_reload(conf, relay.pid) == (0, "")
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        relay.wait_log("reload done")
        # The bad file never reached the relay: one reload, the good one.
        assert sum("reloading the configuration" in line for line in relay.lines) == 1
        assert "reload failed" not in relay.log()
    finally:
        relay.stop()
        notify.close()


def test_an_agent_units_reload_of_a_bad_file_fails_and_a_good_one_applies(tmp_path):
    key = tmp_path / "key"
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    echo = Echo()
    tcp = free_port()
    conf = tmp_path / "uot-server-dns.toml"
    good = f'listen = "{LOCAL}:{tcp}"\ntarget = "{LOCAL}:{echo.port}"\nkey_file = "{key}"\n'
    conf.write_text(good)
    server = Daemon(["uot-server", "-c", conf])
    try:
        server.wait_log("carrying UDP for")
        reload = functools.partial(run_exec_reload, conf, server.pid,
                                   "udpmux-uot-server@.service",
                                   "/etc/udpmux/uot-server-%i.toml")
        conf.write_text(good + "max_client = 5\n")
        status, err = reload()
        assert status == 78 and "did you mean 'max_clients'?" in err, err
        conf.write_text(good + "max_clients = 5\n")
        assert reload() == (0, "")
        line = server.lines[server.wait_log("reloaded:")]
        assert "max_clients changed" in line, line
        # The bad file never reached the server: one reload, the good one.
        assert sum("reloading the configuration" in line for line in server.lines) == 1
    finally:
        server.stop()
        echo.close()
