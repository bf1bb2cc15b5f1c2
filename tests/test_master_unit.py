"""The master's decisions, without processes: fork, kill and reap are replaced (the seam
Master keeps for this), so each test drives workers being born, getting ready, dying
and being asked to stop, and checks what the master does.  The real processes are in
tests/test_master.py."""

import logging
import signal

import pytest

from udpmux import master as m
from udpmux.errors import EXIT_WORKER_BOOT


class Notifier:
    address = None
    pending = ()

    def __init__(self):
        self.said = []

    def ready(self, status=None):
        self.said.append(("READY", status))

    def reloading(self):
        self.said.append(("RELOADING", None))

    def stopping(self):
        self.said.append(("STOPPING", None))

    def status(self, text):
        self.said.append(("STATUS", text))

    def close(self):
        pass


class TunnelConfig:
    def __init__(self, name, setting=1):
        self.name = name
        self.setting = setting

    def endpoints(self):
        return {}                       # no sockets: nothing to bind

    def __eq__(self, other):
        return (self.name, self.setting) == (other.name, other.setting)


class Config:
    stop_timeout = 5.0

    def __init__(self, *tunnels):
        self.tunnels = {t.name: t for t in tunnels}


class Kind:
    def __init__(self, *configs):
        self.configs = list(configs)    # what each load() returns, in turn

    def load(self):
        config = self.configs.pop(0)
        if isinstance(config, Exception):
            raise config
        return config

    def shared(self, config, old):
        return None

    def worker(self, tunnel, pipe, inherited, log):
        return None

    def traffic(self, tunnels):
        return 0, 0


class FakeMaster(m.Master):
    """A Master whose workers are numbers: fork() hands out pids, kill() and reap()
    only record and replay."""

    def __init__(self, kind):
        super().__init__(kind, logging.getLogger("udpmux.test"), Notifier())
        self.next_pid = 1000
        self.killed = []
        self.exits = []

    def fork(self):
        self.next_pid += 1
        return self.next_pid

    def kill(self, pid, sig):
        self.killed.append((pid, sig))

    def reap(self):
        exits, self.exits = self.exits, []
        return exits

    # -- what a test does

    def boot(self):
        """What run() does before its loop."""
        self.config = self.kind.load()
        self.setup()
        for tunnel_config in self.config.tunnels.values():
            self.start_tunnel(self.open_tunnel(tunnel_config))
        self.check_ready()

    def all_ready(self):
        for tunnel in list(self.tunnels.values()):
            if tunnel.state == m.STARTING:
                self.worker_ready(tunnel)

    def exit(self, tunnel, code):
        self.exits.append((tunnel.pid, code))
        self.handle_chld()

    def said(self, what):
        return [text for kind, text in self.notifier.said if kind == what]


@pytest.fixture
def fake():
    made = []

    def make(*configs):
        master = FakeMaster(Kind(*configs))
        made.append(master)
        return master
    yield make
    for master in made:
        master.cleanup()


def test_ready_is_said_once_every_worker_is_ready(fake):
    master = fake(Config(TunnelConfig("a"), TunnelConfig("b")))
    master.boot()
    assert master.said("READY") == []
    first, second = master.tunnels.values()
    master.worker_ready(first)
    assert master.said("READY") == []
    master.worker_ready(second)
    assert master.said("READY") == ["2 of 2 tunnels running"]


def test_a_worker_that_cannot_boot_is_failed_not_respawned(fake):
    master = fake(Config(TunnelConfig("a"), TunnelConfig("b")))
    master.boot()
    a, b = master.tunnels.values()
    master.worker_ready(a)
    master.exit(b, EXIT_WORKER_BOOT)
    assert b.state == m.FAILED and b.respawn_at is None
    assert master.said("READY") == ["1 of 2 tunnels running, 1 failed"]


def test_when_no_tunnel_can_boot_the_master_stops_with_failure(fake):
    master = fake(Config(TunnelConfig("a")))
    master.boot()
    (a,) = master.tunnels.values()
    master.exit(a, EXIT_WORKER_BOOT)
    assert master.stopping and master.status == 1
    assert master.said("READY") == []


def test_a_crash_is_respawned_with_growing_backoff(fake):
    master = fake(Config(TunnelConfig("a")))
    master.boot()
    (a,) = master.tunnels.values()
    master.all_ready()
    backoffs = []
    for _ in range(4):
        master.exit(a, 70)
        assert a.state == m.BACKOFF
        backoffs.append(a.backoff)
        master.on_timers(a.respawn_at)
        assert a.state == m.STARTING and a.pid is not None
    assert backoffs == sorted(backoffs) and backoffs[0] > 0 and backoffs[-1] > backoffs[0]
    assert a.restarts == 4


def test_a_reload_restarts_changed_tunnels_after_their_worker_exits(fake):
    master = fake(Config(TunnelConfig("a"), TunnelConfig("b")),
                  Config(TunnelConfig("a", setting=2), TunnelConfig("b")))
    master.boot()
    master.all_ready()
    a, b = master.tunnels["a"], master.tunnels["b"]
    old_pid = a.pid
    master.handle_hup()
    assert a.state == m.STOPPING and a.replacement is not None
    assert b.state == m.RUNNING                     # unchanged: left alone
    assert master.said("READY")[-1:] == ["2 of 2 tunnels running"]    # not yet again
    master.exit(a, 0)
    new = master.tunnels["a"]
    assert new is a.replacement and new.state == m.STARTING and new.pid != old_pid
    master.worker_ready(new)
    assert len(master.said("READY")) == 2


def test_a_reload_that_fails_keeps_everything_and_says_so(fake):
    from udpmux.errors import ConfigError
    master = fake(Config(TunnelConfig("a")), ConfigError("f: bad"), Config(TunnelConfig("a")))
    master.boot()
    master.all_ready()
    (a,) = master.tunnels.values()
    master.handle_hup()
    assert master.tunnels["a"] is a and a.state == m.RUNNING
    assert master.said("READY")[-1].startswith("reload failed: f: bad;")
    master.handle_hup()                             # a good one clears it
    assert not master.said("READY")[-1].startswith("reload failed")


def test_a_removed_tunnel_stops_and_goes(fake):
    master = fake(Config(TunnelConfig("a"), TunnelConfig("b")), Config(TunnelConfig("b")))
    master.boot()
    master.all_ready()
    a = master.tunnels["a"]
    master.handle_hup()
    assert a.state == m.STOPPING
    master.exit(a, 0)
    assert list(master.tunnels) == ["b"]


def test_sigterm_stops_every_worker_and_a_stubborn_one_is_killed(fake):
    master = fake(Config(TunnelConfig("a")))
    master.boot()
    master.all_ready()
    (a,) = master.tunnels.values()
    master.handle_term(signal.SIGTERM)
    assert a.state == m.STOPPING and master.stopping
    master.on_timers(a.kill_at)
    assert (a.pid, signal.SIGKILL) in master.killed
    master.exit(a, -9)
    assert not master.by_pid


def test_a_worker_ready_after_it_was_asked_to_stop_stays_stopping(fake):
    master = fake(Config(TunnelConfig("a")))
    master.boot()
    (a,) = master.tunnels.values()
    master.handle_term(signal.SIGTERM)
    master.worker_ready(a)
    assert a.state == m.STOPPING


@pytest.mark.parametrize("start, bad", [(m.RUNNING, m.FAILED), (m.FAILED, m.RUNNING),
                                        (m.STOPPING, m.RUNNING), (m.NEW, m.RUNNING)])
def test_a_tunnel_refuses_a_change_of_state_that_has_no_way(start, bad):
    tunnel = m.Tunnel(TunnelConfig("a"), {}, None)
    tunnel.state = start
    with pytest.raises(RuntimeError, match=f"no way from {start} to {bad}"):
        tunnel.change_state(bad)
