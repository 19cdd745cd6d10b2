"""A hostile classmate against the login: no password on the wire, no login by a fake server,
and guessing locks out the guesser, not the owner.

Login is SRP-6a (docs/PROTOCOL.md): a capture of REGISTER and LOGIN holds no password under any
decoding of the toy ciphers, a replayed proof is refused, and a server that does not hold the
account's verifier cannot make the M2 the client checks.

The lockouts count failed logins per account and address, and per address across accounts
(auth.LoginLimiter), checked before any modular exponentiation: an owner at another PC still gets
in while the guesser's address is locked, and one address tries at most a few passwords a minute
over all accounts. A new name that looks like one in use (`aIice` beside `alice`) is taken.
The last test runs the real server and clients on a LAN of network namespaces (tests/test_lan.py).
"""

import socket
import threading

import pytest
from conftest import FAST_HASH, member
from test_chat_server import ACCOUNT, OK, A, Harness, Peer
from test_lan import PORT, lan, start_chat_server  # noqa: F401 - `lan` is the fixture used below

import auth
import client
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


class Wiretap:
    """A relay between one client and the server that keeps a copy of every datagram."""

    def __init__(self, server_address):
        self.front, self.back = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        for sock in (self.front, self.back):
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(0.01)
        self.address, self.server, self.client, self.seen = self.front.getsockname(), server_address, None, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            for sock in (self.front, self.back):
                try:
                    data, sender = sock.recvfrom(65535)
                except (TimeoutError, ConnectionResetError):
                    continue
                self.seen.append(data)
                if sock is self.front:
                    self.client = sender
                    self.from_client(data)
                elif self.client:
                    self.front.sendto(data, self.client)

    def from_client(self, data: bytes) -> None:
        """Pass a client's datagram on to the server (a forging relay may answer it itself)."""
        self.back.sendto(data, self.server)

    def close(self):
        self.stopping.set()
        self.thread.join()
        self.front.close()
        self.back.close()


def readable_anywhere(secret: str, datagrams: list[bytes]) -> bool:
    """Is `secret` in some datagram as sent, or under the default XOR key, or any Caesar shift?"""
    ciphers = [wire.make_cipher("xor")] + [wire.CaesarCipher(shift) for shift in range(256)]
    return any(secret.encode() in cipher.decrypt(data[wire.HEADER_SIZE:])
               for data in datagrams for cipher in ciphers)


# --- A: the password never crosses the wire; a fake server cannot complete a login ----------------


def test_a_capture_of_register_login_and_join_holds_no_password(start_server, make_client):
    running = start_server()
    tap = Wiretap(running.address)
    try:
        bob = make_client(tap.address)
        assert bob.register("bob", "builder-42") == "Registration successful."
        assert bob.login("bob", "builder-42") == "Welcome, bob."
        assert bob.join("lobby", "juara") == "joined lobby, 1 here"
        bob.say("a line the toy cipher shows")  # answered: the SAY went through the tap
        assert readable_anywhere("a line the toy cipher shows", tap.seen)  # the search can read
        assert not readable_anywhere("builder-42", tap.seen)  # the account's password
        assert not readable_anywhere("juara", tap.seen)  # the room's, sealed with the session key
        record = running.chat.users.get("bob")
        assert "hash" not in record and record["iterations"] == FAST_HASH  # v, not a hash that logs in
        assert "builder-42" not in repr(bob.protocol.login)  # kept for rejoins: x, not the password
    finally:
        tap.close()


def test_a_server_without_the_verifier_cannot_complete_a_login(start_server, make_client, monkeypatch):
    def let_anyone_in(chat, request, fields):  # a fake server: any proof will do, M2 made up
        request.rejoin = False
        return [*server.open_login(chat, request, fields[1]), "00" * 32, "00" * 32]  # and a "sealed" proof

    running = start_server()
    member(make_client, running.address, "alice")
    monkeypatch.setattr(server, "check_proof", let_anyone_in)
    victim = make_client(running.address)
    with pytest.raises(client.Refused) as refused:
        victim.login("alice", "any guess")
    assert refused.value.code == "bad-proof" and not victim.logged_in


def test_a_replayed_proof_is_refused(harness):
    Peer(harness, 1).register("alice")
    alice = Peer(harness, 2)
    assert alice.login("alice").type == OK
    proof = alice.last_request
    harness.now += 1
    assert refusal(harness.deliver(proof, alice.address)[0][0])[0] == "alice"  # a retry: the same answer
    harness.chat.replies.clear()  # forgotten: now it is a replay
    assert refusal(harness.deliver(proof, alice.address)[0][0])[0] == "stale-cookie"


def test_an_unknown_name_looks_like_a_known_one_with_a_wrong_password(harness):
    Peer(harness, 1).register("alice")
    answers = {}
    for name in ("alice", "nobody", "nobody"):
        peer = Peer(harness, len(answers) + 10)
        first = peer.answer(PacketType.LOGIN, peer.cookie(), name, client.public_key(3))
        answers.setdefault(name, []).append(unpack_fields(first.payload)[1:])
        assert refusal(peer.login(name, "wrong"))[0] == "invalid-login"
    (known,), unknown = answers["alice"], answers["nobody"]
    assert [len(field) for field in unknown[0][:2]] == [len(field) for field in known[:2]]
    assert unknown[0][:2] == unknown[1][:2] and unknown[0][2] != unknown[1][2]  # a stable salt, a new B


def test_a_register_below_the_servers_iterations_or_with_a_bad_verifier_is_refused(harness):
    peer = Peer(harness, 1)
    salt, _, verifier = ACCOUNT
    for iterations, v in ((str(FAST_HASH - 1), verifier), (str(FAST_HASH), "1"), (str(FAST_HASH), "zz")):
        fields = peer.tagged(peer.cookie(), "alice", salt, iterations, v)
        assert peer.fields(PacketType.REGISTER, *fields)[0] == "bad-request"
    assert not harness.chat.users.exists("alice")


def test_an_account_of_protocol_4_is_told_to_register_again(tmp_path):
    made = Harness(tmp_path / "data")
    made.chat.users.add(auth.new_record("old", "pw", FAST_HASH))
    made.chat.close()
    harness = Harness(tmp_path / "data")
    try:
        assert refusal(Peer(harness, 1).login("old"))[0] == "invalid-login"
        assert any("old has a password hash of protocol 4" in line for line in harness.log)
    finally:
        harness.chat.close()


# --- F: fair password checks ------------------------------------------------------------------------


def test_a_flood_of_checks_from_one_address_delays_that_address_not_an_honest_login(harness):
    Peer(harness, 1, ip=OWNER).register("alice")
    flood = Peer(harness, 2, ip=ATTACKER)
    for number in range(200):  # a flood of first steps from one address: each a check for the worker
        assert flood.send(PacketType.LOGIN, flood.cookie(), f"nobody{number}", A, run_jobs=False) == []
    honest = Peer(harness, 3, ip=OWNER)
    assert honest.send(PacketType.LOGIN, honest.cookie(), "alice", A, run_jobs=False) == []
    answered = [to for _, to, _ in harness.run_jobs()]
    assert len(answered) == 201 and answered.index(honest.address) <= 1  # behind one of the flood at most


def test_a_flood_at_one_account_from_many_addresses_delays_that_account(harness):
    for number in range(50):
        peer = Peer(harness, 1, ip=f"10.9.{number}.1")
        assert peer.send(PacketType.LOGIN, peer.cookie(), "alice", A, run_jobs=False) == []
    honest = Peer(harness, 2, ip=OWNER)
    assert honest.send(PacketType.LOGIN, honest.cookie(), "bob", A, run_jobs=False) == []
    answered = [to for _, to, _ in harness.run_jobs()]
    assert answered.index(honest.address) <= 1


# --- B: lockouts ------------------------------------------------------------------------------------


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
    fields = peer.tagged(peer.cookie(), look_alike, *ACCOUNT)
    assert peer.text(PacketType.REGISTER, *fields) == "Username already taken."
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
