"""The reliable Channel alone: no socket, no thread, a fake clock and a simulated link.

Every behaviour of Selective Repeat is checked here once: delivery exactly once and in
order over a link that loses, duplicates and reorders; the window's bound (stop-and-wait
is a window of 1); the per-packet timer, its backoff and its give-up; fast retransmit;
Karn's rule; the bounded queue; when acknowledgements are sent; and the one rule that
reads and writes the selective-acknowledgement bitmap. The link is driven by a seeded
random generator, so a failure repeats.
"""

import heapq
import itertools
import random

import pytest

from encryption_helper import (
    FLAG_RETRANSMIT,
    Channel,
    Packet,
    PacketType,
    RtoEstimator,
    acknowledged,
    decode_packet,
    make_cipher,
    pack_fields,
    sack_bitmap,
    unpack_fields,
)

CIPHER = make_cipher("xor")


def decoded(datagrams: list[bytes]) -> list[Packet]:
    return [decode_packet(data, CIPHER) for data in datagrams]


def data_seqs(datagrams: list[bytes]) -> list[int]:
    """The sequence numbers of the packets on the channel (bare ACKs have none) among `datagrams`."""
    return [packet.seq for packet in decoded(datagrams) if packet.seq]


def numbered(seq: int, ack: int = 0, sack: int = 0) -> Packet:
    """A packet numbered `seq`, as the peer's channel would send it."""
    return Packet(PacketType.EVENT, seq, ack, sack, payload=pack_fields(f"m{seq}"))


def ack(cumulative: int, bitmap: int = 0) -> Packet:
    return Packet(PacketType.ACK, 0, cumulative, bitmap)


def queued(count: int, **options) -> Channel:
    """A channel with `count` packets queued, numbered 1 to `count`."""
    channel = Channel(CIPHER, **options)
    for number in range(1, count + 1):
        assert channel.send(PacketType.SAY, pack_fields(f"m{number}")) == number
    return channel


# --- A simulated link: two channels, a fake clock, loss, duplication and reordering ---------


class Link:
    """Two channels talking to each other over a seeded bad link.

    Every datagram is lost with probability `loss`; one that gets through is doubled with
    probability `duplicate`, and each copy is held back with probability `reorder`, so
    that later ones overtake it. The clock jumps from one event to the next.
    """

    DELAY = 0.005  # seconds on the wire, each way, for a datagram not held back

    def __init__(self, loss: float, seed: int, window: int = 32, duplicate: float = 0.1, reorder: float = 0.1):
        self.random = random.Random(seed)
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        # One end acknowledges at once (as the server does), the other delays (as the client does).
        self.ends = [Channel(CIPHER, window=window), Channel(CIPHER, window=window, ack_delay=0.02, ack_every=2)]
        self.delivered: list[list[str]] = [[], []]  # what each end received, in delivery order
        self.known_acked: list[set[int]] = [set(), set()]  # numbers each end has heard acknowledged
        self.widest = [0, 0]  # the most numbers each end had in flight at once, oldest to newest
        self.on_the_wire: list = []  # heap of (arrival time, tiebreak, receiving end, datagram)
        self.counter = itertools.count()
        self.now = 0.0

    def queue(self, end: int, count: int) -> list[str]:
        texts = [f"{end}:{number}" for number in range(count)]
        for text in texts:
            assert self.ends[end].send(PacketType.SAY, pack_fields(text))
        return texts

    def transmit(self, to: int, data: bytes) -> None:
        if self.random.random() < self.loss:
            return
        for _ in range(2 if self.random.random() < self.duplicate else 1):
            delay = self.DELAY
            if self.random.random() < self.reorder:
                delay += self.random.uniform(0.001, 0.05)
            heapq.heappush(self.on_the_wire, (self.now + delay, next(self.counter), to, data))

    def arrive(self, to: int, data: bytes) -> None:
        packet = decode_packet(data, CIPHER)
        self.known_acked[to].update(seq for seq in range(1, packet.ack + 1))
        self.known_acked[to].update(packet.ack + 2 + bit for bit in range(32) if packet.sack >> bit & 1)
        _, ready = self.ends[to].receive(packet, self.now)
        self.delivered[to] += [unpack_fields(delivered.payload)[0] for delivered in ready if delivered.seq]

    def poll(self, end: int) -> None:
        for data in self.ends[end].poll(self.now):
            seq = decode_packet(data, CIPHER).seq
            if seq:
                oldest = min(set(range(1, seq + 1)) - self.known_acked[end])
                self.widest[end] = max(self.widest[end], seq - oldest + 1)
            self.transmit(1 - end, data)

    def run(self, until: float = 3600.0) -> None:
        """Run until both ends have everything acknowledged and the wire is empty."""
        while not (all(end.idle() for end in self.ends) and not self.on_the_wire):
            assert self.now < until, "the link never settled"
            assert not any(end.failed for end in self.ends), "a channel gave up"
            for end in (0, 1):
                self.poll(end)
            wakeups = [end.next_wakeup() for end in self.ends]
            if self.on_the_wire:
                wakeups.append(self.on_the_wire[0][0])
            self.now = max(self.now, min(wakeups))
            while self.on_the_wire and self.on_the_wire[0][0] <= self.now:
                _, _, to, data = heapq.heappop(self.on_the_wire)
                self.arrive(to, data)


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3, 0.5])
def test_everything_is_delivered_once_and_in_order_over_a_bad_link(loss):
    link = Link(loss, seed=2120)
    sent = [link.queue(0, 300), link.queue(1, 100)]  # both ways at once: acknowledgements ride on data
    link.run()
    assert link.delivered == [sent[1], sent[0]]


def test_stop_and_wait_is_a_window_of_one():
    link = Link(0.3, seed=7, window=1)
    sent = link.queue(0, 50)
    link.run()
    assert link.delivered[1] == sent
    assert link.widest[0] == 1  # never a second packet in flight before the first is acknowledged


def test_the_window_is_filled_but_never_exceeded():
    link = Link(0.3, seed=11, window=8)
    sent = link.queue(0, 200)
    link.run()
    assert link.delivered[1] == sent
    assert link.widest[0] == 8


# --- Timers: per packet, backed off, given up ----------------------------------------------


def test_a_timeout_resends_only_what_was_not_acknowledged():
    channel = queued(6)
    assert data_seqs(channel.poll(0.0)) == [1, 2, 3, 4, 5, 6]
    channel.receive(ack(1, 0b1), 0.1)  # 1 by the cumulative field, 3 by the bitmap: 2 overtaken once only
    assert channel.poll(0.999) == []
    resent = decoded(channel.poll(1.0))  # the initial timeout is 1 s
    assert [packet.seq for packet in resent] == [2, 4, 5, 6]
    assert all(packet.flags & FLAG_RETRANSMIT for packet in resent)


def test_each_timeout_multiplies_the_wait_by_one_and_a_half_up_to_the_ceiling():
    channel = queued(1, rto=RtoEstimator(initial=0.25, floor=0.1, ceiling=2.0))
    channel.poll(0.0)
    sends = [0.0]
    while len(sends) < 9:
        due = channel.next_wakeup()
        assert channel.poll(due - 1e-6) == []  # not a moment early
        assert data_seqs(channel.poll(due)) == [1]
        sends.append(due)
    waits = [later - earlier for earlier, later in itertools.pairwise(sends)]
    assert waits == pytest.approx([0.25, 0.375, 0.5625, 0.84375, 1.265625, 1.8984375, 2.0, 2.0])


def test_gives_up_after_max_sends():
    channel = queued(1, max_sends=3)
    sends = len(channel.poll(0.0))
    while not channel.failed:
        due = channel.next_wakeup()
        assert due < float("inf")
        sends += len(channel.poll(due))
    assert sends == 3
    channel.send(PacketType.SAY, pack_fields("after the give-up"))
    channel.receive(numbered(1), due)  # something to acknowledge, even
    assert channel.poll(due + 100.0) == [] and channel.next_wakeup() == float("inf")


def test_nothing_is_sent_in_the_poll_that_gives_up():
    channel = queued(1, max_sends=1)
    channel.poll(0.0)
    deadline = channel.next_wakeup()  # the timer of the one packet sent
    channel.send(PacketType.SAY, pack_fields("queued as the peer is found gone"))
    assert channel.poll(deadline) == []
    assert channel.failed


def test_a_waiting_packet_with_room_in_the_window_wants_polling_now():
    channel = Channel(CIPHER)
    assert channel.next_wakeup() == float("inf")  # nothing to do
    channel.send(PacketType.SAY, pack_fields("hi"))
    assert channel.next_wakeup() == 0.0
    channel.poll(5.0)
    assert channel.next_wakeup() == pytest.approx(5.0 + channel.rto.timeout(0))


def test_a_channel_with_everything_acknowledged_sleeps_until_a_packet_comes():
    channel = queued(2)
    channel.poll(0.0)
    channel.receive(ack(1), 0.1)
    assert channel.next_wakeup() == pytest.approx(1.0)  # packet 2's timer, set when it was sent
    channel.receive(ack(2), 0.2)
    assert channel.next_wakeup() == float("inf") and channel.poll(5.0) == []


def test_a_resend_the_peer_is_known_to_miss_waits_srtt_not_the_floor():
    channel = queued(3)
    channel.poll(0.0)
    channel.receive(ack(0, 0b1), 0.001)  # 2 arrived (a 1 ms round trip), 1 did not
    channel.receive(ack(0, 0b11), 0.002)  # 3 too: 1 was passed over twice
    assert data_seqs(channel.poll(0.002)) == [1]  # fast retransmit
    gap_wait = channel.next_wakeup() - 0.002
    assert gap_wait < RtoEstimator.FLOOR  # no room kept for a delayed ACK: a gap is acknowledged at once
    assert gap_wait == pytest.approx(channel.rto.gap_timeout(0))
    assert data_seqs(channel.poll(0.002 + gap_wait)) == [1]  # lost again: resent after SRTT-ish, not 30 ms
    assert channel.congestion_window == Channel.WINDOW  # random loss, not congestion


def test_fast_retransmit_when_two_later_packets_are_acknowledged():
    channel = queued(4)
    channel.poll(0.0)  # 1 to 4 sent; the timers fire at 1.0
    channel.receive(ack(0, 0b1), 0.10)  # 2 arrived, 1 did not: perhaps merely late
    assert channel.poll(0.10) == []
    channel.receive(ack(0, 0b11), 0.11)  # 3 too: 1 was passed over twice, so it is lost
    assert data_seqs(channel.poll(0.11)) == [1]
    assert channel.stats["fast retransmits"] == 1
    assert channel.next_wakeup() == pytest.approx(0.11 + channel.rto.timeout(0))  # not backed off


def test_a_timeout_halves_what_may_be_in_flight_and_acknowledgements_grow_it_back():
    channel = queued(40, window=8)
    assert data_seqs(channel.poll(0.0)) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert data_seqs(channel.poll(channel.next_wakeup())) == [1, 2, 3, 4, 5, 6, 7, 8]  # all timed out
    assert channel.congestion_window == 4
    channel.receive(ack(8), 2.0)  # all eight acknowledged: the window opens again, up to its bound
    assert data_seqs(channel.poll(2.0)) == [9, 10, 11, 12, 13, 14, 15, 16]
    channel.receive(ack(16), 2.1)
    assert channel.congestion_window == 8


def test_a_timeout_never_shuts_the_window_below_two():
    channel = queued(10, window=8)
    channel.poll(0.0)
    for _ in range(6):
        channel.poll(channel.next_wakeup())
    assert channel.congestion_window == Channel.MIN_CONGESTION_WINDOW == 2


def test_a_fast_retransmit_leaves_the_window_as_it_was():
    channel = queued(4)
    channel.poll(0.0)
    channel.receive(ack(0, 0b1), 0.10)
    channel.receive(ack(0, 0b11), 0.11)  # 1 passed over twice: random loss, not congestion
    assert data_seqs(channel.poll(0.11)) == [1]
    assert channel.congestion_window == Channel.WINDOW


def test_one_acknowledgement_confirming_two_later_packets_is_enough_for_fast_retransmit():
    channel = queued(4)
    channel.poll(0.0)
    channel.receive(ack(0, 0b11), 0.10)  # 2 and 3 at once (the peer read both, then acknowledged)
    assert data_seqs(channel.poll(0.10)) == [1]  # packets overtook it, not acknowledgements: RFC 6675


def test_karn_no_round_trip_sample_from_a_resent_packet():
    channel = queued(1, rto=RtoEstimator(initial=1.0, floor=0.01))
    channel.poll(0.0)
    channel.send(PacketType.SAY, pack_fields("second"))
    channel.poll(0.5)  # 2 sent once, at 0.5
    channel.poll(1.0)  # 1 timed out and was sent again
    channel.receive(ack(1), 1.05)
    assert channel.rto.srtt is None  # was that the answer to the first copy or the second? No sample
    channel.receive(ack(2), 1.2)
    assert channel.rto.srtt == pytest.approx(0.7)  # packet 2: sent once, 0.7 s to its acknowledgement


# --- Bounds ---------------------------------------------------------------------------------


def test_the_queue_behind_the_window_is_bounded():
    channel = queued(3, window=2, max_queue=3)
    assert channel.send(PacketType.SAY, pack_fields("one too many")) == 0
    channel.poll(0.0)  # 1 and 2 go out: the queue has room again
    assert channel.send(PacketType.SAY, pack_fields("fits now")) == 4


def test_packets_beyond_the_window_are_dropped():
    channel = Channel(CIPHER, window=4)
    assert channel.receive(numbered(5), 0.0) == ("outside the window", [])
    assert channel.receive(numbered(4), 0.0)[0] == "held: a gap before it"
    delivered = [channel.receive(numbered(seq), 0.0)[1] for seq in (1, 2, 3)][-1]
    assert [packet.seq for packet in delivered] == [3, 4]  # 5 was never kept
    assert channel.acknowledgement() == (4, 0)


# --- Acknowledging ----------------------------------------------------------------------------


def bare_acks(datagrams: list[bytes]) -> list[tuple[int, int]]:
    return [(packet.ack, packet.sack) for packet in decoded(datagrams) if packet.type == PacketType.ACK]


def test_one_bare_ack_for_every_ack_every_packets():
    channel = Channel(CIPHER, ack_delay=0.02, ack_every=2)
    sent = []
    for seq in range(1, 7):
        channel.receive(numbered(seq), 0.0)
        sent += bare_acks(channel.poll(0.0))
    assert sent == [(2, 0), (4, 0), (6, 0)]


def test_a_bare_ack_leaves_ack_delay_after_the_first_packet_it_covers():
    channel = Channel(CIPHER, ack_delay=0.02, ack_every=3)
    channel.receive(numbered(1), 0.0)
    channel.receive(numbered(2), 0.015)  # does not put the acknowledgement of 1 off
    channel.receive(Packet(PacketType.OK, 0, 0, 0), 0.016)  # nor does anything unsequenced
    assert channel.poll(0.019) == []
    assert channel.next_wakeup() == pytest.approx(0.02)
    assert bare_acks(channel.poll(0.02)) == [(2, 0)]


def test_out_of_order_and_duplicates_are_acknowledged_at_once():
    channel = Channel(CIPHER, ack_delay=0.02, ack_every=10)
    steps = []
    for seq in (1, 3, 3, 1, 2, 6, 4):
        outcome, _ = channel.receive(numbered(seq), 0.0)
        steps.append((seq, outcome, bare_acks(channel.poll(0.0))))
    assert steps == [
        (1, "in order", []),  # may wait for company
        (3, "held: a gap before it", [(1, 0b1)]),  # 2 is missing
        (3, "duplicate", [(1, 0b1)]),  # our acknowledgement was lost
        (1, "duplicate", [(1, 0b1)]),  # so was that one
        (2, "in order", [(3, 0)]),  # the gap filled
        (6, "held: a gap before it", [(3, 0b10)]),  # 4 and 5 missing
        (4, "in order", [(4, 0b1)]),  # half the gap filled
    ]


def test_acknowledgement_rides_on_data_going_back():
    channel = Channel(CIPHER, ack_delay=0.02, ack_every=2)
    channel.receive(numbered(1), 0.0)
    channel.receive(numbered(2), 0.0)  # an acknowledgement is due now...
    channel.send(PacketType.SAY, pack_fields("a reply"))  # ...and there is data to carry it
    (packet,) = decoded(channel.poll(0.0))
    assert (packet.type, packet.seq, packet.ack) == (PacketType.SAY, 1, 2)
    assert channel.poll(0.5) == [] and channel.stats["bare acks"] == 0  # before the reply's timer


def test_the_bitmap_is_written_and_read_by_one_rule():
    assert sack_bitmap(1, {3, 5}) == 0b101  # bit i: number cumulative + 2 + i
    rng = random.Random(5)
    for _ in range(200):
        cumulative = rng.randint(0, 1000)
        held = set(rng.sample(range(cumulative + 2, cumulative + 40), rng.randint(0, 20)))
        bitmap = sack_bitmap(cumulative, held)
        for seq in range(max(cumulative - 3, 0), cumulative + 45):
            expected = seq <= cumulative or (seq in held and seq < cumulative + 34)  # 32 bits' worth
            assert acknowledged(seq, cumulative, bitmap) == expected, (seq, cumulative, sorted(held))


def test_every_datagram_carries_the_channels_token():
    channel = queued(1, token=b"T0KEN123")
    sent = channel.poll(0.0)  # the packet
    channel.receive(numbered(1), 0.1)
    sent += channel.poll(0.1)  # a bare ACK
    sent += channel.poll(1.0)  # the packet again
    assert [packet.type for packet in decoded(sent)] == [PacketType.SAY, PacketType.ACK, PacketType.SAY]
    assert all(packet.token == b"T0KEN123" for packet in decoded(sent))

