"""Accounts at rest: valid names, salted slow password hashes, a crash-safe store, lockouts.

Passwords are never stored. For each account the users file keeps a random salt and
PBKDF2-HMAC-SHA256 of the password with that salt, run many thousands of times so that
each guess costs an attacker who stole the file real time. The iteration count is kept in
every record, so it can be raised later without breaking old accounts.

The file is JSON and is replaced atomically: the new content goes to a temporary file,
which is flushed and fsync'ed to disk, then renamed over the old one with `os.replace`
(atomic on Windows and POSIX). A crash at any moment leaves either the old file or the
new one, never half of one; and the server confirms a registration only after its record
is on disk. The server keeps its rooms the same way: a room's password is an account's.

    >>> store = UserStore("users.json", iterations=1000)   # tests lower the cost
    >>> store.register("alice", "secret")
    True
    >>> store.verify("alice", "secret"), store.verify("alice", "guess")
    (True, False)

`FailureCounter` counts failed attempts (wrong passwords, registrations) per key over a
sliding period, so that guessing is slow for the guesser too.

This module imports nothing of the project: server.py uses it, never the other way round.
"""

import collections
import hashlib
import hmac
import json
import os
import secrets
import string

KDF_NAME = "pbkdf2_sha256"
# OWASP's 2023 advice for PBKDF2-HMAC-SHA256: about a quarter of a second per guess on a
# lab PC, which the server spends on a worker thread so that chat never waits for it.
DEFAULT_ITERATIONS = 600_000
# 128 random bits: no two accounts share a salt, so no precomputed table serves them all.
SALT_BYTES = 16
USERNAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_.-")
MAX_USERNAME = 20
# The layout of the JSON files; a later layout would bump it.
FILE_VERSION = 1

# {"name", "kdf", "iterations", "salt", "hash"}; salt and hash in hex. A room's record
# also has "created", the Unix time it was made.
Record = dict


def valid_username(name: str) -> bool:
    """Is `name` 1-20 characters of ASCII letters, digits, '_', '.' or '-'? (Rooms too.)"""
    return 1 <= len(name) <= MAX_USERNAME and all(c in USERNAME_CHARACTERS for c in name)


def hash_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Return PBKDF2-HMAC-SHA256 of `password`: the slow step."""
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


def new_record(name: str, password: str, iterations: int = DEFAULT_ITERATIONS) -> Record:
    """Return the record to store for a new account (fresh random salt)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hash_password(password, salt, iterations)
    return {"name": name, "kdf": KDF_NAME, "iterations": iterations,
            "salt": salt.hex(), "hash": digest.hex()}


def check_password(password: str, record: Record) -> bool:
    """Does `password` match `record`? The comparison takes the same time either way."""
    expected = bytes.fromhex(record["hash"])
    actual = hash_password(password, bytes.fromhex(record["salt"]), record["iterations"])
    return hmac.compare_digest(actual, expected)


def dummy_record(iterations: int = DEFAULT_ITERATIONS) -> Record:
    """Return a record no password matches; checking against it costs a real check.

    So a failed login takes as long for an unknown name as for a known one, and its
    timing does not tell an attacker which usernames exist.
    """
    return {"name": "", "kdf": KDF_NAME, "iterations": iterations,
            "salt": bytes(SALT_BYTES).hex(), "hash": bytes(32).hex()}


def write_atomically(path: str, text: str) -> None:
    """Replace the file at `path` by `text`, so that a crash leaves the old or the new."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)
        file.flush()
        # The bytes are on disk before the rename makes them the file.
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # POSIX: the rename is an entry in the folder; fsync the folder to make it durable too.
    if hasattr(os, "O_DIRECTORY"):
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class UserStore:
    """Records by lower-case name, in memory and in a JSON file: names are case-insensitive.

    `kind` names the list in the file: "users" for accounts, "rooms" for the rooms.
    `add` and `remove` are on disk before they return; if the disk refuses, nothing changed.
    """

    def __init__(self, path: str, iterations: int = DEFAULT_ITERATIONS, kind: str = "users"):
        self.path, self.kind, self.iterations = path, kind, iterations
        self.records: dict[str, Record] = self.load()

    def load(self) -> dict[str, Record]:
        """Return the records in the file (none if it does not exist yet)."""
        try:
            with open(self.path, encoding="utf-8") as file:
                content = json.load(file)
            return {record["name"].lower(): record for record in content[self.kind]}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{self.kind} file {self.path} is damaged ({error!r}); "
                             "move it away") from None

    def save(self) -> None:
        """Write every record to the file, atomically and durably."""
        content = {"version": FILE_VERSION, self.kind: list(self.records.values())}
        write_atomically(self.path, json.dumps(content, indent=1, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self.records)

    def exists(self, name: str) -> bool:
        return name.lower() in self.records

    def get(self, name: str) -> Record | None:
        return self.records.get(name.lower())

    def add(self, record: Record) -> bool:
        """Store a new record on disk; False if the name is taken."""
        key = record["name"].lower()
        if key in self.records:
            return False
        self.records[key] = record
        try:
            self.save()
        except OSError:
            # Not on disk, so not registered.
            del self.records[key]
            raise
        return True

    def remove(self, name: str) -> None:
        """Forget a record, on disk too."""
        record = self.records.pop(name.lower())
        try:
            self.save()
        except OSError:
            # Still on disk, so still here.
            self.records[name.lower()] = record
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


class FailureCounter:
    """Failed attempts per key (an account, an IP address) within the last `period` seconds.

    After `limit` of them the key is locked until the oldest one is `period` old. The
    table of keys is bounded: when full, the key used least recently is forgotten, so a
    flood of new keys (forged addresses, say) cannot grow memory without end.
    """

    MAX_KEYS = 10_000

    def __init__(self, limit: int, period: float):
        self.limit, self.period = limit, period
        self.failures: collections.OrderedDict = collections.OrderedDict()

    def recent(self, key, now: float) -> collections.deque:
        """Return the times of `key`'s failures within the period, oldest first."""
        times = self.failures.get(key, collections.deque())
        while times and times[0] <= now - self.period:
            times.popleft()
        return times

    def add(self, key, now: float) -> None:
        """Count one failure of `key` at time `now`."""
        self.failures[key] = self.recent(key, now)
        self.failures[key].append(now)
        self.failures.move_to_end(key)
        while len(self.failures) > self.MAX_KEYS:
            self.failures.popitem(last=False)

    def locked_for(self, key, now: float) -> float:
        """Return how many seconds `key` must still wait; 0 if it is not locked."""
        times = self.recent(key, now)
        if len(times) < self.limit:
            return 0.0
        return times[-self.limit] + self.period - now
