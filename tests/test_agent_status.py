"""`udpmux status` and metrics on the NAT side: every agent (expose, punch, uot-server,
uot-client, link) serves its own control socket, and `udpmux status` shows what `wg show`
shows for a peer.  Real processes on loopback; the figures asked right after the
traffic, never polled for, since an agent's answer is built from its live state."""

import json
import os
import signal
import socket
import subprocess

import pytest

from procs import WAIT, Daemon, Echo, deadline_loop, env, exchange, free_port, udp_client, \
    udpmux_argv
from test_link import Servers, TcpService, link_argv
from test_ops import samples_of, scrape
from test_relay import LOCAL, Rig


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def ask(control, *extra, check=True):
    out = subprocess.run(udpmux_argv("status", "--control-socket", control, *extra),
                         env=env(), capture_output=True, text=True, timeout=WAIT)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def agent_status(control):
    return json.loads(ask(control, "--json").stdout)


def wait_up(control, role):
    for _ in deadline_loop(what=f"the {role} to be up in {control}"):
        peers = [p for p in agent_status(control)["peers"] if p["role"] == role]
        if peers and peers[0]["state"] == "up":
            return peers[0]


def test_an_exposer_shows_its_relay_flows_and_counters_as_they_are(rig):
    rig.relay()
    control = str(rig.tmp / "expose.sock")
    metrics = free_port()
    rig.expose("--control-socket", control, "--metrics-listen", f"{LOCAL}:{metrics}")
    clients = [udp_client() for _ in range(3)]
    for n, client in enumerate(clients):
        for _ in range(4):
            data = bytes([n]) * (10 * (n + 1))
            assert exchange(client, data, (LOCAL, rig.public), tries=1) == data
    # Every echo came back through the exposer: its status says so already.
    got = agent_status(control)
    assert got["mode"] == "expose" and got["pid"] == rig.daemons[-1].proc.pid
    (relay,) = got["peers"]
    assert relay["role"] == "relay" and relay["state"] == "up"
    assert relay["address"] == f"{LOCAL}:{rig.register}" and relay["carrier"] == "udp"
    assert relay["handshake_ago"] is not None and relay["heard_ago"] < WAIT
    assert relay["seen_as"].startswith(f"{LOCAL}:")
    assert got["flows"] == 3 and got["counters"]["flows"] == 3
    assert got["counters"]["datagrams_in"] == 12 and got["counters"]["datagrams_out"] == 12
    assert got["counters"]["bytes_in"] == 4 * (10 + 20 + 30)
    # Each flow is named by the source port the service sees it come from.
    ports = {f"via {LOCAL}:{port}" for _host, port in rig.echo.sources}
    assert {f["client"] for f in got["flow_list"]} == ports
    assert all(f["datagrams_in"] == 4 and f["datagrams_out"] == 4 for f in got["flow_list"])
    text = ask(control).stdout
    assert f"relay: {LOCAL}:{rig.register}" in text and "latest handshake:" in text
    assert "flows: 3/" in text and "12 datagrams" in text, text
    flows = json.loads(ask(control, "--json", "--flows", "expose").stdout)["flows"]
    assert len(flows) == 3
    samples = scrape(f"http://{LOCAL}:{metrics}/metrics")
    peer = f'{{mode="expose",role="relay",peer="{LOCAL}:{rig.register}"}}'
    assert samples["udpmux_peer_up" + peer] == 1
    assert samples['udpmux_datagrams_total{mode="expose",direction="in"}'] == 12
    assert samples['udpmux_flows{mode="expose"}'] == 3


def test_an_exposer_that_gets_no_answer_says_so_in_its_status(rig):
    rig.relay()
    other = str(rig.tmp / "other.key")
    subprocess.run(udpmux_argv("keygen", other), env=env(), check=True)
    control = str(rig.tmp / "expose.sock")
    expose = rig.expose("--control-socket", control, key=other, wait=False)
    expose.wait_log("no answer from the relay")
    (relay,) = agent_status(control)["peers"]
    assert relay["state"] == "hello" and relay["handshake_ago"] is None
    assert "HELLOs unanswered" in relay["trouble"], relay
    text = ask(control).stdout
    assert "handshaking" in text and "latest handshake: never" in text, text


def test_the_default_control_socket_and_a_second_agent_beside_it(rig, tmp_path):
    rig.relay()
    runtime = tmp_path / "run"
    runtime.mkdir()
    extra = {"RUNTIME_DIRECTORY": str(runtime)}
    first = rig.start(["expose", "--relay", f"{LOCAL}:{rig.register}", "--service",
                       f"{LOCAL}:{rig.echo.port}", "--key-file", rig.key], extra_env=extra)
    first.wait_log("registered with the relay")
    line = first.lines[first.wait_log("`udpmux status` answers at")]
    assert line.endswith(f"{runtime}/expose.sock"), line
    # `udpmux status` with no socket named finds the one agent there.
    found = subprocess.run(udpmux_argv("status", "--json"), env={**env(), **extra},
                           capture_output=True, text=True, timeout=WAIT)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["pid"] == first.proc.pid
    second = rig.start(["expose", "--relay", f"{LOCAL}:{rig.register}", "--service",
                        f"{LOCAL}:{rig.echo.port}", "--key-file", rig.key], extra_env=extra)
    line = second.lines[second.wait_log("`udpmux status` answers at")]
    assert line.endswith(f"{runtime}/expose-{second.proc.pid}.sock"), line
    both = subprocess.run(udpmux_argv("status"), env={**env(), **extra},
                          capture_output=True, text=True, timeout=WAIT)
    assert both.returncode == 64
    assert "several udpmux daemons" in both.stderr and "expose.sock" in both.stderr
    assert f"expose-{second.proc.pid}.sock" in both.stderr


def test_an_agents_flows_request_names_its_mode(rig):
    rig.relay()
    control = str(rig.tmp / "expose.sock")
    rig.expose("--control-socket", control)
    out = ask(control, "--flows", "wg", check=False)
    assert out.returncode != 0 and "--flows expose" in out.stderr


def write(path, text):
    path.write_text(text)
    return str(path)


def test_uot_from_files_both_ends_show_each_other(tmp_path):
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    echo = Echo()
    tcp, udp = free_port(), free_port()
    server_sock, client_sock = str(tmp_path / "server.sock"), str(tmp_path / "client.sock")
    server_file = write(tmp_path / "uot-server.toml",
                        f'listen = "{LOCAL}:{tcp}"\ntarget = "{LOCAL}:{echo.port}"\n'
                        f'key_file = "{key}"\ncontrol_socket = "{server_sock}"\n')
    client_file = write(tmp_path / "uot-client.toml",
                        f'listen = "{LOCAL}:{udp}"\nserver = "{LOCAL}:{tcp}"\n'
                        f'key_file = "{key}"\ncontrol_socket = "{client_sock}"\n'
                        f'metrics_listen = "{LOCAL}:0"\n')
    for mode, path in (("uot-server", server_file), ("uot-client", client_file)):
        checked = subprocess.run(udpmux_argv("check", "-c", path, "--mode", mode), env=env(),
                                 capture_output=True, text=True, timeout=WAIT)
        assert checked.returncode == 0, checked.stderr
    daemons = [Daemon(["uot-server", "-c", server_file])]
    try:
        daemons[0].wait_log("carrying UDP for")
        daemons.append(Daemon(["uot-client", "-c", client_file]))
        client = daemons[1]
        client.wait_log("connected to")
        url = client.lines[client.wait_log("metrics at http://")].split()[-1]
        sock = udp_client()
        for n in range(5):
            assert exchange(sock, b"over tcp %d" % n, (LOCAL, udp), tries=1) == b"over tcp %d" % n
        mine = agent_status(client_sock)
        (server,) = mine["peers"]
        assert server["role"] == "server" and server["state"] == "up"
        assert server["carrier"] == "tcp" and server["address"] == f"{LOCAL}:{tcp}"
        assert mine["counters"]["datagrams_in"] == 5 and mine["counters"]["datagrams_out"] == 5
        assert [f["client"] for f in mine["flow_list"]] == \
            [f"{LOCAL}:{sock.getsockname()[1]}"]
        theirs = agent_status(server_sock)
        assert theirs["mode"] == "uot-server"
        assert [p["state"] for p in theirs["peers"]] == ["up"]
        assert theirs["flows"] == 1 and theirs["counters"]["datagrams_out"] == 5
        samples = scrape(url)
        assert samples['udpmux_datagrams_total{mode="uot-client",direction="out"}'] == 5
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        echo.close()


@pytest.mark.parametrize("text, message", [
    ('listen = "127.0.0.1:1"\nkey_file = "k"\n', "target: missing"),
    ('listen = "127.0.0.1:1"\ntarget = "127.0.0.1:2"\nserver = "127.0.0.1:3"\n'
     'insecure = true\n', "server: not a uot-server's setting"),
    ('listen = "127.0.0.1:1"\ntarget = "127.0.0.1:2"\ninsecure = true\nmax_flow = 5\n',
     "did you mean 'max_flows'?"),
    ('listen = "127.0.0.1:1"\ntarget = "127.0.0.1:2"\ninsecure = true\n'
     'metrics_listen = "nowhere"\n', "metrics_listen:"),
])
def test_bad_uot_files(tmp_path, text, message):
    path = write(tmp_path / "uot.toml", text)
    out = subprocess.run(udpmux_argv("uot-server", "-c", path), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 78 and message in out.stderr, out.stderr


def test_punch_sides_show_the_direct_path(tmp_path):
    key = str(tmp_path / "key")
    subprocess.run(udpmux_argv("keygen", key), env=env(), check=True)
    echo = Echo()
    a, b, listen = free_port(), free_port(), free_port()
    forward_sock, listen_sock = str(tmp_path / "f.sock"), str(tmp_path / "l.sock")
    daemons = [
        Daemon(["punch", "--peer", f"{LOCAL}:{b}", "--port", a, "--key-file", key,
                "--forward", f"{LOCAL}:{echo.port}", "--control-socket", forward_sock]),
        Daemon(["punch", "--peer", f"{LOCAL}:{a}", "--port", b, "--key-file", key,
                "--listen", f"{LOCAL}:{listen}", "--control-socket", listen_sock]),
    ]
    try:
        for daemon in daemons:
            daemon.wait_log("`udpmux status` answers at")
        peer = wait_up(listen_sock, "peer")
        assert peer["path"] == "direct" and peer["address"] == f"{LOCAL}:{a}"
        sock = udp_client()
        assert exchange(sock, b"punched", (LOCAL, listen)) == b"punched"
        listener = agent_status(listen_sock)
        assert listener["flows"] == 1 and listener["counters"]["datagrams_out"] >= 1
        forwarder = wait_up(forward_sock, "peer")
        assert forwarder["path"] == "direct" and forwarder["address"] == f"{LOCAL}:{b}"
        assert agent_status(forward_sock)["counters"]["datagrams_in"] >= 1
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        echo.close()


@pytest.fixture
def service():
    s = TcpService()
    yield s
    s.close()


@pytest.fixture
def servers(tmp_path, monkeypatch):
    """link-servers started through tests/fakessh.py, stopped by the PIDs they gave."""
    s = Servers(tmp_path)
    monkeypatch.setenv("FAKESSH_BANNERS", str(s.banners))
    yield s
    s.close()


def test_link_shows_its_server_and_stream(service, servers, tmp_path):
    control = str(tmp_path / "link.sock")
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        listen = s.getsockname()[1]
    proc = subprocess.Popen(link_argv(service.port, "--listen-tcp", f"{LOCAL}:{listen}",
                                      "--control-socket", control, "--buffer", "2M",
                                      "--congestion", "newreno",
                                      bind=servers.bind),
                            env=env(), stderr=subprocess.DEVNULL)
    try:
        for _ in deadline_loop(what="the link's control socket"):
            if os.path.exists(control):
                break
        peer = wait_up(control, "link-server")
        assert peer["path"] == "direct" and peer["carrier"] == "udp"
        with socket.create_connection((LOCAL, listen), timeout=WAIT) as conn:
            conn.sendall(b"x" * 100_000)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        got = agent_status(control)
        assert got["mode"] == "link" and got["counters"]["bytes_out"] >= 100_000
        assert "srtt_ms" in got["stream"]
        assert got["stream"]["buffer"] == 2 << 20
        assert got["stream"]["congestion"] == "newreno"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


def test_a_control_request_that_is_not_json_gets_an_error_not_a_crash(rig):
    rig.relay()
    control = str(rig.tmp / "expose.sock")
    rig.expose("--control-socket", control)
    for request in (b"nonsense\n", b'{"request": "flows", "tunnel": 5}\n', b"[1]\n"):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(WAIT)
            conn.connect(control)
            conn.sendall(request)
            assert "error" in json.loads(conn.makefile().read())
    assert agent_status(control)["peers"][0]["state"] == "up"


def test_samples_parse(rig):
    """The agent's exposition has a HELP and TYPE before every family's samples."""
    rig.relay()
    metrics = free_port()
    rig.expose("--metrics-listen", f"{LOCAL}:{metrics}",
               "--control-socket", str(rig.tmp / "e.sock"))
    with socket.create_connection((LOCAL, metrics), timeout=WAIT) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    body = reply.partition(b"\r\n\r\n")[2].decode()
    typed = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("# HELP "):
            assert line.split("{")[0].split(" ")[0] in typed, line
    assert samples_of(body)["udpmux_uptime_seconds{}"] >= 0
