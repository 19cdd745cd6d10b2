"""ChatServer driven directly: plain bytes in, plain bytes out, a fake clock, no sockets.

Here live the promises about what any sender can and cannot do: answers to clients without a session are
never larger than what they sent, tokens cannot be forged or replayed, guessing passwords
is locked out, floods are held back, tables are bounded.

A client before login (`Peer`) sends HELLO, REGISTER and LOGIN by hand, numbered 1, 2, 3...; a
member (`Member`) talks over a `Channel` numbered from 1, as client.py does after login.
Password checks run in line: `job.run()`, then `finish_password_job`.
"""

import binascii
import hashlib
import itertools
import os
import secrets
import types

import pytest
from conftest import WaitingSocket, bare_loop, fast_config

import auth
import client
import server
from encryption_helper import (
    CHUNK_SIZE,
    FLAG_FILE_STREAM,
    FLAG_RETRANSMIT,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_TEXT_BYTES,
    MB,
    MIN_HELLO_SIZE,
    NO_TOKEN,
    SERVER_ONLY,
    VERSION,
    Channel,
    Packet,
    PacketType,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_chunk,
    pack_fields,
    unpack_fields,
)

CIPHER = make_cipher("xor")
WALL_CLOCK = 1_700_000_000.0
STAMP = str(int(WALL_CLOCK))  # the time field of every EVENT here
HELLO_PADDING = "." * (MIN_HELLO_SIZE - HEADER_SIZE - 2)
A = client.public_key(5)  # a LOGIN's first step: g^5, a number of the group
ACCOUNT = ("00" * 16, "1000", client.public_key(7))  # a REGISTER's salt, iterations and verifier
OK, ERROR, EVENT = PacketType.OK, PacketType.ERROR, PacketType.EVENT


class Harness:
    """A ChatServer, a fake clock, and the datagrams it sends, decoded."""

    def __init__(self, data_dir, **changes):
        self.log: list[str] = []
        self.config = fast_config(data_dir, **changes)
        self.chat = server.ChatServer(self.config, log=self.log.append, wall_clock=lambda: WALL_CLOCK)
        self.now = 1000.0
        self.wire: list[tuple[Packet, tuple, int]] = []  # everything the server sent, in order
        self.members: dict[tuple, Member] = {}  # address -> the member there, who reads what is sent to it

    def deliver(self, data: bytes, address, run_jobs: bool = True) -> list[tuple[Packet, tuple, int]]:
        """Hand the server one datagram; return what it sends as (packet, to, size)."""
        self.chat.handle_datagram(data, address, self.now)
        self.chat.flush(self.now)
        out = self.collect()
        if run_jobs:
            out += self.run_jobs()
        return out

    def run_jobs(self) -> list[tuple[Packet, tuple, int]]:
        """The password worker, in line: run every job waiting (and any they queue), and hand it back."""
        while self.chat.password_jobs:
            jobs, self.chat.password_jobs[:] = list(self.chat.password_jobs), []
            for job in jobs:
                self.chat.finish_password_job(job.run(), self.now)
        return self.collect()

    def collect(self) -> list[tuple[Packet, tuple, int]]:
        out = [(decode_packet(data, CIPHER), to, len(data)) for data, to in self.chat.outbox]
        self.chat.outbox.clear()
        self.wire.extend(out)
        for packet, to, _ in out:
            if to in self.members:
                self.members[to].hear(packet)
        return out

    def settle(self) -> None:
        """Let every member that hears send what its channel has (acknowledgements, mostly)."""
        for _ in range(1000):
            out = [(data, member.address) for member in list(self.members.values()) if not member.deaf
                   for data in member.channel.poll(self.now)]
            if not out:
                return
            for data, address in out:
                self.deliver(data, address)
        raise AssertionError("the traffic never settled")

    def advance(self, seconds: float) -> list[tuple[Packet, tuple, int]]:
        """Move the clock on, running the timers at each deadline on the way (as ServerLoop does,
        whose clock has moved on by at least a millisecond when it looks again)."""
        end = self.now + seconds
        out = []
        while self.now < end:
            self.now = min(max(self.chat.next_deadline(), self.now + 0.001), end)
            self.chat.on_timers(self.now)
            out += self.collect()
            self.settle()
        return out


class Peer:
    """A client before login, at one address: requests numbered by hand, answered unsequenced."""

    def __init__(self, harness: Harness, port: int, ip: str = "10.0.0.1"):
        self.harness = harness
        self.address = (ip, port)
        self.seq = 0
        self.last_request = b""

    def send(self, ptype, *fields, seq=None, token=NO_TOKEN, run_jobs=True) -> list:
        if seq is None:
            self.seq += 1
            seq = self.seq
        if ptype == PacketType.HELLO:
            fields = (HELLO_PADDING,)
        self.last_request = encode_packet(Packet(ptype, seq, token=token, payload=pack_fields(*fields)), CIPHER)
        return self.harness.deliver(self.last_request, self.address, run_jobs)

    def answer(self, ptype, *fields, **options) -> Packet:
        """Send a request and return the server's one answer to it."""
        answers = [packet for packet, to, _ in self.send(ptype, *fields, **options) if to == self.address]
        assert len(answers) == 1, answers
        return answers[0]

    def fields(self, ptype, *fields, **options) -> list[str]:
        """The answer's fields after the request number, which must name this request."""
        answer = self.answer(ptype, *fields, **options)
        re, *rest = unpack_fields(answer.payload)
        assert answer.seq == 0 and int(re) == answer.ack == options.get("seq", self.seq)
        return rest

    def text(self, ptype, *fields, **options) -> str:
        return self.fields(ptype, *fields, **options)[-1]

    def cookie(self) -> str:
        return self.fields(PacketType.HELLO, run_jobs=False)[0]  # leaves the worker's queue alone

    def register(self, name: str, password: str = "pw") -> str:
        """REGISTER as the client does: v = g^x made here, with the iterations HELLO names."""
        cookie, iterations, _ = self.fields(PacketType.HELLO, run_jobs=False)
        record = auth.new_verifier(name, password, (client.wire.SRP_N, client.wire.SRP_G), int(iterations))
        return self.fields(PacketType.REGISTER, *self.tagged(cookie, name, record["salt"], iterations,
                                                             record["verifier"]))[-1]

    def tagged(self, *fields: str) -> list[str]:
        """REGISTER's [cookie, name, salt, iterations, verifier] with A and the tag added."""
        return client.registration(list(fields), self.harness.chat.key[1])[0]

    def login(self, name: str, password: str = "pw", *rejoin: str) -> Packet:
        """Both LOGINs of SRP-6a; the second's answer, or the first's ERROR. On OK, M2 checked,
        a Member starts reading this address, on the token the answer carries."""
        cookie, a = self.cookie(), secrets.randbits(256)
        first = self.answer(PacketType.LOGIN, cookie, name, client.public_key(a))
        if first.type != OK:
            return first
        challenge = unpack_fields(first.payload)[1:]
        x = auth.password_key(name, password, bytes.fromhex(challenge[0]), int(challenge[1]))
        proof, expected, key = client.login_proofs(name, x, a, challenge)
        answer = self.answer(PacketType.LOGIN, cookie, name, client.public_key(a), proof, *rejoin)
        if answer.type == OK:
            assert unpack_fields(answer.payload)[-2] == expected  # the server holds the verifier
            self.harness.members[self.address] = Member(self.harness, self.address, answer.token, key)
        return answer


class Member:
    """A logged-in client: its requests and the server's replies and EVENTs on one Channel."""

    def __init__(self, harness: Harness, address, token: bytes, K: bytes = b""):
        """K, the login's SRP-6a key: the room password is sealed, every packet tagged, with keys from it."""
        self.harness, self.address, self.token = harness, address, token
        keys = client.wire.session_keys(K)
        self.key = keys.seal
        self.channel = Channel(CIPHER, token, window=Channel.WINDOW, max_queue=Channel.MAX_QUEUE,
                               max_sends=Channel.MAX_SENDS)
        self.channel.key = keys.to_server
        self.replies: dict[int, tuple[PacketType, list[str]]] = {}  # request number -> (OK/ERROR, fields after re)
        self.heard: list[tuple] = []  # in the order delivered: (OK/ERROR, re) or (EVENT, fields)
        self.deaf = False  # True: hears nothing, so acknowledges nothing

    def hear(self, packet: Packet) -> None:
        if self.deaf or packet.token != self.token or packet.type == PacketType.RESET:
            return
        _, ready = self.channel.receive(packet, self.harness.now)
        for delivered in ready:
            fields = unpack_fields(delivered.payload)
            if delivered.type in (OK, ERROR):
                re = int(fields[0])
                assert re not in self.replies, f"request {re} answered twice"
                self.replies[re] = (delivered.type, fields[1:])
                self.heard.append((delivered.type, re))
            elif delivered.type == EVENT:
                self.heard.append((EVENT, fields))

    def send(self, ptype, *fields, raw: bytes | None = None) -> int:
        """Queue a request without sending it; return its number. A JOIN's room password is
        sealed with the session's key, as the client does."""
        if ptype == PacketType.JOIN and len(fields) == 2:
            fields = (fields[0], client.wire.seal_text(self.key, fields[1]))
        return self.channel.send(ptype, pack_fields(*fields) if raw is None else raw)

    def flush(self) -> list[bytes]:
        """Send what the channel has, let the traffic settle; return the datagrams sent."""
        datagrams = self.channel.poll(self.harness.now)
        for data in datagrams:
            self.harness.deliver(data, self.address)
        self.harness.settle()
        return datagrams

    def ask(self, ptype, *fields, raw: bytes | None = None) -> tuple[PacketType, list[str]]:
        """Send one request and return its answer: (OK or ERROR, the fields after re)."""
        seq = self.send(ptype, *fields, raw=raw)
        self.flush()
        assert seq in self.replies, f"no answer to {ptype.name} {seq}"
        return self.replies[seq]

    def text(self, ptype, *fields) -> str:
        return self.ask(ptype, *fields)[1][-1]

    def events(self) -> list[list[str]]:
        return [fields for kind, fields in self.heard if kind == EVENT]

    def texts(self, kind: str = "chat") -> list[str]:
        return [fields[4] for fields in self.events() if fields[0] == kind]


def member(harness: Harness, port: int, name: str, room: str = "lobby", password: str = "juara",
           ip: str = "10.0.0.1") -> Member:
    """Return a member registered, logged in and in `room`."""
    peer = Peer(harness, port, ip)
    assert peer.register(name) == "Registration successful."
    assert peer.login(name).type == OK
    made = harness.members[peer.address]
    assert made.ask(PacketType.JOIN, room, password)[0] == OK
    return made


@pytest.fixture
def make_harness(tmp_path):
    """Return a function that makes a Harness (after the test has set its limits); all closed afterwards."""
    made = []

    def make(data_dir=None, **changes) -> Harness:
        made.append(Harness(data_dir or tmp_path / "data", **changes))
        return made[-1]

    yield make
    for harness in made:
        harness.chat.close()


@pytest.fixture
def harness(make_harness):
    return make_harness()


@pytest.fixture
def hashes(monkeypatch):
    """Every PBKDF2 hash computed, counted where it is computed."""
    calls = []
    real = auth.hash_password

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(auth, "hash_password", counting)
    return calls


def channel_defaults(monkeypatch, **values) -> None:
    """Change the defaults of every Channel made from now on (the server's, per session)."""
    for name, value in values.items():
        monkeypatch.setitem(Channel.__init__.__kwdefaults__, name, value)


def datagram(ptype: int, payload: bytes = b"", seq: int = 1, token: bytes = NO_TOKEN) -> bytes:
    """A datagram as encode_packet makes it, with a valid checksum, but of any type number."""
    header = HEADER.pack(MAGIC, VERSION, ptype, 0, len(payload), seq, 0, 0, token, 0)
    crc = binascii.crc32(header, binascii.crc32(payload))
    return header[:-4] + crc.to_bytes(4, "big") + CIPHER.encrypt(payload)


def sent_to(harness: Harness, member_or_peer, out=None) -> list[Packet]:
    return [packet for packet, to, _ in (harness.wire if out is None else out) if to == member_or_peer.address]


# --- Accounts and logging in ----------------------------------------------------------------------


def test_register_login_join_say(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    assert alice.ask(PacketType.SAY, "hello, bob") == (OK, ["to lobby, 1 other"])
    assert bob.events()[-1] == ["chat", STAMP, "lobby", "alice", "hello, bob"]
    assert "hello, bob" not in alice.texts()  # everyone but the sender


def test_exact_reply_texts(harness):
    peer = Peer(harness, 1)
    assert peer.register("alice") == "Registration successful."
    assert peer.register("ALICE") == "Username already taken."
    assert unpack_fields(peer.login("alice", "wrong").payload)[1:] == ["invalid-login", "Invalid username or password."]
    assert unpack_fields(peer.login("nobody").payload)[1:] == ["invalid-login", "Invalid username or password."]
    assert unpack_fields(peer.login("Alice").payload)[1:4] == ["alice", "lobby", "Welcome, alice."]  # then M2


def test_login_issues_a_random_token(harness):
    alice, bob = Peer(harness, 1), Peer(harness, 2)
    alice.register("alice")
    bob.register("bob")
    tokens = [alice.login("alice").token, bob.login("bob").token]
    assert NO_TOKEN not in tokens and tokens[0] != tokens[1]
    assert {session.token for session in harness.chat.sessions.values()} == set(tokens)


def test_a_new_login_takes_the_account_over_and_the_old_session_is_told(harness):
    old = member(harness, 1, "alice")
    bob = member(harness, 2, "bob")
    answer = Peer(harness, 3).login("alice")
    assert answer.type == OK
    assert [session.address for session in harness.chat.sessions.values()] == [bob.address, ("10.0.0.1", 3)]
    assert old.events()[-1][0] == "replaced" and old.events()[-1][4] == "logged in elsewhere"
    assert ["leave", "lobby", "alice", "logged in elsewhere"] in [[e[0], *e[2:]] for e in bob.events()]


def test_a_client_logging_in_again_never_takes_over_a_newer_session(harness):
    member(harness, 1, "alice")
    peer = Peer(harness, 2)
    answer = peer.login("alice", "pw", "rejoin")
    assert answer.type == ERROR
    assert unpack_fields(answer.payload)[1:] == ["logged-in-elsewhere", "alice logged in elsewhere."]
    assert len(harness.chat.sessions) == 1
    assert "alice LOGIN" in harness.log[-1]  # logged with the name it gave


def test_cookie_expires(harness):
    peer = Peer(harness, 1)
    cookie = peer.cookie()
    harness.now += 2 * server.COOKIE_PERIOD + 1
    assert peer.fields(PacketType.REGISTER, cookie, "alice", "pw") == ["stale-cookie", "Say HELLO again."]


def test_a_cookie_of_any_text_is_refused_not_fatal(harness):
    peer = Peer(harness, 1)
    assert peer.text(PacketType.REGISTER, "kué 🙂", "alice", "a long password") == "Say HELLO again."


def test_login_replayed_from_another_address_is_refused(harness):
    alice = Peer(harness, 1)
    alice.register("alice")
    alice.login("alice")
    (answer, to, _), = harness.deliver(alice.last_request, ("10.0.0.2", 1))  # the cookie is for alice's address
    assert to == ("10.0.0.2", 1) and unpack_fields(answer.payload)[1] == "stale-cookie"
    assert len(harness.chat.sessions) == 1


def test_five_failures_lock_the_account_from_that_address_without_hashing(harness, hashes):
    peer = Peer(harness, 1)
    peer.register("alice")
    for _ in range(5):
        peer.login("alice", "guess")
    assert len(hashes) == 1 + 5  # the registration, and every guess
    answer = Peer(harness, 2).login("alice", "pw")  # the right one, from the guesser's address
    assert unpack_fields(answer.payload)[1:] == ["locked", "Too many failed attempts; try again in 300 s."]
    assert len(hashes) == 6 and not harness.chat.password_jobs
    assert Peer(harness, 3, ip="10.0.0.2").login("alice").type == OK  # the owner at another PC
    harness.now += 301
    assert Peer(harness, 4).login("alice").type == OK


def test_registrations_per_address_are_limited(make_harness, monkeypatch):
    monkeypatch.setattr(server, "REGISTRATIONS_PER_ADDRESS", 3)
    harness = make_harness()
    peer = Peer(harness, 1)
    texts = [peer.register(f"user{number}") for number in range(4)]
    assert texts[:3] == ["Registration successful."] * 3
    assert texts[3].startswith("Too many registrations from your address")
    assert Peer(harness, 2, ip="10.0.0.2").register("other") == "Registration successful."


def test_a_password_check_that_fails_is_answered_and_frees_its_place(harness, monkeypatch):
    def broken(*args):
        raise KeyError("verifier")  # as a damaged record in users.json would

    Peer(harness, 1).register("alice")
    monkeypatch.setattr(server, "srp_challenge", broken)
    peer = Peer(harness, 2)
    assert unpack_fields(peer.login("alice").payload)[1:] == [
        "server-error", "The server could not check that; try again."]
    assert not harness.chat.pending_checks  # nothing held
    monkeypatch.undo()
    assert peer.login("alice").type == OK


def test_hash_queue_is_bounded_overall(make_harness, monkeypatch):
    monkeypatch.setattr(server, "MAX_PENDING_CHECKS", 3)
    harness = make_harness()
    Peer(harness, 1).register("alice")
    for number in range(3):
        peer = Peer(harness, 1, ip=f"10.0.1.{number}")
        assert peer.send(PacketType.LOGIN, peer.cookie(), "alice", A, run_jobs=False) == []
    late = Peer(harness, 1, ip="10.0.2.1")
    assert late.fields(PacketType.LOGIN, late.cookie(), "alice", A, run_jobs=False) == [
        "busy", "Server busy; try again in a moment."]
    assert len(harness.run_jobs()) == 3  # each queued check is answered once it is done
    assert late.login("alice").type == OK  # the queue has room again


def test_server_full(make_harness, monkeypatch):
    monkeypatch.setattr(server, "MAX_SESSIONS", 2)
    harness = make_harness()
    member(harness, 1, "a")
    member(harness, 2, "b")
    third = Peer(harness, 3)
    third.register("c")
    assert unpack_fields(third.login("c").payload)[1:] == ["full", "Server full; try again later."]


def test_an_odd_name_before_login_is_logged_quoted(harness):
    Peer(harness, 1).register("evil\nFAKE LOG LINE")
    assert harness.log and not any(line.startswith("FAKE") for line in "\n".join(harness.log).split("\n"))


# --- Retries before login: the same answer, never a second account or hash ---------------------------


def test_a_retried_register_gets_the_same_answer_and_makes_one_account(harness, hashes):
    peer = Peer(harness, 1)
    assert peer.register("alice") == "Registration successful."
    first = harness.wire[-1]
    again = harness.deliver(peer.last_request, peer.address)  # the answer was lost; the client asks again
    assert again == [first]
    assert len(harness.chat.users) == 1 and len(hashes) == 1


def test_a_retry_while_the_check_runs_starts_no_second_check(harness):
    Peer(harness, 9).register("alice")
    peer = Peer(harness, 1)
    assert peer.send(PacketType.LOGIN, peer.cookie(), "alice", A, run_jobs=False) == []
    assert harness.deliver(peer.last_request, peer.address, run_jobs=False) == []  # still checking
    assert len(harness.chat.password_jobs) == 1
    (answer, _, _), = harness.run_jobs()
    assert len(unpack_fields(answer.payload)) == 4  # re, salt, iterations, B


def test_a_retried_login_gets_the_same_welcome_and_token(harness):
    peer = Peer(harness, 1)
    peer.register("alice")
    welcome = peer.login("alice")
    session = harness.chat.sessions[peer.address]
    (again, _, _), = harness.deliver(peer.last_request, peer.address)
    assert again == welcome and again.token == session.token
    assert harness.chat.sessions == {peer.address: session}


def test_a_lost_welcome_forgotten_by_the_server_starts_a_fresh_session(make_harness, monkeypatch):
    monkeypatch.setattr(server, "RETRY_CACHE_SIZE", 1)
    harness = make_harness()
    alice = Peer(harness, 1)
    alice.register("alice")
    old = alice.login("alice").token
    login = alice.last_request
    Peer(harness, 2).register("bob")  # pushes alice's welcome out of the one remembered answer
    (again, _, _), = harness.deliver(login, alice.address)  # its proof was used: start again
    assert unpack_fields(again.payload)[1:] == ["stale-cookie", "Say HELLO again."]
    fresh = alice.login("alice")
    assert fresh.type == OK and fresh.token not in (NO_TOKEN, old)
    assert [session.token for session in harness.chat.sessions.values()] == [fresh.token]


def test_a_new_login_from_the_address_of_a_session_in_use_starts_a_fresh_session(harness):
    """Only a client that knows the password gets here (each proof answers one challenge): it
    starts its channels from 1 with the new keys, so the old session must not stand."""
    alice = member(harness, 1, "alice")
    assert alice.ask(PacketType.SAY, "the session is in use")[0] == OK
    peer = Peer(harness, 1)
    assert peer.login("alice").type == OK
    again = harness.members[peer.address]
    assert again.token != alice.token and harness.chat.sessions[peer.address].token == again.token
    assert again.ask(PacketType.JOIN, "lobby", "juara")[0] == OK  # numbered from 1, tagged anew


def test_a_login_replayed_against_a_session_in_use_does_not_silently_cut_it_off(make_harness, monkeypatch):
    monkeypatch.setattr(server, "RETRY_CACHE_SIZE", 1)
    harness = make_harness()
    peer = Peer(harness, 1)
    peer.register("alice")
    peer.login("alice")
    login = peer.last_request
    alice = harness.members[peer.address]
    assert alice.ask(PacketType.JOIN, "lobby", "juara")[0] == OK  # the session is in use
    Peer(harness, 2).register("bob")  # alice's welcome is forgotten
    harness.deliver(login, peer.address)  # a network duplicate, or a replay from her address
    seq = alice.send(PacketType.PING)
    (data,) = alice.channel.poll(harness.now)
    out = harness.deliver(data, peer.address)
    harness.settle()
    told = [packet.type for packet in sent_to(harness, peer, out) if packet.type == PacketType.RESET]
    assert seq in alice.replies or told, "alice's requests are dropped as forged, and nobody tells her"


def test_a_different_request_reusing_a_number_is_not_taken_for_a_retry(harness):
    peer = Peer(harness, 1)
    cookie = peer.cookie()
    assert peer.text(PacketType.REGISTER, *peer.tagged(cookie, "alice", *ACCOUNT), seq=7) == "Registration successful."
    assert peer.text(PacketType.REGISTER, *peer.tagged(cookie, "bob", *ACCOUNT), seq=7) == "Registration successful."
    assert harness.chat.users.exists("alice") and harness.chat.users.exists("bob")


def test_the_retry_cache_is_bounded(make_harness, monkeypatch):
    monkeypatch.setattr(server, "RETRY_CACHE_SIZE", 8)
    harness = make_harness()
    peer = Peer(harness, 1)
    cookie = peer.cookie()
    for number in range(50):
        fields = peer.tagged(cookie, "bad name", *ACCOUNT[:2], str(number))
        assert peer.text(PacketType.REGISTER, *fields).startswith("Usernames")
    assert len(harness.chat.replies) == 8


# --- What a client without a session can make the server send -------------------------------------------------------


def test_a_client_without_a_session_never_gets_more_bytes_than_it_sent(harness):
    address = ("10.0.0.1", 1)
    small_hello = encode_packet(Packet(PacketType.HELLO, 1), CIPHER)
    assert harness.deliver(small_hello, address) == []  # an unpadded HELLO earns nothing
    tries = [encode_packet(Packet(PacketType.REGISTER, 2, payload=b"\x00"), CIPHER),
             b"UC" + bytes(HEADER_SIZE - 2),
             encode_packet(Packet(PacketType.HELLO, 3, payload=bytes(100)), CIPHER),
             encode_packet(Packet(PacketType.SAY, 4, token=b"forged!!"), CIPHER),
             encode_packet(Packet(PacketType.SAY, 4, token=b"forged!!"), CIPHER, key=bytes(32)),
             datagram(99)]
    answered = 0
    for data in tries:
        for _, to, size in harness.deliver(data, address):
            answered += 1
            assert to == address and size <= len(data)
    assert answered  # some were answered (a RESET at least), none with more than it sent


@pytest.mark.parametrize("bad, says", [(datagram(99, bytes(100)), "unknown packet type 99"),
                                       (encode_packet(Packet(PacketType.PING, 1, payload=bytes(100)),
                                                      make_cipher("xor", "other key")), "bad checksum")])
def test_a_bad_datagram_that_looks_like_ours_is_told_what_is_wrong(harness, bad, says):
    assert datagram(PacketType.PING, bytes(100)) == encode_packet(Packet(PacketType.PING, 1, payload=bytes(100)),
                                                                  CIPHER)  # the checksum is a valid one
    (answer, _, size), = harness.deliver(bad, ("10.0.0.1", 1))
    re, code, text = unpack_fields(answer.payload)
    assert (answer.type, re, code) == (ERROR, "0", "bad-packet") and says in text and size <= len(bad)
    assert harness.chat.stats["bad"] == 1 and says in harness.log[-1]


def test_chat_before_login_is_answered_with_reset(harness):
    say = Packet(PacketType.SAY, 5, token=b"tokenXYZ", payload=pack_fields("hi"))
    (answer, to, size), = harness.deliver(encode_packet(say, CIPHER, key=bytes(32)), ("10.0.0.1", 1))
    assert answer.type == PacketType.RESET and size == HEADER_SIZE + 16
    assert (answer.ack, answer.token) == (5, b"tokenXYZ")  # names the request and the token it came with
    # The reset proof: from the server's key y and the token, so no other can make it.
    assert answer.payload == server.reset_proof(harness.chat, b"tokenXYZ") != server.reset_proof(
        harness.chat, b"tokenXYY")
    assert not harness.chat.sessions
    # Untagged, the SAY is smaller than the RESET would be: no answer (no amplification).
    assert harness.deliver(encode_packet(say, CIPHER), ("10.0.0.1", 1)) == []


@pytest.mark.parametrize("ptype", sorted(SERVER_ONLY))
def test_what_only_servers_send_is_never_answered_without_a_session(harness, ptype):
    # Say another server at that address answered something sent in its name: a RESET
    # back would be answered with a RESET, and the two would bounce for ever.
    sent = encode_packet(Packet(ptype, 0, 3, 0, b"tokenXYZ", 0, pack_fields("0", "x", "y")), CIPHER)
    assert harness.deliver(sent, ("10.0.0.9", 9999)) == []
    assert harness.chat.stats["bad"] == 1


@pytest.mark.parametrize("ptype", sorted(SERVER_ONLY))
def test_what_only_servers_send_is_not_answered_even_when_unreadable(harness, ptype):
    # Another server, with another key: our "bad-packet" ERROR would be unreadable to it too.
    theirs = encode_packet(Packet(ptype, payload=pack_fields("0", "bad-packet", "x")), make_cipher("xor", "other"))
    assert harness.deliver(theirs, ("10.0.0.9", 9999)) == []
    assert harness.chat.stats["bad"] == 1


def test_a_stray_ack_without_a_session_is_not_answered(harness):
    assert harness.deliver(encode_packet(Packet(PacketType.ACK, 0, 3, 0, b"tokenXYZ"), CIPHER), ("10.0.0.1", 1)) == []
    assert harness.chat.stats["no-session"] == 1


def test_problem_log_is_throttled(harness, monkeypatch):
    clock = types.SimpleNamespace(now=5.0)  # the log counts problems per second of time.monotonic()
    real = server.time
    monkeypatch.setattr(server, "time", types.SimpleNamespace(monotonic=lambda: clock.now, strftime=real.strftime,
                                                              gmtime=real.gmtime, time=real.time))
    for number in range(500):
        harness.deliver(b"garbage %d" % number, ("10.0.0.1", 1))
    assert len(harness.log) == server.PROBLEMS_PER_SECOND
    clock.now = 6.0  # the next second: one line says how many were not shown, with no new problem needed
    harness.chat.on_timers(harness.now + server.HOUSEKEEPING_EVERY)
    hidden = 500 - server.PROBLEMS_PER_SECOND
    assert harness.log[-1].endswith(f"[WARN] ... and {hidden} more problems in the second before, not shown")
    assert len(harness.log) == server.PROBLEMS_PER_SECOND + 1 and harness.chat.stats["bad"] == 500


def test_throttling_tables_are_bounded(monkeypatch):
    monkeypatch.setattr(auth.FailureCounter, "MAX_KEYS", 100)
    counter = auth.FailureCounter(limit=5, period=60)
    for number in range(10_000):
        counter.add(f"10.0.{number // 256}.{number % 256}", now=1.0)
    assert len(counter.failures) == 100


# --- Tokens and replays ------------------------------------------------------------------------------


def test_forged_token_from_a_members_address_changes_nothing(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    forged = Packet(PacketType.SAY, alice.channel.next_seq, token=b"guessed!", payload=pack_fields("forged"))
    assert harness.deliver(encode_packet(forged, CIPHER), alice.address) == []
    assert alice.ask(PacketType.SAY, "real")[0] == OK  # the number the forgery used is still alice's
    assert bob.texts() == ["real"]


def test_a_request_captured_and_sent_from_another_address_is_dropped_until_the_session_ends(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    alice.send(PacketType.SAY, "captured")
    (captured,) = alice.flush()
    # alice's token, from elsewhere: no RESET, whose proof could end alice's session
    assert harness.deliver(captured, ("10.9.9.9", 4444)) == []
    assert bob.texts() == ["captured"]
    alice.send(PacketType.BYE)
    alice.flush()  # her session is over: now the RESET, with its proof, tells the truth
    out = harness.deliver(captured, ("10.9.9.9", 4444))
    assert [(packet.type, to, packet.payload) for packet, to, _ in out] == [
        (PacketType.RESET, ("10.9.9.9", 4444), server.reset_proof(harness.chat, alice.token))]


def test_a_replayed_request_acts_once_however_late(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    alice.send(PacketType.SAY, "once")
    (first,) = alice.flush()
    again = harness.deliver(first, alice.address)  # at once, as a network duplicates
    assert [packet.type for packet, _, _ in again] == [PacketType.ACK]  # "I have it", no second answer
    alice.ask(PacketType.SAY, "twice")
    harness.deliver(first, alice.address)  # much later
    assert bob.texts() == ["once", "twice"]
    assert [text for _, _, text in harness.chat.rooms["lobby"].history] == ["once", "twice"]


# --- Member requests ---------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_each_reply_naming_its_request(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    seqs = [alice.send(PacketType.SAY, "one"), alice.send(PacketType.WHO), alice.send(PacketType.SAY, "two"),
            alice.send(PacketType.PRIVATE, "nobody", "hi"), alice.send(PacketType.SAY, "three")]
    assert len(alice.flush()) == 5  # all sent at once, none waiting for an answer
    assert [alice.replies[seq] for seq in seqs] == [
        (OK, ["to lobby, 1 other"]), (OK, ["lobby", "alice", "bob"]), (OK, ["to lobby, 1 other"]),
        (ERROR, ["unknown-user", "No such user."]), (OK, ["to lobby, 1 other"])]
    assert [re for kind, re in alice.heard if kind != EVENT][-5:] == seqs
    assert bob.texts() == ["one", "two", "three"]


def test_requests_arriving_out_of_order_are_handled_in_the_order_sent(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    for text in ("first", "second", "third"):
        alice.send(PacketType.SAY, text)
    datagrams = alice.channel.poll(harness.now)
    harness.deliver(datagrams[2], alice.address)
    harness.deliver(datagrams[1], alice.address)
    assert bob.texts() == []  # held until the first arrives
    harness.deliver(datagrams[0], alice.address)
    assert bob.texts() == ["first", "second", "third"]


def test_the_reply_goes_out_before_the_events_the_request_causes(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    alice.send(PacketType.SAY, "hello")
    (data,) = alice.channel.poll(harness.now)
    said = [(packet.type, to) for packet, to, _ in harness.deliver(data, alice.address)]
    assert said == [(OK, alice.address), (EVENT, bob.address)]


def test_join_ok_comes_before_the_history_on_the_joiners_channel(harness):
    alice = member(harness, 1, "alice")
    alice.ask(PacketType.SAY, "for the history")
    carol = Peer(harness, 3)
    carol.register("carol")
    carol.login("carol")
    joiner = harness.members[carol.address]
    seq = joiner.send(PacketType.JOIN, "lobby", "juara")
    joiner.flush()
    assert joiner.heard == [(OK, seq), (EVENT, ["history", STAMP, "lobby", "alice", "for the history"])]
    assert alice.events()[-1] == ["join", STAMP, "lobby", "carol", ""]


def test_message_limits(harness):
    alice = member(harness, 1, "alice")
    assert alice.text(PacketType.SAY, "x" * (MAX_TEXT_BYTES + 1)).startswith("Message too long (1001 bytes")
    assert alice.ask(PacketType.SAY, "   ") == (ERROR, ["empty", "Empty message; nothing sent."])
    assert alice.ask(PacketType.SAY, "é" * (MAX_TEXT_BYTES // 2))[0] == OK


def test_wrong_room_password_and_new_rooms(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    assert alice.text(PacketType.JOIN, "lobby", "juara") == "You are in lobby already."
    assert "(new room)" in alice.text(PacketType.JOIN, "kelas", "rahasia")
    assert bob.ask(PacketType.JOIN, "kelas", "wrong") == (ERROR, ["wrong-room-password", "Wrong room password."])
    assert bob.ask(PacketType.JOIN, "KELAS", "rahasia") == (OK, ["kelas", "2", "joined kelas, 2 here"])


def test_wrong_room_passwords_are_locked_out(harness):
    alice = member(harness, 1, "alice")
    alice.ask(PacketType.JOIN, "kelas", "rahasia")
    bob = member(harness, 2, "bob")
    for _ in range(server.LOGIN_FAILURES - 1):
        assert bob.ask(PacketType.JOIN, "kelas", "guess")[1][0] == "wrong-room-password"
    code, text = bob.ask(PacketType.JOIN, "kelas", "guess")[1]  # the last one allowed says so, at once
    assert code == "locked" and text.startswith("Too many wrong room passwords; try again in ")
    assert bob.ask(PacketType.JOIN, "kelas", "rahasia")[1][0] == "locked"  # even the right one, for now
    bob.ask(PacketType.BYE)
    again = Peer(harness, 2)  # a new login from the same PC starts no new count
    assert again.login("bob").type == OK
    assert harness.members[again.address].ask(PacketType.JOIN, "kelas", "rahasia")[1][0] == "locked"
    carol = member(harness, 3, "carol")  # another account on that PC: not locked by bob's guesses
    assert carol.ask(PacketType.JOIN, "kelas", "rahasia")[0] == OK


def test_rooms_are_bounded(make_harness, monkeypatch):
    monkeypatch.setattr(server, "MAX_ROOMS", 2)
    harness = make_harness()
    alice = member(harness, 1, "alice")
    assert alice.ask(PacketType.JOIN, "second", "pw")[0] == OK
    assert alice.ask(PacketType.JOIN, "third", "pw") == (ERROR, ["full", "Server full: no more rooms can be made."])


def test_a_full_server_keeps_every_room_and_refuses_a_new_one(make_harness, monkeypatch, tmp_path):
    monkeypatch.setattr(server, "MAX_ROOMS", 3)
    harness = make_harness(tmp_path)
    alice = member(harness, 1, "alice", room="old", password="pw")
    alice.ask(PacketType.JOIN, "lobby", "juara")  # "old" empty now: still alice's room, kept
    mallory = member(harness, 2, "mallory", room="filler", password="pw")
    assert mallory.ask(PacketType.JOIN, "more", "pw") == (ERROR, ["full", "Server full: no more rooms can be made."])
    assert sorted(harness.chat.rooms) == ["filler", "lobby", "old"]
    assert mallory.ask(PacketType.JOIN, "old", "mallory's") == (ERROR, ["wrong-room-password", "Wrong room password."])


def test_an_account_makes_at_most_rooms_per_account(make_harness):
    harness = make_harness()
    mallory = member(harness, 2, "mallory")
    for number in range(server.ROOMS_PER_ACCOUNT):
        assert mallory.ask(PacketType.JOIN, f"room{number}", "pw")[0] == OK
    assert mallory.ask(PacketType.JOIN, "onemore", "pw")[1][0] == "too-many-rooms"
    assert member(harness, 3, "carol").ask(PacketType.JOIN, "onemore", "pw")[0] == OK  # others still can


def set_wall_clock(harness, when: float) -> None:
    harness.chat.wall_clock = lambda: when


def test_a_room_made_again_after_it_was_taken_off_file_has_no_past(make_harness, tmp_path):
    harness = make_harness(tmp_path)
    alice = member(harness, 1, "alice", room="secret", password="alice's")
    alice.ask(PacketType.SAY, "the exam answers are 42")
    harness.chat.close()
    server.auth.UserStore(str(tmp_path / server.ROOMS_FILE), kind="rooms").remove("secret")  # the teacher's cleanup
    restarted = make_harness(tmp_path)
    set_wall_clock(restarted, WALL_CLOCK + 60)
    peer = Peer(restarted, 2)
    assert peer.register("mallory") == "Registration successful." and peer.login("mallory").type == OK
    mallory = restarted.members[peer.address]
    assert mallory.ask(PacketType.JOIN, "secret", "mallory's")[0] == OK
    assert mallory.texts("history") == []


def test_rooms_are_kept_apart(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    carol = member(harness, 3, "carol", room="other", password="pw")
    alice.ask(PacketType.SAY, "lobby only")
    assert bob.texts() == ["lobby only"] and carol.events() == []


def test_private_message_reaches_only_its_target(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    carol = member(harness, 3, "carol")
    assert alice.text(PacketType.PRIVATE, "BOB", "psst") == "private to bob"
    assert bob.events()[-1] == ["private", STAMP, "", "alice", "psst"]
    assert carol.texts("private") == []
    assert alice.text(PacketType.PRIVATE, "nobody", "hi") == "No such user."
    bob.ask(PacketType.BYE)
    assert alice.ask(PacketType.PRIVATE, "bob", "hi") == (ERROR, ["not-online", "bob is not online."])


def test_without_a_room_password_nobody_can_be_messaged(harness):
    member(harness, 1, "alice")
    peer = Peer(harness, 2)
    peer.register("eve")
    assert peer.login("eve").type == OK  # an account anyone can make; but no room password
    eve = harness.members[peer.address]
    not_in_room = (ERROR, ["not-in-room", "Join a room first: /join ROOM"])
    assert eve.ask(PacketType.PRIVATE, "alice", "hi") == not_in_room
    assert eve.ask(PacketType.FILE_OFFER, "alice", "a.txt", "0", "0" * 64) == not_in_room


def test_an_upload_the_server_cannot_open_is_refused_and_leaves_no_file_behind(harness, monkeypatch):
    alice, _ = member(harness, 1, "alice"), member(harness, 2, "bob")

    def too_many_open_files(path, mode="r", **options):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(server, "open", too_many_open_files, raising=False)
    answer = alice.ask(PacketType.FILE_OFFER, "bob", "a.txt", "5", "0" * 64)
    assert answer == (ERROR, ["server-error", "The server cannot store files now; try again later."])
    assert os.listdir(os.path.join(harness.config.data_dir, "transfers")) == []  # no N.part left behind
    assert not harness.chat.files.uploads


def test_the_log_follows_a_file_from_offer_to_receiver(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    empty = hashlib.sha256(b"").hexdigest()  # an empty file: complete as soon as it is offered
    assert alice.ask(PacketType.FILE_OFFER, "bob", "a.txt", "0", empty) == (OK, ["1"])
    assert bob.ask(PacketType.FILE_CANCEL, "1", "accept") == (OK, ["accepted"])
    harness.settle()
    files = [line.split(" FILE  ", 1)[1] for line in harness.log if " FILE " in line]
    assert files == ["#1 'a.txt' offered to bob, 0 B", "#1 'a.txt' arrived whole, SHA-256 checked",
                     "#1 'a.txt' accepted by bob", "#1 'a.txt' bob has it all"]


def test_chunks_read_together_cost_the_sender_one_ack(harness):
    # ServerLoop hands the server up to SEND_AFTER datagrams, then flushes once: the chunks
    # among them are answered by one ACK, where a flush after each sends an ACK each.
    alice, _ = member(harness, 1, "alice"), member(harness, 2, "bob")
    data = os.urandom(8 * CHUNK_SIZE)
    offer = ("bob", "a.bin", str(len(data)), hashlib.sha256(data).hexdigest())
    assert alice.ask(PacketType.FILE_OFFER, *offer) == (OK, ["1"])
    stream = Channel(CIPHER, alice.token, flags=FLAG_FILE_STREAM)
    stream.key = alice.channel.key
    for offset in range(0, len(data), CHUNK_SIZE):
        stream.send(PacketType.FILE_CHUNK, pack_chunk(1, offset, data[offset:offset + CHUNK_SIZE]))
    chunks = stream.poll(harness.now)
    assert len(chunks) == 8

    def acks(chunks, flush_each: bool) -> list[Packet]:
        for chunk in chunks:
            harness.chat.handle_datagram(chunk, alice.address, harness.now)
            if flush_each:
                harness.chat.flush(harness.now)
        harness.chat.flush(harness.now)
        return [packet for packet, to, _ in harness.collect() if to == alice.address]

    assert [(ack.type, ack.ack) for ack in acks(chunks[:4], True)] == [(PacketType.ACK, n) for n in range(1, 5)]
    assert [(ack.type, ack.ack) for ack in acks(chunks[4:], False)] == [(PacketType.ACK, 8)]
    assert harness.chat.files.uploads[1].received == len(data)  # every chunk was taken


def test_a_session_replaced_within_a_batch_hears_why_before_its_reset(harness, monkeypatch):
    # bob logs in at a second PC; his first PC's PING comes in the same batch, before flush().
    bob = member(harness, 1, "bob")
    bob.send(PacketType.PING)
    ping = bob.channel.poll(harness.now)
    with monkeypatch.context() as batch:
        batch.setattr(harness.chat, "flush", lambda now: None)
        assert Peer(harness, 2).login("bob").type == OK
    harness.chat.handle_datagram(ping[0], bob.address, harness.now)
    harness.chat.flush(harness.now)
    to_first_pc = [packet for packet, to, _ in harness.collect() if to == bob.address]
    kinds = [unpack_fields(p.payload)[0] if p.type == EVENT else p.type.name for p in to_first_pc]
    assert kinds == ["replaced", "RESET"]


def test_the_loop_sends_after_every_send_after_datagrams_and_when_the_socket_is_empty(harness):
    hello = encode_packet(Packet(PacketType.HELLO, 1, payload=pack_fields(HELLO_PADDING)), CIPHER)
    count, group = 2 * server.SEND_AFTER + 3, server.SEND_AFTER
    sock = WaitingSocket([(hello, ("10.0.0.9", 5000 + n)) for n in range(count)])
    bare_loop(harness.chat, sock).receive_all()
    # Before read n, the answers to every whole group of SEND_AFTER before it are out.
    assert sock.sent_at_read == [n // group * group for n in range(count + 1)]
    assert [to for _, to in sock.sent] == [("10.0.0.9", 5000 + n) for n in range(count)]


def test_the_loop_reads_the_clock_for_each_datagram(harness, monkeypatch):
    # A timer started after a long batch counts from then, not from the batch's first read.
    clock = itertools.count(100.0, 0.25)
    monkeypatch.setattr(server.time, "monotonic", lambda: next(clock))
    seen, handle = [], harness.chat.handle_datagram
    monkeypatch.setattr(harness.chat, "handle_datagram",
                        lambda data, address, now: seen.append(now) or handle(data, address, now))
    hello = encode_packet(Packet(PacketType.HELLO, 1, payload=pack_fields(HELLO_PADDING)), CIPHER)
    bare_loop(harness.chat, WaitingSocket([(hello, ("10.0.0.9", 5000 + n)) for n in range(3)])).receive_all()
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2]


def test_a_file_just_over_the_limit_is_refused_in_bytes(harness):
    alice, _ = member(harness, 1, "alice"), member(harness, 2, "bob")
    limit = int(harness.config.max_file_mb * MB)
    code, text = alice.ask(PacketType.FILE_OFFER, "bob", "big.bin", str(limit + 1), "0" * 64)[1]
    assert code == "too-big"  # "20.0 MB; the limit is 20 MB" would read as no reason at all
    megabytes = harness.config.max_file_mb
    assert text == f"That file is {limit + 1:,} bytes; the limit is {megabytes:g} MB."


def test_a_huge_unknown_name_is_not_echoed(harness):
    alice = member(harness, 1, "alice")
    assert alice.text(PacketType.PRIVATE, "x" * 1100, "hi") == "No such user."


def test_rooms_and_who(harness):
    alice = member(harness, 1, "alice")
    member(harness, 2, "bob")
    assert alice.ask(PacketType.ROOMS) == (OK, ["lobby", "2"])
    assert alice.ask(PacketType.WHO) == (OK, ["lobby", "alice", "bob"])


def test_rooms_lists_an_empty_room_with_its_count_of_zero(harness):
    alice = member(harness, 1, "alice", room="games", password="pw")
    alice.ask(PacketType.JOIN, "lobby", "juara")
    assert alice.ask(PacketType.ROOMS) == (OK, ["lobby", "1", "games", "0"])


def test_bad_payload_in_a_request_is_refused_not_fatal(harness):
    alice = member(harness, 1, "alice")
    answer = alice.ask(PacketType.SAY, raw=b"\x00\x09abc")
    assert answer == (ERROR, ["bad-request", "field of 9 bytes runs past the end of the payload"])
    assert alice.ask(PacketType.SAY, "still fine")[0] == OK


def test_a_numbered_ack_is_refused_as_a_bad_request(harness):
    alice = member(harness, 1, "alice")
    assert alice.ask(PacketType.ACK) == (ERROR, ["bad-request", "An ACK carries no sequence number."])


def test_packets_only_servers_send_are_dropped(harness):
    alice = member(harness, 1, "alice")
    dropped = [alice.send(ptype) for ptype in (OK, ERROR, EVENT, PacketType.RESET)]
    assert alice.ask(PacketType.PING) == (OK, [])  # the channel goes on past them
    assert not set(dropped) & set(alice.replies)
    assert harness.chat.stats["bad"] == 4


def test_a_reply_too_big_for_a_packet_becomes_an_error(harness):
    alice = member(harness, 1, "alice")
    session = harness.chat.sessions[alice.address]
    request = server.Request(Packet(PacketType.WHO, 7, token=alice.token), alice.address, HEADER_SIZE, harness.now,
                             session, proven=True)
    harness.chat.answer(request, ["x" * 2000])  # no handler makes one; but one must never crash the server
    harness.chat.flush(harness.now)
    harness.collect()
    assert alice.replies[7] == (ERROR, ["too-long", "Answer too long."])


def test_every_packet_type_has_one_handler(harness):
    assert set(server.HANDLERS) == set(PacketType)
    assert server.HANDSHAKE_TYPES == {PacketType.HELLO, PacketType.REGISTER, PacketType.LOGIN, PacketType.FIND}


# --- Flood control -----------------------------------------------------------------------------------


def test_flood_control_holds_messages_over_the_burst_and_serves_them_in_order(make_harness, monkeypatch):
    monkeypatch.setattr(server, "MESSAGE_BURST", 3)
    harness = make_harness()
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    seqs = [alice.send(PacketType.SAY, f"line {number}") for number in range(6)]
    alice.flush()
    assert [seq in alice.replies for seq in seqs] == [True] * 3 + [False] * 3  # held, not refused
    assert bob.texts() == ["line 0", "line 1", "line 2"]
    assert bob.ask(PacketType.SAY, "bob is not slowed")[0] == OK
    harness.advance(0.5 / server.MESSAGE_RATE)
    assert len(bob.texts()) == 3  # a token takes 1 / MESSAGE_RATE seconds to come back
    harness.advance(3 / server.MESSAGE_RATE)
    assert bob.texts() == [f"line {number}" for number in range(6)]
    assert [alice.replies[seq] for seq in seqs] == [(OK, ["to lobby, 1 other"])] * 6


def test_past_max_backlog_the_newest_is_refused_with_slow_down(make_harness, monkeypatch):
    monkeypatch.setattr(server, "MESSAGE_BURST", 2)
    monkeypatch.setattr(server, "MAX_BACKLOG", 3)
    harness = make_harness()
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    seqs = [alice.send(PacketType.SAY, f"line {number}") for number in range(2 + 3)]  # the burst, the backlog
    alice.flush()
    assert all(alice.replies.get(seq, (OK,))[0] == OK for seq in seqs)  # answered or held, nothing refused
    newest = alice.send(PacketType.SAY, "one too many")
    alice.flush()
    code, text = alice.replies[newest][1]
    assert code == "slow-down" and text.startswith("Slow down") and text.endswith("not sent.")
    harness.advance(10.0)
    assert bob.texts() == [f"line {number}" for number in range(5)]


def test_a_held_message_is_served_when_the_timers_run_at_their_deadline(make_harness, monkeypatch):
    monkeypatch.setattr(server, "MESSAGE_BURST", 3)
    harness = make_harness()
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    for number in range(6):
        alice.send(PacketType.SAY, f"line {number}")
    alice.flush()
    deadlines = []
    for _ in range(100):  # a loop that sleeps until next_deadline(), then runs the timers
        harness.now = max(harness.now, harness.chat.next_deadline())
        deadlines.append(harness.now)
        harness.chat.on_timers(harness.now)
        harness.collect()
        harness.settle()
        if len(bob.texts()) == 6:
            break
    assert bob.texts() == [f"line {number}" for number in range(6)], (
        f"stuck at {deadlines[-1]!r}: the last deadlines were {deadlines[-3:]}")


# --- Leaving, timing out, falling behind --------------------------------------------------------------


def test_member_leaving_is_announced(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    assert alice.ask(PacketType.BYE) == (OK, ["goodbye"])
    assert bob.events()[-1] == ["leave", STAMP, "lobby", "alice", ""]
    assert "alice" not in harness.chat.online


def test_a_bye_sent_again_after_the_session_ended_gets_reset(harness):
    alice = member(harness, 1, "alice")
    alice.send(PacketType.BYE)
    (bye,) = alice.channel.poll(harness.now)
    harness.deliver(bye, alice.address)  # the goodbye was lost: the client says BYE again
    (answer, _, _), = harness.deliver(bye, alice.address)
    assert answer.type == PacketType.RESET and answer.token == alice.token


def test_silent_member_times_out_and_the_name_is_free(harness):
    member(harness, 1, "alice")
    bob = member(harness, 2, "bob")
    harness.advance(harness.config.session_timeout / 2)
    bob.ask(PacketType.PING)
    harness.advance(harness.config.session_timeout / 2 + 2)
    assert bob.events()[-1] == ["leave", STAMP, "lobby", "alice", "timed out"]
    assert "bob" in harness.chat.online
    assert Peer(harness, 3).login("alice").type == OK


def test_unacknowledged_events_are_resent_then_the_member_is_ended_not_responding(make_harness, monkeypatch):
    channel_defaults(monkeypatch, max_sends=4)
    harness = make_harness()
    bob, alice = member(harness, 2, "bob"), member(harness, 1, "alice")
    bob.deaf = True  # bob's client has gone: nothing he is sent is acknowledged
    alice.ask(PacketType.SAY, "are you there?")
    harness.advance(harness.config.session_timeout - 1)  # it gives up before the session times out
    copies = [packet for packet in sent_to(harness, bob) if packet.payload.startswith(b"\x00\x04chat")]
    assert len(copies) == 4 and [bool(packet.flags & FLAG_RETRANSMIT) for packet in copies] == [False] + [True] * 3
    assert "bob" not in harness.chat.online and "alice" in harness.chat.online
    assert alice.events()[-1] == ["leave", STAMP, "lobby", "bob", "not responding"]
    assert any("bob" in line and "not responding" in line for line in harness.log)


def test_acknowledged_events_are_not_resent(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    alice.ask(PacketType.SAY, "hello")
    assert bob.texts() == ["hello"] and harness.chat.sessions[bob.address].channel.idle()  # acknowledged
    sent = len(sent_to(harness, bob))
    harness.advance(10.0)
    assert len(sent_to(harness, bob)) == sent


def test_a_member_who_falls_too_far_behind_is_dropped_alone(make_harness, monkeypatch):
    channel_defaults(monkeypatch, window=2, max_queue=5)
    monkeypatch.setattr(server, "MESSAGE_BURST", 100)
    harness = make_harness()
    alice, bob, carol = member(harness, 1, "alice"), member(harness, 2, "bob"), member(harness, 3, "carol")
    bob.deaf = True
    for number in range(2 + 5 + 1):  # window, queue, one more
        alice.ask(PacketType.SAY, f"m{number}")
    assert "bob" not in harness.chat.online and {"alice", "carol"} <= set(harness.chat.online)
    assert carol.events()[-1] == ["leave", STAMP, "lobby", "bob", "too slow"]
    assert carol.texts() == [f"m{number}" for number in range(8)]


def test_a_member_whose_replies_cannot_be_queued_is_dropped_not_left_waiting(make_harness, monkeypatch):
    channel_defaults(monkeypatch, window=2, max_queue=5)
    harness = make_harness()
    bob, carol = member(harness, 2, "bob"), member(harness, 3, "carol")
    bob.deaf = True  # hears nothing, so acknowledges none of the replies to what he asks
    for _ in range(2 + 5 + 1):  # window, queue, and one reply more than fits
        bob.send(PacketType.PING)
    bob.flush()
    assert "bob" not in harness.chat.online
    assert carol.events()[-1] == ["leave", STAMP, "lobby", "bob", "too slow"]


def test_many_members_too_slow_at_once_are_all_dropped_calmly(make_harness, monkeypatch):
    channel_defaults(monkeypatch, window=1, max_queue=2)
    monkeypatch.setattr(server, "MESSAGE_BURST", 1000)
    monkeypatch.setattr(server, "REGISTRATIONS_PER_ADDRESS", 1000)
    harness = make_harness()
    members = []
    for number in range(200):  # none ever acknowledges anything
        peer = Peer(harness, 1000 + number)
        peer.register(f"m{number}")
        peer.login(f"m{number}")
        made = harness.members[peer.address]
        made.deaf = True
        made.send(PacketType.JOIN, "lobby", "juara")
        made.flush()  # never raises, however long the chain of "left" messages grows
        members.append(made)
    for number in range(4):
        members[-1].send(PacketType.SAY, f"filling {number}")
        members[-1].flush()
    assert len(harness.chat.online) < 10
    lobby = harness.chat.rooms["lobby"]
    assert all(harness.chat.online.get(name) is session for name, session in lobby.members.items())


# --- History ---------------------------------------------------------------------------------------------


def test_history_is_shown_on_join_and_kept_across_restarts(make_harness, tmp_path):
    first = make_harness(tmp_path)
    alice = member(first, 1, "alice")
    for number in range(25):
        first.advance(1.0)  # at a human pace: no flood control
        alice.ask(PacketType.SAY, f"message {number}")
    first.chat.close()
    second = make_harness(tmp_path)  # the server restarted
    bob = Peer(second, 2)
    assert bob.login("alice").type == OK  # the account survived
    joined = second.members[bob.address]
    joined.ask(PacketType.JOIN, "lobby", "juara")
    assert joined.texts("history") == [f"message {number}" for number in range(25 - server.HISTORY_ON_JOIN, 25)]


def test_rooms_and_their_history_survive_a_restart_and_the_password_stands(make_harness, tmp_path):
    first = make_harness(tmp_path)
    alice = member(first, 1, "alice", room="games", password="dadu")
    alice.ask(PacketType.SAY, "gg")
    first.chat.close()
    stored = (tmp_path / server.ROOMS_FILE).read_text(encoding="utf-8")
    assert "games" in stored and "dadu" not in stored  # salted and hashed, as accounts are
    second = make_harness(tmp_path)  # the server restarted
    bob = member(second, 2, "bob")
    assert bob.ask(PacketType.JOIN, "games", "mine now") == (ERROR, ["wrong-room-password", "Wrong room password."])
    assert bob.ask(PacketType.JOIN, "games", "dadu")[0] == OK
    assert bob.texts("history") == ["gg"]


def test_requests_after_a_join_wait_for_its_password_check(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    alice.ask(PacketType.JOIN, "games", "dadu")
    joined = bob.send(PacketType.JOIN, "games", "dadu")
    said = bob.send(PacketType.SAY, "in games, not in the lobby")
    for data in bob.channel.poll(harness.now):
        harness.deliver(data, bob.address, run_jobs=False)
    assert joined not in bob.replies and said not in bob.replies  # the room's password is being checked
    assert len(harness.chat.password_jobs) == 1
    harness.run_jobs()
    harness.settle()
    assert [bob.replies[joined][0], bob.replies[said][0]] == [OK, OK]
    assert alice.texts() == ["in games, not in the lobby"]


def test_a_password_check_that_breaks_never_leaves_the_member_waiting(harness, monkeypatch):
    alice = member(harness, 1, "alice")
    alice.send(PacketType.JOIN, "games", "dadu")
    for data in alice.channel.poll(harness.now):
        harness.deliver(data, alice.address, run_jobs=False)
    session = harness.chat.sessions[alice.address]
    assert session.checking
    for job in harness.chat.password_jobs:
        job.then = lambda chat, job: 1 / 0  # a bug in what answers it, say
    with pytest.raises(ZeroDivisionError):  # the loop reports it and goes on
        harness.run_jobs()
    assert not session.checking
    assert alice.ask(PacketType.PING)[0] == OK  # its next requests are served


def test_a_client_back_with_a_new_channel_gets_a_new_session_at_the_same_address(harness):
    alice = member(harness, 1, "alice")  # its channel is in use: numbers past 1
    old = harness.chat.sessions[alice.address].token
    peer = Peer(harness, 1)
    peer.seq = 100  # numbers before login go on counting
    answer = peer.login("alice", "pw", "rejoin")
    assert answer.type == OK and answer.token != old  # not the old one, whose numbers it no longer follows


def test_history_file_gains_no_blank_line_at_a_restart_and_a_torn_line_is_ended(tmp_path):
    path = str(tmp_path / "h.txt")
    for _ in range(2):  # two starts of a server on one file
        history = server.HistoryFile(path)
        history.append(1764575165.0, "lobby", "alice", "hi")
        history.close()
    with open(path, "ab") as file:
        file.write(b"2025-12-01 07:46:05 UTC  #lobby  bob: cut sh")  # killed mid-write
    server.HistoryFile(path).close()
    lines = open(path, encoding="utf-8").read().split("\n")
    assert len(lines) == 4 and lines[-1] == "" and all(lines[:3])


def test_history_is_one_readable_line_a_message_and_reads_back_exactly(tmp_path):
    path = str(tmp_path / "history.txt")
    history = server.HistoryFile(path)
    tricky = "two lines\nand a \\n that is not one, \\ alone, a tab\there, \r, 👩‍💻"
    history.append(1764575165.0, "lobby", "alice", tricky)
    history.close()
    (line,) = open(path, encoding="utf-8").read().splitlines()
    assert line.startswith("2025-12-01 07:46:05 UTC  #lobby  alice: two lines\\nand a \\\\n")
    assert list(server.HistoryFile.read(path)) == [(1764575165.0, "lobby", "alice", tricky)]


def test_a_stopping_server_tells_every_member_and_handles_nothing_more(harness):
    alice, bob = member(harness, 1, "alice"), member(harness, 2, "bob")
    harness.chat.announce_stop(harness.now)
    harness.collect()
    assert not harness.chat.stop_heard()  # sent, not yet acknowledged
    harness.settle()
    assert harness.chat.stop_heard()
    assert alice.events()[-1][0] == "stop" and bob.events()[-1][0] == "stop"
    late = alice.send(PacketType.SAY, "too late")
    alice.flush()
    assert late not in alice.replies and bob.texts() == []  # never handled: sent again after the restart
    assert Peer(harness, 3).send(PacketType.HELLO) == []  # no new sessions either


def test_a_join_whose_password_check_outlasts_the_stop_is_never_handled(harness):
    alice = member(harness, 1, "alice")
    join = alice.send(PacketType.JOIN, "games", "dadu")  # a new room: its password is hashed first
    for data in alice.channel.poll(harness.now):
        harness.deliver(data, alice.address, run_jobs=False)
    assert harness.chat.password_jobs  # the check is still running...
    harness.chat.announce_stop(harness.now)  # ...when the server is stopped
    harness.run_jobs()
    harness.settle()
    assert join not in alice.replies and alice.events()[-1][0] == "stop"
    assert "games" not in harness.chat.rooms and harness.chat.stop_heard()


def test_no_password_in_history_or_log(harness, tmp_path):
    alice = Peer(harness, 1)
    alice.register("alice", "hunter2-secret")
    alice.login("alice", "hunter2-secret")
    joined = harness.members[alice.address]
    joined.ask(PacketType.JOIN, "lobby", "juara")
    joined.ask(PacketType.SAY, "hello")
    written = "\n".join(harness.log) + (tmp_path / "data" / "chat_history.txt").read_text(encoding="utf-8")
    written += (tmp_path / "data" / "users.json").read_text(encoding="utf-8")
    assert "hello" in written
    assert "hunter2" not in written and "juara" not in written


# --- The log -----------------------------------------------------------------------------------------


def test_actions_are_logged_one_line_each_with_address_user_type_size(harness):
    member(harness, 1, "alice")
    join = [line for line in harness.log if " JOIN " in line]
    assert len(join) == 1 and "10.0.0.1:1" in join[0] and "alice" in join[0] and " B " in join[0]


@pytest.mark.parametrize("verbose", [False, True])
def test_heartbeats_cookies_questions_and_repeats_are_logged_only_when_verbose(make_harness, verbose):
    harness = make_harness(verbose=verbose)
    alice = member(harness, 1, "alice")
    alice.ask(PacketType.PING)
    alice.ask(PacketType.ROOMS)
    alice.ask(PacketType.WHO)
    peer = Peer(harness, 2)
    peer.register("bob")
    harness.deliver(peer.last_request, peer.address)  # its answer was lost: the client asks again
    logged = [line for line in harness.log if "[trace]" not in line]
    plumbing = [line for line in logged if any(f" {kind} " in line for kind in ("PING", "HELLO", "ROOMS", "WHO"))
                or "answered again" in line]
    assert len(plumbing) == (7 if verbose else 0)  # PING, ROOMS, WHO; 3 HELLOs (alice twice, bob); a repeat
    assert any("REGISTER" in line and "ok: Registration successful." in line for line in logged)


def test_quiet_logs_only_problems(make_harness):
    harness = make_harness(quiet=True)
    member(harness, 1, "alice")
    harness.deliver(b"junk", ("10.0.0.1", 9))
    assert len(harness.log) == 1 and "[WARN]" in harness.log[0]


def test_stats_count_what_happened(harness):
    harness.deliver(b"junk", ("10.0.0.1", 9))
    assert dict(harness.chat.stats) == {"datagrams": 1, "bad": 1}
