"""Running udpmux as a service: status and metrics agree with the traffic, systemd units
verify, sd_notify reports the traffic."""

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from procs import (
    ROOT, WAIT, Daemon, Echo, Notify, deadline_loop, env, exchange, free_port, status,
    udp_client, udpmux_argv,
)

LOCAL = "127.0.0.1"


@pytest.fixture
def service(tmp_path):
    """A relay with one tunnel, metrics on, and its exposer: (relay, ports, urls)."""
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    public, register = free_port(), free_port()
    control = str(tmp_path / "control.sock")
    config = tmp_path / "relay.toml"
    config.write_text(f'control_socket = "{control}"\nmetrics_listen = "{LOCAL}:0"\n'
                      f'[tunnels.wg]\npublic = "{LOCAL}:{public}"\n'
                      f'register = "{LOCAL}:{register}"\nkey_file = "{key}"\n')
    notify = Notify(str(tmp_path))
    echo = Echo()
    relay = Daemon(["relay", "-c", config], notify=notify)
    exposer = None
    try:
        notify.wait_for("READY=1")
        line = relay.lines[relay.wait_log("metrics at http://")]
        url = re.search(r"(http://\S+/metrics)", line).group(1)
        exposer = Daemon(["expose", "--relay", f"{LOCAL}:{register}", "--service",
                          f"{LOCAL}:{echo.port}", "--key-file", key])
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
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


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
    assert f"metrics_listen: cannot listen on {LOCAL}:{port}" in out.stderr


# -- systemd units

UNITS = ["udpmux-relay.service", "udpmux-expose@.service", "udpmux-punch@.service"]


def unit(name):
    with open(os.path.join(ROOT, "conf", "systemd", name)) as f:
        return f.read()


def settings(text):
    found = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
@pytest.mark.parametrize("name", UNITS)
def test_units_pass_systemd_analyze_verify(tmp_path, name):
    # The units call udpmux by name, which systemd finds in /usr/local/bin or /usr/bin
    # once installed; here the checkout's bin/udpmux stands in for it.
    text = unit(name).replace("ExecStart=udpmux ", f"ExecStart={ROOT}/bin/udpmux ")
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
                       "PrivateTmp": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
                       "Restart": "on-failure"}.items():
        assert found.get(key) == [value], f"{name}: {key}"
    assert "man:udpmux(8)" in found["Documentation"][0]
    assert "78" in found["RestartPreventExitStatus"][0].split()


def test_the_relay_unit_is_a_notify_service_that_reloads_with_sighup():
    found = settings(unit("udpmux-relay.service"))
    assert found["Type"] == ["notify"] and found["KillMode"] == ["mixed"]
    assert found["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert found["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert found["ExecStart"] == ["udpmux relay -c /etc/udpmux/relay.toml"]


@pytest.mark.parametrize("mode", ["expose", "punch"])
def test_the_templates_pick_their_file_by_instance_name(mode):
    found = settings(unit(f"udpmux-{mode}@.service"))
    assert found["ExecStart"] == [f"udpmux {mode} -c /etc/udpmux/{mode}-%i.toml"]
    assert found.get("AmbientCapabilities") is None


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed (apt-get install systemd)")
def test_the_sysusers_file_creates_the_udpmux_user(tmp_path):
    (tmp_path / "etc").mkdir()
    out = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                          ROOT + "/conf/systemd/udpmux.sysusers"],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^udpmux:x:\d+:\d+:", (tmp_path / "etc/passwd").read_text(), re.M)
