"""A hostile classmate against the login: guessing passwords locks out the guesser, not the owner.

The lockouts count failed logins per account and address, and per address across accounts
(auth.LoginLimiter), checked before any slow hash: an owner at another PC still gets in while the
guesser's address is locked, and one address tries at most a few passwords a minute over all
accounts. A new name that looks like one in use (`aIice` beside `alice`) is refused as taken.
The last test runs the real server and clients on a LAN of network namespaces (tests/test_lan.py).
"""

import pytest
from test_chat_server import ACCOUNT, OK, Harness, Peer
from test_lan import PORT, lan, start_chat_server  # noqa: F401 - `lan` is the fixture used below

import encryption_helper as wire
import server
from encryption_helper import PacketType, unpack_fields

ATTACKER, OWNER = "10.0.0.66", "10.0.0.7"


@pytest.fixture
def harness(tmp_path):
    made = Harness(tmp_path / "data")
    yield made
    made.chat.close()


@pytest.fixture
def hashes(monkeypatch):
    """Every modular exponentiation of a LOGIN the server starts (SRP-6a's B and S)."""
    calls = []
    real = wire.srp_server
    monkeypatch.setattr(wire, "srp_server", lambda *args: calls.append(args) or real(*args))
    return calls


def refusal(answer) -> list[str]:
    return unpack_fields(answer.payload)[1:]


def test_guessing_locks_the_guessers_address_and_the_owner_still_gets_in(harness, hashes):
    Peer(harness, 1, ip=OWNER).register("alice")
    for guess in range(server.LOGIN_FAILURES):
        assert refusal(Peer(harness, 10 + guess, ip=ATTACKER).login("alice", f"guess{guess}"))[0] == "invalid-login"
    hashed = len(hashes)
    assert refusal(Peer(harness, 20, ip=ATTACKER).login("alice", "pw"))[0] == "locked"  # even the right one
    assert len(hashes) == hashed  # refused before any modular exponentiation
    assert Peer(harness, 2, ip=OWNER).login("alice").type == OK


def test_one_address_tries_a_few_passwords_a_minute_over_all_accounts(harness, hashes):
    for number in range(server.LOGIN_FAILURES_PER_ADDRESS):  # one guess for each of 20 accounts
        assert refusal(Peer(harness, number + 1, ip=ATTACKER).login(f"mhs{number:02}", "123456"))[0] == "invalid-login"
    hashed = len(hashes)
    answer = Peer(harness, 99, ip=ATTACKER).login("mhs99", "123456")  # a 21st account: locked too
    assert refusal(answer) == ["locked", f"Too many failed attempts; try again in {server.LOGIN_PERIOD:.0f} s."]
    assert len(hashes) == hashed
    per_minute = server.LOGIN_FAILURES_PER_ADDRESS / (server.LOGIN_PERIOD / 60)
    assert per_minute <= 5


def test_a_success_forgives_its_own_typos_so_a_class_behind_one_address_gets_in(harness):
    nat = "10.0.0.1"
    for number in range(40):  # 40 students behind one NAT address, each with a typo first
        student = f"mhs{number:02}"
        Peer(harness, 1, ip=f"10.1.{number}.1").register(student)  # made earlier, elsewhere
        assert refusal(Peer(harness, 2000 + number, ip=nat).login(student, "typo"))[0] == "invalid-login"
        assert Peer(harness, 3000 + number, ip=nat).login(student).type == OK


@pytest.mark.parametrize("look_alike", ["ALICE", "aIice", "a1ice", "aiice", "rnallory"])
def test_a_name_that_looks_like_one_in_use_is_taken(harness, look_alike):
    peer = Peer(harness, 1)
    for name in ("alice", "mallory"):
        peer.register(name)
    assert peer.text(PacketType.REGISTER, peer.cookie(), look_alike, *ACCOUNT) == "Username already taken."
    assert len(harness.chat.users) == 2


def test_on_a_lan_the_owner_logs_in_from_another_pc_while_the_guesser_is_locked(lan, tmp_path):  # noqa: F811
    server_ip = lan.address("server")
    start_chat_server(lan, tmp_path)
    owner = lan.start("client2", "client.py", "--host", server_ip, "--port", PORT)
    owner.type("/register", "alice", "secret", "secret")
    owner.expect("Registration successful.")
    guesses = [f"guess{number}" for number in range(server.LOGIN_FAILURES + 1)]
    attacker = lan.start("client1", "-c", GUESSER, server_ip, PORT, "alice", *guesses, "secret")
    codes = [attacker.expect("refused:").split()[-1] for _ in range(len(guesses) + 1)]
    assert codes == ["invalid-login"] * server.LOGIN_FAILURES + ["locked", "locked"]  # the right one too
    assert attacker.finish() == 0
    owner.type("/login", "alice", "secret", "juara")
    owner.expect("joined lobby")


# The attacker's script on its PC: one login per password given, each refusal's code printed.
GUESSER = """
import sys, client
host, port, name, *passwords = sys.argv[1:]
with client.ChatClient(host, int(port)) as chat:
    for password in passwords:
        try:
            chat.login(name, password)
            print("logged in")
        except client.Refused as refusal:
            print("refused:", refusal.code)
"""
