"""ChatServer driven directly: plain bytes in, plain bytes out, a fake clock, no sockets.

Here live the promises about what any sender can and cannot do: replies to strangers are
never larger than what they sent, tokens cannot be forged or replayed, guessing passwords
is locked out, floods are slowed, tables are bounded.
"""

import collections

import pytest
from conftest import fast_config

import server
from encryption_helper import (
    BITMAP,
    FLAG_RETRANSMIT,
    MAX_TEXT_BYTES,
    MIN_HELLO_SIZE,
    NO_TOKEN,
    Packet,
    PacketType,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
    unpack_fields,
)

CIPHER = make_cipher("xor")
WALL_CLOCK = 1_700_000_000.0


class Harness:
    """A ChatServer, a fake clock, and the datagrams it sends, decoded."""

    def __init__(self, data_dir, **changes):
        self.log: list[str] = []
        self.config = fast_config(data_dir, **changes)
        self.chat = server.ChatServer(self.config, log=self.log.append, wall_clock=lambda: WALL_CLOCK)
        self.now = 1000.0
        self.sent: list[tuple[bytes, tuple]] = []

    def deliver(self, data: bytes, address) -> list[tuple[Packet, tuple, int]]:
        """Hand the server one datagram; return what it sends as (packet, to, size)."""
        self.chat.handle_datagram(data, address, self.now)
        for work, then in self.chat.slow_jobs[:]:  # the hash worker, run in line
            self.chat.slow_jobs.remove((work, then))
            then(work(), self.now)
        return self.collect()

    def collect(self):
        out = [(decode_packet(data, CIPHER), to, len(data)) for data, to in self.chat.outbox]
        self.sent.extend(self.chat.outbox)
        self.chat.outbox.clear()
        return out

    def advance(self, seconds: float):
        self.now += seconds
        self.chat.on_timers(self.now)
        return self.collect()


class Peer:
    """A hand-driven client at one address."""

    def __init__(self, harness: Harness, port: int, ip: str = "10.0.0.1"):
        self.harness = harness
        self.address = (ip, port)
        self.seq = 100
        self.token = NO_TOKEN
        self.last_request = b""

    def send(self, ptype, *fields, seq=None, token=None, raw_payload=None) -> list:
        if seq is None:
            self.seq += 1
            seq = self.seq
        payload = pack_fields(*fields) if raw_payload is None else raw_payload
        if ptype == PacketType.HELLO:
            payload = pack_fields("." * (MIN_HELLO_SIZE - 30))
        packet = Packet(ptype, seq, 0, self.token if token is None else token, 0, payload)
        self.last_request = encode_packet(packet, CIPHER)
        return self.harness.deliver(self.last_request, self.address)

    def reply(self, ptype, *fields, **options) -> Packet:
        """Send a request and return the server's reply to it."""
        answers = [packet for packet, to, _ in self.send(ptype, *fields, **options)
                   if to == self.address and packet.type != PacketType.EVENT]
        assert len(answers) == 1, answers
        return answers[0]

    def text(self, ptype, *fields, **options) -> str:
        return unpack_fields(self.reply(ptype, *fields, **options).payload)[-1]

    def cookie(self) -> str:
        return unpack_fields(self.reply(PacketType.HELLO).payload)[0]

    def register(self, name, password="pw") -> str:
        return self.text(PacketType.REGISTER, self.cookie(), name, password)

    def login(self, name, password="pw") -> Packet:
        answer = self.reply(PacketType.LOGIN, self.cookie(), name, password)
        if answer.type == PacketType.OK:
            self.token = answer.token
        return answer

    def member(self, name, room="lobby", password="juara"):
        self.register(name)
        assert self.login(name).type == PacketType.OK
        assert self.reply(PacketType.JOIN, room, password).type == PacketType.OK
        return self


@pytest.fixture
def harness(tmp_path):
    made = Harness(tmp_path / "data")
    yield made
    made.chat.close()


def events_to(harness: Harness, peer: Peer, outgoing) -> list[list[str]]:
    return [unpack_fields(packet.payload) for packet, to, _ in outgoing
            if to == peer.address and packet.type == PacketType.EVENT]


def test_register_login_join_say(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    out = alice.send(PacketType.SAY, "hello, bob")
    assert events_to(harness, bob, out) == [["chat", str(int(WALL_CLOCK)), "lobby", "alice", "hello, bob"]]
    assert events_to(harness, alice, out) == []  # everyone but the sender


def test_the_reply_goes_out_before_the_events_the_request_causes(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    alice.send(PacketType.SAY, "for the history")
    said = [(packet.type, to) for packet, to, _ in alice.send(PacketType.SAY, "hello")]
    assert said == [(PacketType.OK, alice.address), (PacketType.EVENT, bob.address)]
    carol = Peer(harness, 3)
    carol.register("carol")
    carol.login("carol")
    joined = [(packet.type, to) for packet, to, _ in carol.send(PacketType.JOIN, "lobby", "juara")]
    assert joined[0] == (PacketType.OK, carol.address)
    # then the two messages of history to her, and "carol joined" to alice and bob
    assert sorted(to[1] for ptype, to in joined[1:] if ptype == PacketType.EVENT) == [1, 2, 3, 3]


def test_exact_reply_texts(harness):
    peer = Peer(harness, 1)
    assert peer.register("alice") == "Registration successful."
    assert peer.register("ALICE") == "Username already taken."
    assert unpack_fields(peer.login("alice", "wrong").payload)[1] == "Invalid username or password."
    assert unpack_fields(peer.login("nobody").payload)[1] == "Invalid username or password."


def test_login_issues_a_random_token(harness):
    alice, bob = Peer(harness, 1), Peer(harness, 2)
    alice.register("alice")
    bob.register("bob")
    alice.login("alice")
    bob.login("bob")
    assert NO_TOKEN != alice.token != bob.token != NO_TOKEN


def test_same_account_twice_is_refused(harness):
    Peer(harness, 1).member("alice")
    answer = Peer(harness, 2).login("alice")
    assert answer.type == PacketType.ERROR
    assert "logged in already" in unpack_fields(answer.payload)[1]


def test_chat_before_login_is_answered_with_reset(harness):
    stranger = Peer(harness, 1)
    answer = stranger.reply(PacketType.SAY, "hi")
    assert answer.type == PacketType.RESET and answer.payload == b""
    assert not harness.chat.sessions


def test_forged_token_from_a_members_address_is_dropped(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    out = alice.send(PacketType.SAY, "forged", token=b"guessed!")
    assert out == [] and events_to(harness, bob, out) == []


def test_token_from_another_address_is_useless(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    thief = Peer(harness, 3)
    thief.token = alice.token  # sniffed, but sent from elsewhere
    out = thief.send(PacketType.SAY, "I am alice")
    assert events_to(harness, bob, out) == []
    assert [packet.type for packet, _, _ in out] == [PacketType.RESET]


def test_repeated_request_gets_the_same_reply_and_acts_once(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    first = alice.send(PacketType.SAY, "once")
    again = harness.deliver(alice.last_request, alice.address)  # our reply was lost; resent
    assert len(events_to(harness, bob, first)) == 1
    assert events_to(harness, bob, again) == []
    assert [p for p, to, _ in again if to == alice.address] == [p for p, to, _ in first if to == alice.address]


def test_replay_from_another_address_does_nothing(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    alice.send(PacketType.SAY, "captured")
    out = harness.deliver(alice.last_request, ("10.9.9.9", 4444))
    assert events_to(harness, bob, out) == []


def test_old_request_replayed_later_does_nothing(harness):
    alice = Peer(harness, 1).member("alice")
    alice.send(PacketType.SAY, "first")
    captured = alice.last_request
    alice.send(PacketType.SAY, "second")
    out = harness.deliver(captured, alice.address)
    assert out == [] and harness.chat.stats["stale"] == 1


def test_login_replayed_from_another_address_is_refused(harness):
    alice = Peer(harness, 1)
    alice.register("alice")
    alice.login("alice")
    thief = Peer(harness, 2)
    answer = harness.deliver(alice.last_request, thief.address)
    assert [unpack_fields(p.payload)[0] for p, _, _ in answer] == ["stale-cookie"]


def test_cookie_expires(harness):
    peer = Peer(harness, 1)
    cookie = peer.cookie()
    harness.now += 2 * server.COOKIE_PERIOD + 1
    assert peer.text(PacketType.REGISTER, cookie, "alice", "pw") == "Say HELLO again."


def test_five_failures_lock_the_account_without_hashing(harness):
    peer = Peer(harness, 1)
    peer.register("alice")
    for _ in range(5):
        peer.login("alice", "guess")
    hashes_before = harness.chat.stats["datagrams"]
    answer = Peer(harness, 2, ip="10.0.0.2").login("alice", "pw")  # the right one, from anywhere
    code, text = unpack_fields(answer.payload)
    assert code == "locked"
    assert text == "Too many failed attempts; try again in 60 s."
    assert not any("checking password" in line for line in harness.log[-2:])
    assert harness.chat.stats["datagrams"] == hashes_before + 2  # HELLO and LOGIN, no more
    harness.now += 61
    assert Peer(harness, 3).login("alice").type == PacketType.OK


def test_registrations_per_address_are_limited(tmp_path):
    harness = Harness(tmp_path, registrations_per_address=3)
    peer = Peer(harness, 1)
    texts = [peer.register(f"user{number}") for number in range(4)]
    assert texts[:3] == ["Registration successful."] * 3
    assert texts[3].startswith("Too many registrations from your address")
    assert Peer(harness, 2, ip="10.0.0.2").register("other") == "Registration successful."


def test_hash_queue_is_bounded_per_address(harness):
    peer = Peer(harness, 1)
    peer.register("alice")
    harness.chat.pending_by_ip["10.0.0.1"] = harness.config.max_pending_per_address  # two still hashing
    assert "still being checked" in unpack_fields(peer.login("alice").payload)[1]


def test_stranger_never_gets_more_bytes_than_it_sent(harness):
    peer = Peer(harness, 1)
    small_hello = encode_packet(Packet(PacketType.HELLO, 1), CIPHER)
    assert harness.deliver(small_hello, peer.address) == []  # an unpadded HELLO earns nothing
    for data in [encode_packet(Packet(PacketType.REGISTER, 2, payload=b"\x00"), CIPHER),
                 b"UC" + bytes(30), encode_packet(Packet(PacketType.HELLO, 3, payload=bytes(100)), CIPHER),
                 encode_packet(Packet(PacketType.SAY, 4, token=b"forged!!"), CIPHER)]:
        for _, _, size in harness.deliver(data, peer.address):
            assert size <= len(data)


def test_server_full(tmp_path):
    harness = Harness(tmp_path, max_sessions=2)
    Peer(harness, 1).member("a")
    Peer(harness, 2).member("b")
    third = Peer(harness, 3)
    third.register("c")
    assert unpack_fields(third.login("c").payload)[1] == "Server full; try again later."


def test_rooms_are_bounded(tmp_path):
    harness = Harness(tmp_path, max_rooms=2)
    peer = Peer(harness, 1).member("alice")
    assert peer.reply(PacketType.JOIN, "second", "pw").type == PacketType.OK
    assert "Server full" in peer.text(PacketType.JOIN, "third", "pw")


def test_flood_is_slowed_and_told_when_to_resend(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    answers = [alice.reply(PacketType.SAY, f"line {n}") for n in range(harness.config.message_burst + 1)]
    assert all(answer.type == PacketType.OK for answer in answers[:-1])
    code, text, retry_after = unpack_fields(answers[-1].payload)
    assert code == "slow-down" and "Slow down" in text and float(retry_after) > 0
    harness.now += float(retry_after)
    assert alice.reply(PacketType.SAY, "line again").type == PacketType.OK
    assert bob.reply(PacketType.SAY, "bob is not slowed").type == PacketType.OK


def test_message_limits(harness):
    alice = Peer(harness, 1).member("alice")
    assert alice.text(PacketType.SAY, "x" * (MAX_TEXT_BYTES + 1)).startswith("Message too long (1001 bytes")
    assert alice.text(PacketType.SAY, "   ") == "Empty message; nothing sent."
    assert alice.reply(PacketType.SAY, "é" * (MAX_TEXT_BYTES // 2)).type == PacketType.OK


def test_wrong_room_password_and_new_rooms(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    assert alice.text(PacketType.JOIN, "lobby", "juara") == "You are in lobby already."
    assert "(new room)" in alice.text(PacketType.JOIN, "kelas", "rahasia")
    assert bob.text(PacketType.JOIN, "kelas", "wrong") == "Wrong room password."
    assert bob.reply(PacketType.JOIN, "KELAS", "rahasia").type == PacketType.OK


def test_rooms_are_kept_apart(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    carol = Peer(harness, 3).member("carol", room="other", password="pw")
    out = alice.send(PacketType.SAY, "lobby only")
    assert len(events_to(harness, bob, out)) == 1 and events_to(harness, carol, out) == []


def test_member_leaving_is_announced(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    out = alice.send(PacketType.BYE)
    assert events_to(harness, bob, out) == [["leave", str(int(WALL_CLOCK)), "lobby", "alice", ""]]
    assert "alice" not in harness.chat.online


def test_silent_member_times_out_and_the_name_is_free(harness):
    Peer(harness, 1).member("alice")
    bob = Peer(harness, 2).member("bob")
    harness.now += harness.config.session_timeout / 2
    bob.reply(PacketType.PING)
    out = harness.advance(harness.config.session_timeout / 2 + 2)
    assert ["leave", str(int(WALL_CLOCK)), "lobby", "alice", "timed out"] in events_to(harness, bob, out)
    assert Peer(harness, 3).login("alice").type == PacketType.OK


def test_private_message_reaches_only_its_target(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    carol = Peer(harness, 3).member("carol")
    out = alice.send(PacketType.PRIVATE, "BOB", "psst")
    assert events_to(harness, bob, out) == [["private", str(int(WALL_CLOCK)), "", "alice", "psst"]]
    assert events_to(harness, carol, out) == []
    assert alice.text(PacketType.PRIVATE, "nobody", "hi") == "nobody is not online."


def test_rooms_and_who(harness):
    alice = Peer(harness, 1).member("alice")
    Peer(harness, 2).member("bob")
    assert unpack_fields(alice.reply(PacketType.ROOMS).payload) == ["lobby", "2"]
    assert unpack_fields(alice.reply(PacketType.WHO).payload) == ["lobby", "alice", "bob"]


def test_bad_payload_in_a_request_is_refused_not_fatal(harness):
    alice = Peer(harness, 1).member("alice")
    answer = alice.reply(PacketType.SAY, raw_payload=b"\x00\x09abc")
    assert answer.type == PacketType.ERROR and unpack_fields(answer.payload)[0] == "bad-request"
    assert alice.reply(PacketType.SAY, "still fine").type == PacketType.OK


def test_packets_only_servers_send_are_dropped(harness):
    alice = Peer(harness, 1).member("alice")
    for ptype in (PacketType.OK, PacketType.ERROR, PacketType.EVENT, PacketType.RESET):
        assert alice.send(ptype) == []


def test_history_is_shown_on_join_and_kept_across_restarts(tmp_path):
    first = Harness(tmp_path)
    alice = Peer(first, 1).member("alice")
    for number in range(25):
        first.now += 1
        alice.send(PacketType.SAY, f"message {number}")
    first.chat.close()
    second = Harness(tmp_path)  # the server restarted
    bob = Peer(second, 2)
    assert bob.login("alice").type == PacketType.OK  # the account survived
    out = bob.send(PacketType.JOIN, "lobby", "juara")
    history = events_to(second, bob, out)
    assert [event[0] for event in history] == ["history"] * 20
    assert [event[4] for event in history] == [f"message {number}" for number in range(5, 25)]


def test_no_password_in_history_or_log(harness, tmp_path):
    alice = Peer(harness, 1)
    alice.register("alice", "hunter2-secret")
    alice.login("alice", "hunter2-secret")
    alice.reply(PacketType.JOIN, "lobby", "juara")
    alice.send(PacketType.SAY, "hello")
    harness.chat.history.file.flush()
    written = "\n".join(harness.log) + (tmp_path / "data" / "chat_history.txt").read_text(encoding="utf-8")
    written += (tmp_path / "data" / "users.json").read_text(encoding="utf-8")
    assert "hello" in written
    assert "hunter2" not in written and "juara" not in written


def test_unacknowledged_events_are_resent_then_the_member_is_dropped(tmp_path):
    harness = Harness(tmp_path, max_retransmits=4)
    bob, alice = Peer(harness, 2).member("bob"), Peer(harness, 1).member("alice")  # alice gets no events
    alice.send(PacketType.SAY, "are you there?")
    resent = []
    while "bob" in harness.chat.online and len(resent) < 10:
        out = harness.advance(harness.config.min_rto * 40)
        resent += [p for p, to, _ in out if to == bob.address and p.payload.startswith(b"\x00\x04chat")]
        alice.reply(PacketType.PING)  # alice keeps talking; only bob is silent
    assert len(resent) == 3 and all(p.flags & FLAG_RETRANSMIT for p in resent)
    assert "bob" not in harness.chat.online and "alice" in harness.chat.online
    assert any("not responding" in line for line in harness.log)


def test_acknowledged_events_are_not_resent(harness):
    alice, bob = Peer(harness, 1).member("alice"), Peer(harness, 2).member("bob")
    out = alice.send(PacketType.SAY, "hello")
    (event,) = [p for p, to, _ in out if to == bob.address]
    harness.deliver(encode_packet(Packet(PacketType.ACK, 0, event.seq, bob.token, 0, BITMAP.pack(0)), CIPHER),
                    bob.address)
    assert all(to != bob.address for _, to, _ in harness.advance(10.0))


def test_a_member_who_falls_too_far_behind_is_dropped_alone(tmp_path):
    harness = Harness(tmp_path, max_queue=5, window=2, message_burst=100)
    alice = Peer(harness, 1).member("alice")
    Peer(harness, 2).member("bob")
    carol = Peer(harness, 3).member("carol")
    for number in range(2 + 5 + 1):  # window, queue, one more: bob never acknowledges
        out = alice.send(PacketType.SAY, f"m{number}")
        for packet, to, _ in out:  # carol acknowledges everything
            if to == carol.address and packet.type == PacketType.EVENT:
                harness.deliver(encode_packet(Packet(PacketType.ACK, 0, packet.seq, carol.token, 0,
                                                     BITMAP.pack(0)), CIPHER), carol.address)
    assert "bob" not in harness.chat.online and "carol" in harness.chat.online


def test_every_request_type_has_one_handler():
    handled = set(server.STRANGER_HANDLERS) | set(server.MEMBER_HANDLERS)
    requests = {t for t in PacketType if t.value <= PacketType.BYE}
    assert handled == requests and not set(server.STRANGER_HANDLERS) & set(server.MEMBER_HANDLERS)


def test_problem_log_is_throttled(harness):
    for number in range(500):
        harness.deliver(b"garbage %d" % number, ("10.0.0.1", 1))
    assert len(harness.log) <= server.PROBLEMS_PER_SECOND + 2
    assert harness.chat.stats["bad"] == 500


def test_throttling_tables_are_bounded():
    counter = server.EventCounter(limit=5, period=60, max_keys=100)
    for number in range(10_000):
        counter.add(f"10.0.{number // 256}.{number % 256}", now=1.0)
    assert len(counter.events) == 100


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = server.TokenBucket(rate=5, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.2)
    assert bucket.take(0.2) == 0.0


def test_actions_are_logged_one_line_each_with_address_user_type_size(harness):
    Peer(harness, 1).member("alice")
    join = [line for line in harness.log if " JOIN " in line]
    assert len(join) == 1 and "10.0.0.1:1" in join[0] and "alice" in join[0] and " B " in join[0]


def test_quiet_logs_only_problems(tmp_path):
    harness = Harness(tmp_path, quiet=True)
    Peer(harness, 1).member("alice")
    harness.deliver(b"junk", ("10.0.0.1", 9))
    assert len(harness.log) == 1 and "[WARN]" in harness.log[0]


def test_stats_count_what_happened(harness):
    harness.deliver(b"junk", ("10.0.0.1", 9))
    assert harness.chat.stats == collections.Counter(datagrams=1, bad=1)


def test_a_cookie_of_any_text_is_refused_not_fatal(harness):
    peer = Peer(harness, 1)
    assert peer.text(PacketType.REGISTER, "kué 🙂", "alice", "a long password") == "Say HELLO again."


def test_a_huge_unknown_name_is_not_echoed(harness):
    alice = Peer(harness, 1).member("alice")
    answer = alice.reply(PacketType.PRIVATE, "x" * 1100, "hi")
    assert unpack_fields(answer.payload)[1] == "That user is not online."


def test_a_reply_too_big_for_a_packet_becomes_an_error(harness):
    alice = Peer(harness, 1).member("alice")
    request = Packet(PacketType.WHO, 5)
    answer = decode_packet(harness.chat.reply(request, PacketType.OK, ["x" * 2000], alice.token), CIPHER)
    assert answer.type == PacketType.ERROR and unpack_fields(answer.payload)[0] == "too-long"


def test_many_members_too_slow_at_once_are_all_dropped_calmly(tmp_path):
    harness = Harness(tmp_path, max_queue=2, window=1, message_burst=1000, registrations_per_address=1000)
    members = [Peer(harness, 1000 + number).member(f"m{number}") for number in range(200)]  # none ever ACKs
    for number in range(4):  # never raises, however long the chain of "left" messages grows
        members[-1].reply(PacketType.SAY, f"filling {number}")
    assert len(harness.chat.online) < 10
    lobby = harness.chat.rooms["lobby"]
    assert all(harness.chat.online.get(name) is session for name, session in lobby.members.items())


def test_a_lost_welcome_is_sent_again_even_after_the_reply_cache_forgot_it(tmp_path):
    harness = Harness(tmp_path, reply_cache=1)
    alice = Peer(harness, 1)
    alice.register("alice")
    welcome = alice.login("alice")
    login = alice.last_request
    Peer(harness, 2).register("bob")  # pushes alice's answer out of the one-entry cache
    (again, _, _), = harness.deliver(login, alice.address)
    assert again == welcome and again.token == alice.token


def test_a_strangers_odd_name_is_logged_quoted(harness):
    peer = Peer(harness, 1)
    peer.register("evil\nFAKE LOG LINE")
    assert not any(line.startswith("FAKE") for line in "\n".join(harness.log).split("\n"))
