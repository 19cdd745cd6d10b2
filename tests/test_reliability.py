"""Reliable delivery between real programs, through a bad network.

The bad network is `LossyRelay`, a UDP relay between each client and the server that
drops, duplicates, delays and reorders datagrams in both directions, driven by a seeded
random generator so that a failure repeats. The Channel alone, with a simulated link and
a fake clock, is tested in test_channel.py.
"""

import concurrent.futures
import heapq
import itertools
import random
import selectors
import socket
import threading
import time

import pytest
from conftest import lossy_timing, member, no_more_events, texts_of

import client
from encryption_helper import PacketType


class LossyRelay:
    """A UDP relay that mistreats datagrams both ways: drops, duplicates, delays, reorders.

    Each client talks to its own front port; the relay forwards from a back socket of
    its own, so the server sees one address per client. One thread does all the work.
    """

    def __init__(self, server_address, loss=0.3, duplicate=0.1, reorder=0.1, seed=1):
        self.server_address = server_address
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.held = []  # heap of (release time, n, socket, data, address): delayed datagrams
        self.counter = itertools.count()
        self.stats = {"forwarded": 0, "dropped": 0, "duplicated": 0, "delayed": 0}
        self.stopping = False
        self.sockets = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def new_port(self) -> tuple[str, int]:
        """Return a fresh front address for one client."""
        front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        front.bind(("127.0.0.1", 0))
        back.bind(("127.0.0.1", 0))
        link = {"front": front, "back": back, "client": None}
        with self.lock:
            self.selector.register(front, selectors.EVENT_READ, ("front", link))
            self.selector.register(back, selectors.EVENT_READ, ("back", link))
            self.sockets += [front, back]
        return front.getsockname()

    def run(self):
        while not self.stopping:
            with self.lock:
                ready = self.selector.select(0.005) if self.sockets else []
            for key, _ in ready:
                side, link = key.data
                try:
                    data, address = key.fileobj.recvfrom(65535)
                except OSError:
                    continue
                if side == "front":
                    link["client"] = address
                    self.mistreat(link["back"], data, self.server_address)
                elif link["client"]:
                    self.mistreat(link["front"], data, link["client"])
            if not self.sockets:
                time.sleep(0.005)
            self.release_held()

    def mistreat(self, sock, data, address):
        if self.random.random() < self.loss:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.random.random() < self.duplicate else 1
        self.stats["duplicated"] += copies - 1
        for _ in range(copies):
            if self.random.random() < self.reorder:  # held back a little: later ones overtake it
                self.stats["delayed"] += 1
                delay = self.random.uniform(0.001, 0.01)
                heapq.heappush(self.held, (time.monotonic() + delay, next(self.counter), sock, data, address))
            else:
                self.send(sock, data, address)

    def release_held(self):
        while self.held and self.held[0][0] <= time.monotonic():
            _, _, sock, data, address = heapq.heappop(self.held)
            self.send(sock, data, address)

    def send(self, sock, data, address):
        self.stats["forwarded"] += 1
        try:
            sock.sendto(data, address)
        except OSError:
            pass

    def close(self):
        self.stopping = True
        self.thread.join(timeout=5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def relay(quick_recovery, start_server):
    """A server behind a LossyRelay: 30% lost, 10% duplicated, 10% reordered, both ways."""
    made = LossyRelay(start_server().address, loss=0.3, duplicate=0.1, reorder=0.1, seed=2120)
    yield made
    made.close()


def through(relay, make_client, name, **options):
    return member(make_client, relay.new_port(), name, timing=lossy_timing(), **options)


def test_registration_and_login_survive_the_bad_network(relay, make_client):
    alice = make_client(relay.new_port(), timing=lossy_timing())
    assert alice.register("alice", "pw") == "Registration successful."
    with pytest.raises(client.Refused, match="Username already taken."):
        alice.register("alice", "pw")
    with pytest.raises(client.Refused, match="Invalid username or password."):
        alice.login("alice", "wrong")
    assert alice.login("alice", "pw") == "Welcome, alice."


def test_300_messages_reach_every_member_once_and_in_order(relay, make_client):
    alice = through(relay, make_client, "alice")
    bob = through(relay, make_client, "bob")
    carol = through(relay, make_client, "carol")
    sent = [f"message {number}" for number in range(300)]
    for text in sent:
        alice.say(text)
    for receiver in (bob, carol):
        assert texts_of(receiver, "chat", len(sent)) == sent
    assert no_more_events(bob, probe=carol) == []  # and not one of them twice
    assert relay.stats["dropped"] > 100 and relay.stats["duplicated"] > 20 and relay.stats["delayed"] > 20


def test_private_messages_survive_the_bad_network(relay, make_client):
    alice = through(relay, make_client, "alice")
    bob = through(relay, make_client, "bob")
    for number in range(50):
        alice.private("bob", f"secret {number}")
    assert texts_of(bob, "private", 50) == [f"secret {number}" for number in range(50)]


def test_pipelined_lines_arrive_once_and_in_order(relay, make_client):
    alice = through(relay, make_client, "alice")
    bob = through(relay, make_client, "bob")
    sent = [f"pasted line {number}" for number in range(200)]
    futures = [alice.submit(PacketType.SAY, text) for text in sent]
    assert sum(not future.done() for future in futures) > 1  # none waited for the one before
    done, _ = concurrent.futures.wait(futures, timeout=60)
    assert len(done) == len(sent) and all(future.exception() is None for future in futures)
    assert texts_of(bob, "chat", len(sent)) == sent
