"""UDP chat room server: accounts, password-protected rooms, history, files, reliable delivery.

Run it on one PC of the lab network, then `python client.py` on the others:

    python server.py                          # all interfaces, port 9999, lobby password "juara"
    python server.py --port 5000 --room-password rahasia --cipher caesar --key 7

As in the standard library's socketserver, one loop (`ServerLoop`) owns the one UDP
socket: UDP needs no listen() or accept(), every datagram arrives on that socket tagged
with its sender's (ip, port). The protocol, `ChatServer`, never touches a socket: it is
handed datagrams and the time and fills `outbox`, so tests and the notebook drive it
without a network. Before login a client is in the handshake: HELLO earns a cookie that
proves its address, then REGISTER or LOGIN by SRP-6a (its math on a worker thread). A
member has a session: a token, and a reliable `Channel` (encryption_helper.py) each way,
so that requests, answers and EVENTs arrive once and in order; a second one carries files.

A SAY datagram, as it leaves a client (XOR-scrambled payload, readable header):

    55 43 06 05 00 04 00 07  00 00 00 07 00 00 00 02   "UC" v6 SAY flags=TAGGED len=7 seq=7 ack=2
    00 00 00 00 3e 1a 2c 5e  5e 77 90 12 cc c1 4f bd   sack=0, token, CRC-32, then the payload:
    49 4c 5a 58 12 0a 60                               [5]"hi :)" XORed with the key "II2120",
    20 e8 14 30 52 5f 66 bf  13 19 a3 bb b0 95 73 58   and the tag (K of PROTOCOL.md's example)

The life of a SAY, from recvfrom to sendto:

    ServerLoop.receive_all       recvfrom_into() reads the datagram
    ChatServer.handle_datagram   decode_packet() checks it and unscrambles the payload
    .handle_member_packet        the token matches the session; Channel.receive() puts it
                                 in order, into the session's backlog
    .serve_backlog               TokenBucket.take(): within the member's rate, or it waits
    .respond -> handle_say       HistoryFile.append(); publish() -> tell(): an EVENT chat
                                 on each other member's Channel
    .answer                      OK [re, "to lobby, 1 other"] on the sender's Channel
    ServerLoop.send_due          after every SEND_AFTER datagrams read, or when none wait:
    ChatServer.flush             Channel.poll() turns what each channel has into datagrams
    ServerLoop.send_all          sendto() each datagram of `outbox`
"""

import argparse
import calendar
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import json
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
import encryption_helper as wire
from encryption_helper import LOBBY, Address, Channel, Packet, PacketError, PacketType, Refused

# === Configuration, and every limit ==========================================================

HISTORY_FILE, USERS_FILE, ROOMS_FILE = "chat_history.txt", "users.json", "rooms.json"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_data")
# Past messages a member is shown on joining a room: a screenful.
HISTORY_ON_JOIN = 20
# Flood control, as IRC servers do it: a short paragraph pasted at once goes through, then
# 5 messages a second; those beyond wait their turn, until 100 wait: then "slow-down".
MESSAGE_BURST, MESSAGE_RATE, MAX_BACKLOG = 20, 5.0, 100
# 5 wrong passwords of an account (or room passwords of an account on a PC) in 60 s lock it.
LOGIN_FAILURES, FAILURE_PERIOD = 5, 60.0
# Logins (auth.LoginLimiter): 5 wrong for an account from one address lock that address out
# of it, not its owner at another PC; 20 wrong from an address in 5 minutes (4 a minute, over
# all accounts) lock that address: a guesser's, or a NAT's with 4 students locked at once.
LOGIN_FAILURES_PER_ADDRESS, LOGIN_PERIOD = 20, 300.0
# A class registering at once is fine; a script making thousands of accounts is not.
REGISTRATIONS_PER_ADDRESS = 20
# A room password's check costs a quarter of a second, a LOGIN's SRP-6a step some milliseconds:
# past 256 waiting, a login hears "busy". They wait their turn fairly (queue_fairly): a flood
# from one address, or at one account, delays itself, not the class.
MAX_PENDING_CHECKS = 256
# A lab of 40 PCs with room to spare. Rooms: 5 made per account, 200 in all (40 students'
# worth); a room is never forgotten to make one more: whoever made one of its name would
# own its members' room, with his own password.
MAX_SESSIONS, MAX_ROOMS, ROOMS_PER_ACCOUNT = 500, 200, 5
# FIND answers per asking address (a search is 3 FINDs to each of 2 broadcast addresses):
# 10 at once, then 2 a second. A flood from one PC starves only that PC. The table keeps the
# FIND_ADDRESSES latest askers (the least recently seen forgotten).
FIND_BURST, FIND_RATE, FIND_ADDRESSES = 10, 2.0, 1000
# The name FIND answers with: short enough that the answer stays smaller than the FIND.
MAX_NAME_BYTES = 64
# The server's key y, whose fingerprint clients compare (kept in the data folder).
KEY_FILE = "server_key.json"
# A cookie is good in the 30-second period it was made in and the next one.
COOKIE_PERIOD = 30.0
# Answers to REGISTER and LOGIN kept for retries, the oldest forgotten first.
RETRY_CACHE_SIZE = 4096
# Files: 2 at once per member, 20 on the server (when all are taken, a member holding fewer
# takes the place of the idlest file of one holding the most: a fair share each); an upload
# with no chunk for 15 s is cancelled, so a sender that trickles loses its place.
DEFAULT_MAX_FILE_MB, MAX_FILES_PER_MEMBER, MAX_TRANSFERS, UPLOAD_IDLE_LIMIT = 20, 2, 20, 15.0
# An offer not accepted in a minute lapses; at most 5 offers, 100 MB, wait for one receiver.
OFFER_LAPSE, MAX_OFFERS_WAITING, MAX_WAITING_MB = 60.0, 5, 100
# The loop's longest sleep (on Windows, Ctrl+C waits for select() to return), and how
# often it looks for finished password checks while one runs.
MAX_WAIT, CHECK_POLL = 0.5, 0.01
# The kernel's queue for our socket (asked for, not promised), and datagrams read per
# turn of the loop, so that timers still run during a flood. After every SEND_AFTER of
# them the channels send what they owe: one ACK answers several packets (fewer datagrams
# to make, tag and send), and data waits no longer than SEND_AFTER datagrams take.
RECEIVE_BUFFER_BYTES, RECEIVE_BATCH, SEND_AFTER = 4 << 20, 256, 8
# Seconds between sweeps for silent sessions; seconds a stopping server waits for its
# members to acknowledge EVENT stop.
HOUSEKEEPING_EVERY, STOP_GRACE = 1.0, 2.0
# Log lines a second about bad packets (a flood of junk must not flood the log), and the
# characters of a message the log shows.
PROBLEMS_PER_SECOND, LOGGED_TEXT = 20, 60
# All a client without a session may send: the handshake's packet types, and FIND.
HANDSHAKE_TYPES = {PacketType.HELLO, PacketType.REGISTER, PacketType.LOGIN, PacketType.FIND}
# Requests that flood control counts: each tells others something.
FLOOD_CONTROLLED = {PacketType.SAY, PacketType.PRIVATE, PacketType.FILE_OFFER}
# Logged only with --verbose: heartbeats (40 students: 8 a second), cookies, questions.
QUIET_TYPES = {PacketType.PING, PacketType.HELLO, PacketType.FIND, PacketType.ROOMS,
               PacketType.WHO}
# The retry cache's mark for a request whose password check is still running.
PENDING = b""
# The verifier of every unknown name: g^x for an x nobody knows, drawn when the server starts.
FAKE_VERIFIER = format(pow(wire.SRP_G, secrets.randbits(256), wire.SRP_N), "x")


@dataclasses.dataclass
class ServerConfig:
    """What the command line can change, with the defaults a lab uses ("0.0.0.0": all
    interfaces; key None: the cipher's default; name "": this PC's host name)."""
    host: str = "0.0.0.0"
    port: int = 9999
    data_dir: str = DEFAULT_DATA_DIR
    room_password: str = "juara"
    cipher: str = wire.DEFAULT_CIPHER
    key: str | None = None
    quiet: bool = False
    verbose: bool = False
    # Drop this share of datagrams in and out, to watch recovery (seed: the same ones).
    loss: float = 0.0
    seed: int | None = None
    # A client sends a heartbeat after 5 s of quiet: six missed in a row, it is gone.
    session_timeout: float = 30.0
    kdf_iterations: int = auth.DEFAULT_ITERATIONS
    name: str = ""
    max_file_mb: float = DEFAULT_MAX_FILE_MB


# === State ===================================================================================


@dataclasses.dataclass(eq=False)
class Session:
    """A logged-in member, known by its address and proven by the token it carries."""
    token: bytes
    address: Address
    name: str
    # The reliable channels to its client: the chat's, and the file stream.
    channel: Channel
    file_stream: Channel
    bucket: "TokenBucket"
    last_heard: float
    # Its room's key in ChatServer.rooms (the lower-case name); None before a JOIN.
    room: str | None = None
    # Requests in order, not handled yet: held by flood control (till `wake_at`), or while
    # a password check runs (`checking`).
    backlog: collections.deque = dataclasses.field(default_factory=collections.deque)
    wake_at: float = float("inf")
    checking: bool = False
    # Its channel's queue was full: it cannot keep up, and its session ends.
    behind: bool = False
    # From SRP-6a's K, known to the member's client alone: what JOIN's room password is sealed
    # with, and what the tag of each of its packets must be made with (tagged_by).
    keys: wire.SessionKeys = wire.SessionKeys(b"", b"", b"")


@dataclasses.dataclass(eq=False)
class Room:
    """A room: its members by lower-case name, its last messages (time, user, text), and
    its password's record (salted, hashed; when it was made), None for the lobby."""
    name: str
    record: dict | None
    members: dict = dataclasses.field(default_factory=dict)
    history: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_ON_JOIN))


@dataclasses.dataclass(eq=False)
class Request:
    """One packet to handle, with what the handlers learn about it on the way."""
    packet: Packet
    address: Address
    # Bytes received: a sender that has not proven its address never gets more back.
    size: int
    now: float
    # None: a client without a session (HELLO, REGISTER, LOGIN, FIND).
    session: Session | None = None
    # The sender is really at its address (a good cookie, or its token).
    proven: bool = False
    user: str = ""
    rejoin: bool = False
    # A LOGIN's welcome: the new session's token, and the key its answer is tagged with.
    reply_token: bytes = wire.NO_TOKEN
    reply_key: bytes = b""
    # What the answer's log line shows besides it (a SAY's words, cut short).
    note: str = ""


@dataclasses.dataclass(eq=False)
class PasswordJob:
    """A slow hash: `work()` runs on the worker thread, then `then(chat, job)` answers the
    request on the loop's thread. `record`: what a password is checked against."""
    request: Request
    work: object
    then: object
    record: dict | None = None
    result: object = None
    error: str = ""

    def run(self) -> "PasswordJob":
        try:
            self.result = self.work()
        # Whatever broke (a damaged record, say), the loop must still answer the request.
        except Exception as error:
            self.error = repr(error)
        return self


def describe_address(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


# === The protocol ============================================================================


class ChatServer:
    """The chat protocol: datagrams and the time in, datagrams to send out; no socket, no thread.

    Entry points: `handle_datagram(data, address, now)`, then `flush(now)` after one or more;
    `finish_password_job(job, now)` once the worker checked a password; `on_timers(now)` at
    `next_deadline()`; `announce_stop(now)` then `stop_heard()`. Outputs: `outbox`, (datagram,
    address) pairs to send; `password_jobs`, checks for the worker thread."""

    def __init__(self, config: ServerConfig, log=print, wall_clock=time.time):
        self.config, self.wall_clock = config, wall_clock
        self.cipher = wire.make_cipher(config.cipher, config.key)
        self.log = ServerLog(log, config.quiet, config.verbose)
        self.key = load_server_key(config.data_dir)
        path = os.path.join
        self.users = auth.UserStore(path(config.data_dir, USERS_FILE), config.kdf_iterations)
        self.room_store = auth.UserStore(path(config.data_dir, ROOMS_FILE), kind="rooms")
        self.history = HistoryFile(path(config.data_dir, HISTORY_FILE))
        self.rooms = load_rooms(self.room_store, self.history.path, self.log.problem)
        self.files = FileRelay(path(config.data_dir, "transfers"), config.max_file_mb,
                               self.notify, self.log)
        # Sessions by address, and the same sessions by lower-case user name.
        self.sessions, self.online = {}, {}
        # The retry cache: the answer to each REGISTER and LOGIN, by retry_key(); LOGINs half
        # way by (address, lower-case name): (A, M1, M2, record, when, K).
        self.replies, self.challenges = collections.OrderedDict(), collections.OrderedDict()
        self.cookie_secret = secrets.token_bytes(16)
        self.failed_logins = auth.LoginLimiter(LOGIN_FAILURES, LOGIN_FAILURES_PER_ADDRESS,
                                               LOGIN_PERIOD)
        self.wrong_room_passwords = auth.FailureCounter(LOGIN_FAILURES, FAILURE_PERIOD)
        self.registrations = auth.FailureCounter(REGISTRATIONS_PER_ADDRESS, FAILURE_PERIOD)
        self.find_buckets: collections.OrderedDict = collections.OrderedDict()
        self.name, self.port = config.name or host_name(), config.port
        self.outbox, self.password_jobs, self.stats = [], [], collections.Counter()
        self.pending_checks, self.stopping, self.next_housekeeping = 0, False, 0.0
        # Sessions whose channels may have something to send now (a dict keeps their
        # order); the member whose request is being answered, and EVENTs for it that wait.
        self.due, self.replying_to, self.after_reply = {}, None, []

    # --- Entry points ---

    def handle_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from `address`: flush() sends what it calls for. Nothing it
        contains can raise out of here."""
        self.stats["datagrams"] += 1
        self.log.trace("in ", data, address)
        try:
            packet = wire.decode_packet(data, self.cipher)
        except PacketError as error:
            refuse(self, address, f"sent a bad datagram ({len(data)} B): {error}")
            # The type byte is never scrambled: a type only servers send is not answered even
            # unreadable (another key), or two servers would answer each other for ever.
            if data[:2] == wire.MAGIC and len(data) > 3 and data[3] not in wire.SERVER_ONLY:
                bad = wire.pack_fields("0", "bad-packet", str(error))
                self.send(wire.encode_packet(Packet(PacketType.ERROR, payload=bad), self.cipher),
                          address, limit=len(data))
            return
        request = Request(packet, address, len(data), now)
        if packet.type not in HANDSHAKE_TYPES or packet.token != wire.NO_TOKEN:
            self.handle_member_packet(request, data)
        # A stopping server opens no sessions: the client tries the restarted one.
        elif not self.stopping:
            self.handle_handshake(request)

    def finish_password_job(self, job: PasswordJob, now: float) -> None:
        """A password check the worker finished: answer its request, then serve what waited."""
        request, session = job.request, job.request.session
        request.now, self.pending_checks = now, self.pending_checks - 1
        if session:
            session.checking = False
        if job.error:
            self.log.problem(f"a password check for {describe_address(request.address)} "
                             f"failed: {job.error}")
            job.then = refuse_failed_check
        # Not for a session ended meanwhile, nor after EVENT stop: the client asks again.
        if session is None or (self.current(session) and not self.stopping):
            self.respond(request, job.then, self, job)
        if session:
            self.serve_backlog(session, now)
        self.flush(now)

    def on_timers(self, now: float) -> None:
        """Serve requests flood control held, end silent sessions, send what is due."""
        for session in list(self.sessions.values()):
            if session.wake_at <= now:
                session.wake_at = float("inf")
                self.serve_backlog(session, now)
            if min(session.channel.next_wakeup(), session.file_stream.next_wakeup()) <= now:
                self.due[session] = None
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_EVERY
            self.log.problem(None)
            for session in list(self.sessions.values()):
                if now - session.last_heard > self.config.session_timeout:
                    self.end_session(session, "timed out", now)
            self.files.expire(now)
        self.flush(now)

    def next_deadline(self) -> float:
        """Return when on_timers next has work: a channel's timer, a held request, a sweep."""
        return min([self.next_housekeeping] + [
            min(s.wake_at, s.channel.next_wakeup(), s.file_stream.next_wakeup())
            for s in self.sessions.values()])

    def announce_stop(self, now: float) -> None:
        """The server is stopping: tell every member, and handle no more requests."""
        self.stopping = True
        for session in self.sessions.values():
            # Never handled: the client sends them again after the restart.
            session.backlog.clear()
            self.tell(session, self.event("stop", "", session.name, "The server was stopped."))
        self.flush(now)

    def stop_heard(self) -> bool:
        """Has every member acknowledged all it was sent (the stop included)?"""
        return all(session.channel.idle() for session in self.sessions.values())

    def close(self) -> None:
        self.history.close()
        for upload in list(self.files.uploads.values()):
            self.files.remove(upload)

    # --- From a datagram to a handler ---

    def handle_handshake(self, request: Request) -> None:
        """HELLO, REGISTER, LOGIN, FIND without a session; a retry gets the first answer."""
        remembered = self.replies.get(retry_key(request))
        if remembered is None:
            return self.respond(request, HANDLERS[request.packet.type], self, request)
        if remembered:
            self.send(remembered, request.address)
        if self.config.verbose:
            self.log.action(request.address, "", request.packet.type.name, "a retry, answered "
                            "again" if remembered else "a retry, still checking", request.size)

    def handle_member_packet(self, request: Request, data: bytes) -> None:
        """A packet on a member's channel: acknowledgements first, then requests in order."""
        packet, address = request.packet, request.address
        session = member_of(self, request, data)
        if session is None:
            return
        session.last_heard, self.due[session] = request.now, None
        if packet.flags & wire.FLAG_FILE_STREAM:
            # New bytes of its uploads may go on to their receivers.
            return self.due.update(dict.fromkeys(self.files.receive(session, packet, request.now)))
        for delivered in session.channel.receive(packet, request.now)[1]:
            # An unnumbered ACK; or too late: the client sends it again after the restart.
            if not delivered.seq or self.stopping:
                continue
            held = Request(delivered, address, request.size, request.now, session, proven=True)
            # A BYE always finds room: a member drowning in its own flood may still leave.
            if len(session.backlog) < MAX_BACKLOG + (delivered.type == PacketType.BYE):
                session.backlog.append(held)
            else:
                self.answer(held, Refused("slow-down", "Slow down: too many messages at once; "
                                                       "not sent."))
        self.serve_backlog(session, request.now)

    def serve_backlog(self, session: Session, now: float) -> None:
        """Handle the member's requests in order; flood control may hold the rest for later."""
        while session.backlog and not session.checking and self.current(session):
            request = session.backlog[0]
            wait = request.packet.type in FLOOD_CONTROLLED and session.bucket.take(now)
            if wait:
                session.wake_at = now + wait
                return
            session.backlog.popleft()
            request.now = now
            self.respond(request, HANDLERS[request.packet.type], self, request)

    # --- Answering: the one place ---

    def respond(self, request: Request, handler, *args) -> None:
        """Run a handler and answer; EVENTs it makes for the requester follow the answer."""
        self.replying_to = request.session
        try:
            result = handler(*args)
        except Refused as refusal:
            result = refusal
        except PacketError as error:
            result = Refused("bad-request", str(error))
        finally:
            self.replying_to = None
        self.answer(request, result)
        held, self.after_reply = self.after_reply, []
        for session, body in held:
            self.tell(session, body)

    def answer(self, request: Request, result) -> None:
        """Answer OK [re, *result], or ERROR [re, code, text] for a Refused; None: no answer."""
        if result is None:
            return
        ptype, fields = PacketType.OK, result
        if isinstance(result, Refused):
            ptype, fields = PacketType.ERROR, [result.code, result.text]
        # Never expected; but an answer must never crash the server.
        if len(wire.pack_fields(str(request.packet.seq), *fields)) > wire.MAX_PAYLOAD:
            ptype, fields = PacketType.ERROR, ["too-long", "Answer too long."]
        payload = wire.pack_fields(str(request.packet.seq), *fields)
        self.log.answer(request, ptype, fields)
        if request.session is not None:
            request.session.behind |= not request.session.channel.send(ptype, payload)
            self.due[request.session] = None
            return
        reply = Packet(ptype, 0, request.packet.seq, 0, request.reply_token, 0, payload)
        data = wire.encode_packet(reply, self.cipher, key=request.reply_key)
        if request.proven:
            remember(self, request, data)
        self.send(data, request.address, limit=None if request.proven else request.size)

    def send(self, data: bytes, address: Address, limit: int | None = None) -> None:
        """Send a datagram; to a sender not proven to be at its address, no more bytes than
        it sent (`limit`). UDP source addresses can be forged: if a small request earned a big
        answer, anyone could aim our answers at a victim (QUIC's anti-amplification limit)."""
        if limit is not None and len(data) > limit:
            self.stats["withheld"] += 1
            return
        self.log.trace("out", data, address)
        self.outbox.append((data, address))

    # --- Sessions, and telling their members ---

    def event(self, kind: str, room: str, user: str, text: str, *more, when=None) -> bytes:
        """Return an EVENT's payload [kind, unix time, room, user, text, *more]."""
        when = self.wall_clock() if when is None else when
        return wire.pack_fields(kind, str(int(when)), room, user, text, *map(str, more))

    def tell(self, session: Session, body: bytes | wire.Body) -> int:
        """Queue an EVENT on a member's channel; return its number (0: not yet, or no room).
        One for the member whose request is being answered waits for the answer."""
        if session is self.replying_to:
            self.after_reply.append((session, body))
            return 0
        seq = session.channel.send(PacketType.EVENT, body)
        session.behind |= not seq
        self.due[session] = None
        return seq

    def publish(self, room: Room, kind: str, user: str, text: str, exclude=None) -> None:
        """Tell every member of `room` (but `exclude`) what `user` did or said."""
        # Scrambled and checksummed once for the whole room; only the headers differ.
        body = wire.prepare_body(self.event(kind, room.name, user, text), self.cipher)
        for member in list(room.members.values()):
            if member is not exclude:
                self.tell(member, body)

    def notify(self, session: Session, kind: str, user: str, text: str, number: int) -> None:
        """Tell a member about a transfer (FileRelay's one way to speak), if still here."""
        if self.current(session):
            self.tell(session, self.event(kind, "", user, text, number))

    def current(self, session: Session) -> bool:
        """Is this session still open (not ended, nor replaced by a newer login)?"""
        return self.sessions.get(session.address) is session

    def open_session(self, name: str, address: Address, now: float) -> Session:
        """Start a session: a random token, and its two channels (clients delay their ACKs)."""
        token = secrets.token_bytes(8)
        chat, files = (Channel(self.cipher, token, flags=flags,
                               rto=wire.RtoEstimator(peer_ack_delay=wire.ACK_DELAY))
                       for flags in (0, wire.FLAG_FILE_STREAM))
        bucket = TokenBucket(MESSAGE_RATE, MESSAGE_BURST, now)
        session = Session(token, address, name, chat, files, bucket, now)
        self.sessions[address] = self.online[name.lower()] = session
        return session

    def end_session(self, session: Session, reason: str, now: float, tell: str = "") -> None:
        """Forget a session; its room hears that the user left, and why. Its channel is sent
        once more (a BYE's answer, or the EVENT `tell`), then never: if that is lost, the
        client asks again, gets RESET, and takes that as the end."""
        if not self.current(session):
            return
        if tell:
            self.tell(session, self.event(tell, "", session.name, reason))
        del self.sessions[session.address], self.online[session.name.lower()]
        session.backlog.clear()
        self.files.drop(session)
        if session.room:
            leave_room(self, session, reason)
        self.due[session] = None
        # After a BYE, the answer's own log line says goodbye.
        if reason:
            self.log.action(session.address, session.name, "END", f"session ended: {reason}")

    def flush(self, now: float) -> None:
        """Send what the channels of the sessions due have; end those that cannot keep up."""
        while self.due:
            due, self.due = list(self.due), {}
            for session in due:
                current = self.current(session)
                if current:
                    self.files.fill(session)
                for stream in (session.channel, session.file_stream):
                    for data in stream.poll(now):
                        self.send(data, session.address)
                failed = session.channel.failed or session.file_stream.failed
                if current and (failed or session.behind):
                    reason = "not responding" if failed else "too slow"
                    self.log.problem(f"{session.name} at {describe_address(session.address)}: "
                                     f"{reason}")
                    self.end_session(session, reason, now)


# === The handlers: one function per packet type ==============================================
# Each takes the ChatServer and a Request, and returns the OK's fields; None, when there is
# no answer now (a password check runs; or nothing is answered); or raises Refused.


def handle_hello(chat: ChatServer, request: Request) -> list[str] | None:
    """HELLO -> OK [cookie, iterations, Y]: only a client really at its address sees it (as in
    DTLS); the iterations are those a new account's slow hash must run; Y, our key."""
    if request.session is None and request.size < wire.MIN_HELLO_SIZE:
        return refuse(chat, request.address, f"sent an unpadded HELLO ({request.size} B); dropped")
    period = int(request.now // COOKIE_PERIOD)
    return [make_cookie(chat, request.address, period), str(chat.users.iterations),
            format(chat.key[1], "x")]


def load_server_key(folder: str) -> tuple[int, int]:
    """Return (y, Y = g^y): the server's key, made at first start and kept in the data folder
    (made if new), so that its fingerprint, shown in the banner and FIND answers, stays."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, KEY_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            y = int(json.load(file)["y"], 16)
    except FileNotFoundError:
        y = secrets.randbits(256)
        auth.write_atomically(path, json.dumps({"y": format(y, "x")}) + "\n")
        # Whoever reads y can answer registrations as this server.
        os.chmod(path, 0o600)
    return y, pow(wire.SRP_G, y, wire.SRP_N)


def make_cookie(chat: ChatServer, address: Address, period: int) -> str:
    """Return an HMAC of the address and the period: nothing to store per client."""
    message = f"{address[0]}|{address[1]}|{period}".encode()
    return hmac.new(chat.cookie_secret, message, "sha256").hexdigest()[:32]


def check_cookie(chat: ChatServer, request: Request, *counts: int) -> list[str]:
    """Return the fields of a REGISTER or LOGIN [cookie, name, ...] whose cookie is good."""
    fields = wire.unpack_fields(request.packet.payload) + [""]
    period = int(request.now // COOKIE_PERIOD)
    # As bytes: compare_digest refuses text that is not ASCII.
    if not any(hmac.compare_digest(fields[0].encode(),
                                   make_cookie(chat, request.address, p).encode())
               for p in (period, period - 1)):
        raise Refused("stale-cookie", "Say HELLO again.")
    request.proven, fields = True, fields[:-1]
    if len(fields) not in counts:
        raise PacketError(f"expected {' or '.join(map(str, counts))} fields, got {len(fields)}")
    request.user = fields[1]
    return fields


def srp_number(text: str, what: str) -> int:
    """Return a number sent in hex, if 1 < it < N - 1 (0, 1 and -1 mod N would give S away)."""
    if not re.fullmatch(r"[0-9a-f]{1,512}", text) or not 1 < int(text, 16) < wire.SRP_N - 1:
        raise Refused("bad-request", f"{what} is not a number of the group in hex.")
    return int(text, 16)


def handle_register(chat: ChatServer, request: Request) -> list[str]:
    """REGISTER [cookie, name, salt, iterations, verifier, A, tag]: the client made v = g^x;
    stored. The tag, under Z = A^y = Y^a, and the answer's prove that the server holding y
    (its fingerprint) took this very verifier: a relay without y can forge neither."""
    _, name, salt, iterations, verifier, A, tag = fields = check_cookie(chat, request, 7)
    if not auth.valid_username(name):
        raise Refused("bad-name", "Usernames are 1-20 letters, digits, '_', '.' or '-'.")
    # A look-alike of a name in use (aIice for alice) is taken too.
    if chat.users.taken(name):
        raise Refused("taken", "Username already taken.")
    wait = chat.registrations.locked_for(request.address[0], request.now)
    if wait:
        raise Refused("slow-down", f"Too many registrations from your address; "
                                   f"try again in {wait:.0f} s.")
    # Fewer iterations than ours would make the stored verifier cheap to guess against.
    if not (wire.whole_number(iterations) and int(iterations) >= chat.users.iterations
            and re.fullmatch(r"[0-9a-f]{32,128}", salt)):
        raise Refused("bad-request", f"The salt must be 16-64 bytes in hex, the iterations "
                                     f"at least {chat.users.iterations}.")
    # Counted before the power (5 ms): 20 a minute per address, however they end.
    chat.registrations.add(request.address[0], request.now)
    Z = pow(srp_number(A, "A"), chat.key[0], wire.SRP_N)
    if not hmac.compare_digest(tag.encode(), wire.register_tag(Z, fields[:6]).encode()):
        raise Refused("bad-request", "The registration's tag is wrong: changed on the way?")
    record = {"name": name, "kdf": auth.VERIFIER_KDF, "iterations": int(iterations),
              "salt": salt, "verifier": format(srp_number(verifier, "The verifier"), "x")}
    # On disk before we say so: a confirmed registration survives a crash.
    if not saved(chat, chat.users.add, record, what="your account"):
        raise Refused("taken", "Username already taken.")
    return [wire.register_tag(Z, [tag, "Registration successful."]), "Registration successful."]


def handle_login(chat: ChatServer, request: Request) -> list[str] | None:
    """LOGIN [cookie, name, A] -> [salt, iterations, B]; then LOGIN [cookie, name, A, M1]
    (and maybe 'rejoin') -> [name, room, welcome, M2] and the session's token."""
    if request.session is not None:
        raise Refused("already-logged-in", "This client is logged in already; log out first.")
    fields = check_cookie(chat, request, 3, 4, 5)
    # Checked before any modular exponentiation: a lockout costs the guesser, not the server.
    # It locks the guesser's address (for this account, or for all), not the owner elsewhere.
    wait = chat.failed_logins.locked_for(request.user, request.address[0], request.now)
    if wait:
        raise Refused("locked", f"Too many failed attempts; try again in {wait:.0f} s.")
    if len(fields) > 3:
        return check_proof(chat, request, fields)
    record = chat.users.get(request.user)
    if record and "verifier" not in record:
        chat.log.problem(f"{record['name']} has a password hash of protocol 4, which cannot "
                         "log in: remove the account from the users file to register it again")
    # An unknown name gets a salt of its own, always the same, and a random verifier: its
    # answer looks like any other, and the proof that follows is wrong, as a bad password's.
    if not (record and "verifier" in record):
        salt = hmac.new(chat.cookie_secret, request.user.lower().encode(), "sha256").digest()
        record = {"name": "", "iterations": chat.users.iterations, "salt": salt[:16].hex(),
                  "verifier": FAKE_VERIFIER}
    start_check(chat, request, finish_challenge, srp_challenge, request.user,
                srp_number(fields[2], "A"), record, record=record)


def srp_challenge(name: str, A: int, record: dict) -> tuple[int, bytes, bytes, bytes]:
    """The worker's part of a LOGIN: return B, the key K, and the proofs M1 and M2."""
    B, S = wire.srp_server(int(record["verifier"], 16), secrets.randbits(256), A)
    return (B, *wire.srp_proofs(name, bytes.fromhex(record["salt"]), A, B, S))


def finish_challenge(chat: ChatServer, job: PasswordJob) -> list[str]:
    """Keep what the proof must be (for a minute, bounded); send the salt and B."""
    request, (B, K, M1, M2) = job.request, job.result
    fields = wire.unpack_fields(request.packet.payload)
    key = (request.address, request.user.lower())
    chat.challenges[key] = (fields[2], M1.hex(), M2.hex(), job.record, request.now, K)
    chat.challenges.move_to_end(key)
    if len(chat.challenges) > RETRY_CACHE_SIZE:
        chat.challenges.popitem(last=False)
    return [job.record["salt"], str(job.record["iterations"]), format(B, "x")]


def check_proof(chat: ChatServer, request: Request, fields: list[str]) -> list[str]:
    """LOGIN's second step: M1 right, a session and M2 (the server knew the verifier)."""
    _, name, A, M1, *rejoin = fields
    request.rejoin = rejoin == ["rejoin"]
    challenge = chat.challenges.pop((request.address, name.lower()), None)
    if not challenge or challenge[0] != A or request.now - challenge[4] > 2 * COOKIE_PERIOD:
        raise Refused("stale-cookie", "Say HELLO again.")
    if not (challenge[3]["name"] and hmac.compare_digest(M1.encode(), challenge[1].encode())):
        chat.failed_logins.failed(name, request.address[0], request.now)
        raise Refused("invalid-login", "Invalid username or password.")
    chat.failed_logins.succeeded(name, request.address[0], request.now)
    welcome = open_login(chat, request, challenge[3]["name"])
    session, K = chat.sessions[request.address], challenge[5]
    session.keys = wire.session_keys(K)
    session.channel.key = session.file_stream.key = session.keys.to_client
    # M2 proves K; the welcome's tag, made from it, proves the token and all the rest.
    request.reply_key = session.channel.key
    # The RESET that will end this session, if we lose it, sealed: only its client learns it.
    proof = reset_proof(chat, session.token).hex()
    return [*welcome, challenge[2], wire.seal_text(session.keys.seal, proof)]


def reset_proof(chat: ChatServer, token: bytes) -> bytes:
    """The 16 bytes a RESET for this token carries (QUIC's stateless reset): made from our key
    y, so a restarted server, which knows no session, can still make them. It is sent only
    once no session has the token: then it can end nothing the server still has."""
    return wire.srp_hash(b"reset", chat.key[0], token)[:16]


def open_login(chat: ChatServer, request: Request, name: str) -> list[str]:
    """Open a session; one elsewhere is replaced, unless this is a client's rejoin."""
    here, elsewhere = chat.sessions.get(request.address), chat.online.get(name.lower())
    if chat.stopping:
        raise Refused("stopping", "The server is stopping; try again in a moment.")
    if here and here.name.lower() != name.lower():
        raise Refused("already-logged-in", "This client is logged in already; log out first.")
    if elsewhere and elsewhere is not here:
        # A client coming back by itself never pushes a newer one out.
        if request.rejoin:
            raise Refused("logged-in-elsewhere", f"{name} logged in elsewhere.")
        chat.end_session(elsewhere, "logged in elsewhere", request.now, tell="replaced")
    # A new login from this address starts afresh: new keys, channels from 1. (A replayed
    # LOGIN never gets here: each proof answers one challenge.)
    if here:
        chat.end_session(here, "", request.now)
    if len(chat.sessions) >= MAX_SESSIONS:
        raise Refused("full", "Server full; try again later.")
    here = chat.open_session(name, request.address, request.now)
    # The session's token goes in the answer's header.
    request.reply_token = here.token
    return [here.name, LOBBY, f"Welcome, {here.name}."]


def start_check(chat: ChatServer, request: Request, then, work, *args, record=None) -> None:
    """Queue `work(*args)`, slow work (a hash, SRP's powers), for the worker; `then` answers.
    Until then a member's next requests wait, and a handshake's retries get no answer."""
    if chat.pending_checks >= MAX_PENDING_CHECKS:
        raise Refused("busy", "Server busy; try again in a moment.")
    chat.pending_checks += 1
    if request.session:
        request.session.checking = True
    else:
        remember(chat, request, PENDING)
    queue_fairly(chat.password_jobs, PasswordJob(request, lambda: work(*args), then, record))


def queue_fairly(jobs: list, job: PasswordJob) -> None:
    """Queue `job` in its round: how many jobs its address, or its account, has waiting.
    Each round goes before the next, so a source's tenth check waits behind everyone's first."""
    def sources(queued: PasswordJob) -> tuple:
        request = queued.request
        account = request.session.name if request.session else request.user
        return request.address[0], account.lower()
    address, user = sources(job)
    mine = max(sum(sources(queued)[0] == address for queued in jobs),
               sum(sources(queued)[1] == user for queued in jobs))
    seen, position = collections.Counter(), len(jobs)
    for index, queued in enumerate(jobs):
        ahead = sources(queued)
        if max(seen[0, ahead[0]], seen[1, ahead[1]]) > mine:
            position = index
            break
        seen[0, ahead[0]] += 1
        seen[1, ahead[1]] += 1
    jobs.insert(position, job)


def refuse_failed_check(chat: ChatServer, job: PasswordJob) -> None:
    """A password check that raised (a damaged record, say): the client may try again."""
    raise Refused("server-error", "The server could not check that; try again.")


def saved(chat: ChatServer, change, *args, what: str, after: str = "try again"):
    """Return change(*args), a write to a file; if the disk fails, refuse (`what` not saved)."""
    try:
        return change(*args)
    except OSError as error:
        chat.log.problem(f"a write to disk failed ({what}): {error}")
        raise Refused("server-error", f"The server could not save {what}; {after}.") from None


def handle_join(chat: ChatServer, request: Request) -> list[str] | None:
    """JOIN [room, password sealed with the session's key]: a listener cannot read it."""
    name, sealed = wire.unpack_fields(request.packet.payload, 2)
    password = wire.open_text(request.session.keys.seal, sealed)
    if not auth.valid_username(name):
        raise Refused("bad-name", "Room names are 1-20 letters, digits, '_', '.' or '-'.")
    room = chat.rooms.get(name.lower())
    if room and request.session.room == name.lower():
        return [room.name, str(len(room.members)), f"You are in {room.name} already."]
    check_room_lock(chat, request)
    if room is None:
        check_room_space(chat, request.session)
        return start_check(chat, request, finish_join, auth.new_record, name, password,
                           chat.users.iterations)
    # The lobby's password is the one on the command line; a room's is hashed, so slow.
    if room.record is None:
        matches = hmac.compare_digest(password.encode(), chat.config.room_password.encode())
        return enter_room(chat, request, room, matches)
    return start_check(chat, request, finish_join, auth.check_password, password, room.record,
                       record=room.record)


def finish_join(chat: ChatServer, job: PasswordJob) -> list[str]:
    """The password check of a JOIN came back: enter the room, or make it."""
    # The room's name: as it was made, or as the new room's record says it.
    request, name = job.request, (job.record or job.result)["name"]
    room = chat.rooms.get(name.lower())
    # While the hash ran, the room may have been forgotten, or made by another member.
    if job.record is None and room is not None:
        raise Refused("taken", f"{room.name} was made a moment ago; /join it with its password.")
    if job.record is not None:
        if room is None or room.record is not job.record:
            raise Refused("taken", f"{name} changed a moment ago; /join it again.")
        return enter_room(chat, request, room, job.result)
    check_room_space(chat, request.session)
    record = {**job.result, "created": int(chat.wall_clock()), "by": request.session.name.lower()}
    saved(chat, chat.room_store.add, record, what="the room")
    room = chat.rooms[record["name"].lower()] = Room(record["name"], record)
    return enter_room(chat, request, room, True, " (new room)")


def check_room_lock(chat: ChatServer, request: Request, wrong: bool = False) -> None:
    """Count a wrong room password (if `wrong`); refuse an account that guessed 5 wrong.
    It counts for the account on its PC: a new login starts no new count, and other
    accounts on that PC are not locked out with it."""
    guesser = request.address[0], request.session.name.lower()
    if wrong:
        chat.wrong_room_passwords.add(guesser, request.now)
    wait = chat.wrong_room_passwords.locked_for(guesser, request.now)
    if wait:
        raise Refused("locked", f"Too many wrong room passwords; try again in {wait:.0f} s.")


def enter_room(chat: ChatServer, request: Request, room: Room, password_ok, made="") -> list[str]:
    """Move the member to `room`: it is shown the room's past, the others hear of it."""
    session = request.session
    if not password_ok:
        # The last guess allowed says so at once.
        check_room_lock(chat, request, wrong=True)
        raise Refused("wrong-room-password", "Wrong room password.")
    if session.room:
        leave_room(chat, session, f"went to {room.name}")
    chat.publish(room, "join", session.name, "")
    room.members[session.name.lower()] = session
    session.room = room.name.lower()
    for when, user, text in room.history:
        chat.tell(session, chat.event("history", room.name, user, text, when=when))
    count = len(room.members)
    return [room.name, str(count), f"joined {room.name}{made}, {count} here"]


def leave_room(chat: ChatServer, session: Session, reason: str) -> None:
    room = chat.rooms[session.room]
    del room.members[session.name.lower()]
    session.room = None
    chat.publish(room, "leave", session.name, reason)


def check_room_space(chat: ChatServer, session: Session) -> None:
    """Before a room is made: refuse an account's sixth room, and any past MAX_ROOMS."""
    maker = session.name.lower()
    made = sum((room.record or {}).get("by") == maker for room in chat.rooms.values())
    if made >= ROOMS_PER_ACCOUNT:
        raise Refused("too-many-rooms", f"You have made {ROOMS_PER_ACCOUNT} rooms already; "
                      "join one of them (/rooms lists them all).")
    if len(chat.rooms) >= MAX_ROOMS:
        raise Refused("full", "Server full: no more rooms can be made.")


def handle_say(chat: ChatServer, request: Request) -> list[str]:
    session, (text,) = request.session, wire.unpack_fields(request.packet.payload, 1)
    room = room_of(chat, session)
    check_text(text)
    when = chat.wall_clock()
    # On file before anyone hears it.
    saved(chat, chat.history.append, when, room.name, session.name, text,
          what="your message", after="not sent")
    room.history.append((when, session.name, text))
    # The assignment: the server prints every message it relays (once, cut short).
    shown = text if len(text) <= LOGGED_TEXT else f"{text[:LOGGED_TEXT]}... ({len(text)} chars)"
    request.note = f"[{room.name}] {session.name}: {shown!r}"
    chat.publish(room, "chat", session.name, text, exclude=session)
    others = len(room.members) - 1
    return [f"to {room.name}, {others} other{'' if others == 1 else 's'}"]


def handle_private(chat: ChatServer, request: Request) -> list[str]:
    target_name, text = wire.unpack_fields(request.packet.payload, 2)
    # A room's password is the way into the chat: private messages too.
    room_of(chat, request.session)
    target = find_member(chat, target_name)
    check_text(text)
    chat.tell(target, chat.event("private", "", request.session.name, text))
    return [f"private to {target.name}"]


def handle_rooms(chat: ChatServer, request: Request) -> list[str]:
    """ROOMS -> OK [room, count, room, count...]: every room, empty ones with their 0."""
    wire.unpack_fields(request.packet.payload, 0)
    pairs = [[room.name, str(len(room.members))] for room in chat.rooms.values()]
    return fit_fields([field for pair in pairs for field in pair], step=2)


def handle_who(chat: ChatServer, request: Request) -> list[str]:
    wire.unpack_fields(request.packet.payload, 0)
    room = room_of(chat, request.session)
    return fit_fields([room.name] + sorted(member.name for member in room.members.values()))


def handle_ping(chat: ChatServer, request: Request) -> list[str]:
    """PING -> OK []: a heartbeat, "still here"; that it came is all that counts."""
    wire.unpack_fields(request.packet.payload, 0)
    return []


def handle_bye(chat: ChatServer, request: Request) -> list[str]:
    wire.unpack_fields(request.packet.payload, 0)
    chat.end_session(request.session, "", request.now)
    return ["goodbye"]


def handle_find(chat: ChatServer, request: Request) -> list[str] | None:
    """FIND -> OK [name, port, members online, fingerprint]; unpadded, over the rate: dropped."""
    why = f"unpadded ({request.size} B)"
    if request.size >= wire.MIN_FIND_SIZE:
        # The padding, and nothing else.
        wire.unpack_fields(request.packet.payload, 1)
        if not find_bucket(chat, request.address[0], request.now).take(request.now):
            return [chat.name, str(chat.port), str(len(chat.online)), wire.fingerprint(chat.key[1])]
        why = "over its address's rate of answers"
    refuse(chat, request.address, f"sent a FIND, {why}; dropped", count="finds dropped")


def find_bucket(chat: ChatServer, host: str, now: float) -> "TokenBucket":
    """Return the FIND bucket of one asking address, made full if it is new (or forgotten)."""
    bucket = chat.find_buckets.pop(host, None) or TokenBucket(FIND_RATE, FIND_BURST, now)
    chat.find_buckets[host] = bucket
    if len(chat.find_buckets) > FIND_ADDRESSES:
        chat.find_buckets.popitem(last=False)
    return bucket


def handle_file_offer(chat: ChatServer, request: Request) -> list[str]:
    """FILE_OFFER [to, name, size, SHA-256] -> OK [id]; each receiver gets EVENT file and
    answers FILE_CANCEL [id, "accept"] (or [id]: no); a receiver with too much waiting is
    left out, and the sender told."""
    session = request.session
    to, name, size, sha = wire.unpack_fields(request.packet.payload, 4)
    room = room_of(chat, session)
    receivers = [find_member(chat, to)] if to else [
        member for member in room.members.values() if member is not session]
    if session in receivers:
        raise Refused("to-self", "That is you; send it to someone else.")
    if not receivers:
        raise Refused("nobody", "Nobody else is in the room to share it with.")
    upload = chat.files.open(session, name, size, sha, receivers, request.now)
    number, described = upload.id, wire.describe_size(upload.size)
    text = f"{session.name} offers {name} ({described}): /accept {number} or /decline {number}"
    for member in receivers:
        where = chat.rooms[member.room].name if member.room else ""
        event = chat.event("file", where, session.name, text, number, name, upload.size, sha)
        # A receiver whose channel had no room for the offer is left out.
        if member in upload.receivers and not chat.tell(member, event):
            del upload.receivers[member]
        elif member not in upload.receivers:
            chat.notify(session, "file-declined", member.name, f"{name} not offered to "
                        f"{member.name}: too many offers wait for an answer", number)
    chat.files.settle(upload)
    return [str(number)]


def handle_file_cancel(chat: ChatServer, request: Request) -> list[str]:
    """FILE_CANCEL [id]: the sender's ends the transfer for all; a receiver's, for itself.
    FILE_CANCEL [id, "accept"]: a receiver takes the offer, and its chunks start."""
    fields = wire.unpack_fields(request.packet.payload)
    if not 1 <= len(fields) <= 2 or fields[1:] not in ([], ["accept"]):
        raise Refused("bad-request", 'A FILE_CANCEL is [id], or [id, "accept"].')
    number = int(fields[0]) if wire.whole_number(fields[0]) else 0
    if fields[1:]:
        chat.files.accept(request.session, number)
        return ["accepted"]
    chat.files.cancel_by(request.session, number)
    return ["cancelled"]


def refuse(chat: ChatServer, address: Address, what: str, count: str = "bad") -> None:
    """Count a datagram that is not handled, and log what it was."""
    chat.stats[count] += 1
    chat.log.problem(f"{describe_address(address)} {what}")


def member_of(chat: ChatServer, request: Request, data: bytes) -> Session | None:
    """Return the session a member's packet is for, if it is the member's; else refuse it."""
    session = chat.sessions.get(request.address)
    if session is None or not hmac.compare_digest(session.token, request.packet.token):
        return refuse_stranger(chat, request, session)
    # The token is on the wire for anyone to read; only the member's client can make the tag.
    # A forgery is dropped unanswered, and the session goes on.
    if not wire.tagged_by(data, session.keys.to_server):
        return refuse(chat, request.address, f"sent {request.packet.type.name} with the token "
                                             f"of {session.name} but a wrong tag; dropped")
    return session


def refuse_stranger(chat: ChatServer, request: Request, session: Session | None) -> None:
    """A member's packet with no session behind it: RESET, if nobody is at that address."""
    chat.stats["no-session"] += 1
    packet, sender = request.packet, f"sent {request.packet.type.name}"
    # The last ACK of a client that said BYE, say: nothing to answer. A server's type
    # may be another server answering what we sent: a RESET back would be answered too.
    if packet.type == PacketType.ACK or packet.type in wire.SERVER_ONLY:
        return refuse_misplaced(chat, request)
    if session is not None:
        return chat.log.problem(f"{describe_address(request.address)} {sender} with a "
                                "wrong session token; dropped")
    # A session's token from another address: its member moved (its session times out, then
    # this is answered), or someone read the token. A RESET's proof must not reach them.
    if any(hmac.compare_digest(other.token, packet.token) for other in chat.sessions.values()):
        return chat.log.problem(f"{describe_address(request.address)} {sender} with the token "
                                "of a session at another address; dropped")
    chat.log.problem(f"{describe_address(request.address)} {sender} but has no session; "
                     "told to log in")
    # It echoes the token and carries the proof that the login sealed for that token: a
    # client believes only that. Never larger than a tagged packet (48 bytes). What a session
    # ended in this batch still owes goes first: "replaced" must not come after a RESET.
    chat.flush(request.now)
    proof = reset_proof(chat, packet.token)
    reset = Packet(PacketType.RESET, 0, packet.seq, 0, packet.token, payload=proof)
    chat.send(wire.encode_packet(reset, chat.cipher), request.address, limit=request.size)


def refuse_misplaced(chat: ChatServer, request: Request) -> None:
    """A numbered ACK or a FILE_CHUNK on the chat channel (a client's bug) is refused; what
    only servers send is never answered (two servers could answer each other for ever)."""
    ptype = request.packet.type
    if ptype in wire.SERVER_ONLY:
        return refuse(chat, request.address, f"sent {ptype.name}, which only servers send; dropped")
    if request.session is None:
        return None
    if ptype == PacketType.ACK:
        raise Refused("bad-request", "An ACK carries no sequence number.")
    raise Refused("bad-request", "A FILE_CHUNK goes on the file stream (FLAG_FILE_STREAM).")


# Found by the packet type's name, as handle_say for SAY; ACK, FILE_CHUNK and what only
# servers send are misplaced on a member's chat channel.
HANDLERS = {ptype: globals().get(f"handle_{ptype.name.lower()}", refuse_misplaced)
            for ptype in PacketType}


# --- What the handlers share ---


def room_of(chat: ChatServer, session: Session) -> Room:
    """Return the member's room; refuse if it is in none."""
    if session.room is None:
        raise Refused("not-in-room", "Join a room first: /join ROOM")
    return chat.rooms[session.room]


def find_member(chat: ChatServer, name: str) -> Session:
    """Return the session of the user named; refuse if no such user, or not online."""
    if name.lower() in chat.online:
        return chat.online[name.lower()]
    if chat.users.exists(name):
        raise Refused("not-online", f"{name} is not online.")
    # The name may be anything: never echoed.
    raise Refused("unknown-user", "No such user.")


def check_text(text: str) -> None:
    """Refuse an empty message, or one too long for an EVENT."""
    if not text.strip():
        raise Refused("empty", "Empty message; nothing sent.")
    if wire.oversize_text(text):
        raise Refused("too-long", wire.oversize_text(text))


def fit_fields(fields: list[str], step: int = 1) -> list[str]:
    """Return as many whole groups of `step` fields as fit in one answer, then '+N'."""
    # Room for the request number, the '+N' and their length prefixes.
    for end in range(0, len(fields) + 1, step):
        if len(wire.pack_fields(*fields[:end])) > wire.MAX_PAYLOAD - 64:
            return fields[:end - step] + [f"+{(len(fields) - end + step) // step}"]
    return fields


def retry_key(request: Request) -> tuple:
    """Who asked what: a retry has the same address, number and bytes as the first try."""
    return request.address, request.packet.seq, hash((request.packet.type, request.packet.payload))


def remember(chat: ChatServer, request: Request, answer: bytes) -> None:
    """Keep the answer (or PENDING) to a REGISTER or LOGIN for its retries; bounded."""
    key = retry_key(request)
    chat.replies[key] = answer
    chat.replies.move_to_end(key)
    if len(chat.replies) > RETRY_CACHE_SIZE:
        chat.replies.popitem(last=False)


def host_name() -> str:
    """Return this PC's host name, cut to MAX_NAME_BYTES (never half a character)."""
    name = socket.gethostname() or "chat server"
    return str(name.encode("utf-8")[:MAX_NAME_BYTES], "utf-8", "ignore")


# === Helpers: the log, flood control, the history file =======================================


class ServerLog:
    """The log: a line per action (time, peer, user, type, size, outcome), and problems."""

    def __init__(self, emit, quiet: bool = False, verbose: bool = False):
        self.emit, self.quiet, self.verbose = emit, quiet, verbose
        self.second, self.problems = 0, 0

    def line(self, text: str) -> None:
        self.emit(f"{time.strftime('%H:%M:%S')} {text}")

    def action(self, address: Address, user: str, what: str, outcome: str, size=None) -> None:
        # A name not yet checked may hold anything: quoted, and short.
        user = user if auth.valid_username(user or "-") else repr(user[:20])
        if not self.quiet:
            size = "" if size is None else f" {size} B"
            self.line(f"{describe_address(address)} {user or '-'} {what}{size}  {outcome}")

    def answer(self, request: Request, ptype: PacketType, fields: list[str]) -> None:
        """Log how a request was answered: once, with what the handler noted."""
        if request.packet.type in QUIET_TYPES and not self.verbose:
            return
        outcome = f"ok: {fields[-1]}" if fields else "ok"
        if ptype == PacketType.ERROR:
            outcome = f"refused: {fields[1]}"
        user = request.session.name if request.session else request.user
        outcome = f"{outcome}  {request.note}".rstrip()
        self.action(request.address, user, request.packet.type.name, outcome, request.size)

    def problem(self, text: str | None) -> None:
        """Log something wrong, at most PROBLEMS_PER_SECOND lines a second; once a second is
        over, say how many problems of it were not shown (None: no new problem)."""
        second = int(time.monotonic())
        if second != self.second:
            if self.problems > PROBLEMS_PER_SECOND:
                self.line(f"[WARN] ... and {self.problems - PROBLEMS_PER_SECOND} more problems "
                          "in the second before, not shown")
            self.second, self.problems = second, 0
        if text is not None:
            self.problems += 1
            if self.problems <= PROBLEMS_PER_SECOND:
                self.line(f"[WARN] {text}")

    def trace(self, direction: str, data: bytes, address: Address) -> None:
        """With --verbose: every datagram in and out, its header spelled out."""
        if self.verbose:
            self.line(f"[trace] {direction} {describe_address(address)} "
                      f"{wire.describe_datagram(data)}")


class TokenBucket:
    """Flood control: `burst` at once, then `rate` a second. The bucket holds up to `burst`
    tokens and refills at `rate` a second; each message takes one. An empty bucket says
    how long until the next token: the caller waits."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.updated = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        """Spend one token and return 0, or return the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        # A hair short of 1 is rounding: else now + wait == now, for ever.
        if self.tokens >= 1 - 1e-9:
            self.tokens = max(self.tokens - 1, 0.0)
            return 0.0
        return (1 - self.tokens) / self.rate


class HistoryFile:
    """chat_history.txt: a line a person can read per message, appended and flushed.

        2026-12-01 07:46:05 UTC  #lobby  alice: two lines:\\nthe second

    A backslash or line break in a message is written escaped (`\\\\`, `\\n`, `\\r`), and any
    other control character as `\\uXXXX` (ESC is `\\u001b`), so each message stays one line,
    `tail` on a terminal shows no escape sequence at work, and it reads back exactly as said.
    """

    LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC  #(\S+)  (\S+?): (.*)")
    ESCAPES = {"\n": "\\n", "\r": "\\r"}
    # C0 and C1 controls, DEL, the Unicode line breaks and the bidi controls
    CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

    def __init__(self, path: str):
        self.path, self.file = path, open(path, "a+b")
        # Killed mid-write last time: end that line, so the next one stands alone.
        if self.file.seek(0, os.SEEK_END):
            self.file.seek(-1, os.SEEK_END)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")
                self.file.flush()

    def append(self, when: float, room: str, user: str, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
        escaped = self.CONTROLS.sub(lambda m: self.ESCAPES.get(m[0]) or f"\\u{ord(m[0]):04x}",
                                    text.replace("\\", "\\\\"))
        self.file.write(f"{stamp} UTC  #{room}  {user}: {escaped}\n".encode())
        # In the OS's hands now: survives the server being killed.
        self.file.flush()

    @classmethod
    def read(cls, path: str, warn=print):
        """Yield (unix time, room, user, text) for each message on file; warn of damage."""
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, 1):
                found = cls.LINE.fullmatch(line.rstrip("\n"))
                if found:
                    stamp, room, user, text = found.groups()
                    when = calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
                    text = re.sub(r"\\(u[0-9a-f]{4}|.)", cls.unescape, text)
                    yield float(when), room, user, text
                elif line.strip():
                    warn(f"{path} line {number} is damaged (a crash mid-write?); skipped")

    @staticmethod
    def unescape(found: re.Match) -> str:
        code = found[1]
        return chr(int(code[1:], 16)) if len(code) == 5 else {"n": "\n", "r": "\r"}.get(code, code)

    def close(self) -> None:
        self.file.close()


def load_rooms(store: auth.UserStore, history: str, warn) -> dict[str, Room]:
    """Return the rooms by lower-case name, the lobby first, each with its last messages.
    A room taken out of rooms.json leaves its lines in chat_history.txt: one made later
    with that name starts without them."""
    rooms = {LOBBY: Room(LOBBY, None)}
    for key, record in store.records.items():
        rooms.setdefault(key, Room(record["name"], record))
    for when, name, user, text in HistoryFile.read(history, warn):
        room = rooms.get(name.lower())
        if room and when >= (room.record or {}).get("created", 0):
            room.history.append((when, user, text))
    return rooms


# === The file relay ==========================================================================
# A FILE_OFFER's upload is stored in DATA_DIR/transfers/ID.part as its chunks come on the
# sender's file stream, checked (SHA-256), then relayed to each receiver from that file.


@dataclasses.dataclass
class Receiver:
    """Where one receiver is in one file: its consent, and bytes sent on its file stream."""

    # When the offer lapses unless accepted; never, once accepted: only then chunks go.
    lapses_at: float
    sent: int = 0
    # The file stream's number of the last chunk put in.
    last_seq: int = 0

    @property
    def accepted(self) -> bool:
        return self.lapses_at == float("inf")


@dataclasses.dataclass(eq=False)
class Upload:
    """A file from its sender, kept in a temporary `file` till every receiver has it."""

    id: int
    sender: Session
    name: str
    size: int
    sha256: str
    file: object
    last_progress: float
    # Session -> its Receiver, till it has the file or is out.
    receivers: dict = dataclasses.field(default_factory=dict)
    received: int = 0
    checked: bool = False
    digest: object = dataclasses.field(default_factory=hashlib.sha256)


class FileRelay:
    """Uploads stored to disk, then relayed to each receiver on its own file stream.

    Its interface: `open` (an offer), `receive` (a sender's file stream), `fill` (a
    receiver's), `settle`, `accept`, `cancel_by`, `drop`, `expire`, `remove`. It speaks to
    members only through `notify(session, kind, user, text, id)`. A receiver gets chunks
    once it accepted the offer, and while its file stream has fewer than FILL waiting.
    """

    def __init__(self, folder: str, max_file_mb: float, notify, log: ServerLog):
        self.folder, self.max_file_mb, self.notify, self.log = folder, max_file_mb, notify, log
        self.uploads, self.next_id = {}, 1
        # What a crash left here: files never completed.
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".part"):
                os.remove(os.path.join(folder, name))

    def open(self, sender, name: str, size: str, sha: str, receivers, now: float) -> Upload:
        """Start an upload for the `receivers` with room for one more offer waiting; refuse a
        bad offer, a file too big, too many, or one nobody has room for."""
        if not (wire.whole_number(size) and wire.SHA_HEX.fullmatch(sha)
                and 0 < len(name.encode()) <= wire.MAX_FILE_NAME_BYTES):
            raise Refused("bad-request", "A file offer is [to, name (1-255 bytes), size, SHA-256].")
        if int(size) > self.max_file_mb * wire.MB:
            raise Refused("too-big", f"That file is {int(size):,} bytes; the limit is "
                                     f"{self.max_file_mb:g} MB.")
        welcome = self.find_place(sender, receivers, int(size))
        path = os.path.join(self.folder, f"{self.next_id}.part")
        try:
            file = open(path, "w+b", buffering=0)
        except OSError as error:
            self.log.problem(f"cannot open {path}: {error}")
            raise Refused("server-error", "The server cannot store files now; "
                                          "try again later.") from None
        upload = self.uploads[self.next_id] = Upload(self.next_id, sender, name, int(size), sha,
                                                     file, now)
        self.next_id += 1
        names = ", ".join(member.name for member in welcome)
        upload.receivers = {member: Receiver(now + OFFER_LAPSE) for member in welcome}
        self.log_file(upload, f"offered to {names}, {wire.describe_size(upload.size)}")
        return upload

    def find_place(self, sender, receivers, size: int) -> list:
        """Return the receivers with room for one more offer waiting; refuse a sender with
        its fair share of places, or an offer none of them has room for."""
        mine = sum(upload.sender is sender for upload in self.uploads.values())
        if mine >= MAX_FILES_PER_MEMBER:
            raise Refused("too-many", f"You are sending {MAX_FILES_PER_MEMBER} files already; "
                                      "wait for one to finish.")
        welcome = [member for member in receivers if self.may_wait(member, size)]
        if receivers and not welcome:
            raise Refused("offers-waiting", f"Too many offers wait for an answer there (at most "
                          f"{MAX_OFFERS_WAITING}, {MAX_WAITING_MB} MB); try again later.")
        if len(self.uploads) >= MAX_TRANSFERS:
            self.make_room(mine)
        return welcome

    def may_wait(self, member, size: int) -> bool:
        """Has `member` room for one more offer (of `size` bytes) waiting for its answer?"""
        waiting = [upload.size for upload in self.uploads.values()
                   if member in upload.receivers and not upload.receivers[member].accepted]
        return (len(waiting) < MAX_OFFERS_WAITING
                and sum(waiting) + size <= MAX_WAITING_MB * wire.MB)

    def make_room(self, mine: int) -> None:
        """Every place is taken: cancel the idlest upload of a member holding the most, if
        that is more than the `mine` of the one asking (a fair share each); else refuse."""
        held = collections.Counter(upload.sender for upload in self.uploads.values())
        most = max(held.values())
        if most <= mine:
            raise Refused("busy", "The server is busy with other files; try again in a while.")
        # One still uploading, and the longest without a chunk, goes first.
        idlest = min((upload for upload in self.uploads.values() if held[upload.sender] == most),
                     key=lambda upload: (upload.checked, upload.last_progress))
        self.cancel(idlest, "the server needed its place for another member's file")

    def receive(self, session, packet: Packet, now: float) -> list:
        """A packet on a member's file stream: acknowledgements, and chunks of its uploads.
        Return the receivers of its uploads: new bytes may go on to them."""
        for delivered in session.file_stream.receive(packet, now)[1]:
            if delivered.seq and delivered.type == PacketType.FILE_CHUNK:
                with contextlib.suppress(PacketError):
                    self.write(session, *wire.unpack_chunk(delivered.payload), now)
        return [member for upload in self.uploads.values() if upload.sender is session
                for member in upload.receivers]

    def write(self, session, number: int, offset: int, data: bytes, now: float) -> None:
        """Write an upload's next chunk to its file: chunks come in order, so at its end."""
        upload = self.uploads.get(number)
        # Cancelled meanwhile (chunks in flight still come), or not the sender's.
        if upload is None or upload.sender is not session or upload.checked:
            return
        if offset != upload.received or len(data) != wire.chunk_length(upload.size, offset):
            return self.cancel(upload, "its chunks did not fit the file")
        try:
            upload.file.seek(offset)
            upload.file.write(data)
        except OSError as error:
            self.log.problem(f"cannot write {upload.file.name}: {error}")
            return self.cancel(upload, "the server could not store it")
        upload.digest.update(data)
        upload.received, upload.last_progress = upload.received + len(data), now
        self.settle(upload)

    def settle(self, upload: Upload) -> None:
        """Check the SHA-256 once every byte is in (at once, for an empty file); delete the
        file once nobody is left to receive it (stopping an upload still coming)."""
        if upload.id not in self.uploads:
            return
        if not upload.checked and upload.received == upload.size:
            if upload.digest.hexdigest() != upload.sha256:
                return self.cancel(upload, "it arrived damaged (SHA-256 mismatch)")
            upload.checked = True
            self.log_file(upload, "arrived whole, SHA-256 checked")
        if upload.receivers:
            return
        if upload.checked:
            self.remove(upload)
        else:
            self.cancel(upload, "nobody is left to receive it")

    def fill(self, session) -> None:
        """Note the files `session` has whole; put chunks in its file stream while it has
        room, one file after the other in turn."""
        stream = session.file_stream
        mine = [(upload, upload.receivers[session]) for upload in list(self.uploads.values())
                if session in upload.receivers]
        for upload, where in mine:
            if (upload.checked and where.sent == upload.size and stream.delivered(where.last_seq)
                    and where.accepted):
                self.forget(upload, session, "file-done", f"{session.name} has {upload.name}")
        ready = [(upload, where) for upload, where in mine if session in upload.receivers
                 and where.sent < upload.received and where.accepted]
        while ready and len(stream.waiting) < wire.FILL:
            for upload, where in list(ready):
                upload.file.seek(where.sent)
                data = upload.file.read(wire.chunk_length(upload.size, where.sent))
                chunk = wire.pack_chunk(upload.id, where.sent, data)
                where.last_seq = stream.send(PacketType.FILE_CHUNK, chunk)
                where.sent += len(data)
                if where.sent >= upload.received or not data:
                    ready.remove((upload, where))

    def accept(self, session, number: int) -> None:
        """A receiver's FILE_CANCEL [id, "accept"]: chunks go to it from now on."""
        upload = self.uploads.get(number)
        if upload is None or session not in upload.receivers:
            raise Refused("no-such-transfer", "No such offer (lapsed or cancelled?).")
        if not upload.receivers[session].accepted:
            upload.receivers[session].lapses_at = float("inf")
            self.log_file(upload, f"accepted by {session.name}")

    def cancel_by(self, session, number: int) -> None:
        """A FILE_CANCEL: the sender's ends the transfer; a receiver's, its own part."""
        upload = self.uploads.get(number)
        if upload is not None and upload.sender is session:
            return self.cancel(upload, f"{session.name} cancelled it", tell_sender=False)
        if upload is None or session not in upload.receivers:
            raise Refused("no-such-transfer", "No such transfer (finished already?).")
        said = "cancelled" if upload.receivers[session].accepted else "declined"
        self.forget(upload, session, "file-declined", f"{session.name} {said} {upload.name}")

    def drop(self, session) -> None:
        """A session ended: its unchecked uploads stop (a checked one goes on being relayed),
        and it leaves the files it was receiving."""
        for upload in list(self.uploads.values()):
            if upload.sender is session and not upload.checked:
                self.cancel(upload, f"{session.name} left", tell_sender=False)
            elif session in upload.receivers:
                why = f"{session.name} left before {upload.name} arrived"
                self.forget(upload, session, "file-declined", why)

    def forget(self, upload: Upload, session, kind: str, why: str) -> None:
        """A receiver is done (file-done) or out (file-declined): tell the sender."""
        del upload.receivers[session]
        done = f"{session.name} has it all"
        self.log_file(upload, done if kind == "file-done" else f"not for {session.name}: {why}")
        self.notify(upload.sender, kind, session.name, why, upload.id)
        self.settle(upload)

    def cancel(self, upload: Upload, why: str, tell_sender: bool = True) -> None:
        """End a transfer for everyone: the receivers and (unless it asked) the sender hear."""
        self.log_file(upload, f"cancelled: {why}")
        sender = upload.sender.name
        if tell_sender:
            self.notify(upload.sender, "file-cancelled", sender, f"{upload.name} not sent: {why}",
                        upload.id)
        for member in list(upload.receivers):
            self.notify(member, "file-cancelled", sender,
                        f"{upload.name} from {sender} cancelled: {why}", upload.id)
        upload.receivers.clear()
        self.remove(upload)

    def remove(self, upload: Upload) -> None:
        """Close the upload's temporary file (Windows cannot delete an open one), delete it."""
        self.uploads.pop(upload.id, None)
        upload.file.close()
        try:
            os.remove(upload.file.name)
        except OSError as error:
            self.log.problem(f"cannot delete {upload.file.name}: {error}")

    def expire(self, now: float) -> None:
        """Cancel the uploads that gained no byte for UPLOAD_IDLE_LIMIT seconds; end the
        offers not accepted in OFFER_LAPSE seconds, each receiver on its own."""
        for upload in list(self.uploads.values()):
            if not upload.checked and now - upload.last_progress > UPLOAD_IDLE_LIMIT:
                self.cancel(upload, f"no part of it came for {UPLOAD_IDLE_LIMIT:.0f} s")
                continue
            for member in [m for m, where in upload.receivers.items() if where.lapses_at <= now]:
                self.notify(member, "file-cancelled", upload.sender.name, f"{upload.name} from "
                            f"{upload.sender.name} lapsed: not accepted in time", upload.id)
                self.forget(upload, member, "file-declined",
                            f"{member.name} did not accept {upload.name} in {OFFER_LAPSE:.0f} s")

    def log_file(self, upload: Upload, what: str) -> None:
        sender = upload.sender
        self.log.action(sender.address, sender.name, "FILE", f"#{upload.id} {upload.name!r} {what}")


# === The socket loop =========================================================================


def open_socket(host: str, port: int) -> socket.socket:
    """Return a UDP socket bound to (host, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Windows: otherwise an ICMP "port unreachable" for an earlier send makes the next
    # recvfrom() raise ConnectionResetError (WinError 10054). The loop catches it too.
    if hasattr(socket, "SIO_UDP_CONNRESET"):
        sock.ioctl(socket.SIO_UDP_CONNRESET, False)
    # Room for bursts (forty members acknowledging at once); the OS may grant less.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    sock.bind((host, port))
    return sock


class ServerLoop:
    """The one loop that owns the socket: receive, let ChatServer decide, send.

    It waits in select() for a datagram or the next timer: at most MAX_WAIT (so Ctrl+C
    is noticed on Windows too), and at most CHECK_POLL while a password check runs on
    the worker thread (`checks` holds their futures, in the order they came).
    """

    def __init__(self, chat: ChatServer, sock):
        self.chat, self.sock, self.address = chat, sock, sock.getsockname()
        sock.setblocking(False)
        # One buffer for every datagram: a fresh 64 KB one each time fragments the heap.
        self.buffer = bytearray(wire.RECV_BUFFER)
        self.view = memoryview(self.buffer)
        # The port a search is told of (the system's choice, for --port 0).
        chat.port = self.address[1]
        self.worker = concurrent.futures.ThreadPoolExecutor(1, "password-checker")
        self.checks: list[concurrent.futures.Future] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.stopping, self.thread, self.grace = threading.Event(), None, 0.0

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            self.serve_once(MAX_WAIT)

    def serve_once(self, longest: float) -> None:
        """Wait for a datagram, a finished password check or a timer, and handle it."""
        longest = min(longest, CHECK_POLL) if self.checks else longest
        # Timers set meanwhile are later than this one: none can fall due before it.
        deadline = self.chat.next_deadline()
        if self.selector.select(min(max(deadline - time.monotonic(), 0.0), longest)):
            self.receive_all()
        now = time.monotonic()
        for future in [future for future in self.checks if future.done()]:
            self.checks.remove(future)
            self.survive(self.chat.finish_password_job, future.result(), now, where="a check")
        if now >= deadline:
            self.survive(self.chat.on_timers, now, where="the timers")
        self.send_all()

    def receive_all(self) -> None:
        """Read and handle what the socket holds, up to RECEIVE_BATCH datagrams; send what
        they call for after every SEND_AFTER of them, and at the end. The clock is read for
        each: a timer started late in a long batch must not count from its beginning."""
        for count in range(1, RECEIVE_BATCH + 1):
            try:
                size, address = self.sock.recvfrom_into(self.buffer)
            except BlockingIOError:
                break
            # Windows reports "port unreachable" for an earlier sendto() this way; it says
            # nothing about the datagram we are reading, so read on.
            except ConnectionResetError:
                continue
            now = time.monotonic()
            self.survive(self.chat.handle_datagram, bytes(self.view[:size]), address, now,
                         where=f"a datagram from {describe_address(address)}")
            if count % SEND_AFTER == 0:
                self.send_due(now)
        self.send_due(time.monotonic())

    def send_due(self, now: float) -> None:
        """Send what the channels owe, and the outbox."""
        self.survive(self.chat.flush, now, where="sending")
        self.send_all()

    def survive(self, work, *args, where: str) -> None:
        """Run `work(*args)`; if it raises, report the bug and carry on.

        ChatServer checks everything a client sends, and the fuzzers try hard to make it
        raise. Should a bug slip through anyway, one sender must not stop the chat for
        everyone: report it with its cause, as socketserver does, and go on.
        """
        try:
            work(*args)
        # The one place a server must survive its own bug.
        except Exception:
            self.chat.stats["internal-errors"] += 1
            self.chat.log.problem(f"internal error on {where}:\n{traceback.format_exc()}")

    def send_all(self) -> None:
        """Send the outbox, and hand new password checks to the worker."""
        for data, address in self.chat.outbox:
            try:
                self.sock.sendto(data, address)
            # No route to that host, say: that client's problem, not the server's.
            except OSError as error:
                self.chat.log.problem(f"sending to {describe_address(address)} failed: {error}")
        self.chat.outbox.clear()
        # One check at a time, the next when it is done: the queue's fair order holds.
        if self.chat.password_jobs and not self.checks:
            self.checks.append(self.worker.submit(self.chat.password_jobs.pop(0).run))

    def shut_down(self, grace: float = STOP_GRACE) -> None:
        """Tell every member the server stops; wait up to `grace` s till all have heard."""
        deadline = time.monotonic() + grace
        self.survive(self.chat.announce_stop, time.monotonic(), where="stopping")
        self.send_all()
        while not self.chat.stop_heard() and time.monotonic() < deadline:
            self.serve_once(deadline - time.monotonic())

    def serve_then_close(self) -> None:
        try:
            self.serve_forever()
            if self.grace:
                self.shut_down(self.grace)
        finally:
            self.close()

    def stop(self, grace: float = 0.0) -> None:
        """Stop serving (telling the members, if `grace`) and wait for the loop; any thread."""
        self.grace = grace
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def close(self) -> None:
        """Release the socket, the worker and the files."""
        # Checks still queued are dropped, never answered: their clients ask again.
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.selector.close()
        self.sock.close()
        self.chat.close()


def start_server(config: ServerConfig, log=print) -> ServerLoop:
    """Bind, and serve on a background thread (for tests and the notebook); `.stop()` ends it."""
    chat = ChatServer(config, log)
    loop = ServerLoop(chat, wrap_socket(open_socket(config.host, config.port), config, chat))
    loop.thread = threading.Thread(target=loop.serve_then_close, name="chat-server", daemon=True)
    loop.thread.start()
    return loop


def wrap_socket(sock, config: ServerConfig, chat: ChatServer):
    """Return the socket, or a lossy one if --loss asks for it."""
    if not config.loss:
        return sock

    def on_drop(direction, data):
        chat.log.trace("LOST" if direction == "out" else "lost", data, ("simulated", 0))

    return wire.LossySocket(sock, config.loss, config.seed, on_drop, side="server")


# === The command line ========================================================================


def lan_addresses() -> list[str]:
    """Return this PC's IPv4 addresses other than loopback, as far as it can tell.

    Linux lists its local addresses in /proc/net/fib_trie, each on the line before a
    "/32 host LOCAL" (a lab LAN with no default route included); elsewhere (Windows) the
    host name resolves to every interface's address.
    """
    found = []
    with contextlib.suppress(OSError), open("/proc/net/fib_trie", encoding="ascii") as table:
        lines = [line.split() for line in table]
        found = [lines[n - 1][-1] for n, line in enumerate(lines)
                 if n and line == "/32 host LOCAL".split()]
    with contextlib.suppress(OSError):
        found = found or socket.gethostbyname_ex(socket.gethostname())[2]
    return [address for address in dict.fromkeys(found) if not address.startswith(("127.", "0."))]


def checked(convert, test, message: str):
    """Return an argparse type: convert(text) if test(text) holds, else the error `message`."""
    def check(text: str):
        if not test(text):
            raise argparse.ArgumentTypeError(message)
        return convert(text)
    return check


# What FIND answers with must stay smaller than the FIND.
server_name = checked(str, lambda text: len(text.encode()) <= MAX_NAME_BYTES and text.isprintable(),
                      f"must be printable and at most {MAX_NAME_BYTES} bytes of UTF-8")
megabytes = checked(float, re.compile(r"\s*\d+(\.\d*)?\s*").fullmatch,
                    "must be a number of megabytes, 0 or more")


def parse_args(argv: list[str]) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        description="UDP chat room server. Clients connect with: python client.py",
        epilog="The xor and caesar ciphers are teaching toys: anyone on the network who "
               "captures the traffic can read it. Passwords are stored only as salted PBKDF2 "
               "hashes.")
    option = parser.add_argument
    option("--host", default=defaults.host, help="address to listen on (default: all interfaces)")
    option("--port", type=lambda text: 0 if text == "0" else wire.port_number(text),
           default=defaults.port, help="UDP port (default: %(default)s; 0: any free one)")
    option("--data-dir", default=defaults.data_dir, help="folder for users.json, rooms.json and "
           "chat_history.txt (default: chat_data beside server.py)")
    option("--room-password", default=defaults.room_password,
           help="password of the lobby room (default: %(default)s)")
    # --cipher, --key, --loss, --seed: the same as the client's.
    wire.add_shared_options(parser)
    option("--quiet", action="store_true", help="log only problems, not every action")
    option("--verbose", action="store_true",
           help="also log heartbeats, HELLO, FIND, ROOMS and WHO, and trace every packet")
    option("--session-timeout", type=float, default=defaults.session_timeout,
           help="seconds of silence before a client is considered gone (default: %(default)s)")
    option("--name", type=server_name, default=defaults.name, help="the name clients see "
           "when they search the network with ? (default: this PC's name)")
    option("--max-file-mb", type=megabytes, default=defaults.max_file_mb,
           help="the largest file members may send, in MB (default: %(default)s)")
    # Every option is named as its ServerConfig field.
    return ServerConfig(**vars(parser.parse_args(argv)))


def print_banner(config: ServerConfig, address: Address, name: str, fingerprint: str = "") -> None:
    """Say where clients find this server: what to answer at the client's prompts."""
    port, everywhere = address[1], config.host in ("0.0.0.0", "")
    addresses = lan_addresses() if everywhere else [config.host]
    print(f"UDP chat server listening on {describe_address(address)}")
    # Loopback never leaves this PC.
    if config.host.startswith("127.") or config.host == "localhost":
        print(f"Clients on other PCs cannot reach it: it listens on {config.host} only "
              "(leave out --host)")
    elif addresses:
        print(f"Clients on other PCs answer:  Server IP {' or '.join(addresses)}   port {port}")
    else:
        print("Clients on other PCs: this PC has no network address (is it connected?); "
              "check with ipconfig or 'ip addr'")
    print(f"Clients on this PC answer:    Server IP 127.0.0.1   port {port}")
    # A socket bound to one address hears no broadcasts.
    if everywhere:
        print(f"Clients who answer ? at the Server IP prompt find this server as: {name}")
    print(f"Server fingerprint: {fingerprint} (a registering client shows it: compare)")
    print(f"Lobby room password: {config.room_password}")
    print(f"Cipher: {config.cipher} (a teaching toy, not real security; clients must use the same)")
    print(f"Accounts and history kept in: {config.data_dir}")
    print("Press Ctrl+C to stop.")


def serve_until_stopped(loop: ServerLoop, config: ServerConfig) -> None:
    """Serve until Ctrl+C, then tell the members; a second Ctrl+C stops at once."""
    try:
        print_banner(config, loop.address, loop.chat.name, wire.fingerprint(loop.chat.key[1]))
        try:
            loop.serve_forever()
        # Ctrl+C: the normal way to stop.
        except KeyboardInterrupt:
            count = len(loop.chat.sessions)
            print(f"[INFO] Stopping: telling {count} member{'' if count == 1 else 's'}...")
            loop.shut_down()
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    # A legacy Windows code page must not crash the log.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        try:
            chat = ChatServer(config)
        # A bad key, a damaged or unwritable data folder.
        except (ValueError, OSError) as error:
            print(f"[ERROR] {error}")
            return 1
        try:
            sock = wrap_socket(open_socket(config.host, config.port), config, chat)
        except OSError as error:
            chat.close()
            print(f"[ERROR] Cannot listen on {config.host}:{config.port}: "
                  f"{error.strerror or error}. Is another server running there? "
                  "Choose another port with --port.")
            return 1
        serve_until_stopped(ServerLoop(chat, sock), config)
    # Ctrl+C at any moment, even before serving: the normal way to stop.
    except KeyboardInterrupt:
        pass
    print("[INFO] Server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
