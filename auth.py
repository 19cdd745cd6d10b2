"""Accounts at rest: valid names, salted slow password hashes, a crash-safe store, lockouts.

Passwords are never stored. For each account the users file keeps a random salt and
PBKDF2-HMAC-SHA256 of the password with that salt, run many thousands of times so that
each guess costs an attacker who stole the file real time. The iteration count is kept in
every record, so it can be raised later without breaking old accounts. A record for SRP-6a
keeps v = g^x mod N instead, x being that slow hash of name and password: v cannot log in.

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
sliding period, so that guessing is slow for the guesser too (`LoginLimiter`: not the owner).

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
VERIFIER_KDF = "srp6a_pbkdf2_sha256"
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
# also has "created", the Unix time it was made; an SRP account's has "verifier", not "hash".
Record = dict


def valid_username(name: str) -> bool:
    """Is `name` 1-20 characters of ASCII letters, digits, '_', '.' or '-'? (Rooms too.)"""
    return 1 <= len(name) <= MAX_USERNAME and all(c in USERNAME_CHARACTERS for c in name)


def hash_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Return PBKDF2-HMAC-SHA256 of `password`: the slow step."""
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


def name_skeleton(name: str) -> str:
    """Return `name` as it looks: no case; i l 1, o 0, s 5, z 2, b 8, _ . -, rn m, vv w, cl d."""
    shape = name.lower().translate(str.maketrans("i10528.-", "lloszb__"))
    return shape.replace("rn", "m").replace("vv", "w").replace("cl", "d")


def password_key(name: str, password: str, salt: bytes, iterations: int) -> int:
    """Return SRP's x: the slow hash of "name:password", the name in lower case, as a number."""
    return int.from_bytes(hash_password(f"{name.lower()}:{password}", salt, iterations), "big")


def new_verifier(name: str, password: str, group: tuple[int, int],
                 iterations: int = DEFAULT_ITERATIONS) -> Record:
    """Return the SRP record of a new account: v = g^x mod N, `group` being (N, g)."""
    salt = secrets.token_bytes(SALT_BYTES)
    verifier = pow(group[1], password_key(name, password, salt, iterations), group[0])
    return {"name": name, "kdf": VERIFIER_KDF, "iterations": iterations,
            "salt": salt.hex(), "verifier": format(verifier, "x")}


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
    """Return a record no password matches, as slow to check: so that a failed login's
    timing does not tell which usernames exist, an unknown name is checked against it."""
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

    def save(self, records: dict[str, Record]) -> None:
        """Write `records` to the file, atomically and durably; then they are the store's."""
        content = {"version": FILE_VERSION, self.kind: list(records.values())}
        write_atomically(self.path, json.dumps(content, indent=1, ensure_ascii=False) + "\n")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def exists(self, name: str) -> bool:
        return name.lower() in self.records

    def get(self, name: str) -> Record | None:
        return self.records.get(name.lower())

    def taken(self, name: str) -> bool:
        """Is `name`, or (among users) a name that looks like it, in the store?"""
        looks = self.kind == "users" and name_skeleton(name) in map(name_skeleton, self.records)
        return self.exists(name) or looks

    def add(self, record: Record) -> bool:
        """Store a new record on disk; False if its name is taken."""
        if self.taken(record["name"]):
            return False
        self.save({**self.records, record["name"].lower(): record})
        return True

    def remove(self, name: str) -> None:
        """Forget a record, on disk too."""
        self.save({key: record for key, record in self.records.items() if key != name.lower()})

    def register(self, name: str, password: str) -> bool:
        """Create an account; False if the name is taken (before the slow hash runs)."""
        return not self.taken(name) and self.add(new_record(name, password, self.iterations))

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


class LoginLimiter:
    """Failed logins per (account, address), and per address across accounts (spraying).

    An owner at another PC still gets in; an address tries at most `per_address` passwords
    a `period` (20 in 5 minutes: 4 a minute). A success forgives its account's failures from
    its address, so 40 students behind one NAT address, a typo or two each, get in: it locks
    at 20 failures not yet put right (4 students trying 5 forgotten passwords; a guesser).
    """

    def __init__(self, per_account: int = 5, per_address: int = 20, period: float = 300.0):
        self.accounts = FailureCounter(per_account, period)
        self.addresses = FailureCounter(per_address, period)

    def locked_for(self, name: str, address: str, now: float) -> float:
        return max(self.accounts.locked_for((name.lower(), address), now),
                   self.addresses.locked_for(address, now))

    def failed(self, name: str, address: str, now: float) -> None:
        self.accounts.add((name.lower(), address), now)
        self.addresses.add(address, now)

    def succeeded(self, name: str, address: str, now: float) -> None:
        """Forgive the account's recent failures from `address`, there and in its count."""
        times = self.addresses.recent(address, now)
        for moment in self.accounts.failures.pop((name.lower(), address), ()):
            if moment in times:
                times.remove(moment)
