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
  network, FIND), `FileRelay` (files stored, then relayed to each receiver on its own
  file stream), `ServerLog`, `HistoryLog`, and `PasswordWorker`,
  the thread that runs the slow password hash so that a flood of logins never stalls
  the chat. Only the loop's thread changes any state.

A SAY datagram, as it leaves a client (XOR-scrambled payload, readable header):

    55 43 04 05 00 00 00 07  00 00 00 07 00 00 00 02   "UC" v4 SAY flags=0 len=7 seq=7 ack=2
    00 00 00 00 3e 1a 2c 5e  5e 77 90 12 d5 41 e2 e8   sack=0, token, CRC-32, then the payload:
    49 4c 5a 58 12 0a 60                               [5]"hi :)" XORed with the key "II2120"

The packet format and the channel are defined once, in encryption_helper.py; accounts in auth.py.
"""

import argparse
import calendar
import collections
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import hmac
import os
import re
import secrets
import selectors
import socket
import sys
import threading
import time
import traceback

import auth
from auth import MAX_NAME_BYTES, AbuseControl, Discovery, Reception, Refusal
from encryption_helper import (
    ACK_DELAY,
    DEFAULT_CIPHER,
    FILL,
    FLAG_FILE_STREAM,
    LOBBY,
    MAX_FILE_NAME_BYTES,
    MAX_PAYLOAD,
    MB,
    NO_TOKEN,
    RECV_BUFFER,
    SHA_HEX,
    Address,
    Body,
    Channel,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    add_shared_options,
    chunk_length,
    decode_packet,
    describe_address,
    describe_datagram,
    describe_size,
    local_interfaces,
    make_cipher,
    oversize_text,
    pack_chunk,
    pack_fields,
    port_number,
    prepare_body,
    unpack_chunk,
    unpack_fields,
    whole_number,
)

HISTORY_FILE = "chat_history.txt"
USERS_FILE = "users.json"
ROOMS_FILE = "rooms.json"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_data")
DEFAULT_MAX_FILE_MB = 20  # the largest file a member may send, unless --max-file-mb says
HISTORY_ON_JOIN = 20  # past messages shown to whoever joins a room
MAX_BACKLOG = 100  # a member's requests held by flood control; past that they are refused
MAX_WAIT = 0.5  # seconds the loop may sleep: on Windows, Ctrl+C waits for select() to return
RECEIVE_BUFFER_BYTES = 4 << 20  # the kernel's queue for our socket, asked for, not promised
RECEIVE_BATCH = 256  # datagrams read per wake-up, so timers still run during a flood
HOUSEKEEPING_EVERY = 1.0  # seconds between sweeps for silent sessions
STOP_GRACE = 2.0  # seconds a stopping server waits for its members to hear that it stops


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
    verbose: bool = False  # also log heartbeats, HELLO, FIND, ROOMS and WHO, and trace every packet
    loss: float = 0.0  # drop this share of datagrams in and out, to watch recovery
    seed: int | None = None  # makes --loss drop the same datagrams every run
    # A client sends a heartbeat after 5 s of quiet; six missed in a row means it is gone.
    session_timeout: float = 30.0
    kdf_iterations: int = auth.DEFAULT_ITERATIONS  # tests lower it: they need no slow hash
    name: str = ""  # what clients searching the network (FIND) are told; "": this PC's host name
    max_file_mb: float = DEFAULT_MAX_FILE_MB  # the largest file a member may send; larger is refused


# --- State -----------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """A logged-in member, known by address and proven by the token it carries."""

    token: bytes
    address: Address
    name: str
    channel: Channel  # the reliable channel to this member's client
    bucket: "auth.TokenBucket"  # flood control
    last_heard: float
    room: str | None = None  # key of the room in ChatServer.rooms
    backlog: collections.deque = dataclasses.field(default_factory=collections.deque)  # requests held
    news: list = dataclasses.field(default_factory=list)  # EVENT bodies, sent after the current reply
    wake_at: float = float("inf")  # when Delivery next looks at this session
    checking: bool = False  # a password check for its JOIN is running: later requests wait
    file_stream: Channel | None = None  # the second channel, for file chunks (FLAG_FILE_STREAM)

    @classmethod
    def start(cls, name: str, address: Address, cipher, bucket, now: float) -> "Session":
        """A new session: a random token, and its two channels (clients delay their ACKs)."""
        token = secrets.token_bytes(8)
        chat = Channel(cipher, token, rto=RtoEstimator(peer_ack_delay=ACK_DELAY))
        files = Channel(cipher, token, rto=RtoEstimator(peer_ack_delay=ACK_DELAY), flags=FLAG_FILE_STREAM)
        return cls(token, address, name, chat, bucket, now, file_stream=files)


@dataclasses.dataclass
class Room:
    name: str
    record: dict | None  # its password, salted and hashed (auth.py), and when it was made; None for the lobby
    members: dict = dataclasses.field(default_factory=dict)  # lower-case name -> Session
    history: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=HISTORY_ON_JOIN))

    @property
    def made(self) -> float:
        return self.record.get("created", 0.0) if self.record else 0.0  # rooms.json before v4: 0

    def quiet_since(self) -> float:
        """Return when something was last said in the room, or when it was made."""
        return max(self.made, self.history[-1][0] if self.history else 0.0)


@dataclasses.dataclass
class Request:
    """One packet to handle, with what the handlers need to know about it."""

    packet: Packet
    address: Address
    size: int  # bytes received: an unproven sender never gets more back
    now: float
    session: Session | None = None  # None: a stranger (HELLO, REGISTER, LOGIN)
    proven: bool = False  # the sender showed it is really at its address (cookie or token)


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
        in_data_dir = functools.partial(os.path.join, config.data_dir)
        self.users = auth.UserStore(in_data_dir(USERS_FILE), config.kdf_iterations)
        # Shared state, changed only by the loop's thread:
        self.sessions: dict[Address, Session] = {}  # address -> session
        self.online: dict[str, Session] = {}  # lower-case user name -> session
        self.guard = AbuseControl()
        self.delivery = Delivery()
        rooms_on_file = auth.UserStore(in_data_dir(ROOMS_FILE), config.kdf_iterations, kind="rooms")
        self.rooms = Rooms(rooms_on_file, self.cipher, self.delivery, wall_clock)
        self.rooms.load_history(HistoryLog.read(in_data_dir(HISTORY_FILE), self.log.problem))
        self.history = HistoryLog(in_data_dir(HISTORY_FILE))
        self.next_housekeeping = 0.0
        self.stopping = False  # the server is stopping: it only waits for members to hear so
        self.outbox: list[tuple[bytes, Address]] = []  # datagrams for the network layer to send
        self.password_jobs: list[auth.PasswordJob] = []  # checks for the network layer to run
        self.stats = collections.Counter()
        self.reception = Reception(self)
        self.discovery = Discovery(self)
        self.files = FileRelay(self, config.max_file_mb)
        self.handlers = handler_table(self, self.reception)

    # --- Entry points: a datagram, a finished password check, the time ---

    def handle_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from `address`. Nothing it contains can raise out of here."""
        self.stats["datagrams"] += 1
        self.log.trace("in ", data, address)
        try:
            packet = decode_packet(data, self.cipher)
        except PacketError as error:
            self.reception.refuse_datagram(data, address, error)
        else:
            request = Request(packet, address, len(data), now)
            if packet.type in STRANGER_TYPES and packet.token == NO_TOKEN:
                if self.stopping:
                    return  # no new sessions now: the client tries again, and finds the server restarted

                self.reception.handle_stranger(request)
            else:
                self.handle_member_packet(request)
        self.flush(now)

    def finish_password_job(self, job: "auth.PasswordJob", now: float) -> None:
        """A password check the worker finished: answer its request, then serve what waited."""
        request, request.now, session = job.request, now, job.request.session
        self.guard.hash_finished(request.address[0])
        current = session is None or (self.sessions.get(session.address) is session and not self.stopping)
        try:
            if current:  # not a session ended meanwhile; nor after EVENT stop: the client sends it again
                self.answer(request, run_handler(self.reception.finish_check, job))
        finally:  # even if a bug raised: the member's next requests must not wait for ever
            if session:
                session.checking = False
        if session:
            self.serve_backlog(session, now)
        self.flush(now)

    def on_timers(self, now: float) -> None:
        """Resend what the channels want resent, serve held requests, end silent sessions."""
        for session in self.delivery.due(now):
            if self.sessions.get(session.address) is session:
                self.delivery.touch(session)
                self.serve_backlog(session, now)
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_EVERY
            self.log.end_of_second()  # a flood's count of problems not shown: said now, not at the next
            for session in list(self.sessions.values()):
                if now - session.last_heard > self.config.session_timeout:
                    self.end_session(session, "timed out", now)
            self.files.expire(now)
        self.flush(now)

    def next_deadline(self) -> float:
        return min(self.delivery.next_deadline(), self.next_housekeeping)  # when on_timers has work

    def announce_stop(self, now: float) -> None:
        """The server is stopping: tell every member, and take no more requests."""
        self.stopping = True
        for session in self.sessions.values():
            session.backlog.clear()  # never handled: the client sends them again after the restart
            self.delivery.push(session, self.rooms.event("stop", "", session.name, "The server was stopped."))
        self.flush(now)

    def stop_heard(self) -> bool:
        """Has every member acknowledged all it was sent, the stop included?"""
        return all(session.channel.idle() for session in self.sessions.values())

    # --- Dispatch ---

    def handle_member_packet(self, request: Request) -> None:
        """A packet on a member's channel: acknowledgements first, then requests in order."""
        packet, address = request.packet, request.address
        session = self.sessions.get(address)
        if session is None or not hmac.compare_digest(session.token, packet.token):
            self.reception.refuse_unknown_session(request, session)
            return
        session.last_heard = request.now
        if packet.flags & FLAG_FILE_STREAM:  # the file stream: its own numbers, its own acknowledgements
            self.files.receive_stream(session, packet, request.now)
            return
        outcome, ready = session.channel.receive(packet, request.now)
        if outcome != "in order":
            self.log.trace("   ", b"", address, f" {packet.type.name} seq={packet.seq}: {outcome}")
        for delivered in ready:
            if not delivered.seq or self.stopping:
                continue  # an unnumbered ACK; or too late: the client sends it again after the restart
            held = Request(delivered, address, request.size, request.now, session, proven=True)
            if len(session.backlog) < MAX_BACKLOG + (delivered.type == PacketType.BYE):  # room kept for a goodbye
                session.backlog.append(held)
            else:  # a real flood: refuse rather than hold without end
                self.answer(held, Refusal("slow-down", "Slow down: too many messages at once; not sent."))
        self.delivery.touch(session)  # first: its replies go out before the EVENTs they cause
        self.serve_backlog(session, request.now)

    def serve_backlog(self, session: Session, now: float) -> None:
        """Handle the member's requests in order; flood control may hold the rest for later."""
        while session.backlog and not session.checking and self.sessions.get(session.address) is session:
            request = session.backlog[0]
            if request.packet.type in FLOOD_CONTROLLED:
                wait = session.bucket.take(now)
                if wait:
                    self.delivery.wake(session, now + wait)  # served then, in its turn
                    return
            session.backlog.popleft()
            request.now = now
            self.handle_request(request)

    def handle_request(self, request: Request) -> None:
        """Run the packet type's handler, and answer with what it returns."""
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
        self.reception.answer_stranger(request, Packet(ptype, 0, request.packet.seq, 0, token or request.packet.token,
                                                      0, payload))

    def send(self, data: bytes, address: Address, note: str = "") -> None:
        self.log.trace("out", data, address, note)
        self.outbox.append((data, address))

    # --- Member requests: each returns the OK fields or raises Refusal ---

    def handle_join(self, request: Request) -> list[str] | None:
        session = request.session
        name, password = unpack_fields(request.packet.payload, 2)
        if not auth.valid_username(name):
            raise Refusal("bad-name", "Room names are 1-20 letters, digits, '_', '.' or '-'.")
        room = self.rooms.get(name.lower())
        if room and session.room == name.lower():
            return [room.name, str(len(room.members)), f"You are in {room.name} already."]
        self.guard.check("wrong room passwords", room_guesser(request), request.now)
        if room is None:
            self.rooms.make_room_for_one(self.guard.MAX_ROOMS)
            self.reception.start_password_job(auth.PasswordJob(request, name, password, None, self.users.iterations))
        elif room.record is None:  # the lobby: its password is the one given on the command line
            matches = hmac.compare_digest(password.encode(), self.config.room_password.encode())
            return self.enter_room(request, room, matches)
        else:  # a room's password is hashed like an account's, so checking it is slow too
            self.reception.start_password_job(auth.PasswordJob(request, name, password, room.record))
        return None

    def finish_join(self, job: "auth.PasswordJob") -> list[str] | None:
        """The password check of a JOIN came back: enter the room, or make it."""
        request, room = job.request, self.rooms.get(job.name.lower())
        if job.record is not None and room is not None and room.record is job.record:
            return self.enter_room(request, room, job.result)
        if room is not None:
            raise Refusal("taken", f"{room.name} was made a moment ago; /join it with its password.")
        self.rooms.make_room_for_one(self.guard.MAX_ROOMS)
        try:
            room = self.rooms.create(job.result)  # on disk before we say so
        except OSError as error:
            self.log.problem(f"could not save {ROOMS_FILE}: {error}")
            raise Refusal("server-error", "The server could not save the room; try again.") from None
        return self.enter_room(request, room, True, " (new room)")

    def enter_room(self, request: Request, room: Room, password_ok: bool, created: str = "") -> list[str]:
        if not password_ok:
            self.guard.count("wrong room passwords", room_guesser(request), request.now)
            self.guard.check("wrong room passwords", room_guesser(request), request.now)  # the last: say so now
            raise Refusal("wrong-room-password", "Wrong room password.")
        self.rooms.move(request.session, room)
        return [room.name, str(len(room.members)), f"joined {room.name}{created}, {len(room.members)} here"]

    def handle_say(self, request: Request) -> list[str]:
        session = request.session
        (text,) = unpack_fields(request.packet.payload, 1)
        room = self.rooms.of(session)
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
        self.rooms.of(request.session)  # the room password is the way into the chat: private messages too
        target = find_member(self.online, self.users, target_name)
        check_text(text)
        self.delivery.push(target, self.rooms.event("private", "", request.session.name, text))
        return [f"private to {target.name}"]

    def handle_rooms(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        pairs = [[room.name, str(len(room.members))] for room in self.rooms.values()]
        return fit_fields([field for pair in pairs for field in pair], step=2)

    def handle_who(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        room = self.rooms.of(request.session)
        return fit_fields([room.name] + sorted(member.name for member in room.members.values()))

    def handle_bye(self, request: Request) -> list[str]:
        unpack_fields(request.packet.payload, 0)
        self.end_session(request.session, "", request.now)
        return ["goodbye"]

    # --- Sessions ---

    def open_session(self, name: str, address: Address, now: float) -> Session:
        session = Session.start(name, address, self.cipher, self.guard.new_bucket(now), now)
        self.sessions[address] = session
        self.online[name.lower()] = session
        return session

    def end_session(self, session: Session, reason: str, now: float, tell: str = "") -> None:
        """Forget a session; its room hears that the user left, and why.

        Its channel is sent once more (the goodbye after a BYE, or the EVENT `tell`), then
        never: a client that missed it asks again, is told RESET, and takes that as the end.
        """
        if self.sessions.get(session.address) is not session:
            return  # ended already
        if tell:
            self.delivery.push(session, self.rooms.event(tell, "", session.name, reason))
        del self.sessions[session.address]
        del self.online[session.name.lower()]
        session.backlog.clear()
        self.files.drop(session)
        if session.room:
            self.rooms.leave(session, reason)
        self.delivery.touch(session)
        if reason:  # after a BYE, its own line says goodbye
            self.log.event(session.address, session.name, f"session ended: {reason}")

    def flush(self, now: float) -> None:
        """Send what the touched sessions' channels have for the wire: replies, then EVENTs."""
        while self.delivery.touched:  # again while ending a session told its room something
            self.files.pump([s for s in self.delivery.touched.values() if self.sessions.get(s.address) is s], now)
            for session in self.delivery.flush(now, self.outbox, self.log.trace):
                if self.sessions.get(session.address) is session:  # fell too far behind, or gave up
                    reason = "not responding" if session.channel.failed else "too slow"
                    self.log.problem(f"{session.name} at {describe_address(session.address)}: {reason}; session ended")
                    self.end_session(session, reason, now)

    def close(self) -> None:
        self.history.close()
        self.files.close_all()


# Packet types a stranger may send; every other type needs a session.
STRANGER_TYPES = {PacketType.HELLO, PacketType.REGISTER, PacketType.LOGIN, PacketType.FIND}
# Requests that flood control counts: messages.
FLOOD_CONTROLLED = {PacketType.SAY, PacketType.PRIVATE, PacketType.FILE_OFFER}  # each tells others something

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
        PacketType.PING: answer_ping,
        PacketType.BYE: chat.handle_bye,
        PacketType.ACK: refuse_numbered_ack,
        PacketType.FIND: chat.discovery.handle_find,
        PacketType.FILE_OFFER: chat.files.handle_offer,
        PacketType.FILE_CHUNK: chat.files.refuse_chunk,
        PacketType.FILE_CANCEL: chat.files.handle_cancel,
        PacketType.OK: door.refuse_server_only,
        PacketType.ERROR: door.refuse_server_only,
        PacketType.EVENT: door.refuse_server_only,
        PacketType.RESET: door.refuse_server_only,
    }


def answer_ping(request: Request) -> list[str]:
    unpack_fields(request.packet.payload, 0)  # a heartbeat: "still here", with nothing more
    return []


def refuse_numbered_ack(request: Request) -> None:
    raise Refusal("bad-request", "An ACK carries no sequence number.")  # an ACK numbered is not one


def run_handler(handler, *args):
    """Run a handler; return its OK fields, None (no answer yet), or the Refusal."""
    try:
        return handler(*args)
    except Refusal as refusal:
        return refusal
    except PacketError as error:
        return Refusal("bad-request", str(error))


def find_member(online: dict, users: "auth.UserStore", name: str) -> Session:
    """Return the session of the user named; refuse if there is no such user, or not online."""
    if name.lower() in online:
        return online[name.lower()]
    if users.exists(name):
        raise Refusal("not-online", f"{name} is not online.")
    raise Refusal("unknown-user", "No such user.")  # the name may be anything: never echoed


def room_guesser(request: Request) -> tuple[str, str]:
    """Who wrong room passwords are counted for: the account on its PC (a new login starts
    no new count; other accounts on that PC are not locked out with it)."""
    return request.address[0], request.session.name.lower()


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


def timestamp() -> str:
    return time.strftime("%H:%M:%S")


# --- Helper classes: one job each --------------------------------------------------------


class Rooms(dict):
    """The rooms by lower-case name, with their members; and telling members what happens.

    A dict, so `rooms[key]` finds a room. Whoever enters a room is shown its last
    messages, and the others hear of it; whoever leaves, the same. Rooms are kept in
    rooms.json, so that a restart loses none, nor lets anyone take one with a new password.
    """

    def __init__(self, store: "auth.UserStore", cipher, delivery: "Delivery", wall_clock):
        super().__init__({LOBBY: Room(LOBBY, None)})
        self.update((key, Room(record["name"], record)) for key, record in store.records.items() if key != LOBBY)
        self.store, self.cipher, self.delivery, self.wall_clock = store, cipher, delivery, wall_clock

    def load_history(self, messages) -> None:
        """Keep the last messages of each room from (unix time, room, user, text) on file.

        A room forgotten when the server was full leaves its lines in the file: one made
        later with that name starts without them, however its password was chosen.
        """
        for when, room, user, text in messages:
            if room.lower() in self and when >= self[room.lower()].made:
                self[room.lower()].history.append((when, user, text))

    def of(self, session: Session) -> Room:
        """Return the member's room; refuse if it is in none."""
        if session.room is None:
            raise Refusal("not-in-room", "Join a room first: /join ROOM")
        return self[session.room]

    def make_room_for_one(self, limit: int) -> None:
        """Before a room is made: if there are `limit` already, forget the one quiet longest
        that nobody is in; if every one is in use, refuse."""
        if len(self) < limit:
            return
        empty = [room for key, room in self.items() if key != LOBBY and not room.members]
        if not empty:
            raise Refusal("full", "Server full: no more rooms can be made.")
        quietest = min(empty, key=Room.quiet_since)
        try:
            self.store.remove(quietest.name)
        except OSError:
            raise Refusal("server-error", f"The server could not save {ROOMS_FILE}; try again.") from None
        del self[quietest.name.lower()]

    def create(self, record: dict) -> Room:
        record = {**record, "created": int(self.wall_clock())}  # whole seconds, as the history's
        self.store.add(record)
        room = self[record["name"].lower()] = Room(record["name"], record)
        return room

    def move(self, session: Session, room: Room) -> None:
        if session.room:
            self.leave(session, f"went to {room.name}")  # not gone: the others should know
        self.enter(session, room)

    def enter(self, session: Session, room: Room) -> None:
        others = list(room.members.values())
        room.members[session.name.lower()] = session
        session.room = room.name.lower()
        for when, user, text in room.history:
            self.delivery.push(session, self.event("history", room.name, user, text, when=when))
        self.tell(others, self.event("join", room.name, session.name, ""))

    def leave(self, session: Session, reason: str) -> None:
        room = self[session.room]
        del room.members[session.name.lower()]
        session.room = None
        self.publish(room, "leave", session.name, reason)

    def publish(self, room: Room, kind: str, user: str, text: str, exclude=None) -> None:
        """Tell every member of `room` (but `exclude`) what `user` did or said."""
        self.tell([member for member in room.members.values() if member is not exclude],
                  self.event(kind, room.name, user, text))

    def tell(self, members, body: Body) -> None:
        for member in members:  # one body, prepared once for them all
            self.delivery.push(member, body)

    def event(self, kind: str, room: str, user: str, text: str, *more, when: float | None = None) -> Body:
        """Return an EVENT's payload [kind, unix time, room, user, text, *more], ready for the wire.

        Every EVENT has the five fields; one about a file adds its own (its id, name...).
        """
        when = self.wall_clock() if when is None else when
        return prepare_body(pack_fields(kind, str(int(when)), room, user, text, *map(str, more)), self.cipher)


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
            for stream in (channel, session.file_stream):  # the chat's first: a line never waits for a chunk
                for data in stream.poll(now):
                    trace("out", data, session.address)
                    outbox.append((data, session.address))
            if channel.failed or session.file_stream.failed:
                to_end.append(session)
            else:
                self.wake(session, min(channel.next_wakeup(), session.file_stream.next_wakeup()))
        return to_end


class ServerLog:
    """Every action on one line: time, peer, user, packet type, size, outcome."""

    PROBLEMS_PER_SECOND = 20  # log lines about bad packets: a flood must not flood the log
    # Plumbing, logged only with --verbose: heartbeats (40 students: 8 lines a second), the
    # cookie each login asks for first, searches of the network, and questions that change
    # nothing (a window asks ROOMS and WHO whenever someone comes or goes).
    QUIET_TYPES = {PacketType.PING, PacketType.HELLO, PacketType.FIND, PacketType.ROOMS, PacketType.WHO}

    def __init__(self, emit, quiet: bool = False, verbose: bool = False):
        self.emit, self.quiet, self.verbose_on = emit, quiet, verbose
        self.problem_second, self.problems_this_second = 0, 0

    def line(self, address: Address, user: str, what: str, size: int, outcome: str) -> None:
        if not auth.valid_username(user or "-"):  # a stranger's name may hold anything
            user = repr(user[:20])
        if not self.quiet:
            peer = describe_address(address)
            self.emit(f"{timestamp()} {peer:>21} {user or '-':<12} {what:<8} {size:>4} B  {outcome}")

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

    def event(self, address: Address, user: str, text: str, what: str = "END") -> None:
        """Log what happened to a session (END) or a file (FILE), not the answer to a request."""
        self.line(address, user, what, 0, text)

    def message(self, room: str, user: str, text: str) -> None:
        if not self.quiet:
            self.emit(f"{timestamp()} [{room}] {user}: {text!r}")

    def problem(self, text: str) -> None:
        """Log something wrong, at most PROBLEMS_PER_SECOND lines a second."""
        self.end_of_second()
        self.problems_this_second += 1
        if self.problems_this_second <= self.PROBLEMS_PER_SECOND:
            self.emit(f"{timestamp()} [WARN] {text}")

    def end_of_second(self) -> None:
        """Once a second of problems is over, say how many of them were not shown."""
        second = int(time.monotonic())
        if second == self.problem_second:
            return
        if self.problems_this_second > self.PROBLEMS_PER_SECOND:
            hidden = self.problems_this_second - self.PROBLEMS_PER_SECOND
            self.emit(f"{timestamp()} [WARN] ... and {hidden} more problems in the second before, not shown")
        self.problem_second, self.problems_this_second = second, 0

    def trace(self, direction: str, data: bytes, address: Address, note: str = "") -> None:
        if self.verbose_on:
            described = describe_datagram(data) if data else ""
            self.emit(f"{timestamp()} [trace] {direction} {describe_address(address)} {described}{note}")


# Requests whose OK reply ends with a sentence for the user (the others carry data).
TEXT_REPLIES = {PacketType.REGISTER, PacketType.LOGIN, PacketType.JOIN, PacketType.SAY,
                PacketType.PRIVATE, PacketType.BYE}


def user_named_in(packet: Packet) -> str:
    """Return the username a REGISTER or LOGIN names, for the log ('' if none can be read)."""
    if packet.type not in (PacketType.REGISTER, PacketType.LOGIN):
        return ""
    try:
        fields = unpack_fields(packet.payload)  # [cookie, name, password] and maybe "rejoin"
    except PacketError:
        return ""
    return fields[1] if len(fields) >= 3 else ""


class HistoryLog:
    """chat_history.txt: one line a person can read per accepted message, appended and flushed.

        2026-12-01 07:46:05 UTC  #lobby  alice: two lines:\\nthe second

    A backslash or line break in a message is written escaped (`\\\\`, `\\n`, `\\r`), so each
    message stays one line and reads back exactly as it was said.
    """

    LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC  #(\S+)  (\S+?): (.*)")
    ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}

    def __init__(self, path: str):
        self.path = path
        torn = ends_inside_a_line(path)
        self.file = open(path, "a", encoding="utf-8", newline="\n")
        if torn:  # killed mid-write last time: end that line, so the next one stands alone
            self.file.write("\n")
            self.file.flush()

    def append(self, when: float, room: str, user: str, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
        escaped = "".join(self.ESCAPES.get(c, c) for c in text)
        self.file.write(f"{stamp} UTC  #{room}  {user}: {escaped}\n")
        self.file.flush()  # in the OS's hands now: survives the server being killed

    @classmethod
    def read(cls, path: str, warn=print):
        """Yield (unix time, room, user, text) for each message on file; warn of damaged lines."""
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                for number, line in enumerate(file, 1):
                    found = cls.LINE.fullmatch(line.rstrip("\n"))
                    if found:
                        stamp, room, user, text = found.groups()
                        when = calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
                        yield float(when), room, user, re.sub(r"\\(.)", cls.unescape, text)
                    elif line.strip():
                        warn(f"{path} line {number} is damaged (a crash mid-write?); skipped")
        except FileNotFoundError:
            return

    @staticmethod
    def unescape(found: re.Match) -> str:
        return {"n": "\n", "r": "\r"}.get(found[1], found[1])

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


# Files: a FILE_OFFER's upload is stored in DATA_DIR/transfers/ID.part, checked, and
# relayed to each receiver from that file as its file stream has room (client.py's
# files section tells the whole story, sender to receiver).

@dataclasses.dataclass(eq=False)
class Upload:
    """A file coming in from its sender, kept in a temporary file until every receiver has it."""

    id: int
    sender: object  # the sender's server.Session
    name: str
    size: int
    sha256: str
    path: str  # DATA_DIR/transfers/ID.part
    writer: object  # the temporary file, written as chunks come
    reader: object  # the same file, read for each receiver
    receivers: dict = dataclasses.field(default_factory=dict)  # id(session) -> Receiver, until done or gone
    received: int = 0
    last_progress: float = 0.0  # when a byte last came (the server's clock)
    checked: bool = False  # every byte is in, and the SHA-256 matched
    digest: object = dataclasses.field(default_factory=hashlib.sha256)


@dataclasses.dataclass(eq=False)
class Receiver:
    """Where one receiver is in one file: what has gone into its file stream."""

    session: object  # server.Session
    upload: Upload
    offer_seq: int  # the "file" EVENT's number on its chat channel: no chunk goes before it arrives
    sent: int = 0  # bytes put into its file stream
    last_seq: int = 0  # the file stream's number of the last chunk put in


class FileRelay:
    """The server's part in sending files: offers, uploads to disk, relaying to each receiver.

    Chunks go to a receiver only after it has acknowledged the "file" EVENT (the two
    streams are independent, so a chunk could otherwise overtake its offer), and only
    while its file stream holds fewer than FILL waiting: the relay buffers nothing itself.
    """

    # A member may send a few files at once; more would only share the same bandwidth.
    MAX_PER_MEMBER = 3
    # Files in transfer on the whole server: with --max-file-mb 20, at most 400 MB of disk.
    MAX_TRANSFERS = 20
    # An upload that gains no byte for this long is cancelled, so that offers never sent
    # cannot hold the server's places (and its files) for ever.
    IDLE_LIMIT = 60.0

    def __init__(self, chat, max_file_mb: float = DEFAULT_MAX_FILE_MB):
        self.chat = chat
        self.max_file_mb = max_file_mb
        self.limit = int(max_file_mb * MB)
        self.folder = os.path.join(chat.config.data_dir, "transfers")
        self.uploads: dict[int, Upload] = {}  # transfer id -> upload
        self.next_id = 1
        self.clear_folder()

    def clear_folder(self) -> None:
        """Delete what a crash left in the transfers folder: files never completed."""
        os.makedirs(self.folder, exist_ok=True)
        for name in os.listdir(self.folder):
            if name.endswith(".part"):
                os.remove(os.path.join(self.folder, name))

    # --- Requests: FILE_OFFER and FILE_CANCEL, on a member's chat channel ---

    def handle_offer(self, request) -> list[str]:
        """FILE_OFFER [to, name, size, SHA-256] -> OK [id]; refused before any byte is sent."""
        session = request.session
        to, name, size, sha = unpack_fields(request.packet.payload, 4)
        size = self.check_offer(session, name, size, sha)
        members = self.receivers_for(session, to)
        upload = self.open_upload(session, name, size, sha, request.now)
        self.log_file(upload, f"offered to {to or 'the room'}, {describe_size(size)}")
        for member in members:
            self.offer_to(upload, member)
        if size == 0:
            self.upload_complete(upload)
        return [str(upload.id)]

    def check_offer(self, session, name: str, size: str, sha: str) -> int:
        """Return the offered size; refuse a file too big, a bad offer, or one too many."""
        if not whole_number(size) or not SHA_HEX.fullmatch(sha) or not name or len(name.encode()) > MAX_FILE_NAME_BYTES:
            raise Refusal("bad-request", "A file offer is [to, name (1-255 bytes), size, SHA-256 in hex].")
        if int(size) > self.limit:
            raise Refusal("too-big", self.too_big(int(size)))
        if sum(upload.sender is session for upload in self.uploads.values()) >= self.MAX_PER_MEMBER:
            raise Refusal("too-many", f"You are sending {self.MAX_PER_MEMBER} files already; wait for one to finish.")
        if len(self.uploads) >= self.MAX_TRANSFERS:
            raise Refusal("busy", "The server is busy with other files; try again in a while.")
        return int(size)

    def too_big(self, size: int) -> str:
        """Say by how much a file is over the limit: in bytes, if in MB the two look the same."""
        if describe_size(size) == describe_size(self.limit):
            return f"That file is {size:,} bytes; the limit is {self.max_file_mb:g} MB ({self.limit:,} bytes)."
        return f"That file is {describe_size(size)}; the limit is {self.max_file_mb:g} MB."

    def receivers_for(self, session, to: str) -> list:
        """Return who gets the file: the user named, or everyone else in the sender's room."""
        room = self.chat.rooms.of(session)  # a file too needs the way into the chat: a room's password
        if not to:
            others = [m for m in room.members.values() if m is not session]
            if not others:
                raise Refusal("nobody", "Nobody else is in the room to share it with.")
            return others
        member = find_member(self.chat.online, self.chat.users, to)
        if member is session:
            raise Refusal("to-self", "That is you; send it to someone else.")
        return [member]

    def open_upload(self, session, name: str, size: int, sha: str, now: float) -> Upload:
        number, self.next_id = self.next_id, self.next_id + 1
        path = os.path.join(self.folder, f"{number}.part")
        writer = None
        try:
            writer = open(path, "wb", buffering=0)  # unbuffered: what is written can be read back at once
            reader = open(path, "rb")
        except OSError as error:  # the disk, or too many files open
            if writer:
                writer.close()
                with contextlib.suppress(OSError):  # else the next start's clear_folder deletes it
                    os.remove(path)
            self.chat.log.problem(f"cannot open {path}: {error}")
            raise Refusal("server-error", "The server cannot store files now; try again later.") from None
        upload = Upload(number, session, name, size, sha, path, writer, reader, last_progress=now)
        self.uploads[number] = upload
        return upload

    def offer_to(self, upload: Upload, member) -> None:
        """Send a receiver the "file" EVENT; remember its number, to know when it has arrived."""
        text = f"{upload.sender.name} is sending {upload.name} ({describe_size(upload.size)})"
        room = self.chat.rooms.of(member).name if member.room else ""
        body = self.chat.rooms.event("file", room, upload.sender.name, text, upload.id, upload.name, upload.size,
                                     upload.sha256)
        seq = member.channel.send(PacketType.EVENT, body)
        if not seq:
            self.chat.delivery.give_up_on(member)  # its queue is full: it cannot keep up
            return
        upload.receivers[id(member)] = Receiver(member, upload, seq)
        self.chat.delivery.touch(member)

    def handle_cancel(self, request) -> list[str]:
        """FILE_CANCEL [id]: the sender's stops the transfer for all; a receiver's, for itself."""
        (number,) = unpack_fields(request.packet.payload, 1)
        session = request.session
        upload = self.uploads.get(int(number)) if whole_number(number) else None
        if upload is not None and upload.sender is session:
            self.cancel(upload, f"{session.name} cancelled it", tell_sender=False)
            return ["cancelled"]
        receiver = upload.receivers.get(id(session)) if upload else None
        if receiver is None:
            raise Refusal("no-such-transfer", "No such transfer (finished already?).")
        self.drop_receiver(receiver, f"{session.name} cancelled {upload.name}")
        return ["cancelled"]

    @staticmethod
    def refuse_chunk(request) -> None:
        raise Refusal("bad-request", "A FILE_CHUNK goes on the file stream (FLAG_FILE_STREAM), not the chat's.")

    # --- The file stream ---

    def receive_stream(self, session, packet, now: float) -> None:
        """A packet on a member's file stream: acknowledgements, and chunks of its uploads."""
        _, ready = session.file_stream.receive(packet, now)
        for delivered in ready:
            if delivered.seq and delivered.type == PacketType.FILE_CHUNK:
                self.take_chunk(session, delivered.payload, now)
        self.chat.delivery.touch(session)

    def take_chunk(self, session, payload: bytes, now: float) -> None:
        """Write an upload's next chunk to its temporary file; chunks come in order, so at its end."""
        try:
            number, offset, data = unpack_chunk(payload)
        except PacketError:
            return
        upload = self.uploads.get(number)
        if upload is None or upload.sender is not session or upload.received == upload.size:
            return  # cancelled meanwhile (its chunks in flight still come), or not the sender's
        if offset != upload.received or len(data) != chunk_length(upload.size, offset):
            self.cancel(upload, "its chunks did not fit the file")
            return
        try:
            upload.writer.write(data)
        except OSError as error:
            self.chat.log.problem(f"cannot write {upload.path}: {error}")
            self.cancel(upload, "the server could not store it")
            return
        upload.digest.update(data)
        upload.received += len(data)
        upload.last_progress = now
        for receiver in upload.receivers.values():
            self.chat.delivery.touch(receiver.session)  # more to relay
        if upload.received == upload.size:
            self.upload_complete(upload)

    def upload_complete(self, upload: Upload) -> None:
        if upload.digest.hexdigest() != upload.sha256:
            self.cancel(upload, "it arrived damaged (SHA-256 mismatch)")
            return
        upload.checked = True
        upload.writer.close()
        self.log_file(upload, "arrived whole, SHA-256 checked")
        self.release_if_unused(upload)

    def pump(self, sessions, now: float) -> None:
        """For each session: note the files it now has whole, and refill its file stream."""
        for session in sessions:
            for receiver in self.receivers_of(session):
                if self.has_it_all(receiver):
                    self.delivered(receiver)
            self.fill(session)

    def fill(self, session) -> None:
        """Put chunks into the session's file stream, one file after the other in turn, while it has room."""
        stream = session.file_stream
        ready = [r for r in self.receivers_of(session)
                 if session.channel.delivered(r.offer_seq) and r.sent < r.upload.received]
        while ready and len(stream.waiting) < FILL:
            for receiver in list(ready):
                upload = receiver.upload
                upload.reader.seek(receiver.sent)
                data = upload.reader.read(chunk_length(upload.size, receiver.sent))
                receiver.last_seq = stream.send(PacketType.FILE_CHUNK, pack_chunk(upload.id, receiver.sent, data))
                receiver.sent += len(data)
                if receiver.sent >= upload.received or not data:
                    ready.remove(receiver)

    def has_it_all(self, receiver: Receiver) -> bool:
        session, upload = receiver.session, receiver.upload
        if not upload.checked or receiver.sent < upload.size:
            return False
        if upload.size == 0:
            return session.channel.delivered(receiver.offer_seq)
        return session.file_stream.delivered(receiver.last_seq)

    def delivered(self, receiver: Receiver) -> None:
        """A receiver acknowledged every chunk: tell the sender, and let the file go if it was the last."""
        upload = receiver.upload
        self.forget_receiver(receiver)
        self.log_file(upload, f"{receiver.session.name} has it all")
        self.tell_sender(upload, "file-done", receiver.session.name, f"{receiver.session.name} has {upload.name}")
        self.release_if_unused(upload)

    # --- Ending ---

    def drop_receiver(self, receiver: Receiver, why: str) -> None:
        upload = receiver.upload
        self.forget_receiver(receiver)
        self.log_file(upload, f"not for {receiver.session.name}: {why}")
        self.tell_sender(upload, "file-declined", receiver.session.name, why)
        self.release_if_unused(upload)

    def forget_receiver(self, receiver: Receiver) -> None:
        receiver.upload.receivers.pop(id(receiver.session), None)

    def receivers_of(self, session) -> list[Receiver]:
        """Return where `session` is in each file it is being sent, oldest file first."""
        return [upload.receivers[id(session)] for upload in self.uploads.values() if id(session) in upload.receivers]

    def release_if_unused(self, upload: Upload) -> None:
        """Nobody left to receive it: delete the temporary file (and stop an upload still coming)."""
        if upload.receivers:
            return
        if not upload.checked:
            self.cancel(upload, "nobody is left to receive it")
        else:
            self.close(upload)

    def cancel(self, upload: Upload, why: str, tell_sender: bool = True) -> None:
        """End a transfer for everyone: its receivers and (unless it asked) its sender hear why."""
        self.log_file(upload, f"cancelled: {why}")
        if tell_sender:
            self.tell_sender(upload, "file-cancelled", upload.sender.name, f"{upload.name} not sent: {why}")
        for receiver in list(upload.receivers.values()):
            self.forget_receiver(receiver)
            text = f"{upload.name} from {upload.sender.name} cancelled: {why}"
            self.chat.delivery.push(receiver.session, self.chat.rooms.event("file-cancelled", "", upload.sender.name,
                                                                            text, upload.id))
        self.close(upload)

    def close(self, upload: Upload) -> None:
        self.uploads.pop(upload.id, None)
        upload.writer.close()
        upload.reader.close()
        try:
            os.remove(upload.path)
        except OSError as error:
            self.chat.log.problem(f"cannot delete {upload.path}: {error}")

    def expire(self, now: float) -> None:
        """Cancel the uploads that gained no byte for IDLE_LIMIT seconds (housekeeping)."""
        for upload in list(self.uploads.values()):
            if not upload.checked and now - upload.last_progress > self.IDLE_LIMIT:
                self.cancel(upload, f"no part of it came for {self.IDLE_LIMIT:.0f} s")

    def close_all(self) -> None:
        """The server stops: close every temporary file (Windows cannot delete an open one)."""
        for upload in list(self.uploads.values()):
            self.close(upload)

    def drop(self, session) -> None:
        """A session ended: its unfinished uploads stop (a checked one the server has whole,
        and goes on relaying), and it leaves the files it was receiving."""
        for upload in [u for u in self.uploads.values() if u.sender is session and not u.checked]:
            self.cancel(upload, f"{session.name} left", tell_sender=False)
        for receiver in self.receivers_of(session):
            self.drop_receiver(receiver, f"{session.name} left before {receiver.upload.name} arrived")

    def tell_sender(self, upload: Upload, kind: str, user: str, text: str) -> None:
        sender = upload.sender
        if self.chat.sessions.get(sender.address) is sender:
            self.chat.delivery.push(sender, self.chat.rooms.event(kind, "", user, text, upload.id))

    def log_file(self, upload: Upload, what: str) -> None:
        self.chat.log.event(upload.sender.address, upload.sender.name, f"#{upload.id} {upload.name!r} {what}", "FILE")

    def buffered_bytes(self) -> int:
        """Return the file bytes the server holds in memory: those in its members' file streams."""
        return sum(session.file_stream.buffered_bytes() for session in self.chat.sessions.values())


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
        self.selector.register(self.worker.waker.reader, selectors.EVENT_READ)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.grace = 0.0  # seconds to wait, once stopped, for members to hear it
        self.closed = False

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            self.serve_once(MAX_WAIT)

    def serve_once(self, longest: float) -> None:
        """Wait for a datagram, a finished password check or a timer, and handle it."""
        wait = min(max(self.chat.next_deadline() - time.monotonic(), 0.0), longest)
        ready = {key.fileobj for key, _ in self.selector.select(wait)}
        now = time.monotonic()
        if self.sock in ready:
            self.receive_all(now)
        if self.worker.waker.reader in ready:
            for future in self.worker.collect():
                self.survive(self.finish_job, future, now, where="a finished password check")
        self.survive(self.chat.on_timers, now, where="the timers")
        self.flush()

    def shut_down(self, grace: float = STOP_GRACE) -> None:
        """Tell every member that the server stops, and wait up to `grace` seconds till all heard."""
        deadline = time.monotonic() + grace
        self.survive(self.chat.announce_stop, time.monotonic(), where="stopping")
        self.flush()
        while not self.chat.stop_heard() and time.monotonic() < deadline:
            self.serve_once(deadline - time.monotonic())

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
                where = f"{where} {describe_address(peer)}"
            self.chat.stats["internal-errors"] += 1
            self.chat.log.problem(f"internal error on {where}:\n{traceback.format_exc()}")

    def flush(self) -> None:
        """Send the outbox, and hand new password checks to the worker."""
        for data, address in self.chat.outbox:
            try:
                self.sock.sendto(data, address)
            except OSError as error:  # e.g. no route to that host: that client's problem
                self.chat.log.problem(f"sending to {describe_address(address)} failed: {error}")
        self.chat.outbox.clear()
        for job in self.chat.password_jobs:
            self.worker.submit(job)
        self.chat.password_jobs.clear()

    def start(self) -> "ServerLoop":
        """Serve on a background thread (for tests and the notebook)."""
        self.thread = threading.Thread(target=self.serve_then_close, name="chat-server", daemon=True)
        self.thread.start()
        return self

    def serve_then_close(self) -> None:
        try:
            self.serve_forever()
            if self.grace:
                self.shut_down(self.grace)
        finally:
            self.close()

    def stop(self, grace: float = 0.0) -> None:
        """Stop serving (telling the members, if `grace`) and wait for the loop; safe from any thread."""
        self.grace = grace
        self.stopping.set()
        self.worker.waker.wake()
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


def listening_port(text: str) -> int:
    """Check --port: a UDP port from 1 to 65535, or 0 for any free one (the banner says which)."""
    if text == "0":
        return 0
    try:
        return port_number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 65535, or 0") from None


def megabytes(text: str) -> float:
    """Check --max-file-mb: a size of 0 or more."""
    if not re.fullmatch(r"\d+(\.\d*)?", text.strip()):
        raise argparse.ArgumentTypeError("must be a number of megabytes, 0 or more")
    return float(text)


def parse_args(argv: list[str]) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        description="UDP chat room server. Clients connect with: python client.py",
        epilog="The xor and caesar ciphers are teaching toys: anyone on the network who "
               "captures the traffic can read it. Passwords are stored only as salted PBKDF2 hashes.",
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=listening_port, default=defaults.port,
                        help="UDP port (default: %(default)s; 0: any free one)")
    parser.add_argument("--data-dir", default=defaults.data_dir,
                        help="folder for users.json, rooms.json and chat_history.txt "
                             "(default: chat_data beside server.py)")
    parser.add_argument("--room-password", default=defaults.room_password,
                        help="password of the lobby room (default: %(default)s)")
    add_shared_options(parser)  # --cipher, --key, --loss, --seed
    parser.add_argument("--quiet", action="store_true", help="log only problems, not every action")
    parser.add_argument("--verbose", action="store_true",
                        help="also log heartbeats, HELLO, FIND, ROOMS and WHO, and trace every packet")
    parser.add_argument("--session-timeout", type=float, default=defaults.session_timeout,
                        help="seconds of silence before a client is considered gone (default: %(default)s)")
    parser.add_argument("--name", type=server_name, default=defaults.name,
                        help="the name clients see when they search the network with ? (default: this PC's name)")
    parser.add_argument("--max-file-mb", type=megabytes, default=defaults.max_file_mb,
                        help="the largest file members may send, in MB (default: %(default)s)")
    return ServerConfig(**vars(parser.parse_args(argv)))  # every option is named as its ServerConfig field


def print_banner(config: ServerConfig, address: Address, name: str) -> None:
    port = address[1]
    everywhere = config.host in ("0.0.0.0", "")
    addresses = lan_addresses() if everywhere else [config.host]
    print(f"UDP chat server listening on {describe_address(address)}")
    if config.host.startswith("127.") or config.host == "localhost":  # loopback never leaves this PC
        print(f"Clients on other PCs cannot reach it: it listens on {config.host} only (leave out --host)")
    elif addresses:
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


def serve_until_stopped(loop: ServerLoop, config: ServerConfig) -> None:
    """Serve until Ctrl+C, then tell the members; a second Ctrl+C stops at once."""
    try:
        print_banner(config, loop.address, loop.chat.discovery.name)
        try:
            loop.serve_forever()
        except KeyboardInterrupt:  # the normal way to stop
            count = len(loop.chat.sessions)
            print(f"[INFO] Stopping: telling {count} member{'' if count == 1 else 's'}...")
            loop.shut_down()
    finally:
        loop.close()


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
        serve_until_stopped(ServerLoop(chat, sock), config)
    except KeyboardInterrupt:  # Ctrl+C, at any moment: the normal way to stop
        pass
    print("[INFO] Server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
