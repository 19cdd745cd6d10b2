"""Accounts: salted slow hashes, case-insensitive names, an atomically written users file."""

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
