"""A rendezvous tunnel's decisions, without processes or sockets: its worker is built
on stand-ins (tests/unitfakes.py), punch agents are endpoint.Initiators at addresses,
and each test checks what the agents are told and what `udpmux status` would read.
The real processes are in tests/test_punch.py."""

import socket

from unitfakes import KEY, Outbox, started, tunnel
from udpmux import wire
from udpmux.addr import peer_key
from udpmux.endpoint import LOST, Initiator
from udpmux.reasons import R_FULL, R_NAME, R_NO_PARTNER, R_SESSION
from udpmux.rendezvous import RendezvousWorker
from udpmux.session import observed_fields
from udpmux.wire import (
    HEADER_SIZE, PATH, PATH_DIRECT, PATH_RELAYED, PEER, RENDEZVOUS_NAME_MAX, SIDE_FORWARD,
    SIDE_LISTEN, T_CLOSE, T_DATA, T_PATH, T_PEER, T_RENDEZVOUS,
)


def at(host, port=4000):
    return peer_key(socket.AF_INET, (host, port))


def relay(**settings):
    worker = started(RendezvousWorker(tunnel("rendezvous", **settings), None))
    worker.sender = Outbox()
    return worker


class Agent:
    """A `udpmux punch` with its session with the relay, at an address."""

    def __init__(self, relay, where):
        self.relay = relay
        self.where = where
        self.end = Initiator(KEY, wire.ROLE_PUNCH)

    def join(self, now=0.0):
        """The handshake; True when the relay answered."""
        self.end.start(now)
        (hello, _), = self.end.due(now).replies
        self.relay.on_message(hello, self.where, now)
        welcome = self.relay.sender.to(self.where)
        if not welcome:
            return False
        got = self.end.receive(welcome[0], now)
        (confirm, _), = got.replies
        self.relay.on_message(confirm, self.where, now)
        return True

    def say(self, mtype, body=b"", now=1.0, tag=0, where=None):
        msg = self.end.session.seal(mtype, tag, body)
        self.relay.on_message(msg, where or self.where, now)
        return msg

    def meet(self, side, name, now=1.0):
        raw = name if isinstance(name, bytes) else name.encode()
        self.say(T_RENDEZVOUS, bytes([side]) + raw, now)

    def heard(self, now=2.0):
        """[(what our endpoint made of it, the message)] the relay sent us."""
        return [(self.end.receive(msg, now), msg) for msg in self.relay.sender.to(self.where)]

    def told(self, now=2.0):
        """Where the PEERs the relay sent us say the peer is: [(family, port, address)]."""
        return [PEER.unpack_from(msg, HEADER_SIZE)[:3] for got, msg in self.heard(now)
                if got.mtype == T_PEER]


def paired(worker, name="mosh"):
    """A listen agent at 192.0.2.1 and a forward agent at 198.51.100.7, registered and
    paired under `name` at time 1, what they were told taken."""
    listen, forward = Agent(worker, at("192.0.2.1")), Agent(worker, at("198.51.100.7"))
    listen.join(), forward.join()
    listen.meet(SIDE_LISTEN, name)
    forward.meet(SIDE_FORWARD, name)
    listen.heard(), forward.heard()
    return listen, forward


def pairs(worker, now=5.0):
    worker.write_report(now)
    return worker.report.read_json()["pairs"]


def test_two_sides_giving_one_name_are_paired_and_each_learns_where_the_other_is():
    worker = relay()
    listen, forward = Agent(worker, at("192.0.2.1")), Agent(worker, at("198.51.100.7", 5000))
    assert listen.join() and forward.join()
    listen.meet(SIDE_LISTEN, "mosh")
    assert listen.told() == []
    assert pairs(worker) == [{"name": "mosh", "listen": "192.0.2.1:4000", "forward": None,
                              "path": "waiting", "relayed_datagrams": 0, "relayed_bytes": 0}]
    forward.meet(SIDE_FORWARD, "mosh")
    assert listen.told() == [observed_fields(forward.where)]
    assert forward.told() == [observed_fields(listen.where)]
    (pair,) = pairs(worker)
    assert (pair["listen"], pair["forward"], pair["path"]) == \
        ("192.0.2.1:4000", "198.51.100.7:5000", "punching")


def test_names_that_differ_even_in_case_are_not_paired():
    worker = relay()
    a, b = Agent(worker, at("192.0.2.1")), Agent(worker, at("192.0.2.2"))
    a.join(), b.join()
    a.meet(SIDE_LISTEN, "mosh")
    b.meet(SIDE_FORWARD, "Mosh")
    assert a.told() == [] and b.told() == []
    assert sorted(p["path"] for p in pairs(worker)) == ["waiting", "waiting"]


def test_a_newer_registration_of_a_name_and_side_takes_the_place_of_the_older():
    worker = relay()
    old, forward = Agent(worker, at("192.0.2.1")), Agent(worker, at("198.51.100.7"))
    new = Agent(worker, at("192.0.2.9"))
    for agent in (old, forward, new):
        agent.join()
    old.meet(SIDE_LISTEN, "mosh")
    forward.meet(SIDE_FORWARD, "mosh")
    old.heard(), forward.heard()
    new.meet(SIDE_LISTEN, "mosh")
    assert new.told() == [observed_fields(forward.where)]
    assert forward.told() == [observed_fields(new.where)]
    # The older one's session is over: what it sends is refused, and it is told to
    # start again (STALE, never larger than what it answers), which it believes.
    old.say(T_DATA, b"x", now=3.0)
    assert old.heard(3.0) == []
    old.say(T_DATA, b"x" * 32, now=3.0)
    assert worker.drops.counts.get(R_SESSION) == 2
    assert [got.event for got, _msg in old.heard(3.0)] == [LOST]
    # The forward side's datagrams reach the newer one.
    forward.say(T_DATA, b"to the new one", now=4.0, tag=7)
    (got, msg), = new.heard(4.0)
    assert (got.mtype, got.tag) == (T_DATA, 7)
    assert msg[HEADER_SIZE:HEADER_SIZE + 14] == b"to the new one"


def test_a_peer_that_registers_another_name_leaves_its_pair():
    worker = relay()
    listen, forward = paired(worker)
    listen.meet(SIDE_LISTEN, "other")
    forward.say(T_DATA, b"x", now=3.0)
    assert worker.drops.counts.get(R_NO_PARTNER) == 1
    assert sorted(p["name"] for p in pairs(worker)) == ["mosh", "other"]
    assert {p["path"] for p in pairs(worker)} == {"waiting"}


def test_a_repeated_rendezvous_tells_both_again_and_makes_no_new_pair():
    worker = relay()
    listen, forward = paired(worker)
    listen.meet(SIDE_LISTEN, "mosh", now=3.0)
    assert forward.told() == [observed_fields(listen.where)]
    assert listen.told() == [observed_fields(forward.where)]
    assert worker.counters["pairs"] == 1


def test_a_side_or_a_name_that_cannot_be_right_is_refused():
    worker = relay()
    agent = Agent(worker, at("192.0.2.1"))
    agent.join()
    bad = [bytes([0]) + b"mosh", bytes([3]) + b"mosh", bytes([SIDE_LISTEN]) + b"\xff\xfe",
           bytes([SIDE_LISTEN]) + b"n" * (RENDEZVOUS_NAME_MAX + 1)]
    for body in bad:
        agent.say(T_RENDEZVOUS, body)
    assert worker.drops.counts.get(R_NAME) == len(bad)
    assert pairs(worker) == []
    agent.meet(SIDE_LISTEN, "n" * RENDEZVOUS_NAME_MAX)      # the longest name is fine
    assert [p["name"] for p in pairs(worker)] == ["n" * RENDEZVOUS_NAME_MAX]


def test_a_full_tunnel_answers_no_hello_until_a_peer_leaves():
    worker = relay(max_flows=2)
    first, second = Agent(worker, at("192.0.2.1")), Agent(worker, at("192.0.2.2"))
    third = Agent(worker, at("192.0.2.3"))
    assert first.join() and second.join()
    assert not third.join()
    assert worker.drops.counts.get(R_FULL) == 1
    first.say(wire.T_BYE, wire.REASON.pack(wire.CLOSE_SHUTDOWN))
    assert third.join(now=3.0)


def test_data_is_sealed_again_for_the_partner_and_counted_and_refused_without_one():
    worker = relay()
    listen, forward = Agent(worker, at("192.0.2.1")), Agent(worker, at("198.51.100.7"))
    listen.join(), forward.join()
    listen.meet(SIDE_LISTEN, "mosh")
    listen.say(T_DATA, b"nobody yet", tag=3)
    assert worker.drops.counts == {R_NO_PARTNER: 1}
    forward.meet(SIDE_FORWARD, "mosh")
    listen.heard(), forward.heard()
    sent = listen.say(T_DATA, b"hello", now=3.0, tag=3)
    listen.say(T_CLOSE, wire.REASON.pack(wire.CLOSE_IDLE), now=3.0, tag=3)
    (data, data_msg), (close, _) = forward.heard(3.0)
    assert (data.mtype, data.tag, close.mtype, close.tag) == (T_DATA, 3, T_CLOSE, 3)
    assert data_msg[HEADER_SIZE:HEADER_SIZE + 5] == b"hello" and data_msg != sent
    (pair,) = pairs(worker)
    assert (pair["relayed_datagrams"], pair["relayed_bytes"]) == (1, 5)


def test_path_reports_say_direct_only_when_both_sides_do():
    worker = relay()
    listen, forward = paired(worker)
    listen.say(T_PATH, PATH.pack(PATH_DIRECT))
    assert pairs(worker)[0]["path"] == "punching"
    forward.say(T_PATH, PATH.pack(PATH_DIRECT))
    assert pairs(worker)[0]["path"] == "direct"
    forward.say(T_PATH, PATH.pack(99))                  # no such path: nothing changes
    assert pairs(worker)[0]["path"] == "direct"
    listen.say(T_PATH, PATH.pack(PATH_RELAYED))
    assert pairs(worker)[0]["path"] == "relayed"


def test_a_peer_is_followed_to_a_new_address_once_it_answers_and_its_partner_told_at_once():
    worker = relay()
    listen, forward = paired(worker)
    moved = at("192.0.2.1", 4999)
    msg = listen.say(wire.T_KEEPALIVE, wire.KEEPALIVE.pack(0, 0, 0), now=3.0, where=moved)
    worker.on_message(msg, at("203.0.113.66"), 3.0)     # a copy raced from elsewhere
    assert forward.told(3.0) == []
    (challenge,) = worker.sender.to(moved)
    (answer, _), = listen.end.receive(challenge, 3.0).replies
    worker.on_message(answer, moved, 3.1)
    assert forward.told(3.1) == [observed_fields(moved)]
    assert pairs(worker)[0]["listen"] == "192.0.2.1:4999"


def test_a_silent_peer_is_forgotten_after_flow_idle_and_its_partner_waits_again():
    worker = relay(flow_idle=60.0)
    listen, forward = Agent(worker, at("192.0.2.1")), Agent(worker, at("198.51.100.7"))
    listen.join(), forward.join()
    listen.meet(SIDE_LISTEN, "mosh", now=0.0)
    forward.meet(SIDE_FORWARD, "mosh", now=30.0)
    worker.tick(60.0)
    assert pairs(worker, 60.0)[0]["path"] == "punching"
    worker.tick(60.5)
    assert pairs(worker, 60.5) == [{"name": "mosh", "listen": None,
                                    "forward": "198.51.100.7:4000", "path": "waiting",
                                    "relayed_datagrams": 0, "relayed_bytes": 0}]
    forward.heard(61.0)
    again = Agent(worker, at("192.0.2.50"))
    again.join(now=61.0)
    again.meet(SIDE_LISTEN, "mosh", now=61.0)
    assert forward.told(61.0) == [observed_fields(again.where)]
