"""ssh over `udpmux link` across the lab: a real OpenSSH server on "public", a real ssh
client on "outside" behind its NAT, with `udpmux link` as its ProxyCommand.

    outside: ssh -o ProxyCommand="udpmux link ..." --(UDP)--> nat_out --> wan --> public
                     \\-- ssh (bootstrap, TCP) --> public: sshd --> udpmux link-server --(TCP)--> sshd

Loss, a change of the outside NAT's address and a 20 s blackout happen in the middle of a
transfer; the file must arrive byte for byte every time.
"""

import hashlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from procs import ROOT, WAIT, Daemon, deadline_loop
from test_lab_relay import IP

SSH_PORT = 2222
BIND = "47000-47099"
SIZE = 8 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh")),
    reason="needs OpenSSH: apt-get install openssh-server openssh-client")


class Ssh:
    """sshd on "public" with its own host key and authorized key; ssh from "outside"."""

    def __init__(self, lab, tmp_path):
        self.lab = lab
        self.tmp = tmp_path
        self.key = str(tmp_path / "id")
        host_key = str(tmp_path / "host_key")
        for path in (self.key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path],
                           check=True)
        authorized = tmp_path / "authorized_keys"
        authorized.write_text(open(self.key + ".pub").read())
        config = tmp_path / "sshd_config"
        config.write_text(f"""Port {SSH_PORT}
ListenAddress 0.0.0.0
HostKey {host_key}
PidFile {tmp_path}/sshd.pid
AuthorizedKeysFile {authorized}
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
LogLevel ERROR
""")
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = Daemon([], argv=[IP, "netns", "exec", lab.ns("public"), "/usr/sbin/sshd",
                                     "-D", "-e", "-f", str(config)])
        self.big = tmp_path / "big"
        self.big.write_bytes(os.urandom(SIZE))
        self.digest = hashlib.sha256(self.big.read_bytes()).hexdigest()
        self.options = ["-i", self.key, "-p", str(SSH_PORT), "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "LogLevel=ERROR"]
        self.wait_ready()

    def wait_ready(self):
        """sshd answers a plain ssh (no ProxyCommand) from outside."""
        for _ in range(50):
            out = subprocess.run([IP, "netns", "exec", self.lab.ns("outside"), "ssh",
                                  *self.options, f"root@{self.lab.addr('public')}", "true"],
                                 capture_output=True, timeout=WAIT)
            if out.returncode == 0:
                return
            if self.sshd.proc.poll() is not None:
                break
        raise AssertionError("sshd did not come up: " + self.sshd.log())

    def proxied(self, command, *link_options):
        """argv of ssh from outside, through `udpmux link`, running `command` on public."""
        udpmux = f"env PYTHONPATH={ROOT} {sys.executable} -m udpmux"
        inner = "ssh " + " ".join(shlex.quote(o) for o in self.options)
        proxy = (f"{udpmux} link --ssh-command {shlex.quote(inner)} "
                 f"--server-command {shlex.quote(udpmux)} -t 127.0.0.1:{SSH_PORT} "
                 f"--bind {BIND} {' '.join(link_options)} %r@%h")
        return [IP, "netns", "exec", self.lab.ns("outside"), "ssh", *self.options,
                "-o", f"ProxyCommand={proxy}", f"root@{self.lab.addr('public')}", command]

    def close(self):
        self.sshd.stop()


@pytest.fixture
def ssh(lab, tmp_path):
    s = Ssh(lab, tmp_path)
    yield s
    s.close()


class Transfer(threading.Thread):
    """`cat big` over ssh through link, hashing as it reads; `at(n, action)` runs action
    once n bytes have arrived."""

    def __init__(self, ssh, *link_options):
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(ssh.proxied(f"cat {ssh.big}", *link_options),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.hash = hashlib.sha256()
        self.received = 0
        self.triggers = []
        self.start()

    def at(self, n, action):
        self.triggers.append((n, action))

    def run(self):
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            self.hash.update(chunk)
            self.received += len(chunk)
            for n, action in list(self.triggers):
                if self.received >= n:
                    self.triggers.remove((n, action))
                    action()

    def finish(self, timeout):
        self.join(timeout)
        status = self.proc.wait(WAIT)
        err = self.proc.stderr.read().decode(errors="replace")
        self.proc.stdout.close()
        self.proc.stderr.close()
        return status, err


def test_ssh_runs_a_command_and_copies_a_file_through_link(ssh):
    out = subprocess.run(ssh.proxied("echo hello from $(hostname -s) && uname -s"),
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert b"hello from" in out.stdout and b"Linux" in out.stdout
    transfer = Transfer(ssh)
    status, err = transfer.finish(120)
    assert status == 0, err
    assert transfer.received == SIZE and transfer.hash.hexdigest() == ssh.digest


def test_at_five_percent_loss_the_file_arrives_exact(ssh):
    ssh.lab.set_loss(5)
    transfer = Transfer(ssh)
    status, err = transfer.finish(180)
    assert status == 0, err
    assert transfer.hash.hexdigest() == ssh.digest
    assert ssh.lab.counter("wan", "loss") > 0


def test_with_delay_and_loss_a_file_crosses_exact_both_ways(ssh, delay):
    """A 50 ms round trip (25 ms each way through wan) with 1 % of datagrams lost: a
    download and an upload through link, each compared byte for byte."""
    ssh.lab.set_delay(25)
    ssh.lab.set_loss(1)
    size = 1 << 20
    down = subprocess.run(ssh.proxied(f"head -c {size} {ssh.big}"), capture_output=True,
                          timeout=180)
    assert down.returncode == 0, down.stderr.decode()
    assert down.stdout == ssh.big.read_bytes()[:size]
    uploaded = ssh.tmp / "uploaded"
    up = subprocess.run(ssh.proxied(f"cat > {uploaded}"), input=down.stdout,
                        capture_output=True, timeout=180)
    assert up.returncode == 0, up.stderr.decode()
    assert uploaded.read_bytes() == down.stdout
    assert ssh.lab.delay_counters()["held"] > 2 * size // 1500
    assert ssh.lab.counter("wan", "loss") > 0


def assert_survives_a_nat_change_mid_download(ssh):
    moved = []
    transfer = Transfer(ssh)
    transfer.at(SIZE // 4, lambda: moved.append(ssh.lab.roam("out")))
    status, err = transfer.finish(180)
    assert moved, "the transfer ended before the NAT changed address"
    assert status == 0, err
    assert transfer.hash.hexdigest() == ssh.digest


def test_the_outside_nat_changes_address_in_the_middle(ssh):
    assert_survives_a_nat_change_mid_download(ssh)


def test_a_nat_change_while_only_the_server_sends_over_a_long_path(ssh, delay):
    """A download over a 50 ms round trip: the client sends only ACKs, which answer
    data.  When its NAT changes address the server's data go to the old one; the client,
    hearing nothing, asks the server for a word from where it now is, and the server
    follows it there and sends what was lost at once."""
    ssh.lab.set_delay(25)
    assert_survives_a_nat_change_mid_download(ssh)


def test_a_twenty_second_blackout_in_the_middle_recovers(ssh, delay):
    """A download over a 50 ms round trip with 1 % loss, and 20 s in its middle when
    UDP does not pass at all: the file arrives whole."""
    lab = ssh.lab
    lab.set_delay(25)
    lab.set_loss(1)
    over = threading.Event()

    def blackout():
        lab.block_udp(True)
        threading.Timer(20.0, lambda: (lab.block_udp(False), over.set())).start()

    transfer = Transfer(ssh)
    transfer.at(SIZE // 4, blackout)
    status, err = transfer.finish(240)
    assert over.is_set(), "the transfer ended before the blackout did"
    assert status == 0, err
    assert transfer.hash.hexdigest() == ssh.digest
    assert lab.counter("wan", "block_udp") > 0


def test_with_udp_blocked_link_says_so_long_before_it_gives_up(ssh):
    """ssh reaches the server and starts link-server, but the wan drops every UDP
    datagram: link names the server's UDP address and the likely cause within seconds,
    not after the 60 s it waits before giving up."""
    lab = ssh.lab
    lab.block_udp(True)
    proc = subprocess.Popen(ssh.proxied("true", "--debug", "--idle-limit", "30"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, server = [], None
    try:
        for _ in deadline_loop(WAIT * 2, "link's word on the unanswered server"):
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if not ready:
                continue
            line = proc.stderr.readline().decode(errors="replace")
            lines.append(line)
            if "the server end is process" in line:
                server = int(line.split("the server end is process ")[1].split()[0])
            if "no answer from link-server at" in line:
                break
        assert f"{lab.addr('public')}:47" in lines[-1], lines[-1]
        assert "UDP to its port is blocked" in lines[-1], lines[-1]
        assert "--bind" in lines[-1], lines[-1]
    finally:
        proc.kill()
        proc.wait(WAIT)
        proc.stderr.close()
        lab.block_udp(False)
        if server is not None:
            os.kill(server, signal.SIGTERM)
