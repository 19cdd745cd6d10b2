"""UDP chat room server: accounts, password-protected rooms, history, reliable delivery.

Run it on one PC of the lab network, then `python client.py` on the others:

    python server.py                          # all interfaces, port 9999, lobby password "juara"
    python server.py --port 5000 --room-password rahasia --cipher caesar --key 7

How it is built, in the spirit of the standard library's socketserver:

* One loop owns the one UDP socket (`ServerLoop`). UDP has no connections and needs no
  listen() or accept(): every datagram arrives on the same socket, tagged with its
  sender's (ip, port). No thread per datagram, no two readers of one socket.
* The protocol - parse, decide, answer - is `ChatServer`, which never touches a socket:
  it is handed datagrams and the time, and collects the datagrams to send in `outbox`,
  so tests and the notebook drive it without a network. One table maps each packet
  type to its handler; one method, `answer`, answers every request.
* A logged-in member talks over a reliable `Channel` (encryption_helper.py): requests
  one way, replies and EVENTs (messages, joins, leaves) the other, each delivered once
  and in order. Before login there is no channel: a stranger's REGISTER or LOGIN that
  comes again gets the remembered answer (`StrangerReplies`), never a second account.
* Small helpers do one job each: `AbuseControl` (lockouts, limits, flood control),
  `Delivery` (the channels' timers), `Discovery` (answers a client's search of the
  network, FIND), `ServerLog`, `HistoryLog`, and `PasswordWorker`,
  the thread that runs the slow password hash so that a flood of logins never stalls
  the chat. Only the loop's thread changes any state.

A SAY datagram, as it leaves a client (XOR-scrambled payload, readable header):

    55 43 03 05 00 00 00 07  00 00 00 07 00 00 00 02   "UC" v3 SAY flags=0 len=7 seq=7 ack=2
    00 00 00 00 3e 1a 2c 5e  5e 77 90 12 60 63 4b d0   sack=0, token, CRC-32, then the payload:
    49 4c 5a 58 12 0a 60                               [5]"hi :)" XORed with the key "II2120"

The packet format and the channel are defined once, in encryption_helper.py; accounts in auth.py.
"""

import argparse
import collections
import dataclasses
import heapq
import hmac
import json
import os
import secrets
import selectors
import socket
import sys
import threading
import time
import traceback

import auth
from encryption_helper import (
    ACK_DELAY,
    CIPHER_NAMES,
    DEFAULT_CIPHER,
    MAGIC,
    MAX_PAYLOAD,
    MIN_FIND_SIZE,
    MIN_HELLO_SIZE,
    NO_TOKEN,
    RECV_BUFFER,
    Body,
    Channel,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    decode_packet,
    describe_datagram,
    encode_packet,
    local_interfaces,
    make_cipher,
    oversize_text,
    pack_fields,
    peek_type_name,
    prepare_body,
    unpack_fields,
)

Address = tuple[str, int]  # (ip, port): who sent a datagram, where to send one

LOBBY = "lobby"
HISTORY_FILE = "chat_history.txt"
USERS_FILE = "users.json"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_data")
COOKIE_PERIOD = 30.0  # seconds; a HELLO cookie stays valid for one to two periods
HISTORY_ON_JOIN = 20  # past messages shown to whoever joins a room
MAX_BACKLOG = 100  # a member's requests held by flood control; past that they are refused
MAX_WAIT = 0.5  # seconds the loop may sleep: on Windows, Ctrl+C waits for select() to return
RECEIVE_BUFFER_BYTES = 4 << 20  # the kernel's queue for our socket, asked for, not promised
RECEIVE_BATCH = 256  # datagrams read per wake-up, so timers still run during a flood
HOUSEKEEPING_EVERY = 1.0  # seconds between sweeps for silent sessions
MAX_NAME_BYTES = 64  # the name a FIND is answered with: so that the answer stays smaller than the FIND


@dataclasses.dataclass
class ServerConfig:
    """What the command line can change, with the defaults a lab uses."""

    host: str = "0.0.0.0"  # all interfaces: reachable from the other lab PCs
    port: int = 9999
    data_dir: str = DEFAULT_DATA_DIR
    room_password: str = "juara"  # the lobby's password (seed 001's example)
    cipher: str = DEFAULT_CIPHER
    key: str | None = None  # None: the cipher's default key, the same as the client's
    quiet: bool = False  # log only problems, not every action
    verbose: bool = False  # also log heartbeats and trace every packet in and out
    loss: float = 0.0  # drop this share of datagrams in and out, to watch recovery
    seed: int | None = None  # makes --loss drop the same datagrams every run
    # A client sends a heartbeat after 5 s of quiet; six missed in a row means it is gone.
    session_timeout: float = 30.0
    kdf_iterations: int = auth.DEFAULT_ITERATIONS  # tests lower it: they need no slow hash
    name: str = ""  # what clients searching the network (FIND) are told; "": this PC's host name


# --- State -----------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """A logged-in member, known by address and proven by the token it carries."""

    token: bytes
    address: Address
    name: str
    channel: Channel  # the reliable channel to this member's client
    bucket: "TokenBucket"  # flood control
    last_heard: float
    room: str | None = None  # key of the room in ChatServer.rooms
    backlog: collections.deque = dataclasses.field(default_factory=collections.deque)  # requests held
    news: list = dataclasses.field(default_factory=list)  # EVENT bodies, sent after the current reply
    wake_at: float = float("inf")  # when Delivery next looks at this session


@dataclasses.dataclass
class Room:
    name: str
    password: str
    members: dict  # lower-case name -> Session
    history: collections.deque  # (unix time, user, text), the last few messages


@dataclasses.dataclass
class Request:
    """One packet to handle, with what the handlers need to know about it."""

    packet: Packet
    address: Address
    size: int  # bytes received: an unproven sender never gets more back
    now: float
    session: Session | None = None  # None: a stranger (HELLO, REGISTER, LOGIN)
    proven: bool = False  # the sender showed it is really at its address (cookie or token)


class Refusal(Exception):
    """A request the server turns down; becomes an ERROR reply [re, code, text]."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


# --- The protocol: handlers by packet type ---------------------------------------------


class ChatServer:
    """The chat protocol: takes datagrams and the time, changes state, fills `outbox`.

    It opens no socket and starts no thread, so a test can drive it with plain bytes and a
    fake clock. Password checks wait in `password_jobs` for the loop's worker thread.
    """

    def __init__(self, config: ServerConfig, log=print, wall_clock=time.time):
        self.config = config
        self.cipher = make_cipher(config.cipher, config.key)
        self.wall_clock = wall_clock
        self.log = ServerLog(log, quiet=config.quiet, verbose=config.verbose)
        os.makedirs(config.data_dir, exist_ok=True)
        self.users = auth.UserStore(os.path.join(config.data_dir, USERS_FILE), config.kdf_iterations)
        history_path = os.path.join(config.data_dir, HISTORY_FILE)
        lobby_history = read_history(history_path, LOBBY, HISTORY_ON_JOIN, self.log.problem)
        self.history = HistoryLog(history_path)
        # Shared state, changed only by the loop's thread:
        self.sessions: dict[Address, Session] = {}  # address -> session
        self.online: dict[str, Session] = {}  # lower-case user name -> session
        self.guard = AbuseControl()
        self.strangers = StrangerReplies()
        self.delivery = Delivery()
        self.rooms = Rooms(Room(LOBBY, config.room_password, {}, lobby_history), self.cipher, self.delivery, wall_clock)
        self.next_housekeeping = 0.0
        self.outbox: list[tuple[bytes, Address]] = []  # datagrams for the network layer to send
        self.password_jobs: list[auth.PasswordJob] = []  # checks for the network layer to run
        self.stats = collections.Counter()
        self.reception = Reception(self)
        self.discovery = Discovery(self)
        self.handlers = handler_table(self, self.reception)

    # --- Entry points: a datagram, a finished password check, the time ---

    def handle_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from `address`. Nothing it contains can raise out of here."""
        self.stats["datagrams"] += 1
        self.log.trace("in ", data, address)
        try:
            packet = decode_packet(data, self.cipher)
        except PacketError as error:
            self.refuse_datagram(data, address, error)
        else:
            request = Request(packet, address, len(data), now)
            if packet.type in STRANGER_TYPES and packet.token == NO_TOKEN:
                self.reception.handle_stranger(request)
            else:
                self.handle_member_packet(request)
        self.flush(now)

    def finish_password_job(self, job: "auth.PasswordJob", now: float) -> None:
        """A password check the worker finished: answer its request."""
        self.guard.hash_finished(job.request.address[0])
        job.request.now = now
        self.answer(job.request, run_handler(self.reception.finish_password_job, job))
        self.flush(now)

    def on_timers(self, now: float) -> None:
        """Resend what the channels want resent, serve held requests, end silent sessions."""
        for session in self.delivery.due(now):
            if self.sessions.get(session.address) is session:
                self.delivery.touch(session)
                self.serve_backlog(session, now)
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_EVERY
            for session in list(self.sessions.values()):
                if now - session.last_heard > self.config.session_timeout:
                    self.end_session(session, "timed out", now)
        self.flush(now)

    def next_deadline(self) -> float:
        return min(self.delivery.next_deadline(), self.next_housekeeping)  # when on_timers has work

    # --- Dispatch ---

    def handle_member_packet(self, request: Request) -> None:
        """A packet on a member's channel: acknowledgements first, then requests in order."""
        packet, address = request.packet, request.address
        session = self.sessions.get(address)
        if session is None or not hmac.compare_digest(session.token, packet.token):
            self.refuse_unknown_session(request, session)
            return
        session.last_heard = request.now
        outcome, ready = session.channel.receive(packet, request.now)
        if outcome != "in order":
            self.log.trace("   ", b"", address, f" {packet.type.name} seq={packet.seq}: {outcome}")
        for delivered in ready:
            if not delivered.seq:
                continue  # an unnumbered ACK: its header said all it had to say
            held = Request(delivered, address, request.size, request.now, session, proven=True)
            if len(session.backlog) < MAX_BACKLOG + (delivered.type == PacketType.BYE):  # room kept for a goodbye
                session.backlog.append(held)
            else:  # a real flood: refuse rather than hold without end
                self.answer(held, Refusal("slow-down", "Slow down: too many messages at once; not sent."))
        self.delivery.touch(session)  # first: its replies go out before the EVENTs they cause
        self.serve_backlog(session, request.now)

    def serve_backlog(self, session: Session, now: float) -> None:
        """Handle the member's requests in order; flood control may hold the rest for later."""
        while session.backlog and self.sessions.get(session.address) is session:
            request = session.backlog[0]
            if request.packet.type in FLOOD_CONTROLLED:
                wait = session.bucket.take(now)
                if wait:
                    self.delivery.wake(session, now + wait)  # served then, in its turn
                    return
            session.backlog.popleft()
            request.now = now
            self.answer(request, run_handler(self.handlers[request.packet.type], request))

    # --- The one place that answers ---

    def answer(self, request: Request, result, token: bytes | None = None) -> None:
        """Answer `request` with OK [re, *result] or, for a Refusal, ERROR [re, code, text].

        A member's answer goes on its channel; a stranger's straight to its address,
        remembered for retries. None means: no answer now (a password check is running).
        """
        if result is None:
            return
        if isinstance(result, Refusal):
            ptype, fields = PacketType.ERROR, [result.code, result.text]
        else:
            ptype, fields = PacketType.OK, list(result)
        payload = pack_fields(str(request.packet.seq), *fields)
        if len(payload) > MAX_PAYLOAD:  # never expected; but a reply must never crash the server
            ptype, fields = PacketType.ERROR, ["too-long", "Answer too long."]
            payload = pack_fields(str(request.packet.seq), *fields)
        self.log.outcome(request, ptype, fields)
        if request.session is not None:
            if not request.session.channel.send(ptype, payload):
                self.delivery.give_up_on(request.session)  # its queue is full: it cannot keep up
            self.delivery.touch(request.session)  # a password check may finish between packets
            return
        token = token or request.packet.token
        data = encode_packet(Packet(ptype, 0, request.packet.seq, 0, token, 0, payload), self.cipher)
        if request.proven:
            self.strangers.remember(request, data)
        self.send_to_stranger(data, request)

    def send(self, data: bytes, address: Address, note: str = "") -> None:
        self.log.trace("out", data, address, note)
        self.outbox.append((data, address))

    def send_to_stranger(self, data: bytes, request: Request) -> None:
        """Answer an address, never with more bytes than it sent unless it proved itself.

        UDP source addresses can be forged: if a small request could earn a big reply,
        anyone could aim our replies at a victim (a reflection attack).
        """
        if request.proven or len(data) <= request.size:
            self.send(data, request.address)
        else:
            self.stats["withheld"] += 1

    def refuse_datagram(self, data: bytes, address: Address, error: PacketError) -> None:
        """Log a malformed datagram, and answer if it looks like ours (it may be a bad key)."""
        self.stats["bad"] += 1
        self.log.problem(f"{describe(address)} sent a bad datagram ({peek_type_name(data)}, {len(data)} B): {error}")
        if data[:2] == MAGIC:
            answer = encode_packet(Packet(PacketType.ERROR, payload=pack_fields("0", "bad-packet", str(error))),
                                   self.cipher)
            self.send_to_stranger(answer, Request(Packet(PacketType.ERROR), address, len(data), 0.0))

    def refuse_unknown_session(self, request: Request, session: Session | None) -> None:
        """A member packet without a valid session: RESET if we know nobody at that address."""
        self.stats["no-session"] += 1
        packet, address = request.packet, request.address
        if packet.type == PacketType.ACK:
            return  # e.g. the last ACK of a client that said BYE: nothing to answer
        if session is not None:  # someone else's address with a wrong token: forged
            self.log.problem(f"{describe(address)} sent {packet.type.name} with a wrong session token; dropped")
            return
        self.log.problem(f"{describe(address)} sent {packet.type.name} but has no session; told to log in")
        # RESET is a bare header, never larger than any packet, and echoes the token, so
        # a client believes it only if it carried that token itself.
        self.send(encode_packet(Packet(PacketType.RESET, 0, packet.seq, 0, packet.token), self.cipher), address)

    # --- Member requests: each returns the OK fields or raises Refusal ---

    def handle_join(self, request: Request) -> list[str]:
        session = request.session
        name, password = unpack_fields(request.packet.payload, 2)
        key = name.lower()
        room = self.rooms.get(key)
        if not auth.valid_username(name):
            raise Refusal("bad-name", "Room names are 1-20 letters, digits, '_', '.' or '-'.")
        if session.room == key:
            return [room.name, str(len(room.members)), f"You are in {room.name} already."]
        self.guard.check_room_password(session.token, request.now)
        if room is None:
            self.guard.check_rooms(len(self.rooms))
            room, created = self.rooms.create(name, password), " (new room)"
        elif hmac.compare_digest(password.encode(), room.password.encode()):
            created = ""
        else:
            self.guard.wrong_room_password(session.token, request.now)
            raise Refusal("wrong-room-password", "Wrong room password.")
        if session.room:
            self.rooms.leave(session, "")
        self.rooms.enter(session, room)
        return [room.name, str(len(room.members)), f"joined {room.name}{created}, {len(room.members)} here"]

    def handle_say(self, request: Request) -> list[str]:
        session = request.session
        (text,) = unpack_fields(request.packet.payload, 1)
        room = self.require_room(session)
        check_text(text)
        when = self.wall_clock()
        try:
            self.history.append(when, room.name, session.name, text)  # on file before anything else
        except OSError as error:
            self.log.problem(f"could not write {HISTORY_FILE}: {error}")
            raise Refusal("server-error", "The server could not save your message; not sent.") from None
        room.history.append((when, session.name, text))
        self.log.message(room.name, session.name, text)  # the assignment: print every message relayed
        self.rooms.publish(room, "chat", session.name, text, exclude=session)
        others = len(room.members) - 1
        return [f"to {room.name}, {others} other{'' if others == 1 else 's'}"]

    def handle_private(self, request: Request) -> list[str]:
        target_name, text = unpack_fields(request.packet.payload, 2)
        target = self.online.get(target_name.lower())
        if target is None:
            shown = target_name if auth.valid_username(target_name) else "That user"  # never echo junk
            raise Refusal("unknown-user", f"{shown} is not online.")
        check_text(text)
        self.delivery.push(target, self.rooms.event("private", "", request.session.name, text))
        return [f"private to {target.name}"]

    def handle_rooms(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        pairs = [[room.name, str(len(room.members))] for room in self.rooms.values()]
        return fit_fields([field for pair in pairs for field in pair], step=2)

    def handle_who(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        room = self.require_room(request.session)
        return fit_fields([room.name] + sorted(member.name for member in room.members.values()))

    def handle_ping(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        return []

    def handle_bye(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        self.end_session(request.session, "", request.now)
        return ["goodbye"]

    def handle_ack(self, request: Request) -> None:  # a numbered ACK is not one
        raise Refusal("bad-request", "An ACK carries no sequence number.")

    def handle_server_only(self, request: Request) -> None:
        self.stats["bad"] += 1
        self.log.problem(f"{describe(request.address)} sent {request.packet.type.name}, "
                         "which only servers send; dropped")

    def require_room(self, session: Session) -> Room:
        if session.room is None:
            raise Refusal("not-in-room", "Join a room first: /join ROOM")
        return self.rooms[session.room]

    # --- Sessions ---

    def open_session(self, name: str, address: Address, now: float) -> Session:
        token = secrets.token_bytes(8)
        channel = Channel(self.cipher, token, rto=RtoEstimator(peer_ack_delay=ACK_DELAY))  # clients delay ACKs
        session = Session(token, address, name, channel, self.guard.new_bucket(now), now)
        self.sessions[address] = session
        self.online[name.lower()] = session
        return session

    def end_session(self, session: Session, reason: str, now: float) -> None:
        """Forget a session; its room hears that the user left, and why.

        Its channel is sent once more (the goodbye, after a BYE), then never: a client
        that missed the goodbye asks again, is told RESET, and takes that as the end.
        """
        if self.sessions.get(session.address) is not session:
            return  # ended already
        del self.sessions[session.address]
        del self.online[session.name.lower()]
        session.backlog.clear()
        if session.room:
            self.rooms.leave(session, reason)
        self.delivery.touch(session)
        self.log.event(session.address, session.name, f"session ended{': ' + reason if reason else ''}")

    def flush(self, now: float) -> None:
        """Send what the touched sessions' channels have for the wire: replies, then EVENTs."""
        while self.delivery.touched:  # again while ending a session told its room something
            for session in self.delivery.flush(now, self.outbox, self.log.trace):
                if self.sessions.get(session.address) is session:  # fell too far behind, or gave up
                    reason = "not responding" if session.channel.failed else "too slow"
                    self.log.problem(f"{session.name} at {describe(session.address)}: {reason}; session ended")
                    self.end_session(session, reason, now)

    def close(self) -> None:
        self.history.close()


# Packet types a stranger may send; every other type needs a session.
STRANGER_TYPES = {PacketType.HELLO, PacketType.REGISTER, PacketType.LOGIN, PacketType.FIND}
# Requests that flood control counts: messages.
FLOOD_CONTROLLED = {PacketType.SAY, PacketType.PRIVATE}

class Reception:
    """The door: HELLO, REGISTER and LOGIN, from senders who have no session yet.

    Nothing a stranger says is believed until it proves it is at its address, by
    sending back the cookie its HELLO earned. Password checks are slow, so they are
    queued as jobs for the worker thread and finished when the result comes back.
    """

    def __init__(self, server: "ChatServer"):
        self.server = server
        self.cookie_secret = secrets.token_bytes(16)
        self.registering: set[str] = set()  # names whose registration is being hashed

    def handle_stranger(self, request: Request) -> None:
        """HELLO, REGISTER, LOGIN: answered without a session; a retry gets the same answer."""
        remembered = self.server.strangers.look_up(request)
        if remembered is StrangerReplies.WORKING:
            self.server.log.verbose(request, "still checking the password (the client asked again)")
        elif remembered is not None:
            self.server.log.verbose(request, "answered again (the client did not hear the first answer)")
            self.server.send(remembered, request.address, " (repeat)")
        else:
            self.server.answer(request, run_handler(self.server.handlers[request.packet.type], request))

    def handle_hello(self, request: Request) -> list[str] | None:
        """HELLO -> OK [re, cookie]: proves the client really is at its address, as DTLS does.

        The reply goes to the address the HELLO claims; only someone who is really there
        sees the cookie and can send it back in REGISTER or LOGIN.
        """
        if request.session is None and request.size < MIN_HELLO_SIZE:
            self.server.log.problem(f"{describe(request.address)} sent an unpadded HELLO ({request.size} B); dropped")
            return None
        return [self.make_cookie(request.address, int(request.now // COOKIE_PERIOD))]

    def make_cookie(self, address: Address, period: int) -> str:
        message = f"{address[0]}|{address[1]}|{period}".encode()
        return hmac.new(self.cookie_secret, message, "sha256").hexdigest()[:32]

    def check_credentials(self, request: Request) -> tuple[str, str]:
        """Return (username, password) of a REGISTER or LOGIN whose cookie is good."""
        cookie, name, password = unpack_fields(request.packet.payload, 3)
        period = int(request.now // COOKIE_PERIOD)
        given = cookie.encode("utf-8")  # bytes: compare_digest refuses non-ASCII text
        if not any(hmac.compare_digest(given, self.make_cookie(request.address, p).encode())
                   for p in (period, period - 1)):
            raise Refusal("stale-cookie", "Say HELLO again.")
        request.proven = True
        return name, password

    def handle_register(self, request: Request) -> None:
        name, password = self.check_credentials(request)
        if not auth.valid_username(name):
            raise Refusal("bad-name", "Usernames are 1-20 letters, digits, '_', '.' or '-'.")
        if not password:
            raise Refusal("bad-password", "The password must not be empty.")
        if self.server.users.exists(name) or name.lower() in self.registering:
            raise Refusal("taken", "Username already taken.")
        self.server.guard.check_registration(request.address[0], request.now)
        self.start_password_job(auth.PasswordJob(request, name, password, None, self.server.config.kdf_iterations))
        self.server.guard.registered(request.address[0], request.now)
        self.registering.add(name.lower())

    def finish_register(self, job: "auth.PasswordJob") -> list[str]:
        self.registering.discard(job.name.lower())
        try:
            self.server.users.add(job.result)  # on disk before we say so
        except OSError as error:
            self.server.log.problem(f"could not save the users file: {error}")
            raise Refusal("server-error", "The server could not save your account; try again.") from None
        return ["Registration successful."]

    def handle_login(self, request: Request) -> None:
        if request.session is not None:
            raise Refusal("already-logged-in", "This client is logged in already; log out first.")
        name, password = self.check_credentials(request)
        self.server.guard.check_login(name.lower(), request.now)  # before hashing: guessing costs the guesser
        record = self.server.users.get(name) or auth.dummy_record(self.server.config.kdf_iterations)
        self.start_password_job(auth.PasswordJob(request, name, password, record))

    def finish_login(self, job: "auth.PasswordJob") -> list[str] | None:
        request = job.request
        if not (job.result and job.record["name"]):
            self.server.guard.login_failed(job.name.lower(), request.now)
            raise Refusal("invalid-login", "Invalid username or password.")
        name = job.record["name"]  # as registered, whatever the case typed
        here = self.server.sessions.get(request.address)
        elsewhere = self.server.online.get(name.lower())
        if elsewhere and elsewhere is not here:
            raise Refusal("already-logged-in", f"{name} is logged in already. A client that vanished is "
                                               f"forgotten after {self.server.config.session_timeout:.0f} s.")
        if here and here.name.lower() != name.lower():
            raise Refusal("already-logged-in", "This client is logged in already; log out first.")
        if here and here.channel.expected > 1:  # in use: a duplicate or replay of its LOGIN; it stands
            self.server.answer(request, [name, LOBBY, f"Welcome, {name}."], token=here.token)
            return None
        if here:  # the same login again, never used: its welcome was lost and forgotten; start afresh
            self.server.end_session(here, "", request.now)
        self.server.guard.check_sessions(len(self.server.sessions))
        session = self.server.open_session(name, request.address, request.now)
        self.server.answer(request, [name, LOBBY, f"Welcome, {name}."], token=session.token)
        return None

    def finish_password_job(self, job: "auth.PasswordJob") -> list[str] | None:
        """A password check came back: finish the REGISTER or LOGIN it was for."""
        if job.error:  # the check itself failed: the request still gets an answer
            self.server.log.problem(f"checking {job.name!r}'s password failed: {job.error}")
            self.registering.discard(job.name.lower())
            raise Refusal("server-error", "The server could not check that; try again.")
        register = job.request.packet.type == PacketType.REGISTER
        return self.finish_register(job) if register else self.finish_login(job)

    def start_password_job(self, job: "auth.PasswordJob") -> None:
        """Hand a password check to the worker; retries of the request now wait for it."""
        self.server.guard.hash_started(job.request.address[0])
        self.server.strangers.working(job.request)
        self.server.password_jobs.append(job)
        self.server.log.outcome(job.request, None, ["checking password..."])


def handler_table(chat: ChatServer, door: "Reception") -> dict:
    """Which method handles which packet type: one table, one signature (request -> OK fields)."""
    return {
        PacketType.HELLO: door.handle_hello,
        PacketType.REGISTER: door.handle_register,
        PacketType.LOGIN: door.handle_login,
        PacketType.JOIN: chat.handle_join,
        PacketType.SAY: chat.handle_say,
        PacketType.PRIVATE: chat.handle_private,
        PacketType.ROOMS: chat.handle_rooms,
        PacketType.WHO: chat.handle_who,
        PacketType.PING: chat.handle_ping,
        PacketType.BYE: chat.handle_bye,
        PacketType.ACK: chat.handle_ack,
        PacketType.FIND: chat.discovery.handle_find,
        PacketType.OK: chat.handle_server_only,
        PacketType.ERROR: chat.handle_server_only,
        PacketType.EVENT: chat.handle_server_only,
        PacketType.RESET: chat.handle_server_only,
    }


def run_handler(handler, *args):
    """Run a handler; return its OK fields, None (no answer yet), or the Refusal."""
    try:
        return handler(*args)
    except Refusal as refusal:
        return refusal
    except PacketError as error:
        return Refusal("bad-request", str(error))


def check_text(text: str) -> None:
    """Refuse an empty message, or one too long for an EVENT."""
    if not text.strip():
        raise Refusal("empty", "Empty message; nothing sent.")
    if oversize_text(text):
        raise Refusal("too-long", oversize_text(text))


def fit_fields(fields: list[str], step: int = 1) -> list[str]:
    """Return as many whole groups of `step` fields as fit in one reply, then '+N'."""
    budget = MAX_PAYLOAD - 64  # room for the request number, the '+N' marker and length prefixes
    for end in range(0, len(fields) + 1, step):
        if len(pack_fields(*fields[:end])) > budget:
            end -= step
            return fields[:end] + [f"+{(len(fields) - end) // step}"]
    return fields


def describe(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def timestamp() -> str:
    return time.strftime("%H:%M:%S")


# --- Helper classes: one job each --------------------------------------------------------


class TokenBucket:
    """Flood control: `burst` messages at once, then `rate` a second (as IRC servers do)."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Spend one token and return 0, or return the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1 - 1e-9:  # a hair short of 1 is rounding: else now + wait == now, for ever
            self.tokens = max(self.tokens - 1, 0.0)
            return 0.0
        return (1 - self.tokens) / self.rate


class AbuseControl:
    """Lockouts, limits and capacity: what keeps one student from spoiling the lab."""

    LOGIN_FAILURES = 5  # failed logins per account in FAILURE_PERIOD before it is locked
    FAILURE_PERIOD = 60.0
    REGISTRATIONS_PER_ADDRESS = 20  # per FAILURE_PERIOD, from one IP address
    MAX_PENDING_HASHES = 16  # password checks waiting for the worker; then "busy"
    MAX_PENDING_PER_ADDRESS = 2  # one address cannot fill the hash queue alone
    MAX_SESSIONS = 500  # a lab of 40 PCs with room to spare; then "Server full"
    MAX_ROOMS = 50
    MESSAGE_RATE = 5.0  # messages a second per member, as IRC servers limit...
    MESSAGE_BURST = 20  # ...after a burst: pasting a short paragraph is fine

    def __init__(self):
        self.failed_logins = auth.EventCounter(self.LOGIN_FAILURES, self.FAILURE_PERIOD)
        self.registrations = auth.EventCounter(self.REGISTRATIONS_PER_ADDRESS, self.FAILURE_PERIOD)
        self.wrong_room_passwords = auth.EventCounter(self.LOGIN_FAILURES, self.FAILURE_PERIOD)
        self.pending: collections.Counter = collections.Counter()  # ip -> password checks waiting

    @staticmethod
    def refuse_if_blocked(counter: "auth.EventCounter", key, now: float, code: str, why: str) -> None:
        wait = counter.blocked_for(key, now)
        if wait:
            raise Refusal(code, f"{why}; try again in {wait:.0f} s.")

    def check_login(self, name: str, now: float) -> None:
        self.refuse_if_blocked(self.failed_logins, name, now, "locked", "Too many failed attempts")

    def login_failed(self, name: str, now: float) -> None:
        self.failed_logins.add(name, now)

    def check_registration(self, ip: str, now: float) -> None:
        self.refuse_if_blocked(self.registrations, ip, now, "slow-down", "Too many registrations from your address")

    def registered(self, ip: str, now: float) -> None:
        self.registrations.add(ip, now)

    def check_room_password(self, token: bytes, now: float) -> None:
        self.refuse_if_blocked(self.wrong_room_passwords, token, now, "locked", "Too many wrong room passwords")

    def wrong_room_password(self, token: bytes, now: float) -> None:
        self.wrong_room_passwords.add(token, now)

    def hash_started(self, ip: str) -> None:
        """Count a password check for the worker, or refuse it when there are enough."""
        if sum(self.pending.values()) >= self.MAX_PENDING_HASHES:
            raise Refusal("busy", "Server busy; try again in a moment.")
        if self.pending[ip] >= self.MAX_PENDING_PER_ADDRESS:
            raise Refusal("busy", "Your previous request is still being checked; wait for it.")
        self.pending[ip] += 1

    def hash_finished(self, ip: str) -> None:
        self.pending[ip] -= 1
        if not self.pending[ip]:
            del self.pending[ip]

    def check_sessions(self, count: int) -> None:
        if count >= self.MAX_SESSIONS:
            raise Refusal("full", "Server full; try again later.")

    def check_rooms(self, count: int) -> None:
        if count >= self.MAX_ROOMS:
            raise Refusal("full", "Server full: no more rooms can be made.")

    def new_bucket(self, now: float) -> TokenBucket:
        return TokenBucket(self.MESSAGE_RATE, self.MESSAGE_BURST, now)


class Discovery:
    """Answers FIND, a client's search of the network: this server's name, port and members online.

    A FIND is usually a broadcast, and may come from anyone - even from a forged address.
    So it is answered only when padded to MIN_FIND_SIZE (the answer is never the larger:
    nobody can use us to flood a victim), and only FIND_BURST at once, then FIND_RATE a
    second, for the whole server: a flood of searches costs a few answers, never the chat.
    """

    FIND_RATE = 10.0  # answers a second, server-wide, after...
    FIND_BURST = 50  # ...a burst: a class of forty all searching at once is answered

    def __init__(self, server: "ChatServer"):
        self.server = server
        self.name = server.config.name or host_name()
        self.port = server.config.port  # ServerLoop says which one, when the system chose it (port 0)
        self.bucket = TokenBucket(self.FIND_RATE, self.FIND_BURST, 0.0)

    def handle_find(self, request: Request) -> list[str] | None:
        """FIND -> OK [re, name, port, members online]; unpadded, or over the rate, it is dropped."""
        if request.size < MIN_FIND_SIZE:
            return self.drop(request, f"unpadded ({request.size} B)")
        unpack_fields(request.packet.payload, 1)  # the padding, and nothing else
        if self.bucket.take(request.now):
            return self.drop(request, "over the server's rate of answers")
        return [self.name, str(self.port), str(len(self.server.sessions))]

    def drop(self, request: Request, why: str) -> None:
        self.server.stats["finds dropped"] += 1
        self.server.log.problem(f"{describe(request.address)} sent a FIND, {why}; dropped")


def host_name() -> str:
    """Return this PC's host name, cut to MAX_NAME_BYTES: the name FIND answers with by default."""
    name = socket.gethostname() or "chat server"
    return str(name.encode("utf-8")[:MAX_NAME_BYTES], "utf-8", "ignore")  # never half a character


class StrangerReplies:
    """Answers to recent REGISTER and LOGIN requests, for their retries; bounded.

    A stranger has no channel, so when its answer is lost it asks again with the same
    request number. It must get the same answer - not "Username already taken." for
    the account just made for it. Keyed by (address, request number), with a digest of
    the request, so that a different request that reuses the number is not mistaken
    for a retry.
    """

    SIZE = 4096  # least recently used forgotten first: a flood cannot grow it
    WORKING = "working"  # the password check is still running

    def __init__(self):
        self.answers: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def key(request: Request) -> tuple:
        packet = request.packet
        return request.address, packet.seq, hash((packet.type, packet.payload))

    def look_up(self, request: Request):
        """Return the remembered answer (bytes), WORKING, or None for a new request."""
        return self.answers.get(self.key(request))

    def working(self, request: Request) -> None:
        self.store(self.key(request), self.WORKING)

    def remember(self, request: Request, data: bytes) -> None:
        self.store(self.key(request), data)

    def store(self, key: tuple, value) -> None:
        self.answers[key] = value
        self.answers.move_to_end(key)
        while len(self.answers) > self.SIZE:
            self.answers.popitem(last=False)


class Rooms(dict):
    """The rooms by lower-case name, with their members; and telling members what happens.

    A dict, so `rooms[key]` finds a room. Whoever enters a room is shown its last
    messages, and the others hear of it; whoever leaves, the same. A room other than
    the lobby lives while it has members.
    """

    def __init__(self, lobby: Room, cipher, delivery: "Delivery", wall_clock):
        super().__init__({LOBBY: lobby})
        self.cipher, self.delivery, self.wall_clock = cipher, delivery, wall_clock

    def create(self, name: str, password: str) -> Room:
        room = self[name.lower()] = Room(name, password, {}, collections.deque(maxlen=HISTORY_ON_JOIN))
        return room

    def enter(self, session: Session, room: Room) -> None:
        others = list(room.members.values())
        room.members[session.name.lower()] = session
        session.room = room.name.lower()
        for when, user, text in room.history:
            self.delivery.push(session, self.event("history", room.name, user, text, when))
        self.tell(others, self.event("join", room.name, session.name, ""))

    def leave(self, session: Session, reason: str) -> None:
        room = self[session.room]
        del room.members[session.name.lower()]
        session.room = None
        self.publish(room, "leave", session.name, reason)
        if not room.members and room.name != LOBBY:
            self.pop(room.name.lower(), None)

    def publish(self, room: Room, kind: str, user: str, text: str, exclude=None) -> None:
        """Tell every member of `room` (but `exclude`) what `user` did or said."""
        self.tell([member for member in room.members.values() if member is not exclude],
                  self.event(kind, room.name, user, text))

    def tell(self, members, body: Body) -> None:
        for member in members:  # one body, prepared once for them all
            self.delivery.push(member, body)

    def event(self, kind: str, room: str, user: str, text: str, when: float | None = None) -> Body:
        """Return an EVENT's payload [kind, unix time, room, user, text], ready for the wire."""
        when = self.wall_clock() if when is None else when
        return prepare_body(pack_fields(kind, str(int(when)), room, user, text), self.cipher)


class Delivery:
    """When each session's channel next needs the loop, and sending what it has.

    A heap of (time, session) wake-ups: a retransmission timer, a delayed ACK, or a
    request that flood control holds. `touch` marks a session whose channel may have
    something to send after the packet being handled.
    """

    def __init__(self):
        self.timers: list = []  # heap of (when, tiebreak, session)
        self.count = 0
        self.touched: dict[int, Session] = {}
        self.overfull: list[Session] = []  # sessions whose channel refused a reply

    def touch(self, session: Session) -> None:
        self.touched[id(session)] = session

    def give_up_on(self, session: Session) -> None:
        self.overfull.append(session)

    def push(self, session: Session, body: Body) -> None:
        """Queue an EVENT for a member; it goes out after the reply being made now."""
        session.news.append(body)
        self.touch(session)

    def wake(self, session: Session, when: float) -> None:
        if when < session.wake_at:
            session.wake_at = when
            self.count += 1
            heapq.heappush(self.timers, (when, self.count, session))

    def due(self, now: float) -> list[Session]:
        """Return the sessions whose wake-up time has come."""
        sessions = []
        while self.timers and self.timers[0][0] <= now:
            when, _, session = heapq.heappop(self.timers)
            if when == session.wake_at:  # else a later wake-up replaced this one
                session.wake_at = float("inf")
                sessions.append(session)
        return sessions

    def next_deadline(self) -> float:
        return self.timers[0][0] if self.timers else float("inf")

    def flush(self, now: float, outbox: list, trace) -> list[Session]:
        """Move news onto the touched channels and send; return sessions to end (too slow, gone)."""
        to_end, self.overfull = self.overfull, []
        touched, self.touched = self.touched, {}
        for session in touched.values():
            channel = session.channel
            if not all(channel.send(PacketType.EVENT, body) for body in session.news):
                to_end.append(session)  # max_queue EVENTs behind: it cannot keep up
            session.news.clear()
            for data in channel.poll(now):
                trace("out", data, session.address)
                outbox.append((data, session.address))
            if channel.failed:
                to_end.append(session)
            else:
                self.wake(session, channel.next_wakeup())
        return to_end


class ServerLog:
    """Every action on one line: time, peer, user, packet type, size, outcome."""

    PROBLEMS_PER_SECOND = 20  # log lines about bad packets: a flood must not flood the log
    QUIET_TYPES = {PacketType.PING}  # heartbeats: logged only with --verbose

    def __init__(self, emit, quiet: bool = False, verbose: bool = False):
        self.emit, self.quiet, self.verbose_on = emit, quiet, verbose
        self.problem_second, self.problems_this_second = 0, 0

    def line(self, address: Address, user: str, what: str, size: int, outcome: str) -> None:
        if not auth.valid_username(user or "-"):  # a stranger's name may hold anything
            user = repr(user[:20])
        if not self.quiet:
            self.emit(f"{timestamp()} {describe(address):>21} {user or '-':<12} {what:<8} {size:>4} B  {outcome}")

    def outcome(self, request: Request, ptype: PacketType | None, fields: list[str]) -> None:
        """Log how a request was answered (None: not yet)."""
        packet = request.packet
        if packet.type in self.QUIET_TYPES and not self.verbose_on:
            return
        user = request.session.name if request.session else user_named_in(packet)
        if ptype == PacketType.ERROR:
            said = f"refused: {fields[1]}"
        elif ptype == PacketType.OK:
            said = f"ok: {fields[-1]}" if packet.type in TEXT_REPLIES else "ok"
        else:
            said = fields[-1]
        self.line(request.address, user, packet.type.name, request.size, said)

    def verbose(self, request: Request, text: str) -> None:
        if self.verbose_on:
            self.line(request.address, user_named_in(request.packet), request.packet.type.name, request.size, text)

    def event(self, address: Address, user: str, text: str) -> None:
        self.line(address, user, "END", 0, text)

    def message(self, room: str, user: str, text: str) -> None:
        if not self.quiet:
            self.emit(f"{timestamp()} [{room}] {user}: {text!r}")

    def problem(self, text: str) -> None:
        """Log something wrong, at most PROBLEMS_PER_SECOND lines a second."""
        second = int(time.monotonic())
        if second != self.problem_second:
            if self.problems_this_second > self.PROBLEMS_PER_SECOND:
                hidden = self.problems_this_second - self.PROBLEMS_PER_SECOND
                self.emit(f"{timestamp()} [WARN] ... and {hidden} more problems not shown")
            self.problem_second, self.problems_this_second = second, 0
        self.problems_this_second += 1
        if self.problems_this_second <= self.PROBLEMS_PER_SECOND:
            self.emit(f"{timestamp()} [WARN] {text}")

    def trace(self, direction: str, data: bytes, address: Address, note: str = "") -> None:
        if self.verbose_on:
            described = describe_datagram(data) if data else ""
            self.emit(f"{timestamp()} [trace] {direction} {describe(address)} {described}{note}")


# Requests whose OK reply ends with a sentence for the user (the others carry data).
TEXT_REPLIES = {PacketType.REGISTER, PacketType.LOGIN, PacketType.JOIN, PacketType.SAY,
                PacketType.PRIVATE, PacketType.BYE}


def user_named_in(packet: Packet) -> str:
    """Return the username a REGISTER or LOGIN names, for the log ('' if none can be read)."""
    if packet.type not in (PacketType.REGISTER, PacketType.LOGIN):
        return ""
    try:
        return unpack_fields(packet.payload, 3)[1]
    except PacketError:
        return ""


class HistoryLog:
    """chat_history.txt: one JSON line per accepted message, appended and flushed."""

    def __init__(self, path: str):
        self.path = path
        torn = ends_inside_a_line(path)
        self.file = open(path, "a", encoding="utf-8", newline="\n")
        if torn:  # killed mid-write last time: end that line, so the next one stands alone
            self.file.write("\n")
            self.file.flush()

    def append(self, when: float, room: str, user: str, text: str) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                 "unix": round(when, 3), "room": room, "user": user, "text": text}
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.file.flush()  # in the OS's hands now: survives the server being killed

    def close(self) -> None:
        self.file.close()


def ends_inside_a_line(path: str) -> bool:
    """Does the file at `path` end without a final newline (a line torn by a crash)?"""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_history(path: str, room: str, keep: int, warn) -> collections.deque:
    """Return the last `keep` messages of `room` in the history file, skipping torn lines."""
    history = collections.deque(maxlen=keep)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().split("\n")
    except FileNotFoundError:
        return history
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if entry["room"] == room:
                history.append((float(entry["unix"]), entry["user"], entry["text"]))
        except (ValueError, KeyError, TypeError):
            warn(f"{path} line {number} is damaged (a crash mid-write?); skipped")
    return history


# --- The network layer ---------------------------------------------------------------------


def open_socket(host: str, port: int) -> socket.socket:
    """Return a UDP socket bound to (host, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if hasattr(socket, "SIO_UDP_CONNRESET"):
        # Windows: otherwise an ICMP "port unreachable" for an earlier send makes the
        # next recvfrom() raise ConnectionResetError (WinError 10054). We catch it too.
        sock.ioctl(socket.SIO_UDP_CONNRESET, False)
    try:  # room for bursts (200 members acknowledging at once); the OS may grant less
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    except OSError:
        pass
    sock.bind((host, port))
    return sock


class ServerLoop:
    """The one loop that owns the socket: receive, let ChatServer decide, send.

    It waits in select() for a datagram, a finished password check or the next timer,
    never longer than MAX_WAIT so that Ctrl+C is noticed promptly on Windows too.
    """

    def __init__(self, chat: ChatServer, sock):
        self.chat = chat
        self.sock = sock
        self.sock.setblocking(False)
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.address: Address = sock.getsockname()
        chat.discovery.port = self.address[1]  # the port clients are told of when they search
        self.worker = auth.PasswordWorker()
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.worker.wake_reader, selectors.EVENT_READ)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.closed = False

    def serve_forever(self) -> None:
        try:
            while not self.stopping.is_set():
                wait = min(max(self.chat.next_deadline() - time.monotonic(), 0.0), MAX_WAIT)
                ready = {key.fileobj for key, _ in self.selector.select(wait)}
                now = time.monotonic()
                if self.sock in ready:
                    self.receive_all(now)
                if self.worker.wake_reader in ready:
                    for future in self.worker.collect():
                        self.survive(self.finish_job, future, now, where="a finished password check")
                self.survive(self.chat.on_timers, now, where="the timers")
                self.flush()
        finally:
            self.close()

    def receive_all(self, now: float) -> None:
        for _ in range(RECEIVE_BATCH):
            try:
                # Into one reused buffer: a fresh 64 KB one per datagram, shrunk to size
                # afterwards, fragments the heap until memory grows without end.
                size, address = self.sock.recvfrom_into(self.buffer)
            except BlockingIOError:
                return  # nothing more to read
            except ConnectionResetError:
                # Windows reports "port unreachable" for an earlier sendto() this way;
                # it says nothing about the datagram we are reading, so read on.
                continue
            data = bytes(self.view[:size])
            self.survive(self.chat.handle_datagram, data, address, now, where="a datagram from", peer=address)
            self.flush()

    def finish_job(self, future, now: float) -> None:
        self.chat.finish_password_job(future.result(), now)

    def survive(self, work, *args, where: str, peer: Address | None = None) -> None:
        """Run `work(*args)`; if it raises, report the error and carry on.

        ChatServer validates everything a client sends, and the tests and fuzzers try hard
        to make it raise. Should a bug slip through anyway, one sender must not stop the
        chat for everyone: report it with its cause, as socketserver does, and go on.
        """
        try:
            work(*args)
        except Exception:  # the one place a server must survive its own bug
            if peer:
                where = f"{where} {describe(peer)}"
            self.chat.stats["internal-errors"] += 1
            self.chat.log.problem(f"internal error on {where}:\n{traceback.format_exc()}")

    def flush(self) -> None:
        """Send the outbox, and hand new password checks to the worker."""
        for data, address in self.chat.outbox:
            try:
                self.sock.sendto(data, address)
            except OSError as error:  # e.g. no route to that host: that client's problem
                self.chat.log.problem(f"sending to {describe(address)} failed: {error}")
        self.chat.outbox.clear()
        for job in self.chat.password_jobs:
            self.worker.submit(job)
        self.chat.password_jobs.clear()

    def start(self) -> "ServerLoop":
        """Serve on a background thread (for tests and the notebook)."""
        self.thread = threading.Thread(target=self.serve_forever, name="chat-server", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wait for the loop to finish; safe from any thread."""
        self.stopping.set()
        self.worker.wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def close(self) -> None:
        """Release the socket, the worker and the files; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.worker.close()
        self.selector.close()
        self.sock.close()
        self.chat.close()


def start_server(config: ServerConfig, log=print) -> ServerLoop:
    """Bind, and serve on a background thread; stop with `.stop()`."""
    chat = ChatServer(config, log)
    return ServerLoop(chat, wrap_socket(open_socket(config.host, config.port), config, chat)).start()


def wrap_socket(sock, config: ServerConfig, chat: ChatServer):
    """Return the socket, or a lossy one if --loss asks for it."""
    if not config.loss:
        return sock

    def on_drop(direction, data):
        chat.log.trace("LOST" if direction == "out" else "lost", data, ("simulated", 0), " (simulated loss)")

    return LossySocket(sock, config.loss, config.seed, on_drop, side="server")


# --- Starting from the command line ----------------------------------------------------------


def lan_addresses() -> list[str]:
    """Return this PC's IPv4 addresses other than loopback, read from its interfaces."""
    return list(dict.fromkeys(interface.address for interface in local_interfaces()))


def server_name(text: str) -> str:
    """Check --name: printable, and short enough that FIND's answer stays smaller than a FIND."""
    if len(text.encode("utf-8")) > MAX_NAME_BYTES or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable and at most {MAX_NAME_BYTES} bytes of UTF-8")
    return text


def parse_args(argv: list[str]) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        description="UDP chat room server. Clients connect with: python client.py",
        epilog="The xor and caesar ciphers are teaching toys: anyone on the network who "
               "captures the traffic can read it. Passwords are stored only as salted PBKDF2 hashes.",
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=defaults.port, help="UDP port (default: %(default)s)")
    parser.add_argument("--data-dir", default=defaults.data_dir,
                        help="folder for users.json and chat_history.txt (default: chat_data beside server.py)")
    parser.add_argument("--room-password", default=defaults.room_password,
                        help="password of the lobby room (default: %(default)s)")
    parser.add_argument("--cipher", choices=CIPHER_NAMES, default=defaults.cipher,
                        help="toy cipher for packet payloads; must match the clients' (default: %(default)s)")
    parser.add_argument("--key", help="cipher key; must match the clients' (default: the cipher's built-in key)")
    parser.add_argument("--quiet", action="store_true", help="log only problems, not every action")
    parser.add_argument("--verbose", action="store_true", help="also log heartbeats and trace every packet")
    parser.add_argument("--loss", type=float, default=0.0,
                        help="simulate a lossy network: drop this share of datagrams, e.g. 0.3")
    parser.add_argument("--seed", type=int, help="random seed for --loss, to drop the same datagrams each run")
    parser.add_argument("--session-timeout", type=float, default=defaults.session_timeout,
                        help="seconds of silence before a client is considered gone (default: %(default)s)")
    parser.add_argument("--name", type=server_name, default=defaults.name,
                        help="the name clients see when they search the network with ? (default: this PC's name)")
    args = parser.parse_args(argv)
    if not 0 <= args.loss < 1:
        parser.error("--loss must be at least 0 and below 1")
    return ServerConfig(**vars(args))  # every option is named as its ServerConfig field


def print_banner(config: ServerConfig, address: Address, name: str) -> None:
    port = address[1]
    everywhere = config.host in ("0.0.0.0", "")
    addresses = lan_addresses() if everywhere else [config.host]
    print(f"UDP chat server listening on {describe(address)}")
    if addresses:
        print(f"Clients on other PCs answer:  Server IP {' or '.join(addresses)}   port {port}")
    else:
        print("Clients on other PCs: this PC has no network address (is it connected?); "
              "check with ipconfig or 'ip addr'")
    print(f"Clients on this PC answer:    Server IP 127.0.0.1   port {port}")
    if everywhere:  # a socket bound to one address hears no broadcasts
        print(f"Clients who answer ? at the Server IP prompt find this server as: {name}")
    print(f"Lobby room password: {config.room_password}")
    print(f"Cipher: {config.cipher} (a teaching toy, not real security; clients must use the same)")
    print(f"Accounts and history kept in: {config.data_dir}")
    print("Press Ctrl+C to stop.")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # a legacy Windows code page must not crash the log
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        try:
            chat = ChatServer(config)
        except (ValueError, OSError) as error:  # a bad key, a damaged or unwritable data folder
            print(f"[ERROR] {error}")
            return 1
        try:
            sock = wrap_socket(open_socket(config.host, config.port), config, chat)
        except OSError as error:
            chat.close()
            print(f"[ERROR] Cannot listen on {config.host}:{config.port}: {error.strerror or error}. "
                  "Is another server running there? Choose another port with --port.")
            return 1
        loop = ServerLoop(chat, sock)
        try:
            print_banner(config, loop.address, chat.discovery.name)
            loop.serve_forever()
        finally:
            loop.close()
    except KeyboardInterrupt:  # Ctrl+C, at any moment: the normal way to stop
        pass
    print("[INFO] Server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
