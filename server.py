"""UDP chat room server: accounts, password-protected rooms, history, reliable delivery.

Run it on one PC of the lab network, then `python client.py` on the others:

    python server.py                          # all interfaces, port 9999, lobby password "juara"
    python server.py --port 5000 --room-password rahasia --cipher caesar --key 7

Design, in the spirit of the standard library's socketserver:

* One loop owns the one UDP socket (`ServerLoop`). UDP has no connections and needs no
  listen() or accept(): every datagram arrives on the same socket, tagged with its
  sender's (ip, port). No thread per datagram, no two readers of one socket.
* The protocol - parse, decide, reply - lives in `ChatServer`, which never touches a
  socket: it is handed datagrams and collects the datagrams to send in `outbox`, so
  tests and the notebook can drive it without a network.
* The slow password hash runs on a worker thread, so that a flood of logins never stalls
  the chat; its result comes back to the loop, which alone changes any state.
* Every client request carries a sequence number and is answered exactly once: a
  repeated request (the reply was lost, so the client sent it again) gets the same reply
  again, and nothing happens twice. Everything the server pushes to a client (messages,
  joins, leaves) goes through a Selective Repeat window (`OutboundWindow`), which resends
  each packet until the client acknowledges it.

A SAY datagram, as it leaves a client (XOR-scrambled payload, readable header):

    55 43 01 05 00 00 00 07 00 00 00 07 00 00 00 00  "UC" v1 SAY flags=0 len=7 seq=7 ack=0
    3e 1a 2c 5e 5e 77 90 12 ab 7f 38 ae 49 4c 5a 58  token, CRC-32, then the payload:
    12 0a 60                                          [5]"hi :)" XORed with the key "II2120"

The packet format is defined once, in encryption_helper.py; accounts live in auth.py.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import heapq
import hmac
import json
import os
import queue
import secrets
import selectors
import socket
import sys
import threading
import time
import traceback

import auth
from encryption_helper import (
    BITMAP,
    CIPHER_NAMES,
    DEFAULT_CIPHER,
    FLAG_RETRANSMIT,
    MAGIC,
    MAX_PAYLOAD,
    MAX_TEXT_BYTES,
    MIN_HELLO_SIZE,
    RECV_BUFFER,
    WINDOW,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    decode_packet,
    describe_datagram,
    encode_packet,
    make_cipher,
    pack_fields,
    peek_type_name,
    unpack_fields,
)

Address = tuple[str, int]  # (ip, port): who sent a datagram, where to send one

LOBBY = "lobby"
HISTORY_FILE = "chat_history.txt"
USERS_FILE = "users.json"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_data")
COOKIE_PERIOD = 30.0  # seconds; a HELLO cookie stays valid for one to two periods
MAX_WAIT = 0.5  # seconds the loop may sleep: on Windows, Ctrl+C waits for select() to return
RECEIVE_BUFFER_BYTES = 4 << 20  # the kernel's queue for our socket, asked for, not promised
RECEIVE_BATCH = 256  # datagrams read per wake-up, so timers still run during a flood
HOUSEKEEPING_EVERY = 1.0  # seconds between sweeps for silent sessions
PROBLEMS_PER_SECOND = 20  # log lines about bad packets; a flood must not flood the log


@dataclasses.dataclass
class ServerConfig:
    """Everything that can be tuned, with the defaults a lab uses and why."""

    host: str = "0.0.0.0"  # all interfaces: reachable from the other lab PCs
    port: int = 9999
    data_dir: str = DEFAULT_DATA_DIR
    room_password: str = "juara"  # the lobby's password (seed 001's example)
    cipher: str = DEFAULT_CIPHER
    key: str | None = None  # None: the cipher's default key, the same as the client's
    quiet: bool = False  # log only problems, not every action
    verbose: bool = False  # also trace every packet in and out
    loss: float = 0.0  # drop this share of datagrams in and out, to watch recovery
    seed: int | None = None  # makes --loss drop the same datagrams every run
    # A client sends a heartbeat after 5 s of quiet; six missed in a row means it is gone.
    session_timeout: float = 30.0
    window: int = WINDOW  # EVENTs in flight per session; at most the client's WINDOW
    # Give up on a client that acknowledges nothing after this many sends of one packet.
    # At 30% loss each way a try fails about half the time: 0.5**20 is one in a million.
    max_retransmits: int = 20
    min_rto: float = RtoEstimator.FLOOR
    max_sessions: int = 500  # a lab of 40 PCs with room to spare; then "Server full"
    max_rooms: int = 50
    max_queue: int = 1000  # EVENTs waiting behind a full window; a slower member is dropped
    message_rate: float = 5.0  # messages a second per member, as IRC servers limit...
    message_burst: int = 20  # ...after a burst: pasting a short paragraph is fine
    login_failures: int = 5  # failed logins per account in `failure_period` before lockout
    failure_period: float = 60.0
    registrations_per_address: int = 20  # per `failure_period`, from one IP address
    max_pending_hashes: int = 16  # password checks waiting for the worker; then "busy"
    max_pending_per_address: int = 2  # one address cannot fill the hash queue alone
    kdf_iterations: int = auth.DEFAULT_ITERATIONS
    history_on_join: int = 20  # past messages shown to whoever joins a room
    reply_cache: int = 4096  # answers to recent logins and registrations, for retries


# --- Replies -------------------------------------------------------------------------


class Refusal(Exception):
    """A request the server turns down; becomes an ERROR reply [code, text, *extra]."""

    def __init__(self, code: str, text: str, *extra: str):
        super().__init__(text)
        self.fields = (code, text, *extra)


# --- Bookkeeping ---------------------------------------------------------------------


class EventCounter:
    """Counts events per key over a sliding period; the table of keys is bounded.

    Used for failed logins per account, registrations per address and wrong room
    passwords per session. When the table is full the least recently used key is
    forgotten, so a stranger's flood of new keys cannot grow memory without bound.
    """

    def __init__(self, limit: int, period: float, max_keys: int = 10_000):
        self.limit = limit
        self.period = period
        self.max_keys = max_keys
        self.events: collections.OrderedDict = collections.OrderedDict()

    def recent(self, key, now: float) -> collections.deque:
        """Return the times of `key`'s events within the period, oldest first."""
        times = self.events.get(key)
        if times is None:
            return collections.deque()
        while times and times[0] <= now - self.period:
            times.popleft()
        return times

    def add(self, key, now: float) -> None:
        times = self.recent(key, now)
        times.append(now)
        self.events[key] = times
        self.events.move_to_end(key)
        while len(self.events) > self.max_keys:
            self.events.popitem(last=False)

    def blocked_for(self, key, now: float) -> float:
        """Return how many seconds `key` must wait, 0 if it has not reached the limit."""
        times = self.recent(key, now)
        if len(times) < self.limit:
            return 0.0
        return times[-self.limit] + self.period - now


class TokenBucket:
    """Flood control: `burst` messages at once, then `rate` a second (as IRC servers do)."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Spend one token and return 0, or return the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclasses.dataclass
class InFlight:
    """An EVENT sent and not yet acknowledged."""

    payload: bytes
    scrambled: bytes
    sent_at: float
    deadline: float
    attempts: int = 1


class OutboundWindow:
    """Selective Repeat, the sending half: everything the server pushes to one client.

    Each EVENT gets the session's next sequence number. At most `size` of them are in
    flight - sent, not yet acknowledged - counted from the oldest unacknowledged one (the
    window's base); the rest wait in a bounded queue. Every packet in flight has its own
    timer: when it fires, that packet alone is sent again, with the wait doubled each time.
    The client answers with an ACK holding the highest sequence number up to which it has
    everything (cumulative), plus a 32-bit bitmap of what it holds beyond a gap; whatever
    either covers is done, and the window slides on.

    Round trips are measured on packets sent exactly once (Karn's rule), and feed the
    RtoEstimator that sets the timers.
    """

    def __init__(self, size: int, max_queue: int, rto: RtoEstimator):
        self.size = size
        self.max_queue = max_queue
        self.rto = rto
        self.next_seq = 1
        self.in_flight: dict[int, InFlight] = {}  # by seq, oldest first
        self.waiting: collections.deque = collections.deque()  # (payload, scrambled)

    def offer(self, payload: bytes, scrambled: bytes) -> bool:
        """Queue an EVENT payload; False if the queue is full (the client is too slow)."""
        if len(self.waiting) >= self.max_queue:
            return False
        self.waiting.append((payload, scrambled))
        return True

    def base(self) -> int:
        """Return the oldest unacknowledged sequence number (dicts keep insertion order)."""
        return next(iter(self.in_flight), self.next_seq)

    def release(self, now: float) -> list[tuple[int, InFlight]]:
        """Move waiting EVENTs into flight while the window has room; return them."""
        released = []
        while self.waiting and self.next_seq < self.base() + self.size:
            payload, scrambled = self.waiting.popleft()
            entry = InFlight(payload, scrambled, now, now + self.rto.timeout())
            self.in_flight[self.next_seq] = entry
            released.append((self.next_seq, entry))
            self.next_seq += 1
        return released

    def acknowledge(self, cumulative: int, bitmap: int, now: float) -> int:
        """Mark what an ACK covers as delivered; return how many packets it freed.

        Bit i of the bitmap stands for sequence number cumulative + 2 + i (cumulative + 1
        is, by definition, the one missing).
        """
        done = [
            seq for seq in self.in_flight
            if seq <= cumulative or (seq >= cumulative + 2 and bitmap >> (seq - cumulative - 2) & 1)
        ]
        for seq in done:
            entry = self.in_flight.pop(seq)
            if entry.attempts == 1:  # Karn's rule: only unambiguous round trips count
                self.rto.observe(now - entry.sent_at)
        return len(done)

    def expire(self, seq: int, now: float) -> InFlight | None:
        """Packet `seq`'s timer fired: return it to send again, or None if it is done."""
        entry = self.in_flight.get(seq)
        if entry is None or entry.deadline > now:
            return None  # acknowledged meanwhile, or this was an old timer
        entry.attempts += 1
        entry.sent_at = now
        entry.deadline = now + self.rto.timeout(entry.attempts - 1)
        return entry


# --- State ---------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """A logged-in user, known by address and proven by the token it carries."""

    token: bytes
    address: Address
    name: str
    outbound: OutboundWindow
    bucket: TokenBucket
    last_seq: int  # the last request handled...
    last_reply: bytes  # ...and its answer, sent again if the request comes again
    last_heard: float
    room: str | None = None  # key of the room in ChatServer.rooms


@dataclasses.dataclass
class Room:
    name: str
    password: str
    members: dict  # lower-case name -> Session
    history: collections.deque  # (unix time, user, text), the last few messages


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


def describe(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


# --- The protocol --------------------------------------------------------------------


class ChatServer:
    """The chat protocol: takes datagrams, changes state, puts replies in `outbox`.

    It opens no socket and starts no thread, so a test can drive it with plain bytes and
    a fake clock. `ServerLoop` below connects it to a real socket.
    """

    def __init__(self, config: ServerConfig, log=print, wall_clock=time.time):
        self.config = config
        self.cipher = make_cipher(config.cipher, config.key)
        self.emit = log
        self.wall_clock = wall_clock
        self.problems_this_second = 0  # set first: reading the history may report problems
        self.problem_second = 0
        os.makedirs(config.data_dir, exist_ok=True)
        self.users = auth.UserStore(os.path.join(config.data_dir, USERS_FILE), config.kdf_iterations)
        history_path = os.path.join(config.data_dir, HISTORY_FILE)
        lobby_history = read_history(history_path, LOBBY, config.history_on_join, self.problem)
        self.history = HistoryLog(history_path)
        # Shared state, changed only by the loop's thread:
        self.sessions: dict[Address, Session] = {}  # address -> session
        self.online: dict[str, Session] = {}  # lower-case user name -> session
        self.rooms: dict[str, Room] = {LOBBY: Room(LOBBY, config.room_password, {}, lobby_history)}
        # (address, seq) -> (fingerprint of the request, its answer, or None while hashing)
        self.recent_replies = collections.OrderedDict()
        self.registering: set[str] = set()  # names whose registration is being hashed
        self.pending_by_ip: collections.Counter = collections.Counter()
        self.failed_logins = EventCounter(config.login_failures, config.failure_period)
        self.registrations = EventCounter(config.registrations_per_address, config.failure_period)
        self.wrong_room_passwords = EventCounter(config.login_failures, config.failure_period)
        self.cookie_secret = secrets.token_bytes(16)
        self.timers: list = []  # heap of (deadline, tiebreak, address, seq)
        self.timer_count = 0
        self.next_housekeeping = 0.0
        # Work for the network layer:
        self.outbox: list[tuple[bytes, Address]] = []  # datagrams to send
        self.slow_jobs: list = []  # (work, then): work() off the loop, then(result, now) on it
        self.too_slow: dict[Address, Session] = {}  # to be ended once the current work is done
        self.news: dict[Address, Session] = {}  # sessions with EVENTs queued, sent by send_news
        self.checking: dict = {}  # (address, seq) -> fingerprint of a request being hashed
        self.stats = collections.Counter()

    # --- Logging: every action on one line (who, what, size, outcome) ---

    def log(self, address: Address, user: str, what: str, size: int, outcome: str) -> None:
        if not auth.valid_username(user or "-"):  # a stranger's name may hold anything
            user = repr(user[:20])
        if not self.config.quiet:
            self.emit(f"{timestamp()} {describe(address):>21} {user or '-':<12} {what:<8} {size:>4} B  {outcome}")

    def problem(self, text: str) -> None:
        """Log something wrong, at most PROBLEMS_PER_SECOND lines a second."""
        second = int(time.monotonic())
        if second != self.problem_second:
            if self.problems_this_second > PROBLEMS_PER_SECOND:
                hidden = self.problems_this_second - PROBLEMS_PER_SECOND
                self.emit(f"{timestamp()} [WARN] ... and {hidden} more problems not shown")
            self.problem_second, self.problems_this_second = second, 0
        self.problems_this_second += 1
        if self.problems_this_second <= PROBLEMS_PER_SECOND:
            self.emit(f"{timestamp()} [WARN] {text}")

    def trace(self, direction: str, data: bytes, address: Address, note: str = "") -> None:
        if self.config.verbose:
            self.emit(f"{timestamp()} [trace] {direction} {describe(address)} {describe_datagram(data)}{note}")

    # --- Sending ---

    def send(self, data: bytes, address: Address, note: str = "") -> None:
        self.trace("out", data, address, note)
        self.outbox.append((data, address))

    def send_to_stranger(self, data: bytes, address: Address, received: int) -> None:
        """Answer an address nobody has proven, never with more bytes than it sent.

        UDP source addresses can be forged: if a small request could earn a big reply,
        anyone could aim our replies at a victim (a reflection attack).
        """
        if len(data) <= received:
            self.send(data, address)
        else:
            self.stats["withheld"] += 1

    def reply(self, request: Packet, ptype: PacketType, fields, token: bytes) -> bytes:
        """Return the datagram answering `request`: its ack field names the request."""
        payload = pack_fields(*fields)
        if len(payload) > MAX_PAYLOAD:  # never expected; but a reply must never crash the server
            ptype, payload = PacketType.ERROR, pack_fields("too-long", "The answer does not fit in one packet.")
        return encode_packet(Packet(ptype, 0, request.seq, token, 0, payload), self.cipher)

    # --- Entry point for every datagram ---

    def handle_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from `address`. Nothing it contains can raise out of here."""
        self.stats["datagrams"] += 1
        self.trace("in ", data, address)
        try:
            packet = decode_packet(data, self.cipher)
        except PacketError as error:
            self.refuse_datagram(data, address, error)
            return
        self.dispatch(packet, address, len(data), now)
        self.end_slow_sessions(now)
        self.send_news(now)

    def dispatch(self, packet: Packet, address: Address, size: int, now: float) -> None:
        """Hand a valid packet to the handler its type and its sender's session call for."""
        session = self.sessions.get(address)
        if packet.type in SERVER_ONLY:
            self.stats["bad"] += 1
            self.problem(f"{describe(address)} sent {packet.type.name}, which only servers send; dropped")
        elif packet.type in STRANGER_HANDLERS:
            self.handle_stranger(packet, address, size, now)
        elif session is None or not hmac.compare_digest(session.token, packet.token):
            if packet.type == PacketType.ACK:  # e.g. the last ACK of a client that said BYE
                self.stats["no-session"] += 1
                return
            self.handle_unknown_session(packet, address, session)
        elif packet.type == PacketType.ACK:
            self.handle_ack(session, packet, now)
        else:
            self.handle_request(session, packet, size, now)

    def refuse_datagram(self, data: bytes, address: Address, error: PacketError) -> None:
        """Log a malformed datagram, and answer if it looks like ours (it may be a bad key)."""
        self.stats["bad"] += 1
        self.problem(f"{describe(address)} sent a bad datagram ({peek_type_name(data)}, {len(data)} B): {error}")
        if data[:2] == MAGIC:
            answer = encode_packet(Packet(PacketType.ERROR, payload=pack_fields("bad-packet", str(error))), self.cipher)
            self.send_to_stranger(answer, address, len(data))

    def handle_unknown_session(self, packet: Packet, address: Address, session: Session | None) -> None:
        """A member packet without a valid session: RESET if we know nobody there."""
        self.stats["no-session"] += 1
        if session is not None:  # someone else's address with a wrong token: forged
            self.problem(f"{describe(address)} sent {packet.type.name} with a wrong session token; dropped")
            return
        self.problem(f"{describe(address)} sent {packet.type.name} but has no session; told to log in")
        # RESET is a bare header, never larger than any packet, and echoes the token, so
        # a client believes it only if it carried that token itself.
        reset = encode_packet(Packet(PacketType.RESET, 0, packet.seq, packet.token), self.cipher)
        self.send(reset, address)

    # --- Strangers: HELLO, REGISTER, LOGIN ---

    def handle_stranger(self, packet: Packet, address: Address, size: int, now: float) -> None:
        key, digest = (address, packet.seq), fingerprint(packet)
        if self.checking.get(key) == digest:  # a retry while the hash runs
            self.log(address, "", packet.type.name, size, "repeat: still working")
            return
        remembered = self.recent_replies.get(key)
        session = self.sessions.get(address)
        if remembered and remembered[0] == digest:  # a retry: same answer, nothing done twice
            answer = remembered[1]
        elif packet.type == PacketType.LOGIN and session and session.last_seq == packet.seq:
            answer = session.last_reply  # the welcome was lost, and has left the cache since
        else:
            STRANGER_HANDLERS[packet.type](self, packet, address, size, now)
            return
        self.log(address, "", packet.type.name, size, "repeat: same reply")
        self.send(answer, address, " (repeat reply)")

    def make_cookie(self, address: Address, period: int) -> str:
        message = f"{address[0]}|{address[1]}|{period}".encode()
        return hmac.new(self.cookie_secret, message, "sha256").hexdigest()[:32]

    def cookie_valid(self, cookie: str, address: Address, now: float) -> bool:
        period = int(now // COOKIE_PERIOD)
        given = cookie.encode("utf-8")  # bytes: compare_digest refuses non-ASCII text
        return any(hmac.compare_digest(given, self.make_cookie(address, p).encode()) for p in (period, period - 1))

    def handle_hello(self, packet: Packet, address: Address, size: int, now: float) -> None:
        """HELLO -> OK [cookie]: proves the client really is at its address, as DTLS does.

        The reply goes to the address the HELLO claims; only someone who is really there
        sees the cookie and can send it back in REGISTER or LOGIN.
        """
        if size < MIN_HELLO_SIZE:
            self.problem(f"{describe(address)} sent an unpadded HELLO ({size} B); dropped")
            return
        cookie = self.make_cookie(address, int(now // COOKIE_PERIOD))
        self.log(address, "", "HELLO", size, "ok: cookie sent")
        self.send_to_stranger(self.reply(packet, PacketType.OK, [cookie], packet.token), address, size)

    def parse_credentials(self, packet: Packet, address: Address, size: int, now: float):
        """Return (username, password) of a REGISTER or LOGIN, or None if refused."""
        try:
            cookie, name, password = unpack_fields(packet.payload, 3)
        except PacketError as error:
            self.log(address, "", packet.type.name, size, f"refused: {error}")
            answer = self.reply(packet, PacketType.ERROR, ["bad-request", str(error)], packet.token)
            self.send_to_stranger(answer, address, size)
            return None
        if not self.cookie_valid(cookie, address, now):
            self.log(address, name[:20], packet.type.name, size, "refused: stale or forged cookie")
            answer = self.reply(packet, PacketType.ERROR, ["stale-cookie", "Say HELLO again."], packet.token)
            self.send_to_stranger(answer, address, size)
            return None
        return name, password

    def answer_stranger(self, packet: Packet, address: Address, size: int, fields, user: str,
                        token=None, ok=False) -> bytes:
        """Send a reply to a proven address and remember it for retries of the request."""
        answer = self.reply(packet, PacketType.OK if ok else PacketType.ERROR, fields, token or packet.token)
        key = (address, packet.seq)
        self.checking.pop(key, None)
        self.recent_replies[key] = (fingerprint(packet), answer)
        while len(self.recent_replies) > self.config.reply_cache:
            self.recent_replies.popitem(last=False)
        self.log(address, user, packet.type.name, size, ("ok: " if ok else "refused: ") + fields[-1])
        self.send(answer, address)
        return answer

    def check_capacity(self, address: Address) -> None:
        """Refuse work for the hash worker when it already has enough."""
        if sum(self.pending_by_ip.values()) >= self.config.max_pending_hashes:
            raise Refusal("busy", "Server busy; try again in a moment.")
        if self.pending_by_ip[address[0]] >= self.config.max_pending_per_address:
            raise Refusal("busy", "Your previous request is still being checked; wait for it.")

    def handle_register(self, packet: Packet, address: Address, size: int, now: float) -> None:
        credentials = self.parse_credentials(packet, address, size, now)
        if credentials is None:
            return
        name, password = credentials
        try:
            if not auth.valid_username(name):
                raise Refusal("bad-name", "Usernames are 1-20 letters, digits, '_', '.' or '-'.")
            if not password:
                raise Refusal("bad-password", "The password must not be empty.")
            if self.users.exists(name) or name.lower() in self.registering:
                raise Refusal("taken", "Username already taken.")
            wait = self.registrations.blocked_for(address[0], now)
            if wait:
                raise Refusal("slow-down", f"Too many registrations from your address; try again in {wait:.0f} s.")
            self.check_capacity(address)
        except Refusal as refusal:
            self.answer_stranger(packet, address, size, refusal.fields[:2], name)
            return
        self.registrations.add(address[0], now)
        self.registering.add(name.lower())
        self.start_slow_job(packet, address, size, name,
                            lambda: auth.new_record(name, password, self.config.kdf_iterations),
                            lambda record, now: self.finish_register(packet, address, size, record))

    def finish_register(self, packet: Packet, address: Address, size: int, record) -> None:
        self.registering.discard(record["name"].lower())
        try:
            self.users.add(record)  # on disk before we say so
        except OSError as error:
            self.problem(f"could not save the users file: {error}")
            self.answer_stranger(packet, address, size,
                                 ["server-error", "The server could not save your account; try again."], record["name"])
            return
        self.answer_stranger(packet, address, size, ["Registration successful."], record["name"], ok=True)

    def handle_login(self, packet: Packet, address: Address, size: int, now: float) -> None:
        credentials = self.parse_credentials(packet, address, size, now)
        if credentials is None:
            return
        name, password = credentials
        try:
            wait = self.failed_logins.blocked_for(name.lower(), now)
            if wait:  # refused before hashing: guessing costs the guesser, not us
                raise Refusal("locked", f"Too many failed attempts; try again in {wait:.0f} s.")
            if address in self.sessions:
                raise Refusal("already-logged-in", "This client is logged in already; log out first.")
            self.check_capacity(address)
        except Refusal as refusal:
            self.answer_stranger(packet, address, size, refusal.fields[:2], name)
            return
        record = self.users.get(name) or auth.dummy_record(self.config.kdf_iterations)
        self.start_slow_job(packet, address, size, name,
                            lambda: auth.check_password(password, record) and bool(record["name"]),
                            lambda matches, now: self.finish_login(packet, address, size, name,
                                                                   matches and record, now))

    def finish_login(self, packet: Packet, address: Address, size: int, name: str, record, now: float) -> None:
        if not record:
            self.failed_logins.add(name.lower(), now)
            self.answer_stranger(packet, address, size, ["invalid-login", "Invalid username or password."], name)
            return
        name = record["name"]  # as registered, whatever the case typed
        if name.lower() in self.online:
            self.answer_stranger(packet, address, size, ["already-logged-in", (
                f"{name} is logged in already. A client that vanished is forgotten "
                f"after {self.config.session_timeout:.0f} s.")], name)
        elif len(self.sessions) >= self.config.max_sessions:
            self.answer_stranger(packet, address, size, ["full", "Server full; try again later."], name)
        elif address in self.sessions:
            refusal = ["already-logged-in", "This client is logged in already."]
            self.answer_stranger(packet, address, size, refusal, name)
        else:
            session = self.open_session(name, address, packet.seq, now)
            welcome = [name, LOBBY, f"Welcome, {name}."]
            session.last_reply = self.answer_stranger(packet, address, size, welcome, name, session.token, ok=True)

    def start_slow_job(self, packet: Packet, address: Address, size: int, user: str, work, then) -> None:
        """Run `work` on the hash worker; `then(result, now)` runs on the loop afterwards."""
        self.checking[(address, packet.seq)] = fingerprint(packet)  # retries now wait, not repeat
        self.pending_by_ip[address[0]] += 1
        self.log(address, user, packet.type.name, size, "checking password...")

        def finish(result, now):
            self.pending_by_ip[address[0]] -= 1
            if not self.pending_by_ip[address[0]]:
                del self.pending_by_ip[address[0]]
            then(result, now)

        self.slow_jobs.append((work, finish))

    # --- Sessions ---

    def open_session(self, name: str, address: Address, seq: int, now: float) -> Session:
        rto = RtoEstimator(floor=self.config.min_rto)
        session = Session(
            token=secrets.token_bytes(8), address=address, name=name,
            outbound=OutboundWindow(self.config.window, self.config.max_queue, rto),
            bucket=TokenBucket(self.config.message_rate, self.config.message_burst, now),
            last_seq=seq, last_reply=b"", last_heard=now,
        )
        self.sessions[address] = session
        self.online[name.lower()] = session
        return session

    def end_session(self, session: Session, reason: str, now: float) -> None:
        """Forget a session; its room hears that the user left, and why."""
        if self.sessions.get(session.address) is not session:
            return  # ended already
        del self.sessions[session.address]
        del self.online[session.name.lower()]
        if session.room:
            self.leave_room(session, reason, now)
        self.log(session.address, session.name, "END", 0, f"session ended{': ' + reason if reason else ''}")

    def handle_request(self, session: Session, packet: Packet, size: int, now: float) -> None:
        """A member's request: answered once, and the same answer again if repeated."""
        session.last_heard = now
        if packet.seq == session.last_seq:
            self.log(session.address, session.name, packet.type.name, size, "repeat: same reply")
            self.send(session.last_reply, session.address, " (repeat reply)")
            return
        if packet.seq < session.last_seq:  # an old request replayed: never act on it again
            self.stats["stale"] += 1
            self.problem(f"{describe(session.address)} {session.name}: {packet.type.name} seq {packet.seq} "
                         f"is older than the last request ({session.last_seq}); dropped")
            return
        # A newer number is a new request. Usually it is last_seq + 1; a client that sent
        # a HELLO or REGISTER meanwhile has used numbers the session never saw.
        try:
            fields = MEMBER_HANDLERS[packet.type](self, session, packet, now)
            summary = fields[-1] if packet.type in TEXT_REPLIES else f"{len(fields)} fields"
            ptype, outcome = PacketType.OK, f"ok: {summary}"
        except Refusal as refusal:
            fields, ptype, outcome = refusal.fields, PacketType.ERROR, f"refused: {refusal.fields[1]}"
        except PacketError as error:
            fields, ptype, outcome = ("bad-request", str(error)), PacketType.ERROR, f"refused: {error}"
        session.last_seq = packet.seq
        session.last_reply = self.reply(packet, ptype, fields, session.token)
        self.log(session.address, session.name, packet.type.name, size, outcome)
        self.send(session.last_reply, session.address)

    def handle_ack(self, session: Session, packet: Packet, now: float) -> None:
        session.last_heard = now
        if len(packet.payload) != BITMAP.size:
            self.problem(f"{describe(session.address)} sent an ACK without its bitmap; dropped")
            return
        (bitmap,) = BITMAP.unpack(packet.payload)
        session.outbound.acknowledge(packet.ack, bitmap, now)
        self.pump(session, now)

    # --- Member requests: each returns the OK fields or raises Refusal ---

    def handle_join(self, session: Session, packet: Packet, now: float) -> list[str]:
        name, password = unpack_fields(packet.payload, 2)
        key = name.lower()
        room = self.rooms.get(key)
        if not auth.valid_username(name):
            raise Refusal("bad-name", "Room names are 1-20 letters, digits, '_', '.' or '-'.")
        if session.room == key:
            return [room.name, str(len(room.members)), f"You are in {room.name} already."]
        wait = self.wrong_room_passwords.blocked_for(session.token, now)
        if wait:
            raise Refusal("locked", f"Too many wrong room passwords; try again in {wait:.0f} s.")
        if room is None:
            if len(self.rooms) >= self.config.max_rooms:
                raise Refusal("full", "Server full: no more rooms can be made.")
            room = self.rooms[key] = Room(name, password, {}, collections.deque(maxlen=self.config.history_on_join))
            created = " (new room)"
        elif hmac.compare_digest(password.encode(), room.password.encode()):
            created = ""
        else:
            self.wrong_room_passwords.add(session.token, now)
            raise Refusal("wrong-room-password", "Wrong room password.")
        if session.room:
            self.leave_room(session, "", now)
        self.enter_room(session, room, now)
        return [room.name, str(len(room.members)), f"joined {room.name}{created}, {len(room.members)} here"]

    def handle_say(self, session: Session, packet: Packet, now: float) -> list[str]:
        (text,) = unpack_fields(packet.payload, 1)
        room = self.require_room(session)
        self.check_message(session, text, now)
        when = self.wall_clock()
        try:
            self.history.append(when, room.name, session.name, text)  # on file before anything else
        except OSError as error:
            self.problem(f"could not write {HISTORY_FILE}: {error}")
            raise Refusal("server-error", "The server could not save your message; not sent.") from None
        room.history.append((when, session.name, text))
        if not self.config.quiet:  # the assignment: the server prints every message it relays
            self.emit(f"{timestamp()} [{room.name}] {session.name}: {text!r}")
        self.publish(room, "chat", session.name, text, now, exclude=session)
        others = len(room.members) - 1
        return [f"to {room.name}, {others} other{'' if others == 1 else 's'}"]

    def handle_private(self, session: Session, packet: Packet, now: float) -> list[str]:
        target_name, text = unpack_fields(packet.payload, 2)
        target = self.online.get(target_name.lower())
        if target is None:
            shown = target_name if auth.valid_username(target_name) else "That user"  # never echo junk
            raise Refusal("unknown-user", f"{shown} is not online.")
        self.check_message(session, text, now)
        payload = pack_fields("private", str(int(self.wall_clock())), "", session.name, text)
        self.push(target, payload, self.cipher.encrypt(payload))
        return [f"private to {target.name}"]

    def handle_rooms(self, session: Session, packet: Packet, now: float) -> list[str]:
        unpack_fields(packet.payload, 0)
        pairs = [[room.name, str(len(room.members))] for room in self.rooms.values()]
        return fit_fields([field for pair in pairs for field in pair], step=2)

    def handle_who(self, session: Session, packet: Packet, now: float) -> list[str]:
        unpack_fields(packet.payload, 0)
        room = self.require_room(session)
        return fit_fields([room.name] + sorted(member.name for member in room.members.values()))

    def handle_ping(self, session: Session, packet: Packet, now: float) -> list[str]:
        unpack_fields(packet.payload, 0)
        return []

    def handle_bye(self, session: Session, packet: Packet, now: float) -> list[str]:
        unpack_fields(packet.payload, 0)
        self.end_session(session, "", now)
        return ["goodbye"]

    def require_room(self, session: Session) -> Room:
        if session.room is None:
            raise Refusal("not-in-room", "Join a room first: /join ROOM")
        return self.rooms[session.room]

    def check_message(self, session: Session, text: str, now: float) -> None:
        """Refuse an empty or oversize message, or one over the member's rate."""
        size = len(text.encode("utf-8"))
        if not text.strip():
            raise Refusal("empty", "Empty message; nothing sent.")
        if size > MAX_TEXT_BYTES:
            raise Refusal("too-long", f"Message too long ({size} bytes, the limit is {MAX_TEXT_BYTES}); not sent.")
        wait = session.bucket.take(now)
        if wait:
            raise Refusal("slow-down", f"Slow down: at most {self.config.message_rate:g} messages a second. "
                                       "Not sent; your client sends it again shortly.", f"{wait:.3f}")

    # --- Rooms and delivery ---

    def enter_room(self, session: Session, room: Room, now: float) -> None:
        others = list(room.members.values())
        room.members[session.name.lower()] = session
        session.room = room.name.lower()
        for when, user, text in room.history:
            payload = pack_fields("history", str(int(when)), room.name, user, text)
            self.push(session, payload, self.cipher.encrypt(payload))
        self.publish_to(others, room, "join", session.name, "", now)

    def leave_room(self, session: Session, reason: str, now: float) -> None:
        room = self.rooms[session.room]
        del room.members[session.name.lower()]
        session.room = None
        self.publish(room, "leave", session.name, reason, now)
        if not room.members and room.name != LOBBY:
            self.rooms.pop(room.name.lower(), None)  # a room lives while it has members (this
            # leave may have ended another session, which closed the room already)

    def publish(self, room: Room, kind: str, user: str, text: str, now: float, exclude=None) -> None:
        members = [member for member in room.members.values() if member is not exclude]
        self.publish_to(members, room, kind, user, text, now)

    def publish_to(self, members, room: Room, kind: str, user: str, text: str, now: float) -> None:
        """Queue one EVENT for each member, scrambled once for them all."""
        payload = pack_fields(kind, str(int(self.wall_clock())), room.name, user, text)
        scrambled = self.cipher.encrypt(payload)
        for member in members:
            self.push(member, payload, scrambled)

    def push(self, session: Session, payload: bytes, scrambled: bytes) -> None:
        """Queue an EVENT for one session; send_news sends it, after the reply to the request."""
        if not session.outbound.offer(payload, scrambled):
            self.too_slow[session.address] = session  # ended by end_slow_sessions, not here:
            return  # its "left" would be pushed to others, who may be full too, and so on
        self.news[session.address] = session

    def send_news(self, now: float) -> None:
        """Send the EVENTs queued while handling a packet or the timers, as windows allow.

        They go out after the reply to the request that caused them, so the member who
        spoke hears "OK" first and can go on while the room is being told.
        """
        for address, session in self.news.items():
            if self.sessions.get(address) is session:  # not ended meanwhile
                self.pump(session, now)
        self.news.clear()

    def end_slow_sessions(self, now: float) -> None:
        """End the sessions that fell max_queue EVENTs behind, one after another."""
        while self.too_slow:
            _, session = self.too_slow.popitem()
            if self.sessions.get(session.address) is session:
                self.problem(f"{session.name} at {describe(session.address)} fell {self.config.max_queue} "
                             "messages behind; session ended")
                self.end_session(session, "too slow", now)

    def pump(self, session: Session, now: float) -> None:
        """Send the EVENTs that now fit in the session's window."""
        for seq, entry in session.outbound.release(now):
            self.send_event(session, seq, entry, 0)

    def send_event(self, session: Session, seq: int, entry: InFlight, flags: int) -> None:
        packet = Packet(PacketType.EVENT, seq, 0, session.token, flags, entry.payload)
        self.send(encode_packet(packet, self.cipher, entry.scrambled), session.address,
                  " (retransmit)" if flags else "")
        self.timer_count += 1
        heapq.heappush(self.timers, (entry.deadline, self.timer_count, session.address, seq))

    # --- Time ---

    def next_deadline(self) -> float:
        """Return when `on_timers` next has work to do."""
        first_timer = self.timers[0][0] if self.timers else float("inf")
        return min(first_timer, self.next_housekeeping)

    def on_timers(self, now: float) -> None:
        """Resend EVENTs whose timers fired; end sessions that fell silent."""
        while self.timers and self.timers[0][0] <= now:
            _, _, address, seq = heapq.heappop(self.timers)
            session = self.sessions.get(address)
            entry = session and session.outbound.expire(seq, now)
            if not entry:
                continue
            if entry.attempts > self.config.max_retransmits:
                self.end_session(session, "not responding", now)
                continue
            self.stats["retransmits"] += 1
            self.send_event(session, seq, entry, FLAG_RETRANSMIT)
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_EVERY
            for session in list(self.sessions.values()):
                if now - session.last_heard > self.config.session_timeout:
                    self.end_session(session, "timed out", now)
        self.end_slow_sessions(now)
        self.send_news(now)  # "left (timed out)" and the like

    def close(self) -> None:
        self.history.close()


# Packets a server sends and never receives.
SERVER_ONLY = {PacketType.OK, PacketType.ERROR, PacketType.EVENT, PacketType.RESET}

# Requests whose OK reply ends with a sentence for the user (the others carry data).
TEXT_REPLIES = {PacketType.JOIN, PacketType.SAY, PacketType.PRIVATE, PacketType.BYE}

# One table each: which method handles which packet type.
STRANGER_HANDLERS = {
    PacketType.HELLO: ChatServer.handle_hello,
    PacketType.REGISTER: ChatServer.handle_register,
    PacketType.LOGIN: ChatServer.handle_login,
}
MEMBER_HANDLERS = {
    PacketType.JOIN: ChatServer.handle_join,
    PacketType.SAY: ChatServer.handle_say,
    PacketType.PRIVATE: ChatServer.handle_private,
    PacketType.ROOMS: ChatServer.handle_rooms,
    PacketType.WHO: ChatServer.handle_who,
    PacketType.PING: ChatServer.handle_ping,
    PacketType.BYE: ChatServer.handle_bye,
}


def fit_fields(fields: list[str], step: int = 1) -> list[str]:
    """Return as many whole groups of `step` fields as fit in one reply, then '+N'."""
    budget = MAX_PAYLOAD - 64  # room for the '+N' marker and the length prefixes
    for end in range(0, len(fields) + 1, step):
        if len(pack_fields(*fields[:end])) > budget:
            end -= step
            return fields[:end] + [f"+{(len(fields) - end) // step}"]
    return fields


def fingerprint(packet: Packet) -> int:
    """Return a short digest of a request, to tell a true retry from another packet."""
    return hash((packet.type, packet.payload))


def timestamp() -> str:
    return time.strftime("%H:%M:%S")


# --- The network layer ---------------------------------------------------------------


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
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        # The hash worker wakes the loop by writing a byte into this pair of sockets.
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="password-hasher")
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.closed = False

    def serve_forever(self) -> None:
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                wait = min(max(self.chat.next_deadline() - now, 0.0), MAX_WAIT)
                ready = {key.fileobj for key, _ in self.selector.select(wait)}
                now = time.monotonic()
                if self.sock in ready:
                    self.receive_all(now)
                if self.wake_reader in ready:
                    self.finish_slow_jobs(now)
                self.survive(self.chat.on_timers, now, where="the timers")
                self.start_slow_jobs()
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

    def survive(self, work, *args, where: str, peer: Address | None = None) -> None:
        """Run `work(*args)`; if it raises, report the error and carry on.

        ChatServer validates everything a client sends, and the tests and fuzzers try hard
        to make it raise. Should a bug slip through anyway, one sender must not stop the
        chat for everyone: report it with its cause, as socketserver does, and go on.
        `where` (and `peer`, if it concerns one) say what was being done.
        """
        try:
            work(*args)
        except Exception:  # the one place a server must survive its own bug
            if peer:
                where = f"{where} {describe(peer)}"
            self.chat.stats["internal-errors"] += 1
            self.chat.problem(f"internal error on {where}:\n{traceback.format_exc()}")

    def start_slow_jobs(self) -> None:
        for work, then in self.chat.slow_jobs:
            future = self.hasher.submit(work)
            future.add_done_callback(lambda done, then=then: self.job_done(done, then))
        self.chat.slow_jobs.clear()

    def job_done(self, future, then) -> None:
        """Runs on the worker thread: hand the result to the loop and wake it."""
        self.finished.put((future, then))
        try:
            self.wake_writer.send(b"!")
        except OSError:
            pass  # the loop is closing; nobody needs waking

    def finish_slow_jobs(self, now: float) -> None:
        try:
            while self.wake_reader.recv(1024):
                pass
        except (BlockingIOError, OSError):
            pass
        while not self.finished.empty():
            future, then = self.finished.get()
            self.survive(self.finish_job, future, then, now, where="a finished password check")

    @staticmethod
    def finish_job(future, then, now: float) -> None:
        then(future.result(), now)

    def flush(self) -> None:
        for data, address in self.chat.outbox:
            try:
                self.sock.sendto(data, address)
            except OSError as error:  # e.g. no route to that host: that client's problem
                self.chat.problem(f"sending to {describe(address)} failed: {error}")
        self.chat.outbox.clear()

    def start(self) -> "ServerLoop":
        """Serve on a background thread (for tests and the notebook)."""
        self.thread = threading.Thread(target=self.serve_forever, name="chat-server", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wait for the loop to finish; safe from any thread."""
        self.stopping.set()
        try:
            self.wake_writer.send(b"!")
        except OSError:
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def close(self) -> None:
        """Release the socket, the worker and the files; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.hasher.shutdown(wait=True, cancel_futures=True)  # queued checks are not waited for
        self.selector.close()
        self.sock.close()
        self.wake_reader.close()
        self.wake_writer.close()
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
        chat.trace("LOST" if direction == "out" else "lost", data, ("simulated", 0), " (simulated loss)")
    return LossySocket(sock, config.loss, config.seed, on_drop, side="server")


# --- Starting from the command line --------------------------------------------------


def lan_addresses() -> list[str]:
    """Return this PC's IPv4 addresses other than loopback, as best the OS tells."""
    found = set()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_DGRAM)
        found.update(info[4][0] for info in infos)
    except OSError:
        pass
    # connect() on a UDP socket sends nothing; it only makes the OS pick the interface
    # it would route through, whose address getsockname() then tells.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            found.add(probe.getsockname()[0])
        except OSError:
            pass
    return sorted(address for address in found if not address.startswith(("127.", "0.")))


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
    parser.add_argument("--verbose", action="store_true", help="also trace every packet in and out")
    parser.add_argument("--loss", type=float, default=0.0,
                        help="simulate a lossy network: drop this share of datagrams, e.g. 0.3")
    parser.add_argument("--seed", type=int, help="random seed for --loss, to drop the same datagrams each run")
    parser.add_argument("--session-timeout", type=float, default=defaults.session_timeout,
                        help="seconds of silence before a client is considered gone (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 <= args.loss < 1:
        parser.error("--loss must be at least 0 and below 1")
    return ServerConfig(
        host=args.host, port=args.port, data_dir=args.data_dir, room_password=args.room_password,
        cipher=args.cipher, key=args.key, quiet=args.quiet, verbose=args.verbose,
        loss=args.loss, seed=args.seed, session_timeout=args.session_timeout,
    )


def print_banner(config: ServerConfig, address: Address) -> None:
    port = address[1]
    addresses = lan_addresses() if config.host in ("0.0.0.0", "") else [config.host]
    print(f"UDP chat server listening on {describe(address)}")
    if addresses:
        print(f"Clients on other PCs answer:  Server IP {' or '.join(addresses)}   port {port}")
    else:
        print(f"Clients answer: Server IP <this PC's address> port {port} (find it with ipconfig or 'ip addr')")
    print(f"Clients on this PC answer:    Server IP 127.0.0.1   port {port}")
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
            print_banner(config, loop.address)
            loop.serve_forever()
        finally:
            loop.close()
    except KeyboardInterrupt:  # Ctrl+C, at any moment: the normal way to stop
        pass
    print("[INFO] Server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
