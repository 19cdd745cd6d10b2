"""Accounts for the chat server: usernames and salted, slow password hashes.

Passwords are never stored. For each account the users file keeps a random salt and
PBKDF2-HMAC-SHA256 of the password with that salt, run many thousands of times so that
each guess costs an attacker who stole the file real time. The iteration count is kept in
every record, so it can be raised later without breaking old accounts.

The hash is slow on purpose, so the server runs it on a worker thread
(`PasswordWorker`), never on the loop that serves the chat; and it counts failed
attempts (`EventCounter`), so that guessing is slow for the guesser too.

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

KDF_NAME = "pbkdf2_sha256"
# OWASP's 2023 advice for PBKDF2-HMAC-SHA256: about a quarter of a second per guess on a
# lab PC, which the server spends off its main loop so that chat never waits for it.
DEFAULT_ITERATIONS = 600_000
SALT_BYTES = 16  # 128 random bits: no two accounts share a salt, so no shared tables
USERNAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_.-")
MAX_USERNAME = 20
FILE_VERSION = 1

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
    """The accounts, kept in memory and in a JSON file; usernames are case-insensitive."""

    def __init__(self, path: str, iterations: int = DEFAULT_ITERATIONS):
        self.path = path
        self.iterations = iterations
        self.records: dict[str, Record] = self.load()

    def load(self) -> dict[str, Record]:
        """Return the records in the users file (none if it does not exist yet)."""
        try:
            with open(self.path, encoding="utf-8") as file:
                content = json.load(file)
            return {record["name"].lower(): record for record in content["users"]}
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"users file {self.path} is damaged ({error!r}); move it away") from None

    def save(self) -> None:
        """Write every record to the users file, atomically and durably."""
        content = {"version": FILE_VERSION, "users": list(self.records.values())}
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


# --- Slow work off the server's loop, and counting attempts ---


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
    """One thread that runs password hashes, and wakes the loop when one is done.

    The loop sleeps in select(), which waits on sockets only (on Windows, not even on
    pipes). So the worker wakes it by sending a byte into a socket pair, a classic trick.
    """

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="password-hasher")
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)

    def submit(self, job: PasswordJob) -> None:
        self.pool.submit(job.run).add_done_callback(self.finished)

    def finished(self, future) -> None:
        """Runs on the worker thread: hand the job over, and wake the loop."""
        self.done.put(future)
        self.wake()

    def wake(self) -> None:
        try:
            self.wake_writer.send(b"!")
        except OSError:
            pass  # the loop is closing; nobody needs waking

    def collect(self) -> list:
        """Return the futures of the jobs finished since the last call (on the loop's thread)."""
        try:
            while self.wake_reader.recv(1024):
                pass
        except OSError:  # BlockingIOError: nothing more to read
            pass
        futures = []
        while not self.done.empty():
            futures.append(self.done.get())
        return futures

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # queued checks are not waited for
        self.wake_reader.close()
        self.wake_writer.close()


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
