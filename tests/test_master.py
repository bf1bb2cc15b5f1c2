"""The master and its workers: start, respawn, reload, stop, as real processes."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from procs import (
    ROOT, WAIT, Daemon, Echo, Notify, deadline_loop, env, exchange, free_port, status,
    udp_client, udpmux_argv,
)

LOCAL = "127.0.0.1"


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Relay:
    """A relay master started from a TOML file that the test can rewrite and reload."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.config = tmp_path / "relay.toml"
        self.control = str(tmp_path / "control.sock")
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.notify = Notify(str(tmp_path))
        self.daemons = []
        self.echo = Echo()
        self.ports = {}

    def write(self, *names, extra=""):
        text = f'control_socket = "{self.control}"\nstop_timeout = 3\n{extra}\n'
        for name in names:
            public, register = self.ports.setdefault(name, (free_port(), free_port()))
            text += textwrap.dedent(f"""
                [tunnels.{name}]
                public = "{LOCAL}:{public}"
                register = "{LOCAL}:{register}"
                key_file = "{self.key}"
                """)
        self.config.write_text(text)

    def start(self):
        self.master = Daemon(["relay", "-c", self.config, "--debug"], notify=self.notify)
        self.daemons.append(self.master)
        return self.notify.wait_for("READY=1")

    def expose(self, name):
        daemon = Daemon(["expose", "--relay", f"{LOCAL}:{self.ports[name][1]}",
                         "--service", f"{LOCAL}:{self.echo.port}", "--key-file", self.key])
        self.daemons.append(daemon)
        daemon.wait_log("registered with the relay")
        return daemon

    def tunnels(self):
        return {t["name"]: t for t in status(self.control)["tunnels"]}

    def workers(self):
        return {name: t["worker_pid"] for name, t in self.tunnels().items()}

    def reload(self):
        self.master.signal(signal.SIGHUP)
        self.notify.wait_for("RELOADING=1")
        return self.notify.wait_for("READY=1")

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.echo.close()
        self.notify.close()


@pytest.fixture
def relay(tmp_path):
    r = Relay(tmp_path)
    yield r
    r.close()


def test_two_tunnels_from_a_config_file_come_up(relay):
    relay.write("alpha", "beta")
    fields = relay.start()
    assert "STATUS=2 of 2 tunnels running" in fields
    workers = relay.workers()
    assert sorted(workers) == ["alpha", "beta"]
    assert sorted(relay.master.children()) == sorted(workers.values())


def test_a_killed_worker_is_respawned_with_its_flows_and_the_other_is_untouched(relay):
    relay.write("alpha", "beta")
    relay.start()
    relay.expose("alpha")
    clients = [udp_client() for _ in range(3)]
    for client in clients:
        assert exchange(client, b"hi", (LOCAL, relay.ports["alpha"][0])) == b"hi"
    for _ in deadline_loop(what="flows in the table"):
        if relay.tunnels()["alpha"]["flows"] == 3:
            break
    before = relay.workers()
    os.kill(before["alpha"], signal.SIGKILL)
    for _ in deadline_loop(what="a respawned worker"):
        tunnels = relay.tunnels()
        if tunnels["alpha"]["state"] == "running" and tunnels["alpha"]["worker_pid"] != before["alpha"]:
            break
    assert tunnels["alpha"]["flows"] == 3             # the table outlived the worker
    assert tunnels["alpha"]["restarts"] == 1
    assert tunnels["beta"]["worker_pid"] == before["beta"]
    for client in clients:
        assert exchange(client, b"again", (LOCAL, relay.ports["alpha"][0])) == b"again"


def test_sighup_starts_added_tunnels_stops_removed_ones_and_leaves_the_rest(relay):
    relay.write("alpha", "beta")
    relay.start()
    before = relay.workers()
    relay.write("alpha", "gamma")
    fields = relay.reload()
    assert "STATUS=2 of 2 tunnels running" in fields
    after = relay.workers()
    assert sorted(after) == ["alpha", "gamma"]
    assert after["alpha"] == before["alpha"]          # unchanged: the same process
    assert not alive(before["beta"])                  # removed: its worker is gone ...
    freed = subprocess.run([sys.executable, "-c", f"""
import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{LOCAL}", {relay.ports["beta"][0]}))"""], capture_output=True)
    assert freed.returncode == 0                      # ... and so is its port


def test_a_changed_tunnel_gets_a_new_worker_and_keeps_its_flows(relay):
    relay.write("alpha")
    relay.start()
    relay.expose("alpha")
    client = udp_client()
    assert exchange(client, b"hi", (LOCAL, relay.ports["alpha"][0])) == b"hi"
    before = relay.workers()
    relay.write("alpha", extra="[defaults]\nflow_idle = 600")
    relay.reload()
    after = relay.workers()
    assert after["alpha"] != before["alpha"]
    assert relay.tunnels()["alpha"]["flows"] == 1
    assert exchange(client, b"still", (LOCAL, relay.ports["alpha"][0])) == b"still"


def bad_reload(relay):
    """SIGHUP the master after a bad edit; return the fields of its READY=1, which must
    follow RELOADING=1 promptly (systemd waits for it) and say that the reload failed."""
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_for("RELOADING=1")
    fields = relay.notify.wait_for("READY=1")
    said = [f for f in fields if f.startswith("STATUS=")]
    assert said and said[0].startswith("STATUS=reload failed: "), fields
    assert "the running configuration stays" in said[0], fields
    # `udpmux status` says so too, as JSON and in its table.
    reason = said[0].split("STATUS=reload failed: ")[1].split("; the running")[0]
    assert status(relay.control)["reload_error"] == reason
    table = subprocess.run(udpmux_argv("status", "--control-socket", relay.control),
                           env=env(), capture_output=True, text=True, timeout=WAIT)
    assert f"reload failed: {reason}; the running configuration stays" in table.stdout
    return fields


def still_serving(relay, before):
    """The same workers run, and a datagram goes through the tunnel and back."""
    assert relay.workers() == before
    relay.expose("alpha")
    client = udp_client()
    assert exchange(client, b"served", (LOCAL, relay.ports["alpha"][0])) == b"served"
    assert relay.master.proc.poll() is None
    assert "Traceback" not in relay.master.log()


@pytest.mark.parametrize("added, message", [
    ("max_flow = 3", "unknown setting 'max_flow'"),
    ("[tunnels.beta]\npublic = '127.0.0.1:{port}'\ninsecure = true\nmax_flows = 100000000000",
     "max_flows: expected at most 16777216 flows"),
    ("[tunnels.beta]\npublic = '127.0.0.1:{port}'\ninsecure = true\nmax_flows = 100000000",
     "max_flows: expected at most 16777216 flows"),
    ("[tunnels.beta]\npublic = '127.0.0.1:{port}'\nkey_file = '{key}/inside'",
     "cannot read the key file: Not a directory"),
    ("[tunnels.beta]\npublic = '127.0.0.1:{port}'\nkey_file = '{fifo}'",
     "is a FIFO, not a key file"),
    ("[tunnels.beta]\npublic = '127.0.0.1:{port}'\nkey_file = '/dev/zero'",
     "/dev/zero: is a character device, not a key file"),
    ("[tunnels.beta]\npublic = '127.0.0.1:{port}'\ninsecure = true\nflow_idle = inf",
     "flow_idle: expected a number above 0, got inf"),
    ("[tunnels.beta]\npublic = '[]:{port}'\ninsecure = true", "the address in brackets is missing"),
])
def test_a_broken_config_on_reload_keeps_the_running_one(relay, added, message):
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    fifo = relay.tmp / "fifo"
    os.mkfifo(fifo)
    added = added.format(port=free_port(), key=relay.key, fifo=fifo)
    relay.config.write_text(relay.config.read_text() + "\n" + added + "\n")
    fields = bad_reload(relay)
    assert any(message in f for f in fields), fields
    line = relay.master.wait_log("reload failed; the running configuration stays")
    assert message in relay.master.lines[line]
    still_serving(relay, before)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 not text", bytes(range(256)) * 16],
                         ids=["non-utf8", "random"])
def test_a_config_file_of_bytes_on_reload_keeps_the_running_one(relay, content):
    # tomllib raised UnicodeDecodeError: the master died with a traceback (exit 70)
    # and took every worker with it.
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    relay.config.write_bytes(content)
    fields = bad_reload(relay)
    assert any("not UTF-8 text" in f for f in fields), fields
    still_serving(relay, before)


@pytest.mark.parametrize("what", ["fifo", "directory"])
def test_a_config_path_that_became_a_fifo_or_a_directory_on_reload(relay, what):
    # A FIFO blocked the master in open() for ever: no signal, no worker respawn.
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    relay.config.unlink()
    if what == "fifo":
        os.mkfifo(relay.config)
    else:
        relay.config.mkdir()
    fields = bad_reload(relay)
    assert any(f"is a {'FIFO' if what == 'fifo' else 'directory'}" in f for f in fields)
    still_serving(relay, before)


def test_a_control_socket_path_too_long_on_reload_keeps_the_running_one(relay):
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    long = "/tmp/" + "x" * 120
    relay.config.write_text(relay.config.read_text().replace(relay.control, long))
    fields = bad_reload(relay)
    assert any("control_socket: control socket path is 125 bytes; at most 107" in f
               for f in fields), fields
    still_serving(relay, before)


def test_memory_refused_for_a_new_tunnel_on_reload_keeps_the_running_one(relay):
    """mmap() of a new tunnel's flow table fails (ENOMEM under an address-space limit):
    the reload fails as a whole, and a changed tunnel keeps its worker."""
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    master = psutil.Process(relay.master.pid)
    room = master.memory_info().vms + (256 << 20)
    _soft, hard = master.rlimit(psutil.RLIMIT_AS)
    master.rlimit(psutil.RLIMIT_AS, (room, hard))
    # alpha changes (it would get a new worker) and beta needs a 3 GiB table.
    relay.write("alpha", "beta", extra="[defaults]\nflow_idle = 600")
    text = relay.config.read_text().replace("[tunnels.beta]", "[tunnels.beta]\nmax_flows = 16777216")
    relay.config.write_text(text)
    fields = bad_reload(relay)
    assert any("tunnel beta: cannot map its shared memory" in f for f in fields), fields
    relay.master.wait_log("reload failed; the running configuration stays: tunnel beta")
    assert sorted(relay.tunnels()) == ["alpha"]
    still_serving(relay, before)
    # A table that fits is mapped: the failed reload left nothing in the way.
    relay.config.write_text(text.replace("max_flows = 16777216", "max_flows = 4096"))
    fields = relay.reload()
    assert "STATUS=2 of 2 tunnels running" in fields
    assert relay.workers()["alpha"] != before["alpha"]


def test_a_port_taken_on_reload_changes_nothing(relay):
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    with udp_client() as taken:
        port = taken.getsockname()[1]
        relay.write("alpha", "beta", extra="[defaults]\nflow_idle = 600")
        relay.config.write_text(relay.config.read_text().replace(
            f"{LOCAL}:{relay.ports['beta'][0]}", f"{LOCAL}:{port}"))
        fields = bad_reload(relay)
    assert any(f"cannot bind {LOCAL}:{port}: Address already in use" in f for f in fields)
    assert sorted(relay.tunnels()) == ["alpha"]
    still_serving(relay, before)                # alpha's change waits for a good reload


def test_a_second_reload_while_a_changed_worker_still_stops(relay):
    """The old worker cannot stop (SIGSTOP) until it is killed at stop_timeout; a reload
    in that time found the new register port bound by the replacement that waits, and
    failed.  Now it sees that the replacement already has those settings."""
    relay.write("alpha")
    relay.start()
    before = relay.workers()
    os.kill(before["alpha"], signal.SIGSTOP)
    relay.ports["alpha"] = (relay.ports["alpha"][0], free_port())
    relay.write("alpha")
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_for("RELOADING=1")
    first = relay.master.wait_log("settings changed; restarting its worker")
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_for("RELOADING=1")
    fields = relay.notify.wait_for("READY=1")      # once the stopped worker is killed
    assert "STATUS=1 of 1 tunnels running" in fields, fields
    log = relay.master.log()
    assert "cannot bind" not in log and "reload failed" not in log, log
    assert log.count("settings changed") == 1, relay.master.lines[first:]
    assert relay.workers()["alpha"] != before["alpha"]
    relay.expose("alpha")                           # at the new register port
    client = udp_client()
    assert exchange(client, b"moved", (LOCAL, relay.ports["alpha"][0])) == b"moved"


def test_a_tunnel_removed_and_given_back_before_its_worker_exited(relay):
    """Removed by one reload and back in the next, while its worker still stops: the
    tunnel used to vanish when that worker exited."""
    relay.write("alpha", "beta")
    relay.start()
    before = relay.workers()
    os.kill(before["alpha"], signal.SIGSTOP)
    relay.write("beta")
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_for("RELOADING=1")
    relay.master.wait_log("tunnel alpha: removed from the configuration")
    relay.write("alpha", "beta")
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_for("RELOADING=1")
    relay.master.wait_log("tunnel alpha: back in the configuration")
    fields = relay.notify.wait_for("READY=1")
    assert "STATUS=2 of 2 tunnels running" in fields, fields
    after = relay.workers()
    assert sorted(after) == ["alpha", "beta"] and after["beta"] == before["beta"]
    assert after["alpha"] != before["alpha"]
    relay.expose("alpha")
    client = udp_client()
    assert exchange(client, b"back", (LOCAL, relay.ports["alpha"][0])) == b"back"


def test_sigterm_stops_everything_within_the_deadline(relay):
    relay.write("alpha", "beta")
    relay.start()
    workers = list(relay.workers().values())
    relay.master.signal(signal.SIGTERM)
    relay.notify.wait_for("STOPPING=1")
    assert relay.master.proc.wait(WAIT) == 0
    for pid in workers:
        assert not alive(pid)
    assert not os.path.exists(relay.control)


@pytest.mark.parametrize("text, message", [
    ("", "no tunnels"),
    ("[tunnels.a]\npublic = '127.0.0.1:1'\ninsecure = true\nmax_flows = 0",
     "max_flows: expected a whole number of at least 1"),
    ("[tunnels.a]\npublic = '127.0.0.1:1'\ninsecure = true\nmax_flow = 5",
     "unknown setting 'max_flow'; did you mean 'max_flows'?"),
    ("[tunnels.a]\npublic = '127.0.0.1:1'", "key_file: missing"),
    ("[tunnels.a]\npublic = 'nowhere'\ninsecure = true", "expected HOST:PORT"),
    ("[tunnels.a\n", "not valid TOML"),
    ("[tunnels.a]\npublic = '127.0.0.1:7'\ninsecure = true\n"
     "[tunnels.b]\npublic = '127.0.0.1:7'\ninsecure = true", "already tunnel a's public"),
])
def test_a_bad_config_is_refused_at_start_with_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run(udpmux_argv("relay", "-c", path), env=env(), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 78
    assert str(path) in out.stderr and message in out.stderr


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with udp_client() as taken:
        port = taken.getsockname()[1]
        out = subprocess.run(udpmux_argv("relay", "--public", f"{LOCAL}:{port}", "--insecure"),
                             env=env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 71
    assert f"cannot bind {LOCAL}:{port}: Address already in use" in out.stderr


# -- workers that misbehave on purpose (tests/fakekind.py)

def fake(tmp_path, mode):
    notify = Notify(str(tmp_path))
    daemon = Daemon([], notify=notify,
                    argv=[sys.executable, os.path.join(ROOT, "tests", "fakekind.py"), mode])
    return daemon, notify


@pytest.mark.parametrize("mode, why", [
    ("boot-fails", "cannot start: the fake resource is missing"),
    ("setup-raises", "cannot start: RuntimeError: tag table header is damaged, on purpose")])
def test_a_worker_that_cannot_boot_is_not_respawned(tmp_path, mode, why):
    daemon, notify = fake(tmp_path, mode)
    try:
        # With its only tunnel failed, the master has nothing to serve: it says why and
        # exits non-zero, without READY=1, instead of respawning the worker forever.
        assert daemon.proc.wait(WAIT) == 1
        daemon.wait_log(why)
        daemon.wait_log("not respawning it until the next reload")
        daemon.wait_log("no tunnel could start; stopping")
        assert not any("READY=1" in fields for fields in notify.seen)
        assert daemon.log().count("started") == 1
    finally:
        daemon.stop()
        notify.close()


def test_a_crashing_worker_is_respawned_with_backoff(tmp_path):
    daemon, notify = fake(tmp_path, "crashes")
    try:
        first = daemon.wait_log("died (status 70); respawning")
        daemon.wait_log("died (status 70); respawning", start=first + 1)
        assert "a bug, on purpose" in daemon.log()
    finally:
        daemon.stop()
        notify.close()


def test_a_worker_the_master_cannot_make_again_does_not_end_the_master(tmp_path):
    daemon, notify = fake(tmp_path, "unbuildable")
    try:
        notify.wait_for("READY=1")
        (worker,) = daemon.children()
        os.kill(worker, signal.SIGKILL)
        first = daemon.wait_log("cannot start its worker: RuntimeError: the fake kind cannot")
        daemon.wait_log("cannot start its worker", start=first + 1)    # and again, later
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.log()
    finally:
        daemon.stop()
        notify.close()


def test_a_failed_reload_stays_in_the_status_until_one_works(relay):
    relay.write("alpha")
    relay.start()
    relay.config.write_text(relay.config.read_text() + "\nmax_flow = 3\n")
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_match(lambda f: any(x.startswith("STATUS=reload failed") for x in f))
    # The traffic figures that follow every few seconds keep saying so.
    later = relay.notify.wait_match(lambda f: any("datagrams/s" in x for x in f), timeout=WAIT)
    assert any(x.startswith("STATUS=reload failed: ") for x in later), later
    relay.write("alpha")
    relay.master.signal(signal.SIGHUP)
    relay.notify.wait_match(lambda f: any(x.startswith("STATUS=") and "reload failed" not in x
                                          for x in f))


def test_a_worker_that_will_not_stop_is_killed_at_the_deadline(tmp_path):
    daemon, notify = fake(tmp_path, "stubborn")
    try:
        notify.wait_for("READY=1")
        (worker,) = daemon.children()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(WAIT) == 0
        daemon.wait_log("did not stop in time; killing it")
        assert not alive(worker)
    finally:
        daemon.stop()
        notify.close()


def test_workers_exit_when_the_master_dies(relay):
    relay.write("alpha", "beta")
    relay.start()
    workers = list(relay.workers().values())
    relay.master.signal(signal.SIGKILL)
    relay.master.proc.wait(WAIT)
    for pid in workers:                 # each sees EOF on its control pipe and stops
        for _ in deadline_loop(what=f"worker {pid} to exit"):
            if not alive(pid):
                break


def test_a_systemd_that_reads_nothing_never_blocks_the_master(relay):
    """The notify socket's queue is full and nobody reads it: reloads, status and a
    respawn go on as usual."""
    import socket
    relay.notify.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    relay.write("alpha")
    relay.master = Daemon(["relay", "-c", relay.config, "--debug"], notify=relay.notify)
    relay.daemons.append(relay.master)
    start = relay.master.wait_log("ready: 1 of 1 tunnels running")
    for _ in range(4):                  # each says RELOADING=1 and READY=1: the queue fills
        relay.master.signal(signal.SIGHUP)
        start = relay.master.wait_log("reload done", start=start + 1)
    worker = relay.workers()["alpha"]
    os.kill(worker, signal.SIGKILL)
    for _ in deadline_loop(what="a new worker, in the status"):
        tunnel = relay.tunnels()["alpha"]
        if tunnel["worker_pid"] not in (None, worker) and tunnel["state"] == "running":
            break
    relay.expose("alpha")
    assert exchange(udp_client(), b"still", (LOCAL, relay.ports["alpha"][0])) == b"still"
