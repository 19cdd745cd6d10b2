"""Reliable delivery: the two windows without sockets, then real clients through a bad network.

The bad network is `LossyRelay`, a UDP relay between each client and the server that
drops, duplicates, delays and reorders datagrams in both directions, driven by a seeded
random generator so that a failure repeats.
"""

import heapq
import itertools
import random
import selectors
import socket
import threading
import time

import pytest
from conftest import fast_timing, member, texts_of, wait_until

import client
import server
from encryption_helper import (
    BITMAP,
    DEFAULT_CIPHER,
    RECV_BUFFER,
    Packet,
    PacketType,
    RtoEstimator,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
)

# --- The receiving window -------------------------------------------------------------------


def test_in_order_arrival_is_delivered_at_once():
    window = client.InboundWindow(size=8)
    assert window.receive(1, "a") == ("in order", ["a"])
    assert window.receive(2, "b") == ("in order", ["b"])
    assert window.ack() == (2, 0)


def test_out_of_order_arrival_is_held_until_the_gap_fills():
    window = client.InboundWindow(size=8)
    assert window.receive(3, "c") == ("buffered out of order", [])
    assert window.receive(2, "b") == ("buffered out of order", [])
    assert window.ack() == (0, 0b11)  # holds 2 and 3: bits for cumulative + 2 and + 3
    assert window.receive(1, "a") == ("in order", ["a", "b", "c"])
    assert window.ack() == (3, 0)


def test_duplicates_are_dropped():
    window = client.InboundWindow(size=8)
    window.receive(1, "a")
    window.receive(3, "c")
    assert window.receive(1, "a") == ("duplicate", [])
    assert window.receive(3, "c") == ("duplicate", [])


def test_nothing_beyond_the_window_is_accepted():
    window = client.InboundWindow(size=4)
    assert window.receive(5, "e") == ("outside the window", [])
    assert window.receive(4, "d") == ("buffered out of order", [])


@pytest.mark.parametrize("seed", range(20))
def test_any_arrival_order_with_duplicates_delivers_each_once_in_order(seed):
    rng = random.Random(seed)
    window = client.InboundWindow(size=32)
    delivered = []
    pending = list(range(1, 33))
    while pending:  # what is not delivered yet keeps arriving, shuffled and doubled
        arrivals = pending + rng.sample(pending, len(pending) // 3)
        rng.shuffle(arrivals)
        for seq in arrivals[: rng.randint(1, len(arrivals))]:
            delivered += window.receive(seq, seq)[1]
        pending = [seq for seq in pending if seq >= window.expected and seq not in window.held]
    assert delivered == list(range(1, 33))


# --- The sending window ---------------------------------------------------------------------


def outbound(size=4, max_queue=10, rto=None) -> server.OutboundWindow:
    return server.OutboundWindow(size, max_queue, rto or RtoEstimator(initial=1.0, floor=0.2, ceiling=10.0))


def test_at_most_a_window_is_in_flight():
    window = outbound(size=4)
    for number in range(10):
        window.offer(b"%d" % number, b"")
    assert [seq for seq, _ in window.release(0.0)] == [1, 2, 3, 4]
    assert window.release(0.0) == []  # full until something is acknowledged
    window.acknowledge(2, 0, 0.1)
    assert [seq for seq, _ in window.release(0.1)] == [5, 6]


def test_selective_ack_frees_what_arrived_beyond_a_gap():
    window = outbound(size=8)
    for _ in range(6):
        window.offer(b"x", b"")
    window.release(0.0)
    assert window.acknowledge(1, 0b101, 0.1) == 3  # 1 by cumulative; 3 and 5 by the bitmap
    assert list(window.in_flight) == [2, 4, 6]
    assert window.base() == 2


def test_the_queue_behind_the_window_is_bounded():
    window = outbound(size=2, max_queue=3)
    assert all(window.offer(b"x", b"") for _ in range(3))
    assert not window.offer(b"x", b"")
    window.release(0.0)
    assert window.offer(b"x", b"")


def test_timer_resends_one_packet_with_the_wait_doubled():
    window = outbound(size=4)
    window.offer(b"x", b"")
    ((seq, entry),) = window.release(0.0)
    assert entry.deadline == 1.0
    assert window.expire(seq, 0.5) is None  # not yet
    assert window.expire(seq, 1.0) is entry and entry.attempts == 2 and entry.deadline == 3.0
    assert window.expire(seq, 3.0).deadline == 7.0  # 1 s, 2 s, 4 s...


def test_karn_no_round_trip_sample_from_a_resent_packet():
    rto = RtoEstimator(initial=1.0, floor=0.01)
    window = outbound(rto=rto)
    window.offer(b"x", b"")
    window.offer(b"y", b"")
    window.release(0.0)
    window.expire(1, 1.0)  # packet 1 was resent
    window.acknowledge(1, 0, 1.05)
    assert rto.srtt is None  # which copy was that the answer to? Nobody knows: no sample
    window.acknowledge(2, 0, 1.2)
    assert rto.srtt == pytest.approx(1.2)  # packet 2, sent once at 0.0


def test_acknowledged_packet_timer_does_nothing():
    window = outbound()
    window.offer(b"x", b"")
    window.release(0.0)
    window.acknowledge(1, 0, 0.1)
    assert window.expire(1, 5.0) is None


# --- Delayed ACKs: the client's side of acknowledging -----------------------------------------

TOKEN = b"sessiont"


class FakeServer:
    """A plain UDP socket standing in for the server: sends EVENTs, collects the ACKs."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()

    def event(self, seq: int) -> bytes:
        payload = pack_fields("chat", "0", "lobby", "bob", f"m{seq}")
        return encode_packet(Packet(PacketType.EVENT, seq, 0, TOKEN, 0, payload), make_cipher(DEFAULT_CIPHER))

    def acks(self) -> list[tuple[int, int]]:
        """(cumulative, bitmap) of every ACK that has come so far."""
        got = []
        while True:
            try:
                packet = decode_packet(self.sock.recv(RECV_BUFFER), make_cipher(DEFAULT_CIPHER))
            except TimeoutError:
                return got
            if packet.type == PacketType.ACK:
                got.append((packet.ack, BITMAP.unpack(packet.payload)[0]))


@pytest.fixture
def fake_server():
    fake = FakeServer()
    yield fake
    fake.sock.close()


def quiet_client(fake_server, make_client) -> client.ChatClient:
    """A client in a session whose threads are stopped: only the test hands it datagrams."""
    made = make_client(fake_server.address, on_event=lambda event: None)
    made.token = TOKEN
    made.closed.set()  # the threads see this within MAX_WAIT and end...
    for thread in made.threads:
        thread.join()
    made.closed.clear()  # ...while the socket stays open, for the test to use
    return made


def test_one_ack_for_every_second_event(fake_server, make_client):
    made = quiet_client(fake_server, make_client)
    for seq in range(1, 7):
        made.handle_datagram(fake_server.event(seq))
    assert fake_server.acks() == [(2, 0), (4, 0), (6, 0)]


def test_out_of_order_duplicate_and_filled_gap_are_acknowledged_at_once(fake_server, make_client):
    made = quiet_client(fake_server, make_client)
    made.handle_datagram(fake_server.event(1))
    assert fake_server.acks() == []  # one in order: the ACK may wait for the next
    made.handle_datagram(fake_server.event(3))  # 2 is missing: tell the server now
    assert fake_server.acks() == [(1, 0b1)]
    made.handle_datagram(fake_server.event(3))  # a duplicate: our ACK may have been lost
    assert fake_server.acks() == [(1, 0b1)]
    made.handle_datagram(fake_server.event(2))  # the gap fills: 1, 2, 3 all here
    assert fake_server.acks() == [(3, 0)]
    made.handle_datagram(fake_server.event(6))  # 4 and 5 are missing...
    made.handle_datagram(fake_server.event(4))  # ...and 4 fills half the gap: say so at once
    assert fake_server.acks() == [(3, 0b10), (4, 0b1)]


def test_other_datagrams_do_not_put_off_a_delayed_ack(fake_server, make_client):
    made = quiet_client(fake_server, make_client)
    made.handle_datagram(fake_server.event(1))
    due = made.ack_by
    reply = encode_packet(Packet(PacketType.OK, 0, made.seq, TOKEN), make_cipher(DEFAULT_CIPHER))
    for _ in range(3):
        made.handle_datagram(reply)  # replies to our own requests, coming while the ACK waits
    assert made.ack_by == due and made.unacked == 1


def test_a_lone_event_is_acknowledged_when_nothing_follows(fake_server, make_client):
    made = make_client(fake_server.address, on_event=lambda event: None)
    made.token = TOKEN
    fake_server.sock.sendto(fake_server.event(1), made.sock.getsockname())
    got = []

    def acknowledged() -> bool:
        got.extend(fake_server.acks())
        return bool(got)

    wait_until(acknowledged, what="the delayed ACK")  # one EVENT alone never reaches ACK_EVERY
    assert got == [(1, 0)]


def simulate(loss: float, seed: int, messages: int = 200, window_size: int = 8) -> tuple[list, int]:
    """Send `messages` through both windows over a lossy, duplicating, reordering channel."""
    rng = random.Random(seed)
    sender = outbound(size=window_size, max_queue=messages, rto=RtoEstimator(initial=0.1, floor=0.1))
    receiver = client.InboundWindow(size=window_size)
    for number in range(messages):
        sender.offer(number, b"")
    now, delivered, sends, channel = 0.0, [], 0, []  # channel: heap of (arrival, n, kind, data)
    counter = itertools.count()

    def transmit(kind, data):
        nonlocal sends
        sends += kind == "data"
        for _ in range(2 if rng.random() < 0.1 else 1):  # 10% duplicated
            if rng.random() >= loss:
                heapq.heappush(channel, (now + rng.uniform(0.001, 0.05), next(counter), kind, data))

    while len(delivered) < messages and now < 1000:
        for seq, entry in sender.release(now):
            transmit("data", (seq, entry.payload))
        for seq in list(sender.in_flight):
            entry = sender.expire(seq, now)
            if entry:
                transmit("data", (seq, entry.payload))
        now += 0.01
        while channel and channel[0][0] <= now:
            _, _, kind, data = heapq.heappop(channel)
            if kind == "data":
                delivered += receiver.receive(*data)[1]
                transmit("ack", receiver.ack())
            else:
                sender.acknowledge(*data, now)
    return delivered, sends


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3, 0.5])
def test_both_windows_deliver_everything_once_in_order_over_a_bad_channel(loss):
    delivered, sends = simulate(loss, seed=7)
    assert delivered == list(range(200))
    assert (sends > 200) == (loss > 0)  # loss costs retransmissions, nothing else


# --- A bad network between real programs ----------------------------------------------------


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


LOSSY_SERVER = dict(message_rate=10_000.0, message_burst=10_000, max_retransmits=60, min_rto=0.005)


def lossy_timing():
    return fast_timing(min_rto=0.005, max_rto=0.2, lost_contact_after=10.0, give_up_after=30.0)


@pytest.fixture
def relay(chat_server_lossy):
    made = LossyRelay(chat_server_lossy.address, loss=0.3, duplicate=0.1, reorder=0.1, seed=2120)
    yield made
    made.close()


@pytest.fixture
def chat_server_lossy(start_server):
    return start_server(**LOSSY_SERVER)


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
    assert relay.stats["dropped"] > 100 and relay.stats["duplicated"] > 20 and relay.stats["delayed"] > 20


def test_private_messages_survive_the_bad_network(relay, make_client):
    alice = through(relay, make_client, "alice")
    bob = through(relay, make_client, "bob")
    for number in range(50):
        alice.private("bob", f"secret {number}")
    assert texts_of(bob, "private", 50) == [f"secret {number}" for number in range(50)]


def test_loss_switch_on_both_ends(start_server, make_client):
    running = start_server(loss=0.15, seed=5, **LOSSY_SERVER)  # lost at either end: about 30% in all
    alice = member(make_client, running.address, "alice", loss=0.15, seed=6, timing=lossy_timing())
    bob = member(make_client, running.address, "bob", loss=0.15, seed=7, timing=lossy_timing())
    for number in range(30):
        alice.say(f"n{number}")
    assert texts_of(bob, "chat", 30) == [f"n{number}" for number in range(30)]
    assert running.loop.sock.dropped > 0 and alice.sock.dropped > 0


def test_verbose_trace_marks_retransmissions_and_losses(start_server, make_client):
    running = start_server(loss=0.15, seed=5, verbose=True, **LOSSY_SERVER)
    lines = []
    alice = member(make_client, running.address, "alice", loss=0.15, seed=8, timing=lossy_timing(),
                   trace=lines.append)
    for number in range(10):
        alice.say(f"n{number}")
    assert any("LOST (simulated)" in line for line in lines)
    assert any("retransmitted" in line for line in lines)
    assert any("[trace] in " in line and "SAY" in line for line in running.log)
