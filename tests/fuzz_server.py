"""Fuzz the live chat server with 100,000+ random and mutated datagrams; is it still serving?

    python tests/fuzz_server.py                          # 100,000 datagrams, seed 1
    python tests/fuzz_server.py --count 300000 --seed 7  # more, and different ones

1. Starts server.py as a child process on a real UDP socket (default settings, except
   quiet and kdf_iterations 1,000 so that the fuzzer's REGISTERs and LOGINs cost little),
   and logs two ChatClients, alice and bob, into the lobby. alice's socket is recorded:
   every datagram she sends (HELLO, LOGIN, JOIN, SAY, ACK, PING) or receives can be replayed.
2. Sends the datagrams (kinds in KINDS below) from several sockets: strangers that never
   log in; members logged in by a bare-socket client, whose fuzzed requests mostly go on
   the session's own Channel (the real token and the next number) and so reach every
   request handler; and alice's own socket, for exact replays from the same address.
   Strangers and members send from 127.0.0.2 and up where the system allows (Linux), so
   their registrations do not use up the per-address limits of 127.0.0.1, where the final
   check's clients live (elsewhere REGISTRATIONS_PER_ADDRESS is raised
   instead). Every 200 datagrams a HELLO round trip checks that the server still answers,
   which also keeps the fuzzer from overrunning the server's socket buffer.
3. Afterwards: is the process alive, with no Traceback in its stderr? Did bob get alice's
   message from before the fuzz exactly once? Is alice still heard? Can new users carol
   and dave register, log in, join the lobby and hear each other? Server memory (VmRSS,
   VmHWM) before and after.
4. The server's memory with 1,000 idle logged-in sessions (a second server, with
   MAX_SESSIONS 1,100, REGISTRATIONS_PER_ADDRESS 5,000 and session_timeout
   600 s), and what the default limit of 500 sessions says to the 501st (a third server).

A crash - the process died or wrote a Traceback - is counted and its traceback shown; the
datagrams since the last answered HELLO are replayed one by one into an in-process
ChatServer to name the culprit; then a new server is started and fuzzing goes on, up to
--max-crashes. Exit status 1 if anything crashed or a final check failed.
"""

import argparse
import binascii
import collections
import os
import random
import secrets
import socket
import string
import sys
import tempfile
import time
import traceback

# bench.py, beside this file, starts servers and reads their memory for both scripts.
from bench import ROOT, kernel_drops, machine, megabytes, start_server

sys.path.insert(0, ROOT)

import auth  # noqa: E402  (after the path is set: the chat's modules live one folder up)
import client  # noqa: E402
import encryption_helper as wire  # noqa: E402
import server  # noqa: E402
from encryption_helper import (  # noqa: E402
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    MIN_HELLO_SIZE,
    NO_TOKEN,
    VERSION,
    Channel,
    Packet,
    PacketError,
    PacketType,
    decode_packet,
    encode_packet,
    make_cipher,
    pack_fields,
    unpack_fields,
)

CIPHER = make_cipher(server.ServerConfig.cipher)  # the default cipher and key, as the server's
FAST_HASH = 1_000  # PBKDF2 iterations: the fuzzer's REGISTERs and LOGINs cost little
PASSWORD = "fuzz-password"
LOBBY_PASSWORD = server.ServerConfig.room_password
OK, ERROR, RESET = PacketType.OK, PacketType.ERROR, PacketType.RESET
SYNC_EVERY = 200  # datagrams between HELLO round trips that check the server answers
MEMBERS = 3
STRANGERS = 4
HELLO_PADDING = "." * (MIN_HELLO_SIZE - HEADER_SIZE - 2)


def fuzz_settings(data_dir: str, **changes) -> dict:
    settings = dict(host="127.0.0.1", port=0, data_dir=data_dir, quiet=True, kdf_iterations=FAST_HASH)
    settings.update(changes)
    server.ServerConfig(**settings)  # a misspelt setting fails here, not in the child
    return settings


# --- A bare-socket client --------------------------------------------------------------


def fuzz_ip(index: int) -> str:
    """127.0.0.<2 + index> where binding to it works (Linux), else 127.0.0.1."""
    address = f"127.0.0.{2 + index}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
            return address
        except OSError:
            return "127.0.0.1"


def open_socket(server_address, ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.connect(server_address)
    return sock


class BareClient:
    """The protocol over a bare socket: before login one request at a time, sent until
    answered; after it, the session's Channel, which also acknowledges the EVENTs."""

    def __init__(self, server_address, ip: str = "127.0.0.1"):
        self.sock = open_socket(server_address, ip)
        self.address = self.sock.getsockname()
        self.seq = 0  # requests before login are numbered 1, 2, 3...
        self.token = NO_TOKEN
        self.name = ""
        self.channel: Channel | None = None  # the session's, once logged in

    def ask(self, ptype: PacketType, *fields: str, tries: int = 8) -> Packet:
        """A request before login: send it until its answer (OK or ERROR naming it) comes."""
        self.seq += 1
        data = encode_packet(Packet(ptype, self.seq, payload=pack_fields(*fields)), CIPHER)
        for attempt in range(tries):
            self.sock.send(data)
            deadline = time.monotonic() + 0.2 * 2 ** min(attempt, 3)
            while (reply := self.receive(deadline)) is not None:
                if reply.seq == 0 and reply.ack == self.seq and reply.type in (OK, ERROR):
                    return reply
        raise TimeoutError(f"no answer to {ptype.name} after {tries} tries")

    def receive(self, deadline: float | None) -> Packet | None:
        """Return the next datagram from the server, decoded; None once `deadline` passes, or
        at once when nothing is waiting and deadline is None. The session's channel reads
        it first, and sends what it has to (acknowledgements, retransmissions)."""
        while True:
            if deadline is None:
                self.sock.setblocking(False)
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return None
                self.sock.settimeout(wait)
            try:
                packet = decode_packet(self.sock.recv(65535), CIPHER)
            except (BlockingIOError, TimeoutError):
                return None
            except PacketError:
                continue
            if packet.type == RESET and packet.token == self.token != NO_TOKEN:
                self.end_session()  # the server has forgotten this session
            elif self.channel is not None and packet.token == self.token:
                self.channel.receive(packet, time.monotonic())
                self.send_due()
            return packet

    def send_due(self) -> None:
        """Send what the session's channel has for the wire now."""
        if self.channel is None:
            return
        for data in self.channel.poll(time.monotonic()):
            self.sock.send(data)
        if self.channel.failed:  # 20 sends unacknowledged: as good as gone
            self.end_session()

    def end_session(self) -> None:
        self.token, self.channel = NO_TOKEN, None

    def drain(self) -> None:
        """Read whatever has arrived, and send what the channel owes (its ACKs, mostly)."""
        try:
            while self.receive(None) is not None:
                pass
            self.send_due()
        except OSError:  # "connection refused": the server is gone, which the caller finds out
            pass

    def hello(self, tries: int = 8) -> str:
        return unpack_fields(self.ask(PacketType.HELLO, HELLO_PADDING, tries=tries).payload)[1]

    def register(self, name: str, password: str = PASSWORD) -> list[str]:
        """REGISTER as client.py does: the verifier made here, with the iterations HELLO names."""
        cookie, iterations, key = unpack_fields(self.ask(PacketType.HELLO, HELLO_PADDING).payload)[1:4]
        record = auth.new_verifier(name, password, (wire.SRP_N, wire.SRP_G), int(iterations))
        fields = client.registration([cookie, name, record["salt"], iterations, record["verifier"]], int(key, 16))[0]
        reply = self.ask(PacketType.REGISTER, *fields)
        return [reply.type.name] + unpack_fields(reply.payload)[1:]

    def login(self, name: str, password: str = PASSWORD) -> list[str]:
        """Both steps of SRP-6a's LOGIN, as client.py takes them."""
        cookie, secret = self.hello(), secrets.randbits(256)
        reply = self.ask(PacketType.LOGIN, cookie, name, client.public_key(secret))
        if reply.type == OK:
            challenge = unpack_fields(reply.payload)[1:]
            x = auth.password_key(name, password, bytes.fromhex(challenge[0]), int(challenge[1]))
            proof, _, K = client.login_proofs(name, x, secret, challenge)
            reply = self.ask(PacketType.LOGIN, cookie, name, client.public_key(secret), proof)
        if reply.type == OK:
            self.token, self.name, self.channel = reply.token, name, Channel(CIPHER, reply.token)
            self.channel.key = wire.session_keys(K).to_server  # every packet of the session tagged
        return [reply.type.name] + unpack_fields(reply.payload)[1:]

    def close(self) -> None:
        self.sock.close()


# --- What the fuzzing aims at ----------------------------------------------------------


class Recorder:
    """Stands in for a ChatClient's socket and keeps a copy of the datagrams it carries."""

    def __init__(self, sock, keep: int = 200):
        self.sock = sock
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.keep = keep

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def send(self, data: bytes) -> int:
        if len(self.sent) < self.keep:
            self.sent.append(data)
        return self.sock.send(data)

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        if len(self.received) < self.keep:
            self.received.append(data)
        return data


class Endpoint:
    """A socket the fuzzer sends from, and its address (asked once, not per datagram).
    A BareClient, with its .sock and .address, serves as one too."""

    def __init__(self, sock):
        self.sock = sock
        self.address = sock.getsockname()


class Arena:
    """One server and everything aimed at it: alice and bob, members, strangers, a probe."""

    def __init__(self, workdir: str, number: int):
        self.ips = [fuzz_ip(index) for index in range(MEMBERS + STRANGERS)]
        # Where the fuzzers must share 127.0.0.1 with the final check, their REGISTERs
        # would use up its per-address limit: then lift it.
        shared = {"REGISTRATIONS_PER_ADDRESS": 100_000} if "127.0.0.1" in self.ips else {}
        self.data_dir = os.path.join(workdir, f"data{number}")
        self.process = start_server(workdir, fuzz_settings(self.data_dir), name=f"server{number}", constants=shared)
        self.bob_events: list[client.Event] = []
        self.alice = self.chat_client("alice", on_event=None)
        self.alice.sock = self.recorder = Recorder(self.alice.sock)
        self.bob = self.chat_client("bob", on_event=self.bob_events.append)
        self.marker = "a message from before the fuzz"
        self.alice.say(self.marker)
        self.alice.call(PacketType.PING)
        self.members = [BareClient(self.process.address, ip) for ip in self.ips[:MEMBERS]]
        for index, member in enumerate(self.members):
            member.register(f"member{index}")
            member.login(f"member{index}")
        self.strangers = [BareClient(self.process.address, ip) for ip in self.ips[MEMBERS:]]
        self.cookies: dict = {}  # a stranger's address -> the cookie the server gave it
        self.cookies_at = 0.0
        self.probe = BareClient(self.process.address)
        self.alice_endpoint = Endpoint(self.recorder.sock)
        self.wait_for_marker()

    def chat_client(self, name: str, on_event) -> client.ChatClient:
        made = client.ChatClient(*self.process.address, on_event=on_event)
        made.register(name, PASSWORD)
        made.login(name, PASSWORD)
        made.join(server.LOBBY, LOBBY_PASSWORD)
        return made

    def wait_for_marker(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.count_heard("alice", self.marker) and time.monotonic() < deadline:
            time.sleep(0.01)

    def count_heard(self, user: str, text: str) -> int:
        return sum(1 for event in list(self.bob_events) if event.kind == "chat" and event.user == user
                   and event.text == text)

    def logged_in_members(self) -> list[BareClient]:
        return [member for member in self.members if member.token != NO_TOKEN]

    def sync(self) -> bool:
        """A HELLO round trip; then tidy up: drain sockets, refresh cookies, log members in again."""
        try:
            self.probe.hello(tries=5)  # waits 0.2 + 0.4 + 0.8 + 1.6 + 1.6 s at most
        except (TimeoutError, OSError):
            return False
        for stranger in self.strangers:
            stranger.drain()
        for index, member in enumerate(self.members):
            member.drain()
            if member.token == NO_TOKEN:
                try:
                    member.login(f"member{index}")  # may be refused for a while: locked, say
                except (TimeoutError, OSError):
                    pass
        if time.monotonic() - self.cookies_at > 20:  # a cookie lives 30 to 60 s
            self.refresh_cookies()
        return True

    def refresh_cookies(self) -> None:
        for stranger in self.strangers:
            try:
                self.cookies[stranger.address] = stranger.hello()
            except (TimeoutError, OSError):
                pass
        self.cookies_at = time.monotonic()

    def close(self) -> None:
        for made in (self.alice, self.bob):
            made.close()
        for bare in self.members + self.strangers + [self.probe]:
            bare.close()
        self.process.stop()


# --- Making datagrams ------------------------------------------------------------------


def build(ptype: int, seq: int = 0, ack: int = 0, sack: int = 0, token: bytes = NO_TOKEN, flags: int = 0,
          payload: bytes = b"", *, magic: bytes = MAGIC, version: int = VERSION, length: int | None = None,
          crc_error: int = 0) -> bytes:
    """A datagram as encode_packet makes it, but of any type number and size, and with any
    header field wrong on request (the checksum still matches unless crc_error is set)."""
    header = HEADER.pack(magic, version, ptype, flags, len(payload) if length is None else length,
                         seq, ack, sack, token, 0)
    crc = (binascii.crc32(header, binascii.crc32(payload)) ^ crc_error) & 0xFFFFFFFF
    return header[:-4] + crc.to_bytes(4, "big") + CIPHER.encrypt(payload)


ALPHABETS = (
    string.ascii_letters + string.digits + "_.-",
    string.printable,
    "äöüßéñçø日本語中文한국어🙂👍\u200f\u202e\ufeff",
    "\x00\x01\x1b\x7f\n\r\t ",
)
SPECIAL_TEXTS = ("", " ", "lobby", "LOBBY", "juara", "alice", "bob", "member0", "a" * 21, "x" * 1001, "+1", "..")


class Fuzzer:
    """Makes the next datagram to send, and from which socket; counts each kind."""

    def __init__(self, rng: random.Random, arena: Arena):
        self.rng = rng
        self.arena = arena
        self.counts: collections.Counter = collections.Counter()
        self.valid: collections.deque = collections.deque(maxlen=256)  # recent valid datagrams, to mutate
        self.kinds = [(kind, weight, getattr(self, method)) for kind, (weight, method) in KINDS.items()]
        self.weights = [weight for _, weight, _ in self.kinds]

    def next(self) -> tuple[str, Endpoint, list[bytes]]:
        """Return the kind, the socket to send from, and the datagrams (one, but for a
        member's channel, which may also resend or acknowledge)."""
        kind, _, make = self.rng.choices(self.kinds, self.weights)[0]
        endpoint, data = make()
        datagrams = data if isinstance(data, list) else [data]
        self.counts[kind] += len(datagrams)
        return kind, endpoint, datagrams

    # --- Random material ---

    def text(self) -> str:
        rng = self.rng
        if rng.random() < 0.2:
            return rng.choice(SPECIAL_TEXTS)
        length = rng.choice((rng.randint(0, 8), rng.randint(0, 40), rng.randint(0, 600)))
        return "".join(rng.choices(rng.choice(ALPHABETS), k=length))

    def fields(self, count: int | None = None) -> list[str]:
        return [self.text() for _ in range(self.rng.randint(0, 5) if count is None else count)]

    def payload(self, fields: list[str]) -> bytes:
        return pack_fields(*fields)[:MAX_PAYLOAD]

    def token(self) -> bytes:
        return self.rng.randbytes(8) if self.rng.random() < 0.7 else NO_TOKEN

    def stranger(self) -> BareClient:
        return self.rng.choice(self.arena.strangers)

    def sender(self) -> BareClient:
        """A stranger, or a member's socket (whose session such junk must not upset)."""
        members = self.arena.logged_in_members()
        if members and self.rng.random() < 0.3:
            return self.rng.choice(members)
        return self.stranger()

    def a_valid_datagram(self) -> bytes:
        pool = self.arena.recorder.sent + self.arena.recorder.received
        if self.valid and self.rng.random() < 0.7:
            return self.rng.choice(self.valid)
        return self.rng.choice(pool)

    def remember(self, data: bytes) -> bytes:
        if len(data) <= MAX_DATAGRAM:
            self.valid.append(data)
        return data

    # --- The kinds ---

    def random_bytes(self):
        return self.sender(), self.rng.randbytes(self.rng.randint(0, 2000))

    def magic_then_random(self):
        return self.sender(), MAGIC + bytes([VERSION]) + self.rng.randbytes(self.rng.randint(0, 1197))

    def any_type_random_fields(self):
        rng = self.rng
        ptype = rng.choice(list(PacketType)) if rng.random() < 0.9 else rng.randrange(256)
        fields = self.fields()
        if ptype == PacketType.HELLO and rng.random() < 0.5:
            fields.append(HELLO_PADDING)
        data = build(ptype, rng.randrange(1 << 32), rng.randrange(1 << 32), rng.randrange(1 << 32), self.token(),
                     rng.randrange(1 << 16), self.payload(fields))
        return self.sender(), self.remember(data)

    def member_request(self):
        """A request with a member's real token: mostly on its own channel (the next number,
        the acknowledgements it owes), else with made-up numbers, or another type."""
        members = self.arena.logged_in_members()
        if not members:
            return self.any_type_random_fields()
        rng = self.rng
        member = rng.choice(members)
        ptype = rng.choices(MEMBER_TYPES, MEMBER_WEIGHTS)[0]
        payload = self.payload(self.request_fields(ptype)) if ptype != PacketType.ACK else b""
        if ptype in CHANNEL_TYPES and rng.random() < 0.7:
            member.drain()  # what the server sent meanwhile: its channel acknowledges it
            if member.channel is not None and member.channel.send(ptype, payload):
                datagrams = member.channel.poll(time.monotonic())
                if datagrams:
                    return member, [self.remember(data) for data in datagrams]
        channel = member.channel
        expected = channel.expected if channel else 0
        next_seq = channel.next_seq if channel else 0
        if ptype == PacketType.ACK:
            seq = 0 if rng.random() < 0.9 else rng.randrange(1 << 32)
            payload = b"" if rng.random() < 0.9 else rng.randbytes(rng.randint(1, 8))
        else:
            seq = rng.choice((next_seq, max(next_seq - 1, 0), next_seq + rng.randrange(1, 40), rng.randrange(1 << 32)))
        ack = rng.choice((max(expected - 1, 0), rng.randrange(1 << 32)))
        token = member.token if rng.random() < 0.9 else self.token()
        return member, self.remember(build(ptype, seq, ack, rng.randrange(1 << 32), token, 0, payload))

    def request_fields(self, ptype: PacketType) -> list[str]:
        """Fields that are often what the request needs, and often not."""
        rng = self.rng
        if rng.random() < 0.3:
            return self.fields()
        if ptype == PacketType.JOIN:
            room = rng.choice(("lobby", f"room{rng.randrange(60)}", self.text()))
            return [room, rng.choice((LOBBY_PASSWORD, "pw", self.text()))]
        if ptype == PacketType.SAY:
            return [self.text()]
        if ptype == PacketType.PRIVATE:
            return [rng.choice(("alice", "bob", "member0", "member1", "nobody", self.text())), self.text()]
        return []

    def credentials(self):
        """REGISTER or LOGIN with the stranger's own cookie, or a bad one."""
        rng = self.rng
        endpoint = self.stranger()
        cookie = self.arena.cookies.get(endpoint.address, "")
        if rng.random() < 0.4:
            cookie = rng.choice((self.text(), cookie[::-1], cookie.upper(), cookie + "é", ""))
        name = rng.choice(("alice", "bob", "nobody", f"user{rng.randrange(100)}", self.text()))
        fields = [cookie, name, self.text()]
        if rng.random() < 0.2:
            fields = fields[: rng.randrange(3)] + self.fields(rng.randint(0, 2))
        ptype = rng.choice((PacketType.REGISTER, PacketType.LOGIN))
        data = build(ptype, rng.randrange(1 << 32), 0, 0, self.token(), 0, self.payload(fields))
        return endpoint, self.remember(data)

    def mutated_payload(self):
        """A packet whose plain payload has bytes changed, then encoded with a matching
        checksum: it passes the header checks and reaches the field parser."""
        rng = self.rng
        packet = self.decoded(self.a_valid_datagram())
        if packet is None:
            return self.any_type_random_fields()
        payload = bytearray(packet.payload or b"\x00\x00")
        for _ in range(rng.randint(1, 4)):
            payload[rng.randrange(len(payload))] = rng.randrange(256)
        return self.sender(), build(packet.type, packet.seq, packet.ack, packet.sack, packet.token, packet.flags,
                                    bytes(payload))

    def bit_flips(self):
        data = bytearray(self.a_valid_datagram())
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return self.sender(), bytes(data)

    def truncated_or_extended(self):
        data = self.a_valid_datagram()
        if self.rng.random() < 0.5:
            return self.sender(), data[: self.rng.randrange(len(data) + 1)]
        return self.sender(), data + self.rng.randbytes(self.rng.randint(1, 300))

    def bad_header(self):
        rng = self.rng
        packet = self.decoded(self.a_valid_datagram()) or Packet(PacketType.PING)
        which = rng.choice(("magic", "version", "length", "checksum", "type"))
        changes = {
            "magic": dict(magic=rng.randbytes(2)),
            "version": dict(version=rng.choice((0, VERSION - 1, VERSION + 1, 255, rng.randrange(256)))),
            "length": dict(length=rng.randrange(1 << 16)),
            "checksum": dict(crc_error=rng.randrange(1, 1 << 32)),
            "type": {},
        }[which]
        ptype = rng.choice((0, 12, 19, 24, 255, rng.randrange(24, 256))) if which == "type" else packet.type
        return self.sender(), build(ptype, packet.seq, packet.ack, packet.sack, packet.token, packet.flags,
                                    packet.payload, **changes)

    def too_long(self):
        rng = self.rng
        payload = pack_fields(*(self.text() for _ in range(3))) + rng.randbytes(rng.randint(MAX_PAYLOAD, 1800))
        return self.sender(), build(rng.choice(list(PacketType)), rng.randrange(1 << 32), 0, 0, NO_TOKEN, 0, payload)

    def replay_elsewhere(self):
        return self.sender(), self.rng.choice(self.arena.recorder.sent + self.arena.recorder.received)

    def replay_same_address(self):
        """alice's own datagrams again, exactly, from her own socket: as a network may
        duplicate or delay them. (Anything else from there would be alice misbehaving.)"""
        return self.arena.alice_endpoint, self.rng.choice(self.arena.recorder.sent)

    def captured_with_random_numbers(self):
        rng = self.rng
        packet = self.decoded(rng.choice(self.arena.recorder.sent))
        seq, ack, sack, token = packet.seq, packet.ack, packet.sack, packet.token
        for field in rng.sample(("seq", "ack", "sack", "token"), rng.randint(1, 4)):
            if field == "seq":
                seq = rng.choice((rng.randrange(1 << 32), seq + 1, seq - 1, 0, (1 << 32) - 1)) % (1 << 32)
            elif field == "ack":
                ack = rng.randrange(1 << 32)
            elif field == "sack":
                sack = rng.randrange(1 << 32)
            else:
                token = self.token()
        return self.sender(), build(packet.type, seq, ack, sack, token, packet.flags, packet.payload)

    @staticmethod
    def decoded(data: bytes) -> Packet | None:
        try:
            return decode_packet(data, CIPHER)
        except PacketError:
            return None


KINDS = {  # kind: (weight, Fuzzer method)
    "random bytes, 0-2000 long": (10, "random_bytes"),
    "valid magic and version, then random bytes": (5, "magic_then_random"),
    "valid packet of any type, random fields and numbers": (15, "any_type_random_fields"),
    "request with a member's real token (mostly on its channel)": (15, "member_request"),
    "REGISTER/LOGIN with a real or damaged cookie": (8, "credentials"),
    "payload bytes changed, checksum recomputed": (10, "mutated_payload"),
    "bit flips in a valid datagram": (8, "bit_flips"),
    "valid datagram truncated or extended": (6, "truncated_or_extended"),
    "wrong magic, version, length, checksum or type": (8, "bad_header"),
    "too long (a payload over 1168 bytes)": (2, "too_long"),
    "replay of alice's datagrams from another address": (5, "replay_elsewhere"),
    "replay of alice's datagrams from her own address": (3, "replay_same_address"),
    "alice's datagrams with random seq/ack/token": (5, "captured_with_random_numbers"),
}
MEMBER_TYPES = (PacketType.JOIN, PacketType.SAY, PacketType.PRIVATE, PacketType.ROOMS, PacketType.WHO,
                PacketType.PING, PacketType.BYE, PacketType.ACK, PacketType.OK, PacketType.EVENT)
MEMBER_WEIGHTS = (20, 25, 15, 5, 5, 5, 1, 20, 2, 2)
CHANNEL_TYPES = frozenset(MEMBER_TYPES[:7])  # the requests a member's channel carries


# --- Crashes ---------------------------------------------------------------------------


def find_culprit(batch, data_dir: str) -> str:
    """Replay datagrams into an in-process ChatServer, one by one; describe the first that
    raises. (The live server's state - cookies, sessions - is not there, so this can miss.)"""
    config = server.ServerConfig(**fuzz_settings(data_dir))
    chat = server.ChatServer(config, log=lambda line: None)
    try:
        for kind, address, data in batch:
            try:
                chat.handle_datagram(data, address, time.monotonic())
                chat.flush(time.monotonic())
                for job in chat.password_jobs:
                    chat.finish_password_job(job.run(), time.monotonic())
                chat.password_jobs.clear()
                chat.outbox.clear()
            except Exception:
                lines = traceback.format_exc().strip().splitlines()
                return (f"culprit: {kind}, {len(data)} B from {address[0]}:{address[1]}: {data[:96].hex()}"
                        f"{'...' if len(data) > 96 else ''}\n    raises: {lines[-1]} at {lines[-3].strip()}")
    finally:
        chat.close()
    return "culprit not found by replaying the batch alone (it may need the live server's state)"


class Crashes:
    """Server deaths and Tracebacks: counted, grouped by their last line, shown once each."""

    def __init__(self):
        self.count = 0
        self.hangs = 0
        self.kinds: collections.Counter = collections.Counter()

    def check(self, arena: Arena, answered: bool, batch, workdir: str) -> bool:
        """Return True if the server is fine; else report what happened."""
        if answered and arena.process.alive() and "Traceback" not in arena.process.stderr():
            return True
        arena.process.wait(timeout=5)  # a dying process may still be writing its traceback
        errors = arena.process.stderr()
        if arena.process.alive() and "Traceback" not in errors:
            self.hangs += 1
            print(f"  [HANG] the server is alive but answered no HELLO in 4.6 s (hang #{self.hangs})")
            return False
        self.count += 1
        last = errors.strip().splitlines()[-1] if errors.strip() else f"exit status {arena.process.process.poll()}"
        self.kinds[last] += 1
        if self.kinds[last] == 1:
            print(f"  [CRASH] #{self.count}: the server crashed. Its stderr:\n" + indent(errors.strip()[-3000:]))
            print("  " + find_culprit(batch, os.path.join(workdir, f"replay{self.count}")))
        else:
            print(f"  [CRASH] #{self.count}: again {last}")
        return False


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# --- The run ---------------------------------------------------------------------------


def fuzz(count: int, seed: int, max_crashes: int, workdir: str) -> dict:
    """Send `count` datagrams at a live server (started again after a crash); return the figures."""
    rng = random.Random(seed)
    arena_number = 1
    arena = Arena(workdir, arena_number)
    drops_before = kernel_drops([arena.process.port]) or 0
    memory_before = arena.process.memory()
    fuzzer = Fuzzer(rng, arena)
    crashes = Crashes()
    batch: list = []
    sent = send_errors = dropped = 0
    started = time.monotonic()
    while sent < count:
        kind, endpoint, datagrams = fuzzer.next()
        for data in datagrams:
            try:
                endpoint.sock.send(data)
            except OSError:
                send_errors += 1  # e.g. "connection refused": nobody listens any more
            batch.append((kind, endpoint.address, data))
            sent += 1
        if len(batch) >= SYNC_EVERY or sent >= count:
            answered = arena.process.alive() and arena.sync()
            if not crashes.check(arena, answered, batch, workdir):
                dropped += max((kernel_drops([arena.process.port]) or 0) - drops_before, 0)
                arena.close()
                if crashes.count >= max_crashes:
                    print(f"  stopping: {max_crashes} crashes")
                    arena = None
                    break
                arena_number += 1
                arena = fuzzer.arena = Arena(workdir, arena_number)
                drops_before = kernel_drops([arena.process.port]) or 0
            batch = []
            if sent % 20_000 < SYNC_EVERY:
                print(f"  {sent:,} datagrams sent, {time.monotonic() - started:.1f} s, server VmRSS "
                      f"{megabytes(arena.process.memory(), 'VmRSS')} MB", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    if arena is not None:
        dropped += (kernel_drops([arena.process.port]) or 0) - drops_before
    return dict(arena=arena, fuzzer=fuzzer, crashes=crashes, sent=sent, send_errors=send_errors, dropped=dropped,
                elapsed=elapsed, memory_before=memory_before, restarts=arena_number - 1)


def final_check(arena: Arena) -> list[str]:
    """Return what is wrong with the server after the fuzz; an empty list if nothing."""
    problems = []
    if not arena.process.alive():
        return ["the server process is dead"]
    if "Traceback" in arena.process.stderr():
        problems.append("a Traceback in the server's stderr")
    heard = arena.count_heard("alice", arena.marker)
    if heard != 1:
        problems.append(f"bob got alice's message from before the fuzz {heard} times, not once")
    try:
        arena.alice.say("alice, after the fuzz")
        problems += expect_heard(lambda: arena.count_heard("alice", "alice, after the fuzz"), "bob", "alice")
        carol = client.ChatClient(*arena.process.address)
        dave_events: list[client.Event] = []
        dave = client.ChatClient(*arena.process.address, on_event=dave_events.append)
        try:
            for made, name in ((carol, "carol"), (dave, "dave")):
                made.register(name, PASSWORD)
                made.login(name, PASSWORD)
                made.join(server.LOBBY, LOBBY_PASSWORD)
            carol.say("hello dave")
            problems += expect_heard(
                lambda: sum(1 for e in list(dave_events) if e.user == "carol" and e.text == "hello dave"),
                "dave", "carol")
        finally:
            carol.close()
            dave.close()
    except client.ChatError as error:
        problems.append(f"a normal client failed: {type(error).__name__}: {error}")
    return problems


def expect_heard(count, listener: str, speaker: str, timeout: float = 10.0) -> list[str]:
    """Wait until `count()` is 1; then a moment more, to see that it stays 1."""
    deadline = time.monotonic() + timeout
    while count() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    heard = count()
    return [] if heard == 1 else [f"{listener} heard {speaker}'s new message {heard} times, not once"]


def log_in_many(address, count: int, first_name: str = "idle") -> tuple[collections.Counter, list[BareClient]]:
    """Register and log in `count` bare clients, one after another; return their outcomes.
    The clients stay open (and idle) until the caller closes them: see `idle_sessions`."""
    outcomes = collections.Counter()
    clients = []
    for index in range(count):
        bare = BareClient(address)
        clients.append(bare)
        bare.register(f"{first_name}{index}")
        answer = bare.login(f"{first_name}{index}")
        outcomes["ok" if answer[0] == "OK" else f"{answer[1]}: {answer[2]}"] += 1
    return outcomes, clients


def idle_sessions(workdir: str, count: int = 1000) -> str:
    """The server's memory with `count` idle logged-in sessions."""
    settings = fuzz_settings(os.path.join(workdir, "idle"), session_timeout=600.0)
    constants = {"MAX_SESSIONS": count + 100, "REGISTRATIONS_PER_ADDRESS": 5 * count}
    with start_server(workdir, settings, name="idle", constants=constants) as process:
        before = process.memory()
        began = time.monotonic()
        outcomes, clients = log_in_many(process.address, count)
        took = time.monotonic() - began
        after = process.memory()
        for bare in clients:
            bare.close()
    if not before or not after:
        return f"{count:,} idle sessions: {dict(outcomes)}; memory n/a (no /proc)"
    per_session = (after["VmRSS"] - before["VmRSS"]) * 1024 / count
    return (f"Memory with {count:,} idle logged-in sessions: VmRSS {before['VmRSS']:.1f} MB before, "
            f"{after['VmRSS']:.1f} MB after ({per_session:.1f} kB a session, its account record, channel and "
            f"remembered answers included), VmHWM {after['VmHWM']:.1f} MB; {outcomes['ok']:,} logged in of {count:,}; "
            f"{count:,} REGISTER + LOGIN over the protocol, one after another, took {took:.1f} s "
            f"(MAX_SESSIONS {count + 100:,}, REGISTRATIONS_PER_ADDRESS {5 * count:,}, session_timeout 600 s).")


def session_limit(workdir: str) -> str:
    """What the default MAX_SESSIONS (500) tells the 501st client."""
    limit = server.MAX_SESSIONS
    constants = {"REGISTRATIONS_PER_ADDRESS": 5 * limit}
    # Silent sessions must not time out while the 501 log in (two round trips each).
    settings = fuzz_settings(os.path.join(workdir, "limit"), session_timeout=600.0)
    with start_server(workdir, settings, name="limit", constants=constants) as process:
        outcomes, clients = log_in_many(process.address, limit + 1, "user")
        for bare in clients:
            bare.close()
    refusals = ", ".join(f'{count} got "{text}"' for text, count in outcomes.items() if text != "ok")
    return f"Default MAX_SESSIONS {limit}: {outcomes['ok']} of {limit + 1} logged in; {refusals or 'none refused'}."


def report(figures: dict, problems: list[str], memory_after, extra: list[str]) -> None:
    crashes: Crashes = figures["crashes"]
    print()
    print("| kind of datagram | sent |")
    print("|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {figures['fuzzer'].counts[kind]:,} |")
    print()
    sent, elapsed = figures["sent"], figures["elapsed"]
    print(f"Datagrams sent: {sent:,} in {elapsed:.1f} s ({sent / elapsed:,.0f}/s), from {STRANGERS} stranger sockets, "
          f"{MEMBERS} logged-in member sockets and alice's; a HELLO round trip every {SYNC_EVERY}.")
    print(f"Dropped by the kernel at the server's socket (buffer full): {figures['dropped']:,}; "
          f"send errors: {figures['send_errors']:,}.")
    kinds = "; ".join(f"{count} x {line}" for line, count in crashes.kinds.items())
    print(f"Crashes (server died or wrote a Traceback): {crashes.count}{' - ' + kinds if kinds else ''}; "
          f"restarts: {figures['restarts']}; HELLO checks unanswered while alive: {crashes.hangs}.")
    before = figures["memory_before"]
    after = (f"VmRSS {megabytes(memory_after, 'VmRSS')} MB, VmHWM {megabytes(memory_after)} MB"
             + (" (of the server started after the last crash)" if figures["restarts"] else "")
             if memory_after else "n/a (no server left running)")
    print(f"Server memory before the fuzz: VmRSS {megabytes(before, 'VmRSS')} MB, VmHWM {megabytes(before)} MB; "
          f"after: {after}.")
    if problems:
        print("Final check: FAILED - " + "; ".join(problems))
    else:
        print("Final check: passed - server alive, no Traceback; bob got alice's pre-fuzz message exactly once "
              "and hears her still; new users carol and dave registered, logged in, joined the lobby, and dave "
              "heard carol exactly once.")
    for line in extra:
        print(line)


def raise_file_limit(wanted: int = 4096) -> None:
    """1,000 sockets need more than the 1,024 open files some systems allow by default."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="datagrams to send (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1,
                        help="random seed (the datagrams also depend on the cookies and tokens the server hands out)")
    parser.add_argument("--max-crashes", type=int, default=5,
                        help="stop fuzzing after this many (default: %(default)s)")
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions to measure (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sample = Packet(PacketType.SAY, 7, 2, 5, b"token123", 1, pack_fields("hi :)"))
    assert build(*sample) == encode_packet(sample, CIPHER), "build() no longer makes the real wire format"
    raise_file_limit()
    began = time.monotonic()
    print(f"Fuzzing the chat server: {args.count:,} datagrams, seed {args.seed}, on {machine()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="chat-fuzz-") as workdir:
        figures = fuzz(args.count, args.seed, args.max_crashes, workdir)
        arena = figures["arena"]
        if arena is None:
            problems, memory_after = ["fuzzing stopped after too many crashes"], None
        else:
            problems = final_check(arena)
            memory_after = arena.process.memory()
            arena.close()
        print("  measuring idle sessions ...", file=sys.stderr, flush=True)
        extra = [idle_sessions(workdir, args.sessions), session_limit(workdir)]
    report(figures, problems, memory_after, extra)
    print(f"Machine: {machine()}")
    print(f"Command: python tests/fuzz_server.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"Run time: {time.monotonic() - began:.0f} s")
    failed = figures["crashes"].count or figures["crashes"].hangs or problems
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
