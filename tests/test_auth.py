"""Accounts: salted slow hashes, case-insensitive names, an atomically written users file."""

import collections
import json
import os

import pytest

import auth


@pytest.fixture
def store(tmp_path):
    return auth.UserStore(str(tmp_path / "users.json"), iterations=1000)


def test_register_then_verify(store):
    assert store.register("alice", "secret")
    assert store.verify("alice", "secret")


def test_wrong_password_and_unknown_user_fail(store):
    store.register("alice", "secret")
    assert not store.verify("alice", "Secret")
    assert not store.verify("bob", "secret")


def test_names_are_unique_ignoring_case(store):
    assert store.register("Alice", "one")
    assert not store.register("alice", "two")
    assert store.verify("ALICE", "one")


def test_accounts_survive_a_reload(store):
    store.register("alice", "secret")
    reloaded = auth.UserStore(store.path, iterations=1000)
    assert reloaded.verify("alice", "secret") and len(reloaded) == 1


def test_the_file_holds_no_password(store):
    store.register("alice", "correct horse battery staple")
    with open(store.path, encoding="utf-8") as file:
        text = file.read()
    assert "correct horse" not in text
    (record,) = json.loads(text)["users"]
    assert set(record) == {"name", "kdf", "iterations", "salt", "hash"}
    assert record["kdf"] == "pbkdf2_sha256" and record["iterations"] == 1000


def test_same_password_gets_different_salts_and_hashes(store):
    store.register("alice", "same")
    store.register("bob", "same")
    alice, bob = store.get("alice"), store.get("bob")
    assert alice["salt"] != bob["salt"] and alice["hash"] != bob["hash"]


def test_iterations_are_read_from_each_record(store):
    store.register("old", "pw")
    raised = auth.UserStore(store.path, iterations=5000)  # cost raised later
    raised.register("new", "pw")
    assert raised.verify("old", "pw") and raised.verify("new", "pw")
    assert raised.get("old")["iterations"] == 1000 and raised.get("new")["iterations"] == 5000


def test_default_cost_is_slow():
    assert auth.DEFAULT_ITERATIONS >= 600_000


def test_dummy_record_matches_nothing():
    assert not auth.check_password("", auth.dummy_record(1000))


@pytest.mark.parametrize("name", ["a", "alice_01", "A.b-c", "x" * 20])
def test_valid_usernames(name):
    assert auth.valid_username(name)


@pytest.mark.parametrize("name", ["", "x" * 21, "al ice", "a:b", "émile", "a|b", "🙂"])
def test_invalid_usernames(name):
    assert not auth.valid_username(name)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "f.json")
    auth.write_atomically(path, "one")
    auth.write_atomically(path, "two")
    assert open(path, encoding="utf-8").read() == "two"
    assert os.listdir(tmp_path) == ["f.json"]


def test_failed_save_does_not_register(store, monkeypatch):
    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth, "write_atomically", disk_full)
    with pytest.raises(OSError):
        store.register("alice", "pw")
    assert not store.exists("alice")


def test_damaged_file_is_reported(tmp_path):
    path = tmp_path / "users.json"
    path.write_text('{"version": 1, "users": [', encoding="utf-8")
    with pytest.raises(ValueError, match="damaged"):
        auth.UserStore(str(path))


def test_failures_lock_a_key_until_the_oldest_is_a_period_old():
    counter = auth.FailureCounter(limit=3, period=60.0)
    for now in (0.0, 10.0, 20.0):
        assert counter.locked_for("alice", now) == 0.0
        counter.add("alice", now)
    assert counter.locked_for("alice", 30.0) == 30.0  # the first failure counts until 60.0
    assert counter.locked_for("bob", 30.0) == 0.0  # keys apart
    assert counter.locked_for("alice", 60.0) == 0.0


# SRP-6a records: a verifier, from a slow hash of name and password.
GROUP = (2**127 - 1, 3)  # a prime and a number mod it: enough to check the record's arithmetic


def test_a_verifier_record_holds_no_password_and_no_hash_that_logs_in():
    record = auth.new_verifier("Alice", "correct horse", GROUP, iterations=1000)
    assert set(record) == {"name", "kdf", "iterations", "salt", "verifier"}
    assert record["kdf"] == auth.VERIFIER_KDF and record["iterations"] == 1000
    assert "correct horse" not in str(record)
    x = auth.password_key("Alice", "correct horse", bytes.fromhex(record["salt"]), 1000)
    assert int(record["verifier"], 16) == pow(GROUP[1], x, GROUP[0])


def test_x_is_the_slow_hash_of_the_lower_case_name_and_the_password():
    salt = bytes(16)
    x = auth.password_key("ALICE", "pw", salt, 1000)
    assert x == auth.password_key("alice", "pw", salt, 1000)
    assert x == int.from_bytes(auth.hash_password("alice:pw", salt, 1000), "big")
    assert x != auth.password_key("bob", "pw", salt, 1000)
    assert x != auth.password_key("alice", "pw", salt, 2000)


def test_same_password_gets_different_verifiers():
    first, second = (auth.new_verifier("bob", "same", GROUP, 1000) for _ in range(2))
    assert first["salt"] != second["salt"] and first["verifier"] != second["verifier"]


def test_verifier_records_are_stored_and_reloaded(store):
    assert store.add(auth.new_verifier("alice", "pw", GROUP, 1000))
    reloaded = auth.UserStore(store.path)
    assert reloaded.get("ALICE")["kdf"] == auth.VERIFIER_KDF


# Names that look alike: a member list must not show "alice" twice.
@pytest.mark.parametrize("lookalike, name", [
    ("aIice", "alice"), ("a1ice", "alice"), ("ALICE", "alice"), ("rnallory", "mallory"),
    ("b0b", "bob"), ("vvalter", "walter"), ("clave", "dave"), ("mhs_05", "mhs.O5"),
    ("mhs-05", "mhs.o5"), ("5uzi", "suzi"), ("2ara", "zara"), ("8ob", "bob"),
])
def test_names_that_look_alike_share_a_skeleton(lookalike, name):
    assert auth.name_skeleton(lookalike) == auth.name_skeleton(name)


@pytest.mark.parametrize("one, other", [("alice", "alicia"), ("bob", "rob"), ("mhs05", "mhs06")])
def test_different_names_keep_different_skeletons(one, other):
    assert auth.name_skeleton(one) != auth.name_skeleton(other)


def test_a_name_like_a_taken_one_is_taken(store):
    assert store.register("alice", "pw") and store.register("mallory", "pw")
    assert store.taken("aIice") and store.taken("rnallory") and store.taken("ALICE")
    assert not store.register("aIice", "pw")
    assert not store.add(auth.new_verifier("rnallory", "pw", GROUP, 1000))
    assert not store.exists("aIice") and len(store) == 2
    assert store.register("alicia", "pw")


def test_a_file_that_already_holds_look_alikes_still_loads(tmp_path):
    path = tmp_path / "users.json"
    records = [auth.new_record(name, "pw", 1000) for name in ("alice", "aIice")]
    path.write_text(json.dumps({"version": 1, "users": records}), encoding="utf-8")
    store = auth.UserStore(str(path), iterations=1000)
    assert store.verify("alice", "pw") and store.verify("aIice", "pw")


def test_rooms_are_told_apart_by_their_exact_names(tmp_path):
    rooms = auth.UserStore(str(tmp_path / "rooms.json"), iterations=1000, kind="rooms")
    assert rooms.add(auth.new_record("alice", "pw", 1000))
    assert rooms.add(auth.new_record("aIice", "pw", 1000))


def test_a_removed_record_is_gone_on_disk_too(store):
    store.register("alice", "pw")
    store.remove("ALICE")
    assert not store.exists("alice") and not auth.UserStore(store.path).exists("alice")


def test_a_failed_save_keeps_a_removed_record(store, monkeypatch):
    store.register("alice", "pw")

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth, "write_atomically", disk_full)
    with pytest.raises(OSError):
        store.remove("alice")
    assert store.exists("alice")


# Lockouts that slow the guesser, not the owner.
def test_an_owner_at_another_pc_still_gets_in():
    limits = auth.LoginLimiter()
    for second in range(5):
        limits.failed("alice", "10.0.0.66", float(second))
    assert limits.locked_for("ALICE", "10.0.0.66", 5.0) > 0
    assert limits.locked_for("alice", "10.0.0.7", 5.0) == 0.0


def test_one_address_tries_at_most_20_passwords_in_5_minutes_across_accounts():
    limits = auth.LoginLimiter()
    for guess in range(20):
        assert limits.locked_for(f"mhs{guess:02}", "10.0.0.66", guess * 1.0) == 0.0
        limits.failed(f"mhs{guess:02}", "10.0.0.66", guess * 1.0)
    # The 21st guess, at any account, waits until the first is 5 minutes old.
    assert limits.locked_for("mhs99", "10.0.0.66", 20.0) == 280.0
    assert limits.locked_for("mhs99", "10.0.0.66", 300.0) == 0.0
    assert limits.locked_for("mhs99", "10.0.0.7", 20.0) == 0.0


def test_a_success_forgives_that_accounts_typos_from_that_address():
    limits = auth.LoginLimiter()
    for second in range(4):
        limits.failed("alice", "10.0.0.7", float(second))
    limits.failed("bob", "10.0.0.7", 4.0)
    limits.succeeded("alice", "10.0.0.7", 5.0)
    assert limits.addresses.recent("10.0.0.7", 5.0) == collections.deque([4.0])
    assert limits.accounts.recent(("alice", "10.0.0.7"), 5.0) == collections.deque()


def test_forty_students_behind_one_nat_address_log_in_despite_typos():
    limits, nat, now = auth.LoginLimiter(), "192.168.1.1", 0.0
    # Eight at a time mistype their password twice, then type it right: 80 failures in all,
    # at most 16 of them not yet put right.
    for group in range(5):
        students = [f"mhs{group * 8 + seat:02}" for seat in range(8)]
        for _typo in range(2):
            for student in students:
                assert limits.locked_for(student, nat, now) == 0.0
                limits.failed(student, nat, now)
                now += 1.0
        for student in students:
            assert limits.locked_for(student, nat, now) == 0.0
            limits.succeeded(student, nat, now)
            now += 1.0
    assert len(limits.addresses.recent(nat, now)) == 0


def test_failures_nobody_puts_right_lock_the_nat_address():
    limits, nat = auth.LoginLimiter(), "192.168.1.1"
    # Four students who forgot their passwords, five tries each: the class waits.
    for attempt in range(20):
        limits.failed(f"mhs{attempt % 4:02}", nat, float(attempt))
    assert limits.locked_for("mhs10", nat, 20.0) == 280.0
    assert limits.locked_for("mhs10", nat, 300.0) == 0.0
