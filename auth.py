"""Who may come in, and how often: accounts, the door, and the limits.

Passwords are never stored. For each account the users file keeps a random salt and
PBKDF2-HMAC-SHA256 of the password with that salt, run many thousands of times so that
each guess costs an attacker who stole the file real time. The iteration count is kept in
every record, so it can be raised later without breaking old accounts.

The users file is JSON and is replaced atomically: the new content goes to a temporary
file, which is flushed and fsync'ed to disk, then renamed over the old one with
`os.replace` (atomic on Windows and POSIX). A crash at any moment leaves either the old
file or the new one, never half of one; and a registration is confirmed to the user only
after its record is on disk.

    >>> store = UserStore("users.json", iterations=1000)   # tests lower the cost
    >>> store.register("alice", "secret")
    True
    >>> store.verify("alice", "secret"), store.verify("alice", "guess")
    (True, False)

The server's door is here too (`Reception`): HELLO, REGISTER and LOGIN, from senders
who have no session yet. The hash is slow on purpose, so it runs on a worker thread
(`PasswordWorker`), never on the loop that serves the chat; and `AbuseControl` counts
failed attempts, so that guessing is slow for the guesser too.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import os
import queue
import secrets
import socket
import string
import typing

from encryption_helper import (
    LOBBY,
    MAGIC,
    MIN_FIND_SIZE,
    MIN_HELLO_SIZE,
    SERVER_ONLY,
    Address,
    Packet,
    PacketError,
    PacketType,
    WakeUp,
    describe_address,
    encode_packet,
    pack_fields,
    peek_type_name,
    unpack_fields,
)

if typing.TYPE_CHECKING:  # only for the type hints: server.py imports this module
    from server import ChatServer, Request

KDF_NAME = "pbkdf2_sha256"
# OWASP's 2023 advice for PBKDF2-HMAC-SHA256: about a quarter of a second per guess on a
# lab PC, which the server spends off its main loop so that chat never waits for it.
DEFAULT_ITERATIONS = 600_000
SALT_BYTES = 16  # 128 random bits: no two accounts share a salt, so no shared tables
USERNAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_.-")
MAX_USERNAME = 20
FILE_VERSION = 1
MAX_NAME_BYTES = 64  # the name a FIND is answered with: so that the answer stays smaller than the FIND
COOKIE_PERIOD = 30.0  # seconds; a HELLO cookie stays valid for one to two periods

Record = dict  # {"name", "kdf", "iterations", "salt", "hash"}; salt and hash in hex


def valid_username(name: str) -> bool:
    """Is `name` 1-20 characters of ASCII letters, digits, '_', '.' or '-'?"""
    return 1 <= len(name) <= MAX_USERNAME and all(c in USERNAME_CHARACTERS for c in name)


def hash_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Return PBKDF2-HMAC-SHA256 of `password`: the slow step."""
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


def new_record(name: str, password: str, iterations: int = DEFAULT_ITERATIONS) -> Record:
    """Return the record to store for a new account (fresh random salt)."""
    salt = secrets.token_bytes(SALT_BYTES)
    return {
        "name": name,
        "kdf": KDF_NAME,
        "iterations": iterations,
        "salt": salt.hex(),
        "hash": hash_password(password, salt, iterations).hex(),
    }


def check_password(password: str, record: Record) -> bool:
    """Does `password` match `record`? The comparison takes the same time either way."""
    expected = bytes.fromhex(record["hash"])
    actual = hash_password(password, bytes.fromhex(record["salt"]), record["iterations"])
    return hmac.compare_digest(actual, expected)


def dummy_record(iterations: int = DEFAULT_ITERATIONS) -> Record:
    """Return a record no password matches; checking against it costs a real check.

    Checking an unknown username against this costs as much time as a known one, so the
    time of a failed login does not tell an attacker which usernames exist.
    """
    return {"name": "", "kdf": KDF_NAME, "iterations": iterations,
            "salt": bytes(SALT_BYTES).hex(), "hash": bytes(32).hex()}


def write_atomically(path: str, text: str) -> None:
    """Replace the file at `path` by `text`, so that a crash leaves the old or the new."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())  # the bytes are on disk before the rename makes them live
    os.replace(temporary, path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class UserStore:
    """The accounts, kept in memory and in a JSON file; usernames are case-insensitive.

    The server keeps its rooms in a second one (`kind="rooms"`): a room's password is
    stored as an account's is, salted and slow to guess.
    """

    def __init__(self, path: str, iterations: int = DEFAULT_ITERATIONS, kind: str = "users"):
        self.path, self.kind = path, kind
        self.iterations = iterations
        self.records: dict[str, Record] = self.load()

    def load(self) -> dict[str, Record]:
        """Return the records in the users file (none if it does not exist yet)."""
        try:
            with open(self.path, encoding="utf-8") as file:
                content = json.load(file)
            return {record["name"].lower(): record for record in content[self.kind]}
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{self.kind} file {self.path} is damaged ({error!r}); move it away") from None

    def save(self) -> None:
        """Write every record to the users file, atomically and durably."""
        content = {"version": FILE_VERSION, self.kind: list(self.records.values())}
        write_atomically(self.path, json.dumps(content, indent=1, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self.records)

    def exists(self, name: str) -> bool:
        return name.lower() in self.records

    def get(self, name: str) -> Record | None:
        return self.records.get(name.lower())

    def add(self, record: Record) -> bool:
        """Store a new account's record on disk; False if the name is taken."""
        key = record["name"].lower()
        if key in self.records:
            return False
        self.records[key] = record
        try:
            self.save()
        except OSError:
            del self.records[key]  # not on disk, so not registered
            raise
        return True

    def remove(self, name: str) -> None:
        """Forget a record, on disk too."""
        record = self.records.pop(name.lower())
        try:
            self.save()
        except OSError:
            self.records[name.lower()] = record  # still on disk, so still here
            raise

    def register(self, name: str, password: str) -> bool:
        """Create an account; False if the name is taken. Runs the slow hash."""
        if self.exists(name):
            return False
        return self.add(new_record(name, password, self.iterations))

    def verify(self, name: str, password: str) -> bool:
        """Is this the account's password? Unknown names cost the same time as known ones."""
        record = self.get(name)
        matches = check_password(password, record or dummy_record(self.iterations))
        return matches and record is not None


# --- The door: HELLO, REGISTER and LOGIN, before a session exists ---


class Refusal(Exception):
    """A request the server turns down; becomes an ERROR reply [re, code, text]."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


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
        self.replies = StrangerReplies()

    def handle_stranger(self, request: "Request") -> None:
        """HELLO, REGISTER, LOGIN: answered without a session; a retry gets the same answer."""
        remembered = self.replies.look_up(request)
        if remembered is StrangerReplies.WORKING:
            self.server.log.verbose(request, "still checking the password (the client asked again)")
        elif remembered is not None:
            self.server.log.verbose(request, "answered again (the client did not hear the first answer)")
            self.server.send(remembered, request.address, " (repeat)")
        else:
            self.server.handle_request(request)

    def handle_hello(self, request: "Request") -> list[str] | None:
        """HELLO -> OK [re, cookie]: proves the client really is at its address, as DTLS does.

        The reply goes to the address the HELLO claims; only someone who is really there
        sees the cookie and can send it back in REGISTER or LOGIN.
        """
        if request.session is None and request.size < MIN_HELLO_SIZE:
            self.server.log.problem(f"{describe_address(request.address)} sent an unpadded HELLO "
                                    f"({request.size} B); dropped")
            return None
        return [self.make_cookie(request.address, int(request.now // COOKIE_PERIOD))]

    def make_cookie(self, address: Address, period: int) -> str:
        message = f"{address[0]}|{address[1]}|{period}".encode()
        return hmac.new(self.cookie_secret, message, "sha256").hexdigest()[:32]

    def check_credentials(self, request: "Request") -> tuple[str, str]:
        """Return (username, password) of a REGISTER or LOGIN whose cookie is good."""
        fields = unpack_fields(request.packet.payload)
        if fields[3:] not in ([], ["rejoin"]) or len(fields) < 3:  # a client back after losing its session
            raise PacketError(f"expected [cookie, name, password] and maybe 'rejoin', got {len(fields)} fields")
        cookie, name, password = fields[:3]
        period = int(request.now // COOKIE_PERIOD)
        given = cookie.encode("utf-8")  # bytes: compare_digest refuses non-ASCII text
        if not any(hmac.compare_digest(given, self.make_cookie(request.address, p).encode())
                   for p in (period, period - 1)):
            raise Refusal("stale-cookie", "Say HELLO again.")
        request.proven = True
        return name, password

    def handle_register(self, request: "Request") -> None:
        name, password = self.check_credentials(request)
        if not valid_username(name):
            raise Refusal("bad-name", "Usernames are 1-20 letters, digits, '_', '.' or '-'.")
        if not password:
            raise Refusal("bad-password", "The password must not be empty.")
        if self.server.users.exists(name) or name.lower() in self.registering:
            raise Refusal("taken", "Username already taken.")
        self.server.guard.check("registrations", request.address[0], request.now)
        self.start_password_job(PasswordJob(request, name, password, None, self.server.users.iterations))
        self.server.guard.count("registrations", request.address[0], request.now)
        self.registering.add(name.lower())

    def finish_register(self, job: "PasswordJob") -> list[str]:
        self.registering.discard(job.name.lower())
        try:
            if not self.server.users.add(job.result):  # on disk before we say so
                raise Refusal("taken", "Username already taken.")
        except OSError as error:
            self.server.log.problem(f"could not save the users file: {error}")
            raise Refusal("server-error", "The server could not save your account; try again.") from None
        return ["Registration successful."]

    def handle_login(self, request: "Request") -> None:
        if request.session is not None:
            raise Refusal("already-logged-in", "This client is logged in already; log out first.")
        name, password = self.check_credentials(request)
        self.server.guard.check("failed logins", name.lower(), request.now)  # before hashing: guessing costs
        record = self.server.users.get(name) or dummy_record(self.server.users.iterations)
        self.start_password_job(PasswordJob(request, name, password, record))

    def finish_login(self, job: "PasswordJob") -> list[str] | None:
        request = job.request
        if not (job.result and job.record["name"]):
            self.server.guard.count("failed logins", job.name.lower(), request.now)
            raise Refusal("invalid-login", "Invalid username or password.")
        name = job.record["name"]  # as registered, whatever the case typed
        here = self.server.sessions.get(request.address)
        elsewhere = self.server.online.get(name.lower())
        rejoining = unpack_fields(request.packet.payload)[3:] == ["rejoin"]  # a client back with a new channel
        if self.server.stopping:
            raise Refusal("stopping", "The server is stopping; try again in a moment.")
        if here and here.name.lower() != name.lower():
            raise Refusal("already-logged-in", "This client is logged in already; log out first.")
        if elsewhere and elsewhere is not here:
            if rejoining:  # a client coming back never pushes a newer one out
                raise Refusal("logged-in-elsewhere", f"{name} logged in elsewhere.")
            self.server.end_session(elsewhere, "logged in elsewhere", request.now, tell="replaced")
        if here and here.channel.expected > 1 and not rejoining:  # in use: a replay of its LOGIN; it stands
            self.welcome(request, here)
            return None
        if here:  # the same login again, never used: its welcome was lost and forgotten; start afresh
            self.server.end_session(here, "", request.now)
        self.server.guard.check_sessions(len(self.server.sessions))
        self.welcome(request, self.server.open_session(name, request.address, request.now))
        return None

    def welcome(self, request: "Request", session) -> None:
        """Answer a LOGIN: OK [re, name, room, text], with the session's token in the header."""
        self.server.answer(request, [session.name, LOBBY, f"Welcome, {session.name}."], token=session.token)

    def start_password_job(self, job: "PasswordJob") -> None:
        """Hand a password check to the worker; what comes after its request waits for it."""
        self.server.guard.hash_started(job.request.address[0])
        if job.request.session:
            job.request.session.checking = True  # a member's next requests wait, in order
        else:
            self.replies.working(job.request)  # a stranger's retries wait for it
        self.server.password_jobs.append(job)
        slow_step = "hashing the new password..." if job.record is None else "checking password..."
        self.server.log.outcome(job.request, None, [slow_step])

    def finish_check(self, job: "PasswordJob") -> list[str] | None:
        """Finish the REGISTER, LOGIN or JOIN a password check was for."""
        if job.error:  # the check itself failed: the request still gets an answer
            self.server.log.problem(f"checking {job.name!r}'s password failed: {job.error}")
            if job.request.packet.type == PacketType.REGISTER:
                self.registering.discard(job.name.lower())
            raise Refusal("server-error", "The server could not check that; try again.")
        finish = {PacketType.REGISTER: self.finish_register, PacketType.LOGIN: self.finish_login,
                  PacketType.JOIN: self.server.finish_join}
        return finish[job.request.packet.type](job)

    def answer_stranger(self, request: "Request", packet: Packet) -> None:
        """Send an answer straight to the address; remember it if a retry may come."""
        data = encode_packet(packet, self.server.cipher)
        if request.proven:
            self.replies.remember(request, data)
        self.send_to_stranger(data, request.address, request.size, request.proven)

    def send_to_stranger(self, data: bytes, address: Address, size: int, proven: bool = False) -> None:
        """Answer an address, never with more bytes than it sent unless it proved itself.

        UDP source addresses can be forged: if a small request could earn a big reply,
        anyone could aim our replies at a victim (a reflection attack).
        """
        if proven or len(data) <= size:
            self.server.send(data, address)
        else:
            self.server.stats["withheld"] += 1

    def refuse_datagram(self, data: bytes, address: Address, error: PacketError) -> None:
        """Log a malformed datagram, and answer if it looks like ours (it may be a bad key)."""
        self.server.stats["bad"] += 1
        what = f"{peek_type_name(data)}, {len(data)} B"
        self.server.log.problem(f"{describe_address(address)} sent a bad datagram ({what}): {error}")
        # The type byte is never scrambled: a type only servers send is not answered even when
        # the rest cannot be read (another key or version), or two servers would answer each other.
        if data[:2] == MAGIC and len(data) > 3 and data[3] not in SERVER_ONLY:
            answer = encode_packet(Packet(PacketType.ERROR, payload=pack_fields("0", "bad-packet", str(error))),
                                   self.server.cipher)
            self.send_to_stranger(answer, address, len(data))

    def refuse_server_only(self, request: "Request") -> None:
        """OK, ERROR, EVENT or RESET sent to a server: never answered (two servers could loop)."""
        self.server.stats["bad"] += 1
        self.server.log.problem(f"{describe_address(request.address)} sent {request.packet.type.name}, "
                                "which only servers send; dropped")

    def refuse_unknown_session(self, request: "Request", session) -> None:
        """A member packet without a valid session: RESET if we know nobody at that address."""
        self.server.stats["no-session"] += 1
        packet, address = request.packet, request.address
        if packet.type == PacketType.ACK:
            return  # e.g. the last ACK of a client that said BYE: nothing to answer
        if packet.type in SERVER_ONLY:  # maybe another server, answering what we sent it: a
            self.refuse_server_only(request)  # RESET back would be answered too, for ever
            return
        sender = f"{describe_address(address)} sent {packet.type.name}"
        if session is not None:  # someone else's address with a wrong token: forged
            self.server.log.problem(f"{sender} with a wrong session token; dropped")
            return
        self.server.log.problem(f"{sender} but has no session; told to log in")
        # RESET is a bare header, never larger than any packet, and echoes the token, so
        # a client believes it only if it carried that token itself.
        reset = Packet(PacketType.RESET, 0, packet.seq, 0, packet.token)
        self.server.send(encode_packet(reset, self.server.cipher), address)


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

    def handle_find(self, request: "Request") -> list[str] | None:
        """FIND -> OK [re, name, port, members online]; unpadded, or over the rate, it is dropped."""
        if request.size < MIN_FIND_SIZE:
            return self.drop(request, f"unpadded ({request.size} B)")
        unpack_fields(request.packet.payload, 1)  # the padding, and nothing else
        if self.bucket.take(request.now):
            return self.drop(request, "over the server's rate of answers")
        return [self.name, str(self.port), str(len(self.server.sessions))]

    def drop(self, request: "Request", why: str) -> None:
        self.server.stats["finds dropped"] += 1
        self.server.log.problem(f"{describe_address(request.address)} sent a FIND, {why}; dropped")


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
    def key(request: "Request") -> tuple:
        packet = request.packet
        return request.address, packet.seq, hash((packet.type, packet.payload))

    def look_up(self, request: "Request"):
        """Return the remembered answer (bytes), WORKING, or None for a new request."""
        return self.answers.get(self.key(request))

    def working(self, request: "Request") -> None:
        self.store(self.key(request), self.WORKING)

    def remember(self, request: "Request", data: bytes) -> None:
        self.store(self.key(request), data)

    def store(self, key: tuple, value) -> None:
        self.answers[key] = value
        self.answers.move_to_end(key)
        while len(self.answers) > self.SIZE:
            self.answers.popitem(last=False)


# --- Slow work off the server's loop ---


@dataclasses.dataclass
class PasswordJob:
    """A slow password hash for the worker thread: a new account's record, or a login check."""

    request: object  # what the server needs to answer once the check is done
    name: str
    password: str
    record: dict | None  # LOGIN: the stored record, or a dummy one so strangers wait as long
    iterations: int = 0  # REGISTER: the hash's cost
    result: object = None  # set by run(): the new record, or whether the password matched
    error: str = ""  # set by run() if the check itself failed (a damaged record, say)

    def run(self) -> "PasswordJob":
        """Runs on the worker thread; touches nothing but this job."""
        try:
            if self.record is None:
                self.result = new_record(self.name, self.password, self.iterations)
            else:
                self.result = check_password(self.password, self.record)
        except Exception as error:  # reported by the server's loop, which must still answer
            self.error = repr(error)
        return self


class PasswordWorker:
    """One thread that runs password hashes, and wakes the loop (`waker`) when one is done."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="password-hasher")
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.waker = WakeUp()

    def submit(self, job: PasswordJob) -> None:
        self.pool.submit(job.run).add_done_callback(self.finished)

    def finished(self, future) -> None:
        """Runs on the worker thread: hand the job over, and wake the loop."""
        self.done.put(future)
        self.waker.wake()

    def collect(self) -> list:
        """Return the futures of the jobs finished since the last call (on the loop's thread)."""
        self.waker.drain()
        futures = []
        while not self.done.empty():
            futures.append(self.done.get())
        return futures

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # queued checks are not waited for
        self.waker.close()


class EventCounter:
    """Counts events per key over a sliding period; the table of keys is bounded.

    When the table is full the least recently used key is forgotten, so a stranger's
    flood of new keys cannot grow memory without bound.
    """

    MAX_KEYS = 10_000

    def __init__(self, limit: int, period: float):
        self.limit, self.period = limit, period
        self.events: collections.OrderedDict = collections.OrderedDict()

    def recent(self, key, now: float) -> collections.deque:
        """Return the times of `key`'s events within the period, oldest first."""
        times = self.events.get(key, collections.deque())
        while times and times[0] <= now - self.period:
            times.popleft()
        return times

    def add(self, key, now: float) -> None:
        self.events[key] = self.recent(key, now)
        self.events[key].append(now)
        self.events.move_to_end(key)
        while len(self.events) > self.MAX_KEYS:
            self.events.popitem(last=False)

    def blocked_for(self, key, now: float) -> float:
        """Return how many seconds `key` must wait, 0 if it has not reached the limit."""
        times = self.recent(key, now)
        return 0.0 if len(times) < self.limit else times[-self.limit] + self.period - now


# --- The limits: what keeps one student from spoiling the lab ---


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
    """Lockouts, limits and capacity, each with a named bound that tests may lower."""

    LOGIN_FAILURES = 5  # failed logins per account in FAILURE_PERIOD before it is locked
    FAILURE_PERIOD = 60.0
    REGISTRATIONS_PER_ADDRESS = 20  # per FAILURE_PERIOD, from one IP address
    MAX_PENDING_HASHES = 16  # password checks waiting for the worker; then "busy"
    MAX_PENDING_PER_ADDRESS = 2  # one address cannot fill the hash queue alone
    MAX_SESSIONS = 500  # a lab of 40 PCs with room to spare; then "Server full"
    MAX_ROOMS = 50  # with the lobby; when full, the room quiet longest that nobody is in is forgotten
    MESSAGE_RATE = 5.0  # messages a second per member, as IRC servers limit...
    MESSAGE_BURST = 20  # ...after a burst: pasting a short paragraph is fine

    def __init__(self):
        # What is counted -> (its counter, keyed by account, IP address or session; the refusal)
        self.limits = {
            "failed logins": (EventCounter(self.LOGIN_FAILURES, self.FAILURE_PERIOD),
                              "locked", "Too many failed attempts"),
            "registrations": (EventCounter(self.REGISTRATIONS_PER_ADDRESS, self.FAILURE_PERIOD),
                              "slow-down", "Too many registrations from your address"),
            "wrong room passwords": (EventCounter(self.LOGIN_FAILURES, self.FAILURE_PERIOD),
                                     "locked", "Too many wrong room passwords"),
        }
        self.pending: collections.Counter = collections.Counter()  # ip -> password checks waiting

    def check(self, what: str, key, now: float) -> None:
        """Refuse, with the wait, if `key` has had too many of `what` lately."""
        counter, code, why = self.limits[what]
        wait = counter.blocked_for(key, now)
        if wait:
            raise Refusal(code, f"{why}; try again in {wait:.0f} s.")

    def count(self, what: str, key, now: float) -> None:
        self.limits[what][0].add(key, now)

    def hash_started(self, ip: str) -> None:
        """Count a password check for the worker, or refuse it when there are enough."""
        if sum(self.pending.values()) >= self.MAX_PENDING_HASHES:
            raise Refusal("busy", "Server busy; try again in a moment.")
        if self.pending[ip] >= self.MAX_PENDING_PER_ADDRESS:
            raise Refusal("busy", "Other password checks from your address are running; try again in a moment.")
        self.pending[ip] += 1

    def hash_finished(self, ip: str) -> None:
        self.pending[ip] -= 1
        if not self.pending[ip]:
            del self.pending[ip]

    def check_sessions(self, count: int) -> None:
        if count >= self.MAX_SESSIONS:
            raise Refusal("full", "Server full; try again later.")

    def new_bucket(self, now: float) -> TokenBucket:
        return TokenBucket(self.MESSAGE_RATE, self.MESSAGE_BURST, now)
