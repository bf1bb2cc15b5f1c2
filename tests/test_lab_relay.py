"""udpmux relay and udpmux expose across real NATs: the network lab of tests/lab.py.

    outside clients --> nat_out --> wan --> public: udpmux relay (master + a worker per tunnel)
                                             ^
    inside: echo service <-- udpmux expose --+-- nat_in (CG-NAT: nothing unsolicited gets in)

The exposer and the echo service run on "inside", the relay on "public", the clients on
"outside"; each process is started in its host's namespace with `ip netns exec` and stopped by
its PID. `udpmux status` and sd_notify use unix socket paths, which every namespace reaches.
Nothing waits by sleeping: readiness is READY=1, a log line, a status poll or a reply.
"""

import os
import re
import select
import shutil
import signal
import subprocess
import textwrap

import pytest

from procs import WAIT, Daemon, Echo, Notify, deadline_loop, env, exchange, status, udpmux_argv

PORTS = {"wg": (51820, 5566), "dns": (5353, 5567)}      # tunnel: (public, register) on "public"
IP = shutil.which("ip", path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin") or "ip"


class LabRig:
    """A relay on "public", exposers and echo services on "inside", clients on "outside"."""

    def __init__(self, lab, tmp_path):
        self.lab = lab
        self.key = str(tmp_path / "key")
        subprocess.run(udpmux_argv("keygen", self.key), env=env(), check=True)
        self.config = tmp_path / "relay.toml"
        self.control = str(tmp_path / "control.sock")
        self.notify = Notify(str(tmp_path))
        self.daemons = []
        self.echoes = {}
        self.clients = []

    # -- processes

    def start(self, host, args, **kw):
        daemon = Daemon(args, prefix=[IP, "netns", "exec", self.lab.ns(host)], **kw)
        self.daemons.append(daemon)
        return daemon

    def write_config(self, *names):
        text = f'control_socket = "{self.control}"\nstop_timeout = 3\n'
        for name in names:
            public, register = PORTS[name]
            text += textwrap.dedent(f"""
                [tunnels.{name}]
                public = "0.0.0.0:{public}"
                register = "0.0.0.0:{register}"
                key_file = "{self.key}"
                """)
        self.config.write_text(text)

    def relay(self, *names):
        self.write_config(*names)
        self.master = self.start("public", ["relay", "-c", self.config, "--debug"],
                                 notify=self.notify)
        self.notify.wait_for("READY=1")
        return self.master

    def reload(self, *names):
        self.write_config(*names)
        self.master.signal(signal.SIGHUP)
        self.notify.wait_for("RELOADING=1")
        return self.notify.wait_for("READY=1")

    def echo(self, name):
        """An echo service on inside's loopback (a thread; its socket lives in inside)."""
        with self.lab.netns("inside"):
            echo = self.echoes[name] = Echo("127.0.0.1")
        return echo

    def expose(self, name, *extra):
        echo = self.echoes.get(name) or self.echo(name)
        daemon = self.start("inside", [
            "expose", "--relay", f"{self.lab.addr('public')}:{PORTS[name][1]}",
            "--service", f"127.0.0.1:{echo.port}", "--key-file", self.key, "--debug", *extra])
        daemon.wait_log("registered with the relay")
        return daemon

    # -- clients and status

    def client(self, timeout=1.0):
        sock = self.lab.socket("outside", bind=("0.0.0.0", 0))
        sock.settimeout(timeout)
        self.clients.append(sock)
        return sock

    def public(self, name):
        return (self.lab.addr("public"), PORTS[name][0])

    def tunnels(self):
        return {t["name"]: t for t in status(self.control)["tunnels"]}

    def wait_tunnel(self, name, what, check):
        """Poll the relay's status until check(tunnel) holds; return that tunnel."""
        for _ in deadline_loop(what=what):
            t = self.tunnels()[name]
            if check(t):
                return t

    def close(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
        for echo in self.echoes.values():
            echo.close()
        for sock in self.clients:
            sock.close()
        self.notify.close()


@pytest.fixture
def rig(lab, tmp_path):
    r = LabRig(lab, tmp_path)
    try:
        yield r
    finally:
        r.close()


def exposer_host(t):
    """The host part of the exposer's address as the relay sees it, or None."""
    return t["exposer"] and t["exposer"]["address"].rsplit(":", 1)[0]


def talk(rig, name, clients, rounds=3):
    """Every client exchanges `rounds` datagrams of its own; each reply must be its own."""
    for round_ in range(rounds):
        for n, client in enumerate(clients):
            data = f"{name} client {n} round {round_}".encode()
            assert exchange(client, data, rig.public(name)) == data


def test_clients_behind_one_nat_reach_a_service_behind_another(rig):
    rig.relay("wg")
    exposer = rig.expose("wg")
    t = rig.tunnels()["wg"]         # as soon as it registered: it has just heard from it
    assert t["exposer"]["heard_ago"] <= t["exposer"]["registered_ago"] < WAIT
    clients = [rig.client() for _ in range(5)]
    talk(rig, "wg", clients)
    assert len(rig.echoes["wg"].sources) == 5       # one service socket per client
    t = rig.wait_tunnel("wg", "counters", lambda t: t["counters"]["datagrams_out"] >= 15)
    assert t["flows"] == 5 and t["counters"]["datagrams_in"] >= 15
    # The relay sees the exposer at nat_in's public address, never at its LAN address.
    assert exposer_host(t) == rig.lab.public_addr("in")
    assert exposer_host(t) != rig.lab.addr("inside")
    assert f"which sees us as {t['exposer']['address']}" in exposer.log()


def exchange_many(rig, name, clients, count, window=50, quiet=0.3):
    """Each client sends `count` numbered requests, `window` at a time; every request that
    has no reply after `quiet` seconds without a datagram is sent again, until each one is
    answered. Returns how many requests were sent in all."""
    dest = rig.public(name)
    missing = [set(range(count)) for _ in clients]
    sent = 0
    for _ in deadline_loop(4 * WAIT, f"{count} replies for each of {len(clients)} clients"):
        if not any(missing):
            return sent
        burst = 0
        for n, client in enumerate(clients):
            for i in sorted(missing[n])[:window]:
                client.sendto(b"%d %d" % (n, i), dest)
                burst += 1
        sent += burst
        for _ in range(burst):              # at most one reply per request sent
            ready, _, _ = select.select(clients, [], [], quiet)
            if not ready:
                break
            for client in ready:
                n, i = map(int, client.recv(100).split())
                assert client is clients[n], "a reply reached the wrong client"
                missing[n].discard(i)


def test_flows_survive_five_percent_loss_without_a_new_session(rig):
    rig.relay("wg")
    exposer = rig.expose("wg", "--keepalive", "1")
    clients = [rig.client() for _ in range(4)]
    talk(rig, "wg", clients, rounds=1)
    before = rig.wait_tunnel("wg", "the first flows", lambda t: t["flows"] == 4)
    sources = set(rig.echoes["wg"].sources)
    rig.lab.set_loss(5)
    sent = exchange_many(rig, "wg", clients, 200)
    assert sent > 800                               # some were lost and sent again ...
    assert rig.lab.counter("wan", "loss") > 0       # ... by the WAN, really
    # The same session and the same flows carried it all: nothing had to start over.
    t = rig.wait_tunnel("wg", "the counters", lambda t: t["counters"]["datagrams_out"] >= 804)
    assert t["counters"]["sessions"] == before["counters"]["sessions"] == 1
    assert t["exposer"]["address"] == before["exposer"]["address"]
    assert t["flows"] == 4 and t["counters"]["flows"] == 4
    assert rig.echoes["wg"].sources == sources
    assert "registering again" not in exposer.log()


def test_the_inside_nat_changes_address_and_the_flows_follow(rig):
    rig.relay("wg")
    exposer = rig.expose("wg", "--keepalive", "1")
    clients = [rig.client() for _ in range(3)]
    talk(rig, "wg", clients)
    sources = set(rig.echoes["wg"].sources)
    old = rig.lab.public_addr("in")
    rig.wait_tunnel("wg", "the exposer", lambda t: exposer_host(t) == old)
    new = rig.lab.roam("in")
    assert new != old
    # The exposer's next keepalive (1 s) leaves from the new address; the relay follows.
    rig.wait_tunnel("wg", f"the relay to see the exposer at {new}",
                    lambda t: exposer_host(t) == new)
    talk(rig, "wg", clients)
    assert rig.echoes["wg"].sources == sources      # the same tags, the same service sockets
    t = rig.wait_tunnel("wg", "the counters", lambda t: t["counters"]["datagrams_out"] >= 18)
    assert t["counters"]["roams"] == 1
    assert t["counters"]["sessions"] == 1 and t["flows"] == 3
    assert "registering again" not in exposer.log()


def test_a_killed_worker_comes_back_and_flows_across_the_nats_carry_on(rig):
    relay = rig.relay("wg")
    rig.expose("wg")
    clients = [rig.client() for _ in range(3)]
    talk(rig, "wg", clients)
    sources = set(rig.echoes["wg"].sources)
    before = rig.wait_tunnel("wg", "the flows", lambda t: t["flows"] == 3 and t["exposer"])
    worker = before["worker_pid"]
    assert relay.children() == [worker]
    os.kill(worker, signal.SIGKILL)
    t = rig.wait_tunnel("wg", "a new worker", lambda t: t["state"] == "running"
                        and t["worker_pid"] not in (None, worker))
    assert t["restarts"] == 1 and t["flows"] == 3
    assert relay.children() == [t["worker_pid"]]
    talk(rig, "wg", clients)
    assert rig.echoes["wg"].sources == sources      # the same tags, the same service sockets
    relay.wait_log("carries on with the exposer")
    t = rig.wait_tunnel("wg", "the exposer", lambda t: t["exposer"])
    assert exposer_host(t) == rig.lab.public_addr("in")


def test_a_tunnel_added_by_sighup_works_and_the_first_keeps_its_worker(rig):
    relay = rig.relay("wg")
    rig.expose("wg")
    wg_clients = [rig.client() for _ in range(3)]
    talk(rig, "wg", wg_clients)
    wg_sources = set(rig.echoes["wg"].sources)
    before = rig.wait_tunnel("wg", "the flows", lambda t: t["flows"] == 3)
    fields = rig.reload("wg", "dns")
    assert "STATUS=2 of 2 tunnels running" in fields
    rig.expose("dns")
    dns_clients = [rig.client() for _ in range(2)]
    talk(rig, "dns", dns_clients)
    talk(rig, "wg", wg_clients)
    # Each tunnel reached its own service; the first one's flows never moved.
    assert len(rig.echoes["dns"].sources) == 2
    assert rig.echoes["wg"].sources == wg_sources
    tunnels = rig.tunnels()
    assert tunnels["wg"]["worker_pid"] == before["worker_pid"]
    assert tunnels["wg"]["restarts"] == 0 and tunnels["wg"]["flows"] == 3
    assert tunnels["wg"]["counters"]["sessions"] == before["counters"]["sessions"] == 1
    assert exposer_host(tunnels["dns"]) == rig.lab.public_addr("in")
    assert sorted(relay.children()) == sorted(t["worker_pid"] for t in tunnels.values())


def nat_mapping(lab, side, host, port):
    """The public address:port a NAT router maps host's UDP flow to public:port to."""
    pattern = (rf"src={re.escape(lab.addr(host))} dst={re.escape(lab.addr('public'))} "
               rf"sport=\d+ dport={port} src=\S+ dst=(\S+) sport={port} dport=(\d+)")
    found = re.search(pattern, lab.conntrack("nat_" + side))
    assert found, f"no mapping for {host} on nat_{side}:\n" + lab.conntrack("nat_" + side)
    return f"{found[1]}:{found[2]}"


def test_an_exposer_behind_a_symmetric_nat_still_works(rig):
    rig.lab.set_symmetric("in", True)           # a random public port per destination
    rig.lab.set_symmetric("out", True)          # and the clients behind one too
    rig.relay("wg")
    rig.expose("wg")
    clients = [rig.client() for _ in range(3)]
    talk(rig, "wg", clients)
    assert len(rig.echoes["wg"].sources) == 3
    t = rig.wait_tunnel("wg", "the exposer", lambda t: t["exposer"])
    # The exposer dialled out, so the relay answers the mapping the NAT drew for it.
    assert t["exposer"]["address"] == nat_mapping(rig.lab, "in", "inside", PORTS["wg"][1])


def test_an_exposer_whose_udp_is_blocked_says_so_and_tcp_gets_through(rig):
    """The inside NAT's UDP is dropped on the way: the exposer says that nothing answers,
    why it may be, and to try --carrier tcp; which then works through the same NAT."""
    rig.relay("wg")
    rig.lab.block_udp(True, side="in")
    try:
        echo = rig.echo("wg")
        relay = f"{rig.lab.addr('public')}:{PORTS['wg'][1]}"
        udp = rig.start("inside", ["expose", "--relay", relay, "--service",
                                   f"127.0.0.1:{echo.port}", "--key-file", rig.key])
        line = udp.lines[udp.wait_log(f"no answer from the relay at {relay}")]
        assert "UDP to it is blocked" in line and "try --carrier tcp" in line, line
        udp.stop()
        tcp = rig.start("inside", ["expose", "--relay", relay, "--service",
                                   f"127.0.0.1:{echo.port}", "--key-file", rig.key,
                                   "--carrier", "tcp"])
        tcp.wait_log("registered with the relay")
        talk(rig, "wg", [rig.client()], rounds=1)
    finally:
        rig.lab.block_udp(False)


@pytest.mark.skipif(not shutil.which("dnsmasq", path=os.defpath + ":/usr/sbin"),
                    reason="needs dnsmasq: apt-get install dnsmasq-base")
def test_an_exposer_waits_out_a_resolver_that_fails_then_finds_the_relay_by_name(rig, tmp_path):
    """inside's resolver is a DNS server on public that is not running yet: the exposer
    says it cannot resolve the relay's name now and tries again, instead of exiting; once
    dnsmasq answers for relay.test, it registers and names the address that worked."""
    lab = rig.lab
    rig.relay("wg")
    netns_etc = f"/etc/netns/{lab.ns('inside')}"
    os.makedirs(netns_etc, exist_ok=True)
    with open(f"{netns_etc}/resolv.conf", "w") as f:
        f.write(f"nameserver {lab.addr('public')}\noptions timeout:1 attempts:1\n")
    try:
        echo = rig.echo("wg")
        port = PORTS["wg"][1]
        expose = rig.start("inside", ["expose", "--relay", f"relay.test:{port}", "--service",
                                      f"127.0.0.1:{echo.port}", "--key-file", rig.key])
        line = expose.lines[expose.wait_log("cannot resolve relay.test now")]
        assert "the relay at relay.test:" in line, line
        dns = rig.start("public", [], argv=[
            shutil.which("dnsmasq", path=os.defpath + ":/usr/sbin"), "--no-daemon",
            "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={lab.addr('public')}", "--port=53",
            f"--address=/relay.test/{lab.addr('public')}", f"--pid-file={tmp_path}/dns.pid",
            "--user=root", "--log-facility=-"])
        line = expose.lines[expose.wait_log("registered with the relay", timeout=WAIT * 3)]
        assert f"relay.test:{port} ({lab.addr('public')}:{port})" in line, line
        talk(rig, "wg", [rig.client()], rounds=1)
        dns.stop()
    finally:
        os.unlink(f"{netns_etc}/resolv.conf")
        os.rmdir(netns_etc)
